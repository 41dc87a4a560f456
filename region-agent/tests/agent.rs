//! `run()` without a controller: configuration errors, an unreachable
//! controller, shutdown before registration. Tests against the real
//! controller live in the workspace's `tests/`.

use std::time::Duration;

use region_agent::{AgentConfig, AgentError, AgentReport};

const TEST_BOUND: Duration = Duration::from_secs(60);

/// A loopback address nothing listens on.
fn closed_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn invalid_configuration_is_refused() {
    // One address syntax: host:port with or without http(s)://; anything
    // else is refused before connecting.
    for good in ["127.0.0.1:7000", "http://127.0.0.1:7000", "[::1]:7000"] {
        let config = AgentConfig::new(good, "true");
        assert!(config.validate().is_ok(), "{good}: {:?}", config.validate());
    }
    // A region's replicas, comma-separated: each address is checked.
    let config = AgentConfig::new("127.0.0.1:7000, http://127.0.0.1:7001", "true");
    config.validate().expect("several replicas");
    assert_eq!(
        config.controllers(),
        vec!["127.0.0.1:7000", "http://127.0.0.1:7001"]
    );
    let config = AgentConfig::new("127.0.0.1:7000,https://127.0.0.1:7001", "true");
    assert!(
        matches!(config.validate(), Err(AgentError::Config(m)) if m.contains("https://127.0.0.1:7001")),
        "each address is checked"
    );
    let config = AgentConfig::new(" , ", "true");
    assert!(matches!(config.validate(), Err(AgentError::Config(_))));
    let config = AgentConfig::new("https://127.0.0.1:7000", "true");
    assert!(
        matches!(config.validate(), Err(AgentError::Config(m)) if m.contains("https://")),
        "https:// without a CA is refused"
    );
    let config = AgentConfig::new("grpc://127.0.0.1:1", "true");
    let result = tokio::time::timeout(TEST_BOUND, region_agent::run(config, async {}))
        .await
        .expect("bounded");
    assert!(matches!(result, Err(AgentError::Config(_))), "{result:?}");

    let config = AgentConfig::new("http://127.0.0.1:1", "  ");
    let result = tokio::time::timeout(TEST_BOUND, region_agent::run(config, async {}))
        .await
        .expect("bounded");
    assert!(matches!(result, Err(AgentError::Config(_))), "{result:?}");
}

#[tokio::test]
async fn an_unreachable_controller_is_retried_then_reported() {
    assert_retried_then_unreachable(closed_address()).await;
}

#[tokio::test]
async fn unreachable_replicas_are_each_tried_then_reported() {
    assert_retried_then_unreachable(format!("{},{}", closed_address(), closed_address())).await;
}

/// An agent whose controller addresses all refuse retries, then reports
/// them unreachable.
async fn assert_retried_then_unreachable(addresses: String) {
    let mut config = AgentConfig::new(addresses, "true");
    config.register_timeout = Some(Duration::from_millis(600));
    config.max_backoff = Duration::from_millis(100);
    let result = tokio::time::timeout(
        TEST_BOUND,
        region_agent::run(config, std::future::pending()),
    )
    .await
    .expect("bounded");
    match result {
        Err(AgentError::Unreachable { attempts, .. }) => assert!(attempts > 1),
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_while_registering_returns_an_empty_report() {
    let config = AgentConfig::new(closed_address(), "true");
    let shutdown = tokio::time::sleep(Duration::from_millis(300));
    let report = tokio::time::timeout(TEST_BOUND, region_agent::run(config, shutdown))
        .await
        .expect("bounded")
        .expect("a shutdown is not an error");
    assert_eq!(report, AgentReport::default());
}

#[test]
fn arguments_map_to_the_configuration() {
    use clap::Parser;
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: region_agent::AgentArgs,
    }
    let cli = Cli::try_parse_from([
        "region-agent",
        "--controller",
        "http://127.0.0.1:7000",
        "--region",
        "europe",
        "--slots",
        "4",
        "--exec",
        "cat",
        "--task-timeout",
        "90s",
        "--max-output",
        "1024",
        "--lease-wait",
        "250ms",
        "--shutdown-grace",
        "1m",
    ])
    .expect("parses");
    let config = AgentConfig::from(cli.args);
    assert_eq!(config.region.as_deref(), Some("europe"));
    assert_eq!(config.slots, 4);
    assert_eq!(config.command, "cat");
    assert_eq!(config.limits.timeout, Duration::from_secs(90));
    assert_eq!(config.limits.max_output, 1024);
    assert_eq!(config.lease_wait, Duration::from_millis(250));
    assert_eq!(config.shutdown_grace, Duration::from_secs(60));
    assert!(!config.name.is_empty());
    config.validate().expect("valid");

    let defaults = Cli::try_parse_from([
        "region-agent",
        "--controller",
        "http://127.0.0.1:7000",
        "--exec",
        "cat",
    ])
    .expect("parses");
    let config = AgentConfig::from(defaults.args);
    assert_eq!(config.slots, 1);
    assert_eq!(config.limits.timeout, Duration::from_secs(300));
    assert_eq!(config.limits.max_output, 64 * 1024);
    assert_eq!(config.lease_wait, Duration::from_secs(5));
    assert_eq!(config.shutdown_grace, Duration::from_secs(30));
    assert!(
        Cli::try_parse_from([
            "region-agent",
            "--controller",
            "x",
            "--exec",
            "cat",
            "--slots",
            "0"
        ])
        .is_err()
    );
}
