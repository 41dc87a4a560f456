//! Tasks a component spawns and does not wait for (a push to one peer, a
//! check after a batch), ended with the component: [`Detached`] owns them,
//! so none outlives the run that spawned it holding the component's state
//! (the task store among it). Knows nothing of what runs in them.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;

/// The detached tasks of one component. Spawning after [`Detached::end`]
/// runs nothing.
#[derive(Debug)]
pub struct Detached {
    /// `None` once ended.
    set: Mutex<Option<JoinSet<()>>>,
}

impl Default for Detached {
    fn default() -> Self {
        Self::new()
    }
}

impl Detached {
    /// A set that takes tasks until ended.
    pub fn new() -> Self {
        Self {
            set: Mutex::new(Some(JoinSet::new())),
        }
    }

    /// Spawns `task` on the current runtime; dropped unrun once the set has
    /// ended. Finished tasks are reaped here, so the set holds only the
    /// running ones.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        let Some(set) = set.as_mut() else {
            return;
        };
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// How many tasks are running (finished ones not yet reaped aside).
    pub fn running(&self) -> usize {
        let set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        set.as_ref().map_or(0, JoinSet::len)
    }

    /// Ends the set: nothing spawns any more; the running tasks get
    /// `patience` to finish, then the rest are aborted. Returns once every
    /// task has ended and dropped what it held; the number aborted.
    pub async fn end(&self, patience: Duration) -> usize {
        let taken = self.set.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut set) = taken else {
            return 0;
        };
        let finished =
            tokio::time::timeout(patience, async { while set.join_next().await.is_some() {} })
                .await;
        if finished.is_ok() {
            return 0;
        }
        let aborted = set.len();
        set.abort_all();
        while set.join_next().await.is_some() {}
        aborted
    }

    /// Whether [`Detached::end`] was called.
    pub fn has_ended(&self) -> bool {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn ending_waits_for_the_quick_aborts_the_slow_and_drops_what_they_held() {
        let d = Detached::new();
        let held = Arc::new(());
        let (quick_done_tx, mut quick_done) = tokio::sync::mpsc::channel::<()>(1);
        {
            let held = held.clone();
            d.spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = quick_done_tx.send(()).await;
                drop(held);
            });
        }
        {
            let held = held.clone();
            d.spawn(async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(held);
            });
        }
        assert_eq!(d.running(), 2);
        let aborted = d.end(Duration::from_millis(300)).await;
        assert_eq!(aborted, 1, "the hour-long task is aborted");
        assert!(quick_done.try_recv().is_ok(), "the quick one finished");
        assert_eq!(Arc::strong_count(&held), 1, "no task holds anything");
        assert!(d.has_ended());
        let after = held.clone();
        d.spawn(async move { drop(after) });
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "a spawn after the end runs nothing"
        );
        assert_eq!(d.running(), 0);
    }
}
