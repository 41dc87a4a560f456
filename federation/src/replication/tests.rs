//! Receiver rejection cases, in process: each one is refused with its
//! counter, and the previous good snapshot stays.

use federation_api as api;
use prost::Message as _;

use super::envelope::{self, Limits, NonceSource, Pipeline, SealParams};
use super::receiver::{Receiver, Rejection, Stats, collect, snapshot_path};
use super::snapshot::{BodyFormat, SnapshotBody};
use super::{EnvelopeError, Key, KeyRing};
use crate::policy::Policy;

fn seed() -> String {
    federation_sandbox::SEED_POLICY.to_string()
}

fn policy(text: &str) -> Policy {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f.yaml");
    std::fs::write(&path, text).expect("write");
    Policy::load_file(&path).expect("policy")
}

fn task(source: &str, rule: u32, customer: &str) -> api::Task {
    api::Task {
        task_id: format!("{}.{source}", uuid::Uuid::now_v7()),
        rule_index: rule,
        owner_region: source.into(),
        payload: b"payload".to_vec(),
        attributes: federation_sandbox::string_attrs(&[("customer_region", customer)]),
        ..Default::default()
    }
}

struct Sender {
    key: Key,
    nonces: NonceSource,
}

impl Sender {
    fn new(key: Key) -> Self {
        Self {
            key,
            nonces: NonceSource::new(),
        }
    }

    fn seal(
        &self,
        source: &str,
        epoch: u64,
        sequence: u64,
        tasks: Vec<api::Task>,
    ) -> Vec<api::SnapshotChunk> {
        let body = SnapshotBody {
            source_region: source.into(),
            epoch,
            sequence,
            tasks,
            ..Default::default()
        };
        let params = SealParams {
            source: source.into(),
            epoch,
            sequence,
            rule_indexes: vec![0],
            policy_hash: String::new(),
            compression: Some(3),
            chunk_size: 64,
        };
        super::seal_snapshot(
            &body,
            BodyFormat::Columnar,
            &params,
            &self.key,
            &self.nonces,
            Pipeline::Off,
        )
        .expect("seal")
    }
}

fn ring() -> (Key, KeyRing) {
    let k = Key::new("k1", [42u8; 32]);
    (k.clone(), KeyRing::from_keys(vec![k], None))
}

fn many_tasks(n: usize) -> Vec<api::Task> {
    (0..n).map(|_| task("north_america", 0, "US")).collect()
}

#[test]
fn every_rejection_is_counted_and_keeps_the_previous_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = policy(&seed());
    let (key, ring) = ring();
    let stats = Stats::default();
    let rx = Receiver::open("europe", dir.path(), Some(ring.clone()), Limits::default());
    let tx = Sender::new(key);

    let good = tx.seal("north_america", 5, 1, many_tasks(20));
    assert!(good.len() > 3, "several chunks: {}", good.len());
    rx.receive(&p, &good, &stats).expect("accepted");
    let path = snapshot_path(dir.path(), "north_america");
    let stored = std::fs::read(&path).expect("stored");

    // Wrong key (same id, other bytes).
    let wrong = Sender::new(Key::new("k1", [1u8; 32])).seal("north_america", 5, 2, many_tasks(1));
    assert!(matches!(
        rx.receive(&p, &wrong, &stats),
        Err(Rejection::Envelope(EnvelopeError::Auth(0)))
    ));
    // Unknown key id.
    let unknown =
        Sender::new(Key::new("k9", [42u8; 32])).seal("north_america", 5, 2, many_tasks(1));
    assert!(matches!(
        rx.receive(&p, &unknown, &stats),
        Err(Rejection::Envelope(EnvelopeError::UnknownKey(_)))
    ));
    // A flipped byte.
    let mut flipped = tx.seal("north_america", 5, 3, many_tasks(20));
    flipped[2].ciphertext[5] ^= 0x01;
    assert!(matches!(
        rx.receive(&p, &flipped, &stats),
        Err(Rejection::Envelope(EnvelopeError::Auth(2)))
    ));
    // Truncated.
    let mut truncated = tx.seal("north_america", 5, 4, many_tasks(20));
    truncated.pop();
    assert!(matches!(
        rx.receive(&p, &truncated, &stats),
        Err(Rejection::Envelope(EnvelopeError::Truncated { .. }))
    ));
    // Reordered.
    let mut reordered = tx.seal("north_america", 5, 5, many_tasks(20));
    reordered.swap(1, 2);
    assert!(matches!(
        rx.receive(&p, &reordered, &stats),
        Err(Rejection::Envelope(EnvelopeError::OutOfOrder { .. }))
    ));
    // Replayed, and older.
    assert!(matches!(
        rx.receive(&p, &good, &stats),
        Err(Rejection::Replay { .. })
    ));
    let older = tx.seal("north_america", 4, 99, many_tasks(1));
    assert!(matches!(
        rx.receive(&p, &older, &stats),
        Err(Rejection::Replay { .. })
    ));
    // A region that may not send to europe (asia_pacific is in no rule).
    let ap = tx.seal("asia_pacific", 5, 1, vec![]);
    assert!(matches!(
        rx.receive(&p, &ap, &stats),
        Err(Rejection::NotPermitted(_))
    ));
    // A task europe may not hold under the GDPR variant (europe's own rule
    // lists north_america as backup: north_america receiving DE data).
    let strict = policy(federation_sandbox::SEED_REQUIRES_GDPR);
    let na_dir = tempfile::tempdir().expect("tempdir");
    let na = Receiver::open(
        "north_america",
        na_dir.path(),
        Some(ring.clone()),
        Limits::default(),
    );
    let de = tx.seal("europe", 5, 1, vec![task("europe", 1, "DE")]);
    let why = na.receive(&strict, &de, &stats).expect_err("residency");
    assert!(matches!(why, Rejection::Residency(_)), "{why}");
    assert!(why.to_string().contains("GDPR"), "{why}");
    assert!(!snapshot_path(na_dir.path(), "europe").exists());
    // The same under the file as written is accepted.
    na.receive(&p, &de, &stats)
        .expect("as written, north_america backs europe up");

    let s = stats.snapshot();
    assert_eq!(
        (
            s.accepted,
            s.rejected_auth,
            s.rejected_unknown_key,
            s.rejected_truncated,
            s.rejected_out_of_order,
            s.rejected_replay,
            s.rejected_not_permitted,
            s.rejected_residency
        ),
        (2, 2, 1, 1, 1, 2, 1, 1),
        "{s:?}"
    );
    assert_eq!(
        std::fs::read(&path).expect("still there"),
        stored,
        "previous snapshot kept"
    );
    // A newer good one replaces it, and survives a reopen.
    rx.receive(&p, &tx.seal("north_america", 5, 6, many_tasks(2)), &stats)
        .expect("newer");
    let reopened = Receiver::open("europe", dir.path(), Some(ring), Limits::default());
    let (h, body) = reopened.stored("north_america").expect("stored");
    assert_eq!((h.epoch, h.sequence, body.tasks.len()), (5, 6, 2));
    assert!(matches!(
        reopened.receive(&p, &good, &stats),
        Err(Rejection::Replay { .. })
    ));
}

/// The controller's write path (body streamed into the envelope, compressed
/// on a helper thread past one block) carries exactly prost's encoding.
#[test]
fn streamed_body_is_the_prost_encoding() {
    let (key, ring) = ring();
    let mut results = many_tasks(3);
    for r in &mut results {
        r.state = api::TaskState::Succeeded as i32;
        r.result = b"done".to_vec();
    }
    let mut big = many_tasks(2000);
    for (i, t) in big.iter_mut().enumerate() {
        t.payload = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 200)).into_bytes();
    }
    let bodies = [
        SnapshotBody::default(),
        SnapshotBody {
            source_region: "north_america".into(),
            epoch: 3,
            sequence: 9,
            policy_hash: "h".into(),
            taken_unix_ms: -5,
            tasks: many_tasks(5),
            results,
        },
        SnapshotBody {
            source_region: "north_america".into(),
            epoch: 1,
            tasks: big,
            ..Default::default()
        },
    ];
    for (body, format) in bodies
        .iter()
        .flat_map(|b| [(b, BodyFormat::Prost), (b, BodyFormat::Columnar)])
    {
        let expected = match format {
            BodyFormat::Prost => body.encode_to_vec(),
            BodyFormat::Columnar => super::columnar::encode(body).expect("encode"),
        };
        for (compression, pipeline) in [
            (None, Pipeline::Off),
            (Some(3), Pipeline::Off),
            (Some(3), Pipeline::On),
        ] {
            let params = SealParams {
                source: body.source_region.clone(),
                epoch: body.epoch,
                sequence: body.sequence,
                rule_indexes: vec![0],
                policy_hash: body.policy_hash.clone(),
                compression,
                chunk_size: super::CHUNK_SIZE,
            };
            let chunks =
                super::seal_snapshot(body, format, &params, &key, &NonceSource::new(), pipeline)
                    .expect("seal");
            let (header, plain) = envelope::open(&chunks, &ring, &Limits::default()).expect("open");
            assert_eq!(header.plaintext_bytes, expected.len() as u64);
            assert!(
                plain == expected,
                "{} tasks, {format:?}, {compression:?}, {pipeline:?}",
                body.tasks.len()
            );
        }
    }
}

#[tokio::test]
async fn limits_give_resource_exhausted_naming_the_limit() {
    let (key, _) = ring();
    let tx = Sender::new(key);
    let chunks = tx.seal("north_america", 1, 1, many_tasks(40));
    let stats = Stats::default();
    let cases = [
        (
            Limits {
                max_chunk_bytes: 16,
                ..Limits::default()
            },
            "max_chunk_bytes",
        ),
        (
            Limits {
                max_chunks: 2,
                ..Limits::default()
            },
            "max_chunks",
        ),
        (
            Limits {
                max_total_bytes: 100,
                ..Limits::default()
            },
            "max_total_bytes",
        ),
    ];
    for (limits, name) in cases {
        let stream = futures::stream::iter(chunks.clone().into_iter().map(Ok));
        let err = collect(stream, limits, &stats).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    assert_eq!(stats.snapshot().rejected_limit, 3);
    let stream = futures::stream::iter(chunks.clone().into_iter().map(Ok));
    assert_eq!(
        collect(stream, Limits::default(), &stats)
            .await
            .expect("fits")
            .len(),
        chunks.len()
    );
}

#[test]
fn no_key_material_in_errors_or_logs() {
    let (key, ring) = ring();
    let secret_b64 = KeyRing::line("k1", &[42u8; 32]);
    let secret = &secret_b64[3..];
    let tx = Sender::new(key);
    let mut bad = tx.seal("north_america", 1, 1, many_tasks(3));
    bad[0].ciphertext[0] ^= 1;
    let err = envelope::open(&bad, &ring, &Limits::default()).expect_err("tampered");
    let shown = format!("{err} {err:?} {ring:?}");
    assert!(!shown.contains(secret), "{shown}");
    assert!(!shown.contains("42, 42"), "{shown}");
}

#[test]
fn unsupported_encryption_is_a_load_time_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f.yaml");
    std::fs::write(
        &path,
        seed().replace("encryption: \"AES-256\"", "encryption: \"DES\""),
    )
    .expect("write");
    let err = Policy::load_file(&path)
        .expect_err("DES refused")
        .to_string();
    assert!(
        err.contains("data_synchronization.encryption") && err.contains("DES"),
        "{err}"
    );
}

impl Sender {
    /// Seals a change batch as the controller does.
    fn seal_changes(
        &self,
        source: &str,
        epoch: u64,
        sequence: u64,
        tasks: Vec<api::Task>,
    ) -> Vec<api::SnapshotChunk> {
        let body = super::changes::ChangeBody {
            source_region: source.into(),
            epoch,
            sequence,
            sent_unix_ms: 1000 + sequence as i64,
            tasks,
            ..Default::default()
        };
        let params = SealParams {
            source: source.into(),
            epoch,
            sequence,
            rule_indexes: vec![0],
            policy_hash: String::new(),
            compression: Some(3),
            chunk_size: 64,
        };
        envelope::seal_in(
            envelope::Domain::Changes,
            &body.encode_to_vec(),
            &params,
            &self.key,
            &self.nonces,
        )
        .expect("seal")
    }
}

fn with_state(mut t: api::Task, state: api::TaskState, version: u64) -> api::Task {
    t.set_state(state);
    t.version = version;
    t
}

fn pending_ids(rx: &Receiver, source: &str) -> Vec<String> {
    let mut ids: Vec<String> = rx
        .pending_of(source)
        .map(|(_, t)| t.into_iter().map(|t| t.task_id).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Change batches: folded onto the snapshot in order and durable across a
/// reopen; a tampered, replayed, older or cross-domain batch is refused and
/// the copy kept; a batch with a task the receiver may not hold is refused.
#[test]
fn change_batches_fold_in_and_bad_ones_change_nothing() {
    use api::TaskState::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = policy(&seed());
    let (key, ring) = ring();
    let stats = Stats::default();
    let rx = Receiver::open("europe", dir.path(), Some(ring.clone()), Limits::default());
    let tx = Sender::new(key);
    let a = with_state(task("north_america", 0, "US"), Queued, 1);
    let b = with_state(task("north_america", 0, "US"), Queued, 1);
    rx.receive(&p, &tx.seal("north_america", 5, 1, vec![a.clone()]), &stats)
        .expect("snapshot");
    // A batch: b accepted, a leased.
    let first = tx.seal_changes(
        "north_america",
        5,
        2,
        vec![b.clone(), with_state(a.clone(), Leased, 2)],
    );
    let got = rx.receive_changes(&p, &first, &stats).expect("batch");
    assert!(!got.snapshot_wanted);
    let mut both = vec![a.task_id.clone(), b.task_id.clone()];
    both.sort();
    assert_eq!(pending_ids(&rx, "north_america"), both);
    // a completes: it leaves the pending set.
    let done = tx.seal_changes(
        "north_america",
        5,
        3,
        vec![with_state(a.clone(), Succeeded, 3)],
    );
    rx.receive_changes(&p, &done, &stats).expect("batch");
    assert_eq!(pending_ids(&rx, "north_america"), vec![b.task_id.clone()]);
    let held = pending_ids(&rx, "north_america");

    // Tampered (a flipped byte): refused, copy kept.
    let mut flipped = tx.seal_changes(
        "north_america",
        5,
        4,
        vec![with_state(b.clone(), Succeeded, 3)],
    );
    let last = flipped.len() - 1;
    flipped[last].ciphertext[0] ^= 1;
    assert!(matches!(
        rx.receive_changes(&p, &flipped, &stats),
        Err(Rejection::Envelope(EnvelopeError::Auth(_)))
    ));
    // Replayed, and older (a lower epoch): refused.
    assert!(matches!(
        rx.receive_changes(&p, &first, &stats),
        Err(Rejection::Replay { .. })
    ));
    let older = tx.seal_changes(
        "north_america",
        4,
        50,
        vec![with_state(b.clone(), Succeeded, 9)],
    );
    assert!(matches!(
        rx.receive_changes(&p, &older, &stats),
        Err(Rejection::Replay { .. })
    ));
    // A snapshot offered as a batch, and a batch offered as a snapshot: the
    // domains differ, authentication fails.
    let snap = tx.seal("north_america", 5, 7, vec![]);
    assert!(matches!(
        rx.receive_changes(&p, &snap, &stats),
        Err(Rejection::Envelope(EnvelopeError::Auth(_)))
    ));
    let batch = tx.seal_changes("north_america", 5, 8, vec![]);
    assert!(matches!(
        rx.receive(&p, &batch, &stats),
        Err(Rejection::Envelope(EnvelopeError::Auth(_)))
    ));
    assert_eq!(pending_ids(&rx, "north_america"), held, "copy kept");

    // Residency: under the GDPR variant north_america may not hold europe's
    // DE task; a batch carrying one is refused and nothing is stored.
    let strict = policy(federation_sandbox::SEED_REQUIRES_GDPR);
    let na_dir = tempfile::tempdir().expect("tempdir");
    let na = Receiver::open(
        "north_america",
        na_dir.path(),
        Some(ring.clone()),
        Limits::default(),
    );
    let de = tx.seal_changes("europe", 5, 1, vec![task("europe", 1, "DE")]);
    let why = na
        .receive_changes(&strict, &de, &stats)
        .expect_err("residency");
    assert!(why.to_string().contains("GDPR"), "{why}");
    assert!(!super::receiver::changes_path(na_dir.path(), "europe").exists());
    assert!(na.pending_of("europe").is_none());
    // A region in no rule may send nothing.
    let ap = tx.seal_changes("asia_pacific", 5, 1, vec![]);
    assert!(matches!(
        rx.receive_changes(&p, &ap, &stats),
        Err(Rejection::NotPermitted(_))
    ));

    // Durable: a reopened receiver rebuilds the same copy from the snapshot
    // and the change log, and still refuses the replay.
    let reopened = Receiver::open("europe", dir.path(), Some(ring.clone()), Limits::default());
    assert_eq!(pending_ids(&reopened, "north_america"), held);
    assert!(matches!(
        reopened.receive_changes(&p, &done, &stats),
        Err(Rejection::Replay { .. })
    ));
    // A torn last append is cut off at reopen; what came before stays.
    let log = super::receiver::changes_path(dir.path(), "north_america");
    let good_len = std::fs::metadata(&log).expect("log").len();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open");
        f.write_all(&[0x80, 0x80, 0x80]).expect("torn");
    }
    let reopened = Receiver::open("europe", dir.path(), Some(ring.clone()), Limits::default());
    assert_eq!(pending_ids(&reopened, "north_america"), held);
    assert_eq!(std::fs::metadata(&log).expect("log").len(), good_len);
    // A newer snapshot folds the log away.
    reopened
        .receive(&p, &tx.seal("north_america", 5, 9, vec![b.clone()]), &stats)
        .expect("snapshot");
    assert!(!log.exists());
    assert_eq!(
        pending_ids(&reopened, "north_america"),
        vec![b.task_id.clone()]
    );

    // No snapshot held yet: the batch is folded in and a snapshot asked for.
    let fresh = tempfile::tempdir().expect("tempdir");
    let rx2 = Receiver::open("europe", fresh.path(), Some(ring), Limits::default());
    let got = rx2
        .receive_changes(
            &p,
            &tx.seal_changes("north_america", 6, 1, vec![b.clone()]),
            &stats,
        )
        .expect("batch");
    assert!(got.snapshot_wanted);
    assert_eq!(pending_ids(&rx2, "north_america"), [b.task_id]);
}

#[test]
fn every_stored_snapshot_anomaly_is_reported_once_counted_and_shown() {
    let p = policy(&seed());
    let (key, ring) = ring();
    let tx = Sender::new(key);
    let eu = tempfile::tempdir().expect("tempdir");
    let na = tempfile::tempdir().expect("tempdir");
    let limits = Limits::default();
    let rx = Receiver::open("europe", eu.path(), Some(ring.clone()), limits);
    let good = tx.seal("north_america", 5, 1, many_tasks(3));
    rx.receive(&p, &good, &rx.shared_stats()).expect("accepted");
    assert_eq!(rx.problem("north_america"), None);
    let path = snapshot_path(eu.path(), "north_america");
    let original = std::fs::read(&path).expect("stored");

    // Deleted while running: the heartbeat check reports it once.
    std::fs::remove_file(&path).expect("rm");
    rx.check_stored();
    rx.check_stored();
    assert!(rx.stored("north_america").is_none());
    let s = rx.shared_stats().snapshot();
    assert_eq!(s.stored_missing, 1, "{s:?}");
    assert!(
        rx.problem("north_america")
            .is_some_and(|p| p.starts_with("missing: ")),
        "{:?}",
        rx.problem("north_america")
    );

    // Deleted while stopped: found at open from the manifest, and replay
    // protection survives the loss of the file.
    let reopened = Receiver::open("europe", eu.path(), Some(ring.clone()), limits);
    assert_eq!(reopened.shared_stats().snapshot().stored_missing, 1);
    assert!(matches!(
        reopened.receive(&p, &good, &reopened.shared_stats()),
        Err(Rejection::Replay { .. })
    ));

    // Replaced by another region's snapshot (europe's, as north_america
    // holds it): never taken for north_america's.
    let na_rx = Receiver::open("north_america", na.path(), Some(ring.clone()), limits);
    na_rx
        .receive(
            &p,
            &tx.seal("europe", 7, 1, vec![task("europe", 1, "DE")]),
            &na_rx.shared_stats(),
        )
        .expect("accepted");
    std::fs::copy(snapshot_path(na.path(), "europe"), &path).expect("copy");
    let reopened = Receiver::open("europe", eu.path(), Some(ring.clone()), limits);
    assert!(reopened.stored("north_america").is_none());
    let s = reopened.shared_stats().snapshot();
    assert_eq!((s.stored_wrong_source, s.stored_missing), (1, 0), "{s:?}");
    assert!(
        reopened
            .problem("north_america")
            .is_some_and(|p| p.contains("holds a snapshot of `europe`")),
        "{:?}",
        reopened.problem("north_america")
    );

    // Unreadable (a flipped byte), found at open; counted in the same
    // rejection family as refused pushes.
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    std::fs::write(&path, &flipped).expect("write");
    let reopened = Receiver::open("europe", eu.path(), Some(ring.clone()), limits);
    let stats = reopened.shared_stats();
    assert_eq!(stats.snapshot().stored_unreadable, 1);
    assert!(stats.rejections().contains(&("stored_unreadable", 1)));
    // A good newer snapshot clears the problem.
    reopened
        .receive(&p, &tx.seal("north_america", 5, 2, many_tasks(1)), &stats)
        .expect("newer");
    assert_eq!(reopened.problem("north_america"), None);
    assert!(reopened.stored("north_america").is_some());
}

#[test]
fn change_batches_go_to_peers_heard_from_and_not_dead() {
    use crate::policy::Health;
    assert!(super::takes_changes(Some(&Health::Alive)));
    assert!(super::takes_changes(Some(&Health::Suspect)));
    // A peer never heard from (a backup down when this controller started)
    // and a dead one: their changes wait in the outbox, not sealed anew
    // each heartbeat.
    assert!(!super::takes_changes(Some(&Health::Unknown)));
    assert!(!super::takes_changes(Some(&Health::Dead)));
    // Not in the membership table at all: as before, tried.
    assert!(super::takes_changes(None));
}
