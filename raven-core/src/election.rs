//! Active endpoint election, with the semantics of OpenYurt's GatewayPickup
//! controller:
//!
//! * only endpoints on member nodes whose `Ready` condition is `True` count;
//! * tunnel and proxy endpoints are elected separately, each only when its
//!   `raven-cfg` switch is on, up to `tunnelConfig.Replicas` /
//!   `proxyConfig.Replicas`;
//! * current active endpoints that are still valid are kept (sticky) — in the
//!   order of `status.activeEndpoints`, where Raven iterates a Go map in random
//!   order;
//! * the remaining slots are filled in `spec.endpoints` order;
//! * the result is sorted by node name, as Raven writes it to the status.

use std::collections::BTreeSet;

use crate::api::v1beta1::{self, Endpoint, GatewaySpec};
use crate::cluster::RavenConfig;

/// Elects the active endpoints of one gateway.
///
/// `previous` is the gateway's current `status.activeEndpoints`, `ready` the
/// names of its member nodes that are Ready.
pub fn elect(
    spec: &GatewaySpec,
    previous: &[Endpoint],
    ready: &BTreeSet<&str>,
    config: &RavenConfig,
) -> Vec<Endpoint> {
    let mut eps = Vec::new();
    if config.enable_l7_proxy {
        eps.extend(elect_type(spec, previous, v1beta1::PROXY, ready));
    }
    if config.enable_l3_tunnel {
        eps.extend(elect_type(spec, previous, v1beta1::TUNNEL, ready));
    }
    eps.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    eps
}

/// [`elect`] with the hub's failure detector (see [`crate::liveness`]):
/// for each endpoint type whose election would land on a `dead` node, the
/// dead nodes are left out and a freed slot goes only to a Ready node whose
/// agent is `connected` — a node nobody can show alive does not replace one
/// shown dead. When no such node exists, [`elect`]'s result stands (the
/// domain keeps the endpoint it has rather than none). Without dead nodes
/// this is [`elect`].
pub fn elect_live(
    spec: &GatewaySpec,
    previous: &[Endpoint],
    ready: &BTreeSet<&str>,
    connected: &BTreeSet<&str>,
    dead: &BTreeSet<&str>,
    config: &RavenConfig,
) -> Vec<Endpoint> {
    let keep: BTreeSet<&str> = ready.difference(dead).copied().collect();
    let fill: BTreeSet<&str> = keep.intersection(connected).copied().collect();
    let one = |ty: &str| {
        let plain = elect_type(spec, previous, ty, ready);
        if !plain.iter().any(|e| dead.contains(e.node_name.as_str())) {
            return plain;
        }
        let live = elect_type_in(spec, previous, ty, &keep, &fill);
        if live.is_empty() { plain } else { live }
    };
    let mut eps = Vec::new();
    if config.enable_l7_proxy {
        eps.extend(one(v1beta1::PROXY));
    }
    if config.enable_l3_tunnel {
        eps.extend(one(v1beta1::TUNNEL));
    }
    eps.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    eps
}

/// Elects the endpoints of one type (`electEndpoints` in Raven).
pub fn elect_type(
    spec: &GatewaySpec,
    previous: &[Endpoint],
    endpoint_type: &str,
    ready: &BTreeSet<&str>,
) -> Vec<Endpoint> {
    elect_type_in(spec, previous, endpoint_type, ready, ready)
}

/// [`elect_type`] where current endpoints stay while on a node in `keep`,
/// and free slots are filled from nodes in `fill` only.
fn elect_type_in(
    spec: &GatewaySpec,
    previous: &[Endpoint],
    endpoint_type: &str,
    keep: &BTreeSet<&str>,
    fill: &BTreeSet<&str>,
) -> Vec<Endpoint> {
    let replicas = match endpoint_type {
        v1beta1::PROXY => spec.proxy_config.replicas,
        v1beta1::TUNNEL => spec.tunnel_config.replicas,
        _ => 1,
    };
    let replicas = usize::try_from(replicas).unwrap_or(0);
    let is_candidate = |ep: &Endpoint, among: &BTreeSet<&str>| {
        ep.type_ == endpoint_type && among.contains(ep.node_name.as_str())
    };

    // Sticky: a current active endpoint stays when its node is still ready and
    // the spec still lists it with the same type. The spec's copy is used, so
    // an edited port or public IP takes effect.
    let mut elected: Vec<Endpoint> = Vec::new();
    for active in previous.iter().filter(|ep| is_candidate(ep, keep)) {
        let in_spec = spec
            .endpoints
            .iter()
            .find(|ep| ep.node_name == active.node_name && ep.type_ == active.type_);
        if let Some(ep) = in_spec
            && !elected.iter().any(|e| e.node_name == ep.node_name)
        {
            elected.push(ep.clone());
        }
    }
    elected.truncate(replicas);

    for ep in &spec.endpoints {
        if elected.len() >= replicas {
            break;
        }
        if is_candidate(ep, fill) && !elected.iter().any(|e| e.node_name == ep.node_name) {
            elected.push(ep.clone());
        }
    }
    elected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1beta1::{ProxyConfiguration, TunnelConfiguration};

    fn ep(node: &str, ty: &str) -> Endpoint {
        Endpoint {
            node_name: node.into(),
            type_: ty.into(),
            port: if ty == "proxy" { 10262 } else { 4500 },
            ..Default::default()
        }
    }

    fn spec(tunnel: i32, proxy: i32, endpoints: Vec<Endpoint>) -> GatewaySpec {
        GatewaySpec {
            tunnel_config: TunnelConfiguration { replicas: tunnel },
            proxy_config: ProxyConfiguration {
                replicas: proxy,
                ..Default::default()
            },
            endpoints,
            ..Default::default()
        }
    }

    const BOTH: RavenConfig = RavenConfig {
        present: true,
        enable_l3_tunnel: true,
        enable_l7_proxy: true,
        vpn_driver: raven_model::topology::VpnDriver::Wireguard,
        vpn_driver_invalid: false,
    };

    fn names(eps: &[Endpoint]) -> Vec<(String, String)> {
        eps.iter()
            .map(|e| (e.node_name.clone(), e.type_.clone()))
            .collect()
    }

    fn set<'a>(xs: &[&'a str]) -> BTreeSet<&'a str> {
        xs.iter().copied().collect()
    }

    #[test]
    fn first_ready_endpoint_in_spec_order_is_elected() {
        let s = spec(1, 0, vec![ep("n2", "tunnel"), ep("n1", "tunnel")]);
        let got = elect(&s, &[], &set(&["n1", "n2"]), &BOTH);
        assert_eq!(names(&got), vec![("n2".into(), "tunnel".into())]);
    }

    #[test]
    fn not_ready_nodes_are_skipped() {
        let s = spec(1, 0, vec![ep("n2", "tunnel"), ep("n1", "tunnel")]);
        let got = elect(&s, &[], &set(&["n1"]), &BOTH);
        assert_eq!(names(&got), vec![("n1".into(), "tunnel".into())]);
    }

    #[test]
    fn no_ready_node_elects_nothing() {
        let s = spec(1, 1, vec![ep("n1", "tunnel"), ep("n1", "proxy")]);
        assert!(elect(&s, &[], &set(&[]), &BOTH).is_empty());
    }

    #[test]
    fn current_active_endpoint_is_sticky_while_ready() {
        let s = spec(1, 0, vec![ep("n1", "tunnel"), ep("n2", "tunnel")]);
        let got = elect(&s, &[ep("n2", "tunnel")], &set(&["n1", "n2"]), &BOTH);
        assert_eq!(names(&got), vec![("n2".into(), "tunnel".into())]);
    }

    #[test]
    fn active_endpoint_on_unready_node_is_replaced_in_spec_order() {
        let s = spec(
            1,
            0,
            vec![ep("n1", "tunnel"), ep("n2", "tunnel"), ep("n3", "tunnel")],
        );
        let got = elect(&s, &[ep("n1", "tunnel")], &set(&["n2", "n3"]), &BOTH);
        assert_eq!(names(&got), vec![("n2".into(), "tunnel".into())]);
    }

    #[test]
    fn active_endpoint_removed_from_spec_is_not_kept() {
        let s = spec(1, 0, vec![ep("n2", "tunnel")]);
        let got = elect(&s, &[ep("n1", "tunnel")], &set(&["n1", "n2"]), &BOTH);
        assert_eq!(names(&got), vec![("n2".into(), "tunnel".into())]);
    }

    #[test]
    fn sticky_endpoint_takes_the_spec_copy() {
        let mut edited = ep("n1", "tunnel");
        edited.public_ip = "1.2.3.4".into();
        let s = spec(1, 0, vec![edited.clone()]);
        let got = elect(&s, &[ep("n1", "tunnel")], &set(&["n1"]), &BOTH);
        assert_eq!(got, vec![edited]);
    }

    #[test]
    fn tunnel_and_proxy_are_elected_separately_and_sorted_by_node() {
        let s = spec(
            1,
            2,
            vec![
                ep("n3", "proxy"),
                ep("n2", "tunnel"),
                ep("n1", "proxy"),
                ep("n0", "tunnel"),
            ],
        );
        let got = elect(&s, &[], &set(&["n0", "n1", "n2", "n3"]), &BOTH);
        assert_eq!(
            names(&got),
            vec![
                ("n1".into(), "proxy".into()),
                ("n2".into(), "tunnel".into()),
                ("n3".into(), "proxy".into())
            ]
        );
    }

    #[test]
    fn replicas_larger_than_endpoints_elects_all_ready() {
        let s = spec(1, 5, vec![ep("n1", "proxy"), ep("n2", "proxy")]);
        let got = elect(&s, &[], &set(&["n1", "n2"]), &BOTH);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn zero_replicas_elects_nothing_of_that_type() {
        let s = spec(0, 1, vec![ep("n1", "tunnel"), ep("n1", "proxy")]);
        let got = elect(&s, &[], &set(&["n1"]), &BOTH);
        assert_eq!(names(&got), vec![("n1".into(), "proxy".into())]);
    }

    #[test]
    fn sticky_endpoints_beyond_replicas_are_dropped() {
        let s = spec(0, 1, vec![ep("n1", "proxy"), ep("n2", "proxy")]);
        let got = elect(
            &s,
            &[ep("n2", "proxy"), ep("n1", "proxy")],
            &set(&["n1", "n2"]),
            &BOTH,
        );
        assert_eq!(names(&got), vec![("n2".into(), "proxy".into())]);
    }

    #[test]
    fn previous_endpoint_of_other_type_does_not_count() {
        let s = spec(1, 0, vec![ep("n1", "tunnel"), ep("n2", "tunnel")]);
        let got = elect(&s, &[ep("n2", "proxy")], &set(&["n1", "n2"]), &BOTH);
        assert_eq!(names(&got), vec![("n1".into(), "tunnel".into())]);
    }

    #[test]
    fn raven_cfg_switches_gate_each_type() {
        let s = spec(1, 1, vec![ep("n1", "tunnel"), ep("n1", "proxy")]);
        let ready = set(&["n1"]);
        let tunnel_only = RavenConfig {
            enable_l7_proxy: false,
            ..BOTH
        };
        let proxy_only = RavenConfig {
            enable_l3_tunnel: false,
            ..BOTH
        };
        assert_eq!(
            names(&elect(&s, &[], &ready, &tunnel_only)),
            vec![("n1".into(), "tunnel".into())]
        );
        assert_eq!(
            names(&elect(&s, &[], &ready, &proxy_only)),
            vec![("n1".into(), "proxy".into())]
        );
        assert!(elect(&s, &[], &ready, &RavenConfig::default()).is_empty());
    }

    #[test]
    fn a_dead_active_endpoint_is_replaced_by_the_first_ready_connected_candidate() {
        let s = spec(
            1,
            0,
            vec![ep("n1", "tunnel"), ep("n2", "tunnel"), ep("n3", "tunnel")],
        );
        let ready = set(&["n1", "n2", "n3"]);
        // n2 is Ready but its agent is not connected: it is skipped.
        let got = elect_live(
            &s,
            &[ep("n1", "tunnel")],
            &ready,
            &set(&["n3"]),
            &set(&["n1"]),
            &BOTH,
        );
        assert_eq!(names(&got), vec![("n3".into(), "tunnel".into())]);
    }

    #[test]
    fn with_no_ready_connected_candidate_the_dead_endpoint_stays() {
        let s = spec(1, 0, vec![ep("n1", "tunnel"), ep("n2", "tunnel")]);
        let got = elect_live(
            &s,
            &[ep("n1", "tunnel")],
            &set(&["n1", "n2"]),
            &set(&[]),
            &set(&["n1"]),
            &BOTH,
        );
        assert_eq!(names(&got), vec![("n1".into(), "tunnel".into())]);
    }

    #[test]
    fn node_ready_still_rules_a_not_ready_connected_node_is_no_replacement() {
        let s = spec(1, 0, vec![ep("n1", "tunnel"), ep("n2", "tunnel")]);
        let got = elect_live(
            &s,
            &[ep("n1", "tunnel")],
            &set(&["n1"]),
            &set(&["n2"]),
            &set(&["n1"]),
            &BOTH,
        );
        assert_eq!(names(&got), vec![("n1".into(), "tunnel".into())]);
        // And NodeReady=False replaces as before, dead or not.
        let got = elect_live(
            &s,
            &[ep("n1", "tunnel")],
            &set(&["n2"]),
            &set(&[]),
            &set(&[]),
            &BOTH,
        );
        assert_eq!(names(&got), vec![("n2".into(), "tunnel".into())]);
    }

    #[test]
    fn once_moved_the_replacement_is_sticky_when_the_dead_node_returns() {
        let s = spec(1, 0, vec![ep("n1", "tunnel"), ep("n2", "tunnel")]);
        let ready = set(&["n1", "n2"]);
        let moved = elect_live(
            &s,
            &[ep("n1", "tunnel")],
            &ready,
            &set(&["n2"]),
            &set(&["n1"]),
            &BOTH,
        );
        assert_eq!(names(&moved), vec![("n2".into(), "tunnel".into())]);
        let back = elect_live(&s, &moved, &ready, &set(&["n1", "n2"]), &set(&[]), &BOTH);
        assert_eq!(back, moved);
    }

    #[test]
    fn a_dead_node_loses_its_proxy_too_and_other_types_are_untouched() {
        let s = spec(
            1,
            1,
            vec![
                ep("n1", "tunnel"),
                ep("n1", "proxy"),
                ep("n2", "tunnel"),
                ep("n3", "proxy"),
            ],
        );
        let ready = set(&["n1", "n2", "n3"]);
        let previous = [ep("n1", "tunnel"), ep("n1", "proxy")];
        let got = elect_live(
            &s,
            &previous,
            &ready,
            &set(&["n2", "n3"]),
            &set(&["n1"]),
            &BOTH,
        );
        assert_eq!(
            names(&got),
            vec![
                ("n2".into(), "tunnel".into()),
                ("n3".into(), "proxy".into())
            ]
        );
        // Nobody dead: exactly `elect`.
        let none = elect_live(&s, &previous, &ready, &set(&[]), &set(&[]), &BOTH);
        assert_eq!(none, elect(&s, &previous, &ready, &BOTH));
    }

    #[test]
    fn duplicate_spec_endpoints_are_elected_once() {
        let s = spec(0, 2, vec![ep("n1", "proxy"), ep("n1", "proxy")]);
        let got = elect(&s, &[], &set(&["n1"]), &BOTH);
        assert_eq!(got.len(), 1);
    }
}
