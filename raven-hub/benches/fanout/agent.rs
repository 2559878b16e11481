//! A simulated agent: its own TCP + TLS connection and node certificate,
//! speaking Sync as `raven-edge` does — Hello with its inventory (delta,
//! cache complete once it holds a state), Ack of every Update, Applied,
//! a Report (tunnel candidates: a WireGuard key and endpoint), heartbeats —
//! and redialling (with the hub's retry hint) when the stream ends. Each
//! agent dials from its own loopback address (127.1.0.0/16), as each node of
//! a fleet has its own: the hub's per-source bounds see one node per source,
//! and 10,000 dials do not share one address's ephemeral ports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::sync_response::Message as Resp;
use raven_proto::v1::{self, sync_service_client::SyncServiceClient};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{ClientTlsConfig, Endpoint};

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
    pub tls: ClientTlsConfig,
    pub hub: Arc<std::sync::Mutex<String>>,
    /// Send every resource version in Applied (what raven-edge did before
    /// the Applied summary).
    pub applied_with_resources: bool,
    /// Announce `CAPABILITY_COMPACT_MEMBER_VIEW`, as raven-edge does
    /// (`--full-view`: not, as agents did before the compact member view).
    pub compact: bool,
    pub heartbeat: Duration,
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

/// The agent's cache: what it holds, kept across streams.
#[derive(Default)]
struct Cache {
    epoch: String,
    revision: u64,
    held: BTreeMap<String, String>,
    complete: bool,
}

pub async fn run(spec: Spec, events: mpsc::UnboundedSender<Event>, stop: CancellationToken) {
    let mut cache = Cache::default();
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let delay = match session(&spec, &mut cache, &mut seq, &events, &stop).await {
            Ok(()) => Duration::from_millis(100),
            Err(status) => match raven_proto::retry_after(&status) {
                Some(hint) => {
                    let _ = events.send(Event::Refused);
                    hint + Duration::from_millis(
                        rand::random::<u64>() % (hint.as_millis() as u64 / 2 + 1),
                    )
                }
                None => Duration::from_millis(100 + rand::random::<u64>() % 400),
            },
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
    let channel = match Endpoint::from_shared(url)
        .and_then(|e| e.tls_config(spec.tls.clone()))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(20))
                .local_address(Some(spec.source))
        }) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(Event::DialFailed(error_chain(&e)));
                return Ok(());
            }
        },
        Err(e) => return Err(tonic::Status::internal(e.to_string())),
    };
    let mut client = SyncServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<v1::SyncRequest>(16);
    let hello = v1::Hello {
        protocol_version: raven_proto::PROTOCOL_VERSION,
        agent_version: "fanout-bench".into(),
        capabilities: if spec.compact {
            vec![
                v1::Capability::Delta as i32,
                v1::Capability::CompactMemberView as i32,
            ]
        } else {
            vec![v1::Capability::Delta as i32]
        },
        node_name: spec.node.clone(),
        epoch: cache.epoch.clone(),
        revision: cache.revision,
        resources: cache
            .held
            .iter()
            .map(|(n, v)| v1::ResourceVersion {
                name: n.clone(),
                version: v.clone(),
            })
            .collect(),
        cache_complete: cache.complete,
    };
    let send = |m: Req| {
        let tx = tx.clone();
        async move { tx.send(v1::SyncRequest { message: Some(m) }).await.is_ok() }
    };
    send(Req::Hello(hello)).await;
    let mut inbound = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut bytes = 0usize;
    let mut first = true;
    let mut reported = false;
    let mut snapshot: Option<BTreeMap<String, String>> = None;
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
        bytes += msg.encoded_len();
        let Some(Resp::Update(u)) = msg.message else {
            continue;
        };
        // Apply to the cache as the agent's store does.
        if u.snapshot {
            let s = snapshot.get_or_insert_with(BTreeMap::new);
            for r in &u.resources {
                s.insert(r.name.clone(), r.version.clone());
            }
            if u.snapshot_complete
                && let Some(s) = snapshot.take()
            {
                cache.held = s;
                cache.complete = true;
            }
        } else {
            for r in &u.resources {
                cache.held.insert(r.name.clone(), r.version.clone());
            }
            for n in &u.removed {
                cache.held.remove(n);
            }
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
            cache
                .held
                .iter()
                .map(|(n, v)| v1::ResourceVersion {
                    name: n.clone(),
                    version: v.clone(),
                })
                .collect()
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
