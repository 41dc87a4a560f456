//! Off-the-shelf gRPC tooling against a controller: the standard health
//! service (what Kubernetes gRPC probes call) and server reflection, checked
//! with Python's `grpcio`, `grpcio-health-checking` and `grpcio-reflection`
//! from PyPI (installed into a virtualenv under `target/` on first use).

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

/// A virtualenv with the Python gRPC packages, created once per target dir.
fn python_with_grpc() -> PathBuf {
    let exe = federation_exe();
    let target = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let venv = target.join("python-grpc-venv");
    let python = venv.join("bin").join("python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv runs (python3 is part of the machine)");
        assert!(status.success(), "creating {}", venv.display());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "grpcio-health-checking",
                "grpcio-reflection",
            ])
            .status()
            .expect("pip runs");
        assert!(
            status.success(),
            "pip install grpcio grpcio-health-checking grpcio-reflection failed (PyPI unreachable?)"
        );
        std::fs::write(&ready, "ok").expect("marker");
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_work_with_python_grpcio() {
    let python = tokio::task::spawn_blocking(python_with_grpc)
        .await
        .expect("venv");
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    // Over the controller's TLS (as the federation runs by default), trusting
    // the federation CA and presenting no client certificate.
    let addr = sandbox.addr("europe").expect("addr").to_string();
    let ca = sandbox.tls().expect("tls on").layout.ca();
    let ca = ca.to_str().expect("utf-8 path");
    probe(
        &python,
        &[&addr, ca],
        &[
            "health <server> SERVING",
            "health federation.v1.FederationClient SERVING",
            "health federation.v1.RegionAgentApi SERVING",
            "health no.such.Service NOT_FOUND",
            "reflection service federation.v1.FederationClient",
            "reflection service federation.v1.FederationPeer",
            "reflection service federation.v1.RegionAgentApi",
            "reflection service federation.v1.FederationAdmin",
            "reflection service grpc.health.v1.Health",
            "reflection file federation/v1/federation.proto",
        ],
    )
    .await;

    // The plaintext health-only port (for Kubernetes gRPC probes, which
    // cannot speak TLS): health answers, nothing else is there.
    let health = sandbox
        .health_addr("europe")
        .expect("health addr")
        .to_string();
    probe(
        &python,
        &[&health, "--health-only"],
        &["health <server> SERVING", "reflection UNIMPLEMENTED"],
    )
    .await;
}

/// Runs `tests/python/grpc_probe.py ARGS` and asserts it succeeds and prints
/// every expected line.
async fn probe(python: &std::path::Path, args: &[&str], expect: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_probe.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for line in expect {
        assert!(
            stdout.lines().any(|l| l == *line),
            "missing `{line}` in:\n{stdout}{stderr}"
        );
    }
}
