//! Decision-log bytes → `audit::verify_bytes` and the anchor check against a
//! head; the same bytes as a witnesses file → `anchor::parse_witnesses`: any
//! corruption is reported, never a panic.
#![no_main]

use federation::audit::anchor::{self, LogHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = federation::audit::verify_bytes(data);
    let seq = data.first().map_or(0, |b| u64::from(*b % 8));
    let head = LogHead {
        seq,
        hash: "0".repeat(64),
    };
    let _ = anchor::check_bytes(data, &head);
    let _ = anchor::parse_witnesses(std::path::Path::new("witnesses.json"), data);
});
