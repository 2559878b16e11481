//! Per-node views: which resources of a topology one node receives.
//!
//! Every node gets the settings and its own `node/` resource. A member of a
//! gateway domain also gets every `gateway/` resource (it routes remote
//! subnets through its gateway). A tunnel endpoint node also gets every
//! `peer/` resource (it may become the active gateway by local failover).
//! Shared resources are the same `Resource` values for every node, so the hub
//! can serialize them once.

use std::collections::BTreeMap;

use crate::names::NodeName;
use crate::topology::{Resource, ResourceName, Topology};

/// Names of the resources `node` receives. Empty when the topology does not
/// know the node.
pub fn view_names(topology: &Topology, node: &NodeName) -> Vec<ResourceName> {
    let Some(me) = topology.node(node) else {
        return Vec::new();
    };
    // Names sort by kind prefix, so each kind is one contiguous key range:
    // the view costs O(its size), not O(all resources).
    let kind = |prefix: &'static str| {
        let lo = ResourceName::range_start(prefix);
        topology
            .resources
            .range(lo..)
            .map(|(n, _)| n)
            .take_while(move |n| n.as_str().starts_with(prefix))
            .cloned()
    };
    let mut names: Vec<ResourceName> = Vec::new();
    if me.gateway.is_some() {
        names.extend(kind("gateway/"));
    }
    names.push(ResourceName::node(node));
    if me.tunnel_candidate {
        names.extend(kind("peer/"));
    }
    if topology.resources.contains_key(&ResourceName::settings()) {
        names.push(ResourceName::settings());
    }
    names
}

/// Whether `name` is in `node`'s view of `topology`: the rule of
/// [`view_names`] for one name, so a change touching a few names is routed
/// to a node without listing its whole view. False when the topology does
/// not know the node.
pub fn in_view(topology: &Topology, node: &NodeName, name: &ResourceName) -> bool {
    let Some(me) = topology.node(node) else {
        return false;
    };
    if !topology.resources.contains_key(name) {
        return false;
    }
    let s = name.as_str();
    if s == ResourceName::SETTINGS {
        true
    } else if s.starts_with("gateway/") {
        me.gateway.is_some()
    } else if s.starts_with("peer/") {
        me.tunnel_candidate
    } else {
        *name == ResourceName::node(node)
    }
}

/// The resources `node` receives.
pub fn node_view<'a>(
    topology: &'a Topology,
    node: &NodeName,
) -> BTreeMap<ResourceName, &'a Resource> {
    view_names(topology, node)
        .into_iter()
        .filter_map(|n| topology.resources.get(&n).map(|r| (n, r)))
        .collect()
}

/// Below this many held resources a removal is never a mass removal.
pub const MASS_REMOVAL_MIN_HELD: usize = 4;

/// A removal of more than half of at least [`MASS_REMOVAL_MIN_HELD`] held
/// resources: an agent refuses it unless the hub marks it intentional, and
/// the hub marks it so only when an operator confirmed it. One rule for both.
pub fn is_mass_removal(removing: usize, held: usize) -> bool {
    held >= MASS_REMOVAL_MIN_HELD && removing * 2 > held
}
