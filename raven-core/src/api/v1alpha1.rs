//! `raven.openyurt.io/v1alpha1` — read for compatibility and converted to
//! `v1beta1` by OpenYurt's rules: an endpoint that does not say otherwise is
//! a tunnel endpoint on port 4500, both replica counts are 1, and the single
//! `activeEndpoint` becomes `activeEndpoints[0]`.
//!
//! **Why a superset schema with defaults, not a conversion webhook.** The
//! OpenYurt user manual applies `gw-cloud` and `gw-qingdao` as `v1alpha1`
//! with v1beta1's fields (`proxyConfig`, `tunnelConfig`, endpoint `type` and
//! `port`). Against OpenYurt's own v1alpha1 schema kubectl refuses them, and
//! without validation the server prunes those fields and stores Gateways
//! without `type`. Here the v1alpha1 schema also carries v1beta1's fields,
//! and what v1alpha1 cannot say is filled in by the API server's structural
//! defaults — `type: tunnel`, `port: 4500`, `Replicas: 1` — which are exactly
//! the rules of OpenYurt's webhook (`ConvertTo`). With `conversion: None`
//! the API server stores the object as v1beta1 with every field the user
//! wrote. This needs nothing running: a webhook served by the hub would make
//! every v1alpha1 read and write fail while no hub replica is reachable,
//! and needs a Service, a serving certificate and its CA in the CRD.
//! What it gives up: a v1alpha1 *reader* sees v1beta1's `activeEndpoints`
//! rather than `activeEndpoint` (the v1alpha1 printer column reads
//! `activeEndpoints[0]`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::v1beta1;

/// GatewaySpec defines the desired state of Gateway.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "raven.openyurt.io",
    version = "v1alpha1",
    kind = "Gateway",
    plural = "gateways",
    shortname = "gw",
    category = "yurt",
    status = "GatewayStatus",
    printcolumn = r#"{"name":"ActiveEndpoint","type":"string","jsonPath":".status.activeEndpoints[0].nodeName"}"#,
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// NodeSelector is a label query over nodes that managed by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Endpoints is a list of available Endpoint.
    pub endpoints: Vec<Endpoint>,
    /// ExposeType determines how the Gateway is exposed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("enum" = ["", "PublicIP", "LoadBalancer"]))]
    pub expose_type: String,
    /// v1beta1's ProxyConfig, kept when written here (OpenYurt's manual
    /// does); Replicas 1 when absent, as OpenYurt's conversion sets it.
    #[serde(default = "one_proxy_replica", skip_serializing_if = "Option::is_none")]
    pub proxy_config: Option<v1beta1::ProxyConfiguration>,
    /// v1beta1's TunnelConfig; Replicas 1 when absent.
    #[serde(
        default = "one_tunnel_replica",
        skip_serializing_if = "Option::is_none"
    )]
    pub tunnel_config: Option<v1beta1::TunnelConfiguration>,
}

// `Option` so that a value built in Rust without them still converts by
// OpenYurt's rules; the API server fills the defaults in.
#[allow(clippy::unnecessary_wraps)]
fn one_proxy_replica() -> Option<v1beta1::ProxyConfiguration> {
    Some(v1beta1::ProxyConfiguration {
        replicas: 1,
        ..Default::default()
    })
}

#[allow(clippy::unnecessary_wraps)]
fn one_tunnel_replica() -> Option<v1beta1::TunnelConfiguration> {
    Some(v1beta1::TunnelConfiguration { replicas: 1 })
}

fn tunnel() -> String {
    v1beta1::TUNNEL.to_owned()
}

fn tunnel_port() -> i32 {
    v1beta1::DEFAULT_TUNNEL_SERVER_EXPOSED_PORT
}

/// Endpoint stores all essential data for establishing the VPN tunnel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// NodeName is the Node hosting this endpoint.
    #[schemars(length(min = 1))]
    pub node_name: String,
    #[serde(rename = "underNAT", default)]
    pub under_nat: bool,
    #[serde(rename = "publicIP", default, skip_serializing_if = "String::is_empty")]
    pub public_ip: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// v1beta1's endpoint type; `tunnel` when absent (OpenYurt's rule).
    #[serde(rename = "type", default = "tunnel")]
    #[schemars(extend("enum" = ["proxy", "tunnel"]))]
    pub type_: String,
    /// v1beta1's exposed port; 4500 when absent (OpenYurt's rule).
    #[serde(default = "tunnel_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// NATType is the NAT type of the endpoint.
    #[serde(rename = "natType", default, skip_serializing_if = "String::is_empty")]
    pub nat_type: String,
    /// PublicPort is the exposed port of the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 65535))]
    pub public_port: i32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// NodeInfo stores information of node managed by Gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub node_name: String,
    #[serde(rename = "privateIP")]
    pub private_ip: String,
    pub subnets: Vec<String>,
}

/// GatewayStatus defines the observed state of Gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_endpoint: Option<Endpoint>,
    /// v1beta1's list, as the hub writes it (stored objects are v1beta1; a
    /// v1alpha1 reader would otherwise have it pruned away).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_endpoints: Vec<v1beta1::Endpoint>,
}

fn tunnel_endpoint(ep: &Endpoint) -> v1beta1::Endpoint {
    v1beta1::Endpoint {
        node_name: ep.node_name.clone(),
        type_: if ep.type_.is_empty() {
            tunnel()
        } else {
            ep.type_.clone()
        },
        port: if ep.port == 0 { tunnel_port() } else { ep.port },
        under_nat: ep.under_nat,
        nat_type: ep.nat_type.clone(),
        public_ip: ep.public_ip.clone(),
        public_port: ep.public_port,
        config: ep.config.clone(),
    }
}

impl From<Gateway> for v1beta1::Gateway {
    fn from(src: Gateway) -> Self {
        let spec = v1beta1::GatewaySpec {
            node_selector: src.spec.node_selector,
            proxy_config: src
                .spec
                .proxy_config
                .or_else(one_proxy_replica)
                .unwrap_or_default(),
            tunnel_config: src
                .spec
                .tunnel_config
                .or_else(one_tunnel_replica)
                .unwrap_or_default(),
            endpoints: src.spec.endpoints.iter().map(tunnel_endpoint).collect(),
            expose_type: src.spec.expose_type,
        };
        let status = src.status.map(|s| v1beta1::GatewayStatus {
            nodes: s
                .nodes
                .into_iter()
                .map(|n| v1beta1::NodeInfo {
                    node_name: n.node_name,
                    private_ip: n.private_ip,
                    subnets: n.subnets,
                })
                .collect(),
            active_endpoints: if s.active_endpoints.is_empty() {
                s.active_endpoint.iter().map(tunnel_endpoint).collect()
            } else {
                s.active_endpoints
            },
            ..Default::default()
        });
        v1beta1::Gateway {
            metadata: src.metadata,
            spec,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1alpha1_endpoints_become_tunnel_endpoints_on_port_4500() {
        let mut gw = Gateway::new(
            "gw-a",
            GatewaySpec {
                endpoints: vec![Endpoint {
                    node_name: "n1".into(),
                    under_nat: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        gw.status = Some(GatewayStatus {
            active_endpoint: Some(Endpoint {
                node_name: "n1".into(),
                under_nat: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let b: v1beta1::Gateway = gw.into();
        assert_eq!(b.spec.tunnel_config.replicas, 1);
        assert_eq!(b.spec.proxy_config.replicas, 1);
        assert_eq!(b.spec.endpoints[0].type_, "tunnel");
        assert_eq!(b.spec.endpoints[0].port, 4500);
        assert!(b.spec.endpoints[0].under_nat);
        let status = b.status.unwrap_or_default();
        assert_eq!(status.active_endpoints.len(), 1);
        assert_eq!(status.active_endpoints[0].node_name, "n1");
    }
}
