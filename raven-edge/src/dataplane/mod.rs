//! The node dataplane: desired state (pure) → plan (pure diff) → apply
//! (rtnetlink), level-triggered and idempotent. Calling [`Kernel::reconcile`]
//! again is drift repair.
//!
//! ```text
//! NodeInputs ──desired()──▶ Desired ─┐
//! kernel ──netlink::observe()──▶ State ┴─plan()──▶ Vec<Op> ──netlink::apply()──▶ kernel
//! ```
//!
//! What raven owns, and all it ever reads or changes: the link `raven0`
//! (VXLAN, VNI 1) and the addresses, neighbours and FDB entries on it,
//! routes of protocol 82 in tables 9027 (remote prefixes) and 9028 (return
//! routes on the gateway), and rules of priority 9027 and 9028 — see the
//! constants in [`model`]. In the `nat` tables (iptables and ip6tables):
//! the chains `RAVEN-SKIP-NAT` and `RAVEN-SKIP-NAT-DST` and the
//! `POSTROUTING` rule jumping to them, which keep the CNI from masquerading
//! traffic from this node's domain to remote domains — see [`skipnat`].
//! They are applied after the routes; a failure there (no iptables on the
//! host, say) is a warning of the reconcile, never a reason to skip routes.

pub mod model;
pub mod netlink;
pub mod skipnat;

use std::collections::BTreeMap;

use raven_model::NodeName;
use raven_proto::v1;

pub use model::{Desired, NodeInputs, Op, State, desired, plan};
pub use netlink::{DataplaneError, TunnelDevs};

use crate::cache::CachedState;

/// Builds the dataplane inputs of `node` from its cached view.
pub fn inputs_from(node: &NodeName, state: &CachedState) -> NodeInputs {
    let view = state.view(node);
    NodeInputs {
        me: view.as_ref().map(|v| v.me.clone()),
        gateways: view
            .as_ref()
            .map(|v| v.gateways.clone())
            .unwrap_or_default(),
        settings: view.as_ref().and_then(|v| v.settings.clone()),
        active_override: BTreeMap::new(),
        underlay_mtu: 0,
        tunnel_dev: model::DEFAULT_TUNNEL_DEV.to_owned(),
        tunnel_up: false,
        direct: Default::default(),
    }
}

/// What one reconcile did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    pub ops_applied: usize,
    pub summary: v1::ApplySummary,
    pub warnings: Vec<String>,
}

/// The kernel of the current network namespace.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `false`: observe and plan, never write (dry run).
    write: bool,
}

fn summary(s: &State) -> v1::ApplySummary {
    v1::ApplySummary {
        routes: s.routes.len() as u32,
        rules: s.rules.len() as u32,
        links: u32::from(s.link.is_some()),
        tunnels: 0,
    }
}

impl Kernel {
    pub fn new(write: bool) -> Self {
        Self { write }
    }

    /// A dataplane that observes (netlink dumps need no privileges) and
    /// plans, but never writes: `raven-edge plan`.
    pub fn dry_run() -> Self {
        Self::new(false)
    }

    /// Raven's objects in the kernel now.
    pub async fn observe(&self, devs: TunnelDevs<'_>) -> Result<State, DataplaneError> {
        let h = netlink::connect()?;
        netlink::observe(&h, devs).await
    }

    /// Whether this dataplane changes the kernel (not a dry run).
    pub fn writes(&self) -> bool {
        self.write
    }

    async fn desired(
        &self,
        h: &rtnetlink::Handle,
        inputs: &NodeInputs,
    ) -> Result<Desired, DataplaneError> {
        let mut inputs = inputs.clone();
        if inputs.underlay_mtu == 0 {
            let private = inputs.me.as_ref().and_then(|m| m.private_ip);
            inputs.underlay_mtu = match private {
                Some(ip) => netlink::underlay_mtu(h, ip).await?.unwrap_or(1500),
                None => 1500,
            };
        }
        Ok(desired(&inputs))
    }

    /// What reconciling would change now.
    pub async fn plan(&self, inputs: &NodeInputs) -> Result<Vec<Op>, DataplaneError> {
        let h = netlink::connect()?;
        let want = self.desired(&h, inputs).await?;
        let have = netlink::observe(&h, devs(inputs)).await?;
        Ok(plan(&want.state, &have))
    }

    /// Observe → plan → apply.
    pub async fn reconcile(&self, inputs: &NodeInputs) -> Result<ReconcileReport, DataplaneError> {
        let h = netlink::connect()?;
        let want = self.desired(&h, inputs).await?;
        let have = netlink::observe(&h, devs(inputs)).await?;
        let ops = plan(&want.state, &have);
        for w in &want.warnings {
            tracing::warn!(warning = %w, "dataplane");
        }
        let skip_nat = skipnat::spec(inputs);
        if !self.write {
            tracing::debug!(
                v4_sources = skip_nat.v4.sources.len(),
                v6_sources = skip_nat.v6.sources.len(),
                "dry run: skip-NAT rules computed, not applied"
            );
            return Ok(ReconcileReport {
                ops_applied: 0,
                summary: summary(&have),
                warnings: want.warnings,
            });
        }
        if want.state.link.is_some() {
            enable_forwarding();
        }
        let applied = netlink::apply(&h, &ops, devs(inputs)).await?;
        for c in &applied.conflicts {
            tracing::warn!(conflict = %c, "dataplane");
        }
        let mut warnings = want.warnings;
        warnings.extend(applied.conflicts);
        let nat = skipnat::apply(&skip_nat).await;
        for e in &nat.errors {
            tracing::warn!(error = %e, "skip-NAT");
            warnings.push(format!("skip-NAT: {e}"));
        }
        Ok(ReconcileReport {
            ops_applied: applied.ops + nat.changes,
            summary: summary(&want.state),
            warnings,
        })
    }

    /// Removes every object raven owns from the kernel: routes, rules,
    /// `raven0`, the skip-NAT rules (also when removing the rest failed) and
    /// the tunnel devices `tunnel_dev` and its direct-path device.
    pub async fn teardown(&self, tunnel_dev: &str) -> Result<usize, DataplaneError> {
        let direct = crate::tunnel::direct_dev(tunnel_dev);
        let devs = TunnelDevs {
            tunnel: tunnel_dev,
            direct: &direct,
        };
        let routes = async {
            let h = netlink::connect()?;
            let have = netlink::observe(&h, devs).await?;
            let ops = plan(&State::default(), &have);
            Ok::<_, DataplaneError>(netlink::apply(&h, &ops, devs).await?.ops)
        }
        .await;
        let nat = skipnat::teardown().await;
        let mut ops = routes?;
        // The tunnels go last (routes into them went first); wireguard-go
        // exits when its link is deleted.
        let h = netlink::connect()?;
        for dev in [tunnel_dev, direct.as_str()] {
            if let Some(index) = netlink::link_index(&h, dev).await? {
                h.link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(|source| DataplaneError::Netlink {
                        op: format!("ip link del {dev}"),
                        source,
                    })?;
                ops += 1;
            }
        }
        if !nat.errors.is_empty() {
            let reason = nat
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(DataplaneError::Invalid {
                op: "removing the skip-NAT rules".into(),
                reason,
            });
        }
        Ok(ops + nat.changes)
    }
}

/// The tunnel devices `inputs` names.
fn devs(inputs: &NodeInputs) -> TunnelDevs<'_> {
    TunnelDevs {
        tunnel: &inputs.tunnel_dev,
        direct: &inputs.direct.dev,
    }
}

/// Gateways and members forward for pods and remote domains. The sysctls
/// are per network namespace. Failures are logged: a read-only /proc (in a
/// dry run, say) must not stop reconciling.
fn enable_forwarding() {
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
        ("/proc/sys/net/ipv4/conf/all/rp_filter", "2"),
    ] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
            continue;
        }
        if let Err(e) = std::fs::write(path, value) {
            tracing::warn!(%path, error = %e, "could not set sysctl");
        }
    }
}
