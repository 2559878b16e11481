//! Proto ↔ domain conversions: the one place they live, shared by hub and
//! edge.
//!
//! Domain → proto is infallible. Proto → domain parses every name, address,
//! CIDR, port and enum, and names the object, the field path and the value
//! when one is bad (`resource gateway/gw-a: members[0].private_ip: "x" is not
//! an IP address`). A decoded resource must also be consistent with its name
//! and carry the content version of what it holds: an agent NACKs anything
//! else instead of applying it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use raven_model::AgentReport;
use raven_model::names::{GatewayName, NodeName};
use raven_model::problem::{Problem, Severity};
use raven_model::topology::{
    ContentVersion, DirectDevice, DomainPrefixes, EndpointType, ExposeType, GatewayEndpoint,
    GatewayView, Member, NodeView, PeerInfo, Resource, ResourceBody, ResourceName, Settings,
    Topology, VpnDriver,
};

use crate::v1;

/// What a [`ConversionError`] is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A resource, by the name it was sent under (which may itself be the
    /// invalid part).
    Resource(String),
    /// A message that is not a resource: `update`, `hello`, `report`,
    /// `problem`.
    Message(&'static str),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resource(name) => write!(f, "resource {name}"),
            Self::Message(m) => f.write_str(m),
        }
    }
}

/// A proto message that cannot be turned into domain values. Every variant
/// names the subject and the field path (proto field names, `members[0].private_ip`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// A field holds a value that does not parse or is out of range.
    #[error("{subject}: {field}: {value:?} {reason}")]
    InvalidValue {
        subject: Subject,
        field: String,
        value: String,
        reason: &'static str,
    },
    /// A required field is unset, empty or `*_UNSPECIFIED`.
    #[error("{subject}: {field}: missing")]
    Missing { subject: Subject, field: String },
    /// Fields that parse, but contradict each other (a resource named for
    /// another body, a name both updated and removed, ...).
    #[error("{subject}: {field}: {message}")]
    Inconsistent {
        subject: Subject,
        field: String,
        message: String,
    },
    /// The resource's version is not the content version of its body: the
    /// content is corrupt or the sender is inconsistent.
    #[error("{subject}: version {received:?} does not match its content (computed {computed:?})")]
    VersionMismatch {
        subject: Subject,
        received: String,
        computed: String,
    },
}

impl ConversionError {
    pub fn subject(&self) -> &Subject {
        match self {
            Self::InvalidValue { subject, .. }
            | Self::Missing { subject, .. }
            | Self::Inconsistent { subject, .. }
            | Self::VersionMismatch { subject, .. } => subject,
        }
    }

    /// The resource concerned, when the error is about one.
    pub fn resource_name(&self) -> Option<&str> {
        match self.subject() {
            Subject::Resource(name) => Some(name),
            Subject::Message(_) => None,
        }
    }

    /// The field path; `version` for a version mismatch.
    pub fn field(&self) -> &str {
        match self {
            Self::InvalidValue { field, .. }
            | Self::Missing { field, .. }
            | Self::Inconsistent { field, .. } => field,
            Self::VersionMismatch { .. } => "version",
        }
    }
}

impl From<&ConversionError> for v1::ErrorDetail {
    fn from(e: &ConversionError) -> Self {
        Self {
            message: e.to_string(),
            resource_name: e.resource_name().unwrap_or_default().to_owned(),
            field: e.field().to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------
// Resources

/// Converts a named resource for the wire. The name must be the one the body
/// belongs under (as raven-core's compiler produces it).
pub fn resource_to_proto(name: &ResourceName, resource: &Resource) -> v1::Resource {
    v1::Resource {
        name: name.to_string(),
        version: resource.version.to_string(),
        body: Some(body_to_proto(&resource.body)),
    }
}

/// Decodes a resource received from the wire: parses every field, checks
/// that the body belongs under the name, and recomputes the content version
/// (a mismatch is [`ConversionError::VersionMismatch`]).
pub fn resource_from_proto(r: &v1::Resource) -> Result<(ResourceName, Resource), ConversionError> {
    let cx = Cx::new(Subject::Resource(r.name.clone()));
    let name = ResourceName::parse(&r.name).ok_or_else(|| {
        cx.invalid(
            "name",
            &r.name,
            "is not a resource name (settings, gateway/<name>, prefixes/<name>, node/<name> or peer/<name>)",
        )
    })?;
    let body = r.body.as_ref().ok_or_else(|| cx.missing("body"))?;
    let body = body_from_proto(&cx, &name, body)?;

    let (owner, owner_field) = owner(&body);
    if owner != name {
        let kind = |n: &ResourceName| n.as_str().split('/').next().unwrap_or_default().to_owned();
        return Err(if kind(&owner) == kind(&name) {
            // Same kind, different object: point at the body's own name field.
            let value = owner
                .as_str()
                .split_once('/')
                .map(|(_, n)| n)
                .unwrap_or_default();
            cx.invalid(owner_field, value, "does not match the resource name")
        } else {
            cx.inconsistent(
                "body",
                format!("holds a {} body, which belongs under {owner}", kind(&owner)),
            )
        });
    }

    let computed = ContentVersion::of(&body);
    if computed.as_str() != r.version {
        return Err(ConversionError::VersionMismatch {
            subject: cx.subject,
            received: r.version.clone(),
            computed: computed.to_string(),
        });
    }
    Ok((name, Resource::with_version(computed, body)))
}

/// The name a body belongs under, and the body field that determines it.
fn owner(body: &ResourceBody) -> (ResourceName, &'static str) {
    match body {
        ResourceBody::Settings(_) => (ResourceName::settings(), "body"),
        ResourceBody::Gateway(g) => (ResourceName::gateway(&g.name), "name"),
        ResourceBody::Node(n) => (ResourceName::node(&n.name), "name"),
        ResourceBody::Peer(p) => (ResourceName::peer(&p.node), "node"),
        ResourceBody::Prefixes(p) => (ResourceName::prefixes(&p.gateway), "body"),
    }
}

fn body_to_proto(body: &ResourceBody) -> v1::resource::Body {
    use v1::resource::Body;
    match body {
        ResourceBody::Settings(s) => Body::Settings(v1::Settings {
            raven_cfg_present: s.raven_cfg_present,
            enable_l3_tunnel: s.enable_l3_tunnel,
            enable_l7_proxy: s.enable_l7_proxy,
            vxlan_port: s.vxlan_port.into(),
            vpn_driver: match s.vpn_driver {
                VpnDriver::Wireguard => v1::VpnDriver::Wireguard,
                VpnDriver::Ipsec => v1::VpnDriver::Ipsec,
            }
            .into(),
        }),
        ResourceBody::Gateway(g) => Body::Gateway(v1::GatewayView {
            name: g.name.to_string(),
            expose_type: expose_type_to_proto(g.expose_type).into(),
            under_nat: g.under_nat,
            members: g.members.iter().map(member_to_proto).collect(),
            active_tunnel: g.active_tunnel.as_ref().map(endpoint_to_proto),
            tunnel_candidates: g.tunnel_candidates.iter().map(endpoint_to_proto).collect(),
            active_proxies: g.active_proxies.iter().map(endpoint_to_proto).collect(),
            extra_source_cidrs: strings(&g.extra_source_cidrs),
            relay: g.relay.as_ref().map(ToString::to_string),
            proxy_ports: g.proxy_ports.iter().map(|&p| u32::from(p)).collect(),
        }),
        ResourceBody::Node(n) => Body::Node(v1::NodeView {
            name: n.name.to_string(),
            gateway: n.gateway.as_ref().map(ToString::to_string),
            private_ip: n.private_ip.as_ref().map(ToString::to_string),
            subnets: strings(&n.subnets),
            tunnel_active: n.tunnel_active,
            tunnel_candidate: n.tunnel_candidate,
            proxy_active: n.proxy_active,
        }),
        ResourceBody::Peer(p) => Body::Peer(v1::PeerInfo {
            node: p.node.to_string(),
            gateway: p.gateway.to_string(),
            wireguard_public_key: p.wireguard_public_key.clone(),
            tunnel_port: p.tunnel_port.map(u32::from),
            observed_endpoint: p.observed_endpoint.as_ref().map(ToString::to_string),
            direct: p.direct.as_ref().map(|d| v1::DirectDevice {
                public_key: d.public_key.clone(),
                observed_endpoint: d.observed_endpoint.as_ref().map(ToString::to_string),
            }),
            ipsec_public_key: p.ipsec_public_key.clone(),
        }),
        ResourceBody::Prefixes(p) => Body::Prefixes(v1::DomainPrefixes {
            prefixes: crate::packed::pack(p.prefixes.iter().copied()),
            endpoint_addresses: crate::packed::pack_addresses(p.endpoint_addresses.iter().copied()),
        }),
    }
}

/// Decodes a body received under `name` (a `DomainPrefixes` body takes its
/// gateway from it).
fn body_from_proto(
    cx: &Cx,
    name: &ResourceName,
    body: &v1::resource::Body,
) -> Result<ResourceBody, ConversionError> {
    use v1::resource::Body;
    Ok(match body {
        Body::Prefixes(p) => {
            let gateway = name
                .domain()
                .filter(|_| name.as_str().starts_with("prefixes/"))
                .ok_or_else(|| {
                    cx.inconsistent(
                        "body",
                        "holds a prefixes body, which belongs under prefixes/<gateway>".to_owned(),
                    )
                })?;
            let packed = |field: &str, e: crate::packed::PackError| {
                cx.invalid(&format!("{field}.{}", e.field), "<packed bytes>", e.reason)
            };
            ResourceBody::Prefixes(DomainPrefixes {
                gateway,
                prefixes: crate::packed::unpack(p.prefixes.as_ref())
                    .map_err(|e| packed("prefixes", e))?,
                endpoint_addresses: crate::packed::unpack_addresses(p.endpoint_addresses.as_ref())
                    .map_err(|e| packed("endpoint_addresses", e))?,
            })
        }
        Body::Settings(s) => ResourceBody::Settings(Settings {
            raven_cfg_present: s.raven_cfg_present,
            enable_l3_tunnel: s.enable_l3_tunnel,
            enable_l7_proxy: s.enable_l7_proxy,
            vxlan_port: cx.port("vxlan_port", s.vxlan_port)?,
            vpn_driver: match v1::VpnDriver::try_from(s.vpn_driver) {
                Ok(v1::VpnDriver::Unspecified | v1::VpnDriver::Wireguard) => VpnDriver::Wireguard,
                Ok(v1::VpnDriver::Ipsec) => VpnDriver::Ipsec,
                Err(_) => {
                    return Err(cx.invalid(
                        "vpn_driver",
                        s.vpn_driver.to_string(),
                        "is not a known VPN driver",
                    ));
                }
            },
        }),
        Body::Gateway(g) => ResourceBody::Gateway(GatewayView {
            name: cx.gateway_name("name", &g.name)?,
            expose_type: expose_type_from_proto(cx, "expose_type", g.expose_type)?,
            under_nat: g.under_nat,
            members: cx.list("members", &g.members, member_from_proto)?,
            active_tunnel: g
                .active_tunnel
                .as_ref()
                .map(|e| endpoint_from_proto(&cx.nested("active_tunnel"), e))
                .transpose()?,
            tunnel_candidates: cx.list(
                "tunnel_candidates",
                &g.tunnel_candidates,
                endpoint_from_proto,
            )?,
            active_proxies: cx.list("active_proxies", &g.active_proxies, endpoint_from_proto)?,
            extra_source_cidrs: cx.nets("extra_source_cidrs", &g.extra_source_cidrs)?,
            relay: g
                .relay
                .as_deref()
                .map(|r| cx.gateway_name("relay", r))
                .transpose()?,
            proxy_ports: g
                .proxy_ports
                .iter()
                .map(|&p| cx.port("proxy_ports", p))
                .collect::<Result<_, _>>()?,
        }),
        Body::Node(n) => ResourceBody::Node(NodeView {
            name: cx.node_name("name", &n.name)?,
            gateway: n
                .gateway
                .as_deref()
                .map(|g| cx.gateway_name("gateway", g))
                .transpose()?,
            private_ip: n
                .private_ip
                .as_deref()
                .map(|ip| cx.ip("private_ip", ip))
                .transpose()?,
            subnets: cx.nets("subnets", &n.subnets)?,
            tunnel_active: n.tunnel_active,
            tunnel_candidate: n.tunnel_candidate,
            proxy_active: n.proxy_active,
        }),
        Body::Peer(p) => ResourceBody::Peer(PeerInfo {
            node: cx.node_name("node", &p.node)?,
            gateway: cx.gateway_name("gateway", &p.gateway)?,
            wireguard_public_key: p.wireguard_public_key.clone(),
            tunnel_port: p
                .tunnel_port
                .map(|port| cx.port("tunnel_port", port))
                .transpose()?,
            observed_endpoint: p
                .observed_endpoint
                .as_deref()
                .map(|e| cx.socket("observed_endpoint", e))
                .transpose()?,
            direct: p
                .direct
                .as_ref()
                .map(|d| {
                    if !is_wireguard_key(&d.public_key) {
                        return Err(cx.invalid(
                            "direct.public_key",
                            &d.public_key,
                            "is not a WireGuard public key (44 characters of base64)",
                        ));
                    }
                    Ok(DirectDevice {
                        public_key: d.public_key.clone(),
                        observed_endpoint: d
                            .observed_endpoint
                            .as_deref()
                            .map(|e| cx.socket("direct.observed_endpoint", e))
                            .transpose()?,
                    })
                })
                .transpose()?,
            ipsec_public_key: p
                .ipsec_public_key
                .as_deref()
                .map(|k| ipsec_key(cx, "ipsec_public_key", k))
                .transpose()?,
        }),
    })
}

/// An IPsec raw Ed25519 public key as it travels: the canonical base64 of
/// its 32 bytes (the same shape as a WireGuard key).
fn ipsec_key(cx: &Cx, field: &str, key: &str) -> Result<String, ConversionError> {
    if is_wireguard_key(key) {
        Ok(key.to_owned())
    } else {
        Err(cx.invalid(
            field,
            key,
            "is not an Ed25519 public key (44 characters of base64)",
        ))
    }
}

fn member_to_proto(m: &Member) -> v1::Member {
    v1::Member {
        node: m.node.to_string(),
        private_ip: m.private_ip.to_string(),
        subnets: strings(&m.subnets),
        ready: m.ready,
    }
}

fn member_from_proto(cx: &Cx, m: &v1::Member) -> Result<Member, ConversionError> {
    Ok(Member {
        node: cx.node_name("node", &m.node)?,
        private_ip: cx.ip("private_ip", &m.private_ip)?,
        subnets: cx.nets("subnets", &m.subnets)?,
        ready: m.ready,
    })
}

fn endpoint_to_proto(e: &GatewayEndpoint) -> v1::GatewayEndpoint {
    v1::GatewayEndpoint {
        node: e.node.to_string(),
        r#type: endpoint_type_to_proto(e.type_).into(),
        port: e.port.into(),
        under_nat: e.under_nat,
        nat_type: e.nat_type.clone(),
        public_ip: e.public_ip.as_ref().map(ToString::to_string),
        public_port: e.public_port.map(u32::from),
        config: e
            .config
            .iter()
            .map(|(key, value)| v1::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    }
}

fn endpoint_from_proto(
    cx: &Cx,
    e: &v1::GatewayEndpoint,
) -> Result<GatewayEndpoint, ConversionError> {
    Ok(GatewayEndpoint {
        node: cx.node_name("node", &e.node)?,
        type_: endpoint_type_from_proto(cx, "type", e.r#type)?,
        port: cx.port("port", e.port)?,
        under_nat: e.under_nat,
        nat_type: e.nat_type.clone(),
        public_ip: e
            .public_ip
            .as_deref()
            .map(|ip| cx.ip("public_ip", ip))
            .transpose()?,
        public_port: e
            .public_port
            .map(|p| cx.port("public_port", p))
            .transpose()?,
        config: cx.string_map("config", &e.config)?,
    })
}

fn endpoint_type_to_proto(t: EndpointType) -> v1::EndpointType {
    match t {
        EndpointType::Tunnel => v1::EndpointType::Tunnel,
        EndpointType::Proxy => v1::EndpointType::Proxy,
    }
}

fn endpoint_type_from_proto(cx: &Cx, field: &str, v: i32) -> Result<EndpointType, ConversionError> {
    match v1::EndpointType::try_from(v) {
        Ok(v1::EndpointType::Tunnel) => Ok(EndpointType::Tunnel),
        Ok(v1::EndpointType::Proxy) => Ok(EndpointType::Proxy),
        Ok(v1::EndpointType::Unspecified) => Err(cx.missing(field)),
        Err(_) => Err(cx.invalid(field, v.to_string(), "is not a known endpoint type")),
    }
}

fn expose_type_to_proto(t: ExposeType) -> v1::ExposeType {
    match t {
        ExposeType::None => v1::ExposeType::None,
        ExposeType::PublicIP => v1::ExposeType::PublicIp,
        ExposeType::LoadBalancer => v1::ExposeType::LoadBalancer,
    }
}

fn expose_type_from_proto(cx: &Cx, field: &str, v: i32) -> Result<ExposeType, ConversionError> {
    match v1::ExposeType::try_from(v) {
        Ok(v1::ExposeType::None) => Ok(ExposeType::None),
        Ok(v1::ExposeType::PublicIp) => Ok(ExposeType::PublicIP),
        Ok(v1::ExposeType::LoadBalancer) => Ok(ExposeType::LoadBalancer),
        Ok(v1::ExposeType::Unspecified) => Err(cx.missing(field)),
        Err(_) => Err(cx.invalid(field, v.to_string(), "is not a known expose type")),
    }
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

// ---------------------------------------------------------------------------
// Updates and resource versions

/// The header of an [`v1::Update`]: everything but the resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateHeader {
    pub epoch: String,
    pub revision: u64,
    pub nonce: String,
    /// Part of a full snapshot rather than a delta.
    pub snapshot: bool,
    /// The last part of a snapshot: the agent may now garbage-collect.
    pub snapshot_complete: bool,
    /// Explicit removals.
    pub removed: Vec<ResourceName>,
    /// The hub means a large removal.
    pub intentional_removal: bool,
}

/// An Update decoded and checked: every resource parsed and its version
/// verified, in the order received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedUpdate {
    pub header: UpdateHeader,
    pub resources: Vec<(ResourceName, Resource)>,
}

/// Builds an Update from a header and resources already converted.
pub fn update_to_proto(header: &UpdateHeader, resources: Vec<v1::Resource>) -> v1::Update {
    v1::Update {
        epoch: header.epoch.clone(),
        revision: header.revision,
        nonce: header.nonce.clone(),
        snapshot: header.snapshot,
        snapshot_complete: header.snapshot_complete,
        resources,
        removed: header.removed.iter().map(ToString::to_string).collect(),
        intentional_removal: header.intentional_removal,
    }
}

/// Decodes an Update as the agent receives it: every resource as by
/// [`resource_from_proto`], every removed name parsed, no name twice, no name
/// both updated and removed, `snapshot_complete` only on a snapshot.
pub fn update_from_proto(u: &v1::Update) -> Result<DecodedUpdate, ConversionError> {
    let cx = Cx::new(Subject::Message("update"));
    if u.snapshot_complete && !u.snapshot {
        return Err(cx.inconsistent(
            "snapshot_complete",
            "set on an update that is not a snapshot".to_owned(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut resources = Vec::with_capacity(u.resources.len());
    for r in &u.resources {
        let (name, resource) = resource_from_proto(r)?;
        if !seen.insert(name.clone()) {
            return Err(Cx::new(Subject::Resource(r.name.clone()))
                .inconsistent("name", "appears twice in one update".to_owned()));
        }
        resources.push((name, resource));
    }
    let mut removed = Vec::with_capacity(u.removed.len());
    for (i, raw) in u.removed.iter().enumerate() {
        let name = ResourceName::parse(raw)
            .ok_or_else(|| cx.invalid(&format!("removed[{i}]"), raw, "is not a resource name"))?;
        if seen.contains(&name) {
            return Err(cx.inconsistent(
                &format!("removed[{i}]"),
                format!("{name} is both updated and removed"),
            ));
        }
        removed.push(name);
    }
    Ok(DecodedUpdate {
        header: UpdateHeader {
            epoch: u.epoch.clone(),
            revision: u.revision,
            nonce: u.nonce.clone(),
            snapshot: u.snapshot,
            snapshot_complete: u.snapshot_complete,
            removed,
            intentional_removal: u.intentional_removal,
        },
        resources,
    })
}

/// The name and version of each resource, for a Hello or an Applied.
pub fn resource_versions_to_proto<'a>(
    items: impl IntoIterator<Item = (&'a ResourceName, &'a ContentVersion)>,
) -> Vec<v1::ResourceVersion> {
    items
        .into_iter()
        .map(|(name, version)| v1::ResourceVersion {
            name: name.to_string(),
            version: version.to_string(),
        })
        .collect()
}

/// The agent's inventory from its Hello: what it holds, by name. A name
/// listed twice is an error.
pub fn hello_inventory(
    hello: &v1::Hello,
) -> Result<BTreeMap<ResourceName, ContentVersion>, ConversionError> {
    let (_, others) = hello_inventory_interned(hello, |_| None::<u32>)?;
    Ok(others
        .into_iter()
        .map(|(n, v)| (n, ContentVersion::from_string(v.to_owned())))
        .collect())
}

/// The Hello's inventory for a receiver that interns the names it knows:
/// `known` gives the key of such a name — taken as it is, neither parsed
/// nor copied (a name the receiver published is valid) — and every other
/// name is parsed and returned by name. Versions are borrowed from the
/// Hello. The known entries come sorted by key. A name listed twice is an
/// error, as in [`hello_inventory`]: a tunnel candidate's Hello lists
/// thousands of resources, and every reconnect reads them.
#[allow(clippy::type_complexity)]
pub fn hello_inventory_interned<K: Ord + Copy>(
    hello: &v1::Hello,
    known: impl Fn(&str) -> Option<K>,
) -> Result<(Vec<(K, &str)>, BTreeMap<ResourceName, &str>), ConversionError> {
    let cx = Cx::new(Subject::Message("hello"));
    // The field is named only for an error.
    let field = |i: usize| format!("resources[{i}].name");
    let twice = |i: usize| {
        let name = &hello.resources[i].name;
        cx.inconsistent(&field(i), format!("{name} is listed twice"))
    };
    let mut interned = Vec::with_capacity(hello.resources.len());
    let mut others = BTreeMap::new();
    for (i, rv) in hello.resources.iter().enumerate() {
        if let Some(k) = known(&rv.name) {
            interned.push((k, i));
            continue;
        }
        let name = ResourceName::parse(&rv.name)
            .ok_or_else(|| cx.invalid(&field(i), &rv.name, "is not a resource name"))?;
        if others.insert(name, rv.version.as_str()).is_some() {
            return Err(twice(i));
        }
    }
    interned.sort_unstable();
    if let Some(w) = interned.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(twice(w[1].1));
    }
    let interned = interned
        .into_iter()
        .map(|(k, i)| (k, hello.resources[i].version.as_str()))
        .collect();
    Ok((interned, others))
}

// ---------------------------------------------------------------------------
// Problems, reports, topology

pub fn problem_to_proto(p: &Problem) -> v1::Problem {
    v1::Problem {
        severity: match p.severity {
            Severity::Error => v1::Severity::Error,
            Severity::Warning => v1::Severity::Warning,
        }
        .into(),
        object: p.object.clone(),
        field: p.field.clone(),
        value: p.value.clone(),
        message: p.message.clone(),
    }
}

pub fn problem_from_proto(p: &v1::Problem) -> Result<Problem, ConversionError> {
    let cx = Cx::new(Subject::Message("problem"));
    let severity = match v1::Severity::try_from(p.severity) {
        Ok(v1::Severity::Error) => Severity::Error,
        Ok(v1::Severity::Warning) => Severity::Warning,
        Ok(v1::Severity::Unspecified) => return Err(cx.missing("severity")),
        Err(_) => {
            return Err(cx.invalid(
                "severity",
                p.severity.to_string(),
                "is not a known severity",
            ));
        }
    };
    Ok(Problem {
        severity,
        object: p.object.clone(),
        field: p.field.clone(),
        value: p.value.clone(),
        message: p.message.clone(),
    })
}

/// The part of a Report the domain model knows. `local_endpoints` is left
/// empty and `peers` holds only the observed endpoints (with a fresh
/// handshake), for the agent to fill in.
pub fn report_to_proto(r: &AgentReport) -> v1::Report {
    v1::Report {
        wireguard_public_key: r.wireguard_public_key.clone(),
        tunnel_port: r.tunnel_port.map(u32::from),
        observed_endpoint: r.observed_endpoint.as_ref().map(ToString::to_string),
        local_endpoints: Vec::new(),
        local_failover: r
            .local_failover
            .iter()
            .map(|(gateway, node)| v1::LocalFailover {
                gateway: gateway.to_string(),
                active_node: node.to_string(),
            })
            .collect(),
        peers: r
            .observed_peers
            .iter()
            .map(|(node, endpoint)| (node, endpoint, false))
            .chain(r.observed_direct_peers.iter().map(|(n, e)| (n, e, true)))
            .map(|(node, endpoint, direct_device)| v1::PeerTunnelState {
                peer_node: node.to_string(),
                handshake_age_seconds: Some(0),
                endpoint: endpoint.to_string(),
                direct_device,
                ..Default::default()
            })
            .collect(),
        direct_public_key: r.direct_public_key.clone(),
        dead_candidates: r.dead_candidates.iter().map(ToString::to_string).collect(),
        ipsec_public_key: r.ipsec_public_key.clone(),
    }
}

/// A handshake younger than this makes a peer's endpoint an observation the
/// hub passes on (WireGuard's REJECT_AFTER_TIME).
pub const OBSERVATION_FRESH_SECS: u64 = 180;

/// Validates a Report as the hub receives it and returns what the compiler
/// uses. The WireGuard key must look like one (44 characters of base64), every
/// endpoint must parse, failover gateways must be sorted and unique, and peer
/// names must be node names; the tunnel statistics themselves are not part of
/// the result.
pub fn report_from_proto(r: &v1::Report) -> Result<AgentReport, ConversionError> {
    let cx = Cx::new(Subject::Message("report"));
    for (field, key) in [
        ("wireguard_public_key", &r.wireguard_public_key),
        ("direct_public_key", &r.direct_public_key),
    ] {
        if let Some(key) = key
            && !is_wireguard_key(key)
        {
            return Err(cx.invalid(
                field,
                key,
                "is not a WireGuard public key (44 characters of base64)",
            ));
        }
    }
    if let Some(key) = &r.ipsec_public_key {
        ipsec_key(&cx, "ipsec_public_key", key)?;
    }
    for (i, e) in r.local_endpoints.iter().enumerate() {
        cx.socket(&format!("local_endpoints[{i}]"), e)?;
    }
    let mut local_failover = BTreeMap::new();
    for (i, f) in r.local_failover.iter().enumerate() {
        let gateway = cx.gateway_name(&format!("local_failover[{i}].gateway"), &f.gateway)?;
        let node = cx.node_name(&format!("local_failover[{i}].active_node"), &f.active_node)?;
        if local_failover
            .last_key_value()
            .is_some_and(|(last, _)| *last >= gateway)
        {
            return Err(cx.invalid(
                &format!("local_failover[{i}].gateway"),
                &f.gateway,
                "is out of order or repeated (sorted, unique gateways)",
            ));
        }
        local_failover.insert(gateway, node);
    }
    let mut observed_peers = BTreeMap::new();
    let mut observed_direct_peers = BTreeMap::new();
    for (i, p) in r.peers.iter().enumerate() {
        let node = cx.node_name(&format!("peers[{i}].peer_node"), &p.peer_node)?;
        if p.endpoint.is_empty() {
            continue;
        }
        let endpoint = cx.socket(&format!("peers[{i}].endpoint"), &p.endpoint)?;
        // An IPsec row is live while its IKE_SA is established (dead peer
        // detection ends it otherwise); its age is the CHILD_SA's since the
        // last rekey, no sign of life. A WireGuard row is live while its
        // handshake is fresh.
        let fresh = if p.ipsec_state.is_empty() {
            p.handshake_age_seconds
                .is_some_and(|age| age < OBSERVATION_FRESH_SECS)
        } else {
            p.ipsec_state.starts_with("ESTABLISHED")
        };
        if fresh && p.direct_device {
            observed_direct_peers.insert(node, endpoint);
        } else if fresh && !p.relayed {
            observed_peers.insert(node, endpoint);
        }
    }
    if r.dead_candidates.len() > raven_model::report::MAX_DEAD_CANDIDATES {
        return Err(cx.invalid(
            "dead_candidates",
            r.dead_candidates.len().to_string(),
            "lists more than 16 nodes (only the candidates of the node's own gateway belong there)",
        ));
    }
    const _: () = assert!(raven_model::report::MAX_DEAD_CANDIDATES == 16);
    let mut dead_candidates = BTreeSet::new();
    for (i, d) in r.dead_candidates.iter().enumerate() {
        let field = format!("dead_candidates[{i}]");
        let node = cx.node_name(&field, d)?;
        if dead_candidates.last().is_some_and(|last| *last >= node) {
            return Err(cx.invalid(
                &field,
                d,
                "is out of order or repeated (sorted, unique nodes)",
            ));
        }
        dead_candidates.insert(node);
    }
    Ok(AgentReport {
        wireguard_public_key: r.wireguard_public_key.clone(),
        tunnel_port: r
            .tunnel_port
            .map(|p| cx.port("tunnel_port", p))
            .transpose()?,
        observed_endpoint: r
            .observed_endpoint
            .as_deref()
            .map(|e| cx.socket("observed_endpoint", e))
            .transpose()?,
        local_failover,
        observed_peers,
        direct_public_key: r.direct_public_key.clone(),
        observed_direct_peers,
        dead_candidates,
        ipsec_public_key: r.ipsec_public_key.clone(),
    })
}

/// A canonical base64 encoding of 32 bytes, as `wg pubkey` prints it.
fn is_wireguard_key(s: &str) -> bool {
    let b = s.as_bytes();
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    // 32 bytes = 42 full sextets + 4 bits: the 43rd character carries 4 data
    // bits and 2 zero bits, so it is one of the 16 characters below.
    b.len() == 44
        && b[43] == b'='
        && b[..43].iter().all(b64)
        && b"AEIMQUYcgkosw048".contains(&b[42])
}

/// The answer to `InspectService.GetTopology`.
pub fn topology_to_proto(
    epoch: &str,
    revision: u64,
    topology: &Topology,
) -> v1::GetTopologyResponse {
    v1::GetTopologyResponse {
        epoch: epoch.to_owned(),
        revision,
        resources: topology
            .resources
            .iter()
            .map(|(name, r)| resource_to_proto(name, r))
            .collect(),
        problems: topology.problems.iter().map(problem_to_proto).collect(),
        total_resources: u32::try_from(topology.resources.len()).unwrap_or(u32::MAX),
        // The deprecated second copy is filled only on request (the hub's
        // `include_json`).
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Field parsing with error context

/// The subject being decoded and the path to the current message inside it.
struct Cx {
    subject: Subject,
    prefix: String,
}

impl Cx {
    fn new(subject: Subject) -> Self {
        Self {
            subject,
            prefix: String::new(),
        }
    }

    fn nested(&self, field: &str) -> Self {
        Self {
            subject: self.subject.clone(),
            prefix: format!("{}{field}.", self.prefix),
        }
    }

    fn path(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn invalid(
        &self,
        field: &str,
        value: impl Into<String>,
        reason: &'static str,
    ) -> ConversionError {
        ConversionError::InvalidValue {
            subject: self.subject.clone(),
            field: self.path(field),
            value: value.into(),
            reason,
        }
    }

    fn missing(&self, field: &str) -> ConversionError {
        ConversionError::Missing {
            subject: self.subject.clone(),
            field: self.path(field),
        }
    }

    fn inconsistent(&self, field: &str, message: String) -> ConversionError {
        ConversionError::Inconsistent {
            subject: self.subject.clone(),
            field: self.path(field),
            message,
        }
    }

    /// Decodes each element of a repeated message field, with `field[i].` as
    /// the path of its fields.
    fn list<P, D>(
        &self,
        field: &str,
        items: &[P],
        decode: impl Fn(&Cx, &P) -> Result<D, ConversionError>,
    ) -> Result<Vec<D>, ConversionError> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| decode(&self.nested(&format!("{field}[{i}]")), item))
            .collect()
    }

    fn node_name(&self, field: &str, s: &str) -> Result<NodeName, ConversionError> {
        if s.is_empty() {
            return Err(self.missing(field));
        }
        NodeName::new(s).map_err(|_| self.invalid(field, s, "is not a valid node name"))
    }

    fn gateway_name(&self, field: &str, s: &str) -> Result<GatewayName, ConversionError> {
        if s.is_empty() {
            return Err(self.missing(field));
        }
        GatewayName::new(s).map_err(|_| self.invalid(field, s, "is not a valid gateway name"))
    }

    fn ip(&self, field: &str, s: &str) -> Result<IpAddr, ConversionError> {
        s.parse()
            .map_err(|_| self.invalid(field, s, "is not an IP address"))
    }

    fn nets(&self, field: &str, items: &[String]) -> Result<Vec<IpNet>, ConversionError> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse()
                    .map_err(|_| self.invalid(&format!("{field}[{i}]"), s, "is not a CIDR"))
            })
            .collect()
    }

    fn socket(&self, field: &str, s: &str) -> Result<SocketAddr, ConversionError> {
        s.parse().map_err(|_| {
            self.invalid(
                field,
                s,
                "is not an address and port (ip:port, [ipv6]:port)",
            )
        })
    }

    fn port(&self, field: &str, v: u32) -> Result<u16, ConversionError> {
        u16::try_from(v)
            .map_err(|_| self.invalid(field, v.to_string(), "is not a port number (0-65535)"))
    }

    /// A map sent as repeated pairs: keys sorted and unique.
    fn string_map(
        &self,
        field: &str,
        items: &[v1::KeyValue],
    ) -> Result<BTreeMap<String, String>, ConversionError> {
        let mut out = BTreeMap::new();
        for (i, kv) in items.iter().enumerate() {
            if out
                .last_key_value()
                .is_some_and(|(last, _): (&String, _)| *last >= kv.key)
            {
                return Err(self.invalid(
                    &format!("{field}[{i}].key"),
                    &kv.key,
                    "is out of order or repeated (keys must be sorted and unique)",
                ));
            }
            out.insert(kv.key.clone(), kv.value.clone());
        }
        Ok(out)
    }
}
