//! A push from a peer, snapshot or change batch, end to end (what
//! `FederationPeer.PushSnapshot` and `PushChanges` do; their handlers only
//! adapt): collect the stream within the limits, check the caller is the
//! source it names, verify, store and fold it in on the blocking pool, then
//! look the unverified idempotency keys of that source up again.
//!
//! AES-256-GCM, zstd, decoding and the fsync'd write never run on a tokio
//! worker: only collecting the stream and the key look-ups do.

use std::sync::Arc;

use federation_api as api;

use super::Rejection;
use super::Replicator;
use super::receiver::{Accepted, Stats, collect};
use crate::error::Error;

/// What a push carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// A snapshot (`PushSnapshot`).
    Snapshot,
    /// A change batch (`PushChanges`).
    Changes,
}

/// Receives one push. `authorize` is asked whether the caller may push the
/// state of the source the push names (with TLS, the caller's certificate
/// must name it); a refusal is counted as `not_permitted` and returned as
/// it is. The outer error is for the call (replication off, a limit, a
/// broken stream); the inner result is the receiver's verdict, which the
/// response carries.
pub async fn receive<S, E>(
    rep: &Arc<Replicator>,
    stream: S,
    what: Pushed,
    authorize: impl FnOnce(&str) -> Result<(), E>,
) -> Result<Result<Accepted, Rejection>, E>
where
    S: futures::Stream<Item = Result<api::SnapshotChunk, tonic::Status>> + Unpin,
    E: From<Error>,
{
    let repl = &rep.replication;
    if !repl.enabled() {
        return Err(Error::Precondition(format!(
            "snapshot replication is off in {} (disabled or no key ring)",
            rep.region
        ))
        .into());
    }
    let chunks = collect(stream, repl.receiver.limits(), repl.counters()).await?;
    let source = chunks
        .first()
        .and_then(|c| c.header.as_ref())
        .map(|h| h.source_region.clone())
        .unwrap_or_default();
    if let Err(e) = authorize(&source) {
        Stats::bump(&repl.counters().rejected_not_permitted);
        return Err(e);
    }
    // Off the async workers: decrypting, decompressing and decoding up to
    // the snapshot limit, and an fsync'd write.
    let on_pool = rep.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let repl = &on_pool.replication;
        let policy = on_pool.cluster.policy();
        match what {
            Pushed::Snapshot => repl.receiver.receive(&policy, &chunks, repl.counters()),
            Pushed::Changes => repl
                .receiver
                .receive_changes(&policy, &chunks, repl.counters()),
        }
    })
    .await
    .map_err(|e| Error::Storage(format!("receiving: {e}")))?;
    if outcome.is_ok() {
        // Keys we used without being able to know them may now be known.
        // A snapshot is answered only after the check (a restarted source's
        // start-up fence waits for that answer); batches do not wait for it.
        let check =
            super::duplicates::on_copy_updated(rep.clone(), source, what == Pushed::Snapshot);
        match what {
            Pushed::Snapshot => check.await,
            Pushed::Changes => rep.detached.spawn(check),
        }
    }
    Ok(outcome)
}

/// The answer to `PushSnapshot`.
pub fn snapshot_response(outcome: Result<Accepted, Rejection>) -> api::PushSnapshotResponse {
    match outcome {
        Ok(_) => api::PushSnapshotResponse {
            accepted: true,
            reason: String::new(),
        },
        Err(r) => api::PushSnapshotResponse {
            accepted: false,
            reason: r.to_string(),
        },
    }
}

/// The answer to `PushChanges`.
pub fn changes_response(outcome: Result<Accepted, Rejection>) -> api::PushChangesResponse {
    match outcome {
        Ok(a) => api::PushChangesResponse {
            accepted: true,
            reason: String::new(),
            snapshot_wanted: a.snapshot_wanted,
        },
        Err(r) => api::PushChangesResponse {
            accepted: false,
            reason: r.to_string(),
            snapshot_wanted: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::controller::{self, Settings};
    use crate::replication::envelope::{NonceSource, Pipeline, SealParams};
    use crate::replication::{Key, KeyRing, SnapshotBody, seal_snapshot};

    const SEED: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/seed-federation.yaml"
    );

    fn key() -> Key {
        Key::new("k1", [42u8; 32])
    }

    /// A controller of europe (plaintext, replication on), not serving:
    /// its replicator.
    async fn europe(dir: &std::path::Path) -> Arc<Replicator> {
        let mut settings = Settings::for_test(
            "europe",
            std::path::Path::new(SEED),
            &dir.join("europe"),
            "127.0.0.1:1".parse().expect("address"),
        )
        .expect("settings");
        settings.keys = Some(KeyRing::from_keys(vec![key()], None));
        let node = controller::open(settings).await.expect("controller opens");
        node.replicator().clone()
    }

    /// A snapshot of north_america holding `n` tasks europe backs up.
    fn snapshot(sequence: u64, n: usize) -> Vec<api::SnapshotChunk> {
        let tasks = (0..n)
            .map(|i| api::Task {
                task_id: crate::wire::new_task_id("north_america"),
                rule_index: 0,
                owner_region: "north_america".into(),
                payload: format!("{{\"n\":{i}}}").into_bytes(),
                attributes: federation_sandbox::string_attrs(&[("customer_region", "US")]),
                state: api::TaskState::Queued as i32,
                version: 1,
                ..Default::default()
            })
            .collect();
        let body = SnapshotBody {
            source_region: "north_america".into(),
            epoch: 1,
            sequence,
            tasks,
            ..Default::default()
        };
        let params = SealParams {
            source: "north_america".into(),
            epoch: 1,
            sequence,
            rule_indexes: vec![0],
            policy_hash: String::new(),
            compression: Some(3),
            chunk_size: super::super::CHUNK_SIZE,
        };
        seal_snapshot(
            &body,
            crate::replication::BodyFormat::Columnar,
            &params,
            &key(),
            &NonceSource::new(),
            Pipeline::Off,
        )
        .expect("seal")
    }

    fn stream(
        chunks: Vec<api::SnapshotChunk>,
    ) -> impl futures::Stream<Item = Result<api::SnapshotChunk, tonic::Status>> + Unpin {
        futures::stream::iter(chunks.into_iter().map(Ok))
    }

    /// Issue 13: the receiver's AES-GCM open, zstd, decode and fsync'd
    /// write run on the blocking pool. On a runtime with one thread, a push
    /// is received while a thread holds the copy's lock (so verifying
    /// blocks); a second future on that runtime releases the lock. It can
    /// only run if the receive left the runtime's thread free: run inline,
    /// the receive would wait for the lock with the only thread, and the
    /// lock would be let go by the holder's own bound instead.
    #[test]
    fn a_push_is_verified_off_the_runtime_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let node = rt.block_on(europe(dir.path()));
        let allow = |_: &str| Ok::<(), Error>(());
        let first = rt
            .block_on(receive(
                &node,
                stream(snapshot(1, 10)),
                Pushed::Snapshot,
                allow,
            ))
            .expect("call");
        assert_eq!(first.expect("accepted").tasks, 10);

        // A thread holds the copy's lock until told to let go (or, bound
        // for the failing case, for at most 60 s).
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let node = node.clone();
            std::thread::spawn(move || {
                node.replication
                    .receiver
                    .with_copy("north_america", |_| {
                        locked_tx.send(()).expect("locked");
                        release_rx.recv_timeout(Duration::from_secs(60)).is_ok()
                    })
                    .expect("a copy of north_america")
            })
        };
        locked_rx.recv().expect("the holder has the lock");

        let authorized = AtomicBool::new(false);
        let saw = rt.block_on(async {
            let push = receive(&node, stream(snapshot(2, 1_000)), Pushed::Snapshot, |_| {
                authorized.store(true, Ordering::SeqCst);
                Ok::<(), Error>(())
            });
            // The other future: once the push is past its checks on the
            // async side (verifying is next), it lets the holder go.
            let heartbeat = async {
                for _ in 0..1_000_000 {
                    if authorized.load(Ordering::SeqCst) {
                        let _ = release_tx.send(());
                        return true;
                    }
                    tokio::task::yield_now().await;
                }
                false
            };
            let (outcome, saw) = tokio::join!(push, heartbeat);
            assert_eq!(outcome.expect("call").expect("accepted").tasks, 1_000);
            saw
        });
        assert!(
            holder.join().expect("holder"),
            "the lock was let go by its bound, not by the other future: the push was verified on the runtime's only thread"
        );
        assert!(saw, "the other future never saw the push authorized");
    }
}
