//! [`Store`]: opening with validation and recovery, atomic durable writes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::frame::{self, FormatBody, Framed, MetaBody, SCHEMA_VERSION, SchemaOnly};
use crate::head;
use crate::{Commit, Opened, Recovery, Snapshot, StoreError, StoreOptions};

const FORMAT_KEY: &[u8] = b"format";
const META_KEY: &[u8] = b"meta";
const SEQ_KEY: &[u8] = b"seq";
const META_TREE: &str = "meta";
const RESOURCES_TREE: &str = "resources";
const RECORDS_TREE: &str = "records";
/// sled's configuration file: text, then a CRC32 of it (u32 LE).
const SLED_CONF: &str = "conf";
/// How long `open` waits for the lock of a handle that is shutting down.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// One step of the schema migration chain: upgrades every value of a store
/// at schema `from` to `from + 1` and rewrites the format record, in one
/// transaction.
type Migration = fn(&Engine) -> Result<(), StoreError>;

/// `(from, step)`. Schema 1 is the first, so the chain is empty; schema 2
/// adds `(1, migrate_1_to_2)` here.
const MIGRATIONS: &[(u16, Migration)] = &[];

/// A handle to an open store. Cheap to clone; clones share one store, and
/// their writes are serialised.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced by a compacted copy now and then (under the `state` lock).
    engine: RwLock<Engine>,
    opts: StoreOptions,
    /// What the store holds, by size and checksum, as of the last write.
    /// Writes hold the lock from the size check until sled has applied them.
    state: Mutex<State>,
}

impl std::fmt::Debug for Store {
    // Not derived: sled's own Debug dumps whole trees.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.engine().path)
            .field("purpose", &self.inner.opts.purpose)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    crc: u32,
    len: u64,
}

#[derive(Debug, Clone, Default)]
struct State {
    /// Number of writes made (commits and `put_records`).
    seq: u64,
    resources: BTreeMap<String, Entry>,
    records: BTreeMap<String, u64>,
}

impl State {
    fn payload_bytes(&self) -> u64 {
        self.resources.values().map(|e| e.len).sum::<u64>() + self.records.values().sum::<u64>()
    }

    /// About what the meta record takes: a name and a checksum per resource.
    fn meta_bytes(&self) -> u64 {
        self.resources
            .keys()
            .map(|n| len64(n.len()) + 16)
            .sum::<u64>()
            + 256
    }
}

/// Compaction rewrites a store whose files exceed this many times its live
/// data...
const COMPACT_FACTOR: u64 = 4;
/// ...and this many bytes.
const COMPACT_FLOOR: u64 = 2 << 20;
/// Suffix of the directory a compaction writes (and a crash may leave).
const COMPACT_SUFFIX: &str = ".compact";

fn compact_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().map(ToOwned::to_owned).unwrap_or_default();
    name.push(COMPACT_SUFFIX);
    dir.with_file_name(name)
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Writes every value of `engine` into a fresh store beside it, exchanges
/// the directories and opens the result (see `Store::compact_if_bloated`).
/// On an error before the exchange the old store is untouched; one after
/// it exchanges back.
fn compact(engine: &Engine, opts: &StoreOptions, seq: u64) -> Result<Engine, StoreError> {
    let dir = &engine.path;
    let tmp = compact_dir(dir);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            path: path.clone(),
            source,
        }
    };
    match fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let written = (|| {
        let fresh = Engine::open(&tmp, &tmp, opts.cache_capacity)?;
        let err = fresh.err();
        for (from, to) in [
            (&*engine.db, &*fresh.db),
            (&engine.meta, &fresh.meta),
            (&engine.resources, &fresh.resources),
            (&engine.records, &fresh.records),
        ] {
            let mut batch = sled::Batch::default();
            for kv in from.iter() {
                let (k, v) = kv.map_err(engine.err())?;
                batch.insert(k, v);
            }
            to.apply_batch(batch).map_err(&err)?;
        }
        fresh.flush()?;
        head::write(&tmp, &tmp, seq)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let exchange = |a: &Path, b: &Path| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            a,
            nix::fcntl::AT_FDCWD,
            b,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| io_err(dir)(io::Error::from(e)))?;
        if let Some(parent) = dir.parent() {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err(parent))?;
        }
        Ok::<_, StoreError>(())
    };
    exchange(dir, &tmp)?;
    let reopened = Engine::open(dir, dir, opts.cache_capacity).and_then(|fresh| {
        let (_, state) = fresh.load(&opts.purpose, true)?;
        if state.seq == seq {
            Ok(fresh)
        } else {
            Err(fresh.corrupt(
                "compacted copy",
                format!("holds {} writes, not {seq}", state.seq),
            ))
        }
    });
    match reopened {
        Ok(fresh) => Ok(fresh),
        Err(e) => {
            exchange(dir, &tmp)?;
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Deletes what a compaction interrupted by a crash left beside `dir`:
/// after the exchange it is the old store, before it an unused copy.
fn remove_compaction_leftover(dir: &Path) -> Result<(), StoreError> {
    let tmp = compact_dir(dir);
    match fs::remove_dir_all(&tmp) {
        Ok(()) => {
            tracing::info!(dir = %tmp.display(), "removed the leftover of an interrupted store compaction");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { path: tmp, source }),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// I/O failures that describe the machine (permissions, a full disk, a
/// lock), not the store's content: never a reason to move a store aside.
fn is_environmental(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    matches!(
        kind,
        PermissionDenied
            | StorageFull
            | QuotaExceeded
            | ReadOnlyFilesystem
            | OutOfMemory
            | Interrupted
            | WouldBlock
            | NotADirectory
            | IsADirectory
            | ResourceBusy
    )
}

/// Maps a sled error. While opening, an I/O error that is not
/// environmental means sled could not read its own files: corruption.
fn sled_error(path: &Path, opening: bool, e: sled::Error) -> StoreError {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        what: "sled files".into(),
        reason,
    };
    match e {
        // sled's wording for a failed `flock` on its `db` file.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                path: path.to_owned(),
            }
        }
        sled::Error::Io(io) if opening && !is_environmental(io.kind()) => corrupt(io.to_string()),
        sled::Error::Unsupported(reason) if opening => StoreError::IncompatibleEngine {
            path: path.to_owned(),
            reason,
        },
        e @ (sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::CollectionNotFound(_)) => corrupt(e.to_string()),
        source => StoreError::Sled {
            path: path.to_owned(),
            source,
        },
    }
}

/// Runs `f`, turning a panic inside sled (it has some on damaged files)
/// into a corruption error.
fn guard_panics<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".into());
        Err(StoreError::Corrupt {
            path: path.to_owned(),
            what: what.into(),
            reason: format!("sled panicked reading it: {msg}"),
        })
    })
}

/// sled proceeds with a configuration file whose checksum fails, and may
/// then refuse it as "unsupported"; check it first so that damage reads as
/// damage, not as an incompatible engine.
fn check_sled_conf(files: &Path, shown: &Path) -> Result<(), StoreError> {
    let raw = match fs::read(files.join(SLED_CONF)) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: shown.join(SLED_CONF),
                source,
            });
        }
    };
    // sled itself rewrites a configuration of 8 bytes or fewer.
    if raw.len() <= 8 {
        return Ok(());
    }
    let (text, crc) = raw.split_at(raw.len() - 4);
    if crc32fast::hash(text).to_le_bytes() != crc {
        return Err(StoreError::Corrupt {
            path: shown.to_owned(),
            what: format!("sled configuration file {SLED_CONF}"),
            reason: "checksum mismatch".into(),
        });
    }
    Ok(())
}

/// Renames `dir` to `<dir>.corrupt-<unix ms>` (with `-N` appended if that
/// exists already).
fn move_aside(dir: &Path) -> Result<PathBuf, StoreError> {
    let failed = |to: PathBuf, source| StoreError::MoveAside {
        from: dir.to_owned(),
        to,
        source,
    };
    let Some(name) = dir.file_name() else {
        return Err(failed(
            dir.to_owned(),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path has no final component",
            ),
        ));
    };
    let ms = now_ms();
    for attempt in 0..100u32 {
        let mut aside = name.to_owned();
        aside.push(format!(".corrupt-{ms}"));
        if attempt > 0 {
            aside.push(format!("-{attempt}"));
        }
        let to = dir.with_file_name(aside);
        if to.symlink_metadata().is_ok() {
            continue;
        }
        return fs::rename(dir, &to)
            .map(|()| to.clone())
            .map_err(|e| failed(to, e));
    }
    Err(failed(
        dir.to_owned(),
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "100 moved-aside copies exist already",
        ),
    ))
}

/// Copies a store directory for reading, the head file first: a writer
/// that runs meanwhile only makes sled's files newer than the head.
fn copy_store(from: &Path, to: &Path) -> Result<(), StoreError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            path: path.clone(),
            source,
        }
    };
    fs::create_dir_all(to).map_err(io_err(to))?;
    let head = from.join(head::HEAD_FILE);
    match fs::copy(&head, to.join(head::HEAD_FILE)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&head)(e)),
    }
    copy_tree(from, to, true).map_err(io_err(from))
}

fn copy_tree(from: &Path, to: &Path, top: bool) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && (name == head::HEAD_FILE || name == head::HEAD_TMP) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target, false)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The sled handles of one store directory.
pub(crate) struct Engine {
    /// The directory as the caller named it (used in every error).
    path: PathBuf,
    /// Where the files are: `path`, or a copy for a read-only snapshot.
    files: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    resources: sled::Tree,
    records: sled::Tree,
}

impl Engine {
    fn open(files: &Path, shown: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        // A file where the directory should be is a mistake, not a store to
        // move aside.
        if fs::metadata(files).is_ok_and(|m| !m.is_dir()) {
            return Err(StoreError::Io {
                path: shown.to_owned(),
                source: io::ErrorKind::NotADirectory.into(),
            });
        }
        check_sled_conf(files, shown)?;
        guard_panics(shown, "sled files", || {
            let db = Self::open_db(files, shown, cache_capacity)?;
            let err = |e| sled_error(shown, true, e);
            Ok(Self {
                path: shown.to_owned(),
                files: files.to_owned(),
                meta: db.open_tree(META_TREE).map_err(err)?,
                resources: db.open_tree(RESOURCES_TREE).map_err(err)?,
                records: db.open_tree(RECORDS_TREE).map_err(err)?,
                db,
            })
        })
    }

    /// Every write flushes explicitly, so sled's background flusher is off:
    /// without it, dropping the last handle releases the file lock at once.
    /// A lock still held by a handle that is shutting down is waited for
    /// briefly; one held by a live process is reported as [`StoreError::Locked`].
    fn open_db(files: &Path, shown: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let opened = sled::Config::new()
                .path(files)
                .cache_capacity(cache_capacity)
                .flush_every_ms(None)
                .open()
                .map_err(|e| sled_error(shown, true, e));
            match opened {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn corrupt(&self, what: impl Into<String>, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
            reason: reason.into(),
        }
    }

    fn err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |e| sled_error(&self.path, false, e)
    }

    fn unencodable(&self, key: &str, reason: &str) -> StoreError {
        StoreError::Unencodable {
            path: self.path.clone(),
            key: key.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(self.err())
    }

    /// Nothing stored at all: a directory sled has just created.
    fn is_blank(&self) -> bool {
        self.db.is_empty()
            && self.meta.is_empty()
            && self.resources.is_empty()
            && self.records.is_empty()
    }

    /// The schema of the format record, after checking it. The purpose is
    /// checked at the current schema only (an older store is migrated first).
    fn check_format(&self, purpose: &str) -> Result<Option<u16>, StoreError> {
        const WHAT: &str = "format record";
        let Some(raw) = self.db.get(FORMAT_KEY).map_err(self.err())? else {
            return Ok(None);
        };
        let framed = frame::unframe(&raw).map_err(|e| self.corrupt(WHAT, e.to_string()))?;
        let said = serde_json::from_slice::<SchemaOnly>(framed.body)
            .map_err(|e| self.corrupt(WHAT, e.to_string()))?
            .schema;
        if said != framed.schema {
            return Err(self.corrupt(
                WHAT,
                format!(
                    "its frame says schema {} but its body says {said}",
                    framed.schema
                ),
            ));
        }
        if framed.schema > SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                path: self.path.clone(),
                found: framed.schema,
                supported: SCHEMA_VERSION,
            });
        }
        if framed.schema < SCHEMA_VERSION {
            return Ok(Some(framed.schema));
        }
        let format: FormatBody =
            serde_json::from_slice(framed.body).map_err(|e| self.corrupt(WHAT, e.to_string()))?;
        if format.purpose != purpose {
            return Err(StoreError::Foreign {
                path: self.path.clone(),
                found: format.purpose,
                expected: purpose.to_owned(),
            });
        }
        Ok(Some(framed.schema))
    }

    /// Writes the format record of a new store, then its head file.
    fn create(&self, purpose: &str) -> Result<(), StoreError> {
        let body = FormatBody {
            schema: SCHEMA_VERSION,
            purpose: purpose.to_owned(),
            created_at_unix_ms: now_ms(),
        };
        let value = serde_json::to_vec(&body)
            .ok()
            .and_then(|b| frame::frame(&b))
            .ok_or_else(|| self.unencodable("format record", "does not serialize"))?;
        self.db.insert(FORMAT_KEY, value).map_err(self.err())?;
        self.flush()?;
        head::write(&self.files, &self.path, 0)
    }

    /// Applies the migration chain from `from` up to [`SCHEMA_VERSION`].
    fn migrate(&self, from: u16) -> Result<(), StoreError> {
        for at in from..SCHEMA_VERSION {
            let Some((_, step)) = MIGRATIONS.iter().find(|(f, _)| *f == at) else {
                return Err(self.corrupt(
                    "format record",
                    format!("schema version {at} has no migration to {}", at + 1),
                ));
            };
            step(self)?;
            tracing::info!(store = %self.path.display(), from = at, to = at + 1, "migrated the store's schema");
        }
        Ok(())
    }

    /// A value's framing, which must be at the store's schema.
    fn checked<'v>(&self, what: &str, value: &'v [u8]) -> Result<Framed<'v>, StoreError> {
        let framed = frame::unframe(value).map_err(|e| self.corrupt(what, e.to_string()))?;
        if framed.schema != SCHEMA_VERSION {
            return Err(self.corrupt(
                what,
                format!(
                    "framed with schema version {} in a store at schema {SCHEMA_VERSION}",
                    framed.schema
                ),
            ));
        }
        Ok(framed)
    }

    fn utf8_key(&self, tree: &str, key: &[u8]) -> Result<String, StoreError> {
        String::from_utf8(key.to_vec())
            .map_err(|_| self.corrupt(format!("{tree} tree"), format!("key {key:?} is not UTF-8")))
    }

    /// Reads and checks everything: every value's framing and body, the
    /// meta record against the resources, the record sizes.
    fn read_all(&self) -> Result<(Snapshot, State), StoreError> {
        let err = self.err();
        let mut seq = None;
        let mut meta: Option<MetaBody> = None;
        for kv in self.meta.iter() {
            let (k, v) = kv.map_err(&err)?;
            match &*k {
                META_KEY => {
                    let body = self.checked("meta record", &v)?.body;
                    meta = Some(
                        serde_json::from_slice(body)
                            .map_err(|e| self.corrupt("meta record", e.to_string()))?,
                    );
                }
                SEQ_KEY => {
                    let body = self.checked("seq record", &v)?.body;
                    seq = Some(frame::decode_seq(body).map_err(|r| self.corrupt("seq record", r))?);
                }
                other => {
                    return Err(self.corrupt(
                        "meta tree",
                        format!("unexpected key {:?}", String::from_utf8_lossy(other)),
                    ));
                }
            }
        }

        let mut resources = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for kv in self.resources.iter() {
            let (k, v) = kv.map_err(&err)?;
            let name = self.utf8_key(RESOURCES_TREE, &k)?;
            let what = format!("resource {name}");
            let framed = self.checked(&what, &v)?;
            let resource =
                frame::decode_resource(framed.body).map_err(|r| self.corrupt(&what, r))?;
            entries.insert(
                name.clone(),
                Entry {
                    crc: framed.crc,
                    len: len64(framed.body.len()),
                },
            );
            resources.insert(name, resource);
        }

        match &meta {
            None => {
                if let Some(name) = entries.keys().next() {
                    return Err(self.corrupt(
                        format!("resource {name}"),
                        "present, but there is no meta record (no commit wrote it)",
                    ));
                }
            }
            Some(m) => {
                for (name, crc) in &m.resources {
                    match entries.get(name) {
                        None => {
                            return Err(self.corrupt(
                                format!("resource {name}"),
                                "listed by the meta record but missing",
                            ));
                        }
                        Some(e) if e.crc != *crc => {
                            return Err(self.corrupt(
                                format!("resource {name}"),
                                format!(
                                    "not what the last commit wrote (checksum {:08x}, the meta record lists {crc:08x})",
                                    e.crc
                                ),
                            ));
                        }
                        Some(_) => {}
                    }
                }
                if let Some(name) = entries.keys().find(|n| !m.resources.contains_key(*n)) {
                    return Err(self.corrupt(
                        format!("resource {name}"),
                        "present but not listed by the meta record",
                    ));
                }
            }
        }
        let seq = match (seq, &meta) {
            (Some(seq), _) => seq,
            (None, None) => 0,
            (None, Some(_)) => {
                return Err(self.corrupt("seq record", "missing while a meta record exists"));
            }
        };

        let mut records = BTreeMap::new();
        for kv in self.records.iter() {
            let (k, v) = kv.map_err(&err)?;
            let name = self.utf8_key(RECORDS_TREE, &k)?;
            let framed = self.checked(&format!("record {name}"), &v)?;
            records.insert(name, len64(framed.body.len()));
        }

        Ok((
            Snapshot {
                meta: meta.map(|m| m.meta),
                resources,
            },
            State {
                seq,
                resources: entries,
                records,
            },
        ))
    }

    /// Compares sled's write count with the head file. With `repair`, a
    /// head file behind sled (the process died between the flush and the
    /// head update) is brought forward.
    fn check_head(&self, seq: u64, repair: bool) -> Result<(), StoreError> {
        match head::read(&self.files, &self.path)? {
            None if seq == 0 => {
                if repair {
                    head::write(&self.files, &self.path, 0)?;
                }
                Ok(())
            }
            None => Err(self.corrupt(
                format!("head file {}", head::HEAD_FILE),
                format!("missing, but the store holds {seq} writes"),
            )),
            Some(acknowledged) if seq < acknowledged => Err(StoreError::RolledBack {
                path: self.path.clone(),
                holds: seq,
                acknowledged,
            }),
            Some(acknowledged) if seq > acknowledged && repair => {
                head::write(&self.files, &self.path, seq)
            }
            Some(_) => Ok(()),
        }
    }

    /// What `open` and `open_read_only_snapshot` share: format, creation
    /// (writable only) or migration, full validation, head check.
    fn load(&self, purpose: &str, writable: bool) -> Result<(Snapshot, State), StoreError> {
        match self.check_format(purpose)? {
            None => {
                if !self.is_blank() || head::read(&self.files, &self.path)?.is_some() {
                    return Err(self.corrupt("format record", "missing in a store that holds data"));
                }
                if !writable {
                    return Ok((Snapshot::default(), State::default()));
                }
                self.create(purpose)?;
            }
            Some(schema) if schema < SCHEMA_VERSION => {
                self.migrate(schema)?;
                self.check_format(purpose)?;
            }
            Some(_) => {}
        }
        let (snapshot, state) = self.read_all()?;
        self.check_head(state.seq, writable)?;
        Ok((snapshot, state))
    }
}

fn transaction_error(engine: &Engine) -> impl Fn(TransactionError<Infallible>) -> StoreError + '_ {
    move |e| match e {
        TransactionError::Storage(e) => engine.err()(e),
        TransactionError::Abort(never) => match never {},
    }
}

/// Errors met while opening are judged as opening errors: sled failing to
/// read its own files is corruption.
fn as_opening_error(e: StoreError) -> StoreError {
    match e {
        StoreError::Sled { path, source } => sled_error(&path, true, source),
        e => e,
    }
}

impl Store {
    /// Opens the store at `dir`, creating it if missing, and validates all
    /// of it. A corrupt, rolled-back or foreign store is moved aside to
    /// `<dir>.corrupt-<unix ms>` and a fresh one is created (reported in
    /// [`Opened::recovery`]); a store of a newer schema or sled engine, one
    /// in use, and I/O failures are errors that leave `dir` where it is.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Opened, StoreError> {
        let reason = match Self::open_validated(dir, &opts) {
            Ok((store, snapshot)) => {
                return Ok(Opened {
                    store,
                    recovery: None,
                    snapshot,
                });
            }
            Err(e) if e.moves_store_aside() => e,
            Err(e) => return Err(e),
        };
        let moved_to = move_aside(dir)?;
        tracing::warn!(
            store = %dir.display(),
            moved_to = %moved_to.display(),
            %reason,
            "store is unusable; moved it aside and starting empty"
        );
        let (store, snapshot) = Self::open_validated(dir, &opts)?;
        Ok(Opened {
            store,
            recovery: Some(Recovery { reason, moved_to }),
            snapshot,
        })
    }

    /// The store at `dir` and what it holds (read once, every record
    /// checked).
    fn open_validated(dir: &Path, opts: &StoreOptions) -> Result<(Self, Snapshot), StoreError> {
        remove_compaction_leftover(dir)?;
        let engine = Engine::open(dir, dir, opts.cache_capacity)?;
        let (snapshot, state) =
            guard_panics(dir, "sled files", || engine.load(&opts.purpose, true))
                .map_err(as_opening_error)?;
        let store = Self {
            inner: Arc::new(Inner {
                engine: RwLock::new(engine),
                opts: opts.clone(),
                state: Mutex::new(state),
            }),
        };
        Ok((store, snapshot))
    }

    /// Reads the store at `dir` without changing or moving anything (for
    /// `raven-edge show`): it reads a private copy, so it also works while
    /// an agent has the store open. Every check of [`Store::open`] applies,
    /// and a failed one is returned as the error. A missing directory reads
    /// as an empty snapshot.
    pub fn open_read_only_snapshot(dir: &Path, purpose: &str) -> Result<Snapshot, StoreError> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Io {
                    path: dir.to_owned(),
                    source: io::ErrorKind::NotADirectory.into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix("raven-store-read-")
            .tempdir()
            .map_err(|source| StoreError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let copy = tmp.path().join("store");
        copy_store(dir, &copy)?;
        let engine = Engine::open(&copy, dir, StoreOptions::default().cache_capacity)?;
        let loaded = guard_panics(dir, "sled files", || engine.load(purpose, false));
        drop(engine);
        loaded
            .map(|(snapshot, _)| snapshot)
            .map_err(as_opening_error)
    }

    fn engine(&self) -> RwLockReadGuard<'_, Engine> {
        // The engine is only replaced whole, so a panic elsewhere leaves it
        // usable.
        self.inner
            .engine
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn engine_mut(&self) -> RwLockWriteGuard<'_, Engine> {
        self.inner
            .engine
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // State is only changed after sled applied a write, so a panic
        // while it was held leaves it consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Everything the store holds, read and checked again.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let _writes_wait = self.state();
        self.engine().read_all().map(|(snapshot, _)| snapshot)
    }

    /// Applies `c` — removes first, then puts, then the meta record — as
    /// one atomic sled transaction, and makes it durable before returning.
    /// A commit that would hold more than `max_bytes` of payload fails with
    /// [`StoreError::TooLarge`] and changes nothing.
    pub fn commit(&self, c: Commit) -> Result<(), StoreError> {
        let state = self.state();
        let guard = self.engine();
        let engine = &*guard;

        let mut listing = state.resources.clone();
        for name in &c.remove {
            listing.remove(name);
        }
        let mut framed = Vec::with_capacity(c.put.len());
        for (name, resource) in &c.put {
            let key = || format!("resource {name}");
            let body = frame::encode_resource(resource).ok_or_else(|| {
                engine.unencodable(&key(), "its version is longer than 65535 bytes")
            })?;
            let value = frame::frame(&body)
                .ok_or_else(|| engine.unencodable(&key(), "its body is longer than 4 GiB"))?;
            listing.insert(
                name.clone(),
                Entry {
                    crc: crc32fast::hash(&body),
                    len: len64(body.len()),
                },
            );
            framed.push((name.as_bytes(), value));
        }
        let next = State {
            seq: state.seq + 1,
            resources: listing,
            records: state.records.clone(),
        };
        Self::check_size(engine, &self.inner.opts, &next)?;

        let meta = MetaBody {
            meta: c.meta,
            resources: next
                .resources
                .iter()
                .map(|(n, e)| (n.clone(), e.crc))
                .collect(),
        };
        let meta = serde_json::to_vec(&meta)
            .ok()
            .and_then(|b| frame::frame(&b))
            .ok_or_else(|| engine.unencodable("meta record", "does not serialize"))?;
        let seq = Self::seq_record(engine, &next)?;

        (&engine.meta, &engine.resources)
            .transaction(|(m, r)| {
                for name in &c.remove {
                    r.remove(name.as_bytes())?;
                }
                for (name, value) in &framed {
                    r.insert(*name, value.as_slice())?;
                }
                m.insert(META_KEY, meta.as_slice())?;
                m.insert(SEQ_KEY, seq.as_slice())?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(transaction_error(engine))?;
        self.install(state, guard, next)
    }

    /// A small named record, or `None` if it was never written.
    pub fn get_record(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let guard = self.engine();
        let engine = &*guard;
        let Some(value) = engine.records.get(key.as_bytes()).map_err(engine.err())? else {
            return Ok(None);
        };
        let framed = engine.checked(&format!("record {key}"), &value)?;
        Ok(Some(Bytes::copy_from_slice(framed.body)))
    }

    /// Writes small named records (hub counters, last-known hub addresses)
    /// in one atomic transaction, durable before returning. They count
    /// towards `max_bytes`.
    pub fn put_records(&self, records: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let state = self.state();
        let guard = self.engine();
        let engine = &*guard;

        let mut next = State {
            seq: state.seq + 1,
            resources: state.resources.clone(),
            records: state.records.clone(),
        };
        let mut framed = Vec::with_capacity(records.len());
        for (key, value) in records {
            let value = frame::frame(value).ok_or_else(|| {
                engine.unencodable(&format!("record {key}"), "it is longer than 4 GiB")
            })?;
            next.records
                .insert((*key).to_owned(), len64(value.len() - frame::HEADER_LEN));
            framed.push((key.as_bytes(), value));
        }
        Self::check_size(engine, &self.inner.opts, &next)?;
        let seq = Self::seq_record(engine, &next)?;

        (&engine.meta, &engine.records)
            .transaction(|(m, r)| {
                for (key, value) in &framed {
                    r.insert(*key, value.as_slice())?;
                }
                m.insert(SEQ_KEY, seq.as_slice())?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(transaction_error(engine))?;
        self.install(state, guard, next)
    }

    /// The framed sequence-number record of `next`.
    fn seq_record(engine: &Engine, next: &State) -> Result<Vec<u8>, StoreError> {
        frame::frame(&next.seq.to_le_bytes())
            .ok_or_else(|| engine.unencodable("seq record", "does not serialize"))
    }

    /// After the sled transaction that wrote `next`: makes it the state,
    /// durable before returning, then compacts the files if they grew too
    /// large for what they hold.
    fn install(
        &self,
        mut state: MutexGuard<'_, State>,
        engine: RwLockReadGuard<'_, Engine>,
        next: State,
    ) -> Result<(), StoreError> {
        let seq = next.seq;
        *state = next;
        Self::make_durable(&engine, seq)?;
        drop(engine);
        self.compact_if_bloated(&state);
        Ok(())
    }

    fn check_size(engine: &Engine, opts: &StoreOptions, next: &State) -> Result<(), StoreError> {
        let would_hold = next.payload_bytes();
        let limit = opts.max_bytes;
        if would_hold > limit {
            return Err(StoreError::TooLarge {
                path: engine.path.clone(),
                would_hold,
                limit,
            });
        }
        Ok(())
    }

    /// Flushes sled, then records write `seq` in the head file.
    fn make_durable(engine: &Engine, seq: u64) -> Result<(), StoreError> {
        engine.flush()?;
        head::write(&engine.files, &engine.path, seq)
    }

    /// Bytes of sled's files (the directory, without the head file).
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.engine().files)
    }

    /// sled is log-structured and reclaims little of what a stream of
    /// commits leaves behind. After a write, when the files hold more than
    /// [`COMPACT_FACTOR`] times the live data (payload plus the meta
    /// record, at least [`COMPACT_FLOOR`]), the store is rewritten: a fresh
    /// sled in `<dir>.compact` receives every value as stored, is flushed
    /// and given the head file, the two directories are exchanged in one
    /// atomic `renameat2(RENAME_EXCHANGE)`, the new files are opened and
    /// checked like any store at open, and the old ones are deleted. A
    /// crash at any point leaves `<dir>` complete — old or new — and a
    /// leftover `<dir>.compact` that the next open deletes. A failed
    /// compaction is logged and leaves the store as it was: the write
    /// itself has already been made durable.
    fn compact_if_bloated(&self, state: &State) {
        let live = state.payload_bytes() + state.meta_bytes();
        let budget = live.saturating_mul(COMPACT_FACTOR).max(COMPACT_FLOOR);
        let mut engine = self.engine_mut();
        let before = dir_bytes(&engine.files);
        if before <= budget || engine.files != engine.path {
            return;
        }
        let started = Instant::now();
        match compact(&engine, &self.inner.opts, state.seq) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *engine, fresh);
                drop(old);
                let aside = compact_dir(&engine.path);
                if let Err(e) = fs::remove_dir_all(&aside) {
                    tracing::warn!(dir = %aside.display(), error = %e, "could not remove the store's pre-compaction files");
                }
                tracing::info!(
                    store = %engine.path.display(),
                    before,
                    after = dir_bytes(&engine.files),
                    ms = started.elapsed().as_millis() as u64,
                    "compacted the store"
                );
            }
            Err(e) => {
                tracing::warn!(store = %engine.path.display(), error = %e, "store compaction failed; the store stays as it was");
            }
        }
    }

    /// The store's directory.
    pub fn path(&self) -> PathBuf {
        self.engine().path.clone()
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    /// Total payload bytes held (resource bodies and records): the
    /// quantity `max_bytes` bounds.
    pub fn payload_bytes(&self) -> u64 {
        self.state().payload_bytes()
    }
}
