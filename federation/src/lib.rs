//! The residency-aware federation controller: one per region, routing tasks
//! by compliance rules, tracking peers, storing tasks durably and keeping a
//! tamper-evident decision log. See `ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

pub mod admin_http;
pub mod agents;
pub mod approvals;
pub mod atomic_file;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod decision_query;
pub mod detached;
pub mod discovery;
pub mod drain;
pub mod error;
pub mod federation_status;
pub mod gossip;
pub mod group_commit;
pub mod leasing;
pub mod live_policy;
pub mod local_tasks;
pub mod logfields;
pub mod membership;
pub mod metrics;
pub mod peers;
pub mod pg;
pub mod pg_tls;
pub mod policy;
pub mod private_files;
pub mod relay;
pub mod reload;
pub mod replication;
pub mod routing;
pub mod runtime;
pub mod service;
pub mod settings;
pub mod status_view;
pub mod task_decision;
pub mod tasks;
pub mod text;
pub mod ticker;
pub mod transport;
pub mod wire;
