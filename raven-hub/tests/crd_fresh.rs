//! The checked-in CRD is exactly what the Rust types generate.

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/raven.openyurt.io_gateways.yaml"
    );
    let want = raven_hub::crd::gateway_crd_yaml().unwrap_or_default();
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "{path} is stale: run `cargo run -q -p raven-hub --bin crdgen > deploy/crds/raven.openyurt.io_gateways.yaml`"
    );
}
