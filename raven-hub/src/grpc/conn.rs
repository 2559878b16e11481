//! Accepting agent connections within bounds: at most `max` open at once
//! (one file descriptor each), and a TLS handshake that does not finish
//! within its timeout is dropped ([`tls`]). A connection
//! over the bound is closed at once instead of waiting in the backlog, so
//! idle or half-open connections from anyone can never use up the hub's file
//! descriptors: the HTTP endpoint (`/readyz`, `/metrics`) and the loopback
//! inspection listener have their own sockets and keep answering.

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

/// The connections of `listener`, at most `max` open at once; one over that
/// is accepted and closed at once (and counted in `refused`).
pub fn bounded(
    listener: TcpListener,
    max: usize,
    refused: impl Fn() + Send + 'static,
) -> impl Stream<Item = std::io::Result<Bounded>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold(
        (listener, slots, refused),
        |(listener, slots, refused)| async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    // A transient accept error (EMFILE, ECONNABORTED): yield
                    // it; tonic logs it and keeps accepting.
                    Err(e) => return Some((Err(e), (listener, slots, refused))),
                };
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let _ = stream.set_nodelay(true);
                        return Some((
                            Ok(Bounded {
                                stream,
                                _slot: slot,
                            }),
                            (listener, slots, refused),
                        ));
                    }
                    Err(_) => {
                        refused();
                        tracing::debug!(%peer, "connection refused: at the connection limit");
                        drop(stream);
                    }
                }
            }
        },
    )
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

/// The TLS connections of `accepted`: each handshake runs in a task of its
/// own, with the configuration current when the connection came (so a
/// reloaded certificate serves every connection from then on, and a
/// connection keeps the one it was made with), and is dropped when it does
/// not finish within `timeout`. Ends at `shutdown`.
pub fn tls(
    accepted: impl Stream<Item = std::io::Result<Bounded>> + Send + 'static,
    config: super::ServerTls,
    timeout: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<Bounded>>> {
    use futures::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                n = accepted.next() => n,
            };
            let io = match next {
                None => return,
                Some(Err(e)) => {
                    // A transient accept error (EMFILE, ECONNABORTED):
                    // tonic logs it and keeps accepting.
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Ok(io)) => io,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = io.stream.peer_addr().ok();
                match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
