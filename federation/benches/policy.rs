//! Routing-decision benchmark (filled in by the policy engine work).
fn main() {}
