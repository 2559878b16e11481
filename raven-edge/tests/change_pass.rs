//! A new topology is applied as the difference from what the last clean
//! pass applied, not by reading the kernel again: against a real kernel in
//! a namespace of its own (`rcp<pid>-<n>`, deleted by name on drop), with
//! `ip monitor route` counting every route the kernel saw change and the
//! pass's own counts of what it read and wrote. The cluster is the edge
//! benchmark's (`benches/edge.rs`) at 20 gateways × 5 nodes. Needs root and
//! iptables; skipped otherwise, unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

#[path = "../benches/edge.rs"]
#[allow(dead_code)]
mod edge;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use raven_edge::dataplane::{self, Kernel, NodeInputs, ReconcileReport, model, skipnat};
use raven_model::topology::GatewayView;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ready() -> bool {
    support::root_with(&["ip", "iptables", "ip6tables"])
}

/// A namespace holding the member node's underlay; deleted on drop.
struct Ns(String);

impl Ns {
    fn new() -> Self {
        let ns = Self(format!(
            "rcp{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        support::must(&["netns", "add", &ns.0]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&[
            "link", "add", "rcp-eth", "type", "veth", "peer", "name", "rcp-peer",
        ]);
        ns.ip(&["link", "set", "rcp-peer", "up"]);
        let addr = format!("{}/16", edge::node_ip(0, 1));
        ns.ip(&["addr", "add", &addr, "dev", "rcp-eth"]);
        ns.ip(&["link", "set", "rcp-eth", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        support::must(&[&["-n", self.0.as_str()], args].concat());
    }

    fn pass(&self, kernel: &Kernel, inputs: &NodeInputs, change: bool) -> ReconcileReport {
        let (kernel, inputs) = (kernel.clone(), inputs.clone());
        support::block_on_in(&self.0, move || async move {
            if change {
                kernel.reconcile_change(&inputs).await
            } else {
                kernel.reconcile(&inputs).await
            }
            .expect("reconcile")
        })
    }

    /// Raven's routes and v4 skip-NAT rules in the kernel now.
    fn kernel(&self) -> (model::State, skipnat::Observed) {
        support::block_on_in(&self.0, || async {
            let h = dataplane::netlink::connect().expect("netlink");
            let devs = dataplane::TunnelDevs {
                tunnel: model::DEFAULT_TUNNEL_DEV,
                direct: "",
            };
            let routes = dataplane::netlink::observe(&h, devs)
                .await
                .expect("observe");
            let nat = skipnat::observe(skipnat::Family::V4)
                .await
                .expect("iptables");
            (routes, nat)
        })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ip monitor route` in a namespace: every route change the kernel
/// announces, between two marker routes (a table raven never touches), so
/// nothing before the monitor subscribed or after the pass is missed or
/// counted.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

const MARK_TABLE: &str = "9999";

impl Monitor {
    fn start(ns: &Ns) -> Self {
        let mut child = Command::new("ip")
            .args(["-n", &ns.0, "monitor", "route"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip monitor");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut m = Self { child, lines };
        // A new marker route per attempt until one is seen: the first may
        // precede the subscription, and a kernel need not announce a
        // `replace` that changes nothing.
        for attempt in 0.. {
            assert!(attempt < 100, "ip monitor never reported a marker");
            let marker = format!("198.51.100.{attempt}");
            ns.ip(&[
                "route",
                "add",
                &format!("{marker}/32"),
                "dev",
                "lo",
                "table",
                MARK_TABLE,
            ]);
            if m.until(&format!("{marker} dev"), Duration::from_millis(100))
                .is_some()
            {
                break;
            }
        }
        m
    }

    /// Lines up to (not including) the first one containing `marker`.
    fn until(&mut self, marker: &str, wait: Duration) -> Option<Vec<String>> {
        let mut seen = Vec::new();
        loop {
            let l = self.lines.recv_timeout(wait).ok()?;
            if l.contains(marker) {
                return Some(seen);
            }
            seen.push(l);
        }
    }

    /// The route changes announced since the start.
    fn stop(mut self, ns: &Ns) -> Vec<String> {
        ns.ip(&[
            "route",
            "add",
            "192.0.2.2/32",
            "dev",
            "lo",
            "table",
            MARK_TABLE,
        ]);
        let seen = self
            .until("192.0.2.2", Duration::from_secs(10))
            .expect("the end marker");
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Late start markers are not route changes of raven's.
        seen.into_iter()
            .filter(|l| !l.contains(&format!("table {MARK_TABLE}")))
            .collect()
    }
}

fn cluster() -> Vec<GatewayView> {
    let cfg = edge::Config::small();
    (0..cfg.gateways)
        .map(|i| edge::gateway(i, cfg.nodes))
        .collect()
}

/// Raven's chains with their rules in order (which carries no meaning).
fn sorted_chains(mut c: skipnat::Chains) -> skipnat::Chains {
    for lines in c.values_mut() {
        lines.sort();
    }
    c
}

#[test]
fn a_one_node_change_writes_exactly_its_two_routes_and_its_skip_nat_rules_and_reads_nothing() {
    one_node_change_pass(edge::inputs);
}

#[test]
fn a_one_domain_prefix_change_on_a_compact_member_writes_exactly_its_routes_and_skip_nat_rules_and_reads_nothing()
 {
    one_node_change_pass(edge::compact_inputs);
}

#[test]
fn a_compact_member_that_gets_the_full_view_and_back_keeps_the_kernel_exact() {
    if !ready() {
        return;
    }
    let ns = Ns::new();
    let kernel = Kernel::new(true);
    let mut gateways = cluster();
    ns.pass(&kernel, &edge::compact_inputs(gateways.clone()), true);
    // The member became a tunnel candidate: the full view, the same
    // routes; then a change in the full view, then compact again.
    let full = ns.pass(&kernel, &edge::inputs(gateways.clone()), true);
    assert!(full.failures.is_empty(), "{:?}", full.failures);
    assert_eq!((full.io.observed, full.ops_applied), (false, 0));
    edge::change_one_node(&mut gateways, 0);
    let changed = ns.pass(&kernel, &edge::inputs(gateways.clone()), true);
    assert!(changed.failures.is_empty(), "{:?}", changed.failures);
    let back = edge::compact_inputs(gateways.clone());
    let r = ns.pass(&kernel, &back, true);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.ops_applied, 0, "the compact view wants the same kernel");
    let (routes, nat) = ns.kernel();
    assert!(routes.routes == dataplane::desired(&back).state.routes);
    assert_eq!(
        sorted_chains(nat.chains),
        sorted_chains(skipnat::spec(&back).v4.layout())
    );
    let resync = ns.pass(&kernel, &back, false);
    assert_eq!(resync.ops_applied, 0, "a resync finds nothing to do");
}

/// One remote node's pod subnet moves in the view `view` makes of the
/// cluster: the change pass patches, writes its two routes and skip-NAT
/// rules, and reads nothing.
fn one_node_change_pass(view: fn(Vec<GatewayView>) -> NodeInputs) {
    if !ready() {
        return;
    }
    let ns = Ns::new();
    let kernel = Kernel::new(true);
    let mut gateways = cluster();
    let first = ns.pass(&kernel, &view(gateways.clone()), true);
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    assert!(
        first.io.observed,
        "the first pass after a start reads the kernel"
    );
    assert!(first.io.nat_listings >= 1);

    let before = dataplane::desired(&view(gateways.clone()));
    edge::change_one_node(&mut gateways, 0);
    let next = view(gateways.clone());
    let after = dataplane::desired(&next);
    let added: Vec<_> = after
        .state
        .routes
        .difference(&before.state.routes)
        .collect();
    let removed: Vec<_> = before
        .state
        .routes
        .difference(&after.state.routes)
        .collect();
    assert_eq!(
        (added.len(), removed.len()),
        (1, 1),
        "the change moves one pod subnet"
    );

    // The skip-NAT rules that differ: the destination prefixes (aggregated)
    // of before and after, either way, in their buckets (and a bucket
    // created or emptied, with its jump).
    let nat_differ = skipnat::changes_between(
        &skipnat::spec(&view(cluster())).v4.layout(),
        &skipnat::spec(&next).v4.layout(),
    );
    assert!(
        nat_differ >= 2,
        "the moved subnet leaves one rule and enters another"
    );

    let monitor = Monitor::start(&ns);
    let r = ns.pass(&kernel, &next, true);
    let seen = monitor.stop(&ns);

    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(!r.io.observed, "planned against the last pass, not a dump");
    assert!(!r.io.rebuilt, "patched, not planned in full");
    assert_eq!(r.io.netlink_ops, 2, "one route deleted, one added");
    assert_eq!(r.io.nat_listings, 0, "no iptables listing");
    assert_eq!(r.io.nat_restores, 1, "one iptables-restore");
    assert_eq!(
        r.io.nat_changes, nat_differ,
        "exactly the rules that differ"
    );
    assert_eq!(r.ops_applied, 2 + nat_differ);
    // What the kernel saw: exactly the two routes.
    assert_eq!(
        seen.len(),
        2,
        "route changes the kernel announced: {seen:?}"
    );
    let deleted: Vec<&String> = seen.iter().filter(|l| l.starts_with("Deleted ")).collect();
    assert_eq!(deleted.len(), 1, "{seen:?}");
    assert!(
        deleted[0].contains(&removed[0].dst.to_string()),
        "{} deleted: {seen:?}",
        removed[0].dst
    );
    let new = seen
        .iter()
        .find(|l| !l.starts_with("Deleted "))
        .expect("an add");
    assert!(
        new.starts_with(&added[0].dst.to_string()),
        "{} added: {seen:?}",
        added[0].dst
    );
    // And the kernel holds exactly what a full read plans nothing for.
    let (routes, nat) = ns.kernel();
    assert!(
        routes.routes == after.state.routes,
        "routes after the change"
    );
    let want = skipnat::spec(&next);
    assert_eq!(sorted_chains(nat.chains), sorted_chains(want.v4.layout()));
    assert_eq!(nat.jumps, vec![skipnat::jump_line()]);
    let resync = ns.pass(&kernel, &next, false);
    assert!(resync.io.observed);
    assert_eq!(
        resync.ops_applied, 0,
        "a resync after the change finds nothing to do"
    );
    // The same topology again: nothing read, nothing written.
    let again = ns.pass(&kernel, &next, true);
    assert_eq!(
        (again.io.observed, again.ops_applied, again.io.nat_restores),
        (false, 0, 0)
    );
}

#[test]
fn drift_is_repaired_by_the_resync_and_a_failed_pass_makes_the_next_change_read_the_kernel() {
    if !ready() {
        return;
    }
    let ns = Ns::new();
    let kernel = Kernel::new(true);
    let mut gateways = cluster();
    ns.pass(&kernel, &edge::inputs(gateways.clone()), true);

    // A route removed behind raven's back: a change pass does not read the
    // kernel, the resync puts it back.
    let victim = dataplane::desired(&edge::inputs(gateways.clone()))
        .state
        .routes
        .iter()
        .next()
        .expect("a route")
        .dst
        .to_string();
    let table = model::TABLE_REMOTE.to_string();
    ns.ip(&["route", "del", &victim, "table", &table]);
    let same = ns.pass(&kernel, &edge::inputs(gateways.clone()), true);
    assert_eq!((same.io.observed, same.ops_applied), (false, 0));
    let repair = ns.pass(&kernel, &edge::inputs(gateways.clone()), false);
    assert_eq!(
        repair.io.netlink_ops, 1,
        "exactly the missing route is put back"
    );

    // A foreign route holds the slot the change wants: the pass reports
    // the conflict and forgets what it applied, so the next change reads
    // the kernel again.
    edge::change_one_node(&mut gateways, 0);
    let next = edge::inputs(gateways.clone());
    let wanted = gateways[gateways.len() / 2].members[3].subnets[0].to_string();
    ns.ip(&[
        "route", "add", &wanted, "dev", "lo", "table", &table, "proto", "static",
    ]);
    let held = ns.pass(&kernel, &next, true);
    assert!(!held.io.observed);
    assert_eq!(held.failures.len(), 1, "{:?}", held.failures);
    ns.ip(&["route", "del", &wanted, "table", &table, "proto", "static"]);
    let retry = ns.pass(&kernel, &next, true);
    assert!(
        retry.io.observed,
        "after a failure the next pass reads the kernel"
    );
    assert!(retry.failures.is_empty(), "{:?}", retry.failures);
    assert_eq!(retry.io.netlink_ops, 1, "the route that was held, now free");

    // raven0 recreated behind raven's back (its routes gone with it): the
    // change pass sees the new index and reads the kernel.
    ns.ip(&["link", "del", model::VXLAN_DEV]);
    let relinked = ns.pass(&kernel, &next, true);
    assert!(
        relinked.io.observed,
        "a device that changed index is re-read"
    );
    let (routes, _) = ns.kernel();
    assert!(routes.routes == dataplane::desired(&next).state.routes);
}
