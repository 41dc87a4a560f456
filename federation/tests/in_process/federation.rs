//! An in-process federation: one controller per region of a policy, each
//! started with `runtime::run` on its own thread and current-thread
//! runtime and its own loopback socket, plaintext, with fast timers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation::config::Timers;
use federation::controller::Settings;
use federation::policy::Policy;
use federation::replication::KeyRing;
use federation_api as api;
use tonic::transport::Channel;

/// How long any single wait may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The user's example and its requires-GDPR variant (the sandbox's fixtures).
pub use federation_sandbox::{SEED_POLICY, SEED_REQUIRES_GDPR, string_attrs};

/// Fast timers for tests: 100 ms heartbeats, dead after 1 s of silence.
pub fn fast_timers() -> Timers {
    Timers {
        heartbeat_interval: Duration::from_millis(100),
        dead_after: Duration::from_secs(1),
        forward_timeout: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(3),
        agent_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_secs(1),
        failback_hold_down: Duration::from_millis(500),
        takeover_grace: Duration::from_secs(1),
        ..Timers::default()
    }
}

/// How to start an in-process federation.
pub struct Builder {
    policy: String,
    region_policy: BTreeMap<String, String>,
    timers: Timers,
    keys: bool,
}

impl Builder {
    /// A federation of `policy`'s regions, fast timers, no replication.
    pub fn new(policy: &str) -> Self {
        Self {
            policy: policy.to_string(),
            region_policy: BTreeMap::new(),
            timers: fast_timers(),
            keys: false,
        }
    }

    /// Runs `region` with a federation file of its own (same regions).
    pub fn region_policy(mut self, region: &str, policy: &str) -> Self {
        self.region_policy
            .insert(region.to_string(), policy.to_string());
        self
    }

    /// Changes the timers.
    pub fn timers(mut self, f: impl FnOnce(&mut Timers)) -> Self {
        f(&mut self.timers);
        self
    }

    /// Gives every controller one snapshot key ring: replication and
    /// takeover on.
    pub fn replication(mut self) -> Self {
        self.keys = true;
        self
    }

    /// Starts every region and waits until each sees every other alive.
    pub async fn start_formed(self) -> Federation {
        let fed = self.start();
        fed.wait_formed().await;
        fed
    }

    /// Starts every region's controller.
    pub fn start(self) -> Federation {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("policy file");
            path
        };
        let config = write("federation.yaml", &self.policy);
        let policy = Policy::load_file(&config).expect("the test policy loads");
        let keys = self.keys.then(|| {
            let key = federation::replication::Key::new("in-process-1", rand::random());
            KeyRing::from_keys(vec![key], None)
        });
        let mut regions = BTreeMap::new();
        for r in &policy.regions {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            drop(listener);
            let config_path = match self.region_policy.get(&r.name) {
                Some(text) => write(&format!("{}.yaml", r.name), text),
                None => config.clone(),
            };
            regions.insert(
                r.name.clone(),
                Region {
                    addr,
                    config_path,
                    running: None,
                },
            );
        }
        let mut fed = Federation {
            dir,
            timers: self.timers,
            keys,
            regions,
        };
        for name in fed.names() {
            fed.start_region(&name);
        }
        fed
    }
}

struct Region {
    addr: SocketAddr,
    config_path: PathBuf,
    running: Option<Running>,
}

/// One controller's thread and runtime.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    last_error: Arc<Mutex<String>>,
}

impl Running {
    fn kill(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running in-process federation; dropping it stops every controller and
/// removes its directory.
pub struct Federation {
    // Field order: controllers stop before the directory goes.
    regions: BTreeMap<String, Region>,
    timers: Timers,
    keys: Option<KeyRing>,
    dir: tempfile::TempDir,
}

impl Federation {
    /// Region names.
    pub fn names(&self) -> Vec<String> {
        self.regions.keys().cloned().collect()
    }

    /// `region`'s gRPC address.
    pub fn addr(&self, region: &str) -> SocketAddr {
        self.region(region).addr
    }

    /// `region`'s data directory.
    pub fn data_dir(&self, region: &str) -> PathBuf {
        self.dir.path().join(region)
    }

    /// The snapshot key ring, when replication is on.
    pub fn keys(&self) -> Option<&KeyRing> {
        self.keys.as_ref()
    }

    fn region(&self, region: &str) -> &Region {
        self.regions
            .get(region)
            .unwrap_or_else(|| panic!("no region {region}"))
    }

    fn settings(&self, region: &str) -> Settings {
        let r = self.region(region);
        let mut settings =
            Settings::for_test(region, &r.config_path, &self.data_dir(region), r.addr)
                .expect("the region's test settings");
        settings.peers = self
            .regions
            .iter()
            .filter(|(n, _)| n.as_str() != region)
            .map(|(n, p)| (n.clone(), format!("http://{}", p.addr)))
            .collect();
        settings.timers = self.timers.clone();
        settings.keys = self.keys.clone();
        settings
    }

    /// Starts (or restarts, same address and data) `region`'s controller.
    /// A restart may find the previous run's files still being released:
    /// opening is retried (bounded) until it succeeds.
    pub fn start_region(&mut self, region: &str) {
        let settings = self.settings(region);
        let addr = self.region(region).addr;
        let last_error = Arc::new(Mutex::new(String::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let error = last_error.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ctl-{region}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let serve = async {
                        let until = Instant::now() + PATIENCE;
                        loop {
                            if Instant::now() >= until {
                                return;
                            }
                            let listener = match tokio::net::TcpListener::bind(addr).await {
                                Ok(l) => l,
                                Err(e) => {
                                    *error.lock().unwrap_or_else(|p| p.into_inner()) =
                                        format!("bind {addr}: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            };
                            let r = federation::runtime::run(
                                settings.clone(),
                                listener,
                                std::future::pending(),
                            )
                            .await;
                            if let Err(e) = r {
                                *error.lock().unwrap_or_else(|p| p.into_inner()) = format!("{e:#}");
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .expect("controller thread");
        let r = self
            .regions
            .get_mut(region)
            .unwrap_or_else(|| panic!("no region {region}"));
        r.running = Some(Running {
            stop: Some(stop_tx),
            thread: Some(thread),
            last_error,
        });
    }

    /// Stops `region`'s controller abruptly: its runtime is dropped with
    /// every task and socket (no goodbye, as after SIGKILL).
    pub fn kill(&mut self, region: &str) {
        if let Some(mut r) = self.regions.get_mut(region).and_then(|r| r.running.take()) {
            r.kill();
        }
    }

    /// The last start-up error of `region` (empty if none).
    fn last_error(&self, region: &str) -> String {
        self.region(region)
            .running
            .as_ref()
            .map(|r| {
                r.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .unwrap_or_default()
    }

    /// A plaintext channel to `region`.
    pub async fn channel(&self, region: &str) -> Channel {
        federation_sandbox::connect(self.addr(region))
            .await
            .unwrap_or_else(|e| panic!("connect to {region}: {e:#}"))
    }

    /// A client-service stub for `region`.
    pub async fn client(
        &self,
        region: &str,
    ) -> api::federation_client_client::FederationClientClient<Channel> {
        api::federation_client_client::FederationClientClient::new(self.channel(region).await)
    }

    /// A peer-service stub for `region` (plaintext: any caller may call it).
    pub async fn peer(
        &self,
        region: &str,
    ) -> api::federation_peer_client::FederationPeerClient<Channel> {
        api::federation_peer_client::FederationPeerClient::new(self.channel(region).await)
    }

    /// An agent-service stub for `region`.
    pub async fn agent(
        &self,
        region: &str,
    ) -> api::region_agent_api_client::RegionAgentApiClient<Channel> {
        api::region_agent_api_client::RegionAgentApiClient::new(self.channel(region).await)
    }

    /// `viewer`'s states of the other regions, when it answers.
    pub async fn states(&self, viewer: &str) -> Option<HashMap<String, String>> {
        let ch = federation_sandbox::connect(self.addr(viewer)).await.ok()?;
        let mut admin = api::federation_admin_client::FederationAdminClient::new(ch);
        let s = admin
            .federation_status(api::FederationStatusRequest {})
            .await
            .ok()?
            .into_inner();
        Some(s.regions.into_iter().map(|r| (r.region, r.state)).collect())
    }

    /// Waits (bounded) until `viewer` sees `region` in `state`.
    pub async fn wait_state(&self, viewer: &str, region: &str, state: &str) {
        let until = Instant::now() + PATIENCE;
        let mut last = None;
        while Instant::now() < until {
            last = self.states(viewer).await;
            if last
                .as_ref()
                .and_then(|s| s.get(region))
                .is_some_and(|s| s == state)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{viewer} did not see {region} {state} within {PATIENCE:?}: last {last:?}; {viewer}'s start-up error: {}",
            self.last_error(viewer)
        );
    }

    /// Waits (bounded) until every controller sees every other alive.
    pub async fn wait_formed(&self) {
        let names = self.names();
        for viewer in &names {
            for region in names.iter().filter(|n| *n != viewer) {
                self.wait_state(viewer, region, "alive").await;
            }
        }
    }

    /// Kills `region` and waits until `seen_by` declares it dead.
    pub async fn kill_and_wait_dead(&mut self, region: &str, seen_by: &str) {
        self.kill(region);
        self.wait_state(seen_by, region, "dead").await;
    }

    /// Reads `task_id` through `entry` (relayed when held elsewhere).
    pub async fn get(&self, entry: &str, task_id: &str) -> Result<api::Task, tonic::Status> {
        self.client(entry)
            .await
            .get_task(api::GetTaskRequest {
                task_id: task_id.to_string(),
            })
            .await
            .map(|r| r.into_inner().task.unwrap_or_default())
    }
}

/// A submit of `customer_region = customer`.
pub fn submit(customer: &str) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", customer)]),
        payload: b"work".to_vec(),
        ..Default::default()
    }
}

/// Polls `check` until it returns `Some`, at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
