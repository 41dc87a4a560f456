//! The task store's behaviour contract: every test body here runs against
//! both backends (`redb::…` on a temporary data directory, `postgres::…` on
//! a fresh database of this binary's one PostgreSQL server,
//! [`federation_sandbox::pg::shared`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use federation_api::{Takeover, Task, TaskState};

use super::*;
use crate::audit::DecisionLog;

const TTL: Duration = Duration::from_secs(30);

use federation_sandbox::fixtures::queued_task as task;

/// Which backend a contract test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Redb,
    Postgres,
}

/// One test's store: a data directory, or a database of its own.
pub(crate) struct Fixture {
    kind: Kind,
    dir: tempfile::TempDir,
    url: Option<String>,
}

impl Fixture {
    pub(crate) fn new(kind: Kind) -> Self {
        let url = match kind {
            Kind::Redb => None,
            Kind::Postgres => Some(
                federation_sandbox::pg::shared()
                    .and_then(|pg| pg.create_database("contract"))
                    .expect("a database of the test server (is PostgreSQL installed?)"),
            ),
        };
        Self {
            kind,
            dir: tempfile::tempdir().expect("tempdir"),
            url,
        }
    }

    pub(crate) fn pg(&self) -> crate::pg::Pg {
        let url = self.url.as_deref().expect("a postgres fixture");
        crate::pg::Pg::connect(url, 4, "contract-test").expect("connect")
    }

    fn open_with(&self, options: StoreOptions) -> TaskStore {
        match self.kind {
            Kind::Redb => TaskStore::open_with(self.dir.path(), options).expect("open store"),
            // Three writer transactions in flight (the pool's four less
            // one): every contract test runs against overlapping batches.
            Kind::Postgres => TaskStore::open_postgres(
                &self.pg(),
                "europe",
                StoreOptions {
                    writer_transactions: 3,
                    ..options
                },
            )
            .expect("open store"),
        }
    }

    /// Opens the store (again: a reopen after the last one was dropped).
    pub(crate) fn open(&self) -> TaskStore {
        self.open_with(StoreOptions::default())
    }

    /// Opens the store with a manual clock.
    pub(crate) fn open_manual(&self, clock: &ManualClock) -> TaskStore {
        self.open_with(StoreOptions {
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        })
    }

    /// The decision log beside `store`, bound to it as its journal.
    pub(crate) fn bound_log(&self, store: &TaskStore, region: &str) -> DecisionLog {
        let log = self.log(region);
        store.bind_journal(Arc::new(log.clone())).expect("bind");
        log
    }

    /// The decision log beside the store.
    pub(crate) fn log(&self, region: &str) -> DecisionLog {
        match self.kind {
            Kind::Redb => DecisionLog::open(&self.dir.path().join("log"), region).expect("log"),
            Kind::Postgres => DecisionLog::open_postgres(&self.pg(), region).expect("log"),
        }
    }

    /// The log's records as the JSON-lines file holds them (for
    /// PostgreSQL, what `audit export` writes).
    pub(crate) fn log_bytes(&self, log: &DecisionLog, region: &str) -> Vec<u8> {
        match self.kind {
            Kind::Redb => std::fs::read(log.path()).expect("read log"),
            Kind::Postgres => {
                let pg = self.pg();
                let pg2 = pg.clone();
                let region = region.to_string();
                pg.block(async move { crate::audit::postgres::export(&pg2, &region).await })
                    .expect("export")
            }
        }
    }
}

/// Runs each named contract test on both backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::new(super::Kind::Redb)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::new(super::Kind::Postgres)).await;
                }
            )*
        }
    };
}

contract!(
    insert_sets_state_version_and_times,
    idempotency_key_and_task_id_deduplicate,
    a_key_reused_for_other_content_is_refused_naming_what_differs,
    idempotency_keys_survive_a_reopen,
    a_record_goes_in_the_same_batch_and_names_the_stored_task,
    a_batch_insert_is_one_transaction_with_its_records,
    a_store_is_bound_to_one_journal,
    idempotency_within_one_batch,
    lease_order_is_priority_then_age,
    a_lease_fence_holds_back_the_owners_tasks_created_before_it,
    only_the_holder_renews_and_completes,
    expired_leases_requeue_then_fail,
    requeue_agent_returns_only_its_tasks,
    agents_and_their_leases_survive_a_reopen,
    cancel_queued_leased_and_terminal,
    mark_taken_over_fences_pending_tasks,
    concurrent_inserts_are_durable_and_distinct,
    a_cancel_sent_right_after_its_insert_finds_the_task,
    one_task_per_key_when_concurrent_batches_carry_the_same_keys,
    reopen_keeps_everything_and_counts,
    subscribe_and_wait_for_queued,
);

async fn insert_sets_state_version_and_times(fx: Fixture) {
    let clock = ManualClock::new(1_000);
    let store = fx.open_manual(&clock);
    let out = store.insert(task("a")).await.expect("insert");
    let t = out.task();
    assert!(!out.is_deduplicated());
    assert_eq!(t.state(), TaskState::Queued);
    assert_eq!(t.version, 1);
    assert_eq!(t.created_unix_ms, 1_000);
    assert_eq!(t.updated_unix_ms, 1_000);
    assert_eq!(store.get("a").expect("get").as_ref(), Some(t));
    assert_eq!(store.get("missing").expect("get"), None);
    assert!(matches!(
        store.insert(task("")).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn idempotency_key_and_task_id_deduplicate(fx: Fixture) {
    let store = fx.open();
    let mut a = task("a");
    a.idempotency_key = "k1".into();
    let first = store.insert(a).await.expect("insert");
    let mut b = task("b");
    b.idempotency_key = "k1".into();
    let second = store.insert(b).await.expect("insert");
    assert!(second.is_deduplicated());
    assert_eq!(second.task().task_id, "a");
    assert_eq!(store.get("b").expect("get"), None);
    // Same id again (a retried forward): the stored task, unchanged.
    let again = store.insert(task("a")).await.expect("insert");
    assert!(again.is_deduplicated());
    assert_eq!(again.task(), first.task());
    assert_eq!(store.counts().queued, 1);
}

async fn a_key_reused_for_other_content_is_refused_naming_what_differs(fx: Fixture) {
    let store = fx.open();
    let with = |id: &str, customer: &str, payload: &[u8]| {
        let mut t = task(id);
        t.idempotency_key = "k1".into();
        t.attributes = federation_sandbox::string_attrs(&[("customer_region", customer)]);
        t.payload = payload.to_vec();
        t
    };
    store.insert(with("a", "US", b"p")).await.expect("insert");
    for (customer, payload, differs) in [
        ("CA", &b"p"[..], "attributes"),
        ("US", &b"q"[..], "payload"),
        ("CA", &b"q"[..], "attributes and payload"),
    ] {
        let err = store
            .insert(with("b", customer, payload))
            .await
            .expect_err("refused");
        assert_eq!(
            err,
            StoreError::KeyReused {
                key: "k1".into(),
                task_id: "a".into(),
                differs
            }
        );
        let shown = err.to_string();
        assert!(shown.contains("`k1`") && shown.contains(differs), "{shown}");
    }
    assert_eq!(store.get("b").expect("get"), None);
    // The same content is still the original task.
    let again = store.insert(with("c", "US", b"p")).await.expect("insert");
    assert!(again.is_deduplicated());
    assert_eq!(again.task().task_id, "a");
}

async fn idempotency_keys_survive_a_reopen(fx: Fixture) {
    // The key index lives in memory and is rebuilt from the task records.
    {
        let store = fx.open();
        let mut a = task("a");
        a.idempotency_key = "k1".into();
        store.insert(a).await.expect("insert");
    }
    let store = fx.open();
    let mut b = task("b");
    b.idempotency_key = "k1".into();
    let out = store.insert(b).await.expect("insert");
    assert!(out.is_deduplicated());
    assert_eq!(out.task().task_id, "a");
    assert_eq!(store.get("b").expect("get"), None);
}

/// A decision of rule 1 routing to europe, for tests that record one.
fn routed_to_europe() -> crate::policy::Decision {
    use crate::policy::{Decision, Outcome};
    Decision {
        outcome: Outcome::Routed {
            region: "europe".into(),
        },
        rule_index: Some(0),
        rule: Some("rule 1".into()),
        required_tags: Default::default(),
        candidates: vec![],
        reason: "rule 1 matched".into(),
        policy_hash: "h".into(),
        warnings: vec![],
        evaluation_errors: vec![],
        balance: None,
    }
}

async fn a_record_goes_in_the_same_batch_and_names_the_stored_task(fx: Fixture) {
    use crate::audit::{Prepared, kind};
    use crate::policy::{AttrValue, Attributes};
    let store = fx.open();
    let log = fx.bound_log(&store, "europe");
    let attrs: Attributes = [("customer_region".to_string(), AttrValue::Str("DE".into()))].into();
    let decision = routed_to_europe();
    let record = |id: &str| {
        Prepared::decision(
            kind::ROUTE,
            Some(id),
            Some("europe"),
            &attrs,
            &decision,
            None,
        )
    };
    let mut a = task("a");
    a.idempotency_key = "k1".into();
    let first = store.insert_recorded(a, record("a")).await;
    assert!(!first.outcome.expect("insert").is_deduplicated());
    assert_eq!(first.record, RecordState::Written);
    // Known key: the record names the stored task, not the id offered.
    let mut b = task("b");
    b.idempotency_key = "k1".into();
    let second = store.insert_recorded(b, record("b")).await;
    assert_eq!(second.outcome.expect("insert").task().task_id, "a");
    assert_eq!(second.record, RecordState::Written);
    // A refused insert appends nothing.
    let refused = store.insert_recorded(task(""), record("")).await;
    assert!(matches!(refused.outcome, Err(StoreError::Invalid(_))));
    assert_eq!(refused.record, RecordState::NotWritten);
    // Concurrent recorded inserts share batches; the chain stays intact.
    let mut handles = Vec::new();
    for i in 0..50 {
        let (store, r) = (store.clone(), record(&format!("c{i}")));
        handles.push(tokio::spawn(async move {
            store
                .insert_recorded(task(&format!("c{i}")), r)
                .await
                .record
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("join"), RecordState::Written);
    }
    // The file is appended after the commit (records staged in the
    // store's transaction): wait for it before reading the file.
    log.flush().await.expect("flush the log");
    let bytes = fx.log_bytes(&log, "europe");
    let report = crate::audit::verify_bytes(&bytes);
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 52);
    let named: Vec<_> = crate::audit::show_bytes(log.path(), &bytes, &Default::default())
        .expect("show")
        .into_iter()
        .filter_map(|r| r.entry.task_id)
        .collect();
    assert_eq!(&named[..2], ["a", "a"]);
}

async fn a_batch_insert_is_one_transaction_with_its_records(fx: Fixture) {
    use crate::audit::{Entry, Prepared, kind};
    let store = fx.open();
    let log = fx.bound_log(&store, "europe");
    let mut a = task("a");
    a.idempotency_key = "k1".into();
    a.payload = b"p".to_vec();
    store.insert(a).await.expect("insert");
    let before = store.mark();
    let mut reused = task("c");
    reused.idempotency_key = "k1".into();
    reused.payload = b"other".to_vec();
    let tasks = vec![task("b"), task("a"), reused, task(""), task("d")];
    let records = tasks
        .iter()
        .map(|t| Prepared::entry(&Entry::new(kind::TAKEOVER).task(&t.task_id)))
        .collect();
    let out = store.insert_batch(tasks, Some(records)).await;
    let outcomes = out.outcomes.expect("the batch commits");
    assert_eq!(outcomes.len(), 5);
    assert!(matches!(&outcomes[0], Ok(InsertOutcome::Created(t)) if t.task_id == "b"));
    assert!(matches!(&outcomes[1], Ok(InsertOutcome::Deduplicated(t)) if t.task_id == "a"));
    assert!(
        matches!(&outcomes[2], Err(StoreError::KeyReused { task_id, .. }) if task_id == "a"),
        "{:?}",
        outcomes[2]
    );
    assert!(matches!(&outcomes[3], Err(StoreError::Invalid(_))));
    assert!(matches!(&outcomes[4], Ok(InsertOutcome::Created(t)) if t.task_id == "d"));
    // One transaction: the marks moved once, by the two tasks created.
    let after = store.mark();
    assert_eq!(after.commit, before.commit + 1, "{before:?} -> {after:?}");
    assert_eq!(after.created, before.created + 2, "{before:?} -> {after:?}");
    // A refused task stored nothing; the others are there.
    assert_eq!(store.get("c").expect("get"), None);
    assert!(store.get("b").expect("get").is_some());
    assert!(store.get("d").expect("get").is_some());
    assert_eq!(store.counts().queued, 3);
    // Records only for the tasks created, in the same batch.
    assert_eq!(out.record, RecordState::Written);
    // The file is appended after the commit (records staged in the
    // store's transaction): wait for it before reading the file.
    log.flush().await.expect("flush the log");
    let bytes = fx.log_bytes(&log, "europe");
    let report = crate::audit::verify_bytes(&bytes);
    assert!(report.is_intact(), "{report:?}");
    let named: Vec<_> = crate::audit::show_bytes(log.path(), &bytes, &Default::default())
        .expect("show")
        .into_iter()
        .filter_map(|r| r.entry.task_id)
        .collect();
    assert_eq!(named, ["b", "d"]);
    // An empty batch is a no-op that still answers.
    let empty = store.insert_batch(Vec::new(), None).await;
    assert!(empty.outcomes.expect("empty batch").is_empty());
}

/// The journal is bound once; a record offered to a store with none is
/// answered as failed (the insert itself is made), never silently dropped.
async fn a_store_is_bound_to_one_journal(fx: Fixture) {
    use crate::audit::{Entry, Prepared, kind};
    let store = fx.open();
    let record = |id: &str| Prepared::entry(&Entry::new(kind::ROUTE).task(id));
    let unbound = store.insert_recorded(task("a"), record("a")).await;
    assert!(!unbound.outcome.expect("insert").is_deduplicated());
    assert!(
        matches!(&unbound.record, RecordState::Failed(why) if why.contains("no decision log")),
        "{:?}",
        unbound.record
    );
    let batch = store
        .insert_batch(vec![task("b")], Some(vec![record("b")]))
        .await;
    assert_eq!(batch.outcomes.expect("batch").len(), 1);
    assert!(matches!(batch.record, RecordState::Failed(_)));
    let log = fx.bound_log(&store, "europe");
    assert!(matches!(
        store.bind_journal(Arc::new(log.clone())),
        Err(StoreError::Invalid(_))
    ));
    let bound = store.insert_recorded(task("c"), record("c")).await;
    assert_eq!(bound.record, RecordState::Written);
    // The file is appended after the commit (records staged in the
    // store's transaction): wait for it before reading the file.
    log.flush().await.expect("flush the log");
    let bytes = fx.log_bytes(&log, "europe");
    let report = crate::audit::verify_bytes(&bytes);
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 1);
}

async fn idempotency_within_one_batch(fx: Fixture) {
    let store = fx.open();
    let mut handles = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut t = task(&format!("t{i}"));
            t.idempotency_key = "same".into();
            store.insert(t).await.expect("insert")
        }));
    }
    let mut created = 0;
    let mut ids = HashSet::new();
    for h in handles {
        let out = h.await.expect("join");
        if !out.is_deduplicated() {
            created += 1;
        }
        ids.insert(out.task().task_id.clone());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(store.counts().queued, 1);
}

async fn lease_order_is_priority_then_age(fx: Fixture) {
    let clock = ManualClock::new(10_000);
    let store = fx.open_manual(&clock);
    for (id, prio) in [("low-old", 0), ("high", 5), ("low-new", 0), ("neg", -3)] {
        let mut t = task(id);
        t.priority = prio;
        store.insert(t).await.expect("insert");
        clock.advance(1);
    }
    let got = store.lease("agent-1", 3, TTL).await.expect("lease");
    let ids: Vec<_> = got.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["high", "low-old", "low-new"]);
    for t in &got {
        assert_eq!(t.state(), TaskState::Leased);
        assert_eq!(t.agent_id, "agent-1");
        assert_eq!(t.attempts, 1);
        assert_eq!(t.version, 2);
        assert_eq!(t.lease_deadline_unix_ms, clock.now_ms() + 30_000);
    }
    let rest = store.lease("agent-2", 10, TTL).await.expect("lease");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].task_id, "neg");
    assert!(
        store
            .lease("agent-2", 10, TTL)
            .await
            .expect("lease")
            .is_empty()
    );
    let c = store.counts();
    assert_eq!((c.queued, c.leased), (0, 4));
}

async fn a_lease_fence_holds_back_the_owners_tasks_created_before_it(fx: Fixture) {
    let id = |n: u32, owner: &str| format!("0190b0a0-0000-7000-8000-{n:012}.{owner}");
    let clock = ManualClock::new(10_000);
    {
        let store = fx.open_manual(&clock);
        assert_eq!(store.newest_created_ms().expect("newest"), 0);
        for n in 1..=2 {
            store.insert(task(&id(n, "europe"))).await.expect("insert");
            clock.advance(1);
        }
        // Taken over from north_america: created by its clock, far ahead.
        let mut theirs = task(&id(3, "north_america"));
        theirs.created_unix_ms = 99_000;
        theirs.taken_over = Some(Takeover {
            from_region: "north_america".into(),
            from_epoch: 1,
            to_region: "europe".into(),
            at_unix_ms: 10_002,
        });
        store.insert(theirs).await.expect("insert");
        // The newest of ours (the taken-over one's clock is not ours).
        assert_eq!(store.newest_created_ms().expect("newest"), 10_001);
        store.flush().await.expect("flush");
    }
    // Reopened (a restart): the newest creation time is still known.
    let store = fx.open_manual(&clock);
    assert_eq!(store.newest_created_ms().expect("newest"), 10_001);
    clock.advance(10);
    let fence = Arc::new(LeaseFence::new("europe", clock.now_ms(), 3));
    store.insert(task(&id(4, "europe"))).await.expect("insert");
    let got = store
        .lease_except("ag", 10, TTL, Some(fence.clone()))
        .await
        .expect("lease");
    let mut ids: Vec<String> = got.into_iter().map(|t| t.task_id).collect();
    ids.sort();
    assert_eq!(ids, [id(3, "north_america"), id(4, "europe")]);
    assert!(
        store
            .lease_except("ag", 10, TTL, Some(fence))
            .await
            .expect("lease")
            .is_empty(),
        "the tasks from before the fence stay queued"
    );
    assert_eq!(store.counts().queued, 2);
    // Once the fence lifts, they are leased in order.
    let rest = store.lease("ag", 10, TTL).await.expect("lease");
    let ids: Vec<String> = rest.into_iter().map(|t| t.task_id).collect();
    assert_eq!(ids, [id(1, "europe"), id(2, "europe")]);
}

async fn only_the_holder_renews_and_completes(fx: Fixture) {
    let clock = ManualClock::new(5_000);
    let store = fx.open_manual(&clock);
    store.insert(task("a")).await.expect("insert");
    store.insert(task("q")).await.expect("insert");
    let leased = store.lease("agent-1", 1, TTL).await.expect("lease");
    assert_eq!(leased[0].task_id, "a");

    let err = store.renew("agent-2", "a", TTL).await.expect_err("renew");
    assert_eq!(
        err,
        StoreError::NotLeaseHolder {
            task_id: "a".into(),
            holder: "agent-1".into()
        }
    );
    let err = store
        .complete("agent-2", "a", true, vec![], String::new())
        .await
        .expect_err("complete");
    assert!(matches!(err, StoreError::NotLeaseHolder { .. }));
    // A queued task has no holder.
    let err = store.renew("agent-1", "q", TTL).await.expect_err("renew");
    assert_eq!(
        err,
        StoreError::NotLeaseHolder {
            task_id: "q".into(),
            holder: String::new()
        }
    );
    assert_eq!(
        store.renew("agent-1", "nope", TTL).await,
        Err(StoreError::NotFound("nope".into()))
    );

    clock.advance(1_000);
    let renewed = store.renew("agent-1", "a", TTL).await.expect("renew");
    assert_eq!(renewed.lease_deadline_unix_ms, 6_000 + 30_000);
    assert_eq!(renewed.version, 3);

    let done = store
        .complete("agent-1", "a", true, b"out".to_vec(), String::new())
        .await
        .expect("complete");
    assert_eq!(done.state(), TaskState::Succeeded);
    assert_eq!(done.result, b"out");
    assert!(done.agent_id.is_empty());
    let err = store
        .complete("agent-1", "a", false, vec![], "late".into())
        .await
        .expect_err("complete twice");
    assert_eq!(
        err,
        StoreError::Terminal {
            task_id: "a".into(),
            state: "SUCCEEDED".into()
        }
    );
    // The expired-lease sweep no longer sees it.
    clock.advance(1_000_000);
    assert!(store.expire_leases(3).await.expect("expire").is_empty());
    let c = store.counts();
    assert_eq!((c.queued, c.leased, c.succeeded), (1, 0, 1));
}

async fn expired_leases_requeue_then_fail(fx: Fixture) {
    let clock = ManualClock::new(1_000);
    let store = fx.open_manual(&clock);
    store.insert(task("a")).await.expect("insert");
    let ttl = Duration::from_millis(100);
    for attempt in 1..=3u32 {
        let got = store.lease("agent-x", 1, ttl).await.expect("lease");
        assert_eq!(got.len(), 1, "attempt {attempt}");
        assert_eq!(got[0].attempts, attempt);
        // Not yet expired.
        assert!(store.expire_leases(3).await.expect("expire").is_empty());
        clock.advance(101);
        let changed = store.expire_leases(3).await.expect("expire");
        assert_eq!(changed.len(), 1);
        let t = &changed[0];
        if attempt < 3 {
            assert_eq!(t.state(), TaskState::Queued);
            assert_eq!(t.attempts, attempt);
            assert!(t.agent_id.is_empty());
        } else {
            assert_eq!(t.state(), TaskState::Failed);
            assert_eq!(t.error, "lease expired 3 times (agent lost)");
        }
    }
    // The old holder's late completion is refused.
    let err = store
        .complete("agent-x", "a", true, vec![], String::new())
        .await
        .expect_err("late");
    assert!(matches!(err, StoreError::Terminal { .. }));
    let c = store.counts();
    assert_eq!((c.queued, c.leased, c.failed), (0, 0, 1));
}

async fn requeue_agent_returns_only_its_tasks(fx: Fixture) {
    let store = fx.open();
    for id in ["a", "b", "c"] {
        store.insert(task(id)).await.expect("insert");
    }
    let mine = store.lease("dead", 2, TTL).await.expect("lease");
    store.lease("alive", 1, TTL).await.expect("lease");
    let requeued = store.requeue_agent("dead").await.expect("requeue");
    let mut got: Vec<_> = requeued.iter().map(|t| t.task_id.clone()).collect();
    let mut want: Vec<_> = mine.iter().map(|t| t.task_id.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(
        requeued
            .iter()
            .all(|t| t.state() == TaskState::Queued && t.attempts == 1)
    );
    let c = store.counts();
    assert_eq!((c.queued, c.leased), (2, 1));
    // The dead agent's late renew is refused.
    let err = store.renew("dead", &want[0], TTL).await.expect_err("renew");
    assert!(matches!(err, StoreError::NotLeaseHolder { .. }));
}

async fn agents_and_their_leases_survive_a_reopen(fx: Fixture) {
    let clock = ManualClock::new(1_000);
    let record = |id: &str| AgentRecord {
        id: id.into(),
        owner: "agent europe/worker".into(),
        name: "w".into(),
        slots: 2,
        registered_unix_ms: 1_000,
    };
    {
        let store = fx.open_manual(&clock);
        store.put_agent(record("agent-1")).await.expect("put");
        store.put_agent(record("agent-2")).await.expect("put");
        for id in ["a", "b", "c"] {
            store.insert(task(id)).await.expect("insert");
        }
        store.lease("agent-1", 2, TTL).await.expect("lease");
        store.lease("agent-2", 1, TTL).await.expect("lease");
    }
    // Down for longer than the TTL: on reopen the leases are given a TTL
    // from now instead of expiring at once.
    clock.advance(TTL.as_millis() as i64 * 3);
    let store = fx.open_manual(&clock);
    let agents = store.agents().expect("agents");
    assert_eq!(agents, vec![record("agent-1"), record("agent-2")]);
    assert_eq!(store.extend_leases(TTL).await.expect("extend"), 3);
    assert!(store.expire_leases(3).await.expect("expire").is_empty());
    let held: Vec<Task> = store.pending().expect("pending");
    assert!(held.iter().all(|t| t.state() == TaskState::Leased
        && t.lease_deadline_unix_ms == clock.now_ms() + TTL.as_millis() as i64));
    let mine = held
        .iter()
        .find(|t| t.agent_id == "agent-1")
        .expect("agent-1's");
    store
        .complete(
            "agent-1",
            &mine.task_id,
            true,
            b"ok".to_vec(),
            String::new(),
        )
        .await
        .expect("the holder still completes after the reopen");
    // Forgetting an agent drops its record and requeues its leases together.
    let requeued = store.forget_agent("agent-2").await.expect("forget");
    assert_eq!(requeued.len(), 1);
    assert_eq!(store.agents().expect("agents"), vec![record("agent-1")]);
    let c = store.counts();
    assert_eq!((c.queued, c.leased, c.succeeded), (1, 1, 1));
}

async fn cancel_queued_leased_and_terminal(fx: Fixture) {
    let store = fx.open();
    for id in ["q", "l", "done"] {
        store.insert(task(id)).await.expect("insert");
    }
    // Lease "q", "l", "done" in order (same priority, created order may tie:
    // lease all three then finish one).
    let leased = store.lease("ag", 3, TTL).await.expect("lease");
    assert_eq!(leased.len(), 3);
    store
        .complete("ag", "done", true, vec![], String::new())
        .await
        .expect("complete");
    store.requeue_agent("ag").await.expect("requeue");
    store.lease("ag", 1, TTL).await.expect("lease");

    let done = store.cancel("done", "no").await.expect("cancel");
    assert!(!done.cancelled);
    assert_eq!(done.task.state(), TaskState::Succeeded);

    for id in ["q", "l"] {
        let done = store.cancel(id, "").await.expect("cancel");
        assert!(done.cancelled);
        assert_eq!(done.task.state(), TaskState::Cancelled);
        assert_eq!(done.task.error, "cancelled");
    }
    let again = store.cancel("q", "x").await.expect("cancel");
    assert!(!again.cancelled);
    assert_eq!(
        store.cancel("zzz", "").await,
        Err(StoreError::NotFound("zzz".into()))
    );
    let c = store.counts();
    assert_eq!((c.queued, c.leased, c.succeeded, c.cancelled), (0, 0, 1, 2));
    assert!(store.pending().expect("pending").is_empty());
    assert!(store.lease("ag", 5, TTL).await.expect("lease").is_empty());
    // A cancelled leased task: its holder's complete is refused.
    let err = store
        .complete("ag", "l", true, vec![], String::new())
        .await
        .expect_err("complete");
    assert!(matches!(err, StoreError::Terminal { .. }));
}

async fn mark_taken_over_fences_pending_tasks(fx: Fixture) {
    let store = fx.open();
    for id in ["a", "b", "c"] {
        store.insert(task(id)).await.expect("insert");
    }
    store.lease("ag", 1, TTL).await.expect("lease");
    let takeover = Takeover {
        from_region: "europe".into(),
        from_epoch: 7,
        to_region: "asia_pacific".into(),
        at_unix_ms: 1,
    };
    let fenced = store
        .mark_taken_over(
            vec!["a".into(), "b".into(), "unknown".into()],
            takeover.clone(),
        )
        .await
        .expect("fence");
    assert_eq!(fenced.len(), 2);
    for t in &fenced {
        assert_eq!(t.state(), TaskState::Cancelled);
        assert_eq!(t.taken_over.as_ref(), Some(&takeover));
    }
    let pending: Vec<_> = store
        .pending()
        .expect("pending")
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(pending, ["c"]);
}

async fn concurrent_inserts_are_durable_and_distinct(fx: Fixture) {
    let store = fx.open();
    let mut handles = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut t = task(&format!("task-{i:03}"));
            t.priority = i % 7;
            store.insert(t).await.expect("insert")
        }));
    }
    let mut ids = HashSet::new();
    for h in handles {
        let out = h.await.expect("join");
        assert!(!out.is_deduplicated());
        ids.insert(out.into_task().task_id);
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(store.counts().queued, 200);
    drop(store);
    let store = fx.open();
    for id in &ids {
        assert!(store.get(id).expect("get").is_some(), "{id} lost");
    }
    assert_eq!(store.counts().queued, 200);
    assert_eq!(store.pending().expect("pending").len(), 200);
}

/// Inserts of distinct tasks, sent from `n` spawned callers at once: they
/// keep the writer busy with batches in flight (several at once on the
/// database backend) while a test's own requests arrive.
fn background_inserts(
    store: &TaskStore,
    round: usize,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut t = task(&format!("bg-{round}-{i}"));
                t.idempotency_key = format!("bg-key-{round}-{i}");
                let out = store.insert(t).await.expect("background insert");
                assert!(!out.is_deduplicated());
            })
        })
        .collect()
}

/// A cancel sent right behind its task's insert (the insert not answered
/// yet, other batches in flight) is applied after the insert: it finds the
/// task and cancels it, round after round.
async fn a_cancel_sent_right_after_its_insert_finds_the_task(fx: Fixture) {
    let store = fx.open();
    for round in 0..40 {
        let background = background_inserts(&store, round, 24);
        let id = format!("victim-{round}");
        // join! polls the insert first: its request is sent before the
        // cancel's.
        let (inserted, cancelled) = futures::join!(
            store.insert(task(&id)),
            store.cancel(&id, "changed my mind")
        );
        let inserted = inserted.expect("insert");
        assert!(!inserted.is_deduplicated());
        let cancelled = cancelled.unwrap_or_else(|e| panic!("round {round}: cancel of {id}: {e}"));
        assert!(cancelled.cancelled, "round {round}: {id} was not cancelled");
        assert_eq!(cancelled.task.state(), TaskState::Cancelled);
        for h in background {
            h.await.expect("join");
        }
        let stored = store.get(&id).expect("get").expect("stored");
        assert_eq!(stored.state(), TaskState::Cancelled);
    }
    assert_eq!(store.counts().cancelled, 40);
    assert_eq!(store.counts().queued, 40 * 24);
}

/// Two keys submitted concurrently in both orders, many times each, while
/// other inserts keep batches in flight: every call is answered (no
/// transaction of the store waits on another of its own), each key names
/// one task, and the counts hold exactly the created ones.
async fn one_task_per_key_when_concurrent_batches_carry_the_same_keys(fx: Fixture) {
    let store = fx.open();
    for round in 0..20 {
        let background = background_inserts(&store, round, 16);
        let mut calls = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            calls.push(tokio::spawn(async move {
                let keys = if i % 2 == 0 {
                    ["k1", "k2"]
                } else {
                    ["k2", "k1"]
                };
                let mut ids = Vec::new();
                for key in keys {
                    let mut t = task(&format!("{key}-{round}-{i}"));
                    t.idempotency_key = format!("{key}-{round}");
                    let out = store
                        .insert(t)
                        .await
                        .unwrap_or_else(|e| panic!("round {round}: insert of {key}: {e}"));
                    ids.push((key, out.is_deduplicated(), out.into_task().task_id));
                }
                ids
            }));
        }
        let mut created = 0;
        let mut named: std::collections::HashMap<&str, HashSet<String>> = Default::default();
        for c in calls {
            for (key, dedup, id) in c.await.expect("join") {
                created += usize::from(!dedup);
                named.entry(key).or_default().insert(id);
            }
        }
        assert_eq!(created, 2, "round {round}: one task per key");
        for (key, ids) in &named {
            assert_eq!(ids.len(), 1, "round {round}: key {key} names {ids:?}");
        }
        for h in background {
            h.await.expect("join");
        }
    }
    assert_eq!(store.counts().queued, 20 * (2 + 16));
}

async fn reopen_keeps_everything_and_counts(fx: Fixture) {
    let clock = ManualClock::new(1_000);
    let before;
    {
        let store = fx.open_manual(&clock);
        for id in ["a", "b", "c", "d", "e"] {
            let mut t = task(id);
            t.idempotency_key = format!("key-{id}");
            store.insert(t).await.expect("insert");
            clock.advance(1);
        }
        store.lease("ag", 4, TTL).await.expect("lease");
        store
            .complete("ag", "a", true, vec![1], String::new())
            .await
            .expect("ok");
        store
            .complete("ag", "b", false, vec![], "boom".into())
            .await
            .expect("fail");
        store.cancel("c", "user").await.expect("cancel");
        store.flush().await.expect("flush");
        before = store.counts();
    }
    let store = fx.open_manual(&clock);
    assert_eq!(store.counts(), before);
    assert_eq!(
        before,
        Counts {
            queued: 1,
            leased: 1,
            succeeded: 1,
            failed: 1,
            cancelled: 1
        }
    );
    assert_eq!(
        store.get("b").expect("get").map(|t| t.error),
        Some("boom".into())
    );
    // Indexes survive: idempotency, queue and leases.
    let mut dup = task("zzz");
    dup.idempotency_key = "key-e".into();
    assert!(store.insert(dup).await.expect("insert").is_deduplicated());
    let leased = store.lease("ag2", 10, TTL).await.expect("lease");
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].task_id, "e");
    clock.advance(60_000);
    let expired = store.expire_leases(5).await.expect("expire");
    assert_eq!(expired.len(), 2);
}

async fn subscribe_and_wait_for_queued(fx: Fixture) {
    let store = fx.open();
    let mut events = store.subscribe();
    assert!(!store.wait_for_queued(Duration::from_millis(10)).await);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_queued(Duration::from_secs(60)).await })
    };
    tokio::task::yield_now().await;
    store.insert(task("a")).await.expect("insert");
    assert!(waiter.await.expect("join"));
    let ev = events.recv().await.expect("event");
    assert_eq!((ev.task_id.as_str(), ev.version), ("a", 1));
    store.lease("ag", 1, TTL).await.expect("lease");
    let ev = events.recv().await.expect("event");
    assert_eq!(ev.state(), TaskState::Leased);
    store.flush().await.expect("flush");
}

// ---------------------------------------------------------------------------
// Several controllers of one region on one database (PostgreSQL only): each
// store handle below is what one replica opens.
// ---------------------------------------------------------------------------

mod replicas {
    use super::*;

    /// Two replicas' stores on one fresh database.
    fn two() -> (Fixture, TaskStore, TaskStore) {
        let fx = Fixture::new(Kind::Postgres);
        let a = fx.open();
        let b = fx.open();
        (fx, a, b)
    }

    /// The writer sends COMMIT behind the append without waiting for it: an
    /// append the database refuses must still leave nothing committed (the
    /// aborted transaction turns that COMMIT into a rollback).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_append_commits_neither_the_task_nor_its_record() {
        use crate::audit::{Prepared, kind};
        let fx = Fixture::new(Kind::Postgres);
        let store = fx.open();
        let log = fx.bound_log(&store, "europe");
        let decision = super::routed_to_europe();
        let record = |id: &str| {
            Prepared::decision(
                kind::ROUTE,
                Some(id),
                Some("europe"),
                &Default::default(),
                &decision,
                None,
            )
        };
        let first = store.insert_recorded(task("a"), record("a")).await;
        assert_eq!(first.record, RecordState::Written);
        // A row already at the chain's next seq: the next append collides.
        let db = fx
            .url
            .as_deref()
            .and_then(|u| u.rsplit('/').next())
            .expect("database name")
            .to_string();
        federation_sandbox::pg::shared()
            .expect("server")
            .execute(
                &db,
                "INSERT INTO decisions (region, seq, hash, task_id, line) \
                 SELECT region, seq + 1, 'x', NULL, '{}' FROM decision_heads WHERE region = 'europe'",
            )
            .expect("a row in the way");
        let refused = store.insert_recorded(task("b"), record("b")).await;
        assert!(refused.outcome.is_err(), "{:?}", refused.outcome);
        assert_ne!(refused.record, RecordState::Written);
        assert_eq!(store.get("b").expect("get"), None, "the task was committed");
        assert_eq!(
            store.get("a").expect("get").map(|t| t.task_id),
            Some("a".into())
        );
        let bytes = fx.log_bytes(&log, "europe");
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("\"task_id\":\"b\""), "{text}");
        // The store goes on: its connection is back outside any transaction.
        let again = store.insert(task("c")).await.expect("insert after");
        assert!(!again.is_deduplicated());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idempotency_key_names_one_task_across_replicas() {
        let (_fx, a, b) = two();
        let mut handles = Vec::new();
        for i in 0..40 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            handles.push(tokio::spawn(async move {
                let mut t = task(&format!("t{i}"));
                t.idempotency_key = "same".into();
                store.insert(t).await.expect("insert")
            }));
        }
        let mut ids = HashSet::new();
        let mut created = 0;
        for h in handles {
            let out = h.await.expect("join");
            created += usize::from(!out.is_deduplicated());
            ids.insert(out.into_task().task_id);
        }
        assert_eq!((created, ids.len()), (1, 1), "{ids:?}");
        // The other content under the key is refused through either replica.
        let mut other = task("x");
        other.idempotency_key = "same".into();
        other.payload = b"other".to_vec();
        for store in [&a, &b] {
            assert!(matches!(
                store.insert(other.clone()).await,
                Err(StoreError::KeyReused { .. })
            ));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_is_leased_to_one_agent_across_replicas() {
        let (_fx, a, b) = two();
        for i in 0..60 {
            a.insert(task(&format!("t{i:02}"))).await.expect("insert");
        }
        // Agents of both replicas lease at once, in small bites.
        let mut handles = Vec::new();
        for (n, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
        {
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..40 {
                    got.extend(
                        store
                            .lease(&format!("agent-{n}"), 2, TTL)
                            .await
                            .expect("lease")
                            .into_iter()
                            .map(|t| t.task_id),
                    );
                }
                got
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("join"));
        }
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 60, "every task leased once");
        assert_eq!(distinct.len(), 60, "no task leased twice: {all:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_renews_and_completes_through_another_replica() {
        let (_fx, a, b) = two();
        a.insert(task("t")).await.expect("insert");
        let leased = a.lease("agent-1", 1, TTL).await.expect("lease");
        assert_eq!(leased.len(), 1);
        // Replica a dies; the agent goes on through b, keeping its lease.
        drop(a);
        let renewed = b.renew("agent-1", "t", TTL).await.expect("renew via b");
        assert_eq!(renewed.agent_id, "agent-1");
        assert!(matches!(
            b.renew("agent-2", "t", TTL).await,
            Err(StoreError::NotLeaseHolder { .. })
        ));
        let done = b
            .complete("agent-1", "t", true, b"ok".to_vec(), String::new())
            .await
            .expect("complete via b");
        assert_eq!(done.state(), TaskState::Succeeded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_through_one_replica_sees_changes_made_through_another() {
        let (_fx, a, b) = two();
        let patience = Duration::from_secs(30);
        let mut events = b.subscribe();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait_for_queued(patience).await })
        };
        // The listener may still be connecting: insert until b hears one.
        let mut first = None;
        for i in 0..300 {
            a.insert(task(&format!("w{i}"))).await.expect("insert");
            if let Ok(Ok(ev)) =
                tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            {
                first = Some(ev);
                break;
            }
        }
        let first = first.expect("b's watch heard a change made through a");
        assert_eq!(first.state(), TaskState::Queued);
        assert!(waiter.await.expect("join"), "b's long poll woke");
        // A lease and a completion through a reach b's watch, in order.
        let leased = a.lease("agent", 1, TTL).await.expect("lease");
        let id = leased[0].task_id.clone();
        a.complete("agent", &id, true, vec![], String::new())
            .await
            .expect("complete");
        let mut seen = Vec::new();
        while !seen.contains(&TaskState::Succeeded) {
            let ev = tokio::time::timeout(patience, events.recv())
                .await
                .expect("within patience")
                .expect("event");
            if ev.task_id == id {
                seen.push(ev.state());
            }
        }
        assert!(seen.ends_with(&[TaskState::Succeeded]), "{seen:?}");
        // b's counts follow a's changes.
        assert_eq!(b.counts().succeeded, 1);
    }

    /// A sink that does not want other replicas' new tasks (replication on
    /// a replica that does not lead), and what it heard.
    struct NotLeading(std::sync::Mutex<Vec<(String, TaskState)>>);

    impl ChangeSink for NotLeading {
        fn changed(&self, task: &Task) {
            let mut heard = self.0.lock().unwrap_or_else(|e| e.into_inner());
            heard.push((task.task_id.clone(), task.state()));
        }

        fn wants_new_tasks(&self) -> bool {
            false
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_does_not_lead_reads_no_new_task_but_wakes_and_hears_the_rest() {
        let (_fx, a, b) = two();
        let sink = Arc::new(NotLeading(std::sync::Mutex::default()));
        b.bind_changes(sink.clone()).expect("bind");
        let patience = Duration::from_secs(30);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait_for_queued(patience).await })
        };
        // The listener may still be connecting: insert until b's long poll
        // wakes (it wakes on a's new task without reading it).
        let mut woke = false;
        for i in 0..300 {
            a.insert(task(&format!("n{i}"))).await.expect("insert");
            tokio::time::sleep(Duration::from_millis(100)).await;
            if waiter.is_finished() {
                woke = waiter.await.expect("join");
                break;
            }
        }
        assert!(woke, "b's long poll woke on a task created through a");
        // A lease and a completion through a reach b's sink; no insert did.
        let leased = a.lease("agent", 1, TTL).await.expect("lease");
        let id = leased[0].task_id.clone();
        a.complete("agent", &id, true, vec![], String::new())
            .await
            .expect("complete");
        let until = std::time::Instant::now() + patience;
        loop {
            let heard = sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
            assert!(
                heard.iter().all(|(_, s)| *s != TaskState::Queued),
                "a new task was read for a sink that does not want them: {heard:?}"
            );
            if heard.contains(&(id.clone(), TaskState::Succeeded)) {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "b's sink heard {heard:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // b's counts follow a's changes all the same.
        let until = std::time::Instant::now() + patience;
        while b.counts().succeeded != 1 {
            assert!(std::time::Instant::now() < until, "counts {:?}", b.counts());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_leads_and_a_deposed_leaders_fenced_write_is_refused() {
        let (_fx, a, b) = two();
        // Long enough that a noisy machine does not expire it between the
        // calls below; the takeover waits it out.
        let short = Duration::from_secs(3);
        let token = a.lead("eu-a", short).await.expect("lead").expect("a leads");
        assert_eq!(
            b.lead("eu-b", short).await.expect("lead"),
            None,
            "one leader"
        );
        // Renewing keeps the token.
        assert_eq!(a.lead("eu-a", short).await.expect("lead"), Some(token));
        // Only the leader's fenced expiry runs.
        a.expire_leases_as_leader(3, token)
            .await
            .expect("the leader expires");
        assert!(matches!(
            b.expire_leases_as_leader(3, token).await,
            Err(StoreError::NotLeader(_))
        ));
        // a stops renewing (killed, paused): b takes over with a new token.
        let taken = {
            let until = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(t) = b.lead("eu-b", Duration::from_secs(30)).await.expect("lead") {
                    break t;
                }
                assert!(std::time::Instant::now() < until, "b never took over");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        assert_eq!(taken, token + 1);
        // The deposed leader's write is refused by the database.
        assert!(matches!(
            a.expire_leases_as_leader(3, token).await,
            Err(StoreError::NotLeader(_))
        ));
        assert_eq!(a.lead("eu-a", short).await.expect("lead"), None);
        b.expire_leases_as_leader(3, taken)
            .await
            .expect("the new leader expires");
        // A takeover's batch is fenced the same way, in its transaction:
        // the deposed leader's stores nothing, the new leader's stores.
        let deposed = a
            .insert_batch_as_leader(vec![task("t-fenced.europe")], None, token)
            .await;
        assert!(
            matches!(deposed.outcomes, Err(StoreError::NotLeader(_))),
            "{:?}",
            deposed.outcomes
        );
        assert!(b.get("t-fenced.europe").expect("read").is_none());
        let led = b
            .insert_batch_as_leader(vec![task("t-fenced.europe")], None, taken)
            .await;
        assert!(
            matches!(led.outcomes.as_deref(), Ok([Ok(InsertOutcome::Created(_))])),
            "{:?}",
            led.outcomes
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_leader_resigns_at_once_and_its_siblings_see_it_drain() {
        let (_fx, a, b) = two();
        let (TaskStore::Postgres(a), TaskStore::Postgres(b)) = (a, b) else {
            panic!("postgres stores");
        };
        // A lease far longer than the test: only a resignation passes it.
        let long = Duration::from_secs(600);
        let stale = Duration::from_secs(60);
        let told = |replica: &str, draining| crate::tasks::Sibling {
            replica: replica.into(),
            endpoint: format!("http://{replica}.test:7000"),
            draining,
        };
        assert!(
            a.refresh_replica_as("eu-1", stale, Some(&told("eu-1", false)))
                .await
                .expect("refresh")
        );
        assert!(
            b.refresh_replica_as("eu-2", stale, Some(&told("eu-2", false)))
                .await
                .expect("refresh")
        );
        assert_eq!(
            b.siblings(stale).await.expect("read"),
            vec![told("eu-1", false)]
        );
        assert_eq!(
            a.siblings(stale).await.expect("read"),
            vec![told("eu-2", false)]
        );
        let token = a.lead("eu-1", long).await.expect("lead").expect("a leads");
        assert_eq!(b.lead("eu-2", long).await.expect("lead"), None);
        // a drains: it tells its sibling and resigns; b leads at its next
        // renewal with the next token, and a's fenced writes are refused.
        assert!(
            a.refresh_replica_as("eu-1", stale, Some(&told("eu-1", true)))
                .await
                .expect("refresh")
        );
        assert_eq!(
            b.siblings(stale).await.expect("read"),
            vec![told("eu-1", true)]
        );
        assert!(a.resign().await.expect("resign"), "a held the lead");
        assert!(
            !a.resign().await.expect("resign"),
            "nothing left to give up"
        );
        assert_eq!(
            b.lead("eu-2", long).await.expect("lead"),
            Some(token + 1),
            "the sibling leads at once"
        );
        assert!(matches!(
            TaskStore::Postgres(a.clone())
                .expire_leases_as_leader(3, token)
                .await,
            Err(StoreError::NotLeader(_))
        ));
        // A plain refresh keeps what was told.
        assert!(a.refresh_replica("eu-1", stale).await.expect("refresh"));
        assert_eq!(
            b.siblings(stale).await.expect("read"),
            vec![told("eu-1", true)]
        );
        // Undrained, a may lead again once b gives it up.
        assert!(
            a.refresh_replica_as("eu-1", stale, Some(&told("eu-1", false)))
                .await
                .expect("refresh")
        );
        assert_eq!(a.lead("eu-1", long).await.expect("lead"), None);
        assert!(b.resign().await.expect("resign"));
        assert_eq!(a.lead("eu-1", long).await.expect("lead"), Some(token + 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_name_in_use_is_refused_and_a_stale_one_taken_over() {
        let (_fx, a, b) = two();
        let (TaskStore::Postgres(a), TaskStore::Postgres(b)) = (a, b) else {
            panic!("postgres stores");
        };
        let stale = Duration::from_secs(2);
        a.claim_replica("eu-1", stale).await.expect("a claims eu-1");
        b.claim_replica("eu-2", stale)
            .await
            .expect("another name is free");
        // a keeps eu-1 fresh while b tries to claim it: refused.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keep = {
            let (a, done) = (a.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    assert!(a.refresh_replica("eu-1", stale).await.expect("refresh"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let err = b.claim_replica("eu-1", stale).await.expect_err("in use");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            matches!(&err, StoreError::ReplicaInUse(m) if m.contains("`eu-1`") && m.contains("europe")),
            "{err}"
        );
        keep.await.expect("join");
        // a stops refreshing (it died): the name is taken over once stale.
        b.claim_replica("eu-1", stale)
            .await
            .expect("a stale name is taken over");
        assert!(!a.refresh_replica("eu-1", stale).await.expect("refresh"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_decision_chain_stays_one_across_replicas() {
        use crate::audit::{Entry, kind};
        let fx = Fixture::new(Kind::Postgres);
        let (a, b) = (fx.open(), fx.open());
        let (log_a, log_b) = (fx.bound_log(&a, "europe"), fx.bound_log(&b, "europe"));
        let mut handles = Vec::new();
        for i in 0..40 {
            let (store, log) = if i % 2 == 0 {
                (a.clone(), log_a.clone())
            } else {
                (b.clone(), log_b.clone())
            };
            handles.push(tokio::spawn(async move {
                let id = format!("t{i}");
                let record = crate::audit::Prepared::decision(
                    kind::ROUTE,
                    Some(&id),
                    Some("europe"),
                    &Default::default(),
                    &crate::policy::Decision {
                        outcome: crate::policy::Outcome::Routed {
                            region: "europe".into(),
                        },
                        rule_index: Some(0),
                        rule: None,
                        required_tags: Default::default(),
                        candidates: vec![],
                        reason: "r".into(),
                        policy_hash: "h".into(),
                        warnings: vec![],
                        evaluation_errors: vec![],
                        balance: None,
                    },
                    None,
                );
                let r = store.insert_recorded(task(&id), record).await;
                assert_eq!(r.record, RecordState::Written);
                log.append(Entry::new(kind::POLICY_RELOAD).note(format!("n{i}")))
                    .await
                    .expect("append");
            }));
        }
        for h in handles {
            h.await.expect("join");
        }
        // The file is appended after the commit (records staged in the
        // store's transaction): wait for it before reading the file.
        log_a.flush().await.expect("flush the log");
        let bytes = fx.log_bytes(&log_a, "europe");
        let report = crate::audit::verify_bytes(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 80);
    }

    /// The database seals records itself (`decisions_append`): every line
    /// it writes is byte for byte the line the file's sealing makes of the
    /// same record at the same place in the chain, also for strings JSON
    /// escapes and characters beyond ASCII, and the chain verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_database_seals_a_record_as_the_file_does() {
        use crate::audit::{Entry, Prepared, Record, kind};
        use crate::policy::{AttrValue, Attributes};
        let fx = Fixture::new(Kind::Postgres);
        let store = fx.open();
        let log = fx.bound_log(&store, "europe");
        let odd = "D\"E\\\u{1}\u{7f}\t\r\nü€😀";
        let mut attributes = Attributes::new();
        attributes.insert("country".into(), AttrValue::Str(odd.into()));
        attributes.insert("n".into(), AttrValue::Int(-7));
        let decision = crate::policy::Decision {
            outcome: crate::policy::Outcome::Routed {
                region: "europe".into(),
            },
            rule_index: Some(3),
            rule: None,
            required_tags: Default::default(),
            candidates: vec![],
            reason: odd.into(),
            policy_hash: "h".into(),
            warnings: vec![odd.into()],
            evaluation_errors: vec![],
            balance: None,
        };
        let id = "t-ü😀\"1";
        let record = || {
            Prepared::decision(
                kind::ROUTE,
                Some(id),
                Some("europe"),
                &attributes,
                &decision,
                Some(odd),
            )
        };
        let inserted = store.insert_recorded(task(id), record()).await;
        assert_eq!(inserted.record, RecordState::Written);
        let bare = Entry::new(kind::POLICY_RELOAD).note(odd);
        log.append(bare.clone()).await.expect("append");
        let bytes = fx.log_bytes(&log, "europe");
        let report = crate::audit::verify_bytes(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 2);
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 2);
        for (line, prepared) in lines.iter().zip([record(), Prepared::entry(&bare)]) {
            let stored: Record = serde_json::from_slice(line).expect("a record");
            let sealed = prepared.sealed_line(
                stored.seq,
                &stored.time,
                stored.unix_ms,
                "europe",
                &stored.prev_hash,
            );
            assert_eq!(
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(&sealed)
            );
        }
    }
}

/// Prints the PostgreSQL store's insert rate and latency at 1 and 64 in
/// flight against raw single-row `INSERT`s (autocommit, synchronous commit)
/// of the same row with tokio-postgres into the same database, in one run.
/// A report, not a check:
/// `cargo test -p federation --lib tasks::contract::postgres_insert_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn postgres_insert_throughput() {
    fn quantile(sorted: &[Duration], q: f64) -> Duration {
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }
    let fx = Fixture::new(Kind::Postgres);
    let store = fx.open();
    let raw_pg = crate::pg::Pg::connect(fx.url.as_deref().expect("url"), 64, "raw").expect("pg");
    {
        let pg = raw_pg.clone();
        raw_pg
            .block(async move {
                let c = pg.client().await?;
                c.batch_execute("CREATE TABLE raw_tasks (LIKE tasks INCLUDING ALL)")
                    .await
                    .map_err(|e| pg.db(&e))?;
                // Connect all 64 before timing (authentication is slow in
                // a debug build); the pool keeps them.
                let mut held = vec![c];
                for _ in 1..64 {
                    held.push(pg.client().await?);
                }
                Ok(())
            })
            .expect("raw table and connections");
    }
    let body = {
        let mut t = task("w00-00000");
        t.payload = vec![1; 256];
        t.idempotency_key = "k-w00-00000".into();
        prost::Message::encode_to_vec(&t)
    };
    for in_flight in [1usize, 64] {
        let n = if in_flight == 1 { 1_000 } else { 8_000 };
        let per_worker = n / in_flight;
        // The store.
        let started = std::time::Instant::now();
        let mut handles = Vec::new();
        for w in 0..in_flight {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let mut t = task(&format!("s{in_flight}-w{w:02}-{i:05}"));
                    t.payload = vec![1; 256];
                    t.idempotency_key = format!("k-s{in_flight}-w{w:02}-{i:05}");
                    let at = std::time::Instant::now();
                    store.insert(t).await.expect("insert");
                    lat.push(at.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for h in handles {
            lat.extend(h.await.expect("join"));
        }
        let store_rate = n as f64 / started.elapsed().as_secs_f64();
        lat.sort();
        let (s50, s99) = (quantile(&lat, 0.5), quantile(&lat, 0.99));
        // Raw INSERTs of the same row.
        let started = std::time::Instant::now();
        let mut handles = Vec::new();
        for w in 0..in_flight {
            let pg = raw_pg.clone();
            let body = body.clone();
            handles.push(raw_pg.handle().spawn(async move {
                let c = pg.client().await.unwrap_or_else(|e| panic!("{e}"));
                let stmt = c
                    .prepare(
                        "INSERT INTO raw_tasks (region, task_id, state, priority, created_ms, \
                         lease_deadline_ms, agent_id, idempotency_key, body) \
                         VALUES ('europe', $1, 1, 0, $2, 0, '', $3, $4)",
                    )
                    .await
                    .expect("prepare");
                let mut lat = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let id = format!("r{in_flight}-w{w:02}-{i:05}");
                    let key = format!("k-{id}");
                    let at = std::time::Instant::now();
                    c.execute(&stmt, &[&id, &now_unix_ms(), &key, &body])
                        .await
                        .expect("insert");
                    lat.push(at.elapsed());
                }
                lat
            }));
        }
        let mut raw = Vec::new();
        for h in handles {
            raw.extend(h.await.expect("join"));
        }
        let raw_rate = n as f64 / started.elapsed().as_secs_f64();
        raw.sort();
        let (r50, r99) = (quantile(&raw, 0.5), quantile(&raw, 0.99));
        println!(
            "in flight {in_flight:>2}: store {store_rate:>6.0}/s p50 {s50:>8.2?} p99 {s99:>8.2?} | \
             raw INSERT {raw_rate:>6.0}/s p50 {r50:>8.2?} p99 {r99:>8.2?} | ratio {:.2}x",
            store_rate / raw_rate
        );
    }
}

// ---------------------------------------------------------------------------
// What a takeover of 5,000 tasks costs in the store and the log: one insert
// and one append awaited per task (before), or one batch (now). A timing,
// printed, not asserted: `cargo test -p federation --lib takeover_sized --
// --ignored --nocapture`.
// ---------------------------------------------------------------------------

mod timing {
    use super::*;
    use crate::audit::{Entry, Prepared, kind};

    const TASKS: usize = 5_000;

    fn entry(id: &str) -> Entry {
        Entry::new(kind::TAKEOVER)
            .task(id)
            .note("taken over from europe (epoch 1) by north_america")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a timing to read, not a check"]
    async fn takeover_sized_insert_one_by_one_vs_batch() {
        for kind in [Kind::Redb, Kind::Postgres] {
            let label = format!("{kind:?}");
            let fx = Fixture::new(kind);
            let store = fx.open();
            let log = fx.bound_log(&store, "north_america");
            let started = std::time::Instant::now();
            for i in 0..TASKS {
                let id = format!("one-{i}");
                store.insert(task(&id)).await.expect("insert");
                log.append(entry(&id)).await.expect("append");
            }
            let one_by_one = started.elapsed();
            let tasks: Vec<Task> = (0..TASKS).map(|i| task(&format!("batch-{i}"))).collect();
            let records = tasks
                .iter()
                .map(|t| Prepared::entry(&entry(&t.task_id)))
                .collect();
            let started = std::time::Instant::now();
            let out = store.insert_batch(tasks, Some(records)).await;
            let batch = started.elapsed();
            assert_eq!(out.outcomes.expect("batch").len(), TASKS);
            println!(
                "{label}: {TASKS} taken-over tasks with their records: one by one {one_by_one:?}, one batch {batch:?}"
            );
        }
    }
}
