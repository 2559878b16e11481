//! The hub's failure detector for elected endpoints (issue 10, defect 2).
//!
//! Raven elects only Ready nodes, but a powered-off gateway stays Ready for
//! the node controller's grace period under Kubernetes, and for ever with
//! manifests. The hub and the domain know sooner; this module turns what
//! they know into a verdict, purely:
//!
//! A node X, listed as a tunnel endpoint of gateway G and labelled into G,
//! is **proven dead** when both hold:
//!
//! 1. **its stream is gone** — X's agent has had no Sync stream to this hub
//!    for at least `--failover-grace` (default 3 s; HTTP/2 keepalive,
//!    `--keepalive`, finds a silent peer within two of its intervals). A
//!    short reconnect (agent restart, a blip on the way to the cloud) is
//!    shorter than the grace and never counts;
//! 2. **its domain says it is dead** — another member of G whose own stream
//!    is up reports X in `Report.dead_candidates` (its ICMP probes of X
//!    missed `--probe-failures` in a row). Names a reporter lists that are
//!    not tunnel endpoints of the reporter's own gateway are ignored, and a
//!    report counts only while its sender is connected.
//!
//! A proven-dead node is left out of the election and the freed slot goes
//! only to a node that is Ready **and** whose agent is connected
//! ([`crate::election::elect_live`]); with no such node the election stays
//! as it was. NodeReady=False still excludes a node as before, and once
//! moved, stickiness keeps the new choice when the old node comes back.
//!
//! Stream liveness is per hub replica. With `--kubernetes` only the replica
//! that writes the Gateway status applies this rule (the others follow the
//! status it writes); a node connected to another replica looks gone to it,
//! and only condition 2 protects that node.

use std::collections::BTreeSet;

use crate::api::v1beta1;
use crate::cluster::{ClusterNode, Inputs};
use crate::names::{GatewayName, NodeName};

pub use raven_model::report::MAX_DEAD_CANDIDATES;

/// The tunnel endpoint nodes of `gateway` that are proven dead (see the
/// module documentation). `members` are the nodes labelled into it.
pub fn proven_dead(
    gateway: &GatewayName,
    spec: &v1beta1::GatewaySpec,
    members: &[&ClusterNode],
    inputs: &Inputs,
) -> BTreeSet<NodeName> {
    let is_member = |n: &NodeName| members.iter().any(|m| &m.name == n);
    let label_ok = |n: &NodeName| {
        members
            .iter()
            .any(|m| &m.name == n && m.gateway_label.as_deref() == Some(gateway.as_str()))
    };
    let candidates: BTreeSet<NodeName> = spec
        .endpoints
        .iter()
        .filter(|ep| ep.type_ == v1beta1::TUNNEL)
        .filter_map(|ep| NodeName::new(ep.node_name.clone()).ok())
        .filter(|n| is_member(n))
        .collect();
    candidates
        .into_iter()
        .filter(|x| inputs.streams.gone.contains(x))
        .filter(|x| {
            members.iter().any(|m| {
                &m.name != x
                    && label_ok(&m.name)
                    && inputs.streams.connected.contains(&m.name)
                    && inputs
                        .reports
                        .get(&m.name)
                        .is_some_and(|r| r.dead_candidates.contains(x))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{AgentReport, Streams};

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap_or_else(|_| unreachable!())
    }

    fn node(name: &str, gw: &str) -> ClusterNode {
        ClusterNode {
            name: n(name),
            gateway_label: Some(gw.into()),
            ready: true,
            internal_ip: None,
            pod_cidrs: vec![],
        }
    }

    fn spec(tunnels: &[&str]) -> v1beta1::GatewaySpec {
        v1beta1::GatewaySpec {
            endpoints: tunnels
                .iter()
                .map(|t| v1beta1::Endpoint {
                    node_name: (*t).into(),
                    type_: v1beta1::TUNNEL.into(),
                    port: 4500,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn reporting(reporter: &str, dead: &[&str]) -> (NodeName, AgentReport) {
        (
            n(reporter),
            AgentReport {
                dead_candidates: dead.iter().map(|d| n(d)).collect(),
                ..Default::default()
            },
        )
    }

    fn inputs(connected: &[&str], gone: &[&str], reports: Vec<(NodeName, AgentReport)>) -> Inputs {
        Inputs {
            reports: reports.into_iter().collect(),
            streams: Streams {
                connected: connected.iter().map(|c| n(c)).collect(),
                gone: gone.iter().map(|g| n(g)).collect(),
            }
            .into(),
            ..Default::default()
        }
    }

    fn gw() -> GatewayName {
        GatewayName::new("gw-a").unwrap_or_else(|_| unreachable!())
    }

    fn verdict(members: &[ClusterNode], i: &Inputs) -> BTreeSet<NodeName> {
        let refs: Vec<&ClusterNode> = members.iter().collect();
        proven_dead(&gw(), &spec(&["a1", "a2"]), &refs, i)
    }

    fn domain() -> Vec<ClusterNode> {
        vec![node("a1", "gw-a"), node("a2", "gw-a"), node("a3", "gw-a")]
    }

    #[test]
    fn a_gone_stream_and_a_connected_members_dead_probe_prove_a_candidate_dead() {
        let i = inputs(&["a2", "a3"], &["a1"], vec![reporting("a3", &["a1"])]);
        assert_eq!(verdict(&domain(), &i), [n("a1")].into());
    }

    #[test]
    fn a_gone_stream_alone_is_no_proof_a_short_reconnect_or_a_cloud_blip_never_moves_the_gateway() {
        let i = inputs(&["a2", "a3"], &["a1"], vec![]);
        assert!(verdict(&domain(), &i).is_empty());
    }

    #[test]
    fn dead_probes_alone_are_no_proof_while_the_candidates_stream_is_up_or_within_the_grace() {
        // a1 connected (or disconnected for less than the grace: neither
        // connected nor gone).
        let r = || vec![reporting("a3", &["a1"])];
        assert!(verdict(&domain(), &inputs(&["a1", "a3"], &[], r())).is_empty());
        assert!(verdict(&domain(), &inputs(&["a3"], &[], r())).is_empty());
    }

    #[test]
    fn a_report_counts_only_while_its_sender_is_connected() {
        let i = inputs(&["a2"], &["a1", "a3"], vec![reporting("a3", &["a1"])]);
        assert!(verdict(&domain(), &i).is_empty());
    }

    #[test]
    fn reports_from_other_gateways_members_or_about_non_candidates_are_ignored() {
        let mut members = domain();
        members.push(node("b1", "gw-b"));
        // b1 is not labelled into gw-a: its word about a1 does not count.
        let i = inputs(&["a2", "b1"], &["a1"], vec![reporting("b1", &["a1"])]);
        assert!(verdict(&members, &i).is_empty());
        // a3 is a member but no tunnel endpoint: never proven dead.
        let i = inputs(&["a2"], &["a3"], vec![reporting("a2", &["a3"])]);
        assert!(verdict(&domain(), &i).is_empty());
    }

    #[test]
    fn a_node_cannot_prove_itself_dead() {
        let i = inputs(&["a2"], &["a1"], vec![reporting("a1", &["a1"])]);
        assert!(verdict(&domain(), &i).is_empty());
    }
}
