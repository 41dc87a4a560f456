//! The store's witness: `<data_dir>/tasks.hwm`, a one-line file outside the
//! database's pages that records how far the store had come (commits and
//! tasks created), so that a store which opens but has lost committed work
//! (rolled back to an older commit, replaced by an older copy, records gone)
//! is detected at start instead of serving with tasks silently missing.
//!
//! Format (one line, ASCII):
//!
//! ```text
//! federation-tasks-hwm 1 commit=<u64> created=<u64> sha256=<16 hex>
//! ```
//!
//! `sha256` is the first 8 bytes (hex) of SHA-256 over the text before
//! ` sha256=`. The file is replaced atomically (write a temporary file,
//! fsync, rename, fsync the directory), so it is either the old or the new
//! line, never a torn one.
//!
//! The witness is written by its own thread after each commit, off the path
//! of acknowledgements: it trails the store by at most the commits of the
//! last few milliseconds before a crash, and equals it after a clean close.
//! Work acknowledged in that window and *also* lost by the store is the one
//! loss this does not detect.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// The witness file's name in the data directory.
pub const FILE: &str = "tasks.hwm";
const MAGIC: &str = "federation-tasks-hwm";
const VERSION: &str = "1";

/// How far a store had come: every commit and every task creation counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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
    /// Its content is not a witness line (damaged).
    #[error("{path}:1:{column}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based column of the first wrong character.
        column: usize,
        /// What is wrong.
        reason: String,
    },
}

fn digest(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// The witness line for `mark` (without newline).
pub fn render(mark: Mark) -> String {
    let body = format!(
        "{MAGIC} {VERSION} commit={} created={}",
        mark.commit, mark.created
    );
    let sum = digest(&body);
    format!("{body} sha256={sum}")
}

/// Parses a witness file's text; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Mark, WitnessError> {
    let bad = |column: usize, reason: String| WitnessError::Malformed {
        path: path.display().to_string(),
        column,
        reason,
    };
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.contains('\n') {
        return Err(bad(
            line.find('\n').map_or(1, |i| i + 1),
            "more than one line".into(),
        ));
    }
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
            let text = String::from_utf8(bytes).map_err(|e| WitnessError::Malformed {
                path: path.display().to_string(),
                column: e.utf8_error().valid_up_to() + 1,
                reason: "not UTF-8 text".into(),
            })?;
            parse(&path, &text).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WitnessError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Replaces the witness of `dir` with `mark`, durably.
pub fn write(dir: &Path, mark: Mark) -> Result<(), WitnessError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let io = |p: &Path, e: std::io::Error| WitnessError::Io {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(format!("{}\n", render(mark)).as_bytes())
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

fn run(dir: &Path, state: &(Mutex<State>, Condvar)) {
    let (lock, cv) = state;
    let mut failures = 0u64;
    loop {
        let (mark, closing) = {
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            while s.latest == s.written && !s.closing {
                s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            (s.latest, s.closing)
        };
        if mark != lock.lock().unwrap_or_else(|e| e.into_inner()).written {
            match write(dir, mark) {
                Ok(()) => {
                    failures = 0;
                    lock.lock().unwrap_or_else(|e| e.into_inner()).written = mark;
                }
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::error!(error = %e, failures, "writing the task store witness failed");
                    }
                    if closing {
                        return;
                    }
                    // Retry on the next commit rather than spinning.
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
        // One digit changed: the checksum no longer matches.
        let altered = text.replace("created=30", "created=31");
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
