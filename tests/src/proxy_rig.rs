//! An in-process layer-7 proxy on loopback, no root needed: one cloud
//! proxy server (node `c1`), two edge gateways (`gw-hz`: `h1` its proxy
//! endpoint and `h2`; `gw-sz`: `s1`), each running the real
//! `raven_proxy::run` with node certificates from `raven-hub certs`, and a
//! fake kubelet on every edge node (127.0.0.11-13) with a certificate from
//! a kubelet CA. Clients dial the server's CONNECT Unix socket as
//! kube-apiserver's egress selector does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raven_model::fixtures::{self, node as n};
use raven_model::topology::{
    EndpointType, ExposeType, GatewayEndpoint, GatewayView, Member, NodeView, Settings,
};
use raven_model::{GatewayName, NodeName};
use raven_proxy::{NodeTls, ProxyConfig, ProxyView};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fake_kubelet::{self, KubeletCa};

/// The edge nodes: (name, gateway, address).
pub const EDGES: [(&str, &str, &str); 3] = [
    ("h1", "gw-hz", "127.0.0.11"),
    ("h2", "gw-hz", "127.0.0.12"),
    ("s1", "gw-sz", "127.0.0.13"),
];

fn proxy_ep(node: &str, port: u16, public: Option<IpAddr>) -> GatewayEndpoint {
    GatewayEndpoint {
        type_: EndpointType::Proxy,
        under_nat: public.is_none(),
        public_ip: public,
        ..fixtures::endpoint(node, port)
    }
}

fn member(node: &str, ip: &str) -> Member {
    fixtures::member(node, ip, &[])
}

/// A running rig.
#[derive(Debug)]
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub kubelet_port: u16,
    pub tunnel_port: u16,
    pub ca: KubeletCa,
    pub client_tls: Arc<rustls::ClientConfig>,
    gateways: BTreeMap<GatewayName, GatewayView>,
    procs: BTreeMap<&'static str, CancellationToken>,
    certs: PathBuf,
}

impl Rig {
    /// Certificates, fake kubelets, the server and both edge proxies; waits
    /// until a request through each edge proxy works.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let nodes: Vec<NodeName> = ["c1", "h1", "h2", "s1"].iter().map(|s| n(s)).collect();
        raven_hub::certs::generate(&certs, &["127.0.0.1".into()], &nodes).expect("certs");
        // One free port for every kubelet (distinct addresses), one for
        // the tunnel listener.
        let probe = TcpListener::bind("127.0.0.11:0").await.expect("bind");
        let kubelet_port = probe.local_addr().expect("addr").port();
        drop(probe);
        let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tunnel_port = probe.local_addr().expect("addr").port();
        drop(probe);

        let ca = KubeletCa::new();
        for (node, _, ip) in EDGES {
            let ip: IpAddr = ip.parse().expect("ip");
            let (cert, key) = ca.serving(node, ip);
            let l = TcpListener::bind(SocketAddr::new(ip, kubelet_port))
                .await
                .expect("kubelet bind");
            tokio::spawn(fake_kubelet::serve(
                l,
                fake_kubelet::server_config(&cert, &key),
                node.to_owned(),
            ));
        }
        let ports = vec![kubelet_port];
        let local = Some("127.0.0.1".parse().expect("ip"));
        let gws = [
            GatewayView {
                expose_type: ExposeType::PublicIP,
                members: vec![member("c1", "127.0.0.1")],
                active_proxies: vec![proxy_ep("c1", tunnel_port, local)],
                proxy_ports: ports.clone(),
                ..fixtures::gateway("gw-cloud")
            },
            GatewayView {
                under_nat: true,
                members: vec![member("h1", "127.0.0.11"), member("h2", "127.0.0.12")],
                active_proxies: vec![proxy_ep("h1", 10262, None)],
                proxy_ports: ports.clone(),
                ..fixtures::gateway("gw-hz")
            },
            GatewayView {
                under_nat: true,
                members: vec![member("s1", "127.0.0.13")],
                active_proxies: vec![proxy_ep("s1", 10262, None)],
                proxy_ports: ports,
                ..fixtures::gateway("gw-sz")
            },
        ];
        let mut rig = Self {
            socket: dir.path().join("proxy.sock"),
            dir,
            kubelet_port,
            tunnel_port,
            client_tls: ca.client_config(),
            ca,
            gateways: gws.into_iter().map(|g| (g.name.clone(), g)).collect(),
            procs: BTreeMap::new(),
            certs,
        };
        for node in ["c1", "h1", "s1"] {
            rig.start_node(node);
        }
        for node in ["h1", "h2", "s1"] {
            rig.wait_for(node).await;
        }
        rig
    }

    fn view(&self, node: &str) -> ProxyView {
        let (gateway, ip) = if node == "c1" {
            ("gw-cloud", "127.0.0.1")
        } else {
            EDGES
                .iter()
                .find(|e| e.0 == node)
                .map(|e| (e.1, e.2))
                .expect("node")
        };
        ProxyView {
            me: NodeView {
                private_ip: Some(fixtures::ip(ip)),
                proxy_active: true,
                ..fixtures::node_view(node, Some(gateway))
            },
            gateways: self.gateways.clone(),
            settings: Some(Settings {
                enable_l7_proxy: true,
                ..fixtures::settings()
            }),
        }
    }

    /// Starts (or restarts) the proxy of `node` (`c1`, `h1` or `s1`).
    pub fn start_node(&mut self, node: &'static str) {
        self.stop_node(node);
        let bundle = self.certs.join("nodes").join(node);
        let mut cfg = ProxyConfig::new(
            n(node),
            NodeTls {
                ca: bundle.join("ca.pem"),
                cert: bundle.join("node.pem"),
                key: bundle.join("node-key.pem"),
            },
        );
        if node == "c1" {
            cfg.connect_socket = Some(self.socket.clone());
            cfg.tunnel_ip = "127.0.0.1".parse().expect("ip");
        }
        let (_tx, rx) = watch::channel(Some(self.view(node)));
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            // The sender lives as long as the proxy.
            let _tx = _tx;
            raven_proxy::run(cfg, rx, s).await;
        });
        self.procs.insert(node, stop);
    }

    /// Stops the proxy of `node`, closing its listeners and tunnels.
    pub fn stop_node(&mut self, node: &str) {
        if let Some(t) = self.procs.remove(node) {
            t.cancel();
        }
    }

    /// `CONNECT addr` on the proxy socket: the stream, or the refusal's
    /// status line.
    pub async fn connect(&self, addr: &str) -> Result<UnixStream, String> {
        let conn = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("proxy socket: {e}"))?;
        fake_kubelet::egress_connect(conn, addr).await
    }

    /// `GET path` on the kubelet of `node`, by name through the proxy, TLS
    /// verified against the kubelet CA.
    pub async fn get(&self, node: &str, path: &str) -> Result<String, String> {
        let conn = self
            .connect(&format!("{node}:{}", self.kubelet_port))
            .await?;
        let tls = fake_kubelet::kubelet_tls(conn, node, self.client_tls.clone())
            .await
            .map_err(|e| format!("TLS to {node}: {e}"))?;
        fake_kubelet::get(tls, node, path)
            .await
            .map_err(|e| e.to_string())
    }

    /// Waits (up to 30 s) until `/healthz` of `node` answers through the
    /// proxy; returns how long that took.
    pub async fn wait_for(&self, node: &str) -> std::time::Duration {
        let t = std::time::Instant::now();
        loop {
            match self.get(node, "/healthz").await {
                Ok(body) if body.contains(&format!("ok {node}")) => return t.elapsed(),
                r => {
                    assert!(
                        t.elapsed() < std::time::Duration::from_secs(30),
                        "{node} unreachable through the proxy after 30 s: {r:?}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub fn certs(&self) -> &Path {
        &self.certs
    }
}
