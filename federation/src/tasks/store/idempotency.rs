//! The embedded store's idempotency index: key → task id, in memory,
//! staged per batch and visible once the batch has committed.

use std::collections::HashMap;

/// Idempotency key → task id, in memory. Derived data: every task record
/// carries its key, so the index is rebuilt at open and never written. The
/// changes of a batch are staged and become visible to later batches only
/// once its transaction has committed.
#[derive(Default)]
pub(super) struct IdemIndex {
    pub(super) committed: HashMap<Box<str>, Box<str>>,
    staged: HashMap<Box<str>, Box<str>>,
}

impl IdemIndex {
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.staged
            .get(key)
            .or_else(|| self.committed.get(key))
            .map(|id| &**id)
    }

    pub(super) fn stage(&mut self, key: &str, id: &str) {
        self.staged.insert(key.into(), id.into());
    }

    pub(super) fn commit(&mut self) {
        self.committed.extend(self.staged.drain());
    }

    pub(super) fn abort(&mut self) {
        self.staged.clear();
    }
}
