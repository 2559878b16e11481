//! Helpers shared by the lab test binaries (`lab`: WireGuard, `lab_ipsec`:
//! IPsec); each uses a part, the rest is dead code there.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use raven_tests::lab::{Lab, LabDomain, LabRouter, NODES};

/// Whether this run is root and has `tools` (names on PATH or absolute
/// paths); without them the tests skip, unless `RAVEN_REQUIRE_TOOLS=1`.
pub fn have(tools: &[&str]) -> bool {
    let root = raven_tests::lab::is_root();
    let found = tools.iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && found) {
        let need = tools.join(", ");
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "lab tests need root and {need} (RAVEN_REQUIRE_TOOLS is set)"
        );
        eprintln!("skipped: lab tests need root and {need}");
    }
    root && found
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A lab changed by `prepare` after it is built, before anything runs, up
/// and converged. Labs run one at a time; `kind` keeps the namespaces of
/// the test binaries apart.
pub fn up_with(
    kind: &str,
    tag: &str,
    prepare: impl FnOnce(&mut Lab),
) -> (std::sync::MutexGuard<'static, ()>, Lab) {
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = std::env::temp_dir().join(format!("raven-lab-{kind}{tag}-{}", std::process::id()));
    // Namespace and interface names are global to the machine: every test
    // run gets its own prefix (tunnel device names stay within 15 bytes).
    let prefix = format!("r{kind}{tag}{}-", std::process::id() % 10_000);
    let mut lab = Lab::build(&prefix, &dir).expect("lab builds");
    prepare(&mut lab);
    lab.start_hub().expect("hub");
    lab.start_agents().expect("agents");
    converge(&lab, "first sync");
    (guard, lab)
}

/// Waits for the full matrix (at most 60 s); prints and returns the time.
pub fn converge(lab: &Lab, what: &str) -> Duration {
    match lab.converge(Duration::from_secs(60)) {
        Ok(t) => {
            eprintln!("{what}: full matrix after {t:?}");
            t
        }
        Err(m) => panic!(
            "{what}: no full matrix after 60 s\n{}\n{}",
            Lab::render(&m),
            lab.logs()
        ),
    }
}

/// A fourth domain to add to a running lab: shenzhen (gw-shenzhen), its
/// switch `szsw` behind its own NAT router `szrt` (WAN 203.0.113.40) whose
/// LAN address is `lan`.
pub fn shenzhen(lan: &'static str) -> LabDomain {
    LabDomain {
        name: "shenzhen",
        gateway: "gw-shenzhen",
        switch: "szsw",
        router: Some(LabRouter {
            short: "szrt",
            lan,
            wan: "203.0.113.40",
        }),
    }
}

/// The Kubernetes node name of a lab node.
pub fn name_of(short: &str) -> &'static str {
    node(short).name
}

/// The pod address of the lab node `short`.
pub fn pod(short: &str) -> &'static str {
    node(short).pod
}

fn node(short: &str) -> &'static raven_tests::lab::LabNode {
    NODES
        .iter()
        .find(|n| n.short == short)
        .unwrap_or_else(|| panic!("no lab node {short}"))
}

/// `ListAgents` as JSON.
pub fn agents(lab: &Lab) -> serde_json::Value {
    try_agents(lab).unwrap_or_else(|e| panic!("grpcurl: {e}"))
}

/// `ListAgents` as JSON, or why the hub did not answer (a hub just
/// started may not listen yet).
pub fn try_agents(lab: &Lab) -> Result<serde_json::Value, String> {
    let out = lab
        .grpcurl("raven.v1.InspectService/ListAgents")
        .map_err(|e| format!("{e:?}"))?;
    Ok(serde_json::from_str(&out).expect("json"))
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    t.elapsed()
}

/// The node the hub elected as `gateway`'s active tunnel.
pub fn active_tunnel(lab: &Lab, gateway: &str) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&lab.grpcurl("raven.v1.InspectService/GetTopology").ok()?).ok()?;
    v["resources"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == format!("gateway/{gateway}"))?["gateway"]["activeTunnel"]["node"]
        .as_str()
        .map(str::to_owned)
}

/// Makes hz-2 gw-hangzhou's second tunnel candidate (in the manifests).
pub fn add_hz2_candidate_manifest(lab: &Lab) {
    lab.edit_manifest(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---",
            name_of("h2")
        ),
    )
    .expect("edit");
}

/// Powers hz-1 off and waits (at most 30 s) until the hub elects hz-2 for
/// gw-hangzhou; returns how long the election took.
pub fn power_off_hz1_until_the_hub_elects_hz2(lab: &mut Lab) -> Duration {
    lab.power_off("h1").expect("power off hz-1");
    wait_for(
        "the hub electing hz-2 for gw-hangzhou",
        Duration::from_secs(30),
        || active_tunnel(lab, "gw-hangzhou").as_deref() == Some(name_of("h2")),
    )
}

/// Kills the hub, waits `settle`, and checks every pair still reaches each
/// other: the agents keep the dataplane without it.
pub fn kill_hub_and_check_the_matrix(lab: &mut Lab, settle: Duration) {
    lab.kill_hub();
    std::thread::sleep(settle);
    let m = lab.matrix();
    assert!(
        m.iter().all(|x| x.2),
        "traffic must survive the hub\n{}",
        Lab::render(&m)
    );
}

/// cloud-2's public address when it is a second tunnel candidate of
/// gw-cloud ([`add_c2_public_candidate`]).
pub const C2_PUBLIC: &str = "203.0.113.11";

/// Makes cloud-2 a second *public* tunnel candidate of gw-cloud: a link of
/// its own on the internet segment holding [`C2_PUBLIC`] (the cloud has no
/// router; cloud-2 otherwise reaches nothing outside its LAN), and a tunnel
/// endpoint with that public IP in the manifests.
pub fn add_c2_public_candidate(lab: &Lab) {
    let (inet, c2) = (lab.ns("inet"), lab.ns("c2"));
    for args in [
        vec![
            "-n", &inet, "link", "add", "c2-wan0", "type", "veth", "peer", "name", "wan0", "netns",
            &c2,
        ],
        vec![
            "-n", &inet, "link", "set", "c2-wan0", "master", "wanbr", "up",
        ],
        vec![
            "-n",
            &c2,
            "addr",
            "add",
            &format!("{C2_PUBLIC}/24"),
            "dev",
            "wan0",
        ],
        vec!["-n", &c2, "link", "set", "wan0", "up"],
    ] {
        let st = std::process::Command::new("ip")
            .args(&args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    }
    lab.edit_manifest(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n      publicIP: 203.0.113.10\n",
        &format!(
            "      port: 4500\n      type: tunnel\n      publicIP: 203.0.113.10\n    - nodeName: {}\n      underNAT: false\n      port: 4500\n      type: tunnel\n      publicIP: {C2_PUBLIC}\n",
            name_of("c2")
        ),
    )
    .expect("edit");
}

/// Waits until the hub has learnt an observed endpoint for qingdao's
/// gateway behind the symmetric NAT `lab.make_nat_symmetric("qingdao")`
/// made, then long enough for hangzhou to have tried it: a symmetric NAT
/// maps the direct flow to another port, so no direct handshake completes
/// and the relay must keep carrying both domains.
pub fn until_the_direct_path_behind_a_symmetric_nat_was_tried(lab: &Lab) {
    wait_for(
        "an observed endpoint for qingdao's gateway",
        Duration::from_secs(30),
        || {
            lab.grpcurl("raven.v1.InspectService/GetTopology")
                .unwrap_or_default()
                .contains("\"observedEndpoint\": \"203.0.113.30:")
        },
    );
    std::thread::sleep(Duration::from_secs(12));
}
