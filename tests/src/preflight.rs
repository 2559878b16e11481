//! What the lab needs on this machine, checked before anything is built:
//! every missing tool is named with the Debian package that ships it and the
//! exact `apt-get install` line, instead of a lab that half builds (`nft: No
//! such file or directory`) or a connectivity matrix that is all FAIL for want
//! of `ping`.

use std::path::Path;

/// `tool package` per line (`#` comments); shared with `lab.sh`.
pub const LAB_TOOLS: &str = include_str!("../lab-tools.txt");

/// One missing tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub tool: String,
    pub package: String,
}

/// The `(tool, package)` pairs of `list`.
pub fn parse(list: &str) -> Vec<(&str, &str)> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(t, p)| (t, p.trim()))
        .collect()
}

/// The tools of `list` found in none of the directories of `path` (a
/// `PATH`-style list), in list order.
pub fn missing(list: &str, path: &str) -> Vec<Missing> {
    parse(list)
        .into_iter()
        .filter(|(tool, _)| {
            !path
                .split(':')
                .filter(|d| !d.is_empty())
                .any(|d| is_executable(&Path::new(d).join(tool)))
        })
        .map(|(tool, package)| Missing {
            tool: tool.to_owned(),
            package: package.to_owned(),
        })
        .collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The message for `missing`: each tool with its package, then the one
/// `apt-get install` line that installs them all. `None` when nothing is
/// missing.
pub fn report(missing: &[Missing]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let mut packages: Vec<&str> = Vec::new();
    for m in missing {
        if !packages.contains(&m.package.as_str()) {
            packages.push(&m.package);
        }
    }
    let mut out = String::from("the lab needs tools this machine does not have:\n");
    for m in missing {
        out.push_str(&format!(
            "  {:<18} (Debian package {})\n",
            m.tool, m.package
        ));
    }
    out.push_str(&format!(
        "install them (as root):\n  apt-get install -y --no-install-recommends {}\n",
        packages.join(" ")
    ));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_tool_is_named_with_its_package_and_one_apt_get_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A PATH with only `ip` on it.
        let ip = dir.path().join("ip");
        std::fs::write(&ip, "#!/bin/sh\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.path().to_string_lossy().into_owned();
        let missing = missing(LAB_TOOLS, &path);
        let tools: Vec<&str> = missing.iter().map(|m| m.tool.as_str()).collect();
        assert!(!tools.contains(&"ip"), "{tools:?}");
        for t in ["nft", "ping", "wireguard-go", "iptables", "conntrack"] {
            assert!(tools.contains(&t), "{t} not reported: {tools:?}");
        }
        let text = report(&missing).expect("a report");
        assert!(
            text.contains("ping               (Debian package iputils-ping)"),
            "{text}"
        );
        assert!(
            text.contains(
                "apt-get install -y --no-install-recommends nftables iptables iputils-ping conntrack procps util-linux wireguard-go\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn nothing_missing_means_no_report() {
        assert_eq!(report(&[]), None);
        // A non-executable file of the right name does not count.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("nft"), "").expect("write");
        let m = missing("nft nftables\n", &dir.path().to_string_lossy());
        assert_eq!(m.len(), 1);
    }
}
