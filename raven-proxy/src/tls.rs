//! mTLS between edge nodes and cloud proxy servers, with the node
//! certificates of the Sync stream: subject CN `system:node:<name>` from
//! the cluster's raven CA, which also names the node as a DNS name.
//!
//! * The server (cloud) asks for a client certificate from the CA and takes
//!   the dialling node's identity from its CN, and from nothing else.
//! * The edge checks the server's certificate against the CA and against
//!   the name of the node it meant to reach (the proxy endpoint the
//!   topology elected).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raven_model::NodeName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Prefix of the subject CN of a node certificate.
pub const NODE_CN_PREFIX: &str = "system:node:";

/// ALPN of the tunnel.
pub const ALPN: &[u8] = b"raven-proxy/1";

/// PEM files of a node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error(transparent)]
    Key(#[from] raven_cli::files::FileError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ring's suites, with TLS 1.3 AES-128-GCM first when `prefer_aes128`
/// (10 AES rounds instead of AES-256's 14; a suite every TLS 1.3 stack
/// offers anyway).
fn tunnel_provider(prefer_aes128: bool) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if prefer_aes128 {
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    Arc::new(p)
}

/// Knobs of the tunnel's data path, for measuring variants against the
/// default in one run (`benches/tunnel.rs`). None of the variants tried so
/// far (a userspace TLS read buffer, AES-128-GCM first, larger stream
/// windows) was faster there than the default beyond the run-to-run noise,
/// so the default is the plain path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Userspace read buffer under the tunnel's TLS (0: none). rustls asks
    /// the socket for at most 4 KiB per read; a buffer turns those into
    /// fewer, larger reads at the cost of one more copy.
    pub tls_read_buffer: usize,
    /// Offer and pick TLS 1.3 AES-128-GCM before AES-256-GCM.
    pub prefer_aes128: bool,
    /// Initial HTTP/2 window of one stream (and its send buffer): what one
    /// stream may have in flight before its reader releases it.
    pub stream_window: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tls_read_buffer: 0,
            prefer_aes128: false,
            stream_window: crate::pipe::STREAM_WINDOW,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let out: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if out.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate in it".into(),
        });
    }
    Ok(out)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let (pem, _) = raven_cli::files::read_private_key(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

impl NodeTls {
    /// The cloud side: present this node's certificate, require one from
    /// the CA.
    pub fn server_config(&self, tuning: Tuning) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let p = tunnel_provider(tuning.prefer_aes128);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&self.ca)?,
            p.clone(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The edge side: present this node's certificate, trust the CA.
    pub fn client_config(&self, tuning: Tuning) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(tunnel_provider(tuning.prefer_aes128))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots(&self.ca)?)
                .with_client_auth_cert(certs(&self.cert)?, key(&self.key)?)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// TLS of the TCP CONNECT listener: what kube-apiserver's egress selector
/// dials with `transport.tcp` (`url: https://…`, `tlsConfig.caBundle`
/// trusting `cert`, `tlsConfig.clientCert`/`clientKey` from `client_ca`).
/// Every client must present a certificate `client_ca` signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTls {
    /// Serving certificate (PEM, chain first); its names must include the
    /// host of the client's URL (an IP SAN for `https://127.0.0.1:10263`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of the client certificates accepted.
    pub client_ca: PathBuf,
}

impl ConnectTls {
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&self.client_ca)?,
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)?;
        Ok(Arc::new(cfg))
    }
}

/// The subject CN of a certificate (DER), for logs.
pub fn subject_cn(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The node a verified peer certificate (DER) names: subject CN
/// `system:node:<name>`.
pub fn node_identity(der: &[u8]) -> Result<NodeName, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    cn.strip_prefix(NODE_CN_PREFIX)
        .and_then(|n| NodeName::new(n).ok())
        .ok_or_else(|| {
            format!("the certificate's subject CN {cn:?} is not system:node:<node name>")
        })
}
