//! The log's files: the active segment `decisions.jsonl` and the closed ones
//! before it (`decisions-000001.jsonl.zst`, …), how the writer rotates and
//! compresses them, and reading them back as one stream.
//!
//! A closed segment holds whole lines, exactly as they were in the active
//! file; decompressed and concatenated in number order, followed by the
//! active file, they are the log: the chain and `seq` run on across files
//! (the first record of a segment links to the last of the one before).
//!
//! Rotation is two renames, each atomic: the writer renames the active file
//! to `decisions-N.jsonl` after a synced write and starts a new empty one;
//! a helper thread compresses `decisions-N.jsonl` to `decisions-N.jsonl.zst.tmp`,
//! syncs it, renames it to `decisions-N.jsonl.zst` and removes the
//! uncompressed file. After a crash at any point every record is in exactly
//! one complete file, except that `decisions-N.jsonl` and its `.zst` may
//! both be there (the `.zst` is complete: it was synced before its rename);
//! [`recover`] removes the duplicate and the `.tmp`.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

#[cfg(doc)]
use super::Broken;
use super::{AuditError, FILE_NAME, Tip, VerifyReport, check_line, scan};

/// zstd level of closed segments (the helper thread compresses them off the
/// append path). Level 1: on a 16 MiB segment of the runtime bench's route
/// records it compresses 34x at 1.8 GB/s where level 9 did 28.6x at 0.3 GB/s
/// (`zstd -b1 -e9`), and 132 against 127 bytes per routed decision in
/// `segment_tests::bytes_per_routed_decision`.
const LEVEL: i32 = 1;

/// One closed segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Closed {
    /// Its number, from 1.
    pub(super) number: u64,
    /// The file: `<stem>-<number>.jsonl.zst`, or `.jsonl` until compressed.
    pub(super) path: PathBuf,
}

impl Closed {
    pub(super) fn compressed(&self) -> bool {
        self.path.extension().is_some_and(|e| e == "zst")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory and the stem (`decisions` for `decisions.jsonl`) of an
/// active log file.
fn stem_of(active: &Path) -> (PathBuf, String) {
    let dir = active
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = active
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| FILE_NAME.to_string());
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name).to_string();
    (dir, stem)
}

/// The path of closed segment `number` of `active`, uncompressed.
pub(super) fn segment_path(active: &Path, number: u64) -> PathBuf {
    let (dir, stem) = stem_of(active);
    dir.join(format!("{stem}-{number:06}.jsonl"))
}

/// The closed segments of `active`, in order (one entry per number: the
/// compressed file when both are there).
pub(super) fn closed(active: &Path) -> Result<Vec<Closed>, AuditError> {
    let (dir, stem) = stem_of(active);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let prefix = format!("{stem}-");
    let mut out: Vec<Closed> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let (digits, zst) = if let Some(d) = rest.strip_suffix(".jsonl.zst") {
            (d, true)
        } else if let Some(d) = rest.strip_suffix(".jsonl") {
            (d, false)
        } else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(number) = digits.parse::<u64>() else {
            continue;
        };
        let path = entry.path();
        match out.iter_mut().find(|c| c.number == number) {
            Some(c) if zst => c.path = path,
            Some(_) => {}
            None => out.push(Closed { number, path }),
        }
    }
    out.sort_by_key(|c| c.number);
    Ok(out)
}

/// The bytes of a closed segment (decompressed). An uncompressed segment
/// that its compression removed meanwhile is read from its `.zst`.
pub(super) fn read_closed(c: &Closed) -> Result<Vec<u8>, AuditError> {
    let read_zst = |path: &Path| -> Result<Vec<u8>, AuditError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(file)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| AuditError::Broken {
                path: path.to_path_buf(),
                line: 0,
                seq: None,
                reason: format!("not a whole zstd stream: {e}"),
            })?;
        Ok(out)
    };
    if c.compressed() {
        return read_zst(&c.path);
    }
    match std::fs::read(&c.path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut zst = c.path.clone().into_os_string();
            zst.push(".zst");
            read_zst(Path::new(&zst))
        }
        Err(e) => Err(io_err(&c.path)(e)),
    }
}

/// Clears what a crash during rotation can leave: a `.tmp` of a compression
/// and an uncompressed segment whose `.zst` is complete. Returns the closed
/// segments still to compress.
pub(super) fn recover(active: &Path) -> Result<Vec<Closed>, AuditError> {
    let (dir, stem) = stem_of(active);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let prefix = format!("{stem}-");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".jsonl.zst.tmp") {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                tracing::warn!(path = %path.display(), "decision log: removed an unfinished segment compression");
            }
        }
    }
    let mut todo = Vec::new();
    for c in closed(active)? {
        let plain = segment_path(active, c.number);
        if c.compressed() && plain.exists() {
            std::fs::remove_file(&plain).map_err(io_err(&plain))?;
            tracing::warn!(path = %plain.display(), "decision log: removed a segment already compressed");
        } else if !c.compressed() {
            todo.push(c);
        }
    }
    Ok(todo)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Compresses closed segment `c` (uncompressed) to its `.zst`: written to a
/// `.tmp`, synced, renamed, then the uncompressed file removed.
pub(super) fn compress(c: &Closed) -> std::io::Result<PathBuf> {
    let dir = c
        .path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut zst = c.path.clone().into_os_string();
    zst.push(".zst");
    let zst = PathBuf::from(zst);
    let mut tmp = zst.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let input = File::open(&c.path)?;
        let out = File::create(&tmp)?;
        let mut enc = zstd::stream::write::Encoder::new(out, LEVEL)?;
        std::io::copy(&mut std::io::BufReader::new(input), &mut enc)?;
        let out = enc.finish()?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, &zst)?;
    sync_dir(&dir)?;
    std::fs::remove_file(&c.path)?;
    sync_dir(&dir)?;
    Ok(zst)
}

/// Closes the active file as segment `number` (a rename) and opens a new,
/// empty active file. `file` must be synced.
pub(super) fn rotate(active: &Path, number: u64) -> std::io::Result<(File, Closed)> {
    let closed = segment_path(active, number);
    std::fs::rename(active, &closed)?;
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(active)?;
    // Both renames are in the directory; a failed sync only delays their
    // durability (the records themselves are synced).
    if let Err(e) = sync_dir(&stem_of(active).0) {
        tracing::warn!(path = %active.display(), error = %e, "decision log: syncing the directory after closing a segment failed");
    }
    Ok((
        file,
        Closed {
            number,
            path: closed,
        },
    ))
}

/// Where the chain stands after the last closed segment (genesis without
/// one): its last line, checked on its own.
pub(super) fn closed_tip(segments: &[Closed]) -> Result<Tip, AuditError> {
    let Some(last) = segments.last() else {
        return Ok(Tip::genesis());
    };
    let bytes = read_closed(last)?;
    let whole = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let (line_no, line) = match whole.iter().rposition(|&b| b == b'\n') {
        Some(nl) => (
            whole[..nl].iter().filter(|&&b| b == b'\n').count() as u64 + 2,
            &whole[nl + 1..],
        ),
        None => (1, whole),
    };
    if !bytes.ends_with(b"\n") {
        return Err(AuditError::Broken {
            path: last.path.clone(),
            line: line_no,
            seq: None,
            reason: "a closed segment must end with a whole line".into(),
        });
    }
    let record = check_line(line).map_err(|(seq, reason)| AuditError::Broken {
        path: last.path.clone(),
        line: line_no,
        seq,
        reason,
    })?;
    Ok(Tip {
        seq: record.seq,
        hash: record.hash,
    })
}

/// A whole log read back: its closed segments and its active file as one
/// stream, with where each file starts (to name the file of a line).
#[derive(Debug, Clone, Default)]
pub struct LogBytes {
    /// Every line of every file, in order.
    pub bytes: Vec<u8>,
    /// Each file and the number of lines before it.
    files: Vec<(PathBuf, u64)>,
}

impl From<Vec<u8>> for LogBytes {
    /// A log held in memory as one stream (no files to name).
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            files: Vec::new(),
        }
    }
}

impl LogBytes {
    /// The file holding line `line` (1-based, of the whole stream) and the
    /// line's number in it.
    pub fn locate(&self, line: u64) -> Option<(&Path, u64)> {
        self.files
            .iter()
            .rev()
            .find(|(_, before)| *before < line)
            .map(|(p, before)| (p.as_path(), line - before))
    }

    /// Verifies the chain across every file; when there are closed
    /// segments, a broken record and a torn last line are numbered within
    /// their file, which [`Broken::file`] names.
    pub fn verify(&self) -> VerifyReport {
        let mut report = scan(&self.bytes).report;
        if self.files.len() < 2 {
            // One file: line numbers are already its own.
            return report;
        }
        if let Some(b) = &mut report.first_broken {
            if let Some((path, line)) = self.locate(b.line) {
                b.file = Some(path.display().to_string());
                b.line = line;
            }
        }
        if let Some(t) = report.torn_tail_line {
            report.torn_tail_line = self.locate(t).map(|(_, l)| l).or(Some(t));
        }
        report
    }
}

/// The log file for `path`: the path itself, or `path/decisions.jsonl` when
/// it is a directory.
pub fn log_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

/// Verifies the chain of the log at `path` across its segments. Errors only
/// when a file cannot be read; a broken chain is reported in
/// [`VerifyReport::first_broken`].
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    Ok(read_log(path)?.verify())
}

/// Reads the log at `path` (a data directory or its active file): every
/// closed segment, decompressed, then the active file.
pub fn read_log(path: &Path) -> Result<LogBytes, AuditError> {
    let active = log_path(path);
    let mut out = LogBytes::default();
    let mut lines = 0u64;
    for c in closed(&active)? {
        let bytes = read_closed(&c)?;
        out.files.push((c.path.clone(), lines));
        lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        out.bytes.extend_from_slice(&bytes);
    }
    let bytes = std::fs::read(&active).map_err(io_err(&active))?;
    out.files.push((active, lines));
    out.bytes.extend_from_slice(&bytes);
    Ok(out)
}
