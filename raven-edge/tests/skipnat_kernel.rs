//! Skip-NAT against real `nat` tables: a node namespace and a peer
//! namespace joined by a veth pair, a catch-all `MASQUERADE` in the node's
//! `POSTROUTING` standing in for the CNI, and UDP datagrams from a local
//! pod address whose source the peer reports. Every name carries a per-run
//! prefix (`rsn<pid % 10000><n>`); the namespaces are deleted by name on
//! drop, also when a test fails. Needs root and iptables/ip6tables; skipped
//! (with a message) otherwise, unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::net::{IpAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use raven_edge::dataplane::{Kernel, NodeInputs, ReconcileReport, skipnat};
use raven_model::fixtures;
use raven_model::topology::{GatewayEndpoint, GatewayView, Member, NodeView};
use support::must;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The node's underlay address (on the veth) and its local pod addresses.
const NODE: &str = "192.168.77.1";
const NODE6: &str = "fd00:77::1";
const POD: &str = "10.244.1.5";
const POD6: &str = "fd10:1::5";
/// A pod of the remote domain, and an address no raven domain holds; both
/// live in the peer namespace.
const REMOTE_POD: &str = "10.244.3.7";
const REMOTE_POD6: &str = "fd10:3::7";
const OUTSIDE: &str = "10.99.0.7";
const OUTSIDE6: &str = "fd99::7";

fn ready() -> bool {
    support::root_with(&["iptables", "ip6tables", "iptables-save", "ip6tables-save"])
}

/// Runs `args` inside namespace `ns` and fails the test if it fails.
fn exec(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The node namespace `a` and the peer namespace `b`; deleted on drop.
struct Pair {
    a: String,
    b: String,
    /// The namespaces this pair added: only these are deleted.
    created: Vec<String>,
}

impl Pair {
    fn new() -> Self {
        let prefix = format!(
            "rsn{}{}",
            std::process::id() % 10000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut pair = Self {
            a: format!("{prefix}a"),
            b: format!("{prefix}b"),
            created: Vec::new(),
        };
        // The guard exists before anything is created: a failure below
        // still deletes whatever was made (and nothing else).
        for ns in [pair.a.clone(), pair.b.clone()] {
            must(&["netns", "add", &ns]);
            pair.created.push(ns);
        }
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        let (va, vb) = (format!("{prefix}x"), format!("{prefix}y"));
        must(&[
            "-n", a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", b,
        ]);
        for (ns, dev, addr, addr6, pods) in [
            (a, &va, "192.168.77.1/24", "fd00:77::1/64", vec![POD, POD6]),
            (
                b,
                &vb,
                "192.168.77.2/24",
                "fd00:77::2/64",
                vec![REMOTE_POD, REMOTE_POD6, OUTSIDE, OUTSIDE6],
            ),
        ] {
            must(&["-n", ns, "addr", "add", addr, "dev", dev]);
            must(&["-n", ns, "addr", "add", addr6, "dev", dev, "nodad"]);
            for p in pods {
                must(&["-n", ns, "addr", "add", p, "dev", "lo"]);
            }
            for l in ["lo", dev.as_str()] {
                must(&["-n", ns, "link", "set", l, "up"]);
            }
        }
        for dst in ["10.244.3.0/24", "10.99.0.0/24"] {
            must(&["-n", a, "route", "add", dst, "via", "192.168.77.2"]);
        }
        for dst in ["fd10:3::/64", "fd99::/64"] {
            must(&["-n", a, "route", "add", dst, "via", "fd00:77::2"]);
        }
        // Replies to unmasqueraded datagrams (none are sent, but a route
        // back keeps reverse-path filtering from dropping them).
        must(&["-n", b, "route", "add", "10.244.1.0/24", "via", NODE]);
        must(&["-n", b, "route", "add", "fd10:1::/64", "via", NODE6]);
        pair
    }

    fn block_on<T: Send, F: std::future::Future<Output = T>>(
        &self,
        make: impl FnOnce() -> F + Send,
    ) -> T {
        support::block_on_in(&self.a, make)
    }

    /// One reconcile of the node namespace.
    fn reconcile(&self, kernel: Kernel, inputs: &NodeInputs) -> ReconcileReport {
        let inputs = inputs.clone();
        self.block_on(|| async move { kernel.reconcile(&inputs).await })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn teardown(&self) -> usize {
        self.block_on(|| async { Kernel::new(true).teardown("raven-wg0").await })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends a datagram from `src` (in the node namespace) to `dst` (in the
    /// peer namespace); the source address the peer receives it from.
    fn source_seen(&self, src: &str, dst: &str) -> IpAddr {
        let src: IpAddr = src.parse().expect("src");
        let dst: IpAddr = dst.parse().expect("dst");
        let rx = support::in_netns(&self.b, move || UdpSocket::bind((dst, 0)).expect("bind rx"));
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let port = rx.local_addr().expect("rx addr").port();
        let tx = support::in_netns(&self.a, move || UdpSocket::bind((src, 0)).expect("bind tx"));
        tx.send_to(b"raven", (dst, port)).expect("send");
        let mut buf = [0u8; 16];
        // A signal (another test's child exiting) may interrupt the wait.
        let (_, peer) = loop {
            match rx.recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.unwrap_or_else(|e| panic!("{src} -> {dst}: nothing arrived: {e}")),
            }
        };
        peer.ip()
    }

    /// `iptables-save -c -t nat` and `ip6tables-save -c -t nat` of the
    /// node namespace, with counters, without the timestamped comments.
    fn nat_tables(&self) -> String {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .map(|t| exec(&self.a, &[t, "-c", "-t", "nat"]))
            .collect::<String>()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// `iptables -t nat -S` / `ip6tables -t nat -S` of the node namespace.
    fn nat_rules(&self, v6: bool) -> String {
        let bin = if v6 { "ip6tables" } else { "iptables" };
        exec(&self.a, &[bin, "-w", "5", "-t", "nat", "-S"])
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in &self.created {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn gateway(g: &str, active: Option<&str>, members: Vec<Member>) -> GatewayView {
    GatewayView {
        under_nat: true,
        active_tunnel: active.map(|a| GatewayEndpoint {
            under_nat: true,
            ..fixtures::endpoint(a, 4500)
        }),
        members,
        ..fixtures::gateway(g)
    }
}

/// The node is its domain's active gateway with the tunnel down, so raven
/// routes nothing into table 9027 and the test's own routes carry the
/// datagrams; the remote domain holds 10.244.3.0/24 and fd10:3::/64.
fn inputs() -> NodeInputs {
    let member = fixtures::member;
    NodeInputs {
        me: Some(NodeView {
            private_ip: Some(fixtures::ip(NODE)),
            tunnel_active: true,
            tunnel_candidate: true,
            ..fixtures::node_view("hz-gw", Some("gw-hangzhou"))
        }),
        gateways: vec![
            gateway(
                "gw-hangzhou",
                Some("hz-gw"),
                vec![member("hz-gw", NODE, &["10.244.1.0/24", "fd10:1::/64"])],
            ),
            gateway(
                "gw-qingdao",
                None,
                vec![member(
                    "qd-gw",
                    "172.31.0.9",
                    &["10.244.3.0/24", "fd10:3::/64"],
                )],
            ),
        ],
        settings: Some(fixtures::settings()),
        ..Default::default()
    }
}

/// A pair whose node namespace masquerades everything it sends, like a CNI.
fn pair_with_cni_masquerade() -> Pair {
    let p = Pair::new();
    for bin in ["iptables", "ip6tables"] {
        exec(
            &p.a,
            &[
                bin,
                "-w",
                "5",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-j",
                "MASQUERADE",
            ],
        );
    }
    // The stand-in works: without raven, a pod's source is rewritten.
    assert_eq!(
        p.source_seen(POD, REMOTE_POD),
        NODE.parse::<IpAddr>().expect("ip")
    );
    assert_eq!(
        p.source_seen(POD6, REMOTE_POD6),
        NODE6.parse::<IpAddr>().expect("ip")
    );
    p
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn traffic_to_a_remote_domain_keeps_its_source_while_the_rest_is_still_masqueraded() {
    if !ready() {
        return;
    }
    let p = pair_with_cni_masquerade();
    let before = (p.nat_rules(false), p.nat_rules(true));

    // A dry run computes but never writes.
    let n = inputs();
    p.reconcile(Kernel::dry_run(), &n);
    assert_eq!((p.nat_rules(false), p.nat_rules(true)), before);

    let first = p.reconcile(Kernel::new(true), &n);
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let v4 = p.nat_rules(false);
    let first_rule = v4
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING"))
        .unwrap_or_default();
    assert!(
        first_rule.contains("--comment \"raven: ") && first_rule.ends_with("-j RAVEN-SKIP-NAT"),
        "raven's jump comes before the CNI's rule:\n{v4}"
    );

    assert_eq!(
        p.source_seen(POD, REMOTE_POD),
        addr(POD),
        "pod to remote pod"
    );
    assert_eq!(
        p.source_seen(POD6, REMOTE_POD6),
        addr(POD6),
        "IPv6 pod to remote pod"
    );
    assert_eq!(
        p.source_seen(POD, OUTSIDE),
        addr(NODE),
        "pod to the outside"
    );
    assert_eq!(
        p.source_seen(POD6, OUTSIDE6),
        addr(NODE6),
        "IPv6 pod to the outside"
    );

    // The counters show the datagrams went through raven's rules, so a
    // rebuilt chain or a re-inserted jump (counters reset) would show.
    let tables = p.nat_tables();
    assert!(
        tables
            .lines()
            .any(|l| l.contains("-A RAVEN-SKIP-NAT-DST") && !l.starts_with("[0:0]")),
        "{tables}"
    );
    let second = p.reconcile(Kernel::new(true), &n);
    assert_eq!(second.ops_applied, 0, "{second:?}");
    assert_eq!(p.nat_tables(), tables, "a second reconcile changes nothing");

    assert!(p.teardown() > 0);
    assert_eq!(
        (p.nat_rules(false), p.nat_rules(true)),
        before,
        "teardown removes raven's jumps and chains and leaves the CNI's rules"
    );
    assert_eq!(
        p.source_seen(POD, REMOTE_POD),
        addr(NODE),
        "masqueraded again after teardown"
    );
    assert_eq!(p.teardown(), 0, "nothing left to remove");
}

#[test]
fn hand_removed_jump_and_rule_are_restored_without_rebuilding_the_intact_chain() {
    if !ready() {
        return;
    }
    let p = pair_with_cni_masquerade();
    let n = inputs();
    p.reconcile(Kernel::new(true), &n);
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(POD));
    let source_rules = |p: &Pair| -> Vec<String> {
        p.nat_tables()
            .lines()
            .filter(|l| l.contains("-A RAVEN-SKIP-NAT "))
            .map(str::to_owned)
            .collect()
    };
    let counted = source_rules(&p);
    assert!(
        counted.iter().any(|l| !l.starts_with("[0:0]")),
        "{counted:?}"
    );

    // A CNI restart flushing its own rules, say: the jump and a
    // destination are gone, and the pod is masqueraded again.
    exec(
        &p.a,
        &["iptables", "-w", "5", "-t", "nat", "-D", "POSTROUTING", "1"],
    );
    exec(
        &p.a,
        &[
            "iptables",
            "-w",
            "5",
            "-t",
            "nat",
            "-D",
            &bucket_of("10.244.3.0/24"),
            "-d",
            "10.244.3.0/24",
            "-j",
            "ACCEPT",
        ],
    );
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(NODE));

    let repair = p.reconcile(Kernel::new(true), &n);
    assert_eq!(
        repair.ops_applied, 2,
        "the jump and the destination chain: {repair:?}"
    );
    assert_eq!(
        source_rules(&p),
        counted,
        "the source chain was not rebuilt"
    );
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(POD));
    assert_eq!(p.reconcile(Kernel::new(true), &n).ops_applied, 0);
}

#[test]
fn node_leaving_its_gateway_loses_its_skip_nat_rules() {
    if !ready() {
        return;
    }
    let p = pair_with_cni_masquerade();
    let before = (p.nat_rules(false), p.nat_rules(true));
    let mut n = inputs();
    p.reconcile(Kernel::new(true), &n);
    assert_ne!(p.nat_rules(false), before.0);

    // The remote domain goes away: nothing to exempt, in either family.
    n.gateways.truncate(1);
    let r = p.reconcile(Kernel::new(true), &n);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!((p.nat_rules(false), p.nat_rules(true)), before);
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(NODE));
}

/// The remote domain with `n` more pod subnets than the usual one: every
/// other /24 of 10.100.0.0/15 and up (so none aggregate), the usual
/// 10.244.3.0/24 first.
fn inputs_with_many_destinations(n: u32, moved: Option<u32>) -> NodeInputs {
    let mut i = inputs();
    let subnets = &mut i.gateways[1].members[0].subnets;
    for k in 0..n {
        let k = if Some(k) == moved { k + n } else { k };
        let base = u32::from(std::net::Ipv4Addr::new(10, 100, 0, 0)) + (k << 9);
        subnets.push(
            format!("{}/24", std::net::Ipv4Addr::from(base))
                .parse()
                .expect("cidr"),
        );
    }
    i
}

/// `iptables-save -c` lines of the destination buckets, as a set.
fn destination_rules(p: &Pair) -> std::collections::BTreeSet<String> {
    let bucket = format!("-A {}", skipnat::BUCKET_PREFIX);
    p.nat_tables()
        .lines()
        .filter(|l| l.contains(&bucket))
        .map(str::to_owned)
        .collect()
}

/// The chain holding the skip-NAT rule of destination `net`.
fn bucket_of(net: &str) -> String {
    skipnat::bucket_chain(skipnat::bucket(&net.parse().expect("cidr")))
}

#[test]
fn one_moved_prefix_among_3000_touches_two_rules_and_keeps_every_other_rule_and_counter() {
    if !ready() {
        return;
    }
    let p = pair_with_cni_masquerade();
    let before = inputs_with_many_destinations(3000, None);
    let first = p.reconcile(Kernel::new(true), &before);
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(POD));
    let kept = destination_rules(&p);
    assert_eq!(
        kept.len(),
        3003,
        "3,000 pod subnets, 10.244.3.0/24, the remote node's address, one IPv6 prefix"
    );
    assert!(
        kept.iter()
            .any(|l| l.contains("10.244.3.0/24") && !l.starts_with("[0:0]")),
        "the datagram was counted"
    );

    // One remote prefix moves: one rule deleted, one appended; nothing else.
    let after = inputs_with_many_destinations(3000, Some(1500));
    let change = p.reconcile(Kernel::new(true), &after);
    assert_eq!(change.ops_applied, 2, "{change:?}");
    let now = destination_rules(&p);
    let removed: Vec<_> = kept.difference(&now).collect();
    let added: Vec<_> = now.difference(&kept).collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(removed[0].contains("-d 10.111.184.0/24"), "{removed:?}");
    assert!(
        added[0].starts_with("[0:0]") && added[0].contains("-d 10.135.40.0/24"),
        "{added:?}"
    );
    // Counters survive: the chain was not rebuilt.
    assert_eq!(p.source_seen(POD, REMOTE_POD), addr(POD));
    assert_eq!(p.reconcile(Kernel::new(true), &after).ops_applied, 0);
}

#[test]
fn after_a_restart_the_kernel_is_the_truth_stale_and_missing_rules_are_repaired_one_by_one() {
    if !ready() {
        return;
    }
    let p = pair_with_cni_masquerade();
    let n = inputs_with_many_destinations(100, None);
    p.reconcile(Kernel::new(true), &n);
    let wanted = destination_rules(&p);
    // While no agent runs: a destination rule is removed, a duplicate is
    // added by hand, and a stale one in the destination chain itself (as
    // an agent that kept no buckets left them).
    let (removed, duplicated) = (bucket_of("10.100.2.0/24"), bucket_of("10.100.4.0/24"));
    for args in [
        &["-D", &removed, "-d", "10.100.2.0/24", "-j", "ACCEPT"][..],
        &[
            "-A",
            "RAVEN-SKIP-NAT-DST",
            "-d",
            "192.0.2.0/24",
            "-j",
            "ACCEPT",
        ][..],
        &["-A", &duplicated, "-d", "10.100.4.0/24", "-j", "ACCEPT"][..],
    ] {
        let mut cmd = vec!["iptables", "-w", "5", "-t", "nat"];
        cmd.extend_from_slice(args);
        exec(&p.a, &cmd);
    }
    // A new Kernel (a restarted agent) holds no memory of what it wrote.
    let repair = p.reconcile(Kernel::new(true), &n);
    assert_eq!(repair.ops_applied, 3, "{repair:?}");
    let strip = |s: &std::collections::BTreeSet<String>| -> std::collections::BTreeSet<String> {
        s.iter()
            .map(|l| l.split_once("] ").map_or(l.as_str(), |x| x.1).to_owned())
            .collect()
    };
    assert_eq!(strip(&destination_rules(&p)), strip(&wanted));
    assert_eq!(p.reconcile(Kernel::new(true), &n).ops_applied, 0);
}
