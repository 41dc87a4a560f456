//! Retry pacing: capped exponential backoff with jitter, and which repeats of a
//! failure are logged loudly; pure, no I/O, no controller calls.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with jitter, capped.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    pub(super) fn new(max: Duration) -> Self {
        Self {
            next: Self::START.min(max),
            max,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::START.min(self.max);
    }

    /// The next delay, between 75% and 125% of the nominal one.
    pub(super) fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let random = RandomState::new().build_hasher().finish();
        let factor = 0.75 + 0.5 * ((random % 1000) as f64 / 1000.0);
        nominal.mul_f64(factor)
    }
}

/// Log the 1st, 2nd, 4th, 8th… occurrence loudly, the rest at debug level.
pub(super) fn loud(occurrence: u64) -> bool {
    occurrence <= 1 || occurrence.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let max = Duration::from_millis(800);
        let mut backoff = Backoff::new(max);
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max.mul_f64(1.25)));
        assert!(delays[0] <= Duration::from_millis(125));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn loud_logging_is_logarithmic() {
        let loud_count = (1..=1000u64).filter(|n| loud(*n)).count();
        assert_eq!(loud_count, 10);
    }
}
