//! The Kubernetes source: one kube-rs watcher task per kind — v1beta1
//! Gateways (cluster-scoped), Nodes, and the `kube-system/raven-cfg`
//! ConfigMap — feeding the [`IndexHandle`].
//!
//! ```text
//! LIST (paged) ─▶ Init, InitApply…, InitDone ─▶ reset_* + mark_synced
//! WATCH from the list's resourceVersion ─▶ Apply / Delete ─▶ apply_* / delete_*
//! ```
//!
//! The watchers resume from their last resourceVersion (bookmarks keep it
//! fresh), relist on `410 Gone`, and back off exponentially with jitter
//! while the API server is away. Errors never clear the index: the hub keeps
//! serving its last good state until the API server answers again.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use raven_core::api::{self, v1beta1::Gateway};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::index::{Index, IndexHandle, Kind};

/// Errors building a Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "inferring the Kubernetes client configuration (in-cluster, $KUBECONFIG, ~/.kube/config): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from a kubeconfig file, or inferred (`$KUBECONFIG` or
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client_from(kubeconfig: Option<PathBuf>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path).map_err(|source| {
                KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig { path, source })?
        }
        None => kube::Config::infer()
            .await
            .map_err(KubeSourceError::Infer)?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// How a watched kind lands in the index.
trait Sink: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;
    fn apply(index: &mut Index, obj: Self);
    fn delete(index: &mut Index, obj: &Self);
    fn reset(index: &mut Index, objs: Vec<Self>);
}

impl Sink for Gateway {
    const KIND: Kind = Kind::Gateway;
    fn apply(index: &mut Index, obj: Self) {
        index.apply_gateway(obj);
    }
    fn delete(index: &mut Index, obj: &Self) {
        see(index, obj);
        index.delete_gateway(obj.metadata.name.as_deref().unwrap_or_default());
    }
    fn reset(index: &mut Index, objs: Vec<Self>) {
        index.reset_gateways(objs);
    }
}

impl Sink for Node {
    const KIND: Kind = Kind::Node;
    fn apply(index: &mut Index, obj: Self) {
        index.apply_node(&obj);
    }
    fn delete(index: &mut Index, obj: &Self) {
        see(index, obj);
        index.delete_node(obj.metadata.name.as_deref().unwrap_or_default());
    }
    fn reset(index: &mut Index, objs: Vec<Self>) {
        index.reset_nodes(&objs);
    }
}

impl Sink for ConfigMap {
    const KIND: Kind = Kind::Config;
    fn apply(index: &mut Index, obj: Self) {
        index.set_config(Some(&obj));
    }
    fn delete(index: &mut Index, obj: &Self) {
        see(index, obj);
        index.set_config(None);
    }
    fn reset(index: &mut Index, objs: Vec<Self>) {
        // The field selector already narrows the list to raven-cfg.
        index.set_config(
            objs.iter()
                .find(|cm| cm.metadata.name.as_deref() == Some(api::CONFIG_NAME)),
        );
    }
}

/// Records a deleted object's resourceVersion, so the revision floor never
/// falls behind what the API server has shown us.
fn see<K: Resource>(index: &mut Index, obj: &K) {
    if let Some(rv) = obj
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
    {
        index.see(rv);
    }
}

/// A failure streak ends with the next event, or after this long without an
/// error (the watcher's backoff resets after the same quiet period).
const STREAK_QUIET: Duration = Duration::from_secs(120);

/// Logs a watch failure once per streak of failures.
#[derive(Debug, Default)]
struct Streak {
    last_error: Option<Instant>,
    errors: u32,
}

impl Streak {
    fn failed(&mut self, kind: Kind, error: &watcher::Error) {
        crate::metrics::kubernetes_watch_error(kind);
        let now = Instant::now();
        if self
            .last_error
            .is_some_and(|t| now.duration_since(t) > STREAK_QUIET)
        {
            self.errors = 0;
        }
        self.last_error = Some(now);
        self.errors += 1;
        if self.errors == 1 {
            tracing::warn!(?kind, %error, "watch failed; serving the last known state and retrying with backoff");
        } else {
            tracing::debug!(?kind, %error, errors = self.errors, "watch still failing");
        }
    }

    fn succeeded(&mut self, kind: Kind) {
        if self.errors > 0 {
            tracing::info!(?kind, errors = self.errors, "watch resumed");
        }
        self.errors = 0;
        self.last_error = None;
    }
}

/// Feeds one watcher stream into the index until it ends.
async fn pump<K: Sink>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    index: IndexHandle,
) {
    let mut stream = std::pin::pin!(stream);
    // The relist in progress; swapped into the index whole at InitDone, so
    // a list cut short by an error never replaces the last good state.
    let mut listing: Vec<K> = Vec::new();
    let mut streak = Streak::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(obj)) => listing.push(obj),
            Ok(Event::InitDone) => {
                let objs = std::mem::take(&mut listing);
                let count = objs.len();
                index.update(|i| {
                    K::reset(i, objs);
                    i.mark_synced(K::KIND);
                });
                streak.succeeded(K::KIND);
                tracing::info!(kind = ?K::KIND, count, "listed");
            }
            Ok(Event::Apply(obj)) => {
                index.update(|i| K::apply(i, obj));
                streak.succeeded(K::KIND);
            }
            Ok(Event::Delete(obj)) => {
                index.update(|i| K::delete(i, &obj));
                streak.succeeded(K::KIND);
            }
            Err(e) => streak.failed(K::KIND, &e),
        }
    }
    // `default_backoff` never gives up, so this is unreachable in practice.
    tracing::error!(kind = ?K::KIND, "watch stream ended; no further updates for this kind");
}

/// Spawns the watcher of one kind.
fn spawn_watch<K: Sink>(
    tasks: &mut tokio::task::JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    index: &IndexHandle,
) where
    K::DynamicType: Default,
{
    let stream = watcher::watcher(api, config).default_backoff();
    tasks.spawn(pump(stream, index.clone()));
}

/// Watches Gateways, Nodes and `kube-system/raven-cfg` — one task each —
/// until `shutdown`. Never returns early: while the API server is away the
/// watchers retry with backoff and the index keeps its last state.
pub async fn run(client: Client, index: IndexHandle, shutdown: CancellationToken) {
    let config = watcher::Config::default();
    let mut tasks = tokio::task::JoinSet::new();
    spawn_watch(
        &mut tasks,
        Api::<Gateway>::all(client.clone()),
        config.clone(),
        &index,
    );
    spawn_watch(
        &mut tasks,
        Api::<Node>::all(client.clone()),
        config.clone(),
        &index,
    );
    spawn_watch(
        &mut tasks,
        Api::<ConfigMap>::namespaced(client, api::CONFIG_NAMESPACE),
        config.fields(&format!("metadata.name={}", api::CONFIG_NAME)),
        &index,
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            joined = tasks.join_next() => match joined {
                Some(Err(e)) if e.is_panic() => {
                    tracing::error!(error = %e, "a Kubernetes watch task panicked");
                }
                Some(_) => {}
                None => {
                    // Every watcher ended (unreachable with a never-ending
                    // backoff); stay until shutdown, serving the last state.
                    shutdown.cancelled().await;
                    break;
                }
            },
        }
    }
    tasks.shutdown().await;
}
