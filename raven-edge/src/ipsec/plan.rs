//! From the topology to the IKEv2 connections this node wants. Pure.
//!
//! One connection (one IKE_SA with one CHILD_SA) per pair of gateways, not
//! per pair of subnets: the CHILD_SA's traffic selectors list every prefix
//! of both domains, so 50 × 50 subnets are one SA pair, not 2,500.
//! Reachability follows the WireGuard tunnel (see [`crate::tunnel`]): a
//! gateway not under NAT is reached at its public address; a NATed one dials
//! the public ones — **the NATed side initiates**, it is the only side that
//! can — and reaches the other NATed gateways through its relay (the public
//! gateway the hub chose, `GatewayView.relay`), whose CHILD_SA carries their
//! prefixes as well. Between two public gateways, the one with the smaller
//! node name initiates, so exactly one IKE_SA is made per pair.
//!
//! Peers are authenticated by the raw Ed25519 public key each reported to
//! the hub (`PeerInfo.ipsec_public_key`), under the IKE identity of its node
//! name: no pre-shared key, no CA. A peer without a key is left out with a
//! warning.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use raven_model::topology::{GatewayView, PeerInfo};
use raven_model::{GatewayName, NodeName};

use crate::dataplane::model::{NodeInputs, active_node};

/// Every connection (and CHILD_SA) raven loads into charon is named with
/// this prefix; raven never touches one without it.
pub const CONN_PREFIX: &str = "raven-";

/// Dead peer detection interval: an idle peer is probed this often (it
/// also keeps a NAT mapping open), and one that stops answering is declared
/// dead after charon's retransmission schedule.
pub const DPD_DELAY_SECS: u32 = 10;

/// IKE proposal: AES-GCM-128, PRF SHA-256, X25519.
pub const IKE_PROPOSAL: &str = "aes128gcm16-prfsha256-x25519";
/// ESP proposal: AES-GCM-128 with X25519 PFS on rekey.
pub const ESP_PROPOSAL: &str = "aes128gcm16-x25519";

/// Bytes ESP-in-UDP adds to an IPv4 packet with AES-GCM-128: outer IPv4
/// (20), UDP (8), ESP header (8), IV (8), padding and trailer (up to 3 + 2),
/// ICV (16), rounded up. The inner MTU is the underlay's minus this.
pub const ESP_UDP_OVERHEAD: u32 = 68;

/// The inner MTU of IPsec traffic over an underlay of `underlay_mtu`.
pub fn inner_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(ESP_UDP_OVERHEAD)
}

/// One IKE connection with its one CHILD_SA, as raven wants it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnSpec {
    /// `raven-<peer node>`; the CHILD_SA has the same name.
    pub name: String,
    pub peer_node: NodeName,
    pub peer_gateway: GatewayName,
    /// This node's address for IKE (its private IP), or any.
    pub local_addr: Option<IpAddr>,
    /// The peer's address; `None` when it dials us from behind a NAT.
    pub remote_addr: Option<IpAddr>,
    pub local_port: u16,
    pub remote_port: u16,
    /// IKE identities: the node names.
    pub local_id: String,
    pub remote_id: String,
    /// The peer's raw Ed25519 public key, base64 of 32 bytes.
    pub remote_key: String,
    pub local_ts: BTreeSet<IpNet>,
    pub remote_ts: BTreeSet<IpNet>,
    /// This side starts the IKE_SA (and restarts it when DPD finds the peer
    /// dead); the other only answers.
    pub initiator: bool,
    /// Active nodes of other NATed gateways reached through this peer (it is
    /// our relay), or for which we relay (the peer is NATed and we are its
    /// relay).
    pub relays_for: Vec<NodeName>,
}

/// Everything this node wants from charon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// By connection name.
    pub conns: BTreeMap<String, ConnSpec>,
    /// Addresses (host prefixes) to put on `lo`: the network address of every
    /// local traffic selector that holds no address of this node. strongSwan
    /// before 5.9.12 refuses a CHILD_SA whose local selector holds no local
    /// address (`TS_UNACCEPTABLE`), which relayed and forwarded subnets
    /// would hit.
    pub lo_addresses: BTreeSet<IpAddr>,
    pub warnings: Vec<String>,
}

/// The connection name for a peer node.
pub fn conn_name(peer: &NodeName) -> String {
    format!("{CONN_PREFIX}{peer}")
}

fn prefixes(g: &GatewayView) -> BTreeSet<IpNet> {
    g.prefixes().collect()
}

/// The connections this node must run: none unless it is the active tunnel
/// node of its gateway. Pure.
pub fn plan(inputs: &NodeInputs, peers: &[PeerInfo]) -> Plan {
    let mut out = Plan::default();
    let Some(me) = inputs.me.as_ref() else {
        return out;
    };
    let Some(my_gw) = inputs
        .gateways
        .iter()
        .find(|g| Some(&g.name) == me.gateway.as_ref())
    else {
        return out;
    };
    let Some(mine) = my_gw.tunnel_candidates.iter().find(|c| c.node == me.name) else {
        return out;
    };
    if active_node(my_gw, &inputs.active_override) != Some(&me.name) {
        return out;
    }
    let info = |node: &NodeName| peers.iter().find(|p| &p.node == node);
    let my_prefixes = prefixes(my_gw);
    // NATed gateways other than mine, with an active node.
    let natted: Vec<(&GatewayView, &NodeName)> = inputs
        .gateways
        .iter()
        .filter(|g| g.name != my_gw.name && g.under_nat)
        .filter_map(|g| active_node(g, &inputs.active_override).map(|n| (g, n)))
        .collect();
    let mut relayed: Vec<&GatewayView> = Vec::new();
    for other in inputs.gateways.iter().filter(|g| g.name != my_gw.name) {
        let Some(active) = active_node(other, &inputs.active_override) else {
            continue;
        };
        if my_gw.under_nat && other.under_nat {
            relayed.push(other);
            continue;
        }
        let Some(key) = info(active).and_then(|p| p.ipsec_public_key.clone()) else {
            out.warnings.push(format!(
                "gateway {} ({active}) has not reported an IPsec key yet",
                other.name
            ));
            continue;
        };
        let cand = other.tunnel_candidates.iter().find(|c| &c.node == active);
        let remote_addr = if other.under_nat {
            None
        } else {
            cand.and_then(|c| c.public_ip)
        };
        if !other.under_nat && remote_addr.is_none() {
            out.warnings.push(format!(
                "gateway {} ({active}) is not under NAT but has no public IP; it is left out",
                other.name
            ));
            continue;
        }
        let remote_port = cand
            .map(|c| c.public_port.unwrap_or(c.port))
            .unwrap_or(mine.port);
        let initiator = match (my_gw.under_nat, other.under_nat) {
            (true, false) => true,
            (false, true) => false,
            _ => me.name < *active,
        };
        // The address IKE talks to cannot also be a traffic selector: its
        // route would capture IKE itself (charon refuses: "conflicts with
        // IKE traffic"). A gateway node whose own address is its IKE
        // address is reached beside the tunnel, as IKE is.
        let ike_peer: BTreeSet<IpAddr> = remote_addr
            .into_iter()
            .chain(info(active).and_then(|p| p.observed_endpoint).map(|e| e.ip()))
            .collect();
        let mut remote_ts = prefixes(other);
        remote_ts.retain(|n| !(n.prefix_len() == n.max_prefix_len() && ike_peer.contains(&n.addr())));
        let mut local_ts = my_prefixes.clone();
        let mut relays_for = Vec::new();
        // A NATed gateway whose relay I am reaches every other NATed
        // gateway through me.
        if other.under_nat && other.relay.as_ref() == Some(&my_gw.name) {
            for (g, n) in natted.iter().filter(|(g, _)| g.name != other.name) {
                local_ts.extend(prefixes(g));
                relays_for.push((*n).clone());
            }
        }
        out.conns.insert(
            conn_name(active),
            ConnSpec {
                name: conn_name(active),
                peer_node: active.clone(),
                peer_gateway: other.name.clone(),
                local_addr: me.private_ip,
                remote_addr,
                local_port: mine.port,
                remote_port,
                local_id: me.name.to_string(),
                remote_id: active.to_string(),
                remote_key: key,
                local_ts,
                remote_ts,
                initiator,
                relays_for,
            },
        );
    }
    if !relayed.is_empty() {
        let relay_node = my_gw
            .relay
            .as_ref()
            .and_then(|r| inputs.gateways.iter().find(|g| &g.name == r))
            .and_then(|g| active_node(g, &inputs.active_override));
        match relay_node.and_then(|n| out.conns.get_mut(&conn_name(n))) {
            Some(conn) => {
                for g in relayed {
                    conn.remote_ts.extend(prefixes(g));
                    conn.relays_for
                        .extend(active_node(g, &inputs.active_override).cloned());
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
    let own: BTreeSet<IpAddr> = me.private_ip.into_iter().collect();
    for conn in out.conns.values() {
        for ts in &conn.local_ts {
            if !own.iter().any(|a| ts.contains(a)) {
                out.lo_addresses.insert(ts.network());
            }
        }
    }
    out
}
