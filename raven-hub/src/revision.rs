//! The hub's `(epoch, revision)` sequence, persisted in raven-store so a hub
//! restart continues it: agents that are up to date get nothing re-sent, and
//! a revision number is never reused for different content.
//!
//! The revision grows by one exactly when the set of resources or one of
//! their content versions changes. The new state is durable before it is
//! published.
//!
//! On disk: `hub/revision`, a base (every resource's version at one
//! revision), and `hub/revision-log`, what changed since that base (names
//! with their version now, or none when removed) and the revision after
//! it. A revision writes only the log — bytes proportional to the changes
//! since the base, not to the cluster — and once the log holds more than
//! [`compaction_threshold`] names a new base and an empty log are written
//! together in one transaction. A store written before the log existed (a
//! base alone) reads as it did; a log that does not start at the stored
//! base (another epoch, a base written without it) is ignored.

use std::collections::BTreeMap;
use std::path::Path;

use raven_core::{ContentVersion, ResourceName, Topology};
use raven_store::{Store, StoreError, StoreOptions};
use serde::{Deserialize, Serialize};

const RECORD: &str = "hub/revision";
const LOG: &str = "hub/revision-log";

/// The changes since the base record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Log {
    epoch: String,
    /// The revision of the base these changes apply to.
    base: u64,
    /// The revision after them.
    revision: u64,
    /// Every name whose version changed since the base: its version now,
    /// or `None` once removed.
    changes: BTreeMap<ResourceName, Option<ContentVersion>>,
}

/// How many changed names the log holds before a new base is written: a
/// base costs bytes proportional to the cluster, the log bytes proportional
/// to the names changed since the base, so with the threshold a fraction of
/// the cluster each revision writes a small record and a base is written
/// once every many revisions.
fn compaction_threshold(resources: usize) -> usize {
    (resources / 32).max(64)
}

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
    /// What the stored log holds (changes since the stored base).
    log: Log,
}

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("hub state store: {0}")]
    Store(#[from] StoreError),
    #[error("hub state record {RECORD} is unreadable: {0}")]
    Decode(serde_json::Error),
    #[error("hub state record {0} is unreadable: {1}")]
    DecodeLog(&'static str, serde_json::Error),
}

fn open_store(data_dir: &Path) -> Result<raven_store::Opened, StoreError> {
    Store::open(
        &data_dir.join("hub-state"),
        StoreOptions {
            purpose: "raven-hub".to_owned(),
            ..StoreOptions::default()
        },
    )
}

/// The names whose version differs between `versions` and `topology`: the
/// new version, or `None` once gone. One pass over both sorted maps, no
/// lookups; nothing is copied for what is unchanged.
fn changes(
    versions: &BTreeMap<ResourceName, ContentVersion>,
    topology: &Topology,
) -> BTreeMap<ResourceName, Option<ContentVersion>> {
    let mut out = BTreeMap::new();
    let mut old = versions.iter().peekable();
    for (name, r) in &topology.resources {
        while let Some((gone, _)) = old.next_if(|(o, _)| *o < name) {
            out.insert(gone.clone(), None);
        }
        match old.next_if(|(o, _)| *o == name) {
            Some((_, v)) if *v == r.version => {}
            _ => {
                out.insert(name.clone(), Some(r.version.clone()));
            }
        }
    }
    out.extend(old.map(|(gone, _)| (gone.clone(), None)));
    out
}

fn apply(
    versions: &mut BTreeMap<ResourceName, ContentVersion>,
    changes: &BTreeMap<ResourceName, Option<ContentVersion>>,
) {
    for (name, version) in changes {
        match version {
            Some(v) => versions.insert(name.clone(), v.clone()),
            None => versions.remove(name),
        };
    }
}

/// Writes `state` as the base and `log` (empty, starting at it) in one
/// transaction.
fn write_base(store: &Store, state: &RevisionState, log: &Log) -> Result<(), StoreError> {
    store.put_records(&[
        (RECORD, &serde_json::to_vec(state).unwrap_or_default()),
        (LOG, &serde_json::to_vec(log).unwrap_or_default()),
    ])
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
            log: Log::default(),
        }
    }

    /// Opens (or creates) the persisted sequence under `data_dir`. With
    /// `epoch`, the sequence belongs to that epoch (shared by every replica
    /// of a Kubernetes-backed hub); a stored sequence of another epoch is
    /// replaced.
    pub fn open(data_dir: &Path, epoch: Option<&str>) -> Result<Self, RevisionError> {
        let opened = open_store(data_dir)?;
        if let Some(r) = &opened.recovery {
            tracing::warn!(moved_to = %r.moved_to.display(), reason = %r.reason, "hub state store was unusable and has been moved aside; starting a new epoch");
        }
        let store = opened.store;
        let stored: Option<RevisionState> = match store.get_record(RECORD)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(RevisionError::Decode)?),
            None => None,
        };
        let (state, log) = match stored {
            Some(mut s) if epoch.is_none_or(|e| e == s.epoch) => {
                let log: Option<Log> = match store.get_record(LOG)? {
                    Some(bytes) => Some(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| RevisionError::DecodeLog(LOG, e))?,
                    ),
                    None => None,
                };
                let log = log
                    .filter(|l| l.epoch == s.epoch && l.base == s.revision)
                    .unwrap_or_else(|| Log {
                        epoch: s.epoch.clone(),
                        base: s.revision,
                        revision: s.revision,
                        changes: BTreeMap::new(),
                    });
                apply(&mut s.versions, &log.changes);
                s.revision = log.revision;
                (s, log)
            }
            _ => {
                let s = RevisionState {
                    epoch: epoch.map_or_else(new_epoch, str::to_owned),
                    ..Default::default()
                };
                let log = Log {
                    epoch: s.epoch.clone(),
                    ..Log::default()
                };
                write_base(&store, &s, &log)?;
                (s, log)
            }
        };
        tracing::info!(epoch = %state.epoch, revision = state.revision, "hub revision sequence loaded");
        Ok(Self {
            store: Some(store),
            state,
            log,
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
        let changes = changes(&self.state.versions, topology);
        if changes.is_empty() && self.state.revision > 0 {
            return Ok(&self.state);
        }
        let revision = (self.state.revision + 1).max(floor);
        let mut log = Log {
            epoch: self.state.epoch.clone(),
            base: self.log.base,
            revision,
            changes: self.log.changes.clone(),
        };
        log.changes
            .extend(changes.iter().map(|(n, v)| (n.clone(), v.clone())));
        let compact = log.changes.len() > compaction_threshold(topology.resources.len());
        if let Some(store) = &self.store {
            if compact {
                let mut base = RevisionState {
                    epoch: self.state.epoch.clone(),
                    revision,
                    versions: self.state.versions.clone(),
                };
                apply(&mut base.versions, &changes);
                let empty = Log {
                    epoch: base.epoch.clone(),
                    base: revision,
                    revision,
                    changes: BTreeMap::new(),
                };
                write_base(store, &base, &empty)?;
                self.log = empty;
                self.state = base;
                return Ok(&self.state);
            }
            store.put_records(&[(LOG, &serde_json::to_vec(&log).unwrap_or_default())])?;
        } else if compact {
            log.base = revision;
            log.changes.clear();
        }
        apply(&mut self.state.versions, &changes);
        self.state.revision = revision;
        self.log = log;
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

    /// `count` resources `gateway/g<i>`, the one at `bumped` (if any) with
    /// content `port`.
    fn many(count: usize, bumped: Option<(usize, u16)>) -> Topology {
        let mut t = Topology::default();
        for i in 0..count {
            let port = match bumped {
                Some((b, port)) if b == i => port,
                _ => 1,
            };
            let name = ResourceName::parse(&format!("gateway/g{i}")).expect("name");
            let body = ResourceBody::Settings(Settings {
                enable_l7_proxy: true,
                vxlan_port: port,
                ..raven_model::fixtures::settings()
            });
            t.resources.insert(name, Resource::new(body));
        }
        t
    }

    fn versions(t: &Topology) -> BTreeMap<ResourceName, ContentVersion> {
        t.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }

    fn record(dir: &Path, key: &str) -> Option<Vec<u8>> {
        let opened = open_store(dir).expect("store");
        opened
            .store
            .get_record(key)
            .expect("read")
            .map(|b| b.to_vec())
    }

    #[test]
    fn a_revision_persists_only_the_names_changed_since_the_base_and_every_version_survives_reopen()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = 200;
        let threshold = compaction_threshold(count);
        let mut expected = many(count, None);
        let mut r = Revisions::open(dir.path(), None).expect("open");
        r.advance(&expected, 0).expect("first");
        drop(r);
        let base_bytes = record(dir.path(), RECORD)
            .map(|b| b.len())
            .unwrap_or_default();
        // More changes than the threshold: the log is compacted into a new
        // base at least once, and the sequence reads back the same after
        // every one of them.
        for change in 0..(3 * threshold) {
            let mut r = Revisions::open(dir.path(), None).expect("reopen");
            let before = r.current().revision;
            assert_eq!(r.current().versions, versions(&expected), "change {change}");
            // One resource changes, another appears and one disappears.
            let mut next = many(count, Some((change % count, 2 + change as u16)));
            let extra = ResourceName::parse(&format!("node/n{change}")).expect("name");
            next.resources.insert(
                extra,
                next.resources[&ResourceName::parse("gateway/g0").expect("g0")].clone(),
            );
            assert_eq!(r.advance(&next, 0).expect("advance").revision, before + 1);
            expected = next;
            drop(r);
            let log = record(dir.path(), LOG).expect("a log record");
            let log: Log = serde_json::from_slice(&log).expect("log");
            assert!(log.changes.len() <= threshold, "the log is compacted");
            // Well below a base's bytes: what changed, not every version.
            assert!(
                serde_json::to_vec(&log).expect("json").len() < base_bytes,
                "change {change}: the log holds only changes"
            );
        }
        let r = Revisions::open(dir.path(), None).expect("reopen");
        assert_eq!(r.current().versions, versions(&expected));
        assert_eq!(r.current().revision, 1 + 3 * threshold as u64);
    }

    /// Writes `state` as the base record alone, as a hub that knows no log
    /// does.
    fn write_base_alone(dir: &Path, state: &RevisionState) {
        let opened = open_store(dir).expect("store");
        let json = serde_json::to_vec(state).expect("json");
        opened.store.put_records(&[(RECORD, &json)]).expect("put");
    }

    /// Closes `r` and checks a reopen reads back what it held.
    fn assert_reopens_the_same(dir: &Path, r: Revisions) {
        let want = r.current().clone();
        drop(r);
        let r = Revisions::open(dir, None).expect("reopen");
        assert_eq!(r.current(), &want);
    }

    #[test]
    fn a_store_written_before_the_log_existed_reads_as_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = RevisionState {
            epoch: "0123456789abcdef".to_owned(),
            revision: 41,
            versions: versions(&many(5, None)),
        };
        // What the hub wrote before: the base record alone.
        write_base_alone(dir.path(), &old);
        let mut r = Revisions::open(dir.path(), None).expect("open");
        assert_eq!(r.current(), &old);
        assert_eq!(r.advance(&many(5, None), 0).expect("same").revision, 41);
        assert_eq!(
            r.advance(&many(5, Some((1, 9))), 0).expect("next").revision,
            42
        );
        assert_reopens_the_same(dir.path(), r);
    }

    #[test]
    fn a_log_that_does_not_start_at_the_stored_base_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Revisions::open(dir.path(), None).expect("open");
        r.advance(&many(5, None), 0).expect("first");
        r.advance(&many(5, Some((2, 3))), 0).expect("second");
        let epoch = r.current().epoch.clone();
        drop(r);
        // A hub that knows no log (an older version) writes a base of its
        // own, leaving the log of the base before it.
        let theirs = RevisionState {
            epoch,
            revision: 9,
            versions: versions(&many(3, Some((0, 7)))),
        };
        write_base_alone(dir.path(), &theirs);
        let mut r = Revisions::open(dir.path(), None).expect("reopen");
        assert_eq!(r.current(), &theirs);
        assert_eq!(r.advance(&many(3, None), 0).expect("next").revision, 10);
        assert_reopens_the_same(dir.path(), r);
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
