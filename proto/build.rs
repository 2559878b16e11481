//! Compiles `raven/v1/*.proto` with protox (no system `protoc`) and generates:
//! - `raven_descriptor.bin`: the encoded `FileDescriptorSet` (with imports and
//!   comments), served by gRPC server reflection;
//! - `raven.v1.rs`: prost messages, tonic clients and servers (`crate::v1`);
//! - `wire/raven.v1.rs`: the `SyncService` server a second time, streaming the
//!   pre-encoded `crate::EncodedSyncResponse` instead of `SyncResponse`
//!   (`crate::wire`).

use std::path::PathBuf;
use std::{env, fs};

use prost::Message as _;
use prost_types::FileDescriptorSet;

const PROTOS: &[&str] = &[
    "raven/v1/resources.proto",
    "raven/v1/sync.proto",
    "raven/v1/inspect.proto",
];
const SYNC_PROTO: &str = "raven/v1/sync.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.join("raven").display());
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    fs::write(out.join("raven_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds.clone())?;

    // The fan-out server: only the SyncService of sync.proto, with every
    // message type taken from `crate::v1` except SyncResponse, which becomes
    // the pre-encoded `crate::EncodedSyncResponse`.
    let mut sync = fds
        .file
        .into_iter()
        .find(|f| f.name() == SYNC_PROTO)
        .ok_or("sync.proto missing from the descriptor set")?;
    sync.message_type.clear();
    sync.enum_type.clear();
    sync.dependency.clear();
    let wire = out.join("wire");
    fs::create_dir_all(&wire)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&wire)
        .extern_path(".raven.v1", "crate::v1")
        .extern_path(".raven.v1.SyncResponse", "crate::EncodedSyncResponse")
        .compile_fds(FileDescriptorSet { file: vec![sync] })?;
    Ok(())
}
