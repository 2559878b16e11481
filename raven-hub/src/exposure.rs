//! Gateways with `exposeType: LoadBalancer`, exposed as Raven's
//! gateway-public-service controller (yurt-manager) exposes them: a
//! `type: LoadBalancer` Service per gateway and endpoint type in
//! `kube-system`, without a selector, whose Endpoints the hub keeps on the
//! active endpoints' nodes.
//!
//! ```text
//! Published (election, nodes' InternalIPs) ─▶ desired Services + Endpoints ─┐
//! watch kube-system, managed-by=raven-hub ─▶ Index (hash, owner, ingress) ──┴▶ leader: apply / delete
//!                                                └─▶ ingress IP ─▶ the gateway's public address in the topology
//! ```
//!
//! - **Services** `x-raven-tunnel-svc-GATEWAY` (UDP) and
//!   `x-raven-proxy-svc-GATEWAY` (TCP), labels `raven.openyurt.io/gateway`,
//!   `raven.openyurt.io/gateway-type`, `raven.openyurt.io/endpoints-name`
//!   (the active node, when there is exactly one) and
//!   `app.kubernetes.io/managed-by: raven-hub`; annotation
//!   `svc.openyurt.io/discard: "true"` (yurthub's service topology leaves
//!   them alone); `externalTrafficPolicy: Local`. The Service port is the
//!   active endpoint's `port` (default 4500 / 10262), its target the port the
//!   node's tunnel listens on (from the agent's report, else 4500) or the
//!   proxy's 10262. Raven appends a random suffix to the names and makes one
//!   Service per active endpoint; raven names them by gateway (every replica
//!   and a restarted hub find their own without listing; a name that would
//!   not be a valid Service name — too long, or with a dot — is shortened
//!   and given a hash of the gateway's name) and keeps one per type, whose
//!   Endpoints follow the election — so a failover moves the Endpoints, not
//!   the load balancer, and the gateway keeps its public address.
//! - **Endpoints** of the same name: one address per active endpoint of the
//!   type (the node's InternalIP and nodeName), none while nothing is
//!   elected (the Service and its address stay). On a cluster with the
//!   EndpointSlice mirroring controller (1.19+), the control plane mirrors
//!   them into EndpointSlices.
//! - Both carry an owner reference to their Gateway, so the garbage
//!   collector removes them with it even while no hub runs; the leader also
//!   deletes them itself as soon as the Gateway is deleted, stops being
//!   `LoadBalancer`, lists no endpoint of the type, or the type is switched
//!   off in `raven-cfg`.
//! - The Service's first `status.loadBalancer.ingress` IP (written by the
//!   cloud's load-balancer controller) becomes the gateway's public address
//!   in the topology — every replica watches the Services for it.
//!
//! Only the leader writes (server-side apply, field manager `raven-hub`),
//! only while its index is fresh and both kinds are listed, and only what
//! differs: each object carries the hash of what the hub wrote
//! (`raven.openyurt.io/desired-hash`), compared with what the watch shows.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use raven_core::api::{self, v1beta1};
use raven_core::topology::{ResourceBody, ResourceName};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::index::{Exposed, IndexHandle, Kind};
use crate::pipeline::{Published, PublishedRx};
use crate::status::FIELD_MANAGER;

/// Raven's label naming the endpoint type of a Service.
pub const LABEL_GATEWAY_TYPE: &str = "raven.openyurt.io/gateway-type";
/// Raven's label naming the active endpoint's node.
pub const LABEL_ENDPOINTS_NAME: &str = "raven.openyurt.io/endpoints-name";
/// The label marking what the hub keeps.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "raven-hub";
/// The label selector of the Services and Endpoints the hub watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=raven-hub";
/// The hash of what the hub last wrote into an object.
pub const ANNOTATION_HASH: &str = "raven.openyurt.io/desired-hash";
/// OpenYurt's annotation keeping yurthub's service topology off a Service.
pub const ANNOTATION_DISCARD: &str = "svc.openyurt.io/discard";
/// Raven's name prefix of a tunnel Service.
pub const TUNNEL_SERVICE_PREFIX: &str = "x-raven-tunnel-svc";
/// Raven's name prefix of a proxy Service.
pub const PROXY_SERVICE_PREFIX: &str = "x-raven-proxy-svc";
/// How often the leader compares what it wants with what the watch shows
/// even without a new topology (an object someone deleted or edited comes
/// back within this). In memory; requests only for what differs.
pub const RESYNC: Duration = Duration::from_secs(2);
/// How long a write waits for the watch to echo it before it is repeated.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// A Service or Endpoints object as the hub keeps it for the index.
pub fn observe(meta: &ObjectMeta) -> Exposed {
    let gateway = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Gateway" && o.api_version.starts_with(api::GROUP))
        .map(|o| o.name.clone());
    Exposed {
        gateway,
        type_: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_GATEWAY_TYPE))
            .cloned(),
        hash: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_HASH))
            .cloned(),
        ingress: None,
    }
}

/// A Service with its load balancer's first ingress IP (a hostname-only
/// ingress gives none: the topology needs an address).
pub fn observe_service(svc: &Service) -> Exposed {
    Exposed {
        ingress: svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .find_map(|i| i.ip.as_deref().and_then(|ip| ip.parse().ok())),
        ..observe(&svc.metadata)
    }
}

/// The Service (and Endpoints) name of `gateway`'s `prefix` Service: Raven's
/// prefix and the gateway's name when that is a valid Service name (a DNS
/// label of at most 63 characters), else shortened with a hash of the
/// gateway's name.
pub fn service_name(prefix: &str, gateway: &str) -> String {
    let plain = format!("{prefix}-{gateway}");
    if plain.len() <= 63 && !gateway.contains('.') {
        return plain;
    }
    let digest = Sha256::digest(gateway.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut short: String = plain.replace('.', "-").chars().take(63 - 9).collect();
    while short.ends_with('-') {
        short.pop();
    }
    format!("{short}-{hash}")
}

/// One Service and its Endpoints, as the hub wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service: Value,
    pub endpoints: Value,
    pub service_hash: String,
    pub endpoints_hash: String,
}

fn hash(v: &Value) -> String {
    let digest = Sha256::digest(serde_json::to_vec(v).unwrap_or_default());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Puts the hash of `obj` (without it) into its annotations.
fn stamped(mut obj: Value) -> (Value, String) {
    let h = hash(&obj);
    obj["metadata"]["annotations"][ANNOTATION_HASH] = json!(h);
    (obj, h)
}

/// Every Service and Endpoints object the hub wants, by name: for each
/// LoadBalancer Gateway (with a uid, for the owner reference) and each
/// endpoint type that `raven-cfg` switches on and its spec lists.
/// `tunnel_port` gives the UDP port a node's tunnel listens on, as its agent
/// reported it.
pub fn desired(
    published: &Published,
    tunnel_port: impl Fn(&str) -> Option<u16>,
) -> BTreeMap<String, Desired> {
    let settings = match published
        .topology
        .resources
        .get(&ResourceName::settings())
        .map(|r| &r.body)
    {
        Some(ResourceBody::Settings(s)) => s.clone(),
        _ => return BTreeMap::new(),
    };
    let mut out = BTreeMap::new();
    for (name, compiled) in &published.gateways {
        let gw = name.as_str();
        let spec = &compiled.gateway.spec;
        if spec.expose_type != v1beta1::EXPOSE_TYPE_LOAD_BALANCER {
            continue;
        }
        let Some(uid) = published.observed.get(gw).and_then(|o| o.uid.clone()) else {
            continue;
        };
        for (type_, on, prefix, protocol) in [
            (
                v1beta1::TUNNEL,
                settings.enable_l3_tunnel,
                TUNNEL_SERVICE_PREFIX,
                "UDP",
            ),
            (
                v1beta1::PROXY,
                settings.enable_l7_proxy,
                PROXY_SERVICE_PREFIX,
                "TCP",
            ),
        ] {
            let Some(listed) = spec.endpoints.iter().find(|e| e.type_ == type_) else {
                continue;
            };
            if !on {
                continue;
            }
            let active: Vec<&v1beta1::Endpoint> = compiled
                .status
                .active_endpoints
                .iter()
                .filter(|e| e.type_ == type_)
                .collect();
            let port = active.first().map_or(listed.port, |e| e.port);
            let target = |node: &str| match type_ {
                v1beta1::TUNNEL => {
                    tunnel_port(node).map_or(v1beta1::DEFAULT_TUNNEL_SERVER_EXPOSED_PORT, i32::from)
                }
                _ => v1beta1::DEFAULT_PROXY_SERVER_EXPOSED_PORT,
            };
            let addresses: Vec<(String, &str)> = active
                .iter()
                .filter_map(|e| {
                    compiled
                        .status
                        .nodes
                        .iter()
                        .find(|n| n.node_name == e.node_name && !n.private_ip.is_empty())
                        .map(|n| (n.private_ip.clone(), e.node_name.as_str()))
                })
                .collect();
            let target_port = addresses.first().map_or_else(
                || {
                    active
                        .first()
                        .map_or_else(|| target(&listed.node_name), |e| target(&e.node_name))
                },
                |(_, node)| target(node),
            );
            let object = service_name(prefix, gw);
            let mut labels = json!({
                api::LABEL_GATEWAY: gw,
                LABEL_GATEWAY_TYPE: type_,
                LABEL_MANAGED_BY: MANAGED_BY,
            });
            if let [only] = active.as_slice() {
                labels[LABEL_ENDPOINTS_NAME] = json!(only.node_name);
            }
            // A label value is at most 63 characters; the owner reference
            // names the Gateway whatever its length.
            if gw.len() > 63
                && let Some(l) = labels.as_object_mut()
            {
                l.remove(api::LABEL_GATEWAY);
            }
            let metadata = json!({
                "name": object,
                "namespace": api::CONFIG_NAMESPACE,
                "labels": labels,
                "annotations": {ANNOTATION_DISCARD: "true"},
                "ownerReferences": [{
                    "apiVersion": format!("{}/v1beta1", api::GROUP),
                    "kind": "Gateway",
                    "name": gw,
                    "uid": uid,
                    "controller": true,
                }],
            });
            let (service, service_hash) = stamped(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata,
                "spec": {
                    "type": "LoadBalancer",
                    "externalTrafficPolicy": "Local",
                    "ports": [{
                        "name": type_,
                        "protocol": protocol,
                        "port": port,
                        "targetPort": target_port,
                    }],
                },
            }));
            let subsets = if addresses.is_empty() {
                json!([])
            } else {
                json!([{
                    "addresses": addresses
                        .iter()
                        .map(|(ip, node)| json!({"ip": ip, "nodeName": node}))
                        .collect::<Vec<_>>(),
                    "ports": [{"name": type_, "port": target_port, "protocol": protocol}],
                }])
            };
            let (endpoints, endpoints_hash) = stamped(json!({
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": metadata,
                "subsets": subsets,
            }));
            out.insert(
                object,
                Desired {
                    service,
                    endpoints,
                    service_hash,
                    endpoints_hash,
                },
            );
        }
    }
    out
}

/// The leader's writes: what it applied last, until the watch echoes it.
#[derive(Debug)]
struct Writer {
    services: Api<Service>,
    endpoints: Api<Endpoints>,
    applied: BTreeMap<(Kind, String), (String, Instant)>,
    failing: bool,
}

impl Writer {
    fn new(client: Client) -> Self {
        Self {
            services: Api::namespaced(client.clone(), api::CONFIG_NAMESPACE),
            endpoints: Api::namespaced(client, api::CONFIG_NAMESPACE),
            applied: BTreeMap::new(),
            failing: false,
        }
    }

    async fn sync(&mut self, published: &Published, index: &IndexHandle) {
        if !published.ready || !published.fresh {
            return;
        }
        let (fresh, services, endpoints, want) = index.read(|i| {
            let fresh = i.is_kind_fresh(Kind::Service) && i.is_kind_fresh(Kind::Endpoints);
            let services: BTreeMap<String, Exposed> = i
                .exposed(Kind::Service)
                .map(|(n, e)| (n.to_owned(), e.clone()))
                .collect();
            let endpoints: BTreeMap<String, Exposed> = i
                .exposed(Kind::Endpoints)
                .map(|(n, e)| (n.to_owned(), e.clone()))
                .collect();
            let want = desired(published, |node| {
                raven_core::NodeName::new(node.to_owned())
                    .ok()
                    .and_then(|n| i.report(&n).and_then(|r| r.tunnel_port))
            });
            (fresh, services, endpoints, want)
        });
        if !fresh {
            // Without a complete list the hub could recreate what is there
            // or miss what it must delete.
            return;
        }
        let mut errors = Vec::new();
        for (name, d) in &want {
            for (kind, shown, h, obj) in [
                (Kind::Service, &services, &d.service_hash, &d.service),
                (Kind::Endpoints, &endpoints, &d.endpoints_hash, &d.endpoints),
            ] {
                if shown.get(name).and_then(|e| e.hash.as_ref()) == Some(h) {
                    self.applied.remove(&(kind, name.clone()));
                    continue;
                }
                let key = (kind, name.clone());
                if self
                    .applied
                    .get(&key)
                    .is_some_and(|(a, at)| a == h && at.elapsed() < ECHO_WAIT)
                {
                    continue;
                }
                match self.apply(kind, name, obj).await {
                    Ok(()) => {
                        tracing::info!(kind = ?kind, name = %name, "kept for a LoadBalancer Gateway: applied");
                        self.applied.insert(key, (h.clone(), Instant::now()));
                    }
                    Err(e) => errors.push(format!("applying {kind:?} kube-system/{name}: {e}")),
                }
            }
        }
        for (kind, shown) in [(Kind::Service, &services), (Kind::Endpoints, &endpoints)] {
            for name in shown.keys().filter(|n| !want.contains_key(*n)) {
                let result = match kind {
                    Kind::Service => self
                        .services
                        .delete(name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                    _ => self
                        .endpoints
                        .delete(name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                };
                let gone = matches!(&result, Err(kube::Error::Api(s)) if s.code == 404);
                match result {
                    _ if gone => {}
                    Ok(()) => {
                        tracing::info!(kind = ?kind, name = %name, "no longer wanted for a LoadBalancer Gateway: deleted");
                    }
                    Err(e) => errors.push(format!("deleting {kind:?} kube-system/{name}: {e}")),
                }
            }
        }
        self.applied.retain(|(_, n), _| want.contains_key(n));
        match (errors.first(), self.failing) {
            (Some(first), false) => {
                tracing::warn!(error = %first, failed = errors.len(), "keeping the LoadBalancer Services failed; retrying");
            }
            (None, true) => tracing::info!("the LoadBalancer Services are kept again"),
            _ => {}
        }
        self.failing = !errors.is_empty();
    }

    async fn apply(&self, kind: Kind, name: &str, obj: &Value) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match kind {
            Kind::Service => self
                .services
                .patch(name, &params, &Patch::Apply(obj))
                .await
                .map(|_| ()),
            _ => self
                .endpoints
                .patch(name, &params, &Patch::Apply(obj))
                .await
                .map(|_| ()),
        }
    }
}

/// Keeps the Services and Endpoints of LoadBalancer Gateways while this
/// replica leads (`leading`), until `shutdown`.
pub async fn run(
    client: Client,
    mut published: PublishedRx,
    index: IndexHandle,
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut writer = Writer::new(client);
    loop {
        let lead = *leading.borrow_and_update();
        if lead {
            let current = published.borrow_and_update().clone();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = writer.sync(&current, &index) => {}
            }
        } else {
            writer.applied.clear();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RESYNC) => {}
            r = published.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_ravens_prefix_and_the_gateway_or_a_valid_shortening() {
        assert_eq!(
            service_name(TUNNEL_SERVICE_PREFIX, "gw-cloud"),
            "x-raven-tunnel-svc-gw-cloud"
        );
        let long = "g".repeat(60);
        let a = service_name(PROXY_SERVICE_PREFIX, &long);
        assert!(a.len() <= 63 && a.starts_with("x-raven-proxy-svc-g"), "{a}");
        // Dots are not allowed in a Service name; `a.b` and `a-b` differ.
        let dotted = service_name(TUNNEL_SERVICE_PREFIX, "a.b");
        assert!(!dotted.contains('.'));
        assert_ne!(dotted, service_name(TUNNEL_SERVICE_PREFIX, "a-b"));
    }
}
