//! Kernel WireGuard, configured over generic netlink (the `wireguard`
//! family, as `wg` does it).
//!
//! The tunnel driver computes every change as a UAPI `set=1` body (see
//! [`super::diff`]); this module translates such a body into
//! `WG_CMD_SET_DEVICE` requests and reads the device back into the same
//! [`DeviceState`] the UAPI gives, so one planner serves both backends. The
//! translation and the message building are pure and unit-tested; the kernel
//! calls need a kernel with the wireguard module.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::uapi::{DeviceState, PeerState};

type Key = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum KernelWgError {
    #[error("UAPI set body, line {line} {text:?}: {reason}")]
    Body {
        line: usize,
        text: String,
        reason: String,
    },
    #[error("generic netlink ({op}): {reason}")]
    Netlink { op: String, reason: String },
    #[error("kernel WireGuard {dev}: {source}")]
    Kernel { dev: String, source: std::io::Error },
}

/// One peer's part of a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChange {
    pub key: Key,
    pub remove: bool,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

/// A device change, as a UAPI `set=1` body describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerChange>,
}

fn hex_key(s: &str) -> Option<Key> {
    hex::decode(s).ok()?.try_into().ok()
}

/// Parses the UAPI `set=1` body [`super::diff`] writes. Pure.
pub fn parse_set(body: &str) -> Result<Change, KernelWgError> {
    let mut change = Change::default();
    for (i, text) in body.lines().enumerate() {
        if text.is_empty() {
            continue;
        }
        let bad = |reason: &str| KernelWgError::Body {
            line: i + 1,
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (k, v) = text.split_once('=').ok_or_else(|| bad("not key=value"))?;
        let peer = change.peers.last_mut();
        match (k, peer) {
            ("private_key", _) => {
                change.private_key = Some(hex_key(v).ok_or_else(|| bad("not a 32-byte hex key"))?);
            }
            ("listen_port", _) => {
                change.listen_port = Some(v.parse().map_err(|_| bad("not a port"))?);
            }
            ("public_key", _) => change.peers.push(PeerChange {
                key: hex_key(v).ok_or_else(|| bad("not a 32-byte hex key"))?,
                ..Default::default()
            }),
            ("remove", Some(p)) if v == "true" => p.remove = true,
            ("endpoint", Some(p)) => {
                p.endpoint = Some(v.parse().map_err(|_| bad("not an address:port"))?);
            }
            ("persistent_keepalive_interval", Some(p)) => {
                p.keepalive = Some(v.parse().map_err(|_| bad("not a number of seconds"))?);
            }
            ("replace_allowed_ips", Some(p)) if v == "true" => p.replace_allowed_ips = true,
            ("allowed_ip", Some(p)) => {
                p.allowed_ips
                    .push(v.parse().map_err(|_| bad("not a CIDR"))?);
            }
            (_, None) => return Err(bad("a peer setting before any public_key")),
            _ => return Err(bad("not a setting raven sends")),
        }
    }
    Ok(change)
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

fn peer_attrs(p: &PeerChange) -> WireguardPeer {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(p.key)];
    let mut flags = WireguardPeerFlags::empty();
    if p.remove {
        flags |= WireguardPeerFlags::RemoveMe;
    }
    if p.replace_allowed_ips {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
    }
    if !flags.is_empty() {
        attrs.push(WireguardPeerAttribute::Flags(flags));
    }
    if let Some(e) = p.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    if let Some(k) = p.keepalive {
        attrs.push(WireguardPeerAttribute::PersistentKeepalive(k));
    }
    if !p.allowed_ips.is_empty() {
        attrs.push(WireguardPeerAttribute::AllowedIps(
            p.allowed_ips.iter().map(allowed_ip).collect(),
        ));
    }
    WireguardPeer(attrs)
}

/// Peers per `WG_CMD_SET_DEVICE` message: large changes are split at peer
/// boundaries (a peer's allowed IPs always travel whole, so
/// `replace_allowed_ips` replaces them exactly once).
pub const PEERS_PER_MESSAGE: usize = 32;

/// The `WG_CMD_SET_DEVICE` messages that apply `change` to `dev`. Pure.
pub fn set_messages(dev: &str, change: &Change) -> Vec<WireguardMessage> {
    let mut head = vec![WireguardAttribute::IfName(dev.to_owned())];
    if let Some(k) = change.private_key {
        head.push(WireguardAttribute::PrivateKey(k));
    }
    if let Some(p) = change.listen_port {
        head.push(WireguardAttribute::ListenPort(p));
    }
    let mut out = Vec::new();
    let mut chunks = change.peers.chunks(PEERS_PER_MESSAGE);
    let first = chunks.next().unwrap_or(&[]);
    let mut attrs = head;
    if !first.is_empty() {
        attrs.push(WireguardAttribute::Peers(
            first.iter().map(peer_attrs).collect(),
        ));
    }
    out.push(WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: attrs,
    });
    for chunk in chunks {
        out.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(dev.to_owned()),
                WireguardAttribute::Peers(chunk.iter().map(peer_attrs).collect()),
            ],
        });
    }
    out
}

/// The device as the UAPI would describe it, from the messages of a
/// `WG_CMD_GET_DEVICE` dump (a large device spans several; a peer's allowed
/// IPs may continue in the next one). Pure.
pub fn device_state(messages: &[WireguardMessage]) -> DeviceState {
    let mut state = DeviceState::default();
    let mut peers: BTreeMap<String, PeerState> = BTreeMap::new();
    for m in messages {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) => state.private_key_hex = hex::encode(k),
                WireguardAttribute::ListenPort(p) => state.listen_port = *p,
                WireguardAttribute::Peers(list) => {
                    for peer in list {
                        read_peer(peer, &mut peers);
                    }
                }
                _ => {}
            }
        }
    }
    state.peers = peers;
    state
}

fn read_peer(peer: &WireguardPeer, peers: &mut BTreeMap<String, PeerState>) {
    let Some(key) = peer.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(hex::encode(k)),
        _ => None,
    }) else {
        return;
    };
    let p = peers.entry(key).or_default();
    for a in peer.iter() {
        match a {
            WireguardPeerAttribute::Endpoint(e) => p.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => p.keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) => {
                p.last_handshake_sec = u64::try_from(t.seconds).unwrap_or(0);
            }
            WireguardPeerAttribute::RxBytes(b) => p.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => p.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let addr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                        _ => None,
                    });
                    let cidr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                        _ => None,
                    });
                    if let Some(net) = addr.zip(cidr).and_then(|(a, c)| IpNet::new(a, c).ok()) {
                        p.allowed_ips.push(net.to_string());
                    }
                }
            }
            _ => {}
        }
    }
}

fn nl_err(op: &str, e: impl std::fmt::Display) -> KernelWgError {
    KernelWgError::Netlink {
        op: op.to_owned(),
        reason: e.to_string(),
    }
}

async fn request(
    dev: &str,
    msg: WireguardMessage,
    flags: u16,
) -> Result<Vec<WireguardMessage>, KernelWgError> {
    let op = format!("{:?} {dev}", msg.cmd);
    let (conn, mut handle, _) = genetlink::new_connection().map_err(|e| nl_err("connecting", e))?;
    tokio::spawn(conn);
    let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
    nl.header.flags = flags;
    let mut replies = handle.request(nl).await.map_err(|e| nl_err(&op, e))?;
    let mut out = Vec::new();
    while let Some(reply) = replies.next().await {
        match reply.map_err(|e| nl_err(&op, e))?.payload {
            NetlinkPayload::InnerMessage(m) => out.push(m.payload),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(KernelWgError::Kernel {
                    dev: dev.to_owned(),
                    source: e.to_io(),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Reads the device.
pub async fn get(dev: &str) -> Result<DeviceState, KernelWgError> {
    let msg = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(dev.to_owned())],
    };
    let replies = request(dev, msg, NLM_F_REQUEST | NLM_F_DUMP).await?;
    Ok(device_state(&replies))
}

/// Applies a UAPI `set=1` body.
pub async fn set(dev: &str, body: &str) -> Result<(), KernelWgError> {
    let change = parse_set(body)?;
    for msg in set_messages(dev, &change) {
        request(dev, msg, NLM_F_REQUEST | NLM_F_ACK).await?;
    }
    Ok(())
}

/// Creates the WireGuard link `dev` (`ip link add DEV type wireguard`).
pub async fn create(dev: &str) -> Result<(), KernelWgError> {
    let h = crate::dataplane::netlink::connect().map_err(|e| nl_err("connecting", e))?;
    h.link()
        .add(rtnetlink::LinkWireguard::new(dev).build())
        .execute()
        .await
        .map_err(|e| nl_err(&format!("ip link add {dev} type wireguard"), e))
}

/// Deletes the link `dev`, if it exists.
pub async fn delete(dev: &str) -> Result<(), KernelWgError> {
    let h = crate::dataplane::netlink::connect().map_err(|e| nl_err("connecting", e))?;
    if let Some(i) = crate::dataplane::netlink::link_index(&h, dev)
        .await
        .map_err(|e| nl_err("finding the link", e))?
    {
        h.link()
            .del(i)
            .execute()
            .await
            .map_err(|e| nl_err(&format!("ip link del {dev}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn key(h: &str) -> Key {
        hex_key(h).unwrap_or_else(|| panic!("{h}"))
    }

    #[test]
    fn the_bodies_diff_writes_parse_into_a_structured_change() {
        let body = format!(
            "private_key={K1}\nlisten_port=4500\npublic_key={K2}\nremove=true\npublic_key={K1}\nendpoint=198.51.100.1:4500\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/24\nallowed_ip=fd00::/64\n"
        );
        let c = parse_set(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.private_key, Some(key(K1)));
        assert_eq!(c.listen_port, Some(4500));
        assert_eq!(c.peers.len(), 2);
        assert!(c.peers[0].remove);
        let p = &c.peers[1];
        assert_eq!(p.endpoint, "198.51.100.1:4500".parse().ok());
        assert_eq!(p.keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(
            p.allowed_ips,
            vec![
                "10.1.0.0/24".parse().unwrap_or_else(|_| unreachable!()),
                "fd00::/64".parse().unwrap_or_else(|_| unreachable!())
            ]
        );
    }

    #[test]
    fn a_malformed_body_names_the_line() {
        for (body, line, why) in [
            ("endpoint=1.2.3.4:5\n", 1, "before any public_key"),
            (
                &format!("public_key={K1}\nallowed_ip=10.0.0.0/33\n") as &str,
                2,
                "CIDR",
            ),
            ("public_key=zz\n", 1, "hex key"),
            (
                &format!("public_key={K1}\npreshared_key={K2}\n") as &str,
                2,
                "not a setting",
            ),
            ("listen_port\n", 1, "key=value"),
        ] {
            let e = parse_set(body)
                .map(|_| ())
                .expect_err("malformed")
                .to_string();
            assert!(
                e.contains(&format!("line {line} ")) && e.contains(why),
                "{body:?}: {e}"
            );
        }
    }

    #[test]
    fn set_messages_carry_flags_and_split_at_peer_boundaries() {
        let peers: Vec<PeerChange> = (0..PEERS_PER_MESSAGE + 3)
            .map(|i| PeerChange {
                key: [u8::try_from(i).unwrap_or(0); 32],
                remove: i == 0,
                replace_allowed_ips: i == 1,
                allowed_ips: vec!["10.9.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
                ..Default::default()
            })
            .collect();
        let change = Change {
            private_key: Some(key(K1)),
            listen_port: Some(4500),
            peers,
        };
        let msgs = set_messages("wg-test", &change);
        assert_eq!(msgs.len(), 2);
        let peers_of = |m: &WireguardMessage| {
            m.attributes
                .iter()
                .find_map(|a| match a {
                    WireguardAttribute::Peers(p) => Some(p.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        assert_eq!(peers_of(&msgs[0]).len(), PEERS_PER_MESSAGE);
        assert_eq!(peers_of(&msgs[1]).len(), 3);
        assert!(
            msgs[1]
                .attributes
                .iter()
                .all(|a| !matches!(a, WireguardAttribute::PrivateKey(_))),
            "the key is set once"
        );
        let first = peers_of(&msgs[0]);
        assert!(first[0].contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)));
        assert!(first[1].contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));

        // The message serialises and parses back to itself (the bytes the
        // kernel would get).
        let mut buf = vec![0u8; msgs[0].buffer_len()];
        msgs[0].emit(&mut buf);
        let header = GenlHeader {
            cmd: 1, // WG_CMD_SET_DEVICE
            version: 1,
        };
        let back =
            WireguardMessage::parse_with_param(&buf[..], header).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, msgs[0]);
    }

    #[test]
    fn a_dump_reads_back_as_the_uapi_state_merging_split_peers() {
        let peer = |ips: &[&str], extra: Vec<WireguardPeerAttribute>| {
            let mut a = vec![
                WireguardPeerAttribute::PublicKey(key(K2)),
                WireguardPeerAttribute::AllowedIps(
                    ips.iter()
                        .map(|s| allowed_ip(&s.parse().unwrap_or_else(|_| unreachable!())))
                        .collect(),
                ),
            ];
            a.extend(extra);
            WireguardPeer(a)
        };
        let msgs = vec![
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::PrivateKey(key(K1)),
                    WireguardAttribute::ListenPort(4500),
                    WireguardAttribute::Peers(vec![peer(
                        &["10.1.0.0/24"],
                        vec![
                            WireguardPeerAttribute::Endpoint(
                                "198.51.100.1:4500"
                                    .parse()
                                    .unwrap_or_else(|_| unreachable!()),
                            ),
                            WireguardPeerAttribute::PersistentKeepalive(25),
                            WireguardPeerAttribute::RxBytes(7),
                            WireguardPeerAttribute::LastHandshake(
                                netlink_packet_wireguard::WireguardTimeSpec {
                                    seconds: 1_700_000_000,
                                    nano_seconds: 5,
                                },
                            ),
                        ],
                    )]),
                ],
            },
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![peer(
                    &["fd00::/64"],
                    vec![],
                )])],
            },
        ];
        let s = device_state(&msgs);
        assert_eq!(s.private_key_hex, K1);
        assert_eq!(s.listen_port, 4500);
        let p = &s.peers[K2];
        assert_eq!(p.allowed_ips, vec!["10.1.0.0/24", "fd00::/64"]);
        assert_eq!(p.keepalive, 25);
        assert_eq!(p.rx_bytes, 7);
        assert_eq!(p.last_handshake_sec, 1_700_000_000);
        assert_eq!(p.endpoint, "198.51.100.1:4500".parse().ok());
    }
}
