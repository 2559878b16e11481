//! The hub's view of the cluster, fed by the sources and read by the
//! pipeline. Synchronous (`apply`/`delete`/`reset` on `&mut self`), so every
//! source event is a plain, testable state change. It also keeps when each
//! agent's stream opened or ended (times are passed in), which the pipeline
//! resolves against `--failover-grace` into [`raven_core::Streams`].
//!
//! A Gateway that fails validation never replaces its last good version: the
//! index keeps serving the previous one and reports the problem, so one bad
//! edit cannot cut a domain off.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use raven_core::api::v1beta1::Gateway;
use raven_core::compile::{Admitted, admit};
use raven_core::{
    AgentReport, ClusterNode, GatewayName, Inputs, NodeName, Problem, RavenConfig, Shared, Streams,
};
use tokio::time::{Duration, Instant};

/// The kinds of object a source delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Gateway,
    Node,
    Config,
    /// The LoadBalancer Services the hub keeps for exposed Gateways.
    Service,
    /// Their Endpoints.
    Endpoints,
}

impl Kind {
    /// The kinds the topology is compiled from: the hub is ready (and its
    /// index fresh) when these are listed. The Services and Endpoints the
    /// hub keeps for `exposeType: LoadBalancer` are watched beside them but
    /// never hold the topology or the status up.
    pub const SOURCES: [Kind; 3] = [Kind::Gateway, Kind::Node, Kind::Config];
}

/// A Service or Endpoints object the hub keeps for a LoadBalancer-exposed
/// Gateway, as the watch last showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposed {
    /// The Gateway it belongs to (its owner reference).
    pub gateway: Option<String>,
    /// `raven.openyurt.io/gateway-type`: `tunnel` or `proxy`.
    pub type_: Option<String>,
    /// The hash of what the hub last wrote (its annotation).
    pub hash: Option<String>,
    /// A Service's first `status.loadBalancer.ingress` IP.
    pub ingress: Option<std::net::IpAddr>,
}

/// An agent's Sync stream as the failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamEntry {
    connected: bool,
    /// When it opened (connected) or ended (not connected).
    since: Instant,
}

#[derive(Debug, Clone, Default)]
struct GatewayEntry {
    /// The last version that passed admission, if any did (admitted once,
    /// here: the compiler takes it as it is).
    good: Option<Admitted>,
    /// Problems of the latest version (empty when it is the good one).
    problems: Vec<Problem>,
}

/// The cluster as the sources last described it.
#[derive(Debug, Clone, Default)]
pub struct Index {
    gateways: BTreeMap<GatewayName, GatewayEntry>,
    /// Shared with the compiles that read it ([`Index::inputs`] hands out a
    /// pointer): a write copies the table only while a compile still holds
    /// the same one.
    nodes: Shared<BTreeMap<NodeName, ClusterNode>>,
    /// Problems of the nodes that have any.
    node_problems: BTreeMap<NodeName, Vec<Problem>>,
    /// Objects whose name is not a valid object name, by kind and name as
    /// written: never served, only reported.
    misnamed: BTreeMap<(Kind, String), Vec<Problem>>,
    config: RavenConfig,
    reports: BTreeMap<NodeName, AgentReport>,
    /// `reports` as the last [`Index::inputs`] handed them out, until a
    /// report changes: reports change under thousands of session tasks, so
    /// the copy is made on the compile's side, once per compile that finds
    /// them changed, never under a session.
    reports_read: std::cell::RefCell<Option<Shared<BTreeMap<NodeName, AgentReport>>>>,
    /// The last [`Index::streams_at`] and for how long it holds.
    streams_read: std::cell::RefCell<Option<StreamsRead>>,
    /// Who holds each WireGuard key of `reports` (the node that reported it
    /// first): a report's keys are checked by lookup, not by a search of
    /// every other report.
    key_owners: BTreeMap<String, NodeName>,
    /// The nodes of `reports` whose probes report a dead candidate: whether
    /// any does is asked on every stream opened and closed, so it is kept,
    /// not found by a scan of every report (which made a storm of 10,000
    /// streams opening or closing quadratic).
    death_reporters: std::collections::BTreeSet<NodeName>,
    streams: BTreeMap<NodeName, StreamEntry>,
    /// When this hub started; an agent it has not heard from since counts
    /// as gone from then on. `None`: such agents are gone at once.
    started: Option<Instant>,
    /// The failure detector is off on a replica that does not write the
    /// Gateway status (Kubernetes, not the leader): it follows the status
    /// the leader writes, so replicas never elect differently.
    detector_off: bool,
    synced: BTreeSet<Kind>,
    /// Kinds whose watch failed since their last complete list.
    stale: BTreeSet<Kind>,
    /// Problems a source found outside any single object (e.g. a broken file).
    source_problems: Vec<Problem>,
    /// Objects the API server served that do not decode as their type (a
    /// Gateway stored through an older schema without `type`, …), by kind
    /// and name: each is a problem on that object, never on the others.
    undecodable: BTreeMap<(Kind, String), Problem>,
    /// Nodes whose report named another node's WireGuard key.
    key_conflicts: BTreeMap<NodeName, Vec<Problem>>,
    /// Highest Kubernetes resourceVersion seen (etcd's revision): the same
    /// cluster state gives every hub replica the same floor, so revisions
    /// stay comparable across replicas of one epoch.
    high_water: u64,
    /// The Services and Endpoints kept for LoadBalancer Gateways, by kind and name.
    exposed: BTreeMap<(Kind, String), Exposed>,
}

/// A stream liveness computed at `at` for `grace`: the same for every
/// moment before `until` while the streams, the node names, the start time
/// and the detector are as they were (any change to those forgets it).
#[derive(Debug, Clone)]
struct StreamsRead {
    at: Instant,
    grace: Duration,
    until: Option<Instant>,
    streams: Shared<Streams>,
}

/// The WireGuard keys a report names.
fn report_keys(report: &AgentReport) -> impl Iterator<Item = &str> {
    [&report.wireguard_public_key, &report.direct_public_key]
        .into_iter()
        .filter_map(|k| k.as_deref())
}

fn resource_version(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Index {
    pub fn apply_gateway(&mut self, gw: Gateway) {
        self.see(resource_version(&gw.metadata));
        let name = gw.metadata.name.clone().unwrap_or_default();
        self.apply_admission(name, admit(gw));
    }

    /// Takes in the gateway named `name` as admission left it: admitted, it
    /// is served; refused, its last admitted version (if any) still is.
    pub fn apply_admission(&mut self, name: String, admission: Result<Admitted, Vec<Problem>>) {
        self.undecodable.remove(&(Kind::Gateway, name.clone()));
        let Ok(key) = GatewayName::new(name.as_str()) else {
            let problems = admission.err().unwrap_or_default();
            self.misnamed.insert((Kind::Gateway, name), problems);
            return;
        };
        let entry = self.gateways.entry(key).or_default();
        match admission {
            Ok(admitted) => {
                entry.good = Some(admitted);
                entry.problems.clear();
            }
            Err(mut problems) => {
                if entry.good.is_some() {
                    for p in &mut problems {
                        p.message
                            .push_str("; serving the last valid version of this Gateway");
                    }
                }
                entry.problems = problems;
            }
        }
    }

    pub fn delete_gateway(&mut self, name: &str) {
        self.gateways.remove(name);
        self.misnamed.remove(&(Kind::Gateway, name.to_owned()));
        self.undecodable.remove(&(Kind::Gateway, name.to_owned()));
    }

    /// An object of `kind` named `name` (at `resource_version`) that the API
    /// server served but that does not decode: a problem on that object. A
    /// Gateway keeps serving its last version that decoded and validated.
    pub fn apply_undecodable(
        &mut self,
        kind: Kind,
        name: &str,
        resource_version: u64,
        problem: Problem,
    ) {
        self.see(resource_version);
        if kind == Kind::Node {
            self.remove_node(name);
            self.misnamed.remove(&(kind, name.to_owned()));
        }
        self.undecodable.insert((kind, name.to_owned()), problem);
    }

    /// Forgets the undecodable objects of `kind` (before a relist).
    pub fn clear_undecodable(&mut self, kind: Kind) {
        self.undecodable.retain(|(k, _), _| *k != kind);
    }

    /// Replaces all gateways (a relist). Last good versions of gateways that
    /// are still present are kept.
    pub fn reset_gateways(&mut self, gws: Vec<Gateway>) {
        let present: BTreeSet<String> =
            gws.iter().filter_map(|g| g.metadata.name.clone()).collect();
        self.retain_gateways(&present);
        for gw in gws {
            self.apply_gateway(gw);
        }
    }

    /// Replaces all gateways with ones admitted already (the manifest
    /// loader admits what it reads): the same as [`Index::reset_gateways`].
    pub fn reset_admitted_gateways(
        &mut self,
        admitted: BTreeMap<GatewayName, Admitted>,
        rejected: BTreeMap<String, Vec<Problem>>,
    ) {
        let present: BTreeSet<String> = admitted
            .keys()
            .map(GatewayName::to_string)
            .chain(rejected.keys().cloned())
            .collect();
        self.retain_gateways(&present);
        for (name, gw) in admitted {
            self.apply_admission(name.to_string(), Ok(gw));
        }
        for (name, problems) in rejected {
            self.apply_admission(name, Err(problems));
        }
    }

    /// Forgets the gateways not named in `present`.
    fn retain_gateways(&mut self, present: &BTreeSet<String>) {
        self.gateways
            .retain(|name, _| present.contains(name.as_str()));
        self.misnamed
            .retain(|(kind, name), _| *kind != Kind::Gateway || present.contains(name));
    }

    pub fn apply_node(&mut self, node: &Node) {
        self.see(resource_version(&node.metadata));
        let name = node.metadata.name.clone().unwrap_or_default();
        self.undecodable.remove(&(Kind::Node, name.clone()));
        match ClusterNode::from_k8s(node) {
            Ok((node, problems)) => {
                self.misnamed.remove(&(Kind::Node, name));
                self.put_node(node, problems);
            }
            Err(problem) => {
                self.remove_node(name.as_str());
                self.misnamed.insert((Kind::Node, name), vec![problem]);
            }
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        self.remove_node(name);
        self.misnamed.remove(&(Kind::Node, name.to_owned()));
        self.undecodable.remove(&(Kind::Node, name.to_owned()));
    }

    /// Stores `node` with its problems; an unchanged node is left as it is
    /// (no copy of a table a compile still reads).
    fn put_node(&mut self, node: ClusterNode, problems: Vec<Problem>) {
        if problems.is_empty() {
            self.node_problems.remove(&node.name);
        } else {
            self.node_problems.insert(node.name.clone(), problems);
        }
        if self.nodes.get(&node.name) == Some(&node) {
            return;
        }
        if self.nodes.insert(node.name.clone(), node).is_none() {
            self.forget_streams();
        }
    }

    fn remove_node(&mut self, name: &str) {
        self.node_problems.remove(name);
        if self.nodes.contains_key(name) {
            self.nodes.remove(name);
            self.forget_streams();
        }
    }

    /// The node names, streams, start or detector changed: the stream
    /// liveness is computed again at the next read.
    fn forget_streams(&mut self) {
        *self.streams_read.get_mut() = None;
    }

    /// A report changed: the next read copies them again.
    fn forget_reports(&mut self) {
        *self.reports_read.get_mut() = None;
    }

    pub fn reset_nodes(&mut self, nodes: &[Node]) {
        self.nodes = Shared::default();
        self.node_problems.clear();
        self.forget_streams();
        self.misnamed.retain(|(kind, _), _| *kind != Kind::Node);
        for n in nodes {
            self.apply_node(n);
        }
    }

    /// Sets (or, with `None`, removes) the `raven-cfg` ConfigMap.
    pub fn set_config(&mut self, cm: Option<&ConfigMap>) {
        self.clear_undecodable(Kind::Config);
        if let Some(cm) = cm {
            self.see(resource_version(&cm.metadata));
        }
        self.config = cm.map(RavenConfig::from_configmap).unwrap_or_default();
    }

    /// Sets nodes from already-parsed manifests.
    pub fn reset_cluster_nodes(&mut self, nodes: impl IntoIterator<Item = ClusterNode>) {
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.node_problems.clear();
        self.forget_streams();
        self.misnamed.retain(|(kind, _), _| *kind != Kind::Node);
    }

    /// Takes in what the manifest source says changed: exactly the objects
    /// of the files that changed, so the work is proportional to them (the
    /// rest of the index is left as it is).
    pub fn apply_manifest_change(&mut self, change: crate::sources::manifests::Change) {
        for (name, gw) in change.gateways {
            match gw {
                Some(admission) => self.apply_admission(name, admission),
                None => self.delete_gateway(&name),
            }
        }
        for (name, node) in change.nodes {
            self.misnamed.remove(&(Kind::Node, name.to_string()));
            match node {
                Some(node) => self.put_node(node, Vec::new()),
                None => self.remove_node(name.as_str()),
            }
        }
        if let Some(config) = change.config {
            self.config = config;
        }
        self.source_problems = change.problems;
    }

    pub fn set_raven_config(&mut self, config: RavenConfig) {
        self.config = config;
    }

    pub fn set_source_problems(&mut self, problems: Vec<Problem>) {
        self.source_problems = problems;
    }

    /// Records what an agent reported about itself. Returns whether anything
    /// changed.
    ///
    /// A WireGuard public key belongs to the first node that reported it: a
    /// report naming a key another node holds has that key removed (it never
    /// reaches any agent) and the conflict is reported as a problem of the
    /// newcomer, for as long as it keeps reporting that key.
    pub fn set_report(&mut self, node: NodeName, mut report: AgentReport) -> bool {
        let held_by = |key: &str| self.key_owners.get(key).filter(|o| **o != node).cloned();
        let mut conflicts = Vec::new();
        for (field, key) in [
            ("wireguard_public_key", &mut report.wireguard_public_key),
            ("direct_public_key", &mut report.direct_public_key),
        ] {
            if let Some(owner) = key.as_deref().and_then(held_by) {
                conflicts.push(Problem::error(
                    format!("Node/{node}"),
                    format!("report.{field}"),
                    key.take().unwrap_or_default(),
                    format!(
                        "is the WireGuard key of node {owner}, which reported it first; refused"
                    ),
                ));
            }
        }
        let problems_changed = if conflicts.is_empty() {
            self.key_conflicts.remove(&node).is_some()
        } else {
            self.key_conflicts.insert(node.clone(), conflicts.clone()) != Some(conflicts)
        };
        if self.reports.get(&node) == Some(&report) {
            return problems_changed;
        }
        if let Some(old) = self.reports.get(&node) {
            for key in report_keys(old) {
                if self.key_owners.get(key) == Some(&node) {
                    self.key_owners.remove(key);
                }
            }
        }
        for key in report_keys(&report) {
            self.key_owners.insert(key.to_owned(), node.clone());
        }
        if report.dead_candidates.is_empty() {
            self.death_reporters.remove(&node);
        } else {
            self.death_reporters.insert(node.clone());
        }
        self.reports.insert(node, report);
        self.forget_reports();
        true
    }

    /// What the index keeps of a node's report.
    pub fn report(&self, node: &NodeName) -> Option<&AgentReport> {
        self.reports.get(node)
    }

    /// Forgets the local failover a node reported (it disconnected).
    /// Returns whether anything changed.
    pub fn withdraw_failover_claim(&mut self, node: &NodeName) -> bool {
        match self.reports.get_mut(node) {
            Some(r) if !r.local_failover.is_empty() => {
                r.local_failover.clear();
                self.forget_reports();
                true
            }
            _ => false,
        }
    }

    /// Records when this hub started (agents it never hears from count as
    /// gone from then on).
    pub fn set_started(&mut self, at: Instant) {
        self.started = Some(at);
        self.forget_streams();
    }

    /// Turns the failure detector on or off (see `detector_off`). Returns
    /// whether that changed anything.
    pub fn set_failure_detector(&mut self, on: bool) -> bool {
        let changed = self.detector_off == on;
        self.detector_off = !on;
        self.forget_streams();
        changed
    }

    /// Some report lists a dead candidate (and the detector is on): only
    /// then can a stream's coming or going change an election.
    fn probes_report_a_death(&self) -> bool {
        debug_assert_eq!(
            self.death_reporters.iter().collect::<Vec<_>>(),
            self.reports
                .iter()
                .filter(|(_, r)| !r.dead_candidates.is_empty())
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            "the kept death reporters are the reports naming a dead candidate"
        );
        !self.detector_off && !self.death_reporters.is_empty()
    }

    /// An agent's stream opened at `at`. Returns whether that can change
    /// the compiled topology.
    pub fn stream_opened(&mut self, node: NodeName, at: Instant) -> bool {
        self.forget_streams();
        let was = self.streams.insert(
            node,
            StreamEntry {
                connected: true,
                since: at,
            },
        );
        !was.is_some_and(|w| w.connected) && self.probes_report_a_death()
    }

    /// An agent's (latest) stream ended at `at`: its local failover claim and
    /// its probe verdicts stop counting (it re-reports them on reconnect).
    /// Returns whether that can change the compiled topology.
    pub fn stream_closed(&mut self, node: &NodeName, at: Instant) -> bool {
        self.forget_streams();
        self.streams.insert(
            node.clone(),
            StreamEntry {
                connected: false,
                since: at,
            },
        );
        let mut changed = self.withdraw_failover_claim(node);
        if let Some(r) = self.reports.get_mut(node)
            && !r.dead_candidates.is_empty()
        {
            r.dead_candidates.clear();
            self.death_reporters.remove(node);
            changed = true;
            self.forget_reports();
        }
        changed || self.probes_report_a_death()
    }

    /// Stream liveness at `now`: who is connected, and whose stream has been
    /// gone for at least `grace` (every known node is one or the other, or
    /// within its grace).
    /// With the detector off, nobody is gone.
    ///
    /// Computed once and handed out (a pointer) until the streams, the node
    /// names, the start or the detector change, or a stream's absence
    /// reaches `grace`: a compile whose change touched none of those reads
    /// no node.
    pub fn streams_at(&self, now: Instant, grace: Duration) -> Shared<Streams> {
        if let Some(r) = self.streams_read.borrow().as_ref()
            && r.grace == grace
            && now >= r.at
            && r.until.is_none_or(|until| now < until)
        {
            return r.streams.clone();
        }
        let streams = Shared::new(self.streams_now(now, grace));
        let read = StreamsRead {
            at: now,
            grace,
            until: self.next_absence_deadline(now, grace),
            streams: streams.clone(),
        };
        *self.streams_read.borrow_mut() = Some(read);
        streams
    }

    /// [`Index::streams_at`] computed from every node and stream.
    fn streams_now(&self, now: Instant, grace: Duration) -> Streams {
        let mut out = Streams::default();
        if self.detector_off {
            return out;
        }
        let gone_since = |since: Instant| now.saturating_duration_since(since) >= grace;
        let names = self.nodes.keys().chain(self.streams.keys()).cloned();
        for node in names {
            match self.streams.get(&node) {
                Some(e) if e.connected => {
                    out.connected.insert(node);
                }
                Some(e) if gone_since(e.since) => {
                    out.gone.insert(node);
                }
                Some(_) => {}
                None if self.started.is_none_or(gone_since) => {
                    out.gone.insert(node);
                }
                None => {}
            }
        }
        out
    }

    /// The next moment after `now` at which some absence reaches `grace`
    /// (a stream that ended, or the start for a node never heard from),
    /// whether or not a probe reports a death: until then
    /// [`Index::streams_now`] gives what it gives at `now`.
    fn next_absence_deadline(&self, now: Instant, grace: Duration) -> Option<Instant> {
        if self.detector_off {
            return None;
        }
        let unseen = self.nodes.keys().any(|n| !self.streams.contains_key(n));
        self.streams
            .values()
            .filter(|e| !e.connected)
            .map(|e| e.since)
            .chain(self.started.filter(|_| unseen))
            .map(|since| since + grace)
            .filter(|at| *at > now)
            .min()
    }

    /// The next moment after `now` at which a stream's absence reaches
    /// `grace` (the pipeline recompiles then), if any is pending and could
    /// matter.
    pub fn next_grace_deadline(&self, now: Instant, grace: Duration) -> Option<Instant> {
        if !self.probes_report_a_death() {
            return None;
        }
        self.next_absence_deadline(now, grace)
    }

    /// Records a resourceVersion observed from the API server (objects,
    /// deletions, bookmarks, list metadata).
    pub fn see(&mut self, resource_version: u64) {
        self.high_water = self.high_water.max(resource_version);
    }

    /// The highest resourceVersion observed; 0 outside Kubernetes.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    pub fn mark_synced(&mut self, kind: Kind) {
        self.synced.insert(kind);
        self.stale.remove(&kind);
    }

    /// The watch of `kind` failed: what the index holds of it may be behind
    /// the API server until its next complete list ([`Index::mark_synced`]).
    /// Still served (the last known state), but no status is written from it.
    pub fn mark_stale(&mut self, kind: Kind) -> bool {
        self.stale.insert(kind)
    }

    /// Synced, and no watch of a source has failed since its last complete list.
    pub fn is_fresh(&self) -> bool {
        self.is_synced() && Kind::SOURCES.iter().all(|k| !self.stale.contains(k))
    }

    /// Every source has delivered its initial list.
    pub fn is_synced(&self) -> bool {
        Kind::SOURCES.iter().all(|k| self.synced.contains(k))
    }

    /// `kind` was listed and its watch has not failed since.
    pub fn is_kind_fresh(&self, kind: Kind) -> bool {
        self.synced.contains(&kind) && !self.stale.contains(&kind)
    }

    /// A kept Service or Endpoints object as the watch shows it.
    pub fn apply_exposed(&mut self, kind: Kind, name: &str, obj: Exposed) {
        self.exposed.insert((kind, name.to_owned()), obj);
    }

    pub fn delete_exposed(&mut self, kind: Kind, name: &str) {
        self.exposed.remove(&(kind, name.to_owned()));
    }

    /// Replaces every kept object of `kind` (a relist).
    pub fn reset_exposed(&mut self, kind: Kind, objs: Vec<(String, Exposed)>) {
        self.exposed.retain(|(k, _), _| *k != kind);
        for (name, obj) in objs {
            self.apply_exposed(kind, &name, obj);
        }
    }

    /// The kept objects of `kind`, by name.
    pub fn exposed(&self, kind: Kind) -> impl Iterator<Item = (&str, &Exposed)> {
        self.exposed
            .iter()
            .filter(move |((k, _), _)| *k == kind)
            .map(|((_, n), e)| (n.as_str(), e))
    }

    /// The reports, shared: the copy [`Index::inputs`] handed out last
    /// while no report changed since.
    fn reports_shared(&self) -> Shared<BTreeMap<NodeName, AgentReport>> {
        self.reports_read
            .borrow_mut()
            .get_or_insert_with(|| Shared::new(self.reports.clone()))
            .clone()
    }

    /// The compiler's inputs, and the problems found on the way in. The
    /// node table, the reports and the stream liveness are shared with the
    /// index (pointers, no copy); the gateways are a map of shared objects.
    pub fn inputs(&self) -> (Inputs, Vec<Problem>) {
        let mut problems = self.source_problems.clone();
        problems.extend(self.undecodable.values().cloned());
        problems.extend(self.key_conflicts.values().flatten().cloned());
        problems.extend(self.misnamed.values().flatten().cloned());
        let mut inputs = Inputs {
            config: self.config,
            reports: self.reports_shared(),
            nodes: self.nodes.clone(),
            ..Default::default()
        };
        for (_, svc) in self.exposed(Kind::Service) {
            let (Some(gw), Some(ip)) = (&svc.gateway, svc.ingress) else {
                continue;
            };
            let lb = inputs.load_balancers.entry(gw.clone()).or_default();
            match svc.type_.as_deref() {
                Some(raven_core::api::v1beta1::TUNNEL) => lb.tunnel = Some(ip),
                Some(raven_core::api::v1beta1::PROXY) => lb.proxy = Some(ip),
                _ => {}
            }
        }
        for (name, entry) in &self.gateways {
            problems.extend(entry.problems.iter().cloned());
            if let Some(gw) = &entry.good {
                inputs.gateways.insert(name.clone(), gw.clone());
            }
        }
        problems.extend(self.node_problems.values().flatten().cloned());
        (inputs, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_core::api::v1beta1::{Endpoint, GatewaySpec, TunnelConfiguration};

    fn gw(replicas: i32) -> Gateway {
        Gateway::new(
            "gw-a",
            GatewaySpec {
                tunnel_config: TunnelConfiguration { replicas },
                endpoints: vec![Endpoint {
                    node_name: "n1".into(),
                    type_: "tunnel".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    /// The replicas of the `gw-a` served.
    fn replicas(inputs: &Inputs) -> i32 {
        inputs.gateways["gw-a"]
            .gateway()
            .spec
            .tunnel_config
            .replicas
    }

    #[test]
    fn invalid_update_keeps_serving_the_last_valid_gateway() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.apply_gateway(gw(5));
        let (inputs, problems) = idx.inputs();
        assert_eq!(replicas(&inputs), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "spec.tunnelConfig.Replicas");
        assert!(
            problems[0]
                .message
                .contains("serving the last valid version")
        );
    }

    #[test]
    fn invalid_new_gateway_is_reported_and_not_served() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(5));
        let (inputs, problems) = idx.inputs();
        assert!(inputs.gateways.is_empty());
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn fixing_a_gateway_clears_its_problem() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.apply_gateway(gw(5));
        idx.apply_gateway(gw(0));
        let (inputs, problems) = idx.inputs();
        assert_eq!(replicas(&inputs), 0);
        assert!(problems.is_empty());
    }

    #[test]
    fn relist_drops_gateways_that_disappeared() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.reset_gateways(vec![]);
        assert!(idx.inputs().0.gateways.is_empty());
    }

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap_or_else(|_| unreachable!())
    }

    fn dead_report(dead: &str) -> AgentReport {
        AgentReport {
            dead_candidates: [node(dead)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_key_another_node_reported_first_is_refused_and_reported() {
        let key = |k: &str| AgentReport {
            wireguard_public_key: Some(k.into()),
            ..Default::default()
        };
        const H1: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let mut idx = Index::default();
        assert!(idx.set_report(node("h1"), key(H1)));
        // q1 claims h1's key: stored without it, a problem names both.
        assert!(idx.set_report(node("q1"), key(H1)));
        let (inputs, problems) = idx.inputs();
        assert_eq!(
            inputs.reports[&node("h1")].wireguard_public_key.as_deref(),
            Some(H1)
        );
        assert_eq!(inputs.reports[&node("q1")].wireguard_public_key, None);
        assert!(
            problems
                .iter()
                .any(|p| p.object == "Node/q1" && p.message.contains("h1")),
            "{problems:?}"
        );
        // Re-sent unchanged: nothing new. A key of its own clears the problem.
        assert!(!idx.set_report(node("q1"), key(H1)));
        assert!(idx.set_report(
            node("q1"),
            key("TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=")
        ));
        assert!(idx.inputs().1.iter().all(|p| p.object != "Node/q1"));
        // h1 still holds its key when it re-reports.
        assert!(!idx.set_report(node("h1"), key(H1)));
    }

    #[test]
    fn a_closed_stream_counts_as_gone_only_after_the_grace_and_reconnecting_ends_that() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut idx = Index::default();
        idx.set_started(t0);
        let a = node("a");
        idx.stream_opened(a.clone(), t0);
        assert_eq!(idx.streams_at(t0, grace).connected, [a.clone()].into());
        idx.stream_closed(&a, t0 + Duration::from_secs(1));
        let at = |idx: &Index, s: u64| idx.streams_at(t0 + Duration::from_secs(s), grace);
        let within = at(&idx, 3);
        assert!(within.gone.is_empty() && within.connected.is_empty());
        assert_eq!(at(&idx, 4).gone, [a.clone()].into());
        idx.stream_opened(a.clone(), t0 + Duration::from_secs(5));
        assert!(at(&idx, 9).gone.is_empty());
    }

    #[test]
    fn a_grace_deadline_is_armed_only_while_some_probe_reports_a_death() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut idx = Index::default();
        idx.set_started(t0);
        let (a, b) = (node("a"), node("b"));
        idx.stream_opened(a.clone(), t0);
        idx.stream_opened(b.clone(), t0);
        let closed_at = t0 + Duration::from_secs(1);
        assert!(!idx.stream_closed(&a, closed_at), "nothing to decide yet");
        assert_eq!(idx.next_grace_deadline(closed_at, grace), None);
        assert!(idx.set_report(b.clone(), dead_report("a")));
        assert_eq!(
            idx.next_grace_deadline(closed_at, grace),
            Some(closed_at + grace)
        );
        assert_eq!(idx.next_grace_deadline(closed_at + grace, grace), None);
        // A replica that does not lead has the detector off: nobody is gone.
        assert!(idx.set_failure_detector(false));
        assert_eq!(idx.next_grace_deadline(closed_at, grace), None);
        assert!(idx.streams_at(closed_at + grace, grace).gone.is_empty());
        assert!(idx.set_failure_detector(true));
        assert!(!idx.streams_at(closed_at + grace, grace).gone.is_empty());
        // b's stream ends: its verdict stops counting.
        assert!(idx.stream_closed(&b, closed_at));
        assert!(idx.inputs().0.reports[&b].dead_candidates.is_empty());
        assert_eq!(idx.next_grace_deadline(closed_at, grace), None);
        // A verdict replaced by a report naming no dead candidate stops
        // counting too.
        idx.stream_opened(b.clone(), closed_at);
        assert!(idx.set_report(b.clone(), dead_report("a")));
        assert!(idx.next_grace_deadline(closed_at, grace).is_some());
        assert!(idx.set_report(b.clone(), AgentReport::default()));
        assert_eq!(idx.next_grace_deadline(closed_at, grace), None);
    }

    proptest::proptest! {
        /// The stream liveness and reports the index hands out again (kept
        /// until something they depend on changes or a grace runs out)
        /// equal the ones computed afresh from every node and stream, at
        /// every moment of any sequence of streams opening and closing,
        /// nodes coming and going or changing, reports, restarts and the
        /// detector switched.
        #[test]
        fn liveness_and_reports_handed_out_again_equal_the_ones_computed_afresh(
            ops in proptest::collection::vec((0u8..7, 0u8..5, 0u64..5000), 1..40)
        ) {
            let t0 = Instant::now();
            let grace = Duration::from_secs(3);
            let mut idx = Index::default();
            let mut now = t0;
            for (op, k, ms) in ops {
                let n = node(&format!("n{k}"));
                match op {
                    0 => { idx.stream_opened(n, now); }
                    1 => { idx.stream_closed(&n, now); }
                    2 => {
                        let change = crate::sources::manifests::Change {
                            nodes: [(n.clone(), Some(ClusterNode {
                                name: n,
                                gateway_label: Some(format!("gw-{ms}")),
                                ready: ms % 2 == 0,
                                internal_ip: None,
                                pod_cidrs: Vec::new(),
                            }))].into(),
                            ..Default::default()
                        };
                        idx.apply_manifest_change(change);
                    }
                    3 => idx.delete_node(n.as_str()),
                    4 => idx.set_started(now),
                    5 => { idx.set_failure_detector(ms % 3 != 0); }
                    _ => { idx.set_report(n, dead_report(&format!("n{}", ms % 5))); }
                }
                now += Duration::from_millis(ms);
                for at in [now, now + Duration::from_millis(ms / 2)] {
                    proptest::prop_assert_eq!(&*idx.streams_at(at, grace), &idx.streams_now(at, grace));
                }
                now += Duration::from_millis(ms / 2);
                let (inputs, _) = idx.inputs();
                proptest::prop_assert_eq!(&*inputs.reports, &idx.reports);
                let nodes: BTreeMap<NodeName, ClusterNode> = idx.nodes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                proptest::prop_assert_eq!(&*inputs.nodes, &nodes);
            }
        }
    }

    #[test]
    fn a_read_shares_the_node_table_reports_and_liveness_until_they_change() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut idx = Index::default();
        idx.reset_cluster_nodes([ClusterNode {
            name: node("a"),
            gateway_label: None,
            ready: true,
            internal_ip: None,
            pod_cidrs: Vec::new(),
        }]);
        idx.set_report(node("a"), dead_report("b"));
        let (first, _) = idx.inputs();
        let (again, _) = idx.inputs();
        assert!(first.nodes.shares(&again.nodes) && first.reports.shares(&again.reports));
        let s1 = idx.streams_at(t0, grace);
        assert!(s1.shares(&idx.streams_at(t0 + Duration::from_secs(1), grace)));
        // A report changes: only the reports are read again.
        idx.set_report(node("a"), dead_report("c"));
        let (next, _) = idx.inputs();
        assert!(next.nodes.shares(&first.nodes) && !next.reports.shares(&first.reports));
        assert_eq!(next.reports[&node("a")], dead_report("c"));
        // A stream opens: the liveness is computed again.
        idx.stream_opened(node("a"), t0);
        let s2 = idx.streams_at(t0 + Duration::from_secs(1), grace);
        assert!(!s2.shares(&s1) && s2.connected.contains(&node("a")));
    }

    #[test]
    fn serves_only_after_every_source_synced() {
        let mut idx = Index::default();
        idx.mark_synced(Kind::Gateway);
        idx.mark_synced(Kind::Node);
        assert!(!idx.is_synced());
        idx.mark_synced(Kind::Config);
        assert!(idx.is_synced());
    }
}

/// A shared [`Index`]: sources update it, the pipeline is woken on every
/// change.
#[derive(Debug, Clone, Default)]
pub struct IndexHandle {
    inner: std::sync::Arc<std::sync::Mutex<Index>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
}

impl IndexHandle {
    /// Runs `f` on the index and wakes the pipeline.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let mut r = None;
        self.update_if(|idx| {
            r = Some(f(idx));
            true
        });
        r.unwrap_or_else(|| unreachable!("update_if always runs its closure"))
    }

    /// Changes the index; wakes the pipeline only when `f` says it changed
    /// something (agents re-send unchanged reports all the time).
    pub fn update_if(&self, f: impl FnOnce(&mut Index) -> bool) -> bool {
        let changed = {
            let mut idx = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut idx)
        };
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Reads the index without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        let idx = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&idx)
    }

    /// Resolves after the next `update`.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
