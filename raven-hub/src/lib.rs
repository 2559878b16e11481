//! raven-hub: the cloud side of raven.
//!
//! ```text
//! sources (manifests | kube) ─▶ Index ─▶ pipeline (debounce ▸ compile ▸ revision)
//!                                              └─▶ watch<Published> ─▶ gRPC Sync streams, inspection, status
//! ```

pub mod agents;
pub mod args;
pub mod certs;
pub mod crd;
pub mod embedded;
pub mod exposure;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod index;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod problem_log;
pub mod reports;
pub mod revision;
pub mod sources;
pub mod status;
