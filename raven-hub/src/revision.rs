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

    /// Opens (or creates) the persisted sequence under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, RevisionError> {
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
        let state = match store.get_record(RECORD)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?,
            None => {
                let s = RevisionState {
                    epoch: new_epoch(),
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

    /// Advances the sequence if `topology`'s resources differ from the last
    /// revision's, persisting before returning. Returns the (possibly
    /// unchanged) state.
    pub fn advance(&mut self, topology: &Topology) -> Result<&RevisionState, RevisionError> {
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
            revision: self.state.revision + 1,
            versions,
        };
        if let Some(store) = &self.store {
            store.put_records(&[(RECORD, &serde_json::to_vec(&next).unwrap_or_default())])?;
        }
        self.state = next;
        Ok(&self.state)
    }
}
