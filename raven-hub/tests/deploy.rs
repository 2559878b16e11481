//! The manifests in deploy/base/ use flags the real binaries accept.

use clap::Parser;

fn container_args(path: &str, kind: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
        if v["kind"] == kind {
            return v["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .expect("args")
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
        }
    }
    panic!("no {kind} in {path}");
}

#[test]
fn hub_deployment_args_parse_with_the_real_cli() {
    let args = container_args(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/hub.yaml"),
        "Deployment",
    );
    let parsed =
        raven_hub::args::Args::try_parse_from(std::iter::once("raven-hub".to_owned()).chain(args));
    assert!(parsed.is_ok(), "{:?}", parsed.err());
}
