//! Edge autonomy with real processes: a real `raven-hub` and a real
//! `raven-edge` run inside a network namespace made for the test. The agent
//! keeps the dataplane when it stops, and restores it from its cache with the
//! hub down — also after a "reboot" that wiped every raven link, route and
//! rule — and, when its cache is corrupt or lost, holds what the kernel has
//! until the hub's complete snapshot arrives. Needs root; skipped otherwise
//! unless `RAVEN_REQUIRE_TOOLS=1`.

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
    /// A namespace of its own per test (`tag`) and run (namespace names
    /// are global to the machine).
    fn new(tag: &str) -> Self {
        let ns = format!("rva{tag}-{}", std::process::id());
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
    let lab = Lab::new("r");
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

impl Lab {
    /// What raven owns in the kernel that a reconcile could change: the
    /// routes of tables 9027/9028 (both families), raven's rules, and
    /// `raven0` with its addresses, FDB and neighbours.
    fn kernel_state(&self) -> String {
        let mut s = String::new();
        for args in [
            &["-4", "route", "show", "table", "9027"][..],
            &["-6", "route", "show", "table", "9027"],
            &["-4", "route", "show", "table", "9028"],
            &["-6", "route", "show", "table", "9028"],
            &["-4", "rule", "show"],
            &["-6", "rule", "show"],
            &["-d", "-br", "addr", "show", "dev", "raven0"],
            &["-d", "link", "show", "dev", "raven0"],
            &["neigh", "show", "dev", "raven0", "nud", "permanent"],
        ] {
            let mut full = vec!["-n", self.ns.as_str()];
            full.extend_from_slice(args);
            s.push_str(&format!("$ ip {}\n{}", args.join(" "), ip(&full).1));
        }
        let out = Command::new("bridge")
            .args(["-n", &self.ns, "fdb", "show", "dev", "raven0"])
            .output()
            .expect("bridge");
        s.push_str("$ bridge fdb show dev raven0\n");
        s.push_str(&String::from_utf8_lossy(&out.stdout));
        s
    }

    /// `GET http://127.0.0.1:10273/<what>` inside the namespace: (status, body).
    fn http(&self, what: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://127.0.0.1:10273/{what}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// `raven-edge plan` in the namespace: (success, stdout, stderr).
    fn plan(&self) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(env!("CARGO_BIN_EXE_raven-edge"))
            .args(["plan", "--node", NODE, "--data-dir"])
            .arg(self.path("edge-data"))
            .output()
            .expect("plan");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn wait_log(&self, what: &str, needle: &str, timeout: Duration) {
        let t = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.path("edge.log")).unwrap_or_default();
            if log.contains(needle) {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "{what}: no {needle:?} in the edge log after {timeout:?}\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Copies the files of directory `from` into `to` (flat and nested).
fn copy_dir(from: &Path, to: &Path, skip: &str) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        if e.file_name() == skip {
            continue;
        }
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target, skip);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

#[test]
fn a_corrupt_cache_with_the_hub_down_keeps_the_kernel_state_until_a_complete_snapshot() {
    if !is_root() {
        return;
    }
    let lab = Lab::new("c");
    let cache = lab.path("edge-data/cache");
    let hub = lab.hub();
    let agent = lab.agent();
    lab.converge("first sync from the hub");
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    // The store as it was (sled's files, not its head file) …
    let old = lab.path("old-sled-files");
    copy_dir(&cache, &old, "raven-head");
    // … then more acknowledged writes (the agent records the hub it
    // reached) …
    let agent = lab.agent();
    lab.wait_log("second start", "connected to hub", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    hub.stop(nix::sys::signal::Signal::SIGKILL);
    // … and sled's files go back to the old ones, as when sled truncates a
    // torn log: the head file still says what was acknowledged.
    for e in std::fs::read_dir(&cache).expect("cache dir").flatten() {
        if e.file_name() != "raven-head" {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).expect("rm");
            } else {
                std::fs::remove_file(&p).expect("rm");
            }
        }
    }
    copy_dir(&old, &cache, "raven-head");
    let before = lab.kernel_state();
    assert!(before.contains("10.244.3.0/24"), "{before}");

    // `plan` tells what `run` would do: nothing.
    let (ok, out, err) = lab.plan();
    assert!(ok, "plan on a corrupt cache: {err}");
    assert!(out.trim().is_empty(), "plan must change nothing:\n{out}");
    assert!(
        err.contains("0 change(s)") && err.contains("hold"),
        "plan must say it holds:\n{err}"
    );
    eprintln!("plan on the corrupt cache:\n{}", err.trim());

    // The agent restarts with the hub still down.
    std::fs::write(lab.path("edge.log"), "").expect("truncate log");
    let t = Instant::now();
    let _agent = lab.agent();
    lab.wait_log(
        "restart on a corrupt cache",
        "moved aside",
        Duration::from_secs(10),
    );
    let mut readyz = (0, String::new());
    while t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(500));
        let now = lab.kernel_state();
        assert_eq!(
            now,
            before,
            "the kernel changed {:?} after a restart on a corrupt cache with the hub down\n--- edge log ---\n{}",
            t.elapsed(),
            std::fs::read_to_string(lab.path("edge.log")).unwrap_or_default()
        );
        readyz = lab.http("readyz");
    }
    eprintln!("/readyz while holding: {} {}", readyz.0, readyz.1.trim());
    assert_eq!(readyz.0, 503, "{readyz:?}");
    assert!(readyz.1.contains("holding"), "{readyz:?}");
    let (_, metrics) = lab.http("metrics");
    assert!(
        metrics.contains("raven_edge_holding_kernel_state 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(lab.path("edge.log")).unwrap_or_default();
    assert!(log.contains("holding the kernel state"), "{log}");
    // The agent moved the cache aside: `plan` still says it holds.
    let (ok, out, err) = lab.plan();
    assert!(
        ok && out.trim().is_empty() && err.contains("hold"),
        "{out}\n{err}"
    );

    // A hub answers: its complete snapshot is applied, and the agent is
    // ready again.
    let t = Instant::now();
    let _hub = lab.hub();
    lab.wait_log(
        "the hub is back",
        "complete snapshot persisted",
        Duration::from_secs(30),
    );
    let applied = loop {
        let r = lab.http("readyz");
        if r.0 == 200 {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("hub back: topology applied {applied:?} after the hub started");
    assert!(lab.remote_routes().contains(&"10.244.3.0/24".to_owned()));
    let (_, metrics) = lab.http("metrics");
    assert!(
        metrics.contains("raven_edge_holding_kernel_state 0"),
        "{metrics}"
    );
    assert_eq!(
        lab.kernel_state(),
        before,
        "the same topology, the same kernel"
    );
}

#[test]
fn a_lost_cache_with_the_hub_down_keeps_the_kernel_state() {
    if !is_root() {
        return;
    }
    let lab = Lab::new("l");
    let hub = lab.hub();
    let agent = lab.agent();
    lab.converge("first sync from the hub");
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    hub.stop(nix::sys::signal::Signal::SIGKILL);
    // The data directory's cache is gone (a wiped disk, a new volume).
    std::fs::remove_dir_all(lab.path("edge-data/cache")).expect("rm cache");
    let before = lab.kernel_state();
    let (ok, out, err) = lab.plan();
    assert!(
        ok && out.trim().is_empty() && err.contains("holds nothing"),
        "{out}\n{err}"
    );
    std::fs::write(lab.path("edge.log"), "").expect("truncate log");
    let _agent = lab.agent();
    lab.wait_log(
        "restart without a cache",
        "holding the kernel state",
        Duration::from_secs(10),
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            lab.kernel_state(),
            before,
            "changed after {:?}",
            t.elapsed()
        );
    }
    let r = lab.http("readyz");
    assert!(r.0 == 503 && r.1.contains("holds nothing"), "{r:?}");
}
