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

/// A TLS configuration rebuilt when its files change.
pub type Watched<C> = raven_cli::reload::Reloading<C>;

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
            what: pem_error(&e),
        })?;
    if out.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate in it".into(),
        });
    }
    Ok(out)
}

/// A PEM error in words (rustls prints a missing end marker as bytes).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::MissingSectionEnd { .. } => {
            "a PEM block has no end line (a torn or half-written file)".to_owned()
        }
        other => other.to_string(),
    }
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let (pem, _) = raven_cli::files::read_private_key(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: pem_error(&e),
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
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&self.ca)?,
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// [`Self::server_config`] now, and again whenever the node's files
    /// change (the kubelet's rotated certificate, a Secret's `..data`
    /// swap): new tunnels are accepted with the new certificate, a new
    /// version that does not load is refused (logged, naming the file) and
    /// the one in use stays.
    pub fn watch_server(&self) -> Result<Watched<rustls::ServerConfig>, TlsError> {
        let files = self.clone();
        raven_cli::reload::Reloading::start(
            "the proxy tunnel listener's certificate",
            self.paths(),
            move || files.server_config().map(Arc::unwrap_or_clone),
        )
    }

    /// [`Self::client_config`] now and whenever the node's files change:
    /// each dial uses the version current then.
    pub fn watch_client(&self) -> Result<Watched<rustls::ClientConfig>, TlsError> {
        let files = self.clone();
        raven_cli::reload::Reloading::start(
            "the proxy tunnel's client certificate",
            self.paths(),
            move || files.client_config().map(Arc::unwrap_or_clone),
        )
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.ca.clone(), self.cert.clone()];
        if self.key != self.cert {
            v.push(self.key.clone());
        }
        v
    }

    /// The edge side: present this node's certificate, trust the CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(certs(&self.cert)?, key(&self.key)?)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
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
