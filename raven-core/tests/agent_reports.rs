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

fn status_tunnel(
    c: &raven_core::compile::Compiled,
    gw: &str,
) -> raven_core::api::v1beta1::Endpoint {
    c.gateways[&g(gw)]
        .status
        .active_endpoints
        .iter()
        .find(|e| e.type_ == "tunnel")
        .cloned()
        .unwrap_or_else(|| panic!("{gw} has an active tunnel"))
}

#[test]
fn status_shows_the_reported_key_the_observed_address_and_a_symmetric_nat() {
    let mut i = inputs();
    let before = compile(&i);
    let ep = status_tunnel(&before, "gw-nat-2");
    assert!(
        !ep.config.contains_key("publicKey") && ep.public_ip.is_empty() && ep.nat_type.is_empty()
    );

    i.reports.insert(n("n2a"), key_report());
    // The two public gateways' active nodes see n2a from different ports.
    let mut pa = key_report();
    pa.wireguard_public_key = Some("cGEx".into());
    pa.observed_peers.insert(
        n("n2a"),
        "203.0.113.9:40001"
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut pb = key_report();
    pb.wireguard_public_key = Some("cGIx".into());
    pb.observed_peers.insert(
        n("n2a"),
        "203.0.113.9:40002"
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    i.reports.insert(n("pa1"), pa);
    i.reports.insert(n("pb1"), pb);
    let c = compile(&i);
    let ep = status_tunnel(&c, "gw-nat-2");
    assert_eq!(
        ep.config.get("publicKey").map(String::as_str),
        Some("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=")
    );
    assert_eq!(ep.public_ip, "203.0.113.9");
    assert!(ep.public_port == 40001 || ep.public_port == 40002, "{ep:?}");
    assert_eq!(ep.nat_type, "Symmetric NAT");
    // A spec's own natType and publicIP are never overwritten.
    let n1 = status_tunnel(&c, "gw-nat-1");
    assert_eq!(n1.nat_type, "FullCone");
    assert_eq!(status_tunnel(&c, "gw-pub-a").public_ip, "198.51.100.1");
    // Status only: the topology (what agents get) is the same as without
    // the observations, apart from the peers' keys and observed endpoints.
    assert_eq!(
        c.topology
            .gateways()
            .map(|v| v.active_tunnel.clone())
            .collect::<Vec<_>>(),
        {
            let mut j = inputs();
            j.reports = i.reports.clone();
            compile(&j)
                .topology
                .gateways()
                .map(|v| v.active_tunnel.clone())
                .collect::<Vec<_>>()
        }
    );
    assert_eq!(c.gateways[&g("gw-nat-2")].status.node_count, Some(1));
}

#[test]
fn a_load_balancer_gateway_is_reached_at_the_load_balancer_ingress() {
    let mut i = inputs();
    let expose = |i: &mut raven_core::Inputs, how: &str| {
        let mut gw = i.gateways[&g("gw-nat-1")].gateway().clone();
        gw.spec.expose_type = how.into();
        // Raven's webhook: an exposed gateway is not under NAT.
        for ep in &mut gw.spec.endpoints {
            ep.under_nat = false;
        }
        let admitted = raven_core::compile::admit(gw).unwrap_or_else(|e| panic!("{e:?}"));
        i.gateways.insert(g("gw-nat-1"), admitted);
    };
    expose(&mut i, "LoadBalancer");
    let lb_ip: std::net::IpAddr = "192.0.2.77".parse().unwrap_or_else(|e| panic!("{e}"));
    let public = |c: &raven_core::compile::Compiled| {
        c.topology
            .gateways()
            .find(|v| v.name == g("gw-nat-1"))
            .and_then(|v| v.active_tunnel.as_ref())
            .and_then(|t| t.public_ip)
    };
    assert_eq!(public(&compile(&i)), None, "no ingress yet");
    i.load_balancers.insert(
        "gw-nat-1".into(),
        raven_core::LoadBalancerIngress {
            tunnel: Some(lb_ip),
            proxy: None,
        },
    );
    let c = compile(&i);
    assert_eq!(public(&c), Some(lb_ip));
    assert!(
        c.topology
            .gateways()
            .find(|v| v.name == g("gw-nat-1"))
            .is_some_and(|v| v
                .tunnel_candidates
                .iter()
                .all(|t| t.public_ip == Some(lb_ip))),
        "every candidate is reached at the load balancer"
    );
    assert_eq!(status_tunnel(&c, "gw-nat-1").public_ip, "192.0.2.77");
    // An ingress for a gateway that is not LoadBalancer-exposed is ignored.
    expose(&mut i, "");
    assert_eq!(public(&compile(&i)), None);
}
