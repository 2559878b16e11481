//! The Kubernetes source: one kube-rs watcher per kind (v1beta1 Gateways,
//! Nodes, the `kube-system/raven-cfg` ConfigMap) feeding the index.
//!
//! Watchers relist on `410 Gone`, resume from the last resourceVersion, and
//! back off exponentially with jitter while the API server is away. The index
//! is never cleared on errors: the hub keeps serving its last good state.

use std::fmt::Debug;
use std::path::PathBuf;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use raven_core::api::{self, v1beta1::Gateway};
use tokio_util::sync::CancellationToken;

use crate::index::{Index, IndexHandle, Kind};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file, or inferred (in-cluster, then
/// `$KUBECONFIG`/`~/.kube/config`).
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
            .map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// How a watched kind lands in the index.
trait Sink: Resource + Clone + Debug + Send + 'static {
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
        index.set_config(objs.first());
    }
}

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

/// Feeds one watcher stream into the index until it ends.
async fn pump<K: Sink>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    index: IndexHandle,
) {
    let mut stream = std::pin::pin!(stream);
    let mut initial: Vec<K> = Vec::new();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => initial.clear(),
            Ok(Event::InitApply(obj)) => initial.push(obj),
            Ok(Event::InitDone) => {
                let objs = std::mem::take(&mut initial);
                let count = objs.len();
                index.update(|i| {
                    K::reset(i, objs);
                    i.mark_synced(K::KIND);
                });
                tracing::info!(kind = ?K::KIND, count, "listed");
                failing = false;
            }
            Ok(Event::Apply(obj)) => {
                index.update(|i| K::apply(i, obj));
                failing = false;
            }
            Ok(Event::Delete(obj)) => {
                index.update(|i| K::delete(i, &obj));
                failing = false;
            }
            Err(e) => {
                // Logged once per failure streak; the watcher backs off and
                // the index keeps its last state.
                if !failing {
                    tracing::warn!(kind = ?K::KIND, error = %e, "watch failed; serving the last known state and retrying with backoff");
                }
                failing = true;
            }
        }
    }
}

/// Runs the three watchers until `shutdown`.
pub async fn run(client: Client, index: IndexHandle, shutdown: CancellationToken) {
    let config = watcher::Config::default();
    let gateways =
        watcher::watcher(Api::<Gateway>::all(client.clone()), config.clone()).default_backoff();
    let nodes =
        watcher::watcher(Api::<Node>::all(client.clone()), config.clone()).default_backoff();
    let cms = watcher::watcher(
        Api::<ConfigMap>::namespaced(client, api::CONFIG_NAMESPACE),
        config.fields(&format!("metadata.name={}", api::CONFIG_NAME)),
    )
    .default_backoff();
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = async {
            tokio::join!(
                pump(gateways, index.clone()),
                pump(nodes, index.clone()),
                pump(cms, index.clone()),
            )
        } => {}
    }
}
