//! `region-agent` binary.
fn main() {}
