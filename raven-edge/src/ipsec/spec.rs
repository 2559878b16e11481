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

use crate::dataplane::model::NodeInputs;
use crate::reach::Reach;

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
pub struct IpsecSpec {
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

/// The traffic selectors of gateway `g`'s domain on a CHILD_SA whose
/// `holder` side is the tunnel node at that address: every subnet, and of
/// the host prefixes (member node addresses) only the holder's own.
/// strongSwan before 5.9.12 needs an address of the holder inside each of
/// its local selectors: a subnet gets one on `lo` (its network address, see
/// [`IpsecSpec::lo_addresses`]), but another node's host address cannot be
/// borrowed without capturing that node's traffic. So other members' node
/// addresses are not carried by IPsec (their pods are).
fn selectors(g: &GatewayView, holder: Option<IpAddr>) -> BTreeSet<IpNet> {
    g.prefixes()
        .filter(|n| n.prefix_len() != n.max_prefix_len() || Some(n.addr()) == holder)
        .collect()
}

/// The connections this node must run: none unless it is the active tunnel
/// node of its gateway. Pure.
pub fn spec(inputs: &NodeInputs, peers: &[PeerInfo]) -> IpsecSpec {
    let mut out = IpsecSpec::default();
    let Some(reach) = Reach::of(inputs).filter(|r| r.active) else {
        return out;
    };
    let (me, my_gw, mine) = (reach.me, reach.gateway, reach.endpoint);
    let info = |node: &NodeName| peers.iter().find(|p| &p.node == node);
    let my_prefixes = selectors(my_gw, me.private_ip);
    // NATed gateways other than mine, with an active node.
    let natted: Vec<(&GatewayView, &NodeName)> = reach
        .others
        .iter()
        .filter(|(g, _)| g.under_nat)
        .copied()
        .collect();
    for &(other, active) in &reach.others {
        if reach.through_relay(other) {
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
            .chain(
                info(active)
                    .and_then(|p| p.observed_endpoint)
                    .map(|e| e.ip()),
            )
            .collect();
        let peer_ip = other
            .members
            .iter()
            .find(|m| &m.node == active)
            .map(|m| m.private_ip);
        let mut remote_ts = selectors(other, peer_ip);
        remote_ts
            .retain(|n| !(n.prefix_len() == n.max_prefix_len() && ike_peer.contains(&n.addr())));
        let mut local_ts = my_prefixes.clone();
        let mut relays_for = Vec::new();
        // A NATed gateway whose relay I am reaches every other NATed
        // gateway through me.
        if other.under_nat && other.relay.as_ref() == Some(&my_gw.name) {
            for (g, n) in natted.iter().filter(|(g, _)| g.name != other.name) {
                local_ts.extend(selectors(g, me.private_ip));
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
    let relayed = reach.relayed();
    if !relayed.is_empty() {
        let relay_ip = reach
            .relay
            .and_then(|(g, n)| g.members.iter().find(|m| &m.node == n))
            .map(|m| m.private_ip);
        match reach
            .relay
            .and_then(|(_, n)| out.conns.get_mut(&conn_name(n)))
        {
            Some(conn) => {
                for (g, n) in &relayed {
                    conn.remote_ts.extend(selectors(g, relay_ip));
                    conn.relays_for.push((*n).clone());
                }
            }
            None => out.warnings.push(Reach::no_relay_warning(&relayed)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures::{self, gateway_name as g, net, node as n};
    use raven_model::topology::{ExposeType, GatewayEndpoint, NodeView};

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    /// Gateway `name` with node `<name>-1` at `ip`, pod subnet `subnet`,
    /// public at `ip` unless `nat`.
    fn gw(name: &str, ip: &str, subnet: &str, nat: bool, relay: Option<&str>) -> GatewayView {
        let node = format!("{name}-1");
        let ep = GatewayEndpoint {
            under_nat: nat,
            public_ip: (!nat).then(|| fixtures::ip(ip)),
            ..fixtures::endpoint(&node, 4500)
        };
        GatewayView {
            expose_type: if nat {
                ExposeType::None
            } else {
                ExposeType::PublicIP
            },
            under_nat: nat,
            members: vec![fixtures::member(&node, ip, &[subnet])],
            active_tunnel: Some(ep.clone()),
            tunnel_candidates: vec![ep],
            relay: relay.map(g),
            ..fixtures::gateway(name)
        }
    }

    fn inputs(gws: &[GatewayView], me: &str) -> NodeInputs {
        let view = gws
            .iter()
            .find(|v| v.members[0].node.as_str() == me)
            .unwrap_or_else(|| panic!("no {me}"));
        NodeInputs {
            me: Some(NodeView {
                gateway: Some(view.name.clone()),
                private_ip: Some(view.members[0].private_ip),
                subnets: view.members[0].subnets.clone(),
                tunnel_active: true,
                tunnel_candidate: true,
                ..fixtures::node_view(me, None)
            }),
            gateways: gws.to_vec(),
            tunnel_dev: String::new(),
            ..Default::default()
        }
    }

    fn peers(gws: &[GatewayView]) -> Vec<PeerInfo> {
        gws.iter()
            .map(|v| PeerInfo {
                tunnel_port: Some(4500),
                ipsec_public_key: Some(KEY.into()),
                ..fixtures::peer(v.members[0].node.as_str(), v.name.as_str())
            })
            .collect()
    }

    #[test]
    fn two_public_gateways_get_one_connection_each_and_one_initiator() {
        let gws = [
            gw("a", "192.0.2.1", "10.1.0.0/24", false, None),
            gw("b", "192.0.2.2", "10.2.0.0/24", false, None),
        ];
        let pa = spec(&inputs(&gws, "a-1"), &peers(&gws));
        let pb = spec(&inputs(&gws, "b-1"), &peers(&gws));
        assert_eq!(pa.conns.len(), 1);
        assert_eq!(pb.conns.len(), 1);
        let (ca, cb) = (&pa.conns["raven-b-1"], &pb.conns["raven-a-1"]);
        assert!(ca.initiator ^ cb.initiator, "exactly one side initiates");
        assert!(ca.initiator, "the smaller node name");
        assert_eq!(ca.remote_addr, "192.0.2.2".parse().ok());
        // The peer's IKE address is no selector; its pod subnet is.
        assert_eq!(ca.remote_ts, [net("10.2.0.0/24")].into());
        assert_eq!(
            ca.local_ts,
            [net("10.1.0.0/24"), net("192.0.2.1/32")].into()
        );
        assert_eq!(
            pa.lo_addresses,
            ["10.1.0.0".parse().unwrap_or(IpAddr::from([0; 4]))].into()
        );
    }

    #[test]
    fn natted_side_initiates_and_the_public_side_answers_any_address() {
        let gws = [
            gw("a", "192.0.2.1", "10.1.0.0/24", false, None),
            gw("b", "10.9.0.2", "10.2.0.0/24", true, Some("a")),
        ];
        let pa = spec(&inputs(&gws, "a-1"), &peers(&gws));
        let pb = spec(&inputs(&gws, "b-1"), &peers(&gws));
        assert!(!pa.conns["raven-b-1"].initiator);
        assert_eq!(pa.conns["raven-b-1"].remote_addr, None);
        assert!(pb.conns["raven-a-1"].initiator);
        assert_eq!(pb.conns["raven-a-1"].local_addr, "10.9.0.2".parse().ok());
    }

    #[test]
    fn natted_gateways_reach_each_other_through_the_relays_child_sa() {
        let gws = [
            gw("r", "192.0.2.1", "10.1.0.0/24", false, None),
            gw("x", "10.8.0.2", "10.2.0.0/24", true, Some("r")),
            gw("y", "10.9.0.2", "10.3.0.0/24", true, Some("r")),
        ];
        let px = spec(&inputs(&gws, "x-1"), &peers(&gws));
        assert_eq!(
            px.conns.keys().collect::<Vec<_>>(),
            ["raven-r-1"],
            "no SA to y"
        );
        let to_relay = &px.conns["raven-r-1"];
        assert!(
            to_relay.remote_ts.contains(&net("10.3.0.0/24")),
            "{to_relay:?}"
        );
        assert!(to_relay.remote_ts.contains(&net("10.1.0.0/24")));
        assert_eq!(to_relay.relays_for, [n("y-1")]);
        let pr = spec(&inputs(&gws, "r-1"), &peers(&gws));
        assert_eq!(pr.conns.len(), 2);
        let to_x = &pr.conns["raven-x-1"];
        assert!(to_x.local_ts.contains(&net("10.3.0.0/24")), "{to_x:?}");
        assert!(
            !to_x.local_ts.contains(&net("10.9.0.2/32")),
            "another node's address is no local selector of the relay: {to_x:?}"
        );
        assert!(
            !to_relay.remote_ts.contains(&net("10.9.0.2/32")),
            "{to_relay:?}"
        );
        assert_eq!(to_x.relays_for, [n("y-1")]);
        // y's subnet holds no address of the relay: its network address
        // goes on lo (strongSwan < 5.9.12).
        assert!(
            pr.lo_addresses
                .contains(&"10.3.0.0".parse().unwrap_or(IpAddr::from([0; 4])))
        );
    }

    #[test]
    fn peer_without_key_is_left_out_with_a_warning_and_standby_plans_nothing() {
        let gws = [
            gw("a", "192.0.2.1", "10.1.0.0/24", false, None),
            gw("b", "192.0.2.2", "10.2.0.0/24", false, None),
        ];
        let mut ps = peers(&gws);
        ps[1].ipsec_public_key = None;
        let pa = spec(&inputs(&gws, "a-1"), &ps);
        assert!(pa.conns.is_empty());
        assert!(
            pa.warnings[0].contains("b-1") && pa.warnings[0].contains("IPsec key"),
            "{:?}",
            pa.warnings
        );
        let mut standby = inputs(&gws, "a-1");
        standby.active_override.insert(g("a"), n("a-2"));
        assert_eq!(spec(&standby, &peers(&gws)), IpsecSpec::default());
    }

    #[test]
    fn inner_mtu_leaves_room_for_esp_in_udp() {
        assert_eq!(inner_mtu(1500), 1432);
        assert_eq!(inner_mtu(10), 0);
    }
}
