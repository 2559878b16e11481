//! What agents reported about themselves, persisted per node so a hub
//! restart keeps every tunnel peer: each node's report is its own store
//! record, written by a coalescing writer on the blocking pool, never on the
//! async runtime.

use std::collections::{BTreeMap, BTreeSet};

use raven_store::Store;

use crate::revision::RevisionError;

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
/// The index owns the reports the hub serves from; this is only their way to
/// disk. Each node's report is its own record, so one node's report costs
/// only its own bytes to persist, whatever the others hold. [`Reports::put`]
/// queues a changed report in memory (no copy of the others is kept here);
/// [`Reports::run_writer`] writes the queued nodes' records in one durable
/// commit, coalesced (at most one commit per [`WRITE_EVERY`]), on the
/// blocking pool, and once more at shutdown.
#[derive(Debug, Clone)]
pub struct Reports {
    store: Option<Store>,
    /// Reports written since the last commit, latest per node.
    pending:
        std::sync::Arc<std::sync::Mutex<BTreeMap<raven_core::NodeName, raven_core::AgentReport>>>,
    /// Every node with a record (the node list record).
    nodes: std::sync::Arc<std::sync::Mutex<BTreeSet<raven_core::NodeName>>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

/// Least time between two commits of reports.
pub const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

type Loaded = BTreeMap<raven_core::NodeName, raven_core::AgentReport>;

impl Reports {
    /// Opens the persisted reports (none without a store): the writer, and
    /// every stored report for the index to take in.
    pub fn load(store: Option<Store>) -> Result<(Self, Loaded), RevisionError> {
        let mut all = BTreeMap::new();
        let mut pending = BTreeMap::new();
        if let Some(s) = &store {
            if let Some(bytes) = s.get_record(LEGACY_REPORTS_RECORD)? {
                all = serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?;
                // Written again as per-node records by the writer.
                pending.clone_from(&all);
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
        let reports = Self {
            store,
            nodes: std::sync::Arc::new(std::sync::Mutex::new(all.keys().cloned().collect())),
            pending: std::sync::Arc::new(std::sync::Mutex::new(pending)),
            wake: std::sync::Arc::default(),
        };
        Ok((reports, all))
    }

    /// Queues a changed report for the writer.
    pub fn put(&self, node: raven_core::NodeName, report: raven_core::AgentReport) {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.clone());
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node, report);
        self.wake.notify_one();
    }

    /// Writes what is queued, blocking: the queued nodes' records and the
    /// node list, in one commit.
    pub fn flush(&self) -> Result<usize, RevisionError> {
        let Some(store) = &self.store else {
            self.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
            return Ok(0);
        };
        let pending = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if pending.is_empty() {
            return Ok(0);
        }
        let nodes = {
            let nodes = self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            serde_json::to_vec(&*nodes).unwrap_or_default()
        };
        let records: Vec<(String, Vec<u8>)> = pending
            .iter()
            .filter_map(|(n, report)| Some((report_record(n), serde_json::to_vec(report).ok()?)))
            .collect();
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
