//! Real charons (strongSwan, kernel-libipsec: userspace ESP in UDP over a
//! TUN device, as these kernels have no ESP) in network namespaces, driven
//! by raven's IPsec module: keys, planner, VICI diff and health.
//!
//! - `two_gateways_*`: two gateways on one link establish one IKE_SA and one
//!   CHILD_SA carrying their subnets (ping between the namespaces' pod
//!   addresses), an agent "restart" (a new client and reconciler, a fresh
//!   plan) keeps the SA unique IDs, a stranger claiming the peer's identity
//!   with another key is refused, only ESP-in-UDP on port 4500 is on the
//!   wire, a CHILD_SA rekey and a peer's key rotation keep traffic flowing.
//! - `relay_*`: two NATed gateways behind MASQUERADE routers reach each other
//!   through a public gateway (their relay).
//!
//! Needs root, charon (`strongswan-charon`, `libcharon-extra-plugins`,
//! `libstrongswan-standard-plugins`), tcpdump and ping; skipped otherwise
//! unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use raven_edge::dataplane::model::NodeInputs;
use raven_edge::ipsec::apply::{Ipsec, SaHealth, ike_id, list_sas};
use raven_edge::ipsec::charon::{Datapath, strongswan_conf};
use raven_edge::ipsec::keys::IdentityKey;
use raven_edge::ipsec::spec::{IpsecSpec, spec};
use raven_edge::ipsec::vici::{Client, Message};
use raven_model::fixtures;
use raven_model::topology::{ExposeType, GatewayEndpoint, GatewayView, NodeView, PeerInfo};
use support::{Proc, must};

const CHARON: &str = "/usr/lib/ipsec/charon";

fn ready() -> bool {
    if !Path::new(CHARON).exists() {
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "needs {CHARON} (strongswan-charon); RAVEN_REQUIRE_TOOLS is set"
        );
        eprintln!("skipped: needs {CHARON} (strongswan-charon)");
        return false;
    }
    support::root_with(&["tcpdump", "ping"])
}

/// Runs `ip netns exec NS ARGS`; returns success and combined output.
fn ns_run(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `count` pings from `src` to `dst` inside `ns`: how many were answered.
fn ping(ns: &str, src: &str, dst: &str, count: u32) -> u32 {
    let (_, out) = ns_run(
        ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            src,
            dst,
        ],
    );
    out.lines()
        .find(|l| l.contains("received"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A ping from `src` to `dst` inside `ns` every 50 ms, in the background,
/// until stopped (at most `max` pings).
struct Pinger(std::thread::JoinHandle<String>, u32);

impl Pinger {
    fn start(ns: &str, src: &str, dst: &str, max: u32) -> Self {
        let args: Vec<String> = [
            "ip",
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-q",
            "-i",
            "0.05",
            "-W",
            "1",
            "-c",
            &max.to_string(),
            "-I",
            src,
            dst,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        let pid = child.id();
        let handle = std::thread::spawn(move || {
            let out = child.wait_with_output().expect("ping output");
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        Self(handle, pid)
    }

    /// Stops it (SIGINT: ping prints its summary); (sent, lost).
    fn stop(self) -> (u64, u64) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.1 as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = self.0.join().unwrap_or_default();
        let line = out.lines().find(|l| l.contains("received")).unwrap_or("");
        let num = |i: usize| {
            line.split(", ")
                .nth(i)
                .and_then(|f| f.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (sent, got) = (num(0), num(1));
        (sent, sent.saturating_sub(got))
    }
}

/// Namespaces created by this test, deleted (by name) on drop, after the
/// charons in them are stopped.
struct Namespaces {
    names: Vec<String>,
    charons: Vec<Proc>,
    dir: tempfile::TempDir,
}

impl Namespaces {
    fn new(tag: &str, names: &[&str]) -> Self {
        let id = std::process::id() % 100_000;
        let names: Vec<String> = names.iter().map(|n| format!("rvi{id}{tag}{n}")).collect();
        let me = Self {
            names: Vec::new(),
            charons: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let mut me = me;
        for n in &names {
            must(&["netns", "add", n]);
            me.names.push(n.clone());
            must(&["-n", n, "link", "set", "lo", "up"]);
        }
        me
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Starts a charon in namespace `i` with its own `/run` (a tmpfs in a
    /// mount namespace of its own) and VICI socket; returns the socket.
    fn charon(&mut self, i: usize) -> PathBuf {
        let ns = self.names[i].clone();
        let vici = self.dir.path().join(format!("{ns}.vici"));
        let log = self.dir.path().join(format!("{ns}.log"));
        let conf = self.dir.path().join(format!("{ns}.conf"));
        let _ = std::fs::remove_file(&vici);
        std::fs::write(
            &conf,
            strongswan_conf(Datapath::Libipsec, &vici, Some(&log), 4500),
        )
        .expect("write strongswan.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "unshare", "-m", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs raven-charon /run && STRONGSWAN_CONF={} exec {CHARON}",
                conf.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn charon");
        self.charons.push(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vici.exists() {
            assert!(
                Instant::now() < deadline,
                "charon in {ns} did not open {}",
                vici.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        vici
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.names[i])))
            .unwrap_or_default()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.charons.clear();
        if std::thread::panicking() {
            for i in 0..self.names.len() {
                eprintln!("--- charon log of {}:\n{}", self.names[i], self.log(i));
            }
        }
        for n in &self.names {
            let _ = support::ip(&["netns", "del", n]);
        }
    }
}

/// A gateway with one member (its tunnel endpoint) whose pod subnet is
/// `subnet`.
fn gateway(
    name: &str,
    member: &str,
    private_ip: &str,
    subnet: &str,
    public_ip: Option<&str>,
    relay: Option<&str>,
) -> GatewayView {
    let ep = GatewayEndpoint {
        under_nat: public_ip.is_none(),
        public_ip: public_ip.map(fixtures::ip),
        ..fixtures::endpoint(member, 4500)
    };
    GatewayView {
        expose_type: if public_ip.is_some() {
            ExposeType::PublicIP
        } else {
            ExposeType::None
        },
        under_nat: public_ip.is_none(),
        members: vec![fixtures::member(member, private_ip, &[subnet])],
        active_tunnel: Some(ep.clone()),
        tunnel_candidates: vec![ep],
        relay: relay.map(fixtures::gateway_name),
        ..fixtures::gateway(name)
    }
}

/// What the hub passes on about `member`: its key and, for a NATed one,
/// where its tunnel traffic comes from.
fn peer(member: &str, gw: &str, key: &IdentityKey, observed: Option<&str>) -> PeerInfo {
    PeerInfo {
        tunnel_port: Some(4500),
        observed_endpoint: observed.map(fixtures::socket),
        ipsec_public_key: Some(key.public_base64()),
        ..fixtures::peer(member, gw)
    }
}

/// The plan of `me` (a member of `gws[i]`).
fn plan_for(gws: &[GatewayView], i: usize, peers: &[PeerInfo]) -> IpsecSpec {
    let g = &gws[i];
    let m = &g.members[0];
    let inputs = NodeInputs {
        me: Some(NodeView {
            private_ip: Some(m.private_ip),
            subnets: m.subnets.clone(),
            tunnel_active: true,
            tunnel_candidate: true,
            ..fixtures::node_view(m.node.as_str(), Some(g.name.as_str()))
        }),
        gateways: gws.to_vec(),
        tunnel_dev: String::new(),
        ..Default::default()
    };
    spec(&inputs, peers)
}

async fn client(vici: &Path) -> Client {
    Client::connect(vici).await.expect("connect to VICI")
}

/// Waits until `vici` shows an established IKE_SA with an installed
/// CHILD_SA for each of `conns`; returns them.
async fn established(vici: &Path, conns: &[&str], secs: u64) -> Vec<SaHealth> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let sas = list_sas(&mut client(vici).await).await.expect("list-sas");
        let up = |c: &&str| {
            sas.iter().any(|s| {
                s.conn == *c
                    && s.ike_state == "ESTABLISHED"
                    && s.children.iter().any(|ch| ch.state == "INSTALLED")
            })
        };
        if conns.iter().all(up) {
            return sas;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not establish {conns:?} in {secs}s: {sas:#?}",
            vici.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (IKE unique ID, CHILD unique IDs) per connection.
fn ids(sas: &[SaHealth]) -> BTreeMap<String, (u64, Vec<u64>)> {
    sas.iter()
        .map(|s| {
            (
                s.conn.clone(),
                (s.ike_id, s.children.iter().map(|c| c.id).collect()),
            )
        })
        .collect()
}

/// A stranger at `vici` claiming IKE identity `claimed` with key `key`
/// dials `target`, who is `target_id` with public key `target_key`. Returns
/// the error of the initiation (it must fail).
async fn impersonate(
    vici: &Path,
    key: &IdentityKey,
    claimed: &str,
    target: &str,
    target_id: &str,
    target_key: &IdentityKey,
) -> String {
    let mut c = client(vici).await;
    c.call(
        "load-key",
        &Message::new().kv("type", "ed25519").kv("data", pkcs8(key)),
    )
    .await
    .expect("load-key");
    let child = Message::new()
        .list("local_ts", ["0.0.0.0/0"])
        .list("remote_ts", ["0.0.0.0/0"])
        .list("esp_proposals", ["aes128gcm16-x25519"]);
    let conn = Message::new()
        .kv("version", "2")
        .list("remote_addrs", [target])
        .kv("local_port", "4500")
        .kv("remote_port", "4500")
        .kv("encap", "yes")
        .list("proposals", ["aes128gcm16-prfsha256-x25519"])
        .kv("keyingtries", "1")
        .section(
            "local",
            Message::new()
                .kv("auth", "pubkey")
                .kv("id", claimed)
                .list("pubkeys", [key.public_pem()]),
        )
        .section(
            "remote",
            Message::new()
                .kv("auth", "pubkey")
                .kv("id", target_id)
                .list("pubkeys", [target_key.public_pem()]),
        )
        .section("children", Message::new().section("impostor", child));
    c.call("load-conn", &Message::new().section("impostor", conn))
        .await
        .expect("load-conn");
    let r = c
        .call(
            "initiate",
            &Message::new()
                .kv("child", "impostor")
                .kv("ike", "impostor")
                .kv("timeout", "10000"),
        )
        .await;
    match r {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The PKCS#8 form of a key, as `load-key` wants it (RFC 8410 prefix).
fn pkcs8(key: &IdentityKey) -> Vec<u8> {
    // The module keeps its own encoder private; this is the same 16-byte
    // prefix followed by the seed, derived from the key file's contents.
    let dir = tempfile::tempdir().expect("tempdir");
    key.write(dir.path(), "k").expect("write key");
    let seed = std::fs::read_to_string(dir.path().join("k")).expect("read key");
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    use base64::Engine;
    der.extend(
        base64::engine::general_purpose::STANDARD
            .decode(seed.trim())
            .expect("base64 seed"),
    );
    der
}

/// Captures IPv4 packets on `dev` in `ns` while `during` runs; returns
/// tcpdump's lines.
fn capture(ns: &str, dev: &str, during: impl FnOnce()) -> Vec<String> {
    let out = tempfile::NamedTempFile::new().expect("tmp");
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "tcpdump", "-n", "-l", "-i", dev, "ip"])
        .stdout(std::fs::File::create(out.path()).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    let proc = Proc(child);
    std::thread::sleep(Duration::from_millis(800));
    during();
    std::thread::sleep(Duration::from_millis(500));
    proc.stop(nix::sys::signal::Signal::SIGINT);
    std::fs::read_to_string(out.path())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a tcpdump line of [`capture`] is an ESP packet (`UDP-encap: ESP`),
/// not an IKE exchange on port 4500 (`NONESP-encap: isakmp`), which with
/// 2 s dead peer detection shows up beside the traffic.
fn is_esp(line: &str) -> bool {
    line.contains("ESP") && !line.contains("NONESP-encap")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_one_sa_pair_survives_restart_refuses_impostor_rekeys_and_rotates() {
    if !ready() {
        return;
    }
    // a: public gateway 192.0.2.1; b: declared under NAT (it dials a, and a
    // answers any address for it — which is what an impostor would need);
    // x: a stranger on the same link.
    let mut lab = Namespaces::new("t", &["a", "b", "x"]);
    let (a, b, x) = (
        lab.ns(0).to_owned(),
        lab.ns(1).to_owned(),
        lab.ns(2).to_owned(),
    );
    must(&["-n", &a, "link", "add", "br0", "type", "bridge"]);
    must(&["-n", &a, "link", "set", "br0", "up"]);
    must(&["-n", &a, "addr", "add", "192.0.2.1/24", "dev", "br0"]);
    for (ns, ip) in [(&b, "192.0.2.2/24"), (&x, "192.0.2.3/24")] {
        must(&[
            "-n", &a, "link", "add", "p", "type", "veth", "peer", "name", "up0", "netns", ns,
        ]);
        let port = format!("p{}", &ns[ns.len() - 1..]);
        must(&["-n", &a, "link", "set", "p", "name", &port]);
        must(&["-n", &a, "link", "set", &port, "master", "br0", "up"]);
        must(&["-n", ns, "addr", "add", ip, "dev", "up0"]);
        must(&["-n", ns, "link", "set", "up0", "up"]);
    }
    // Pod stand-ins: each domain's first address on the namespace's lo.
    for (ns, ip) in [(&a, "10.1.0.1/32"), (&b, "10.2.0.1/32")] {
        must(&["-n", ns, "addr", "add", ip, "dev", "lo"]);
    }
    let va = lab.charon(0);
    let vb = lab.charon(1);
    let vx = lab.charon(2);

    let gws = vec![
        gateway(
            "gw-a",
            "a-1",
            "192.0.2.1",
            "10.1.0.0/24",
            Some("192.0.2.1"),
            None,
        ),
        gateway(
            "gw-b",
            "b-1",
            "192.0.2.2",
            "10.2.0.0/24",
            None,
            Some("gw-a"),
        ),
    ];
    let (ka, kb) = (IdentityKey::generate(), IdentityKey::generate());
    let peers = vec![
        peer("a-1", "gw-a", &ka, None),
        peer("b-1", "gw-b", &kb, Some("192.0.2.2:4500")),
    ];
    let (pa, pb) = (plan_for(&gws, 0, &peers), plan_for(&gws, 1, &peers));
    assert_eq!(pa.conns.len(), 1, "{pa:#?}");
    assert!(pb.conns["raven-a-1"].initiator, "the NATed side initiates");
    assert!(!pa.conns["raven-b-1"].initiator);

    let (mut ra, mut rb) = (Ipsec::new(ka.clone()), Ipsec::new(kb.clone()));
    let applied_a = ra
        .apply(&mut client(&va).await, &pa)
        .await
        .expect("apply a");
    assert_eq!(applied_a.loaded, ["raven-b-1"], "{applied_a:?}");
    assert!(
        applied_a.initiated.is_empty(),
        "the public side only answers"
    );
    let applied_b = rb
        .apply(&mut client(&vb).await, &pb)
        .await
        .expect("apply b");
    assert_eq!(applied_b.initiated, ["raven-a-1"], "{applied_b:?}");
    assert!(applied_b.errors.is_empty(), "{applied_b:?}");

    let sas_b = established(&vb, &["raven-a-1"], 20).await;
    let sas_a = established(&va, &["raven-b-1"], 20).await;
    assert_eq!(sas_a.len(), 1, "one IKE_SA per gateway pair: {sas_a:#?}");
    assert_eq!(sas_a[0].children.len(), 1, "one CHILD_SA: {sas_a:#?}");
    assert_eq!(
        ping(&a, "10.1.0.1", "10.2.0.1", 5),
        5,
        "pods reach each other"
    );

    // A second pass changes nothing.
    let again = rb
        .apply(&mut client(&vb).await, &pb)
        .await
        .expect("apply b");
    assert!(!again.changed(), "{again:?}");

    // Agent restart: the reconcilers and clients are gone, new ones re-plan.
    let before = (ids(&sas_a), ids(&sas_b));
    drop((ra, rb));
    let (mut ra, mut rb) = (Ipsec::new(ka.clone()), Ipsec::new(kb.clone()));
    let (pa, pb) = (plan_for(&gws, 0, &peers), plan_for(&gws, 1, &peers));
    let ra_applied = ra
        .apply(&mut client(&va).await, &pa)
        .await
        .expect("apply a");
    let rb_applied = rb
        .apply(&mut client(&vb).await, &pb)
        .await
        .expect("apply b");
    assert!(rb_applied.initiated.is_empty(), "{rb_applied:?}");
    assert!(ra_applied.errors.is_empty() && rb_applied.errors.is_empty());
    let after = (
        ids(&established(&va, &["raven-b-1"], 5).await),
        ids(&established(&vb, &["raven-a-1"], 5).await),
    );
    assert_eq!(
        before, after,
        "SA unique IDs are unchanged across a restart"
    );
    assert_eq!(ping(&a, "10.1.0.1", "10.2.0.1", 3), 3);

    // A stranger claiming to be b-1 with another key is refused.
    let impostor = IdentityKey::generate();
    let (b_id, a_id) = (ike_id("b-1", &kb.public), ike_id("a-1", &ka.public));
    let err = impersonate(&vx, &impostor, &b_id, "192.0.2.1", &a_id, &ka).await;
    assert!(!err.is_empty(), "the impostor's IKE_SA was established");
    assert!(
        lab.log(0).contains("constraint check failed")
            || lab.log(0).contains("signature validation failed"),
        "a: {}\nx: {}",
        lab.log(0),
        lab.log(2)
    );
    assert_eq!(
        ids(&established(&va, &["raven-b-1"], 5).await),
        before.0,
        "the impostor displaced nothing"
    );

    // On the wire: ESP in UDP 4500 only, no ICMP in the clear.
    let lines = capture(&a, "br0", || {
        assert_eq!(ping(&a, "10.1.0.1", "10.2.0.1", 5), 5);
    });
    let tunnel: Vec<&String> = lines.iter().filter(|l| is_esp(l)).collect();
    assert!(tunnel.len() >= 10, "ESP packets seen: {lines:#?}");
    for l in &lines {
        assert!(
            l.contains(".4500 > ") && l.contains(".4500: "),
            "not UDP 4500 on the wire: {l}"
        );
        assert!(!l.contains("ICMP"), "ICMP in the clear: {l}");
    }

    // A CHILD_SA rekey: new CHILD_SA, same IKE_SA, traffic flows.
    let mut cb = client(&vb).await;
    cb.call("rekey", &Message::new().kv("child", "raven-a-1"))
        .await
        .expect("rekey");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = ids(&established(&vb, &["raven-a-1"], 5).await);
        let (ike, children) = &now["raven-a-1"];
        if children.len() == 1 && children != &before.1["raven-a-1"].1 {
            assert_eq!(*ike, before.1["raven-a-1"].0, "the IKE_SA stays");
            break;
        }
        assert!(Instant::now() < deadline, "no rekey: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ping(&a, "10.1.0.1", "10.2.0.1", 3),
        3,
        "traffic after the rekey"
    );

    // b rotates its key: a learns the new key (through the hub, here by
    // hand), then b applies it and re-authenticates.
    let kb2 = IdentityKey::generate();
    let peers2 = vec![
        peer("a-1", "gw-a", &ka, None),
        peer("b-1", "gw-b", &kb2, Some("192.0.2.2:4500")),
    ];
    let (pa2, pb2) = (plan_for(&gws, 0, &peers2), plan_for(&gws, 1, &peers2));
    let ra2 = ra
        .apply(&mut client(&va).await, &pa2)
        .await
        .expect("apply a");
    assert_eq!(ra2.loaded, ["raven-b-1"], "a reloads b's connection");
    rb.set_key(kb2.clone());
    let rb2 = rb
        .apply(&mut client(&vb).await, &pb2)
        .await
        .expect("apply b");
    assert!(rb2.key_loaded, "{rb2:?}");
    assert_eq!(
        rb2.initiated,
        ["raven-a-1"],
        "a fresh IKE_SA with the new key: {rb2:?}"
    );
    let old_ike = before.1["raven-a-1"].0;
    let b2_id = ike_id("b-1", &kb2.public);
    // Make before break: once the fresh IKE_SA is up, the next passes end
    // the old one on both sides.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rb3 = rb
            .apply(&mut client(&vb).await, &pb2)
            .await
            .expect("apply b");
        let ra3 = ra
            .apply(&mut client(&va).await, &pa2)
            .await
            .expect("apply a");
        assert!(
            rb3.errors.is_empty() && ra3.errors.is_empty(),
            "{rb3:?} {ra3:?}"
        );
        let sas = list_sas(&mut client(&vb).await).await.expect("list-sas");
        let sas_a = list_sas(&mut client(&va).await).await.expect("list-sas");
        let only_fresh = |sas: &[SaHealth], id: &str, peer: bool| {
            sas.len() == 1
                && sas[0].ike_state == "ESTABLISHED"
                && (if peer {
                    &sas[0].remote_id
                } else {
                    &sas[0].local_id
                }) == id
        };
        if only_fresh(&sas, &b2_id, false) && only_fresh(&sas_a, &b2_id, true) {
            assert_ne!(sas[0].ike_id, old_ike);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old IKE_SA not replaced: {sas:#?} {sas_a:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    established(&vb, &["raven-a-1"], 10).await;
    assert_eq!(
        ping(&a, "10.1.0.1", "10.2.0.1", 3),
        3,
        "traffic after the rotation"
    );
    // The old key no longer passes for b-1.
    let err = impersonate(&vx, &kb, &b_id, "192.0.2.1", &a_id, &ka).await;
    assert!(!err.is_empty(), "b's old key still authenticates as b-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_carries_two_natted_gateways_through_masquerade_and_a_hole_punched_direct_sa_takes_over_and_back_without_loss()
 {
    if !ready() || !support::root_with(&["iptables"]) {
        return;
    }
    // r: public relay 203.0.113.1. x, y: gateways behind MASQUERADE routers
    // nx (203.0.113.2) and ny (203.0.113.3), LANs 10.8.0.0/24, 10.9.0.0/24.
    let mut lab = Namespaces::new("r", &["r", "nx", "ny", "x", "y"]);
    let n: Vec<String> = (0..5).map(|i| lab.ns(i).to_owned()).collect();
    let (r, nx, ny, x, y) = (&n[0], &n[1], &n[2], &n[3], &n[4]);
    must(&["-n", r, "link", "add", "br0", "type", "bridge"]);
    must(&["-n", r, "link", "set", "br0", "up"]);
    must(&["-n", r, "addr", "add", "203.0.113.1/24", "dev", "br0"]);
    for (i, (router, wan, gw, lan)) in [
        (nx, "203.0.113.2/24", x, "10.8.0"),
        (ny, "203.0.113.3/24", y, "10.9.0"),
    ]
    .into_iter()
    .enumerate()
    {
        let port = format!("p{i}");
        must(&[
            "-n", r, "link", "add", &port, "type", "veth", "peer", "name", "wan0", "netns", router,
        ]);
        must(&["-n", r, "link", "set", &port, "master", "br0", "up"]);
        must(&["-n", router, "addr", "add", wan, "dev", "wan0"]);
        must(&["-n", router, "link", "set", "wan0", "up"]);
        must(&[
            "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "up0", "netns", gw,
        ]);
        must(&[
            "-n",
            router,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            "lan0",
        ]);
        must(&["-n", router, "link", "set", "lan0", "up"]);
        must(&[
            "-n",
            gw,
            "addr",
            "add",
            &format!("{lan}.2/24"),
            "dev",
            "up0",
        ]);
        must(&["-n", gw, "link", "set", "up0", "up"]);
        must(&[
            "-n",
            gw,
            "route",
            "add",
            "default",
            "via",
            &format!("{lan}.1"),
        ]);
        let (ok, out) = ns_run(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(ok, "{out}");
        let (ok, out) = ns_run(
            router,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan0",
                "-j",
                "MASQUERADE",
            ],
        );
        assert!(ok, "{out}");
        // Stateful: nothing from the internet gets in unless it answers
        // something that went out.
        for rule in [
            &[
                "-A",
                "FORWARD",
                "-i",
                "wan0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ][..],
            &["-A", "FORWARD", "-i", "wan0", "-j", "DROP"][..],
            // Unsolicited packets to the router itself are dropped before
            // conntrack confirms them: a confirmed entry for a peer's
            // packet would make the NAT map the inside's own flow to that
            // peer to another port (and hole punching would never meet).
            &[
                "-A",
                "INPUT",
                "-i",
                "wan0",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ][..],
        ] {
            let mut args = vec!["iptables"];
            args.extend_from_slice(rule);
            let (ok, out) = ns_run(router, &args);
            assert!(ok, "{out}");
        }
    }
    for (ns, ip) in [(r, "10.1.0.1/32"), (x, "10.2.0.1/32"), (y, "10.3.0.1/32")] {
        must(&["-n", ns, "addr", "add", ip, "dev", "lo"]);
    }
    let vr = lab.charon(0);
    let vx = lab.charon(3);
    let vy = lab.charon(4);

    let gws = vec![
        gateway(
            "gw-r",
            "r-1",
            "203.0.113.1",
            "10.1.0.0/24",
            Some("203.0.113.1"),
            None,
        ),
        gateway("gw-x", "x-1", "10.8.0.2", "10.2.0.0/24", None, Some("gw-r")),
        gateway("gw-y", "y-1", "10.9.0.2", "10.3.0.0/24", None, Some("gw-r")),
    ];
    let keys = [
        IdentityKey::generate(),
        IdentityKey::generate(),
        IdentityKey::generate(),
    ];
    // Not observed yet (the relay has not reported them): no direct path.
    let peers = vec![
        peer("r-1", "gw-r", &keys[0], None),
        peer("x-1", "gw-x", &keys[1], None),
        peer("y-1", "gw-y", &keys[2], None),
    ];
    let plans: Vec<IpsecSpec> = (0..3).map(|i| plan_for(&gws, i, &peers)).collect();
    assert_eq!(
        plans[0].conns.len(),
        2,
        "the relay: one SA pair per NATed gateway"
    );
    assert_eq!(plans[1].conns.len(), 1, "x: only the relay");
    // The relay's local selectors towards x include y's subnet, which holds
    // no address of the relay: its network address goes on the relay's lo.
    assert!(
        plans[0]
            .lo_addresses
            .contains(&"10.3.0.0".parse().expect("ip"))
    );
    let lo = plans[0].lo_addresses.clone();
    support::block_on_in(r, || raven_edge::ipsec::agent::sync_lo_addresses(&lo))
        .expect("lo addresses");
    let (_, addrs) = ns_run(r, &["ip", "-4", "addr", "show", "dev", "lo"]);
    assert!(
        addrs.contains("10.3.0.0/32") && addrs.contains("lo:raven"),
        "{addrs}"
    );

    let mut recs: Vec<Ipsec> = keys.iter().cloned().map(Ipsec::new).collect();
    for (i, v) in [&vr, &vx, &vy].into_iter().enumerate() {
        let a = recs[i]
            .apply(&mut client(v).await, &plans[i])
            .await
            .expect("apply");
        assert!(a.errors.is_empty(), "{a:?}");
    }
    established(&vx, &["raven-r-1"], 20).await;
    established(&vy, &["raven-r-1"], 20).await;
    let sas = established(&vr, &["raven-x-1", "raven-y-1"], 20).await;
    // The relay sees both behind their NATs.
    let remotes: Vec<String> = sas
        .iter()
        .filter_map(|s| s.remote.map(|e| e.ip().to_string()))
        .collect();
    assert!(remotes.contains(&"203.0.113.2".to_owned()), "{sas:#?}");
    assert!(remotes.contains(&"203.0.113.3".to_owned()), "{sas:#?}");
    // libipsec forwards between its SAs on the relay.
    let (ok, out) = ns_run(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(ok, "{out}");
    assert_eq!(
        ping(x, "10.2.0.1", "10.3.0.1", 5),
        5,
        "x reaches y through the relay"
    );
    assert_eq!(
        ping(y, "10.3.0.1", "10.1.0.1", 3),
        3,
        "y reaches the relay's domain"
    );
    // Only ESP in UDP 4500 crosses the internet side.
    let lines = capture(r, "br0", || {
        assert_eq!(ping(x, "10.2.0.1", "10.3.0.1", 5), 5);
    });
    assert!(
        lines.iter().filter(|l| is_esp(l)).count() >= 20,
        "{lines:#?}"
    );
    for l in &lines {
        assert!(
            l.contains(".4500 > ") && l.contains(".4500: "),
            "not UDP 4500: {l}"
        );
    }

    // The hub passes on where the relay sees them: x and y dial each other
    // there (both: each one's first packet opens its own NAT's firewall for
    // the other's), beside the relay, while x pings y at 20 pps.
    let observed = vec![
        peers[0].clone(),
        peer("x-1", "gw-x", &keys[1], Some("203.0.113.2:4500")),
        peer("y-1", "gw-y", &keys[2], Some("203.0.113.3:4500")),
    ];
    let direct: Vec<IpsecSpec> = (0..3).map(|i| plan_for(&gws, i, &observed)).collect();
    assert!(direct[1].conns["raven-y-1"].direct, "{:?}", direct[1]);
    assert!(direct[2].conns["raven-x-1"].direct, "{:?}", direct[2]);
    let pinger = Pinger::start(x, "10.2.0.1", "10.3.0.1", 300);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let charons = [&vr, &vx, &vy];
    let one_direct_sa = |sas: &[SaHealth], conn: &str| {
        let up: Vec<&SaHealth> = sas.iter().filter(|s| s.conn == conn).collect();
        up.len() == 1 && up[0].ike_state == "ESTABLISHED"
    };
    loop {
        for (i, v) in charons.iter().enumerate() {
            let a = recs[i]
                .apply(&mut client(v).await, &direct[i])
                .await
                .expect("apply");
            assert!(a.errors.is_empty(), "{a:?}");
        }
        let sx = list_sas(&mut client(&vx).await).await.expect("list-sas");
        let sy = list_sas(&mut client(&vy).await).await.expect("list-sas");
        if one_direct_sa(&sx, "raven-y-1") && one_direct_sa(&sy, "raven-x-1") {
            let sa = sx.iter().find(|s| s.conn == "raven-y-1").expect("sa");
            assert_eq!(
                sa.remote.map(|e| e.to_string()).as_deref(),
                Some("203.0.113.3:4500"),
                "straight to y's NAT: {sa:#?}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no single direct IKE_SA within 40 s: x {sx:#?} y {sy:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "direct IKE_SA x <-> y through both NATs after {:?}",
        t.elapsed()
    );
    let (sent, lost) = pinger.stop();
    eprintln!("relay -> direct while pinging at 20 pps: {lost} of {sent} lost");
    assert_eq!(lost, 0, "moving onto the direct path loses nothing");
    // Once direct, nothing between x and y crosses the relay.
    let lines = capture(r, "br0", || {
        assert_eq!(ping(x, "10.2.0.1", "10.3.0.1", 10), 10);
    });
    let esp: Vec<&String> = lines
        .iter()
        .filter(|l| {
            // ESP only: the relay's own IKE exchanges with x and y show up too.
            is_esp(l) && (l.contains(" > 203.0.113.1.") || l.contains("203.0.113.1.4500 >"))
        })
        .collect();
    assert!(
        esp.is_empty(),
        "ESP through the relay once direct: {esp:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("203.0.113.2.4500 > 203.0.113.3.4500") && is_esp(l)),
        "the direct ESP is on the wire: {lines:#?}"
    );

    // The observations go (the hub no longer passes them on): the direct
    // path is closed and the relay, which carried the selectors all
    // along, takes the traffic again.
    let pinger = Pinger::start(x, "10.2.0.1", "10.3.0.1", 300);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, v) in charons.iter().enumerate() {
        let a = recs[i]
            .apply(&mut client(v).await, &plans[i])
            .await
            .expect("apply");
        assert!(a.errors.is_empty(), "{a:?}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (sent, lost) = pinger.stop();
    eprintln!("direct -> relay while pinging at 20 pps: {lost} of {sent} lost");
    assert_eq!(lost, 0, "moving back onto the relay loses nothing");
    assert_eq!(
        ping(x, "10.2.0.1", "10.3.0.1", 3),
        3,
        "through the relay again"
    );

    // Removing the wanted addresses removes only raven's.
    support::block_on_in(r, || async {
        raven_edge::ipsec::agent::sync_lo_addresses(&Default::default()).await
    })
    .expect("lo addresses");
    let (_, addrs) = ns_run(r, &["ip", "-4", "addr", "show", "dev", "lo"]);
    assert!(!addrs.contains("lo:raven"), "{addrs}");
    assert!(
        addrs.contains("10.1.0.1/32"),
        "foreign addresses stay: {addrs}"
    );
}
