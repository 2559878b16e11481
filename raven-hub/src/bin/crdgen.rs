//! Prints the `gateways.raven.openyurt.io` CRD generated from raven's Rust
//! types. `deploy/crds/raven.openyurt.io_gateways.yaml` is this output; CI
//! fails when the two differ.

fn main() -> anyhow::Result<()> {
    print!("{}", raven_hub::crd::gateway_crd_yaml()?);
    Ok(())
}
