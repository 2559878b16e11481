//! Kernel WireGuard, configured over generic netlink (the `wireguard`
//! family, as `wg` does it).
//!
//! The tunnel driver computes every change as a [`Change`] (see
//! [`super::diff`]); this module renders it as `WG_CMD_SET_DEVICE` requests
//! and reads the device back into the same [`DeviceState`] the UAPI gives,
//! so one planner serves both backends. The message building and the
//! reading are pure and unit-tested; the kernel calls need a kernel with
//! the wireguard module.

use std::collections::BTreeMap;

use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_core::{
    Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::change::{Change, PeerChange};
use super::keys::{Key, Secret};
use super::uapi::{DeviceState, PeerState};

#[derive(Debug, thiserror::Error)]
pub enum KernelWgError {
    #[error("generic netlink ({op}): {reason}")]
    Netlink { op: String, reason: String },
    #[error("kernel WireGuard {dev}: {source}")]
    Kernel { dev: String, source: std::io::Error },
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

/// A peer's own settings — everything but its allowed IPs.
fn peer_head(p: &PeerChange) -> Vec<WireguardPeerAttribute> {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(p.key.0)];
    let mut flags = WireguardPeerFlags::empty();
    if p.remove {
        flags |= WireguardPeerFlags::RemoveMe;
    }
    if p.allowed_ips.is_some() {
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
    attrs
}

/// Attribute bytes per `WG_CMD_SET_DEVICE` message. Nested netlink
/// attributes carry a 16-bit length, so one message cannot hold more than
/// 64 KiB of peers; like `wg`, changes are cut into small messages instead.
pub const MESSAGE_BUDGET: usize = 8192;

/// Size of a netlink attribute header.
const NLA_HEADER: usize = 4;

/// Fills `WG_CMD_SET_DEVICE` messages up to [`MESSAGE_BUDGET`].
struct Batcher {
    dev: String,
    head: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    used: usize,
    out: Vec<WireguardMessage>,
}

impl Batcher {
    fn new(dev: &str, head: Vec<WireguardAttribute>) -> Self {
        let used = head.as_slice().buffer_len() + NLA_HEADER;
        Self {
            dev: dev.to_owned(),
            head,
            peers: Vec::new(),
            used,
            out: Vec::new(),
        }
    }

    fn room(&self) -> usize {
        MESSAGE_BUDGET.saturating_sub(self.used)
    }

    fn push(&mut self, peer: WireguardPeer) {
        self.used += peer.buffer_len();
        self.peers.push(peer);
    }

    /// Closes the message; the next one names only the device.
    fn flush(&mut self) {
        let next = vec![WireguardAttribute::IfName(self.dev.clone())];
        self.used = next.as_slice().buffer_len() + NLA_HEADER;
        let mut attributes = std::mem::replace(&mut self.head, next);
        if !self.peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.out.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
    }

    fn finish(mut self) -> Vec<WireguardMessage> {
        if !self.peers.is_empty() || self.out.is_empty() {
            self.flush();
        }
        self.out
    }
}

/// The `WG_CMD_SET_DEVICE` messages that apply `change` to `dev`, in order,
/// each at most [`MESSAGE_BUDGET`] bytes of attributes. The device settings
/// travel in the first; a peer whose allowed IPs do not fit continues in the
/// next message with only its key and the rest of its allowed IPs, as `wg`
/// does — its flags (so `replace_allowed_ips`), endpoint and keepalive go
/// once, with the first part. Pure.
pub fn set_messages(dev: &str, change: &Change) -> Vec<WireguardMessage> {
    let mut head = vec![WireguardAttribute::IfName(dev.to_owned())];
    if let Some(Secret(k)) = change.private_key {
        head.push(WireguardAttribute::PrivateKey(k.0));
    }
    if let Some(p) = change.listen_port {
        head.push(WireguardAttribute::ListenPort(p));
    }
    let mut b = Batcher::new(dev, head);
    for p in &change.peers {
        let mut attrs = peer_head(p);
        let mut ips = p.allowed_ips.iter().flatten().map(allowed_ip).peekable();
        loop {
            let ips_header = if ips.peek().is_some() { NLA_HEADER } else { 0 };
            let fixed = NLA_HEADER + attrs.as_slice().buffer_len() + ips_header;
            let smallest = fixed + ips.peek().map_or(0, |ip| ip.buffer_len());
            if smallest > b.room() && !b.peers.is_empty() {
                b.flush();
            }
            let mut room = b.room().saturating_sub(fixed);
            let mut part = Vec::new();
            while let Some(ip) = ips.next_if(|ip| part.is_empty() || ip.buffer_len() <= room) {
                room = room.saturating_sub(ip.buffer_len());
                part.push(ip);
            }
            if !part.is_empty() {
                attrs.push(WireguardPeerAttribute::AllowedIps(part));
            }
            b.push(WireguardPeer(attrs));
            if ips.peek().is_none() {
                break;
            }
            b.flush();
            attrs = vec![WireguardPeerAttribute::PublicKey(p.key.0)];
        }
    }
    b.finish()
}

/// The device as the UAPI would describe it, from the messages of a
/// `WG_CMD_GET_DEVICE` dump (a large device spans several; a peer's allowed
/// IPs may continue in the next one). Pure.
pub fn device_state(messages: &[WireguardMessage]) -> DeviceState {
    let mut state = DeviceState::default();
    let mut peers: BTreeMap<Key, PeerState> = BTreeMap::new();
    for m in messages {
        for a in &m.attributes {
            match a {
                // The kernel reports an unset key as zeros.
                WireguardAttribute::PrivateKey(k) => {
                    state.private_key = (*k != [0; 32]).then_some(Secret(Key(*k)));
                }
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

fn read_peer(peer: &WireguardPeer, peers: &mut BTreeMap<Key, PeerState>) {
    let Some(key) = peer.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
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
                        p.allowed_ips.push(net);
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

type Handle = genetlink::GenetlinkHandle;

fn connect() -> Result<Handle, KernelWgError> {
    let (conn, handle, _) = genetlink::new_connection().map_err(|e| nl_err("connecting", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Sends `msg` and collects the replies; a kernel error is `dev`'s.
async fn request(
    handle: &mut Handle,
    dev: &str,
    msg: WireguardMessage,
    flags: u16,
) -> Result<Vec<WireguardMessage>, KernelWgError> {
    let op = format!("{:?} {dev}", msg.cmd);
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
    let replies = request(&mut connect()?, dev, msg, NLM_F_REQUEST | NLM_F_DUMP).await?;
    Ok(device_state(&replies))
}

/// Applies `change`: its messages in order over one socket, each
/// acknowledged before the next is sent.
pub async fn set(dev: &str, change: &Change) -> Result<(), KernelWgError> {
    let mut handle = connect()?;
    for msg in set_messages(dev, change) {
        request(&mut handle, dev, msg, NLM_F_REQUEST | NLM_F_ACK).await?;
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

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// The bytes the kernel would get, parsed back.
    fn round_trip(m: &WireguardMessage) -> WireguardMessage {
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let header = GenlHeader {
            cmd: 1, // WG_CMD_SET_DEVICE
            version: 1,
        };
        WireguardMessage::parse_with_param(&buf[..], header).unwrap_or_else(|e| panic!("{e}"))
    }

    fn peers_of(m: &WireguardMessage) -> Vec<WireguardPeer> {
        m.attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Checks that `msgs` apply exactly `change`: every message within the
    /// budget and intact on the wire, the device settings once and first,
    /// every peer in order with its settings once, in its first part, and
    /// its allowed IPs in order across its parts.
    fn assert_messages_apply(msgs: &[WireguardMessage], change: &Change) {
        assert!(!msgs.is_empty());
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.cmd, WireguardCmd::SetDevice);
            assert!(
                m.buffer_len() <= MESSAGE_BUDGET,
                "message {i}: {}",
                m.buffer_len()
            );
            assert_eq!(&round_trip(m), m, "message {i} on the wire");
            assert_eq!(
                m.attributes.first(),
                Some(&WireguardAttribute::IfName("wg-test".into()))
            );
            let device: Vec<_> = m
                .attributes
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        WireguardAttribute::PrivateKey(_) | WireguardAttribute::ListenPort(_)
                    )
                })
                .cloned()
                .collect();
            let want: Vec<_> = if i == 0 {
                change
                    .private_key
                    .map(|Secret(k)| WireguardAttribute::PrivateKey(k.0))
                    .into_iter()
                    .chain(change.listen_port.map(WireguardAttribute::ListenPort))
                    .collect()
            } else {
                Vec::new()
            };
            assert_eq!(device, want, "device settings in message {i}");
        }
        let mut parts = msgs.iter().flat_map(peers_of);
        for p in &change.peers {
            let first = parts.next().expect("a part for every peer");
            let ips_of = |part: &WireguardPeer| -> Vec<WireguardAllowedIp> {
                part.iter()
                    .filter_map(|a| match a {
                        WireguardPeerAttribute::AllowedIps(list) => Some(list.clone()),
                        _ => None,
                    })
                    .flatten()
                    .collect()
            };
            let mut ips = Vec::new();
            let head: Vec<_> = first
                .iter()
                .filter(|a| !matches!(a, WireguardPeerAttribute::AllowedIps(_)))
                .cloned()
                .collect();
            assert_eq!(head, peer_head(p), "the settings of the first part");
            ips.extend(ips_of(&first));
            let all: Vec<IpNet> = p.allowed_ips.clone().unwrap_or_default();
            while ips.len() < all.len() {
                let more = parts.next().expect("the rest of the allowed IPs");
                assert_eq!(
                    more.first(),
                    Some(&WireguardPeerAttribute::PublicKey(p.key.0)),
                    "a continuation names its peer"
                );
                assert_eq!(more.len(), 2, "a continuation carries only allowed IPs");
                ips.extend(ips_of(&more));
            }
            let want: Vec<_> = all.iter().map(allowed_ip).collect();
            assert_eq!(ips, want, "the allowed IPs, in order");
        }
        assert_eq!(parts.next(), None, "no extra peers");
    }

    #[test]
    fn set_messages_put_device_settings_and_peer_flags_on_the_wire() {
        let change = super::super::change::sample();
        let msgs = set_messages("wg-test", &change);
        assert_eq!(msgs.len(), 1);
        assert_messages_apply(&msgs, &change);
        let peers = peers_of(&msgs[0]);
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey([2; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]
        );
        assert!(peers[1].contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));

        // The raw bytes: the generic netlink header names WG_CMD_SET_DEVICE
        // (1), version 1, and the first attribute is WGDEVICE_A_IFNAME (2),
        // NUL-terminated.
        let genl = GenlMessage::from_payload(msgs[0].clone());
        let mut buf = vec![0u8; genl.buffer_len()];
        genl.emit(&mut buf);
        assert_eq!(&buf[..2], &[1, 1]);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 4 + 8, "nla_len");
        assert_eq!(u16::from_ne_bytes([buf[6], buf[7]]), 2, "nla_type");
        assert_eq!(&buf[8..16], b"wg-test\0");
    }

    #[test]
    fn a_body_without_peers_is_one_message_naming_the_device() {
        let change = Change {
            listen_port: Some(4500),
            ..Default::default()
        };
        let msgs = set_messages("wg-test", &change);
        assert_eq!(msgs.len(), 1);
        assert_messages_apply(&msgs, &change);
    }

    #[test]
    fn a_peer_with_more_allowed_ips_than_a_netlink_attribute_holds_is_cut_into_continuations() {
        // 3000 IPv6 prefixes are ~120 KiB: more than a nested attribute's
        // 16-bit length can describe.
        let change = Change {
            peers: vec![
                PeerChange::new(key(2))
                    .endpoint(
                        "[2001:db8::1]:4500"
                            .parse()
                            .unwrap_or_else(|_| unreachable!()),
                    )
                    .replace_allowed_ips(
                        (0..3000u32)
                            .map(|i| net(&format!("fd00:{:x}:{:x}::/48", i >> 8, i & 0xff))),
                    ),
            ],
            ..Default::default()
        };
        let msgs = set_messages("wg-test", &change);
        let total: usize = msgs.iter().map(Emitable::buffer_len).sum();
        assert!(total > usize::from(u16::MAX), "{total} bytes");
        assert_eq!(
            msgs.len(),
            total.div_ceil(MESSAGE_BUDGET),
            "messages filled"
        );
        assert_messages_apply(&msgs, &change);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn any_change_is_cut_into_messages_within_the_budget_that_apply_exactly_it(
            device in proptest::option::of(0u16..),
            peers in proptest::collection::vec(
                (proptest::bits::u8::ANY, 0usize..700, proptest::bool::ANY,
                 proptest::option::of(0u16..), proptest::bool::ANY),
                0..24,
            ),
        ) {
            let change = Change {
                private_key: device.map(|_| Secret(key(1))),
                listen_port: device,
                peers: peers
                    .into_iter()
                    .map(|(k, n, replace, keepalive, v6)| PeerChange {
                        key: Key([k; 32]),
                        remove: n == 0 && replace,
                        endpoint: (n % 2 == 0).then(|| "198.51.100.1:4500".parse().ok()).flatten(),
                        keepalive,
                        allowed_ips: replace.then(|| {
                            (0..n)
                                .map(|i| {
                                    if v6 {
                                        net(&format!("fd00:{i:x}::/64"))
                                    } else {
                                        net(&format!("10.{}.{}.0/24", i >> 8, i & 0xff))
                                    }
                                })
                                .collect()
                        }),
                    })
                    .collect(),
            };
            assert_messages_apply(&set_messages("wg-test", &change), &change);
        }
    }

    #[test]
    fn a_dump_reads_back_as_the_uapi_state_merging_split_peers() {
        let peer = |ips: &[&str], extra: Vec<WireguardPeerAttribute>| {
            let mut a = vec![
                WireguardPeerAttribute::PublicKey(key(2).0),
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
                    WireguardAttribute::PrivateKey(key(1).0),
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
        assert_eq!(s.private_key, Some(Secret(key(1))));
        assert_eq!(s.listen_port, 4500);
        let p = &s.peers[&key(2)];
        assert_eq!(p.allowed_ips, vec![net("10.1.0.0/24"), net("fd00::/64")]);
        assert_eq!(p.keepalive, 25);
        assert_eq!(p.rx_bytes, 7);
        assert_eq!(p.last_handshake_sec, 1_700_000_000);
        assert_eq!(p.endpoint, "198.51.100.1:4500".parse().ok());
    }
}
