//! The agent's HTTP endpoint: `/healthz` (the process runs), `/readyz` (the
//! last reconcile succeeded, and the agent is not holding the kernel state
//! for want of a usable cache — [`crate::hold`]), `/status` (the document
//! `raven-edge status` prints, JSON — [`crate::status`]) and `/metrics`.
//!
//! Metrics are `prometheus-client` types built from the agent's state at
//! each scrape, written as the classic text format or OpenMetrics as the
//! scraper asks (`raven_cli::metrics`). Series are bounded: per-peer
//! families are labelled by the peer's node name only (one row per other
//! gateway's tunnel node: at most one per gateway), never by an `ip:port`
//! that changes with every NAT remapping — the endpoint in use is in
//! `raven-edge status`. The age of the last contact with a hub is there
//! only once a hub was reached: staleness is visible, and never a reason
//! to tear anything down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::Health;
use crate::cache::CachedState;

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub node: String,
    pub health: Health,
    pub state: watch::Receiver<Arc<CachedState>>,
}

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

async fn readyz(State(s): State<Sources>) -> (StatusCode, String) {
    let h = &s.health;
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

async fn status(State(s): State<Sources>) -> ([(header::HeaderName, &'static str); 1], String) {
    let state = s.state.borrow().clone();
    let doc = crate::status::build(&s.node, &s.health, &state);
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&doc).unwrap_or_default(),
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SaLabel {
    peer: String,
    state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabel {
    path: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailoverLabel {
    gateway: String,
    node: String,
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

/// Every family of the agent, with the values of now.
pub fn registry(h: &Health) -> Registry {
    let mut r = Registry::with_prefix("raven_edge");
    raven_cli::metrics::register_build_info(
        &mut r,
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_RUST_VERSION"),
    );
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    r.register(
        "revision",
        "Revision of the state the dataplane was reconciled from",
        gauge(n(h.revision.load(Ordering::Relaxed))),
    );
    r.register(
        "dataplane_ok",
        "1 when the last reconcile succeeded",
        gauge(i64::from(h.dataplane_ok.load(Ordering::Relaxed))),
    );
    r.register(
        "holding_kernel_state",
        "1 while the agent holds the kernel state as found (no usable cache, no complete snapshot yet) and changes nothing",
        gauge(i64::from(h.is_holding())),
    );
    r.register(
        "reconciles",
        "Reconcile passes",
        ConstCounter::new(h.reconciles.load(Ordering::Relaxed)),
    );
    r.register(
        "ops_applied",
        "Kernel changes made",
        ConstCounter::new(h.ops_applied.load(Ordering::Relaxed)),
    );
    r.register(
        "hub_connected",
        "1 while a hub stream is open",
        gauge(i64::from(h.hub_session.load(Ordering::Relaxed))),
    );
    // No sample until a hub was reached (no sentinel value).
    if let Some(a) = contact_age_seconds(h) {
        let age: Gauge<f64, AtomicU64> = Gauge::default();
        age.set(a);
        r.register(
            "hub_contact_age_seconds",
            "Seconds since the last message from a hub (absent until a hub was reached)",
            age,
        );
    }
    let peers = h.peers.lock().map(|p| p.clone()).unwrap_or_default();
    let handshake = Family::<PeerLabel, Gauge>::default();
    // The registry is built for this scrape alone, so a fresh counter
    // raised by the device's total carries that total.
    let rx = Family::<PeerLabel, Counter>::default();
    let tx = Family::<PeerLabel, Counter>::default();
    let relayed = Family::<PeerLabel, Gauge>::default();
    let ipsec_sa = Family::<SaLabel, Gauge>::default();
    let by_path = Family::<PathLabel, Gauge>::default();
    for path in ["direct", "relayed"] {
        by_path.get_or_create(&PathLabel { path }).set(0);
    }
    // A relay's rows about direct-path devices carry no traffic here.
    for p in peers.iter().filter(|p| !p.direct_device) {
        let label = PeerLabel {
            peer: p.peer_node.clone(),
        };
        if let Some(a) = p.handshake_age_seconds {
            handshake.get_or_create(&label).set(n(a));
        }
        relayed.get_or_create(&label).set(i64::from(p.relayed));
        by_path
            .get_or_create(&PathLabel {
                path: if p.relayed { "relayed" } else { "direct" },
            })
            .inc();
        rx.get_or_create(&label).inc_by(p.rx_bytes);
        tx.get_or_create(&label).inc_by(p.tx_bytes);
        // A relayed row shares the relay's SA: counted once, on its row.
        if !p.ipsec_state.is_empty() && !p.relayed {
            ipsec_sa
                .get_or_create(&SaLabel {
                    peer: p.peer_node.clone(),
                    state: p.ipsec_state.clone(),
                })
                .set(1);
        }
    }
    r.register(
        "tunnel_peers",
        "Tunnel peers (other gateways' tunnel nodes) by path in use: direct, or relayed through a public gateway",
        by_path,
    );
    r.register(
        "tunnel_handshake_age_seconds",
        "Seconds since the last WireGuard handshake with a peer, or (IPsec) since its CHILD_SA was installed or last rekeyed",
        handshake,
    );
    r.register(
        "ipsec_sa",
        "1 for each IPsec peer, labelled with the state of its IKE_SA and CHILD_SA (ESTABLISHED/INSTALLED when up)",
        ipsec_sa,
    );
    r.register(
        "tunnel_relayed",
        "1 when traffic to a peer goes through a relay gateway, 0 when direct",
        relayed,
    );
    r.register("tunnel_rx_bytes", "Bytes received from a peer", rx);
    r.register("tunnel_tx_bytes", "Bytes sent to a peer", tx);
    let failover = Family::<FailoverLabel, Gauge>::default();
    if let Ok(f) = h.local_failover.lock() {
        for (gateway, node) in f.iter() {
            failover
                .get_or_create(&FailoverLabel {
                    gateway: gateway.to_string(),
                    node: node.to_string(),
                })
                .set(1);
        }
    }
    r.register(
        "local_failover",
        "Gateways whose tunnel this node sends to another node than the hub elected (local failover)",
        failover,
    );
    r
}

async fn metrics(
    State(s): State<Sources>,
    headers: HeaderMap,
) -> ([(header::HeaderName, &'static str); 1], String) {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = raven_cli::metrics::render(&registry(&s.health), accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(sources);
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

    #[test]
    fn peer_series_carry_the_peer_name_only_and_the_local_failover_in_effect() {
        let h = Health::default();
        if let Ok(mut p) = h.peers.lock() {
            p.push(raven_proto::v1::PeerTunnelState {
                peer_node: "q1".into(),
                handshake_age_seconds: Some(3),
                endpoint: "198.51.100.1:4500".into(),
                relayed: true,
                rx_bytes: 10,
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
        let (_, text) = raven_cli::metrics::render(&registry(&h), None);
        for line in [
            "raven_edge_tunnel_relayed{peer=\"q1\"} 1\n",
            "raven_edge_tunnel_rx_bytes_total{peer=\"q1\"} 10\n",
            "raven_edge_tunnel_peers{path=\"relayed\"} 1\n",
            "raven_edge_tunnel_peers{path=\"direct\"} 0\n",
            "raven_edge_local_failover{gateway=\"gw-hz\",node=\"h2\"} 1\n",
            "# TYPE raven_edge_reconciles_total counter\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // No IPsec series without IPsec peers.
        assert!(!text.contains("raven_edge_ipsec_sa{"), "{text}");
        // No address label that churns with NAT remappings, no sentinel.
        assert!(!text.contains("198.51.100.1"), "{text}");
        assert!(!text.contains("hub_contact_age_seconds"), "{text}");
    }

    #[test]
    fn ipsec_peers_have_an_sa_state_series_and_their_rekey_age_and_bytes() {
        let h = Health::default();
        if let Ok(mut p) = h.peers.lock() {
            p.push(raven_proto::v1::PeerTunnelState {
                peer_node: "c1".into(),
                handshake_age_seconds: Some(42),
                rx_bytes: 1000,
                tx_bytes: 2000,
                ipsec_state: "ESTABLISHED/INSTALLED".into(),
                ..Default::default()
            });
            // Reached through c1's SA: no SA of its own.
            p.push(raven_proto::v1::PeerTunnelState {
                peer_node: "q1".into(),
                relayed: true,
                ipsec_state: "ESTABLISHED/INSTALLED".into(),
                ..Default::default()
            });
        }
        let (_, text) = raven_cli::metrics::render(&registry(&h), None);
        for line in [
            "raven_edge_ipsec_sa{peer=\"c1\",state=\"ESTABLISHED/INSTALLED\"} 1\n",
            "raven_edge_tunnel_handshake_age_seconds{peer=\"c1\"} 42\n",
            "raven_edge_tunnel_rx_bytes_total{peer=\"c1\"} 1000\n",
            "raven_edge_tunnel_tx_bytes_total{peer=\"c1\"} 2000\n",
            "raven_edge_tunnel_relayed{peer=\"q1\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("raven_edge_ipsec_sa{peer=\"q1\""), "{text}");
    }
}
