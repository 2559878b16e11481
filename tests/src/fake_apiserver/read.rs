//! LIST (snapshots, pages) and WATCH (history, live events, bookmarks, 410).

use super::*;

// ---------------------------------------------------------------------------
// Selectors

#[derive(Debug, Default)]
pub(crate) struct Selectors {
    /// (field, equal?, value)
    pub(crate) fields: Vec<(String, bool, String)>,
    pub(crate) labels: Vec<LabelRequirement>,
}

#[derive(Debug)]
pub(crate) enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    pub(crate) fn parse(query: &BTreeMap<String, String>) -> Result<Self, ApiError> {
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

    pub(crate) fn matches(&self, ns: Option<&str>, object: &Value) -> bool {
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

pub(crate) fn parse_rv(v: &str) -> Result<u64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))
}

pub(crate) fn too_large(rv: u64, current: u64) -> ApiError {
    ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    )
}

pub(crate) fn too_old(rv: u64, current: u64) -> ApiError {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {rv} ({current})"),
    )
}

pub(crate) fn list(
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

pub(crate) fn encode_continue(rv: u64, last_key: &str) -> String {
    let hex: String = last_key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{rv}-{hex}")
}

pub(crate) fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
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
pub(crate) fn event_for(change: &Change, selectors: &Selectors, ns: Option<&str>) -> Option<Value> {
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

pub(crate) fn bookmark(ty: &ResourceType, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": metadata}})
}

pub(crate) fn watch(
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
