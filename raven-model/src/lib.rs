//! What travels between raven's hub and its agents, free of Kubernetes and
//! of I/O: node and gateway names, problems, the versioned [`Topology`] of
//! named resources, the per-node view of it, and what an agent reports about
//! itself. The node agent depends on this crate alone; the compiler over the
//! Raven `Gateway` API (`raven-core`) produces these values on the hub.

#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;
pub mod names;
pub mod problem;
pub mod report;
pub mod topology;
pub mod view;

pub use names::{GatewayName, NodeName};
pub use problem::{Problem, Severity};
pub use report::AgentReport;
pub use topology::{ContentVersion, Resource, ResourceBody, ResourceName, Topology};
