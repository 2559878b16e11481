//! Files that hold secrets: private keys are 0600 and directories 0700
//! whatever the umask, written to a fresh temporary file that is renamed
//! into place, and checked every time they are read.
//!
//! A private key readable by its owner and by a group this process is in,
//! and by no one else, is accepted when another user owns it: that is how a
//! Kubernetes Secret volume reaches a non-root container (kubelet makes the
//! files root-owned, group the pod's `fsGroup`, mode 0440 whatever
//! `defaultMode` says, on a read-only mount) ([`Found::OurGroup`]).
//!
//! Otherwise a private key found open to group or others is made 0600 when this
//! process owns it ([`Found::Fixed`], which the caller reports: the key may
//! have been read, rotating it is the operator's call) and refused when it
//! belongs to someone else or cannot be changed (a read-only mount): raven
//! does not change files it does not own, and does not run with a key it
//! cannot protect.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private key.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of a certificate (public).
pub const PUBLIC_FILE: u32 = 0o644;
/// Mode of a directory holding private keys.
pub const PRIVATE_DIR: u32 = 0o700;

/// Names of the files of a node bundle, the directory `raven-hub certs`
/// writes for each node (`nodes/<node>/`) and `raven-edge run --certs`
/// reads: exactly what an agent needs.
pub mod bundle {
    /// The CA certificate the hub's certificate is checked against.
    pub const CA: &str = "ca.pem";
    /// The node's client certificate (CN `system:node:<node>`).
    pub const CERT: &str = "node.pem";
    /// The node's private key.
    pub const KEY: &str = "node-key.pem";
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "the private key {path} has mode {mode:04o} (group or others may read it) and belongs to uid {owner}, not to this process (uid {euid}); make it 0600 (`chmod 600 {path}`) as its owner"
    )]
    ExposedKeyNotOurs {
        path: PathBuf,
        mode: u32,
        owner: u32,
        euid: u32,
    },
    #[error(
        "the private key {path} has mode {mode:04o} (group or others may read it) and cannot be made 0600: {source} (a Kubernetes Secret volume needs defaultMode: 0400, or 0440 with the pod's fsGroup)"
    )]
    ExposedKeyFixed {
        path: PathBuf,
        mode: u32,
        source: std::io::Error,
    },
    #[error(
        "the directory {path} has mode {mode:04o}: group or others may write to it; keep keys in a directory of their own (mode 0700)"
    )]
    SharedDir { path: PathBuf, mode: u32 },
    #[error(
        "the directory {path} has mode {mode:04o} and belongs to uid {owner}, not to this process (uid {euid}); make it 0700 as its owner"
    )]
    DirNotOurs {
        path: PathBuf,
        mode: u32,
        owner: u32,
        euid: u32,
    },
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The file or directory did not exist and was created.
    Created,
    /// Private already.
    Private,
    /// It was open to group or others (`was`, the permission bits it had)
    /// and has been made private.
    Fixed { was: u32 },
    /// Another user owns it and, besides them, only group `gid` — one this
    /// process is in — may read it (see the module docs); left as it is.
    OurGroup { gid: u32 },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether this process is in group `gid` (effective or supplementary).
fn in_our_groups(gid: u32) -> bool {
    nix::unistd::getegid().as_raw() == gid
        || nix::unistd::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// Checks that the private key `path` is readable by its owner only,
/// making it 0600 when this process owns it (see the module docs).
pub fn check_private_key(path: &Path) -> Result<Found, FileError> {
    // Follows symlinks: a Kubernetes Secret volume's files are symlinks.
    let meta = fs::metadata(path).map_err(io(path, "reading"))?;
    if !meta.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(Found::Private);
    }
    let euid = euid();
    if meta.uid() != euid && mode & 0o037 == 0 && in_our_groups(meta.gid()) {
        return Ok(Found::OurGroup { gid: meta.gid() });
    }
    if meta.uid() != euid {
        return Err(FileError::ExposedKeyNotOurs {
            path: path.to_owned(),
            mode,
            owner: meta.uid(),
            euid,
        });
    }
    fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_FILE)).map_err(|source| {
        FileError::ExposedKeyFixed {
            path: path.to_owned(),
            mode,
            source,
        }
    })?;
    Ok(Found::Fixed { was: mode })
}

/// Reads the private key `path` after [`check_private_key`].
pub fn read_private_key(path: &Path) -> Result<(Vec<u8>, Found), FileError> {
    let found = check_private_key(path)?;
    let bytes = fs::read(path).map_err(io(path, "reading"))?;
    Ok((bytes, found))
}

/// Makes `dir` a directory of mode 0700: created so when missing (its
/// parents with the default mode); an existing one open to group or others
/// is made 0700 when this process owns it and nobody else may write to it,
/// refused otherwise (a shared directory such as `/tmp` is never changed).
pub fn ensure_private_dir(dir: &Path) -> Result<Found, FileError> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io(parent, "creating"))?;
            }
            match fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir) {
                Ok(()) => {
                    // The umask can only narrow 0700; set it exactly anyway.
                    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR))
                        .map_err(io(dir, "setting the mode of"))?;
                    Ok(Found::Created)
                }
                // Created meanwhile by someone else: check it as found.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ensure_private_dir(dir),
                Err(e) => Err(io(dir, "creating")(e)),
            }
        }
        Err(e) => Err(io(dir, "reading")(e)),
        Ok(meta) if !meta.is_dir() => Err(FileError::NotADirectory {
            path: dir.to_owned(),
        }),
        Ok(meta) => {
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 == 0 {
                return Ok(Found::Private);
            }
            if mode & 0o022 != 0 {
                return Err(FileError::SharedDir {
                    path: dir.to_owned(),
                    mode,
                });
            }
            let euid = euid();
            if meta.uid() != euid {
                return Err(FileError::DirNotOurs {
                    path: dir.to_owned(),
                    mode,
                    owner: meta.uid(),
                    euid,
                });
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR))
                .map_err(io(dir, "setting the mode of"))?;
            Ok(Found::Fixed { was: mode })
        }
    }
}

/// Writes a private key's `contents` to `dir`/`name`: the directory made
/// if missing (0700: a data directory raven creates is its own), the file
/// written atomically with mode 0600.
pub fn write_private_key(dir: &Path, name: &str, contents: &[u8]) -> Result<(), FileError> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), PRIVATE_DIR)
        .create(dir)
        .map_err(|source| FileError::Io {
            path: dir.to_owned(),
            op: "creating",
            source,
        })?;
    write_atomic(&dir.join(name), contents, PRIVATE_FILE)
}

/// Writes `contents` to `path` with exactly `mode`, atomically and durably:
/// a fresh `<name>.tmp` (a stale one, whatever its mode or owner, is
/// removed first, never reused) is created with `O_EXCL` and `mode`, set to
/// `mode` regardless of the umask, written, fsynced and renamed over
/// `path`, and the directory is fsynced. An existing `path` is replaced,
/// never written into, so it cannot lend the new contents its mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Err(FileError::NotAFile {
            path: path.to_owned(),
        });
    };
    let mut tmp_name = name.to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp, "removing the stale temporary file")(e)),
    }
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            // Private from the first byte; widened below if `mode` says so.
            .mode(PRIVATE_FILE)
            .open(&tmp)
            .map_err(io(&tmp, "creating"))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp, "setting the mode of"))?;
        f.write_all(contents).map_err(io(&tmp, "writing"))?;
        f.sync_all().map_err(io(&tmp, "syncing"))?;
        fs::rename(&tmp, path).map_err(io(path, "renaming into place"))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn write_atomic_replaces_an_existing_world_readable_file_and_a_stale_temp_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("k.pem");
        for p in [&key, &dir.path().join("k.pem.tmp")] {
            fs::write(p, "old").unwrap_or_else(|e| panic!("{e}"));
            fs::set_permissions(p, fs::Permissions::from_mode(0o666))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        write_atomic(&key, b"new", PRIVATE_FILE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&key), 0o600);
        assert_eq!(fs::read(&key).unwrap_or_default(), b"new");
        assert!(!dir.path().join("k.pem.tmp").exists());
        write_atomic(&key, b"cert", PUBLIC_FILE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&key), 0o644);
    }

    #[test]
    fn a_world_readable_key_of_ours_is_made_0600_and_said() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("k.pem");
        fs::write(&key, "secret").unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        let (bytes, found) = read_private_key(&key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes, b"secret");
        assert_eq!(found, Found::Fixed { was: 0o644 });
        assert_eq!(mode(&key), 0o600);
        assert_eq!(check_private_key(&key).ok(), Some(Found::Private));
    }

    #[test]
    fn a_world_readable_key_of_another_user_is_refused_naming_file_and_mode_and_left_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("k.pem");
        fs::write(&key, "secret").unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        // Only root can give a file away; without root there is nothing to
        // check.
        if std::os::unix::fs::chown(&key, Some(65534), Some(65534)).is_err() {
            return;
        }
        let err = read_private_key(&key).err();
        assert!(
            matches!(
                err,
                Some(FileError::ExposedKeyNotOurs {
                    mode: 0o644,
                    owner: 65534,
                    ..
                })
            ),
            "{err:?}"
        );
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("k.pem") && text.contains("0644"), "{text}");
        assert_eq!(mode(&key), 0o644);
    }

    #[test]
    fn a_key_of_another_user_readable_only_by_our_group_is_accepted_like_a_secret_with_fs_group() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("k.pem");
        fs::write(&key, "secret").unwrap_or_else(|e| panic!("{e}"));
        let ours = nix::unistd::getegid().as_raw();
        // Only root can give a file away; without root there is nothing to
        // check.
        if std::os::unix::fs::chown(&key, Some(65534), Some(ours)).is_err() {
            return;
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o440))
            .unwrap_or_else(|e| panic!("{e}"));
        let (bytes, found) = read_private_key(&key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes, b"secret");
        assert_eq!(found, Found::OurGroup { gid: ours });
        assert_eq!(mode(&key), 0o440, "left as it is");
        // Others may read it too, or the group may write it: refused.
        for bad in [0o444, 0o460] {
            fs::set_permissions(&key, fs::Permissions::from_mode(bad))
                .unwrap_or_else(|e| panic!("{e}"));
            let err = read_private_key(&key).err();
            assert!(
                matches!(err, Some(FileError::ExposedKeyNotOurs { .. })),
                "{bad:o}: {err:?}"
            );
        }
        // A group this process is not in: refused.
        let not_ours = (60000..65000).find(|g| !in_our_groups(*g)).unwrap_or(65533);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o440))
            .unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::chown(&key, None, Some(not_ours)).unwrap_or_else(|e| panic!("{e}"));
        let err = read_private_key(&key).err();
        assert!(
            matches!(err, Some(FileError::ExposedKeyNotOurs { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn a_shared_writable_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = ensure_private_dir(&shared).err();
        assert!(
            matches!(err, Some(FileError::SharedDir { mode: 0o1777, .. })),
            "{err:?}"
        );
        assert_eq!(mode(&shared), 0o1777);
        let mine = dir.path().join("mine");
        fs::create_dir(&mine).unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ensure_private_dir(&mine).ok(),
            Some(Found::Fixed { was: 0o755 })
        );
        assert_eq!(mode(&mine), 0o700);
        let new = dir.path().join("a/b");
        assert_eq!(ensure_private_dir(&new).ok(), Some(Found::Created));
        assert_eq!(mode(&new), 0o700);
    }
}
