//! The stored objects: served types, one global resourceVersion, the change history.

use super::*;

/// A resource type the fake serves.
#[derive(Debug)]
pub(crate) struct ResourceType {
    pub(crate) plural: &'static str,
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored status, writes to `/status` change nothing but the status.
    pub(crate) status_subresource: bool,
    /// `metadata.generation` is maintained (custom resources).
    pub(crate) generation: bool,
    /// A PUT must carry `metadata.resourceVersion` (custom resources).
    pub(crate) requires_resource_version: bool,
}

impl ResourceType {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `gateways.raven.openyurt.io`, `nodes`: how errors name the type.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub(crate) static TYPES: [ResourceType; 4] = [
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
pub(crate) fn resource_type(name: &str) -> &'static ResourceType {
    TYPES
        .iter()
        .find(|t| t.plural.eq_ignore_ascii_case(name) || t.kind.eq_ignore_ascii_case(name))
        .unwrap_or_else(|| {
            panic!(
                "the fake API server serves gateways, nodes, configmaps and leases, not {name:?}"
            )
        })
}

/// One committed change, as the watch history keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) ty: &'static ResourceType,
    /// The object after the change; for a deletion its last state, carrying
    /// the deletion's resourceVersion.
    pub(crate) object: Value,
    /// The object before the change.
    pub(crate) prev: Option<Value>,
    pub(crate) deleted: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Db {
    pub(crate) rv: u64,
    /// plural → `name` or `namespace/name` → object
    pub(crate) objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Changes after `compacted`, oldest first.
    pub(crate) history: Vec<Change>,
    /// Changes up to this version are forgotten: older versions get 410.
    pub(crate) compacted: u64,
    pub(crate) uids: u64,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) patches: Vec<RecordedPatch>,
    pub(crate) expired_watches: u64,
    /// plural → resourceVersion of every bookmark sent.
    pub(crate) bookmarks: BTreeMap<&'static str, Vec<u64>>,
}

impl Db {
    pub(crate) fn current(&self, ty: &ResourceType, key: &str) -> Option<&Value> {
        self.objects.get(ty.plural).and_then(|m| m.get(key))
    }

    /// Every object of `ty` as it was at `rv` (rebuilt from the history).
    pub(crate) fn objects_at(&self, ty: &ResourceType, rv: u64) -> Option<BTreeMap<String, Value>> {
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
pub(crate) struct Shared {
    pub(crate) db: Arc<Mutex<Db>>,
    pub(crate) events: broadcast::Sender<Change>,
    /// Cancelled to end every open watch.
    pub(crate) watches: Arc<Mutex<CancellationToken>>,
    pub(crate) options: Options,
}

impl Shared {
    pub(crate) fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn watch_token(&self) -> CancellationToken {
        self.watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn end_watches(&self) {
        let mut token = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Stores (`Some`) or deletes (`None`) an object under a new
    /// resourceVersion and tells every watch. A write that changes nothing is
    /// skipped. Called with the lock held, so versions and events stay in
    /// order.
    pub(crate) fn commit(
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
    pub(crate) fn normalize(
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

pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(crate) fn key_of(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    key(Some(ns).filter(|n| !n.is_empty()), name)
}

pub(crate) fn key(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}
