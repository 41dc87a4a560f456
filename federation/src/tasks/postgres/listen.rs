//! Watches across replicas: the one connection that LISTENs for other
//! replicas' commits, reads the tasks they changed and publishes them.

use std::sync::Arc;
use std::time::Duration;

use federation_api::TaskState;
use tokio::sync::{mpsc, oneshot};

use super::CHANNEL;
use super::Shared;
use crate::tasks::Counts;
use crate::tasks::shared::Change;
use crate::tasks::store::decode;

/// Listens for other replicas' changes of `region` until `stop` fires:
/// reads each notified task and publishes it, and recounts the tasks.
/// Reconnects every second while the database cannot be reached.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: crate::pg_tls::Connector,
    pool: deadpool_postgres::Pool,
    target: String,
    region: String,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    use futures::StreamExt as _;
    loop {
        let session = async {
            let (client, mut connection) = config
                .connect(tls.clone())
                .await
                .map_err(|e| e.to_string())?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(m)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = m {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(target = %target, region = %region, "listening for other replicas' changes");
            // Counted afresh at every (re)connection: what was notified
            // while no connection listened is not replayed.
            let mut recount = true;
            let mut counted = std::time::Instant::now();
            while let Some(first) = rx.recv().await {
                // Every notification already queued is read with this one:
                // one read of the changed tasks, however many commits.
                let mut payloads = vec![first];
                while payloads.len() < MAX_COALESCED {
                    match rx.try_recv() {
                        Ok(p) => payloads.push(p),
                        Err(_) => break,
                    }
                }
                let mut ids: Vec<String> = Vec::new();
                let mut delta = [0i64; 5];
                let mut others = false;
                let wanted = shared.wants_new_tasks();
                let mut created = false;
                for payload in &payloads {
                    let Some(heard) = Heard::of(payload, &shared.instance, &region, wanted) else {
                        continue;
                    };
                    others = true;
                    created |= heard.created;
                    delta.iter_mut().zip(heard.delta).for_each(|(a, b)| *a += b);
                    // An older replica's notification says what changed, not
                    // how the counts moved: they are counted again.
                    recount |= !heard.moved && !heard.ids.is_empty();
                    ids.extend(heard.ids);
                }
                // Now and then the counts are read from the database anyway,
                // so a notification missed while reconnecting does not leave
                // them off for good.
                recount |= counted.elapsed() >= RECOUNT_EVERY && delta != [0; 5];
                // Only another replica's change is read (this store's own are
                // counted and published by its writer).
                if !others {
                    continue;
                }
                if created {
                    shared.created_elsewhere();
                }
                match publish(&pool, &region, &shared, &ids, delta, recount).await {
                    Ok(()) => {
                        if recount {
                            counted = std::time::Instant::now();
                        }
                        recount = false;
                    }
                    Err(e) => {
                        tracing::warn!(target = %target, error = %e, "reading tasks another replica changed failed")
                    }
                }
            }
            Err::<(), String>("the listening connection closed".into())
        };
        tokio::select! {
            _ = &mut stop => return,
            ended = session => {
                if let Err(e) = ended {
                    tracing::debug!(target = %target, error = %e, "change listener stopped; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What one notification payload of another replica says:
/// `<instance> <region> d=<delta> n=<new> <id> …` (older replicas send no
/// `n=`, and `d=` only in a commit's first payload).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Heard {
    /// The tasks to read and publish.
    pub(super) ids: Vec<String>,
    /// How the commit moved the counts by state.
    pub(super) delta: [i64; 5],
    /// The payload carried a `d=` word.
    pub(super) moved: bool,
    /// It named tasks the commit created that are not read (`wanted`
    /// false): long polls are to be woken.
    pub(super) created: bool,
}

impl Heard {
    /// Reads `payload` (`None`: this replica's own, or another region's).
    /// The first `n=` ids are tasks the commit created: listed only when
    /// `wanted` (the sink hands them on).
    pub(super) fn of(payload: &str, instance: &str, region: &str, wanted: bool) -> Option<Self> {
        let mut words = payload.split(' ');
        let (Some(from), Some(of)) = (words.next(), words.next()) else {
            return None;
        };
        if from == instance || of != region {
            return None;
        }
        let mut heard = Heard::default();
        let mut new = 0usize;
        for w in words {
            if let Some(d) = parse_delta(w) {
                heard.moved = true;
                heard.delta.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            } else if let Some(n) = w.strip_prefix("n=").and_then(|n| n.parse().ok()) {
                new = n;
            } else if new > 0 && !wanted {
                new -= 1;
                heard.created = true;
            } else {
                new = new.saturating_sub(1);
                heard.ids.push(w.to_string());
            }
        }
        Some(heard)
    }
}

/// The most notifications read together.
const MAX_COALESCED: usize = 1024;
/// How often the counts are read again while other replicas change tasks.
const RECOUNT_EVERY: Duration = Duration::from_secs(10);
/// The order of the states in a notification's `d=` word.
const DELTA_STATES: [TaskState; 5] = [
    TaskState::Queued,
    TaskState::Leased,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
];

/// The `d=` word of a payload that moves no count.
pub(super) const NO_DELTA: &str = "d=0,0,0,0,0";

/// The `d=q,l,s,f,c` word of a notification: how a commit moved the
/// region's counts by state.
pub(super) fn delta_word(changes: &[Change]) -> String {
    let mut d = [0i64; 5];
    let at = |s: TaskState| DELTA_STATES.iter().position(|x| *x == s);
    for c in changes {
        if let Some(i) = c.before.and_then(at) {
            d[i] -= 1;
        }
        if let Some(i) = at(c.after) {
            d[i] += 1;
        }
    }
    format!("d={},{},{},{},{}", d[0], d[1], d[2], d[3], d[4])
}

/// The counts' change a `d=` word carries (`None`: the word is a task id).
fn parse_delta(word: &str) -> Option<[i64; 5]> {
    let mut out = [0i64; 5];
    let mut parts = word.strip_prefix("d=")?.split(',');
    for slot in &mut out {
        *slot = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Reads the tasks `ids` and publishes them, after moving the counts by
/// `delta` — or, with `recount`, counting the region's tasks again.
pub(super) async fn publish(
    pool: &deadpool_postgres::Pool,
    region: &str,
    shared: &Shared,
    ids: &[String],
    delta: [i64; 5],
    recount: bool,
) -> Result<(), String> {
    use tokio_postgres::types::Type;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = if ids.is_empty() {
        Vec::new()
    } else {
        // Prepared once per connection (deadpool's cache).
        let reading = client
            .prepare_typed_cached(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id = ANY($2)",
                &[Type::TEXT, Type::TEXT_ARRAY],
            )
            .await
            .map_err(|e| e.to_string())?;
        client
            .query(&reading, &[&region, &ids])
            .await
            .map_err(|e| e.to_string())?
    };
    if recount {
        let counting = client
            .prepare_typed_cached(
                "SELECT state, count(*) FROM tasks WHERE region = $1 GROUP BY state",
                &[Type::TEXT],
            )
            .await
            .map_err(|e| e.to_string())?;
        let counted = client
            .query(&counting, &[&region])
            .await
            .map_err(|e| e.to_string())?;
        let mut counts = Counts::default();
        for r in counted {
            if let Ok(s) = TaskState::try_from(i32::from(r.get::<_, i16>(0))) {
                counts.add(s, r.get::<_, i64>(1));
            }
        }
        shared.set_counts(counts);
    } else {
        shared.move_counts(DELTA_STATES.iter().copied().zip(delta));
    }
    for r in rows {
        let id: &str = r.get(0);
        match decode(id, r.get::<_, &[u8]>(1)) {
            Ok(t) => shared.publish(t),
            Err(e) => shared.undecodable(&e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commits_count_changes_travel_in_its_notification() {
        let change = |before, after| Change {
            before,
            after,
            task: None,
        };
        let word = delta_word(&[
            change(None, TaskState::Queued),
            change(None, TaskState::Queued),
            change(Some(TaskState::Queued), TaskState::Leased),
            change(Some(TaskState::Leased), TaskState::Succeeded),
        ]);
        assert_eq!(word, "d=1,0,1,0,0");
        assert_eq!(parse_delta(&word), Some([1, 0, 1, 0, 0]));
        assert_eq!(parse_delta("d=-1,2,0,0,3"), Some([-1, 2, 0, 0, 3]));
        // A task id, or a malformed word, is not a count change.
        assert_eq!(parse_delta("0193-abc.europe"), None);
        assert_eq!(parse_delta("d=1,2"), None);
        assert_eq!(parse_delta("d=1,2,3,4,5,6"), None);
    }

    /// A word from the database is not trusted: extreme deltas saturate
    /// the counts instead of overflowing.
    #[test]
    fn extreme_deltas_saturate_the_counts() {
        let max = i64::MAX.to_string();
        let min = i64::MIN.to_string();
        let up = parse_delta(&format!("d={max},{max},{max},{max},{max}")).expect("parses");
        let down = parse_delta(&format!("d={min},{min},{min},{min},{min}")).expect("parses");
        let mut counts = crate::tasks::Counts::default();
        for _ in 0..3 {
            for (state, d) in DELTA_STATES.iter().zip(up) {
                counts.add(*state, d);
            }
        }
        assert_eq!((counts.queued, counts.succeeded), (u32::MAX, u64::MAX));
        for _ in 0..3 {
            for (state, d) in DELTA_STATES.iter().zip(down) {
                counts.add(*state, d);
            }
        }
        assert_eq!((counts.queued, counts.leased, counts.cancelled), (0, 0, 0));
    }
}
