//! Relaying a client's get/watch/cancel of a task held by another region:
//! one call to the region that should hold it, and a redirect only when that
//! answer says the task moved (taken over) or the owner cannot answer.
//!
//! * The first call goes to the task's owner (the id's `.region`), or, when
//!   our own store holds the task marked taken over by B, straight to B.
//! * The owner's answer is final, with two exceptions: the task it returns is
//!   marked taken over by B (its copy was cancelled there): one call to B; or
//!   it answers NOT_FOUND with [`TAKEN_OVER_BY`] metadata (it lost the task
//!   but heard B's takeover notice): one call to B.
//! * A dead or unreachable owner: the regions that may hold a takeover copy
//!   (the backups, and other members of a set, of every rule naming the
//!   owner, in rule order) are asked in turn, each within
//!   `timers.forward_timeout`; the first that holds it answers.
//! * A well-formed id that the owner does not know is NOT_FOUND at once: no
//!   other region is asked.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use federation_api as api;
use tonic::Status;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::error::{Error, Result, TAKEN_OVER_BY};
use crate::peers::Peers;
use crate::policy::Health;
use crate::tasks::TaskStore;
use crate::wire;

/// A peer client.
pub type PeerClient = api::federation_peer_client::FederationPeerClient<Channel>;

/// What relaying uses: the policy and peer table, the peers, our store.
#[derive(Debug)]
pub struct Relay {
    cluster: Arc<Cluster>,
    peers: Arc<Peers>,
    store: TaskStore,
    forward_timeout: Duration,
}

impl Relay {
    /// Relaying over these components; each call within `forward_timeout`.
    pub fn new(
        cluster: Arc<Cluster>,
        peers: Arc<Peers>,
        store: TaskStore,
        forward_timeout: Duration,
    ) -> Self {
        Self {
            cluster,
            peers,
            store,
            forward_timeout,
        }
    }

    /// The deadline of one relayed call.
    pub fn forward_timeout(&self) -> Duration {
        self.forward_timeout
    }
}

/// Where a call about `task_id` goes: `None` for here, else the region to
/// relay to first.
pub fn first_hop(relay: &Relay, task_id: &str) -> Result<Option<String>> {
    wire::check_task_id(task_id)?;
    if let Some(t) = relay.store.get(task_id).map_err(Error::from)? {
        return Ok(moved_to(relay.cluster.region(), &t));
    }
    let owner = wire::owner_of(task_id).unwrap_or_default().to_string();
    if owner == relay.cluster.region() {
        return Ok(None);
    }
    if relay.cluster.policy().region(&owner).is_none() {
        return Err(Error::task_not_found(task_id));
    }
    Ok(Some(owner))
}

/// The region a copy of a task says the live copy moved to, if not `here`.
fn moved_to(here: &str, t: &api::Task) -> Option<String> {
    t.taken_over
        .as_ref()
        .filter(|to| !to.to_region.is_empty() && to.to_region != here)
        .map(|to| to.to_region.clone())
}

/// The regions that may hold a takeover copy of `owner`'s tasks, in rule
/// order, without `owner` and `here`.
fn takeover_candidates(relay: &Relay, owner: &str) -> Vec<String> {
    let policy = relay.cluster.policy();
    let mut out: Vec<String> = Vec::new();
    for rule in policy.rules.iter() {
        if !rule.candidates().any(|c| c == owner) {
            continue;
        }
        for r in rule.peers_of(owner) {
            if r != relay.cluster.region() && !out.contains(r) {
                out.push(r.clone());
            }
        }
    }
    out
}

/// What one relayed call came to.
enum Hop<T> {
    /// An answer to return (the task in it, if any, is live there).
    Answer(T),
    /// The region answered about a copy that moved to another region.
    Moved(String, T),
    /// The region does not hold the task (and may name who took it over).
    NotFound(Status, Option<String>),
    /// The region could not answer (unreachable, timed out, unavailable).
    Unreachable(Status),
    /// The region refused the call: final.
    Failed(Status),
}

/// Relays one call about `task_id` to `first` (see the module doc).
/// `call(client, region)` makes the call and returns the answer with the
/// task it carries (for the taken-over check).
pub async fn relay<T, F, Fut>(
    relay: &Relay,
    task_id: &str,
    first: String,
    call: F,
) -> Result<T, Status>
where
    F: Fn(PeerClient, String) -> Fut,
    Fut: Future<Output = Result<(T, Option<api::Task>), Status>>,
{
    let owner = wire::owner_of(task_id).unwrap_or_default().to_string();
    let owner_dead = first == owner
        && relay
            .cluster
            .membership()
            .status(Instant::now())
            .iter()
            .any(|s| s.region == owner && s.health == Health::Dead);
    let mut unreachable: Option<Status> = None;
    if !owner_dead {
        match hop(relay, &first, &call).await {
            Hop::Answer(t) => return Ok(t),
            Hop::Moved(to, _) => return redirect(relay, &to, &call).await,
            Hop::NotFound(s, None) | Hop::Failed(s) => return Err(s),
            Hop::NotFound(s, Some(to)) => {
                return match hop(relay, &to, &call).await {
                    Hop::Answer(t) | Hop::Moved(_, t) => Ok(t),
                    Hop::NotFound(..) => Err(s),
                    Hop::Unreachable(e) | Hop::Failed(e) => Err(e),
                };
            }
            Hop::Unreachable(s) => unreachable = Some(s),
        }
    }
    // The owner cannot answer: the regions that may have taken it over.
    let mut tried = vec![first.clone()];
    for region in takeover_candidates(relay, &owner) {
        if tried.contains(&region) {
            continue;
        }
        tried.push(region.clone());
        match hop(relay, &region, &call).await {
            Hop::Answer(t) | Hop::Moved(_, t) => return Ok(t),
            Hop::NotFound(..) => {}
            Hop::Failed(s) => return Err(s),
            Hop::Unreachable(s) => {
                tracing::debug!(region = %region, error = %s.message(), "takeover candidate unreachable");
            }
        }
    }
    if owner_dead {
        // Nobody took it over: the owner itself, in case it is back.
        return match hop(relay, &first, &call).await {
            Hop::Answer(t) | Hop::Moved(_, t) => Ok(t),
            Hop::NotFound(s, _) | Hop::Unreachable(s) | Hop::Failed(s) => Err(s),
        };
    }
    Err(unreachable.unwrap_or_else(|| Error::task_not_found(task_id).into()))
}

/// One call to the region a copy said the task moved to.
async fn redirect<T, F, Fut>(relay: &Relay, to: &str, call: &F) -> Result<T, Status>
where
    F: Fn(PeerClient, String) -> Fut,
    Fut: Future<Output = Result<(T, Option<api::Task>), Status>>,
{
    match hop(relay, to, call).await {
        Hop::Answer(t) | Hop::Moved(_, t) => Ok(t),
        Hop::NotFound(s, _) | Hop::Unreachable(s) | Hop::Failed(s) => Err(s),
    }
}

/// One call to `region`: to each of its replicas in turn while a call
/// cannot reach one (a relayed get, watch or cancel is safe to repeat).
async fn hop<T, F, Fut>(relay: &Relay, region: &str, call: &F) -> Hop<T>
where
    F: Fn(PeerClient, String) -> Fut,
    Fut: Future<Output = Result<(T, Option<api::Task>), Status>>,
{
    let clients = match relay.peers.clients(region) {
        Ok(c) => c,
        Err(e) => return Hop::Unreachable(e.into()),
    };
    let mut last = None;
    for (endpoint, client) in clients {
        match hop_at(relay, region, client, call).await {
            Hop::Unreachable(s) => {
                relay.peers.unreachable(&endpoint);
                last = Some(Hop::Unreachable(s));
            }
            answered => {
                relay.peers.reached(&endpoint);
                return answered;
            }
        }
    }
    last.unwrap_or_else(|| {
        Hop::Unreachable(
            Error::Peer {
                region: region.to_string(),
                why: "no endpoint known".into(),
            }
            .into(),
        )
    })
}

async fn hop_at<T, F, Fut>(relay: &Relay, region: &str, client: PeerClient, call: &F) -> Hop<T>
where
    F: Fn(PeerClient, String) -> Fut,
    Fut: Future<Output = Result<(T, Option<api::Task>), Status>>,
{
    let deadline = relay.forward_timeout;
    match tokio::time::timeout(deadline, call(client, region.to_string())).await {
        Err(_) => Hop::Unreachable(
            Error::Peer {
                region: region.to_string(),
                why: "relay timed out".into(),
            }
            .into(),
        ),
        Ok(Ok((answer, task))) => match task.as_ref().and_then(|t| moved_to(region, t)) {
            Some(to) if to != relay.cluster.region() => Hop::Moved(to, answer),
            _ => Hop::Answer(answer),
        },
        Ok(Err(s)) => match s.code() {
            tonic::Code::NotFound => {
                let to = s
                    .metadata()
                    .get(TAKEN_OVER_BY)
                    .and_then(|v| v.to_str().ok())
                    .filter(|r| !r.is_empty() && *r != region && *r != relay.cluster.region())
                    .map(str::to_string);
                Hop::NotFound(s, to)
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                Hop::Unreachable(crate::error::relayed(region, s))
            }
            _ => Hop::Failed(crate::error::relayed(region, s)),
        },
    }
}
