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
            enable_l7_proxy: true,
            vxlan_port: port,
            ..raven_model::fixtures::settings()
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
