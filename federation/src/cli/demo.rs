//! `federation demo`: the user's example federation, end to end, on loopback.
//!
//! Starts one controller per region of `policies/seed-federation.yaml` (as
//! child processes of this binary) with two agents each, submits tasks for
//! US, CA, DE, UK and JP and prints where each went and why; then kills
//! europe's controller and shows UK/DE failing over to north_america (flagged:
//! it lacks GDPR) under the file as written, and refused under a variant whose
//! EU rule `requires: [GDPR]`; US is unaffected throughout. Finally europe
//! restarts and takes EU traffic again. Every child is killed when the demo
//! ends, also on Ctrl-C or failure; the demo checks what it shows and exits 1
//! if the federation did not behave as described. Europe gets EU traffic back
//! only after the failback hold-down (short in the demo), which it waits out.
//! With `--drill` it then runs a failover drill of europe ([`super::drill`],
//! stopping and restarting its controller) and prints where the report is.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use federation_api as api;

use super::LogFormat;
use crate::policy::AttrValue;
use federation_sandbox::{SEED_POLICY, SEED_REQUIRES_GDPR, Sandbox, SandboxBuilder};

/// The operator's client TLS of the demo's sandbox (set once per run): the
/// demo's federation runs on mutual TLS like a real one.
static TLS: std::sync::OnceLock<federation_tls::ClientTls> = std::sync::OnceLock::new();

async fn connect(addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    match TLS.get() {
        Some(tls) => Ok(tls
            .connect(
                &format!("https://{addr}"),
                federation_tls::Expect::AnyController,
                Duration::from_secs(10),
            )
            .await?),
        None => federation_sandbox::connect(addr).await,
    }
}

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the demo's data directories (decision logs, stores) and print where.
    #[arg(long)]
    pub keep: bool,
    /// Show the controllers' and agents' logs.
    #[arg(long)]
    pub verbose: bool,
    /// After the walkthrough, run a failover drill (`federation drill`) that
    /// stops and restarts europe's controller, and write its HTML report
    /// (about 15 s more).
    #[arg(long)]
    pub drill: bool,
    /// Instead of the walkthrough: europe served by three replicas on one
    /// PostgreSQL database (needs PostgreSQL installed); SIGKILLs its leader,
    /// then a second replica, while EU traffic keeps flowing in europe.
    #[arg(long, conflicts_with = "drill")]
    pub ha: bool,
}

struct Row {
    task: String,
    customer: String,
    rule: String,
    region: String,
    outcome: String,
    why: String,
}

async fn submit(entry: SocketAddr, customer: &str) -> anyhow::Result<(Row, Option<String>)> {
    let mut client =
        api::federation_client_client::FederationClientClient::new(connect(entry).await?);
    let mut attrs = crate::policy::Attributes::new();
    attrs.insert("customer_region".into(), AttrValue::Str(customer.into()));
    attrs.insert("data_class".into(), AttrValue::Str("pii".into()));
    let req = api::SubmitTaskRequest {
        attributes: crate::wire::attributes_to_wire(&attrs),
        payload: format!("order for a {customer} customer").into_bytes(),
        ..Default::default()
    };
    Ok(match client.submit_task(req).await {
        Ok(r) => {
            let r = r.into_inner();
            let d = r.decision.unwrap_or_default();
            let mut why = if d.outcome == "routed" {
                "primary is alive and compliant".to_string()
            } else {
                d.candidates
                    .iter()
                    .filter(|c| !c.accepted)
                    .map(|c| format!("{} {}", c.region, c.reason))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for w in &d.warnings {
                why.push_str(&format!("; WARNING {w}"));
            }
            (
                Row {
                    task: short_id(&r.task_id),
                    customer: customer.into(),
                    rule: format!("{}", d.rule_index + 1),
                    region: r.region,
                    outcome: d.outcome,
                    why,
                },
                Some(r.task_id),
            )
        }
        Err(s) => {
            let rule = s
                .message()
                .split(':')
                .next()
                .filter(|p| p.starts_with("rule "))
                .map(|p| {
                    p.trim_start_matches("rule ")
                        .split(' ')
                        .next()
                        .unwrap_or("-")
                        .to_string()
                })
                .unwrap_or_else(|| "-".into());
            (
                Row {
                    task: "-".into(),
                    customer: customer.into(),
                    rule,
                    region: "-".into(),
                    outcome: format!("rejected ({:?})", s.code()),
                    why: s.message().to_string(),
                },
                None,
            )
        }
    })
}

/// The random tail of a task's UUIDv7 (its head is the timestamp, shared by
/// tasks submitted close together).
fn short_id(id: &str) -> String {
    id.split('.')
        .next()
        .and_then(|uuid| uuid.get(uuid.len().saturating_sub(8)..))
        .unwrap_or(id)
        .to_string()
}

fn print_table(title: &str, rows: &[Row]) {
    super::output::say!("\n== {title}");
    super::output::say!(
        "{:<9} {:<16} {:<5} {:<14} {:<26} WHY",
        "TASK",
        "CUSTOMER_REGION",
        "RULE",
        "REGION",
        "OUTCOME"
    );
    for r in rows {
        super::output::say!(
            "{:<9} {:<16} {:<5} {:<14} {:<26} {}",
            r.task,
            r.customer,
            r.rule,
            r.region,
            r.outcome,
            r.why
        );
    }
}

async fn round(
    title: &str,
    entries: &[(SocketAddr, &str)],
) -> anyhow::Result<Vec<(Row, Option<String>)>> {
    let mut out = Vec::new();
    for (entry, customer) in entries {
        out.push(submit(*entry, customer).await?);
    }
    let rows: Vec<Row> = out
        .iter()
        .map(|(r, _)| Row {
            task: r.task.clone(),
            customer: r.customer.clone(),
            rule: r.rule.clone(),
            region: r.region.clone(),
            outcome: r.outcome.clone(),
            why: r.why.clone(),
        })
        .collect();
    print_table(title, &rows);
    Ok(out)
}

fn expect(
    rows: &[(Row, Option<String>)],
    customer: &str,
    region: &str,
    outcome_prefix: &str,
) -> anyhow::Result<()> {
    for (r, _) in rows.iter().filter(|(r, _)| r.customer == customer) {
        if r.region != region || !r.outcome.starts_with(outcome_prefix) {
            bail!(
                "demo check failed: {customer} went to {} ({}), expected {region} ({outcome_prefix})",
                r.region,
                r.outcome
            );
        }
    }
    Ok(())
}

async fn wait_done(
    entry: SocketAddr,
    ids: &[String],
    patience: Duration,
) -> anyhow::Result<Vec<api::Task>> {
    let mut client =
        api::federation_client_client::FederationClientClient::new(connect(entry).await?);
    let until = Instant::now() + patience;
    let mut done = Vec::new();
    for id in ids {
        loop {
            let t = client
                .get_task(api::GetTaskRequest {
                    task_id: id.clone(),
                })
                .await
                .with_context(|| format!("reading task {id}"))?
                .into_inner()
                .task
                .unwrap_or_default();
            let terminal = t.state >= api::TaskState::Succeeded as i32;
            if terminal || Instant::now() >= until {
                done.push(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(done)
}

async fn reload_all(demo: &Sandbox, names: &[&str], source: &str) -> anyhow::Result<String> {
    let mut hash = String::new();
    for name in names {
        let mut admin = demo.admin(name).await?;
        let r = admin
            .reload_policy(api::ReloadPolicyRequest {
                policy_source: source.to_string(),
                format: "yaml".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if !r.applied {
            bail!("{name} refused the policy: {}", r.error);
        }
        hash = r.policy_hash;
    }
    Ok(hash)
}

async fn scenario(demo: &mut Sandbox) -> anyhow::Result<()> {
    let _ = TLS.set(demo.client_tls(Some("operator"))?);
    if let Some(tls) = demo.tls() {
        super::output::say!(
            "  mutual tls: CA and certificates in {}",
            tls.layout.dir.display()
        );
    }
    for name in demo.region_names() {
        super::output::say!(
            "  {:<14} controller {}  (2 agents x 2 slots)  data {}",
            name,
            demo.url(&name)?,
            demo.data_dir(&name)?.display()
        );
    }
    let na = demo.addr("north_america")?;
    let eu = demo.addr("europe")?;
    let ap = demo.addr("asia_pacific")?;
    let patience = Duration::from_secs(20);
    demo.wait_formed(patience).await?;

    // 1. Everything up. Entries vary, to show forwarding.
    let rows = round(
        "1. all regions up (US via north_america, CA via asia_pacific, DE via north_america, UK via europe, JP via europe)",
        &[(na, "US"), (ap, "CA"), (na, "DE"), (eu, "UK"), (eu, "JP")],
    )
    .await?;
    expect(&rows, "US", "north_america", "routed")?;
    expect(&rows, "CA", "north_america", "routed")?;
    expect(&rows, "DE", "europe", "routed")?;
    expect(&rows, "UK", "europe", "routed")?;
    expect(&rows, "JP", "-", "rejected (FailedPrecondition)")?;
    let ids: Vec<String> = rows.iter().filter_map(|(_, id)| id.clone()).collect();
    let tasks = wait_done(ap, &ids, Duration::from_secs(20)).await?;
    super::output::say!("   results (read through asia_pacific, relayed to each owner):");
    for t in &tasks {
        super::output::say!(
            "   {:<9} {:<10} {}",
            short_id(&t.task_id),
            super::client::state_name(t.state),
            String::from_utf8_lossy(&t.result)
        );
    }
    if tasks
        .iter()
        .any(|t| t.state != api::TaskState::Succeeded as i32)
    {
        bail!("demo check failed: not every task succeeded");
    }

    // 2. Europe dies; the file as written fails EU customers over to north_america.
    super::output::say!(
        "\n-- killing europe's controller (SIGKILL) and waiting for the federation to declare it dead"
    );
    let killed = Instant::now();
    demo.kill_controller("europe")?;
    demo.wait_for_states("north_america", &[("europe", "dead")], patience)
        .await?;
    super::output::say!(
        "   europe declared dead by north_america after {:.1}s",
        killed.elapsed().as_secs_f64()
    );
    let rows = round(
        "2. europe down, policy as written (EU backup is north_america, which lacks GDPR)",
        &[(na, "UK"), (ap, "DE"), (na, "US")],
    )
    .await?;
    expect(&rows, "UK", "north_america", "failover")?;
    expect(&rows, "DE", "north_america", "failover")?;
    expect(&rows, "US", "north_america", "routed")?;
    super::output::say!(
        "   the auditor's view of this file: `federation policy check policies/seed-federation.yaml` flags the same failover"
    );

    // 3. The variant: the EU rule requires GDPR.
    let hash = reload_all(demo, &["north_america", "asia_pacific"], SEED_REQUIRES_GDPR).await?;
    super::output::say!(
        "\n-- reloaded north_america and asia_pacific with the variant whose EU rule says `requires: [\"GDPR\"]` (policy {})",
        &hash[..8.min(hash.len())]
    );
    let rows = round(
        "3. europe down, EU rule requires GDPR",
        &[(na, "UK"), (ap, "DE"), (na, "US")],
    )
    .await?;
    expect(&rows, "UK", "-", "rejected (Unavailable)")?;
    expect(&rows, "DE", "-", "rejected (Unavailable)")?;
    expect(&rows, "US", "north_america", "routed")?;
    super::output::say!("   UK/DE were refused, never sent to north_america; US is unaffected");

    // 4. Europe returns.
    let original = reload_all(demo, &["north_america", "asia_pacific"], SEED_POLICY).await?;
    super::output::say!(
        "\n-- restored the original policy ({}) and restarted europe",
        &original[..8.min(original.len())]
    );
    demo.start_controller("europe")?;
    demo.wait_for_states("north_america", &[("europe", "alive")], patience)
        .await?;
    super::output::say!(
        "   europe is alive again; waiting out the failback hold-down ({FAILBACK_HOLD_DOWN}) before EU traffic goes back to it"
    );
    wait_failback(na, "DE", "europe", patience).await?;
    wait_failback(ap, "UK", "europe", patience).await?;
    let rows = round("4. europe back", &[(na, "DE"), (ap, "UK"), (eu, "US")]).await?;
    expect(&rows, "DE", "europe", "routed")?;
    expect(&rows, "UK", "europe", "routed")?;
    expect(&rows, "US", "north_america", "routed")?;

    super::output::say!("\n== decision logs (hash-chained; `federation audit verify DIR`)");
    for name in demo.region_names() {
        match crate::audit::verify(&demo.data_dir(&name)?.join("decisions.jsonl")) {
            Ok(report) if report.is_intact() => super::output::say!(
                "   {name:<14} {} records, chain intact, last hash {}",
                report.records,
                &report.last_hash[..16.min(report.last_hash.len())]
            ),
            Ok(report) => bail!("{name}: decision log broken: {:?}", report.first_broken),
            Err(e) => bail!("{name}: decision log does not verify: {e}"),
        }
    }
    Ok(())
}

/// A drill of europe through north_america, stopping and restarting
/// europe's controller; prints the summary and where the report is.
async fn demo_drill(demo: &mut Sandbox) -> anyhow::Result<()> {
    super::output::say!(
        "\n== failover drill: stop europe's controller, probe every rule, restart it, wait out the hold-down"
    );
    let report_path =
        std::env::temp_dir().join(format!("federation-demo-drill-{}.html", std::process::id()));
    let report = super::drill::sandbox_drill(
        demo,
        "north_america",
        "europe",
        Duration::from_secs(1),
        true,
    )
    .await?;
    super::drill::write_report(&report, &report_path)?;
    super::output::emit(&super::drill::summary(&report));
    super::output::say!("   drill report: {}", report_path.display());
    if !report.passed {
        bail!(
            "the drill found differences: {}",
            report.differences.join("; ")
        );
    }
    Ok(())
}

/// The demo's failback hold-down (short, so the demo stays quick).
const FAILBACK_HOLD_DOWN: &str = "2s";

/// Waits (bounded) until `entry` would route `customer` to `region` again
/// (the returning region's failback hold-down is over).
async fn wait_failback(
    entry: SocketAddr,
    customer: &str,
    region: &str,
    patience: Duration,
) -> anyhow::Result<()> {
    let mut client =
        api::federation_client_client::FederationClientClient::new(connect(entry).await?);
    let mut attrs = crate::policy::Attributes::new();
    attrs.insert("customer_region".into(), AttrValue::Str(customer.into()));
    let request = api::ExplainRouteRequest {
        attributes: crate::wire::attributes_to_wire(&attrs),
        ..Default::default()
    };
    let until = Instant::now() + patience;
    loop {
        let d = client
            .explain_route(request.clone())
            .await?
            .into_inner()
            .decision
            .unwrap_or_default();
        if d.region == region {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!(
                "{customer} still routed to `{}` after {patience:?}",
                d.region
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs, log: LogFormat) -> ExitCode {
    if args.ha {
        return super::demo_ha::run(args.verbose, args.keep, log);
    }
    if args.verbose {
        super::serve::init_tracing(log);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return super::fail(&anyhow::Error::new(e), 1),
    };
    let exe = match std::env::current_exe().context("locating the federation binary") {
        Ok(e) => e,
        Err(e) => return super::fail(&e, 1),
    };
    super::output::say!(
        "federation demo: the user's example (policies/seed-federation.yaml), one controller per region on loopback"
    );
    let started = Instant::now();
    let sandbox = SandboxBuilder::new(exe, SEED_POLICY)
        .env("FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL", "500ms")
        .env("FEDERATION__NODE__TIMERS__DEAD_AFTER", "2s")
        .env(
            "FEDERATION__NODE__TIMERS__FAILBACK_HOLD_DOWN",
            FAILBACK_HOLD_DOWN,
        )
        .agents(2, 2)
        .exec("printf 'processed a %s customer' \"$FEDERATION_ATTR_CUSTOMER_REGION\"")
        .verbose(args.verbose)
        .keep(args.keep)
        .start();
    let mut sandbox = match sandbox {
        Ok(s) => s,
        Err(e) => return super::fail(&e, 1),
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                scenario(&mut sandbox).await?;
                if args.drill {
                    demo_drill(&mut sandbox).await?;
                }
                Ok(())
            } => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    if args.keep {
        super::output::say!("kept the demo's data in {}", sandbox.dir().display());
    }
    // Dropping the sandbox kills every child and removes its folder.
    drop(sandbox);
    match result {
        Ok(()) => {
            super::output::say!(
                "\ndemo finished in {:.1}s; every process it started has been stopped",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e, 1),
    }
}
