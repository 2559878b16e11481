//! Property tests of the compiler: the topology depends on what the cluster
//! holds, never on the order objects were read in, and equal content always
//! yields equal bytes and versions.

use std::collections::BTreeMap;

use proptest::prelude::*;
use raven_core::api::v1beta1::{
    Endpoint, Gateway, GatewaySpec, GatewayStatus, ProxyConfiguration, TunnelConfiguration,
};
use raven_core::{compile, manifest, view};

#[derive(Debug, Clone)]
struct NodeSpec {
    name: String,
    gateway: Option<usize>,
    ready: bool,
    ip: u8,
    cidr: u8,
}

fn gateway(i: usize, nodes: &[NodeSpec], nat: bool, active: Option<usize>) -> Gateway {
    let members: Vec<&NodeSpec> = nodes.iter().filter(|n| n.gateway == Some(i)).collect();
    let endpoints = members
        .iter()
        .flat_map(|n| {
            ["tunnel", "proxy"].map(|t| Endpoint {
                node_name: n.name.clone(),
                type_: t.into(),
                under_nat: nat,
                public_ip: if nat {
                    String::new()
                } else {
                    format!("192.0.2.{}", n.ip)
                },
                ..Default::default()
            })
        })
        .collect::<Vec<_>>();
    let mut gw = Gateway::new(
        &format!("gw-{i}"),
        GatewaySpec {
            tunnel_config: TunnelConfiguration { replicas: 1 },
            proxy_config: ProxyConfiguration {
                replicas: 1,
                ..Default::default()
            },
            endpoints: endpoints.clone(),
            ..Default::default()
        },
    );
    gw.status = active
        .and_then(|a| endpoints.get(a % endpoints.len().max(1)).cloned())
        .map(|ep| GatewayStatus {
            active_endpoints: vec![ep],
            ..Default::default()
        });
    gw
}

fn node_yaml(n: &NodeSpec) -> String {
    let label = n
        .gateway
        .map(|g| format!("labels: {{raven.openyurt.io/gateway: gw-{g}}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, {label}}}\nspec: {{podCIDR: 10.{}.0.0/16}}\nstatus:\n  conditions: [{{type: Ready, status: \"{}\"}}]\n  addresses: [{{type: InternalIP, address: 172.16.0.{}}}]\n",
        n.name,
        n.cidr,
        if n.ready { "True" } else { "False" },
        n.ip
    )
}

fn cluster() -> impl Strategy<Value = Vec<String>> {
    let node = (0usize..4, any::<bool>(), any::<u8>(), 0u8..12);
    (
        proptest::collection::vec(node, 0..10),
        proptest::collection::vec((any::<bool>(), proptest::option::of(0usize..4)), 1..4),
    )
        .prop_map(|(nodes, gws)| {
            let nodes: Vec<NodeSpec> = nodes
                .into_iter()
                .enumerate()
                .map(|(i, (g, ready, ip, cidr))| NodeSpec {
                    name: format!("node-{i}"),
                    gateway: (g < gws.len()).then_some(g),
                    ready,
                    ip,
                    cidr,
                })
                .collect();
            let mut docs: Vec<String> = nodes.iter().map(node_yaml).collect();
            for (i, (nat, active)) in gws.iter().enumerate() {
                let gw = gateway(i, &nodes, *nat, *active);
                docs.push(serde_yaml_ng::to_string(&gw).unwrap_or_default());
            }
            docs.push("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: raven-cfg, namespace: kube-system}\ndata: {enable-l3-tunnel: \"true\", enable-l7-proxy: \"true\"}\n".into());
            docs
        })
}

fn compile_docs(docs: &[String]) -> String {
    let files: Vec<(String, String)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("f{i}.yaml"), d.clone()))
        .collect();
    let loaded = manifest::load(&files);
    // File names differ between orders, so compare the topology without the
    // loader's own problems (which cite file names).
    compile(&loaded.inputs).topology.to_json()
}

proptest! {
    #[test]
    fn topology_is_the_same_for_any_input_order(docs in cluster(), seed in any::<u64>()) {
        let mut shuffled = docs.clone();
        // Deterministic Fisher-Yates from the seed.
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = usize::try_from(s >> 33).unwrap_or(0) % (i + 1);
            shuffled.swap(i, j);
        }
        prop_assert_eq!(compile_docs(&docs), compile_docs(&shuffled));
    }

    /// Reusing the versions of a previous compile (the hub's incremental
    /// path) gives what a from-scratch compile gives, whatever that previous
    /// compile was: of the same cluster, of another, or of an edit of it.
    #[test]
    fn compiling_reusing_a_previous_topology_equals_a_fresh_compile(docs in cluster(), other in cluster(), cut in any::<usize>()) {
        let inputs = |docs: &[String]| {
            let files: Vec<(String, String)> = docs.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.clone())).collect();
            manifest::load(&files).inputs
        };
        let fresh = compile(&inputs(&docs));
        // An edit: one document dropped.
        let mut edited = docs.clone();
        edited.remove(cut % docs.len());
        for prev in [&docs, &other, &edited] {
            let prev = compile(&inputs(prev)).topology;
            let reused = raven_core::compile::compile_reusing(&inputs(&docs), Some(&prev));
            prop_assert_eq!(&reused, &fresh);
        }
    }

    #[test]
    fn compiling_twice_gives_identical_bytes_and_versions(docs in cluster()) {
        prop_assert_eq!(compile_docs(&docs), compile_docs(&docs));
    }

    #[test]
    fn every_version_is_the_hash_of_its_content(docs in cluster()) {
        let files: Vec<(String, String)> = docs.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.clone())).collect();
        let t = compile(&manifest::load(&files).inputs).topology;
        for r in t.resources.values() {
            prop_assert_eq!(&r.version, &raven_core::ContentVersion::of(&r.body));
        }
    }

    #[test]
    fn every_known_node_sees_settings_and_itself_and_members_see_all_gateways(docs in cluster()) {
        let files: Vec<(String, String)> = docs.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.clone())).collect();
        let t = compile(&manifest::load(&files).inputs).topology;
        let gateways = t.gateways().count();
        let nodes: Vec<_> = t.resources.values().filter_map(|r| match &r.body {
            raven_core::ResourceBody::Node(n) => Some(n.clone()),
            _ => None,
        }).collect();
        for n in nodes {
            let v = view::node_view(&t, &n.name, false);
            prop_assert!(v.contains_key(&raven_core::ResourceName::settings()));
            prop_assert!(v.contains_key(&raven_core::ResourceName::node(&n.name)));
            let seen = v.keys().filter(|k| k.as_str().starts_with("gateway/")).count();
            prop_assert_eq!(seen, if n.gateway.is_some() { gateways } else { 0 });
            // The compact view: a member holds every domain in one form or
            // the other — its own as `gateway/`, the others as `prefixes/`.
            let c = view::node_view(&t, &n.name, true);
            let count = |kind: &str| c.keys().filter(|k| k.as_str().starts_with(kind)).count();
            let member = n.gateway.is_some() && !n.tunnel_candidate && !n.proxy_active;
            if member {
                let own = n.gateway.as_ref().is_some_and(|g| t.resources.contains_key(&raven_core::ResourceName::gateway(g)));
                prop_assert_eq!(count("gateway/"), usize::from(own));
                prop_assert_eq!(count("prefixes/"), gateways - usize::from(own));
                prop_assert_eq!(count("peer/"), 0);
            } else {
                prop_assert_eq!(&c, &v);
            }
        }
    }

    #[test]
    fn a_subnet_is_routed_to_at_most_one_gateway(docs in cluster()) {
        let files: Vec<(String, String)> = docs.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.clone())).collect();
        let t = compile(&manifest::load(&files).inputs).topology;
        let mut owner: BTreeMap<ipnet::IpNet, String> = BTreeMap::new();
        for g in t.gateways() {
            for m in &g.members {
                for s in &m.subnets {
                    for (other, gw) in &owner {
                        let overlap = other.contains(&s.network()) || s.contains(&other.network());
                        prop_assert!(!overlap || gw == g.name.as_str(), "{s} in {} overlaps {other} in {gw}", g.name);
                    }
                    owner.insert(*s, g.name.to_string());
                }
            }
        }
    }
}
