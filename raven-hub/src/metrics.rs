//! Prometheus metrics of the hub: every family is registered here, in
//! [`Metrics::new`] (one place to look; `raven_cli::metrics` writes them out,
//! classic text or OpenMetrics as the scraper asks). Served on `/metrics` by
//! [`crate::http`].
//!
//! Fleet signals are counted when scraped, from the agent table and the
//! published revision ([`Metrics::set_fleet`]): agents by state, connected
//! agents behind on their ACK or their apply, failed applies. Label values
//! are bounded: no node names, no addresses.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::agents::Fleet;
use crate::index::Kind;

/// `state` label of `raven_hub_agents`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// `kind` label of `raven_hub_plans`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PlanLabel {
    kind: &'static str,
}

/// How a session worked out what its agent needs (`raven_hub_plans`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Resumed by digest against the published revision: nothing to plan.
    Resumed,
    /// In sync with the published revision already.
    InSync,
    /// From the names changed since the revision its agent holds.
    Delta,
    /// From the node's whole view.
    Full,
}

impl Plan {
    const ALL: [Plan; 4] = [Plan::Resumed, Plan::InSync, Plan::Delta, Plan::Full];

    fn label(self) -> PlanLabel {
        PlanLabel {
            kind: match self {
                Plan::Resumed => "resumed",
                Plan::InSync => "in_sync",
                Plan::Delta => "delta",
                Plan::Full => "full",
            },
        }
    }
}

/// `kind` label of `raven_hub_kubernetes_watch_errors`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Time of one compile of the topology (election, views, versions), fed by
/// the pipeline wherever it runs ([`compile_observed`]).
static COMPILE_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
/// Failed Kubernetes watches, by kind ([`kubernetes_watch_error`]).
static KUBE_WATCH_ERRORS: LazyLock<Family<KindLabel, Counter>> = LazyLock::new(Family::default);

/// Records one compile's duration.
pub fn compile_observed(took: Duration) {
    COMPILE_SECONDS.observe(took.as_secs_f64());
}

/// Counts one failed Kubernetes watch (list or watch request) of `kind`.
pub fn kubernetes_watch_error(kind: impl std::fmt::Debug) {
    KUBE_WATCH_ERRORS.get_or_create(&kind_label(kind)).inc();
}

fn kind_label(kind: impl std::fmt::Debug) -> KindLabel {
    KindLabel {
        kind: format!("{kind:?}").to_lowercase(),
    }
}

/// The hub's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    streams: Gauge<i64, AtomicI64>,
    revision: Gauge<i64, AtomicI64>,
    revision_published_at: Gauge<f64, AtomicU64>,
    pushes: Counter<u64, AtomicU64>,
    pushed_resources: Counter<u64, AtomicU64>,
    push_latency: Histogram,
    nacks: Counter<u64, AtomicU64>,
    digest_resumes: Counter<u64, AtomicU64>,
    inventory_requests: Counter<u64, AtomicU64>,
    admission_rejections: Counter<u64, AtomicU64>,
    problems: Gauge<i64, AtomicI64>,
    reports_applied: Counter<u64, AtomicU64>,
    reports_coalesced: Counter<u64, AtomicU64>,
    connections_refused: Counter<u64, AtomicU64>,
    agents: Family<StateLabel, Gauge<i64, AtomicI64>>,
    /// `raven_hub_plans_total` by [`Plan`] (held apart: no label lookup
    /// per plan, 10,000 of which follow every change).
    plans: [Counter; 4],
    /// `raven_hub_tls_handshakes_total`: `[full, resumed]`.
    tls_handshakes: [Counter; 2],
    acked_behind: Gauge<i64, AtomicI64>,
    applied_behind: Gauge<i64, AtomicI64>,
    applied_failed: Gauge<i64, AtomicI64>,
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
        let revision_published_at = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "revision_published_timestamp_seconds",
            "When this replica published its current revision (Unix time)",
            revision_published_at.clone(),
        );
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
        let digest_resumes = Counter::default();
        registry.register(
            "digest_resumes",
            "Streams whose Hello digest matched the node's view (no list, nothing resent)",
            digest_resumes.clone(),
        );
        let inventory_requests = Counter::default();
        registry.register(
            "inventory_requests",
            "Streams whose Hello digest differed from the node's view (the agent was asked for its list)",
            inventory_requests.clone(),
        );
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
        let agents = Family::default();
        registry.register(
            "agents",
            "Agents this replica knows of, by state (connected or disconnected)",
            agents.clone(),
        );
        let plan_family = Family::<PlanLabel, Counter>::default();
        let plans = Plan::ALL.map(|how| plan_family.get_or_create(&how.label()).clone());
        registry.register(
            "plans",
            "Updates planned for agents, by how (full: from the node's whole view)",
            plan_family,
        );
        let tls_family = Family::<PlanLabel, Counter>::default();
        let tls_handshakes =
            ["full", "resumed"].map(|kind| tls_family.get_or_create(&PlanLabel { kind }).clone());
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed on the mTLS listener, by kind (resumed: from a session ticket, no certificate checked)",
            tls_family,
        );
        let acked_behind = Gauge::default();
        registry.register(
            "agents_acked_behind",
            "Connected agents that have not acknowledged the published revision",
            acked_behind.clone(),
        );
        let applied_behind = Gauge::default();
        registry.register(
            "agents_applied_behind",
            "Connected agents that have not reported the published revision applied",
            applied_behind.clone(),
        );
        let applied_failed = Gauge::default();
        registry.register(
            "agents_apply_failed",
            "Agents whose last Applied report says programming the kernel failed",
            applied_failed.clone(),
        );
        registry.register(
            "compile_seconds",
            "Time of one compile of the topology",
            COMPILE_SECONDS.clone(),
        );
        // Every kind is there from the start, at 0 until a watch fails.
        for kind in Kind::SOURCES
            .into_iter()
            .chain([Kind::Service, Kind::Endpoints])
        {
            let _ = KUBE_WATCH_ERRORS.get_or_create(&kind_label(kind));
        }
        registry.register(
            "kubernetes_watch_errors",
            "Failed Kubernetes list or watch requests, by kind",
            KUBE_WATCH_ERRORS.clone(),
        );
        raven_cli::metrics::register_build_info(
            &mut registry,
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_RUST_VERSION"),
        );
        Self {
            agents,
            plans,
            tls_handshakes,
            acked_behind,
            applied_behind,
            applied_failed,
            registry: Arc::new(registry),
            connections_refused,
            reports_applied,
            reports_coalesced,
            streams,
            revision,
            revision_published_at,
            pushes,
            pushed_resources,
            push_latency,
            nacks,
            digest_resumes,
            inventory_requests,
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
    /// A TLS handshake completed on the mTLS listener.
    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes[usize::from(resumed)].inc();
    }
    /// TLS handshakes completed so far: (full, resumed).
    pub fn tls_handshakes(&self) -> (u64, u64) {
        (self.tls_handshakes[0].get(), self.tls_handshakes[1].get())
    }
    pub fn planned(&self, how: Plan) {
        self.plans[how as usize].inc();
    }
    pub fn acked(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }
    pub fn nacked(&self) {
        self.nacks.inc();
    }
    pub fn digest_resumed(&self) {
        self.digest_resumes.inc();
    }
    pub fn inventory_requested(&self) {
        self.inventory_requests.inc();
    }
    /// Streams resumed by a matching digest so far.
    pub fn digest_resumes(&self) -> u64 {
        self.digest_resumes.get()
    }
    /// Streams asked for their list after a digest mismatch so far.
    pub fn inventory_requests(&self) -> u64 {
        self.inventory_requests.get()
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
    /// Streams refused by the initial-sync admission so far.
    pub fn admission_rejections(&self) -> u64 {
        self.admission_rejections.get()
    }
    /// Records the published state: its revision (stamped with the time it
    /// was first seen here, so the change → published part of an update's
    /// latency can be read apart from the fan-out) and its problems.
    pub fn published(&self, revision: u64, problems: usize) {
        let revision = i64::try_from(revision).unwrap_or(i64::MAX);
        if self.revision.set(revision) != revision {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.revision_published_at.set(now.as_secs_f64());
        }
        self.problems
            .set(i64::try_from(problems).unwrap_or(i64::MAX));
    }

    /// Sets the fleet gauges (counted by the caller at scrape time).
    pub fn set_fleet(&self, fleet: Fleet) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (state, v) in [
            ("connected", fleet.connected),
            ("disconnected", fleet.disconnected),
        ] {
            self.agents.get_or_create(&StateLabel { state }).set(n(v));
        }
        self.acked_behind.set(n(fleet.acked_behind));
        self.applied_behind.set(n(fleet.applied_behind));
        self.applied_failed.set(n(fleet.applied_failed));
    }

    /// The exposition for a scrape sending `accept`: content type and body.
    pub fn render_for(&self, accept: Option<&str>) -> (&'static str, String) {
        raven_cli::metrics::render(&self.registry, accept)
    }

    /// The classic text exposition format.
    pub fn render(&self) -> String {
        self.render_for(None).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` in the text exposition.
    fn sample(m: &Metrics, name: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
    }

    const STAMP: &str = "raven_hub_revision_published_timestamp_seconds";

    #[test]
    fn the_publish_timestamp_is_set_by_a_new_revision_and_kept_by_a_republish_of_the_same_one() {
        let m = Metrics::new();
        assert_eq!(sample(&m, STAMP), 0.0, "nothing published yet");
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        m.published(7, 0);
        let first = sample(&m, STAMP);
        assert!(
            first >= before.floor(),
            "{first} is not a time after {before}"
        );
        std::thread::sleep(Duration::from_millis(20));
        // The same revision again (only problems or freshness changed):
        // the revision was published when it first was.
        m.published(7, 3);
        assert_eq!(sample(&m, STAMP), first);
        assert_eq!(sample(&m, "raven_hub_problems"), 3.0);
        m.published(8, 3);
        assert!(sample(&m, STAMP) > first, "a new revision is stamped anew");
        assert_eq!(sample(&m, "raven_hub_revision"), 8.0);
    }

    #[test]
    fn tls_handshakes_are_counted_by_kind_from_zero() {
        let m = Metrics::new();
        let full = "raven_hub_tls_handshakes_total{kind=\"full\"}";
        let resumed = "raven_hub_tls_handshakes_total{kind=\"resumed\"}";
        assert_eq!((sample(&m, full), sample(&m, resumed)), (0.0, 0.0));
        m.tls_handshake(false);
        m.tls_handshake(true);
        m.tls_handshake(true);
        assert_eq!((sample(&m, full), sample(&m, resumed)), (1.0, 2.0));
    }

    #[test]
    fn every_plan_kind_is_exposed_from_the_start_and_counted_under_its_own_label() {
        let m = Metrics::new();
        let kinds = ["resumed", "in_sync", "delta", "full"];
        for kind in kinds {
            assert_eq!(
                sample(&m, &format!("raven_hub_plans_total{{kind=\"{kind}\"}}")),
                0.0
            );
        }
        m.planned(Plan::Full);
        m.planned(Plan::Delta);
        m.planned(Plan::Delta);
        m.planned(Plan::InSync);
        for (kind, n) in kinds.into_iter().zip([0.0, 1.0, 2.0, 1.0]) {
            assert_eq!(
                sample(&m, &format!("raven_hub_plans_total{{kind=\"{kind}\"}}")),
                n,
                "{kind}"
            );
        }
    }
}
