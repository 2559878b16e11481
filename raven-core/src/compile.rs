//! The topology compiler: Gateways + Nodes + `raven-cfg` + agent reports →
//! [`Topology`]. Pure and deterministic: the same inputs give the same bytes,
//! whatever order they were collected in.
//!
//! A problem with one object is reported against that object and never drops
//! unrelated ones: an invalid Gateway is left out (the hub keeps serving its
//! last good version), an overlapping subnet is dropped from the later
//! gateway only, an unknown endpoint node is reported and never elected.
//!
//! The hub compiles with an [`Incremental`] compiler that remembers its last
//! compile per gateway and recomputes only the gateways whose inputs changed
//! (their exact dependencies are listed there); [`compile`] is the same
//! compiler with nothing remembered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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
    /// Shared with the compiler's memory: a gateway that was not recompiled
    /// is the same allocation as in the last compile's output.
    pub gateways: BTreeMap<GatewayName, Arc<CompiledGateway>>,
}

/// A Gateway that passed defaulting and validation. [`admit`] is the only
/// way to make one, and the compiler takes it as it is: a gateway is
/// admitted once, where it enters (the hub's index, the manifest loader),
/// never again per compile.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    name: GatewayName,
    /// Shared: the index, every compile's inputs and the compiler's memory
    /// hold the same object (copied only by [`Admitted::set_status`]).
    gateway: Arc<v1beta1::Gateway>,
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

    /// Whether `other` is this very object (not a copy): the pipeline keeps
    /// what it derived from a gateway while the index serves the same one.
    pub fn shares(&self, other: &Admitted) -> bool {
        Arc::ptr_eq(&self.gateway, &other.gateway)
    }

    /// What admission forgave (see [`admit`]); the compiler reports it.
    pub fn forgiven(&self) -> &[Problem] {
        &self.forgiven
    }

    /// Replaces the status, which admission does not look at: the election
    /// reads the current active endpoints from it.
    pub fn set_status(&mut self, status: Option<v1beta1::GatewayStatus>) {
        Arc::make_mut(&mut self.gateway).status = status;
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
            gateway: Arc::new(gw),
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
    Incremental::default().compile(inputs, prev)
}

/// A compiler that remembers its last compile per gateway, so a change
/// costs what it changed (the hub keeps one for its lifetime).
///
/// A gateway's output — its view, status, problems and resources (its
/// `gateway/` and `prefixes/`, its members' `node/`, its candidates'
/// `peer/`) — is a function of exactly these inputs, compared with the
/// last compile's before anything is computed:
///
/// 1. **its own**: the admitted Gateway (spec, annotations, the status the
///    election starts from), its members (the nodes labelled into it, in
///    name order), its load balancer, `raven-cfg`, and for every node it
///    names (members, `spec.endpoints`, `status.activeEndpoints`) that
///    node's report and whether its stream is connected or gone;
/// 2. **the subnets it loses** to other gateways' claims (see below);
/// 3. **cluster-wide**, after every gateway's election: its relay (the
///    rendezvous pick among the public gateways with a public active
///    tunnel) and, for a gateway under NAT, the *observers* — each public
///    gateway's active tunnel node and that node's report, in name order —
///    from which its candidates' NAT-mapped endpoints and NAT type are
///    learned.
///
/// A gateway whose inputs of (1) and (2) are unchanged keeps its election
/// and view; one whose (3) are unchanged too keeps its resources and status
/// as they were. Nodes labelled into no served gateway and `settings/` are
/// compiled every time (they depend on nothing per gateway).
///
/// Subnet claims are the only coupling between gateways' views, and they
/// are resolved exactly, at the cost of the claims that contend: every
/// member subnet is sorted once by address and the subnets that overlap one
/// of another gateway are found in one sweep; only those run the
/// first-claim-wins walk (a gateway's held ranges first, then gateways by
/// name, members by name) — a subnet that overlaps no other gateway's is
/// never dropped and never drops another, so leaving it out of the walk
/// changes no decision.
///
/// [`compile`] is this compiler with nothing remembered; the property test
/// `an_incremental_compile_of_any_sequence_of_changes_equals_a_from_scratch_compile`
/// holds the two equal.
#[derive(Debug, Default)]
pub struct Incremental {
    gateways: BTreeMap<GatewayName, Cached>,
    /// The relays of the last compile, and a counter bumped when they change.
    relays: (Vec<GatewayName>, u64),
    /// The observers of the last compile, and a counter bumped when they change.
    observers: (Vec<Observer>, u64),
    /// Bumped for every gateway whose election is recomputed.
    generation: u64,
    /// The reports and stream liveness the last compile read (marks, see
    /// [`crate::Shared::mark`]): while a compile reads the very same ones,
    /// no gateway's watched reports or liveness can differ from its key,
    /// and they are not compared node by node.
    seen: (
        std::sync::Weak<BTreeMap<NodeName, AgentReport>>,
        std::sync::Weak<crate::cluster::Streams>,
    ),
}

/// A public gateway's active tunnel node and its report (see
/// [`Incremental`]).
#[derive(Debug, Clone, PartialEq)]
struct Observer {
    gateway: GatewayName,
    node: NodeName,
    report: Option<AgentReport>,
}

#[derive(Debug)]
struct Cached {
    key: LocalKey,
    local: Local,
    /// Identifies `local` (a fresh number whenever it is recomputed).
    generation: u64,
    /// The relay, with the relay counter it was picked under.
    relay: Option<(u64, Option<GatewayName>)>,
    /// The resources and status, with what they were computed from:
    /// (`generation`, relay, observers counter or 0 when not under NAT).
    out: Option<(OutKey, Out)>,
}

/// What a gateway's [`Out`] was computed from: its `Local`'s generation,
/// its relay, and the observers counter (0 when not under NAT).
type OutKey = (u64, Option<GatewayName>, u64);

/// What one gateway's election and view read (see [`Incremental`], 1–2).
#[derive(Debug)]
struct LocalKey {
    admitted: Admitted,
    members: Vec<ClusterNode>,
    config: RavenConfig,
    lb: Option<LoadBalancerIngress>,
    /// Every node the gateway names: (report, connected, gone).
    watched: Vec<(NodeName, Option<AgentReport>, bool, bool)>,
    dropped: Vec<Dropped>,
}

impl LocalKey {
    fn watched_names<'a>(
        gw: &'a v1beta1::Gateway,
        members: &'a [&ClusterNode],
    ) -> BTreeSet<&'a str> {
        let mut names: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
        names.extend(gw.spec.endpoints.iter().map(|e| e.node_name.as_str()));
        if let Some(s) = &gw.status {
            names.extend(s.active_endpoints.iter().map(|e| e.node_name.as_str()));
        }
        names
    }

    fn liveness(inputs: &Inputs, node: &NodeName) -> (Option<AgentReport>, bool, bool) {
        (
            inputs.reports.get(node).cloned(),
            inputs.streams.connected.contains(node),
            inputs.streams.gone.contains(node),
        )
    }

    fn new(
        admitted: &Admitted,
        members: &[&ClusterNode],
        inputs: &Inputs,
        lb: Option<&LoadBalancerIngress>,
        dropped: &[Dropped],
    ) -> Self {
        let watched = Self::watched_names(admitted.gateway(), members)
            .into_iter()
            .filter_map(|n| NodeName::new(n.to_owned()).ok())
            .map(|n| {
                let (r, c, g) = Self::liveness(inputs, &n);
                (n, r, c, g)
            })
            .collect();
        Self {
            admitted: admitted.clone(),
            members: members.iter().map(|m| (*m).clone()).collect(),
            config: inputs.config,
            lb: lb.copied(),
            watched,
            dropped: dropped.to_vec(),
        }
    }

    /// Whether the inputs now are the ones this key was made of, compared
    /// in place (nothing is copied).
    fn same(
        &self,
        admitted: &Admitted,
        members: &[&ClusterNode],
        inputs: &Inputs,
        lb: Option<&LoadBalancerIngress>,
        dropped: &[Dropped],
        liveness_seen: bool,
    ) -> bool {
        // Equal gateways and members name the same nodes, so `watched`
        // holds exactly the names to look up now; with the reports and
        // liveness the last compile read (every key agrees with those),
        // nothing there to compare.
        (Arc::ptr_eq(&self.admitted.gateway, &admitted.gateway) || self.admitted == *admitted)
            && self.members.len() == members.len()
            && self.members.iter().zip(members).all(|(a, b)| a == *b)
            && self.config == inputs.config
            && self.lb.as_ref() == lb
            && self.dropped == dropped
            && (liveness_seen
                || self.watched.iter().all(|(n, r, c, g)| {
                    inputs.reports.get(n) == r.as_ref()
                        && inputs.streams.connected.contains(n) == *c
                        && inputs.streams.gone.contains(n) == *g
                }))
    }
}

/// One gateway's election and view, before the cluster-wide pass.
#[derive(Debug, Clone)]
struct Local {
    /// The gateway with an adopted local failover in its status.
    gateway: v1beta1::Gateway,
    view: GatewayView,
    status: v1beta1::GatewayStatus,
    problems: Vec<Problem>,
}

/// One gateway's share of the compiled output.
#[derive(Debug, Clone)]
struct Out {
    compiled: Arc<CompiledGateway>,
    resources: Vec<(ResourceName, Resource)>,
}

/// A member subnet another gateway's claim takes, with the problem that
/// says so.
#[derive(Debug, Clone, PartialEq)]
struct Dropped {
    node: NodeName,
    net: IpNet,
    problem: Problem,
}

impl Incremental {
    /// Compiles `inputs`, reusing what the last call computed for every
    /// gateway whose inputs are unchanged, and the versions of `prev`'s
    /// resources whose bodies are unchanged. Equals [`compile`] of `inputs`.
    pub fn compile(&mut self, inputs: &Inputs, prev: Option<&Topology>) -> Compiled {
        // An unchanged body keeps the last compile's resource itself (its
        // version, and its allocation: readers tell it unchanged by pointer).
        let resource = |name: &ResourceName, body: ResourceBody| match prev
            .and_then(|t| t.resources.get(name))
            .filter(|old| old.body == body)
        {
            Some(old) => old.clone(),
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
        let mut unserved = Vec::new();
        for node in inputs.nodes.values() {
            let Some(label) = &node.gateway_label else {
                unserved.push(node);
                continue;
            };
            match admitted.get_key_value(label.as_str()).map(|(k, _)| k) {
                Some(g) => members_of.entry(g).or_default().push(node),
                None if inputs.rejected.contains_key(label) => unserved.push(node), // reported above
                None => {
                    unserved.push(node);
                    problems.push(Problem::warning(
                        format!("Node/{}", node.name),
                        format!("metadata.labels[{}]", api::LABEL_GATEWAY),
                        label,
                        "no such Gateway; the node is not part of any gateway domain",
                    ));
                }
            }
        }
        let dropped = contested_claims(inputs, &members_of);

        // Each gateway's election and view, from its own inputs.
        let liveness_seen = inputs.reports.is(&self.seen.0) && inputs.streams.is(&self.seen.1);
        self.seen = (inputs.reports.mark(), inputs.streams.mark());
        self.gateways.retain(|name, _| admitted.contains_key(name));
        for (name, gw) in admitted {
            let members = members_of.get(name).map_or(&[][..], Vec::as_slice);
            let lb = inputs.load_balancers.get(name.as_str());
            let drops = dropped.get(name).map_or(&[][..], Vec::as_slice);
            if self
                .gateways
                .get(name)
                .is_some_and(|c| c.key.same(gw, members, inputs, lb, drops, liveness_seen))
            {
                continue;
            }
            let key = LocalKey::new(gw, members, inputs, lb, drops);
            let local = compile_local(name, gw.gateway(), members, inputs, lb, drops);
            self.generation += 1;
            self.gateways.insert(
                name.clone(),
                Cached {
                    key,
                    local,
                    generation: self.generation,
                    relay: None,
                    out: None,
                },
            );
        }

        // Cluster-wide: relays and observers, from every gateway's view.
        let public = || {
            self.gateways
                .values()
                .map(|c| &c.local.view)
                .filter(|v| !v.under_nat)
        };
        let relays: Vec<&GatewayName> = public()
            .filter(|v| {
                v.active_tunnel
                    .as_ref()
                    .is_some_and(|t| t.public_ip.is_some())
            })
            .map(|v| &v.name)
            .collect();
        if !relays.iter().copied().eq(self.relays.0.iter()) {
            self.relays = (relays.into_iter().cloned().collect(), self.relays.1 + 1);
        }
        let observers_now = public().filter_map(|v| {
            v.active_tunnel
                .as_ref()
                .map(|t| (&v.name, &t.node, inputs.reports.get(&t.node)))
        });
        let same_observers = observers_now.clone().eq(self
            .observers
            .0
            .iter()
            .map(|o| (&o.gateway, &o.node, o.report.as_ref())));
        if !same_observers {
            let observers = observers_now
                .map(|(g, n, r)| Observer {
                    gateway: g.clone(),
                    node: n.clone(),
                    report: r.cloned(),
                })
                .collect();
            self.observers = (observers, self.observers.1 + 1);
        }

        // Each gateway's resources and status, from its view and the
        // cluster-wide inputs.
        let (relays, relays_at) = (&self.relays.0, self.relays.1);
        let (observers, observers_at) = (&self.observers.0, self.observers.1);
        // Collected in order and built at once (a sort and a bulk build, a
        // later name replacing an earlier one as inserts would).
        let mut resources: Vec<(ResourceName, Resource)> = Vec::new();
        let mut compiled = BTreeMap::new();
        for (name, cached) in &mut self.gateways {
            let view = &cached.local.view;
            let relay = match &cached.relay {
                Some((at, relay)) if *at == relays_at => relay.clone(),
                _ => {
                    let relay = view
                        .under_nat
                        .then(|| relays.iter().max_by_key(|r| rendezvous(name, r)).cloned())
                        .flatten();
                    cached.relay = Some((relays_at, relay.clone()));
                    relay
                }
            };
            let out_key = (
                cached.generation,
                relay,
                if view.under_nat { observers_at } else { 0 },
            );
            let out = match &cached.out {
                Some((k, out)) if *k == out_key => out,
                _ => {
                    let members = members_of.get(name).map_or(&[][..], Vec::as_slice);
                    let out = gateway_output(
                        &cached.local,
                        out_key.1.clone(),
                        members,
                        observers,
                        inputs,
                        &resource,
                    );
                    &cached.out.insert((out_key, out)).1
                }
            };
            problems.extend(cached.local.problems.iter().cloned());
            resources.extend(out.resources.iter().cloned());
            compiled.insert(name.clone(), out.compiled.clone());
        }

        let settings = ResourceBody::Settings(Settings {
            raven_cfg_present: config.present,
            enable_l3_tunnel: config.enable_l3_tunnel,
            enable_l7_proxy: config.enable_l7_proxy,
            vxlan_port: VXLAN_PORT,
            vpn_driver: config.vpn_driver,
        });
        let name = ResourceName::settings();
        let r = resource(&name, settings);
        resources.push((name, r));
        for node in unserved {
            let name = ResourceName::node(&node.name);
            let r = resource(&name, ResourceBody::Node(node_view(node, None)));
            resources.push((name, r));
        }
        let resources = BTreeMap::from_iter(resources);

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
}

/// Finds the member subnets that overlap one of another gateway, and walks
/// only those through the first-claim-wins rule (see [`Incremental`]): a
/// range a gateway served before (`inputs.held_subnets`) and still has a
/// member for stays with it; otherwise the first gateway by name to claim
/// an address range keeps it. A later, overlapping claim is dropped and
/// reported.
fn contested_claims<'a>(
    inputs: &Inputs,
    members_of: &BTreeMap<&'a GatewayName, Vec<&'a ClusterNode>>,
) -> BTreeMap<&'a GatewayName, Vec<Dropped>> {
    let mut nets: Vec<(IpNet, &GatewayName)> = members_of
        .iter()
        .flat_map(|(g, ms)| ms.iter().flat_map(|m| m.pod_cidrs.iter().map(|n| (*n, *g))))
        .collect();
    nets.sort_unstable_by_key(|(n, _)| (n.network(), n.prefix_len()));
    // Two CIDR ranges overlap only when one contains the other; in this
    // order a range comes before every range it contains, so the ranges
    // containing the current one are a stack.
    let mut contested: BTreeMap<&GatewayName, BTreeSet<IpNet>> = BTreeMap::new();
    let mut open: Vec<(IpNet, &GatewayName)> = Vec::new();
    for (net, gw) in nets {
        while open
            .last()
            .is_some_and(|(o, _)| !(o.contains(&net) || net.contains(o)))
        {
            open.pop();
        }
        for (o, og) in &open {
            if *og != gw {
                contested.entry(*og).or_default().insert(*o);
                contested.entry(gw).or_default().insert(net);
            }
        }
        open.push((net, gw));
    }
    let mut claimed = Claims::default();
    for (g, nets) in &contested {
        for net in nets {
            if inputs.held_subnets.get(net) != Some(*g) {
                continue;
            }
            let holder = members_of
                .get(*g)
                .and_then(|ms| ms.iter().find(|m| m.pod_cidrs.contains(net)));
            if let Some(m) = holder {
                claimed
                    .reserved
                    .insert(*net, ((*g).clone(), m.name.clone()));
            }
        }
    }
    let mut dropped: BTreeMap<&GatewayName, Vec<Dropped>> = BTreeMap::new();
    for (g, nets) in &contested {
        let obj = gateway_object(g.as_str());
        for node in members_of.get(*g).into_iter().flatten() {
            for net in node.pod_cidrs.iter().filter(|n| nets.contains(n)) {
                let message = if let Some((other_gw, other_node)) = claimed.overlapping(net, g) {
                    format!(
                        "overlaps a subnet of node {other_node} in gateway {other_gw}; not routed to this gateway"
                    )
                } else if let Some((other_gw, other_node)) =
                    Claims::overlap_in(&claimed.reserved, net, g)
                {
                    format!(
                        "overlaps a subnet of node {other_node} in gateway {other_gw}, which served it first; not routed to this gateway"
                    )
                } else {
                    claimed.insert(*net, g, &node.name);
                    continue;
                };
                dropped.entry(*g).or_default().push(Dropped {
                    node: node.name.clone(),
                    net: *net,
                    problem: Problem::error(
                        &obj,
                        format!("status.nodes[{}].subnets", node.name),
                        net.to_string(),
                        message,
                    ),
                });
            }
        }
    }
    dropped
}

/// One gateway's election and view from its own inputs (see
/// [`Incremental`], 1–2).
fn compile_local(
    name: &GatewayName,
    gw: &v1beta1::Gateway,
    members: &[&ClusterNode],
    inputs: &Inputs,
    lb: Option<&LoadBalancerIngress>,
    dropped: &[Dropped],
) -> Local {
    let (gw, mut problems) = adopt_local_failover(name, gw, members, inputs);
    let dead = liveness::proven_dead(name, &gw.spec, members, inputs);
    problems.extend(dead_problems(name, &gw.spec, &dead));
    let live = Liveness {
        connected: &inputs.streams.connected,
        dead: &dead,
    };
    let (view, status, ps) =
        compile_gateway(name, &gw, members, &inputs.config, &live, lb, dropped);
    problems.extend(ps);
    Local {
        gateway: gw,
        view,
        status,
        problems,
    }
}

/// One gateway's resources and final status (see [`Incremental`], 3).
fn gateway_output(
    local: &Local,
    relay: Option<GatewayName>,
    members: &[&ClusterNode],
    observers: &[Observer],
    inputs: &Inputs,
    resource: &impl Fn(&ResourceName, ResourceBody) -> Resource,
) -> Out {
    let mut view = local.view.clone();
    view.relay = relay;
    let mut status = local.status.clone();
    learned_facts(&mut status, &view, observers, inputs);
    let mut gateway = local.gateway.clone();
    gateway.status = Some(status.clone());
    let mut resources = Vec::new();
    for node in members {
        let name = ResourceName::node(&node.name);
        let r = resource(&name, ResourceBody::Node(node_view(node, Some(&view))));
        resources.push((name, r));
    }
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
                observed_endpoint: observed_endpoint(&view, &cand.node, observers, |r| {
                    &r.observed_direct_peers
                }),
            });
        let peer = PeerInfo {
            node: cand.node.clone(),
            gateway: view.name.clone(),
            wireguard_public_key: report.wireguard_public_key,
            tunnel_port: report.tunnel_port,
            observed_endpoint: report
                .observed_endpoint
                .or_else(|| observed_endpoint(&view, &cand.node, observers, |r| &r.observed_peers)),
            direct,
            ipsec_public_key: report.ipsec_public_key,
        };
        let name = ResourceName::peer(&cand.node);
        let r = resource(&name, ResourceBody::Peer(peer));
        resources.push((name, r));
    }
    // The compact form members of other domains receive: derived from the
    // view alone, so it changes exactly when its prefixes do.
    let prefixes = ResourceName::prefixes(&view.name);
    let r = resource(&prefixes, ResourceBody::Prefixes(DomainPrefixes::of(&view)));
    resources.push((prefixes, r));
    let name = ResourceName::gateway(&view.name);
    let compiled = Arc::new(CompiledGateway {
        name: view.name.clone(),
        gateway,
        status,
    });
    let r = resource(&name, ResourceBody::Gateway(view));
    resources.push((name, r));
    Out {
        compiled,
        resources,
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
    observers: &[Observer],
    seen: impl Fn(&AgentReport) -> &BTreeMap<NodeName, std::net::SocketAddr>,
) -> Option<std::net::SocketAddr> {
    if !view.under_nat {
        return None;
    }
    let mut relay_first = observers
        .iter()
        .filter(|o| view.relay.as_ref() == Some(&o.gateway))
        .chain(observers);
    relay_first.find_map(|o| o.report.as_ref().and_then(|r| seen(r).get(node)).copied())
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
    observers: &[Observer],
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
            .or_else(|| observed_endpoint(view, &node, observers, |r| &r.observed_peers));
        if ep.public_ip.is_empty()
            && let Some(addr) = seen
        {
            ep.public_ip = addr.ip().to_string();
            ep.public_port = i32::from(addr.port());
        }
        if ep.nat_type.is_empty() && view.under_nat {
            let ports: BTreeSet<u16> = observers
                .iter()
                .filter_map(|o| o.report.as_ref())
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
    dropped: &[Dropped],
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
            if let Some(d) = dropped
                .iter()
                .find(|d| d.node == node.name && d.net == *net)
            {
                problems.push(d.problem.clone());
                continue;
            }
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

/// A NATed gateway's relay is a gateway that is not under NAT and has an
/// active tunnel endpoint with a public address, picked by highest
/// rendezvous hash of (gateway, relay): adding or removing a gateway only
/// moves the gateways whose chosen relay it is (or becomes).
fn rendezvous(a: &GatewayName, b: &GatewayName) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(a.as_str().as_bytes());
    h.update([0]);
    h.update(b.as_str().as_bytes());
    h.finalize().into()
}

/// A node's own resource; `gw` is the view of the gateway it is a member
/// of, if it is one.
fn node_view(node: &ClusterNode, gw: Option<&GatewayView>) -> NodeView {
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
