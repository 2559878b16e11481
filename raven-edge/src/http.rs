//! The agent's HTTP endpoint: `/healthz` (the process runs), `/readyz` (the
//! last reconcile succeeded, and the agent is not holding the kernel state
//! for want of a usable cache — [`crate::hold`]) and `/metrics`, including the age of the last
//! contact with a hub — staleness is visible, and never a reason to tear
//! anything down.

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Health;

fn contact_age_seconds(h: &Health) -> Option<f64> {
    let last = h.last_contact_ms.load(Ordering::Relaxed);
    if last == 0 {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Some(now.saturating_sub(last) as f64 / 1000.0)
}

async fn readyz(State(h): State<Health>) -> (StatusCode, String) {
    if let Some(why) = h.holding.lock().ok().and_then(|w| w.clone()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    if h.dataplane_ok.load(Ordering::Relaxed) {
        (
            StatusCode::OK,
            format!("ready: revision {}\n", h.revision.load(Ordering::Relaxed)),
        )
    } else {
        let err = h
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("dataplane not reconciled: {err}\n"),
        )
    }
}

async fn metrics(State(h): State<Health>) -> String {
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, v: f64| {
        out.push_str(&format!("# HELP raven_edge_{name} {help}\n# TYPE raven_edge_{name} {kind}\nraven_edge_{name} {v}\n"));
    };
    line(
        "revision",
        "Revision of the state the dataplane was reconciled from",
        "gauge",
        h.revision.load(Ordering::Relaxed) as f64,
    );
    line(
        "dataplane_ok",
        "1 when the last reconcile succeeded",
        "gauge",
        f64::from(u8::from(h.dataplane_ok.load(Ordering::Relaxed))),
    );
    line(
        "holding_kernel_state",
        "1 while the agent holds the kernel state as found (no usable cache, no complete snapshot yet) and changes nothing",
        "gauge",
        f64::from(u8::from(h.is_holding())),
    );
    line(
        "reconciles_total",
        "Reconcile passes",
        "counter",
        h.reconciles.load(Ordering::Relaxed) as f64,
    );
    line(
        "ops_applied_total",
        "Kernel changes made",
        "counter",
        h.ops_applied.load(Ordering::Relaxed) as f64,
    );
    line(
        "hub_contact_age_seconds",
        "Seconds since the last message from a hub (-1: never)",
        "gauge",
        contact_age_seconds(&h).unwrap_or(-1.0),
    );
    let peers = h.peers.lock().map(|p| p.clone()).unwrap_or_default();
    if !peers.is_empty() {
        out.push_str("# HELP raven_edge_tunnel_handshake_age_seconds Seconds since the last WireGuard handshake with a peer gateway\n# TYPE raven_edge_tunnel_handshake_age_seconds gauge\n");
        for p in &peers {
            if let Some(age) = p.handshake_age_seconds {
                out.push_str(&format!("raven_edge_tunnel_handshake_age_seconds{{peer=\"{}\",endpoint=\"{}\"}} {age}\n", p.peer_node, p.endpoint));
            }
        }
        out.push_str("# HELP raven_edge_tunnel_rx_bytes Bytes received from a peer gateway\n# TYPE raven_edge_tunnel_rx_bytes counter\n");
        for p in &peers {
            out.push_str(&format!(
                "raven_edge_tunnel_rx_bytes{{peer=\"{}\"}} {}\n",
                p.peer_node, p.rx_bytes
            ));
        }
        out.push_str("# HELP raven_edge_tunnel_tx_bytes Bytes sent to a peer gateway\n# TYPE raven_edge_tunnel_tx_bytes counter\n");
        for p in &peers {
            out.push_str(&format!(
                "raven_edge_tunnel_tx_bytes{{peer=\"{}\"}} {}\n",
                p.peer_node, p.tx_bytes
            ));
        }
        out.push_str("# HELP raven_edge_tunnel_path The path to a peer gateway in use: direct or relayed (through a public gateway)\n# TYPE raven_edge_tunnel_path gauge\n");
        for p in &peers {
            out.push_str(&format!(
                "raven_edge_tunnel_path{{peer=\"{}\",endpoint=\"{}\",path=\"{}\"}} 1\n",
                p.peer_node,
                p.endpoint,
                if p.relayed { "relayed" } else { "direct" }
            ));
        }
    }
    let failover = h
        .local_failover
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    out.push_str("# HELP raven_edge_local_failover Gateways whose tunnel this node sends to another node than the hub elected (local failover)\n# TYPE raven_edge_local_failover gauge\n");
    for (gateway, node) in &failover {
        out.push_str(&format!(
            "raven_edge_local_failover{{gateway=\"{gateway}\",node=\"{node}\"}} 1\n"
        ));
    }
    out
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, health: Health, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "HTTP endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::{GatewayName, NodeName};

    #[tokio::test]
    async fn metrics_show_each_peers_path_and_the_local_failover_in_effect() {
        let h = Health::default();
        if let Ok(mut p) = h.peers.lock() {
            p.push(raven_proto::v1::PeerTunnelState {
                peer_node: "q1".into(),
                handshake_age_seconds: Some(3),
                endpoint: "198.51.100.1:4500".into(),
                relayed: true,
                ..Default::default()
            });
        }
        if let (Ok(mut f), Ok(g), Ok(n)) = (
            h.local_failover.lock(),
            GatewayName::new("gw-hz"),
            NodeName::new("h2"),
        ) {
            f.insert(g, n);
        }
        let text = metrics(State(h)).await;
        assert!(
            text.contains(
                "raven_edge_tunnel_path{peer=\"q1\",endpoint=\"198.51.100.1:4500\",path=\"relayed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("raven_edge_local_failover{gateway=\"gw-hz\",node=\"h2\"} 1"),
            "{text}"
        );
    }
}
