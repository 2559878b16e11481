//! Per-node views: which resources of a topology one node receives.
//!
//! Every node gets the settings and its own `node/` resource. A member of a
//! gateway domain also gets every `gateway/` resource (it routes remote
//! subnets through its gateway). A node in no gateway gets the `gateway/`
//! resources that carry a cloud proxy server (an exposed gateway with an
//! active proxy endpoint): it routes nothing, but its layer-7 proxy opens
//! its own reverse tunnel to those servers. A tunnel endpoint node also gets
//! every `peer/` resource (it may become the active gateway by local
//! failover).
//! Shared resources are the same `Resource` values for every node, so the hub
//! can serialize them once.

use std::collections::BTreeMap;

use crate::names::NodeName;
use crate::topology::{ExposeType, Resource, ResourceBody, ResourceName, Topology};

/// A gateway resource a node in no gateway receives: one that carries a
/// cloud proxy server. Decided from the resource alone, so a change of it
/// routes by its name like any other.
fn serves_proxy(r: &Resource) -> bool {
    matches!(&r.body, ResourceBody::Gateway(g)
        if g.expose_type != ExposeType::None && !g.active_proxies.is_empty())
}

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
    } else {
        names.extend(
            kind("gateway/").filter(|n| topology.resources.get(n).is_some_and(serves_proxy)),
        );
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
    let Some(r) = topology.resources.get(name) else {
        return false;
    };
    let s = name.as_str();
    if s == ResourceName::SETTINGS {
        true
    } else if s.starts_with("gateway/") {
        me.gateway.is_some() || serves_proxy(r)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::GatewayName;
    use crate::topology::{EndpointType, GatewayEndpoint, GatewayView, NodeView};

    fn gw(name: &str, exposed: bool, proxy: bool) -> Resource {
        Resource::new(ResourceBody::Gateway(GatewayView {
            name: GatewayName::new(name).unwrap_or_else(|_| unreachable!()),
            expose_type: if exposed {
                ExposeType::PublicIP
            } else {
                ExposeType::None
            },
            under_nat: !exposed,
            members: vec![],
            active_tunnel: None,
            tunnel_candidates: vec![],
            active_proxies: if proxy {
                vec![GatewayEndpoint {
                    node: NodeName::new("c1").unwrap_or_else(|_| unreachable!()),
                    type_: EndpointType::Proxy,
                    port: 10262,
                    under_nat: false,
                    nat_type: String::new(),
                    public_ip: None,
                    public_port: None,
                    config: BTreeMap::new(),
                }]
            } else {
                vec![]
            },
            proxy_ports: vec![],
            extra_source_cidrs: vec![],
            relay: None,
        }))
    }

    #[test]
    fn a_node_in_no_gateway_receives_only_the_gateways_that_carry_a_proxy_server() {
        let lonely = NodeName::new("lonely").unwrap_or_else(|_| unreachable!());
        let mut t = Topology::default();
        for (name, exposed, proxy) in [
            ("cloud", true, true),
            ("cloud-no-proxy", true, false),
            ("edge", false, true),
        ] {
            t.resources.insert(
                ResourceName::gateway(&GatewayName::new(name).unwrap_or_else(|_| unreachable!())),
                gw(name, exposed, proxy),
            );
        }
        t.resources.insert(
            ResourceName::node(&lonely),
            Resource::new(ResourceBody::Node(NodeView {
                name: lonely.clone(),
                gateway: None,
                private_ip: None,
                subnets: vec![],
                tunnel_active: false,
                tunnel_candidate: false,
                proxy_active: false,
            })),
        );
        let names = view_names(&t, &lonely);
        assert_eq!(
            names.iter().map(ResourceName::as_str).collect::<Vec<_>>(),
            vec!["gateway/cloud", "node/lonely"]
        );
        for name in t.resources.keys() {
            assert_eq!(in_view(&t, &lonely, name), names.contains(name), "{name}");
        }
    }
}
