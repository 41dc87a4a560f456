//! The store's witness: `<data_dir>/tasks.hwm`, a small file outside the
//! database's pages that records how far the store had come (commits and
//! tasks created), so that a store which opens but has lost committed work
//! (rolled back to an older commit, replaced by an older copy, records gone)
//! is detected at start instead of serving with tasks silently missing.
//!
//! Format: two lines (slots) of the same fixed width, ASCII:
//!
//! ```text
//! federation-tasks-hwm 1 commit=<20 digits> created=<20 digits> sha256=<16 hex>
//! ```
//!
//! `sha256` is the first 8 bytes (hex) of SHA-256 over the text before
//! ` sha256=`. Updates overwrite the two slots in turn, in place, each with
//! one `fdatasync`; a write torn by a crash spoils at most the slot being
//! written, and the reader takes the valid slot that says the most. The
//! file is created whole (temporary file, fsync, rename, directory fsync).
//!
//! The witness is written by its own thread after commits, off the path of
//! acknowledgements, at most once per [`MIN_INTERVAL`] (so it costs the
//! store's own fsyncs little): it trails the store by the commits of the
//! last few tens of milliseconds before a crash, and equals it after a clean
//! close. Work acknowledged in that window and *also* lost by the store is
//! the one loss this does not detect.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The witness file's name in the data directory.
pub const FILE: &str = "tasks.hwm";
const MAGIC: &str = "federation-tasks-hwm";
const VERSION: &str = "1";
/// The shortest time between two witness writes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(20);

/// How far a store had come: every commit and every task creation counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Mark {
    /// Write transactions committed (each one or more acknowledged changes).
    pub commit: u64,
    /// Tasks ever created (tasks are never deleted).
    pub created: u64,
}

/// Why the witness file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    /// It could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Its content is not a witness (damaged).
    #[error("{path}:{line}:{column}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line (slot).
        line: usize,
        /// 1-based column of the first wrong character.
        column: usize,
        /// What is wrong.
        reason: String,
    },
}

fn digest(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// The witness line (one slot) for `mark`, without newline; every line has
/// the same length.
pub fn render(mark: Mark) -> String {
    let body = format!(
        "{MAGIC} {VERSION} commit={:020} created={:020}",
        mark.commit, mark.created
    );
    let sum = digest(&body);
    format!("{body} sha256={sum}")
}

/// Bytes of one slot, newline included.
fn slot_len() -> usize {
    render(Mark::default()).len() + 1
}

/// Parses a witness file's text (its slots); `path` names it in errors.
/// The valid slot that says the most wins; an error only when none is valid
/// (the first slot's error is reported).
pub fn parse(path: &Path, text: &str) -> Result<Mark, WitnessError> {
    let mut best: Option<Mark> = None;
    let mut first_error = None;
    for (i, line) in text.split_terminator('\n').enumerate() {
        if i >= 2 {
            return Err(WitnessError::Malformed {
                path: path.display().to_string(),
                line: i + 1,
                column: 1,
                reason: "more than two slots".into(),
            });
        }
        match parse_line(path, i + 1, line) {
            Ok(m) => best = best.max(Some(m)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    best.ok_or_else(|| {
        first_error.unwrap_or(WitnessError::Malformed {
            path: path.display().to_string(),
            line: 1,
            column: 1,
            reason: "empty".into(),
        })
    })
}

fn parse_line(path: &Path, line_no: usize, line: &str) -> Result<Mark, WitnessError> {
    let bad = |column: usize, reason: String| WitnessError::Malformed {
        path: path.display().to_string(),
        line: line_no,
        column,
        reason,
    };
    let mut fields = Vec::new();
    let mut start = 0;
    for part in line.split(' ') {
        fields.push((start + 1, part));
        start += part.len() + 1;
    }
    let field = |i: usize| fields.get(i).copied();
    match field(0) {
        Some((_, MAGIC)) => {}
        _ => {
            return Err(bad(
                1,
                format!("not a task-store witness (expected `{MAGIC}`)"),
            ));
        }
    }
    match field(1) {
        Some((_, VERSION)) => {}
        Some((col, v)) => return Err(bad(col, format!("unknown version `{v}`"))),
        None => return Err(bad(line.len() + 1, "missing version".into())),
    }
    let number = |i: usize, key: &str| -> Result<u64, WitnessError> {
        let (col, part) =
            field(i).ok_or_else(|| bad(line.len() + 1, format!("missing `{key}=`")))?;
        let value = part
            .strip_prefix(key)
            .and_then(|p| p.strip_prefix('='))
            .ok_or_else(|| bad(col, format!("expected `{key}=<number>`")))?;
        value
            .parse::<u64>()
            .map_err(|e| bad(col + key.len() + 1, format!("`{key}`: {e}")))
    };
    let commit = number(2, "commit")?;
    let created = number(3, "created")?;
    let (col, sum) = field(4).ok_or_else(|| bad(line.len() + 1, "missing `sha256=`".into()))?;
    let sum = sum
        .strip_prefix("sha256=")
        .ok_or_else(|| bad(col, "expected `sha256=<hex>`".into()))?;
    let body_len = col.saturating_sub(2);
    let expected = digest(&line[..body_len]);
    if sum != expected {
        return Err(bad(
            col + "sha256=".len(),
            "checksum mismatch (the file was altered or damaged)".into(),
        ));
    }
    if fields.len() > 5 {
        return Err(bad(
            fields[5].0,
            "unexpected text after the checksum".into(),
        ));
    }
    Ok(Mark { commit, created })
}

/// Reads the witness of `dir`; `None` when there is none yet.
pub fn read(dir: &Path) -> Result<Option<Mark>, WitnessError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            // A torn slot may hold anything: judge the text slot by slot.
            let text = String::from_utf8_lossy(&bytes);
            parse(&path, &text).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WitnessError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Replaces the witness of `dir` with `mark` in both slots, durably (a new
/// file renamed over the old one).
pub fn write(dir: &Path, mark: Mark) -> Result<(), WitnessError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let io = |p: &Path, e: std::io::Error| WitnessError::Io {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        let line = format!("{}\n", render(mark));
        f.write_all(format!("{line}{line}").as_bytes())
            .map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    // The rename is durable once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(())
}

/// What a store holds against what its witness says was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Loss {
    /// What the store holds.
    pub store: Mark,
    /// Task records actually found.
    pub records: u64,
    /// What the witness recorded.
    pub witness: Mark,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.store.commit < self.witness.commit {
            parts.push(format!(
                "it is at commit {} but commit {} was acknowledged ({} commits lost)",
                self.store.commit,
                self.witness.commit,
                self.witness.commit - self.store.commit
            ));
        }
        let created = self.store.created.max(self.witness.created);
        if self.records < created {
            parts.push(format!(
                "it holds {} task records but {} tasks were acknowledged ({} tasks lost)",
                self.records,
                created,
                created - self.records
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Compares what a store holds with its witness (and its own count of
/// created tasks with the records it holds). `None` when nothing is lost.
pub fn compare(store: Mark, records: u64, witness: Option<Mark>) -> Option<Loss> {
    let witness = witness.unwrap_or(store);
    let lost =
        store.commit < witness.commit || records < store.created || records < witness.created;
    lost.then_some(Loss {
        store,
        records,
        witness,
    })
}

/// The thread that keeps the witness up to date: [`Writer::advance`] hands
/// it the newest mark (never blocking on I/O); it writes the newest one it
/// has whenever it is free. Dropping the writer writes the last mark and
/// joins the thread.
pub struct Writer {
    state: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

#[derive(Default)]
struct State {
    latest: Mark,
    written: Mark,
    closing: bool,
}

impl Writer {
    /// Starts the thread for `dir`, whose witness now says `written`.
    pub fn start(dir: &Path, written: Mark) -> std::io::Result<Self> {
        let state = Arc::new((
            Mutex::new(State {
                latest: written,
                written,
                closing: false,
            }),
            Condvar::new(),
        ));
        let thread = {
            let state = Arc::clone(&state);
            let dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name("task-store-witness".into())
                .spawn(move || run(&dir, &state))?
        };
        Ok(Self {
            state,
            thread: Some(thread),
            path: dir.join(FILE),
        })
    }

    /// The store has committed up to `mark`.
    pub fn advance(&self, mark: Mark) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.latest = mark;
        cv.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.state;
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            s.closing = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(path = %self.path.display(), "task store witness thread panicked");
            }
        }
    }
}

/// Overwrites one slot in place and syncs it.
fn write_slot(file: &std::fs::File, slot: usize, mark: Mark) -> std::io::Result<()> {
    let line = format!("{}\n", render(mark));
    file.write_all_at(line.as_bytes(), (slot * slot_len()) as u64)?;
    file.sync_data()
}

fn run(dir: &Path, state: &(Mutex<State>, Condvar)) {
    let (lock, cv) = state;
    let mut failures = 0u64;
    let path = dir.join(FILE);
    let mut file: Option<std::fs::File> = None;
    let mut slot = 0usize;
    loop {
        let (mark, closing) = {
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            while s.latest == s.written && !s.closing {
                s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            (s.latest, s.closing)
        };
        if mark != lock.lock().unwrap_or_else(|e| e.into_inner()).written {
            let written = (|| -> Result<(), WitnessError> {
                if file.is_none() {
                    // Made whole first (both slots), then updated in place.
                    write(dir, mark)?;
                    file = Some(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| WitnessError::Io {
                                path: path.display().to_string(),
                                reason: e.to_string(),
                            })?,
                    );
                    return Ok(());
                }
                if let Some(f) = &file {
                    write_slot(f, slot, mark).map_err(|e| WitnessError::Io {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                    slot ^= 1;
                }
                Ok(())
            })();
            match written {
                Ok(()) => {
                    failures = 0;
                    lock.lock().unwrap_or_else(|e| e.into_inner()).written = mark;
                    if !closing {
                        std::thread::sleep(MIN_INTERVAL);
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::error!(error = %e, failures, "writing the task store witness failed");
                    }
                    if closing {
                        return;
                    }
                    // Start over with a whole new file on the next commit,
                    // rather than spinning.
                    file = None;
                    let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                    s.written = mark;
                    continue;
                }
            }
        }
        if closing {
            let s = lock.lock().unwrap_or_else(|e| e.into_inner());
            if s.latest == s.written {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_reported_with_a_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        let mark = Mark {
            commit: 12,
            created: 30,
        };
        write(dir.path(), mark).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(mark));
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).expect("text");
        assert_eq!(text.lines().count(), 2, "{text}");
        // One digit changed in both slots: the checksum no longer matches.
        let altered = text.replace(
            "created=00000000000000000030",
            "created=00000000000000000031",
        );
        let err = parse(&path, &altered).expect_err("altered");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}:1:", path.display())),
            "{err}"
        );
        for bad in [
            "",
            "hello",
            "federation-tasks-hwm 2 commit=1 created=1 sha256=00",
            "federation-tasks-hwm 1 commit=x created=1 sha256=00",
            "federation-tasks-hwm 1 commit=1",
            "federation-tasks-hwm 1 commit=1 created=1 sha256=0011223344556677 more",
        ] {
            let err = parse(&path, bad).expect_err(bad);
            assert!(
                matches!(err, WitnessError::Malformed { .. }),
                "{bad}: {err}"
            );
        }
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        assert!(matches!(
            read(dir.path()),
            Err(WitnessError::Malformed { .. })
        ));
    }

    #[test]
    fn a_torn_slot_leaves_the_other_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = Mark {
            commit: 3,
            created: 4,
        };
        write(dir.path(), old).expect("write");
        let path = dir.path().join(FILE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let new = Mark {
            commit: 4,
            created: 5,
        };
        write_slot(&f, 1, new).expect("slot");
        assert_eq!(read(dir.path()).expect("read"), Some(new));
        // A crash tore slot 0 half way through its next write.
        f.write_all_at(b"federation-tasks-hwm 1 commit=0000", 0)
            .expect("tear");
        assert_eq!(read(dir.path()).expect("read"), Some(new));
    }

    #[test]
    fn losses_are_found_against_the_witness_and_the_records() {
        let m = |commit, created| Mark { commit, created };
        assert_eq!(compare(m(5, 10), 10, Some(m(5, 10))), None);
        assert_eq!(
            compare(m(6, 11), 11, Some(m(5, 10))),
            None,
            "witness trails"
        );
        assert_eq!(compare(m(5, 10), 10, None), None, "no witness yet");
        let rolled_back = compare(m(4, 8), 8, Some(m(5, 10))).expect("lost");
        assert!(
            rolled_back.to_string().contains("1 commits lost"),
            "{rolled_back}"
        );
        assert!(
            rolled_back.to_string().contains("2 tasks lost"),
            "{rolled_back}"
        );
        let records_gone = compare(m(5, 10), 7, Some(m(5, 10))).expect("lost");
        assert!(
            records_gone.to_string().contains("3 tasks lost"),
            "{records_gone}"
        );
    }

    #[test]
    fn the_writer_catches_up_and_writes_the_last_mark_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let w = Writer::start(dir.path(), Mark::default()).expect("start");
            for i in 1..=50 {
                w.advance(Mark {
                    commit: i,
                    created: i * 2,
                });
            }
        }
        assert_eq!(
            read(dir.path()).expect("read"),
            Some(Mark {
                commit: 50,
                created: 100
            })
        );
    }
}
