//! Throughput and per-request latency of the layer-7 proxy against a direct
//! TCP connection to the same target, measured in the same run (ratios).
//!
//! One process, loopback: a cloud proxy server (node `c1`) and an edge
//! proxy (`e1`, the proxy endpoint of gateway `gw-edge`) with certificates
//! from a throwaway CA, the real mTLS + HTTP/2 tunnel between them, and a
//! plain TCP target on 127.0.0.21. The proxied path is what kube-apiserver
//! does: a Unix-socket CONNECT to the server, then the bytes.
//!
//! Several such pairs run side by side: one with the default data path
//! (`Tuning::default()`) and one per variant of `Tuning`, measured in turn
//! with the direct path (three rounds, medians), so every variant's ratio
//! to the default comes from the same run under the same load.
//!
//! `cargo bench -p raven-proxy --bench tunnel`

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use raven_model::NodeName;
use raven_model::fixtures;
use raven_model::topology::{
    EndpointType, ExposeType, GatewayEndpoint, GatewayView, NodeView, Settings,
};
use raven_proxy::{NodeTls, ProxyConfig, ProxyView, Tuning};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TARGET: &str = "127.0.0.21";

fn n(s: &str) -> NodeName {
    NodeName::new(s).expect("node")
}

/// A CA and node certificates as `raven-hub certs` makes them (CN
/// `system:node:<n>`, the name as DNS SAN, client and server use).
fn certs(dir: &Path, nodes: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for node in nodes {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec![(*node).to_owned()]).expect("params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = p.signed_by(&key, &issuer).expect("cert");
        let d = dir.join(node);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(d.join("node.pem"), cert.pem()).expect("write");
        let kf = d.join("node-key.pem");
        std::fs::write(&kf, key.serialize_pem()).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

fn view(me: &str, tunnel_port: u16, target_port: u16) -> ProxyView {
    let ep = |node: &str, port: u16, public: bool| GatewayEndpoint {
        type_: EndpointType::Proxy,
        under_nat: !public,
        public_ip: public.then(|| fixtures::ip("127.0.0.1")),
        ..fixtures::endpoint(node, port)
    };
    let member = |node: &str, ip: &str| fixtures::member(node, ip, &[]);
    let gw = |name: &str, exposed: bool, members, proxies| GatewayView {
        expose_type: if exposed {
            ExposeType::PublicIP
        } else {
            ExposeType::None
        },
        under_nat: !exposed,
        members,
        active_proxies: proxies,
        proxy_ports: vec![target_port],
        ..fixtures::gateway(name)
    };
    let gateways = [
        gw(
            "gw-cloud",
            true,
            vec![member("c1", "127.0.0.1")],
            vec![ep("c1", tunnel_port, true)],
        ),
        gw(
            "gw-edge",
            false,
            vec![member("e1", TARGET)],
            vec![ep("e1", 10262, false)],
        ),
    ];
    ProxyView {
        me: NodeView {
            private_ip: Some(fixtures::ip(if me == "c1" { "127.0.0.1" } else { TARGET })),
            proxy_active: true,
            ..fixtures::node_view(me, Some(if me == "c1" { "gw-cloud" } else { "gw-edge" }))
        },
        gateways: gateways.into_iter().map(|g| (g.name.clone(), g)).collect(),
        settings: Some(Settings {
            enable_l7_proxy: true,
            ..fixtures::settings()
        }),
    }
}

/// The target: reads a request line `<n>\n` and answers `n` bytes, or
/// `ping\n` with `pong\n`; one request per connection.
async fn target(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\n") {
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                line.push(b[0]);
            }
            let text = String::from_utf8_lossy(&line).trim().to_owned();
            if text == "ping" {
                let _ = s.write_all(b"pong\n").await;
            } else {
                let mut left: u64 = text.parse().unwrap_or(0);
                let chunk = vec![b'x'; 256 << 10];
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

async fn request<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, line: &str) -> u64 {
    s.write_all(line.as_bytes()).await.expect("request");
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let k = s.read(&mut buf).await.expect("read");
        if k == 0 {
            return total;
        }
        total += k as u64;
    }
}

#[derive(Clone, Copy)]
enum Path2 {
    Direct,
    /// Through the pair of this index in `Paths::sockets`.
    Proxied(usize),
}

struct Paths {
    target: SocketAddr,
    sockets: Vec<std::path::PathBuf>,
}

impl Paths {
    async fn open(&self, via: Path2) -> Box<dyn Stream> {
        match via {
            Path2::Direct => {
                let s = TcpStream::connect(self.target).await.expect("direct");
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Path2::Proxied(i) => {
                let mut s = UnixStream::connect(&self.sockets[i]).await.expect("socket");
                s.write_all(
                    format!(
                        "CONNECT e1:{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                        self.target.port()
                    )
                    .as_bytes(),
                )
                .await
                .expect("connect");
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    assert!(s.read(&mut b).await.expect("head") == 1, "proxy closed");
                    head.push(b[0]);
                }
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                Box::new(s)
            }
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(paths: &Paths, via: Path2, rounds: usize) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let s = paths.open(via).await;
        assert_eq!(request(s, "ping\n").await, 5);
        v.push(t.elapsed());
    }
    v.sort();
    (pct(&v, 0.5), pct(&v, 0.99))
}

async fn throughput(paths: &Paths, via: Path2, streams: usize, bytes: u64) -> f64 {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let s = paths.open(via).await;
        tasks.push(tokio::spawn(async move {
            request(s, &format!("{bytes}\n")).await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, bytes * streams as u64);
    total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        certs(dir.path(), &["c1", "e1"]);
        let l = TcpListener::bind(format!("{TARGET}:0"))
            .await
            .expect("bind target");
        let target_addr = l.local_addr().expect("addr");
        tokio::spawn(target(l));
        let stop = CancellationToken::new();
        let mut senders = Vec::new();
        let base = Tuning::default();
        let pairs = [
            ("default", base),
            (
                "256 KiB TLS read buffer",
                Tuning {
                    tls_read_buffer: 256 << 10,
                    ..base
                },
            ),
            (
                "AES-128-GCM first",
                Tuning {
                    prefer_aes128: true,
                    ..base
                },
            ),
            (
                "4 MiB stream window",
                Tuning {
                    stream_window: 4 << 20,
                    ..base
                },
            ),
            (
                "all three",
                Tuning {
                    tls_read_buffer: 256 << 10,
                    prefer_aes128: true,
                    stream_window: 4 << 20,
                },
            ),
        ];
        let mut sockets = Vec::new();
        for (i, (_, tuning)) in pairs.iter().enumerate() {
            let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let tunnel_port = probe.local_addr().expect("addr").port();
            drop(probe);
            let socket = dir.path().join(format!("proxy-{i}.sock"));
            for node in ["c1", "e1"] {
                let b = dir.path().join(node);
                let mut cfg = ProxyConfig::new(
                    n(node),
                    NodeTls {
                        ca: b.join("ca.pem"),
                        cert: b.join("node.pem"),
                        key: b.join("node-key.pem"),
                    },
                );
                cfg.tuning = *tuning;
                if node == "c1" {
                    cfg.connect_socket = Some(socket.clone());
                    cfg.tunnel_ip = "127.0.0.1".parse().expect("ip");
                }
                let (tx, rx) = watch::channel(Some(view(node, tunnel_port, target_addr.port())));
                senders.push(tx);
                tokio::spawn(raven_proxy::run(cfg, rx, stop.clone()));
            }
            sockets.push(socket);
        }
        let paths = Paths {
            target: target_addr,
            sockets,
        };
        // Wait for the tunnels.
        for socket in &paths.sockets {
            let t = Instant::now();
            loop {
                if let Ok(mut s) = UnixStream::connect(socket).await {
                    let _ = s
                        .write_all(
                            format!(
                                "CONNECT e1:{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                target_addr.port()
                            )
                            .as_bytes(),
                        )
                        .await;
                    let mut b = [0u8; 12];
                    if s.read_exact(&mut b).await.is_ok() && &b == b"HTTP/1.1 200" {
                        break;
                    }
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "tunnel never came up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let all: Vec<(&str, Path2)> = std::iter::once(("direct TCP", Path2::Direct))
            .chain(
                pairs
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _))| (*name, Path2::Proxied(i))),
            )
            .collect();
        // Warm up every path.
        for (_, via) in &all {
            latency(&paths, *via, 50).await;
        }

        let rounds = 1000;
        println!("per-request latency (new connection + ping/pong), {rounds} requests each:");
        let mut lat = Vec::new();
        for (name, via) in &all {
            let (p50, p99) = latency(&paths, *via, rounds).await;
            println!("  {name:<24} p50 {p50:>10.1?}  p99 {p99:>10.1?}");
            lat.push((p50, p99));
        }
        for (i, (name, _)) in pairs.iter().enumerate() {
            let (p50, p99) = lat[i + 1];
            println!(
                "  ratio {name}/direct: p50 {:.2}x, p99 {:.2}x",
                p50.as_secs_f64() / lat[0].0.as_secs_f64(),
                p99.as_secs_f64() / lat[0].1.as_secs_f64()
            );
        }
        // Throughput: the three paths in turn, three times; medians.
        let reps = 3;
        for (streams, bytes) in [(1usize, 512u64 << 20), (8, 64 << 20)] {
            let mut got: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
            for _ in 0..reps {
                for (k, (_, via)) in all.iter().enumerate() {
                    got[k].push(throughput(&paths, *via, streams, bytes).await);
                }
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let m: Vec<f64> = got.iter_mut().map(med).collect();
            println!(
                "throughput, {streams} stream(s) x {} MiB, median of {reps}: direct {:.2} Gbit/s",
                bytes >> 20,
                m[0]
            );
            for (i, (name, _)) in pairs.iter().enumerate() {
                println!(
                    "  {name:<24} {:.2} Gbit/s, ratio to direct {:.3}, to the default {:.2}x",
                    m[i + 1],
                    m[i + 1] / m[0],
                    m[i + 1] / m[1]
                );
            }
        }
        stop.cancel();
        drop(senders);
    });
}
