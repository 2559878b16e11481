//! Accepting agent connections within bounds: at most `max` open at once
//! (one file descriptor each), and a TLS handshake that does not finish
//! within its timeout is dropped. A connection over the bound is closed at
//! once instead of waiting in the backlog, so idle or half-open connections
//! from anyone can never use up the hub's file descriptors: the HTTP
//! endpoint (`/readyz`, `/metrics`) and the loopback inspection listener
//! have their own sockets and keep answering.
//!
//! Admission before the handshake ([`tls_incoming`]): the listener takes
//! every connection off the kernel's backlog at once (so a dial storm never
//! overflows it: `net.core.somaxconn` caps it at 4,096 on many systems, and
//! a full backlog drops SYNs, which the dialler retries only after 1, 3, 7 s
//! — the "lost dials" of a 10,000-agent storm), and queues it in the hub,
//! one queue per source address. At most `max_handshakes` TLS handshakes run
//! at once, at most `max_handshakes_per_source` of them from one source, and
//! the sources take turns (round robin): one address holding silent
//! connections delays only its own queue, never another address's
//! handshake. At most `max_connections_per_source` connections (queued,
//! handshaking or established) are open from one source; one over is closed
//! at once, like one over `max_connections`.
//!
//! The hint before TLS is the wait itself: a queued dial is an accepted TCP
//! connection whose TLS handshake completes when its turn comes (neither
//! tonic's nor the agent's connect timeout covers the handshake), so a storm
//! is spread by the queue, never reset. Once through TLS, a stream meets the
//! initial-sync admission, which answers RESOURCE_EXHAUSTED with a retry
//! hint before the expensive part (the snapshot).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
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
    _source: Counted,
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

/// Where a connection comes from, for the per-source bounds: its IPv4
/// address, or the /64 of an IPv6 one (one host commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => Self(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            ))),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Open connections per source.
type OpenCounts = Arc<Mutex<HashMap<Source, usize>>>;

/// One open connection of a source, counted until it closes.
#[derive(Debug)]
struct Counted {
    source: Source,
    open: OpenCounts,
}

impl Counted {
    /// Counts one more connection of `source`, unless it has `max` open.
    fn take(open: &OpenCounts, source: Source, max: usize) -> Option<Self> {
        let mut counts = open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(source).or_default();
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(Self {
            source,
            open: open.clone(),
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Bounds of the mTLS listener's accept path.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once (see [`effective_max`]).
    pub max_connections: usize,
    /// Connections open at once from one [`Source`].
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one [`Source`].
    pub max_handshakes_per_source: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: std::time::Duration,
    /// A connection beyond the first `max_handshakes_per_source` queued
    /// from its source that still waits for its handshake turn after this
    /// is closed: one address cannot park thousands of connections, while a
    /// node's own dial (one per address, or a few behind a NAT) is never
    /// dropped however long a storm takes to drain.
    pub queue_timeout: std::time::Duration,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Connections,
    /// `max_connections_per_source` are open from its source.
    SourceConnections,
}

/// An accepted connection waiting for its handshake turn.
#[derive(Debug)]
struct Waiting {
    stream: TcpStream,
    peer: SocketAddr,
    since: tokio::time::Instant,
    slot: OwnedSemaphorePermit,
    counted: Counted,
}

/// Whose handshake runs next: one FIFO queue per source, the sources in
/// turn (round robin), at most `max` handshakes at once and `per_source`
/// of one source. Invariant: a source is in `ready` exactly when it has a
/// queued connection and fewer than `per_source` handshakes running.
#[derive(Debug)]
struct Turns<T> {
    max: usize,
    per_source: usize,
    queues: HashMap<Source, VecDeque<T>>,
    running: HashMap<Source, usize>,
    ready: VecDeque<Source>,
    running_total: usize,
    queued: usize,
}

impl<T> Turns<T> {
    fn new(max: usize, per_source: usize) -> Self {
        Self {
            max: max.max(1),
            per_source: per_source.max(1),
            queues: HashMap::new(),
            running: HashMap::new(),
            ready: VecDeque::new(),
            running_total: 0,
            queued: 0,
        }
    }

    fn running(&self, source: Source) -> usize {
        self.running.get(&source).copied().unwrap_or(0)
    }

    /// Queues `item` of `source` behind that source's others.
    fn push(&mut self, source: Source, item: T) {
        let running = self.running(source);
        let queue = self.queues.entry(source).or_default();
        if queue.is_empty() && running < self.per_source {
            self.ready.push_back(source);
        }
        queue.push_back(item);
        self.queued += 1;
    }

    /// The next connection whose handshake may start, counted as running.
    fn next(&mut self) -> Option<(Source, T)> {
        if self.running_total >= self.max {
            return None;
        }
        let source = self.ready.pop_front()?;
        let queue = self.queues.get_mut(&source)?;
        let item = queue.pop_front()?;
        let left = !queue.is_empty();
        if !left {
            self.queues.remove(&source);
        }
        self.queued -= 1;
        self.running_total += 1;
        let running = self.running.entry(source).or_default();
        *running += 1;
        if left && *running < self.per_source {
            self.ready.push_back(source);
        }
        Some((source, item))
    }

    /// Drops the queued items `stale` says so of, but never the first
    /// `per_source` of a source (a node dials once; its dial waits its
    /// turn however long a storm takes): how many were dropped.
    fn expire(&mut self, stale: impl Fn(&T) -> bool) -> usize {
        let before = self.queued;
        let keep = self.per_source;
        self.queues.retain(|_, q| {
            let mut position = 0;
            q.retain(|item| {
                let kept = position < keep || !stale(item);
                position += 1;
                kept
            });
            !q.is_empty()
        });
        self.queued = self.queues.values().map(VecDeque::len).sum();
        let queues = &self.queues;
        self.ready.retain(|s| queues.contains_key(s));
        before - self.queued
    }

    /// A handshake of `source` ended.
    fn done(&mut self, source: Source) {
        let Some(running) = self.running.get_mut(&source) else {
            return;
        };
        let was_full = *running >= self.per_source;
        *running -= 1;
        if *running == 0 {
            self.running.remove(&source);
        }
        self.running_total = self.running_total.saturating_sub(1);
        if was_full && self.queues.contains_key(&source) {
            self.ready.push_back(source);
        }
    }
}

/// The TLS connections of `listener`: takes every connection off the
/// backlog at once, closes one over `max_connections` or over its source's
/// `max_connections_per_source` at once (`refused` says which), queues the
/// rest per source and runs their handshakes in turn within the handshake
/// bounds, and yields each connection whose handshake finished in time.
/// Ends when the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: super::ServerTls,
    limits: AcceptLimits,
    refused: impl Fn(Refusal) + Send + 'static,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<Bounded>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = OpenCounts::default();
    tokio::spawn(async move {
        let mut turns =
            Turns::<Waiting>::new(limits.max_handshakes, limits.max_handshakes_per_source);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Source>();
        let mut sweep = tokio::time::interval(std::time::Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some((source, waiting)) = turns.next() {
                // The configuration current now: a reloaded certificate
                // serves every handshake from here on; an open connection
                // keeps its own.
                let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
                let (tx, done) = (tx.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let Waiting {
                        stream,
                        peer,
                        slot,
                        counted,
                        ..
                    } = waiting;
                    let bounded = Bounded {
                        stream,
                        _slot: slot,
                        _source: counted,
                    };
                    let shake =
                        tokio::time::timeout(limits.handshake_timeout, acceptor.accept(bounded))
                            .await;
                    let _ = done.send(source);
                    match shake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            tokio::select! {
                biased;
                () = tx.closed() => return,
                Some(source) = done_rx.recv() => turns.done(source),
                _ = sweep.tick(), if turns.queued > 0 => {
                    let limit = limits.queue_timeout;
                    let expired = turns.expire(|w| w.since.elapsed() > limit);
                    if expired > 0 {
                        tracing::debug!(expired, "closed connections that waited longer than the queue timeout for a TLS handshake");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let source = Source::of(peer.ip());
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            refused(Refusal::Connections);
                            tracing::debug!(%peer, "connection refused: at the connection limit");
                            continue;
                        };
                        let Some(counted) =
                            Counted::take(&open, source, limits.max_connections_per_source)
                        else {
                            refused(Refusal::SourceConnections);
                            tracing::debug!(%peer, %source, "connection refused: its source is at the per-source connection limit");
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        turns.push(source, Waiting { stream, peer, since: tokio::time::Instant::now(), slot, counted });
                    }
                    // A transient accept error (EMFILE, ECONNABORTED): pass
                    // it on (tonic logs it) and keep accepting, after a
                    // breath so a descriptor shortage does not spin.
                    Err(e) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Bytes one stream may queue in the hub beyond what its connection has
/// written to the socket (h2's per-stream send buffer). hyper's default is
/// 400 KB: while thousands of agents decoded their first sync at once, the
/// hub held ≈ 116 KB per tunnel candidate of queued Update pieces (most of
/// the connect storm's heap peak). 64 KB keeps four DATA frames of
/// [`super::wire::PIECE`] ready per stream, enough to fill a connection
/// while the agent reads.
pub const MAX_SEND_BUF: usize = 64 * 1024;

/// The HTTP/2 settings of agent connections.
#[derive(Debug, Clone, Copy)]
pub struct Http2 {
    /// A PING after this long without a frame from the agent.
    pub keepalive: std::time::Duration,
    /// The connection is dropped when a PING is not answered within this.
    pub keepalive_timeout: std::time::Duration,
    /// See [`MAX_SEND_BUF`].
    pub max_send_buf: usize,
}

/// Most bytes one connection's task may take besides the connection it
/// drives (boxed): the cancellation wait and the task's own state. The
/// task is one of the two kept per connected agent (the session's is the
/// other); checked when the hub is built ([`spawn_connection`]).
pub const CONNECTION_TASK_MAX: usize = 256;

/// Spawns one connection's task on `connections`; a task over
/// [`CONNECTION_TASK_MAX`] does not build.
fn spawn_connection<F>(connections: &tokio_util::task::TaskTracker, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    const {
        assert!(
            std::mem::size_of::<F>() <= CONNECTION_TASK_MAX,
            "a connection's task grew over CONNECTION_TASK_MAX: box what it holds"
        );
    }
    connections.spawn(task);
}

/// The connection-level pieces of a request's service, from the
/// connection it came on: its address and client certificates, as tonic's
/// `Request::remote_addr` and `Request::peer_certs` read them.
type Info<IO> = <IO as Connected>::ConnectInfo;

/// Serves every connection of `incoming` over HTTP/2 (hyper's builder
/// directly, so the per-stream send buffer is bounded: see
/// [`MAX_SEND_BUF`]) with `service`, each request carrying its
/// connection's [`Connected::connect_info`] as tonic's server puts it.
/// On `shutdown` it stops taking connections (dropping `incoming`),
/// shuts every connection down gracefully (GOAWAY; open streams finish,
/// as the sessions end theirs) and returns once all have closed.
pub async fn serve_http2<IO, S>(
    incoming: impl Stream<Item = std::io::Result<IO>>,
    service: S,
    settings: Http2,
    shutdown: tokio_util::sync::CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    Info<IO>: Clone + Send + std::marker::Sync + 'static,
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use futures::StreamExt as _;
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(settings.keepalive)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_send_buf_size(settings.max_send_buf)
        // No `date` header on responses: gRPC does not use it, and HPACK
        // would keep it in the connection's header table.
        .auto_date_header(false);
    let connections = tokio_util::task::TaskTracker::new();
    {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let io = tokio::select! {
                () = shutdown.cancelled() => break,
                next = incoming.next() => match next {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "accepting a connection failed");
                        continue;
                    }
                    None => break,
                },
            };
            let info = io.connect_info();
            let service = service.clone();
            let per_request =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(tonic::body::Body::new);
                    req.extensions_mut().insert(info.clone());
                    // tonic's routes are always ready (`poll_ready` is Ready).
                    let mut service = service.clone();
                    tower_service::Service::call(&mut service, req)
                });
            // Boxed: an async block keeps what it captures and what it pins
            // in separate slots, so a connection moved in and pinned there
            // took its ≈ 2.8 KB twice in the task (see [`spawn_connection`]).
            let conn =
                Box::pin(builder.serve_connection(hyper_util::rt::TokioIo::new(io), per_request));
            let stop = shutdown.clone();
            let task = async move {
                let mut conn = conn;
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    () = stop.cancelled() => None,
                };
                let result = match ended {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "a connection ended with an error");
                }
            };
            spawn_connection(&connections, task);
        }
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, last]))
    }

    fn drain<T>(turns: &mut Turns<T>) -> Vec<(Source, T)> {
        std::iter::from_fn(|| turns.next()).collect()
    }

    #[test]
    fn a_source_at_its_handshake_cap_leaves_the_other_slots_to_other_sources() {
        let mut turns = Turns::new(4, 2);
        for i in 0..10 {
            turns.push(src(1), i);
        }
        turns.push(src(2), 100);
        turns.push(src(3), 200);
        let started: Vec<Source> = drain(&mut turns).into_iter().map(|(s, _)| s).collect();
        // The flooding source gets its two; the others theirs, in turn.
        assert_eq!(started, vec![src(1), src(2), src(3), src(1)]);
        assert_eq!(turns.queued, 8);
        assert!(turns.next().is_none(), "all four slots are taken");
        // A slot of another source frees: the flooder is at its cap, so it
        // stays unused until a newcomer (or the flooder's own) can take it.
        turns.done(src(2));
        assert!(turns.next().is_none());
        turns.push(src(4), 300);
        assert_eq!(turns.next(), Some((src(4), 300)));
        // The flooder's own handshake ends: its next connection runs.
        turns.done(src(1));
        assert_eq!(turns.next(), Some((src(1), 2)));
    }

    #[test]
    fn sources_take_turns_and_each_source_keeps_its_order() {
        let mut turns = Turns::new(1, 1);
        for i in 0..3 {
            turns.push(src(1), i);
            turns.push(src(2), 10 + i);
        }
        let mut order = Vec::new();
        while let Some((s, i)) = turns.next() {
            order.push(i);
            turns.done(s);
        }
        assert_eq!(order, vec![0, 10, 1, 11, 2, 12]);
        assert_eq!((turns.queued, turns.running_total), (0, 0));
        assert!(turns.queues.is_empty() && turns.running.is_empty());
    }

    #[test]
    fn only_connections_beyond_their_sources_first_few_expire_and_the_turns_stay_consistent() {
        let mut turns = Turns::new(1, 2);
        turns.push(src(1), 0);
        for i in 1..=4 {
            turns.push(src(2), i);
        }
        turns.push(src(3), 5);
        // Everything is stale: each source keeps its first two.
        assert_eq!(turns.expire(|_| true), 2);
        assert_eq!(turns.queued, 4);
        let mut order = Vec::new();
        while let Some((s, i)) = turns.next() {
            order.push(i);
            turns.done(s);
        }
        assert_eq!(order, vec![0, 1, 5, 2]);
        assert!(turns.queues.is_empty() && turns.ready.is_empty());
    }

    #[test]
    fn an_ipv6_source_is_its_64_and_a_mapped_ipv4_is_the_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("v6");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("v6");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("mapped");
        assert_eq!(Source::of(mapped), Source::of(IpAddr::from([192, 0, 2, 7])));
    }

    #[test]
    fn a_source_holds_at_most_its_cap_of_connections_until_one_closes() {
        let open = OpenCounts::default();
        let a: Vec<Counted> = (0..3)
            .map(|_| Counted::take(&open, src(1), 3).expect("under the cap"))
            .collect();
        assert!(Counted::take(&open, src(1), 3).is_none(), "a fourth");
        let b = Counted::take(&open, src(2), 3).expect("another source is not affected");
        drop(a.into_iter().next());
        assert!(
            Counted::take(&open, src(1), 3).is_some(),
            "one closed, one more may open"
        );
        drop(b);
        assert!(
            !open.lock().expect("lock").contains_key(&src(2)),
            "a source with none open is forgotten"
        );
    }
}

/// The HTTP/2 send-buffer bound, over real sockets: a server that serves
/// connections with [`serve_http2`] streams an endless response to a
/// client that stops reading, and what the server holds for the stream
/// (bytes taken from the response body less bytes written to the socket)
/// is measured once the sockets are full.
#[cfg(test)]
mod send_buffer_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const PIECE: usize = crate::grpc::wire::PIECE;

    /// A server-side connection that counts the bytes written to it.
    struct Counting {
        stream: TcpStream,
        written: Arc<AtomicUsize>,
    }

    impl Connected for Counting {
        type ConnectInfo = TcpConnectInfo;
        fn connect_info(&self) -> TcpConnectInfo {
            self.stream.connect_info()
        }
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.stream).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r {
                self.written.fetch_add(n, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    /// A client-side connection whose reads stop once `paused` is set: an
    /// agent that does not read.
    struct Gate {
        stream: TcpStream,
        paused: Arc<AtomicBool>,
    }

    impl AsyncRead for Gate {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.paused.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Gate {
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
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    /// A response body of endless [`PIECE`]-sized DATA frames, counting
    /// the bytes HTTP/2 took from it.
    struct Endless {
        pulled: Arc<AtomicUsize>,
    }

    impl http_body::Body for Endless {
        type Data = bytes::Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
            self.pulled.fetch_add(PIECE, Ordering::Relaxed);
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
                vec![7u8; PIECE],
            )))))
        }
    }

    #[derive(Clone)]
    struct EndlessService {
        pulled: Arc<AtomicUsize>,
    }

    impl tower_service::Service<http::Request<tonic::body::Body>> for EndlessService {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(tonic::body::Body::new(Endless {
                pulled: self.pulled.clone(),
            }))))
        }
    }

    /// Bytes the server holds for one stream whose client stopped reading,
    /// once nothing moves any more, with `max_send_buf`.
    async fn held_for_a_stalled_stream(max_send_buf: usize) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (written, pulled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let w = written.clone();
        let incoming = futures::stream::unfold(listener, move |l| {
            let w = w.clone();
            async move {
                let r = l
                    .accept()
                    .await
                    .map(|(stream, _)| Counting { stream, written: w });
                Some((r, l))
            }
        });
        let server = tokio::spawn(serve_http2(
            incoming,
            EndlessService {
                pulled: pulled.clone(),
            },
            Http2 {
                keepalive: std::time::Duration::from_secs(60),
                keepalive_timeout: std::time::Duration::from_secs(60),
                max_send_buf,
            },
            shutdown.clone(),
        ));
        let paused = Arc::new(AtomicBool::new(false));
        let stream = TcpStream::connect(addr).await.expect("connect");
        // Windows far larger than the sockets' buffers: only the socket
        // (the agent not reading), never flow control, stops the server.
        let (mut client, connection) = h2::client::Builder::new()
            .initial_window_size(256 << 20)
            .initial_connection_window_size(256 << 20)
            .handshake::<_, bytes::Bytes>(Gate {
                stream,
                paused: paused.clone(),
            })
            .await
            .expect("h2 handshake");
        let client_conn = tokio::spawn(connection);
        let request = http::Request::post(format!("http://{addr}/raven.v1.SyncService/Sync"))
            .body(())
            .expect("request");
        let (response, _send) = client.send_request(request, false).expect("send");
        let response = response.await.expect("response headers");
        assert_eq!(response.status(), http::StatusCode::OK);
        paused.store(true, Ordering::Relaxed);
        // Wait until the sockets are full and the server stopped taking
        // from the body (unchanged over 20 looks in a row).
        let (mut last, mut still) = (0, 0);
        for _ in 0..600 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let now = pulled.load(Ordering::Relaxed);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still >= 20 {
                break;
            }
        }
        assert!(still >= 20, "the server never stopped taking from the body");
        let held = pulled
            .load(Ordering::Relaxed)
            .saturating_sub(written.load(Ordering::Relaxed));
        shutdown.cancel();
        client_conn.abort();
        drop(response);
        server.abort();
        held
    }

    #[tokio::test]
    async fn a_stream_whose_agent_does_not_read_holds_at_most_its_send_buffer() {
        let held = held_for_a_stalled_stream(MAX_SEND_BUF).await;
        // The queue, the piece being taken and the frame being written.
        assert!(
            held <= MAX_SEND_BUF + 3 * PIECE,
            "{held} bytes held for a stalled stream (bound {MAX_SEND_BUF})"
        );
        // The same measure sees hyper's default of 400 KB: the bound is
        // what keeps the queue small.
        let default = held_for_a_stalled_stream(400 * 1024).await;
        assert!(
            default > 300 * 1024,
            "{default} bytes held with hyper's default send buffer"
        );
    }
}
