//! The hub's serving certificate, key and client CAs are read again when
//! their files change — as the kubelet updates a mounted Secret (new files
//! in a fresh `..<generation>` directory, the `..data` symlink renamed onto
//! it) when cert-manager renews it — without a restart: new connections get
//! the new certificate while open Sync streams stay up; a broken new file is
//! refused with an error naming it and the old certificate keeps serving.
//! A Sync stream ends when its client certificate expires. Real `raven-hub
//! serve` processes, real mTLS over loopback sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::{self, sync_service_client::SyncServiceClient};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const EXE: &str = env!("CARGO_BIN_EXE_raven-hub");

/// `raven-hub certs --out OUT --node n1`: a CA (kept when it exists), a new
/// hub certificate and key, node n1's bundle.
fn issue(out: &Path) {
    let st = Command::new(EXE)
        .args(["certs", "--node", "n1", "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("certs");
    assert!(st.success());
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The kubelet's update of a Secret volume at `mount` (`..data` swap).
fn secret_update(mount: &Path, generation: &str, files: &[(&str, &[u8])]) {
    raven_cli::reload::write_secret_volume(mount, generation, files).expect("secret update");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A `raven-hub serve` this test started, logging to a file; killed (by
/// its PID) on drop.
struct Hub {
    child: Child,
    log: PathBuf,
    addr: String,
}

impl Hub {
    fn start(dir: &Path, certs: &Path, extra: &[&str]) -> Self {
        let manifests = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/user-manual"
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("hub.log");
        let child = Command::new(EXE)
            .args(["serve", "--manifests", manifests, "--grpc-addr", &addr])
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--plaintext-addr",
                "127.0.0.1:0",
            ])
            .args(["--heartbeat", "1s"])
            .arg("--certs")
            .arg(certs)
            .arg("--data-dir")
            .arg(dir.join("hub-data"))
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start raven-hub");
        Self { child, log, addr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (20 s at most) for a log line with every one of `parts`.
    async fn wait_log(&self, parts: &[&str]) -> String {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no log line with {parts:?}:\n{}", self.log());
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client identity and the CA the hub's certificate is checked against.
#[derive(Clone)]
struct Client {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Client {
    fn of_bundle(bundle: &Path) -> Self {
        Self {
            ca: read(&bundle.join("ca.pem")),
            cert: read(&bundle.join("node.pem")),
            key: read(&bundle.join("node-key.pem")),
        }
    }

    /// The certificate (DER) the hub serves to a new connection now.
    async fn served(&self, addr: &str) -> Result<Vec<u8>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| e.to_string())?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or_else(|| "no server certificate".to_owned())
    }

    /// Opens a Sync stream as node n1 and reads its first message; the
    /// stream is kept up by heartbeats every 300 ms.
    async fn sync(&self, addr: &str) -> Result<tonic::Streaming<v1::SyncResponse>, String> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (tx, rx) = mpsc::channel(8);
        let hello = v1::Hello {
            protocol_version: raven_proto::PROTOCOL_VERSION,
            agent_version: "test".into(),
            capabilities: vec![v1::Capability::Delta as i32],
            node_name: "n1".into(),
            ..Default::default()
        };
        let _ = tx
            .send(v1::SyncRequest {
                message: Some(Req::Hello(hello)),
            })
            .await;
        tokio::spawn(async move {
            for sequence in 1.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let beat = v1::Heartbeat {
                    sequence,
                    ..Default::default()
                };
                let msg = v1::SyncRequest {
                    message: Some(Req::Heartbeat(beat)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let mut inbound = SyncServiceClient::new(channel)
            .sync(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("sync: {s}"))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(_)) => Ok(inbound),
            Ok(None) => Err("the stream ended at once".into()),
            Err(s) => Err(format!("first message: {s}")),
        }
    }
}

/// The DER of the first certificate of a PEM file.
fn der(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// Reads `stream` for `d`: it must keep delivering (the hub's heartbeats)
/// and not end.
async fn stays_up(stream: &mut tonic::Streaming<v1::SyncResponse>, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    let mut got = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => break,
            m = stream.message() => match m {
                Ok(Some(_)) => got += 1,
                other => panic!("an open stream ended: {other:?}"),
            },
        }
    }
    assert!(got > 0, "no message on the open stream for {d:?}");
}

/// A CA made with rcgen: its certificate (PEM) and issuer.
fn rcgen_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).expect("ca");
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A client certificate of node `node` from `issuer`, valid until
/// `not_after`: (certificate, key) PEM.
fn node_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    node: &str,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_serving_certificate_and_client_ca_in_a_secret_serve_new_connections_while_open_streams_stay_up()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let issued = d.join("issued");
    issue(&issued);
    let node = Client::of_bundle(&issued.join("nodes/n1"));
    // The cluster's CA comes from the Secret too (`--client-ca`): first
    // one cluster, then another, whose node certificates are refused until
    // the renewed Secret trusts it.
    let (cluster_a, _) = rcgen_ca("cluster-a");
    let (cluster_b, cluster_b_issuer) = rcgen_ca("cluster-b");
    let far = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let (b_cert, b_key) = node_cert(&cluster_b_issuer, "n1", far);
    let node_of_b = Client {
        ca: node.ca.clone(),
        cert: b_cert.into_bytes(),
        key: b_key.into_bytes(),
    };

    let mount = d.join("secret");
    let v1_cert = read(&issued.join("hub.pem"));
    secret_update(
        &mount,
        "2026_12_01_v1",
        &[
            ("hub.pem", &v1_cert),
            ("hub-key.pem", &read(&issued.join("hub-key.pem"))),
            ("ca.pem", &read(&issued.join("ca.pem"))),
            ("cluster-ca.pem", cluster_a.as_bytes()),
        ],
    );
    let cluster_ca = mount.join("cluster-ca.pem");
    let hub = Hub::start(
        d,
        &mount,
        &["--client-ca", cluster_ca.to_str().expect("utf-8")],
    );
    hub.wait_log(&["raven-hub started"]).await;

    let t = Instant::now();
    let served = loop {
        match node.served(&hub.addr).await {
            Ok(c) => break c,
            Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("{e}\n{}", hub.log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(
        served,
        der(&v1_cert),
        "the hub serves its first certificate"
    );
    let mut open = node.sync(&hub.addr).await.expect("a Sync stream");
    assert!(
        node_of_b.sync(&hub.addr).await.is_err(),
        "a node certificate of a CA the hub does not trust yet was accepted"
    );

    // cert-manager renews: a new hub certificate and key, and the cluster
    // CA moves to cluster-b.
    issue(&issued);
    let v2_cert = read(&issued.join("hub.pem"));
    assert_ne!(der(&v2_cert), der(&v1_cert));
    let renewed = Instant::now();
    secret_update(
        &mount,
        "2026_12_01_v2",
        &[
            ("hub.pem", &v2_cert),
            ("hub-key.pem", &read(&issued.join("hub-key.pem"))),
            ("ca.pem", &read(&issued.join("ca.pem"))),
            ("cluster-ca.pem", cluster_b.as_bytes()),
        ],
    );
    loop {
        let now = node.served(&hub.addr).await.expect("a new connection");
        if now == der(&v2_cert) {
            break;
        }
        assert!(
            renewed.elapsed() < Duration::from_secs(15),
            "new connections still get the old certificate:\n{}",
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "renewed serving certificate served {:?} after the ..data swap",
        renewed.elapsed()
    );
    hub.wait_log(&["files changed: reloaded", "serving certificate"])
        .await;
    // The stream opened before keeps running on its connection.
    stays_up(&mut open, Duration::from_secs(3)).await;
    let mut of_b = node_of_b
        .sync(&hub.addr)
        .await
        .expect("the renewed client CA trusts cluster-b's node certificate");
    // (It replaced `open`: one stream per node.)
    stays_up(&mut of_b, Duration::from_secs(2)).await;

    // A torn renewal — half a certificate — is refused, naming the file,
    // and the certificate in use keeps serving.
    issue(&issued);
    let v3_cert = read(&issued.join("hub.pem"));
    secret_update(
        &mount,
        "2026_12_01_v3",
        &[
            ("hub.pem", &v3_cert[..v3_cert.len() / 2]),
            ("hub-key.pem", &read(&issued.join("hub-key.pem"))),
            ("ca.pem", &read(&issued.join("ca.pem"))),
            ("cluster-ca.pem", cluster_b.as_bytes()),
        ],
    );
    let line = hub
        .wait_log(&["do not load", &mount.join("hub.pem").display().to_string()])
        .await;
    eprintln!("refused: {line}");
    assert_eq!(
        node.served(&hub.addr).await.expect("a new connection"),
        der(&v2_cert),
        "a torn certificate replaced the one in use"
    );
    stays_up(&mut of_b, Duration::from_secs(2)).await;

    // A key that does not match the certificate: refused as well.
    secret_update(
        &mount,
        "2026_12_01_v4",
        &[
            ("hub.pem", &v3_cert),
            ("hub-key.pem", &read(&issued.join("nodes/n1/node-key.pem"))),
            ("ca.pem", &read(&issued.join("ca.pem"))),
            ("cluster-ca.pem", cluster_b.as_bytes()),
        ],
    );
    hub.wait_log(&["do not load", "TLS configuration from"])
        .await;
    assert_eq!(
        node.served(&hub.addr).await.expect("a new connection"),
        der(&v2_cert),
        "a certificate with another key replaced the one in use"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_stream_ends_when_its_client_certificate_expires() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let issued = d.join("issued");
    issue(&issued);
    let ca_key = rcgen::KeyPair::from_pem(
        &String::from_utf8(read(&issued.join("ca-key.pem"))).expect("utf-8"),
    )
    .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &String::from_utf8(read(&issued.join("ca.pem"))).expect("utf-8"),
        ca_key,
    )
    .expect("issuer");
    // Valid for a few more seconds (X.509 times are whole seconds).
    let expires = (time::OffsetDateTime::now_utc() + time::Duration::seconds(6))
        .replace_nanosecond(0)
        .expect("whole second");
    let (cert, key) = node_cert(&issuer, "n1", expires);
    let node = Client {
        ca: read(&issued.join("ca.pem")),
        cert: cert.into_bytes(),
        key: key.into_bytes(),
    };
    let hub = Hub::start(d, &issued, &[]);
    hub.wait_log(&["raven-hub started"]).await;
    let t = Instant::now();
    let mut stream = loop {
        match node.sync(&hub.addr).await {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(4) => panic!("{e}\n{}", hub.log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Err("ended without a status".to_owned()),
                Err(s) => return Ok(s),
            }
        }
    })
    .await
    .expect("the stream outlived its client certificate")
    .expect("a status");
    let late = time::OffsetDateTime::now_utc() - expires;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("expired"), "{ended:?}");
    assert!(
        late >= time::Duration::ZERO && late < time::Duration::seconds(3),
        "closed {late} after the expiry"
    );
    let line = hub.wait_log(&["client certificate expired", "n1"]).await;
    eprintln!("{line}");
    // And the expired certificate opens no new stream.
    assert!(node.sync(&hub.addr).await.is_err());
}
