//! The whole hub (`raven_hub::hub::start` with `Source::Kubernetes`) against
//! the test-only fake API server loaded with the OpenYurt user-manual
//! example: it serves once synced, follows the watch, and its leader writes
//! the elected Gateway status back.

use std::time::Duration;

use anyhow::{Context, Result};
use raven_hub::grpc::TlsFiles;
use raven_hub::grpc::sync::SyncConfig;
use raven_hub::hub::{self, HubConfig, RunningHub, Source};
use raven_hub::pipeline::{Debounce, Published};
use raven_tests::fake_apiserver::FakeApiServer;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The user-manual example as (kind, object).
fn example() -> Result<Vec<(&'static str, Value)>> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    );
    let mut out = Vec::new();
    for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
        let text = std::fs::read_to_string(format!("{dir}/{f}")).with_context(|| f.to_owned())?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            let kind = match v["kind"].as_str() {
                Some("Gateway") => "gateways",
                Some("Node") => "nodes",
                _ => "configmaps",
            };
            out.push((kind, v));
        }
    }
    Ok(out)
}

struct Env {
    api: FakeApiServer,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Result<Self> {
        let api = FakeApiServer::start().await?;
        for (kind, obj) in example()? {
            api.upsert(kind, obj);
        }
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig())?;
        raven_hub::certs::generate(&dir.path().join("certs"), &["localhost".into()], &[])?;
        Ok(Self { api, dir })
    }

    async fn hub(&self, replica: &str) -> Result<RunningHub> {
        let certs = raven_hub::certs::Layout {
            dir: self.dir.path().join("certs"),
        };
        Ok(hub::start(HubConfig {
            source: Source::Kubernetes {
                kubeconfig: Some(self.dir.path().join("kubeconfig")),
            },
            grpc_addr: "127.0.0.1:0".parse()?,
            plaintext_addr: None,
            http_addr: None,
            tls: TlsFiles {
                cert: certs.hub_cert(),
                key: certs.hub_key(),
                client_ca: certs.ca_cert(),
            },
            data_dir: Some(self.dir.path().join(format!("data-{replica}"))),
            sync: SyncConfig::default(),
            debounce: Debounce {
                quiet: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
            replica: replica.into(),
            epoch: Some("kubernetes".into()),
            manifest_limits: Default::default(),
        })
        .await?)
    }
}

async fn until(hub: &RunningHub, what: &str, f: impl Fn(&Published) -> bool) -> Result<()> {
    let mut rx = hub.published.clone();
    tokio::time::timeout(WAIT, rx.wait_for(|p| f(p)))
        .await
        .with_context(|| format!("timed out waiting for: {what}"))??;
    Ok(())
}

#[tokio::test]
async fn hub_serves_the_user_manual_cluster_from_the_api_server_and_follows_the_watch() -> Result<()>
{
    let env = Env::new().await?;
    let hub = env.hub("a").await?;
    until(&hub, "ready with three gateways", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await?;
    let before = hub.published.borrow().revision;
    assert!(
        before > 1,
        "revisions follow the API server's resourceVersion"
    );

    env.api.delete("gateways", "gw-qingdao");
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
    let env = Env::new().await?;
    let a = env.hub("replica-a").await?;
    until(&a, "ready", |p| {
        p.ready && p.topology.gateways().count() == 3
    })
    .await?;
    tokio::time::timeout(WAIT, async {
        while env.api.status_patches().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .with_context(|| format!("status patches: {:?}", env.api.status_patches()))?;

    let gw = env
        .api
        .get("gateways", "gw-hangzhou")
        .context("gw-hangzhou")?;
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
        .context("lease")?;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        holder.starts_with("replica-a-"),
        "held by replica-a: {holder}"
    );

    // A second replica serves too, and writes nothing while replica-a leads.
    let patches = env.api.status_patches().len();
    let b = env.hub("replica-b").await?;
    until(&b, "ready", |p| p.ready).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.api.status_patches().len(),
        patches,
        "nothing changed, nothing written"
    );
    b.stop().await;
    a.stop().await;
    Ok(())
}
