//! `federation policy replay`: re-decide recorded route decisions under a
//! proposed policy ([`crate::audit::replay`]) and report what would change.
//! Reads logs from data directories or files, or a running controller's log
//! over gRPC (`ListDecisions`, its most recent 1000 records).
//!
//! Exit status like `policy diff`: 0 no decision would change, 1 some would
//! (or would break a requirement, or could not be replayed), 2 when a log or
//! the policy cannot be used.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};

use super::OutputFormat;
use crate::audit::replay::{self, ReplayReport, Sourced};
use crate::audit::{Filter, Record};
use crate::policy::Policy;

/// Arguments of `policy replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The proposed policy (a federation file).
    pub new: PathBuf,
    /// A decision log: a controller's data directory or the file
    /// (repeatable; give the owner regions' logs too, so values an entry
    /// region withheld can be replayed).
    #[arg(long = "log", value_name = "DIR|FILE")]
    pub logs: Vec<PathBuf>,
    /// Only decisions at or after this time: RFC 3339 (`2026-12-01T10:00:00Z`)
    /// or an age (`24h`, `7d`).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    /// Read the log of a running controller instead (used when no `--log`
    /// is given): its most recent 1000 records.
    #[command(flatten)]
    pub connect: super::connect::Connect,
}

/// Runs `policy replay`.
pub fn run(args: ReplayArgs) -> ExitCode {
    match replay_cmd(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => super::fail(&e, 2),
    }
}

fn since_ms(t: &str) -> anyhow::Result<i64> {
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| anyhow!("--since {t}: before 1970"))?
            .as_millis();
        return Ok(i64::try_from(ms).unwrap_or(i64::MAX));
    }
    let age = crate::config::parse_duration(t)
        .map_err(|e| anyhow!("--since {t}: neither an RFC 3339 time nor an age like 24h ({e})"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = now.saturating_sub(age).as_millis();
    Ok(i64::try_from(at).unwrap_or(i64::MAX))
}

fn from_controller(connect: &super::connect::Connect) -> anyhow::Result<(Vec<Sourced>, String)> {
    let address = connect.address()?.to_string();
    let rt = super::client::runtime()?;
    let reply = rt.block_on(async {
        let channel = super::connect::channel(connect)?;
        let mut admin =
            federation_api::federation_admin_client::FederationAdminClient::new(channel);
        let reply = admin
            .list_decisions(federation_api::ListDecisionsRequest {
                limit: 1000,
                ..Default::default()
            })
            .await;
        match reply {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(anyhow!("{}", super::connect::describe(&s, connect).await)),
        }
    })?;
    let mut out = Vec::with_capacity(reply.records.len());
    for line in &reply.records {
        let record: Record = serde_json::from_str(line)
            .with_context(|| format!("{address} sent a record that is not one"))?;
        out.push(Sourced {
            source: address.clone(),
            record,
        });
    }
    let note = format!(
        "{address}: {} of its {} records{}",
        reply.records.len(),
        reply.total_records,
        if reply.chain_intact {
            String::new()
        } else {
            format!("; its chain is BROKEN ({})", reply.chain_error)
        }
    );
    Ok((out, note))
}

fn replay_cmd(args: ReplayArgs) -> anyhow::Result<u8> {
    let policy = Policy::load_file(&args.new)
        .map_err(|e| anyhow!("{}: policy cannot be used:\n{e}", args.new.display()))?;
    let since = args.since.as_deref().map(since_ms).transpose()?;
    let mut records = Vec::new();
    let mut notes = Vec::new();
    if args.logs.is_empty() {
        let (r, note) = from_controller(&args.connect)
            .context("give --log DIR, or --controller ADDR (FEDERATION_ADDR)")?;
        records = r;
        notes.push(note);
    }
    for log in &args.logs {
        let read = crate::audit::show(log, &Filter::default())
            .with_context(|| format!("reading the decision log {}", log.display()))?;
        notes.push(format!("{}: {} records", log.display(), read.len()));
        records.extend(read.into_iter().map(|record| Sourced {
            source: log.display().to_string(),
            record,
        }));
    }
    let report = replay::replay(&records, &policy, since);
    let out = match args.format {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&serde_json::json!({
                "policy": args.new,
                "sources": notes,
                "report": report,
            }))
            .context("serializing the report")?;
            s.push('\n');
            s
        }
        OutputFormat::Text => text(&report, &notes),
    };
    super::output::emit(&out);
    Ok(u8::from(report.has_changes()))
}

fn text(r: &ReplayReport, notes: &[String]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for n in notes {
        let _ = writeln!(out, "read {n}");
    }
    let _ = writeln!(
        out,
        "{} route decisions: {} replayed ({} with withheld values from the owner's record, {} with a region state not recorded, assumed alive), {} unchanged, {} would change, {} not replayable",
        r.decisions,
        r.replayed,
        r.joined,
        r.assumed_states,
        r.unchanged,
        r.changed,
        r.not_replayed.len()
    );
    if !r.groups.is_empty() {
        let _ = writeln!(out, "\nchanges by rule, data class and destination:");
        let mut t = super::output::table(&[
            "COUNT",
            "OLD RULE",
            "NEW RULE",
            "DATA CLASS",
            "FROM",
            "TO",
            "EXAMPLES",
        ]);
        for g in &r.groups {
            t.add_row(vec![
                g.count.to_string(),
                g.old_rule.clone(),
                g.new_rule.clone(),
                g.data_class.clone(),
                g.old_destination.clone(),
                g.new_destination.clone(),
                g.examples
                    .iter()
                    .map(|e| {
                        e.task_id
                            .clone()
                            .unwrap_or_else(|| format!("seq {}", e.seq))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
        out.push_str(&super::output::render(&t));
        for g in &r.groups {
            if let Some(e) = g.examples.first() {
                let _ = writeln!(
                    out,
                    "  e.g. {} ({} seq {}): {}",
                    e.task_id.as_deref().unwrap_or("-"),
                    e.source,
                    e.seq,
                    e.new_reason
                );
            }
        }
    }
    if !r.breaches.is_empty() {
        let _ = writeln!(out, "\nplacements that break what the old decision kept:");
        let mut t = super::output::table(&["KIND", "TAGS", "FROM", "TO", "TASK", "LOG", "SEQ"]);
        for b in &r.breaches {
            t.add_row(vec![
                b.kind.to_string(),
                b.tags.join(", "),
                b.old_destination.clone(),
                b.new_destination.clone(),
                b.example.task_id.clone().unwrap_or_else(|| "-".into()),
                b.example.source.clone(),
                b.example.seq.to_string(),
            ]);
        }
        out.push_str(&super::output::render(&t));
    }
    if !r.not_replayed.is_empty() {
        let _ = writeln!(out, "\nnot replayable:");
        for n in &r.not_replayed {
            let _ = writeln!(
                out,
                "  {} ({} seq {}): {}",
                n.task_id.as_deref().unwrap_or("-"),
                n.source,
                n.seq,
                n.why
            );
        }
    }
    out
}
