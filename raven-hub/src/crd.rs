//! Rendering of the CRDs raven serves, from the Rust API types.

/// The Gateway CRD as YAML, with a header saying how it was made.
pub fn gateway_crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&raven_core::api::gateway_crd())?;
    Ok(format!(
        "# Generated from raven-core's Rust types by `cargo run -p raven-hub --bin crdgen`.\n# Do not edit: CI regenerates it and fails on any difference.\n{body}"
    ))
}
