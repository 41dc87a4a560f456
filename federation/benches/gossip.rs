//! Gossip at scale: federations of 10, 25 and 50 controllers on loopback,
//! default timers, each controller an in-process server on its own real
//! socket with its own single-threaded tokio runtime (and its own blocking
//! pool), so its CPU is the CPU of its threads.
//!
//! For each size it prints, over a steady window once every controller sees
//! every other alive:
//! - bytes of Advertise messages sent per controller per second (encoded
//!   protobuf, counted at the sender by `federation_gossip_sent_bytes`);
//! - CPU per controller (mean and max over controllers, % of one core;
//!   and the whole process's, bench threads included);
//! - false suspicions: (observer, region) pairs that went from alive to
//!   suspect or dead while nothing failed;
//!
//! then stops one controller abruptly (its runtime is dropped: every task and
//! socket gone at once, no goodbye, as after SIGKILL) and prints how long the
//! others took to see it suspect (and dead), and the false suspicions of the
//! live ones meanwhile.
//!
//! Run: `cargo bench -p federation --bench gossip` (release build; about
//! two minutes). `GOSSIP_BENCH_SECS` sets the steady window (default 10),
//! `GOSSIP_BENCH_SIZES` the sizes (default `10,25,50`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use federation::config::Timers;
use federation::controller::{self, Node, Settings};
use federation::policy::Health;

fn policy_yaml(n: usize) -> String {
    let mut s = String::from("federation:\n  name: \"Gossip bench\"\n  regions:\n");
    for i in 0..n {
        s.push_str(&format!(
            "    - name: \"{}\"\n      endpoint: \"https://r{i}.example.com\"\n      priority: {}\n      compliance: [\"SOX\", \"GDPR\"]\n",
            name(i),
            i + 1
        ));
    }
    s.push_str(&format!(
        "  routing_rules:\n    - condition: \"customer_region == 'US'\"\n      primary_region: \"{}\"\n      backup_region: \"{}\"\n",
        name(0),
        name(1)
    ));
    s
}

fn name(i: usize) -> String {
    format!("region_{i:02}")
}

/// One controller on its own thread and runtime.
struct Running {
    node: Arc<Node>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Drops the controller's runtime: every task and socket at once.
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

fn start(
    i: usize,
    listener: std::net::TcpListener,
    peers: BTreeMap<String, String>,
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Running {
    let addr = listener.local_addr().expect("addr");
    let mut settings =
        Settings::for_test(&name(i), config, &dir.join(name(i)), addr).expect("settings");
    settings.peers = peers;
    let (node_tx, node_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("c{i}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("c{i}"))
                .build()
                .expect("runtime");
            rt.block_on(async move {
                listener.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let node = controller::open(settings).await.expect("controller opens");
                node_tx.send(node.clone()).expect("node handed over");
                let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
                std::thread::spawn(move || {
                    let _ = stop_rx.recv();
                    let _ = gone_tx.send(());
                });
                tokio::select! {
                    r = federation::runtime::serve(node, listener, std::future::pending()) => {
                        r.expect("controller serves");
                    }
                    _ = gone_rx => {}
                }
            });
            rt.shutdown_background();
        })
        .expect("thread");
    let node = node_rx.recv().expect("controller started");
    Running {
        node,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// CPU seconds of this process's threads by name (`c<i>`).
fn cpu_by_thread() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            f.get(i - 3)
                .and_then(|x| x.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        *out.entry(comm.trim().to_string()).or_insert(0.0) += (field(14) + field(15)) / 100.0;
    }
    out
}

fn alive_all(nodes: &[Running], now: Instant) -> bool {
    nodes.iter().all(|r| {
        r.node
            .cluster()
            .membership()
            .status(now)
            .iter()
            .all(|p| p.health == Health::Alive)
    })
}

/// Health of every (observer, region) pair, live nodes only.
fn healths(nodes: &[Running], skip: Option<usize>) -> BTreeMap<(usize, String), Health> {
    let now = Instant::now();
    let mut out = BTreeMap::new();
    for (i, r) in nodes.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        for p in r.node.cluster().membership().status(now) {
            out.insert((i, p.region), p.health);
        }
    }
    out
}

fn bytes(nodes: &[Running]) -> u64 {
    nodes
        .iter()
        .map(|r| r.node.metrics().gossip_sent_total())
        .sum()
}

fn run(n: usize, secs: f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("federation.yaml");
    std::fs::write(&config, policy_yaml(n)).expect("policy file");
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().expect("addr")))
        .collect();
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let peers = (0..n)
            .filter(|&j| j != i)
            .map(|j| (name(j), addrs[j].clone()))
            .collect();
        nodes.push(start(i, l, peers, &config, dir.path()));
    }
    // Everyone alive to everyone (bounded wait), then a few more heartbeats.
    let began = Instant::now();
    while !alive_all(&nodes, Instant::now()) {
        if began.elapsed() > Duration::from_secs(60) {
            println!("n={n}: not every controller saw every other alive within 60 s");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));

    // Steady window.
    let cpu0 = cpu_by_thread();
    let process0 = cpu_by_thread().values().sum::<f64>();
    let bytes0 = bytes(&nodes);
    let t0 = Instant::now();
    let mut last = healths(&nodes, None);
    let mut false_steady = 0usize;
    while t0.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_millis(100));
        let now = healths(&nodes, None);
        for (k, h) in &now {
            if *h != Health::Alive && last.get(k) == Some(&Health::Alive) {
                false_steady += 1;
            }
        }
        last = now;
    }
    let window = t0.elapsed().as_secs_f64();
    let bytes1 = bytes(&nodes);
    let cpu1 = cpu_by_thread();
    let process = (cpu1.values().sum::<f64>() - process0) / window * 100.0;
    let per_node: Vec<f64> = (0..n)
        .map(|i| {
            let k = format!("c{i}");
            (cpu1.get(&k).copied().unwrap_or(0.0) - cpu0.get(&k).copied().unwrap_or(0.0)) / window
                * 100.0
        })
        .collect();
    let cpu_mean = per_node.iter().sum::<f64>() / n as f64;
    let cpu_max = per_node.iter().cloned().fold(0.0, f64::max);
    let rate = (bytes1 - bytes0) as f64 / n as f64 / window;

    // Abrupt stop of the last controller.
    let victim = n - 1;
    let victim_name = name(victim);
    let mut before = healths(&nodes, Some(victim));
    nodes[victim].kill();
    let killed = Instant::now();
    let mut suspected: BTreeMap<usize, f64> = BTreeMap::new();
    let mut dead: BTreeMap<usize, f64> = BTreeMap::new();
    let mut false_after = 0usize;
    while killed.elapsed() < Duration::from_secs(10) && dead.len() < n - 1 {
        std::thread::sleep(Duration::from_millis(20));
        let at = killed.elapsed().as_secs_f64();
        let now = healths(&nodes, Some(victim));
        for ((i, region), h) in &now {
            if *region == victim_name {
                if *h != Health::Alive {
                    suspected.entry(*i).or_insert(at);
                }
                if *h == Health::Dead {
                    dead.entry(*i).or_insert(at);
                }
            } else if *h != Health::Alive
                && before.get(&(*i, region.clone())) == Some(&Health::Alive)
            {
                false_after += 1;
            }
        }
        before = now;
    }
    let stats = |m: &BTreeMap<usize, f64>| {
        let mut v: Vec<f64> = m.values().copied().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
        let max = v.last().copied().unwrap_or(f64::NAN);
        format!(
            "median {med:.2} s, max {max:.2} s, {} of {}",
            v.len(),
            n - 1
        )
    };
    println!(
        "n={n:2}: gossip {:8.0} B/s per controller ({:.0} B/s per region); CPU per controller {cpu_mean:.1}% mean, {cpu_max:.1}% max (whole process {process:.0}%); false suspicions {false_steady} in {window:.0} s",
        rate,
        rate / n as f64,
    );
    println!(
        "      abrupt stop of {victim_name}: suspected {}; dead {}; false suspicions meanwhile {false_after}",
        stats(&suspected),
        stats(&dead),
    );
    drop(nodes);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("GOSSIP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let sizes: Vec<usize> = std::env::var("GOSSIP_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 25, 50]);
    let t = Timers::default();
    println!(
        "gossip: in-process controllers on loopback sockets, one single-threaded runtime each; heartbeat {:?}, dead_after {:?}, phi suspect/dead {}/{}",
        t.heartbeat_interval, t.dead_after, t.phi_suspect, t.phi_dead
    );
    for n in sizes {
        if n >= 2 {
            run(n, secs);
        }
    }
}
