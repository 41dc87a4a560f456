//! `federation drill`: a failover drill that leaves evidence. Makes region
//! R unavailable (drain over gRPC; or, in a sandbox, stop its controller),
//! sends probe tasks (`SubmitTaskRequest.probe`: routed, forwarded,
//! re-checked and recorded like any task, never stored or run) for each
//! rule and data class before, during and after, restores R, waits out the
//! failback hold-down, and writes a report (JSON or HTML, [`super::drill_report`]):
//! the timeline, each probe's observed placement against the policy's
//! expected one (`decide` with R unavailable), the differences, and the
//! entry controller's decision-log range with its chain verification.
//!
//! Exit status: 0 every placement agreed, traffic returned and the log
//! verifies; 1 otherwise; 2 when the drill could not run (interrupted with
//! Ctrl-C, it undrains R first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use federation_api as api;

use super::connect::{self, Connect};
use crate::policy::analysis::InputSpace;
use crate::policy::{Attributes, Decision, Policy, StaticView, format_attributes};

type Client = api::federation_client_client::FederationClientClient<federation_tls::AuthChannel>;
type Admin = api::federation_admin_client::FederationAdminClient<federation_tls::AuthChannel>;

/// The most probes one phase sends.
const MAX_PROBES: usize = 64;

/// Arguments of `drill`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    /// The controller probes are submitted to (the entry region), and the
    /// credentials (an operator identity: drain, decisions).
    #[command(flatten)]
    pub connect: Connect,
    /// The region to make unavailable.
    #[arg(long)]
    pub region: String,
    /// How long R stays unavailable (at least the time the probes take).
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Write the report here: `.html` or `.json` (by extension).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The federation file in force: the probes are made from its rules and
    /// data classes, and the expected placements are its `decide` (its hash
    /// must be the entry controller's).
    #[arg(long)]
    pub policy: PathBuf,
    /// R's controller for the drain, when not the endpoint the entry
    /// controller uses for it. A replica of a region whose store is its
    /// database names its siblings, which are drained too.
    #[arg(long, value_name = "ADDR")]
    pub region_controller: Option<String>,
    /// How long to wait for each change to be seen (drain, return, hold-down).
    #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
    pub patience: Duration,
}

/// How R is made unavailable.
pub enum Disruption<'a> {
    /// `Drain` over gRPC, then undrain.
    Drain,
    /// Stop R's controller and start it again (a sandbox's): called with
    /// `true` to stop, `false` to restore.
    Kill(&'a mut dyn FnMut(bool) -> anyhow::Result<()>),
}

pub use super::drill_report::{Event, LogRange, Placement, ProbeResult, Report};

/// A probe: a name and the attributes.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `rule 2 (…): customer_region in [...]; data class eu-pii`.
    pub name: String,
    /// The attributes.
    pub attrs: Attributes,
}

/// One probe per (matched rule, set of data-class requirements) that the
/// policy's enumerated inputs reach, first input of each (the most
/// readable); inputs without attributes are left out (a task needs one).
pub fn probes(policy: &Policy) -> Vec<Probe> {
    let space = InputSpace::of(&[policy]);
    let mut seen: BTreeSet<(Option<usize>, Vec<usize>)> = BTreeSet::new();
    let mut out = Vec::new();
    for attrs in space.inputs() {
        if attrs.is_empty() {
            continue;
        }
        let rule = policy.match_rule(&attrs).rule;
        let classes: Vec<usize> = policy
            .requirements
            .iter()
            .enumerate()
            .filter(|(_, q)| q.condition.evaluate(&attrs) == Ok(true))
            .map(|(i, _)| i)
            .collect();
        if !seen.insert((rule, classes.clone())) {
            continue;
        }
        let mut name = rule.map_or_else(|| "no rule".to_string(), |i| policy.rules[i].label());
        for i in &classes {
            let q = &policy.requirements[*i];
            name.push_str(&format!(
                "; data class {}",
                q.name.clone().unwrap_or_else(|| q.source.clone())
            ));
        }
        out.push(Probe { name, attrs });
        if out.len() == MAX_PROBES {
            break;
        }
    }
    out
}

/// The policy's placement of `attrs` with `region` unavailable (`None`:
/// every region available).
pub fn expected(policy: &Policy, attrs: &Attributes, region: Option<(&str, bool)>) -> Decision {
    let mut view = StaticView::default();
    if let Some((r, killed)) = region {
        if killed {
            view.down.insert(r.to_string());
        } else {
            view.draining.insert(r.to_string());
        }
    }
    policy.decide(attrs, &view.bind(policy))
}

/// Whether `observed` agrees with `expected`: the same region (or both
/// rejected), or, for a set of primaries, a member the decision accepted.
pub fn agrees(policy: &Policy, expected: &Decision, observed: Option<&str>) -> bool {
    match (expected.outcome.region(), observed) {
        (None, None) => true,
        (Some(e), Some(o)) if e == o => true,
        (Some(_), Some(o)) => expected.rule_index.is_some_and(|i| {
            let rule = &policy.rules[i];
            rule.is_set()
                && rule.is_primary(o)
                && expected
                    .candidates
                    .iter()
                    .any(|c| &*c.region == o && c.accepted())
        }),
        _ => false,
    }
}

struct Clock {
    start: Instant,
    events: Vec<Event>,
}

impl Clock {
    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(event = %what, "drill");
        self.events.push(Event {
            at: now_text(),
            t_ms: self.start.elapsed().as_millis() as u64,
            what,
        });
    }
}

fn now_text() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

struct Ctx {
    client: Client,
    admin: Admin,
    region: String,
    killed: bool,
    /// The policy in force (from the file).
    policy: Policy,
}

async fn status(admin: &mut Admin) -> anyhow::Result<api::FederationStatusResponse> {
    Ok(admin
        .federation_status(api::FederationStatusRequest {})
        .await
        .context("FederationStatus")?
        .into_inner())
}

async fn wait_row(
    admin: &mut Admin,
    region: &str,
    what: &str,
    patience: Duration,
    mut check: impl FnMut(&api::RegionStatus) -> bool,
) -> anyhow::Result<api::RegionStatus> {
    let until = Instant::now() + patience;
    loop {
        let s = status(admin).await?;
        if let Some(row) = s.regions.iter().find(|r| r.region == region) {
            if check(row) {
                return Ok(row.clone());
            }
        }
        if Instant::now() >= until {
            bail!("gave up after {patience:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log_total(admin: &mut Admin) -> anyhow::Result<api::ListDecisionsResponse> {
    Ok(admin
        .list_decisions(api::ListDecisionsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .context("ListDecisions")?
        .into_inner())
}

async fn seq_of(admin: &mut Admin, task_id: &str) -> Option<u64> {
    let r = admin
        .list_decisions(api::ListDecisionsRequest {
            task_id: task_id.to_string(),
            limit: 10,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    r.records
        .iter()
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .filter_map(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .max()
}

async fn run_phase(
    ctx: &mut Ctx,
    phase: &str,
    list: &[Probe],
    unavailable: bool,
) -> Vec<ProbeResult> {
    let mut out = Vec::new();
    for p in list {
        let d = expected(
            &ctx.policy,
            &p.attrs,
            unavailable.then_some((ctx.region.as_str(), ctx.killed)),
        );
        let req = api::SubmitTaskRequest {
            attributes: crate::wire::attributes_to_wire(&p.attrs),
            probe: true,
            ..Default::default()
        };
        let (observed, observed_reason, task_id) = match ctx.client.submit_task(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let d = r.decision.unwrap_or_default();
                (
                    Placement {
                        outcome: d.outcome.clone(),
                        region: Some(r.region.clone()),
                    },
                    d.reason,
                    r.task_id,
                )
            }
            Err(s) => (
                Placement {
                    outcome: "rejected".into(),
                    region: None,
                },
                format!("{:?}: {}", s.code(), s.message()),
                String::new(),
            ),
        };
        let agree = agrees(&ctx.policy, &d, observed.region.as_deref());
        let log_seq = if task_id.is_empty() {
            None
        } else {
            seq_of(&mut ctx.admin, &task_id).await
        };
        out.push(ProbeResult {
            phase: phase.to_string(),
            name: p.name.clone(),
            attributes: format_attributes(&p.attrs),
            expected: Placement::of(&d),
            expected_reason: d.reason.clone(),
            observed,
            observed_reason,
            agree,
            task_id,
            log_seq,
        });
    }
    out
}

/// Runs a drill through the controller `c` names, making `region`
/// unavailable with `disruption`. `policy`: the federation file in force
/// (probes and expected placements come from it).
pub async fn drill(
    c: &Connect,
    region: &str,
    duration: Duration,
    policy: &Path,
    region_controller: Option<&str>,
    patience: Duration,
    disruption: Disruption<'_>,
) -> anyhow::Result<Report> {
    let mut clock = Clock {
        start: Instant::now(),
        events: Vec::new(),
    };
    let started = now_text();
    let channel = connect::channel(c)?;
    let mut admin = Admin::new(channel.clone());
    let client = Client::new(channel);
    let first = status(&mut admin).await?;
    let entry = first.self_region.clone();
    if !first.regions.iter().any(|r| r.region == region) {
        bail!(
            "region `{region}` is not in the federation (regions: {})",
            first
                .regions
                .iter()
                .map(|r| r.region.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let killed = matches!(disruption, Disruption::Kill(_));
    if killed && entry == region {
        bail!("--kill of {region}: submit through another region's controller");
    }
    let policy = Policy::load_file(policy)
        .map_err(|e| anyhow::anyhow!("{}: policy cannot be used:\n{e}", policy.display()))
        .and_then(|p| {
            if p.hash == first.policy_hash {
                Ok((p, policy))
            } else {
                bail!(
                    "{}: policy {} is not the one {entry} runs ({}): the expectations would not be of the policy in force",
                    policy.display(),
                    p.hash,
                    first.policy_hash
                )
            }
        });
    let (policy, path) = policy?;
    let expected_from = format!(
        "policy file {} (decide with {region} {})",
        path.display(),
        if killed { "down" } else { "draining" }
    );
    let list = probes(&policy);
    if list.is_empty() {
        bail!("the policy's inputs cannot be enumerated: no probes to send");
    }
    clock.note(format!(
        "drill of {region} through {entry}: {} probe(s) per phase, policy {}",
        list.len(),
        first.policy_hash
    ));
    wait_row(
        &mut admin,
        region,
        &format!("{entry} sees {region} alive"),
        patience,
        |r| r.state == "alive" || r.state == "self",
    )
    .await?;
    let head = log_total(&mut admin).await?;
    let mut ctx = Ctx {
        client,
        admin,
        region: region.to_string(),
        killed,
        policy,
    };
    let mut results = run_phase(&mut ctx, "before", &list, false).await;
    clock.note("probes sent in normal operation");

    // Make R unavailable.
    let mut target: Option<String> = None;
    let mut restore: Option<&mut dyn FnMut(bool) -> anyhow::Result<()>> = None;
    match disruption {
        Disruption::Drain => {
            let addr = match region_controller {
                Some(a) => a.to_string(),
                None => first
                    .regions
                    .iter()
                    .find(|r| r.region == region)
                    .map(|r| r.endpoint.clone())
                    .filter(|e| !e.is_empty())
                    .with_context(|| {
                        format!("{entry} knows no endpoint of {region}: pass --region-controller")
                    })?,
            };
            let drained = set_drain(c, region, &addr, true).await?;
            clock.note(format!(
                "drained {region} (Drain at {})",
                drained.join(", ")
            ));
            target = Some(addr);
        }
        Disruption::Kill(f) => {
            f(true).with_context(|| format!("stopping {region}"))?;
            clock.note(format!("stopped {region}'s controller"));
            restore = Some(f);
        }
    }
    let down_at = Instant::now();
    let seen = wait_row(
        &mut ctx.admin,
        region,
        &format!("{entry} sees {region} unavailable"),
        patience,
        |r| {
            if killed {
                r.state == "dead"
            } else {
                r.draining
            }
        },
    )
    .await;
    let mut differences = Vec::new();
    match seen {
        Ok(r) => clock.note(format!(
            "{entry} sees {region} {}",
            if killed { r.state } else { "draining".into() }
        )),
        Err(e) => differences.push(format!("{e}")),
    }
    results.extend(run_phase(&mut ctx, "during", &list, true).await);
    clock.note(format!("probes sent with {region} unavailable"));
    if let Some(rest) = duration.checked_sub(down_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }

    // Restore R and wait out the hold-down.
    match (target.as_deref(), restore) {
        (Some(addr), _) => {
            let undrained = set_drain(c, region, addr, false).await?;
            clock.note(format!("undrained {region} ({})", undrained.join(", ")));
        }
        (None, Some(f)) => {
            f(false).with_context(|| format!("restarting {region}"))?;
            clock.note(format!("restarted {region}'s controller"));
        }
        (None, None) => {}
    }
    let mut held = false;
    let back = wait_row(
        &mut ctx.admin,
        region,
        &format!("{entry} sees {region} back and out of hold-down"),
        patience,
        |r| {
            if r.hold_down_remaining_ms > 0 {
                held = true;
            }
            (r.state == "alive" || r.state == "self")
                && !r.draining
                && r.hold_down_remaining_ms == 0
        },
    )
    .await;
    if held {
        clock.note(format!(
            "{region} was in failback hold-down after its return; waited it out"
        ));
    }
    match back {
        Ok(_) => clock.note(format!(
            "{entry} sees {region} alive, not draining, no hold-down"
        )),
        Err(e) => differences.push(format!("{e}")),
    }
    let after = run_phase(&mut ctx, "after", &list, false).await;
    clock.note("probes sent after the return");
    let to_r: Vec<&ProbeResult> = after
        .iter()
        .filter(|p| p.expected.region.as_deref() == Some(region))
        .collect();
    let traffic_returned = to_r
        .iter()
        .all(|p| p.observed.region.as_deref() == Some(region));
    if !traffic_returned {
        differences.push(format!(
            "traffic did not return to {region} after the drill"
        ));
    }
    results.extend(after);
    for p in results.iter().filter(|p| !p.agree) {
        differences.push(format!(
            "{}: {} [{}]: expected {}, observed {} ({})",
            p.phase,
            p.name,
            p.attributes,
            p.expected.label(),
            p.observed.label(),
            p.observed_reason
        ));
    }
    let tail = log_total(&mut ctx.admin).await?;
    let log = LogRange {
        region: entry.clone(),
        first_seq: head.total_records + 1,
        last_seq: tail.total_records,
        chain_intact: tail.chain_intact,
        chain_error: tail.chain_error.clone(),
        last_hash: tail.last_hash.clone(),
    };
    if !log.chain_intact {
        differences.push(format!(
            "{entry}'s decision log does not verify: {}",
            log.chain_error
        ));
    }
    for p in results
        .iter()
        .filter(|p| !p.task_id.is_empty() && p.log_seq.is_none())
    {
        differences.push(format!(
            "{}: probe {} has no record in {entry}'s decision log",
            p.phase, p.task_id
        ));
    }
    clock.note(format!(
        "decision log of {entry}: records {}..={}, chain {}",
        log.first_seq,
        log.last_seq,
        if log.chain_intact { "intact" } else { "BROKEN" }
    ));
    Ok(Report {
        federation: first.federation.clone(),
        entry_region: entry,
        region: region.to_string(),
        disruption: if killed { "kill" } else { "drain" }.into(),
        policy_hash: first.policy_hash.clone(),
        expected_from,
        started,
        finished: now_text(),
        timeline: clock.events,
        passed: differences.is_empty(),
        probes: results,
        differences,
        traffic_returned,
        log,
    })
}

/// A drill of `region` in a sandbox, through `entry`'s controller with the
/// sandbox's operator credentials: drains it, or with `kill` stops and
/// restarts its controller. Only with the `demo` feature (the sandbox).
#[cfg(feature = "demo")]
pub async fn sandbox_drill(
    sandbox: &mut federation_sandbox::Sandbox,
    entry: &str,
    region: &str,
    duration: Duration,
    kill: bool,
) -> anyhow::Result<Report> {
    let env: BTreeMap<String, String> = sandbox.cli_env("operator")?.into_iter().collect();
    let connect = Connect {
        controller: Some(
            connect::parse_address(&sandbox.addr(entry)?.to_string())
                .map_err(anyhow::Error::msg)?,
        ),
        timeout: Duration::from_secs(10),
        ca: env.get("FEDERATION_CA").map(Into::into),
        cert: env.get("FEDERATION_CERT").map(Into::into),
        key: env.get("FEDERATION_KEY").map(Into::into),
        token: None,
        insecure: env.is_empty(),
    };
    let policy = sandbox.config_path().to_path_buf();
    let patience = Duration::from_secs(60);
    if !kill {
        return drill(
            &connect,
            region,
            duration,
            &policy,
            None,
            patience,
            Disruption::Drain,
        )
        .await;
    }
    let mut stop_start = |stop: bool| {
        if stop {
            sandbox.kill_controller(region)
        } else {
            sandbox.start_controller(region)
        }
    };
    drill(
        &connect,
        region,
        duration,
        &policy,
        None,
        patience,
        Disruption::Kill(&mut stop_start),
    )
    .await
}

/// Writes `report` to `path` (`.json`, else HTML).
pub fn write_report(report: &Report, path: &Path) -> anyhow::Result<()> {
    let text = if path.extension().and_then(|e| e.to_str()) == Some("json") {
        serde_json::to_string_pretty(report).context("serializing the report")? + "\n"
    } else {
        super::drill_report::html(report)
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The text summary printed on stdout.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    for e in &report.timeline {
        out.push_str(&format!("{:>7} ms  {}\n", e.t_ms, e.what));
    }
    let mut by_phase: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for p in &report.probes {
        let e = by_phase.entry(p.phase.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(p.agree);
    }
    for phase in ["before", "during", "after"] {
        if let Some((n, ok)) = by_phase.get(phase) {
            out.push_str(&format!(
                "{phase:>6}: {ok}/{n} probes placed as the policy expects\n"
            ));
        }
    }
    for p in report.probes.iter().filter(|p| p.phase == "during") {
        out.push_str(&format!(
            "  during: {} [{}] -> {} (expected {})\n",
            p.name,
            p.attributes,
            p.observed.label(),
            p.expected.label()
        ));
    }
    for d in &report.differences {
        out.push_str(&format!("DIFFERENCE: {d}\n"));
    }
    out.push_str(&format!(
        "{}: drill of {} {}\n",
        if report.passed { "passed" } else { "FAILED" },
        report.region,
        if report.passed {
            "behaved as the policy says"
        } else {
            "differed from the policy"
        }
    ));
    out
}

/// The most replicas of one region a drill drains.
const MAX_REPLICAS: usize = 32;

/// Drains (`on`) or undrains `region` through its controller at `addr`
/// with `c`'s credentials. A replica of a database-backed region drains
/// alone (`DrainResponse.per_replica`) and names its live siblings: each
/// is drained too, and theirs, so the whole region is taken out (or back).
/// Returns the addresses it drained, `addr` first.
async fn set_drain(c: &Connect, region: &str, addr: &str, on: bool) -> anyhow::Result<Vec<String>> {
    let verb = if on { "draining" } else { "undraining" };
    let mut done: Vec<String> = Vec::new();
    let mut todo = vec![addr.to_string()];
    while let Some(next) = todo.pop() {
        if done.contains(&next) {
            continue;
        }
        if done.len() >= MAX_REPLICAS {
            bail!("{region} names more than {MAX_REPLICAS} replicas: {verb} stopped");
        }
        let mut rc = c.clone();
        rc.controller = Some(
            connect::parse_address(&next)
                .map_err(|e| anyhow::anyhow!("{region}'s controller `{next}`: {e}"))?,
        );
        let r = Admin::new(connect::channel(&rc)?)
            .drain(api::DrainRequest { drain: on })
            .await
            .with_context(|| format!("{verb} {region} at {next}"))?
            .into_inner();
        done.push(next);
        if r.per_replica {
            todo.extend(r.siblings.into_iter().rev());
        }
    }
    Ok(done)
}

/// Undrains `region` after an interrupted drill (best effort, logged).
async fn undrain(c: &Connect, region: &str, region_controller: Option<&str>) {
    let addr = match region_controller {
        Some(a) => Some(a.to_string()),
        None => match connect::channel(c) {
            Ok(ch) => status(&mut Admin::new(ch)).await.ok().and_then(|s| {
                s.regions
                    .into_iter()
                    .find(|r| r.region == region)
                    .map(|r| r.endpoint)
            }),
            Err(_) => None,
        },
    };
    let undrained = match addr {
        Some(a) => set_drain(c, region, &a, false).await.is_ok(),
        None => false,
    };
    if undrained {
        eprintln!("interrupted: undrained {region}");
    } else {
        eprintln!(
            "interrupted: could not undrain {region}: run `federation undrain` on its controller"
        );
    }
}

/// `federation drill`.
pub fn run(args: DrillArgs) -> ExitCode {
    super::client::run_command(async move {
        let report = tokio::select! {
            r = drill(
                &args.connect,
                &args.region,
                args.duration,
                &args.policy,
                args.region_controller.as_deref(),
                args.patience,
                Disruption::Drain,
            ) => r,
            _ = tokio::signal::ctrl_c() => {
                undrain(&args.connect, &args.region, args.region_controller.as_deref()).await;
                return ExitCode::from(2);
            }
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => return super::fail(&e, 2),
        };
        if let Some(path) = &args.report {
            if let Err(e) = write_report(&report, path) {
                return super::fail(&e, 2);
            }
        }
        let mut text = summary(&report);
        if let Some(path) = &args.report {
            text.push_str(&format!("report: {}\n", path.display()));
        }
        super::output::emit(&text);
        ExitCode::from(u8::from(!report.passed))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str) -> Policy {
        Policy::load_file(Path::new(&format!(
            "{}/../policies/{name}",
            env!("CARGO_MANIFEST_DIR")
        )))
        .expect("policy")
    }

    #[test]
    fn one_probe_per_rule_and_data_class() {
        let names: Vec<String> = probes(&policy("seed-federation.yaml"))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("rule 1:")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("rule 2:")), "{names:?}");
        assert!(names.contains(&"no rule".to_string()), "{names:?}");
        let classes = probes(&policy("seed-data-class-gdpr.yaml"));
        assert!(
            classes
                .iter()
                .any(|p| p.name.starts_with("rule 2:") && p.name.ends_with("; data class eu-pii")),
            "{:?}",
            classes.iter().map(|p| &p.name).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_placement_other_than_the_policys_disagrees() {
        let p = policy("seed-federation.yaml");
        let de: Attributes = [(
            "customer_region".to_string(),
            crate::policy::AttrValue::Str("DE".into()),
        )]
        .into();
        let during = expected(&p, &de, Some(("europe", false)));
        assert_eq!(during.outcome.region(), Some("north_america"));
        assert!(agrees(&p, &during, Some("north_america")));
        assert!(!agrees(&p, &during, Some("europe")));
        assert!(!agrees(&p, &during, None));
        let strict = policy("seed-requires-gdpr.yaml");
        let refused = expected(&strict, &de, Some(("europe", true)));
        assert!(agrees(&strict, &refused, None));
        assert!(!agrees(&strict, &refused, Some("north_america")));
    }
}
