//! Calling other controllers: where each region is reached (static
//! override, DNS SRV, advertised, federation file) and the cached client
//! channels to them (mutual TLS, the server's region checked, the tags its
//! certificate attests recorded in the peer table).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

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
    discovered: RwLock<BTreeMap<String, String>>,
    max_message_bytes: usize,
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
        }
    }

    /// True when peers are called over mutual TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint used to reach `region`: the node's static override, else
    /// what DNS SRV discovery found, else what the region advertises, else the
    /// federation file's endpoint.
    pub fn endpoint_of(&self, region: &str) -> Option<String> {
        if let Some(e) = self.fixed.get(region) {
            return Some(e.clone());
        }
        if let Some(e) = self
            .discovered
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(region)
        {
            return Some(e.clone());
        }
        if let Some(ad) = self.cluster.membership().advertisement(region) {
            if !ad.endpoint.is_empty() {
                return Some(ad.endpoint);
            }
        }
        self.cluster
            .policy()
            .region(region)
            .map(|r| r.endpoint.clone())
    }

    /// Replaces what DNS SRV discovery found; true when it changed.
    pub fn set_discovered(&self, found: BTreeMap<String, String>) -> bool {
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

    /// A client for `region`.
    pub fn client(&self, region: &str) -> Result<PeerClient, Error> {
        let endpoint = self.endpoint_of(region).ok_or_else(|| Error::Peer {
            region: region.to_string(),
            why: "no endpoint known".into(),
        })?;
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
