//! The layer-7 proxy behind a real kube-apiserver v1.20.2
//! (`tests/kube/apiserver.sh`): its egress selector's `cluster` egress is
//! HTTPConnect over raven's CONNECT Unix socket, nodes are reached by
//! `Hostname`, and kubelet serving certificates are verified against the
//! kubelet CA (`--kubelet-certificate-authority`): `kubectl get --raw
//! .../nodes/<n>/proxy/...`, `kubectl logs` of a Pod bound to an edge node
//! and a long-lived upgraded (bidirectional) stream through
//! `nodes/<n>/proxy` all go through raven's tunnels to fake kubelets.
//!
//! Needs the kube-apiserver binary that `tests/kube/build-apiserver.sh`
//! caches and etcd; skipped otherwise unless `RAVEN_REQUIRE_TOOLS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raven_tests::fake_kubelet;
use raven_tests::proxy_rig::Rig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APISERVER: &str = "/var/cache/raven-kube/bin/kube-apiserver-v1.20.2";

fn ready() -> bool {
    let etcd = Command::new("sh")
        .args(["-c", "command -v etcd"])
        .output()
        .is_ok_and(|o| o.status.success());
    let ok = Path::new(APISERVER).exists() && etcd;
    if !ok {
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "needs {APISERVER} (tests/kube/build-apiserver.sh) and etcd (RAVEN_REQUIRE_TOOLS is set)"
        );
        eprintln!("skipped: needs {APISERVER} (tests/kube/build-apiserver.sh) and etcd");
    }
    ok
}

/// The API server this test started; stopped by the script, by PID.
struct ApiServer {
    dir: PathBuf,
}

impl ApiServer {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/apiserver.sh")
    }

    fn start(dir: &Path, extra_flags: &str) -> Self {
        let out = Command::new(Self::script())
            .args(["start", &dir.to_string_lossy()])
            .env("APISERVER_EXTRA_FLAGS", extra_flags)
            .output()
            .expect("apiserver.sh");
        let me = Self {
            dir: dir.to_owned(),
        };
        assert!(
            out.status.success(),
            "kube-apiserver did not start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("apiserver.log")).unwrap_or_default()
        );
        me
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        // Fed from a thread: kubectl may answer before it read it all.
        let feeder = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut i)) => {
                let text = text.to_owned();
                Some(std::thread::spawn(move || i.write_all(text.as_bytes())))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if let Some(f) = feeder {
            f.join()
                .map_err(|_| "stdin feeder panicked".to_owned())?
                .map_err(|e| format!("kubectl {args:?} stdin: {e}"))?;
        }
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?} (exit {:?}): {}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// [`Self::kubectl`], retried a few times: a loaded machine's etcd
    /// times requests out now and then (`apply` makes a retry harmless).
    fn kubectl_retried(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut last = String::new();
        for _ in 0..5 {
            match self.kubectl(args, stdin) {
                Ok(out) => return Ok(out),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Err(last)
    }

    fn port(&self) -> u16 {
        std::fs::read_to_string(self.dir.join("apiserver.port"))
            .expect("port file")
            .trim()
            .parse()
            .expect("port")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .args(["stop", &self.dir.to_string_lossy()])
            .status();
    }
}

fn node_yaml(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  - type: Hostname\n    address: {name}\n  - type: InternalIP\n    address: {ip}\n  daemonEndpoints:\n    kubeletEndpoint:\n      Port: {port}\n  conditions:\n  - type: Ready\n    status: \"True\"\n    reason: KubeletReady\n    message: fake\n    lastHeartbeatTime: \"2026-01-01T00:00:00Z\"\n    lastTransitionTime: \"2026-01-01T00:00:00Z\"\n---\n"
    )
}

/// A TLS client of the API server (server certificate checked; the
/// client authenticates with a bearer token: the script's admin
/// certificate is X.509 v1, which rustls refuses).
fn apiserver_tls(dir: &Path) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read(dir.join("ca.crt")).expect("ca.crt");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("ca")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The rig, and a kube-apiserver whose `cluster` egress is HTTPConnect
/// over `transport` (the YAML under `transport:`), with nodes h1, h2, s1
/// and lonely (in no gateway) and Pod web-0 bound to h2; returns once
/// `kubectl get --raw /api/v1/nodes/<n>/proxy/healthz` answered for each.
fn cluster(rt: &tokio::runtime::Runtime, transport: impl Fn(&Rig) -> String) -> (Rig, ApiServer) {
    let rig = rt.block_on(Rig::start());
    let dir = rig.dir.path().join("kube");
    std::fs::create_dir_all(&dir).expect("dir");
    let kubelet_ca = dir.join("kubelet-ca.pem");
    std::fs::write(&kubelet_ca, &rig.ca.cert_pem).expect("kubelet CA");
    let egress = dir.join("egress.yaml");
    std::fs::write(
        &egress,
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n{}",
            transport(&rig)
        ),
    )
    .expect("egress config");
    let flags = format!(
        "--egress-selector-config-file={} --kubelet-preferred-address-types=Hostname,InternalIP --kubelet-certificate-authority={}",
        egress.display(),
        kubelet_ca.display()
    );
    let api = ApiServer::start(&dir, &flags);

    let nodes: Vec<(&str, &str)> = raven_tests::proxy_rig::EDGES
        .iter()
        .map(|(n, _, ip)| (*n, *ip))
        .chain([raven_tests::proxy_rig::LONELY])
        .collect();
    let mut objects: String = nodes
        .iter()
        .map(|(n, ip)| node_yaml(n, ip, rig.kubelet_port))
        .collect();
    objects.push_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: default\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  namespace: default\nspec:\n  nodeName: h2\n  automountServiceAccountToken: false\n  containers:\n  - name: web\n    image: nginx\n",
    );
    api.kubectl_retried(&["apply", "-f", "-"], Some(&objects))
        .expect("nodes and pod");

    // kubectl get --raw .../nodes/<n>/proxy/...: each kubelet by name.
    for (n, _) in nodes {
        let t = Instant::now();
        let got = loop {
            match api.kubectl(
                &["get", "--raw", &format!("/api/v1/nodes/{n}/proxy/healthz")],
                None,
            ) {
                Ok(b) => break b,
                Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        assert_eq!(got.trim(), format!("ok {n}"));
    }
    (rig, api)
}

/// `kubectl logs web-0`: the stand-in kubelet of h2 answers.
fn kubectl_logs_of_web_0_come_from_h2(api: &ApiServer) {
    let logs = api
        .kubectl_retried(&["logs", "web-0"], None)
        .expect("kubectl logs");
    assert!(
        logs.contains("log line 1 of default/web-0/web on h2"),
        "{logs}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn kube_apiserver_reaches_edge_kubelets_by_name_through_raven_for_proxy_logs_exec_and_port_forward()
{
    if !ready() {
        return;
    }
    let rt = runtime();
    let (rig, api) = cluster(&rt, |rig| {
        format!("      uds:\n        udsName: {}\n", rig.socket.display())
    });
    let dir = api.dir.clone();
    // (`nodes/<n>:<port>/proxy` for a port other than the kubelet's is
    // not tried: v1.20 resolves the node name in its own DNS first, see
    // `IsProxyableHostname` in pkg/registry/core/node/strategy.go.)

    // kubectl logs of a Pod bound to h2.
    kubectl_logs_of_web_0_come_from_h2(&api);

    // A long-lived upgraded stream through nodes/<n>/proxy: bytes both
    // ways for a while, then a half-close.
    api.kubectl_retried(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: streamer\n  namespace: default\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: streamer\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\nsubjects:\n- kind: ServiceAccount\n  name: streamer\n  namespace: default\n"),
    )
    .expect("service account and binding");
    let token = api
        .kubectl_retried(&["create", "token", "streamer"], None)
        .expect("token")
        .trim()
        .to_owned();
    let tls = apiserver_tls(&dir);
    let port = api.port();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("apiserver");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let mut s = tokio_rustls::TlsConnector::from(tls)
            .connect(name.to_owned(), tcp)
            .await
            .expect("TLS to the apiserver");
        s.write_all(
            format!(
                "GET /api/v1/nodes/s1/proxy/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: raven-echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("upgrade request");
        let head = fake_kubelet::read_head(&mut s).await.expect("upgrade answer");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let started = Instant::now();
        let mut sent = 0usize;
        for round in 0..20u32 {
            let msg = format!("round {round} {}\n", "x".repeat(1000 * round as usize));
            s.write_all(msg.as_bytes()).await.expect("send");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.expect("echo");
            assert_eq!(back, msg.as_bytes());
            sent += msg.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "upgraded stream through kube-apiserver and raven: {sent} bytes echoed over {:?}",
            started.elapsed()
        );
    });

    kubectl_exec_works_through_raven(&api);
    kubectl_port_forward_works_through_raven(&api);
    drop(api);
    drop(rig);
}

/// `kubectl exec` of web-0 (bound to h2): the API server upgrades to
/// SPDY/3.1 with the stand-in kubelet through raven's tunnel; stdout,
/// stdin with its half-close, and the exit status all come back.
fn kubectl_exec_works_through_raven(api: &ApiServer) {
    let t = Instant::now();
    let out = api
        .kubectl_retried(&["exec", "web-0", "--", "hostname"], None)
        .expect("kubectl exec hostname");
    assert_eq!(out, "h2\n");
    eprintln!(
        "kubectl exec web-0 -- hostname: {out:?} in {:?}",
        t.elapsed()
    );
    // stdin to the pod, counted only after kubectl half-closes it.
    let input = "0123456789".repeat(100_000);
    let out = api
        .kubectl(&["exec", "-i", "web-0", "--", "wc", "-c"], Some(&input))
        .expect("kubectl exec -i wc -c");
    assert_eq!(out.trim(), "1000000");
    // Both ways at once: what goes in comes back.
    let input: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let t = Instant::now();
    let out = api
        .kubectl(&["exec", "-i", "web-0", "--", "cat"], Some(&input))
        .expect("kubectl exec -i cat");
    assert!(
        out == input,
        "cat returned {} of {} bytes",
        out.len(),
        input.len()
    );
    eprintln!(
        "kubectl exec -i web-0 -- cat: {} bytes back in {:?}",
        out.len(),
        t.elapsed()
    );
    // The exit status travels on the error stream.
    let err = api
        .kubectl(&["exec", "web-0", "--", "false"], None)
        .expect_err("false fails");
    assert!(
        err.contains("exit Some(1)") && err.contains("command terminated with exit code 1"),
        "{err}"
    );
}

/// `kubectl port-forward pod/web-0 :80`: two connections through the local
/// port, each echoed by the pod's port 80 and answered after its
/// half-close, over one SPDY connection through raven.
fn kubectl_port_forward_works_through_raven(api: &ApiServer) {
    use std::io::{BufRead, Read, Write};
    api.kubectl_retried(
        &[
            "patch",
            "pod",
            "web-0",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running"}}"#,
        ],
        None,
    )
    .expect("pod Running");
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(api.dir.join("kubeconfig"))
        .args(["port-forward", "--address", "127.0.0.1", "pod/web-0", ":80"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl port-forward");
    // Ended by PID whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let mut child = Kill(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().and_then(Result::ok).unwrap_or_else(|| {
        let mut e = String::new();
        let _ = child.0.stderr.take().map(|mut s| s.read_to_string(&mut e));
        panic!("kubectl port-forward printed nothing: {e}")
    });
    // "Forwarding from 127.0.0.1:PORT -> 80"
    let local: u16 = line
        .split_once("127.0.0.1:")
        .and_then(|(_, r)| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no local port in {line:?}"));
    let t = Instant::now();
    for conn in 0..2 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).expect("local port");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut sent = 0;
        for round in 0..10 {
            let msg = format!("conn {conn} round {round} {}\n", "y".repeat(5000 * round));
            s.write_all(msg.as_bytes()).expect("send");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).expect("echo");
            assert_eq!(back, msg.as_bytes());
            sent += msg.len();
        }
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut rest = String::new();
        s.read_to_string(&mut rest)
            .expect("answer after half-close");
        assert_eq!(
            rest,
            format!("\n{sent} bytes echoed by pod web-0 on h2, port 80\n")
        );
    }
    eprintln!(
        "kubectl port-forward: two connections echoed and answered after half-close in {:?}",
        t.elapsed()
    );
}

#[test]
fn kube_apiserver_dials_the_tcp_connect_listener_with_tls_and_its_client_certificate() {
    if !ready() {
        return;
    }
    let rt = runtime();
    // transport.tcp with tlsConfig: kube-apiserver verifies raven's
    // serving certificate against caBundle and presents clientCert.
    let (rig, api) = cluster(&rt, |rig| {
        let e = &rig.egress;
        format!(
            "      tcp:\n        url: https://{}\n        tlsConfig:\n          caBundle: {}\n          clientKey: {}\n          clientCert: {}\n",
            e.addr,
            e.ca_file.display(),
            e.client_key.display(),
            e.client_cert.display()
        )
    });
    kubectl_logs_of_web_0_come_from_h2(&api);
    let out = api
        .kubectl_retried(&["exec", "web-0", "--", "hostname"], None)
        .expect("kubectl exec over the TLS CONNECT listener");
    assert_eq!(out, "h2\n");
    drop(api);
    drop(rig);
}
