//! Snapshot benchmark: write (serialize with prost, zstd, AES-256-GCM in
//! chunks) and restore (verify + decrypt, zstd, decode) throughput, each as a
//! ratio against raw zstd at the same level on the same bytes, measured in
//! the same run; and snapshot bytes per 1,000 tasks.
//!
//! The write measured is the controller's (`Replication::seal_body`): the
//! body is streamed into the envelope, and past one 128 KiB block zstd runs
//! on a helper thread while serialization continues (two threads; the
//! baseline is one). The same write on one thread, and the CPU time of the
//! pipelined write against the baseline's, are printed next to it.
//!
//! Restore is measured as the receiver does it: `Receiver::verify_snapshot`
//! (the source may send to us, verify and decrypt every chunk, unzstd, not
//! a replay, decode every task in place with prost's rules, the body
//! agrees with the header, residency of every task under
//! `policies/seed-data-class-gdpr.yaml`) and `HeldCopy::fold_snapshot` into
//! a copy that holds the previous snapshot: everything a received snapshot
//! goes through except the fsync'd write. For comparison, in the same
//! rounds: the bytes back alone (verify, decrypt, unzstd); that plus
//! `BodyView` (every task's fields in place); and that plus owned prost
//! messages by `SnapshotBody::decode`, which is how the receiver decoded
//! before (then also a residency check per task and a fold of owned tasks).
//!
//! Run: `cargo bench -p federation --bench snapshot`
//! (release build; prints one line per figure; baseline and measured calls
//! alternate round by round, and ratios are the median of per-round ratios).

use std::hint::black_box;
use std::time::Instant;

use federation::policy::Policy;
use federation::replication::columnar;
use federation::replication::copy::HeldCopy;
use federation::replication::envelope::{self, Limits, NonceSource, Pipeline, SealParams};
use federation::replication::view::BodyView;
use federation::replication::{BodyFormat, Key, KeyRing, Receiver, SnapshotBody, seal_snapshot};
use federation_api as api;
use prost::Message as _;

const LEVEL: i32 = 3;

fn tasks(n: usize) -> Vec<api::Task> {
    let customers = ["US", "CA", "DE", "UK", "FR"];
    (0..n)
        .map(|i| {
            let id = uuid::Uuid::now_v7();
            let c = customers[i % customers.len()];
            // A realistic payload: small JSON with ids and a random token.
            let token: u128 = rand::random();
            let payload = format!(
                "{{\"job\":\"export\",\"customer\":\"{c}\",\"account\":{},\"token\":\"{token:032x}\",\"rows\":[{},{},{}]}}",
                i * 7919,
                i,
                i + 1,
                i + 2
            );
            api::Task {
                task_id: format!("{id}.north_america"),
                attributes: federation_sandbox::string_attrs(&[
                    ("customer_region", c),
                    ("data_class", "pii"),
                ]),
                payload: payload.into_bytes(),
                state: api::TaskState::Queued as i32,
                owner_region: "north_america".into(),
                // The rule europe backs north_america up under.
                rule_index: 0,
                created_unix_ms: 1_700_000_000_000 + i as i64,
                updated_unix_ms: 1_700_000_000_000 + i as i64,
                version: 1,
                ..Default::default()
            }
        })
        .collect()
}

/// Seconds per call of each of `fs`, per round: every round runs each
/// function `iters` times, in turn, so machine noise hits all of them alike.
fn rounds(rounds: usize, iters: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    let mut per = vec![Vec::with_capacity(rounds); fs.len()];
    for _ in 0..rounds {
        for (f, out) in fs.iter_mut().zip(&mut per) {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            out.push(t.elapsed().as_secs_f64() / iters as f64);
        }
    }
    per
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median, min and max over rounds of `base[i] / measured[i]` (a ratio
/// above 1 would mean faster than the baseline).
fn ratio(base: &[f64], measured: &[f64]) -> (f64, f64, f64) {
    let r: Vec<f64> = base.iter().zip(measured).map(|(b, m)| b / m).collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(0.0, f64::max);
    (median(r), min, max)
}

/// CPU time of this process (every thread, including finished ones), from
/// `/proc/self/stat` (clock ticks of 10 ms); `None` off Linux.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds per call of `f`, over at least `wall` seconds of calls.
fn cpu_per_call(wall: f64, mut f: impl FnMut()) -> Option<f64> {
    let (t, c0) = (Instant::now(), cpu_seconds()?);
    let mut calls = 0u64;
    while t.elapsed().as_secs_f64() < wall {
        f();
        calls += 1;
    }
    Some((cpu_seconds()? - c0) / calls as f64)
}

fn main() {
    let key = Key::new("bench", [7u8; 32]);
    let ring = KeyRing::from_keys(vec![key.clone()], None);
    let nonces = NonceSource::new();
    let policy = Policy::load_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/seed-data-class-gdpr.yaml"
    )))
    .expect("policy");
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::open("europe", dir.path(), Some(ring.clone()), Limits::default());
    for n in [1_000usize, 10_000] {
        let body = SnapshotBody {
            source_region: "north_america".into(),
            epoch: 1,
            sequence: 1,
            policy_hash: "0".repeat(64),
            taken_unix_ms: 1,
            tasks: tasks(n),
            results: Vec::new(),
        };
        let params = SealParams {
            source: "north_america".into(),
            epoch: 1,
            sequence: 1,
            rule_indexes: vec![0],
            policy_hash: body.policy_hash.clone(),
            compression: Some(LEVEL),
            chunk_size: federation::replication::CHUNK_SIZE,
        };
        // Each baseline compresses exactly the bytes of its format, already
        // serialized.
        let plain = body.encode_to_vec();
        let plain2 = columnar::encode(&body).expect("encode");
        let iters = (20_000 / n).max(2);
        let n_rounds = 15;
        // What the controller does (`Replication::seal_body`): serialize,
        // compress, encrypt.
        let write = |f: BodyFormat, p: Pipeline| {
            black_box(seal_snapshot(black_box(&body), f, &params, &key, &nonces, p).expect("seal"));
        };
        let base_write = |bytes: &[u8]| {
            black_box(zstd::bulk::compress(black_box(bytes), LEVEL).expect("zstd"));
        };
        let w = rounds(
            n_rounds,
            iters,
            &mut [
                &mut || base_write(&plain),
                &mut || write(BodyFormat::Prost, Pipeline::On),
                &mut || write(BodyFormat::Prost, Pipeline::Off),
                &mut || base_write(&plain2),
                &mut || write(BodyFormat::Columnar, Pipeline::On),
            ],
        );
        let compressed = zstd::bulk::compress(&plain, LEVEL).expect("zstd");
        let compressed2 = zstd::bulk::compress(&plain2, LEVEL).expect("zstd");
        let seal = |f| seal_snapshot(&body, f, &params, &key, &nonces, Pipeline::On).expect("seal");
        let (sealed, sealed2) = (seal(BodyFormat::Prost), seal(BodyFormat::Columnar));
        // What the receiver keeps: the copy of north_america, holding the
        // previous snapshot when the next one is folded in.
        let (mut copy, mut copy2) = (HeldCopy::default(), HeldCopy::default());
        let restore = |copy: &mut HeldCopy, s: &[api::SnapshotChunk]| {
            let (_, _, restored) = rx.verify_snapshot(&policy, black_box(s)).expect("restore");
            copy.fold_snapshot(restored);
            copy.pending_len()
        };
        assert_eq!(restore(&mut copy, &sealed), n, "every task held");
        assert_eq!(restore(&mut copy2, &sealed2), n, "every task held");
        let unzstd = |c: &[u8], len: usize| {
            black_box(zstd::bulk::decompress(black_box(c), len).expect("unzstd"));
        };
        let r = rounds(
            n_rounds,
            iters,
            &mut [
                &mut || unzstd(&compressed, plain.len()),
                &mut || {
                    black_box(
                        envelope::open(black_box(&sealed), &ring, &Limits::default())
                            .expect("open"),
                    );
                },
                &mut || {
                    let (_, bytes) = envelope::open(black_box(&sealed), &ring, &Limits::default())
                        .expect("open");
                    black_box(SnapshotBody::decode(bytes.as_slice()).expect("decode"));
                },
                &mut || {
                    black_box(black_box(&body).encode_to_vec());
                },
                &mut || {
                    let (_, bytes) = envelope::open(black_box(&sealed), &ring, &Limits::default())
                        .expect("open");
                    let view = BodyView::parse(&bytes).expect("decode");
                    black_box(view.tasks.len() + view.results.len());
                },
                &mut || {
                    black_box(restore(&mut copy, &sealed));
                },
                &mut || unzstd(&compressed2, plain2.len()),
                &mut || {
                    black_box(restore(&mut copy2, &sealed2));
                },
                &mut || {
                    black_box(
                        envelope::open(black_box(&sealed2), &ring, &Limits::default())
                            .expect("open"),
                    );
                },
                &mut || {
                    let (_, bytes) = envelope::open(black_box(&sealed2), &ring, &Limits::default())
                        .expect("open");
                    let b = columnar::Body::parse(&bytes).expect("decode");
                    black_box(b.tasks.len());
                },
            ],
        );
        let cpu_base = cpu_per_call(1.0, || base_write(&plain));
        let cpu_write = cpu_per_call(1.0, || write(BodyFormat::Prost, Pipeline::On));
        let size = |s: &[api::SnapshotChunk]| -> usize { s.iter().map(|c| c.encoded_len()).sum() };
        let (sealed_bytes, sealed_bytes2) = (size(&sealed), size(&sealed2));
        let mb = plain.len() as f64 / 1e6;
        let mb2 = plain2.len() as f64 / 1e6;
        let (bw, wr, wr1) = (
            median(w[0].clone()),
            median(w[1].clone()),
            median(w[2].clone()),
        );
        let (br, rs, rd, enc, rv) = (
            median(r[0].clone()),
            median(r[1].clone()),
            median(r[2].clone()),
            median(r[3].clone()),
            median(r[4].clone()),
        );
        let (w_med, w_min, w_max) = ratio(&w[0], &w[1]);
        let (r_med, r_min, r_max) = ratio(&r[0], &r[1]);
        println!(
            "{n} tasks, format 1 ({mb:.2} MB plaintext): write {:.0} MB/s vs raw zstd-{LEVEL} {:.0} MB/s, ratio {w_med:.2}x (rounds {w_min:.2}-{w_max:.2}); bytes back (verify, decrypt, unzstd) {:.0} MB/s vs raw unzstd {:.0} MB/s, ratio {r_med:.2}x (rounds {r_min:.2}-{r_max:.2})",
            mb / wr,
            mb / bw,
            mb / rs,
            mb / br,
        );
        let cpu = match (cpu_base, cpu_write) {
            (Some(b), Some(w)) => format!("{:.2}x", b / w),
            _ => "n/a".into(),
        };
        println!(
            "{n} tasks, format 1: write on one thread {:.0} MB/s, ratio {:.2}x; CPU time of the (pipelined) write vs raw zstd {cpu}",
            mb / wr1,
            ratio(&w[0], &w[2]).0,
        );
        println!(
            "{n} tasks, format 1: serialize alone {:.0} MB/s; restore including protobuf decode into owned messages {:.0} MB/s, ratio {:.2}x vs raw unzstd",
            mb / enc,
            mb / rd,
            ratio(&r[0], &r[2]).0,
        );
        let (v_med, v_min, v_max) = ratio(&r[0], &r[4]);
        println!(
            "{n} tasks, format 1: restore including decoding the tasks in place (BodyView) {:.0} MB/s, ratio {v_med:.2}x vs raw unzstd (rounds {v_min:.2}-{v_max:.2})",
            mb / rv,
        );
        let (c_med, c_min, c_max) = ratio(&r[0], &r[5]);
        println!(
            "{n} tasks, format 1: restore as the receiver does it (verify_snapshot + fold_snapshot: verify, decrypt, unzstd, decode every task, residency, into the copy) {:.0} MB/s, ratio {c_med:.2}x vs raw unzstd of the same bytes (rounds {c_min:.2}-{c_max:.2})",
            mb / median(r[5].clone()),
        );
        let (w2_med, w2_min, w2_max) = ratio(&w[3], &w[4]);
        println!(
            "{n} tasks, format 2 ({mb2:.2} MB plaintext): write {:.0} MB/s vs raw zstd-{LEVEL} of its bytes {:.0} MB/s, ratio {w2_med:.2}x (rounds {w2_min:.2}-{w2_max:.2}); write time vs format 1 {:.2}x",
            mb2 / median(w[4].clone()),
            mb2 / median(w[3].clone()),
            median(w[4].clone()) / wr,
        );
        let (o_med, _, _) = ratio(&r[6], &r[8]);
        let (p_med, _, _) = ratio(&r[6], &r[9]);
        println!(
            "{n} tasks, format 2: bytes back (verify, decrypt, unzstd) ratio {o_med:.2}x, plus validating every column (columnar::Body::parse) ratio {p_med:.2}x vs raw unzstd {:.0} MB/s",
            mb2 / median(r[6].clone()),
        );
        let (c2_med, c2_min, c2_max) = ratio(&r[6], &r[7]);
        println!(
            "{n} tasks, format 2: restore as the receiver does it (verify_snapshot + fold_snapshot) {:.0} MB/s of its plaintext, ratio {c2_med:.2}x vs raw unzstd of the same bytes (rounds {c2_min:.2}-{c2_max:.2}); {:.2}x the time of format 1's restore, {:.2}x the time of raw unzstd of format 1's bytes",
            mb2 / median(r[7].clone()),
            median(r[7].clone()) / median(r[5].clone()),
            median(r[7].clone()) / br,
        );
        println!(
            "{n} tasks: snapshot {} bytes in format 1, {} in format 2 ({} / {} bytes per 1,000 tasks; raw zstd {} / {} bytes, plaintext {} / {} bytes)",
            sealed_bytes,
            sealed_bytes2,
            sealed_bytes * 1000 / n,
            sealed_bytes2 * 1000 / n,
            compressed.len(),
            compressed2.len(),
            plain.len(),
            plain2.len(),
        );
    }
}
