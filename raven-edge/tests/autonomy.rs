//! Edge autonomy with real processes: a real `raven-hub` and a real
//! `raven-edge` run inside a network namespace made for the test. The agent
//! keeps the dataplane when it stops, and restores it from its cache with the
//! hub down — also after a "reboot" that wiped every raven link, route and
//! rule. Needs root; skipped otherwise unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use support::{Proc, agent_args, hub_args, ip, must, sibling, spawn_in};

const NODE: &str = "izbp15inok0kbfkg3in52sz";

fn is_root() -> bool {
    support::root_with(&[])
}

struct Lab {
    ns: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        let ns = format!("rva-{}", std::process::id());
        must(&["netns", "add", &ns]);
        let lab = Self {
            ns,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        must(&[
            "-n", &lab.ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        must(&["-n", &lab.ns, "addr", "add", "172.16.2.104/24", "dev", "v0"]);
        for l in ["lo", "v0", "v1"] {
            must(&["-n", &lab.ns, "link", "set", l, "up"]);
        }
        let certs = lab.dir.path().join("certs");
        let st = Command::new(sibling("raven-hub"))
            .args(["certs", "--out"])
            .arg(&certs)
            .args(["--node", NODE])
            .stdout(Stdio::null())
            .status()
            .expect("certs");
        assert!(st.success());
        lab
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn hub(&self) -> Proc {
        let manifests = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/user-manual"
        );
        let args = hub_args(manifests, self.dir.path(), "127.0.0.1:10270");
        spawn_in(
            &self.ns,
            &sibling("raven-hub"),
            &args,
            &self.path("hub.log"),
        )
    }

    fn agent(&self) -> Proc {
        let args = agent_args(
            NODE,
            &self.path("edge-data"),
            self.dir.path(),
            "https://127.0.0.1:10270",
            "localhost",
            &[],
        );
        spawn_in(
            &self.ns,
            Path::new(env!("CARGO_BIN_EXE_raven-edge")),
            &args,
            &self.path("edge.log"),
        )
    }

    fn remote_routes(&self) -> Vec<String> {
        let (_, out) = ip(&["-n", &self.ns, "route", "show", "table", "9027"]);
        out.lines()
            .filter(|l| l.contains("raven0"))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until the qingdao and cloud domains are routed; returns how long it took.
    fn converge(&self, what: &str) -> Duration {
        let t = Instant::now();
        loop {
            let r = self.remote_routes();
            if r.iter().any(|d| d == "10.244.3.0/24") && r.iter().any(|d| d == "10.244.0.0/24") {
                eprintln!("{what}: converged in {:?}", t.elapsed());
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(self.path("edge.log")).unwrap_or_default();
                panic!("{what}: no routes after 30 s: {r:?}\n--- edge log ---\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn agent_restarted_while_hub_down_restores_routes_from_cache() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let hub = lab.hub();
    let agent = lab.agent();
    lab.converge("first sync from the hub");

    // Stopping the agent and killing the hub leaves the dataplane in place.
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    hub.stop(nix::sys::signal::Signal::SIGKILL);
    assert!(
        lab.remote_routes().contains(&"10.244.3.0/24".to_owned()),
        "stopping the agent must not tear down"
    );

    // `show` reads the cache with the agent stopped and the hub down.
    let show = Command::new(env!("CARGO_BIN_EXE_raven-edge"))
        .args(["show", "--node", NODE, "--data-dir"])
        .arg(lab.path("edge-data"))
        .output()
        .expect("show");
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let cached: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert!(cached["revision"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(cached["complete"], true);

    // A "reboot": every raven link, route and rule is gone.
    must(&["-n", &lab.ns, "link", "del", "raven0"]);
    for (fam, prio) in [
        ("-4", "9027"),
        ("-4", "9028"),
        ("-6", "9027"),
        ("-6", "9028"),
    ] {
        must(&["-n", &lab.ns, fam, "rule", "del", "priority", prio]);
    }
    assert!(lab.remote_routes().is_empty());

    // The agent comes back with the hub still down: routes return from the cache.
    let agent = lab.agent();
    lab.converge("restart with the hub down, from the cache");
    let log = std::fs::read_to_string(lab.path("edge.log")).unwrap_or_default();
    assert!(log.contains("cache loaded"), "{log}");

    // Teardown is explicit, and complete.
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    let st = Command::new("ip")
        .args(["netns", "exec", &lab.ns])
        .arg(env!("CARGO_BIN_EXE_raven-edge"))
        .arg("teardown")
        .stderr(Stdio::null())
        .status()
        .expect("teardown");
    assert!(st.success());
    assert!(lab.remote_routes().is_empty());
    let (_, links) = ip(&["-n", &lab.ns, "link", "show", "raven0"]);
    assert!(links.contains("does not exist"), "{links}");
}
