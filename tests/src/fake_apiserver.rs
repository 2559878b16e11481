//! **Test-only fake Kubernetes API server.** No kube-apiserver can run on
//! these machines, so raven's Kubernetes code is tested against this: plain
//! HTTP on 127.0.0.1, speaking the real wire protocol so an unmodified
//! `kube::Client` works against it.
//!
//! - LIST with `metadata.resourceVersion`, `fieldSelector=metadata.name=…`;
//! - WATCH (`watch=true`) from a `resourceVersion`, streaming newline-
//!   delimited `ADDED`/`MODIFIED`/`DELETED` events, `BOOKMARK`s when asked
//!   (`allowWatchBookmarks=true`), and an `ERROR` event with a 410 `Status`
//!   when the version was compacted away;
//! - one global, growing resourceVersion like etcd's;
//! - status PATCH (merge) of Gateways, Lease GET/POST/PUT with 409 on a
//!   stale resourceVersion;
//! - outages: `stop()` closes the listener and every watch, `restart()`
//!   listens again on the same port with the same state.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The kinds the fake serves: (plural, apiVersion, kind, namespaced).
const KINDS: [(&str, &str, &str); 4] = [
    ("gateways", "raven.openyurt.io/v1beta1", "Gateway"),
    ("nodes", "v1", "Node"),
    ("configmaps", "v1", "ConfigMap"),
    ("leases", "coordination.k8s.io/v1", "Lease"),
];

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    KINDS
        .iter()
        .find(|(p, _, _)| *p == plural)
        .map(|(_, v, k)| (*v, *k))
        .unwrap_or(("v1", "Unknown"))
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    plural: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Db {
    rv: u64,
    /// plural → key (namespace/name) → object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    history: Vec<Event>,
    /// Events up to this version are gone: a watch from an older version gets 410.
    compacted: u64,
    /// Watches answered with 410 Gone.
    expired_watches: u64,
    patches: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
struct Shared {
    db: Arc<Mutex<Db>>,
    events: broadcast::Sender<Event>,
    /// Cancelled on `stop()`: ends every open watch.
    generation: Arc<Mutex<CancellationToken>>,
}

impl Shared {
    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stores `object` under a new resourceVersion and records the event.
    fn write(&self, plural: &str, mut object: Value) -> Value {
        let mut db = self.db();
        db.rv += 1;
        let rv = db.rv;
        let key = key_of(&object);
        let existed = db.objects.get(plural).is_some_and(|m| m.contains_key(&key));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{plural}-{key}"));
        }
        db.objects
            .entry(plural.to_owned())
            .or_default()
            .insert(key, object.clone());
        let ev = Event {
            rv,
            plural: plural.to_owned(),
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object: object.clone(),
        };
        db.history.push(ev.clone());
        let _ = self.events.send(ev);
        object
    }

    fn remove(&self, plural: &str, key: &str) {
        let mut db = self.db();
        let Some(mut object) = db.objects.get_mut(plural).and_then(|m| m.remove(key)) else {
            return;
        };
        db.rv += 1;
        let rv = db.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event {
            rv,
            plural: plural.to_owned(),
            kind: "DELETED",
            object,
        };
        db.history.push(ev.clone());
        let _ = self.events.send(ev);
    }
}

fn key_of(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn matches_selector(object: &Value, ns: Option<&str>, field_selector: Option<&str>) -> bool {
    if let Some(ns) = ns
        && object["metadata"]["namespace"].as_str() != Some(ns)
    {
        return false;
    }
    match field_selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

async fn list_or_watch(
    shared: Shared,
    plural: String,
    ns: Option<String>,
    q: HashMap<String, String>,
) -> Response {
    let field_selector = q.get("fieldSelector").cloned();
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let (api_version, kind) = kind_of(&plural);
    if !watch {
        let db = shared.db();
        let items: Vec<Value> = db
            .objects
            .get(&plural)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches_selector(o, ns.as_deref(), field_selector.as_deref()))
            .cloned()
            .collect();
        let body = json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": db.rv.to_string()}, "items": items});
        return axum::Json(body).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let mut rx = shared.events.subscribe();
    let (backlog, expired, current) = {
        let mut db = shared.db();
        let expired = from != 0 && from < db.compacted;
        if expired {
            db.expired_watches += 1;
        }
        let backlog: Vec<Event> = db
            .history
            .iter()
            .filter(|e| e.rv > from && e.plural == plural)
            .cloned()
            .collect();
        (backlog, expired, db.rv)
    };
    let token = shared.token();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    tokio::spawn(async move {
        if expired {
            let err = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({current})"), "reason": "Expired", "code": 410}});
            let _ = tx.send(line(err)).await;
            return;
        }
        let selected = |e: &Event| {
            e.plural == plural
                && matches_selector(&e.object, ns.as_deref(), field_selector.as_deref())
        };
        let mut last = from;
        for e in backlog.into_iter().filter(|e| selected(e)) {
            last = last.max(e.rv);
            if tx
                .send(line(json!({"type": e.kind, "object": e.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = &mut deadline => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = current.max(last);
                    let bm = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bm)).await.is_err() { return; }
                }
                ev = rx.recv() => match ev {
                    Ok(e) if e.rv > last && selected(&e) => {
                        last = e.rv;
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(body_rx),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn cluster_list(
    State(s): State<Shared>,
    Path(plural): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list_or_watch(s, plural, None, q).await
}

async fn raven_list(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    list_or_watch(s, "gateways".into(), None, q).await
}

async fn ns_list(
    State(s): State<Shared>,
    Path((ns, plural)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list_or_watch(s, plural, Some(ns), q).await
}

async fn patch_status(State(s): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch is not JSON");
    };
    let current = s
        .db()
        .objects
        .get("gateways")
        .and_then(|m| m.get(&name))
        .cloned();
    let Some(mut object) = current else {
        return status(404, "NotFound", &format!("gateways \"{name}\" not found"));
    };
    object["status"] = patch["status"].clone();
    s.db().patches.push((name, patch));
    axum::Json(s.write("gateways", object)).into_response()
}

async fn get_gateway(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    match s
        .db()
        .objects
        .get("gateways")
        .and_then(|m| m.get(&name))
        .cloned()
    {
        Some(o) => axum::Json(o).into_response(),
        None => status(404, "NotFound", &format!("gateways \"{name}\" not found")),
    }
}

async fn lease_get(State(s): State<Shared>, Path((ns, name)): Path<(String, String)>) -> Response {
    match s
        .db()
        .objects
        .get("leases")
        .and_then(|m| m.get(&format!("{ns}/{name}")))
        .cloned()
    {
        Some(o) => axum::Json(o).into_response(),
        None => status(
            404,
            "NotFound",
            &format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

async fn lease_create(State(s): State<Shared>, Path(ns): Path<String>, body: Bytes) -> Response {
    let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    object["metadata"]["namespace"] = json!(ns);
    if s.db()
        .objects
        .get("leases")
        .is_some_and(|m| m.contains_key(&key_of(&object)))
    {
        return status(409, "AlreadyExists", "lease already exists");
    }
    (StatusCode::CREATED, axum::Json(s.write("leases", object))).into_response()
}

async fn lease_replace(
    State(s): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    object["metadata"]["namespace"] = json!(ns);
    let key = format!("{ns}/{name}");
    let current_rv = s
        .db()
        .objects
        .get("leases")
        .and_then(|m| m.get(&key))
        .map(|o| o["metadata"]["resourceVersion"].clone());
    match current_rv {
        None => status(404, "NotFound", "lease not found"),
        Some(rv) if rv != object["metadata"]["resourceVersion"] => status(
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        ),
        Some(_) => axum::Json(s.write("leases", object)).into_response(),
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/apis/raven.openyurt.io/v1beta1/gateways", get(raven_list))
        .route(
            "/apis/raven.openyurt.io/v1beta1/gateways/{name}",
            get(get_gateway),
        )
        .route(
            "/apis/raven.openyurt.io/v1beta1/gateways/{name}/status",
            axum::routing::patch(patch_status),
        )
        .route("/api/v1/{plural}", get(cluster_list))
        .route("/api/v1/namespaces/{ns}/{plural}", get(ns_list))
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            axum::routing::post(lease_create),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(lease_get).put(lease_replace),
        )
        .with_state(shared)
}

/// A running fake API server.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Shared,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 with an empty store.
    pub async fn start() -> std::io::Result<Self> {
        let (events, _) = broadcast::channel(1024);
        let shared = Shared {
            db: Arc::default(),
            events,
            generation: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let mut me = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shared,
            server: None,
        };
        me.listen().await?;
        Ok(me)
    }

    async fn listen(&mut self) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let app = router(self.shared.clone());
        let token = self.shared.token();
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        }));
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// A client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap_or_default());
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    /// Creates or replaces an object (`plural`: gateways, nodes, configmaps, leases).
    pub fn upsert(&self, plural: &str, object: Value) -> Value {
        self.shared.write(plural, object)
    }

    /// Deletes an object by key (`name` or `namespace/name`).
    pub fn delete(&self, plural: &str, key: &str) {
        self.shared.remove(plural, key);
    }

    /// Forgets the event history: a watch from any version older than the
    /// current one gets 410.
    pub fn compact(&self) {
        let mut db = self.shared.db();
        db.compacted = db.rv;
        db.history.clear();
    }

    /// How many watches were answered with 410 Gone.
    pub fn expired_watches(&self) -> u64 {
        self.shared.db().expired_watches
    }

    /// Ends every open watch (clients re-watch from their last version).
    pub fn drop_watches(&self) {
        let mut g = self
            .shared
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.cancel();
        *g = CancellationToken::new();
    }

    /// An outage: closes the listener and every watch.
    pub async fn stop(&mut self) {
        self.drop_watches();
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }

    /// Ends the outage: listens again on the same port, same state.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        for _ in 0..50 {
            match self.listen().await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e),
            }
        }
        self.listen().await
    }

    /// Every status PATCH received: (gateway, body).
    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.shared.db().patches.clone()
    }

    /// The stored object, if any.
    pub fn get(&self, plural: &str, key: &str) -> Option<Value> {
        self.shared
            .db()
            .objects
            .get(plural)
            .and_then(|m| m.get(key))
            .cloned()
    }
}
