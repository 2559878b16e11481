//! TLS 1.3 session tickets that outlive the hub process, so 10,000 agents
//! reconnecting after a hub restart resume their TLS sessions instead of
//! each making a full handshake (certificate chain checked and a signature
//! made and checked on both sides: about a third of the hub's CPU through
//! such a reconnect, and as much on the agents').
//!
//! A ticket is the session rustls hands over (the resumption secret and
//! the agent's certificate chain), sealed with ChaCha20-Poly1305 under a
//! key derived (HKDF-SHA256) from a 32-byte secret kept in the hub's data
//! directory (`tls-tickets.key`, mode 0600, made on first start), the
//! SHA-256 of the client CA certificates in use, and the ticket period
//! ([`PERIOD_SECS`], 6 h). So:
//! - a ticket is accepted in the period it was made and the next one, and
//!   never after 12 h;
//! - a change of the client CAs (adding or removing a trusted CA) voids
//!   every ticket: each agent then proves its certificate again under the
//!   new trust;
//! - a resumed session carries the certificate chain of the handshake that
//!   made it, so the hub knows the node and its certificate's expiry as
//!   after a full handshake (and ends the stream when it expires);
//! - key exchange stays (X25519 on every resumption, `psk_dhe_ke`): a
//!   stolen secret file opens no recorded traffic.
//!
//! Every resumption also hands out a new ticket (one per handshake), so an
//! agent that reconnects now and then always holds a fresh one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{self, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// How long one ticket key makes tickets; a ticket is taken in its period
/// and the next.
pub const PERIOD_SECS: u64 = 6 * 3600;

/// The secret's file name in the hub's data directory.
pub const SECRET_FILE: &str = "tls-tickets.key";

/// Length of the secret file.
pub const SECRET_LEN: usize = 32;

const PERIOD_LEN: usize = 8;
const NONCE_LEN: usize = aead::NONCE_LEN;

/// Seals and opens the hub's session tickets (see the module docs).
pub struct Tickets {
    secret: [u8; SECRET_LEN],
    trust: [u8; 32],
    rng: SystemRandom,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// Tickets keyed by `secret` for a trust store whose CA certificates
    /// are `client_cas` (their files' bytes, in order).
    pub fn new<'a>(
        secret: [u8; SECRET_LEN],
        client_cas: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        let mut trust = ring::digest::Context::new(&ring::digest::SHA256);
        for ca in client_cas {
            // Length-prefixed: two files never read as one.
            trust.update(&(ca.len() as u64).to_be_bytes());
            trust.update(ca);
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(trust.finish().as_ref());
        Self {
            secret,
            trust: digest,
            rng: SystemRandom::new(),
        }
    }

    fn key(&self, period: u64) -> LessSafeKey {
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.trust).extract(&self.secret);
        let period = period.to_be_bytes();
        let info = [b"raven-hub tls ticket v1".as_slice(), &period];
        let mut bytes = [0u8; 32];
        // Both cannot fail: 32 bytes is within HKDF-SHA256's limit and is
        // ChaCha20-Poly1305's key length.
        if let Ok(okm) = prk.expand(&info, Len(CHACHA20_POLY1305.key_len())) {
            let _ = okm.fill(&mut bytes);
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is a ChaCha20-Poly1305 key"));
        LessSafeKey::new(key)
    }

    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(PERIOD_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key(period)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&out[..PERIOD_LEN]),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open(&self, now_period: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < PERIOD_LEN + NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (head, rest) = ticket.split_at(PERIOD_LEN);
        let period = u64::from_be_bytes(head.try_into().ok()?);
        if period != now_period && period.checked_add(1) != Some(now_period) {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = self
            .key(period)
            .open_in_place(nonce, aead::Aad::from(head), &mut body)
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }
}

fn period_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / PERIOD_SECS)
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // The client keeps it at most this long; the hub takes it for up
        // to two periods depending on when in its period it was made.
        u32::try_from(PERIOD_SECS).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(period_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(period_now(), cipher)
    }
}

/// The ticket secret at `path`: read (a file others may read is made 0600,
/// as the hub's key is), or made and written (0600, atomically) when it is
/// missing or is not [`SECRET_LEN`] bytes — a torn or foreign file only
/// costs the tickets made with it (agents make a full handshake once).
pub fn load_or_make_secret(path: &Path) -> Result<[u8; SECRET_LEN], raven_cli::files::FileError> {
    match raven_cli::files::read_private_key(path) {
        Ok((bytes, found)) => {
            if let raven_cli::files::Found::Fixed { was } = found {
                tracing::warn!(path = %path.display(), mode = format!("{was:04o}"), "the TLS ticket secret was readable by group or others; made it 0600 (tickets made with it may be forged: it is replaced)");
            } else if let Ok(secret) = <[u8; SECRET_LEN]>::try_from(bytes.as_slice()) {
                return Ok(secret);
            } else {
                tracing::warn!(path = %path.display(), len = bytes.len(), "the TLS ticket secret is not {SECRET_LEN} bytes; replacing it (agents make one full TLS handshake)");
            }
        }
        Err(raven_cli::files::FileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut secret = [0u8; SECRET_LEN];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| raven_cli::files::FileError::Io {
            path: path.to_owned(),
            op: "making random bytes for",
            source: std::io::Error::other("the system's random source failed"),
        })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    raven_cli::files::write_private_key(dir, &name, &secret)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nca one\n";

    #[test]
    fn a_ticket_opens_in_its_period_and_the_next_and_never_later_or_earlier() {
        let t = Tickets::new([7; 32], [CA]);
        let sealed = t.seal(100, b"session").expect("seal");
        assert_eq!(t.open(100, &sealed).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.open(101, &sealed).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.open(102, &sealed), None);
        assert_eq!(t.open(99, &sealed), None);
    }

    #[test]
    fn another_secret_or_another_client_ca_set_opens_no_ticket() {
        let t = Tickets::new([7; 32], [CA]);
        let sealed = t.seal(5, b"session").expect("seal");
        // The same inputs again (a restarted hub): opens.
        assert!(Tickets::new([7; 32], [CA]).open(5, &sealed).is_some());
        assert!(Tickets::new([8; 32], [CA]).open(5, &sealed).is_none());
        assert!(
            Tickets::new([7; 32], [CA, b"another CA".as_slice()])
                .open(5, &sealed)
                .is_none()
        );
        // Two files are not their concatenation.
        let split = Tickets::new([7; 32], [&CA[..10], &CA[10..]]);
        assert!(split.open(5, &sealed).is_none());
    }

    #[test]
    fn a_changed_period_byte_nonce_or_body_is_refused() {
        let t = Tickets::new([7; 32], [CA]);
        let sealed = t.seal(5, b"session").expect("seal");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                t.open(5, &bad).is_none() && t.open(6, &bad).is_none(),
                "byte {i}"
            );
        }
        assert!(t.open(5, &sealed[..sealed.len() - 1]).is_none());
        assert!(t.open(5, &[]).is_none());
    }

    #[test]
    fn the_secret_is_made_once_0600_and_a_torn_one_is_replaced() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data").join("tls-tickets.key");
        let first = load_or_make_secret(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_make_secret(&path).expect("read"), first);
        std::fs::write(&path, &first[..5]).expect("torn");
        let second = load_or_make_secret(&path).expect("replaced");
        assert_ne!(second, first);
        assert_eq!(std::fs::read(&path).expect("file").len(), SECRET_LEN);
    }
}
