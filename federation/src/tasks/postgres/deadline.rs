//! A writer batch bounded by `node.store.timeout`: each request's reply is
//! routed through a relay the writer keeps, so a batch abandoned at its
//! deadline (its transaction dropped with the connection) still answers
//! every caller, with the store's unavailability, instead of leaving them
//! a closed channel.

use tokio::sync::oneshot;

use crate::tasks::requests::Op;
use crate::tasks::{BatchInsert, RecordedInsert, StoreError};

/// Forwards one request's answer to its caller, or an error when the batch
/// gave none.
pub(super) struct Relay(Box<dyn FnOnce(&StoreError) + Send>);

impl Relay {
    /// Sends the caller the batch's answer, or `err` when it has none.
    pub(super) fn finish(self, err: &StoreError) {
        (self.0)(err);
    }
}

fn relay<R: Send + 'static>(
    reply: oneshot::Sender<R>,
    failed: fn(StoreError) -> R,
) -> (oneshot::Sender<R>, Relay) {
    let (tx, mut rx) = oneshot::channel();
    let forward = move |err: &StoreError| {
        let answer = rx.try_recv().unwrap_or_else(|_| failed(err.clone()));
        let _ = reply.send(answer);
    };
    (tx, Relay(Box::new(forward)))
}

/// `op` with its reply routed through the returned relay.
pub(super) fn relayed(op: Op) -> (Op, Relay) {
    match op {
        Op::Insert {
            task,
            record,
            reply,
        } => {
            let (reply, r) = relay(reply, RecordedInsert::failed);
            (
                Op::Insert {
                    task,
                    record,
                    reply,
                },
                r,
            )
        }
        Op::InsertBatch {
            tasks,
            records,
            fence,
            reply,
        } => {
            let (reply, r) = relay(reply, BatchInsert::failed);
            (
                Op::InsertBatch {
                    tasks,
                    records,
                    fence,
                    reply,
                },
                r,
            )
        }
        Op::Lease {
            agent,
            max,
            ttl_ms,
            held_back,
            reply,
        } => {
            let (reply, r) = relay(reply, Err);
            (
                Op::Lease {
                    agent,
                    max,
                    ttl_ms,
                    held_back,
                    reply,
                },
                r,
            )
        }
        Op::Renew {
            agent,
            id,
            ttl_ms,
            reply,
        } => {
            let (reply, r) = relay(reply, Err);
            (
                Op::Renew {
                    agent,
                    id,
                    ttl_ms,
                    reply,
                },
                r,
            )
        }
        Op::Complete {
            agent,
            id,
            success,
            result,
            error,
            reply,
        } => {
            let (reply, r) = relay(reply, Err);
            (
                Op::Complete {
                    agent,
                    id,
                    success,
                    result,
                    error,
                    reply,
                },
                r,
            )
        }
        Op::Cancel { id, reason, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::Cancel { id, reason, reply }, r)
        }
        Op::Expire {
            max_attempts,
            fence,
            reply,
        } => {
            let (reply, r) = relay(reply, Err);
            (
                Op::Expire {
                    max_attempts,
                    fence,
                    reply,
                },
                r,
            )
        }
        Op::RequeueAgent { agent, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::RequeueAgent { agent, reply }, r)
        }
        Op::PutAgent { record, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::PutAgent { record, reply }, r)
        }
        Op::ForgetAgent { agent, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::ForgetAgent { agent, reply }, r)
        }
        Op::ExtendLeases { ttl_ms, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::ExtendLeases { ttl_ms, reply }, r)
        }
        Op::MarkTakenOver {
            ids,
            takeover,
            reply,
        } => {
            let (reply, r) = relay(reply, Err);
            (
                Op::MarkTakenOver {
                    ids,
                    takeover,
                    reply,
                },
                r,
            )
        }
        Op::Restore { task, reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::Restore { task, reply }, r)
        }
        Op::Flush { reply } => {
            let (reply, r) = relay(reply, Err);
            (Op::Flush { reply }, r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answered_request_gets_its_answer_and_an_abandoned_one_the_error() {
        let (reply, mut answered) = oneshot::channel();
        let (op, relay_a) = relayed(Op::Flush { reply });
        let Op::Flush { reply: inner } = op else {
            panic!("the same op")
        };
        inner.send(Ok(())).expect("send");
        relay_a.finish(&StoreError::Unavailable("x".into()));
        assert!(matches!(answered.try_recv(), Ok(Ok(()))));

        let (reply, mut abandoned) = oneshot::channel();
        let (op, relay_b) = relayed(Op::Flush { reply });
        drop(op);
        relay_b.finish(&StoreError::Unavailable("no answer".into()));
        assert!(
            matches!(abandoned.try_recv(), Ok(Err(StoreError::Unavailable(m))) if m == "no answer")
        );
    }
}
