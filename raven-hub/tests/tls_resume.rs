//! TLS session resumption across a hub restart: the hub seals its session
//! tickets with a secret in its data directory, the agent keeps its mTLS
//! configuration (and the tickets) across sessions, so an agent that
//! reconnects to the restarted hub resumes its TLS session — and the hub
//! still knows it by the certificate of the handshake that made it.

use std::sync::Arc;
use std::time::Duration;

use raven_core::NodeName;
use raven_edge::hub_tls::{self, Sessions};
use raven_hub::hub::RunningHub;
use raven_proto::v1::sync_service_client::SyncServiceClient;

#[allow(dead_code)]
mod support;

use support::*;

fn agent_config(env: &Env, node: &str) -> Arc<rustls::ClientConfig> {
    let l = env.certs();
    let node = NodeName::new(node).expect("name");
    let read = |p: std::path::PathBuf| std::fs::read(p).expect("read");
    let (ca, cert, key) = (
        read(l.ca_cert()),
        read(l.node_cert(&node)),
        read(l.node_key(&node)),
    );
    let id = hub_tls::Identity {
        ca: &ca,
        cert: &cert,
        key: &key,
    };
    Arc::new(hub_tls::client_config(&id).expect("client config"))
}

/// One Sync stream as the agent opens it (its kept configuration): the
/// hub's first Update, which it sends only to a node it identified by a
/// certificate its CA signed.
async fn first_update(
    hub: &RunningHub,
    sessions: &Sessions,
    config: &Arc<rustls::ClientConfig>,
    node: &str,
) -> raven_proto::v1::Update {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let channel = hub_tls::channel(
        sessions,
        config.clone(),
        name,
        hub.grpc_addr.to_string(),
        Duration::from_secs(10),
    )
    .await
    .expect("channel");
    let mut client = SyncServiceClient::new(channel);
    let mut agent = Agent::open(&mut client, hello(node, &[], "", 0, false))
        .await
        .expect("stream");
    agent.update().await.expect("first update")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reconnecting_to_a_restarted_hub_resumes_its_tls_session_and_is_served_as_its_node()
 {
    let env = Env::new();
    let node = ALL_NODES[0];
    let (sessions, config) = (Sessions::default(), agent_config(&env, node));

    let hub = env.hub().await;
    let before = first_update(&hub, &sessions, &config, node).await;
    assert_eq!(
        sessions.handshakes(),
        (1, 0),
        "the first connection is a full handshake"
    );
    hub.stop().await;

    // A new process in the same data directory: a new port, a new rustls
    // configuration, the same ticket secret.
    let hub = env.hub().await;
    let after = first_update(&hub, &sessions, &config, node).await;
    assert_eq!(
        sessions.handshakes(),
        (1, 1),
        "the reconnect to the restarted hub resumed the TLS session"
    );
    // And the hub counts it so (`raven_hub_tls_handshakes_total`).
    assert_eq!(hub.metrics.tls_handshakes(), (0, 1));
    // The same node's view both times: the resumed session carried the
    // node's certificate, from which the hub takes its identity.
    assert_eq!(names(&after), names(&before));
    assert!(!names(&after).is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ticket_secret_a_restarted_hub_makes_a_full_handshake() {
    let env = Env::new();
    let node = ALL_NODES[0];
    let (sessions, config) = (Sessions::default(), agent_config(&env, node));
    let hub = env.hub().await;
    first_update(&hub, &sessions, &config, node).await;
    hub.stop().await;
    // The secret gone (a new data directory): the old tickets open nothing.
    std::fs::remove_file(env.dir.path().join("hub-data").join("tls-tickets.key"))
        .expect("the hub made its ticket secret");
    let hub = env.hub().await;
    first_update(&hub, &sessions, &config, node).await;
    assert_eq!(sessions.handshakes(), (2, 0));
    assert_eq!(hub.metrics.tls_handshakes(), (1, 0));
    hub.stop().await;
}
