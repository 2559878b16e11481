//! End-to-end scenarios on the user-manual cluster built from network
//! namespaces (see `raven_tests::lab`): real hub, real agents, userspace
//! WireGuard through NAT. Each scenario prints the convergence time it
//! measured. Needs root, wireguard-go, nft and grpcurl; skipped otherwise
//! unless `RAVEN_REQUIRE_TOOLS=1`. Labs run one at a time.

use std::process::Command;
use std::time::{Duration, Instant};

use raven_tests::containers::Pinger;
use raven_tests::lab::{Lab, LabNode, NODES, ping_summary};

mod lab_common;

use lab_common::{active_tunnel, agents, converge, name_of, pod, shenzhen, try_agents, wait_for};

fn up(tag: &str) -> (std::sync::MutexGuard<'static, ()>, Lab) {
    up_with(tag, |_| {})
}

/// A lab changed by `prepare` after it is built, before anything runs.
fn up_with(tag: &str, prepare: impl FnOnce(&mut Lab)) -> (std::sync::MutexGuard<'static, ()>, Lab) {
    lab_common::up_with("l", tag, prepare)
}

fn ready() -> bool {
    lab_common::have(&["wireguard-go", "nft", "grpcurl"])
}

fn hub_revision(lab: &Lab) -> u64 {
    let v: serde_json::Value = serde_json::from_str(
        &lab.grpcurl("raven.v1.InspectService/GetTopology")
            .expect("grpcurl"),
    )
    .expect("json");
    v["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Whether every agent is connected and has applied what it acknowledged
/// without error, and some agent holds the hub's `revision` (an agent whose
/// view did not change in a revision is not sent it); `Err` carries what the
/// hub showed.
fn applied(lab: &Lab, revision: u64) -> Result<(), serde_json::Value> {
    let num = |v: &serde_json::Value| v.as_str().and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
    // A hub just restarted answers once it listens: until then, not yet.
    let a = try_agents(lab).unwrap_or_else(|e| serde_json::json!({ "error": e }));
    let list = a["agents"].as_array().cloned().unwrap_or_default();
    let done = list.len() == NODES.len()
        && list.iter().all(|x| {
            x["connected"] == true
                && x["appliedSuccess"] == true
                && num(&x["appliedRevision"]) == num(&x["ackedRevision"])
        })
        && list.iter().any(|x| num(&x["appliedRevision"]) == revision);
    if done { Ok(()) } else { Err(a) }
}

/// Waits until every agent applied `revision()` (see [`applied`]), asked
/// again at each look: that revision and how long it took.
fn wait_applied(lab: &Lab, revision: impl Fn() -> u64) -> (u64, Duration) {
    let t = Instant::now();
    loop {
        let revision = revision();
        let Err(a) = applied(lab, revision) else {
            return (revision, t.elapsed());
        };
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agents did not all apply revision {revision}: {a:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every agent applied the hub's `revision`.
fn all_applied(lab: &Lab, revision: u64) -> Duration {
    wait_applied(lab, || revision).1
}

/// Waits until every agent applied the hub's revision as it is at each look
/// (a candidate's late Report may publish one more while the agents catch
/// up, and the agents then skip the revision read first).
fn all_applied_current(lab: &Lab) -> (u64, Duration) {
    wait_applied(lab, || hub_revision(lab))
}

#[test]
fn every_node_and_pod_reaches_every_other_and_grpcurl_shows_every_agents_applied_revision() {
    if !ready() {
        return;
    }
    let (_g, lab) = up("m");
    let matrix = lab.matrix();
    assert!(matrix.iter().all(|m| m.2), "{}", Lab::render(&matrix));
    let (rev, t) = all_applied_current(&lab);
    eprintln!(
        "grpcurl: all {} agents applied revision {rev} ({t:?} after the matrix)",
        NODES.len()
    );
}

#[test]
fn hub_killed_traffic_keeps_flowing_and_a_restarted_hub_resends_nothing() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("h");
    let rev = settle(&lab);
    lab_common::kill_hub_and_check_the_matrix(&mut lab, Duration::from_secs(3));
    let before: usize = NODES
        .iter()
        .map(|n| persisted_with_content(&lab, n.short))
        .sum();
    lab.start_hub().expect("hub restarts");
    let t = all_applied(&lab, rev);
    eprintln!("hub restart: all agents back on revision {rev} after {t:?}");
    let after: usize = NODES
        .iter()
        .map(|n| persisted_with_content(&lab, n.short))
        .sum();
    assert_eq!(
        before, after,
        "a restarted hub with nothing changed sends no resource again"
    );
    assert_eq!(hub_revision(&lab), rev, "the revision survives the restart");
}

/// How many updates that carried resources an agent has persisted.
fn persisted_with_content(lab: &Lab, short: &str) -> usize {
    let log = std::fs::read_to_string(lab.path(&format!("edge-{short}.log"))).unwrap_or_default();
    log.lines()
        .filter(|l| {
            l.contains("update persisted")
                && !l.contains("put\u{1b}[0m\u{1b}[2m=\u{1b}[0m0 ")
                && !l.contains("put=0 ")
        })
        .count()
}

#[test]
fn every_agent_restarted_while_the_hub_is_down_restores_traffic_from_its_cache() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("a");
    lab.kill_hub();
    for n in &NODES {
        lab.stop_agent(n.short);
    }
    // Even a "reboot" of a gateway and a member: every raven link, route and rule gone.
    for short in ["h1", "q2"] {
        let _ = lab.sh(short, &["ip", "link", "del", "raven0"]);
        for prio in ["9027", "9028"] {
            let _ = lab.sh(short, &["ip", "rule", "del", "priority", prio]);
            let _ = lab.sh(short, &["ip", "-6", "rule", "del", "priority", prio]);
        }
    }
    let broken = lab.matrix();
    assert!(
        broken.iter().any(|m| !m.2),
        "the reboot should have cut something"
    );
    for n in &NODES {
        lab.start_agent(n.short).expect("agent");
    }
    converge(&lab, "every agent restarted, hub down");
}

fn node(short: &str) -> &'static LabNode {
    NODES
        .iter()
        .find(|n| n.short == short)
        .unwrap_or_else(|| panic!("no lab node {short}"))
}

/// Pings pod to pod for each of `pairs` every 100 ms
/// until `done`; returns (sent, lost, time of the first reply).
fn pings_until(
    lab: &Lab,
    pairs: &[(&str, &str)],
    t0: Instant,
    mut done: impl FnMut() -> bool,
    timeout: Duration,
) -> (usize, usize, Option<Duration>) {
    let (mut sent, mut lost, mut first) = (0, 0, None);
    loop {
        for (a, b) in pairs {
            sent += 1;
            if lab.ping(a, node(a).pod, node(b).pod) {
                first.get_or_insert_with(|| t0.elapsed());
            } else {
                lost += 1;
            }
        }
        if done() {
            return (sent, lost, first);
        }
        assert!(t0.elapsed() < timeout, "not done within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_gateway_restarted_on_a_corrupt_cache_keeps_traffic_flowing_until_the_hubs_snapshot() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("k");
    settle(&lab);
    // Through hangzhou's gateway h1: its members' pods and its own.
    let through_h1 = [("h2", "q2"), ("h1", "q1"), ("c2", "h2")];

    // 1. Hub up: h1's store lost acknowledged writes (a torn sled log).
    lab.tear_cache("h1").expect("tear h1's cache");
    let t0 = Instant::now();
    lab.start_agent("h1").expect("agent");
    let (sent, lost, first) = pings_until(
        &lab,
        &through_h1,
        t0,
        || lab.readyz("h1").0 == 200,
        Duration::from_secs(30),
    );
    let applied = t0.elapsed();
    let log = std::fs::read_to_string(lab.path("edge-h1.log")).unwrap_or_default();
    assert!(log.contains("moved aside"), "{log}");
    assert!(log.contains("holding the kernel state"), "{log}");
    assert!(log.contains("complete snapshot persisted"), "{log}");
    eprintln!(
        "cold start of gateway h1 after a corrupt cache, hub up: traffic flowing at +{:?} (first pod-to-pod reply), {lost} of {sent} pings lost; topology applied (readyz 200) at +{applied:?}",
        first.unwrap_or_default()
    );
    assert_eq!(lost, 0, "traffic through h1 must not stop");
    // After the snapshot: reconciling normally (a new agent starts its
    // NAT-to-NAT paths relayed and moves them direct again).
    let t1 = Instant::now();
    let (sent, lost, _) = pings_until(
        &lab,
        &through_h1,
        t1,
        || t1.elapsed() > Duration::from_secs(3),
        Duration::from_secs(30),
    );
    eprintln!(
        "gateway h1, the 3 s after it applied the hub's snapshot: {lost} of {sent} pings lost"
    );
    let full = converge(&lab, "h1 back after a corrupt cache");
    eprintln!(
        "cold start of gateway h1 after a corrupt cache, hub up: full matrix at +{:?}",
        applied + full
    );

    // 2. Hub down: q1's store is rolled back too; it holds what it has.
    settle(&lab);
    lab.tear_cache("q1").expect("tear q1's cache");
    lab.kill_hub();
    let t0 = Instant::now();
    lab.start_agent("q1").expect("agent");
    let through_q1 = [("q2", "h2"), ("q1", "h1"), ("c2", "q2")];
    let (sent, lost, first) = pings_until(
        &lab,
        &through_q1,
        t0,
        || t0.elapsed() > Duration::from_secs(5),
        Duration::from_secs(30),
    );
    let r = lab.readyz("q1");
    assert_eq!(r.0, 503, "{r:?}");
    assert!(r.1.contains("holding"), "{r:?}");
    eprintln!(
        "cold start of gateway q1 after a corrupt cache, hub down: traffic flowing at +{:?}, {lost} of {sent} pings lost over 5 s of holding",
        first.unwrap_or_default()
    );
    assert_eq!(
        lost, 0,
        "traffic through q1 must not stop while the hub is down"
    );
    let t1 = Instant::now();
    lab.start_hub().expect("hub");
    wait_for(
        "q1 applies the hub's snapshot",
        Duration::from_secs(60),
        || lab.readyz("q1").0 == 200,
    );
    eprintln!(
        "cold start of gateway q1 after a corrupt cache, hub down: topology applied {:?} after the hub came back (+{:?} from the agent's start)",
        t1.elapsed(),
        t0.elapsed()
    );
    converge(&lab, "q1 back after a corrupt cache and a hub outage");
}

#[test]
fn the_largest_df_ping_pod_to_pod_across_domains_is_the_route_mtu() {
    if !ready() {
        return;
    }
    let (_g, lab) = up("u");
    settle(&lab);
    // (from, to): member to member through both gateways, gateway to
    // member, member to the cloud.
    for (a, b) in [("h2", "q2"), ("q1", "h2"), ("q2", "c2")] {
        let (from, to) = (node(a), node(b));
        let dst = format!("{}.0/24", to.pod.rsplit_once('.').map_or("", |x| x.0));
        let mtu = lab
            .route_mtu(a, &dst)
            .unwrap_or_else(|| panic!("{a}: no route with an MTU to {dst}"));
        // The smallest hop: the gateways' tunnel (underlay 1500 − 80).
        assert_eq!(mtu, 1420, "{a} -> {dst}");
        // ICMP echo: 20 bytes of IPv4 header and 8 of ICMP.
        let fits = mtu - 28;
        // Find the largest payload that passes (a failed ping costs up
        // to a second; the search needs a dozen).
        let (mut lo, mut hi) = (1000u32, 1500u32);
        assert!(
            lab.ping_df(a, from.pod, to.pod, lo),
            "{a} -> {b}: {lo} bytes"
        );
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if lab.ping_df(a, from.pod, to.pod, mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        eprintln!(
            "largest DF ping pod {a} -> pod {b} across domains: payload {lo} bytes (packet {}), route MTU {mtu}",
            lo + 28
        );
        assert_eq!(lo, fits, "{a} -> {b}");
        assert!(
            lab.ping_df(a, from.pod, to.pod, fits),
            "{a} -> {b}: {fits} bytes"
        );
        assert!(
            !lab.ping_df(a, from.pod, to.pod, fits + 1),
            "{a} -> {b}: one byte more must not pass with DF"
        );
    }
}

#[test]
fn gateway_failover_follows_the_hubs_election() {
    if !ready() {
        return;
    }
    let (_g, lab) = up("f");
    // hz-2 becomes a tunnel candidate, then the active gateway hz-1 goes NotReady.
    lab.edit_manifest(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        "      port: 4500\n      type: tunnel\n    - nodeName: izbp15inok0kbfkg3in52sz\n      underNAT: true\n      port: 4500\n      type: tunnel\n---",
    )
    .expect("edit");
    std::thread::sleep(Duration::from_millis(1200));
    settle(&lab);
    // Traffic into hangzhou from the cloud and from qingdao, across the move.
    let pings = [
        ("c2", "h1", ping_pods(&lab, "c2", "h1", 300)),
        ("q1", "h1", ping_pods(&lab, "q1", "h1", 300)),
    ];
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    lab.edit_manifest("nodes.yaml", "      status: \"True\"\n  addresses:\n    - type: InternalIP\n      address: 172.16.2.103", "      status: \"False\"\n  addresses:\n    - type: InternalIP\n      address: 172.16.2.103")
        .or_else(|_| {
            let text = std::fs::read_to_string(lab.path("manifests/nodes.yaml")).unwrap_or_default();
            let i = text.find("name: izbp15inok0kbfkg3in52rz").unwrap_or(0);
            let j = i + text[i..].find("status: \"True\"").unwrap_or(0);
            let mut t2 = text.clone();
            t2.replace_range(j..j + "status: \"True\"".len(), "status: \"False\"");
            std::fs::write(lab.path("manifests/nodes.yaml"), t2).map_err(raven_tests::lab::LabError::from)
        })
        .expect("edit");
    let topo = || {
        lab.grpcurl("raven.v1.InspectService/GetTopology")
            .unwrap_or_default()
    };
    while !topo().contains("\"activeTunnel\": {\n          \"node\": \"izbp15inok0kbfkg3in52sz\"") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "hub did not elect hz-2:\n{}",
            topo()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let d = converge(&lab, "failover to hz-2");
    eprintln!(
        "gateway failover (hub up): elected and converged after {:?}",
        t.elapsed().max(d)
    );
    // hz-2 now runs the tunnel.
    assert!(lab.sh("h2", &["wg", "show", &lab.tunnel_dev("h2")]).is_ok());
    for (from, to, ping) in pings {
        let (sent, lost) = ping.lost();
        eprintln!(
            "gateway failover (hub up): {from} pod -> {to} pod lost {lost} of {sent} packets at 20 pps across the move"
        );
    }
}

#[test]
fn a_node_added_to_a_domain_while_running_is_reached_from_every_domain() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("n");
    let t = Instant::now();
    lab.add_node(raven_tests::lab::LabNode {
        short: "h3",
        name: "izbp15inok0kbfkg3in52tz",
        domain: "hangzhou",
        ip: "172.16.2.105",
        pod: "10.244.6.1",
    })
    .expect("node added");
    converge(&lab, "new hangzhou node");
    eprintln!(
        "node added to a running cluster: full matrix (now {} nodes) after {:?}",
        lab.nodes.len(),
        t.elapsed()
    );
    assert!(
        lab.ping("q2", "10.244.4.1", "10.244.6.1"),
        "qingdao pod reaches the new hangzhou pod"
    );
}

#[test]
fn a_new_domain_added_while_running_is_reached_from_every_domain() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("d");
    let old: Vec<&str> = lab.nodes.iter().map(|n| n.short).collect();
    let t = Instant::now();
    lab.add_domain(
        shenzhen("172.16.3.1"),
        vec![
            LabNode {
                short: "s1",
                name: "izwv5ahl9m2kxq0d7f3t1az",
                domain: "shenzhen",
                ip: "172.16.3.10",
                pod: "10.244.7.1",
            },
            LabNode {
                short: "s2",
                name: "izwv5ahl9m2kxq0d7f3t1bz",
                domain: "shenzhen",
                ip: "172.16.3.11",
                pod: "10.244.8.1",
            },
        ],
    )
    .expect("domain added");
    // While the hub recompiles and every gateway learns the new peer, no
    // pair of the running cluster breaks.
    let mut checked = 0;
    while !(lab.ping("s2", "10.244.8.1", "10.244.2.1")
        && lab.ping("q2", "10.244.4.1", "10.244.8.1"))
    {
        let m = lab.matrix_of(&old);
        assert!(
            m.iter().all(|x| x.2),
            "an existing pair broke while a domain was added\n{}\n{}",
            Lab::render(&m),
            lab.logs()
        );
        checked += 1;
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the new domain is not reached after 60 s\n{}",
            lab.logs()
        );
    }
    converge(&lab, "new shenzhen domain");
    eprintln!(
        "domain added to a running cluster: full matrix ({} nodes, {} domains) after {:?} (existing pairs intact in {checked} checks meanwhile)",
        lab.nodes.len(),
        lab.domains.len(),
        t.elapsed()
    );
    // The new gateway's tunnel reaches the cloud through its own NAT.
    let endpoints = lab
        .sh("c1", &["wg", "show", &lab.tunnel_dev("c1"), "endpoints"])
        .expect("wg show");
    assert!(
        endpoints.contains("203.0.113.40:"),
        "the cloud gateway has no peer behind the shenzhen router:\n{endpoints}"
    );
}

#[test]
fn a_powered_off_node_drops_off_its_lan_until_powered_on() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("p");
    // hz-1 is hangzhou's gateway: it runs raven-edge and wireguard-go.
    let mut running = lab.node_processes("h1");
    running.sort();
    assert_eq!(running, ["raven-edge", "wireguard-go"]);
    lab.power_off("h1").expect("power off");
    assert!(
        lab.node_processes("h1").is_empty(),
        "still running after power off: {:?}",
        lab.node_processes("h1")
    );
    assert!(
        !lab.ping("h2", "172.16.2.104", "172.16.2.103"),
        "answers on its LAN"
    );
    assert!(
        !lab.ping("h2", "10.244.2.1", "10.244.1.1"),
        "its pod answers"
    );
    assert!(
        !lab.ping("h2", "10.244.2.1", "10.244.4.1"),
        "it still forwards for its domain"
    );
    let t = Instant::now();
    lab.power_on("h1").expect("power on");
    while !(lab.ping("h2", "172.16.2.104", "172.16.2.103")
        && lab.ping("h2", "10.244.2.1", "10.244.1.1"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "powered on, hz-1 is not back on its LAN"
        );
    }
    eprintln!("power on: back on its LAN after {:?}", t.elapsed());
    lab.start_agent("h1").expect("agent");
    converge(&lab, "hz-1 powered on, agent started");
}

/// How `from`'s tunnel reaches `to`, as `from` last reported it to the hub:
/// `Some(true)` through a relay, `Some(false)` directly.
fn relayed(lab: &Lab, from: &str, to: &str) -> Option<bool> {
    let a = agents(lab);
    let agent = a["agents"]
        .as_array()?
        .iter()
        .find(|x| x["nodeName"] == name_of(from))?
        .clone();
    agent["peers"]
        .as_array()?
        .iter()
        .find(|p| p["peerNode"] == name_of(to))
        .map(|p| p["relayed"] == true)
}

/// Waits until hangzhou and qingdao report a direct path to each other.
fn direct_path(lab: &Lab) -> Duration {
    wait_for(
        "hangzhou and qingdao on a direct path",
        Duration::from_secs(60),
        || relayed(lab, "h1", "q1") == Some(false) && relayed(lab, "q1", "h1") == Some(false),
    )
}

/// Waits until the topology stops moving on its own (the public gateway's
/// observations of the NATed ones have reached the hub, and the direct
/// path is up) and every agent applied it; returns the revision.
///
/// The topology may still move after the direct path is up (the other
/// gateways' observations arrive on their own schedule), so the revision is
/// read again on every look; it is settled once every agent has applied the
/// hub's revision and the hub stayed on it for a second.
fn settle(lab: &Lab) -> u64 {
    direct_path(lab);
    let t = Instant::now();
    let mut settled: Option<(u64, Instant)> = None;
    loop {
        let rev = hub_revision(lab);
        match (applied(lab, rev), settled) {
            (Ok(()), Some((r, since))) if r == rev => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return rev;
                }
            }
            (Ok(()), _) => settled = Some((rev, Instant::now())),
            (Err(a), _) => {
                settled = None;
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "the topology did not settle (hub revision {rev}): {a:#}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn natted_gateways_go_direct_once_the_hole_punched_path_handshakes() {
    if !ready() {
        return;
    }
    let (_g, lab) = up("d");
    let t = direct_path(&lab);
    eprintln!("direct path hangzhou <-> qingdao {t:?} after the first full matrix");
    // The two NAT routers talk to each other: each has a flow to the
    // other's public address that got answers, on the direct-path devices'
    // port (the tunnel's + 1).
    for (router, other) in [("hzrt", "203.0.113.30"), ("qdrt", "203.0.113.20")] {
        let ct = lab
            .sh(router, &["conntrack", "-L", "-p", "udp", "--dst", other])
            .unwrap_or_default();
        assert!(
            ct.lines()
                .any(|l| l.contains("dport=4501") && !l.contains("UNREPLIED")),
            "{router}: no answered flow to {other}: {ct}"
        );
    }
    converge(&lab, "on the direct path");
}

#[test]
fn behind_a_symmetric_nat_the_relay_keeps_carrying_natted_gateways() {
    if !ready() {
        return;
    }
    let (_g, lab) = up_with("s", |lab| {
        lab.make_nat_symmetric("qingdao").expect("symmetric NAT");
    });
    lab_common::until_the_direct_path_behind_a_symmetric_nat_was_tried(&lab);
    assert_eq!(relayed(&lab, "h1", "q1"), Some(true), "{:#}", agents(&lab));
    assert_eq!(relayed(&lab, "q1", "h1"), Some(true), "{:#}", agents(&lab));
    converge(&lab, "through the relay behind a symmetric NAT");
}

/// Every pair among `shorts` answers; a pair that fails is tried once more
/// (a lost ping is not a broken path).
fn all_reach(lab: &Lab, shorts: &[&str]) -> Result<(), String> {
    let m = lab.matrix_of(shorts);
    if m.iter().all(|x| x.2) {
        return Ok(());
    }
    let again = lab.matrix_of(shorts);
    let broken: Vec<_> = m
        .iter()
        .zip(&again)
        .filter(|(a, b)| !a.2 && !b.2)
        .map(|(a, _)| format!("{} -> {}", a.0, a.1))
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join(", "))
    }
}

#[test]
fn with_the_hub_down_a_dead_gateway_fails_over_locally_and_the_returning_hub_keeps_it() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("l");
    add_hz2_candidate(&lab);

    lab.kill_hub();
    std::thread::sleep(Duration::from_secs(4)); // > 3 heartbeats: agents know
    // Into hangzhou's surviving node from the cloud and from qingdao.
    let pings = [
        ("c2", ping_pods(&lab, "c2", "h2", 300)),
        ("q2", ping_pods(&lab, "q2", "h2", 300)),
    ];
    std::thread::sleep(Duration::from_secs(1));
    lab.power_off("h1").expect("power off hz-1");
    let alive = ["c1", "c2", "h2", "q1", "q2"];
    let (worst, pair) = recovery(&lab, &alive, Duration::from_secs(90));
    eprintln!(
        "local failover (hub down): hz-1 powered off, every pair among the others reached again within {worst:?} (the last: {pair})"
    );
    for (from, ping) in pings {
        let (sent, lost) = ping.lost();
        eprintln!(
            "local failover (hub down): {from} pod -> h2 pod lost {lost} of {sent} packets at 20 pps ({:.1} s of traffic)",
            lost as f64 / 20.0
        );
    }

    // The hub comes back still believing in hz-1 (its manifests say Ready);
    // it hears hz-2's takeover and keeps it. Traffic never flaps back.
    lab.start_hub().expect("hub restarts");
    let back = Instant::now();
    let mut adopted = None;
    // Sample until 10 s after the adoption (agents redial with backoff).
    while back.elapsed() < Duration::from_secs(60)
        && adopted.is_none_or(|at: Duration| back.elapsed() < at + Duration::from_secs(10))
    {
        if let Err(broken) = all_reach(&lab, &alive) {
            panic!(
                "traffic flapped {:?} after the hub returned: {broken}\n{}",
                back.elapsed(),
                lab.logs()
            );
        }
        if adopted.is_none() && active_tunnel(&lab, "gw-hangzhou").as_deref() == Some(name_of("h2"))
        {
            adopted = Some(back.elapsed());
        }
    }
    let adopted = adopted.unwrap_or_else(|| {
        panic!(
            "the hub did not adopt hz-2: {:?}\n{}",
            active_tunnel(&lab, "gw-hangzhou"),
            lab.logs()
        )
    });
    eprintln!("returning hub adopted hz-2 after {adopted:?}; no flap before or in the 10 s after");
    assert_eq!(
        active_tunnel(&lab, "gw-hangzhou").as_deref(),
        Some(name_of("h2")),
        "the election keeps hz-2"
    );
}

/// From now until every pair among `shorts` answers (rounds of parallel
/// pings): the time the slowest pair took to answer again, and which.
fn recovery(lab: &Lab, shorts: &[&str], timeout: Duration) -> (Duration, String) {
    let t = Instant::now();
    let mut back: std::collections::BTreeMap<(String, String), Duration> = Default::default();
    loop {
        let round = lab.matrix_of(shorts);
        let at = t.elapsed();
        for (from, to, ok) in &round {
            if *ok {
                back.entry((from.clone(), to.clone())).or_insert(at);
            }
        }
        if back.len() == round.len() {
            break;
        }
        assert!(
            at < timeout,
            "not every pair answers within {timeout:?}\n{}\n{}",
            Lab::render(&round),
            lab.logs()
        );
    }
    back.into_iter()
        .max_by_key(|(_, d)| *d)
        .map(|((f, to), d)| (d, format!("{f} -> {to}")))
        .unwrap_or_default()
}

/// Makes hz-2 gw-hangzhou's second tunnel candidate and waits until every
/// agent holds the topology that says so (with hz-2's key).
fn add_hz2_candidate(lab: &Lab) {
    lab_common::add_hz2_candidate_manifest(lab);
    wait_for(
        "hz-2's key in the topology",
        Duration::from_secs(30),
        || peer_key(lab, "h2").is_some(),
    );
    all_applied_current(lab);
}

/// Sets the Ready condition of a lab node in the manifests.
fn set_ready(lab: &Lab, short: &str, ready: bool) {
    let ip = NODES
        .iter()
        .find(|n| n.short == short)
        .map(|n| n.ip)
        .unwrap_or_else(|| panic!("no lab node {short}"));
    let block = |s: &str| {
        format!(
            "      status: \"{s}\"\n  addresses:\n    - type: InternalIP\n      address: {ip}\n"
        )
    };
    let (from, to) = if ready {
        (block("False"), block("True"))
    } else {
        (block("True"), block("False"))
    };
    lab.edit_manifest("nodes.yaml", &from, &to).expect("edit");
}

/// A node's WireGuard public key as the hub distributes it (base64).
fn peer_key(lab: &Lab, short: &str) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&lab.grpcurl("raven.v1.InspectService/GetTopology").ok()?).ok()?;
    v["resources"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == format!("peer/{}", name_of(short)))?["peer"]["wireguardPublicKey"]
        .as_str()
        .map(str::to_owned)
}

/// `wg show DEV what` on a node's tunnel device, as key → value lines.
fn wg_show(lab: &Lab, short: &str, what: &str) -> std::collections::BTreeMap<String, String> {
    lab.sh(short, &["wg", "show", &lab.tunnel_dev(short), what])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Issue 10, defect 1. A standby that powers on with a stale cache naming it
/// active brings its tunnel up with peers until the hub demotes it: the cloud
/// gateway then holds a handshake with it fresher than the active gateway's.
/// Once the hub is gone, that handshake must not move hangzhou's prefixes to
/// the standby while hz-1 keeps answering.
#[test]
fn a_briefly_up_standby_never_pulls_traffic_from_a_live_gateway_when_the_hub_goes() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up("b");
    add_hz2_candidate(&lab);
    let elected = |lab: &Lab, short: &str| {
        active_tunnel(lab, "gw-hangzhou").as_deref() == Some(name_of(short))
    };
    // hz-2 becomes the gateway (hz-1 NotReady) and its cache says so; then
    // it loses power.
    set_ready(&lab, "h1", false);
    wait_for("hz-2 elected", Duration::from_secs(20), || {
        elected(&lab, "h2")
    });
    wait_for("hz-2 runs the tunnel", Duration::from_secs(20), || {
        !wg_show(&lab, "h2", "allowed-ips").is_empty()
    });
    lab.power_off("h2").expect("power off hz-2");
    // hz-1 is the gateway again (hz-2 NotReady), and hz-2 Ready again while
    // it is off: the sticky election keeps hz-1.
    set_ready(&lab, "h2", false);
    set_ready(&lab, "h1", true);
    wait_for("hz-1 elected again", Duration::from_secs(20), || {
        elected(&lab, "h1")
    });
    set_ready(&lab, "h2", true);
    let alive = ["c1", "c2", "h1", "q1", "q2"];
    wait_for("everyone but hz-2 reached", Duration::from_secs(60), || {
        all_reach(&lab, &alive).is_ok()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(elected(&lab, "h1"), "the election kept hz-1");

    // hz-2 powers on and starts from its stale cache.
    let (k1, k2) = (
        peer_key(&lab, "h1").expect("hz-1 key"),
        peer_key(&lab, "h2").expect("hz-2 key"),
    );
    let handshake = |lab: &Lab, k: &str| {
        wg_show(lab, "c1", "latest-handshakes")
            .get(k)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
    };
    lab.power_on("h2").expect("power on");
    lab.start_agent("h2").expect("agent");
    wait_for(
        "the cloud gateway holds a handshake with hz-2 fresher than hz-1's",
        Duration::from_secs(30),
        || handshake(&lab, &k2) > handshake(&lab, &k1),
    );
    wait_for("hz-2 demoted (no peers)", Duration::from_secs(30), || {
        wg_show(&lab, "h2", "allowed-ips").is_empty()
    });
    converge(&lab, "hz-2 back as a standby");

    // The hub goes. For the next 30 s every node and pod keeps reaching every
    // other, and the cloud gateway keeps hangzhou's prefixes on hz-1.
    lab.kill_hub();
    let t = Instant::now();
    let mut rounds = 0;
    while t.elapsed() < Duration::from_secs(30) {
        if let Err(broken) = all_reach(&lab, &["c1", "h1", "h2", "q1"]) {
            panic!(
                "{:?} after the hub went: {broken}\nc1's peers: {:?}\n{}",
                t.elapsed(),
                wg_show(&lab, "c1", "allowed-ips"),
                lab.logs()
            );
        }
        rounds += 1;
    }
    let ips = wg_show(&lab, "c1", "allowed-ips");
    assert!(
        ips.get(&k1).is_some_and(|v| v.contains("10.244.1.0/24")),
        "hz-1 keeps hangzhou's prefixes: {ips:?}"
    );
    assert!(
        ips.get(&k2).is_none_or(|v| v == "(none)"),
        "hz-2 carries nothing: {ips:?}"
    );
    eprintln!(
        "briefly-up standby: no move and no loss over 30 s with the hub down ({rounds} full matrices among c1, h1, h2, q1)"
    );
}

/// A ping at 20 per second from `from`'s pod to `to`'s pod, running in the
/// background for `count` packets; [`Pinger::lost`] waits for it.
fn ping_pods(lab: &Lab, from: &str, to: &str, count: u32) -> Pinger {
    Pinger::start(lab, from, pod(from), pod(to), count).expect("ping")
}

/// Whether both NATed gateways' direct devices hold each other as peers.
fn direct_devices_paired(lab: &Lab) -> bool {
    ["h1", "q1"].iter().all(|s| {
        let dev = direct_dev(&lab.tunnel_dev(s));
        lab.sh(s, &["wg", "show", &dev, "peers"])
            .is_ok_and(|out| out.lines().count() == 2)
    })
}

/// The direct-path device next to tunnel device `dev` (as `raven_edge::tunnel::direct_dev` names it).
fn direct_dev(dev: &str) -> String {
    format!("{dev}d")
}

/// Opens the cut direct path between `first` and `frozen` (the two NATed
/// gateways) with `frozen`'s agent stopped, so `first` moves to it alone;
/// thaws `frozen` 3 s later. A 20 pps ping from `first`'s pod to `frozen`'s
/// runs throughout and must lose nothing.
fn move_with_one_side_frozen(lab: &Lab, first: &str, frozen: &str) {
    let ping = ping_pods(lab, first, frozen, 200);
    std::thread::sleep(Duration::from_secs(1));
    lab.freeze_agent(frozen, true);
    lab.cut_between_routers("hangzhou", "qingdao", false)
        .expect("restore");
    let moved = wait_for(
        "the first side on the direct path",
        Duration::from_secs(20),
        || relayed(lab, first, frozen) == Some(false),
    );
    std::thread::sleep(Duration::from_secs(3));
    lab.freeze_agent(frozen, false);
    direct_path(lab);
    let (sent, lost) = ping.lost();
    eprintln!(
        "relayed -> direct, {first} first ({moved:?} after the path opened), {frozen} 3 s later: {lost} of {sent} packets lost at 20 pps"
    );
    assert_eq!(lost, 0, "packets lost while the sides moved apart");
}

/// Issue 10, defect 3: moving two NATed gateways between the relay and their
/// direct path loses nothing, whichever side moves first and however long the
/// other takes. The direct path is cut from the start; once it is restored one
/// side's agent is frozen while the other moves, for 3 s, at 20 pps.
#[test]
fn a_move_between_relay_and_direct_path_loses_no_packet_whichever_side_moves_first() {
    if !ready() {
        return;
    }
    let (_g, lab) = up_with("p", |lab| {
        lab.cut_between_routers("hangzhou", "qingdao", true)
            .expect("cut");
    });
    wait_for(
        "direct devices paired (both mappings observed by the relay)",
        Duration::from_secs(30),
        || direct_devices_paired(&lab),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(relayed(&lab, "h1", "q1"), Some(true), "{:#}", agents(&lab));

    // hz-1 moves first; qd-1 stays on the relay for 3 s more.
    move_with_one_side_frozen(&lab, "h1", "q1");

    // Back to the relay: the path is cut (packets on it are lost until the
    // silence shows, ~3 s: a figure, not a move).
    let ping = ping_pods(&lab, "q1", "h1", 200);
    std::thread::sleep(Duration::from_secs(1));
    lab.cut_between_routers("hangzhou", "qingdao", true)
        .expect("cut");
    let back = wait_for("both back on the relay", Duration::from_secs(20), || {
        relayed(&lab, "h1", "q1") == Some(true) && relayed(&lab, "q1", "h1") == Some(true)
    });
    let (sent, lost) = ping.lost();
    eprintln!(
        "direct path cut: both on the relay after {back:?}; {lost} of {sent} packets lost at 20 pps meanwhile"
    );

    // The other side first: qd-1 moves, hz-1 frozen for 3 s.
    move_with_one_side_frozen(&lab, "q1", "h1");
}

/// A steady ping (every 100 ms) from a node's address to another, in the
/// background; [`SteadyPing::stop`] says how many were sent and answered.
struct SteadyPing(std::process::Child);

/// Interval of [`SteadyPing`].
const PING_EVERY: Duration = Duration::from_millis(100);

impl SteadyPing {
    fn start(lab: &Lab, from: &str, src: &str, to: &str) -> Self {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(from),
                "ping",
                "-n",
                "-q",
                "-i",
                "0.1",
            ])
            .args(["-W", "1", "-I", src, to])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping starts");
        Self(child)
    }

    /// Interrupts it and returns (sent, answered).
    fn stop(self) -> (u64, u64) {
        let pid = self.0.id().to_string();
        // `ip netns exec` execs ping, so this is ping's own PID.
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let out = self.0.wait_with_output().expect("ping output");
        ping_summary(&out.stdout)
    }
}

/// Issue 10, defect 2: with the hub reachable, a powered-off active gateway
/// of a NATed domain is replaced by the hub (its stream is gone and its
/// domain's probes say dead) — with the default `--heartbeat`/`--resync`.
/// Prints the time until the hub elects the replacement, until traffic
/// across domains flows again, and what a steady ping lost meanwhile; then
/// the old gateway comes back and the election stays (sticky).
#[test]
fn with_the_hub_up_a_powered_off_gateway_is_replaced_by_the_hub_within_seconds() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("g", |lab| lab.default_timers = true);
    add_hz2_candidate(&lab);
    converge(&lab, "hz-2 a standby candidate");
    assert_eq!(
        active_tunnel(&lab, "gw-hangzhou").as_deref(),
        Some(name_of("h1"))
    );

    // qingdao's member pings hangzhou's member, pod to pod: that path runs
    // through both domains' gateways.
    let ping = SteadyPing::start(&lab, "q2", "10.244.4.1", "10.244.2.1");
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let elected = lab_common::power_off_hz1_until_the_hub_elects_hz2(&mut lab);
    let alive = ["c1", "c2", "h2", "q1", "q2"];
    while let Err(broken) = all_reach(&lab, &alive) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "hz-2 elected after {elected:?} but traffic does not flow: {broken}\n{}",
            lab.logs()
        );
    }
    let flowing = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (sent, answered) = ping.stop();
    let lost = sent.saturating_sub(answered);
    eprintln!(
        "gateway failover (hub up, default timers): hz-1 powered off; hub elected hz-2 after {elected:?}, every other node and pod reached again after {flowing:?}; steady ping q2 pod -> h2 pod lost {lost} of {sent} ({:?} of traffic)",
        PING_EVERY * u32::try_from(lost).unwrap_or(u32::MAX)
    );
    assert!(answered > 0, "the steady ping never got an answer");

    // hz-1 comes back: the election keeps hz-2.
    lab.power_on("h1").expect("power on");
    lab.start_agent("h1").expect("agent");
    wait_for("hz-1's agent back", Duration::from_secs(30), || {
        agents(&lab)["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["nodeName"] == name_of("h1") && a["connected"] == true)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        active_tunnel(&lab, "gw-hangzhou").as_deref(),
        Some(name_of("h2")),
        "the returning hz-1 does not take the tunnel back"
    );
    converge(&lab, "hz-1 back, hz-2 keeps the tunnel");
}

/// Issue 10, defect 6: after a hub outage long enough for any backoff to
/// grow, every agent is connected and has applied the hub's state again
/// within seconds of the hub serving (default `--heartbeat`/`--resync`).
/// Prints the time from the restart until the hub serves and until every
/// agent is back.
#[test]
fn after_a_long_hub_outage_every_agent_is_back_within_seconds_of_the_hub_serving() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("r", |lab| lab.default_timers = true);
    let rev = settle(&lab);
    lab.kill_hub();
    std::thread::sleep(Duration::from_secs(40));
    lab.start_hub().expect("hub restarts");
    let serving = wait_for("the hub serving", Duration::from_secs(30), || {
        lab.grpcurl("grpc.health.v1.Health/Check")
            .is_ok_and(|s| s.contains("SERVING") && !s.contains("NOT_SERVING"))
    });
    let back = all_applied(&lab, rev);
    eprintln!(
        "hub restart after a 40 s outage (default timers): serving after {serving:?}, all {} agents connected and applied revision {rev} {back:?} after that",
        NODES.len()
    );
    assert!(
        back < Duration::from_secs(15),
        "agents took {back:?} to come back after the hub was serving"
    );
}

/// The layer-7 proxy in the lab: a fake kubelet (certificate from a kubelet
/// CA) on h1, h2 and on s1 of a new domain behind its own NAT whose node has
/// h1's InternalIP; a client speaking exactly what kube-apiserver's egress
/// selector sends on the cloud proxy server's CONNECT socket (c1, the cloud
/// gateway's proxy endpoint) reaches each by node name, TLS verified.
#[test]
fn l7_proxy_reaches_edge_kubelets_by_name_even_with_the_same_internal_ip_and_after_restarts() {
    use raven_tests::fake_kubelet::{self, KubeletCa, ProxyClient, body};
    if !ready() {
        return;
    }
    let (_guard, mut lab) = up("px");
    let s1 = LabNode {
        short: "s1",
        name: "izwv5ahl9m2kxq0d7f3t1az",
        domain: "shenzhen",
        // h1's InternalIP, in another domain.
        ip: "172.16.2.103",
        pod: "10.244.7.1",
    };
    // Hangzhou's LAN addresses (172.16.2.0/24), behind its own NAT.
    lab.add_domain(shenzhen("172.16.2.1"), vec![s1.clone()])
        .expect("domain added");
    let h1 = NODES[2].clone();
    let h2 = NODES[3].clone();
    assert_eq!(h1.ip, s1.ip);

    let ca = KubeletCa::new();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_fake-kubelet"));
    for n in [&h1, &h2, &s1] {
        let (cert, key) = ca.serving(n.name, n.ip.parse().expect("ip"));
        let cert_file = lab.dir.join(format!("kubelet-{}.pem", n.short));
        let key_file = lab.dir.join(format!("kubelet-{}-key.pem", n.short));
        std::fs::write(&cert_file, cert).expect("cert");
        std::fs::write(&key_file, key).expect("key");
        let args: Vec<String> = [
            "--node",
            n.name,
            "--listen",
            &format!("{}:10250", n.ip),
            "--cert",
            &cert_file.to_string_lossy(),
            "--key",
            &key_file.to_string_lossy(),
        ]
        .map(str::to_owned)
        .to_vec();
        lab.spawn_helper(n.short, &format!("kubelet-{}", n.short), exe, &args)
            .expect("fake kubelet");
    }

    let client = ProxyClient {
        socket: lab.proxy_socket("c1"),
        kubelet_port: 10250,
        tls: ca.client_config(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let reach = |lab: &Lab, node: &'static str, what: &str| {
        let t = Instant::now();
        loop {
            match rt.block_on(client.get(node, "/healthz")) {
                Ok(b) if b.contains(&format!("ok {node}")) => break,
                r => {
                    assert!(
                        t.elapsed() < Duration::from_secs(60),
                        "{what}: {node} unreachable through the proxy after 60 s: {r:?}\n{}",
                        lab.logs()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        eprintln!(
            "{what}: {node} answers through the proxy after {:?}",
            t.elapsed()
        );
    };
    for n in [&h1, &h2, &s1] {
        reach(&lab, n.name, "first start");
    }
    rt.block_on(async {
        // Same InternalIP, two kubelets, each reached by name.
        for n in [&h1, &s1] {
            let logs = client
                .get(n.name, "/containerLogs/default/web-0/nginx")
                .await
                .expect("logs");
            assert!(
                body(&logs).contains(&format!("log line 1 of default/web-0/nginx on {}", n.name)),
                "{logs}"
            );
        }
        // By that IP it is ambiguous, and said so.
        let err = client
            .connect(&format!("{}:10250", h1.ip))
            .await
            .expect_err("ambiguous");
        assert!(
            err.starts_with("HTTP/1.1 409 InternalIP 172.16.2.103 is ambiguous"),
            "{err}"
        );
        // Not an open relay.
        let err = client
            .connect(&format!("{}:22", h2.name))
            .await
            .expect_err("port 22");
        assert!(err.starts_with("HTTP/1.1 403 port 22"), "{err}");

        // Many concurrent streams on the tunnels.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..120usize {
            let node = [h1.name, h2.name, s1.name][i % 3];
            let n = 20_000 + i * 1000;
            let client = client.clone();
            tasks.spawn(async move {
                let a = client.get(node, &format!("/bytes/{n}")).await.expect("get");
                assert_eq!(body(&a).len(), n, "stream {i}");
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("stream");
        }

        // Half-close: the kubelet sees the end of the upload, its answer
        // comes back on the same stream.
        let s = client
            .start_request(s1.name, "POST", "/count")
            .await
            .expect("TLS");
        let answer = fake_kubelet::count_after_half_close(s, 2_000_000)
            .await
            .expect("answer");
        assert!(body(&answer).contains("counted 2000000 bytes"), "{answer}");

        // Streams nobody reads do not hold up the others on h1's tunnel.
        let stalled = client.stalled_downloads(h2.name, 6).await;
        client
            .assert_gets_are_not_held_up(h1.name, 10, 300_000)
            .await;
        drop(stalled);
    });

    // The proxy server's agent restarts: new requests work again soon.
    lab.stop_agent("c1");
    lab.start_agent("c1").expect("c1 agent");
    reach(&lab, h1.name, "cloud proxy server restarted");
    reach(&lab, s1.name, "cloud proxy server restarted");
    // An edge proxy's agent restarts.
    lab.stop_agent("h1");
    lab.start_agent("h1").expect("h1 agent");
    reach(&lab, h2.name, "edge proxy h1 restarted");
    // Without the hub the topology comes from the agents' caches.
    lab.kill_hub();
    lab.stop_agent("s1");
    lab.start_agent("s1").expect("s1 agent");
    reach(&lab, s1.name, "hub down, edge proxy s1 restarted");
}
