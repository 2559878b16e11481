//! The agent's copy of its node view: decoded resources plus the store they
//! are persisted in. Applying an Update is a pure check (`check_update`)
//! followed by one atomic, durable commit.
//!
//! The edge's autonomy rules enforced here: nothing expires; removal only by
//! explicit name or by garbage collection after a *completed* snapshot; a
//! mass removal the hub did not mark intentional is refused (NACKed) and the
//! last good state stays; an older revision of the same epoch is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prost::Message;
use raven_model::topology::{DomainPrefixes, GatewayView, NodeView, PeerInfo, Settings};
use raven_model::{ContentVersion, NodeName, Resource, ResourceBody, ResourceName};
use raven_proto::{DecodedUpdate, v1};
use raven_store::{Commit, Meta, Store, StoreError, StoreOptions, StoredResource};

/// The state the agent holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedState {
    pub epoch: String,
    pub revision: u64,
    /// Came from a completed snapshot (or deltas on top of one).
    pub complete: bool,
    pub resources: BTreeMap<ResourceName, Resource>,
}

/// Why an Update is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(raven_proto::ConversionError),
    #[error("revision {got} of epoch {epoch} is older than the revision {held} this node holds")]
    Older { epoch: String, got: u64, held: u64 },
    #[error(
        "held back: this update would remove {removing} of the {held} resources this node holds and the hub did not mark the removal intentional"
    )]
    MassRemoval { removing: usize, held: usize },
}

impl Refusal {
    /// The NACK detail.
    pub fn detail(&self) -> v1::ErrorDetail {
        match self {
            Refusal::Invalid(e) => v1::ErrorDetail::from(e),
            other => v1::ErrorDetail {
                message: other.to_string(),
                ..Default::default()
            },
        }
    }
}

/// The outcome of checking an Update against the held state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub next: CachedState,
    pub put: BTreeMap<ResourceName, Resource>,
    pub remove: BTreeSet<ResourceName>,
}

/// Snapshot parts received so far in the current snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub seen: BTreeSet<ResourceName>,
}

/// Checks an Update and computes the next state. Pure.
pub fn check_update(
    held: &CachedState,
    update: &DecodedUpdate,
    progress: &mut SnapshotProgress,
) -> Result<Accepted, Refusal> {
    let h = &update.header;
    if h.epoch == held.epoch && h.revision < held.revision {
        return Err(Refusal::Older {
            epoch: h.epoch.clone(),
            got: h.revision,
            held: held.revision,
        });
    }
    let mut next = held.clone();
    let mut put = BTreeMap::new();
    for (name, r) in &update.resources {
        if held.resources.get(name) != Some(r) {
            put.insert(name.clone(), r.clone());
        }
        next.resources.insert(name.clone(), r.clone());
    }
    let mut remove: BTreeSet<ResourceName> = h.removed.iter().cloned().collect();
    if h.snapshot {
        progress
            .seen
            .extend(update.resources.iter().map(|(n, _)| n.clone()));
        if h.snapshot_complete {
            // Garbage collection, only after the completion marker.
            remove.extend(
                held.resources
                    .keys()
                    .filter(|n| !progress.seen.contains(*n))
                    .cloned(),
            );
        }
    }
    remove.retain(|n| {
        held.resources.contains_key(n)
            && !put.contains_key(n)
            && !update.resources.iter().any(|(u, _)| u == n)
    });
    let held_count = held.resources.len();
    // A domain traded for its other form (`gateway/<g>` for `prefixes/<g>`,
    // when the node's role changes) is not a removal of it.
    let lost = raven_model::view::lost(&remove, |c| {
        next.resources.contains_key(c) && !remove.contains(c)
    });
    if !h.intentional_removal && raven_model::view::is_mass_removal(lost, held_count) {
        return Err(Refusal::MassRemoval {
            removing: lost,
            held: held_count,
        });
    }
    for n in &remove {
        next.resources.remove(n);
    }
    next.epoch = h.epoch.clone();
    next.revision = h.revision;
    if h.snapshot_complete {
        next.complete = true;
        progress.seen.clear();
    } else if h.snapshot {
        // A snapshot in progress: until it completes, the cache is not known
        // to be complete.
        next.complete = false;
    }
    Ok(Accepted { next, put, remove })
}

/// The node's view, assembled from the cached resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub me: NodeView,
    pub settings: Option<Settings>,
    pub gateways: Vec<GatewayView>,
    /// Other domains by their prefixes alone (the compact member view).
    pub remote: Vec<DomainPrefixes>,
    pub peers: Vec<PeerInfo>,
}

impl CachedState {
    /// The view of `node`, if its own resource is held.
    pub fn view(&self, node: &NodeName) -> Option<View> {
        let me = match self
            .resources
            .get(&ResourceName::node(node))
            .map(|r| &r.body)
        {
            Some(ResourceBody::Node(n)) => n.clone(),
            _ => return None,
        };
        let mut settings = None;
        let mut gateways = Vec::new();
        let mut remote = Vec::new();
        let mut peers = Vec::new();
        for r in self.resources.values() {
            match &r.body {
                ResourceBody::Settings(s) => settings = Some(s.clone()),
                ResourceBody::Gateway(g) => gateways.push(g.clone()),
                ResourceBody::Peer(p) => peers.push(p.clone()),
                ResourceBody::Prefixes(p) => remote.push(p.clone()),
                ResourceBody::Node(_) => {}
            }
        }
        Some(View {
            me,
            settings,
            gateways,
            remote,
            peers,
        })
    }

    /// The digest of [`Self::inventory`] (`Hello.inventory_digest`).
    pub fn digest(&self) -> raven_proto::digest::Digest {
        raven_proto::digest::Digest::of(
            self.resources
                .iter()
                .map(|(n, r)| (n.as_str(), r.version.as_str())),
        )
    }

    /// Name and version of every resource held, for a Hello.
    pub fn inventory(&self) -> Vec<(ResourceName, ContentVersion)> {
        self.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cached resource {name} is unusable: {reason}")]
    BadResource { name: String, reason: String },
}

/// The persisted cache.
#[derive(Debug, Clone)]
pub struct Cache {
    store: Store,
    /// Why the store found at open was unusable (it was moved aside).
    recovered: Option<String>,
}

/// Store identity of a node's cache.
pub fn purpose(node: &NodeName) -> String {
    format!("raven-edge/{node}")
}

fn decode_stored(
    name: &str,
    stored: &StoredResource,
) -> Result<(ResourceName, Resource), CacheError> {
    let bad = |reason: String| CacheError::BadResource {
        name: name.to_owned(),
        reason,
    };
    let proto = v1::Resource::decode(stored.payload.clone()).map_err(|e| bad(e.to_string()))?;
    let (n, r) = raven_proto::resource_from_proto(&proto).map_err(|e| bad(e.to_string()))?;
    if n.as_str() != name || r.version.as_str() != stored.version {
        return Err(bad(format!(
            "stored under {name}@{} but holds {n}@{}",
            stored.version, r.version
        )));
    }
    Ok((n, r))
}

/// Decodes a store snapshot into a state, checking every resource.
pub fn decode_snapshot(snap: &raven_store::Snapshot) -> Result<CachedState, CacheError> {
    let mut state = CachedState::default();
    if let Some(m) = &snap.meta {
        state.epoch = m.epoch.clone();
        state.revision = m.revision;
        state.complete = m.complete;
    }
    for (name, stored) in &snap.resources {
        let (n, r) = decode_stored(name, stored)?;
        state.resources.insert(n, r);
    }
    Ok(state)
}

impl Cache {
    /// Opens the cache of `node` under `data_dir`. A corrupt or foreign cache
    /// is moved aside by the store (and reported); a cache whose resources do
    /// not decode is treated the same way.
    pub fn open(
        data_dir: &Path,
        node: &NodeName,
        max_bytes: u64,
    ) -> Result<(Self, CachedState), CacheError> {
        let dir = data_dir.join("cache");
        let opts = StoreOptions {
            purpose: purpose(node),
            max_bytes,
            ..Default::default()
        };
        let opened = Store::open(&dir, opts.clone())?;
        if let Some(r) = &opened.recovery {
            tracing::error!(reason = %r.reason, moved_to = %r.moved_to.display(), "the topology cache was unusable; moved aside, starting from an empty cache until the hub is reached");
        }
        let recovered = opened.recovery.map(|r| r.reason.to_string());
        let store = opened.store;
        match decode_snapshot(&opened.snapshot) {
            Ok(state) => Ok((Self { store, recovered }, state)),
            Err(e) => {
                tracing::error!(error = %e, "the topology cache holds an undecodable resource; moving it aside");
                drop(store);
                let moved = dir.with_extension(format!("undecodable-{}", std::process::id()));
                std::fs::rename(&dir, &moved).map_err(|source| StoreError::MoveAside {
                    from: dir.clone(),
                    to: moved,
                    source,
                })?;
                let store = Store::open(&dir, opts)?.store;
                let recovered = Some(e.to_string());
                Ok((Self { store, recovered }, CachedState::default()))
            }
        }
    }

    /// Persists an accepted update (one atomic, durable commit).
    pub fn commit(&self, a: &Accepted) -> Result<(), CacheError> {
        let put = a
            .put
            .iter()
            .map(|(n, r)| {
                let payload = raven_proto::resource_to_proto(n, r).encode_to_vec();
                (
                    n.to_string(),
                    StoredResource {
                        version: r.version.to_string(),
                        payload: payload.into(),
                    },
                )
            })
            .collect();
        let meta = Meta {
            epoch: a.next.epoch.clone(),
            revision: a.next.revision,
            complete: a.next.complete,
            written_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        self.store.commit(Commit {
            meta,
            put,
            remove: a.remove.iter().map(ToString::to_string).collect(),
        })?;
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Why the cache found at open was unusable and moved aside, if it was.
    pub fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures;
    use raven_model::topology::Settings;
    use raven_proto::UpdateHeader;

    fn res(n: u16) -> (ResourceName, Resource) {
        let view = fixtures::node_view(&format!("n{n}"), None);
        let name = ResourceName::node(&view.name);
        (name, Resource::new(ResourceBody::Node(view)))
    }

    fn settings(port: u16) -> (ResourceName, Resource) {
        let body = ResourceBody::Settings(Settings {
            vxlan_port: port,
            ..fixtures::settings()
        });
        (ResourceName::settings(), Resource::new(body))
    }

    fn held(n: u16) -> CachedState {
        CachedState {
            epoch: "e".into(),
            revision: 5,
            complete: true,
            resources: (0..n).map(res).collect(),
        }
    }

    fn update(h: UpdateHeader, resources: Vec<(ResourceName, Resource)>) -> DecodedUpdate {
        DecodedUpdate {
            header: h,
            resources,
        }
    }

    fn header(revision: u64) -> UpdateHeader {
        UpdateHeader {
            epoch: "e".into(),
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn delta_adds_and_explicitly_removes() {
        let mut h = header(6);
        h.removed = vec![res(0).0];
        let a = check_update(
            &held(2),
            &update(h, vec![settings(4472)]),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.next.revision, 6);
        assert_eq!(
            a.next
                .resources
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["node/n1", "settings"]
        );
        assert_eq!(a.remove.len(), 1);
    }

    #[test]
    fn an_empty_delta_removes_nothing() {
        let a = check_update(
            &held(6),
            &update(header(7), vec![]),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.next.resources.len(), 6);
        assert!(a.remove.is_empty());
    }

    #[test]
    fn older_revision_of_the_same_epoch_is_refused() {
        let r = check_update(
            &held(1),
            &update(header(4), vec![]),
            &mut SnapshotProgress::default(),
        );
        assert!(matches!(
            r,
            Err(Refusal::Older {
                got: 4,
                held: 5,
                ..
            })
        ));
    }

    #[test]
    fn another_epoch_is_not_compared_by_revision() {
        let mut h = header(1);
        h.epoch = "other".into();
        assert!(
            check_update(
                &held(1),
                &update(h, vec![]),
                &mut SnapshotProgress::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn snapshot_garbage_collects_only_after_the_completion_marker() {
        let mut progress = SnapshotProgress::default();
        let mut part1 = header(6);
        part1.snapshot = true;
        let a = check_update(&held(3), &update(part1, vec![res(0)]), &mut progress)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.next.resources.len(),
            3,
            "nothing removed before completion"
        );
        assert!(!a.next.complete);
        let mut part2 = header(6);
        part2.snapshot = true;
        part2.snapshot_complete = true;
        let b = check_update(&a.next, &update(part2, vec![res(1)]), &mut progress)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.next
                .resources
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["node/n0", "node/n1"]
        );
        assert!(b.next.complete);
    }

    #[test]
    fn mass_removal_not_marked_intentional_is_held_back() {
        let mut h = header(6);
        h.snapshot = true;
        h.snapshot_complete = true;
        let r = check_update(
            &held(10),
            &update(h.clone(), vec![res(0)]),
            &mut SnapshotProgress::default(),
        );
        assert_eq!(
            r,
            Err(Refusal::MassRemoval {
                removing: 9,
                held: 10
            })
        );
        h.intentional_removal = true;
        let a = check_update(
            &held(10),
            &update(h, vec![res(0)]),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.next.resources.len(), 1);
    }

    #[test]
    fn persisted_state_round_trips_through_the_store() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let node = NodeName::new("n0").unwrap_or_else(|_| unreachable!());
        let (cache, state) =
            Cache::open(dir.path(), &node, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state, CachedState::default());
        let mut h = header(1);
        h.snapshot = true;
        h.snapshot_complete = true;
        let a = check_update(
            &state,
            &update(h, vec![res(0), settings(4472)]),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        cache.commit(&a).unwrap_or_else(|e| panic!("{e}"));
        drop(cache);
        let (_, reopened) =
            Cache::open(dir.path(), &node, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened, a.next);
        assert!(reopened.view(&node).is_some());
    }

    /// A member of `gw-0` in a cluster of ten domains: its full view, its
    /// compact view (what the hub sends an agent that announces
    /// `CAPABILITY_COMPACT_MEMBER_VIEW`), and the node.
    type Named = Vec<(ResourceName, Resource)>;

    fn member_views() -> (Named, Named, NodeName) {
        let me = fixtures::node("m-0-2");
        let mut full = Vec::new();
        let mut compact = Vec::new();
        for g in 0..10u8 {
            let name = format!("gw-{g}");
            let gw = raven_model::topology::GatewayView {
                members: (0..3u8)
                    .map(|i| {
                        fixtures::member(
                            &format!("m-{g}-{i}"),
                            &format!("172.16.{g}.{}", i + 1),
                            &[&format!("10.{g}.{i}.0/24")],
                        )
                    })
                    .collect(),
                active_tunnel: Some(fixtures::endpoint(&format!("m-{g}-0"), 4500)),
                tunnel_candidates: vec![fixtures::endpoint(&format!("m-{g}-0"), 4500)],
                ..fixtures::gateway(&name)
            };
            let gw_name = ResourceName::gateway(&gw.name);
            let prefixes = raven_model::topology::DomainPrefixes::of(&gw);
            let body = ResourceBody::Gateway(gw);
            full.push((gw_name.clone(), Resource::new(body.clone())));
            if g == 0 {
                compact.push((gw_name, Resource::new(body)));
            } else {
                compact.push((
                    ResourceName::prefixes(&prefixes.gateway),
                    Resource::new(ResourceBody::Prefixes(prefixes)),
                ));
            }
        }
        let node = ResourceBody::Node(NodeView {
            private_ip: Some(fixtures::ip("172.16.0.3")),
            subnets: vec![fixtures::net("10.0.2.0/24")],
            ..fixtures::node_view(me.as_str(), Some("gw-0"))
        });
        for v in [&mut full, &mut compact] {
            v.push((ResourceName::node(&me), Resource::new(node.clone())));
            v.push(settings(4472));
        }
        (full, compact, me)
    }

    #[test]
    fn a_member_trades_its_full_view_for_the_compact_one_and_restarts_from_the_cache() {
        let (full, compact, me) = member_views();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (cache, empty) =
            Cache::open(dir.path(), &me, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        let mut h = header(1);
        h.snapshot = true;
        h.snapshot_complete = true;
        let a = check_update(
            &empty,
            &update(h.clone(), full),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        cache.commit(&a).unwrap_or_else(|e| panic!("{e}"));
        let local = crate::dataplane::Local::new("raven-wg0", 1500);
        let plan = |s: &CachedState| {
            let inputs = crate::dataplane::assemble(s.view(&me).as_ref(), &local, BTreeMap::new());
            (
                crate::dataplane::desired(&inputs),
                crate::dataplane::skipnat::spec(&inputs),
            )
        };
        let before = plan(&a.next);
        assert_eq!(
            before.0.state.routes.len(),
            9 * 6,
            "{:?}",
            before.0.warnings
        );
        // The first snapshot after the agent announced the compact view
        // (never marked intentional): nine gateways go, their prefixes come.
        h.revision = 2;
        let b = check_update(
            &a.next,
            &update(h.clone(), compact),
            &mut SnapshotProgress::default(),
        )
        .unwrap_or_else(|e| panic!("a trade of form is no mass removal: {e}"));
        assert_eq!(b.remove.len(), 9);
        cache.commit(&b).unwrap_or_else(|e| panic!("{e}"));
        drop(cache);
        let (_, reopened) = Cache::open(dir.path(), &me, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened, b.next);
        let view = reopened
            .view(&me)
            .unwrap_or_else(|| panic!("the node's view"));
        assert_eq!((view.gateways.len(), view.remote.len()), (1, 9));
        assert_eq!(plan(&reopened), before);
        // The guard still holds for a real loss: the nine domains gone
        // without their prefixes.
        let (full, _, _) = member_views();
        let gone: Vec<_> = full
            .into_iter()
            .filter(|(n, _)| !n.as_str().starts_with("gateway/") || n.as_str() == "gateway/gw-0")
            .collect();
        h.revision = 3;
        assert_eq!(
            check_update(&a.next, &update(h, gone), &mut SnapshotProgress::default()),
            Err(Refusal::MassRemoval {
                removing: 9,
                held: 12
            })
        );
    }
}
