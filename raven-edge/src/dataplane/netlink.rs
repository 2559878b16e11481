//! The kernel side: observe raven's objects with rtnetlink dumps, apply
//! planned operations, tear everything down on request. Runs in the network
//! namespace of the calling thread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteVia,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::model::{
    Fdb, Mac, Neighbour, Op, PRIORITY_REMOTE, PRIORITY_RETURN, ROUTE_PROTOCOL, Route, RouteDev,
    Rule, State, TABLE_REMOTE, TABLE_RETURN, VXLAN_DEV, VxlanLink,
};

/// A dataplane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{op}: {reason}")]
    Invalid { op: String, reason: String },
    /// Route operations the kernel refused, each named with its error; the
    /// other routes of the same batch were written.
    #[error("{} route operation(s) failed: {}", failed.len(), summarize(failed))]
    Routes { failed: Vec<RouteFailure> },
}

/// One route operation the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFailure {
    /// The operation, as `Op` displays it (`ip route add …`).
    pub op: String,
    /// The kernel's errno (positive), 0 when the failure is not the kernel's.
    pub errno: i32,
    /// What went wrong: the errno's text and the kernel's extended message.
    pub reason: String,
}

impl std::fmt::Display for RouteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.op, self.reason)
    }
}

/// The first few failures, then how many more.
fn summarize(failed: &[RouteFailure]) -> String {
    const SHOWN: usize = 5;
    let mut s = failed
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if failed.len() > SHOWN {
        s.push_str(&format!("; and {} more", failed.len() - SHOWN));
    }
    s
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

/// Opens a netlink connection in the current namespace.
pub fn connect() -> Result<Handle, DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Netlink { op, source }
}

/// raven0's index, if the link exists.
pub async fn vxlan_index(h: &Handle) -> Result<Option<u32>, DataplaneError> {
    Ok(vxlan_message(h).await?.map(|m| m.header.index))
}

async fn vxlan_message(h: &Handle) -> Result<Option<LinkMessage>, DataplaneError> {
    let mut links = h.link().get().match_name(VXLAN_DEV.to_owned()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("reading link {VXLAN_DEV}"))(e)),
    }
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

fn parse_link(m: &LinkMessage) -> Option<VxlanLink> {
    let mut mtu = 0;
    let mut mac = None;
    let mut vxlan = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::Address(b) => mac = mac_of(b),
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                for i in infos {
                    if let (true, LinkInfo::Data(InfoData::Vxlan(d))) = (is_vxlan, i) {
                        vxlan = Some(d.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let data = vxlan?;
    let (mut vni, mut port, mut local) = (0, 0, Ipv4Addr::UNSPECIFIED);
    for d in data {
        match d {
            InfoVxlan::Id(v) => vni = v,
            InfoVxlan::Port(p) => port = p,
            InfoVxlan::Local(l) => local = l,
            _ => {}
        }
    }
    Some(VxlanLink {
        vni,
        port,
        local,
        mtu,
        mac: mac?,
    })
}

fn table_of_route(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn addr_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Raven's route in `m`, if it is one: table 9027/9028 and protocol 82.
/// Anything else — other tables, other protocols — is not raven's and is
/// never seen by the planner.
fn parse_route(
    m: &RouteMessage,
    vxlan_index: Option<u32>,
    tunnel_index: Option<u32>,
    direct_index: Option<u32>,
) -> Option<Route> {
    let table = table_of_route(m);
    if ![TABLE_REMOTE, TABLE_RETURN].contains(&table)
        || m.header.protocol != RouteProtocol::from(ROUTE_PROTOCOL)
    {
        return None;
    }
    let mut dst = None;
    let mut via = None;
    let mut mtu = 0;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dst = addr_of(d),
            RouteAttribute::Gateway(g) => via = addr_of(g),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => via = Some(IpAddr::V6(*v6)),
            RouteAttribute::Metrics(ms) => {
                for x in ms {
                    if let RouteMetric::Mtu(v) = x {
                        mtu = *v;
                    }
                }
            }
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match m.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    // Raven's route through the tunnel has no next hop; any other shape is
    // still raven's (table + protocol) and is reported as `Other` so the
    // planner replaces or removes it.
    let dev = match oif {
        Some(i) if Some(i) == vxlan_index => RouteDev::Vxlan,
        Some(i) if Some(i) == tunnel_index && via.is_none() => RouteDev::Tunnel,
        Some(i) if Some(i) == direct_index && via.is_none() => RouteDev::Direct,
        _ => RouteDev::Other,
    };
    Some(Route {
        table,
        dst,
        dev,
        via,
        mtu,
    })
}

/// Raven's rule in `m`, if it is one: priority 9027 or 9028.
fn parse_rule(m: &RuleMessage) -> Option<Rule> {
    let mut priority = None;
    let mut table = u32::from(m.header.table);
    let mut iif = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Iifname(i) => iif = Some(i.clone()),
            _ => {}
        }
    }
    let priority = priority?;
    if ![PRIORITY_REMOTE, PRIORITY_RETURN].contains(&priority) {
        return None;
    }
    Some(Rule {
        v6: m.header.family == AddressFamily::Inet6,
        priority,
        table,
        iif,
    })
}

/// The index of the link named `name`, if it exists.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, DataplaneError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("reading link {name}"))(e)),
    }
}

/// The names of a node's tunnel devices: the gateway tunnel and the
/// direct-path device of a NATed gateway (empty: none).
#[derive(Debug, Clone, Copy)]
pub struct TunnelDevs<'a> {
    pub tunnel: &'a str,
    pub direct: &'a str,
}

impl TunnelDevs<'_> {
    pub(crate) async fn indexes(
        &self,
        h: &Handle,
    ) -> Result<(Option<u32>, Option<u32>), DataplaneError> {
        let direct = if self.direct.is_empty() {
            None
        } else {
            link_index(h, self.direct).await?
        };
        Ok((link_index(h, self.tunnel).await?, direct))
    }
}

/// Reads raven's objects from the kernel.
pub async fn observe(h: &Handle, devs: TunnelDevs<'_>) -> Result<State, DataplaneError> {
    let mut s = State::default();
    let (tunnel_index, direct_index) = devs.indexes(h).await?;
    let link = vxlan_message(h).await?;
    let index = link.as_ref().map(|m| m.header.index);
    if let Some(m) = &link {
        s.link = parse_link(m);
        s.link_up = m.header.flags.contains(LinkFlags::Up);
        if s.link.is_none() {
            // A link named raven0 that is not a VXLAN device: report a
            // mismatched link so the planner recreates it.
            s.link = Some(VxlanLink {
                vni: 0,
                port: 0,
                local: Ipv4Addr::UNSPECIFIED,
                mtu: 0,
                mac: Mac([0; 6]),
            });
        }
    }
    if let Some(idx) = index {
        let mut addrs = h.address().get().set_link_index_filter(idx).execute();
        while let Some(a) = addrs.try_next().await.map_err(nl("dumping addresses"))? {
            if a.header.index != idx || a.header.family != AddressFamily::Inet {
                continue;
            }
            for attr in &a.attributes {
                if let netlink_packet_route::address::AddressAttribute::Address(ip) = attr
                    && let Ok(net) = IpNet::new(*ip, a.header.prefix_len)
                {
                    s.addresses.insert(net);
                }
            }
        }
        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            let mut dump = h.neighbours().get().set_address_family(family).execute();
            while let Some(n) = dump.try_next().await.map_err(nl("dumping neighbours"))? {
                if n.header.ifindex != idx {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(IpAddr::V4(*v4))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = Some(IpAddr::V6(*v6))
                        }
                        // Bridge-family (FDB) entries carry the VXLAN
                        // destination as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            ip = <[u8; 4]>::try_from(b.as_slice())
                                .ok()
                                .map(|o| IpAddr::V4(Ipv4Addr::from(o)));
                        }
                        NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                        _ => {}
                    }
                }
                match (family, ip, mac) {
                    (AddressFamily::Bridge, Some(IpAddr::V4(dst)), Some(mac)) => {
                        s.fdb.insert(Fdb { mac, dst });
                    }
                    (AddressFamily::Inet | AddressFamily::Inet6, Some(ip), Some(mac))
                        if n.header.state == NeighbourState::Permanent =>
                    {
                        s.neighbours.insert(Neighbour { ip, mac });
                    }
                    _ => {}
                }
            }
        }
    }
    for route in dump_ravens_routes().await? {
        if let Some(route) = parse_route(&route, index, tunnel_index, direct_index) {
            s.routes.insert(route);
        }
    }
    for v in [IpVersion::V4, IpVersion::V6] {
        let mut dump = h.rule().get(v).execute();
        while let Some(r) = dump.try_next().await.map_err(nl("dumping rules"))? {
            if let Some(rule) = parse_rule(&r) {
                s.rules.insert(rule);
            }
        }
    }
    Ok(s)
}

/// Raven's routes only: tables 9027 and 9028 of both families, protocol
/// 82, filtered by the kernel (`NETLINK_GET_STRICT_CHK`, as `ip route show
/// table N proto P` does) so that neither the main and local tables nor
/// anyone else's routes are dumped. A table that does not exist yet dumps
/// as empty.
async fn dump_ravens_routes() -> Result<Vec<RouteMessage>, DataplaneError> {
    let (conn, h, _) =
        rtnetlink::new_connection_with_strict_check().map_err(DataplaneError::Connect)?;
    let conn = tokio::spawn(conn);
    let mut out = Vec::new();
    let mut result = Ok(());
    'tables: for table in [TABLE_REMOTE, TABLE_RETURN] {
        for mut msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            msg.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
            if let Ok(t) = u8::try_from(table) {
                msg.header.table = t;
            } else {
                // RT_TABLE_UNSPEC in the header; the attribute names it.
                msg.header.table = 0;
                msg.attributes.push(RouteAttribute::Table(table));
            }
            // No filter on the route type: every shape of raven's is seen.
            msg.header.kind = netlink_packet_route::route::RouteType::Unspec;
            let mut dump = h.route().get(msg).execute();
            loop {
                match dump.try_next().await {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => break,
                    Err(e) if errno(&e) == Some(ENOENT) => break,
                    Err(e) => {
                        result = Err(nl(format!("dumping routes of table {table}"))(e));
                        break 'tables;
                    }
                }
            }
        }
    }
    conn.abort();
    result.map(|()| out)
}

fn tolerate(
    result: Result<(), rtnetlink::Error>,
    ok: &[i32],
    op: &Op,
) -> Result<(), DataplaneError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if errno(&e).is_some_and(|c| ok.contains(&c)) => Ok(()),
        Err(e) => Err(nl(op.to_string())(e)),
    }
}

fn route_message(r: &Route, index: u32) -> Result<RouteMessage, DataplaneError> {
    let invalid = |reason: String| DataplaneError::Invalid {
        op: format!("route {}", r.dst),
        reason,
    };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .map_err(|e| invalid(e.to_string()))?
        .output_interface(index)
        .table_id(r.table)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    b = match r.via {
        Some(via) => b.gateway(via).map_err(|e| invalid(e.to_string()))?.onlink(),
        None => b.scope(netlink_packet_route::route::RouteScope::Link),
    };
    if r.mtu > 0 {
        b.get_mut()
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(r.mtu)]));
    }
    Ok(b.build())
}

/// The request deleting raven's route `r`. It names table and protocol, so
/// the kernel (which matches on both, IPv4 and IPv6 alike) never removes a
/// foreign route with the same destination.
fn route_delete_message(r: &Route) -> Result<RouteMessage, String> {
    let mut msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .map_err(|e| e.to_string())?
        .table_id(r.table)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build();
    msg.header.scope = netlink_packet_route::route::RouteScope::NoWhere;
    Ok(msg)
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    if let Some(i) = &r.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    m
}

fn neighbour_message(
    index: u32,
    family: AddressFamily,
    dst: IpAddr,
    mac: Option<Mac>,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m.attributes
        .push(NeighbourAttribute::Destination(match dst {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        m.header.flags = NeighbourFlags::Own;
    }
    m
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpsApplied {
    /// Operations that changed (or already matched) the kernel.
    pub ops: usize,
    /// Operations left undone because an object raven does not own holds
    /// the slot (a route of another protocol on a destination raven wants).
    pub conflicts: Vec<String>,
}

/// Applies `ops` in order. "Already exists" on a create and "not found" on
/// a delete count as success; a route slot held by a foreign route is left
/// alone and reported in [`OpsApplied::conflicts`]. Runs of route operations
/// (nearly all of a large plan) are pipelined on a socket of their own —
/// many requests per `sendmsg`, answers matched by sequence number (see
/// `write_routes`); a refused route is attributed to its operation and does
/// not stop the others: all refused routes are returned together as
/// [`DataplaneError::Routes`] once the rest is applied. Any other failed
/// operation stops at once.
pub async fn apply(
    h: &Handle,
    ops: &[Op],
    devs: TunnelDevs<'_>,
) -> Result<OpsApplied, DataplaneError> {
    let mut done = OpsApplied::default();
    let mut index = vxlan_index(h).await?;
    let (tunnel_index, direct_index) = devs.indexes(h).await?;
    let mut failed_routes = Vec::new();
    let mut pipe: Option<Pipeline> = None;
    let mut at = 0;
    while at < ops.len() {
        let run = ops[at..].iter().take_while(|o| is_route(o)).count();
        if run > 0 {
            let routes = &ops[at..at + run];
            at += run;
            let ifaces = RouteIfaces {
                vxlan: index,
                tunnel: tunnel_index,
                direct: direct_index,
                devs,
            };
            if pipe.is_none() {
                pipe = Some(Pipeline::open()?);
            }
            if let Some(pipe) = pipe.as_mut() {
                let written = write_routes(pipe, routes, &ifaces).await?;
                done.ops += written.ops;
                done.conflicts.extend(written.conflicts);
                failed_routes.extend(written.failed);
            }
            continue;
        }
        let op = &ops[at];
        at += 1;
        let need = |index: Option<u32>| {
            index.ok_or_else(|| DataplaneError::Invalid {
                op: op.to_string(),
                reason: format!("{VXLAN_DEV} does not exist"),
            })
        };
        match op {
            Op::CreateLink(l) => {
                let msg = LinkVxlan::new(VXLAN_DEV, l.vni)
                    .port(l.port)
                    .local(l.local)
                    .learning(false)
                    .mtu(l.mtu)
                    .address(l.mac.0.to_vec())
                    .build();
                tolerate(h.link().add(msg).execute().await, &[EEXIST], op)?;
                index = vxlan_index(h).await?;
                // No IPv6 address autoconfiguration noise, but keep the
                // link-local address the IPv6 next hops rely on.
            }
            Op::DeleteLink => {
                if let Some(i) = index {
                    tolerate(h.link().del(i).execute().await, &[ENODEV], op)?;
                }
                index = None;
            }
            Op::SetMtu(m) => {
                let msg = LinkUnspec::new_with_index(need(index)?).mtu(*m).build();
                tolerate(h.link().set(msg).execute().await, &[], op)?;
            }
            Op::SetUp => {
                let msg = LinkUnspec::new_with_index(need(index)?).up().build();
                tolerate(h.link().set(msg).execute().await, &[], op)?;
            }
            Op::AddAddress(a) => {
                let req = h.address().add(need(index)?, a.addr(), a.prefix_len());
                tolerate(req.execute().await, &[EEXIST], op)?;
            }
            Op::DeleteAddress(a) => {
                let mut addrs = h
                    .address()
                    .get()
                    .set_link_index_filter(need(index)?)
                    .execute();
                while let Some(m) = addrs.try_next().await.map_err(nl(op.to_string()))? {
                    let matches = m.header.prefix_len == a.prefix_len()
                        && m.attributes.iter().any(|x| {
                            matches!(x, netlink_packet_route::address::AddressAttribute::Address(ip) if *ip == a.addr())
                        });
                    if matches {
                        tolerate(h.address().del(m).execute().await, &[ENOENT], op)?;
                    }
                }
            }
            Op::ReplaceFdb(e) => {
                let req = h
                    .neighbours()
                    .add_bridge(need(index)?, &e.mac.0)
                    .destination(IpAddr::V4(e.dst))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace();
                tolerate(req.execute().await, &[], op)?;
            }
            Op::DeleteFdb(e) => {
                let msg = neighbour_message(
                    need(index)?,
                    AddressFamily::Bridge,
                    IpAddr::V4(e.dst),
                    Some(e.mac),
                );
                tolerate(h.neighbours().del(msg).execute().await, &[ENOENT], op)?;
            }
            Op::ReplaceNeighbour(n) => {
                let req = h
                    .neighbours()
                    .add(need(index)?, n.ip)
                    .link_layer_address(&n.mac.0)
                    .state(NeighbourState::Permanent)
                    .replace();
                tolerate(req.execute().await, &[], op)?;
            }
            Op::DeleteNeighbour(n) => {
                let family = if n.ip.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let msg = neighbour_message(need(index)?, family, n.ip, None);
                tolerate(h.neighbours().del(msg).execute().await, &[ENOENT], op)?;
            }
            Op::AddRoute(_) | Op::ReplaceRoute(_) | Op::DeleteRoute(_) => {
                unreachable!("route operations are written by the pipeline above")
            }
            Op::AddRule(r) => {
                let mut req = h.rule().add();
                *req.message_mut() = rule_message(r);
                tolerate(req.execute().await, &[EEXIST], op)?;
            }
            Op::DeleteRule(r) => {
                tolerate(h.rule().del(rule_message(r)).execute().await, &[ENOENT], op)?;
            }
        }
        done.ops += 1;
    }
    if !failed_routes.is_empty() {
        return Err(DataplaneError::Routes {
            failed: failed_routes,
        });
    }
    Ok(done)
}

fn is_route(op: &Op) -> bool {
    matches!(
        op,
        Op::AddRoute(_) | Op::ReplaceRoute(_) | Op::DeleteRoute(_)
    )
}

/// The devices route operations name, resolved once per [`apply`].
struct RouteIfaces<'a> {
    vxlan: Option<u32>,
    tunnel: Option<u32>,
    direct: Option<u32>,
    devs: TunnelDevs<'a>,
}

/// What one run of route operations did.
#[derive(Debug, Default)]
struct RoutesWritten {
    ops: usize,
    conflicts: Vec<String>,
    failed: Vec<RouteFailure>,
}

/// How a route operation's outcome is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    /// Exclusive add: "exists" means a foreign route holds the slot.
    Add,
    Replace,
    /// "Not found" is success.
    Delete,
}

/// The request of one route operation, or why it cannot be made.
fn route_request(
    op: &Op,
    ifaces: &RouteIfaces<'_>,
) -> Result<(RouteKind, RouteNetlinkMessage), String> {
    match op {
        Op::AddRoute(r) | Op::ReplaceRoute(r) => {
            let dev = match r.dev {
                RouteDev::Vxlan => ifaces
                    .vxlan
                    .ok_or_else(|| format!("{VXLAN_DEV} does not exist"))?,
                RouteDev::Tunnel => ifaces.tunnel.ok_or_else(|| {
                    format!("the tunnel device {} does not exist", ifaces.devs.tunnel)
                })?,
                RouteDev::Direct => ifaces.direct.ok_or_else(|| {
                    format!(
                        "the direct-path device {:?} does not exist",
                        ifaces.devs.direct
                    )
                })?,
                RouteDev::Other => return Err("an observed-only route cannot be installed".into()),
            };
            let msg = route_message(r, dev).map_err(|e| e.to_string())?;
            let kind = if matches!(op, Op::AddRoute(_)) {
                RouteKind::Add
            } else {
                RouteKind::Replace
            };
            Ok((kind, RouteNetlinkMessage::NewRoute(msg)))
        }
        Op::DeleteRoute(r) => Ok((
            RouteKind::Delete,
            RouteNetlinkMessage::DelRoute(route_delete_message(r)?),
        )),
        other => Err(format!("{other} is not a route operation")),
    }
}

/// Writes a run of route operations on the pipeline: requests go out in
/// batches of up to [`BATCH`] per `sendmsg`, without waiting for each
/// answer. Only the last request of a batch asks for an ACK; the kernel
/// handles a socket's requests in order and answers every failed one with
/// an error carrying its sequence number, so the batch's ACK means all of
/// it was handled and each error is attributed to its own route. One
/// refused route never stops the others: failures are collected and
/// reported together.
async fn write_routes(
    pipe: &mut Pipeline,
    ops: &[Op],
    ifaces: &RouteIfaces<'_>,
) -> Result<RoutesWritten, DataplaneError> {
    let mut out = RoutesWritten::default();
    let mut i = 0;
    while i < ops.len() {
        let mut batch: Vec<(usize, RouteKind, RouteNetlinkMessage)> = Vec::with_capacity(BATCH);
        while i < ops.len() && batch.len() < BATCH {
            match route_request(&ops[i], ifaces) {
                Ok((kind, msg)) => batch.push((i, kind, msg)),
                Err(reason) => out.failed.push(RouteFailure {
                    op: ops[i].to_string(),
                    errno: 0,
                    reason,
                }),
            }
            i += 1;
        }
        if batch.is_empty() {
            continue;
        }
        let judged: Vec<(usize, RouteKind)> = batch.iter().map(|(i, k, _)| (*i, *k)).collect();
        let answers = pipe
            .exchange(batch.into_iter().map(|(_, k, m)| (k, m)))
            .await?;
        for ((idx, kind), answer) in judged.into_iter().zip(answers) {
            let op = &ops[idx];
            match (kind, answer) {
                (_, Answer::Done) => out.ops += 1,
                (RouteKind::Delete, Answer::Failed { errno, .. })
                    if [ENOENT, ESRCH].contains(&errno) =>
                {
                    out.ops += 1;
                }
                (RouteKind::Add, Answer::Failed { errno: EEXIST, .. }) => {
                    if let Op::AddRoute(r) = op {
                        out.conflicts.push(format!(
                            "route {} in table {} is held by a route raven does not own; left alone",
                            r.dst, r.table
                        ));
                    }
                }
                (_, Answer::Failed { errno, message }) => out.failed.push(RouteFailure {
                    op: op.to_string(),
                    errno,
                    reason: describe_errno(errno, message.as_deref()),
                }),
            }
        }
    }
    Ok(out)
}

fn describe_errno(errno: i32, extended: Option<&str>) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match extended {
        Some(m) if !m.is_empty() => format!("{text} ({m})"),
        _ => text,
    }
}

/// Requests per `sendmsg`. The kernel handles a batch inside the call and
/// queues at most one answer per request; 128 small answers fit any
/// netlink receive buffer (each costs about 1 KiB of it).
const BATCH: usize = 128;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
/// Extended-ACK attribute carrying the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;

/// The kernel's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Done,
    Failed { errno: i32, message: Option<String> },
}

/// A netlink socket of its own for pipelined writes (the rtnetlink
/// connection waits for each answer). Non-blocking, driven by the runtime;
/// ACKs capped (no echo of the request) and extended (the kernel's text).
struct Pipeline {
    sock: netlink_sys::TokioSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Pipeline {
    fn open() -> Result<Self, DataplaneError> {
        use netlink_sys::AsyncSocket;
        let mut sock = netlink_sys::TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(DataplaneError::Connect)?;
        let s = sock.socket_mut();
        s.bind_auto().map_err(DataplaneError::Connect)?;
        s.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(DataplaneError::Connect)?;
        // Best effort: older kernels lack them, and answers still parse.
        let _ = s.set_cap_ack(true);
        let _ = s.set_ext_ack(true);
        let _ = s.set_rx_buf_sz(1 << 20);
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    /// Sends `batch` in one `sendmsg` and collects one answer per request,
    /// matched by sequence number.
    async fn exchange(
        &mut self,
        batch: impl ExactSizeIterator<Item = (RouteKind, RouteNetlinkMessage)>,
    ) -> Result<Vec<Answer>, DataplaneError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: std::io::Error| DataplaneError::Invalid {
                op: what.clone(),
                reason: e.to_string(),
            }
        };
        let count = batch.len();
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for (n, (kind, msg)) in batch.enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let mut req = NetlinkMessage::from(msg);
            let mut flags = NLM_F_REQUEST
                | match kind {
                    RouteKind::Add => NLM_F_CREATE | NLM_F_EXCL,
                    RouteKind::Replace => NLM_F_CREATE | NLM_F_REPLACE,
                    RouteKind::Delete => 0,
                };
            if n + 1 == count {
                flags |= NLM_F_ACK;
            }
            req.header.flags = flags;
            req.header.sequence_number = self.seq;
            req.finalize();
            let at = out.len();
            out.resize(at + req.buffer_len(), 0);
            req.serialize(&mut out[at..]);
        }
        use netlink_sys::AsyncSocketExt;
        self.sock.send(&out).await.map_err(io("netlink send"))?;
        let mut answers = vec![Answer::Done; count];
        let last_seq = self.seq;
        loop {
            self.buf.clear();
            self.sock.recv(&mut self.buf).await.map_err(io(
                "netlink receive (answers were lost: the next reconcile observes the kernel again)",
            ))?;
            let data = &self.buf[..];
            let mut acked = false;
            for (seq, answer) in parse_answers(data) {
                let n = seq.wrapping_sub(first) as usize;
                if n < answers.len() {
                    answers[n] = answer;
                }
                acked |= seq == last_seq;
            }
            if acked {
                return Ok(answers);
            }
        }
    }
}

/// The `NLMSG_ERROR` answers in one datagram: sequence number and outcome
/// (error 0 is an ACK).
fn parse_answers(data: &[u8]) -> Vec<(u32, Answer)> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
    };
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind), Some(flags), Some(seq)) = (
        u32_at(data, at),
        u16_at(data, at + 4),
        u16_at(data, at + 6),
        u32_at(data, at + 8),
    ) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > data.len() {
            break;
        }
        let msg = &data[at..at + len];
        if kind == NLMSG_ERROR
            && let Some(code) = u32_at(msg, NLMSG_HDRLEN)
        {
            let errno = -(code as i32);
            let answer = if errno == 0 {
                Answer::Done
            } else {
                Answer::Failed {
                    errno,
                    message: extended_message(msg, flags),
                }
            };
            out.push((seq, answer));
        }
        at += (len + 3) & !3;
    }
    out
}

/// The kernel's error text of an extended ACK, if it sent one.
fn extended_message(msg: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // error code, then the request's header (capped) or the whole request.
    let request_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        msg.get(NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8)
            .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]) as usize)?
    };
    let mut at = NLMSG_HDRLEN + 4 + ((request_len + 3) & !3);
    while let Some(h) = msg.get(at..at + 4) {
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let kind = u16::from_ne_bytes([h[2], h[3]]) & 0x3fff;
        if len < 4 || at + len > msg.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &msg[at + 4..at + len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += (len + 3) & !3;
    }
    None
}

/// The MTU of the link holding `ip` (the underlay), if any.
pub async fn underlay_mtu(h: &Handle, ip: IpAddr) -> Result<Option<u32>, DataplaneError> {
    let mut addrs = h.address().get().execute();
    let mut index = None;
    // raven0 holds the node address too (as a /32), and the tunnel devices
    // with host scope (see `ensure_host_address`); the underlay is the other
    // link.
    let own = vxlan_index(h).await?;
    while let Some(a) = addrs.try_next().await.map_err(nl("dumping addresses"))? {
        if Some(a.header.index) == own
            || a.header.scope == netlink_packet_route::address::AddressScope::Host
        {
            continue;
        }
        let holds = a.attributes.iter().any(|x| match x {
            netlink_packet_route::address::AddressAttribute::Address(addr)
            | netlink_packet_route::address::AddressAttribute::Local(addr) => *addr == ip,
            _ => false,
        });
        if holds {
            index = Some(a.header.index);
        }
    }
    let Some(index) = index else { return Ok(None) };
    let mut links = h.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(nl("reading the underlay link"))?;
    Ok(link.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }))
}

/// The MTU of link `name`, `None` when there is no such link.
pub async fn link_mtu(name: &str) -> Result<Option<u32>, DataplaneError> {
    let h = connect()?;
    let Some(index) = link_index(&h, name).await? else {
        return Ok(None);
    };
    let mut links = h.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(nl(format!("ip link show {name}")))?;
    Ok(link.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }))
}

/// Sets `name` up with `mtu` (the tunnel device).
pub async fn set_link_up(name: &str, mtu: u32) -> Result<(), DataplaneError> {
    let h = connect()?;
    let Some(index) = link_index(&h, name).await? else {
        return Err(DataplaneError::Invalid {
            op: format!("ip link set {name} up"),
            reason: "no such link".into(),
        });
    };
    let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(nl(format!("ip link set {name} mtu {mtu} up")))
}

/// Gives link `name` the address `ip/32` with host scope (kept if it is
/// there). A tunnel device needs an IPv4 address for loose reverse-path
/// filtering: the kernel drops a packet that arrives on an address-less
/// device whose source it routes through another device — exactly what a
/// gateway receives while it and a peer use different paths (relay and
/// direct) between them. Host scope keeps the address out of source
/// address selection; it is the node's own address, as on `raven0`.
pub async fn ensure_host_address(name: &str, ip: Ipv4Addr) -> Result<(), DataplaneError> {
    let h = connect()?;
    let op = format!("ip addr replace {ip}/32 dev {name} scope host");
    let Some(index) = link_index(&h, name).await? else {
        return Err(DataplaneError::Invalid {
            op,
            reason: "no such link".into(),
        });
    };
    let mut req = h.address().add(index, IpAddr::V4(ip), 32).replace();
    req.message_mut().header.scope = netlink_packet_route::address::AddressScope::Host;
    req.execute().await.map_err(nl(op))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::dataplane::model::{DEFAULT_TUNNEL_DEV, diff, link_local, mac_for};

    const RAVEN0: u32 = 10;
    const TUNNEL: u32 = 11;
    const ETH0: u32 = 2;

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

    fn next_hop(dst: &IpNet) -> IpAddr {
        let gw = Ipv4Addr::new(172, 16, 0, 1);
        match dst {
            IpNet::V4(_) => IpAddr::V4(gw),
            IpNet::V6(_) => IpAddr::V6(link_local(mac_for(gw))),
        }
    }

    /// A route message as a dump returns it: any table, any protocol.
    fn route_msg() -> impl Strategy<Value = RouteMessage> {
        (
            prop_oneof![
                Just(254u32),
                Just(100),
                Just(255),
                Just(TABLE_REMOTE),
                Just(TABLE_RETURN)
            ],
            prop_oneof![
                Just(RouteProtocol::Static),
                Just(RouteProtocol::Boot),
                Just(RouteProtocol::Kernel),
                Just(RouteProtocol::Dhcp),
                Just(RouteProtocol::from(ROUTE_PROTOCOL)),
            ],
            any::<bool>(),
            0u8..4,
            prop_oneof![Just(RAVEN0), Just(TUNNEL), Just(ETH0)],
            any::<bool>(),
        )
            .prop_map(|(table, protocol, v6, net, oif, via)| {
                let dst = dst(v6, net);
                let mut b = RouteMessageBuilder::<IpAddr>::new()
                    .destination_prefix(dst.addr(), dst.prefix_len())
                    .unwrap_or_else(|_| unreachable!())
                    .table_id(table)
                    .protocol(protocol)
                    .output_interface(oif);
                if via {
                    b = b.gateway(next_hop(&dst)).unwrap_or_else(|_| unreachable!());
                }
                b.build()
            })
    }

    fn rule_msg() -> impl Strategy<Value = RuleMessage> {
        (
            any::<bool>(),
            prop_oneof![
                Just(0u32),
                Just(100),
                Just(PRIORITY_REMOTE),
                Just(PRIORITY_RETURN),
                Just(32766)
            ],
            prop_oneof![
                Just(254u32),
                Just(100),
                Just(TABLE_REMOTE),
                Just(TABLE_RETURN)
            ],
            any::<bool>(),
        )
            .prop_map(|(v6, priority, table, iif)| {
                rule_message(&Rule {
                    v6,
                    priority,
                    table,
                    iif: iif.then(|| DEFAULT_TUNNEL_DEV.to_owned()),
                })
            })
    }

    /// Raven's usual wishes: rules, and routes over raven0 to a few of the
    /// destinations the generated dump also uses.
    fn wanted() -> impl Strategy<Value = State> {
        proptest::collection::btree_set((any::<bool>(), any::<bool>(), 0u8..4), 0..6).prop_map(
            |routes| {
                let local = Ipv4Addr::new(172, 16, 0, 2);
                let mut s = State {
                    link: Some(VxlanLink {
                        vni: 1,
                        port: 4472,
                        local,
                        mtu: 1450,
                        mac: mac_for(local),
                    }),
                    link_up: true,
                    ..State::default()
                };
                let mut seen = BTreeSet::new();
                for (ret, v6, net) in routes {
                    let table = if ret { TABLE_RETURN } else { TABLE_REMOTE };
                    let dst = dst(v6, net);
                    if seen.insert((table, dst)) {
                        s.routes.insert(Route {
                            table,
                            dst,
                            dev: RouteDev::Vxlan,
                            via: Some(next_hop(&dst)),
                            mtu: 1370,
                        });
                    }
                }
                for v6 in [false, true] {
                    s.rules.insert(Rule {
                        v6,
                        priority: PRIORITY_REMOTE,
                        table: TABLE_REMOTE,
                        iif: None,
                    });
                }
                s
            },
        )
    }

    fn is_ravens(m: &RouteMessage) -> bool {
        [TABLE_REMOTE, TABLE_RETURN].contains(&table_of_route(m))
            && m.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
    }

    fn slot(m: &RouteMessage) -> (u32, IpNet) {
        let dst = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(d) => addr_of(d),
                _ => None,
            })
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        (
            table_of_route(m),
            IpNet::new(dst, m.header.destination_prefix_length).unwrap_or_default(),
        )
    }

    proptest! {
        #[test]
        fn plans_never_touch_foreign_routes_or_rules(
            want in wanted(),
            routes in proptest::collection::vec(route_msg(), 0..12),
            rules in proptest::collection::vec(rule_msg(), 0..8),
        ) {
            let observed = State {
                link: want.link.clone(),
                link_up: true,
                routes: routes.iter().filter_map(|m| parse_route(m, Some(RAVEN0), Some(TUNNEL), None)).collect(),
                rules: rules.iter().filter_map(parse_rule).collect(),
                ..State::default()
            };
            // Only raven's objects are observed...
            let ravens: BTreeSet<(u32, IpNet)> = routes.iter().filter(|m| is_ravens(m)).map(slot).collect();
            let foreign: BTreeSet<(u32, IpNet)> = routes.iter().filter(|m| !is_ravens(m)).map(slot).collect();
            for r in &observed.routes {
                prop_assert!(ravens.contains(&(r.table, r.dst)));
            }
            for m in &rules {
                let p = parse_rule(m);
                let prio = m.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Priority(p) => Some(*p),
                    _ => None,
                });
                prop_assert_eq!(p.is_some(), prio.is_some_and(|p| p == PRIORITY_REMOTE || p == PRIORITY_RETURN));
            }
            // ...and no operation names anything else.
            for op in diff(&want, &observed) {
                match &op {
                    Op::DeleteRoute(r) => {
                        prop_assert!(ravens.contains(&(r.table, r.dst)), "{}", op);
                        let msg = route_delete_message(r).map_err(TestCaseError::fail)?;
                        prop_assert_eq!(msg.header.protocol, RouteProtocol::from(ROUTE_PROTOCOL));
                        prop_assert_eq!(table_of_route(&msg), r.table);
                    }
                    Op::AddRoute(r) | Op::ReplaceRoute(r) => {
                        prop_assert!([TABLE_REMOTE, TABLE_RETURN].contains(&r.table));
                        // A slot held only by a foreign route is never
                        // replaced: the exclusive add fails and is reported.
                        let slot = (r.table, r.dst);
                        if foreign.contains(&slot) && !ravens.contains(&slot) {
                            prop_assert!(matches!(op, Op::AddRoute(_)), "{}", op);
                        }
                    }
                    Op::DeleteRule(r) | Op::AddRule(r) => {
                        prop_assert!([PRIORITY_REMOTE, PRIORITY_RETURN].contains(&r.priority), "{}", op);
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_route_through_a_foreign_device_is_observed_as_other() {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 0)), 24)
            .unwrap_or_else(|_| unreachable!())
            .table_id(TABLE_REMOTE)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .output_interface(ETH0)
            .build();
        let r = parse_route(&msg, Some(RAVEN0), Some(TUNNEL), None);
        assert_eq!(r.map(|r| r.dev), Some(RouteDev::Other));
    }
}
