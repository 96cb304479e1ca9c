//! Generates the Rust of the protos in `proto/` at build time: `protox` (a protobuf compiler in
//! Rust, so no `protoc` is needed) parses them into a descriptor set, `tonic-prost-build` turns that
//! into prost messages and tonic clients and servers. The well-known types (`Any`, `Struct`,
//! `Duration`, `Empty`, wrappers) come from protox's built-in copies and map to `prost-types`.

use std::path::PathBuf;

/// The proto files, relative to `proto/`; their imports are found there or among the well-known types.
const PROTOS: &[&str] = &[
    "envoy/service/discovery/v3/discovery.proto",
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/v1/auth/ca.proto",
    "istio/workload/zds/zds.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    let fds = protox::compile(PROTOS, [&dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `connect` helpers: they need tonic's transport, which meshwire does not use.
        .build_transport(false)
        .compile_well_known_types(false)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
