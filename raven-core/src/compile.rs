//! The topology compiler: Gateways + Nodes + `raven-cfg` + agent reports →
//! [`Topology`]. Pure and deterministic: the same inputs give the same bytes,
//! whatever order they were collected in.
//!
//! A problem with one object is reported against that object and never drops
//! unrelated ones: an invalid Gateway is left out (the hub keeps serving its
//! last good version), an overlapping subnet is dropped from the later
//! gateway only, an unknown endpoint node is reported and never elected.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::api::{self, v1beta1};
use crate::cluster::{AgentReport, ClusterNode, Inputs, LoadBalancerIngress, RavenConfig};
use crate::election;
use crate::liveness;
use crate::names::{GatewayName, NodeName};
use crate::problem::Problem;
use crate::topology::{
    DirectDevice, DomainPrefixes, EndpointType, ExposeType, GatewayEndpoint, GatewayView, Member,
    NodeView, PeerInfo, Resource, ResourceBody, ResourceName, Settings, Topology, VXLAN_PORT,
};
use crate::validate::{self, gateway_object};

/// A Gateway that passed defaulting and validation, with its election result.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledGateway {
    pub name: GatewayName,
    /// The defaulted object.
    pub gateway: v1beta1::Gateway,
    /// The status Raven's GatewayPickup would write.
    pub status: v1beta1::GatewayStatus,
}

/// Compiler output: the topology plus the per-gateway status to write back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    pub topology: Topology,
    pub gateways: BTreeMap<GatewayName, CompiledGateway>,
}

/// A Gateway that passed defaulting and validation. [`admit`] is the only
/// way to make one, and the compiler takes it as it is: a gateway is
/// admitted once, where it enters (the hub's index, the manifest loader),
/// never again per compile.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    name: GatewayName,
    gateway: v1beta1::Gateway,
    forgiven: Vec<Problem>,
}

impl Admitted {
    pub fn name(&self) -> &GatewayName {
        &self.name
    }

    /// The defaulted object (an unusable `publicIP` cleared).
    pub fn gateway(&self) -> &v1beta1::Gateway {
        &self.gateway
    }

    /// What admission forgave (see [`admit`]); the compiler reports it.
    pub fn forgiven(&self) -> &[Problem] {
        &self.forgiven
    }

    /// Replaces the status, which admission does not look at: the election
    /// reads the current active endpoints from it.
    pub fn set_status(&mut self, status: Option<v1beta1::GatewayStatus>) {
        self.gateway.status = status;
    }
}

/// Defaults and validates one Gateway (the webhook's job).
///
/// One slip is forgiven: a `publicIP` that is not an address (the user
/// manual's masked `47.xx.xx.xx`) is reported as an error and treated as
/// unset, so the rest of the gateway keeps working. Every other validation
/// error rejects the object, as Raven's webhook would.
pub fn admit(mut gw: v1beta1::Gateway) -> Result<Admitted, Vec<Problem>> {
    validate::set_defaults(&mut gw);
    let problems = validate::validate(&gw);
    let public_ip_only = problems.iter().all(|p| p.field.ends_with(".publicIP"));
    if !problems.is_empty() && !public_ip_only {
        return Err(problems);
    }
    let forgiven = validate::drop_unusable_public_ips(&mut gw);
    let raw = gw.metadata.name.clone().unwrap_or_default();
    GatewayName::new(raw.clone())
        .map(|name| Admitted {
            name,
            gateway: gw,
            forgiven,
        })
        .map_err(|e| {
            vec![Problem::error(
                gateway_object(&raw),
                "metadata.name",
                raw,
                e.to_string(),
            )]
        })
}

/// Compiles the cluster.
pub fn compile(inputs: &Inputs) -> Compiled {
    compile_reusing(inputs, None)
}

/// Compiles the cluster like [`compile`], taking the content version of
/// every resource whose body is unchanged from `prev` (the last compile)
/// instead of serializing and hashing it again: a version is a pure function
/// of the body, so the output is the same, and a one-node change hashes the
/// few resources it changed instead of every resource of the cluster.
pub fn compile_reusing(inputs: &Inputs, prev: Option<&Topology>) -> Compiled {
    let resource = |name: &ResourceName, body: ResourceBody| match prev
        .and_then(|t| t.resources.get(name))
        .filter(|old| old.body == body)
    {
        Some(old) => Resource {
            version: old.version.clone(),
            body,
        },
        None => Resource::new(body),
    };
    let mut problems = Vec::new();
    let config = inputs.config;
    if !config.present {
        problems.push(Problem::warning(
            format!("ConfigMap/{}/{}", api::CONFIG_NAMESPACE, api::CONFIG_NAME),
            "",
            "",
            "not found: like Raven, no tunnel or proxy endpoint is elected until it exists",
        ));
    }
    if config.vpn_driver_invalid {
        problems.push(Problem::warning(
            format!("ConfigMap/{}/{}", api::CONFIG_NAMESPACE, api::CONFIG_NAME),
            format!("data.{}", api::KEY_VPN_DRIVER),
            "",
            "is not a VPN driver (wireguard or ipsec); WireGuard is used",
        ));
    }

    // Gateways come admitted; what admission found is reported here.
    for admitted in inputs.gateways.values() {
        problems.extend(admitted.forgiven().iter().cloned());
    }
    problems.extend(inputs.rejected.values().flatten().cloned());
    let admitted = &inputs.gateways;

    // Membership by label.
    let mut members_of: BTreeMap<&GatewayName, Vec<&ClusterNode>> = BTreeMap::new();
    for node in inputs.nodes.values() {
        let Some(label) = &node.gateway_label else {
            continue;
        };
        match admitted.get_key_value(label.as_str()).map(|(k, _)| k) {
            Some(g) => members_of.entry(g).or_default().push(node),
            None if inputs.rejected.contains_key(label) => {} // reported above
            None => problems.push(Problem::warning(
                format!("Node/{}", node.name),
                format!("metadata.labels[{}]", api::LABEL_GATEWAY),
                label,
                "no such Gateway; the node is not part of any gateway domain",
            )),
        }
    }

    // Subnets claimed across gateways: a range a gateway served before
    // (`inputs.held_subnets`) and still has a member for stays with it;
    // otherwise the first gateway (by name) to claim an address range keeps
    // it. A later, overlapping claim is dropped and reported.
    let mut claimed = Claims::default();
    for (net, gw) in &inputs.held_subnets {
        let holder = members_of.get_key_value(gw).and_then(|(g, ms)| {
            ms.iter()
                .find(|m| m.pod_cidrs.contains(net))
                .map(|m| (*g, m))
        });
        if let Some((g, m)) = holder {
            claimed.reserved.insert(*net, (g.clone(), m.name.clone()));
        }
    }
    let mut views = BTreeMap::new();
    let mut compiled = BTreeMap::new();
    for (name, gw) in admitted {
        let gw = gw.gateway();
        let members = members_of.get(name).cloned().unwrap_or_default();
        let (gw, adopted) = adopt_local_failover(name, gw, &members, inputs);
        problems.extend(adopted);
        let dead = liveness::proven_dead(name, &gw.spec, &members, inputs);
        problems.extend(dead_problems(name, &gw.spec, &dead));
        let live = Liveness {
            connected: &inputs.streams.connected,
            dead: &dead,
        };
        let lb = inputs.load_balancers.get(name.as_str());
        let (view, status, ps) =
            compile_gateway(name, &gw, &members, &config, &live, lb, &mut claimed);
        problems.extend(ps);
        let mut gw = gw.clone();
        gw.status = Some(status.clone());
        compiled.insert(
            name.clone(),
            CompiledGateway {
                name: name.clone(),
                gateway: gw,
                status,
            },
        );
        views.insert(name.clone(), view);
    }
    assign_relays(&mut views);
    for (name, c) in &mut compiled {
        if let Some(view) = views.get(name) {
            learned_facts(&mut c.status, view, &views, inputs);
            c.gateway.status = Some(c.status.clone());
        }
    }

    let mut resources = BTreeMap::new();
    let settings = ResourceBody::Settings(Settings {
        raven_cfg_present: config.present,
        enable_l3_tunnel: config.enable_l3_tunnel,
        enable_l7_proxy: config.enable_l7_proxy,
        vxlan_port: VXLAN_PORT,
        vpn_driver: config.vpn_driver,
    });
    let name = ResourceName::settings();
    resources.insert(name.clone(), resource(&name, settings));
    for node in inputs.nodes.values() {
        let view = node_view(node, &views);
        let name = ResourceName::node(&node.name);
        let r = resource(&name, ResourceBody::Node(view));
        resources.insert(name, r);
    }
    for view in views.values() {
        for cand in &view.tunnel_candidates {
            let report = inputs.reports.get(&cand.node).cloned().unwrap_or_default();
            if report.wireguard_public_key.is_none()
                && report.ipsec_public_key.is_none()
                && report.observed_endpoint.is_none()
            {
                continue;
            }
            // A direct-path device is of use between NATed gateways only.
            let direct = report
                .direct_public_key
                .filter(|_| view.under_nat)
                .map(|public_key| DirectDevice {
                    public_key,
                    observed_endpoint: observed_endpoint(view, &cand.node, &views, inputs, |r| {
                        &r.observed_direct_peers
                    }),
                });
            let peer = PeerInfo {
                node: cand.node.clone(),
                gateway: view.name.clone(),
                wireguard_public_key: report.wireguard_public_key,
                tunnel_port: report.tunnel_port,
                observed_endpoint: report.observed_endpoint.or_else(|| {
                    observed_endpoint(view, &cand.node, &views, inputs, |r| &r.observed_peers)
                }),
                direct,
                ipsec_public_key: report.ipsec_public_key,
            };
            let name = ResourceName::peer(&cand.node);
            let r = resource(&name, ResourceBody::Peer(peer));
            resources.insert(name, r);
        }
    }
    for (name, view) in views {
        // The compact form members of other domains receive: derived from
        // the view alone, so it changes exactly when its prefixes do.
        let prefixes = ResourceName::prefixes(&name);
        let r = resource(&prefixes, ResourceBody::Prefixes(DomainPrefixes::of(&view)));
        resources.insert(prefixes, r);
        let name = ResourceName::gateway(&name);
        let r = resource(&name, ResourceBody::Gateway(view));
        resources.insert(name, r);
    }

    problems.sort();
    problems.dedup();
    Compiled {
        topology: Topology {
            resources,
            problems,
        },
        gateways: compiled,
    }
}

/// Local failover the hub hears about (agents fail over between a
/// gateway's candidates on their own, without the hub): a tunnel candidate that
/// took its gateway over while the hub was unreachable reports itself in
/// `local_failover`. The hub adopts that as the gateway's current active
/// tunnel endpoint, so the sticky election keeps it (and the status records
/// it) instead of moving traffic back to the endpoint its domain found dead.
/// Only a Ready member listed as a tunnel endpoint can claim; of several
/// claimants the first in `spec.endpoints` order wins. A claim is adopted
/// only while the hub's own choice is unreachable — its agent has no stream
/// to this hub, or its domain has proven it dead — so a candidate cannot take
/// a gateway over from a connected, heartbeating endpoint (such a claim is
/// refused and reported). A claim counts while its agent is connected (it is
/// withdrawn when the agent disconnects).
fn adopt_local_failover(
    name: &GatewayName,
    gw: &v1beta1::Gateway,
    members: &[&ClusterNode],
    inputs: &Inputs,
) -> (v1beta1::Gateway, Vec<Problem>) {
    let claims = |node: &str| {
        NodeName::new(node.to_owned()).ok().is_some_and(|n| {
            inputs
                .reports
                .get(&n)
                .and_then(|r| r.local_failover.get(name))
                == Some(&n)
        })
    };
    let ready = |node: &str| members.iter().any(|m| m.ready && m.name.as_str() == node);
    let Some(claimant) =
        gw.spec.endpoints.iter().find(|ep| {
            ep.type_ == v1beta1::TUNNEL && ready(&ep.node_name) && claims(&ep.node_name)
        })
    else {
        return (gw.clone(), Vec::new());
    };
    let current = gw.status.as_ref().and_then(|s| {
        s.active_endpoints
            .iter()
            .find(|e| e.type_ == v1beta1::TUNNEL)
            .map(|e| e.node_name.clone())
    });
    let reachable = |node: &str| {
        NodeName::new(node.to_owned()).ok().is_some_and(|n| {
            inputs.streams.connected.contains(&n)
                && !liveness::proven_dead(name, &gw.spec, members, inputs).contains(&n)
        })
    };
    if let Some(current) = current.filter(|c| *c != claimant.node_name && reachable(c)) {
        let problem = Problem::warning(
            gateway_object(name.as_str()),
            "status.activeEndpoints",
            &claimant.node_name,
            format!(
                "this node claims a local failover while the elected endpoint {current} is connected and not proven dead; refused"
            ),
        );
        return (gw.clone(), vec![problem]);
    }
    let mut gw = gw.clone();
    let status = gw.status.get_or_insert_with(Default::default);
    status
        .active_endpoints
        .retain(|e| e.type_ != v1beta1::TUNNEL);
    status.active_endpoints.push(claimant.clone());
    // Reported for as long as the claim stands (its agent re-reports it until
    // it sees the hub agree, and it is withdrawn when the agent disconnects).
    let problem = Problem::warning(
        gateway_object(name.as_str()),
        "status.activeEndpoints",
        &claimant.node_name,
        "this node took the tunnel over by local failover (its domain found the previous endpoint dead while the hub was unreachable); the election keeps it",
    );
    (gw, vec![problem])
}

/// The NAT-mapped endpoint of `node` (a tunnel candidate of the NATed gateway
/// `view`) as seen by the active tunnel node of a gateway that is not under
/// NAT: `view`'s relay first, then the others by name. `seen` picks the
/// observations of one of the node's devices from a report.
fn observed_endpoint(
    view: &GatewayView,
    node: &NodeName,
    views: &BTreeMap<GatewayName, GatewayView>,
    inputs: &Inputs,
    seen: impl Fn(&AgentReport) -> &BTreeMap<NodeName, std::net::SocketAddr>,
) -> Option<std::net::SocketAddr> {
    if !view.under_nat {
        return None;
    }
    let public = views.values().filter(|g| !g.under_nat);
    let relay_first = view
        .relay
        .as_ref()
        .and_then(|r| views.get(r))
        .into_iter()
        .chain(public);
    relay_first
        .filter_map(|g| g.active_tunnel.as_ref())
        .find_map(|t| {
            inputs
                .reports
                .get(&t.node)
                .and_then(|r| seen(r).get(node))
                .copied()
        })
}

/// What the hub learned from agents' reports about each active tunnel
/// endpoint, shown in `status.activeEndpoints` where Raven keeps it (Raven's
/// agents write these into the Gateway themselves; raven's agents report them
/// to the hub instead):
///
/// - `config.publicKey`: the node's WireGuard public key;
/// - `publicIP`/`publicPort`, when the spec (or a load balancer) gives no
///   public address: the address the tunnel was seen to come from (the
///   agent's own `observed_endpoint`, or its NAT-mapped endpoint as the
///   active tunnel node of a gateway not under NAT observed it);
/// - `natType` `Symmetric NAT`, when the spec says nothing and two such
///   observers saw the node's tunnel from different ports (a mapping that
///   depends on the destination). Observers that agree prove only that the
///   mapping is endpoint-independent, which does not tell Raven's cone types
///   apart, so nothing is written then.
///
/// Status only: the topology the agents receive is untouched, so none of
/// this can delay a tunnel.
fn learned_facts(
    status: &mut v1beta1::GatewayStatus,
    view: &GatewayView,
    views: &BTreeMap<GatewayName, GatewayView>,
    inputs: &Inputs,
) {
    for ep in &mut status.active_endpoints {
        if ep.type_ != v1beta1::TUNNEL {
            continue;
        }
        let Ok(node) = NodeName::new(ep.node_name.clone()) else {
            continue;
        };
        let Some(report) = inputs.reports.get(&node) else {
            continue;
        };
        if let Some(key) = &report.wireguard_public_key {
            ep.config
                .insert(v1beta1::CONFIG_PUBLIC_KEY.to_owned(), key.clone());
        }
        let seen = report
            .observed_endpoint
            .or_else(|| observed_endpoint(view, &node, views, inputs, |r| &r.observed_peers));
        if ep.public_ip.is_empty()
            && let Some(addr) = seen
        {
            ep.public_ip = addr.ip().to_string();
            ep.public_port = i32::from(addr.port());
        }
        if ep.nat_type.is_empty() && view.under_nat {
            let ports: BTreeSet<u16> = views
                .values()
                .filter(|g| !g.under_nat)
                .filter_map(|g| g.active_tunnel.as_ref())
                .filter_map(|t| inputs.reports.get(&t.node))
                .filter_map(|r| r.observed_peers.get(&node))
                .map(std::net::SocketAddr::port)
                .collect();
            if ports.len() > 1 {
                ep.nat_type = v1beta1::NAT_SYMMETRIC.to_owned();
            }
        }
    }
}

fn endpoint(ep: &v1beta1::Endpoint) -> Option<GatewayEndpoint> {
    let type_ = match ep.type_.as_str() {
        v1beta1::TUNNEL => EndpointType::Tunnel,
        v1beta1::PROXY => EndpointType::Proxy,
        _ => return None,
    };
    Some(GatewayEndpoint {
        node: NodeName::new(ep.node_name.clone()).ok()?,
        type_,
        port: u16::try_from(ep.port).ok()?,
        under_nat: ep.under_nat,
        nat_type: ep.nat_type.clone(),
        public_ip: ep.public_ip.parse().ok(),
        public_port: u16::try_from(ep.public_port).ok().filter(|p| *p != 0),
        config: ep.config.clone(),
    })
}

/// One warning per tunnel endpoint on a node the hub's failure detector
/// proved dead, for as long as that holds.
fn dead_problems(
    name: &GatewayName,
    spec: &v1beta1::GatewaySpec,
    dead: &BTreeSet<NodeName>,
) -> Vec<Problem> {
    spec.endpoints
        .iter()
        .enumerate()
        .filter(|(_, ep)| ep.type_ == v1beta1::TUNNEL && dead.iter().any(|d| d.as_str() == ep.node_name))
        .map(|(i, ep)| {
            Problem::warning(
                gateway_object(name.as_str()),
                format!("spec.endpoints[{i}].nodeName"),
                &ep.node_name,
                "proven dead: its agent's stream has been gone for the failover grace and its domain's probes fail; not elected while that holds",
            )
        })
        .collect()
}

/// The hub's failure detector, as one gateway's election sees it.
struct Liveness<'a> {
    connected: &'a BTreeSet<NodeName>,
    dead: &'a BTreeSet<NodeName>,
}

/// The TCP ports the layer-7 proxy carries for a gateway: the
/// comma-separated `proxyHTTPPort` and `proxyHTTPSPort`, each defaulting to
/// the kubelet's (10255, 10250) when empty. An entry that is not a port
/// number is left out with a warning naming the field.
fn proxy_ports(
    obj: &str,
    cfg: &v1beta1::ProxyConfiguration,
    problems: &mut Vec<Problem>,
) -> Vec<u16> {
    let mut ports = Vec::new();
    for (field, raw, default) in [
        (
            "spec.proxyConfig.proxyHTTPPort",
            &cfg.proxy_http_port,
            10255,
        ),
        (
            "spec.proxyConfig.proxyHTTPSPort",
            &cfg.proxy_https_port,
            10250,
        ),
    ] {
        let mut any = false;
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<u16>() {
                Ok(p) if p != 0 => {
                    ports.push(p);
                    any = true;
                }
                _ => problems.push(Problem::warning(
                    obj,
                    field,
                    part,
                    "not a TCP port number (1-65535); the proxy does not carry it",
                )),
            }
        }
        if !any {
            ports.push(default);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn compile_gateway(
    name: &GatewayName,
    gw: &v1beta1::Gateway,
    members: &[&ClusterNode],
    config: &RavenConfig,
    live: &Liveness<'_>,
    lb: Option<&LoadBalancerIngress>,
    claimed: &mut Claims,
) -> (GatewayView, v1beta1::GatewayStatus, Vec<Problem>) {
    let obj = gateway_object(name.as_str());
    let mut problems = Vec::new();
    let spec = &gw.spec;

    let member_names: BTreeSet<&str> = members.iter().map(|n| n.name.as_str()).collect();
    let ready: BTreeSet<&str> = members
        .iter()
        .filter(|n| n.ready)
        .map(|n| n.name.as_str())
        .collect();
    for (i, ep) in spec.endpoints.iter().enumerate() {
        if !member_names.contains(ep.node_name.as_str()) {
            problems.push(Problem::warning(
                &obj,
                format!("spec.endpoints[{i}].nodeName"),
                &ep.node_name,
                format!(
                    "no node with label {}={name}; this endpoint is never elected",
                    api::LABEL_GATEWAY
                ),
            ));
        }
    }
    if members.is_empty() {
        problems.push(Problem::warning(
            &obj,
            "",
            "",
            format!("no node carries the label {}={name}", api::LABEL_GATEWAY),
        ));
    } else if ready.is_empty() {
        problems.push(Problem::warning(
            &obj,
            "",
            "",
            "none of its nodes is Ready; no endpoint is elected",
        ));
    }
    if config.enable_l3_tunnel
        && spec.tunnel_config.replicas == 0
        && spec.endpoints.iter().any(|e| e.type_ == v1beta1::TUNNEL)
    {
        problems.push(Problem::warning(
            &obj,
            "spec.tunnelConfig.Replicas",
            "0",
            "tunnel endpoints are listed but Replicas is 0, so none is elected",
        ));
    }

    let previous = gw
        .status
        .as_ref()
        .map(|s| s.active_endpoints.as_slice())
        .unwrap_or(&[]);
    // Only this domain's Ready members can be elected: their streams are
    // all the election needs (not every connected agent of the cluster,
    // which made each compile O(gateways × agents)).
    let connected: BTreeSet<&str> = members
        .iter()
        .filter(|n| n.ready && live.connected.contains(&n.name))
        .map(|n| n.name.as_str())
        .collect();
    let dead: BTreeSet<&str> = live.dead.iter().map(NodeName::as_str).collect();
    let active = election::elect_live(spec, previous, &ready, &connected, &dead, config);

    // Extra allowed source CIDRs (annotation), as Raven attaches them to the
    // active tunnel node's subnets.
    let mut extra = Vec::new();
    if let Some(raw) = gw
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(api::ANNOTATION_EXTRA_ALLOWED_SOURCE_CIDRS))
    {
        for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part.parse::<IpNet>() {
                Ok(n) => extra.push(n.trunc()),
                Err(_) => problems.push(Problem::warning(
                    &obj,
                    format!(
                        "metadata.annotations[{}]",
                        api::ANNOTATION_EXTRA_ALLOWED_SOURCE_CIDRS
                    ),
                    part,
                    "not a CIDR; ignored",
                )),
            }
        }
    }

    // Members with their subnets, dropping ranges another gateway claimed first.
    let mut view_members = Vec::new();
    let mut status_nodes = Vec::new();
    for node in members {
        let mut subnets = Vec::new();
        for net in &node.pod_cidrs {
            if let Some((other_gw, other_node)) = claimed.overlapping(net, name) {
                problems.push(Problem::error(
                    &obj,
                    format!("status.nodes[{}].subnets", node.name),
                    net.to_string(),
                    format!(
                        "overlaps a subnet of node {other_node} in gateway {other_gw}; not routed to this gateway"
                    ),
                ));
                continue;
            }
            if let Some((other_gw, other_node)) = Claims::overlap_in(&claimed.reserved, net, name) {
                problems.push(Problem::error(
                    &obj,
                    format!("status.nodes[{}].subnets", node.name),
                    net.to_string(),
                    format!(
                        "overlaps a subnet of node {other_node} in gateway {other_gw}, which served it first; not routed to this gateway"
                    ),
                ));
                continue;
            }
            claimed.insert(*net, name, &node.name);
            subnets.push(*net);
        }
        subnets.sort();
        subnets.dedup();
        status_nodes.push(v1beta1::NodeInfo {
            node_name: node.name.to_string(),
            private_ip: node
                .internal_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            subnets: subnets.iter().map(ToString::to_string).collect(),
        });
        match node.internal_ip {
            Some(private_ip) => view_members.push(Member {
                node: node.name.clone(),
                private_ip,
                subnets,
                ready: node.ready,
            }),
            None => problems.push(Problem::warning(
                format!("Node/{}", node.name),
                "status.addresses",
                "",
                format!("no InternalIP address; the node is left out of gateway {name}'s routes"),
            )),
        }
    }
    view_members.sort_by(|a, b| a.node.cmp(&b.node));
    status_nodes.sort_by(|a, b| a.node_name.cmp(&b.node_name));

    let expose_type = match spec.expose_type.as_str() {
        v1beta1::EXPOSE_TYPE_PUBLIC_IP => ExposeType::PublicIP,
        v1beta1::EXPOSE_TYPE_LOAD_BALANCER => ExposeType::LoadBalancer,
        _ => ExposeType::None,
    };
    // A gateway exposed through a LoadBalancer Service is reached at the
    // load balancer's address, whichever candidate is active: the Service's
    // endpoints follow the election.
    let lb = lb.filter(|_| expose_type == ExposeType::LoadBalancer);
    let (lb_tunnel, lb_proxy) = (lb.and_then(|l| l.tunnel), lb.and_then(|l| l.proxy));
    let exposed = |ep: &v1beta1::Endpoint| {
        let lb_ip = match ep.type_.as_str() {
            v1beta1::TUNNEL => lb_tunnel,
            _ => lb_proxy,
        };
        endpoint(ep).map(|mut e| {
            if lb_ip.is_some() {
                e.public_ip = lb_ip;
            }
            e
        })
    };
    let active_tunnel = active
        .iter()
        .find(|e| e.type_ == v1beta1::TUNNEL)
        .and_then(exposed);
    let active_proxies: Vec<_> = active
        .iter()
        .filter(|e| e.type_ == v1beta1::PROXY)
        .filter_map(exposed)
        .collect();

    let mut tunnel_candidates: Vec<GatewayEndpoint> = active_tunnel.iter().cloned().collect();
    let tunnel_eps = spec
        .endpoints
        .iter()
        .filter(|e| e.type_ == v1beta1::TUNNEL && member_names.contains(e.node_name.as_str()));
    // Proven-dead candidates go last, with the unready ones.
    let (ready_eps, unready_eps): (Vec<_>, Vec<_>) = tunnel_eps.partition(|e| {
        ready.contains(e.node_name.as_str()) && !dead.contains(e.node_name.as_str())
    });
    for ep in ready_eps.into_iter().chain(unready_eps).filter_map(exposed) {
        if !tunnel_candidates.iter().any(|c| c.node == ep.node) {
            tunnel_candidates.push(ep);
        }
    }

    // Extra CIDRs sit on the active tunnel node, as in Raven.
    if let Some(t) = &active_tunnel
        && let Some(n) = status_nodes
            .iter_mut()
            .find(|n| n.node_name == t.node.as_str())
    {
        n.subnets.extend(extra.iter().map(ToString::to_string));
    }

    let mut status_eps = active.clone();
    for ep in &mut status_eps {
        let (key, on) = match ep.type_.as_str() {
            v1beta1::PROXY => (api::KEY_ENABLE_L7_PROXY, config.enable_l7_proxy),
            _ => (api::KEY_ENABLE_L3_TUNNEL, config.enable_l3_tunnel),
        };
        ep.config.insert(key.to_owned(), on.to_string());
        let lb_ip = match ep.type_.as_str() {
            v1beta1::TUNNEL => lb_tunnel,
            _ => lb_proxy,
        };
        if let Some(ip) = lb_ip {
            ep.public_ip = ip.to_string();
        }
    }
    let proxy_ports = if active_proxies.is_empty() {
        Vec::new()
    } else {
        proxy_ports(&obj, &spec.proxy_config, &mut problems)
    };
    let view = GatewayView {
        name: name.clone(),
        expose_type,
        under_nat: spec.endpoints.first().is_some_and(|e| e.under_nat),
        members: view_members,
        active_tunnel,
        tunnel_candidates,
        active_proxies,
        proxy_ports,
        extra_source_cidrs: extra,
        relay: None,
    };
    let status = v1beta1::GatewayStatus {
        node_count: Some(i32::try_from(status_nodes.len()).unwrap_or(i32::MAX)),
        nodes: status_nodes,
        active_endpoints: status_eps,
        ..Default::default()
    };
    (view, status, problems)
}

/// Address ranges claimed by gateways, for overlap checks in
/// O(prefix length · log n) instead of a scan of every claim.
#[derive(Debug, Default)]
struct Claims {
    by_net: BTreeMap<IpNet, (GatewayName, NodeName)>,
    /// Ranges their gateway served in the previous compile and still has a
    /// member for: no other gateway may claim an overlapping one.
    reserved: BTreeMap<IpNet, (GatewayName, NodeName)>,
}

impl Claims {
    fn insert(&mut self, net: IpNet, gw: &GatewayName, node: &NodeName) {
        self.by_net
            .entry(net)
            .or_insert_with(|| (gw.clone(), node.clone()));
    }

    /// A claim of another gateway that overlaps `net`: one that contains it
    /// (a supernet, found by truncating `net` to each shorter length) or one
    /// it contains (a network address inside `net`'s range).
    fn overlapping(&self, net: &IpNet, gw: &GatewayName) -> Option<(GatewayName, NodeName)> {
        Self::overlap_in(&self.by_net, net, gw)
    }

    /// A claim in `by_net` of a gateway other than `gw` that overlaps `net`.
    fn overlap_in(
        by_net: &BTreeMap<IpNet, (GatewayName, NodeName)>,
        net: &IpNet,
        gw: &GatewayName,
    ) -> Option<(GatewayName, NodeName)> {
        let other = |(g, n): &(GatewayName, NodeName)| (g != gw).then(|| (g.clone(), n.clone()));
        let supernet = (0..=net.prefix_len()).find_map(|len| {
            let candidate = IpNet::new(net.network(), len).ok()?.trunc();
            by_net.get(&candidate).and_then(other)
        });
        supernet.or_else(|| {
            // Keys order by address first, so the claims inside `net` are
            // the keys from its network address up to its broadcast address.
            let lo = IpNet::new(net.network(), 0).ok()?;
            let hi = net.broadcast();
            by_net
                .range(lo..)
                .take_while(|(k, _)| k.addr() <= hi)
                .filter(|(k, _)| net.contains(&k.network()))
                .find_map(|(_, v)| other(v))
        })
    }
}

/// Gives every NATed gateway a relay: a gateway that is not under NAT and has
/// an active tunnel endpoint with a public address, picked by highest
/// rendezvous hash of (gateway, relay). Adding or removing a gateway only
/// moves the gateways whose chosen relay it is (or becomes).
fn assign_relays(views: &mut BTreeMap<GatewayName, GatewayView>) {
    let relays: Vec<GatewayName> = views
        .values()
        .filter(|v| !v.under_nat)
        .filter(|v| {
            v.active_tunnel
                .as_ref()
                .is_some_and(|t| t.public_ip.is_some())
        })
        .map(|v| v.name.clone())
        .collect();
    for view in views.values_mut().filter(|v| v.under_nat) {
        view.relay = relays
            .iter()
            .max_by_key(|r| rendezvous(&view.name, r))
            .cloned();
    }
}

fn rendezvous(a: &GatewayName, b: &GatewayName) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(a.as_str().as_bytes());
    h.update([0]);
    h.update(b.as_str().as_bytes());
    h.finalize().into()
}

fn node_view(node: &ClusterNode, views: &BTreeMap<GatewayName, GatewayView>) -> NodeView {
    let gw = node
        .gateway_label
        .as_deref()
        .and_then(|l| GatewayName::new(l).ok())
        .and_then(|l| views.get(&l));
    let is = |ep: &Option<GatewayEndpoint>| ep.as_ref().is_some_and(|e| e.node == node.name);
    NodeView {
        name: node.name.clone(),
        gateway: gw.map(|g| g.name.clone()),
        private_ip: node.internal_ip,
        subnets: gw
            .and_then(|g| g.members.iter().find(|m| m.node == node.name))
            .map(|m| m.subnets.clone())
            .unwrap_or_default(),
        tunnel_active: gw.is_some_and(|g| is(&g.active_tunnel)),
        tunnel_candidate: gw
            .is_some_and(|g| g.tunnel_candidates.iter().any(|c| c.node == node.name)),
        proxy_active: gw.is_some_and(|g| g.active_proxies.iter().any(|p| p.node == node.name)),
    }
}
