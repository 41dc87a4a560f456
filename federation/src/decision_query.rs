//! Queries of this region's decision log over gRPC: a `ListDecisions`
//! request's filter validated, and the `ListDecisions` answer (the newest
//! matching records and the chain's state).

use federation_api as api;

use crate::audit::DecisionLog;
use crate::error::{Error, Result};

/// Most records one `ListDecisions` call returns.
pub const MAX_DECISIONS: u32 = 1000;

/// The audit filter of a `ListDecisions` (or `RecentDecisions`) request,
/// validated.
pub fn filter(req: &api::ListDecisionsRequest) -> Result<crate::audit::Filter> {
    let outcome = match req.outcome.as_str() {
        "" => None,
        o @ ("routed" | "failover" | "rejected") => Some(o.to_string()),
        other => {
            return Err(Error::invalid(
                "outcome",
                format!(
                    "`{}`: expected routed, failover or rejected",
                    crate::wire::truncate(other, 32)
                ),
            ));
        }
    };
    if !req.task_id.is_empty() {
        crate::wire::check_task_id(&req.task_id)?;
    }
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(crate::audit::Filter {
        task_id: nonempty(&req.task_id),
        rule: (req.rule > 0).then_some(u64::from(req.rule)),
        region: nonempty(&req.region),
        outcome,
    })
}

/// The `ListDecisions` answer from `log`: the newest `req.limit` matching
/// records (100 when unset), read from the log's end; only the lines read are
/// checked against the chain.
pub async fn list(
    log: &DecisionLog,
    req: &api::ListDecisionsRequest,
) -> Result<api::ListDecisionsResponse> {
    let filter = filter(req)?;
    let limit = match req.limit {
        0 => 100,
        n if n > MAX_DECISIONS => {
            return Err(Error::limit(
                "limit",
                format!("at most {MAX_DECISIONS} records per call"),
            ));
        }
        n => n as usize,
    };
    let log = log.clone();
    // Reading the log's end is I/O (the file or the database): off the
    // async workers. Only the lines read are hashed, not the whole log.
    let read = tokio::task::spawn_blocking(move || log.list(&filter, limit, LIST_TAIL_BYTES))
        .await
        .map_err(|e| Error::Internal(format!("reading the decision log: {e}")))?;
    let listed = read.map_err(|e| Error::Internal(format!("reading the decision log: {e}")))?;
    let records = listed
        .records
        .iter()
        .map(serde_json::to_string)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("encoding a record: {e}")))?;
    Ok(api::ListDecisionsResponse {
        matched: records.len() as u64,
        records,
        chain_intact: listed.broken.is_none(),
        chain_error: listed.broken.unwrap_or_default(),
        total_records: listed.head.0,
        last_hash: listed.head.1,
    })
}

/// Most bytes of the log `ListDecisions` reads back from its end.
const LIST_TAIL_BYTES: u64 = 64 * 1024 * 1024;
