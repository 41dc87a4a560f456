//! The decision log in a region's PostgreSQL database: table `decisions`
//! (one row per record: region, seq, hash, task id, and the record's line
//! exactly as the file would hold it) and `decision_heads` (the chain's head
//! per region). Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE
//! on `decisions`, also for the table's owner.
//!
//! One chain per region, whichever replica appends: an append locks the
//! region's head row (`SELECT … FOR UPDATE`) inside the transaction that
//! carries the records (and, for a task insert, the task), continues the
//! chain from it and moves it, so concurrent appends are ordered by the
//! database and the chain holds exactly the committed records. The lock
//! ([`lock_head`]) and the append ([`append_after`]: the rows and the moved
//! head in one statement) each send their statement at the first poll, so
//! a writer pipelines them: the lock behind its last INSERT, its COMMIT
//! behind the append, and the head is held for about one round trip and
//! the commit's flush. The line's
//! bytes are the file format's ([`super`]), so `audit export` writes the
//! JSONL an auditor's tooling already checks.

use std::sync::Mutex;

use super::{AuditError, GENESIS_HASH, Prepared, Tip, lock};
use crate::pg::{Pg, PgError};
use tokio_postgres::types::Type;

/// The head's lock.
const LOCK_SQL: &str = "SELECT seq, hash FROM decision_heads WHERE region = $1 FOR UPDATE";
const LOCK_TYPES: &[Type] = &[Type::TEXT];

/// The records and the moved head, in one statement.
const APPEND_SQL: &str = "WITH appended AS (INSERT INTO decisions (region, seq, hash, task_id, line) \
       SELECT $1, s, h, t, l FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) AS u(s, h, t, l)) \
     UPDATE decision_heads SET seq = $6, hash = $7 WHERE region = $1";
const APPEND_TYPES: &[Type] = &[
    Type::TEXT,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8,
    Type::TEXT,
];

/// Prepares [`lock_head`]'s and [`append_after`]'s statements on `txn`'s
/// connection (deadpool's cache: a round trip the first time, nothing
/// after), so each is parsed and planned once per connection and sent at
/// its first poll. A caller pipelining them calls this before BEGIN: a
/// statement prepared on the way would wait for its own round trip while
/// the COMMIT behind it went ahead.
pub(crate) async fn prepare(
    txn: &deadpool_postgres::ClientWrapper,
) -> Result<(), tokio_postgres::Error> {
    futures::try_join!(
        txn.prepare_typed_cached(LOCK_SQL, LOCK_TYPES),
        txn.prepare_typed_cached(APPEND_SQL, APPEND_TYPES),
    )
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

/// Locks `region`'s chain head inside the caller's transaction (open on
/// `txn`) and returns it, creating the genesis head when there is none. The
/// statement is sent at the first poll, so a caller may pipeline it behind
/// its own statements: the lock is then taken without a round trip of its
/// own, and held until the caller's transaction ends.
pub(crate) async fn lock_head(
    txn: &deadpool_postgres::ClientWrapper,
    region: &str,
) -> Result<(u64, String), tokio_postgres::Error> {
    // Prepared by the caller before its transaction ([`prepare`]): taken
    // from the cache without waiting, so it is sent at the first poll.
    let locking = txn.prepare_typed_cached(LOCK_SQL, LOCK_TYPES).await?;
    let row = txn.query_opt(&locking, &[&region]).await?;
    match row {
        Some(r) => Ok((
            u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            r.get::<_, String>(1),
        )),
        None => {
            txn.execute_typed(
                "INSERT INTO decision_heads (region, seq, hash) VALUES ($1, 0, $2)",
                &[(&region, Type::TEXT), (&GENESIS_HASH, Type::TEXT)],
            )
            .await?;
            Ok((0, GENESIS_HASH.to_string()))
        }
    }
}

/// Seals `records` (in order) after `head` — the head [`lock_head`] locked
/// in this transaction — and writes them and the moved head in one
/// statement, sent at the first poll (so a caller may pipeline its COMMIT
/// behind it). Returns the new head (`None`, and nothing sent, when
/// `records` is empty). Durable only when the caller's transaction commits.
pub(crate) async fn append_after(
    txn: &deadpool_postgres::ClientWrapper,
    region: &str,
    head: (u64, String),
    records: Vec<Prepared>,
) -> Result<Option<(u64, String)>, tokio_postgres::Error> {
    if records.is_empty() {
        return Ok(None);
    }
    let (seq0, mut hash) = head;
    let mut seq = i64::try_from(seq0).unwrap_or(i64::MAX);
    let (time, unix_ms) = super::now_rfc3339();
    let mut seqs = Vec::with_capacity(records.len());
    let mut hashes = Vec::with_capacity(records.len());
    let mut task_ids: Vec<Option<String>> = Vec::with_capacity(records.len());
    let mut lines = Vec::with_capacity(records.len());
    let mut buf = Vec::with_capacity(1536);
    for record in records {
        seq += 1;
        task_ids.push(record.task_id().map(str::to_string));
        buf.clear();
        hash = record.seal_into(
            &mut buf,
            u64::try_from(seq).unwrap_or(0),
            &time,
            unix_ms,
            region,
            &hash,
        );
        // The sealed line ends with its newline; the row holds the line.
        buf.pop();
        lines.push(String::from_utf8_lossy(&buf).into_owned());
        seqs.push(seq);
        hashes.push(hash.clone());
    }
    // Prepared before the transaction ([`prepare`]): sent at the first
    // poll, ahead of the COMMIT the caller pipelines behind it.
    let appending = txn.prepare_typed_cached(APPEND_SQL, APPEND_TYPES).await?;
    txn.execute(
        &appending,
        &[&region, &seqs, &hashes, &task_ids, &lines, &seq, &hash],
    )
    .await?;
    Ok(Some((u64::try_from(seq).unwrap_or(0), hash)))
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
            // The statements first (cached after the connection's first
            // batch), so the append goes ahead of the COMMIT behind it.
            prepare(&client).await.map_err(db)?;
            // BEGIN and the head's lock in one round trip; the records, the
            // head and COMMIT in the next.
            let any = !records.is_empty();
            let (begun, head) = futures::join!(client.batch_execute("BEGIN"), async {
                if any {
                    lock_head(&client, &region2).await.map(Some)
                } else {
                    Ok(None)
                }
            });
            let appended = async {
                begun.map_err(db)?;
                let head = head.map_err(db)?.unwrap_or((0, GENESIS_HASH.to_string()));
                let mut append = std::pin::pin!(append_after(&client, &region2, head, records));
                let first = futures::poll!(append.as_mut());
                if let std::task::Poll::Ready(Err(e)) = first {
                    return Err(db(e));
                }
                let (appended, committed) = futures::join!(
                    async {
                        match first {
                            std::task::Poll::Ready(r) => r,
                            std::task::Poll::Pending => append.await,
                        }
                    },
                    client.batch_execute("COMMIT")
                );
                let head = appended.map_err(db)?;
                committed.map_err(db)?;
                Ok::<_, PgError>(head)
            }
            .await;
            if appended.is_err() {
                // Whatever state the transaction is in, it ends here.
                let _ = client.batch_execute("ROLLBACK").await;
            }
            appended
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
