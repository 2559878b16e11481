//! Resuming by digest (`CAPABILITY_INVENTORY_DIGEST`, see
//! `proto/raven/v1/sync.proto`): an agent with a complete cache sends the
//! digest of its inventory instead of listing it, and the hub compares it
//! with the digest of the node's view.
//!
//! A view is the settings, the node's own resource and one or two whole
//! kinds (every `gateway/`, every `prefixes/` but the node's own domain's,
//! every `peer/`), so its digest — a sum ([`raven_proto::digest`]) — is a
//! handful of per-kind sums plus a few single resources. The per-kind sums
//! are computed once per published revision ([`Sums`]), not per session:
//! a session's check costs a few SHA-256 blocks, whatever the view's size.

use std::sync::{Arc, Mutex, PoisonError};

use raven_core::topology::{Resource, ResourceName, Topology};
use raven_core::view::{self, ViewClass};
use raven_core::{GatewayName, NodeName};
use raven_proto::digest::{Digest, of_pair};

use super::held::{Held, SharedEntries, Tag, tag};
use crate::pipeline::Published;

/// The digests of the kinds views are made of, for one topology.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KindDigests {
    gateways: Digest,
    /// The `gateway/` resources that carry a cloud proxy server (what a
    /// node in no gateway receives).
    proxy_gateways: Digest,
    prefixes: Digest,
    peers: Digest,
}

fn number(name: &ResourceName, r: &Resource) -> u128 {
    of_pair(name.as_str(), r.version.as_str())
}

impl KindDigests {
    /// One pass over the shared kinds of `topology`.
    pub fn of(topology: &Topology) -> Self {
        let mut d = Self::default();
        for (name, r) in &topology.resources {
            let s = name.as_str();
            if s.starts_with("gateway/") {
                let n = number(name, r);
                d.gateways.add_number(n);
                if view::serves_proxy(r) {
                    d.proxy_gateways.add_number(n);
                }
            } else if s.starts_with("prefixes/") {
                d.prefixes.add_number(number(name, r));
            } else if s.starts_with("peer/") {
                d.peers.add_number(number(name, r));
            }
        }
        d
    }

    /// The digest of `node`'s view of `topology` (the resources
    /// [`view::view_resources`] lists), from these sums and the few
    /// resources that are the node's own.
    pub fn view_digest(&self, topology: &Topology, node: &NodeName, compact: bool) -> Digest {
        let Some(me) = topology.node(node) else {
            return Digest::default();
        };
        let one = |name: ResourceName| {
            Digest(
                topology
                    .resources
                    .get(&name)
                    .map_or(0, |r| number(&name, r)),
            )
        };
        let mut d = match view::view_class(me, compact) {
            ViewClass::Full => self.gateways,
            ViewClass::Member => {
                let (own, others) = me.gateway.as_ref().map_or_else(
                    || (Digest::default(), Digest::default()),
                    |g| {
                        (
                            one(ResourceName::gateway(g)),
                            one(ResourceName::prefixes(g)),
                        )
                    },
                );
                own.plus(self.prefixes.minus(others))
            }
            ViewClass::Outside => self.proxy_gateways,
        };
        d = d.plus(one(ResourceName::node(node)));
        if me.tunnel_candidate {
            d = d.plus(self.peers);
        }
        d.plus(one(ResourceName::settings()))
    }
}

/// Which sessions hold the same view but for their own `node/` resource:
/// the class, the own gateway of a member, and whether the node is a
/// tunnel candidate (it then holds every `peer/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ViewKey {
    class: u8,
    gateway: Option<raven_core::GatewayName>,
    candidate: bool,
}

/// What is kept for one published revision.
#[derive(Debug)]
struct Revision {
    epoch: String,
    revision: u64,
    /// Made when a resuming session first asks (not for the views alone:
    /// a connect storm shares views at every revision and resumes none).
    digests: Option<Arc<KindDigests>>,
    /// The shared part of each view, for agents that resumed holding it
    /// and for sessions in sync with this revision.
    views: std::collections::BTreeMap<ViewKey, Arc<SharedEntries>>,
}

/// The [`KindDigests`] and shared views of the latest published revision
/// asked for, shared by every session: computed by the first session that
/// resumes after a change, reused by the others.
#[derive(Debug, Clone, Default)]
pub struct Sums {
    latest: Arc<Mutex<Option<Revision>>>,
}

impl Sums {
    /// Runs `f` on what is kept for `current` (epoch and revision name a
    /// topology), made afresh when it is another revision.
    fn with<T>(&self, current: &Published, f: impl FnOnce(&mut Revision) -> T) -> T {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = latest
            .as_ref()
            .is_none_or(|r| r.epoch != current.epoch || r.revision != current.revision);
        if fresh {
            *latest = Some(Revision {
                epoch: current.epoch.clone(),
                revision: current.revision,
                digests: None,
                views: std::collections::BTreeMap::new(),
            });
        }
        match latest.as_mut() {
            Some(r) => f(r),
            None => unreachable!("just set"),
        }
    }

    /// Whether a newer revision of `current`'s epoch is kept already (a
    /// session still on an older one does not make the kept one over).
    fn behind(&self, current: &Published) -> bool {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest
            .as_ref()
            .is_some_and(|r| r.epoch == current.epoch && r.revision > current.revision)
    }

    /// The kind digests of `current`.
    pub fn of(&self, current: &Published) -> Arc<KindDigests> {
        self.with(current, |r| {
            r.digests
                .get_or_insert_with(|| Arc::new(KindDigests::of(&current.topology)))
                .clone()
        })
    }

    /// [`Self::held_view`], unless a newer revision is kept already: what
    /// a session in sync with `current` takes to share its view
    /// ([`Held::share`]); `None` lets it keep its own copy until its next
    /// change.
    pub fn shared_view(&self, current: &Published, node: &NodeName, compact: bool) -> Option<Held> {
        (!self.behind(current)).then(|| self.held_view(current, node, compact))
    }

    /// What an agent holds whose digest matched `node`'s view of
    /// `current`: that view, its shared part (everything but the node's own
    /// resource) built once for every node with the same [`ViewKey`]. A
    /// compact member's shared part is every domain's `prefixes/` and the
    /// settings, one copy for the members of every domain (≈ 12 KB per
    /// domain at 1,000 domains otherwise); its own gateway and node are
    /// its own entries, and its own domain's `prefixes/` is left out.
    pub fn held_view(&self, current: &Published, node: &NodeName, compact: bool) -> Held {
        let Some(me) = current.topology.node(node) else {
            return Held::default();
        };
        let class = view::view_class(me, compact);
        if class == ViewClass::Member && !me.tunnel_candidate {
            return self.member_view(current, node, me.gateway.as_ref());
        }
        let key = ViewKey {
            class: class as u8,
            gateway: (class == ViewClass::Member)
                .then(|| me.gateway.clone())
                .flatten(),
            candidate: me.tunnel_candidate,
        };
        let own_name = ResourceName::node(node);
        let own_id = current.ids.id(&own_name);
        let shared = self.shared_entries(current, key, || {
            current
                .runs()
                .view(&current.topology, &current.ids, node, compact)
                .into_iter()
                .flatten()
                .filter(|e| Some(e.id) != own_id)
                .map(|e| (e.id, e.tag))
                .collect()
        });
        Held::with_shared(shared, own_entry(current, own_name).into_iter().collect())
    }

    /// The shared entries of `key`'s views of `current`, made from
    /// `entries` by the first node that asks.
    fn shared_entries(
        &self,
        current: &Published,
        key: ViewKey,
        entries: impl FnOnce() -> Vec<(u32, Tag)>,
    ) -> Arc<SharedEntries> {
        self.with(current, |r| {
            r.views
                .entry(key)
                .or_insert_with(|| Arc::new(SharedEntries::new(entries())))
                .clone()
        })
    }

    /// [`Self::held_view`] of a compact member (not a tunnel candidate) of
    /// `gateway`'s domain.
    fn member_view(
        &self,
        current: &Published,
        node: &NodeName,
        gateway: Option<&GatewayName>,
    ) -> Held {
        let key = ViewKey {
            class: ViewClass::Member as u8,
            gateway: None,
            candidate: false,
        };
        let shared = self.shared_entries(current, key, || {
            current
                .runs()
                .members_common()
                .map(|e| (e.id, e.tag))
                .collect()
        });
        let own = [
            Some(ResourceName::node(node)),
            gateway.map(ResourceName::gateway),
        ]
        .into_iter()
        .flatten()
        .filter_map(|name| own_entry(current, name))
        .collect();
        let gone = gateway
            .and_then(|g| current.ids.id(&ResourceName::prefixes(g)))
            .into_iter()
            .collect();
        Held::with_shared_except(shared, own, gone)
    }
}

/// `name`'s id and version tag in `current`, when it has both.
fn own_entry(current: &Published, name: ResourceName) -> Option<(u32, Tag)> {
    let id = current.ids.id(&name)?;
    current
        .topology
        .resources
        .get(&name)
        .map(|r| (id, tag(&r.version)))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;
    use raven_model::fixtures;
    use raven_model::topology::{DomainPrefixes, EndpointType, ExposeType, NodeView, ResourceBody};

    /// The digest of the view as listed, resource by resource.
    fn listed(topology: &Topology, node: &NodeName, compact: bool) -> Digest {
        Digest::of(
            view::view_resources(topology, node, compact)
                .into_iter()
                .map(|(n, r)| (n.as_str(), r.version.as_str())),
        )
    }

    fn put(t: &mut Topology, body: ResourceBody) {
        let name = match &body {
            ResourceBody::Gateway(g) => ResourceName::gateway(&g.name),
            ResourceBody::Prefixes(p) => ResourceName::prefixes(&p.gateway),
            ResourceBody::Node(n) => ResourceName::node(&n.name),
            ResourceBody::Peer(p) => ResourceName::peer(&p.node),
            ResourceBody::Settings(_) => ResourceName::settings(),
        };
        t.resources.insert(name, Resource::new(body));
    }

    /// Every view class: domains `a` (exposed, with a proxy server), `b`,
    /// `c`, each with its prefixes; in `a` a tunnel candidate, a member, an
    /// active proxy endpoint; a member of `b`; a node in no gateway; peers;
    /// the settings.
    pub(in crate::grpc) fn every_class() -> Topology {
        let mut t = Topology::default();
        for g in ["a", "b", "c"] {
            let mut v = fixtures::gateway(g);
            if g == "a" {
                v.expose_type = ExposeType::PublicIP;
                v.active_proxies = vec![raven_model::topology::GatewayEndpoint {
                    type_: EndpointType::Proxy,
                    ..fixtures::endpoint("a3", 10262)
                }];
            }
            put(&mut t, ResourceBody::Prefixes(DomainPrefixes::of(&v)));
            put(&mut t, ResourceBody::Gateway(v));
        }
        for (n, g, candidate, proxy) in [
            ("a1", Some("a"), true, false),
            ("a2", Some("a"), false, false),
            ("a3", Some("a"), false, true),
            ("a4", Some("a"), false, false),
            ("b1", Some("b"), false, false),
            ("lonely", None, false, false),
        ] {
            put(
                &mut t,
                ResourceBody::Node(NodeView {
                    tunnel_candidate: candidate,
                    proxy_active: proxy,
                    ..fixtures::node_view(n, g)
                }),
            );
        }
        for (n, g) in [("a1", "a"), ("b9", "b")] {
            put(&mut t, ResourceBody::Peer(fixtures::peer(n, g)));
        }
        put(&mut t, ResourceBody::Settings(fixtures::settings()));
        t
    }

    /// [`every_class`] without the resources `drop` picks (in name order;
    /// never a `node/` one).
    pub(in crate::grpc) fn every_class_but(drop: &[bool]) -> Topology {
        let mut topology = every_class();
        let names: Vec<ResourceName> = topology.resources.keys().cloned().collect();
        for (name, gone) in names
            .iter()
            .zip(drop.iter().chain(std::iter::repeat(&false)))
        {
            if *gone && !name.as_str().starts_with("node/") {
                topology.resources.remove(name);
            }
        }
        topology
    }

    /// [`every_class`] published as revision 3 of epoch `e`, every name
    /// interned.
    fn every_class_published() -> Published {
        published(every_class())
    }

    /// `topology` published as revision 3 of epoch `e`, every name interned
    /// and encoded.
    pub(in crate::grpc) fn published(topology: Topology) -> Published {
        let mut ids = crate::pipeline::ResourceIds::default();
        for n in topology.resources.keys() {
            ids.intern(n);
        }
        let encoded = topology
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), raven_proto::EncodedResource::new(n, r)))
            .collect();
        Published {
            epoch: "e".into(),
            revision: 3,
            topology,
            encoded,
            ids: Arc::new(ids),
            ..Default::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any of the resources may be missing (a node's own gateway, its
        /// prefixes, the settings, ...).
        #[test]
        fn the_view_digest_from_kind_sums_equals_the_digest_of_the_listed_view(
            drop in proptest::collection::vec(any::<bool>(), 20),
        ) {
            let topology = every_class_but(&drop);
            let sums = KindDigests::of(&topology);
            for node in ["a1", "a2", "a3", "b1", "lonely", "not-a-node"] {
                let node = fixtures::node(node);
                for compact in [false, true] {
                    prop_assert_eq!(
                        sums.view_digest(&topology, &node, compact),
                        listed(&topology, &node, compact),
                        "{} compact={}", node, compact
                    );
                }
            }
        }
    }

    #[test]
    fn a_resumed_view_held_in_shared_parts_is_the_view_and_changes_like_one_held_whole() {
        let current = every_class_published();
        let sums = Sums::default();
        for node in ["a1", "a2", "a3", "a4", "b1", "lonely", "not-a-node"] {
            let node = fixtures::node(node);
            for compact in [false, true] {
                let mut shared = sums.held_view(&current, &node, compact);
                let mut whole = Held::view_of(&current, &node, compact);
                let all = |h: &Held| h.entries().collect::<Vec<_>>();
                assert_eq!(all(&shared), all(&whole), "{node} compact={compact}");
                assert_eq!(shared.len(), whole.len());
                for (id, t) in all(&whole) {
                    assert_eq!(shared.get(id), Some(t));
                }
                // An Ack that changes one entry, adds one and removes one.
                let entries = all(&whole);
                if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
                    let sent = [(first.0, first.1 ^ 1), (10_000, 5)];
                    let removed = [crate::grpc::held::Key::Id(last.0)];
                    shared.apply(&sent, &removed);
                    whole.apply(&sent, &removed);
                    assert_eq!(all(&shared), all(&whole), "{node} compact={compact}");
                }
            }
        }
        // Two members of one domain share one copy; the candidate's view is
        // another.
        let key = |n: &str| sums.held_view(&current, &fixtures::node(n), true);
        let (a, b) = (key("a2"), key("a4"));
        assert!(a.shares_with(&b));
        assert!(!key("a1").shares_with(&a));
    }

    #[test]
    fn views_held_after_a_first_sync_are_shared_by_all_members_and_equal_the_whole_view() {
        let current = every_class_published();
        let sums = Sums::default();
        let synced = |n: &str| {
            let node = fixtures::node(n);
            let whole = Held::view_of(&current, &node, true);
            let mut held = Held::view_of(&current, &node, true);
            assert!(held.share(sums.held_view(&current, &node, true)), "{n}");
            assert!(held.entries().eq(whole.entries()), "{n}");
            held
        };
        let (a2, a4) = (synced("a2"), synced("a4"));
        assert!(a2.shares_with(&a4), "two members of domain a: one copy");
        assert!(
            synced("b1").shares_with(&a2),
            "another domain's members: the same copy (every domain's prefixes/)"
        );
        assert!(
            !synced("a1").shares_with(&a2),
            "a candidate holds every gateway"
        );
        // A session still on revision 2 once 3 is kept takes no view (it
        // would make the kept revision over, back and forth).
        let older = Published {
            revision: 2,
            ..current.clone()
        };
        assert!(
            sums.shared_view(&older, &fixtures::node("a2"), true)
                .is_none()
        );
        let kept = sums.shared_view(&current, &fixtures::node("a2"), true);
        assert!(
            kept.is_some_and(|v| v.shares_with(&a2)),
            "revision 3 is still kept"
        );
    }

    #[test]
    fn the_classes_have_different_views_and_so_different_digests() {
        let t = every_class();
        let sums = KindDigests::of(&t);
        let d = |n: &str, compact| sums.view_digest(&t, &fixtures::node(n), compact);
        assert_ne!(d("a1", true), d("a2", true));
        assert_ne!(d("a2", true), d("a2", false));
        assert_ne!(d("lonely", true), Digest::default());
        assert_eq!(d("not-a-node", true), Digest::default());
    }
}
