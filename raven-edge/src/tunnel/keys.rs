//! The node's WireGuard key pair: generated on the node once, persisted with
//! mode 0600, reused across restarts. Only the public key ever leaves.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

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
    /// key of its own), creating it on first use.
    pub fn load_or_create_named(dir: &Path, name: &str) -> Result<Self, KeyError> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = STANDARD
                    .decode(text.trim())
                    .map_err(|_| KeyError::Malformed { path: path.clone() })?;
                let private = <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| KeyError::Malformed { path })?;
                Ok(Self::from_private(private))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = Self::from_private(rand::random());
                std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
                    path: path.clone(),
                    source,
                })?;
                let tmp = dir.join(format!("{name}.tmp"));
                let err = |source| KeyError::Write {
                    path: path.clone(),
                    source,
                };
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp).map_err(err)?;
                f.write_all(STANDARD.encode(pair.private).as_bytes())
                    .map_err(err)?;
                f.sync_all().map_err(err)?;
                std::fs::rename(&tmp, &path).map_err(err)?;
                Ok(pair)
            }
            Err(source) => Err(KeyError::Read { path, source }),
        }
    }

    /// The public key, base64 as `wg` prints it.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The private key, hex as the UAPI wants it.
    pub(crate) fn private_hex(&self) -> String {
        hex(&self.private)
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A base64 public key as hex (UAPI), if it is a valid key.
pub fn base64_to_hex(key: &str) -> Option<String> {
    let b = STANDARD.decode(key).ok()?;
    (b.len() == 32).then(|| hex(&b))
}

/// A hex key (UAPI) as base64.
pub fn hex_to_base64(key: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..key.len())
        .step_by(2)
        .map(|i| {
            key.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    bytes.filter(|b| b.len() == 32).map(|b| STANDARD.encode(b))
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
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("wireguard.key"))
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            hex_to_base64(&base64_to_hex(&a.public_base64()).unwrap_or_default()),
            Some(a.public_base64())
        );
    }
}
