//! Generates the `federation.v1` gRPC code from `proto/` with a vendored
//! `protoc` (the `protoc-bin-vendored` crate), so a fresh machine needs only
//! the Rust toolchain. The file descriptor set is written too, for gRPC
//! server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/federation/v1/federation.proto"];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("federation_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;

    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
