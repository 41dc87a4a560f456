//! `federation demo`, the README's main command, run as a user runs it: its
//! federation is on mutual TLS (a plaintext client is refused while it runs,
//! a client trusting its CA is answered), it tells the user's story, exits 0
//! and leaves no process behind.

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use federation_api as api;
use federation_sandbox::ChildGuard;
use support::*;

/// Every process whose command line mentions `needle` (from /proc).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmd| cmd.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_on_mutual_tls_and_cleans_up() {
    let mut cmd = Command::new(federation_exe());
    cmd.arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // Its own process group: if this test fails midway, dropping the guard
    // kills the demo's controllers and agents too.
    let mut demo = ChildGuard::spawn_group("demo", &mut cmd).expect("demo starts");
    let stdout = demo.stdout().expect("piped stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Read until the certificates folder and asia_pacific's controller are
    // announced (asia_pacific stays up for the whole demo).
    let mut text = String::new();
    let (mut certs, mut url) = (None, None);
    let until = Instant::now() + PATIENCE;
    while (certs.is_none() || url.is_none()) && Instant::now() < until {
        let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await else {
            continue;
        };
        if let Some(dir) = line.split("CA and certificates in ").nth(1) {
            certs = Some(std::path::PathBuf::from(dir.trim()));
        }
        if line.trim_start().starts_with("asia_pacific") {
            url = line
                .split_whitespace()
                .find(|w| w.starts_with("https://"))
                .map(str::to_string);
        }
        text.push_str(&line);
        text.push('\n');
    }
    let certs = certs.unwrap_or_else(|| panic!("no certificates folder announced:\n{text}"));
    let url = url.unwrap_or_else(|| panic!("no https controller announced:\n{text}"));
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().expect("addr");

    // A client with the demo's CA and operator certificate is answered
    // (once the controller listens)...
    let layout = federation_tls::dev::Layout { dir: certs.clone() };
    let (cert, key) = layout.pair("operator");
    let tls = federation_tls::ClientTls::load(&layout.ca(), Some((&cert, &key)), "")
        .expect("the demo's operator credentials");
    let status = eventually("status over mutual TLS", PATIENCE, || async {
        let ch = tls
            .connect(
                &url,
                federation_tls::Expect::Region("asia_pacific".into()),
                Duration::from_secs(5),
            )
            .await
            .ok()?;
        api::federation_admin_client::FederationAdminClient::new(ch)
            .federation_status(api::FederationStatusRequest {})
            .await
            .ok()
    })
    .await
    .into_inner();
    assert_eq!(status.self_region, "asia_pacific");
    // ...and a plaintext client of the same live controller is refused.
    if let Ok(ch) = federation_sandbox::connect(addr).await {
        let mut c = api::federation_admin_client::FederationAdminClient::new(ch);
        c.federation_status(api::FederationStatusRequest {})
            .await
            .expect_err("a plaintext client is refused by the demo's controller");
    }

    // The rest of the story, then a clean exit.
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(line)) => {
                text.push_str(&line);
                text.push('\n');
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let status = demo
        .wait_timeout(Duration::from_secs(30))
        .expect("the demo exits");
    assert!(status.success(), "demo failed:\n{text}");
    for needle in [
        "WARNING failover to north_america drops compliance tag(s) held by primary europe: GDPR",
        "UK/DE were refused, never sent to north_america; US is unaffected",
        "lacks GDPR",
        "chain intact",
        "every process it started has been stopped",
    ] {
        assert!(
            text.contains(needle),
            "demo output lacks `{needle}`:\n{text}"
        );
    }
    let sandbox_dir = certs
        .parent()
        .expect("certs live in the sandbox folder")
        .display()
        .to_string();
    let left = processes_mentioning(&sandbox_dir);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(
        !std::path::Path::new(&sandbox_dir).exists(),
        "sandbox folder {sandbox_dir} left behind"
    );
}

/// `federation demo --ha` (PostgreSQL installed, as in CI): europe's leader
/// and then a second replica SIGKILLed under EU traffic, every EU task still
/// placed in europe, a new leader, one intact chain; exit 0, nothing left.
#[test]
fn demo_ha_keeps_eu_traffic_in_europe_through_the_loss_of_two_replicas() {
    let mut cmd = Command::new(federation_exe());
    cmd.args(["demo", "--ha"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut demo = ChildGuard::spawn_group("demo --ha", &mut cmd).expect("demo --ha starts");
    let stdout = demo.stdout().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = demo
        .wait_timeout(Duration::from_secs(180))
        .expect("demo --ha exits");
    let text = reader.join().unwrap_or_default();
    assert!(status.success(), "demo --ha failed:\n{text}");
    let kills = text.matches("SIGKILL of").count();
    assert_eq!(kills, 2, "two replicas killed:\n{text}");
    let placed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("EU tasks placed in europe"))
        .collect();
    assert_eq!(placed.len(), 3, "three phases of traffic:\n{text}");
    for l in placed {
        assert!(
            l.contains(", 0 elsewhere,"),
            "EU tasks left europe: {l}\n{text}"
        );
    }
    for needle in [
        "took the region's leadership",
        "chain intact",
        "every process it started has been stopped",
    ] {
        assert!(
            text.contains(needle),
            "demo --ha output lacks `{needle}`:\n{text}"
        );
    }
    let left = processes_mentioning("federation-pg-");
    assert!(left.is_empty(), "PostgreSQL left behind: {left:?}");
}
