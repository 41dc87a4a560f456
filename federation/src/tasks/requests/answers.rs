//! The answers of a batch's requests: held until the batch's fate is known
//! ([`Settled`]), then each sent with its own result or the batch's error;
//! an insert's record named after its task and collected for the journal.

use tokio::sync::oneshot;

use super::{Op, Outcomes, Reply};
use crate::tasks::journal::Record;
use crate::tasks::{BatchInsert, InsertOutcome, RecordState, RecordedInsert, StoreError};

/// How a batch ended: committed or not, and what became of the records it
/// handed to the journal (every record of a batch goes in one append).
pub(in crate::tasks) struct Settled {
    pub(in crate::tasks) committed: Result<(), StoreError>,
    pub(in crate::tasks) records: RecordState,
}

impl Settled {
    /// A batch that failed before its records were handed over.
    pub(in crate::tasks) fn failed(err: StoreError) -> Self {
        Self {
            committed: Err(err),
            records: RecordState::NotWritten,
        }
    }
}

/// What happened to the record a request carried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// None was given (or its insert was refused: nothing to append).
    Nothing,
    /// It is in the batch's append.
    Appended,
    /// One was given, but the store has no journal.
    Unbound,
}

impl Carried {
    fn state(self, settled: &Settled) -> RecordState {
        match self {
            Carried::Nothing => RecordState::NotWritten,
            Carried::Appended => settled.records.clone(),
            Carried::Unbound => {
                RecordState::Failed("the task store has no decision log bound to it".into())
            }
        }
    }
}

/// A request's answer, sent once its batch is settled: its own result when
/// the batch committed, the batch's error otherwise.
pub(in crate::tasks) struct Answer(Box<dyn FnOnce(&Settled) + Send>);

impl Answer {
    pub(in crate::tasks) fn new<R: Send + 'static>(
        reply: Reply<R>,
        result: Result<R, StoreError>,
    ) -> Self {
        Self(Box::new(move |s: &Settled| {
            let _ = reply.send(s.committed.clone().and(result));
        }))
    }

    pub(in crate::tasks) fn settle(self, settled: &Settled) {
        (self.0)(settled)
    }
}

/// An applied request: the answer to send, or an insert's outcome with its
/// records still to name and hand to the journal ([`answers`]).
pub(in crate::tasks) enum Applied {
    Insert {
        /// Boxed: a task is large, the other answers small.
        result: Box<Result<InsertOutcome, StoreError>>,
        record: Option<Record>,
        reply: oneshot::Sender<RecordedInsert>,
    },
    Batch {
        result: Result<Outcomes, StoreError>,
        records: Option<Vec<Record>>,
        reply: oneshot::Sender<BatchInsert>,
    },
    Other {
        /// A storage error: the batch cannot commit.
        fatal: Option<StoreError>,
        answer: Answer,
    },
}

impl Applied {
    /// The answer `result` to a request other than an insert.
    pub(in crate::tasks) fn answer<R: Send + 'static>(
        reply: Reply<R>,
        result: Result<R, StoreError>,
    ) -> Self {
        Applied::Other {
            fatal: fatal(&result).cloned(),
            answer: Answer::new(reply, result),
        }
    }

    /// The storage error that fails the whole batch, if this request hit one.
    pub(in crate::tasks) fn fatal(&self) -> Option<&StoreError> {
        match self {
            Applied::Insert { result, .. } => fatal(result),
            Applied::Batch { result, .. } => fatal(result),
            Applied::Other { fatal, .. } => fatal.as_ref(),
        }
    }
}

/// A storage error (the database failed or cannot be reached): the
/// transaction may hold part of the request, so the batch fails as a whole.
pub(in crate::tasks) fn fatal<R>(result: &Result<R, StoreError>) -> Option<&StoreError> {
    result
        .as_ref()
        .err()
        .filter(|e| matches!(e, StoreError::Db(_) | StoreError::Unavailable(_)))
}

/// Turns a batch's applied requests into answers, in order, and collects
/// the records to append: each insert's record named after the task it
/// produced (the stored one when deduplicated), a batch insert's records
/// of the tasks it created; none for a refused insert. Records given to a
/// store with no journal (`bound` false) are answered as not written.
pub(in crate::tasks) fn answers(applied: Vec<Applied>, bound: bool) -> (Vec<Answer>, Vec<Record>) {
    let mut records = Vec::new();
    let mut carry = |given: bool, named: &mut dyn Iterator<Item = Record>| -> Carried {
        if !given {
            return Carried::Nothing;
        }
        if !bound {
            return Carried::Unbound;
        }
        let before = records.len();
        records.extend(named);
        if records.len() > before {
            Carried::Appended
        } else {
            Carried::Nothing
        }
    };
    let out =
        applied
            .into_iter()
            .map(|a| match a {
                Applied::Other { answer, .. } => answer,
                Applied::Insert {
                    result,
                    record,
                    reply,
                } => {
                    let result = *result;
                    let given = record.is_some();
                    let mut named = record.into_iter().filter_map(|mut r| {
                        let o = result.as_ref().ok()?;
                        r.set_task_id(&o.task().task_id);
                        Some(r)
                    });
                    let carried = carry(given, &mut named);
                    Answer(Box::new(move |s: &Settled| {
                        let _ = reply.send(RecordedInsert {
                            outcome: s.committed.clone().and(result),
                            record: carried.state(s),
                        });
                    }))
                }
                Applied::Batch {
                    result,
                    records: given,
                    reply,
                } => {
                    let some = given.is_some();
                    let outcomes = result.as_deref().unwrap_or_default();
                    let mut named = given.into_iter().flatten().zip(outcomes).filter_map(
                        |(mut r, o)| match o {
                            Ok(InsertOutcome::Created(t)) => {
                                r.set_task_id(&t.task_id);
                                Some(r)
                            }
                            _ => None,
                        },
                    );
                    let carried = carry(some, &mut named);
                    drop(named);
                    Answer(Box::new(move |s: &Settled| {
                        let _ = reply.send(BatchInsert {
                            outcomes: s.committed.clone().and(result),
                            record: carried.state(s),
                        });
                    }))
                }
            })
            .collect();
    (out, records)
}

/// Settles every answer of a batch that failed with `err` before its
/// records were handed over, and refuses the requests never applied.
pub(in crate::tasks) fn fail(
    answers: Vec<Answer>,
    rest: impl IntoIterator<Item = Op>,
    err: StoreError,
) {
    for op in rest {
        op.refuse(&err);
    }
    let settled = Settled::failed(err);
    for a in answers {
        a.settle(&settled);
    }
}
