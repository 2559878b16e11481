//! proptest strategies for raven-core's topology types (feature `arbitrary`).
//!
//! Values are valid domain values, not necessarily ones the compiler would
//! produce: any names, addresses and flags, so that conversions and storage
//! are exercised beyond the shapes of today's compiler.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use raven_model::AgentReport;
use raven_model::names::{GatewayName, NodeName};
use raven_model::topology::{
    DomainPrefixes, EndpointType, ExposeType, GatewayEndpoint, GatewayView, Member, NodeView,
    PeerInfo, Resource, ResourceBody, ResourceName, Settings,
};

const NAME: &str = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";

pub fn node_name() -> impl Strategy<Value = NodeName> {
    NAME.prop_filter_map("valid node name", |s| NodeName::new(s).ok())
}

pub fn gateway_name() -> impl Strategy<Value = GatewayName> {
    NAME.prop_filter_map("valid gateway name", |s| GatewayName::new(s).ok())
}

pub fn ip() -> impl Strategy<Value = IpAddr> {
    any::<IpAddr>()
}

/// Any network, including ones with host bits set (`10.0.0.1/24`).
pub fn ip_net() -> impl Strategy<Value = IpNet> {
    (any::<IpAddr>(), any::<u8>()).prop_filter_map("valid prefix", |(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, len % (max + 1)).ok()
    })
}

/// Socket addresses as they appear in text: no IPv6 flow info or scope id.
pub fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// A WireGuard public key in `wg`'s base64 form.
pub fn wireguard_key() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=".prop_map(String::from)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}".prop_map(String::from)
}

pub fn endpoint() -> impl Strategy<Value = GatewayEndpoint> {
    (
        node_name(),
        prop_oneof![Just(EndpointType::Tunnel), Just(EndpointType::Proxy)],
        any::<u16>(),
        any::<bool>(),
        text(),
        option::of(ip()),
        option::of(any::<u16>()),
        btree_map(text(), text(), 0..4),
    )
        .prop_map(
            |(node, type_, port, under_nat, nat_type, public_ip, public_port, config)| {
                GatewayEndpoint {
                    node,
                    type_,
                    port,
                    under_nat,
                    nat_type,
                    public_ip,
                    public_port,
                    config,
                }
            },
        )
}

pub fn member() -> impl Strategy<Value = Member> {
    (node_name(), ip(), vec(ip_net(), 0..3), any::<bool>()).prop_map(
        |(node, private_ip, subnets, ready)| Member {
            node,
            private_ip,
            subnets,
            ready,
        },
    )
}

pub fn expose_type() -> impl Strategy<Value = ExposeType> {
    prop_oneof![
        Just(ExposeType::None),
        Just(ExposeType::PublicIP),
        Just(ExposeType::LoadBalancer)
    ]
}

pub fn gateway_view() -> impl Strategy<Value = GatewayView> {
    (
        gateway_name(),
        expose_type(),
        any::<bool>(),
        vec(member(), 0..4),
        option::of(endpoint()),
        vec(endpoint(), 0..3),
        vec(endpoint(), 0..3),
        vec(ip_net(), 0..3),
        option::of(gateway_name()),
        vec(any::<u16>(), 0..3),
    )
        .prop_map(
            |(
                name,
                expose_type,
                under_nat,
                members,
                active_tunnel,
                tunnel_candidates,
                active_proxies,
                extra_source_cidrs,
                relay,
                proxy_ports,
            )| GatewayView {
                name,
                expose_type,
                under_nat,
                members,
                active_tunnel,
                tunnel_candidates,
                active_proxies,
                extra_source_cidrs,
                relay,
                proxy_ports,
            },
        )
}

pub fn node_view() -> impl Strategy<Value = NodeView> {
    (
        node_name(),
        option::of(gateway_name()),
        option::of(ip()),
        vec(ip_net(), 0..3),
        any::<[bool; 3]>(),
    )
        .prop_map(
            |(
                name,
                gateway,
                private_ip,
                subnets,
                [tunnel_active, tunnel_candidate, proxy_active],
            )| NodeView {
                name,
                gateway,
                private_ip,
                subnets,
                tunnel_active,
                tunnel_candidate,
                proxy_active,
            },
        )
}

pub fn settings() -> impl Strategy<Value = Settings> {
    (any::<[bool; 4]>(), any::<u16>()).prop_map(
        |([raven_cfg_present, enable_l3_tunnel, enable_l7_proxy, ipsec], vxlan_port)| Settings {
            raven_cfg_present,
            enable_l3_tunnel,
            enable_l7_proxy,
            vxlan_port,
            vpn_driver: if ipsec {
                raven_model::topology::VpnDriver::Ipsec
            } else {
                raven_model::topology::VpnDriver::Wireguard
            },
        },
    )
}

/// Any string as the key: the resource carries what the hub was told.
pub fn peer_info() -> impl Strategy<Value = PeerInfo> {
    (
        node_name(),
        gateway_name(),
        option::of(prop_oneof![wireguard_key(), text()]),
        option::of(any::<u16>()),
        option::of(socket_addr()),
        option::of((wireguard_key(), option::of(socket_addr()))),
        option::of(wireguard_key()),
    )
        .prop_map(
            |(
                node,
                gateway,
                wireguard_public_key,
                tunnel_port,
                observed_endpoint,
                direct,
                ipsec_public_key,
            )| {
                PeerInfo {
                    node,
                    gateway,
                    wireguard_public_key,
                    tunnel_port,
                    observed_endpoint,
                    direct: direct.map(|(public_key, observed_endpoint)| {
                        raven_model::topology::DirectDevice {
                            public_key,
                            observed_endpoint,
                        }
                    }),
                    ipsec_public_key,
                }
            },
        )
}

pub fn resource_body() -> impl Strategy<Value = ResourceBody> {
    prop_oneof![
        settings().prop_map(ResourceBody::Settings),
        gateway_view().prop_map(ResourceBody::Gateway),
        node_view().prop_map(ResourceBody::Node),
        peer_info().prop_map(ResourceBody::Peer),
        gateway_view().prop_map(|g| ResourceBody::Prefixes(DomainPrefixes::of(&g))),
    ]
}

/// The name a body belongs under.
pub fn name_of(body: &ResourceBody) -> ResourceName {
    match body {
        ResourceBody::Settings(_) => ResourceName::settings(),
        ResourceBody::Gateway(g) => ResourceName::gateway(&g.name),
        ResourceBody::Node(n) => ResourceName::node(&n.name),
        ResourceBody::Peer(p) => ResourceName::peer(&p.node),
        ResourceBody::Prefixes(p) => ResourceName::prefixes(&p.gateway),
    }
}

/// A resource under its proper name, with its content version.
pub fn resource() -> impl Strategy<Value = (ResourceName, Resource)> {
    resource_body().prop_map(|body| (name_of(&body), Resource::new(body)))
}

/// A report that passes the hub's checks (no tunnel statistics).
pub fn agent_report() -> impl Strategy<Value = AgentReport> {
    (
        option::of(wireguard_key()),
        option::of(any::<u16>()),
        option::of(socket_addr()),
        btree_map(gateway_name(), node_name(), 0..3),
        btree_map(node_name(), socket_addr(), 0..3),
        option::of(wireguard_key()),
        btree_map(node_name(), socket_addr(), 0..3),
        proptest::collection::btree_set(node_name(), 0..3),
        option::of(wireguard_key()),
    )
        .prop_map(
            |(
                wireguard_public_key,
                tunnel_port,
                observed_endpoint,
                local_failover,
                observed_peers,
                direct_public_key,
                observed_direct_peers,
                dead_candidates,
                ipsec_public_key,
            ): (
                _,
                _,
                _,
                BTreeMap<_, _>,
                BTreeMap<_, _>,
                _,
                BTreeMap<_, _>,
                _,
                _,
            )| {
                AgentReport {
                    wireguard_public_key,
                    tunnel_port,
                    observed_endpoint,
                    local_failover,
                    observed_peers,
                    direct_public_key,
                    observed_direct_peers,
                    dead_candidates,
                    ipsec_public_key,
                }
            },
        )
}
