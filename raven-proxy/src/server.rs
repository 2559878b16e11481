//! The cloud proxy server: accepts the tunnels edge nodes open (mTLS, TCP
//! 10262 by default) and HTTP CONNECT requests from cloud clients (a Unix
//! socket for kube-apiserver's egress selector, loopback TCP for others),
//! and carries each CONNECT over one HTTP/2 stream of the tunnel that
//! reaches its target.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use raven_model::NodeName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::connect::{established, read_connect, refuse};
use crate::pipe::{CONNECTION_WINDOW, MAX_FRAME, pipe};
use crate::route::{CloudRoute, ProxyView, Refusal, cloud_route};
use crate::{HEADER_NODE, HEADER_PORT, HEADER_REASON, tls};

/// How long a client may take to send its CONNECT, and a dial may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// One open tunnel: its id and the handle that opens streams on it.
type Tunnel = (u64, SendRequest<Bytes>);

/// The tunnels open to this server, by the node that opened them (newest
/// last).
#[derive(Debug, Default)]
pub struct Tunnels {
    open: std::sync::Mutex<HashMap<NodeName, Vec<Tunnel>>>,
    next: AtomicU64,
}

impl Tunnels {
    fn add(&self, node: &NodeName, send: SendRequest<Bytes>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.entry(node.clone()).or_default().push((id, send));
        }
        id
    }

    fn remove(&self, node: &NodeName, id: u64) {
        if let Ok(mut open) = self.open.lock()
            && let Some(list) = open.get_mut(node)
        {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                open.remove(node);
            }
        }
    }

    /// The tunnels of `node`, newest first.
    fn of(&self, node: &NodeName) -> Vec<SendRequest<Bytes>> {
        self.open
            .lock()
            .ok()
            .and_then(|o| {
                o.get(node)
                    .map(|l| l.iter().rev().map(|(_, s)| s.clone()).collect())
            })
            .unwrap_or_default()
    }

    /// Nodes with an open tunnel.
    pub fn nodes(&self) -> Vec<NodeName> {
        let mut v: Vec<NodeName> = self
            .open
            .lock()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Accepts tunnels on `listener` until `shutdown`.
pub async fn serve_tunnels(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tuning: tls::Tuning,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a proxy tunnel");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, tunnels, shutdown) = (acceptor.clone(), tunnels.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = tunnel(tcp, acceptor, tuning, &tunnels, shutdown).await {
                tracing::info!(%peer, error = %e, "proxy tunnel ended");
            }
        });
    }
}

async fn tunnel(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    tuning: tls::Tuning,
    tunnels: &Tunnels,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    // Capacity 1 (0 asked) reads straight through: reads at least as large
    // as the buffer bypass it.
    let tcp = tokio::io::BufReader::with_capacity(tuning.tls_read_buffer.max(1), tcp);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no client certificate")?;
    let node = tls::node_identity(der)?;
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(tuning.stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(tuning.stream_window as usize)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {node}: {e}"))?;
    let pings = conn.ping_pong();
    let id = tunnels.add(&node, send);
    tracing::info!(%node, "proxy tunnel open");
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        r = &mut conn => r.map_err(|e| format!("tunnel of {node}: {e}")),
        e = crate::keepalive(pings) => Err(format!("tunnel of {node}: {e}")),
    };
    tunnels.remove(&node, id);
    result
}

/// Serves CONNECT requests from one client connection.
pub async fn handle_connect<IO>(
    mut io: IO,
    view: watch::Receiver<Option<ProxyView>>,
    tunnels: Arc<Tunnels>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_connect(&mut io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(why)) => {
            let _ = refuse(&mut io, &why).await;
            return;
        }
        Err(_) => return,
    };
    match open(&target, &view, &tunnels).await {
        Ok(Opened::Direct(mut tcp)) => {
            if established(&mut io).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut io, &mut tcp).await;
            }
        }
        Ok(Opened::Tunnel(send, recv)) => {
            if established(&mut io).await.is_ok()
                && let Err(e) = pipe(io, send, recv).await
            {
                tracing::debug!(%target, error = %e, "proxied stream ended with an error");
            }
        }
        Err(why) => {
            tracing::info!(%target, %why, "CONNECT refused");
            let _ = refuse(&mut io, &why).await;
        }
    }
}

enum Opened {
    Direct(TcpStream),
    Tunnel(h2::SendStream<Bytes>, h2::RecvStream),
}

async fn open(
    target: &str,
    view: &watch::Receiver<Option<ProxyView>>,
    tunnels: &Tunnels,
) -> Result<Opened, Refusal> {
    let Some(view) = view.borrow().clone() else {
        return Err(Refusal::new(503, "this proxy holds no topology yet"));
    };
    match cloud_route(&view, target)? {
        CloudRoute::Direct(addr) => {
            let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| Refusal::new(504, format!("dialling {addr} timed out")))?
                .map_err(|e| Refusal::new(502, format!("dialling {addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            Ok(Opened::Direct(tcp))
        }
        CloudRoute::Tunnel { node, port, via } => {
            let mut last = None;
            for v in &via {
                for send in tunnels.of(v) {
                    match stream(send, &node, port).await {
                        Ok(o) => return Ok(o),
                        // The edge refused: its answer stands.
                        Err(Some(why)) => return Err(why),
                        Err(None) => last = Some(v.clone()),
                    }
                }
            }
            Err(Refusal::new(
                502,
                match last {
                    Some(v) => format!("the tunnels from {v} to node {node} failed"),
                    None => format!(
                        "no tunnel to node {node} is open (its proxy endpoints: {})",
                        via.iter()
                            .map(NodeName::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            ))
        }
    }
}

/// Opens one stream to `node`:`port` on a tunnel. `Err(None)`: the tunnel
/// failed (try another); `Err(Some)`: the edge refused.
async fn stream(
    send: SendRequest<Bytes>,
    node: &NodeName,
    port: u16,
) -> Result<Opened, Option<Refusal>> {
    let mut send = tokio::time::timeout(DIAL_TIMEOUT, send.ready())
        .await
        .map_err(|_| None)?
        .map_err(|_| None)?;
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("https://raven-proxy/connect")
        .header(HEADER_NODE, node.as_str())
        .header(HEADER_PORT, port.to_string())
        .body(())
        .map_err(|_| None)?;
    let (resp, body) = send.send_request(req, false).map_err(|_| None)?;
    // The edge answers after its dial, which has its own timeout.
    let resp = tokio::time::timeout(DIAL_TIMEOUT * 2, resp)
        .await
        .map_err(|_| {
            Some(Refusal::new(
                504,
                format!("node {node} did not answer in time"),
            ))
        })?
        .map_err(|_| None)?;
    if resp.status() != http::StatusCode::OK {
        let reason = resp
            .headers()
            .get(HEADER_REASON)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("refused by the edge")
            .to_owned();
        return Err(Some(Refusal::new(resp.status().as_u16(), reason)));
    }
    Ok(Opened::Tunnel(body, resp.into_body()))
}
