//! Decision-log bytes → `audit::verify_bytes`: any corruption is reported,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = federation::audit::verify_bytes(data);
});
