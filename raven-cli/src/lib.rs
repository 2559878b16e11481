//! Process plumbing shared by `raven-hub` and `raven-edge`: one way to log,
//! one way to stop, one way to keep private keys private ([`files`]), and
//! one backoff, one log-once and one heartbeat rule ([`pace`]).

pub mod files;
pub mod metrics;
pub mod output;
pub mod pace;
pub mod reload;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines
/// when `json`.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Items for a log line, `a, b, c`, or `none`: never Rust's `Debug` form
/// (`["a"]`, `Some(…)`), which an operator should not have to read.
pub fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let out = items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if out.is_empty() {
        "none".to_owned()
    } else {
        out
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes stopping the pod).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
