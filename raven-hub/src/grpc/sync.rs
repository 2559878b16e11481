//! The `Sync` stream: one session per agent, implementing the protocol
//! documented in `proto/raven/v1/sync.proto`.
//!
//! A session computes the node's view of the latest published topology,
//! diffs it against what the agent holds, sends at most one Update at a time,
//! and on every Ack moves the agent's inventory forward. While an Update is in
//! flight, topology changes only mark the session dirty, so a slow agent gets
//! the latest state once, never a backlog.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use raven_core::{NodeName, ResourceName, view};
use raven_proto::v1::{self, sync_request::Message as Req};
use raven_proto::{EncodedSyncResponse, UpdateHeader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Status, Streaming};

use super::error::SyncError;
use super::held::{Held, Key, Tag, tag};
use super::runs::Entry;
use crate::agents::{AgentEntry, AgentHandle, Agents};
use crate::index::IndexHandle;
use crate::metrics::{Metrics, Plan};
use crate::pipeline::{Published, PublishedRx};

/// Tunables of the sync server.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Heartbeat interval; a peer silent for three intervals is gone.
    pub heartbeat: Duration,
    /// How long an agent has to send its Hello.
    pub hello_timeout: Duration,
    /// How long a stream waits for the hub's sources to sync before it is
    /// refused with UNAVAILABLE.
    pub ready_timeout: Duration,
    /// Agent connections (TCP, TLS or not yet) open at once on the mTLS
    /// listener; one over that is closed at once. Capped by the open-files
    /// limit less a headroom (see `grpc::conn`).
    pub max_connections: usize,
    /// A TLS handshake not finished within this is dropped.
    pub tls_handshake_timeout: Duration,
    /// A connection beyond the first `max_tls_handshakes_per_source` queued
    /// from its source that still waits for its TLS handshake turn after
    /// this is closed.
    pub tls_queue_timeout: Duration,
    /// TLS handshakes in progress at once on the mTLS listener; further
    /// connections are accepted and wait in the hub's per-source queues
    /// until one ends (admission before the handshake, see `grpc::conn`).
    pub max_tls_handshakes: usize,
    /// TLS handshakes in progress at once from one source address (an IPv6
    /// /64): one address cannot take every handshake slot.
    pub max_tls_handshakes_per_source: usize,
    /// Connections (queued, handshaking or established) open at once from
    /// one source address (an IPv6 /64); one over is closed at once.
    pub max_connections_per_source: usize,
    /// Streams allowed to be in their initial sync at once (admission).
    pub max_initial_syncs: usize,
    /// Reports a node may send per second (a burst of twice as many is
    /// allowed); faster ones are coalesced: the latest waits its turn.
    pub report_rate: f64,
    /// Largest Report accepted (encoded bytes); a larger one ends the stream.
    pub max_report_bytes: usize,
    /// Longest a stream holds its admission permit: a stream that has not
    /// finished its initial sync by then (no Hello, never ACKs) goes on
    /// without one, so permits always come back.
    pub admission_hold: Duration,
    /// Base of the retry hint for refused streams (jitter is added).
    pub retry_after: Duration,
    /// How long a new stream waits for an initial-sync permit (in turn,
    /// first come first served) before it is refused with the retry hint:
    /// a storm of dials is served back to back on the connections already
    /// made, instead of every refused agent dialling and handshaking again.
    pub admission_wait: Duration,
    /// Snapshot parts are cut at about this many bytes.
    pub max_update_bytes: usize,
    /// HTTP/2 keepalive of agent connections: a PING after this long
    /// without a frame from the agent, and the connection is dropped when it
    /// is not answered within `keepalive_timeout`. This is how the hub notices a
    /// powered-off agent (no FIN, no RST) between application heartbeats.
    pub keepalive: Duration,
    /// How long the hub waits for the answer to a keepalive PING before it
    /// drops the connection. Much longer than a busy second of the hub's own
    /// runtime (thousands of streams updating at once), so load alone never
    /// ends healthy streams (whose redials would add to the load).
    pub keepalive_timeout: Duration,
    /// How long an agent's stream must have been gone before the failure
    /// detector counts it (see `raven_core::liveness`); longer than a
    /// short reconnect.
    pub failover_grace: Duration,
    /// Removals of most of a node's view are marked intentional
    /// (`--confirm-mass-removal`); otherwise the hub holds them back (see
    /// [`is_mass_removal`]).
    pub confirm_mass_removal: bool,
}

/// The agent's mass-removal guard, shared with it
/// ([`raven_core::view::is_mass_removal`]). The hub never marks such a
/// removal intentional unless the operator confirmed it, so a source that
/// lost its inputs cannot empty agents.
pub use raven_core::view::is_mass_removal;

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(15),
            ready_timeout: Duration::from_secs(30),
            max_connections: 20_000,
            tls_handshake_timeout: Duration::from_secs(5),
            tls_queue_timeout: Duration::from_secs(30),
            max_tls_handshakes: 64,
            max_tls_handshakes_per_source: 16,
            max_connections_per_source: 2048,
            max_initial_syncs: 256,
            admission_hold: Duration::from_secs(20),
            report_rate: 4.0,
            max_report_bytes: 256 * 1024,
            retry_after: Duration::from_secs(2),
            admission_wait: Duration::from_secs(5),
            max_update_bytes: 1 << 20,
            keepalive: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(10),
            failover_grace: Duration::from_secs(3),
            confirm_mass_removal: false,
        }
    }
}

/// State shared by every session.
#[derive(Debug, Clone)]
pub struct SyncShared {
    /// Every published state (health, inspection).
    pub published: PublishedRx,
    /// The published states that change what agents receive: what sessions
    /// wait on ([`crate::pipeline::Pipeline::sessions`]).
    pub for_agents: PublishedRx,
    pub index: IndexHandle,
    pub agents: Agents,
    pub metrics: Metrics,
    pub config: SyncConfig,
    pub admission: Arc<Semaphore>,
    pub reports: crate::reports::Reports,
    /// Every session task: the hub's `stop()` ends them (`shutdown`) and
    /// waits for them.
    pub sessions: tokio_util::task::TaskTracker,
    /// Cancelled when the hub shuts down: every session ends UNAVAILABLE.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The live stream of each node: a newer stream from the same node
    /// replaces it, so one node certificate holds at most one stream (and at
    /// most one admission permit).
    live: Arc<std::sync::Mutex<BTreeMap<NodeName, (u64, tokio_util::sync::CancellationToken)>>>,
    /// The per-kind digests resuming agents are checked against.
    sums: super::resume::Sums,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
}

impl SyncShared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        published: PublishedRx,
        for_agents: PublishedRx,
        index: IndexHandle,
        agents: Agents,
        metrics: Metrics,
        config: SyncConfig,
        reports: crate::reports::Reports,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let admission = Arc::new(Semaphore::new(config.max_initial_syncs));
        Self {
            published,
            for_agents,
            index,
            agents,
            metrics,
            config,
            admission,
            reports,
            sessions: tokio_util::task::TaskTracker::new(),
            shutdown,
            live: Arc::default(),
            sums: super::resume::Sums::default(),
            next_stream: Arc::default(),
        }
    }

    /// Registers a new stream of `node`, ending the one it had: returns the
    /// stream's id and the token cancelled when a newer one replaces it.
    pub fn claim_stream(&self, node: &NodeName) -> (u64, tokio_util::sync::CancellationToken) {
        let id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = tokio_util::sync::CancellationToken::new();
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, old)) = live.insert(node.clone(), (id, token.clone())) {
            old.cancel();
        }
        (id, token)
    }

    /// Streams started so far (every Sync stream, admitted or not).
    pub fn streams_started(&self) -> u64 {
        self.next_stream.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets stream `id` of `node`, unless a newer one took its place.
    fn release_stream(&self, node: &NodeName, id: u64) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if live.get(node).is_some_and(|(held, _)| *held == id) {
            live.remove(node);
        }
    }

    /// Admits a new stream or refuses it with RESOURCE_EXHAUSTED and a
    /// jittered retry hint.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, SyncError> {
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.busy())
    }

    /// Admits a new stream as soon as a permit frees, waiting in turn (the
    /// semaphore is first come first served) for at most
    /// `admission_wait`; refuses it with the retry hint after that.
    pub async fn admit_within(&self) -> Result<OwnedSemaphorePermit, SyncError> {
        if let Ok(permit) = self.admission.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(
            self.config.admission_wait,
            self.admission.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.busy()),
        }
    }

    /// RESOURCE_EXHAUSTED with a jittered retry hint, counted.
    fn busy(&self) -> SyncError {
        self.metrics.admission_rejected();
        let base = self.config.retry_after.as_millis() as u64;
        let jitter = rand::random::<u64>() % base.max(1);
        SyncError::Busy {
            retry_after: Duration::from_millis(base + jitter),
        }
    }
}

/// What a session sends its stream's body. Boxed: the channel allocates a
/// block of 32 slots up front, ≈ 1 KB per connected agent with the 32-byte
/// message in each slot, ≈ 0.3 KB with a pointer.
pub type Outbound = mpsc::Sender<Box<Result<EncodedSyncResponse, Status>>>;

/// What a plan sends (in name order: ids, version tags, bytes) and removes.
type Planned = (Vec<Entry>, Vec<ResourceName>);

/// The Update being waited for.
#[derive(Debug)]
struct InFlight {
    nonce: String,
    epoch: String,
    revision: u64,
    /// The resources sent, as interned ids and version tags (the agent
    /// holds them once it ACKs; NACK bookkeeping).
    sent: Vec<(u32, Tag)>,
    /// The names removed (gone from what the agent holds once it ACKs).
    removed: Vec<Key>,
    /// What the agent holds once it ACKs, in the form every session of its
    /// view shares, when this is a fresh agent's whole view in one Update
    /// (see [`Session::plan`]). Boxed: a session's task is kept small.
    whole: Option<Box<Held>>,
    sent_at: tokio::time::Instant,
}

/// One Update waiting to be sent.
#[derive(Debug)]
struct Part {
    header: UpdateHeader,
    /// The resources, in name order.
    entries: Vec<Entry>,
    /// See [`InFlight::whole`].
    whole: Option<Box<Held>>,
    /// `header.removed` as the session holds those names when it planned.
    removed: Vec<Key>,
}

/// Whether `held` holds exactly `sent` (in any order).
fn same_entries(held: &Held, sent: &[(u32, Tag)]) -> bool {
    let mut sent = sent.to_vec();
    sent.sort_unstable();
    held.entries().eq(sent)
}

/// `changed` cut into parts of at most `max` encoded bytes each (a part of
/// one larger resource alone), in order; one empty part when there is
/// nothing (an Update of removals only). Each part is split off the
/// planned entries: mostly there is one, and the entries move, no copy.
fn split_parts(changed: Vec<Entry>, max: usize) -> Vec<Vec<Entry>> {
    let mut cuts = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, e) in changed.iter().enumerate() {
        let len = e.encoded.len();
        if size + len > max && i > start {
            cuts.push(i);
            start = i;
            size = 0;
        }
        size += len;
    }
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    let mut rest = changed;
    for at in cuts.into_iter().rev() {
        parts.push(rest.split_off(at));
    }
    parts.push(rest);
    parts.reverse();
    parts
}

/// One agent's stream.
pub struct Session {
    node: NodeName,
    /// `node/<node>`: a change of it may change which names the view has.
    own: ResourceName,
    shared: Arc<SyncShared>,
    out: Outbound,
    permit: Option<OwnedSemaphorePermit>,
    /// When the admission permit goes back at the latest.
    permit_until: tokio::time::Instant,
    /// This stream's id among the node's ([`SyncShared::claim_stream`]).
    stream_id: u64,
    /// Cancelled when a newer stream of the same node replaces this one.
    replaced: tokio_util::sync::CancellationToken,
    /// The client certificate of this stream: when it expires, the stream
    /// ends.
    cert: crate::certs::Presented,
    /// This node's Report rate.
    report_rate: Rate,
    /// The latest Report that came faster than the rate allows.
    pending_report: Option<Box<v1::Report>>,
    /// What the agent holds (as of its last Ack), compact (see
    /// `grpc::held`).
    held: Held,
    held_epoch: String,
    held_revision: u64,
    /// The revision (of `held_epoch`) whose view `held` is, but for content
    /// the agent refused: known after this session's first ACK. A session
    /// in sync with a revision the published deltas reach back to plans
    /// only the names changed since.
    synced: Option<u64>,
    /// Content the agent refused (id, version tag); never sent again
    /// unchanged.
    nacked: BTreeSet<(u32, Tag)>,
    in_flight: Option<InFlight>,
    /// Snapshot parts still to send after the one in flight.
    queued: Vec<Part>,
    next_nonce: u64,
    heartbeat_seq: u64,
    /// The first Update (answer to the Hello) has been sent.
    answered: bool,
    /// A mass removal the hub is holding back (logged once per set).
    held_back: Vec<ResourceName>,
    /// The agent takes the compact member view ([`takes_compact_view`]).
    compact: bool,
    /// The (epoch, revision) whose view the agent's Hello digest matched:
    /// `held` is that view, and the first Update needs no plan.
    resumed: Option<(String, u64)>,
    /// This node's entry of the agent table, once the stream is in its main
    /// loop: every Ack, Applied and heartbeat updates it without a lookup
    /// or a lock of the whole table.
    agent: Option<AgentHandle>,
}

/// Which form of its view a session's agent receives: the compact member
/// view when its Hello announces `CAPABILITY_COMPACT_MEMBER_VIEW` — then a
/// node that is neither a tunnel candidate nor an active proxy endpoint
/// gets its own gateway and the other domains' `prefixes/` resources, and
/// the same node gets the full view from the revision its role changes
/// ([`raven_core::view::view_class`]). Agents without it get the full
/// view whatever their role.
pub fn takes_compact_view(hello: &v1::Hello) -> bool {
    hello
        .capabilities
        .contains(&(v1::Capability::CompactMemberView as i32))
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        node: NodeName,
        shared: Arc<SyncShared>,
        out: Outbound,
        permit: OwnedSemaphorePermit,
        cert: crate::certs::Presented,
    ) -> Self {
        let (stream_id, replaced) = shared.claim_stream(&node);
        let permit_until = tokio::time::Instant::now() + shared.config.admission_hold;
        let report_rate = Rate::new(shared.config.report_rate, 2.0 * shared.config.report_rate);
        Self {
            own: ResourceName::node(&node),
            node,
            shared,
            out,
            permit: Some(permit),
            permit_until,
            stream_id,
            replaced,
            cert,
            report_rate,
            pending_report: None,
            held: Held::default(),
            held_epoch: String::new(),
            held_revision: 0,
            synced: None,
            nacked: BTreeSet::new(),
            in_flight: None,
            queued: Vec::new(),
            next_nonce: 0,
            heartbeat_seq: 0,
            answered: false,
            held_back: Vec::new(),
            compact: false,
            resumed: None,
            agent: None,
        }
    }

    /// Runs the session to its end; the returned status (if any) ends the
    /// stream. An `async` block that owns its arguments in place: an `async
    /// fn` keeps a second copy of each (the session, the request stream:
    /// ≈ 1 KB per connected agent).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice in the task"
    )]
    pub fn run(
        mut self,
        mut inbound: Streaming<v1::SyncRequest>,
        remote: String,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let node = self.node.clone();
            self.shared.metrics.stream_opened();
            let result = self.serve(&mut inbound, remote).await;
            // A stream replaced by a newer one of the same node (the agent
            // moving to a renewed certificate, make before break) hands the
            // node over: the agent never counts as gone. Otherwise the node has
            // no stream now — even when this one ended before its Hello, after
            // replacing one that had registered.
            if !self.replaced.is_cancelled() && self.shared.agents.disconnected(&node) {
                tracing::info!(node = %node, ended = %result.as_ref().err().map_or_else(|| "closed".to_owned(), |s| format!("{:?}", s.code())), "agent disconnected");
                // A local failover claim and probe verdicts count only while
                // their agent is connected (it re-reports on reconnect); the
                // election they caused stays. The failure detector starts
                // counting the stream's absence now. Not when the hub is
                // stopping: it closes every stream itself, which is not the
                // agent leaving — its claims and verdicts stay, and the
                // pipeline is not woken to compile and persist a revision on
                // the way out.
                if !self.shared.shutdown.is_cancelled() {
                    let closed = tokio::time::Instant::now();
                    self.shared
                        .index
                        .update_if(|i| i.stream_closed(&node, closed));
                }
            }
            self.shared.release_stream(&node, self.stream_id);
            self.shared.metrics.stream_closed();
            if let Err(e) = result {
                let status = Status::from(e);
                if status.code() != tonic::Code::Cancelled {
                    tracing::info!(node = %node, code = ?status.code(), message = status.message(), "sync stream ended");
                }
                let _ = self.out.send(Box::new(Err(status))).await;
            }
        }
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<v1::SyncRequest>,
        remote: String,
    ) -> Result<(), SyncError> {
        // What opening the stream kept (the Hello, the first message read)
        // is gone before the main loop: `open` is its own future.
        let Some((mut published, snapshot)) = self.open(inbound, remote).await? else {
            return Ok(());
        };
        self.main_loop(inbound, &mut published, snapshot).await
    }

    /// Reads and checks the Hello, waits for a ready topology and registers
    /// the agent: the published states to follow and whether the first
    /// Update is a snapshot, or `None` when the stream ended before a Hello.
    async fn open(
        &mut self,
        inbound: &mut Streaming<v1::SyncRequest>,
        remote: String,
    ) -> Result<Option<(PublishedRx, bool)>, SyncError> {
        let replaced = self.replaced.clone();
        let shutdown = self.shared.shutdown.clone();
        let first = tokio::time::timeout(self.shared.config.hello_timeout, inbound.message());
        let expired = self.cert_expiry();
        let first = tokio::select! {
            r = first => r,
            () = tokio::time::sleep_until(expired) => return Err(self.expired()),
            () = replaced.cancelled() => return Err(self.replaced()),
            () = shutdown.cancelled() => return Err(SyncError::ShuttingDown),
        };
        let hello = match first {
            Err(_) => return Err(SyncError::NoHello),
            Ok(Err(s)) => return Err(s.into()),
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(v1::SyncRequest {
                message: Some(Req::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => return Err(SyncError::NotHello),
        };
        if hello.protocol_version != raven_proto::PROTOCOL_VERSION {
            return Err(SyncError::ProtocolVersion {
                got: hello.protocol_version,
                speaks: raven_proto::PROTOCOL_VERSION,
            });
        }
        if !hello.node_name.is_empty() && hello.node_name != self.node.as_str() {
            tracing::warn!(certificate = %self.node, claimed = %hello.node_name, %remote, "agent claimed another node's identity; refused");
            return Err(SyncError::ClaimedIdentity {
                certificate: self.node.clone(),
                claimed: hello.node_name,
            });
        }
        // An agent resuming by digest lists nothing: what it holds is known
        // once the digest is compared with its view (below).
        let digest = if hello
            .capabilities
            .contains(&(v1::Capability::InventoryDigest as i32))
        {
            raven_proto::digest::Digest::from_hello(&hello)?
        } else {
            None
        };
        if digest.is_none() {
            let ids = self.shared.for_agents.borrow().ids.clone();
            self.held = Held::from_hello(&hello, &ids)?;
        }
        self.compact = takes_compact_view(&hello);
        self.held_epoch = hello.epoch.clone();
        self.held_revision = hello.revision;

        let mut published = self.shared.for_agents.clone();
        let ready = tokio::time::timeout(
            self.shared.config.ready_timeout,
            published.wait_for(|p| p.ready),
        );
        let ready = tokio::select! {
            r = ready => r.is_ok_and(|r| r.is_ok()),
            () = shutdown.cancelled() => return Err(SyncError::ShuttingDown),
        };
        if !ready {
            return Err(SyncError::NotReady);
        }
        let mut hello = hello;
        let mut resumed = false;
        if let Some(digest) = digest {
            let current = published.borrow().clone();
            let sums = self.shared.sums.of(&current);
            if sums.view_digest(&current.topology, &self.node, self.compact) == digest {
                // The agent holds exactly this view: nothing to list, and
                // nothing to send but the empty first Update.
                self.held = self
                    .shared
                    .sums
                    .held_view(&current, &self.node, self.compact);
                self.resumed = Some((current.epoch.clone(), current.revision));
                self.shared.metrics.digest_resumed();
                resumed = true;
            } else {
                hello = self.ask_inventory(inbound).await?;
                self.compact = takes_compact_view(&hello);
                self.held = Held::from_hello(&hello, &current.ids)?;
                self.held_epoch = hello.epoch.clone();
                self.held_revision = hello.revision;
            }
        }
        let delta = resumed
            || (hello.capabilities.contains(&(v1::Capability::Delta as i32))
                && hello.cache_complete);
        let snapshot = !delta;
        self.shared.agents.connected(&self.node, &hello, remote);
        let opened = tokio::time::Instant::now();
        self.shared
            .index
            .update_if(|i| i.stream_opened(self.node.clone(), opened));
        tracing::info!(node = %self.node, epoch = %hello.epoch, revision = hello.revision, held = self.held.len(), delta, resumed, cert_serial = %self.cert.serial, cert_expires = %humantime::format_rfc3339_seconds(self.cert.not_after), "agent connected");
        // Not kept for the stream's life (a value in scope lives across
        // every later await): its inventory lists everything the agent
        // holds, ≈ 100 B a resource after a hub restart.
        drop(hello);
        Ok(Some((published, snapshot)))
    }

    /// The agent's digest differs from its view: asks it for the list
    /// (InventoryRequest) and reads the second Hello that carries it,
    /// checked as the first one was.
    async fn ask_inventory(
        &mut self,
        inbound: &mut Streaming<v1::SyncRequest>,
    ) -> Result<v1::Hello, SyncError> {
        self.shared.metrics.inventory_requested();
        self.send(EncodedSyncResponse::from_message(&v1::SyncResponse {
            message: Some(v1::sync_response::Message::InventoryRequest(
                v1::InventoryRequest {},
            )),
        }))
        .await?;
        let (replaced, shutdown) = (self.replaced.clone(), self.shared.shutdown.clone());
        let next = tokio::time::timeout(self.shared.config.hello_timeout, inbound.message());
        let next = tokio::select! {
            r = next => r,
            () = replaced.cancelled() => return Err(self.replaced()),
            () = shutdown.cancelled() => return Err(SyncError::ShuttingDown),
        };
        let hello = match next {
            Err(_) => return Err(SyncError::NoHello),
            Ok(Err(s)) => return Err(s.into()),
            Ok(Ok(None)) => return Err(SyncError::AgentGone),
            Ok(Ok(Some(v1::SyncRequest {
                message: Some(Req::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(SyncError::invalid(
                    "an InventoryRequest must be answered with a Hello listing the resources",
                ));
            }
        };
        if hello.protocol_version != raven_proto::PROTOCOL_VERSION {
            return Err(SyncError::ProtocolVersion {
                got: hello.protocol_version,
                speaks: raven_proto::PROTOCOL_VERSION,
            });
        }
        if !hello.node_name.is_empty() && hello.node_name != self.node.as_str() {
            return Err(SyncError::ClaimedIdentity {
                certificate: self.node.clone(),
                claimed: hello.node_name,
            });
        }
        if !hello.inventory_digest.is_empty() {
            return Err(SyncError::invalid(
                "the Hello answering an InventoryRequest carries a digest again instead of the resource list",
            ));
        }
        Ok(hello)
    }

    async fn main_loop(
        &mut self,
        inbound: &mut Streaming<v1::SyncRequest>,
        published: &mut PublishedRx,
        snapshot: bool,
    ) -> Result<(), SyncError> {
        let hb = self.shared.config.heartbeat;
        let mut heartbeat = raven_cli::pace::Heartbeat::new(hb);
        let mut dirty = true;
        // The futures every turn of the loop waits on are made once: a
        // session turns a few times per change (the publish, its Update, the
        // Ack, the Applied), and remaking them each turn registered and
        // dropped a timer and two waiters per turn, for every session.
        let (replaced, shutdown) = (self.replaced.clone(), self.shared.shutdown.clone());
        let replaced = replaced.cancelled();
        let shutdown = shutdown.cancelled();
        let expiry = tokio::time::sleep_until(self.cert_expiry());
        tokio::pin!(replaced, shutdown, expiry);
        self.agent = Some(self.shared.agents.entry(&self.node));
        loop {
            if dirty && self.in_flight.is_none() {
                let current = published.borrow_and_update().clone();
                self.send_next(&current, snapshot).await?;
                dirty = !self.queued.is_empty();
            }
            tokio::select! {
                () = &mut replaced => return Err(self.replaced()),
                () = &mut shutdown => return Err(SyncError::ShuttingDown),
                () = &mut expiry => return Err(self.expired()),
                () = tokio::time::sleep_until(self.report_rate.next_at()), if self.pending_report.is_some() => {
                    if self.report_rate.take(tokio::time::Instant::now())
                        && let Some(report) = self.pending_report.take()
                    {
                        self.apply_report(*report)?;
                    }
                }
                () = tokio::time::sleep_until(self.permit_until), if self.permit.is_some() => {
                    // Whatever it is doing, the stream gives admission back.
                    self.permit.take();
                }
                msg = inbound.message() => {
                    heartbeat.heard();
                    match msg? {
                        None => return Ok(()),
                        Some(req) => if self.handle(req)? { dirty = true },
                    }
                }
                changed = published.changed() => {
                    if changed.is_err() {
                        return Err(SyncError::ShuttingDown);
                    }
                    dirty = true;
                }
                beat = heartbeat.beat() => {
                    if beat.is_err() {
                        return Err(SyncError::Silent);
                    }
                    self.heartbeat_seq += 1;
                    let beat = v1::Heartbeat {
                        sequence: self.heartbeat_seq,
                        sent_at: Some(std::time::SystemTime::now().into()),
                        interval: prost_types::Duration::try_from(hb).ok(),
                    };
                    self.send(EncodedSyncResponse::heartbeat(beat)).await?;
                }
            }
        }
    }

    /// When (on the runtime's clock) the client certificate expires.
    fn cert_expiry(&self) -> tokio::time::Instant {
        let left = self
            .cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        // Far enough to never fire, not so far that the Instant overflows.
        tokio::time::Instant::now() + left.min(Duration::from_secs(100 * 365 * 86_400))
    }

    /// Ends the stream of a certificate that expired, logged.
    fn expired(&self) -> SyncError {
        let at = humantime::format_rfc3339_seconds(self.cert.not_after).to_string();
        tracing::warn!(node = %self.node, expired = %at, "closing the sync stream: its client certificate expired (a stream does not outlive its credential; the agent must reconnect with a renewed certificate)");
        SyncError::CertificateExpired {
            node: self.node.clone(),
            at,
        }
    }

    fn replaced(&self) -> SyncError {
        SyncError::Replaced(self.node.clone())
    }

    async fn send(&self, msg: EncodedSyncResponse) -> Result<(), SyncError> {
        self.out
            .send(Box::new(Ok(msg)))
            .await
            .map_err(|_| SyncError::AgentGone)
    }

    /// Sends the next Update, if there is anything to send.
    async fn send_next(&mut self, current: &Published, snapshot: bool) -> Result<(), SyncError> {
        if self.queued.is_empty() {
            // Never move an agent back within an epoch: if this replica is
            // behind what the agent holds, wait until it catches up.
            if current.epoch == self.held_epoch && current.revision < self.held_revision {
                return Ok(());
            }
            self.plan(current, snapshot && !self.answered);
        }
        if self.queued.is_empty() {
            return Ok(());
        }
        let Part {
            mut header,
            entries,
            whole,
            removed,
        } = self.queued.remove(0);
        if self.queued.is_empty() {
            // A drained queue keeps no capacity: four parts' room (≈ 0.6 KB)
            // per connected agent otherwise, after its first plan.
            self.queued = Vec::new();
        }
        self.next_nonce += 1;
        header.nonce = format!("{}-{}", current.revision, self.next_nonce);
        // What the Ack is matched against, then the header itself goes into
        // the message (not a copy of it and its removals).
        self.in_flight = Some(InFlight {
            nonce: header.nonce.clone(),
            epoch: header.epoch.clone(),
            revision: header.revision,
            sent: entries.iter().map(|e| (e.id, e.tag)).collect(),
            removed,
            whole,
            sent_at: tokio::time::Instant::now(),
        });
        self.shared.metrics.pushed(entries.len());
        let msg = EncodedSyncResponse::update(header, entries.iter().map(|e| &e.encoded));
        drop(entries);
        self.answered = true;
        self.send(msg).await
    }

    /// Computes the Updates that bring the agent to `current`.
    fn plan(&mut self, current: &Published, full_snapshot: bool) {
        self.held.resolve(&current.ids);
        // Resumed by digest against this very revision: the agent holds
        // the view, so the first Update is empty (no plan of the view).
        if let Some((epoch, revision)) = self.resumed.take()
            && epoch == current.epoch
            && revision == current.revision
            && !self.answered
        {
            self.shared.metrics.planned(Plan::Resumed);
            self.queue(current, false, Vec::new(), Vec::new());
            return;
        }
        let (how, (changed, removed)) = match self.plan_delta(current) {
            Some(Some(planned)) => (Plan::Delta, planned),
            Some(None) => {
                self.shared.metrics.planned(Plan::InSync);
                self.share_view(current);
                return;
            }
            None => (Plan::Full, self.plan_full(current)),
        };
        self.shared.metrics.planned(how);
        let fresh = how == Plan::Full && self.held.is_empty() && self.nacked.is_empty();
        self.queue(current, full_snapshot, changed, removed);
        // A fresh agent sent its whole view in one Update holds, once it
        // ACKs, exactly the view its class shares: it takes that at once,
        // instead of a copy of its own that `share_view` would compare entry
        // by entry and then drop (≈ 10 % of the hub's CPU in a connect
        // storm of 10,000).
        if fresh
            && let [part] = self.queued.as_mut_slice()
            && part.header.removed.is_empty()
        {
            part.whole = self
                .shared
                .sums
                .shared_view(current, &self.node, self.compact)
                .map(Box::new);
        }
    }

    /// In sync with `current`: holds the view in the form every session of
    /// the same view shares ([`Held::share`]) — after its first sync, a
    /// candidate's session held ≈ 3,000 entries (36 KB) of its own, a
    /// member's ≈ 1,000, each the same as its domain's other members'.
    /// Nothing to share while content is refused or a removal held back
    /// (the agent then holds something else than the view).
    fn share_view(&mut self, current: &Published) {
        if !self.held.is_shared()
            && self.nacked.is_empty()
            && self.held_back.is_empty()
            && let Some(view) = self
                .shared
                .sums
                .shared_view(current, &self.node, self.compact)
        {
            self.held.share(view);
        }
    }

    /// What changed for this agent, from the names changed since the
    /// revision its agent is in sync with only ([`Published::changed_since`]):
    /// `Some(None)` when it is in sync with `current` already, `None` when
    /// a full plan is needed (first Update, a revision older than the kept
    /// deltas, a held
    /// back removal, or this node's own resource changed, which may change
    /// which names its view has).
    fn plan_delta(&self, current: &Published) -> Option<Option<Planned>> {
        if !self.answered || !self.held_back.is_empty() || current.epoch != self.held_epoch {
            return None;
        }
        let synced = self.synced?;
        if synced == current.revision {
            return Some(None);
        }
        // Read from the last delta when it alone reaches back (no set is
        // built per session).
        let names = current.changed_names_since(synced)?;
        if names.contains(&self.own) {
            return None;
        }
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        // The node's own view entry, looked up once for every changed name
        // by the name the session keeps (`Topology::node` builds it anew).
        let me = match current.topology.resources.get(&self.own).map(|r| &r.body) {
            Some(raven_core::topology::ResourceBody::Node(me)) => Some(me),
            _ => None,
        };
        for name in names.iter() {
            let id = current.ids.id(name);
            match (current.topology.resources.get(name), id) {
                // In view: sent unless held at this version or refused.
                (Some(r), Some(id))
                    if me.is_some_and(|me| {
                        view::in_view_of(&current.topology, &self.node, me, name, self.compact)
                    }) =>
                {
                    let t = tag(&r.version);
                    if self.held.get(id) != Some(t)
                        && !self.nacked.contains(&(id, t))
                        && let Some(encoded) = current.encoded.get(name)
                    {
                        changed.push(Entry {
                            id,
                            tag: t,
                            encoded: encoded.clone(),
                        });
                    }
                }
                // `Held::contains` with the id already looked up.
                _ if match id {
                    Some(id) => self.held.get(id).is_some(),
                    None => self.held.contains(name, &current.ids),
                } =>
                {
                    removed.push(name.clone());
                }
                _ => {}
            }
        }
        Some(Some((changed, removed)))
    }

    /// What changed for this agent, from its whole view: slices of the
    /// state's runs by kind ([`Published::runs`]), no name looked up.
    fn plan_full(&self, current: &Published) -> Planned {
        let view = current
            .runs()
            .view(&current.topology, &current.ids, &self.node, self.compact);
        // A fresh agent holds nothing to remove: no list of what is wanted.
        let fresh = self.held.is_empty();
        let mut wanted: Vec<u32> = Vec::new();
        let mut changed = Vec::new();
        for e in view.into_iter().flatten() {
            if !fresh {
                wanted.push(e.id);
            }
            if self.held.get(e.id) != Some(e.tag) && !self.nacked.contains(&(e.id, e.tag)) {
                changed.push(e.clone());
            }
        }
        if fresh {
            return (changed, Vec::new());
        }
        wanted.sort_unstable();
        let mut removed: Vec<ResourceName> = self
            .held
            .entries()
            .filter(|(id, _)| wanted.binary_search(id).is_err())
            .filter_map(|(id, _)| current.ids.name(id).cloned())
            .chain(self.held.strays().cloned())
            .collect();
        removed.sort_unstable();
        (changed, removed)
    }

    /// Queues the Updates that send `changed` and `removed`.
    fn queue(
        &mut self,
        current: &Published,
        full_snapshot: bool,
        changed: Vec<Entry>,
        mut removed: Vec<ResourceName>,
    ) {
        let first = !self.answered;
        // A removal of most of the view is intentional only when the
        // operator confirmed it. Unconfirmed, a delta leaves it out (the
        // agent keeps those resources, and nothing is NACKed in a loop); a
        // first snapshot goes out unmarked, so the agent's guard holds it
        // back. Any smaller removal after the first Update was observed by
        // this hub while the agent was in sync with it: a deliberate change.
        // A domain traded for its other form (`gateway/<g>` for
        // `prefixes/<g>` when the node's role changes) is not removed.
        let lost = if removed.is_empty() {
            0
        } else {
            let sent: BTreeSet<&ResourceName> = changed
                .iter()
                .filter_map(|e| current.ids.name(e.id))
                .collect();
            let gone: BTreeSet<&ResourceName> = removed.iter().collect();
            view::lost(&removed, |c| {
                sent.contains(c) || (self.held.contains(c, &current.ids) && !gone.contains(c))
            })
        };
        let mass = is_mass_removal(lost, self.held.len());
        let confirmed = self.shared.config.confirm_mass_removal;
        if mass && !confirmed && !first {
            if self.held_back != removed {
                tracing::warn!(node = %self.node, removing = removed.len(), held = self.held.len(), names = %raven_cli::list(&removed), "holding back a removal of most of this node's view; start the hub with --confirm-mass-removal if it is meant");
                self.held_back.clone_from(&removed);
            }
            removed.clear();
        } else {
            self.held_back.clear();
        }
        let intentional_removal = confirmed || (!first && !mass);
        if !first && changed.is_empty() && removed.is_empty() {
            if self.held_back.is_empty() && current.epoch == self.held_epoch {
                self.synced = Some(current.revision);
            }
            return;
        }
        // The removals and the completion marker ride on the last part.
        let parts = split_parts(changed, self.shared.config.max_update_bytes);
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let last = i + 1 == count;
            let header = UpdateHeader {
                epoch: current.epoch.clone(),
                revision: current.revision,
                nonce: String::new(),
                snapshot: full_snapshot,
                snapshot_complete: full_snapshot && last,
                removed: if last { removed.clone() } else { Vec::new() },
                // Removals at the start of a session (this hub may have
                // restarted with the wrong sources) and mass removals are
                // intended only when confirmed (see above).
                intentional_removal,
            };
            let removed = header
                .removed
                .iter()
                .map(|n| self.held.key(n, &current.ids))
                .collect();
            self.queued.push(Part {
                header,
                entries: part,
                whole: None,
                removed,
            });
        }
    }

    /// Handles one agent message; returns whether a new Update may be due.
    fn handle(&mut self, req: v1::SyncRequest) -> Result<bool, SyncError> {
        let node = &self.node;
        match req.message {
            None => Err(SyncError::invalid("empty message")),
            Some(Req::Hello(_)) => Err(SyncError::invalid("Hello sent twice on one stream")),
            Some(Req::Ack(ack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.nonce == ack.nonce) else {
                    return Err(SyncError::invalid(format_args!(
                        "Ack for unknown nonce {:?}",
                        ack.nonce
                    )));
                };
                self.shared.metrics.acked(f.sent_at.elapsed());
                match f.whole {
                    Some(whole) if self.held.is_empty() => {
                        debug_assert!(
                            same_entries(&whole, &f.sent),
                            "a whole view is what was sent"
                        );
                        self.held = *whole;
                    }
                    _ => self.held.apply(&f.sent, &f.removed),
                }
                if f.epoch != self.held_epoch {
                    self.synced = None;
                }
                // Mostly the same epoch: its buffer is kept, nothing is
                // allocated per Ack.
                self.held_epoch.clone_from(&f.epoch);
                self.held_revision = f.revision;
                if self.queued.is_empty() {
                    self.synced = Some(f.revision);
                }
                self.update_agent(|e| e.acked = Some((f.epoch, f.revision)));
                if self.queued.is_empty() {
                    // Initial sync done: let the next reconnecting agent in.
                    self.permit.take();
                }
                Ok(true)
            }
            Some(Req::Nack(nack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.nonce == nack.nonce) else {
                    return Err(SyncError::invalid(format_args!(
                        "Nack for unknown nonce {:?}",
                        nack.nonce
                    )));
                };
                let detail = nack.error.clone().unwrap_or_default();
                tracing::warn!(node = %node, nonce = %nack.nonce, resource = %detail.resource_name, field = %detail.field, error = %detail.message, "agent rejected an update; it keeps its last good state");
                self.shared.metrics.nacked();
                // Do not send the refused content again unchanged. If the
                // error names a resource, only that one is held back.
                let ids = self.shared.for_agents.borrow().ids.clone();
                let culprit = ResourceName::parse(&detail.resource_name).map(|c| ids.id(&c));
                for (n, v) in f.sent {
                    if culprit.is_none_or(|c| c == Some(n)) {
                        self.nacked.insert((n, v));
                    }
                }
                self.queued.clear();
                self.permit.take();
                self.update_agent(|e| {
                    e.last_nack = Some(Box::new((nack, std::time::SystemTime::now())))
                });
                Ok(true)
            }
            Some(Req::Applied(applied)) => {
                // The deprecated resource list (older agents) is dropped
                // unread: the versions are known from the Ack, and keeping
                // it would cost every agent its whole inventory again.
                let applied = v1::Applied {
                    epoch: applied.epoch,
                    revision: applied.revision,
                    success: applied.success,
                    error: applied.error,
                    summary: applied.summary,
                    ..Default::default()
                };
                self.update_agent(|e| e.applied = Some(applied));
                Ok(false)
            }
            Some(Req::Heartbeat(_)) => {
                self.update_agent(|_| ());
                Ok(false)
            }
            Some(Req::Report(report)) => {
                let size = prost::Message::encoded_len(&report);
                if size > self.shared.config.max_report_bytes {
                    return Err(SyncError::ReportTooLarge {
                        size,
                        limit: self.shared.config.max_report_bytes,
                    });
                }
                // A Report that comes faster than the node's rate waits (the
                // latest one only); it is applied when the rate allows.
                if !self.report_rate.take(tokio::time::Instant::now()) {
                    if self.pending_report.replace(Box::new(report)).is_some() {
                        self.shared.metrics.report_coalesced();
                    }
                    return Ok(false);
                }
                self.apply_report(report)?;
                Ok(false)
            }
        }
    }

    /// Updates this node's entry of the agent table (the agent was seen now).
    fn update_agent(&self, f: impl FnOnce(&mut AgentEntry)) {
        match &self.agent {
            Some(agent) => agent.update(f),
            None => self.shared.agents.update(&self.node, f),
        }
    }

    /// Takes in a Report that passed the size and rate limits.
    fn apply_report(&mut self, report: v1::Report) -> Result<(), SyncError> {
        let node = self.node.clone();
        self.shared.metrics.report_applied();
        {
            {
                let parsed = raven_proto::report_from_proto(&report)?;
                self.update_agent(|e| e.peers = report.peers);
                // Persist what the index keeps (a key another node holds is
                // refused there), so a restarted hub keeps the same owner.
                // The index owns reports; only a change is queued for disk.
                let mut kept = None;
                self.shared.index.update_if(|i| {
                    let changed = i.set_report(node.clone(), parsed);
                    if changed {
                        kept = i.report(&node).cloned();
                    }
                    changed
                });
                if let Some(kept) = kept {
                    self.shared.reports.put(node.clone(), kept);
                }
                Ok(())
            }
        }
    }
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved.
#[derive(Debug)]
struct Rate {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Rate {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second: per_second.max(0.001),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            at: tokio::time::Instant::now(),
        }
    }

    fn refill(&mut self, now: tokio::time::Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
    }

    /// Takes a token if there is one.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there.
    fn next_at(&self) -> tokio::time::Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_proto::EncodedResource;

    /// An entry `id` whose encoding is about `len` bytes.
    fn entry(id: u32, len: usize) -> Entry {
        Entry {
            id,
            tag: u64::from(id),
            encoded: EncodedResource::from_proto(&v1::Resource {
                name: "n".repeat(len),
                ..Default::default()
            }),
        }
    }

    fn ids(parts: &[Vec<Entry>]) -> Vec<Vec<u32>> {
        parts
            .iter()
            .map(|p| p.iter().map(|e| e.id).collect())
            .collect()
    }

    #[test]
    fn updates_are_cut_in_order_at_the_size_limit_and_an_empty_plan_is_one_empty_part() {
        assert_eq!(ids(&split_parts(Vec::new(), 100)), vec![Vec::<u32>::new()]);
        let len = entry(0, 40).encoded.len();
        let changed: Vec<Entry> = (0..7).map(|i| entry(i, 40)).collect();
        // Two entries fit in a part, not three.
        let parts = split_parts(changed, 2 * len + 1);
        assert_eq!(
            ids(&parts),
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]
        );
        // Under the limit: one part, the same entries.
        let changed: Vec<Entry> = (0..7).map(|i| entry(i, 40)).collect();
        assert_eq!(
            ids(&split_parts(changed, 1 << 20)),
            vec![(0..7).collect::<Vec<_>>()]
        );
        // A resource larger than the limit goes alone.
        let changed = vec![entry(0, 10), entry(1, 500), entry(2, 10)];
        assert_eq!(
            ids(&split_parts(changed, 100)),
            vec![vec![0], vec![1], vec![2]]
        );
    }
}
