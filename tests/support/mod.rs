//! Shared helpers for the integration tests: locating the `federation`
//! binary that `cargo test --workspace` builds, the user's policy, and
//! bounded waiting.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use federation_sandbox::SandboxBuilder;

/// The user's example, unchanged (the sandbox's fixture).
pub const SEED: &str = federation_sandbox::SEED_POLICY;

/// A snapshot key ring for controllers started by hand (one 32-byte key).
pub const TEST_KEYS: &str = "test-key-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// How long any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `federation` binary built by cargo next to the test executable
/// (`target/<profile>/federation`).
pub fn federation_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps layout");
    let bin = profile_dir.join("federation");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// A sandbox of the user's federation.
pub fn seed_sandbox() -> SandboxBuilder {
    SandboxBuilder::new(federation_exe(), SEED)
}

/// Starts the sandbox `builder` describes and waits (bounded) until every
/// controller sees every other region alive.
pub async fn formed(builder: SandboxBuilder) -> federation_sandbox::Sandbox {
    builder
        .start_formed(PATIENCE)
        .await
        .expect("federation forms")
}

/// The seed with the EU rule requiring GDPR.
pub fn seed_requires_gdpr() -> String {
    federation_sandbox::SEED_REQUIRES_GDPR.to_string()
}

/// Polls `check` until it returns `Some`, at most `patience`.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until `client` reads task `id` as leased.
pub async fn wait_leased(
    client: &federation_api::federation_client_client::FederationClientClient<
        tonic::transport::Channel,
    >,
    what: &str,
    id: &str,
) {
    eventually(what, PATIENCE, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let t = c
                .get_task(federation_api::GetTaskRequest { task_id: id })
                .await
                .ok()?
                .into_inner()
                .task?;
            (t.state() == federation_api::TaskState::Leased).then_some(())
        }
    })
    .await;
}

/// The killed-agent scenario: an agent that never finishes (`sleep 600`)
/// leases a DE task in `region`, is SIGKILLed, and a fast agent (`cat`)
/// starts. Returns the task's id and its terminal state once the lease has
/// expired and the task was leased again (the controller's log on failure).
pub async fn killed_agents_task_runs_again(
    sandbox: &mut federation_sandbox::Sandbox,
    region: &str,
) -> (String, federation_api::Task) {
    let slow = sandbox
        .start_agent_with(region, "sleep 600", 1)
        .expect("slow agent");
    let client = sandbox.client(region).await.expect("client");
    let id = client
        .clone()
        .submit_task(federation_api::SubmitTaskRequest {
            attributes: federation_sandbox::string_attrs(&[("customer_region", "DE")]),
            payload: b"work".to_vec(),
            ..Default::default()
        })
        .await
        .expect("accepted")
        .into_inner()
        .task_id;
    wait_leased(&client, "the slow agent leases the task", &id).await;
    sandbox.kill_agent(region, slow).expect("kill agent");
    sandbox
        .start_agent_with(region, "cat", 1)
        .expect("fast agent");
    let t = sandbox
        .wait_terminal(region, &id, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sandbox.controller_log_text(region)));
    (id, t)
}

/// A plain HTTP/1.1 GET on loopback (bounded by timeouts); returns the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    http_get_with(addr, path, &[]).1
}

/// [`http_get`] with extra request headers; returns the response head and
/// the body.
pub fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (String, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_string(), body.to_string())
}

/// Submits DE tasks through `region`'s controller from 8 concurrent workers
/// (idempotency keys `w{w}-{i}`), SIGKILLs that controller once `acked`
/// holds at least `before_kill` acknowledged ids, and returns `acked` with
/// every id acknowledged until the stream went quiet (5 s) after the kill.
/// The controller is left stopped.
pub async fn acked_across_a_kill(
    sandbox: &mut federation_sandbox::Sandbox,
    region: &str,
    before_kill: usize,
    mut acked: Vec<String>,
) -> Vec<String> {
    use federation_api as api;
    use federation_sandbox::string_attrs;
    let client = sandbox.client(region).await.expect("client");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for w in 0..8 {
        let mut c = client.clone();
        let tx = tx.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let req = api::SubmitTaskRequest {
                    attributes: string_attrs(&[("customer_region", "DE")]),
                    idempotency_key: format!("w{w}-{i}"),
                    ..Default::default()
                };
                match c.submit_task(req).await {
                    Ok(r) => {
                        if tx.send(r.into_inner().task_id).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(tx);
    while acked.len() < before_kill {
        match tokio::time::timeout(PATIENCE, rx.recv()).await {
            Ok(Some(id)) => acked.push(id),
            _ => panic!(
                "submissions stalled after {} acks: {}",
                acked.len(),
                sandbox.controller_log_text(region)
            ),
        }
    }
    sandbox.kill_controller(region).expect("kill");
    while let Ok(Some(id)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        acked.push(id);
    }
    for w in workers {
        let _ = w.await;
    }
    eprintln!("{} tasks acknowledged before SIGKILL", acked.len());
    acked
}
