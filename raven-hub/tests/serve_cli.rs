//! `raven-hub serve` and `raven-hub status` as an operator runs them.
//!
//! `serve` fails fast and logs what matters: a missing or bad TLS file stops
//! it at start with a non-zero exit naming the file; serving the embedded
//! demo topology says so; every problem of the topology is logged once, when
//! it appears; no log line carries Rust `Debug` output. Its `/metrics` pass
//! `promtool check metrics` (CI installs promtool; without it the test says
//! so and passes, unless `RAVEN_REQUIRE_TOOLS=1`). `status` shows a running
//! hub's gateways.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_raven-hub");

fn certs(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("certs");
    let st = Command::new(EXE)
        .args(["certs", "--node", "n1", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("certs");
    assert!(st.success());
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn serve(dir: &Path, certs: &Path, extra: &[&str]) -> Command {
    serve_on(dir, certs, "127.0.0.1:0", "127.0.0.1:0", extra)
}

fn serve_on(dir: &Path, certs: &Path, http: &str, plain: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(EXE);
    c.args([
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        http,
        "--plaintext-addr",
        plain,
    ])
    .arg("--certs")
    .arg(certs)
    .arg("--data-dir")
    .arg(dir.join("data"))
    .args(extra)
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1");
    c
}

/// Runs a `serve` that must exit by itself: its status and stderr.
fn run_to_exit(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start raven-hub");
    let started = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return (st.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("raven-hub serve kept running with a broken TLS file");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_with_missing_certificates_exits_non_zero_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("no-certs");
    std::fs::create_dir(&empty).expect("mkdir");
    let (code, stderr) = run_to_exit(serve(dir.path(), &empty, &[]));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "killed by a signal: {stderr}");
    let file = empty.join("hub.pem");
    assert!(
        stderr.contains(&format!("reading {}", file.display())),
        "the missing file is not named: {stderr}"
    );
}

#[test]
fn serve_with_a_certificate_that_is_not_pem_exits_non_zero_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    std::fs::write(certs.join("hub.pem"), "not a certificate\n").expect("write");
    let (code, stderr) = run_to_exit(serve(dir.path(), &certs, &[]));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is not a usable certificate",
            certs.join("hub.pem").display()
        )),
        "{stderr}"
    );
}

#[test]
fn serve_with_a_key_that_does_not_match_the_certificate_exits_non_zero_naming_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    // A valid key, but the node's, not the hub certificate's.
    std::fs::copy(
        certs.join("nodes/n1/node-key.pem"),
        certs.join("hub-key.pem"),
    )
    .expect("copy");
    let (code, stderr) = run_to_exit(serve(dir.path(), &certs, &[]));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "TLS configuration from {}",
            certs.join("hub.pem").display()
        )) && stderr.contains("hub-key.pem"),
        "{stderr}"
    );
}

/// A running `serve` whose stderr lines arrive on a channel.
struct Hub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Hub {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start raven-hub");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text` (20 s at most).
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        if self.seen.iter().any(|l| l.contains(text)) {
            return;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {text:?}; got:\n{}", self.seen.join("\n"));
    }

    /// Lines logged within `d` from now, added to `seen`.
    fn drain(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return,
            }
        }
    }

    fn count(&self, text: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(text)).count()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serving_the_embedded_demo_topology_is_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let mut hub = Hub::start(serve(dir.path(), &certs, &[]));
    hub.wait_for("raven-hub started");
    assert!(
        hub.count("WARN") >= 1 && hub.count("serving the embedded demo topology") == 1,
        "{}",
        hub.seen.join("\n")
    );
}

const BROKEN_GATEWAY: &str = "apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-two-tunnels}
spec:
  tunnelConfig: {Replicas: 2}
  endpoints:
  - {nodeName: t1, type: tunnel}
";

#[test]
fn every_new_problem_is_logged_once_naming_its_object_and_no_line_shows_rust_debug_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples/user-manual")
                .join(f),
            manifests.join(f),
        )
        .expect("copy");
    }
    std::fs::write(manifests.join("broken.yaml"), BROKEN_GATEWAY).expect("write");
    let mut hub = Hub::start(serve(
        dir.path(),
        &certs,
        &["--manifests", &manifests.to_string_lossy()],
    ));
    hub.wait_for("object=Gateway/gw-two-tunnels");
    hub.wait_for("the topology has problems");
    // A second broken file: only its problem is new.
    std::fs::write(
        manifests.join("broken-2.yaml"),
        BROKEN_GATEWAY.replace("gw-two-tunnels", "gw-three-tunnels"),
    )
    .expect("write");
    hub.wait_for("object=Gateway/gw-three-tunnels");
    hub.drain(Duration::from_millis(500));
    let log = hub.seen.join("\n");
    assert_eq!(hub.count("object=Gateway/gw-two-tunnels"), 1, "{log}");
    assert_eq!(hub.count("object=Gateway/gw-three-tunnels"), 1, "{log}");
    for debug in ["Some(", "None,", "None}", "[\""] {
        assert!(
            !log.contains(debug),
            "Rust Debug output {debug:?} in the log:\n{log}"
        );
    }
}

fn user_manual() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    )
    .to_owned()
}

/// `GET path` over HTTP/1.0: (head, body).
fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").expect("write");
    let mut raw = String::new();
    c.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

#[test]
fn the_hubs_metrics_pass_promtool_and_carry_build_info_and_fleet_signals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let http = format!("127.0.0.1:{}", free_port());
    let mut hub = Hub::start(serve_on(
        dir.path(),
        &certs,
        &http,
        "127.0.0.1:0",
        &["--manifests", &user_manual()],
    ));
    hub.wait_for("raven-hub started");
    let (head, text) = http_get(&http, "/metrics", None);
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for family in [
        "# TYPE raven_hub_pushes_total counter",
        "raven_hub_build_info{version=\"",
        "raven_hub_agents{state=\"connected\"} 0",
        "raven_hub_agents{state=\"disconnected\"} 0",
        "# TYPE raven_hub_agents_acked_behind gauge",
        "# TYPE raven_hub_compile_seconds histogram",
        "raven_hub_kubernetes_watch_errors_total{kind=\"gateway\"} 0",
    ] {
        assert!(text.contains(family), "no {family:?} in\n{text}");
    }
    raven_cli::metrics::assert_promtool_clean(&text);
    // Prometheus asks for OpenMetrics first, and gets it.
    let (head, om) = http_get(
        &http,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.ends_with("# EOF\n"), "{om}");
}

#[test]
fn hub_status_shows_a_running_hubs_gateways_as_a_table_and_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let plain = format!("127.0.0.1:{}", free_port());
    let mut hub = Hub::start(serve_on(
        dir.path(),
        &certs,
        "127.0.0.1:0",
        &plain,
        &["--manifests", &user_manual()],
    ));
    hub.wait_for("raven-hub started");
    let status = |args: &[&str]| {
        let out = Command::new(EXE)
            .args(["status", "--hub", &format!("http://{plain}")])
            .args(args)
            .output()
            .expect("raven-hub status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    // The first compile may still be on its way.
    let started = Instant::now();
    let mut table = status(&[]);
    while !table.contains("gw-cloud") && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        table = status(&[]);
    }
    assert!(
        table.starts_with("Topology: epoch ")
            && table.contains("\nGATEWAY ")
            && table.contains(" TUNNEL "),
        "{table}"
    );
    for gw in ["gw-cloud", "gw-hangzhou", "gw-qingdao"] {
        assert!(table.contains(gw), "{gw} missing:\n{table}");
    }
    assert!(table.contains("No agents have connected"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&status(&["-o", "json"])).expect("json");
    assert_eq!(json["gateways"].as_array().map(Vec::len), Some(3), "{json}");
    let yaml = status(&["-o", "yaml"]);
    assert!(yaml.contains("gateways:\n- "), "{yaml}");
}

#[test]
fn hub_status_without_a_hub_says_where_it_looked_and_exits_non_zero() {
    let port = free_port();
    let out = Command::new(EXE)
        .args(["status", "--hub", &format!("http://127.0.0.1:{port}")])
        .output()
        .expect("raven-hub status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot reach the hub at http://127.0.0.1:{port}")),
        "{stderr}"
    );
}
