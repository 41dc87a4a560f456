//! Snapshot envelope decoding, as a receiver meets it: bytes → a stream of
//! `SnapshotChunk` messages → `Collector` (limits, order) → `open` (AEAD,
//! decompression bounds) → `SnapshotBody` decode, and the in-place
//! `BodyView` decode, which must agree with it, and `restore::decode` into
//! the copy a receiver keeps, whose tasks must be prost's; a format-2
//! (columnar) plaintext is checked against `columnar::Body::parse` instead.
//! Three modes, by first byte:
//!
//! - raw: the rest is length-delimited protobuf chunks, decoded and opened
//!   with a fixed key ring (wrong keys, garbage, bad headers);
//! - tamper: the rest is a plaintext that is sealed with the ring's key and
//!   then damaged as the tail bytes say (flip a byte, drop, duplicate or
//!   swap a chunk, change a header field). An undamaged seal must open to the
//!   same plaintext; a damaged one must be refused;
//! - columnar: a valid format-2 body built from the bytes (task count and
//!   field sizes from them), then cut or flipped as the tail says, given to
//!   the body checks directly. Never a panic.
#![no_main]

use federation::replication::envelope::{self, Limits, NonceSource, SealParams};
use federation::replication::copy::HeldCopy;
use federation::replication::{columnar, restore};
use federation::replication::view::BodyView;
use federation::replication::{Key, KeyRing, SnapshotBody};
use federation_api as api;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fn ring() -> KeyRing {
    KeyRing::from_keys(vec![Key::new("fuzz-key", [7; 32])], Some("fuzz-key"))
}

fn limits() -> Limits {
    Limits {
        max_chunk_bytes: 4096,
        max_chunks: 64,
        max_total_bytes: 1 << 18,
        max_plaintext_bytes: 1 << 20,
    }
}

fn receive(chunks: Vec<api::SnapshotChunk>) -> Option<Vec<u8>> {
    let mut collector = envelope::Collector::new(limits());
    for c in chunks {
        collector.push(c).ok()?;
    }
    let (_, plain) = envelope::open(&collector.into_chunks(), &ring(), &limits()).ok()?;
    check_body(&plain);
    Some(plain)
}

/// The copy folded from `restored` holds the tasks of `body`, the reference
/// decoder's reading of the same plaintext.
fn assert_copy_holds(restored: restore::Restored, body: SnapshotBody) {
    let mut copy = HeldCopy::default();
    copy.fold_snapshot(restored);
    let mut reference = HeldCopy::default();
    for t in body.results.into_iter().chain(body.tasks) {
        reference.apply(t);
    }
    assert_eq!(copy.pending_tasks(), reference.pending_tasks(), "the copy's tasks differ");
}

/// What a receiver does with a plaintext, checked against the reference
/// decoder of its format.
fn check_body(plain: &[u8]) {
    if columnar::is_columnar(plain) {
        let parsed = columnar::Body::parse(plain);
        assert!(SnapshotBody::decode(plain).is_err(), "prost read a format-2 body");
        match restore::decode(plain.to_vec(), None, None) {
            Ok(restored) => {
                let body = parsed.expect("restore accepted a body parse refuses").to_body();
                assert_copy_holds(restored, body);
            }
            Err(_) => assert!(parsed.is_err(), "restore refused a body parse accepts"),
        }
        return;
    }
    // The in-place decoder accepts exactly what prost accepts, and its
    // owned form is prost's.
    let owned = SnapshotBody::decode(plain);
    match BodyView::parse(plain) {
        Ok(view) => {
            let owned = owned.expect("the view accepted a body prost refuses");
            assert_eq!(view.to_body().ok(), Some(owned), "the view's body differs");
        }
        Err(_) => assert!(owned.is_err(), "the view refused a body prost accepts"),
    }
    // What the receiver keeps: the same verdict, and the copy's tasks are
    // prost's.
    match restore::decode(plain.to_vec(), None, None) {
        Ok(restored) => {
            let body = SnapshotBody::decode(plain).expect("restore accepted a body prost refuses");
            assert_copy_holds(restored, body);
        }
        Err(_) => assert!(
            SnapshotBody::decode(plain).is_err(),
            "restore refused a body prost accepts"
        ),
    }
}

fn columnar_mode(data: &[u8]) {
    // Last 6 bytes drive the damage; the rest shapes the body.
    let (shape, ops) = data.split_at(data.len().saturating_sub(6));
    let byte = |i: usize| shape.get(i % shape.len().max(1)).copied().unwrap_or(0);
    let tasks: Vec<api::Task> = (0..usize::from(byte(0) % 16))
        .map(|i| api::Task {
            task_id: format!("{i:036}.europe"),
            payload: shape.get(..usize::from(byte(i + 1)).min(shape.len())).unwrap_or_default().to_vec(),
            idempotency_key: if byte(i + 2) & 1 == 1 { format!("k{i}") } else { String::new() },
            state: i32::from(byte(i + 3) % 6),
            owner_region: ["europe", "asia_pacific", ""][usize::from(byte(i + 4)) % 3].into(),
            rule_index: u32::from(byte(i + 5) % 3),
            version: u64::from(byte(i + 6)),
            attributes: [(
                "customer_region".to_string(),
                api::AttributeValue {
                    kind: Some(api::attribute_value::Kind::StringValue(
                        ["DE", "US", "ü"][usize::from(byte(i + 7)) % 3].into(),
                    )),
                },
            )]
            .into(),
            taken_over: (byte(i + 8) & 1 == 1).then(|| api::Takeover {
                from_region: "asia_pacific".into(),
                from_epoch: u64::from(byte(i + 9)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let body = SnapshotBody {
        source_region: "europe".into(),
        epoch: 1,
        sequence: 1,
        tasks,
        ..Default::default()
    };
    let Ok(mut plain) = columnar::encode(&body) else { return };
    let op = |i: usize| usize::from(ops.get(i).copied().unwrap_or(0));
    let damaged = match op(0) % 4 {
        0 => false,
        1 => {
            plain.truncate(op(1) * 256 + op(2));
            true
        }
        _ => {
            let n = plain.len();
            plain[(op(1) * 256 + op(2)) % n] ^= ops.get(3).copied().unwrap_or(1) | 1;
            true
        }
    };
    if !damaged {
        let read = columnar::Body::parse(&plain).expect("an intact body is refused");
        assert_eq!(read.to_body(), body, "an intact body did not round-trip");
    }
    check_body(&plain);
}

fn raw(mut data: &[u8]) {
    let mut chunks = Vec::new();
    while !data.is_empty() && chunks.len() < 128 {
        match api::SnapshotChunk::decode_length_delimited(&mut data) {
            Ok(c) => chunks.push(c),
            Err(_) => break,
        }
    }
    let _ = receive(chunks);
}

fn tamper(data: &[u8]) {
    // Last 8 bytes (if any) drive the damage; the rest is the plaintext.
    let (plain, ops) = data.split_at(data.len().saturating_sub(8));
    let params = SealParams {
        source: "europe".into(),
        epoch: 1,
        sequence: 1,
        rule_indexes: vec![1],
        policy_hash: "p".into(),
        compression: if ops.first().is_some_and(|b| b & 1 == 1) {
            Some(1)
        } else {
            None
        },
        chunk_size: 64 + usize::from(ops.get(1).copied().unwrap_or(0)) * 8,
    };
    let ring = ring();
    let Some(key) = ring.current() else { return };
    let Ok(mut chunks) = envelope::seal(plain, &params, key, &NonceSource::new()) else {
        return;
    };
    let n = chunks.len();
    let at = usize::from(ops.get(3).copied().unwrap_or(0)) % n;
    let damaged = match ops.get(2).copied().unwrap_or(0) % 8 {
        0 => false,
        1 => {
            let pos = usize::from(ops.get(4).copied().unwrap_or(0));
            let c = &mut chunks[at].ciphertext;
            if c.is_empty() {
                false
            } else {
                let i = pos % c.len();
                c[i] ^= ops.get(5).copied().unwrap_or(1) | 1;
                true
            }
        }
        2 => {
            chunks.remove(at);
            true
        }
        3 => {
            let c = chunks[at].clone();
            chunks.insert(at, c);
            true
        }
        4 if n > 1 => {
            chunks.swap(at, (at + 1) % n);
            true
        }
        5 => {
            if let Some(h) = chunks[0].header.as_mut() {
                h.sequence ^= 1 + u64::from(ops.get(4).copied().unwrap_or(0));
            }
            true
        }
        6 => {
            if let Some(h) = chunks[0].header.as_mut() {
                h.source_region.push('x');
            }
            true
        }
        7 => {
            chunks[at].nonce[0] ^= 1;
            true
        }
        _ => false,
    };
    let opened = receive(chunks);
    if damaged {
        assert!(opened.is_none(), "a damaged snapshot was accepted");
    } else if plain.len() as u64 <= limits().max_plaintext_bytes && n <= 64 {
        assert_eq!(opened.as_deref(), Some(plain), "an intact snapshot did not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => tamper(rest),
        Some((mode, rest)) if mode & 3 == 2 => columnar_mode(rest),
        Some((_, rest)) => raw(rest),
        None => {}
    }
});
