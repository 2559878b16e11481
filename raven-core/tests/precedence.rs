//! Subnet precedence across compiles: a gateway keeps the ranges it served
//! against a newcomer, whatever their names; without history the first
//! gateway by name keeps a contested range.

use raven_core::{Compiled, GatewayName, compile, manifest};

const CLUSTER: &str = r#"
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-b}
spec: {}
---
apiVersion: v1
kind: Node
metadata: {name: b1, labels: {raven.openyurt.io/gateway: gw-b}}
spec: {podCIDR: 10.0.0.0/24}
status:
  addresses: [{type: InternalIP, address: 172.16.0.1}]
---
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-a}
spec: {}
---
apiVersion: v1
kind: Node
metadata: {name: a1, labels: {raven.openyurt.io/gateway: gw-a}}
spec: {podCIDR: 10.0.0.0/25}
status:
  addresses: [{type: InternalIP, address: 172.16.0.2}]
"#;

fn subnets(c: &Compiled, gw: &str) -> Vec<String> {
    c.gateways
        .get(gw)
        .map(|g| {
            g.status
                .nodes
                .iter()
                .flat_map(|n| n.subnets.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_gateway_keeps_a_subnet_it_served_against_a_newcomer_whose_name_sorts_first() {
    let mut inputs = manifest::load(&[("c.yaml".into(), CLUSTER.into())]).inputs;
    // No history: gw-a sorts first and keeps the contested range.
    let fresh = compile(&inputs);
    assert_eq!(subnets(&fresh, "gw-a"), ["10.0.0.0/25"]);
    assert!(subnets(&fresh, "gw-b").is_empty());
    // gw-b served 10.0.0.0/24 before gw-a arrived: it keeps it.
    let gw_b = GatewayName::new("gw-b").expect("name");
    inputs.held_subnets = [("10.0.0.0/24".parse().expect("net"), gw_b)]
        .into_iter()
        .collect();
    let c = compile(&inputs);
    assert_eq!(subnets(&c, "gw-b"), ["10.0.0.0/24"]);
    assert!(subnets(&c, "gw-a").is_empty());
    assert!(
        c.topology
            .problems
            .iter()
            .any(|p| p.object == "Gateway/gw-a"
                && p.value == "10.0.0.0/25"
                && p.message.contains("served it first")),
        "{:?}",
        c.topology.problems
    );
}
