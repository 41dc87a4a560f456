//! `federation audit verify|show`: the decision log for auditors. Reads the
//! log only (never opens it for writing, so it is safe next to a running
//! controller); the format and the hash recipe are in [`crate::audit`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::OutputFormat;
use crate::audit::{self, AuditError, Filter, Record};

/// Audit subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; names the first broken record. Exit 0 when
    /// intact, 1 when broken, 2 when the log cannot be read.
    Verify {
        /// The controller's data directory (or the log file).
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Print the decisions that match every given filter.
    Show {
        /// The controller's data directory (or the log file).
        dir: PathBuf,
        /// Only this task id.
        #[arg(long)]
        task: Option<String>,
        /// Only this rule, numbered from 1 in file order.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rule: Option<u64>,
        /// Only decisions that chose this region.
        #[arg(long)]
        region: Option<String>,
        /// Only this outcome.
        #[arg(long, value_parser = ["routed", "failover", "rejected"])]
        outcome: Option<String>,
        /// Output format: one line per record, or JSON lines.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
}

/// Arguments of `decisions`: the decision log of a running controller, over
/// gRPC (auditor or operator credentials).
#[derive(Debug, clap::Args)]
pub struct DecisionsArgs {
    #[command(flatten)]
    connect: super::connect::Connect,
    /// Only this task id.
    #[arg(long)]
    task: Option<String>,
    /// Only this rule, numbered from 1 in file order.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rule: Option<u32>,
    /// Only decisions that chose this region.
    #[arg(long)]
    region: Option<String>,
    /// Only this outcome.
    #[arg(long, value_parser = ["routed", "failover", "rejected"])]
    outcome: Option<String>,
    /// The most recent this many matches (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Output format: one line per record, or JSON lines.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// `federation decisions`: prints the matching records of a controller's
/// decision log. Exit 0 with an intact chain, 1 when the controller reports
/// it broken, 2 when the call fails.
pub fn decisions(args: DecisionsArgs) -> ExitCode {
    super::client::run_command(async move {
        let channel = match super::connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin =
            federation_api::federation_admin_client::FederationAdminClient::new(channel);
        let reply = admin
            .list_decisions(federation_api::ListDecisionsRequest {
                task_id: args.task.unwrap_or_default(),
                rule: args.rule.unwrap_or(0),
                region: args.region.unwrap_or_default(),
                outcome: args.outcome.unwrap_or_default(),
                limit: args.limit,
            })
            .await;
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                eprintln!("{}", super::connect::describe(&s, &args.connect).await);
                return ExitCode::from(2);
            }
        };
        let out = match args.format {
            OutputFormat::Json => {
                let mut out = String::new();
                for line in &reply.records {
                    out.push_str(line);
                    out.push('\n');
                }
                out
            }
            OutputFormat::Text => {
                let mut records = Vec::with_capacity(reply.records.len());
                for line in &reply.records {
                    match serde_json::from_str::<Record>(line) {
                        Ok(r) => records.push(r),
                        Err(e) => {
                            let e = anyhow::anyhow!(
                                "the controller sent a record that is not one: {e}"
                            );
                            return super::fail(&e, 2);
                        }
                    }
                }
                records_table(&records)
            }
        };
        super::output::emit(&out);
        eprintln!(
            "{} of {} matching records; log has {} records, chain {}, last hash {}",
            reply.records.len(),
            reply.matched,
            reply.total_records,
            if reply.chain_intact {
                "intact".to_string()
            } else {
                format!("BROKEN ({})", reply.chain_error)
            },
            reply.last_hash
        );
        if reply.chain_intact {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    })
}

/// Runs an audit subcommand.
pub fn run(cmd: AuditCommand) -> ExitCode {
    match cmd {
        AuditCommand::Verify { dir, format } => verify(&dir, format),
        AuditCommand::Show {
            dir,
            task,
            rule,
            region,
            outcome,
            format,
        } => {
            let filter = Filter {
                task_id: task,
                rule,
                region,
                outcome,
            };
            show(&dir, &filter, format)
        }
    }
}

fn verify(dir: &Path, format: OutputFormat) -> ExitCode {
    let path = audit::log_path(dir);
    let report = match audit::verify(&path)
        .with_context(|| format!("cannot read the decision log {}", path.display()))
    {
        Ok(r) => r,
        Err(e) => return super::fail(&e, 2),
    };
    if format == OutputFormat::Json {
        match serde_json::to_string(&report) {
            Ok(s) => super::output::say!("{s}"),
            Err(e) => return super::fail(&e.into(), 2),
        }
    }
    if let Some(line) = report.torn_tail_line {
        eprintln!(
            "warning: line {line} is incomplete (a write torn by a crash, never acknowledged); \
             it is not part of the chain and the controller truncates it at its next start"
        );
    }
    match &report.first_broken {
        None => {
            if format == OutputFormat::Text {
                super::output::say!(
                    "ok: {} records, chain intact, last hash {}",
                    report.records,
                    report.last_hash
                );
            }
            ExitCode::SUCCESS
        }
        Some(b) => {
            let seq = b.seq.map_or_else(|| "?".to_string(), |s| s.to_string());
            let msg = format!("broken at line {} (seq {seq}): {}", b.line, b.reason);
            if format == OutputFormat::Text {
                super::output::say!("{msg}");
            } else {
                eprintln!("{msg}");
            }
            ExitCode::from(1)
        }
    }
}

fn show(dir: &Path, filter: &Filter, format: OutputFormat) -> ExitCode {
    let path = audit::log_path(dir);
    let records = match audit::show(&path, filter) {
        Ok(r) => r,
        Err(e @ AuditError::Broken { .. }) => {
            let e = anyhow::Error::new(e)
                .context("the decision log is damaged; run `federation audit verify`");
            return super::fail(&e, 1);
        }
        Err(e) => {
            let e = anyhow::Error::new(e).context("cannot read the decision log");
            return super::fail(&e, 2);
        }
    };
    let out = match format {
        OutputFormat::Json => {
            let mut out = String::new();
            for r in &records {
                match serde_json::to_string(r) {
                    Ok(s) => out.push_str(&s),
                    Err(e) => return super::fail(&e.into(), 2),
                }
                out.push('\n');
            }
            out
        }
        OutputFormat::Text => records_table(&records),
    };
    super::output::emit(&out);
    ExitCode::SUCCESS
}

/// The records as a table: time, seq, kind, task, attributes, rule, chosen
/// region, outcome, reason (one line each; newlines in reasons become
/// spaces).
fn records_table(records: &[Record]) -> String {
    let mut t = super::output::table(&[
        "TIME",
        "SEQ",
        "KIND",
        "TASK",
        "ATTRIBUTES",
        "RULE",
        "REGION",
        "OUTCOME",
        "REASON",
    ]);
    for r in records {
        let attributes = match &r.entry.attributes {
            Some(Value::Object(map)) if !map.is_empty() => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            Some(Value::Object(_)) | None => "-".to_string(),
            Some(other) => other.to_string(),
        };
        let outcome = r.outcome().unwrap_or("-");
        let reason = r
            .reason()
            .or(r.entry.note.as_deref())
            .unwrap_or("")
            .replace('\n', " ");
        t.add_row(vec![
            r.time.clone(),
            r.seq.to_string(),
            r.entry.kind.clone(),
            r.entry.task_id.clone().unwrap_or_else(|| "-".to_string()),
            attributes,
            r.rule_index()
                .map_or_else(|| "-".to_string(), |i| (i + 1).to_string()),
            r.chosen_region().unwrap_or("-").to_string(),
            outcome.to_string(),
            reason,
        ]);
    }
    super::output::render(&t)
}
