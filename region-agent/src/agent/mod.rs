//! The agent's run: start-up, one session after another, and ordered
//! shutdown; it makes no controller call itself and holds no state of its own.

mod backoff;
mod lease_loop;
mod report;
mod session;
mod state;
mod status;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, warn};

use crate::exec::CancelReason;
use crate::{AgentConfig, AgentError, AgentReport};
use session::{SessionEnd, client_to};
use state::{Agent, Counters};

/// After the grace period, how long killed tasks get to wind down.
const KILL_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<AgentReport, AgentError> {
    config.validate()?;
    let controllers = config.controllers();
    let first = controllers
        .first()
        .cloned()
        .unwrap_or_else(|| config.controller.clone());
    let client = client_to(&config, &first)?;
    let slots = usize::try_from(config.slots).unwrap_or(usize::MAX);
    let agent = Arc::new(Agent {
        client: Mutex::new((client, 0)),
        controllers,
        drain_moves: AtomicU64::new(0),
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
