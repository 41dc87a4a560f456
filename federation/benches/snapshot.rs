//! Snapshot benchmark: write (serialize with prost, zstd, AES-256-GCM in
//! chunks) and restore (verify + decrypt, zstd, decode) throughput, each as a
//! ratio against raw zstd at the same level on the same bytes, measured in
//! the same run; and snapshot bytes per 1,000 tasks.
//!
//! Run: `cargo bench -p federation --bench snapshot`
//! (release build; prints one line per figure; the median of several rounds).

use std::hint::black_box;
use std::time::Instant;

use federation::replication::envelope::{self, Limits, NonceSource, SealParams};
use federation::replication::{Key, KeyRing, SnapshotBody};
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
                attributes: federation::sandbox::string_attrs(&[
                    ("customer_region", c),
                    ("data_class", "pii"),
                ]),
                payload: payload.into_bytes(),
                state: api::TaskState::Queued as i32,
                owner_region: "north_america".into(),
                rule_index: u32::from(i % 2 == 1),
                created_unix_ms: 1_700_000_000_000 + i as i64,
                updated_unix_ms: 1_700_000_000_000 + i as i64,
                version: 1,
                ..Default::default()
            }
        })
        .collect()
}

/// Median seconds per call of `f` over `rounds` rounds of `iters` calls.
fn time(rounds: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut per = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        per.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    per.sort_by(f64::total_cmp);
    per[per.len() / 2]
}

fn main() {
    let key = Key::new("bench", [7u8; 32]);
    let ring = KeyRing::from_keys(vec![key.clone()], None);
    let nonces = NonceSource::new();
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
            rule_indexes: vec![0, 1],
            policy_hash: body.policy_hash.clone(),
            compression: Some(LEVEL),
            chunk_size: federation::replication::CHUNK_SIZE,
        };
        let plain = body.encode_to_vec();
        let iters = (20_000 / n).max(2);
        let rounds = 9;
        // Interleave baseline and measured so machine noise hits both.
        let base_write = time(rounds, iters, || {
            black_box(zstd::bulk::compress(black_box(&plain), LEVEL).expect("zstd"));
        });
        // What the controller does (`Replication::seal_body`).
        let write = time(rounds, iters, || {
            let bytes = black_box(&body).encode_to_vec();
            black_box(envelope::seal(&bytes, &params, &key, &nonces).expect("seal"));
        });
        let compressed = zstd::bulk::compress(&plain, LEVEL).expect("zstd");
        let sealed = envelope::seal(&plain, &params, &key, &nonces).expect("seal");
        let base_restore = time(rounds, iters, || {
            black_box(zstd::bulk::decompress(black_box(&compressed), plain.len()).expect("unzstd"));
        });
        let restore = time(rounds, iters, || {
            black_box(envelope::open(black_box(&sealed), &ring, &Limits::default()).expect("open"));
        });
        let restore_decode = time(rounds, iters, || {
            let (_, bytes) =
                envelope::open(black_box(&sealed), &ring, &Limits::default()).expect("open");
            black_box(SnapshotBody::decode(bytes.as_slice()).expect("decode"));
        });
        let encode_only = time(rounds, iters, || {
            black_box(black_box(&body).encode_to_vec());
        });
        let sealed_bytes: usize = sealed.iter().map(|c| c.encoded_len()).sum();
        let mb = plain.len() as f64 / 1e6;
        println!(
            "{n} tasks ({:.2} MB plaintext): write {:.0} MB/s vs raw zstd-{LEVEL} {:.0} MB/s, ratio {:.2}x; restore {:.0} MB/s vs raw unzstd {:.0} MB/s, ratio {:.2}x",
            mb,
            mb / write,
            mb / base_write,
            base_write / write,
            mb / restore,
            mb / base_restore,
            base_restore / restore,
        );
        println!(
            "{n} tasks: serialize alone {:.0} MB/s; restore including protobuf decode {:.0} MB/s, ratio {:.2}x vs raw unzstd",
            mb / encode_only,
            mb / restore_decode,
            base_restore / restore_decode,
        );
        println!(
            "{n} tasks: snapshot {} bytes ({} bytes per 1,000 tasks; raw zstd {} bytes, plaintext {} bytes)",
            sealed_bytes,
            sealed_bytes * 1000 / n,
            compressed.len(),
            plain.len()
        );
    }
}
