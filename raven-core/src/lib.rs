//! The hub's side of raven's model, free of I/O: the Raven-compatible `Gateway` API,
//! its defaulting and validation, gateway election, and the compiler that
//! turns a cluster into a versioned [`Topology`] of named resources.
//!
//! ```text
//! manifests / API objects ─▶ admit() ─▶ Inputs ─▶ compile() ─▶ Topology ─▶ view_names(node)
//!                            (once, on the way in)  (elect ▸ subnets ▸ relays)  per-node view
//! ```

pub mod api;
pub mod cluster;
pub mod compile;
pub mod election;
pub mod liveness;
pub mod manifest;
pub mod validate;
pub mod yaml;

// The wire model lives in `raven-model` (the edge depends on it alone);
// re-exported so hub-side code keeps one path.
pub use raven_model::{names, problem, topology, view};

pub use cluster::{
    AgentReport, ClusterNode, Inputs, LoadBalancerIngress, RavenConfig, Shared, Streams,
};
pub use compile::{Compiled, compile};
pub use raven_model::{
    ContentVersion, GatewayName, NodeName, Problem, Resource, ResourceBody, ResourceName, Severity,
    Topology,
};
