//! One idempotency key, one task, across failover.
//!
//! * **Before a backup creates a task for a key** ([`check_key`]) it looks
//!   the key up in its copies of the regions before it in the rule's
//!   candidates (the primary first): a key found there names the original
//!   task, which is the answer (same content) or the reason for a refusal
//!   (other attributes or payload). A key found nowhere could still have
//!   been accepted after the last replicated change; the new task's decision
//!   record says so, and the key is remembered as *unverified*
//!   (`<data_dir>/unverified_keys.json`, kept [`TTL_MS`]).
//! * **When a copy is updated** ([`on_copy_updated`]) every unverified key
//!   of that source is looked up again. Another task under the same key is a
//!   duplicate pair, resolved once: if neither has started, the later is
//!   cancelled (here, or at the source through `RelayCancelTask`) with a
//!   reason naming the other; if one has started, the other is cancelled; if
//!   both ran, the pair is recorded in the decision log (`duplicate`) and
//!   counted (`federation_duplicate_tasks_total`).
//!
//! Owns `unverified_keys.json`; uses the store, the copies and the peer
//! client through their public APIs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use federation_api as api;
use serde::{Deserialize, Serialize};

use super::Replicator;
use super::Stats;
use super::copy::KnownKey;
use crate::audit::{Entry, kind};
use crate::clock::now_unix_ms;
use crate::policy::Policy;
use crate::{transport, wire};

/// How long an unverified key is watched for a duplicate.
pub const TTL_MS: i64 = 24 * 3600 * 1000;
/// Most unverified keys kept (oldest dropped first).
const MAX_UNVERIFIED: usize = 20_000;

/// What the copies say of a key before a task is created for it here.
#[derive(Debug, Clone)]
pub enum KeyCheck {
    /// No key, or no region comes before us in the rule: nothing to check.
    NotApplicable,
    /// The key names this task in our copy of `region`.
    Known {
        /// The region whose copy knows the key.
        region: String,
        /// The task.
        known: KnownKey,
    },
    /// Not in any copy of `regions`; `note` says what was checked.
    Unknown {
        /// The regions before us in the rule.
        regions: Vec<String>,
        /// For the decision record.
        note: String,
    },
}

/// Looks `key` up in our copies (`replication`'s) of the regions before us
/// (`here`) among the candidates of rule `rule_index`.
pub fn check_key(
    replication: &super::Replication,
    here: &str,
    policy: &Policy,
    rule_index: Option<usize>,
    key: &str,
) -> KeyCheck {
    if key.is_empty() {
        return KeyCheck::NotApplicable;
    }
    let Some(rule) = rule_index.and_then(|i| policy.rules.get(i)) else {
        return KeyCheck::NotApplicable;
    };
    let before: Vec<String> = rule
        .candidates()
        .take_while(|c| **c != here)
        .cloned()
        .collect();
    if before.is_empty() || !rule.candidates().any(|c| *c == here) {
        return KeyCheck::NotApplicable;
    }
    let mut checked = Vec::new();
    for region in &before {
        let found = replication.receiver.with_copy(region, |copy| {
            (copy.key(key), copy.sequence, copy.as_of_unix_ms)
        });
        match found {
            Some((Some(known), _, _)) => {
                return KeyCheck::Known {
                    region: region.clone(),
                    known,
                };
            }
            Some((None, sequence, as_of)) => checked.push(format!(
                "not in {}'s copy of {region} (as of {as_of} ms since the Unix epoch, sequence {sequence})",
                here
            )),
            None => checked.push(format!("{} holds no copy of {region}", here)),
        }
    }
    KeyCheck::Unknown {
        note: format!(
            "idempotency key `{}` could not be known: {}; a task accepted there after that under this key would be a duplicate, detected when its state arrives",
            wire::truncate(key, 128),
            checked.join("; ")
        ),
        regions: before,
    }
}

/// The refusal of a request reusing a key the copy of `region` knows for
/// other content.
pub fn refusal(region: &str, key: &str, known: &KnownKey, differs: &str) -> crate::error::Error {
    crate::error::Error::AlreadyExists(format!(
        "idempotency key `{}` already names task {} (accepted by {region}), whose {differs} differ from this request's",
        wire::truncate(key, 128),
        known.task_id
    ))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unverified {
    key: String,
    task_id: String,
    regions: Vec<String>,
    at_unix_ms: i64,
}

/// The unverified keys of one controller.
#[derive(Debug)]
pub struct Duplicates {
    path: PathBuf,
    keys: Mutex<Vec<Unverified>>,
    /// Serialises resolutions (one pass at a time).
    resolving: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Duplicates {
    /// Loads `<data_dir>/unverified_keys.json` (a damaged file is reported
    /// and started over).
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join("unverified_keys.json");
        let keys = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "unverified idempotency keys unreadable; starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Self {
            path,
            keys: Mutex::new(keys),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    /// Remembers that `task_id` was created here for `key`, which the
    /// copies of `regions` did not know.
    pub fn remember(&self, key: &str, task_id: &str, regions: Vec<String>) {
        let mut keys = lock(&self.keys);
        keys.push(Unverified {
            key: key.to_string(),
            task_id: task_id.to_string(),
            regions,
            at_unix_ms: now_unix_ms(),
        });
        self.persist(&mut keys);
    }

    fn persist(&self, keys: &mut Vec<Unverified>) {
        let cutoff = now_unix_ms() - TTL_MS;
        keys.retain(|k| k.at_unix_ms >= cutoff);
        if keys.len() > MAX_UNVERIFIED {
            let excess = keys.len() - MAX_UNVERIFIED;
            keys.drain(..excess);
        }
        let written = serde_json::to_vec(&*keys)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::atomic_file::write(&self.path, &bytes));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "persisting unverified idempotency keys failed");
        }
    }

    fn forget(&self, task_id: &str) {
        let mut keys = lock(&self.keys);
        let before = keys.len();
        keys.retain(|k| k.task_id != task_id);
        if keys.len() != before {
            self.persist(&mut keys);
        }
    }
}

/// How a pair ended.
enum Resolution {
    /// One of the two was cancelled (or already was); the other runs.
    OneRuns { cancelled: String, kept: String },
    /// Both ran.
    BothRan,
    /// Could not be settled now (the source did not answer): try again.
    Later,
}

fn started(state: api::TaskState, attempts: u32) -> bool {
    use api::TaskState::*;
    matches!(state, Leased | Succeeded | Failed) || (state != Cancelled && attempts > 0)
}

/// After our copy of `source` changed: looks every unverified key of
/// `source` up again and resolves the duplicate pairs found.
/// With `wait`, waits for a pass already running; else skips (the next
/// update starts another).
pub async fn on_copy_updated(rep: Arc<Replicator>, source: String, wait: bool) {
    let dups = &rep.replication.duplicates;
    let _one = if wait {
        dups.resolving.lock().await
    } else {
        match dups.resolving.try_lock() {
            Ok(g) => g,
            Err(_) => return,
        }
    };
    let pending: Vec<Unverified> = lock(&dups.keys)
        .iter()
        .filter(|k| k.regions.contains(&source))
        .cloned()
        .collect();
    for entry in pending {
        let known = rep
            .replication
            .receiver
            .with_copy(&source, |c| c.key(&entry.key))
            .flatten();
        let Some(known) = known else { continue };
        if known.task_id == entry.task_id {
            dups.forget(&entry.task_id);
            continue;
        }
        match resolve(&rep, &source, &entry, &known).await {
            Resolution::Later => {}
            Resolution::OneRuns { cancelled, kept } => {
                Stats::bump(&rep.replication.counters().duplicates_cancelled);
                let note = format!(
                    "duplicate tasks under idempotency key `{}`: {} (created by {} when {source} could not be asked) and {} (accepted by {source}); {cancelled} cancelled, {kept} runs",
                    wire::truncate(&entry.key, 128),
                    entry.task_id,
                    rep.region,
                    known.task_id
                );
                tracing::warn!(key = %wire::truncate(&entry.key, 128), %cancelled, %kept, "duplicate task cancelled");
                append(&rep, &kept, "duplicate_cancelled", note).await;
                dups.forget(&entry.task_id);
            }
            Resolution::BothRan => {
                Stats::bump(&rep.replication.counters().duplicate_tasks);
                let note = format!(
                    "duplicate tasks under idempotency key `{}` both ran: {} (created by {} when {source} could not be asked) and {} (accepted by {source})",
                    wire::truncate(&entry.key, 128),
                    entry.task_id,
                    rep.region,
                    known.task_id
                );
                tracing::error!(key = %wire::truncate(&entry.key, 128), ours = %entry.task_id, theirs = %known.task_id, "duplicate tasks both ran");
                append(&rep, &entry.task_id, "duplicate_ran", note).await;
                dups.forget(&entry.task_id);
            }
        }
    }
}

async fn append(rep: &Replicator, task_id: &str, outcome: &str, note: String) {
    let entry = Entry {
        outcome: Some(outcome.to_string()),
        ..Entry::new(kind::DUPLICATE).task(task_id).note(note)
    };
    if let Err(e) = rep.log.append(entry).await {
        tracing::error!(error = %e, "appending a duplicate record failed");
    }
}

async fn resolve(
    rep: &Replicator,
    source: &str,
    ours: &Unverified,
    theirs: &KnownKey,
) -> Resolution {
    let local = match rep.store.get(&ours.task_id) {
        Ok(Some(t)) => t,
        Ok(None) => {
            rep.replication.duplicates.forget(&ours.task_id);
            return Resolution::Later;
        }
        Err(e) => {
            tracing::error!(task_id = %ours.task_id, error = %e, "reading a possible duplicate failed");
            return Resolution::Later;
        }
    };
    let ours_started = started(local.state(), local.attempts);
    let theirs_started = started(theirs.state, 0);
    if local.state() == api::TaskState::Cancelled && !ours_started {
        return Resolution::OneRuns {
            cancelled: local.task_id,
            kept: theirs.task_id.clone(),
        };
    }
    if theirs.state == api::TaskState::Cancelled {
        return Resolution::OneRuns {
            cancelled: theirs.task_id.clone(),
            kept: local.task_id,
        };
    }
    let cancel_ours = match (ours_started, theirs_started) {
        (true, true) => return Resolution::BothRan,
        (false, true) => true,
        (true, false) => false,
        // Neither started: the later one goes.
        (false, false) => {
            (local.created_unix_ms, local.task_id.as_str())
                > (theirs.created_unix_ms, theirs.task_id.as_str())
        }
    };
    let key = wire::truncate(&ours.key, 128);
    if cancel_ours {
        let reason = format!(
            "duplicate of task {} under idempotency key `{key}` (accepted by {source}); cancelled so that one runs",
            theirs.task_id
        );
        match rep.store.cancel(&local.task_id, &reason).await {
            // Cancelled now, or already (by an earlier resolution).
            Ok(c) if c.cancelled || c.task.state() == api::TaskState::Cancelled => {
                Resolution::OneRuns {
                    cancelled: local.task_id,
                    kept: theirs.task_id.clone(),
                }
            }
            Ok(_) => {
                if theirs_started {
                    Resolution::BothRan
                } else {
                    // Ours finished meanwhile: theirs goes instead.
                    cancel_theirs(rep, source, &local.task_id, theirs, &key).await
                }
            }
            Err(e) => {
                tracing::error!(task_id = %local.task_id, error = %e, "cancelling a duplicate failed");
                Resolution::Later
            }
        }
    } else {
        cancel_theirs(rep, source, &local.task_id, theirs, &key).await
    }
}

async fn cancel_theirs(
    rep: &Replicator,
    source: &str,
    ours: &str,
    theirs: &KnownKey,
    key: &str,
) -> Resolution {
    let Ok(mut client) = rep.peers.client(source) else {
        return Resolution::Later;
    };
    let req = api::CancelTaskRequest {
        task_id: theirs.task_id.clone(),
        reason: format!(
            "duplicate of task {ours} under idempotency key `{key}` (created by {} while {source} could not be asked); cancelled so that one runs",
            rep.region
        ),
    };
    let deadline = rep.timers.forward_timeout;
    let call = client.relay_cancel_task(transport::with_deadline(req, deadline));
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(resp)) => {
            let t = resp.into_inner().task.unwrap_or_default();
            // Cancelled now or before, never leased: only ours runs.
            if t.state() == api::TaskState::Cancelled && t.attempts == 0 {
                Resolution::OneRuns {
                    cancelled: theirs.task_id.clone(),
                    kept: ours.to_string(),
                }
            } else {
                Resolution::BothRan
            }
        }
        Ok(Err(status)) => {
            tracing::debug!(%source, code = ?status.code(), "cancelling a duplicate there failed; retried at the next update");
            Resolution::Later
        }
        Err(_) => Resolution::Later,
    }
}
