//! `raven_hub::sources::kube::run` against the test-only fake API server:
//! real kube-rs watchers over HTTP, LIST then WATCH from the list's
//! resourceVersion, bookmarks, `410 Gone` → relist, and an API server outage
//! in the middle. The index is read directly; no pipeline, no gRPC.
//!
//! On the fake because these tests assert on the requests themselves (one
//! LIST per kind, the WATCH resuming from the listed resourceVersion, the
//! field selector and namespace of the raven-cfg watch) and inject what a
//! real server does not do on demand: BOOKMARKs every 100 ms, then history
//! compacted and every watch dropped at a chosen instant. Everything else
//! about the source — list, watch, 410 relist, outage — runs against the
//! real kube-apiserver in `kube_source`.

use std::time::Duration;

mod common;

use anyhow::{Context, Result};
use common::{Snapshot, Source, WAIT};
use raven_tests::fake_apiserver::{FakeApiServer, Options};
use raven_tests::objects::{gateway_of as gateway, node, raven_cfg};
use serde_json::json;

/// Two domains: gw-a (a1, a2) and gw-b (b1), raven-cfg with the tunnel on.
async fn cluster(options: Options) -> Result<FakeApiServer> {
    let api = FakeApiServer::start_with(options).await?;
    // Decoys the ConfigMap watch must not see.
    api.upsert("configmaps", raven_cfg("default", false));
    api.upsert(
        "configmaps",
        json!({"metadata": {"name": "coredns", "namespace": "kube-system"}, "data": {}}),
    );
    api.upsert("gateways", gateway("gw-a", &["a1", "a2"]));
    api.upsert("gateways", gateway("gw-b", &["b1"]));
    api.upsert("nodes", node("a1", "gw-a", "192.168.0.1", "10.244.1.0/24"));
    api.upsert("nodes", node("a2", "gw-a", "192.168.0.2", "10.244.2.0/24"));
    api.upsert("nodes", node("b1", "gw-b", "172.16.0.1", "10.244.3.0/24"));
    api.upsert("configmaps", raven_cfg("kube-system", true));
    Ok(api)
}

fn lists_of(api: &FakeApiServer, plural: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.is_list_of(plural))
        .count()
}

fn watches_of(api: &FakeApiServer, plural: &str) -> Vec<Option<String>> {
    api.requests()
        .iter()
        .filter(|r| r.is_watch_of(plural))
        .map(|r| r.resource_version().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn hub_index_fills_from_list_and_marks_synced() -> Result<()> {
    let api = cluster(Options::default()).await?;
    let source = Source::synced(api.client()).await?;
    source.assert_holds_the_two_domains();

    // Each kind was listed once, then watched from the list's version.
    tokio::time::timeout(WAIT, async {
        while ["gateways", "nodes", "configmaps"]
            .iter()
            .any(|k| watches_of(&api, k).is_empty())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("every kind watched after its list")?;
    let requests = api.requests();
    let cm_list = requests
        .iter()
        .find(|r| r.is_list_of("configmaps"))
        .context("raven-cfg listed")?;
    assert_eq!(cm_list.path, "/api/v1/namespaces/kube-system/configmaps");
    assert_eq!(
        cm_list.query.get("fieldSelector").map(String::as_str),
        Some("metadata.name=raven-cfg")
    );
    for plural in ["gateways", "nodes", "configmaps"] {
        assert_eq!(lists_of(&api, plural), 1, "{plural} listed once");
        let watches = watches_of(&api, plural);
        assert_eq!(
            watches[0].as_deref(),
            Some(api.resource_version().to_string().as_str()),
            "{plural} watched from the listed version"
        );
    }
    source.stop().await
}

#[tokio::test]
async fn bookmarks_are_accepted() -> Result<()> {
    let api = cluster(Options {
        bookmark_interval: Duration::from_millis(100),
    })
    .await?;
    let source = Source::synced(api.client()).await?;
    let listed = source.snapshot();

    // Writes no watcher of ours sees move the global version on; only
    // bookmarks carry it to the watchers.
    for i in 0..5 {
        api.upsert(
            "leases",
            json!({"metadata": {"name": format!("other-{i}"), "namespace": "kube-system"}, "spec": {}}),
        );
    }
    let moved_to = api.resource_version();
    tokio::time::timeout(WAIT, async {
        while ["gateways", "nodes", "configmaps"]
            .iter()
            .any(|k| !api.bookmarks(k).iter().any(|rv| *rv >= moved_to))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("bookmarks at the new version reach every watch")?;

    // History is compacted up to the new version and the watches break: a
    // watcher that took the bookmarks in resumes from `moved_to` (no 410, no
    // relist); one that ignored them would be sent back to LIST.
    let kinds = ["gateways", "nodes", "configmaps"];
    let watches_before: Vec<usize> = kinds.iter().map(|k| watches_of(&api, k).len()).collect();
    api.compact();
    api.drop_watches();
    tokio::time::timeout(WAIT, async {
        while kinds
            .iter()
            .zip(&watches_before)
            .any(|(k, before)| watches_of(&api, k).len() <= *before)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("every kind re-watched")?;

    for plural in ["gateways", "nodes", "configmaps"] {
        let last = watches_of(&api, plural)
            .last()
            .cloned()
            .flatten()
            .context("a watch")?;
        assert!(
            last.parse::<u64>()? >= moved_to,
            "{plural} resumed from the bookmark's version {moved_to}, not {last}"
        );
        assert_eq!(lists_of(&api, plural), 1, "{plural}: no relist");
    }
    assert_eq!(api.expired_watches(), 0);
    assert_eq!(source.snapshot(), listed);

    // Still watching.
    api.upsert("gateways", gateway("gw-b", &["b1", "b2"]));
    source
        .until("a change after the resume", |i| {
            Snapshot::of(i).gateways["gw-b"] == ["b1", "b2"]
        })
        .await?;
    source.stop().await
}
