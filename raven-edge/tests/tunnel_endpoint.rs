//! A peer's endpoint change is applied to a running WireGuard device as a
//! one-peer diff: the device is not recreated, wireguard-go keeps running,
//! the other peer's session is untouched, and traffic follows the new
//! endpoint. Real wireguard-go in three network namespaces made for the test:
//! a peers with b and c, each on its own veth; b's uplink then moves to
//! another network (its old address is gone) and a is told b's new endpoint.
//! Needs root and wireguard-go; skipped otherwise unless
//! `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use raven_edge::tunnel::backend::Backend;
use raven_edge::tunnel::keys::Key;
use raven_edge::tunnel::{Change, PeerChange, PeerPath, PeerSpec, Tunnel, TunnelSpec, uapi};
use raven_model::{GatewayName, NodeName};
use support::{Proc, ip, must};

fn ready() -> bool {
    support::root_with(&["wireguard-go"])
}

/// Namespaces a, b, c; a–b (198.18.1.0/24, and 198.18.3.0/24 where b moves
/// to) and a–c (198.18.2.0/24) on their own veth links; a WireGuard device
/// in each (wireguard-go, started and ended here by PID), all removed by
/// name on drop.
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
        // The network b moves to: a is reachable there too.
        must(&[
            "-n",
            &lab.ns("a"),
            "addr",
            "add",
            "198.18.3.1/24",
            "dev",
            "tob",
        ]);
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

    /// b's uplink moves: its old address goes, a new one on another network
    /// comes (wireguard-go keeps listening on the same port).
    fn move_b(&self) {
        must(&[
            "-n",
            &self.ns("b"),
            "addr",
            "del",
            "198.18.1.2/24",
            "dev",
            "toa",
        ]);
        must(&[
            "-n",
            &self.ns("b"),
            "addr",
            "add",
            "198.18.3.2/24",
            "dev",
            "toa",
        ]);
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

fn spec(peers: Vec<(Key, PeerSpec)>) -> TunnelSpec {
    TunnelSpec {
        listen_port: 5000,
        peers: peers.into_iter().collect::<BTreeMap<_, _>>(),
        warnings: Vec::new(),
    }
}

fn key(t: &Tunnel) -> Key {
    t.keys.public_key()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_change_is_a_one_peer_diff_on_the_running_device_and_traffic_follows_it() {
    if !ready() {
        return;
    }
    let started = unix_now();
    let mut lab = Lab::new();
    let (a, b, c) = (lab.tunnel("a"), lab.tunnel("b"), lab.tunnel("c"));
    let (kb, kc) = (key(&b), key(&c));
    let mut want_a = spec(vec![
        (kb, peer("b", "198.18.1.2:5000", "10.99.0.2/32")),
        (kc, peer("c", "198.18.2.2:5000", "10.99.0.3/32")),
    ]);
    a.apply(&want_a).await.expect("a");
    b.apply(&spec(vec![(
        key(&a),
        peer("a", "198.18.1.1:5000", "10.99.0.1/32"),
    )]))
    .await
    .expect("b");
    c.apply(&spec(vec![(
        key(&a),
        peer("a", "198.18.2.1:5000", "10.99.0.1/32"),
    )]))
    .await
    .expect("c");
    assert!(
        lab.ping("a", "10.99.0.2") && lab.ping("a", "10.99.0.3"),
        "tunnels up"
    );

    let before = uapi::get(&a.dev).await.expect("state");
    let c_handshake = before.peers[&kc].last_handshake_sec;
    assert!(c_handshake >= started, "c handshook");
    let (index, pid) = (lab.ifindex("a"), lab.wg[0].0.id());

    // b's uplink moves. Until a is told, b is out of reach: its old address
    // is gone, and b has nothing to send that would let a roam.
    lab.move_b();
    assert!(!lab.ping("a", "10.99.0.2"), "b reached at its old address");

    if let Some(p) = want_a.peers.get_mut(&kb) {
        p.endpoint = "198.18.3.2:5000".parse().ok();
    }
    let now = uapi::get(&a.dev).await.expect("state");
    let change = a.change(&want_a, &now);
    let only_b = Change {
        peers: vec![PeerChange::new(kb).endpoint("198.18.3.2:5000".parse().expect("addr"))],
        ..Default::default()
    };
    assert_eq!(
        change, only_b,
        "a diff that names only b, and only its endpoint"
    );
    assert_eq!(
        a.apply(&want_a).await.expect("apply the change"),
        only_b,
        "the same change applied"
    );
    assert!(
        a.apply(&want_a).await.expect("apply again").is_empty(),
        "nothing left to change"
    );

    let t = Instant::now();
    while !lab.ping("a", "10.99.0.2") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b not reached at its new endpoint: {:?}",
            uapi::get(&a.dev).await.map(|s| s.peers[&kb].clone())
        );
    }
    assert!(lab.ping("b", "10.99.0.1"), "b reaches a");
    assert!(
        lab.ping("a", "10.99.0.3") && lab.ping("c", "10.99.0.1"),
        "a and c still reach each other"
    );

    let after = uapi::get(&a.dev).await.expect("state");
    // (4) b over its new endpoint: a reports it, with a handshake of this
    // run and bytes received since the move — which can only have come
    // over the new network; b saw a arrive from there too (and roamed).
    let (b0, b1) = (&now.peers[&kb], &after.peers[&kb]);
    assert_eq!(b1.endpoint, "198.18.3.2:5000".parse().ok());
    assert!(b1.last_handshake_sec >= started, "{b1:?}");
    assert!(b1.rx_bytes > b0.rx_bytes, "nothing from b: {b0:?} → {b1:?}");
    let b_view = uapi::get(&b.dev).await.expect("b's state");
    assert_eq!(
        b_view.peers[&key(&a)].endpoint,
        "198.18.3.1:5000".parse().ok(),
        "b hears a over the new network"
    );
    // (3) c's session was not touched, and carries traffic.
    let (c0, c1) = (&now.peers[&kc], &after.peers[&kc]);
    assert_eq!(
        c1.last_handshake_sec, c_handshake,
        "c's session was not touched"
    );
    assert_eq!(c1.endpoint, c0.endpoint);
    assert!(c1.rx_bytes > c0.rx_bytes, "nothing from c: {c0:?} → {c1:?}");
    // (1) the same device, served by the same wireguard-go.
    assert_eq!(lab.ifindex("a"), index, "the device was not recreated");
    assert_eq!(lab.wg[0].0.id(), pid);
    assert!(
        matches!(lab.wg[0].0.try_wait(), Ok(None)),
        "wireguard-go kept running"
    );
    assert!(Backend::Userspace.device_exists(&a.dev).await);
}
