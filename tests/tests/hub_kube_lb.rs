//! `exposeType: LoadBalancer` against a real kube-apiserver: the hub (its
//! leader) creates the per-gateway tunnel and proxy Services with Endpoints on
//! the active endpoints, moves the Endpoints on failover, takes the load
//! balancer's ingress as the gateway's public address, and deletes what it
//! kept when the gateway stops being LoadBalancer or is deleted. No cloud
//! load-balancer controller runs here, so the test plays it: it writes the
//! Service's `status.loadBalancer.ingress` with kubectl. Skipped without the
//! server unless `RAVEN_REQUIRE_TOOLS=1`.

mod common;

use anyhow::{Context, Result};
use raven_hub::pipeline::Published;
use raven_tests::kube_apiserver::{self, KubeApiServer, repo_root};
use serde_json::Value;

use common::{WAIT, until};

const TUNNEL_SVC: &str = "x-raven-tunnel-svc-gw-lb";
const PROXY_SVC: &str = "x-raven-proxy-svc-gw-lb";

fn get_json(server: &KubeApiServer, args: &[&str]) -> Option<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    server
        .kubectl(&full)
        .ok()
        .and_then(|out| serde_json::from_str(&out).ok())
}

fn object(server: &KubeApiServer, kind: &str, name: &str) -> Option<Value> {
    get_json(server, &[kind, name, "-n", "kube-system"])
}

/// `(ip, nodeName)` of the Endpoints' addresses, and their port and protocol.
fn endpoint_addresses(
    server: &KubeApiServer,
    name: &str,
) -> Option<(Vec<(String, String)>, Value)> {
    let ep = object(server, "endpoints", name)?;
    let subset = &ep["subsets"][0];
    let addresses = subset["addresses"]
        .as_array()?
        .iter()
        .map(|a| {
            (
                a["ip"].as_str().unwrap_or_default().to_owned(),
                a["nodeName"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    Some((addresses, subset["ports"][0].clone()))
}

/// The gateway's active tunnel node and public address in the topology.
fn tunnel_of(p: &Published) -> Option<(String, Option<String>)> {
    p.topology
        .gateways()
        .find(|g| g.name.as_str() == "gw-lb")
        .and_then(|g| g.active_tunnel.as_ref())
        .map(|t| (t.node.to_string(), t.public_ip.map(|ip| ip.to_string())))
}

async fn eventually(what: &str, f: impl Fn() -> bool) -> Result<()> {
    let ok = kube_apiserver::eventually(WAIT, || {
        let r = f();
        async move { r }
    })
    .await;
    anyhow::ensure!(ok, "timed out waiting for: {what}");
    Ok(())
}

fn set_ingress(server: &KubeApiServer, ip: &str) -> Result<()> {
    server.kubectl(&[
        "patch",
        "service",
        TUNNEL_SVC,
        "-n",
        "kube-system",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{ip}"}}]}}}}}}"#),
    ])?;
    Ok(())
}

const GATEWAY: &str = "apiVersion: raven.openyurt.io/v1beta1
kind: Gateway
metadata:
  name: gw-lb
spec:
  exposeType: LoadBalancer
  tunnelConfig: {Replicas: 1}
  proxyConfig: {Replicas: 1}
  endpoints:
  - {nodeName: lb-1, type: tunnel, port: 4500}
  - {nodeName: lb-2, type: tunnel, port: 4500}
  - {nodeName: lb-1, type: proxy, port: 10262}
";

#[tokio::test]
async fn load_balancer_services_follow_the_election_and_their_ingress_is_the_public_address()
-> Result<()> {
    let Some(server) = KubeApiServer::shared().await? else {
        return Ok(());
    };
    let client = server.client().await?;
    for (name, ip, cidr) in [
        ("lb-1", "172.16.5.1", "10.244.5.0/24"),
        ("lb-2", "172.16.5.2", "10.244.6.0/24"),
    ] {
        kube_apiserver::create_node(&client, name, "gw-lb", ip, cidr).await?;
    }
    let manual = repo_root().join("deploy/examples/user-manual");
    server.kubectl(&[
        "apply",
        "-f",
        &manual.join("raven-cfg.yaml").display().to_string(),
    ])?;
    server.kubectl_stdin(&["apply", "-f", "-"], GATEWAY)?;
    let uid = get_json(&server, &["gateway", "gw-lb"])
        .and_then(|g| g["metadata"]["uid"].as_str().map(str::to_owned))
        .context("the Gateway's uid")?;

    let tmp = tempfile::tempdir()?;
    let hub = common::start_hub(&server.kubeconfig(), tmp.path(), "lb").await?;

    // The Services, as Raven's gateway-public-service controller makes them.
    eventually("both Services", || {
        object(&server, "service", TUNNEL_SVC).is_some()
            && object(&server, "service", PROXY_SVC).is_some()
    })
    .await?;
    let svc = object(&server, "service", TUNNEL_SVC).context("tunnel Service")?;
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "UDP");
    assert_eq!(svc["spec"]["ports"][0]["port"], 4500);
    assert_eq!(
        svc["metadata"]["labels"]["raven.openyurt.io/gateway"],
        "gw-lb"
    );
    assert_eq!(
        svc["metadata"]["labels"]["raven.openyurt.io/gateway-type"],
        "tunnel"
    );
    assert_eq!(
        svc["metadata"]["labels"]["raven.openyurt.io/endpoints-name"],
        "lb-1"
    );
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Gateway");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
    let svc_uid = svc["metadata"]["uid"].clone();
    let proxy = object(&server, "service", PROXY_SVC).context("proxy Service")?;
    assert_eq!(proxy["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(proxy["spec"]["ports"][0]["port"], 10262);
    eventually("Endpoints on the active endpoints' nodes", || {
        endpoint_addresses(&server, TUNNEL_SVC).is_some_and(|(a, port)| {
            a == [("172.16.5.1".to_owned(), "lb-1".to_owned())]
                && port["protocol"] == "UDP"
                && port["port"] == 4500
        }) && endpoint_addresses(&server, PROXY_SVC).is_some_and(|(a, port)| {
            a == [("172.16.5.1".to_owned(), "lb-1".to_owned())] && port["port"] == 10262
        })
    })
    .await?;
    assert_eq!(
        hub.published
            .borrow()
            .topology
            .gateways()
            .find(|g| g.name.as_str() == "gw-lb")
            .and_then(|g| g.active_tunnel.as_ref())
            .map(|t| t.public_ip),
        Some(None),
        "no public address before the load balancer has one"
    );

    // The cloud's load-balancer controller gives the Service an address.
    set_ingress(&server, "192.0.2.10")?;
    until(&hub, "the ingress as the public address", |p| {
        tunnel_of(p) == Some(("lb-1".into(), Some("192.0.2.10".into())))
    })
    .await?;
    eventually("the status's PublicIP column shows it", || {
        server
            .kubectl(&[
                "get",
                "gw",
                "gw-lb",
                "--no-headers",
                "-o",
                "custom-columns=IP:.status.activeEndpoints[?(@.type==\"tunnel\")].publicIP",
            ])
            .is_ok_and(|o| o.trim() == "192.0.2.10")
    })
    .await?;

    // What the hub learned from the agent's report: the Endpoints target the
    // port its tunnel listens on, the status shows its key.
    let lb2 = raven_core::NodeName::new("lb-2")?;
    hub.index.update(|i| {
        i.set_report(
            lb2,
            raven_core::AgentReport {
                wireguard_public_key: Some("mF8c3R6m4Hq0bY1mXo1yVjB5jz0cXb3q2yIBqYlqTmM=".into()),
                tunnel_port: Some(4600),
                ..Default::default()
            },
        )
    });

    // Failover: lb-1 goes NotReady, lb-2 takes the tunnel over. The
    // Endpoints move; the Service (and its load balancer) stays.
    kube_apiserver::set_node_status(&client, "lb-1", "172.16.5.1", false).await?;
    eventually("the tunnel Endpoints on lb-2, at its reported port", || {
        endpoint_addresses(&server, TUNNEL_SVC).is_some_and(|(a, port)| {
            a == [("172.16.5.2".to_owned(), "lb-2".to_owned())] && port["port"] == 4600
        })
    })
    .await?;
    let svc = object(&server, "service", TUNNEL_SVC).context("tunnel Service")?;
    assert_eq!(svc["metadata"]["uid"], svc_uid, "the same Service");
    assert_eq!(
        svc["metadata"]["labels"]["raven.openyurt.io/endpoints-name"],
        "lb-2"
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 4600);
    until(&hub, "lb-2 reached at the load balancer", |p| {
        tunnel_of(p) == Some(("lb-2".into(), Some("192.0.2.10".into())))
    })
    .await?;
    // No proxy is elected any more (lb-1 was the only one): its Service
    // stays, with no address behind it.
    eventually("the proxy Endpoints empty", || {
        object(&server, "endpoints", PROXY_SVC)
            .is_some_and(|e| e["subsets"].as_array().is_none_or(Vec::is_empty))
    })
    .await?;
    // The learned facts and the node count, as kubectl users see them.
    eventually("publicKey and nodeCount in the status", || {
        get_json(&server, &["gateway", "gw-lb"]).is_some_and(|g| {
            let s = &g["status"];
            s["nodeCount"] == 2
                && s["activeEndpoints"].as_array().is_some_and(|eps| {
                    eps.iter().any(|e| {
                        e["nodeName"] == "lb-2"
                            && e["config"]["publicKey"]
                                == "mF8c3R6m4Hq0bY1mXo1yVjB5jz0cXb3q2yIBqYlqTmM="
                            && e["publicIP"] == "192.0.2.10"
                    })
                })
        })
    })
    .await?;
    let table = server.kubectl(&["get", "gw", "gw-lb"])?;
    // Columns by offset: an empty ACTIVEPROXY cell is blanks.
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let at = header.find("NODES").context("a NODES column")?;
    let cell = row.get(at..).unwrap_or_default().split_whitespace().next();
    assert_eq!(cell, Some("2"), "{table}");

    // A new ingress address is followed.
    set_ingress(&server, "192.0.2.11")?;
    until(&hub, "the new ingress", |p| {
        tunnel_of(p) == Some(("lb-2".into(), Some("192.0.2.11".into())))
    })
    .await?;

    // Someone deletes the Endpoints: they come back.
    server.kubectl(&["delete", "endpoints", TUNNEL_SVC, "-n", "kube-system"])?;
    eventually("the Endpoints restored", || {
        endpoint_addresses(&server, TUNNEL_SVC)
            .is_some_and(|(a, _)| a == [("172.16.5.2".to_owned(), "lb-2".to_owned())])
    })
    .await?;

    // No longer LoadBalancer: both Services and their Endpoints go, and the
    // load balancer's address with them.
    server.kubectl(&[
        "patch",
        "gateway",
        "gw-lb",
        "--type=merge",
        "-p",
        r#"{"spec":{"exposeType":null}}"#,
    ])?;
    eventually("Services and Endpoints deleted", || {
        [TUNNEL_SVC, PROXY_SVC].iter().all(|n| {
            object(&server, "service", n).is_none() && object(&server, "endpoints", n).is_none()
        })
    })
    .await?;
    until(&hub, "no public address", |p| {
        tunnel_of(p) == Some(("lb-2".into(), None))
    })
    .await?;

    // LoadBalancer again, then the Gateway deleted: kept, then gone.
    server.kubectl_stdin(&["apply", "-f", "-"], GATEWAY)?;
    eventually("the Service again", || {
        object(&server, "service", TUNNEL_SVC).is_some()
    })
    .await?;
    server.kubectl(&["delete", "gateway", "gw-lb"])?;
    eventually("everything deleted with the Gateway", || {
        [TUNNEL_SVC, PROXY_SVC].iter().all(|n| {
            object(&server, "service", n).is_none() && object(&server, "endpoints", n).is_none()
        })
    })
    .await?;
    hub.stop().await;
    Ok(())
}
