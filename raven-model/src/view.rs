//! Per-node views: which resources of a topology one node receives.
//!
//! Every node gets the settings and its own `node/` resource. What else
//! depends on its [`ViewClass`]:
//!
//! * **Full** — a tunnel candidate or an active proxy endpoint of its
//!   gateway (or any node of a domain whose agent does not take the compact
//!   view): every `gateway/` resource, and every `peer/` resource when it is
//!   a tunnel candidate (it may become the active gateway by local
//!   failover, without the hub, so it must hold every other gateway's
//!   endpoints and keys beforehand).
//! * **Member** — any other node of a gateway domain whose agent takes the
//!   compact view (`CAPABILITY_COMPACT_MEMBER_VIEW`): its own gateway's
//!   `gateway/` resource (the active endpoint it routes through over VXLAN,
//!   its domain's members, the candidates it probes) and, for every other
//!   domain, only `prefixes/<gateway>` ([`DomainPrefixes`]) — the prefixes
//!   it routes through its gateway. It can never carry the tunnel, so it
//!   never needs other gateways' endpoints or keys.
//! * **Outside** — a node in no gateway: the `gateway/` resources that
//!   carry a cloud proxy server (an exposed gateway with an active proxy
//!   endpoint): it routes nothing, but its layer-7 proxy opens its own
//!   reverse tunnel to those servers.
//!
//! Shared resources are the same `Resource` values for every node, so the hub
//! can serialize them once: a one-node change of one domain changes its
//! `gateway/` and `prefixes/` resources, each encoded once for every
//! receiver.
//!
//! [`DomainPrefixes`]: crate::topology::DomainPrefixes

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::names::NodeName;
use crate::topology::{ExposeType, NodeView, Resource, ResourceBody, ResourceName, Topology};

/// Which resources a node receives (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViewClass {
    /// Every `gateway/` resource, and every `peer/` one for a tunnel
    /// candidate.
    Full,
    /// Its own `gateway/` resource and every other domain's `prefixes/`.
    Member,
    /// In no gateway: the `gateway/` resources carrying a proxy server.
    Outside,
}

/// The class of node `me`; `compact`: its agent takes the compact member
/// view (an agent that does not gets the full view, whatever its role). A
/// node that becomes a tunnel candidate or an active proxy endpoint (its
/// `node/` resource changes) is Full from that revision on.
pub fn view_class(me: &NodeView, compact: bool) -> ViewClass {
    match &me.gateway {
        None => ViewClass::Outside,
        Some(_) if compact && !me.tunnel_candidate && !me.proxy_active => ViewClass::Member,
        Some(_) => ViewClass::Full,
    }
}

/// A gateway resource a node in no gateway receives: one that carries a
/// cloud proxy server. Decided from the resource alone, so a change of it
/// routes by its name like any other.
pub fn serves_proxy(r: &Resource) -> bool {
    matches!(&r.body, ResourceBody::Gateway(g)
        if g.expose_type != ExposeType::None && !g.active_proxies.is_empty())
}

/// Names of the resources `node` receives (`compact`: see [`view_class`]).
/// Empty when the topology does not know the node.
pub fn view_names(topology: &Topology, node: &NodeName, compact: bool) -> Vec<ResourceName> {
    let mut names: Vec<ResourceName> = view_resources(topology, node, compact)
        .into_iter()
        .map(|(n, _)| n.clone())
        .collect();
    // The node's own name even before its resource exists.
    let own = ResourceName::node(node);
    if topology.node(node).is_some() && !names.contains(&own) {
        let at = names
            .iter()
            .position(|n| n.as_str().starts_with("peer/") || n.as_str() == ResourceName::SETTINGS)
            .unwrap_or(names.len());
        names.insert(at, own);
    }
    names
}

/// The resources `node` receives, borrowed from `topology`, in the order
/// of [`view_names`] (each kind sorted by name): what a session compares
/// against an agent's inventory without copying a name or looking one up.
pub fn view_resources<'t>(
    topology: &'t Topology,
    node: &NodeName,
    compact: bool,
) -> Vec<(&'t ResourceName, &'t Resource)> {
    let Some(me) = topology.node(node) else {
        return Vec::new();
    };
    // Names sort by kind prefix, so each kind is one contiguous key range:
    // the view costs O(its size), not O(all resources).
    let kind = |prefix: &'static str| {
        topology
            .resources
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(n, _)| n.as_str().starts_with(prefix))
    };
    let get = |name: ResourceName| topology.resources.get_key_value(&name);
    let mut out = Vec::new();
    match view_class(me, compact) {
        ViewClass::Full => out.extend(kind("gateway/")),
        ViewClass::Member => {
            out.extend(
                me.gateway
                    .as_ref()
                    .and_then(|g| get(ResourceName::gateway(g))),
            );
            let own = me.gateway.as_ref().map(ResourceName::prefixes);
            out.extend(kind("prefixes/").filter(|(n, _)| Some(*n) != own.as_ref()));
        }
        ViewClass::Outside => out.extend(kind("gateway/").filter(|(_, r)| serves_proxy(r))),
    }
    out.extend(get(ResourceName::node(node)));
    if me.tunnel_candidate {
        out.extend(kind("peer/"));
    }
    out.extend(get(ResourceName::settings()));
    out
}

/// Whether `name` is in `node`'s view of `topology`: the rule of
/// [`view_names`] for one name, so a change touching a few names is routed
/// to a node without listing its whole view. False when the topology does
/// not know the node.
pub fn in_view(topology: &Topology, node: &NodeName, name: &ResourceName, compact: bool) -> bool {
    topology
        .node(node)
        .is_some_and(|me| in_view_of(topology, node, me, name, compact))
}

/// [`in_view`] for a node whose `NodeView` the caller has already looked up
/// (`me`, the body of `node/<node>` in `topology`): what a session routing
/// a change of several names to its node uses, one lookup of the node per
/// change instead of one per name, and no allocation.
pub fn in_view_of(
    topology: &Topology,
    node: &NodeName,
    me: &NodeView,
    name: &ResourceName,
    compact: bool,
) -> bool {
    let Some(r) = topology.resources.get(name) else {
        return false;
    };
    let s = name.as_str();
    let class = view_class(me, compact);
    // Only asked of `gateway/` and `prefixes/` names: the domain is what
    // follows the kind (`ResourceName::domain` without building the name).
    let own = |n: &ResourceName| {
        let domain = n.as_str().split_once('/').map(|(_, g)| g);
        domain.is_some() && domain == me.gateway.as_ref().map(|g| g.as_str())
    };
    if s == ResourceName::SETTINGS {
        true
    } else if s.starts_with("gateway/") {
        match class {
            ViewClass::Full => true,
            ViewClass::Member => own(name),
            ViewClass::Outside => serves_proxy(r),
        }
    } else if s.starts_with("prefixes/") {
        class == ViewClass::Member && !own(name)
    } else if s.starts_with("peer/") {
        me.tunnel_candidate
    } else {
        // `node/<node>` itself, compared without building the name.
        s.strip_prefix("node/") == Some(node.as_str())
    }
}

/// The resources `node` receives (`compact`: see [`view_class`]).
pub fn node_view<'a>(
    topology: &'a Topology,
    node: &NodeName,
    compact: bool,
) -> BTreeMap<ResourceName, &'a Resource> {
    view_names(topology, node, compact)
        .into_iter()
        .filter_map(|n| topology.resources.get(&n).map(|r| (n, r)))
        .collect()
}

/// How many of `removed` take a domain away from the node: a removed
/// `gateway/<g>` whose `prefixes/<g>` it keeps (`kept`), or the other way
/// round, only changes the form of that domain — a member that became a
/// tunnel candidate, an agent that started taking the compact view — and
/// is no loss. What the mass-removal guard ([`is_mass_removal`]) counts.
pub fn lost<'a>(
    removed: impl IntoIterator<Item = &'a ResourceName>,
    kept: impl Fn(&ResourceName) -> bool,
) -> usize {
    removed
        .into_iter()
        .filter(|n| n.counterpart().is_none_or(|c| !kept(&c)))
        .count()
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
        for compact in [false, true] {
            let names = view_names(&t, &lonely, compact);
            assert_eq!(
                names.iter().map(ResourceName::as_str).collect::<Vec<_>>(),
                vec!["gateway/cloud", "node/lonely"]
            );
            for name in t.resources.keys() {
                assert_eq!(
                    in_view(&t, &lonely, name, compact),
                    names.contains(name),
                    "{name}"
                );
            }
        }
    }

    fn named(t: &mut Topology, r: Resource) {
        let name = match &r.body {
            ResourceBody::Gateway(g) => ResourceName::gateway(&g.name),
            ResourceBody::Prefixes(p) => ResourceName::prefixes(&p.gateway),
            ResourceBody::Node(n) => ResourceName::node(&n.name),
            ResourceBody::Peer(p) => ResourceName::peer(&p.node),
            ResourceBody::Settings(_) => ResourceName::settings(),
        };
        t.resources.insert(name, r);
    }

    /// Three domains with one node each in `a`: `a1` a tunnel candidate,
    /// `a2` a member, `a3` an active proxy endpoint; a peer of `b`.
    fn three_domains() -> Topology {
        let mut t = Topology::default();
        for g in ["a", "b", "c"] {
            let view = gw(g, false, false);
            if let ResourceBody::Gateway(v) = &view.body {
                named(
                    &mut t,
                    Resource::new(ResourceBody::Prefixes(crate::topology::DomainPrefixes::of(
                        v,
                    ))),
                );
            }
            named(&mut t, view);
        }
        let node = |n: &str, candidate: bool, proxy: bool| {
            Resource::new(ResourceBody::Node(NodeView {
                tunnel_candidate: candidate,
                proxy_active: proxy,
                ..crate::fixtures::node_view(n, Some("a"))
            }))
        };
        named(&mut t, node("a1", true, false));
        named(&mut t, node("a2", false, false));
        named(&mut t, node("a3", false, true));
        named(
            &mut t,
            Resource::new(ResourceBody::Peer(crate::fixtures::peer("b1", "b"))),
        );
        named(
            &mut t,
            Resource::new(ResourceBody::Settings(crate::fixtures::settings())),
        );
        t
    }

    fn strs(names: &[ResourceName]) -> Vec<&str> {
        names.iter().map(ResourceName::as_str).collect()
    }

    #[test]
    fn a_compact_member_receives_its_own_gateway_and_the_prefixes_of_the_others() {
        let t = three_domains();
        let n = |s: &str| NodeName::new(s).unwrap_or_else(|_| unreachable!());
        assert_eq!(
            strs(&view_names(&t, &n("a2"), true)),
            vec![
                "gateway/a",
                "prefixes/b",
                "prefixes/c",
                "node/a2",
                "settings"
            ]
        );
        // Without the capability, or as a candidate or proxy: every gateway.
        let full = vec!["gateway/a", "gateway/b", "gateway/c", "node/a2", "settings"];
        assert_eq!(strs(&view_names(&t, &n("a2"), false)), full);
        assert_eq!(
            strs(&view_names(&t, &n("a1"), true)),
            vec![
                "gateway/a",
                "gateway/b",
                "gateway/c",
                "node/a1",
                "peer/b1",
                "settings"
            ]
        );
        assert_eq!(
            strs(&view_names(&t, &n("a3"), true)),
            vec!["gateway/a", "gateway/b", "gateway/c", "node/a3", "settings"]
        );
        for node in ["a1", "a2", "a3"] {
            for compact in [false, true] {
                let names = view_names(&t, &n(node), compact);
                for name in t.resources.keys() {
                    assert_eq!(
                        in_view(&t, &n(node), name, compact),
                        names.contains(name),
                        "{node} compact={compact}: {name}"
                    );
                }
            }
        }
    }

    #[test]
    fn trading_a_domain_for_its_other_form_is_no_loss() {
        let g = |s: &str| GatewayName::new(s).unwrap_or_else(|_| unreachable!());
        let removed = [
            ResourceName::prefixes(&g("b")),
            ResourceName::prefixes(&g("c")),
            ResourceName::gateway(&g("d")),
            ResourceName::peer(&NodeName::new("b1").unwrap_or_else(|_| unreachable!())),
        ];
        // b comes back as gateway/b; c and d are gone; a peer has no other
        // form.
        let kept = |n: &ResourceName| *n == ResourceName::gateway(&g("b"));
        assert_eq!(lost(&removed, kept), 3);
        assert_eq!(
            ResourceName::prefixes(&g("b")).counterpart(),
            Some(ResourceName::gateway(&g("b")))
        );
        assert_eq!(
            ResourceName::parse("prefixes/b"),
            Some(ResourceName::prefixes(&g("b")))
        );
    }
}
