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
/// whose agent holds that view: the sessions of agents that resumed holding
/// it (see `grpc::resume`), and those that synced it and then match it
/// exactly ([`Held::share`]). Thousands of agents that hold the same
/// gateways and peers keep one copy.
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
/// bytes an entry), and the stray names.
///
/// Most sessions hold a view many others hold too: then `shared` is that
/// view and the session's own vectors are an overlay of what its agent holds
/// differently — an entry of its own (the node's own resource, or a newer
/// tag of a shared id after a change) and `gone`, the shared ids it no
/// longer holds. An Ack edits the overlay (O(sent · overlay), no copy of the
/// view); an overlay grown past [`Held::OVERLAY_MAX`] of the view is folded
/// into a copy of its own, until [`Held::share`] finds it equal to a shared
/// view again.
#[derive(Debug, Default)]
pub struct Held {
    shared: Option<Arc<SharedEntries>>,
    ids: Vec<u32>,
    tags: Vec<Tag>,
    /// Shared ids not held (sorted); empty without `shared`.
    gone: Vec<u32>,
    strays: BTreeMap<ResourceName, Tag>,
}

/// Two id-sorted entry runs merged in id order; an id in both is taken from
/// `own` only.
fn overlay<'a>(
    own: impl Iterator<Item = (u32, Tag)> + 'a,
    base: impl Iterator<Item = (u32, Tag)> + 'a,
) -> impl Iterator<Item = (u32, Tag)> + 'a {
    let (mut a, mut b) = (own.peekable(), base.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) => {
            if x.0 == y.0 {
                b.next();
                a.next()
            } else if x.0 < y.0 {
                a.next()
            } else {
                b.next()
            }
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

/// Sets `id` to `t` in the sorted parallel vectors.
fn upsert(ids: &mut Vec<u32>, tags: &mut Vec<Tag>, id: u32, t: Tag) {
    match ids.binary_search(&id) {
        Ok(i) => tags[i] = t,
        Err(i) => {
            ids.insert(i, id);
            tags.insert(i, t);
        }
    }
}

/// Removes `id` from the sorted parallel vectors.
fn remove(ids: &mut Vec<u32>, tags: &mut Vec<Tag>, id: u32) {
    if let Ok(i) = ids.binary_search(&id) {
        ids.remove(i);
        tags.remove(i);
    }
}

impl Held {
    /// The largest overlay kept beside a shared view: this many entries
    /// plus an eighth of the view. Larger, it is folded into a copy.
    pub const OVERLAY_MAX: usize = 16;

    /// The inventory an agent's Hello lists, read straight from the Hello:
    /// names the hub knows become their ids (no name is built for them),
    /// the others are parsed and kept as strays; a malformed or repeated
    /// name is an error ([`raven_proto::hello_inventory_interned`]).
    pub fn from_hello(
        hello: &raven_proto::v1::Hello,
        ids: &ResourceIds,
    ) -> Result<Self, raven_proto::ConversionError> {
        let (known, others) = raven_proto::hello_inventory_interned(hello, |n| ids.id_of_str(n))?;
        let known = known
            .into_iter()
            .map(|(id, v)| (id, tag_of_str(v)))
            .collect();
        let strays = others
            .into_iter()
            .map(|(n, v)| (n, tag_of_str(v)))
            .collect();
        Ok(Self::from_entries(None, known, strays))
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
    /// order, none of them in `shared`): a view without copying its shared
    /// part.
    pub fn with_shared(shared: Arc<SharedEntries>, own: Vec<(u32, Tag)>) -> Self {
        debug_assert!(own.iter().all(|(id, _)| shared.get(*id).is_none()));
        Self::from_entries(Some(shared), own, BTreeMap::new())
    }

    /// `shared` but for the ids in `gone`, with `own` (ids not in `shared`,
    /// any order, each once) beside it.
    pub fn with_shared_except(
        shared: Arc<SharedEntries>,
        own: Vec<(u32, Tag)>,
        mut gone: Vec<u32>,
    ) -> Self {
        gone.sort_unstable();
        gone.dedup();
        gone.retain(|id| shared.get(*id).is_some());
        let mut held = Self::with_shared(shared, own);
        held.gone = gone;
        held
    }

    /// Its own `entries` (in any order, each id once) sorted by id, beside
    /// `shared` and `strays`.
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
            gone: Vec::new(),
            strays,
        }
    }

    /// Whether both hold the same shared entries (one copy).
    #[cfg(test)]
    pub fn shares_with(&self, other: &Self) -> bool {
        matches!((&self.shared, &other.shared), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }

    /// Whether part of it is a shared view.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Takes `view` instead when it holds exactly the same (same entries,
    /// no strays), so that the view's shared part is one copy for every
    /// session holding it; returns whether it did. O(view).
    pub fn share(&mut self, view: Self) -> bool {
        let same = self.strays.is_empty()
            && view.strays.is_empty()
            && self.len() == view.len()
            && self.entries().eq(view.entries());
        if same {
            *self = view;
        }
        same
    }

    /// Folds the shared entries and the overlay into a copy of its own.
    fn unshare(&mut self) {
        if self.shared.is_some() {
            (self.ids, self.tags) = self.entries().unzip();
            self.shared = None;
            self.gone = Vec::new();
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

    /// How many names it holds: O(overlay · log view).
    pub fn len(&self) -> usize {
        let own = match &self.shared {
            None => self.ids.len(),
            Some(s) => {
                let hidden = self.ids.iter().filter(|id| s.get(**id).is_some()).count();
                s.ids.len() - self.gone.len() + self.ids.len() - hidden
            }
        };
        own + self.strays.len()
    }

    /// Holds nothing (a fresh agent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tag held for `id`.
    pub fn get(&self, id: u32) -> Option<Tag> {
        if let Ok(i) = self.ids.binary_search(&id) {
            return Some(self.tags[i]);
        }
        let shared = self.shared.as_ref()?;
        if self.gone.binary_search(&id).is_ok() {
            return None;
        }
        shared.get(id)
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
        let gone = &self.gone;
        overlay(
            self.ids.iter().copied().zip(self.tags.iter().copied()),
            self.shared
                .iter()
                .flat_map(|s| s.entries())
                .filter(move |(id, _)| gone.binary_search(id).is_err()),
        )
    }

    /// The stray names.
    pub fn strays(&self) -> impl Iterator<Item = &ResourceName> {
        self.strays.keys()
    }

    /// What the agent holds once it ACKed an Update that sent `sent` and
    /// removed `removed`: beside a shared view O(changes · overlay), else
    /// O(held + sent · log sent).
    pub fn apply(&mut self, sent: &[(u32, Tag)], removed: &[Key]) {
        if sent.is_empty() && removed.is_empty() {
            return;
        }
        let limit = self
            .shared
            .as_ref()
            .map(|s| Self::OVERLAY_MAX + s.ids.len() / 8);
        if limit.is_some_and(|l| self.ids.len() + self.gone.len() + sent.len() + removed.len() > l)
        {
            self.unshare();
        }
        match self.shared.clone() {
            Some(shared) => self.apply_overlay(&shared, sent, removed),
            None => self.apply_own(sent, removed),
        }
    }

    /// [`Self::apply`] beside a shared view: only the overlay changes.
    fn apply_overlay(&mut self, shared: &SharedEntries, sent: &[(u32, Tag)], removed: &[Key]) {
        for key in removed {
            match key {
                Key::Id(id) => {
                    remove(&mut self.ids, &mut self.tags, *id);
                    if shared.get(*id).is_some()
                        && let Err(i) = self.gone.binary_search(id)
                    {
                        self.gone.insert(i, *id);
                    }
                }
                Key::Stray(name) => {
                    self.strays.remove(name);
                }
            }
        }
        for (id, t) in sent {
            if let Ok(i) = self.gone.binary_search(id) {
                self.gone.remove(i);
            }
            if shared.get(*id) == Some(*t) {
                remove(&mut self.ids, &mut self.tags, *id);
            } else {
                upsert(&mut self.ids, &mut self.tags, *id, *t);
            }
        }
    }

    /// [`Self::apply`] to an inventory all its own.
    fn apply_own(&mut self, sent: &[(u32, Tag)], removed: &[Key]) {
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
        // An id sent twice is held at the later tag (as an upsert would).
        added.sort_by_key(|(id, _)| *id);
        added.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        // `added` holds only ids not held: the overlay merge takes each
        // from one side.
        let merged: Vec<(u32, Tag)> = overlay(
            added.into_iter(),
            self.ids.iter().copied().zip(self.tags.iter().copied()),
        )
        .collect();
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

    /// One Ack's worth of changes: entries sent, ids removed.
    type Ack = (Vec<(u32, Tag)>, Vec<u32>);

    fn acks() -> impl proptest::strategy::Strategy<Value = Vec<Ack>> {
        let ack = (
            proptest::collection::vec((0u32..64, 0u64..4), 0..12),
            proptest::collection::vec(0u32..64, 0..6),
        );
        proptest::collection::vec(ack, 1..24)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever the Acks change, a held view beside a shared one (an
        /// overlay, folded into a copy once large) holds what a map of
        /// every entry holds; and one sharing again holds the same.
        #[test]
        fn an_overlay_on_a_shared_view_holds_what_a_whole_copy_holds_after_any_acks(
            base in proptest::collection::btree_map(0u32..64, 0u64..4, 0..48),
            acks in acks(),
        ) {
            let shared = Arc::new(SharedEntries::new(base.iter().map(|(k, v)| (*k, *v)).collect()));
            let mut held = Held::with_shared(shared.clone(), Vec::new());
            let mut model = base.clone();
            for (sent, removed) in acks {
                let keys: Vec<Key> = removed.iter().map(|id| Key::Id(*id)).collect();
                held.apply(&sent, &keys);
                for id in &removed {
                    model.remove(id);
                }
                for (id, t) in &sent {
                    model.insert(*id, *t);
                }
                let want: Vec<(u32, Tag)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                proptest::prop_assert_eq!(held.entries().collect::<Vec<_>>(), want.clone());
                proptest::prop_assert_eq!(held.len(), model.len());
                for id in 0..64 {
                    proptest::prop_assert_eq!(held.get(id), model.get(&id).copied(), "id {}", id);
                }
                let mut again = Held::from_entries(None, want.clone(), BTreeMap::new());
                let view = Held::with_shared(
                    Arc::new(SharedEntries::new(want)),
                    Vec::new(),
                );
                proptest::prop_assert!(again.share(view));
                proptest::prop_assert!(again.is_shared());
            }
        }
    }

    #[test]
    fn a_held_view_takes_a_shared_one_only_when_it_holds_exactly_the_same() {
        let shared = Arc::new(SharedEntries::new(vec![(1, 10), (2, 20), (3, 30)]));
        let view = || Held::with_shared(shared.clone(), vec![(9, 90)]);
        let whole = |e: &[(u32, Tag)]| Held::from_entries(None, e.to_vec(), BTreeMap::new());
        let mut same = whole(&[(3, 30), (1, 10), (9, 90), (2, 20)]);
        assert!(same.share(view()));
        assert!(same.is_shared() && same.shares_with(&view()));
        for differs in [
            &[(1, 10), (2, 20), (3, 31), (9, 90)][..],
            &[(1, 10), (2, 20), (9, 90)],
            &[(1, 10), (2, 20), (3, 30), (9, 90), (10, 1)],
        ] {
            let mut h = whole(differs);
            assert!(!h.share(view()), "{differs:?}");
            assert!(!h.is_shared());
            assert_eq!(h.entries().collect::<Vec<_>>(), differs);
        }
        let mut stray = whole(&[(1, 10), (2, 20), (3, 30), (9, 90)]);
        stray.strays.insert(name("node/x"), 1);
        assert!(!stray.share(view()), "a stray is not in any shared view");
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
