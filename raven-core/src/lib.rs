//! raven's domain model, free of I/O: the Raven-compatible `Gateway` API,
//! its defaulting and validation, gateway election, and the compiler that
//! turns a cluster into a versioned [`Topology`] of named resources.
//!
//! ```text
//! manifests / API objects ─▶ Inputs ─▶ compile() ─▶ Topology ─▶ view_names(node)
//!                            (admit ▸ elect ▸ subnets ▸ relays)      per-node view
//! ```

pub mod api;
pub mod cluster;
pub mod compile;
pub mod election;
pub mod liveness;
pub mod manifest;
pub mod names;
pub mod problem;
pub mod topology;
pub mod validate;
pub mod view;
pub mod yaml;

pub use cluster::{AgentReport, ClusterNode, Inputs, RavenConfig, Streams};
pub use compile::{Compiled, compile};
pub use names::{GatewayName, NodeName};
pub use problem::{Problem, Severity};
pub use topology::{ContentVersion, Resource, ResourceBody, ResourceName, Topology};
