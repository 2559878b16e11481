//! raven's layer-7 proxy (`enable-l7-proxy: "true"` in `raven-cfg`): cloud
//! clients — kube-apiserver's egress selector for `kubectl logs/exec/
//! port-forward`, Prometheus for node metrics — reach edge nodes' kubelets
//! and listed ports by node name, over connections the edge opens outward,
//! even when edge domains use the same private addresses.
//!
//! Roles come from the topology the hub ships and nothing else:
//!
//! * an active proxy endpoint of an **exposed** gateway (the cloud) runs
//!   the server ([`server`]): it accepts tunnels on its endpoint's port
//!   (10262) and HTTP CONNECT on a Unix socket and/or loopback TCP;
//! * an active proxy endpoint of an **edge** gateway keeps a tunnel
//!   ([`edge`]) to every cloud proxy server (all replicas) and dials, for
//!   each stream, a node of its own domain.
//!
//! The tunnel is TCP + mTLS with the node certificates of the Sync stream
//! (the server learns the dialling node from its certificate's CN; the
//! edge checks the server's certificate names the elected endpoint), then
//! HTTP/2 with the edge as the HTTP/2 server: one stream per CONNECT,
//! END_STREAM for half-close, per-stream flow control ([`pipe`]).
//!
//! Start it with [`run`], feeding it the node's [`ProxyView`] whenever the
//! cached topology changes; it opens and closes listeners and tunnels as
//! the roles move. Nothing here calls the Kubernetes API: it works while
//! the API server is away, and a restarted agent resumes from its cache.

pub mod connect;
pub mod edge;
pub mod pipe;
pub mod route;
pub mod server;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use raven_model::NodeName;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use route::{ProxyView, Refusal};
pub use tls::{ConnectTls, NodeTls, Tuning};

/// Header of a tunnel stream naming the node to reach.
pub const HEADER_NODE: &str = "x-raven-node";
/// Header of a tunnel stream naming the port to reach.
pub const HEADER_PORT: &str = "x-raven-port";
/// Header of a refused stream's answer: why.
pub const HEADER_REASON: &str = "x-raven-reason";
/// Period of the tunnel's HTTP/2 PINGs; a PING unanswered this long ends
/// the tunnel (and the edge redials).
pub const PING_EVERY: Duration = Duration::from_secs(10);

/// Where the proxy listens, and as whom it speaks.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node: NodeName,
    pub tls: NodeTls,
    /// HTTP CONNECT on a Unix socket (what kube-apiserver v1.20's egress
    /// selector dials without TLS), mode 0600.
    pub connect_socket: Option<PathBuf>,
    /// HTTP CONNECT on TCP: plain (bind it to loopback: it is not
    /// authenticated), or TLS with client certificates when `connect_tls`
    /// is set.
    pub connect_addr: Option<SocketAddr>,
    /// TLS (client certificates required) on `connect_addr`.
    pub connect_tls: Option<ConnectTls>,
    /// Address the tunnel listener binds (the port is the endpoint's).
    pub tunnel_ip: IpAddr,
    /// The tunnel's data path knobs (the defaults are the tuned ones).
    pub tuning: Tuning,
}

impl ProxyConfig {
    pub fn new(node: NodeName, tls: NodeTls) -> Self {
        Self {
            node,
            tls,
            connect_socket: None,
            connect_addr: None,
            connect_tls: None,
            tunnel_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            tuning: Tuning::default(),
        }
    }
}

/// Sends a PING every [`PING_EVERY`]; returns when one goes unanswered.
pub(crate) async fn keepalive(pings: Option<h2::PingPong>) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_EVERY).await;
        match tokio::time::timeout(PING_EVERY, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no PING answer in {PING_EVERY:?}"),
        }
    }
}

struct Running {
    port: u16,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves CONNECT clients from `accept` until `stop`. `accept` yields a
/// handshake (TLS, or none) that runs in the client's own task, so a slow
/// client never holds up the next accept.
async fn serve_connect<S, H, F, Fut>(
    mut accept: F,
    view: watch::Receiver<Option<ProxyView>>,
    tunnels: Arc<server::Tunnels>,
    stop: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<H>>,
    H: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = accept() => c,
        };
        match conn {
            Ok(handshake) => {
                let (view, tunnels) = (view.clone(), tunnels.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(server::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(s)) => server::handle_connect(s, view, tunnels).await,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "CONNECT client's TLS handshake failed")
                        }
                        Err(_) => tracing::info!("CONNECT client's TLS handshake timed out"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a CONNECT client");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Starts the server's listeners: tunnels on `port`, CONNECT as configured.
async fn start_server(
    cfg: &ProxyConfig,
    port: u16,
    view: &watch::Receiver<Option<ProxyView>>,
    stop: &CancellationToken,
) -> Result<Arc<server::Tunnels>, String> {
    let tls = cfg
        .tls
        .server_config(cfg.tuning)
        .map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(cfg.tunnel_ip, port);
    let tunnel_l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the proxy tunnel port {addr}: {e}"))?;
    let tunnels = Arc::new(server::Tunnels::default());
    let connect_tls = match &cfg.connect_tls {
        Some(t) => Some(
            t.server_config()
                .map_err(|e| format!("the CONNECT listener's TLS: {e}"))?,
        ),
        None => None,
    };
    let connect_tcp = match cfg.connect_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("binding the CONNECT address {a}: {e}"))?,
        ),
        None => None,
    };
    let connect_uds = match &cfg.connect_socket {
        Some(p) => {
            // A socket left by an earlier run of this agent.
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p)
                .map_err(|e| format!("binding the CONNECT socket {}: {e}", p.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("chmod 0600 {}: {e}", p.display()))?;
            Some(l)
        }
        None => None,
    };
    tokio::spawn(server::serve_tunnels(
        tunnel_l,
        tls,
        cfg.tuning,
        tunnels.clone(),
        stop.clone(),
    ));
    match (connect_tcp, connect_tls) {
        (Some(l), Some(tls)) => {
            let (l, acceptor) = (Arc::new(l), tokio_rustls::TlsAcceptor::from(tls));
            let accept = move || {
                let (l, acceptor) = (l.clone(), acceptor.clone());
                async move {
                    let (s, _) = l.accept().await?;
                    let _ = s.set_nodelay(true);
                    Ok(acceptor.accept(s))
                }
            };
            tokio::spawn(serve_connect(
                accept,
                view.clone(),
                tunnels.clone(),
                stop.clone(),
            ));
        }
        (Some(l), None) => {
            let l = Arc::new(l);
            let accept = move || {
                let l = l.clone();
                async move {
                    let (s, _) = l.accept().await?;
                    let _ = s.set_nodelay(true);
                    Ok(std::future::ready(Ok(s)))
                }
            };
            tokio::spawn(serve_connect(
                accept,
                view.clone(),
                tunnels.clone(),
                stop.clone(),
            ));
        }
        (None, _) => {}
    }
    if let Some(l) = connect_uds {
        let l = Arc::new(l);
        let accept = move || {
            let l = l.clone();
            async move { l.accept().await.map(|(s, _)| std::future::ready(Ok(s))) }
        };
        tokio::spawn(serve_connect(
            accept,
            view.clone(),
            tunnels.clone(),
            stop.clone(),
        ));
    }
    tracing::info!(%addr, connect_tcp = ?cfg.connect_addr, connect_tls = cfg.connect_tls.is_some(), connect_socket = ?cfg.connect_socket, "proxy server listening");
    Ok(tunnels)
}

/// Runs the proxy roles `views` calls for until `shutdown`.
pub async fn run(
    cfg: ProxyConfig,
    mut views: watch::Receiver<Option<ProxyView>>,
    shutdown: CancellationToken,
) {
    let mut server: Option<Running> = None;
    let mut tunnels: BTreeMap<NodeName, (SocketAddr, Running)> = BTreeMap::new();
    let mut client_tls: Option<Arc<rustls::ClientConfig>> = None;
    loop {
        let view = views.borrow_and_update().clone();
        let want_port = view.as_ref().and_then(ProxyView::server_port);
        let want_servers = view.as_ref().map(ProxyView::servers).unwrap_or_default();
        let mut failed = false;

        if server.as_ref().map(|s| s.port) != want_port {
            server = None;
            if let Some(port) = want_port {
                let stop = shutdown.child_token();
                match start_server(&cfg, port, &views, &stop).await {
                    Ok(_) => server = Some(Running { port, stop }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the proxy server; retrying");
                        failed = true;
                    }
                }
            }
        }

        tunnels.retain(|s, (addr, _)| want_servers.get(s) == Some(addr));
        if want_servers.is_empty() {
            client_tls = None;
        }
        for (s, addr) in &want_servers {
            if tunnels.contains_key(s) {
                continue;
            }
            if client_tls.is_none() {
                match cfg.tls.client_config(cfg.tuning) {
                    Ok(c) => client_tls = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load the proxy tunnel's TLS identity; retrying");
                        failed = true;
                        break;
                    }
                }
            }
            let Some(tls) = client_tls.clone() else { break };
            let stop = shutdown.child_token();
            tracing::info!(server = %s, %addr, "keeping a proxy tunnel");
            tokio::spawn(edge::keep_tunnel(
                s.clone(),
                *addr,
                tls,
                cfg.tuning,
                views.clone(),
                stop.clone(),
            ));
            tunnels.insert(
                s.clone(),
                (
                    *addr,
                    Running {
                        port: addr.port(),
                        stop,
                    },
                ),
            );
        }

        tokio::select! {
            () = shutdown.cancelled() => return,
            r = views.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)), if failed => {}
        }
    }
}
