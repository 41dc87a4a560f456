//! A local federation on loopback for the demo and the integration tests:
//! one controller process per region (`federation serve`) and agent
//! processes (`federation agent`), on free 127.0.0.1 ports, each in its own
//! data directory under a temporary folder. Every process is killed when the
//! sandbox is dropped, also when a test fails or the demo is interrupted.
//!
//! Processes, not tasks: tests can SIGKILL, SIGSTOP and restart a region
//! exactly as an operator's incident would.
//!
//! Everything runs on mutual TLS by default: the sandbox makes a development
//! CA and certificates in `<dir>/certs` ([`federation_tls::dev`]); each
//! region's certificate attests the tags the policy grants it (or those set
//! with [`SandboxBuilder::attested_tags`]). [`Sandbox::channel`] connects as
//! the operator; [`Sandbox::channel_as`] as any other identity.
//! [`SandboxBuilder::insecure`] runs plaintext instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use federation_api as api;
use tonic::transport::Channel;

use crate::child::ChildGuard;
use crate::ports::free_port;
use crate::topology::Topology;

/// How to build a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    exe: PathBuf,
    policy: String,
    env: Vec<(String, String)>,
    agent_env: Vec<(String, String)>,
    agents: usize,
    slots: u32,
    exec: String,
    verbose: bool,
    keep: bool,
    blocked: Vec<(String, String)>,
    insecure: bool,
    attested: BTreeMap<String, Vec<String>>,
    tokens: Option<String>,
    files: Vec<(String, String)>,
    /// Variables for one region's controller only: (region, key, value).
    region_env: Vec<(String, String, String)>,
    /// Regions served by more than one controller (replicas sharing the
    /// region's database): region → how many.
    replicas: BTreeMap<String, usize>,
}

impl SandboxBuilder {
    /// A sandbox running `exe` (the `federation` binary) with `policy` (the
    /// federation file's text). Timers default to fast test values.
    pub fn new(exe: impl Into<PathBuf>, policy: impl Into<String>) -> Self {
        Self {
            exe: exe.into(),
            policy: policy.into(),
            env: vec![
                (
                    "FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL".into(),
                    "250ms".into(),
                ),
                (
                    "FEDERATION__NODE__TIMERS__DEAD_AFTER".into(),
                    "1500ms".into(),
                ),
                (
                    "FEDERATION__NODE__TIMERS__FORWARD_TIMEOUT".into(),
                    "1s".into(),
                ),
                ("FEDERATION__NODE__TIMERS__LEASE_TTL".into(), "3s".into()),
                (
                    "FEDERATION__NODE__TIMERS__AGENT_TIMEOUT".into(),
                    "3s".into(),
                ),
                (
                    "FEDERATION__NODE__TIMERS__SHUTDOWN_GRACE".into(),
                    "3s".into(),
                ),
                (
                    "FEDERATION__NODE__TIMERS__FAILBACK_HOLD_DOWN".into(),
                    "1s".into(),
                ),
            ],
            agent_env: Vec::new(),
            agents: 1,
            slots: 2,
            exec: "cat".into(),
            verbose: false,
            keep: false,
            blocked: Vec::new(),
            insecure: false,
            attested: BTreeMap::new(),
            tokens: None,
            files: Vec::new(),
            region_env: Vec::new(),
            replicas: BTreeMap::new(),
        }
    }

    /// Serves `region` with `n` controllers (its replicas; they need the
    /// region's store in a database, see `region_env`): replica 0 is the
    /// region's controller as usual, replicas 1.. have their own ports,
    /// data directories, logs and `node.replica` (`<region>-<i+1>`). Every
    /// peer is given all of them (`--peer region=a,b,c`).
    pub fn replicas(mut self, region: &str, n: usize) -> Self {
        self.replicas.insert(region.to_string(), n);
        self
    }

    /// Writes a file into the sandbox directory before anything starts
    /// (beside `federation.yaml`, for example `federation.yaml.approvals`).
    pub fn file(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.to_string(), text.to_string()));
        self
    }

    /// Sets an environment variable for one region's controller only (after
    /// the ones of [`SandboxBuilder::env`]), for example its
    /// `FEDERATION__NODE__STORE__…`.
    pub fn region_env(mut self, region: &str, key: &str, value: &str) -> Self {
        self.region_env
            .retain(|(r, k, _)| !(r == region && k == key));
        self.region_env
            .push((region.to_string(), key.to_string(), value.to_string()));
        self
    }

    /// Runs the controllers with the product's default timers (1 s heartbeat,
    /// 3 s `dead_after`, 30 s failback hold-down, …) instead of the fast test
    /// values: for scenarios whose point is the default behaviour.
    pub fn default_timers(mut self) -> Self {
        self.env
            .retain(|(k, _)| !k.starts_with("FEDERATION__NODE__TIMERS__"));
        self
    }

    /// Breaks the direct link between regions `a` and `b` (both directions):
    /// each is given an unreachable endpoint for the other, so they can only
    /// learn of each other through a third region's gossip.
    pub fn block_link(mut self, a: &str, b: &str) -> Self {
        self.blocked.push((a.to_string(), b.to_string()));
        self
    }

    /// Plaintext without authentication (`serve --insecure`).
    pub fn insecure(mut self, on: bool) -> Self {
        self.insecure = on;
        self
    }

    /// The tags `region`'s certificate attests (default: what the policy grants).
    pub fn attested_tags(mut self, region: &str, tags: &[&str]) -> Self {
        self.attested.insert(
            region.to_string(),
            tags.iter().map(|t| t.to_string()).collect(),
        );
        self
    }

    /// A token file's text (`token role [region]` lines) for every controller.
    pub fn tokens(mut self, text: &str) -> Self {
        self.tokens = Some(text.to_string());
        self
    }

    /// Sets an environment variable for every controller (`FEDERATION__…`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets an environment variable for every agent (for example
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, which agents otherwise never inherit
    /// from the test's environment).
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.retain(|(k, _)| k != key);
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }

    /// Agents per region (0 for none) and slots per agent.
    pub fn agents(mut self, per_region: usize, slots: u32) -> Self {
        self.agents = per_region;
        self.slots = slots;
        self
    }

    /// The agents' command (run with `sh -c`).
    pub fn exec(mut self, cmd: &str) -> Self {
        self.exec = cmd.to_string();
        self
    }

    /// Show children's logs on stderr.
    pub fn verbose(mut self, on: bool) -> Self {
        self.verbose = on;
        self
    }

    /// Keep the data directories after drop.
    pub fn keep(mut self, on: bool) -> Self {
        self.keep = on;
        self
    }

    /// Starts every region's controller and agents.
    pub fn start(self) -> anyhow::Result<Sandbox> {
        let dir = std::env::temp_dir().join(format!(
            "federation-sandbox-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("federation.yaml");
        std::fs::write(&config, &self.policy).context("writing the sandbox policy")?;
        for (name, text) in &self.files {
            std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
        }
        // A fresh snapshot key ring for the sandbox's controllers.
        let keys = dir.join("snapshot.keys");
        let key: [u8; 32] = rand::random();
        federation_tls::dev::write_file(
            &keys,
            &format!(
                "sandbox-1:{}\n",
                base64::engine::general_purpose::STANDARD.encode(key)
            ),
            true,
        )
        .context("writing the sandbox key ring")?;
        let policy = Topology::parse(&self.policy)?;
        let mut regions = BTreeMap::new();
        for (name, _) in &policy.regions {
            let extra = self.replicas.get(name).map_or(0, |n| n.saturating_sub(1));
            let mut replicas = Vec::new();
            for i in 1..=extra {
                replicas.push(SandboxReplica {
                    addr: free_port()?,
                    admin_addr: free_port()?,
                    health_addr: free_port()?,
                    data_dir: dir.join(format!("{name}-{i}")),
                    controller: None,
                });
            }
            regions.insert(
                name.clone(),
                SandboxRegion {
                    addr: free_port()?,
                    admin_addr: free_port()?,
                    health_addr: free_port()?,
                    data_dir: dir.join(name),
                    controller: None,
                    agents: Vec::new(),
                    replicas,
                },
            );
        }
        let mut builder = self;
        if !builder
            .env
            .iter()
            .any(|(k, _)| k == "FEDERATION__NODE__KEYS__FILE")
        {
            builder.env.push((
                "FEDERATION__NODE__KEYS__FILE".into(),
                keys.display().to_string(),
            ));
        }
        let tls = if builder.insecure {
            None
        } else {
            let ca =
                federation_tls::dev::DevCa::new(&policy.name).context("making the sandbox CA")?;
            let certs = dir.join("certs");
            std::fs::create_dir_all(&certs)
                .with_context(|| format!("creating {}", certs.display()))?;
            federation_tls::dev::write_file(&certs.join("ca.pem"), &ca.ca_pem(), false)?;
            for (name, granted) in &policy.regions {
                let tags: Vec<String> = builder
                    .attested
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| granted.clone());
                let issued = ca.region(name, &tags, federation_tls::dev::Validity::Normal)?;
                federation_tls::dev::write_pair(&certs, &format!("region-{name}"), &issued)?;
                let agent = ca.agent(name, &format!("{name}-agent"))?;
                federation_tls::dev::write_pair(&certs, &format!("agent-{name}"), &agent)?;
            }
            for role in [
                federation_tls::Role::Client,
                federation_tls::Role::Operator,
                federation_tls::Role::Auditor,
            ] {
                federation_tls::dev::write_pair(
                    &certs,
                    role.as_str(),
                    &ca.role(role, role.as_str())?,
                )?;
            }
            if let Some(text) = &builder.tokens {
                federation_tls::dev::write_file(&certs.join("tokens"), text, true)?;
            }
            Some(SandboxTls {
                ca,
                layout: federation_tls::dev::Layout { dir: certs },
            })
        };
        let mut sandbox = Sandbox {
            builder,
            dir,
            config,
            regions,
            tls,
        };
        let names: Vec<String> = sandbox.regions.keys().cloned().collect();
        for name in &names {
            sandbox.start_controller(name)?;
        }
        for name in &names {
            for i in 1..sandbox.replica_count(name) {
                sandbox.start_replica(name, i)?;
            }
        }
        for name in &names {
            for _ in 0..sandbox.builder.agents {
                sandbox.start_agent(name)?;
            }
        }
        Ok(sandbox)
    }
}

/// One region of a sandbox.
#[derive(Debug)]
pub struct SandboxRegion {
    /// The controller's address.
    pub addr: SocketAddr,
    /// The controller's admin HTTP address (`/metrics`, status page).
    pub admin_addr: SocketAddr,
    /// The controller's plaintext health-only gRPC address (probes).
    pub health_addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    controller: Option<ChildGuard>,
    agents: Vec<ChildGuard>,
    /// The region's other controllers (replicas 1..).
    replicas: Vec<SandboxReplica>,
}

/// One more controller of a region (see [`SandboxBuilder::replicas`]).
#[derive(Debug)]
struct SandboxReplica {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    health_addr: SocketAddr,
    data_dir: PathBuf,
    controller: Option<ChildGuard>,
}

/// The sandbox's CA (in memory, to issue more certificates in tests) and
/// where its files are.
#[derive(Debug)]
pub struct SandboxTls {
    /// The development CA.
    pub ca: federation_tls::dev::DevCa,
    /// The certificate folder.
    pub layout: federation_tls::dev::Layout,
}

/// A running local federation.
#[derive(Debug)]
pub struct Sandbox {
    builder: SandboxBuilder,
    dir: PathBuf,
    config: PathBuf,
    regions: BTreeMap<String, SandboxRegion>,
    tls: Option<SandboxTls>,
}

impl Sandbox {
    /// The sandbox's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA and certificate files (`None` when insecure).
    pub fn tls(&self) -> Option<&SandboxTls> {
        self.tls.as_ref()
    }

    /// The controller URL of `name` (`https://` with TLS).
    pub fn url(&self, name: &str) -> anyhow::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.addr(name)?))
    }

    /// Client TLS for the identity whose files are `<stem>.pem/.key` in the
    /// certificate folder (`operator`, `client`, `auditor`, `region-<r>`,
    /// `agent-<r>`), or `None` for no client certificate.
    pub fn client_tls(&self, stem: Option<&str>) -> anyhow::Result<federation_tls::ClientTls> {
        let tls = self.tls.as_ref().context("the sandbox runs without tls")?;
        let layout = &tls.layout;
        let pair = stem.map(|s| layout.pair(s));
        Ok(federation_tls::ClientTls::load(
            &layout.ca(),
            pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            tls.ca.federation(),
        )?)
    }

    /// Environment for the `federation` client commands to act as identity
    /// `stem` (`client`, `operator`, `auditor`): `FEDERATION_CA`/`_CERT`/`_KEY`;
    /// empty when the sandbox is insecure (pass `--insecure` then).
    pub fn cli_env(&self, stem: &str) -> anyhow::Result<Vec<(String, String)>> {
        let Some(tls) = &self.tls else {
            return Ok(Vec::new());
        };
        let (cert, key) = tls.layout.pair(stem);
        Ok(vec![
            (
                "FEDERATION_CA".into(),
                tls.layout.ca().display().to_string(),
            ),
            ("FEDERATION_CERT".into(), cert.display().to_string()),
            ("FEDERATION_KEY".into(), key.display().to_string()),
        ])
    }

    /// A channel to `name`'s controller as the identity `stem` (see
    /// [`Sandbox::client_tls`]); plaintext when the sandbox is insecure.
    pub async fn channel_as(&self, name: &str, stem: Option<&str>) -> anyhow::Result<Channel> {
        if self.tls.is_none() {
            return connect(self.addr(name)?).await;
        }
        let tls = self.client_tls(stem)?;
        Ok(tls
            .connect(
                &self.url(name)?,
                federation_tls::Expect::Region(name.to_string()),
                Duration::from_secs(10),
            )
            .await?)
    }

    /// A channel to `to`'s controller as region `as_region`'s controller
    /// (its peer certificate).
    pub async fn peer_channel(&self, to: &str, as_region: &str) -> anyhow::Result<Channel> {
        self.channel_as(to, Some(&format!("region-{as_region}")))
            .await
    }

    /// The federation file the controllers were started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The snapshot key ring the controllers were started with (unless the
    /// builder set `FEDERATION__NODE__KEYS__FILE`).
    pub fn keys_path(&self) -> PathBuf {
        self.builder
            .env
            .iter()
            .find(|(k, _)| k == "FEDERATION__NODE__KEYS__FILE")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| self.dir.join("snapshot.keys"))
    }

    /// Region names.
    pub fn region_names(&self) -> Vec<String> {
        self.regions.keys().cloned().collect()
    }

    fn region(&self, name: &str) -> anyhow::Result<&SandboxRegion> {
        self.regions
            .get(name)
            .with_context(|| format!("no region `{name}` in the sandbox"))
    }

    fn region_mut(&mut self, name: &str) -> anyhow::Result<&mut SandboxRegion> {
        self.regions
            .get_mut(name)
            .with_context(|| format!("no region `{name}` in the sandbox"))
    }

    /// The controller address of `name`.
    pub fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.region(name)?.addr)
    }

    /// The admin HTTP address of `name`.
    pub fn admin_http_addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.region(name)?.admin_addr)
    }

    /// The plaintext health-only gRPC address of `name` (what a Kubernetes
    /// gRPC probe calls).
    pub fn health_addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.region(name)?.health_addr)
    }

    /// The data directory of `name`.
    pub fn data_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.region(name)?.data_dir.clone())
    }

    fn stdio(&self) -> Stdio {
        if self.builder.verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    }

    /// Where `name`'s controller writes its log (appended across restarts),
    /// unless the sandbox is verbose (then it goes to our stderr).
    pub fn controller_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.controller.log"))
    }

    /// The text `name`'s controller has logged so far (empty if verbose).
    pub fn controller_log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.controller_log(name)).unwrap_or_default()
    }

    fn replica_log_stdio(&self, name: &str, index: usize) -> anyhow::Result<Stdio> {
        if self.builder.verbose {
            return Ok(Stdio::inherit());
        }
        let path = self.replica_log(name, index);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Stdio::from(file))
    }

    /// Starts (or restarts, same port and data) the controller of `name`.
    pub fn start_controller(&mut self, name: &str) -> anyhow::Result<()> {
        self.start_replica(name, 0)
    }

    /// How many controllers serve `name` (see [`SandboxBuilder::replicas`]).
    pub fn replica_count(&self, name: &str) -> usize {
        self.region(name).map_or(0, |r| 1 + r.replicas.len())
    }

    /// Replica `index` of `name`: (gRPC, admin HTTP, health, data dir);
    /// replica 0 is the region's controller.
    fn replica_slot(
        &self,
        name: &str,
        index: usize,
    ) -> anyhow::Result<(SocketAddr, SocketAddr, SocketAddr, PathBuf)> {
        let r = self.region(name)?;
        if index == 0 {
            return Ok((r.addr, r.admin_addr, r.health_addr, r.data_dir.clone()));
        }
        let x = r
            .replicas
            .get(index - 1)
            .with_context(|| format!("no replica {index} of {name}"))?;
        Ok((x.addr, x.admin_addr, x.health_addr, x.data_dir.clone()))
    }

    /// The gRPC address of replica `index` of `name` (0: its controller).
    pub fn replica_addr(&self, name: &str, index: usize) -> anyhow::Result<SocketAddr> {
        Ok(self.replica_slot(name, index)?.0)
    }

    /// The data directory of replica `index` of `name` (0: [`Sandbox::data_dir`]).
    pub fn replica_data_dir(&self, name: &str, index: usize) -> anyhow::Result<PathBuf> {
        Ok(self.replica_slot(name, index)?.3)
    }

    /// Where replica `index` of `name` logs (0: [`Sandbox::controller_log`]).
    pub fn replica_log(&self, name: &str, index: usize) -> PathBuf {
        if index == 0 {
            return self.controller_log(name);
        }
        self.dir.join(format!("{name}-{index}.controller.log"))
    }

    /// The text replica `index` of `name` has logged so far.
    pub fn replica_log_text(&self, name: &str, index: usize) -> String {
        std::fs::read_to_string(self.replica_log(name, index)).unwrap_or_default()
    }

    /// SIGKILLs replica `index` of `name` (0: its controller).
    pub fn kill_replica(&mut self, name: &str, index: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.replica_guard(name, index)?.take() {
            c.kill();
        }
        Ok(())
    }

    /// The process of replica `index` of `name`, for signals.
    pub fn replica(&mut self, name: &str, index: usize) -> anyhow::Result<&mut ChildGuard> {
        self.replica_guard(name, index)?
            .as_mut()
            .with_context(|| format!("replica {index} of {name} is not running"))
    }

    fn replica_guard(
        &mut self,
        name: &str,
        index: usize,
    ) -> anyhow::Result<&mut Option<ChildGuard>> {
        let r = self.region_mut(name)?;
        if index == 0 {
            return Ok(&mut r.controller);
        }
        Ok(&mut r
            .replicas
            .get_mut(index - 1)
            .with_context(|| format!("no replica {index} of {name}"))?
            .controller)
    }

    /// The plaintext health port of replica `index` of `name`.
    pub fn replica_health_addr(&self, name: &str, index: usize) -> anyhow::Result<SocketAddr> {
        Ok(self.replica_slot(name, index)?.2)
    }

    /// The controller URL of replica `index` of `name` (`https://` with TLS).
    pub fn replica_url(&self, name: &str, index: usize) -> anyhow::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.replica_addr(name, index)?))
    }

    /// A client-service stub for replica `index` of `name`, as the operator.
    pub async fn replica_client(
        &self,
        name: &str,
        index: usize,
    ) -> anyhow::Result<api::federation_client_client::FederationClientClient<Channel>> {
        Ok(api::federation_client_client::FederationClientClient::new(
            self.replica_channel(name, index).await?,
        ))
    }

    /// An admin-service stub for replica `index` of `name`, as the operator.
    pub async fn replica_admin(
        &self,
        name: &str,
        index: usize,
    ) -> anyhow::Result<api::federation_admin_client::FederationAdminClient<Channel>> {
        Ok(api::federation_admin_client::FederationAdminClient::new(
            self.replica_channel(name, index).await?,
        ))
    }

    /// A channel to replica `index` of `name`, as the operator.
    async fn replica_channel(&self, name: &str, index: usize) -> anyhow::Result<Channel> {
        let addr = self.replica_addr(name, index)?;
        let channel = match &self.tls {
            None => connect(addr).await?,
            Some(_) => {
                self.client_tls(Some("operator"))?
                    .connect(
                        &format!("https://{addr}"),
                        federation_tls::Expect::Region(name.to_string()),
                        Duration::from_secs(10),
                    )
                    .await?
            }
        };
        Ok(channel)
    }

    /// Starts (or restarts, same port and data) replica `index` of `name`
    /// (0: its controller).
    pub fn start_replica(&mut self, name: &str, index: usize) -> anyhow::Result<()> {
        let peers: Vec<String> = self
            .regions
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(n, r)| {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let blocked = self
                    .builder
                    .blocked
                    .iter()
                    .any(|(a, b)| (a == name && b == n) || (b == name && a == n));
                if blocked {
                    // Port 1 on loopback: nothing listens, connections are refused.
                    format!("{n}={scheme}://127.0.0.1:1")
                } else {
                    // Every replica of the region, comma-separated.
                    let all: Vec<String> = std::iter::once(r.addr)
                        .chain(r.replicas.iter().map(|x| x.addr))
                        .map(|a| format!("{scheme}://{a}"))
                        .collect();
                    format!("{n}={}", all.join(","))
                }
            })
            .collect();
        let (addr, admin_addr, health_addr, data_dir) = self.replica_slot(name, index)?;
        let mut cmd = Command::new(&self.builder.exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--region")
            .arg(name)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--admin-listen")
            .arg(admin_addr.to_string())
            .arg("--health-listen")
            .arg(health_addr.to_string())
            .stdout(Stdio::null())
            .stderr(self.replica_log_stdio(name, index)?);
        for (k, v) in &self.builder.env {
            cmd.env(k, v);
        }
        for (_, k, v) in self.builder.region_env.iter().filter(|(r, ..)| r == name) {
            cmd.env(k, v);
        }
        if index > 0 {
            cmd.env("FEDERATION__NODE__REPLICA", format!("{name}-{}", index + 1));
        }
        for p in peers {
            cmd.arg("--peer").arg(p);
        }
        match &self.tls {
            None => {
                cmd.arg("--insecure");
            }
            Some(tls) => {
                let (cert, key) = tls.layout.region(name);
                cmd.env("FEDERATION__NODE__TLS__CA", tls.layout.ca())
                    .env("FEDERATION__NODE__TLS__CERT", cert)
                    .env("FEDERATION__NODE__TLS__KEY", key);
                if self.builder.tokens.is_some() {
                    cmd.env(
                        "FEDERATION__NODE__TLS__TOKENS_FILE",
                        tls.layout.dir.join("tokens"),
                    );
                }
            }
        }
        let guard = ChildGuard::spawn(&format!("{name} controller {index}"), &mut cmd)?;
        *self.replica_guard(name, index)? = Some(guard);
        Ok(())
    }

    /// Starts one more agent for `name`; returns its index.
    pub fn start_agent(&mut self, name: &str) -> anyhow::Result<usize> {
        self.start_agent_with(name, &self.builder.exec.clone(), self.builder.slots)
    }

    /// Starts an agent for `name` running `exec` with `slots`.
    pub fn start_agent_with(
        &mut self,
        name: &str,
        exec: &str,
        slots: u32,
    ) -> anyhow::Result<usize> {
        let url = self.url(name)?;
        self.start_agent_on(name, exec, slots, &url)
    }

    /// Starts an agent for `name` running `exec` with `slots`, given the
    /// replicas `replicas` of `name` in that order (`--controller A,B,…`:
    /// it uses the first and moves on when one drains or stops answering).
    pub fn start_agent_at(
        &mut self,
        name: &str,
        exec: &str,
        slots: u32,
        replicas: &[usize],
    ) -> anyhow::Result<usize> {
        let urls = replicas
            .iter()
            .map(|&i| self.replica_url(name, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.start_agent_on(name, exec, slots, &urls.join(","))
    }

    fn start_agent_on(
        &mut self,
        name: &str,
        exec: &str,
        slots: u32,
        controllers: &str,
    ) -> anyhow::Result<usize> {
        let index = self.region(name)?.agents.len();
        let mut cmd = Command::new(&self.builder.exe);
        cmd.arg("agent")
            .arg("--controller")
            .arg(controllers)
            .arg("--region")
            .arg(name)
            .arg("--name")
            .arg(format!("{name}-agent-{index}"))
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--exec")
            .arg(exec)
            .stdout(Stdio::null())
            .stderr(self.stdio())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        for (k, v) in &self.builder.agent_env {
            cmd.env(k, v);
        }
        match &self.tls {
            None => {
                cmd.arg("--insecure");
            }
            Some(tls) => {
                let (cert, key) = tls.layout.agent(name);
                cmd.arg("--ca")
                    .arg(tls.layout.ca())
                    .arg("--cert")
                    .arg(cert)
                    .arg("--key")
                    .arg(key);
            }
        }
        let guard = ChildGuard::spawn(&format!("{name} agent {index}"), &mut cmd)?;
        self.region_mut(name)?.agents.push(guard);
        Ok(index)
    }

    /// SIGKILLs an agent.
    pub fn kill_agent(&mut self, name: &str, index: usize) -> anyhow::Result<()> {
        let agent = self
            .region_mut(name)?
            .agents
            .get_mut(index)
            .with_context(|| format!("no agent {index} in {name}"))?;
        agent.kill();
        Ok(())
    }

    /// SIGKILLs the controller of `name`.
    pub fn kill_controller(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(mut c) = self.region_mut(name)?.controller.take() {
            c.kill();
        }
        Ok(())
    }

    /// The controller process of `name`, for signals (SIGSTOP/SIGCONT/SIGTERM).
    pub fn controller(&mut self, name: &str) -> anyhow::Result<&mut ChildGuard> {
        self.region_mut(name)?
            .controller
            .as_mut()
            .with_context(|| format!("{name}'s controller is not running"))
    }

    /// A channel to `name`'s controller, as the operator (who may call the
    /// client and admin services).
    pub async fn channel(&self, name: &str) -> anyhow::Result<Channel> {
        self.channel_as(name, Some("operator")).await
    }

    /// A client-service stub for `name`.
    pub async fn client(
        &self,
        name: &str,
    ) -> anyhow::Result<api::federation_client_client::FederationClientClient<Channel>> {
        Ok(api::federation_client_client::FederationClientClient::new(
            self.channel(name).await?,
        ))
    }

    /// An admin-service stub for `name`.
    pub async fn admin(
        &self,
        name: &str,
    ) -> anyhow::Result<api::federation_admin_client::FederationAdminClient<Channel>> {
        Ok(api::federation_admin_client::FederationAdminClient::new(
            self.channel(name).await?,
        ))
    }

    /// Waits (bounded) until `viewer` sees each listed region in the listed
    /// state ("alive", "suspect", "dead").
    pub async fn wait_for_states(
        &self,
        viewer: &str,
        expect: &[(&str, &str)],
        patience: Duration,
    ) -> anyhow::Result<()> {
        self.wait_for_replica_states(viewer, 0, expect, patience)
            .await
    }

    /// [`Sandbox::wait_for_states`] as replica `index` of `viewer` sees
    /// them (0: its controller): each replica hears its peers on its own.
    pub async fn wait_for_replica_states(
        &self,
        viewer: &str,
        index: usize,
        expect: &[(&str, &str)],
        patience: Duration,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + patience;
        let mut last = String::from("no answer");
        while Instant::now() < until {
            let channel = if index == 0 {
                self.channel(viewer).await
            } else {
                self.replica_channel(viewer, index).await
            };
            if let Ok(ch) = channel {
                let mut admin = api::federation_admin_client::FederationAdminClient::new(ch);
                if let Ok(s) = admin
                    .federation_status(api::FederationStatusRequest {})
                    .await
                {
                    let states: BTreeMap<_, _> = s
                        .into_inner()
                        .regions
                        .into_iter()
                        .map(|r| (r.region, r.state))
                        .collect();
                    if expect
                        .iter()
                        .all(|(r, st)| states.get(*r).map(String::as_str) == Some(*st))
                    {
                        return Ok(());
                    }
                    last = format!("{states:?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "timed out after {patience:?} waiting for {expect:?} as seen from {viewer} (replica {index}); last seen {last}{}",
            self.log_tails(expect.iter().map(|(r, _)| *r).chain([viewer]))
        )
    }

    /// The last lines each named controller logged, for a timeout's message.
    pub(crate) fn log_tails<'a>(&self, names: impl Iterator<Item = &'a str>) -> String {
        let mut out = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for name in names.filter(|n| seen.insert(*n)) {
            let text = self.controller_log_text(name);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(6)..];
            out.push_str(&format!("\n--- {name}'s controller log, last lines:"));
            for l in tail {
                out.push_str("\n  ");
                out.push_str(l);
            }
        }
        out
    }

    /// `viewer`'s status row for `region`, now.
    pub async fn status_row(
        &self,
        viewer: &str,
        region: &str,
    ) -> anyhow::Result<api::RegionStatus> {
        let mut admin = self.admin(viewer).await?;
        admin
            .federation_status(api::FederationStatusRequest {})
            .await
            .with_context(|| format!("status of {viewer}"))?
            .into_inner()
            .regions
            .into_iter()
            .find(|r| r.region == region)
            .with_context(|| format!("{viewer} has no status row for {region}"))
    }

    /// Waits (bounded) until `viewer`'s status row for `region` satisfies
    /// `check`; returns that row.
    pub async fn wait_for_row(
        &self,
        viewer: &str,
        region: &str,
        what: &str,
        patience: Duration,
        check: impl Fn(&api::RegionStatus) -> bool,
    ) -> anyhow::Result<api::RegionStatus> {
        let until = Instant::now() + patience;
        let mut last = None;
        while Instant::now() < until {
            if let Ok(ch) = self.channel(viewer).await {
                let mut admin = api::federation_admin_client::FederationAdminClient::new(ch);
                if let Ok(s) = admin
                    .federation_status(api::FederationStatusRequest {})
                    .await
                {
                    let row = s
                        .into_inner()
                        .regions
                        .into_iter()
                        .find(|r| r.region == region);
                    if let Some(row) = row {
                        if check(&row) {
                            return Ok(row);
                        }
                        last = Some(row);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "timed out after {patience:?} waiting for {viewer} to see {region} {what}; last row {last:?}"
        )
    }

    /// Waits (bounded) until the task is terminal; returns it as last read.
    pub async fn wait_terminal(
        &self,
        entry: &str,
        task_id: &str,
        patience: Duration,
    ) -> anyhow::Result<api::Task> {
        let mut client = self.client(entry).await?;
        let until = Instant::now() + patience;
        loop {
            let t = client
                .get_task(api::GetTaskRequest {
                    task_id: task_id.to_string(),
                })
                .await
                .with_context(|| format!("reading task {task_id}"))?
                .into_inner()
                .task
                .unwrap_or_default();
            if t.state >= api::TaskState::Succeeded as i32 {
                return Ok(t);
            }
            if Instant::now() >= until {
                bail!("task {task_id} still {:?} after {patience:?}", t.state());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Kill every child before removing their directories.
        for r in self.regions.values_mut() {
            r.agents.clear();
            r.controller = None;
        }
        if !self.builder.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects to a controller over plaintext (bounded); for `--insecure`
/// federations (a TLS controller refuses it).
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timers_drops_the_fast_test_timers_and_keeps_the_rest() {
        let b = SandboxBuilder::new("federation", "")
            .env("FEDERATION__NODE__LIMITS__MAX_QUEUE_DEPTH", "7")
            .default_timers();
        assert!(
            !b.env
                .iter()
                .any(|(k, _)| k.starts_with("FEDERATION__NODE__TIMERS__")),
            "{:?}",
            b.env
        );
        assert!(
            b.env
                .iter()
                .any(|(k, v)| k == "FEDERATION__NODE__LIMITS__MAX_QUEUE_DEPTH" && v == "7")
        );
    }
}
