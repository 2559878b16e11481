//! The README's first command (`./lab.sh`) on a machine that lacks the
//! lab's tools: it names every missing tool with its Debian package and the
//! exact `apt-get install` line, and exits 1 before building anything.

use std::path::Path;
use std::process::Command;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

#[test]
fn lab_sh_on_a_machine_without_the_tools_names_them_and_the_apt_line_and_builds_nothing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // A PATH with the shell utilities the script itself uses, and nothing else:
    // no ip, nft, ping, wireguard-go, cc, cargo.
    let bin = tempfile::tempdir().expect("tempdir");
    for tool in ["bash", "id", "sed", "awk", "sort", "head", "cut", "dirname"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed"));
        std::os::unix::fs::symlink(found, bin.path().join(tool)).expect("symlink");
    }
    let out = Command::new(bin.path().join("bash"))
        .arg(root.join("lab.sh"))
        .env_clear()
        .env("PATH", bin.path())
        .env("HOME", bin.path())
        .output()
        .expect("run lab.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    if !is_root() {
        assert!(stderr.contains("needs root"), "{stderr}");
        return;
    }
    for line in [
        "  nft (Debian package nftables)",
        "  ping (Debian package iputils-ping)",
        "  wireguard-go (Debian package wireguard-go)",
        "  cc (Debian packages gcc libc6-dev)",
        "  apt-get install -y --no-install-recommends iproute2 nftables iptables iputils-ping conntrack procps util-linux wireguard-go gcc libc6-dev",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(
        !stderr.contains("Compiling"),
        "it built something:\n{stderr}"
    );
}
