//! Prometheus metrics of the hub and the HTTP endpoint serving them with
//! `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The hub's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    streams: Gauge<i64, AtomicI64>,
    revision: Gauge<i64, AtomicI64>,
    pushes: Counter<u64, AtomicU64>,
    pushed_resources: Counter<u64, AtomicU64>,
    push_latency: Histogram,
    nacks: Counter<u64, AtomicU64>,
    admission_rejections: Counter<u64, AtomicU64>,
    problems: Gauge<i64, AtomicI64>,
    reports_applied: Counter<u64, AtomicU64>,
    reports_coalesced: Counter<u64, AtomicU64>,
    connections_refused: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("raven_hub");
        let streams = Gauge::default();
        registry.register("streams", "Open agent Sync streams", streams.clone());
        let revision = Gauge::default();
        registry.register("revision", "Current topology revision", revision.clone());
        let pushes = Counter::default();
        registry.register("pushes", "Updates sent to agents", pushes.clone());
        let pushed_resources = Counter::default();
        registry.register(
            "pushed_resources",
            "Resources sent to agents",
            pushed_resources.clone(),
        );
        let push_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "push_ack_seconds",
            "Time from sending an Update to its Ack (persisted on the node)",
            push_latency.clone(),
        );
        let nacks = Counter::default();
        registry.register("nacks", "Updates rejected by agents", nacks.clone());
        let admission_rejections = Counter::default();
        registry.register(
            "admission_rejections",
            "Streams refused with RESOURCE_EXHAUSTED",
            admission_rejections.clone(),
        );
        let problems = Gauge::default();
        registry.register(
            "problems",
            "Problems in the current topology inputs",
            problems.clone(),
        );
        let reports_applied = Counter::default();
        registry.register(
            "reports_applied",
            "Agent Reports taken in",
            reports_applied.clone(),
        );
        let reports_coalesced = Counter::default();
        registry.register(
            "reports_coalesced",
            "Agent Reports over their node's rate, replaced by a later one",
            reports_coalesced.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because the connection limit was reached",
            connections_refused.clone(),
        );
        Self {
            registry: Arc::new(registry),
            connections_refused,
            reports_applied,
            reports_coalesced,
            streams,
            revision,
            pushes,
            pushed_resources,
            push_latency,
            nacks,
            admission_rejections,
            problems,
        }
    }

    pub fn stream_opened(&self) {
        self.streams.inc();
    }
    pub fn stream_closed(&self) {
        self.streams.dec();
    }
    pub fn pushed(&self, resources: usize) {
        self.pushes.inc();
        self.pushed_resources.inc_by(resources as u64);
    }
    pub fn acked(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }
    pub fn nacked(&self) {
        self.nacks.inc();
    }
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }
    /// Connections refused at the limit so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }
    pub fn report_applied(&self) {
        self.reports_applied.inc();
    }
    pub fn report_coalesced(&self) {
        self.reports_coalesced.inc();
    }
    /// Reports taken in so far.
    pub fn reports_applied(&self) -> u64 {
        self.reports_applied.get()
    }
    pub fn admission_rejected(&self) {
        self.admission_rejections.inc();
    }
    pub fn published(&self, revision: u64, problems: usize) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        self.problems
            .set(i64::try_from(problems).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
