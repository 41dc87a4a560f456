//! The in-process tier: real controllers (`runtime::run`: the same
//! store, decision log, membership, routing, replication and gRPC services
//! as `federation serve`) each on its own thread and tokio runtime, serving
//! plaintext gRPC on its own 127.0.0.1 socket, in the test's process. Faster
//! than the process federations of `tests/` (no binaries, no TLS handshakes,
//! fast timers), slower and more real than unit tests: nothing of ours is
//! mocked, every call goes over loopback. Killing a region drops its runtime
//! (every task and socket at once, as after SIGKILL); restarting it opens
//! the same data directory again.
//!
//! Run: `cargo test -p federation --test in_process`.

mod federation;

mod agent;
mod location;
mod routing;
mod takeover;
