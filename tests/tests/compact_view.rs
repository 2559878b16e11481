//! The compact member view programs exactly the kernel state of the full
//! view: for every member (a node that is neither a tunnel candidate nor an
//! active proxy endpoint of its gateway) of every fixture cluster and of
//! generated ones, the hub's full view and its compact view (own
//! `gateway/`, the other domains' `prefixes/`) give the same desired
//! dataplane (VXLAN link, neighbours, FDB, routes, rules, with and without
//! a local failover in its domain), the same skip-NAT rules, the same
//! failover probes and the same proxy decisions — while the compact view
//! carries no other gateway's endpoints or keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use raven_core::{NodeName, ResourceBody, ResourceName, Topology, compile, manifest, view};
use raven_edge::cache::CachedState;
use raven_edge::dataplane::{self, Local, skipnat};
use raven_model::view::ViewClass;
use raven_proxy::route::ProxyView;

fn state_of(topology: &Topology, node: &NodeName, compact: bool) -> CachedState {
    CachedState {
        complete: true,
        resources: view::node_view(topology, node, compact)
            .into_iter()
            .map(|(n, r)| (n, r.clone()))
            .collect(),
        ..Default::default()
    }
}

/// Checks every member of `topology`; returns how many it checked.
fn members_agree(topology: &Topology) -> Result<usize, String> {
    let local = Local::new("raven-wg0", 1500);
    let mut checked = 0;
    for r in topology.resources.values() {
        let ResourceBody::Node(me) = &r.body else {
            continue;
        };
        if view::view_class(me, true) != ViewClass::Member {
            continue;
        }
        let node = &me.name;
        let (full, compact) = (
            state_of(topology, node, false),
            state_of(topology, node, true),
        );
        // Nothing of another domain but its prefixes.
        for name in compact.resources.keys() {
            let s = name.as_str();
            let own = me.gateway.as_ref().map(ResourceName::gateway);
            if s.starts_with("peer/") || (s.starts_with("gateway/") && Some(name) != own.as_ref()) {
                return Err(format!("{node}: the compact view holds {name}"));
            }
        }
        let (vf, vc) = (full.view(node), compact.view(node));
        // The overrides a member may act on: none, or any candidate of its
        // own gateway (local failover while the hub is away).
        let mut overrides = vec![BTreeMap::new()];
        if let Some(gw) = vf.as_ref().and_then(|v| {
            v.gateways
                .iter()
                .find(|g| Some(&g.name) == me.gateway.as_ref())
        }) {
            for c in &gw.tunnel_candidates {
                overrides.push(BTreeMap::from([(gw.name.clone(), c.node.clone())]));
            }
        }
        for ov in overrides {
            let inf = dataplane::assemble(vf.as_ref(), &local, ov.clone());
            let inc = dataplane::assemble(vc.as_ref(), &local, ov.clone());
            let (df, dc) = (dataplane::desired(&inf), dataplane::desired(&inc));
            if df != dc {
                return Err(format!(
                    "{node} (overrides {ov:?}): desired differs\nfull:    {df:?}\ncompact: {dc:?}"
                ));
            }
            if skipnat::spec(&inf) != skipnat::spec(&inc) {
                return Err(format!("{node}: skip-NAT differs"));
            }
        }
        if let (Some(vf), Some(vc)) = (&vf, &vc)
            && raven_edge::failover::probe_targets(vf) != raven_edge::failover::probe_targets(vc)
        {
            return Err(format!("{node}: probe targets differ"));
        }
        let (pf, pc) = (
            ProxyView::from_resources(node, &full.resources),
            ProxyView::from_resources(node, &compact.resources),
        );
        if pf.as_ref().map(|p| (p.servers(), p.server_port()))
            != pc.as_ref().map(|p| (p.servers(), p.server_port()))
        {
            return Err(format!("{node}: proxy servers differ"));
        }
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn every_member_of_every_fixture_cluster_programs_the_same_kernel_from_the_compact_view() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../raven-core/tests/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("golden dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual"));
    let mut checked = 0;
    for dir in dirs {
        let loaded = manifest::load(&raven_model::fixtures::yaml_dir(&dir));
        let topology = compile(&loaded.inputs).topology;
        checked += members_agree(&topology).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    assert!(checked >= 5, "only {checked} members in the fixtures");
}

#[derive(Debug, Clone)]
struct NodeSpec {
    gateway: Option<usize>,
    ready: bool,
    ip: u8,
    cidr: u8,
    v6: bool,
    /// Listed as a tunnel endpoint, with this public address (an
    /// address other domains' members may also have).
    tunnel: Option<Option<u8>>,
    proxy: bool,
}

fn node_yaml(i: usize, n: &NodeSpec) -> String {
    let label = n
        .gateway
        .map(|g| format!("labels: {{raven.openyurt.io/gateway: gw-{g}}}"))
        .unwrap_or_default();
    let cidrs = if n.v6 {
        format!(
            "podCIDR: 10.{}.0.0/16, podCIDRs: [10.{}.0.0/16, \"fd00:{}::/64\"]",
            n.cidr, n.cidr, n.cidr
        )
    } else {
        format!("podCIDR: 10.{}.0.0/16", n.cidr)
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{i}, {label}}}\nspec: {{{cidrs}}}\nstatus:\n  conditions: [{{type: Ready, status: \"{}\"}}]\n  addresses: [{{type: InternalIP, address: 172.16.0.{}}}]\n",
        if n.ready { "True" } else { "False" },
        n.ip
    )
}

fn gateway_yaml(g: usize, nodes: &[NodeSpec], nat: bool, extra: Option<u8>) -> String {
    let mut endpoints = String::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.gateway != Some(g) {
            continue;
        }
        if let Some(public) = n.tunnel {
            let ip = public
                .map(|p| format!(", publicIP: 172.16.0.{p}"))
                .unwrap_or_default();
            endpoints.push_str(&format!(
                "  - {{nodeName: node-{i}, type: tunnel, underNAT: {nat}{ip}}}\n"
            ));
        }
        if n.proxy {
            endpoints.push_str(&format!(
                "  - {{nodeName: node-{i}, type: proxy, underNAT: {nat}}}\n"
            ));
        }
    }
    let annotations = extra
        .map(|e| {
            format!(
                "\n  annotations: {{raven.openyurt.io/extra-allowed-source-cidrs: \"192.168.{e}.7/24, 172.16.0.{e}/32\"}}"
            )
        })
        .unwrap_or_default();
    format!(
        "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata:\n  name: gw-{g}{annotations}\nspec:\n{}  tunnelConfig: {{Replicas: 1}}\n  proxyConfig: {{Replicas: 1}}\n  endpoints:\n{}",
        if nat { "" } else { "  exposeType: PublicIP\n" },
        if endpoints.is_empty() {
            "  []\n".to_owned()
        } else {
            endpoints
        }
    )
}

/// Up to 4 gateways (public or under NAT, some with extra source CIDRs)
/// and up to 14 nodes: private addresses from one small range, so domains
/// overlap as behind NATs and a public endpoint address may be another
/// domain's member; some pod subnets dual-stack; some nodes in no gateway.
fn cluster() -> impl Strategy<Value = Vec<(String, String)>> {
    let node = (
        0usize..5,
        any::<bool>(),
        1u8..10,
        0u8..16,
        any::<bool>(),
        proptest::option::weighted(0.4, proptest::option::of(1u8..10)),
        proptest::bool::weighted(0.25),
    );
    (
        proptest::collection::vec(node, 1..14),
        proptest::collection::vec((any::<bool>(), proptest::option::of(1u8..10)), 1..5),
    )
        .prop_map(|(nodes, gws)| {
            let nodes: Vec<NodeSpec> = nodes
                .into_iter()
                .map(|(g, ready, ip, cidr, v6, tunnel, proxy)| NodeSpec {
                    gateway: (g < gws.len()).then_some(g),
                    ready,
                    ip,
                    cidr,
                    v6,
                    tunnel,
                    proxy,
                })
                .collect();
            let mut docs: Vec<String> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| node_yaml(i, n))
                .collect();
            for (g, (nat, extra)) in gws.iter().enumerate() {
                docs.push(gateway_yaml(g, &nodes, *nat, *extra));
            }
            docs.push("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: raven-cfg, namespace: kube-system}\ndata: {enable-l3-tunnel: \"true\", enable-l7-proxy: \"true\"}\n".into());
            docs.into_iter()
                .enumerate()
                .map(|(i, d)| (format!("f{i}.yaml"), d))
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_member_of_a_generated_cluster_programs_the_same_kernel_from_the_compact_view(files in cluster()) {
        let loaded = manifest::load(&files);
        let topology = compile(&loaded.inputs).topology;
        members_agree(&topology).map_err(TestCaseError::fail)?;
    }
}
