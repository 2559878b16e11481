//! `deploy/base/hub.yaml`'s RBAC is enough for everything the hub does — and no
//! more. The hub runs as the `kube-system/raven-hub` ServiceAccount with a
//! token from `kubectl create token` against a real kube-apiserver: it lists
//! and watches, takes the Lease, writes every Gateway status, records
//! Events, creates and deletes a LoadBalancer Gateway's Services and
//! Endpoints (a 403 on any of them would leave one undone), and `kubectl
//! auth can-i` confirms what it may not do. Skipped without the server unless
//! `RAVEN_REQUIRE_TOOLS=1`.

use std::time::Duration;

mod common;

use anyhow::{Context, Result};
use kube::Api;
use raven_core::api::v1beta1::Gateway;
use raven_tests::kube_apiserver::{self, KubeApiServer, repo_root};
use serde_json::Value;

use common::WAIT;
const SA: &str = "system:serviceaccount:kube-system:raven-hub";

/// The RBAC documents of deploy/base/hub.yaml (not the Deployment or Service:
/// nothing runs pods here).
fn rbac_documents() -> Result<String> {
    let text = std::fs::read_to_string(repo_root().join("deploy/base/hub.yaml"))?;
    let mut out = String::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        let kind = v["kind"].as_str().unwrap_or_default();
        if matches!(
            kind,
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(&v)?);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn hub_with_its_service_account_token_does_everything_it_needs_and_no_more() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    server.kubectl_stdin(&["apply", "-f", "-"], &rbac_documents()?)?;
    let dir = repo_root().join("deploy/examples/user-manual");
    let client = server.client().await?;
    for (name, gw, ip, cidr) in [
        ("hz-1", "gw-a", "172.16.2.103", "10.244.1.0/24"),
        ("qd-1", "gw-b", "172.16.1.89", "10.244.3.0/24"),
    ] {
        kube_apiserver::create_node(&client, name, gw, ip, cidr).await?;
    }
    server.kubectl(&[
        "apply",
        "-f",
        &dir.join("raven-cfg.yaml").display().to_string(),
    ])?;
    // A decoy the hub must not be able to read.
    server.kubectl(&["create", "configmap", "-n", "kube-system", "decoy"])?;
    // gw-b is exposed through a LoadBalancer: the hub keeps its Services.
    for (gw, node, nat, expose) in [
        ("gw-a", "hz-1", true, ""),
        ("gw-b", "qd-1", false, "\n  exposeType: LoadBalancer"),
    ] {
        server.kubectl_stdin(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata:\n  name: {gw}\nspec:{expose}\n  proxyConfig: {{Replicas: 1}}\n  tunnelConfig: {{Replicas: 1}}\n  endpoints:\n  - {{nodeName: {node}, type: tunnel, port: 4500, underNAT: {nat}}}\n  - {{nodeName: {node}, type: proxy, port: 10262, underNAT: {nat}}}\n"
            ),
        )?;
    }

    let kubeconfig = server.service_account_kubeconfig("kube-system", "raven-hub")?;
    let tmp = tempfile::tempdir()?;
    let hub = common::start_hub(&kubeconfig, tmp.path(), "rbac").await?;

    // Lists and watches of all three kinds (raven-cfg by name).
    let mut rx = hub.published.clone();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|p| p.ready && p.topology.gateways().count() == 2),
    )
    .await
    .context("ready with both gateways: every list and watch was allowed")??;
    // The Lease (create, get, update) and every status (patch).
    let gateways: Api<Gateway> = Api::all(client.clone());
    let written = kube_apiserver::eventually(WAIT, || async {
        gateways.list(&Default::default()).await.is_ok_and(|l| {
            l.items.iter().all(|g| {
                g.status
                    .as_ref()
                    .is_some_and(|s| s.active_endpoints.len() == 2)
            })
        })
    })
    .await;
    assert!(written, "every status written with the token");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    let holder = leases
        .get("raven-hub")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(holder.starts_with("rbac-"), "Lease held: {holder}");
    // A renewal (update by name) goes through too: the holder stays.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        hub.published.borrow().ready,
        "still serving after a renewal round"
    );
    // Events (create in default).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
    let recorded = kube_apiserver::eventually(WAIT, || async {
        events.list(&Default::default()).await.is_ok_and(|l| {
            l.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ActiveEndpointElected"))
        })
    })
    .await;
    assert!(recorded, "Events recorded with the token");
    // The LoadBalancer Services and their Endpoints (list, watch, create and
    // patch by server-side apply, and delete when gw-b stops being
    // LoadBalancer).
    let kept = || {
        ["x-raven-tunnel-svc-gw-b", "x-raven-proxy-svc-gw-b"]
            .iter()
            .filter(|n| {
                ["service", "endpoints"]
                    .iter()
                    .all(|k| server.kubectl(&["get", k, n, "-n", "kube-system"]).is_ok())
            })
            .count()
    };
    let created = kube_apiserver::eventually(WAIT, || {
        let n = kept();
        async move { n == 2 }
    })
    .await;
    assert!(created, "Services and Endpoints created with the token");
    server.kubectl(&[
        "patch",
        "gateway",
        "gw-b",
        "--type=merge",
        "-p",
        r#"{"spec":{"exposeType":null}}"#,
    ])?;
    let deleted = kube_apiserver::eventually(WAIT, || {
        let n = kept();
        async move { n == 0 }
    })
    .await;
    assert!(deleted, "Services and Endpoints deleted with the token");
    hub.stop().await;

    // And no more than that.
    let can = |args: &[&str]| -> Result<bool> {
        let mut full = vec!["auth", "can-i"];
        full.extend_from_slice(args);
        full.push("--as");
        full.push(SA);
        // `can-i` exits 1 for "no".
        Ok(server
            .kubectl(&full)
            .map(|out| out.trim() == "yes")
            .unwrap_or(false))
    };
    assert!(can(&[
        "patch",
        "gateways.raven.openyurt.io/gw-a",
        "--subresource=status"
    ])?);
    for denied in [
        vec!["update", "gateways.raven.openyurt.io/gw-a"],
        vec!["delete", "gateways.raven.openyurt.io/gw-a"],
        vec!["get", "configmap/decoy", "-n", "kube-system"],
        vec!["list", "configmaps", "-n", "kube-system"],
        vec!["list", "secrets", "-A"],
        vec!["update", "lease/other", "-n", "kube-system"],
        vec!["patch", "nodes/hz-1"],
        vec!["create", "events", "-n", "kube-system"],
        vec!["get", "services", "-n", "kube-system"],
        vec!["update", "services", "-n", "kube-system"],
        vec!["list", "services", "-n", "default"],
        vec!["patch", "services", "-n", "default"],
        vec!["patch", "endpoints", "-n", "default"],
        vec![
            "create",
            "endpointslices.discovery.k8s.io",
            "-n",
            "kube-system",
        ],
    ] {
        assert!(!can(&denied)?, "the hub may not {denied:?}");
    }
    server.kubectl(&["delete", "configmap", "-n", "kube-system", "decoy"])?;
    Ok(())
}
