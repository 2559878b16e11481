//! What raven wants a node's kernel to hold, what it holds, and the pure
//! diff between the two.
//!
//! Addressing needs no allocation: a member's VXLAN MAC is derived from its
//! private IPv4 (`0e:52:a:b:c:d`), the IPv4 next hop over `raven0` is the
//! member's private address itself, and the IPv6 next hop is the EUI-64
//! link-local address the kernel derives from that MAC. Every node computes
//! every other member's entries from the topology alone.
//!
//! Why no separate overlay range (such as `240.b.c.d/8`): a derived overlay
//! address can collide (`10.1.2.3` and `172.1.2.3` would share
//! `240.1.2.3`), while the private address is unique in its domain by
//! construction — two members sharing one are reported as a warning. The
//! neighbour tables are per device, so the private address as a next hop
//! on `raven0` never disturbs the underlay's own entry for it, and `raven0`
//! holds the node's own address as a /32 so that reverse-path filtering
//! accepts what the gateway forwards onto it. The IPv6 next hop only needs
//! the permanent neighbour entry on the sender; the receiver forwards the
//! frame by its MAC whatever link-local address it actually has.
//!
//! Every member is programmed, ready or not: in OpenYurt a node that lost
//! the cloud turns NotReady while its pods keep serving (edge autonomy), so
//! readiness decides elections (the hub's and local failover), not
//! reachability.
//!
//! Everything raven installs is marked as its own: the link name `raven0`,
//! route tables 9027/9028, rule priorities 9027/9028 and route protocol 82.
//! Nothing else is ever observed, planned or touched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use raven_model::topology::{DomainPrefixes, GatewayView, NodeView, Settings, VXLAN_PORT};
use raven_model::{GatewayName, NodeName};

/// Name of raven's VXLAN device.
pub const VXLAN_DEV: &str = "raven0";
/// VXLAN network identifier of `raven0`.
pub const VXLAN_VNI: u32 = 1;
/// Table of routes to remote domains (through the gateway).
pub const TABLE_REMOTE: u32 = 9027;
/// Table of return routes on the gateway (tunnel → members).
pub const TABLE_RETURN: u32 = 9028;
/// Rule priority sending all traffic through `TABLE_REMOTE` first.
pub const PRIORITY_REMOTE: u32 = 9027;
/// Rule priority sending traffic from the tunnel through `TABLE_RETURN`.
pub const PRIORITY_RETURN: u32 = 9028;
/// Route protocol id marking raven's routes (`ip route ... proto 82`).
pub const ROUTE_PROTOCOL: u8 = 82;
/// VXLAN over IPv4 overhead: outer IPv4 20, UDP 8, VXLAN 8, inner
/// Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// VXLAN over IPv6 overhead (outer IPv6 header of 40).
pub const VXLAN_V6_OVERHEAD: u32 = 70;
/// Worst-case tunnel overhead added at the gateway (WireGuard over IPv6:
/// outer IPv6 40, UDP 8, WireGuard 32), so one tunnel MTU serves peers of
/// either family.
pub const TUNNEL_OVERHEAD: u32 = 80;

/// MTU of the gateway's tunnel device over an underlay of `underlay` bytes.
pub fn tunnel_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(TUNNEL_OVERHEAD)
}

/// VXLAN overhead over an underlay of `local`'s family.
pub fn vxlan_overhead(local: IpAddr) -> u32 {
    match local {
        IpAddr::V4(_) => VXLAN_OVERHEAD,
        IpAddr::V6(_) => VXLAN_V6_OVERHEAD,
    }
}

/// MTU of a path whose hops (each an encapsulation that is removed before
/// the next one is added) have these MTUs: the smallest of them.
pub fn path_mtu(hops: &[u32]) -> u32 {
    hops.iter().copied().min().unwrap_or(0)
}
/// Default name of the gateway tunnel device.
pub const DEFAULT_TUNNEL_DEV: &str = "raven-wg0";

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The `raven0` MAC of the node with private address `ip`.
pub fn mac_for(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x0e, 0x52, o[0], o[1], o[2], o[3]])
}

/// The EUI-64 link-local address the kernel gives a link with `mac`.
pub fn link_local(mac: Mac) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// The VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VxlanLink {
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub mtu: u32,
    pub mac: Mac,
}

/// The device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteDev {
    /// `raven0`, with an on-link next hop.
    Vxlan,
    /// The gateway tunnel device (no next hop).
    Tunnel,
    /// The direct-path device of a NATed gateway (no next hop): see
    /// [`DirectRoutes`].
    Direct,
    /// Observed only: a route of raven's (table and protocol) leaving
    /// through any other device, or through the tunnel with a next hop.
    /// Never desired, so the planner replaces or removes it; it survives
    /// the removal of `raven0`.
    Other,
}

/// A route raven owns: `dst [via V] dev D [onlink] table T proto 82`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: IpNet,
    pub dev: RouteDev,
    /// Next hop over `raven0`; none through the tunnel.
    pub via: Option<IpAddr>,
    /// 0: no MTU metric.
    pub mtu: u32,
}

/// A policy rule raven owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub table: u32,
    pub iif: Option<String>,
}

/// A permanent neighbour entry on `raven0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// A unicast FDB entry on `raven0`: frames for `mac` go to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// A node's dataplane, desired or observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub link: Option<VxlanLink>,
    /// Observed only: the link is administratively up.
    pub link_up: bool,
    /// Addresses on `raven0`: the node's own address as a /32, so the
    /// interface has an IPv4 address and reverse-path filtering accepts
    /// forwarded traffic arriving on it.
    pub addresses: BTreeSet<IpNet>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
    pub routes: BTreeSet<Route>,
    pub rules: BTreeSet<Rule>,
}

/// Desired state plus what the planner could not honour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: State,
    pub warnings: Vec<String>,
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    CreateLink(VxlanLink),
    DeleteLink,
    SetMtu(u32),
    SetUp,
    AddAddress(IpNet),
    DeleteAddress(IpNet),
    ReplaceFdb(Fdb),
    DeleteFdb(Fdb),
    ReplaceNeighbour(Neighbour),
    DeleteNeighbour(Neighbour),
    /// A route whose (table, destination) slot holds no route of raven's:
    /// added exclusively, so that a foreign route (another protocol) in the
    /// same slot is never overwritten.
    AddRoute(Route),
    /// A route of raven's in the same (table, destination) slot changes.
    ReplaceRoute(Route),
    DeleteRoute(Route),
    AddRule(Rule),
    DeleteRule(Rule),
}

/// As the `ip` command that makes it, the tunnel devices shown as
/// `<tunnel>` and `<direct>` (see [`Op::command`] for their names).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command("<tunnel>", "<direct>"))
    }
}

impl Op {
    /// The `ip` (or `bridge`) command that makes this change, naming the
    /// tunnel device `tunnel` and the direct-path device `direct`.
    pub fn command(&self, tunnel: &str, direct: &str) -> String {
        let mut out = String::new();
        let _ = self.write_command(&mut out, tunnel, direct);
        out
    }

    fn write_command(&self, f: &mut impl fmt::Write, tunnel: &str, direct: &str) -> fmt::Result {
        match self {
            Op::CreateLink(l) => write!(
                f,
                "ip link add {VXLAN_DEV} type vxlan id {} dstport {} local {} nolearning; mtu {} address {}",
                l.vni, l.port, l.local, l.mtu, l.mac
            ),
            Op::DeleteLink => write!(f, "ip link del {VXLAN_DEV}"),
            Op::SetMtu(m) => write!(f, "ip link set {VXLAN_DEV} mtu {m}"),
            Op::SetUp => write!(f, "ip link set {VXLAN_DEV} up"),
            Op::AddAddress(a) => write!(f, "ip addr add {a} dev {VXLAN_DEV}"),
            Op::DeleteAddress(a) => write!(f, "ip addr del {a} dev {VXLAN_DEV}"),
            Op::ReplaceFdb(e) => write!(
                f,
                "bridge fdb replace {} dev {VXLAN_DEV} dst {} self permanent",
                e.mac, e.dst
            ),
            Op::DeleteFdb(e) => write!(
                f,
                "bridge fdb del {} dev {VXLAN_DEV} dst {} self",
                e.mac, e.dst
            ),
            Op::ReplaceNeighbour(n) => write!(
                f,
                "ip neigh replace {} lladdr {} dev {VXLAN_DEV} nud permanent",
                n.ip, n.mac
            ),
            Op::DeleteNeighbour(n) => write!(f, "ip neigh del {} dev {VXLAN_DEV}", n.ip),
            Op::AddRoute(r) | Op::ReplaceRoute(r) => write!(
                f,
                "ip route {} {}{} dev {} table {} proto {ROUTE_PROTOCOL}{}",
                if matches!(self, Op::AddRoute(_)) {
                    "add"
                } else {
                    "replace"
                },
                r.dst,
                r.via.map(|v| format!(" via {v}")).unwrap_or_default(),
                match r.dev {
                    RouteDev::Vxlan => format!("{VXLAN_DEV} onlink"),
                    RouteDev::Tunnel => tunnel.to_owned(),
                    RouteDev::Direct => direct.to_owned(),
                    RouteDev::Other => "<other>".to_owned(),
                },
                r.table,
                if r.mtu > 0 {
                    format!(" mtu {}", r.mtu)
                } else {
                    String::new()
                }
            ),
            Op::DeleteRoute(r) => write!(
                f,
                "ip route del {} table {} proto {ROUTE_PROTOCOL}",
                r.dst, r.table
            ),
            Op::AddRule(r) | Op::DeleteRule(r) => {
                let verb = if matches!(self, Op::AddRule(_)) {
                    "add"
                } else {
                    "del"
                };
                let fam = if r.v6 { "-6 " } else { "" };
                let iif = r
                    .iif
                    .as_ref()
                    .map(|i| format!(" iif {i}"))
                    .unwrap_or_default();
                write!(
                    f,
                    "ip {fam}rule {verb} priority {}{iif} lookup {}",
                    r.priority, r.table
                )
            }
        }
    }
}

/// What `desired` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInputs {
    pub me: Option<NodeView>,
    pub gateways: Vec<GatewayView>,
    /// Domains known by their prefixes alone (the compact member view:
    /// `prefixes/` resources instead of `gateway/`): routed and exempted
    /// from masquerade exactly as a [`GatewayView`] with the same prefixes.
    pub remote: Vec<DomainPrefixes>,
    pub settings: Option<Settings>,
    /// Local failover choices: gateway → the node acting as its gateway.
    pub active_override: BTreeMap<GatewayName, NodeName>,
    pub underlay_mtu: u32,
    pub tunnel_dev: String,
    /// The tunnel device exists (the tunnel driver brought it up): remote
    /// prefixes may be routed into it. Make before break.
    pub tunnel_up: bool,
    /// Which remote gateways a NATed gateway reaches on its direct-path
    /// device instead of through the relay.
    pub direct: DirectRoutes,
}

/// Nothing known yet: no node, no gateways, no settings, an underlay MTU of
/// 1500 and the default tunnel device, down. Tests start from this and name
/// the fields they are about.
impl Default for NodeInputs {
    fn default() -> Self {
        Self {
            me: None,
            gateways: Vec::new(),
            remote: Vec::new(),
            settings: None,
            active_override: BTreeMap::new(),
            underlay_mtu: 1500,
            tunnel_dev: DEFAULT_TUNNEL_DEV.to_owned(),
            tunnel_up: false,
            direct: DirectRoutes::default(),
        }
    }
}

/// The direct-path device of a NATed gateway (`crate::tunnel::direct_spec`)
/// and the gateways routed into it. Both of its devices accept a direct
/// peer's traffic at all times (the relay's peer on the tunnel device, the
/// peer itself on this one), so moving a gateway's routes between them is
/// one `ip route replace` per prefix and loses nothing, whichever side of a
/// path moves first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectRoutes {
    pub dev: String,
    /// The device exists and carries the peers of `gateways`.
    pub up: bool,
    /// Gateways whose direct path handshakes and is heard.
    pub gateways: BTreeSet<GatewayName>,
}

fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

/// The next hop over `raven0` towards the member with private address `ip`
/// for destinations of `dst`'s family.
fn next_hop(member: Ipv4Addr, dst: &IpNet) -> IpAddr {
    match dst {
        IpNet::V4(_) => IpAddr::V4(member),
        IpNet::V6(_) => IpAddr::V6(link_local(mac_for(member))),
    }
}

/// The node that currently carries `gw`'s tunnel.
pub fn active_node<'a>(
    gw: &'a GatewayView,
    overrides: &'a BTreeMap<GatewayName, NodeName>,
) -> Option<&'a NodeName> {
    overrides
        .get(&gw.name)
        .or(gw.active_tunnel.as_ref().map(|t| &t.node))
}

/// The remote prefixes a node of `my_gw` routes to other domains (and
/// exempts from the CNI's masquerade, see [`super::skipnat`]): everything of
/// the other gateways, minus host prefixes that are an address of my own
/// domain (overlapping private ranges across NATs are common; my own members
/// are always reached directly) or a tunnel endpoint's public address
/// (reached over the underlay, never through the tunnel it carries: a
/// routing loop that would cut the tunnel and the hub connection when a
/// gateway's public address is also its node IP). The other domains are
/// `gateways` and, in the compact member view, `remote` (the same facts:
/// [`DomainPrefixes::of`]). Pure.
pub fn routed_remote_prefixes(
    gateways: &[GatewayView],
    remote: &[DomainPrefixes],
    my_gw: &GatewayView,
) -> Vec<IpNet> {
    let excluded = Excluded::of(gateways, remote, my_gw);
    let mut out: Vec<IpNet> = gateways
        .iter()
        .filter(|g| g.name != my_gw.name)
        .flat_map(GatewayView::prefixes)
        .chain(
            remote
                .iter()
                .filter(|d| d.gateway != my_gw.name)
                .flat_map(|d| d.prefixes.iter().copied()),
        )
        .filter(|p| !excluded.excludes(p))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The addresses whose host prefixes are never routed to a remote domain
/// (see [`routed_remote_prefixes`]): my domain's members and the public
/// addresses of every tunnel endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excluded {
    pub own: BTreeSet<IpAddr>,
    pub endpoints: BTreeSet<IpAddr>,
}

impl Excluded {
    pub fn of(gateways: &[GatewayView], remote: &[DomainPrefixes], my_gw: &GatewayView) -> Self {
        Self {
            own: my_gw.members.iter().map(|m| m.private_ip).collect(),
            endpoints: gateways
                .iter()
                .flat_map(endpoint_ips)
                .chain(
                    remote
                        .iter()
                        .flat_map(|d| d.endpoint_addresses.iter().copied()),
                )
                .collect(),
        }
    }

    /// Whether `p` is a host prefix of an excluded address.
    pub fn excludes(&self, p: &IpNet) -> bool {
        p.prefix_len() == p.max_prefix_len()
            && (self.own.contains(&p.addr()) || self.endpoints.contains(&p.addr()))
    }
}

/// The public addresses of `g`'s tunnel endpoints (candidates and the
/// active one; the active one usually twice).
pub fn endpoint_ips(g: &GatewayView) -> impl Iterator<Item = IpAddr> + '_ {
    g.tunnel_candidates
        .iter()
        .chain(g.active_tunnel.iter())
        .filter_map(|e| e.public_ip)
}

/// How this node routes a remote prefix (table [`TABLE_REMOTE`]): what
/// its role in its domain decides, the same for every remote prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteRoutes {
    /// Not at all: the gateway's tunnel is not up yet (make before break),
    /// or the domain has no usable active gateway node.
    None,
    /// A member: over `raven0` to the active gateway node `gateway`.
    Via { gateway: Ipv4Addr, mtu: u32 },
    /// The active gateway node: into the tunnel, or into the direct-path
    /// device for the prefixes of gateways reached directly.
    Tunnel { mtu: u32 },
}

impl RemoteRoutes {
    /// The route to remote prefix `dst` (`direct`: it belongs to a gateway
    /// reached on the direct-path device).
    pub fn route(self, dst: IpNet, direct: bool) -> Option<Route> {
        match self {
            RemoteRoutes::None => None,
            RemoteRoutes::Via { gateway, mtu } => Some(Route {
                table: TABLE_REMOTE,
                via: Some(next_hop(gateway, &dst)),
                dev: RouteDev::Vxlan,
                dst,
                mtu,
            }),
            RemoteRoutes::Tunnel { mtu } => Some(Route {
                table: TABLE_REMOTE,
                dst,
                dev: if direct {
                    RouteDev::Direct
                } else {
                    RouteDev::Tunnel
                },
                via: None,
                mtu,
            }),
        }
    }
}

/// What the desired state of a node holds besides its routes to remote
/// prefixes: everything that depends on the node and its own domain only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPart {
    /// raven0, its address, the FDB entries and neighbours of the other
    /// members, the return routes (on the gateway) and the rules.
    pub state: State,
    pub warnings: Vec<String>,
    /// How every remote prefix is routed.
    pub remote: RemoteRoutes,
}

/// The node, its IPv4 private address and its gateway in `inputs`, when it
/// has all three (otherwise it wants nothing).
pub fn mine(inputs: &NodeInputs) -> Option<(&NodeView, Ipv4Addr, &GatewayView)> {
    let me = inputs.me.as_ref()?;
    let (Some(gw_name), Some(private)) = (&me.gateway, me.private_ip.and_then(ipv4)) else {
        return None;
    };
    let my_gw = inputs.gateways.iter().find(|g| &g.name == gw_name)?;
    Some((me, private, my_gw))
}

/// The local part of the desired state of `me` (private address
/// `private`) in domain `my_gw`. Pure; reads no other gateway.
pub fn local_part(
    inputs: &NodeInputs,
    me: &NodeView,
    private: Ipv4Addr,
    my_gw: &GatewayView,
) -> LocalPart {
    let mut out = LocalPart {
        state: State::default(),
        warnings: Vec::new(),
        remote: RemoteRoutes::None,
    };
    let gw_name = &my_gw.name;
    let port = inputs
        .settings
        .as_ref()
        .map_or(VXLAN_PORT, |s| s.vxlan_port);
    // raven0's outer header is of the family of its local address.
    let link_mtu = inputs
        .underlay_mtu
        .saturating_sub(vxlan_overhead(IpAddr::V4(private)));
    out.state.link = Some(VxlanLink {
        vni: VXLAN_VNI,
        port,
        local: private,
        mtu: link_mtu,
        mac: mac_for(private),
    });
    out.state.link_up = true;
    out.state.addresses.insert(IpNet::from(IpAddr::V4(private)));

    // Neighbours and FDB entries for every other member of my domain.
    let mut members: BTreeMap<Ipv4Addr, &NodeName> = BTreeMap::new();
    for m in &my_gw.members {
        let Some(ip) = ipv4(m.private_ip) else {
            out.warnings.push(format!(
                "member {} has no IPv4 address; not reachable over {VXLAN_DEV}",
                m.node
            ));
            continue;
        };
        if let Some(other) = members.insert(ip, &m.node) {
            out.warnings.push(format!(
                "members {other} and {} share the address {ip}",
                m.node
            ));
        }
        // Never an entry for my own address, also when another member
        // claims it (warned above): it would send frames back to myself.
        if m.node == me.name || ip == private {
            continue;
        }
        let mac = mac_for(ip);
        out.state.fdb.insert(Fdb { mac, dst: ip });
        out.state.neighbours.insert(Neighbour {
            ip: IpAddr::V4(ip),
            mac,
        });
        out.state.neighbours.insert(Neighbour {
            ip: IpAddr::V6(link_local(mac)),
            mac,
        });
    }

    let active = active_node(my_gw, &inputs.active_override);
    match active {
        Some(a) if *a == me.name => {
            // I am the gateway: remote prefixes go into the tunnel once it
            // is up (make before break), and traffic from the tunnel finds
            // members here.
            if inputs.tunnel_up {
                out.remote = RemoteRoutes::Tunnel {
                    mtu: inputs.underlay_mtu.saturating_sub(TUNNEL_OVERHEAD),
                };
            }
            for m in my_gw.members.iter().filter(|m| m.node != me.name) {
                let Some(ip) = ipv4(m.private_ip) else {
                    continue;
                };
                for s in &m.subnets {
                    out.state.routes.insert(Route {
                        table: TABLE_RETURN,
                        dst: *s,
                        dev: RouteDev::Vxlan,
                        via: Some(next_hop(ip, s)),
                        mtu: 0,
                    });
                }
            }
        }
        Some(a) => {
            let gw_ip = my_gw
                .members
                .iter()
                .find(|m| &m.node == a)
                .and_then(|m| ipv4(m.private_ip));
            match gw_ip {
                // Two hops, one after the other (not nested): over raven0
                // to the gateway, which decapsulates, then into its tunnel.
                // The packet must fit both.
                Some(gateway) => {
                    out.remote = RemoteRoutes::Via {
                        gateway,
                        mtu: path_mtu(&[link_mtu, tunnel_mtu(inputs.underlay_mtu)]),
                    };
                }
                None => out.warnings.push(format!(
                    "active gateway node {a} of {gw_name} has no IPv4 address"
                )),
            }
        }
        None => out.warnings.push(format!(
            "gateway {gw_name} has no active tunnel endpoint; remote domains are unreachable"
        )),
    }
    for v6 in [false, true] {
        out.state.rules.insert(Rule {
            v6,
            priority: PRIORITY_REMOTE,
            table: TABLE_REMOTE,
            iif: None,
        });
        out.state.rules.insert(Rule {
            v6,
            priority: PRIORITY_RETURN,
            table: TABLE_RETURN,
            iif: Some(inputs.tunnel_dev.clone()),
        });
        if inputs.direct.up && active == Some(&me.name) {
            out.state.rules.insert(Rule {
                v6,
                priority: PRIORITY_RETURN,
                table: TABLE_RETURN,
                iif: Some(inputs.direct.dev.clone()),
            });
        }
    }
    out
}

/// The compact member view of the full view `full`: the node's own
/// gateway, every other domain as its prefix set — what the hub sends a
/// member that is neither tunnel candidate nor active proxy. Tests and the
/// edge benchmark compare the two forms with it.
pub fn compact_view(full: &NodeInputs) -> NodeInputs {
    let mine = full.me.as_ref().and_then(|m| m.gateway.as_ref());
    let (own, others): (Vec<&GatewayView>, Vec<&GatewayView>) =
        full.gateways.iter().partition(|g| Some(&g.name) == mine);
    NodeInputs {
        gateways: own.into_iter().cloned().collect(),
        remote: others.into_iter().map(DomainPrefixes::of).collect(),
        ..full.clone()
    }
}

/// Whether the gateway `name` is reached on the direct-path device.
pub fn is_direct(inputs: &NodeInputs, name: &GatewayName) -> bool {
    inputs.direct.up && inputs.direct.gateways.contains(name)
}

/// Computes the desired dataplane of a node: its [`local_part`] and a
/// route for each of [`routed_remote_prefixes`]. Pure.
pub fn desired(inputs: &NodeInputs) -> Desired {
    let Some((me, private, my_gw)) = mine(inputs) else {
        return Desired::default();
    };
    let local = local_part(inputs, me, private, my_gw);
    let mut out = Desired {
        state: local.state,
        warnings: local.warnings,
    };
    if local.remote == RemoteRoutes::None {
        return out;
    }
    let direct: BTreeSet<IpNet> = inputs
        .gateways
        .iter()
        .filter(|g| is_direct(inputs, &g.name))
        .flat_map(GatewayView::prefixes)
        .collect();
    for dst in routed_remote_prefixes(&inputs.gateways, &inputs.remote, my_gw) {
        out.state
            .routes
            .extend(local.remote.route(dst, direct.contains(&dst)));
    }
    out
}

/// The changes that turn `observed` into `desired`, make-before-break:
/// link, then FDB/neighbours, then routes, then rules; removals of routes
/// and rules before removal of the link. Pure.
pub fn diff(desired: &State, observed: &State) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut recreated = false;
    match (&desired.link, &observed.link) {
        (Some(d), None) => {
            ops.push(Op::CreateLink(d.clone()));
            recreated = true;
        }
        (Some(d), Some(o)) => {
            if (d.vni, d.port, d.local, d.mac) != (o.vni, o.port, o.local, o.mac) {
                ops.push(Op::DeleteLink);
                ops.push(Op::CreateLink(d.clone()));
                recreated = true;
            } else if d.mtu != o.mtu {
                ops.push(Op::SetMtu(d.mtu));
            }
        }
        _ => {}
    }
    if desired.link.is_some() && (recreated || !observed.link_up) {
        ops.push(Op::SetUp);
    }
    // A recreated link lost its addresses, FDB, neighbours and the routes
    // through it; routes through other devices (the tunnel) survive.
    let survivors;
    let base = if recreated {
        survivors = State {
            routes: observed
                .routes
                .iter()
                .filter(|r| r.dev != RouteDev::Vxlan)
                .cloned()
                .collect(),
            ..State::default()
        };
        &survivors
    } else {
        observed
    };
    let linked = desired.link.is_some();
    if linked {
        ops.extend(
            desired
                .addresses
                .difference(&base.addresses)
                .copied()
                .map(Op::AddAddress),
        );
        ops.extend(
            desired
                .fdb
                .difference(&base.fdb)
                .copied()
                .map(Op::ReplaceFdb),
        );
        ops.extend(
            desired
                .neighbours
                .difference(&base.neighbours)
                .copied()
                .map(Op::ReplaceNeighbour),
        );
        let held: BTreeSet<(u32, IpNet)> = base.routes.iter().map(|r| (r.table, r.dst)).collect();
        ops.extend(desired.routes.difference(&base.routes).map(|r| {
            if held.contains(&(r.table, r.dst)) {
                Op::ReplaceRoute(r.clone())
            } else {
                Op::AddRoute(r.clone())
            }
        }));
    }
    ops.extend(
        desired
            .rules
            .difference(&observed.rules)
            .cloned()
            .map(Op::AddRule),
    );
    // Removals.
    ops.extend(
        observed
            .rules
            .difference(&desired.rules)
            .cloned()
            .map(Op::DeleteRule),
    );
    if desired.link.is_some() || observed.link.is_none() {
        // Stale routes of a route set that changes shape (same dst, new via)
        // are replaced above; only routes whose destination is gone go.
        let wanted: BTreeSet<(u32, IpNet)> =
            desired.routes.iter().map(|r| (r.table, r.dst)).collect();
        ops.extend(
            base.routes
                .iter()
                .filter(|r| !wanted.contains(&(r.table, r.dst)))
                .cloned()
                .map(Op::DeleteRoute),
        );
        if desired.link.is_some() {
            ops.extend(
                base.addresses
                    .difference(&desired.addresses)
                    .copied()
                    .map(Op::DeleteAddress),
            );
            ops.extend(
                base.fdb
                    .difference(&desired.fdb)
                    .copied()
                    .map(Op::DeleteFdb),
            );
            ops.extend(
                base.neighbours
                    .difference(&desired.neighbours)
                    .copied()
                    .map(Op::DeleteNeighbour),
            );
        }
    } else {
        // Routes via raven0 and its entries vanish with the link.
        ops.extend(observed.routes.iter().cloned().map(Op::DeleteRoute));
        ops.push(Op::DeleteLink);
    }
    ops
}

/// Applies `ops` to an in-memory state the way the kernel would. Used by
/// the planner's property tests and by `plan --dry-run` summaries.
pub fn simulate(state: &mut State, ops: &[Op]) {
    for op in ops {
        match op {
            Op::CreateLink(l) => {
                if state.link.is_none() {
                    state.link = Some(l.clone());
                    state.link_up = false;
                }
            }
            Op::DeleteLink => {
                state.link = None;
                state.link_up = false;
                state.addresses.clear();
                state.fdb.clear();
                state.neighbours.clear();
                state.routes.retain(|r| r.dev != RouteDev::Vxlan);
            }
            Op::SetMtu(m) => {
                if let Some(l) = &mut state.link {
                    l.mtu = *m;
                }
            }
            Op::SetUp => state.link_up = state.link.is_some(),
            Op::AddAddress(a) => {
                state.addresses.insert(*a);
            }
            Op::DeleteAddress(a) => {
                state.addresses.remove(a);
            }
            Op::ReplaceFdb(e) => {
                state.fdb.retain(|x| x.mac != e.mac);
                state.fdb.insert(*e);
            }
            Op::DeleteFdb(e) => {
                state.fdb.remove(e);
            }
            Op::ReplaceNeighbour(n) => {
                state.neighbours.retain(|x| x.ip != n.ip);
                state.neighbours.insert(*n);
            }
            Op::DeleteNeighbour(n) => {
                state.neighbours.remove(n);
            }
            Op::AddRoute(r) => {
                // The kernel refuses an occupied slot (`File exists`).
                if !state
                    .routes
                    .iter()
                    .any(|x| (x.table, x.dst) == (r.table, r.dst))
                {
                    state.routes.insert(r.clone());
                }
            }
            Op::ReplaceRoute(r) => {
                state
                    .routes
                    .retain(|x| (x.table, x.dst) != (r.table, r.dst));
                state.routes.insert(r.clone());
            }
            Op::DeleteRoute(r) => {
                state
                    .routes
                    .retain(|x| (x.table, x.dst) != (r.table, r.dst));
            }
            Op::AddRule(r) => {
                state.rules.insert(r.clone());
            }
            Op::DeleteRule(r) => {
                state.rules.remove(r);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    use raven_model::fixtures;
    use raven_model::topology::{GatewayEndpoint, Member};

    fn link() -> impl Strategy<Value = Option<VxlanLink>> {
        proptest::option::of(
            (
                1u32..3,
                prop_oneof![Just(4472u16), Just(4789u16)],
                1u8..4,
                prop_oneof![Just(1450u32), Just(1400u32)],
            )
                .prop_map(|(vni, port, host, mtu)| {
                    let local = Ipv4Addr::new(172, 16, 0, host);
                    VxlanLink {
                        vni,
                        port,
                        local,
                        mtu,
                        mac: mac_for(local),
                    }
                }),
        )
    }

    fn dst(v6: bool, net: u8) -> IpNet {
        if v6 {
            IpNet::new(
                IpAddr::V6(Ipv6Addr::new(0xfd10, net.into(), 0, 0, 0, 0, 0, 0)),
                64,
            )
        } else {
            IpNet::new(IpAddr::V4(Ipv4Addr::new(10, net, 0, 0)), 24)
        }
        .unwrap_or_default()
    }

    /// A route of the shapes `desired` produces.
    fn route() -> impl Strategy<Value = Route> {
        (
            prop_oneof![Just(TABLE_REMOTE), Just(TABLE_RETURN)],
            any::<bool>(),
            0u8..6,
            1u8..4,
            prop_oneof![Just(0u32), Just(1370u32)],
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(table, v6, net, via, mtu, tunnel)| {
                let dst = dst(v6, net);
                if tunnel {
                    Route {
                        table,
                        dst,
                        dev: RouteDev::Tunnel,
                        via: None,
                        mtu,
                    }
                } else {
                    Route {
                        table,
                        dst,
                        dev: RouteDev::Vxlan,
                        via: Some(next_hop(Ipv4Addr::new(172, 16, 0, via), &dst)),
                        mtu,
                    }
                }
            })
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (any::<bool>(), any::<bool>()).prop_map(|(v6, ret)| Rule {
            v6,
            priority: if ret {
                PRIORITY_RETURN
            } else {
                PRIORITY_REMOTE
            },
            table: if ret { TABLE_RETURN } else { TABLE_REMOTE },
            iif: ret.then(|| DEFAULT_TUNNEL_DEV.to_owned()),
        })
    }

    /// A consistent state: what `desired` could produce, or the kernel hold.
    fn state() -> impl Strategy<Value = State> {
        (
            link(),
            any::<bool>(),
            proptest::collection::btree_set(1u8..5, 0..4),
            proptest::collection::btree_set(route(), 0..8),
            proptest::collection::btree_set(rule(), 0..4),
        )
            .prop_map(|(link, up, members, routes, rules)| {
                let has = link.is_some();
                let ips: Vec<Ipv4Addr> = if has {
                    members
                        .into_iter()
                        .map(|h| Ipv4Addr::new(172, 16, 0, h))
                        .collect()
                } else {
                    Vec::new()
                };
                let mut seen = BTreeSet::new();
                State {
                    link,
                    link_up: has && up,
                    addresses: ips
                        .iter()
                        .take(1)
                        .map(|ip| IpNet::from(IpAddr::V4(*ip)))
                        .collect(),
                    neighbours: ips
                        .iter()
                        .flat_map(|ip| {
                            let mac = mac_for(*ip);
                            [
                                Neighbour {
                                    ip: IpAddr::V4(*ip),
                                    mac,
                                },
                                Neighbour {
                                    ip: IpAddr::V6(link_local(mac)),
                                    mac,
                                },
                            ]
                        })
                        .collect(),
                    fdb: ips
                        .iter()
                        .map(|ip| Fdb {
                            mac: mac_for(*ip),
                            dst: *ip,
                        })
                        .collect(),
                    // One route per (table, dst), as the kernel keeps them;
                    // routes through raven0 only while it exists.
                    routes: routes
                        .into_iter()
                        .filter(|r| has || r.dev != RouteDev::Vxlan)
                        .filter(|r| seen.insert((r.table, r.dst)))
                        .collect(),
                    rules,
                }
            })
    }

    /// A desired state: the link up, routes only with the link.
    fn wanted() -> impl Strategy<Value = State> {
        state().prop_map(|mut s| {
            s.link_up = s.link.is_some();
            if s.link.is_none() {
                s.routes.clear();
            }
            s
        })
    }

    /// What a kernel may hold after drift and hand edits: a consistent state
    /// plus stray entries on raven0 (an all-zero FDB entry, an entry with a
    /// wrong destination, a neighbour with a wrong MAC, a stray address) and
    /// raven routes through a foreign device.
    fn observed() -> impl Strategy<Value = State> {
        (
            state(),
            any::<[bool; 4]>(),
            proptest::option::of((0u8..6, any::<bool>())),
        )
            .prop_map(|(mut s, stray, other)| {
                if s.link.is_some() {
                    let ip = Ipv4Addr::new(172, 16, 0, 9);
                    if stray[0] {
                        s.fdb.insert(Fdb {
                            mac: Mac([0; 6]),
                            dst: ip,
                        });
                    }
                    if stray[1] {
                        s.fdb.insert(Fdb {
                            mac: mac_for(Ipv4Addr::new(172, 16, 0, 1)),
                            dst: ip,
                        });
                    }
                    if stray[2] {
                        s.neighbours.insert(Neighbour {
                            ip: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2)),
                            mac: mac_for(ip),
                        });
                    }
                    if stray[3] {
                        s.addresses.insert(IpNet::from(IpAddr::V4(ip)));
                    }
                }
                if let Some((net, v6)) = other {
                    let dst = dst(v6, net);
                    if !s
                        .routes
                        .iter()
                        .any(|r| (r.table, r.dst) == (TABLE_REMOTE, dst))
                    {
                        s.routes.insert(Route {
                            table: TABLE_REMOTE,
                            dst,
                            dev: RouteDev::Other,
                            via: None,
                            mtu: 0,
                        });
                    }
                }
                s
            })
    }

    fn is_add(op: &Op) -> bool {
        matches!(
            op,
            Op::AddAddress(_)
                | Op::ReplaceFdb(_)
                | Op::ReplaceNeighbour(_)
                | Op::AddRoute(_)
                | Op::ReplaceRoute(_)
                | Op::AddRule(_)
        )
    }

    fn is_delete(op: &Op) -> bool {
        matches!(
            op,
            Op::DeleteAddress(_)
                | Op::DeleteFdb(_)
                | Op::DeleteNeighbour(_)
                | Op::DeleteRoute(_)
                | Op::DeleteRule(_)
        )
    }

    proptest! {
        #[test]
        fn applying_the_plan_then_planning_again_gives_nothing(want in wanted(), have in observed()) {
            let mut kernel = have.clone();
            simulate(&mut kernel, &diff(&want, &have));
            prop_assert_eq!(diff(&want, &kernel), vec![]);
            prop_assert_eq!(kernel, want);
        }

        #[test]
        fn a_kernel_that_matches_needs_no_change(want in wanted()) {
            prop_assert_eq!(diff(&want, &want), vec![]);
        }

        #[test]
        fn deletions_only_name_what_was_observed(want in wanted(), have in observed()) {
            for op in diff(&want, &have) {
                match &op {
                    Op::DeleteRoute(r) => prop_assert!(have.routes.contains(r), "{}", op),
                    Op::DeleteRule(r) => prop_assert!(have.rules.contains(r), "{}", op),
                    Op::DeleteFdb(e) => prop_assert!(have.fdb.contains(e), "{}", op),
                    Op::DeleteNeighbour(n) => prop_assert!(have.neighbours.contains(n), "{}", op),
                    Op::DeleteAddress(a) => prop_assert!(have.addresses.contains(a), "{}", op),
                    Op::DeleteLink => prop_assert!(have.link.is_some()),
                    _ => {}
                }
            }
        }

        #[test]
        fn an_occupied_route_slot_is_replaced_a_free_one_added(want in wanted(), have in observed()) {
            let recreated = diff(&want, &have).contains(&Op::DeleteLink);
            for op in diff(&want, &have) {
                let (Op::AddRoute(r) | Op::ReplaceRoute(r)) = &op else { continue };
                let held = have.routes.iter().any(|x| {
                    (x.table, x.dst) == (r.table, r.dst) && !(recreated && x.dev == RouteDev::Vxlan)
                });
                prop_assert_eq!(held, matches!(op, Op::ReplaceRoute(_)), "{}", op);
            }
        }

        #[test]
        fn an_mtu_change_alone_never_recreates_the_link(
            have in state().prop_filter("raven0 exists", |s| s.link.is_some()),
            mtu in 1200u32..1500,
        ) {
            let mut want = have.clone();
            want.link_up = true;
            if let Some(l) = &mut want.link { l.mtu = mtu; }
            let ops = diff(&want, &have);
            prop_assert!(!ops.iter().any(|o| matches!(o, Op::DeleteLink | Op::CreateLink(_))));
        }

        #[test]
        fn make_before_break(want in wanted(), have in observed()) {
            let ops = diff(&want, &have);
            let last_add = ops.iter().rposition(is_add);
            let first_delete = ops.iter().position(is_delete);
            if let (Some(a), Some(d)) = (last_add, first_delete) {
                prop_assert!(a < d, "an addition after a removal: {:?}", ops);
            }
            if let (Some(c), Some(r)) = (
                ops.iter().position(|o| matches!(o, Op::CreateLink(_))),
                ops.iter().position(|o| matches!(o, Op::AddRoute(_) | Op::ReplaceRoute(_))),
            ) {
                prop_assert!(c < r);
            }
            // raven0 goes first (a recreate: what hangs on the old link goes
            // with it) or last (teardown: routes and rules before the link).
            if let Some(l) = ops.iter().position(|o| *o == Op::DeleteLink) {
                if want.link.is_some() {
                    prop_assert_eq!(l, 0);
                } else {
                    prop_assert_eq!(l, ops.len() - 1);
                }
            }
        }
    }

    fn node(n: String) -> NodeName {
        NodeName::new(n).unwrap_or_else(|_| unreachable!())
    }

    fn gateway_name(g: usize) -> GatewayName {
        GatewayName::new(format!("gw-{g}")).unwrap_or_else(|_| unreachable!())
    }

    fn endpoint(n: &NodeName) -> GatewayEndpoint {
        GatewayEndpoint {
            under_nat: true,
            ..fixtures::endpoint(n.as_str(), 4500)
        }
    }

    /// A cluster of 1–4 domains of 1–4 members. Private addresses are drawn
    /// from one small range, so domains overlap (as behind NATs) and members
    /// of one domain may even collide; some subnets are IPv6.
    pub(crate) fn cluster() -> impl Strategy<Value = NodeInputs> {
        let member = (1u8..6, any::<bool>(), any::<bool>());
        let domain = (
            proptest::collection::vec(member, 1..4),
            proptest::option::of(0usize..4),
        );
        (
            proptest::collection::vec(domain, 1..4),
            0usize..4,
            prop_oneof![Just(false), Just(true)],
            proptest::option::of(0usize..4),
            any::<bool>(),
        )
            .prop_map(|(domains, me_index, no_ip, override_to, tunnel_up)| {
                let gateways: Vec<GatewayView> = domains
                    .iter()
                    .enumerate()
                    .map(|(g, (members, active))| {
                        let members: Vec<Member> = members
                            .iter()
                            .enumerate()
                            .map(|(i, (host, ready, v6))| {
                                let mut subnets = vec![dst(false, (g * 10 + i) as u8)];
                                if *v6 {
                                    subnets.push(dst(true, (g * 10 + i) as u8));
                                }
                                Member {
                                    node: node(format!("n-{g}-{i}")),
                                    private_ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, *host)),
                                    subnets,
                                    ready: *ready,
                                }
                            })
                            .collect();
                        GatewayView {
                            under_nat: true,
                            active_tunnel: active
                                .and_then(|a| members.get(a))
                                .map(|m| endpoint(&m.node)),
                            members,
                            ..fixtures::gateway(gateway_name(g).as_str())
                        }
                    })
                    .collect();
                let mine = &gateways[0].members[me_index % gateways[0].members.len()];
                let me = NodeView {
                    private_ip: (!no_ip).then_some(mine.private_ip),
                    subnets: mine.subnets.clone(),
                    ..fixtures::node_view(mine.node.as_str(), Some(gateway_name(0).as_str()))
                };
                let mut active_override = BTreeMap::new();
                if let Some(m) = override_to.and_then(|o| gateways[0].members.get(o)) {
                    active_override.insert(gateway_name(0), m.node.clone());
                }
                NodeInputs {
                    me: Some(me),
                    gateways,
                    active_override,
                    tunnel_up,
                    ..Default::default()
                }
            })
    }

    proptest! {
        #[test]
        fn desired_never_holds_an_all_zero_or_self_fdb_entry(inputs in cluster()) {
            let d = desired(&inputs);
            let me = inputs.me.as_ref().and_then(|m| m.private_ip).and_then(ipv4);
            for e in &d.state.fdb {
                prop_assert_ne!(e.mac, Mac([0; 6]));
                prop_assert_ne!(Some(e.dst), me);
                prop_assert_eq!(e.mac, mac_for(e.dst));
            }
            for n in &d.state.neighbours {
                prop_assert!(d.state.fdb.iter().any(|e| e.mac == n.mac), "neighbour without FDB entry");
            }
        }

        #[test]
        fn desired_routes_follow_the_role_of_the_node(inputs in cluster()) {
            let d = desired(&inputs);
            let Some(me) = &inputs.me else { return Ok(()) };
            if me.private_ip.is_none() {
                prop_assert_eq!(d.state, State::default());
                return Ok(());
            }
            let gw = &inputs.gateways[0];
            let active = active_node(gw, &inputs.active_override);
            let link_mtu = inputs.underlay_mtu - VXLAN_OVERHEAD;
            for r in &d.state.routes {
                match active {
                    Some(a) if *a == me.name => {
                        if r.table == TABLE_REMOTE {
                            prop_assert!(inputs.tunnel_up && r.dev == RouteDev::Tunnel);
                        } else {
                            prop_assert_eq!(r.table, TABLE_RETURN);
                            prop_assert_eq!(r.dev, RouteDev::Vxlan);
                        }
                    }
                    Some(a) => {
                        let gw_ip = gw.members.iter().find(|m| &m.node == a).and_then(|m| ipv4(m.private_ip));
                        prop_assert_eq!(r.table, TABLE_REMOTE);
                        prop_assert_eq!(r.mtu, link_mtu.min(inputs.underlay_mtu - TUNNEL_OVERHEAD));
                        prop_assert_eq!(r.via, gw_ip.map(|ip| next_hop(ip, &r.dst)));
                        prop_assert_eq!(r.via.map(|v| v.is_ipv4()), Some(r.dst.addr().is_ipv4()));
                    }
                    None => prop_assert!(false, "routes without an active gateway"),
                }
            }
            prop_assert!(d.state.rules.iter().all(|r| [PRIORITY_REMOTE, PRIORITY_RETURN].contains(&r.priority)));
        }

        /// A member's packet to a remote domain takes two hops, one after
        /// the other: over `raven0` to its gateway (VXLAN over the LAN),
        /// then into the tunnel (WireGuard over the gateway's underlay).
        /// Its route MTU is the largest packet that fits both, and the
        /// gateway's own routes into the tunnel carry the tunnel's MTU.
        #[test]
        fn every_route_mtu_is_the_largest_packet_that_fits_each_hop_it_takes(
            inputs in cluster(),
            underlay in 1280u32..9001,
        ) {
            let mut inputs = inputs;
            inputs.underlay_mtu = underlay;
            let d = desired(&inputs);
            let Some(link) = &d.state.link else { return Ok(()) };
            let tunnel = tunnel_mtu(underlay);
            for r in d.state.routes.iter().filter(|r| r.table == TABLE_REMOTE) {
                prop_assert_ne!(r.dev, RouteDev::Other, "desired never routes into a foreign device");
                // Over raven0 to the gateway, then its tunnel; or, on the
                // gateway, a tunnel device alone.
                let over_vxlan = r.dev == RouteDev::Vxlan;
                let hops: Vec<u32> = if over_vxlan { vec![link.mtu, tunnel] } else { vec![tunnel] };
                // Fits: each hop carries it within the underlay.
                prop_assert!(!over_vxlan || r.mtu + VXLAN_OVERHEAD <= underlay);
                prop_assert!(r.mtu + TUNNEL_OVERHEAD <= underlay);
                // Largest: one byte more overflows some hop.
                prop_assert_eq!(Some(r.mtu), hops.iter().copied().min(), "{}", r.dst);
            }
        }

        #[test]
        fn desired_does_not_depend_on_the_order_of_gateways_or_members(inputs in cluster(), k in 0usize..4) {
            let mut shuffled = inputs.clone();
            let n = shuffled.gateways.len();
            shuffled.gateways.rotate_left(k % n);
            for g in &mut shuffled.gateways {
                g.members.reverse();
            }
            let (a, b) = (desired(&inputs), desired(&shuffled));
            prop_assert_eq!(a.state, b.state);
        }

        #[test]
        fn a_node_without_gateway_wants_nothing(inputs in cluster()) {
            let mut inputs = inputs;
            if let Some(me) = &mut inputs.me {
                me.gateway = None;
            }
            prop_assert_eq!(desired(&inputs), Desired::default());
        }
    }

    fn view(name: &str, ip: &str, gw: &str, active: bool) -> NodeView {
        NodeView {
            private_ip: ip.parse().ok(),
            tunnel_active: active,
            tunnel_candidate: active,
            ..fixtures::node_view(name, Some(gw))
        }
    }

    /// A member holding one pod subnet.
    fn member(n: &str, ip: &str, subnet: &str) -> Member {
        fixtures::member(n, ip, &[subnet])
    }

    /// A NATed gateway whose first member is its active tunnel node.
    fn natted(name: &str, members: Vec<Member>) -> GatewayView {
        GatewayView {
            under_nat: true,
            active_tunnel: Some(endpoint(&members[0].node)),
            members,
            ..fixtures::gateway(name)
        }
    }

    #[test]
    fn a_gateway_on_its_direct_path_moves_by_route_replacement_only() {
        let mut inputs = NodeInputs {
            me: Some(view("a1", "192.168.1.1", "gw-a", true)),
            gateways: vec![
                natted("gw-a", vec![member("a1", "192.168.1.1", "10.1.1.0/24")]),
                natted("gw-b", vec![member("b1", "192.168.2.1", "10.2.1.0/24")]),
                natted("gw-c", vec![member("c1", "192.168.3.1", "10.3.1.0/24")]),
            ],
            tunnel_up: true,
            direct: DirectRoutes {
                dev: "raven-wg0d".into(),
                up: true,
                gateways: BTreeSet::new(),
            },
            ..Default::default()
        };
        let relayed = desired(&inputs);
        assert!(
            relayed
                .state
                .routes
                .iter()
                .all(|r| r.dev == RouteDev::Tunnel)
        );
        inputs.direct.gateways =
            [GatewayName::new("gw-c").unwrap_or_else(|_| unreachable!())].into();
        let direct = desired(&inputs);
        let on = |d: &Desired, dev: RouteDev| -> Vec<String> {
            d.state
                .routes
                .iter()
                .filter(|r| r.table == TABLE_REMOTE && r.dev == dev)
                .map(|r| r.dst.to_string())
                .collect()
        };
        assert_eq!(
            on(&direct, RouteDev::Direct),
            vec!["10.3.1.0/24", "192.168.3.1/32"]
        );
        assert_eq!(
            on(&direct, RouteDev::Tunnel),
            vec!["10.2.1.0/24", "192.168.2.1/32"]
        );
        assert!(
            direct
                .state
                .rules
                .iter()
                .any(|r| r.iif.as_deref() == Some("raven-wg0d")),
            "traffic from the direct device finds the members"
        );
        // Either way, only `ip route replace` of the moved prefixes (and the
        // direct device's rules when it first comes up): nothing is removed
        // first, so no packet meets a missing route.
        for (from, to) in [(&relayed, &direct), (&direct, &relayed)] {
            let ops = diff(&to.state, &from.state);
            let moved: Vec<&Op> = ops
                .iter()
                .filter(|o| !matches!(o, Op::AddRule(_) | Op::DeleteRule(_)))
                .collect();
            assert_eq!(moved.len(), 2, "{ops:?}");
            assert!(
                moved.iter().all(|o| matches!(o, Op::ReplaceRoute(_))),
                "{ops:?}"
            );
        }
        // Not up (yet): everything stays on the tunnel.
        inputs.direct.up = false;
        assert!(
            desired(&inputs)
                .state
                .routes
                .iter()
                .all(|r| r.dev != RouteDev::Direct)
        );
    }

    #[test]
    fn remote_member_address_equal_to_a_local_one_is_not_routed_away() {
        let inputs = NodeInputs {
            me: Some(view("a2", "192.168.1.2", "gw-a", false)),
            gateways: vec![
                natted(
                    "gw-a",
                    vec![
                        member("a1", "192.168.1.1", "10.1.1.0/24"),
                        member("a2", "192.168.1.2", "10.1.2.0/24"),
                    ],
                ),
                natted("gw-b", vec![member("b1", "192.168.1.1", "10.2.1.0/24")]),
            ],
            ..Default::default()
        };
        let d = desired(&inputs);
        let dsts: Vec<String> = d.state.routes.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(
            dsts,
            vec!["10.2.1.0/24"],
            "192.168.1.1/32 is a local member and stays local"
        );
        assert!(
            d.state
                .routes
                .iter()
                .all(|r| r.via == Some(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))) && r.mtu == 1420),
            "over raven0 (1450) and then the tunnel (1420): {:?}",
            d.state.routes
        );
    }
}
