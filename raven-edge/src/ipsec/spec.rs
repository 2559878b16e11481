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

/// Dead peer detection interval: once nothing has come in from a peer for
/// this long, charon sends it an empty INFORMATIONAL (which also keeps a NAT
/// mapping open), and one that stops answering is declared dead after
/// charon's retransmission schedule ([`super::charon::dead_peer_secs`]):
/// a dead direct path or gateway is noticed in about 2 + 5.4 s rather than
/// the 10 + 47 s this had with charon's default schedule. The IKE traffic
/// stays modest: an SA that carries traffic inbound sends no DPD at all, an
/// idle one about one exchange (a request and its response, under 100 bytes
/// each) per 2 s per IKE_SA.
pub const DPD_DELAY_SECS: u32 = 2;

/// IKE proposal: AES-GCM-128, PRF SHA-256, X25519.
pub const IKE_PROPOSAL: &str = "aes128gcm16-prfsha256-x25519";
/// ESP proposal: AES-GCM-128 with X25519 PFS on rekey.
pub const ESP_PROPOSAL: &str = "aes128gcm16-x25519";

/// Bytes ESP-in-UDP adds to an IPv4 packet with AES-GCM-128: outer IPv4
/// (20), UDP (8), ESP header (8), IV (8), padding and trailer (up to 3 + 2),
/// ICV (16), rounded up. The inner MTU is the underlay's minus this.
pub const ESP_UDP_OVERHEAD: u32 = 68;

/// What ESP in UDP over IPv6 adds beyond [`ESP_UDP_OVERHEAD`] (the outer
/// header is 40 bytes, not 20).
pub const ESP_UDP_V6_EXTRA: u32 = 20;

/// The inner MTU of IPsec traffic over an IPv4 underlay of `underlay_mtu`.
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
    /// Another tunnel candidate of a peer gateway than its active node:
    /// loaded so that the node its domain fails over to on its own (local
    /// failover, hub or not) is reached at once, with the same selectors.
    /// A NATed peer's candidate dials us (we answer); a public peer's is
    /// dialled by the NATed side (or, between public gateways, by the
    /// smaller node name) — but only while no IKE_SA with the peer
    /// gateway's active node is established. No report row until it has
    /// an SA.
    pub standby: bool,
    /// A path straight to another NATed gateway through both NATs, at the
    /// NAT mapping the public gateways observed for it (IKE NAT-T, UDP
    /// 4500 both ways), beside the relay's CHILD_SA that keeps carrying the
    /// same selectors (see [`spec`]). Both sides dial — each side's first
    /// packet opens its own NAT's stateful firewall for the other's — and
    /// the side with the larger node name closes the IKE_SA it initiated
    /// once the other's is up, so one IKE_SA remains.
    pub direct: bool,
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

/// The selectors of `other`'s domain reached through its node `active`,
/// less any network holding an address IKE talks to (`ike`): its route
/// would capture IKE itself (charon refuses: "conflicts with IKE traffic"),
/// so such an address is reached beside the tunnel, as IKE is.
fn remote_selectors<'a>(
    other: &GatewayView,
    active: &NodeName,
    ike: impl IntoIterator<Item = &'a IpAddr> + Copy,
) -> BTreeSet<IpNet> {
    let peer_ip = other
        .members
        .iter()
        .find(|m| &m.node == active)
        .map(|m| m.private_ip);
    let mut ts = selectors(other, peer_ip);
    ts.retain(|n| !ike.into_iter().any(|a| n.contains(a)));
    ts
}

/// The traffic selectors of gateway `g`'s domain on a CHILD_SA whose
/// `holder` side is the tunnel node at that address: every subnet, and the
/// member node addresses as one covering prefix per family
/// ([`node_cover`]).
///
/// strongSwan before 5.9.12 needs an address of the holder inside each of
/// its local selectors. A subnet gets one on `lo` (its network address, see
/// [`IpsecSpec::lo_addresses`]), but another node's host address cannot be
/// borrowed without capturing that node's traffic: the members' addresses
/// travel as the smallest prefix holding them all, which holds the tunnel
/// node's own address on its own side and whose network address (no
/// member's) can go on `lo` of a relay. Where no such prefix exists (a
/// single member seen from a relay, or members too far apart) only the
/// holder's own address is a selector: other nodes' addresses of that domain
/// are then not carried by IPsec (their pods are).
fn selectors(g: &GatewayView, holder: Option<IpAddr>) -> BTreeSet<IpNet> {
    let mut out: BTreeSet<IpNet> = g
        .prefixes()
        .filter(|n| n.prefix_len() != n.max_prefix_len())
        .collect();
    for v6 in [false, true] {
        let addrs: Vec<IpAddr> = g
            .members
            .iter()
            .map(|m| m.private_ip)
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        let holds = |n: &IpNet| holder.is_some_and(|h| n.contains(&h));
        // Not holding the holder: widened until its network address is no
        // member's (it goes on the holder's `lo`).
        let min = if v6 { COVER_MIN_V6 } else { COVER_MIN_V4 };
        let usable = node_cover(&addrs).and_then(|c| {
            if holds(&c) {
                return Some(c);
            }
            (min..=c.prefix_len())
                .rev()
                .filter(|len| *len != c.max_prefix_len())
                .filter_map(|len| IpNet::new(c.addr(), len).ok().map(|n| n.trunc()))
                .find(|n| !addrs.contains(&n.network()))
        });
        match usable {
            Some(cover) => {
                out.insert(cover);
            }
            None => out.extend(holder.filter(|h| addrs.contains(h)).map(IpNet::from)),
        }
    }
    out
}

/// Shortest prefix length of a [`node_cover`]: a wider one would stand for
/// addresses that are no member's.
const COVER_MIN_V4: u8 = 16;
const COVER_MIN_V6: u8 = 64;

/// The smallest prefix holding every address of `addrs` (all of one
/// family): a host prefix for one address, `None` for none or when it
/// would be shorter than /16 (IPv6: /64). Pure.
pub fn node_cover(addrs: &[IpAddr]) -> Option<IpNet> {
    let first = *addrs.first()?;
    let (bits, min) = match first {
        IpAddr::V4(_) => (32u8, COVER_MIN_V4),
        IpAddr::V6(_) => (128u8, COVER_MIN_V6),
    };
    (min..=bits)
        .rev()
        .filter_map(|len| IpNet::new(first, len).ok().map(|n| n.trunc()))
        .find(|n| addrs.iter().all(|a| n.contains(a)))
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
        // The addresses IKE talks to, kept out of the selectors: a gateway
        // node whose own address is its IKE address is reached beside the
        // tunnel.
        let ike_peer: BTreeSet<IpAddr> = remote_addr
            .into_iter()
            .chain(
                info(active)
                    .and_then(|p| p.observed_endpoint)
                    .map(|e| e.ip()),
            )
            .collect();
        let remote_ts = remote_selectors(other, active, &ike_peer);
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
        let conn = ConnSpec {
            name: conn_name(active),
            peer_node: active.clone(),
            peer_gateway: other.name.clone(),
            // A public gateway answers on whichever address IKE reaches it
            // (its public one may sit on another interface than its private
            // one, or be a cloud's 1:1 NAT); a NATed one dials from its
            // private address.
            local_addr: if my_gw.under_nat { me.private_ip } else { None },
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
            standby: false,
            direct: false,
        };
        // A NATed peer's other candidates dial me should its domain fail
        // over locally: answer them with the same selectors.
        if other.under_nat && !my_gw.under_nat {
            for cand in other.tunnel_candidates.iter().filter(|c| &c.node != active) {
                if let Some(key) = info(&cand.node).and_then(|p| p.ipsec_public_key.clone()) {
                    out.conns.insert(
                        conn_name(&cand.node),
                        ConnSpec {
                            name: conn_name(&cand.node),
                            peer_node: cand.node.clone(),
                            remote_id: cand.node.to_string(),
                            remote_key: key,
                            standby: true,
                            ..conn.clone()
                        },
                    );
                }
            }
        }
        // A public peer's other candidates: should its domain fail over on
        // its own (hub or not), the node it moves to is dialled with the
        // same selectors — only once the active node's IKE_SA is gone (see
        // [`crate::ipsec::apply`]), so a standby that briefly believes it
        // is active never pulls traffic from a live gateway.
        if !other.under_nat {
            for cand in other.tunnel_candidates.iter().filter(|c| &c.node != active) {
                let (Some(addr), Some(key)) = (
                    cand.public_ip,
                    info(&cand.node).and_then(|p| p.ipsec_public_key.clone()),
                ) else {
                    continue;
                };
                let mut remote_ts = conn.remote_ts.clone();
                remote_ts.retain(|n| !n.contains(&addr));
                out.conns.insert(
                    conn_name(&cand.node),
                    ConnSpec {
                        name: conn_name(&cand.node),
                        peer_node: cand.node.clone(),
                        remote_addr: Some(addr),
                        remote_port: cand.public_port.unwrap_or(cand.port),
                        remote_id: cand.node.to_string(),
                        remote_key: key,
                        remote_ts,
                        initiator: my_gw.under_nat || me.name < cand.node,
                        standby: true,
                        ..conn.clone()
                    },
                );
            }
        }
        out.conns.insert(conn_name(active), conn);
    }
    direct_paths(&reach, peers, &my_prefixes, &mut out);
    let relayed = reach.relayed();
    if !relayed.is_empty() {
        let relay_ip = reach
            .relay
            .and_then(|(g, n)| g.members.iter().find(|m| &m.node == n))
            .map(|m| m.private_ip);
        match reach
            .relay
            .filter(|(_, n)| out.conns.contains_key(&conn_name(n)))
        {
            Some((relay, _)) => {
                // The relay's active node and its standby candidates carry
                // the relayed gateways alike.
                for conn in out
                    .conns
                    .values_mut()
                    .filter(|c| c.peer_gateway == relay.name)
                {
                    for (g, n) in &relayed {
                        conn.remote_ts.extend(selectors(g, relay_ip));
                        conn.relays_for.push((*n).clone());
                    }
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

/// The direct connections of a NATed gateway's active node: one to every
/// other NATed gateway's active node when the public gateways observed both
/// NAT mappings (`PeerInfo.observed_endpoint`, for this node and the peer).
/// Its selectors are those the relay's CHILD_SA carries for that gateway,
/// so the relay keeps accepting and carrying them all along: the datapath
/// sends through the policy installed last among equal selectors (libipsec
/// keeps equal-priority policies newest first; the kernel's likewise), so
/// traffic moves onto the direct CHILD_SA once it is installed, and back
/// onto the relay's when dead peer detection removes it — each side on its
/// own, no side waiting for the other. Behind a NAT whose mapping depends
/// on the destination (symmetric), the observed mapping is not the one the
/// direct packets get, no IKE_SA completes, and the relay carries on.
fn direct_paths(
    reach: &Reach<'_>,
    peers: &[PeerInfo],
    my_prefixes: &BTreeSet<IpNet>,
    out: &mut IpsecSpec,
) {
    let (me, mine) = (reach.me, reach.endpoint);
    let info = |node: &NodeName| peers.iter().find(|p| &p.node == node);
    if !reach.gateway.under_nat || info(&me.name).and_then(|p| p.observed_endpoint).is_none() {
        return;
    }
    for (other, active) in reach.relayed() {
        let Some(p) = info(active) else {
            continue;
        };
        let (Some(seen), Some(key)) = (p.observed_endpoint, p.ipsec_public_key.clone()) else {
            continue;
        };
        let remote_ts = remote_selectors(other, active, &[seen.ip()]);
        out.conns.insert(
            conn_name(active),
            ConnSpec {
                name: conn_name(active),
                peer_node: active.clone(),
                peer_gateway: other.name.clone(),
                local_addr: me.private_ip,
                remote_addr: Some(seen.ip()),
                local_port: mine.port,
                remote_port: seen.port(),
                local_id: me.name.to_string(),
                remote_id: active.to_string(),
                remote_key: key,
                local_ts: my_prefixes.clone(),
                remote_ts,
                initiator: true,
                relays_for: Vec::new(),
                standby: false,
                direct: true,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures::{self, gateway_name as g, net, node as n};
    use raven_model::topology::{ExposeType, GatewayEndpoint, Member, NodeView};

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
        assert_eq!(
            pa.conns["raven-b-1"].local_addr, None,
            "the public side answers on any of its addresses"
        );
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
    fn member_addresses_travel_as_one_covering_prefix_never_borrowing_a_members_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            node_cover(&[ip("172.16.2.103"), ip("172.16.2.104")]),
            Some(net("172.16.2.96/28"))
        );
        assert_eq!(node_cover(&[ip("10.0.0.5")]), Some(net("10.0.0.5/32")));
        assert_eq!(node_cover(&[ip("10.0.0.1"), ip("10.200.0.1")]), None);
        assert_eq!(node_cover(&[]), None);
        let mut two = gw("b", "10.9.0.2", "10.2.0.0/24", true, Some("r"));
        two.members.push(Member {
            node: n("b-2"),
            private_ip: ip("10.9.0.3"),
            subnets: vec![net("10.2.1.0/24")],
            ready: true,
        });
        // On its own side (and as a peer's remote selector) the cover holds
        // the tunnel node's address.
        assert_eq!(
            selectors(&two, Some(ip("10.9.0.2"))),
            [net("10.2.0.0/24"), net("10.2.1.0/24"), net("10.9.0.2/31")].into()
        );
        // A relay borrows the cover's network address, widened: 10.9.0.2
        // is b-1's.
        assert_eq!(
            selectors(&two, Some(ip("192.0.2.1"))),
            [net("10.2.0.0/24"), net("10.2.1.0/24"), net("10.9.0.0/30")].into()
        );
        // One member seen from a relay: its own address is never borrowed.
        let one = gw("c", "10.8.0.2", "10.3.0.0/24", true, Some("r"));
        assert_eq!(
            selectors(&one, Some(ip("192.0.2.1"))),
            [net("10.3.0.0/24"), net("10.8.0.0/30")].into()
        );
    }

    #[test]
    fn a_public_gateway_answers_a_natted_peers_standby_candidate_with_the_same_selectors() {
        let mut b = gw("b", "10.9.0.2", "10.2.0.0/24", true, Some("a"));
        let mut standby = b.tunnel_candidates[0].clone();
        standby.node = n("b-2");
        b.tunnel_candidates.push(standby);
        b.members.push(Member {
            node: n("b-2"),
            private_ip: "10.9.0.3".parse().unwrap_or(IpAddr::from([0; 4])),
            subnets: vec![net("10.2.1.0/24")],
            ready: true,
        });
        let gws = [gw("a", "192.0.2.1", "10.1.0.0/24", false, None), b];
        let mut ps = peers(&gws);
        let mut p2 = ps[1].clone();
        p2.node = n("b-2");
        ps.push(p2);
        let pa = spec(&inputs(&gws, "a-1"), &ps);
        let (active, standby) = (&pa.conns["raven-b-1"], &pa.conns["raven-b-2"]);
        assert!(!active.standby && standby.standby);
        assert!(!standby.initiator, "a standby is answered, never dialled");
        assert_eq!(standby.remote_id, "b-2");
        assert_eq!(standby.local_ts, active.local_ts);
        assert_eq!(standby.remote_ts, active.remote_ts);
        // No report row for a standby without an SA.
        let rows = crate::ipsec::agent::rows(&pa, &[]);
        assert_eq!(
            rows.iter()
                .map(|r| r.peer_node.as_str())
                .collect::<Vec<_>>(),
            ["b-1"]
        );
        // The NATed side plans no standby of its own peers.
        let mut me = inputs(&gws, "b-1");
        me.me = me.me.map(|mut v| {
            v.name = n("b-1");
            v
        });
        assert!(spec(&me, &ps).conns.values().all(|c| !c.standby));
    }

    /// `g` with a second tunnel candidate `<name>-2` at `ip` (public at
    /// `ip` unless the gateway is NATed), holding `subnet`.
    fn with_second_candidate(mut g: GatewayView, ip: &str, subnet: &str) -> GatewayView {
        let node = format!("{}-2", g.name);
        let mut cand = g.tunnel_candidates[0].clone();
        cand.node = n(&node);
        cand.public_ip = cand.public_ip.map(|_| fixtures::ip(ip));
        g.tunnel_candidates.push(cand);
        g.members.push(fixtures::member(&node, ip, &[subnet]));
        g
    }

    fn with_peer(mut ps: Vec<PeerInfo>, node: &str, gateway: &str) -> Vec<PeerInfo> {
        ps.push(PeerInfo {
            tunnel_port: Some(4500),
            ipsec_public_key: Some(KEY.into()),
            ..fixtures::peer(node, gateway)
        });
        ps
    }

    #[test]
    fn a_natted_gateway_keeps_a_standby_connection_to_each_other_candidate_of_a_public_one() {
        let a = with_second_candidate(
            gw("a", "192.0.2.1", "10.1.0.0/24", false, None),
            "192.0.2.2",
            "10.1.1.0/24",
        );
        let gws = [
            a,
            gw("x", "10.8.0.2", "10.2.0.0/24", true, Some("a")),
            gw("y", "10.9.0.2", "10.3.0.0/24", true, Some("a")),
        ];
        let ps = with_peer(peers(&gws), "a-2", "a");
        let px = spec(&inputs(&gws, "x-1"), &ps);
        assert_eq!(
            px.conns.keys().collect::<Vec<_>>(),
            ["raven-a-1", "raven-a-2"]
        );
        let (active, standby) = (&px.conns["raven-a-1"], &px.conns["raven-a-2"]);
        assert!(!active.standby && active.initiator);
        assert!(standby.standby, "{standby:?}");
        assert!(
            standby.initiator,
            "the NATed side dials the public candidate"
        );
        assert_eq!(standby.remote_addr, "192.0.2.2".parse().ok());
        assert_eq!(standby.remote_id, "a-2");
        assert_eq!(standby.local_ts, active.local_ts);
        // The relay's candidates carry the relayed gateway alike, so with
        // the relay's node gone, y is reached through the one that took over.
        assert!(
            standby.remote_ts.contains(&net("10.3.0.0/24")),
            "{standby:?}"
        );
        assert!(standby.remote_ts.contains(&net("10.1.1.0/24")));
        assert_eq!(standby.relays_for, [n("y-1")]);
        // The standby's IKE address is none of its selectors.
        assert!(
            standby
                .remote_ts
                .iter()
                .all(|t| !t.contains(&fixtures::ip("192.0.2.2"))),
            "{standby:?}"
        );
        // One row for y: through whichever relay node has an SA.
        let sa =
            |conn: &str, id| crate::ipsec::apply::SaHealth::bare(conn, id, "ESTABLISHED", true);
        let rows = crate::ipsec::agent::rows(&px, &[sa("raven-a-2", 3)]);
        let y: Vec<_> = rows.iter().filter(|r| r.peer_node == "y-1").collect();
        assert_eq!(y.len(), 1, "{rows:?}");
        assert!(y[0].relayed && y[0].ipsec_state == "ESTABLISHED", "{y:?}");
        let names = |rows: &[raven_proto::v1::PeerTunnelState]| {
            rows.iter().map(|r| r.peer_node.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&crate::ipsec::agent::rows(&px, &[])),
            ["a-1", "y-1"],
            "no row for a standby without an SA"
        );
        // The public gateway's own standby runs nothing.
        let mut standby_node = inputs(&gws, "a-1");
        standby_node.me = standby_node.me.map(|mut v| {
            v.name = n("a-2");
            v
        });
        assert!(spec(&standby_node, &ps).conns.is_empty());
    }

    #[test]
    fn between_public_gateways_a_standby_candidate_is_dialled_by_the_smaller_node_name() {
        let a = with_second_candidate(
            gw("a", "192.0.2.1", "10.1.0.0/24", false, None),
            "192.0.2.9",
            "10.1.1.0/24",
        );
        let gws = [a, gw("b", "192.0.2.5", "10.2.0.0/24", false, None)];
        let ps = with_peer(peers(&gws), "a-2", "a");
        let pb = spec(&inputs(&gws, "b-1"), &ps);
        let standby = &pb.conns["raven-a-2"];
        assert!(standby.standby);
        assert!(!standby.initiator, "a-2 < b-1: a-2 dials");
        assert_eq!(standby.remote_addr, "192.0.2.9".parse().ok());
        assert!(!pb.conns["raven-a-1"].initiator);
    }

    #[test]
    fn natted_gateways_observed_by_the_public_ones_dial_each_other_directly_beside_the_relay() {
        let gws = [
            gw("r", "192.0.2.1", "10.1.0.0/24", false, None),
            gw("x", "10.8.0.2", "10.2.0.0/24", true, Some("r")),
            gw("y", "10.9.0.2", "10.3.0.0/24", true, Some("r")),
        ];
        let seen = |mut ps: Vec<PeerInfo>, node: &str, at: &str| {
            for p in ps.iter_mut().filter(|p| p.node.as_str() == node) {
                p.observed_endpoint = at.parse().ok();
            }
            ps
        };
        let ps = seen(
            seen(peers(&gws), "x-1", "198.51.100.8:4500"),
            "y-1",
            "198.51.100.9:4501",
        );
        let px = spec(&inputs(&gws, "x-1"), &ps);
        assert_eq!(
            px.conns.keys().collect::<Vec<_>>(),
            ["raven-r-1", "raven-y-1"]
        );
        let direct = &px.conns["raven-y-1"];
        assert!(
            direct.direct && direct.initiator && !direct.standby,
            "{direct:?}"
        );
        assert_eq!(direct.remote_addr, "198.51.100.9".parse().ok());
        assert_eq!(direct.remote_port, 4501, "the observed mapping's port");
        assert_eq!(direct.local_addr, "10.8.0.2".parse().ok());
        assert!(direct.relays_for.is_empty());
        // The relay keeps carrying y's selectors (or wider ones: a single
        // member's address, widened on the relay): both paths are
        // accepted all along, whichever side moves first.
        let relay = &px.conns["raven-r-1"];
        for ts in &direct.remote_ts {
            assert!(
                relay.remote_ts.iter().any(|r| r.contains(ts)),
                "{ts} not on the relay: {relay:?}"
            );
        }
        assert!(direct.remote_ts.contains(&net("10.3.0.0/24")));
        assert_eq!(direct.local_ts, relay.local_ts);
        // And y dials x the same way.
        let py = spec(&inputs(&gws, "y-1"), &ps);
        assert!(py.conns["raven-x-1"].direct);
        assert_eq!(
            py.conns["raven-x-1"].remote_addr,
            "198.51.100.8".parse().ok()
        );
        // One row per peer: the direct one once its IKE_SA is up, the
        // relayed one otherwise.
        let sa = |conn: &str| crate::ipsec::apply::SaHealth::bare(conn, 1, "ESTABLISHED", true);
        let row_for_y = |sas: &[crate::ipsec::apply::SaHealth]| {
            let rows = crate::ipsec::agent::rows(&px, sas);
            let y: Vec<_> = rows.into_iter().filter(|r| r.peer_node == "y-1").collect();
            assert_eq!(y.len(), 1, "{y:?}");
            y[0].relayed
        };
        assert!(row_for_y(&[sa("raven-r-1")]), "relayed until direct is up");
        assert!(!row_for_y(&[sa("raven-r-1"), sa("raven-y-1")]));
        // Not observed (either side): the relay only; the relay itself
        // dials no direct path.
        let only_y = seen(peers(&gws), "y-1", "198.51.100.9:4501");
        assert!(
            !spec(&inputs(&gws, "x-1"), &only_y)
                .conns
                .contains_key("raven-y-1")
        );
        let only_x = seen(peers(&gws), "x-1", "198.51.100.8:4500");
        assert!(
            !spec(&inputs(&gws, "x-1"), &only_x)
                .conns
                .contains_key("raven-y-1")
        );
        assert!(
            spec(&inputs(&gws, "r-1"), &ps)
                .conns
                .values()
                .all(|c| !c.direct)
        );
    }

    #[test]
    fn inner_mtu_leaves_room_for_esp_in_udp() {
        assert_eq!(inner_mtu(1500), 1432);
        assert_eq!(inner_mtu(10), 0);
    }
}
