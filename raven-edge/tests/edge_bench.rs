//! The edge benchmark (`benches/edge.rs`) at a small size, so it keeps
//! working: 20 gateways × 5 nodes in a namespace of its own. Its timings
//! are printed, never asserted; what is asserted is what the figures count
//! (every install is checked exact inside the benchmark itself). Needs root,
//! iptables, wg and wireguard-go; skipped otherwise, unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

#[path = "../benches/edge.rs"]
#[allow(dead_code)]
mod edge;

#[test]
fn edge_benchmark_runs_at_a_small_size_and_counts_what_it_touched() {
    if !support::root_with(&["ip", "iptables", "ip6tables", "wg", "wireguard-go"]) {
        return;
    }
    let cfg = edge::Config::small();
    let r = edge::run(&cfg);
    let remote_nodes = (cfg.gateways - 1) * cfg.nodes;
    assert_eq!(
        r.routes,
        2 * remote_nodes as usize,
        "an address and a pod subnet per remote node"
    );
    assert_eq!(
        r.noop_ops, 0,
        "a resync with nothing changed changes nothing"
    );
    assert_eq!(
        r.warm_restart_ops, 0,
        "a restart over a programmed kernel changes nothing"
    );
    assert_eq!(
        r.change_routes_touched, 2,
        "a moved pod subnet: one route removed, one added"
    );
    assert!(
        !r.change_pass.observed,
        "a new topology is planned against the last pass, not a dump"
    );
    assert_eq!(
        (
            r.change_pass.netlink_ops,
            r.change_pass.nat_listings,
            r.change_pass.nat_changes
        ),
        (2, 0, r.change_pass_nat_differ),
        "the change pass writes its two routes and the skip-NAT rules that differ, and lists nothing"
    );
    assert_eq!(
        r.wireguard_peers, cfg.peers as usize,
        "raven and wg setconf programmed the same peers (checked inside)"
    );
    assert!(r.store_bytes.0 > 0 && r.store_bytes.2 > 0);
    assert!(!r.figures.is_empty());
}
