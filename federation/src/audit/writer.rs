//! The writer: [`DecisionLog`], one controller's handle to its log (a file or
//! the region's database), and the thread that chains, writes and
//! fdatasyncs every waiting record at once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use super::{
    AuditError, Entry, FILE_NAME, Filter, MAX_BATCH, Prepared, RECENT_ROWS, Record, Tip,
    check_line, postgres, read_file, scan_from, segments, tail,
};

/// How a file-backed log is kept (`node.store.log_segment_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// The active file is closed as a segment (then compressed) once a
    /// write takes it to this many bytes.
    pub segment_bytes: u64,
    /// The longest lines staged in the task store's transaction (durable
    /// there already) wait in the file before its fdatasync: a caller that
    /// waits for its append syncs at once. Default [`SYNC_INTERVAL`].
    pub sync_interval: Duration,
}

impl LogOptions {
    /// 16 MiB: about 9,000 route records per segment.
    pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            sync_interval: SYNC_INTERVAL,
        }
    }
}

/// What [`DecisionLog::append`] takes: records to write as consecutive
/// lines of one write and one sync. A single [`Prepared`] or [`Entry`] is a
/// batch of one.
#[derive(Debug, Default)]
pub struct Batch(Vec<Prepared>);

impl From<Vec<Prepared>> for Batch {
    fn from(records: Vec<Prepared>) -> Self {
        Self(records)
    }
}

impl From<Prepared> for Batch {
    fn from(record: Prepared) -> Self {
        Self(vec![record])
    }
}

impl From<Entry> for Batch {
    fn from(entry: Entry) -> Self {
        Self(vec![Prepared::entry(&entry)])
    }
}

impl From<&Entry> for Batch {
    fn from(entry: &Entry) -> Self {
        Self(vec![Prepared::entry(entry)])
    }
}

/// The answer to one [`DecisionLog::append`]: the seq of the batch's last
/// record once every record of it is written and fdatasync'd. Await it on
/// the async runtime, or [`Receipt::wait`] for it from a plain thread.
#[derive(Debug)]
#[must_use = "the records are durable only when the receipt answers"]
pub struct Receipt(Result<oneshot::Receiver<Result<u64, AuditError>>, Option<AuditError>>);

impl Receipt {
    /// Blocks until the batch is durable. Must not be called on an async
    /// runtime thread (the task store's writer thread calls it).
    pub fn wait(self) -> Result<u64, AuditError> {
        match self.0 {
            Ok(rx) => rx.blocking_recv().map_err(|_| AuditError::Closed)?,
            Err(e) => Err(e.unwrap_or(AuditError::Closed)),
        }
    }
}

impl std::future::Future for Receipt {
    type Output = Result<u64, AuditError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        match &mut self.0 {
            Ok(rx) => match std::pin::Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(answer)) => Poll::Ready(answer),
                Poll::Ready(Err(_)) => Poll::Ready(Err(AuditError::Closed)),
                Poll::Pending => Poll::Pending,
            },
            Err(e) => Poll::Ready(Err(e.take().unwrap_or(AuditError::Closed))),
        }
    }
}

// ---------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------

/// How many of a task's records [`DecisionLog::first_of_task`] reads from
/// the database (a task has a handful: placed, forwarded, leased…).
const TASK_ROWS: i64 = 64;

/// Appends to the decision log of one controller. Cheap to clone; the file
/// closes when the last clone is dropped.
#[derive(Clone)]
pub struct DecisionLog {
    inner: Arc<LogInner>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("path", &self.inner.path)
            .field("region", &self.inner.region)
            .finish()
    }
}

struct LogInner {
    path: PathBuf,
    region: String,
    /// Kept in the region's database (`audit::postgres`), not in a file.
    in_database: bool,
    /// The database, when the log is kept there (reads go to it).
    pg: Option<crate::pg::Pg>,
    /// The last record known durable in the file (or the database).
    tip: Arc<Mutex<Tip>>,
    /// A file log's active file and chain as assigned (shared with the
    /// sync thread and the ticker); `None` for a log in the database.
    active: Option<Arc<Mutex<Active>>>,
    tx: Option<mpsc::UnboundedSender<Append>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Seconds per batch write + fdatasync, for metrics.
    append_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The file's fdatasyncs so far (0 for a log in the database).
    syncs: Arc<AtomicU64>,
}

impl Drop for LogInner {
    fn drop(&mut self) {
        self.tx.take();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(path = %self.path.display(), "decision log writer panicked");
            }
        }
    }
}

pub(super) enum Append {
    /// Records to seal and write (the log in the database).
    Batch(Vec<Prepared>, oneshot::Sender<Result<u64, AuditError>>),
    /// A file log's caller waits for the record `seq` (its line written
    /// before this was sent) to be durable.
    Wait(u64, oneshot::Sender<Result<u64, AuditError>>),
    Flush(oneshot::Sender<Result<u64, AuditError>>),
    /// A file log's reminder: lines written without a sync are
    /// [`SYNC_INTERVAL`] old (the ticker), or [`SYNC_BYTES`] many.
    Sync,
}

/// A file log's active file and its chain as assigned, under one lock.
///
/// Whoever seals records (the task store's writer staging them, a caller
/// appending) writes their lines to the file in the same hold, so lines
/// reach the file in seq order at once (a reader of the file, or of what a
/// killed controller left, sees them) and no thread is woken per record.
/// The sync thread only fdatasyncs, when a caller waits or the ticker
/// finds lines unsynced, and closes segments.
pub(super) struct Active {
    /// The last record sealed.
    pub(super) tip: Tip,
    file: Arc<File>,
    /// The file's length as written, and as of the last sync (kept here:
    /// no stat per write); `None` when unknown.
    len: Option<u64>,
    synced_len: Option<u64>,
    /// The chain after the lines written since the last sync, and their bytes.
    unsynced: Option<Tip>,
    unsynced_bytes: usize,
    /// Set when a write failed: the file may end in a partial line, and
    /// appending after it would break the chain, so nothing more is
    /// written until the log is reopened (the task store's staged rows
    /// keep its records; they are replayed at open).
    poisoned: Option<String>,
    /// The lines being sealed (reused).
    buf: Vec<u8>,
}

impl Active {
    /// Writes the lines sealed into `buf` (up to `tip`); true when the
    /// sync thread should be reminded now (the lines unsynced passed
    /// [`SYNC_BYTES`], or the write failed and waiters must hear it).
    fn write_sealed(&mut self, path: &Path) -> bool {
        if self.poisoned.is_some() || self.buf.is_empty() {
            self.buf.clear();
            return false;
        }
        let n = self.buf.len();
        let wrote = (&*self.file).write_all(&self.buf);
        self.buf.clear();
        match wrote {
            Ok(()) => {
                self.len = self.len.map(|l| l + n as u64);
                let before = self.unsynced_bytes;
                self.unsynced_bytes += n;
                self.unsynced = Some(self.tip.clone());
                before < SYNC_BYTES && self.unsynced_bytes >= SYNC_BYTES
            }
            Err(e) => {
                self.fail(path, &e);
                true
            }
        }
    }

    /// Writes `lines` (the records up to `tip`) and syncs them, with
    /// nothing unsynced before them (the replay at open).
    pub(super) fn append_synced(&mut self, lines: &[u8], tip: Tip) -> std::io::Result<()> {
        (&*self.file).write_all(lines)?;
        self.file.sync_data()?;
        self.len = self.file.metadata().map(|m| m.len()).ok();
        self.synced_len = self.len;
        self.tip = tip;
        Ok(())
    }

    /// A write or sync failed: undoes what is not known durable, so the
    /// file ends with a whole line a sync covered, and stops the log.
    fn fail(&mut self, path: &Path, e: &std::io::Error) {
        let undone = match self.synced_len {
            Some(l) => self.file.set_len(l).and_then(|()| self.file.sync_data()),
            None => Err(std::io::Error::other("the file's length is unknown")),
        };
        let why = match undone {
            Ok(()) => format!("{}: write failed ({e}); reopen the log", path.display()),
            Err(u) => format!(
                "{}: write failed ({e}) and could not be undone ({u}); reopen the log",
                path.display()
            ),
        };
        tracing::error!("{why}");
        self.poisoned = Some(why);
        self.len = self.synced_len;
        self.unsynced = None;
        self.unsynced_bytes = 0;
    }
}

/// The longest a file log leaves lines written but not fdatasync'd when no
/// caller waits for them (the lines staged in the task store's transaction:
/// durable there already). Their rows stay in the store until the file's
/// sync covers them, so this delays only when the rows are dropped, never
/// what is durable; a caller that waits (an append, a flush) syncs at once.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Past this many bytes written since the last sync, a file log syncs
/// without waiting for [`SYNC_INTERVAL`].
const SYNC_BYTES: usize = 1 << 20;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DecisionLog {
    /// Opens (creating if needed) `<dir>/decisions.jsonl` for `region`
    /// with [`LogOptions::default`].
    pub fn open(dir: &Path, region: &str) -> Result<Self, AuditError> {
        Self::open_with(dir, region, LogOptions::default())
    }

    /// Opens (creating if needed) `<dir>/decisions.jsonl` for `region`,
    /// verifying the active file and continuing the chain from the last
    /// closed segment's last record (`audit verify` checks the closed
    /// segments; they are never written again). A torn last line (a partial
    /// write from a crash) is truncated with a warning; any other damage
    /// refuses to open with [`AuditError::Broken`] naming the file and line.
    /// What a crash during a rotation left is finished first.
    pub fn open_with(dir: &Path, region: &str, options: LogOptions) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let to_compress = segments::recover(&path)?;
        let closed = segments::closed(&path)?;
        let start = segments::closed_tip(&closed)?;
        let next_segment = closed.last().map_or(1, |c| c.number + 1);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let bytes = read_file(&path)?;
        let scan = scan_from(&bytes, start);
        if let Some(b) = scan.report.first_broken {
            return Err(AuditError::Broken {
                path,
                line: b.line,
                seq: b.seq,
                reason: b.reason,
            });
        }
        let mut tip = scan.tip;
        if let Some(line) = scan.report.torn_tail_line {
            if scan.tail_record_ok {
                // The record is whole; only its newline is missing.
                file.write_all(b"\n").map_err(io)?;
                let rest = &bytes[usize::try_from(scan.good_len).unwrap_or(bytes.len())..];
                if let Ok(r) = check_line(rest) {
                    tip = Tip {
                        seq: r.seq,
                        hash: r.hash,
                    };
                }
                tracing::warn!(path = %path.display(), line, "decision log: completed a record whose newline was lost in a crash");
            } else {
                file.set_len(scan.good_len).map_err(io)?;
                tracing::warn!(
                    path = %path.display(),
                    line,
                    bytes = bytes.len() as u64 - scan.good_len,
                    "decision log: truncated a torn last line (a write interrupted by a crash, never acknowledged)"
                );
            }
            file.sync_all().map_err(io)?;
        }
        let segmenting = Segmenting {
            limit: options.segment_bytes.max(1),
            next: next_segment,
            to_compress,
        };
        let len = file.metadata().map(|m| m.len()).ok();
        let active = Arc::new(Mutex::new(Active {
            tip: tip.clone(),
            file: Arc::new(file),
            len,
            synced_len: len,
            unsynced: None,
            unsynced_bytes: 0,
            poisoned: None,
            buf: Vec::new(),
        }));
        let tip = Arc::new(Mutex::new(tip));
        let (tx, rx) = mpsc::unbounded_channel();
        // 100 µs to ~13 s; the metrics module exposes it (this module does
        // not know metrics).
        let append_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
        );
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = {
            let sync = Syncing {
                path: path.clone(),
                active: Arc::clone(&active),
                tip: Arc::clone(&tip),
                seconds: append_seconds.clone(),
                count: Arc::clone(&syncs),
            };
            std::thread::Builder::new()
                .name("decision-log-writer".into())
                .spawn(move || sync_loop(&sync, rx, segmenting))
                .map_err(io)?
        };
        // The sync ticker holds only a weak sender: it ends with the log.
        let weak = tx.downgrade();
        let interval = options.sync_interval;
        let waiting = Arc::clone(&active);
        std::thread::Builder::new()
            .name("decision-log-sync".into())
            .spawn(move || sync_ticker(&weak, &waiting, interval))
            .map_err(io)?;
        Ok(Self {
            inner: Arc::new(LogInner {
                path,
                region: region.to_string(),
                in_database: false,
                pg: None,
                tip,
                active: Some(active),
                tx: Some(tx),
                writer: Mutex::new(Some(writer)),
                append_seconds,
                syncs,
            }),
        })
    }

    /// Opens `region`'s decision log in the database (`node.store.backend:
    /// postgres`): continues the chain from the head the database holds,
    /// after checking that the last record is that head.
    pub fn open_postgres(pg: &crate::pg::Pg, region: &str) -> Result<Self, AuditError> {
        let pg2 = pg.clone();
        let region2 = region.to_string();
        let tip = pg
            .block(async move {
                let client = pg2.client().await?;
                postgres::ensure_head(&client, &region2)
                    .await
                    .map_err(|e| pg2.db(&e))?;
                let row = client
                    .query_one(
                        "SELECT h.seq, h.hash, (SELECT d.hash FROM decisions d \
                         WHERE d.region = h.region AND d.seq = h.seq) \
                         FROM decision_heads h WHERE h.region = $1",
                        &[&region2],
                    )
                    .await
                    .map_err(|e| pg2.db(&e))?;
                Ok((
                    row.get::<_, i64>(0),
                    row.get::<_, String>(1),
                    row.get::<_, Option<String>>(2),
                ))
            })
            .map_err(|e| AuditError::Write(e.to_string()))?;
        let (seq, hash, last) = tip;
        if seq > 0 && last.as_deref() != Some(hash.as_str()) {
            return Err(AuditError::Write(format!(
                "{}: the decision log's head (seq {seq}) names a record the table does not hold; \
                 refusing to continue the chain (check it with `federation audit verify`)",
                pg.target()
            )));
        }
        let head = Tip {
            seq: u64::try_from(seq).unwrap_or(0),
            hash,
        };
        let tip = Arc::new(Mutex::new(head));
        let (tx, rx) = mpsc::unbounded_channel();
        let append_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
        );
        let path = PathBuf::from(format!("postgres://{}#decisions", pg.target()));
        let writer = {
            let tip = Arc::clone(&tip);
            let pg = pg.clone();
            let region = region.to_string();
            let seconds = append_seconds.clone();
            std::thread::Builder::new()
                .name("decision-log-writer".into())
                .spawn(move || postgres::writer_loop(&pg, &region, &tip, rx, &seconds))
                .map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(Self {
            inner: Arc::new(LogInner {
                path,
                region: region.to_string(),
                in_database: true,
                pg: Some(pg.clone()),
                tip,
                active: None,
                tx: Some(tx),
                writer: Mutex::new(Some(writer)),
                append_seconds,
                syncs: Arc::default(),
            }),
        })
    }

    /// True when the log is kept in the region's database, not in a file.
    pub fn in_database(&self) -> bool {
        self.inner.in_database
    }

    /// The whole log as the JSON-lines file holds it: the file's bytes, or
    /// for a log in the database its export (`audit::postgres::export`).
    /// Blocking: call it off the async workers.
    pub fn read_all(&self) -> Result<Vec<u8>, AuditError> {
        match &self.inner.pg {
            None => segments::read_log(&self.inner.path).map(|l| l.bytes),
            Some(pg) => {
                let (db, region) = (pg.clone(), self.inner.region.clone());
                pg.block(async move { postgres::export(&db, &region).await })
                    .map_err(|e| self.unreadable(&e))
            }
        }
    }

    /// The newest `limit` records `filter` accepts, oldest first, reading at
    /// most the last `max_bytes` of a file (or the newest `RECENT_ROWS` rows
    /// of the database). Blocking: call it off the async workers.
    pub fn recent(
        &self,
        filter: &Filter,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, AuditError> {
        let Some(pg) = &self.inner.pg else {
            return tail::recent(&self.inner.path, filter, limit, max_bytes);
        };
        let (db, region) = (pg.clone(), self.inner.region.clone());
        let lines = pg
            .block(async move { postgres::newest(&db, &region, RECENT_ROWS).await })
            .map_err(|e| self.unreadable(&e))?;
        let mut out: Vec<Record> = lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Record>(line).ok())
            .filter(|r| filter.matches(r))
            .take(limit)
            .collect();
        out.reverse();
        Ok(out)
    }

    /// The newest `limit` records `filter` accepts, oldest first, read
    /// backwards from the end (at most `max_bytes` of the files, or the
    /// newest `RECENT_ROWS` rows of the database) until `limit` is met; the
    /// lines read are checked (hash and link), not the whole log (the file's
    /// is checked at open and by `audit verify`). For `ListDecisions`.
    /// Blocking: call it off the async workers.
    pub fn list(
        &self,
        filter: &Filter,
        limit: usize,
        max_bytes: u64,
    ) -> Result<tail::Listed, AuditError> {
        let mut out = tail::Listed {
            head: (0, super::GENESIS_HASH.to_string()),
            ..tail::Listed::default()
        };
        let mut newer = None;
        let tip = self.last();
        match &self.inner.pg {
            None => tail::each_line_backwards(&self.inner.path, max_bytes, |line| {
                tail::list_visit(&mut out, &mut newer, filter, limit.max(1), line)
            })?,
            Some(pg) => {
                let (db, region) = (pg.clone(), self.inner.region.clone());
                let lines = pg
                    .block(async move { postgres::newest(&db, &region, RECENT_ROWS).await })
                    .map_err(|e| self.unreadable(&e))?;
                for line in &lines {
                    if !tail::list_visit(
                        &mut out,
                        &mut newer,
                        filter,
                        limit.max(1),
                        line.as_bytes(),
                    ) {
                        break;
                    }
                }
            }
        }
        out.records.truncate(limit);
        out.records.reverse();
        if out.broken.is_none() && out.head.0 < tip.0 {
            out.broken = Some(format!(
                "the log ends at seq {} but this controller appended up to seq {}: records were removed from its end",
                out.head.0, tip.0
            ));
        }
        Ok(out)
    }

    /// The first record naming `task_id` that `keep` accepts, appended
    /// between `from_unix_ms` and `to_unix_ms`: a file is bisected on time
    /// ([`tail::first_of_task`]); the database is asked by the task's id
    /// (its first [`TASK_ROWS`] records). Blocking: call it off the async
    /// workers.
    pub fn first_of_task(
        &self,
        task_id: &str,
        from_unix_ms: i64,
        to_unix_ms: i64,
        mut keep: impl FnMut(&Record) -> bool,
    ) -> Result<Option<Record>, AuditError> {
        let Some(pg) = &self.inner.pg else {
            return tail::first_of_task(&self.inner.path, task_id, from_unix_ms, to_unix_ms, keep);
        };
        let (db, region, id) = (pg.clone(), self.inner.region.clone(), task_id.to_string());
        let lines = pg
            .block(async move { postgres::of_task(&db, &region, &id, TASK_ROWS).await })
            .map_err(|e| self.unreadable(&e))?;
        Ok(lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Record>(line).ok())
            .filter(|r| (from_unix_ms..=to_unix_ms).contains(&r.unix_ms))
            .find(|r| keep(r)))
    }

    fn unreadable(&self, e: &crate::pg::PgError) -> AuditError {
        AuditError::Io {
            path: self.inner.path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// The region whose records this log appends.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// Moves the tip on to a head written by someone else in the database
    /// (the task store's transaction); never backwards.
    pub(crate) fn advance(&self, seq: u64, hash: &str) {
        let mut tip = lock(&self.inner.tip);
        if seq > tip.seq {
            *tip = Tip {
                seq,
                hash: hash.to_string(),
            };
        }
    }

    /// How many times the file was fdatasync'd so far (0 for a log in the
    /// database): lines staged in the task store's transaction share one
    /// sync per [`LogOptions::sync_interval`].
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Seconds per batch write + fdatasync, for metrics.
    pub fn append_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.append_seconds.clone()
    }

    /// The log file (for a log in the database, `postgres://host:port/db#decisions`,
    /// for messages).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Seq and hash of the last record written (0 and 64 zeros when empty).
    pub fn last(&self) -> (u64, String) {
        let tip = lock(&self.inner.tip);
        (tip.seq, tip.hash.clone())
    }

    /// Appends `records` (a [`Batch`]: several [`Prepared`] records, or
    /// one, or an [`Entry`]) as consecutive lines of one write and one sync;
    /// the receipt answers with the last one's seq once they are durable.
    /// Batches appended concurrently share the sync. A file log's records
    /// are sealed and written to the file when this is called (their place
    /// in the chain is fixed then: one short write under the chain's lock,
    /// on the caller's thread); the receipt only waits for the sync. A log
    /// in the database queues them for its writer.
    pub fn append(&self, records: impl Into<Batch>) -> Receipt {
        let (tx, rx) = oneshot::channel();
        let Some(sender) = self.inner.tx.as_ref() else {
            return Receipt(Err(Some(AuditError::Closed)));
        };
        let records = records.into().0;
        let sent = match self.active() {
            None => sender.send(Append::Batch(records, tx)),
            Some(mut active) => {
                // Sealed and written here, under the lock that orders the
                // lines by seq; the sync thread syncs them.
                let (time, unix_ms) = now_rfc3339();
                let seq = self.seal_into(&mut active, records, &time, unix_ms, None);
                active.write_sealed(&self.inner.path);
                drop(active);
                sender.send(Append::Wait(seq, tx))
            }
        };
        Receipt(sent.map(|()| rx).map_err(|_| Some(AuditError::Closed)))
    }

    /// Seals `records` into the chain and writes their lines to the file
    /// without a sync and without waking anyone: the embedded task store
    /// keeps the returned rows in its own transaction, so one fdatasync
    /// makes a task and its record durable together. The sync thread
    /// syncs the lines with every other written since, every
    /// [`LogOptions::sync_interval`] (or sooner when a caller waits or
    /// [`SYNC_BYTES`] wait), off the submit's path; the store drops a row once
    /// [`DecisionLog::last`] is at or past its seq, and replays the rows a
    /// crash left at open ([`DecisionLog::replay_staged`]). Not for a log
    /// in the database (its records go in the task's transaction).
    pub fn stage(&self, records: Vec<Prepared>) -> Result<Vec<super::Staged>, AuditError> {
        let Some(mut active) = self.active() else {
            return Err(AuditError::Write(
                "a log in the database takes records in the task's own transaction".into(),
            ));
        };
        let sender = self.inner.tx.as_ref().ok_or(AuditError::Closed)?;
        if sender.is_closed() {
            return Err(AuditError::Closed);
        }
        let mut staged = Vec::with_capacity(records.len());
        let (time, unix_ms) = now_rfc3339();
        self.seal_into(&mut active, records, &time, unix_ms, Some(&mut staged));
        // A failed write stops the log (the rows keep the records).
        let remind = active.write_sealed(&self.inner.path);
        drop(active);
        if remind && sender.send(Append::Sync).is_err() {
            return Err(AuditError::Closed);
        }
        Ok(staged)
    }

    /// Seals `records` at `time` onto `active`'s chain, in order, their
    /// lines into its buffer (for [`Active::write_sealed`]), and each one's
    /// row pushed to `rows` when given (staged records). The last one's seq.
    fn seal_into(
        &self,
        active: &mut Active,
        records: Vec<Prepared>,
        time: &str,
        unix_ms: i64,
        mut rows: Option<&mut Vec<super::Staged>>,
    ) -> u64 {
        let Active { tip, buf, .. } = active;
        for record in records {
            let seq = tip.seq + 1;
            let row = rows
                .is_some()
                .then(|| super::staged::row_of(&record, seq, time, unix_ms, &tip.hash));
            let hash = record.seal_into(buf, seq, time, unix_ms, &self.inner.region, &tip.hash);
            if let (Some(rows), Some(mut row)) = (rows.as_deref_mut(), row) {
                super::staged::set_hash(&mut row, &hash);
                rows.push(super::Staged { seq, row });
            }
            *tip = Tip { seq, hash };
        }
        tip.seq
    }

    /// A file log's active file and chain as assigned, locked; `None` for
    /// a log in the database.
    pub(super) fn active(&self) -> Option<MutexGuard<'_, Active>> {
        self.inner.active.as_deref().map(lock)
    }

    /// Returns when everything appended before it is on disk (every
    /// acknowledged append already is: this is the shutdown barrier).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        let sent = match self.inner.tx.as_ref() {
            Some(sender) => sender
                .send(Append::Flush(tx))
                .map_err(|_| AuditError::Closed),
            None => Err(AuditError::Closed),
        };
        sent?;
        rx.await.map_err(|_| AuditError::Closed)?.map(|_| ())
    }
}

pub(super) fn now_rfc3339() -> (String, i64) {
    let now = SystemTime::now();
    let ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    // Millisecond precision, so `time` and `unix_ms` agree.
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    (humantime::format_rfc3339_millis(at).to_string(), ms)
}

/// How the writer closes segments: past `limit` bytes the active file
/// becomes segment `next`; `to_compress` are closed segments not yet
/// compressed (left by a crash).
struct Segmenting {
    limit: u64,
    next: u64,
    to_compress: Vec<segments::Closed>,
}

/// The thread that compresses closed segments, one at a time, off the
/// append path. Ends when `rx` closes.
fn compressor(rx: std::sync::mpsc::Receiver<segments::Closed>) {
    while let Ok(c) = rx.recv() {
        match segments::compress(&c) {
            Ok(zst) => tracing::debug!(path = %zst.display(), "decision log: segment compressed"),
            // Left uncompressed: still read as it is, and compressed at the
            // next start.
            Err(e) => {
                tracing::error!(path = %c.path.display(), error = %e, "decision log: compressing a closed segment failed")
            }
        }
    }
}

/// Reminds a file log's sync thread every `interval` to sync the lines
/// written since its last sync; ends when the log's last sender is gone.
fn sync_ticker(tx: &mpsc::WeakUnboundedSender<Append>, active: &Mutex<Active>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        let Some(tx) = tx.upgrade() else { return };
        let waiting = lock(active).unsynced.is_some();
        if waiting && tx.send(Append::Sync).is_err() {
            return;
        }
    }
}

/// What a file log's sync thread works on: the active file, the durable
/// tip it moves, the metrics of its syncs.
struct Syncing {
    path: PathBuf,
    active: Arc<Mutex<Active>>,
    tip: Arc<Mutex<Tip>>,
    seconds: prometheus_client::metrics::histogram::Histogram,
    count: Arc<AtomicU64>,
}

/// A file log's sync thread: every message asks for a sync of the lines
/// written so far (a caller waiting for its record, a flush, the ticker);
/// the sync runs without the lock, so records are sealed and written
/// meanwhile. Closes the active file as a segment once it is full, and
/// ends (after a last sync) when every sender is gone.
fn sync_loop(sync: &Syncing, rx: mpsc::UnboundedReceiver<Append>, mut segmenting: Segmenting) {
    let path = sync.path.as_path();
    let (compress_tx, compress_rx) = std::sync::mpsc::channel::<segments::Closed>();
    let compressing = std::thread::Builder::new()
        .name("decision-log-compress".into())
        .spawn(move || compressor(compress_rx));
    if let Err(e) = &compressing {
        tracing::error!(path = %path.display(), error = %e, "decision log: no thread to compress closed segments; they stay uncompressed");
    }
    for c in std::mem::take(&mut segmenting.to_compress) {
        let _ = compress_tx.send(c);
    }
    let mut appends = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    let mut closing = false;
    loop {
        let batch = match appends.next_batch() {
            Some(batch) => batch,
            // Every sender is gone: sync what is left, then stop.
            None if !closing && lock(&sync.active).unsynced.is_some() => {
                closing = true;
                vec![Append::Sync]
            }
            None => break,
        };
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Append::Flush(r) => pending.push((r, None)),
                Append::Wait(seq, r) => pending.push((r, Some(seq))),
                Append::Sync => {}
                // Sealed by the caller for a file log: never sent here.
                Append::Batch(_, r) => {
                    let _ = r.send(Err(AuditError::Write(
                        "unsealed records sent to a file log's writer".into(),
                    )));
                }
            }
        }
        let started = std::time::Instant::now();
        let (target, file, len, bytes) = {
            let a = lock(&sync.active);
            if let Some(why) = &a.poisoned {
                for (r, _) in pending {
                    let _ = r.send(Err(AuditError::Write(why.clone())));
                }
                continue;
            }
            (
                a.unsynced.clone(),
                Arc::clone(&a.file),
                a.len,
                a.unsynced_bytes,
            )
        };
        let synced = match &target {
            Some(_) => {
                sync.count.fetch_add(1, Ordering::Relaxed);
                file.sync_data()
            }
            None => Ok(()),
        };
        sync.seconds.observe(started.elapsed().as_secs_f64());
        let mut a = lock(&sync.active);
        if let Err(e) = &synced {
            if a.poisoned.is_none() {
                a.fail(path, e);
            }
        }
        if let Some(why) = &a.poisoned {
            // A write failed meanwhile (or this sync): what it covered may be
            // undone, so the tip stays and the waiters hear it.
            tracing::error!(path = %path.display(), error = %why, "decision log append failed");
            for (r, _) in pending {
                let _ = r.send(Err(AuditError::Write(why.clone())));
            }
            continue;
        }
        if let Some(t) = target {
            a.synced_len = len;
            a.unsynced_bytes = a.unsynced_bytes.saturating_sub(bytes);
            if a.unsynced.as_ref().is_some_and(|u| u.seq == t.seq) {
                a.unsynced = None;
            }
            *lock(&sync.tip) = t;
        }
        let durable = lock(&sync.tip).seq;
        for (r, seq) in pending {
            let _ = r.send(Ok(seq.unwrap_or(durable)));
        }
        // Rotate after answering: the records are durable in the active
        // file whatever happens next.
        let full = a.len.is_none_or(|l| l >= segmenting.limit)
            && a.file.metadata().is_ok_and(|m| m.len() >= segmenting.limit);
        if full {
            rotate(&mut a, sync, &mut segmenting, &compress_tx);
        }
    }
    drop(compress_tx);
    if let Ok(h) = compressing {
        if h.join().is_err() {
            tracing::error!(path = %path.display(), "decision log compressor panicked");
        }
    }
}

/// Closes the full active file as a segment (after syncing what was
/// written since the last sync), holding the lock so nothing is written
/// meanwhile, and goes on in a new active file.
fn rotate(
    a: &mut Active,
    sync: &Syncing,
    segmenting: &mut Segmenting,
    compress_tx: &std::sync::mpsc::Sender<segments::Closed>,
) {
    let path = sync.path.as_path();
    if let Some(t) = a.unsynced.clone() {
        sync.count.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = a.file.sync_data() {
            a.fail(path, &e);
            return;
        }
        a.synced_len = a.len;
        a.unsynced = None;
        a.unsynced_bytes = 0;
        *lock(&sync.tip) = t;
    }
    match segments::rotate(path, segmenting.next) {
        Ok((active, closed)) => {
            a.len = active.metadata().map(|m| m.len()).ok();
            a.synced_len = a.len;
            a.file = Arc::new(active);
            segmenting.next += 1;
            tracing::info!(segment = %closed.path.display(), seq = a.tip.seq, "decision log: segment closed");
            let _ = compress_tx.send(closed);
        }
        Err(e) if path.exists() => {
            // The rename did not happen: keep appending to the active
            // file, and try again after the next sync.
            tracing::error!(path = %path.display(), error = %e, "decision log: closing a segment failed");
        }
        Err(e) => {
            let why = format!(
                "{}: closing a segment renamed the active file but could not start a new one ({e}); reopen the log",
                path.display()
            );
            tracing::error!("{why}");
            a.poisoned = Some(why);
        }
    }
}
