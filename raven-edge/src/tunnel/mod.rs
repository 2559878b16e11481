//! The gateway tunnel: WireGuard between the active gateway nodes of the
//! domains — the kernel's where it exists, userspace (wireguard-go, driven
//! over its UAPI socket) otherwise; see [`backend`].
//!
//! Reachability follows Raven: a gateway not under NAT is dialled at its
//! public address; a NATed gateway dials the public ones and reaches other
//! NATed gateways through its relay (a public gateway chosen by the hub, see
//! `GatewayView.relay`), whose peer entry carries their prefixes. Changes
//! are applied as a minimal UAPI diff: the device is never recreated and
//! unchanged peers are never touched, so their handshakes survive. The
//! diff is a value ([`Change`]), rendered per backend (see [`change`]).
//!
//! **Direct paths between NATed gateways run on a second device**
//! ([`direct_spec`], named by [`direct_dev`], its own key and port). In
//! WireGuard a peer's allowed IPs are both the outbound route and the inbound
//! filter, and one prefix belongs to one peer of a device. On one device, a
//! gateway moving another NATed domain's prefixes from the relay to the
//! direct peer would drop everything that domain still sends through the
//! relay (and the other way round) until both sides have moved — 0 to 30+
//! packets at 20 pps, depending on how far apart the two decide. With two
//! devices the relay's peer (main device) and the direct peer (direct
//! device) both hold the prefixes, so both paths are accepted at all times,
//! and which one carries outbound traffic is a kernel route
//! ([`crate::dataplane::model::DirectRoutes`]): each side moves on its own,
//! in either direction, without loss. The direct device also dials the
//! relay (no prefixes), whose handshakes tell the hub its NAT mapping; the
//! relay holds that key as an [`PeerPath::Observe`] peer.

pub mod backend;
pub mod change;
pub mod kernel;
pub mod keys;
pub mod uapi;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use raven_model::topology::{GatewayView, PeerInfo};
use raven_model::{GatewayName, NodeName};

use crate::dataplane::model::NodeInputs;
use crate::reach::Reach;
pub use change::{Change, PeerChange};
use keys::{Key, KeyPair};

/// Persistent keepalive a NATed gateway sends to keep its mapping open.
pub const NAT_KEEPALIVE: u16 = 25;
/// Persistent keepalive of every peer that carries prefixes (active
/// gateways, the relay, direct NAT-to-NAT paths), both ways: an idle live
/// gateway is heard every second, so one that stops is noticed within
/// [`crate::failover::SILENCE_SECS`] — a direct path then hands its prefixes
/// back to the relay, and with the hub unreachable a remote domain's
/// prefixes follow the candidate that took over (see [`crate::failover`]).
/// It costs one 32-byte packet per second per idle peer.
pub const LIVE_KEEPALIVE: u16 = 1;

/// One WireGuard peer as raven wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: NodeName,
    pub gateway: GatewayName,
    /// `None`: the peer dials us (it is under NAT and not yet observed).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive: u16,
    /// Active nodes of other NATed gateways reached through this peer (it
    /// is our relay).
    pub relays_for: Vec<NodeName>,
    pub path: PeerPath,
}

/// Why a peer is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// The active tunnel node of another gateway.
    Active,
    /// Another tunnel candidate of a gateway: no prefixes until it becomes
    /// the one its domain uses (local failover).
    Standby,
    /// A NATed gateway reached straight through both NATs at the observed
    /// endpoint of its direct-path device (on this node's direct device).
    Direct,
    /// No prefixes, both ways between a NATed gateway's direct device and its
    /// relay: the relay sees where the device's traffic comes from (its NAT
    /// mapping, which the hub passes on).
    Observe,
}

/// The tunnel device as raven wants it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelSpec {
    pub listen_port: u16,
    /// By public key.
    pub peers: BTreeMap<Key, PeerSpec>,
    pub warnings: Vec<String>,
}

impl TunnelSpec {
    /// Adds a peer under its public key — unless another node already holds
    /// that key here: a key names one node, and two gateways merged onto one
    /// peer would leave one domain's prefixes on no peer at all. The first
    /// keeps it; the other is left out with a warning.
    fn add_peer(&mut self, key: Key, peer: PeerSpec) {
        match self.peers.get(&key) {
            Some(held) if held.node != peer.node => self.warnings.push(format!(
                "{} ({}) reports the WireGuard key of {} ({}); it is left out",
                peer.node, peer.gateway, held.node, held.gateway
            )),
            _ => {
                self.peers.insert(key, peer);
            }
        }
    }
}

fn prefixes(g: &GatewayView) -> BTreeSet<IpNet> {
    g.prefixes().collect()
}

/// The name of the direct-path device that goes with tunnel device `dev`.
pub fn direct_dev(dev: &str) -> String {
    format!("{dev}d")
}

/// The UDP port of the direct-path device next to a tunnel on `port`.
pub fn direct_port(port: u16) -> u16 {
    port.checked_add(1).unwrap_or(0)
}

/// The tunnel this node must run: `None` unless it is a tunnel candidate of
/// its gateway. A candidate that is not the active one runs the device with
/// no peers (a warm standby whose key the hub already knows; a node that
/// stops being active drops its peers so the other side follows the new
/// active node). Pure.
///
/// Other NATed gateways are always reached through the relay on this
/// device; a direct path to them runs beside it on the direct device (see
/// the module documentation).
pub fn spec(inputs: &NodeInputs, peers: &[PeerInfo]) -> Option<TunnelSpec> {
    let reach = Reach::of(inputs)?;
    let my_gw = reach.gateway;
    let mut out = TunnelSpec {
        listen_port: reach.endpoint.port,
        ..Default::default()
    };
    if !reach.active {
        return Some(out);
    }
    let info = |node: &NodeName| peers.iter().find(|p| &p.node == node);
    let key_of = |node: &NodeName| {
        info(node)
            .and_then(|p| p.wireguard_public_key.as_deref())
            .and_then(Key::from_base64)
    };
    for &(other, active) in &reach.others {
        if reach.through_relay(other) {
            continue;
        }
        // The direct device of a NATed gateway I relay for dials me.
        if other.relay.as_ref() == Some(&my_gw.name)
            && let Some(key) = info(active)
                .and_then(|p| p.direct.as_ref())
                .and_then(|d| Key::from_base64(&d.public_key))
        {
            out.add_peer(
                key,
                PeerSpec {
                    node: active.clone(),
                    gateway: other.name.clone(),
                    endpoint: None,
                    allowed_ips: BTreeSet::new(),
                    keepalive: 0,
                    relays_for: Vec::new(),
                    path: PeerPath::Observe,
                },
            );
        }
        // Every candidate is a peer; only the active one carries prefixes.
        // A standby that starts handshaking is the node its domain failed
        // over to (see `crate::failover`).
        let mut seen = BTreeSet::new();
        for cand in &other.tunnel_candidates {
            if !seen.insert(&cand.node) {
                continue;
            }
            let is_active = &cand.node == active;
            let Some(key) = key_of(&cand.node) else {
                if is_active {
                    out.warnings.push(format!(
                        "gateway {} ({active}) has not reported a WireGuard key yet",
                        other.name
                    ));
                }
                continue;
            };
            let endpoint = if other.under_nat {
                info(&cand.node).and_then(|p| p.observed_endpoint)
            } else {
                cand.public_ip
                    .map(|ip| SocketAddr::new(ip, cand.public_port.unwrap_or(cand.port)))
            };
            let keepalive = if is_active {
                LIVE_KEEPALIVE
            } else if my_gw.under_nat || endpoint.is_some() {
                NAT_KEEPALIVE
            } else {
                0
            };
            out.add_peer(
                key,
                PeerSpec {
                    node: cand.node.clone(),
                    gateway: other.name.clone(),
                    endpoint,
                    allowed_ips: if is_active {
                        prefixes(other)
                    } else {
                        BTreeSet::new()
                    },
                    keepalive,
                    relays_for: Vec::new(),
                    path: if is_active {
                        PeerPath::Active
                    } else {
                        PeerPath::Standby
                    },
                },
            );
        }
    }
    let relayed = reach.relayed();
    if !relayed.is_empty() {
        let relay = reach.relay.and_then(|(_, n)| {
            out.peers
                .values_mut()
                .find(|p| &p.node == n && p.path == PeerPath::Active)
        });
        match relay {
            Some(peer) => {
                for (g, n) in relayed {
                    peer.allowed_ips.extend(prefixes(g));
                    peer.relays_for.push(n.clone());
                }
            }
            None => out.warnings.push(Reach::no_relay_warning(&relayed)),
        }
    }
    Some(out)
}

/// The direct-path device this node must run: `None` unless it is a tunnel
/// candidate of a NATed gateway; without peers unless it is the active one.
/// The active node's device dials its relay (no prefixes: the relay sees the
/// device's NAT mapping and reports it) and holds, for every other NATed
/// gateway whose active node's direct device has an observed endpoint, that
/// device at that endpoint with the gateway's prefixes — accepted inbound at
/// all times; kernel routes decide when it carries outbound traffic (see
/// the module documentation). Pure.
pub fn direct_spec(inputs: &NodeInputs, peers: &[PeerInfo]) -> Option<TunnelSpec> {
    let reach = Reach::of(inputs)?;
    if !reach.gateway.under_nat {
        return None;
    }
    let mut out = TunnelSpec {
        listen_port: direct_port(reach.endpoint.port),
        ..Default::default()
    };
    if !reach.active {
        return Some(out);
    }
    let info = |node: &NodeName| peers.iter().find(|p| &p.node == node);
    if let Some((relay, node)) = reach.relay
        && let Some(key) = info(node)
            .and_then(|p| p.wireguard_public_key.as_deref())
            .and_then(Key::from_base64)
    {
        let endpoint = relay
            .tunnel_candidates
            .iter()
            .find(|c| &c.node == node)
            .and_then(|c| {
                c.public_ip
                    .map(|ip| SocketAddr::new(ip, c.public_port.unwrap_or(c.port)))
            });
        out.add_peer(
            key,
            PeerSpec {
                node: node.clone(),
                gateway: relay.name.clone(),
                endpoint,
                allowed_ips: BTreeSet::new(),
                keepalive: NAT_KEEPALIVE,
                relays_for: Vec::new(),
                path: PeerPath::Observe,
            },
        );
    }
    for &(other, active) in reach.others.iter().filter(|(g, _)| g.under_nat) {
        let Some(device) = info(active).and_then(|p| p.direct.as_ref()) else {
            continue;
        };
        let (Some(endpoint), Some(key)) = (
            device.observed_endpoint,
            Key::from_base64(&device.public_key),
        ) else {
            continue;
        };
        out.add_peer(
            key,
            PeerSpec {
                node: active.clone(),
                gateway: other.name.clone(),
                endpoint: Some(endpoint),
                allowed_ips: prefixes(other),
                keepalive: LIVE_KEEPALIVE,
                relays_for: Vec::new(),
                path: PeerPath::Direct,
            },
        );
    }
    Some(out)
}

/// The change that turns `have` into `want` touching nothing else:
/// unchanged peers are not mentioned, a learned endpoint is kept when the
/// spec has none. Empty when nothing differs. Pure.
pub fn diff(want: &TunnelSpec, private_key: keys::Secret, have: &uapi::DeviceState) -> Change {
    let mut change = Change {
        private_key: (have.private_key != Some(private_key)).then_some(private_key),
        listen_port: (have.listen_port != want.listen_port).then_some(want.listen_port),
        peers: Vec::new(),
    };
    for key in have.peers.keys().filter(|k| !want.peers.contains_key(*k)) {
        change.peers.push(PeerChange::removal(*key));
    }
    for (key, p) in &want.peers {
        let current = have.peers.get(key);
        let endpoint_changed =
            p.endpoint.is_some() && current.and_then(|c| c.endpoint) != p.endpoint;
        let ips_changed = current
            .map(|c| c.allowed_ips.iter().copied().collect::<BTreeSet<_>>())
            .as_ref()
            != Some(&p.allowed_ips);
        let keepalive_changed = current.map(|c| c.keepalive) != Some(p.keepalive);
        if current.is_some() && !endpoint_changed && !ips_changed && !keepalive_changed {
            continue;
        }
        let mut peer = PeerChange::new(*key);
        peer.endpoint = p.endpoint.filter(|_| endpoint_changed);
        peer.keepalive = keepalive_changed.then_some(p.keepalive);
        if ips_changed {
            peer = peer.replace_allowed_ips(p.allowed_ips.iter().copied());
        }
        change.peers.push(peer);
    }
    change
}

/// The gateways whose routes go into the direct-path device `spec`
/// describes: those of its direct peers that `alive` (the paths local
/// failover found handshaking and heard) names. Pure.
pub fn direct_gateways(spec: &TunnelSpec, alive: &BTreeSet<NodeName>) -> BTreeSet<GatewayName> {
    spec.peers
        .values()
        .filter(|p| p.path == PeerPath::Direct && alive.contains(&p.node))
        .map(|p| p.gateway.clone())
        .collect()
}

/// After this long without a first handshake, a peer this node dials is
/// re-added once (see [`Nudges`]).
pub const FIRST_HANDSHAKE_GRACE: Duration = Duration::from_millis(1500);

/// One-time nudges for peers this node dials that have never completed a
/// handshake. A gateway's first initiation often reaches a peer that does
/// not know its key yet (both learn each other's keys from the hub at about
/// the same time) and is dropped; WireGuard retries only after 5 s. Re-adding
/// such a peer, unchanged, makes WireGuard initiate again at once. Each peer
/// is nudged at most once; a peer without a session loses nothing.
#[derive(Debug, Default)]
pub struct Nudges {
    /// Public key → when it was first seen without a handshake, and
    /// whether it was nudged.
    seen: BTreeMap<Key, (std::time::Instant, bool)>,
}

impl Nudges {
    /// The change that re-adds the peers due a nudge now (empty when none):
    /// for each, its removal and then the peer as it was. Pure but for the
    /// clock it is given.
    pub fn due(&mut self, have: &uapi::DeviceState, now: std::time::Instant) -> Change {
        self.seen
            .retain(|k, _| have.peers.get(k).is_some_and(|p| p.last_handshake_sec == 0));
        let mut change = Change::default();
        for (key, p) in &have.peers {
            let dials = p.endpoint.is_some() && p.keepalive > 0;
            if !dials || p.last_handshake_sec != 0 {
                continue;
            }
            let (since, nudged) = self.seen.entry(*key).or_insert((now, false));
            if *nudged || now.duration_since(*since) < FIRST_HANDSHAKE_GRACE {
                continue;
            }
            *nudged = true;
            change.peers.push(PeerChange::removal(*key));
            let mut again = PeerChange::new(*key)
                .keepalive(p.keepalive)
                .replace_allowed_ips(p.allowed_ips.iter().copied());
            again.endpoint = p.endpoint;
            change.peers.push(again);
        }
        change
    }
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
    #[error(
        "--wireguard-go=external: no wireguard-go answers on {path} for {dev} within 5 s (in Kubernetes: is the raven-wireguard DaemonSet's pod running on this node, with the same device names?)"
    )]
    NoExternalWireguardGo { dev: String, path: PathBuf },
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelWgError),
    #[error(
        "the direct-path device name {dev} is longer than 15 bytes: choose a --tunnel-dev of at most 14"
    )]
    DeviceName { dev: String },
    #[error(
        "--wireguard=kernel: this kernel has no WireGuard (module not loaded and a wireguard link cannot be created)"
    )]
    NoKernelWireGuard,
}

/// The WireGuard device of this node.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub dev: String,
    data_dir: PathBuf,
    pub keys: KeyPair,
    pub backend: backend::Backend,
    /// Who starts wireguard-go (userspace backend only).
    pub wireguard_go: backend::WireguardGo,
}

impl Tunnel {
    /// Loads (or creates) the node's key.
    pub fn new(
        dev: impl Into<String>,
        data_dir: &Path,
        backend: backend::Backend,
    ) -> Result<Self, TunnelError> {
        Ok(Self {
            dev: dev.into(),
            data_dir: data_dir.to_owned(),
            keys: KeyPair::load_or_create(data_dir)?,
            backend,
            wireguard_go: backend::WireguardGo::Spawn,
        })
    }

    /// The same tunnel with wireguard-go run by `who`.
    #[must_use]
    pub fn with_wireguard_go(mut self, who: backend::WireguardGo) -> Self {
        self.wireguard_go = who;
        self
    }

    /// The direct-path device that goes with this tunnel ([`direct_dev`]),
    /// with a key of its own.
    pub fn direct(&self) -> Result<Self, TunnelError> {
        let dev = direct_dev(&self.dev);
        if dev.len() > 15 {
            return Err(TunnelError::DeviceName { dev });
        }
        Ok(Self {
            dev,
            data_dir: self.data_dir.clone(),
            keys: KeyPair::load_or_create_named(&self.data_dir, "wireguard-direct.key")?,
            backend: self.backend,
            wireguard_go: self.wireguard_go,
        })
    }

    /// File holding the PID of the wireguard-go this node started.
    pub fn pid_file(&self) -> PathBuf {
        self.data_dir.join(format!("wireguard-go-{}.pid", self.dev))
    }

    /// Adopts the device or creates it: a kernel WireGuard link, or
    /// wireguard-go started in its own session (so stopping the agent leaves
    /// it, and the tunnel, running).
    /// `address`, the node's own, is given to the device with host scope
    /// (see [`crate::dataplane::netlink::ensure_host_address`]).
    pub async fn ensure_device(
        &self,
        mtu: u32,
        address: Option<std::net::Ipv4Addr>,
    ) -> Result<(), TunnelError> {
        if self.backend == backend::Backend::Kernel {
            if self.backend.get(&self.dev).await.is_err() {
                kernel::create(&self.dev).await?;
                tracing::info!(dev = %self.dev, "created a kernel WireGuard link");
            }
        } else if self.wireguard_go == backend::WireguardGo::External {
            self.wait_for_external().await?;
        } else if uapi::get(&self.dev).await.is_err() {
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
        if let Some(ip) = address {
            crate::dataplane::netlink::ensure_host_address(&self.dev, ip).await?;
        }
        Ok(())
    }

    /// Waits (at most 5 s) until the wireguard-go someone else runs for
    /// this device answers on its UAPI socket; never starts one.
    async fn wait_for_external(&self) -> Result<(), TunnelError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while uapi::get(&self.dev).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                return Err(TunnelError::NoExternalWireguardGo {
                    dev: self.dev.clone(),
                    path: uapi::socket_path(&self.dev),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The change that applying `spec` to the device as it is (`have`)
    /// would make. Pure.
    pub fn change(&self, spec: &TunnelSpec, have: &uapi::DeviceState) -> Change {
        diff(spec, self.keys.private_key(), have)
    }

    /// Applies `spec` as a minimal diff; returns the change made (empty
    /// when the device already matched).
    pub async fn apply(&self, spec: &TunnelSpec) -> Result<Change, TunnelError> {
        let have = self.backend.get(&self.dev).await?;
        let change = self.change(spec, &have);
        if !change.is_empty() {
            self.backend.set(&self.dev, &change).await?;
        }
        Ok(change)
    }

    /// Re-adds, once, the peers this node dials that never handshook (see
    /// [`Nudges`]); returns how many.
    pub async fn nudge(&self, nudges: &mut Nudges) -> Result<usize, TunnelError> {
        let Ok(have) = self.backend.get(&self.dev).await else {
            return Ok(0);
        };
        let change = nudges.due(&have, std::time::Instant::now());
        if change.is_empty() {
            return Ok(0);
        }
        self.backend.set(&self.dev, &change).await?;
        Ok(change.removals())
    }

    /// The device as it is now; `None` when there is none (or it does not
    /// answer).
    pub async fn device_state(&self) -> Option<uapi::DeviceState> {
        self.backend.get(&self.dev).await.ok()
    }
}

/// The rows of both devices as one view of the paths in use: a NATed peer
/// routed onto the direct device (`direct_nodes`) shows its direct row
/// instead of its relayed one; direct rows of paths not in use, and the
/// direct device's own row for its relay, are left out. Pure.
pub fn merge_paths(
    mut main: Vec<raven_proto::v1::PeerTunnelState>,
    direct: Vec<raven_proto::v1::PeerTunnelState>,
    direct_nodes: &BTreeSet<NodeName>,
) -> Vec<raven_proto::v1::PeerTunnelState> {
    for row in direct {
        if row.direct_device || !direct_nodes.iter().any(|n| n.as_str() == row.peer_node) {
            continue;
        }
        main.retain(|r| r.peer_node != row.peer_node);
        main.push(row);
    }
    main.sort_by(|a, b| a.peer_node.cmp(&b.peer_node));
    main
}

/// Per-peer state for reports and metrics, sorted by peer node: every
/// configured peer, and every gateway reached through a relay (with the
/// relay's endpoint and handshake, marked relayed). Pure.
pub fn peer_states(
    spec: &TunnelSpec,
    have: &uapi::DeviceState,
    now_unix: u64,
) -> Vec<raven_proto::v1::PeerTunnelState> {
    let mut out = Vec::new();
    for (k, p) in &spec.peers {
        let Some(s) = have.peers.get(k) else { continue };
        let state = raven_proto::v1::PeerTunnelState {
            peer_node: p.node.to_string(),
            handshake_age_seconds: (s.last_handshake_sec > 0)
                .then(|| now_unix.saturating_sub(s.last_handshake_sec)),
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
            endpoint: s.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            relayed: false,
            direct_device: p.path == PeerPath::Observe,
            ..Default::default()
        };
        for node in &p.relays_for {
            out.push(raven_proto::v1::PeerTunnelState {
                peer_node: node.to_string(),
                relayed: true,
                rx_bytes: 0,
                tx_bytes: 0,
                ..state.clone()
            });
        }
        out.push(state);
    }
    out.sort_by(|a, b| a.peer_node.cmp(&b.peer_node));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures::{self, node as n};
    use raven_model::topology::{GatewayEndpoint, NodeView};

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn gw(
        name: &str,
        node: &str,
        nat: bool,
        public: Option<&str>,
        subnet: &str,
        relay: Option<&str>,
    ) -> GatewayView {
        let ep = GatewayEndpoint {
            under_nat: nat,
            public_ip: public.map(fixtures::ip),
            ..fixtures::endpoint(node, 4500)
        };
        GatewayView {
            under_nat: nat,
            members: vec![fixtures::member(node, "10.0.0.1", &[subnet])],
            active_tunnel: Some(ep.clone()),
            tunnel_candidates: vec![ep],
            relay: relay.map(fixtures::gateway_name),
            ..fixtures::gateway(name)
        }
    }

    fn peer(node: &str, gateway: &str, key: &str) -> PeerInfo {
        PeerInfo {
            wireguard_public_key: Some(key.into()),
            tunnel_port: Some(4500),
            ..fixtures::peer(node, gateway)
        }
    }

    fn inputs(me: &str, my_gw: &str) -> NodeInputs {
        NodeInputs {
            me: Some(NodeView {
                tunnel_active: true,
                tunnel_candidate: true,
                ..fixtures::node_view(me, Some(my_gw))
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
            ..Default::default()
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
        assert_eq!(
            relay.keepalive, LIVE_KEEPALIVE,
            "the relay carries prefixes: heard every second"
        );
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
                .all(|p| p.endpoint.is_none() && p.keepalive == LIVE_KEEPALIVE),
            "they dial us; once they have, we keep them hearing from us"
        );
    }

    const KEY_D: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

    /// The pod subnets among a peer's allowed IPs (the fixtures' member
    /// addresses are all 10.0.0.1).
    fn ips(p: &PeerSpec) -> Vec<String> {
        p.allowed_ips
            .iter()
            .filter(|n| n.prefix_len() < 32)
            .map(ToString::to_string)
            .collect()
    }

    fn by_node<'a>(s: &'a TunnelSpec, node: &str) -> &'a PeerSpec {
        s.peers
            .values()
            .find(|p| p.node.as_str() == node)
            .unwrap_or_else(|| panic!("no peer {node} in {s:?}"))
    }

    #[test]
    fn a_node_that_is_no_tunnel_candidate_runs_no_tunnel() {
        assert!(spec(&inputs("h7", "gw-hz"), &peers()).is_none());
    }

    #[test]
    fn standby_candidates_are_peers_without_prefixes_until_a_local_failover_picks_them() {
        let mut i = inputs("h1", "gw-hz");
        let cloud = &mut i.gateways[0];
        let mut c2 = cloud.tunnel_candidates[0].clone();
        c2.node = n("c2");
        c2.public_ip = "198.51.100.2".parse().ok();
        cloud.tunnel_candidates.push(c2);
        let mut all = peers();
        all.push(peer("c2", "gw-cloud", KEY_D));

        let s = spec(&i, &all).unwrap_or_default();
        let c2 = by_node(&s, "c2");
        assert_eq!(c2.path, PeerPath::Standby);
        assert!(c2.allowed_ips.is_empty());
        assert_eq!(c2.endpoint, "198.51.100.2:4500".parse().ok());
        assert_eq!(
            c2.keepalive, NAT_KEEPALIVE,
            "a standby is dialled to notice it"
        );
        assert!(ips(by_node(&s, "c1")).contains(&"10.3.0.0/24".to_owned()));

        // The cloud domain failed over to c2: its prefixes, and the relayed
        // qingdao prefixes, move there; c1 stays as a standby.
        i.active_override.insert(
            GatewayName::new("gw-cloud").unwrap_or_else(|_| unreachable!()),
            n("c2"),
        );
        let s = spec(&i, &all).unwrap_or_default();
        assert_eq!(
            ips(by_node(&s, "c2")),
            vec!["10.1.0.0/24", "10.3.0.0/24"],
            "c2 carries the cloud's and, as the relay, qingdao's prefixes"
        );
        assert!(by_node(&s, "c1").allowed_ips.is_empty());
    }

    const KEY_QD: &str = "DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDA=";
    const KEY_HD: &str = "HHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHA=";

    /// The fixture's peers with q1 and h1 running direct-path devices, q1's
    /// observed by the relay.
    fn peers_with_direct() -> Vec<PeerInfo> {
        let mut all = peers();
        all[1].direct = Some(raven_model::topology::DirectDevice {
            public_key: KEY_HD.into(),
            observed_endpoint: None,
        });
        all[2].direct = Some(raven_model::topology::DirectDevice {
            public_key: KEY_QD.into(),
            observed_endpoint: "192.0.2.30:4501".parse().ok(),
        });
        all
    }

    #[test]
    fn natted_gateways_keep_the_relay_on_the_tunnel_and_the_direct_path_on_the_direct_device() {
        let i = inputs("h1", "gw-hz");
        let all = peers_with_direct();
        let main = spec(&i, &all).unwrap_or_default();
        assert_eq!(main.peers.len(), 1, "only the relay");
        assert!(
            ips(by_node(&main, "c1")).contains(&"10.3.0.0/24".to_owned()),
            "the relay always holds qingdao's prefixes: its traffic is accepted there"
        );
        let direct = direct_spec(&i, &all).unwrap_or_default();
        assert_eq!(direct.listen_port, 4501);
        let q1 = by_node(&direct, "q1");
        assert_eq!(q1.path, PeerPath::Direct);
        assert_eq!(q1.endpoint, "192.0.2.30:4501".parse().ok());
        assert_eq!(q1.keepalive, LIVE_KEEPALIVE);
        assert_eq!(
            ips(q1),
            vec!["10.3.0.0/24"],
            "and so does the direct peer, from the start"
        );
        let relay = by_node(&direct, "c1");
        assert_eq!(relay.path, PeerPath::Observe);
        assert!(relay.allowed_ips.is_empty());
        assert_eq!(relay.endpoint, "198.51.100.1:4500".parse().ok());
        assert_eq!(relay.keepalive, NAT_KEEPALIVE);
    }

    #[test]
    fn a_relay_holds_the_direct_devices_of_its_natted_gateways_without_prefixes() {
        let s = spec(&inputs("c1", "gw-cloud"), &peers_with_direct()).unwrap_or_default();
        let observed: Vec<&PeerSpec> = s
            .peers
            .values()
            .filter(|p| p.path == PeerPath::Observe)
            .collect();
        assert_eq!(observed.len(), 2);
        assert!(
            observed
                .iter()
                .all(|p| p.allowed_ips.is_empty() && p.endpoint.is_none())
        );
        assert!(
            s.peers
                .contains_key(&Key::from_base64(KEY_QD).unwrap_or_else(|| unreachable!()))
        );
    }

    #[test]
    fn only_natted_candidates_run_a_direct_device_and_only_the_active_one_has_peers() {
        let all = peers_with_direct();
        assert!(direct_spec(&inputs("c1", "gw-cloud"), &all).is_none());
        let mut i = inputs("h1", "gw-hz");
        i.active_override.insert(
            GatewayName::new("gw-hz").unwrap_or_else(|_| unreachable!()),
            n("h2"),
        );
        let standby = direct_spec(&i, &all).unwrap_or_default();
        assert!(standby.peers.is_empty(), "{standby:?}");
    }

    #[test]
    fn two_gateways_reporting_one_key_are_never_merged_onto_one_peer() {
        // q1 reports h1's key: h1 keeps its peer and hangzhou's prefixes.
        let mut all = peers();
        all[2].wireguard_public_key = Some(KEY_B.into());
        let s = spec(&inputs("c1", "gw-cloud"), &all).unwrap_or_default();
        let h1 = &s.peers[&Key::from_base64(KEY_B).unwrap_or_else(|| unreachable!())];
        assert_eq!(h1.node, n("h1"));
        assert_eq!(s.peers.len(), 1);
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("q1") && w.contains("h1")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn the_paths_in_use_show_a_direct_row_only_for_nodes_routed_onto_it() {
        let row =
            |node: &str, relayed: bool, direct_device: bool| raven_proto::v1::PeerTunnelState {
                peer_node: node.into(),
                relayed,
                direct_device,
                ..Default::default()
            };
        let main = vec![row("c1", false, false), row("q1", true, false)];
        let direct = vec![row("c1", false, true), row("q1", false, false)];
        let merged = merge_paths(main.clone(), direct.clone(), &BTreeSet::new());
        assert_eq!(merged, main, "a direct path being tried is not in use");
        let merged = merge_paths(main, direct, &[n("q1")].into());
        assert_eq!(
            merged,
            vec![row("c1", false, false), row("q1", false, false)]
        );
    }

    #[test]
    fn relayed_gateways_are_reported_with_the_relays_endpoint() {
        let s = spec(&inputs("h1", "gw-hz"), &peers()).unwrap_or_default();
        let key = first_key(&s);
        let have = uapi::DeviceState {
            peers: [(
                key,
                uapi::PeerState {
                    endpoint: "198.51.100.1:4500".parse().ok(),
                    last_handshake_sec: 990,
                    rx_bytes: 7,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let states = peer_states(&s, &have, 1_000);
        let names: Vec<(&str, bool)> = states
            .iter()
            .map(|p| (p.peer_node.as_str(), p.relayed))
            .collect();
        assert_eq!(names, vec![("c1", false), ("q1", true)]);
        assert_eq!(states[1].endpoint, "198.51.100.1:4500");
        assert_eq!(states[1].handshake_age_seconds, Some(10));
    }

    fn first_key(s: &TunnelSpec) -> Key {
        s.peers
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| panic!("no peer in {s:?}"))
    }

    #[test]
    fn a_dialled_peer_without_a_first_handshake_is_re_added_once_after_the_grace() {
        let (aa, bb) = (Key([0xaa; 32]), Key([0xbb; 32]));
        let state = |hs: u64| uapi::DeviceState {
            peers: [
                (
                    aa,
                    uapi::PeerState {
                        endpoint: "198.51.100.1:4500".parse().ok(),
                        keepalive: 25,
                        allowed_ips: vec!["10.1.0.0/24".parse().unwrap_or_else(|_| unreachable!())],
                        last_handshake_sec: hs,
                        ..Default::default()
                    },
                ),
                (
                    // Dials us (no endpoint): never nudged.
                    bb,
                    uapi::PeerState::default(),
                ),
            ]
            .into(),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let mut n = Nudges::default();
        assert!(n.due(&state(0), t0).is_empty(), "within the grace");
        let later = t0 + FIRST_HANDSHAKE_GRACE;
        let nudge = n.due(&state(0), later);
        assert_eq!(
            nudge.peers,
            vec![
                PeerChange::removal(aa),
                PeerChange::new(aa)
                    .endpoint(
                        "198.51.100.1:4500"
                            .parse()
                            .unwrap_or_else(|_| unreachable!())
                    )
                    .keepalive(25)
                    .replace_allowed_ips(["10.1.0.0/24"
                        .parse()
                        .unwrap_or_else(|_| unreachable!())]),
            ],
            "removed and added back as it was"
        );
        assert_eq!(nudge.removals(), 1, "one peer nudged");
        assert!(
            n.due(&state(0), later + FIRST_HANDSHAKE_GRACE).is_empty(),
            "only once"
        );
        let mut fresh = Nudges::default();
        fresh.due(&state(5), t0);
        assert!(
            fresh.due(&state(5), later).is_empty(),
            "handshook: nothing to do"
        );
    }

    #[test]
    fn a_candidate_that_is_not_active_runs_the_device_without_peers() {
        let mut i = inputs("h1", "gw-hz");
        i.active_override.insert(
            GatewayName::new("gw-hz").unwrap_or_else(|_| unreachable!()),
            n("h2"),
        );
        assert_eq!(
            spec(&i, &peers()).map(|s| s.peers.len()),
            Some(0),
            "a standby runs the device without peers"
        );
    }

    #[test]
    fn unchanged_peers_are_not_touched_and_a_new_endpoint_is_a_one_peer_diff() {
        let mut s = spec(&inputs("h1", "gw-hz"), &peers()).unwrap_or_default();
        let key = first_key(&s);
        let p = &s.peers[&key];
        let private = keys::Secret(Key([0xaa; 32]));
        let have = uapi::DeviceState {
            private_key: Some(private),
            listen_port: 4500,
            peers: [(
                key,
                uapi::PeerState {
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.iter().rev().copied().collect(),
                    keepalive: p.keepalive,
                    ..Default::default()
                },
            )]
            .into(),
        };
        assert!(
            diff(&s, private, &have).is_empty(),
            "allowed IPs in any order"
        );
        if let Some(p) = s.peers.get_mut(&key) {
            p.endpoint = "198.51.100.9:4500".parse().ok();
        }
        let change = diff(&s, private, &have);
        assert_eq!(
            change,
            Change {
                peers: vec![
                    PeerChange::new(key).endpoint(
                        "198.51.100.9:4500"
                            .parse()
                            .unwrap_or_else(|_| unreachable!())
                    )
                ],
                ..Default::default()
            }
        );
        assert_eq!(
            change.to_uapi(),
            format!("public_key={}\nendpoint=198.51.100.9:4500\n", key.to_hex())
        );
        // A departed peer is a typed removal; a new device gets key and port.
        let mut gone = s.clone();
        gone.peers.clear();
        let change = diff(&gone, private, &uapi::DeviceState::default());
        assert_eq!(change.private_key, Some(private));
        assert_eq!(change.listen_port, Some(4500));
        assert_eq!(
            diff(&gone, private, &have).peers,
            vec![PeerChange::removal(key)]
        );
    }
}
