//! `federation submit|get|status|drain`: a gRPC client for humans and scripts.
//! Text by default, `--format json` for machines. Exit 0 on success, 1 when
//! the federation refused or the task failed, 2 on bad arguments or an
//! unreachable controller.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use federation_api as api;
use serde_json::{Value, json};

use super::OutputFormat;
use crate::policy::{AttrValue, Attributes};

/// Connection options shared by client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// The controller, as host:port or http://host:port.
    #[arg(long)]
    pub controller: String,
    /// Give up on the call after this long.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// The federation CA (PEM): mutual TLS; the controller must present a
    /// region certificate of this CA.
    #[arg(long, env = "FEDERATION_CA")]
    pub ca: Option<PathBuf>,
    /// Our certificate (client, operator or auditor identity).
    #[arg(long, env = "FEDERATION_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "FEDERATION_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A bearer token instead of a certificate.
    #[arg(long, env = "FEDERATION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Plaintext without authentication (development only).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
}

/// Arguments of `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    connect: Connect,
    /// Attribute: `k=v` (string) or `k:=JSON` (number, bool, list). Repeatable.
    #[arg(long = "attr", value_parser = parse_attr)]
    attrs: Vec<(String, AttrValue)>,
    /// File whose bytes are the payload.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Idempotency key: a retry with the same key returns the same task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Priority (higher runs first).
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Wait until the task finishes and print its result.
    #[arg(long)]
    wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    connect: Connect,
    /// The task id.
    task_id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: Connect,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `drain` and `undrain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    connect: Connect,
    /// Wait until the region holds no queued or leased task (drain only).
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    wait_timeout: Duration,
}

/// Arguments of `reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    connect: Connect,
    /// A federation file to send; without it the controller re-reads its own.
    #[arg(long)]
    file: Option<PathBuf>,
}

/// Parses `k=v` (string) or `k:=JSON` (typed).
pub fn parse_attr(s: &str) -> Result<(String, AttrValue), String> {
    if let Some((k, json)) = s.split_once(":=") {
        let v: Value =
            serde_json::from_str(json).map_err(|e| format!("`{s}`: bad JSON value: {e}"))?;
        return Ok((
            k.to_string(),
            json_to_attr(&v).map_err(|e| format!("`{s}`: {e}"))?,
        ));
    }
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected key=value or key:=JSON"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: empty attribute name"));
    }
    Ok((k.to_string(), AttrValue::Str(v.to_string())))
}

fn json_to_attr(v: &Value) -> Result<AttrValue, String> {
    match v {
        Value::String(s) => Ok(AttrValue::Str(s.clone())),
        Value::Bool(b) => Ok(AttrValue::Bool(*b)),
        Value::Number(n) => n
            .as_i64()
            .map(AttrValue::Int)
            .or_else(|| n.as_f64().map(AttrValue::Double))
            .ok_or_else(|| format!("number {n} out of range")),
        Value::Array(items) => items
            .iter()
            .map(json_to_attr)
            .collect::<Result<_, _>>()
            .map(AttrValue::List),
        Value::Null | Value::Object(_) => {
            Err("only strings, numbers, booleans and lists are attributes".into())
        }
    }
}

fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A channel to the controller: mutual TLS (or a token over TLS) unless
/// `--insecure`.
pub async fn channel(c: &Connect) -> anyhow::Result<federation_tls::AuthChannel> {
    let bearer = federation_tls::Bearer::new(c.token.as_deref())?;
    let channel = match &c.ca {
        Some(ca) => {
            let tls =
                federation_tls::ClientTls::load(ca, c.cert.as_deref().zip(c.key.as_deref()), "")?;
            tls.connect(
                &c.controller,
                federation_tls::Expect::AnyController,
                c.timeout,
            )
            .await?
        }
        None if c.insecure => plain_channel(c).await?,
        None => anyhow::bail!(
            "tls is required: pass --ca with --cert/--key or --token (or FEDERATION_CA…), or --insecure for plaintext"
        ),
    };
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

async fn plain_channel(c: &Connect) -> anyhow::Result<tonic::transport::Channel> {
    let url = endpoint(&c.controller);
    tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad controller address `{}`", c.controller))?
        .connect_timeout(c.timeout)
        .timeout(c.timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach controller {url}"))
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Runs a command's body on a current-thread runtime (exit 2 if none starts).
fn run_command(body: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(body),
        Err(e) => super::fail(&e, 2),
    }
}

/// JSON form of a decision.
pub fn decision_json(d: &api::RouteDecision) -> Value {
    json!({
        "outcome": d.outcome,
        "region": d.region,
        "rule": d.rule,
        "rule_index": d.matched.then_some(d.rule_index),
        "required_tags": d.required_tags,
        "candidates": d.candidates.iter().map(|c| json!({
            "region": c.region, "role": c.role, "accepted": c.accepted,
            "reason": c.reason, "detail": c.detail,
        })).collect::<Vec<_>>(),
        "reason": d.reason,
        "warnings": d.warnings,
        "policy_hash": d.policy_hash,
    })
}

/// Human name of a task state.
pub fn state_name(state: i32) -> &'static str {
    match api::TaskState::try_from(state) {
        Ok(api::TaskState::Queued) => "queued",
        Ok(api::TaskState::Leased) => "leased",
        Ok(api::TaskState::Succeeded) => "succeeded",
        Ok(api::TaskState::Failed) => "failed",
        Ok(api::TaskState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// JSON form of a task.
pub fn task_json(t: &api::Task) -> Value {
    let attrs: Attributes = crate::wire::attributes_lossy(&t.attributes);
    json!({
        "task_id": t.task_id,
        "state": state_name(t.state),
        "owner_region": t.owner_region,
        "rule_index": t.rule_index,
        "attributes": attrs,
        "priority": t.priority,
        "attempts": t.attempts,
        "agent_id": t.agent_id,
        "result": String::from_utf8_lossy(&t.result),
        "error": t.error,
        "created_unix_ms": t.created_unix_ms,
        "updated_unix_ms": t.updated_unix_ms,
        "idempotency_key": t.idempotency_key,
        "taken_over": t.taken_over.as_ref().map(|x| json!({"from_region": x.from_region, "from_epoch": x.from_epoch, "to_region": x.to_region})),
    })
}

fn print_task(t: &api::Task) {
    println!("task      {}", t.task_id);
    println!("state     {}", state_name(t.state));
    println!("region    {}", t.owner_region);
    println!("rule      {}", t.rule_index + 1);
    println!("attempts  {}", t.attempts);
    if !t.result.is_empty() {
        println!(
            "result    {}",
            String::from_utf8_lossy(&t.result).trim_end()
        );
    }
    if !t.error.is_empty() {
        println!("error     {}", t.error);
    }
}

fn status_exit(e: &tonic::Status) -> u8 {
    match e.code() {
        tonic::Code::FailedPrecondition | tonic::Code::Unavailable | tonic::Code::NotFound => 1,
        _ => 2,
    }
}

/// `submit`.
pub fn submit(args: SubmitArgs) -> ExitCode {
    run_command(async move {
        let payload = match &args.payload_file {
            Some(p) => match std::fs::read(p) {
                Ok(b) => b,
                Err(e) => return super::fail(&anyhow::anyhow!("reading {}: {e}", p.display()), 2),
            },
            None => Vec::new(),
        };
        let attrs: Attributes = args.attrs.iter().cloned().collect();
        let channel = match channel(&args.connect).await {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = api::federation_client_client::FederationClientClient::new(channel);
        let req = api::SubmitTaskRequest {
            attributes: crate::wire::attributes_to_wire(&attrs),
            payload,
            idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
            priority: args.priority,
        };
        let resp = match client.submit_task(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                if args.format == OutputFormat::Json {
                    println!(
                        "{}",
                        json!({"outcome": "rejected", "code": format!("{:?}", s.code()), "message": s.message()})
                    );
                } else {
                    eprintln!("rejected ({:?}): {}", s.code(), s.message());
                }
                return ExitCode::from(status_exit(&s));
            }
        };
        let decision = resp.decision.clone().unwrap_or_default();
        let mut final_task = None;
        if args.wait {
            match wait(&mut client, &resp.task_id).await {
                Ok(t) => final_task = Some(t),
                Err(e) => return super::fail(&e, 2),
            }
        }
        if args.format == OutputFormat::Json {
            println!(
                "{}",
                json!({
                    "task_id": resp.task_id, "region": resp.region, "deduplicated": resp.deduplicated,
                    "decision": decision_json(&decision),
                    "task": final_task.as_ref().map(task_json),
                })
            );
        } else {
            println!("task      {}", resp.task_id);
            println!("region    {} ({})", resp.region, decision.outcome);
            println!("rule      {}", decision.rule);
            println!("why       {}", decision.reason);
            for w in &decision.warnings {
                println!("warning   {w}");
            }
            if resp.deduplicated {
                println!(
                    "note      idempotency key matched an existing task; nothing new was created"
                );
            }
            if let Some(t) = &final_task {
                println!("state     {}", state_name(t.state));
                if !t.result.is_empty() {
                    println!(
                        "result    {}",
                        String::from_utf8_lossy(&t.result).trim_end()
                    );
                }
                if !t.error.is_empty() {
                    println!("error     {}", t.error);
                }
            }
        }
        match final_task {
            Some(t) if t.state != api::TaskState::Succeeded as i32 => ExitCode::from(1),
            _ => ExitCode::SUCCESS,
        }
    })
}

async fn wait(
    client: &mut api::federation_client_client::FederationClientClient<federation_tls::AuthChannel>,
    task_id: &str,
) -> anyhow::Result<api::Task> {
    let mut stream = client
        .watch_task(api::WatchTaskRequest {
            task_id: task_id.to_string(),
        })
        .await
        .context("watching the task")?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await.context("watch stream")? {
        last = event.task;
    }
    last.context("the watch ended without a task")
}

/// `get`.
pub fn get(args: GetArgs) -> ExitCode {
    run_command(async move {
        let channel = match channel(&args.connect).await {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = api::federation_client_client::FederationClientClient::new(channel);
        match client
            .get_task(api::GetTaskRequest {
                task_id: args.task_id.clone(),
            })
            .await
        {
            Ok(r) => {
                let task = r.into_inner().task.unwrap_or_default();
                if args.format == OutputFormat::Json {
                    println!("{}", task_json(&task));
                } else {
                    print_task(&task);
                }
                ExitCode::SUCCESS
            }
            Err(s) => {
                eprintln!("error ({:?}): {}", s.code(), s.message());
                ExitCode::from(status_exit(&s))
            }
        }
    })
}

/// `status`.
pub fn status(args: StatusArgs) -> ExitCode {
    run_command(async move {
        let channel = match channel(&args.connect).await {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = api::federation_admin_client::FederationAdminClient::new(channel);
        let s = match client
            .federation_status(api::FederationStatusRequest {})
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                eprintln!("error ({:?}): {}", s.code(), s.message());
                return ExitCode::from(2);
            }
        };
        if args.format == OutputFormat::Json {
            println!("{}", status_json(&s));
        } else {
            print!("{}", status_table(&s));
        }
        ExitCode::SUCCESS
    })
}

/// `drain` (`on = true`) and `undrain`: stop or resume taking new tasks in
/// the controller's region; with `--wait`, report when it is empty.
pub fn drain(args: DrainArgs, on: bool) -> ExitCode {
    run_command(async move {
        let channel = match channel(&args.connect).await {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin = api::federation_admin_client::FederationAdminClient::new(channel);
        let until = std::time::Instant::now() + args.wait_timeout;
        loop {
            let r = match admin.drain(api::DrainRequest { drain: on }).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    eprintln!("error ({:?}): {}", s.code(), s.message());
                    return ExitCode::from(2);
                }
            };
            let state = if r.draining {
                "draining"
            } else {
                "taking new tasks"
            };
            println!(
                "{state}: {} queued, {} leased{}",
                r.queued,
                r.leased,
                if r.empty { ", empty" } else { "" }
            );
            if !on || !args.wait || r.empty {
                return ExitCode::SUCCESS;
            }
            if std::time::Instant::now() >= until {
                eprintln!("still not empty after {:?}", args.wait_timeout);
                return ExitCode::from(1);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// `reload`: validate and apply a policy on a running controller.
pub fn reload(args: ReloadArgs) -> ExitCode {
    run_command(async move {
        let (source, format) = match &args.file {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => {
                    let format = match p.extension().and_then(|e| e.to_str()) {
                        Some("json") => "json",
                        Some("toml") => "toml",
                        _ => "yaml",
                    };
                    (text, format.to_string())
                }
                Err(e) => return super::fail(&anyhow::anyhow!("reading {}: {e}", p.display()), 2),
            },
            None => (String::new(), String::new()),
        };
        let channel = match channel(&args.connect).await {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin = api::federation_admin_client::FederationAdminClient::new(channel);
        match admin
            .reload_policy(api::ReloadPolicyRequest {
                policy_source: source,
                format,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                for f in &r.findings {
                    println!("finding: {f}");
                }
                if r.applied {
                    println!("applied: policy {}", r.policy_hash);
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "refused, policy {} stays in force: {}",
                        r.policy_hash, r.error
                    );
                    ExitCode::from(1)
                }
            }
            Err(s) => {
                eprintln!("error ({:?}): {}", s.code(), s.message());
                ExitCode::from(2)
            }
        }
    })
}

/// JSON form of a status.
pub fn status_json(s: &api::FederationStatusResponse) -> Value {
    json!({
        "federation": s.federation, "self_region": s.self_region, "policy_hash": s.policy_hash, "epoch": s.epoch,
        "regions": s.regions.iter().map(|r| {
            let c = r.capacity.unwrap_or_default();
            json!({
                "region": r.region, "state": r.state, "compliance_tags": r.compliance_tags,
                "capacity": {"total_slots": c.total_slots, "free_slots": c.free_slots, "queue_depth": c.queue_depth, "queue_limit": c.queue_limit},
                "epoch": r.epoch, "sequence": r.sequence, "policy_hash": r.policy_hash,
                "policy_mismatch": r.policy_mismatch, "last_advertisement_age_ms": r.last_advertisement_age_ms,
                "draining": r.draining, "endpoint": r.endpoint, "phi": r.phi,
                "store_undecodable_records": r.store_undecodable_records,
                "store_undecodable": r.store_undecodable,
            })
        }).collect::<Vec<_>>(),
    })
}

/// The status table.
pub fn status_table(s: &api::FederationStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "federation {} as seen from {} (policy {})",
        s.federation,
        s.self_region,
        short(&s.policy_hash)
    );
    let _ = writeln!(
        out,
        "{:<14} {:<8} {:<14} {:>9} {:>6} {:<15} {:<9} {:>8}",
        "REGION", "STATE", "TAGS", "SLOTS", "QUEUE", "EPOCH", "POLICY", "AD AGE"
    );
    for r in &s.regions {
        let c = r.capacity.unwrap_or_default();
        let age = if r.last_advertisement_age_ms < 0 {
            "never".to_string()
        } else {
            format!("{:.1}s", r.last_advertisement_age_ms as f64 / 1000.0)
        };
        let policy = if r.policy_hash.is_empty() {
            "-".to_string()
        } else if r.policy_mismatch {
            format!("{}!", short(&r.policy_hash))
        } else {
            short(&r.policy_hash).to_string()
        };
        let state = if r.draining {
            format!("{}/drain", r.state)
        } else {
            r.state.clone()
        };
        let _ = writeln!(
            out,
            "{:<14} {:<8} {:<14} {:>9} {:>6} {:<15} {:<9} {:>8}",
            r.region,
            state,
            r.compliance_tags.join(","),
            format!("{}/{}", c.free_slots, c.total_slots),
            c.queue_depth,
            r.epoch,
            policy,
            age
        );
    }
    if s.regions.iter().any(|r| r.policy_mismatch) {
        let _ = writeln!(out, "! = region advertises a different policy hash");
    }
    for r in s.regions.iter().filter(|r| r.store_undecodable_records > 0) {
        let _ = writeln!(
            out,
            "{}: {} undecodable task records in its store (skipped): {}",
            r.region,
            r.store_undecodable_records,
            r.store_undecodable.join("; ")
        );
    }
    out
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(8)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_parse_as_strings_or_typed_json() {
        assert_eq!(
            parse_attr("customer_region=DE"),
            Ok(("customer_region".into(), AttrValue::Str("DE".into())))
        );
        assert_eq!(parse_attr("n:=5"), Ok(("n".into(), AttrValue::Int(5))));
        assert_eq!(
            parse_attr("ok:=true"),
            Ok(("ok".into(), AttrValue::Bool(true)))
        );
        assert_eq!(
            parse_attr("l:=[\"a\",1]"),
            Ok((
                "l".into(),
                AttrValue::List(vec![AttrValue::Str("a".into()), AttrValue::Int(1)])
            ))
        );
        assert!(parse_attr("novalue").is_err());
        assert!(parse_attr("x:={}").is_err());
        assert!(parse_attr("=v").is_err());
    }
}
