//! What the compiler reads about the cluster besides Gateways: nodes (reduced
//! to the facts raven uses), the `raven-cfg` switches and agent reports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use serde::{Deserialize, Serialize};

use crate::api::{self, v1beta1};
use crate::compile::Admitted;
use crate::names::{GatewayName, NodeName};
use crate::problem::Problem;
pub use raven_model::report::AgentReport;

/// A node as raven sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: NodeName,
    /// Value of the `raven.openyurt.io/gateway` label, as written.
    pub gateway_label: Option<String>,
    /// The node's `Ready` condition is `True`.
    pub ready: bool,
    /// First parseable `InternalIP` address (Raven's `GetNodeInternalIP`).
    pub internal_ip: Option<IpAddr>,
    /// `spec.podCIDRs`, or `spec.podCIDR` when the list is empty.
    pub pod_cidrs: Vec<IpNet>,
}

impl ClusterNode {
    /// Reads a Kubernetes Node. Unparseable pod CIDRs are reported and skipped;
    /// a Node without a valid name cannot be used at all.
    pub fn from_k8s(node: &Node) -> Result<(Self, Vec<Problem>), Problem> {
        let raw_name = node.metadata.name.clone().unwrap_or_default();
        let object = format!("Node/{raw_name}");
        let name = NodeName::new(raw_name.clone())
            .map_err(|e| Problem::error(&object, "metadata.name", &raw_name, e.to_string()))?;
        let mut problems = Vec::new();
        let gateway_label = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(api::LABEL_GATEWAY))
            .filter(|v| !v.is_empty())
            .cloned();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let internal_ip = status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<IpAddr>().ok());
        let spec = node.spec.as_ref();
        let mut raw_cidrs: Vec<(String, String)> = spec
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
            .collect();
        if raw_cidrs.is_empty()
            && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
            && !c.is_empty()
        {
            raw_cidrs.push(("spec.podCIDR".to_owned(), c));
        }
        let mut pod_cidrs = Vec::new();
        for (field, raw) in raw_cidrs {
            match raw.parse::<IpNet>() {
                Ok(net) => pod_cidrs.push(net.trunc()),
                Err(_) => problems.push(Problem::warning(
                    &object,
                    field,
                    raw,
                    "not a CIDR; this pod subnet is not routed",
                )),
            }
        }
        Ok((
            Self {
                name,
                gateway_label,
                ready,
                internal_ip,
                pod_cidrs,
            },
            problems,
        ))
    }
}

/// The switches of the `kube-system/raven-cfg` ConfigMap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RavenConfig {
    /// The ConfigMap exists. Raven elects nothing without it.
    pub present: bool,
    pub enable_l3_tunnel: bool,
    pub enable_l7_proxy: bool,
    /// `vpn-driver`: WireGuard unless it says `ipsec`.
    pub vpn_driver: raven_model::topology::VpnDriver,
    /// `vpn-driver` is set to something that is not a VPN driver (then
    /// WireGuard is used, and the compiler reports it).
    pub vpn_driver_invalid: bool,
}

impl RavenConfig {
    /// Raven's `CheckServer`: a key is on when its value is `true`, any case.
    pub fn from_configmap(cm: &ConfigMap) -> Self {
        let on = |key: &str| {
            cm.data
                .as_ref()
                .and_then(|d| d.get(key))
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        };
        let driver = cm
            .data
            .as_ref()
            .and_then(|d| d.get(api::KEY_VPN_DRIVER))
            .filter(|v| !v.trim().is_empty());
        let parsed = driver.map(|v| raven_model::topology::VpnDriver::parse(v));
        Self {
            present: true,
            enable_l3_tunnel: on(api::KEY_ENABLE_L3_TUNNEL),
            enable_l7_proxy: on(api::KEY_ENABLE_L7_PROXY),
            vpn_driver: parsed.flatten().unwrap_or_default(),
            vpn_driver_invalid: matches!(parsed, Some(None)),
        }
    }

    /// Whether endpoints of this type are elected.
    pub fn enables(&self, endpoint_type: &str) -> bool {
        match endpoint_type {
            v1beta1::TUNNEL => self.enable_l3_tunnel,
            v1beta1::PROXY => self.enable_l7_proxy,
            _ => false,
        }
    }
}

/// A value shared by pointer: a clone is a pointer copy, and a write
/// ([`DerefMut`](std::ops::DerefMut)) copies the value first only while
/// another holder still shares it. The hub's index keeps its node table and
/// reports this way, so a compile reads them without copying, and a source
/// writes in place unless a compile still reads the same table.
#[derive(Default, PartialEq, Eq)]
pub struct Shared<T>(std::sync::Arc<T>);

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(std::sync::Arc::new(value))
    }

    /// Whether `other` is this very value (not an equal copy).
    pub fn shares(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    /// A mark of this very value that keeps it from being changed in place
    /// unnoticed: while a mark is held, a write through another holder
    /// moves the value to a new allocation, so [`Shared::is`] of the mark
    /// holds exactly while the value is the one marked, unchanged.
    pub fn mark(&self) -> std::sync::Weak<T> {
        std::sync::Arc::downgrade(&self.0)
    }

    /// Whether this is the value `mark` was taken of, unchanged since.
    pub fn is(&self, mark: &std::sync::Weak<T>) -> bool {
        std::ptr::eq(std::sync::Arc::as_ptr(&self.0), mark.as_ptr())
    }
}

impl<T: Clone> Shared<T> {
    /// The value, copied only if another holder still shares it.
    pub fn into_inner(self) -> T {
        std::sync::Arc::try_unwrap(self.0).unwrap_or_else(|shared| T::clone(&shared))
    }
}

impl<K: Clone, V: Clone> Shared<BTreeMap<K, V>> {
    /// The map's values, by key order (see [`Shared::into_inner`]).
    pub fn into_values(self) -> std::collections::btree_map::IntoValues<K, V> {
        self.into_inner().into_values()
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone> std::ops::DerefMut for Shared<T> {
    fn deref_mut(&mut self) -> &mut T {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

impl<A, T: FromIterator<A>> FromIterator<A> for Shared<T> {
    fn from_iter<I: IntoIterator<Item = A>>(iter: I) -> Self {
        Self::new(T::from_iter(iter))
    }
}

impl<'a, T> IntoIterator for &'a Shared<T>
where
    &'a T: IntoIterator,
{
    type Item = <&'a T as IntoIterator>::Item;
    type IntoIter = <&'a T as IntoIterator>::IntoIter;
    fn into_iter(self) -> Self::IntoIter {
        self.0.as_ref().into_iter()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the hub knows about the agents' Sync streams, resolved against its
/// clock and `--failover-grace` before compiling (the compiler has no clock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streams {
    /// Nodes whose agent has a Sync stream to this hub now.
    pub connected: BTreeSet<NodeName>,
    /// Nodes whose agent has had no stream for at least the grace period:
    /// since its stream ended, or since this hub started for an agent it
    /// has not heard from.
    pub gone: BTreeSet<NodeName>,
}

/// Everything the compiler reads. Keyed maps make the result independent of
/// the order objects arrived in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Gateways by name, converted to `v1beta1` and admitted.
    pub gateways: BTreeMap<GatewayName, Admitted>,
    /// Gateways that exist but failed admission, by name as written, with
    /// why. The compiler reports these problems, and a node labelled with
    /// one of these is not reported as naming no Gateway.
    pub rejected: BTreeMap<String, Vec<Problem>>,
    pub nodes: Shared<BTreeMap<NodeName, ClusterNode>>,
    pub config: RavenConfig,
    pub reports: Shared<BTreeMap<NodeName, AgentReport>>,
    /// Liveness of the agents' streams (empty: nobody is gone, which turns
    /// the hub's failure detector off).
    pub streams: Shared<Streams>,
    /// The subnets each gateway served in the previous compile (the hub's
    /// last published state). A gateway keeps a range it served against a
    /// newcomer claiming an overlapping one, whatever their names; without
    /// history (a fresh start) the first gateway by name keeps it.
    pub held_subnets: Shared<BTreeMap<IpNet, GatewayName>>,
    /// The load-balancer addresses of the Services the hub keeps for
    /// Gateways with `exposeType: LoadBalancer`, by Gateway name: the
    /// gateway's public address while it has one.
    pub load_balancers: BTreeMap<String, LoadBalancerIngress>,
}

/// The `status.loadBalancer.ingress` IP of a Gateway's tunnel and proxy
/// Services, as the cloud's load-balancer controller wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerIngress {
    /// Of the UDP tunnel Service.
    pub tunnel: Option<IpAddr>,
    /// Of the TCP proxy Service.
    pub proxy: Option<IpAddr>,
}

impl Inputs {
    /// Admits `gw` into [`Inputs::gateways`], or records it as rejected.
    pub fn admit_gateway(&mut self, gw: v1beta1::Gateway) {
        let raw = gw.metadata.name.clone().unwrap_or_default();
        match crate::compile::admit(gw) {
            Ok(admitted) => {
                self.rejected.remove(&raw);
                self.gateways.insert(admitted.name().clone(), admitted);
            }
            Err(problems) => {
                self.gateways.remove(raw.as_str());
                self.rejected.insert(raw, problems);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::topology::VpnDriver;

    fn config(data: &[(&str, &str)]) -> RavenConfig {
        let cm = ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        };
        RavenConfig::from_configmap(&cm)
    }

    #[test]
    fn vpn_driver_defaults_to_wireguard_and_selects_ipsec() {
        assert_eq!(config(&[]).vpn_driver, VpnDriver::Wireguard);
        assert_eq!(
            config(&[("vpn-driver", "ipsec")]).vpn_driver,
            VpnDriver::Ipsec
        );
        // Raven's own name for its IPsec driver.
        assert_eq!(
            config(&[("vpn-driver", "Libreswan")]).vpn_driver,
            VpnDriver::Ipsec
        );
        assert_eq!(
            config(&[("vpn-driver", "wireguard")]).vpn_driver,
            VpnDriver::Wireguard
        );
        assert!(!config(&[("vpn-driver", "")]).vpn_driver_invalid);
    }

    #[test]
    fn unknown_vpn_driver_falls_back_to_wireguard_and_is_flagged() {
        let c = config(&[("vpn-driver", "openvpn")]);
        assert_eq!(c.vpn_driver, VpnDriver::Wireguard);
        assert!(c.vpn_driver_invalid);
    }
}
