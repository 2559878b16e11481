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

type Body = BoxBody<Bytes, Infallible>;

/// A resource type the fake serves.
#[derive(Debug)]
struct ResourceType {
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored status, writes to `/status` change nothing but the status.
    status_subresource: bool,
    /// `metadata.generation` is maintained (custom resources).
    generation: bool,
    /// A PUT must carry `metadata.resourceVersion` (custom resources).
    requires_resource_version: bool,
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `gateways.raven.openyurt.io`, `nodes`: how errors name the type.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

static TYPES: [ResourceType; 4] = [
    ResourceType {
        plural: "gateways",
        group: "raven.openyurt.io",
        version: "v1beta1",
        kind: "Gateway",
        namespaced: false,
        status_subresource: true,
        generation: true,
        requires_resource_version: true,
    },
    ResourceType {
        plural: "nodes",
        group: "",
        version: "v1",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        generation: false,
        requires_resource_version: false,
    },
    ResourceType {
        plural: "configmaps",
        group: "",
        version: "v1",
        kind: "ConfigMap",
        namespaced: true,
        status_subresource: false,
        generation: false,
        requires_resource_version: false,
    },
    ResourceType {
        plural: "leases",
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        generation: false,
        requires_resource_version: false,
    },
];

/// Finds a type by plural (`gateways`) or kind (`Gateway`), any case.
fn resource_type(name: &str) -> &'static ResourceType {
    TYPES
        .iter()
        .find(|t| t.plural.eq_ignore_ascii_case(name) || t.kind.eq_ignore_ascii_case(name))
        .unwrap_or_else(|| {
            panic!(
                "the fake API server serves gateways, nodes, configmaps and leases, not {name:?}"
            )
        })
}

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

/// One committed change, as the watch history keeps it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    ty: &'static ResourceType,
    /// The object after the change; for a deletion its last state, carrying
    /// the deletion's resourceVersion.
    object: Value,
    /// The object before the change.
    prev: Option<Value>,
    deleted: bool,
}

#[derive(Debug, Default)]
struct Db {
    rv: u64,
    /// plural → `name` or `namespace/name` → object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Changes after `compacted`, oldest first.
    history: Vec<Change>,
    /// Changes up to this version are forgotten: older versions get 410.
    compacted: u64,
    uids: u64,
    requests: Vec<RecordedRequest>,
    patches: Vec<RecordedPatch>,
    expired_watches: u64,
    /// plural → resourceVersion of every bookmark sent.
    bookmarks: BTreeMap<&'static str, Vec<u64>>,
}

impl Db {
    fn current(&self, ty: &ResourceType, key: &str) -> Option<&Value> {
        self.objects.get(ty.plural).and_then(|m| m.get(key))
    }

    /// Every object of `ty` as it was at `rv` (rebuilt from the history).
    fn objects_at(&self, ty: &ResourceType, rv: u64) -> Option<BTreeMap<String, Value>> {
        if rv < self.compacted {
            return None;
        }
        let mut objects = self.objects.get(ty.plural).cloned().unwrap_or_default();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.ty.plural != ty.plural {
                continue;
            }
            let key = key_of(&change.object);
            match &change.prev {
                Some(prev) => objects.insert(key, prev.clone()),
                None => objects.remove(&key),
            };
        }
        Some(objects)
    }
}

#[derive(Debug, Clone)]
struct Shared {
    db: Arc<Mutex<Db>>,
    events: broadcast::Sender<Change>,
    /// Cancelled to end every open watch.
    watches: Arc<Mutex<CancellationToken>>,
    options: Options,
}

impl Shared {
    fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch_token(&self) -> CancellationToken {
        self.watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn end_watches(&self) {
        let mut token = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Stores (`Some`) or deletes (`None`) an object under a new
    /// resourceVersion and tells every watch. A write that changes nothing is
    /// skipped. Called with the lock held, so versions and events stay in
    /// order.
    fn commit(
        &self,
        db: &mut Db,
        ty: &'static ResourceType,
        key: &str,
        next: Option<Value>,
    ) -> Option<Value> {
        let prev = db.current(ty, key).cloned();
        let (object, deleted) = match next {
            None => (prev.clone()?, true),
            Some(mut object) => {
                if let Some(prev) = &prev {
                    object["metadata"]["resourceVersion"] =
                        prev["metadata"]["resourceVersion"].clone();
                    if object == *prev {
                        return Some(object);
                    }
                }
                (object, false)
            }
        };
        db.rv += 1;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        let map = db.objects.entry(ty.plural).or_default();
        if deleted {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), object.clone());
        }
        let change = Change {
            rv: db.rv,
            ty,
            object: object.clone(),
            prev,
            deleted,
        };
        db.history.push(change.clone());
        // No receiver is fine: nobody is watching.
        let _ = self.events.send(change);
        Some(object)
    }

    /// Fills what the API server sets itself: apiVersion/kind, namespace,
    /// uid, creationTimestamp, generation.
    fn normalize(
        db: &mut Db,
        ty: &ResourceType,
        ns: Option<&str>,
        mut object: Value,
        prev: Option<&Value>,
    ) -> Value {
        object["apiVersion"] = json!(ty.api_version());
        object["kind"] = json!(ty.kind);
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        if let Some(ns) = ns {
            object["metadata"]["namespace"] = json!(ns);
        }
        match prev {
            Some(prev) => {
                for field in ["uid", "creationTimestamp"] {
                    object["metadata"][field] = prev["metadata"][field].clone();
                }
                if ty.generation {
                    let spec_of = |v: &Value| {
                        let mut v = v.clone();
                        if let Some(o) = v.as_object_mut() {
                            o.remove("metadata");
                            o.remove("status");
                        }
                        v
                    };
                    let generation = prev["metadata"]["generation"].as_i64().unwrap_or(1);
                    let bump = i64::from(spec_of(&object) != spec_of(prev));
                    object["metadata"]["generation"] = json!(generation + bump);
                }
            }
            None => {
                db.uids += 1;
                object["metadata"]["uid"] =
                    json!(format!("00000000-0000-4000-8000-{:012x}", db.uids));
                object["metadata"]["creationTimestamp"] = json!(now());
                if ty.generation {
                    object["metadata"]["generation"] = json!(1);
                }
            }
        }
        object
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn key_of(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    key(Some(ns).filter(|n| !n.is_empty()), name)
}

fn key(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Errors and responses

/// A failure answered with a `Status` object.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn not_found(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", ty.qualified()),
        )
    }

    fn conflict(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                ty.qualified()
            ),
        )
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }

    fn response(&self) -> Response<Body> {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.status(),
        )
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

type ApiResult = Result<Response<Body>, ApiError>;

// ---------------------------------------------------------------------------
// Routing

#[derive(Debug)]
enum Target {
    Version,
    Collection {
        ty: &'static ResourceType,
        ns: Option<String>,
    },
    Object {
        ty: &'static ResourceType,
        ns: Option<String>,
        name: String,
        status: bool,
    },
}

fn route(path: &str) -> Result<Target, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Target::Version),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(not_found()),
    };
    let ty = TYPES
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
        .ok_or_else(not_found)?;
    if ns.is_some() && !ty.namespaced {
        return Err(not_found());
    }
    match (name, sub) {
        (None, _) => Ok(Target::Collection { ty, ns }),
        (Some(name), sub) => {
            if ty.namespaced && ns.is_none() {
                return Err(not_found());
            }
            let status = match sub {
                None => false,
                Some("status") if ty.status_subresource => true,
                Some(_) => return Err(not_found()),
            };
            Ok(Target::Object {
                ty,
                ns,
                name: name.to_owned(),
                status,
            })
        }
    }
}

async fn handle(shared: Shared, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    shared.db().requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
    });
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(ApiError::bad_request(format!("reading the body: {e}")).response()),
    };
    let result = match route(&path) {
        Err(e) => Err(e),
        Ok(Target::Version) => Ok(json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-raven-fake", "platform": "linux/amd64"}),
        )),
        Ok(Target::Collection { ty, ns }) => match method {
            Method::GET if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                watch(&shared, ty, ns, &query)
            }
            Method::GET => list(&shared, ty, ns.as_deref(), &query),
            Method::POST => create(&shared, ty, ns.as_deref(), &body),
            _ => Err(method_not_allowed(&method)),
        },
        Ok(Target::Object {
            ty,
            ns,
            name,
            status,
        }) => {
            let ns = ns.as_deref();
            match method {
                Method::GET => get(&shared, ty, ns, &name),
                Method::PUT => replace(&shared, ty, ns, &name, status, &body),
                Method::PATCH => {
                    patch(&shared, ty, ns, &name, status, &content_type, &query, &body)
                }
                Method::DELETE if !status => delete(&shared, ty, ns, &name, &body),
                _ => Err(method_not_allowed(&method)),
            }
        }
    };
    Ok(result.unwrap_or_else(|e| e.response()))
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    Ok(v)
}

/// The request body must describe the type, name and namespace of the URL.
fn check_identity(
    ty: &ResourceType,
    ns: Option<&str>,
    name: Option<&str>,
    object: &Value,
) -> Result<(), ApiError> {
    if let Some(kind) = object["kind"].as_str()
        && kind != ty.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({kind}) does not match the resource ({})",
            ty.kind
        )));
    }
    if let Some(body_ns) = object["metadata"]["namespace"].as_str()
        && !body_ns.is_empty()
        && Some(body_ns) != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let Some(name) = name
        && object["metadata"]["name"].as_str() != Some(name)
    {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Selectors

#[derive(Debug, Default)]
struct Selectors {
    /// (field, equal?, value)
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelRequirement>,
}

#[derive(Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    fn parse(query: &BTreeMap<String, String>) -> Result<Self, ApiError> {
        let mut out = Self::default();
        for term in query
            .get("fieldSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
            .filter(|t| !t.is_empty())
        {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            out.fields.push((field.to_owned(), equal, value.to_owned()));
        }
        if let Some(s) = query.get("labelSelector") {
            if s.contains('(') {
                return Err(ApiError::bad_request(
                    "set-based label selectors are not supported by the fake API server",
                ));
            }
            for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let req = if let Some(k) = term.strip_prefix('!') {
                    LabelRequirement::NotExists(k.to_owned())
                } else if let Some((k, v)) = term.split_once("!=") {
                    LabelRequirement::NotEquals(k.to_owned(), v.to_owned())
                } else if let Some((k, v)) = term.split_once("==") {
                    LabelRequirement::Equals(k.to_owned(), v.to_owned())
                } else if let Some((k, v)) = term.split_once('=') {
                    LabelRequirement::Equals(k.to_owned(), v.to_owned())
                } else {
                    LabelRequirement::Exists(term.to_owned())
                };
                out.labels.push(req);
            }
        }
        Ok(out)
    }

    fn matches(&self, ns: Option<&str>, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = ns
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let fields_ok = self.fields.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => meta["name"].as_str(),
                _ => meta["namespace"].as_str(),
            }
            .unwrap_or_default();
            (actual == value) == *equal
        });
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        fields_ok && labels_ok
    }
}

// ---------------------------------------------------------------------------
// LIST

fn parse_rv(v: &str) -> Result<u64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))
}

fn too_large(rv: u64, current: u64) -> ApiError {
    ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    )
}

fn too_old(rv: u64, current: u64) -> ApiError {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {rv} ({current})"),
    )
}

fn list(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    query: &BTreeMap<String, String>,
) -> ApiResult {
    let selectors = Selectors::parse(query)?;
    let limit: usize = match query.get("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    let rv_param = query.get("resourceVersion").filter(|v| !v.is_empty());
    let db = shared.db();
    // Which snapshot, and where in it this page starts.
    let (snapshot, start_after, paginate) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            if rv_param.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rv, last) = decode_continue(token)?;
            (rv, Some(last), true)
        }
        None => match rv_param.map(String::as_str) {
            None => (db.rv, None, true),
            // "Any": served from the watch cache, which ignores `limit`.
            Some("0") => (db.rv, None, false),
            Some(v) => {
                let rv = parse_rv(v)?;
                if rv > db.rv {
                    return Err(too_large(rv, db.rv));
                }
                match query.get("resourceVersionMatch").map(String::as_str) {
                    Some("Exact") => (rv, None, true),
                    _ => (db.rv, None, true),
                }
            }
        },
    };
    let objects = db.objects_at(ty, snapshot).ok_or_else(|| {
        if start_after.is_some() {
            ApiError::new(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            )
        } else {
            too_old(snapshot, db.rv)
        }
    })?;
    let mut items: Vec<(String, Value)> = objects
        .into_iter()
        .filter(|(k, _)| start_after.as_ref().is_none_or(|s| k > s))
        .filter(|(_, o)| selectors.matches(ns, o))
        .collect();
    let mut metadata = json!({"resourceVersion": snapshot.to_string()});
    if paginate && limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let Some((last, _)) = items.last() {
            metadata["continue"] = json!(encode_continue(snapshot, last));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let body = json!({
        "kind": format!("{}List", ty.kind),
        "apiVersion": ty.api_version(),
        "metadata": metadata,
        "items": items.into_iter().map(|(_, o)| o).collect::<Vec<_>>(),
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn encode_continue(rv: u64, last_key: &str) -> String {
    let hex: String = last_key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{rv}-{hex}")
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let (rv, hex) = token.split_once('-').ok_or_else(bad)?;
    let rv = rv.parse().map_err(|_| bad())?;
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    Ok((rv, String::from_utf8(bytes).map_err(|_| bad())?))
}

// ---------------------------------------------------------------------------
// WATCH

/// The watch event a change is for a watcher with `selectors`, if any.
fn event_for(change: &Change, selectors: &Selectors, ns: Option<&str>) -> Option<Value> {
    let now = selectors.matches(ns, &change.object);
    let before = change
        .prev
        .as_ref()
        .is_some_and(|p| selectors.matches(ns, p));
    let kind = if change.deleted {
        now.then_some("DELETED")?
    } else {
        match (before, now) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            // Left the selection: to this watcher it is gone.
            (true, false) => "DELETED",
            (false, false) => return None,
        }
    };
    Some(json!({"type": kind, "object": change.object}))
}

fn bookmark(ty: &ResourceType, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": metadata}})
}

fn watch(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<String>,
    query: &BTreeMap<String, String>,
) -> ApiResult {
    let selectors = Selectors::parse(query)?;
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let bookmarks = flag("allowWatchBookmarks");
    let initial_events_end = flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        // The API server picks 30–60 minutes.
        None => Duration::from_secs(1800),
    };
    let from = match query.get("resourceVersion").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(parse_rv(v)?).filter(|rv| *rv != 0),
    };
    // Subscribe and read the backlog under one lock: every change after
    // `snapshot` arrives on the channel, every change up to it is in the
    // backlog.
    let (mut rx, first, snapshot) = {
        let mut db = shared.db();
        let rx = shared.events.subscribe();
        let snapshot = db.rv;
        let first: Result<Vec<Value>, Value> = match from {
            None => Ok(db
                .objects
                .get(ty.plural)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| selectors.matches(ns.as_deref(), o))
                .map(|o| json!({"type": "ADDED", "object": o}))
                .collect()),
            Some(rv) if rv < db.compacted => {
                db.expired_watches += 1;
                Err(json!({"type": "ERROR", "object": too_old(rv, snapshot).status()}))
            }
            Some(rv) if rv > snapshot => {
                Err(json!({"type": "ERROR", "object": too_large(rv, snapshot).status()}))
            }
            Some(rv) => Ok(db
                .history
                .iter()
                .filter(|c| c.rv > rv && c.ty.plural == ty.plural)
                .filter_map(|c| event_for(c, &selectors, ns.as_deref()))
                .collect()),
        };
        (rx, first, snapshot)
    };
    let token = shared.watch_token();
    let interval = shared.options.bookmark_interval;
    let shared = shared.clone();
    let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Frame::data(Bytes::from(format!("{v}\n")))))
                    .await
                    .is_ok()
            }
        };
        let events = match first {
            Ok(events) => events,
            Err(error) => {
                send(error).await;
                return;
            }
        };
        for e in events {
            if !send(e).await {
                return;
            }
        }
        if initial_events_end && from.is_none() && !send(bookmark(ty, snapshot, true)).await {
            return;
        }
        // Every change up to `progress` has been sent (or did not concern
        // this watch): a bookmark may carry it.
        let mut progress = snapshot;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = tx.closed() => return,
                () = &mut deadline => return,
                change = rx.recv() => match change {
                    Ok(change) => {
                        progress = progress.max(change.rv);
                        if change.ty.plural == ty.plural
                            && let Some(event) = event_for(&change, &selectors, ns.as_deref())
                            && !send(event).await
                        {
                            return;
                        }
                    }
                    // Too slow to keep up, or the server is gone: the
                    // API server closes such a watch too.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if !send(bookmark(ty, progress, false)).await {
                        return;
                    }
                    shared.db().bookmarks.entry(ty.plural).or_default().push(progress);
                }
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body_rx));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

// ---------------------------------------------------------------------------
// GET, POST, PUT, PATCH, DELETE

fn get(shared: &Shared, ty: &'static ResourceType, ns: Option<&str>, name: &str) -> ApiResult {
    let db = shared.db();
    let object = db
        .current(ty, &key(ns, name))
        .ok_or_else(|| ApiError::not_found(ty, name))?;
    Ok(json_response(StatusCode::OK, object))
}

fn create(shared: &Shared, ty: &'static ResourceType, ns: Option<&str>, body: &[u8]) -> ApiResult {
    if ty.namespaced && ns.is_none() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let mut object = parse_object(body)?;
    check_identity(ty, ns, None, &object)?;
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} is invalid: metadata.name: Required value: name is required",
                    ty.kind
                ),
            )
        })?
        .to_owned();
    if ty.status_subresource
        && let Some(o) = object.as_object_mut()
    {
        // Status is written through /status only.
        o.remove("status");
    }
    let mut db = shared.db();
    let key = key(ns, &name);
    if db.current(ty, &key).is_some() {
        return Err(ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", ty.qualified()),
        ));
    }
    object["metadata"]["resourceVersion"] = Value::Null;
    let object = Shared::normalize(&mut db, ty, ns, object, None);
    let stored = shared.commit(&mut db, ty, &key, Some(object));
    Ok(json_response(
        StatusCode::CREATED,
        &stored.unwrap_or_default(),
    ))
}

/// Rejects a write whose `metadata.resourceVersion` is not the stored one.
fn precondition(
    ty: &ResourceType,
    name: &str,
    current: &Value,
    given: &Value,
) -> Result<(), ApiError> {
    match given.as_str().filter(|v| !v.is_empty()) {
        Some(rv) if Some(rv) != current["metadata"]["resourceVersion"].as_str() => {
            Err(ApiError::conflict(ty, name))
        }
        _ => Ok(()),
    }
}

/// Merges a write into the stored object according to the endpoint:
/// `/status` takes only the status, the main resource keeps the status.
fn merge_for_endpoint(ty: &ResourceType, status: bool, current: &Value, written: Value) -> Value {
    if status {
        let mut next = current.clone();
        match written.get("status") {
            Some(s) if !s.is_null() => next["status"] = s.clone(),
            _ => {
                if let Some(o) = next.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        next
    } else if ty.status_subresource {
        let mut next = written;
        match current.get("status") {
            Some(s) => next["status"] = s.clone(),
            None => {
                if let Some(o) = next.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        next
    } else {
        written
    }
}

fn replace(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    status: bool,
    body: &[u8],
) -> ApiResult {
    let object = parse_object(body)?;
    check_identity(ty, ns, Some(name), &object)?;
    let mut db = shared.db();
    let key = key(ns, name);
    let current = db
        .current(ty, &key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(ty, name))?;
    let given = &object["metadata"]["resourceVersion"];
    if ty.requires_resource_version && given.as_str().is_none_or(str::is_empty) {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                ty.kind
            ),
        ));
    }
    precondition(ty, name, &current, given)?;
    let next = merge_for_endpoint(ty, status, &current, object);
    let next = Shared::normalize(&mut db, ty, ns, next, Some(&current));
    let stored = shared.commit(&mut db, ty, &key, Some(next));
    Ok(json_response(StatusCode::OK, &stored.unwrap_or_default()))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    status: bool,
    content_type: &str,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> ApiResult {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let apply = media == "application/apply-patch+yaml";
    if apply && query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH requests with apply content type need a fieldManager",
        ));
    }
    let patch: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the patch is not JSON (the fake API server reads apply bodies as JSON only): {e}"
        ))
    })?;
    let mut db = shared.db();
    let key = key(ns, name);
    let current = db.current(ty, &key).cloned();
    let merged = match (media.as_str(), current.as_ref()) {
        // Server-side apply of a missing object creates it.
        ("application/apply-patch+yaml", None) if !status => {
            check_identity(ty, ns, Some(name), &patch)?;
            let mut object = patch.clone();
            if ty.status_subresource
                && let Some(o) = object.as_object_mut()
            {
                o.remove("status");
            }
            object["metadata"]["resourceVersion"] = Value::Null;
            let object = Shared::normalize(&mut db, ty, ns, object, None);
            record_patch(&mut db, ty, &key, status, &media, &patch);
            let stored = shared.commit(&mut db, ty, &key, Some(object));
            return Ok(json_response(
                StatusCode::CREATED,
                &stored.unwrap_or_default(),
            ));
        }
        (_, None) => return Err(ApiError::not_found(ty, name)),
        (
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml",
            Some(current),
        ) => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("the patch is not a JSON object"));
            }
            precondition(ty, name, current, &patch["metadata"]["resourceVersion"])?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            doc
        }
        ("application/json-patch+json", Some(current)) => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(422, "Invalid", format!("the JSON patch failed: {e}"))
            })?;
            precondition(ty, name, current, &doc["metadata"]["resourceVersion"])?;
            doc
        }
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {content_type}"),
            ));
        }
    };
    let current = current.unwrap_or_default();
    let mut merged = merged;
    // Name and namespace are immutable.
    merged["metadata"]["name"] = current["metadata"]["name"].clone();
    let next = merge_for_endpoint(ty, status, &current, merged);
    let next = Shared::normalize(&mut db, ty, ns, next, Some(&current));
    record_patch(&mut db, ty, &key, status, &media, &patch);
    let stored = shared.commit(&mut db, ty, &key, Some(next));
    Ok(json_response(StatusCode::OK, &stored.unwrap_or_default()))
}

fn record_patch(
    db: &mut Db,
    ty: &ResourceType,
    key: &str,
    status: bool,
    media: &str,
    body: &Value,
) {
    db.patches.push(RecordedPatch {
        resource: ty.plural.to_owned(),
        key: key.to_owned(),
        subresource: status.then(|| "status".to_owned()),
        content_type: media.to_owned(),
        body: body.clone(),
    });
}

fn delete(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    body: &[u8],
) -> ApiResult {
    let mut db = shared.db();
    let key = key(ns, name);
    let current = db
        .current(ty, &key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(ty, name))?;
    if !body.is_empty() {
        let options = parse_object(body)?;
        precondition(
            ty,
            name,
            &current,
            &options["preconditions"]["resourceVersion"],
        )?;
    }
    let deleted = shared.commit(&mut db, ty, &key, None);
    Ok(json_response(StatusCode::OK, &deleted.unwrap_or_default()))
}

// ---------------------------------------------------------------------------
// The server

/// Accepts connections until aborted; aborting drops (and so aborts) every
/// connection task, which closes every socket, as a dead API server would.
async fn serve(listener: tokio::net::TcpListener, shared: Shared) {
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
