//! The node dataplane: desired state (pure) → diff (pure) → apply
//! (rtnetlink), level-triggered and idempotent. Calling [`Kernel::reconcile`]
//! again is drift repair.
//!
//! ```text
//! NodeInputs ──desired()──▶ Desired ─┐
//! kernel ──netlink::observe()──▶ State ┴─diff()──▶ Vec<Op> ──netlink::apply()──▶ kernel
//! ```
//!
//! Two passes share that pipeline. A resync ([`Kernel::reconcile`]) reads
//! the kernel in full — raven's routes, rules, link and neighbours, and both
//! `nat` tables — and repairs whatever drifted. A change
//! ([`Kernel::reconcile_change`], when a new topology arrives) plans against
//! what the last pass applied without an error, kept in memory, instead of
//! against a dump: a moved pod subnet writes its two routes and its two
//! skip-NAT rules and reads nothing but the three link indexes (a recreated
//! device makes it a resync). Any error, conflict or refusal forgets that
//! memory, so the next pass is a resync; so is the first after a start.
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

pub mod incremental;
pub mod model;
pub mod netlink;
pub mod skipnat;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::cache::View;
use raven_model::{GatewayName, NodeName};
use raven_proto::v1;

pub use model::{Desired, NodeInputs, Op, State, desired, diff};
pub use netlink::{DataplaneError, TunnelDevs};

/// What the node knows of itself besides the topology: the names of its
/// tunnel devices and the MTU of its underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub tunnel_dev: String,
    pub direct_dev: String,
    pub underlay_mtu: u32,
}

impl Local {
    /// The devices of tunnel device `tunnel_dev` (its direct-path device
    /// named after it) over an underlay of `underlay_mtu` bytes.
    pub fn new(tunnel_dev: &str, underlay_mtu: u32) -> Self {
        Self {
            tunnel_dev: tunnel_dev.to_owned(),
            direct_dev: crate::tunnel::direct_dev(tunnel_dev),
            underlay_mtu,
        }
    }
}

/// The dataplane inputs of this node: its cached `view` (`None`: the cache
/// does not describe it), what it knows of itself and the local failover
/// overrides in effect. The one place [`NodeInputs`] is put together — for
/// `run`, `plan` and the prober alike. The tunnels start down: only the
/// tunnel step, once it has brought them up, marks them so (make before
/// break).
pub fn assemble(
    view: Option<&View>,
    local: &Local,
    active_override: BTreeMap<GatewayName, NodeName>,
) -> NodeInputs {
    NodeInputs {
        me: view.map(|v| v.me.clone()),
        gateways: view.map(|v| v.gateways.clone()).unwrap_or_default(),
        remote: view.map(|v| v.remote.clone()).unwrap_or_default(),
        settings: view.and_then(|v| v.settings.clone()),
        active_override,
        underlay_mtu: local.underlay_mtu,
        tunnel_dev: local.tunnel_dev.clone(),
        tunnel_up: false,
        direct: model::DirectRoutes {
            dev: local.direct_dev.clone(),
            up: false,
            gateways: Default::default(),
        },
    }
}

/// MTU of the link that holds the node's private address `private_ip`
/// (1500 when there is none or it cannot be told).
pub async fn underlay_mtu(private_ip: Option<std::net::IpAddr>) -> u32 {
    const ETHERNET: u32 = 1500;
    let Some(ip) = private_ip else {
        return ETHERNET;
    };
    let h = match netlink::connect() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the underlay MTU; assuming 1500");
            return ETHERNET;
        }
    };
    match netlink::underlay_mtu(&h, ip).await {
        Ok(mtu) => mtu.unwrap_or(ETHERNET),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the underlay MTU; assuming 1500");
            ETHERNET
        }
    }
}

/// What one reconcile did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    pub ops_applied: usize,
    pub summary: v1::ApplySummary,
    pub warnings: Vec<String>,
    /// The warnings that mean the reconcile did not do all it should: a
    /// foreign route holding a slot raven wants, skip-NAT failing. The
    /// agent reports them as a failed Applied, never as success.
    pub failures: Vec<String>,
    /// What the pass read and wrote.
    pub io: Io,
}

/// What one pass cost in kernel reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Io {
    /// Planned against the kernel read in full (a resync); `false`: against
    /// what the last pass applied (a change).
    pub observed: bool,
    /// A change planned from the desired state computed in full (its
    /// change was not local to some domains: the node, its settings or
    /// role changed); `false` for a patched change and for a resync.
    pub rebuilt: bool,
    /// Netlink operations written (routes, rules, link, neighbours).
    pub netlink_ops: usize,
    /// `iptables -t nat -S` listings and `iptables-restore` transactions.
    pub nat_listings: usize,
    pub nat_restores: usize,
    /// Skip-NAT rules (and jumps, chains) written.
    pub nat_changes: usize,
}

/// What the kernel holds of raven's after a pass that applied without an
/// error, conflict or refusal: the desired state it applied and its
/// skip-NAT rules (with what patching them needs), and the indexes of the
/// devices its routes name (a device recreated since lost its routes).
#[derive(Debug, Clone)]
struct LastApplied {
    index: incremental::Index,
    tunnel_dev: String,
    direct_dev: String,
    indexes: [Option<u32>; 3],
}

/// The kernel of the current network namespace.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `false`: observe and plan, never write (dry run).
    write: bool,
    /// What the last clean pass applied; `None` before the first one and
    /// after any failure (the next pass reads the kernel).
    applied: Arc<Mutex<Option<LastApplied>>>,
}

fn summary(s: &State) -> v1::ApplySummary {
    v1::ApplySummary {
        routes: s.routes.len() as u32,
        rules: s.rules.len() as u32,
        links: u32::from(s.link.is_some()),
        tunnels: 0,
    }
}

/// raven0's index and the tunnel devices' now.
async fn indexes(
    h: &rtnetlink::Handle,
    devs: TunnelDevs<'_>,
) -> Result<[Option<u32>; 3], DataplaneError> {
    let (tunnel, direct) = devs.indexes(h).await?;
    Ok([netlink::vxlan_index(h).await?, tunnel, direct])
}

impl Kernel {
    pub fn new(write: bool) -> Self {
        Self {
            write,
            applied: Arc::default(),
        }
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

    /// What reconciling would change now.
    pub async fn plan(&self, inputs: &NodeInputs) -> Result<Vec<Op>, DataplaneError> {
        let h = netlink::connect()?;
        let want = desired(inputs);
        let have = netlink::observe(&h, devs(inputs)).await?;
        Ok(diff(&want.state, &have))
    }

    fn take_applied(&self) -> Option<LastApplied> {
        self.applied.lock().ok().and_then(|mut a| a.take())
    }

    /// A resync: observe the kernel in full → plan → apply, repairing any
    /// drift; the nat tables are listed too.
    pub async fn reconcile(&self, inputs: &NodeInputs) -> Result<ReconcileReport, DataplaneError> {
        self.take_applied();
        self.pass(inputs, None).await
    }

    /// A new topology: plan against what the last clean pass applied and
    /// write only the difference, reading nothing of the kernel but the
    /// indexes of its devices. A resync instead when there is no such pass
    /// (the first after a start, or after any failure), when the tunnel
    /// devices are others or when a device was recreated since.
    pub async fn reconcile_change(
        &self,
        inputs: &NodeInputs,
    ) -> Result<ReconcileReport, DataplaneError> {
        let before = self.take_applied().filter(|a| {
            self.write && a.tunnel_dev == inputs.tunnel_dev && a.direct_dev == inputs.direct.dev
        });
        self.pass(inputs, before).await
    }

    async fn pass(
        &self,
        inputs: &NodeInputs,
        before: Option<LastApplied>,
    ) -> Result<ReconcileReport, DataplaneError> {
        let h = netlink::connect()?;
        let now = indexes(&h, devs(inputs)).await?;
        let before = before.filter(|a| a.indexes == now);
        let mut io = Io {
            observed: before.is_none(),
            ..Io::default()
        };
        // A change patches what the last pass applied (only the gateways
        // that differ are looked at); a resync reads the kernel's routes
        // and both nat tables at once, while the desired state is computed
        // on another thread.
        let (index, ops, nat) = match before {
            Some(a) => {
                let mut index = a.index;
                match index.update(inputs) {
                    Some(delta) => (index, delta.ops, Nat::Planned(delta.nat)),
                    None => {
                        io.rebuilt = true;
                        let new = build(inputs).await;
                        let ops = diff(&new.desired().state, &index.desired().state);
                        let (old, now) = (index.skip_nat(), new.skip_nat());
                        let nat = skipnat::Family::ALL.map(|f| {
                            skipnat::diff(now.family(f), &skipnat::Observed::after(old.family(f)))
                        });
                        (new, ops, Nat::Planned(nat))
                    }
                }
            }
            None => {
                let nat = async {
                    if self.write {
                        skipnat::read().await.map(Some)
                    } else {
                        [None, None]
                    }
                };
                let (index, have, nat) =
                    tokio::join!(build(inputs), netlink::observe(&h, devs(inputs)), nat);
                let have = have?;
                let ops = diff(&index.desired().state, &have);
                (index, ops, Nat::Read(nat, summary(&have)))
            }
        };
        let want = index.desired();
        for w in &want.warnings {
            tracing::warn!(warning = %w, "dataplane");
        }
        if !self.write {
            return Ok(ReconcileReport {
                ops_applied: 0,
                summary: match &nat {
                    Nat::Read(_, s) => *s,
                    Nat::Planned(_) => summary(&want.state),
                },
                warnings: want.warnings.clone(),
                failures: Vec::new(),
                io,
            });
        }
        if want.state.link.is_some() {
            enable_forwarding();
        }
        let applied = netlink::apply(&h, &ops, devs(inputs)).await?;
        io.netlink_ops = applied.ops;
        for c in &applied.conflicts {
            tracing::warn!(conflict = %c, "dataplane");
        }
        let mut failures = applied.conflicts;
        let nat = match nat {
            Nat::Planned(changes) => skipnat::apply_planned(changes, || index.skip_nat()).await,
            Nat::Read(read, _) => skipnat::apply_read(&index.skip_nat(), read).await,
        };
        io.nat_listings = nat.listings;
        io.nat_restores = nat.restores;
        io.nat_changes = nat.changes;
        for e in &nat.errors {
            tracing::warn!(error = %e, "skip-NAT");
            failures.push(format!("skip-NAT: {e}"));
        }
        let summary = summary(&index.desired().state);
        let mut warnings = index.desired().warnings.clone();
        if failures.is_empty() {
            // Only raven0 is created or removed here (the tunnel step
            // brought the tunnel devices up before).
            let relinked = ops
                .iter()
                .any(|o| matches!(o, Op::CreateLink(_) | Op::DeleteLink));
            let indexes = if relinked {
                indexes(&h, devs(inputs)).await?
            } else {
                now
            };
            if let Ok(mut a) = self.applied.lock() {
                *a = Some(LastApplied {
                    index,
                    tunnel_dev: inputs.tunnel_dev.clone(),
                    direct_dev: inputs.direct.dev.clone(),
                    indexes,
                });
            }
        }
        warnings.extend(failures.iter().cloned());
        Ok(ReconcileReport {
            ops_applied: applied.ops + nat.changes,
            summary,
            warnings,
            failures,
            io,
        })
    }

    /// Removes every object raven owns from the kernel: routes, rules,
    /// `raven0`, the skip-NAT rules (also when removing the rest failed) and
    /// the tunnel devices `tunnel_dev` and its direct-path device.
    pub async fn teardown(&self, tunnel_dev: &str) -> Result<usize, DataplaneError> {
        self.take_applied();
        let direct = crate::tunnel::direct_dev(tunnel_dev);
        let devs = TunnelDevs {
            tunnel: tunnel_dev,
            direct: &direct,
        };
        let routes = async {
            let h = netlink::connect()?;
            let have = netlink::observe(&h, devs).await?;
            let ops = diff(&State::default(), &have);
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

/// How a pass writes the skip-NAT rules: the transactions planned from what
/// the last pass applied, or against the tables as listed (with the
/// summary of the routes observed, for a dry run).
enum Nat {
    Planned([Option<skipnat::Restore>; 2]),
    Read(
        [Option<Result<skipnat::Observed, skipnat::SkipNatError>>; 2],
        v1::ApplySummary,
    ),
}

/// The desired state of `inputs` in full, computed on the blocking pool
/// (it is linear in the topology).
async fn build(inputs: &NodeInputs) -> incremental::Index {
    let inputs = inputs.clone();
    match tokio::task::spawn_blocking(move || incremental::Index::build(&inputs)).await {
        Ok(index) => index,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
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
