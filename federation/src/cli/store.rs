//! `federation store check|accept|recover`: the task store of a stopped
//! controller, offline; `federation store migrate URL`: a region's database
//! schema created or migrated with the owner's role.
//!
//! | command | exit 0 | exit 1 | exit 2 |
//! |---|---|---|---|
//! | `check DATA_DIR` | the store is sound | it is damaged or lost work (report on stdout) | it cannot be checked (no store, in use, I/O) |
//! | `accept DATA_DIR` | the witness now matches the store | the store is damaged | I/O, in use |
//! | `recover DATA_DIR --snapshot F…` | the store was rebuilt | a snapshot does not decrypt, decode or belong to the region | refused (a store is there), I/O |
//! | `migrate URL` | the schema is current | — | the database failed (exit 64: the URL, credentials, a newer schema, no rights) |

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::OutputFormat;
use crate::tasks::{self, StoreError, StoreOptions, TaskStore};

/// Store subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Verify a stopped controller's task store: every page checksum, every
    /// record, and the witness of acknowledged work.
    Check {
        /// The controller's data directory.
        data_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Accept a store that lost acknowledged work: reset its witness to what
    /// it holds, so the controller starts on it (the loss is logged).
    Accept {
        /// The controller's data directory.
        data_dir: PathBuf,
    },
    /// Rebuild a region's task store from the snapshots peers hold of it
    /// (`<peer data_dir>/snapshots/<region>.snap`), for a lost or damaged disk.
    Recover {
        /// The data directory to rebuild (empty, or see `--replace`).
        data_dir: PathBuf,
        /// A snapshot file of this region (repeat for several peers' copies).
        #[arg(long = "snapshot", required = true)]
        snapshots: Vec<PathBuf>,
        /// The snapshot key ring (`id:base64` lines).
        #[arg(long)]
        keys: PathBuf,
        /// The region being rebuilt; every snapshot must be of it.
        #[arg(long)]
        region: String,
        /// Move an existing store aside (`tasks.redb.damaged-<ms>`) first.
        #[arg(long)]
        replace: bool,
    },
    /// Create or migrate a region's database schema (node.store.backend:
    /// postgres) with the role that owns it, so that the controllers' role
    /// needs no right to change the schema.
    Migrate {
        /// The database as the schema's owner (a libpq URL).
        url: String,
    },
}

/// Runs a store subcommand.
pub fn run(cmd: StoreCommand) -> ExitCode {
    match cmd {
        StoreCommand::Check { data_dir, format } => check(&data_dir, format),
        StoreCommand::Accept { data_dir } => accept(&data_dir),
        StoreCommand::Recover {
            data_dir,
            snapshots,
            keys,
            region,
            replace,
        } => recover(&data_dir, &snapshots, &keys, &region, replace),
        StoreCommand::Migrate { url } => migrate(&url),
    }
}

fn migrate(url: &str) -> ExitCode {
    match crate::pg::Pg::connect(url, 2, "federation/store-migrate") {
        Ok(pg) => {
            super::output::say!(
                "PostgreSQL at {}: the schema is at version {}",
                pg.target(),
                crate::pg::known_version()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = if e.is_config() { 64 } else { 2 };
            super::fail(&anyhow::Error::new(e), code)
        }
    }
}

fn check(dir: &Path, format: OutputFormat) -> ExitCode {
    let report = match tasks::check(dir) {
        Ok(r) => r,
        Err(e) => return super::fail(&anyhow::Error::new(e), 2),
    };
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return super::fail(&anyhow::Error::new(e), 2),
        },
        OutputFormat::Text => {
            println!(
                "store {}: {}",
                report.file,
                if report.ok { "ok" } else { "DAMAGED" }
            );
            println!("  task records  {}", report.records);
            for (state, n) in &report.tasks_by_state {
                println!("    {state:<10} {n}");
            }
            println!("  agents        {}", report.agents);
            if let Some(m) = report.store_mark {
                println!("  store         commit {} created {}", m.commit, m.created);
            }
            if let Some(m) = report.witness_mark {
                println!("  witness       commit {} created {}", m.commit, m.created);
            }
            for p in &report.problems {
                println!("  problem: {p}");
            }
            if !report.missing_ids.is_empty() {
                println!(
                    "  lost tasks (per the decision log, {} in all):",
                    report.missing_from_log
                );
                for id in &report.missing_ids {
                    println!("    {id}");
                }
            }
            if !report.ok {
                println!(
                    "  to rebuild it from a peer's snapshot: federation store recover {} --region REGION --keys KEYRING --snapshot PEER_DATA_DIR/snapshots/REGION.snap --replace",
                    dir.display()
                );
            }
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn accept(dir: &Path) -> ExitCode {
    let options = StoreOptions {
        accept_loss: true,
        ..StoreOptions::default()
    };
    match TaskStore::open_with(dir, options) {
        Ok(store) => {
            let m = store.mark();
            drop(store);
            println!(
                "{}: witness reset to the store (commit {}, {} tasks)",
                dir.join(tasks::witness::FILE).display(),
                m.commit,
                m.created
            );
            ExitCode::SUCCESS
        }
        Err(e @ StoreError::Damaged { .. }) => super::fail(&anyhow::Error::new(e), 1),
        Err(e) => super::fail(&anyhow::Error::new(e), 2),
    }
}

fn recover(
    dir: &Path,
    snapshots: &[PathBuf],
    keys: &Path,
    region: &str,
    replace: bool,
) -> ExitCode {
    // Every snapshot first: nothing is moved or written unless all are good.
    let mut opened = Vec::new();
    for file in snapshots {
        match super::snapshot::open_file(file, keys) {
            Ok((header, body)) => {
                if header.source_region != region || body.source_region != region {
                    return super::fail(
                        &anyhow::anyhow!(
                            "{}: a snapshot of region `{}`, not `{region}`",
                            file.display(),
                            header.source_region
                        ),
                        1,
                    );
                }
                opened.push((file.clone(), body));
            }
            Err((code, e)) => return super::fail(&e, code),
        }
    }
    let db = dir.join(tasks::FILE);
    if db.exists() {
        if !replace {
            return super::fail(
                &anyhow::anyhow!(
                    "{}: a task store is already there; stop its controller, then pass --replace to move it aside",
                    db.display()
                ),
                2,
            );
        }
        if let Err(e) = tasks::refuse_in_use(&db) {
            return super::fail(&anyhow::Error::new(e), 2);
        }
        let stamp = crate::clock::now_unix_ms();
        for name in [tasks::FILE, tasks::WAL_FILE, tasks::witness::FILE] {
            let from = dir.join(name);
            if from.exists() {
                let to = dir.join(format!("{name}.damaged-{stamp}"));
                if let Err(e) = std::fs::rename(&from, &to) {
                    return super::fail(
                        &anyhow::anyhow!("moving {} to {}: {e}", from.display(), to.display()),
                        2,
                    );
                }
                eprintln!("moved {} to {}", from.display(), to.display());
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(r) => r,
        Err(e) => return super::fail(&anyhow::Error::new(e), 2),
    };
    let result = runtime.block_on(async {
        let store = TaskStore::open(dir)?;
        let mut lines = Vec::new();
        for (file, body) in opened {
            let (mut pending, mut results) = (0usize, 0usize);
            // Results first: a task finished since an older snapshot listed
            // it as pending stays finished.
            for t in body.results {
                results += usize::from(store.restore(t).await?);
            }
            for t in body.tasks {
                pending += usize::from(store.restore(t).await?);
            }
            lines.push(format!(
                "{}: epoch {} sequence {} taken at {} ms: {pending} pending and {results} finished tasks restored",
                file.display(),
                body.epoch,
                body.sequence,
                body.taken_unix_ms
            ));
        }
        store.flush().await?;
        Ok::<_, StoreError>((lines, store.counts()))
    });
    match result {
        Ok((lines, counts)) => {
            for l in lines {
                println!("{l}");
            }
            println!(
                "{}: rebuilt: {} queued, {} succeeded, {} failed, {} cancelled. Tasks acknowledged after the newest snapshot are lost, and tasks no peer may hold (residency) were never in a snapshot; tasks that finished after it will run again.",
                db.display(),
                counts.queued,
                counts.succeeded,
                counts.failed,
                counts.cancelled
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&anyhow::Error::new(e), 2),
    }
}
