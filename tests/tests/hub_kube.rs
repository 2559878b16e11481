//! The whole hub (`raven_hub::hub::start` with `Source::Kubernetes`) against
//! a real kube-apiserver (shared by this binary's tests, one at a time)
//! loaded with the OpenYurt user-manual example by kubectl: it serves once
//! synced, follows the watch, and its leader writes the elected Gateway
//! status back. Skipped without the server unless `RAVEN_REQUIRE_TOOLS=1`.

use std::path::Path;
use std::time::Duration;

mod common;

use anyhow::{Context, Result};
use kube::Api;
use raven_core::api::v1beta1::Gateway;
use raven_hub::hub::RunningHub;
use raven_tests::kube_apiserver::{self, KubeApiServer, repo_root};
use serde_json::Value;

use common::{WAIT, until};

/// The user manual's six nodes (created and status-patched, as a kubelet
/// would), `raven-cfg` and its three Gateways, by kubectl.
async fn load_example(server: &KubeApiServer) -> Result<()> {
    let dir = repo_root().join("deploy/examples/user-manual");
    let client = server.client().await?;
    let text = std::fs::read_to_string(dir.join("nodes.yaml"))?;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        let name = v["metadata"]["name"].as_str().context("node name")?;
        let gw = v["metadata"]["labels"]["raven.openyurt.io/gateway"]
            .as_str()
            .context("gateway label")?;
        let ip = v["status"]["addresses"][0]["address"]
            .as_str()
            .context("ip")?;
        let cidr = v["spec"]["podCIDR"].as_str().context("podCIDR")?;
        kube_apiserver::create_node(&client, name, gw, ip, cidr).await?;
    }
    for f in ["raven-cfg.yaml", "gateways.yaml"] {
        server.kubectl(&["apply", "-f", &dir.join(f).display().to_string()])?;
    }
    Ok(())
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    async fn hub(&self, kubeconfig: &Path, replica: &str) -> Result<RunningHub> {
        common::start_hub(kubeconfig, self.dir.path(), replica).await
    }
}

#[tokio::test]
async fn hub_serves_the_user_manual_cluster_from_the_api_server_and_follows_the_watch() -> Result<()>
{
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    load_example(&server).await?;
    let env = Env::new()?;
    let hub = env.hub(&server.kubeconfig(), "a").await?;
    until(&hub, "ready with three gateways", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await?;
    let before = hub.published.borrow().revision;
    assert!(
        before > 1,
        "revisions follow the API server's resourceVersion"
    );

    server.kubectl(&["delete", "gateway", "gw-qingdao"])?;
    until(&hub, "gw-qingdao removed", |p| {
        p.topology.gateways().count() == 2
    })
    .await?;
    assert!(hub.published.borrow().revision > before);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn leader_hub_writes_the_elected_status_and_a_second_replica_does_not() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    load_example(&server).await?;
    let env = Env::new()?;
    let client = server.client().await?;
    let gateways: Api<Gateway> = Api::all(client.clone());
    let a = env.hub(&server.kubeconfig(), "replica-a").await?;
    until(&a, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await?;
    let written = kube_apiserver::eventually(WAIT, || async {
        let Ok(list) = gateways.list(&Default::default()).await else {
            return false;
        };
        list.items.iter().all(|g| {
            g.status
                .as_ref()
                .is_some_and(|s| !s.active_endpoints.is_empty())
        })
    })
    .await;
    assert!(written, "every Gateway got a status");

    let gw = gateways.get("gw-hangzhou").await?;
    let status = gw.status.clone().unwrap_or_default();
    assert_eq!(
        status.active_endpoints.len(),
        2,
        "proxy and tunnel elected: {status:?}"
    );
    assert_eq!(
        status.active_endpoints[0].node_name,
        "izbp15inok0kbfkg3in52rz"
    );
    assert_eq!(status.nodes.len(), 2);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    let lease = leases.get("raven-hub").await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.starts_with("replica-a-"),
        "held by replica-a: {holder}"
    );

    // A second replica serves too, and writes nothing while replica-a leads:
    // no Gateway's resourceVersion moves.
    let versions = |list: &[Gateway]| -> Vec<Option<String>> {
        list.iter()
            .map(|g| g.metadata.resource_version.clone())
            .collect()
    };
    let before = versions(&gateways.list(&Default::default()).await?.items);
    let b = env.hub(&server.kubeconfig(), "replica-b").await?;
    until(&b, "ready", |p| p.ready).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = versions(&gateways.list(&Default::default()).await?.items);
    assert_eq!(before, after, "nothing changed, nothing written");
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// Stores a Gateway straight into etcd, bypassing the API server's
/// validation — as an object written through an older schema (a
/// v1alpha1 Gateway stored as v1beta1 without `type`) lies there.
fn store_in_etcd(server: &KubeApiServer, name: &str, object: &Value) -> Result<()> {
    server.etcdctl(&[
        "put",
        &format!("/registry/raven.openyurt.io/gateways/{name}"),
        &object.to_string(),
    ])?;
    Ok(())
}

#[tokio::test]
async fn gateway_stored_without_type_does_not_block_the_others_on_a_fresh_hub() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    load_example(&server).await?;
    store_in_etcd(
        &server,
        "gw-untyped",
        &serde_json::json!({
            "apiVersion": "raven.openyurt.io/v1beta1",
            "kind": "Gateway",
            "metadata": {
                "name": "gw-untyped",
                "uid": "7d6f1a34-0000-4000-8000-000000000001",
                "creationTimestamp": "2026-12-01T00:00:00Z",
            },
            "spec": {
                "endpoints": [{"nodeName": "izbp15inok0kbfkg3in52sz", "underNAT": true}],
            },
        }),
    )?;
    let stored = server.kubectl(&["get", "gateway", "gw-untyped", "-o", "json"])?;
    assert!(
        !stored.contains("\"type\""),
        "the API server serves it without type: {stored}"
    );

    // A hub started now lists all four: the three good ones are served.
    let env = Env::new()?;
    let hub = env.hub(&server.kubeconfig(), "a").await?;
    until(&hub, "ready with the three good gateways", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await?;
    let problems = hub.published.borrow().topology.problems.clone();
    let bad: Vec<_> = problems
        .iter()
        .filter(|p| p.object == "Gateway/gw-untyped")
        .collect();
    assert!(
        bad.iter().any(|p| p.message.contains("type")),
        "the undecodable Gateway is a problem naming the field: {problems:?}"
    );
    // And the leader tells kubectl users: a Warning Event on the object.
    let client = server.client().await?;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client);
    let warned = kube_apiserver::eventually(WAIT, || async {
        events.list(&Default::default()).await.is_ok_and(|l| {
            l.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.involved_object.name.as_deref() == Some("gw-untyped")
            })
        })
    })
    .await;
    assert!(warned, "a Warning Event on gw-untyped");
    hub.stop().await;
    Ok(())
}

/// The active endpoints of `name` as the API server holds them.
async fn active_of(gateways: &Api<Gateway>, name: &str) -> Vec<String> {
    gateways
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|g| g.status)
        .map(|s| {
            s.active_endpoints
                .into_iter()
                .map(|e| format!("{}:{}", e.type_, e.node_name))
                .collect()
        })
        .unwrap_or_default()
}

/// Bound of "status follows the object": the hub writes within a second;
/// this leaves room for a loaded CI machine, far below the 300 s resync the
/// writer once needed.
const FOLLOWS: Duration = Duration::from_secs(8);

#[tokio::test]
async fn status_follows_a_gateway_deleted_and_created_again_and_an_edit_by_someone_else()
-> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    load_example(&server).await?;
    let env = Env::new()?;
    let hub = env.hub(&server.kubeconfig(), "a").await?;
    let gateways: Api<Gateway> = Api::all(server.client().await?);
    let written = kube_apiserver::eventually(WAIT, || async {
        !active_of(&gateways, "gw-qingdao").await.is_empty()
    })
    .await;
    assert!(written, "gw-qingdao got its status");
    let elected = active_of(&gateways, "gw-qingdao").await;

    // Deleted and created again: a new object without status.
    server.kubectl(&["delete", "gateway", "gw-qingdao"])?;
    let manual = repo_root().join("deploy/examples/user-manual/gateways.yaml");
    server.kubectl(&["apply", "-f", &manual.display().to_string()])?;
    let rewritten = kube_apiserver::eventually(FOLLOWS, || async {
        active_of(&gateways, "gw-qingdao").await == elected
    })
    .await;
    assert!(
        rewritten,
        "the recreated gw-qingdao got its status back within {FOLLOWS:?}"
    );

    // Someone else clears the status: the leader writes it again.
    let hangzhou = active_of(&gateways, "gw-hangzhou").await;
    assert!(!hangzhou.is_empty());
    server.kubectl(&[
        "patch",
        "gateway",
        "gw-hangzhou",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"activeEndpoints":null}}"#,
    ])?;
    let restored = kube_apiserver::eventually(FOLLOWS, || async {
        active_of(&gateways, "gw-hangzhou").await == hangzhou
    })
    .await;
    assert!(
        restored,
        "the status someone else cleared was written again within {FOLLOWS:?}"
    );
    // Written by the hub's field manager.
    let managed = server.kubectl(&[
        "get",
        "gateway",
        "gw-hangzhou",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ])?;
    assert!(
        managed.split_whitespace().any(|m| m == "raven-hub"),
        "status written by field manager raven-hub: {managed}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn hub_serves_the_last_state_through_an_api_server_outage_and_follows_the_first_change_after_it()
-> Result<()> {
    let Some(server) = KubeApiServer::dedicated()? else {
        return Ok(());
    };
    load_example(&server).await?;
    let env = Env::new()?;
    let hub = env.hub(&server.kubeconfig(), "a").await?;
    until(&hub, "ready and fresh", |p| {
        p.ready && p.fresh && p.topology.gateways().count() == 3
    })
    .await?;

    server.kill_apiserver()?;
    until(&hub, "stale once the watches fail", |p| p.ready && !p.fresh).await?;
    // Long enough for any exponential backoff to reach its cap (the
    // watches' reconnect delay is capped at 1 s — proven on tokio's clock in
    // `sources::kube`; an uncapped 30 s backoff once kept the hub blind).
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(
        hub.published.borrow().ready,
        "still serving the last state during the outage"
    );
    server.start_apiserver()?;
    // /readyz answered: a change made now reaches the hub.
    let ready_at = tokio::time::Instant::now();
    server.kubectl(&["delete", "gateway", "gw-qingdao"])?;
    until(&hub, "fresh again with gw-qingdao gone", |p| {
        p.fresh && p.topology.gateways().count() == 2
    })
    .await?;
    // A figure, not a threshold: this machine's load decides it (CI once saw
    // 6.4 s, kubectl's own start and the new server's first requests included).
    eprintln!(
        "resumed {:?} after the API server was ready",
        ready_at.elapsed()
    );
    hub.stop().await;
    Ok(())
}
