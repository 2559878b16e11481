//! The compiled topology: named resources, each with a content version.
//!
//! A resource is the unit the hub sends and the agent stores. Its version is
//! a hash of its canonical bytes, so equal content always has the equal
//! version, whichever hub replica compiled it and in whatever order the inputs
//! arrived.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::names::{GatewayName, NodeName};
use crate::problem::Problem;

/// UDP port of the VXLAN device `raven0` inside a gateway domain.
pub const VXLAN_PORT: u16 = 4472;
/// Default UDP port of gateway tunnels.
pub const TUNNEL_PORT: u16 = 4500;

/// Name of a resource: `settings`, `gateway/<name>`, `prefixes/<gateway>`,
/// `node/<name>` or `peer/<node>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResourceName(String);

impl ResourceName {
    pub const SETTINGS: &'static str = "settings";

    pub fn settings() -> Self {
        Self(Self::SETTINGS.to_owned())
    }
    pub fn gateway(name: &GatewayName) -> Self {
        Self(format!("gateway/{name}"))
    }
    pub fn node(name: &NodeName) -> Self {
        Self(format!("node/{name}"))
    }
    pub fn peer(name: &NodeName) -> Self {
        Self(format!("peer/{name}"))
    }
    /// The compact form of `gateway/<name>` members of other domains
    /// receive ([`DomainPrefixes`]).
    pub fn prefixes(name: &GatewayName) -> Self {
        Self(format!("prefixes/{name}"))
    }
    /// The gateway a `gateway/` or `prefixes/` resource describes.
    pub fn domain(&self) -> Option<GatewayName> {
        let (kind, n) = self.0.split_once('/')?;
        matches!(kind, "gateway" | "prefixes")
            .then(|| GatewayName::new(n).ok())
            .flatten()
    }
    /// The other form of the same domain: `gateway/<g>` ↔ `prefixes/<g>`.
    /// A view that trades one for the other loses nothing of that domain.
    pub fn counterpart(&self) -> Option<Self> {
        let g = self.domain()?;
        Some(if self.0.starts_with("gateway/") {
            Self::prefixes(&g)
        } else {
            Self::gateway(&g)
        })
    }
    /// Parses a name received from the network or read from the store.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = match s.split_once('/') {
            None => s == Self::SETTINGS,
            Some(("gateway" | "prefixes", n)) => GatewayName::new(n).is_ok(),
            Some(("node" | "peer", n)) => NodeName::new(n).is_ok(),
            Some(_) => false,
        };
        ok.then(|| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Hash, equality and order are those of the string, so maps keyed by
/// names are searched by `&str` without building a name.
impl std::borrow::Borrow<str> for ResourceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Type of a gateway endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointType {
    /// Layer-3 tunnel (UDP, WireGuard/IPsec).
    Tunnel,
    /// Layer-7 proxy (TCP).
    Proxy,
}

/// How a gateway is exposed to other domains (`spec.exposeType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExposeType {
    #[default]
    #[serde(rename = "")]
    None,
    PublicIP,
    LoadBalancer,
}

/// One endpoint of a gateway, validated and defaulted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEndpoint {
    pub node: NodeName,
    #[serde(rename = "type")]
    pub type_: EndpointType,
    pub port: u16,
    #[serde(rename = "underNAT")]
    pub under_nat: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nat_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "publicIP")]
    pub public_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// A node of a gateway's domain that raven can route to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub node: NodeName,
    #[serde(rename = "privateIP")]
    pub private_ip: IpAddr,
    pub subnets: Vec<IpNet>,
    pub ready: bool,
}

/// Everything another node needs to know about one gateway's domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    pub name: GatewayName,
    pub expose_type: ExposeType,
    #[serde(rename = "underNAT")]
    pub under_nat: bool,
    /// Member nodes with an InternalIP, sorted by name.
    pub members: Vec<Member>,
    /// The elected tunnel endpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_tunnel: Option<GatewayEndpoint>,
    /// Tunnel endpoints in failover order: the active one first, then the
    /// others on ready members in `spec.endpoints` order, then those on
    /// members that are not ready. Agents that lose the hub move along this
    /// list on their own.
    pub tunnel_candidates: Vec<GatewayEndpoint>,
    /// The elected proxy endpoints.
    pub active_proxies: Vec<GatewayEndpoint>,
    /// TCP ports the layer-7 proxy carries, sorted and without repeats: the
    /// union of `spec.proxyConfig.proxyHTTPPort` and `proxyHTTPSPort`, each
    /// defaulting to the kubelet's (10255 and 10250). Empty when the gateway
    /// has no active proxy endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_ports: Vec<u16>,
    /// Extra source CIDRs allowed through this gateway
    /// (`raven.openyurt.io/extra-allowed-source-cidrs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_source_cidrs: Vec<IpNet>,
    /// Relay gateway for reaching this gateway when both sides are under NAT:
    /// a gateway that is not under NAT, chosen by rendezvous hashing so that
    /// adding or removing unrelated gateways does not move it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<GatewayName>,
}

impl GatewayView {
    /// Everything this gateway's domain holds: each member's address (as a
    /// host prefix) and pod subnets, and the gateway's extra source CIDRs.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.members
            .iter()
            .flat_map(|m| {
                std::iter::once(IpNet::from(m.private_ip)).chain(m.subnets.iter().copied())
            })
            .chain(self.extra_source_cidrs.iter().copied())
    }

    /// The public addresses of its tunnel endpoints, candidates and the
    /// active one (with repeats).
    pub fn endpoint_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.tunnel_candidates
            .iter()
            .chain(self.active_tunnel.iter())
            .filter_map(|e| e.public_ip)
    }
}

/// What a member of another domain needs of one gateway's domain: the
/// resource `prefixes/<gateway>`, sent instead of `gateway/<gateway>` to
/// nodes that can never carry their own gateway's tunnel (see
/// [`crate::view::ViewClass::Member`]). A member routes another domain's
/// prefixes to its own gateway over VXLAN and exempts them from the CNI's
/// masquerade; it never needs that domain's members, endpoints or keys
/// beyond this. Derived from the [`GatewayView`] alone ([`Self::of`]), so a
/// change of one domain changes this one resource and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainPrefixes {
    pub gateway: GatewayName,
    /// [`GatewayView::prefixes`]: each member's address as a host prefix,
    /// its pod subnets and the extra source CIDRs; sorted, without repeats.
    pub prefixes: Vec<IpNet>,
    /// The public addresses of the gateway's tunnel endpoints (candidates
    /// and the active one), sorted, without repeats: reached over the
    /// underlay, so a host prefix equal to one is never routed into a
    /// tunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_addresses: Vec<IpAddr>,
}

impl DomainPrefixes {
    /// The compact form of `g`.
    pub fn of(g: &GatewayView) -> Self {
        let mut prefixes: Vec<IpNet> = g.prefixes().collect();
        prefixes.sort();
        prefixes.dedup();
        let mut endpoint_addresses: Vec<IpAddr> = g.endpoint_addresses().collect();
        endpoint_addresses.sort();
        endpoint_addresses.dedup();
        Self {
            gateway: g.name.clone(),
            prefixes,
            endpoint_addresses,
        }
    }
}

/// The node's own resource: where it belongs and which roles it holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: NodeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "privateIP")]
    pub private_ip: Option<IpAddr>,
    pub subnets: Vec<IpNet>,
    /// This node is its gateway's active tunnel endpoint.
    pub tunnel_active: bool,
    /// This node is listed as a tunnel endpoint of its gateway.
    pub tunnel_candidate: bool,
    /// This node is one of its gateway's active proxy endpoints.
    pub proxy_active: bool,
}

/// Cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `kube-system/raven-cfg` exists.
    pub raven_cfg_present: bool,
    pub enable_l3_tunnel: bool,
    pub enable_l7_proxy: bool,
    pub vxlan_port: u16,
    /// The VPN between gateways (`raven-cfg` key `vpn-driver`). Left out
    /// of the JSON when WireGuard, so versions of existing settings stay.
    #[serde(default, skip_serializing_if = "VpnDriver::is_wireguard")]
    pub vpn_driver: VpnDriver,
}

/// The VPN between gateways, chosen cluster-wide in `raven-cfg`
/// (`vpn-driver`) and overridable per agent (`raven-edge run --vpn`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VpnDriver {
    /// WireGuard (the default).
    #[default]
    Wireguard,
    /// IPsec: IKEv2 with strongSwan's charon.
    Ipsec,
}

impl VpnDriver {
    pub fn is_wireguard(&self) -> bool {
        *self == Self::Wireguard
    }
    /// Parses a `vpn-driver` value: `wireguard`, or `ipsec` (also Raven's
    /// `libreswan`), any case; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "wireguard" => Some(Self::Wireguard),
            "ipsec" | "libreswan" | "strongswan" => Some(Self::Ipsec),
            _ => None,
        }
    }
}

impl fmt::Display for VpnDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wireguard => "wireguard",
            Self::Ipsec => "ipsec",
        })
    }
}

/// What a tunnel endpoint node has reported about itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    pub node: NodeName,
    pub gateway: GatewayName,
    /// WireGuard public key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// The NAT-mapped address its tunnel traffic was seen from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_endpoint: Option<SocketAddr>,
    /// Its direct-path device, when it runs one (a NATed gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectDevice>,
    /// IPsec (IKEv2) raw Ed25519 public key, base64 of its 32 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec_public_key: Option<String>,
}

/// The second WireGuard device of a NATed gateway, which carries only direct
/// paths to other NATed gateways (see `DirectDevice` in the proto).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectDevice {
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Its NAT-mapped address as the node's relay sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_endpoint: Option<SocketAddr>,
}

/// The content of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResourceBody {
    Settings(Settings),
    Gateway(GatewayView),
    Node(NodeView),
    Peer(PeerInfo),
    Prefixes(DomainPrefixes),
}

/// A content version: the first 16 hex digits of the SHA-256 of the
/// resource's canonical JSON.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContentVersion(String);

impl ContentVersion {
    pub fn of(body: &ResourceBody) -> Self {
        // Serializing plain data into a Vec cannot fail.
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        Self(hex::encode(&digest[..8]))
    }
    /// Wraps a version received from the network or read from the store.
    pub fn from_string(s: String) -> Self {
        Self(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContentVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ContentVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A named, versioned resource.
///
/// Shared: a clone is a pointer (its `version` and `body` are read through
/// [`Deref`](std::ops::Deref), a write copies it first), so a topology that
/// keeps most resources of the last one is assembled without copying them.
/// Serialized, compared and hashed as [`ResourceData`], its content.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Resource(std::sync::Arc<ResourceData>);

/// The content of a [`Resource`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceData {
    pub version: ContentVersion,
    #[serde(flatten)]
    pub body: ResourceBody,
}

impl Resource {
    pub fn new(body: ResourceBody) -> Self {
        Self::with_version(ContentVersion::of(&body), body)
    }

    /// A resource whose version is known (it must be [`ContentVersion::of`]
    /// its body: taken from an earlier resource with an equal body, or
    /// checked against one received).
    pub fn with_version(version: ContentVersion, body: ResourceBody) -> Self {
        Self(std::sync::Arc::new(ResourceData { version, body }))
    }

    /// The body, copied only if another holder still shares it.
    pub fn into_body(self) -> ResourceBody {
        std::sync::Arc::try_unwrap(self.0).map_or_else(|shared| shared.body.clone(), |r| r.body)
    }

    /// Whether `other` is this very resource (not an equal copy): a resource
    /// reused from an earlier topology shares its allocation.
    pub fn shares(&self, other: &Resource) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Resource {
    type Target = ResourceData;
    fn deref(&self) -> &ResourceData {
        &self.0
    }
}

impl std::ops::DerefMut for Resource {
    fn deref_mut(&mut self) -> &mut ResourceData {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("version", &self.0.version)
            .field("body", &self.0.body)
            .finish()
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ResourceData::deserialize(d).map(|r| Self(std::sync::Arc::new(r)))
    }
}

/// The compiled topology of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub resources: BTreeMap<ResourceName, Resource>,
    /// Problems found while compiling, sorted.
    pub problems: Vec<Problem>,
}

impl Topology {
    pub fn gateways(&self) -> impl Iterator<Item = &GatewayView> {
        self.resources.values().filter_map(|r| match &r.body {
            ResourceBody::Gateway(g) => Some(g),
            _ => None,
        })
    }

    pub fn node(&self, name: &NodeName) -> Option<&NodeView> {
        match self
            .resources
            .get(&ResourceName::node(name))
            .map(|r| &r.body)
        {
            Some(ResourceBody::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// Stable, pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}
