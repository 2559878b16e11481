//! The agent's main loop (DESIGN §4):
//!
//! 1. open the cache and program the kernel from it — before any network call;
//! 2. dial the hub in the background (the dataplane never waits for it);
//! 3. reconcile whenever the cached state changes, and every `resync` to
//!    repair drift; report each result to the hub.
//!
//! Stopping the agent leaves the dataplane as it is; the next agent adopts it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use raven_model::{GatewayName, NodeName};
use raven_proto::v1;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CachedState};
use crate::client::{self, AppliedReport, ClientConfig, Links};
use crate::dataplane;
use crate::failover;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeName,
    pub data_dir: PathBuf,
    /// `None`: run from the cache only.
    pub client: Option<ClientConfig>,
    /// Program the kernel (`false`: observe and plan only).
    pub apply: bool,
    /// Period of drift repair.
    pub resync: Duration,
    pub cache_max_bytes: u64,
    pub http_addr: Option<std::net::SocketAddr>,
    /// Name of the gateway tunnel device (unique per host for userspace
    /// WireGuard, whose control socket lives in /var/run/wireguard).
    pub tunnel_dev: String,
    /// Which WireGuard to run (`--wireguard`).
    pub wireguard: crate::tunnel::backend::WgMode,
    /// IPsec instead of WireGuard (`--vpn`, `--ipsec-vici`).
    pub ipsec: crate::ipsec::agent::IpsecArgs,
    /// Who runs wireguard-go (`--wireguard-go`).
    pub wireguard_go: crate::tunnel::backend::WireguardGo,
    /// Local failover: period of the probes of the gateway candidates.
    pub probe_interval: Duration,
    /// Local failover: missed probes in a row that make a candidate dead.
    pub probe_failures: u32,
    /// The hub counts as unreachable after this long without a message.
    pub hub_silence: Duration,
}

/// Health of the agent, for `/readyz` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Last reconcile succeeded.
    pub dataplane_ok: Arc<std::sync::atomic::AtomicBool>,
    pub last_error: Arc<std::sync::Mutex<Option<String>>>,
    pub revision: Arc<AtomicU64>,
    pub last_contact_ms: Arc<AtomicU64>,
    /// A hub session is open (see [`Links::hub_session`]).
    pub hub_session: Arc<std::sync::atomic::AtomicBool>,
    pub ops_applied: Arc<AtomicU64>,
    pub reconciles: Arc<AtomicU64>,
    /// Tunnel peers as last read from the device (gateways only).
    pub peers: Arc<std::sync::Mutex<Vec<v1::PeerTunnelState>>>,
    /// Local failover in effect: gateway → node.
    pub local_failover: Arc<std::sync::Mutex<BTreeMap<GatewayName, NodeName>>>,
    /// Why the agent holds the kernel state as found, changing nothing
    /// (see [`crate::hold`]); `None` when it reconciles.
    pub holding: Arc<std::sync::Mutex<Option<String>>>,
}

impl Health {
    /// Whether the agent holds the kernel state as found.
    pub fn is_holding(&self) -> bool {
        self.holding.lock().is_ok_and(|h| h.is_some())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("binding the HTTP endpoint {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the cache task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
    #[error(transparent)]
    Ipsec(#[from] crate::ipsec::agent::IpsecError),
}

/// Probes the gateway candidates of this node's domain every `every`,
/// reports the ones it finds dead to the hub (`Report.dead_candidates`), and
/// wakes the reconcile loop when the evidence changes a decision (a
/// candidate died or came back, the hub went silent, a standby or direct
/// peer started or stopped handshaking).
async fn probe_loop(
    ctx: Arc<Reconciler>,
    state: watch::Receiver<Arc<CachedState>>,
    every: Duration,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut warned = false;
    // One round per period, however long a round waits for answers (a dead
    // candidate costs the whole timeout): `fail_after` misses take
    // `fail_after` periods, not twice that.
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let timeout = (every * 3 / 4).min(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cached = state.borrow().clone();
        let inputs = dataplane::inputs_from(&ctx.node, &cached);
        let targets = failover::probe_targets(&inputs);
        match failover::probe(targets.clone(), timeout).await {
            Ok(answered) => {
                warned = false;
                let dead = ctx.failover.lock().ok().map(|mut st| {
                    st.probes.record(&targets, &answered);
                    failover::dead_candidates(&inputs, &st.probes)
                });
                if let Some(dead) = dead {
                    let dead: Vec<String> = dead.iter().map(ToString::to_string).collect();
                    ctx.report.send_if_modified(|r| {
                        let changed = r.dead_candidates != dead;
                        if changed {
                            tracing::info!(
                                ?dead,
                                "gateway candidates found dead by the probes changed"
                            );
                        }
                        r.dead_candidates = dead;
                        changed
                    });
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot probe the gateway candidates; local failover is off");
            }
            Err(_) => {}
        }
        if ctx.decisions_changed(&cached).await {
            wake.notify_one();
        }
    }
}

/// Every half second, re-adds once the tunnel peers this node dials that
/// never completed a handshake (see [`crate::tunnel::Nudges`]).
async fn nudge_loop(ctx: Arc<Reconciler>, shutdown: CancellationToken) {
    let mut nudges = [
        crate::tunnel::Nudges::default(),
        crate::tunnel::Nudges::default(),
    ];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            // Holding the kernel state: not even a peer re-added.
            () = tokio::time::sleep(Duration::from_millis(500)) => if ctx.health.is_holding() { continue },
        }
        for (dev, nudges) in [&ctx.tunnel, &ctx.direct].into_iter().zip(&mut nudges) {
            match dev.nudge(nudges).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(dev = %dev.dev, peers = n, "re-added peers that never handshook")
                }
                Err(e) => tracing::warn!(dev = %dev.dev, error = %e, "could not re-add a peer"),
            }
        }
    }
}

/// Runs the agent until `shutdown`.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (node, dir, max) = (cfg.node.clone(), cfg.data_dir.clone(), cfg.cache_max_bytes);
    let (cache, state) =
        tokio::task::spawn_blocking(move || Cache::open(&dir, &node, max)).await??;
    tracing::info!(node = %cfg.node, epoch = %state.epoch, revision = state.revision, resources = state.resources.len(), "cache loaded");
    let mut holding = crate::hold::at_start(&state, cache.recovered());
    let health = Health::default();
    health.revision.store(state.revision, Ordering::Relaxed);

    let (state_tx, mut state_rx) = watch::channel(Arc::new(state));
    let (applied_tx, applied_rx) = watch::channel(None::<AppliedReport>);
    // Only the public key leaves the node.
    let backend = crate::tunnel::backend::detect(cfg.wireguard, cfg.apply).await?;
    tracing::info!(%backend, mode = %cfg.wireguard, "WireGuard");
    let tunnel = crate::tunnel::Tunnel::new(cfg.tunnel_dev.clone(), &cfg.data_dir, backend)?
        .with_wireguard_go(cfg.wireguard_go);
    let direct = tunnel.direct()?;
    let ipsec = crate::ipsec::agent::IpsecAgent::start(&cfg.ipsec, &cfg.data_dir)?;
    let (report_tx, report_rx) = watch::channel(v1::Report {
        wireguard_public_key: Some(tunnel.keys.public_base64()),
        direct_public_key: Some(direct.keys.public_base64()),
        ipsec_public_key: ipsec.as_ref().map(|i| i.public_base64().to_owned()),
        ..Default::default()
    });

    let dp = dataplane::Kernel::new(cfg.apply);
    let ctx = Arc::new(Reconciler {
        dp,
        tunnel,
        direct,
        ipsec,
        node: cfg.node.clone(),
        health: health.clone(),
        report: report_tx,
        failover: std::sync::Mutex::new(FailoverState::new(cfg.probe_failures)),
        hub_silence: cfg.hub_silence,
    });
    // 1. Program the kernel from the cache before dialling anyone — or,
    //    without a usable cache, hold what the kernel has.
    let first = state_rx.borrow_and_update().clone();
    match &holding {
        Some(reason) => ctx.hold(reason).await,
        None => {
            applied_tx.send_replace(Some(ctx.reconcile_once(&first).await));
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Http { addr, source })?;
        tasks.spawn(crate::http::serve(
            listener,
            health.clone(),
            shutdown.clone(),
        ));
    }
    // 2. The hub, in the background.
    if let Some(client_cfg) = cfg.client.clone() {
        let links = Links {
            cache,
            state: state_tx,
            applied: applied_rx,
            report: report_rx,
            last_contact_ms: health.last_contact_ms.clone(),
            hub_session: health.hub_session.clone(),
        };
        tasks.spawn(client::run(client_cfg, links, shutdown.clone()));
    }
    // 3. Probes for local failover; they wake the loop below when the
    //    evidence changes a decision.
    let wake = Arc::new(tokio::sync::Notify::new());
    if cfg.apply {
        tasks.spawn(probe_loop(
            ctx.clone(),
            state_rx.clone(),
            cfg.probe_interval,
            wake.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(nudge_loop(ctx.clone(), shutdown.clone()));
    }
    // 4. Reconcile on change, on new evidence and periodically.
    let mut ticker = tokio::time::interval(cfg.resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = state_rx.changed() => if changed.is_err() { shutdown.cancelled().await; break },
            () = wake.notified() => {}
            _ = ticker.tick() => {}
        }
        let state = state_rx.borrow_and_update().clone();
        if holding.is_some() {
            if !crate::hold::ends_with(&state) {
                continue;
            }
            holding = None;
            ctx.release(&state);
        }
        let report = ctx.reconcile_once(&state).await;
        applied_tx.send_replace(Some(report));
    }
    tracing::info!("agent stopping; the dataplane stays as it is");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Holding the kernel state (see [`crate::hold`]).
impl Reconciler {
    /// Adopts the kernel state as it is and changes nothing (see
    /// [`crate::hold`]): reports what it holds and why.
    async fn hold(&self, reason: &crate::hold::HoldReason) {
        // A dry run observes and writes nothing; its summary is what the
        // kernel holds.
        let nothing = dataplane::inputs_from(&self.node, &CachedState::default());
        let held = match dataplane::Kernel::dry_run().reconcile(&nothing).await {
            Ok(r) => format!(
                "{} routes, {} rules, raven0 {}",
                r.summary.routes,
                r.summary.rules,
                if r.summary.links > 0 {
                    "present"
                } else {
                    "absent"
                }
            ),
            Err(e) => format!("unobservable: {e}"),
        };
        let tunnel = if self.tunnel.device_state().await.is_some() {
            "present"
        } else {
            "absent"
        };
        tracing::warn!(%reason, kernel = %held, tunnel_device = %tunnel, "holding the kernel state as found; nothing changes until a complete snapshot from a hub is persisted");
        if let Ok(mut h) = self.health.holding.lock() {
            *h = Some(format!(
                "{reason}; holding the kernel state as found ({held}) until a complete snapshot from a hub arrives"
            ));
        }
    }

    /// Ends a hold: `state` is a complete snapshot, persisted.
    fn release(&self, state: &CachedState) {
        tracing::info!(epoch = %state.epoch, revision = state.revision, resources = state.resources.len(), "complete snapshot persisted; no longer holding the kernel state, reconciling");
        if let Ok(mut h) = self.health.holding.lock() {
            *h = None;
        }
    }
}

/// Evidence and decisions of local failover, kept across reconciles.
#[derive(Debug)]
pub struct FailoverState {
    pub probes: failover::ProbeBook,
    pub activity: failover::PeerActivity,
    /// The same for the direct-path device.
    pub direct_activity: failover::PeerActivity,
    /// Gateway → node, where this node overrides the hub's choice.
    pub overrides: BTreeMap<GatewayName, NodeName>,
    /// NATed peers reached directly (not through the relay).
    pub direct: BTreeSet<NodeName>,
}

impl FailoverState {
    pub fn new(probe_failures: u32) -> Self {
        Self {
            probes: failover::ProbeBook::new(probe_failures),
            activity: failover::PeerActivity::default(),
            direct_activity: failover::PeerActivity::default(),
            overrides: BTreeMap::new(),
            direct: BTreeSet::new(),
        }
    }
}

/// What one reconcile pass needs.
#[derive(Debug)]
pub struct Reconciler {
    pub dp: dataplane::Kernel,
    pub tunnel: crate::tunnel::Tunnel,
    /// The direct-path device (NATed gateways only run it).
    pub direct: crate::tunnel::Tunnel,
    /// IPsec, when `--vpn` allows it; it replaces WireGuard between
    /// gateways while selected (see [`crate::ipsec::agent`]).
    pub ipsec: Option<crate::ipsec::agent::IpsecAgent>,
    pub node: NodeName,
    pub health: Health,
    pub report: watch::Sender<v1::Report>,
    pub failover: std::sync::Mutex<FailoverState>,
    pub hub_silence: Duration,
}

/// Brings a tunnel device up (adopting it when it exists) and applies `spec`
/// to it as a minimal diff.
async fn apply_tunnel(
    tunnel: &crate::tunnel::Tunnel,
    spec: &crate::tunnel::TunnelSpec,
    mtu: u32,
    address: Option<std::net::Ipv4Addr>,
) -> Result<(), crate::tunnel::TunnelError> {
    for w in &spec.warnings {
        tracing::warn!(warning = %w, dev = %tunnel.dev, "tunnel");
    }
    tunnel.ensure_device(mtu, address).await?;
    if tunnel.apply(spec).await? > 0 {
        tracing::info!(dev = %tunnel.dev, peers = spec.peers.len(), "tunnel peers updated");
    }
    Ok(())
}

/// MTU of the link that holds the node's private address (1500 when it
/// cannot be told).
async fn underlay_mtu(inputs: &dataplane::NodeInputs) -> u32 {
    let Some(ip) = inputs.me.as_ref().and_then(|m| m.private_ip) else {
        return 1500;
    };
    let Ok(h) = dataplane::netlink::connect() else {
        return 1500;
    };
    match dataplane::netlink::underlay_mtu(&h, ip).await {
        Ok(Some(mtu)) => mtu,
        Ok(None) => 1500,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the underlay MTU; assuming 1500");
            1500
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Reconciler {
    /// A hub session is open and the hub spoke within `hub_silence`.
    fn hub_reachable(&self) -> bool {
        if !self.health.hub_session.load(Ordering::Relaxed) {
            return false;
        }
        let last = self.health.last_contact_ms.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        last != 0 && now.saturating_sub(last) < self.hub_silence.as_millis() as u64
    }

    /// Local failover and path decisions from the current evidence: the
    /// overrides of the hub's gateway choices and the NATed peers reached
    /// directly. Records them when `commit`.
    fn decide(
        &self,
        inputs: &dataplane::NodeInputs,
        peers: &[raven_model::topology::PeerInfo],
        device: Option<&crate::tunnel::uapi::DeviceState>,
        direct_device: Option<&crate::tunnel::uapi::DeviceState>,
        commit: bool,
    ) -> (BTreeMap<GatewayName, NodeName>, BTreeSet<NodeName>) {
        let now = now_unix();
        let hub_reachable = self.hub_reachable();
        let Ok(mut st) = self.failover.lock() else {
            return (BTreeMap::new(), BTreeSet::new());
        };
        let mut seen = BTreeMap::new();
        let mut direct = BTreeSet::new();
        // Direct paths are between two NATed gateways only.
        let natted = inputs.me.as_ref().is_some_and(|me| {
            inputs
                .gateways
                .iter()
                .any(|g| Some(&g.name) == me.gateway.as_ref() && g.under_nat)
        });
        if let Some(have) = device {
            st.activity.observe(have, now);
            for p in peers {
                let Some(key) = p
                    .wireguard_public_key
                    .as_deref()
                    .and_then(crate::tunnel::keys::base64_to_hex)
                else {
                    continue;
                };
                if let Some(s) = have.peers.get(&key) {
                    seen.insert(
                        p.node.clone(),
                        failover::PeerSeen {
                            handshake: s.last_handshake_sec,
                            heard: st.activity.heard(&key),
                        },
                    );
                }
            }
        }
        // A direct path carries traffic while its peer on the direct device
        // handshakes and is heard.
        if let Some(have) = direct_device {
            st.direct_activity.observe(have, now);
            for p in peers.iter().filter(|_| natted) {
                let Some(key) = p
                    .direct
                    .as_ref()
                    .and_then(|d| crate::tunnel::keys::base64_to_hex(&d.public_key))
                else {
                    continue;
                };
                if st.direct_activity.alive(have, &key, now) {
                    direct.insert(p.node.clone());
                }
            }
        }
        let evidence = failover::Evidence {
            probes: &st.probes,
            peers: &seen,
            now,
            hub_reachable,
        };
        let overrides = failover::choose(inputs, &evidence, &st.overrides);
        if commit {
            if overrides != st.overrides {
                tracing::info!(?overrides, hub_reachable, "local gateway failover changed");
            }
            if direct != st.direct {
                tracing::info!(?direct, "direct NAT-to-NAT paths changed");
            }
            st.overrides.clone_from(&overrides);
            st.direct.clone_from(&direct);
        }
        (overrides, direct)
    }

    /// Whether new evidence would change a decision of the last reconcile.
    async fn decisions_changed(&self, state: &CachedState) -> bool {
        let inputs = dataplane::inputs_from(&self.node, state);
        let peers = state.view(&self.node).map(|v| v.peers).unwrap_or_default();
        let device = self.tunnel.device_state().await;
        let direct_device = self.direct.device_state().await;
        let decided = self.decide(
            &inputs,
            &peers,
            device.as_ref(),
            direct_device.as_ref(),
            false,
        );
        self.failover
            .lock()
            .is_ok_and(|st| (&st.overrides, &st.direct) != (&decided.0, &decided.1))
    }

    /// Tunnel first (make before break), then observe → plan → apply, from `state`.
    pub async fn reconcile_once(&self, state: &CachedState) -> AppliedReport {
        let mut inputs = dataplane::inputs_from(&self.node, state);
        inputs.tunnel_dev = self.tunnel.dev.clone();
        // One underlay MTU for the tunnel device, raven0 and the routes.
        inputs.underlay_mtu = underlay_mtu(&inputs).await;
        let peers = state.view(&self.node).map(|v| v.peers).unwrap_or_default();
        let device = self.tunnel.device_state().await;
        let direct_device = self.direct.device_state().await;
        let (overrides, direct) = self.decide(
            &inputs,
            &peers,
            device.as_ref(),
            direct_device.as_ref(),
            true,
        );
        if let Ok(mut f) = self.health.local_failover.lock() {
            f.clone_from(&overrides);
        }
        inputs.active_override = overrides;
        let local_failover: Vec<v1::LocalFailover> = inputs
            .active_override
            .iter()
            .map(|(g, n)| v1::LocalFailover {
                gateway: g.to_string(),
                active_node: n.to_string(),
            })
            .collect();
        self.report.send_if_modified(|r| {
            let changed = r.local_failover != local_failover;
            r.local_failover.clone_from(&local_failover);
            changed
        });
        let mut errors = Vec::new();
        let mut tunnels = 0;
        let mtu = inputs
            .underlay_mtu
            .saturating_sub(crate::dataplane::model::TUNNEL_OVERHEAD);
        let mut rows = None;
        let address = inputs
            .me
            .as_ref()
            .and_then(|m| m.private_ip)
            .and_then(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            });
        let ipsec = self
            .ipsec
            .as_ref()
            .filter(|i| i.selected(inputs.settings.as_ref()));
        let wireguard = self.dp.writes() && ipsec.is_none();
        if let Some(spec) = crate::tunnel::spec(&inputs, &peers).filter(|_| wireguard) {
            match apply_tunnel(&self.tunnel, &spec, mtu, address).await {
                Ok(()) => {
                    inputs.tunnel_up = true;
                    tunnels = spec
                        .peers
                        .values()
                        .filter(|p| !p.allowed_ips.is_empty())
                        .count() as u32;
                    rows = Some(
                        device
                            .as_ref()
                            .map(|have| crate::tunnel::peer_states(&spec, have, now_unix()))
                            .unwrap_or_default(),
                    );
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // The direct-path device of a NATed gateway: up before routes move
        // into it; which gateways it carries follows its live peers.
        inputs.direct.dev = self.direct.dev.clone();
        let mut direct_rows = Vec::new();
        if let Some(spec) = crate::tunnel::direct_spec(&inputs, &peers).filter(|_| wireguard) {
            match apply_tunnel(&self.direct, &spec, mtu, address).await {
                Ok(()) => {
                    inputs.direct.up = true;
                    inputs.direct.gateways = spec
                        .peers
                        .values()
                        .filter(|p| p.path == crate::tunnel::PeerPath::Direct)
                        .filter(|p| direct.contains(&p.node))
                        .map(|p| p.gateway.clone())
                        .collect();
                    if let Some(have) = &direct_device {
                        direct_rows = crate::tunnel::peer_states(&spec, have, now_unix());
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // IPsec between gateways: charon carries the remote prefixes (its
        // routes, table 220); raven routes nothing into a WireGuard device.
        if let Some(ipsec) = ipsec
            && inputs.me.as_ref().is_some_and(|m| m.tunnel_candidate)
        {
            match ipsec.reconcile(&inputs, &peers, self.dp.writes()).await {
                Ok(pass) => {
                    tunnels = pass.tunnels;
                    errors.extend(pass.errors);
                    rows = Some(pass.rows);
                }
                Err(e) => errors.push(format!("ipsec: {e}")),
            }
        }
        if let Some(rows) = rows {
            let rows = crate::tunnel::merge_paths(rows, direct_rows, &direct);
            if let Ok(mut p) = self.health.peers.lock() {
                p.clone_from(&rows);
            }
            self.report.send_if_modified(|r| {
                let changed = r.peers != rows;
                r.peers = rows;
                changed
            });
        }
        let result = self.dp.reconcile(&inputs).await;
        let health = &self.health;
        health.reconciles.fetch_add(1, Ordering::Relaxed);
        health.revision.store(state.revision, Ordering::Relaxed);
        let mut summary = v1::ApplySummary::default();
        match result {
            Ok(r) => {
                if r.ops_applied > 0 {
                    tracing::info!(
                        ops = r.ops_applied,
                        revision = state.revision,
                        "dataplane reconciled"
                    );
                }
                health
                    .ops_applied
                    .fetch_add(r.ops_applied as u64, Ordering::Relaxed);
                summary = r.summary;
            }
            Err(e) => errors.push(e.to_string()),
        }
        summary.tunnels = tunnels;
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if let Some(e) = &error {
            tracing::warn!(error = %e, "reconcile failed; will retry");
        }
        health
            .dataplane_ok
            .store(error.is_none(), Ordering::Relaxed);
        if let Ok(mut last) = health.last_error.lock() {
            last.clone_from(&error);
        }
        AppliedReport {
            epoch: state.epoch.clone(),
            revision: state.revision,
            error,
            summary,
        }
    }
}
