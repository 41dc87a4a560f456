//! The PostgreSQL backend end to end: `SubmitTask` through controllers whose
//! region's store is a PostgreSQL database, against what a platform team
//! would build instead — a raw `INSERT` of a row of the same size into a
//! task table, with `tokio-postgres`, into the same server — measured in the
//! same run, interleaved round after round:
//!
//! 1. one controller (one replica) on its own database;
//! 2. three replicas of one region on one database, the client's calls
//!    spread over the three (each replica commits through its own writer);
//! 3. the raw INSERT (`synchronous_commit = on`, one statement per
//!    transaction, one connection per call in flight).
//!
//! Each at 1 and at 64 calls in flight: calls/s, p50 and p99, and what a
//! call costs: CPU of this process (client and controllers) and of the
//! server's processes per call, and calls per write transaction of the
//! server (the server's transaction ids used: how many submits a writer
//! batch carries). The target: at 64 in flight at least 0.7x the
//! raw INSERT rate.
//!
//! Run: `cargo bench -p federation --bench postgres` (release build).
//! `PG_BENCH_SECS` sets the seconds per measurement (default 3),
//! `PG_BENCH_ROUNDS` the rounds (default 3), `PG_BENCH_WRITER_TRANSACTIONS`
//! the controllers' `node.store.writer_transactions` (default 1, one
//! transaction at a time; 4 overlaps batches of submits). `PG_BENCH_PROBE=N` instead
//! makes N serial submits through each federation with the server logging
//! every statement, and prints what one submit costs the server (commits,
//! WAL flushes, statement steps; `PG_BENCH_PROBE_LOG=path` keeps the log
//! lines). `PG_BENCH_ONLY=N` runs only the one-replica federation at N in
//! flight for `PG_BENCH_SECS` (for a profiler; `PG_BENCH_ONLY_REPLICAS=3`
//! the three replicas'). `PG_BENCH_URL_OPTIONS` puts session settings in
//! the controllers' URL (`options`, e.g. `-c plan_cache_mode=auto`). Needs PostgreSQL from Debian's
//! packages (`/usr/lib/postgresql/*/bin`, or `FEDERATION_PG_BIN`); without
//! it the bench says so and exits 0.

use std::net::SocketAddr;

/// The controller binary's allocator (`src/main.rs`), so the in-process
/// controllers run as `federation serve` does (with glibc's malloc, malloc
/// and free were a quarter of the controller's CPU at 64 in flight).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use federation::config::StoreBackend;
use federation::controller::Settings;
use federation_api as api;
use federation_sandbox::pg::PgServer;
use federation_sandbox::string_attrs;
use tokio::net::TcpListener;

const SEED: &str = include_str!("../../policies/seed-federation.yaml");
const PAYLOAD: usize = 256;

#[derive(Clone, Copy, Default)]
struct Figures {
    calls_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU of this process (client, controllers) per call, µs.
    bench_cpu_us: f64,
    /// CPU of the PostgreSQL server's processes per call, µs.
    server_cpu_us: f64,
    /// Calls per write transaction of the server (any database): how many
    /// submits a writer batch carries.
    calls_per_xact: f64,
}

/// CPU time of this process, and of the server's processes, and the
/// server's next transaction id: read before and after a measurement.
#[derive(Clone, Copy)]
struct Cost {
    bench: Duration,
    server: Duration,
    next_xid: i64,
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 when it
/// cannot say).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// Fields of `/proc/<pid>/stat` from ppid on (the fields after the last
/// `)`, state skipped): ppid at 0, then utime at 10, stime 11, cutime 12,
/// cstime 13.
fn stat_fields(path: &std::path::Path) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.len() >= 14).then_some(f)
}

/// This process's CPU time (user + system, all threads).
fn self_cpu(hz: u64) -> Duration {
    let ticks = stat_fields(std::path::Path::new("/proc/self/stat")).map_or(0, |f| f[10] + f[11]);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// CPU time of the postmaster `main` and its children (live ones, plus
/// those it reaped), from `/proc`.
fn server_cpu(main: u32, hz: u64) -> Duration {
    let mut ticks = 0u64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(f) = stat_fields(&entry.path().join("stat")) else {
            continue;
        };
        if pid == main {
            ticks += f[10] + f[11] + f[12] + f[13];
        } else if f[0] == u64::from(main) {
            ticks += f[10] + f[11];
        }
    }
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// What measuring costs are read from: the server's pid and a connection.
struct Meter {
    postmaster: u32,
    hz: u64,
    conn: tokio_postgres::Client,
}

impl Meter {
    async fn read(&self) -> Cost {
        let next_xid = self
            .conn
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0);
        Cost {
            bench: self_cpu(self.hz),
            server: server_cpu(self.postmaster, self.hz),
            next_xid,
        }
    }

    /// Runs `measure` and adds its costs per call to its figures.
    async fn measured(&self, measure: impl std::future::Future<Output = Figures>) -> Figures {
        let before = self.read().await;
        let started = Instant::now();
        let mut f = measure.await;
        let elapsed = started.elapsed().as_secs_f64();
        let after = self.read().await;
        let calls = f.calls_per_sec * elapsed;
        if calls > 0.0 {
            f.bench_cpu_us = (after.bench - before.bench).as_secs_f64() * 1e6 / calls;
            f.server_cpu_us = (after.server - before.server).as_secs_f64() * 1e6 / calls;
            let xacts = (after.next_xid - before.next_xid).max(1) as f64;
            f.calls_per_xact = calls / xacts;
        }
        f
    }
}

fn figures(mut lat: Vec<Duration>, elapsed: f64) -> Figures {
    if lat.is_empty() {
        return Figures::default();
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    Figures {
        calls_per_sec: lat.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        ..Figures::default()
    }
}

/// Starts one controller of europe on `url` as replica `replica`.
async fn replica(url: &str, replica: &str, dir: &std::path::Path) -> SocketAddr {
    std::fs::create_dir_all(dir).expect("bench directory");
    let config = dir.join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy file");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut settings =
        Settings::for_test("europe", &config, &dir.join(replica), addr).expect("settings");
    settings.store.backend = StoreBackend::Postgres;
    // PG_BENCH_URL_OPTIONS: session settings in the URL's `options` (e.g.
    // `-c plan_cache_mode=auto`), to compare plans without a rebuild.
    settings.store.url = Some(match std::env::var("PG_BENCH_URL_OPTIONS") {
        Ok(o) => format!(
            "{url}?options={}",
            o.replace(' ', "%20").replace('=', "%3D")
        ),
        Err(_) => url.to_string(),
    });
    settings.replica = replica.to_string();
    if let Some(n) = std::env::var("PG_BENCH_WRITER_TRANSACTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        settings.store.writer_transactions = n;
    }
    tokio::spawn(async move {
        if let Err(e) = federation::runtime::run(settings, listener, std::future::pending()).await {
            eprintln!("controller failed: {e:#}");
            std::process::exit(1);
        }
    });
    addr
}

type Client = api::federation_client_client::FederationClientClient<tonic::transport::Channel>;

async fn client(addr: SocketAddr) -> Client {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let connected = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await;
        match connected {
            Ok(channel) => return Client::new(channel),
            Err(e) if Instant::now() > until => panic!("controller at {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn submit(key: String) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", "DE")]),
        payload: vec![7u8; PAYLOAD],
        idempotency_key: key,
        ..Default::default()
    }
}

/// Submits until the controllers answer (they elect, migrate, warm up).
async fn warm(clients: &[Client], tag: &str) {
    for (i, c) in clients.iter().enumerate() {
        let until = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        while n < 100 {
            match c
                .clone()
                .submit_task(submit(format!("warm-{tag}-{i}-{n}")))
                .await
            {
                Ok(_) => n += 1,
                Err(e) if Instant::now() > until => panic!("warm-up of {tag}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

static KEY: AtomicU64 = AtomicU64::new(0);

/// `in_flight` workers submitting for `secs`, worker `w` through
/// `clients[w % len]`.
async fn federation(clients: &[Client], in_flight: usize, secs: f64) -> Figures {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|w| {
            let mut c = clients[w % clients.len()].clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let key = format!("b-{}", KEY.fetch_add(1, Ordering::Relaxed));
                    let t = Instant::now();
                    c.submit_task(submit(key)).await.expect("submit");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    figures(all, started.elapsed().as_secs_f64())
}

/// The baseline table: the task table's shape and indexes, one row per task.
const RAW_SCHEMA: &str = "CREATE TABLE raw_tasks (
    region text NOT NULL,
    task_id text NOT NULL,
    state smallint NOT NULL,
    priority integer NOT NULL,
    created_ms bigint NOT NULL,
    lease_deadline_ms bigint NOT NULL,
    agent_id text NOT NULL,
    idempotency_key text,
    body bytea NOT NULL,
    PRIMARY KEY (region, task_id)
);
CREATE UNIQUE INDEX raw_idempotency ON raw_tasks (region, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX raw_queue ON raw_tasks (region, priority DESC, created_ms, task_id);";

struct Raw {
    conns: Vec<Arc<tokio_postgres::Client>>,
    body: Vec<u8>,
}

impl Raw {
    async fn connect(url: &str, n: usize, body_len: usize) -> Self {
        let mut conns = Vec::new();
        for _ in 0..n {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("raw connection");
            tokio::spawn(conn);
            c.batch_execute("SET synchronous_commit = on")
                .await
                .expect("synchronous_commit");
            conns.push(Arc::new(c));
        }
        Self {
            conns,
            body: vec![7u8; body_len],
        }
    }

    async fn run(&self, in_flight: usize, secs: f64) -> Figures {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        let workers: Vec<_> = (0..in_flight)
            .map(|w| {
                let c = self.conns[w].clone();
                let body = self.body.clone();
                tokio::spawn(async move {
                    let stmt = c
                        .prepare(
                            "INSERT INTO raw_tasks (region, task_id, state, priority, created_ms, \
                             lease_deadline_ms, agent_id, idempotency_key, body) \
                             VALUES ('europe', $1, 0, 0, $2, 0, '', $3, $4)",
                        )
                        .await
                        .expect("prepare");
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let n = KEY.fetch_add(1, Ordering::Relaxed);
                        let id = format!("raw-{n}");
                        let key = format!("rk-{n}");
                        let t = Instant::now();
                        c.execute(&stmt, &[&id, &(n as i64), &key, &body])
                            .await
                            .expect("insert");
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("worker"));
        }
        figures(all, started.elapsed().as_secs_f64())
    }
}

/// The average stored size of a task's row on `url` (what the raw rows match).
async fn task_body_len(url: &str) -> usize {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let row = c
        .query_one(
            "SELECT coalesce(avg(octet_length(body)), 0)::float8 FROM tasks",
            &[],
        )
        .await
        .expect("row size");
    row.get::<_, f64>(0).round() as usize
}

/// `PG_BENCH_PROBE=N`: what N serial submits through `client` cost the
/// server (transactions, WAL flushes, statements as its log shows them).
async fn stats(c: &tokio_postgres::Client, db: String) -> (f64, f64) {
    let x = c
        .query_one(
            "SELECT xact_commit::float8, (SELECT wal_sync::float8 FROM pg_stat_wal) FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await
        .expect("stats");
    (x.get::<_, f64>(0), x.get::<_, f64>(1))
}

async fn probe(pg: &PgServer, url: &str, client: &Client, n: usize) {
    let db = url.rsplit('/').next().unwrap_or("").to_string();
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .ok();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = stats(&c, db.clone()).await;
    let log_from = pg.log_text().len();
    for sql in [
        "ALTER SYSTEM SET log_min_duration_statement = 0",
        "ALTER SYSTEM SET log_line_prefix = '%m %d [%p] '",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.expect("log on");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    for i in 0..n {
        client
            .clone()
            .submit_task(submit(format!(
                "probe-{}",
                KEY.fetch_add(1, Ordering::Relaxed) + i as u64
            )))
            .await
            .expect("submit");
    }
    let took = t.elapsed();
    for sql in [
        "ALTER SYSTEM RESET log_min_duration_statement",
        "ALTER SYSTEM RESET log_line_prefix",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.expect("log off");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .ok();
    let after = stats(&c, db.clone()).await;
    let log = pg.log_text();
    let lines: Vec<&str> = log[log_from.min(log.len())..]
        .lines()
        .filter(|l| l.contains(&format!(" {db} ")))
        .collect();
    println!(
        "probe: {n} serial submits in {took:?} ({:?} each): {:.1} commits and {:.1} WAL flushes of the server per submit, {:.1} logged statement steps of {db} per submit",
        took / n as u32,
        (after.0 - before.0) / n as f64,
        (after.1 - before.1) / n as f64,
        lines.len() as f64 / n as f64
    );
    if let Ok(path) = std::env::var("PG_BENCH_PROBE_LOG") {
        std::fs::write(format!("{path}.{db}"), lines.join("\n")).expect("probe log");
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: f64 = std::env::var("PG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("PG_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if federation_sandbox::pg::bin_dir().is_none() {
        println!(
            "postgres bench: skipped (PostgreSQL is not installed: apt-get install postgresql)"
        );
        return;
    }
    let pg = PgServer::start().expect("postgres starts");
    println!("PostgreSQL {} on 127.0.0.1:{}", pg.version(), pg.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let one_url = pg.create_database("one").expect("database");
    let three_url = pg.create_database("three").expect("database");
    let raw_url = pg.create_database("raw").expect("database");

    let one = vec![client(replica(&one_url, "eu-1", &dir.path().join("one")).await).await];
    let mut three = Vec::new();
    for r in ["eu-1", "eu-2", "eu-3"] {
        three.push(client(replica(&three_url, r, &dir.path().join("three")).await).await);
    }
    warm(&one, "one").await;
    warm(&three, "three").await;
    if let Some(n) = std::env::var("PG_BENCH_PROBE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        probe(&pg, &one_url, &one[0], n).await;
        probe(&pg, &three_url, &three[0], n).await;
        return;
    }
    if let Some(n) = std::env::var("PG_BENCH_ONLY")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        // For a profiler: only the one-replica federation at `n` in flight
        // (the three replicas' with PG_BENCH_ONLY_REPLICAS=3).
        let replicas =
            std::env::var("PG_BENCH_ONLY_REPLICAS").map_or(1, |s| s.parse().unwrap_or(1));
        let (clients, url) = if replicas == 3 {
            (&three, &three_url)
        } else {
            (&one, &one_url)
        };
        let f = federation(clients, n, secs).await;
        if std::env::var("FEDERATION_PG_SETTINGS").is_ok_and(|s| s.contains("pg_stat_statements")) {
            let db = url.rsplit('/').next().unwrap_or("one").to_string();
            let _ = pg.execute(&db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
            let (c, io) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("statements connection");
            tokio::spawn(io);
            let rows = c
                .query(
                    "SELECT calls, total_exec_time, total_plan_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
                     FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 15",
                    &[],
                )
                .await
                .expect("pg_stat_statements");
            println!("calls  exec ms  plan ms  rows  statement");
            for r in rows {
                let (calls, exec, plan, n, q): (i64, f64, f64, i64, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                println!("{calls:>6} {exec:>8.0} {plan:>8.0} {n:>6}  {q}");
            }
        }
        println!(
            "SubmitTask, {replicas} replica(s), {n} in flight: {:.0} calls/s, p50 {:.0} µs, p99 {:.0} µs",
            f.calls_per_sec, f.p50_us, f.p99_us
        );
        return;
    }
    let body_len = task_body_len(&one_url).await;
    let raw_db = raw_url.rsplit('/').next().unwrap_or("raw").to_string();
    pg.execute(&raw_db, RAW_SCHEMA).expect("raw schema");
    let raw = Raw::connect(&raw_url, 64, body_len).await;
    let meter = {
        let (conn, io) = tokio_postgres::connect(&raw_url, tokio_postgres::NoTls)
            .await
            .expect("meter connection");
        tokio::spawn(io);
        Meter {
            postmaster: pg.postmaster_pid().expect("postmaster pid"),
            hz: clock_ticks(),
            conn,
        }
    };
    println!(
        "task row body {body_len} B (the raw rows carry the same); {rounds} rounds of {secs} s per measurement, interleaved"
    );
    // Both federations run (idle but for their timers: replica refresh,
    // leadership, listeners, the store's health probe) through every
    // measurement, and the CPU figures per call include that: what it
    // costs per second, to weigh the figures at 1 in flight (few calls).
    {
        let before = meter.read().await;
        let idle = Duration::from_secs(2);
        tokio::time::sleep(idle).await;
        let after = meter.read().await;
        let per_sec = |d: Duration| d.as_secs_f64() * 1e3 / idle.as_secs_f64();
        println!(
            "idle (no calls, both federations running): {:.1} ms CPU per second in this process, {:.1} ms per second in the server",
            per_sec(after.bench.saturating_sub(before.bench)),
            per_sec(after.server.saturating_sub(before.server))
        );
    }

    for in_flight in [1usize, 64] {
        let mut rows: [Vec<Figures>; 3] = Default::default();
        for _ in 0..rounds {
            rows[0].push(meter.measured(raw.run(in_flight, secs)).await);
            rows[1].push(meter.measured(federation(&one, in_flight, secs)).await);
            rows[2].push(meter.measured(federation(&three, in_flight, secs)).await);
        }
        let med = |f: &[Figures]| Figures {
            calls_per_sec: median(f.iter().map(|x| x.calls_per_sec).collect()),
            p50_us: median(f.iter().map(|x| x.p50_us).collect()),
            p99_us: median(f.iter().map(|x| x.p99_us).collect()),
            bench_cpu_us: median(f.iter().map(|x| x.bench_cpu_us).collect()),
            server_cpu_us: median(f.iter().map(|x| x.server_cpu_us).collect()),
            calls_per_xact: median(f.iter().map(|x| x.calls_per_xact).collect()),
        };
        let base = med(&rows[0]);
        println!("{in_flight} in flight (median of {rounds} rounds):");
        for (name, f) in [
            ("raw INSERT (tokio-postgres)", &rows[0]),
            ("SubmitTask, 1 replica", &rows[1]),
            ("SubmitTask, 3 replicas, 1 db", &rows[2]),
        ] {
            let m = med(f);
            let range = |g: fn(&Figures) -> f64| {
                let v: Vec<f64> = f.iter().map(g).collect();
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                format!("{lo:.0}–{hi:.0}")
            };
            println!(
                "  {name:<30} {:>7.0} calls/s ({:.2}x raw; rounds {})  p50 {:>6.0} µs ({:.2}x)  p99 {:>6.0} µs ({:.2}x)",
                m.calls_per_sec,
                m.calls_per_sec / base.calls_per_sec,
                range(|x| x.calls_per_sec),
                m.p50_us,
                m.p50_us / base.p50_us,
                m.p99_us,
                m.p99_us / base.p99_us,
            );
            println!(
                "  {:<30} CPU per call: {:>5.0} µs this process, {:>5.0} µs server; {:.1} calls per write transaction",
                "", m.bench_cpu_us, m.server_cpu_us, m.calls_per_xact,
            );
        }
        if in_flight == 64 {
            let best = med(&rows[1]).calls_per_sec.min(med(&rows[2]).calls_per_sec);
            let ratio = best / base.calls_per_sec;
            println!(
                "SubmitTask at 64 in flight / raw INSERT = {ratio:.2}x (the lower of 1 and 3 replicas; target >= 0.7x: {})",
                if ratio >= 0.7 { "met" } else { "NOT met" }
            );
        }
    }
}
