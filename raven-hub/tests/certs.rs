//! `raven-hub certs` as an operator runs it: file modes whatever the umask,
//! private keys never left in files others can read, and per-node bundles
//! that hold exactly what an agent needs.
#![cfg(unix)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs `raven-hub certs --out OUT --node NODES` under `umask`.
fn certs(umask: &str, out: &Path, nodes: &str) -> std::process::Output {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask {umask} && exec \"$0\" certs --out \"$1\" --node \"$2\""
        ))
        .arg(env!("CARGO_BIN_EXE_raven-hub"))
        .arg(out)
        .arg(nodes)
        .output()
        .expect("run raven-hub certs");
    assert!(
        out.status.success(),
        "raven-hub certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn certs_under_umask_000_writes_0700_dirs_0600_keys_and_0644_certificates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("certs");
    certs("000", &out, "a,b");

    assert_eq!(mode(&out), 0o700, "{}", out.display());
    for f in ["ca-key.pem", "hub-key.pem"] {
        assert_eq!(mode(&out.join(f)), 0o600, "{f}");
    }
    for f in ["ca.pem", "hub.pem"] {
        assert_eq!(mode(&out.join(f)), 0o644, "{f}");
    }
    assert_eq!(mode(&out.join("nodes")), 0o700, "nodes/");
    for node in ["a", "b"] {
        let bundle = out.join("nodes").join(node);
        assert_eq!(mode(&bundle), 0o700, "{}", bundle.display());
        assert_eq!(mode(&bundle.join("node-key.pem")), 0o600, "{node} key");
        assert_eq!(mode(&bundle.join("node.pem")), 0o644, "{node} cert");
        assert_eq!(mode(&bundle.join("ca.pem")), 0o644, "{node} ca");
    }
}

#[test]
fn node_bundle_holds_exactly_what_an_agent_needs_and_no_ca_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("certs");
    certs("022", &out, "edge-1");

    let bundle = out.join("nodes").join("edge-1");
    assert_eq!(
        names(&bundle),
        ["ca.pem", "node-key.pem", "node.pem"]
            .map(str::to_owned)
            .into_iter()
            .collect::<BTreeSet<_>>()
    );
    let ca_key = std::fs::read_to_string(out.join("ca-key.pem")).expect("ca key");
    for f in names(&bundle) {
        let text = std::fs::read_to_string(bundle.join(&f)).expect("read");
        assert_ne!(text.trim(), ca_key.trim(), "{f} is the CA key");
    }
    assert_eq!(
        std::fs::read(bundle.join("ca.pem")).expect("bundle ca"),
        std::fs::read(out.join("ca.pem")).expect("ca")
    );
    // No node key or certificate lies in the CA's directory itself.
    assert!(
        names(&out).iter().all(|n| !n.starts_with("node-")),
        "{:?}",
        names(&out)
    );
}

#[test]
fn certs_never_writes_a_private_key_into_an_existing_world_readable_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("certs");
    certs("022", &out, "a");
    // An operator (or an old version) left keys readable by everyone.
    for f in [
        out.join("hub-key.pem"),
        out.join("ca-key.pem"),
        out.join("nodes/a/node-key.pem"),
    ] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let run = certs("000", &out, "a");
    for f in ["hub-key.pem", "ca-key.pem", "nodes/a/node-key.pem"] {
        assert_eq!(mode(&out.join(f)), 0o600, "{f}");
    }
    // The CA key was found readable by others: that is said, not fixed
    // silently.
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("ca-key.pem") && stderr.contains("0644"),
        "{stderr}"
    );
}
