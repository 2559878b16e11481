//! The agent's main loop, which keeps the edge autonomous (the kernel is
//! programmed from the last good state before the hub is dialled, and the
//! hub's absence never tears anything down):
//!
//! 1. open the cache and program the kernel from it — before any network call;
//! 2. dial the hub in the background (the dataplane never waits for it);
//! 3. reconcile whenever the cached state changes — writing only what
//!    changed since the last clean pass — and every `resync` read the
//!    kernel in full to repair drift (so does the pass after any error);
//!    report each result to the hub.
//!
//! Stopping the agent leaves the dataplane as it is; the next agent adopts it.

use std::collections::BTreeMap;
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
    /// The layer-7 proxy (its roles follow the cached topology); `None`:
    /// off.
    pub proxy: Option<raven_proxy::ProxyConfig>,
}

/// Health of the agent, for `/readyz` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Last reconcile succeeded.
    pub dataplane_ok: Arc<std::sync::atomic::AtomicBool>,
    pub last_error: Arc<std::sync::Mutex<Option<String>>>,
    pub revision: Arc<AtomicU64>,
    pub last_contact_ms: Arc<AtomicU64>,
    /// This node's clock minus the hub's, in milliseconds, from the hub's
    /// last heartbeat (see [`Links::hub_clock_offset_ms`]).
    pub hub_clock_offset_ms: Arc<std::sync::Mutex<Option<i64>>>,
    /// A hub session is open (see [`Links::hub_session`]).
    pub hub_session: Arc<std::sync::atomic::AtomicBool>,
    /// When the hub last spoke, on tokio's clock (see
    /// [`Health::hub_reachable`]).
    pub hub_contact: raven_cli::pace::Contact,
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

    /// A hub session is open and the hub spoke less than `silence` ago.
    pub fn hub_reachable(&self, silence: Duration) -> bool {
        self.hub_session.load(Ordering::Relaxed) && self.hub_contact.heard_within(silence)
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

/// Why one reconcile did not do all it should.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Bringing up or configuring a tunnel device failed.
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
    /// Observing or programming the kernel failed.
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    /// Applied, except for what something else holds: a foreign route in a
    /// slot raven wants, skip-NAT that cannot be programmed (see
    /// [`dataplane::ReconcileReport::failures`]).
    #[error("{0}")]
    Incomplete(String),
    /// charon refused or could not be reached over VICI.
    #[error("ipsec: {0}")]
    Ipsec(String),
}

impl ReconcileError {
    /// Worth retrying soon: an operation that failed may work a moment
    /// later (a device still starting, a busy netlink socket). What another
    /// owner holds stays until the topology or the kernel changes: the
    /// periodic resync retries it.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Incomplete(_))
    }
}

/// Whether any of `errors` is worth a retry before the next resync.
pub fn retry_soon(errors: &[ReconcileError]) -> bool {
    errors.iter().any(ReconcileError::is_transient)
}

/// First delay of the retry of a failed reconcile (grows to the resync
/// period, with full jitter).
pub const RETRY_MIN: Duration = Duration::from_millis(250);

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
    let mut failing = raven_cli::pace::FailureStreak::new();
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
        // The view, built once per tick.
        let view = state.borrow().view(&ctx.node);
        let targets = view
            .as_ref()
            .map(failover::probe_targets)
            .unwrap_or_default();
        match failover::probe(targets.clone(), timeout).await {
            Ok(answered) => {
                failing.succeeded();
                let dead = ctx.failover.lock().ok().map(|mut st| {
                    st.probes.record(&targets, &answered);
                    view.as_ref()
                        .map(|v| failover::dead_candidates(v, &st.probes))
                        .unwrap_or_default()
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
            Err(e) if failing.failed() => {
                tracing::warn!(error = %e, "cannot probe the gateway candidates; local failover is off");
            }
            Err(_) => {}
        }
        if ctx.decisions_changed(view.as_ref()).await {
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
        failover: std::sync::Mutex::new(failover::FailoverState::new(cfg.probe_failures)),
        hub_silence: cfg.hub_silence,
    });
    // 1. Program the kernel from the cache before dialling anyone — or,
    //    without a usable cache, hold what the kernel has.
    let first = state_rx.borrow_and_update().clone();
    // A failed reconcile is retried with backoff up to the resync period,
    // sooner than the resync for what may work a moment later.
    let mut retry = raven_cli::pace::Backoff::new(RETRY_MIN, cfg.resync.max(RETRY_MIN));
    let mut retry_at: Option<tokio::time::Instant> = None;
    match &holding {
        Some(reason) => ctx.hold(reason).await,
        None => {
            let done = ctx.reconcile_once(&first, Pass::Resync).await;
            retry_at = next_retry(&mut retry, done.retry_soon);
            applied_tx.send_replace(Some(done.report));
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Http { addr, source })?;
        let sources = crate::http::Sources {
            node: cfg.node.to_string(),
            health: health.clone(),
            state: state_rx.clone(),
        };
        tasks.spawn(crate::http::serve(listener, sources, shutdown.clone()));
    }
    // 2. The hub, in the background.
    if let Some(client_cfg) = cfg.client.clone() {
        let links = Links {
            cache,
            state: state_tx,
            applied: applied_rx,
            report: report_rx,
            last_contact_ms: health.last_contact_ms.clone(),
            hub_clock_offset_ms: health.hub_clock_offset_ms.clone(),
            hub_session: health.hub_session.clone(),
            hub_contact: health.hub_contact.clone(),
        };
        tasks.spawn(client::run(client_cfg, links, shutdown.clone()));
    }
    // The layer-7 proxy follows the cached topology on its own.
    if let Some(proxy_cfg) = cfg.proxy.clone() {
        tasks.spawn(crate::proxy::run(
            proxy_cfg,
            state_rx.clone(),
            shutdown.clone(),
        ));
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
        // A new topology, new failover evidence or a retry writes what
        // changed since the last clean pass (a retry follows a failure,
        // which made the dataplane forget it: it reads the kernel); the
        // ticker reads the kernel in full and repairs drift.
        let pass = tokio::select! {
            () = shutdown.cancelled() => break,
            changed = state_rx.changed() => if changed.is_err() { shutdown.cancelled().await; break } else { Pass::Change },
            () = wake.notified() => Pass::Change,
            _ = ticker.tick() => Pass::Resync,
            () = sleep_until(retry_at) => Pass::Change,
        };
        let state = state_rx.borrow_and_update().clone();
        if holding.is_some() {
            if !crate::hold::ends_with(&state) {
                continue;
            }
            holding = None;
            ctx.release(&state);
        }
        let done = ctx.reconcile_once(&state, pass).await;
        retry_at = next_retry(&mut retry, done.retry_soon);
        applied_tx.send_replace(Some(done.report));
    }
    tracing::info!("agent stopping; the dataplane stays as it is");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// When to retry after a reconcile: `None` when it needs no early retry
/// (the backoff starts over), otherwise after the next backoff delay.
fn next_retry(
    backoff: &mut raven_cli::pace::Backoff,
    retry_soon: bool,
) -> Option<tokio::time::Instant> {
    if !retry_soon {
        backoff.reset();
        return None;
    }
    Some(tokio::time::Instant::now() + backoff.next_delay())
}

/// Sleeps until `at`; forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Holding the kernel state (see [`crate::hold`]).
impl Reconciler {
    /// Adopts the kernel state as it is and changes nothing (see
    /// [`crate::hold`]): reports what it holds and why.
    async fn hold(&self, reason: &crate::hold::HoldReason) {
        // A dry run observes and writes nothing; its summary is what the
        // kernel holds.
        let nothing = dataplane::assemble(None, &self.local(0), BTreeMap::new());
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

/// How a reconcile plans the dataplane (see [`dataplane`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Against what the last clean pass applied: only what changed is
    /// written (a resync when there is no such pass).
    Change,
    /// Against the kernel read in full: drift is repaired.
    Resync,
}

/// What one reconcile did: the report for the hub, and whether it failed
/// in a way worth retrying before the next resync.
#[derive(Debug, Clone)]
pub struct Reconciled {
    pub report: AppliedReport,
    pub retry_soon: bool,
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
    pub failover: std::sync::Mutex<failover::FailoverState>,
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
    if !tunnel.apply(spec).await?.is_empty() {
        tracing::info!(dev = %tunnel.dev, peers = spec.peers.len(), "tunnel peers updated");
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Reconciler {
    fn hub_reachable(&self) -> bool {
        self.health.hub_reachable(self.hub_silence)
    }

    /// What this node knows of itself: its tunnel devices, over an
    /// underlay of `underlay_mtu` bytes.
    fn local(&self, underlay_mtu: u32) -> dataplane::Local {
        dataplane::Local {
            tunnel_dev: self.tunnel.dev.clone(),
            direct_dev: self.direct.dev.clone(),
            underlay_mtu,
        }
    }

    /// What the gateway tunnel and the direct-path device show now.
    async fn device_states(&self) -> failover::DeviceStates {
        failover::DeviceStates {
            tunnel: self.tunnel.device_state().await,
            direct: self.direct.device_state().await,
        }
    }

    /// Records what the tunnel devices show now and decides local failover
    /// from all the evidence (see [`failover::decide`]), and whether the hub
    /// is reachable; `None` when the failover state is poisoned.
    fn observe_and_decide(
        &self,
        view: Option<&crate::cache::View>,
        devices: failover::Devices<'_>,
    ) -> Option<(failover::Decision, bool)> {
        let now = now_unix();
        let hub_reachable = self.hub_reachable();
        let mut st = self.failover.lock().ok()?;
        st.observe(devices, now);
        // Without a view there is nothing to override.
        let decided = view
            .map(|v| failover::decide(v, &st, devices, now, hub_reachable))
            .unwrap_or_default();
        Some((decided, hub_reachable))
    }

    /// Whether new evidence would change the decision of the last reconcile.
    async fn decisions_changed(&self, view: Option<&crate::cache::View>) -> bool {
        let states = self.device_states().await;
        let Some((decided, _)) = self.observe_and_decide(view, states.devices()) else {
            return false;
        };
        self.failover
            .lock()
            .is_ok_and(|st| st.decided() != &decided)
    }

    /// Tunnel first (make before break), then observe → diff → apply, from `state`.
    pub async fn reconcile_once(&self, state: &CachedState, pass: Pass) -> Reconciled {
        // The view, built once per reconcile.
        let view = state.view(&self.node);
        let states = self.device_states().await;
        let decision = match self.observe_and_decide(view.as_ref(), states.devices()) {
            Some((d, hub_reachable)) => {
                if let Ok(mut st) = self.failover.lock() {
                    st.commit(d.clone(), hub_reachable);
                }
                d
            }
            None => failover::Decision::default(),
        };
        if let Ok(mut f) = self.health.local_failover.lock() {
            f.clone_from(&decision.overrides);
        }
        // One underlay MTU for the tunnel device, raven0 and the routes.
        let private_ip = view.as_ref().and_then(|v| v.me.private_ip);
        let local = self.local(dataplane::underlay_mtu(private_ip).await);
        let mut inputs = dataplane::assemble(view.as_ref(), &local, decision.overrides.clone());
        let peers: &[raven_model::topology::PeerInfo] =
            view.as_ref().map_or(&[], |v| v.peers.as_slice());
        let direct = decision.direct;
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
        if let Some(spec) = crate::tunnel::spec(&inputs, peers).filter(|_| wireguard) {
            match apply_tunnel(&self.tunnel, &spec, mtu, address).await {
                Ok(()) => {
                    inputs.tunnel_up = true;
                    tunnels = spec
                        .peers
                        .values()
                        .filter(|p| !p.allowed_ips.is_empty())
                        .count() as u32;
                    rows = Some(
                        states
                            .tunnel
                            .as_ref()
                            .map(|have| crate::tunnel::peer_states(&spec, have, now_unix()))
                            .unwrap_or_default(),
                    );
                }
                Err(e) => errors.push(ReconcileError::from(e)),
            }
        }
        // The direct-path device of a NATed gateway: up before routes move
        // into it; which gateways it carries follows its live peers.
        let mut direct_rows = Vec::new();
        if let Some(spec) = crate::tunnel::direct_spec(&inputs, peers).filter(|_| wireguard) {
            match apply_tunnel(&self.direct, &spec, mtu, address).await {
                Ok(()) => {
                    inputs.direct.up = true;
                    inputs.direct.gateways = crate::tunnel::direct_gateways(&spec, &direct);
                    if let Some(have) = &states.direct {
                        direct_rows = crate::tunnel::peer_states(&spec, have, now_unix());
                    }
                }
                Err(e) => errors.push(ReconcileError::from(e)),
            }
        }
        // IPsec between gateways: charon carries the remote prefixes (its
        // routes, table 220); raven routes nothing into a WireGuard device.
        if let Some(ipsec) = ipsec
            && inputs.me.as_ref().is_some_and(|m| m.tunnel_candidate)
        {
            match ipsec.reconcile(&inputs, peers, self.dp.writes()).await {
                Ok(pass) => {
                    tunnels = pass.tunnels;
                    errors.extend(pass.errors.into_iter().map(ReconcileError::Ipsec));
                    rows = Some(pass.rows);
                }
                Err(e) => errors.push(ReconcileError::Ipsec(e.to_string())),
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
        let result = match pass {
            Pass::Change => self.dp.reconcile_change(&inputs).await,
            Pass::Resync => self.dp.reconcile(&inputs).await,
        };
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
                // Applied, but not all of it: not a success.
                errors.extend(r.failures.into_iter().map(ReconcileError::Incomplete));
            }
            Err(e) => errors.push(ReconcileError::from(e)),
        }
        summary.tunnels = tunnels;
        let error = (!errors.is_empty()).then(|| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        });
        if let Some(e) = &error {
            tracing::warn!(error = %e, "reconcile failed; will retry");
        }
        health
            .dataplane_ok
            .store(error.is_none(), Ordering::Relaxed);
        if let Ok(mut last) = health.last_error.lock() {
            last.clone_from(&error);
        }
        Reconciled {
            report: AppliedReport {
                epoch: state.epoch.clone(),
                revision: state.revision,
                error,
                summary,
            },
            retry_soon: retry_soon(&errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_pass_a_moment_later_are_retried_before_the_resync() {
        let held = ReconcileError::Incomplete("route 10.244.3.0/24 held by proto static".into());
        assert!(
            !retry_soon(&[held]),
            "what another owner holds waits for the resync"
        );
        let busy = ReconcileError::Dataplane(dataplane::DataplaneError::Invalid {
            op: "ip route add".into(),
            reason: "busy".into(),
        });
        assert!(busy.is_transient());
        assert!(retry_soon(&[
            ReconcileError::Incomplete("skip-NAT: iptables not found".into()),
            busy
        ]));
        assert!(!retry_soon(&[]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hub_is_reachable_while_a_session_is_open_and_it_spoke_within_the_silence_limit() {
        let silence = Duration::from_secs(3);
        let h = Health::default();
        assert!(!h.hub_reachable(silence), "never heard");
        h.hub_contact.heard();
        assert!(!h.hub_reachable(silence), "heard, but no session is open");
        h.hub_session.store(true, Ordering::Relaxed);
        assert!(h.hub_reachable(silence));
        tokio::time::sleep(silence - Duration::from_millis(1)).await;
        assert!(h.hub_reachable(silence));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!h.hub_reachable(silence), "silent for the whole limit");
        h.hub_contact.heard();
        assert!(h.hub_reachable(silence), "the next message restores it");
        h.hub_session.store(false, Ordering::Relaxed);
        assert!(
            !h.hub_reachable(silence),
            "a session that ended counts at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_reconcile_is_retried_within_the_backoff_and_a_success_resets_it() {
        let resync = Duration::from_secs(30);
        let mut b = raven_cli::pace::Backoff::new(RETRY_MIN, resync);
        let t0 = tokio::time::Instant::now();
        let first = next_retry(&mut b, true).unwrap_or_else(|| unreachable!("a retry"));
        assert!(first - t0 <= RETRY_MIN, "{:?}", first - t0);
        // Failing again and again: never later than the resync would.
        for _ in 0..50 {
            let at = next_retry(&mut b, true).unwrap_or_else(|| unreachable!("a retry"));
            assert!(at - tokio::time::Instant::now() <= resync);
        }
        // The retry fires on (paused, auto-advanced) time.
        let at = next_retry(&mut b, true);
        sleep_until(at).await;
        assert!(at.is_some_and(|at| tokio::time::Instant::now() >= at));
        // A success: no retry, and the next failure starts small again.
        assert_eq!(next_retry(&mut b, false), None);
        let again = next_retry(&mut b, true).unwrap_or_else(|| unreachable!("a retry"));
        assert!(again - tokio::time::Instant::now() <= RETRY_MIN);
        // No retry pending: sleep_until never wakes.
        let pending = tokio::time::timeout(Duration::from_secs(3600), sleep_until(None)).await;
        assert!(pending.is_err(), "nothing to retry never fires");
    }
}
