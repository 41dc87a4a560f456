//! Peer discovery by DNS SRV against a real DNS server on loopback (dnsmasq,
//! installed by `.ci/run`): north_america is given no endpoint for europe but
//! an SRV name; it finds europe through DNS and forwards to it. The name
//! lists two targets for europe (its replicas), the preferred one down:
//! both are kept, and north_america moves on to the one that answers.

mod support;

use std::process::{Command, Stdio};

use federation_api as api;
use federation_sandbox::{ChildGuard, free_port, string_attrs};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_found_by_dns_srv() {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("dnsmasq is installed (`.ci/run` installs Debian's dnsmasq-base)");
    let dir = tempfile::tempdir().expect("tempdir");
    let (na, eu, dns, down) = (
        free_port().expect("port"),
        free_port().expect("port"),
        free_port().expect("port"),
        free_port().expect("port"),
    );
    let mut dns_cmd = Command::new(dnsmasq);
    dns_cmd
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={}", dns.port()))
        .arg(format!(
            "--srv-host=_federation._tcp.example.internal,europe.example.internal,{},1",
            eu.port()
        ))
        // A second replica of europe, preferred (lower priority) but down.
        .arg(format!(
            "--srv-host=_federation._tcp.example.internal,europe.example.internal,{},0",
            down.port()
        ))
        .arg("--host-record=europe.example.internal,127.0.0.1")
        .arg(format!(
            "--pid-file={}",
            dir.path().join("dnsmasq.pid").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _dns = ChildGuard::spawn("dnsmasq", &mut dns_cmd).expect("dnsmasq starts");

    let config = dir.path().join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy");
    // Mutual TLS as in production: certificates from `federation certs init`.
    let certs = dir.path().join("certs");
    let made = Command::new(federation_exe())
        .args(["certs", "init", "--out"])
        .arg(&certs)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("certs init runs");
    assert!(made.status.success(), "certs init: {made:?}");
    let layout = federation_tls::dev::Layout { dir: certs };
    let start =
        |region: &str, listen: std::net::SocketAddr, extra: &[String], env: &[(&str, String)]| {
            let mut cmd = Command::new(federation_exe());
            cmd.arg("serve")
                .arg("--config")
                .arg(&config)
                .args([
                    "--region",
                    region,
                    "--listen",
                    &listen.to_string(),
                    "--data-dir",
                ])
                .arg(dir.path().join(region))
                .args(extra)
                .env("FEDERATION_KEYS", TEST_KEYS)
                .env("FEDERATION__NODE__TLS__CA", layout.ca())
                .env("FEDERATION__NODE__TLS__CERT", layout.region(region).0)
                .env("FEDERATION__NODE__TLS__KEY", layout.region(region).1)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            for (k, v) in env {
                cmd.env(k, v);
            }
            ChildGuard::spawn(region, &mut cmd).expect("controller starts")
        };
    // europe is given no way to reach north_america either (the file's
    // endpoints are not on this machine): nothing but DNS introduces them.
    let _eu = start("europe", eu, &[], &[]);
    let _na = start(
        "north_america",
        na,
        &[],
        &[
            (
                "FEDERATION__NODE__DISCOVERY__DNS_SRV",
                "_federation._tcp.example.internal".into(),
            ),
            ("FEDERATION__NODE__DISCOVERY__RESOLVER", dns.to_string()),
            ("FEDERATION__NODE__DISCOVERY__INTERVAL", "200ms".into()),
            (
                "FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL",
                "200ms".into(),
            ),
        ],
    );
    // north_america's only way to reach europe is the SRV record: a DE task
    // forwarded there proves it.
    let (cert, key) = layout.pair("operator");
    let operator = federation_tls::ClientTls::load(&layout.ca(), Some((&cert, &key)), "")
        .expect("operator credentials");
    let channel = || async {
        operator
            .connect(
                &format!("https://{na}"),
                federation_tls::Expect::Region("north_america".into()),
                std::time::Duration::from_secs(5),
            )
            .await
    };
    let placed = eventually(
        "north_america forwards to the discovered europe",
        PATIENCE,
        || async {
            let mut c =
                api::federation_client_client::FederationClientClient::new(channel().await.ok()?);
            let r = c
                .submit_task(api::SubmitTaskRequest {
                    attributes: string_attrs(&[("customer_region", "DE")]),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (r.region == "europe").then_some(r)
        },
    )
    .await;
    assert!(placed.task_id.ends_with(".europe"));
    // Alive once an advertisement came over mutual TLS. Waited for: on a
    // loaded machine (CI beside a build) one heartbeat came 725 ms late and
    // the status read at that moment said dead.
    let row = eventually(
        "north_america sees the discovered europe alive",
        PATIENCE,
        || async {
            let mut admin =
                api::federation_admin_client::FederationAdminClient::new(channel().await.ok()?);
            let s = admin
                .federation_status(api::FederationStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.regions
                .into_iter()
                .find(|r| r.region == "europe" && r.state == "alive")
        },
    )
    .await;
    assert_eq!(row.endpoint, format!("https://{eu}"), "endpoint from DNS");
}
