//! Accepting agent connections within bounds: at most `max` open at once
//! (one file descriptor each), and a TLS handshake that does not finish
//! within its timeout is dropped. A connection over the bound is closed at
//! once instead of waiting in the backlog, so idle or half-open connections
//! from anyone can never use up the hub's file descriptors: the HTTP
//! endpoint (`/readyz`, `/metrics`) and the loopback inspection listener
//! have their own sockets and keep answering.
//!
//! Admission before the handshake ([`tls_incoming`]): at most
//! `max_handshakes` TLS handshakes run at once, and the listener accepts
//! the next connection only when one of them ends. Ten thousand agents
//! dialling at once therefore wait in the kernel's listen backlog (sized for
//! thousands, and free for the hub), not as ten thousand concurrent
//! handshakes that starve the runtime's established streams and each other
//! past their timeouts. Once through TLS, a stream still meets the
//! initial-sync admission, which answers RESOURCE_EXHAUSTED with a retry
//! hint.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection holding one of the listener's slots until it
/// closes.
#[derive(Debug)]
pub struct Bounded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Bounded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The soft limit on open files of this process (Linux, from
/// `/proc/self/limits`), if it can be read.
pub fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Descriptors kept free of agent connections: the HTTP endpoint, the
/// loopback listener, the state store, logs.
pub const FD_HEADROOM: usize = 256;

/// `wanted` connections, or fewer when the open-files limit would not leave
/// [`FD_HEADROOM`] descriptors for everything else.
pub fn effective_max(wanted: usize) -> usize {
    match open_files_limit() {
        Some(limit) => wanted.min(limit.saturating_sub(FD_HEADROOM).max(16)),
        None => wanted,
    }
}

/// Bounds of the mTLS listener's accept path.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once (see [`effective_max`]).
    pub max_connections: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: std::time::Duration,
}

/// The TLS connections of `listener`: accepts only while fewer than
/// `max_handshakes` handshakes run (the rest wait in the listen backlog),
/// closes a connection over `max_connections` at once (counted by
/// `refused`), and yields each connection whose handshake finished in time.
/// Ends when the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: super::ServerTls,
    limits: AcceptLimits,
    refused: impl Fn() + Send + 'static,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<Bounded>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = async {
                    // A handshake slot first: only then is a connection
                    // taken off the backlog.
                    let turn = handshakes.clone().acquire_owned().await;
                    (turn, listener.accept().await)
                } => accepted,
            };
            let (turn, (stream, peer)) = match accepted {
                (Ok(turn), Ok(s)) => (turn, s),
                (Err(_), _) => return,
                // A transient accept error (EMFILE, ECONNABORTED): pass it
                // on (tonic logs it) and keep accepting.
                (_, Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused();
                tracing::debug!(%peer, "connection refused: at the connection limit");
                continue;
            };
            let _ = stream.set_nodelay(true);
            // The configuration current now: a reloaded certificate serves
            // every connection from here on; an open one keeps its own.
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let bounded = Bounded {
                    stream,
                    _slot: slot,
                };
                let shake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(bounded)).await;
                drop(turn);
                match shake {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
