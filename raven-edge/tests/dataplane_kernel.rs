//! The dataplane against a real kernel: every test makes its own network
//! namespace (`rvk-<pid>-<n>`), runs raven's reconcile inside it on a
//! dedicated thread, checks the result with `ip -j`, and deletes the
//! namespace — also when it fails. Needs root; skipped (with a message)
//! otherwise, unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use raven_edge::dataplane::{Kernel, NodeInputs, ReconcileReport};
use raven_model::fixtures::{self, member};
use raven_model::topology::{GatewayEndpoint, GatewayView, Member, NodeView};
use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    support::root_with(&[])
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn ip_json(ns: &str, args: &[&str]) -> Value {
    let mut full = vec!["-n", ns, "-j"];
    full.extend_from_slice(args);
    let text = ip(&full);
    serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).expect("ip -j output")
}

/// A network namespace with one veth pair holding `addr` on `v0`; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(addr: &str) -> Self {
        let name = format!(
            "rvk-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&[
            "-n", &ns.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        ip(&["-n", &ns.name, "addr", "add", addr, "dev", "v0"]);
        for l in ["lo", "v0", "v1"] {
            ip(&["-n", &ns.name, "link", "set", l, "up"]);
        }
        ns
    }

    /// Runs the future `make` builds inside the namespace, on a runtime of
    /// its own.
    fn block_on<T: Send, F: std::future::Future<Output = T>>(
        &self,
        make: impl FnOnce() -> F + Send,
    ) -> T {
        support::block_on_in(&self.name, make)
    }

    /// One reconcile, from a fresh netlink connection; the ops applied.
    fn reconcile(&self, inputs: &NodeInputs) -> usize {
        self.reconcile_with(Kernel::new(true), inputs).ops_applied
    }

    fn reconcile_with(&self, kernel: Kernel, inputs: &NodeInputs) -> ReconcileReport {
        let inputs = inputs.clone();
        self.block_on(move || async move {
            let inputs = with_underlay(inputs).await;
            kernel.reconcile(&inputs).await
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn plan(&self, inputs: &NodeInputs) -> Vec<String> {
        let inputs = inputs.clone();
        self.block_on(move || async move {
            let inputs = with_underlay(inputs).await;
            Kernel::new(false).plan(&inputs).await
        })
        .map(|p| p.iter().map(ToString::to_string).collect())
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn teardown(&self) {
        self.block_on(|| async { Kernel::new(true).teardown("raven-wg0").await })
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn routes(&self, table: &str) -> Vec<(String, String)> {
        // An empty table does not exist for `ip route show`.
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j", "route", "show", "table", table])
            .output()
            .expect("ip");
        if String::from_utf8_lossy(&out.stderr).contains("does not exist") {
            return Vec::new();
        }
        ip_json(&self.name, &["route", "show", "table", table])
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["dst"].as_str().unwrap_or_default().to_owned(),
                    r["protocol"].to_string(),
                )
            })
            .collect()
    }

    fn v6_routes(&self, table: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "-n", &self.name, "-6", "-j", "route", "show", "table", table,
            ])
            .output()
            .expect("ip");
        if String::from_utf8_lossy(&out.stderr).contains("does not exist") {
            return Vec::new();
        }
        ip_json(&self.name, &["-6", "route", "show", "table", table])
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{} via {}",
                    r["dst"].as_str().unwrap_or_default(),
                    r["gateway"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    fn link(&self) -> Option<Value> {
        let v = ip_json(&self.name, &["-d", "link", "show"]);
        v.as_array()
            .into_iter()
            .flatten()
            .find(|l| l["ifname"] == "raven0")
            .cloned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn gateway(g: &str, active: &str, members: Vec<Member>) -> GatewayView {
    GatewayView {
        under_nat: true,
        active_tunnel: Some(GatewayEndpoint {
            under_nat: true,
            ..fixtures::endpoint(active, 4500)
        }),
        members,
        ..fixtures::gateway(g)
    }
}

/// `inputs` with the underlay MTU read from the namespace's link that holds
/// the node's address, as the agent reads it, unless the test set one.
async fn with_underlay(mut inputs: NodeInputs) -> NodeInputs {
    if inputs.underlay_mtu == 0 {
        let ip = inputs.me.as_ref().and_then(|m| m.private_ip);
        inputs.underlay_mtu = raven_edge::dataplane::underlay_mtu(ip).await;
    }
    inputs
}

/// The user-manual layout: me is hangzhou node `me` (gateway `hz-gw`).
fn inputs(me: &str, my_ip: &str) -> NodeInputs {
    NodeInputs {
        me: Some(NodeView {
            private_ip: Some(fixtures::ip(my_ip)),
            ..fixtures::node_view(me, Some("gw-hangzhou"))
        }),
        gateways: vec![
            gateway(
                "gw-hangzhou",
                "hz-gw",
                vec![
                    member("hz-gw", "172.16.2.103", &["10.244.1.0/24"]),
                    member("hz-2", "172.16.2.104", &["10.244.2.0/24"]),
                ],
            ),
            gateway(
                "gw-qingdao",
                "qd-gw",
                vec![member(
                    "qd-gw",
                    "172.16.1.89",
                    &["10.244.3.0/24", "fd10:3::/64"],
                )],
            ),
        ],
        settings: Some(fixtures::settings()),
        underlay_mtu: 0,
        ..Default::default()
    }
}

#[test]
fn reconcile_creates_raven0_fdb_neighbours_routes_and_rules() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let n = inputs("hz-2", "172.16.2.104");
    assert!(ns.reconcile(&n) > 0);

    let link = ns.link().expect("raven0 exists");
    let vx = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(vx["id"], 1);
    assert_eq!(vx["port"], 4472);
    assert_eq!(vx["local"], "172.16.2.104");
    assert_eq!(link["mtu"], 1450, "veth 1500 minus VXLAN 50");
    assert_eq!(link["address"], "0e:52:ac:10:02:68");

    let fdb = Command::new("bridge")
        .args(["-n", &ns.name, "-j", "fdb", "show", "dev", "raven0"])
        .output()
        .expect("bridge");
    let fdb: Value = serde_json::from_slice(&fdb.stdout).expect("json");
    let entries: Vec<(String, String)> = fdb
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["dst"].is_string())
        .map(|e| {
            (
                e["mac"].as_str().unwrap_or_default().to_owned(),
                e["dst"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![("0e:52:ac:10:02:67".to_owned(), "172.16.2.103".to_owned())],
        "one unicast entry, no all-zero entry"
    );

    let routes = ns.routes("9027");
    let dsts: Vec<&str> = routes.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(dsts, vec!["10.244.3.0/24", "172.16.1.89"]);
    assert!(
        routes.iter().all(|(_, p)| p == "\"82\"" || p == "82"),
        "{routes:?}"
    );
    let v6 = ns.v6_routes("9027");
    assert_eq!(v6, vec!["fd10:3::/64 via fe80::c52:acff:fe10:267"]);
    let rules = ip_json(&ns.name, &["rule", "show"]);
    let prios: Vec<u64> = rules
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["priority"].as_u64())
        .collect();
    assert!(prios.contains(&9027) && prios.contains(&9028), "{prios:?}");
}

#[test]
fn hand_deleted_route_is_repaired() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let n = inputs("hz-2", "172.16.2.104");
    ns.reconcile(&n);
    ip(&[
        "-n",
        &ns.name,
        "route",
        "del",
        "10.244.3.0/24",
        "table",
        "9027",
    ]);
    assert_eq!(ns.routes("9027").len(), 1);
    assert_eq!(ns.reconcile(&n), 1, "exactly the missing route is put back");
    assert_eq!(ns.routes("9027").len(), 2);
}

#[test]
fn foreign_route_in_raven_table_is_untouched() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    ip(&[
        "-n",
        &ns.name,
        "route",
        "add",
        "10.99.0.0/24",
        "dev",
        "v0",
        "table",
        "9027",
        "proto",
        "static",
    ]);
    ip(&[
        "-n",
        &ns.name,
        "route",
        "add",
        "10.98.0.0/24",
        "dev",
        "v0",
        "table",
        "100",
    ]);
    let n = inputs("hz-2", "172.16.2.104");
    ns.reconcile(&n);
    ns.reconcile(&n);
    ns.teardown();
    assert_eq!(
        ns.routes("9027"),
        vec![("10.99.0.0/24".to_owned(), "\"static\"".to_owned())]
    );
    assert_eq!(ns.routes("100").len(), 1);
}

/// A restarted agent adopts what it finds: a fresh netlink connection plans
/// nothing, and raven0 keeps its ifindex.
#[test]
fn second_reconcile_is_a_no_op() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let n = inputs("hz-2", "172.16.2.104");
    ns.reconcile(&n);
    let index = ns.link().map(|l| l["ifindex"].clone());
    // A new agent: fresh netlink connection, same state.
    assert_eq!(ns.plan(&n), Vec::<String>::new(), "nothing to change");
    assert_eq!(ns.reconcile(&n), 0);
    assert_eq!(
        ns.link().map(|l| l["ifindex"].clone()),
        index,
        "raven0 was not recreated"
    );
}

#[test]
fn mtu_change_does_not_recreate_raven0() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let mut n = inputs("hz-2", "172.16.2.104");
    ns.reconcile(&n);
    let index = ns.link().map(|l| l["ifindex"].clone());
    n.underlay_mtu = 1400;
    assert!(ns.reconcile(&n) > 0);
    let link = ns.link().expect("raven0");
    assert_eq!(link["mtu"], 1350);
    assert_eq!(Some(link["ifindex"].clone()), index);
}

#[test]
fn teardown_removes_only_ravens_objects() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    ip(&[
        "-n", &ns.name, "rule", "add", "priority", "100", "lookup", "100",
    ]);
    ns.reconcile(&inputs("hz-2", "172.16.2.104"));
    ns.teardown();
    assert!(ns.link().is_none());
    assert!(ns.routes("9027").is_empty());
    let rules = ip_json(&ns.name, &["rule", "show"]);
    let prios: Vec<u64> = rules
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["priority"].as_u64())
        .collect();
    assert!(!prios.contains(&9027) && !prios.contains(&9028));
    assert!(prios.contains(&100), "a foreign rule is left alone");
    assert!(ns.link().is_none());
    let veth = ip_json(&ns.name, &["link", "show", "v0"]);
    assert_eq!(
        veth.as_array().map(Vec::len),
        Some(1),
        "foreign links are left alone"
    );
}

#[test]
fn gateway_node_gets_return_routes_in_table_9028() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.103/24");
    ns.reconcile(&inputs("hz-gw", "172.16.2.103"));
    assert!(
        ns.routes("9027").is_empty(),
        "the gateway sends remote traffic into its tunnel, not to itself"
    );
    assert_eq!(
        ns.routes("9028")
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        vec!["10.244.2.0/24"]
    );
    let rules = ip_json(&ns.name, &["rule", "show"]);
    let ret = rules
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["priority"] == 9028)
        .cloned()
        .expect("rule 9028");
    assert_eq!(ret["iif"], "raven-wg0");
}

/// `ip -j [-6] route show table T` in the namespace (an empty table does
/// not exist for `ip`: no routes).
fn route_table(ns: &Netns, v6: bool, table: &str) -> Vec<Value> {
    let mut args = vec!["-n", ns.name.as_str(), "-j"];
    if v6 {
        args.push("-6");
    }
    args.extend(["route", "show", "table", table]);
    let out = Command::new("ip").args(&args).output().expect("ip");
    if String::from_utf8_lossy(&out.stderr).contains("does not exist") {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array().cloned().unwrap_or_default()
}

fn route_mtu(r: &Value) -> Option<u64> {
    r["metrics"]
        .as_array()?
        .iter()
        .find_map(|m| m["mtu"].as_u64())
}

fn is_raven_protocol(r: &Value) -> bool {
    r["protocol"] == "82" || r["protocol"] == 82
}

/// `ip -j -4|-6 neigh show dev raven0 nud permanent`: (address, MAC).
fn neighbours(ns: &Netns, v6: bool) -> Vec<(String, String)> {
    let mut args = vec!["-n", ns.name.as_str(), "-j", if v6 { "-6" } else { "-4" }];
    args.extend(["neigh", "show", "dev", "raven0", "nud", "permanent"]);
    let text = ip(&args);
    let v: Value = serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
        .expect("ip -j neigh");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["dst"].as_str().unwrap_or_default().to_owned(),
                n["lladdr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `bridge -j fdb show dev raven0`: (MAC, VXLAN destination) of unicast entries.
fn fdb(ns: &Netns) -> Vec<(String, String)> {
    let out = Command::new("bridge")
        .args(["-n", &ns.name, "-j", "fdb", "show", "dev", "raven0"])
        .output()
        .expect("bridge");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["dst"].is_string())
        .map(|e| {
            (
                e["mac"].as_str().unwrap_or_default().to_owned(),
                e["dst"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn ipv6_remote_prefix_is_routed_via_the_gateways_link_local_address() {
    if !is_root() {
        return;
    }
    // hz-2 (not the gateway): the qingdao IPv6 subnet goes to hz-gw over raven0.
    let ns = Netns::new("172.16.2.104/24");
    let n = inputs("hz-2", "172.16.2.104");
    ns.reconcile(&n);
    let v6 = route_table(&ns, true, "9027");
    assert_eq!(v6.len(), 1, "{v6:?}");
    let r = &v6[0];
    assert_eq!(r["dst"], "fd10:3::/64");
    assert_eq!(
        r["gateway"], "fe80::c52:acff:fe10:267",
        "EUI-64 of hz-gw's raven0 MAC"
    );
    assert_eq!(r["dev"], "raven0");
    assert!(is_raven_protocol(r), "{r}");
    assert_eq!(
        route_mtu(r),
        Some(1420),
        "min of raven0 (1450) and the gateway's tunnel (1420): consecutive hops, not nested"
    );
    assert!(
        r["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "onlink")),
        "{r}"
    );
    assert!(
        neighbours(&ns, true).contains(&(
            "fe80::c52:acff:fe10:267".to_owned(),
            "0e:52:ac:10:02:67".to_owned()
        )),
        "the IPv6 next hop resolves without neighbour discovery"
    );
    let rules = ip_json(&ns.name, &["-6", "rule", "show"]);
    let prios: Vec<u64> = rules
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["priority"].as_u64())
        .collect();
    assert!(prios.contains(&9027) && prios.contains(&9028), "{prios:?}");

    // Drift on the IPv6 side is repaired like any other, and then stable.
    ip(&[
        "-n",
        &ns.name,
        "-6",
        "route",
        "del",
        "fd10:3::/64",
        "table",
        "9027",
    ]);
    assert_eq!(ns.reconcile(&n), 1);
    assert_eq!(route_table(&ns, true, "9027").len(), 1);
    assert_eq!(ns.plan(&n), Vec::<String>::new());

    // The gateway routes a member's IPv6 subnet back over raven0.
    let gw = Netns::new("172.16.2.103/24");
    let mut g = inputs("hz-gw", "172.16.2.103");
    g.gateways[0].members[1]
        .subnets
        .push("fd10:2::/64".parse().expect("cidr"));
    gw.reconcile(&g);
    let back = route_table(&gw, true, "9028");
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0]["dst"], "fd10:2::/64");
    assert_eq!(back[0]["gateway"], "fe80::c52:acff:fe10:268");
    assert_eq!(gw.plan(&g), Vec::<String>::new());
}

#[test]
fn member_leaving_the_domain_loses_its_fdb_and_neighbour_entries() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let mut n = inputs("hz-2", "172.16.2.104");
    n.gateways[0]
        .members
        .push(member("hz-3", "172.16.2.105", &["10.244.5.0/24"]));
    ns.reconcile(&n);
    assert_eq!(fdb(&ns).len(), 2);
    assert_eq!(neighbours(&ns, false).len(), 2);

    n.gateways[0].members.pop();
    assert!(ns.reconcile(&n) > 0);
    assert_eq!(
        fdb(&ns),
        vec![("0e:52:ac:10:02:67".to_owned(), "172.16.2.103".to_owned())]
    );
    assert_eq!(
        neighbours(&ns, false),
        vec![("172.16.2.103".to_owned(), "0e:52:ac:10:02:67".to_owned())]
    );
    assert_eq!(neighbours(&ns, true).len(), 1);
    assert_eq!(ns.plan(&n), Vec::<String>::new());
}

#[test]
fn foreign_route_on_a_wanted_destination_is_reported_not_overwritten() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    ip(&[
        "-n",
        &ns.name,
        "route",
        "add",
        "10.244.3.0/24",
        "dev",
        "v0",
        "table",
        "9027",
        "proto",
        "static",
    ]);
    let n = inputs("hz-2", "172.16.2.104");
    let report = ns.reconcile_with(Kernel::new(true), &n);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("10.244.3.0/24") && w.contains("does not own")),
        "{:?}",
        report.warnings
    );
    assert!(
        report.failures.iter().any(|w| w.contains("10.244.3.0/24")),
        "a route not installed is a failure the agent reports (Applied success: false): {:?}",
        report.failures
    );
    let routes = ns.routes("9027");
    assert!(
        routes.contains(&("10.244.3.0/24".to_owned(), "\"static\"".to_owned())),
        "the foreign route keeps its slot: {routes:?}"
    );
    assert!(
        routes.iter().any(|(d, _)| d == "172.16.1.89"),
        "the rest is applied: {routes:?}"
    );
    let rules = ip_json(&ns.name, &["rule", "show"]);
    assert!(
        rules
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["priority"] == 9027),
        "a conflict does not stop the reconcile"
    );
}

#[test]
fn changed_vxlan_port_recreates_raven0_and_keeps_tunnel_routes() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.103/24");
    // A stand-in for the gateway's tunnel device (no kernel WireGuard here).
    ip(&[
        "-n",
        &ns.name,
        "link",
        "add",
        "raven-wg0",
        "type",
        "veth",
        "peer",
        "name",
        "wgpeer",
    ]);
    ip(&["-n", &ns.name, "link", "set", "raven-wg0", "up"]);
    let mut g = inputs("hz-gw", "172.16.2.103");
    g.tunnel_up = true;
    ns.reconcile(&g);
    let tunnel = route_table(&ns, false, "9027");
    assert_eq!(tunnel.len(), 2, "{tunnel:?}");
    assert!(
        tunnel
            .iter()
            .all(|r| r["dev"] == "raven-wg0" && route_mtu(r) == Some(1420))
    );
    let index = ns.link().map(|l| l["ifindex"].clone());

    if let Some(s) = &mut g.settings {
        s.vxlan_port = 4789;
    }
    assert!(ns.reconcile(&g) > 0);
    let link = ns.link().expect("raven0");
    assert_eq!(link["linkinfo"]["info_data"]["port"], 4789);
    assert_ne!(Some(link["ifindex"].clone()), index, "recreated");
    assert_eq!(
        route_table(&ns, false, "9027").len(),
        2,
        "tunnel routes kept"
    );
    assert_eq!(
        ns.routes("9028")
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        vec!["10.244.2.0/24"],
        "return routes restored on the new raven0"
    );
    assert_eq!(ns.plan(&g), Vec::<String>::new());

    // Without the tunnel, its routes go but a reconcile never deletes the
    // device; only teardown does, last.
    g.tunnel_up = false;
    ns.reconcile(&g);
    assert!(route_table(&ns, false, "9027").is_empty());
    let (present, _) = support::ip(&["-n", &ns.name, "link", "show", "raven-wg0"]);
    assert!(present, "reconcile keeps the tunnel device");
    ns.teardown();
    let (present, out) = support::ip(&["-n", &ns.name, "link", "show", "raven-wg0"]);
    assert!(!present, "teardown removes the tunnel device: {out}");
}

#[test]
fn dry_run_observes_and_plans_but_never_writes() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("172.16.2.104/24");
    let n = inputs("hz-2", "172.16.2.104");
    let report = ns.reconcile_with(Kernel::dry_run(), &n);
    assert_eq!(report.ops_applied, 0);
    assert!(!ns.plan(&n).is_empty());
    assert!(ns.link().is_none());
    assert!(ns.routes("9027").is_empty());
}
