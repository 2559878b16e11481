//! Kubernetes objects as the API server holds them (JSON), one shape each
//! for every test that creates them: a test names only what it is about,
//! and a field every object needs is added here once.

use serde_json::{Value, json};

/// A tunnel endpoint of `node` on port 4500.
pub fn tunnel_endpoint(node: &str) -> Value {
    json!({"nodeName": node, "type": "tunnel", "port": 4500})
}

/// Gateway `name` with one tunnel replica, no proxy, and `endpoints`.
pub fn gateway(name: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "raven.openyurt.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": name},
        "spec": {
            "tunnelConfig": {"Replicas": 1},
            "proxyConfig": {"Replicas": 0},
            "endpoints": endpoints,
        },
    })
}

/// Gateway `name` whose endpoints are tunnel endpoints of `nodes`.
pub fn gateway_of(name: &str, nodes: &[&str]) -> Value {
    gateway(name, nodes.iter().map(|n| tunnel_endpoint(n)).collect())
}

/// A Ready node of `gateway` (its label) at InternalIP `ip` with pod CIDR
/// `pod_cidr`.
pub fn node(name: &str, gateway: &str, ip: &str, pod_cidr: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"raven.openyurt.io/gateway": gateway}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": ip}],
        },
    })
}

/// `raven-cfg` in `namespace`, the L3 tunnel on when `l3`, the L7 proxy off.
pub fn raven_cfg(namespace: &str, l3: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "raven-cfg", "namespace": namespace},
        "data": {"enable-l3-tunnel": l3.to_string(), "enable-l7-proxy": "false"},
    })
}
