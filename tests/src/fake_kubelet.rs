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
//!   client half-closes;
//! * `/exec/<ns>/<pod>/<container>?command=…` and `/portForward/<ns>/<pod>`
//!   with `Upgrade: SPDY/3.1` → `101`, then the kubelet's streaming
//!   protocols over SPDY ([`crate::spdy`]): remote command `v4.channel.k8s.io`
//!   (streams `error`, `stdin`, `stdout`, `stderr`; the exit status as a
//!   `metav1.Status` on the error stream) and port forwarding
//!   `portforward.k8s.io` (an `error` and a `data` stream per connection,
//!   paired by `requestID`). The "container" is built in: commands `echo`,
//!   `cat`, `wc -c`, `hostname`, `false`; port 80 echoes what it receives
//!   and, after the client half-closes, a line counting it, then closes.
//!   WebSocket upgrades of these paths get `400`, so a newer kubectl falls
//!   back to SPDY as it does with a kubelet that lacks its WebSocket
//!   protocol.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

use crate::spdy;

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

    /// A client certificate (ClientAuth) with subject CN `cn`: (cert PEM,
    /// key PEM).
    pub fn client(&self, cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A client configuration trusting this CA only, presenting
    /// `identity` (cert PEM, key PEM).
    pub fn client_config_with(&self, identity: &(String, String)) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots.add(c.expect("CA pem")).expect("root");
        }
        let certs: Vec<_> = CertificateDer::pem_slice_iter(identity.0.as_bytes())
            .collect::<Result<_, _>>()
            .expect("cert pem");
        let key = PrivateKeyDer::from_pem_slice(identity.1.as_bytes()).expect("key pem");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .expect("client identity"),
        )
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

/// Values of header `name` in `head` (case-insensitive; comma lists split).
fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(',').map(|x| x.trim().to_owned()))
        .collect()
}

async fn handle<S>(mut s: S, node: &str) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let head = read_head(&mut s).await?;
    let line = head.lines().next().unwrap_or_default().to_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let upgrade_to = header_values(&head, "upgrade");
    let upgrade = !upgrade_to.is_empty();
    let spdy = upgrade_to
        .iter()
        .any(|u| u.eq_ignore_ascii_case("SPDY/3.1"));
    let protocols = header_values(&head, "x-stream-protocol-version");
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (_, ["exec" | "portForward", ..]) if !spdy => {
            reply(
                &mut s,
                "400 Bad Request",
                &format!(
                    "{path}: this kubelet streams over SPDY/3.1 only, asked for {upgrade_to:?}\n"
                ),
            )
            .await
        }
        (_, ["exec", _ns, pod, _container]) => {
            let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            exec(s, node, pod, &params, &protocols).await
        }
        (_, ["portForward", _ns, pod]) => port_forward(s, node, pod, &protocols).await,
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

/// Answers the streaming upgrade with `protocol`, if the client offered it.
async fn switch<S: AsyncWrite + Unpin>(
    s: &mut S,
    protocols: &[String],
    protocol: &str,
) -> std::io::Result<bool> {
    if !protocols.iter().any(|p| p == protocol) {
        reply(
            s,
            "403 Forbidden",
            &format!("no common streaming protocol: offered {protocols:?}, served {protocol}\n"),
        )
        .await?;
        return Ok(false);
    }
    s.write_all(
        format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    s.flush().await?;
    Ok(true)
}

/// How long the stand-in waits for a client's streams or its goodbye.
const STREAM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Remote command protocol v4 for one `exec`: waits for the streams the
/// query asks for, runs the built-in command, reports its status on the
/// error stream and half-closes every stream.
async fn exec<S>(
    mut s: S,
    node: &str,
    pod: &str,
    params: &[(String, String)],
    protocols: &[String],
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !switch(&mut s, protocols, "v4.channel.k8s.io").await? {
        return Ok(());
    }
    let flag = |k: &str| {
        params
            .iter()
            .any(|(n, v)| n == k && (v == "1" || v == "true"))
    };
    let command: Vec<&str> = params
        .iter()
        .filter(|(n, _)| n == "command")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut want = vec!["error"];
    for (k, stream) in [
        ("input", "stdin"),
        ("output", "stdout"),
        ("error", "stderr"),
        ("tty", "resize"),
    ] {
        if flag(k) {
            want.push(stream);
        }
    }
    let mut conn = spdy::accept(s);
    let mut streams: std::collections::BTreeMap<String, spdy::Stream> = Default::default();
    while want.iter().any(|w| !streams.contains_key(*w)) {
        match tokio::time::timeout(STREAM_WAIT, conn.streams.recv()).await {
            Ok(Some(st)) => {
                let kind = st.header("streamtype").unwrap_or_default().to_owned();
                streams.insert(kind, st);
            }
            _ => {
                return Err(std::io::Error::other(format!(
                    "exec: streams {want:?} did not all come"
                )));
            }
        }
    }
    let mut stdin = streams.remove("stdin");
    let mut out = Vec::new();
    let mut stdin_bytes = 0usize;
    let stdout = streams.get("stdout").map(|s| s.tx.clone());
    let code: Result<u32, String> = match command.as_slice() {
        ["echo", args @ ..] => {
            out.extend(format!("{}\n", args.join(" ")).into_bytes());
            Ok(0)
        }
        ["hostname"] => {
            out.extend(format!("{node}\n").into_bytes());
            Ok(0)
        }
        ["false"] => Ok(1),
        ["cat"] => {
            // Streams stdin back as it comes, until the client half-closes.
            if let Some(i) = stdin.as_mut() {
                while let Some(b) = i.rx.recv().await {
                    if let Some(o) = &stdout {
                        o.send(&b)?;
                    }
                }
            }
            Ok(0)
        }
        ["wc", "-c"] => {
            if let Some(i) = stdin.as_mut() {
                while let Some(b) = i.rx.recv().await {
                    stdin_bytes += b.len();
                }
            }
            out.extend(format!("{stdin_bytes}\n").into_bytes());
            Ok(0)
        }
        other => Err(format!(
            "exec: {other:?}: executable file not found in $PATH of pod {pod} on {node}"
        )),
    };
    if let Some(o) = &stdout {
        o.send(&out)?;
    }
    let status = match code {
        Ok(0) => r#"{"metadata":{},"status":"Success"}"#.to_owned(),
        Ok(c) => format!(
            r#"{{"metadata":{{}},"status":"Failure","message":"command terminated with non-zero exit code: exit status {c}","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{c}"}}]}}}}"#
        ),
        Err(m) => format!(
            r#"{{"metadata":{{}},"status":"Failure","message":{},"reason":"InternalError","code":500}}"#,
            serde_json::Value::String(m)
        ),
    };
    for kind in ["stdout", "stderr", "resize"] {
        if let Some(st) = streams.get(kind) {
            st.tx.close()?;
        }
    }
    if let Some(e) = streams.get("error") {
        e.tx.send(status.as_bytes())?;
        e.tx.close()?;
    }
    drop((streams, stdin, stdout));
    conn.finish(STREAM_WAIT).await
}

/// Port forwarding for one `portForward`: every pair of streams (error,
/// data) with one `requestID` is one connection to the pod's `port`.
async fn port_forward<S>(
    mut s: S,
    node: &str,
    pod: &str,
    protocols: &[String],
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !switch(&mut s, protocols, "portforward.k8s.io").await? {
        return Ok(());
    }
    let mut conn = spdy::accept(s);
    let mut pending: std::collections::HashMap<String, spdy::Stream> = Default::default();
    while let Some(st) = conn.streams.recv().await {
        let id = st.header("requestid").unwrap_or_default().to_owned();
        let Some(other) = pending.remove(&id) else {
            pending.insert(id, st);
            continue;
        };
        let (error, data) = if st.header("streamtype") == Some("error") {
            (st, other)
        } else {
            (other, st)
        };
        let (node, pod) = (node.to_owned(), pod.to_owned());
        tokio::spawn(async move {
            let _ = forward(error, data, &node, &pod).await;
        });
    }
    conn.finish(STREAM_WAIT).await
}

/// One forwarded connection to the built-in pod: port 80 echoes, then
/// counts after the client's half-close; any other port is an error on the
/// error stream, as the kubelet reports a refused dial.
async fn forward(
    error: spdy::Stream,
    mut data: spdy::Stream,
    node: &str,
    pod: &str,
) -> std::io::Result<()> {
    let port = data.header("port").unwrap_or_default().to_owned();
    if port != "80" {
        error.tx.send(
            format!("error forwarding port {port} to pod {pod} on {node}: nothing listens on it")
                .as_bytes(),
        )?;
        error.tx.close()?;
        return data.tx.close();
    }
    let mut n = 0usize;
    while let Some(b) = data.rx.recv().await {
        n += b.len();
        data.tx.send(&b)?;
    }
    data.tx
        .send(format!("\n{n} bytes echoed by pod {pod} on {node}, port {port}\n").as_bytes())?;
    data.tx.close()?;
    error.tx.close()
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

/// The body of an HTTP answer: what follows its head.
pub fn body(answer: &str) -> &str {
    answer.split("\r\n\r\n").nth(1).unwrap_or_default()
}

/// A client of a proxy server's CONNECT Unix socket, as kube-apiserver's
/// egress selector is: `CONNECT node:port`, then TLS to that node's kubelet,
/// verified against the kubelet CA.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    /// The proxy server's CONNECT socket.
    pub socket: PathBuf,
    /// The port every kubelet listens on.
    pub kubelet_port: u16,
    /// Trusts the kubelet CA.
    pub tls: Arc<rustls::ClientConfig>,
}

/// A request to a kubelet through the proxy, TLS inside the CONNECT.
pub type ProxiedTls = tokio_rustls::client::TlsStream<UnixStream>;

impl ProxyClient {
    /// `CONNECT addr` on the socket: the stream, or the refusal's status
    /// line.
    pub async fn connect(&self, addr: &str) -> Result<UnixStream, String> {
        let conn = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("proxy socket: {e}"))?;
        egress_connect(conn, addr).await
    }

    /// [`start_request`] on the kubelet of `node`, by name through the
    /// proxy.
    pub async fn start_request(
        &self,
        node: &str,
        method: &str,
        path: &str,
    ) -> Result<ProxiedTls, String> {
        let conn = self
            .connect(&format!("{node}:{}", self.kubelet_port))
            .await?;
        start_request(conn, node, self.tls.clone(), method, path)
            .await
            .map_err(|e| format!("TLS to {node}: {e}"))
    }

    /// `GET path` on the kubelet of `node`, by name through the proxy: the
    /// whole answer.
    pub async fn get(&self, node: &str, path: &str) -> Result<String, String> {
        let conn = self
            .connect(&format!("{node}:{}", self.kubelet_port))
            .await?;
        let tls = kubelet_tls(conn, node, self.tls.clone())
            .await
            .map_err(|e| format!("TLS to {node}: {e}"))?;
        get(tls, node, path).await.map_err(|e| e.to_string())
    }

    /// `count` endless downloads (`GET /bytes/forever`) from the kubelet
    /// of `node` that nobody reads, given a second to fill every buffer and
    /// window they can.
    pub async fn stalled_downloads(&self, node: &str, count: usize) -> Vec<ProxiedTls> {
        let mut stalled = Vec::new();
        for _ in 0..count {
            let tls = self
                .start_request(node, "GET", "/bytes/forever")
                .await
                .expect("an endless download");
            stalled.push(tls);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        stalled
    }

    /// `count` GETs of `bytes` bytes from the kubelet of `node`, one after
    /// another: each must come whole within 10 s (not held up behind
    /// stalled streams on the same tunnel).
    pub async fn assert_gets_are_not_held_up(&self, node: &str, count: usize, bytes: usize) {
        for i in 0..count {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                self.get(node, &format!("/bytes/{bytes}")),
            )
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "request {i} to {node} on the same tunnel blocked behind the stalled streams"
                )
            })
            .expect("get");
            assert_eq!(body(&got).len(), bytes, "request {i} to {node}");
        }
    }
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
