//! Command-line behaviour that needs no federation: completion scripts and
//! man pages from the clap definitions, help without flags that do nothing,
//! `certs init` refusing to replace a CA, a closed standard output.

use std::process::{Command, Output, Stdio};

fn federation(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_federation"))
        .args(args)
        .env_remove("FEDERATION_ADDR")
        .output()
        .expect("run federation")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn completions_for_each_shell_know_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = federation(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["submit", "tasks", "cancel", "controller", "watch"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = federation(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_are_generated_for_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("man");
    let out = federation(&["man", "--out", &out_dir.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let top = std::fs::read_to_string(out_dir.join("federation.1")).expect("federation.1");
    assert!(top.contains(".TH federation"), "{top}");
    let tasks = std::fs::read_to_string(out_dir.join("federation-tasks.1")).expect("tasks page");
    assert!(
        tasks.contains("FEDERATION_ADDR") && tasks.contains("older\\-than"),
        "{tasks}"
    );
    assert!(out_dir.join("federation-certs-init.1").exists());
}

#[test]
fn help_shows_only_the_flags_a_command_uses() {
    for cmd in ["submit", "status", "tasks", "audit"] {
        let out = federation(&[cmd, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        let help = text(&out.stdout);
        assert!(
            !help.contains("--log-format"),
            "{cmd} does not log, yet its help offers --log-format:\n{help}"
        );
    }
    let out = federation(&["--help"]);
    assert!(text(&out.stdout).contains("--log-format"));
    let out = federation(&["submit", "--help"]);
    let help = text(&out.stdout);
    assert!(help.contains("[env: FEDERATION_ADDR"), "{help}");
}

#[test]
fn certs_init_refuses_to_replace_a_ca_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("certs").display().to_string();
    let init = |extra: &[&str]| {
        let mut args = vec!["certs", "init", "--out", &out_dir, "--regions", "europe"];
        args.extend_from_slice(extra);
        federation(&args)
    };
    let out = init(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ca_path = dir.path().join("certs").join("ca.pem");
    let first = std::fs::read(&ca_path).expect("ca");

    let out = init(&[]);
    assert_eq!(out.status.code(), Some(1), "a second run is refused");
    let err = text(&out.stderr);
    assert!(
        err.contains("already holds a CA") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&ca_path).expect("ca"),
        first,
        "the CA is kept"
    );

    let out = init(&["--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_ne!(
        std::fs::read(&ca_path).expect("ca"),
        first,
        "--force replaces it"
    );
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_federation"))
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn serve_names_the_environment_variable_that_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/seed-federation.yaml"
    );
    let data = dir.path().join("data").display().to_string();
    for (var, value, says) in [
        (
            "FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL",
            "banana",
            "field `node.timers.heartbeat_interval`: invalid duration `banana`",
        ),
        (
            "FEDERATION__NODE__TIMERS__HEARTBEET",
            "1s",
            "field `node.timers.heartbeet`: unknown field `heartbeet`",
        ),
        (
            "FEDERATION__NODE__REGION",
            "nowhere",
            "region `nowhere` is not in",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_federation"))
            .args(["serve", "--insecure", "--config", seed, "--data-dir", &data])
            .env(var, value)
            .output()
            .expect("runs");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{var}: {err}");
        assert!(
            err.contains(&format!("error: environment variable {var}: ")) && err.contains(says),
            "{var}: {err}"
        );
        assert!(
            !err.contains("seed-federation.yaml:"),
            "not the file's fault: {err}"
        );
    }
}
