//! The agent table: every node that has opened a stream to this hub replica,
//! what it acknowledged, what it applied, its last NACK and its tunnel state
//! per peer. Read by the inspection RPCs and the metrics.
//!
//! What an agent reported that the hub acts on (its keys, a local failover
//! claim, probe verdicts) is not kept here: the index owns it, and the table
//! reads it from there, so `ListAgents` shows what the hub serves from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use raven_core::NodeName;
use raven_proto::v1;

use crate::index::IndexHandle;

/// One agent as this hub replica knows it.
#[derive(Debug, Clone, Default)]
pub struct AgentEntry {
    pub connected: bool,
    /// Bumped on each new stream, so a stale stream's exit does not mark a
    /// newer stream's agent disconnected.
    pub session: u64,
    pub connected_since: Option<SystemTime>,
    pub last_seen: Option<SystemTime>,
    pub remote_address: String,
    pub agent_version: String,
    pub protocol_version: u32,
    pub capabilities: Vec<i32>,
    pub acked: Option<(String, u64)>,
    pub applied: Option<v1::Applied>,
    /// Boxed: most agents never refuse an Update (144 B per node inline).
    pub last_nack: Option<Box<(v1::Nack, SystemTime)>>,
    /// Tunnel state per peer from the agent's last Report (diagnostics: the
    /// hub acts on none of it, so only this table keeps it).
    pub peers: Vec<v1::PeerTunnelState>,
}

/// Agents by state, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fleet {
    pub connected: u64,
    pub disconnected: u64,
    /// Connected agents that have not acknowledged the published revision.
    pub acked_behind: u64,
    /// Connected agents that have not applied the published revision.
    pub applied_behind: u64,
    /// Agents whose last Applied report was a failure.
    pub applied_failed: u64,
}

/// One node's entry of the table, held by its session: the session's
/// updates (every Ack, Applied and heartbeat of every agent) lock that entry
/// alone, with no lookup in the table and no lock of it, so thousands of
/// sessions answering one change never queue on one lock.
#[derive(Debug, Clone, Default)]
pub struct AgentHandle(Arc<Mutex<AgentEntry>>);

impl AgentHandle {
    /// Updates the entry; the agent was seen now.
    pub fn update<R>(&self, f: impl FnOnce(&mut AgentEntry) -> R) -> R {
        let mut entry = self.lock();
        entry.last_seen = Some(SystemTime::now());
        f(&mut entry)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentEntry> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Shared agent table. An entry, once made, stays (a disconnected agent is
/// listed with what it last did), so a session's [`AgentHandle`] is always
/// the table's entry of its node.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    inner: Arc<Mutex<BTreeMap<NodeName, AgentHandle>>>,
    replica: Arc<String>,
    /// Where the agents' reports are kept.
    index: IndexHandle,
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

impl Agents {
    pub fn new(replica: impl Into<String>, index: IndexHandle) -> Self {
        Self {
            inner: Arc::default(),
            replica: Arc::new(replica.into()),
            index,
        }
    }

    /// The entry of `node`, made if it has none.
    pub fn entry(&self, node: &NodeName) -> AgentHandle {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = map.get(node) {
            return h.clone();
        }
        map.entry(node.clone()).or_default().clone()
    }

    pub fn update<R>(&self, node: &NodeName, f: impl FnOnce(&mut AgentEntry) -> R) -> R {
        self.entry(node).update(f)
    }

    /// Records a new stream; returns its session number.
    pub fn connected(&self, node: &NodeName, hello: &v1::Hello, remote: String) -> u64 {
        self.update(node, |e| {
            e.session += 1;
            e.connected = true;
            e.connected_since = Some(SystemTime::now());
            e.remote_address = remote;
            e.agent_version = hello.agent_version.clone();
            e.protocol_version = hello.protocol_version;
            e.capabilities = hello.capabilities.clone();
            e.session
        })
    }

    /// Records that `node` has no stream any more (its last one ended and
    /// no newer one replaced it); returns whether it was connected.
    pub fn disconnected(&self, node: &NodeName) -> bool {
        let Some(h) = self.lookup(node) else {
            return false;
        };
        let mut e = h.lock();
        std::mem::replace(&mut e.connected, false)
    }

    pub fn connected_count(&self) -> usize {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().filter(|h| h.lock().connected).count()
    }

    /// Counts for the fleet metrics, against the published `(epoch,
    /// revision)`.
    pub fn fleet(&self, epoch: &str, revision: u64) -> Fleet {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut f = Fleet::default();
        for h in map.values() {
            let e = h.lock();
            if e.connected {
                f.connected += 1;
                let current = |v: Option<(&str, u64)>| v == Some((epoch, revision));
                if !current(e.acked.as_ref().map(|(ep, r)| (ep.as_str(), *r))) {
                    f.acked_behind += 1;
                }
                if !current(e.applied.as_ref().map(|a| (a.epoch.as_str(), a.revision))) {
                    f.applied_behind += 1;
                }
            } else {
                f.disconnected += 1;
            }
            if e.applied.as_ref().is_some_and(|a| !a.success) {
                f.applied_failed += 1;
            }
        }
        f
    }

    pub fn get(&self, node: &NodeName) -> Option<AgentEntry> {
        self.lookup(node).map(|h| h.lock().clone())
    }

    fn lookup(&self, node: &NodeName) -> Option<AgentHandle> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(node).cloned()
    }

    /// The table as the `ListAgents` RPC returns it, sorted by node.
    pub fn to_proto(&self) -> Vec<v1::AgentStatus> {
        let nodes: Vec<NodeName> = {
            let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            map.keys().cloned().collect()
        };
        // Read before the table is locked again: the two locks are never
        // held together.
        let reports: BTreeMap<NodeName, raven_core::AgentReport> = self.index.read(|i| {
            nodes
                .into_iter()
                .filter_map(|n| Some((n.clone(), i.report(&n)?.clone())))
                .collect()
        });
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .map(|(node, h)| (node, h.lock(), reports.get(node)))
            .map(|(node, e, report)| v1::AgentStatus {
                node_name: node.to_string(),
                connected: e.connected,
                hub_replica: self.replica.to_string(),
                // Only while connected, as documented: a disconnected agent
                // has no current stream.
                connected_since: e.connected.then_some(e.connected_since).flatten().map(ts),
                last_seen: e.last_seen.map(ts),
                acked_epoch: e.acked.as_ref().map(|a| a.0.clone()).unwrap_or_default(),
                acked_revision: e.acked.as_ref().map(|a| a.1).unwrap_or_default(),
                applied_epoch: e
                    .applied
                    .as_ref()
                    .map(|a| a.epoch.clone())
                    .unwrap_or_default(),
                applied_revision: e.applied.as_ref().map(|a| a.revision).unwrap_or_default(),
                applied_success: e.applied.as_ref().is_some_and(|a| a.success),
                applied_error: e.applied.as_ref().and_then(|a| a.error.clone()),
                last_nack: e.last_nack.as_deref().map(|(n, at)| v1::LastNack {
                    nonce: n.nonce.clone(),
                    epoch: n.epoch.clone(),
                    revision: n.revision,
                    error: n.error.clone(),
                    at: Some(ts(*at)),
                }),
                wireguard_public_key: report.and_then(|r| r.wireguard_public_key.clone()),
                peers: e.peers.clone(),
                agent_version: e.agent_version.clone(),
                capabilities: e.capabilities.clone(),
                protocol_version: e.protocol_version,
                remote_address: if e.connected {
                    e.remote_address.clone()
                } else {
                    String::new()
                },
                local_failover: report
                    .into_iter()
                    .flat_map(|r| &r.local_failover)
                    .map(|(gateway, node)| v1::LocalFailover {
                        gateway: gateway.to_string(),
                        active_node: node.to_string(),
                    })
                    .collect(),
                dead_candidates: report
                    .into_iter()
                    .flat_map(|r| &r.dead_candidates)
                    .map(NodeName::to_string)
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnected_agent_has_no_connected_since_and_no_remote_address_as_documented() {
        let agents = Agents::new("hub-0", IndexHandle::default());
        let node = NodeName::new("n1").expect("name");
        agents.connected(&node, &v1::Hello::default(), "198.51.100.7:40000".into());
        let up = agents.to_proto();
        assert!(up[0].connected_since.is_some());
        assert_eq!(up[0].remote_address, "198.51.100.7:40000");
        assert!(agents.disconnected(&node));
        assert!(!agents.disconnected(&node), "only once");
        let down = agents.to_proto();
        assert!(!down[0].connected);
        assert_eq!(down[0].connected_since, None);
        assert_eq!(down[0].remote_address, "");
        // What it last did stays visible.
        assert!(down[0].last_seen.is_some());
    }

    #[test]
    fn a_sessions_handle_updates_the_entry_the_table_lists_and_one_entry_per_node() {
        let agents = Agents::new("hub-0", IndexHandle::default());
        let node = NodeName::new("n1").expect("name");
        let handle = agents.entry(&node);
        agents.connected(&node, &v1::Hello::default(), String::new());
        // The handle is the table's entry: what it records is listed, and a
        // second handle of the same node is the same entry.
        handle.update(|e| e.acked = Some(("e".into(), 7)));
        assert_eq!(
            agents.get(&node).and_then(|e| e.acked),
            Some(("e".into(), 7))
        );
        agents.entry(&node).update(|e| {
            e.applied = Some(v1::Applied {
                revision: 7,
                ..Default::default()
            })
        });
        assert_eq!(
            handle.update(|e| e.applied.as_ref().map(|a| a.revision)),
            Some(7)
        );
        assert_eq!(agents.to_proto().len(), 1);
        assert_eq!(agents.fleet("e", 7).acked_behind, 0);
        assert!(agents.disconnected(&node));
        assert!(
            !handle.update(|e| e.connected),
            "the handle sees the disconnect"
        );
    }

    #[test]
    fn the_fleet_counts_agents_behind_the_published_revision() {
        let agents = Agents::new("hub-0", IndexHandle::default());
        for (name, acked) in [("a", 5), ("b", 4)] {
            let node = NodeName::new(name).expect("name");
            agents.connected(&node, &v1::Hello::default(), String::new());
            agents.update(&node, |e| e.acked = Some(("e".into(), acked)));
        }
        let f = agents.fleet("e", 5);
        assert_eq!((f.connected, f.disconnected, f.acked_behind), (2, 0, 1));
        assert_eq!(f.applied_behind, 2);
    }

    #[test]
    fn the_table_shows_the_report_the_index_holds() {
        let index = IndexHandle::default();
        let agents = Agents::new("hub-0", index.clone());
        let (n1, q1) = (
            NodeName::new("n1").expect("name"),
            NodeName::new("q1").expect("name"),
        );
        const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let gw = raven_core::GatewayName::new("gw-a").expect("name");
        index.update(|i| {
            i.set_report(
                n1.clone(),
                raven_core::AgentReport {
                    wireguard_public_key: Some(KEY.into()),
                    local_failover: [(gw, n1.clone())].into(),
                    dead_candidates: [q1.clone()].into(),
                    ..Default::default()
                },
            );
            // q1 claims n1's key: the index refuses it, so does the table.
            i.set_report(
                q1.clone(),
                raven_core::AgentReport {
                    wireguard_public_key: Some(KEY.into()),
                    ..Default::default()
                },
            )
        });
        for n in [&n1, &q1] {
            agents.connected(n, &v1::Hello::default(), String::new());
        }
        let listed = agents.to_proto();
        assert_eq!(listed[0].wireguard_public_key.as_deref(), Some(KEY));
        assert_eq!(listed[0].dead_candidates, ["q1"]);
        assert_eq!(listed[0].local_failover[0].gateway, "gw-a");
        assert_eq!(listed[0].local_failover[0].active_node, "n1");
        assert_eq!(listed[1].wireguard_public_key, None);
    }
}
