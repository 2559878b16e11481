//! `raven_hub::sources::kube::run` against a real kube-apiserver: real
//! kube-rs watchers, LIST then WATCH, changes by the API, `410 Gone` after
//! etcd compaction → relist, and a network partition between the source and
//! the server. The index is read directly; no pipeline, no gRPC. Skipped
//! without the server unless `RAVEN_REQUIRE_TOOLS=1`.

use std::time::Duration;

mod common;

use anyhow::{Context, Result};
use common::{Snapshot, Source};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use raven_core::api::v1beta1::Gateway;
use raven_tests::kube_apiserver::{self, KubeApiServer, Partition};
use raven_tests::objects;
use serde_json::{Value, json};

fn gateway(name: &str, endpoints: &[&str]) -> Result<Gateway> {
    Ok(serde_json::from_value(objects::gateway_of(
        name, endpoints,
    ))?)
}

fn raven_cfg(namespace: &str, l3: bool) -> Result<ConfigMap> {
    Ok(serde_json::from_value(objects::raven_cfg(namespace, l3))?)
}

/// The cluster's objects, through the admin client.
struct Cluster {
    gateways: Api<Gateway>,
    nodes: Api<Node>,
    system: Api<ConfigMap>,
    default: Api<ConfigMap>,
}

impl Cluster {
    /// The cluster, [`Cluster::fill`]ed.
    async fn filled(server: &KubeApiServer) -> Result<Self> {
        let client = server.client().await?;
        let cluster = Self {
            gateways: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            system: Api::namespaced(client.clone(), "kube-system"),
            default: Api::namespaced(client, "default"),
        };
        cluster.fill(server).await?;
        Ok(cluster)
    }

    /// Two domains: gw-a (a1, a2) and gw-b (b1), raven-cfg with the tunnel
    /// on, and decoys the ConfigMap watch must not see.
    async fn fill(&self, server: &KubeApiServer) -> Result<()> {
        // Left over if an earlier test failed (the turn's wipe keeps it).
        self.clean().await?;
        let pp = PostParams::default();
        self.default
            .create(&pp, &raven_cfg("default", false)?)
            .await?;
        let coredns: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": "coredns-decoy", "namespace": "kube-system"}, "data": {}}),
        )?;
        self.system.create(&pp, &coredns).await?;
        self.add_gateway("gw-a", &["a1", "a2"]).await?;
        self.add_gateway("gw-b", &["b1"]).await?;
        let client = server.client().await?;
        for (n, gw, ip, cidr) in [
            ("a1", "gw-a", "192.168.0.1", "10.244.1.0/24"),
            ("a2", "gw-a", "192.168.0.2", "10.244.2.0/24"),
            ("b1", "gw-b", "172.16.0.1", "10.244.3.0/24"),
        ] {
            kube_apiserver::create_node(&client, n, gw, ip, cidr).await?;
        }
        self.system
            .create(&pp, &raven_cfg("kube-system", true)?)
            .await?;
        Ok(())
    }

    async fn clean(&self) -> Result<()> {
        let dp = DeleteParams::default();
        let _ = self.default.delete("raven-cfg", &dp).await;
        let _ = self.system.delete("coredns-decoy", &dp).await;
        Ok(())
    }

    async fn add_gateway(&self, name: &str, endpoints: &[&str]) -> Result<()> {
        let pp = PostParams::default();
        self.gateways
            .create(&pp, &gateway(name, endpoints)?)
            .await?;
        Ok(())
    }

    async fn delete_gateway(&self, name: &str) -> Result<()> {
        self.gateways.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    async fn set_endpoints(&self, name: &str, endpoints: &[&str]) -> Result<()> {
        let spec = serde_json::to_value(gateway(name, endpoints)?.spec)?;
        self.gateways
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await?;
        Ok(())
    }

    async fn set_pod_cidr(&self, name: &str, cidr: &str) -> Result<()> {
        // podCIDR is immutable once set: replace the node.
        let node = self.nodes.get(name).await?;
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let ip = node
            .status
            .and_then(|s| s.addresses)
            .and_then(|a| a.first().map(|a| a.address.clone()))
            .unwrap_or_default();
        self.nodes.delete(name, &DeleteParams::default()).await?;
        let gw = labels
            .get("raven.openyurt.io/gateway")
            .cloned()
            .unwrap_or_default();
        let client = self.nodes.clone().into_client();
        kube_apiserver::create_node(&client, name, &gw, &ip, cidr).await?;
        Ok(())
    }
}

/// The filled cluster and a source reading it, synced.
async fn synced(server: &KubeApiServer) -> Result<(Cluster, Source)> {
    let cluster = Cluster::filled(server).await?;
    let source = Source::synced(server.client().await?).await?;
    Ok((cluster, source))
}

/// The filled cluster, a [`Partition`] between it and the source, and the
/// source reading through it, synced.
async fn synced_behind_a_partition(server: &KubeApiServer) -> Result<(Cluster, Partition, Source)> {
    let cluster = Cluster::filled(server).await?;
    let partition = Partition::start(server).await?;
    let client = kube_apiserver::client_from_kubeconfig(&partition.kubeconfig(server)?).await?;
    let source = Source::synced(client).await?;
    Ok((cluster, partition, source))
}

#[tokio::test]
async fn hub_index_fills_from_list_and_marks_synced() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    let (cluster, source) = synced(&server).await?;
    assert!(source.assert_holds_the_two_domains().fresh);
    source.stop().await?;
    cluster.clean().await
}

#[tokio::test]
async fn gateway_change_is_applied_from_watch() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    let (cluster, source) = synced(&server).await?;

    cluster.set_endpoints("gw-a", &["a2", "a1"]).await?;
    source
        .until("gw-a endpoints reordered", |i| {
            Snapshot::of(i).gateways["gw-a"] == ["a2", "a1"]
        })
        .await?;

    let pp = PostParams::default();
    cluster.add_gateway("gw-c", &["c1"]).await?;
    cluster.delete_gateway("gw-b").await?;
    source
        .until("gw-c added and gw-b deleted", |i| {
            Snapshot::of(i).gateway_names() == ["gw-a", "gw-c"]
        })
        .await?;

    cluster.set_pod_cidr("a1", "10.244.9.0/24").await?;
    cluster.nodes.delete("b1", &DeleteParams::default()).await?;
    source
        .until("node changes", |i| {
            let s = Snapshot::of(i);
            s.nodes.get("a1").is_some_and(|c| c == &["10.244.9.0/24"])
                && !s.nodes.contains_key("b1")
        })
        .await?;

    cluster
        .system
        .replace("raven-cfg", &pp, &{
            let mut cm = cluster.system.get("raven-cfg").await?;
            cm.data = raven_cfg("kube-system", false)?.data;
            cm
        })
        .await?;
    source
        .until("tunnel switched off", |i| !Snapshot::of(i).l3)
        .await?;
    cluster
        .system
        .delete("raven-cfg", &DeleteParams::default())
        .await?;
    source
        .until("raven-cfg gone", |i| !Snapshot::of(i).config_present)
        .await?;
    source.stop().await?;
    cluster.clean().await
}

/// etcd's current revision (= the newest resourceVersion).
fn etcd_revision(server: &KubeApiServer) -> Result<u64> {
    let out = server.etcdctl(&["endpoint", "status", "-w", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["Status"]["header"]["revision"]
        .as_u64()
        .context("etcd revision")
}

#[tokio::test]
async fn expired_resource_version_410_triggers_relist_and_nothing_is_lost() -> Result<()> {
    // Without the watch cache, watches read etcd, so compaction makes a
    // resume from an older version a 410 — as after a long disconnection.
    let Some(server) = KubeApiServer::dedicated_with("--watch-cache=false")? else {
        return Ok(());
    };
    let (cluster, partition, source) = synced_behind_a_partition(&server).await?;
    let watched_from = etcd_revision(&server)?;

    // While the source is cut off, objects change and etcd compacts the
    // history: resuming from the old version gets 410, and only a relist
    // shows what happened — including the deletion.
    partition.cut();
    cluster.set_endpoints("gw-a", &["a2"]).await?;
    cluster.delete_gateway("gw-b").await?;
    cluster.add_gateway("gw-c", &["c1"]).await?;
    cluster.set_pod_cidr("a2", "10.244.20.0/24").await?;
    cluster
        .system
        .delete("raven-cfg", &DeleteParams::default())
        .await?;
    let now = etcd_revision(&server)?;
    assert!(now > watched_from);
    server.etcdctl(&["compact", &now.to_string()])?;
    // A watch from before the compaction is refused with 410 Expired.
    let client = server.client().await?;
    let old: Api<Gateway> = Api::all(client);
    let expired = old
        .watch(
            &kube::api::WatchParams::default(),
            &watched_from.to_string(),
        )
        .await;
    let mut expired = std::pin::pin!(expired?);
    let first = futures::StreamExt::next(&mut expired).await;
    assert!(
        matches!(&first, Some(Err(kube::Error::Api(s))) if s.code == 410)
            || matches!(&first, Some(Ok(kube::api::WatchEvent::Error(e))) if e.code == 410),
        "a watch from {watched_from} after compacting to {now} is 410: {first:?}"
    );
    partition.heal();

    source
        .until("the relisted state", |i| {
            let s = Snapshot::of(i);
            s.fresh
                && s.gateway_names() == ["gw-a", "gw-c"]
                && s.gateways["gw-a"] == ["a2"]
                && s.nodes.get("a2").is_some_and(|c| c == &["10.244.20.0/24"])
                && !s.config_present
        })
        .await?;

    // And it watches again from the new list.
    cluster.add_gateway("gw-d", &["d1"]).await?;
    source
        .until("watching after the relist", |i| {
            Snapshot::of(i).gateways.contains_key("gw-d")
        })
        .await?;
    source.stop().await
}

#[tokio::test]
async fn api_server_partition_keeps_last_state_marks_it_stale_and_resumes() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    let (cluster, partition, source) = synced_behind_a_partition(&server).await?;
    let before = source.snapshot();

    partition.cut();
    // The watches fail; the index keeps its state, marked stale.
    source
        .until("stale", |i| i.is_synced() && !i.is_fresh())
        .await?;
    assert_eq!(
        source.snapshot().content(),
        before.content(),
        "the last state is kept"
    );

    cluster.set_endpoints("gw-a", &["a1"]).await?;
    cluster.delete_gateway("gw-b").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        source.snapshot().content(),
        before.content(),
        "nothing is seen while cut off"
    );

    partition.heal();
    source
        .until("the changes made during the partition, fresh", |i| {
            let s = Snapshot::of(i);
            s.fresh && s.gateway_names() == ["gw-a"] && s.gateways["gw-a"] == ["a1"]
        })
        .await?;
    source.stop().await?;
    cluster.clean().await
}
