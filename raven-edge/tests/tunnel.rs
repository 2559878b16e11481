//! Two gateways in two network namespaces, a real hub and real agents:
//! userspace WireGuard (wireguard-go) comes up from the topology alone, the
//! pods of one domain reach the other's through it, and the node key
//! survives an agent restart. Needs root and wireguard-go; skipped otherwise
//! unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use support::{Proc, agent_args, hub_args, must, sibling, spawn_in};

fn ready() -> bool {
    support::root_with(&["wireguard-go"])
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: raven-cfg, namespace: kube-system}
data: {enable-l3-tunnel: "true", enable-l7-proxy: "false"}
---
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-cloud}
spec:
  exposeType: PublicIP
  tunnelConfig: {Replicas: 1}
  endpoints: [{nodeName: cloud-1, type: tunnel, publicIP: 198.51.100.1}]
---
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-edge}
spec:
  exposeType: PublicIP
  tunnelConfig: {Replicas: 1}
  endpoints: [{nodeName: edge-1, type: tunnel, publicIP: 198.51.100.2}]
---
apiVersion: v1
kind: Node
metadata: {name: cloud-1, labels: {raven.openyurt.io/gateway: gw-cloud}}
spec: {podCIDR: 10.10.1.0/24}
status:
  conditions: [{type: Ready, status: "True"}]
  addresses: [{type: InternalIP, address: 198.51.100.1}]
---
apiVersion: v1
kind: Node
metadata: {name: edge-1, labels: {raven.openyurt.io/gateway: gw-edge}}
spec: {podCIDR: 10.10.2.0/24}
status:
  conditions: [{type: Ready, status: "True"}]
  addresses: [{type: InternalIP, address: 198.51.100.2}]
"#;

/// Two namespaces joined by a veth "internet", each with a pod stand-in.
struct Lab {
    a: String,
    b: String,
    dir: tempfile::TempDir,
    tag: u32,
}

impl Lab {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let (a, b) = (format!("rvt{tag}a"), format!("rvt{tag}b"));
        must(&["netns", "add", &a]);
        let lab = Self {
            a,
            b,
            dir: tempfile::tempdir().expect("tempdir"),
            tag,
        };
        must(&["netns", "add", &lab.b]);
        must(&[
            "-n", &lab.a, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns",
            &lab.b,
        ]);
        for (ns, wan, pod) in [
            (&lab.a, "198.51.100.1/24", "10.10.1.1/24"),
            (&lab.b, "198.51.100.2/24", "10.10.2.1/24"),
        ] {
            must(&["-n", ns, "addr", "add", wan, "dev", "up0"]);
            // A smaller underlay than Ethernet's: the tunnel MTU follows it.
            must(&["-n", ns, "link", "set", "up0", "mtu", "1400"]);
            must(&[
                "-n", ns, "link", "add", "pod0", "type", "veth", "peer", "name", "pod1",
            ]);
            must(&["-n", ns, "addr", "add", pod, "dev", "pod0"]);
            for l in ["lo", "up0", "pod0", "pod1"] {
                must(&["-n", ns, "link", "set", l, "up"]);
            }
        }
        std::fs::create_dir_all(lab.dir.path().join("manifests")).expect("mkdir");
        std::fs::write(lab.dir.path().join("manifests/lab.yaml"), MANIFESTS).expect("manifests");
        let st = Command::new(sibling("raven-hub"))
            .args(["certs", "--out"])
            .arg(lab.dir.path().join("certs"))
            .args(["--hub-name", "198.51.100.1", "--node", "cloud-1,edge-1"])
            .stdout(Stdio::null())
            .status()
            .expect("certs");
        assert!(st.success());
        lab
    }

    fn p(&self, s: &str) -> String {
        self.dir.path().join(s).to_string_lossy().into_owned()
    }

    fn hub(&self) -> Proc {
        let args = hub_args(&self.p("manifests"), self.dir.path(), "198.51.100.1:10270");
        spawn_in(
            &self.a,
            &sibling("raven-hub"),
            &args,
            Path::new(&self.p("hub.log")),
        )
    }

    fn dev(&self, side: &str) -> String {
        format!("rvw{}{side}", self.tag)
    }

    fn agent(&self, side: &str) -> Proc {
        let (ns, node) = if side == "a" {
            (&self.a, "cloud-1")
        } else {
            (&self.b, "edge-1")
        };
        let dev = self.dev(side);
        let args = agent_args(
            node,
            Path::new(&self.p(&format!("edge-{side}"))),
            self.dir.path(),
            "https://198.51.100.1:10270",
            "198.51.100.1",
            &["--tunnel-dev", &dev],
        );
        spawn_in(
            ns,
            Path::new(env!("CARGO_BIN_EXE_raven-edge")),
            &args,
            Path::new(&self.p(&format!("edge-{side}.log"))),
        )
    }

    fn ping(&self) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "ping",
                "-c1",
                "-W1",
                "-I",
                "10.10.1.1",
                "10.10.2.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn converge(&self, what: &str) {
        let t = Instant::now();
        while !self.ping() {
            if t.elapsed() > Duration::from_secs(40) {
                let logs: String = ["hub.log", "edge-a.log", "edge-b.log"]
                    .iter()
                    .map(|l| {
                        format!(
                            "--- {l}\n{}",
                            std::fs::read_to_string(self.p(l)).unwrap_or_default()
                        )
                    })
                    .collect();
                panic!("{what}: pods cannot reach each other after 40 s\n{logs}");
            }
        }
        eprintln!(
            "{what}: pod-to-pod through the tunnel after {:?}",
            t.elapsed()
        );
    }

    /// `raven-edge plan --exit-code` for cloud-1, in its namespace: the
    /// exit code and what it prints on stdout.
    fn plan(&self) -> (Option<i32>, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a])
            .arg(env!("CARGO_BIN_EXE_raven-edge"))
            .args(["plan", "--node", "cloud-1", "--data-dir"])
            .arg(self.p("edge-a"))
            .args(["--tunnel-dev", &self.dev("a"), "--exit-code"])
            .output()
            .expect("plan");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn public_key(&self, side: &str) -> String {
        let out = Command::new("wg")
            .args(["show", &self.dev(side), "public-key"])
            .output()
            .expect("wg");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // wireguard-go runs in its own session (it outlives agents by
        // design); end the ones this test's agents started, by PID.
        for side in ["a", "b"] {
            let pid_file = self
                .dir
                .path()
                .join(format!("edge-{side}/wireguard-go-{}.pid", self.dev(side)));
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn two_gateways_carry_pod_traffic_keep_their_keys_and_teardown_removes_the_tunnel() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    let _hub = lab.hub();
    let agent_a = lab.agent("a");
    let agent_b = lab.agent("b");
    lab.converge("first sync");
    let out = Command::new("wg")
        .args(["show", &lab.dev("a"), "latest-handshakes"])
        .output()
        .expect("wg");
    let handshakes = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        handshakes
            .split_whitespace()
            .nth(1)
            .is_some_and(|t| t != "0"),
        "no handshake: {handshakes}"
    );

    // MTU = underlay (1400) − WireGuard over IPv6 (80).
    for side in ["a", "b"] {
        let ns = if side == "a" { &lab.a } else { &lab.b };
        let (ok, out) = support::ip(&["-n", ns, "-o", "link", "show", &lab.dev(side)]);
        assert!(ok && out.contains(" mtu 1320 "), "{out}");
    }

    // The agent exports per-peer tunnel state (refreshed every reconcile).
    let read_metrics = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.a, "python3", "-c"])
            .arg("import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:10273/metrics').read().decode())")
            .output()
            .expect("metrics");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = Instant::now();
    let mut metrics = read_metrics();
    while !metrics.contains("raven_edge_tunnel_handshake_age_seconds{peer=\"edge-1\"") {
        assert!(t.elapsed() < Duration::from_secs(10), "{metrics}");
        std::thread::sleep(Duration::from_millis(200));
        metrics = read_metrics();
    }

    // `plan` on the active gateway, its agent running: no drift, though
    // the routes go into the tunnel and skip-NAT and WireGuard are planned.
    let (code, out) = lab.plan();
    assert_eq!(
        code,
        Some(0),
        "plan shows drift with the agent running:\n{out}"
    );
    assert!(out.is_empty(), "{out}");

    // The key is the node's: an agent restart keeps it and the tunnel.
    let key = lab.public_key("a");
    drop(agent_a);
    assert!(lab.ping(), "stopping the agent must not stop the tunnel");

    // With the agent stopped, a route and a peer go missing: `plan` shows
    // exactly those two changes, as the commands `run` would issue.
    let dev = lab.dev("a");
    must(&[
        "-n",
        &lab.a,
        "route",
        "del",
        "10.10.2.0/24",
        "table",
        "9027",
    ]);
    let kb = lab.public_key("b");
    let st = Command::new("wg")
        .args(["set", &dev, "peer", &kb, "remove"])
        .status()
        .expect("wg");
    assert!(st.success());
    let (code, out) = lab.plan();
    assert_eq!(code, Some(1), "drift exits 1:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&format!("wg set {dev} peer {kb} endpoint 198.51.100.2:"))
            && lines[0].contains(" persistent-keepalive 1 allowed-ips ")
            && lines[0].contains("10.10.2.0/24"),
        "{out}"
    );
    assert_eq!(
        lines[1],
        format!("ip route add 10.10.2.0/24 dev {dev} table 9027 proto 82 mtu 1320")
    );

    let _agent_a = lab.agent("a");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lab.public_key("a"), key);
    lab.converge("after agent restart");
    // The agent made exactly that change: no drift left.
    let t = Instant::now();
    while lab.plan().0 != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", lab.plan());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Teardown (agent stopped) removes the tunnel too; wireguard-go exits.
    drop(agent_b);
    let pid_file = lab
        .dir
        .path()
        .join(format!("edge-b/wireguard-go-{}.pid", lab.dev("b")));
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    let st = Command::new("ip")
        .args(["netns", "exec", &lab.b])
        .arg(env!("CARGO_BIN_EXE_raven-edge"))
        .args(["teardown", "--tunnel-dev", &lab.dev("b")])
        .stderr(Stdio::null())
        .status()
        .expect("teardown");
    assert!(st.success());
    let (_, links) = support::ip(&["-n", &lab.b, "-o", "link", "show"]);
    assert!(!links.contains(&lab.dev("b")), "{links}");
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{}", pid.trim())).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "wireguard-go still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
