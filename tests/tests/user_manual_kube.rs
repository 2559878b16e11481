//! The OpenYurt Raven user manual's sequence, done by kubectl against a
//! real kube-apiserver with the hub running: `kubectl apply -f deploy/crds/`,
//! the six nodes labelled into their gateways (status patched, as kubelets
//! would), `raven-cfg`, and the manual's three Gateways applied **exactly as
//! printed** — `gw-hangzhou` as v1beta1 (with its duplicated `underNAT`
//! key), `gw-cloud` and `gw-qingdao` as v1alpha1 with v1beta1's fields, and
//! the manual's masked `publicIP: 120.79.xxx.xxx`. Ends with the status,
//! Events and `kubectl get gw` columns a Raven user sees. Skipped without
//! the server unless `RAVEN_REQUIRE_TOOLS=1`.

mod common;

use anyhow::{Context, Result};
use kube::Api;
use raven_core::api::v1beta1::Gateway;
use raven_tests::kube_apiserver::{self, KubeApiServer, repo_root};

use common::WAIT;

/// The manual's Gateway documents, verbatim (section 2.1): kept as a
/// fixture file, byte for byte as printed, duplicated key and masked IP
/// included.
const MANUAL_GATEWAYS: &str = include_str!("../fixtures/user-manual-gateways.yaml");

/// The manual's nodes: (name, InternalIP, pod CIDR).
const NODES: [(&str, &str, &str); 6] = [
    ("izbp15inok0kbfkg3in52rz", "172.16.2.103", "10.244.1.0/24"),
    ("izbp15inok0kbfkg3in52sz", "172.16.2.104", "10.244.2.0/24"),
    ("izm5eb24dmjfimuaybpnqzz", "172.16.1.89", "10.244.3.0/24"),
    ("izm5eb24dmjfimuaybpnr0z", "172.16.1.90", "10.244.4.0/24"),
    ("izwz9dohcv74iegqecp4axz", "192.168.0.195", "10.244.0.0/24"),
    ("izwz9ey0js5z7mornclpd6z", "192.168.0.196", "10.244.5.0/24"),
];

#[tokio::test]
async fn user_manual_sequence_by_kubectl_ends_with_status_events_and_columns() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    server.kubectl(&[
        "apply",
        "-f",
        &repo_root().join("deploy/crds").display().to_string(),
    ])?;
    for (name, ip, cidr) in NODES {
        let node = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs: [{cidr}]\n"
        );
        server.kubectl_stdin(&["apply", "-f", "-"], &node)?;
        server.kubectl(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                r#"{{"status":{{"conditions":[{{"type":"Ready","status":"True"}}],"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#
            ),
        ])?;
    }
    // The manual's labelling commands.
    let label = |gw: &str, nodes: &[&str]| -> Result<()> {
        let mut args = vec!["label", "nodes"];
        args.extend_from_slice(nodes);
        let value = format!("raven.openyurt.io/gateway={gw}");
        args.push(&value);
        server.kubectl(&args)?;
        Ok(())
    };
    label(
        "gw-hangzhou",
        &["izbp15inok0kbfkg3in52rz", "izbp15inok0kbfkg3in52sz"],
    )?;
    label(
        "gw-cloud",
        &["izwz9dohcv74iegqecp4axz", "izwz9ey0js5z7mornclpd6z"],
    )?;
    label(
        "gw-qingdao",
        &["izm5eb24dmjfimuaybpnqzz", "izm5eb24dmjfimuaybpnr0z"],
    )?;
    server.kubectl(&[
        "apply",
        "-f",
        &repo_root()
            .join("deploy/examples/user-manual/raven-cfg.yaml")
            .display()
            .to_string(),
    ])?;
    // Exactly as printed: kubectl accepts all three.
    let applied = server.kubectl_stdin(&["apply", "-f", "-"], MANUAL_GATEWAYS)?;
    for gw in ["gw-hangzhou", "gw-cloud", "gw-qingdao"] {
        assert!(applied.contains(gw), "{gw} applied: {applied}");
    }

    // The v1alpha1 documents are stored with every field they carry.
    let client = server.client().await?;
    let gateways: Api<Gateway> = Api::all(client.clone());
    let cloud = gateways.get("gw-cloud").await?;
    let kinds: Vec<(String, i32)> = cloud
        .spec
        .endpoints
        .iter()
        .map(|e| (e.type_.clone(), e.port))
        .collect();
    assert_eq!(
        kinds,
        [("proxy".to_owned(), 10262), ("tunnel".to_owned(), 4500)]
    );
    assert_eq!(cloud.spec.proxy_config.proxy_http_port, "10255,9445");
    assert_eq!(cloud.spec.expose_type, "PublicIP");
    let qingdao = gateways.get("gw-qingdao").await?;
    assert_eq!(qingdao.spec.endpoints[0].type_, "proxy");
    assert_eq!(qingdao.spec.tunnel_config.replicas, 1);

    // A v1alpha1 document in OpenYurt's own v1alpha1 shape gets OpenYurt's
    // conversion rules: tunnel endpoints on port 4500, one replica each.
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: raven.openyurt.io/v1alpha1\nkind: Gateway\nmetadata:\n  name: gw-old\nspec:\n  endpoints:\n  - nodeName: izbp15inok0kbfkg3in52sz\n    underNAT: true\n",
    )?;
    let old = gateways.get("gw-old").await?;
    assert_eq!(old.spec.endpoints[0].type_, "tunnel");
    assert_eq!(old.spec.endpoints[0].port, 4500);
    assert_eq!(old.spec.tunnel_config.replicas, 1);
    assert_eq!(old.spec.proxy_config.replicas, 1);
    server.kubectl(&["delete", "gateway", "gw-old"])?;

    // The hub.
    let dir = tempfile::tempdir()?;
    let hub = common::start_hub(&server.kubeconfig(), dir.path(), "manual").await?;
    let all_written = kube_apiserver::eventually(WAIT, || async {
        gateways.list(&Default::default()).await.is_ok_and(|l| {
            l.items.len() == 3
                && l.items.iter().all(|g| {
                    g.status
                        .as_ref()
                        .is_some_and(|s| s.active_endpoints.len() == 2 && !s.nodes.is_empty())
                })
        })
    })
    .await;
    assert!(all_written, "every Gateway got proxy + tunnel elected");

    // Status as Raven writes it.
    let qingdao = gateways.get("gw-qingdao").await?;
    let status = qingdao.status.context("gw-qingdao status")?;
    let active: Vec<(String, String)> = status
        .active_endpoints
        .iter()
        .map(|e| (e.type_.clone(), e.node_name.clone()))
        .collect();
    assert!(active.contains(&("proxy".into(), "izm5eb24dmjfimuaybpnqzz".into())));
    assert!(active.contains(&("tunnel".into(), "izm5eb24dmjfimuaybpnr0z".into())));
    let node = status
        .nodes
        .iter()
        .find(|n| n.node_name == "izm5eb24dmjfimuaybpnr0z")
        .context("node info")?;
    assert_eq!(node.private_ip, "172.16.1.90");
    assert_eq!(node.subnets, ["10.244.4.0/24"]);

    // Conditions with reasons: gw-qingdao is valid and ready; gw-cloud is
    // served (the manual's masked publicIP is forgiven) but not Valid.
    let condition = |g: &Gateway, type_: &str| -> Option<(String, String, String)> {
        g.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let qingdao = gateways.get("gw-qingdao").await?;
    assert_eq!(
        condition(&qingdao, "Valid").map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(
        condition(&qingdao, "Ready").map(|c| (c.0, c.1)),
        Some(("True".into(), "ActiveEndpointElected".into()))
    );
    let cloud = gateways.get("gw-cloud").await?;
    let valid = condition(&cloud, "Valid").context("gw-cloud Valid")?;
    assert_eq!((valid.0.as_str(), valid.1.as_str()), ("False", "Invalid"));
    assert!(valid.2.contains("publicIP"), "names the field: {valid:?}");

    // Columns: `kubectl get gw` shows the active tunnel and proxy endpoints.
    let table = server.kubectl(&["get", "gw", "gw-qingdao"])?;
    let header = table.lines().next().unwrap_or_default().to_owned();
    for column in [
        "NAME",
        "ACTIVETUNNEL",
        "ACTIVEPROXY",
        "PUBLICIP",
        "NODES",
        "AGE",
    ] {
        assert!(header.contains(column), "column {column}: {table}");
    }
    assert!(
        table.contains("izm5eb24dmjfimuaybpnr0z") && table.contains("izm5eb24dmjfimuaybpnqzz"),
        "active endpoints shown: {table}"
    );

    // Events: the elections, and a Warning for the manual's masked publicIP.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client);
    let told = kube_apiserver::eventually(WAIT, || async {
        events.list(&Default::default()).await.is_ok_and(|l| {
            let has = |reason: &str, name: &str| {
                l.items.iter().any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.involved_object.name.as_deref() == Some(name)
                })
            };
            has("ActiveEndpointElected", "gw-qingdao")
                && has("ActiveEndpointElected", "gw-hangzhou")
                && l.items.iter().any(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.involved_object.name.as_deref() == Some("gw-cloud")
                        && e.message.as_deref().is_some_and(|m| m.contains("publicIP"))
                })
        })
    })
    .await;
    assert!(
        told,
        "Elected events and a publicIP Warning: {}",
        server.kubectl(&["get", "events", "-A"])?
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn kubectl_apply_refuses_what_ravens_webhook_refuses_naming_the_field() -> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    let gateway = |version: &str, endpoint: &str, expose: &str| {
        format!(
            "apiVersion: raven.openyurt.io/{version}\nkind: Gateway\nmetadata:\n  name: gw-bad\nspec:\n  exposeType: \"{expose}\"\n  proxyConfig: {{Replicas: 1}}\n  tunnelConfig: {{Replicas: 1}}\n  endpoints:\n  - {endpoint}\n"
        )
    };
    for version in ["v1beta1", "v1alpha1"] {
        for (doc, field) in [
            (
                gateway(version, "{nodeName: n1, type: vpn, port: 4500}", ""),
                "type",
            ),
            (
                gateway(version, "{nodeName: n1, type: tunnel, port: 70000}", ""),
                "port",
            ),
            (
                gateway(version, "{nodeName: n1, type: tunnel, port: 0}", ""),
                "port",
            ),
            (
                gateway(
                    version,
                    "{nodeName: n1, type: tunnel, port: 4500, publicPort: -1}",
                    "",
                ),
                "publicPort",
            ),
            (
                gateway(
                    version,
                    "{nodeName: n1, type: tunnel, port: 4500}",
                    "NodePort",
                ),
                "exposeType",
            ),
            (
                gateway(version, "{nodeName: \"\", type: tunnel, port: 4500}", ""),
                "nodeName",
            ),
        ] {
            let refused = server
                .kubectl_stdin(&["apply", "-f", "-"], &doc)
                .err()
                .with_context(|| format!("{version} accepted: {doc}"))?;
            assert!(
                refused.to_string().contains(field),
                "{version}: the refusal names {field}: {refused}"
            );
        }
    }
    // Raven's webhook allows one tunnel replica at most.
    let two_tunnels = gateway("v1beta1", "{nodeName: n1, type: tunnel, port: 4500}", "")
        .replace("tunnelConfig: {Replicas: 1}", "tunnelConfig: {Replicas: 2}");
    let refused = server
        .kubectl_stdin(&["apply", "-f", "-"], &two_tunnels)
        .err()
        .context("two tunnel replicas accepted")?;
    assert!(refused.to_string().contains("Replicas"), "{refused}");
    // A valid one of each version is accepted.
    for version in ["v1beta1", "v1alpha1"] {
        server.kubectl_stdin(
            &["apply", "-f", "-"],
            &gateway(
                version,
                "{nodeName: n1, type: tunnel, port: 4500}",
                "LoadBalancer",
            ),
        )?;
    }
    Ok(())
}
