//! Source changes → (debounced) compile → a new [`Published`] state.
//!
//! A recompile whose resources are unchanged publishes no new revision.
//! Shared resources are encoded once per content version and the same bytes
//! are handed to every stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use raven_core::compile::CompiledGateway;
use raven_core::{GatewayName, Topology};

/// What the hub serves at one moment.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Identity of the revision sequence; revisions are compared only within
    /// one epoch.
    pub epoch: String,
    /// Grows by one whenever a resource changes.
    pub revision: u64,
    /// Every source has synced; before that nothing is served.
    pub ready: bool,
    pub topology: Topology,
    /// Per-gateway election results, for status writing.
    pub gateways: BTreeMap<GatewayName, CompiledGateway>,
}

/// Receiver of the published state.
pub type PublishedRx = tokio::sync::watch::Receiver<Arc<Published>>;
