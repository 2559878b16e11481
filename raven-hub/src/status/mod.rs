//! Leader-only Gateway status writing, and the Events kubectl users see.
//!
//! ```text
//! PublishedRx ─▶ (leader? index fresh?) ─▶ want ≠ observed? ─▶ PATCH …/gateways/NAME/status (fieldManager raven-hub)
//!                   ▲                                      └─▶ Events: ActiveEndpointElected / Lost, Warning per problem
//!      Lease kube-system/raven-hub: create / renew / take over (resourceVersion-guarded)
//! ```
//!
//! Every hub replica compiles and serves; exactly one — the holder of a
//! `coordination.k8s.io/v1` Lease ([`lease`]) — writes `status.activeEndpoints`
//! and `status.nodes` back to the Gateways, as Raven's GatewayPickup does.
//!
//! The status to write is compared with the status the *watch* last showed
//! for that object (uid and resourceVersion included), never with a cache of
//! what this writer believes it wrote: a Gateway deleted and created again
//! (new uid), or whose status someone else edited (newer resourceVersion),
//! is written again as soon as the watch shows it. Only the echo of our own
//! write is waited for (the write's resourceVersion is newer than what the
//! watch has shown so far). Nothing is written while the index is not fresh
//! (a watch failed and has not relisted since), so a leader never writes
//! from a state older than the API server's.

pub mod events;
pub mod lease;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use raven_cli::pace::{Backoff, Jitter};
use raven_core::Problem;
use raven_core::api::v1beta1::{Gateway, GatewayCondition, GatewayStatus};
use raven_core::compile::CompiledGateway;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use lease::{DEFAULT_LEASE_NAME, DEFAULT_LEASE_NAMESPACE, LeaderElector, LeaseConfig};

use crate::pipeline::{ObservedGateway, Published, PublishedRx};

/// The field manager of every write the hub makes.
pub const FIELD_MANAGER: &str = "raven-hub";

/// Backoff of a failed status write.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    #[error("patching the status of Gateway {gateway}: {source}")]
    PatchStatus {
        gateway: String,
        #[source]
        source: kube::Error,
    },
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
    let conditions = if status.conditions.is_empty() {
        Value::Null
    } else {
        json!(status.conditions)
    };
    json!({"status": {
        "nodes": nodes,
        "activeEndpoints": active,
        "conditions": conditions,
        "nodeCount": status.node_count,
    }})
}

/// Condition type: the Gateway passed validation without a problem.
pub const CONDITION_VALID: &str = "Valid";
/// Condition type: an endpoint is elected (the gateway carries traffic).
pub const CONDITION_READY: &str = "Ready";

/// The status to write: the election plus the `Valid` and `Ready`
/// conditions. A condition keeps its `lastTransitionTime` from `earlier`
/// (what the API server shows, then what we last wrote) while its status
/// stays; otherwise it is `now`.
pub fn with_conditions(
    compiled: &CompiledGateway,
    problems: &[Problem],
    earlier: &[&GatewayStatus],
    now: &str,
) -> GatewayStatus {
    let object = format!("Gateway/{}", compiled.name.as_str());
    let mine: Vec<&Problem> = problems.iter().filter(|p| p.object == object).collect();
    let generation = compiled.gateway.metadata.generation;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = earlier
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
        GatewayCondition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    let valid = if mine.is_empty() {
        condition(
            CONDITION_VALID,
            true,
            "Valid",
            "no problem found".to_owned(),
        )
    } else {
        let mut text: Vec<String> = mine
            .iter()
            .take(3)
            .map(|p| {
                if p.field.is_empty() {
                    p.message.clone()
                } else {
                    format!("{}: {}", p.field, p.message)
                }
            })
            .collect();
        if mine.len() > 3 {
            text.push(format!("and {} more", mine.len() - 3));
        }
        condition(CONDITION_VALID, false, "Invalid", text.join("; "))
    };
    let active = &compiled.status.active_endpoints;
    let ready = if active.is_empty() {
        condition(
            CONDITION_READY,
            false,
            "NoActiveEndpoint",
            "no endpoint could be elected (none listed, or none on a ready node)".to_owned(),
        )
    } else {
        let list: Vec<String> = active
            .iter()
            .map(|e| format!("{} {}", e.type_, e.node_name))
            .collect();
        condition(
            CONDITION_READY,
            true,
            "ActiveEndpointElected",
            format!("active: {}", list.join(", ")),
        )
    };
    GatewayStatus {
        conditions: vec![valid, ready],
        ..compiled.status.clone()
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Exponential backoff between status write attempts: `RETRY_MIN ·
/// 2^(attempt-1)`, capped at `RETRY_MAX`, scaled by a random factor in
/// [0.5, 1).
const BACKOFF: Backoff = Backoff::new(RETRY_MIN, RETRY_MAX).with_jitter(Jitter::Half);

#[derive(Debug, Clone)]
struct Retry {
    attempts: u32,
    at: Instant,
    /// The status that failed; a different one is tried at once.
    status: GatewayStatus,
}

/// A status this writer wrote, until the watch shows it (or something newer).
#[derive(Debug, Clone, PartialEq)]
struct Written {
    uid: Option<String>,
    /// The object's resourceVersion after our write.
    resource_version: u64,
    status: GatewayStatus,
}

/// Whether `want` still has to be written, given what the watch shows and
/// what we wrote last.
fn needs_write(
    want: &GatewayStatus,
    observed: &ObservedGateway,
    written: Option<&Written>,
) -> bool {
    if observed.status.clone().unwrap_or_default() == *want {
        return false;
    }
    // Our own write, not yet echoed by the watch: same object, same status,
    // newer than anything the watch has shown.
    !written.is_some_and(|w| {
        w.uid == observed.uid && w.status == *want && w.resource_version > observed.resource_version
    })
}

/// The leader's side: which Gateway statuses differ from what the API
/// server has, and writing them.
#[derive(Debug)]
struct StatusWriter {
    api: Api<Gateway>,
    written: BTreeMap<String, Written>,
    retries: BTreeMap<String, Retry>,
}

impl StatusWriter {
    fn new(api: Api<Gateway>) -> Self {
        Self {
            api,
            written: BTreeMap::new(),
            retries: BTreeMap::new(),
        }
    }

    /// Forgets everything: a new leader goes by what the watch shows.
    fn reset(&mut self) {
        self.written.clear();
        self.retries.clear();
    }

    /// When the next pending retry is due. Only future times: what is
    /// already due waits for the next round, never spins.
    fn next_wakeup(&self) -> Option<Instant> {
        let now = Instant::now();
        self.retries
            .values()
            .map(|r| r.at)
            .filter(|t| *t > now)
            .min()
    }

    /// Writes every status in `published` that differs from what the API
    /// server has, until `until` (so the Lease is renewed in time).
    async fn sync(&mut self, published: &Published, until: Instant) {
        if !published.ready || !published.fresh {
            // A compile over a partly synced, or stale, index would elect
            // wrongly — and overwrite what is newer.
            return;
        }
        self.retries
            .retain(|name, _| published.gateways.contains_key(name.as_str()));
        self.written
            .retain(|name, _| published.observed.contains_key(name.as_str()));
        let now = now_rfc3339();
        for (name, compiled) in &published.gateways {
            if Instant::now() >= until {
                return;
            }
            let name = name.as_str();
            let Some(observed) = published.observed.get(name) else {
                continue;
            };
            let earlier: Vec<&GatewayStatus> = observed
                .status
                .iter()
                .chain(self.written.get(name).map(|w| &w.status))
                .collect();
            let want = &with_conditions(compiled, &published.topology.problems, &earlier, &now);
            if !needs_write(want, observed, self.written.get(name)) {
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
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            match self
                .api
                .patch_status(name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(gw) => {
                    let rv = gw
                        .metadata
                        .resource_version
                        .as_deref()
                        .and_then(|v| v.parse().ok());
                    self.written.insert(
                        name.to_owned(),
                        Written {
                            uid: gw.metadata.uid.clone(),
                            resource_version: rv.unwrap_or(0),
                            status: want.clone(),
                        },
                    );
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
                            at: Instant::now() + BACKOFF.delay(attempts),
                            status: want.clone(),
                        },
                    );
                }
            }
        }
    }
}

/// Elects a leader among the hub replicas and, while this one leads, keeps
/// every Gateway's status equal to the latest [`Published`] election and
/// records Events. One task; runs until `shutdown` (then releases the Lease)
/// or until the pipeline is gone. `leading` tells whether this replica leads.
pub async fn run_status_writer(
    client: Client,
    mut published: PublishedRx,
    lease: LeaseConfig,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut elector = LeaderElector::new(client.clone(), lease.clone());
    let mut writer = StatusWriter::new(Api::all(client.clone()));
    let mut recorder = events::Recorder::new(client);
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
                recorder.reset();
            }
            // Marked seen whether or not we lead, so `changed()` below waits
            // for the next state.
            let current: Arc<Published> = published.borrow_and_update().clone();
            if lead {
                writer.sync(&current, next_round).await;
                recorder.record(&current).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str) -> GatewayStatus {
        GatewayStatus {
            active_endpoints: vec![raven_core::api::v1beta1::Endpoint {
                node_name: node.into(),
                type_: "tunnel".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn observed(uid: &str, rv: u64, s: Option<GatewayStatus>) -> ObservedGateway {
        ObservedGateway {
            uid: Some(uid.into()),
            resource_version: rv,
            status: s,
        }
    }

    /// We wrote status "a" to object u1, which then had version 6.
    fn written_a() -> Written {
        Written {
            uid: Some("u1".into()),
            resource_version: 6,
            status: status("a"),
        }
    }

    #[test]
    fn a_status_the_watch_shows_is_not_written_again() {
        assert!(!needs_write(
            &status("a"),
            &observed("u1", 5, Some(status("a"))),
            None
        ));
    }

    #[test]
    fn our_write_is_not_repeated_until_the_watch_echoes_it() {
        let w = written_a();
        assert!(!needs_write(
            &status("a"),
            &observed("u1", 5, None),
            Some(&w)
        ));
    }

    #[test]
    fn a_recreated_gateway_is_written_although_we_wrote_the_old_one() {
        let w = written_a();
        assert!(needs_write(
            &status("a"),
            &observed("u2", 3, None),
            Some(&w)
        ));
    }

    #[test]
    fn a_status_someone_else_changed_after_our_write_is_written_again() {
        let w = written_a();
        assert!(needs_write(
            &status("a"),
            &observed("u1", 9, Some(status("b"))),
            Some(&w)
        ));
    }
}
