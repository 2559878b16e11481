//! The hub client: one Sync stream at a time to one of several hub
//! addresses, redialled with exponential backoff and full jitter.
//!
//! Every Update is checked ([`crate::cache::check_update`]), persisted in one
//! durable commit, and only then ACKed; a refused Update is NACKed and the
//! last good state stays. The reconciler learns about new state through a
//! watch channel and reports back what it applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use raven_cli::pace::{Backoff, Contact, Heartbeat, Silent};
use raven_cli::reload::FileStamps;
use raven_model::NodeName;
use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::sync_response::Message as Resp;
use raven_proto::v1::{self, sync_service_client::SyncServiceClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cache::{Cache, CachedState, SnapshotProgress, check_update};

/// Store record holding the hub address that last worked.
const LAST_HUB_RECORD: &str = "edge/last-hub";

/// PEM files of the agent's client identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl ClientTls {
    /// The files of `node` in `dir`, which is, in this order of preference:
    /// the node's bundle as `raven-hub certs` writes it (`ca.pem`,
    /// `node.pem`, `node-key.pem`: what belongs on a node); a `raven-hub
    /// certs` output directory, whose `nodes/<node>/` bundle is used (one
    /// machine running hub and agents); or the flat layout of earlier
    /// versions (`ca.pem`, `node-<node>.pem`, `node-<node>-key.pem`).
    pub fn in_dir(dir: &std::path::Path, node: &NodeName) -> Self {
        use raven_cli::files::bundle;
        let in_bundle = |d: &std::path::Path| Self {
            ca: d.join(bundle::CA),
            cert: d.join(bundle::CERT),
            key: d.join(bundle::KEY),
        };
        let flat = Self {
            ca: dir.join(bundle::CA),
            cert: dir.join(format!("node-{node}.pem")),
            key: dir.join(format!("node-{node}-key.pem")),
        };
        let nested = dir.join("nodes").join(node.as_str());
        if dir.join(bundle::CERT).exists() {
            in_bundle(dir)
        } else if nested.join(bundle::CERT).exists() {
            in_bundle(&nested)
        } else if flat.cert.exists() {
            flat
        } else {
            // Nothing there yet: name the files of a bundle in errors.
            in_bundle(dir)
        }
    }

    /// These files with the given ones in their place: a client
    /// certificate (and its key; without one, the certificate's file holds
    /// both, like the kubelet's combined PEM) and the hub's CA.
    #[must_use]
    pub fn with_files(
        mut self,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
        ca: Option<std::path::PathBuf>,
    ) -> Self {
        if let Some(cert) = cert {
            self.key = key.unwrap_or_else(|| cert.clone());
            self.cert = cert;
        }
        if let Some(ca) = ca {
            self.ca = ca;
        }
        self
    }

    /// The CA's private key, when it lies in `dir`: a node's certificate
    /// directory must not hold it (whoever reads it can issue a
    /// certificate for any node).
    pub fn ca_key_beside(dir: &std::path::Path) -> Option<std::path::PathBuf> {
        Some(dir.join("ca-key.pem")).filter(|p| p.exists())
    }
}

/// How the agent reaches the hub.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub node: NodeName,
    /// `https://host:port` of each hub replica.
    pub hubs: Vec<String>,
    /// Name the hub certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
    pub tls: ClientTls,
    pub heartbeat: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The agent can build IPsec tunnels (`--vpn` allows them): Hello says
    /// so with `CAPABILITY_IPSEC`.
    pub ipsec: bool,
    /// The mTLS configuration kept across sessions (TLS resumption).
    pub sessions: crate::hub_tls::Sessions,
}

/// What the reconciler reports after programming the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedReport {
    pub epoch: String,
    pub revision: u64,
    pub error: Option<String>,
    pub summary: v1::ApplySummary,
}

/// Channels between the client and the rest of the agent.
#[derive(Debug, Clone)]
pub struct Links {
    pub cache: Cache,
    pub state: watch::Sender<Arc<CachedState>>,
    pub applied: watch::Receiver<Option<AppliedReport>>,
    pub report: watch::Receiver<v1::Report>,
    /// Unix milliseconds of the last message from a hub (0: never).
    pub last_contact_ms: Arc<AtomicU64>,
    /// This node's clock minus the hub's in milliseconds, measured at the
    /// hub's last heartbeat (its `sent_at`; one-way latency included);
    /// `None` until one arrived.
    pub hub_clock_offset_ms: Arc<std::sync::Mutex<Option<i64>>>,
    /// A session with a hub is open (set on its first message, cleared
    /// when it ends): a hub that went away counts as unreachable at once,
    /// not only after its heartbeats have been missed.
    pub hub_session: Arc<AtomicBool>,
    /// When a hub last sent anything, on tokio's clock (local failover
    /// asks whether the hub is still there).
    pub hub_contact: Contact,
}

/// Now minus `sent_at`, in milliseconds.
fn clock_offset_ms(sent_at: Option<&prost_types::Timestamp>) -> Option<i64> {
    let sent = std::time::SystemTime::try_from(*sent_at?).ok()?;
    let now = std::time::SystemTime::now();
    Some(match now.duration_since(sent) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    })
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting to {hub}: {source}")]
    Connect {
        hub: String,
        source: tonic::transport::Error,
    },
    #[error("hub {hub}: {status}")]
    Status { hub: String, status: tonic::Status },
    #[error("hub {hub} went silent for {silent:?}")]
    Silent { hub: String, silent: Duration },
    #[error("hub {hub} closed the stream")]
    Closed { hub: String },
    #[error("the local cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("invalid hub address {0:?}")]
    BadAddress(String),
    #[error("reading TLS file {path}: {source}")]
    Tls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the TLS key: {0}")]
    TlsKey(#[from] raven_cli::files::FileError),
    #[error("the TLS identity {cert}: {reason}")]
    TlsConfig {
        cert: std::path::PathBuf,
        reason: String,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the client until `shutdown`.
pub async fn run(cfg: ClientConfig, links: Links, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // Start with the hub that last worked.
    let last = links
        .cache
        .store()
        .get_record(LAST_HUB_RECORD)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b.to_vec()).ok());
    let mut next = last
        .and_then(|l| cfg.hubs.iter().position(|h| *h == l))
        .unwrap_or(0);
    loop {
        if cfg.hubs.is_empty() {
            tracing::warn!("no hub address configured; running from the cache only");
            shutdown.cancelled().await;
            return;
        }
        let hub = cfg.hubs[next % cfg.hubs.len()].clone();
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&cfg, &hub, &links) => r,
        };
        links.hub_session.store(false, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = match &result {
            Err(SessionError::Status { status, .. })
                if status.code() == tonic::Code::ResourceExhausted =>
            {
                let delay = admission_delay(status, cfg.backoff_min);
                tracing::info!(%hub, delay = %format!("{}ms", delay.as_millis()), "hub is admission limiting; retrying later");
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, delay = %format!("{}ms", delay.as_millis()), "hub session ended; the dataplane keeps running from the cache");
                next += 1;
                delay
            }
            Ok(()) => backoff.next_delay(),
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long to wait after a hub refused the stream by admission control:
/// its retry hint plus up to half of it again (jitter), instead of the
/// agent's own (short) backoff, which this does not advance — the hub, not
/// the agent, spreads a reconnect storm.
fn admission_delay(status: &tonic::Status, fallback: Duration) -> Duration {
    let hint = raven_proto::retry_after(status).unwrap_or(fallback);
    hint + hint.mul_f64(rand::random::<f64>() * 0.5)
}

/// A channel to `hub` over the agent's kept mTLS configuration (see
/// [`crate::hub_tls`]): the one built for these `identity` stamps, so a
/// reconnect resumes the TLS session, or a new one when a file changed.
async fn channel(
    cfg: &ClientConfig,
    hub: &str,
    identity: &FileStamps,
) -> Result<Channel, SessionError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| SessionError::Tls {
            path: p.to_owned(),
            source,
        })
    };
    let bad_address = || SessionError::BadAddress(hub.to_owned());
    let uri: tonic::transport::Uri = hub.parse().map_err(|_| bad_address())?;
    let authority = uri.authority().ok_or_else(bad_address)?;
    let addr = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:443", authority.as_str()),
    };
    let server_name = cfg
        .server_name
        .clone()
        .or_else(|| uri.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
        .ok_or_else(bad_address)?;
    let name = rustls::pki_types::ServerName::try_from(server_name).map_err(|_| bad_address())?;
    let config = cfg.sessions.config(identity, || {
        let (key, found) = raven_cli::files::read_private_key(&cfg.tls.key)?;
        if let raven_cli::files::Found::Fixed { was } = found {
            tracing::warn!(
                path = %cfg.tls.key.display(),
                mode = format!("{was:04o}"),
                "the node's TLS private key was readable by group or others; made it 0600 (it may have been read: consider issuing a new one)"
            );
        }
        let (ca, cert) = (read(&cfg.tls.ca)?, read(&cfg.tls.cert)?);
        crate::hub_tls::client_config(&crate::hub_tls::Identity {
            ca: &ca,
            cert: &cert,
            key: &key,
        })
        .map_err(|reason| SessionError::TlsConfig {
            cert: cfg.tls.cert.clone(),
            reason,
        })
    })?;
    let connect_err = |source| SessionError::Connect {
        hub: hub.to_owned(),
        source,
    };
    crate::hub_tls::channel(&cfg.sessions, config, name.to_owned(), addr, cfg.heartbeat)
        .await
        .map_err(connect_err)
}

/// Queues a message for the hub; false when the stream is gone.
async fn send(tx: &mpsc::Sender<v1::SyncRequest>, msg: Req) -> bool {
    tx.send(v1::SyncRequest { message: Some(msg) })
        .await
        .is_ok()
}

/// The capabilities Hello announces.
fn capabilities(ipsec: bool) -> Vec<i32> {
    let mut caps = vec![
        v1::Capability::Delta as i32,
        v1::Capability::WireguardUserspace as i32,
        v1::Capability::LocalFailover as i32,
        v1::Capability::CompactMemberView as i32,
        v1::Capability::InventoryDigest as i32,
    ];
    if ipsec {
        caps.push(v1::Capability::Ipsec as i32);
    }
    caps
}

/// How often the agent checks whether its client certificate (or key, or
/// the hub's CA) changed on disk — the kubelet rotating its certificate, a
/// Secret's `..data` swap — to move its stream to the new one.
pub const ROTATION_CHECK: Duration = Duration::from_secs(2);

/// How long a stream with a rotated certificate may take to open (and
/// bring its first message) before the agent keeps the stream it has.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(10);

/// After a failed move to a rotated certificate, the next try comes this
/// much later (the stream in use carries on meanwhile).
const ROTATION_RETRY: Duration = Duration::from_secs(30);

/// An open stream: where to send, what the hub sends, and the stamps of
/// the identity files it was opened with.
struct Opened {
    tx: mpsc::Sender<v1::SyncRequest>,
    inbound: tonic::Streaming<v1::SyncResponse>,
    identity: FileStamps,
}

fn identity_files(cfg: &ClientConfig) -> Vec<std::path::PathBuf> {
    vec![
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
        cfg.tls.ca.clone(),
    ]
}

/// The stamps of the identity files now, off the runtime (`stat`s).
async fn identity_stamps(cfg: &ClientConfig) -> FileStamps {
    let files = identity_files(cfg);
    tokio::task::spawn_blocking(move || FileStamps::of(&files))
        .await
        .unwrap_or_else(|_| FileStamps::of(&[]))
}

/// Dials `hub` with the identity files as they are now and opens a Sync
/// stream: the Hello carries what the agent holds, so the hub resumes
/// from it.
async fn open(cfg: &ClientConfig, hub: &str, links: &Links) -> Result<Opened, SessionError> {
    // Stamped before they are read: a change while reading shows later.
    let identity = identity_stamps(cfg).await;
    let channel = channel(cfg, hub, &identity).await?;
    let mut client = SyncServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let held = links.state.borrow().clone();
    send(&tx, Req::Hello(hello(cfg, &held, true))).await;
    let inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|status| SessionError::Status {
            hub: hub.to_owned(),
            status,
        })?
        .into_inner();
    tracing::info!(%hub, epoch = %held.epoch, revision = held.revision, held = held.resources.len(), "connected to hub");
    Ok(Opened {
        tx,
        inbound,
        identity,
    })
}

/// The Hello for what the agent holds. `by_digest`: a complete cache is
/// described by its digest alone (`CAPABILITY_INVENTORY_DIGEST`) with
/// `cache_complete` false and no list, so a hub that does not know the
/// digest sends a full snapshot; otherwise (and when the hub asks for the
/// list with an InventoryRequest) every resource is listed.
fn hello(cfg: &ClientConfig, held: &CachedState, by_digest: bool) -> v1::Hello {
    let base = v1::Hello {
        protocol_version: raven_proto::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: capabilities(cfg.ipsec),
        node_name: cfg.node.to_string(),
        epoch: held.epoch.clone(),
        revision: held.revision,
        ..Default::default()
    };
    if by_digest && held.complete {
        return v1::Hello {
            inventory_digest: held.digest().to_bytes(),
            cache_complete: false,
            ..base
        };
    }
    v1::Hello {
        resources: held
            .inventory()
            .iter()
            .map(|(n, v)| v1::ResourceVersion {
                name: n.to_string(),
                version: v.to_string(),
            })
            .collect(),
        cache_complete: held.complete,
        ..base
    }
}

/// Make before break: a new stream with the rotated identity files, open
/// once the hub has answered on it (the hub then ends the old stream: one
/// stream per node). Returns it with that first answer.
async fn reopen(
    cfg: &ClientConfig,
    hub: &str,
    links: &Links,
) -> Result<(Opened, v1::SyncResponse), SessionError> {
    let attempt = async {
        let mut opened = open(cfg, hub, links).await?;
        let first = opened
            .inbound
            .message()
            .await
            .map_err(|status| SessionError::Status {
                hub: hub.to_owned(),
                status,
            })?
            .ok_or_else(|| SessionError::Closed {
                hub: hub.to_owned(),
            })?;
        Ok((opened, first))
    };
    tokio::time::timeout(ROTATION_TIMEOUT, attempt)
        .await
        .map_err(|_| SessionError::Silent {
            hub: hub.to_owned(),
            silent: ROTATION_TIMEOUT,
        })?
}

/// One session with a hub, from dial to its end; it moves to a new stream
/// (make before break) when the identity files change.
async fn session(cfg: &ClientConfig, hub: &str, links: &Links) -> Result<(), SessionError> {
    let mut stream = open(cfg, hub, links).await?;
    // Remember this hub for the next start; a durable write, off the runtime.
    let store = links.cache.store().clone();
    let remembered = hub.to_owned();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.put_records(&[(LAST_HUB_RECORD, remembered.as_bytes())]) {
            tracing::warn!(error = %e, "could not remember the hub address");
        }
    });

    let status_err = |status| SessionError::Status {
        hub: hub.to_owned(),
        status,
    };
    let mut applied = links.applied.clone();
    let mut report = links.report.clone();
    // Send the current report and applied state right away.
    applied.mark_changed();
    report.mark_changed();
    let mut progress = SnapshotProgress::default();
    let mut heartbeat = Heartbeat::new(cfg.heartbeat);
    let mut rotation = tokio::time::interval(ROTATION_CHECK);
    rotation.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotation_after = tokio::time::Instant::now();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            msg = stream.inbound.message() => {
                let Some(msg) = msg.map_err(status_err)? else {
                    return Err(SessionError::Closed { hub: hub.to_owned() });
                };
                heartbeat.heard();
                handle_message(cfg, msg, links, &stream.tx, &mut progress).await?;
            }
            _ = rotation.tick(), if tokio::time::Instant::now() >= rotation_after => {
                let now = identity_stamps(cfg).await;
                if now == stream.identity {
                    continue;
                }
                tracing::info!(%hub, cert = %cfg.tls.cert.display(), "the client certificate files changed; opening a stream with the new certificate before closing this one");
                match reopen(cfg, hub, links).await {
                    Ok((next, first)) => {
                        // The old stream ends here (the hub has already
                        // replaced it); the new one resumes from what the
                        // agent holds, so nothing is sent again and the
                        // dataplane is left alone.
                        stream = next;
                        progress = SnapshotProgress::default();
                        heartbeat.heard();
                        applied.mark_changed();
                        report.mark_changed();
                        tracing::info!(%hub, "moved to the renewed client certificate on a new stream; the old stream is closed");
                        handle_message(cfg, first, links, &stream.tx, &mut progress).await?;
                    }
                    Err(e) => {
                        rotation_after = tokio::time::Instant::now() + ROTATION_RETRY;
                        tracing::warn!(%hub, error = %e, retry = %format!("{}s", ROTATION_RETRY.as_secs()), "could not open a stream with the changed client certificate; the stream in use carries on");
                    }
                }
            }
            changed = applied.changed() => {
                let latest = applied.borrow_and_update().clone();
                if changed.is_ok() && let Some(a) = latest {
                    let error = a.error.map(|message| v1::ErrorDetail { message, ..Default::default() });
                    send(&stream.tx, Req::Applied(v1::Applied {
                        epoch: a.epoch,
                        revision: a.revision,
                        success: error.is_none(),
                        error,
                        summary: Some(a.summary),
                        // The hub knows the versions from the Ack: no
                        // resource list (the field is deprecated).
                        ..Default::default()
                    })).await;
                }
            }
            changed = report.changed() => {
                if changed.is_ok() {
                    let r = report.borrow_and_update().clone();
                    send(&stream.tx, Req::Report(r)).await;
                }
            }
            beat = heartbeat.beat() => {
                if let Err(Silent(silent)) = beat {
                    return Err(SessionError::Silent { hub: hub.to_owned(), silent });
                }
                seq += 1;
                send(&stream.tx, Req::Heartbeat(v1::Heartbeat {
                    sequence: seq,
                    sent_at: Some(SystemTime::now().into()),
                    interval: prost_types::Duration::try_from(cfg.heartbeat).ok(),
                })).await;
            }
        }
    }
}

/// One message from the hub.
async fn handle_message(
    cfg: &ClientConfig,
    msg: v1::SyncResponse,
    links: &Links,
    tx: &mpsc::Sender<v1::SyncRequest>,
    progress: &mut SnapshotProgress,
) -> Result<(), SessionError> {
    links.last_contact_ms.store(now_ms(), Ordering::Relaxed);
    links.hub_contact.heard();
    links.hub_session.store(true, Ordering::Relaxed);
    match msg.message {
        Some(Resp::Update(u)) => handle_update(&u, links, tx, progress).await?,
        Some(Resp::InventoryRequest(_)) => {
            // The hub's view differs from the digest: list what is held.
            // Nothing is dropped; the hub's delta (or snapshot) follows.
            let held = links.state.borrow().clone();
            tracing::info!(
                held = held.resources.len(),
                "the hub asked for the inventory (its view differs from this node's digest); listing it"
            );
            send(tx, Req::Hello(hello(cfg, &held, false))).await;
        }
        Some(Resp::Heartbeat(h)) => {
            if let (Some(offset), Ok(mut slot)) = (
                clock_offset_ms(h.sent_at.as_ref()),
                links.hub_clock_offset_ms.lock(),
            ) {
                *slot = Some(offset);
            }
        }
        None => {}
    }
    Ok(())
}

async fn handle_update(
    u: &v1::Update,
    links: &Links,
    tx: &mpsc::Sender<v1::SyncRequest>,
    progress: &mut SnapshotProgress,
) -> Result<(), SessionError> {
    let nack = |detail: v1::ErrorDetail| {
        Req::Nack(v1::Nack {
            nonce: u.nonce.clone(),
            epoch: u.epoch.clone(),
            revision: u.revision,
            error: Some(detail),
        })
    };
    let decoded = match raven_proto::update_from_proto(u) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "refusing an update; keeping the last good state");
            send(tx, nack(v1::ErrorDetail::from(&e))).await;
            return Ok(());
        }
    };
    let held = links.state.borrow().clone();
    let accepted = match check_update(&held, &decoded, progress) {
        Ok(a) => a,
        Err(refusal) => {
            tracing::warn!(error = %refusal, "refusing an update; keeping the last good state");
            send(tx, nack(refusal.detail())).await;
            return Ok(());
        }
    };
    let cache = links.cache.clone();
    let to_commit = accepted.clone();
    tokio::task::spawn_blocking(move || cache.commit(&to_commit))
        .await
        .map_err(|e| crate::cache::CacheError::BadResource {
            name: "commit".into(),
            reason: e.to_string(),
        })??;
    tracing::info!(epoch = %u.epoch, revision = u.revision, put = accepted.put.len(), removed = accepted.remove.len(), "update persisted");
    send(
        tx,
        Req::Ack(v1::Ack {
            nonce: u.nonce.clone(),
            epoch: u.epoch.clone(),
            revision: u.revision,
        }),
    )
    .await;
    links.state.send_replace(Arc::new(accepted.next));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_announces_ipsec_only_when_the_agent_can_build_it() {
        let ipsec = v1::Capability::Ipsec as i32;
        assert!(capabilities(true).contains(&ipsec));
        assert!(!capabilities(false).contains(&ipsec));
        assert!(capabilities(false).contains(&(v1::Capability::Delta as i32)));
    }

    fn config() -> ClientConfig {
        let node = NodeName::new("edge-1").unwrap_or_else(|_| unreachable!());
        ClientConfig {
            tls: ClientTls::in_dir(std::path::Path::new("/nonexistent"), &node),
            node,
            hubs: Vec::new(),
            server_name: None,
            heartbeat: Duration::from_secs(10),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(2),
            ipsec: false,
            sessions: Default::default(),
        }
    }

    fn cached(complete: bool) -> CachedState {
        use raven_model::{Resource, ResourceBody, ResourceName, fixtures};
        let gw = fixtures::gateway("gw-a");
        CachedState {
            epoch: "e1".into(),
            revision: 7,
            complete,
            resources: std::collections::BTreeMap::from([
                (
                    ResourceName::gateway(&gw.name),
                    Resource::new(ResourceBody::Gateway(gw)),
                ),
                (
                    ResourceName::settings(),
                    Resource::new(ResourceBody::Settings(fixtures::settings())),
                ),
            ]),
        }
    }

    #[test]
    fn a_complete_cache_resumes_by_the_digest_of_its_list_and_claims_no_complete_cache_for_hubs_without_it()
     {
        let cfg = config();
        let held = cached(true);
        let listed = hello(&cfg, &held, false);
        assert_eq!(listed.resources.len(), 2);
        assert!(listed.cache_complete && listed.inventory_digest.is_empty());
        let by_digest = hello(&cfg, &held, true);
        assert!(by_digest.resources.is_empty());
        // A hub that ignores the digest sees an incomplete cache listing
        // nothing: it sends a full snapshot, after which the agent
        // garbage-collects (it drops nothing before).
        assert!(!by_digest.cache_complete);
        assert!(
            by_digest
                .capabilities
                .contains(&(v1::Capability::InventoryDigest as i32))
        );
        // The digest is that of the list the wire would carry.
        let of_list = raven_proto::digest::Digest::of(
            listed
                .resources
                .iter()
                .map(|r| (r.name.as_str(), r.version.as_str())),
        );
        assert_eq!(by_digest.inventory_digest, of_list.to_bytes());
        assert_eq!((by_digest.epoch.as_str(), by_digest.revision), ("e1", 7));
    }

    #[test]
    fn an_incomplete_cache_is_always_listed_never_digested() {
        let h = hello(&config(), &cached(false), true);
        assert_eq!(h.resources.len(), 2);
        assert!(h.inventory_digest.is_empty() && !h.cache_complete);
    }

    #[test]
    fn certs_dir_is_a_node_bundle_a_certs_output_or_the_old_flat_layout() {
        let node = NodeName::new("edge-1").unwrap_or_else(|_| unreachable!());
        let touch = |p: &std::path::Path| {
            std::fs::create_dir_all(p.parent().unwrap_or(p)).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(p, "").unwrap_or_else(|e| panic!("{e}"));
        };
        // A bundle, as copied to the node.
        let bundle = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for f in ["ca.pem", "node.pem", "node-key.pem"] {
            touch(&bundle.path().join(f));
        }
        let tls = ClientTls::in_dir(bundle.path(), &node);
        assert_eq!(tls.key, bundle.path().join("node-key.pem"));
        assert_eq!(ClientTls::ca_key_beside(bundle.path()), None);
        // The output of `raven-hub certs` (hub and agent on one machine).
        let out = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for f in ["ca.pem", "ca-key.pem", "nodes/edge-1/node.pem"] {
            touch(&out.path().join(f));
        }
        let tls = ClientTls::in_dir(out.path(), &node);
        assert_eq!(tls.cert, out.path().join("nodes/edge-1/node.pem"));
        assert_eq!(tls.ca, out.path().join("nodes/edge-1/ca.pem"));
        assert_eq!(
            ClientTls::ca_key_beside(out.path()),
            Some(out.path().join("ca-key.pem"))
        );
        // The flat layout of earlier versions keeps working.
        let flat = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for f in ["ca.pem", "node-edge-1.pem", "node-edge-1-key.pem"] {
            touch(&flat.path().join(f));
        }
        let tls = ClientTls::in_dir(flat.path(), &node);
        assert_eq!(
            tls,
            ClientTls {
                ca: flat.path().join("ca.pem"),
                cert: flat.path().join("node-edge-1.pem"),
                key: flat.path().join("node-edge-1-key.pem"),
            }
        );
    }

    #[test]
    fn the_backoff_has_full_jitter_and_never_exceeds_its_cap() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        assert!(b.next_delay() <= min, "the first redial comes quickly");
        let later: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= max));
        assert!(
            later.iter().any(|d| *d < max / 4),
            "full jitter reaches down towards 0"
        );
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn an_admission_refusal_waits_for_the_hubs_retry_hint_not_the_backoff() {
        let status = raven_proto::resource_exhausted(Duration::from_secs(3));
        for _ in 0..100 {
            let d = admission_delay(&status, Duration::from_millis(250));
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_millis(4500),
                "{d:?}"
            );
        }
        let no_hint = tonic::Status::resource_exhausted("busy");
        assert!(admission_delay(&no_hint, Duration::from_secs(1)) >= Duration::from_secs(1));
    }
}
