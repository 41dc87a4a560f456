//! `federation health`: asks a controller's plaintext health port
//! (`--health-listen`) for its `grpc.health.v1` status; exit 0 when SERVING.
//! What a container HEALTHCHECK runs (the image has no other gRPC client).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

/// Arguments of `health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The controller's plaintext health-only address (`--health-listen`).
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub addr: SocketAddr,
    /// The service to ask about (empty: the controller as a whole).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// Runs the check: prints the status; exit 0 for SERVING, 1 otherwise.
pub fn run(args: HealthArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return super::fail(&anyhow::Error::new(e).context("starting the runtime"), 1),
    };
    match runtime.block_on(check(&args)) {
        Ok(status) => {
            println!("{status}");
            if status == "SERVING" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => super::fail(&e, 1),
    }
}

async fn check(args: &HealthArgs) -> anyhow::Result<String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))
        .context("health address")?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .with_context(|| format!("grpc.health.v1.Health/Check on {}", args.addr))?
        .into_inner();
    Ok(response.status().as_str_name().to_string())
}
