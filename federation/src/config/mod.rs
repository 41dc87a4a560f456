//! Configuration: the federation file (regions, routing rules, data
//! synchronization) and the node section (this controller's region, listen
//! address, data directory, peer overrides, timers), layered with the `config`
//! crate: file, then optional node file, then `FEDERATION__…` environment
//! variables.
//!
//! This module owns parsing and shape checks only (types, unknown fields,
//! durations). What the rules *mean* — CEL, region references, tags — is
//! validated by [`crate::policy`], which gets the [`SourceMap`] to name
//! positions. Nothing here touches the network or the store.

mod duration;
mod source_map;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use duration::{parse_duration, serde_secs};
pub use source_map::{Position, SourceMap};

/// Prefix of the environment variables that override the files, with `__`
/// between path segments: `FEDERATION__NODE__LISTEN=127.0.0.1:7000`.
pub const ENV_PREFIX: &str = "FEDERATION";

/// The whole configuration file: the federation, and optionally this node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The federation, shared by every controller.
    pub federation: FederationSpec,
    /// This controller's own settings; may come from a separate node file.
    #[serde(default)]
    pub node: NodeSpec,
}

/// The federation: regions, routing rules, replication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// A name for humans; also part of certificate identities.
    pub name: String,
    /// Every region of the federation.
    pub regions: Vec<RegionSpec>,
    /// Routing rules, first match wins, in file order.
    #[serde(default)]
    pub routing_rules: Vec<RuleSpec>,
    /// Requirements that apply on top of whichever rule matches, for example
    /// "pii of EU customers needs GDPR".
    #[serde(default)]
    pub data_class_requirements: Vec<DataClassRequirementSpec>,
    /// Snapshot replication between regions.
    #[serde(default)]
    pub data_synchronization: SyncSpec,
    /// What records written outside a task's region keep of its attributes
    /// (see `audit::minimise`). Absent from the policy hash when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
    /// Who must approve this file (signed policy bundles, see
    /// `crate::approvals`). Absent from the policy hash when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyApprovalSpec>,
}

/// The `federation.audit` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSpec {
    /// Attributes whose values are routing metadata, safe to keep in every
    /// region's records. Unset: the attributes the decision's conditions
    /// read. Every other attribute is kept only as a keyed digest outside
    /// the region holding the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_values: Option<Vec<String>>,
}

/// The `federation.policy` section: the approvers' Ed25519 public keys
/// (`ed25519:<base64 of 32 bytes>`, by approver name), how many must sign,
/// and whether `serve` and reloads refuse a file without that quorum.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyApprovalSpec {
    /// Approver name → public key.
    #[serde(default)]
    pub approvers: BTreeMap<String, String>,
    /// Distinct approvers needed; every approver when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// Refuse a policy without a quorum of valid approvals.
    #[serde(default)]
    pub require_approvals: bool,
}

/// One region.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Unique region name, used in rules.
    pub name: String,
    /// The region controller's gRPC endpoint.
    pub endpoint: String,
    /// More endpoints of the region (its other replicas): the region is
    /// reached at `endpoint` and each of these (their union, `endpoint`
    /// first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Preference among equals, lower first: breaks ties between members of
    /// a rule's set of primaries, and orders regions in `policy check` and
    /// on the status page.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Compliance tags the region holds (GDPR, SOX, …).
    #[serde(default)]
    pub compliance: Vec<String>,
}

/// A region's endpoints in `node.peers` (its replicas, in order of
/// preference): a string, in which commas separate several
/// (`FEDERATION__NODE__PEERS__EUROPE="http://a:1,http://b:2"`), or a list
/// of strings. Blanks around each are dropped, and empty entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Endpoints(pub Vec<String>);

impl Endpoints {
    /// The endpoints of `text`, split at commas.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        out.extend_from(text);
        out
    }

    /// Appends the endpoints of `text` not already listed.
    pub fn extend_from(&mut self, text: &str) {
        for e in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !self.0.iter().any(|k| k == e) {
                self.0.push(e.to_string());
            }
        }
    }

    /// The endpoints as one string, comma-separated.
    pub fn joined(&self) -> String {
        self.0.join(",")
    }
}

impl<'de> Deserialize<'de> for Endpoints {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Endpoints;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an endpoint, endpoints separated by commas, or a list of endpoints")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Endpoints, E> {
                Ok(Endpoints::parse(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Endpoints, A::Error> {
                let mut out = Endpoints::default();
                while let Some(e) = seq.next_element::<String>()? {
                    out.extend_from(&e);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// One routing rule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Optional name for reports; defaults to `rule N`.
    #[serde(default)]
    pub name: Option<String>,
    /// CEL condition over the task's attributes. Omitted only on the default rule.
    #[serde(default)]
    pub condition: Option<String>,
    /// Marks the catch-all rule (no condition); it must be last.
    #[serde(default)]
    pub default: bool,
    /// Where matching tasks go first (give this or `primary_regions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    /// A set of equally preferred regions, balanced by `balance`; the
    /// backups follow only when the whole set is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_regions: Option<Vec<String>>,
    /// How a set's member is chosen (default `least_loaded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// Static shares of the set's members for `balance: weighted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, u32>>,
    /// An attribute whose value keeps tasks in one member of the set
    /// (rendezvous hashing) while that member is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// One backup (the user's form).
    #[serde(default)]
    pub backup_region: Option<String>,
    /// Ordered backups.
    #[serde(default)]
    pub backup_regions: Option<Vec<String>>,
    /// Compliance tags every chosen region must hold.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Send to a full region anyway (it queues) rather than failing over.
    #[serde(default)]
    pub allow_overflow: bool,
}

/// How a rule's set of primary regions (`primary_regions`) shares its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// By advertised free capacity, drawn in proportion to it (the default).
    #[default]
    LeastLoaded,
    /// In order of the regions' `priority` (lower first), then name.
    Priority,
    /// In proportion to the rule's static `weights`.
    Weighted,
}

impl Balance {
    /// The name used in the file and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastLoaded => "least_loaded",
            Balance::Priority => "priority",
            Balance::Weighted => "weighted",
        }
    }
}

/// Extra tag requirements selected by a condition, applied to every decision.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataClassRequirementSpec {
    /// Optional name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// CEL condition selecting the data.
    pub condition: String,
    /// Tags the chosen region must hold.
    pub requires: Vec<String>,
}

/// Snapshot replication settings (the user's `data_synchronization`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSpec {
    /// Replicate at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often to snapshot: seconds (`300`) or a human form (`5m`).
    #[serde(default = "default_sync_interval", with = "duration::serde_secs")]
    pub sync_interval: Duration,
    /// Encryption algorithm; only `AES-256` (AES-256-GCM) is supported.
    #[serde(default = "default_encryption")]
    pub encryption: String,
    /// Compress with zstd before encrypting.
    #[serde(default = "default_true")]
    pub compression: bool,
    /// zstd level.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
}

impl Default for SyncSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            sync_interval: default_sync_interval(),
            encryption: default_encryption(),
            compression: true,
            compression_level: default_compression_level(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_sync_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_encryption() -> String {
    "AES-256".to_string()
}
fn default_compression_level() -> i32 {
    3
}

/// This controller's own settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The region this controller serves (or `--region`).
    #[serde(default)]
    pub region: Option<String>,
    /// Address to listen on for gRPC; defaults to the region's endpoint port.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Where the task store and the decision log live.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Admin HTTP address (`/metrics`, status page); off when unset.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Plaintext gRPC address serving only `grpc.health.v1`, for probes that
    /// cannot speak TLS (Kubernetes gRPC probes); off when unset.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Peer discovery by DNS SRV, merged with `peers`.
    #[serde(default)]
    pub discovery: Option<DiscoverySpec>,
    /// Peer endpoint overrides by region name: a region's replicas, as a
    /// string (commas separate several) or a list of strings.
    #[serde(default)]
    pub peers: BTreeMap<String, Endpoints>,
    /// Timers.
    #[serde(default)]
    pub timers: Timers,
    /// Input limits.
    #[serde(default)]
    pub limits: Limits,
    /// The snapshot key ring (else the `FEDERATION_KEYS` environment variable).
    #[serde(default)]
    pub keys: KeysSpec,
    /// Mutual TLS and credentials (`node.tls`).
    #[serde(default)]
    pub tls: TlsSpec,
    /// Distributed tracing (`node.tracing`); off by default.
    #[serde(default)]
    pub tracing: TracingSpec,
    /// Where the task store lives (`node.store`): the embedded file
    /// (default) or the region's PostgreSQL database.
    #[serde(default)]
    pub store: StoreSpec,
    /// This controller's name within its region (default: the host name),
    /// unique per region: the replicas of one region share its database.
    #[serde(default)]
    pub replica: Option<String>,
}

/// The `node.store` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSpec {
    /// `redb` (the embedded file in the data directory) or `postgres`.
    pub backend: StoreBackend,
    /// The database (backend `postgres`): a libpq URL,
    /// `postgres://federation@db.eu.internal:5432/federation`.
    pub url: Option<String>,
    /// Connections to the database this controller keeps at most.
    pub pool_size: usize,
    /// Backend `postgres`: transactions the store's writer keeps in flight
    /// at most (batches of new submits overlap; default 1: one at a time,
    /// the fastest where the controllers and the server share few cores,
    /// see README). Never more than `pool_size` less one.
    pub writer_transactions: usize,
    /// How long one call to the database may take (backend `postgres`):
    /// past it the call answers UNAVAILABLE and its connection is
    /// discarded, so a database that stops answering is not waited for.
    #[serde(with = "duration::serde_secs")]
    pub timeout: Duration,
    /// Backend `redb`: the decision log's active file is closed as a
    /// segment (then zstd-compressed) once it reaches this many bytes
    /// (`audit::LogOptions`; default 16 MiB).
    pub log_segment_bytes: u64,
    /// Backend `redb`: the task store's write-ahead log (`tasks.wal`) is
    /// checkpointed into `tasks.redb` (one durable commit, between
    /// batches) once its frames since the last checkpoint reach this many
    /// bytes, or a second after the first of them (default 16 MiB).
    pub checkpoint_bytes: u64,
}

impl Default for StoreSpec {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redb,
            url: None,
            pool_size: 8,
            writer_transactions: 1,
            timeout: Duration::from_secs(5),
            log_segment_bytes: 16 * 1024 * 1024,
            checkpoint_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Which task store a controller uses (`node.store.backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// `<data_dir>/tasks.redb` and `<data_dir>/decisions.jsonl`.
    #[default]
    Redb,
    /// The region's PostgreSQL database (`node.store.url`).
    Postgres,
}

/// The `node.tracing` section: where to export spans (OpenTelemetry OTLP
/// over gRPC). Unset: no exporter is installed and no span is recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSpec {
    /// The OTLP/gRPC collector, `http://host:port`.
    pub otlp_endpoint: Option<String>,
}

/// Where the snapshot key ring comes from.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSpec {
    /// A file of `id:base64-key` lines (see `replication::keyring`); a
    /// line marked `:audit` is the audit key (`audit::key`).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// The `node.discovery` section: peers from DNS SRV records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySpec {
    /// The SRV name to resolve, e.g. `_federation._tcp.example.internal`.
    pub dns_srv: String,
    /// The DNS server to ask (`ip:port`); the system's resolver when unset.
    #[serde(default)]
    pub resolver: Option<SocketAddr>,
    /// How often to re-resolve.
    #[serde(default = "default_discovery_interval", with = "duration::serde_secs")]
    pub interval: Duration,
}

fn default_discovery_interval() -> Duration {
    Duration::from_secs(10)
}

/// The `node.tls` section: this controller's certificate, the federation CA,
/// whether advertised tags must be attested by the peer's certificate, and
/// an optional bearer-token file (`token role [region]` lines).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSpec {
    /// The federation CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This controller's certificate (PEM), naming `spiffe://<fed>/region/<region>`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Keep only the advertised tags a peer's certificate attests.
    pub attest_tags: bool,
    /// Bearer tokens: one `token role [region]` per line.
    pub tokens_file: Option<PathBuf>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            ca: None,
            cert: None,
            key: None,
            attest_tags: true,
            tokens_file: None,
        }
    }
}

/// Timers of one controller. Every field accepts seconds or a human form.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timers {
    /// How often to advertise to peers.
    #[serde(with = "duration::serde_secs")]
    pub heartbeat_interval: Duration,
    /// Phi above which a peer is suspect.
    pub phi_suspect: f64,
    /// Phi above which a peer is dead.
    pub phi_dead: f64,
    /// Silence after which a peer is dead whatever phi says.
    #[serde(with = "duration::serde_secs")]
    pub dead_after: Duration,
    /// Deadline of a forward to a peer.
    #[serde(with = "duration::serde_secs")]
    pub forward_timeout: Duration,
    /// How long an agent's lease lasts unless renewed.
    #[serde(with = "duration::serde_secs")]
    pub lease_ttl: Duration,
    /// Silence after which an agent no longer counts as capacity.
    #[serde(with = "duration::serde_secs")]
    pub agent_timeout: Duration,
    /// Leases before a task fails for good.
    pub max_attempts: u32,
    /// How long to wait for in-flight calls on shutdown.
    #[serde(with = "duration::serde_secs")]
    pub shutdown_grace: Duration,
    /// How long a region that came back must stay alive before new tasks go
    /// back to it (failback hold-down).
    #[serde(with = "duration::serde_secs")]
    pub failback_hold_down: Duration,
    /// How long a region must be dead before its backup takes over its tasks.
    #[serde(with = "duration::serde_secs")]
    pub takeover_grace: Duration,
    /// After a restart, how long tasks from before the restart wait for the
    /// backups' takeover notices before they may be leased anyway.
    #[serde(with = "duration::serde_secs")]
    pub startup_fence: Duration,
    /// How often `serve` re-reads the federation file and reloads the policy
    /// when its content changed (a Kubernetes ConfigMap update); 0 = never
    /// (reload with SIGHUP or `federation reload`).
    #[serde(with = "duration::serde_secs")]
    pub policy_poll: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            phi_suspect: 5.0,
            phi_dead: 8.0,
            dead_after: Duration::from_secs(3),
            forward_timeout: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(30),
            agent_timeout: Duration::from_secs(10),
            max_attempts: 3,
            shutdown_grace: Duration::from_secs(10),
            failback_hold_down: Duration::from_secs(30),
            takeover_grace: Duration::from_secs(30),
            startup_fence: Duration::from_secs(10),
            policy_poll: Duration::ZERO,
        }
    }
}

/// Limits on input from the network.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Largest task payload, bytes.
    pub max_payload_bytes: usize,
    /// Most attributes on one task.
    pub max_attributes: usize,
    /// Longest attribute key or string value, bytes.
    pub max_attribute_len: usize,
    /// Largest captured result, bytes.
    pub max_result_bytes: usize,
    /// Queue depth at which this region reports itself full.
    pub max_queue_depth: u32,
    /// Concurrent HTTP/2 streams (calls) per connection, also per peer.
    pub max_concurrent_streams: u32,
    /// Largest snapshot chunk a peer may push, ciphertext bytes.
    pub max_snapshot_chunk_bytes: usize,
    /// Most chunks in one pushed snapshot.
    pub max_snapshot_chunks: usize,
    /// Most advertisements gossiped in one Advertise call.
    pub max_known_advertisements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 8 << 20,
            max_payload_bytes: 4 << 20,
            max_attributes: 64,
            max_attribute_len: 1024,
            max_result_bytes: 1 << 20,
            max_queue_depth: 100_000,
            max_concurrent_streams: 256,
            max_snapshot_chunk_bytes: 1 << 20,
            max_snapshot_chunks: 4096,
            max_known_advertisements: 1024,
        }
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The federation file (YAML, TOML or JSON, by extension; YAML otherwise).
    pub federation_file: PathBuf,
    /// Optional node file (same formats), layered over the federation file.
    pub node_file: Option<PathBuf>,
    /// Environment to read `FEDERATION__…` from; `None` reads the process's.
    pub env: Option<std::collections::HashMap<String, String>>,
}

/// A loaded configuration and where its values came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The typed configuration.
    pub file: ConfigFile,
    /// Positions in the federation file.
    pub source_map: SourceMap,
    /// The federation file's raw text (hashed into the policy hash).
    pub text: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not well-formed YAML/JSON/TOML.
    #[error("{position}: syntax error: {message}")]
    Syntax {
        /// Where.
        position: Position,
        /// What the parser said.
        message: String,
    },
    /// A field has the wrong type, is missing, or is unknown.
    #[error("{location}: field `{path}`: {message}")]
    Field {
        /// `file:line:column`, or the file alone when the position is unknown.
        location: String,
        /// Dotted path of the field.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Anything else the `config` crate reported.
    #[error("{file}: {message}")]
    Other {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The position of the error, when known.
    pub fn position(&self) -> Option<&Position> {
        match self {
            ConfigError::Syntax { position, .. } => Some(position),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Format {
    Yaml,
    Json,
    Toml,
}

fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        Some("toml") => Format::Toml,
        _ => Format::Yaml,
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn index(path: &Path, text: &str) -> Result<SourceMap, ConfigError> {
    match format_of(path) {
        Format::Yaml | Format::Json => {
            SourceMap::from_yaml(path, text).map_err(|e| ConfigError::Syntax {
                position: e.position,
                message: e.message,
            })
        }
        Format::Toml => {
            toml_syntax_check(path, text)?;
            Ok(SourceMap::empty(path))
        }
    }
}

fn toml_syntax_check(path: &Path, text: &str) -> Result<(), ConfigError> {
    let source = config::File::from_str(text, config::FileFormat::Toml);
    config::Config::builder()
        .add_source(source)
        .build()
        .map(|_| ())
        .map_err(|e| ConfigError::Other {
            file: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn file_source(
    text: &str,
    path: &Path,
) -> config::File<config::FileSourceString, config::FileFormat> {
    let format = match format_of(path) {
        Format::Yaml => config::FileFormat::Yaml,
        Format::Json => config::FileFormat::Json,
        Format::Toml => config::FileFormat::Toml,
    };
    config::File::from_str(text, format)
}

/// Loads and layers the configuration: federation file, node file, environment.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let path = &sources.federation_file;
    let text = read(path)?;
    let source_map = index(path, &text)?;

    let mut builder = config::Config::builder().add_source(file_source(&text, path));
    let mut node_map = None;
    if let Some(node_path) = &sources.node_file {
        let node_text = read(node_path)?;
        node_map = Some(index(node_path, &node_text)?);
        builder = builder.add_source(file_source(&node_text, node_path));
    }
    let env_vars = env_overrides(sources.env.as_ref());
    let env = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(false)
        .source(sources.env.clone());
    builder = builder.add_source(env);

    let merged = builder.build().map_err(|e| ConfigError::Other {
        file: path.clone(),
        message: e.to_string(),
    })?;

    let file: ConfigFile = serde_path_to_error::deserialize(merged).map_err(|e| {
        let field_path = e.path().to_string();
        let message = clean_message(&e.inner().to_string());
        // A value set by an environment variable (or a variable naming a
        // field that does not exist) is that variable's error; a
        // node-section error may come from the node file.
        let from_env = env_vars.iter().find(|(_, p)| {
            *p == field_path
                || p.strip_prefix(field_path.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        if let Some((var, _)) = from_env {
            return ConfigError::Field {
                location: format!("environment variable {var}"),
                path: field_path,
                message,
            };
        }
        let location = node_map
            .as_ref()
            .filter(|_| field_path.starts_with("node"))
            .and_then(|m| m.locate_key(&field_path))
            .or_else(|| source_map.locate_key(&field_path))
            .map(|p| p.to_string())
            .unwrap_or_else(|| path.display().to_string());
        ConfigError::Field {
            location,
            path: field_path,
            message,
        }
    })?;

    Ok(Loaded {
        file,
        source_map,
        text,
    })
}

/// The `FEDERATION__…` variables of `env` (the process's when `None`), each
/// with the dotted field path it sets (`FEDERATION__NODE__LISTEN` →
/// `node.listen`), sorted by name.
fn env_overrides(env: Option<&std::collections::HashMap<String, String>>) -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}__");
    let names: Vec<String> = match env {
        Some(map) => map.keys().cloned().collect(),
        None => std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect(),
    };
    let mut out: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|name| {
            let rest = name
                .get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(&prefix))
                .map(|_| &name[prefix.len()..])?;
            let path = rest
                .split("__")
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            Some((name, path))
        })
        .collect();
    out.sort();
    out
}

/// Loads a federation file from text, for policy reloads over the admin API.
pub fn load_from_text(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let source_map = index(path, text)?;
    let merged = config::Config::builder()
        .add_source(file_source(text, path))
        .build()
        .map_err(|e| ConfigError::Other {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let file: ConfigFile = serde_path_to_error::deserialize(merged).map_err(|e| {
        let field_path = e.path().to_string();
        ConfigError::Field {
            location: source_map
                .locate_key(&field_path)
                .map(|p| p.to_string())
                .unwrap_or_else(|| path.display().to_string()),
            path: field_path,
            message: clean_message(&e.inner().to_string()),
        }
    })?;
    Ok(Loaded {
        file,
        source_map,
        text: text.to_string(),
    })
}

/// The `config` crate appends its own (key-less) location; ours is better.
fn clean_message(message: &str) -> String {
    message
        .split(" for key ")
        .next()
        .unwrap_or(message)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        path
    }

    fn sources(path: PathBuf, env: &[(&str, &str)]) -> Sources {
        Sources {
            federation_file: path,
            node_file: None,
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
            ),
        }
    }

    fn seed() -> String {
        federation_sandbox::SEED_POLICY.to_string()
    }

    #[test]
    fn user_example_loads_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let loaded = load(&sources(path, &[])).expect("loads");
        let f = &loaded.file.federation;
        assert_eq!(f.name, "Global Enterprise Federation");
        assert_eq!(f.regions.len(), 3);
        assert_eq!(f.routing_rules.len(), 2);
        assert_eq!(
            f.routing_rules[1].backup_region.as_deref(),
            Some("north_america")
        );
        assert_eq!(
            f.data_synchronization.sync_interval,
            Duration::from_secs(300)
        );
        assert!(f.data_synchronization.compression);
    }

    #[test]
    fn environment_overrides_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let loaded = load(&sources(
            path,
            &[
                ("FEDERATION__NODE__LISTEN", "127.0.0.1:7100"),
                ("FEDERATION__NODE__REGION", "europe"),
                ("FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL", "250ms"),
                (
                    "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
                    "5m",
                ),
            ],
        ))
        .expect("loads");
        let node = &loaded.file.node;
        assert_eq!(node.listen, Some("127.0.0.1:7100".parse().expect("addr")));
        assert_eq!(node.region.as_deref(), Some("europe"));
        assert_eq!(node.timers.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(
            loaded.file.federation.data_synchronization.sync_interval,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn node_file_layers_over_federation_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let node = write(
            &dir,
            "node.toml",
            "[node]\nregion = \"asia_pacific\"\n[node.peers]\neurope = \"http://127.0.0.1:9\"\n",
        );
        let mut s = sources(path, &[]);
        s.node_file = Some(node);
        let loaded = load(&s).expect("loads");
        assert_eq!(loaded.file.node.region.as_deref(), Some("asia_pacific"));
        assert_eq!(
            loaded.file.node.peers["europe"],
            Endpoints(vec!["http://127.0.0.1:9".into()])
        );
    }

    #[test]
    fn a_regions_peers_are_a_string_a_comma_separated_string_or_a_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let node = write(
            &dir,
            "node.yaml",
            "node:\n  peers:\n    europe: [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n    asia_pacific: \"http://127.0.0.1:3, http://127.0.0.1:4\"\n",
        );
        let mut s = sources(path, &[]);
        s.node_file = Some(node);
        let loaded = load(&s).expect("loads");
        let peers = &loaded.file.node.peers;
        assert_eq!(
            peers["europe"].0,
            ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert_eq!(
            peers["asia_pacific"].0,
            ["http://127.0.0.1:3", "http://127.0.0.1:4"]
        );
        // The environment's string, commas separating the replicas.
        let path = write(&dir, "seed2.yaml", &seed());
        let loaded = load(&sources(
            path,
            &[(
                "FEDERATION__NODE__PEERS__NORTH_AMERICA",
                "http://127.0.0.1:5,http://127.0.0.1:6",
            )],
        ))
        .expect("loads");
        assert_eq!(
            loaded.file.node.peers["north_america"].0,
            ["http://127.0.0.1:5", "http://127.0.0.1:6"]
        );
    }

    #[test]
    fn unknown_field_names_its_path_and_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = seed().replace(
            "      priority: 2\n",
            "      priority: 2\n      colour: blue\n",
        );
        let path = write(&dir, "bad.yaml", &text);
        let err = load(&sources(path, &[])).expect_err("unknown field");
        let msg = err.to_string();
        assert!(msg.contains("federation.regions[1]"), "{msg}");
        assert!(msg.contains("colour"), "{msg}");
        assert!(msg.contains("bad.yaml:"), "{msg}");
    }

    #[test]
    fn wrong_type_names_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = seed().replace("sync_interval: 300", "sync_interval: soon");
        let path = write(&dir, "bad.yaml", &text);
        let err = load(&sources(path, &[])).expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.contains("sync_interval"), "{msg}");
        assert!(msg.contains("soon"), "{msg}");
    }

    #[test]
    fn a_bad_environment_value_names_its_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let var = "FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL";
        let err = load(&sources(path, &[(var, "banana")])).expect_err("bad duration");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "environment variable {var}: field `node.timers.heartbeat_interval`"
            )),
            "{msg}"
        );
        assert!(msg.contains("banana"), "{msg}");
        assert!(!msg.contains("seed.yaml"), "not the file's fault: {msg}");
    }

    #[test]
    fn a_misspelt_environment_variable_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        for (var, field) in [
            (
                "FEDERATION__NODE__TIMERS__HEARTBEET",
                "node.timers.heartbeet",
            ),
            ("FEDERATION__NODE__TIMER__HEARTBEAT_INTERVAL", "node.timer"),
            ("FEDERATION__NODEE", "nodee"),
        ] {
            let err = load(&sources(path.clone(), &[(var, "1s")])).expect_err("unknown field");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("environment variable {var}: field `{field}`"))
                    && msg.contains("unknown field"),
                "{var}: {msg}"
            );
        }
        // An error in the file is still the file's, whatever else is set.
        let text = seed().replace("sync_interval: 300", "sync_interval: soon");
        let bad = write(&dir, "bad.yaml", &text);
        let err =
            load(&sources(bad, &[("FEDERATION__NODE__REGION", "europe")])).expect_err("bad file");
        assert!(err.to_string().contains("bad.yaml"), "{err}");
    }

    #[test]
    fn tracing_is_off_by_default_and_set_by_file_or_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let loaded = load(&sources(path.clone(), &[])).expect("loads");
        assert_eq!(loaded.file.node.tracing, TracingSpec::default());
        assert_eq!(loaded.file.node.tracing.otlp_endpoint, None);
        let loaded = load(&sources(
            path,
            &[(
                "FEDERATION__NODE__TRACING__OTLP_ENDPOINT",
                "http://127.0.0.1:4317",
            )],
        ))
        .expect("loads");
        assert_eq!(
            loaded.file.node.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        let text = format!(
            "{}node:\n  tracing:\n    otlp_endpoint: http://127.0.0.1:4317\n    sample: 1\n",
            seed()
        );
        let bad = write(&dir, "bad.yaml", &text);
        let msg = load(&sources(bad, &[])).expect_err("unknown").to_string();
        assert!(msg.contains("node.tracing"), "{msg}");
        assert!(msg.contains("sample"), "{msg}");
    }

    #[test]
    fn the_store_is_redb_by_default_and_postgres_by_file_or_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "seed.yaml", &seed());
        let loaded = load(&sources(path.clone(), &[])).expect("loads");
        assert_eq!(loaded.file.node.store, StoreSpec::default());
        assert_eq!(loaded.file.node.store.backend, StoreBackend::Redb);
        assert_eq!(loaded.file.node.replica, None);
        let loaded = load(&sources(
            path.clone(),
            &[
                ("FEDERATION__NODE__STORE__BACKEND", "postgres"),
                (
                    "FEDERATION__NODE__STORE__URL",
                    "postgres://federation@127.0.0.1:5432/federation",
                ),
                ("FEDERATION__NODE__STORE__POOL_SIZE", "3"),
                ("FEDERATION__NODE__STORE__TIMEOUT", "750ms"),
                ("FEDERATION__NODE__REPLICA", "eu-1"),
            ],
        ))
        .expect("loads");
        let node = &loaded.file.node;
        assert_eq!(node.store.backend, StoreBackend::Postgres);
        assert_eq!(
            node.store.url.as_deref(),
            Some("postgres://federation@127.0.0.1:5432/federation")
        );
        assert_eq!(node.store.pool_size, 3);
        assert_eq!(node.store.timeout, Duration::from_millis(750));
        assert_eq!(node.replica.as_deref(), Some("eu-1"));
        let text = format!("{}node:\n  store:\n    backend: sqlite\n", seed());
        let bad = write(&dir, "bad.yaml", &text);
        let msg = load(&sources(bad, &[])).expect_err("unknown").to_string();
        assert!(msg.contains("node.store.backend"), "{msg}");
        assert!(msg.contains("sqlite"), "{msg}");
        let var = "FEDERATION__NODE__STORE__POOL_SIZE";
        let msg = load(&sources(path, &[(var, "many")]))
            .expect_err("not a number")
            .to_string();
        assert!(
            msg.starts_with(&format!("environment variable {var}")),
            "{msg}"
        );
    }

    #[test]
    fn broken_yaml_has_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "bad.yaml",
            "federation:\n  name: [unclosed\n  regions: []\n",
        );
        let err = load(&sources(path, &[])).expect_err("syntax");
        let pos = err.position().expect("has position");
        assert!(pos.line >= 2, "{err}");
    }
}
