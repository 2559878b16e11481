//! The node's WireGuard key pair: generated on the node once, persisted with
//! mode 0600, reused across restarts. Only the public key ever leaves.
//!
//! The key file is checked at every start: one open to group or others is
//! made 0600 with a warning when the agent owns it, refused otherwise (see
//! [`raven_cli::files`]). A new key goes through a fresh temporary file
//! (`O_EXCL`, 0600, fsync, rename, directory fsync): a stale `*.tmp` left by
//! a crash is removed, never reused, so it cannot lend the key its mode.

use std::path::{Path, PathBuf};

pub use raven_cli::files::Found;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A WireGuard key (public, or the device's private one): 32 bytes,
/// base64 where people and the hub see it (`wg` prints it so), hex on the
/// UAPI socket, raw on generic netlink.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A base64 key as the hub relays it, if it is one.
    pub fn from_base64(s: &str) -> Option<Self> {
        let b = STANDARD.decode(s).ok()?;
        Some(Self(b.try_into().ok()?))
    }

    /// A hex key as the UAPI writes it, if it is one.
    pub fn from_hex(s: &str) -> Option<Self> {
        Some(Self(hex::decode(s).ok()?.try_into().ok()?))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Hex, as the UAPI wants it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Base64, as `wg show` prints it.
impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Base64 too: a public key is no secret; a private one travels as a
/// [`Secret`].
impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

/// A device's private key: formatted as `Secret(..)`, never its bytes, so a
/// change or a device state can be logged.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A key pair.
#[derive(Clone)]
pub struct KeyPair {
    private: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &STANDARD.encode(self.public))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the WireGuard key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the WireGuard key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the WireGuard key {path} is not a base64 32-byte key")]
    Malformed { path: PathBuf },
    #[error("the WireGuard key: {0}")]
    File(#[from] raven_cli::files::FileError),
}

impl KeyPair {
    fn from_private(mut private: [u8; 32]) -> Self {
        // Clamp as Curve25519 (and WireGuard) does, so the key reads back
        // from the device exactly as written.
        private[0] &= 248;
        private[31] &= 127;
        private[31] |= 64;
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self {
            private: secret.to_bytes(),
            public,
        }
    }

    /// Loads the tunnel device's key of `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        Self::load_or_create_named(dir, "wireguard.key")
    }

    /// Loads the key in file `name` of `dir` (the direct-path device has a
    /// key of its own), creating it on first use; a key file that was open
    /// to group or others is made 0600 and warned about.
    pub fn load_or_create_named(dir: &Path, name: &str) -> Result<Self, KeyError> {
        let (pair, found) = Self::load_or_create_checked(dir, name)?;
        if let Found::Fixed { was } = found {
            tracing::warn!(
                path = %dir.join(name).display(),
                mode = format!("{was:04o}"),
                "the WireGuard private key was readable by group or others; made it 0600 (it may have been read: consider rotating it)"
            );
        }
        Ok(pair)
    }

    /// [`Self::load_or_create_named`], saying what it found instead of
    /// warning.
    pub fn load_or_create_checked(dir: &Path, name: &str) -> Result<(Self, Found), KeyError> {
        let path = dir.join(name);
        match raven_cli::files::read_private_key(&path) {
            Ok((bytes, found)) => {
                let text = String::from_utf8_lossy(&bytes);
                let bytes = STANDARD
                    .decode(text.trim())
                    .map_err(|_| KeyError::Malformed { path: path.clone() })?;
                let private = <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| KeyError::Malformed { path })?;
                Ok((Self::from_private(private), found))
            }
            Err(raven_cli::files::FileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let pair = Self::from_private(rand::random());
                raven_cli::files::write_private_key(
                    dir,
                    name,
                    STANDARD.encode(pair.private).as_bytes(),
                )?;
                Ok((pair, Found::Created))
            }
            Err(raven_cli::files::FileError::Io { source, .. }) => {
                Err(KeyError::Read { path, source })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The key in file `name` of `dir` if there is one, read without
    /// creating, fixing or changing anything (`raven-edge plan`).
    pub fn read(dir: &Path, name: &str) -> Result<Option<Self>, KeyError> {
        let path = dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyError::Read { path, source }),
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::Malformed { path: path.clone() })?;
        let private =
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Malformed { path })?;
        Ok(Some(Self::from_private(private)))
    }

    /// A key that exists only in memory: what `plan` diffs against where
    /// `run` would create the key file.
    pub fn ephemeral() -> Self {
        Self::from_private(rand::random())
    }

    /// The public key, base64 as `wg` prints it.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The public key.
    pub fn public_key(&self) -> Key {
        Key(self.public)
    }

    /// The private key, for the device.
    pub(crate) fn private_key(&self) -> Secret {
        Secret(Key(self.private))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = KeyPair::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let b = KeyPair::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.public, b.public);
        let read = KeyPair::read(dir.path(), "wireguard.key").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read.map(|k| k.public),
            Some(a.public),
            "read back as created"
        );
        assert!(
            KeyPair::read(dir.path(), "absent.key")
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
        assert!(
            !dir.path().join("absent.key").exists(),
            "reading creates nothing"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("wireguard.key"))
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            assert_eq!(mode & 0o777, 0o600);
        }
        let key = Key::from_base64(&a.public_base64());
        assert_eq!(key, Some(a.public_key()));
        assert_eq!(key.and_then(|k| Key::from_hex(&k.to_hex())), key);
        assert_eq!(a.public_key().to_string(), a.public_base64());
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[cfg(unix)]
    #[test]
    fn stale_world_readable_temp_file_does_not_pass_its_mode_to_a_new_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for name in ["wireguard.key", "wireguard-direct.key"] {
            let tmp = dir.path().join(format!("{name}.tmp"));
            std::fs::write(&tmp, "left over by a crash").unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                .unwrap_or_else(|e| panic!("{e}"));
            KeyPair::load_or_create_named(dir.path(), name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
            assert!(!tmp.exists(), "{name}.tmp is left behind");
        }
    }

    #[cfg(unix)]
    #[test]
    fn existing_world_readable_key_is_made_0600_and_said_not_reused_silently() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = KeyPair::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("wireguard.key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        let (again, found) = KeyPair::load_or_create_checked(dir.path(), "wireguard.key")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.public, first.public, "the key itself is kept");
        assert_eq!(found, Found::Fixed { was: 0o644 });
        assert_eq!(mode(&path), 0o600);
        // Once fixed, it is plain again.
        let (_, found) = KeyPair::load_or_create_checked(dir.path(), "wireguard.key")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Found::Private);
    }
}
