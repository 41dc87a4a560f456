//! `federation snapshot inspect`: summarises a stored snapshot (either body
//! format) with the right key ring, and says so and exits non-zero with a
//! wrong one.

use std::process::Command;

use federation::replication::envelope::{self, NonceSource, SealParams};
use federation::replication::{Key, KeyRing, SnapshotBody, columnar, receiver};
use prost::Message as _;

#[test]
fn inspect_summarises_and_refuses_a_wrong_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = Key::new("k1", [5u8; 32]);
    let body = SnapshotBody {
        source_region: "north_america".into(),
        epoch: 7,
        sequence: 3,
        tasks: (0..4)
            .map(|i| federation_api::Task {
                task_id: format!("{}.north_america", uuid::Uuid::now_v7()),
                rule_index: i % 2,
                state: federation_api::TaskState::Queued as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let params = SealParams {
        source: "north_america".into(),
        epoch: 7,
        sequence: 3,
        rule_indexes: vec![0, 1],
        policy_hash: "h".into(),
        compression: Some(3),
        chunk_size: 1024,
    };
    let good = dir.path().join("good.keys");
    std::fs::write(&good, KeyRing::line("k1", &[5u8; 32])).expect("keys");
    let wrong = dir.path().join("wrong.keys");
    std::fs::write(&wrong, KeyRing::line("k1", &[6u8; 32])).expect("keys");
    let snap = dir.path().join("north_america.snap");
    // Format 1 (prost, what older controllers write) and format 2.
    let formats = [
        (1, body.encode_to_vec()),
        (2, columnar::encode(&body).expect("encode")),
    ];
    for (format, plain) in formats {
        let chunks = envelope::seal(&plain, &params, &key, &NonceSource::new()).expect("seal");
        receiver::write_file(&snap, &chunks).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_federation"))
            .args(["snapshot", "inspect"])
            .arg(&snap)
            .arg("--keys")
            .arg(&good)
            .args(["--format", "json"])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "format {format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["body_format"], format);
        assert_eq!(v["source"], "north_america");
        assert_eq!(
            (v["epoch"].as_u64(), v["sequence"].as_u64()),
            (Some(7), Some(3))
        );
        assert_eq!(v["key_id"], "k1");
        assert_eq!(v["tasks"], 4);
        assert_eq!(v["tasks_by_rule"]["rule 1"]["QUEUED"], 2);
        let ids: Vec<String> = body.tasks.iter().map(|t| t.task_id.clone()).collect();
        assert_eq!(v["task_ids"], serde_json::json!(ids), "format {format}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_federation"))
        .args(["snapshot", "inspect"])
        .arg(&snap)
        .arg("--keys")
        .arg(&wrong)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot decrypt") && err.contains("wrong key"),
        "{err}"
    );
}
