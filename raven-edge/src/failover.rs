//! Local gateway failover, which must not need the cloud: which node carries
//! each gateway's tunnel when the hub's choice is dead and the hub cannot be
//! asked.
//!
//! The hub ships every gateway's ordered candidate list
//! (`GatewayView.tunnel_candidates`, the elected one first). Two kinds of
//! evidence decide, and [`choose`] turns them into overrides of the hub's
//! choice, purely:
//!
//! * **Own domain** — every node probes its gateway's candidates with ICMP
//!   echo on their private addresses (the LAN the VXLAN path runs over). When
//!   the hub's choice has missed [`ProbeBook::fail_after`] probes in a row and
//!   the hub is unreachable, the domain moves to the first candidate in list
//!   order that is not dead. Every node applies the same rule to the same list,
//!   so the domain agrees without talking to the cloud. An override stays
//!   (also once the hub is back) until the hub's choice answers again, so a
//!   returning hub that has not yet heard of the failover cannot flap it back.
//! * **Remote domains** — the active tunnel node keeps every candidate of the
//!   other gateways as a WireGuard peer, standbys without allowed IPs. Every
//!   peer that carries prefixes sends a keepalive each
//!   [`crate::tunnel::LIVE_KEEPALIVE`] seconds, so a live gateway is *heard*
//!   at least that often. While the hub is unreachable, a gateway's prefixes
//!   move from the node that carries them to another candidate only when
//!   both hold: the current node is **silent** (nothing received for
//!   [`SILENCE_SECS`]) and the candidate is **live** — a fresh handshake
//!   made *after* the current node was last heard, and traffic received
//!   within [`SILENCE_SECS`]. A fresher handshake alone never moves traffic:
//!   a standby that was briefly up (say, powered on with a stale cache that
//!   named it active, until the hub demoted it) handshook while the active
//!   gateway kept talking, so its handshake is older than the active's last
//!   packet and it falls silent again. A move holds (also once the hub is
//!   back) until the node moved to falls silent while the hub's choice is
//!   heard.
//!
//! When the hub is reachable and its choice is alive, the hub is
//! authoritative. Agents report their overrides (`Report.local_failover`); a
//! candidate that took over reports itself, and the hub adopts that as the
//! gateway's current active endpoint (sticky), so it does not move traffic
//! back when it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use raven_model::topology::GatewayView;
use raven_model::{GatewayName, NodeName};

use crate::cache::View;
use crate::tunnel::keys::Key;
use crate::tunnel::uapi::DeviceState;

/// A WireGuard session older than this is unusable (REJECT_AFTER_TIME): a
/// handshake is fresh when it is younger.
pub const HANDSHAKE_FRESH_SECS: u64 = 180;

/// What the probes say about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// Not probed yet, or not probeable: never a reason to fail over.
    Unknown,
    Alive,
    /// Missed `fail_after` probes in a row.
    Dead,
}

/// Consecutive probe results per address.
#[derive(Debug, Clone)]
pub struct ProbeBook {
    /// Misses in a row that make an address dead.
    pub fail_after: u32,
    misses: BTreeMap<Ipv4Addr, u32>,
}

impl ProbeBook {
    pub fn new(fail_after: u32) -> Self {
        Self {
            fail_after: fail_after.max(1),
            misses: BTreeMap::new(),
        }
    }

    /// Records one round: `answered` out of `probed`. Forgets addresses no
    /// longer probed. Returns whether any address changed health.
    pub fn record(&mut self, probed: &[Ipv4Addr], answered: &BTreeSet<Ipv4Addr>) -> bool {
        let before: Vec<(Ipv4Addr, ProbeVerdict)> =
            probed.iter().map(|a| (*a, self.health(*a))).collect();
        self.misses.retain(|a, _| probed.contains(a));
        for a in probed {
            let m = self.misses.entry(*a).or_insert(0);
            *m = if answered.contains(a) { 0 } else { *m + 1 };
        }
        before.iter().any(|(a, h)| self.health(*a) != *h)
    }

    pub fn health(&self, addr: Ipv4Addr) -> ProbeVerdict {
        match self.misses.get(&addr) {
            None => ProbeVerdict::Unknown,
            Some(m) if *m >= self.fail_after => ProbeVerdict::Dead,
            Some(_) => ProbeVerdict::Alive,
        }
    }
}

/// What the tunnel device tells of one peer, in unix seconds (0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSeen {
    /// The last completed handshake.
    pub handshake: u64,
    /// When its received byte count last grew (as observed by
    /// [`PeerActivity`]).
    pub heard: u64,
}

impl PeerSeen {
    /// Heard within [`SILENCE_SECS`].
    fn heard_recently(self, now: u64) -> bool {
        self.heard > 0 && now.saturating_sub(self.heard) < SILENCE_SECS
    }

    /// A usable session that carries traffic.
    fn live(self, now: u64) -> bool {
        self.handshake > 0
            && now.saturating_sub(self.handshake) < HANDSHAKE_FRESH_SECS
            && self.heard_recently(now)
    }
}

/// Everything [`choose`] weighs besides the topology.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    pub probes: &'a ProbeBook,
    /// What the tunnel device tells of each peer node (absent: not a peer).
    pub peers: &'a BTreeMap<NodeName, PeerSeen>,
    /// Unix seconds now.
    pub now: u64,
    /// The agent heard from a hub recently.
    pub hub_reachable: bool,
}

/// The private IPv4 address of `node` if it is a member of `gw`.
fn member_ip(gw: &GatewayView, node: &NodeName) -> Option<Ipv4Addr> {
    gw.members
        .iter()
        .find(|m| &m.node == node)
        .and_then(|m| match m.private_ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
}

fn my_gateway(view: &View) -> Option<&GatewayView> {
    let gw = view.me.gateway.as_ref()?;
    view.gateways.iter().find(|g| &g.name == gw)
}

/// The addresses this node probes: the other tunnel candidates of its own
/// gateway.
pub fn probe_targets(view: &View) -> Vec<Ipv4Addr> {
    let (me, Some(gw)) = (&view.me, my_gateway(view)) else {
        return Vec::new();
    };
    let mut out: Vec<Ipv4Addr> = gw
        .tunnel_candidates
        .iter()
        .filter(|c| c.node != me.name)
        .filter_map(|c| member_ip(gw, &c.node))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The other tunnel candidates of this node's own gateway that the probes
/// say are dead, sorted, at most [`raven_model::report::MAX_DEAD_CANDIDATES`]:
/// what the node reports to the hub (`Report.dead_candidates`), whose failure
/// detector replaces a dead gateway while the hub is reachable.
pub fn dead_candidates(view: &View, probes: &ProbeBook) -> Vec<NodeName> {
    let (me, Some(gw)) = (&view.me, my_gateway(view)) else {
        return Vec::new();
    };
    let mut out: Vec<NodeName> = gw
        .tunnel_candidates
        .iter()
        .filter(|c| c.node != me.name)
        .filter(|c| {
            member_ip(gw, &c.node).is_some_and(|ip| probes.health(ip) == ProbeVerdict::Dead)
        })
        .map(|c| c.node.clone())
        .collect();
    out.sort();
    out.dedup();
    out.truncate(raven_model::report::MAX_DEAD_CANDIDATES);
    out
}

/// The overrides of the hub's choices this node acts on: gateway → the node
/// carrying its tunnel. Pure; see the module documentation for the rules.
pub fn choose(
    view: &View,
    ev: &Evidence<'_>,
    previous: &BTreeMap<GatewayName, NodeName>,
) -> BTreeMap<GatewayName, NodeName> {
    let mut out = BTreeMap::new();
    let me = &view.me;
    for gw in &view.gateways {
        let Some(hub_choice) = gw.active_tunnel.as_ref().map(|t| &t.node) else {
            continue;
        };
        let pick = if me.gateway.as_ref() == Some(&gw.name) {
            own_domain(
                gw,
                &me.name,
                hub_choice,
                ev,
                previous.contains_key(&gw.name),
            )
        } else {
            remote_domain(gw, hub_choice, ev, previous.get(&gw.name))
        };
        if let Some(node) = pick.filter(|n| *n != hub_choice) {
            out.insert(gw.name.clone(), node.clone());
        }
    }
    out
}

fn own_domain<'a>(
    gw: &'a GatewayView,
    me: &NodeName,
    hub_choice: &'a NodeName,
    ev: &Evidence<'_>,
    overridden: bool,
) -> Option<&'a NodeName> {
    let health = |n: &NodeName| {
        if n == me {
            return ProbeVerdict::Alive;
        }
        member_ip(gw, n).map_or(ProbeVerdict::Unknown, |ip| ev.probes.health(ip))
    };
    if health(hub_choice) != ProbeVerdict::Dead || (ev.hub_reachable && !overridden) {
        return Some(hub_choice);
    }
    gw.tunnel_candidates
        .iter()
        .map(|c| &c.node)
        .find(|n| health(n) != ProbeVerdict::Dead)
}

fn remote_domain<'a>(
    gw: &'a GatewayView,
    hub_choice: &'a NodeName,
    ev: &Evidence<'_>,
    previous: Option<&'a NodeName>,
) -> Option<&'a NodeName> {
    // A reachable hub is authoritative: a candidate that lost an election
    // while its agent was stopped still answers handshakes until its agent
    // drops its peers, and must not pull traffic away meanwhile.
    if ev.hub_reachable && previous.is_none() {
        return Some(hub_choice);
    }
    let seen = |n: &NodeName| ev.peers.get(n).copied().unwrap_or_default();
    // The node that carries the prefixes now: a move made earlier, as long
    // as it is still a candidate.
    let current = previous
        .and_then(|p| {
            gw.tunnel_candidates
                .iter()
                .map(|c| &c.node)
                .find(|n| *n == p)
        })
        .unwrap_or(hub_choice);
    if seen(current).heard_recently(ev.now) {
        return Some(current);
    }
    // Silent. Back to the hub's choice if it is heard; otherwise to a
    // candidate that took over after the current node was last heard.
    if current != hub_choice && seen(hub_choice).heard_recently(ev.now) {
        return Some(hub_choice);
    }
    let since = seen(current).heard;
    gw.tunnel_candidates
        .iter()
        .map(|c| &c.node)
        .filter(|n| *n != current)
        .filter(|n| seen(n).live(ev.now) && seen(n).handshake > since)
        .max_by_key(|n| seen(n).handshake)
        .or(Some(current))
}

/// What local failover decided: the overrides of the hub's gateway choices
/// and the NATed peers reached directly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Gateway → node, where this node overrides the hub's choice.
    pub overrides: BTreeMap<GatewayName, NodeName>,
    /// NATed peers reached directly (not through the relay).
    pub direct: BTreeSet<NodeName>,
}

/// The tunnel devices as read now (`None`: absent or not answering).
#[derive(Debug, Clone, Copy, Default)]
pub struct Devices<'a> {
    pub tunnel: Option<&'a DeviceState>,
    pub direct: Option<&'a DeviceState>,
}

/// The tunnel devices as read now, owned; [`Self::devices`] lends them.
#[derive(Debug, Clone, Default)]
pub struct DeviceStates {
    pub tunnel: Option<DeviceState>,
    pub direct: Option<DeviceState>,
}

impl DeviceStates {
    pub fn devices(&self) -> Devices<'_> {
        Devices {
            tunnel: self.tunnel.as_ref(),
            direct: self.direct.as_ref(),
        }
    }
}

/// Evidence of local failover gathered over time, and the decision in
/// effect. Recording ([`Self::observe`], [`Self::commit`]) is separate from
/// deciding ([`decide`], pure).
#[derive(Debug)]
pub struct FailoverState {
    pub probes: ProbeBook,
    pub activity: PeerActivity,
    /// The same for the direct-path device.
    pub direct_activity: PeerActivity,
    decided: Decision,
}

impl FailoverState {
    pub fn new(probe_failures: u32) -> Self {
        Self {
            probes: ProbeBook::new(probe_failures),
            activity: PeerActivity::default(),
            direct_activity: PeerActivity::default(),
            decided: Decision::default(),
        }
    }

    /// Takes in what the devices show at `now` (unix seconds).
    pub fn observe(&mut self, devices: Devices<'_>, now: u64) {
        if let Some(have) = devices.tunnel {
            self.activity.observe(have, now);
        }
        if let Some(have) = devices.direct {
            self.direct_activity.observe(have, now);
        }
    }

    /// The decision in effect.
    pub fn decided(&self) -> &Decision {
        &self.decided
    }

    /// Makes `d` the decision in effect, logging what changed.
    pub fn commit(&mut self, d: Decision, hub_reachable: bool) {
        if d.overrides != self.decided.overrides {
            tracing::info!(overrides = %raven_cli::list(d.overrides.iter().map(|(g, n)| format!("{g}→{n}"))), hub_reachable, "local gateway failover changed");
        }
        if d.direct != self.decided.direct {
            tracing::info!(direct = %raven_cli::list(&d.direct), "direct NAT-to-NAT paths changed");
        }
        self.decided = d;
    }
}

/// What the evidence in `st` and the devices call for now: the gateway
/// overrides ([`choose`], from the previous decision) and the direct paths
/// in use (a NATed gateway's peer on the direct device that handshakes and
/// is heard). Pure: it records nothing.
pub fn decide(
    view: &View,
    st: &FailoverState,
    devices: Devices<'_>,
    now: u64,
    hub_reachable: bool,
) -> Decision {
    let peers = &view.peers;
    let mut seen = BTreeMap::new();
    if let Some(have) = devices.tunnel {
        for p in peers {
            let Some(key) = p.wireguard_public_key.as_deref().and_then(Key::from_base64) else {
                continue;
            };
            if let Some(s) = have.peers.get(&key) {
                seen.insert(
                    p.node.clone(),
                    PeerSeen {
                        handshake: s.last_handshake_sec,
                        heard: st.activity.heard(&key),
                    },
                );
            }
        }
    }
    // Direct paths are between two NATed gateways only.
    let natted = my_gateway(view).is_some_and(|g| g.under_nat);
    let mut direct = BTreeSet::new();
    if let Some(have) = devices.direct.filter(|_| natted) {
        for p in peers {
            let Some(key) = p
                .direct
                .as_ref()
                .and_then(|d| Key::from_base64(&d.public_key))
            else {
                continue;
            };
            if st.direct_activity.alive(have, &key, now) {
                direct.insert(p.node.clone());
            }
        }
    }
    let evidence = Evidence {
        probes: &st.probes,
        peers: &seen,
        now,
        hub_reachable,
    };
    Decision {
        overrides: choose(view, &evidence, &st.decided.overrides),
        direct,
    }
}

/// How long a peer that carries prefixes may go without sending anything
/// before it counts as silent: it sends a keepalive every
/// [`crate::tunnel::LIVE_KEEPALIVE`] seconds when idle, so at least two
/// missed ones. A silent direct path hands its prefixes back to the relay; a
/// silent remote gateway lets a live candidate take its prefixes (hub
/// unreachable).
pub const SILENCE_SECS: u64 = 2 * crate::tunnel::LIVE_KEEPALIVE as u64 + 1;

/// Per-peer activity read from the tunnel device over time: when each
/// peer's received byte count last grew.
#[derive(Debug, Clone, Default)]
pub struct PeerActivity {
    /// Public key → (rx bytes, unix seconds they last grew).
    rx: BTreeMap<Key, (u64, u64)>,
}

impl PeerActivity {
    /// Takes in the device's current counters.
    pub fn observe(&mut self, have: &DeviceState, now: u64) {
        self.rx.retain(|k, _| have.peers.contains_key(k));
        for (k, p) in &have.peers {
            match self.rx.get_mut(k) {
                Some((bytes, at)) if p.rx_bytes > *bytes => {
                    *bytes = p.rx_bytes;
                    *at = now;
                }
                Some(_) => {}
                // First seen: heard now if it has sent anything (an agent
                // adopting a running device), never otherwise.
                None => {
                    let at = if p.rx_bytes > 0 { now } else { 0 };
                    self.rx.insert(*k, (p.rx_bytes, at));
                }
            }
        }
    }

    /// Unix seconds when the peer with key `key` was last heard (its
    /// received byte count grew); 0 when never observed.
    pub fn heard(&self, key: &Key) -> u64 {
        self.rx.get(key).map_or(0, |(_, at)| *at)
    }

    /// Whether the peer with key `key` carries traffic: a fresh handshake
    /// and bytes received within [`SILENCE_SECS`].
    pub fn alive(&self, have: &DeviceState, key: &Key, now: u64) -> bool {
        let Some(p) = have.peers.get(key) else {
            return false;
        };
        let fresh = p.last_handshake_sec > 0
            && now.saturating_sub(p.last_handshake_sec) < HANDSHAKE_FRESH_SECS;
        let heard = self
            .rx
            .get(key)
            .is_some_and(|(_, at)| now.saturating_sub(*at) < SILENCE_SECS);
        fresh && heard
    }
}

/// One round of ICMP echo to `targets` from the current network namespace
/// (a raw socket: needs CAP_NET_RAW). Returns the addresses that answered
/// within `timeout`.
pub async fn probe(
    targets: Vec<Ipv4Addr>,
    timeout: Duration,
) -> std::io::Result<BTreeSet<Ipv4Addr>> {
    if targets.is_empty() {
        return Ok(BTreeSet::new());
    }
    tokio::task::spawn_blocking(move || icmp::echo_round(&targets, timeout))
        .await
        .map_err(std::io::Error::other)?
}

mod icmp {
    use std::collections::BTreeSet;
    use std::io::Read;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, Socket, Type};

    const ECHO_REQUEST: u8 = 8;
    const ECHO_REPLY: u8 = 0;

    pub fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[0] = ECHO_REQUEST;
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6..8].copy_from_slice(&seq.to_be_bytes());
        p[8..16].copy_from_slice(b"raven-gw");
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The (source, id, seq) of an echo reply in a raw IPv4 packet (IP
    /// header included, as raw sockets deliver it).
    pub fn parse_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
        let ihl = usize::from(packet.first()? & 0x0f) * 4;
        let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
        let icmp = packet.get(ihl..)?;
        if ihl < 20 || icmp.len() < 8 || icmp[0] != ECHO_REPLY {
            return None;
        }
        Some((
            Ipv4Addr::from(src),
            u16::from_be_bytes([icmp[4], icmp[5]]),
            u16::from_be_bytes([icmp[6], icmp[7]]),
        ))
    }

    pub fn echo_round(
        targets: &[Ipv4Addr],
        timeout: Duration,
    ) -> std::io::Result<BTreeSet<Ipv4Addr>> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        let id = rand::random::<u16>();
        for (seq, t) in targets.iter().enumerate() {
            let seq = u16::try_from(seq).unwrap_or(u16::MAX);
            // An unreachable target fails the send; that is a missed probe.
            let _ = socket.send_to(&echo_request(id, seq), &SocketAddrV4::new(*t, 0).into());
        }
        let mut answered = BTreeSet::new();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        let mut socket = socket;
        while answered.len() < targets.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            let n = match socket.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some((src, rid, seq)) = parse_reply(&buf[..n])
                && rid == id
                && targets.get(usize::from(seq)) == Some(&src)
            {
                answered.insert(src);
            }
        }
        Ok(answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures::{self, gateway_name as g, node as n};
    use raven_model::topology::{GatewayEndpoint, Member, PeerInfo};

    fn ep(node: &str) -> GatewayEndpoint {
        GatewayEndpoint {
            under_nat: true,
            ..fixtures::endpoint(node, 4500)
        }
    }
    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }
    /// A gateway whose candidates are `nodes` in order, the first elected;
    /// node i has address 10.0.0.(i+1).
    fn gw(name: &str, nodes: &[&str]) -> GatewayView {
        GatewayView {
            under_nat: true,
            members: nodes
                .iter()
                .enumerate()
                .map(|(i, m)| Member {
                    node: n(m),
                    private_ip: IpAddr::V4(ip(u8::try_from(i + 1).unwrap_or(0))),
                    subnets: vec![],
                    ready: true,
                })
                .collect(),
            active_tunnel: Some(ep(nodes[0])),
            tunnel_candidates: nodes.iter().map(|m| ep(m)).collect(),
            ..fixtures::gateway(name)
        }
    }
    fn inputs(me: &str, my_gw: &str) -> View {
        View {
            me: fixtures::node_view(me, Some(my_gw)),
            gateways: vec![gw("gw-a", &["a1", "a2", "a3"]), gw("gw-b", &["b1", "b2"])],
            remote: vec![],
            settings: None,
            peers: vec![],
        }
    }
    fn book(dead: &[u8], alive: &[u8]) -> ProbeBook {
        let mut b = ProbeBook::new(3);
        let probed: Vec<Ipv4Addr> = dead.iter().chain(alive).map(|l| ip(*l)).collect();
        let answered: BTreeSet<Ipv4Addr> = alive.iter().map(|l| ip(*l)).collect();
        for _ in 0..3 {
            b.record(&probed, &answered);
        }
        b
    }
    fn ev<'a>(
        probes: &'a ProbeBook,
        hs: &'a BTreeMap<NodeName, PeerSeen>,
        hub_reachable: bool,
    ) -> Evidence<'a> {
        Evidence {
            probes,
            peers: hs,
            now: 1_000,
            hub_reachable,
        }
    }

    #[test]
    fn a_probe_is_dead_only_after_fail_after_misses_in_a_row() {
        let mut b = ProbeBook::new(3);
        let t = [ip(1)];
        assert_eq!(b.health(ip(1)), ProbeVerdict::Unknown);
        assert!(b.record(&t, &BTreeSet::new()), "unknown → alive (1 miss)");
        b.record(&t, &BTreeSet::new());
        assert_eq!(b.health(ip(1)), ProbeVerdict::Alive);
        assert!(b.record(&t, &BTreeSet::new()));
        assert_eq!(b.health(ip(1)), ProbeVerdict::Dead);
        assert!(b.record(&t, &[ip(1)].into()));
        assert_eq!(b.health(ip(1)), ProbeVerdict::Alive);
    }

    #[test]
    fn with_the_hub_unreachable_every_member_moves_to_the_first_live_candidate() {
        let probes = book(&[1], &[2, 3]);
        let hs = BTreeMap::new();
        for me in ["a2", "a3", "a4"] {
            let o = choose(
                &inputs(me, "gw-a"),
                &ev(&probes, &hs, false),
                &BTreeMap::new(),
            );
            assert_eq!(o.get(&g("gw-a")), Some(&n("a2")), "as seen by {me}");
        }
        // a2 dead too: a3 (in list order), whoever decides.
        let probes = book(&[1, 2], &[3]);
        let o = choose(
            &inputs("a4", "gw-a"),
            &ev(&probes, &hs, false),
            &BTreeMap::new(),
        );
        assert_eq!(o.get(&g("gw-a")), Some(&n("a3")));
    }

    #[test]
    fn a_reachable_hub_stays_authoritative_until_a_failover_has_happened() {
        let probes = book(&[1], &[2, 3]);
        let hs = BTreeMap::new();
        let i = inputs("a3", "gw-a");
        assert!(choose(&i, &ev(&probes, &hs, true), &BTreeMap::new()).is_empty());
        // Already failed over while the hub was away: the returning hub, still
        // naming the dead a1, does not move the domain back.
        let held = [(g("gw-a"), n("a2"))].into();
        assert_eq!(
            choose(&i, &ev(&probes, &hs, true), &held).get(&g("gw-a")),
            Some(&n("a2"))
        );
        // Once the hub's choice answers again, the hub wins.
        let probes = book(&[], &[1, 2, 3]);
        assert!(choose(&i, &ev(&probes, &hs, true), &held).is_empty());
    }

    #[test]
    fn unknown_health_never_triggers_a_failover() {
        let probes = ProbeBook::new(3);
        let hs = BTreeMap::new();
        assert!(
            choose(
                &inputs("a3", "gw-a"),
                &ev(&probes, &hs, false),
                &BTreeMap::new()
            )
            .is_empty()
        );
    }

    /// A peer last handshaking at `handshake` and last heard at `heard`
    /// (now is 1000).
    fn seen(handshake: u64, heard: u64) -> PeerSeen {
        PeerSeen { handshake, heard }
    }

    #[test]
    fn a_silent_remote_gateway_hands_its_prefixes_to_the_candidate_that_took_over() {
        let probes = ProbeBook::new(3);
        let i = inputs("a1", "gw-a");
        // b1 heard a second ago: nothing moves, whatever b2 did.
        let mut hs = BTreeMap::from([(n("b1"), seen(900, 999)), (n("b2"), seen(995, 999))]);
        assert!(choose(&i, &ev(&probes, &hs, false), &BTreeMap::new()).is_empty());
        // b1 silent since 990; b2 handshook after that and is heard.
        hs.insert(n("b1"), seen(900, 990));
        let moved = choose(&i, &ev(&probes, &hs, false), &BTreeMap::new());
        assert_eq!(moved.get(&g("gw-b")), Some(&n("b2")));
        // The hub back, still naming the silent b1: the move holds.
        assert_eq!(choose(&i, &ev(&probes, &hs, true), &moved), moved);
        // A stale handshake is no evidence, however recent the traffic.
        hs.insert(n("b2"), seen(1_000 - HANDSHAKE_FRESH_SECS, 999));
        assert!(choose(&i, &ev(&probes, &hs, false), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_fresher_handshake_alone_never_moves_traffic_from_a_gateway_that_is_heard() {
        // b2 was briefly up with a stale cache that named it active: it
        // handshook at 950 (b1 last rekeyed at 900) and went quiet; b1 keeps
        // sending keepalives.
        let probes = ProbeBook::new(3);
        let hs = BTreeMap::from([(n("b1"), seen(900, 999)), (n("b2"), seen(950, 951))]);
        let i = inputs("a1", "gw-a");
        for hub_reachable in [false, true] {
            assert!(choose(&i, &ev(&probes, &hs, hub_reachable), &BTreeMap::new()).is_empty());
        }
    }

    #[test]
    fn a_candidate_that_handshook_before_the_gateway_fell_silent_is_no_takeover() {
        // b1 dies at ~996; b2's handshake (and its last traffic) is older.
        let probes = ProbeBook::new(3);
        let i = inputs("a1", "gw-a");
        let hs = BTreeMap::from([(n("b1"), seen(900, 996)), (n("b2"), seen(950, 999))]);
        assert!(choose(&i, &ev(&probes, &hs, false), &BTreeMap::new()).is_empty());
        // Quiet since then: not live either.
        let hs = BTreeMap::from([(n("b1"), seen(900, 996)), (n("b2"), seen(997, 997))]);
        assert!(choose(&i, &ev(&probes, &hs, false), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_move_ends_when_the_moved_to_node_falls_silent_and_the_hubs_choice_is_heard() {
        let probes = ProbeBook::new(3);
        let i = inputs("a1", "gw-a");
        let moved: BTreeMap<_, _> = [(g("gw-b"), n("b2"))].into();
        let hs = BTreeMap::from([(n("b1"), seen(998, 999)), (n("b2"), seen(950, 990))]);
        for hub_reachable in [false, true] {
            assert!(choose(&i, &ev(&probes, &hs, hub_reachable), &moved).is_empty());
        }
        // Both silent: stay where the prefixes are.
        let hs = BTreeMap::from([(n("b1"), seen(900, 980)), (n("b2"), seen(950, 990))]);
        assert_eq!(choose(&i, &ev(&probes, &hs, false), &moved), moved);
    }

    #[test]
    fn with_the_hub_reachable_a_fresher_standby_does_not_pull_traffic_away() {
        // b2 lost an election while its agent was stopped and still answers;
        // b1 is silent for a moment.
        let probes = ProbeBook::new(3);
        let hs = BTreeMap::from([(n("b1"), seen(900, 980)), (n("b2"), seen(995, 999))]);
        let i = inputs("a1", "gw-a");
        assert!(choose(&i, &ev(&probes, &hs, true), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_direct_path_is_alive_while_it_handshakes_and_receives() {
        use crate::tunnel::uapi::{DeviceState, PeerState};
        let k = &Key([7; 32]);
        let state = |rx: u64, hs: u64| DeviceState {
            peers: [(
                *k,
                PeerState {
                    rx_bytes: rx,
                    last_handshake_sec: hs,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let mut a = PeerActivity::default();
        a.observe(&state(0, 0), 100);
        assert!(!a.alive(&state(0, 0), k, 100), "never handshaked");
        a.observe(&state(92, 105), 106);
        assert!(a.alive(&state(92, 105), k, 106));
        // Handshake still fresh, but nothing received for too long.
        let later = 106 + SILENCE_SECS;
        a.observe(&state(92, 105), later);
        assert!(!a.alive(&state(92, 105), k, later));
        a.observe(&state(184, 105), later + 1);
        assert!(a.alive(&state(184, 105), k, later + 1));
        assert!(!a.alive(&state(184, 105), &Key([8; 32]), later + 1));
    }

    #[test]
    fn deciding_records_nothing_and_committing_makes_the_decision_the_previous_one() {
        use crate::tunnel::uapi::PeerState;
        let key = |b: u8| Key([b; 32]);
        let info = |node: &str, b: u8| PeerInfo {
            wireguard_public_key: Some(key(b).to_base64()),
            tunnel_port: Some(4500),
            direct: Some(raven_model::topology::DirectDevice {
                public_key: key(b + 100).to_base64(),
                observed_endpoint: None,
            }),
            ..fixtures::peer(node, "gw-b")
        };
        let peers = vec![info("b1", 1), info("b2", 2)];
        let device = |b2_rx: u64| DeviceState {
            peers: [
                (
                    key(1),
                    PeerState {
                        last_handshake_sec: 900,
                        rx_bytes: 10,
                        ..Default::default()
                    },
                ),
                (
                    key(2),
                    PeerState {
                        last_handshake_sec: 995,
                        rx_bytes: b2_rx,
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            ..Default::default()
        };
        let direct = DeviceState {
            peers: [(
                key(101),
                PeerState {
                    last_handshake_sec: 995,
                    rx_bytes: 10,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let i = View {
            peers,
            ..inputs("a1", "gw-a")
        };
        let mut st = FailoverState::new(3);
        // Both heard at 990; then only b2 (after its handshake at 995).
        st.observe(
            Devices {
                tunnel: Some(&device(50)),
                direct: Some(&direct),
            },
            990,
        );
        let now = device(60);
        st.observe(
            Devices {
                tunnel: Some(&now),
                direct: None,
            },
            999,
        );
        let devices = Devices {
            tunnel: Some(&now),
            direct: Some(&direct),
        };
        let d = decide(&i, &st, devices, 1_000, false);
        assert_eq!(d.overrides.get(&g("gw-b")), Some(&n("b2")));
        assert_eq!(
            d.direct,
            BTreeSet::new(),
            "b1's direct device was heard 10 s ago: not alive"
        );
        assert_eq!(
            decide(&i, &st, devices, 1_000, false),
            d,
            "the same evidence, the same decision"
        );
        assert_eq!(
            st.decided(),
            &Decision::default(),
            "deciding records nothing"
        );
        st.commit(d.clone(), false);
        assert_eq!(st.decided(), &d);
        // The hub back: the committed move holds (it is the previous one now).
        assert_eq!(decide(&i, &st, devices, 1_000, true).overrides, d.overrides);
    }

    #[test]
    fn a_node_reports_only_its_own_gateways_candidates_its_probes_find_dead() {
        // 10.0.0.1 (a1, and b1 in gw-b) dead, 10.0.0.3 (a3) alive.
        let probes = book(&[1], &[3]);
        assert_eq!(
            dead_candidates(&inputs("a2", "gw-a"), &probes),
            vec![n("a1")]
        );
        // Never itself, never another gateway's candidates.
        assert!(dead_candidates(&inputs("a1", "gw-a"), &probes).is_empty());
        assert_eq!(
            dead_candidates(&inputs("b2", "gw-b"), &probes),
            vec![n("b1")]
        );
    }

    #[test]
    fn probe_targets_are_the_other_candidates_of_my_gateway() {
        assert_eq!(probe_targets(&inputs("a2", "gw-a")), vec![ip(1), ip(3)]);
    }

    #[test]
    fn echo_request_checksum_verifies_and_replies_parse() {
        let p = icmp::echo_request(0x1234, 7);
        assert_eq!(
            icmp::checksum(&p),
            0,
            "a packet with its checksum sums to 0"
        );
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0u8; 11]);
        reply.extend_from_slice(&[10, 0, 0, 9, 10, 0, 0, 1]);
        let mut body = p;
        body[0] = 0;
        reply.extend_from_slice(&body);
        assert_eq!(icmp::parse_reply(&reply), Some((ip(9), 0x1234, 7)));
        reply[20] = 8;
        assert_eq!(icmp::parse_reply(&reply), None, "a request is not a reply");
    }
}
