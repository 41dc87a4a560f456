//! Watches across replicas: the one connection that LISTENs for other
//! replicas' commits, reads the tasks they changed and publishes them.

use std::sync::Arc;
use std::time::Duration;

use federation_api::TaskState;
use tokio::sync::{mpsc, oneshot};

use super::CHANNEL;
use super::Shared;
use crate::tasks::Counts;
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
            while let Some(payload) = rx.recv().await {
                let mut words = payload.split(' ');
                let (Some(from), Some(of)) = (words.next(), words.next()) else {
                    continue;
                };
                if from == shared.instance || of != region {
                    continue;
                }
                let ids: Vec<String> = words.map(str::to_string).collect();
                if let Err(e) = publish(&pool, &region, &shared, &ids).await {
                    tracing::warn!(target = %target, error = %e, "reading tasks another replica changed failed");
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

/// Reads the tasks `ids` and publishes them; recounts the region's tasks.
pub(super) async fn publish(
    pool: &deadpool_postgres::Pool,
    region: &str,
    shared: &Shared,
    ids: &[String],
) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id = ANY($2)",
            &[&region, &ids],
        )
        .await
        .map_err(|e| e.to_string())?;
    let counted = client
        .query(
            "SELECT state, count(*) FROM tasks WHERE region = $1 GROUP BY state",
            &[&region],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut counts = Counts::default();
    for r in counted {
        if let Ok(s) = TaskState::try_from(i32::from(r.get::<_, i16>(0))) {
            counts.add(s, r.get::<_, i64>(1));
        }
    }
    shared.set_counts(counts);
    for r in rows {
        let id: &str = r.get(0);
        match decode(id, r.get::<_, &[u8]>(1)) {
            Ok(t) => shared.publish(t),
            Err(e) => shared.undecodable(&e),
        }
    }
    Ok(())
}
