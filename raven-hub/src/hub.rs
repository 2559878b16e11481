//! Wiring: sources → index → pipeline → servers, with one cancellation token
//! for graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::grpc::sync::{SyncConfig, SyncShared};
use crate::grpc::{self, Listeners, TlsFiles};
use crate::index::{IndexHandle, Kind};
use crate::metrics::Metrics;
use crate::pipeline::{Debounce, Pipeline, PublishedRx};
use crate::revision::Revisions;
use crate::sources::manifests;

/// Where the hub reads the cluster from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The embedded user-manual example.
    Embedded,
    /// A directory of manifests, re-read when it changes.
    Manifests(PathBuf),
    /// The Kubernetes API (kubeconfig path, or in-cluster / default).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub source: Source,
    pub grpc_addr: SocketAddr,
    pub plaintext_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub tls: TlsFiles,
    /// Persisted hub state (epoch, revision); `None` keeps it in memory.
    pub data_dir: Option<PathBuf>,
    pub sync: SyncConfig,
    pub debounce: Debounce,
    pub replica: String,
    /// Epoch shared by every replica (Kubernetes mode); `None` lets this hub
    /// pick and persist its own.
    pub epoch: Option<String>,
    /// Caps on the files of a manifest directory (`--manifest-max-*`).
    pub manifest_limits: manifests::Limits,
}

/// A running hub.
#[derive(Debug)]
pub struct RunningHub {
    pub grpc_addr: SocketAddr,
    pub plaintext_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub published: PublishedRx,
    pub index: IndexHandle,
    pub agents: Agents,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Why a task that the hub cannot run without ended, when one did.
    failed: Arc<OnceLock<String>>,
    /// The Sync sessions, ended by `shutdown` and waited for.
    sessions: tokio_util::task::TaskTracker,
}

impl RunningHub {
    /// Stops every task, every Sync session included, and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.wait().await;
    }

    /// Waits until every task and every Sync session ended (after
    /// `shutdown` is cancelled, or a server failed and cancelled it): `Err`
    /// with the reason when a server failed, so the process exits non-zero.
    pub async fn wait(mut self) -> Result<(), String> {
        while self.tasks.join_next().await.is_some() {}
        self.sessions.close();
        self.sessions.wait().await;
        match self.failed.get() {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] grpc::ServeError),
    #[error(transparent)]
    Revision(#[from] crate::revision::RevisionError),
    #[error("binding the HTTP endpoint {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifests(#[from] manifests::ManifestDirError),
    #[error("Kubernetes client: {0}")]
    Kube(String),
    #[error("the manifest reader stopped: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

/// Starts the hub: binds every listener first (so errors surface now), opens
/// the state store, then spawns the pipeline, the servers and the sources —
/// the servers before the sources, so a restart in front of thousands of
/// redialling agents takes their connections off the backlog into its own
/// per-address queue while a large manifest directory or the first list
/// from the API server loads; their streams wait for readiness.
pub async fn start(config: HubConfig) -> Result<RunningHub, StartError> {
    // Every TLS file is read and checked (the private key fixed or refused)
    // before anything else runs, so a missing or bad file stops the hub
    // here, with the file named — and read again whenever they change (a
    // renewed certificate serves new connections without a restart).
    let tls_config = config.tls.watch()?;
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let index = IndexHandle::default();
    let agents = Agents::new(config.replica.clone(), index.clone());
    // Listeners first, so a taken port stops the hub before anything is
    // opened. Connections wait in the kernel's backlog only while the state
    // store opens: the accept loop starts before the sources load (below).
    let listeners = Listeners::bind(config.grpc_addr, config.plaintext_addr).await?;
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map_err(|source| grpc::ServeError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let plaintext_addr = listeners
        .plaintext
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let http = match config.http_addr {
        Some(addr) => Some(
            crate::http::bind(addr)
                .await
                .map_err(|source| StartError::Http { addr, source })?,
        ),
        None => None,
    };
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());

    // The state store and the stored reports are read on the blocking pool
    // (sled's open reads and checks files).
    let data_dir = config.data_dir.clone();
    let epoch = config.epoch.clone();
    let (revisions, reports, stored) = tokio::task::spawn_blocking(move || {
        let revisions = match &data_dir {
            Some(dir) => Revisions::open(dir, epoch.as_deref())?,
            None => Revisions::in_memory(),
        };
        // Reports survive restarts: load them before the first compile (keys
        // and observations; a local failover claim and probe verdicts count
        // only while their agent is connected, and it re-reports them).
        let (reports, stored) = crate::reports::Reports::load(revisions.store())?;
        Ok::<_, StartError>((revisions, reports, stored))
    })
    .await
    .expect("opening the hub state store panicked")?;
    index.update(|i| {
        for (node, mut report) in stored {
            report.local_failover.clear();
            report.dead_candidates.clear();
            i.set_report(node, report);
        }
    });
    let mut tasks = JoinSet::new();
    let failed = Arc::new(OnceLock::new());
    index.update(|i| i.set_started(tokio::time::Instant::now()));
    let (pipeline, published) = Pipeline::new(
        index.clone(),
        revisions,
        config.debounce,
        config.sync.failover_grace,
    );
    let for_agents = pipeline.sessions();
    let writer = reports.clone();
    let shared = SyncShared::new(
        published.clone(),
        for_agents,
        index.clone(),
        agents.clone(),
        metrics.clone(),
        config.sync.clone(),
        reports,
        shutdown.clone(),
    );
    let sessions = shared.sessions.clone();
    crate::memory::spawn_trimmer(shared.clone());
    {
        let shutdown = shutdown.clone();
        let failed = failed.clone();
        tasks.spawn(async move {
            if let Err(e) = grpc::serve(listeners, tls_config, shared, shutdown.clone()).await {
                let _ = failed.set(format!("gRPC server failed: {e}"));
                tracing::error!(error = %e, "gRPC server failed; shutting the hub down");
                shutdown.cancel();
            }
        });
    }
    // Sources after the server: the first load of a large manifest directory
    // or a first list from the API server happens while connections are
    // already being accepted.
    spawn_source(
        &mut tasks,
        &config.source,
        config.manifest_limits,
        &index,
        &published,
        config.replica.clone(),
        &shutdown,
    )
    .await?;

    // The pipeline starts after the first load, which spares it a compile
    // of the empty index (one of an unsynced index publishes an unready
    // state and keeps the stored revision, so the order is not needed for
    // agents resuming after a restart).
    tasks.spawn(pipeline.run(shutdown.clone()));
    {
        let metrics = metrics.clone();
        let mut rx = published.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut problems = crate::problem_log::ProblemLog::default();
            loop {
                {
                    let p = rx.borrow_and_update();
                    metrics.published(p.revision, p.topology.problems.len());
                    if p.ready {
                        problems.log(p.revision, &p.topology.problems);
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
    }

    tasks.spawn(writer.run_writer(shutdown.clone()));

    let metrics_http = metrics.clone();
    if let Some(listener) = http {
        let shutdown = shutdown.clone();
        let published = published.clone();
        let failed = failed.clone();
        let agents = agents.clone();
        tasks.spawn(async move {
            if let Err(e) =
                crate::http::serve(listener, metrics_http, published, agents, shutdown.clone())
                    .await
            {
                let _ = failed.set(format!("HTTP endpoint failed: {e}"));
                tracing::error!(error = %e, "HTTP endpoint failed; shutting the hub down");
                shutdown.cancel();
            }
        });
    }
    tracing::info!(
        %grpc_addr,
        plaintext_addr = %display_addr(plaintext_addr),
        http_addr = %display_addr(http_addr),
        "raven-hub started"
    );
    Ok(RunningHub {
        grpc_addr,
        plaintext_addr,
        http_addr,
        published,
        index,
        agents,
        metrics,
        shutdown,
        tasks,
        failed,
        sessions,
    })
}

/// An optional listener address for logs: the address, or `off`.
fn display_addr(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

/// Starts the Kubernetes watchers, the leader-only status writer and the
/// leader-only keeper of LoadBalancer Services.
pub fn spawn_kube(
    tasks: &mut JoinSet<()>,
    client: kube::Client,
    index: &IndexHandle,
    published: &PublishedRx,
    replica: String,
    shutdown: &CancellationToken,
) {
    {
        let (index, shutdown, client) = (index.clone(), shutdown.clone(), client.clone());
        tasks.spawn(async move {
            crate::sources::kube::run(client, index, shutdown).await;
        });
    }
    let (lead_tx, mut lead_rx) = tokio::sync::watch::channel(false);
    tasks.spawn(crate::exposure::run(
        client.clone(),
        published.clone(),
        index.clone(),
        lead_tx.subscribe(),
        shutdown.clone(),
    ));
    // Only the replica that writes the status runs the failure detector;
    // the others follow the status it writes, so replicas agree.
    index.update(|i| i.set_failure_detector(false));
    {
        let (index, shutdown) = (index.clone(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                let lead = *lead_rx.borrow_and_update();
                index.update_if(|i| i.set_failure_detector(lead));
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = lead_rx.changed() => if r.is_err() { return },
                }
            }
        });
    }
    let lease = crate::status::LeaseConfig::new(replica);
    tasks.spawn(crate::status::run_status_writer(
        client,
        published.clone(),
        lease,
        lead_tx,
        shutdown.clone(),
    ));
}

fn load_into(index: &IndexHandle, loaded: raven_core::manifest::Loaded) {
    index.update(|i| {
        i.reset_admitted_gateways(loaded.inputs.gateways, loaded.inputs.rejected);
        i.reset_cluster_nodes(loaded.inputs.nodes.into_values());
        i.set_raven_config(loaded.inputs.config);
        i.set_source_problems(loaded.problems);
        for k in Kind::SOURCES {
            i.mark_synced(k);
        }
    });
}

async fn spawn_source(
    tasks: &mut JoinSet<()>,
    source: &Source,
    limits: manifests::Limits,
    index: &IndexHandle,
    published: &PublishedRx,
    replica: String,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    match source {
        Source::Embedded => {
            load_into(
                index,
                raven_core::manifest::load(&crate::embedded::user_manual()),
            );
        }
        Source::Manifests(dir) => {
            // Reading blocks on the disk (and parsing a large file takes a
            // while): always on the blocking pool, never on the runtime.
            // Watch before the first read, so no change falls in between.
            let wake = std::sync::Arc::new(tokio::sync::Notify::new());
            let inotify = manifests::watch(dir, wake.clone());
            let interval = if inotify.is_some() {
                manifests::SAFETY_POLL_INTERVAL
            } else {
                manifests::POLL_INTERVAL
            };
            let mut watcher = manifests::DirSource::new(dir.clone(), limits);
            let (w, loaded) = tokio::task::spawn_blocking(move || {
                let loaded = watcher.load();
                (watcher, loaded)
            })
            .await?;
            let change = loaded?;
            index.update(|i| {
                i.apply_manifest_change(change);
                for k in Kind::SOURCES {
                    i.mark_synced(k);
                }
            });
            let mut watcher = Some(w);
            let index = index.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                // Dropped with the task: the inotify watch ends with it.
                let _inotify = inotify;
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(interval) => {}
                        () = wake.notified() => {
                            // Let a burst of events (an editor's save) settle.
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    let Some(mut w) = watcher.take() else { return };
                    let polled = tokio::task::spawn_blocking(move || {
                        let r = w.poll();
                        (w, r)
                    });
                    let (w, r) = tokio::select! {
                        () = shutdown.cancelled() => return,
                        r = polled => match r {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "manifest reader panicked; keeping the last state, no more reloads");
                                return;
                            }
                        },
                    };
                    match r {
                        Ok(Some(change)) => {
                            tracing::info!(dir = %w.dir().display(), gateways = change.gateways.len(), nodes = change.nodes.len(), "manifests changed; the changed files re-read (new problems are logged when the topology is published)");
                            index.update(|i| i.apply_manifest_change(change));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "manifest directory unreadable; keeping the last state"),
                    }
                    watcher = Some(w);
                }
            });
        }
        Source::Kubernetes { kubeconfig } => {
            let client = crate::sources::kube::client_from(kubeconfig.clone())
                .await
                .map_err(|e| StartError::Kube(e.to_string()))?;
            spawn_kube(tasks, client, index, published, replica, shutdown);
        }
    }
    Ok(())
}
