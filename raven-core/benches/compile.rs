//! Compiler and view throughput at the scale raven is designed for (1,000
//! gateways, 10,000 nodes per cluster), reported as ratios against the same work at a tenth of the size
//! measured in the same run, so machine noise cancels out.
//!
//! `cargo bench -p raven-core --bench compile`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use raven_core::api::v1beta1::{Endpoint, Gateway, GatewaySpec, TunnelConfiguration};
use raven_core::{ClusterNode, Inputs, NodeName, RavenConfig, compile, view};

fn cluster(gateways: usize, nodes_per_gateway: usize) -> Inputs {
    let mut inputs = Inputs {
        config: RavenConfig {
            present: true,
            enable_l3_tunnel: true,
            enable_l7_proxy: true,
            vpn_driver: raven_model::topology::VpnDriver::Wireguard,
            vpn_driver_invalid: false,
        },
        ..Default::default()
    };
    for g in 0..gateways {
        let name = format!("gw-{g}");
        let endpoints = (0..2)
            .map(|i| Endpoint {
                node_name: format!("n-{g}-{i}"),
                type_: "tunnel".into(),
                under_nat: g % 3 != 0,
                public_ip: if g % 3 == 0 {
                    format!("198.51.{}.{}", g / 250, g % 250)
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .collect();
        let spec = GatewaySpec {
            tunnel_config: TunnelConfiguration { replicas: 1 },
            endpoints,
            ..Default::default()
        };
        inputs.admit_gateway(Gateway::new(&name, spec));
        for n in 0..nodes_per_gateway {
            let node = NodeName::new(format!("n-{g}-{n}")).expect("name");
            let i = g * nodes_per_gateway + n;
            inputs.nodes.insert(
                node.clone(),
                ClusterNode {
                    name: node,
                    gateway_label: Some(name.clone()),
                    ready: true,
                    internal_ip: Some(
                        format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)
                            .parse()
                            .expect("ip"),
                    ),
                    pod_cidrs: vec![
                        format!("100.{}.{}.0/24", i >> 8 & 255, i & 255)
                            .parse()
                            .expect("cidr"),
                    ],
                },
            );
        }
    }
    inputs
}

fn time<T>(runs: u32, mut f: impl FnMut() -> T) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed());
    }
    best
}

fn main() {
    let mut rows = BTreeMap::new();
    for (label, g) in [
        ("baseline 100 gw / 1,000 nodes", 100),
        ("design 1,000 gw / 10,000 nodes", 1000),
    ] {
        let inputs = cluster(g, 10);
        let compile_t = time(5, || compile(&inputs));
        let topo = compile(&inputs).topology;
        let nodes: Vec<NodeName> = inputs.nodes.keys().cloned().collect();
        let view_t = time(3, || {
            nodes
                .iter()
                .map(|n| view::view_names(&topo, n, true).len())
                .sum::<usize>()
        });
        rows.insert(g, (label, compile_t, view_t, topo.resources.len()));
    }
    let (_, bc, bv, _) = rows[&100];
    println!(
        "{:<34} {:>10} {:>12} {:>16} {:>10}",
        "cluster", "resources", "compile", "all node views", "ratio"
    );
    for (label, c, v, r) in rows.values() {
        println!(
            "{label:<34} {r:>10} {:>10.1}ms {:>14.1}ms {:>5.1}x/{:.1}x",
            c.as_secs_f64() * 1e3,
            v.as_secs_f64() * 1e3,
            c.as_secs_f64() / bc.as_secs_f64(),
            v.as_secs_f64() / bv.as_secs_f64()
        );
    }
    println!(
        "(ratio = time against the baseline in this run; 10x input → ~10x compile, ~100x all views is linear per node)"
    );
}
