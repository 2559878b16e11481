//! Resuming by digest (`CAPABILITY_INVENTORY_DIGEST`): an agent with a
//! complete cache sends the digest of its inventory instead of the list; a
//! match is answered with one empty Update, a mismatch with an
//! InventoryRequest, after which the agent lists what it holds and ends in
//! exactly the hub's view. Real hub, tonic over mTLS.

use std::time::Duration;

use raven_hub::hub::RunningHub;
use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::sync_response::Message as Resp;
use raven_proto::v1::{self};

#[allow(dead_code)]
mod support;

use support::*;

/// A Hello resuming by digest (`CAPABILITY_INVENTORY_DIGEST`), as
/// `raven-edge` sends it for a complete cache: the digest of `held`, no
/// list, `cache_complete` false.
fn digest_hello(
    node: &str,
    held: &[(String, String)],
    epoch: &str,
    revision: u64,
    compact: bool,
) -> v1::SyncRequest {
    let mut req = hello(node, &[], epoch, revision, false);
    if let Some(Req::Hello(h)) = &mut req.message {
        h.capabilities.push(v1::Capability::InventoryDigest as i32);
        if compact {
            h.capabilities
                .push(v1::Capability::CompactMemberView as i32);
        }
        h.inventory_digest =
            raven_proto::digest::Digest::of(held.iter().map(|(n, v)| (n.as_str(), v.as_str())))
                .to_bytes();
    }
    req
}

/// The next message that is not a heartbeat (an Update or an
/// InventoryRequest).
async fn answer(agent: &mut Agent) -> Resp {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), agent.rx.message())
            .await
            .expect("an answer within 10 s")
            .expect("the stream carries on")
            .and_then(|m| m.message)
            .expect("a message");
        if !matches!(msg, Resp::Heartbeat(_)) {
            return msg;
        }
    }
}

/// `node`'s first snapshot (full view, or compact), acknowledged; the
/// stream is closed.
async fn stored_snapshot(env: &Env, hub: &RunningHub, node: &str, compact: bool) -> v1::Update {
    let (agent, first) = if compact {
        first_compact_snapshot(env, hub, node).await
    } else {
        first_snapshot(env, hub, node).await
    };
    assert!(first.snapshot_complete, "one-part snapshot");
    agent.ack(&first).await;
    drop(agent);
    first
}

async fn open(env: &Env, hub: &RunningHub, node: &str, first: v1::SyncRequest) -> Agent {
    let mut client = env.client(hub, node).await;
    Agent::open(&mut client, first).await.expect("open")
}

fn update(answer: Resp) -> v1::Update {
    match answer {
        Resp::Update(u) => u,
        other => panic!("expected an Update, got {other:?}"),
    }
}

/// The Hello an agent sends when asked for its list: as `hello`, with the
/// digest capability.
fn listed_hello(node: &str, held: &[(String, String)], epoch: &str, revision: u64) -> Req {
    let mut req = hello(node, held, epoch, revision, true);
    let Some(Req::Hello(h)) = &mut req.message else {
        unreachable!()
    };
    h.capabilities.push(v1::Capability::InventoryDigest as i32);
    req.message.unwrap_or_else(|| unreachable!())
}

async fn published_after(hub: &RunningHub, revision: u64) {
    let mut rx = hub.published.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| p.revision > revision),
    )
    .await
    .expect("published within 10 s")
    .expect("hub running");
}

#[tokio::test]
async fn a_matching_digest_is_answered_with_one_empty_update_and_the_next_change_as_a_delta() {
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, HZ_MEMBER, false).await;
    let mut agent = open(
        &env,
        &hub,
        HZ_MEMBER,
        digest_hello(
            HZ_MEMBER,
            &inventory(&first),
            &first.epoch,
            first.revision,
            false,
        ),
    )
    .await;
    let u = update(answer(&mut agent).await);
    assert!(
        u.resources.is_empty() && u.removed.is_empty() && !u.snapshot,
        "resent {:?} removed {:?}",
        names(&u),
        u.removed
    );
    assert_eq!(
        (u.epoch.as_str(), u.revision),
        (first.epoch.as_str(), first.revision)
    );
    assert_eq!(
        (
            hub.metrics.digest_resumes(),
            hub.metrics.inventory_requests()
        ),
        (1, 0)
    );
    agent.ack(&u).await;
    // What the hub holds for the agent is its view: a change sends that
    // change alone.
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.40.0/24");
    let delta = agent.update().await.expect("delta");
    assert!(!delta.snapshot);
    assert_eq!(names(&delta), vec!["gateway/gw-qingdao"]);
    assert!(delta.removed.is_empty(), "{:?}", delta.removed);
    hub.stop().await;
}

#[tokio::test]
async fn the_digest_of_the_snapshot_an_agent_stored_equals_the_hubs_for_every_node_and_view_form() {
    let env = Env::new();
    let hub = env.hub().await;
    let mut resumed = 0;
    for node in ALL_NODES {
        for compact in [false, true] {
            let first = stored_snapshot(&env, &hub, node, compact).await;
            let mut agent = open(
                &env,
                &hub,
                node,
                digest_hello(
                    node,
                    &inventory(&first),
                    &first.epoch,
                    first.revision,
                    compact,
                ),
            )
            .await;
            let u = update(answer(&mut agent).await);
            assert!(
                u.resources.is_empty() && u.removed.is_empty(),
                "{node} compact={compact}: resent {:?}",
                names(&u)
            );
            resumed += 1;
            assert_eq!(
                hub.metrics.digest_resumes(),
                resumed,
                "{node} compact={compact}"
            );
        }
    }
    assert_eq!(hub.metrics.inventory_requests(), 0);
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_that_missed_a_change_is_asked_for_its_list_and_gets_only_the_change() {
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, HZ_MEMBER, false).await;
    env.edit("nodes.yaml", "10.244.4.0/24", "10.244.40.0/24");
    published_after(&hub, first.revision).await;
    let held = inventory(&first);
    let mut agent = open(
        &env,
        &hub,
        HZ_MEMBER,
        digest_hello(HZ_MEMBER, &held, &first.epoch, first.revision, false),
    )
    .await;
    assert!(
        matches!(answer(&mut agent).await, Resp::InventoryRequest(_)),
        "a stale digest is answered with an InventoryRequest"
    );
    agent
        .send(listed_hello(HZ_MEMBER, &held, &first.epoch, first.revision))
        .await;
    let u = agent.update().await.expect("delta");
    assert!(!u.snapshot, "a listed complete cache gets a delta");
    assert_eq!(names(&u), vec!["gateway/gw-qingdao"]);
    assert!(u.removed.is_empty());
    assert!(u.revision > first.revision);
    assert_eq!(
        (
            hub.metrics.digest_resumes(),
            hub.metrics.inventory_requests()
        ),
        (0, 1)
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_holding_a_resource_the_hub_does_not_have_ends_exactly_in_the_hubs_view() {
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, HZ_GW, false).await;
    let mut held = inventory(&first);
    held.push(("gateway/gw-gone".into(), "0123456789abcdef".into()));
    held.sort();
    let mut agent = open(
        &env,
        &hub,
        HZ_GW,
        digest_hello(HZ_GW, &held, &first.epoch, first.revision, false),
    )
    .await;
    assert!(matches!(
        answer(&mut agent).await,
        Resp::InventoryRequest(_)
    ));
    agent
        .send(listed_hello(HZ_GW, &held, &first.epoch, first.revision))
        .await;
    let u = agent.update().await.expect("delta");
    assert!(u.resources.is_empty(), "resent {:?}", names(&u));
    assert_eq!(u.removed, vec!["gateway/gw-gone"]);
    agent.ack(&u).await;
    drop(agent);
    // What the agent holds now is the view: its digest matches.
    let mut again = open(
        &env,
        &hub,
        HZ_GW,
        digest_hello(HZ_GW, &inventory(&first), &u.epoch, u.revision, false),
    )
    .await;
    let u = update(answer(&mut again).await);
    assert!(u.resources.is_empty() && u.removed.is_empty());
    assert_eq!(hub.metrics.digest_resumes(), 1);
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_resuming_by_digest_against_a_hub_that_ignores_it_gets_a_full_snapshot() {
    // A hub predating the digest decodes this Hello without field 9 (prost
    // skips it) and without the capability it does not know: an
    // incomplete cache listing nothing. This hub does the same with the
    // capability left out.
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, HZ_MEMBER, false).await;
    let mut req = digest_hello(
        HZ_MEMBER,
        &inventory(&first),
        &first.epoch,
        first.revision,
        false,
    );
    let Some(Req::Hello(h)) = &mut req.message else {
        unreachable!()
    };
    h.capabilities
        .retain(|c| *c != v1::Capability::InventoryDigest as i32);
    let mut agent = open(&env, &hub, HZ_MEMBER, req).await;
    let u = update(answer(&mut agent).await);
    assert!(u.snapshot && u.snapshot_complete, "{u:?}");
    // The whole view, so the agent garbage-collects anything else it holds.
    assert_eq!(inventory(&u), inventory(&first));
    assert_eq!(hub.metrics.digest_resumes(), 0);
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_listing_its_inventory_without_the_digest_capability_resumes_as_before() {
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, QD_MEMBER, false).await;
    let mut agent = open(
        &env,
        &hub,
        QD_MEMBER,
        hello(
            QD_MEMBER,
            &inventory(&first),
            &first.epoch,
            first.revision,
            true,
        ),
    )
    .await;
    let u = update(answer(&mut agent).await);
    assert!(u.resources.is_empty() && u.removed.is_empty() && !u.snapshot);
    assert_eq!(
        (
            hub.metrics.digest_resumes(),
            hub.metrics.inventory_requests()
        ),
        (0, 0)
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_inventory_request_must_be_answered_with_a_listing_hello_and_a_bad_digest_is_refused() {
    let env = Env::new();
    let hub = env.hub().await;
    let first = stored_snapshot(&env, &hub, HZ_MEMBER, false).await;
    let stale = vec![("settings".to_owned(), "0000000000000000".to_owned())];
    // Answered with an Ack, or with a digest again: refused.
    for reply in [
        Req::Ack(v1::Ack::default()),
        digest_hello(HZ_MEMBER, &stale, &first.epoch, first.revision, false)
            .message
            .unwrap_or_else(|| unreachable!()),
    ] {
        let mut agent = open(
            &env,
            &hub,
            HZ_MEMBER,
            digest_hello(HZ_MEMBER, &stale, &first.epoch, first.revision, false),
        )
        .await;
        assert!(matches!(
            answer(&mut agent).await,
            Resp::InventoryRequest(_)
        ));
        agent.send(reply).await;
        assert_eq!(agent.end().await, Some(tonic::Code::InvalidArgument));
    }
    // A digest of the wrong length.
    let mut req = digest_hello(HZ_MEMBER, &stale, &first.epoch, first.revision, false);
    let Some(Req::Hello(h)) = &mut req.message else {
        unreachable!()
    };
    h.inventory_digest.truncate(8);
    let mut client = env.client(&hub, HZ_MEMBER).await;
    let status = match Agent::open(&mut client, req).await {
        Err(s) => s,
        Ok(mut agent) => loop {
            match agent.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended cleanly"),
                Err(s) => break s,
            }
        },
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("inventory_digest"), "{status:?}");
    hub.stop().await;
}
