//! The hub's `(epoch, revision)` sequence, persisted in raven-store so a hub
//! restart continues it: agents that are up to date get nothing re-sent, and
//! a revision number is never reused for different content.
//!
//! The revision grows by one exactly when the set of resources or one of
//! their content versions changes. The new state is durable before it is
//! published.

use std::collections::BTreeMap;
use std::path::Path;

use raven_core::{ContentVersion, ResourceName, Topology};
use raven_store::{Store, StoreError, StoreOptions};
use serde::{Deserialize, Serialize};

const RECORD: &str = "hub/revision";

/// One point of the revision sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionState {
    pub epoch: String,
    pub revision: u64,
    pub versions: BTreeMap<ResourceName, ContentVersion>,
}

/// Where the sequence is kept.
#[derive(Debug, Clone)]
pub struct Revisions {
    store: Option<Store>,
    state: RevisionState,
}

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("hub state store: {0}")]
    Store(#[from] StoreError),
    #[error("hub state record {RECORD} is unreadable: {0}")]
    Decode(serde_json::Error),
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Revisions {
    /// A sequence that lives in memory only (tests, `compile`).
    pub fn in_memory() -> Self {
        Self {
            store: None,
            state: RevisionState {
                epoch: new_epoch(),
                ..Default::default()
            },
        }
    }

    /// Opens (or creates) the persisted sequence under `data_dir`. With
    /// `epoch`, the sequence belongs to that epoch (shared by every replica
    /// of a Kubernetes-backed hub); a stored sequence of another epoch is
    /// replaced.
    pub fn open(data_dir: &Path, epoch: Option<&str>) -> Result<Self, RevisionError> {
        let opened = Store::open(
            &data_dir.join("hub-state"),
            StoreOptions {
                purpose: "raven-hub".to_owned(),
                ..StoreOptions::default()
            },
        )?;
        if let Some(r) = &opened.recovery {
            tracing::warn!(moved_to = %r.moved_to.display(), reason = %r.reason, "hub state store was unusable and has been moved aside; starting a new epoch");
        }
        let store = opened.store;
        let stored: Option<RevisionState> = match store.get_record(RECORD)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?),
            None => None,
        };
        let state = match stored {
            Some(s) if epoch.is_none_or(|e| e == s.epoch) => s,
            _ => {
                let s = RevisionState {
                    epoch: epoch.map_or_else(new_epoch, str::to_owned),
                    ..Default::default()
                };
                store.put_records(&[(RECORD, &serde_json::to_vec(&s).unwrap_or_default())])?;
                s
            }
        };
        tracing::info!(epoch = %state.epoch, revision = state.revision, "hub revision sequence loaded");
        Ok(Self {
            store: Some(store),
            state,
        })
    }

    pub fn current(&self) -> &RevisionState {
        &self.state
    }

    /// The persistent store, when there is one.
    pub fn store(&self) -> Option<Store> {
        self.store.clone()
    }

    /// Advances the sequence if `topology`'s resources differ from the last
    /// revision's, persisting before returning. Returns the (possibly
    /// unchanged) state.
    ///
    /// `floor` is the Kubernetes resourceVersion high-water mark (0 for
    /// manifests): a new revision is at least that, so hub replicas that
    /// share an epoch order the same cluster state alike.
    pub fn advance(
        &mut self,
        topology: &Topology,
        floor: u64,
    ) -> Result<&RevisionState, RevisionError> {
        let versions: BTreeMap<ResourceName, ContentVersion> = topology
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect();
        if versions == self.state.versions && self.state.revision > 0 {
            return Ok(&self.state);
        }
        let next = RevisionState {
            epoch: self.state.epoch.clone(),
            revision: (self.state.revision + 1).max(floor),
            versions,
        };
        if let Some(store) = &self.store {
            store.put_records(&[(RECORD, &serde_json::to_vec(&next).unwrap_or_default())])?;
        }
        self.state = next;
        Ok(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_core::topology::{Resource, ResourceBody, Settings};

    fn topo(port: u16) -> Topology {
        let mut t = Topology::default();
        let body = ResourceBody::Settings(Settings {
            raven_cfg_present: true,
            enable_l3_tunnel: true,
            enable_l7_proxy: true,
            vxlan_port: port,
            vpn_driver: Default::default(),
        });
        t.resources
            .insert(ResourceName::settings(), Resource::new(body));
        t
    }

    #[test]
    fn revision_grows_only_when_content_changes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (epoch, rev) = {
            let mut r = Revisions::open(dir.path(), None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.advance(&topo(1), 0).map(|s| s.revision).ok(), Some(1));
            assert_eq!(r.advance(&topo(1), 0).map(|s| s.revision).ok(), Some(1));
            assert_eq!(r.advance(&topo(2), 0).map(|s| s.revision).ok(), Some(2));
            (r.current().epoch.clone(), r.current().revision)
        };
        let mut r = Revisions::open(dir.path(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (r.current().epoch.clone(), r.current().revision),
            (epoch, rev)
        );
        assert_eq!(
            r.advance(&topo(2), 0).map(|s| s.revision).ok(),
            Some(2),
            "same content after restart: no new revision"
        );
    }

    #[test]
    fn kubernetes_high_water_mark_is_a_floor() {
        let mut r = Revisions::in_memory();
        assert_eq!(
            r.advance(&topo(1), 5000).map(|s| s.revision).ok(),
            Some(5000)
        );
        assert_eq!(r.advance(&topo(2), 10).map(|s| s.revision).ok(), Some(5001));
    }

    #[test]
    fn a_shared_epoch_replaces_a_stored_sequence_of_another_epoch() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        drop(Revisions::open(dir.path(), None).unwrap_or_else(|e| panic!("{e}")));
        let r = Revisions::open(dir.path(), Some("kube-abc")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.current().epoch, "kube-abc");
    }
}

/// Before per-node records: every report in one record (read at start only).
const LEGACY_REPORTS_RECORD: &str = "hub/reports";
/// The nodes that have a report record.
const REPORT_NODES_RECORD: &str = "hub/report-nodes";

/// The record holding one node's report.
fn report_record(node: &raven_core::NodeName) -> String {
    format!("hub/report/{node}")
}

/// What agents reported about themselves (WireGuard keys, endpoints), kept
/// across hub restarts: a restarted hub must not withdraw every tunnel peer
/// until each gateway has reported again.
///
/// Each node's report is its own record, so one node's report costs only its
/// own bytes to persist, whatever the others hold. [`Reports::put`] only
/// records the change in memory; [`Reports::run_writer`] writes the changed
/// nodes' records in one durable commit, coalesced (at most one commit per
/// [`WRITE_EVERY`]), off the async runtime, and once more at shutdown.
#[derive(Debug, Clone)]
pub struct Reports {
    store: Option<Store>,
    all: std::sync::Arc<std::sync::Mutex<BTreeMap<raven_core::NodeName, raven_core::AgentReport>>>,
    dirty: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<raven_core::NodeName>>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

/// Least time between two commits of reports.
pub const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Reports {
    /// Loads the persisted reports (none without a store).
    pub fn load(store: Option<Store>) -> Result<Self, RevisionError> {
        let mut all = BTreeMap::new();
        let mut dirty = std::collections::BTreeSet::new();
        if let Some(s) = &store {
            if let Some(bytes) = s.get_record(LEGACY_REPORTS_RECORD)? {
                all = serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?;
                // Written again as per-node records by the writer.
                dirty.extend(all.keys().cloned());
            }
            let nodes: Vec<raven_core::NodeName> = match s.get_record(REPORT_NODES_RECORD)? {
                Some(bytes) => serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?,
                None => Vec::new(),
            };
            for node in nodes {
                if let Some(bytes) = s.get_record(&report_record(&node))? {
                    let report = serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?;
                    all.insert(node, report);
                }
            }
        }
        Ok(Self {
            store,
            all: std::sync::Arc::new(std::sync::Mutex::new(all)),
            dirty: std::sync::Arc::new(std::sync::Mutex::new(dirty)),
            wake: std::sync::Arc::default(),
        })
    }

    pub fn all(&self) -> BTreeMap<raven_core::NodeName, raven_core::AgentReport> {
        self.all.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Records a report (in memory; the writer persists it). Returns whether
    /// it changed.
    pub fn put(&self, node: raven_core::NodeName, report: raven_core::AgentReport) -> bool {
        {
            let mut all = self
                .all
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if all.get(&node) == Some(&report) {
                return false;
            }
            all.insert(node.clone(), report);
        }
        self.dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node);
        self.wake.notify_one();
        true
    }

    /// Writes what changed, blocking: the changed nodes' records and the
    /// node list, in one commit.
    pub fn flush(&self) -> Result<usize, RevisionError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let dirty = std::mem::take(
            &mut *self
                .dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if dirty.is_empty() {
            return Ok(0);
        }
        let (nodes, records) = {
            let all = self
                .all
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let nodes: Vec<&raven_core::NodeName> = all.keys().collect();
            let records: Vec<(String, Vec<u8>)> = dirty
                .iter()
                .filter_map(|n| {
                    let report = all.get(n)?;
                    Some((report_record(n), serde_json::to_vec(report).ok()?))
                })
                .collect();
            (serde_json::to_vec(&nodes).unwrap_or_default(), records)
        };
        let mut batch: Vec<(&str, &[u8])> = records
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        batch.push((REPORT_NODES_RECORD, &nodes));
        store.put_records(&batch)?;
        Ok(records.len())
    }

    /// Persists changes until `shutdown`, then once more.
    pub async fn run_writer(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let stop = tokio::select! {
                () = shutdown.cancelled() => true,
                () = self.wake.notified() => false,
            };
            if !stop {
                // Coalesce a burst into one commit.
                tokio::time::sleep(WRITE_EVERY).await;
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.flush()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not persist agent reports"),
                Err(e) => tracing::warn!(error = %e, "the report writer failed"),
            }
            if stop {
                return;
            }
        }
    }
}
