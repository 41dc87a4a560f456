//! `federation policy keygen|sign` and the approvals of `policy check`:
//! the commands an approver and an auditor run, as processes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

fn run(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_federation"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().expect("exit code"),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn keygen_sign_and_check_a_policy_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for name in ["alice", "bob", "carol"] {
        let (code, out) = run(d, &["policy", "keygen", name, "--out", "keys"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("      {name}: \"ed25519:")), "{out}");
    }
    let mode = std::fs::metadata(d.join("keys/alice.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "private key is owner-only: {mode:o}");
    let (code, out) = run(d, &["policy", "keygen", "alice", "--out", "keys"]);
    assert_eq!(code, 2, "never overwrites a key: {out}");

    let public = |n: &str| {
        std::fs::read_to_string(d.join(format!("keys/{n}.pub")))
            .expect("pub")
            .trim()
            .to_string()
    };
    let seed = include_str!("../../policies/seed-federation.yaml");
    let text = seed.replace(
        "  data_synchronization:",
        &format!(
            "  policy:\n    approvers:\n      alice: \"{}\"\n      bob: \"{}\"\n      carol: \"{}\"\n    quorum: 2\n    require_approvals: true\n  data_synchronization:",
            public("alice"),
            public("bob"),
            public("carol")
        ),
    );
    std::fs::write(d.join("fed.yaml"), &text).expect("write");

    let (code, out) = run(d, &["policy", "check", "fed.yaml"]);
    assert_eq!(code, 1, "required approvals missing: {out}");
    assert!(
        out.contains("0 of quorum 2 valid, required: NOT MET"),
        "{out}"
    );
    assert!(out.contains("missing: alice, bob, carol"), "{out}");

    let (code, out) = run(
        d,
        &["policy", "sign", "fed.yaml", "--key", "keys/alice.key"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("signed by alice; missing bob, carol"), "{out}");
    let (code, out) = run(
        d,
        &["policy", "sign", "fed.yaml", "--key", "keys/alice.key"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 valid of quorum 2"),
        "signing again replaces: {out}"
    );
    let (code, out) = run(d, &["policy", "sign", "fed.yaml", "--key", "keys/bob.key"]);
    assert_eq!(code, 0, "{out}");

    let (code, out) = run(d, &["policy", "check", "fed.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 of quorum 2 valid, required: met"), "{out}");
    assert!(
        out.contains("signed by: alice, bob") && out.contains("missing: carol"),
        "{out}"
    );
    let (code, out) = run(d, &["policy", "check", "fed.yaml", "--format", "json"]);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["approvals"]["met"], true, "{json:#}");
    assert_eq!(
        json["approvals"]["verdict"]["signed"],
        serde_json::json!(["alice", "bob"])
    );

    // One byte more in the file: no approval counts any longer.
    std::fs::write(d.join("fed.yaml"), format!("{text}\n")).expect("edit");
    let (code, out) = run(d, &["policy", "check", "fed.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not counted: approval 1 (alice): approves other content"),
        "{out}"
    );
}
