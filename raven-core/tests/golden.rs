//! Golden files: every directory under `tests/golden/` holds YAML manifests
//! and the `topology.json` they compile to. Run with `UPDATE_GOLDEN=1` to
//! rewrite the expected files after an intended change, and review the diff.

use std::fs;
use std::path::Path;

use raven_core::{compile, manifest};
use raven_model::fixtures;

fn compile_dir(dir: &Path) -> String {
    let loaded = manifest::load(&fixtures::yaml_dir(dir));
    let mut compiled = compile(&loaded.inputs);
    compiled.topology.problems.extend(loaded.problems);
    compiled.topology.problems.sort();
    compiled.topology.to_json()
}

fn check(case: &str, dir: &Path) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
        .join("topology.json");
    let got = compile_dir(dir);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(golden.parent().unwrap_or(Path::new("."))).ok();
        fs::write(&golden, &got).unwrap_or_else(|e| panic!("write {}: {e}", golden.display()));
        return;
    }
    let want = fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            golden.display()
        )
    });
    pretty_assertions::assert_eq!(
        want,
        got,
        "golden {case} differs; UPDATE_GOLDEN=1 rewrites it"
    );
}

fn case(name: &str) {
    check(
        name,
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    );
}

#[test]
fn user_manual_example_compiles_to_golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual");
    check("user-manual", &dir);
}

#[test]
fn user_manual_as_written_reports_masked_ip_and_repeated_key_and_keeps_the_rest() {
    case("user-manual-as-written");
}

#[test]
fn nat_and_public_gateways_get_relays() {
    case("nat-relay");
}

#[test]
fn proxy_and_tunnel_endpoints_are_elected_separately() {
    case("proxy-and-tunnel");
}

#[test]
fn gateway_with_zero_ready_nodes_elects_nothing() {
    case("zero-ready");
}

#[test]
fn v1alpha1_gateway_is_converted_and_elected() {
    case("v1alpha1");
}

#[test]
fn invalid_objects_are_reported_next_to_valid_ones() {
    case("invalid-next-to-valid");
}

#[test]
fn missing_raven_cfg_elects_nothing_like_raven() {
    case("no-raven-cfg");
}

#[test]
fn in_view_agrees_with_view_names_for_every_node_and_resource_of_every_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("golden dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual"));
    let mut checked = 0;
    for dir in dirs {
        let loaded = manifest::load(&fixtures::yaml_dir(&dir));
        let topology = compile(&loaded.inputs).topology;
        for node in loaded.inputs.nodes.keys() {
            for compact in [false, true] {
                let names = raven_core::view::view_names(&topology, node, compact);
                // The borrowed view a session plans from is the same view.
                let borrowed: Vec<&raven_core::ResourceName> =
                    raven_core::view::view_resources(&topology, node, compact)
                        .into_iter()
                        .map(|(n, r)| {
                            assert_eq!(topology.resources.get(n), Some(r), "{n}");
                            n
                        })
                        .collect();
                let present: Vec<&raven_core::ResourceName> = names
                    .iter()
                    .filter(|n| topology.resources.contains_key(*n))
                    .collect();
                assert_eq!(
                    borrowed,
                    present,
                    "{}: {node} (compact {compact})",
                    dir.display()
                );
                for name in topology.resources.keys() {
                    assert_eq!(
                        raven_core::view::in_view(&topology, node, name, compact),
                        names.contains(name),
                        "{}: {node} / {name} (compact {compact})",
                        dir.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} pairs checked");
}

#[test]
fn proxy_ports_default_to_the_kubelets_and_bad_entries_are_reported_by_field() {
    case("proxy-ports");
}
