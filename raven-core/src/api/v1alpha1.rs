//! `raven.openyurt.io/v1alpha1` — read for compatibility and converted to
//! `v1beta1` exactly as OpenYurt's conversion webhook does: every endpoint
//! becomes a tunnel endpoint on port 4500, both replica counts become 1, and
//! the single `activeEndpoint` becomes `activeEndpoints[0]`.

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
    printcolumn = r#"{"name":"ActiveEndpoint","type":"string","jsonPath":".status.activeEndpoint.nodeName"}"#,
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
    pub expose_type: String,
}

/// Endpoint stores all essential data for establishing the VPN tunnel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// NodeName is the Node hosting this endpoint.
    pub node_name: String,
    #[serde(rename = "underNAT", default)]
    pub under_nat: bool,
    #[serde(rename = "publicIP", default, skip_serializing_if = "String::is_empty")]
    pub public_ip: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
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
}

fn tunnel_endpoint(ep: &Endpoint) -> v1beta1::Endpoint {
    v1beta1::Endpoint {
        node_name: ep.node_name.clone(),
        type_: v1beta1::TUNNEL.to_owned(),
        port: v1beta1::DEFAULT_TUNNEL_SERVER_EXPOSED_PORT,
        under_nat: ep.under_nat,
        public_ip: ep.public_ip.clone(),
        config: ep.config.clone(),
        ..Default::default()
    }
}

impl From<Gateway> for v1beta1::Gateway {
    fn from(src: Gateway) -> Self {
        let spec = v1beta1::GatewaySpec {
            node_selector: src.spec.node_selector,
            proxy_config: v1beta1::ProxyConfiguration {
                replicas: 1,
                ..Default::default()
            },
            tunnel_config: v1beta1::TunnelConfiguration { replicas: 1 },
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
            active_endpoints: s.active_endpoint.iter().map(tunnel_endpoint).collect(),
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
