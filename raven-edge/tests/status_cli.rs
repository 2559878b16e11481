//! `raven-edge status`, `show` and `/metrics` as an operator meets them.
//!
//! `status` reads the running agent's `/status` (the real HTTP endpoint of
//! `raven_edge::http`, on a real socket, in this process) and prints role,
//! gateway, failover, hub contact, cache and a peer table; golden files hold
//! the table, wide, JSON and YAML forms (`UPDATE_GOLDEN=1` rewrites them).
//! The agent's `/metrics` pass `promtool check metrics` (skipped without
//! promtool unless `RAVEN_REQUIRE_TOOLS=1`).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use raven_cli::output::{Format, check_golden};
use raven_edge::agent::Health;
use raven_edge::cache::CachedState;
use raven_edge::status::{self, Status};
use raven_model::{GatewayName, NodeName, Topology};
use raven_proto::v1::PeerTunnelState;
use tokio_util::sync::CancellationToken;

const EXE: &str = env!("CARGO_BIN_EXE_raven-edge");
/// hangzhou's gateway in the user-manual example.
const NODE: &str = "izbp15inok0kbfkg3in52rz";

fn user_manual_state() -> CachedState {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../raven-core/tests/golden/user-manual/topology.json"),
    )
    .expect("the user-manual golden topology");
    let topology: Topology = serde_json::from_str(&text).expect("a topology");
    CachedState {
        epoch: "e1".into(),
        revision: 7,
        complete: true,
        resources: topology.resources,
    }
}

fn health_with_peers() -> Health {
    let h = Health::default();
    h.revision.store(7, std::sync::atomic::Ordering::Relaxed);
    h.dataplane_ok
        .store(true, std::sync::atomic::Ordering::Relaxed);
    h.hub_session
        .store(true, std::sync::atomic::Ordering::Relaxed);
    h.reconciles.store(12, std::sync::atomic::Ordering::Relaxed);
    h.ops_applied
        .store(40, std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut p) = h.peers.lock() {
        p.push(PeerTunnelState {
            peer_node: "izwz9dohcv74iegqecp4axz".into(),
            handshake_age_seconds: Some(17),
            rx_bytes: 3_400_000,
            tx_bytes: 1_200,
            endpoint: "203.0.113.10:4500".into(),
            relayed: false,
            direct_device: false,
            ..Default::default()
        });
        p.push(PeerTunnelState {
            peer_node: "izm5eb24dmjfimuaybpnqzz".into(),
            handshake_age_seconds: None,
            rx_bytes: 0,
            tx_bytes: 0,
            endpoint: "203.0.113.10:4500".into(),
            relayed: true,
            direct_device: false,
            ..Default::default()
        });
    }
    h
}

/// The fixed document of the golden files.
fn fixture() -> Status {
    let mut s = status::build(NODE, &health_with_peers(), &user_manual_state());
    s.hub.last_contact_seconds = Some(2);
    s
}

fn golden(format: Format, file: &str) {
    check_golden(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/status")
            .join(file),
        &status::render(&fixture(), format),
    );
}

#[test]
fn edge_status_table_golden() {
    golden(Format::Table, "table.txt");
}

#[test]
fn edge_status_wide_golden() {
    golden(Format::Wide, "wide.txt");
}

#[test]
fn edge_status_json_golden() {
    golden(Format::Json, "status.json");
}

#[test]
fn edge_status_yaml_golden() {
    golden(Format::Yaml, "status.yaml");
}

#[test]
fn the_role_follows_the_local_failover_in_effect() {
    let state = user_manual_state();
    let h = Health::default();
    // hangzhou's member, carrying the tunnel by local failover.
    let member = "izbp15inok0kbfkg3in52sz";
    assert_eq!(status::build(member, &h, &state).role, "member");
    if let (Ok(mut f), Ok(g), Ok(n)) = (
        h.local_failover.lock(),
        GatewayName::new("gw-hangzhou"),
        NodeName::new(member),
    ) {
        f.insert(g, n);
    }
    let s = status::build(member, &h, &state);
    assert_eq!(s.role, "gateway");
    assert_eq!(s.failover.elected.as_deref(), Some(NODE));
    assert_eq!(s.failover.in_use.as_deref(), Some(member));
    assert_eq!(
        status::build("not-in-the-topology", &h, &state).role,
        "none"
    );
}

/// Serves `raven_edge::http` on a loopback port; returns its address.
fn serve(rt: &tokio::runtime::Runtime, health: Health, state: CachedState) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(state));
    let sources = raven_edge::http::Sources {
        node: NODE.into(),
        health,
        state: rx,
    };
    // The sender is dropped: the receiver keeps the last value.
    rt.spawn(raven_edge::http::serve(
        listener,
        sources,
        CancellationToken::new(),
    ));
    addr
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(EXE).args(args).output().expect("raven-edge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn raven_edge_status_reads_the_running_agent_and_prints_the_peer_table() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr = serve(&rt, health_with_peers(), user_manual_state());
    let (ok, table, err) = run(&["status", "--http-addr", &addr]);
    assert!(ok, "{err}");
    for line in [
        "Role:       gateway, proxy\n",
        "Gateway:    gw-hangzhou\n",
        "Tunnel:     izbp15inok0kbfkg3in52rz (elected by the hub)\n",
        "Cache:      revision 7 (epoch e1), 13 resources\n",
        "PEER                      GATEWAY      PATH      ENDPOINT            HANDSHAKE   RX       TX\n",
        "izm5eb24dmjfimuaybpnqzz   gw-qingdao   relayed   203.0.113.10:4500   never       0B       0B\n",
        "izwz9dohcv74iegqecp4axz   gw-cloud     direct    203.0.113.10:4500   17s ago     3.2MiB   1.2KiB\n",
    ] {
        assert!(table.contains(line), "no {line:?} in\n{table}");
    }
    let (ok, json, err) = run(&["status", "--http-addr", &addr, "-o", "json"]);
    assert!(ok, "{err}");
    let doc: Status = serde_json::from_str(&json).expect("the JSON document");
    assert_eq!(doc.peers.len(), 2);
    assert_eq!(doc.role, "gateway");
}

#[test]
fn raven_edge_status_without_an_agent_says_where_it_looked_and_exits_non_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let addr = format!("127.0.0.1:{port}");
    let (ok, _, err) = run(&["status", "--http-addr", &addr]);
    assert!(!ok);
    assert!(
        err.contains(&format!("no agent answers on {addr}")),
        "{err}"
    );
}

#[test]
fn show_on_a_data_dir_without_a_cache_says_so_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_string_lossy().into_owned();
    let (ok, out, err) = run(&["show", "--node", NODE, "--data-dir", &data]);
    assert!(!ok, "{out}");
    assert!(err.contains(&format!("no cache in {data}/cache")), "{err}");
}

#[test]
fn the_agents_metrics_pass_promtool_with_peers_and_a_local_failover() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let h = health_with_peers();
    if let (Ok(mut f), Ok(g), Ok(n)) = (
        h.local_failover.lock(),
        GatewayName::new("gw-qingdao"),
        NodeName::new("izm5eb24dmjfimuaybpnr0z"),
    ) {
        f.insert(g, n);
    }
    h.last_contact_ms
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let addr = serve(&rt, h, CachedState::default());
    let text = http_get(&addr, "/metrics");
    for family in [
        "raven_edge_build_info{version=\"",
        "# TYPE raven_edge_reconciles_total counter\nraven_edge_reconciles_total 12\n",
        "raven_edge_tunnel_rx_bytes_total{peer=\"izwz9dohcv74iegqecp4axz\"} 3400000\n",
        "raven_edge_hub_contact_age_seconds ",
    ] {
        assert!(text.contains(family), "no {family:?} in\n{text}");
    }
    raven_cli::metrics::assert_promtool_clean(&text);
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut raw = String::new();
    c.read_to_string(&mut raw).expect("read");
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .expect("a response")
}

/// A `raven-edge run --dry-run` this test started, killed by its PID.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_running_agents_metrics_pass_promtool_and_its_status_says_it_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let addr = format!("127.0.0.1:{port}");
    // Dry run: observes the kernel, changes nothing; no hub.
    let dev = format!("rvst{}", std::process::id() % 100_000);
    let _agent = Agent(
        Command::new(EXE)
            .args([
                "run",
                "--dry-run",
                "--node",
                "n1",
                "--wireguard",
                "userspace",
            ])
            .args(["--tunnel-dev", &dev, "--http-addr", &addr, "--data-dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("raven-edge run"),
    );
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the agent did not listen on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = http_get(&addr, "/metrics");
    assert!(
        text.contains("raven_edge_holding_kernel_state 1\n"),
        "{text}"
    );
    raven_cli::metrics::assert_promtool_clean(&text);
    let (ok, table, err) = run(&["status", "--http-addr", &addr]);
    assert!(ok, "{err}");
    assert!(table.contains("Role:       none\n"), "{table}");
    assert!(
        table.contains(
            "Dataplane:  holding the kernel state as found: the topology cache holds nothing"
        ),
        "{table}"
    );
    assert!(table.contains("Hub:        never reached\n"), "{table}");
}

#[test]
fn diagnose_reports_a_silent_peer_with_what_to_do_and_exits_one() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr = serve(&rt, health_with_peers(), user_manual_state());
    let out = Command::new(EXE)
        .args([
            "diagnose",
            "--http-addr",
            &addr,
            "--tunnel-dev",
            "rv-absent0",
        ])
        .output()
        .expect("raven-edge diagnose");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |check: &str| {
        text.lines()
            .find(|l| l.starts_with(check))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {check} line in\n{text}"))
    };
    assert_eq!(
        line("UDP to izwz9dohcv74iegqecp4axz"),
        "UDP to izwz9dohcv74iegqecp4axz (gw-cloud) ok direct path via 203.0.113.10:4500: handshake 17s ago"
    );
    assert_eq!(
        line("UDP to izm5eb24dmjfimuaybpnqzz"),
        "UDP to izm5eb24dmjfimuaybpnqzz (gw-qingdao) error relayed path via 203.0.113.10:4500: no handshake ever"
    );
    assert!(text.contains("What to do:"), "{text}");
    let json = Command::new(EXE)
        .args(["diagnose", "--http-addr", &addr, "-o", "json"])
        .output()
        .expect("raven-edge diagnose -o json");
    let findings: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert!(findings.as_array().is_some_and(|a| {
        a.iter()
            .all(|f| f["check"].is_string() && f["fix"].is_string())
    }));
}
