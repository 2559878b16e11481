//! `raven_hub::status::run_status_writer` against the test-only fake API
//! server: Lease election between writers, and the leader's status PATCHes
//! as the API server receives them.
//!
//! On the fake because these tests count and inspect the requests the
//! writer sends (every PATCH body and content type, retries of a 404ed
//! PATCH, "nothing more written across renewals"), which a real API server
//! does not report. The same behaviour end to end — leader writes, second
//! replica writes nothing, recreated and externally edited Gateways get
//! their status back — runs against the real kube-apiserver in `hub_kube`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use raven_core::GatewayName;
use raven_core::api::v1beta1::{Endpoint, Gateway, GatewaySpec, GatewayStatus, NodeInfo};
use raven_core::compile::CompiledGateway;
use raven_hub::pipeline::{ObservedGateway, Published};
use raven_hub::status::{LeaseConfig, run_status_writer};
use raven_tests::fake_apiserver::FakeApiServer;
use raven_tests::objects;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Short leases so takeovers happen within a test.
fn lease(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(1),
        renew_every: Duration::from_millis(150),
        ..LeaseConfig::with_identity(identity)
    }
}

fn gateway_object(name: &str) -> Value {
    let endpoint = |node: &str, ip: &str| {
        let mut e = objects::tunnel_endpoint(node);
        e["publicIP"] = ip.into();
        e
    };
    objects::gateway(
        name,
        vec![endpoint("n1", "203.0.113.1"), endpoint("n2", "203.0.113.2")],
    )
}

/// The status electing `active` of gw-a's two nodes.
fn status(active: &str) -> GatewayStatus {
    let ip = if active == "n1" {
        "203.0.113.1"
    } else {
        "203.0.113.2"
    };
    GatewayStatus {
        active_endpoints: vec![Endpoint {
            node_name: active.into(),
            type_: "tunnel".into(),
            port: 4500,
            public_ip: ip.into(),
            ..Default::default()
        }],
        nodes: vec![
            NodeInfo {
                node_name: "n1".into(),
                private_ip: "192.168.0.1".into(),
                subnets: vec!["10.244.1.0/24".into()],
            },
            NodeInfo {
                node_name: "n2".into(),
                private_ip: "192.168.0.2".into(),
                subnets: vec!["10.244.2.0/24".into()],
            },
        ],
        conditions: Vec::new(),
        node_count: Some(2),
    }
}

/// The published state electing `statuses`, with each Gateway observed as
/// the fake holds it now (what the hub's watch would show).
fn published(api: &FakeApiServer, statuses: &[(&str, GatewayStatus)]) -> Result<Arc<Published>> {
    let mut gateways = BTreeMap::new();
    let mut observed = BTreeMap::new();
    for (name, _) in statuses {
        let stored = api.get("gateways", name);
        let seen = stored.map(|o| ObservedGateway {
            uid: o["metadata"]["uid"].as_str().map(str::to_owned),
            resource_version: o["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            status: serde_json::from_value(o["status"].clone()).ok(),
        });
        observed.insert(GatewayName::new(*name)?, seen.unwrap_or_default());
    }
    for (name, status) in statuses {
        let name = GatewayName::new(*name)?;
        gateways.insert(
            name.clone(),
            Arc::new(CompiledGateway {
                gateway: Gateway::new(name.as_str(), GatewaySpec::default()),
                name,
                status: status.clone(),
            }),
        );
    }
    Ok(Arc::new(Published {
        epoch: "test".into(),
        revision: 1,
        ready: true,
        fresh: true,
        observed,
        gateways,
        ..Default::default()
    }))
}

/// One running status writer.
struct Writer {
    published: watch::Sender<Arc<Published>>,
    leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(api: &FakeApiServer, lease: LeaseConfig, state: Arc<Published>) -> Self {
        let (published, rx) = watch::channel(state);
        let (lead_tx, leading) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_status_writer(
            api.client(),
            rx,
            lease,
            lead_tx,
            shutdown.clone(),
        ));
        Self {
            published,
            leading,
            shutdown,
            task,
        }
    }

    /// `hub`'s writer, publishing an election of `node` for gw-a.
    fn electing_for_gw_a(api: &FakeApiServer, hub: &str, node: &str) -> Result<Self> {
        let state = published(api, &[("gw-a", status(node))])?;
        Ok(Self::start(api, lease(hub), state))
    }

    async fn until_leading(&mut self) -> Result<()> {
        tokio::time::timeout(WAIT, self.leading.wait_for(|l| *l))
            .await
            .context("timed out waiting for leadership")??;
        Ok(())
    }

    /// Stops gracefully: the Lease is released.
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the writer did not stop")??;
        Ok(())
    }
}

async fn until_patches(api: &FakeApiServer, n: usize) -> Result<()> {
    tokio::time::timeout(WAIT, async {
        while api.status_patches().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .with_context(|| format!("waiting for {n} status patches: {:?}", api.status_patches()))
}

fn holder(api: &FakeApiServer) -> Option<String> {
    api.get("leases", "kube-system/raven-hub")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn leader_patches_gateway_status() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway_object("gw-a"));
    let spec_before = api.get("gateways", "gw-a").context("gw-a")?["spec"].clone();

    let mut writer = Writer::electing_for_gw_a(&api, "hub-a", "n1")?;
    writer.until_leading().await?;
    assert_eq!(holder(&api).as_deref(), Some("hub-a"));
    until_patches(&api, 1).await?;

    let patch = &api.status_patches()[0];
    assert_eq!(patch.key, "gw-a");
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        patch.body["status"]["activeEndpoints"],
        json!([{"nodeName": "n1", "type": "tunnel", "port": 4500, "publicIP": "203.0.113.1"}])
    );
    assert_eq!(
        patch.body["status"]["nodes"],
        json!([
            {"nodeName": "n1", "privateIP": "192.168.0.1", "subnets": ["10.244.1.0/24"]},
            {"nodeName": "n2", "privateIP": "192.168.0.2", "subnets": ["10.244.2.0/24"]},
        ])
    );
    let conditions: Vec<(String, String, String)> = patch.body["status"]["conditions"]
        .as_array()
        .context("conditions")?
        .iter()
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (f("type"), f("status"), f("reason"))
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("Valid".into(), "True".into(), "Valid".into()),
            (
                "Ready".into(),
                "True".into(),
                "ActiveEndpointElected".into()
            )
        ]
    );
    let stored = api.get("gateways", "gw-a").context("gw-a")?;
    assert_eq!(stored["status"], patch.body["status"]);
    assert_eq!(stored["spec"], spec_before, "only the status is written");

    // Unchanged status: nothing more is written across several renewals.
    writer
        .published
        .send_replace(published(&api, &[("gw-a", status("n1"))])?);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(api.status_patches().len(), 1);

    // A new election is written once.
    writer
        .published
        .send_replace(published(&api, &[("gw-a", status("n2"))])?);
    until_patches(&api, 2).await?;
    let stored = api.get("gateways", "gw-a").context("gw-a")?;
    assert_eq!(stored["status"]["activeEndpoints"][0]["nodeName"], "n2");

    // An empty election clears the lists (a merge patch needs explicit
    // nulls) and says why in the Ready condition.
    writer
        .published
        .send_replace(published(&api, &[("gw-a", GatewayStatus::default())])?);
    until_patches(&api, 3).await?;
    let body = &api.status_patches()[2].body;
    assert_eq!(body["status"]["activeEndpoints"], Value::Null);
    assert_eq!(body["status"]["nodes"], Value::Null);
    assert_eq!(body["status"]["conditions"][1]["type"], "Ready");
    assert_eq!(body["status"]["conditions"][1]["status"], "False");
    assert_eq!(
        body["status"]["conditions"][1]["reason"],
        "NoActiveEndpoint"
    );
    let stored = api.get("gateways", "gw-a").context("gw-a")?;
    assert_eq!(stored["status"].get("activeEndpoints"), None);
    writer
        .published
        .send_replace(published(&api, &[("gw-a", GatewayStatus::default())])?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.status_patches().len(), 3);

    writer.stop().await?;
    assert_eq!(holder(&api), None, "released on shutdown");
    Ok(())
}

#[tokio::test]
async fn leader_does_not_rewrite_a_status_the_api_server_already_has() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway_object("gw-a"));
    api.upsert("gateways", gateway_object("gw-b"));
    let election = [("gw-a", status("n1")), ("gw-b", status("n2"))];
    let mut a = Writer::start(&api, lease("hub-a"), published(&api, &election)?);
    a.until_leading().await?;
    until_patches(&api, 2).await?;
    a.stop().await?;

    // A new leader with the same election finds both statuses in place
    // (conditions and their transition times included): nothing to write.
    let mut b = Writer::start(&api, lease("hub-b"), published(&api, &election)?);
    b.until_leading().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.status_patches().len(),
        2,
        "both already had their status"
    );
    b.stop().await
}

#[tokio::test]
async fn second_writer_does_not_patch_while_lease_held() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway_object("gw-a"));

    let mut a = Writer::electing_for_gw_a(&api, "hub-a", "n1")?;
    a.until_leading().await?;
    until_patches(&api, 1).await?;

    // B would write a different election, so any write of B's shows.
    let mut b = Writer::electing_for_gw_a(&api, "hub-b", "n2")?;
    // Well past a lease duration: A keeps renewing, B never takes over.
    let b_led = tokio::time::timeout(Duration::from_millis(2500), b.leading.wait_for(|l| *l))
        .await
        .is_ok();
    assert!(!b_led, "hub-b must not lead while hub-a renews");
    assert_eq!(holder(&api).as_deref(), Some("hub-a"));
    assert_eq!(api.status_patches().len(), 1, "only hub-a wrote");
    assert!(*a.leading.borrow());

    // A steps down (releasing the Lease): B takes over and writes its view.
    a.stop().await?;
    b.until_leading().await?;
    until_patches(&api, 2).await?;
    assert_eq!(holder(&api).as_deref(), Some("hub-b"));
    let stored = api.get("gateways", "gw-a").context("gw-a")?;
    assert_eq!(stored["status"]["activeEndpoints"][0]["nodeName"], "n2");
    let lease = api
        .get("leases", "kube-system/raven-hub")
        .context("lease")?;
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    b.stop().await
}

#[tokio::test]
async fn lease_of_a_crashed_leader_is_taken_over_after_it_expires() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway_object("gw-a"));
    let mut a = Writer::electing_for_gw_a(&api, "hub-a", "n1")?;
    a.until_leading().await?;

    let mut b = Writer::electing_for_gw_a(&api, "hub-b", "n2")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A dies without releasing the Lease.
    a.task.abort();
    let crashed = tokio::time::Instant::now();
    b.until_leading().await?;
    assert!(
        crashed.elapsed() >= Duration::from_millis(500),
        "taken over only once the lease went unrenewed (after {:?})",
        crashed.elapsed()
    );
    assert_eq!(holder(&api).as_deref(), Some("hub-b"));
    until_patches(&api, 2).await?;
    b.stop().await
}

#[tokio::test]
async fn leader_that_cannot_reach_the_api_server_steps_down() -> Result<()> {
    let mut api = FakeApiServer::start().await?;
    api.upsert("gateways", gateway_object("gw-a"));
    let mut a = Writer::electing_for_gw_a(&api, "hub-a", "n1")?;
    a.until_leading().await?;

    api.stop().await;
    // Renewals fail; after the renew deadline (⅔ of 1 s) it no longer leads.
    tokio::time::timeout(WAIT, a.leading.wait_for(|l| !*l))
        .await
        .context("stepped down")??;

    api.restart().await?;
    a.until_leading().await?;
    a.stop().await
}

#[tokio::test]
async fn failed_status_write_is_retried_with_backoff() -> Result<()> {
    let api = FakeApiServer::start().await?;
    // The hub has elected gw-a before the API server holds it: the PATCH
    // gets 404 and is retried.
    let mut writer = Writer::electing_for_gw_a(&api, "hub-a", "n1")?;
    writer.until_leading().await?;
    let attempts = || {
        api.requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/gateways/gw-a/status"))
            .count()
    };
    tokio::time::timeout(WAIT, async {
        while attempts() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("retried")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        attempts() < 8,
        "backs off, no hot loop: {} attempts",
        attempts()
    );
    assert!(api.status_patches().is_empty());

    api.upsert("gateways", gateway_object("gw-a"));
    until_patches(&api, 1).await?;
    let stored = api.get("gateways", "gw-a").context("gw-a")?;
    assert_eq!(stored["status"]["activeEndpoints"][0]["nodeName"], "n1");
    writer.stop().await
}
