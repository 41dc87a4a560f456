//! `federation submit|get|cancel|tasks|status|drain|undrain|reload`: a gRPC
//! client for humans and scripts. Text (tables) by default, `--format json`
//! for machines (one JSON value, or one per line for lists and watches).
//! Exit 0 on success, 1 when the federation refused or the task failed, 2
//! on bad arguments or an unreachable controller.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use federation_api as api;
use serde_json::{Value, json};

use super::OutputFormat;
use super::connect::{self, Connect};
use super::output::{self, Progress, say};
use crate::policy::{AttrValue, Attributes};

type Client = api::federation_client_client::FederationClientClient<federation_tls::AuthChannel>;
type Admin = api::federation_admin_client::FederationAdminClient<federation_tls::AuthChannel>;

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
    /// Wait until the task finishes and print its result (the task id is
    /// printed at once; a waiting line on standard error shows the state).
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
    /// Stream the task's state changes until it finishes.
    #[arg(long)]
    watch: bool,
    /// Output format (with --watch: one JSON task per line).
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    connect: Connect,
    /// The task id.
    task_id: String,
    /// Why, recorded on the task.
    #[arg(long, default_value = "")]
    reason: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// A task state as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    /// Waiting for an agent.
    Queued,
    /// Running on an agent.
    Leased,
    /// Finished successfully.
    Succeeded,
    /// Failed.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl StateFilter {
    fn wire(self) -> api::TaskState {
        match self {
            StateFilter::Queued => api::TaskState::Queued,
            StateFilter::Leased => api::TaskState::Leased,
            StateFilter::Succeeded => api::TaskState::Succeeded,
            StateFilter::Failed => api::TaskState::Failed,
            StateFilter::Cancelled => api::TaskState::Cancelled,
        }
    }
}

/// Arguments of `tasks`.
#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    #[command(flatten)]
    connect: Connect,
    /// Only tasks in this state (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    state: Vec<StateFilter>,
    /// Only tasks routed by this rule, numbered from 1 in file order.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rule: Option<u32>,
    /// Only tasks created at most this long ago (for example 10m, 2h).
    #[arg(long, value_name = "AGE", value_parser = crate::config::parse_duration)]
    newer_than: Option<Duration>,
    /// Only tasks created at least this long ago.
    #[arg(long, value_name = "AGE", value_parser = crate::config::parse_duration)]
    older_than: Option<Duration>,
    /// Print at most this many tasks (0: every matching task).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Tasks asked for per call (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
    /// Resume after a previous listing (the token it printed).
    #[arg(long)]
    page_token: Option<String>,
    /// Output format: a table, or one JSON task per line.
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

/// Arguments of `drain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    connect: Connect,
    /// Wait until the drain is empty: with the embedded store, until the
    /// region holds no leased task; on a replica of a region whose store is
    /// its PostgreSQL database, until that replica has no call in flight, no
    /// agent leasing through it and does not lead (the region's tasks stay
    /// with its other replicas).
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    wait_timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `undrain`.
#[derive(Debug, clap::Args)]
pub struct UndrainArgs {
    #[command(flatten)]
    connect: Connect,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// Arguments of `reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    connect: Connect,
    /// A federation file to send; without it the controller re-reads its own.
    /// Its approvals (`FILE.approvals`, `federation policy sign`) go with it.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
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

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Runs a command's body on a current-thread runtime (exit 2 if none starts).
pub(crate) fn run_command(body: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(body),
        Err(e) => super::fail(&e, 2),
    }
}

/// Reports a failed call (see [`connect::describe`]) and returns its exit
/// code: 2 when the controller was not reached or refused the caller, 1 when
/// it refused the request (no such task, no compliant region).
pub(crate) async fn call_failed(s: &tonic::Status, c: &Connect) -> ExitCode {
    eprintln!("{}", connect::describe(s, c).await);
    ExitCode::from(status_exit(s))
}

fn status_exit(e: &tonic::Status) -> u8 {
    if connect::is_transport(e) {
        return 2;
    }
    match e.code() {
        tonic::Code::FailedPrecondition | tonic::Code::Unavailable | tonic::Code::NotFound => 1,
        _ => 2,
    }
}

/// JSON form of a routing decision, the one shape every command prints
/// (submit, policy explain, and the `decision` of decisions and audit show
/// records): the serialized [`crate::policy::Decision`], rebuilt from the
/// wire. The wire does not carry a rejection's kind or the evaluation
/// errors; a decision that placed a task has neither.
pub fn decision_json(d: &api::RouteDecision) -> Value {
    let outcome = match d.outcome.as_str() {
        "routed" | "failover" => json!({"kind": d.outcome, "region": d.region}),
        other => json!({"kind": other}),
    };
    json!({
        "outcome": outcome,
        "rule_index": d.matched.then_some(d.rule_index),
        "rule": (d.matched && !d.rule.is_empty()).then_some(&d.rule),
        "required_tags": d.required_tags,
        "candidates": d.candidates.iter().map(|c| json!({
            "region": c.region,
            "role": c.role,
            "refusal": (!c.accepted).then_some(&c.reason),
            "detail": c.detail,
        })).collect::<Vec<_>>(),
        "reason": d.reason,
        "policy_hash": d.policy_hash,
        "warnings": d.warnings,
        "evaluation_errors": Vec::<String>::new(),
    })
}

/// Human name of a task state: [`crate::tasks::state_name`] in lower case,
/// `unknown` for a value this build does not know.
pub fn state_name(state: i32) -> String {
    match api::TaskState::try_from(state) {
        Ok(api::TaskState::Unspecified) | Err(_) => "unknown".to_string(),
        Ok(s) => crate::tasks::state_name(s).to_lowercase(),
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
        "version": t.version,
        "taken_over": t.taken_over.as_ref().map(|x| json!({"from_region": x.from_region, "from_epoch": x.from_epoch, "to_region": x.to_region})),
    })
}

fn print_task(t: &api::Task) {
    say!("task      {}", t.task_id);
    say!("state     {}", state_name(t.state));
    say!("region    {}", t.owner_region);
    say!("rule      {}", t.rule_index + 1);
    say!("attempts  {}", t.attempts);
    say!(
        "created   {} ({} ago)",
        output::unix_ms_utc(t.created_unix_ms),
        output::ago_unix_ms(t.created_unix_ms)
    );
    if let Some(x) = &t.taken_over {
        say!("taken     from {} by {}", x.from_region, x.to_region);
    }
    print_outcome(t);
}

fn print_outcome(t: &api::Task) {
    if !t.result.is_empty() {
        say!(
            "result    {}",
            String::from_utf8_lossy(&t.result).trim_end()
        );
    }
    if !t.error.is_empty() {
        say!("error     {}", t.error);
    }
}

/// The decision that placed a task, after `print_task` (`get`).
fn print_decision(d: Option<&api::RouteDecision>) {
    let Some(d) = d else {
        say!("decision  not in the owner's decision log (for example a task taken over)");
        return;
    };
    say!("decision  {} to {}", d.outcome, d.region);
    say!("rule      {}", d.rule);
    say!("why       {}", d.reason);
    for c in d.candidates.iter().filter(|c| !c.accepted) {
        if c.detail.is_empty() {
            say!("refused   {}: {}", c.region, c.reason);
        } else {
            say!("refused   {}: {} ({})", c.region, c.reason, c.detail);
        }
    }
    for w in &d.warnings {
        say!("warning   {w}");
    }
}

fn print_json(v: &Value) {
    say!("{v}");
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
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = Client::new(channel);
        let req = api::SubmitTaskRequest {
            attributes: crate::wire::attributes_to_wire(&attrs),
            payload,
            idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
            priority: args.priority,
            ..Default::default()
        };
        let resp = match client.submit_task(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                if args.format == OutputFormat::Json && !connect::is_transport(&s) {
                    print_json(
                        &json!({"outcome": "rejected", "code": format!("{:?}", s.code()), "message": s.message()}),
                    );
                    return ExitCode::from(status_exit(&s));
                }
                if connect::is_transport(&s) {
                    return call_failed(&s, &args.connect).await;
                }
                eprintln!("rejected ({:?}): {}", s.code(), s.message());
                return ExitCode::from(status_exit(&s));
            }
        };
        let decision = resp.decision.clone().unwrap_or_default();
        if args.format == OutputFormat::Text {
            say!("task      {}", resp.task_id);
            say!("region    {} ({})", resp.region, decision.outcome);
            say!("rule      {}", decision.rule);
            say!("why       {}", decision.reason);
            for w in &decision.warnings {
                say!("warning   {w}");
            }
            if resp.deduplicated {
                say!("note      idempotency key matched an existing task; nothing new was created");
            }
        }
        let mut final_task = None;
        if args.wait {
            match wait(&mut client, &resp.task_id).await {
                Ok(t) => final_task = Some(t),
                Err(s) => return call_failed(&s, &args.connect).await,
            }
        }
        if args.format == OutputFormat::Json {
            print_json(&json!({
                "task_id": resp.task_id, "region": resp.region, "deduplicated": resp.deduplicated,
                "decision": decision_json(&decision),
                "task": final_task.as_ref().map(task_json),
            }));
        } else if let Some(t) = &final_task {
            say!("state     {}", state_name(t.state));
            print_outcome(t);
        }
        match final_task {
            Some(t) if t.state != api::TaskState::Succeeded as i32 => ExitCode::from(1),
            _ => ExitCode::SUCCESS,
        }
    })
}

/// Watches `task_id` to its end, showing `waiting: <state> (attempt N), <elapsed>`
/// on standard error meanwhile.
async fn wait(client: &mut Client, task_id: &str) -> Result<api::Task, tonic::Status> {
    let started = Instant::now();
    let mut stream = client
        .watch_task(api::WatchTaskRequest {
            task_id: task_id.to_string(),
        })
        .await?
        .into_inner();
    let mut progress = Progress::new();
    let mut last: Option<api::Task> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = stream.message() => match event? {
                Some(e) => last = e.task.or(last),
                None => break,
            },
            _ = tick.tick() => {}
        }
        let (state, attempts) = last.as_ref().map_or(("submitted".to_string(), 0), |t| {
            (state_name(t.state), t.attempts)
        });
        if last
            .as_ref()
            .is_some_and(|t| crate::tasks::is_terminal(t.state()))
        {
            break;
        }
        let what = if attempts > 0 {
            format!("{state} (attempt {attempts})")
        } else {
            state.to_string()
        };
        progress.show(
            &format!(
                "waiting for {task_id}: {what}, {}",
                output::human(started.elapsed())
            ),
            &what,
        );
    }
    progress.finish();
    last.ok_or_else(|| tonic::Status::internal("the watch ended without a task"))
}

/// `get`.
pub fn get(args: GetArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = Client::new(channel);
        if args.watch {
            return watch(&mut client, &args).await;
        }
        match client
            .get_task(api::GetTaskRequest {
                task_id: args.task_id.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let task = r.task.unwrap_or_default();
                if args.format == OutputFormat::Json {
                    let mut v = task_json(&task);
                    v["decision"] = r.decision.as_ref().map_or(Value::Null, decision_json);
                    print_json(&v);
                } else {
                    print_task(&task);
                    print_decision(r.decision.as_ref());
                }
                ExitCode::SUCCESS
            }
            Err(s) => call_failed(&s, &args.connect).await,
        }
    })
}

/// `get --watch`: one line (or JSON object) per state change, until the
/// task finishes. Exit 0 when it succeeded, 1 otherwise.
async fn watch(client: &mut Client, args: &GetArgs) -> ExitCode {
    let mut stream = match client
        .watch_task(api::WatchTaskRequest {
            task_id: args.task_id.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return call_failed(&s, &args.connect).await,
    };
    let mut last = None;
    loop {
        let task = match stream.message().await {
            Ok(Some(e)) => match e.task {
                Some(t) => t,
                None => continue,
            },
            Ok(None) => break,
            Err(s) => return call_failed(&s, &args.connect).await,
        };
        if args.format == OutputFormat::Json {
            print_json(&task_json(&task));
        } else {
            let mut line = format!(
                "{}  {:<9}  attempt {}",
                output::unix_ms_utc(task.updated_unix_ms),
                state_name(task.state),
                task.attempts
            );
            if !task.agent_id.is_empty() && task.state == api::TaskState::Leased as i32 {
                line.push_str(&format!("  agent {}", task.agent_id));
            }
            if !task.error.is_empty() {
                line.push_str(&format!("  error: {}", task.error));
            }
            say!("{line}");
            if crate::tasks::is_terminal(task.state()) && !task.result.is_empty() {
                say!(
                    "result    {}",
                    String::from_utf8_lossy(&task.result).trim_end()
                );
            }
        }
        last = Some(task);
    }
    match last {
        Some(t) if t.state == api::TaskState::Succeeded as i32 => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// `cancel`: exit 0 when cancelled, 1 when the task had already finished.
pub fn cancel(args: CancelArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = Client::new(channel);
        let r = match client
            .cancel_task(api::CancelTaskRequest {
                task_id: args.task_id.clone(),
                reason: args.reason.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return call_failed(&s, &args.connect).await,
        };
        let task = r.task.unwrap_or_default();
        if args.format == OutputFormat::Json {
            print_json(&json!({"cancelled": r.cancelled, "task": task_json(&task)}));
        } else if r.cancelled {
            say!("cancelled {}", task.task_id);
        } else {
            say!(
                "not cancelled: {} had already finished ({})",
                task.task_id,
                state_name(task.state)
            );
        }
        if r.cancelled {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    })
}

/// `tasks`: the controller's own tasks, oldest first, page by page.
pub fn tasks(args: TasksArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = Client::new(channel);
        let mut token = args.page_token.clone().unwrap_or_default();
        let mut tasks = Vec::new();
        let limit = if args.limit == 0 {
            usize::MAX
        } else {
            args.limit
        };
        // Bounded: each page advances the token; a controller that answers
        // with the same token twice is not followed further.
        let mut more = false;
        for _ in 0..100_000 {
            let want = (limit - tasks.len()).min(args.page_size as usize) as u32;
            let page = match client
                .list_tasks(api::ListTasksRequest {
                    states: args.state.iter().map(|s| s.wire() as i32).collect(),
                    rule: args.rule.unwrap_or(0),
                    max_age_ms: args.newer_than.map_or(0, |d| d.as_millis() as i64),
                    min_age_ms: args.older_than.map_or(0, |d| d.as_millis() as i64),
                    page_size: want,
                    page_token: token.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => return call_failed(&s, &args.connect).await,
            };
            tasks.extend(page.tasks);
            more = !page.next_page_token.is_empty();
            if !more || page.next_page_token == token || tasks.len() >= limit {
                token = page.next_page_token;
                break;
            }
            token = page.next_page_token;
        }
        tasks.truncate(limit);
        if args.format == OutputFormat::Json {
            let mut text = String::new();
            for t in &tasks {
                text.push_str(&task_json(t).to_string());
                text.push('\n');
            }
            output::emit(&text);
        } else {
            output::emit(&tasks_table(&tasks));
        }
        if more {
            eprintln!(
                "{} task(s) shown; more may match: pass --page-token {token}",
                tasks.len()
            );
        } else {
            eprintln!("{} task(s)", tasks.len());
        }
        ExitCode::SUCCESS
    })
}

/// The `tasks` table.
pub fn tasks_table(tasks: &[api::Task]) -> String {
    let mut t = output::table(&[
        "TASK", "STATE", "RULE", "ATTEMPTS", "CREATED", "AGE", "UPDATED", "AGENT",
    ]);
    for task in tasks {
        t.add_row(vec![
            task.task_id.clone(),
            state_name(task.state),
            (task.rule_index + 1).to_string(),
            task.attempts.to_string(),
            output::unix_ms_utc(task.created_unix_ms),
            output::ago_unix_ms(task.created_unix_ms),
            format!("{} ago", output::ago_unix_ms(task.updated_unix_ms)),
            if task.agent_id.is_empty() {
                "-".to_string()
            } else {
                task.agent_id.clone()
            },
        ]);
    }
    output::render(&t)
}

/// `status`.
pub fn status(args: StatusArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut client = Admin::new(channel);
        let s = match client
            .federation_status(api::FederationStatusRequest {})
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                eprintln!("{}", connect::describe(&s, &args.connect).await);
                return ExitCode::from(2);
            }
        };
        if args.format == OutputFormat::Json {
            print_json(&status_json(&s));
        } else {
            output::emit(&status_table(&s));
        }
        ExitCode::SUCCESS
    })
}

fn drain_json(r: &api::DrainResponse) -> Value {
    let mut v =
        json!({"draining": r.draining, "queued": r.queued, "leased": r.leased, "empty": r.empty});
    if r.per_replica {
        v["replica"] = json!(r.replica);
        v["per_replica"] = json!(true);
        v["in_flight"] = json!(r.in_flight);
        v["agents"] = json!(r.agents);
        v["leader"] = json!(r.leader);
    }
    v
}

fn drain_line(r: &api::DrainResponse) -> String {
    if r.per_replica {
        // One replica of a region whose store is its database: the counts
        // are the region's, `empty` is this replica's.
        return format!(
            "replica {}: {}: {} in flight, {} agent(s), {}; region: {} queued, {} leased{}",
            r.replica,
            if r.draining {
                "draining"
            } else {
                "taking new tasks"
            },
            r.in_flight,
            r.agents,
            if r.leader { "leads" } else { "does not lead" },
            r.queued,
            r.leased,
            if r.empty { "; empty" } else { "" }
        );
    }
    format!(
        "{}: {} queued, {} leased{}",
        if r.draining {
            "draining"
        } else {
            "taking new tasks"
        },
        r.queued,
        r.leased,
        if r.empty { ", empty" } else { "" }
    )
}

/// `drain`: stop taking new tasks in the controller's region (with several
/// replicas on the region's database: this replica only); with `--wait`,
/// one line (rewritten in place on a terminal) until it is empty.
pub fn drain(args: DrainArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin = Admin::new(channel);
        let started = Instant::now();
        let until = started + args.wait_timeout;
        let mut progress = Progress::new();
        loop {
            let r = match admin.drain(api::DrainRequest { drain: true }).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    progress.finish();
                    eprintln!("{}", connect::describe(&s, &args.connect).await);
                    return ExitCode::from(2);
                }
            };
            if !args.wait || r.empty {
                progress.finish();
                if args.format == OutputFormat::Json {
                    print_json(&drain_json(&r));
                } else {
                    say!("{}", drain_line(&r));
                }
                return ExitCode::SUCCESS;
            }
            if Instant::now() >= until {
                progress.finish();
                if args.format == OutputFormat::Json {
                    print_json(&drain_json(&r));
                }
                eprintln!(
                    "still not empty after {}: {}",
                    output::human(args.wait_timeout),
                    drain_line(&r)
                );
                return ExitCode::from(1);
            }
            let line = drain_line(&r);
            progress.show(
                &format!("{line}, waiting {}", output::human(started.elapsed())),
                &line,
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// `undrain`: take new tasks again.
pub fn undrain(args: UndrainArgs) -> ExitCode {
    run_command(async move {
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin = Admin::new(channel);
        match admin.drain(api::DrainRequest { drain: false }).await {
            Ok(r) => {
                let r = r.into_inner();
                if args.format == OutputFormat::Json {
                    print_json(&drain_json(&r));
                } else {
                    say!("{}", drain_line(&r));
                }
                ExitCode::SUCCESS
            }
            Err(s) => {
                eprintln!("{}", connect::describe(&s, &args.connect).await);
                ExitCode::from(2)
            }
        }
    })
}

/// `reload`: validate and apply a policy on a running controller.
pub fn reload(args: ReloadArgs) -> ExitCode {
    run_command(async move {
        let approvals = match args.file.as_deref().map(crate::approvals::approvals_path) {
            Some(p) => match std::fs::read_to_string(&p) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return super::fail(&anyhow::anyhow!("reading {}: {e}", p.display()), 2),
            },
            None => String::new(),
        };
        let (source, format, name) = match &args.file {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => {
                    let format = match p.extension().and_then(|e| e.to_str()) {
                        Some("json") => "json",
                        Some("toml") => "toml",
                        _ => "yaml",
                    };
                    (text, format.to_string(), p.display().to_string())
                }
                Err(e) => return super::fail(&anyhow::anyhow!("reading {}: {e}", p.display()), 2),
            },
            None => (String::new(), String::new(), String::new()),
        };
        let channel = match connect::channel(&args.connect) {
            Ok(c) => c,
            Err(e) => return super::fail(&e, 2),
        };
        let mut admin = Admin::new(channel);
        match admin
            .reload_policy(api::ReloadPolicyRequest {
                policy_source: source,
                format,
                source_name: name,
                approvals,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if args.format == OutputFormat::Json {
                    print_json(&json!({
                        "applied": r.applied, "policy_hash": r.policy_hash,
                        "findings": r.findings, "error": r.error,
                    }));
                } else {
                    for f in &r.findings {
                        say!("finding: {f}");
                    }
                    if r.applied {
                        say!("applied: policy {}", r.policy_hash);
                    }
                }
                if r.applied {
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
                eprintln!("{}", connect::describe(&s, &args.connect).await);
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
                "capacity_is_current": r.state == "self" || r.state == "alive",
                "epoch": r.epoch, "sequence": r.sequence, "policy_hash": r.policy_hash,
                "policy_mismatch": r.policy_mismatch, "last_advertisement_age_ms": r.last_advertisement_age_ms,
                "state_age_ms": r.state_age_ms, "hold_down_remaining_ms": r.hold_down_remaining_ms,
                "draining": r.draining, "endpoint": r.endpoint, "phi": r.phi,
                "store_undecodable_records": r.store_undecodable_records,
                "store_undecodable": r.store_undecodable,
            })
        }).collect::<Vec<_>>(),
    })
}

/// An epoch (milliseconds since the Unix epoch at the region's start) as
/// UTC; small numbers (a counter) as they are.
fn epoch_text(epoch: u64) -> String {
    // Anything before 2001 is not a start time in milliseconds.
    if epoch >= 978_307_200_000 {
        output::unix_ms_utc(i64::try_from(epoch).unwrap_or(i64::MAX))
    } else {
        epoch.to_string()
    }
}

/// The status table.
pub fn status_table(s: &api::FederationStatusResponse) -> String {
    let mut out = format!(
        "federation {} as seen from {} (policy {}, epoch {})\n",
        s.federation,
        s.self_region,
        short(&s.policy_hash),
        epoch_text(s.epoch)
    );
    let mut t = output::table(&[
        "REGION",
        "STATE",
        "SINCE",
        "DRAIN",
        "HOLD-DOWN",
        "TAGS",
        "SLOTS",
        "QUEUE",
        "EPOCH",
        "POLICY",
        "AD AGE",
    ]);
    let mut stale = false;
    for r in &s.regions {
        let c = r.capacity.unwrap_or_default();
        // A region not heard from lately: its capacity is history.
        let current = r.state == "self" || r.state == "alive";
        let (slots, queue) = if current {
            (
                format!("{}/{}", c.free_slots, c.total_slots),
                c.queue_depth.to_string(),
            )
        } else if r.last_advertisement_age_ms < 0 {
            ("-".to_string(), "-".to_string())
        } else {
            stale = true;
            (
                format!("({}/{})", c.free_slots, c.total_slots),
                format!("({})", c.queue_depth),
            )
        };
        let policy = if r.policy_hash.is_empty() {
            "-".to_string()
        } else if r.policy_mismatch {
            format!("{}!", short(&r.policy_hash))
        } else {
            short(&r.policy_hash).to_string()
        };
        t.add_row(vec![
            r.region.clone(),
            r.state.clone(),
            output::human_ms(r.state_age_ms),
            if r.draining { "yes" } else { "-" }.to_string(),
            if r.hold_down_remaining_ms > 0 {
                format!("{} left", output::human_ms(r.hold_down_remaining_ms))
            } else {
                "-".to_string()
            },
            if r.compliance_tags.is_empty() {
                "-".to_string()
            } else {
                r.compliance_tags.join(",")
            },
            slots,
            queue,
            if r.epoch == 0 {
                "-".to_string()
            } else {
                epoch_text(r.epoch)
            },
            policy,
            if r.state == "self" {
                "-".to_string()
            } else {
                output::human_ms(r.last_advertisement_age_ms)
            },
        ]);
    }
    out.push_str(&output::render(&t));
    if s.regions.iter().any(|r| r.policy_mismatch) {
        out.push_str("! = region advertises a different policy hash\n");
    }
    if stale {
        out.push_str("(n) = last advertised before the region went silent, not current\n");
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

/// The first 8 characters of a hash (the whole string when shorter, or
/// when byte 8 is inside a character: the hash came from the network).
fn short(hash: &str) -> &str {
    hash.get(..8).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_prints_a_decision_as_policy_explain_and_the_log_do() {
        let policy = crate::policy::Policy::load_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-federation.yaml"
        )))
        .expect("seed loads");
        let attrs: Attributes = [("customer_region".to_string(), AttrValue::Str("DE".into()))]
            .into_iter()
            .collect();
        for down in [vec![], vec!["europe".to_string()]] {
            let view = crate::policy::StaticView {
                down: down.into_iter().collect(),
                ..Default::default()
            };
            let d = policy.decide(&attrs, &view.bind(&policy));
            let logged = serde_json::to_value(&d).expect("serializes");
            assert_eq!(
                decision_json(&crate::wire::decision_to_wire(&d)),
                logged,
                "one shape"
            );
        }
    }

    #[test]
    fn short_hashes_never_split_a_character() {
        assert_eq!(short("23de659d1234"), "23de659d");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("1234567é9"), "1234567é9");
    }

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
