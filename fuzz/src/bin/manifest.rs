//! Manifest files (YAML / JSON, one or many documents) into Gateways, Nodes
//! and raven-cfg, with the compile that follows.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let loaded = raven_core::manifest::load(&[("fuzz.yaml".to_owned(), text.to_owned())]);
            let _ = loaded;
        }
    });
}
