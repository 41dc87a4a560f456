//! Calling other controllers: where each region is reached (static
//! override, DNS SRV, advertised, federation file) and the cached client
//! channels to them (mutual TLS, the server's region checked, the tags its
//! certificate attests recorded in the peer table).
//!
//! A region may have several endpoints (its replicas, which share its
//! database): [`Peers::endpoints_of`] lists them in the order to try, the
//! replicas heard from most recently first and an endpoint whose call just
//! failed last, so a caller moves on to another replica of the same region
//! before it gives up on the region.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use federation_api as api;

use crate::cluster::Cluster;
use crate::error::Error;
use crate::transport::Channels;

/// A peer client.
pub type PeerClient = api::federation_peer_client::FederationPeerClient<tonic::transport::Channel>;

/// Endpoints of and channels to the other regions.
#[derive(Debug)]
pub struct Peers {
    cluster: Arc<Cluster>,
    channels: Channels,
    tls: Option<federation_tls::ClientTls>,
    fixed: BTreeMap<String, String>,
    discovered: RwLock<BTreeMap<String, Vec<String>>>,
    max_message_bytes: usize,
    /// When a call to each endpoint last failed to reach it.
    failed: Mutex<BTreeMap<String, Instant>>,
}

/// How long an endpoint whose call failed is tried after the others.
const DEMOTED_FOR: Duration = Duration::from_secs(10);

/// Appends the comma-separated endpoints of `text` not yet in `list`.
fn add_endpoints(list: &mut Vec<String>, text: &str) {
    for e in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if !list.iter().any(|k| k == e) {
            list.push(e.to_string());
        }
    }
}

impl Peers {
    /// Peers reached through `channels`, with the static overrides `fixed`
    /// (`node.peers`), over TLS with `tls` (plaintext without).
    pub fn new(
        cluster: Arc<Cluster>,
        channels: Channels,
        tls: Option<federation_tls::ClientTls>,
        fixed: BTreeMap<String, String>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            cluster,
            channels,
            tls,
            fixed,
            discovered: RwLock::new(BTreeMap::new()),
            max_message_bytes,
            failed: Mutex::new(BTreeMap::new()),
        }
    }

    /// True when peers are called over mutual TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint tried first to reach `region` (see
    /// [`Peers::endpoints_of`]).
    pub fn endpoint_of(&self, region: &str) -> Option<String> {
        self.endpoints_of(region).into_iter().next()
    }

    /// Every endpoint of `region` (its replicas), in the order to try.
    /// Where they come from: the node's static override (`node.peers`,
    /// `--peer`) alone when given; else what DNS SRV discovery found and
    /// what the region's replicas advertise (each its own endpoint); else
    /// the federation file's `endpoint` and `endpoints`. Ordered: the
    /// endpoints of replicas alive now, the one heard from most recently
    /// first, then the others as configured; a replica that advertises it
    /// drains after those, and an endpoint whose call failed in the last
    /// ten seconds after every other.
    pub fn endpoints_of(&self, region: &str) -> Vec<String> {
        let now = Instant::now();
        let replicas = self.cluster.membership().replicas(region, now);
        let mut list = Vec::new();
        if let Some(e) = self.fixed.get(region) {
            add_endpoints(&mut list, e);
        } else {
            if let Some(found) = self
                .discovered
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(region)
            {
                for e in found {
                    add_endpoints(&mut list, e);
                }
            }
            for r in &replicas {
                add_endpoints(&mut list, &r.endpoint);
            }
            if list.is_empty() {
                if let Some(r) = self.cluster.policy().region(region) {
                    for e in &r.endpoints {
                        add_endpoints(&mut list, e);
                    }
                    add_endpoints(&mut list, &r.endpoint);
                }
            }
        }
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = |e: &String| {
            replicas
                .iter()
                .position(|r| {
                    r.endpoint == *e
                        && matches!(
                            r.health,
                            crate::policy::Health::Alive | crate::policy::Health::Suspect
                        )
                })
                .unwrap_or(usize::MAX)
        };
        let demoted = |e: &String| {
            failed
                .get(e)
                .is_some_and(|t| now.saturating_duration_since(*t) < DEMOTED_FOR)
        };
        let draining = |e: &String| replicas.iter().any(|r| r.endpoint == *e && r.draining);
        list.sort_by_key(|e| (demoted(e), draining(e), live(e)));
        list
    }

    /// Records that a call to `endpoint` could not reach it (refused,
    /// unreachable, timed out): it is tried after the region's other
    /// endpoints for a while.
    pub fn unreachable(&self, endpoint: &str) {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(endpoint.to_string(), Instant::now());
    }

    /// Records that a call to `endpoint` got an answer.
    pub fn reached(&self, endpoint: &str) {
        let mut failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !failed.is_empty() {
            failed.remove(endpoint);
        }
    }

    /// Replaces what DNS SRV discovery found; true when it changed.
    pub fn set_discovered(&self, found: BTreeMap<String, Vec<String>>) -> bool {
        let mut map = self
            .discovered
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *map == found {
            return false;
        }
        *map = found;
        true
    }

    /// A client for `region`, at the endpoint tried first.
    pub fn client(&self, region: &str) -> Result<PeerClient, Error> {
        let endpoint = self.endpoint_of(region).ok_or_else(|| Error::Peer {
            region: region.to_string(),
            why: "no endpoint known".into(),
        })?;
        self.client_at(region, &endpoint)
    }

    /// A client for each endpoint of `region` (its replicas), in the order
    /// to try them ([`Peers::endpoints_of`]); an error when none is known.
    pub fn clients(&self, region: &str) -> Result<Vec<(String, PeerClient)>, Error> {
        let endpoints = self.endpoints_of(region);
        if endpoints.is_empty() {
            return Err(Error::Peer {
                region: region.to_string(),
                why: "no endpoint known".into(),
            });
        }
        let mut out = Vec::with_capacity(endpoints.len());
        let mut last = None;
        for e in endpoints {
            match self.client_at(region, &e) {
                Ok(c) => out.push((e, c)),
                Err(err) => last = Some(err),
            }
        }
        match (out.is_empty(), last) {
            (true, Some(err)) => Err(err),
            _ => Ok(out),
        }
    }

    /// A client for `region` at `endpoint`.
    pub fn client_at(&self, region: &str, endpoint: &str) -> Result<PeerClient, Error> {
        let endpoint = endpoint.to_string();
        let channel = match &self.tls {
            None => self.channels.get(&endpoint),
            Some(tls) => {
                let membership = self.cluster.membership().clone_handle();
                let on_verified: federation_tls::OnVerified =
                    Arc::new(move |id: &federation_tls::Identity| {
                        if let Some(r) = &id.region {
                            membership.attest(r, &id.tags);
                        }
                    });
                self.channels.get_tls(&endpoint, region, tls, on_verified)
            }
        }
        .map_err(|e| Error::Peer {
            region: region.to_string(),
            why: e.to_string(),
        })?;
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }
}
