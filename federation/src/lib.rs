//! The residency-aware federation controller: one per region, routing tasks
//! by compliance rules, tracking peers, storing tasks durably and keeping a
//! tamper-evident decision log. See `ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod policy;
pub mod tasks;
