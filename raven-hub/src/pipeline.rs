//! Source changes → (debounced) compile → a new [`Published`] state.
//!
//! A recompile whose resources are unchanged publishes no new revision.
//! The compiler lives as long as the pipeline
//! ([`raven_core::compile::Incremental`]): a change recompiles the gateways
//! whose inputs changed and reuses every other gateway's output.
//! Shared resources are encoded once per content version and the same bytes
//! are handed to every stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use raven_core::compile::CompiledGateway;
use raven_core::{GatewayName, ResourceName, Topology};
use raven_proto::EncodedResource;

/// What the hub serves at one moment.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Identity of the revision sequence; revisions are compared only within
    /// one epoch.
    pub epoch: String,
    /// Grows by one whenever a resource changes.
    pub revision: u64,
    /// Every source has synced; before that nothing is served.
    pub ready: bool,
    /// Synced and no watch failed since its last complete list: the index
    /// matches the API server, so status may be written from it.
    pub fresh: bool,
    /// Each served Gateway as the source last showed it (uid,
    /// resourceVersion, status) — what the API server holds, for the status
    /// writer to compare against, never the hub's own election.
    pub observed: BTreeMap<GatewayName, ObservedGateway>,
    pub topology: Topology,
    /// Per-gateway election results, for status writing (shared with the
    /// compiler: an unchanged gateway is the last state's allocation).
    pub gateways: BTreeMap<GatewayName, Arc<CompiledGateway>>,
    /// Every resource encoded once; streams send these bytes as they are.
    pub encoded: BTreeMap<ResourceName, EncodedResource>,
    /// What changed in each of the last revisions of this epoch (at most
    /// [`DELTA_HISTORY`], oldest first, consecutive; the last ends at
    /// `revision`), so a session whose agent is in sync with any of them
    /// plans only the names changed since ([`Published::changed_since`])
    /// instead of its whole view: work per change proportional to the
    /// change, also for a session that skipped revisions while an Update
    /// was in flight (every agent, when Reports come in by the thousand).
    pub deltas: Vec<Arc<Delta>>,
    /// Every resource name this hub has published, interned: sessions keep
    /// what their agent holds as these ids (see `grpc::held`).
    pub ids: Arc<ResourceIds>,
    /// The resources by kind, for planning whole views (see
    /// [`crate::grpc::runs`]).
    pub runs: crate::grpc::runs::RunsCell,
}

/// Resource names interned as small numbers. Ids only ever grow: a name
/// keeps its id for the hub's lifetime (also once it leaves the topology),
/// so any later table resolves every id an earlier one gave out, and a
/// session may keep ids across revisions. The table grows by the names the
/// cluster ever had (~50 bytes each), not by changes.
#[derive(Debug, Clone, Default)]
pub struct ResourceIds {
    ids: std::collections::HashMap<ResourceName, u32>,
    names: Vec<ResourceName>,
}

impl ResourceIds {
    pub fn id(&self, name: &ResourceName) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// [`Self::id`] of a name given as a string (an agent's Hello), without
    /// building a [`ResourceName`].
    pub fn id_of_str(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name of `id` (given out by this table or an earlier one).
    pub fn name(&self, id: u32) -> Option<&ResourceName> {
        self.names.get(id as usize)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Gives `name` an id if it has none.
    pub fn intern(&mut self, name: &ResourceName) {
        if !self.ids.contains_key(name) {
            let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
            self.ids.insert(name.clone(), id);
            self.names.push(name.clone());
        }
    }

    /// `prev` with every name of `topology` interned: `prev` itself (shared,
    /// no copy) when it knows them all.
    pub fn extended(prev: &Arc<Self>, topology: &Topology) -> Arc<Self> {
        Self::extended_by(prev, topology.resources.keys())
    }

    /// `prev` with every one of `names` interned: `prev` itself (shared, no
    /// copy) when it knows them all. A new topology needs only its names
    /// that the last one lacked, which are among the names that changed.
    pub fn extended_by<'a>(
        prev: &Arc<Self>,
        names: impl IntoIterator<Item = &'a ResourceName>,
    ) -> Arc<Self> {
        let mut names = names.into_iter().filter(|n| prev.id(n).is_none());
        let Some(first) = names.next() else {
            return prev.clone();
        };
        let mut next = Self::clone(prev);
        next.intern(first);
        names.for_each(|n| next.intern(n));
        Arc::new(next)
    }
}

/// How many revisions back [`Published::deltas`] reaches.
pub const DELTA_HISTORY: usize = 64;

impl Published {
    /// The names changed between revision `since` (of this epoch) and
    /// this one; `None` when the kept deltas do not reach back to it.
    pub fn changed_since(&self, since: u64) -> Option<BTreeSet<&ResourceName>> {
        let start = self.deltas.iter().rposition(|d| d.from == since)?;
        Some(
            self.deltas[start..]
                .iter()
                .flat_map(|d| d.names.iter())
                .collect(),
        )
    }

    /// [`Self::changed_since`] without building a set when the last delta
    /// alone reaches back to `since` — a session in sync with the previous
    /// revision, which is every session after a change it was sent: the
    /// same names in the same order, read from that delta.
    pub fn changed_names_since(&self, since: u64) -> Option<ChangedNames<'_>> {
        match self.deltas.last() {
            Some(d) if d.from == since => Some(ChangedNames::One(&d.names)),
            _ => self.changed_since(since).map(ChangedNames::Many),
        }
    }
}

/// The names changed since a revision ([`Published::changed_names_since`]),
/// in name order.
#[derive(Debug)]
pub enum ChangedNames<'a> {
    /// The names of one delta, as it holds them.
    One(&'a BTreeSet<ResourceName>),
    /// The union of several deltas.
    Many(BTreeSet<&'a ResourceName>),
}

impl<'a> ChangedNames<'a> {
    pub fn contains(&self, name: &ResourceName) -> bool {
        match self {
            Self::One(names) => names.contains(name),
            Self::Many(names) => names.contains(name),
        }
    }

    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a ResourceName> + '_ {
        let (one, many) = match self {
            Self::One(names) => (Some(names.iter()), None),
            Self::Many(names) => (None, Some(names.iter().copied())),
        };
        one.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

/// The resources that differ between two consecutive revisions of one epoch:
/// changed, added or removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub from: u64,
    pub names: BTreeSet<ResourceName>,
}

impl Delta {
    /// The names whose presence or version differs between `before` and
    /// `after`.
    pub fn between(from: u64, before: &Topology, after: &Topology) -> Self {
        let mut names: BTreeSet<ResourceName> = after
            .resources
            .iter()
            .filter(|(n, r)| {
                before
                    .resources
                    .get(*n)
                    .is_none_or(|b| b.version != r.version)
            })
            .map(|(n, _)| n.clone())
            .collect();
        names.extend(
            before
                .resources
                .keys()
                .filter(|n| !after.resources.contains_key(*n))
                .cloned(),
        );
        Self { from, names }
    }
}

/// A Gateway's identity and status as the API server last showed them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedGateway {
    pub uid: Option<String>,
    pub resource_version: u64,
    pub status: Option<raven_core::api::v1beta1::GatewayStatus>,
}

/// Every resource of `topology` encoded, an unchanged one (same name and
/// version as in `prev`) keeping its bytes: one pass over the sorted maps
/// side by side, no lookups.
#[cfg(test)]
fn encode(prev: &Published, topology: &Topology) -> BTreeMap<ResourceName, EncodedResource> {
    encode_and_diff(prev, topology).0
}

/// [`encode`], and the names whose presence or version differs between
/// `prev` and `topology` (what [`Delta::between`] gives), from the same
/// pass. A resource the compiler reused is the same allocation as in
/// `prev` and is told unchanged by pointer.
fn encode_and_diff(
    prev: &Published,
    topology: &Topology,
) -> (
    BTreeMap<ResourceName, EncodedResource>,
    BTreeSet<ResourceName>,
) {
    // `encoded` holds exactly the names of `topology`, in the same order.
    let aligned = prev.encoded.len() == prev.topology.resources.len();
    let bytes = prev.encoded.values().map(Some).filter(|_| aligned);
    let mut old = prev
        .topology
        .resources
        .iter()
        .zip(bytes.chain(std::iter::repeat(None)))
        .peekable();
    let mut changed = Vec::new();
    let mut encoded = Vec::with_capacity(topology.resources.len());
    for (name, r) in &topology.resources {
        while let Some(((gone, _), _)) = old.next_if(|((o, _), _)| *o < name) {
            changed.push(gone.clone());
        }
        let kept = match old.next_if(|((o, _), _)| *o == name) {
            Some(((_, o), bytes)) if o.shares(r) || o.version == r.version => bytes.cloned(),
            _ => {
                changed.push(name.clone());
                None
            }
        };
        let bytes = kept.unwrap_or_else(|| EncodedResource::new(name, r));
        encoded.push((name.clone(), bytes));
    }
    changed.extend(old.map(|((gone, _), _)| gone.clone()));
    (BTreeMap::from_iter(encoded), BTreeSet::from_iter(changed))
}

/// Logs every gateway whose elected endpoints changed, and why when a local
/// failover caused it.
fn log_elections(
    before: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
    after: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
    problems: &[raven_core::Problem],
) {
    let active = |g: Option<&CompiledGateway>| -> Vec<String> {
        g.map(|g| {
            g.status
                .active_endpoints
                .iter()
                .map(|e| format!("{}:{}", e.type_, e.node_name))
                .collect()
        })
        .unwrap_or_default()
    };
    for (name, g) in after {
        let was = before.get(name);
        if was.is_some_and(|b| {
            Arc::ptr_eq(b, g) || b.status.active_endpoints == g.status.active_endpoints
        }) {
            continue;
        }
        let (old, new) = (active(was.map(|b| &**b)), active(Some(g)));
        if old == new || before.is_empty() {
            continue;
        }
        let object = format!("Gateway/{name}");
        let claim = problems
            .iter()
            .find(|p| p.object == object && p.field == "status.activeEndpoints");
        let dead: Vec<&str> = problems
            .iter()
            .filter(|p| p.object == object && p.message.starts_with("proven dead"))
            .map(|p| p.value.as_str())
            .collect();
        match claim {
            Some(p) => {
                tracing::warn!(gateway = %name, old = %raven_cli::list(&old), new = %raven_cli::list(&new), claimant = %p.value, "elected endpoints changed: adopted a local failover")
            }
            None if !dead.is_empty() => {
                tracing::warn!(gateway = %name, old = %raven_cli::list(&old), new = %raven_cli::list(&new), dead = %raven_cli::list(&dead), "elected endpoints changed: replaced an endpoint proven dead (stream gone, domain probes fail)")
            }
            None => {
                tracing::info!(gateway = %name, old = %raven_cli::list(&old), new = %raven_cli::list(&new), "elected endpoints changed")
            }
        }
    }
}

/// Receiver of the published state.
pub type PublishedRx = tokio::sync::watch::Receiver<Arc<Published>>;

/// Debounce settings, leading edge plus trailing coalescing: the first
/// change after `quiet` without any compiles at once (a single change costs
/// no wait); a change that follows another within `quiet` is part of a
/// burst, and the burst compiles once it has been quiet for `quiet`, but
/// never later than `max_delay` after its first change.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    pub quiet: std::time::Duration,
    pub max_delay: std::time::Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            quiet: std::time::Duration::from_millis(100),
            max_delay: std::time::Duration::from_secs(1),
        }
    }
}

/// Compiles the index into published states.
#[derive(Debug)]
pub struct Pipeline {
    index: crate::index::IndexHandle,
    revisions: crate::revision::Revisions,
    tx: tokio::sync::watch::Sender<Arc<Published>>,
    /// See [`Pipeline::sessions`].
    sessions_tx: tokio::sync::watch::Sender<Arc<Published>>,
    debounce: Debounce,
    /// How long an agent's stream must be gone before the failure detector
    /// counts it (see [`raven_core::liveness`]).
    failover_grace: std::time::Duration,
    phases: Phases,
    /// The compiler, remembering its last compile per gateway: a change
    /// recompiles the gateways whose inputs changed (see
    /// [`raven_core::compile::Incremental`]).
    compiler: raven_core::compile::Incremental,
    /// Each status-less gateway as the index served it, with the status the
    /// last election gave it and the gateway carrying that status: while
    /// both stay, the same object is compiled again (no copy per compile,
    /// and the compiler sees it unchanged by identity).
    stuck: BTreeMap<GatewayName, Stuck>,
    /// The subnets the last published gateways served, kept as they
    /// change.
    held: HeldSubnets,
}

#[derive(Debug)]
struct Stuck {
    served: raven_core::compile::Admitted,
    /// The compiled gateway whose status this is.
    from: Arc<CompiledGateway>,
    with_status: raven_core::compile::Admitted,
}

/// The subnets the published gateways served, kept as they change: each
/// gateway's subnets are parsed once per compiled gateway, and the map a
/// compile reads (`Inputs::held_subnets`, shared) is updated by the
/// subnets of the gateways that changed only. Equals
/// [`held_from_scratch`] of the same gateways.
#[derive(Debug, Default)]
struct HeldSubnets {
    /// Each range and the gateway that holds it: of several serving the
    /// same range, the last by name (what collecting them in name order
    /// gives).
    held: raven_core::Shared<BTreeMap<ipnet::IpNet, GatewayName>>,
    /// Every gateway serving each range.
    claims: BTreeMap<ipnet::IpNet, BTreeSet<GatewayName>>,
    /// Each gateway's ranges and the compiled gateway they were parsed from.
    of: BTreeMap<GatewayName, Held>,
}

#[derive(Debug)]
struct Held {
    from: Arc<CompiledGateway>,
    nets: Vec<ipnet::IpNet>,
}

impl HeldSubnets {
    /// Brings the held ranges up to `gateways` (the last published
    /// state's), looking at the subnets of the gateways that changed only.
    fn update(
        &mut self,
        gateways: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
    ) -> raven_core::Shared<BTreeMap<ipnet::IpNet, GatewayName>> {
        let gone: Vec<GatewayName> = self
            .of
            .keys()
            .filter(|n| !gateways.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(h) = self.of.remove(&name) {
                h.nets.iter().for_each(|net| self.unclaim(net, &name));
            }
        }
        for (name, c) in gateways {
            let nets = match self.of.get_mut(name) {
                Some(h) if Arc::ptr_eq(&h.from, c) => continue,
                Some(h) if h.from.status == c.status => {
                    h.from = c.clone();
                    continue;
                }
                _ => served_subnets(&c.status),
            };
            let held = Held {
                from: c.clone(),
                nets: nets.clone(),
            };
            if let Some(old) = self.of.insert(name.clone(), held) {
                old.nets.iter().for_each(|net| self.unclaim(net, name));
            }
            nets.iter().for_each(|net| self.claim(*net, name));
        }
        self.held.clone()
    }

    fn claim(&mut self, net: ipnet::IpNet, gateway: &GatewayName) {
        self.claims.entry(net).or_default().insert(gateway.clone());
        self.settle(net);
    }

    fn unclaim(&mut self, net: &ipnet::IpNet, gateway: &GatewayName) {
        if let Some(claims) = self.claims.get_mut(net) {
            claims.remove(gateway);
            self.settle(*net);
        }
    }

    /// Gives `net` to the last gateway by name still claiming it, or
    /// forgets it when none does.
    fn settle(&mut self, net: ipnet::IpNet) {
        match self.claims.get(&net).and_then(|c| c.last()) {
            Some(last) => {
                if self.held.get(&net) != Some(last) {
                    self.held.insert(net, last.clone());
                }
            }
            None => {
                self.claims.remove(&net);
                self.held.remove(&net);
            }
        }
    }
}

/// The ranges `gateways` served, each with the last gateway by name that
/// serves it, gathered from every status.
#[cfg(test)]
fn held_from_scratch(
    gateways: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
) -> BTreeMap<ipnet::IpNet, GatewayName> {
    gateways
        .values()
        .flat_map(|c| {
            served_subnets(&c.status)
                .into_iter()
                .map(|net| (net, c.name.clone()))
        })
        .collect()
}

/// The subnets `status` lists for its nodes.
fn served_subnets(status: &raven_core::api::v1beta1::GatewayStatus) -> Vec<ipnet::IpNet> {
    status
        .nodes
        .iter()
        .flat_map(|n| n.subnets.iter())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Whether two gateway maps are equal, comparing a shared gateway by
/// pointer before its content.
fn same_gateways(
    a: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
    b: &BTreeMap<GatewayName, Arc<CompiledGateway>>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, ga), (nb, gb))| na == nb && (Arc::ptr_eq(ga, gb) || ga == gb))
}

/// Where the last [`Pipeline::recompile`] spent its time, phase by phase
/// (for the manifest benchmark).
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// Reading the index: its inputs and the streams' liveness.
    pub inputs: std::time::Duration,
    /// The observed gateways, the last election and held subnets.
    pub prepare: std::time::Duration,
    /// The incremental compile (`Incremental::compile`) and the election log.
    pub compile: std::time::Duration,
    /// Advancing (and persisting) the revision.
    pub revision: std::time::Duration,
    /// Encoding, deltas, interned names.
    pub encode: std::time::Duration,
    /// Comparing with the last state and sending it.
    pub publish: std::time::Duration,
}

struct Clock(std::time::Instant);

impl Clock {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }

    /// The time since the last lap.
    fn lap(&mut self) -> std::time::Duration {
        let now = std::time::Instant::now();
        now - std::mem::replace(&mut self.0, now)
    }
}

impl Pipeline {
    pub fn new(
        index: crate::index::IndexHandle,
        revisions: crate::revision::Revisions,
        debounce: Debounce,
        failover_grace: std::time::Duration,
    ) -> (Self, PublishedRx) {
        let initial = Published {
            epoch: revisions.current().epoch.clone(),
            revision: revisions.current().revision,
            ..Default::default()
        };
        let initial = Arc::new(initial);
        let (tx, rx) = tokio::sync::watch::channel(initial.clone());
        let sessions_tx = tokio::sync::watch::Sender::new(initial);
        (
            Self {
                index,
                revisions,
                tx,
                sessions_tx,
                debounce,
                failover_grace,
                phases: Phases::default(),
                compiler: raven_core::compile::Incremental::default(),
                stuck: BTreeMap::new(),
                held: HeldSubnets::default(),
            },
            rx,
        )
    }

    /// What the Sync sessions wait on: a published state reaches it only
    /// when what agents receive changes (epoch, revision or readiness). A
    /// state that differs only in what the status writer and the inspection
    /// RPCs read (the API server's echo of the hub's own status write,
    /// problems, freshness) wakes no session.
    pub fn sessions(&self) -> PublishedRx {
        self.sessions_tx.subscribe()
    }

    /// Where the last recompile spent its time.
    pub fn phases(&self) -> Phases {
        self.phases
    }

    /// Compiles now and publishes the result if anything a reader can see
    /// changed. Returns whether it published.
    pub fn recompile(&mut self) -> Result<bool, crate::revision::RevisionError> {
        let now = tokio::time::Instant::now();
        let mut clock = Clock::start();
        // One read: readiness must describe the very inputs compiled (a
        // source that syncs between two reads would otherwise make a
        // partial index look complete).
        let (mut inputs, mut problems, ready, fresh, floor) = self.index.read(|i| {
            let (mut inputs, problems) = i.inputs();
            inputs.streams = i.streams_at(now, self.failover_grace);
            (
                inputs,
                problems,
                i.is_synced(),
                i.is_fresh(),
                i.high_water(),
            )
        });
        self.phases.inputs = clock.lap();
        let prev = self.tx.borrow().clone();
        let observed: BTreeMap<GatewayName, ObservedGateway> = inputs
            .gateways
            .iter()
            .map(|(name, gw)| {
                let gw = gw.gateway();
                let meta = &gw.metadata;
                let rv = meta
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok());
                (
                    name.clone(),
                    ObservedGateway {
                        uid: meta.uid.clone(),
                        resource_version: rv.unwrap_or(0),
                        status: gw.status.clone(),
                    },
                )
            })
            .collect();
        // Stickiness needs the current active endpoints. The API server has
        // them in the status the leader wrote; manifests have none, so the
        // hub's own last election stands in.
        self.stuck
            .retain(|name, _| inputs.gateways.contains_key(name));
        for (name, gw) in &mut inputs.gateways {
            let has_status = gw
                .gateway()
                .status
                .as_ref()
                .is_some_and(|s| !s.active_endpoints.is_empty());
            if has_status {
                continue;
            }
            let Some(last) = prev.gateways.get(name) else {
                continue;
            };
            match self.stuck.get_mut(name) {
                Some(s)
                    if s.served.shares(gw)
                        && (Arc::ptr_eq(&s.from, last) || s.from.status == last.status) =>
                {
                    s.from = last.clone();
                    *gw = s.with_status.clone();
                }
                _ => {
                    let served = gw.clone();
                    gw.set_status(Some(last.status.clone()));
                    let stuck = Stuck {
                        served,
                        from: last.clone(),
                        with_status: gw.clone(),
                    };
                    self.stuck.insert(name.clone(), stuck);
                }
            }
        }
        // Subnet precedence needs history: a gateway keeps the ranges it
        // served in the last published state against a newcomer. Before
        // this hub published anything, the status the gateways carry (the
        // leader's, in Kubernetes mode) stands in.
        inputs.held_subnets = if prev.gateways.is_empty() {
            self.held = HeldSubnets::default();
            inputs
                .gateways
                .iter()
                .flat_map(|(name, gw)| {
                    gw.gateway()
                        .status
                        .as_ref()
                        .map(served_subnets)
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |net| (net, name.clone()))
                })
                .collect()
        } else {
            self.held.update(&prev.gateways)
        };
        self.phases.prepare = clock.lap();
        let compile_started = std::time::Instant::now();
        // Versions of unchanged resources come from the last state (a
        // one-node change hashes the few resources it changed).
        let mut compiled = self.compiler.compile(&inputs, Some(&prev.topology));
        crate::metrics::compile_observed(compile_started.elapsed());
        // The index and the held subnets keep the tables these share:
        // letting go of them now lets their next write go in place instead
        // of copying them (the rest is freed with the retired state).
        drop((
            std::mem::take(&mut inputs.nodes),
            std::mem::take(&mut inputs.reports),
            std::mem::take(&mut inputs.streams),
            std::mem::take(&mut inputs.held_subnets),
        ));
        self.phases.compile = clock.lap();
        log_elections(
            &prev.gateways,
            &compiled.gateways,
            &compiled.topology.problems,
        );
        problems.append(&mut compiled.topology.problems);
        problems.sort();
        problems.dedup();
        compiled.topology.problems = problems;

        // Before every source has synced the index is partial: its content
        // is no revision. The stored one stands, not advanced nor persisted,
        // so a restarted hub whose first complete content is unchanged keeps
        // the revision its agents hold.
        if ready {
            self.revisions.advance(&compiled.topology, floor)?;
        }
        let (epoch, revision) = {
            let s = self.revisions.current();
            (s.epoch.clone(), s.revision)
        };
        self.phases.revision = clock.lap();
        // Encode each resource once per content version: unchanged resources
        // keep their bytes from the previous state; the same pass finds the
        // names that changed, which are all a delta and the id table need.
        let (encoded, changed_names) = encode_and_diff(&prev, &compiled.topology);
        let ids = ResourceIds::extended_by(&prev.ids, &changed_names);
        // An unready state's topology is not the content of its revision: no
        // delta starts or ends at one.
        let deltas = if epoch != prev.epoch || !ready || !prev.ready {
            Vec::new()
        } else if revision == prev.revision {
            prev.deltas.clone()
        } else {
            let keep = prev.deltas.len().min(DELTA_HISTORY - 1);
            let mut deltas = prev.deltas[prev.deltas.len() - keep..].to_vec();
            deltas.push(Arc::new(Delta {
                from: prev.revision,
                names: changed_names,
            }));
            deltas
        };
        let next = Published {
            ids,
            encoded,
            deltas,
            epoch,
            revision,
            ready,
            fresh,
            observed,
            topology: compiled.topology,
            gateways: compiled.gateways,
            runs: Default::default(),
        };
        self.phases.encode = clock.lap();
        let for_agents =
            next.revision != prev.revision || next.epoch != prev.epoch || next.ready != prev.ready;
        let changed = for_agents
            || next.fresh != prev.fresh
            || next.observed != prev.observed
            || next.topology.problems != prev.topology.problems
            || !same_gateways(&next.gateways, &prev.gateways);
        let mut retired = Vec::new();
        if changed {
            let next = Arc::new(next);
            retired.push(self.tx.send_replace(next.clone()));
            if for_agents {
                retired.push(self.sessions_tx.send_replace(next));
            }
        }
        self.phases.publish = clock.lap();
        // Freeing the replaced state and the inputs' copy is O(cluster) and
        // no reader waits for it: another thread does it, so the next
        // compile may start at once.
        retired.push(prev);
        let retire = move || drop((retired, inputs));
        // Without a thread to be had, the failed spawn drops it here.
        drop(
            std::thread::Builder::new()
                .name("raven-retire".into())
                .spawn(retire),
        );
        Ok(changed)
    }

    /// Recompiles after every (debounced) burst of index changes, and when
    /// an agent's stream has been gone for the failover grace, until
    /// `shutdown` fires.
    ///
    /// Each compile runs on the blocking pool: it is CPU work proportional
    /// to the cluster and ends in a durable (fsync'ed) write of the new
    /// revision, neither of which may hold a runtime worker that thousands
    /// of streams share.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let index = self.index.clone();
        let grace = self.failover_grace;
        let debounce = self.debounce;
        let mut pipeline = self;
        // When the pipeline last saw the index change (the start counts as
        // one: changes right after it are the sources' initial burst).
        let mut last_change = tokio::time::Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let compiled = tokio::task::spawn_blocking(move || {
                if let Err(e) = pipeline.recompile() {
                    tracing::error!(error = %e, "could not persist a new revision; keeping the previous state published");
                }
                pipeline
            });
            pipeline = match compiled.await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "the compiler panicked; keeping the previous state published, no more recompiles");
                    return;
                }
            };
            let now = tokio::time::Instant::now();
            let deadline = index.read(|i| i.next_grace_deadline(now, grace));
            let grace_passed = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Stopping wins over a change that arrived with it (an agent's
            // stream ending in the drain): a stopping hub compiles nothing.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = grace_passed => continue,
                () = index.changed() => {}
            }
            let started = tokio::time::Instant::now();
            // Leading edge: quiet since the change that led to the last
            // compile, so this one is not (yet) a burst.
            let leading = started >= last_change + debounce.quiet;
            last_change = started;
            if leading {
                continue;
            }
            loop {
                let deadline = (started + debounce.max_delay)
                    .min(tokio::time::Instant::now() + debounce.quiet);
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = index.changed() => {
                        last_change = tokio::time::Instant::now();
                        if last_change >= started + debounce.max_delay { break; }
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_core::Problem;
    use raven_core::topology::{Resource, ResourceBody, Settings};

    fn settings(port: u16) -> Resource {
        Resource::new(ResourceBody::Settings(Settings {
            enable_l7_proxy: true,
            vxlan_port: port,
            ..raven_model::fixtures::settings()
        }))
    }

    fn topology(entries: &[(&str, u16)]) -> Topology {
        let mut t = Topology::default();
        for (name, port) in entries {
            let name = ResourceName::parse(name).unwrap_or_else(|| panic!("{name}"));
            t.resources.insert(name, settings(*port));
        }
        t
    }

    /// `n1`, a ready member of `gw-a` at `ip`.
    fn member(ip: &str) -> raven_core::ClusterNode {
        raven_core::ClusterNode {
            name: raven_core::NodeName::new("n1").expect("name"),
            gateway_label: Some("gw-a".into()),
            ready: true,
            internal_ip: ip.parse().ok(),
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
        }
    }

    /// A ready member `n1` of `gw-a`, whose only endpoint is a tunnel on
    /// `n1`, with the tunnel switched on: `gw-a` elects `n1`.
    fn one_gateway_cluster(index: &crate::index::IndexHandle, resource_version: u64) {
        one_gateway_cluster_unsynced(index, resource_version);
        mark_all_synced(index);
    }

    fn mark_all_synced(index: &crate::index::IndexHandle) {
        index.update(|i| {
            for k in crate::index::Kind::SOURCES {
                i.mark_synced(k);
            }
        });
    }

    /// [`one_gateway_cluster`]'s objects, no source marked synced yet.
    fn one_gateway_cluster_unsynced(index: &crate::index::IndexHandle, resource_version: u64) {
        use raven_core::api::v1beta1::{Endpoint, Gateway, GatewaySpec, TunnelConfiguration};
        let mut gw = Gateway::new(
            "gw-a",
            GatewaySpec {
                tunnel_config: TunnelConfiguration { replicas: 1 },
                endpoints: vec![Endpoint {
                    node_name: "n1".into(),
                    type_: "tunnel".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        gw.metadata.uid = Some("u1".into());
        gw.metadata.resource_version = Some(resource_version.to_string());
        index.update(|i| {
            i.apply_gateway(gw);
            i.reset_cluster_nodes([member("10.0.0.1")]);
            i.set_raven_config(raven_core::RavenConfig {
                present: true,
                enable_l3_tunnel: true,
                ..Default::default()
            });
        });
    }

    fn stored_pipeline(
        dir: &std::path::Path,
        index: &crate::index::IndexHandle,
    ) -> (Pipeline, PublishedRx) {
        Pipeline::new(
            index.clone(),
            crate::revision::Revisions::open(dir, None).expect("revisions"),
            Debounce::default(),
            std::time::Duration::from_secs(3),
        )
    }

    /// The stored sequence of a hub that published the one-gateway cluster
    /// once, as a restarted hub finds it.
    fn stored_after_one_compile(dir: &std::path::Path) -> crate::revision::RevisionState {
        let index = crate::index::IndexHandle::default();
        one_gateway_cluster(&index, 10);
        let (mut pipeline, published) = stored_pipeline(dir, &index);
        assert!(pipeline.recompile().expect("compiled"));
        assert!(published.borrow().ready);
        pipeline.revisions.current().clone()
    }

    #[test]
    fn a_recompile_of_an_unsynced_index_leaves_the_stored_revision_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stored = stored_after_one_compile(dir.path());
        assert!(stored.revision > 0);
        {
            // A restarted hub whose sources have not all synced: the
            // gateway is there, its nodes and the config not yet listed.
            let index = crate::index::IndexHandle::default();
            index.update(|i| {
                i.mark_synced(crate::index::Kind::Gateway);
            });
            let (mut pipeline, published) = stored_pipeline(dir.path(), &index);
            pipeline.recompile().expect("compiled");
            let p = published.borrow().clone();
            assert!(!p.ready, "nothing is served before every source synced");
            assert_eq!(
                (p.epoch.as_str(), p.revision),
                (stored.epoch.as_str(), stored.revision)
            );
            assert_eq!(pipeline.revisions.current(), &stored, "in memory");
        }
        let reopened = crate::revision::Revisions::open(dir.path(), None).expect("reopen");
        assert_eq!(reopened.current(), &stored, "on disk");
    }

    #[test]
    fn after_sync_the_first_compile_of_unchanged_content_keeps_the_stored_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stored = stored_after_one_compile(dir.path());
        let index = crate::index::IndexHandle::default();
        let (mut pipeline, published) = stored_pipeline(dir.path(), &index);
        let mut sessions = pipeline.sessions();
        sessions.borrow_and_update();
        // Compiles while the sources come in, each before the sync.
        pipeline.recompile().expect("compiled");
        one_gateway_cluster_unsynced(&index, 10);
        pipeline.recompile().expect("compiled");
        assert!(!published.borrow().ready);
        assert!(
            !sessions.has_changed().expect("open"),
            "an unready state wakes no session"
        );
        mark_all_synced(&index);
        assert!(pipeline.recompile().expect("compiled"));
        let p = published.borrow().clone();
        assert!(p.ready);
        assert_eq!(
            (p.epoch.as_str(), p.revision),
            (stored.epoch.as_str(), stored.revision)
        );
        assert!(
            p.deltas.is_empty(),
            "no delta from the unready state: a resuming agent is planned in full or is in sync"
        );
        assert!(
            sessions.has_changed().expect("open"),
            "readiness wakes the sessions"
        );
        drop(pipeline);
        let reopened = crate::revision::Revisions::open(dir.path(), None).expect("reopen");
        assert_eq!(reopened.current(), &stored);
    }

    #[test]
    fn a_status_echo_publishes_no_new_revision_and_wakes_no_session() {
        let index = crate::index::IndexHandle::default();
        one_gateway_cluster(&index, 10);
        let (mut pipeline, published) = Pipeline::new(
            index.clone(),
            crate::revision::Revisions::in_memory(),
            Debounce::default(),
            std::time::Duration::from_secs(3),
        );
        let mut sessions = pipeline.sessions();
        assert!(pipeline.recompile().expect("compiled"));
        let first = published.borrow().clone();
        let name = GatewayName::new("gw-a").expect("name");
        let elected = first.gateways[&name].status.clone();
        assert_eq!(elected.active_endpoints[0].node_name, "n1");
        assert!(
            sessions.has_changed().expect("open"),
            "the first state wakes sessions"
        );
        sessions.borrow_and_update();

        // The leader wrote the election (with a condition) and the watch
        // shows it back: a newer resourceVersion, the status as written.
        let mut echoed = first.gateways[&name].gateway.clone();
        let mut status = elected.clone();
        status.conditions = vec![raven_core::api::v1beta1::GatewayCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }];
        echoed.status = Some(status.clone());
        echoed.metadata.resource_version = Some("11".into());
        index.update(|i| i.apply_gateway(echoed));
        pipeline.recompile().expect("compiled");
        let after = published.borrow().clone();
        assert_eq!(
            (after.epoch.as_str(), after.revision),
            (first.epoch.as_str(), first.revision),
            "a status echo is no new revision"
        );
        assert_eq!(after.topology.resources, first.topology.resources);
        assert!(
            !sessions.has_changed().expect("open"),
            "a status echo must not wake the sessions"
        );
        // The status writer still sees the echo (it stops waiting for it).
        assert_eq!(after.observed[&name].resource_version, 11);
        assert_eq!(after.observed[&name].status, Some(status));

        // A change agents receive wakes them.
        index.update(|i| i.reset_cluster_nodes([member("10.0.0.2")]));
        pipeline.recompile().expect("compiled");
        assert!(published.borrow().revision > first.revision);
        assert!(
            sessions.has_changed().expect("open"),
            "a new revision wakes sessions"
        );
    }

    /// An index whose sources have all synced (an empty cluster).
    fn synced_index() -> crate::index::IndexHandle {
        let index = crate::index::IndexHandle::default();
        index.update(|i| {
            for k in [
                crate::index::Kind::Gateway,
                crate::index::Kind::Node,
                crate::index::Kind::Config,
            ] {
                i.mark_synced(k);
            }
        });
        index
    }

    /// A running pipeline (debounce `quiet`, at most 3 × `quiet`) over an
    /// empty, synced cluster whose `raven-cfg` the test toggles, quiet for
    /// twice `quiet` since its first publish; returns the index, the
    /// published state and the revision of the first publish.
    async fn running(quiet: std::time::Duration) -> (crate::index::IndexHandle, PublishedRx, u64) {
        let debounce = Debounce {
            quiet,
            max_delay: quiet * 3,
        };
        let index = synced_index();
        let (p, mut rx) = Pipeline::new(
            index.clone(),
            crate::revision::Revisions::in_memory(),
            debounce,
            std::time::Duration::from_secs(3600),
        );
        tokio::spawn(p.run(tokio_util::sync::CancellationToken::new()));
        rx.wait_for(|p| p.ready).await.expect("published");
        let first = rx.borrow_and_update().revision;
        tokio::time::sleep(quiet * 2).await;
        (index, rx, first)
    }

    fn set_config(index: &crate::index::IndexHandle, l3: bool, l7: bool) {
        index.update(|i| {
            i.set_raven_config(raven_core::RavenConfig {
                present: true,
                enable_l3_tunnel: l3,
                enable_l7_proxy: l7,
                ..Default::default()
            })
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_change_after_quiet_compiles_at_once_without_waiting_for_the_debounce() {
        let quiet = std::time::Duration::from_secs(10);
        let (index, mut rx, first) = running(quiet).await;
        let at = tokio::time::Instant::now();
        set_config(&index, true, true);
        rx.wait_for(|p| p.revision > first)
            .await
            .expect("published");
        // Time is paused (it moves only when every task waits on a timer),
        // so this measures the pipeline's own waiting, not the machine.
        assert!(at.elapsed() < quiet, "waited {:?}", at.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_after_a_leading_compile_is_coalesced_into_one_trailing_compile() {
        let quiet = std::time::Duration::from_secs(10);
        let (index, mut rx, first) = running(quiet).await;
        set_config(&index, true, true);
        rx.wait_for(|p| p.revision > first).await.expect("leading");
        assert_eq!(rx.borrow_and_update().revision, first + 1);
        // Two more changes within `quiet`: one compile after the burst.
        tokio::time::sleep(quiet / 10).await;
        let burst = tokio::time::Instant::now();
        set_config(&index, true, false);
        tokio::time::sleep(quiet / 10).await;
        set_config(&index, false, false);
        rx.changed().await.expect("trailing");
        let p = rx.borrow_and_update().clone();
        let settings = p.topology.resources.values().find_map(|r| match &r.body {
            raven_core::topology::ResourceBody::Settings(s) => Some(s.clone()),
            _ => None,
        });
        let settings = settings.expect("a settings resource");
        assert!(!settings.enable_l3_tunnel && !settings.enable_l7_proxy);
        assert!(
            burst.elapsed() >= quiet,
            "compiled after {:?}",
            burst.elapsed()
        );
        // Both changes in one compile: one revision, not two.
        assert_eq!(p.revision, first + 2);
    }

    /// A change that lands as the hub stops (an agent's stream ending
    /// during the drain withdraws its claim) is not compiled: a stopping
    /// hub neither publishes nor persists a revision for it. Each round is
    /// a race between the change and the stop, so it runs many rounds.
    #[tokio::test(start_paused = true)]
    async fn a_change_that_arrives_with_the_stop_is_not_compiled_nor_published() {
        let quiet = std::time::Duration::from_secs(10);
        for round in 0..32 {
            let index = synced_index();
            let (p, mut rx) = Pipeline::new(
                index.clone(),
                crate::revision::Revisions::in_memory(),
                Debounce {
                    quiet,
                    max_delay: quiet * 3,
                },
                std::time::Duration::from_secs(3600),
            );
            let shutdown = tokio_util::sync::CancellationToken::new();
            let running = tokio::spawn(p.run(shutdown.clone()));
            rx.wait_for(|p| p.ready).await.expect("published");
            let first = rx.borrow_and_update().revision;
            // Quiet since the start: a change now would compile at once.
            tokio::time::sleep(quiet * 2).await;
            set_config(&index, true, true);
            shutdown.cancel();
            running.await.expect("the pipeline ends");
            assert_eq!(
                rx.borrow().revision,
                first,
                "round {round}: the stopping pipeline compiled and published a change"
            );
        }
    }

    #[test]
    fn encoding_keeps_the_bytes_of_unchanged_resources_and_equals_a_fresh_encoding() {
        let fresh = |t: &Topology| -> BTreeMap<ResourceName, EncodedResource> {
            t.resources
                .iter()
                .map(|(n, r)| (n.clone(), EncodedResource::new(n, r)))
                .collect()
        };
        let before = topology(&[("gateway/a", 1), ("gateway/b", 1), ("gateway/d", 1)]);
        let prev = Published {
            encoded: fresh(&before),
            topology: before,
            ..Default::default()
        };
        let after = topology(&[("gateway/a", 1), ("gateway/b", 2), ("gateway/c", 1)]);
        let encoded = encode(&prev, &after);
        assert_eq!(encoded, fresh(&after));
        let a = ResourceName::parse("gateway/a").expect("name");
        assert_eq!(
            encoded[&a].as_bytes().as_ptr(),
            prev.encoded[&a].as_bytes().as_ptr(),
            "an unchanged resource shares its bytes"
        );
        assert_eq!(encode(&Published::default(), &after), fresh(&after));
    }

    #[test]
    fn a_delta_names_what_changed_appeared_or_disappeared_and_nothing_else() {
        let before = topology(&[("settings", 1), ("gateway/a", 1), ("gateway/b", 1)]);
        let after = topology(&[("settings", 1), ("gateway/a", 2), ("gateway/c", 1)]);
        let d = Delta::between(7, &before, &after);
        assert_eq!(d.from, 7);
        let names: Vec<&str> = d.names.iter().map(ResourceName::as_str).collect();
        assert_eq!(names, ["gateway/a", "gateway/b", "gateway/c"]);
        assert!(Delta::between(7, &after, &after).names.is_empty());
    }

    fn resource_name(s: &str) -> ResourceName {
        ResourceName::parse(s).unwrap_or_else(|| panic!("{s}"))
    }

    /// A kept delta from revision `from` that changed `names`.
    fn delta(from: u64, names: &[&str]) -> Arc<Delta> {
        Arc::new(Delta {
            from,
            names: names.iter().map(|n| resource_name(n)).collect(),
        })
    }

    #[test]
    fn names_changed_since_any_kept_revision_are_the_union_of_the_deltas_after_it() {
        let p = Published {
            revision: 13,
            deltas: vec![
                delta(10, &["gateway/a"]),
                delta(11, &["gateway/b", "peer/x"]),
                delta(12, &["gateway/a"]),
            ],
            ..Default::default()
        };
        let since = |r: u64| {
            p.changed_since(r)
                .map(|n| n.into_iter().map(ResourceName::as_str).collect::<Vec<_>>())
        };
        assert_eq!(since(12), Some(vec!["gateway/a"]));
        assert_eq!(since(11), Some(vec!["gateway/a", "gateway/b", "peer/x"]));
        assert_eq!(since(10), Some(vec!["gateway/a", "gateway/b", "peer/x"]));
        // Older than the kept history: a full plan.
        assert_eq!(since(9), None);
    }

    #[test]
    fn the_names_read_from_the_last_delta_are_the_names_changed_since_for_every_revision() {
        let p = Published {
            revision: 13,
            deltas: vec![
                delta(10, &["gateway/a", "node/n1"]),
                delta(11, &["gateway/b", "peer/x"]),
                delta(12, &["gateway/a", "prefixes/b", "settings"]),
            ],
            ..Default::default()
        };
        let probes = [
            "gateway/a",
            "gateway/b",
            "node/n1",
            "peer/x",
            "prefixes/b",
            "settings",
            "gateway/z",
        ];
        for since in 8..=13 {
            let general = p.changed_since(since);
            let read = p.changed_names_since(since);
            assert_eq!(
                read.as_ref().map(|r| r.iter().collect::<Vec<_>>()),
                general
                    .as_ref()
                    .map(|g| g.iter().copied().collect::<Vec<_>>()),
                "names since {since}"
            );
            for probe in probes {
                let n = resource_name(probe);
                assert_eq!(
                    read.as_ref().map(|r| r.contains(&n)),
                    general.as_ref().map(|g| g.contains(&n)),
                    "{probe} since {since}"
                );
            }
        }
        assert!(matches!(
            p.changed_names_since(12),
            Some(ChangedNames::One(_))
        ));
    }

    /// Runs a pipeline with the default debounce on paused time, making a
    /// change agents see at each of `changes` (ms after the start, numbered
    /// from 1), and returns when (ms) each state was published and which
    /// change it carried, until `until` ms.
    async fn publishes(changes: &[u64], until: u64) -> Vec<(u64, u32)> {
        use tokio::time::{Duration, Instant, sleep_until};
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let index = crate::index::IndexHandle::default();
        let (pipeline, mut rx) = Pipeline::new(
            index.clone(),
            crate::revision::Revisions::in_memory(),
            Debounce::default(),
            Duration::from_secs(5),
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn(pipeline.run(shutdown.clone()));
        let changes = changes.to_vec();
        let writer = index.clone();
        let changing = tokio::spawn(async move {
            for (n, at) in (1u32..).zip(changes) {
                sleep_until(t0 + ms(at)).await;
                writer.update(|i| {
                    i.set_source_problems(vec![Problem::warning(
                        "Test/debounce",
                        "",
                        n.to_string(),
                        "a change",
                    )])
                });
            }
        });
        let carried = |p: &Published| {
            p.topology
                .problems
                .iter()
                .find(|p| p.object == "Test/debounce")
                .and_then(|p| p.value.parse().ok())
                .unwrap_or(0)
        };
        let mut seen = vec![(0, carried(&rx.borrow_and_update()))];
        let end = sleep_until(t0 + ms(until));
        tokio::pin!(end);
        loop {
            tokio::select! {
                () = &mut end => break,
                changed = rx.changed() => {
                    changed.expect("pipeline running");
                    let at = (Instant::now() - t0).as_millis() as u64;
                    seen.push((at, carried(&rx.borrow_and_update())));
                }
            }
        }
        shutdown.cancel();
        running.await.expect("pipeline ends on shutdown");
        changing.await.expect("changes made");
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_compiled_once_a_quiet_period_after_its_last_change() {
        // The default debounce: 100 ms quiet, at most 1 s.
        let seen = publishes(&[1000, 1050, 1100, 1150], 5000).await;
        // (0, 0) is the initial state, then (0, 0) again: the first compile.
        // The first change after quiet is compiled at once (leading edge);
        // the three that follow within 100 ms are one burst, compiled once
        // 100 ms after its last change.
        assert_eq!(seen, [(0, 0), (0, 0), (1000, 1), (1250, 4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_that_never_pause_are_still_compiled_every_max_delay() {
        // A change every 30 ms from 1010 ms to 3500 ms (84 changes).
        let changes: Vec<u64> = (0..84).map(|k| 1010 + 30 * k).collect();
        let seen = publishes(&changes, 6000).await;
        // The first change at once (leading edge); then 1 s after the first
        // change of each burst, with the latest change (the burst starts
        // with the 2nd at 1040 ms; the 35th was made at 2030 ms, the 69th
        // at 3050 ms); the last burst goes quiet 100 ms after the 84th.
        assert_eq!(
            seen,
            [
                (0, 0),
                (0, 0),
                (1010, 1),
                (2040, 35),
                (3060, 69),
                (3600, 84)
            ]
        );
    }

    /// A compiled gateway `gw-{g}` whose status lists one node per subnet
    /// `10.{c}.0.0/16`.
    fn compiled_with_subnets(g: u8, subnets: &[u8]) -> Arc<CompiledGateway> {
        let name = GatewayName::new(format!("gw-{g}")).expect("name");
        let status = raven_core::api::v1beta1::GatewayStatus {
            nodes: subnets
                .iter()
                .map(|c| raven_core::api::v1beta1::NodeInfo {
                    node_name: format!("n-{g}-{c}"),
                    private_ip: "192.0.2.1".into(),
                    subnets: vec![format!("10.{c}.0.0/16")],
                })
                .collect(),
            ..Default::default()
        };
        Arc::new(CompiledGateway {
            gateway: raven_core::api::v1beta1::Gateway::new(name.as_str(), Default::default()),
            name,
            status,
        })
    }

    proptest::proptest! {
        /// The held subnets kept across any sequence of published states
        /// (gateways added, removed, recompiled with new or equal statuses,
        /// reused unchanged; ranges served by several gateways at once)
        /// equal the ones gathered from every status of the same state.
        #[test]
        fn held_subnets_kept_as_gateways_change_equal_the_ones_gathered_from_every_status(
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..6, proptest::option::of(proptest::collection::vec(0u8..8, 0..4)), proptest::bool::ANY), 0..6),
                1..10,
            )
        ) {
            let mut kept = HeldSubnets::default();
            let mut gateways: BTreeMap<GatewayName, Arc<CompiledGateway>> = BTreeMap::new();
            for step in steps {
                for (g, subnets, copy) in step {
                    let name = GatewayName::new(format!("gw-{g}")).expect("name");
                    match subnets {
                        None => { gateways.remove(&name); }
                        // An equal status in a new allocation (a recompile
                        // that changed nothing the status shows).
                        Some(_) if copy && gateways.contains_key(&name) => {
                            let same = CompiledGateway::clone(&gateways[&name]);
                            gateways.insert(name, Arc::new(same));
                        }
                        Some(nets) => { gateways.insert(name, compiled_with_subnets(g, &nets)); }
                    }
                }
                let held = kept.update(&gateways);
                proptest::prop_assert_eq!(&*held, &held_from_scratch(&gateways));
            }
        }

        /// The one pass over the last and the new resources gives every
        /// resource's fresh encoding and exactly the names
        /// [`Delta::between`] gives, whichever resources were reused by
        /// pointer, changed, added or removed.
        #[test]
        fn one_pass_encodes_like_a_fresh_encoding_and_names_what_delta_between_names(
            before in proptest::collection::btree_map(0u8..12, 0u16..3, 0..12),
            after in proptest::collection::btree_map(0u8..12, (0u16..3, proptest::bool::ANY), 0..12),
        ) {
            let name = |k: u8| ResourceName::parse(&format!("gateway/g{k}")).expect("name");
            let old: Topology = Topology {
                resources: before.iter().map(|(k, port)| (name(*k), settings(*port))).collect(),
                ..Default::default()
            };
            // A resource the compiler reused is the last one's allocation.
            let new = Topology {
                resources: after
                    .iter()
                    .map(|(k, (port, reuse))| {
                        let r = match old.resources.get(&name(*k)) {
                            Some(o) if *reuse => o.clone(),
                            _ => settings(*port),
                        };
                        (name(*k), r)
                    })
                    .collect(),
                ..Default::default()
            };
            let fresh = |t: &Topology| -> BTreeMap<ResourceName, EncodedResource> {
                t.resources.iter().map(|(n, r)| (n.clone(), EncodedResource::new(n, r))).collect()
            };
            for prev in [
                Published { encoded: fresh(&old), topology: old.clone(), ..Default::default() },
                // Without the last encoding (the first state).
                Published { topology: old.clone(), ..Default::default() },
            ] {
                let (encoded, changed) = encode_and_diff(&prev, &new);
                proptest::prop_assert_eq!(&encoded, &fresh(&new));
                proptest::prop_assert_eq!(&changed, &Delta::between(0, &old, &new).names);
            }
        }
    }
}
