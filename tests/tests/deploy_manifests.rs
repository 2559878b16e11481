//! The Kubernetes install in `deploy/`: every overlay renders with
//! `kubectl kustomize` into objects that have what running raven on a real
//! cluster needs (checked field by field below), and a real kube-apiserver
//! (v1.20.2, `tests/kube/apiserver.sh`) accepts every object of every
//! overlay in a server-side dry run.
//!
//! Needs kubectl ≥ 1.21 (kustomize components; Debian's kubernetes-client
//! 1.20 embeds kustomize v2, which has none) and, for the dry run, the
//! kube-apiserver binary and etcd; skipped otherwise unless
//! `RAVEN_REQUIRE_TOOLS=1`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

/// kubectl's client minor version, when kubectl runs.
fn kubectl_minor() -> Option<u32> {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["clientVersion"]["minor"]
        .as_str()?
        .trim_end_matches('+')
        .parse()
        .ok()
}

fn have_kubectl() -> bool {
    match kubectl_minor() {
        Some(m) if m >= 21 => true,
        found => {
            let why = format!(
                "needs kubectl >= 1.21 (kustomize components), found {found:?} (Debian's kubernetes-client 1.20 is too old)"
            );
            assert!(
                std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
                "{why}; RAVEN_REQUIRE_TOOLS is set"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// The overlays: every directory of deploy/overlays.
fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/overlays"))
        .expect("deploy/overlays")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 3, "overlays: {dirs:?}");
    dirs
}

/// `path` relative to `from` (kustomize refuses absolute paths).
fn relative(path: &Path, from: &Path) -> PathBuf {
    let ups = from.components().count() - 1;
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    rel.join(path.strip_prefix("/").expect("absolute"))
}

/// A kustomization in `dir` of `resource` (an overlay) with `components`.
fn compose(dir: &Path, resource: &Path, components: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let comps: Vec<String> = components
        .iter()
        .map(|c| {
            relative(&repo().join("deploy/components").join(c), dir)
                .display()
                .to_string()
        })
        .collect();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\ncomponents: [{}]\n",
            relative(resource, dir).display(),
            comps.join(", ")
        ),
    )
    .expect("write kustomization");
    dir.to_owned()
}

/// The userspace overlay with every optional component, composed in `tmp`.
fn every_component(tmp: &Path) -> PathBuf {
    compose(
        &tmp.join("all"),
        &repo().join("deploy/overlays/userspace-wireguard"),
        &[
            "servicemonitor",
            "iptables-legacy",
            "kubernetes-1.20",
            "kubelet-identity",
        ],
    )
}

/// `kubectl kustomize DIR`: the YAML and its objects.
fn render(dir: &Path) -> (String, Vec<Value>) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    let docs = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect();
    (yaml, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn host_paths(pod: &Value) -> BTreeSet<(String, String)> {
    pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let hp = &v["hostPath"];
            Some((
                hp["path"].as_str()?.to_owned(),
                hp["type"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

/// What every overlay must have; returns the edge agent's WireGuard mode.
fn check_install(what: &str, docs: &[Value]) -> String {
    let version = env!("CARGO_PKG_VERSION");
    // Images: raven's own, all of this version.
    for d in docs {
        let pod = &d["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().into_iter().flatten() {
            let image = c["image"].as_str().unwrap_or_default();
            assert!(
                image.starts_with("localhost/raven-") && image.ends_with(&format!(":{version}")),
                "{what}: {} uses image {image}",
                d["metadata"]["name"]
            );
        }
    }
    assert!(
        find(
            docs,
            "CustomResourceDefinition",
            "gateways.raven.openyurt.io"
        )
        .is_some(),
        "{what}: the Gateway CRD"
    );

    // The agent.
    let ds = find(docs, "DaemonSet", "raven-edge").unwrap_or_else(|| panic!("{what}: no agent"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "{what}: agent hostNetwork");
    assert_eq!(
        pod["dnsPolicy"], "ClusterFirstWithHostNet",
        "{what}: cluster DNS from the host network"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical", "{what}");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "{what}: the agent tolerates every taint"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"], "RollingUpdate",
        "{what}"
    );
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "{what}: no API token on edges"
    );
    let edge = &pod["containers"][0];
    let sc = &edge["securityContext"];
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_owned()])
    );
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        BTreeSet::from(["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
        "{what}: the agent has exactly NET_ADMIN and NET_RAW"
    );
    assert_ne!(sc["privileged"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            edge[probe]["httpGet"]["host"], "127.0.0.1",
            "{what}: the agent's {probe} on its loopback listener"
        );
    }
    assert!(
        env(edge, "RAVEN_HTTP_ADDR")
            .and_then(|e| e["value"].as_str())
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{what}: the agent's /metrics stays on loopback"
    );
    assert!(
        edge["resources"]["requests"]["memory"].is_string()
            && edge["resources"]["limits"]["memory"].is_string(),
        "{what}: agent resources"
    );
    let paths = host_paths(pod);
    for p in ["/var/lib/raven", "/etc/raven/certs", "/var/run/wireguard"] {
        assert!(
            paths.iter().any(|(hp, _)| hp == p),
            "{what}: hostPath {p}: {paths:?}"
        );
    }
    let hubs = env(edge, "RAVEN_HUBS").expect("RAVEN_HUBS");
    let cm_name = hubs["valueFrom"]["configMapKeyRef"]["name"]
        .as_str()
        .expect("hubs from a ConfigMap");
    let cm =
        find(docs, "ConfigMap", cm_name).unwrap_or_else(|| panic!("{what}: ConfigMap {cm_name}"));
    assert!(
        cm["data"]["hubs"]
            .as_str()
            .is_some_and(|h| h.starts_with("https://"))
    );

    // The hub.
    let dep = find(docs, "Deployment", "raven-hub").unwrap_or_else(|| panic!("{what}: no hub"));
    let hpod = &dep["spec"]["template"]["spec"];
    assert_eq!(hpod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert!(
        hpod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0)
    );
    assert_eq!(
        hpod["priorityClassName"], "system-cluster-critical",
        "{what}"
    );
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert!(
        hpod["topologySpreadConstraints"]
            .as_array()
            .is_some_and(|t| t
                .iter()
                .any(|t| t["topologyKey"] == "kubernetes.io/hostname")),
        "{what}: hub replicas spread over nodes"
    );
    let affinity = hpod["affinity"]["nodeAffinity"].to_string();
    assert!(
        affinity.contains("openyurt.io/is-edge-worker") && affinity.contains("NotIn"),
        "{what}: the hub stays off edge nodes: {affinity}"
    );
    let hub = &hpod["containers"][0];
    assert_eq!(
        hub["securityContext"]["readOnlyRootFilesystem"], true,
        "{what}"
    );
    assert_eq!(
        strings(&hub["securityContext"]["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_owned()])
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(hub[probe]["httpGet"].is_object(), "{what}: hub {probe}");
    }
    assert!(
        hub["resources"]["requests"]["cpu"].is_string(),
        "{what}: hub resources"
    );
    let certs = hpod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["secret"].is_object()))
        .expect("the hub's certificate Secret");
    // 0440 + fsGroup: readable by the non-root hub (and its group) only.
    assert_eq!(certs["secret"]["defaultMode"], 0o440, "{what}");
    assert!(
        hpod["securityContext"]["fsGroup"].is_u64(),
        "{what}: fsGroup"
    );
    let args: Vec<String> = hub["args"]
        .as_array()
        .expect("hub args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    if let Err(e) = <raven_hub::args::Args as clap::Parser>::try_parse_from(
        std::iter::once("raven-hub".to_owned()).chain(args),
    ) {
        panic!("{what}: the hub's args do not parse: {e}");
    }
    let pdb = docs
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .unwrap_or_else(|| panic!("{what}: no PodDisruptionBudget"));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    // /metrics (10272) only from Prometheus; gRPC from anywhere.
    let np = find(docs, "NetworkPolicy", "raven-hub")
        .unwrap_or_else(|| panic!("{what}: no NetworkPolicy"));
    let rules = np["spec"]["ingress"].as_array().expect("ingress");
    let metrics = rules
        .iter()
        .find(|r| r["ports"].to_string().contains("10272"))
        .expect("a rule for 10272");
    assert!(
        metrics["from"].as_array().is_some_and(|f| !f.is_empty()),
        "{what}: /metrics is open to everyone"
    );

    env(edge, "RAVEN_WIREGUARD")
        .and_then(|e| e["value"].as_str())
        .unwrap_or("auto")
        .to_owned()
}

/// With userspace WireGuard: wireguard-go in its own DaemonSet, one
/// container per device, with exactly NET_ADMIN and the tun device.
fn check_userspace(what: &str, docs: &[Value]) {
    let edge = &find(docs, "DaemonSet", "raven-edge").expect("agent")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        env(edge, "RAVEN_WIREGUARD_GO").map(|e| &e["value"]),
        Some(&Value::from("external")),
        "{what}: the agent must not start wireguard-go in its own container"
    );
    let dev = env(edge, "RAVEN_TUNNEL_DEV")
        .and_then(|e| e["value"].as_str())
        .unwrap_or("raven-wg0");
    let ds = find(docs, "DaemonSet", "raven-wireguard")
        .unwrap_or_else(|| panic!("{what}: no raven-wireguard DaemonSet"));
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"], "OnDelete",
        "{what}: replacing wireguard-go drops the tunnel; never rolled automatically"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        host_paths(pod).contains(&("/dev/net/tun".to_owned(), "CharDevice".to_owned())),
        "{what}: /dev/net/tun"
    );
    assert!(
        host_paths(pod)
            .iter()
            .any(|(p, _)| p == "/var/run/wireguard")
    );
    let mut devices = BTreeSet::new();
    for c in pod["containers"].as_array().expect("containers") {
        let caps = &c["securityContext"]["capabilities"];
        assert_eq!(
            strings(&caps["add"]),
            BTreeSet::from(["NET_ADMIN".to_owned()])
        );
        assert_eq!(strings(&caps["drop"]), BTreeSet::from(["ALL".to_owned()]));
        devices.extend(strings(&c["args"]));
    }
    assert_eq!(
        devices,
        BTreeSet::from([dev.to_owned(), format!("{dev}d")]),
        "{what}: wireguard-go runs the agent's tunnel and direct-path devices"
    );
}

#[test]
fn every_overlay_renders_the_objects_a_real_install_needs() {
    if !have_kubectl() {
        return;
    }
    let mut modes = BTreeSet::new();
    for dir in overlays() {
        let what = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (_, docs) = render(&dir);
        let mode = check_install(&what, &docs);
        match mode.as_str() {
            "userspace" => check_userspace(&what, &docs),
            "kernel" => assert!(
                find(&docs, "DaemonSet", "raven-wireguard").is_none(),
                "{what}: wireguard-go with kernel WireGuard"
            ),
            other => panic!("{what}: RAVEN_WIREGUARD={other}"),
        }
        // NATed edges dial a public address, never the in-cluster Service.
        let hubs = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap")
            .map(|c| c["data"]["hubs"].to_string())
            .unwrap_or_default();
        if let Some(lb) = find(&docs, "Service", "raven-hub-public") {
            assert_eq!(lb["spec"]["type"], "LoadBalancer");
            let ports: Vec<&Value> = lb["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .collect();
            assert!(
                ports.len() == 1 && ports[0]["port"] == 10270,
                "{what}: only gRPC is public: {ports:?}"
            );
            assert!(!hubs.contains(".svc"), "{what}: NATed edges dial {hubs}");
        }
        eprintln!("{what}: {} objects, WireGuard {mode}", docs.len());
        modes.insert(mode);
    }
    assert_eq!(
        modes,
        BTreeSet::from(["kernel".to_owned(), "userspace".to_owned()]),
        "overlays for both WireGuard implementations"
    );
}

#[test]
fn every_optional_component_composes_with_the_overlays() {
    if !have_kubectl() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = every_component(tmp.path());
    let (_, docs) = render(&dir);
    check_install("all components", &docs);
    check_userspace("all components", &docs);
    let sm = find(&docs, "ServiceMonitor", "raven-hub").expect("ServiceMonitor");
    let svc = find(&docs, "Service", "raven-hub").expect("hub Service");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        svc["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    let port = sm["spec"]["endpoints"][0]["port"].clone();
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == port)),
        "the ServiceMonitor scrapes a port of the hub's Service"
    );
    let edge = &find(&docs, "DaemonSet", "raven-edge").expect("agent")["spec"]["template"]["spec"]
        ["containers"][0];
    assert!(
        env(edge, "PATH")
            .and_then(|p| p["value"].as_str())
            .is_some_and(|p| p.starts_with("/usr/lib/raven/iptables-legacy:")),
        "legacy iptables first on PATH"
    );
    // kubelet-identity: the kubelet's certificate (read-only) for the agent,
    // the cluster CA for the hub.
    let cert = env(edge, "RAVEN_CLIENT_CERT")
        .and_then(|e| e["value"].as_str())
        .expect("RAVEN_CLIENT_CERT");
    let edge_pod =
        &find(&docs, "DaemonSet", "raven-edge").expect("agent")["spec"]["template"]["spec"];
    let mount = edge["volumeMounts"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| cert.starts_with(m["mountPath"].as_str().unwrap_or("-")))
        })
        .expect("the kubelet certificate's directory is mounted");
    assert_eq!(mount["readOnly"], true);
    assert!(
        host_paths(edge_pod)
            .iter()
            .any(|(p, _)| p == "/var/lib/kubelet/pki")
    );
    let hub = &find(&docs, "Deployment", "raven-hub").expect("hub")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        env(hub, "RAVEN_CLIENT_CA").map(|e| &e["value"]),
        Some(&Value::from(
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        ))
    );
    let pdbs: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "PodDisruptionBudget")
        .collect();
    assert!(
        pdbs.len() == 1 && pdbs[0]["apiVersion"] == "policy/v1beta1",
        "kubernetes-1.20 swaps the budget's API version: {pdbs:?}"
    );
}

/// etcd and kube-apiserver started by `tests/kube/apiserver.sh` in a
/// directory of this test; stopped (by the PIDs it recorded) on drop.
struct ApiServer(tempfile::TempDir);

impl ApiServer {
    fn start() -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = repo().join("tests/kube/apiserver.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("apiserver.sh");
        if !out.status.success() {
            let why = format!(
                "the real kube-apiserver did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
                "{why}; RAVEN_REQUIRE_TOOLS is set"
            );
            eprintln!("skipped: {why}");
            let _ = Command::new(&script).arg("stop").arg(dir.path()).status();
            return None;
        }
        Some(Self(dir))
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.0.path().join("kubeconfig"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        let out = child.wait_with_output().expect("kubectl ran");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tests/kube/apiserver.sh"))
            .arg("stop")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_real_api_server_accepts_every_object_of_every_overlay_in_a_server_side_dry_run() {
    if !have_kubectl() {
        return;
    }
    let Some(api) = ApiServer::start() else {
        return;
    };
    // ServiceMonitor's CRD comes with the Prometheus Operator, which a bare
    // API server lacks: a stand-in of the same group, version and kind.
    let crd = repo().join("tests/fixtures/servicemonitor-crd.yaml");
    let (ok, out) = api.kubectl(&["apply", "-f", crd.to_str().unwrap_or_default()], None);
    assert!(ok, "{out}");
    let (ok, out) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        None,
    );
    assert!(ok, "{out}");

    // This API server is 1.20: PodDisruptionBudget policy/v1 came in 1.21,
    // so each overlay goes in with the kubernetes-1.20 component (its PDB as
    // policy/v1beta1); everything else is exactly the overlay's.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cases: Vec<(String, PathBuf)> = overlays()
        .into_iter()
        .map(|o| {
            let name = o
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let dir = compose(&tmp.path().join(&name), &o, &["kubernetes-1.20"]);
            (name, dir)
        })
        .collect();
    cases.push(("every component".into(), every_component(tmp.path())));
    for (what, dir) in cases {
        let (yaml, docs) = render(&dir);
        let (ok, out) = api.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&yaml));
        assert!(ok, "{what}: the API server refused an object:\n{out}");
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(
            accepted,
            docs.len(),
            "{what}: every object accepted in the dry run:\n{out}"
        );
        eprintln!(
            "{what}: {accepted} objects accepted by kube-apiserver v1.20.2 (server-side dry run)"
        );
    }
    // The uninstall Job, for one node.
    let job = std::fs::read_to_string(repo().join("deploy/uninstall/teardown-job.yaml"))
        .expect("teardown job")
        .replace("NODE_NAME", "edge-node-1");
    let (ok, out) = api.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&job));
    assert!(
        ok && out.contains("job.batch/raven-teardown-edge-node-1 created (server dry run)"),
        "the teardown Job: {out}"
    );
}
