//! The user-manual lab (see `raven_tests::lab`) with IPsec between the
//! gateways: `raven-cfg` says `vpn-driver: ipsec`, every node runs a charon
//! of its own (strongSwan, kernel-libipsec: userspace ESP in UDP, as these
//! kernels have no ESP) beside its agent, and the agents (default `--vpn
//! auto`) follow raven-cfg. Real hub, real agents, NAT routers with
//! stateful firewalls; the NATed domains reach each other through the
//! cloud gateway (their relay) and, once the hole is punched, directly
//! through both NATs. Each scenario prints what it measured.
//!
//! Needs root, charon, swanctl, nft, grpcurl, curl and tcpdump; skipped otherwise unless
//! `RAVEN_REQUIRE_TOOLS=1`. Labs run one at a time.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use raven_tests::lab::{CHARON, Lab, NODES};

mod lab_common;

use lab_common::{
    active_tunnel, add_hz2_candidate_manifest as add_hz2_candidate, agents, converge, name_of, pod,
    wait_for,
};

fn ready() -> bool {
    lab_common::have(&["nft", "grpcurl", "swanctl", "curl", "tcpdump", CHARON])
}

/// A lab over IPsec, changed by `prepare` before anything runs, up and
/// converged.
fn up_with(tag: &str, prepare: impl FnOnce(&mut Lab)) -> (std::sync::MutexGuard<'static, ()>, Lab) {
    lab_common::up_with("i", tag, |lab| {
        lab.use_ipsec().expect("IPsec");
        prepare(lab);
    })
}

/// The SAs of a node's charon as `swanctl --list-sas` shows them: one
/// entry per IKE_SA (`name #unique-id state`) and per CHILD_SA
/// (`  name #unique-id state`), sorted.
fn sas(lab: &Lab, short: &str) -> BTreeSet<String> {
    let uri = format!("unix://{}", lab.charon_vici(short).display());
    let out = Command::new("swanctl")
        .args(["--list-sas", "--uri", &uri])
        .output()
        .expect("swanctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // `raven-x: #3, ESTABLISHED, IKEv2, ...` and
            // `  raven-x: #2, reqid 1, INSTALLED, TUNNEL-in-UDP, ...`
            let (name, rest) = l.split_once(": #")?;
            let mut fields = rest.split(", ");
            let id = fields.next()?;
            let state = if name.starts_with(' ') {
                fields.nth(1)?
            } else {
                fields.next()?
            };
            Some(format!("{name} #{id} {state}"))
        })
        .collect()
}

/// How many CHILD_SAs of connection `conn` a node's charon has installed
/// so far (its log's `CHILD_SA <conn>{n} established` lines).
fn direct_child_sas(lab: &Lab, short: &str, conn: &str) -> u64 {
    let log =
        std::fs::read_to_string(lab.path(&format!("charon-{short}.ike.log"))).unwrap_or_default();
    let head = format!("CHILD_SA {conn}{{");
    log.lines()
        .filter(|l| l.contains(&head) && l.contains("} established with SPIs"))
        .count() as u64
}

/// Established IKE_SAs of a node's charon.
fn ike_established(lab: &Lab, short: &str) -> Vec<String> {
    sas(lab, short)
        .into_iter()
        .filter(|s| !s.starts_with(' ') && s.ends_with(" ESTABLISHED"))
        .collect()
}

/// Waits until the gateways' charons hold exactly one established IKE_SA
/// per gateway pair they carry and nothing else.
fn one_sa_per_pair(lab: &Lab, gateways: &[(&str, usize)]) -> Duration {
    let t = Instant::now();
    loop {
        // Every IKE_SA, whatever its state: settled when all are
        // established (a direct path's second IKE_SA, dialled from the
        // other end, is closed once both are up).
        let counts: Vec<(String, Vec<String>)> = gateways
            .iter()
            .map(|(g, _)| {
                let ike = sas(lab, g).into_iter().filter(|s| !s.starts_with(' '));
                (g.to_string(), ike.collect())
            })
            .collect();
        let ok = gateways.iter().zip(&counts).all(|((_, want), (_, have))| {
            have.len() == *want && have.iter().all(|s| s.ends_with(" ESTABLISHED"))
        });
        if ok {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "IKE_SAs per gateway {counts:?}, want {gateways:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Gateways of the lab with the IKE_SAs each carries: the cloud one to
/// each NATed domain (it is their relay), each NATed domain one to the
/// cloud and one straight to the other through both NATs.
const GATEWAY_SAS: [(&str, usize); 3] = [("c1", 2), ("h1", 2), ("q1", 2)];

#[test]
fn over_ipsec_every_node_and_pod_reaches_every_other_through_nat_and_the_relay_on_one_sa_per_gateway_pair()
 {
    if !ready() {
        return;
    }
    let (_g, lab) = up_with("m", |_| {});
    let t = one_sa_per_pair(&lab, &GATEWAY_SAS);
    eprintln!("one IKE_SA per gateway pair {t:?} after the full matrix");
    // One CHILD_SA per IKE_SA: every subnet is a selector of it.
    for (g, n) in GATEWAY_SAS {
        let children = sas(&lab, g)
            .into_iter()
            .filter(|s| s.starts_with(' ') && s.ends_with(" INSTALLED"))
            .count();
        assert_eq!(children, n, "{g}: {:?}", sas(&lab, g));
    }
    // The NATed side dialled: the cloud's SAs come from the routers'
    // public addresses, on UDP 4500 through the NAT; the NATed domains
    // reach each other directly.
    wait_for(
        "both report the direct path",
        Duration::from_secs(20),
        || relayed(&lab, "h1", "q1") == Some(false) && relayed(&lab, "q1", "h1") == Some(false),
    );
    let report = lab.report(Duration::from_secs(10), Duration::ZERO);
    eprintln!("{}", report.render());
    assert!(report.ok(), "{}\n{}", report.verdict(), lab.logs());
    let paths = &report.paths;
    for (from, to, relayed) in [
        ("c1", "h1", false),
        ("c1", "q1", false),
        ("h1", "c1", false),
        ("h1", "q1", false),
        ("q1", "h1", false),
        ("q1", "c1", false),
    ] {
        assert!(
            paths
                .iter()
                .any(|p| p.0 == from && p.1 == to && p.2 == relayed),
            "{from} -> {to} relayed {relayed}: {paths:?}"
        );
    }
    // Agents announce IPsec; the hub shows every gateway's SA state.
    let a = agents(&lab);
    let list = a["agents"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), NODES.len(), "{a:#}");
    for agent in &list {
        assert!(
            agent["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == "CAPABILITY_IPSEC")),
            "{agent:#}"
        );
    }
    for g in ["c1", "h1", "q1"] {
        let agent = list
            .iter()
            .find(|x| x["nodeName"] == name_of(g))
            .unwrap_or_else(|| panic!("no agent {g}: {a:#}"));
        let peers = agent["peers"].as_array().cloned().unwrap_or_default();
        assert!(
            !peers.is_empty()
                && peers
                    .iter()
                    .all(|p| p["ipsecState"] == "ESTABLISHED/INSTALLED"),
            "{g}: {agent:#}"
        );
    }
    // No WireGuard anywhere; the libipsec device keeps 1400 (the most it
    // carries) over a 1500-byte underlay.
    for n in NODES {
        let links = lab
            .sh(n.short, &["ip", "-o", "link", "show"])
            .unwrap_or_default();
        assert!(
            !links.contains(&lab.tunnel_dev(n.short)),
            "{}: {links}",
            n.short
        );
    }
    for g in ["c1", "h1", "q1"] {
        let link = lab
            .sh(g, &["ip", "-o", "link", "show", "ipsec0"])
            .unwrap_or_default();
        assert!(link.contains(" mtu 1400 "), "{g}: {link}");
    }
    // The agent's own view: `raven-edge status` lists the SA state.
    let edge = lab
        .binaries_dir()
        .map(|d| d.join("raven-edge"))
        .expect("binaries");
    let status = lab
        .sh(
            "h1",
            &[
                &edge.to_string_lossy(),
                "status",
                "--http-addr",
                "127.0.0.1:10273",
            ],
        )
        .expect("raven-edge status");
    eprintln!("raven-edge status on hz-1:\n{status}");
    assert!(
        status.contains("IPSEC") && status.contains("ESTABLISHED/INSTALLED"),
        "{status}"
    );
    // And its /metrics: the SA's state beside its bytes and rekey age.
    let metrics = lab
        .sh("h1", &["curl", "-sf", "http://127.0.0.1:10273/metrics"])
        .unwrap_or_default();
    assert!(
        metrics.contains(&format!(
            "raven_edge_ipsec_sa{{peer=\"{}\",state=\"ESTABLISHED/INSTALLED\"}} 1",
            name_of("c1")
        )),
        "{metrics}"
    );
}

#[test]
fn over_ipsec_restarted_agents_keep_every_sa_and_traffic_flows_with_the_hub_killed() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("r", |_| {});
    one_sa_per_pair(&lab, &GATEWAY_SAS);
    let before: Vec<BTreeSet<String>> = GATEWAY_SAS.iter().map(|(g, _)| sas(&lab, g)).collect();
    // Every gateway's agent restarts (SIGTERM, then a new process).
    for (g, _) in GATEWAY_SAS {
        lab.stop_agent(g);
    }
    let m = lab.matrix();
    assert!(
        m.iter().all(|x| x.2),
        "traffic while no gateway agent runs\n{}",
        Lab::render(&m)
    );
    for (g, _) in GATEWAY_SAS {
        lab.start_agent(g).expect("agent");
    }
    wait_for("the gateways' agents back", Duration::from_secs(30), || {
        let a = agents(&lab);
        ["c1", "h1", "q1"].iter().all(|g| {
            a["agents"].as_array().into_iter().flatten().any(|x| {
                x["nodeName"] == name_of(g) && x["connected"] == true && x["appliedSuccess"] == true
            })
        })
    });
    // A few passes of the new agents (resync 1 s).
    std::thread::sleep(Duration::from_secs(3));
    for (i, (g, _)) in GATEWAY_SAS.iter().enumerate() {
        let log = std::fs::read_to_string(lab.path(&format!("edge-{g}.log"))).unwrap_or_default();
        assert!(log.contains("IPsec available"), "{g}: {log}");
        assert_eq!(
            sas(&lab, g),
            before[i],
            "{g}: SA unique IDs unchanged across the agent restart"
        );
    }
    eprintln!("agent restart: every SA kept its unique ID: {before:?}");
    converge(&lab, "after the gateways' agents restarted");

    lab_common::kill_hub_and_check_the_matrix(&mut lab, Duration::from_secs(4));
    for (i, (g, _)) in GATEWAY_SAS.iter().enumerate() {
        assert_eq!(sas(&lab, g), before[i], "{g}: SAs kept with the hub gone");
    }
    eprintln!("hub killed: full matrix over the same SAs");
}

#[test]
fn over_ipsec_a_powered_off_gateway_node_is_replaced_by_another_node_of_its_gateway() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("f", |_| {});
    add_hz2_candidate(&lab);
    std::thread::sleep(Duration::from_secs(3));
    converge(&lab, "hz-2 a standby candidate");
    assert_eq!(
        active_tunnel(&lab, "gw-hangzhou").as_deref(),
        Some(name_of("h1"))
    );
    let t = Instant::now();
    let elected = lab_common::power_off_hz1_until_the_hub_elects_hz2(&mut lab);
    let alive = ["c1", "c2", "h2", "q1", "q2"];
    let back = all_reach_within(&lab, &alive, t, Duration::from_secs(90));
    eprintln!(
        "gateway failover over IPsec: hz-1 powered off; hz-2 elected after {elected:?}, every other node and pod reached again after {back:?}"
    );
    hz2_carries_the_sa(&lab);
}

/// hz-2's charon carries gw-hangzhou's one SA with the cloud, and the
/// cloud's has it.
fn hz2_carries_the_sa(lab: &Lab) {
    let to_cloud = format!("raven-{} ", name_of("c1"));
    let h2 = ike_established(lab, "h2");
    assert_eq!(
        h2.iter().filter(|s| s.starts_with(&to_cloud)).count(),
        1,
        "hz-2 carries gw-hangzhou's SA: {h2:?}"
    );
    assert!(
        ike_established(lab, "c1")
            .iter()
            .any(|s| s.contains(name_of("h2"))),
        "{:?}",
        sas(lab, "c1")
    );
}

/// Every pair among `shorts` answers within `timeout` of `t`; returns when.
fn all_reach_within(lab: &Lab, shorts: &[&str], t: Instant, timeout: Duration) -> Duration {
    loop {
        let m = lab.matrix_of(shorts);
        if m.iter().all(|x| x.2) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "not every pair answers within {timeout:?}\n{}\n{}",
            Lab::render(&m),
            lab.logs()
        );
    }
}

#[test]
fn over_ipsec_with_the_hub_down_a_dead_gateway_node_fails_over_locally_to_another_of_its_gateway() {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("l", |_| {});
    add_hz2_candidate(&lab);
    std::thread::sleep(Duration::from_secs(3));
    converge(&lab, "hz-2 a standby candidate");
    // The cloud already answers hz-2, should it dial.
    lab.kill_hub();
    std::thread::sleep(Duration::from_secs(4)); // > 3 heartbeats: agents know
    let t = Instant::now();
    lab.power_off("h1").expect("power off hz-1");
    let alive = ["c1", "c2", "h2", "q1", "q2"];
    let back = all_reach_within(&lab, &alive, t, Duration::from_secs(90));
    eprintln!(
        "local failover over IPsec (hub down): hz-1 powered off, every pair among the others reached again after {back:?}"
    );
    hz2_carries_the_sa(&lab);
}

/// The raven connections loaded into a node's charon (`swanctl
/// --list-conns`: `raven-x: IKEv2, ...`).
fn conns(lab: &Lab, short: &str) -> BTreeSet<String> {
    let uri = format!("unix://{}", lab.charon_vici(short).display());
    let out = Command::new("swanctl")
        .args(["--list-conns", "--uri", &uri])
        .output()
        .expect("swanctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_once(": ").map(|(n, _)| n.to_owned()))
        .filter(|n| n.starts_with("raven-"))
        .collect()
}

#[test]
fn over_ipsec_with_the_hub_down_a_dead_public_gateway_node_fails_over_locally_to_another_of_its_candidates()
 {
    if !ready() {
        return;
    }
    let (_g, mut lab) = up_with("p", |lab| lab_common::add_c2_public_candidate(lab));
    let c2 = format!("raven-{}", name_of("c2"));
    // Both NATed gateways hold a standby connection to cloud-2, but dial it
    // only once cloud-1's IKE_SA is gone: cloud-2 carries nothing yet.
    wait_for(
        "standby connections to cloud-2",
        Duration::from_secs(30),
        || ["h1", "q1"].iter().all(|g| conns(&lab, g).contains(&c2)),
    );
    one_sa_per_pair(&lab, &GATEWAY_SAS);
    std::thread::sleep(Duration::from_secs(3));
    for g in ["h1", "q1"] {
        assert!(
            !ike_established(&lab, g).iter().any(|s| s.starts_with(&c2)),
            "{g} dialled cloud-2 while cloud-1 is up: {:?}",
            sas(&lab, g)
        );
    }
    assert!(
        ike_established(&lab, "c2").is_empty(),
        "{:?}",
        sas(&lab, "c2")
    );
    // The hub (it runs on cloud-1) is gone, then cloud-1's power.
    lab.kill_hub();
    std::thread::sleep(Duration::from_secs(4)); // > 3 heartbeats: agents know
    let t = Instant::now();
    lab.power_off("c1").expect("power off cloud-1");
    let alive = ["c2", "h1", "h2", "q1", "q2"];
    // Dead peer detection ends cloud-1's IKE_SAs ≈ 7.4 s after its last
    // packet (2 s DPD delay, ≈ 5.4 s of retransmissions), then the standby
    // connections are dialled. Generous, but below the ≈ 51 s charon's
    // default schedule took.
    let back = all_reach_within(&lab, &alive, t, Duration::from_secs(40));
    eprintln!(
        "local failover of the public gateway over IPsec (hub down): cloud-1 powered off, every pair among the others (through cloud-2, also as the relay) reached again after {back:?}"
    );
    for g in ["h1", "q1"] {
        assert!(
            ike_established(&lab, g).iter().any(|s| s.starts_with(&c2)),
            "{g}: {:?}",
            sas(&lab, g)
        );
    }
    assert_eq!(
        ike_established(&lab, "c2").len(),
        2,
        "cloud-2 carries an SA to each NATed gateway: {:?}",
        sas(&lab, "c2")
    );
}

/// The IKE_SAs of `conn` on a node's charon with their remote address
/// (`swanctl --list-sas --ike <conn>`: `  remote '<id>' @ <ip>[<port>]`):
/// (state, "ip:port").
fn sa_remotes(lab: &Lab, short: &str, conn: &str) -> Vec<(String, String)> {
    let uri = format!("unix://{}", lab.charon_vici(short).display());
    let out = Command::new("swanctl")
        .args(["--list-sas", "--uri", &uri, "--ike", conn])
        .output()
        .expect("swanctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    let mut state = None;
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix(&format!("{conn}: #")) {
            state = rest.split(", ").nth(1).map(str::to_owned);
        } else if let (Some(s), Some(at)) = (&state, l.trim().strip_prefix("remote '"))
            && let Some((_, addr)) = at.split_once("' @ ")
        {
            let addr = addr.split_whitespace().next().unwrap_or("");
            found.push((s.clone(), addr.replace('[', ":").replace(']', "")));
            state = None;
        }
    }
    found
}

/// How `from` reaches `to` as it last reported it to the hub: `Some(true)`
/// through the relay, `Some(false)` directly.
fn relayed(lab: &Lab, from: &str, to: &str) -> Option<bool> {
    let a = agents(lab);
    a["agents"]
        .as_array()?
        .iter()
        .find(|x| x["nodeName"] == name_of(from))?["peers"]
        .as_array()?
        .iter()
        .find(|p| p["peerNode"] == name_of(to))
        .map(|p| p["relayed"] == true)
}

/// ESP packets on the cloud gateway's public link while `during` runs:
/// what the relay carries.
fn esp_through_the_relay(lab: &Lab, during: impl FnOnce()) -> Vec<String> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("c1"),
            "tcpdump",
            "-n",
            "-l",
            "-i",
            "wan0",
        ])
        .args(["udp", "port", "4500"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    during();
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
    }
    // ESP packets only: the relay's own IKE exchanges with each NATed
    // gateway (dead peer detection of its idle IKE_SAs every 2 s) are
    // `NONESP-encap: isakmp` and carry no traffic between the domains.
    out.lines()
        .filter(|l| l.contains("ESP") && !l.contains("NONESP-encap"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn over_ipsec_natted_domains_go_direct_once_punched_losing_only_the_ikev2_responder_window() {
    if !ready() {
        return;
    }
    // Until the path between the two NAT routers opens, hangzhou and
    // qingdao reach each other through the relay only.
    let (_g, lab) = up_with("d", |lab| {
        lab.cut_between_routers("hangzhou", "qingdao", true)
            .expect("cut");
    });
    let (to_q, to_h) = (
        format!("raven-{}", name_of("q1")),
        format!("raven-{}", name_of("h1")),
    );
    let direct_up = |lab: &Lab| {
        let (h, q) = (sa_remotes(lab, "h1", &to_q), sa_remotes(lab, "q1", &to_h));
        h.len() == 1 && q.len() == 1 && h[0].0 == "ESTABLISHED" && q[0].0 == "ESTABLISHED"
    };
    wait_for("both report the relay", Duration::from_secs(20), || {
        relayed(&lab, "h1", "q1") == Some(true) && relayed(&lab, "q1", "h1") == Some(true)
    });
    assert!(!direct_up(&lab), "{:?}", sas(&lab, "h1"));
    // Members' pods ping each other across the two domains while the
    // gateways move from the relay onto the direct path.
    let pinger = raven_tests::containers::Pinger::start(&lab, "h2", pod("h2"), pod("q2"), 1200)
        .expect("ping");
    std::thread::sleep(Duration::from_secs(2));
    lab.cut_between_routers("hangzhou", "qingdao", false)
        .expect("uncut");
    let t = wait_for(
        "one direct IKE_SA each way between hangzhou and qingdao",
        Duration::from_secs(50),
        || direct_up(&lab),
    );
    eprintln!("direct IKE_SA hangzhou <-> qingdao {t:?} after the path between the NATs opened");
    // Straight to the other's NAT router, on UDP 4500.
    assert_eq!(
        sa_remotes(&lab, "h1", &to_q)[0].1,
        "203.0.113.30:4500",
        "{:?}",
        sas(&lab, "h1")
    );
    assert_eq!(sa_remotes(&lab, "q1", &to_h)[0].1, "203.0.113.20:4500");
    wait_for(
        "both report the direct path",
        Duration::from_secs(20),
        || relayed(&lab, "h1", "q1") == Some(false) && relayed(&lab, "q1", "h1") == Some(false),
    );
    // Nothing between the two domains crosses the relay any more.
    let esp = esp_through_the_relay(&lab, || {
        for (a, b) in [("h1", "q1"), ("h2", "q2"), ("q2", "h1")] {
            assert!(lab.ping(a, pod(a), pod(b)), "{a} -> {b}");
        }
    });
    assert!(
        esp.is_empty(),
        "ESP through the relay once direct: {esp:#?}"
    );
    let (sent, lost) = pinger.wait();
    let installs = direct_child_sas(&lab, "h1", &to_q);
    eprintln!(
        "relay -> direct over IPsec: {lost} of {sent} pings (20 pps, pod hz-2 -> pod qd-2) lost; \
         {installs} direct CHILD_SA(s) installed"
    );
    // The relay keeps carrying both ways until each end has moved, so what
    // a move can lose is only IKEv2's own window: a new CHILD_SA's
    // responder installs its outbound SA and policies before it sends the
    // IKE_AUTH (or CREATE_CHILD_SA) response, the initiator its inbound SA
    // only once it has processed that response (strongSwan 5.9.8
    // `child_create.c`; only a rekey defers the responder's outbound), and
    // drops what arrives before as an unknown SPI. That is one message and
    // its processing, well under a ping interval (50 ms), once per direct
    // CHILD_SA: one, or two when both ends' dials complete. Measured: 0 in
    // 17 of 18 runs here, 1 in the other and once in CI, each at the first
    // install.
    assert!(
        installs >= 1 && lost <= installs,
        "the move onto the direct path lost {lost} pings, more than one per direct CHILD_SA \
         installed ({installs})\n{}",
        lab.logs()
    );
    // One SA pair per gateway pair: the relay keeps its two, each NATed
    // gateway has the relay's and the direct one.
    one_sa_per_pair(&lab, &GATEWAY_SAS);
    converge(&lab, "on the direct path");

    // The path between the NATs breaks under traffic: what is sent into
    // the dead direct CHILD_SA is lost until dead peer detection removes
    // it (2 s of silence, then ≈ 5.4 s of retransmissions), then the
    // relay's (which kept the selectors) carries on. The bound is generous
    // but below the ≈ 58 s charon's default schedule took.
    let pinger = raven_tests::containers::Pinger::start(&lab, "h2", pod("h2"), pod("q2"), 600)
        .expect("ping");
    std::thread::sleep(Duration::from_secs(2));
    lab.cut_between_routers("hangzhou", "qingdao", true)
        .expect("cut");
    let t = Instant::now();
    let back = wait_for("the relay again", Duration::from_secs(30), || {
        lab.ping("h2", pod("h2"), pod("q2")) && lab.ping("q2", pod("q2"), pod("h2"))
    });
    let (sent, lost) = pinger.wait();
    eprintln!(
        "direct path cut: through the relay again after {back:?} (dead peer detection); {lost} of {sent} pings lost, {} s after the cut",
        t.elapsed().as_secs()
    );
    converge(&lab, "through the relay after the direct path broke");
}

#[test]
fn over_ipsec_behind_a_symmetric_nat_the_relay_keeps_carrying_natted_domains() {
    if !ready() {
        return;
    }
    let (_g, lab) = up_with("s", |lab| {
        lab.make_nat_symmetric("qingdao").expect("symmetric NAT");
    });
    lab_common::until_the_direct_path_behind_a_symmetric_nat_was_tried(&lab);
    let to_q = format!("raven-{}", name_of("q1"));
    let to_h = format!("raven-{}", name_of("h1"));
    for (g, conn) in [("h1", &to_q), ("q1", &to_h)] {
        assert!(
            sa_remotes(&lab, g, conn)
                .iter()
                .all(|(state, _)| state != "ESTABLISHED"),
            "{g}: a direct IKE_SA through a symmetric NAT: {:?}",
            sas(&lab, g)
        );
    }
    assert_eq!(relayed(&lab, "h1", "q1"), Some(true), "{:#}", agents(&lab));
    assert_eq!(relayed(&lab, "q1", "h1"), Some(true), "{:#}", agents(&lab));
    converge(&lab, "through the relay behind a symmetric NAT");
}

/// The largest ICMP payload with DF set that `from`'s pod gets to `to`'s
/// pod (a binary search; a failed ping costs up to a second).
fn largest_df_payload(lab: &Lab, from: &str, to: &str) -> u32 {
    let (src, dst) = (pod(from), pod(to));
    let (mut lo, mut hi) = (1000u32, 1500u32);
    assert!(
        lab.ping_df(from, src, dst, lo),
        "{from} -> {to}: {lo} bytes"
    );
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if lab.ping_df(from, src, dst, mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Every link of every namespace of the lab (nodes, switches, routers)
/// gets an MTU of `mtu`: a smaller underlay everywhere.
fn underlay_mtu(lab: &Lab, mtu: u32) {
    let boxes = NODES
        .iter()
        .map(|n| n.short)
        .chain(["inet", "cloudsw", "hzsw", "qdsw", "hzrt", "qdrt"]);
    for b in boxes {
        let ns = lab.ns(b);
        let out = Command::new("ip")
            .args(["-n", &ns, "-o", "link", "show"])
            .output()
            .expect("ip link");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name == "lo" {
                continue;
            }
            let st = Command::new("ip")
                .args([
                    "-n",
                    &ns,
                    "link",
                    "set",
                    "dev",
                    name,
                    "mtu",
                    &mtu.to_string(),
                ])
                .status()
                .expect("ip link set");
            assert!(st.success(), "{ns}: mtu of {name}");
        }
    }
}

#[test]
fn over_ipsec_on_a_1400_byte_underlay_the_largest_df_ping_across_domains_is_the_underlay_minus_the_tunnel_overhead()
 {
    if !ready() {
        return;
    }
    let (_g, lab) = up_with("u", |lab| underlay_mtu(lab, 1400));
    one_sa_per_pair(&lab, &GATEWAY_SAS);
    for g in ["c1", "h1", "q1"] {
        let link = lab
            .sh(g, &["ip", "-o", "link", "show", "ipsec0"])
            .unwrap_or_default();
        assert!(link.contains(" mtu 1320 "), "{g}: {link}");
    }
    // From a gateway (into its ipsec0), from a member (raven0, then the
    // gateway's ipsec0), across the relay and straight to the cloud.
    for (a, b) in [("h1", "q1"), ("h2", "q2"), ("q2", "c2")] {
        let lo = largest_df_payload(&lab, a, b);
        eprintln!(
            "underlay 1400: largest DF ping pod {a} -> pod {b} over IPsec: payload {lo} bytes (packet {}; libipsec's own 1400 would take packets of 1400)",
            lo + 28
        );
        // 1400 − 80 = 1320, less 20 bytes of IPv4 and 8 of ICMP.
        assert_eq!(lo, 1320 - 28, "{a} -> {b}");
    }
}

/// Skip-NAT acts where traffic leaves a domain: on the sending side's
/// gateway, a pod's packets to another domain pass the CNI's masquerade
/// untouched, so they enter the IPsec tunnel with the pod's address (what
/// the receiving domain's own CNI does with them is its business).
#[test]
fn over_ipsec_skip_nat_keeps_the_pod_source_address_into_the_tunnel_under_the_cnis_masquerade() {
    if !ready() {
        return;
    }
    // Every node masquerades what its pods send off the pod network, as
    // flannel does (`-s <cluster CIDR> ! -d <cluster CIDR> -j MASQUERADE`).
    let masquerade = [
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "10.244.0.0/16",
        "!",
        "-d",
        "10.244.0.0/16",
        "-j",
        "MASQUERADE",
    ];
    let (_g, lab) = up_with("n", |lab| {
        for n in NODES {
            lab.sh(n.short, &masquerade).expect("CNI masquerade");
        }
    });
    one_sa_per_pair(&lab, &GATEWAY_SAS);
    // (from, to, the sending side's gateway): a member's pod through its
    // gateway and the relay, a gateway's own pod, a member's pod to the
    // cloud.
    for (a, b, gw) in [("h2", "q2", "h1"), ("h1", "c2", "h1"), ("q2", "h1", "q1")] {
        let (from, to) = (
            NODES.iter().find(|n| n.short == a).expect("node"),
            NODES.iter().find(|n| n.short == b).expect("node"),
        );
        assert!(lab.ping(a, from.pod, to.ip), "{a} pod -> {b} node");
        let flow = lab
            .sh(
                gw,
                &[
                    "conntrack",
                    "-L",
                    "-p",
                    "icmp",
                    "--src",
                    from.pod,
                    "--dst",
                    to.ip,
                ],
            )
            .unwrap_or_default();
        eprintln!("skip-NAT over IPsec: {a} pod -> {b} node, on {gw}: {flow}");
        // Not NATed: the reply goes to the pod itself.
        assert!(
            flow.contains(&format!("src={} dst={} ", to.ip, from.pod)),
            "{gw} masqueraded {a}'s pod {}: {flow}",
            from.pod
        );
    }
}
