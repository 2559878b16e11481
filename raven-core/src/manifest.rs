//! Reads Kubernetes YAML manifests (the standalone source): multi-document
//! files holding `Gateway` (`v1beta1` or `v1alpha1`), `Node` and the
//! `kube-system/raven-cfg` `ConfigMap`, also wrapped in a `v1 List`.
//!
//! Each document stands alone: a broken one is reported with its file,
//! document number, field and value, and every other document is still used.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::api::{self, v1alpha1, v1beta1};
use crate::cluster::{ClusterNode, Inputs, RavenConfig};
use crate::compile::{Admitted, admit};
use crate::problem::Problem;
use crate::yaml;

/// The result of loading manifests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub inputs: Inputs,
    pub problems: Vec<Problem>,
    /// Where each served object came from: `Kind/name` → file name.
    pub origins: BTreeMap<String, String>,
}

/// Caps on what one file may hold (the hub's `--manifest-max-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Documents in one file (`---` separated, List items not counted).
    pub max_documents: usize,
    /// Entries of one Gateway's `spec.endpoints`.
    pub max_endpoints: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_documents: DEFAULT_MAX_DOCUMENTS,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
        }
    }
}

/// Default of [`Limits::max_documents`].
pub const DEFAULT_MAX_DOCUMENTS: usize = 10_000;
/// Default of [`Limits::max_endpoints`].
pub const DEFAULT_MAX_ENDPOINTS: usize = 1_000;

/// Which file owns an object (`Kind/name` → file name): the file it was
/// served from before. On a duplicate, the owner's copy wins whatever the
/// file order; without an owner, the first file by name wins.
pub type Owners = BTreeMap<String, String>;

/// Where an object came from, for duplicate reports.
fn origin(file: &str, doc: usize) -> String {
    format!("{file}#{doc}")
}

fn text(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// `Kind/name (file#doc)` when the document says what it is, else `file#doc`.
fn describe(value: &Value, at: &str) -> String {
    let kind = text(value, "kind");
    let name = value
        .get("metadata")
        .map(|m| text(m, "name"))
        .unwrap_or_default();
    if kind.is_empty() || name.is_empty() {
        at.to_owned()
    } else {
        format!("{kind}/{name} ({at})")
    }
}

/// One object as the file that defines it reads alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// Admitted, or refused by admission with why (boxed: a Gateway is
    /// far larger than the other kinds).
    Gateway(Box<Result<Admitted, Vec<Problem>>>),
    Node(ClusterNode),
    Config(RavenConfig),
}

/// An object and where in its file it is (`file#doc`).
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub at: String,
    pub object: Object,
}

/// What one file defines, read alone: independent of every other file, so
/// a change to one file re-parses that file only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileObjects {
    /// `Kind/name` → the file's first copy of it.
    pub objects: BTreeMap<String, Placed>,
    /// Problems of the file's documents (a copy repeated within the file
    /// included); never a problem that depends on another file.
    pub problems: Vec<Problem>,
}

impl FileObjects {
    /// Whether a problem of this file is an error (the file is broken).
    pub fn has_errors(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.severity == crate::problem::Severity::Error)
    }
}

/// Reads one file on its own.
pub fn parse_file(file: &str, text: &str, limits: Limits) -> FileObjects {
    let mut l = Loader {
        limits,
        ..Default::default()
    };
    l.load_file(file, text);
    l.out.problems.sort();
    l.out
}

#[derive(Default)]
struct Loader {
    out: FileObjects,
    limits: Limits,
}

/// Loads manifests from `(file name, contents)` pairs, in the given order,
/// with the default limits.
pub fn load(sources: &[(String, String)]) -> Loaded {
    load_with(sources, Limits::default(), &Owners::new())
}

/// Loads manifests with `limits`; of two copies of one object, the one in
/// the file `owners` names wins (else the first in order).
pub fn load_with(sources: &[(String, String)], limits: Limits, owners: &Owners) -> Loaded {
    let mut merged = Merged::new(owners.clone());
    let mut touched = BTreeSet::new();
    for (rank, (file, text)) in (0u64..).zip(sources) {
        touched.extend(merged.stage(file, rank, Some(Arc::new(parse_file(file, text, limits)))));
    }
    merged.resolve(&touched);
    merged.loaded()
}

/// The objects of many files merged: which copy of each object is served
/// and the duplicates reported. Kept between changes: replacing one file's
/// objects ([`Merged::set`]) costs what that file defines, not what the
/// directory holds.
///
/// Of two copies of one object, the copy in the file that owns it (served
/// it before, [`Owners`]) wins; without an owner, the first file by rank,
/// then name. Every other copy is reported as a duplicate.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    files: BTreeMap<String, (u64, Arc<FileObjects>)>,
    /// `Kind/name` → the files defining it, in precedence order.
    defs: BTreeMap<String, BTreeSet<(u64, String)>>,
    /// `Kind/name` → the file whose copy is served.
    owners: Owners,
    /// `Kind/name` → its duplicate reports, for objects defined twice.
    duplicates: BTreeMap<String, Vec<Problem>>,
}

impl Merged {
    /// Starts empty; `owners` decides duplicates as history would.
    pub fn new(owners: Owners) -> Self {
        Self {
            owners,
            ..Default::default()
        }
    }

    /// Replaces what `file` defines (`None`: the file is gone, its objects
    /// go with it) and picks the served copies anew. Returns the keys
    /// (`Kind/name`) whose served copy may have changed: only keys the old
    /// or the new version of `file` names.
    pub fn set(
        &mut self,
        file: &str,
        rank: u64,
        objects: Option<Arc<FileObjects>>,
    ) -> BTreeSet<String> {
        let touched = self.stage(file, rank, objects);
        self.resolve(&touched);
        touched
    }

    /// [`Merged::set`] without picking the served copies: a batch of files
    /// stages each, then [`Merged::resolve`]s the keys they return once, so
    /// the owners from before the batch decide every duplicate in it.
    pub fn stage(
        &mut self,
        file: &str,
        rank: u64,
        objects: Option<Arc<FileObjects>>,
    ) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        if let Some((old_rank, old)) = self.files.remove(file) {
            for key in old.objects.keys() {
                if let Some(d) = self.defs.get_mut(key) {
                    d.remove(&(old_rank, file.to_owned()));
                    if d.is_empty() {
                        self.defs.remove(key);
                    }
                }
                touched.insert(key.clone());
            }
        }
        if let Some(new) = objects {
            for key in new.objects.keys() {
                self.defs
                    .entry(key.clone())
                    .or_default()
                    .insert((rank, file.to_owned()));
                touched.insert(key.clone());
            }
            self.files.insert(file.to_owned(), (rank, new));
        }
        touched
    }

    /// Picks the served copy of each of `keys` (and their duplicate
    /// reports): the owner's copy if it still has one, else the first.
    pub fn resolve(&mut self, keys: &BTreeSet<String>) {
        for key in keys {
            self.resolve_one(key);
        }
    }

    fn resolve_one(&mut self, key: &str) {
        self.duplicates.remove(key);
        let Some(defs) = self.defs.get(key) else {
            self.owners.remove(key);
            return;
        };
        let owned = self
            .owners
            .get(key)
            .and_then(|o| defs.iter().find(|(_, f)| f == o));
        let Some(winner) = owned.or_else(|| defs.first()).cloned() else {
            return;
        };
        self.owners.insert(key.to_owned(), winner.1.clone());
        if defs.len() < 2 {
            return;
        }
        let at = |file: &str| {
            self.files
                .get(file)
                .and_then(|(_, f)| f.objects.get(key))
                .map(|p| p.at.clone())
                .unwrap_or_default()
        };
        let kept = at(&winner.1);
        let reports = defs
            .iter()
            .filter(|d| **d != winner)
            .map(|d| {
                let message = if *d < winner {
                    format!(
                        "already defined at {kept}, which was served first; this copy is ignored"
                    )
                } else {
                    format!("already defined at {kept}; this copy is ignored")
                };
                Problem::error(
                    format!("{key} ({})", at(&d.1)),
                    "metadata.name",
                    "",
                    message,
                )
            })
            .collect();
        self.duplicates.insert(key.to_owned(), reports);
    }

    /// The served copy of `key`: its file and the object.
    pub fn served(&self, key: &str) -> Option<(&str, &Placed)> {
        let file = self.owners.get(key)?;
        let (_, objects) = self.files.get(file)?;
        Some((file.as_str(), objects.objects.get(key)?))
    }

    /// Which file serves each object.
    pub fn owners(&self) -> &Owners {
        &self.owners
    }

    /// Every problem: each file's own and the duplicates, sorted.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = self
            .files
            .values()
            .flat_map(|(_, f)| f.problems.iter().cloned())
            .chain(self.duplicates.values().flatten().cloned())
            .collect();
        out.sort();
        out
    }

    /// Everything served, as one [`Loaded`] (a from-scratch view).
    pub fn loaded(&self) -> Loaded {
        let mut inputs = Inputs::default();
        for key in self.owners.keys() {
            if let Some((_, placed)) = self.served(key) {
                add_object(&mut inputs, key, &placed.object);
            }
        }
        Loaded {
            inputs,
            problems: self.problems(),
            origins: self.owners.clone(),
        }
    }
}

/// The `Kind/name` key of a Gateway named `name` (as written).
pub fn gateway_key(name: &str) -> String {
    format!("Gateway/{name}")
}

/// The name in a `Gateway/name` key.
pub fn gateway_of_key(key: &str) -> Option<&str> {
    key.strip_prefix("Gateway/")
}

/// Puts `object` (served under `key`) into `inputs`.
pub fn add_object(inputs: &mut Inputs, key: &str, object: &Object) {
    match object {
        Object::Gateway(admission) => match &**admission {
            Ok(gw) => {
                inputs.gateways.insert(gw.name().clone(), gw.clone());
            }
            Err(problems) => {
                let name = gateway_of_key(key).unwrap_or(key);
                inputs.rejected.insert(name.to_owned(), problems.clone());
            }
        },
        Object::Node(n) => {
            inputs.nodes.insert(n.name.clone(), n.clone());
        }
        Object::Config(c) => inputs.config = *c,
    }
}

impl Loader {
    fn load_file(&mut self, file: &str, text: &str) {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let at = origin(file, i + 1);
            if i >= self.limits.max_documents {
                self.out.problems.push(Problem::error(
                    file,
                    "",
                    format!(">{}", self.limits.max_documents),
                    format!(
                        "more than {} documents in one file (--manifest-max-documents); the rest of this file is not read",
                        self.limits.max_documents
                    ),
                ));
                break;
            }
            match yaml::read_document(doc) {
                Ok((Value::Null, _)) => {}
                Ok((value, repeats)) => {
                    let object = describe(&value, &at);
                    let conflicting: Vec<_> = repeats.iter().filter(|r| !r.is_harmless()).collect();
                    for r in &repeats {
                        let p = if r.is_harmless() {
                            Problem::warning(
                                &object,
                                &r.path,
                                &r.repeated,
                                "key written twice with the same value; using it once",
                            )
                        } else {
                            Problem::error(
                                &object,
                                &r.path,
                                &r.repeated,
                                format!(
                                    "key written twice with different values (first {:?}); this document is ignored",
                                    r.first
                                ),
                            )
                        };
                        self.out.problems.push(p);
                    }
                    if conflicting.is_empty() {
                        self.load_value(&at, value);
                    }
                }
                Err(e) => {
                    self.out.problems.push(Problem::error(
                        &at,
                        "",
                        "",
                        format!("not valid YAML: {e}"),
                    ));
                    // After a syntax error the parser cannot find the next
                    // document boundary reliably; stop reading this file.
                    break;
                }
            }
        }
    }

    fn load_value(&mut self, at: &str, value: Value) {
        let api_version = text(&value, "apiVersion");
        let kind = text(&value, "kind");
        let name = value
            .get("metadata")
            .map(|m| text(m, "name"))
            .unwrap_or_default();
        let object = describe(&value, at);
        match (api_version.as_str(), kind.as_str()) {
            ("raven.openyurt.io/v1beta1" | "raven.openyurt.io/v1alpha1", "Gateway")
                if self.too_many_endpoints(&object, &value) => {}
            ("raven.openyurt.io/v1beta1", "Gateway") => {
                if let Some(gw) = self.typed::<v1beta1::Gateway>(&object, value) {
                    self.add_gateway(at, gw);
                }
            }
            ("raven.openyurt.io/v1alpha1", "Gateway") => {
                if let Some(gw) = self.typed::<v1alpha1::Gateway>(&object, value) {
                    self.add_gateway(at, gw.into());
                }
            }
            ("v1", "Node") => {
                if let Some(node) = self.typed::<Node>(&object, value) {
                    match ClusterNode::from_k8s(&node) {
                        Ok((n, ps)) => {
                            self.out.problems.extend(ps);
                            self.add(format!("Node/{}", n.name), at, || Object::Node(n));
                        }
                        Err(p) => self.out.problems.push(p),
                    }
                }
            }
            ("v1", "ConfigMap") => {
                if name != api::CONFIG_NAME {
                    return;
                }
                if let Some(cm) = self.typed::<ConfigMap>(&object, value) {
                    let ns = cm.metadata.namespace.clone().unwrap_or_default();
                    if ns != api::CONFIG_NAMESPACE {
                        self.out.problems.push(Problem::warning(
                            &object,
                            "metadata.namespace",
                            ns,
                            "raven reads raven-cfg from namespace kube-system only; ignored",
                        ));
                        return;
                    }
                    self.add(
                        format!("ConfigMap/{}/{}", api::CONFIG_NAMESPACE, api::CONFIG_NAME),
                        at,
                        || Object::Config(RavenConfig::from_configmap(&cm)),
                    );
                }
            }
            ("v1", "List") => match value.get("items") {
                Some(Value::Sequence(items)) => {
                    for (j, item) in items.iter().enumerate() {
                        self.load_value(&format!("{at}.items[{j}]"), item.clone());
                    }
                }
                _ => self.out.problems.push(Problem::error(
                    &object,
                    "items",
                    "",
                    "a List needs an items array",
                )),
            },
            ("", _) | (_, "") => self.out.problems.push(Problem::error(
                &object,
                if api_version.is_empty() {
                    "apiVersion"
                } else {
                    "kind"
                },
                "",
                "missing; cannot tell what this document is",
            )),
            _ => self.out.problems.push(Problem::warning(
                &object,
                "kind",
                format!("{api_version} {kind}"),
                "not a kind raven reads (Gateway, Node, ConfigMap kube-system/raven-cfg); ignored",
            )),
        }
    }

    /// Deserializes with the path of the failing field in the error.
    fn typed<T: DeserializeOwned>(&mut self, object: &str, value: Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { path };
                self.out.problems.push(Problem::error(
                    object,
                    field,
                    "",
                    e.into_inner().to_string(),
                ));
                None
            }
        }
    }

    /// Keeps the file's first copy of `key`; a later copy in the same file
    /// is reported and ignored (copies in other files are [`Merged`]'s).
    fn add(&mut self, key: String, at: &str, object: impl FnOnce() -> Object) {
        if let Some(prev) = self.out.objects.get(&key) {
            self.out.problems.push(Problem::error(
                format!("{key} ({at})"),
                "metadata.name",
                "",
                format!("already defined at {}; this copy is ignored", prev.at),
            ));
            return;
        }
        let at = at.to_owned();
        let object = object();
        self.out.objects.insert(key, Placed { at, object });
    }

    /// A Gateway with more endpoints than the limit is refused before it is
    /// decoded (decoding and electing among 100,000 endpoints stalls).
    fn too_many_endpoints(&mut self, object: &str, value: &Value) -> bool {
        let n = value
            .get("spec")
            .and_then(|s| s.get("endpoints"))
            .and_then(Value::as_sequence)
            .map_or(0, Vec::len);
        if n <= self.limits.max_endpoints {
            return false;
        }
        self.out.problems.push(Problem::error(
            object,
            "spec.endpoints",
            n.to_string(),
            format!(
                "more than {} endpoints (--manifest-max-endpoints); this document is ignored",
                self.limits.max_endpoints
            ),
        ));
        true
    }

    fn add_gateway(&mut self, at: &str, gw: v1beta1::Gateway) {
        let name = gw.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            self.out.problems.push(Problem::error(
                format!("Gateway ({at})"),
                "metadata.name",
                "",
                "missing",
            ));
            return;
        }
        // Admitted once, here: the parse is kept while the file is unchanged.
        self.add(gateway_key(&name), at, || {
            Object::Gateway(Box::new(admit(gw)))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Loaded {
        load(&[("m.yaml".to_owned(), text.to_owned())])
    }

    #[test]
    fn reads_gateways_of_both_versions_nodes_and_raven_cfg() {
        let l = one(r#"
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-a}
spec:
  tunnelConfig: {Replicas: 1}
  proxyConfig: {Replicas: 1, proxyHTTPPort: "10255,9445"}
  endpoints:
  - {nodeName: n1, type: tunnel, underNAT: true, natType: "FullCone", publicPort: 4600}
---
apiVersion: raven.openyurt.io/v1alpha1
kind: Gateway
metadata: {name: gw-b}
spec:
  endpoints: [{nodeName: n2, publicIP: 1.2.3.4}]
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {raven.openyurt.io/gateway: gw-a}}
spec: {podCIDR: 10.0.1.0/24}
status:
  conditions: [{type: Ready, status: "True"}]
  addresses: [{type: InternalIP, address: 192.168.1.10}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: raven-cfg, namespace: kube-system}
data: {enable-l3-tunnel: "true", enable-l7-proxy: "TRUE"}
"#);
        assert_eq!(l.problems, vec![]);
        let a = l.inputs.gateways["gw-a"].gateway();
        assert_eq!(a.spec.proxy_config.proxy_http_port, "10255,9445");
        assert_eq!(a.spec.endpoints[0].nat_type, "FullCone");
        assert_eq!(a.spec.endpoints[0].public_port, 4600);
        let b = l.inputs.gateways["gw-b"].gateway();
        assert_eq!(b.spec.endpoints[0].type_, "tunnel");
        assert_eq!(b.spec.tunnel_config.replicas, 1);
        let n1 = l
            .inputs
            .nodes
            .values()
            .next()
            .map(|n| (n.ready, n.internal_ip, n.pod_cidrs.clone()));
        assert_eq!(
            n1,
            Some((
                true,
                Some(
                    "192.168.1.10"
                        .parse()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into())
                ),
                vec!["10.0.1.0/24".parse().unwrap_or_default()]
            ))
        );
        assert!(l.inputs.config.enable_l3_tunnel && l.inputs.config.enable_l7_proxy);
    }

    #[test]
    fn a_type_error_names_document_and_field_and_the_rest_loads() {
        let l = one(r#"
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-bad}
spec:
  tunnelConfig: {Replicas: one}
---
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-good}
spec: {endpoints: []}
"#);
        assert_eq!(l.problems.len(), 1);
        let p = &l.problems[0];
        assert_eq!(p.object, "Gateway/gw-bad (m.yaml#1)");
        assert_eq!(p.field, "spec.tunnelConfig.Replicas");
        assert!(p.message.contains("one"), "{p}");
        assert!(l.inputs.gateways.contains_key("gw-good"));
    }

    #[test]
    fn a_key_repeated_with_the_same_value_is_a_warning_and_the_document_loads() {
        let l = one(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: raven-cfg, namespace: kube-system}\ndata: {enable-l3-tunnel: \"true\", enable-l3-tunnel: \"true\"}\n",
        );
        assert_eq!(l.problems.len(), 1);
        assert_eq!(l.problems[0].severity, crate::Severity::Warning);
        assert_eq!(l.problems[0].field, "data.enable-l3-tunnel");
        assert!(l.inputs.config.enable_l3_tunnel);
    }

    #[test]
    fn a_key_repeated_with_different_values_rejects_only_its_document() {
        let l = one(r#"
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-dup}
spec:
  endpoints:
  - nodeName: n1
    type: tunnel
    type: proxy
---
apiVersion: v1
kind: ConfigMap
metadata: {name: raven-cfg, namespace: kube-system}
data: {enable-l3-tunnel: "true"}
"#);
        assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
        assert_eq!(l.problems[0].object, "Gateway/gw-dup (m.yaml#1)");
        assert_eq!(l.problems[0].field, "spec.endpoints[0].type");
        assert_eq!(l.problems[0].value, "proxy");
        assert!(
            l.problems[0].message.contains("\"tunnel\""),
            "{}",
            l.problems[0]
        );
        assert!(l.inputs.gateways.is_empty());
        assert!(l.inputs.config.enable_l3_tunnel);
    }

    #[test]
    fn the_same_gateway_twice_keeps_the_first_and_names_both_places() {
        let gw = "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {name: gw-a}\nspec: {}\n";
        let l = load(&[("a.yaml".into(), gw.into()), ("b.yaml".into(), gw.into())]);
        assert_eq!(l.problems.len(), 1);
        assert!(l.problems[0].message.contains("a.yaml#1"));
        assert!(l.problems[0].object.contains("b.yaml#1"));
    }

    #[test]
    fn unknown_kinds_are_reported_and_skipped() {
        let l = one("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n");
        assert_eq!(l.problems[0].field, "kind");
        assert_eq!(l.problems[0].value, "apps/v1 Deployment");
    }

    #[test]
    fn list_items_are_loaded() {
        let l = one(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: raven.openyurt.io/v1beta1, kind: Gateway, metadata: {name: gw-l}, spec: {}}\n",
        );
        assert_eq!(l.problems, vec![]);
        assert!(l.inputs.gateways.contains_key("gw-l"));
    }

    #[test]
    fn the_copy_in_the_file_that_owned_an_object_wins_even_when_a_duplicate_sorts_earlier() {
        let gw = |port: u16| {
            format!(
                "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw-cloud}}\nspec: {{endpoints: [{{nodeName: n1, type: tunnel, port: {port}}}]}}\n"
            )
        };
        let files = [("0-dup.yaml".into(), gw(1)), ("gw.yaml".into(), gw(4500))];
        // Without history the first file by name wins.
        assert_eq!(
            load(&files).inputs.gateways["gw-cloud"]
                .gateway()
                .spec
                .endpoints[0]
                .port,
            1
        );
        let owners: Owners = [("Gateway/gw-cloud".to_owned(), "gw.yaml".to_owned())].into();
        let l = load_with(&files, Limits::default(), &owners);
        assert_eq!(
            l.inputs.gateways["gw-cloud"].gateway().spec.endpoints[0].port,
            4500
        );
        assert_eq!(l.origins["Gateway/gw-cloud"], "gw.yaml");
        assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
        assert_eq!(l.problems[0].object, "Gateway/gw-cloud (0-dup.yaml#1)");
        assert!(
            l.problems[0].message.contains("gw.yaml#1"),
            "{}",
            l.problems[0]
        );
    }

    #[test]
    fn a_file_over_the_document_cap_is_an_error_naming_the_file() {
        let doc = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\n".repeat(5);
        let limits = Limits {
            max_documents: 3,
            ..Default::default()
        };
        let l = load_with(&[("many.yaml".into(), doc)], limits, &Owners::new());
        let p = l
            .problems
            .iter()
            .find(|p| p.object == "many.yaml")
            .expect("cap reported");
        assert_eq!(p.severity, crate::Severity::Error);
        assert!(p.message.contains("--manifest-max-documents"), "{p}");
    }

    #[test]
    fn a_gateway_over_the_endpoint_cap_is_refused_and_named() {
        let eps = "  - {nodeName: n1, type: tunnel}\n".repeat(4);
        let text = format!(
            "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw-big}}\nspec:\n  endpoints:\n{eps}"
        );
        let limits = Limits {
            max_endpoints: 3,
            ..Default::default()
        };
        let l = load_with(&[("big.yaml".into(), text)], limits, &Owners::new());
        assert!(l.inputs.gateways.is_empty());
        assert_eq!(l.problems.len(), 1);
        assert_eq!(l.problems[0].object, "Gateway/gw-big (big.yaml#1)");
        assert_eq!(l.problems[0].field, "spec.endpoints");
        assert_eq!(l.problems[0].value, "4");
    }
}
