//! `federation demo --ha`: the user's example with europe served by three
//! controllers ("replicas") sharing one PostgreSQL database, on loopback.
//!
//! Needs PostgreSQL from the distribution's packages (`initdb` under
//! `/usr/lib/postgresql/*/bin`, or `FEDERATION_PG_BIN`); starts a throwaway
//! server, then the federation (north_america and asia_pacific one
//! controller each). While EU submits keep arriving through north_america
//! and asia_pacific, it SIGKILLs europe's leader, then a second replica:
//! every EU task stays in europe (none goes to north_america, the rule's
//! non-GDPR backup), europe is never declared dead, and another replica
//! takes the region's leadership. Finally it verifies europe's one decision
//! chain in the database. Exits 1 if the federation did not behave so.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use federation_api as api;
use federation_sandbox::{SEED_POLICY, Sandbox, SandboxBuilder};

use super::LogFormat;

const REPLICAS: usize = 3;
const DEAD_AFTER: &str = "2s";

/// The replicas of europe whose log says they lead now, among `alive`.
fn leaders(demo: &Sandbox, alive: &[usize]) -> Vec<usize> {
    alive
        .iter()
        .copied()
        .filter(|&i| {
            let log = demo.replica_log_text("europe", i);
            let leads = log.rfind("this replica leads its region");
            let lost = log.rfind("this replica no longer leads its region");
            leads.is_some() && leads > lost
        })
        .collect()
}

/// Waits (bounded) until exactly one of `alive` leads; returns it.
async fn one_leader(demo: &Sandbox, alive: &[usize], patience: Duration) -> anyhow::Result<usize> {
    let until = Instant::now() + patience;
    loop {
        if let [one] = leaders(demo, alive)[..] {
            return Ok(one);
        }
        if Instant::now() >= until {
            bail!(
                "demo check failed: no single leader among europe's replicas {alive:?} after {patience:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn eu_request(country: &str, n: usize) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: federation_sandbox::string_attrs(&[("customer_region", country)]),
        payload: format!("order {n} of a {country} customer").into_bytes(),
        ..Default::default()
    }
}

/// Where EU tasks went during a phase.
#[derive(Default)]
struct Tally {
    europe: usize,
    elsewhere: Vec<String>,
    failed: Vec<String>,
}

/// Submits DE/UK/FR tasks through north_america and asia_pacific, in turn,
/// for `secs` (at most 2,000 calls).
async fn eu_traffic(demo: &Sandbox, secs: f64) -> anyhow::Result<Tally> {
    let mut na = demo.client("north_america").await?;
    let mut ap = demo.client("asia_pacific").await?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tally = Tally::default();
    for n in 0..2_000 {
        if Instant::now() >= until {
            break;
        }
        let country = ["DE", "UK", "FR"][n % 3];
        let (entry, client) = if n % 2 == 0 {
            ("north_america", &mut na)
        } else {
            ("asia_pacific", &mut ap)
        };
        match client.submit_task(eu_request(country, n)).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.region == "europe" {
                    tally.europe += 1;
                } else {
                    tally
                        .elsewhere
                        .push(format!("{country} via {entry} → {}", r.region));
                }
            }
            Err(s) => tally.failed.push(format!(
                "{country} via {entry}: {:?} {}",
                s.code(),
                s.message()
            )),
        }
    }
    Ok(tally)
}

fn report(title: &str, t: &Tally) -> anyhow::Result<()> {
    super::output::say!(
        "   {title}: {} EU tasks placed in europe, {} elsewhere, {} refused",
        t.europe,
        t.elsewhere.len(),
        t.failed.len()
    );
    if !t.elsewhere.is_empty() {
        bail!(
            "demo check failed: EU tasks left europe while a replica was alive: {}",
            t.elsewhere.join("; ")
        );
    }
    if t.europe == 0 {
        bail!(
            "demo check failed: no EU task was placed: {}",
            t.failed.join("; ")
        );
    }
    Ok(())
}

/// Fails if north_america does not see europe alive.
async fn europe_alive(demo: &Sandbox) -> anyhow::Result<()> {
    let row = demo.status_row("north_america", "europe").await?;
    if row.state != "alive" {
        bail!(
            "demo check failed: north_america sees europe {} while a replica is alive",
            row.state
        );
    }
    Ok(())
}

async fn scenario(demo: &mut Sandbox, url: &str) -> anyhow::Result<()> {
    let patience = Duration::from_secs(30);
    demo.wait_formed(patience).await?;
    for name in demo.region_names() {
        for i in 0..demo.replica_count(&name) {
            super::output::say!(
                "  {:<14} {} {}",
                name,
                if demo.replica_count(&name) > 1 {
                    format!("replica europe-{}", i + 1)
                } else {
                    "controller".to_string()
                },
                demo.replica_addr(&name, i)?
            );
        }
    }
    super::output::say!("  europe's store and decision log: {}", redact(url));
    let mut alive: Vec<usize> = (0..REPLICAS).collect();
    let leader = one_leader(demo, &alive, patience).await?;
    super::output::say!("\n== 1. all up: europe-{} leads europe", leader + 1);
    report(
        "2 s of EU traffic through north_america and asia_pacific",
        &eu_traffic(demo, 2.0).await?,
    )?;

    super::output::say!(
        "\n== 2. SIGKILL of europe's leader, europe-{}, with EU traffic flowing",
        leader + 1
    );
    let killed = Instant::now();
    demo.kill_replica("europe", leader)?;
    alive.retain(|&i| i != leader);
    let new_leader = async {
        let next = one_leader(demo, &alive, patience).await?;
        Ok::<_, anyhow::Error>((next, killed.elapsed()))
    };
    let (traffic, next) = tokio::join!(eu_traffic(demo, 3.0), new_leader);
    report("the 3 s after the kill", &traffic?)?;
    europe_alive(demo).await?;
    let (next, took) = next?;
    super::output::say!(
        "   europe-{} took the region's leadership {:.1} s after the kill (dead_after {DEAD_AFTER}); north_america sees europe alive",
        next + 1,
        took.as_secs_f64()
    );

    let second = alive[0];
    super::output::say!(
        "\n== 3. SIGKILL of a second replica, europe-{}: one replica left",
        second + 1
    );
    demo.kill_replica("europe", second)?;
    alive.retain(|&i| i != second);
    report("the 3 s after the kill", &eu_traffic(demo, 3.0).await?)?;
    europe_alive(demo).await?;
    let last = one_leader(demo, &alive, patience).await?;
    super::output::say!("   europe-{} serves and leads europe alone", last + 1);

    super::output::say!("\n== europe's decision log: one hash chain in its database");
    let url = url.to_string();
    let (records, intact) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let db = super::audit::read_database(&url, Some("europe"))?;
        let report = crate::audit::LogBytes::from(db.bytes).verify();
        Ok((report.records, report.is_intact()))
    })
    .await
    .context("verifying the chain")??;
    if !intact {
        bail!("demo check failed: europe's decision chain does not verify");
    }
    super::output::say!(
        "   {records} records, chain intact (`federation audit verify <url> --region europe`)"
    );
    Ok(())
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Runs `demo --ha`.
pub fn run(verbose: bool, keep: bool, log: LogFormat) -> ExitCode {
    if verbose {
        super::serve::init_tracing(log);
    }
    if federation_sandbox::pg::bin_dir().is_none() {
        let e = anyhow::anyhow!(
            "`demo --ha` needs PostgreSQL (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql, or set FEDERATION_PG_BIN; `federation demo` runs without it"
        );
        return super::fail(&e, 1);
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
        "federation demo --ha: the user's example, europe served by {REPLICAS} replicas on one PostgreSQL database, on loopback"
    );
    let started = Instant::now();
    let pg = match federation_sandbox::pg::PgServer::start() {
        Ok(pg) => pg,
        Err(e) => return super::fail(&e.context("starting PostgreSQL"), 1),
    };
    let url = match pg.create_database("demo_ha") {
        Ok(u) => u,
        Err(e) => return super::fail(&e, 1),
    };
    super::output::say!("  PostgreSQL {} on 127.0.0.1:{}", pg.version(), pg.port());
    let sandbox = SandboxBuilder::new(exe, SEED_POLICY)
        .env("FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL", "500ms")
        .env("FEDERATION__NODE__TIMERS__DEAD_AFTER", DEAD_AFTER)
        .agents(1, 2)
        .replicas("europe", REPLICAS)
        .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
        .region_env("europe", "FEDERATION__NODE__STORE__URL", &url)
        .region_env("europe", "FEDERATION__NODE__STORE__POOL_SIZE", "4")
        .region_env("europe", "FEDERATION__NODE__REPLICA", "europe-1")
        .verbose(verbose)
        .keep(keep)
        .start();
    let mut sandbox = match sandbox {
        Ok(s) => s,
        Err(e) => return super::fail(&e, 1),
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = scenario(&mut sandbox, &url) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    if keep {
        super::output::say!("kept the demo's data in {}", sandbox.dir().display());
    }
    drop(sandbox);
    drop(pg);
    match result {
        Ok(()) => {
            super::output::say!(
                "\ndemo --ha finished in {:.1}s; every process it started has been stopped",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e, 1),
    }
}
