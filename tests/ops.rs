//! Operations surface: Prometheus metrics and the status page on the admin
//! HTTP port. The page is rendered by headless Chromium (Debian's `chromium`
//! package, installed by `.ci/run`), and the test asserts on the rendered DOM.

mod support;

use std::process::Command;

use federation::sandbox::string_attrs;
use federation_api as api;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_page() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let mut client = sandbox.client("north_america").await.expect("client");
    for customer in ["DE", "US", "JP"] {
        let _ = client
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", customer)]),
                ..Default::default()
            })
            .await;
    }
    sandbox.kill_controller("asia_pacific").expect("kill");
    sandbox
        .wait_for_states("north_america", &[("asia_pacific", "dead")], PATIENCE)
        .await
        .expect("dead");

    let admin = sandbox
        .admin_http_addr("north_america")
        .expect("admin addr");
    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .expect("join");
    for needle in [
        "federation_decisions_total{rule=\"2\",outcome=\"routed\"} 1",
        "federation_decisions_total{rule=\"1\",outcome=\"routed\"} 1",
        "federation_decisions_total{rule=\"none\",outcome=\"rejected\"} 1",
        "federation_peer_state{region=\"asia_pacific\",state=\"dead\"} 1",
        "federation_peer_state{region=\"europe\",state=\"alive\"} 1",
        "federation_forward_seconds_count{region=\"europe\"} 1",
        "federation_queue_depth 1",
        "federation_advertisement_age_seconds{region=\"europe\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "missing `{needle}` in:\n{metrics}"
        );
    }
    // Standard shapes: the plain scrape is the Prometheus text format and
    // passes promtool; OpenMetrics when asked for it.
    for needle in [
        "# TYPE federation_decisions_total counter",
        "federation_build_info{version=\"",
        "# TYPE process_cpu_seconds_total counter",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "federation_grpc_server_handled_total{service=\"federation.v1.FederationClient\",method=\"SubmitTask\",code=\"OK\"} 2",
        "federation_grpc_server_handled_total{service=\"federation.v1.FederationClient\",method=\"SubmitTask\",code=\"FailedPrecondition\"} 1",
        "federation_grpc_server_handling_seconds_count{service=\"federation.v1.FederationPeer\",method=\"Advertise\"}",
        "federation_store_commit_seconds_count ",
        "federation_decision_log_append_seconds_count ",
        "federation_registered_agents 0",
        "federation_certificate_expiry_timestamp_seconds ",
    ] {
        assert!(
            metrics.contains(needle),
            "missing `{needle}` in:\n{metrics}"
        );
    }
    assert!(!metrics.contains("# EOF"), "{metrics}");
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "promtool is installed (`.ci/run` installs Debian's prometheus package)"
    );
    let checked = {
        use std::io::Write as _;
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(metrics.as_bytes())
            .expect("feed promtool");
        child.wait_with_output().expect("promtool ends")
    };
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (head, openmetrics) = tokio::task::spawn_blocking(move || {
        http_get_with(
            admin,
            "/metrics",
            &[(
                "Accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )],
        )
    })
    .await
    .expect("join");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        openmetrics.contains("# TYPE federation_decisions counter")
            && openmetrics.trim_end().ends_with("# EOF"),
        "{openmetrics}"
    );

    // The status page, as a browser renders it.
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is installed (`.ci/run` installs Debian's chromium package)");
    let out_dir =
        std::env::temp_dir().join(format!("federation-status-page-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let url = format!("http://{admin}/");
    let common = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            out_dir.join("profile").display()
        ));
    };
    let dom = {
        let mut cmd = Command::new(chromium);
        common(&mut cmd);
        cmd.arg("--dump-dom").arg(&url);
        tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("chromium runs")
    };
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let shot = out_dir.join("status-page.png");
    {
        let mut cmd = Command::new(chromium);
        common(&mut cmd);
        cmd.arg(format!("--screenshot={}", shot.display()))
            .arg("--window-size=1200,800")
            .arg(&url);
        let _ = tokio::task::spawn_blocking(move || cmd.output()).await;
    }
    eprintln!("status page screenshot: {}", shot.display());
    for needle in [
        "Global Enterprise Federation",
        "<b id=\"self\">north_america</b>",
        "<td class=\"alive\">alive</td>",
        "<td class=\"dead\">dead</td>",
        "GDPR, SOX",
        "rule 2: customer_region in ['UK', 'DE', 'FR'] matched; routed to primary europe",
        "no routing rule matches these attributes",
    ] {
        assert!(
            dom.contains(needle),
            "rendered page lacks `{needle}`:\n{dom}"
        );
    }
}
