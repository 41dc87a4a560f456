//! The receiving side: verify a pushed snapshot or change batch completely,
//! then store it and fold it into our copy of the source.
//!
//! Order of checks: header present → the claimed source may send to us at
//! all (our policy) → AES-256-GCM of every chunk in order (key id, tag,
//! associated data, domain: snapshot or changes) → zstd within the announced
//! size → newer (epoch, sequence) than the last snapshot *or batch* accepted
//! from that source → the body agrees with the header → every task may be
//! held here (rule lists us as backup, the source is a region of the rule,
//! we hold every required tag). Only then is a snapshot written, encrypted as
//! received, to `<data_dir>/snapshots/<source>.snap` (temp file, fsync,
//! rename, fsync of the directory; the change log is then removed), or a
//! batch appended, encrypted as received, to
//! `<data_dir>/snapshots/<source>.changes` (fsync), and folded into the
//! in-memory copy ([`HeldCopy`]) that takeover and idempotency lookups read.
//! A snapshot's tasks are decoded in place ([`restore`]): the copy keeps
//! the plaintext and where each task is in it.
//! At start the copy is rebuilt from both files (a torn last append is cut
//! off). Any failure leaves the copy as it was, logs one line naming the
//! source and the reason, and counts it.
//!
//! Owns the `snapshots/` directory. Does not touch the task store.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use federation_api as api;
use prost::Message as _;

use super::changes::ChangeBody;
use super::copy::HeldCopy;
use super::envelope::{self, Domain, EnvelopeError, Limits};
use super::keyring::KeyRing;
pub use super::rejection::Rejection;
use super::restore::{self, Restored};
use super::snapshot::{self, SnapshotBody};
use crate::policy::Policy;
use crate::wire;

/// Replication counters (sender, receiver and takeover).
#[derive(Debug, Default)]
pub struct Stats {
    /// Snapshots pushed and accepted by the peer.
    pub sent: AtomicU64,
    /// Pushes that failed or were refused by the peer.
    pub send_failed: AtomicU64,
    /// Tasks withheld from a peer by residency.
    pub withheld_tasks: AtomicU64,
    /// Snapshots verified and stored.
    pub accepted: AtomicU64,
    /// Rejected: authentication failed (wrong key, flipped byte, altered header).
    pub rejected_auth: AtomicU64,
    /// Rejected: key id not in our ring.
    pub rejected_unknown_key: AtomicU64,
    /// Rejected: fewer chunks than announced.
    pub rejected_truncated: AtomicU64,
    /// Rejected: chunks out of order.
    pub rejected_out_of_order: AtomicU64,
    /// Rejected: replayed or older (epoch, sequence).
    pub rejected_replay: AtomicU64,
    /// Rejected: the source may not send to us.
    pub rejected_not_permitted: AtomicU64,
    /// Rejected: a task we may not hold.
    pub rejected_residency: AtomicU64,
    /// Rejected: a limit (chunk size, count, total bytes).
    pub rejected_limit: AtomicU64,
    /// Rejected: malformed (no header, bad nonce, decompression, decode).
    pub rejected_malformed: AtomicU64,
    /// A stored snapshot that does not decrypt or decode.
    pub stored_unreadable: AtomicU64,
    /// A stored snapshot file that holds another region's snapshot.
    pub stored_wrong_source: AtomicU64,
    /// A stored snapshot gone although one was accepted before.
    pub stored_missing: AtomicU64,
    /// Takeovers performed.
    pub takeovers: AtomicU64,
    /// Tasks queued by takeovers.
    pub tasks_taken_over: AtomicU64,
    /// Our tasks cancelled because a backup took them over.
    pub fenced_tasks: AtomicU64,
    /// Change batches pushed and accepted by the peer.
    pub changes_sent: AtomicU64,
    /// Change batch pushes that failed or that the peer refused.
    pub changes_send_failed: AtomicU64,
    /// Change batches verified, stored and folded into our copy.
    pub changes_accepted: AtomicU64,
    /// Duplicate pairs (one idempotency key, two tasks) that both ran.
    pub duplicate_tasks: AtomicU64,
    /// Duplicate pairs resolved by cancelling one of the two.
    pub duplicates_cancelled: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// See [`Stats`].
    pub sent: u64,
    /// See [`Stats`].
    pub send_failed: u64,
    /// See [`Stats`].
    pub withheld_tasks: u64,
    /// See [`Stats`].
    pub accepted: u64,
    /// See [`Stats`].
    pub rejected_auth: u64,
    /// See [`Stats`].
    pub rejected_unknown_key: u64,
    /// See [`Stats`].
    pub rejected_truncated: u64,
    /// See [`Stats`].
    pub rejected_out_of_order: u64,
    /// See [`Stats`].
    pub rejected_replay: u64,
    /// See [`Stats`].
    pub rejected_not_permitted: u64,
    /// See [`Stats`].
    pub rejected_residency: u64,
    /// See [`Stats`].
    pub rejected_limit: u64,
    /// See [`Stats`].
    pub rejected_malformed: u64,
    /// See [`Stats`].
    pub stored_unreadable: u64,
    /// See [`Stats`].
    pub stored_wrong_source: u64,
    /// See [`Stats`].
    pub stored_missing: u64,
    /// See [`Stats`].
    pub takeovers: u64,
    /// See [`Stats`].
    pub tasks_taken_over: u64,
    /// See [`Stats`].
    pub fenced_tasks: u64,
    /// See [`Stats`].
    pub changes_sent: u64,
    /// See [`Stats`].
    pub changes_send_failed: u64,
    /// See [`Stats`].
    pub changes_accepted: u64,
    /// See [`Stats`].
    pub duplicate_tasks: u64,
    /// See [`Stats`].
    pub duplicates_cancelled: u64,
}

/// The `reason` label of each rejection counter, in [`Stats`] order.
pub const REJECTION_REASONS: [&str; 12] = [
    "auth",
    "unknown_key",
    "truncated",
    "out_of_order",
    "replay",
    "not_permitted",
    "residency",
    "limit",
    "malformed",
    "stored_unreadable",
    "stored_wrong_source",
    "stored_missing",
];

impl Stats {
    /// Each rejection counter with its reason label ([`REJECTION_REASONS`]).
    pub fn rejections(&self) -> [(&'static str, u64); 12] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counts = [
            g(&self.rejected_auth),
            g(&self.rejected_unknown_key),
            g(&self.rejected_truncated),
            g(&self.rejected_out_of_order),
            g(&self.rejected_replay),
            g(&self.rejected_not_permitted),
            g(&self.rejected_residency),
            g(&self.rejected_limit),
            g(&self.rejected_malformed),
            g(&self.stored_unreadable),
            g(&self.stored_wrong_source),
            g(&self.stored_missing),
        ];
        std::array::from_fn(|i| (REJECTION_REASONS[i], counts[i]))
    }

    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            sent: g(&self.sent),
            send_failed: g(&self.send_failed),
            withheld_tasks: g(&self.withheld_tasks),
            accepted: g(&self.accepted),
            rejected_auth: g(&self.rejected_auth),
            rejected_unknown_key: g(&self.rejected_unknown_key),
            rejected_truncated: g(&self.rejected_truncated),
            rejected_out_of_order: g(&self.rejected_out_of_order),
            rejected_replay: g(&self.rejected_replay),
            rejected_not_permitted: g(&self.rejected_not_permitted),
            rejected_residency: g(&self.rejected_residency),
            rejected_limit: g(&self.rejected_limit),
            rejected_malformed: g(&self.rejected_malformed),
            stored_unreadable: g(&self.stored_unreadable),
            stored_wrong_source: g(&self.stored_wrong_source),
            stored_missing: g(&self.stored_missing),
            takeovers: g(&self.takeovers),
            tasks_taken_over: g(&self.tasks_taken_over),
            fenced_tasks: g(&self.fenced_tasks),
            changes_sent: g(&self.changes_sent),
            changes_send_failed: g(&self.changes_send_failed),
            changes_accepted: g(&self.changes_accepted),
            duplicate_tasks: g(&self.duplicate_tasks),
            duplicates_cancelled: g(&self.duplicates_cancelled),
        }
    }
}

/// What was accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The header.
    pub header: api::SnapshotHeader,
    /// Tasks in it.
    pub tasks: usize,
    /// True when we want a full snapshot of the source soon (we hold none,
    /// or the changes since the last one have grown large).
    pub snapshot_wanted: bool,
}

/// Change-log size past which the receiver asks for a snapshot.
pub const MAX_CHANGE_LOG_BYTES: u64 = 32 << 20;
/// Batches since the last snapshot past which the receiver asks for one.
pub const MAX_CHANGE_BATCHES: u64 = 4096;

/// One source's copy and the size of its change log.
#[derive(Debug, Default)]
struct Held {
    copy: HeldCopy,
    log_bytes: u64,
}

impl Held {
    fn snapshot_wanted(&self) -> bool {
        !self.copy.has_snapshot
            || self.log_bytes > MAX_CHANGE_LOG_BYTES
            || self.copy.batches_since_snapshot > MAX_CHANGE_BATCHES
    }
}

/// What was accepted last from a source, kept in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Latest {
    epoch: u64,
    sequence: u64,
    /// When the source took it (its clock), ms since the Unix epoch.
    taken_unix_ms: i64,
}

/// What is wrong with the stored snapshot of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    /// `unreadable`, `wrong_source` or `missing`.
    reason: &'static str,
    detail: String,
}

/// The manifest of accepted snapshots, `<data_dir>/snapshots/accepted.json`:
/// what was accepted from each source, kept apart from the snapshot files so
/// that a deleted or replaced file is evident and replay protection survives
/// it.
const MANIFEST: &str = "accepted.json";

/// Receives, verifies and stores snapshots and change batches for one
/// region, and keeps the copy of each source they fold into.
#[derive(Debug)]
pub struct Receiver {
    region: String,
    dir: PathBuf,
    ring: Option<KeyRing>,
    limits: Limits,
    held: Mutex<BTreeMap<String, Held>>,
    /// The manifest: the last snapshot accepted per source.
    accepted: Mutex<BTreeMap<String, Latest>>,
    /// Per source: what is wrong with its stored file (reported once).
    problems: Mutex<BTreeMap<String, Problem>>,
    /// Per source: (length, modification time) of the file as we wrote or
    /// last read it, to notice a file changed behind our back cheaply.
    files: Mutex<BTreeMap<String, (u64, Option<std::time::SystemTime>)>>,
    stats: std::sync::Arc<Stats>,
}

fn file_stamp(path: &Path) -> Option<(u64, Option<std::time::SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The stored snapshot file of `source` in `data_dir`.
pub fn snapshot_path(data_dir: &Path, source: &str) -> PathBuf {
    data_dir.join("snapshots").join(format!("{source}.snap"))
}

/// The change log of `source` in `data_dir`: the batches accepted since its
/// snapshot, as received (length-delimited chunks, one batch after another).
pub fn changes_path(data_dir: &Path, source: &str) -> PathBuf {
    data_dir.join("snapshots").join(format!("{source}.changes"))
}

/// Reads length-delimited chunks from `bytes`; stops at the first that does
/// not decode and returns how many bytes were good.
fn decode_chunks(bytes: &[u8], max: usize) -> (Vec<api::SnapshotChunk>, usize, Option<String>) {
    let mut buf = bytes;
    let mut chunks = Vec::new();
    while !buf.is_empty() {
        if chunks.len() >= max {
            return (
                chunks,
                bytes.len() - buf.len(),
                Some("too many chunks".into()),
            );
        }
        let before = buf;
        match api::SnapshotChunk::decode_length_delimited(&mut buf) {
            Ok(c) => chunks.push(c),
            Err(e) => {
                let why = format!("chunk {}: {e}", chunks.len());
                return (chunks, bytes.len() - before.len(), Some(why));
            }
        }
    }
    (chunks, bytes.len(), None)
}

/// Reads a stored snapshot file (length-delimited chunks, as received).
pub fn read_file(path: &Path) -> Result<Vec<api::SnapshotChunk>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match decode_chunks(&bytes, 1_000_000) {
        (chunks, _, None) => Ok(chunks),
        (_, _, Some(e)) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes chunks atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_file(path: &Path, chunks: &[api::SnapshotChunk]) -> std::io::Result<()> {
    crate::atomic_file::write(path, &encode_chunks(chunks)?)
}

fn encode_chunks(chunks: &[api::SnapshotChunk]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for c in chunks {
        c.encode_length_delimited(&mut out)
            .map_err(std::io::Error::other)?;
    }
    Ok(out)
}

/// Appends one batch to a change log and syncs it; a new file's directory
/// entry is synced too.
fn append_batch(path: &Path, chunks: &[api::SnapshotChunk]) -> std::io::Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let existed = path.exists();
    let bytes = encode_chunks(chunks)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    if !existed {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(bytes.len() as u64)
}

/// Decrypts and decodes a stored snapshot file.
pub fn open_file(
    path: &Path,
    ring: &KeyRing,
) -> Result<(api::SnapshotHeader, SnapshotBody), String> {
    let chunks = read_file(path)?;
    let (header, plain) = envelope::open(&chunks, ring, &Limits::default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let body = super::columnar::decode_any(&plain)
        .map_err(|e| format!("{}: body: {e}", path.display()))?;
    Ok((header, body))
}

/// Decrypts a stored snapshot file and decodes it for the copy.
fn restore_file(path: &Path, ring: &KeyRing) -> Result<(api::SnapshotHeader, Restored), String> {
    let chunks = read_file(path)?;
    let (header, plain) = envelope::open(&chunks, ring, &Limits::default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let body =
        restore::decode(plain, None, None).map_err(|e| format!("{}: body: {e}", path.display()))?;
    Ok((header, body))
}

/// Decrypts and decodes one change batch.
fn open_batch(
    chunks: &[api::SnapshotChunk],
    ring: &KeyRing,
    limits: &Limits,
) -> Result<(api::SnapshotHeader, ChangeBody), Rejection> {
    let (header, plain) = envelope::open_in(Domain::Changes, chunks, ring, limits)?;
    let body = ChangeBody::decode(plain.as_slice()).map_err(|e| Rejection::Body(e.to_string()))?;
    if body.source_region != header.source_region
        || body.epoch != header.epoch
        || body.sequence != header.sequence
    {
        return Err(Rejection::Body(
            "body's source, epoch or sequence differs from the header".into(),
        ));
    }
    Ok((header, body))
}

/// Reads a change log: its batches, decrypted, and the length of its good
/// prefix (a torn last append is cut off there).
fn read_changes(path: &Path, ring: &KeyRing) -> (Vec<ChangeBody>, u64, u64) {
    let Ok(bytes) = std::fs::read(path) else {
        return (Vec::new(), 0, 0);
    };
    let (chunks, good, error) = decode_chunks(&bytes, usize::MAX);
    let mut batches = Vec::new();
    let mut at = 0usize;
    let mut good_bytes = 0u64;
    let mut consumed = 0u64;
    while at < chunks.len() {
        let count = chunks[at]
            .header
            .as_ref()
            .map_or(0, |h| h.chunk_count as usize);
        if count == 0 || at + count > chunks.len() {
            break;
        }
        let batch = &chunks[at..at + count];
        consumed += batch
            .iter()
            .map(|c| {
                let n = c.encoded_len();
                (prost::length_delimiter_len(n) + n) as u64
            })
            .sum::<u64>();
        match open_batch(batch, ring, &Limits::default()) {
            Ok((_, body)) => batches.push(body),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stored change batch unreadable; skipped");
            }
        }
        good_bytes = consumed;
        at += count;
    }
    if let Some(e) = error {
        tracing::warn!(path = %path.display(), error = %e, good_bytes = good, "change log ends in a torn or damaged record; cut off there");
    }
    (batches, good_bytes, bytes.len() as u64)
}

impl Receiver {
    /// A receiver for `region` storing under `data_dir`; rebuilds the copy
    /// of each source from its stored snapshot and change log (a torn last
    /// append is cut off), and reports (log line, counter,
    /// [`Receiver::problem`]) every stored snapshot that is unreadable, holds
    /// another region's, or is missing although the manifest says one was
    /// accepted.
    pub fn open(region: &str, data_dir: &Path, ring: Option<KeyRing>, limits: Limits) -> Self {
        Self::open_with(region, data_dir, ring, limits, true)
    }

    /// [`Receiver::open`] that writes nothing (a torn change log is read up
    /// to its good prefix but left as it is): for inspecting the copies of a
    /// running controller.
    pub fn open_read_only(
        region: &str,
        data_dir: &Path,
        ring: Option<KeyRing>,
        limits: Limits,
    ) -> Self {
        Self::open_with(region, data_dir, ring, limits, false)
    }

    fn open_with(
        region: &str,
        data_dir: &Path,
        ring: Option<KeyRing>,
        limits: Limits,
        cut_torn: bool,
    ) -> Self {
        let dir = data_dir.join("snapshots");
        let manifest = read_manifest(&dir);
        let rx = Self {
            region: region.to_string(),
            dir: dir.clone(),
            ring: ring.clone(),
            limits,
            held: Mutex::new(BTreeMap::new()),
            accepted: Mutex::new(manifest.clone()),
            problems: Mutex::new(BTreeMap::new()),
            files: Mutex::new(BTreeMap::new()),
            stats: std::sync::Arc::new(Stats::default()),
        };
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        if let (Some(ring), Ok(entries)) = (&ring, std::fs::read_dir(&dir)) {
            let mut logs = Vec::new();
            for entry in entries.flatten() {
                let path = entry.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("snap") => {
                        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                            continue;
                        };
                        match restore_file(&path, ring) {
                            Ok((h, _)) if h.source_region != name => rx.report(
                                name,
                                "wrong_source",
                                format!(
                                    "{} holds a snapshot of `{}`, not of {name}; ignored",
                                    path.display(),
                                    wire::truncate(&h.source_region, 64)
                                ),
                            ),
                            Ok((_, body)) => {
                                lock(&rx.files).insert(
                                    name.to_string(),
                                    file_stamp(&path).unwrap_or_default(),
                                );
                                held.entry(name.to_string())
                                    .or_default()
                                    .copy
                                    .fold_snapshot(body);
                            }
                            Err(e) => rx.report(name, "unreadable", e),
                        }
                    }
                    Some("changes") => logs.push(path),
                    _ => {}
                }
            }
            for path in logs {
                let Some(source) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                let (batches, good, len) = read_changes(&path, ring);
                if cut_torn && good < len {
                    let cut = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(good).and_then(|()| f.sync_all()));
                    if let Err(e) = cut {
                        tracing::error!(path = %path.display(), error = %e, "cutting off a torn change log failed");
                    }
                }
                let h = held.entry(source.clone()).or_default();
                h.log_bytes = good;
                for b in batches {
                    if b.source_region != source {
                        tracing::warn!(path = %path.display(), claimed = %wire::truncate(&b.source_region, 64), "stored change batch of another source; skipped");
                        continue;
                    }
                    let c = &h.copy;
                    if (b.epoch, b.sequence) > (c.epoch, c.sequence) {
                        h.copy
                            .fold_batch(b.epoch, b.sequence, b.sent_unix_ms, b.tasks);
                    }
                }
            }
        }
        for (source, accepted) in &manifest {
            if !snapshot_path(data_dir, source).exists() {
                rx.report(
                    source,
                    "missing",
                    format!(
                        "{}: gone, although epoch {} sequence {} was accepted",
                        snapshot_path(data_dir, source).display(),
                        accepted.epoch,
                        accepted.sequence
                    ),
                );
            }
        }
        *lock(&rx.held) = held;
        rx
    }

    /// The receiver's counters, shared with the metrics collector.
    pub fn shared_stats(&self) -> std::sync::Arc<Stats> {
        self.stats.clone()
    }

    /// Records what is wrong with `source`'s stored file: logged and counted
    /// once per (source, reason) until a new snapshot of it is accepted.
    fn report(&self, source: &str, reason: &'static str, detail: String) {
        let mut problems = lock(&self.problems);
        if problems.get(source).is_some_and(|p| p.reason == reason) {
            return;
        }
        let counter = match reason {
            "wrong_source" => &self.stats.stored_wrong_source,
            "missing" => &self.stats.stored_missing,
            _ => &self.stats.stored_unreadable,
        };
        Stats::bump(counter);
        tracing::error!(%source, reason, detail = %detail, "stored snapshot anomaly; a takeover after a restart has no usable snapshot of this source until a new one arrives");
        problems.insert(source.to_string(), Problem { reason, detail });
    }

    /// What is wrong with the stored snapshot of `source`, as one line for
    /// operators (`reason: detail`); `None` when nothing is.
    pub fn problem(&self, source: &str) -> Option<String> {
        lock(&self.problems)
            .get(source)
            .map(|p| format!("{}: {}", p.reason, p.detail))
    }

    /// Looks at every stored snapshot cheaply (a stat each): one that
    /// vanished is reported missing, one changed behind our back is opened
    /// again and reported if it no longer holds its source's snapshot. For
    /// the replication loop, once per heartbeat.
    pub fn check_stored(&self) {
        let sources: Vec<String> = lock(&self.accepted).keys().cloned().collect();
        for source in sources {
            let path = self.dir.join(format!("{source}.snap"));
            let Some(stamp) = file_stamp(&path) else {
                self.report(
                    &source,
                    "missing",
                    format!("{}: gone, although a snapshot was accepted", path.display()),
                );
                continue;
            };
            if lock(&self.files).get(&source) == Some(&stamp) {
                continue;
            }
            // Changed (or never read): open it once; `stored` reports.
            if self.stored(&source).is_some() {
                lock(&self.files).insert(source, stamp);
            }
        }
    }

    /// Refuses `(epoch, sequence)` unless newer than the manifest's last
    /// accepted snapshot of `source` (replay protection that survives the
    /// loss of the stored files).
    fn check_manifest(&self, source: &str, header: &api::SnapshotHeader) -> Result<(), Rejection> {
        if let Some(last) = lock(&self.accepted).get(source) {
            if (header.epoch, header.sequence) <= (last.epoch, last.sequence) {
                return Err(Rejection::Replay {
                    epoch: header.epoch,
                    sequence: header.sequence,
                    last_epoch: last.epoch,
                    last_sequence: last.sequence,
                });
            }
        }
        Ok(())
    }

    /// The receiving limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sources we hold a copy of.
    pub fn sources(&self) -> Vec<String> {
        self.held().keys().cloned().collect()
    }

    /// For each source we hold a copy of, how fresh it is: when the source
    /// took the snapshot or sealed the batch folded in last (its clock, ms
    /// since the Unix epoch).
    pub fn newest_taken(&self) -> Vec<(String, i64)> {
        self.held()
            .iter()
            .map(|(source, h)| (source.clone(), h.copy.as_of_unix_ms))
            .collect()
    }

    /// Our copy of `source`: its epoch and pending tasks (snapshot plus the
    /// changes since).
    pub fn pending_of(&self, source: &str) -> Option<(u64, Vec<api::Task>)> {
        let held = self.held();
        let h = held.get(source)?;
        Some((h.copy.epoch, h.copy.pending_tasks()))
    }

    /// Runs `f` on our copy of `source`, if we hold one.
    pub fn with_copy<T>(&self, source: &str, f: impl FnOnce(&HeldCopy) -> T) -> Option<T> {
        self.held().get(source).map(|h| f(&h.copy))
    }

    /// The newest stored snapshot of `source`, decrypted (without the
    /// changes since; see [`Receiver::pending_of`]). `None` (and the anomaly
    /// reported, see [`Receiver::problem`]) when the file is gone although
    /// one was accepted, unreadable, or holds another region's.
    pub fn stored(&self, source: &str) -> Option<(api::SnapshotHeader, SnapshotBody)> {
        let ring = self.ring.as_ref()?;
        let path = self.dir.join(format!("{source}.snap"));
        if !path.exists() {
            if lock(&self.accepted).contains_key(source) {
                self.report(
                    source,
                    "missing",
                    format!("{}: gone, although a snapshot was accepted", path.display()),
                );
            }
            return None;
        }
        match open_file(&path, ring) {
            Ok((h, _)) if h.source_region != source => {
                self.report(
                    source,
                    "wrong_source",
                    format!(
                        "{} holds a snapshot of `{}`, not of {source}; ignored",
                        path.display(),
                        wire::truncate(&h.source_region, 64)
                    ),
                );
                None
            }
            Ok(v) => Some(v),
            Err(e) => {
                self.report(source, "unreadable", e);
                None
            }
        }
    }

    /// Verifies and stores a snapshot; on any failure the previous one stays.
    pub fn receive(
        &self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
        stats: &Stats,
    ) -> Result<Accepted, Rejection> {
        let result = self.verify_and_store(policy, chunks);
        Self::count(chunks, &result, stats, &stats.accepted, "snapshot");
        result
    }

    /// Verifies, stores and folds in a change batch; on any failure our copy
    /// stays as it was.
    pub fn receive_changes(
        &self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
        stats: &Stats,
    ) -> Result<Accepted, Rejection> {
        let result = self.verify_and_fold(policy, chunks);
        Self::count(
            chunks,
            &result,
            stats,
            &stats.changes_accepted,
            "change batch",
        );
        result
    }

    fn count(
        chunks: &[api::SnapshotChunk],
        result: &Result<Accepted, Rejection>,
        stats: &Stats,
        accepted: &AtomicU64,
        what: &str,
    ) {
        let claimed = envelope::header_of(chunks)
            .map(|h| wire::truncate(&h.source_region, 64))
            .unwrap_or_else(|_| "?".into());
        match result {
            Ok(a) => {
                Stats::bump(accepted);
                tracing::debug!(source = %claimed, epoch = a.header.epoch, sequence = a.header.sequence, tasks = a.tasks, %what, "stored");
            }
            Err(r) => {
                let counter = match r {
                    Rejection::Envelope(EnvelopeError::Auth(_)) => &stats.rejected_auth,
                    Rejection::Envelope(EnvelopeError::UnknownKey(_)) => {
                        &stats.rejected_unknown_key
                    }
                    Rejection::Envelope(EnvelopeError::Truncated { .. }) => {
                        &stats.rejected_truncated
                    }
                    Rejection::Envelope(EnvelopeError::OutOfOrder { .. }) => {
                        &stats.rejected_out_of_order
                    }
                    Rejection::Envelope(EnvelopeError::Limit { .. }) => &stats.rejected_limit,
                    Rejection::Replay { .. } => &stats.rejected_replay,
                    Rejection::NotPermitted(_) => &stats.rejected_not_permitted,
                    Rejection::Residency(_) => &stats.rejected_residency,
                    _ => &stats.rejected_malformed,
                };
                Stats::bump(counter);
                tracing::warn!(source = %claimed, reason = %r, %what, "rejected; the copy held is kept");
            }
        }
    }

    /// The checks before decryption: the claimed source may send to us.
    fn permitted<'a>(
        &'a self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
    ) -> Result<(String, &'a KeyRing), Rejection> {
        let claimed = envelope::header_of(chunks)?;
        let source = claimed.source_region.clone();
        if source == self.region || policy.region(&source).is_none() {
            return Err(Rejection::NotPermitted(format!(
                "`{}` is not another region of this federation",
                wire::truncate(&source, 64)
            )));
        }
        if !snapshot::may_send(policy, &source, &self.region) {
            return Err(Rejection::NotPermitted(format!(
                "{source} may not send snapshots to {}: no rule names {source} as a region and {} as its backup",
                self.region, self.region
            )));
        }
        let Some(ring) = &self.ring else {
            return Err(Rejection::NotPermitted(
                "this region has no key ring".into(),
            ));
        };
        Ok((source, ring))
    }

    /// Refuses `(epoch, sequence)` unless newer than what `source`'s copy
    /// has folded in.
    fn check_newer(
        held: &BTreeMap<String, Held>,
        source: &str,
        header: &api::SnapshotHeader,
    ) -> Result<(), Rejection> {
        if let Some(last) = held.get(source).map(|h| &h.copy) {
            if (header.epoch, header.sequence) <= (last.epoch, last.sequence) {
                return Err(Rejection::Replay {
                    epoch: header.epoch,
                    sequence: header.sequence,
                    last_epoch: last.epoch,
                    last_sequence: last.sequence,
                });
            }
        }
        Ok(())
    }

    /// Every task is `source`'s and may be held here.
    fn check_scope<'t>(
        &self,
        policy: &Policy,
        source: &str,
        tasks: impl Iterator<Item = &'t api::Task>,
    ) -> Result<(), Rejection> {
        let tags = policy
            .region(&self.region)
            .map(|r| r.tags.clone())
            .unwrap_or_default();
        for t in tasks {
            if wire::owner_of(&t.task_id) != Some(source) {
                return Err(Rejection::Residency(format!(
                    "task {} is not owned by {source}",
                    wire::truncate(&t.task_id, 80)
                )));
            }
            snapshot::may_hold(policy, source, &self.region, &tags, t)
                .map_err(Rejection::Residency)?;
        }
        Ok(())
    }

    /// Verifies a pushed snapshot and decodes it for the copy, storing
    /// nothing: every check of [`Receiver::receive`] before the write (the
    /// source may send to us, AES-256-GCM of every chunk, zstd within the
    /// announced size, newer than what we hold, the body agrees with the
    /// header, every task may be held here). What a receive does before it
    /// writes and folds ([`HeldCopy::fold_snapshot`]); the snapshot
    /// benchmark measures it.
    pub fn verify_snapshot(
        &self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
    ) -> Result<(String, api::SnapshotHeader, Restored), Rejection> {
        let (source, ring) = self.permitted(policy, chunks)?;
        let (header, plain) = envelope::open(chunks, ring, &self.limits)?;
        Self::check_newer(&self.held(), &source, &header)?;
        self.check_manifest(&source, &header)?;
        let mut scope = restore::Scope::new(policy, &source, &self.region);
        let body = restore::decode(plain, Some(&header), Some(&mut scope))?;
        Ok((source, header, body))
    }

    fn verify_and_store(
        &self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
    ) -> Result<Accepted, Rejection> {
        let (source, header, body) = self.verify_snapshot(policy, chunks)?;
        let path = self.dir.join(format!("{source}.snap"));
        // Serialise writers of the same source through the map's lock.
        let mut held = self.held();
        Self::check_newer(&held, &source, &header)?;
        write_file(&path, chunks)
            .map_err(|e| Rejection::Storage(format!("{}: {e}", path.display())))?;
        // The snapshot supersedes the change log (a log left behind by a
        // crash here holds only older batches, skipped when read).
        let log = self.dir.join(format!("{source}.changes"));
        if log.exists() {
            if let Err(e) = std::fs::remove_file(&log) {
                tracing::error!(path = %log.display(), error = %e, "removing a folded change log failed");
            }
        }
        {
            let mut accepted = lock(&self.accepted);
            accepted.insert(
                source.clone(),
                Latest {
                    epoch: header.epoch,
                    sequence: header.sequence,
                    taken_unix_ms: body.taken_unix_ms,
                },
            );
            write_manifest(&self.dir, &accepted).map_err(|e| {
                Rejection::Storage(format!("{}: {e}", self.dir.join(MANIFEST).display()))
            })?;
        }
        lock(&self.files).insert(source.clone(), file_stamp(&path).unwrap_or_default());
        lock(&self.problems).remove(&source);
        let tasks = body.tasks();
        let h = held.entry(source).or_default();
        h.copy.fold_snapshot(body);
        h.log_bytes = 0;
        Ok(Accepted {
            tasks,
            header,
            snapshot_wanted: false,
        })
    }

    fn verify_and_fold(
        &self,
        policy: &Policy,
        chunks: &[api::SnapshotChunk],
    ) -> Result<Accepted, Rejection> {
        let (source, ring) = self.permitted(policy, chunks)?;
        let (header, body) = open_batch(chunks, ring, &self.limits)?;
        Self::check_newer(&self.held(), &source, &header)?;
        self.check_manifest(&source, &header)?;
        self.check_scope(policy, &source, body.tasks.iter())?;
        let path = self.dir.join(format!("{source}.changes"));
        let mut held = self.held();
        Self::check_newer(&held, &source, &header)?;
        let bytes = append_batch(&path, chunks)
            .map_err(|e| Rejection::Storage(format!("{}: {e}", path.display())))?;
        let tasks = body.tasks.len();
        let h = held.entry(source).or_default();
        h.log_bytes += bytes;
        h.copy
            .fold_batch(body.epoch, body.sequence, body.sent_unix_ms, body.tasks);
        Ok(Accepted {
            tasks,
            header,
            snapshot_wanted: h.snapshot_wanted(),
        })
    }
}

fn read_manifest(dir: &Path) -> BTreeMap<String, Latest> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(path = %path.display(), line = e.line(), column = e.column(), error = %e, "snapshot manifest unreadable; missing snapshots cannot be told from never received ones");
                BTreeMap::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "snapshot manifest unreadable");
            BTreeMap::new()
        }
    }
}

/// Writes the manifest atomically (temp file, fsync, rename, fsync of the
/// directory).
fn write_manifest(dir: &Path, latest: &BTreeMap<String, Latest>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(latest).map_err(std::io::Error::other)?;
    crate::atomic_file::write(&dir.join(MANIFEST), &bytes)
}

/// Reads a pushed stream into chunks, enforcing the limits as chunks arrive:
/// a limit gives `RESOURCE_EXHAUSTED` naming it, and is counted.
pub async fn collect<S>(
    mut stream: S,
    limits: Limits,
    stats: &Stats,
) -> Result<Vec<api::SnapshotChunk>, crate::error::Error>
where
    S: futures::Stream<Item = Result<api::SnapshotChunk, tonic::Status>> + Unpin,
{
    use futures::StreamExt as _;
    let mut collector = envelope::Collector::new(limits);
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|s| {
            Stats::bump(&stats.rejected_truncated);
            tracing::warn!(code = ?s.code(), "snapshot stream broke off; previous snapshot kept");
            crate::error::Error::invalid("snapshot", format!("stream broke off: {}", s.message()))
        })?;
        if let Err(e) = collector.push(chunk) {
            Stats::bump(&stats.rejected_limit);
            tracing::warn!(reason = %e, "snapshot rejected; previous snapshot kept");
            let limit = match &e {
                EnvelopeError::Limit { limit, .. } => *limit,
                _ => "snapshot",
            };
            return Err(crate::error::Error::limit(
                &format!("snapshot ({limit})"),
                e.to_string(),
            ));
        }
    }
    Ok(collector.into_chunks())
}
