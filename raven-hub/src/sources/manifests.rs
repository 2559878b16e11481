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

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use raven_core::manifest::{self, Owners};
use raven_core::{Problem, Severity};

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
    DirSource::new(dir.to_owned(), Limits::default()).load()
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
#[derive(Debug, Clone, Default, PartialEq)]
struct FileState {
    /// The stamp of the version last read (`None`: not readable then).
    stamp: Option<Stamp>,
    /// Its modification time was within [`RACY_WINDOW`] of the read.
    racy: bool,
    /// The last version that loaded without errors.
    last_good: Option<String>,
    /// What is served from this file now.
    serve: Option<String>,
    /// Problems of the file itself (not of its documents).
    problems: Vec<Problem>,
}

/// A watched manifest directory that remembers the last good contents of
/// every file and which file each object was first served from.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    limits: Limits,
    last_scan: Option<BTreeMap<String, Scanned>>,
    files: BTreeMap<String, FileState>,
    owners: Owners,
}

impl DirSource {
    pub fn new(dir: PathBuf, limits: Limits) -> Self {
        Self {
            dir,
            limits,
            last_scan: None,
            files: BTreeMap::new(),
            owners: Owners::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory now.
    pub fn load(&mut self) -> Result<manifest::Loaded, ManifestDirError> {
        let scan = scan(&self.dir, self.limits.max_file_bytes)?;
        self.refresh_all(scan);
        Ok(self.combine())
    }

    /// Looks for changes; `Some` when what the directory serves changed.
    pub fn poll(&mut self) -> Result<Option<manifest::Loaded>, ManifestDirError> {
        let scan = scan(&self.dir, self.limits.max_file_bytes)?;
        let racy = self.files.values().any(|f| f.racy);
        if self.last_scan.as_ref() == Some(&scan) && !racy {
            return Ok(None);
        }
        // Parse the whole directory again only when a file changed.
        Ok(self.refresh_all(scan).then(|| self.combine()))
    }

    /// Brings every file up to `scan`, reading only what changed. Returns
    /// whether any file's served content or problems changed.
    fn refresh_all(&mut self, scan: BTreeMap<String, Scanned>) -> bool {
        let mut files = BTreeMap::new();
        for (name, scanned) in &scan {
            let prev = self.files.get(name).cloned().unwrap_or_default();
            let next = self.refresh(name, scanned, prev);
            files.insert(name.clone(), next);
        }
        let changed = files.len() != self.files.len()
            || files.iter().any(|(name, f)| {
                self.files
                    .get(name)
                    .is_none_or(|p| p.serve != f.serve || p.problems != f.problems)
            });
        self.files = files;
        self.last_scan = Some(scan);
        changed
    }

    /// Loads what every file serves; the winners become the owners.
    fn combine(&mut self) -> manifest::Loaded {
        let used: Vec<(String, String)> = self
            .files
            .iter()
            .filter_map(|(n, f)| f.serve.clone().map(|t| (n.clone(), t)))
            .collect();
        let mut loaded = manifest::load_with(&used, self.limits.manifest, &self.owners);
        loaded
            .problems
            .extend(self.files.values().flat_map(|f| f.problems.iter().cloned()));
        loaded.problems.sort();
        loaded.problems.dedup();
        self.owners.clone_from(&loaded.origins);
        loaded
    }

    fn refresh(&self, name: &str, scanned: &Scanned, prev: FileState) -> FileState {
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
        if prev.serve.as_deref() == Some(text.as_str()) && prev.stamp.is_some() {
            // Re-read (racy or touched) but unchanged.
            return FileState {
                stamp: Some(stamp),
                racy,
                ..prev
            };
        }
        let alone = manifest::load_with(
            &[(name.to_owned(), text.clone())],
            self.limits.manifest,
            &Owners::new(),
        );
        let broken = alone.problems.iter().any(|p| p.severity == Severity::Error);
        match (broken, prev.last_good) {
            (true, Some(good)) => FileState {
                stamp: Some(stamp),
                racy,
                problems: std::iter::once(Problem::error(
                    name,
                    "",
                    "",
                    "this file has errors (see the problems that name it); serving its last good version",
                ))
                .chain(alone.problems)
                .collect(),
                serve: Some(good.clone()),
                last_good: Some(good),
            },
            (broken, _) => FileState {
                stamp: Some(stamp),
                racy,
                last_good: (!broken).then(|| text.clone()),
                serve: Some(text),
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
        assert_eq!(gateways(&s.load().expect("load")), ["gw-a"]);
        std::fs::remove_file(d.path().join("a.yaml")).expect("rm");
        std::fs::create_dir(d.path().join("a.yaml")).expect("mkdir");
        let l = s.poll().expect("poll").expect("changed: a problem");
        assert_eq!(gateways(&l), ["gw-a"]);
        assert!(names_file(&l, "a.yaml", "a directory"), "{:?}", l.problems);
        assert!(names_file(&l, "a.yaml", "last good"), "{:?}", l.problems);
        // A file that is deleted is a deliberate change: its objects go.
        std::fs::remove_dir(d.path().join("a.yaml")).expect("rmdir");
        let l = s.poll().expect("poll").expect("changed");
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
        assert_eq!(gateways(&s.load().expect("load")), ["gw-a"]);
        std::fs::remove_file(d.path().join("a.yaml")).expect("rm");
        std::os::unix::fs::symlink("/proc/self/mem", d.path().join("a.yaml")).expect("symlink");
        let l = s.poll().expect("poll").expect("changed: a problem");
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
        let l = source(d.path()).load().expect("load");
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
        let l = source(d.path()).load().expect("load");
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
        assert_eq!(gateways(&s.load().expect("load")), ["gw-a"]);
        write(
            d.path(),
            "a.yaml",
            &format!("{GW}---\n{}", "# pad\n".repeat(1000)),
        );
        let l = s.poll().expect("poll").expect("changed");
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
        assert_eq!(gateways(&source(d.path()).load().expect("load")), ["gw-b"]);
    }

    #[test]
    fn an_unchanged_directory_is_not_reloaded_and_a_changed_file_is() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.yaml", GW);
        let mut s = source(d.path());
        s.load().expect("load");
        // Racy re-reads of an unchanged file report nothing new.
        assert_eq!(s.poll().expect("poll"), None);
        write(d.path(), "b.yaml", GW_B);
        let l = s.poll().expect("poll").expect("changed");
        assert_eq!(gateways(&l), ["gw-a", "gw-b"]);
        // Same size, same second: still noticed (racy window).
        write(d.path(), "b.yaml", &GW_B.replace("gw-b", "gw-c"));
        let l = s.poll().expect("poll").expect("changed");
        assert_eq!(gateways(&l), ["gw-a", "gw-c"]);
    }

    #[test]
    fn a_duplicate_in_an_earlier_file_never_replaces_the_served_object() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "gw.yaml", GW);
        let mut s = source(d.path());
        s.load().expect("load");
        write(d.path(), "0-dup.yaml", &GW.replace("4500", "1"));
        let l = s.poll().expect("poll").expect("changed");
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
        let l = s.poll().expect("poll").expect("changed");
        assert_eq!(
            l.inputs.gateways["gw-a"].gateway().spec.endpoints[0].port,
            1
        );
    }
}
