//! The decision log in a region's PostgreSQL database: table `decisions`
//! (one row per record: region, seq, hash, task id, and the record's line
//! exactly as the file would hold it) and `decision_heads` (the chain's head
//! per region). Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE
//! on `decisions`, also for the table's owner.
//!
//! One chain per region, whichever replica appends: the database seals
//! the records itself (the function `decisions_append` of
//! [`crate::pg::MIGRATIONS`]' version 5, called by [`append`]): in one
//! statement it locks the region's head row (`SELECT … FOR UPDATE`), hashes
//! each record after the one before it, writes them and moves the head,
//! inside the transaction that carries the records (and, for a task
//! insert, the task). Concurrent appends are ordered by the database and
//! the chain holds exactly the committed records; the head is locked only
//! from that statement to the commit's flush (sealing in the client held it
//! for a round trip more, which bounded several replicas' throughput). The
//! client cuts each record where the chain goes ([`Prepared::sql_parts`])
//! and the function joins the parts around the previous hash and the seq:
//! the line's bytes are the file format's ([`super`]), so `audit export`
//! writes the JSONL an auditor's tooling already checks.

use std::sync::Mutex;

use super::{AuditError, GENESIS_HASH, HASH_SEP, Prepared, Tip, lock};
use crate::pg::{Pg, PgError};
use tokio_postgres::types::{ToSql, Type};

/// Seals and appends a batch after the head, the head locked until commit.
const APPEND_SQL: &str =
    "SELECT head_seq, head_hash FROM decisions_append($1, $2, $3, $4, $5, $6, $7)";
const APPEND_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
];

/// Prepares [`append`]'s statement on `txn`'s connection (deadpool's
/// cache: a round trip the first time, nothing after), so it is parsed
/// once per connection and sent at its first poll. A caller pipelining it
/// calls this before BEGIN: a statement prepared on the way would wait for
/// its own round trip while the COMMIT behind it went ahead.
pub(crate) async fn prepare(
    txn: &deadpool_postgres::ClientWrapper,
) -> Result<(), tokio_postgres::Error> {
    txn.prepare_typed_cached(APPEND_SQL, APPEND_TYPES)
        .await
        .map(|_| ())
}

/// Makes sure `region` has a head row (seq 0, the genesis hash).
pub(crate) async fn ensure_head(
    client: &deadpool_postgres::ClientWrapper,
    region: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO decision_heads (region, seq, hash) VALUES ($1, 0, $2) \
             ON CONFLICT (region) DO NOTHING",
            &[&region, &GENESIS_HASH],
        )
        .await
        .map(|_| ())
}

/// Appends `records` (in order) to `region`'s chain in one statement, sent
/// at the first poll (a caller may pipeline its COMMIT behind it): the
/// database locks the head (held until the caller's transaction ends; a
/// statement on its own is its own transaction), seals each record after
/// it and moves it. Returns the new head (`None`, and nothing sent, when
/// `records` is empty). Durable when the transaction commits.
pub(crate) async fn append(
    txn: &deadpool_postgres::ClientWrapper,
    region: &str,
    records: Vec<Prepared>,
) -> Result<Option<(u64, String)>, tokio_postgres::Error> {
    if records.is_empty() {
        return Ok(None);
    }
    let parts = Parts::of(region, &records);
    // Prepared before the transaction ([`prepare`]): sent at the first
    // poll, ahead of the COMMIT the caller pipelines behind it.
    let appending = txn.prepare_typed_cached(APPEND_SQL, APPEND_TYPES).await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&region];
    params.extend(parts.params());
    let row = txn.query_one(&appending, &params).await?;
    head_of(&row).map(Some)
}

/// SQLSTATE of [`append_checked`] refusing: its INSERT created fewer tasks
/// than it carried (one was stored already), so nothing may be appended.
pub(crate) const NOT_ALL_CREATED: &str = "FDB01";

/// [`append`] in one statement with the INSERT of the tasks the records
/// name: `insert` (an `INSERT … RETURNING`, its parameters of
/// `insert_types`, `$1` the region) runs first, and the records are
/// appended only if it created `expected` rows; otherwise the statement
/// fails with [`NOT_ALL_CREATED`] and the transaction is aborted, nothing
/// of it kept. Sent at the first poll once [`prepare_checked`] prepared it.
pub(crate) async fn append_checked(
    txn: &deadpool_postgres::ClientWrapper,
    region: &str,
    records: &[Prepared],
    insert: &str,
    insert_types: &[Type],
    insert_params: &[&(dyn ToSql + Sync)],
    expected: i64,
) -> Result<Option<(u64, String)>, tokio_postgres::Error> {
    let parts = Parts::of(region, records);
    let (sql, types) = checked_statement(insert, insert_types);
    let appending = txn.prepare_typed_cached(&sql, &types).await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = insert_params.to_vec();
    params.extend(parts.params());
    params.push(&expected);
    let row = txn.query_one(&appending, &params).await?;
    if records.is_empty() {
        return Ok(None);
    }
    head_of(&row).map(Some)
}

/// Prepares [`append_checked`]'s statement for `insert` (cached per
/// connection), so that it is sent at its first poll.
pub(crate) async fn prepare_checked(
    txn: &deadpool_postgres::ClientWrapper,
    insert: &str,
    insert_types: &[Type],
) -> Result<(), tokio_postgres::Error> {
    let (sql, types) = checked_statement(insert, insert_types);
    txn.prepare_typed_cached(&sql, &types).await.map(|_| ())
}

/// The statement of [`append_checked`]: `insert` as a CTE, then the
/// append given how many rows it created.
fn checked_statement(insert: &str, insert_types: &[Type]) -> (String, Vec<Type>) {
    let n = insert_types.len();
    let at: Vec<String> = (1..=7).map(|i| format!("${}", n + i)).collect();
    let sql = format!(
        "WITH created AS ({insert}) SELECT head_seq, head_hash FROM decisions_append($1, {}, (SELECT count(*) FROM created), {})",
        at[..6].join(", "),
        at[6]
    );
    let mut types = insert_types.to_vec();
    types.extend_from_slice(&APPEND_TYPES[1..]);
    types.push(Type::INT8);
    (sql, types)
}

/// A batch of records cut for `decisions_append`.
struct Parts {
    heads: Vec<String>,
    mids: Vec<String>,
    tails: Vec<String>,
    task_ids: Vec<Option<String>>,
}

impl Parts {
    fn of(region: &str, records: &[Prepared]) -> Self {
        let (time, unix_ms) = super::now_rfc3339();
        let n = records.len();
        let mut parts = Parts {
            heads: Vec::with_capacity(n),
            mids: Vec::with_capacity(n),
            tails: Vec::with_capacity(n),
            task_ids: Vec::with_capacity(n),
        };
        for record in records {
            let cut = record.sql_parts(&time, unix_ms, region);
            parts.heads.push(cut.head);
            parts.mids.push(cut.mid);
            parts.tails.push(cut.tail);
            parts.task_ids.push(cut.task_id);
        }
        parts
    }

    /// `decisions_append`'s parameters after the region (2 to 7).
    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &GENESIS_HASH,
            &HASH_SEP,
            &self.heads,
            &self.mids,
            &self.tails,
            &self.task_ids,
        ]
    }
}

/// The head a `decisions_append` row reports.
fn head_of(row: &tokio_postgres::Row) -> Result<(u64, String), tokio_postgres::Error> {
    let seq: i64 = row.try_get(0)?;
    let hash: String = row.try_get(1)?;
    Ok((u64::try_from(seq).unwrap_or(0), hash))
}

/// The chain's head of `region` as the database holds it.
pub async fn head(pg: &Pg, region: &str) -> Result<Option<(u64, String)>, PgError> {
    let client = pg.client().await?;
    let row = client
        .query_opt(
            "SELECT seq, hash FROM decision_heads WHERE region = $1",
            &[&region],
        )
        .await
        .map_err(|e| pg.db(&e))?;
    Ok(row.map(|r| {
        (
            u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            r.get::<_, String>(1),
        )
    }))
}

/// Every record of `region`'s chain in seq order, as the JSON-lines file
/// would hold them (each line ends with `\n`): what `audit export` writes
/// and what `audit verify` and `audit show` read.
pub async fn export(pg: &Pg, region: &str) -> Result<Vec<u8>, PgError> {
    let client = pg.client().await?;
    let rows = client
        .query(
            "SELECT line FROM decisions WHERE region = $1 ORDER BY seq",
            &[&region],
        )
        .await
        .map_err(|e| pg.db(&e))?;
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(r.get::<_, &str>(0).as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// The newest `rows` records of `region`'s chain, newest first, as lines.
pub async fn newest(pg: &Pg, region: &str, rows: i64) -> Result<Vec<String>, PgError> {
    let client = pg.client().await?;
    let found = client
        .query(
            "SELECT line FROM decisions WHERE region = $1 ORDER BY seq DESC LIMIT $2",
            &[&region, &rows],
        )
        .await
        .map_err(|e| pg.db(&e))?;
    Ok(found.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// The records naming `task_id` in `region`'s chain, oldest first, at
/// most `rows` (by the index `decisions_task`).
pub async fn of_task(
    pg: &Pg,
    region: &str,
    task_id: &str,
    rows: i64,
) -> Result<Vec<String>, PgError> {
    let client = pg.client().await?;
    let found = client
        .query(
            "SELECT line FROM decisions WHERE region = $1 AND task_id = $2 ORDER BY seq LIMIT $3",
            &[&region, &task_id, &rows],
        )
        .await
        .map_err(|e| pg.db(&e))?;
    Ok(found.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// The regions that have a chain in the database.
pub async fn regions(pg: &Pg) -> Result<Vec<String>, PgError> {
    let client = pg.client().await?;
    let rows = client
        .query("SELECT region FROM decision_heads ORDER BY region", &[])
        .await
        .map_err(|e| pg.db(&e))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// The writer of a decision log kept in the database: each batch of
/// appends is one transaction (group commit, as the file's writer).
pub(super) fn writer_loop(
    pg: &Pg,
    region: &str,
    tip: &Mutex<Tip>,
    rx: tokio::sync::mpsc::UnboundedReceiver<super::Append>,
    append_seconds: &prometheus_client::metrics::histogram::Histogram,
) {
    use super::Append;
    let mut appends = crate::group_commit::Gatherer::new(rx, super::MAX_BATCH);
    while let Some(batch) = appends.next_batch() {
        let mut records = Vec::new();
        // Each reply with the count of records before its last one.
        let mut replies = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Append::Flush(r) => replies.push((r, None)),
                // A file log's reminder to sync; nothing here is unsynced.
                Append::Sync => {}
                Append::Batch(es, r) => {
                    records.extend(es);
                    replies.push((r, Some(records.len())));
                }
                // Sealed lines are a file log's; never sent here.
                Append::Wait(_, r) => {
                    let _ = r.send(Err(AuditError::Write(
                        "sealed lines sent to a log in the database".into(),
                    )));
                }
            }
        }
        let started = std::time::Instant::now();
        let pg2 = pg.clone();
        let region2 = region.to_string();
        // Bounded by node.store.timeout, like every call to the database:
        // a server that stops answering fails the batch's appends.
        let bounded = pg.bounded(async move {
            let client = pg2.client().await?;
            let db = |e: tokio_postgres::Error| pg2.db(&e);
            // The statement first (cached after the connection's first
            // batch), then the records and the moved head: one statement,
            // its own transaction, one round trip.
            prepare(&client).await.map_err(db)?;
            append(&client, &region2, records).await.map_err(db)
        });
        let done = pg.handle().block_on(bounded);
        append_seconds.observe(started.elapsed().as_secs_f64());
        match done {
            Ok(head) => {
                let mut t = lock(tip);
                if let Some((seq, hash)) = &head {
                    if *seq > t.seq {
                        *t = Tip {
                            seq: *seq,
                            hash: hash.clone(),
                        };
                    }
                }
                let last = head.as_ref().map_or(t.seq, |h| h.0);
                let first = last.saturating_sub(
                    replies.iter().filter_map(|(_, n)| *n).max().unwrap_or(0) as u64,
                );
                drop(t);
                for (r, n) in replies {
                    let seq = n.map_or(last, |n| first + n as u64);
                    let _ = r.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "decision log append failed");
                for (r, _) in replies {
                    let _ = r.send(Err(AuditError::Write(e.to_string())));
                }
            }
        }
    }
}
