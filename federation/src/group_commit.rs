//! Group commit: how a writer thread (the task store's, the decision log's)
//! gathers the requests that one durable write and one fsync carry.
//!
//! A writer takes whatever is queued. Under concurrent load it also
//! *lingers*: after the last batch carried more than one request, it waits in
//! steps of 100 µs (at most 500 µs) for the requests still being prepared on
//! the runtime's workers, as long as each step brings some. Each fsync then carries more
//! requests, so the disk and CPU cost of a commit is shared by more callers.
//! A caller alone after a batch of one never waits; the first batch after a
//! burst waits one step (100 µs) and, finding nothing new, commits.
//!
//! This module owns only the gathering; what a batch means is the writer's.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

/// One linger step: the writer sleeps this long, then takes what arrived.
const STEP: Duration = Duration::from_micros(100);
/// The longest a batch waits for more requests after its first one.
const MAX_LINGER: Duration = Duration::from_micros(500);

/// Gathers batches of at most `max` requests from one channel.
#[derive(Debug)]
pub struct Gatherer<T> {
    rx: UnboundedReceiver<T>,
    max: usize,
    /// The last batch carried more than one request: callers are concurrent.
    concurrent: bool,
}

impl<T> Gatherer<T> {
    /// Batches of at most `max` (at least 1) requests from `rx`.
    pub fn new(rx: UnboundedReceiver<T>, max: usize) -> Self {
        Self {
            rx,
            max: max.max(1),
            concurrent: false,
        }
    }

    /// Blocks for the next batch; `None` when every sender is gone and the
    /// channel is empty.
    pub fn next_batch(&mut self) -> Option<Vec<T>> {
        let first = self.rx.blocking_recv()?;
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        self.drain(&mut batch);
        if self.concurrent {
            let until = Instant::now() + MAX_LINGER;
            while batch.len() < self.max && Instant::now() < until {
                std::thread::sleep(STEP);
                if self.drain(&mut batch) == 0 {
                    break;
                }
            }
        }
        self.concurrent = batch.len() > 1;
        Some(batch)
    }

    /// Takes what is queued, up to the batch limit; returns how many.
    fn drain(&mut self, batch: &mut Vec<T>) -> usize {
        let before = batch.len();
        while batch.len() < self.max {
            match self.rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        batch.len() - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_take_what_is_queued_up_to_the_limit() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut g = Gatherer::new(rx, 3);
        for i in 0..5 {
            tx.send(i).expect("send");
        }
        assert_eq!(g.next_batch(), Some(vec![0, 1, 2]));
        assert_eq!(g.next_batch(), Some(vec![3, 4]));
        drop(tx);
        assert_eq!(g.next_batch(), None);
    }

    #[test]
    fn a_lone_request_after_a_lone_request_does_not_wait() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut g = Gatherer::new(rx, 16);
        tx.send(1).expect("send");
        assert_eq!(g.next_batch(), Some(vec![1]));
        assert!(!g.concurrent);
        tx.send(2).expect("send");
        assert_eq!(g.next_batch(), Some(vec![2]));
    }

    #[test]
    fn a_lingering_batch_ends_when_requests_stop_arriving() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut g = Gatherer::new(rx, 1024);
        tx.send(0).expect("send");
        tx.send(1).expect("send");
        assert_eq!(g.next_batch(), Some(vec![0, 1]));
        assert!(g.concurrent);
        // Concurrent now, so the next batch lingers; with nothing more
        // arriving it still ends, with what was there, and the sender
        // stays connected throughout.
        tx.send(2).expect("send");
        assert_eq!(g.next_batch(), Some(vec![2]));
        assert!(!g.concurrent);
        drop(tx);
        assert_eq!(g.next_batch(), None);
    }
}
