//! The layer-7 proxy end to end on loopback (`raven_tests::proxy_rig`):
//! real sockets, real mTLS with `raven-hub certs` node certificates, real
//! HTTP/2 tunnels, fake kubelets verified against their CA. No root needed.

use std::time::{Duration, Instant};

use raven_tests::fake_kubelet::{self, body};
use raven_tests::proxy_rig::{LONELY, Rig};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_by_node_name_reaches_each_nodes_kubelet_through_its_gateways_tunnel() {
    let rig = Rig::start().await;
    for node in ["h1", "h2", "s1"] {
        let logs = rig
            .get(node, "/containerLogs/default/web-0/nginx")
            .await
            .expect("logs");
        assert!(logs.starts_with("HTTP/1.1 200"), "{logs}");
        assert!(
            body(&logs).contains(&format!("log line 1 of default/web-0/nginx on {node}")),
            "{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_ports_and_unknown_ips_are_refused_with_the_reason_in_the_status_line() {
    let rig = Rig::start().await;
    let err = rig.connect("h1:22").await.expect_err("port 22");
    assert!(
        err.starts_with("HTTP/1.1 403 port 22 of h1 is not proxied"),
        "{err}"
    );
    assert!(err.contains("gateway gw-cloud"), "{err}");
    let err = rig
        .connect(&format!("10.9.9.9:{}", rig.kubelet_port))
        .await
        .expect_err("unknown IP");
    assert!(
        err.starts_with("HTTP/1.1 404 no node of any gateway has InternalIP 10.9.9.9"),
        "{err}"
    );
    // An InternalIP exactly one node has is routed to it.
    let conn = rig
        .connect(&format!("127.0.0.12:{}", rig.kubelet_port))
        .await
        .expect("by IP");
    let tls = fake_kubelet::kubelet_tls(conn, "h2", rig.client_tls.clone())
        .await
        .expect("TLS");
    assert!(
        fake_kubelet::get(tls, "h2", "/healthz")
            .await
            .expect("get")
            .contains("ok h2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_each_get_all_their_bytes() {
    let rig = std::sync::Arc::new(Rig::start().await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let rig = rig.clone();
        let node = ["h1", "h2", "s1"][i % 3];
        let n = 50_000 + i * 100;
        tasks.spawn(async move {
            let answer = rig.get(node, &format!("/bytes/{n}")).await.expect("get");
            assert_eq!(body(&answer).len(), n, "stream {i} to {node}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("stream task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_reaches_the_kubelet_and_its_answer_still_comes_back() {
    let rig = Rig::start().await;
    let s = rig
        .client()
        .start_request("s1", "POST", "/count")
        .await
        .expect("TLS");
    let answer = fake_kubelet::count_after_half_close(s, 3_000_000)
        .await
        .expect("answer");
    assert!(
        body(&answer).contains("counted 3000000 bytes on s1"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_nobody_reads_does_not_block_the_others_on_the_same_tunnel() {
    let rig = Rig::start().await;
    // Many endless downloads on h1's tunnel that nobody reads.
    let client = rig.client();
    let mut stalled = client.stalled_downloads("h2", 8).await;
    client.assert_gets_are_not_held_up("h1", 20, 200_000).await;
    // The stalled ones still flow once read.
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    while read < 4 << 20 {
        read += stalled[0].read(&mut buf).await.expect("read stalled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_requests_work_again_soon_after_the_proxy_server_or_an_edge_proxy_restarts() {
    let mut rig = Rig::start().await;
    rig.stop_node("c1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rig.get("h1", "/healthz").await.is_err(),
        "the server is down"
    );
    rig.start_node("c1");
    let t = rig.wait_for("h1").await;
    rig.wait_for("s1").await;
    eprintln!("proxy server restarted: requests through it work again after {t:?}");

    rig.stop_node("s1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = rig
        .get("s1", "/healthz")
        .await
        .expect_err("s1's proxy is down");
    assert!(
        err.contains("502") && err.contains("no tunnel to node s1"),
        "{err}"
    );
    // h1's tunnel is unaffected.
    rig.wait_for("h1").await;
    let started = Instant::now();
    rig.start_node("s1");
    rig.wait_for("s1").await;
    eprintln!(
        "edge proxy restarted: s1 reachable again after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_no_gateway_receives_the_proxy_servers_and_is_reached_through_its_own_tunnel() {
    let rig = Rig::start().await;
    // Its view (the hub's view rule): the gateway carrying the proxy
    // server, and no edge gateway.
    let view = rig.view(LONELY.0);
    assert_eq!(
        view.gateways.keys().map(|g| g.as_str()).collect::<Vec<_>>(),
        vec!["gw-cloud"]
    );
    assert_eq!(
        view.servers()
            .keys()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        vec!["c1"]
    );
    let logs = rig
        .get(LONELY.0, "/containerLogs/default/web-9/app")
        .await
        .expect("logs");
    assert!(
        body(&logs).contains("log line 1 of default/web-9/app on lonely"),
        "{logs}"
    );
    // Its tunnel is its own: when its proxy stops, nothing else reaches it.
    let mut rig = rig;
    rig.stop_node(LONELY.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = rig
        .get(LONELY.0, "/healthz")
        .await
        .expect_err("lonely's proxy is down");
    assert!(err.contains("no tunnel to node lonely"), "{err}");
    rig.wait_for("h2").await;
    rig.start_node(LONELY.0);
    rig.wait_for(LONELY.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_connect_listener_speaks_tls_and_serves_only_clients_with_a_certificate_from_its_ca()
 {
    let rig = Rig::start().await;
    let e = &rig.egress;
    // A client certificate from the CA: CONNECT by node name works.
    let tls = e
        .dial(Some(&e.client))
        .await
        .expect("TLS with a certificate");
    let conn = fake_kubelet::egress_connect(tls, &format!("h2:{}", rig.kubelet_port))
        .await
        .expect("CONNECT over TLS");
    let kubelet = fake_kubelet::kubelet_tls(conn, "h2", rig.client_tls.clone())
        .await
        .expect("kubelet TLS inside the proxy's TLS");
    let got = fake_kubelet::get(kubelet, "h2", "/healthz")
        .await
        .expect("get");
    assert!(got.contains("ok h2"), "{got}");
    // No certificate, or one from another CA: no CONNECT is served.
    let stranger = fake_kubelet::KubeletCa::new().client("intruder");
    for (who, client) in [("no certificate", None), ("another CA's", Some(&stranger))] {
        let refused = match e.dial(client).await {
            Err(_) => true,
            Ok(tls) => fake_kubelet::egress_connect(tls, &format!("h2:{}", rig.kubelet_port))
                .await
                .is_err(),
        };
        assert!(refused, "a client with {who} certificate was served");
    }
    // Plain HTTP on the TLS port gets no 200 either.
    let tcp = tokio::net::TcpStream::connect(e.addr).await.expect("tcp");
    let plain = tokio::time::timeout(
        Duration::from_secs(10),
        fake_kubelet::egress_connect(tcp, &format!("h2:{}", rig.kubelet_port)),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "plain CONNECT was served on the TLS port"
    );
}
