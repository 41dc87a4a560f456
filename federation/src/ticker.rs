//! A periodic tick that ends at shutdown: what every background loop of the
//! controller waits on between rounds.

use std::time::Duration;

/// Ticks every `period` (missed ticks delayed, not bunched) until the stop
/// flag turns true.
#[derive(Debug)]
pub struct Ticker {
    interval: tokio::time::Interval,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Ticker {
    /// A ticker of `period` (the first tick is at once) watching `stop`.
    pub fn new(period: Duration, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval, stop }
    }

    /// Waits for the next tick: true, or false once shutdown has begun (or
    /// nobody can stop it any more).
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => {}
            changed = self.stop.changed() => {
                if changed.is_err() {
                    return false;
                }
            }
        }
        !*self.stop.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_until_stopped() {
        let (stop, watch) = tokio::sync::watch::channel(false);
        let mut t = Ticker::new(Duration::from_millis(1), watch);
        assert!(t.tick().await, "the first tick is at once");
        assert!(t.tick().await, "then one per period");
        stop.send(true).expect("watched");
        assert!(!t.tick().await, "stopped");
        assert!(!t.tick().await, "and stays stopped");
        drop(stop);
        assert!(!t.tick().await, "a dropped flag stops it too");
    }
}
