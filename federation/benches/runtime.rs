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

async fn serve<S>(service: S) -> std::net::SocketAddr
where
    S: api::federation_client_server::FederationClient,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
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

async fn controller(
    region: &str,
    listener: TcpListener,
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
    tokio::spawn(async move {
        federation::runtime::run(settings, listener, std::future::pending())
            .await
            .expect("controller runs");
    });
}

struct Figures {
    cpu_us: f64,
    calls_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn measure(
    addr: std::net::SocketAddr,
    customer: &str,
    in_flight: usize,
    secs: f64,
) -> Figures {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect");
    let client = api::federation_client_client::FederationClientClient::new(channel);
    let payload = vec![7u8; 256];
    // Warm up.
    for i in 0..200 {
        let mut c = client.clone();
        let _ = c
            .submit_task(req(
                customer,
                &payload,
                &format!("warm-{customer}-{in_flight}-{i}"),
            ))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    let started = Instant::now();
    let cpu0 = cpu_time();
    for w in 0..in_flight {
        let mut c = client.clone();
        let payload = payload.clone();
        let customer = customer.to_string();
        let counter = counter.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let t = Instant::now();
                c.submit_task(req(
                    &customer,
                    &payload,
                    &format!("k{in_flight}-{w}-{i}-{n}"),
                ))
                .await
                .expect("submit");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu0;
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

fn cpu_time() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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

fn req(customer: &str, payload: &[u8], key: &str) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", customer)]),
        payload: payload.to_vec(),
        idempotency_key: key.to_string(),
        priority: 0,
        ..Default::default()
    }
}

fn line(name: &str, f: &Figures, base: &Figures) {
    println!(
        "{name:<34} {:>9.0} calls/s ({:>5.2}x echo)  p50 {:>7.0} µs ({:>5.2}x)  p99 {:>7.0} µs ({:>5.2}x)  cpu {:>5.1} µs/call",
        f.calls_per_sec,
        f.calls_per_sec / base.calls_per_sec,
        f.p50_us,
        f.p50_us / base.p50_us,
        f.p99_us,
        f.p99_us / base.p99_us,
        f.cpu_us
    );
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
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let echo = serve(Echo).await;
        let durable_echo = serve(DurableEcho::new(dir.path().join("durable-echo.bin"))).await;
        let relay_echo = serve(RelayEcho {
            owner: api::federation_client_client::FederationClientClient::new(
                tonic::transport::Endpoint::from_shared(format!("http://{durable_echo}"))
                    .expect("endpoint")
                    .tcp_nodelay(true)
                    .connect_lazy(),
            ),
        })
        .await;
        let na = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let eu = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (na_addr, eu_addr) = (
            na.local_addr().expect("addr"),
            eu.local_addr().expect("addr"),
        );
        controller("north_america", na, &[("europe", eu_addr)], dir.path()).await;
        controller("europe", eu, &[("north_america", na_addr)], dir.path()).await;
        // Let advertisements flow so europe is alive for north_america.
        tokio::time::sleep(Duration::from_secs(3)).await;

        // `RUNTIME_BENCH_PROFILE=local|forwarded|echo`: run only that
        // measurement at 64 in flight (for `perf record`), then stop.
        if let Ok(what) = std::env::var("RUNTIME_BENCH_PROFILE") {
            let (addr, customer) = match what.as_str() {
                "echo" => (echo, "US"),
                "durable-echo" => (durable_echo, "US"),
                "relay-echo" => (relay_echo, "US"),
                "forwarded" => (na_addr, "DE"),
                _ => (na_addr, "US"),
            };
            let f = measure(addr, customer, 64, secs).await;
            line(&format!("{what} (profile run)"), &f, &f);
            return;
        }
        println!("runtime benchmark: 256-byte payload, loopback, {secs} s per measurement");
        for in_flight in [1usize, 64] {
            let base = measure(echo, "US", in_flight, secs).await;
            let durable = measure(durable_echo, "US", in_flight, secs).await;
            let relayed = measure(relay_echo, "US", in_flight, secs).await;
            let local = measure(na_addr, "US", in_flight, secs).await;
            let forwarded = measure(na_addr, "DE", in_flight, secs).await;
            println!("-- {in_flight} in flight");
            line("raw tonic echo (baseline)", &base, &base);
            line("durable echo (fdatasync, floor)", &durable, &base);
            line("relayed durable echo (floor)", &relayed, &base);
            line("local submit (durable)", &local, &base);
            line("forwarded submit (na -> eu)", &forwarded, &base);
            println!(
                "{:<34} forwarded p50 / local p50 = {:.2}x",
                "",
                forwarded.p50_us / local.p50_us
            );
            // The targets, and where the floors put them on this machine.
            let verdict = |met: bool| if met { "met" } else { "NOT met" };
            let local_ratio = local.calls_per_sec / base.calls_per_sec;
            let forwarded_ratio = forwarded.p50_us / base.p50_us;
            println!(
                "{:<34} local throughput {:.2}x echo (target >= 0.8x: {}; the durable floor reaches {:.2}x, local is {:.2}x of it)",
                "",
                local_ratio,
                verdict(local_ratio >= 0.8),
                durable.calls_per_sec / base.calls_per_sec,
                local.calls_per_sec / durable.calls_per_sec,
            );
            println!(
                "{:<34} forwarded p50 {:.2}x echo (target <= 2.2x: {}; the relayed floor is {:.2}x, forwarded is {:.2}x of it)",
                "",
                forwarded_ratio,
                verdict(forwarded_ratio <= 2.2),
                relayed.p50_us / base.p50_us,
                forwarded.p50_us / relayed.p50_us,
            );
        }
        failure_detection().await;
    });
}
