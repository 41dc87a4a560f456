//! What a controller is started with: [`Settings`], resolved from the
//! loaded configuration and the command line's overrides
//! ([`Settings::resolve`], what `federation serve` uses), or made for an
//! in-process controller on loopback ([`Settings::for_test`], what tests
//! and benchmarks use).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::config::{self, Limits, Timers};
use crate::policy::Policy;

/// Everything needed to start a controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The region this controller serves.
    pub region: String,
    /// The validated policy.
    pub policy: Policy,
    /// Where the store and the decision log live.
    pub data_dir: PathBuf,
    /// Peer endpoint overrides by region: each region's replicas,
    /// comma-separated (`node.peers`, `--peer`).
    pub peers: BTreeMap<String, String>,
    /// The endpoint peers should use to reach us (advertised).
    pub advertise_endpoint: String,
    /// Timers.
    pub timers: Timers,
    /// Input limits.
    pub limits: Limits,
    /// The federation file, re-read by a reload without content.
    pub config_path: PathBuf,
    /// The snapshot key ring; without one, replication is off.
    pub keys: Option<crate::replication::KeyRing>,
    /// Mutual TLS; `None` only with `--insecure` (plaintext).
    pub tls: Option<TlsSettings>,
    /// Bearer tokens (file `node.tls.tokens_file`).
    pub tokens: crate::auth::Tokens,
    /// Where the task store and the decision log live (`node.store`): the
    /// data directory's files, or the region's PostgreSQL database.
    pub store: crate::config::StoreSpec,
    /// This controller's name within its region (`node.replica`).
    pub replica: String,
    /// DNS SRV peer discovery (`node.discovery`), run by the runtime.
    pub discovery: Option<crate::config::DiscoverySpec>,
    /// The approvals the policy was started with (recorded in the decision
    /// log at start), when it names approvers.
    pub approval: Option<crate::approvals::Verdict>,
}

/// TLS of one controller (from `node.tls`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// CA, certificate and key files.
    pub files: federation_tls::TlsFiles,
    /// The federation's trust domain ([`federation_tls::identity::slug`] of its name).
    pub federation: String,
    /// Keep only advertised tags the peer's certificate attests.
    pub attest_tags: bool,
}

/// What the command line overrides of the configuration (`federation
/// serve`'s flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// The federation file (named in messages; a reload re-reads it).
    pub config: PathBuf,
    /// The node file layered over it, if any (named in messages).
    pub node_config: Option<PathBuf>,
    /// The region to serve (over `node.region`).
    pub region: Option<String>,
    /// The gRPC address (over `node.listen`).
    pub listen: Option<SocketAddr>,
    /// The admin HTTP address (over `node.admin_listen`).
    pub admin_listen: Option<SocketAddr>,
    /// The plaintext health-only address (over `node.health_listen`).
    pub health_listen: Option<SocketAddr>,
    /// The data directory (over `node.data_dir`).
    pub data_dir: Option<PathBuf>,
    /// Peer endpoints, REGION=URL (over `node.peers`).
    pub peers: Vec<(String, String)>,
    /// Plaintext without authentication.
    pub insecure: bool,
}

/// The addresses a resolved controller listens on (the binary binds them).
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The gRPC address (TLS unless insecure).
    pub listen: SocketAddr,
    /// The admin HTTP address (`/metrics`, status page).
    pub admin: Option<SocketAddr>,
    /// The plaintext health-only gRPC address (probes).
    pub health: Option<SocketAddr>,
}

impl Settings {
    /// Settings from a loaded configuration and the command line's
    /// overrides: the policy validated and its approvals checked, the
    /// region, addresses, peers, key ring, TLS, tokens and data directory
    /// resolved, every error naming where the value came from.
    pub fn resolve(
        flags: &Overrides,
        loaded: config::Loaded,
    ) -> anyhow::Result<(Settings, Addresses)> {
        let policy = Policy::from_loaded(&loaded)?;
        let approval = crate::approvals::check_loaded(None, &policy, &loaded, None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", flags.config.display()))?;
        let node = loaded.file.node;
        let region = flags
            .region
            .clone()
            .or(node.region.clone())
            .context("no region: pass --region or set node.region")?;
        let Some(spec) = policy.region(&region) else {
            // Say where the name came from: the flag, the variable, or a file.
            let from = if flags.region.is_some() {
                "--region".to_string()
            } else if std::env::var_os("FEDERATION__NODE__REGION").is_some() {
                "environment variable FEDERATION__NODE__REGION".to_string()
            } else {
                format!(
                    "node.region of {}",
                    flags
                        .node_config
                        .as_ref()
                        .unwrap_or(&flags.config)
                        .display()
                )
            };
            anyhow::bail!(
                "{from}: region `{region}` is not in {} (regions: {})",
                flags.config.display(),
                policy
                    .regions
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let listen = match flags.listen.or(node.listen) {
            Some(a) => a,
            None => default_listen(&spec.endpoint).with_context(|| {
                format!(
                    "no listen address: set node.listen or --listen (endpoint `{}` has no port)",
                    spec.endpoint
                )
            })?,
        };
        let advertise_endpoint = if listen.ip().is_unspecified() {
            spec.endpoint.clone()
        } else if flags.insecure {
            format!("http://{listen}")
        } else {
            format!("https://{listen}")
        };
        let admin_listen = flags.admin_listen.or(node.admin_listen);
        let health_listen = flags.health_listen.or(node.health_listen);
        // A region's `--peer` flags (each may list several endpoints,
        // comma-separated) replace its `node.peers` entry; together they
        // are the region's replicas.
        let mut endpoints = node.peers.clone();
        let mut flagged = std::collections::BTreeSet::new();
        for (r, url) in &flags.peers {
            if policy.region(r).is_none() {
                anyhow::bail!("--peer {r}=…: `{r}` is not a region of the federation");
            }
            if flagged.insert(r.clone()) {
                endpoints.insert(r.clone(), crate::config::Endpoints::default());
            }
            endpoints.entry(r.clone()).or_default().extend_from(url);
        }
        let peers = endpoints
            .iter()
            .filter(|(_, e)| !e.0.is_empty())
            .map(|(r, e)| (r.clone(), e.joined()))
            .collect();
        let keys = crate::replication::KeyRing::load(node.keys.file.as_deref())?;
        if policy.sync.enabled && keys.is_none() {
            anyhow::bail!(
                "{}: data_synchronization is enabled but there is no key ring: set node.keys.file or {} (lines `id:base64-32-byte-key`), or set enabled: false",
                flags.config.display(),
                crate::replication::keyring::KEYS_ENV
            );
        }
        let tls = if flags.insecure {
            tracing::warn!(
                "--insecure: serving plaintext gRPC; anyone who can connect can act as a peer, agent, client or operator"
            );
            None
        } else {
            let t = &node.tls;
            let (Some(ca), Some(cert), Some(key)) = (t.ca.clone(), t.cert.clone(), t.key.clone())
            else {
                anyhow::bail!(
                    "tls is required: set node.tls.ca, node.tls.cert and node.tls.key (or FEDERATION__NODE__TLS__CA/…), or pass --insecure for plaintext"
                );
            };
            Some(TlsSettings {
                files: federation_tls::TlsFiles { ca, cert, key },
                federation: federation_tls::identity::slug(&loaded.file.federation.name),
                attest_tags: t.attest_tags,
            })
        };
        if let Some(key) = &node.tls.key {
            crate::private_files::warn_if_exposed(key, "tls private key file");
        }
        let tokens = match &node.tls.tokens_file {
            Some(path) => {
                crate::private_files::warn_if_exposed(path, "token file");
                crate::auth::Tokens::load(path)?
            }
            None => crate::auth::Tokens::default(),
        };
        let data_dir = flags
            .data_dir
            .clone()
            .or(node.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("data").join(&region));
        Ok((
            Settings {
                region,
                policy,
                data_dir,
                peers,
                advertise_endpoint,
                timers: node.timers,
                limits: node.limits,
                config_path: flags.config.clone(),
                keys,
                tls,
                tokens,
                store: node.store.clone(),
                replica: node.replica.clone().unwrap_or_else(default_replica),
                discovery: node.discovery.clone(),
                approval,
            },
            Addresses {
                listen,
                admin: admin_listen,
                health: health_listen,
            },
        ))
    }

    /// A plaintext controller of `region` on loopback for tests and
    /// benchmarks: the policy of `config` (its `data_synchronization`
    /// with a fixed test key ring), default timers and limits, the store
    /// and log under `data_dir`, advertised at `http://{listen}`. Peers are
    /// found through the federation file's endpoints unless set in
    /// `peers` afterwards.
    pub fn for_test(
        region: &str,
        config: &Path,
        data_dir: &Path,
        listen: SocketAddr,
    ) -> anyhow::Result<Settings> {
        let policy =
            Policy::load_file(config).with_context(|| format!("loading {}", config.display()))?;
        if policy.region(region).is_none() {
            anyhow::bail!("region `{region}` is not in {}", config.display());
        }
        let keys = policy.sync.enabled.then(|| {
            crate::replication::KeyRing::from_keys(
                vec![crate::replication::Key::new("test", [7; 32])],
                Some("test"),
            )
        });
        Ok(Settings {
            region: region.to_string(),
            policy,
            data_dir: data_dir.to_path_buf(),
            peers: BTreeMap::new(),
            advertise_endpoint: format!("http://{listen}"),
            timers: Timers::default(),
            limits: Limits::default(),
            config_path: config.to_path_buf(),
            keys,
            tls: None,
            tokens: crate::auth::Tokens::default(),
            store: config::StoreSpec::default(),
            replica: region.to_string(),
            discovery: None,
            approval: None,
        })
    }
}

/// `node.replica` when unset: the host name.
fn default_replica() -> String {
    let name = rustix::system::uname();
    name.nodename().to_string_lossy().into_owned()
}

fn default_listen(endpoint: &str) -> Option<SocketAddr> {
    let rest = endpoint
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(endpoint);
    let port = rest
        .split('/')
        .next()?
        .rsplit_once(':')?
        .1
        .parse::<u16>()
        .ok()?;
    Some(SocketAddr::from(([0, 0, 0, 0], port)))
}
