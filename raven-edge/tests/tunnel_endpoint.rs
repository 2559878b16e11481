//! A peer's endpoint change is applied to a running WireGuard device as a
//! one-peer diff: the device is not recreated, wireguard-go keeps running,
//! the other peer's session is untouched, and traffic follows the new
//! endpoint. Real wireguard-go in three network namespaces made for the test.
//! Needs root and wireguard-go; skipped otherwise unless
//! `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use raven_core::{GatewayName, NodeName};
use raven_edge::tunnel::backend::Backend;
use raven_edge::tunnel::{PeerPath, PeerSpec, Tunnel, TunnelSpec, diff, uapi};
use support::{Proc, ip, must};

fn ready() -> bool {
    support::root_with(&["wireguard-go"])
}

/// Namespaces a, b, c; a–b and a–c on their own veth links; a WireGuard
/// device in each (wireguard-go), all removed by name on drop.
struct Lab {
    tag: String,
    dir: tempfile::TempDir,
    wg: Vec<Proc>,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.tag)
    }
    fn dev(&self, n: &str) -> String {
        format!("{}{n}wg", self.tag)
    }

    fn new() -> Self {
        let mut lab = Self {
            tag: format!("rte{}", std::process::id() % 100_000),
            dir: tempfile::tempdir().expect("tempdir"),
            wg: Vec::new(),
        };
        for n in ["a", "b", "c"] {
            must(&["netns", "add", &lab.ns(n)]);
            must(&["-n", &lab.ns(n), "link", "set", "lo", "up"]);
        }
        for (peer, net) in [("b", "198.18.1"), ("c", "198.18.2")] {
            must(&[
                "-n",
                &lab.ns("a"),
                "link",
                "add",
                &format!("to{peer}"),
                "type",
                "veth",
                "peer",
                "name",
                "toa",
                "netns",
                &lab.ns(peer),
            ]);
            must(&[
                "-n",
                &lab.ns("a"),
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                &format!("to{peer}"),
            ]);
            must(&[
                "-n",
                &lab.ns(peer),
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "toa",
            ]);
            must(&[
                "-n",
                &lab.ns("a"),
                "link",
                "set",
                &format!("to{peer}"),
                "up",
            ]);
            must(&["-n", &lab.ns(peer), "link", "set", "toa", "up"]);
        }
        for (n, inner) in [("a", "10.99.0.1"), ("b", "10.99.0.2"), ("c", "10.99.0.3")] {
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.ns(n),
                    "wireguard-go",
                    "-f",
                    &lab.dev(n),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("wireguard-go");
            lab.wg.push(Proc(child));
            let t = Instant::now();
            while !uapi::socket_path(&lab.dev(n)).exists() {
                assert!(t.elapsed() < Duration::from_secs(5), "no UAPI socket");
                std::thread::sleep(Duration::from_millis(20));
            }
            must(&[
                "-n",
                &lab.ns(n),
                "addr",
                "add",
                &format!("{inner}/24"),
                "dev",
                &lab.dev(n),
            ]);
            must(&["-n", &lab.ns(n), "link", "set", &lab.dev(n), "up"]);
        }
        lab
    }

    fn tunnel(&self, n: &str) -> Tunnel {
        Tunnel::new(self.dev(n), &self.dir.path().join(n), Backend::Userspace).expect("key")
    }

    fn ping(&self, from: &str, to: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(from), "ping", "-c1", "-W1", to])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn ifindex(&self, n: &str) -> String {
        let (_, out) = ip(&["-n", &self.ns(n), "-o", "link", "show", &self.dev(n)]);
        out.split(':').next().unwrap_or_default().to_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.wg.clear(); // SIGTERM, by PID
        for n in ["a", "b", "c"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
            let _ = std::fs::remove_file(uapi::socket_path(&self.dev(n)));
        }
    }
}

fn peer(node: &str, endpoint: &str, inner: &str) -> PeerSpec {
    PeerSpec {
        node: NodeName::new(node).expect("name"),
        gateway: GatewayName::new(format!("gw-{node}")).expect("name"),
        endpoint: endpoint.parse().ok(),
        allowed_ips: BTreeSet::from([inner.parse().expect("cidr")]),
        keepalive: 0,
        relays_for: Vec::new(),
        path: PeerPath::Active,
    }
}

fn spec(peers: Vec<(String, PeerSpec)>) -> TunnelSpec {
    TunnelSpec {
        listen_port: 5000,
        peers: peers.into_iter().collect::<BTreeMap<_, _>>(),
        warnings: Vec::new(),
    }
}

fn hex(t: &Tunnel) -> String {
    raven_edge::tunnel::keys::base64_to_hex(&t.keys.public_base64()).expect("key")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_change_touches_only_that_peer_and_keeps_the_device_and_other_sessions() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    let (a, b, c) = (lab.tunnel("a"), lab.tunnel("b"), lab.tunnel("c"));
    let mut want_a = spec(vec![
        (hex(&b), peer("b", "198.18.1.2:5000", "10.99.0.2/32")),
        (hex(&c), peer("c", "198.18.2.2:5000", "10.99.0.3/32")),
    ]);
    a.apply(&want_a).await.expect("a");
    b.apply(&spec(vec![(
        hex(&a),
        peer("a", "198.18.1.1:5000", "10.99.0.1/32"),
    )]))
    .await
    .expect("b");
    c.apply(&spec(vec![(
        hex(&a),
        peer("a", "198.18.2.1:5000", "10.99.0.1/32"),
    )]))
    .await
    .expect("c");
    assert!(
        lab.ping("a", "10.99.0.2") && lab.ping("a", "10.99.0.3"),
        "tunnels up"
    );

    let before = uapi::get(&a.dev).await.expect("state");
    let c_handshake = before.peers[&hex(&c)].last_handshake_sec;
    assert!(c_handshake > 0);
    let (index, pid) = (lab.ifindex("a"), lab.wg[0].0.id());

    // b's endpoint moves (it listens on another port now, as after a NAT
    // remapping); a is told its new endpoint.
    let mut want_b = spec(vec![(
        hex(&a),
        peer("a", "198.18.1.1:5000", "10.99.0.1/32"),
    )]);
    want_b.listen_port = 5001;
    b.apply(&want_b).await.expect("b moves");
    if let Some(p) = want_a.peers.get_mut(&hex(&b)) {
        p.endpoint = "198.18.1.2:5001".parse().ok();
    }
    let body = diff(&want_a, &before.private_key_hex, &before);
    assert_eq!(
        body,
        format!("public_key={}\nendpoint=198.18.1.2:5001\n", hex(&b)),
        "a one-peer diff"
    );
    a.apply(&want_a).await.expect("apply the change");

    let t = Instant::now();
    while !lab.ping("a", "10.99.0.2") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b not reached at its new endpoint: {:?}",
            uapi::get(&a.dev).await.map(|s| s.peers[&hex(&b)].clone())
        );
    }
    assert!(lab.ping("a", "10.99.0.3"), "c still reached");
    let after = uapi::get(&a.dev).await.expect("state");
    assert_eq!(
        after.peers[&hex(&b)].endpoint,
        "198.18.1.2:5001".parse().ok()
    );
    assert_eq!(
        after.peers[&hex(&c)].last_handshake_sec,
        c_handshake,
        "c's session was not touched"
    );
    assert_eq!(lab.ifindex("a"), index, "the device was not recreated");
    let still = Command::new("kill")
        .args(["-0", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(still, "wireguard-go kept running");
}
