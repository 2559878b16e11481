//! A simulated agent: its own TCP + TLS connection and node certificate,
//! speaking Sync as `raven-edge` does — Hello with the digest of its
//! inventory once it holds a complete state (its list when the hub asks
//! with an InventoryRequest, or always with `--hello-with-list`), Ack of every Update, Applied,
//! a Report (tunnel candidates: a WireGuard key and endpoint), heartbeats —
//! and redialling (with the hub's retry hint) when the stream ends. Each
//! agent dials from its own loopback address (127.1.0.0/16), as each node of
//! a fleet has its own: the hub's per-source bounds see one node per source,
//! and 10,000 dials do not share one address's ephemeral ports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use raven_proto::digest::Digest;
use raven_proto::v1;
use raven_proto::v1::sync_request::Message as Req;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::lite::{self, Resp};

/// What one agent needs to run.
#[derive(Clone)]
pub struct Spec {
    pub idx: usize,
    pub node: String,
    /// A tunnel candidate: sends a Report with its key.
    pub candidate: bool,
    pub internal_ip: String,
    /// The local address this agent dials from.
    pub source: std::net::IpAddr,
    /// This agent's TLS client: raven-edge's (`hub_tls::client_config_with`:
    /// its certificate and key, the CA, ALPN `h2`), built once and kept
    /// across redials with its session tickets, as raven-edge keeps it.
    pub tls: Arc<rustls::ClientConfig>,
    pub hub: Arc<std::sync::Mutex<String>>,
    /// Send every resource version in Applied (what raven-edge did before
    /// the Applied summary).
    pub applied_with_resources: bool,
    /// Announce `CAPABILITY_COMPACT_MEMBER_VIEW`, as raven-edge does
    /// (`--full-view`: not, as agents did before the compact member view).
    pub compact: bool,
    /// List the inventory in every Hello (no digest), as agents did before
    /// `CAPABILITY_INVENTORY_DIGEST`.
    pub hello_with_list: bool,
    pub heartbeat: Duration,
    /// Check the decoding mirror against the full `raven.v1` decoding on
    /// this agent's first message of every stream.
    pub check_mirror: bool,
}

/// What the agents tell the benchmark.
#[derive(Debug, Clone)]
pub enum Event {
    /// An Update arrived (and was ACKed at `at`). `bytes`: this stream's
    /// bytes received so far; `first`: the first Update of this stream.
    Update {
        idx: usize,
        at: Instant,
        revision: u64,
        bytes: usize,
        first: bool,
        complete: bool,
    },
    /// The dial or the TLS handshake failed (why).
    DialFailed(String),
    /// The hub refused the stream with a retry hint (admission).
    Refused,
    /// A stream ended after it had been open (why).
    StreamEnded(String),
    /// The hub sent something an agent refuses (what): the bench fails.
    Bad(String),
}

/// `error: cause: cause`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The loopback address agent `idx` dials from: 127.1.0.1, 127.1.0.2, …
/// (250 per third octet; 64,000 in all).
pub fn source(idx: usize) -> std::net::IpAddr {
    let (hi, lo) = (idx / 250, idx % 250);
    std::net::IpAddr::from([127, 1, (hi % 256) as u8, (lo + 1) as u8])
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A distinct, well-formed WireGuard public key for `idx`.
fn key(idx: usize) -> String {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(idx as u64 + 1).to_le_bytes());
    k[31] = 0x42;
    b64(&k)
}

/// Dials the hub as one agent: TCP from the agent's own source address,
/// then the TLS handshake with its kept [`rustls::ClientConfig`] (server
/// name `localhost`, the name in the hub's certificate), ALPN `h2` checked.
#[derive(Clone)]
struct Dial {
    tls: Arc<rustls::ClientConfig>,
    source: std::net::IpAddr,
}

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<tonic::codegen::http::Uri> for Dial {
    type Response = Dialed;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Dialed, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("the hub's URL has no host")?;
            let port = uri.port_u16().ok_or("the hub's URL has no port")?;
            let addr: std::net::SocketAddr = (host.parse::<std::net::IpAddr>()?, port).into();
            let socket = match this.source {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_nodelay(true)?;
            socket.bind((this.source, 0).into())?;
            // The TCP connect times out after 20 s, the handshake does not
            // (tonic's `connect_timeout` on its own channel: an agent in the
            // hub's handshake queue waits its turn).
            let tcp = tokio::time::timeout(Duration::from_secs(20), socket.connect(addr))
                .await
                .map_err(|_| "tcp connect error: timed out after 20 s")?
                .map_err(|e| format!("tcp connect error: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let tls = tokio_rustls::TlsConnector::from(this.tls)
                .connect(name, tcp)
                .await?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("the hub did not negotiate HTTP/2 (ALPN h2)".into());
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Every (name, version) pair the agents of this process have held,
/// interned: each agent keeps 8 bytes per resource (a name id and a pair
/// id) instead of two strings. The 10,000 agents hold the same ~12,000
/// names; as strings they took ≈ 110 bytes per resource (1.3 GB in all,
/// each page of it faulted in and zeroed during the connect storm, CPU the
/// hub under test then did not get). A real agent is its own process and
/// keeps its own cache; the bytes on the wire are the same.
#[derive(Default)]
struct Pairs {
    names: Vec<Box<str>>,
    name_ids: std::collections::HashMap<Box<str>, u32>,
    /// Per pair: its name id, version and [`raven_proto::digest::of_pair`].
    pairs: Vec<(u32, Box<str>, u128)>,
    /// Per name id, the ids of its pairs (a name has few versions).
    by_name: Vec<Vec<u32>>,
}

static PAIRS: std::sync::LazyLock<std::sync::Mutex<Pairs>> =
    std::sync::LazyLock::new(Default::default);

fn pairs() -> std::sync::MutexGuard<'static, Pairs> {
    PAIRS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One interned pair: (name id, pair id, its digest number).
type Pair = (u32, u32, u128);

impl Pairs {
    fn name(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.name_ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.name_ids.insert(name.into(), id);
        self.by_name.push(Vec::new());
        id
    }

    fn pair(&mut self, name: &str, version: &str) -> Pair {
        let n = self.name(name);
        let known = self.by_name[n as usize]
            .iter()
            .copied()
            .find(|&p| &*self.pairs[p as usize].1 == version);
        if let Some(p) = known {
            return (n, p, self.pairs[p as usize].2);
        }
        let number = raven_proto::digest::of_pair(name, version);
        let p = self.pairs.len() as u32;
        self.pairs.push((n, version.into(), number));
        self.by_name[n as usize].push(p);
        (n, p, number)
    }
}

/// The agent's cache: what it holds, kept across streams.
#[derive(Default)]
struct Cache {
    epoch: String,
    revision: u64,
    /// Name id → pair id ([`Pairs`]).
    held: BTreeMap<u32, u32>,
    complete: bool,
    /// The digest of `held`, kept up to date change by change (a Hello
    /// costs no pass over the inventory).
    digest: Digest,
}

impl Cache {
    /// Applies an Update's resources and removals.
    fn apply(&mut self, resources: &[lite::Resource], removed: &[String]) {
        let mut pairs = pairs();
        for r in resources {
            let (n, p, number) = pairs.pair(r.name(), r.version());
            if let Some(old) = self.held.insert(n, p) {
                self.digest.0 = self.digest.0.wrapping_sub(pairs.pairs[old as usize].2);
            }
            self.digest.add_number(number);
        }
        for name in removed {
            let n = pairs.name(name);
            if let Some(old) = self.held.remove(&n) {
                self.digest.0 = self.digest.0.wrapping_sub(pairs.pairs[old as usize].2);
            }
        }
    }

    /// Replaces what is held by a complete snapshot's pairs (a name sent
    /// twice: the later one stands, as in a map).
    fn replace(&mut self, snapshot: Vec<Pair>) {
        self.held = snapshot.into_iter().map(|(n, p, _)| (n, p)).collect();
        let pairs = pairs();
        self.digest = Digest::default();
        for p in self.held.values() {
            self.digest.add_number(pairs.pairs[*p as usize].2);
        }
    }

    /// What is held, as a Hello or an Applied lists it.
    fn listed(&self) -> Vec<v1::ResourceVersion> {
        let pairs = pairs();
        self.held
            .iter()
            .map(|(&n, &p)| v1::ResourceVersion {
                name: pairs.names[n as usize].to_string(),
                version: pairs.pairs[p as usize].1.to_string(),
            })
            .collect()
    }

    /// The Hello for what is held: by digest when the cache is complete
    /// (no list, `cache_complete` false, see `raven_edge::client`), with
    /// the list otherwise or when `list`.
    fn hello(&self, spec: &Spec, list: bool) -> v1::Hello {
        let mut capabilities = vec![v1::Capability::Delta as i32];
        if spec.compact {
            capabilities.push(v1::Capability::CompactMemberView as i32);
        }
        if !spec.hello_with_list {
            capabilities.push(v1::Capability::InventoryDigest as i32);
        }
        let base = v1::Hello {
            protocol_version: raven_proto::PROTOCOL_VERSION,
            agent_version: "fanout-bench".into(),
            capabilities,
            node_name: spec.node.clone(),
            epoch: self.epoch.clone(),
            revision: self.revision,
            ..Default::default()
        };
        if !list && !spec.hello_with_list && self.complete {
            return v1::Hello {
                inventory_digest: self.digest.to_bytes(),
                cache_complete: false,
                ..base
            };
        }
        v1::Hello {
            resources: self.listed(),
            cache_complete: self.complete,
            ..base
        }
    }
}

/// Redials as raven-edge does (`raven_edge::client::run` with its default
/// `--reconnect-min 250ms --reconnect-max 2s`): exponential backoff with
/// full jitter, started over after a stream that lasted a minute; a
/// refusal with a retry hint waits the hint plus up to half of it again and
/// does not advance the backoff.
pub async fn run(spec: Spec, events: mpsc::UnboundedSender<Event>, stop: CancellationToken) {
    let mut cache = Cache::default();
    let mut seq = 0u64;
    let mut backoff =
        raven_cli::pace::Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    while !stop.is_cancelled() {
        let started = Instant::now();
        let result = session(&spec, &mut cache, &mut seq, &events, &stop).await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = match result {
            Err(status) if raven_proto::retry_after(&status).is_some() => {
                let _ = events.send(Event::Refused);
                let hint = raven_proto::retry_after(&status).unwrap_or_default();
                hint + hint.mul_f64(rand::random::<f64>() * 0.5)
            }
            _ => backoff.next_delay(),
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    spec: &Spec,
    cache: &mut Cache,
    seq: &mut u64,
    events: &mpsc::UnboundedSender<Event>,
    stop: &CancellationToken,
) -> Result<(), tonic::Status> {
    let url = spec.hub.lock().map(|h| h.clone()).unwrap_or_default();
    // The channel dials through `Dial` (TCP from this agent's source
    // address, then TLS with the agent's kept config); the requests carry
    // the `https` origin, as tonic's own TLS channel's do.
    let plain = url.replacen("https://", "http://", 1);
    let endpoint = url
        .parse::<tonic::codegen::http::Uri>()
        .map_err(|e| e.to_string())
        .and_then(|origin| {
            Endpoint::from_shared(plain)
                .map(|e| e.origin(origin))
                .map_err(|e| e.to_string())
        });
    let channel = match endpoint {
        Ok(e) => match e
            .connect_with_connector(Dial {
                tls: spec.tls.clone(),
                source: spec.source,
            })
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(Event::DialFailed(error_chain(&e)));
                return Ok(());
            }
        },
        Err(e) => return Err(tonic::Status::internal(e)),
    };
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<v1::SyncRequest>(16);
    let hello = cache.hello(spec, false);
    let send = |m: Req| {
        let tx = tx.clone();
        async move { tx.send(v1::SyncRequest { message: Some(m) }).await.is_ok() }
    };
    send(Req::Hello(hello)).await;
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let mut inbound = client
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/raven.v1.SyncService/Sync"),
            lite::RawCodec,
        )
        .await?
        .into_inner();
    let mut bytes = 0usize;
    let mut first = true;
    let mut reported = false;
    // A snapshot in parts: its (epoch, revision) and what it named so far
    // (made a map once complete: one sort, not an insert per name).
    let mut snapshot: Option<(String, u64, Vec<Pair>)> = None;
    let mut ticker = tokio::time::interval(spec.heartbeat);
    ticker.tick().await;
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                *seq += 1;
                send(Req::Heartbeat(v1::Heartbeat {
                    sequence: *seq,
                    sent_at: Some(std::time::SystemTime::now().into()),
                    interval: prost_types::Duration::try_from(spec.heartbeat).ok(),
                })).await;
                continue;
            }
            m = inbound.message() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                let _ = events.send(Event::StreamEnded("closed by the hub".into()));
                return Ok(());
            }
            Err(s) => {
                if raven_proto::retry_after(&s).is_none() {
                    let _ = events.send(Event::StreamEnded(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )));
                }
                return Err(s);
            }
        };
        bytes += msg.len();
        if spec.check_mirror
            && first
            && let Err(e) = lite::check_mirror(&msg)
        {
            let _ = events.send(Event::Bad(format!("mirror check: {e}")));
        }
        let msg = match lite::SyncResponse::decode(msg) {
            Ok(m) => m,
            Err(e) => {
                let _ = events.send(Event::Bad(format!("undecodable SyncResponse: {e}")));
                return Ok(());
            }
        };
        let u = match msg.message {
            Some(Resp::Update(u)) => u,
            Some(Resp::InventoryRequest(_)) => {
                send(Req::Hello(cache.hello(spec, true))).await;
                continue;
            }
            _ => continue,
        };
        let order =
            if !cache.epoch.is_empty() && u.epoch == cache.epoch && u.revision < cache.revision {
                Err(format!(
                    "revision {} after {} in one epoch (an agent never moves back)",
                    u.revision, cache.revision
                ))
            } else {
                match &snapshot {
                    Some((epoch, revision, _))
                        if u.snapshot && (epoch, *revision) != (&u.epoch, u.revision) =>
                    {
                        Err("the parts of one snapshot have different (epoch, revision)".into())
                    }
                    _ => Ok(()),
                }
            };
        if let Err(e) = order.and_then(|()| lite::check(&u)) {
            let _ = events.send(Event::Bad(format!("{}: {e}", spec.node)));
            return Ok(());
        }
        // Apply to the cache as the agent's store does (names and versions).
        if u.snapshot {
            let (_, _, s) =
                snapshot.get_or_insert_with(|| (u.epoch.clone(), u.revision, Vec::new()));
            {
                let mut pairs = pairs();
                s.extend(
                    u.resources
                        .iter()
                        .map(|r| pairs.pair(r.name(), r.version())),
                );
            }
            if u.snapshot_complete
                && let Some((_, _, s)) = snapshot.take()
            {
                cache.replace(s);
                cache.complete = true;
            }
        } else {
            cache.apply(&u.resources, &u.removed);
            cache.complete = true;
        }
        cache.epoch.clone_from(&u.epoch);
        cache.revision = u.revision;
        send(Req::Ack(v1::Ack {
            nonce: u.nonce.clone(),
            epoch: u.epoch.clone(),
            revision: u.revision,
        }))
        .await;
        let at = Instant::now();
        let _ = events.send(Event::Update {
            idx: spec.idx,
            at,
            revision: u.revision,
            bytes,
            first,
            complete: !u.snapshot || u.snapshot_complete,
        });
        first = false;
        if u.snapshot && !u.snapshot_complete {
            continue;
        }
        let resources = if spec.applied_with_resources {
            cache.listed()
        } else {
            Vec::new()
        };
        #[allow(deprecated)]
        let applied = v1::Applied {
            epoch: u.epoch.clone(),
            revision: u.revision,
            success: true,
            error: None,
            resources,
            summary: Some(v1::ApplySummary::default()),
        };
        send(Req::Applied(applied)).await;
        if spec.candidate && !reported {
            reported = true;
            send(Req::Report(v1::Report {
                wireguard_public_key: Some(key(spec.idx)),
                tunnel_port: Some(4500),
                local_endpoints: vec![format!("{}:4500", spec.internal_ip)],
                ..Default::default()
            }))
            .await;
        }
    }
}
