//! The session with the controller: the channel, registering (again after a
//! controller restart) and heartbeats; it leases no task and reports none.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use federation_api::region_agent_api_client::RegionAgentApiClient;
use federation_api::{Capacity, HeartbeatRequest, RegisterRequest, RegisterResponse};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, loud};
use super::state::{Agent, Client, bump};
use super::status::{status_text, transient, unknown_agent};
use crate::exec::CancelReason;
use crate::{AgentConfig, AgentError};

/// Used when the controller sends 0 for a timer.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
pub(super) const MIN_TIMER: Duration = Duration::from_millis(50);
/// Heartbeats failed in a row before the agent moves to another of the
/// region's replicas (when it was given several).
const MOVE_AFTER_FAILURES: u64 = 3;

/// One registration: the id and timers the controller gave.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) agent_id: String,
    pub(super) heartbeat_interval: Duration,
    pub(super) lease_ttl: Duration,
}

pub(super) enum SessionEnd {
    /// The controller forgot the agent (restart): register again.
    Reregister,
    /// Shutdown was asked.
    Stopped,
}

/// A client of the controller at `address`, with the agent's credentials.
pub(super) fn client_to(config: &AgentConfig, address: &str) -> Result<Client, AgentError> {
    let channel = channel(config, address)?;
    let bearer = federation_tls::Bearer::new(config.tls.token.as_deref())
        .map_err(|e| AgentError::Config(format!("--token: {e}")))?;
    Ok(RegionAgentApiClient::with_interceptor(channel, bearer))
}

/// The channel to the controller at `address`: mutual TLS when a CA is
/// configured (the controller's certificate must name our region),
/// plaintext otherwise.
fn channel(config: &AgentConfig, address: &str) -> Result<Channel, AgentError> {
    let connect_timeout = config.rpc_timeout.min(Duration::from_secs(5));
    let Some(ca) = &config.tls.ca else {
        let uri = federation_tls::Address::parse(address)
            .map(|a| a.uri())
            .unwrap_or_else(|_| address.to_owned());
        let endpoint = Endpoint::from_shared(uri).map_err(|source| AgentError::Address {
            address: address.to_owned(),
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
    tls.channel(address, expect, None, |ep| {
        ep.connect_timeout(connect_timeout).tcp_nodelay(true)
    })
    .map_err(|e| AgentError::Config(e.to_string()))
}

impl Agent {
    /// Registers, retrying transient failures with capped backoff until it
    /// works, the controller refuses, or `register_timeout` passes.
    pub(super) async fn register(&self) -> Result<Session, AgentError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let controller = &self.controller();
            let request = RegisterRequest {
                name: self.config.name.clone(),
                region: self.config.region.clone().unwrap_or_default(),
                slots: self.config.slots,
                agent_id: self.last_agent_id(),
            };
            let mut client = self.client();
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
            // Another replica of the region may answer.
            self.move_on();
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
                controller: self.controller(),
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
                controller = %self.controller(),
                previous = %previous,
                agent_id = %session.agent_id,
                running = self.running_count(),
                "controller gave a new agent id; tasks leased under the previous one will be refused"
            );
        }
        info!(
            controller = %self.controller(),
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
    pub(super) async fn heartbeat_loop(
        self: Arc<Self>,
        session: Arc<Session>,
        reregister: watch::Sender<bool>,
    ) {
        let controller = &self.controller();
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
            let mut client = self.client();
            match tokio::time::timeout(call_timeout, client.heartbeat(request)).await {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        info!(controller = %controller, failures, "heartbeats answered again");
                    }
                    failures = 0;
                    let response = response.into_inner();
                    if !response.draining {
                        self.drain_moves
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                    }
                    let tried = self.drain_moves.load(std::sync::atomic::Ordering::Relaxed);
                    if response.draining
                        && !*self.stopping.borrow()
                        && tried + 1 < self.controllers.len() as u64
                        && self.move_on()
                    {
                        bump(&self.drain_moves);
                        // Its replica drains: move to another replica of the
                        // region and register there under the same id (its
                        // leases are the region's, renewed there).
                        info!(
                            controller = %controller,
                            next = %self.controller(),
                            running = self.running_count(),
                            "controller drains, moving to another replica of the region"
                        );
                        reregister.send_replace(true);
                        return;
                    }
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
            if failures >= MOVE_AFTER_FAILURES && !*self.stopping.borrow() && self.move_on() {
                warn!(
                    controller = %controller,
                    failures,
                    next = %self.controller(),
                    "controller does not answer, moving to another replica of the region"
                );
                reregister.send_replace(true);
                return;
            }
        }
    }
}
