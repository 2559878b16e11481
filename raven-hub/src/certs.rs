//! Certificates for standalone use (`raven-hub certs`): a CA, a hub server
//! certificate and one client certificate per node.
//!
//! A node certificate carries the node's identity the way kubelet client
//! certificates do: subject CN `system:node:<name>`, O `system:nodes`. The hub
//! takes a node's identity from that CN and from nothing else.
//!
//! The output directory is the CA's: it holds the CA key and stays on the
//! machine that issues certificates. What a node needs is written apart, in
//! `nodes/<node>/` (CA certificate, node certificate, node key), so the
//! directory to copy to a node holds nothing else. Directories are 0700,
//! private keys 0600 and certificates 0644 whatever the umask; every file
//! is written to a fresh temporary file and renamed into place.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use raven_cli::files::{self, FileError, Found, bundle};
use raven_core::NodeName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Prefix of the subject CN of a node certificate.
pub const NODE_CN_PREFIX: &str = "system:node:";

/// Prefix of the subject CN of an operator certificate: inspection of the
/// whole cluster over mTLS (`raven-hub certs --operator NAME`).
pub const OPERATOR_CN_PREFIX: &str = "raven:operator:";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: not a usable CA ({source})")]
    BadCa { path: PathBuf, source: rcgen::Error },
}

/// Paths of the files `generate` writes into `dir`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA key: only `raven-hub certs` reads it; neither the hub nor any
    /// node needs it.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub-key.pem")
    }
    /// An operator's bundle (`raven-hub certs --operator NAME`).
    pub fn operator_bundle(&self, name: &str) -> PathBuf {
        self.dir.join("operators").join(name)
    }
    /// The directory of all node bundles.
    pub fn nodes(&self) -> PathBuf {
        self.dir.join("nodes")
    }
    /// What `node`'s agent needs and nothing else: copy this directory to
    /// the node and give it to `raven-edge run --certs`.
    pub fn node_bundle(&self, node: &NodeName) -> PathBuf {
        self.nodes().join(node.as_str())
    }
    pub fn node_ca(&self, node: &NodeName) -> PathBuf {
        self.node_bundle(node).join(bundle::CA)
    }
    pub fn node_cert(&self, node: &NodeName) -> PathBuf {
        self.node_bundle(node).join(bundle::CERT)
    }
    pub fn node_key(&self, node: &NodeName) -> PathBuf {
        self.node_bundle(node).join(bundle::KEY)
    }
}

/// What `generate` wrote, and what it found and fixed on the way.
#[derive(Debug, Clone)]
pub struct Generated {
    pub layout: Layout,
    /// Files and directories that were open to group or others (with the
    /// mode they had) and were made private.
    pub fixed: Vec<(PathBuf, u32)>,
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let mode = if private {
        files::PRIVATE_FILE
    } else {
        files::PUBLIC_FILE
    };
    Ok(files::write_atomic(path, contents.as_bytes(), mode)?)
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| {
        CertError::File(FileError::Io {
            path: path.to_owned(),
            op: "reading",
            source,
        })
    })
}

fn private_dir(dir: &Path, fixed: &mut Vec<(PathBuf, u32)>) -> Result<(), CertError> {
    if let Found::Fixed { was } = files::ensure_private_dir(dir)? {
        fixed.push((dir.to_owned(), was));
    }
    Ok(())
}

/// Creates (or reuses, when `dir` already holds one) a CA, then writes a hub
/// certificate valid for `hub_names` (DNS names or IP addresses) and a
/// bundle (`nodes/<node>/`) for every node.
///
/// An existing CA key open to group or others is made 0600 when this
/// process owns it (and reported in [`Generated::fixed`]), refused
/// otherwise; the same holds for `dir`, which is refused when group or
/// others may write to it.
pub fn generate(
    dir: &Path,
    hub_names: &[String],
    nodes: &[NodeName],
) -> Result<Generated, CertError> {
    generate_with_operators(dir, hub_names, nodes, &[])
}

/// [`generate`], and an operator bundle (`operators/<name>/`: `ca.pem`,
/// `operator.pem`, `operator-key.pem`, CN `raven:operator:<name>`) for every
/// name in `operators`: inspection of the whole cluster over mTLS.
pub fn generate_with_operators(
    dir: &Path,
    hub_names: &[String],
    nodes: &[NodeName],
    operators: &[String],
) -> Result<Generated, CertError> {
    let layout = Layout {
        dir: dir.to_owned(),
    };
    let mut fixed = Vec::new();
    private_dir(dir, &mut fixed)?;

    let (ca_key, ca_pem) = if layout.ca_cert().exists() && layout.ca_key().exists() {
        let (pem, found) = files::read_private_key(&layout.ca_key())?;
        if let Found::Fixed { was } = found {
            fixed.push((layout.ca_key(), was));
        }
        let pem = String::from_utf8_lossy(&pem);
        let key = KeyPair::from_pem(&pem).map_err(|source| CertError::BadCa {
            path: layout.ca_key(),
            source,
        })?;
        (key, read(&layout.ca_cert())?)
    } else {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "raven CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        write(&layout.ca_key(), &key.serialize_pem(), true)?;
        write(&layout.ca_cert(), &cert.pem(), false)?;
        (key, cert.pem())
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| CertError::BadCa {
        path: layout.ca_cert(),
        source,
    })?;

    // Hub server certificate.
    let key = KeyPair::generate().map_err(gen_err("hub key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("hub"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "raven-hub");
    for name in hub_names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().map_err(gen_err("hub DNS name"))?),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(gen_err("hub certificate"))?;
    write(&layout.hub_key(), &key.serialize_pem(), true)?;
    write(&layout.hub_cert(), &cert.pem(), false)?;

    if !nodes.is_empty() {
        private_dir(&layout.nodes(), &mut fixed)?;
    }
    for node in nodes {
        private_dir(&layout.node_bundle(node), &mut fixed)?;
        let key = KeyPair::generate().map_err(gen_err("node key"))?;
        let cert = node_certificate(node, &key, &issuer)?;
        write(&layout.node_key(node), &key.serialize_pem(), true)?;
        write(&layout.node_cert(node), &cert, false)?;
        write(&layout.node_ca(node), &ca_pem, false)?;
    }
    if !operators.is_empty() {
        private_dir(&layout.dir.join("operators"), &mut fixed)?;
    }
    for name in operators {
        let dir = layout.operator_bundle(name);
        private_dir(&dir, &mut fixed)?;
        let key = KeyPair::generate().map_err(gen_err("operator key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err("operator"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{OPERATOR_CN_PREFIX}{name}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err("operator certificate"))?;
        write(&dir.join("operator-key.pem"), &key.serialize_pem(), true)?;
        write(&dir.join("operator.pem"), &cert.pem(), false)?;
        write(&dir.join("ca.pem"), &ca_pem, false)?;
    }
    Ok(Generated { layout, fixed })
}

/// `node`'s client certificate (PEM) for `key`, signed by `issuer`.
fn node_certificate(
    node: &NodeName,
    key: &KeyPair,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<String, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("node"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    // The node's name as a DNS name and server use too: a cloud proxy
    // server presents its node certificate to the edge nodes that dial
    // it, which check it names that node.
    params.subject_alt_names.push(SanType::DnsName(
        node.to_string()
            .try_into()
            .map_err(gen_err("node DNS name"))?,
    ));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params
        .signed_by(key, issuer)
        .map_err(gen_err("node certificate"))?;
    Ok(cert.pem())
}

/// Issues node certificates in memory from the CA of a directory that
/// [`generate`] wrote — nothing is written. For load generators that
/// simulate thousands of agents: one key may be shared by all of them (the
/// hub identifies a node by its certificate's CN, and every certificate is
/// still signed and checked on its own), so issuing costs a signature per
/// node and no key generation or file writes.
pub struct NodeIssuer {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for NodeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIssuer").finish_non_exhaustive()
    }
}

impl NodeIssuer {
    /// The CA of `dir` (`ca.pem`, `ca-key.pem`).
    pub fn open(dir: &Path) -> Result<Self, CertError> {
        let layout = Layout {
            dir: dir.to_owned(),
        };
        let (pem, _) = files::read_private_key(&layout.ca_key())?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&pem)).map_err(|source| {
            CertError::BadCa {
                path: layout.ca_key(),
                source,
            }
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&read(&layout.ca_cert())?, key).map_err(|source| {
                CertError::BadCa {
                    path: layout.ca_cert(),
                    source,
                }
            })?;
        Ok(Self { issuer })
    }

    /// `node`'s certificate (PEM) for `key`.
    pub fn issue(&self, node: &NodeName, key: &KeyPair) -> Result<String, CertError> {
        node_certificate(node, key, &self.issuer)
    }
}

/// Why a client certificate does not identify a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate cannot be parsed: {0}")]
    Unparseable(String),
    #[error("the client certificate's subject CN {0:?} is not system:node:<node name>")]
    NotANode(String),
}

/// Who a client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// CN `system:node:<name>`.
    Node(NodeName),
    /// CN `raven:operator:<name>`.
    Operator(String),
}

fn subject_cn(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    Ok(cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned())
}

/// Which certificate a client presented, and until when it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// Serial number, hex (as `openssl x509 -serial` prints it).
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

/// The serial and expiry of a certificate (DER).
pub fn presented(der: &[u8]) -> Result<Presented, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(Presented {
        serial: cert
            .raw_serial_as_string()
            .replace(':', "")
            .to_uppercase()
            .trim_start_matches("00")
            .to_owned(),
        not_after: std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
    })
}

/// The node named by a client certificate (DER): subject CN
/// `system:node:<name>`.
pub fn node_identity(der: &[u8]) -> Result<NodeName, IdentityError> {
    let cn = subject_cn(der)?;
    cn.strip_prefix(NODE_CN_PREFIX)
        .and_then(|n| NodeName::new(n).ok())
        .ok_or(IdentityError::NotANode(cn))
}

/// The node or operator a client certificate (DER) names.
pub fn client_identity(der: &[u8]) -> Result<ClientIdentity, IdentityError> {
    let cn = subject_cn(der)?;
    if let Some(op) = cn
        .strip_prefix(OPERATOR_CN_PREFIX)
        .filter(|o| !o.is_empty())
    {
        return Ok(ClientIdentity::Operator(op.to_owned()));
    }
    node_identity(der).map(ClientIdentity::Node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_to_der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map(|(_, p)| p.contents)
            .unwrap_or_default()
    }

    #[test]
    fn node_certificate_names_its_node_and_hub_certificate_names_none() {
        let dir = std::env::temp_dir().join(format!("raven-certs-{}", std::process::id()));
        let node = NodeName::new("edge-1").unwrap_or_else(|_| unreachable!());
        let layout = generate(
            &dir,
            &["localhost".into(), "127.0.0.1".into()],
            std::slice::from_ref(&node),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .layout;
        let der = pem_to_der(&read(&layout.node_cert(&node)).unwrap_or_default());
        assert_eq!(node_identity(&der), Ok(node));
        let hub = pem_to_der(&read(&layout.hub_cert()).unwrap_or_default());
        assert_eq!(
            node_identity(&hub),
            Err(IdentityError::NotANode("raven-hub".into()))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(layout.ca_key())
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            assert_eq!(mode & 0o777, 0o600);
        }
        // Running again reuses the CA.
        let ca_before = read(&layout.ca_cert()).unwrap_or_default();
        generate(&dir, &["localhost".into()], &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&layout.ca_cert()).unwrap_or_default(), ca_before);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
