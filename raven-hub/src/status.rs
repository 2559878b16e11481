//! Leader-only Gateway status writing.
//!
//! Every hub replica compiles and serves; exactly one — the holder of a
//! `coordination.k8s.io/v1` Lease — writes `status.activeEndpoints` and
//! `status.nodes` back to the Gateways, as Raven's GatewayPickup does. The
//! lease is taken over when its holder stops renewing it; every write uses
//! the Lease's resourceVersion, so two replicas never both believe they lead.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use raven_core::GatewayName;
use raven_core::api::v1beta1::{Gateway, GatewayStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pipeline::PublishedRx;

/// Which Lease to hold, and as whom.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            namespace: "kube-system".into(),
            name: "raven-hub".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Takes or renews the lease; returns whether this replica holds it.
pub async fn try_lead(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let secs = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(secs),
        acquire_time: acquired.or_else(|| Some(now())),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(current) => {
            let s = current.spec.clone().unwrap_or_default();
            let holder = s.holder_identity.clone().unwrap_or_default();
            let mine = holder == cfg.identity;
            let expired = s.renew_time.as_ref().is_none_or(|t| {
                let age = Timestamp::now().duration_since(t.0);
                let limit = i64::from(s.lease_duration_seconds.unwrap_or(secs));
                age.as_secs() > limit
            });
            if !mine && !holder.is_empty() && !expired {
                return Ok(false);
            }
            let transitions = s.lease_transitions.unwrap_or(0) + i32::from(!mine);
            let mut next = current.clone();
            next.spec = Some(spec(transitions, if mine { s.acquire_time } else { None }));
            match api.replace(&cfg.name, &PostParams::default(), &next).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Writes Gateway statuses while leading. `leading` reports leadership.
pub async fn run_status_writer(
    client: Client,
    mut published: PublishedRx,
    lease: LeaseConfig,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let gateways: Api<Gateway> = Api::all(client);
    let mut written: BTreeMap<GatewayName, GatewayStatus> = BTreeMap::new();
    let mut ticker = tokio::time::interval(lease.renew_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            r = published.changed() => if r.is_err() { return },
        }
        let lead = match try_lead(&leases, &lease).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the lease; not writing status");
                false
            }
        };
        if leading.send_replace(lead) != lead {
            tracing::info!(identity = %lease.identity, leading = lead, "status-writer leadership changed");
            written.clear();
        }
        if !lead {
            continue;
        }
        let current = published.borrow_and_update().clone();
        if !current.ready {
            continue;
        }
        for (name, compiled) in &current.gateways {
            if written.get(name) == Some(&compiled.status) {
                continue;
            }
            let patch = serde_json::json!({ "status": compiled.status });
            match gateways
                .patch_status(
                    name.as_str(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    written.insert(name.clone(), compiled.status.clone());
                }
                Err(e) => {
                    tracing::warn!(gateway = %name, error = %e, "writing Gateway status failed; will retry")
                }
            }
        }
    }
}
