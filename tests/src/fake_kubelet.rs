//! A fake kubelet for the layer-7 proxy tests: a TLS server whose
//! certificate comes from a "kubelet CA" and names the node (DNS and IP),
//! answering the few kubelet paths the tests and kube-apiserver use, and a
//! client that dials through a proxy exactly as kube-apiserver's egress
//! selector does (`CONNECT host:port HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`,
//! status 200, nothing buffered after the response head).
//!
//! Paths (HTTP/1.1, one request per connection):
//! * `GET /healthz` → `ok <node>`;
//! * `GET /containerLogs/<ns>/<pod>/<container>` → three log lines naming
//!   the node, the Pod and the container;
//! * `GET /bytes/<n>` → `n` bytes; `GET /bytes/forever` → bytes until the
//!   client goes away;
//! * `POST /count` → reads the body until the client half-closes, then
//!   answers `counted <n> bytes`;
//! * `GET /echo` with `Upgrade:` → `101`, then echoes raw bytes until the
//!   client half-closes.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A kubelet CA and serving certificates from it.
#[derive(Debug)]
pub struct KubeletCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl KubeletCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-kubelet-ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A serving certificate for `node` at `ip`: (cert PEM, key PEM).
    pub fn serving(&self, node: &str, ip: IpAddr) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![node.to_owned()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{node}@kubelet"));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A client configuration trusting this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots.add(c.expect("CA pem")).expect("root");
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Default for KubeletCa {
    fn default() -> Self {
        Self::new()
    }
}

/// The server configuration of a fake kubelet.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Reads the files `serve_files` takes.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    server_config(
        &std::fs::read_to_string(cert).expect("cert file"),
        &std::fs::read_to_string(key).expect("key file"),
    )
}

/// Serves `listener` as the kubelet of `node`, forever.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, node: String) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, node) = (acceptor.clone(), node.clone());
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = handle(tls, &node).await;
            }
        });
    }
}

/// Reads an HTTP head byte by byte (nothing after it is consumed).
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "EOF in HTTP head after {:?}",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(b[0]);
        if head.len() > 64 << 10 {
            return Err(std::io::Error::other("head too large"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, status: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, node: &str) -> std::io::Result<()> {
    let head = read_head(&mut s).await?;
    let line = head.lines().next().unwrap_or_default().to_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let upgrade = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("upgrade:"));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", ["healthz"]) => reply(&mut s, "200 OK", &format!("ok {node}\n")).await,
        ("GET", ["containerLogs", ns, pod, container]) => {
            let body: String = (1..=3)
                .map(|i| format!("log line {i} of {ns}/{pod}/{container} on {node}\n"))
                .collect();
            reply(&mut s, "200 OK", &body).await
        }
        ("GET", ["bytes", "forever"]) => {
            s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            let chunk = vec![b'x'; 64 << 10];
            loop {
                s.write_all(&chunk).await?;
            }
        }
        ("GET", ["bytes", n]) => {
            let n: u64 = n.parse().unwrap_or(0);
            let msg =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
            s.write_all(msg.as_bytes()).await?;
            let chunk = vec![b'x'; 64 << 10];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            s.shutdown().await
        }
        ("POST", ["count"]) => {
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            reply(&mut s, "200 OK", &format!("counted {n} bytes on {node}\n")).await
        }
        ("GET", ["echo"]) if upgrade => {
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: raven-echo\r\n\r\n",
            )
            .await?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                s.write_all(&buf[..k]).await?;
            }
            s.shutdown().await
        }
        _ => {
            reply(
                &mut s,
                "404 Not Found",
                &format!("{method} {path}: no such path on {node}\n"),
            )
            .await
        }
    }
}

/// What the egress selector does with a proxy connection: sends its
/// CONNECT and accepts only a 200 with nothing buffered after the head.
/// `Err` carries the status line of a refusal.
pub async fn egress_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    addr: &str,
) -> Result<S, String> {
    conn.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let head = read_head(&mut conn).await.map_err(|e| e.to_string())?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    if status.split(' ').nth(1) != Some("200") {
        return Err(status);
    }
    Ok(conn)
}

/// TLS to the kubelet of `node` over `conn`, verified against the CA.
pub async fn kubelet_tls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: S,
    node: &str,
    ca: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let name = ServerName::try_from(node.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(ca)
        .connect(name, conn)
        .await
}

/// TLS to the kubelet of `node` over `conn`, then the request head
/// `METHOD path`; the stream is left for the caller to write a body to,
/// half-close or read.
pub async fn start_request<S: AsyncRead + AsyncWrite + Unpin>(
    conn: S,
    node: &str,
    ca: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let mut s = kubelet_tls(conn, node, ca).await?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {node}\r\n\r\n").as_bytes())
        .await?;
    Ok(s)
}

/// Uploads `n` bytes to `POST /count` on `s` (from [`start_request`]),
/// half-closes, and returns the answer.
pub async fn count_after_half_close<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
) -> std::io::Result<String> {
    s.write_all(&vec![1u8; n]).await?;
    // close_notify and FIN: the write half ends, the read half stays.
    s.shutdown().await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// One request over TLS through an already CONNECTed stream; returns the
/// whole answer (head and body).
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    node: &str,
    path: &str,
) -> std::io::Result<String> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Parses `--node N --listen ADDR --cert C --key K` and serves.
pub fn main_from_args() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("fake-kubelet needs {f}"))
    };
    let node = flag("--node");
    let listen: SocketAddr = flag("--listen").parse().expect("--listen addr");
    let tls = server_config_from_files(Path::new(&flag("--cert")), Path::new(&flag("--key")));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(listen).await.expect("bind");
        serve(l, tls, node).await;
    });
}
