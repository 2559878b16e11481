//! What one agent holds, kept compact: a session of a tunnel candidate
//! holds every gateway and every peer (thousands of resources), and the hub
//! keeps one such inventory per connected agent.
//!
//! Names are the pipeline's interned ids ([`crate::pipeline::ResourceIds`],
//! stable for the hub's lifetime) and versions are [`Tag`]s (the 64-bit
//! content digest a [`ContentVersion`] spells in hex), so an entry costs 12
//! bytes instead of two heap strings and a map node (~130 bytes). A name
//! the hub has never seen (from an agent's Hello after a restart with other
//! sources) is kept by name until the hub either learns it or removes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use raven_core::{ContentVersion, ResourceName};

use crate::pipeline::ResourceIds;

/// A content version as a number. The hub's versions are 16 lowercase hex
/// digits (8 bytes of a SHA-256): those map to exactly their value, so two
/// such tags are equal exactly when the strings are. Anything else (an
/// agent's cache written by another build) maps to a 64-bit hash of the
/// string with the top bit set: equal to a hub version only by a collision
/// as unlikely as two contents sharing a version.
pub type Tag = u64;

/// The tag of `version` (see [`Tag`]).
pub fn tag(version: &ContentVersion) -> Tag {
    tag_of_str(version.as_str())
}

/// The value of each hex digit the hub writes (`0-9a-f`), `0xff` for every
/// other byte: one table load per digit, no branch per digit.
const HEX: [u8; 256] = {
    let mut t = [0xff_u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// [`tag`] of a version given as a string. Every Hello's inventory (a
/// candidate's ~2,000 versions) and every view a full plan walks go through
/// here, so the 16 digits are read without a branch per digit.
pub fn tag_of_str(version: &str) -> Tag {
    let s = version.as_bytes();
    if let Ok(digits) = <&[u8; 16]>::try_from(s) {
        let mut value = 0u64;
        let mut bad = 0u8;
        for c in digits {
            let d = HEX[usize::from(*c)];
            bad |= d;
            value = (value << 4) | u64::from(d & 0x0f);
        }
        if bad & 0xf0 == 0 {
            return value;
        }
    }
    // Not one of the hub's versions: FNV-1a of the bytes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ s.len() as u64;
    for b in s {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | (1 << 63)
}

/// One name an agent holds: interned, or (never seen by this hub) by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Id(u32),
    Stray(ResourceName),
}

impl Key {
    pub fn of(name: &ResourceName, ids: &ResourceIds) -> Self {
        ids.id(name)
            .map_or_else(|| Self::Stray(name.clone()), Self::Id)
    }
}

/// A view's entries (sorted ids and their tags), shared by every session
/// whose agent resumed holding that view (see `grpc::resume`): thousands
/// of agents that hold the same gateways and peers keep one copy until
/// their first change.
#[derive(Debug, Default)]
pub struct SharedEntries {
    ids: Vec<u32>,
    tags: Vec<Tag>,
}

impl SharedEntries {
    /// From entries in any order, each id once.
    pub fn new(mut entries: Vec<(u32, Tag)>) -> Self {
        entries.sort_unstable_by_key(|(id, _)| *id);
        let (ids, tags) = entries.into_iter().unzip();
        Self { ids, tags }
    }

    fn get(&self, id: u32) -> Option<Tag> {
        self.ids.binary_search(&id).ok().map(|i| self.tags[i])
    }

    fn entries(&self) -> impl Iterator<Item = (u32, Tag)> + '_ {
        self.ids.iter().copied().zip(self.tags.iter().copied())
    }
}

/// An agent's inventory: sorted ids with their tags (parallel vectors, 12
/// bytes an entry), and the stray names. After a resume by digest most of
/// it is a view's [`SharedEntries`], and the vectors hold only the rest
/// (the node's own resource), disjoint from it; the first Ack that changes
/// anything takes a copy.
#[derive(Debug, Default)]
pub struct Held {
    shared: Option<Arc<SharedEntries>>,
    ids: Vec<u32>,
    tags: Vec<Tag>,
    strays: BTreeMap<ResourceName, Tag>,
}

/// Two id-sorted entry runs with no id in both, merged in id order.
fn merge(
    a: impl Iterator<Item = (u32, Tag)>,
    b: impl Iterator<Item = (u32, Tag)>,
) -> impl Iterator<Item = (u32, Tag)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) => {
            if x.0 < y.0 {
                a.next()
            } else {
                b.next()
            }
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

impl Held {
    /// The inventory an agent's Hello lists, read straight from the Hello:
    /// names the hub knows become their ids (no name is built for them),
    /// the others are parsed and kept as strays; a malformed or repeated
    /// name is an error ([`raven_proto::hello_inventory_interned`]).
    pub fn from_hello(
        hello: &raven_proto::v1::Hello,
        ids: &ResourceIds,
    ) -> Result<Self, raven_proto::ConversionError> {
        let (known, others) = raven_proto::hello_inventory_interned(hello, |n| ids.id_of_str(n))?;
        let (ids, tags) = known.into_iter().map(|(id, v)| (id, tag_of_str(v))).unzip();
        let strays = others
            .into_iter()
            .map(|(n, v)| (n, tag_of_str(v)))
            .collect();
        Ok(Self {
            shared: None,
            ids,
            tags,
            strays,
        })
    }

    /// `node`'s view of `current`, all of it its own (the reference the
    /// shared form of `grpc::resume` is tested against).
    #[cfg(test)]
    pub fn view_of(
        current: &crate::pipeline::Published,
        node: &raven_core::NodeName,
        compact: bool,
    ) -> Self {
        let entries = raven_core::view::view_resources(&current.topology, node, compact)
            .into_iter()
            .filter_map(|(n, r)| current.ids.id(n).map(|id| (id, tag(&r.version))))
            .collect();
        Self::from_entries(None, entries, BTreeMap::new())
    }

    /// What an agent holds that holds `shared` and `own` (entries in any
    /// order, none of them in `shared`): a resumed view without copying
    /// its shared part.
    pub fn with_shared(shared: Arc<SharedEntries>, own: Vec<(u32, Tag)>) -> Self {
        debug_assert!(own.iter().all(|(id, _)| shared.get(*id).is_none()));
        Self::from_entries(Some(shared), own, BTreeMap::new())
    }

    /// Its own `entries` (in any order) sorted by id, beside `shared` and
    /// `strays`.
    fn from_entries(
        shared: Option<Arc<SharedEntries>>,
        mut entries: Vec<(u32, Tag)>,
        strays: BTreeMap<ResourceName, Tag>,
    ) -> Self {
        entries.sort_unstable_by_key(|(id, _)| *id);
        let (ids, tags) = entries.into_iter().unzip();
        Self {
            shared,
            ids,
            tags,
            strays,
        }
    }

    /// Whether both hold the same shared entries (one copy).
    #[cfg(test)]
    pub fn shares_with(&self, other: &Self) -> bool {
        matches!((&self.shared, &other.shared), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }

    /// Takes its own copy of the shared entries (before a change).
    fn unshare(&mut self) {
        if self.shared.is_some() {
            (self.ids, self.tags) = self.entries().unzip();
            self.shared = None;
        }
    }

    /// The inventory an agent's Hello lists (the reference
    /// [`Self::from_hello`] is tested against).
    #[cfg(test)]
    pub fn from_inventory(
        inventory: BTreeMap<ResourceName, ContentVersion>,
        ids: &ResourceIds,
    ) -> Self {
        let mut entries = Vec::with_capacity(inventory.len());
        let mut strays = BTreeMap::new();
        for (name, version) in inventory {
            match ids.id(&name) {
                Some(id) => entries.push((id, tag(&version))),
                None => {
                    strays.insert(name, tag(&version));
                }
            }
        }
        Self::from_entries(None, entries, strays)
    }

    pub fn len(&self) -> usize {
        self.ids.len() + self.strays.len() + self.shared.as_ref().map_or(0, |s| s.ids.len())
    }

    /// The tag held for `id`.
    pub fn get(&self, id: u32) -> Option<Tag> {
        self.ids
            .binary_search(&id)
            .ok()
            .map(|i| self.tags[i])
            .or_else(|| self.shared.as_ref().and_then(|s| s.get(id)))
    }

    /// Whether `name` is held (by id or as a stray).
    pub fn contains(&self, name: &ResourceName, ids: &ResourceIds) -> bool {
        match ids.id(name) {
            Some(id) => self.get(id).is_some(),
            None => self.strays.contains_key(name),
        }
    }

    /// How `name` is held: as a stray if it is one (the hub may have
    /// learned the name since), by its id otherwise.
    pub fn key(&self, name: &ResourceName, ids: &ResourceIds) -> Key {
        if self.strays.contains_key(name) {
            Key::Stray(name.clone())
        } else {
            Key::of(name, ids)
        }
    }

    /// Moves strays the hub has learned since into the id list.
    pub fn resolve(&mut self, ids: &ResourceIds) {
        if self.strays.is_empty() {
            return;
        }
        let learned: Vec<(u32, Tag)> = self
            .strays
            .iter()
            .filter_map(|(n, t)| ids.id(n).map(|id| (id, *t)))
            .collect();
        if learned.is_empty() {
            return;
        }
        self.strays.retain(|n, _| ids.id(n).is_none());
        self.apply(&learned, &[]);
    }

    /// The held ids in order, with their tags.
    pub fn entries(&self) -> impl Iterator<Item = (u32, Tag)> + '_ {
        merge(
            self.ids.iter().copied().zip(self.tags.iter().copied()),
            self.shared.iter().flat_map(|s| s.entries()),
        )
    }

    /// The stray names.
    pub fn strays(&self) -> impl Iterator<Item = &ResourceName> {
        self.strays.keys()
    }

    /// What the agent holds once it ACKed an Update that sent `sent` and
    /// removed `removed`: O(held + sent · log sent).
    pub fn apply(&mut self, sent: &[(u32, Tag)], removed: &[Key]) {
        if sent.is_empty() && removed.is_empty() {
            return;
        }
        self.unshare();
        let mut gone = Vec::new();
        for key in removed {
            match key {
                Key::Id(id) => gone.push(*id),
                Key::Stray(name) => {
                    self.strays.remove(name);
                }
            }
        }
        if !gone.is_empty() {
            gone.sort_unstable();
            let mut keep = Vec::with_capacity(self.ids.len());
            for (id, t) in self.entries() {
                if gone.binary_search(&id).is_err() {
                    keep.push((id, t));
                }
            }
            (self.ids, self.tags) = keep.into_iter().unzip();
        }
        let mut added = Vec::new();
        for (id, t) in sent {
            match self.ids.binary_search(id) {
                Ok(i) => self.tags[i] = *t,
                Err(_) => added.push((*id, *t)),
            }
        }
        if added.is_empty() {
            return;
        }
        added.sort_unstable_by_key(|(id, _)| *id);
        added.dedup_by_key(|(id, _)| *id);
        let mut merged = Vec::with_capacity(self.ids.len() + added.len());
        let mut old = self.entries().peekable();
        let mut new = added.into_iter().peekable();
        loop {
            // `added` holds only ids not held, so no id is in both.
            let take_old = match (old.peek(), new.peek()) {
                (Some(a), Some(b)) => a.0 < b.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            merged.extend(if take_old { old.next() } else { new.next() });
        }
        drop(old);
        (self.ids, self.tags) = merged.into_iter().unzip();
        self.ids.shrink_to_fit();
        self.tags.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ResourceName {
        ResourceName::parse(s).unwrap_or_else(|| panic!("{s}"))
    }

    /// The digit-by-digit reading the table-driven [`tag_of_str`] replaced.
    fn tag_reference(version: &str) -> Tag {
        let s = version.as_bytes();
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(u64::from(c - b'0')),
            b'a'..=b'f' => Some(u64::from(c - b'a' + 10)),
            _ => None,
        };
        if s.len() == 16
            && let Some(v) = s
                .iter()
                .try_fold(0u64, |acc, c| hex(*c).map(|d| (acc << 4) | d))
        {
            return v;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ s.len() as u64;
        for b in s {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h | (1 << 63)
    }

    #[test]
    fn the_table_driven_tag_equals_the_digit_by_digit_reading_for_every_byte_at_every_position() {
        let base = *b"0123456789abcdef";
        for pos in 0..16 {
            for byte in 0..=255u8 {
                let mut v = base;
                v[pos] = byte;
                let Ok(s) = std::str::from_utf8(&v) else {
                    continue;
                };
                assert_eq!(tag_of_str(s), tag_reference(s), "{s:?}");
            }
        }
        for s in [
            "",
            "f",
            "ffffffffffffffff",
            "0000000000000000",
            "0123456789abcdef0",
        ] {
            assert_eq!(tag_of_str(s), tag_reference(s), "{s:?}");
        }
    }

    #[test]
    fn a_hub_version_maps_to_its_value_and_any_other_string_to_a_tag_no_hub_version_has() {
        let v = ContentVersion::from_string("00000000000000ff".into());
        assert_eq!(tag(&v), 0xff);
        for other in ["00000000000000FF", "ff", "", "0000000000000000x"] {
            let t = tag(&ContentVersion::from_string(other.into()));
            assert!(t >> 63 == 1, "{other:?} → {t:x}");
        }
        assert_ne!(
            tag(&ContentVersion::from_string("a".into())),
            tag(&ContentVersion::from_string("b".into()))
        );
    }

    #[test]
    fn an_ack_updates_inserts_and_removes_in_one_pass_keeping_ids_sorted() {
        let mut ids = ResourceIds::default();
        let [a, b, c, d] = ["gateway/a", "gateway/b", "peer/c", "settings"].map(|n| {
            ids.intern(&name(n));
            ids.id(&name(n)).unwrap_or_else(|| unreachable!())
        });
        let v = |s: &str| ContentVersion::from_string(s.into());
        let inventory = BTreeMap::from([
            (name("gateway/b"), v("0000000000000001")),
            (name("node/stray"), v("0000000000000002")),
        ]);
        let mut held = Held::from_inventory(inventory, &ids);
        assert_eq!(held.len(), 2);
        assert_eq!(held.get(b), Some(1));
        assert!(held.contains(&name("node/stray"), &ids));
        held.apply(
            &[(d, 4), (a, 3), (b, 5)],
            &[Key::of(&name("node/stray"), &ids)],
        );
        assert_eq!(held.entries().collect::<Vec<_>>(), [(a, 3), (b, 5), (d, 4)]);
        held.apply(&[(c, 6)], &[Key::Id(a)]);
        assert_eq!(held.entries().collect::<Vec<_>>(), [(b, 5), (c, 6), (d, 4)]);
        assert_eq!(held.strays().count(), 0);
    }

    #[test]
    fn a_stray_the_hub_learns_later_is_held_by_its_new_id() {
        let mut ids = ResourceIds::default();
        let inventory = BTreeMap::from([(
            name("gateway/late"),
            ContentVersion::from_string("0000000000000007".into()),
        )]);
        let mut held = Held::from_inventory(inventory, &ids);
        ids.intern(&name("gateway/late"));
        held.resolve(&ids);
        let id = ids
            .id(&name("gateway/late"))
            .unwrap_or_else(|| unreachable!());
        assert_eq!(held.get(id), Some(7));
        assert_eq!(held.strays().count(), 0);
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_hello_read_straight_into_ids_holds_what_its_parsed_inventory_holds_and_refuses_the_same() {
        let mut ids = ResourceIds::default();
        for n in ["gateway/a", "gateway/b", "peer/c", "settings"] {
            ids.intern(&name(n));
        }
        let rv = |n: &str, v: &str| raven_proto::v1::ResourceVersion {
            name: n.into(),
            version: v.into(),
        };
        // Out of order, a name the hub does not know, a foreign version.
        let mut hello = raven_proto::v1::Hello {
            resources: vec![
                rv("settings", "000000000000000a"),
                rv("gateway/b", "0000000000000001"),
                rv("node/stray", "0000000000000002"),
                rv("gateway/a", "not-a-hub-version"),
            ],
            ..Default::default()
        };
        let reference = |h: &raven_proto::v1::Hello| {
            raven_proto::hello_inventory(h).map(|inv| Held::from_inventory(inv, &ids))
        };
        let got = Held::from_hello(&hello, &ids).expect("a good hello");
        let want = reference(&hello).expect("a good hello");
        assert_eq!(
            got.entries().collect::<Vec<_>>(),
            want.entries().collect::<Vec<_>>()
        );
        assert_eq!(
            got.strays().collect::<Vec<_>>(),
            want.strays().collect::<Vec<_>>()
        );
        assert_eq!(got.len(), 4);
        // A known name twice, a stray twice, a malformed name: the same
        // error naming the same field.
        for bad in [
            rv("gateway/b", "0000000000000009"),
            rv("node/stray", "0000000000000009"),
            rv("gateways/x", "0000000000000009"),
        ] {
            hello.resources.push(bad);
            let got = Held::from_hello(&hello, &ids)
                .map(|_| ())
                .expect_err("refused");
            let want = reference(&hello).map(|_| ()).expect_err("refused");
            assert_eq!(got.to_string(), want.to_string());
            assert!(got.to_string().contains("resources[4].name"), "{got}");
            hello.resources.pop();
        }
    }
}
