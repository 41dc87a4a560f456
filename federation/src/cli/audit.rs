//! `federation audit verify|show|export`: the decision log for auditors.
//! Reads the log only (never opens it for writing, so it is safe next to a
//! running controller), from a data directory's file or, given a
//! `postgres://` URL, from the region's database (`node.store.backend:
//! postgres`), whose records `export` writes in the file's JSON-lines
//! format; the format and the hash recipe are in [`crate::audit`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::OutputFormat;
use crate::audit::anchor::{self, HeadCheck, LogHead};
use crate::audit::{self, AuditError, Filter, Record};

/// Audit subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain (names the first broken record) and the log's
    /// anchors: the head recorded in the data directory's task store and,
    /// with `--witness`, the heads peers heard the region advertise; a log
    /// shorter than or different from an anchor (deleted tail records, an
    /// emptied or replaced file) fails. Exit 0 when intact, 1 when broken or
    /// contradicted by an anchor, 2 when the log or a witness cannot be read.
    Verify {
        /// The controller's data directory (or the log file), or the
        /// region's database: a `postgres://` URL (then `--region` names the
        /// log's region when the database holds several).
        dir: PathBuf,
        /// A peer's witness of this region's log head: the peer's data
        /// directory (its `witnesses.json`), that file itself, or a running
        /// controller's address (asked over gRPC with the FEDERATION_CA /
        /// FEDERATION_CERT / FEDERATION_KEY / FEDERATION_TOKEN credentials;
        /// an auditor or operator identity). Repeatable.
        #[arg(long = "witness", value_name = "DIR|FILE|ADDR")]
        witnesses: Vec<String>,
        /// The log's region, for matching witnesses when the log itself is
        /// empty (otherwise read from its records).
        #[arg(long)]
        region: Option<String>,
        /// Ask witness controllers in plaintext (development only).
        #[arg(long)]
        insecure: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Print the decisions that match every given filter.
    Show {
        /// The controller's data directory (or the log file), or the
        /// region's database: a `postgres://` URL.
        dir: PathBuf,
        /// With a database: the log's region, when it holds several.
        #[arg(long)]
        log_region: Option<String>,
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
    /// Compute the keyed digest of a candidate attribute value, and with
    /// `--log` find the records whose withheld value it is (records written
    /// outside the region holding a task keep digests, not values). Exit 0
    /// when a record matches (or no log is given), 1 when none does, 2 on
    /// bad input.
    Digest {
        /// The audit key as given to auditors: a file with its
        /// `id:base64-key[:audit]` line.
        #[arg(long = "audit-key", value_name = "FILE", conflicts_with = "keys")]
        audit_key: Option<PathBuf>,
        /// A whole snapshot key ring: its `:audit` line, else the key derived
        /// from its current snapshot key.
        #[arg(long, value_name = "FILE", required_unless_present = "audit_key")]
        keys: Option<PathBuf>,
        /// The attribute's name.
        #[arg(long)]
        attribute: String,
        /// The candidate value: a string, or with `--json` a JSON number,
        /// boolean or list (`--value 42 --json`).
        #[arg(long)]
        value: String,
        /// Read `--value` as JSON.
        #[arg(long)]
        json: bool,
        /// A decision log to search: a data directory or the file (repeatable).
        #[arg(long = "log", value_name = "DIR|FILE")]
        logs: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Write a region's decision log from its database (a `postgres://`
    /// URL) as the JSON-lines file a file-backed controller writes, byte for
    /// byte the records' lines: `audit verify FILE` and an auditor's own
    /// checker read it as they read `decisions.jsonl`. Exit 0 when written,
    /// 2 when the database cannot be read.
    Export {
        /// The region's database, a `postgres://` URL.
        url: String,
        /// The log's region, when the database holds several.
        #[arg(long)]
        region: Option<String>,
        /// Where to write (stdout when unset).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// True when `source` names a database rather than a file.
fn is_database(source: &Path) -> bool {
    let s = source.to_string_lossy();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// A region's log read from its database: the JSON-lines bytes, the region
/// and the chain head the database holds.
pub(super) struct FromDatabase {
    pub(super) bytes: Vec<u8>,
    region: String,
    head: Option<(u64, String)>,
    target: String,
}

/// Reads `region`'s log (the only one, when `None`) from the database at
/// `url`, without changing anything there.
pub(super) fn read_database(url: &str, region: Option<&str>) -> anyhow::Result<FromDatabase> {
    let pg = crate::pg::Pg::connect_read_only(url, "federation-audit")?;
    let target = pg.target().to_string();
    let pg2 = pg.clone();
    let wanted = region.map(str::to_string);
    let (bytes, region, head) = pg.block(async move {
        let region = match wanted {
            Some(r) => r,
            None => {
                let regions = audit::postgres::regions(&pg2).await?;
                match regions.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(crate::pg::PgError::Url(format!(
                            "{} holds no decision log yet",
                            pg2.target()
                        )));
                    }
                    many => {
                        return Err(crate::pg::PgError::Url(format!(
                            "{} holds the logs of {}: name one with --region",
                            pg2.target(),
                            many.join(", ")
                        )));
                    }
                }
            }
        };
        let bytes = audit::postgres::export(&pg2, &region).await?;
        let head = audit::postgres::head(&pg2, &region).await?;
        Ok((bytes, region, head))
    })?;
    Ok(FromDatabase {
        bytes,
        region,
        head,
        target,
    })
}

fn export(url: &str, region: Option<&str>, output: Option<&Path>) -> ExitCode {
    let db = match read_database(url, region) {
        Ok(d) => d,
        Err(e) => return super::fail(&e.context("cannot read the decision log"), 2),
    };
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &db.bytes) {
                let e = anyhow::Error::new(e).context(format!("writing {}", path.display()));
                return super::fail(&e, 2);
            }
            let records = db.bytes.iter().filter(|&&b| b == b'\n').count();
            eprintln!(
                "{records} records of {} from {} written to {}",
                db.region,
                db.target,
                path.display()
            );
        }
        None => super::output::emit(&String::from_utf8_lossy(&db.bytes)),
    }
    ExitCode::SUCCESS
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
        AuditCommand::Verify {
            dir,
            witnesses,
            region,
            insecure,
            format,
        } => verify(&dir, &witnesses, region, insecure, format),
        AuditCommand::Export {
            url,
            region,
            output,
        } => export(&url, region.as_deref(), output.as_deref()),
        AuditCommand::Show {
            dir,
            log_region,
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
            show(&dir, log_region.as_deref(), &filter, format)
        }
        AuditCommand::Digest {
            audit_key,
            keys,
            attribute,
            value,
            json,
            logs,
            format,
        } => match digest(
            audit_key.as_deref(),
            keys.as_deref(),
            &attribute,
            &value,
            json,
            &logs,
            format,
        ) {
            Ok(code) => ExitCode::from(code),
            Err(e) => super::fail(&e, 2),
        },
    }
}

/// One record that concerns the candidate value.
#[derive(Debug, serde::Serialize)]
struct DigestMatch {
    log: String,
    seq: u64,
    kind: String,
    region: String,
    task_id: Option<String>,
    /// `digest` (withheld, the digest matches) or `value` (kept as is).
    how: &'static str,
}

fn digest(
    audit_key: Option<&Path>,
    keys: Option<&Path>,
    attribute: &str,
    value: &str,
    json: bool,
    logs: &[PathBuf],
    format: OutputFormat,
) -> anyhow::Result<u8> {
    use crate::audit::key::AuditKey;
    let key = match (audit_key, keys) {
        (Some(path), _) => AuditKey::load_file(path)?,
        (None, Some(path)) => {
            let ring = crate::replication::KeyRing::load_file(path)?;
            AuditKey::of_ring(&ring)
                .ok_or_else(|| anyhow::anyhow!("{}: no key in the ring", path.display()))?
        }
        (None, None) => anyhow::bail!("give --audit-key FILE or --keys FILE"),
    };
    let candidate = if json {
        super::policy::parse_attr(&format!("{attribute}:={value}"))?.1
    } else {
        crate::policy::AttrValue::Str(value.to_string())
    };
    let digest = key.attribute_digest(attribute, &candidate);
    let as_json = serde_json::to_value(&candidate).unwrap_or(Value::Null);
    let mut matches = Vec::new();
    for log in logs {
        let records = audit::show(log, &Filter::default())
            .with_context(|| format!("reading {}", log.display()))?;
        for r in records {
            let withheld = r
                .entry
                .attributes_withheld
                .as_ref()
                .and_then(|w| w.get(attribute))
                .and_then(Value::as_str);
            let kept = r.entry.attributes.as_ref().and_then(|a| a.get(attribute));
            let how = if withheld == Some(digest.as_str()) {
                "digest"
            } else if kept == Some(&as_json) {
                "value"
            } else {
                continue;
            };
            matches.push(DigestMatch {
                log: log.display().to_string(),
                seq: r.seq,
                kind: r.entry.kind.clone(),
                region: r.region.clone(),
                task_id: r.entry.task_id.clone(),
                how,
            });
        }
    }
    let mut out = String::new();
    match format {
        OutputFormat::Json => {
            let report = serde_json::json!({
                "key": key.id(),
                "attribute": attribute,
                "digest": digest,
                "matches": matches,
            });
            out.push_str(&serde_json::to_string_pretty(&report)?);
            out.push('\n');
        }
        OutputFormat::Text => {
            out.push_str(&format!(
                "{attribute}: hmac-sha256 {digest} (key {})\n",
                key.id()
            ));
            if !logs.is_empty() {
                let mut t =
                    super::output::table(&["LOG", "SEQ", "KIND", "REGION", "TASK", "MATCH"]);
                for m in &matches {
                    t.add_row(vec![
                        m.log.clone(),
                        m.seq.to_string(),
                        m.kind.clone(),
                        m.region.clone(),
                        m.task_id.clone().unwrap_or_else(|| "-".into()),
                        m.how.to_string(),
                    ]);
                }
                if matches.is_empty() {
                    out.push_str("no record concerns this value\n");
                } else {
                    out.push_str(&super::output::render(&t));
                }
            }
        }
    }
    super::output::emit(&out);
    Ok(if logs.is_empty() || !matches.is_empty() {
        0
    } else {
        1
    })
}

/// One anchor the log was checked against.
#[derive(Debug, serde::Serialize)]
struct AnchorResult {
    /// Where the head came from.
    source: String,
    /// The anchored head, when one was found.
    seq: Option<u64>,
    hash: Option<String>,
    /// `holds`, `shorter`, `different`, or `unchecked` (see `detail`).
    result: &'static str,
    detail: String,
}

impl AnchorResult {
    fn checked(source: String, bytes: &[u8], head: &LogHead) -> Self {
        let check = anchor::check_bytes(bytes, head);
        Self {
            result: match check {
                HeadCheck::Holds => "holds",
                HeadCheck::Shorter { .. } => "shorter",
                HeadCheck::Different { .. } => "different",
            },
            detail: format!("the log {}", check.describe(head, &source)),
            source,
            seq: Some(head.seq),
            hash: Some(head.hash.clone()),
        }
    }

    fn unchecked(source: String, detail: String) -> Self {
        Self {
            source,
            seq: None,
            hash: None,
            result: "unchecked",
            detail,
        }
    }

    fn contradicts(&self) -> bool {
        matches!(self.result, "shorter" | "different")
    }
}

#[derive(Debug, serde::Serialize)]
struct VerifyOutput<'a> {
    #[serde(flatten)]
    report: &'a audit::VerifyReport,
    region: Option<String>,
    anchors: Vec<AnchorResult>,
}

/// The region whose log `bytes` is, from its first whole record.
fn region_of(bytes: &[u8]) -> Option<String> {
    let line = bytes.split(|b| *b == b'\n').next()?;
    serde_json::from_slice::<Record>(line)
        .ok()
        .map(|r| r.region)
}

/// The head `region` had as the witness `spec` saw it.
fn witnessed_head(spec: &str, region: &str, insecure: bool) -> anyhow::Result<Option<LogHead>> {
    let path = Path::new(spec);
    if path.exists() {
        let regions = if path.is_dir() {
            anchor::read_witnesses(path)?
        } else {
            anchor::parse_witnesses(
                path,
                &std::fs::read(path).with_context(|| format!("reading {spec}"))?,
            )?
        };
        return Ok(regions.get(region).map(anchor::Witnessed::head));
    }
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let address = super::connect::parse_address(spec).map_err(|e| {
        anyhow::anyhow!("witness {spec}: not a file or directory, nor a controller address: {e}")
    })?;
    let connect = super::connect::Connect {
        controller: Some(address),
        timeout: std::time::Duration::from_secs(10),
        ca: env("FEDERATION_CA"),
        cert: env("FEDERATION_CERT"),
        key: env("FEDERATION_KEY"),
        token: std::env::var("FEDERATION_TOKEN").ok(),
        insecure,
    };
    let rt = super::client::runtime()?;
    rt.block_on(async {
        let channel = super::connect::channel(&connect)
            .with_context(|| format!("witness {spec}: no controller answers there"))?;
        let mut admin =
            federation_api::federation_admin_client::FederationAdminClient::new(channel);
        let status = admin
            .federation_status(federation_api::FederationStatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("witness {spec}: {} ({:?})", s.message(), s.code()))?
            .into_inner();
        if status.self_region == region {
            anyhow::bail!("witness {spec} is {region}'s own controller, not a peer: it cannot witness its own log");
        }
        Ok(status
            .regions
            .into_iter()
            .find(|r| r.region == region)
            .and_then(|r| r.log_head)
            .map(|h| LogHead {
                seq: h.seq,
                hash: h.hash,
            }))
    })
}

fn verify(
    dir: &Path,
    witnesses: &[String],
    region: Option<String>,
    insecure: bool,
    format: OutputFormat,
) -> ExitCode {
    let mut anchors = Vec::new();
    let (bytes, region) = if is_database(dir) {
        let db = match read_database(&dir.to_string_lossy(), region.as_deref()) {
            Ok(d) => d,
            Err(e) => return super::fail(&e.context("cannot read the decision log"), 2),
        };
        // The database's own head row is the chain's anchor there: the
        // records and the head move in one transaction.
        let source = format!("the chain head in {} (decision_heads)", db.target);
        match &db.head {
            Some((seq, hash)) => anchors.push(AnchorResult::checked(
                source,
                &db.bytes,
                &LogHead {
                    seq: *seq,
                    hash: hash.clone(),
                },
            )),
            None => anchors.push(AnchorResult::unchecked(source, "no head row".into())),
        }
        (audit::LogBytes::from(db.bytes), Some(db.region))
    } else {
        let path = audit::log_path(dir);
        let log = match audit::read_log(&path)
            .with_context(|| format!("cannot read the decision log {}", path.display()))
        {
            Ok(l) => l,
            Err(e) => return super::fail(&e, 2),
        };
        let region = region.or_else(|| region_of(&log.bytes));
        (log, region)
    };
    let report = bytes.verify();
    let bytes = bytes.bytes;
    if dir.is_dir() {
        let store = dir.join("tasks.redb");
        match crate::tasks::read_log_head(dir) {
            Ok(Some((seq, hash))) => anchors.push(AnchorResult::checked(
                format!("the task store {}", store.display()),
                &bytes,
                &LogHead { seq, hash },
            )),
            Ok(None) => anchors.push(AnchorResult::unchecked(
                format!("the task store {}", store.display()),
                "no head recorded there (no store, or written by a version without anchors)".into(),
            )),
            Err(e) => anchors.push(AnchorResult::unchecked(
                format!("the task store {}", store.display()),
                format!("not read: {e} (a running controller holds it; use --witness)"),
            )),
        }
    }
    for spec in witnesses {
        let source = format!("witness {spec}");
        let Some(region) = region.as_deref() else {
            let e = anyhow::anyhow!(
                "the log has no records to tell its region: name it with --region to check it against witnesses"
            );
            return super::fail(&e, 2);
        };
        match witnessed_head(spec, region, insecure) {
            Ok(Some(head)) => anchors.push(AnchorResult::checked(source, &bytes, &head)),
            Ok(None) => anchors.push(AnchorResult::unchecked(
                source,
                format!("it holds no head of {region}"),
            )),
            Err(e) => return super::fail(&e, 2),
        }
    }
    if format == OutputFormat::Json {
        let out = VerifyOutput {
            report: &report,
            region: region.clone(),
            anchors,
        };
        match serde_json::to_string(&out) {
            Ok(s) => super::output::say!("{s}"),
            Err(e) => return super::fail(&e.into(), 2),
        }
        return verdict(&report, out.anchors.iter().any(AnchorResult::contradicts));
    }
    if let Some(line) = report.torn_tail_line {
        eprintln!(
            "warning: line {line} is incomplete (a write torn by a crash, never acknowledged); \
             it is not part of the chain and the controller truncates it at its next start"
        );
    }
    match &report.first_broken {
        None => super::output::say!(
            "ok: {} records, chain intact, last hash {}",
            report.records,
            report.last_hash
        ),
        Some(b) => {
            let seq = b.seq.map_or_else(|| "?".to_string(), |s| s.to_string());
            match &b.file {
                Some(file) => super::output::say!(
                    "broken at line {} (seq {seq}) of {file}: {}",
                    b.line,
                    b.reason
                ),
                None => super::output::say!("broken at line {} (seq {seq}): {}", b.line, b.reason),
            }
        }
    }
    for a in &anchors {
        let mark = match a.result {
            "holds" => "ok",
            "unchecked" => "note",
            _ => "CONTRADICTED",
        };
        super::output::say!("{mark}: {}: {}", a.source, a.detail);
    }
    verdict(&report, anchors.iter().any(AnchorResult::contradicts))
}

fn verdict(report: &audit::VerifyReport, contradicted: bool) -> ExitCode {
    if report.first_broken.is_some() || contradicted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn show(dir: &Path, log_region: Option<&str>, filter: &Filter, format: OutputFormat) -> ExitCode {
    let shown = if is_database(dir) {
        match read_database(&dir.to_string_lossy(), log_region) {
            Ok(db) => audit::show_bytes(Path::new(&db.target), &db.bytes, filter),
            Err(e) => return super::fail(&e.context("cannot read the decision log"), 2),
        }
    } else {
        audit::show(&audit::log_path(dir), filter)
    };
    let records = match shown {
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
            Some(Value::Object(map))
                if !map.is_empty() || r.entry.attributes_withheld.is_some() =>
            {
                let withheld = r
                    .entry
                    .attributes_withheld
                    .as_ref()
                    .and_then(Value::as_object)
                    .map(|w| {
                        w.keys()
                            .map(|k| format!("{k}=<withheld>"))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                map.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .chain(withheld)
                    .collect::<Vec<_>>()
                    .join(",")
            }
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
