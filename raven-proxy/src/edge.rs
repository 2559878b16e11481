//! The edge end: keeps one reverse tunnel open to one cloud proxy server
//! (TCP, then mTLS as this node, then HTTP/2 with this side as the HTTP/2
//! server), redialled with capped, jittered backoff, and serves each stream
//! the server opens by dialling the node it names — only in this node's
//! domain, only on the ports that server's gateway proxies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use raven_cli::pace::{Backoff, Jitter};
use raven_model::NodeName;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pipe::{CONNECTION_WINDOW, MAX_FRAME, pipe};
use crate::route::{ProxyView, Refusal, edge_target};
use crate::{HEADER_NODE, HEADER_PORT, HEADER_REASON};

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// Keeps a tunnel to `server` at `addr` until `shutdown`.
pub async fn keep_tunnel(
    server: NodeName,
    addr: SocketAddr,
    tls: crate::tls::Watched<rustls::ClientConfig>,
    tuning: crate::Tuning,
    view: watch::Receiver<Option<ProxyView>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX).with_jitter(Jitter::Half);
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            // Each dial presents the node's certificate current then.
            r = session(&server, addr, tls.current(), tuning, &view) => r,
        };
        match result {
            Ok(()) => tracing::info!(%server, %addr, "proxy tunnel closed by the server"),
            Err(e) => tracing::info!(%server, %addr, error = %e, "proxy tunnel down"),
        }
        // A tunnel that stayed up a while starts the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(
    server: &NodeName,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    tuning: crate::Tuning,
    view: &watch::Receiver<Option<ProxyView>>,
) -> Result<(), String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // Capacity 1 (0 asked) reads straight through: reads at least as large
    // as the buffer bypass it.
    let tcp = tokio::io::BufReader::with_capacity(tuning.tls_read_buffer.max(1), tcp);
    let name = ServerName::try_from(server.to_string()).map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        DIAL_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_owned())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let mut conn = h2::server::Builder::new()
        .initial_window_size(tuning.stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(tuning.stream_window as usize)
        .max_concurrent_streams(10_000)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tracing::info!(%server, %addr, "proxy tunnel open");
    let pings = conn.ping_pong();
    let accept = async {
        while let Some(next) = conn.accept().await {
            let (req, respond) = next.map_err(|e| e.to_string())?;
            let (view, server) = (view.clone(), server.clone());
            tokio::spawn(serve_stream(req, respond, server, view));
        }
        Ok(())
    };
    tokio::select! {
        r = accept => r,
        e = async {
            match pings {
                Some(p) => crate::keepalive(Some(p)).await,
                None => std::future::pending().await,
            }
        } => Err(e),
    }
}

async fn serve_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    server: NodeName,
    view: watch::Receiver<Option<ProxyView>>,
) {
    match dial(&req, &server, &view).await {
        Ok(tcp) => {
            let resp = http::Response::new(());
            let Ok(send) = respond.send_response(resp, false) else {
                return;
            };
            if let Err(e) = pipe(tcp, send, req.into_body()).await {
                tracing::debug!(%server, error = %e, "proxied stream ended with an error");
            }
        }
        Err(why) => {
            tracing::info!(%server, %why, "proxy stream refused");
            let reason = why.message.replace(['\r', '\n'], " ");
            let resp = http::Response::builder()
                .status(why.status)
                .header(HEADER_REASON, reason)
                .body(());
            if let Ok(resp) = resp {
                let _ = respond.send_response(resp, true);
            }
        }
    }
}

async fn dial(
    req: &http::Request<h2::RecvStream>,
    server: &NodeName,
    view: &watch::Receiver<Option<ProxyView>>,
) -> Result<TcpStream, Refusal> {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Refusal::new(400, format!("the stream carries no {h} header")))
    };
    let node = header(HEADER_NODE)?;
    let port: u16 = header(HEADER_PORT)?
        .parse()
        .map_err(|_| Refusal::new(400, format!("bad {HEADER_PORT}")))?;
    let Some(view) = view.borrow().clone() else {
        return Err(Refusal::new(503, "the edge holds no topology"));
    };
    let addr = edge_target(&view, server, &node, port)?;
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Refusal::new(504, format!("node {node}: dialling {addr} timed out")))?
        .map_err(|e| Refusal::new(502, format!("node {node}: dialling {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}
