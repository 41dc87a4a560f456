//! Takeover of a dead region's pending tasks, the notices that tell it, and
//! the start-up lease fence.
//!
//! * **Takeover** ([`take_over_dead_regions`]): when a region we hold a snapshot of has been
//!   dead (or never heard since our start) for `timers.takeover_grace`, we
//!   queue the pending tasks of our copy of it (newest snapshot plus the
//!   change batches since, [`super::copy`]) that we may hold (rule lists us
//!   as backup or as another member of its set of primaries, we hold the
//!   required tags) under their original ids,
//!   `attempts` kept, `taken_over` = {from, epoch, to us, now}, with one
//!   `takeover` record per task created, all in one store batch
//!   ([`TaskStore::insert_batch`]: one transaction, the records appended
//!   with it). Once per (region, epoch).
//! * **Notices**: every advertisement we send carries the ids we took over
//!   (persisted in `<data_dir>/takeovers.json`, kept for [`NOTICE_TTL_MS`]).
//!   A region that sees notices about itself cancels those tasks
//!   (`mark_taken_over`) and does not run them again.
//! * **Fence**: at start, when the store holds pending tasks and our rules
//!   name regions that may hold copies of them ([`snapshot::recipients`]),
//!   the queued tasks owned by us created before this start are not leased
//!   until we have received an advertisement (carrying its notices) from
//!   every such region since we started and, with replication on, every one
//!   has answered our first snapshot (it resolves duplicate idempotency keys
//!   before answering, [`super::duplicates`]), or `timers.startup_fence` has
//!   passed. "Before this start" is a boundary, not a list: created before
//!   the later of this start's clock and the newest creation time the store
//!   recorded ([`TaskStore::newest_created_ms`], persisted: a clock set back
//!   across the restart does not let an old task through), so setting the
//!   fence up reads no task ([`LeaseFence`]).
//!
//! Owns `takeovers.json` and the fence; uses the task store's public API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation_api as api;
use serde::{Deserialize, Serialize};

use super::{Replicator, snapshot};
use crate::audit::{Entry, Prepared, kind};
use crate::clock::now_unix_ms;
use crate::policy::{Health, Policy};
use crate::tasks::{InsertOutcome, LeaseFence, RecordState, TaskStore};

/// How long a takeover notice is advertised.
pub const NOTICE_TTL_MS: i64 = 24 * 3600 * 1000;
/// Most task ids advertised in notices.
const MAX_NOTICE_IDS: usize = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Notice {
    from_region: String,
    from_epoch: u64,
    at_unix_ms: i64,
    task_ids: Vec<String>,
}

#[derive(Debug)]
struct Fence {
    /// Which queued tasks a lease passes over meanwhile.
    held_back: Arc<LeaseFence>,
    /// Backups not yet heard (their advertisement carries the notices).
    waiting_for: BTreeSet<String>,
    /// Backups that have not yet answered our first snapshot (their
    /// duplicate check runs before they answer).
    unsynced: BTreeSet<String>,
    until: Instant,
}

/// Takeover bookkeeping of one controller.
#[derive(Debug)]
pub struct TakeoverState {
    path: PathBuf,
    notices: Mutex<Vec<Notice>>,
    dead_since: Mutex<BTreeMap<String, Instant>>,
    started: Instant,
    /// Task ids of ours a backup took over (from its notices), and by whom.
    applied: Mutex<HashMap<String, String>>,
    fence: Mutex<Option<Fence>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TakeoverState {
    /// Loads notices and sets up the start-up fence over the store's pending
    /// tasks (their count and the store's newest creation time: O(1)).
    pub fn open(
        region: &str,
        data_dir: &Path,
        policy: &Policy,
        store: &TaskStore,
        fence_for: Duration,
        replicating: bool,
    ) -> Self {
        let path = data_dir.join("takeovers.json");
        let notices: Vec<Notice> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "takeover notices unreadable; starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let fence = fence_at_start(region, policy, store, now_unix_ms()).map(|(held_back, waiting_for)| {
            tracing::info!(pending = held_back.held(), created_before_unix_ms = held_back.before_ms(), backups = %crate::logfields::list(&waiting_for), "start-up fence: tasks from before the restart wait for the backups' notices");
            Fence {
                held_back: Arc::new(held_back),
                unsynced: if replicating {
                    waiting_for.clone()
                } else {
                    BTreeSet::new()
                },
                waiting_for,
                until: Instant::now() + fence_for,
            }
        });
        Self {
            path,
            notices: Mutex::new(notices),
            dead_since: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            applied: Mutex::new(HashMap::new()),
            fence: Mutex::new(fence),
        }
    }

    /// The queued tasks not to lease yet (the fence), or `None` once lifted.
    pub fn lease_fence(&self) -> Option<Arc<LeaseFence>> {
        let mut fence = lock(&self.fence);
        let lift = fence.as_ref().is_some_and(|f| {
            (f.waiting_for.is_empty() && f.unsynced.is_empty()) || Instant::now() >= f.until
        });
        if lift {
            if let Some(f) = fence.take() {
                tracing::info!(not_heard = %crate::logfields::list(&f.waiting_for), not_synced = %crate::logfields::list(&f.unsynced), "start-up fence lifted");
            }
        }
        fence.as_ref().map(|f| f.held_back.clone())
    }

    /// `backup` answered our first snapshot since start: its duplicate check
    /// of our tasks has run, so the fence stops waiting for that.
    pub fn snapshot_answered(&self, backup: &str) {
        if let Some(f) = lock(&self.fence).as_mut() {
            f.unsynced.remove(backup);
        }
    }

    /// The region whose notice said it took over our task `task_id`.
    pub fn taken_over_by(&self, task_id: &str) -> Option<String> {
        lock(&self.applied).get(task_id).cloned()
    }

    /// The notices to advertise.
    pub fn notices(&self) -> Vec<api::TakeoverNotice> {
        let cutoff = now_unix_ms() - NOTICE_TTL_MS;
        lock(&self.notices)
            .iter()
            .filter(|n| n.at_unix_ms >= cutoff)
            .map(|n| api::TakeoverNotice {
                from_region: n.from_region.clone(),
                from_epoch: n.from_epoch,
                task_ids: n.task_ids.clone(),
            })
            .collect()
    }

    fn record(&self, notice: Notice) {
        let mut notices = lock(&self.notices);
        let cutoff = now_unix_ms() - NOTICE_TTL_MS;
        notices.retain(|n| n.at_unix_ms >= cutoff);
        notices.push(notice);
        let mut total: usize = notices.iter().map(|n| n.task_ids.len()).sum();
        while total > MAX_NOTICE_IDS && notices.len() > 1 {
            total -= notices.remove(0).task_ids.len();
        }
        let written = serde_json::to_vec(&*notices)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::atomic_file::write(&self.path, &bytes));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "persisting takeover notices failed");
        }
    }
}

/// The start-up fence `region` sets up at `now_ms`, if any: over its tasks
/// created before the later of `now_ms` and the newest creation time its
/// store recorded, waiting for every region our rules let hold copies of
/// them. None when the store holds no pending task or no region may hold a
/// copy (nothing could have been taken over).
fn fence_at_start(
    region: &str,
    policy: &Policy,
    store: &TaskStore,
    now_ms: i64,
) -> Option<(LeaseFence, BTreeSet<String>)> {
    let counts = store.counts();
    let pending = counts.queued as usize + counts.leased as usize;
    let waiting_for = snapshot::recipients(policy, region);
    if pending == 0 || waiting_for.is_empty() {
        return None;
    }
    let newest = store.newest_created_ms().unwrap_or_else(|e| {
        // Unknown: the fence lasts as long, but holds back every task of
        // ours, rather than trust the clock alone.
        tracing::error!(error = %e, "reading the store's newest creation time failed; the fence holds back every task until it lifts");
        i64::MAX
    });
    let before = now_ms.max(newest.saturating_add(1));
    Some((LeaseFence::new(region, before, pending), waiting_for))
}

/// Applies the notices in an advertisement from `ad.region` (direct or
/// gossiped): our tasks a backup took over are cancelled here (marked
/// `taken_over`). Then, if the advertisement is the backup's own, the fence
/// stops waiting for it.
pub async fn on_advertisement(rep: &Replicator, ad: &api::RegionAdvertisement) {
    let state = &rep.replication.takeover;
    for notice in &ad.takeovers {
        if notice.from_region != rep.region {
            continue;
        }
        let fresh: Vec<String> = {
            let applied = lock(&state.applied);
            notice
                .task_ids
                .iter()
                .filter(|id| !applied.contains_key(*id))
                .take(MAX_NOTICE_IDS)
                .cloned()
                .collect()
        };
        if fresh.is_empty() {
            continue;
        }
        let takeover = api::Takeover {
            from_region: rep.region.clone(),
            from_epoch: notice.from_epoch,
            to_region: ad.region.clone(),
            at_unix_ms: now_unix_ms(),
        };
        match rep.store.mark_taken_over(fresh.clone(), takeover).await {
            Ok(changed) => {
                if !changed.is_empty() {
                    rep.replication
                        .counters()
                        .fenced_tasks
                        .fetch_add(changed.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(by = %ad.region, tasks = changed.len(), "tasks taken over by a backup while we were dead; they will not run here");
                }
                lock(&state.applied).extend(fresh.into_iter().map(|id| (id, ad.region.clone())));
            }
            Err(e) => {
                tracing::error!(error = %e, "applying takeover notices failed");
                return;
            }
        }
    }
    if let Some(f) = lock(&state.fence).as_mut() {
        f.waiting_for.remove(&ad.region);
    }
}

/// Takes over the pending tasks of every region we hold a copy of that has
/// been dead for `takeover_grace` (run once per heartbeat).
pub async fn take_over_dead_regions(rep: &Arc<Replicator>) {
    let repl = &rep.replication;
    let state = &repl.takeover;
    let now = Instant::now();
    let health: BTreeMap<String, Health> = rep
        .cluster
        .membership()
        .status(now)
        .into_iter()
        .map(|s| (s.region, s.health))
        .collect();
    for source in repl.receiver.sources() {
        let h = health.get(&source).copied().unwrap_or(Health::Unknown);
        let since = {
            let mut dead = lock(&state.dead_since);
            match h {
                Health::Dead => *dead.entry(source.clone()).or_insert(now),
                Health::Unknown => *dead.entry(source.clone()).or_insert(state.started),
                _ => {
                    dead.remove(&source);
                    continue;
                }
            }
        };
        if now.saturating_duration_since(since) < rep.timers.takeover_grace {
            continue;
        }
        let Some((epoch, tasks)) = repl.receiver.pending_of(&source) else {
            continue;
        };
        let done = lock(&state.notices)
            .iter()
            .any(|n| n.from_region == source && n.from_epoch == epoch);
        if done {
            continue;
        }
        take_over(rep, &source, epoch, tasks).await;
    }
}

async fn take_over(rep: &Arc<Replicator>, source: &str, epoch: u64, tasks: Vec<api::Task>) {
    let policy = rep.cluster.policy();
    let tags = policy
        .region(&rep.region)
        .map(|r| r.tags.clone())
        .unwrap_or_default();
    let at = now_unix_ms();
    let mut refused = 0usize;
    let mut batch = Vec::with_capacity(tasks.len());
    let mut records = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        if let Err(why) = snapshot::may_hold(&policy, source, &rep.region, &tags, &task) {
            refused += 1;
            tracing::warn!(task_id = %task.task_id, %why, "not taking over a task we may not hold");
            continue;
        }
        task.taken_over = Some(api::Takeover {
            from_region: source.to_string(),
            from_epoch: epoch,
            to_region: rep.region.clone(),
            at_unix_ms: at,
        });
        task.owner_region = source.to_string();
        let entry = Entry::new(kind::TAKEOVER)
            .task(&task.task_id)
            .note(format!(
                "taken over from {source} (epoch {epoch}) by {}: {source} dead for more than {:?}; rule {}",
                rep.region,
                rep.timers.takeover_grace,
                task.rule_index + 1
            ));
        records.push(Prepared::entry(&Entry {
            rule_index: Some(task.rule_index),
            policy_hash: Some(policy.hash.clone()),
            chosen_region: Some(rep.region.clone()),
            outcome: Some("takeover".into()),
            ..entry
        }));
        batch.push(task);
    }
    let offered: Vec<String> = batch.iter().map(|t| t.task_id.clone()).collect();
    // One transaction for them all, their records in the same batch; the
    // leader's token checked in it (a deposed leader takes nothing over).
    let Some(token) = rep.cluster.leader_token() else {
        tracing::warn!(%source, "no longer the region's leader; takeover left to the new one");
        return;
    };
    let stored = rep
        .store
        .insert_batch_as_leader(batch, Some(records), token)
        .await;
    if let RecordState::Failed(e) = &stored.record {
        tracing::error!(error = %e, "appending takeover records failed");
    }
    let mut ids = Vec::with_capacity(offered.len());
    match stored.outcomes {
        Ok(outcomes) => {
            for (id, outcome) in offered.into_iter().zip(outcomes) {
                match outcome {
                    Ok(InsertOutcome::Created(_) | InsertOutcome::Deduplicated(_)) => ids.push(id),
                    Err(e) => {
                        tracing::error!(task_id = %id, error = %e, "storing a taken-over task failed")
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(from = %source, epoch, tasks = offered.len(), error = %e, "storing the taken-over tasks failed");
        }
    }
    let stats = rep.replication.counters();
    super::Stats::bump(&stats.takeovers);
    stats
        .tasks_taken_over
        .fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(from = %source, epoch, tasks = ids.len(), refused, "took over a dead region's pending tasks");
    rep.replication.takeover.record(Notice {
        from_region: source.to_string(),
        from_epoch: epoch,
        at_unix_ms: at,
        task_ids: ids,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::load_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-federation.yaml"
        )))
        .expect("policy")
    }

    fn ours(n: u32, created: i64) -> api::Task {
        api::Task {
            task_id: format!("0190b0a0-0000-7000-8000-{n:012}.europe"),
            owner_region: "europe".into(),
            created_unix_ms: created,
            ..api::Task::default()
        }
    }

    #[tokio::test]
    async fn the_fence_needs_pending_tasks_and_a_region_that_may_hold_copies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TaskStore::open(dir.path()).expect("store");
        let policy = policy();
        assert!(
            fence_at_start("europe", &policy, &store, 1_000).is_none(),
            "no task"
        );
        store.insert(ours(1, 500)).await.expect("insert");
        let (fence, waiting) = fence_at_start("europe", &policy, &store, 1_000).expect("a fence");
        assert_eq!(waiting, BTreeSet::from(["north_america".to_string()]));
        assert_eq!((fence.before_ms(), fence.held()), (1_000, 1));
        // No rule lets another region hold asia_pacific's tasks.
        assert!(fence_at_start("asia_pacific", &policy, &store, 1_000).is_none());
    }

    #[tokio::test]
    async fn a_clock_set_back_across_the_restart_does_not_let_an_old_task_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = TaskStore::open(dir.path()).expect("store");
            store.insert(ours(1, 5_000)).await.expect("insert");
            store.insert(ours(2, 7_000)).await.expect("insert");
        }
        // Restarted with the clock at 1_000, behind the tasks' times.
        let store = TaskStore::open(dir.path()).expect("reopen");
        let (fence, _) = fence_at_start("europe", &policy(), &store, 1_000).expect("a fence");
        assert_eq!(fence.before_ms(), 7_001);
        assert!(fence.holds_back(&ours(2, 7_000).task_id, 7_000));
    }
}
