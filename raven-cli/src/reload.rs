//! A value built from files and built again when they change — a TLS
//! configuration from its certificate, key and CA files — with the last
//! good version kept when the new files do not build.
//!
//! Changes are noticed the way a Kubernetes Secret volume makes them: the
//! kubelet writes the new files into a fresh hidden directory and renames a
//! `..data` symlink onto it, so every visible file (itself a symlink
//! through `..data`) changes at once, with nothing written in place. The
//! parent directory of each file is watched with inotify (the rename is an
//! event there) and every file is `stat`ed through its symlinks (device,
//! inode, size, modification and change times): a change of any file,
//! whichever way it was made (the swap, a rename onto it, an edit in
//! place), makes a new build. A poll every [`POLL_INTERVAL`] catches what
//! inotify misses (a symlink pointing outside the watched directory, no
//! inotify at all).
//!
//! A build that fails — a torn or half-written file, a key that does not
//! match the certificate, an expired certificate — is logged as an error
//! naming the file, and the previous version stays in use; the next change
//! of any file is tried again. Watching and building run on a thread of
//! their own, never on the async runtime (they block on the disk); it ends
//! once every [`Reloading`] handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// How often the files are `stat`ed whatever inotify says.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How long a burst of events is let settle before the files are read: a
/// writer replacing two files one after the other is read once, complete.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The current version of a value built from files; cheap to clone.
#[derive(Debug)]
pub struct Reloading<T> {
    rx: watch::Receiver<Arc<T>>,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            refused: self.refused.clone(),
        }
    }
}

/// A file's identity and content stamp, through symlinks; `None`: missing
/// or unreadable.
type Stamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            })
        })
        .collect()
}

/// The stamps of `files` now, to compare with a later call (a change of
/// any file, a swap of the `..data` symlink behind it included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamps(Vec<Stamp>);

impl FileStamps {
    /// Blocks on the disk (`stat` of each file): call it off the runtime.
    pub fn of(files: &[PathBuf]) -> Self {
        Self(stamps(files))
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value now (an error is returned as is: a process refuses
    /// to start on bad files) and again on every change of `files`.
    /// `what` names the value in log lines ("the hub's serving
    /// certificate").
    pub fn start<E, F>(what: &'static str, files: Vec<PathBuf>, mut build: F) -> Result<Self, E>
    where
        E: std::fmt::Display,
        F: FnMut() -> Result<T, E> + Send + 'static,
    {
        let seen = stamps(&files);
        let first = build()?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let (events_tx, events) = std::sync::mpsc::channel::<()>();
        let watcher = watch_dirs(what, &files, events_tx);
        let refused = Arc::new(std::sync::Mutex::new(None));
        let followed = Followed {
            what,
            tx,
            refused: refused.clone(),
        };
        std::thread::Builder::new()
            .name("raven-reload".into())
            .spawn(move || {
                // Dropped with the thread: the inotify watches end with it.
                let _watcher = watcher;
                follow(&followed, &files, seen, &events, &mut build);
            })
            .map_err(|e| {
                tracing::error!(what, error = %e, "cannot start the thread that reloads files; they are read only once");
            })
            .ok();
        Ok(Self { rx, refused })
    }
}

impl<T> Reloading<T> {
    /// The version in use now.
    pub fn current(&self) -> Arc<T> {
        self.rx.borrow().clone()
    }

    /// Why the files' latest change was refused, while the version in use
    /// is older than the files (`None` once a change loaded).
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A receiver that sees every new version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.rx.clone()
    }
}

/// Writes `files` (name, content) into `mount` the way the kubelet updates
/// a Secret volume: into a fresh `..<generation>` directory (mode 0600),
/// then the `..data` symlink renamed onto it — one atomic switch of every
/// file — with each visible name a symlink through `..data` (made once).
/// What [`Reloading`] must follow; the tests rotate certificates with it.
pub fn write_secret_volume(
    mount: &Path,
    generation: &str,
    files: &[(&str, &[u8])],
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = mount.join(format!("..{generation}"));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in files {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))?;
        std::io::Write::write_all(&mut f, bytes)?;
    }
    let tmp = mount.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{generation}"), &tmp)?;
    std::fs::rename(&tmp, mount.join("..data"))?;
    for (name, _) in files {
        let link = mount.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    Ok(())
}

/// Watches the parent directory of each of `files`; `None` (logged) when
/// inotify is not available: the poll alone then notices changes.
fn watch_dirs(
    what: &'static str,
    files: &[PathBuf],
    events: std::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let handler = move |event: notify::Result<notify::Event>| {
        // Our own reads change nothing.
        if let Ok(e) = &event
            && matches!(e.kind, notify::EventKind::Access(_))
        {
            return;
        }
        let _ = events.send(());
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(what, error = %e, "cannot use inotify; polling the files every {POLL_INTERVAL:?}");
            return None;
        }
    };
    let mut dirs: Vec<&Path> = files
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(what, dir = %dir.display(), error = %e, "cannot watch the directory with inotify; polling it every {POLL_INTERVAL:?}");
        }
    }
    Some(watcher)
}

/// Where the watching thread reports.
struct Followed<T> {
    what: &'static str,
    tx: watch::Sender<Arc<T>>,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

fn follow<T, E: std::fmt::Display>(
    to: &Followed<T>,
    files: &[PathBuf],
    mut seen: Vec<Stamp>,
    events: &std::sync::mpsc::Receiver<()>,
    build: &mut impl FnMut() -> Result<T, E>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let what = to.what;
    let names = || {
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refuse = |why: Option<String>| {
        *to.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    };
    loop {
        match events.recv_timeout(POLL_INTERVAL) {
            Ok(()) => {
                std::thread::sleep(SETTLE);
                while events.try_recv().is_ok() {}
            }
            Err(RecvTimeoutError::Timeout) => {}
            // No inotify: poll.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL_INTERVAL),
        }
        if to.tx.is_closed() {
            return;
        }
        let now = stamps(files);
        if now == seen {
            continue;
        }
        seen = now;
        match build() {
            Ok(v) => {
                to.tx.send_replace(Arc::new(v));
                refuse(None);
                tracing::info!(what, files = %names(), "files changed: reloaded; new connections use the new version");
            }
            Err(e) => {
                refuse(Some(e.to_string()));
                tracing::error!(what, error = %e, "files changed but do not load; the previous version stays in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(rx: &mut watch::Receiver<Arc<String>>, want: &str) -> bool {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if rx.borrow_and_update().as_str() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn kubelet_swap(dir: &Path, generation: &str, content: &str) {
        write_secret_volume(dir, generation, &[("value", content.as_bytes())])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_secret_volumes_data_symlink_swap_is_reloaded_and_a_bad_version_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        kubelet_swap(dir.path(), "1", "one");
        let file = dir.path().join("value");
        let read = file.clone();
        let r = Reloading::start("test value", vec![file], move || {
            let s = std::fs::read_to_string(&read).map_err(|e| e.to_string())?;
            if s.starts_with("bad") {
                return Err(format!("{}: bad", read.display()));
            }
            Ok(s)
        })
        .unwrap_or_else(|e: String| panic!("{e}"));
        let mut rx = r.subscribe();
        assert_eq!(r.current().as_str(), "one");

        kubelet_swap(dir.path(), "2", "two");
        assert!(wait_for(&mut rx, "two"), "the swap was not reloaded");

        kubelet_swap(dir.path(), "3", "bad, torn");
        let t = std::time::Instant::now();
        while r.refused().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the bad version was not noticed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(r.refused().is_some_and(|e| e.ends_with("value: bad")));
        assert_eq!(
            r.current().as_str(),
            "two",
            "a bad version replaced a good one"
        );

        kubelet_swap(dir.path(), "4", "four");
        assert!(
            wait_for(&mut rx, "four"),
            "a good version after a bad one was not taken"
        );
        assert_eq!(r.refused(), None);
    }

    #[test]
    fn files_that_do_not_build_at_start_are_an_error() {
        let r: Result<Reloading<()>, String> =
            Reloading::start("test value", vec![PathBuf::from("/nonexistent")], || {
                Err("/nonexistent: missing".to_owned())
            });
        assert_eq!(r.err().as_deref(), Some("/nonexistent: missing"));
    }
}
