//! raven-store: a crash-safe, versioned, checksummed store on sled.
//!
//! It owns two kinds of persisted state: the edge agent's cache of the
//! topology it last received from the hub (named resources plus a meta
//! record saying which `(epoch, revision)` they are), and small named
//! records (the hub's epoch/revision counter, an agent's last-known hub
//! addresses). It is synchronous; async callers wrap it in `spawn_blocking`.
//!
//! ```text
//! commit(meta + puts + removes) ─▶ one sled transaction ─▶ flush ─▶ head file ─▶ Ok
//! open ─▶ check format, every value, meta ⇄ resources, head ─▶ use
//!            ├─ corrupt / rolled back / foreign ─▶ move to <dir>.corrupt-<ms>, start empty
//!            └─ newer schema or engine, locked, I/O error ─▶ error, nothing moved
//! ```
//!
//! # On-disk format
//!
//! A sled database in `<dir>` holding these values, every one framed as
//!
//! ```text
//! b"RVS1" | schema: u16 LE | crc32(body): u32 LE | body length: u32 LE | body
//! ```
//!
//! | tree        | key      | body                                                              |
//! |-------------|----------|-------------------------------------------------------------------|
//! | default     | `format` | JSON `{schema, purpose, created_at_unix_ms}`, written at creation  |
//! | `meta`      | `meta`   | JSON: the [`Meta`] fields plus `resources: {name: crc32 of body}`  |
//! | `meta`      | `seq`    | u64 LE: the number of writes (commits and `put_records`) made      |
//! | `resources` | name     | u16 LE version length, version (UTF-8), opaque payload             |
//! | `records`   | name     | the record's bytes                                                 |
//!
//! and, beside sled's files, `<dir>/raven-head`: the framed `seq` of the
//! last write made durable, replaced atomically after each sled flush.
//! sled silently truncates its log at the first damaged entry; a store that
//! holds fewer writes than its head file is reported as rolled back instead
//! of being used.
//!
//! A commit writes its resources, the meta record (listing the checksum of
//! every resource it leaves) and `seq` in one sled transaction, so at open
//! the meta record and the resources must agree exactly: a missing, extra or
//! stale resource is corruption. The format record's `schema` is the
//! store's, and every value carries the same. An older store is upgraded by
//! the migration chain at open; a newer one is refused and left alone.

mod error;
mod frame;
mod head;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use error::StoreError;

/// For the fuzz targets (`fuzz/`): decodes one stored value as it is read
/// from disk — the frame, then its body as a resource and as a sequence.
/// Returns whether the frame was valid. Must never panic on any input.
#[doc(hidden)]
pub fn decode_value_for_fuzzing(value: &[u8]) -> bool {
    match frame::unframe(value) {
        Ok(f) => {
            let _ = frame::decode_resource(f.body);
            let _ = frame::decode_seq(f.body);
            true
        }
        Err(_) => false,
    }
}
pub use frame::SCHEMA_VERSION;
pub use store::Store;

/// How to open a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Identity of the store (`raven-edge/<node>`, `raven-hub`). A store
    /// created for another purpose is foreign and is not used.
    pub purpose: String,
    /// Bound on the total payload bytes (resource bodies and records).
    pub max_bytes: u64,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
}

impl Default for StoreOptions {
    /// An empty purpose, 64 MiB of payload, 4 MiB of cache.
    fn default() -> Self {
        Self {
            purpose: String::new(),
            max_bytes: 64 << 20,
            cache_capacity: 4 << 20,
        }
    }
}

/// Which hub state the stored resources are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub epoch: String,
    pub revision: u64,
    /// The resources came from a completed snapshot (or deltas on top of one).
    pub complete: bool,
    pub written_at_unix_ms: u64,
}

/// One stored resource: its content version and opaque payload (protobuf).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredResource {
    pub version: String,
    pub payload: Bytes,
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `None` for a store never committed to.
    pub meta: Option<Meta>,
    pub resources: BTreeMap<String, StoredResource>,
}

/// One atomic change: `remove` is applied first, then `put`, and `meta`
/// replaces the stored meta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub meta: Meta,
    pub put: BTreeMap<String, StoredResource>,
    pub remove: BTreeSet<String>,
}

/// An unusable store that `open` moved aside before starting empty.
#[derive(Debug)]
pub struct Recovery {
    /// Why the store could not be used.
    pub reason: StoreError,
    /// Where the old directory is now, intact.
    pub moved_to: PathBuf,
}

/// An opened store, and whether a recovery was needed to get there.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    pub recovery: Option<Recovery>,
    /// What the store held when it was opened, every record checked: the
    /// same as [`Store::snapshot`] then, without reading the files again.
    pub snapshot: Snapshot,
}
