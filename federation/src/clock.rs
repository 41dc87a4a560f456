//! The wall clock in the form the task store, its database and the decision
//! log record. Owns reading the clock only.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock now in milliseconds since the Unix epoch (0 if the clock is
/// before 1970).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
