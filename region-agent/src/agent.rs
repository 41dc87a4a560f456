//! The controller side of the agent: registration, heartbeats, the lease
//! loop, lease renewal and completion reports.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use federation_api::region_agent_api_client::RegionAgentApiClient;
use federation_api::{
    Capacity, CompleteTaskRequest, HeartbeatRequest, LeaseTasksRequest, RegisterRequest,
    RegisterResponse, RenewLeaseRequest, Task,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{Instrument, debug, error, info, warn};

use crate::exec::{self, CancelReason, ExecStatus, Report};
use crate::{AgentConfig, AgentError, AgentReport};

type Client = RegionAgentApiClient<federation_tls::AuthChannel>;
type CancelSender = Arc<watch::Sender<Option<CancelReason>>>;

/// Used when the controller sends 0 for a timer.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
const MIN_TIMER: Duration = Duration::from_millis(50);
/// An empty lease answer faster than this is followed by a pause, so a
/// controller that ignores `wait_ms` is not polled in a tight loop.
const MIN_EMPTY_POLL: Duration = Duration::from_millis(100);
/// After the grace period, how long killed tasks get to wind down.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One registration: the id and timers the controller gave.
#[derive(Debug)]
struct Session {
    agent_id: String,
    heartbeat_interval: Duration,
    lease_ttl: Duration,
}

enum SessionEnd {
    /// The controller forgot the agent (restart): register again.
    Reregister,
    /// Shutdown was asked.
    Stopped,
}

#[derive(Debug, Default)]
struct Counters {
    registrations: AtomicU64,
    leased: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    unreported: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct RunningTask {
    cancel: CancelSender,
    token: u64,
}

struct Agent {
    config: AgentConfig,
    client: Client,
    /// One permit per slot; a running task holds one.
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<String, RunningTask>>,
    next_token: AtomicU64,
    counters: Counters,
    draining: watch::Sender<bool>,
    stopping: watch::Sender<bool>,
    /// The id of the last registration, sent again when registering anew so
    /// that the controller keeps this agent's leases under it.
    agent_id: Mutex<String>,
}

/// Exponential backoff with jitter, capped.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::START.min(max),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Self::START.min(self.max);
    }

    /// The next delay, between 75% and 125% of the nominal one.
    fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let random = RandomState::new().build_hasher().finish();
        let factor = 0.75 + 0.5 * ((random % 1000) as f64 / 1000.0);
        nominal.mul_f64(factor)
    }
}

/// Log the 1st, 2nd, 4th, 8th… occurrence loudly, the rest at debug level.
fn loud(occurrence: u64) -> bool {
    occurrence <= 1 || occurrence.is_power_of_two()
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn status_text(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The controller no longer considers this agent the lease holder.
fn lease_gone(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::NotFound | Code::FailedPrecondition | Code::Aborted | Code::PermissionDenied
    )
}

/// The controller does not know this agent id.
fn unknown_agent(status: &Status) -> bool {
    status.code() == Code::NotFound || status.message().contains("unknown agent")
}

/// Worth retrying: the controller is down, restarting or overloaded.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Internal
    )
}

/// Sleeps for `delay` unless `stop` turns true first; true when stopped.
async fn sleep_unless(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// The channel to the controller: mutual TLS when a CA is configured (the
/// controller's certificate must name our region), plaintext otherwise.
fn channel(config: &AgentConfig) -> Result<Channel, AgentError> {
    let connect_timeout = config.rpc_timeout.min(Duration::from_secs(5));
    let Some(ca) = &config.tls.ca else {
        let uri = federation_tls::Address::parse(&config.controller)
            .map(|a| a.uri())
            .unwrap_or_else(|_| config.controller.clone());
        let endpoint = Endpoint::from_shared(uri).map_err(|source| AgentError::Address {
            address: config.controller.clone(),
            source,
        })?;
        return Ok(endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy());
    };
    let tls = federation_tls::ClientTls::load(
        ca,
        config
            .tls
            .cert_key
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
        "",
    )
    .map_err(|e| AgentError::Config(e.to_string()))?;
    let expect = match &config.region {
        Some(r) => federation_tls::Expect::Region(r.clone()),
        None => federation_tls::Expect::AnyController,
    };
    tls.channel(&config.controller, expect, None, |ep| {
        ep.connect_timeout(connect_timeout).tcp_nodelay(true)
    })
    .map_err(|e| AgentError::Config(e.to_string()))
}

pub(crate) async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<AgentReport, AgentError> {
    config.validate()?;
    let channel = channel(&config)?;
    let bearer = federation_tls::Bearer::new(config.tls.token.as_deref())
        .map_err(|e| AgentError::Config(format!("--token: {e}")))?;
    let slots = usize::try_from(config.slots).unwrap_or(usize::MAX);
    let agent = Arc::new(Agent {
        client: RegionAgentApiClient::with_interceptor(channel, bearer),
        slots: Arc::new(Semaphore::new(slots)),
        running: Mutex::new(HashMap::new()),
        next_token: AtomicU64::new(0),
        counters: Counters::default(),
        draining: watch::Sender::new(false),
        stopping: watch::Sender::new(false),
        agent_id: Mutex::new(String::new()),
        config,
    });
    let controller = agent.config.controller.clone();
    info!(
        controller = %controller,
        name = %agent.config.name,
        slots = agent.config.slots,
        command = %agent.config.command,
        "agent starting"
    );

    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    let mut agent_id = String::new();
    tokio::pin!(shutdown);
    let mut shutdown_seen = false;

    let outcome: Result<(), AgentError> = loop {
        if let Some(handle) = heartbeat.take() {
            handle.abort();
        }
        if *agent.stopping.borrow() {
            break Ok(());
        }
        let session = tokio::select! {
            registered = agent.register() => match registered {
                Ok(session) => Arc::new(session),
                Err(err) => break Err(err),
            },
            () = &mut shutdown, if !shutdown_seen => break Ok(()),
        };
        agent_id.clone_from(&session.agent_id);
        let (reregister_tx, reregister_rx) = watch::channel(false);
        heartbeat = Some(tokio::spawn(
            agent
                .clone()
                .heartbeat_loop(session.clone(), reregister_tx)
                .instrument(tracing::info_span!("heartbeat")),
        ));
        let lease = agent.lease_loop(&session, &mut tasks, reregister_rx);
        tokio::pin!(lease);
        let end = tokio::select! {
            end = &mut lease => end,
            () = &mut shutdown, if !shutdown_seen => {
                shutdown_seen = true;
                info!(controller = %controller, "shutdown requested, leasing stops");
                agent.stopping.send_replace(true);
                // A lease call in flight is not cut short: its answer may
                // carry tasks that are already leased to this agent.
                lease.await
            }
        };
        match end {
            SessionEnd::Reregister => continue,
            SessionEnd::Stopped => break Ok(()),
        }
    };

    // Stop leasing, let running tasks finish within the grace period.
    agent.stopping.send_replace(true);
    if !tasks.is_empty() {
        info!(
            running = tasks.len(),
            grace = %humantime::format_duration(agent.config.shutdown_grace),
            "waiting for running tasks"
        );
    }
    let finished = tokio::time::timeout(agent.config.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !finished {
        let killed = agent.cancel_all(CancelReason::Shutdown);
        warn!(
            killed,
            "shutdown grace expired, killing running tasks (their leases will expire and they run again)"
        );
        let wait = agent.config.limits.output_drain + KILL_WAIT;
        let wound_down =
            tokio::time::timeout(wait, async { while tasks.join_next().await.is_some() {} })
                .await
                .is_ok();
        if !wound_down {
            let left = tasks.len() as u64;
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            agent.counters.unreported.fetch_add(left, Ordering::Relaxed);
        }
    }
    if let Some(handle) = heartbeat.take() {
        handle.abort();
    }
    let report = agent.report(agent_id);
    info!(
        controller = %controller,
        succeeded = report.succeeded,
        failed = report.failed,
        lost = report.lost,
        unreported = report.unreported,
        "agent stopped"
    );
    outcome.map(|()| report)
}

impl Agent {
    fn report(&self, agent_id: String) -> AgentReport {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        AgentReport {
            agent_id,
            registrations: get(&c.registrations),
            leased: get(&c.leased),
            succeeded: get(&c.succeeded),
            failed: get(&c.failed),
            lost: get(&c.lost),
            unreported: get(&c.unreported),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningTask>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn last_agent_id(&self) -> String {
        self.agent_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn running_count(&self) -> u32 {
        u32::try_from(self.running().len()).unwrap_or(u32::MAX)
    }

    /// Records a running task; returns the token that untracks it.
    fn track(&self, task_id: &str, cancel: CancelSender) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .running()
            .insert(task_id.to_owned(), RunningTask { cancel, token });
        if let Some(previous) = previous {
            // Leased again while an earlier run is still going (its lease
            // expired): the earlier run's result would be refused anyway.
            warn!(
                task_id,
                "task leased again while still running here, stopping the earlier run"
            );
            cancel_with(
                &previous.cancel,
                CancelReason::LeaseLost("leased again".to_owned()),
            );
        }
        token
    }

    fn untrack(&self, task_id: &str, token: u64) {
        let mut running = self.running();
        if running.get(task_id).is_some_and(|r| r.token == token) {
            running.remove(task_id);
        }
    }

    /// Cancels a running task; false when it is not running here.
    fn cancel(&self, task_id: &str, reason: CancelReason) -> bool {
        match self.running().get(task_id) {
            Some(task) => {
                cancel_with(&task.cancel, reason);
                true
            }
            None => false,
        }
    }

    fn cancel_all(&self, reason: CancelReason) -> usize {
        let running = self.running();
        for task in running.values() {
            cancel_with(&task.cancel, reason.clone());
        }
        running.len()
    }

    /// Registers, retrying transient failures with capped backoff until it
    /// works, the controller refuses, or `register_timeout` passes.
    async fn register(&self) -> Result<Session, AgentError> {
        let controller = &self.config.controller;
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let request = RegisterRequest {
                name: self.config.name.clone(),
                region: self.config.region.clone().unwrap_or_default(),
                slots: self.config.slots,
                agent_id: self.last_agent_id(),
            };
            let mut client = self.client.clone();
            let last_error =
                match tokio::time::timeout(self.config.rpc_timeout, client.register(request)).await
                {
                    Ok(Ok(response)) => return self.session_from(response.into_inner(), attempt),
                    Ok(Err(status)) if !transient(&status) => {
                        return Err(AgentError::Rejected {
                            controller: controller.clone(),
                            code: status.code(),
                            message: status.message().to_owned(),
                        });
                    }
                    Ok(Err(status)) => status_text(&status),
                    Err(_) => format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.rpc_timeout)
                    ),
                };
            if let Some(limit) = self.config.register_timeout {
                if started.elapsed() >= limit {
                    return Err(AgentError::Unreachable {
                        controller: controller.clone(),
                        attempts: attempt,
                        last_error,
                    });
                }
            }
            let delay = backoff.next_delay();
            if loud(attempt) {
                warn!(
                    controller = %controller,
                    attempt,
                    error = %last_error,
                    retry_in_ms = delay.as_millis() as u64,
                    "controller unreachable, retrying registration"
                );
            } else {
                debug!(controller = %controller, attempt, error = %last_error, "registration failed");
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn session_from(
        &self,
        response: RegisterResponse,
        attempt: u64,
    ) -> Result<Session, AgentError> {
        if response.agent_id.is_empty() {
            return Err(AgentError::Protocol {
                controller: self.config.controller.clone(),
                message: "Register answered with an empty agent_id".to_owned(),
            });
        }
        let timer = |ms: u32, default: Duration, what: &str| {
            if ms == 0 {
                warn!(timer = what, "controller sent 0, using the default");
                default
            } else {
                Duration::from_millis(u64::from(ms)).max(MIN_TIMER)
            }
        };
        let session = Session {
            heartbeat_interval: timer(
                response.heartbeat_interval_ms,
                DEFAULT_HEARTBEAT,
                "heartbeat_interval_ms",
            ),
            lease_ttl: timer(response.lease_ttl_ms, DEFAULT_LEASE_TTL, "lease_ttl_ms"),
            agent_id: response.agent_id,
        };
        bump(&self.counters.registrations);
        let previous = std::mem::replace(
            &mut *self.agent_id.lock().unwrap_or_else(PoisonError::into_inner),
            session.agent_id.clone(),
        );
        if !previous.is_empty() && previous != session.agent_id {
            warn!(
                controller = %self.config.controller,
                previous = %previous,
                agent_id = %session.agent_id,
                running = self.running_count(),
                "controller gave a new agent id; tasks leased under the previous one will be refused"
            );
        }
        info!(
            controller = %self.config.controller,
            agent_id = %session.agent_id,
            attempts = attempt,
            heartbeat_ms = session.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms = session.lease_ttl.as_millis() as u64,
            "registered"
        );
        Ok(session)
    }

    /// Heartbeats until the controller forgets the agent (then asks for a
    /// new registration through `reregister`) or the task is aborted.
    async fn heartbeat_loop(
        self: Arc<Self>,
        session: Arc<Session>,
        reregister: watch::Sender<bool>,
    ) {
        let controller = &self.config.controller;
        let mut ticker = tokio::time::interval(session.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let call_timeout = self.config.rpc_timeout.min(
            session
                .heartbeat_interval
                .saturating_mul(2)
                .max(Duration::from_secs(1)),
        );
        let mut failures = 0u64;
        loop {
            ticker.tick().await;
            let total = self.config.slots;
            let free = if *self.stopping.borrow() {
                0
            } else {
                total.saturating_sub(self.running_count())
            };
            let request = HeartbeatRequest {
                agent_id: session.agent_id.clone(),
                capacity: Some(Capacity {
                    total_slots: total,
                    free_slots: free,
                    queue_depth: 0,
                    queue_limit: 0,
                }),
            };
            let mut client = self.client.clone();
            match tokio::time::timeout(call_timeout, client.heartbeat(request)).await {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        info!(controller = %controller, failures, "heartbeats answered again");
                    }
                    failures = 0;
                    let response = response.into_inner();
                    let was = self.draining.send_replace(response.draining);
                    if was != response.draining {
                        info!(
                            controller = %controller,
                            draining = response.draining,
                            "controller drain state changed"
                        );
                    }
                    for task_id in &response.revoked_task_ids {
                        if self.cancel(task_id, CancelReason::Revoked) {
                            warn!(task_id = %task_id, "task revoked by the controller, killing it");
                        }
                    }
                }
                Ok(Err(status)) if unknown_agent(&status) => {
                    warn!(
                        controller = %controller,
                        error = %status_text(&status),
                        "controller does not know this agent (restarted?), registering again"
                    );
                    reregister.send_replace(true);
                    return;
                }
                Ok(Err(status)) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %controller, failures, error = %status_text(&status), "heartbeat failed");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %controller, failures, "heartbeat timed out");
                    }
                }
            }
        }
    }

    /// Leases tasks whenever a slot is free, until shutdown or until the
    /// controller forgets the agent.
    async fn lease_loop(
        self: &Arc<Self>,
        session: &Arc<Session>,
        tasks: &mut JoinSet<()>,
        mut reregister: watch::Receiver<bool>,
    ) -> SessionEnd {
        let controller = &self.config.controller;
        let mut stopping = self.stopping.subscribe();
        let mut draining = self.draining.subscribe();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut failures = 0u64;
        let call_timeout = self.config.lease_wait + self.config.rpc_timeout;
        loop {
            while tasks.try_join_next().is_some() {}
            if *stopping.borrow_and_update() {
                return SessionEnd::Stopped;
            }
            if *reregister.borrow_and_update() {
                return SessionEnd::Reregister;
            }
            if *draining.borrow_and_update() {
                debug!("controller draining, not leasing");
                tokio::select! {
                    _ = stopping.changed() => {}
                    changed = reregister.changed() => if changed.is_err() {
                        return SessionEnd::Reregister;
                    },
                    _ = draining.changed() => {}
                }
                continue;
            }
            let first = tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return SessionEnd::Stopped,
                },
                _ = stopping.changed() => continue,
                changed = reregister.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Reregister;
                    }
                    continue;
                }
                _ = draining.changed() => continue,
            };
            let mut permits = vec![first];
            while let Ok(permit) = self.slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            let asked = permits.len();
            let mut request = tonic::Request::new(LeaseTasksRequest {
                agent_id: session.agent_id.clone(),
                max_tasks: u32::try_from(asked).unwrap_or(u32::MAX),
                wait_ms: millis_u32(self.config.lease_wait),
            });
            request.set_timeout(call_timeout);
            let mut client = self.client.clone();
            let started = Instant::now();
            // Not cut short by shutdown: see `run`.
            let answer = tokio::time::timeout(call_timeout, client.lease_tasks(request)).await;
            let error = match answer {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        info!(controller = %controller, failures, "leasing works again");
                    }
                    failures = 0;
                    backoff.reset();
                    let leased = response.into_inner().tasks;
                    if leased.len() > asked {
                        warn!(
                            asked,
                            got = leased.len(),
                            "controller leased more tasks than asked, running them all"
                        );
                    }
                    let empty = leased.is_empty();
                    for task in leased {
                        bump(&self.counters.leased);
                        let permit = permits.pop();
                        tasks.spawn(self.clone().run_task(session.clone(), task, permit));
                    }
                    drop(permits);
                    if empty
                        && started.elapsed() < MIN_EMPTY_POLL
                        && sleep_unless(MIN_EMPTY_POLL, &mut stopping).await
                    {
                        return SessionEnd::Stopped;
                    }
                    continue;
                }
                Ok(Err(status)) if unknown_agent(&status) => {
                    warn!(
                        controller = %controller,
                        error = %status_text(&status),
                        "controller does not know this agent (restarted?), registering again"
                    );
                    return SessionEnd::Reregister;
                }
                Ok(Err(status)) => status_text(&status),
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(call_timeout)
                ),
            };
            drop(permits);
            failures += 1;
            let delay = backoff.next_delay();
            if loud(failures) {
                warn!(
                    controller = %controller,
                    failures,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "lease request failed"
                );
            } else {
                debug!(controller = %controller, failures, error = %error, "lease request failed");
            }
            if sleep_unless(delay, &mut stopping).await {
                return SessionEnd::Stopped;
            }
        }
    }

    /// Runs one leased task: executes it while renewing its lease, then
    /// reports the outcome.
    async fn run_task(
        self: Arc<Self>,
        session: Arc<Session>,
        mut task: Task,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let span = tracing::info_span!(
            "task",
            task_id = %task.task_id,
            attempt = task.attempts,
        );
        // The exported span of this run, a child of the span that accepted
        // the task; the command gets the run's context (or, when the agent
        // does not export, the task's own).
        let run_span = tracing::info_span!(
            target: federation_trace::TARGET,
            "run_task",
            otel.status_description = tracing::field::Empty,
            task_id = %task.task_id,
            attempt = task.attempts,
            agent = %self.config.name,
        );
        let run = run_span.clone();
        let received = federation_trace::TraceParent::parse(&task.traceparent);
        federation_trace::set_parent(&run_span, received.as_ref());
        task.traceparent = federation_trace::outgoing(&run_span, received.as_ref())
            .map(|t| t.to_string())
            .unwrap_or_default();
        async move {
            let (cancel_tx, mut cancel_rx) = watch::channel(None::<CancelReason>);
            let cancel_tx: CancelSender = Arc::new(cancel_tx);
            let token = self.track(&task.task_id, cancel_tx.clone());
            info!(
                controller = %self.config.controller,
                payload_bytes = task.payload.len(),
                "task started"
            );
            let cancelled = async move {
                loop {
                    if let Some(reason) = cancel_rx.borrow_and_update().clone() {
                        return reason;
                    }
                    if cancel_rx.changed().await.is_err() {
                        // The sender lives as long as this task; never here.
                        std::future::pending::<()>().await;
                    }
                }
            };
            let execution =
                exec::execute(&self.config.command, &task, &self.config.limits, cancelled)
                    .instrument(tracing::info_span!(target: federation_trace::TARGET, "exec"));
            tokio::pin!(execution);
            let execution = tokio::select! {
                execution = &mut execution => execution,
                () = self.renew_loop(&session, &task.task_id, &cancel_tx) => execution.await,
            };
            self.untrack(&task.task_id, token);
            drop(permit);
            if execution.truncated {
                warn!(
                    output_bytes = execution.output_bytes,
                    max_output = self.config.limits.max_output,
                    "task output truncated"
                );
            }
            let elapsed_ms = execution.elapsed.as_millis() as u64;
            match execution.report() {
                None => {
                    let reason = match &execution.status {
                        ExecStatus::Cancelled(reason) => reason.clone(),
                        _ => CancelReason::Shutdown,
                    };
                    if reason == CancelReason::Shutdown {
                        bump(&self.counters.unreported);
                    } else {
                        bump(&self.counters.lost);
                    }
                    warn!(reason = %reason, elapsed_ms, "task killed, result dropped");
                }
                Some(report) => {
                    if report.success {
                        info!(elapsed_ms, "task succeeded");
                    } else {
                        info!(elapsed_ms, error = %report.error, "task failed");
                        federation_trace::fail(&run, &report.error);
                    }
                    let traced = federation_trace::TraceParent::parse(&task.traceparent);
                    self.complete(&session, &task.task_id, report, traced.as_ref())
                        .instrument(tracing::info_span!(
                            target: federation_trace::TARGET,
                            "complete_task",
                            otel.kind = "client",
                        ))
                        .await;
                }
            }
        }
        .instrument(span)
        .instrument(run_span)
        .await;
    }

    /// Renews the lease every TTL/3; returns only when the lease is gone
    /// (after asking the execution to stop).
    async fn renew_loop(&self, session: &Session, task_id: &str, cancel: &CancelSender) {
        let period = (session.lease_ttl / 3).max(MIN_TIMER);
        let call_timeout = self.config.rpc_timeout.min(period);
        let mut failures = 0u64;
        loop {
            tokio::time::sleep(period).await;
            let request = RenewLeaseRequest {
                agent_id: session.agent_id.clone(),
                task_id: task_id.to_owned(),
            };
            let mut client = self.client.clone();
            match tokio::time::timeout(call_timeout, client.renew_lease(request)).await {
                Ok(Ok(_)) => {
                    failures = 0;
                    debug!("lease renewed");
                }
                Ok(Err(status)) if lease_gone(&status) => {
                    warn!(
                        controller = %self.config.controller,
                        error = %status_text(&status),
                        "lease lost, killing the task"
                    );
                    cancel_with(cancel, CancelReason::LeaseLost(status_text(&status)));
                    return;
                }
                Ok(Err(status)) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %self.config.controller, failures, error = %status_text(&status), "lease renewal failed, will retry");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %self.config.controller, failures, "lease renewal timed out, will retry");
                    }
                }
            }
        }
    }

    /// Reports an outcome, retrying transient failures for
    /// `complete_retry_for`.
    /// `received` is the run's trace context, sent on when the agent does
    /// not export (else the report span's own goes, so the controller's
    /// completion span is its child).
    async fn complete(
        &self,
        session: &Session,
        task_id: &str,
        report: Report,
        received: Option<&federation_trace::TraceParent>,
    ) {
        let traceparent = federation_trace::outgoing(&tracing::Span::current(), received);
        let controller = &self.config.controller;
        let request = CompleteTaskRequest {
            agent_id: session.agent_id.clone(),
            task_id: task_id.to_owned(),
            success: report.success,
            result: report.result,
            error: report.error,
            exit_code: report.exit_code,
        };
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let mut client = self.client.clone();
            let mut call = tonic::Request::new(request.clone());
            if let Some(tp) = &traceparent {
                federation_trace::to_metadata(call.metadata_mut(), tp);
            }
            let error =
                match tokio::time::timeout(self.config.rpc_timeout, client.complete_task(call))
                    .await
                {
                    Ok(Ok(_)) => {
                        bump(if request.success {
                            &self.counters.succeeded
                        } else {
                            &self.counters.failed
                        });
                        info!(
                            controller = %controller,
                            success = request.success,
                            exit_code = request.exit_code,
                            attempts = attempt,
                            "task reported"
                        );
                        return;
                    }
                    Ok(Err(status)) if lease_gone(&status) => {
                        bump(&self.counters.lost);
                        warn!(
                            controller = %controller,
                            error = %status_text(&status),
                            "controller refused the result (lease lost), dropped"
                        );
                        return;
                    }
                    Ok(Err(status)) if !transient(&status) => {
                        bump(&self.counters.unreported);
                        error!(
                            controller = %controller,
                            error = %status_text(&status),
                            "controller rejected the result"
                        );
                        return;
                    }
                    Ok(Err(status)) => status_text(&status),
                    Err(_) => format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.rpc_timeout)
                    ),
                };
            let delay = backoff.next_delay();
            if started.elapsed() + delay > self.config.complete_retry_for {
                bump(&self.counters.unreported);
                error!(
                    controller = %controller,
                    attempts = attempt,
                    error = %error,
                    "giving up reporting the task; its lease will expire and it will run again"
                );
                return;
            }
            if loud(attempt) {
                warn!(controller = %controller, attempt, error = %error, "reporting the task failed, retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// Sets the cancel reason unless one is already set.
fn cancel_with(cancel: &CancelSender, reason: CancelReason) {
    cancel.send_if_modified(|current| {
        if current.is_none() {
            *current = Some(reason);
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let max = Duration::from_millis(800);
        let mut backoff = Backoff::new(max);
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max.mul_f64(1.25)));
        assert!(delays[0] <= Duration::from_millis(125));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn loud_logging_is_logarithmic() {
        let loud_count = (1..=1000u64).filter(|n| loud(*n)).count();
        assert_eq!(loud_count, 10);
    }

    #[test]
    fn status_classification() {
        assert!(lease_gone(&Status::failed_precondition(
            "lease held by another agent"
        )));
        assert!(lease_gone(&Status::not_found("no such task")));
        assert!(!lease_gone(&Status::unavailable("down")));
        assert!(transient(&Status::unavailable("down")));
        assert!(!transient(&Status::invalid_argument("region mismatch")));
        assert!(unknown_agent(&Status::not_found("unknown agent a1")));
    }
}
