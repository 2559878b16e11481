//! The node's IKEv2 identity key: a raw Ed25519 key pair generated on the
//! node once, its 32-byte seed persisted base64 with mode 0600 and reused
//! across restarts. Only the public key leaves the node (in the Report, as
//! the base64 of its 32 bytes); peers pin it as a raw public key
//! (`auth = pubkey`), so there is no pre-shared key and no CA.
//!
//! The key file gets the same checks as the WireGuard key (see
//! [`raven_cli::files`]): one open to group or others is made 0600 with a
//! warning, a new one is written through a fresh `O_EXCL` temporary file.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use raven_cli::files::Found;
use ring::signature::KeyPair as _;

/// The default file name of the key in the agent's data directory.
pub const KEY_FILE: &str = "ipsec-ed25519.key";

/// DER prefix of a PKCS#8 v1 `PrivateKeyInfo` holding an Ed25519 seed
/// (RFC 8410): the 32 seed bytes follow.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of a `SubjectPublicKeyInfo` holding an Ed25519 public key
/// (RFC 8410): the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the IPsec key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the IPsec key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the IPsec key {path} is not a base64 32-byte Ed25519 seed")]
    Malformed { path: PathBuf },
    #[error("the IPsec key: {0}")]
    File(#[from] raven_cli::files::FileError),
}

/// An Ed25519 key pair.
#[derive(Clone)]
pub struct IdentityKey {
    seed: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKey")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    /// The key pair of a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        // Any 32 bytes are a valid Ed25519 seed; ring only rejects a wrong
        // length, which the type rules out.
        let public = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .map(|k| {
                let mut p = [0u8; 32];
                p.copy_from_slice(k.public_key().as_ref());
                p
            })
            .unwrap_or([0u8; 32]);
        Self { seed, public }
    }

    /// A fresh random key pair.
    pub fn generate() -> Self {
        Self::from_seed(rand::random())
    }

    /// Loads the key in `dir`/`name`, creating it on first use; says what it
    /// found (created, private, or fixed from a looser mode).
    pub fn load_or_create(dir: &Path, name: &str) -> Result<(Self, Found), KeyError> {
        let path = dir.join(name);
        match raven_cli::files::read_private_key(&path) {
            Ok((bytes, found)) => {
                let text = String::from_utf8_lossy(&bytes);
                let seed = STANDARD
                    .decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or(KeyError::Malformed { path })?;
                if let Found::Fixed { was } = found {
                    tracing::warn!(
                        path = %dir.join(name).display(),
                        mode = format!("{was:04o}"),
                        "the IPsec private key was readable by group or others; made it 0600 (it may have been read: consider rotating it)"
                    );
                }
                Ok((Self::from_seed(seed), found))
            }
            Err(raven_cli::files::FileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = Self::generate();
                key.write(dir, name)?;
                Ok((key, Found::Created))
            }
            Err(raven_cli::files::FileError::Io { source, .. }) => {
                Err(KeyError::Read { path, source })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the seed to `dir`/`name` (0600, atomically), replacing any
    /// key there: key rotation is generating a new key and writing it.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), KeyError> {
        raven_cli::files::write_private_key(dir, name, STANDARD.encode(self.seed).as_bytes())?;
        Ok(())
    }

    /// The public key as it travels through the hub: base64 of 32 bytes.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The private key as PKCS#8 DER, for charon's `load-key` (type
    /// `ed25519`). It goes over the local VICI socket only.
    pub(crate) fn private_pkcs8_der(&self) -> Vec<u8> {
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&self.seed);
        der
    }

    /// The public key as PEM, as `pubkeys` of a connection wants it.
    pub fn public_pem(&self) -> String {
        public_pem(&self.public)
    }
}

/// A base64 Ed25519 public key (as the hub passes it on) as 32 bytes.
pub fn decode_public(key: &str) -> Option<[u8; 32]> {
    STANDARD
        .decode(key)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
}

/// A raw Ed25519 public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
pub fn public_pem(public: &[u8; 32]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(der)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn key_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (a, found) =
            IdentityKey::load_or_create(dir.path(), KEY_FILE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Found::Created);
        let (b, found) =
            IdentityKey::load_or_create(dir.path(), KEY_FILE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Found::Private);
        assert_eq!(a.public, b.public);
        assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
        assert_eq!(decode_public(&a.public_base64()), Some(a.public));
    }

    #[test]
    fn world_readable_key_is_made_0600_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (a, _) =
            IdentityKey::load_or_create(dir.path(), KEY_FILE).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        let (b, found) =
            IdentityKey::load_or_create(dir.path(), KEY_FILE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Found::Fixed { was: 0o644 });
        assert_eq!(a.public, b.public);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn malformed_key_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(KEY_FILE);
        raven_cli::files::write_atomic(&path, b"not a key", 0o600)
            .unwrap_or_else(|e| panic!("{e}"));
        let err = IdentityKey::load_or_create(dir.path(), KEY_FILE)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(KEY_FILE), "{err}");
    }

    #[test]
    fn public_key_matches_rfc8032_test_vector_and_encodes_as_spki() {
        // RFC 8032 7.1, TEST 1.
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap_or_default();
        let key = IdentityKey::from_seed(<[u8; 32]>::try_from(seed.as_slice()).unwrap_or([0; 32]));
        assert_eq!(
            hex::encode(key.public),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let pem = key.public_pem();
        assert!(
            pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"),
            "{pem}"
        );
        assert_eq!(key.private_pkcs8_der().len(), 48);
    }
}
