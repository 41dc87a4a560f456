//! Peer discovery by DNS SRV (hickory-resolver), re-resolved periodically and
//! merged with static peers.
//!
//! Mapping: each SRV record of the configured name (for example
//! `_federation._tcp.example.internal`) names one controller. Its target's
//! first label is the region (`europe.example.internal.` → `europe`); the
//! target's addresses (resolved with the same resolver) and the record's port
//! give the endpoint `http://<ip>:<port>`. Targets whose label is not a region
//! of the policy are ignored (and logged). Static `node.peers` overrides win
//! over discovered endpoints, which win over advertised and file endpoints.
//!
//! This module owns the resolver and the discovered map; it never routes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::Resolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

pub use crate::config::DiscoverySpec;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver could not be built.
    #[error("dns resolver: {0}")]
    Resolver(String),
    /// The SRV lookup failed.
    #[error("SRV lookup of {name}: {why}")]
    Lookup {
        /// The name.
        name: String,
        /// What the resolver said.
        why: String,
    },
}

/// A DNS SRV discoverer.
#[derive(Debug)]
pub struct Discoverer {
    spec: DiscoverySpec,
    resolver: Resolver<TokioRuntimeProvider>,
}

impl Discoverer {
    /// Builds the resolver for `spec`.
    pub fn new(spec: DiscoverySpec) -> Result<Self, DiscoveryError> {
        let builder = match spec.resolver {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => {
                Resolver::builder_tokio().map_err(|e| DiscoveryError::Resolver(e.to_string()))?
            }
        };
        let resolver = builder
            .build()
            .map_err(|e| DiscoveryError::Resolver(e.to_string()))?;
        Ok(Self { spec, resolver })
    }

    /// The re-resolution interval.
    pub fn interval(&self) -> Duration {
        self.spec.interval
    }

    /// Resolves the SRV name: region → its endpoints (every target of the
    /// region and every address of each: a region's replicas), lowest SRV
    /// priority first, for regions `known` accepts.
    pub async fn resolve(
        &self,
        known: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, Vec<String>>, DiscoveryError> {
        let name = self.spec.dns_srv.clone();
        let lookup =
            self.resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| DiscoveryError::Lookup {
                    name: name.clone(),
                    why: e.to_string(),
                })?;
        let mut srvs: Vec<(u16, u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.priority, srv.port, srv.target.to_ascii())),
                _ => None,
            })
            .collect();
        // Lowest priority first; every record of a region is kept (its
        // replicas), in that order.
        srvs.sort();
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, port, target) in srvs {
            let region = target.split('.').next().unwrap_or_default().to_string();
            if !known(&region) {
                tracing::warn!(%target, "SRV target does not name a region of the policy; ignored");
                continue;
            }
            match self.resolver.lookup_ip(target.as_str()).await {
                Ok(ips) => {
                    let endpoints = found.entry(region).or_default();
                    for ip in ips.iter() {
                        let e = format!("http://{}", SocketAddr::new(ip, port));
                        if !endpoints.contains(&e) {
                            endpoints.push(e);
                        }
                    }
                }
                Err(e) => tracing::warn!(%target, error = %e, "SRV target does not resolve"),
            }
        }
        Ok(found)
    }
}
