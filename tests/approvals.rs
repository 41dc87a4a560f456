//! Signed policy bundles on real controllers: a federation whose file
//! requires two of three approvals starts only with them, refuses reloads
//! (ReloadPolicy and SIGHUP) that lack a valid quorum — a bad signature,
//! one approver twice, an approval of other content, an unknown key — and
//! keeps the old policy, then accepts a quorum; the decision log records
//! each policy put in force with its approvers and still verifies.

mod support;

use std::path::Path;
use std::process::Command;

use federation::approvals::{self, Approval, ApprovalsFile, SigningKey as Ed25519KeyPair};
use federation_api as api;
use federation_sandbox::{ChildGuard, Sandbox, SandboxBuilder};
use support::{PATIENCE, SEED, eventually, federation_exe, formed};

struct Keys {
    alice: Ed25519KeyPair,
    bob: Ed25519KeyPair,
    carol: Ed25519KeyPair,
    mallory: Ed25519KeyPair,
}

fn pair() -> Ed25519KeyPair {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.key");
    let (pem, _) = approvals::generate().expect("generate");
    std::fs::write(&path, pem).expect("write key");
    approvals::load_signing_key(&path).expect("load key")
}

fn keys() -> Keys {
    Keys {
        alice: pair(),
        bob: pair(),
        carol: pair(),
        mallory: pair(),
    }
}

/// `base` with a `policy:` section naming alice, bob and carol, quorum 2.
fn with_approvers(base: &str, k: &Keys) -> String {
    let public = |p: &Ed25519KeyPair| approvals::public_key_of(p).to_string();
    base.replace(
        "  data_synchronization:",
        &format!(
            "  policy:\n    approvers:\n      alice: \"{}\"\n      bob: \"{}\"\n      carol: \"{}\"\n    quorum: 2\n    require_approvals: true\n  data_synchronization:",
            public(&k.alice),
            public(&k.bob),
            public(&k.carol)
        ),
    )
}

fn bundle(approvals: Vec<Approval>) -> String {
    serde_json::to_string(&ApprovalsFile {
        approvals,
        ..Default::default()
    })
    .expect("json")
}

/// Replaces a file the way a ConfigMap update does (rename), so that a poll
/// never reads half of it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn records(sandbox: &Sandbox, region: &str, kind: &str) -> Vec<serde_json::Value> {
    let path = sandbox
        .data_dir(region)
        .expect("data dir")
        .join("decisions.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == kind)
        .collect()
}

async fn reload(sandbox: &Sandbox, text: &str, approvals: &str) -> api::ReloadPolicyResponse {
    let mut admin = sandbox.admin("europe").await.expect("admin");
    admin
        .reload_policy(api::ReloadPolicyRequest {
            policy_source: text.to_string(),
            format: "yaml".into(),
            approvals: approvals.to_string(),
            ..Default::default()
        })
        .await
        .expect("reload call")
        .into_inner()
}

async fn policy_hash(sandbox: &Sandbox) -> String {
    let mut admin = sandbox.admin("europe").await.expect("admin");
    admin
        .federation_status(api::FederationStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .policy_hash
}

fn audit_verify(dir: &Path) {
    let out = Command::new(federation_exe())
        .args(["audit", "verify"])
        .arg(dir)
        .output()
        .expect("audit verify runs");
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_approvals_is_required_to_start_and_to_reload() {
    let k = keys();
    let text = with_approvers(SEED, &k);
    let content = text.as_bytes();
    let start_bundle = bundle(vec![
        approvals::sign(&k.alice, "alice", content),
        approvals::sign(&k.bob, "bob", content),
    ]);

    // Without a quorum, `serve` refuses to start (exit 64), naming who is missing.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("federation.yaml");
    std::fs::write(&config, &text).expect("write");
    std::fs::write(
        approvals::approvals_path(&config),
        bundle(vec![approvals::sign(&k.alice, "alice", content)]),
    )
    .expect("write approvals");
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let mut cmd = Command::new(federation_exe());
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args([
            "--region",
            "europe",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("FEDERATION_KEYS", support::TEST_KEYS)
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let mut child = ChildGuard::spawn("unapproved controller", &mut cmd).expect("spawn");
    let status = child.wait_timeout(PATIENCE).expect("serve exits");
    let stderr = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("1 valid of quorum 2")
            && stderr.contains("signed by alice; missing bob, carol"),
        "{stderr}"
    );

    // With two of three, the federation starts and records the approvals.
    let mut sandbox = formed(
        SandboxBuilder::new(federation_exe(), text.clone())
            .agents(0, 1)
            .file("federation.yaml.approvals", &start_bundle),
    )
    .await;
    let at_start = records(&sandbox, "europe", "policy_approved");
    assert_eq!(at_start.len(), 1, "{at_start:?}");
    let note = at_start[0]["note"].as_str().expect("note");
    assert!(
        note.contains("at start") && note.contains("signed by alice, bob; missing carol"),
        "{note}"
    );
    let before = policy_hash(&sandbox).await;

    // A proposed change: the EU rule requires GDPR.
    let variant = with_approvers(&support::seed_requires_gdpr(), &k);
    let new = variant.as_bytes();
    let forged = {
        // Another first base64 digit: still 64 bytes, another signature.
        let mut a = approvals::sign(&k.bob, "bob", new);
        let first = if a.signature.starts_with('A') {
            "B"
        } else {
            "A"
        };
        a.signature.replace_range(0..1, first);
        a
    };
    let refused_cases = [
        (
            "bad signature",
            vec![approvals::sign(&k.alice, "alice", new), forged],
            "approval 2 (bob): bad signature",
        ),
        (
            "one approver twice",
            vec![
                approvals::sign(&k.alice, "alice", new),
                approvals::sign(&k.alice, "alice", new),
            ],
            "alice already approved: counts once",
        ),
        (
            "approval over other content",
            vec![
                approvals::sign(&k.alice, "alice", new),
                approvals::sign(&k.bob, "bob", content),
            ],
            "approval 2 (bob): approves other content",
        ),
        (
            "unknown key",
            vec![
                approvals::sign(&k.alice, "alice", new),
                approvals::sign(&k.mallory, "bob", new),
            ],
            "approval 2 (claims `bob`): unknown key",
        ),
    ];
    for (case, list, why) in refused_cases {
        let r = reload(&sandbox, &variant, &bundle(list)).await;
        assert!(!r.applied, "{case}: applied");
        assert!(
            r.error.contains("1 valid of quorum 2")
                && r.error.contains("signed by alice; missing bob, carol")
                && r.error.contains(why),
            "{case}: {}",
            r.error
        );
        assert_eq!(r.policy_hash, before, "{case}: the old policy stays");
        assert_eq!(policy_hash(&sandbox).await, before, "{case}");
    }
    // No approvals at all.
    let r = reload(&sandbox, &variant, "").await;
    assert!(
        !r.applied
            && r.error
                .contains("signed by nobody; missing alice, bob, carol"),
        "{}",
        r.error
    );

    // A quorum (alice and carol) is accepted on the running controller.
    let good = bundle(vec![
        approvals::sign(&k.alice, "alice", new),
        approvals::sign(&k.carol, "carol", new),
    ]);
    let r = reload(&sandbox, &variant, &good).await;
    assert!(r.applied, "{}", r.error);
    assert_ne!(r.policy_hash, before);
    assert_eq!(policy_hash(&sandbox).await, r.policy_hash);
    let approved = records(&sandbox, "europe", "policy_approved");
    assert_eq!(approved.len(), 2, "{approved:?}");
    assert_eq!(approved[1]["policy_hash"], r.policy_hash.as_str());
    let note = approved[1]["note"].as_str().expect("note");
    assert!(
        note.contains("by reload") && note.contains("signed by alice, carol; missing bob"),
        "{note}"
    );

    // SIGHUP re-reads the file and its approvals file: refused while the
    // approvals are of the old content, applied once they match.
    let config = sandbox.config_path().to_path_buf();
    std::fs::write(&config, &text).expect("rewrite");
    std::fs::write(
        approvals::approvals_path(&config),
        bundle(vec![
            approvals::sign(&k.alice, "alice", new),
            approvals::sign(&k.bob, "bob", new),
        ]),
    )
    .expect("stale approvals");
    let refusals = records(&sandbox, "europe", "policy_reload").len();
    sandbox
        .controller("europe")
        .expect("controller")
        .signal("HUP")
        .expect("hup");
    let refusal = eventually("the SIGHUP refusal", PATIENCE, || async {
        let r = records(&sandbox, "europe", "policy_reload");
        (r.len() > refusals).then(|| r[r.len() - 1]["note"].as_str().unwrap_or("").to_string())
    })
    .await;
    assert!(
        refusal.starts_with("refused")
            && refusal.contains("signed by nobody; missing alice, bob, carol"),
        "{refusal}"
    );
    assert_ne!(
        policy_hash(&sandbox).await,
        before,
        "the reloaded policy stays"
    );
    std::fs::write(approvals::approvals_path(&config), &start_bundle).expect("approvals");
    sandbox
        .controller("europe")
        .expect("controller")
        .signal("HUP")
        .expect("hup");
    eventually("the SIGHUP reload", PATIENCE, || async {
        (policy_hash(&sandbox).await == before).then_some(())
    })
    .await;
    // The records follow the switch (appended right after it).
    let approved = eventually("the SIGHUP reload's record", PATIENCE, || async {
        let r = records(&sandbox, "europe", "policy_approved");
        (r.len() == 3).then_some(r)
    })
    .await;
    assert_eq!(approved[2]["policy_hash"], before.as_str());

    // The log, with its new record kind, still verifies.
    audit_verify(&sandbox.data_dir("europe").expect("dir"));
}

/// The policy poll (a mounted ConfigMap): the file changes first and is
/// refused while its approvals are of the old content; approvals arriving
/// later put it in force without another change of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_poll_applies_a_change_once_its_approvals_arrive() {
    let k = keys();
    let text = with_approvers(SEED, &k);
    let content = text.as_bytes();
    let sandbox = formed(
        SandboxBuilder::new(federation_exe(), text.clone())
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__POLICY_POLL", "200ms")
            .file(
                "federation.yaml.approvals",
                &bundle(vec![
                    approvals::sign(&k.alice, "alice", content),
                    approvals::sign(&k.bob, "bob", content),
                ]),
            ),
    )
    .await;
    let before = policy_hash(&sandbox).await;
    let variant = with_approvers(&support::seed_requires_gdpr(), &k);
    let config = sandbox.config_path().to_path_buf();
    replace(&config, &variant);
    let refusal = eventually("the poll's refusal", PATIENCE, || async {
        records(&sandbox, "europe", "policy_reload")
            .last()
            .and_then(|r| r["note"].as_str().map(str::to_string))
    })
    .await;
    assert!(
        refusal.starts_with("refused") && refusal.contains("approves other content"),
        "{refusal}"
    );
    assert_eq!(policy_hash(&sandbox).await, before);
    let new = variant.as_bytes();
    replace(
        &approvals::approvals_path(&config),
        &bundle(vec![
            approvals::sign(&k.bob, "bob", new),
            approvals::sign(&k.carol, "carol", new),
        ]),
    );
    eventually("the approved change in force", PATIENCE, || async {
        (policy_hash(&sandbox).await != before).then_some(())
    })
    .await;
    let approved = eventually("its record", PATIENCE, || async {
        let r = records(&sandbox, "europe", "policy_approved");
        (r.len() == 2).then_some(r)
    })
    .await;
    let note = approved
        .last()
        .and_then(|r| r["note"].as_str())
        .expect("record");
    assert!(
        note.contains("by reload") && note.contains("signed by bob, carol"),
        "{note}"
    );
}
