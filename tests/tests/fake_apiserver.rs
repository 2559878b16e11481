//! The test-only fake API server keeps the API server's contract, checked
//! with an unmodified `kube::Client` (the fake is only worth what it keeps).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use raven_core::api::v1beta1::Gateway;
use raven_tests::fake_apiserver::{FakeApiServer, Options};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn node(name: &str, gateway: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "labels": {"raven.openyurt.io/gateway": gateway}}, "spec": {}})
}

fn gateway(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name}, "spec": {"tunnelConfig": {"Replicas": 1}, "proxyConfig": {"Replicas": 0}}})
}

/// The next watch event, bounded in time.
async fn next<K>(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> Result<WatchEvent<K>> {
    tokio::time::timeout(WAIT, stream.try_next())
        .await
        .context("no watch event in time")??
        .context("the watch ended")
}

#[tokio::test]
async fn list_pages_with_limit_and_continue_form_one_snapshot() -> Result<()> {
    let api = FakeApiServer::start().await?;
    for i in 0..5 {
        api.upsert("nodes", node(&format!("n{i}"), "gw"));
    }
    let nodes: Api<Node> = Api::all(api.client());
    let first = nodes.list(&ListParams::default().limit(2)).await?;
    assert_eq!(first.items.len(), 2);
    let token = first
        .metadata
        .continue_
        .clone()
        .context("a continue token")?;
    assert_eq!(first.metadata.remaining_item_count, Some(3));

    // A write between pages does not show in the rest of the list.
    api.upsert("nodes", node("n9", "gw"));
    api.delete("nodes", "n4");
    let mut names: Vec<String> = first.items.iter().map(|n| n.name_any()).collect();
    let mut token = Some(token);
    while let Some(t) = token {
        let page = nodes
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await?;
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|n| n.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
    }
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4"]);

    // A new list sees the writes.
    let any = nodes.list(&ListParams::default().match_any()).await?;
    let names: Vec<String> = any.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n9"]);

    // Once compacted, an old continue token is refused with 410.
    let again = nodes.list(&ListParams::default().limit(2)).await?;
    api.upsert("nodes", node("n10", "gw"));
    api.compact();
    let token = again.metadata.continue_.context("token")?;
    match nodes
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => bail!("expected 410 Expired, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn watch_replays_history_after_a_version_and_410s_once_compacted() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let gateways: Api<Gateway> = Api::all(api.client());
    api.upsert("gateways", gateway("gw-a"));
    let from = api.resource_version().to_string();
    api.upsert("gateways", gateway("gw-b"));
    api.delete("gateways", "gw-a");

    let mut w = gateways
        .watch(&WatchParams::default(), &from)
        .await?
        .boxed();
    match next(&mut w).await? {
        WatchEvent::Added(g) => assert_eq!(g.name_any(), "gw-b"),
        e => bail!("expected ADDED gw-b, got {e:?}"),
    }
    match next(&mut w).await? {
        WatchEvent::Deleted(g) => assert_eq!(g.name_any(), "gw-a"),
        e => bail!("expected DELETED gw-a, got {e:?}"),
    }
    // Then live events.
    let mut changed = gateway("gw-b");
    changed["spec"]["exposeType"] = json!("PublicIP");
    api.upsert("gateways", changed);
    match next(&mut w).await? {
        WatchEvent::Modified(g) => {
            assert_eq!(g.spec.expose_type, "PublicIP");
            assert_eq!(
                g.metadata.generation,
                Some(2),
                "spec change bumps generation"
            );
        }
        e => bail!("expected MODIFIED gw-b, got {e:?}"),
    }

    api.compact();
    let mut w = gateways
        .watch(&WatchParams::default(), &from)
        .await?
        .boxed();
    match next(&mut w).await? {
        WatchEvent::Error(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        e => bail!("expected a 410 ERROR event, got {e:?}"),
    }
    assert_eq!(api.expired_watches(), 1);
    Ok(())
}

#[tokio::test]
async fn watch_from_zero_starts_with_every_object_and_sends_bookmarks() -> Result<()> {
    let api = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(50),
    })
    .await?;
    api.upsert("nodes", node("a1", "gw-a"));
    api.upsert("nodes", node("b1", "gw-b"));
    let nodes: Api<Node> = Api::all(api.client());
    let params = WatchParams::default().labels("raven.openyurt.io/gateway=gw-a");
    let mut w = nodes.watch(&params, "0").await?.boxed();
    match next(&mut w).await? {
        WatchEvent::Added(n) => assert_eq!(n.name_any(), "a1"),
        e => bail!("expected ADDED a1, got {e:?}"),
    }
    // Leaving the selector reads as a deletion, entering it as an addition.
    api.upsert("nodes", node("a1", "gw-b"));
    api.upsert("nodes", node("b1", "gw-a"));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next(&mut w).await? {
            WatchEvent::Deleted(n) => seen.push(format!("deleted {}", n.name_any())),
            WatchEvent::Added(n) => seen.push(format!("added {}", n.name_any())),
            WatchEvent::Bookmark(_) => {}
            e => bail!("unexpected {e:?}"),
        }
    }
    assert_eq!(seen, ["deleted a1", "added b1"]);
    let current = api.resource_version().to_string();
    loop {
        if let WatchEvent::Bookmark(b) = next(&mut w).await? {
            assert_eq!(b.metadata.resource_version, current);
            break;
        }
    }
    Ok(())
}

#[tokio::test]
async fn field_selector_and_namespace_narrow_configmaps() -> Result<()> {
    let api = FakeApiServer::start().await?;
    for (ns, name) in [
        ("kube-system", "raven-cfg"),
        ("kube-system", "other"),
        ("default", "raven-cfg"),
    ] {
        api.upsert(
            "configmaps",
            json!({"metadata": {"name": name, "namespace": ns}, "data": {"ns": ns}}),
        );
    }
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "kube-system");
    let list = cms
        .list(&ListParams::default().fields("metadata.name=raven-cfg"))
        .await?;
    let keys: Vec<_> = list
        .items
        .iter()
        .map(|c| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()))
        .collect();
    assert_eq!(keys, ["kube-system/raven-cfg"]);
    match cms.list(&ListParams::default().fields("data.ns=x")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400),
        other => bail!("unsupported field selectors are refused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn status_subresource_writes_only_status_and_main_resource_keeps_it() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway("gw-a"));
    let gateways: Api<Gateway> = Api::all(api.client());

    let patch = json!({"spec": {"exposeType": "PublicIP"}, "status": {"activeEndpoints": [{"nodeName": "n1", "type": "tunnel"}]}});
    let after = gateways
        .patch_status("gw-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let status = after.status.context("status written")?;
    assert_eq!(status.active_endpoints[0].node_name, "n1");
    assert_eq!(
        after.spec.expose_type, "",
        "spec is not written through /status"
    );
    assert_eq!(api.status_patches().len(), 1);
    assert_eq!(api.status_patches()[0].body, patch);

    // Writing the main resource keeps the stored status.
    let mut gw = gateways.get("gw-a").await?;
    gw.spec.expose_type = "LoadBalancer".into();
    gw.status = None;
    let after = gateways
        .replace("gw-a", &PostParams::default(), &gw)
        .await?;
    assert_eq!(after.spec.expose_type, "LoadBalancer");
    assert!(after.status.is_some(), "status kept");

    // The same status again is no write: the resourceVersion stays.
    let rv = api.resource_version();
    gateways
        .patch_status("gw-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    assert_eq!(api.resource_version(), rv);

    match gateways
        .patch_status("gw-missing", &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => bail!("expected 404, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn lease_replace_with_a_stale_resource_version_is_a_conflict() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "raven-hub"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    match leases.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => bail!("expected AlreadyExists, got {other:?}"),
    }

    let mut mine = created.clone();
    mine.spec.get_or_insert_default().holder_identity = Some("b".into());
    leases
        .replace("raven-hub", &PostParams::default(), &mine)
        .await?;

    // `created` carries the old resourceVersion now.
    let mut stale = created;
    stale.spec.get_or_insert_default().holder_identity = Some("c".into());
    match leases
        .replace("raven-hub", &PostParams::default(), &stale)
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => bail!("expected Conflict, got {other:?}"),
    }
    let now = leases.get("raven-hub").await?;
    assert_eq!(
        now.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("b")
    );
    Ok(())
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_serves_the_same_state_on_the_same_port() -> Result<()>
{
    let mut api = FakeApiServer::start().await?;
    api.upsert("nodes", node("a1", "gw-a"));
    let url = api.url();
    let nodes: Api<Node> = Api::all(api.client());
    let mut w = nodes.watch(&WatchParams::default(), "0").await?.boxed();
    next(&mut w).await?;

    api.stop().await;
    // The open watch ends and new requests fail.
    let ended =
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = w.next().await {} }).await;
    assert!(ended.is_ok(), "the open watch ended");
    assert!(
        nodes.get("a1").await.is_err(),
        "requests fail during the outage"
    );

    api.restart().await?;
    assert_eq!(api.url(), url);
    assert_eq!(nodes.get("a1").await?.name_any(), "a1");
    Ok(())
}
