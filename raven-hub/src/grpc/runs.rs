//! A published topology's resources by kind, each kind one run in name
//! order with every resource's id, tag and encoded bytes ([`ViewRuns`]),
//! made once per published revision, when a session first plans a whole
//! view.
//!
//! Every view is a few of these runs side by side (see
//! [`raven_core::view`]): every `gateway/` (or those serving a proxy), the
//! node's own `node/`, every `peer/` for a tunnel candidate, every
//! `prefixes/` but its own domain's for a member, and the settings. So a
//! session plans its whole view by walking slices of the runs: no name is
//! looked up, hashed or compared per resource, and no version is parsed.
//! Before, each of 10,000 first syncs did all of that for each of its 1,000
//! to 3,000 resources (≈ 45 % of the hub's CPU in a connect storm).

use raven_core::NodeName;
use raven_core::topology::{Resource, ResourceName, Topology};
use raven_core::view::{self, ViewClass};
use raven_proto::EncodedResource;

use super::held::{Tag, tag};
use crate::pipeline::{Published, ResourceIds};

/// One resource of a run.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u32,
    pub tag: Tag,
    pub encoded: EncodedResource,
}

/// Every resource of one published topology, by kind, each kind in name
/// order.
#[derive(Debug, Default)]
pub struct ViewRuns {
    gateways: Vec<Entry>,
    /// The `gateway/` resources serving a cloud proxy (a node in no
    /// gateway receives only these).
    proxy_gateways: Vec<Entry>,
    nodes: Vec<Entry>,
    peers: Vec<Entry>,
    prefixes: Vec<Entry>,
    settings: Option<Entry>,
}

impl ViewRuns {
    /// One pass over `current`'s resources and their encoded bytes (the
    /// same names in the same order).
    pub fn of(current: &Published) -> Self {
        let mut runs = Self::default();
        let mut encoded = current.encoded.iter().peekable();
        for (name, r) in &current.topology.resources {
            let bytes = match encoded.next_if(|(n, _)| *n == name) {
                Some((_, e)) => Some(e.clone()),
                None => current.encoded.get(name).cloned(),
            };
            let (Some(id), Some(encoded)) = (current.ids.id(name), bytes) else {
                continue;
            };
            let entry = Entry {
                id,
                tag: tag(&r.version),
                encoded,
            };
            runs.put(name, r, entry);
        }
        runs
    }

    fn put(&mut self, name: &ResourceName, r: &Resource, entry: Entry) {
        let s = name.as_str();
        if s.starts_with("gateway/") {
            if view::serves_proxy(r) {
                self.proxy_gateways.push(entry.clone());
            }
            self.gateways.push(entry);
        } else if s.starts_with("node/") {
            self.nodes.push(entry);
        } else if s.starts_with("peer/") {
            self.peers.push(entry);
        } else if s.starts_with("prefixes/") {
            self.prefixes.push(entry);
        } else if s == ResourceName::SETTINGS {
            self.settings = Some(entry);
        }
    }

    /// What every member's compact view has but its own resources and its
    /// own domain's `prefixes/`: every domain's `prefixes/` and the
    /// settings.
    pub fn members_common(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.prefixes.iter().chain(self.settings.iter())
    }

    /// `node`'s view (what [`view::view_resources`] lists), as slices of
    /// the runs in name order (`gateway/` < `node/` < `peer/` < `prefixes/`
    /// < `settings`). Empty when the topology does not know the node.
    pub fn view<'a>(
        &'a self,
        topology: &Topology,
        ids: &ResourceIds,
        node: &NodeName,
        compact: bool,
    ) -> Vec<&'a [Entry]> {
        let Some(me) = topology.node(node) else {
            return Vec::new();
        };
        // Every entry's id has a name (the table only grows).
        let find = |run: &'a [Entry], name: &ResourceName| {
            run.binary_search_by(|e| ids.name(e.id).cmp(&Some(name)))
                .ok()
        };
        let one = |run: &'a [Entry], name: ResourceName| {
            find(run, &name).map_or(&run[..0], |i| &run[i..=i])
        };
        let mut out: Vec<&'a [Entry]> = Vec::with_capacity(6);
        let class = view::view_class(me, compact);
        match class {
            ViewClass::Full => out.push(&self.gateways),
            ViewClass::Member => out.extend(
                me.gateway
                    .as_ref()
                    .map(|g| one(&self.gateways, ResourceName::gateway(g))),
            ),
            ViewClass::Outside => out.push(&self.proxy_gateways),
        }
        out.push(one(&self.nodes, ResourceName::node(node)));
        if me.tunnel_candidate {
            out.push(&self.peers);
        }
        if class == ViewClass::Member {
            // Every domain's prefixes but its own: the run on either side.
            let own = me.gateway.as_ref().map(ResourceName::prefixes);
            match own.and_then(|own| find(&self.prefixes, &own)) {
                Some(i) => out.extend([&self.prefixes[..i], &self.prefixes[i + 1..]]),
                None => out.push(&self.prefixes),
            }
        }
        out.extend(self.settings.as_ref().map(std::slice::from_ref));
        out.retain(|s| !s.is_empty());
        out
    }
}

/// The [`ViewRuns`] of one [`Published`] state, made by the first session
/// that asks. A clone starts empty: a copy of a state may be given another
/// topology.
#[derive(Debug, Default)]
pub struct RunsCell(std::sync::OnceLock<ViewRuns>);

impl Clone for RunsCell {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Published {
    /// This state's [`ViewRuns`], made on the first call.
    pub fn runs(&self) -> &ViewRuns {
        self.runs.0.get_or_init(|| ViewRuns::of(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::resume::tests::{every_class, every_class_but, published};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any resource but the nodes' own may be missing (a node's own
        /// gateway, its prefixes, the settings, every peer, ...).
        #[test]
        fn the_runs_view_of_every_node_is_its_view_resources_in_order_with_their_tags_and_bytes(
            drop in proptest::collection::vec(any::<bool>(), 20),
        ) {
            let current = published(every_class_but(&drop));
            let nodes = ["a1", "a2", "a3", "a4", "b1", "lonely", "unknown"];
            for node in nodes.map(raven_model::fixtures::node) {
                for compact in [false, true] {
                    let runs: Vec<(u32, Tag, &[u8])> = current
                        .runs()
                        .view(&current.topology, &current.ids, &node, compact)
                        .into_iter()
                        .flatten()
                        .map(|e| (e.id, e.tag, &e.encoded.as_bytes()[..]))
                        .collect();
                    let mut listed = view::view_resources(&current.topology, &node, compact);
                    listed.sort_unstable_by_key(|(n, _)| *n);
                    let listed: Vec<(u32, Tag, &[u8])> = listed
                        .into_iter()
                        .map(|(n, r)| (
                            current.ids.id(n).expect("every name is interned"),
                            tag(&r.version),
                            &current.encoded[n].as_bytes()[..],
                        ))
                        .collect();
                    prop_assert_eq!(&runs, &listed, "{} compact={}", node, compact);
                }
            }
        }
    }

    #[test]
    fn a_copy_of_a_published_state_makes_its_own_runs() {
        let current = published(every_class());
        let a1 = raven_model::fixtures::node("a1");
        assert!(
            !current
                .runs()
                .view(&current.topology, &current.ids, &a1, true)
                .is_empty()
        );
        let mut copy = current.clone();
        copy.topology.resources.clear();
        copy.encoded.clear();
        assert!(
            copy.runs()
                .view(&current.topology, &current.ids, &a1, true)
                .is_empty()
        );
    }
}
