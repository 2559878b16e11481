//! The hub's HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process
//! runs) and `/readyz` (sources synced, a topology is published).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::metrics::Metrics;
use crate::pipeline::PublishedRx;

#[derive(Debug, Clone)]
struct AppState {
    metrics: Metrics,
    published: PublishedRx,
    agents: Agents,
}

async fn metrics(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ([(header::HeaderName, &'static str); 1], String) {
    let (epoch, revision) = {
        let p = s.published.borrow();
        (p.epoch.clone(), p.revision)
    };
    s.metrics.set_fleet(s.agents.fleet(&epoch, revision));
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.metrics.render_for(accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let p = s.published.borrow().clone();
    if p.ready {
        (
            StatusCode::OK,
            format!("ready: epoch {} revision {}\n", p.epoch, p.revision),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "sources not synced yet\n".to_owned(),
        )
    }
}

/// Serves the endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics_: Metrics,
    published: PublishedRx,
    agents: Agents,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics: metrics_,
            published,
            agents,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
