//! Defaulting and validation of `v1beta1` Gateways, equal to OpenYurt's
//! mutating and validating webhooks, plus the checks those webhooks leave to
//! the Go type system (port ranges, name syntax). Every failure names the
//! gateway, the field path and the value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::api::LABEL_GATEWAY;
use crate::api::v1beta1::{self, Gateway};
use crate::names::{GatewayName, NodeName};
use crate::problem::Problem;

/// `Kind/name` of a Gateway for problem reports.
pub fn gateway_object(name: &str) -> String {
    format!("Gateway/{name}")
}

/// Raven's `SetDefaultsGateway`: the node selector selects the gateway's own
/// label, and a zero port becomes 10262 (proxy) or 4500 (tunnel).
pub fn set_defaults(gw: &mut Gateway) {
    let name = gw.metadata.name.clone().unwrap_or_default();
    let selector = gw.spec.node_selector.get_or_insert_with(Default::default);
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_GATEWAY.to_owned(), name);
    for ep in &mut gw.spec.endpoints {
        if ep.port == 0 {
            match ep.type_.as_str() {
                v1beta1::PROXY => ep.port = v1beta1::DEFAULT_PROXY_SERVER_EXPOSED_PORT,
                v1beta1::TUNNEL => ep.port = v1beta1::DEFAULT_TUNNEL_SERVER_EXPOSED_PORT,
                _ => {}
            }
        }
    }
}

/// Clears every `publicIP` that is not an IP address, reporting each as an
/// error. Used by the compiler to keep a gateway whose only fault is a
/// placeholder address.
pub fn drop_unusable_public_ips(gw: &mut Gateway) -> Vec<Problem> {
    let obj = gateway_object(gw.metadata.name.as_deref().unwrap_or_default());
    let mut problems = Vec::new();
    for (i, ep) in gw.spec.endpoints.iter_mut().enumerate() {
        if !ep.public_ip.is_empty() && ep.public_ip.parse::<IpAddr>().is_err() {
            problems.push(Problem::error(
                &obj,
                format!("spec.endpoints[{i}].publicIP"),
                std::mem::take(&mut ep.public_ip),
                "must be a valid IP address; the endpoint is used as if publicIP were not set",
            ));
        }
    }
    problems
}

/// Validates a defaulted Gateway. An empty result means valid.
pub fn validate(gw: &Gateway) -> Vec<Problem> {
    let raw_name = gw.metadata.name.clone().unwrap_or_default();
    let obj = gateway_object(&raw_name);
    let mut errs = Vec::new();
    if let Err(e) = GatewayName::new(raw_name.clone()) {
        errs.push(Problem::error(
            &obj,
            "metadata.name",
            &raw_name,
            e.to_string(),
        ));
    }
    let spec = &gw.spec;

    let exposed = matches!(
        spec.expose_type.as_str(),
        v1beta1::EXPOSE_TYPE_PUBLIC_IP | v1beta1::EXPOSE_TYPE_LOAD_BALANCER
    );
    if !spec.expose_type.is_empty() && !exposed {
        errs.push(Problem::error(
            &obj,
            "spec.exposeType",
            &spec.expose_type,
            "must be empty, \"PublicIP\" or \"LoadBalancer\"",
        ));
    }
    if exposed {
        for (i, ep) in spec.endpoints.iter().enumerate() {
            if ep.under_nat {
                errs.push(Problem::error(
                    &obj,
                    format!("spec.endpoints[{i}].underNAT"),
                    "true",
                    format!(
                        "must be false for a gateway exposed with exposeType {}",
                        spec.expose_type
                    ),
                ));
            }
        }
    }

    let tunnel_replicas = spec.tunnel_config.replicas;
    if tunnel_replicas > 1 {
        errs.push(Problem::error(
            &obj,
            "spec.tunnelConfig.Replicas",
            tunnel_replicas.to_string(),
            "can not be greater than 1",
        ));
    }
    if tunnel_replicas < 0 {
        errs.push(Problem::error(
            &obj,
            "spec.tunnelConfig.Replicas",
            tunnel_replicas.to_string(),
            "must not be negative",
        ));
    }
    let proxy_replicas = spec.proxy_config.replicas;
    if proxy_replicas < 0 {
        errs.push(Problem::error(
            &obj,
            "spec.proxyConfig.Replicas",
            proxy_replicas.to_string(),
            "must not be negative",
        ));
    }
    if proxy_replicas > 1 {
        let proxies = spec
            .endpoints
            .iter()
            .filter(|e| e.type_ == v1beta1::PROXY)
            .count();
        if usize::try_from(proxy_replicas).is_ok_and(|r| r > proxies) {
            errs.push(Problem::error(
                &obj,
                "spec.proxyConfig.Replicas",
                proxy_replicas.to_string(),
                format!(
                    "only {proxies} proxy endpoints are listed in spec.endpoints, fewer than the replicas asked for"
                ),
            ));
        }
    }

    if let Some(first) = spec.endpoints.first() {
        for (i, ep) in spec.endpoints.iter().enumerate() {
            let f = |name: &str| format!("spec.endpoints[{i}].{name}");
            if ep.under_nat != first.under_nat {
                errs.push(Problem::error(
                    &obj,
                    f("underNAT"),
                    ep.under_nat.to_string(),
                    "the 'underNAT' field must be the same in all endpoints",
                ));
            }
            if !ep.public_ip.is_empty() && ep.public_ip.parse::<IpAddr>().is_err() {
                errs.push(Problem::error(
                    &obj,
                    f("publicIP"),
                    &ep.public_ip,
                    "must be a valid IP address",
                ));
            }
            if ep.type_ != v1beta1::TUNNEL && ep.type_ != v1beta1::PROXY {
                errs.push(Problem::error(
                    &obj,
                    f("type"),
                    &ep.type_,
                    "must be \"tunnel\" or \"proxy\"",
                ));
            }
            if ep.node_name.is_empty() {
                errs.push(Problem::error(&obj, f("nodeName"), "", "must not be empty"));
            } else if let Err(e) = NodeName::new(ep.node_name.clone()) {
                errs.push(Problem::error(
                    &obj,
                    f("nodeName"),
                    &ep.node_name,
                    e.to_string(),
                ));
            }
            if !(1..=65535).contains(&ep.port) {
                errs.push(Problem::error(
                    &obj,
                    f("port"),
                    ep.port.to_string(),
                    "must be a port number between 1 and 65535",
                ));
            }
            if !(0..=65535).contains(&ep.public_port) {
                errs.push(Problem::error(
                    &obj,
                    f("publicPort"),
                    ep.public_port.to_string(),
                    "must be a port number between 1 and 65535 (or 0 for the endpoint's port)",
                ));
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1beta1::{Endpoint, GatewaySpec, ProxyConfiguration, TunnelConfiguration};

    fn ep(node: &str, ty: &str) -> Endpoint {
        Endpoint {
            node_name: node.into(),
            type_: ty.into(),
            ..Default::default()
        }
    }

    fn gw(spec: GatewaySpec) -> Gateway {
        let mut g = Gateway::new("gw-a", spec);
        set_defaults(&mut g);
        g
    }

    fn fields(g: &Gateway) -> Vec<String> {
        validate(g).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn defaults_ports_by_endpoint_type_and_selects_own_label() {
        let g = gw(GatewaySpec {
            endpoints: vec![ep("n1", "tunnel"), ep("n1", "proxy"), ep("n2", "other")],
            ..Default::default()
        });
        let ports: Vec<i32> = g.spec.endpoints.iter().map(|e| e.port).collect();
        assert_eq!(ports, vec![4500, 10262, 0]);
        let labels = g
            .spec
            .node_selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        assert_eq!(labels.get(LABEL_GATEWAY).map(String::as_str), Some("gw-a"));
    }

    #[test]
    fn explicit_port_is_kept() {
        let mut e = ep("n1", "tunnel");
        e.port = 4501;
        let g = gw(GatewaySpec {
            endpoints: vec![e],
            ..Default::default()
        });
        assert_eq!(g.spec.endpoints[0].port, 4501);
    }

    #[test]
    fn valid_gateway_has_no_problems() {
        let g = gw(GatewaySpec {
            tunnel_config: TunnelConfiguration { replicas: 1 },
            proxy_config: ProxyConfiguration {
                replicas: 1,
                ..Default::default()
            },
            endpoints: vec![ep("n1", "tunnel"), ep("n1", "proxy")],
            ..Default::default()
        });
        assert_eq!(validate(&g), vec![]);
    }

    #[test]
    fn tunnel_replicas_above_one_is_rejected() {
        let g = gw(GatewaySpec {
            tunnel_config: TunnelConfiguration { replicas: 2 },
            ..Default::default()
        });
        assert_eq!(fields(&g), vec!["spec.tunnelConfig.Replicas"]);
    }

    #[test]
    fn proxy_replicas_above_proxy_endpoint_count_is_rejected() {
        let g = gw(GatewaySpec {
            proxy_config: ProxyConfiguration {
                replicas: 2,
                ..Default::default()
            },
            endpoints: vec![ep("n1", "proxy"), ep("n2", "tunnel")],
            ..Default::default()
        });
        let p = validate(&g);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "spec.proxyConfig.Replicas");
        assert_eq!(p[0].value, "2");
        assert!(p[0].message.contains("only 1 proxy endpoints"));
    }

    #[test]
    fn mixed_under_nat_is_rejected_at_the_differing_endpoint() {
        let mut e2 = ep("n2", "tunnel");
        e2.under_nat = true;
        let g = gw(GatewaySpec {
            endpoints: vec![ep("n1", "tunnel"), e2],
            ..Default::default()
        });
        assert_eq!(fields(&g), vec!["spec.endpoints[1].underNAT"]);
    }

    #[test]
    fn masked_public_ip_is_rejected_with_its_value() {
        let mut e = ep("n1", "tunnel");
        e.public_ip = "47.xxx.xxx.xxx".into();
        let g = gw(GatewaySpec {
            endpoints: vec![e],
            ..Default::default()
        });
        let p = validate(&g);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].object, "Gateway/gw-a");
        assert_eq!(p[0].field, "spec.endpoints[0].publicIP");
        assert_eq!(p[0].value, "47.xxx.xxx.xxx");
    }

    #[test]
    fn unknown_type_empty_node_and_bad_expose_type_are_rejected() {
        let g = gw(GatewaySpec {
            expose_type: "NodePort".into(),
            endpoints: vec![ep("", "vpn")],
            ..Default::default()
        });
        assert_eq!(
            fields(&g),
            vec![
                "spec.exposeType",
                "spec.endpoints[0].type",
                "spec.endpoints[0].nodeName",
                "spec.endpoints[0].port"
            ]
        );
    }

    #[test]
    fn exposed_gateway_must_not_be_under_nat() {
        let mut e = ep("n1", "tunnel");
        e.under_nat = true;
        let g = gw(GatewaySpec {
            expose_type: "PublicIP".into(),
            endpoints: vec![e],
            ..Default::default()
        });
        assert_eq!(fields(&g), vec!["spec.endpoints[0].underNAT"]);
    }

    #[test]
    fn out_of_range_ports_and_negative_replicas_are_rejected() {
        let mut e = ep("n1", "tunnel");
        e.port = 70000;
        e.public_port = -1;
        let g = gw(GatewaySpec {
            proxy_config: ProxyConfiguration {
                replicas: -1,
                ..Default::default()
            },
            endpoints: vec![e],
            ..Default::default()
        });
        assert_eq!(
            fields(&g),
            vec![
                "spec.proxyConfig.Replicas",
                "spec.endpoints[0].port",
                "spec.endpoints[0].publicPort"
            ]
        );
    }
}
