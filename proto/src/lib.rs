//! The `federation.v1` gRPC API: messages and the client and server code that
//! `build.rs` generates from `proto/federation/v1/federation.proto`.
//!
//! This crate owns the wire types only; no behaviour lives here.
#![forbid(unsafe_code)]

/// Generated code for the `federation.v1` package.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("federation.v1");
}

pub use v1::*;

/// The encoded file descriptor set of `federation.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("federation_v1_descriptor");
