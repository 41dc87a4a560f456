//! `federation` binary: the controller and its command-line tools.
fn main() {}
