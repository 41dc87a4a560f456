//! Chain verification: one line's layout and hash, the link to the record
//! before it, and a scan of a whole log that names the first broken record.

use serde::Serialize;
use serde_json::Value;

use super::{GENESIS_HASH, HASH_SEP, Record, sha256_hex};

/// The `seq` of a line, read without parsing the rest of it (the last
/// `"seq":` key: a record's own fields sort after anything nested).
pub(super) fn seq_of(line: &[u8]) -> Option<u64> {
    let key = b"\"seq\":";
    let at = line.windows(key.len()).rposition(|w| w == key)? + key.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Checks one line on its own: JSON, layout, hash. Returns the record.
pub(super) fn check_line(line: &[u8]) -> Result<Record, (Option<u64>, String)> {
    let record: Record = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            let seq = serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|v| v.get("seq").and_then(Value::as_u64));
            let reason = if line.is_empty() {
                "bad JSON: empty line".to_string()
            } else {
                format!("bad JSON: {e}")
            };
            return Err((seq, reason));
        }
    };
    let seq = Some(record.seq);
    let suffix = format!("{HASH_SEP}{}\"}}", record.hash);
    let valid_hex = record.hash.len() == 64
        && record
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid_hex || !line.ends_with(suffix.as_bytes()) {
        return Err((
            seq,
            "malformed record: \"hash\" must be the last key and 64 lower-case hex digits".into(),
        ));
    }
    let mut body = line[..line.len() - suffix.len()].to_vec();
    body.push(b'}');
    let computed = sha256_hex(&body);
    if computed != record.hash {
        return Err((
            seq,
            format!(
                "hash mismatch: the record was altered (stored {}, computed {})",
                short(&record.hash),
                short(&computed)
            ),
        ));
    }
    Ok(record)
}

pub(super) fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Where the chain stands after a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tip {
    pub(super) seq: u64,
    pub(super) hash: String,
}

impl Tip {
    pub(super) fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }
}

/// Checks that `record` follows `tip`.
pub(super) fn check_link(tip: &Tip, record: &Record) -> Result<(), String> {
    let expected = tip.seq + 1;
    if record.seq != expected {
        let what = if record.seq > expected {
            "records are missing before it (deleted) or out of order"
        } else {
            "it repeats or goes back (inserted or reordered)"
        };
        return Err(format!(
            "seq {} where {expected} was expected: {what}",
            record.seq
        ));
    }
    if record.prev_hash != tip.hash {
        return Err(format!(
            "prev_hash {} does not match the previous record's hash {}: a record was inserted, \
             deleted or replaced",
            short(&record.prev_hash),
            short(&tip.hash)
        ));
    }
    Ok(())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The file holding the record (a closed segment or the active file),
    /// when the log has closed segments; absent for a log of one file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based line number (in `file`, when named).
    pub line: u64,
    /// The record's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records that verified (before the first broken one).
    pub records: u64,
    /// The first broken record, if any.
    pub first_broken: Option<Broken>,
    /// The hash of the last good record (64 zeros for an empty log).
    pub last_hash: String,
    /// Line number of an incomplete last line (no newline: a write torn by a
    /// crash, never acknowledged); it is not part of the chain.
    pub torn_tail_line: Option<u64>,
}

impl VerifyReport {
    /// True when the chain is intact.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// What a scan of the file found.
pub(super) struct Scan {
    pub(super) report: VerifyReport,
    pub(super) tip: Tip,
    /// Byte length of the complete, verified lines.
    pub(super) good_len: u64,
    /// A torn last line that is nonetheless a complete, valid next record.
    pub(super) tail_record_ok: bool,
}

pub(super) fn scan(bytes: &[u8]) -> Scan {
    scan_from(bytes, Tip::genesis())
}

/// [`scan`] of bytes that continue the chain after `tip` (the active file
/// after the closed segments).
pub(super) fn scan_from(bytes: &[u8], start: Tip) -> Scan {
    let mut tip = start;
    let mut offset = 0usize;
    let mut line_no = 0u64;
    let mut report = VerifyReport {
        records: 0,
        first_broken: None,
        last_hash: tip.hash.clone(),
        torn_tail_line: None,
    };
    let mut tail_record_ok = false;
    // Each iteration consumes one line, so the loop is bounded by the file.
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        if !complete {
            report.torn_tail_line = Some(line_no);
            tail_record_ok = check_line(line)
                .ok()
                .is_some_and(|r| check_link(&tip, &r).is_ok());
            break;
        }
        let checked = check_line(line).and_then(|record| {
            check_link(&tip, &record)
                .map(|()| record.clone())
                .map_err(|reason| (Some(record.seq), reason))
        });
        match checked {
            Ok(record) => {
                tip = Tip {
                    seq: record.seq,
                    hash: record.hash,
                };
                report.records += 1;
                offset += line.len() + 1;
            }
            Err((seq, reason)) => {
                report.first_broken = Some(Broken {
                    file: None,
                    line: line_no,
                    seq,
                    reason,
                });
                break;
            }
        }
    }
    report.last_hash = tip.hash.clone();
    Scan {
        report,
        tip,
        good_len: offset as u64,
        tail_record_ok,
    }
}

/// Verifies the chain of a log held in memory (what [`verify`] does after
/// reading the file; the fuzz target drives this).
pub fn verify_bytes(bytes: &[u8]) -> VerifyReport {
    scan(bytes).report
}
