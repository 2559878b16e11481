//! `raven-edge plan`: what `run` would change on this node now, changing
//! nothing — the WireGuard devices (read from the running devices, diffed
//! with the node's own key), the routes, rules and `raven0` (with the real
//! tunnel device names, routed into the tunnel as `run` would once it has
//! brought the tunnel up) and the skip-NAT rules.
//!
//! It is built from the same pieces as a reconcile: the cached view once,
//! [`crate::failover::decide`] on the devices as they are,
//! [`crate::dataplane::assemble`], [`crate::tunnel::spec`] /
//! [`crate::tunnel::direct_spec`] and [`crate::tunnel::diff`],
//! [`crate::dataplane::Kernel::plan`], [`skipnat::spec`] / [`skipnat::diff`].
//! One difference it cannot avoid: a running agent's local failover
//! overrides live in its memory; the plan takes the hub's choices
//! (what an agent that hears its hub does).

use std::path::Path;

use raven_model::NodeName;

use crate::cache::CachedState;
use crate::dataplane::{self, Op, skipnat};
use crate::failover;
use crate::tunnel::backend::{Backend, WgMode};
use crate::tunnel::keys::KeyPair;
use crate::tunnel::{self, Change, TunnelError};

/// One WireGuard device's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub dev: String,
    pub backend: Backend,
    /// `run` would create the device (it is not there or does not answer).
    pub create: bool,
    pub change: Change,
}

/// What `run` would change now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub devices: Vec<DevicePlan>,
    pub tunnel_dev: String,
    pub direct_dev: String,
    pub ops: Vec<Op>,
    /// Per family: the `iptables-restore --noflush` script.
    pub skip_nat: Vec<(skipnat::Family, skipnat::Restore)>,
    /// What could not be planned or honoured (printed, not counted).
    pub warnings: Vec<String>,
}

impl NodePlan {
    /// One line per change, as the command that makes it, in the order
    /// `run` makes them: tunnels first, then the dataplane, then skip-NAT.
    /// Empty when there is no drift.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.devices {
            if d.create {
                out.push(match d.backend {
                    Backend::Kernel => format!("ip link add {} type wireguard", d.dev),
                    Backend::Userspace => format!("wireguard-go {}", d.dev),
                });
            }
            out.extend(d.change.commands(&d.dev));
        }
        out.extend(
            self.ops
                .iter()
                .map(|op| op.command(&self.tunnel_dev, &self.direct_dev)),
        );
        for (family, restore) in &self.skip_nat {
            out.extend(
                restore
                    .script
                    .lines()
                    .filter(|l| *l != "*nat" && *l != "COMMIT")
                    .map(|l| format!("{} --noflush: {l}", family.restore())),
            );
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
}

/// What `run --tunnel-dev TUNNEL_DEV --wireguard MODE` would change now on
/// `node` with `state` cached, `data_dir` holding its keys.
pub async fn plan(
    node: &NodeName,
    state: &CachedState,
    data_dir: &Path,
    tunnel_dev: &str,
    mode: WgMode,
) -> Result<NodePlan, PlanError> {
    let view = state.view(node);
    // Never creates a probe link: a dry run.
    let backend = tunnel::backend::detect(mode, false).await?;
    let direct_dev = tunnel::direct_dev(tunnel_dev);
    let states = failover::DeviceStates {
        tunnel: backend.get(tunnel_dev).await.ok(),
        direct: backend.get(&direct_dev).await.ok(),
    };
    let devices = states.devices();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut st = failover::FailoverState::new(1);
    st.observe(devices, now);
    let decision = view
        .as_ref()
        .map(|v| failover::decide(v, &st, devices, now, true))
        .unwrap_or_default();

    let private_ip = view.as_ref().and_then(|v| v.me.private_ip);
    let local = dataplane::Local {
        tunnel_dev: tunnel_dev.to_owned(),
        direct_dev: direct_dev.clone(),
        underlay_mtu: dataplane::underlay_mtu(private_ip).await,
    };
    let mut inputs = dataplane::assemble(view.as_ref(), &local, decision.overrides);
    let peers = view.as_ref().map_or(&[][..], |v| v.peers.as_slice());
    let mut warnings = Vec::new();
    let mut planned = Vec::new();
    // What `run` would do to one device, from the key in file `key_file`.
    let device_plan = |dev: &str,
                       key_file: &str,
                       spec: &tunnel::TunnelSpec,
                       have: Option<&tunnel::uapi::DeviceState>|
     -> Result<DevicePlan, TunnelError> {
        let keys = KeyPair::read(data_dir, key_file)?.unwrap_or_else(KeyPair::ephemeral);
        Ok(DevicePlan {
            dev: dev.to_owned(),
            backend,
            create: have.is_none(),
            change: tunnel::diff(spec, keys.private_key(), &have.cloned().unwrap_or_default()),
        })
    };
    // `run` brings each device up before it routes into it.
    if let Some(spec) = tunnel::spec(&inputs, peers) {
        planned.push(device_plan(
            tunnel_dev,
            "wireguard.key",
            &spec,
            devices.tunnel,
        )?);
        warnings.extend(spec.warnings);
        inputs.tunnel_up = true;
    }
    if let Some(spec) = tunnel::direct_spec(&inputs, peers) {
        planned.push(device_plan(
            &direct_dev,
            "wireguard-direct.key",
            &spec,
            devices.direct,
        )?);
        inputs.direct.up = true;
        inputs.direct.gateways = tunnel::direct_gateways(&spec, &decision.direct);
    }
    warnings.extend(dataplane::desired(&inputs).warnings);
    let ops = dataplane::Kernel::dry_run().plan(&inputs).await?;
    let rules = skipnat::spec(&inputs);
    let mut skip_nat = Vec::new();
    for family in skipnat::Family::ALL {
        match skipnat::observe(family).await {
            Ok(observed) => {
                skip_nat
                    .extend(skipnat::diff(rules.family(family), &observed).map(|r| (family, r)));
            }
            Err(e) => warnings.push(format!("skip-NAT: {e}")),
        }
    }
    Ok(NodePlan {
        devices: planned,
        tunnel_dev: tunnel_dev.to_owned(),
        direct_dev,
        ops,
        skip_nat,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::model::{Route, RouteDev, TABLE_REMOTE};
    use crate::tunnel::PeerChange;
    use crate::tunnel::keys::Key;

    #[test]
    fn a_plan_reads_as_the_commands_run_would_issue_with_the_real_device_names() {
        let plan = NodePlan {
            devices: vec![DevicePlan {
                dev: "rvw0".into(),
                backend: Backend::Userspace,
                create: true,
                change: Change {
                    listen_port: Some(4500),
                    peers: vec![
                        PeerChange::new(Key([7; 32]))
                            .endpoint(
                                "198.51.100.2:4500"
                                    .parse()
                                    .unwrap_or_else(|_| unreachable!()),
                            )
                            .keepalive(1)
                            .replace_allowed_ips(["10.10.2.0/24"
                                .parse()
                                .unwrap_or_else(|_| unreachable!())]),
                    ],
                    ..Default::default()
                },
            }],
            tunnel_dev: "rvw0".into(),
            direct_dev: "rvw0d".into(),
            ops: vec![Op::AddRoute(Route {
                table: TABLE_REMOTE,
                dst: "10.10.2.0/24".parse().unwrap_or_else(|_| unreachable!()),
                dev: RouteDev::Tunnel,
                via: None,
                mtu: 1320,
            })],
            skip_nat: vec![(
                skipnat::Family::V4,
                skipnat::Restore {
                    script: "*nat\n-I POSTROUTING 1 -j RAVEN-SKIP-NAT\nCOMMIT\n".into(),
                    changes: 1,
                },
            )],
            warnings: vec![],
        };
        let golden = "\
wireguard-go rvw0
wg set rvw0 listen-port 4500
wg set rvw0 peer BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc= endpoint 198.51.100.2:4500 persistent-keepalive 1 allowed-ips \"10.10.2.0/24\"
ip route add 10.10.2.0/24 dev rvw0 table 9027 proto 82 mtu 1320
iptables-restore --noflush: -I POSTROUTING 1 -j RAVEN-SKIP-NAT";
        assert_eq!(plan.lines().join("\n"), golden);
        let none = NodePlan {
            devices: vec![DevicePlan {
                create: false,
                change: Change::default(),
                ..plan.devices[0].clone()
            }],
            ops: vec![],
            skip_nat: vec![],
            ..plan
        };
        assert!(none.lines().is_empty(), "no drift: {:?}", none.lines());
    }
}
