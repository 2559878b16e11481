//! Test fixtures: every model struct a test spells out, with defaults, so a
//! test names only the fields it is about (`GatewayView { under_nat: true,
//! ..fixtures::gateway("gw-hz") }`) and a new field is added here, once.
//! Built with the `test-fixtures` feature (tests of other crates enable it
//! through their dev-dependency on this crate); the parsers panic on bad
//! input, as a test wants.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::topology::{
    EndpointType, ExposeType, GatewayEndpoint, GatewayView, Member, NodeView, PeerInfo, Settings,
};
use crate::{GatewayName, NodeName};

/// A node name.
pub fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap_or_else(|e| panic!("node name {name:?}: {e}"))
}

/// A gateway name.
pub fn gateway_name(name: &str) -> GatewayName {
    GatewayName::new(name).unwrap_or_else(|e| panic!("gateway name {name:?}: {e}"))
}

/// An address.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("address {s:?}: {e}"))
}

/// A prefix.
pub fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("prefix {s:?}: {e}"))
}

/// A socket address.
pub fn socket(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("socket address {s:?}: {e}"))
}

/// A tunnel endpoint of `node` on `port`: not under NAT, no public address.
pub fn endpoint(node_name: &str, port: u16) -> GatewayEndpoint {
    GatewayEndpoint {
        node: node(node_name),
        type_: EndpointType::Tunnel,
        port,
        under_nat: false,
        nat_type: String::new(),
        public_ip: None,
        public_port: None,
        config: BTreeMap::new(),
    }
}

/// A ready member `node` at `private_ip` with pod subnets `subnets`.
pub fn member(node_name: &str, private_ip: &str, subnets: &[&str]) -> Member {
    Member {
        node: node(node_name),
        private_ip: ip(private_ip),
        subnets: subnets.iter().map(|s| net(s)).collect(),
        ready: true,
    }
}

/// Gateway `name` with nothing in it: no members, no endpoints, not under
/// NAT, not exposed, no relay.
pub fn gateway(name: &str) -> GatewayView {
    GatewayView {
        name: gateway_name(name),
        expose_type: ExposeType::None,
        under_nat: false,
        members: Vec::new(),
        active_tunnel: None,
        tunnel_candidates: Vec::new(),
        active_proxies: Vec::new(),
        proxy_ports: Vec::new(),
        extra_source_cidrs: Vec::new(),
        relay: None,
    }
}

/// Node `name`, in `gateway` when given; no address, no subnets, no role.
pub fn node_view(name: &str, gateway: Option<&str>) -> NodeView {
    NodeView {
        name: node(name),
        gateway: gateway.map(gateway_name),
        private_ip: None,
        subnets: Vec::new(),
        tunnel_active: false,
        tunnel_candidate: false,
        proxy_active: false,
    }
}

/// What the hub knows of peer `node` of `gateway`: nothing reported yet.
pub fn peer(node_name: &str, gateway: &str) -> PeerInfo {
    PeerInfo {
        node: node(node_name),
        gateway: gateway_name(gateway),
        wireguard_public_key: None,
        tunnel_port: None,
        observed_endpoint: None,
        direct: None,
        ipsec_public_key: None,
    }
}

/// `raven-cfg` present with the L3 tunnel on, the L7 proxy off, VXLAN on
/// raven's port, WireGuard.
pub fn settings() -> Settings {
    Settings {
        raven_cfg_present: true,
        enable_l3_tunnel: true,
        enable_l7_proxy: false,
        vxlan_port: crate::topology::VXLAN_PORT,
        vpn_driver: Default::default(),
    }
}

/// The `.yaml`/`.yml` files of `dir` as (file name, text), sorted by name:
/// what the manifest loader reads from a directory.
pub fn yaml_dir(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (name, text)
        })
        .collect()
}
