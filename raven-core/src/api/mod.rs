//! The `raven.openyurt.io` API exactly as OpenYurt defines it: `v1beta1` (the
//! storage version) and `v1alpha1` (read and converted to `v1beta1`).
//!
//! Field names, JSON spellings (capital-R `Replicas`, `proxyHTTPPort`,
//! `publicIP`, …) and defaults follow
//! `github.com/openyurtio/openyurt/pkg/apis/raven`, so existing Gateway objects
//! and manifests keep working unchanged.

pub mod v1alpha1;
pub mod v1beta1;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;

/// API group of every Raven resource.
pub const GROUP: &str = "raven.openyurt.io";
/// Node label naming the Gateway a node belongs to.
pub const LABEL_GATEWAY: &str = "raven.openyurt.io/gateway";
/// Gateway annotation with extra source CIDRs allowed through the gateway node.
pub const ANNOTATION_EXTRA_ALLOWED_SOURCE_CIDRS: &str =
    "raven.openyurt.io/extra-allowed-source-cidrs";
/// Namespace of the `raven-cfg` ConfigMap.
pub const CONFIG_NAMESPACE: &str = "kube-system";
/// Name of the cluster-wide Raven ConfigMap.
pub const CONFIG_NAME: &str = "raven-cfg";
/// `raven-cfg` key switching the layer-3 tunnel on.
pub const KEY_ENABLE_L3_TUNNEL: &str = "enable-l3-tunnel";
/// `raven-cfg` key switching the layer-7 proxy on.
pub const KEY_ENABLE_L7_PROXY: &str = "enable-l7-proxy";
/// `raven-cfg` key choosing the VPN between gateways: `wireguard` (the
/// default) or `ipsec`.
pub const KEY_VPN_DRIVER: &str = "vpn-driver";

/// The `gateways.raven.openyurt.io` CRD with both served versions,
/// `v1beta1` being the storage version, as OpenYurt ships it.
pub fn gateway_crd() -> CustomResourceDefinition {
    // `merge_crds` only fails when the inputs disagree on group/kind/scope,
    // which the two derives below cannot do.
    #[allow(clippy::expect_used)]
    let mut crd = merge_crds(
        vec![v1alpha1::Gateway::crd(), v1beta1::Gateway::crd()],
        "v1beta1",
    )
    .expect("v1alpha1 and v1beta1 Gateway CRDs describe the same resource");
    // Oldest first, as OpenYurt's controller-gen output lists them.
    crd.spec.versions.sort_by(|a, b| a.name.cmp(&b.name));
    crd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_serves_both_versions_and_stores_v1beta1() {
        let crd = gateway_crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("gateways.raven.openyurt.io")
        );
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["gw".to_owned()]));
        let versions: Vec<_> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage))
            .collect();
        assert_eq!(
            versions,
            vec![("v1alpha1", true, false), ("v1beta1", true, true)]
        );
    }

    #[test]
    fn crd_schema_keeps_openyurt_field_spellings() {
        let yaml = serde_json::to_string(&gateway_crd()).unwrap_or_default();
        for field in [
            "\"Replicas\"",
            "\"proxyHTTPPort\"",
            "\"proxyHTTPSPort\"",
            "\"natType\"",
            "\"publicIP\"",
            "\"publicPort\"",
            "\"underNAT\"",
            "\"activeEndpoints\"",
            "\"activeEndpoint\"",
            "\"privateIP\"",
            "\"exposeType\"",
        ] {
            assert!(yaml.contains(field), "CRD schema lacks {field}");
        }
    }
}
