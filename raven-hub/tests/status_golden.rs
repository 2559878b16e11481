//! Golden files of `raven-hub status`: the user-manual topology and an agent
//! table with one agent in each state (ready, behind, nacked, apply failed,
//! disconnected), as a table, wide, JSON and YAML. `UPDATE_GOLDEN=1`
//! rewrites them after an intended change (review the diff).

use std::path::Path;
use std::time::{Duration, SystemTime};

use raven_cli::output::{Format, check_golden};
use raven_hub::fleet;
use raven_proto::v1;

fn at(secs: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
    ))
}

const NOW: u64 = 1_800_000_000;

fn agent(node: &str, connected: bool, acked: u64, applied: u64) -> v1::AgentStatus {
    let port = 40000 + u32::from(node.as_bytes()[5]) + u32::from(node.as_bytes()[22]);
    v1::AgentStatus {
        node_name: node.into(),
        connected,
        hub_replica: "hub-0".into(),
        connected_since: if connected { at(NOW - 3600) } else { None },
        last_seen: at(NOW - 4),
        acked_epoch: "e1".into(),
        acked_revision: acked,
        applied_epoch: "e1".into(),
        applied_revision: applied,
        applied_success: true,
        agent_version: "0.1.0".into(),
        remote_address: if connected {
            format!("198.51.100.7:{port}")
        } else {
            String::new()
        },
        ..Default::default()
    }
}

fn fixture() -> fleet::Fleet {
    let loaded = raven_core::manifest::load(&raven_hub::embedded::user_manual());
    let mut compiled = raven_core::compile(&loaded.inputs);
    compiled.topology.problems.extend(loaded.problems);
    compiled.topology.problems.push(raven_core::Problem::error(
        "Gateway/gw-qingdao",
        "spec.endpoints[1].publicIP",
        "300.1.1.1",
        "is not an IP address; the endpoint is not used",
    ));
    compiled
        .topology
        .problems
        .push(raven_core::Problem::warning(
            "Node/izwz9ey0js5z7mornclpd6z",
            "",
            "",
            "has no InternalIP; raven does not route to it",
        ));
    compiled.topology.problems.sort();
    let topology = raven_proto::topology_to_proto("e1", 7, &compiled.topology);
    let mut nacked = agent("izbp15inok0kbfkg3in52sz", true, 6, 6);
    nacked.last_nack = Some(v1::LastNack {
        nonce: "n7".into(),
        epoch: "e1".into(),
        revision: 7,
        error: Some(v1::ErrorDetail {
            message: "resource gateway/gw-cloud: members[0].private_ip: \"x\" is not an IP address"
                .into(),
            ..Default::default()
        }),
        at: at(NOW - 30),
    });
    let mut failed = agent("izbp15inok0kbfkg3in52rz", true, 7, 7);
    failed.applied_success = false;
    failed.applied_error = Some(v1::ErrorDetail {
        message: "adding route 10.244.3.0/24 table 9027: Operation not permitted".into(),
        ..Default::default()
    });
    let mut ready = agent("izm5eb24dmjfimuaybpnr0z", true, 7, 7);
    ready.local_failover = vec![v1::LocalFailover {
        gateway: "gw-hangzhou".into(),
        active_node: "izm5eb24dmjfimuaybpnr0z".into(),
    }];
    ready.peers = vec![v1::PeerTunnelState {
        peer_node: "izwz9dohcv74iegqecp4axz".into(),
        ..Default::default()
    }];
    let agents = v1::ListAgentsResponse {
        agents: vec![
            failed,
            nacked,
            agent("izm5eb24dmjfimuaybpnqzz", true, 7, 6),
            ready,
            agent("izwz9dohcv74iegqecp4axz", false, 5, 5),
        ],
    };
    fleet::build(&topology, &agents)
}

fn golden(format: Format, file: &str) {
    let got = fleet::render(
        &fixture(),
        format,
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    );
    check_golden(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/status")
            .join(file),
        &got,
    );
}

#[test]
fn hub_status_table_golden() {
    golden(Format::Table, "table.txt");
}

#[test]
fn hub_status_wide_golden() {
    golden(Format::Wide, "wide.txt");
}

#[test]
fn hub_status_json_golden() {
    golden(Format::Json, "status.json");
}

#[test]
fn hub_status_yaml_golden_reads_back_as_the_json_document() {
    golden(Format::Yaml, "status.yaml");
    let yaml = fleet::render(&fixture(), Format::Yaml, SystemTime::UNIX_EPOCH);
    let from_yaml: serde_json::Value = serde_yaml_ng::from_str(&yaml).expect("YAML parses");
    let from_json = serde_json::to_value(fixture()).expect("json");
    assert_eq!(from_yaml, from_json);
}

#[test]
fn each_agent_state_is_told_apart() {
    let f = fixture();
    let states: Vec<(&str, &str)> = f
        .agents
        .iter()
        .map(|a| (a.node.as_str(), a.state.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("izbp15inok0kbfkg3in52rz", "apply-failed"),
            ("izbp15inok0kbfkg3in52sz", "nacked"),
            ("izm5eb24dmjfimuaybpnqzz", "behind"),
            ("izm5eb24dmjfimuaybpnr0z", "ready"),
            ("izwz9dohcv74iegqecp4axz", "disconnected"),
        ]
    );
}
