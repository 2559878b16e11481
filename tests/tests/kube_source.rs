//! raven-hub's Kubernetes path against the test-only fake API server: real
//! kube-rs watchers and clients over HTTP, LIST/WATCH with resourceVersion,
//! bookmarks, 410 Gone → relist, an outage in the middle, leader-only status
//! PATCH.

use std::time::Duration;

use raven_hub::grpc::TlsFiles;
use raven_hub::grpc::sync::SyncConfig;
use raven_hub::hub::{self, HubConfig, RunningHub, Source};
use raven_hub::pipeline::Debounce;
use raven_tests::fake_apiserver::FakeApiServer;
use serde_json::Value;

/// The user-manual example as JSON objects: (plural, object).
fn example() -> Vec<(&'static str, Value)> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    );
    let mut out = Vec::new();
    for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
        let text = std::fs::read_to_string(format!("{dir}/{f}")).expect("read example");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            let plural = match v["kind"].as_str() {
                Some("Gateway") => "gateways",
                Some("Node") => "nodes",
                _ => "configmaps",
            };
            out.push((plural, v));
        }
    }
    out
}

struct Env {
    api: FakeApiServer,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Self {
        let api = FakeApiServer::start().await.expect("fake API server");
        for (plural, obj) in example() {
            api.upsert(plural, obj);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).expect("kubeconfig");
        raven_hub::certs::generate(&dir.path().join("certs"), &["localhost".into()], &[])
            .expect("certs");
        Self { api, dir }
    }

    async fn hub(&self, replica: &str) -> RunningHub {
        let l = raven_hub::certs::Layout {
            dir: self.dir.path().join("certs"),
        };
        hub::start(HubConfig {
            source: Source::Kubernetes {
                kubeconfig: Some(self.dir.path().join("kubeconfig")),
            },
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            plaintext_addr: None,
            http_addr: None,
            tls: TlsFiles {
                cert: l.hub_cert(),
                key: l.hub_key(),
                client_ca: l.ca_cert(),
            },
            data_dir: Some(self.dir.path().join(format!("data-{replica}"))),
            sync: SyncConfig::default(),
            debounce: Debounce {
                quiet: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
            replica: replica.into(),
            epoch: Some("kubernetes".into()),
        })
        .await
        .expect("hub starts")
    }
}

/// Waits until the published topology satisfies `f`.
async fn until(hub: &RunningHub, what: &str, f: impl Fn(&raven_hub::pipeline::Published) -> bool) {
    let mut rx = hub.published.clone();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| f(p)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .expect("hub alive");
}

fn qingdao_subnets(p: &raven_hub::pipeline::Published) -> String {
    p.topology
        .gateways()
        .find(|g| g.name.as_str() == "gw-qingdao")
        .map(|g| {
            format!(
                "{:?}",
                g.members
                    .iter()
                    .flat_map(|m| m.subnets.clone())
                    .collect::<Vec<_>>()
            )
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn hub_index_fills_from_list_and_serves_once_synced() {
    let env = Env::new().await;
    let hub = env.hub("a").await;
    until(&hub, "ready with three gateways", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await;
    let p = hub.published.borrow().clone();
    assert_eq!(p.epoch, "kubernetes");
    assert!(
        p.revision > 1,
        "revision follows the API server's resourceVersion: {}",
        p.revision
    );
    hub.stop().await;
}

#[tokio::test]
async fn gateway_change_is_applied_from_the_watch() {
    let env = Env::new().await;
    let hub = env.hub("a").await;
    until(&hub, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await;
    let before = hub.published.borrow().revision;
    let mut node = env
        .api
        .get("nodes", "izm5eb24dmjfimuaybpnr0z")
        .expect("node");
    node["spec"]["podCIDR"] = "10.244.44.0/24".into();
    env.api.upsert("nodes", node);
    until(&hub, "new subnet", |p| {
        qingdao_subnets(p).contains("10.244.44.0/24")
    })
    .await;
    assert!(hub.published.borrow().revision > before);
    env.api.delete("gateways", "gw-qingdao");
    until(&hub, "gateway deleted", |p| {
        p.topology.gateways().count() == 2
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn expired_resource_version_410_triggers_relist_and_nothing_is_lost() {
    let env = Env::new().await;
    let hub = env.hub("a").await;
    until(&hub, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await;
    // History is compacted and the watches break: the re-watch from the old
    // version gets 410 and the watcher must relist to see the change.
    env.api.compact();
    let mut node = env
        .api
        .get("nodes", "izm5eb24dmjfimuaybpnr0z")
        .expect("node");
    node["spec"]["podCIDR"] = "10.244.45.0/24".into();
    env.api.upsert("nodes", node);
    env.api.compact();
    env.api.drop_watches();
    until(&hub, "relisted change", |p| {
        qingdao_subnets(p).contains("10.244.45.0/24")
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn api_server_outage_keeps_the_last_state_and_watching_resumes() {
    let mut env = Env::new().await;
    let hub = env.hub("a").await;
    until(&hub, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await;
    let served = hub.published.borrow().topology.clone();
    env.api.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let p = hub.published.borrow();
        assert!(p.ready, "still serving during the outage");
        assert_eq!(
            p.topology.resources, served.resources,
            "the last good state is kept"
        );
    }
    let mut node = env
        .api
        .get("nodes", "izm5eb24dmjfimuaybpnr0z")
        .expect("node");
    node["spec"]["podCIDR"] = "10.244.46.0/24".into();
    env.api.upsert("nodes", node);
    env.api.restart().await.expect("restart");
    until(&hub, "change made during the outage", |p| {
        qingdao_subnets(p).contains("10.244.46.0/24")
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn leader_patches_gateway_status_and_a_second_replica_does_not() {
    let env = Env::new().await;
    let a = env.hub("replica-a").await;
    until(&a, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.api.status_patches().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status patches: {:?}",
            env.api.status_patches()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gw = env.api.get("gateways", "gw-hangzhou").expect("gateway");
    let active = &gw["status"]["activeEndpoints"];
    assert_eq!(
        active.as_array().map(Vec::len),
        Some(2),
        "proxy and tunnel elected: {active}"
    );
    assert_eq!(active[0]["nodeName"], "izbp15inok0kbfkg3in52rz");
    assert_eq!(gw["status"]["nodes"].as_array().map(Vec::len), Some(2));
    let lease = env
        .api
        .get("leases", "kube-system/raven-hub")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // A second replica serves too but does not take the held lease.
    let b = env.hub("replica-b").await;
    until(&b, "ready", |p| p.ready).await;
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.api.client(), "kube-system");
    let cfg = raven_hub::status::LeaseConfig::new("replica-b");
    assert!(
        !raven_hub::status::try_lead(&api, &cfg)
            .await
            .expect("lease")
    );
    let patches = env.api.status_patches().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.api.status_patches().len(),
        patches,
        "nothing changed, nothing written"
    );
    b.stop().await;
    a.stop().await;
}
