//! The gateway tunnel: WireGuard between the active gateway nodes of the
//! domains, userspace (wireguard-go, driven over its UAPI socket).
//!
//! Reachability follows Raven: a gateway not under NAT is dialled at its
//! public address; a NATed gateway dials the public ones and reaches other
//! NATed gateways through its relay (a public gateway chosen by the hub, see
//! `GatewayView.relay`), whose peer entry carries their prefixes. Changes
//! are applied as a minimal UAPI diff: the device is never recreated and
//! unchanged peers are never touched, so their handshakes survive.

pub mod keys;
pub mod uapi;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use raven_core::topology::{GatewayView, PeerInfo, TUNNEL_PORT};
use raven_core::{GatewayName, NodeName};

use crate::dataplane::model::{NodeInputs, active_node};
use keys::KeyPair;

/// Persistent keepalive a NATed gateway sends to keep its mapping open.
pub const NAT_KEEPALIVE: u16 = 25;

/// One WireGuard peer as raven wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: NodeName,
    pub gateway: GatewayName,
    /// `None`: the peer dials us (it is under NAT and not yet observed).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive: u16,
    /// Other NATed gateways reached through this peer (it is our relay).
    pub relays_for: Vec<GatewayName>,
}

/// The tunnel device as raven wants it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelSpec {
    pub listen_port: u16,
    /// By public key, hex.
    pub peers: BTreeMap<String, PeerSpec>,
    pub warnings: Vec<String>,
}

fn prefixes(g: &GatewayView) -> BTreeSet<IpNet> {
    raven_core::compile::gateway_prefixes(g).collect()
}

/// The tunnel this node must run: `None` unless it is its domain's active
/// gateway. Pure.
pub fn spec(inputs: &NodeInputs, peers: &[PeerInfo]) -> Option<TunnelSpec> {
    let me = inputs.me.as_ref()?;
    let my_gw = inputs
        .gateways
        .iter()
        .find(|g| Some(&g.name) == me.gateway.as_ref())?;
    if active_node(my_gw, &inputs.active_override) != Some(&me.name) {
        return None;
    }
    let mut out = TunnelSpec {
        listen_port: my_gw
            .tunnel_candidates
            .iter()
            .find(|c| c.node == me.name)
            .map_or(TUNNEL_PORT, |c| c.port),
        ..Default::default()
    };
    let key_of = |node: &NodeName| {
        peers
            .iter()
            .find(|p| &p.node == node)
            .and_then(|p| p.wireguard_public_key.as_deref())
            .and_then(keys::base64_to_hex)
    };
    let mut relayed: Vec<&GatewayView> = Vec::new();
    for other in inputs.gateways.iter().filter(|g| g.name != my_gw.name) {
        let Some(node) = active_node(other, &inputs.active_override) else {
            continue;
        };
        if my_gw.under_nat && other.under_nat {
            relayed.push(other);
            continue;
        }
        let Some(key) = key_of(node) else {
            out.warnings.push(format!(
                "gateway {} ({node}) has not reported a WireGuard key yet",
                other.name
            ));
            continue;
        };
        let endpoint = if other.under_nat {
            peers
                .iter()
                .find(|p| &p.node == node)
                .and_then(|p| p.observed_endpoint)
        } else {
            other
                .tunnel_candidates
                .iter()
                .chain(other.active_tunnel.iter())
                .find(|c| &c.node == node)
                .and_then(|c| {
                    let ip: IpAddr = c.public_ip?;
                    Some(SocketAddr::new(ip, c.public_port.unwrap_or(c.port)))
                })
        };
        out.peers.insert(
            key,
            PeerSpec {
                node: node.clone(),
                gateway: other.name.clone(),
                endpoint,
                allowed_ips: prefixes(other),
                keepalive: if my_gw.under_nat { NAT_KEEPALIVE } else { 0 },
                relays_for: Vec::new(),
            },
        );
    }
    if !relayed.is_empty() {
        let relay = my_gw
            .relay
            .as_ref()
            .and_then(|r| out.peers.values_mut().find(|p| &p.gateway == r));
        match relay {
            Some(peer) => {
                for g in relayed {
                    peer.allowed_ips.extend(prefixes(g));
                    peer.relays_for.push(g.name.clone());
                }
            }
            None => out.warnings.push(format!(
                "no relay gateway is reachable; NATed gateways {} are unreachable",
                relayed
                    .iter()
                    .map(|g| g.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    Some(out)
}

/// The UAPI `set` body that turns `have` into `want` touching nothing else:
/// unchanged peers are not mentioned, a learned endpoint is kept when the
/// spec has none. Empty when nothing differs. Pure.
pub fn diff(want: &TunnelSpec, private_key_hex: &str, have: &uapi::DeviceState) -> String {
    let mut body = String::new();
    if have.private_key_hex != private_key_hex {
        body.push_str(&format!("private_key={private_key_hex}\n"));
    }
    if have.listen_port != want.listen_port {
        body.push_str(&format!("listen_port={}\n", want.listen_port));
    }
    for key in have.peers.keys().filter(|k| !want.peers.contains_key(*k)) {
        body.push_str(&format!("public_key={key}\nremove=true\n"));
    }
    for (key, p) in &want.peers {
        let want_ips: BTreeSet<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        let current = have.peers.get(key);
        let endpoint_changed =
            p.endpoint.is_some() && current.and_then(|c| c.endpoint) != p.endpoint;
        let ips_changed = current.map(|c| c.allowed_ips.iter().cloned().collect::<BTreeSet<_>>())
            != Some(want_ips.clone());
        let keepalive_changed = current.map(|c| c.keepalive) != Some(p.keepalive);
        if current.is_some() && !endpoint_changed && !ips_changed && !keepalive_changed {
            continue;
        }
        body.push_str(&format!("public_key={key}\n"));
        if let Some(e) = p.endpoint.filter(|_| endpoint_changed) {
            body.push_str(&format!("endpoint={e}\n"));
        }
        if keepalive_changed {
            body.push_str(&format!("persistent_keepalive_interval={}\n", p.keepalive));
        }
        if ips_changed {
            body.push_str("replace_allowed_ips=true\n");
            for ip in &want_ips {
                body.push_str(&format!("allowed_ip={ip}\n"));
            }
        }
    }
    body
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Uapi(#[from] uapi::UapiError),
    #[error("starting wireguard-go for {dev}: {source}")]
    Spawn { dev: String, source: std::io::Error },
    #[error("wireguard-go did not open {path} within 5 s (see {log})")]
    NoSocket { path: PathBuf, log: PathBuf },
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
}

/// The userspace WireGuard device of this node.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub dev: String,
    data_dir: PathBuf,
    pub keys: KeyPair,
}

impl Tunnel {
    /// Loads (or creates) the node's key.
    pub fn new(dev: impl Into<String>, data_dir: &Path) -> Result<Self, TunnelError> {
        Ok(Self {
            dev: dev.into(),
            data_dir: data_dir.to_owned(),
            keys: KeyPair::load_or_create(data_dir)?,
        })
    }

    /// File holding the PID of the wireguard-go this node started.
    pub fn pid_file(&self) -> PathBuf {
        self.data_dir.join(format!("wireguard-go-{}.pid", self.dev))
    }

    /// Adopts a running device or starts wireguard-go in its own session
    /// (so stopping the agent leaves it, and the tunnel, running).
    pub async fn ensure_device(&self, mtu: u32) -> Result<(), TunnelError> {
        if uapi::get(&self.dev).await.is_err() {
            let log = self.data_dir.join(format!("wireguard-go-{}.log", self.dev));
            let err = |source| TunnelError::Spawn {
                dev: self.dev.clone(),
                source,
            };
            let stderr = std::fs::File::create(&log).map_err(err)?;
            let child = std::process::Command::new("setsid")
                .args(["wireguard-go", "-f", &self.dev])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(err)?;
            std::fs::write(self.pid_file(), child.id().to_string()).map_err(err)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while uapi::get(&self.dev).await.is_err() {
                if tokio::time::Instant::now() > deadline {
                    return Err(TunnelError::NoSocket {
                        path: uapi::socket_path(&self.dev),
                        log,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!(dev = %self.dev, pid = child.id(), "started wireguard-go");
        }
        crate::dataplane::netlink::set_link_up(&self.dev, mtu).await?;
        Ok(())
    }

    /// Applies `spec` as a minimal diff; returns the number of UAPI lines sent.
    pub async fn apply(&self, spec: &TunnelSpec) -> Result<usize, TunnelError> {
        let have = uapi::get(&self.dev).await?;
        let body = diff(spec, &self.keys.private_hex(), &have);
        if body.is_empty() {
            return Ok(0);
        }
        uapi::set(&self.dev, &body).await?;
        Ok(body.lines().count())
    }

    /// Per-peer state for reports and metrics.
    pub async fn peer_states(&self, spec: &TunnelSpec) -> Vec<raven_proto::v1::PeerTunnelState> {
        let Ok(have) = uapi::get(&self.dev).await else {
            return Vec::new();
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        spec.peers
            .iter()
            .filter_map(|(k, p)| {
                let s = have.peers.get(k)?;
                Some(raven_proto::v1::PeerTunnelState {
                    peer_node: p.node.to_string(),
                    handshake_age_seconds: (s.last_handshake_sec > 0)
                        .then(|| now.saturating_sub(s.last_handshake_sec)),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    endpoint: s.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    relayed: false,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_core::topology::{EndpointType, ExposeType, GatewayEndpoint, Member, NodeView};

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap_or_else(|_| unreachable!())
    }

    fn gw(
        name: &str,
        node: &str,
        nat: bool,
        public: Option<&str>,
        subnet: &str,
        relay: Option<&str>,
    ) -> GatewayView {
        let ep = GatewayEndpoint {
            node: n(node),
            type_: EndpointType::Tunnel,
            port: 4500,
            under_nat: nat,
            nat_type: String::new(),
            public_ip: public.and_then(|p| p.parse().ok()),
            public_port: None,
            config: Default::default(),
        };
        GatewayView {
            name: GatewayName::new(name).unwrap_or_else(|_| unreachable!()),
            expose_type: ExposeType::None,
            under_nat: nat,
            members: vec![Member {
                node: n(node),
                private_ip: "10.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                subnets: vec![subnet.parse().unwrap_or_default()],
                ready: true,
            }],
            active_tunnel: Some(ep.clone()),
            tunnel_candidates: vec![ep],
            active_proxies: vec![],
            extra_source_cidrs: vec![],
            relay: relay.map(|r| GatewayName::new(r).unwrap_or_else(|_| unreachable!())),
        }
    }

    fn peer(node: &str, gateway: &str, key: &str) -> PeerInfo {
        PeerInfo {
            node: n(node),
            gateway: GatewayName::new(gateway).unwrap_or_else(|_| unreachable!()),
            wireguard_public_key: Some(key.into()),
            tunnel_port: Some(4500),
            observed_endpoint: None,
        }
    }

    fn inputs(me: &str, my_gw: &str) -> NodeInputs {
        NodeInputs {
            me: Some(NodeView {
                name: n(me),
                gateway: Some(GatewayName::new(my_gw).unwrap_or_else(|_| unreachable!())),
                private_ip: None,
                subnets: vec![],
                tunnel_active: true,
                tunnel_candidate: true,
                proxy_active: false,
            }),
            gateways: vec![
                gw(
                    "gw-cloud",
                    "c1",
                    false,
                    Some("198.51.100.1"),
                    "10.1.0.0/24",
                    None,
                ),
                gw("gw-hz", "h1", true, None, "10.2.0.0/24", Some("gw-cloud")),
                gw("gw-qd", "q1", true, None, "10.3.0.0/24", Some("gw-cloud")),
            ],
            settings: None,
            active_override: BTreeMap::new(),
            underlay_mtu: 1500,
            tunnel_dev: "raven-wg0".into(),
            tunnel_up: false,
        }
    }

    fn peers() -> Vec<PeerInfo> {
        vec![
            peer("c1", "gw-cloud", KEY_A),
            peer("h1", "gw-hz", KEY_B),
            peer("q1", "gw-qd", KEY_C),
        ]
    }

    #[test]
    fn natted_gateway_reaches_other_natted_gateways_through_its_relay() {
        let s = spec(&inputs("h1", "gw-hz"), &peers()).unwrap_or_default();
        assert_eq!(s.peers.len(), 1, "only the public relay is a direct peer");
        let relay = s
            .peers
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| unreachable!());
        assert_eq!(relay.endpoint, "198.51.100.1:4500".parse().ok());
        assert_eq!(relay.keepalive, NAT_KEEPALIVE);
        let ips: Vec<String> = relay.allowed_ips.iter().map(ToString::to_string).collect();
        assert!(
            ips.contains(&"10.1.0.0/24".to_owned()) && ips.contains(&"10.3.0.0/24".to_owned()),
            "{ips:?}"
        );
    }

    #[test]
    fn public_relay_peers_with_every_natted_gateway_without_endpoints() {
        let s = spec(&inputs("c1", "gw-cloud"), &peers()).unwrap_or_default();
        assert_eq!(s.peers.len(), 2);
        assert!(
            s.peers
                .values()
                .all(|p| p.endpoint.is_none() && p.keepalive == 0)
        );
    }

    #[test]
    fn a_node_that_is_not_the_active_gateway_runs_no_tunnel() {
        let mut i = inputs("h1", "gw-hz");
        i.active_override.insert(
            GatewayName::new("gw-hz").unwrap_or_else(|_| unreachable!()),
            n("h2"),
        );
        assert!(spec(&i, &peers()).is_none());
    }

    #[test]
    fn unchanged_peers_are_not_touched_and_a_new_endpoint_is_a_one_peer_diff() {
        let mut s = spec(&inputs("h1", "gw-hz"), &peers()).unwrap_or_default();
        let key = s.peers.keys().next().cloned().unwrap_or_default();
        let p = &s.peers[&key];
        let have = uapi::DeviceState {
            private_key_hex: "aa".into(),
            listen_port: 4500,
            peers: [(
                key.clone(),
                uapi::PeerState {
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                    keepalive: p.keepalive,
                    ..Default::default()
                },
            )]
            .into(),
        };
        assert_eq!(diff(&s, "aa", &have), "");
        if let Some(p) = s.peers.get_mut(&key) {
            p.endpoint = "198.51.100.9:4500".parse().ok();
        }
        assert_eq!(
            diff(&s, "aa", &have),
            format!("public_key={key}\nendpoint=198.51.100.9:4500\n")
        );
    }
}
