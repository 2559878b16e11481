//! The hub's view of the cluster, fed by the sources and read by the
//! pipeline. Synchronous (`apply`/`delete`/`reset` on `&mut self`), so every
//! source event is a plain, testable state change.
//!
//! A Gateway that fails validation never replaces its last good version: the
//! index keeps serving the previous one and reports the problem, so one bad
//! edit cannot cut a domain off.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use raven_core::api::v1beta1::Gateway;
use raven_core::compile::admit;
use raven_core::{AgentReport, ClusterNode, Inputs, NodeName, Problem, RavenConfig};

/// The kinds of object a source delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Gateway,
    Node,
    Config,
}

#[derive(Debug, Clone, Default)]
struct GatewayEntry {
    /// The last version that passed validation, if any did.
    good: Option<Gateway>,
    /// Problems of the latest version (empty when it is the good one).
    problems: Vec<Problem>,
}

/// The cluster as the sources last described it.
#[derive(Debug, Clone, Default)]
pub struct Index {
    gateways: BTreeMap<String, GatewayEntry>,
    nodes: BTreeMap<String, Result<(ClusterNode, Vec<Problem>), Problem>>,
    config: RavenConfig,
    reports: BTreeMap<NodeName, AgentReport>,
    synced: BTreeSet<Kind>,
    /// Problems a source found outside any single object (e.g. a broken file).
    source_problems: Vec<Problem>,
    /// Highest Kubernetes resourceVersion seen (etcd's revision): the same
    /// cluster state gives every hub replica the same floor, so revisions
    /// stay comparable across replicas of one epoch.
    high_water: u64,
}

fn resource_version(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Index {
    pub fn apply_gateway(&mut self, gw: Gateway) {
        self.see(resource_version(&gw.metadata));
        let name = gw.metadata.name.clone().unwrap_or_default();
        let entry = self.gateways.entry(name).or_default();
        match admit(&gw) {
            Ok(_) => {
                entry.good = Some(gw);
                entry.problems.clear();
            }
            Err(mut problems) => {
                if entry.good.is_some() {
                    for p in &mut problems {
                        p.message
                            .push_str("; serving the last valid version of this Gateway");
                    }
                }
                entry.problems = problems;
            }
        }
    }

    pub fn delete_gateway(&mut self, name: &str) {
        self.gateways.remove(name);
    }

    /// Replaces all gateways (a relist). Last good versions of gateways that
    /// are still present are kept.
    pub fn reset_gateways(&mut self, gws: Vec<Gateway>) {
        let present: BTreeSet<String> =
            gws.iter().filter_map(|g| g.metadata.name.clone()).collect();
        self.gateways.retain(|name, _| present.contains(name));
        for gw in gws {
            self.apply_gateway(gw);
        }
    }

    pub fn apply_node(&mut self, node: &Node) {
        self.see(resource_version(&node.metadata));
        let name = node.metadata.name.clone().unwrap_or_default();
        self.nodes.insert(name, ClusterNode::from_k8s(node));
    }

    pub fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn reset_nodes(&mut self, nodes: &[Node]) {
        self.nodes.clear();
        for n in nodes {
            self.apply_node(n);
        }
    }

    /// Sets (or, with `None`, removes) the `raven-cfg` ConfigMap.
    pub fn set_config(&mut self, cm: Option<&ConfigMap>) {
        if let Some(cm) = cm {
            self.see(resource_version(&cm.metadata));
        }
        self.config = cm.map(RavenConfig::from_configmap).unwrap_or_default();
    }

    /// Sets nodes from already-parsed manifests.
    pub fn reset_cluster_nodes(&mut self, nodes: impl IntoIterator<Item = ClusterNode>) {
        self.nodes = nodes
            .into_iter()
            .map(|n| (n.name.to_string(), Ok((n, Vec::new()))))
            .collect();
    }

    pub fn set_raven_config(&mut self, config: RavenConfig) {
        self.config = config;
    }

    pub fn set_source_problems(&mut self, problems: Vec<Problem>) {
        self.source_problems = problems;
    }

    /// Records what an agent reported about itself. Returns whether anything
    /// changed.
    pub fn set_report(&mut self, node: NodeName, report: AgentReport) -> bool {
        if self.reports.get(&node) == Some(&report) {
            return false;
        }
        self.reports.insert(node, report);
        true
    }

    /// Forgets the local failover a node reported (it disconnected).
    /// Returns whether anything changed.
    pub fn withdraw_failover_claim(&mut self, node: &NodeName) -> bool {
        match self.reports.get_mut(node) {
            Some(r) if !r.local_failover.is_empty() => {
                r.local_failover.clear();
                true
            }
            _ => false,
        }
    }

    /// Records a resourceVersion observed from the API server (objects,
    /// deletions, bookmarks, list metadata).
    pub fn see(&mut self, resource_version: u64) {
        self.high_water = self.high_water.max(resource_version);
    }

    /// The highest resourceVersion observed; 0 outside Kubernetes.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    pub fn mark_synced(&mut self, kind: Kind) {
        self.synced.insert(kind);
    }

    /// Every source has delivered its initial list.
    pub fn is_synced(&self) -> bool {
        [Kind::Gateway, Kind::Node, Kind::Config]
            .iter()
            .all(|k| self.synced.contains(k))
    }

    /// The compiler's inputs, and the problems found on the way in.
    pub fn inputs(&self) -> (Inputs, Vec<Problem>) {
        let mut problems = self.source_problems.clone();
        let mut inputs = Inputs {
            config: self.config,
            reports: self.reports.clone(),
            ..Default::default()
        };
        for (name, entry) in &self.gateways {
            problems.extend(entry.problems.iter().cloned());
            if let Some(gw) = &entry.good {
                inputs.gateways.insert(name.clone(), gw.clone());
            }
        }
        for node in self.nodes.values() {
            match node {
                Ok((n, ps)) => {
                    problems.extend(ps.iter().cloned());
                    inputs.nodes.insert(n.name.clone(), n.clone());
                }
                Err(p) => problems.push(p.clone()),
            }
        }
        (inputs, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_core::api::v1beta1::{Endpoint, GatewaySpec, TunnelConfiguration};

    fn gw(replicas: i32) -> Gateway {
        Gateway::new(
            "gw-a",
            GatewaySpec {
                tunnel_config: TunnelConfiguration { replicas },
                endpoints: vec![Endpoint {
                    node_name: "n1".into(),
                    type_: "tunnel".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    #[test]
    fn invalid_update_keeps_serving_the_last_valid_gateway() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.apply_gateway(gw(5));
        let (inputs, problems) = idx.inputs();
        assert_eq!(inputs.gateways["gw-a"].spec.tunnel_config.replicas, 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "spec.tunnelConfig.Replicas");
        assert!(
            problems[0]
                .message
                .contains("serving the last valid version")
        );
    }

    #[test]
    fn invalid_new_gateway_is_reported_and_not_served() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(5));
        let (inputs, problems) = idx.inputs();
        assert!(inputs.gateways.is_empty());
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn fixing_a_gateway_clears_its_problem() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.apply_gateway(gw(5));
        idx.apply_gateway(gw(0));
        let (inputs, problems) = idx.inputs();
        assert_eq!(inputs.gateways["gw-a"].spec.tunnel_config.replicas, 0);
        assert!(problems.is_empty());
    }

    #[test]
    fn relist_drops_gateways_that_disappeared() {
        let mut idx = Index::default();
        idx.apply_gateway(gw(1));
        idx.reset_gateways(vec![]);
        assert!(idx.inputs().0.gateways.is_empty());
    }

    #[test]
    fn serves_only_after_every_source_synced() {
        let mut idx = Index::default();
        idx.mark_synced(Kind::Gateway);
        idx.mark_synced(Kind::Node);
        assert!(!idx.is_synced());
        idx.mark_synced(Kind::Config);
        assert!(idx.is_synced());
    }
}

/// A shared [`Index`]: sources update it, the pipeline is woken on every
/// change.
#[derive(Debug, Clone, Default)]
pub struct IndexHandle {
    inner: std::sync::Arc<std::sync::Mutex<Index>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
}

impl IndexHandle {
    /// Runs `f` on the index and wakes the pipeline.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let mut r = None;
        self.update_if(|idx| {
            r = Some(f(idx));
            true
        });
        r.unwrap_or_else(|| unreachable!("update_if always runs its closure"))
    }

    /// Changes the index; wakes the pipeline only when `f` says it changed
    /// something (agents re-send unchanged reports all the time).
    pub fn update_if(&self, f: impl FnOnce(&mut Index) -> bool) -> bool {
        let changed = {
            let mut idx = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut idx)
        };
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Reads the index without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        let idx = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&idx)
    }

    /// Resolves after the next `update`.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
