//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it: a candidate takes the Lease over only after it
//! has seen the same record, unchanged, for a whole lease duration *by its
//! own clock* (no trust in other machines' clocks); the holder renews every
//! `renew_every` and stops acting as leader once it has failed to renew for
//! `renew_deadline` (⅔ of the duration), so it gives up before anyone may
//! take over. Every write of the Lease carries the resourceVersion it read,
//! so two replicas never both win one round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use super::StatusError;

/// Namespace of the hub's Lease unless configured otherwise.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// Name of the hub's Lease unless configured otherwise.
pub const DEFAULT_LEASE_NAME: &str = "raven-hub";

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

    pub(super) fn lease_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
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
