//! Events the leader records for kubectl users (`kubectl get events`,
//! `kubectl describe gw`), with Raven's reasons:
//!
//! - `Normal ActiveEndpointElected` when an endpoint becomes active,
//! - `Normal ActiveEndpointLost` when an active endpoint stops being active,
//! - `Warning <reason>` once for every problem on a Gateway or Node (bad
//!   `publicIP`, overlapping subnets, unknown node, undecodable object, …),
//!   again only if the problem goes away and comes back.
//!
//! Events are `core/v1` in the `default` namespace (where Kubernetes puts
//! the events of cluster-scoped objects), best effort: a failed create is
//! logged and tried again with the next published state.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use raven_core::Problem;

use crate::pipeline::Published;

/// Raven's reason for a newly elected active endpoint.
pub const REASON_ELECTED: &str = "ActiveEndpointElected";
/// Raven's reason for an endpoint no longer active.
pub const REASON_LOST: &str = "ActiveEndpointLost";
/// Reason of the Warning recorded for a problem on an object.
pub const REASON_INVALID: &str = "Invalid";
/// Namespace of the events of cluster-scoped objects.
const EVENT_NAMESPACE: &str = "default";

/// An elected endpoint as events name it: (type, node, public IP).
type Active = (String, String, String);

/// What the leader has recorded, so each fact is told once.
#[derive(Debug)]
pub(super) struct Recorder {
    api: Api<Event>,
    /// Problems already told, as (object, field, message).
    warned: BTreeSet<(String, String, String)>,
    /// Per Gateway, the active endpoints last told (or found in the status).
    active: BTreeMap<String, BTreeSet<Active>>,
}

fn actives(status: Option<&raven_core::api::v1beta1::GatewayStatus>) -> BTreeSet<Active> {
    status
        .map(|s| {
            s.active_endpoints
                .iter()
                .map(|e| (e.type_.clone(), e.node_name.clone(), e.public_ip.clone()))
                .collect()
        })
        .unwrap_or_default()
}

impl Recorder {
    pub(super) fn new(client: Client) -> Self {
        Self {
            api: Api::namespaced(client, EVENT_NAMESPACE),
            warned: BTreeSet::new(),
            active: BTreeMap::new(),
        }
    }

    /// A new leader starts from what the API server shows.
    pub(super) fn reset(&mut self) {
        self.warned.clear();
        self.active.clear();
    }

    /// Records what changed since the last call.
    pub(super) async fn record(&mut self, published: &Published) {
        if !published.ready || !published.fresh {
            return;
        }
        let problems: BTreeSet<(String, String, String)> = published
            .topology
            .problems
            .iter()
            .filter(|p| p.object.starts_with("Gateway/") || p.object.starts_with("Node/"))
            .map(|p| (p.object.clone(), p.field.clone(), p.message.clone()))
            .collect();
        self.warned.retain(|p| problems.contains(p));
        for problem in &published.topology.problems {
            let key = (
                problem.object.clone(),
                problem.field.clone(),
                problem.message.clone(),
            );
            if !problems.contains(&key) || self.warned.contains(&key) {
                continue;
            }
            let uid = problem
                .object
                .strip_prefix("Gateway/")
                .and_then(|n| published.observed.get(n))
                .and_then(|o| o.uid.clone());
            if self
                .emit(
                    &problem.object,
                    uid,
                    "Warning",
                    REASON_INVALID,
                    &warning_message(problem),
                )
                .await
            {
                self.warned.insert(key);
            }
        }

        self.active
            .retain(|name, _| published.gateways.contains_key(name.as_str()));
        for (name, compiled) in &published.gateways {
            let name = name.as_str();
            let observed = published.observed.get(name);
            let before = self
                .active
                .get(name)
                .cloned()
                .unwrap_or_else(|| actives(observed.and_then(|o| o.status.as_ref())));
            let now = actives(Some(&compiled.status));
            let uid = observed.and_then(|o| o.uid.clone());
            let object = format!("Gateway/{name}");
            let mut told = before.clone();
            for (type_, node, ip) in now.difference(&before) {
                let message = format!(
                    "The {type_} endpoint hosted by node {node} has been elected active endpoint, publicIP: {ip}"
                );
                if self
                    .emit(&object, uid.clone(), "Normal", REASON_ELECTED, &message)
                    .await
                {
                    told.insert((type_.clone(), node.clone(), ip.clone()));
                }
            }
            for (type_, node, ip) in before.difference(&now) {
                let message = format!(
                    "The {type_} endpoint hosted by node {node} is no longer active, publicIP: {ip}"
                );
                if self
                    .emit(&object, uid.clone(), "Normal", REASON_LOST, &message)
                    .await
                {
                    told.remove(&(type_.clone(), node.clone(), ip.clone()));
                }
            }
            self.active.insert(name.to_owned(), told);
        }
    }

    /// Creates one Event about `object` (`Gateway/NAME` or `Node/NAME`).
    async fn emit(
        &self,
        object: &str,
        uid: Option<String>,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> bool {
        let (kind, name) = object.split_once('/').unwrap_or(("Gateway", object));
        let api_version = if kind == "Gateway" {
            format!("{}/v1beta1", raven_core::api::GROUP)
        } else {
            "v1".to_owned()
        };
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:016x}",
                    name.to_ascii_lowercase(),
                    rand::random::<u64>()
                )),
                namespace: Some(EVENT_NAMESPACE.to_owned()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(api_version),
                kind: Some(kind.to_owned()),
                name: Some(name.to_owned()),
                uid,
                ..Default::default()
            },
            type_: Some(type_.to_owned()),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            source: Some(EventSource {
                component: Some(super::FIELD_MANAGER.to_owned()),
                ..Default::default()
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            ..Default::default()
        };
        let params = PostParams {
            field_manager: Some(super::FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        match self.api.create(&params, &event).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, object, reason, "could not record an Event; trying again later");
                false
            }
        }
    }
}

fn warning_message(p: &Problem) -> String {
    match (p.field.is_empty(), p.value.is_empty()) {
        (true, _) => p.message.clone(),
        (false, true) => format!("{}: {}", p.field, p.message),
        (false, false) => format!("{} {:?}: {}", p.field, p.value, p.message),
    }
}
