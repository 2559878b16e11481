//! The cluster generator: `gateways` Gateways × `nodes` Ready nodes each, one
//! manifest file per gateway (the Gateway and its labelled Nodes) plus
//! `raven-cfg`, so a one-node change rewrites one file.

use std::path::Path;

/// Shape of the generated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub gateways: usize,
    pub nodes: usize,
}

pub fn gateway_name(g: usize) -> String {
    format!("gw-{g:05}")
}

pub fn node_name(g: usize, i: usize) -> String {
    format!("n-{g:05}-{i:03}")
}

/// The node's pod CIDR; `alt` moves it to a range no other node uses (the
/// one-node change of the benchmark).
pub fn pod_cidr(shape: Shape, g: usize, i: usize, alt: bool) -> String {
    let k = g * shape.nodes + i + if alt { shape.gateways * shape.nodes } else { 0 };
    format!("10.{}.{}.0/24", 64 + k / 256, k % 256)
}

pub fn internal_ip(shape: Shape, g: usize, i: usize) -> String {
    let k = g * shape.nodes + i;
    format!(
        "172.{}.{}.{}",
        16 + k / 62_500,
        (k / 250) % 250,
        k % 250 + 1
    )
}

/// Nodes 0 and 1 of each domain are its tunnel candidates (node 0 also the
/// proxy). Gateway 0 is a public cloud gateway, the others are under NAT.
pub fn gateway_file(shape: Shape, g: usize, alt_node: Option<usize>) -> String {
    let name = gateway_name(g);
    let public = g == 0;
    let nat = if public { "false" } else { "true" };
    let ip = |i: usize| {
        if public {
            format!("\n      publicIP: 203.0.113.{}", i + 10)
        } else {
            String::new()
        }
    };
    let mut out = format!(
        "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n{}  proxyConfig:\n    Replicas: 1\n  tunnelConfig:\n    Replicas: 1\n  endpoints:\n",
        if public {
            "  exposeType: PublicIP\n"
        } else {
            ""
        }
    );
    let candidates = shape.nodes.min(2);
    for i in 0..candidates {
        out.push_str(&format!(
            "    - nodeName: {}\n      underNAT: {nat}\n      port: 4500\n      type: tunnel{}\n",
            node_name(g, i),
            ip(i)
        ));
    }
    if shape.nodes > 0 {
        out.push_str(&format!(
            "    - nodeName: {}\n      underNAT: {nat}\n      port: 10262\n      type: proxy{}\n",
            node_name(g, 0),
            ip(0)
        ));
    }
    for i in 0..shape.nodes {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    raven.openyurt.io/gateway: {name}\nspec:\n  podCIDR: {}\nstatus:\n  conditions:\n    - type: Ready\n      status: \"True\"\n  addresses:\n    - type: InternalIP\n      address: {}\n",
            node_name(g, i),
            pod_cidr(shape, g, i, alt_node == Some(i)),
            internal_ip(shape, g, i)
        ));
    }
    out
}

pub const RAVEN_CFG: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: raven-cfg\n  namespace: kube-system\ndata:\n  enable-l3-tunnel: \"true\"\n  enable-l7-proxy: \"true\"\n";

pub fn gateway_path(dir: &Path, g: usize) -> std::path::PathBuf {
    dir.join(format!("{}.yaml", gateway_name(g)))
}

/// Writes the whole cluster into `dir`.
pub fn write(dir: &Path, shape: Shape) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("raven-cfg.yaml"), RAVEN_CFG)?;
    for g in 0..shape.gateways {
        std::fs::write(gateway_path(dir, g), gateway_file(shape, g, None))?;
    }
    Ok(())
}

/// Rewrites gateway `g`'s file atomically (write + rename, as editors and
/// config tools do), with `alt_node`'s pod CIDR moved.
pub fn rewrite(dir: &Path, shape: Shape, g: usize, alt_node: Option<usize>) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{}.tmp", gateway_name(g)));
    std::fs::write(&tmp, gateway_file(shape, g, alt_node))?;
    std::fs::rename(&tmp, gateway_path(dir, g))
}

/// The agents to simulate: `count` nodes spread over the domains, every
/// domain's tunnel candidates first (`members_only`: none of them, only
/// the nodes from the third of each domain on).
pub fn pick_agents(shape: Shape, count: usize, members_only: bool) -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> = Vec::new();
    let first = if members_only { shape.nodes.min(2) } else { 0 };
    for i in first..shape.nodes {
        for g in 0..shape.gateways {
            order.push((g, i));
        }
    }
    order.truncate(count);
    order
}
