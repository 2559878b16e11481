//! **A real etcd + kube-apiserver v1.20.2 on loopback** for the Kubernetes
//! tests, started through `tests/kube/apiserver.sh` (certificates, etcd,
//! kube-apiserver; the binary comes from `tests/kube/build-apiserver.sh`,
//! cached under `/var/cache/raven-kube`).
//!
//! ```text
//! KubeApiServer::shared()   one server per test binary (started on first use),
//!   └─ .lock().await        tests take turns: the lock wipes Gateways, Nodes,
//!                           raven-cfg, Leases, Events, Services, then hands over
//! KubeApiServer::dedicated() a server of the test's own (outages: kill/start)
//! ```
//!
//! Gateways and Nodes are cluster-scoped and the hub watches all of them, so
//! two tests can never share a server at the same time; they share it one
//! after the other (starting a server costs 6–11 s, a wipe ~0.1 s). A test
//! that stops the API server gets a dedicated one.
//!
//! Every process is ended by PID: a dedicated server when dropped, the shared
//! one by a reaper process that waits for the test binary's end (EOF on a
//! pipe) and then runs `apiserver.sh stop`.
//!
//! Without the binary, `etcd`, `etcdctl`, `kubectl`, `openssl` or `curl` the tests are
//! skipped with a message — unless `RAVEN_REQUIRE_TOOLS` is set (CI), where
//! that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Where `tests/kube/build-apiserver.sh` caches the binary.
pub fn apiserver_binary() -> PathBuf {
    let cache = std::env::var_os("RAVEN_KUBE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/raven-kube"), PathBuf::from);
    cache.join("bin/kube-apiserver-v1.20.2")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/apiserver.sh")
}

/// The repository root (for `deploy/…`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Errors of the harness, with the command and its output.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("Kubernetes client: {0}")]
    Kube(String),
}

type Result<T> = std::result::Result<T, HarnessError>;

/// Whether the real server can run here. Without the tools the test is
/// skipped (returns false, with a message) — unless `RAVEN_REQUIRE_TOOLS` is
/// set, where that is a failure.
pub fn available() -> bool {
    let mut missing = Vec::new();
    if !apiserver_binary().is_file() {
        missing.push(format!(
            "{} (run tests/kube/build-apiserver.sh)",
            apiserver_binary().display()
        ));
    }
    for tool in ["etcd", "etcdctl", "kubectl", "openssl", "curl"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
            || Command::new(tool)
                .arg("version")
                .arg("--client")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
        if !found {
            missing.push(tool.to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("the real kube-apiserver tests need {}", missing.join(", "));
    assert!(
        std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
        "{why}; RAVEN_REQUIRE_TOOLS is set"
    );
    eprintln!("skipped: {why}");
    false
}

fn run(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| HarnessError::Io {
        what: command.clone(),
        source,
    })?;
    stdout_of(command, out)
}

/// The stdout of `command`, which ended as `out`; an error with its stderr
/// unless it succeeded.
fn stdout_of(command: String, out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One etcd + kube-apiserver, all its files in one directory.
#[derive(Debug)]
pub struct KubeApiServer {
    dir: PathBuf,
    /// Kept for a dedicated server (removed on drop); the shared one's is
    /// removed by its reaper.
    _tmp: Option<tempfile::TempDir>,
    port: u16,
    shared: bool,
}

static SHARED: OnceLock<std::result::Result<KubeApiServer, String>> = OnceLock::new();
/// Tests of one binary take the shared server in turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A turn on the shared server; the cluster was wiped when it began.
#[derive(Debug)]
pub struct Turn {
    pub server: &'static KubeApiServer,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Turn {
    type Target = KubeApiServer;
    fn deref(&self) -> &KubeApiServer {
        self.server
    }
}

impl KubeApiServer {
    fn start_in(
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        shared: bool,
        extra_flags: &str,
    ) -> Result<Self> {
        std::fs::write(dir.join("extra-flags"), extra_flags).map_err(|source| {
            HarnessError::Io {
                what: "writing extra-flags".into(),
                source,
            }
        })?;
        run(Command::new(script())
            .arg("start")
            .arg(&dir)
            .env("APISERVER_EXTRA_FLAGS", extra_flags))?;
        let port = std::fs::read_to_string(dir.join("apiserver.port"))
            .map_err(|source| HarnessError::Io {
                what: "reading apiserver.port".into(),
                source,
            })?
            .trim()
            .parse()
            .map_err(|e| HarnessError::Kube(format!("apiserver.port: {e}")))?;
        let server = Self {
            dir,
            _tmp: tmp,
            port,
            shared,
        };
        server.kubectl(&[
            "apply",
            "-f",
            &repo_root().join("deploy/crds").display().to_string(),
        ])?;
        server.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/gateways.raven.openyurt.io",
        ])?;
        Ok(server)
    }

    /// A server of this test's own, stopped (both processes, by PID) when
    /// dropped. `None`: skipped (see [`available`]).
    pub fn dedicated() -> Result<Option<Self>> {
        Self::dedicated_with("")
    }

    /// [`KubeApiServer::dedicated`] with extra kube-apiserver flags (e.g.
    /// `--watch-cache=false`, so watches read etcd and compaction 410s them).
    pub fn dedicated_with(extra_flags: &str) -> Result<Option<Self>> {
        if !available() {
            return Ok(None);
        }
        let tmp = tempfile::Builder::new()
            .prefix("raven-kube-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                what: "creating the server directory".into(),
                source,
            })?;
        let dir = tmp.path().to_owned();
        Self::start_in(dir, Some(tmp), false, extra_flags).map(Some)
    }

    /// The server shared by the tests of this binary, started on first use;
    /// waits for this test's turn and wipes the cluster. `None`: skipped.
    pub async fn shared() -> Result<Option<Turn>> {
        if !available() {
            return Ok(None);
        }
        let guard = TURN.lock().await;
        let server = tokio::task::spawn_blocking(|| {
            SHARED
                .get_or_init(|| Self::start_shared().map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|e| HarnessError::Kube(format!("starting the shared server: {e}")))
        })
        .await
        .map_err(|e| HarnessError::Kube(e.to_string()))??;
        server.wipe().await?;
        Ok(Some(Turn {
            server,
            _guard: guard,
        }))
    }

    fn start_shared() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("raven-kube-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        // The reaper: reads its stdin (our end of the pipe, never written)
        // until this process is gone, then stops what the script started.
        let reaper = format!(
            "cat >/dev/null; {} stop {}; rm -rf {}",
            script().display(),
            dir.display(),
            dir.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(reaper)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Io {
                what: "spawning the reaper".into(),
                source,
            })?;
        // Leaked on purpose: the write end stays open for as long as the
        // test binary lives.
        std::mem::forget(child);
        Self::start_in(dir, None, true, "")
    }

    /// Removes what tests create, so each turn starts from the same cluster
    /// (the CRD and the bootstrap objects stay).
    async fn wipe(&self) -> Result<()> {
        use k8s_openapi::api::coordination::v1::Lease;
        use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Event, Node, Service};
        use kube::Api;
        let client = self.client().await?;
        let all = ListParams::default();
        let gateways: Api<kube::api::DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource {
                group: "raven.openyurt.io".into(),
                version: "v1beta1".into(),
                api_version: "raven.openyurt.io/v1beta1".into(),
                kind: "Gateway".into(),
                plural: "gateways".into(),
            },
        );
        delete_collection(&gateways, &all).await?;
        delete_collection(&Api::<Node>::all(client.clone()), &all).await?;
        for ns in ["default", "kube-system"] {
            delete_collection(&Api::<Lease>::namespaced(client.clone(), ns), &all).await?;
            delete_collection(&Api::<Event>::namespaced(client.clone(), ns), &all).await?;
            delete_collection(
                &Api::<ConfigMap>::namespaced(client.clone(), ns),
                &ListParams::default().fields("metadata.name=raven-cfg"),
            )
            .await?;
            let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
            // Services have no DELETE on the collection.
            for selector in [
                "raven.openyurt.io/gateway",
                "app.kubernetes.io/managed-by=raven-hub",
            ] {
                let labelled = ListParams::default().labels(selector);
                for svc in svcs.list(&labelled).await.map_err(wipe_error)?.items {
                    if let Some(name) = svc.metadata.name {
                        svcs.delete(&name, &kube::api::DeleteParams::background())
                            .await
                            .map_err(wipe_error)?;
                    }
                }
            }
            // The Endpoints the hub keeps beside them (no endpoints
            // controller runs here to remove them with their Service).
            delete_collection(
                &Api::<Endpoints>::namespaced(client.clone(), ns),
                &ListParams::default().labels("app.kubernetes.io/managed-by=raven-hub"),
            )
            .await?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin (`system:masters`) kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A fresh admin client (one per test: a client belongs to the runtime
    /// it was made on).
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig()).await
    }

    /// Runs kubectl with this server's admin kubeconfig; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig())
            .args(args))
    }

    /// Runs kubectl with `stdin` as its input (`kubectl apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!("{cmd:?}");
        let io = |source| HarnessError::Io {
            what: command.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(io)?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).map_err(io)?;
        }
        let out = child.wait_with_output().map_err(io)?;
        stdout_of(command, out)
    }

    /// SIGKILLs kube-apiserver (etcd stays): an outage starting now.
    pub fn kill_apiserver(&self) -> Result<()> {
        assert!(!self.shared, "outages need a dedicated server");
        run(Command::new(script()).arg("kill-apiserver").arg(&self.dir)).map(drop)
    }

    /// Starts kube-apiserver again on the same port and waits for `/readyz`.
    pub fn start_apiserver(&self) -> Result<()> {
        assert!(!self.shared, "outages need a dedicated server");
        let flags = std::fs::read_to_string(self.dir.join("extra-flags")).unwrap_or_default();
        run(Command::new(script())
            .arg("start-apiserver")
            .arg(&self.dir)
            .env("APISERVER_EXTRA_FLAGS", flags))
        .map(drop)
    }

    /// Runs etcdctl against this server's etcd (v3 API).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let port = std::fs::read_to_string(self.dir.join("etcd.port")).map_err(|source| {
            HarnessError::Io {
                what: "reading etcd.port".into(),
                source,
            }
        })?;
        run(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=http://127.0.0.1:{}", port.trim()))
            .args(args))
    }

    /// A kubeconfig for a service account's token (`kubectl create token`),
    /// written next to the admin one; its path.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.kubectl(&["create", "token", "-n", namespace, name, "--duration=1h"])?;
        let path = self.dir.join(format!("kubeconfig-{namespace}-{name}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: raven-test\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: \"{}\"}}\ncontexts:\n- name: sa\n  context: {{cluster: raven-test, user: sa}}\ncurrent-context: sa\n",
            self.url(),
            self.dir.join("ca.crt").display(),
            token.trim()
        );
        std::fs::write(&path, text).map_err(|source| HarnessError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }
}

use kube::api::ListParams;

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| HarnessError::Kube(format!("{}: {e}", path.display())))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kube(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| HarnessError::Kube(e.to_string()))
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if !self.shared {
            let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        }
    }
}

/// Polls `f` every 50 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes (in the background) every object of `api` that `selected` lists,
/// for [`KubeApiServer`]'s wipe between turns.
async fn delete_collection<K>(api: &kube::Api<K>, selected: &ListParams) -> Result<()>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.delete_collection(&kube::api::DeleteParams::background(), selected)
        .await
        .map_err(wipe_error)?;
    Ok(())
}

fn wipe_error(e: kube::Error) -> HarnessError {
    HarnessError::Kube(format!("wiping the cluster: {e}"))
}

/// A TCP forwarder on 127.0.0.1 in front of the API server that can be cut:
/// a network partition between one client (the hub) and a real server,
/// while kubectl keeps talking to the server directly. TLS passes through
/// untouched (the server's certificate names 127.0.0.1).
#[derive(Debug)]
pub struct Partition {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled to close every forwarded connection.
    conns: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    pub async fn start(server: &KubeApiServer) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| HarnessError::Io {
                what: "binding the partition proxy".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| HarnessError::Io {
            what: "partition proxy address".into(),
            source,
        })?;
        let upstream = format!("127.0.0.1:{}", server.port);
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(
            tokio_util::sync::CancellationToken::new(),
        ));
        let (c, k) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(down); // refused: closed at once
                    continue;
                }
                let token = k
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            cut,
            conns,
            task,
        })
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut token = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        token.cancel();
        *token = tokio_util::sync::CancellationToken::new();
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A kubeconfig like `server`'s admin one, pointing at this proxy.
    pub fn kubeconfig(&self, server: &KubeApiServer) -> Result<PathBuf> {
        let text =
            std::fs::read_to_string(server.kubeconfig()).map_err(|source| HarnessError::Io {
                what: "reading the kubeconfig".into(),
                source,
            })?;
        let path = server
            .dir()
            .join(format!("kubeconfig-partition-{}", self.addr.port()));
        let text = text.replace(&server.url(), &format!("https://{}", self.addr));
        std::fs::write(&path, text).map_err(|source| HarnessError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Creates a Node labelled into `gateway` and sets its status (Ready,
/// InternalIP) through the status subresource, as a kubelet would.
pub async fn create_node(
    client: &kube::Client,
    name: &str,
    gateway: &str,
    ip: &str,
    pod_cidr: &str,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"raven.openyurt.io/gateway": gateway}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    }))
    .map_err(|e| HarnessError::Kube(e.to_string()))?;
    let err = |e: kube::Error| HarnessError::Kube(format!("node {name}: {e}"));
    api.create(&Default::default(), &node).await.map_err(err)?;
    set_node_status(client, name, ip, true).await
}

/// Sets a Node's Ready condition and InternalIP.
pub async fn set_node_status(
    client: &kube::Client,
    name: &str,
    ip: &str,
    ready: bool,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let status = serde_json::json!({"status": {
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        "addresses": [{"type": "InternalIP", "address": ip}],
    }});
    api.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .map_err(|e| HarnessError::Kube(format!("node {name} status: {e}")))?;
    Ok(())
}
