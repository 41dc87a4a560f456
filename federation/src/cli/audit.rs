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
    connect: super::client::Connect,
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
    let rt = match super::client::runtime() {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, 2),
    };
    rt.block_on(async move {
        let channel = match super::client::channel(&args.connect).await {
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
                eprintln!("error ({:?}): {}", s.code(), s.message());
                return ExitCode::from(2);
            }
        };
        let mut out = String::new();
        for line in &reply.records {
            match args.format {
                OutputFormat::Json => out.push_str(line),
                OutputFormat::Text => match serde_json::from_str::<Record>(line) {
                    Ok(r) => out.push_str(&text_line(&r)),
                    Err(e) => {
                        let e =
                            anyhow::anyhow!("the controller sent a record that is not one: {e}");
                        return super::fail(&e, 2);
                    }
                },
            }
            out.push('\n');
        }
        print!("{out}");
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
            Ok(s) => println!("{s}"),
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
                println!(
                    "ok: {} records, chain intact, last hash {}",
                    report.records, report.last_hash
                );
            }
            ExitCode::SUCCESS
        }
        Some(b) => {
            let seq = b.seq.map_or_else(|| "?".to_string(), |s| s.to_string());
            let msg = format!("broken at line {} (seq {seq}): {}", b.line, b.reason);
            if format == OutputFormat::Text {
                println!("{msg}");
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
    let mut out = String::new();
    for r in &records {
        match format {
            OutputFormat::Json => match serde_json::to_string(r) {
                Ok(s) => out.push_str(&s),
                Err(e) => return super::fail(&e.into(), 2),
            },
            OutputFormat::Text => out.push_str(&text_line(r)),
        }
        out.push('\n');
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// `time  task  attributes  rule  region  outcome  reason`, one line.
fn text_line(r: &Record) -> String {
    let attributes = match &r.entry.attributes {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
        None => "-".to_string(),
    };
    let rule = r
        .rule_index()
        .map_or_else(|| "-".to_string(), |i| format!("rule={}", i + 1));
    let outcome = r.outcome().unwrap_or(r.entry.kind.as_str());
    let reason = r.reason().unwrap_or("").replace('\n', " ");
    format!(
        "{}  seq={}  {}  task={}  {}  {}  region={}  {}  {}",
        r.time,
        r.seq,
        r.entry.kind,
        r.entry.task_id.as_deref().unwrap_or("-"),
        if attributes.is_empty() {
            "-"
        } else {
            &attributes
        },
        rule,
        r.chosen_region().unwrap_or("-"),
        outcome,
        reason
    )
}
