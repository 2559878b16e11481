//! Which gateways this node's tunnel talks to, and how: the peer selection
//! the WireGuard tunnel ([`crate::tunnel::spec`]) and the IPsec connections
//! ([`crate::ipsec::spec`]) share. Pure.
//!
//! Only the active tunnel node of a gateway has peers. A gateway not under
//! NAT is reached at its public address; a NATed gateway dials the public
//! ones and reaches the other NATed gateways through its relay (the public
//! gateway the hub chose, `GatewayView.relay`), whose peer carries their
//! prefixes as well. A gateway with no active node is not reached at all.

use raven_model::NodeName;
use raven_model::topology::{GatewayEndpoint, GatewayView, NodeView};

use crate::dataplane::model::{NodeInputs, active_node};

/// This node as a tunnel candidate of its gateway, and the other gateways
/// as its tunnel sees them.
#[derive(Debug, Clone)]
pub struct Reach<'a> {
    pub me: &'a NodeView,
    pub gateway: &'a GatewayView,
    /// This node's own tunnel endpoint.
    pub endpoint: &'a GatewayEndpoint,
    /// This node is the one its gateway's tunnel runs on (with local
    /// failover applied): only then does it have peers.
    pub active: bool,
    /// Every other gateway that has an active node, with that node, in the
    /// topology's order.
    pub others: Vec<(&'a GatewayView, &'a NodeName)>,
    /// The relay gateway of this (NATed) gateway and its active node.
    pub relay: Option<(&'a GatewayView, &'a NodeName)>,
}

impl<'a> Reach<'a> {
    /// `None` unless this node is a tunnel candidate of its gateway.
    pub fn of(inputs: &'a NodeInputs) -> Option<Self> {
        let me = inputs.me.as_ref()?;
        let gateway = inputs
            .gateways
            .iter()
            .find(|g| Some(&g.name) == me.gateway.as_ref())?;
        let endpoint = gateway
            .tunnel_candidates
            .iter()
            .find(|c| c.node == me.name)?;
        let active = active_node(gateway, &inputs.active_override) == Some(&me.name);
        let others = inputs
            .gateways
            .iter()
            .filter(|g| g.name != gateway.name)
            .filter_map(|g| active_node(g, &inputs.active_override).map(|n| (g, n)))
            .collect();
        let relay = gateway
            .relay
            .as_ref()
            .and_then(|r| inputs.gateways.iter().find(|g| &g.name == r))
            .and_then(|g| active_node(g, &inputs.active_override).map(|n| (g, n)));
        Some(Self {
            me,
            gateway,
            endpoint,
            active,
            others,
            relay,
        })
    }

    /// `other` is reached through the relay rather than directly: both
    /// gateways are under NAT.
    pub fn through_relay(&self, other: &GatewayView) -> bool {
        self.gateway.under_nat && other.under_nat
    }

    /// The gateways reached through the relay, with their active nodes.
    pub fn relayed(&self) -> Vec<(&'a GatewayView, &'a NodeName)> {
        self.others
            .iter()
            .filter(|(g, _)| self.through_relay(g))
            .copied()
            .collect()
    }

    /// The warning when gateways must go through a relay that is not
    /// reachable.
    pub fn no_relay_warning(relayed: &[(&GatewayView, &NodeName)]) -> String {
        format!(
            "no relay gateway is reachable; NATed gateways {} are unreachable",
            relayed
                .iter()
                .map(|(g, _)| g.name.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
