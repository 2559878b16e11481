//! **Test-only fake Kubernetes API server.** No kube-apiserver can run on
//! these machines, so raven's Kubernetes code is tested against this: plain
//! HTTP/1.1 on 127.0.0.1, speaking the real wire protocol, so an unmodified
//! `kube::Client` (and kube-rs's `watcher`) works against it.
//!
//! ```text
//! kube::Client ──HTTP──▶ route (path → type, namespace, name, subresource)
//!                          ├─ LIST   snapshot at a resourceVersion, limit/continue pages
//!                          ├─ WATCH  history after N ─▶ live events ─▶ BOOKMARKs, 410 when compacted
//!                          └─ GET/POST/PUT/PATCH/DELETE ─▶ commit (one global resourceVersion, like etcd)
//! ```
//!
//! What it models faithfully:
//! - one global, growing `resourceVersion`; a write that changes nothing is
//!   not a write (no new version, no event), as in the API server;
//! - LIST: `resourceVersion` unset (most recent), `0` (any; `limit` ignored,
//!   as the watch cache does), `N` + `resourceVersionMatch=Exact`
//!   (a snapshot rebuilt from history), `limit`/`continue` pages of one
//!   consistent snapshot, `410 Expired` once a continue token's version is
//!   compacted;
//! - WATCH: unset/`0` starts with an `ADDED` per existing object
//!   (`sendInitialEvents=true` adds the `k8s.io/initial-events-end`
//!   bookmark), `N` replays the history after `N`, then live events;
//!   objects entering or leaving a selector are sent as `ADDED`/`DELETED`;
//!   `BOOKMARK`s every [`Options::bookmark_interval`] when
//!   `allowWatchBookmarks=true`; `timeoutSeconds`; a version older than the
//!   retained history gets an `ERROR` event carrying a `Status` with code
//!   410 (`reason: Expired`), which is what makes a watcher relist;
//! - field selectors on `metadata.name`/`metadata.namespace`, equality and
//!   existence label selectors (set-based ones are refused with 400);
//! - the `/status` subresource of Gateways and Nodes: writes there change
//!   only `status`, writes to the main resource keep the stored `status`;
//!   `metadata.generation` of custom resources follows spec changes;
//! - PUT with a stale `metadata.resourceVersion` → 409 Conflict (custom
//!   resources require one); PATCH as JSON merge patch (RFC 7386), JSON
//!   patch (RFC 6902) and — simplified to a merge patch — strategic merge
//!   and server-side apply (JSON bodies; apply needs `fieldManager`);
//! - outages: [`FakeApiServer::stop`] closes the listener and every open
//!   connection, [`FakeApiServer::restart`] listens on the same port with
//!   the same state.
//!
//! Served types: `raven.openyurt.io/v1beta1` gateways, `v1` nodes and
//! configmaps, `coordination.k8s.io/v1` leases. Anything else is a 404, as
//! for a resource the server does not know.

mod http;
mod read;
mod store;
mod write;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

use http::*;
use read::*;
use store::*;
use write::*;

/// Tunables of the fake.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// One HTTP request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

impl RecordedRequest {
    /// A watch request (`watch=true`).
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }

    /// A GET of a collection that is not a watch.
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == "GET" && self.path.ends_with(&format!("/{plural}")) && !self.is_watch()
    }

    /// A watch of a collection.
    pub fn is_watch_of(&self, plural: &str) -> bool {
        self.method == "GET" && self.path.ends_with(&format!("/{plural}")) && self.is_watch()
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }
}

/// One PATCH the fake accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedPatch {
    /// Plural of the patched type.
    pub resource: String,
    /// `name` or `namespace/name`.
    pub key: String,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    pub content_type: String,
    /// The patch document as received.
    pub body: Value,
}

// ---------------------------------------------------------------------------
// The server

/// Accepts connections until aborted; aborting drops (and so aborts) every
/// connection task, which closes every socket, as a dead API server would.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Shared) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    // A connection error only ends this connection.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A running fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Shared,
    server: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on `127.0.0.1:0` with an empty store and default options.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts on `127.0.0.1:0` with an empty store.
    pub async fn start_with(options: Options) -> std::io::Result<Self> {
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            db: Arc::default(),
            events,
            watches: Arc::new(Mutex::new(CancellationToken::new())),
            options,
        };
        let mut me = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shared,
            server: None,
        };
        me.listen()?;
        Ok(me)
    }

    fn listen(&mut self) -> std::io::Result<()> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024)?;
        self.addr = listener.local_addr()?;
        self.server = Some(tokio::spawn(serve(listener, self.shared.clone())));
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// An unmodified `kube::Client` for this server.
    pub fn client(&self) -> kube::Client {
        let url = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("the fake API server URL does not parse: {e}"));
        kube::Client::try_from(kube::Config::new(url))
            .unwrap_or_else(|e| panic!("building a kube client for the fake API server: {e}"))
    }

    /// Creates or replaces an object, status included, under a new
    /// resourceVersion (a write that changes nothing is skipped, as the API
    /// server does). `kind` is a plural (`gateways`) or a kind (`Gateway`).
    /// Returns the stored object.
    pub fn upsert(&self, kind: &str, object: Value) -> Value {
        let ty = resource_type(kind);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("upsert: {kind} without metadata.name: {object}"))
            .to_owned();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| ty.namespaced.then(|| "default".to_owned()));
        let key = key(ns.as_deref(), &name);
        let mut db = self.shared.db();
        let prev = db.current(ty, &key).cloned();
        let object = Shared::normalize(&mut db, ty, ns.as_deref(), object, prev.as_ref());
        self.shared
            .commit(&mut db, ty, &key, Some(object))
            .unwrap_or_default()
    }

    /// Deletes an object by `name` or `namespace/name`; returns it.
    pub fn delete(&self, kind: &str, key: &str) -> Option<Value> {
        let ty = resource_type(kind);
        let mut db = self.shared.db();
        self.shared.commit(&mut db, ty, key, None)
    }

    /// The stored object, if any (`name` or `namespace/name`).
    pub fn get(&self, kind: &str, key: &str) -> Option<Value> {
        self.shared.db().current(resource_type(kind), key).cloned()
    }

    /// The current (highest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.db().rv
    }

    /// Forgets the whole event history, as etcd compaction does: a watch or
    /// a continued list from any version older than the current one gets 410.
    pub fn compact(&self) {
        let mut db = self.shared.db();
        db.compacted = db.rv;
        db.history.clear();
    }

    /// Ends every open watch; the server keeps listening (clients re-watch
    /// from their last version).
    pub fn drop_watches(&self) {
        self.shared.end_watches();
    }

    /// An outage: closes the listener and every open connection.
    pub async fn stop(&mut self) {
        self.shared.end_watches();
        if let Some(server) = self.server.take() {
            server.abort();
            // The listener and every connection are closed once the task is
            // gone; the result is the abort itself.
            let _ = server.await;
        }
    }

    /// Ends an outage: listens again on the same port, with the same state.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let mut last = None;
        for _ in 0..50 {
            match self.listen() {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("could not listen again")))
    }

    /// Whether the server is listening (not stopped).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Every PATCH of a `/status` subresource, in order.
    pub fn status_patches(&self) -> Vec<RecordedPatch> {
        self.shared
            .db()
            .patches
            .iter()
            .filter(|p| p.subresource.as_deref() == Some("status"))
            .cloned()
            .collect()
    }

    /// Every PATCH accepted, in order.
    pub fn patches(&self) -> Vec<RecordedPatch> {
        self.shared.db().patches.clone()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.db().requests.clone()
    }

    /// How many watches were answered with 410 Expired.
    pub fn expired_watches(&self) -> u64 {
        self.shared.db().expired_watches
    }

    /// The resourceVersions of the bookmarks sent to watches of `kind`.
    pub fn bookmarks(&self, kind: &str) -> Vec<u64> {
        let ty = resource_type(kind);
        self.shared
            .db()
            .bookmarks
            .get(ty.plural)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.end_watches();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
