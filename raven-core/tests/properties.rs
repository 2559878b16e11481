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

/// A drawn report: (node index, has keys, observed endpoint port, observed
/// peers (node index, port), local failover gateway, dead candidates).
type DrawnReport = (
    usize,
    bool,
    Option<u16>,
    Vec<(usize, u16)>,
    Option<usize>,
    Vec<usize>,
);

/// What the hub adds to the manifests' inputs, drawn per step: agent
/// reports, stream liveness, subnets held from an earlier compile, load
/// balancers, and pod CIDRs of other lengths (nested ranges across
/// gateways).
#[derive(Debug, Clone)]
struct Extra {
    reports: Vec<DrawnReport>,
    connected: Vec<usize>,
    gone: Vec<usize>,
    held: Vec<(u8, usize)>,
    load_balancer: Option<(usize, u8)>,
    /// (node index, first octet of a /8 or second of a /24 under 10.x)
    cidrs: Vec<(usize, u8, bool)>,
}

fn extra() -> impl Strategy<Value = Extra> {
    let report = (
        0usize..10,
        any::<bool>(),
        proptest::option::of(1u16..4),
        proptest::collection::vec((0usize..10, 1u16..4), 0..3),
        proptest::option::of(0usize..4),
        proptest::collection::vec(0usize..10, 0..2),
    );
    (
        proptest::collection::vec(report, 0..6),
        proptest::collection::vec(0usize..10, 0..8),
        proptest::collection::vec(0usize..10, 0..4),
        proptest::collection::vec((0u8..12, 0usize..4), 0..4),
        proptest::option::of((0usize..4, 1u8..4)),
        proptest::collection::vec((0usize..10, 0u8..12, any::<bool>()), 0..3),
    )
        .prop_map(
            |(reports, connected, gone, held, load_balancer, cidrs)| Extra {
                reports,
                connected,
                gone,
                held,
                load_balancer,
                cidrs,
            },
        )
}

fn node_name(i: usize) -> raven_core::NodeName {
    raven_core::NodeName::new(format!("node-{i}")).unwrap_or_else(|_| unreachable!())
}

fn gateway_name(i: usize) -> raven_core::GatewayName {
    raven_core::GatewayName::new(format!("gw-{i}")).unwrap_or_else(|_| unreachable!())
}

fn with_extra(mut inputs: raven_core::Inputs, e: &Extra) -> raven_core::Inputs {
    let addr = |port: u16| std::net::SocketAddr::from(([198, 51, 100, 7], port));
    for (n, key, seen, peers, failover, dead) in &e.reports {
        let report = raven_core::AgentReport {
            wireguard_public_key: key.then(|| format!("key-of-{n}")),
            observed_endpoint: seen.map(addr),
            observed_peers: peers
                .iter()
                .map(|(p, port)| (node_name(*p), addr(*port)))
                .collect(),
            observed_direct_peers: peers
                .iter()
                .map(|(p, port)| (node_name(*p), addr(port + 10)))
                .collect(),
            direct_public_key: key.then(|| format!("direct-of-{n}")),
            local_failover: failover
                .iter()
                .map(|g| (gateway_name(*g), node_name(*n)))
                .collect(),
            dead_candidates: dead.iter().map(|d| node_name(*d)).collect(),
            ..Default::default()
        };
        inputs.reports.insert(node_name(*n), report);
    }
    inputs.streams.connected = e.connected.iter().map(|n| node_name(*n)).collect();
    inputs.streams.gone = e
        .gone
        .iter()
        .map(|n| node_name(*n))
        .filter(|n| !inputs.streams.connected.contains(n))
        .collect();
    inputs.held_subnets = e
        .held
        .iter()
        .map(|(c, g)| {
            (
                format!("10.{c}.0.0/16")
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
                gateway_name(*g),
            )
        })
        .collect();
    if let Some((g, ip)) = e.load_balancer {
        let ip = std::net::IpAddr::from([203, 0, 113, ip]);
        inputs.load_balancers.insert(
            format!("gw-{g}"),
            raven_core::LoadBalancerIngress {
                tunnel: Some(ip),
                proxy: Some(ip),
            },
        );
    }
    for (n, octet, wide) in &e.cidrs {
        if let Some(node) = inputs.nodes.get_mut(&node_name(*n)) {
            let net = if *wide {
                format!("10.0.0.0/{}", 8 + octet)
            } else {
                format!("10.{octet}.1.0/24")
            };
            node.pod_cidrs.push(
                net.parse::<ipnet::IpNet>()
                    .unwrap_or_else(|_| unreachable!())
                    .trunc(),
            );
        }
    }
    inputs
}

/// One change: the document at `at` replaced by `other`'s document at
/// `from`, removed, or `other`'s added (or the whole cluster replaced), and
/// the hub's own inputs redrawn or kept.
#[derive(Debug, Clone)]
struct Step {
    kind: u8,
    at: usize,
    from: usize,
    other: Vec<String>,
    extra: Option<Extra>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0u8..4,
        any::<usize>(),
        any::<usize>(),
        cluster(),
        proptest::option::of(extra()),
    )
        .prop_map(|(kind, at, from, other, extra)| Step {
            kind,
            at,
            from,
            other,
            extra,
        })
}

proptest! {
    /// The hub's pipeline compiles each change with one long-lived
    /// [`raven_core::compile::Incremental`], which reuses the output of
    /// every gateway whose inputs did not change: after any sequence of
    /// changes its result equals a from-scratch compile of the same inputs
    /// — topology, versions, per-gateway status and problems.
    #[test]
    fn an_incremental_compile_of_any_sequence_of_changes_equals_a_from_scratch_compile(
        base in cluster(), first in extra(), steps in proptest::collection::vec(step(), 1..8)
    ) {
        let inputs = |docs: &[String], e: &Extra| {
            let files: Vec<(String, String)> = docs.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.clone())).collect();
            with_extra(manifest::load(&files).inputs, e)
        };
        let mut incremental = raven_core::compile::Incremental::default();
        let (mut docs, mut e) = (base, first);
        let mut read = inputs(&docs, &e);
        let mut last = incremental.compile(&read, None);
        prop_assert_eq!(&last, &compile(&read));
        for s in steps {
            let pick = |v: &[String], i: usize| v.get(i % v.len().max(1)).cloned();
            match s.kind {
                0 => if let (Some(d), false) = (pick(&s.other, s.from), docs.is_empty()) {
                    let at = s.at % docs.len();
                    docs[at] = d;
                },
                1 if !docs.is_empty() => { docs.remove(s.at % docs.len()); }
                2 => docs.extend(pick(&s.other, s.from)),
                _ => docs = s.other.clone(),
            }
            if let Some(x) = s.extra {
                e = x;
            }
            let mut now = inputs(&docs, &e);
            // Unchanged reports and liveness are the very tables the last
            // compile read, as the hub's index hands them out (the compiler
            // then skips comparing them node by node).
            if now.reports == read.reports {
                now.reports = read.reports.clone();
            }
            if now.streams == read.streams {
                now.streams = read.streams.clone();
            }
            let next = incremental.compile(&now, Some(&last.topology));
            prop_assert_eq!(&next, &compile(&now));
            last = next;
            read = now;
        }
    }
}
