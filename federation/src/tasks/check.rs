//! The offline check of a stopped controller's store (`federation store
//! check DATA_DIR`): opens a *copy* of `tasks.redb` with redb's integrity
//! check (so the original is never repaired or rolled back by looking at
//! it), decodes every record, and compares the store's marks with its
//! witness `tasks.hwm`; when the data directory holds the region's decision
//! log, it also lists the tasks the log records as stored here that the
//! store does not hold (what was lost). Never panics on a damaged file.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use federation_api::Task;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::store::{FILE, damaged, guarded, open_checked, replay_into};
use super::witness::{self, Mark};
use super::{AgentRecord, StoreError, state_name};

/// What the check found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The database file checked.
    pub file: String,
    /// True when nothing below is wrong.
    pub ok: bool,
    /// Everything wrong, one sentence each (empty when `ok`).
    pub problems: Vec<String>,
    /// Task records, decodable or not.
    pub records: u64,
    /// Decodable tasks by state.
    pub tasks_by_state: BTreeMap<String, u64>,
    /// Records that do not decode: (task id, why).
    pub undecodable: Vec<(String, String)>,
    /// Registered agents.
    pub agents: u64,
    /// The store's own marks, when it has them.
    pub store_mark: Option<Mark>,
    /// The witness's marks, when there is one.
    pub witness_mark: Option<Mark>,
    /// Tasks the decision log records as stored in this region that the
    /// store does not hold: how many, and the first 100 ids.
    pub missing_from_log: u64,
    /// The first of them.
    pub missing_ids: Vec<String>,
}

/// How many missing ids the report lists.
const MAX_LISTED: usize = 100;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const MARKS: TableDefinition<&str, u64> = TableDefinition::new("marks");

/// Removes the scratch copy when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `Err` when a process (a controller) holds the store at `path` open.
/// Anything else wrong with the file is left for the caller to find.
pub fn refuse_in_use(path: &Path) -> Result<(), StoreError> {
    let probe = guarded(path, || match redb::Builder::new().open_read_only(path) {
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Db(format!(
            "{}: in use by another process; stop its controller first",
            path.display()
        ))),
        _ => Ok(()),
    });
    match probe {
        Err(e @ StoreError::Db(_)) => Err(e),
        _ => Ok(()),
    }
}

/// Checks the store in `dir`. `Err` only when the check itself cannot run
/// (no store there, the store is in use, the copy fails); a damaged store
/// is an `Ok` report with problems.
pub fn check(dir: &Path) -> Result<CheckReport, StoreError> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Err(StoreError::Db(format!(
            "{}: no task store there (is DATA_DIR a controller's data directory?)",
            path.display()
        )));
    }
    // A running controller holds the file's lock; a copy of a file being
    // written would be torn, so refuse.
    refuse_in_use(&path)?;
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "federation-store-check-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| StoreError::Db(format!("creating {}: {e}", scratch.0.display())))?;
    let copy = scratch.0.join(FILE);
    std::fs::copy(&path, &copy).map_err(|e| {
        StoreError::Db(format!(
            "copying {} to {}: {e}",
            path.display(),
            copy.display()
        ))
    })?;

    let mut report = CheckReport {
        file: path.display().to_string(),
        ..Default::default()
    };
    let mut ids = HashSet::new();
    let scanned = guarded(&path, || scan(dir, &copy, &mut report, &mut ids));
    match scanned {
        Ok(()) => cross_check(dir, &ids, &mut report),
        Err(StoreError::Damaged { what, .. }) => {
            report
                .problems
                .push(format!("the database is damaged: {what}"));
        }
        Err(e) => report
            .problems
            .push(format!("the database cannot be read: {e}")),
    }
    match witness::read(dir) {
        Ok(w) => {
            report.witness_mark = w;
            if w.is_none() {
                report.problems.push(format!(
                    "{}: no witness (a store older than this version, or the file was removed); the controller writes one at its next start",
                    dir.join(witness::FILE).display()
                ));
            }
        }
        Err(e) => report
            .problems
            .push(format!("the witness cannot be read: {e}")),
    }
    if report.problems.is_empty() || report.store_mark.is_some() {
        let store = report.store_mark.unwrap_or(Mark {
            commit: 0,
            created: report.records,
        });
        if let Some(loss) = witness::compare(store, report.records, report.witness_mark) {
            report
                .problems
                .push(format!("acknowledged work was lost: {loss}"));
        }
    }
    for (id, why) in &report.undecodable {
        report
            .problems
            .push(format!("task record {id} does not decode: {why}"));
    }
    // A missing witness alone is not damage.
    report.ok = report.problems.iter().all(|p| p.contains(": no witness ("));
    Ok(report)
}

/// Tasks the decision log (`decisions.jsonl` in `dir`) says were stored in
/// its region, minus those a later record says were not, minus what the
/// store holds.
fn cross_check(dir: &Path, held: &HashSet<String>, report: &mut CheckReport) {
    if !dir.join("decisions.jsonl").is_file() {
        return;
    }
    let records = match crate::audit::show(dir, &crate::audit::Filter::default()) {
        Ok(r) => r,
        Err(e) => {
            report.problems.push(format!(
                "the decision log cannot be read to list lost tasks: {e}"
            ));
            return;
        }
    };
    let mut stored: BTreeSet<String> = BTreeSet::new();
    for r in &records {
        let e = &r.entry;
        let kind_stores =
            e.kind == crate::audit::kind::ROUTE || e.kind == crate::audit::kind::FORWARDED_IN;
        let Some(id) = e.task_id.as_ref() else {
            continue;
        };
        if !kind_stores || e.chosen_region.as_deref() != Some(r.region.as_str()) {
            continue;
        }
        if e.note
            .as_deref()
            .is_some_and(|n| n.starts_with("not stored"))
        {
            stored.remove(id);
        } else {
            stored.insert(id.clone());
        }
    }
    let missing: Vec<String> = stored.into_iter().filter(|id| !held.contains(id)).collect();
    if !missing.is_empty() {
        report.problems.push(format!(
            "{} tasks the decision log records as stored here are not in the store (first: {})",
            missing.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    report.missing_from_log = missing.len() as u64;
    report.missing_ids = missing.into_iter().take(MAX_LISTED).collect();
}

fn scan(
    dir: &Path,
    copy: &Path,
    report: &mut CheckReport,
    ids: &mut HashSet<String>,
) -> Result<(), StoreError> {
    let db = open_checked(copy).map_err(|e| match e {
        StoreError::Damaged { what, .. } => damaged(Path::new(&report.file), what),
        other => other,
    })?;
    // The copy as the store holds it: with the write-ahead log's frames
    // (the log itself is only read).
    if let Err(e) = replay_into(dir, &db) {
        report.problems.push(match e {
            StoreError::Damaged { path, what, .. } => format!("{path}: {what}"),
            other => format!("the write-ahead log cannot be applied: {other}"),
        });
    }
    let db_err = |e: &dyn std::fmt::Display| StoreError::Db(e.to_string());
    let txn = db.begin_read().map_err(|e| db_err(&e))?;
    match txn.open_table(TASKS) {
        Ok(table) => {
            for entry in table.iter().map_err(|e| db_err(&e))? {
                let (k, v) = entry.map_err(|e| db_err(&e))?;
                report.records += 1;
                let id = k.value().to_string();
                ids.insert(id.clone());
                match Task::decode(v.value()) {
                    Ok(t) if federation_api::TaskState::try_from(t.state).is_ok() => {
                        *report
                            .tasks_by_state
                            .entry(state_name(t.state()))
                            .or_default() += 1;
                    }
                    Ok(t) => report
                        .undecodable
                        .push((id, format!("unknown state {}", t.state))),
                    Err(e) => report.undecodable.push((id, e.to_string())),
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(&e)),
    }
    match txn.open_table(AGENTS) {
        Ok(table) => {
            for entry in table.iter().map_err(|e| db_err(&e))? {
                let (k, v) = entry.map_err(|e| db_err(&e))?;
                report.agents += 1;
                if let Err(e) = serde_json::from_slice::<AgentRecord>(v.value()) {
                    report
                        .problems
                        .push(format!("agent record {} does not decode: {e}", k.value()));
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(&e)),
    }
    match txn.open_table(MARKS) {
        Ok(table) => {
            let commit = table
                .get("commit")
                .map_err(|e| db_err(&e))?
                .map(|v| v.value());
            let created = table
                .get("created")
                .map_err(|e| db_err(&e))?
                .map(|v| v.value());
            if let (Some(commit), Some(created)) = (commit, created) {
                report.store_mark = Some(Mark { commit, created });
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(&e)),
    }
    Ok(())
}
