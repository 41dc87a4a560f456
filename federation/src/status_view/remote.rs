//! Peers' recent decisions for the status page, over the existing peer
//! channel (`FederationPeer.RecentDecisions`, mutual TLS, peer role only).
//!
//! Why a call and not the advertisements: decisions are wanted only while
//! someone looks at a page, and are far larger than a heartbeat; gossiping
//! them would cost every heartbeat of every region. The page's refresh asks
//! each live peer at most once per heartbeat interval ([`RemoteDecisions`]
//! caches), with the forward deadline; a dead or silent peer keeps its last
//! answer, marked with its age.
//!
//! The answering side ([`answer`]) removes attribute values (names stay):
//! a record's values stay in the region that logged them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use federation_api as api;
use serde_json::Value;
use tonic::Status;

use crate::audit::DecisionLog;
use crate::audit::Record;
use crate::cluster::Cluster;
use crate::error::Error;
use crate::peers::Peers;
use crate::policy::{Health, Policy};

/// Most records a peer returns per call.
pub const MAX: u32 = 100;
/// Records asked of each peer.
const ASK: u32 = 25;
/// Bytes a peer reads back from the end of its log per call.
const TAIL_BYTES: u64 = 4 * 1024 * 1024;

/// What was last fetched from one peer.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// When the last attempt was made.
    tried: Option<Instant>,
    /// When the last answer arrived.
    answered: Option<Instant>,
    /// The records of the last answer.
    records: Vec<Record>,
    /// Why the last attempt failed, when it did.
    error: Option<String>,
}

/// One peer's decisions as the view uses them.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The records (values removed by the peer).
    pub records: Vec<Record>,
    /// Where they came from, for the page.
    pub note: String,
    /// True when they are missing or older than the last attempt.
    pub stale: bool,
}

/// Peers' recent decisions, refreshed at most once per `every`.
#[derive(Debug)]
pub struct RemoteDecisions {
    every: Duration,
    entries: Mutex<BTreeMap<String, Entry>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl RemoteDecisions {
    /// A cache refreshed at most once per `every` per peer.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            entries: Mutex::new(BTreeMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks every peer not known dead whose answer is older than `every`,
    /// all at once, each within the forward deadline. One refresh at a time:
    /// a page asking meanwhile uses what is there.
    pub async fn refresh(&self, cluster: &Cluster, peers: &Peers, deadline: Duration) {
        let Ok(_guard) = self.refreshing.try_lock() else {
            return;
        };
        let policy = cluster.policy();
        let now = Instant::now();
        let dead: Vec<String> = cluster
            .membership()
            .status(now)
            .into_iter()
            .filter(|p| p.health == Health::Dead)
            .map(|p| p.region)
            .collect();
        let due: Vec<String> = {
            let entries = self.lock();
            policy
                .regions
                .iter()
                .map(|r| r.name.clone())
                .filter(|r| *r != cluster.region() && !dead.contains(r))
                .filter(|r| {
                    entries
                        .get(r)
                        .and_then(|e| e.tried)
                        .is_none_or(|t| now.saturating_duration_since(t) >= self.every)
                })
                .collect()
        };
        let calls = due.into_iter().map(|region| async move {
            let result = match peers.client(&region) {
                Ok(mut client) => {
                    let req = api::ListDecisionsRequest {
                        limit: ASK,
                        ..Default::default()
                    };
                    let call =
                        client.recent_decisions(crate::transport::with_deadline(req, deadline));
                    match tokio::time::timeout(deadline, call).await {
                        Ok(Ok(resp)) => Ok(parse(&resp.into_inner())),
                        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                        Err(_) => Err(format!("no answer within {deadline:?}")),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            (region, result)
        });
        let results = futures::future::join_all(calls).await;
        let mut entries = self.lock();
        for (region, result) in results {
            let e = entries.entry(region.clone()).or_default();
            e.tried = Some(Instant::now());
            match result {
                Ok(records) => {
                    e.answered = e.tried;
                    e.records = records;
                    e.error = None;
                }
                Err(why) => {
                    tracing::debug!(%region, error = %why, "recent decisions not fetched");
                    e.error = Some(why);
                }
            }
        }
    }

    /// Every other region's records as last fetched, with a note each.
    pub fn fetched(&self, policy: &Policy, here: &str) -> Vec<(String, Fetched)> {
        let entries = self.lock();
        let now = Instant::now();
        policy
            .regions
            .iter()
            .filter(|r| r.name != here)
            .map(|r| {
                let e = entries.get(&r.name).cloned().unwrap_or_default();
                let age = e
                    .answered
                    .map(|t| crate::cli::output::human(now.saturating_duration_since(t)));
                let (note, stale) = match (&e.error, age) {
                    (None, Some(age)) => (format!("fetched {age} ago"), false),
                    (Some(why), Some(age)) => (
                        format!("not reachable ({why}); showing what it answered {age} ago"),
                        true,
                    ),
                    (Some(why), None) => (format!("not reachable: {why}"), true),
                    (None, None) => ("not fetched (dead or not heard from)".to_string(), true),
                };
                (
                    r.name.clone(),
                    Fetched {
                        records: e.records,
                        note,
                        stale,
                    },
                )
            })
            .collect()
    }
}

/// The records of an answer; a record that does not parse is skipped.
fn parse(resp: &api::ListDecisionsResponse) -> Vec<Record> {
    resp.records
        .iter()
        .filter_map(|r| serde_json::from_str::<Record>(r).ok())
        .collect()
}

/// A record as it leaves this region for a peer's page: attribute names
/// without their values.
/// Messages that quote them (a rejection's reason, a note) lose them too.
pub fn without_values(mut r: Record) -> Record {
    if let Some(Value::Object(attrs)) = r.entry.attributes.as_mut() {
        if let Some(note) = r.entry.note.as_mut() {
            *note = super::without_quoted_values(note, attrs);
        }
        if let Some(Value::Object(d)) = r.entry.decision.as_mut() {
            for key in ["reason"] {
                if let Some(Value::String(text)) = d.get_mut(key) {
                    *text = super::without_quoted_values(text, attrs);
                }
            }
            if let Some(Value::Array(errors)) = d.get_mut("evaluation_errors") {
                for e in errors.iter_mut() {
                    if let Value::String(text) = e {
                        *text = super::without_quoted_values(text, attrs);
                    }
                }
            }
        }
        for v in attrs.values_mut() {
            *v = Value::Null;
        }
    }
    r
}

/// The `RecentDecisions` answer: the newest matching records of this log,
/// without attribute values.
pub async fn answer(
    log: &DecisionLog,
    req: &api::ListDecisionsRequest,
) -> Result<api::ListDecisionsResponse, Status> {
    let filter = crate::decision_query::filter(req)?;
    let limit = match req.limit {
        0 => ASK,
        n if n > MAX => {
            return Err(Error::limit("limit", format!("at most {MAX} records per call")).into());
        }
        n => n,
    } as usize;
    let log = log.clone();
    let records = tokio::task::spawn_blocking(move || log.recent(&filter, limit, TAIL_BYTES))
        .await
        .map_err(|e| Error::Storage(format!("reading the decision log: {e}")))?
        .map_err(|e| Error::Storage(format!("reading the decision log: {e}")))?;
    let records = records
        .into_iter()
        .map(without_values)
        .map(|r| serde_json::to_string(&r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Storage(format!("encoding a record: {e}")))?;
    Ok(api::ListDecisionsResponse {
        matched: records.len() as u64,
        records,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Entry;

    #[test]
    fn records_leave_without_their_values() {
        let r = Record {
            seq: 3,
            time: "t".into(),
            unix_ms: 1,
            region: "europe".into(),
            entry: Entry {
                kind: "route".into(),
                attributes: Some(serde_json::json!({"customer_region": "DE", "tier": 2})),
                decision: Some(serde_json::json!({
                    "reason": "no routing rule matches these attributes (customer_region='DE', tier=2): rejected",
                    "evaluation_errors": ["rule 1: tier=2 is not a string"],
                    "outcome": {"kind": "rejected"},
                })),
                note: Some("customer_region='DE'".into()),
                ..Entry::default()
            },
            prev_hash: String::new(),
            hash: String::new(),
        };
        let out = without_values(r);
        let text = serde_json::to_string(&out).expect("json");
        assert!(!text.contains("DE") && !text.contains("=2"), "{text}");
        assert_eq!(
            out.entry.attributes,
            Some(serde_json::json!({"customer_region": null, "tier": null}))
        );
        assert_eq!(
            out.reason(),
            Some("no routing rule matches these attributes (customer_region=…, tier=…): rejected")
        );
        assert_eq!(out.outcome(), Some("rejected"));
    }
}
