//! Snapshot replication, the change stream and takeover: every
//! `sync_interval` each controller seals its pending tasks (zstd,
//! AES-256-GCM, chunked) and pushes to each peer exactly the part that peer
//! may hold ([`snapshot`]); between snapshots, every heartbeat, it pushes
//! each peer one batch of the changes since ([`changes`]), sealed and scoped
//! the same way, so a backup's copy lags about a heartbeat (plus one push)
//! behind. Receivers verify everything before storing and fold both into
//! their copy of the source ([`receiver`], [`copy`]); when a region stays
//! dead past `takeover_grace` its backup queues that region's pending tasks
//! from that copy and tells the returning region ([`takeover`]).
//!
//! Snapshots and batches to one peer share one sequence counter and are
//! sent one at a time, in sequence order, under that peer's link lock; a
//! snapshot reads the store under it. So every batch with a lower sequence
//! than a snapshot holds only changes the snapshot reflects, and the
//! receiver's version rule ([`copy`]) makes any older change a later batch
//! repeats harmless.
//!
//! Idempotency across failover (a backup answering a key from its copy,
//! duplicate pairs resolved when the primary's state arrives) is
//! [`duplicates`].
//!
//! Owns: the key ring and nonces, `<data_dir>/snapshots/`,
//! `<data_dir>/unverified_keys.json`,
//! `<data_dir>/takeovers.json`, the sync loop, the start-up lease fence and the
//! replication counters ([`Replication::stats`]). Must not touch routing
//! decisions or agents; it uses the task store only through its public API.

pub mod changes;
pub mod columnar;
pub mod copy;
pub mod duplicates;
pub mod envelope;
pub mod inbound;
pub mod keyring;
pub mod receiver;
mod rejection;
pub mod restore;
pub mod snapshot;
pub mod takeover;
pub mod view;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation_api as api;

use crate::audit::{Entry, kind};
use crate::clock::now_unix_ms;
use crate::cluster::Cluster;
use crate::config::SyncSpec;
use crate::peers::Peers;
use crate::policy::{FederationView as _, Health, Policy};
use crate::tasks::TaskStore;
use crate::transport;

pub use envelope::{EnvelopeError, Limits, NonceSource};
pub use keyring::{Key, KeyError, KeyRing};
pub use receiver::{Receiver, Rejection, Stats, StatsSnapshot};
pub use snapshot::{BodyFormat, SnapshotBody};

/// Recent results kept for snapshots.
const MAX_RECENT_RESULTS: usize = 1000;
/// Compressed bytes per chunk.
pub const CHUNK_SIZE: usize = 256 << 10;

/// The replication state of one controller.
#[derive(Debug)]
pub struct Replication {
    enabled: bool,
    sync: SyncSpec,
    ring: Option<KeyRing>,
    nonces: NonceSource,
    sequence: AtomicU64,
    stats: Arc<Stats>,
    /// Verified snapshots from peers.
    pub receiver: Receiver,
    /// Takeovers done and the start-up fence.
    pub takeover: takeover::TakeoverState,
    /// Idempotency keys used here that the primary's copy did not know.
    pub duplicates: duplicates::Duplicates,
    recent: Mutex<VecDeque<api::Task>>,
    last_summary: Mutex<BTreeMap<String, String>>,
    /// Changes heard from the store, not yet handed to the outbox.
    fresh: Mutex<changes::Fresh>,
    /// Changes not yet acknowledged by each peer.
    outbox: Mutex<changes::Outbox>,
    /// Per peer: held while a snapshot or batch is sequenced, sealed and
    /// pushed, so a peer receives them in sequence order.
    links: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per peer: when a snapshot was last pushed because it was wanted.
    wanted_at: Mutex<BTreeMap<String, Instant>>,
    /// The epoch snapshots and batches carry from when this replica last
    /// became its region's leader (0: this run's epoch): above every
    /// earlier leader's, so peers accept the new leader's pushes.
    lead_epoch: AtomicU64,
}

impl Replication {
    /// Opens the replication state for `region` in `data_dir`. Replication is
    /// on when the federation file enables it and a key ring is present.
    pub fn open(
        region: &str,
        data_dir: &Path,
        policy: &Policy,
        ring: Option<KeyRing>,
        store: &TaskStore,
        fence_for: Duration,
        limits: Limits,
    ) -> Self {
        let sync = policy.sync.clone();
        let enabled = sync.enabled && ring.as_ref().is_some_and(|r| r.current().is_some());
        if sync.enabled && !enabled {
            tracing::warn!(%region, "data_synchronization is enabled but no key ring is configured; snapshots are neither sent nor accepted");
        }
        let takeover =
            takeover::TakeoverState::open(region, data_dir, policy, store, fence_for, enabled);
        let receiver = Receiver::open(region, data_dir, ring.clone(), limits);
        Self {
            enabled,
            stats: receiver.shared_stats(),
            receiver,
            sync,
            ring,
            nonces: NonceSource::new(),
            sequence: AtomicU64::new(0),
            takeover,
            duplicates: duplicates::Duplicates::open(data_dir),
            recent: Mutex::new(VecDeque::new()),
            last_summary: Mutex::new(BTreeMap::new()),
            fresh: Mutex::new(changes::Fresh::default()),
            outbox: Mutex::new(changes::Outbox::default()),
            links: Mutex::new(BTreeMap::new()),
            wanted_at: Mutex::new(BTreeMap::new()),
            lead_epoch: AtomicU64::new(0),
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, changes::Outbox> {
        self.outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, changes::Fresh> {
        self.fresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The outbox with every change heard since the last call recorded in it.
    fn outbox_now(&self) -> std::sync::MutexGuard<'_, changes::Outbox> {
        let (tasks, lost) = self.fresh().take();
        let mut outbox = self.outbox();
        if lost {
            tracing::warn!(
                "more changes than a heartbeat's outbox holds; peers get full snapshots"
            );
            outbox.lost();
        }
        for task in tasks {
            outbox.record(task);
        }
        outbox
    }

    /// The link lock of `peer`.
    fn link(&self, peer: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(peer.to_string())
            .or_default()
            .clone()
    }

    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Seals a change batch for one recipient.
    pub fn seal_changes(
        &self,
        body: &changes::ChangeBody,
        rule_indexes: Vec<u32>,
    ) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
        let (key, params) = self.seal_params(
            &body.source_region,
            body.epoch,
            body.sequence,
            rule_indexes,
            &body.policy_hash,
        )?;
        let plain = prost::Message::encode_to_vec(body);
        envelope::seal_in(
            envelope::Domain::Changes,
            &plain,
            &params,
            key,
            &self.nonces,
        )
    }

    /// True when snapshots are sent and accepted.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live counters.
    pub fn counters(&self) -> &Stats {
        &self.stats
    }

    /// The live counters, shared (for the metrics collector).
    pub fn shared_stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The key ring, when configured.
    pub fn ring(&self) -> Option<&KeyRing> {
        self.ring.as_ref()
    }

    /// The recent results kept for snapshots, with the tasks finished
    /// since the last call folded in (the newest result of a task wins,
    /// at most [`MAX_RECENT_RESULTS`]).
    fn recent(&self) -> Vec<api::Task> {
        let finished = self.fresh().take_finished();
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for task in finished {
            recent.retain(|t| t.task_id != task.task_id);
            recent.push_back(task);
        }
        while recent.len() > MAX_RECENT_RESULTS {
            recent.pop_front();
        }
        recent.iter().cloned().collect()
    }

    /// Seals a snapshot of `tasks`/`results` for one recipient.
    pub fn seal_body(
        &self,
        body: &SnapshotBody,
        rule_indexes: Vec<u32>,
        format: BodyFormat,
    ) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
        let (key, params) = self.seal_params(
            &body.source_region,
            body.epoch,
            body.sequence,
            rule_indexes,
            &body.policy_hash,
        )?;
        seal_snapshot(
            body,
            format,
            &params,
            key,
            &self.nonces,
            envelope::Pipeline::On,
        )
    }

    /// The current key and the sealing parameters of a snapshot or change
    /// batch of `source` at (`epoch`, `sequence`) for one recipient.
    fn seal_params(
        &self,
        source: &str,
        epoch: u64,
        sequence: u64,
        rule_indexes: Vec<u32>,
        policy_hash: &str,
    ) -> Result<(&Key, envelope::SealParams), EnvelopeError> {
        let key = self
            .ring
            .as_ref()
            .and_then(KeyRing::current)
            .ok_or_else(|| EnvelopeError::UnknownKey("no current key".into()))?;
        Ok((
            key,
            envelope::SealParams {
                source: source.to_string(),
                epoch,
                sequence,
                rule_indexes,
                policy_hash: policy_hash.to_string(),
                compression: self.sync.compression.then_some(self.sync.compression_level),
                chunk_size: CHUNK_SIZE,
            },
        ))
    }
}

/// Serializes `body` and seals it (the write path of every snapshot, with
/// [`envelope::Pipeline::On`]): the body is streamed into the envelope task
/// by task, so compression starts before serialization ends and no
/// whole-plaintext buffer is made. Blocks; call it off the async runtime.
pub fn seal_snapshot(
    body: &SnapshotBody,
    format: BodyFormat,
    params: &envelope::SealParams,
    key: &Key,
    nonces: &NonceSource,
    pipeline: envelope::Pipeline,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    envelope::seal_streamed(params, key, nonces, pipeline, |sink| {
        columnar::encode_as(body, format, sink)
    })
}

/// What replication's loops, takeover and the duplicate resolution use of
/// the controller: the replication state and the components around it.
#[derive(Debug)]
pub struct Replicator {
    /// The replication state (keys, copies, outbox, takeover, duplicates).
    pub replication: Arc<Replication>,
    /// This controller's region.
    pub region: String,
    /// This run's epoch.
    pub epoch: u64,
    /// The region's place in the federation (policy, peer table, view).
    pub cluster: Arc<Cluster>,
    /// Calling peers.
    pub peers: Arc<Peers>,
    /// The task store.
    pub store: TaskStore,
    /// The decision log.
    pub log: crate::audit::DecisionLog,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Timers.
    pub timers: crate::config::Timers,
    /// Pushes to peers and checks after a batch, in flight; ended by
    /// [`run`] at stop.
    pub detached: crate::detached::Detached,
}

impl Replicator {
    /// The epoch this replica's snapshots and change batches carry: this
    /// run's, or (once it became its region's leader) the wall clock then.
    pub fn push_epoch(&self) -> u64 {
        self.epoch
            .max(self.replication.lead_epoch.load(Ordering::SeqCst))
    }

    /// True while this controller does its region's singleton work: always
    /// with the embedded store, only as the region's leader with the
    /// database (`Cluster::leader_token`).
    pub fn leads(&self) -> bool {
        self.cluster.leader_token().is_some()
    }

    /// This replica just became its region's leader: its pushes take a new
    /// epoch (the wall clock now, above every earlier leader's, whose epoch
    /// is when it started or took the lead), every peer gets a full
    /// snapshot, and the first round starts at once.
    pub async fn on_lead_gained(self: &Arc<Self>) {
        let now = u64::try_from(now_unix_ms()).unwrap_or(0);
        self.replication
            .lead_epoch
            .fetch_max(now.max(self.epoch), Ordering::SeqCst);
        if !self.replication.enabled {
            return;
        }
        let _ = self.replication.fresh().take();
        self.replication.outbox().lost();
        sync_once(self).await;
    }

    /// Whether this region answers a relayed call about `task_id`: it holds
    /// the task, or owns it and no backup's notice says it was taken over
    /// (then NOT_FOUND names who holds it now).
    pub fn check_answerable(&self, task_id: &str) -> Result<(), crate::error::Error> {
        crate::wire::check_task_id(task_id)?;
        let held = matches!(self.store.get(task_id), Ok(Some(_)));
        if held {
            return Ok(());
        }
        if crate::wire::owner_of(task_id) != Some(self.cluster.region()) {
            return Err(crate::error::Error::task_not_found(task_id));
        }
        // Ours, not here: a backup's notice may say who holds it now.
        if let Some(by) = self.replication.takeover.taken_over_by(task_id) {
            return Err(crate::error::Error::TakenOver {
                id: task_id.to_string(),
                by,
            });
        }
        Ok(())
    }
}

fn health_now(rep: &Replicator) -> BTreeMap<String, Health> {
    rep.cluster.health_now()
}

/// One round: snapshot and push to every permitted peer that is not dead.
/// Also pushes an empty snapshot to a peer whose scope is empty, so it
/// drops stale tasks.
pub async fn sync_once(rep: &Arc<Replicator>) {
    if !rep.replication.enabled {
        return;
    }
    let policy = rep.cluster.policy();
    let health = health_now(rep);
    for recipient in snapshot::recipients(&policy, &rep.region) {
        if health.get(&recipient) == Some(&Health::Dead) {
            continue;
        }
        // Not waited for: a slow peer must not hold up the heartbeat's
        // batches to the others (its own link lock orders its pushes).
        let held = rep.clone();
        rep.detached
            .spawn(async move { snapshot_to(&held, &recipient).await });
    }
}

/// Reads, seals and pushes one snapshot to `recipient`, under its link
/// lock (see the module notes).
async fn snapshot_to(rep: &Arc<Replicator>, recipient: &str) {
    let repl = &rep.replication;
    let link = repl.link(recipient);
    let _link = link.lock().await;
    let policy = rep.cluster.policy();
    let tasks: Vec<api::Task> = match rep.store.pending() {
        Ok(t) => t
            .into_iter()
            .filter(|t| crate::wire::owner_of(&t.task_id) == Some(rep.region.as_str()))
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "reading pending tasks for a snapshot failed");
            return;
        }
    };
    let results = repl.recent();
    let tags = rep
        .cluster
        .view(&policy)
        .region(recipient)
        .map(|v| v.tags)
        .unwrap_or_default();
    let (scoped, withheld) = snapshot::scope_for(&policy, &rep.region, recipient, &tags, &tasks);
    let (scoped_results, _) = snapshot::scope_for(&policy, &rep.region, recipient, &tags, &results);
    let rules = snapshot::rule_indexes(&scoped);
    let sequence = repl.next_sequence();
    let body = SnapshotBody {
        source_region: rep.region.clone(),
        epoch: rep.push_epoch(),
        sequence,
        policy_hash: policy.hash.clone(),
        taken_unix_ms: now_unix_ms(),
        tasks: scoped,
        results: scoped_results,
    };
    let count = body.tasks.len();
    // Format 2 only to a region every replica of which reads it: an older
    // controller refuses it (see `snapshot::BodyFormat`).
    let format = BodyFormat::for_peer(&rep.cluster.membership().snapshot_formats(recipient));
    // Serializing, compressing and encrypting take milliseconds for
    // thousands of tasks: off the async workers.
    let sealing = {
        let rep = rep.clone();
        let rules = rules.clone();
        tokio::task::spawn_blocking(move || rep.replication.seal_body(&body, rules, format))
    };
    let chunks = match sealing.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::error!(%recipient, error = %e, "sealing a snapshot failed");
            return;
        }
        Err(e) => {
            tracing::error!(%recipient, error = %e, "the sealing task failed");
            return;
        }
    };
    repl.stats
        .withheld_tasks
        .fetch_add(withheld as u64, Ordering::Relaxed);
    audit_summary(rep, recipient, &rules, count, withheld).await;
    if !push(rep, recipient, chunks, sequence, count).await {
        repl.outbox().want_snapshot(recipient);
    }
}

/// Whether a peer in `health` is sent change batches: not while it is dead
/// or was never heard from. Its changes wait in the outbox (a full
/// snapshot replaces a backlog past `MAX_UNSENT`); sealing them anew every
/// heartbeat for a peer that does not answer cost a primary whose backup
/// was down at its start an encrypted, compressed batch of up to 50,000
/// tasks per heartbeat (seen in the PostgreSQL bench, about a tenth of the
/// controller's CPU).
fn takes_changes(health: Option<&Health>) -> bool {
    !matches!(health, Some(Health::Dead | Health::Unknown))
}

/// Every heartbeat: one batch of changes to each permitted peer heard from
/// and not dead, with changes waiting (none while its previous batch is in
/// flight), and a snapshot to each peer that wants one (at most one per
/// peer every ten heartbeats).
pub async fn flush_changes(rep: &Arc<Replicator>) {
    let repl = &rep.replication;
    if !repl.enabled {
        return;
    }
    let policy = rep.cluster.policy();
    let recipients = snapshot::recipients(&policy, &rep.region);
    let health = health_now(rep);
    let ready: std::collections::BTreeSet<String> = recipients
        .iter()
        .filter(|r| takes_changes(health.get(*r)))
        .cloned()
        .collect();
    let (batches, wanted) = {
        let mut outbox = repl.outbox_now();
        let batches = outbox.take_batches(&recipients, &ready);
        (batches, outbox.take_snapshot_wanted())
    };
    for (recipient, tasks) in batches {
        let held = rep.clone();
        rep.detached
            .spawn(async move { push_changes(&held, &recipient, tasks).await });
    }
    let spacing = rep.timers.heartbeat_interval * 10;
    for recipient in wanted {
        let due = {
            let mut at = repl
                .wanted_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = at.get(&recipient).is_none_or(|t| t.elapsed() >= spacing);
            if due {
                at.insert(recipient.clone(), Instant::now());
            }
            due
        };
        if !due || !ready.contains(&recipient) {
            repl.outbox().want_snapshot(&recipient);
            continue;
        }
        tracing::debug!(%recipient, "snapshot wanted between rounds");
        let held = rep.clone();
        rep.detached
            .spawn(async move { snapshot_to(&held, &recipient).await });
    }
}

/// Scopes, seals and pushes one batch to `recipient` under its link lock.
async fn push_changes(rep: &Arc<Replicator>, recipient: &str, tasks: Vec<api::Task>) {
    let repl = &rep.replication;
    let link = repl.link(recipient);
    let _link = link.lock().await;
    let policy = rep.cluster.policy();
    let tags = rep
        .cluster
        .view(&policy)
        .region(recipient)
        .map(|v| v.tags)
        .unwrap_or_default();
    let (scoped, withheld) = snapshot::scope_owned(&policy, &rep.region, recipient, &tags, tasks);
    repl.stats
        .withheld_tasks
        .fetch_add(withheld as u64, Ordering::Relaxed);
    if scoped.is_empty() {
        repl.outbox().finished(recipient, None, false);
        return;
    }
    let rules = snapshot::rule_indexes(&scoped);
    let sequence = repl.next_sequence();
    let count = scoped.len();
    let body = changes::ChangeBody {
        source_region: rep.region.clone(),
        epoch: rep.push_epoch(),
        sequence,
        policy_hash: policy.hash.clone(),
        sent_unix_ms: now_unix_ms(),
        tasks: scoped,
    };
    // A heartbeat's changes are usually a few tasks: sealed here; a large
    // backlog off the async workers.
    let sealed = if count <= 64 {
        repl.seal_changes(&body, rules).map(|c| (c, body))
    } else {
        let rep = rep.clone();
        match tokio::task::spawn_blocking(move || {
            rep.replication
                .seal_changes(&body, rules)
                .map(|c| (c, body))
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(EnvelopeError::Invalid(format!("sealing task: {e}"))),
        }
    };
    let (chunks, body) = match sealed {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(%recipient, error = %e, "sealing a change batch failed");
            Stats::bump(&repl.stats.changes_send_failed);
            repl.outbox().finished(recipient, None, true);
            return;
        }
    };
    let deadline = rep.timers.forward_timeout.max(Duration::from_secs(2));
    let outcome = to_every_replica(rep, recipient, |mut client| {
        let request = transport::with_deadline(tokio_stream::iter(chunks.clone()), deadline);
        async move {
            tokio::time::timeout(deadline, client.push_changes(request))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|s| format!("{:?}: {}", s.code(), s.message())))
                .map(tonic::Response::into_inner)
        }
    })
    .await
    .map(|answers| {
        // Accepted when a replica accepted it; a snapshot follows when one
        // asks (or refused it).
        let accepted = answers.iter().any(|a| a.accepted);
        let wanted = answers.iter().any(|a| a.snapshot_wanted || !a.accepted);
        let reason = answers
            .iter()
            .find(|a| !a.accepted)
            .map(|a| a.reason.clone())
            .unwrap_or_default();
        tonic::Response::new(api::PushChangesResponse {
            accepted,
            snapshot_wanted: wanted,
            reason,
        })
    });
    match outcome {
        Ok(resp) if resp.get_ref().accepted => {
            Stats::bump(&repl.stats.changes_sent);
            tracing::trace!(%recipient, sequence, tasks = count, "change batch pushed");
            repl.outbox()
                .finished(recipient, None, resp.get_ref().snapshot_wanted);
        }
        Ok(resp) => {
            // Refused (scope, replay, key): resending the same would be
            // refused again; a snapshot brings the peer up to date.
            Stats::bump(&repl.stats.changes_send_failed);
            tracing::warn!(%recipient, sequence, reason = %resp.get_ref().reason, "peer rejected our change batch; a snapshot follows");
            repl.outbox().finished(recipient, None, true);
        }
        Err(why) => {
            Stats::bump(&repl.stats.changes_send_failed);
            tracing::debug!(%recipient, %why, "change batch push failed; kept for the next");
            repl.outbox().finished(recipient, Some(body.tasks), false);
        }
    }
}

/// Appends a decision-log record when what a peer receives changes (its
/// rules, or whether residency withholds tasks from it).
async fn audit_summary(
    rep: &Replicator,
    recipient: &str,
    rules: &[u32],
    count: usize,
    withheld: usize,
) {
    let summary = format!("rules {rules:?}, withheld {}", withheld > 0);
    let changed = {
        let mut last = rep
            .replication
            .last_summary
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.insert(recipient.to_string(), summary.clone()) != Some(summary)
    };
    if changed {
        let entry = Entry::new(kind::SNAPSHOT)
            .note(format!(
                "snapshot scope for {recipient}: {count} tasks of rules {rules:?}; {withheld} tasks withheld by residency"
            ));
        if let Err(e) = rep.log.append(entry).await {
            tracing::error!(error = %e, "appending a snapshot record failed");
        }
    }
}

/// Pushes a sealed snapshot; true when the peer accepted it.
async fn push(
    rep: &Replicator,
    recipient: &str,
    chunks: Vec<api::SnapshotChunk>,
    sequence: u64,
    count: usize,
) -> bool {
    let repl = &rep.replication;
    let (bytes, ratio) = size_and_ratio(&chunks);
    let deadline = rep.timers.forward_timeout.max(Duration::from_secs(5));
    if rep.peers.endpoints_of(recipient).is_empty() {
        Stats::bump(&repl.stats.send_failed);
        return false;
    }
    // Every replica of the recipient keeps its own copy (the one that leads
    // when a takeover is due uses its own): the snapshot goes to each, at
    // once; the first answer that accepted it (else the first answer) counts.
    let answers = to_every_replica(rep, recipient, |mut client| {
        let request = transport::with_deadline(tokio_stream::iter(chunks.clone()), deadline);
        async move {
            match tokio::time::timeout(deadline, client.push_snapshot(request)).await {
                Ok(Ok(r)) => Ok(Ok(r.into_inner())),
                Ok(Err(status)) => Ok(Err(status)),
                Err(_) => Err("timed out".to_string()),
            }
        }
    })
    .await;
    let outcome = match answers {
        Ok(mut all) => {
            let first = all
                .iter()
                .position(|a| a.as_ref().is_ok_and(|r| r.accepted))
                .or_else(|| all.iter().position(Result::is_ok))
                .unwrap_or(0);
            Ok(all.swap_remove(first).map(tonic::Response::new))
        }
        Err(_) => Err(()),
    };
    if let Ok(Ok(_)) = &outcome {
        // A replica received all of it (whatever it answered).
        rep.metrics.snapshot_sent(recipient, bytes, ratio);
        repl.takeover.snapshot_answered(recipient);
    }
    match outcome {
        Ok(Ok(resp)) if resp.get_ref().accepted => {
            Stats::bump(&repl.stats.sent);
            tracing::info!(%recipient, sequence, tasks = count, "snapshot pushed");
            true
        }
        Ok(Ok(resp)) => {
            Stats::bump(&repl.stats.send_failed);
            tracing::warn!(%recipient, sequence, reason = %resp.get_ref().reason, "peer rejected our snapshot");
            false
        }
        Ok(Err(status)) => {
            Stats::bump(&repl.stats.send_failed);
            tracing::debug!(%recipient, code = ?status.code(), message = %status.message(), "snapshot push failed");
            false
        }
        Err(_) => {
            Stats::bump(&repl.stats.send_failed);
            tracing::debug!(%recipient, "snapshot push timed out");
            false
        }
    }
}

/// Makes `call` at every replica of `recipient` at once (one endpoint for a
/// region of one controller); the answers of those that answered, or the
/// first failure when none did.
async fn to_every_replica<T, F, Fut>(
    rep: &Replicator,
    recipient: &str,
    call: F,
) -> Result<Vec<T>, String>
where
    F: Fn(crate::peers::PeerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let clients = rep.peers.clients(recipient).map_err(|e| e.to_string())?;
    let outcomes =
        futures::future::join_all(clients.into_iter().map(|(_, client)| call(client))).await;
    let mut answers = Vec::new();
    let mut first_error = None;
    for o in outcomes {
        match o {
            Ok(a) => answers.push(a),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if answers.is_empty() {
        return Err(first_error.unwrap_or_else(|| "no endpoint known".into()));
    }
    Ok(answers)
}

/// Bytes on the wire of `chunks`, and plaintext bytes over sealed
/// (compressed) bytes.
fn size_and_ratio(chunks: &[api::SnapshotChunk]) -> (u64, f64) {
    let wire: usize = chunks.iter().map(prost::Message::encoded_len).sum();
    let plaintext = envelope::header_of(chunks).map_or(0, |h| h.plaintext_bytes);
    let sealed: usize = chunks
        .iter()
        .map(|c| c.ciphertext.len().saturating_sub(envelope::TAG_LEN))
        .sum();
    let ratio = if sealed == 0 {
        1.0
    } else {
        plaintext as f64 / sealed as f64
    };
    (wire as u64, ratio)
}

/// The sync loop: every `sync_interval` a snapshot round; every heartbeat a
/// takeover check and a batch of changes to each peer (the store's changes
/// reach the outbox through [`ChangeRecorder`], bound to the store).
pub async fn run(rep: Arc<Replicator>, mut stop: tokio::sync::watch::Receiver<bool>) {
    rounds(&rep, &mut stop).await;
    // What the rounds left in flight (a push waits at most its deadline,
    // sealing a snapshot a moment): finished or aborted, so nothing holds
    // the store once the run is over.
    let aborted = rep.detached.end(DETACHED_PATIENCE).await;
    if aborted > 0 {
        tracing::warn!(
            aborted,
            "replication pushes still in flight at stop were aborted"
        );
    }
}

/// How long [`run`] waits at stop for the pushes in flight.
const DETACHED_PATIENCE: Duration = Duration::from_secs(2);

/// [`run`]'s rounds, until `stop`.
async fn rounds(rep: &Arc<Replicator>, stop: &mut tokio::sync::watch::Receiver<bool>) {
    if !rep.replication.enabled {
        let _ = stop.wait_for(|s| *s).await;
        return;
    }
    let interval = rep
        .replication
        .sync
        .sync_interval
        .max(Duration::from_millis(50));
    let check = rep.timers.heartbeat_interval.max(Duration::from_millis(50));
    let mut sync_tick = tokio::time::interval(interval);
    sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check_tick = tokio::time::interval(check);
    check_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Snapshots, change batches and takeovers are the region's
            // singleton work: only its leader does them.
            _ = sync_tick.tick() => if rep.leads() { sync_once(rep).await },
            _ = check_tick.tick() => {
                let n = rep.clone();
                // A stat per stored file; a changed file is decrypted again.
                let _ = tokio::task::spawn_blocking(move || n.replication.receiver.check_stored()).await;
                if rep.leads() {
                    takeover::take_over_dead_regions(rep).await;
                    flush_changes(rep).await;
                }
            }
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// The store's change sink for replication: each change of a task this
/// region owns is kept for the next change batch, and a finished one for
/// snapshots' results. Bound to the store when replication is on
/// ([`crate::tasks::TaskStore::bind_changes`]); runs on the store's
/// committing thread, so it only locks and pushes.
pub struct ChangeRecorder {
    /// The replication state the changes go to.
    pub replication: Arc<Replication>,
    /// This region: only its own tasks are replicated.
    pub region: String,
    /// Whether this replica leads its region (only the leader sends change
    /// batches). Weak: the cluster holds the store, which holds this sink,
    /// and a strong handle would keep the store open after its run.
    pub cluster: std::sync::Weak<Cluster>,
}

impl crate::tasks::ChangeSink for ChangeRecorder {
    fn changed(&self, task: &api::Task) {
        if crate::wire::owner_of(&task.task_id) != Some(self.region.as_str()) {
            return;
        }
        let finished = crate::tasks::is_terminal(task.state()) && task.taken_over.is_none();
        let mut fresh = self.replication.fresh();
        if finished {
            fresh.finish(task.clone(), MAX_RECENT_RESULTS);
        }
        fresh.record(task.clone());
    }

    /// Only the leader hands changes on; a replica that does not lead keeps
    /// them only up to [`changes::MAX_UNSENT`] and drops them when it takes
    /// the lead (full snapshots then), so the tasks other replicas create
    /// are not read for it. Their later changes are (a finished task joins
    /// the recent results).
    fn wants_new_tasks(&self) -> bool {
        self.cluster
            .upgrade()
            .is_some_and(|c| c.leader_token().is_some())
    }
}

#[cfg(test)]
mod tests;
