//! `federation policy check|explain|diff|map|sign|keygen|replay`: the
//! auditor's tools (`sign` and `keygen` are in [`super::bundle`], `replay` in
//! [`super::replay`]). This module
//! owns argument parsing and output; the logic is in [`crate::policy`].
//!
//! Exit status: `check` 0 no error findings, 1 error findings (or approvals
//! required and not met); `explain` 0
//! routed or failed over, 1 rejected; `diff` 0 no route changes, 1 changes;
//! `map` 0; all of them 2 when a file cannot be used or an argument is bad.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};

use super::OutputFormat;
use crate::policy::analysis::{self, Severity};
use crate::policy::diff::{self, DiffReport};
use crate::policy::map;
use crate::policy::{
    AttrValue, Attributes, Decision, Outcome, Policy, StaticView, format_attributes,
};

/// Policy subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Statically audit a policy (and show its approvals): exit 0 no errors, 1 error findings or required approvals missing, 2 unusable file.
    Check {
        /// The federation file.
        file: PathBuf,
        /// Output format: `html` is a self-contained page with the
        /// residency map (the same as `policy map --format html`).
        #[arg(long, value_enum, default_value_t)]
        format: CheckFormat,
    },
    /// Draw the residency map: for each rule, the regions it reaches normally and on each failover step, warning edges, uncovered inputs.
    Map {
        /// The federation file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: MapFormat,
    },
    /// Show how one task would be routed: exit 0 routed or failover, 1 rejected, 2 bad input.
    Explain {
        /// The federation file.
        file: PathBuf,
        /// A task attribute: `key=value` (a string) or `key:=JSON` (number, bool, list).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// Treat this region as down (repeatable).
        #[arg(long, value_name = "REGION")]
        down: Vec<String>,
        /// Treat this region as full (repeatable).
        #[arg(long, value_name = "REGION")]
        full: Vec<String>,
        /// Treat this region as draining (repeatable).
        #[arg(long, value_name = "REGION")]
        draining: Vec<String>,
        /// Assume this region advertises FREE of TOTAL slots free and QUEUED
        /// tasks queued (repeatable): `--load europe_west=6/8,0`.
        #[arg(long, value_name = "REGION=FREE/TOTAL[,QUEUED]")]
        load: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Show the inputs whose route changes between two policies: exit 0 none, 1 some, 2 unusable file.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The proposed policy.
        new: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
    /// Approve a policy: add this key's Ed25519 signature of FILE's exact bytes to FILE.approvals.
    Sign {
        /// The federation file.
        file: PathBuf,
        /// The approver's private key (PKCS#8 PEM, from `policy keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The approver's name in the approval (default: the name the file gives this key).
        #[arg(long)]
        name: Option<String>,
    },
    /// Make an approver's key pair: DIR/NAME.key (private) and DIR/NAME.pub.
    Keygen {
        /// The approver's name.
        name: String,
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Re-decide recorded route decisions under a proposed policy: exit 0 none would change, 1 some would (or could not be replayed), 2 unusable log or file.
    Replay(super::replay::ReplayArgs),
}

/// Output format of `policy check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum CheckFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON.
    Json,
    /// A self-contained HTML page: the residency map and every finding.
    Html,
}

/// Output format of `policy map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum MapFormat {
    /// A standalone SVG picture.
    #[default]
    Svg,
    /// Graphviz DOT (`| dot -Tpdf`).
    Dot,
    /// A self-contained HTML page (the map, tables, every finding).
    Html,
}

/// Runs a policy subcommand.
pub fn run(cmd: PolicyCommand) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Check { file, format } => check(&file, format),
        PolicyCommand::Map { file, format } => map_cmd(&file, format),
        PolicyCommand::Explain {
            file,
            attrs,
            down,
            full,
            draining,
            load,
            format,
        } => explain(&file, &attrs, &down, &full, &draining, &load, format),
        PolicyCommand::Diff { old, new, format } => diff_cmd(&old, &new, format),
        PolicyCommand::Sign { file, key, name } => {
            super::bundle::sign(&file, &key, name.as_deref()).and_then(|out| emit(&out).map(|()| 0))
        }
        PolicyCommand::Keygen { name, out } => {
            super::bundle::keygen(&name, &out).and_then(|text| emit(&text).map(|()| 0))
        }
        PolicyCommand::Replay(args) => return super::replay::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => super::fail(&e, 2),
    }
}

/// Appends a line to the output buffer (written at the end, so that a closed
/// pipe such as `| head` never panics).
macro_rules! outln {
    ($buf:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($buf, $($arg)*);
    }};
}

/// Writes the buffered output; a reader that went away is not an error.
fn emit(out: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

fn load(path: &Path) -> anyhow::Result<Policy> {
    Policy::load_file(path).map_err(|e| anyhow!("{}: policy cannot be used:\n{e}", path.display()))
}

fn print_json(out: &mut String, value: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!(
        out,
        "{}",
        serde_json::to_string_pretty(value).context("serializing the report")?
    );
    Ok(())
}

fn check(file: &Path, format: CheckFormat) -> anyhow::Result<u8> {
    let policy = load(file)?;
    let report = analysis::check(&policy);
    let approvals = super::bundle::verdict(file, &policy)?;
    let unapproved = policy.approvers.required && approvals.as_ref().is_some_and(|v| !v.met());
    let mut out = String::new();
    let (errors, warnings, info) = (
        report.count(Severity::Error),
        report.count(Severity::Warning),
        report.count(Severity::Info),
    );
    match format {
        CheckFormat::Html => out.push_str(&map::to_html(&map::build(&policy, &report), &report)),
        CheckFormat::Json => print_json(
            &mut out,
            &serde_json::json!({
                "file": file,
                "policy_hash": policy.hash,
                "summary": { "errors": errors, "warnings": warnings, "info": info },
                "exhaustive": report.exhaustive,
                "inputs_examined": report.inputs_examined,
                "attributes": report.attributes,
                "findings": report.findings,
                "approvals": approvals.as_ref().map(|v| serde_json::json!({
                    "required": policy.approvers.required,
                    "met": v.met(),
                    "verdict": v,
                })),
            }),
        )?,
        CheckFormat::Text => {
            outln!(
                out,
                "{}: {} rules, {} regions; {} inputs examined{}",
                file.display(),
                policy.rules.len(),
                policy.regions.len(),
                report.inputs_examined,
                if report.exhaustive {
                    " (exhaustive)"
                } else {
                    " (partial: see info findings)"
                }
            );
            let regions = policy
                .regions_by_priority()
                .iter()
                .map(|r| match r.priority {
                    Some(p) => format!("{} ({p})", r.name),
                    None => format!("{} (no priority)", r.name),
                })
                .collect::<Vec<_>>()
                .join(", ");
            outln!(out, "regions by priority: {regions}");
            for rule in policy.rules.iter().filter(|r| r.is_set()) {
                let mut members: Vec<&str> = rule.primaries.iter().map(String::as_str).collect();
                members.sort_by(|a, b| policy.priority_of(a).cmp(&policy.priority_of(b)));
                let how = match rule.balance {
                    crate::policy::Balance::Weighted => format!(
                        "weighted ({})",
                        members
                            .iter()
                            .map(|m| format!("{m}: {}", rule.weights.get(*m).copied().unwrap_or(0)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    b => b.as_str().to_string(),
                };
                let affinity = rule
                    .affinity
                    .as_deref()
                    .map(|a| format!(", affinity on `{a}`"))
                    .unwrap_or_default();
                outln!(
                    out,
                    "set: {}: primaries {} balanced {how}{affinity}; ties by priority: {}",
                    rule.label(),
                    rule.primaries_label(),
                    members.join(" < ")
                );
            }
            for f in &report.findings {
                match &f.rule {
                    Some(rule) => outln!(
                        out,
                        "{}: [{}] {rule}: {}",
                        f.severity.as_str(),
                        f.kind,
                        f.message
                    ),
                    None => outln!(out, "{}: [{}] {}", f.severity.as_str(), f.kind, f.message),
                }
                if let Some(ex) = &f.example {
                    outln!(out, "    example: {}", example(ex, &report.attributes));
                }
            }
            if let Some(v) = &approvals {
                for line in super::bundle::lines(file, &policy, v) {
                    outln!(out, "{line}");
                }
            }
            outln!(
                out,
                "summary: {errors} error(s), {warnings} warning(s), {info} info"
            );
        }
    }
    emit(&out)?;
    Ok(u8::from(report.has_errors() || unapproved))
}

fn map_cmd(file: &Path, format: MapFormat) -> anyhow::Result<u8> {
    let policy = load(file)?;
    let report = analysis::check(&policy);
    let drawn = map::build(&policy, &report);
    emit(&match format {
        MapFormat::Svg => map::to_svg(&drawn),
        MapFormat::Dot => map::to_dot(&drawn),
        MapFormat::Html => map::to_html(&drawn, &report),
    })?;
    Ok(0)
}

/// `k='v', other absent` — absent attributes are named so the example is complete.
fn example(
    attrs: &Attributes,
    axes: &std::collections::BTreeMap<String, Vec<Option<AttrValue>>>,
) -> String {
    let mut s = if attrs.is_empty() {
        "(no attributes)".to_string()
    } else {
        format_attributes(attrs)
    };
    let absent: Vec<&str> = axes
        .keys()
        .filter(|k| !attrs.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !absent.is_empty() && !attrs.is_empty() {
        s.push_str(&format!("; absent: {}", absent.join(", ")));
    } else if !absent.is_empty() {
        s = format!("absent: {}", absent.join(", "));
    }
    s
}

/// Parses `key=value` (string) or `key:=JSON` (typed).
pub fn parse_attr(arg: &str) -> anyhow::Result<(String, AttrValue)> {
    let Some(eq) = arg.find('=') else {
        bail!("--attr `{arg}`: expected KEY=VALUE or KEY:=JSON");
    };
    let (key, value, typed) = if eq > 0 && arg.as_bytes()[eq - 1] == b':' {
        (&arg[..eq - 1], &arg[eq + 1..], true)
    } else {
        (&arg[..eq], &arg[eq + 1..], false)
    };
    if key.is_empty() {
        bail!("--attr `{arg}`: empty attribute name");
    }
    if !typed {
        return Ok((key.to_string(), AttrValue::Str(value.to_string())));
    }
    let json: serde_json::Value = serde_json::from_str(value)
        .with_context(|| format!("--attr `{arg}`: `{value}` is not JSON"))?;
    let v = from_json(&json).with_context(|| format!("--attr `{arg}`"))?;
    Ok((key.to_string(), v))
}

fn from_json(v: &serde_json::Value) -> anyhow::Result<AttrValue> {
    Ok(match v {
        serde_json::Value::String(s) => AttrValue::Str(s.clone()),
        serde_json::Value::Bool(b) => AttrValue::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => AttrValue::Int(i),
            None => AttrValue::Double(
                n.as_f64()
                    .ok_or_else(|| anyhow!("number {n} out of range"))?,
            ),
        },
        serde_json::Value::Array(items) => {
            AttrValue::List(items.iter().map(from_json).collect::<anyhow::Result<_>>()?)
        }
        serde_json::Value::Null => bail!("null is not an attribute value"),
        serde_json::Value::Object(_) => bail!("objects are not attribute values"),
    })
}

fn region_set(policy: &Policy, flag: &str, names: &[String]) -> anyhow::Result<BTreeSet<String>> {
    for n in names {
        if policy.region(n).is_none() {
            bail!(
                "--{flag} {n}: unknown region (regions: {})",
                policy
                    .regions
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(names.iter().cloned().collect())
}

/// `--load region=free/total[,queued]` flags.
fn parse_loads(
    policy: &Policy,
    args: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, crate::policy::Load>> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        let bad = || {
            anyhow::anyhow!(
                "--load {a}: expected REGION=FREE/TOTAL[,QUEUED], for example europe_west=6/8,0"
            )
        };
        let (region, spec) = a.split_once('=').ok_or_else(bad)?;
        region_set(policy, "load", &[region.to_string()])?;
        let (slots, queued) = spec.split_once(',').unwrap_or((spec, "0"));
        let (free, total) = slots.split_once('/').ok_or_else(bad)?;
        let num = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        let (free, total, queue_depth) = (num(free)?, num(total)?, num(queued)?);
        if free > total {
            bail!("--load {a}: {free} free slots of {total}");
        }
        out.insert(
            region.to_string(),
            crate::policy::Load {
                total_slots: total,
                free_slots: free,
                queue_depth,
            },
        );
    }
    Ok(out)
}

fn explain(
    file: &Path,
    attr_args: &[String],
    down: &[String],
    full: &[String],
    draining: &[String],
    loads: &[String],
    format: OutputFormat,
) -> anyhow::Result<u8> {
    let policy = load(file)?;
    let mut attrs = Attributes::new();
    for a in attr_args {
        let (k, v) = parse_attr(a)?;
        attrs.insert(k, v);
    }
    let view = StaticView {
        down: region_set(&policy, "down", down)?,
        full: region_set(&policy, "full", full)?,
        draining: region_set(&policy, "draining", draining)?,
        loads: parse_loads(&policy, loads)?,
    };
    let decision = policy.decide(&attrs, &view.bind(&policy));
    let mut out = String::new();
    match format {
        OutputFormat::Json => print_json(&mut out, &decision)?,
        OutputFormat::Text => print_decision(&mut out, &attrs, &decision),
    }
    emit(&out)?;
    Ok(match decision.outcome {
        Outcome::Routed { .. } | Outcome::Failover { .. } => 0,
        Outcome::Rejected { .. } => 1,
    })
}

fn print_decision(out: &mut String, attrs: &Attributes, d: &Decision) {
    outln!(
        out,
        "input: {}",
        if attrs.is_empty() {
            "(no attributes)".to_string()
        } else {
            format_attributes(attrs)
        }
    );
    outln!(
        out,
        "rule: {}",
        d.rule.as_deref().unwrap_or("(none matched)")
    );
    if !d.required_tags.is_empty() {
        outln!(
            out,
            "required tags: {}",
            d.required_tags
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !d.candidates.is_empty() {
        outln!(out, "candidates:");
        for c in &d.candidates {
            let role = match c.role {
                crate::policy::Role::Primary => "primary",
                crate::policy::Role::Backup => "backup",
            };
            match c.refusal {
                None if c.detail.is_empty() => outln!(out, "  {} ({role}): accepted", c.region),
                None => outln!(out, "  {} ({role}): accepted — {}", c.region, c.detail),
                Some(r) => outln!(
                    out,
                    "  {} ({role}): refused: {} — {}",
                    c.region,
                    r.as_str(),
                    c.detail
                ),
            }
        }
    }
    match &d.outcome {
        Outcome::Routed { region } => outln!(out, "outcome: routed to {region}"),
        Outcome::Failover { region } => outln!(out, "outcome: failover to {region}"),
        Outcome::Rejected { rejection } => outln!(
            out,
            "outcome: rejected ({})",
            serde_json::to_value(rejection)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
    }
    if let Some(b) = d.balance.as_ref().map(crate::policy::BalanceNote::explain) {
        outln!(out, "balance: {}", b.why);
        for l in &b.loads {
            let seen = if l.advertised {
                format!(
                    "{}/{} slots free, {} queued",
                    l.free_slots, l.total_slots, l.queue_depth
                )
            } else {
                "no capacity advertised".to_string()
            };
            outln!(
                out,
                "  {}: {seen}, share {:.1}%",
                l.region,
                f64::from(l.share_ppm) / 1e4
            );
        }
    }
    outln!(out, "reason: {}", d.reason);
    for w in &d.warnings {
        outln!(out, "warning: {w}");
    }
    for e in &d.evaluation_errors {
        outln!(out, "not evaluable: {e}");
    }
}

fn diff_cmd(old: &Path, new: &Path, format: OutputFormat) -> anyhow::Result<u8> {
    let a = load(old)?;
    let b = load(new)?;
    let report: DiffReport = diff::diff(&a, &b);
    let mut out = String::new();
    match format {
        OutputFormat::Json => print_json(&mut out, &report)?,
        OutputFormat::Text => {
            outln!(
                out,
                "{} -> {}: {} inputs examined{}",
                old.display(),
                new.display(),
                report.inputs_examined,
                if report.exhaustive {
                    " (exhaustive)"
                } else {
                    " (partial)"
                }
            );
            if report.changes.is_empty() {
                outln!(out, "no route changes");
            }
            for c in &report.changes {
                outln!(
                    out,
                    "changed ({} input{}): e.g. {}",
                    c.inputs,
                    if c.inputs == 1 { "" } else { "s" },
                    if c.example.is_empty() {
                        "(no attributes)".to_string()
                    } else {
                        format_attributes(&c.example)
                    }
                );
                outln!(out, "    old: {}", c.old);
                outln!(out, "    new: {}", c.new);
            }
            for n in &report.notes {
                outln!(out, "note: {n}");
            }
        }
    }
    emit(&out)?;
    Ok(u8::from(report.changed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_forms() {
        assert_eq!(
            parse_attr("customer_region=DE").expect("ok"),
            ("customer_region".into(), AttrValue::Str("DE".into()))
        );
        assert_eq!(
            parse_attr("n:=3").expect("ok"),
            ("n".into(), AttrValue::Int(3))
        );
        assert_eq!(
            parse_attr("x:=1.5").expect("ok"),
            ("x".into(), AttrValue::Double(1.5))
        );
        assert_eq!(
            parse_attr("tags:=[\"a\", true]").expect("ok"),
            (
                "tags".into(),
                AttrValue::List(vec![AttrValue::Str("a".into()), AttrValue::Bool(true)])
            )
        );
        assert_eq!(
            parse_attr("eq=a=b").expect("ok"),
            ("eq".into(), AttrValue::Str("a=b".into()))
        );
        assert!(parse_attr("novalue").is_err());
        assert!(parse_attr("=x").is_err());
        assert!(parse_attr("x:=nope").is_err());
        assert!(parse_attr("x:=null").is_err());
        assert!(parse_attr("x:={}").is_err());
    }
}
