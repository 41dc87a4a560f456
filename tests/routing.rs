//! Routing per rule, forwarding from an entry region that does not own the
//! task, fail-closed rejections with reasons, idempotent resubmission and
//! bad requests — against real controller processes on loopback.

mod support;

use federation_api as api;
use federation_sandbox::string_attrs;
use support::*;
use tonic::Code;

fn submit(attrs: &[(&str, &str)]) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(attrs),
        payload: b"hello".to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_rule_from_any_entry_and_rejects_with_reasons() {
    let sandbox = formed(seed_sandbox().agents(1, 2)).await;

    // Rule 1 and rule 2, entered at every region: the owner is always the
    // rule's primary, whichever controller the client called.
    for entry in ["north_america", "europe", "asia_pacific"] {
        let mut client = sandbox.client(entry).await.expect("client");
        for (customer, owner, rule) in [
            ("US", "north_america", 0),
            ("CA", "north_america", 0),
            ("DE", "europe", 1),
            ("FR", "europe", 1),
        ] {
            let resp = client
                .submit_task(submit(&[("customer_region", customer)]))
                .await
                .unwrap_or_else(|s| panic!("{customer} via {entry}: {s}"))
                .into_inner();
            assert_eq!(resp.region, owner, "{customer} via {entry}");
            let d = resp.decision.expect("decision");
            assert_eq!(d.outcome, "routed");
            assert_eq!(d.rule_index, rule);
            assert!(
                resp.task_id.ends_with(&format!(".{owner}")),
                "{}",
                resp.task_id
            );
            // Readable from the entry (relayed) and it runs to completion.
            let t = sandbox
                .wait_terminal(entry, &resp.task_id, PATIENCE)
                .await
                .expect("terminal");
            assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
            assert_eq!(t.owner_region, owner);
            assert_eq!(t.result, b"hello", "cat echoes the payload");
        }
    }

    // No rule: fail closed, FAILED_PRECONDITION, message says so.
    let mut client = sandbox.client("europe").await.expect("client");
    let err = client
        .submit_task(submit(&[("customer_region", "JP")]))
        .await
        .expect_err("JP matches no rule");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("no routing rule matches"),
        "{}",
        err.message()
    );

    // Missing attribute: the rules cannot match, rejected the same way.
    let err = client
        .submit_task(submit(&[("data_class", "pii")]))
        .await
        .expect_err("no customer_region");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // Explain matches what submit did, without creating anything.
    let explained = client
        .explain_route(api::ExplainRouteRequest {
            attributes: string_attrs(&[("customer_region", "UK")]),
            assume_down: vec!["europe".into()],
            assume_full: vec![],
        })
        .await
        .expect("explain")
        .into_inner()
        .decision
        .expect("decision");
    assert_eq!(explained.outcome, "failover");
    assert_eq!(explained.region, "north_america");
    assert!(
        explained.warnings.iter().any(|w| w.contains("GDPR")),
        "{explained:?}"
    );

    // Every decision is in the entry region's hash-chained log: four routed
    // tasks per entry, plus europe's two rejections; owners log forwards in.
    for region in ["north_america", "europe", "asia_pacific"] {
        let log = sandbox
            .data_dir(region)
            .expect("dir")
            .join("decisions.jsonl");
        let report = federation::audit::verify(&log).expect("verifies");
        assert!(report.is_intact(), "{region}: {report:?}");
        let routed = federation::audit::show(
            &log,
            &federation::audit::Filter {
                outcome: Some("routed".into()),
                ..Default::default()
            },
        )
        .expect("show")
        .into_iter()
        .filter(|r| r.entry.kind == federation::audit::kind::ROUTE)
        .count();
        assert_eq!(routed, 4, "{region}: one route record per task it routed");
    }
    let eu_log = sandbox
        .data_dir("europe")
        .expect("dir")
        .join("decisions.jsonl");
    let rejected = federation::audit::show(
        &eu_log,
        &federation::audit::Filter {
            outcome: Some("rejected".into()),
            ..Default::default()
        },
    )
    .expect("show");
    assert_eq!(
        rejected.len(),
        2,
        "JP and the attribute-less task: {rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_resubmission_and_bad_requests() {
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let mut na = sandbox.client("north_america").await.expect("client");
    let mut eu = sandbox.client("europe").await.expect("client");

    // Same key, different entry controllers: one task.
    let mut req = submit(&[("customer_region", "DE")]);
    req.idempotency_key = "order-42".into();
    let first = na
        .submit_task(req.clone())
        .await
        .expect("first")
        .into_inner();
    let again = eu
        .submit_task(req.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first.task_id, again.task_id);
    assert!(!first.deduplicated);
    assert!(again.deduplicated);

    // Malformed requests: clear codes naming the field, nothing created.
    let err = na
        .submit_task(api::SubmitTaskRequest::default())
        .await
        .expect_err("no attributes");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("attributes"), "{}", err.message());

    let mut bad_key = submit(&[("customer_region", "US")]);
    bad_key.idempotency_key = "has spaces".into();
    let err = na.submit_task(bad_key).await.expect_err("bad key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );

    let mut big = submit(&[("customer_region", "US")]);
    big.payload = vec![0u8; 5 << 20];
    let err = na.submit_task(big).await.expect_err("oversized");
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{:?} {}",
        err.code(),
        err.message()
    );

    let err = na
        .get_task(api::GetTaskRequest {
            task_id: "not-a-task".into(),
        })
        .await
        .expect_err("malformed id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("task_id"), "{}", err.message());

    let unknown = format!("{}.europe", "0190d6a4-1f55-7000-8000-000000000000");
    let err = na
        .get_task(api::GetTaskRequest { task_id: unknown })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // The good task is still there and unchanged.
    let t = eu
        .get_task(api::GetTaskRequest {
            task_id: first.task_id.clone(),
        })
        .await
        .expect("still there")
        .into_inner()
        .task
        .expect("task");
    assert_eq!(t.state(), api::TaskState::Queued);
    assert_eq!(t.idempotency_key, "order-42");

    // A peer sending garbage does not crash a controller.
    let channel = sandbox
        .peer_channel("europe", "asia_pacific")
        .await
        .expect("channel");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(channel);
    let err = peer
        .advertise(api::AdvertiseRequest {
            origin: None,
            known: vec![],
            digest: None,
        })
        .await
        .expect_err("no origin");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = peer
        .forward_task(api::ForwardTaskRequest {
            task_id: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("garbage forward");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Still serving.
    eu.get_task(api::GetTaskRequest {
        task_id: first.task_id,
    })
    .await
    .expect("alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_task_is_refused_by_a_region_the_rule_does_not_allow() {
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    // A (buggy or malicious) peer forwards a DE task to asia_pacific, which no
    // rule allows: asia_pacific re-checks residency and refuses.
    let channel = sandbox
        .peer_channel("asia_pacific", "north_america")
        .await
        .expect("channel");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(channel);
    let err = peer
        .forward_task(api::ForwardTaskRequest {
            task_id: federation::wire::new_task_id("asia_pacific"),
            submit: Some(submit(&[("customer_region", "DE")])),
            entry_region: "north_america".into(),
            decision: None,
            relayed_by: String::new(),
        })
        .await
        .expect_err("residency violation refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("residency"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_cancel_are_relayed_to_the_owner() {
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let mut na = sandbox.client("north_america").await.expect("client");
    let mut ap = sandbox.client("asia_pacific").await.expect("client");
    // No agents: the task stays queued in europe.
    let id = na
        .submit_task(submit(&[("customer_region", "UK")]))
        .await
        .expect("accepted")
        .into_inner()
        .task_id;
    let mut stream = ap
        .watch_task(api::WatchTaskRequest {
            task_id: id.clone(),
        })
        .await
        .expect("watch through asia_pacific")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("event")
        .expect("first event")
        .task
        .expect("task");
    assert_eq!(first.state(), api::TaskState::Queued);
    assert_eq!(first.owner_region, "europe");

    let cancelled = na
        .cancel_task(api::CancelTaskRequest {
            task_id: id.clone(),
            reason: "customer withdrew".into(),
        })
        .await
        .expect("cancel through north_america")
        .into_inner();
    assert!(cancelled.cancelled);
    let mut last = None;
    for _ in 0..10 {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("watch event in time")
        {
            Ok(Some(ev)) => last = ev.task,
            Ok(None) => break,
            Err(s) => panic!("watch failed: {s}"),
        }
    }
    let last = last.expect("a change after the first event");
    assert_eq!(last.state(), api::TaskState::Cancelled);
    assert!(last.error.contains("customer withdrew"), "{last:?}");
    // Cancelling again is not an error, and says it did nothing.
    let again = ap
        .cancel_task(api::CancelTaskRequest {
            task_id: id,
            reason: String::new(),
        })
        .await
        .expect("second cancel")
        .into_inner();
    assert!(!again.cancelled);
}
