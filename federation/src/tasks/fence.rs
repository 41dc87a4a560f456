//! Which QUEUED tasks a lease passes over while the start-up fence is up:
//! those owned by one region and created before a boundary, decided from
//! what a queue entry holds (its id and creation time), so the fence is two
//! values, not a list of every task from before the restart. Pure; a leaf.

/// The queued tasks a lease leaves alone: owned by `owner` (the region in
/// the task id, `<uuid>.<owner>`) and created before `before_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFence {
    owner: String,
    before_ms: i64,
    held: usize,
}

impl LeaseFence {
    /// The fence over `owner`'s tasks created before `before_ms`, of which
    /// at most `held` were pending when it was set up (the most queue
    /// entries a lease may pass over, besides the ones it takes).
    pub fn new(owner: &str, before_ms: i64, held: usize) -> Self {
        Self {
            owner: owner.to_string(),
            before_ms,
            held,
        }
    }

    /// Whether the queued task `task_id`, created at `created_ms`, is held
    /// back.
    pub fn holds_back(&self, task_id: &str, created_ms: i64) -> bool {
        created_ms < self.before_ms && owned_by(task_id, &self.owner)
    }

    /// The region whose tasks it holds back.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Tasks created before this (ms since the Unix epoch) are held back.
    pub fn before_ms(&self) -> i64 {
        self.before_ms
    }

    /// The most tasks it holds back: those pending when it was set up.
    pub fn held(&self) -> usize {
        self.held
    }
}

/// `task_id` is `<uuid>.<region>` (as `wire::owner_of` reads it).
fn owned_by(task_id: &str, region: &str) -> bool {
    task_id
        .split_once('.')
        .is_some_and(|(uuid, r)| uuid.len() == 36 && r == region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_only_the_owners_tasks_from_before_the_boundary() {
        let f = LeaseFence::new("europe", 1_000, 3);
        let ours = "0190b0a0-0000-7000-8000-000000000001.europe";
        let theirs = "0190b0a0-0000-7000-8000-000000000001.north_america";
        assert!(f.holds_back(ours, 999));
        assert!(
            !f.holds_back(ours, 1_000),
            "created at the boundary: after the start"
        );
        assert!(
            !f.holds_back(theirs, 1),
            "a task taken over from another region"
        );
        assert!(!f.holds_back("not-a-task-id.europe", 1));
        assert!(!f.holds_back("0190b0a0-0000-7000-8000-000000000001.europe2", 1));
        assert_eq!((f.owner(), f.before_ms(), f.held()), ("europe", 1_000, 3));
    }
}
