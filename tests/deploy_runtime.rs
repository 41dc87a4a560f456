//! What the deploy files rely on, checked on real `federation serve`
//! processes: systemd readiness (`Type=notify`), owner-only data files, a
//! warning for a snapshot key file others can read, and a policy reloaded
//! when its file changes (a Kubernetes ConfigMap update).

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use federation_api as api;
use federation_sandbox::{SandboxBuilder, string_attrs};
use support::*;

/// One region, no replication: the smallest federation `serve` accepts.
const SOLO: &str = r#"
federation:
  name: "Solo Federation"
  regions:
    - name: "solo"
      endpoint: "https://127.0.0.1:7000"
      compliance: ["GDPR"]
  routing_rules:
    - name: "everyone"
      default: true
      primary_region: "solo"
  data_synchronization:
    enabled: false
"#;

fn solo() -> SandboxBuilder {
    SandboxBuilder::new(federation_exe(), SOLO).agents(0, 1)
}

/// Receives datagrams until one equals `want` (at most 20, each within
/// PATIENCE); returns everything received.
fn receive_until(socket: &UnixDatagram, want: &str) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..20 {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("no `{want}` on the notify socket ({e}); got {got:?}"),
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = text.lines().any(|l| l == want);
        got.push(text);
        if done {
            return got;
        }
    }
    panic!("no `{want}` among {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut sandbox = solo()
        .env("NOTIFY_SOCKET", &path.display().to_string())
        .start()
        .expect("sandbox starts");
    let got = tokio::task::spawn_blocking({
        let socket = socket.try_clone().expect("clone");
        move || receive_until(&socket, "READY=1")
    })
    .await
    .expect("receiver");
    assert!(
        !got.iter().any(|m| m.contains("STOPPING=1")),
        "stopping before ready: {got:?}"
    );
    // READY=1 means serving: `federation health` (the image's HEALTHCHECK)
    // says so too, and fails on a port where nothing answers.
    let health = |addr: std::net::SocketAddr| {
        std::process::Command::new(federation_exe())
            .args(["health", "--addr", &addr.to_string()])
            .output()
            .expect("federation health runs")
    };
    let out = health(sandbox.health_addr("solo").expect("addr"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = health(federation_sandbox::free_port().expect("port"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to"),
        "{out:?}"
    );
    sandbox
        .controller("solo")
        .expect("controller")
        .signal("TERM")
        .expect("SIGTERM");
    tokio::task::spawn_blocking(move || receive_until(&socket, "STOPPING=1"))
        .await
        .expect("receiver");
    let exit = sandbox
        .controller("solo")
        .expect("controller")
        .wait_timeout(PATIENCE)
        .expect("exits after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

/// Every folder under `dir` (and `dir`) 0700, every file without group or
/// other bits. Returns the paths it checked.
fn assert_owner_only(dir: &Path) -> Vec<String> {
    let mut checked = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:04o}", path.display());
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                pending.push(entry.expect("entry").path());
            }
        } else {
            assert_eq!(
                mode & 0o077,
                0,
                "{} is {mode:04o}: readable beyond its owner",
                path.display()
            );
        }
        checked.push(path.display().to_string());
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_an_empty_dir_creates_only_owner_only_files() {
    // The seed federation with replication: the store, the log, the epoch,
    // witnesses and the snapshots other regions push.
    let sandbox = formed(seed_sandbox().agents(1, 1).env(
        "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
        "1",
    ))
    .await;
    let mut client = sandbox.client("europe").await.expect("client");
    let id = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "DE")]),
            payload: b"personal data".to_vec(),
            ..Default::default()
        })
        .await
        .expect("accepted")
        .into_inner()
        .task_id;
    sandbox
        .wait_terminal("europe", &id, PATIENCE)
        .await
        .expect("completes");
    // North America backs europe up: wait for europe's snapshot to land there.
    let snap = sandbox
        .data_dir("north_america")
        .expect("dir")
        .join("snapshots")
        .join("europe.snap");
    eventually("europe's snapshot reaches north_america", PATIENCE, || {
        let exists = snap.exists();
        async move { exists.then_some(()) }
    })
    .await;
    for region in sandbox.region_names() {
        let dir = sandbox.data_dir(&region).expect("dir");
        let checked = assert_owner_only(&dir);
        for must in ["tasks.redb", "decisions.jsonl", "epoch"] {
            assert!(
                checked.iter().any(|p| p.ends_with(must)),
                "{region}: no {must} among {checked:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("snapshot.keys");
    std::fs::write(&keys, format!("{TEST_KEYS}\n")).expect("write");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let sandbox = solo()
        .env("FEDERATION__NODE__KEYS__FILE", &keys.display().to_string())
        .start()
        .expect("sandbox starts");
    let warning = eventually("the key file warning", PATIENCE, || {
        let text = sandbox.controller_log_text("solo");
        async move {
            text.lines()
                .find(|l| l.contains("snapshot key file is readable by group or others"))
                .map(str::to_string)
        }
    })
    .await;
    assert!(
        warning.contains(&keys.display().to_string()),
        "names the file: {warning}"
    );
    assert!(warning.contains("0644"), "names the mode: {warning}");
    // An owner-only key file is accepted quietly.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let quiet = solo()
        .env("FEDERATION__NODE__KEYS__FILE", &keys.display().to_string())
        .start()
        .expect("sandbox starts");
    let text = eventually("the second controller serves", PATIENCE, || {
        let text = quiet.controller_log_text("solo");
        async move { text.contains("health: serving").then_some(text) }
    })
    .await;
    assert!(
        !text.contains("snapshot key file is readable"),
        "warned about a 0600 key file: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_federation_file_is_reloaded_when_polling() {
    let sandbox = solo()
        .env("FEDERATION__NODE__TIMERS__POLICY_POLL", "100ms")
        .start()
        .expect("sandbox starts");
    let mut admin = eventually("the admin service answers", PATIENCE, || {
        let sandbox = &sandbox;
        async move { sandbox.admin("solo").await.ok() }
    })
    .await;
    let hash_now = |mut admin: api::federation_admin_client::FederationAdminClient<_>| async move {
        admin
            .federation_status(api::FederationStatusRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner().policy_hash)
    };
    let first = eventually("a status", PATIENCE, || hash_now(admin.clone())).await;
    assert!(
        !sandbox
            .controller_log_text("solo")
            .contains("federation file changed"),
        "reloaded an unchanged file"
    );
    // Update the file the way the kubelet updates a ConfigMap volume: the
    // key is a symlink through `..data`, itself a symlink to a timestamped
    // folder; an update writes a new folder and renames a new `..data` over
    // the old one.
    let config = sandbox.config_path().to_path_buf();
    let volume = config.parent().expect("sandbox dir").to_path_buf();
    let version = std::cell::Cell::new(0u32);
    let replace = |text: &str| {
        let n = version.get() + 1;
        version.set(n);
        let folder = format!("..2026_12_01_{n:04}");
        std::fs::create_dir(volume.join(&folder)).expect("mkdir");
        std::fs::write(volume.join(&folder).join("federation.yaml"), text).expect("write");
        let tmp = volume.join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &tmp).expect("symlink");
        std::fs::rename(&tmp, volume.join("..data")).expect("swap ..data");
        if n == 1 {
            let link = volume.join("federation.yaml.link");
            std::os::unix::fs::symlink("..data/federation.yaml", &link).expect("symlink");
            std::fs::rename(&link, &config).expect("the key becomes a symlink");
        }
    };
    replace(&SOLO.replace("Solo Federation\"", "Solo Federation\"\n  # v2"));
    replace(&SOLO.replace("compliance: [\"GDPR\"]", "compliance: [\"GDPR\", \"SOX\"]"));
    let second = eventually("the new policy is in force", PATIENCE, || {
        let admin = admin.clone();
        let first = first.clone();
        async move { hash_now(admin).await.filter(|h| *h != first) }
    })
    .await;
    // A broken file is refused and the policy in force stays.
    replace("federation: [not a mapping");
    eventually("the refusal is logged", PATIENCE, || {
        let text = sandbox.controller_log_text("solo");
        async move { text.contains("reload refused").then_some(()) }
    })
    .await;
    let still = hash_now(admin.clone()).await.expect("status");
    assert_eq!(still, second, "a refused file changed the policy");
    let _ = &mut admin;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_modes_left_in_a_data_dir_are_tightened_with_a_warning() {
    let mut sandbox = solo().start().expect("sandbox starts");
    let dir = sandbox.data_dir("solo").expect("dir");
    let store = dir.join("tasks.redb");
    eventually("the controller serves", PATIENCE, || {
        let text = sandbox.controller_log_text("solo");
        async move { text.contains("health: serving").then_some(()) }
    })
    .await;
    sandbox.kill_controller("solo").expect("stop");
    // What an older version (umask 022) left behind.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    sandbox.start_controller("solo").expect("restart");
    let line = eventually("the warning about tasks.redb", PATIENCE, || {
        let text = sandbox.controller_log_text("solo");
        async move {
            text.lines()
                .find(|l| l.contains("made owner-only") && l.contains("tasks.redb"))
                .map(str::to_string)
        }
    })
    .await;
    assert!(line.contains("0644"), "names the old mode: {line}");
    eventually("the restarted controller serves", PATIENCE, || {
        let n = sandbox
            .controller_log_text("solo")
            .matches("health: serving")
            .count();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert_owner_only(&dir);
}
