//! The agent's hook into the layer-7 proxy (`raven_proxy`): the node's
//! proxy view follows the cached state; the proxy opens and closes its
//! listeners and tunnels from it.

use std::sync::Arc;

use raven_proxy::{ProxyConfig, ProxyView};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::CachedState;

/// Runs the proxy until `shutdown`, from the cached states on `state`.
pub async fn run(
    cfg: ProxyConfig,
    mut state: watch::Receiver<Arc<CachedState>>,
    shutdown: CancellationToken,
) {
    let node = cfg.node.clone();
    let view_of = |s: &CachedState| ProxyView::from_resources(&node, &s.resources);
    let first = view_of(&state.borrow_and_update());
    let (tx, rx) = watch::channel(first);
    let proxy = tokio::spawn(raven_proxy::run(cfg, rx, shutdown.clone()));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = state.changed() => if r.is_err() { break },
        }
        let view = view_of(&state.borrow_and_update());
        tx.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }
    let _ = proxy.await;
}
