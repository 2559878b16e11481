//! The embedded default: the OpenYurt Raven user-manual cluster
//! (`deploy/examples/user-manual`), built into the binary so a newcomer can
//! run raven with no cluster and no files.

/// The example manifests as `(file name, contents)`.
pub fn user_manual() -> Vec<(String, String)> {
    [
        (
            "gateways.yaml",
            include_str!("../../deploy/examples/user-manual/gateways.yaml"),
        ),
        (
            "nodes.yaml",
            include_str!("../../deploy/examples/user-manual/nodes.yaml"),
        ),
        (
            "raven-cfg.yaml",
            include_str!("../../deploy/examples/user-manual/raven-cfg.yaml"),
        ),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_owned(), t.to_owned()))
    .collect()
}
