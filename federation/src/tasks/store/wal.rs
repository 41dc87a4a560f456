//! The embedded store's write-ahead log `tasks.wal`: every change to
//! `tasks.redb` after open is first a frame here (the rows a write
//! transaction sets or removes, checksummed, numbered), made durable with
//! one write and one `fdatasync`; the transaction itself is then committed
//! without fsync (redb's `Durability::None`, visible to readers at once). A
//! checkpoint (a durable redb commit recording the last frame it holds)
//! runs between batches; the log's file is then written from its start
//! again. Open replays the frames after the checkpoint. This module owns
//! the file's format, appending, replay and checkpoints; what a batch means
//! is the writer's.
//!
//! Frame: `magic u32 | len u32 | seq u64 | sum [u8; 8] | payload[len]`,
//! little-endian; `sum` is the first 8 bytes of SHA-256 over the store's
//! log id, `len`, `seq` and the payload. Payload: entries `name_len u8 |
//! table name | kind u8 (0 set, 1 remove) | key_len u32 | key | (set:)
//! value_len u32 | value`, in the order the transaction made them (redb's
//! own encoding of each key and value). Frames are contiguous and their
//! seqs consecutive; a frame whose seq is not the previous one's + 1 is a
//! leftover of an earlier round of the file and ends the log, as does the
//! first frame that does not check out (a torn write at the end). A frame
//! that does not check out followed by a valid one that continues the log
//! is damage, refused.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, Durability, Key, TableDefinition, Value, WriteTransaction};
use sha2::{Digest, Sha256};

use super::counters::COUNTS;
use super::idempotency::IDEM_KEYS;
use super::logged::Txn;
use super::pending::PENDING;
use super::{AGENTS, DbResult, LEASES, MARKS, META, QUEUE, TASKS};
use crate::tasks::StoreError;

/// The log's file in the data directory, beside `tasks.redb`.
pub const WAL_FILE: &str = "tasks.wal";
const MAGIC: u32 = 0x4C41_5754;
const HEAD: usize = 24;
/// The most payload one frame may claim (a larger `len` is not a frame).
const MAX_PAYLOAD: u32 = 1 << 30;
/// [`META`] key: the seq of the last frame the durable state holds.
const META_CHECKPOINT: &str = "wal_checkpoint";
/// [`META`] key: this store's log id (frames of another store's log never
/// check out here).
const META_ID: &str = "wal_id";
/// The file grows (with written zeros, never holes, so that an overwrite
/// needs no metadata in its sync) in steps of at least this much.
const GROW: u64 = 1 << 20;

/// When a checkpoint is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoints {
    /// Once the frames since the last checkpoint reach this many bytes.
    pub bytes: u64,
    /// Once the first frame since the last checkpoint is this old.
    pub interval: Duration,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            bytes: 16 << 20,
            interval: Duration::from_secs(1),
        }
    }
}

/// What the hint of a damaged log says.
const WAL_HINT: &str = "the write-ahead log holds acknowledged work that cannot be applied; keep the data directory as it is and run `federation store check DATA_DIR`; to rebuild the store from the newest snapshot a peer holds of this region, see `federation store recover`";

fn wal_damaged(path: &Path, what: String) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        what,
        hint: WAL_HINT.into(),
    }
}

/// The log, shared by the writer and the store's other writes (the
/// decision log's head, the replay of staged records): whoever holds its
/// lock is the only one writing to the database.
pub(super) struct Wal {
    state: Mutex<State>,
}

/// The open log: its file and where the next frame goes.
pub(super) struct State {
    path: PathBuf,
    file: File,
    /// The file's length (it only grows).
    len: u64,
    /// Where the next frame goes.
    offset: u64,
    /// The last frame's seq (written, synced and applied).
    seq: u64,
    /// The last seq the durable state holds.
    checkpointed: u64,
    id: u64,
    /// When the first frame since the last checkpoint was written.
    since: Option<Instant>,
    policy: Checkpoints,
    /// Set when a frame is durable but its transaction did not commit (or
    /// a sync failed): no further write is taken until a restart replays
    /// the log.
    poisoned: Option<String>,
    frame: Vec<u8>,
}

impl Wal {
    /// Opens `<dir>/tasks.wal` for the database `db` (at `db_path`):
    /// replays the frames after the durable state's checkpoint in one
    /// durable commit, and returns the log ready to append. A frame that
    /// does not check out followed by one that continues the log is
    /// [`StoreError::Damaged`] naming the file and the frame's offset.
    pub(super) fn open(dir: &Path, db: &Database, policy: Checkpoints) -> Result<Self, StoreError> {
        let path = dir.join(WAL_FILE);
        use std::os::unix::fs::OpenOptionsExt as _;
        // Task payloads: owner-only, like the database file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::Db(format!("opening {}: {e}", path.display())))?;
        let (checkpointed, id) = read_meta(db)?;
        let id = match id {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().as_u64_pair().0;
                let txn = db.begin_write().db()?;
                txn.open_table(META)
                    .db()?
                    .insert(META_ID, id.to_le_bytes().as_slice())
                    .db()?;
                txn.commit().db()?;
                id
            }
        };
        let bytes = read_all(&file, &path)?;
        let seq = replay(&path, &bytes, db, id, checkpointed)?;
        let state = State {
            path,
            len: bytes.len() as u64,
            file,
            offset: 0,
            seq,
            checkpointed: seq,
            id,
            since: None,
            policy,
            poisoned: None,
            frame: Vec::new(),
        };
        Ok(Self {
            state: Mutex::new(state),
        })
    }

    /// The log's lock: the only way to write to the database.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_all(file: &File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let len = file
        .metadata()
        .map_err(|e| StoreError::Db(format!("reading {}: {e}", path.display())))?
        .len();
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| StoreError::Db(format!("reading {}: {e}", path.display())))?;
    Ok(bytes)
}

fn read_meta(db: &Database) -> Result<(u64, Option<u64>), StoreError> {
    use redb::ReadableDatabase;
    let txn = db.begin_read().db()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, None)),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let word = |k: &str| -> Result<Option<u64>, StoreError> {
        Ok(meta
            .get(k)
            .db()?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_le_bytes))
    };
    Ok((word(META_CHECKPOINT)?.unwrap_or(0), word(META_ID)?))
}

fn sum(id: u64, len: u32, seq: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(id.to_le_bytes());
    h.update(len.to_le_bytes());
    h.update(seq.to_le_bytes());
    h.update(payload);
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// The frame at `at`, if one checks out there: its seq, payload and end.
fn frame_at(bytes: &[u8], at: usize, id: u64) -> Option<(u64, &[u8], usize)> {
    let head = bytes.get(at..at.checked_add(HEAD)?)?;
    let word = |r: std::ops::Range<usize>| head.get(r);
    let magic = u32::from_le_bytes(word(0..4)?.try_into().ok()?);
    if magic != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(word(4..8)?.try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let seq = u64::from_le_bytes(word(8..16)?.try_into().ok()?);
    let end = at.checked_add(HEAD)?.checked_add(len as usize)?;
    let payload = bytes.get(at + HEAD..end)?;
    if word(16..24)? != sum(id, len, seq, payload) {
        return None;
    }
    Some((seq, payload, end))
}

/// The frames of `bytes` the durable state lacks, applied to `db` in one
/// durable commit that records the last one as the checkpoint. Returns the
/// last seq the database now holds.
fn replay(
    path: &Path,
    bytes: &[u8],
    db: &Database,
    id: u64,
    checkpointed: u64,
) -> Result<u64, StoreError> {
    let mut at = 0usize;
    let mut prev: Option<u64> = None;
    let mut apply: Vec<(u64, &[u8])> = Vec::new();
    let end = loop {
        let Some((seq, payload, next)) = frame_at(bytes, at, id) else {
            break at;
        };
        match prev {
            // A leftover of an earlier round of the file.
            Some(p) if seq != p.wrapping_add(1) => {
                if seq > p.wrapping_add(1) {
                    return Err(wal_damaged(
                        path,
                        format!(
                            "the frame at byte {at} has seq {seq} but the one before it {p}: frames are missing"
                        ),
                    ));
                }
                break at;
            }
            None if seq > checkpointed.wrapping_add(1) => {
                return Err(wal_damaged(
                    path,
                    format!(
                        "its first frame (byte {at}) has seq {seq} but {} holds the log only up to seq {checkpointed}: the two files are not of one store, or frames are missing",
                        "tasks.redb"
                    ),
                ));
            }
            _ => {}
        }
        if seq > checkpointed {
            apply.push((seq, payload));
        }
        prev = Some(seq);
        at = next;
    };
    let last = prev.unwrap_or(checkpointed).max(checkpointed);
    // What follows the end must not continue the log: a frame that does
    // not check out in the middle of it is damage, not a torn tail.
    if let Some(found) = continuing_after(bytes, end, id, last) {
        return Err(wal_damaged(
            path,
            format!(
                "the frame at byte {end} (seq {}) does not check out, but a valid frame follows it (seq {}, byte {}): the log is damaged in the middle",
                last.wrapping_add(1),
                found.0,
                found.1
            ),
        ));
    }
    if apply.is_empty() && last == checkpointed {
        return Ok(last);
    }
    let txn = db.begin_write().db()?;
    let count = apply.len();
    for (seq, payload) in apply {
        apply_frame(&txn, payload).map_err(|why| {
            wal_damaged(
                path,
                format!("the frame of seq {seq} does not apply: {why}"),
            )
        })?;
    }
    txn.open_table(META)
        .db()?
        .insert(META_CHECKPOINT, last.to_le_bytes().as_slice())
        .db()?;
    txn.commit().db()?;
    if count > 0 {
        tracing::info!(path = %path.display(), frames = count, seq = last, "task store write-ahead log replayed");
    }
    Ok(last)
}

/// The first valid frame after `end` whose seq continues past `last`.
fn continuing_after(bytes: &[u8], end: usize, id: u64, last: u64) -> Option<(u64, usize)> {
    let magic = MAGIC.to_le_bytes();
    let mut at = end.checked_add(1)?;
    while at.checked_add(HEAD)? <= bytes.len() {
        let rel = bytes[at..].windows(4).position(|w| w == magic)?;
        at += rel;
        if let Some((seq, _, _)) = frame_at(bytes, at, id) {
            if seq > last {
                return Some((seq, at));
            }
        }
        at += 1;
    }
    None
}

/// One entry of a frame's payload.
struct Entry<'a> {
    table: &'a str,
    key: &'a [u8],
    value: Option<&'a [u8]>,
}

fn entries(payload: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = payload
            .get(*at..at.checked_add(n).ok_or("length overflow")?)
            .ok_or_else(|| format!("entry cut short at byte {at}"))?;
        *at += n;
        Ok(s)
    };
    let len32 = |at: &mut usize| -> Result<usize, String> {
        let b = take(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    while at < payload.len() {
        let n = take(&mut at, 1)?[0] as usize;
        let table = std::str::from_utf8(take(&mut at, n)?).map_err(|e| e.to_string())?;
        let kind = take(&mut at, 1)?[0];
        let klen = len32(&mut at)?;
        let key = take(&mut at, klen)?;
        let value = match kind {
            0 => {
                let vlen = len32(&mut at)?;
                Some(take(&mut at, vlen)?)
            }
            1 => None,
            k => return Err(format!("unknown entry kind {k}")),
        };
        out.push(Entry { table, key, value });
    }
    Ok(out)
}

fn apply_frame(txn: &WriteTransaction, payload: &[u8]) -> Result<(), String> {
    for e in entries(payload)? {
        match e.table {
            "tasks" => put(txn, TASKS, &e),
            "queue" => put(txn, QUEUE, &e),
            "leases" => put(txn, LEASES, &e),
            "meta" => put(txn, META, &e),
            "agents" => put(txn, AGENTS, &e),
            "marks" => put(txn, MARKS, &e),
            "idempotency_keys" => put(txn, IDEM_KEYS, &e),
            "counts" => put(txn, COUNTS, &e),
            "pending_records" => put(txn, PENDING, &e),
            other => Err(format!("unknown table `{other}`")),
        }?;
    }
    Ok(())
}

fn put<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    def: TableDefinition<'static, K, V>,
    e: &Entry<'_>,
) -> Result<(), String> {
    // Fixed-width types decode only from their width.
    let fits = |width: Option<usize>, b: &[u8]| width.is_none_or(|w| w == b.len());
    if !fits(K::fixed_width(), e.key) || e.value.is_some_and(|v| !fits(V::fixed_width(), v)) {
        return Err(format!("an entry of `{}` has the wrong width", e.table));
    }
    let mut table = txn.open_table(def).map_err(|x| x.to_string())?;
    match e.value {
        Some(v) => table
            .insert(K::from_bytes(e.key), V::from_bytes(v))
            .map(drop),
        None => table.remove(K::from_bytes(e.key)).map(drop),
    }
    .map_err(|x| x.to_string())
}

impl State {
    /// Begins a write transaction (refused while the log is poisoned).
    pub(super) fn begin(&self, db: &Database) -> Result<Txn, StoreError> {
        if let Some(why) = &self.poisoned {
            return Err(StoreError::Db(format!(
                "{}: {why}; restart the controller (the log is replayed at open)",
                self.path.display()
            )));
        }
        Ok(Txn::new(db.begin_write().db()?))
    }

    /// Makes `txn`'s changes durable as one frame (one write, one
    /// `fdatasync`), then commits it without fsync. On an error nothing is
    /// committed (a failed sync or commit also poisons the log).
    pub(super) fn commit(&mut self, txn: Txn) -> Result<(), StoreError> {
        let (mut txn, payload) = txn.into_parts();
        if payload.is_empty() {
            txn.set_durability(Durability::None).db()?;
            return txn.commit().db();
        }
        let seq = self.seq.wrapping_add(1);
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or_else(|| {
                StoreError::Invalid(format!("one batch of {} bytes is too large", payload.len()))
            })?;
        self.frame.clear();
        self.frame.extend_from_slice(&MAGIC.to_le_bytes());
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame.extend_from_slice(&seq.to_le_bytes());
        self.frame
            .extend_from_slice(&sum(self.id, len, seq, &payload));
        self.frame.extend_from_slice(&payload);
        let end = self.offset + self.frame.len() as u64;
        let path = self.path.clone();
        let io = |e: std::io::Error| StoreError::Db(format!("writing {}: {e}", path.display()));
        if end > self.len {
            self.grow(end).map_err(io)?;
        }
        self.file
            .write_all_at(&self.frame, self.offset)
            .map_err(io)?;
        if let Err(e) = self.file.sync_data() {
            // What a failed sync leaves on the disk is unknown.
            self.poisoned = Some(format!("syncing the write-ahead log failed ({e})"));
            return Err(io(e));
        }
        txn.set_durability(Durability::None).db()?;
        if let Err(e) = txn.commit() {
            self.poisoned = Some(format!(
                "the database did not take a batch its log holds ({e})"
            ));
            return Err(StoreError::Db(e.to_string()));
        }
        self.seq = seq;
        self.offset = end;
        self.since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Extends the file with written zeros to cover `end`.
    fn grow(&mut self, end: u64) -> std::io::Result<()> {
        let target = end
            .max(self.len.saturating_mul(2))
            .max(GROW)
            .next_multiple_of(4096);
        let zeros = vec![0u8; GROW as usize];
        let mut at = self.len;
        while at < target {
            let n = (target - at).min(GROW) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.len = target;
        Ok(())
    }

    /// Whether a checkpoint is due (by the bytes or the age of the frames
    /// since the last one).
    pub(super) fn due(&self) -> bool {
        self.since.is_some_and(|t| {
            self.offset >= self.policy.bytes || t.elapsed() >= self.policy.interval
        })
    }

    /// A durable commit of the database recording the last frame it holds;
    /// the file is then written from its start again.
    pub(super) fn checkpoint(&mut self, db: &Database) -> Result<(), StoreError> {
        if self.poisoned.is_some() || self.seq == self.checkpointed {
            return Ok(());
        }
        let txn = db.begin_write().db()?;
        txn.open_table(META)
            .db()?
            .insert(META_CHECKPOINT, self.seq.to_le_bytes().as_slice())
            .db()?;
        txn.commit().db()?;
        self.checkpointed = self.seq;
        self.offset = 0;
        self.since = None;
        Ok(())
    }

    /// The final checkpoint of a store being closed; the file is then
    /// emptied (so that a database file put back from an older copy is
    /// not met by frames it cannot take: the witness judges it instead).
    pub(super) fn close(&mut self, db: &Database) -> Result<(), StoreError> {
        if self.poisoned.is_some() {
            return Ok(());
        }
        self.checkpoint(db)?;
        let io =
            |e: std::io::Error| StoreError::Db(format!("emptying {}: {e}", self.path.display()));
        self.file.set_len(0).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.len = 0;
        Ok(())
    }
}

/// Applies `<dir>/tasks.wal` to the database at `db_path` (opened by the
/// caller; a copy, for the offline tools), as an open would.
pub fn replay_into(dir: &Path, db: &Database) -> Result<(), StoreError> {
    let path = dir.join(WAL_FILE);
    let Ok(file) = File::open(&path) else {
        return Ok(());
    };
    let (checkpointed, id) = read_meta(db)?;
    let Some(id) = id else {
        return Ok(());
    };
    let bytes = read_all(&file, &path)?;
    replay(&path, &bytes, db, id, checkpointed).map(drop)
}

/// Where the frames of the log's file start and end, chained by their
/// lengths from the start (checksums not checked): for tests that damage
/// one.
#[cfg(test)]
pub(crate) fn frame_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + HEAD) {
        if head[0..4] != MAGIC.to_le_bytes() {
            break;
        }
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let end = at + HEAD + len;
        if end > bytes.len() {
            break;
        }
        out.push((at, end));
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::store::logged::Logged;
    use std::cell::RefCell;

    #[test]
    fn entries_round_trip_and_refuse_what_is_cut() {
        let log = RefCell::new(Vec::new());
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::create(dir.path().join("x.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = Logged::new(txn.open_table(QUEUE).expect("queue"), "queue", &log);
            t.insert((-1i64, 2i64, "a"), ()).expect("insert");
            t.remove((-1i64, 2i64, "a")).expect("remove");
        }
        let bytes = log.into_inner();
        let e = entries(&bytes).expect("entries");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].table, "queue");
        assert!(e[0].value.is_some() && e[1].value.is_none());
        let cut = entries(&bytes[..bytes.len() - 1]).err().expect("refused");
        assert!(cut.contains("cut short"), "{cut}");
        drop(txn);
    }
}
