//! The agent's main loop (DESIGN §4):
//!
//! 1. open the cache and program the kernel from it — before any network call;
//! 2. dial the hub in the background (the dataplane never waits for it);
//! 3. reconcile whenever the cached state changes, and every `resync` to
//!    repair drift; report each result to the hub.
//!
//! Stopping the agent leaves the dataplane as it is; the next agent adopts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use raven_core::NodeName;
use raven_proto::v1;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CachedState};
use crate::client::{self, AppliedReport, ClientConfig, Links};
use crate::dataplane;

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
}

/// Health of the agent, for `/readyz` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Last reconcile succeeded.
    pub dataplane_ok: Arc<std::sync::atomic::AtomicBool>,
    pub last_error: Arc<std::sync::Mutex<Option<String>>>,
    pub revision: Arc<AtomicU64>,
    pub last_contact_ms: Arc<AtomicU64>,
    pub ops_applied: Arc<AtomicU64>,
    pub reconciles: Arc<AtomicU64>,
    /// Tunnel peers as last read from the device (gateways only).
    pub peers: Arc<std::sync::Mutex<Vec<v1::PeerTunnelState>>>,
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
}

/// Runs the agent until `shutdown`.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (node, dir, max) = (cfg.node.clone(), cfg.data_dir.clone(), cfg.cache_max_bytes);
    let (cache, state) =
        tokio::task::spawn_blocking(move || Cache::open(&dir, &node, max)).await??;
    tracing::info!(node = %cfg.node, epoch = %state.epoch, revision = state.revision, resources = state.resources.len(), "cache loaded");
    let health = Health::default();
    health.revision.store(state.revision, Ordering::Relaxed);

    let (state_tx, mut state_rx) = watch::channel(Arc::new(state));
    let (applied_tx, applied_rx) = watch::channel(None::<AppliedReport>);
    // Only the public key leaves the node.
    let tunnel = crate::tunnel::Tunnel::new(cfg.tunnel_dev.clone(), &cfg.data_dir)?;
    let (report_tx, report_rx) = watch::channel(v1::Report {
        wireguard_public_key: Some(tunnel.keys.public_base64()),
        ..Default::default()
    });

    let dp = dataplane::Kernel::new(cfg.apply);
    let ctx = Reconciler {
        dp,
        tunnel,
        node: cfg.node.clone(),
        health: health.clone(),
        report: report_tx,
    };
    // 1. Program the kernel from the cache before dialling anyone.
    let first = ctx.reconcile_once(&state_rx.borrow_and_update()).await;
    applied_tx.send_replace(Some(first));

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
        };
        tasks.spawn(client::run(client_cfg, links, shutdown.clone()));
    }
    // 3. Reconcile on change and periodically.
    let mut ticker = tokio::time::interval(cfg.resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = state_rx.changed() => if changed.is_err() { shutdown.cancelled().await; break },
            _ = ticker.tick() => {}
        }
        let state = state_rx.borrow_and_update().clone();
        let report = ctx.reconcile_once(&state).await;
        applied_tx.send_replace(Some(report));
    }
    tracing::info!("agent stopping; the dataplane stays as it is");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What one reconcile pass needs.
#[derive(Debug)]
pub struct Reconciler {
    pub dp: dataplane::Kernel,
    pub tunnel: crate::tunnel::Tunnel,
    pub node: NodeName,
    pub health: Health,
    pub report: watch::Sender<v1::Report>,
}

impl Reconciler {
    /// Tunnel first (make before break), then observe → plan → apply, from `state`.
    pub async fn reconcile_once(&self, state: &CachedState) -> AppliedReport {
        let mut inputs = dataplane::inputs_from(&self.node, state);
        inputs.tunnel_dev = self.tunnel.dev.clone();
        let peers = state.view(&self.node).map(|v| v.peers).unwrap_or_default();
        let mut errors = Vec::new();
        let mut tunnels = 0;
        if let Some(spec) = crate::tunnel::spec(&inputs, &peers).filter(|_| self.dp.writes()) {
            for w in &spec.warnings {
                tracing::warn!(warning = %w, "tunnel");
            }
            let mtu = 1500 - crate::dataplane::model::TUNNEL_OVERHEAD;
            match self.tunnel.ensure_device(mtu).await {
                Ok(()) => match self.tunnel.apply(&spec).await {
                    Ok(changed) => {
                        inputs.tunnel_up = true;
                        tunnels = spec.peers.len() as u32;
                        if changed > 0 {
                            tracing::info!(dev = %self.tunnel.dev, peers = spec.peers.len(), "tunnel peers updated");
                        }
                        let peers = self.tunnel.peer_states(&spec).await;
                        if let Ok(mut p) = self.health.peers.lock() {
                            p.clone_from(&peers);
                        }
                        self.report.send_if_modified(|r| {
                            let changed = r.peers != peers;
                            r.peers = peers;
                            changed
                        });
                    }
                    Err(e) => errors.push(e.to_string()),
                },
                Err(e) => errors.push(e.to_string()),
            }
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
