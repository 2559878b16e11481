//! What the compiler takes from agent reports besides keys: local failovers
//! (adopted into the election) and NAT-mapped endpoints observed by public
//! gateways (passed on for direct NAT-to-NAT paths).

use raven_core::cluster::AgentReport;
use raven_core::topology::{ResourceBody, ResourceName};
use raven_core::{GatewayName, NodeName, compile, manifest};

fn n(s: &str) -> NodeName {
    NodeName::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn g(s: &str) -> GatewayName {
    GatewayName::new(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The golden `nat-relay` cluster: public gw-pub-a (pa1) and gw-pub-b (pb1,
/// the relay of every NATed gateway), NATed gw-nat-1 (n1a, then n1b),
/// gw-nat-2 (n2a), gw-nat-3 (n3a).
fn inputs() -> raven_core::Inputs {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/nat-relay/input.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    manifest::load(&[("input.yaml".to_owned(), text)]).inputs
}

fn active_tunnel(c: &raven_core::compile::Compiled, gw: &str) -> Option<String> {
    c.topology
        .gateways()
        .find(|v| v.name == g(gw))
        .and_then(|v| v.active_tunnel.as_ref())
        .map(|t| t.node.to_string())
}

fn peer_observed(c: &raven_core::compile::Compiled, node: &str) -> Option<String> {
    match c
        .topology
        .resources
        .get(&ResourceName::peer(&n(node)))
        .map(|r| &r.body)
    {
        Some(ResourceBody::Peer(p)) => p.observed_endpoint.map(|e| e.to_string()),
        _ => None,
    }
}

fn key_report() -> AgentReport {
    AgentReport {
        wireguard_public_key: Some("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=".into()),
        ..Default::default()
    }
}

/// A report saying its node sends `gateway`'s tunnel traffic to `node`.
fn failover_report(gateway: &str, node: &str) -> AgentReport {
    let mut r = key_report();
    r.local_failover.insert(g(gateway), n(node));
    r
}

#[test]
fn a_candidate_that_reports_taking_over_becomes_the_elected_endpoint_and_stays() {
    let mut i = inputs();
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1a")
    );

    i.reports
        .insert(n("n1b"), failover_report("gw-nat-1", "n1b"));
    let c = compile(&i);
    assert_eq!(active_tunnel(&c, "gw-nat-1").as_deref(), Some("n1b"));
    assert!(
        c.topology
            .problems
            .iter()
            .any(|p| p.object == "Gateway/gw-nat-1"
                && p.field == "status.activeEndpoints"
                && p.value == "n1b"),
        "the adoption is recorded: {:?}",
        c.topology.problems
    );
    // The claim is withdrawn once the agent sees the hub agree; the status
    // the hub wrote keeps n1b elected (sticky), n1a does not come back.
    let mut i2 = inputs();
    if let Some(gw) = i2.gateways.get_mut("gw-nat-1") {
        gw.set_status(c.gateways.get(&g("gw-nat-1")).map(|cg| cg.status.clone()));
    }
    assert_eq!(
        active_tunnel(&compile(&i2), "gw-nat-1").as_deref(),
        Some("n1b")
    );
}

#[test]
fn only_the_claimant_itself_can_claim_a_gateway_and_only_while_ready() {
    let mut i = inputs();
    // A member reporting that it uses n1b is not n1b claiming.
    i.reports
        .insert(n("n1a"), failover_report("gw-nat-1", "n1b"));
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1a")
    );
    // A NotReady claimant is ignored.
    i.reports
        .insert(n("n1b"), failover_report("gw-nat-1", "n1b"));
    if let Some(node) = i.nodes.get_mut(&n("n1b")) {
        node.ready = false;
    }
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1a")
    );
}

#[test]
fn natted_peers_get_the_endpoint_their_relay_observed() {
    let mut i = inputs();
    for node in ["n1a", "n2a"] {
        i.reports.insert(n(node), key_report());
    }
    let mut relay = key_report();
    relay.observed_peers.insert(
        n("n1a"),
        "192.0.2.11:4500".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    i.reports.insert(n("pb1"), relay);
    // Another public gateway saw n1a elsewhere: the relay's view wins.
    let mut other = key_report();
    other.observed_peers.insert(
        n("n1a"),
        "192.0.2.99:4500".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    other.observed_peers.insert(
        n("n2a"),
        "192.0.2.22:4500".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    i.reports.insert(n("pa1"), other);

    let c = compile(&i);
    assert_eq!(peer_observed(&c, "n1a").as_deref(), Some("192.0.2.11:4500"));
    assert_eq!(
        peer_observed(&c, "n2a").as_deref(),
        Some("192.0.2.22:4500"),
        "any public gateway's observation when the relay has none"
    );
}

#[test]
fn a_natted_node_cannot_inject_observations_about_others() {
    let mut i = inputs();
    i.reports.insert(n("n1a"), key_report());
    let mut natted = key_report();
    natted.observed_peers.insert(
        n("n1a"),
        "192.0.2.66:4500".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    i.reports.insert(n("n2a"), natted);
    assert_eq!(peer_observed(&compile(&i), "n1a"), None);
}

/// `reporter` (connected) says its probes find `dead` dead.
fn dead_report(i: &mut raven_core::Inputs, reporter: &str, dead: &[&str]) {
    i.reports.entry(n(reporter)).or_default().dead_candidates = dead.iter().map(|d| n(d)).collect();
    i.streams.connected.insert(n(reporter));
}

#[test]
fn a_gateway_whose_stream_is_gone_and_whose_domain_probes_it_dead_is_replaced_by_a_connected_candidate()
 {
    let mut i = inputs();
    // n1a's stream gone for the grace, n1b connected, member n1c probes n1a dead.
    i.streams.gone.insert(n("n1a"));
    i.streams.connected.insert(n("n1b"));
    let before = compile(&i);
    assert_eq!(active_tunnel(&before, "gw-nat-1").as_deref(), Some("n1a"));
    dead_report(&mut i, "n1c", &["n1a"]);
    let c = compile(&i);
    assert_eq!(active_tunnel(&c, "gw-nat-1").as_deref(), Some("n1b"));
    assert!(
        c.topology
            .problems
            .iter()
            .any(|p| p.object == "Gateway/gw-nat-1"
                && p.field == "spec.endpoints[0].nodeName"
                && p.value == "n1a"
                && p.message.contains("proven dead")),
        "{:?}",
        c.topology.problems
    );
    let view = c
        .topology
        .gateways()
        .find(|v| v.name == g("gw-nat-1"))
        .cloned()
        .unwrap_or_else(|| panic!("no gw-nat-1"));
    let order: Vec<String> = view
        .tunnel_candidates
        .iter()
        .map(|t| t.node.to_string())
        .collect();
    assert_eq!(order, ["n1b", "n1a"], "the dead candidate goes last");
    // The candidate reconnects: the election keeps n1b (sticky, as the hub
    // feeds its last election back).
    i.streams.gone.clear();
    i.streams.connected.insert(n("n1a"));
    i.gateways
        .get_mut("gw-nat-1")
        .unwrap_or_else(|| panic!("no gw-nat-1"))
        .set_status(Some(c.gateways[&g("gw-nat-1")].status.clone()));
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1b")
    );
}

#[test]
fn probe_verdicts_from_another_gateways_node_do_not_move_a_gateway() {
    let mut i = inputs();
    i.streams.gone.insert(n("n1a"));
    i.streams.connected.insert(n("n1b"));
    dead_report(&mut i, "n2a", &["n1a"]);
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1a")
    );
}

#[test]
fn without_a_connected_ready_candidate_the_dead_gateway_stays_elected() {
    let mut i = inputs();
    i.streams.gone.extend([n("n1a"), n("n1b")]);
    dead_report(&mut i, "n1c", &["n1a"]);
    assert_eq!(
        active_tunnel(&compile(&i), "gw-nat-1").as_deref(),
        Some("n1a")
    );
}
