//! The record's former names, kept only for `tasks/` (changed on another
//! branch this session) until it moves to [`Entry`], [`Prepared`] and
//! [`DecisionLog::append`]; delete this file with that change.

use super::{Batch, DecisionLog, Entry, Prepared, Receipt};
use crate::policy::{Attributes, Decision};

/// Former name of [`Entry`].
pub type DecisionEntry = Entry;
/// Former name of [`Prepared`].
pub type PendingRecord = Prepared;

/// Former borrowed form of [`Prepared::decision`]'s arguments.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRef<'a> {
    /// One of [`super::kind`]'s constants.
    pub kind: &'a str,
    /// The task concerned.
    pub task_id: Option<&'a str>,
    /// The region the client called.
    pub entry_region: Option<&'a str>,
    /// The attributes the decision read.
    pub attributes: &'a Attributes,
    /// The decision.
    pub decision: &'a Decision,
    /// Free text.
    pub note: Option<&'a str>,
}

impl Prepared {
    /// Former name of [`Prepared::decision`].
    pub fn new(r: DecisionRef<'_>) -> Self {
        Self::decision(
            r.kind,
            r.task_id,
            r.entry_region,
            r.attributes,
            r.decision,
            r.note,
        )
    }
}

impl DecisionLog {
    /// Former name of [`DecisionLog::append`] for a batch.
    pub fn append_batch(&self, records: Vec<Prepared>) -> Receipt {
        self.append(Batch::from(records))
    }
}
