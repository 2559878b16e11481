//! `raven.openyurt.io/v1beta1` — the storage version.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Endpoint type of the layer-7 proxy.
pub const PROXY: &str = "proxy";
/// Endpoint type of the layer-3 tunnel.
pub const TUNNEL: &str = "tunnel";
/// `spec.exposeType` value: the gateway is reached at its public IP.
pub const EXPOSE_TYPE_PUBLIC_IP: &str = "PublicIP";
/// `spec.exposeType` value: the gateway is reached through a LoadBalancer Service.
pub const EXPOSE_TYPE_LOAD_BALANCER: &str = "LoadBalancer";
/// Default exposed port of a proxy endpoint.
pub const DEFAULT_PROXY_SERVER_EXPOSED_PORT: i32 = 10262;
/// Default exposed port of a tunnel endpoint (UDP).
pub const DEFAULT_TUNNEL_SERVER_EXPOSED_PORT: i32 = 4500;
/// `config` key of an active endpoint holding its WireGuard public key, as
/// Raven's agent writes it (the hub fills it in `status.activeEndpoints`
/// from the agent's report).
pub const CONFIG_PUBLIC_KEY: &str = "publicKey";
/// Raven's `natType` value for a symmetric NAT (go-stun's spelling).
pub const NAT_SYMMETRIC: &str = "Symmetric NAT";

/// GatewaySpec defines the desired state of Gateway.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "raven.openyurt.io",
    version = "v1beta1",
    kind = "Gateway",
    plural = "gateways",
    shortname = "gw",
    category = "yurt",
    status = "GatewayStatus",
    printcolumn = r#"{"name":"ActiveTunnel","type":"string","jsonPath":".status.activeEndpoints[?(@.type==\"tunnel\")].nodeName"}"#,
    printcolumn = r#"{"name":"ActiveProxy","type":"string","jsonPath":".status.activeEndpoints[?(@.type==\"proxy\")].nodeName"}"#,
    printcolumn = r#"{"name":"PublicIP","type":"string","jsonPath":".status.activeEndpoints[?(@.type==\"tunnel\")].publicIP"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodeCount"}"#,
    printcolumn = r#"{"name":"NodeNames","type":"string","jsonPath":".status.nodes[*].nodeName","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// NodeSelector is a label query over nodes that managed by the gateway.
    /// The nodes in the same gateway should share same layer 3 network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// ProxyConfig determine the l7 proxy configuration
    #[serde(default)]
    pub proxy_config: ProxyConfiguration,
    /// TunnelConfig determine the l3 tunnel configuration
    #[serde(default)]
    pub tunnel_config: TunnelConfiguration,
    /// Endpoints are a list of available Endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// ExposeType determines how the Gateway is exposed: "", "PublicIP" or "LoadBalancer".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("enum" = ["", "PublicIP", "LoadBalancer"]))]
    pub expose_type: String,
}

/// ProxyConfiguration is the configuration for raven l7 proxy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ProxyConfiguration {
    /// Replicas is the number of gateway active endpoints that enabled proxy.
    #[serde(rename = "Replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// ProxyHTTPPort is the proxy http port of the cross-domain request.
    #[serde(
        rename = "proxyHTTPPort",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub proxy_http_port: String,
    /// ProxyHTTPSPort is the proxy https port of the cross-domain request.
    #[serde(
        rename = "proxyHTTPSPort",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub proxy_https_port: String,
}

/// TunnelConfiguration is the configuration for raven l3 tunnel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct TunnelConfiguration {
    /// Replicas is the number of gateway active endpoints that enabled tunnel
    /// (at most 1, as Raven's webhook requires).
    #[serde(rename = "Replicas")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,
}

/// Endpoint stores all essential data for establishing the VPN tunnel and Proxy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// NodeName is the Node hosting this endpoint.
    #[schemars(length(min = 1))]
    pub node_name: String,
    /// Type is the service type of the node, proxy or tunnel.
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["proxy", "tunnel"]))]
    pub type_: String,
    /// Port is the exposed port of the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// UnderNAT indicates whether the endpoint is under NAT.
    #[serde(rename = "underNAT", default, skip_serializing_if = "is_false")]
    pub under_nat: bool,
    /// NATType is the NAT type of the endpoint.
    #[serde(rename = "natType", default, skip_serializing_if = "String::is_empty")]
    pub nat_type: String,
    /// PublicIP is the exposed IP of the node. Not format-checked by the
    /// schema: the OpenYurt manual applies a masked `120.79.xxx.xxx`, which
    /// must still apply; the hub reports a bad address as a problem and a
    /// Warning Event on the Gateway and uses the endpoint without it.
    #[serde(rename = "publicIP", default, skip_serializing_if = "String::is_empty")]
    pub public_ip: String,
    /// PublicPort is the exposed port of the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 65535))]
    pub public_port: i32,
    /// Config is a map to record config for the raven agent of node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// NodeInfo stores information of node managed by Gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// NodeName is the Node host name.
    pub node_name: String,
    /// PrivateIP is the node private ip address.
    #[serde(rename = "privateIP")]
    pub private_ip: String,
    /// Subnets is the pod ip range of the node.
    pub subnets: Vec<String>,
}

/// GatewayStatus defines the observed state of Gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Nodes contains all information of nodes managed by Gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeInfo>,
    /// ActiveEndpoints is the reference of the active endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_endpoints: Vec<Endpoint>,
    /// Conditions the hub keeps for kubectl users (raven's addition):
    /// `Valid` (no problem found in the Gateway) and `Ready` (an endpoint is
    /// elected), each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<GatewayCondition>,
    /// How many nodes the Gateway manages — `len(nodes)`, written by the hub
    /// (raven's addition) because a printer column's JSONPath cannot count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_count: Option<i32>,
}

/// A status condition, in the shape of Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayCondition {
    /// `Valid` or `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// CamelCase reason of the last transition.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}
