//! The federation's test harness: local federations of real controller and
//! agent processes on loopback (`federation`; `scenario`: start until formed,
//! kill until seen dead, restart until seen alive), child
//! process guards, free ports, a throwaway PostgreSQL server (`pg`) and the
//! fixtures every test shares. Used by `federation demo`, the integration
//! tests, the benches and the library's unit tests; never linked into a
//! production build of `federation serve` (the `federation` package's
//! default-on `demo` feature pulls it in; `--no-default-features` leaves it
//! out). Knows nothing of the `federation` library: it drives the binary.
#![forbid(unsafe_code)]

pub mod child;
pub mod federation;
pub mod fixtures;
pub mod pg;
pub mod ports;
pub mod scenario;
pub mod topology;

pub use child::ChildGuard;
pub use federation::{Sandbox, SandboxBuilder, SandboxRegion, SandboxTls, connect};
pub use fixtures::{SEED_POLICY, SEED_REQUIRES_GDPR, string_attrs};
pub use ports::free_port;
