//! Runtime benchmarks, every figure a ratio against a baseline measured in
//! the same run on the same machine:
//!
//! 1. local `SubmitTask` (durable in the entry region) vs a raw tonic unary
//!    echo of the same message types on loopback — throughput and p50/p99 at
//!    1 and 64 calls in flight;
//! 2. a forwarded submit (entry north_america, owner europe) vs a local one
//!    and vs the echo;
//! 3. failure detection time after SIGKILL with the default timers, and
//!    false suspicions while both cores are busy.
//!
//! Two floors are measured beside the echo: the *durable echo* persists each
//! request (one `write` + one `fdatasync` per gathered batch, the same group
//! commit as the task store) before answering, and the *relayed durable echo*
//! reaches it through one more gRPC hop. Nothing that stores a task durably
//! before answering can beat the first; no forwarded submit can beat the
//! second. They show how much of each target this machine's disk leaves.
//!
//! Run: `cargo bench -p federation --bench runtime` (release build; takes
//! about a minute). `RUNTIME_BENCH_SECS` sets the seconds per measurement.

use std::sync::Arc;

/// The controller binary's allocator (`src/main.rs`), so the in-process
/// controllers run as `federation serve` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use federation::config::Timers;
use federation::controller::Settings;
use federation_api as api;
use federation_sandbox::{SandboxBuilder, string_attrs};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const SEED: &str = include_str!("../../policies/seed-federation.yaml");

/// A baseline service: `SubmitTask` as given, every other method unimplemented.
macro_rules! baseline_service {
    ($ty:ty, |$this:ident, $request:ident| $submit:block) => {
        #[tonic::async_trait]
        impl api::federation_client_server::FederationClient for $ty {
            async fn submit_task(
                &self,
                $request: Request<api::SubmitTaskRequest>,
            ) -> Result<Response<api::SubmitTaskResponse>, Status> {
                let $this = self;
                $submit
            }
            async fn get_task(
                &self,
                _: Request<api::GetTaskRequest>,
            ) -> Result<Response<api::GetTaskResponse>, Status> {
                Err(Status::unimplemented("echo"))
            }
            type WatchTaskStream = futures::stream::Empty<Result<api::TaskEvent, Status>>;
            async fn watch_task(
                &self,
                _: Request<api::WatchTaskRequest>,
            ) -> Result<Response<Self::WatchTaskStream>, Status> {
                Err(Status::unimplemented("echo"))
            }
            async fn cancel_task(
                &self,
                _: Request<api::CancelTaskRequest>,
            ) -> Result<Response<api::CancelTaskResponse>, Status> {
                Err(Status::unimplemented("echo"))
            }
            async fn explain_route(
                &self,
                _: Request<api::ExplainRouteRequest>,
            ) -> Result<Response<api::ExplainRouteResponse>, Status> {
                Err(Status::unimplemented("echo"))
            }
            async fn list_tasks(
                &self,
                _: Request<api::ListTasksRequest>,
            ) -> Result<Response<api::ListTasksResponse>, Status> {
                Err(Status::unimplemented("echo"))
            }
        }
    };
}

/// The baseline: the same service and messages, answering at once.
#[derive(Debug, Default)]
struct Echo;

baseline_service!(Echo, |_this, request| {
    let r = request.into_inner();
    Ok(Response::new(api::SubmitTaskResponse {
        task_id: r.idempotency_key,
        region: "echo".into(),
        decision: None,
        deduplicated: false,
        state: api::TaskState::Queued as i32,
    }))
});

/// The floor of "durable before the answer": the echo, except that each
/// request's bytes are appended to a file and the file fdatasync'd before the
/// answer, with group commit (one write and one fdatasync per gathered batch,
/// gathered as the task store gathers). No store, no policy, no log: any
/// submit that persists before it answers costs at least this much.
struct DurableEcho {
    tx: tokio::sync::mpsc::UnboundedSender<(Vec<u8>, tokio::sync::oneshot::Sender<()>)>,
}

impl DurableEcho {
    fn new(path: std::path::PathBuf) -> Self {
        use std::io::Write;
        let (tx, rx) =
            tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("durable echo file");
            let mut batches =
                federation::group_commit::Gatherer::new(rx, federation::tasks::MAX_BATCH);
            let mut buf = Vec::new();
            while let Some(batch) = batches.next_batch() {
                buf.clear();
                for (bytes, _) in &batch {
                    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    buf.extend_from_slice(bytes);
                }
                file.write_all(&buf).expect("write");
                file.sync_data().expect("fdatasync");
                for (_, reply) in batch {
                    let _ = reply.send(());
                }
            }
        });
        Self { tx }
    }
}

baseline_service!(DurableEcho, |this, request| {
    use prost::Message;
    let r = request.into_inner();
    let (done, wait) = tokio::sync::oneshot::channel();
    this.tx
        .send((r.encode_to_vec(), done))
        .map_err(|_| Status::internal("writer gone"))?;
    wait.await.map_err(|_| Status::internal("writer gone"))?;
    Ok(Response::new(api::SubmitTaskResponse {
        task_id: r.idempotency_key,
        region: "echo".into(),
        decision: None,
        deduplicated: false,
        state: api::TaskState::Queued as i32,
    }))
});

/// The floor of a forwarded submit: an echo that relays each request over
/// gRPC to the durable echo (the owner) and answers with its reply.
struct RelayEcho {
    owner: api::federation_client_client::FederationClientClient<tonic::transport::Channel>,
}

baseline_service!(RelayEcho, |this, request| {
    this.owner.clone().submit_task(request.into_inner()).await
});

async fn serve<S>(server: &tokio::runtime::Handle, service: S) -> std::net::SocketAddr
where
    S: api::federation_client_server::FederationClient,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    server.spawn(async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        tonic::transport::Server::builder()
            .add_service(api::federation_client_server::FederationClientServer::new(
                service,
            ))
            .serve_with_incoming(federation::transport::incoming(listener))
            .await
            .expect("echo server");
    });
    addr
}

fn controller(
    server: &tokio::runtime::Handle,
    region: &str,
    listener: std::net::TcpListener,
    peers: &[(&str, std::net::SocketAddr)],
    dir: &std::path::Path,
) {
    let config = dir.join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy file");
    let addr = listener.local_addr().expect("addr");
    let mut settings =
        Settings::for_test(region, &config, &dir.join(region), addr).expect("settings");
    settings.peers = peers
        .iter()
        .map(|(r, a)| (r.to_string(), format!("http://{a}")))
        .collect();
    listener.set_nonblocking(true).expect("nonblocking");
    server.spawn(async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        federation::runtime::run(settings, listener, std::future::pending())
            .await
            .expect("controller runs");
    });
}

#[derive(Clone, Copy, Default)]
struct Figures {
    /// Server CPU per call (the server's threads or processes only).
    cpu_us: f64,
    calls_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// etcd's `KV.Put` request and answer (etcd's `rpc.proto`, only the
/// fields used: the answer's header is skipped as unknown).
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

/// What a measurement calls: a submit (or an echo of one), a PostgreSQL
/// INSERT, an etcd Put.
#[derive(Clone)]
enum Target {
    Submit {
        addr: std::net::SocketAddr,
        customer: &'static str,
    },
    Postgres {
        url: String,
        postmaster: u32,
    },
    Etcd {
        addr: std::net::SocketAddr,
        pid: u32,
    },
}

enum Caller {
    Submit(
        api::federation_client_client::FederationClientClient<tonic::transport::Channel>,
        &'static str,
    ),
    Postgres(tokio_postgres::Client, tokio_postgres::Statement),
    Etcd(tonic::client::Grpc<tonic::transport::Channel>),
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect")
}

impl Target {
    /// `n` callers: one HTTP/2 channel shared (gRPC), one connection each
    /// (PostgreSQL).
    async fn callers(&self, n: usize) -> Vec<Caller> {
        match self {
            Target::Submit { addr, customer } => {
                let client = api::federation_client_client::FederationClientClient::new(
                    channel(*addr).await,
                );
                (0..n)
                    .map(|_| Caller::Submit(client.clone(), customer))
                    .collect()
            }
            Target::Etcd { addr, .. } => {
                let grpc = tonic::client::Grpc::new(channel(*addr).await);
                (0..n).map(|_| Caller::Etcd(grpc.clone())).collect()
            }
            Target::Postgres { url, .. } => {
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                        .await
                        .expect("connect to postgres");
                    tokio::spawn(conn);
                    let insert = client
                        .prepare("INSERT INTO tasks (id, payload) VALUES ($1, $2)")
                        .await
                        .expect("prepare");
                    out.push(Caller::Postgres(client, insert));
                }
                out
            }
        }
    }

    /// Seconds of CPU the server has used so far.
    fn server_cpu(&self) -> f64 {
        match self {
            Target::Submit { .. } => in_process_server_cpu(),
            Target::Postgres { postmaster, .. } => {
                // The whole tree: the sandbox's watchdog, the postmaster,
                // its backends and background workers.
                let mut pids = vec![*postmaster];
                let mut i = 0;
                while i < pids.len() {
                    let children = children_of(pids[i]);
                    pids.extend(children);
                    i += 1;
                }
                pids.into_iter()
                    .map(|p| proc_cpu(&format!("/proc/{p}/stat")))
                    .sum()
            }
            Target::Etcd { pid, .. } => proc_cpu(&format!("/proc/{pid}/stat")),
        }
    }
}

impl Caller {
    async fn call(&mut self, payload: &[u8], key: String) {
        match self {
            Caller::Submit(c, customer) => {
                c.submit_task(req(customer, payload, &key))
                    .await
                    .expect("submit");
            }
            Caller::Postgres(client, insert) => {
                client
                    .execute(&*insert, &[&key, &payload])
                    .await
                    .expect("insert");
            }
            Caller::Etcd(grpc) => {
                grpc.ready().await.expect("etcd ready");
                let path = http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
                let codec: tonic_prost::ProstCodec<PutRequest, PutResponse> =
                    tonic_prost::ProstCodec::default();
                grpc.unary(
                    Request::new(PutRequest {
                        key: key.into_bytes(),
                        value: payload.to_vec(),
                    }),
                    path,
                    codec,
                )
                .await
                .expect("put");
            }
        }
    }
}

async fn measure(target: &Target, in_flight: usize, secs: f64) -> Figures {
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut callers = target.callers(in_flight).await;
    let payload = vec![7u8; 256];
    // Warm up.
    for i in 0..200 {
        let n = callers.len();
        callers[i % n]
            .call(&payload, format!("warm-{run}-{i}"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut workers = Vec::new();
    let started = Instant::now();
    let cpu0 = target.server_cpu();
    for (w, mut c) in callers.into_iter().enumerate() {
        let payload = payload.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                c.call(&payload, format!("k{run}-{w}-{i}")).await;
                lat.push(t.elapsed());
                i += 1;
            }
            // The caller lives on until the CPU is read: a PostgreSQL
            // backend that exits takes its CPU time with it.
            (lat, c)
        }));
    }
    let mut all = Vec::new();
    let mut callers = Vec::new();
    for w in workers {
        let (lat, c) = w.await.expect("worker");
        all.extend(lat);
        callers.push(c);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.server_cpu() - cpu0;
    drop(callers);
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    Figures {
        cpu_us: cpu * 1e6 / all.len() as f64,
        calls_per_sec: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn proc_cpu(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (ticks of 1/100 s); `rest`
    // starts at field 3.
    let field = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(14) + field(15)) / 100.0
}

/// This process's CPU less the client's (the main thread and the threads
/// of the client runtime, `bench-client`): the in-process servers' threads
/// (their runtime, `bench-server`, and the store's, log's and witness's
/// own threads).
fn in_process_server_cpu() -> f64 {
    let total = proc_cpu("/proc/self/stat");
    let me = std::process::id().to_string();
    let mut client = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let stat = t.path().join("stat");
            let text = std::fs::read_to_string(&stat).unwrap_or_default();
            if tid == me || text.contains("(bench-client)") {
                client += proc_cpu(&stat.to_string_lossy());
            }
        }
    }
    total - client
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|x| x.parse::<u32>().ok());
            if ppid == Some(parent) {
                out.push(pid);
            }
        }
    }
    out
}

/// The first process whose command line runs `postgres` with `-p <port>`
/// (the sandbox's watchdog or the postmaster; their tree is the server).
fn postmaster_of(port: u16) -> Option<u32> {
    let want = format!("\0-p\0{port}\0");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid = p.file_name().to_string_lossy().parse::<u32>().ok()?;
        let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("postgres") && cmd.contains(&want)).then_some(pid)
    })
}

fn req(customer: &str, payload: &[u8], key: &str) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", customer)]),
        payload: payload.to_vec(),
        idempotency_key: key.to_string(),
        priority: 0,
        ..Default::default()
    }
}

/// PostgreSQL from the sandbox's helper (Debian's package), with a task
/// table: `None` (and a line saying so) when it is not installed.
async fn start_postgres() -> Option<(federation_sandbox::pg::PgServer, Target)> {
    let pg = match federation_sandbox::pg::PgServer::start() {
        Ok(pg) => pg,
        Err(e) => {
            println!("postgresql: skipped ({e:#})");
            return None;
        }
    };
    let url = pg.create_database("bench").expect("database");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE tasks (id text PRIMARY KEY, payload bytea NOT NULL)")
        .await
        .expect("table");
    let sync: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .expect("show")
        .get(0);
    let postmaster = postmaster_of(pg.port()).expect("the postmaster's pid");
    println!(
        "postgresql {}: synchronous_commit {sync}, INSERT of a 256-byte row by primary key",
        pg.version()
    );
    Some((pg, Target::Postgres { url, postmaster }))
}

/// An etcd server on loopback, killed on drop.
struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd (`ETCD_BIN`, else Debian's `/usr/bin/etcd`), one member, its data
/// in a temporary directory: `None` (and a line saying so) when the binary
/// is not installed.
async fn start_etcd() -> Option<(Etcd, Target)> {
    let bin = std::env::var_os("ETCD_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/etcd".into());
    if !bin.exists() {
        println!(
            "etcd: skipped ({} not installed: apt-get install etcd-server, or set ETCD_BIN)",
            bin.display()
        );
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let client = federation_sandbox::ports::free_port().expect("port");
    let peer = federation_sandbox::ports::free_port().expect("port");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
    let child = std::process::Command::new(&bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &format!("http://{client}"),
            "--advertise-client-urls",
            &format!("http://{client}"),
            "--listen-peer-urls",
            &format!("http://{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://{peer}"),
            "--initial-cluster",
            &format!("bench=http://{peer}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd starts");
    let pid = child.id();
    let etcd = Etcd { child, _dir: dir };
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let target = Target::Etcd { addr: client, pid };
    // Ready when a Put succeeds (bounded: 30 s).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{client}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut grpc = tonic::client::Grpc::new(ch);
            grpc.ready().await.ok()?;
            let codec: tonic_prost::ProstCodec<PutRequest, PutResponse> =
                tonic_prost::ProstCodec::default();
            grpc.unary(
                Request::new(PutRequest {
                    key: b"ready".to_vec(),
                    value: b"1".to_vec(),
                }),
                http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put"),
                codec,
            )
            .await
            .ok()
        };
        if ready.await.is_some() {
            break;
        }
        if Instant::now() > until {
            println!("etcd: skipped (not ready within 30 s)");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{version}: one member, Put of a 256-byte value");
    Some((etcd, target))
}

/// The disk's part of the floor: `write` of 256 bytes then `fdatasync`,
/// one after another on one file in the bench's directory (where the
/// controllers keep their stores), for `secs`; p50 and p99 in µs. A submit
/// that is durable before it answers pays at least one of these.
fn raw_fdatasync(dir: &std::path::Path, secs: f64) -> (f64, f64) {
    use std::io::Write;
    let path = dir.join("fdatasync-floor.bin");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("fdatasync floor file");
    let payload = [7u8; 256];
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        let t = Instant::now();
        file.write_all(&payload).expect("write");
        file.sync_data().expect("fdatasync");
        lat.push(t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    (pct(0.50), pct(0.99))
}

/// min–max over the rounds.
fn range(values: &[f64], digits: usize) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.digits$}–{hi:.digits$}")
}

fn summary(name: &str, rounds: &[Figures]) {
    let get = |f: fn(&Figures) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    println!(
        "{name:<34} {:>13} calls/s  p50 {:>11} µs  p99 {:>11} µs  server cpu {:>9} µs/call",
        range(&get(|f| f.calls_per_sec), 0),
        range(&get(|f| f.p50_us), 0),
        range(&get(|f| f.p99_us), 0),
        range(&get(|f| f.cpu_us), 0),
    );
}

/// `a / b` per round, as a min–max range.
fn ratio(a: &[Figures], b: &[Figures], f: fn(&Figures) -> f64) -> String {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
    range(&r, 2)
}

fn federation_exe() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target layout");
    dir.join("federation")
}

async fn failure_detection() {
    let exe = federation_exe();
    if !exe.exists() {
        println!(
            "failure detection: skipped ({} not built; run `cargo build --release -p federation` first)",
            exe.display()
        );
        return;
    }
    // Default timers: the sandbox's fast test timers are overridden back.
    let defaults = Timers::default();
    let mut sandbox = SandboxBuilder::new(&exe, SEED)
        .env(
            "FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL",
            &format!("{}ms", defaults.heartbeat_interval.as_millis()),
        )
        .env(
            "FEDERATION__NODE__TIMERS__DEAD_AFTER",
            &format!("{}ms", defaults.dead_after.as_millis()),
        )
        .agents(0, 1)
        .start_formed(Duration::from_secs(30))
        .await
        .expect("sandbox forms");

    // False suspicion while both cores are busy: 10 s of two spinning threads.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let mut admin = sandbox.admin("north_america").await.expect("admin");
    let busy_until = Instant::now() + Duration::from_secs(10);
    let (mut polls, mut suspicions) = (0, 0);
    while Instant::now() < busy_until {
        if let Ok(s) = admin
            .federation_status(api::FederationStatusRequest {})
            .await
        {
            polls += 1;
            suspicions += s
                .into_inner()
                .regions
                .iter()
                .filter(|r| r.state == "suspect" || r.state == "dead")
                .count();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    println!(
        "false suspicions with both cores busy for 10 s: {suspicions} in {polls} status polls"
    );

    let mut times = Vec::new();
    for round in 0..3 {
        let victim = if round % 2 == 0 {
            "europe"
        } else {
            "asia_pacific"
        };
        sandbox
            .wait_formed(Duration::from_secs(30))
            .await
            .expect("all alive");
        // Kill at a random point of the heartbeat cycle.
        tokio::time::sleep(Duration::from_millis(137 * (round as u64 + 1))).await;
        sandbox.kill_controller(victim).expect("kill");
        let killed = Instant::now();
        loop {
            if let Ok(s) = admin
                .federation_status(api::FederationStatusRequest {})
                .await
            {
                if s.into_inner()
                    .regions
                    .iter()
                    .any(|r| r.region == victim && r.state == "dead")
                {
                    break;
                }
            }
            if killed.elapsed() > Duration::from_secs(30) {
                panic!("{victim} never declared dead");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = killed.elapsed();
        times.push(t);
        sandbox.start_controller(victim).expect("restart");
    }
    let max = times.iter().max().copied().unwrap_or_default();
    println!(
        "failure detection after SIGKILL (heartbeat {:?}, dead_after {:?}): {:?} (max {:.2} s; target <= 3 s: {})",
        defaults.heartbeat_interval,
        defaults.dead_after,
        times
            .iter()
            .map(|t| format!("{:.2}s", t.as_secs_f64()))
            .collect::<Vec<_>>(),
        max.as_secs_f64(),
        if max <= Duration::from_secs(3) {
            "met"
        } else {
            "NOT met"
        }
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("RUNTIME_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("RUNTIME_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // The servers (echoes, controllers) on a runtime of their own, so their
    // CPU is told apart from the client's.
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-server")
        .build()
        .expect("server runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()
        .expect("client runtime");
    let handle = server.handle().clone();
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let echo = serve(&handle, Echo).await;
        let durable_echo =
            serve(&handle, DurableEcho::new(dir.path().join("durable-echo.bin"))).await;
        let relay_echo = serve(
            &handle,
            RelayEcho {
                owner: api::federation_client_client::FederationClientClient::new(
                    tonic::transport::Endpoint::from_shared(format!("http://{durable_echo}"))
                        .expect("endpoint")
                        .tcp_nodelay(true)
                        .connect_lazy(),
                ),
            },
        )
        .await;
        let na = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let eu = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (na_addr, eu_addr) = (
            na.local_addr().expect("addr"),
            eu.local_addr().expect("addr"),
        );
        controller(&handle, "north_america", na, &[("europe", eu_addr)], dir.path());
        controller(&handle, "europe", eu, &[("north_america", na_addr)], dir.path());
        // Let advertisements flow so europe is alive for north_america.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let submit = |addr, customer| Target::Submit { addr, customer };

        // `RUNTIME_BENCH_PROFILE=local|forwarded|echo|…`: run only that
        // measurement (at `RUNTIME_BENCH_IN_FLIGHT`, default 64) for `perf
        // record`, then stop.
        if let Ok(what) = std::env::var("RUNTIME_BENCH_PROFILE") {
            let (addr, customer) = match what.as_str() {
                "echo" => (echo, "US"),
                "durable-echo" => (durable_echo, "US"),
                "relay-echo" => (relay_echo, "US"),
                "forwarded" => (na_addr, "DE"),
                _ => (na_addr, "US"),
            };
            let in_flight = std::env::var("RUNTIME_BENCH_IN_FLIGHT")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(64);
            let f = measure(&submit(addr, customer), in_flight, secs).await;
            summary(&format!("{what} (profile run, {in_flight} in flight)"), &[f]);
            return;
        }
        println!(
            "runtime benchmark: 256-byte payload, loopback, {secs} s per measurement, {rounds} rounds interleaved"
        );
        let pg = start_postgres().await;
        let etcd = start_etcd().await;
        let mut targets: Vec<(&str, Target)> = vec![
            ("raw tonic echo (no disk)", submit(echo, "US")),
            ("durable echo (fdatasync, floor)", submit(durable_echo, "US")),
            ("relayed durable echo (floor)", submit(relay_echo, "US")),
            ("local submit (durable)", submit(na_addr, "US")),
            ("forwarded submit (na -> eu)", submit(na_addr, "DE")),
        ];
        if let Some((_, t)) = &pg {
            targets.push(("postgresql INSERT (sync commit)", t.clone()));
        }
        if let Some((_, t)) = &etcd {
            targets.push(("etcd Put", t.clone()));
        }
        let names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
        let idx = |name: &str| names.iter().position(|n| *n == name);
        for in_flight in [1usize, 64] {
            let mut figures = vec![Vec::new(); targets.len()];
            // The raw fdatasync of the floor, once per round at 1 in flight.
            let mut syncs: Vec<(f64, f64)> = Vec::new();
            for _ in 0..rounds {
                for (i, (_, t)) in targets.iter().enumerate() {
                    figures[i].push(measure(t, in_flight, secs).await);
                }
                if in_flight == 1 {
                    let dir = dir.path().to_path_buf();
                    syncs.push(
                        tokio::task::spawn_blocking(move || raw_fdatasync(&dir, secs))
                            .await
                            .expect("fdatasync floor"),
                    );
                }
            }
            println!("-- {in_flight} in flight (min–max over {rounds} rounds)");
            for (i, name) in names.iter().enumerate() {
                summary(name, &figures[i]);
            }
            let echo_f = &figures[idx("raw tonic echo (no disk)").expect("echo")];
            if in_flight == 1 {
                let p50s: Vec<f64> = syncs.iter().map(|s| s.0).collect();
                let p99s: Vec<f64> = syncs.iter().map(|s| s.1).collect();
                println!(
                    "{:<34} {:>13}          p50 {:>11} µs  p99 {:>11} µs",
                    "raw fdatasync (256-byte write)",
                    "",
                    range(&p50s, 0),
                    range(&p99s, 0),
                );
                // The floor of a durable submit: the echo's round trip plus
                // one fdatasync, per round.
                let floor: Vec<f64> = echo_f.iter().zip(&p50s).map(|(e, s)| e.p50_us + s).collect();
                let local = &figures[idx("local submit (durable)").expect("local")];
                let over: Vec<f64> = local.iter().zip(&floor).map(|(l, f)| l.p50_us / f).collect();
                println!(
                    "{:<34} floor (echo p50 + fdatasync p50) {} µs; local p50 / floor = {}x",
                    "",
                    range(&floor, 0),
                    range(&over, 2),
                );
                if let Some(p) = idx("postgresql INSERT (sync commit)") {
                    let target: Vec<f64> = figures[p].iter().map(|f| 1.5 * f.p50_us).collect();
                    let below = target.iter().zip(&floor).filter(|(t, f)| t < f).count();
                    println!(
                        "{:<34} 1.5x postgresql p50 = {} µs: below the floor in {below} of {rounds} rounds",
                        "",
                        range(&target, 0),
                    );
                }
            } else {
                let mut best = vec![0.0f64; rounds];
                for peer in ["postgresql INSERT (sync commit)", "etcd Put"] {
                    if let Some(p) = idx(peer) {
                        for (b, f) in best.iter_mut().zip(&figures[p]) {
                            *b = b.max(f.calls_per_sec);
                        }
                    }
                }
                if best.iter().any(|b| *b > 0.0) {
                    let target: Vec<f64> = best.iter().map(|b| 1.5 * b).collect();
                    let above = target
                        .iter()
                        .zip(echo_f)
                        .filter(|(t, e)| **t > e.calls_per_sec)
                        .count();
                    println!(
                        "{:<34} 1.5x the faster of postgresql/etcd = {} calls/s; the echo (no disk) reaches {}: the target is above the echo in {above} of {rounds} rounds",
                        "",
                        range(&target, 0),
                        range(&echo_f.iter().map(|f| f.calls_per_sec).collect::<Vec<_>>(), 0),
                    );
                }
            }
            let local = &figures[idx("local submit (durable)").expect("local")];
            let forwarded = &figures[idx("forwarded submit (na -> eu)").expect("forwarded")];
            println!(
                "{:<34} forwarded p50 / local p50 = {}x (target <= 1.5x)",
                "",
                ratio(forwarded, local, |f| f.p50_us)
            );
            for peer in ["postgresql INSERT (sync commit)", "etcd Put"] {
                let Some(p) = idx(peer) else { continue };
                let p = &figures[p];
                let short = peer.split(' ').next().unwrap_or(peer);
                if in_flight == 1 {
                    println!(
                        "{:<34} local / {short}: p50 {}x, server cpu {}x{}",
                        "",
                        ratio(local, p, |f| f.p50_us),
                        ratio(local, p, |f| f.cpu_us),
                        if short == "postgresql" {
                            " (targets: p50 <= 1.5x, cpu <= 2x)"
                        } else {
                            ""
                        },
                    );
                } else {
                    println!(
                        "{:<34} local / {short}: calls/s {}x (target >= 1.5x), p99 {}x (target < 1x)",
                        "",
                        ratio(local, p, |f| f.calls_per_sec),
                        ratio(local, p, |f| f.p99_us),
                    );
                }
            }
        }
        drop(etcd);
        drop(pg);
        failure_detection().await;
    });
    drop(server);
}
