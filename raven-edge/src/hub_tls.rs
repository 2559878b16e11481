//! The agent's mTLS to the hub, kept across sessions so a reconnect
//! resumes the TLS session (TLS 1.3 tickets) instead of making a full
//! handshake: no certificate chain checked and no signature made or
//! checked on either side. The hub seals its tickets with a key it keeps in
//! its data directory, so this holds after a hub restart too — where 10,000
//! agents reconnect at once (`raven_hub::grpc::tickets`).
//!
//! One rustls configuration, and with it one ticket store, lives as long
//! as the identity files (CA, certificate, key) are unchanged; a changed
//! file builds a new configuration with an empty store, so a rotated
//! certificate is always presented in a full handshake, never hidden
//! behind a session made with the old one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use raven_cli::reload::FileStamps;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

/// What the agent's mTLS is built from (PEM bytes).
pub struct Identity<'a> {
    pub ca: &'a [u8],
    pub cert: &'a [u8],
    pub key: &'a [u8],
}

impl std::fmt::Debug for Identity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// A rustls client configuration for the hub: trusts `ca` only, presents
/// `cert` with `key`, speaks HTTP/2 (ALPN `h2`), keeps tickets in memory.
pub fn client_config(id: &Identity<'_>) -> Result<rustls::ClientConfig, String> {
    client_config_with(Arc::new(roots(id.ca)?), id.cert, id.key)
}

/// The CA certificates of `ca` (PEM) as a trust store; none is an error.
pub fn roots(ca: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca) {
        let der = der.map_err(|e| format!("the CA file is not PEM ({e})"))?;
        roots
            .add(der)
            .map_err(|e| format!("the CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA file holds no certificate".into());
    }
    Ok(roots)
}

/// [`client_config`] with a trust store already parsed (one shared by many
/// agents in the fan-out benchmark).
pub fn client_config_with(
    roots: Arc<rustls::RootCertStore>,
    cert: &[u8],
    key: &[u8],
) -> Result<rustls::ClientConfig, String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not PEM ({e})"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("the private key does not parse ({e})"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The configuration in use and the identity files' stamps it was built
/// from, shared by every session of one agent, and how its handshakes went.
#[derive(Debug, Clone, Default)]
pub struct Sessions(Arc<Kept>);

#[derive(Default)]
struct Kept {
    config: Mutex<Option<(FileStamps, Arc<rustls::ClientConfig>)>>,
    full: AtomicU64,
    resumed: AtomicU64,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the configuration: it holds the node's key.
        f.debug_struct("Sessions")
            .field("full", &self.full)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// The kept configuration when `stamps` are those it was built from;
    /// otherwise one from `build`, kept from now on.
    pub fn config<E>(
        &self,
        stamps: &FileStamps,
        build: impl FnOnce() -> Result<rustls::ClientConfig, E>,
    ) -> Result<Arc<rustls::ClientConfig>, E> {
        let mut kept = self.0.config.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, config)) = kept.as_ref()
            && s == stamps
        {
            return Ok(config.clone());
        }
        let config = Arc::new(build()?);
        *kept = Some((stamps.clone(), config.clone()));
        Ok(config)
    }

    /// Handshakes made so far through [`Connector`]: (full, resumed).
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.0.full.load(Ordering::Relaxed),
            self.0.resumed.load(Ordering::Relaxed),
        )
    }

    fn count(&self, kind: Option<rustls::HandshakeKind>) {
        let resumed = kind == Some(rustls::HandshakeKind::Resumed);
        tracing::debug!(resumed, "TLS handshake with the hub");
        let n = if resumed {
            &self.0.resumed
        } else {
            &self.0.full
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long a TCP connect to the hub may take. The TLS handshake after it
/// has no limit on this side: a hub in a connect storm queues accepted
/// connections and makes their handshakes in turn (its own
/// `--tls-handshake-timeout` bounds a started one), so a dial that waits
/// is not reset and tried again at the back of the queue.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Dials the hub at `addr` (`host:port`) over TCP and makes the TLS
/// handshake with `config`, checking the hub's certificate for `name`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TCP connection to {addr} within {CONNECT_TIMEOUT:?}"),
            )
        })??;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A tonic connector that dials [`connect`] (the endpoint's own URI is
/// ignored: the channel is made for one hub address).
#[derive(Clone)]
pub struct Connector {
    pub sessions: Sessions,
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
    pub addr: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<tonic::transport::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let (config, name, addr) = (self.config.clone(), self.name.clone(), self.addr.clone());
        let sessions = self.sessions.clone();
        Box::pin(async move {
            let tls = connect(config, name, &addr).await?;
            sessions.count(tls.get_ref().1.handshake_kind());
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A channel to the hub at `addr` whose connections [`connect`] with
/// `config` (counted in `sessions`), HTTP/2 keepalive every `keepalive`.
pub async fn channel(
    sessions: &Sessions,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    addr: String,
    keepalive: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    // `http`: the connector makes the TLS; the hub routes by path only.
    tonic::transport::Endpoint::try_from(format!("http://{addr}"))?
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .connect_with_connector(Connector {
            sessions: sessions.clone(),
            config,
            name,
            addr,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps(files: &[std::path::PathBuf]) -> FileStamps {
        FileStamps::of(files)
    }

    #[test]
    fn one_configuration_is_kept_while_the_identity_files_are_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "one").expect("write");
        let files = [file.clone()];
        let sessions = Sessions::default();
        let build = || {
            Ok::<_, String>(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        };
        let first = sessions.config(&stamps(&files), build).expect("built");
        let again = sessions
            .config(&stamps(&files), || Err("must not build again".to_owned()))
            .expect("kept");
        assert!(Arc::ptr_eq(&first, &again));
        // A rotated file (new size and time): a new configuration, and with
        // it a ticket store of its own.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "two, rotated").expect("write");
        let rotated = sessions.config(&stamps(&files), build).expect("rebuilt");
        assert!(!Arc::ptr_eq(&first, &rotated));
        // A build that fails keeps nothing new: the next call builds again.
        std::fs::write(&file, "three").expect("write");
        let failed = sessions.config(&stamps(&files), || Err::<rustls::ClientConfig, _>("bad"));
        assert_eq!(failed.err(), Some("bad"));
        assert!(sessions.config(&stamps(&files), build).is_ok());
    }

    #[test]
    fn an_identity_without_a_ca_or_a_certificate_is_named() {
        let empty = Identity {
            ca: b"",
            cert: b"",
            key: b"",
        };
        assert_eq!(
            client_config(&empty).err().as_deref(),
            Some("the CA file holds no certificate")
        );
    }
}
