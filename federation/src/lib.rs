//! The residency-aware federation controller: one per region, routing tasks
//! by compliance rules, tracking peers, storing tasks durably and keeping a
//! tamper-evident decision log. See `ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

pub mod agents;
pub mod cli;
pub mod config;
pub mod error;
pub mod membership;
pub mod policy;
pub mod transport;
pub mod wire;
pub mod controller;
pub mod routing;
pub mod service;
pub mod sandbox;
