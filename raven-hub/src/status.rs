//! Leader-only Gateway status writing.
//!
//! ```text
//! PublishedRx ─▶ (leader?) ─▶ diff against the status last written/observed ─▶ PATCH …/gateways/NAME/status
//!                   ▲
//!      Lease kube-system/raven-hub: create / renew / take over (resourceVersion-guarded)
//! ```
//!
//! Every hub replica compiles and serves; exactly one — the holder of a
//! `coordination.k8s.io/v1` Lease — writes `status.activeEndpoints` and
//! `status.nodes` back to the Gateways, as Raven's GatewayPickup does.
//!
//! The election follows client-go's `leaderelection`: a candidate takes the
//! Lease over only after it has seen the same record, unchanged, for a whole
//! lease duration *by its own clock* (no trust in other machines' clocks);
//! the holder renews every `renew_every` and stops acting as leader once it
//! has failed to renew for `renew_deadline` (⅔ of the duration), so it gives
//! up before anyone may take over. Every write of the Lease carries the
//! resourceVersion it read, so two replicas never both win one round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use raven_core::api::v1beta1::{Gateway, GatewayStatus};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Published, PublishedRx};

/// Namespace of the hub's Lease unless configured otherwise.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// Name of the hub's Lease unless configured otherwise.
pub const DEFAULT_LEASE_NAME: &str = "raven-hub";

/// The leader re-reads every Gateway's status this often, so a status
/// changed behind its back is repaired (level-triggered, like a resync).
const STATUS_RESYNC: Duration = Duration::from_secs(300);
/// Backoff of a failed status write or Gateway list.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Which Lease to hold, as whom, and how.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Holder identity written to the Lease; must be unique per process.
    pub identity: String,
    /// How long a Lease stays valid without renewal (`leaseDurationSeconds`).
    pub duration: Duration,
    /// How often the holder renews, and a candidate retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// `kube-system/raven-hub`, a 15 s lease renewed every 5 s, held as
    /// `<replica>-<random suffix>` — the suffix keeps two processes with the
    /// same pod or host name from sharing an identity (and both leading).
    pub fn new(replica: impl Into<String>) -> Self {
        let identity = format!("{}-{:08x}", replica.into(), rand::random::<u32>());
        Self::with_identity(identity)
    }

    /// Like [`LeaseConfig::new`], with the replica name from `$POD_NAME`,
    /// else `$HOSTNAME`, else `raven-hub`.
    pub fn from_env() -> Self {
        let replica = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "raven-hub".to_owned());
        Self::new(replica)
    }

    /// The defaults of [`LeaseConfig::new`] with exactly this identity.
    pub fn with_identity(identity: impl Into<String>) -> Self {
        Self {
            namespace: DEFAULT_LEASE_NAMESPACE.to_owned(),
            name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    /// A holder that could not renew for this long stops acting as leader:
    /// ⅔ of the lease duration, so it steps down before anyone takes over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What failed while electing or writing status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("reading Lease {lease}: {source}")]
    ReadLease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Lease {lease}: {source}")]
    CreateLease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {lease}: {source}")]
    WriteLease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing Gateways to read their current status: {source}")]
    ListGateways {
        #[source]
        source: kube::Error,
    },
    #[error("patching the status of Gateway {gateway}: {source}")]
    PatchStatus {
        gateway: String,
        #[source]
        source: kube::Error,
    },
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The parts of a Lease whose change proves its holder alive.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// Hand-rolled leader election on a `coordination.k8s.io/v1` Lease (kube
/// 5 ships none).
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease record last read and when, by our clock, it last changed.
    observed: Option<(Record, Instant)>,
    /// The Lease as this replica last wrote it while holding it.
    held: Option<Lease>,
    /// When this replica last created or renewed the Lease.
    renewed_at: Option<Instant>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            held: None,
            renewed_at: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// This replica holds the Lease: it renewed it within the renew deadline.
    pub fn is_leader(&self) -> bool {
        self.renewed_at
            .is_some_and(|t| t.elapsed() < self.config.renew_deadline())
    }

    fn lost(&mut self) {
        self.renewed_at = None;
        self.held = None;
    }

    fn won(&mut self, lease: Lease) {
        let now = Instant::now();
        self.observed = Some((Record::of(&lease), now));
        self.renewed_at = Some(now);
        self.held = Some(lease);
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: acquire_time.or_else(|| Some(now())),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One election round: creates the Lease, renews it, or takes it over
    /// once expired. Returns whether this replica holds it now. An error
    /// leaves leadership to [`LeaderElector::is_leader`] (held until the
    /// renew deadline passes).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, StatusError> {
        let lease_name = self.config.lease_name();
        let current = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|source| StatusError::ReadLease {
                lease: lease_name.clone(),
                source,
            })?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.won(created);
                    Ok(true)
                }
                // Another replica created it first.
                Err(e) if is_conflict(&e) => {
                    self.lost();
                    Ok(false)
                }
                Err(source) => Err(StatusError::CreateLease {
                    lease: lease_name,
                    source,
                }),
            };
        };
        let record = Record::of(&current);
        let now = Instant::now();
        let seen_since = match &self.observed {
            Some((r, since)) if *r == record => *since,
            _ => {
                self.observed = Some((record.clone(), now));
                now
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = record.holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && record.holder.is_some() {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.duration, Duration::from_secs);
            if now.duration_since(seen_since) < duration {
                // Held by a live replica.
                self.lost();
                return Ok(false);
            }
        }
        let (acquire_time, transitions) = if mine {
            (spec.acquire_time, spec.lease_transitions.unwrap_or(0))
        } else {
            (None, spec.lease_transitions.unwrap_or(0) + 1)
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(acquire_time, transitions));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                if !mine {
                    tracing::info!(identity = %self.config.identity, previous = %record.holder.as_deref().unwrap_or("none"), "took over the status-writer Lease");
                }
                self.won(written);
                Ok(true)
            }
            // Someone wrote the Lease since we read it; the next round reads
            // it again.
            Err(e) if is_conflict(&e) => {
                self.lost();
                Ok(false)
            }
            Err(source) => Err(StatusError::WriteLease {
                lease: lease_name,
                source,
            }),
        }
    }

    /// Gives the Lease up (if held) so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), StatusError> {
        let Some(mut lease) = self.held.take() else {
            return Ok(());
        };
        self.renewed_at = None;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Already someone else's.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(source) => Err(StatusError::WriteLease {
                lease: self.config.lease_name(),
                source,
            }),
        }
    }
}

/// The merge patch that sets a Gateway's status. Empty lists are sent as
/// `null`, so a merge patch clears them (OpenYurt omits empty lists too).
pub fn status_patch(status: &GatewayStatus) -> Value {
    let nodes = if status.nodes.is_empty() {
        Value::Null
    } else {
        json!(status.nodes)
    };
    let active = if status.active_endpoints.is_empty() {
        Value::Null
    } else {
        json!(status.active_endpoints)
    };
    json!({"status": {"nodes": nodes, "activeEndpoints": active}})
}

/// Exponential backoff with jitter: `RETRY_MIN · 2^(attempt-1)`, capped at
/// `RETRY_MAX`, scaled by a random factor in [0.5, 1).
fn backoff(attempt: u32) -> Duration {
    let exp = RETRY_MIN.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    exp.min(RETRY_MAX)
        .mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

#[derive(Debug, Clone)]
struct Retry {
    attempts: u32,
    at: Instant,
    /// The status that failed; a different one is tried at once.
    status: GatewayStatus,
}

/// The leader's side: which Gateway statuses differ from what the API
/// server has, and writing them.
#[derive(Debug)]
struct StatusWriter {
    api: Api<Gateway>,
    /// Status per Gateway as last listed from, or written to, the API server.
    known: BTreeMap<String, GatewayStatus>,
    /// When `known` was last refreshed by a list; `None` forces one.
    listed_at: Option<Instant>,
    list_retry: Option<(u32, Instant)>,
    retries: BTreeMap<String, Retry>,
}

impl StatusWriter {
    fn new(api: Api<Gateway>) -> Self {
        Self {
            api,
            known: BTreeMap::new(),
            listed_at: None,
            list_retry: None,
            retries: BTreeMap::new(),
        }
    }

    /// Forgets everything learnt: a new leader reads the statuses afresh.
    fn reset(&mut self) {
        self.known.clear();
        self.listed_at = None;
        self.list_retry = None;
        self.retries.clear();
    }

    /// When the next pending retry (or resync) is due. Only future times:
    /// what is already due waits for the next round, never spins.
    fn next_wakeup(&self) -> Option<Instant> {
        let now = Instant::now();
        let retries = self.retries.values().map(|r| r.at);
        let list = self.list_retry.map(|(_, at)| at);
        let resync = self.listed_at.map(|t| t + STATUS_RESYNC);
        retries.chain(list).chain(resync).filter(|t| *t > now).min()
    }

    async fn refresh(&mut self) -> Result<(), StatusError> {
        let due = self.listed_at.is_none_or(|t| t.elapsed() >= STATUS_RESYNC);
        if !due || self.list_retry.is_some_and(|(_, at)| Instant::now() < at) {
            return Ok(());
        }
        match self.api.list(&ListParams::default()).await {
            Ok(list) => {
                self.known = list
                    .items
                    .into_iter()
                    .filter_map(|gw| {
                        let name = gw.metadata.name?;
                        Some((name, gw.status.unwrap_or_default()))
                    })
                    .collect();
                self.listed_at = Some(Instant::now());
                self.list_retry = None;
                Ok(())
            }
            Err(source) => {
                let attempts = self.list_retry.map_or(1, |(a, _)| a + 1);
                self.list_retry = Some((attempts, Instant::now() + backoff(attempts)));
                Err(StatusError::ListGateways { source })
            }
        }
    }

    /// Writes every status in `published` that differs from what the API
    /// server has, until `until` (so the Lease is renewed in time).
    async fn sync(&mut self, published: &Published, until: Instant) {
        if !published.ready {
            // A compile over a partly synced index would elect wrongly.
            return;
        }
        if let Err(error) = self.refresh().await {
            if self.list_retry.is_some_and(|(attempts, _)| attempts == 1) {
                tracing::warn!(%error, "not writing Gateway status until the Gateways can be listed");
            } else {
                tracing::debug!(%error, "listing Gateways failed again");
            }
            return;
        }
        if self.listed_at.is_none() {
            return;
        }
        let names: std::collections::BTreeSet<&str> =
            published.gateways.keys().map(|g| g.as_str()).collect();
        self.retries.retain(|name, _| names.contains(name.as_str()));
        for (name, compiled) in &published.gateways {
            if Instant::now() >= until {
                return;
            }
            let name = name.as_str();
            let want = &compiled.status;
            if self.known.get(name) == Some(want) {
                self.retries.remove(name);
                continue;
            }
            if let Some(r) = self.retries.get(name)
                && r.status == *want
                && Instant::now() < r.at
            {
                continue;
            }
            let patch = status_patch(want);
            match self
                .api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    // What we wrote, not the echo: a server that normalises
                    // the status must not make us write it again and again.
                    self.known.insert(name.to_owned(), want.clone());
                    if self.retries.remove(name).is_some() {
                        tracing::info!(gateway = name, "Gateway status written after retries");
                    }
                }
                Err(source) => {
                    let attempts = self
                        .retries
                        .get(name)
                        .filter(|r| r.status == *want)
                        .map_or(1, |r| r.attempts + 1);
                    let error = StatusError::PatchStatus {
                        gateway: name.to_owned(),
                        source,
                    };
                    if attempts == 1 {
                        tracing::warn!(%error, "writing Gateway status failed; retrying with backoff");
                    } else {
                        tracing::debug!(%error, attempts, "writing Gateway status failed again");
                    }
                    self.retries.insert(
                        name.to_owned(),
                        Retry {
                            attempts,
                            at: Instant::now() + backoff(attempts),
                            status: want.clone(),
                        },
                    );
                }
            }
        }
    }
}

/// Elects a leader among the hub replicas and, while this one leads, keeps
/// every Gateway's status equal to the latest [`Published`] election. One
/// task; runs until `shutdown` (then releases the Lease) or until the
/// pipeline is gone. `leading` tells whether this replica leads.
pub async fn run_status_writer(
    client: Client,
    mut published: PublishedRx,
    lease: LeaseConfig,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut elector = LeaderElector::new(client.clone(), lease.clone());
    let mut writer = StatusWriter::new(Api::all(client));
    let mut lease_errors = 0u32;
    let mut next_round = Instant::now();
    loop {
        let round = async {
            if Instant::now() >= next_round {
                match elector.try_acquire_or_renew().await {
                    Ok(_) => {
                        if lease_errors > 0 {
                            tracing::info!(errors = lease_errors, "the Lease is reachable again");
                        }
                        lease_errors = 0;
                    }
                    Err(e) => {
                        lease_errors += 1;
                        if lease_errors == 1 {
                            tracing::warn!(error = %e, "leader election failed; retrying");
                        } else {
                            tracing::debug!(error = %e, errors = lease_errors, "leader election still failing");
                        }
                    }
                }
                // Candidates retry slightly jittered, as client-go does, so
                // replicas started together do not collide every round.
                let jitter = if elector.is_leader() {
                    Duration::ZERO
                } else {
                    lease.renew_every.mul_f64(rand::random::<f64>() * 0.2)
                };
                next_round = Instant::now() + lease.renew_every + jitter;
            }
            let lead = elector.is_leader();
            if leading.send_replace(lead) != lead {
                tracing::info!(identity = %lease.identity, leading = lead, "status-writer leadership changed");
                writer.reset();
            }
            // Marked seen whether or not we lead, so `changed()` below waits
            // for the next state.
            let current: Arc<Published> = published.borrow_and_update().clone();
            if lead {
                writer.sync(&current, next_round).await;
                writer
                    .next_wakeup()
                    .map_or(next_round, |w| w.min(next_round))
            } else {
                next_round
            }
        };
        // Every round is cancellable: shutdown never waits on a hung request.
        let wake = tokio::select! {
            () = shutdown.cancelled() => break,
            wake = round => wake,
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(wake) => {}
            changed = published.changed() => if changed.is_err() { break },
        }
    }
    // Bounded: an unreachable API server must not hold shutdown up.
    let released = tokio::time::timeout(lease.renew_every, elector.release()).await;
    match released {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the status-writer Lease; it expires on its own")
        }
        Err(_) => {
            tracing::warn!("releasing the status-writer Lease timed out; it expires on its own")
        }
    }
    leading.send_replace(false);
}
