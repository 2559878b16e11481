//! The Kubernetes source: one kube-rs watcher task per kind — v1beta1
//! Gateways (cluster-scoped), Nodes, and the `kube-system/raven-cfg`
//! ConfigMap — feeding the [`IndexHandle`]; and the Services and Endpoints
//! in `kube-system` that the hub keeps for LoadBalancer-exposed Gateways
//! (label `app.kubernetes.io/managed-by=raven-hub`, see [`crate::exposure`]).
//!
//! ```text
//! LIST (paged) ─▶ Init, InitApply…, InitDone ─▶ reset_* + mark_synced
//! WATCH from the list's resourceVersion ─▶ Apply / Delete ─▶ apply_* / delete_*
//! ```
//!
//! A failed watch (the API server away, `410 Gone`, …) marks its kind stale
//! and relists after a short reconnect delay (≤ 1 s, reset by every
//! success), so the hub resumes within about a second of the API server
//! being ready and knows when its index has caught up. Errors never clear the index: the hub keeps
//! serving its last good state until the API server answers again.
//!
//! Objects are watched untyped ([`DynamicObject`]) and decoded one by one:
//! one object the API server serves but that does not decode (a Gateway
//! stored through an older schema without `type`) becomes a problem on that
//! object, and every other object is served. Decoding the list as a whole
//! would fail the whole list — and a hub that starts or relists would never
//! become ready.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Node, Service};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use raven_cli::pace::{Backoff, FailureStreak, Jitter};
use raven_core::Problem;
use raven_core::api::{self, v1beta1::Gateway};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::exposure;
use crate::index::{Exposed, Index, IndexHandle, Kind};

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
    /// `Kind/name` as problems name objects.
    const OBJECT: &'static str;
    fn apply(index: &mut Index, obj: Self);
    fn delete(index: &mut Index, obj: &Self);
    fn reset(index: &mut Index, objs: Vec<Self>);
}

impl Sink for Gateway {
    const KIND: Kind = Kind::Gateway;
    const OBJECT: &'static str = "Gateway";
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
    const OBJECT: &'static str = "Node";
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
    const OBJECT: &'static str = "ConfigMap/kube-system";
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

impl Sink for Service {
    const KIND: Kind = Kind::Service;
    const OBJECT: &'static str = "Service/kube-system";
    fn apply(index: &mut Index, obj: Self) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        index.apply_exposed(Kind::Service, &name, exposure::observe_service(&obj));
    }
    fn delete(index: &mut Index, obj: &Self) {
        index.delete_exposed(
            Kind::Service,
            obj.metadata.name.as_deref().unwrap_or_default(),
        );
    }
    fn reset(index: &mut Index, objs: Vec<Self>) {
        index.reset_exposed(Kind::Service, named(objs, exposure::observe_service));
    }
}

impl Sink for Endpoints {
    const KIND: Kind = Kind::Endpoints;
    const OBJECT: &'static str = "Endpoints/kube-system";
    fn apply(index: &mut Index, obj: Self) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        index.apply_exposed(Kind::Endpoints, &name, exposure::observe(&obj.metadata));
    }
    fn delete(index: &mut Index, obj: &Self) {
        index.delete_exposed(
            Kind::Endpoints,
            obj.metadata.name.as_deref().unwrap_or_default(),
        );
    }
    fn reset(index: &mut Index, objs: Vec<Self>) {
        index.reset_exposed(
            Kind::Endpoints,
            named(objs, |e| exposure::observe(&e.metadata)),
        );
    }
}

/// Kept objects by name.
fn named<K: Resource>(objs: Vec<K>, f: impl Fn(&K) -> Exposed) -> Vec<(String, Exposed)> {
    objs.iter()
        .map(|o| (o.meta().name.clone().unwrap_or_default(), f(o)))
        .collect()
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

/// A failure streak ends with the next list, or after this long without an
/// error.
const STREAK_QUIET: Duration = Duration::from_secs(120);

/// Logs a watch failure once per streak of failures.
#[derive(Debug)]
struct Streak(FailureStreak);

impl Default for Streak {
    fn default() -> Self {
        Self(FailureStreak::forgetting_after(STREAK_QUIET))
    }
}

impl Streak {
    fn failed(&mut self, kind: Kind, error: &watcher::Error) {
        crate::metrics::kubernetes_watch_error(kind);
        if self.0.failed() {
            tracing::warn!(?kind, %error, "watch failed; serving the last known state and retrying with backoff");
        } else {
            tracing::debug!(?kind, %error, errors = self.0.failures(), "watch still failing");
        }
    }

    fn succeeded(&mut self, kind: Kind) {
        let errors = self.0.succeeded();
        if errors > 0 {
            tracing::info!(?kind, errors, "watch resumed");
        }
    }
}

/// An object that did not decode as `K`: its name, resourceVersion and why.
#[derive(Debug, Clone)]
struct Undecodable {
    name: String,
    resource_version: u64,
    problem: Problem,
}

/// Decodes one served object as `K`, or says why it cannot be.
fn decode<K: Sink>(obj: DynamicObject) -> Result<K, Box<Undecodable>> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let resource_version = obj
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let value = serde_json::to_value(&obj).map_err(|e| e.to_string());
    value
        .and_then(|v| serde_json::from_value::<K>(v).map_err(|e| e.to_string()))
        .map_err(|error| {
            let kind = K::OBJECT.split('/').next().unwrap_or(K::OBJECT);
            Box::new(Undecodable {
                problem: Problem::error(
                    format!("{}/{name}", K::OBJECT),
                    "",
                    "",
                    format!(
                        "the API server serves this {kind} but it cannot be read ({error}); it is not served, every other object is"
                    ),
                ),
                name,
                resource_version,
            })
        })
}

/// Reconnect delay after a failed watch: 100 ms doubling to 1 s, with
/// jitter, back to 100 ms after any success. Capped at 1 s so the hub
/// resumes within about a second of the API server being ready again (an
/// exponential backoff left at 30 s kept it blind for up to 30 s while the
/// Lease was already retaken); three requests a second per replica while
/// the server is away is no load.
#[derive(Debug)]
struct Reconnect(Backoff);

impl Default for Reconnect {
    fn default() -> Self {
        Self(Backoff::new(Self::MIN, Self::MAX).with_jitter(Jitter::Half))
    }
}

impl Reconnect {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        self.0.next_delay()
    }

    fn reset(&mut self) {
        self.0.reset();
    }
}

/// Watches one kind into the index until the task is dropped.
///
/// A failed watch marks the kind stale and starts over with a fresh
/// watcher — a LIST at the most recent version, then WATCH — after the
/// [`Reconnect`] delay: only a complete list proves the index caught up
/// with everything that happened while the watch was down, and until then
/// the status writer writes nothing (the index keeps serving its last state).
async fn pump<K: Sink>(api: Api<DynamicObject>, config: watcher::Config, index: IndexHandle) {
    let mut reconnect = Reconnect::default();
    let mut streak = Streak::default();
    loop {
        let stream = watcher::watcher(api.clone(), config.clone());
        let mut stream = std::pin::pin!(stream);
        // The relist in progress; swapped into the index whole at InitDone, so
        // a list cut short by an error never replaces the last good state.
        let mut listing: Vec<K> = Vec::new();
        let mut bad: Vec<Box<Undecodable>> = Vec::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => {
                    listing.clear();
                    bad.clear();
                }
                Ok(Event::InitApply(obj)) => match decode::<K>(obj) {
                    Ok(obj) => listing.push(obj),
                    Err(u) => bad.push(u),
                },
                Ok(Event::InitDone) => {
                    let objs = std::mem::take(&mut listing);
                    let undecodable = std::mem::take(&mut bad);
                    let (count, failed) = (objs.len(), undecodable.len());
                    index.update(|i| {
                        i.clear_undecodable(K::KIND);
                        K::reset(i, objs);
                        for u in undecodable {
                            undecodable_into(i, &u);
                        }
                        i.mark_synced(K::KIND);
                    });
                    reconnect.reset();
                    streak.succeeded(K::KIND);
                    tracing::info!(kind = ?K::KIND, count, undecodable = failed, "listed");
                }
                Ok(Event::Apply(obj)) => {
                    match decode::<K>(obj) {
                        Ok(obj) => index.update(|i| K::apply(i, obj)),
                        Err(u) => index.update(|i| undecodable_into(i, &u)),
                    }
                    reconnect.reset();
                }
                Ok(Event::Delete(obj)) => {
                    match decode::<K>(obj) {
                        Ok(obj) => index.update(|i| K::delete(i, &obj)),
                        // Gone either way: deleting needs only the name.
                        Err(u) => index.update(|i| {
                            i.see(u.resource_version);
                            match K::KIND {
                                Kind::Gateway => i.delete_gateway(&u.name),
                                Kind::Node => i.delete_node(&u.name),
                                Kind::Config => i.set_config(None),
                                Kind::Service | Kind::Endpoints => {
                                    i.delete_exposed(K::KIND, &u.name);
                                }
                            }
                        }),
                    }
                    reconnect.reset();
                }
                Err(e) => {
                    streak.failed(K::KIND, &e);
                    index.update_if(|i| i.mark_stale(K::KIND));
                    break;
                }
            }
        }
        tokio::time::sleep(reconnect.next()).await;
    }
}

fn undecodable_into(index: &mut Index, u: &Undecodable) {
    tracing::warn!(object = %u.problem.object, message = %u.problem.message, "undecodable object");
    index.apply_undecodable(
        match u.problem.object.split('/').next() {
            Some("Gateway") => Kind::Gateway,
            Some("Node") => Kind::Node,
            _ => Kind::Config,
        },
        &u.name,
        u.resource_version,
        u.problem.clone(),
    );
}

/// Spawns the watcher of one kind, untyped: items are decoded one by one.
fn spawn_watch<K: Sink>(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    index: &IndexHandle,
) where
    K::DynamicType: Default,
{
    let resource = ApiResource::erase::<K>(&K::DynamicType::default());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    tasks.spawn(pump::<K>(api, config, index.clone()));
}

/// Watches Gateways, Nodes and `kube-system/raven-cfg` — one task each —
/// until `shutdown`. Never returns early: while the API server is away the
/// watchers retry with backoff and the index keeps its last state.
pub async fn run(client: Client, index: IndexHandle, shutdown: CancellationToken) {
    // Lists read the most recent state (a quorum read), not the watch
    // cache: a relist after an outage must show everything that happened.
    let config = watcher::Config::default().list_semantic(watcher::ListSemantic::MostRecent);
    let mut tasks = tokio::task::JoinSet::new();
    spawn_watch::<Gateway>(&mut tasks, &client, None, config.clone(), &index);
    spawn_watch::<Node>(&mut tasks, &client, None, config.clone(), &index);
    spawn_watch::<ConfigMap>(
        &mut tasks,
        &client,
        Some(api::CONFIG_NAMESPACE),
        config
            .clone()
            .fields(&format!("metadata.name={}", api::CONFIG_NAME)),
        &index,
    );
    // The Services and Endpoints the hub keeps for LoadBalancer Gateways
    // (every replica: the load balancer's address is part of the topology).
    let kept = config.clone().labels(exposure::MANAGED_SELECTOR);
    spawn_watch::<Service>(
        &mut tasks,
        &client,
        Some(api::CONFIG_NAMESPACE),
        kept.clone(),
        &index,
    );
    spawn_watch::<Endpoints>(
        &mut tasks,
        &client,
        Some(api::CONFIG_NAMESPACE),
        kept,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_retries_at_most_a_second_apart_however_long_the_outage_and_quickly_after_a_list() {
        let mut r = Reconnect::default();
        // An outage of any length: thousands of failures in a row.
        let delays: Vec<Duration> = (0..5_000).map(|_| r.next()).collect();
        assert!(
            delays.iter().all(|d| *d <= Reconnect::MAX),
            "a delay above {:?}: {:?}",
            Reconnect::MAX,
            delays.iter().max()
        );
        assert!(
            delays[0] <= Reconnect::MIN,
            "the first retry waits the least"
        );
        // A complete list resets it: the next failure retries at once again.
        r.reset();
        assert!(r.next() <= Reconnect::MIN);
    }
}
