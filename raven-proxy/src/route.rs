//! Where a CONNECT goes, decided from the topology the hub shipped (never
//! from a per-request API call), on both ends of a tunnel.
//!
//! * The cloud proxy server ([`cloud_route`]) maps the target — a node name,
//!   or an InternalIP only when exactly one node has it — to a direct
//!   connection (a node of an exposed domain, which the cloud reaches
//!   itself) or to the tunnels of the node's gateway's active proxy
//!   endpoints (a node in no gateway: its own tunnel).
//! * The edge ([`edge_target`]) checks again what it is asked to dial: a
//!   node of its own domain (or itself), on a port the asking server's
//!   gateway proxies.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use raven_model::topology::{ExposeType, GatewayView, NodeView, Resource, ResourceBody, Settings};
use raven_model::{GatewayName, NodeName, ResourceName};

/// The kubelet's ports: what a proxy carries when it knows nothing better.
pub const KUBELET_PORTS: [u16; 2] = [10250, 10255];

/// What a node's proxy knows of the topology: its own resource, the
/// gateways it receives and the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyView {
    pub me: NodeView,
    pub gateways: BTreeMap<GatewayName, GatewayView>,
    pub settings: Option<Settings>,
}

impl ProxyView {
    /// The view of `node` among `resources` (as the agent caches them);
    /// `None` when the node's own resource is missing.
    pub fn from_resources(
        node: &NodeName,
        resources: &BTreeMap<ResourceName, Resource>,
    ) -> Option<Self> {
        let mut me = None;
        let mut gateways = BTreeMap::new();
        let mut settings = None;
        for r in resources.values() {
            match &r.body {
                ResourceBody::Node(n) if &n.name == node => me = Some(n.clone()),
                ResourceBody::Gateway(g) => {
                    gateways.insert(g.name.clone(), g.clone());
                }
                ResourceBody::Settings(s) => settings = Some(s.clone()),
                _ => {}
            }
        }
        Some(Self {
            me: me?,
            gateways,
            settings,
        })
    }

    /// `enable-l7-proxy` is on in `raven-cfg`.
    pub fn enabled(&self) -> bool {
        self.settings.as_ref().is_some_and(|s| s.enable_l7_proxy)
    }

    fn my_gateway(&self) -> Option<&GatewayView> {
        self.me.gateway.as_ref().and_then(|g| self.gateways.get(g))
    }

    /// This node runs a cloud proxy server: it is an active proxy endpoint
    /// of an exposed gateway. Returns the port edges dial.
    pub fn server_port(&self) -> Option<u16> {
        if !self.enabled() {
            return None;
        }
        let gw = self.my_gateway().filter(|g| exposed(g))?;
        gw.active_proxies
            .iter()
            .find(|p| p.node == self.me.name)
            .map(|p| p.port)
    }

    /// The cloud proxy servers this node keeps tunnels to, when it is the
    /// active proxy endpoint of an edge gateway: every active proxy
    /// endpoint of every exposed gateway, with the address to dial.
    pub fn servers(&self) -> BTreeMap<NodeName, SocketAddr> {
        let mut out = BTreeMap::new();
        if !self.enabled() {
            return out;
        }
        match self.my_gateway() {
            Some(g) if !exposed(g) && g.active_proxies.iter().any(|p| p.node == self.me.name) => {}
            // A node in no gateway serves itself (when it knows of servers).
            None if self.me.gateway.is_none() => {}
            _ => return out,
        }
        for g in self.gateways.values().filter(|g| exposed(g)) {
            for p in &g.active_proxies {
                let ip = p.public_ip.or_else(|| {
                    g.members
                        .iter()
                        .find(|m| m.node == p.node)
                        .map(|m| m.private_ip)
                });
                if let Some(ip) = ip {
                    let port = p.public_port.unwrap_or(p.port);
                    out.insert(p.node.clone(), SocketAddr::new(ip, port));
                }
            }
        }
        out
    }

    /// Ports the proxy server on `server` carries: its gateway's
    /// `proxyHTTPPort`/`proxyHTTPSPort` (the kubelet's when unknown).
    pub fn ports_of_server(&self, server: &NodeName) -> Vec<u16> {
        self.gateways
            .values()
            .find(|g| g.members.iter().any(|m| &m.node == server))
            .map(|g| g.proxy_ports.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| KUBELET_PORTS.to_vec())
    }
}

fn exposed(g: &GatewayView) -> bool {
    g.expose_type != ExposeType::None
}

/// Why a CONNECT is refused: an HTTP status and a sentence naming the
/// target and what is wrong (sent as the reason phrase, which is what
/// kube-apiserver's egress dialer puts in its error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Where the cloud proxy server sends one CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudRoute {
    /// A node the cloud reaches itself.
    Direct(SocketAddr),
    /// Through a tunnel from one of `via` (in order of preference), asking
    /// it for `node`'s `port`.
    Tunnel {
        node: NodeName,
        port: u16,
        via: Vec<NodeName>,
    },
}

/// Splits `host:port` (`[v6]:port` for IPv6).
pub fn split_target(target: &str) -> Result<(&str, u16), Refusal> {
    let bad = || Refusal::new(400, format!("CONNECT target {target:?} is not host:port"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

/// The node a CONNECT host names: a node name, or an InternalIP that
/// exactly one member of a gateway has. Returns the node and its gateway
/// (`None`: a node in no gateway, known only by name).
fn target_node<'a>(
    view: &'a ProxyView,
    host: &str,
) -> Result<(NodeName, Option<&'a GatewayView>), Refusal> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        let owners: Vec<(&NodeName, &GatewayView)> = view
            .gateways
            .values()
            .flat_map(|g| g.members.iter().map(move |m| (m, g)))
            .filter(|(m, _)| m.private_ip == ip)
            .map(|(m, g)| (&m.node, g))
            .collect();
        return match owners.as_slice() {
            [] => Err(Refusal::new(
                404,
                format!("no node of any gateway has InternalIP {ip}"),
            )),
            [(n, g)] => Ok(((*n).clone(), Some(*g))),
            many => Err(Refusal::new(
                409,
                format!(
                    "InternalIP {ip} is ambiguous: nodes {} all have it; connect by node name (kube-apiserver: --kubelet-preferred-address-types=Hostname,...)",
                    many.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        };
    }
    let node = NodeName::new(host).map_err(|e| {
        Refusal::new(
            400,
            format!("CONNECT host {host:?} is neither an IP nor a node name: {e}"),
        )
    })?;
    let gw = view
        .gateways
        .values()
        .find(|g| g.members.iter().any(|m| m.node == node));
    Ok((node, gw))
}

/// Routes a CONNECT `target` received by the cloud proxy server of `view`.
pub fn cloud_route(view: &ProxyView, target: &str) -> Result<CloudRoute, Refusal> {
    let (host, port) = split_target(target)?;
    let ports = view.ports_of_server(&view.me.name);
    if !ports.contains(&port) {
        let gw = view
            .me
            .gateway
            .as_ref()
            .map_or_else(|| "this server".to_owned(), |g| format!("gateway {g}"));
        return Err(Refusal::new(
            403,
            format!(
                "port {port} of {host} is not proxied: spec.proxyConfig (proxyHTTPPort, proxyHTTPSPort) of {gw} carries {}",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let (node, gw) = target_node(view, host)?;
    match gw {
        // Nodes of exposed domains are reachable from the cloud itself.
        Some(g) if exposed(g) || view.me.gateway.as_ref() == Some(&g.name) => {
            let member = g.members.iter().find(|m| m.node == node);
            let ip = member
                .map(|m| m.private_ip)
                .ok_or_else(|| Refusal::new(404, format!("node {node} has no InternalIP")))?;
            Ok(CloudRoute::Direct(SocketAddr::new(ip, port)))
        }
        Some(g) => {
            let via: Vec<NodeName> = g.active_proxies.iter().map(|p| p.node.clone()).collect();
            if via.is_empty() {
                return Err(Refusal::new(
                    503,
                    format!(
                        "gateway {} of node {node} has no active proxy endpoint (spec.endpoints type proxy, spec.proxyConfig.Replicas, enable-l7-proxy)",
                        g.name
                    ),
                ));
            }
            Ok(CloudRoute::Tunnel { node, port, via })
        }
        None => Ok(CloudRoute::Tunnel {
            via: vec![node.clone()],
            node,
            port,
        }),
    }
}

/// What the edge end of a tunnel dials for `node`:`port` asked by the
/// server `server`: only nodes of its own domain (or itself), only on ports
/// that server's gateway proxies.
pub fn edge_target(
    view: &ProxyView,
    server: &NodeName,
    node: &str,
    port: u16,
) -> Result<SocketAddr, Refusal> {
    let ports = view.ports_of_server(server);
    if !ports.contains(&port) {
        return Err(Refusal::new(
            403,
            format!("port {port} is not proxied for server {server}"),
        ));
    }
    let node =
        NodeName::new(node).map_err(|e| Refusal::new(400, format!("target node {node:?}: {e}")))?;
    if node == view.me.name {
        return view
            .me
            .private_ip
            .map(|ip| SocketAddr::new(ip, port))
            .ok_or_else(|| Refusal::new(404, format!("node {node} has no InternalIP")));
    }
    let mine = view.my_gateway().and_then(|g| {
        g.members
            .iter()
            .find(|m| m.node == node)
            .map(|m| m.private_ip)
    });
    mine.map(|ip| SocketAddr::new(ip, port)).ok_or_else(|| {
        Refusal::new(
            403,
            format!(
                "node {node} is not in the domain of {} (gateway {}); a node serves only its own domain",
                view.me.name,
                view.me
                    .gateway
                    .as_ref()
                    .map_or("none", GatewayName::as_str)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures::{self, node as n};
    use raven_model::topology::{EndpointType, GatewayEndpoint};

    fn proxy_ep(node: &str, public: Option<&str>) -> GatewayEndpoint {
        GatewayEndpoint {
            type_: EndpointType::Proxy,
            under_nat: public.is_none(),
            public_ip: public.map(fixtures::ip),
            ..fixtures::endpoint(node, 10262)
        }
    }

    fn gw(name: &str, exposed: bool, members: &[(&str, &str)], proxies: &[&str]) -> GatewayView {
        GatewayView {
            expose_type: if exposed {
                ExposeType::PublicIP
            } else {
                ExposeType::None
            },
            under_nat: !exposed,
            members: members
                .iter()
                .map(|(m, ip)| fixtures::member(m, ip, &[]))
                .collect(),
            active_proxies: proxies
                .iter()
                .map(|p| proxy_ep(p, exposed.then_some("203.0.113.10")))
                .collect(),
            proxy_ports: if exposed {
                vec![9100, 10250, 10255]
            } else {
                vec![10250, 10255]
            },
            ..fixtures::gateway(name)
        }
    }

    /// Two edge domains whose nodes share InternalIP 172.16.2.103.
    fn view(me: &str, my_gw: Option<&str>) -> ProxyView {
        let gws = [
            gw(
                "gw-cloud",
                true,
                &[("c1", "192.168.0.195"), ("c2", "192.168.0.196")],
                &["c1"],
            ),
            gw(
                "gw-hz",
                false,
                &[("h1", "172.16.2.103"), ("h2", "172.16.2.104")],
                &["h1"],
            ),
            gw("gw-sz", false, &[("s1", "172.16.2.103")], &["s1"]),
        ];
        ProxyView {
            me: NodeView {
                private_ip: Some(fixtures::ip("172.16.2.103")),
                proxy_active: true,
                ..fixtures::node_view(me, my_gw)
            },
            gateways: gws.into_iter().map(|g| (g.name.clone(), g)).collect(),
            settings: Some(Settings {
                enable_l7_proxy: true,
                ..fixtures::settings()
            }),
        }
    }

    #[test]
    fn nodes_with_the_same_internal_ip_are_told_apart_by_name() {
        let v = view("c1", Some("gw-cloud"));
        let via = |r: Result<CloudRoute, Refusal>| match r {
            Ok(CloudRoute::Tunnel { via, node, .. }) => (node.to_string(), via[0].to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(via(cloud_route(&v, "h2:10250")), ("h2".into(), "h1".into()));
        assert_eq!(via(cloud_route(&v, "s1:10250")), ("s1".into(), "s1".into()));
        let err = cloud_route(&v, "172.16.2.103:10250").expect_err("refused");
        assert_eq!(err.status, 409);
        assert!(err.message.contains("h1, s1"), "{err}");
        // An IP only one node has is routed.
        assert_eq!(
            via(cloud_route(&v, "172.16.2.104:10250")),
            ("h2".into(), "h1".into())
        );
    }

    #[test]
    fn cloud_nodes_are_dialled_directly_and_nodes_in_no_gateway_through_their_own_tunnel() {
        let v = view("c1", Some("gw-cloud"));
        assert_eq!(
            cloud_route(&v, "c2:10250"),
            Ok(CloudRoute::Direct(
                "192.168.0.196:10250"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            ))
        );
        assert_eq!(
            cloud_route(&v, "lonely:10255"),
            Ok(CloudRoute::Tunnel {
                node: n("lonely"),
                port: 10255,
                via: vec![n("lonely")]
            })
        );
    }

    #[test]
    fn ports_outside_the_servers_proxy_config_are_refused_naming_the_gateway_and_the_ports() {
        let v = view("c1", Some("gw-cloud"));
        let err = cloud_route(&v, "h1:22").expect_err("refused");
        assert_eq!(err.status, 403);
        assert!(err.message.contains("port 22 of h1"), "{err}");
        assert!(
            err.message
                .contains("gateway gw-cloud carries 9100, 10250, 10255"),
            "{err}"
        );
        assert!(cloud_route(&v, "h1:9100").is_ok());
        assert_eq!(cloud_route(&v, "h1").expect_err("refused").status, 400);
    }

    #[test]
    fn an_edge_dials_only_its_own_domain_on_the_servers_ports() {
        let v = view("h1", Some("gw-hz"));
        let c1 = n("c1");
        assert_eq!(
            edge_target(&v, &c1, "h2", 10250),
            Ok("172.16.2.104:10250"
                .parse()
                .unwrap_or_else(|_| unreachable!()))
        );
        let err = edge_target(&v, &c1, "s1", 10250).expect_err("refused");
        assert_eq!(err.status, 403);
        assert!(err.message.contains("serves only its own domain"), "{err}");
        assert_eq!(
            edge_target(&v, &c1, "h2", 22).expect_err("refused").status,
            403
        );
    }

    #[test]
    fn a_node_in_no_gateway_keeps_a_tunnel_to_the_servers_and_dials_only_itself() {
        let mut v = view("lonely", None);
        // What the hub ships it: the gateways carrying a proxy server.
        v.gateways.retain(|_, g| exposed(g));
        assert_eq!(
            v.servers().into_iter().collect::<Vec<_>>(),
            vec![(
                n("c1"),
                "203.0.113.10:10262"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            )]
        );
        assert_eq!(v.server_port(), None);
        let c1 = n("c1");
        assert_eq!(
            edge_target(&v, &c1, "lonely", 10250),
            Ok("172.16.2.103:10250"
                .parse()
                .unwrap_or_else(|_| unreachable!()))
        );
        let err = edge_target(&v, &c1, "h2", 10250).expect_err("refused");
        assert_eq!(err.status, 403);
        assert!(err.message.contains("gateway none"), "{err}");
    }

    #[test]
    fn only_edge_proxy_endpoints_dial_and_only_exposed_proxy_endpoints_serve() {
        let edge = view("h1", Some("gw-hz"));
        assert_eq!(edge.server_port(), None);
        assert_eq!(
            edge.servers().into_iter().collect::<Vec<_>>(),
            vec![(
                n("c1"),
                "203.0.113.10:10262"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            )]
        );
        let member = view("h2", Some("gw-hz"));
        assert!(member.servers().is_empty());
        let cloud = view("c1", Some("gw-cloud"));
        assert_eq!(cloud.server_port(), Some(10262));
        assert!(cloud.servers().is_empty());
        let mut off = view("c1", Some("gw-cloud"));
        off.settings = None;
        assert_eq!(off.server_port(), None);
    }
}
