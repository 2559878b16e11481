//! An in-process layer-7 proxy on loopback, no root needed: one cloud
//! proxy server (node `c1`), two edge gateways (`gw-hz`: `h1` its proxy
//! endpoint and `h2`; `gw-sz`: `s1`), each running the real
//! `raven_proxy::run` with node certificates from `raven-hub certs`, and a
//! fake kubelet on every edge node (127.0.0.11-13) with a certificate from
//! a kubelet CA. `lonely` (127.0.0.14) belongs to no gateway: it runs its
//! proxy too, and opens its own tunnel. Every node's proxy view is what the
//! hub ships it: the resources `raven_model::view` selects for it from one
//! topology. Clients dial the server's CONNECT Unix socket as
//! kube-apiserver's egress selector does, or its TCP CONNECT listener with
//! TLS and a client certificate from an "egress CA" ([`Egress`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raven_model::NodeName;
use raven_model::fixtures::{self, node as n};
use raven_model::topology::{
    EndpointType, ExposeType, GatewayEndpoint, GatewayView, Member, NodeView, Resource,
    ResourceBody, ResourceName, Settings, Topology,
};
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

/// The node in no gateway: (name, address).
pub const LONELY: (&str, &str) = ("lonely", "127.0.0.14");

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

/// The TLS of the server's TCP CONNECT listener, as files (what
/// kube-apiserver's `transport.tcp.tlsConfig` names) and as the CA that
/// made them.
#[derive(Debug)]
pub struct Egress {
    pub addr: SocketAddr,
    pub ca: KubeletCa,
    /// The CA's certificate (`caBundle`).
    pub ca_file: PathBuf,
    /// A client certificate and key from the CA (`clientCert`, `clientKey`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client: (String, String),
    server: raven_proxy::ConnectTls,
}

impl Egress {
    fn new(dir: &Path, addr: SocketAddr) -> Self {
        let ca = KubeletCa::new();
        let (cert, key) = ca.serving("raven-proxy", addr.ip());
        let client = ca.client("kube-apiserver");
        let files = [
            ("ca.pem", ca.cert_pem.clone()),
            ("server.pem", cert),
            ("client.pem", client.0.clone()),
        ];
        for (name, pem) in &files {
            std::fs::create_dir_all(dir).expect("egress dir");
            std::fs::write(dir.join(name), pem).expect("egress file");
        }
        for (name, pem) in [("server-key.pem", &key), ("client-key.pem", &client.1)] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.join(name), pem).expect("egress key");
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600))
                .expect("key mode");
        }
        Self {
            addr,
            server: raven_proxy::ConnectTls {
                cert: dir.join("server.pem"),
                key: dir.join("server-key.pem"),
                client_ca: dir.join("ca.pem"),
            },
            ca_file: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            client,
            ca,
        }
    }

    /// TLS to the CONNECT listener as `client` (`None`: no certificate).
    pub async fn dial(
        &self,
        client: Option<&(String, String)>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let cfg = match client {
            Some(c) => self.ca.client_config_with(c),
            None => self.ca.client_config(),
        };
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
    }
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
    /// The server's TCP CONNECT listener (TLS, client certificates).
    pub egress: Egress,
    /// What the hub would publish: gateways, nodes, settings.
    pub topology: Topology,
    procs: BTreeMap<&'static str, CancellationToken>,
    certs: PathBuf,
}

/// The topology of the rig's cluster, as the hub's compiler lays it out.
fn topology(gateways: [GatewayView; 3]) -> Topology {
    let mut nodes = vec![("c1", Some("gw-cloud"), "127.0.0.1", true)];
    nodes.extend(
        EDGES
            .iter()
            .map(|(n, g, ip)| (*n, Some(*g), *ip, *n != "h2")),
    );
    nodes.push((LONELY.0, None, LONELY.1, false));
    let mut bodies: Vec<ResourceBody> = gateways.into_iter().map(ResourceBody::Gateway).collect();
    bodies.extend(nodes.into_iter().map(|(name, gw, ip, proxy)| {
        ResourceBody::Node(NodeView {
            name: n(name),
            gateway: gw.map(fixtures::gateway_name),
            private_ip: ip.parse().ok(),
            subnets: vec![],
            tunnel_active: false,
            tunnel_candidate: false,
            proxy_active: proxy,
        })
    }));
    bodies.push(ResourceBody::Settings(Settings {
        raven_cfg_present: true,
        enable_l3_tunnel: true,
        enable_l7_proxy: true,
        vxlan_port: 4472,
        vpn_driver: Default::default(),
    }));
    Topology {
        resources: bodies
            .into_iter()
            .map(|b| {
                let name = match &b {
                    ResourceBody::Gateway(g) => ResourceName::gateway(&g.name),
                    ResourceBody::Node(v) => ResourceName::node(&v.name),
                    ResourceBody::Peer(p) => ResourceName::peer(&p.node),
                    ResourceBody::Settings(_) => ResourceName::settings(),
                    ResourceBody::Prefixes(p) => ResourceName::prefixes(&p.gateway),
                };
                (name, Resource::new(b))
            })
            .collect(),
        problems: vec![],
    }
}

impl Rig {
    /// Certificates, fake kubelets, the server and both edge proxies; waits
    /// until a request through each edge proxy works.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let nodes: Vec<NodeName> = ["c1", "h1", "h2", "s1", LONELY.0]
            .iter()
            .map(|s| n(s))
            .collect();
        raven_hub::certs::generate(&certs, &["127.0.0.1".into()], &nodes).expect("certs");
        // One free port for every kubelet (distinct addresses), one for
        // the tunnel listener.
        let probe = TcpListener::bind("127.0.0.11:0").await.expect("bind");
        let kubelet_port = probe.local_addr().expect("addr").port();
        drop(probe);
        let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tunnel_port = probe.local_addr().expect("addr").port();
        drop(probe);
        let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let connect_addr = probe.local_addr().expect("addr");
        drop(probe);
        let egress = Egress::new(&dir.path().join("egress"), connect_addr);

        let ca = KubeletCa::new();
        let kubelets = EDGES.iter().map(|(n, _, ip)| (*n, *ip)).chain([LONELY]);
        for (node, ip) in kubelets {
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
            egress,
            topology: topology(gws),
            procs: BTreeMap::new(),
            certs,
        };
        for node in ["c1", "h1", "s1", LONELY.0] {
            rig.start_node(node);
        }
        for node in ["h1", "h2", "s1", LONELY.0] {
            rig.wait_for(node).await;
        }
        rig
    }

    /// The proxy view of `node`: what the hub ships it, from the topology.
    pub fn view(&self, node: &str) -> ProxyView {
        let resources: BTreeMap<ResourceName, Resource> =
            raven_model::view::node_view(&self.topology, &n(node), true)
                .into_iter()
                .map(|(k, r)| (k, r.clone()))
                .collect();
        ProxyView::from_resources(&n(node), &resources).expect("the node's own resource")
    }

    /// Starts (or restarts) the proxy of `node` (`c1`, `h1`, `s1` or
    /// `lonely`).
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
            cfg.connect_addr = Some(self.egress.addr);
            cfg.connect_tls = Some(self.egress.server.clone());
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

    /// A client of the proxy server's CONNECT socket, trusting the kubelet
    /// CA.
    pub fn client(&self) -> fake_kubelet::ProxyClient {
        fake_kubelet::ProxyClient {
            socket: self.socket.clone(),
            kubelet_port: self.kubelet_port,
            tls: self.client_tls.clone(),
        }
    }

    /// `CONNECT addr` on the proxy socket: the stream, or the refusal's
    /// status line.
    pub async fn connect(&self, addr: &str) -> Result<UnixStream, String> {
        self.client().connect(addr).await
    }

    /// `GET path` on the kubelet of `node`, by name through the proxy, TLS
    /// verified against the kubelet CA.
    pub async fn get(&self, node: &str, path: &str) -> Result<String, String> {
        self.client().get(node, path).await
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
