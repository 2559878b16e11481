//! raven-store: a small, crash-safe, versioned key-value store on sled.
//!
//! The edge agent keeps the topology it received from the hub here (one key
//! per resource plus a metadata record, written in one atomic, durable batch);
//! the hub keeps its epoch and revision counter here.
//!
//! ```text
//! commit(meta + puts + removes) ─▶ one sled transaction ─▶ flush ─▶ Ok
//! open ─▶ validate every value (magic, schema, CRC, length, purpose) ─▶ use
//!                       └─ corrupt/foreign/torn ─▶ move aside, start empty
//! ```
//!
//! ## On-disk format
//! Every value is framed: `b"RVS1"`, a u16 schema version, a u32 CRC32 of the
//! body, a u32 body length, then the body. Trees: `format` (one record:
//! schema, purpose, creation time), `meta` (epoch, revision, complete flag),
//! `resources` (body = u16 version length, version, payload) and `records`
//! (small named records). A store written by a newer schema is refused, never
//! moved aside: a downgraded agent must not destroy a newer agent's cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// Schema version this code writes.
pub const SCHEMA_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"RVS1";
const HEADER: usize = 4 + 2 + 4 + 4;
const FORMAT_KEY: &[u8] = b"format";
const META_KEY: &[u8] = b"meta";

/// How to open a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Identity of the store (`raven-edge/<node>`, `raven-hub`). A store
    /// created for another purpose is foreign and is not used.
    pub purpose: String,
    /// Bound on the total payload bytes of resources and records.
    pub max_bytes: u64,
    /// sled's page cache.
    pub cache_capacity: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            purpose: String::new(),
            max_bytes: 64 << 20,
            cache_capacity: 4 << 20,
        }
    }
}

/// Metadata of the state held: which hub state it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub epoch: String,
    pub revision: u64,
    /// The resources came from a completed snapshot (or deltas on top of one).
    pub complete: bool,
    pub written_at_unix_ms: u64,
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One atomic change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub meta: Meta,
    pub put: BTreeMap<String, StoredResource>,
    pub remove: BTreeSet<String>,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("store {path} is in use by another process (is an agent running?)")]
    Locked { path: PathBuf },
    #[error("store {path}: {what}: {reason}")]
    Corrupt {
        path: PathBuf,
        what: String,
        reason: String,
    },
    #[error("store {path} belongs to {found:?}, not {expected:?}")]
    Foreign {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "store {path} was written by schema version {found}, newer than this build supports ({supported}); refusing to touch it — upgrade raven or move the directory away"
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error(
        "store {path}: committing would hold {would_hold} bytes, more than the limit of {limit}"
    )]
    TooLarge {
        path: PathBuf,
        would_hold: u64,
        limit: u64,
    },
    #[error("moving the unusable store {from} aside to {to}: {source}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A store that could not be used and was moved aside.
#[derive(Debug)]
pub struct Recovery {
    pub reason: StoreError,
    pub moved_to: PathBuf,
}

/// An opened store, and what was done to get there.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    pub recovery: Option<Recovery>,
}

/// A handle to an open store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    opts: StoreOptions,
    db: sled::Db,
    meta: sled::Tree,
    resources: sled::Tree,
    records: sled::Tree,
}

#[derive(Debug, Serialize, Deserialize)]
struct Format {
    schema: u16,
    purpose: String,
    created_at_unix_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Why a framed value is unusable.
#[derive(Debug)]
enum FrameError {
    Bad(String),
    Newer(u16),
}

fn unframe(value: &[u8]) -> Result<(u16, &[u8]), FrameError> {
    if value.len() < HEADER {
        return Err(FrameError::Bad(format!(
            "{} bytes, shorter than the frame header",
            value.len()
        )));
    }
    if &value[..4] != MAGIC {
        return Err(FrameError::Bad("bad magic".into()));
    }
    let schema = u16::from_le_bytes([value[4], value[5]]);
    if schema > SCHEMA_VERSION {
        return Err(FrameError::Newer(schema));
    }
    let crc = u32::from_le_bytes([value[6], value[7], value[8], value[9]]);
    let len = u32::from_le_bytes([value[10], value[11], value[12], value[13]]) as usize;
    let body = &value[HEADER..];
    if body.len() != len {
        return Err(FrameError::Bad(format!(
            "length {} but header says {len} (torn write)",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Bad("checksum mismatch".into()));
    }
    Ok((schema, body))
}

/// Upgrades a body written by an older schema. Version 1 is the first.
fn migrate(schema: u16, body: &[u8]) -> Result<Vec<u8>, String> {
    match schema {
        SCHEMA_VERSION => Ok(body.to_vec()),
        old => Err(format!("schema version {old} has no migration")),
    }
}

fn encode_resource(r: &StoredResource) -> Vec<u8> {
    let v = r.version.as_bytes();
    let mut body = Vec::with_capacity(2 + v.len() + r.payload.len());
    body.extend_from_slice(&u16::try_from(v.len()).unwrap_or(u16::MAX).to_le_bytes());
    body.extend_from_slice(v);
    body.extend_from_slice(&r.payload);
    frame(&body)
}

fn decode_resource(body: &[u8]) -> Result<StoredResource, String> {
    if body.len() < 2 {
        return Err("resource body too short".into());
    }
    let vlen = u16::from_le_bytes([body[0], body[1]]) as usize;
    let version = body.get(2..2 + vlen).ok_or("version runs past the body")?;
    let version = std::str::from_utf8(version).map_err(|_| "version is not UTF-8")?;
    Ok(StoredResource {
        version: version.to_owned(),
        payload: Bytes::copy_from_slice(&body[2 + vlen..]),
    })
}

/// Opens the sled database. Every commit flushes explicitly, so sled's
/// background flusher is off: without it, dropping the last handle releases
/// the file lock at once. A lock still held by a handle that is shutting
/// down is waited for briefly; one held by a live process is reported.
fn open_db(dir: &Path, cache: Option<u64>) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut config = sled::Config::new().path(dir).flush_every_ms(None);
        if let Some(c) = cache {
            config = config.cache_capacity(c);
        }
        match config.open().map_err(Store::sled_err(dir)) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens the store at `dir`, creating it if missing. An unusable store
    /// (corrupt, torn, foreign) is moved aside and a fresh one is created; a
    /// store of a newer schema is refused with [`StoreError::UnsupportedSchema`].
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Opened, StoreError> {
        match Self::open_checked(dir, &opts) {
            Ok(store) => Ok(Opened {
                store,
                recovery: None,
            }),
            Err(
                e @ (StoreError::UnsupportedSchema { .. }
                | StoreError::Locked { .. }
                | StoreError::Io { .. }),
            ) => Err(e),
            Err(reason) => {
                let moved_to = PathBuf::from(format!("{}.corrupt-{}", dir.display(), now_ms()));
                tracing::warn!(store = %dir.display(), moved_to = %moved_to.display(), %reason, "store is unusable; moving it aside and starting empty");
                std::fs::rename(dir, &moved_to).map_err(|source| StoreError::MoveAside {
                    from: dir.to_owned(),
                    to: moved_to.clone(),
                    source,
                })?;
                let store = Self::open_checked(dir, &opts)?;
                Ok(Opened {
                    store,
                    recovery: Some(Recovery { reason, moved_to }),
                })
            }
        }
    }

    fn sled_err(path: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| match &source {
            sled::Error::Io(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
            {
                StoreError::Locked {
                    path: path.to_owned(),
                }
            }
            sled::Error::Corruption { .. } => StoreError::Corrupt {
                path: path.to_owned(),
                what: "sled log".into(),
                reason: source.to_string(),
            },
            _ => StoreError::Sled {
                path: path.to_owned(),
                source,
            },
        }
    }

    fn open_checked(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let fresh = !dir.exists();
        let db = open_db(dir, Some(opts.cache_capacity))?;
        let err = Self::sled_err(dir);
        let store = Self {
            path: dir.to_owned(),
            opts: opts.clone(),
            meta: db.open_tree("meta").map_err(&err)?,
            resources: db.open_tree("resources").map_err(&err)?,
            records: db.open_tree("records").map_err(&err)?,
            db,
        };
        match store.db.get(FORMAT_KEY).map_err(&err)? {
            None if fresh || store.is_empty()? => {
                let f = Format {
                    schema: SCHEMA_VERSION,
                    purpose: opts.purpose.clone(),
                    created_at_unix_ms: now_ms(),
                };
                store
                    .db
                    .insert(
                        FORMAT_KEY,
                        frame(&serde_json::to_vec(&f).unwrap_or_default()),
                    )
                    .map_err(&err)?;
                store.db.flush().map_err(&err)?;
            }
            None => return Err(store.corrupt("format record", "missing in a non-empty store")),
            Some(v) => {
                let body = store.check_frame("format record", &v)?;
                let f: Format = serde_json::from_slice(&body)
                    .map_err(|e| store.corrupt("format record", &e.to_string()))?;
                if f.purpose != opts.purpose {
                    return Err(StoreError::Foreign {
                        path: dir.to_owned(),
                        found: f.purpose,
                        expected: opts.purpose.clone(),
                    });
                }
            }
        }
        store.validate()?;
        Ok(store)
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.meta.is_empty() && self.resources.is_empty() && self.records.is_empty())
    }

    fn corrupt(&self, what: &str, reason: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn check_frame(&self, what: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        match unframe(value) {
            Ok((schema, body)) => migrate(schema, body).map_err(|r| self.corrupt(what, &r)),
            Err(FrameError::Newer(found)) => Err(StoreError::UnsupportedSchema {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            }),
            Err(FrameError::Bad(r)) => Err(self.corrupt(what, &r)),
        }
    }

    /// Reads and checks everything once.
    fn validate(&self) -> Result<(), StoreError> {
        let snap = self.read_all()?;
        if snap.meta.is_none() && !snap.resources.is_empty() {
            return Err(self.corrupt("meta record", "missing while resources are present"));
        }
        for kv in self.records.iter() {
            let (k, v) = kv.map_err(Self::sled_err(&self.path))?;
            self.check_frame(&format!("record {}", String::from_utf8_lossy(&k)), &v)?;
        }
        Ok(())
    }

    fn read_all(&self) -> Result<Snapshot, StoreError> {
        let err = Self::sled_err(&self.path);
        let meta = match self.meta.get(META_KEY).map_err(&err)? {
            None => None,
            Some(v) => {
                let body = self.check_frame("meta record", &v)?;
                Some(
                    serde_json::from_slice(&body)
                        .map_err(|e| self.corrupt("meta record", &e.to_string()))?,
                )
            }
        };
        let mut resources = BTreeMap::new();
        for kv in self.resources.iter() {
            let (k, v) = kv.map_err(&err)?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| self.corrupt("resource key", "not UTF-8"))?;
            let what = format!("resource {name}");
            let body = self.check_frame(&what, &v)?;
            resources.insert(
                name,
                decode_resource(&body).map_err(|r| self.corrupt(&what, &r))?,
            );
        }
        Ok(Snapshot { meta, resources })
    }

    /// Reads a store without modifying or moving anything (for inspection
    /// while no agent runs). Corruption is an error, never repaired here.
    pub fn open_read_only_snapshot(dir: &Path, purpose: &str) -> Result<Snapshot, StoreError> {
        if !dir.exists() {
            return Ok(Snapshot::default());
        }
        let db = open_db(dir, None)?;
        let err = Self::sled_err(dir);
        let store = Self {
            path: dir.to_owned(),
            opts: StoreOptions {
                purpose: purpose.to_owned(),
                ..Default::default()
            },
            meta: db.open_tree("meta").map_err(&err)?,
            resources: db.open_tree("resources").map_err(&err)?,
            records: db.open_tree("records").map_err(&err)?,
            db,
        };
        if let Some(v) = store.db.get(FORMAT_KEY).map_err(&err)? {
            let body = store.check_frame("format record", &v)?;
            let f: Format = serde_json::from_slice(&body)
                .map_err(|e| store.corrupt("format record", &e.to_string()))?;
            if f.purpose != purpose {
                return Err(StoreError::Foreign {
                    path: dir.to_owned(),
                    found: f.purpose,
                    expected: purpose.to_owned(),
                });
            }
        }
        store.read_all()
    }

    /// Everything the store holds.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.read_all()
    }

    fn payload_bytes(&self) -> Result<u64, StoreError> {
        let err = Self::sled_err(&self.path);
        let mut total = 0u64;
        for tree in [&self.resources, &self.records] {
            for kv in tree.iter() {
                let (_, v) = kv.map_err(&err)?;
                total += v.len().saturating_sub(HEADER) as u64;
            }
        }
        Ok(total)
    }

    /// Applies `c` atomically (meta, puts and removes in one transaction) and
    /// makes it durable before returning.
    pub fn commit(&self, c: Commit) -> Result<(), StoreError> {
        let err = Self::sled_err(&self.path);
        let mut would_hold = self.payload_bytes()?;
        for name in c.remove.iter().chain(c.put.keys()) {
            if let Some(old) = self.resources.get(name.as_bytes()).map_err(&err)? {
                would_hold = would_hold.saturating_sub(old.len().saturating_sub(HEADER) as u64);
            }
        }
        let framed: Vec<(String, Vec<u8>)> = c
            .put
            .iter()
            .map(|(k, r)| (k.clone(), encode_resource(r)))
            .collect();
        would_hold += framed
            .iter()
            .map(|(_, v)| (v.len() - HEADER) as u64)
            .sum::<u64>();
        if would_hold > self.opts.max_bytes {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                would_hold,
                limit: self.opts.max_bytes,
            });
        }
        let meta = frame(&serde_json::to_vec(&c.meta).unwrap_or_default());
        (&self.meta, &self.resources)
            .transaction(|(m, r)| {
                for name in &c.remove {
                    r.remove(name.as_bytes())?;
                }
                for (name, value) in &framed {
                    r.insert(name.as_bytes(), value.as_slice())?;
                }
                m.insert(META_KEY, meta.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => err(source),
                TransactionError::Abort(()) => self.corrupt("commit", "transaction aborted"),
            })?;
        self.db.flush().map_err(&err)?;
        Ok(())
    }

    /// A small named record.
    pub fn get_record(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let err = Self::sled_err(&self.path);
        match self.records.get(key.as_bytes()).map_err(&err)? {
            None => Ok(None),
            Some(v) => Ok(Some(Bytes::from(
                self.check_frame(&format!("record {key}"), &v)?,
            ))),
        }
    }

    /// Writes named records atomically and durably.
    pub fn put_records(&self, records: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let err = Self::sled_err(&self.path);
        let framed: Vec<(&str, Vec<u8>)> = records.iter().map(|(k, v)| (*k, frame(v))).collect();
        let added: u64 = records.iter().map(|(_, v)| v.len() as u64).sum();
        if self.payload_bytes()? + added > self.opts.max_bytes {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                would_hold: self.payload_bytes()? + added,
                limit: self.opts.max_bytes,
            });
        }
        self.records
            .transaction(|t| {
                for (k, v) in &framed {
                    t.insert(k.as_bytes(), v.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => err(source),
                TransactionError::Abort(()) => self.corrupt("records", "transaction aborted"),
            })?;
        self.db.flush().map_err(&err)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes raw bytes under a resource key, bypassing the framing. For
    /// corruption tests only.
    #[doc(hidden)]
    pub fn corrupt_resource_for_tests(&self, name: &str, raw: &[u8]) -> Result<(), StoreError> {
        self.resources
            .insert(name.as_bytes(), raw)
            .map_err(Self::sled_err(&self.path))?;
        self.db.flush().map_err(Self::sled_err(&self.path))?;
        Ok(())
    }
}
