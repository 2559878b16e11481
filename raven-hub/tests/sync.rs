//! The Sync protocol against a real hub: tonic over mTLS on 127.0.0.1:0,
//! real client certificates, real manifest files.

use std::time::Duration;

use raven_core::NodeName;
use raven_hub::hub::{self, RunningHub};
use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::sync_response::Message as Resp;
use raven_proto::v1::{self, sync_service_client::SyncServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

mod support;

use support::*;

#[tokio::test]
async fn first_sync_sends_the_whole_view_as_a_completed_snapshot() {
    let env = Env::new();
    let hub = env.hub().await;
    let (_agent, u) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    assert!(u.snapshot && u.snapshot_complete);
    assert_eq!(
        names(&u),
        vec![
            "gateway/gw-cloud",
            "gateway/gw-hangzhou",
            "gateway/gw-qingdao",
            &format!("node/{HZ_MEMBER}"),
            "settings"
        ]
    );
    assert!(u.removed.is_empty());
    // Every resource decodes and its version matches its content.
    raven_proto::update_from_proto(&u).expect("valid update");
    hub.stop().await;
}

#[tokio::test]
async fn gateway_change_sends_only_what_changed() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&first).await;
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.40.0/24");
    let delta = agent.update().await.expect("delta");
    assert!(!delta.snapshot);
    assert_eq!(names(&delta), vec!["gateway/gw-qingdao"]);
    assert!(delta.revision > first.revision);
    assert_eq!(delta.epoch, first.epoch);
    hub.stop().await;
}

#[tokio::test]
async fn resume_with_current_versions_sends_nothing() {
    let env = Env::new();
    let hub = env.hub().await;
    let (agent, first) = first_snapshot(&env, &hub, QD_MEMBER).await;
    agent.ack(&first).await;
    drop(agent);
    let mut client = env.client(&hub, QD_MEMBER).await;
    let mut again = Agent::open(
        &mut client,
        hello(
            QD_MEMBER,
            &inventory(&first),
            &first.epoch,
            first.revision,
            true,
        ),
    )
    .await
    .expect("reopen");
    let u = again.update().await.expect("answer to hello");
    assert!(
        u.resources.is_empty() && u.removed.is_empty(),
        "resent {:?}",
        names(&u)
    );
    assert!(!u.snapshot, "a complete cache is answered with a delta");
    assert_eq!(
        (u.epoch.as_str(), u.revision),
        (first.epoch.as_str(), first.revision)
    );
    hub.stop().await;
}

#[tokio::test]
async fn resume_across_a_hub_restart_keeps_epoch_and_revision_and_sends_nothing() {
    let env = Env::new();
    let hub = env.hub().await;
    let (agent, first) = first_snapshot(&env, &hub, HZ_GW).await;
    agent.ack(&first).await;
    drop(agent);
    hub.stop().await;

    let hub = env.hub().await;
    let mut client = env.client(&hub, HZ_GW).await;
    let mut again = Agent::open(
        &mut client,
        hello(
            HZ_GW,
            &inventory(&first),
            &first.epoch,
            first.revision,
            true,
        ),
    )
    .await
    .expect("reopen");
    let u = again.update().await.expect("answer");
    assert_eq!(
        (u.epoch.as_str(), u.revision),
        (first.epoch.as_str(), first.revision)
    );
    assert!(u.resources.is_empty() && u.removed.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn nacked_content_is_not_resent_until_it_changes() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&first).await;
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.41.0/24");
    let delta = agent.update().await.expect("delta");
    agent.nack(&delta, "gateway/gw-qingdao").await;
    // An unrelated change arrives; the refused content does not come back.
    env.edit("nodes.yaml", "10.244.0.0/24", "10.244.50.0/24");
    let next = agent.update().await.expect("next delta");
    assert_eq!(names(&next), vec!["gateway/gw-cloud"]);
    agent.ack(&next).await;
    // Changing the refused resource sends it again.
    env.edit("nodes.yaml", "10.244.41.0/24", "10.244.42.0/24");
    let fixed = agent.update().await.expect("changed content");
    assert_eq!(names(&fixed), vec!["gateway/gw-qingdao"]);
    let agents = hub.agents.to_proto();
    let me = agents
        .iter()
        .find(|a| a.node_name == HZ_MEMBER)
        .expect("agent listed");
    assert_eq!(
        me.last_nack
            .as_ref()
            .and_then(|n| n.error.as_ref())
            .map(|e| e.message.as_str()),
        Some("refused by test")
    );
    hub.stop().await;
}

#[tokio::test]
async fn slow_agent_gets_the_latest_state_not_every_intermediate_one() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    // Not acknowledged yet: three changes pile up.
    for cidr in ["10.244.61.0/24", "10.244.62.0/24", "10.244.63.0/24"] {
        let before = hub.published.borrow().revision;
        let text = std::fs::read_to_string(env.manifests().join("nodes.yaml")).expect("read");
        let current = ["10.244.4.0/24", "10.244.61.0/24", "10.244.62.0/24"]
            .into_iter()
            .find(|c| text.contains(c))
            .expect("a qingdao cidr");
        env.edit("nodes.yaml", current, cidr);
        let mut rx = hub.published.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|p| p.revision > before),
        )
        .await
        .expect("recompiled")
        .expect("alive");
    }
    agent.no_update_within(Duration::from_millis(300)).await;
    agent.ack(&first).await;
    let u = agent.update().await.expect("one update");
    assert_eq!(u.revision, hub.published.borrow().revision);
    let gw = raven_proto::update_from_proto(&u).expect("valid").resources;
    let json = serde_json::to_string(&gw).expect("json");
    assert!(json.contains("10.244.63.0/24") && !json.contains("10.244.61.0/24"));
    hub.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn hub_makes_its_world_readable_tls_key_0600_at_start_and_serves() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let key = env.certs().hub_key();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let hub = env.hub().await;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Agents connect with the files of their bundle (nodes/<node>/).
    let (_agent, u) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    assert!(u.snapshot_complete);
    hub.stop().await;
}

#[tokio::test]
async fn a_node_cannot_claim_another_nodes_identity() {
    let env = Env::new();
    let hub = env.hub().await;
    let mut client = env.client(&hub, HZ_MEMBER).await;
    let mut agent = Agent::open(&mut client, hello(QD_MEMBER, &[], "", 0, false))
        .await
        .expect("open");
    let err = agent.update().await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    hub.stop().await;
}

#[tokio::test]
async fn node_views_differ_by_node_and_members_get_no_peer_keys() {
    let env = Env::new();
    let hub = env.hub().await;
    let (_agent, u) = first_snapshot(&env, &hub, QD_MEMBER).await;
    assert!(names(&u).contains(&format!("node/{QD_MEMBER}")));
    assert!(
        !names(&u)
            .iter()
            .any(|n| n.starts_with("node/") && !n.ends_with(QD_MEMBER))
    );
    assert!(!names(&u).iter().any(|n| n.starts_with("peer/")));
    hub.stop().await;
}

#[tokio::test]
async fn reported_public_key_reaches_other_gateways_as_a_peer_resource() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut gw, first) = first_snapshot(&env, &hub, HZ_GW).await;
    gw.ack(&first).await;
    let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    let report = v1::Report {
        wireguard_public_key: Some(key.into()),
        tunnel_port: Some(4500),
        ..Default::default()
    };
    gw.send(Req::Report(report)).await;
    let u = gw.update().await.expect("peer update");
    assert_eq!(names(&u), vec![format!("peer/{HZ_GW}")]);
    hub.stop().await;
}

#[tokio::test]
async fn reconnect_storm_is_admission_limited_with_a_retry_hint() {
    let env = Env::new();
    let hub = hub::start(env.config(1)).await.expect("hub");
    let mut a = env.client(&hub, HZ_GW).await;
    let mut b = env.client(&hub, HZ_MEMBER).await;
    let mut first = Agent::open(&mut a, hello(HZ_GW, &[], "", 0, false))
        .await
        .expect("first admitted");
    let _ = first.update().await.expect("snapshot in flight, not acked");
    let err = match Agent::open(&mut b, hello(HZ_MEMBER, &[], "", 0, false)).await {
        Err(e) => e,
        Ok(mut second) => second.update().await.expect_err("second refused"),
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(raven_proto::retry_after(&err).is_some());
    hub.stop().await;
}

#[tokio::test]
async fn plaintext_listener_refuses_sync_and_only_binds_loopback() {
    let env = Env::new();
    let hub = env.hub().await;
    let addr = hub.plaintext_addr.expect("plaintext listener");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = SyncServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(1);
    tx.send(hello(HZ_GW, &[], "", 0, false))
        .await
        .expect("send");
    let err = client
        .sync(ReceiverStream::new(rx))
        .await
        .expect_err("no Sync on plaintext");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    hub.stop().await;

    let mut cfg = env.config(4);
    cfg.plaintext_addr = Some("0.0.0.0:0".parse().expect("addr"));
    let err = hub::start(cfg).await.expect_err("refused");
    assert!(err.to_string().contains("not a loopback address"), "{err}");
}

#[tokio::test]
async fn reported_keys_survive_a_hub_restart() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut gw, first) = first_snapshot(&env, &hub, HZ_GW).await;
    gw.ack(&first).await;
    let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    let report = v1::Report {
        wireguard_public_key: Some(key.into()),
        ..Default::default()
    };
    gw.send(Req::Report(report)).await;
    let u = gw.update().await.expect("peer update");
    assert_eq!(names(&u), vec![format!("peer/{HZ_GW}")]);
    drop(gw);
    hub.stop().await;

    // A restarted hub still knows the key before the agent reports again.
    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    let p = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| p.ready))
        .await
        .expect("ready")
        .expect("alive")
        .clone();
    assert!(
        p.topology
            .resources
            .keys()
            .any(|n| n.as_str() == format!("peer/{HZ_GW}")),
        "peer resource lost on restart"
    );
    hub.stop().await;
}

fn tunnel_active(p: &raven_hub::pipeline::Published, gateway: &str) -> Option<String> {
    p.gateways
        .get(gateway)?
        .status
        .active_endpoints
        .iter()
        .find(|e| e.type_ == "tunnel")
        .map(|e| e.node_name.clone())
}

#[tokio::test]
async fn a_takeover_claim_is_adopted_while_its_agent_is_connected_and_the_election_keeps_it() {
    let env = Env::new();
    // hz's member becomes a second tunnel candidate (the first stays elected).
    env.edit(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---"
        ),
    );
    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    let wait = |rx: &mut raven_hub::pipeline::PublishedRx,
                what: &'static str,
                f: Box<dyn Fn(&raven_hub::pipeline::Published) -> bool>| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| f(p)))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("hub alive")
                .clone()
        }
    };
    let p = wait(
        &mut rx,
        "the first election",
        Box::new(|p| p.ready && tunnel_active(p, "gw-hangzhou").is_some()),
    )
    .await;
    assert_eq!(
        tunnel_active(&p, "gw-hangzhou").as_deref(),
        Some("izbp15inok0kbfkg3in52rz")
    );

    let (agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&first).await;
    let report = v1::Report {
        local_failover: vec![v1::LocalFailover {
            gateway: "gw-hangzhou".into(),
            active_node: HZ_MEMBER.into(),
        }],
        ..Default::default()
    };
    agent.send(Req::Report(report)).await;
    let p = wait(
        &mut rx,
        "the claim to be adopted",
        Box::new(|p| tunnel_active(p, "gw-hangzhou").as_deref() == Some(HZ_MEMBER)),
    )
    .await;
    assert!(
        p.topology
            .problems
            .iter()
            .any(|pr| pr.object == "Gateway/gw-hangzhou" && pr.value == HZ_MEMBER),
        "the adoption is recorded in the problems: {:?}",
        p.topology.problems
    );

    // The agent goes away: its claim is withdrawn, the election it caused stays.
    drop(agent);
    let p = wait(
        &mut rx,
        "the claim to be withdrawn",
        Box::new(|p| {
            !p.topology
                .problems
                .iter()
                .any(|pr| pr.field == "status.activeEndpoints")
        }),
    )
    .await;
    assert_eq!(tunnel_active(&p, "gw-hangzhou").as_deref(), Some(HZ_MEMBER));
    hub.stop().await;
}

#[tokio::test]
async fn a_stopping_hub_tells_its_agents_to_come_back_and_does_not_take_the_streams_it_closes_as_agents_leaving()
 {
    let env = Env::new();
    env.edit(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---"
        ),
    );
    let hub = env.hub().await;
    let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&first).await;
    agent
        .send(Req::Report(v1::Report {
            local_failover: vec![v1::LocalFailover {
                gateway: "gw-hangzhou".into(),
                active_node: HZ_MEMBER.into(),
            }],
            ..Default::default()
        }))
        .await;
    let mut rx = hub.published.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| tunnel_active(p, "gw-hangzhou").as_deref() == Some(HZ_MEMBER)),
    )
    .await
    .expect("the claim is adopted")
    .expect("hub alive");
    let revision = rx.borrow().revision;
    let (index, node) = (hub.index.clone(), NodeName::new(HZ_MEMBER).expect("name"));

    hub.stop().await;
    // The agent is told to come back (UNAVAILABLE, as from any stopping
    // server), ...
    assert_eq!(agent.end().await, Some(tonic::Code::Unavailable));
    // ... but the hub closing the stream itself is not the agent leaving:
    // its claim is not withdrawn, so the stopping hub compiles and
    // publishes nothing for it (a revision persisted on the way out would
    // make every agent's resume after the restart a delta).
    assert!(
        index.read(|i| i
            .report(&node)
            .is_some_and(|r| !r.local_failover.is_empty())),
        "the stopping hub withdrew the claim of an agent whose stream it closed"
    );
    assert_eq!(rx.borrow().revision, revision, "the stopping hub published");
}

/// hz's member becomes gw-hangzhou's second tunnel candidate; a hub with a
/// 1 s failover grace.
async fn two_candidate_hub(env: &Env) -> RunningHub {
    env.edit(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---"
        ),
    );
    let mut cfg = env.config(64);
    cfg.sync.failover_grace = Duration::from_secs(1);
    hub::start(cfg).await.expect("hub starts")
}

async fn report_dead(agent: &Agent, dead: &[&str]) {
    let report = v1::Report {
        dead_candidates: dead.iter().map(|d| (*d).to_owned()).collect(),
        ..Default::default()
    };
    agent.send(Req::Report(report)).await;
}

async fn elected_within(hub: &RunningHub, node: &str, within: Duration) -> Option<Duration> {
    let t = tokio::time::Instant::now();
    let mut rx = hub.published.clone();
    tokio::time::timeout(
        within,
        rx.wait_for(|p| tunnel_active(p, "gw-hangzhou").as_deref() == Some(node)),
    )
    .await
    .ok()
    .map(|_| t.elapsed())
}

#[tokio::test]
async fn a_gateway_whose_stream_is_gone_for_the_grace_and_whose_member_probes_it_dead_is_replaced()
{
    let env = Env::new();
    let hub = two_candidate_hub(&env).await;
    let gw = synced_agent(&env, &hub, HZ_GW).await;
    let member = synced_agent(&env, &hub, HZ_MEMBER).await;
    assert!(
        elected_within(&hub, HZ_GW, Duration::from_secs(5))
            .await
            .is_some()
    );

    // The member's probes say the gateway is dead, but its stream is up:
    // the hub keeps it.
    report_dead(&member, &[HZ_GW]).await;
    assert!(
        elected_within(&hub, HZ_MEMBER, Duration::from_millis(2500))
            .await
            .is_none(),
        "moved while the gateway's stream was up"
    );

    // The gateway's stream ends: after the grace (and no earlier) the hub
    // elects the member, the only other Ready candidate with a stream.
    drop(gw);
    let t = tokio::time::Instant::now();
    let after = elected_within(&hub, HZ_MEMBER, Duration::from_secs(10))
        .await
        .expect("the member elected after the grace");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "moved after {after:?}, within the 1 s grace"
    );
    let p = hub.published.borrow().clone();
    assert!(
        p.topology
            .problems
            .iter()
            .any(|pr| pr.object == "Gateway/gw-hangzhou"
                && pr.value == HZ_GW
                && pr.message.starts_with("proven dead")),
        "{:?}",
        p.topology.problems
    );

    // The old gateway comes back: the election keeps the member.
    let _gw = synced_agent(&env, &hub, HZ_GW).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        tunnel_active(&hub.published.borrow(), "gw-hangzhou").as_deref(),
        Some(HZ_MEMBER)
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_short_reconnect_of_the_gateway_or_a_probe_report_from_another_domain_never_moves_it() {
    let env = Env::new();
    let hub = two_candidate_hub(&env).await;
    let gw = synced_agent(&env, &hub, HZ_GW).await;
    let member = synced_agent(&env, &hub, HZ_MEMBER).await;
    let other = synced_agent(&env, &hub, QD_MEMBER).await;
    assert!(
        elected_within(&hub, HZ_GW, Duration::from_secs(5))
            .await
            .is_some()
    );
    // A qingdao node says hangzhou's gateway is dead: not its domain.
    report_dead(&other, &[HZ_GW]).await;
    // hz's own member says so too (a LAN blip), and the gateway's agent
    // restarts quickly (within the grace).
    report_dead(&member, &[HZ_GW]).await;
    drop(gw);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = synced_agent(&env, &hub, HZ_GW).await;
    assert!(
        elected_within(&hub, HZ_MEMBER, Duration::from_secs(3))
            .await
            .is_none(),
        "a short reconnect moved the gateway"
    );
    // The member's probes recover; the gateway's stream then ends for good:
    // only another domain still calls it dead, which does not count.
    report_dead(&member, &[]).await;
    drop(gw);
    assert!(
        elected_within(&hub, HZ_MEMBER, Duration::from_secs(3))
            .await
            .is_none(),
        "another domain's word moved the gateway"
    );
    hub.stop().await;
}

/// The key a published `peer/<node>` resource carries.
fn published_key(p: &raven_hub::pipeline::Published, node: &str) -> Option<String> {
    p.topology
        .resources
        .iter()
        .find_map(|(n, r)| match &r.body {
            raven_core::topology::ResourceBody::Peer(peer)
                if n.as_str() == format!("peer/{node}") =>
            {
                peer.wireguard_public_key.clone()
            }
            _ => None,
        })
}

async fn report_key(agent: &Agent, key: &str) {
    agent
        .tx
        .send(v1::SyncRequest {
            message: Some(Req::Report(v1::Report {
                wireguard_public_key: Some(key.into()),
                ..Default::default()
            })),
        })
        .await
        .expect("report");
}

/// Issue 11, finding 1: qingdao's gateway reports hangzhou's gateway's
/// WireGuard key as its own. The key stays hangzhou's, never reaches any agent
/// as qingdao's, the conflict is a problem naming both — also after a restart.
#[tokio::test]
async fn a_key_spoofed_by_another_gateway_is_refused_for_the_newcomer_and_reported() {
    const QD_GW: &str = "izm5eb24dmjfimuaybpnqzz";
    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    let env = Env::new();
    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    let hz = synced_agent(&env, &hub, HZ_GW).await;
    report_key(&hz, KEY).await;
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| published_key(p, HZ_GW).as_deref() == Some(KEY)),
    )
    .await
    .expect("hangzhou's key published")
    .expect("alive");
    let qd = synced_agent(&env, &hub, QD_GW).await;
    report_key(&qd, KEY).await;
    let p = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| {
            p.topology
                .problems
                .iter()
                .any(|x| x.object == format!("Node/{QD_GW}") && x.message.contains(HZ_GW))
        }),
    )
    .await
    .expect("the conflict is reported")
    .expect("alive")
    .clone();
    assert_eq!(published_key(&p, HZ_GW).as_deref(), Some(KEY));
    assert_eq!(published_key(&p, QD_GW), None, "never qingdao's");
    drop((hz, qd));
    hub.stop().await;

    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    let p = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| p.ready))
        .await
        .expect("ready")
        .expect("alive")
        .clone();
    assert_eq!(published_key(&p, HZ_GW).as_deref(), Some(KEY), "owner kept");
    assert_eq!(published_key(&p, QD_GW), None);
    hub.stop().await;
}

/// Issue 11, finding 2: a listed candidate claims a local failover while the
/// elected endpoint is connected and heartbeating. The claim is refused (and
/// reported); the election stays; when the claimant goes, so does the report.
#[tokio::test]
async fn a_takeover_claim_against_a_connected_elected_endpoint_is_refused() {
    let env = Env::new();
    env.edit(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---"
        ),
    );
    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    let gw = synced_agent(&env, &hub, HZ_GW).await;
    let claimant = synced_agent(&env, &hub, HZ_MEMBER).await;
    claimant
        .tx
        .send(v1::SyncRequest {
            message: Some(Req::Report(v1::Report {
                local_failover: vec![v1::LocalFailover {
                    gateway: "gw-hangzhou".into(),
                    active_node: HZ_MEMBER.into(),
                }],
                ..Default::default()
            })),
        })
        .await
        .expect("report");
    let refused = |p: &raven_hub::pipeline::Published| {
        p.topology
            .problems
            .iter()
            .any(|x| x.value == HZ_MEMBER && x.message.contains("refused"))
    };
    let p = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| refused(p)))
        .await
        .expect("the refusal is reported")
        .expect("alive")
        .clone();
    assert_eq!(tunnel_active(&p, "gw-hangzhou").as_deref(), Some(HZ_GW));
    // Nothing changes while both stay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        tunnel_active(&rx.borrow(), "gw-hangzhou").as_deref(),
        Some(HZ_GW)
    );
    drop(claimant);
    let p = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| !refused(p)))
        .await
        .expect("the claim ends with the claimant's stream")
        .expect("alive")
        .clone();
    assert_eq!(tunnel_active(&p, "gw-hangzhou").as_deref(), Some(HZ_GW));
    drop(gw);
    hub.stop().await;
}

/// A hub on `env` that has synced its sources.
async fn ready_hub(env: &Env) -> RunningHub {
    let hub = env.hub().await;
    let mut rx = hub.published.clone();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| p.ready))
        .await
        .expect("ready")
        .expect("alive");
    hub
}

/// Issue 11, finding 3: a node certificate reads its own view over mTLS and
/// nothing else — not the topology, not the agent table (every agent's
/// address), not another node's view.
#[tokio::test]
async fn a_node_certificate_may_inspect_only_its_own_view() {
    use raven_proto::v1::inspect_service_client::InspectServiceClient;
    let env = Env::new();
    let hub = ready_hub(&env).await;
    let channel = env.channel(&hub, HZ_GW).await;
    let mut inspect = InspectServiceClient::new(channel);
    let denied = |r: Result<_, tonic::Status>, what: &str| {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{what} allowed to a node"));
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e}");
    };
    denied(
        inspect
            .get_topology(v1::GetTopologyRequest::default())
            .await
            .map(drop),
        "GetTopology",
    );
    denied(
        inspect
            .list_agents(v1::ListAgentsRequest::default())
            .await
            .map(drop),
        "ListAgents",
    );
    denied(
        inspect
            .get_node_view(v1::GetNodeViewRequest {
                node_name: QD_MEMBER.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "another node's view",
    );
    let own = inspect
        .get_node_view(v1::GetNodeViewRequest {
            node_name: HZ_GW.into(),
            ..Default::default()
        })
        .await
        .expect("its own view");
    assert!(!own.into_inner().resources.is_empty());
    hub.stop().await;
}

/// Issue 11, finding 5: one node certificate opens many streams that send a
/// Hello and never ACK. They replace each other (one stream per node), so
/// they hold one admission permit, not all of them: another node gets in.
#[tokio::test]
async fn streams_from_one_node_certificate_replace_each_other_and_never_lock_others_out() {
    let env = Env::new();
    let hub = hub::start(env.config(4)).await.expect("hub");
    let mut a = env.client(&hub, HZ_GW).await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        let mut s = Agent::open(&mut a, hello(HZ_GW, &[], "", 0, false))
            .await
            .expect("opened");
        let _ = s.update().await.expect("a snapshot, never acked");
        streams.push(s);
    }
    // The older ones were ended by the newest.
    let mut oldest = streams.remove(0);
    assert_eq!(
        oldest.end().await,
        Some(tonic::Code::Aborted),
        "replaced by the newer stream"
    );
    let mut b = env.client(&hub, HZ_MEMBER).await;
    let mut other = Agent::open(&mut b, hello(HZ_MEMBER, &[], "", 0, false))
        .await
        .expect("another node is admitted");
    other.update().await.expect("and synced");
    hub.stop().await;
}

/// Issue 11, finding 5: a stream that never finishes its initial sync gives
/// its admission permit back after `admission_hold`.
#[tokio::test]
async fn an_admission_permit_comes_back_after_the_hold_even_if_the_stream_never_acks() {
    let env = Env::new();
    let mut config = env.config(1);
    config.sync.admission_hold = Duration::from_secs(1);
    let hub = hub::start(config).await.expect("hub");
    let mut a = env.client(&hub, HZ_GW).await;
    let mut hog = Agent::open(&mut a, hello(HZ_GW, &[], "", 0, false))
        .await
        .expect("admitted");
    let _ = hog.update().await.expect("snapshot, never acked");
    // It stays alive: heartbeats, never an ACK.
    let beats = hog.tx.clone();
    let beating = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        loop {
            interval.tick().await;
            let beat = v1::SyncRequest {
                message: Some(Req::Heartbeat(v1::Heartbeat::default())),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
        }
    });
    let mut b = env.client(&hub, HZ_MEMBER).await;
    let t = tokio::time::Instant::now();
    loop {
        let attempt = match Agent::open(&mut b, hello(HZ_MEMBER, &[], "", 0, false)).await {
            Ok(mut s) => s.update().await.map(drop),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(()) => break,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(t.elapsed() < Duration::from_secs(10), "never admitted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    beating.abort();
    drop(hog);
    hub.stop().await;
}

fn changed_report(i: u64) -> v1::Report {
    v1::Report {
        tunnel_port: Some(4500),
        peers: vec![v1::PeerTunnelState {
            peer_node: QD_MEMBER.into(),
            rx_bytes: i,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Issue 11, finding 7: one node floods changed Reports. Its Reports are
/// rate-limited and coalesced (the latest is applied), an oversized one ends
/// only its own stream, and another node's updates keep flowing — their
/// latency under the flood is printed next to the unloaded one.
#[tokio::test]
async fn a_report_flood_from_one_node_is_rate_limited_and_others_stay_prompt() {
    let env = Env::new();
    let hub = env.hub().await;
    let flooder = synced_agent(&env, &hub, HZ_GW).await;
    let mut other = synced_agent(&env, &hub, QD_MEMBER).await;
    // The flood: 2,000 changed Reports as fast as the stream takes them.
    let flood_start = tokio::time::Instant::now();
    let tx = flooder.tx.clone();
    let flood = tokio::spawn(async move {
        for i in 0..2_000 {
            let req = v1::SyncRequest {
                message: Some(Req::Report(changed_report(i))),
            };
            if tx.send(req).await.is_err() {
                return;
            }
        }
    });
    flood.await.expect("flood sent");
    // Meanwhile another node's update arrives promptly (printed, not
    // asserted: a figure).
    let t = tokio::time::Instant::now();
    env.edit(
        "gateways.yaml",
        "      port: 4500\n      type: tunnel\n---",
        &format!(
            "      port: 4500\n      type: tunnel\n    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n---"
        ),
    );
    let u = other
        .update()
        .await
        .expect("another node's update during the flood");
    other.ack(&u).await;
    eprintln!(
        "report flood (2,000 changed Reports at once): another node's update arrived {:?} after the edit",
        t.elapsed()
    );
    // Only a handful were applied: the rate is 4/s with a burst of 8.
    let applied_rx = |hub: &RunningHub| {
        hub.agents
            .get(&NodeName::new(HZ_GW).expect("name"))
            .and_then(|a| a.peers.first().map(|p| p.rx_bytes))
            .unwrap_or(0)
    };
    // Taken in: the burst (8) and four a second since, not 2,000.
    let taken = hub.metrics.reports_applied();
    let allowed = 8 + (4.0 * flood_start.elapsed().as_secs_f64()).ceil() as u64 + 1;
    assert!(
        taken <= allowed,
        "{taken} Reports taken in (at most {allowed}): not rate-limited"
    );
    // The latest is applied when the rate allows.
    let t = tokio::time::Instant::now();
    loop {
        let last = applied_rx(&hub);
        if last == 1_999 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the latest Report was lost ({last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 2.4 MB Report ends the flooder's stream, nobody else's.
    let mut big = changed_report(0);
    big.peers = (0..30_000)
        .map(|i| v1::PeerTunnelState {
            peer_node: format!("node-{i}"),
            endpoint: "203.0.113.1:4500".into(),
            ..Default::default()
        })
        .collect();
    let mut flooder = flooder;
    flooder.send(Req::Report(big)).await;
    assert_eq!(flooder.end().await, Some(tonic::Code::InvalidArgument));
    hub.stop().await;
}

/// Issue 11, finding 3: an operator certificate (`raven-hub certs
/// --operator`) inspects everything over mTLS.
#[tokio::test]
async fn an_operator_certificate_may_inspect_everything() {
    use raven_proto::v1::inspect_service_client::InspectServiceClient;
    let env = Env::new();
    let hub = ready_hub(&env).await;
    let mut inspect = InspectServiceClient::new(env.operator_channel(&hub).await);
    let topology = inspect
        .get_topology(v1::GetTopologyRequest::default())
        .await
        .expect("GetTopology");
    assert!(!topology.into_inner().resources.is_empty());
    inspect
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .expect("ListAgents");
    inspect
        .get_node_view(v1::GetNodeViewRequest {
            node_name: QD_MEMBER.into(),
            ..Default::default()
        })
        .await
        .expect("any node's view");
    hub.stop().await;
}

async fn published_until(
    hub: &RunningHub,
    what: &str,
    f: impl Fn(&raven_hub::pipeline::Published) -> bool,
) -> std::sync::Arc<raven_hub::pipeline::Published> {
    let mut rx = hub.published.clone();
    let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| f(p)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .expect("hub running");
    r.clone()
}

fn has_problem(p: &raven_hub::pipeline::Published, object: &str, what: &str) -> bool {
    p.topology
        .problems
        .iter()
        .any(|x| x.object == object && x.message.contains(what))
}

/// Acks every Update that arrives within `wait` and returns them.
async fn updates_within(agent: &mut Agent, wait: Duration) -> Vec<v1::Update> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, agent.rx.message()).await {
            Err(_) => return out,
            Ok(msg) => match msg.expect("stream").and_then(|m| m.message) {
                Some(Resp::Update(u)) => {
                    agent.ack(&u).await;
                    out.push(u);
                }
                Some(Resp::Heartbeat(_)) => {}
                Some(Resp::InventoryRequest(_)) => panic!("an InventoryRequest to a listing agent"),
                None => panic!("stream ended"),
            },
        }
    }
}

#[tokio::test]
async fn a_file_replaced_by_a_directory_a_fifo_and_dev_zero_change_nothing_and_the_hub_keeps_serving()
 {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&first).await;
    let dir = env.manifests();
    std::fs::remove_file(dir.join("gateways.yaml")).expect("rm");
    std::fs::create_dir(dir.join("gateways.yaml")).expect("mkdir");
    let ok = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo.yaml"))
        .status()
        .expect("mkfifo")
        .success();
    assert!(ok);
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.yaml")).expect("symlink");
    let p = published_until(&hub, "the three files reported", |p| {
        has_problem(p, "gateways.yaml", "a directory")
            && has_problem(p, "fifo.yaml", "a FIFO")
            && has_problem(p, "zero.yaml", "a character device")
    })
    .await;
    assert_eq!(p.topology.gateways().count(), 3, "last good gateways kept");
    assert!(
        has_problem(&p, "gateways.yaml", "last good version"),
        "{:?}",
        p.topology.problems
    );
    // Nothing the agent holds changed, and the hub still answers a new agent.
    agent.no_update_within(Duration::from_millis(800)).await;
    let (_second, u) = first_snapshot(&env, &hub, QD_MEMBER).await;
    assert!(names(&u).contains(&"gateway/gw-hangzhou".to_owned()));
    hub.stop().await;
}

#[tokio::test]
async fn deleting_most_of_a_nodes_view_is_held_back_unless_the_operator_confirms_it() {
    for confirm in [false, true] {
        let env = Env::new();
        let mut config = env.config(64);
        config.sync.confirm_mass_removal = confirm;
        let hub = hub::start(config).await.expect("hub starts");
        let (mut agent, first) = first_snapshot(&env, &hub, HZ_MEMBER).await;
        assert_eq!(first.resources.len(), 5);
        agent.ack(&first).await;
        // A deliberate deletion of the file holding every Gateway: three of
        // the node's five resources would go.
        std::fs::remove_file(env.manifests().join("gateways.yaml")).expect("rm");
        published_until(&hub, "gateways gone", |p| {
            p.topology.gateways().count() == 0
        })
        .await;
        let updates = updates_within(&mut agent, Duration::from_millis(1500)).await;
        let removed: Vec<&String> = updates.iter().flat_map(|u| &u.removed).collect();
        if confirm {
            assert_eq!(removed.len(), 3, "{updates:?}");
            assert!(
                updates
                    .iter()
                    .all(|u| u.removed.is_empty() || u.intentional_removal)
            );
        } else {
            assert!(removed.is_empty(), "mass removal sent: {updates:?}");
            assert!(
                updates.iter().all(|u| !u.intentional_removal),
                "{updates:?}"
            );
        }
        hub.stop().await;
    }
}

#[tokio::test]
async fn a_newcomer_never_takes_an_existing_gateways_name_or_subnet_whatever_its_file_or_name() {
    let env = Env::new();
    let hub = env.hub().await;
    let hz_subnets = |p: &raven_hub::pipeline::Published| -> Vec<String> {
        p.gateways
            .values()
            .find(|g| g.name.as_str() == "gw-hangzhou")
            .map(|g| {
                g.status
                    .nodes
                    .iter()
                    .filter(|n| n.node_name == HZ_MEMBER)
                    .flat_map(|n| n.subnets.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = published_until(&hub, "ready", |p| p.ready).await;
    assert_eq!(hz_subnets(&before), ["10.244.2.0/24"]);
    let tunnel_port = |p: &raven_hub::pipeline::Published| {
        p.gateways
            .values()
            .find(|g| g.name.as_str() == "gw-hangzhou")
            .and_then(|g| {
                g.gateway
                    .spec
                    .endpoints
                    .iter()
                    .find(|e| e.type_ == "tunnel")
                    .map(|e| e.port)
            })
    };
    assert_eq!(tunnel_port(&before), Some(4500));
    // A file sorting first holds a second gw-hangzhou and a new gateway
    // whose name sorts first and whose node claims gw-hangzhou's subnet.
    std::fs::write(
        env.manifests().join("0-new.yaml"),
        r#"apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-hangzhou}
spec:
  endpoints: [{nodeName: izbp15inok0kbfkg3in52rz, type: tunnel, port: 4999, underNAT: true}]
---
apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata: {name: gw-a-new}
spec:
  endpoints: [{nodeName: newnode, type: tunnel, publicIP: 192.0.2.99}]
---
apiVersion: v1
kind: Node
metadata: {name: newnode, labels: {raven.openyurt.io/gateway: gw-a-new}}
spec: {podCIDR: 10.244.2.0/24}
status:
  conditions: [{type: Ready, status: "True"}]
  addresses: [{type: InternalIP, address: 172.16.9.1}]
"#,
    )
    .expect("write");
    let p = published_until(&hub, "the newcomers reported", |p| {
        p.gateways.values().any(|g| g.name.as_str() == "gw-a-new")
            && has_problem(p, "Gateway/gw-hangzhou (0-new.yaml#1)", "already defined")
    })
    .await;
    assert_eq!(tunnel_port(&p), Some(4500), "the served gw-hangzhou stays");
    assert_eq!(
        hz_subnets(&p),
        ["10.244.2.0/24"],
        "{:?}",
        p.topology.problems
    );
    assert!(
        has_problem(&p, "Gateway/gw-a-new", "served it first"),
        "{:?}",
        p.topology.problems
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_gateway_with_100000_endpoints_is_refused_and_parsing_it_never_stalls_the_hub() {
    let env = Env::new();
    let hub = env.hub().await;
    published_until(&hub, "ready", |p| p.ready).await;
    let endpoints: String = (0..100_000)
        .map(|i| format!("    - {{nodeName: n{i}, type: tunnel}}\n"))
        .collect();
    std::fs::write(
        env.manifests().join("big.yaml"),
        format!(
            "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw-big}}\nspec:\n  endpoints:\n{endpoints}"
        ),
    )
    .expect("write");
    // The hub notices the file at once (inotify) and parses it on the
    // blocking pool: seconds for 100,000 endpoints in a debug build. An
    // agent that dials while that parse runs is served from the last good
    // topology, so its snapshot arrives before the big gateway is refused;
    // a parse on the runtime would hold the snapshot back until after it.
    // Ordering, not a wall-clock bound: both sides slow down together on a
    // loaded machine.
    let refused = |p: &raven_hub::pipeline::Published| {
        has_problem(p, "Gateway/gw-big (big.yaml#1)", "--manifest-max-endpoints")
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !refused(&hub.published.borrow()),
        "the parse of 100,000 endpoints ended before the agent dialled: nothing is proved"
    );
    let mut client = env.client(&hub, HZ_MEMBER).await;
    let mut agent = Agent::open(&mut client, hello(HZ_MEMBER, &[], "", 0, false))
        .await
        .expect("open");
    agent.update().await.expect("snapshot");
    assert!(
        !refused(&hub.published.borrow()),
        "the snapshot came only after the 100,000-endpoint file was parsed"
    );
    // The parse itself takes 8-25 s in a debug build on a loaded 2-core
    // machine (one parse: the file is parsed once, then kept): wait for it
    // longer than the usual 10 s; what is proved is the order above.
    let mut rx = hub.published.clone();
    let p = tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|p| refused(p)))
        .await
        .expect("the big gateway refused within 120 s")
        .expect("hub running")
        .clone();
    assert_eq!(p.topology.gateways().count(), 3);
    hub.stop().await;
}

/// Issue 11, finding 6: idle connections that never finish a TLS handshake
/// cannot use up the hub. Over the connection limit they are closed at once,
/// under it they are dropped after the handshake timeout, and a real agent
/// gets in.
#[tokio::test]
async fn idle_connections_are_bounded_and_dropped_and_an_agent_still_gets_in() {
    use tokio::io::AsyncReadExt;
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_connections = 8;
    config.sync.tls_handshake_timeout = Duration::from_secs(1);
    let hub = hub::start(config).await.expect("hub");
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(
            tokio::net::TcpStream::connect(hub.grpc_addr)
                .await
                .expect("tcp connect"),
        );
    }
    // Every idle connection is closed by the hub: at once over the limit,
    // after the handshake timeout under it.
    for (i, c) in idle.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "idle connection {i} still open: {r:?}"
        );
    }
    assert!(
        hub.metrics.connections_refused() > 0,
        "the limit was never hit"
    );
    // Meanwhile (and after) an agent connects and syncs.
    let mut agent = synced_agent(&env, &hub, HZ_GW).await;
    agent.no_update_within(Duration::from_millis(100)).await;
    drop(idle);
    hub.stop().await;
}

/// Admission before TLS: with every handshake slot held by a silent
/// connection, an agent's connection waits in the hub's queue and its
/// handshake does not even start; the moment a slot frees, it is handshaken
/// and syncs.
#[tokio::test]
async fn handshakes_beyond_the_limit_wait_their_turn_and_run_once_a_slot_frees() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_tls_handshakes = 2;
    config.sync.tls_handshake_timeout = Duration::from_secs(60);
    let hub = hub::start(config).await.expect("hub");
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tokio::net::TcpStream::connect(hub.grpc_addr)
                .await
                .expect("tcp connect"),
        );
    }
    {
        let agent = {
            let (env, hub) = (&env, &hub);
            async move { synced_agent(env, hub, HZ_GW).await }
        };
        tokio::pin!(agent);
        // Both slots are held for up to a minute: the agent gets nowhere.
        assert!(
            tokio::time::timeout(Duration::from_secs(2), &mut agent)
                .await
                .is_err(),
            "an agent got in while every handshake slot was held"
        );
        // One silent connection closes: its handshake ends, the agent's runs.
        drop(silent.pop());
        let mut agent: Agent = tokio::time::timeout(Duration::from_secs(20), agent)
            .await
            .expect("the agent got in once a slot freed");
        agent.no_update_within(Duration::from_millis(100)).await;
        drop((silent, agent));
    }
    hub.stop().await;
}

/// A report that changes only `peer/` resources (which members never see)
/// sends a member nothing; the next change it does see brings only that
/// resource. (The session plans from the change's names once it is in sync
/// with the revision before it, including a revision it was sent nothing
/// for.)
#[tokio::test]
async fn after_a_change_outside_its_view_a_member_gets_only_what_the_next_change_touches() {
    let env = Env::new();
    let hub = env.hub().await;
    let gw = synced_agent(&env, &hub, HZ_GW).await;
    let mut member = synced_agent(&env, &hub, HZ_MEMBER).await;
    let mut rx = hub.published.clone();
    let before = rx.borrow().revision;
    report_key(&gw, "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=").await;
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| p.revision > before),
    )
    .await
    .expect("the key makes a new revision")
    .expect("published");
    member.no_update_within(Duration::from_millis(500)).await;
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.40.0/24");
    let u = member.update().await.expect("delta");
    assert!(!u.snapshot);
    assert_eq!(names(&u), vec!["gateway/gw-qingdao"]);
    assert!(u.removed.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn a_compact_member_gets_its_gateway_and_the_others_prefixes_and_a_one_node_change_as_one_prefixes_resource()
 {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut member, first) = first_compact_snapshot(&env, &hub, HZ_MEMBER).await;
    assert!(first.snapshot && first.snapshot_complete);
    assert_eq!(
        names(&first),
        vec![
            "gateway/gw-hangzhou",
            &format!("node/{HZ_MEMBER}"),
            "prefixes/gw-cloud",
            "prefixes/gw-qingdao",
            "settings"
        ]
    );
    raven_proto::update_from_proto(&first).expect("valid update");
    member.ack(&first).await;
    // The gateway of its own domain takes the full view all the same.
    let (_gw, gw_first) = first_compact_snapshot(&env, &hub, HZ_GW).await;
    assert!(names(&gw_first).contains(&"gateway/gw-qingdao".to_owned()));
    assert!(!names(&gw_first).iter().any(|n| n.starts_with("prefixes/")));
    // A qingdao member's pod subnet moves: one prefixes resource.
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.40.0/24");
    let delta = member.update().await.expect("delta");
    assert_eq!(names(&delta), vec!["prefixes/gw-qingdao"]);
    assert!(delta.removed.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn a_member_that_becomes_a_tunnel_candidate_gets_the_full_view_and_back() {
    let env = Env::new();
    let hub = env.hub().await;
    let (mut member, first) = first_compact_snapshot(&env, &hub, HZ_MEMBER).await;
    member.ack(&first).await;
    let hz_tunnel = format!(
        "    - nodeName: {HZ_GW}\n      underNAT: true\n      port: 4500\n      type: tunnel\n"
    );
    let both = format!(
        "{hz_tunnel}    - nodeName: {HZ_MEMBER}\n      underNAT: true\n      port: 4500\n      type: tunnel\n"
    );
    // Listed as a tunnel endpoint of its gateway: it may carry the tunnel
    // by local failover, so it gets every gateway (and the peers), and
    // the prefixes go — a trade of form the hub marks intentional and the
    // agent's guard does not count as a removal.
    env.edit("gateways.yaml", &hz_tunnel, &both);
    let u = member.update().await.expect("the full view");
    let got = names(&u);
    for want in ["gateway/gw-cloud", "gateway/gw-qingdao"] {
        assert!(got.contains(&want.to_owned()), "{want} missing: {got:?}");
    }
    assert!(got.contains(&format!("node/{HZ_MEMBER}")), "{got:?}");
    let mut removed = u.removed.clone();
    removed.sort();
    assert_eq!(removed, vec!["prefixes/gw-cloud", "prefixes/gw-qingdao"]);
    assert!(u.intentional_removal, "{u:?}");
    let decoded = raven_proto::update_from_proto(&u).expect("valid update");
    let me = decoded.resources.iter().find_map(|(_, r)| match &r.body {
        raven_core::ResourceBody::Node(n) => Some(n.clone()),
        _ => None,
    });
    assert!(me.is_some_and(|n| n.tunnel_candidate));
    member.ack(&u).await;
    // No longer listed: back to the compact view.
    env.edit("gateways.yaml", &both, &hz_tunnel);
    let back = member.update().await.expect("the compact view");
    // Its own gateway changed too (one candidate fewer).
    assert_eq!(
        names(&back),
        vec![
            "gateway/gw-hangzhou",
            &format!("node/{HZ_MEMBER}"),
            "prefixes/gw-cloud",
            "prefixes/gw-qingdao"
        ]
    );
    let mut removed = back.removed.clone();
    removed.sort();
    assert_eq!(removed, vec!["gateway/gw-cloud", "gateway/gw-qingdao"]);
    assert!(back.intentional_removal);
    hub.stop().await;
}

/// The Applied resource list is deprecated: an older agent that still sends
/// it has it dropped, so the hub keeps only the summary per agent.
#[tokio::test]
async fn an_applied_with_a_resource_list_is_kept_without_it() {
    let env = Env::new();
    let hub = env.hub().await;
    let (agent, u) = first_snapshot(&env, &hub, HZ_MEMBER).await;
    agent.ack(&u).await;
    #[allow(deprecated)]
    let applied = v1::Applied {
        epoch: u.epoch.clone(),
        revision: u.revision,
        success: true,
        resources: u
            .resources
            .iter()
            .map(|r| v1::ResourceVersion {
                name: r.name.clone(),
                version: r.version.clone(),
            })
            .collect(),
        summary: Some(v1::ApplySummary {
            routes: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    agent.send(Req::Applied(applied)).await;
    let node = NodeName::new(HZ_MEMBER).expect("name");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let kept = loop {
        if let Some(a) = hub.agents.get(&node).and_then(|e| e.applied) {
            break a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Applied recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((kept.revision, kept.success), (u.revision, true));
    assert_eq!(kept.summary.map(|s| s.routes), Some(3));
    #[allow(deprecated)]
    let listed = kept.resources.len();
    assert_eq!(listed, 0, "the resource list is not kept");
    hub.stop().await;
}

/// `stop()` ends every Sync session (UNAVAILABLE) and returns only after
/// they ended: the agent table says disconnected by then.
#[tokio::test]
async fn stop_ends_every_sync_session_and_waits_for_them() {
    let env = Env::new();
    let hub = env.hub().await;
    let mut agents = Vec::new();
    for node in [HZ_GW, HZ_MEMBER, QD_MEMBER] {
        agents.push(synced_agent(&env, &hub, node).await);
    }
    let table = hub.agents.clone();
    assert_eq!(table.connected_count(), 3);
    tokio::time::timeout(Duration::from_secs(10), hub.stop())
        .await
        .expect("stop returns");
    assert_eq!(
        table.connected_count(),
        0,
        "sessions still running after stop()"
    );
    for mut a in agents {
        let code = tokio::time::timeout(Duration::from_secs(10), a.end())
            .await
            .expect("the stream ends");
        assert!(
            matches!(code, Some(tonic::Code::Unavailable) | None),
            "ended with {code:?}"
        );
    }
}
