//! What an agent tells the hub about itself, over its own mTLS-authenticated
//! Sync stream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::names::{GatewayName, NodeName};

/// Most names one report may list in `dead_candidates` (a gateway has a
/// handful of tunnel candidates; the bound keeps a report small).
pub const MAX_DEAD_CANDIDATES: usize = 16;

/// What an agent has told the hub about itself (through its own, mTLS
/// authenticated stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The node's WireGuard public key, base64 as `wg` prints it.
    pub wireguard_public_key: Option<String>,
    /// The UDP port the node's tunnel listens on.
    pub tunnel_port: Option<u16>,
    /// The address the hub (or a public gateway) saw the node's tunnel
    /// traffic come from: its NAT-mapped endpoint.
    pub observed_endpoint: Option<SocketAddr>,
    /// The node's own choice of active tunnel gateway while it could not reach
    /// the hub (local failover), per gateway.
    pub local_failover: BTreeMap<GatewayName, NodeName>,
    /// Where this node's tunnel currently hears each peer from (peers with a
    /// fresh handshake, not through a relay). From a gateway that is not under
    /// NAT, these are the NATed peers' mapped endpoints, which the hub passes
    /// on so two NATed gateways can try a direct path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub observed_peers: BTreeMap<NodeName, SocketAddr>,
    /// The public key of the node's direct-path device, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_public_key: Option<String>,
    /// Where this node's tunnel hears each peer's direct-path device from
    /// (fresh handshakes): reported by relays, passed on as the peers'
    /// `DirectDevice.observed_endpoint`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub observed_direct_peers: BTreeMap<NodeName, SocketAddr>,
    /// The other tunnel candidates of this node's own gateway that its
    /// probes say are dead. Evidence only while the node's stream is up (see
    /// the hub's failure detector); the compiler ignores names that are not
    /// candidates of the reporter's own gateway.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dead_candidates: BTreeSet<NodeName>,
    /// The node's IPsec (IKEv2) raw Ed25519 public key, base64 of its 32
    /// bytes; unset when it runs no IPsec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec_public_key: Option<String>,
}
