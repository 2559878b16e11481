//! The proxy's tunnel listener (10262 on the cloud proxy endpoint) serves
//! the node's certificate, read again when its files change — the
//! kubelet's `..data` swap of a Secret volume — so new tunnels get the
//! renewed certificate without restarting the agent, and a torn new file is
//! refused while the old certificate keeps serving. Real sockets, real mTLS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raven_proxy::server::{Tunnels, serve_tunnels};
use raven_proxy::{NodeTls, Tuning};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_util::sync::CancellationToken;

struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = p.self_signed(&key).expect("ca");
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// A node certificate (client and server use, the name as DNS SAN):
/// (certificate, key) PEM.
fn node(ca: &Ca, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = p.signed_by(&key, &ca.issuer).expect("cert");
    (cert.pem(), key.serialize_pem())
}

/// The kubelet's update of a Secret volume at `mount` (`..data` swap).
fn secret_update(mount: &Path, generation: &str, files: &[(&str, &[u8])]) {
    raven_cli::reload::write_secret_volume(mount, generation, files).expect("secret update");
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// The certificate the tunnel listener at `addr` serves to a new
/// connection, dialled as an edge node would.
async fn served(addr: std::net::SocketAddr, edge: &NodeTls) -> Vec<u8> {
    let tls = edge.client_config(Tuning::default()).expect("edge TLS");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("cloud-1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("a server certificate")
}

#[tokio::test]
async fn the_tunnel_listener_serves_a_renewed_node_certificate_and_keeps_the_old_one_over_a_torn_file()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    let (cert1, key1) = node(&ca, "cloud-1");
    let mount = tmp.path().join("cloud");
    secret_update(
        &mount,
        "v1",
        &[
            ("ca.pem", ca.pem.as_bytes()),
            ("node.pem", cert1.as_bytes()),
            ("node-key.pem", key1.as_bytes()),
        ],
    );
    let cloud = NodeTls {
        ca: mount.join("ca.pem"),
        cert: mount.join("node.pem"),
        key: mount.join("node-key.pem"),
    };
    let (edge_cert, edge_key) = node(&ca, "edge-1");
    let edge_dir = tmp.path().join("edge");
    secret_update(
        &edge_dir,
        "v1",
        &[
            ("ca.pem", ca.pem.as_bytes()),
            ("node.pem", edge_cert.as_bytes()),
            ("node-key.pem", edge_key.as_bytes()),
        ],
    );
    let edge = NodeTls {
        ca: edge_dir.join("ca.pem"),
        cert: edge_dir.join("node.pem"),
        key: edge_dir.join("node-key.pem"),
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let watched = cloud.watch_server(Tuning::default()).expect("server TLS");
    tokio::spawn(serve_tunnels(
        listener,
        watched.clone(),
        Tuning::default(),
        Arc::new(Tunnels::default()),
        stop.clone(),
    ));
    assert_eq!(served(addr, &edge).await, der(&cert1));

    let (cert2, key2) = node(&ca, "cloud-1");
    let renewed = Instant::now();
    secret_update(
        &mount,
        "v2",
        &[
            ("ca.pem", ca.pem.as_bytes()),
            ("node.pem", cert2.as_bytes()),
            ("node-key.pem", key2.as_bytes()),
        ],
    );
    while served(addr, &edge).await != der(&cert2) {
        assert!(
            renewed.elapsed() < Duration::from_secs(15),
            "new tunnels still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "renewed tunnel certificate served {:?} after the ..data swap",
        renewed.elapsed()
    );

    // Torn: half a certificate. Refused; the renewed one keeps serving.
    let (cert3, key3) = node(&ca, "cloud-1");
    secret_update(
        &mount,
        "v3",
        &[
            ("ca.pem", ca.pem.as_bytes()),
            ("node.pem", &cert3.as_bytes()[..cert3.len() / 2]),
            ("node-key.pem", key3.as_bytes()),
        ],
    );
    let t = Instant::now();
    let why = loop {
        if let Some(why) = watched.refused() {
            break why;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the torn file was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("refused: {why}");
    assert!(
        why.contains(&mount.join("node.pem").display().to_string()),
        "the error does not name the file: {why}"
    );
    assert_eq!(
        served(addr, &edge).await,
        der(&cert2),
        "a torn certificate replaced the one in use"
    );
    stop.cancel();
}
