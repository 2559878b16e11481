//! raven's gRPC protocol, package `raven.v1`: the generated prost messages and
//! tonic clients/servers, the proto ↔ domain conversions shared by hub and
//! edge, and the pre-encoded fan-out of shared resources.
//!
//! ```text
//! hub:  Topology ─▶ EncodedResource (once per version) ─▶ EncodedSyncResponse ─▶ wire::SyncServiceServer
//! edge: v1::SyncServiceClient ─▶ v1::SyncResponse ─▶ update_from_proto (parse + version check) ─▶ store
//! ```
//!
//! The protocol itself (stream lifecycle, ACK/NACK, snapshots, status codes)
//! is documented in `proto/raven/v1/sync.proto`.

mod convert;
pub mod digest;
mod encoded;
mod packed;

#[cfg(any(test, feature = "arbitrary"))]
pub mod arbitrary;

use std::time::Duration;

pub use convert::{
    ConversionError, DecodedUpdate, Subject, UpdateHeader, hello_inventory,
    hello_inventory_interned, problem_from_proto, problem_to_proto, report_from_proto,
    report_to_proto, resource_from_proto, resource_to_proto, resource_versions_to_proto,
    topology_to_proto, update_from_proto, update_to_proto,
};
pub use encoded::{EncodedResource, EncodedSyncResponse};

/// Generated code for `raven.v1`: messages, `sync_service_client`,
/// `sync_service_server` (with plain [`v1::SyncResponse`]; the hub serves
/// [`wire::sync_service_server`] instead), `inspect_service_client` and
/// `inspect_service_server`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::doc_markdown
)]
pub mod v1 {
    tonic::include_proto!("raven.v1");
}

/// The `raven.v1.SyncService` server generated a second time, streaming
/// [`EncodedSyncResponse`] (pre-encoded, shared resource bytes) instead of
/// [`v1::SyncResponse`]. Clients are unaffected: the bytes on the wire are
/// the same. Use `wire::sync_service_server::{SyncService, SyncServiceServer}`
/// in the hub.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/wire/raven.v1.rs"));
}

/// The encoded `FileDescriptorSet` of `raven/v1/*.proto` and their imports,
/// with comments, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/raven_descriptor.bin"));

/// The protocol version this crate speaks (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Metadata key of the retry hint the hub attaches to `RESOURCE_EXHAUSTED`
/// (admission limiting): milliseconds the agent waits before it redials.
pub const RETRY_AFTER_METADATA_KEY: &str = "retry-after-ms";

/// The status a hub answers a `Sync` call with when it admits no more
/// streams for now: `RESOURCE_EXHAUSTED` with a `retry-after-ms` hint.
pub fn resource_exhausted(retry_after: Duration) -> tonic::Status {
    let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(RETRY_AFTER_METADATA_KEY, millis.into());
    tonic::Status::with_metadata(
        tonic::Code::ResourceExhausted,
        format!("too many agents connecting; retry in {millis} ms"),
        metadata,
    )
}

/// The retry hint of a status, when it carries one.
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    status
        .metadata()
        .get(RETRY_AFTER_METADATA_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests;
