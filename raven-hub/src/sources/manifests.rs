//! The manifest-directory source: the `*.yaml`, `*.yml` and `*.json` files
//! of a directory (not recursive), re-read when they change. The standalone
//! mode uses it.
//!
//! What one file does can only affect that file:
//! - Only regular files are read (a symlink is followed to one), opened
//!   non-blocking and read at most `--manifest-max-file-bytes`: a FIFO, a
//!   device (`/dev/zero`), a directory, a symlink loop or an oversized file
//!   is reported by name and never read.
//! - A file that cannot be read or parsed keeps serving its last good
//!   version (an I/O error is not a deletion); only a file gone from the
//!   directory drops its objects.
//! - Of two copies of one object, the copy in the file that served it
//!   first wins, whatever the file names; the other copy is reported.
//!
//! A change costs what the changed files hold, not what the directory
//! holds: each file's parse is kept ([`manifest::FileObjects`]), only a file
//! whose text changed is parsed again, and only the objects it defines are
//! merged ([`manifest::Merged`]) and handed to the index ([`Change`]).
//!
//! Changes are noticed by inotify ([`watch`], the `notify` crate), which
//! wakes a poll; a poll compares `stat` stamps (device, inode, size,
//! modification and change times, mode) and re-reads only the files whose
//! stamp changed, plus any file written within [`RACY_WINDOW`] of its last
//! read, so a same-size write within the file system's timestamp
//! granularity is not missed. The poll also runs every
//! [`SAFETY_POLL_INTERVAL`] (a symlinked file's target outside the
//! directory, a directory replaced as a whole), or every [`POLL_INTERVAL`]
//! where inotify is not available. The caller runs polls off the async
//! runtime (they block on disk).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use raven_core::compile::Admitted;
use raven_core::manifest::{self, FileObjects, Merged, Object, Owners};
use raven_core::{ClusterNode, NodeName, Problem, RavenConfig};

/// A manifest directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestDirError {
    #[error("reading manifest directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Default of `--manifest-max-file-bytes`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 20;

/// How often the directory is polled for changes (`stat` only) when
/// inotify is not available.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often it is polled anyway while inotify watches it.
pub const SAFETY_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Watches `dir` (not recursive) with inotify and wakes `wake` on every
/// event (and on watcher errors, which call for a rescan). `None`, logged,
/// when inotify is not available (e.g. out of watches): poll instead.
pub fn watch(
    dir: &Path,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let handler = move |event: notify::Result<notify::Event>| {
        // Our own reads (open, close without writing) change nothing.
        if let Ok(e) = &event
            && matches!(e.kind, notify::EventKind::Access(_))
        {
            return;
        }
        wake.notify_one();
    };
    let watched = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watched {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the manifest directory with inotify; polling it every {POLL_INTERVAL:?}");
            None
        }
    }
}

/// A file modified this close to when it was read may change again without
/// its stamp changing (coarse timestamps); it is re-read on the next poll.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Caps on the files of a manifest directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one file; a larger file is not read.
    pub max_file_bytes: u64,
    /// Documents per file and endpoints per Gateway.
    pub manifest: manifest::Limits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            manifest: manifest::Limits::default(),
        }
    }
}

/// Reads every manifest file of `dir` once (`raven-hub compile`).
pub fn read_dir(dir: &Path) -> Result<manifest::Loaded, ManifestDirError> {
    let mut source = DirSource::new(dir.to_owned(), Limits::default());
    source.load()?;
    Ok(source.loaded())
}

/// A file as `stat` sees it: any write changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            len: md.size(),
            mode: md.mode(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// One directory entry: a regular file's stamp, or why it cannot be read.
type Scanned = Result<Stamp, String>;

fn is_manifest_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
}

fn describe_type(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Lists the manifest files of `dir` with their stamps (`stat` only, never
/// opens a file). A name that vanished between listing and `stat` is left
/// out (it was deleted).
fn scan(dir: &Path, max_bytes: u64) -> Result<BTreeMap<String, Scanned>, ManifestDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestDirError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_manifest_name(&name) {
            continue;
        }
        let path = e.path();
        let scanned = match std::fs::metadata(&path) {
            Ok(md) if !md.is_file() => Err(format!(
                "is {}, not a regular file; not read",
                describe_type(&md)
            )),
            Ok(md) if md.len() > max_bytes => Err(format!(
                "is {} bytes, more than --manifest-max-file-bytes ({max_bytes}); not read",
                md.len()
            )),
            Ok(md) => Ok(Stamp::of(&md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::symlink_metadata(&path) {
                    Ok(_) => Err("is a symlink to nothing (dangling); not read".to_owned()),
                    Err(_) => continue,
                }
            }
            Err(e) if e.raw_os_error() == Some(40) => {
                Err("is a symlink loop (too many levels of symbolic links); not read".to_owned())
            }
            Err(e) => Err(format!("cannot stat: {e}")),
        };
        out.insert(name, scanned);
    }
    Ok(out)
}

/// Reads a regular file of at most `max` bytes without ever blocking on a
/// FIFO or device that took its place since the `stat`.
fn read_capped(path: &Path, max: u64) -> Result<String, String> {
    const O_NONBLOCK_NOCTTY: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let md = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !md.is_file() {
        return Err(format!(
            "is {}, not a regular file; not read",
            describe_type(&md)
        ));
    }
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!(
            "is more than --manifest-max-file-bytes ({max}) bytes; not read"
        ));
    }
    String::from_utf8(buf).map_err(|e| format!("is not UTF-8 ({e}); not read"))
}

/// What the source keeps of one file.
#[derive(Debug, Clone, Default)]
struct FileState {
    /// The stamp of the version last read (`None`: not readable then).
    stamp: Option<Stamp>,
    /// Its modification time was within [`RACY_WINDOW`] of the read.
    racy: bool,
    /// The last version that loaded without errors, and its parse.
    last_good: Option<(String, Arc<FileObjects>)>,
    /// What is served from this file now: its text and its parse.
    serve: Option<(String, Arc<FileObjects>)>,
    /// Problems of the file itself (not of its documents).
    problems: Vec<Problem>,
}

impl FileState {
    fn served(&self) -> Option<&Arc<FileObjects>> {
        self.serve.as_ref().map(|(_, o)| o)
    }
}

/// What changed in what the directory serves: only the objects the changed
/// files define (the index applies exactly these).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// Gateways by name as written: admitted, refused by admission (with
    /// why), or gone (`None`).
    pub gateways: BTreeMap<String, Option<Result<Admitted, Vec<Problem>>>>,
    /// Nodes: the new version, or gone (`None`).
    pub nodes: BTreeMap<NodeName, Option<ClusterNode>>,
    /// `raven-cfg` changed: its new value (the default when it is gone).
    pub config: Option<RavenConfig>,
    /// Every problem the source finds now (files and their documents).
    pub problems: Vec<Problem>,
}

/// A watched manifest directory that keeps every file's last good contents
/// and their parse, and which file each object is served from.
///
/// Work per change is proportional to the files that changed: a poll
/// `stat`s the directory, reads only files whose stamp changed (or that
/// are racy), parses only those whose text changed, and merges only the
/// objects those files define ([`manifest::Merged`]).
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    limits: Limits,
    last_scan: Option<BTreeMap<String, Scanned>>,
    files: BTreeMap<String, FileState>,
    merged: Merged,
    /// The problems of the last change handed out.
    last_problems: Vec<Problem>,
    /// Files read and files parsed since the start (see [`DirSource::work`]).
    work: Work,
}

/// What a source has done since it started: files read, files parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub reads: u64,
    pub parses: u64,
}

impl DirSource {
    pub fn new(dir: PathBuf, limits: Limits) -> Self {
        Self::with_owners(dir, limits, Owners::new())
    }

    /// A source that resolves duplicates as if `owners` had served them
    /// (a from-scratch source comparable to one with history).
    pub fn with_owners(dir: PathBuf, limits: Limits, owners: Owners) -> Self {
        Self {
            dir,
            limits,
            last_scan: None,
            files: BTreeMap::new(),
            merged: Merged::new(owners),
            last_problems: Vec::new(),
            work: Work::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files read and parsed so far.
    pub fn work(&self) -> Work {
        self.work
    }

    /// Which file serves each object.
    pub fn owners(&self) -> &Owners {
        self.merged.owners()
    }

    /// Reads the directory now (the first read): the change lists every
    /// object served.
    pub fn load(&mut self) -> Result<Change, ManifestDirError> {
        let scan = scan(&self.dir, self.limits.max_file_bytes)?;
        self.refresh_all(scan);
        let every: BTreeSet<String> = self.merged.owners().keys().cloned().collect();
        Ok(self.change(&every))
    }

    /// Everything the directory serves now, as one load.
    pub fn loaded(&self) -> manifest::Loaded {
        let mut loaded = self.merged.loaded();
        loaded.problems = self.problems();
        loaded
    }

    /// Looks for changes; `Some` when what the directory serves changed.
    pub fn poll(&mut self) -> Result<Option<Change>, ManifestDirError> {
        let scan = scan(&self.dir, self.limits.max_file_bytes)?;
        let racy = self.files.values().any(|f| f.racy);
        if self.last_scan.as_ref() == Some(&scan) && !racy {
            return Ok(None);
        }
        let touched = self.refresh_all(scan);
        let problems_before = std::mem::take(&mut self.last_problems);
        let change = self.change(&touched);
        if touched.is_empty() && change.problems == problems_before {
            return Ok(None);
        }
        Ok(Some(change))
    }

    /// Brings every file up to `scan`, reading only what changed, and
    /// merges the parse of each file whose served version changed. Returns
    /// the objects (`Kind/name`) those files define.
    fn refresh_all(&mut self, scan: BTreeMap<String, Scanned>) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|n| !scan.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            // A file gone from the directory takes exactly its objects.
            self.files.remove(&name);
            touched.extend(self.merged.stage(&name, 0, None));
        }
        for (name, scanned) in &scan {
            let prev = self.files.remove(name).unwrap_or_default();
            let before = prev.served().cloned();
            let next = self.refresh(name, scanned, prev);
            let same = match (&before, next.served()) {
                (Some(b), Some(a)) => Arc::ptr_eq(b, a),
                (None, None) => true,
                _ => false,
            };
            if !same {
                touched.extend(self.merged.stage(name, 0, next.served().cloned()));
            }
            self.files.insert(name.clone(), next);
        }
        // One batch: the owners from before this poll decide duplicates.
        self.merged.resolve(&touched);
        self.last_scan = Some(scan);
        touched
    }

    /// The served state of the objects `touched` names, and every problem.
    fn change(&mut self, touched: &BTreeSet<String>) -> Change {
        let problems = self.problems();
        self.last_problems.clone_from(&problems);
        let mut change = Change {
            problems,
            ..Default::default()
        };
        for key in touched {
            let served = self.merged.served(key).map(|(_, p)| &p.object);
            if let Some(name) = manifest::gateway_of_key(key) {
                let gw = match served {
                    Some(Object::Gateway(g)) => Some((**g).clone()),
                    _ => None,
                };
                change.gateways.insert(name.to_owned(), gw);
            } else if let Some(name) = key.strip_prefix("Node/") {
                let Ok(name) = NodeName::new(name) else {
                    continue;
                };
                let node = match served {
                    Some(Object::Node(n)) => Some(n.clone()),
                    _ => None,
                };
                change.nodes.insert(name, node);
            } else {
                change.config = Some(match served {
                    Some(Object::Config(c)) => *c,
                    _ => RavenConfig::default(),
                });
            }
        }
        change
    }

    /// The files' own problems and their documents', sorted.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = self.merged.problems();
        problems.extend(self.files.values().flat_map(|f| f.problems.iter().cloned()));
        problems.sort();
        problems.dedup();
        problems
    }

    fn refresh(&mut self, name: &str, scanned: &Scanned, prev: FileState) -> FileState {
        let keeping = |reason: &str, prev: &FileState| {
            let tail = if prev.serve.is_some() {
                "; serving its last good version"
            } else {
                ""
            };
            Problem::error(name, "", "", format!("this file {reason}{tail}"))
        };
        let stamp = match scanned {
            Err(reason) => {
                return FileState {
                    stamp: None,
                    racy: false,
                    problems: vec![keeping(reason, &prev)],
                    ..prev
                };
            }
            Ok(stamp) => *stamp,
        };
        if prev.stamp == Some(stamp) && !prev.racy {
            return prev;
        }
        let read_at = SystemTime::now();
        let racy = (|| {
            let mtime = SystemTime::UNIX_EPOCH
                + Duration::new(
                    u64::try_from(stamp.mtime.0).ok()?,
                    u32::try_from(stamp.mtime.1).ok()?,
                );
            Some(read_at.duration_since(mtime).unwrap_or_default() < RACY_WINDOW)
        })()
        .unwrap_or(true);
        self.work.reads += 1;
        let text = match read_capped(&self.dir.join(name), self.limits.max_file_bytes) {
            Ok(text) => text,
            Err(reason) => {
                return FileState {
                    stamp: None,
                    racy: false,
                    problems: vec![keeping(&reason, &prev)],
                    ..prev
                };
            }
        };
        let unchanged = prev.serve.as_ref().is_some_and(|(t, _)| *t == text);
        if unchanged && prev.stamp.is_some() {
            // Re-read (racy or touched) but unchanged.
            return FileState {
                stamp: Some(stamp),
                racy,
                ..prev
            };
        }
        self.work.parses += 1;
        let alone = Arc::new(manifest::parse_file(name, &text, self.limits.manifest));
        match (alone.has_errors(), prev.last_good) {
            (true, Some(good)) => FileState {
                stamp: Some(stamp),
                racy,
                problems: std::iter::once(Problem::error(
                    name,
                    "",
                    "",
                    "this file has errors (see the problems that name it); serving its last good version",
                ))
                .chain(alone.problems.iter().cloned())
                .collect(),
                serve: Some(good.clone()),
                last_good: Some(good),
            },
            (broken, _) => FileState {
                stamp: Some(stamp),
                racy,
                last_good: (!broken).then(|| (text.clone(), alone.clone())),
                serve: Some((text, alone)),
                problems: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {name: gw-a}\nspec: {endpoints: [{nodeName: n1, type: tunnel, port: 4500}]}\n";
    const GW_B: &str =
        "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {name: gw-b}\nspec: {}\n";

    fn source(dir: &Path) -> DirSource {
        DirSource::new(dir.to_owned(), Limits::default())
    }

    /// The first read, as one load.
    fn load(s: &mut DirSource) -> manifest::Loaded {
        s.load().expect("load");
        s.loaded()
    }

    /// A poll that must find a change; what is served then.
    fn changed(s: &mut DirSource, why: &str) -> manifest::Loaded {
        s.poll().expect("poll").expect(why);
        s.loaded()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    fn gateways(l: &manifest::Loaded) -> Vec<&str> {
        l.inputs
            .gateways
            .keys()
            .map(raven_core::GatewayName::as_str)
            .collect()
    }

    fn names_file(l: &manifest::Loaded, file: &str, what: &str) -> bool {
        l.problems
            .iter()
            .any(|p| p.object == file && p.message.contains(what))
    }

    #[test]
    fn a_file_replaced_by_a_directory_keeps_serving_its_last_good_version() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let mut s = source(d.path());
        assert_eq!(gateways(&load(&mut s)), ["gw-a"]);
        std::fs::remove_file(d.path().join("a.yaml")).expect("rm");
        std::fs::create_dir(d.path().join("a.yaml")).expect("mkdir");
        let l = changed(&mut s, "changed: a problem");
        assert_eq!(gateways(&l), ["gw-a"]);
        assert!(names_file(&l, "a.yaml", "a directory"), "{:?}", l.problems);
        assert!(names_file(&l, "a.yaml", "last good"), "{:?}", l.problems);
        // A file that is deleted is a deliberate change: its objects go.
        std::fs::remove_dir(d.path().join("a.yaml")).expect("rmdir");
        let l = changed(&mut s, "changed");
        assert!(l.inputs.gateways.is_empty());
        assert!(l.problems.is_empty(), "{:?}", l.problems);
    }

    #[test]
    fn a_file_that_fails_with_an_io_error_keeps_serving_its_last_good_version() {
        // Root reads a chmod-000 file anyway; /proc/self/mem is a regular
        // file whose read at offset 0 fails (EIO) for everyone.
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let mut s = source(d.path());
        assert_eq!(gateways(&load(&mut s)), ["gw-a"]);
        std::fs::remove_file(d.path().join("a.yaml")).expect("rm");
        std::os::unix::fs::symlink("/proc/self/mem", d.path().join("a.yaml")).expect("symlink");
        let l = changed(&mut s, "changed: a problem");
        assert_eq!(gateways(&l), ["gw-a"]);
        assert!(names_file(&l, "a.yaml", "cannot read"), "{:?}", l.problems);
        assert!(names_file(&l, "a.yaml", "last good"), "{:?}", l.problems);
    }

    #[test]
    fn a_fifo_and_a_symlink_to_dev_zero_are_reported_and_never_read() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let fifo = d.path().join("fifo.yaml");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success();
        assert!(ok);
        std::os::unix::fs::symlink("/dev/zero", d.path().join("zero.yaml")).expect("symlink");
        let started = std::time::Instant::now();
        let l = load(&mut source(d.path()));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(gateways(&l), ["gw-a"]);
        assert!(names_file(&l, "fifo.yaml", "a FIFO"), "{:?}", l.problems);
        assert!(
            names_file(&l, "zero.yaml", "a character device"),
            "{:?}",
            l.problems
        );
    }

    #[test]
    fn a_symlink_loop_is_reported() {
        let d = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("loop2.yaml", d.path().join("loop1.yaml")).expect("symlink");
        std::os::unix::fs::symlink("loop1.yaml", d.path().join("loop2.yaml")).expect("symlink");
        let l = load(&mut source(d.path()));
        assert!(
            names_file(&l, "loop1.yaml", "symlink loop"),
            "{:?}",
            l.problems
        );
    }

    #[test]
    fn an_oversized_file_is_reported_and_its_last_good_version_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let mut s = DirSource::new(
            d.path().to_owned(),
            Limits {
                max_file_bytes: 4096,
                ..Default::default()
            },
        );
        assert_eq!(gateways(&load(&mut s)), ["gw-a"]);
        write(
            d.path(),
            "a.yaml",
            &format!("{GW}---\n{}", "# pad\n".repeat(1000)),
        );
        let l = changed(&mut s, "changed");
        assert_eq!(gateways(&l), ["gw-a"]);
        assert!(
            names_file(&l, "a.yaml", "--manifest-max-file-bytes"),
            "{:?}",
            l.problems
        );
    }

    #[tokio::test]
    async fn inotify_wakes_the_source_on_a_write_long_before_the_safety_poll() {
        let d = tempfile::tempdir().expect("tempdir");
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let _watcher = watch(d.path(), wake.clone()).expect("inotify");
        write(d.path(), "a.yaml", GW);
        tokio::time::timeout(Duration::from_secs(2), wake.notified())
            .await
            .expect("woken by inotify");
    }

    #[test]
    fn json_files_are_read_and_other_extensions_ignored() {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "b.json",
            r#"{"apiVersion": "raven.openyurt.io/v1beta1", "kind": "Gateway", "metadata": {"name": "gw-b"}, "spec": {}}"#,
        );
        write(d.path(), "a.txt", GW);
        assert_eq!(gateways(&load(&mut source(d.path()))), ["gw-b"]);
    }

    #[test]
    fn an_unchanged_directory_is_not_reloaded_and_a_changed_file_is() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let mut s = source(d.path());
        load(&mut s);
        // Racy re-reads of an unchanged file report nothing new.
        assert_eq!(s.poll().expect("poll"), None);
        write(d.path(), "b.yaml", GW_B);
        let l = changed(&mut s, "changed");
        assert_eq!(gateways(&l), ["gw-a", "gw-b"]);
        // Same size, same second: still noticed (racy window).
        write(d.path(), "b.yaml", &GW_B.replace("gw-b", "gw-c"));
        let l = changed(&mut s, "changed");
        assert_eq!(gateways(&l), ["gw-a", "gw-c"]);
    }

    #[test]
    fn a_duplicate_in_an_earlier_file_never_replaces_the_served_object() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "gw.yaml", GW);
        let mut s = source(d.path());
        load(&mut s);
        write(d.path(), "0-dup.yaml", &GW.replace("4500", "1"));
        let l = changed(&mut s, "changed");
        assert_eq!(
            l.inputs.gateways["gw-a"].gateway().spec.endpoints[0].port,
            4500
        );
        assert!(
            l.problems
                .iter()
                .any(|p| p.object == "Gateway/gw-a (0-dup.yaml#1)"),
            "{:?}",
            l.problems
        );
        // The owner going away hands the object to the remaining copy.
        std::fs::remove_file(d.path().join("gw.yaml")).expect("rm");
        let l = changed(&mut s, "changed");
        assert_eq!(
            l.inputs.gateways["gw-a"].gateway().spec.endpoints[0].port,
            1
        );
    }

    fn node(name: &str, gw: &str, cidr: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{raven.openyurt.io/gateway: {gw}}}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{conditions: [{{type: Ready, status: \"True\"}}], addresses: [{{type: InternalIP, address: 192.168.0.{}}}]}}\n",
            cidr.split('.').nth(2).unwrap_or("1")
        )
    }

    /// A gateway file: the Gateway `gw` (tunnel endpoint on `port`) and its
    /// node `n`.
    fn domain(gw: &str, n: &str, port: u16, cidr: &str) -> String {
        format!(
            "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {{name: {gw}}}\nspec: {{endpoints: [{{nodeName: {n}, type: tunnel, port: {port}}}]}}\n---\n{}",
            node(n, gw, cidr)
        )
    }

    /// Backdates a file's modification time out of the racy window, as a
    /// file written long ago would be.
    fn age(dir: &Path, name: &str) {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(name))
            .expect("open");
        f.set_modified(SystemTime::now() - Duration::from_secs(60))
            .expect("set mtime");
    }

    fn names<K: ToString, V>(m: &BTreeMap<K, V>) -> Vec<String> {
        m.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn a_change_to_one_file_reads_and_parses_only_that_file() {
        let d = tempfile::tempdir().expect("tempdir");
        for (f, gw, n, cidr) in [
            ("a.yaml", "gw-a", "n-a", "10.0.1.0/24"),
            ("b.yaml", "gw-b", "n-b", "10.0.2.0/24"),
            ("c.yaml", "gw-c", "n-c", "10.0.3.0/24"),
        ] {
            write(d.path(), f, &domain(gw, n, 4500, cidr));
            age(d.path(), f);
        }
        let mut s = source(d.path());
        let first = s.load().expect("load");
        assert_eq!(names(&first.gateways), ["gw-a", "gw-b", "gw-c"]);
        assert_eq!(
            s.work(),
            Work {
                reads: 3,
                parses: 3
            }
        );
        write(
            d.path(),
            "b.yaml",
            &domain("gw-b", "n-b", 4600, "10.0.2.0/24"),
        );
        let change = s.poll().expect("poll").expect("b.yaml changed");
        assert_eq!(
            s.work(),
            Work {
                reads: 4,
                parses: 4
            },
            "only b.yaml is read and parsed again"
        );
        // The change carries exactly b.yaml's objects.
        assert_eq!(names(&change.gateways), ["gw-b"]);
        assert_eq!(names(&change.nodes), ["n-b"]);
        assert_eq!(change.config, None);
        let port = |c: &Change| {
            c.gateways["gw-b"]
                .as_ref()
                .and_then(|g| g.as_ref().ok())
                .map(|g| g.gateway().spec.endpoints[0].port)
        };
        assert_eq!(port(&change), Some(4600));
        // b.yaml was written just now (racy): the next poll reads it again
        // but does not parse what did not change, and reports nothing.
        assert_eq!(s.poll().expect("poll"), None);
        assert_eq!(
            s.work(),
            Work {
                reads: 5,
                parses: 4
            }
        );
    }

    /// A directory of a.yaml (gw-a, n-a) and b.yaml (gw-b, n-b), loaded.
    fn two_domains() -> (tempfile::TempDir, DirSource) {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "a.yaml",
            &domain("gw-a", "n-a", 4500, "10.0.1.0/24"),
        );
        write(
            d.path(),
            "b.yaml",
            &domain("gw-b", "n-b", 4500, "10.0.2.0/24"),
        );
        let mut s = source(d.path());
        s.load().expect("load");
        (d, s)
    }

    #[test]
    fn deleting_a_file_removes_exactly_its_objects_and_a_rename_keeps_them() {
        let (d, mut s) = two_domains();
        std::fs::remove_file(d.path().join("b.yaml")).expect("rm");
        let change = s.poll().expect("poll").expect("b.yaml gone");
        assert_eq!(change.gateways, [("gw-b".to_owned(), None)].into());
        assert_eq!(change.nodes.len(), 1);
        assert_eq!(change.nodes.values().next(), Some(&None));
        let l = s.loaded();
        assert_eq!(gateways(&l), ["gw-a"]);
        assert_eq!(names(&l.inputs.nodes), ["n-a"]);
        // A rename: the same objects, now from c.yaml.
        std::fs::rename(d.path().join("a.yaml"), d.path().join("c.yaml")).expect("mv");
        let change = s.poll().expect("poll").expect("renamed");
        assert_eq!(names(&change.gateways), ["gw-a"]);
        assert!(change.gateways["gw-a"].is_some());
        assert!(change.nodes.values().all(Option::is_some));
        assert_eq!(s.owners()["Gateway/gw-a"], "c.yaml");
        assert_eq!(gateways(&s.loaded()), ["gw-a"]);
    }

    #[test]
    fn a_broken_edit_keeps_the_files_last_good_objects_and_names_the_file_and_field() {
        let (d, mut s) = two_domains();
        write(
            d.path(),
            "a.yaml",
            &domain("gw-a", "n-a", 4500, "10.0.1.0/24").replace("port: 4500", "port: many"),
        );
        let change = s.poll().expect("poll").expect("a new problem");
        // Nothing served changed: only the problems.
        assert!(change.gateways.is_empty() && change.nodes.is_empty());
        let l = s.loaded();
        assert_eq!(gateways(&l), ["gw-a", "gw-b"]);
        assert_eq!(
            l.inputs.gateways["gw-a"].gateway().spec.endpoints[0].port,
            4500
        );
        assert!(names_file(&l, "a.yaml", "last good"), "{:?}", l.problems);
        assert!(
            l.problems
                .iter()
                .any(|p| p.object.contains("a.yaml#1") && p.field == "spec.endpoints[0].port"),
            "{:?}",
            l.problems
        );
        // Fixed: the new version is served and the problems go.
        write(
            d.path(),
            "a.yaml",
            &domain("gw-a", "n-a", 4700, "10.0.1.0/24"),
        );
        let change = s.poll().expect("poll").expect("fixed");
        assert_eq!(names(&change.gateways), ["gw-a"]);
        assert!(change.problems.is_empty(), "{:?}", change.problems);
    }

    use proptest::prelude::*;

    /// One edit of the directory.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Writes file `f` as domain `g` with a port and pod subnet.
        Write {
            f: usize,
            g: usize,
            port: u16,
            net: u8,
        },
        Delete {
            f: usize,
        },
        Rename {
            from: usize,
            to: usize,
        },
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => (0..5usize, 0..4usize, 4500..4503u16, 1..4u8)
                .prop_map(|(f, g, port, net)| Edit::Write { f, g, port, net }),
            1 => (0..5usize).prop_map(|f| Edit::Delete { f }),
            1 => (0..5usize, 0..5usize).prop_map(|(from, to)| Edit::Rename { from, to }),
        ]
    }

    fn apply_edit(dir: &Path, e: &Edit) {
        let file = |f: usize| dir.join(format!("f{f}.yaml"));
        match *e {
            Edit::Write { f, g, port, net } => {
                // Same domain in two files is a duplicate: on purpose.
                let text = domain(
                    &format!("gw-{g}"),
                    &format!("n-{g}"),
                    port,
                    &format!("10.{net}.{g}.0/24"),
                );
                std::fs::write(file(f), text).expect("write");
            }
            Edit::Delete { f } => {
                let _ = std::fs::remove_file(file(f));
            }
            Edit::Rename { from, to } => {
                let _ = std::fs::rename(file(from), file(to));
            }
        }
    }

    /// The index's view, order-independent.
    fn view(i: &crate::index::Index) -> (raven_core::Inputs, Vec<Problem>) {
        let (inputs, mut problems) = i.inputs();
        problems.sort();
        (inputs, problems)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// After any sequence of edits, the index fed only the changes holds
        /// what a from-scratch read of the directory gives (same owners for
        /// duplicates), and compiles to the same topology.
        #[test]
        fn incremental_changes_give_what_a_from_scratch_read_gives(edits in prop::collection::vec(edit(), 1..12)) {
            let d = tempfile::tempdir().expect("tempdir");
            write(d.path(), "raven-cfg.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: raven-cfg, namespace: kube-system}\ndata: {enable-l3-tunnel: \"true\"}\n");
            let mut s = source(d.path());
            let mut index = crate::index::Index::default();
            index.apply_manifest_change(s.load().expect("load"));
            for e in &edits {
                apply_edit(d.path(), e);
                if let Some(change) = s.poll().expect("poll") {
                    index.apply_manifest_change(change);
                }
                let mut fresh = DirSource::with_owners(d.path().to_owned(), Limits::default(), s.owners().clone());
                let mut scratch = crate::index::Index::default();
                scratch.apply_manifest_change(fresh.load().expect("load"));
                prop_assert_eq!(fresh.owners(), s.owners());
                let (got, want) = (view(&index), view(&scratch));
                prop_assert_eq!(&got, &want, "after {:?}", e);
                prop_assert_eq!(
                    raven_core::compile(&got.0).topology,
                    raven_core::compile(&want.0).topology
                );
            }
        }
    }
}
