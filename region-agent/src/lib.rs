//! The region agent: registers with its region's controller, heartbeats its
//! capacity, leases tasks, runs each as a child process and reports results.
#![forbid(unsafe_code)]
