//! Anchors of a decision log outside its own file, so that a log cut short,
//! emptied or replaced is evident: the head (seq, hash) a controller records
//! in its task store and advertises to its peers, the heads peers witnessed
//! (`<data_dir>/witnesses.json`), and the check of a log against a head.
//!
//! Owns `witnesses.json` and its format. Must not touch the network or the
//! task store: callers pass heads in and out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{AuditError, GENESIS_HASH, check_line};

/// The witnesses file's name inside a data directory.
pub const WITNESS_FILE: &str = "witnesses.json";
/// The version of the witnesses file this code writes and reads.
const WITNESS_VERSION: u32 = 1;

/// The last record of a log: its seq (0 for an empty log) and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    /// Seq of the last record; 0 when the log is empty.
    pub seq: u64,
    /// Hash of the last record; [`GENESIS_HASH`] when the log is empty.
    pub hash: String,
}

impl LogHead {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }
}

/// How a log compares with a head recorded elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    /// The log holds the head's record (and possibly more after it).
    Holds,
    /// The log ends before the head: records were removed from its end (or
    /// the whole file was emptied or replaced by a shorter one).
    Shorter {
        /// Seq of the log's last record (0 when empty).
        log_seq: u64,
    },
    /// The log's record at the head's seq has another hash: the log was
    /// replaced or rewritten.
    Different {
        /// The hash the log has at that seq.
        log_hash: String,
    },
}

impl HeadCheck {
    /// One sentence for an operator or auditor; `who` says where the head
    /// came from ("the task store", "europe's witness", …).
    pub fn describe(&self, head: &LogHead, who: &str) -> String {
        match self {
            HeadCheck::Holds if head.seq == 0 => {
                format!("has nothing to hold yet: {who} recorded an empty log")
            }
            HeadCheck::Holds => format!(
                "holds seq {} hash {} as {who} recorded",
                head.seq,
                short(&head.hash)
            ),
            HeadCheck::Shorter { log_seq } => format!(
                "ends at seq {log_seq} but {who} recorded seq {} (hash {}): {} record(s) at its end are missing (log cut short, emptied or replaced)",
                head.seq,
                short(&head.hash),
                head.seq - log_seq
            ),
            HeadCheck::Different { log_hash } => format!(
                "has hash {} at seq {} but {who} recorded hash {}: the log was replaced or rewritten",
                short(log_hash),
                head.seq,
                short(&head.hash)
            ),
        }
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Compares the log bytes `bytes` (a whole `decisions.jsonl`) with `head`.
/// Only whole lines count; line N is record seq N (the chain itself is
/// checked by [`super::verify`]).
pub fn check_bytes(bytes: &[u8], head: &LogHead) -> HeadCheck {
    if head.seq == 0 {
        return HeadCheck::Holds;
    }
    let mut last = 0u64;
    let whole = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..end],
        None => return HeadCheck::Shorter { log_seq: 0 },
    };
    for (i, line) in whole.split(|b| *b == b'\n').enumerate() {
        let n = i as u64 + 1;
        last = n;
        if n == head.seq {
            let hash = check_line(line).map(|r| r.hash).unwrap_or_default();
            return if hash == head.hash {
                HeadCheck::Holds
            } else {
                HeadCheck::Different { log_hash: hash }
            };
        }
    }
    HeadCheck::Shorter { log_seq: last }
}

/// [`check_bytes`] on the log at `path` (a data directory or its active
/// file, with its closed segments). When the head lies in the active file
/// (the usual case: a head recorded a heartbeat ago), only that file is
/// read, so a controller's start-up check does not grow with the log.
pub fn check_file(path: &Path, head: &LogHead) -> Result<HeadCheck, AuditError> {
    let active = super::log_path(path);
    if head.seq > 0 && !super::segments::closed(&active)?.is_empty() {
        let bytes = super::read_file(&active)?;
        let first = bytes
            .split(|b| *b == b'\n')
            .next()
            .and_then(|line| check_line(line).ok())
            .map(|r| r.seq);
        if let Some(first) = first.filter(|f| head.seq >= *f) {
            // Line N of the active file is seq first + N - 1.
            let shifted = LogHead {
                seq: head.seq - first + 1,
                hash: head.hash.clone(),
            };
            return Ok(match check_bytes(&bytes, &shifted) {
                HeadCheck::Shorter { log_seq } => HeadCheck::Shorter {
                    log_seq: log_seq + first - 1,
                },
                other => other,
            });
        }
    }
    let log = super::read_log(path)?;
    Ok(check_bytes(&log.bytes, head))
}

/// A head of another region's log as this controller heard it from that
/// region itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Witnessed {
    /// Seq of the region's last record.
    pub seq: u64,
    /// Hash of that record.
    pub hash: String,
    /// The region's epoch when it advertised this head.
    pub epoch: u64,
    /// When it was heard (this controller's clock, ms since the Unix epoch).
    pub seen_unix_ms: i64,
}

impl Witnessed {
    /// The witnessed head.
    pub fn head(&self) -> LogHead {
        LogHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WitnessFile {
    version: u32,
    regions: BTreeMap<String, Witnessed>,
}

/// What an advertised head says against what was witnessed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// First head heard of the region, or a later one: recorded.
    Advanced,
    /// The head witnessed already.
    Same,
    /// A head before the one witnessed: the region's log lost records at its
    /// end. The witnessed head is kept as evidence.
    Regressed {
        /// What was witnessed before.
        witnessed: Witnessed,
    },
    /// The same seq with another hash: the region's log was replaced. The
    /// witnessed head is kept as evidence.
    Forked {
        /// What was witnessed before.
        witnessed: Witnessed,
    },
}

#[derive(Debug, Default)]
struct State {
    regions: BTreeMap<String, Witnessed>,
    /// Anomalies per region, as one line for the status view.
    problems: BTreeMap<String, String>,
    /// (region, offered seq, offered hash) already reported.
    reported: BTreeSet<(String, u64, String)>,
    dirty: bool,
}

/// The heads this controller witnessed of its peers' logs, kept durably in
/// `<data_dir>/witnesses.json` so that they outlive a restart.
#[derive(Debug)]
pub struct Witnesses {
    path: PathBuf,
    state: Mutex<State>,
}

/// Errors of the witnesses file.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a witnesses file this version understands.
    #[error("{path}:{line}:{column}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

/// Parses a witnesses file's bytes (`path` names it in errors).
pub fn parse_witnesses(
    path: &Path,
    bytes: &[u8],
) -> Result<BTreeMap<String, Witnessed>, WitnessError> {
    let file: WitnessFile = serde_json::from_slice(bytes).map_err(|e| WitnessError::Malformed {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    if file.version != WITNESS_VERSION {
        return Err(WitnessError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: format!(
                "version {} is not supported (this build reads version {WITNESS_VERSION})",
                file.version
            ),
        });
    }
    Ok(file.regions)
}

/// Reads the witnesses file in `data_dir` (an empty map when there is none).
pub fn read_witnesses(data_dir: &Path) -> Result<BTreeMap<String, Witnessed>, WitnessError> {
    let path = data_dir.join(WITNESS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_witnesses(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(WitnessError::Io { path, source }),
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Witnesses {
    /// Opens the witnesses of `data_dir`. A damaged file is moved aside to
    /// `witnesses.json.damaged` (kept as evidence, reported with its
    /// position) and witnessing starts afresh; it never stops the controller.
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(WITNESS_FILE);
        let regions = match read_witnesses(data_dir) {
            Ok(r) => r,
            Err(e) => {
                let aside = data_dir.join(format!("{WITNESS_FILE}.damaged"));
                let moved = std::fs::rename(&path, &aside);
                tracing::error!(error = %e, moved_to = %aside.display(), moved = moved.is_ok(), "witnesses file unreadable; kept aside, witnessing starts afresh");
                BTreeMap::new()
            }
        };
        Self {
            path,
            state: Mutex::new(State {
                regions,
                ..State::default()
            }),
        }
    }

    /// Compares the head `region` advertised itself with what was witnessed
    /// and records it when it is new or later. Anomalies are logged once per
    /// offered head and kept for [`Witnesses::problem`].
    pub fn observe(&self, region: &str, epoch: u64, head: &LogHead, now_ms: i64) -> Observation {
        let mut s = lock(&self.state);
        let offered = Witnessed {
            seq: head.seq,
            hash: head.hash.clone(),
            epoch,
            seen_unix_ms: now_ms,
        };
        let observation = match s.regions.get(region) {
            None => Observation::Advanced,
            Some(w) if head.seq > w.seq => Observation::Advanced,
            Some(w) if head.seq == w.seq && head.hash == w.hash => Observation::Same,
            Some(w) if head.seq == w.seq => Observation::Forked {
                witnessed: w.clone(),
            },
            Some(w) => Observation::Regressed {
                witnessed: w.clone(),
            },
        };
        match &observation {
            Observation::Advanced => {
                s.regions.insert(region.to_string(), offered);
                s.problems.remove(region);
                s.dirty = true;
            }
            Observation::Same => {}
            Observation::Regressed { witnessed } | Observation::Forked { witnessed } => {
                let problem = match &observation {
                    Observation::Regressed { .. } => format!(
                        "decision log went back: advertises seq {} but seq {} (hash {}) was witnessed",
                        head.seq,
                        witnessed.seq,
                        short(&witnessed.hash)
                    ),
                    _ => format!(
                        "decision log replaced: advertises hash {} at seq {} but hash {} was witnessed",
                        short(&head.hash),
                        head.seq,
                        short(&witnessed.hash)
                    ),
                };
                let key = (region.to_string(), head.seq, head.hash.clone());
                if s.reported.insert(key) {
                    tracing::error!(%region, epoch, problem = %problem, "peer's decision log is not what was witnessed");
                }
                s.problems.insert(region.to_string(), problem);
            }
        }
        observation
    }

    /// The head witnessed of `region`, if any.
    pub fn of(&self, region: &str) -> Option<Witnessed> {
        lock(&self.state).regions.get(region).cloned()
    }

    /// The anomaly last seen of `region`'s log, if any.
    pub fn problem(&self, region: &str) -> Option<String> {
        lock(&self.state).problems.get(region).cloned()
    }

    /// True when [`Witnesses::flush`] has something to write.
    pub fn needs_flush(&self) -> bool {
        lock(&self.state).dirty
    }

    /// Writes the file if anything changed since the last write (temp file,
    /// fsync, rename, fsync of the directory). Blocking: call off the async
    /// workers.
    pub fn flush(&self) -> Result<(), WitnessError> {
        let (bytes, regions) = {
            let mut s = lock(&self.state);
            if !s.dirty {
                return Ok(());
            }
            s.dirty = false;
            let file = WitnessFile {
                version: WITNESS_VERSION,
                regions: s.regions.clone(),
            };
            (serde_json::to_vec_pretty(&file), file.regions.len())
        };
        let io = |source| WitnessError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = bytes.map_err(|e| io(std::io::Error::other(e)))?;
        let written = crate::atomic_file::write(&self.path, &bytes);
        if let Err(e) = written {
            lock(&self.state).dirty = true;
            return Err(io(e));
        }
        tracing::trace!(regions, "witnesses written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(n: u64) -> (Vec<u8>, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let log = super::super::DecisionLog::open(dir.path(), "europe").expect("open");
        let mut hashes = Vec::new();
        for i in 0..n {
            rt.block_on(log.append(super::super::Entry::new("route").note(format!("{i}"))))
                .expect("append");
            hashes.push(log.last().1);
        }
        drop(log);
        let bytes = std::fs::read(dir.path().join(super::super::FILE_NAME)).expect("read");
        (bytes, hashes)
    }

    #[test]
    fn a_log_holds_its_own_heads_and_shows_a_cut_tail_or_a_replacement() {
        let (bytes, hashes) = log_of(5);
        for (i, h) in hashes.iter().enumerate() {
            let head = LogHead {
                seq: i as u64 + 1,
                hash: h.clone(),
            };
            assert_eq!(check_bytes(&bytes, &head), HeadCheck::Holds);
        }
        let head = LogHead {
            seq: 5,
            hash: hashes[4].clone(),
        };
        // The last record deleted.
        let cut = &bytes[..bytes[..bytes.len() - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .expect("newline")
            + 1];
        assert_eq!(check_bytes(cut, &head), HeadCheck::Shorter { log_seq: 4 });
        // The whole log emptied.
        assert_eq!(check_bytes(b"", &head), HeadCheck::Shorter { log_seq: 0 });
        // Replaced by another log of the same length.
        let (other, other_hashes) = log_of(5);
        assert_eq!(
            check_bytes(&other, &head),
            HeadCheck::Different {
                log_hash: other_hashes[4].clone()
            }
        );
        assert!(
            HeadCheck::Shorter { log_seq: 4 }
                .describe(&head, "the task store")
                .contains("1 record(s) at its end are missing")
        );
    }

    #[test]
    fn witnesses_keep_the_highest_head_and_report_a_regression_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Witnesses::open(dir.path());
        let h = |seq, hash: &str| LogHead {
            seq,
            hash: hash.to_string(),
        };
        assert_eq!(
            w.observe("europe", 1, &h(3, "aa"), 10),
            Observation::Advanced
        );
        assert_eq!(w.observe("europe", 1, &h(3, "aa"), 11), Observation::Same);
        assert_eq!(
            w.observe("europe", 1, &h(7, "bb"), 12),
            Observation::Advanced
        );
        assert!(matches!(
            w.observe("europe", 2, &h(2, "cc"), 13),
            Observation::Regressed { witnessed } if witnessed.seq == 7
        ));
        assert!(matches!(
            w.observe("europe", 2, &h(7, "dd"), 14),
            Observation::Forked { .. }
        ));
        // The evidence stays: the witnessed head is still seq 7 "bb".
        assert_eq!(w.of("europe").map(|x| x.hash), Some("bb".to_string()));
        assert!(w.problem("europe").is_some_and(|p| p.contains("replaced")));
        w.flush().expect("flush");
        // Durable: a new instance reads it back.
        let again = Witnesses::open(dir.path());
        assert_eq!(again.of("europe").map(|x| x.seq), Some(7));
        // A later head clears the problem.
        assert_eq!(
            again.observe("europe", 3, &h(9, "ee"), 15),
            Observation::Advanced
        );
        assert_eq!(again.problem("europe"), None);
    }

    #[test]
    fn a_damaged_witnesses_file_names_its_position_and_is_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(WITNESS_FILE);
        std::fs::write(
            &path,
            b"{\"version\": 1,\n \"regions\": {\"europe\": {\"seq\": \"x\"}}}",
        )
        .expect("write");
        let err = read_witnesses(dir.path()).expect_err("malformed");
        let text = err.to_string();
        assert!(text.contains("witnesses.json:2:"), "{text}");
        let w = Witnesses::open(dir.path());
        assert_eq!(w.of("europe"), None);
        assert!(dir.path().join("witnesses.json.damaged").exists());
        std::fs::write(&path, b"{\"version\": 9, \"regions\": {}}").expect("write");
        assert!(
            read_witnesses(dir.path())
                .expect_err("version")
                .to_string()
                .contains("version 9 is not supported")
        );
    }
}
