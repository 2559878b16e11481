//! `raven-edge diagnose`: checks this node the way `subctl diagnose` and
//! `tailscale netcheck` do, and says for each finding what to do.
//!
//! What it looks at:
//! - kernel: the VXLAN module (`raven0`), the WireGuard module (else
//!   `wireguard-go` must be installed), IPv4 forwarding on gateways, policy
//!   routing (`ip rule`) and raven's rules;
//! - the iptables backend (`nf_tables` or `legacy`) and the CNI's
//!   masquerade rules in `nat POSTROUTING` against raven's skip-NAT jump,
//!   which must come first (needs root to read; skipped otherwise);
//! - UDP reachability of every tunnel peer, from raven's own tunnel
//!   traffic: a WireGuard handshake within 3 minutes proves UDP 4500 both
//!   ways; none means blocked;
//! - `raven0` in a domain with more than one node (OpenYurt's first
//!   troubleshooting entry);
//! - NAT behaviour, from what the paths show: behind NAT, a direct path to
//!   another NATed gateway means the mapping is endpoint-independent; all
//!   of them relayed means it is not (or the peers' is not);
//! - MTU: the tunnel device's against the underlay's less WireGuard's 80
//!   bytes;
//! - clock skew against the hub, from the hub's heartbeats.
//!
//! The agent's view comes from its `/status` ([`crate::status`]); the rest
//! is read from this machine (`/sys`, `/proc`, `ip`, `iptables`). Nothing is
//! changed. Exit status 1 when a finding is an error.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::status::Status;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warning,
    Error,
    /// Could not be checked here (no root, no tool, not this node's role).
    Skipped,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Error => "error",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do; empty when nothing.
    pub fix: String,
}

fn finding(check: &str, verdict: Verdict, detail: String, fix: &str) -> Finding {
    Finding {
        check: check.to_owned(),
        verdict,
        detail,
        fix: fix.to_owned(),
    }
}

/// What this machine shows, gathered before judging (so the judging is a
/// pure function, tested on its own).
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub vxlan_module: bool,
    pub wireguard_module: bool,
    pub wireguard_go: bool,
    pub ip_forward: Option<bool>,
    /// `ip -4 rule show`, when it ran.
    pub rules: Option<String>,
    /// `iptables --version`.
    pub iptables_version: Option<String>,
    /// `iptables-save -t nat`, when it could be read (root).
    pub nat_table: Option<String>,
    /// `raven0` exists.
    pub raven0: bool,
    /// MTU of the tunnel device, when it exists.
    pub tunnel_mtu: Option<u32>,
    /// MTU of the device the underlay leaves through.
    pub underlay_mtu: Option<u32>,
    pub tunnel_dev: String,
}

/// A WireGuard handshake older than this means the peer is not answering
/// (WireGuard rehandshakes every 2 minutes while traffic flows).
const HANDSHAKE_FRESH_SECONDS: u64 = 180;
/// WireGuard's overhead over an IPv6 underlay (IPv6 40, UDP 8, WireGuard
/// 32): the one tunnel MTU raven uses serves peers of either family.
const WIREGUARD_OVERHEAD: u32 = 80;
/// Clock difference with the hub worth a warning.
const CLOCK_SKEW_WARN_MS: i64 = 5_000;

/// Judges `facts` and the agent's `status`.
pub fn findings(status: &Status, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    let in_domain = status.gateway.is_some();
    let carries_tunnel = status.role == "gateway" || status.role == "standby";

    out.push(if facts.vxlan_module {
        finding(
            "kernel: VXLAN",
            Verdict::Ok,
            "the vxlan module is loaded".into(),
            "",
        )
    } else if in_domain && status.domain_members > 1 {
        finding(
            "kernel: VXLAN",
            Verdict::Error,
            "the vxlan module is not loaded: raven0 cannot be created".into(),
            "modprobe vxlan (and add it to /etc/modules-load.d/)",
        )
    } else {
        finding(
            "kernel: VXLAN",
            Verdict::Warning,
            "the vxlan module is not loaded (it is loaded when raven0 is first created)".into(),
            "modprobe vxlan",
        )
    });
    out.push(match (facts.wireguard_module, facts.wireguard_go) {
        (true, _) => finding("kernel: WireGuard", Verdict::Ok, "kernel WireGuard is available".into(), ""),
        (false, true) => finding(
            "kernel: WireGuard",
            Verdict::Ok,
            "no kernel WireGuard; wireguard-go (userspace) is installed and is used".into(),
            "",
        ),
        (false, false) if carries_tunnel => finding(
            "kernel: WireGuard",
            Verdict::Error,
            "no kernel WireGuard and no wireguard-go: this tunnel node cannot build its tunnel".into(),
            "apt-get install -y --no-install-recommends wireguard-go (or load the wireguard module)",
        ),
        (false, false) => finding(
            "kernel: WireGuard",
            Verdict::Skipped,
            "no kernel WireGuard and no wireguard-go; only tunnel nodes need one".into(),
            "",
        ),
    });
    if carries_tunnel {
        out.push(match facts.ip_forward {
            Some(true) => finding("kernel: IPv4 forwarding", Verdict::Ok, "net.ipv4.ip_forward = 1".into(), ""),
            Some(false) => finding(
                "kernel: IPv4 forwarding",
                Verdict::Error,
                "net.ipv4.ip_forward = 0: this gateway drops traffic it should forward between domains".into(),
                "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d/)",
            ),
            None => finding("kernel: IPv4 forwarding", Verdict::Skipped, "could not read /proc/sys/net/ipv4/ip_forward".into(), ""),
        });
    }
    out.push(match &facts.rules {
        None => finding(
            "kernel: policy routing",
            Verdict::Error,
            "`ip rule` failed: no policy routing (CONFIG_IP_MULTIPLE_TABLES) or no iproute2".into(),
            "apt-get install -y --no-install-recommends iproute2; a kernel with policy routing",
        ),
        Some(rules) => {
            let ours = rules.lines().any(|l| l.contains("lookup 9027"));
            if ours || !in_domain {
                finding(
                    "kernel: policy routing",
                    Verdict::Ok,
                    if ours { "raven's rule (priority 9027, table 9027) is installed" } else { "available" }.into(),
                    "",
                )
            } else if status.dataplane.holding.is_some() {
                finding(
                    "kernel: policy routing",
                    Verdict::Warning,
                    "raven's rule (table 9027) is missing while the agent holds the kernel state".into(),
                    "wait for a complete snapshot from the hub (raven-edge status shows why it holds)",
                )
            } else {
                finding(
                    "kernel: policy routing",
                    Verdict::Error,
                    "raven's rule (table 9027) is missing: traffic to other domains is not routed".into(),
                    "see `raven-edge plan` and the agent's log for the failed reconcile",
                )
            }
        }
    });
    out.push(match &facts.iptables_version {
        None => finding(
            "iptables backend",
            if carries_tunnel { Verdict::Error } else { Verdict::Skipped },
            "iptables is not installed: a gateway cannot keep the CNI from masquerading tunnel traffic".into(),
            "apt-get install -y --no-install-recommends iptables",
        ),
        Some(v) => finding(
            "iptables backend",
            Verdict::Ok,
            format!(
                "{}; raven writes its skip-NAT rules with it — the CNI must use the same backend",
                v.trim()
            ),
            "",
        ),
    });
    if carries_tunnel {
        out.push(match &facts.nat_table {
            None => finding(
                "CNI masquerade",
                Verdict::Skipped,
                "the nat table needs root to read".into(),
                "run diagnose as root",
            ),
            Some(nat) => masquerade(nat),
        });
    }
    if in_domain && status.domain_members > 1 && !status.role.is_empty() {
        out.push(if facts.raven0 {
            finding("raven0", Verdict::Ok, format!("raven0 exists ({} nodes in the domain)", status.domain_members), "")
        } else {
            finding(
                "raven0",
                Verdict::Error,
                format!("raven0 is missing though {} nodes share the gateway's domain", status.domain_members),
                "check UDP 4472 between the domain's nodes and the agent's log (raven-edge plan shows what it would create)",
            )
        });
    } else if in_domain {
        out.push(finding(
            "raven0",
            Verdict::Ok,
            "a one-node domain needs no raven0 (it carries traffic between a domain's nodes)"
                .into(),
            "",
        ));
    }
    for p in &status.peers {
        let check = format!(
            "UDP to {} ({})",
            p.peer,
            p.gateway.as_deref().unwrap_or("?")
        );
        let via = p.endpoint.as_deref().unwrap_or("no endpoint");
        out.push(match p.handshake_seconds {
            Some(a) if a <= HANDSHAKE_FRESH_SECONDS => finding(
                &check,
                Verdict::Ok,
                format!("{} path via {via}: handshake {a}s ago", p.path),
                "",
            ),
            Some(a) => finding(
                &check,
                Verdict::Error,
                format!("{} path via {via}: last handshake {a}s ago; the peer stopped answering", p.path),
                "check UDP 4500 (and 4501 for direct NAT paths) in the security groups and firewalls on both sides, and the peer's agent",
            ),
            None => finding(
                &check,
                Verdict::Error,
                format!("{} path via {via}: no handshake ever", p.path),
                "allow UDP 4500 (and 4501 for direct NAT paths) in the security groups and firewalls on both sides; check the peer's public IP in its Gateway",
            ),
        });
    }
    if status.role == "gateway" && status.under_nat {
        let nated: Vec<_> = status.peers.iter().collect();
        let direct = nated.iter().filter(|p| p.path == "direct").count();
        let relayed = nated.iter().filter(|p| p.path == "relayed").count();
        out.push(if relayed == 0 {
            finding("NAT", Verdict::Ok, format!("behind NAT; all {direct} peers direct"), "")
        } else if direct > 0 {
            finding(
                "NAT",
                Verdict::Ok,
                format!("behind NAT: endpoint-independent mapping (a direct path works to {direct} peers; {relayed} relayed)"),
                "",
            )
        } else {
            finding(
                "NAT",
                Verdict::Warning,
                format!("behind NAT: all {relayed} peers relayed, no direct path — this NAT (or the peers') maps endpoint-dependently (symmetric)"),
                "traffic works through the relay; for direct paths forward UDP 4501 to this gateway, or use a NAT with endpoint-independent mapping",
            )
        });
    }
    match (facts.tunnel_mtu, facts.underlay_mtu) {
        (Some(t), Some(u)) if t + WIREGUARD_OVERHEAD > u => out.push(finding(
            "MTU",
            Verdict::Error,
            format!("{} MTU {t} + WireGuard {WIREGUARD_OVERHEAD} exceeds the underlay's {u}: large packets are lost", facts.tunnel_dev),
            "restart the agent after changing the underlay MTU (it computes the tunnel MTU at start), or lower the underlay's MTU consistently",
        )),
        (Some(t), Some(u)) => out.push(finding(
            "MTU",
            Verdict::Ok,
            format!("{} MTU {t} over an underlay of {u} (WireGuard needs {WIREGUARD_OVERHEAD})", facts.tunnel_dev),
            "",
        )),
        (None, _) if carries_tunnel && status.role == "gateway" => out.push(finding(
            "MTU",
            Verdict::Warning,
            format!("the tunnel device {} does not exist", facts.tunnel_dev),
            "see the agent's log; `raven-edge plan` shows what it would create",
        )),
        _ => {}
    }
    out.push(match status.hub.clock_offset_ms {
        None => finding("clock vs hub", Verdict::Skipped, "no heartbeat from a hub yet".into(), ""),
        Some(o) if o.abs() > CLOCK_SKEW_WARN_MS => finding(
            "clock vs hub",
            Verdict::Warning,
            format!("this clock is {:.1}s {} the hub's", o.abs() as f64 / 1000.0, if o > 0 { "ahead of" } else { "behind" }),
            "run NTP on both (chrony or systemd-timesyncd): certificate validity and handshake ages depend on it",
        ),
        Some(o) => finding("clock vs hub", Verdict::Ok, format!("within {:.1}s of the hub's", o.abs() as f64 / 1000.0), ""),
    });
    out
}

/// The CNI's masquerade rules against raven's skip-NAT jump.
fn masquerade(nat: &str) -> Finding {
    let post: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING "))
        .collect();
    let jump = post
        .iter()
        .position(|l| l.contains(&format!("-j {}", crate::dataplane::skipnat::CHAIN)));
    let first_masq = post
        .iter()
        .position(|l| l.contains("MASQUERADE") || !l.contains("RAVEN"));
    let masq = nat.lines().filter(|l| l.contains("-j MASQUERADE")).count();
    match (jump, first_masq) {
        (None, _) if masq == 0 => finding(
            "CNI masquerade",
            Verdict::Ok,
            "no MASQUERADE rules in the nat table; nothing rewrites tunnel traffic".into(),
            "",
        ),
        (None, _) => finding(
            "CNI masquerade",
            Verdict::Error,
            format!(
                "{masq} MASQUERADE rules and no jump to {}: pod traffic to other domains is masqueraded",
                crate::dataplane::skipnat::CHAIN
            ),
            "see the agent's log for the failed skip-NAT reconcile (it repairs the jump within --resync)",
        ),
        (Some(j), Some(m)) if m < j => finding(
            "CNI masquerade",
            Verdict::Error,
            format!(
                "a POSTROUTING rule comes before raven's jump to {}: the CNI may masquerade tunnel traffic first",
                crate::dataplane::skipnat::CHAIN
            ),
            "the agent moves its jump first at the next reconcile; a CNI that keeps inserting before it must be configured not to masquerade raven's prefixes",
        ),
        (Some(_), _) => finding(
            "CNI masquerade",
            Verdict::Ok,
            format!(
                "raven's jump to {} comes first in POSTROUTING ({masq} MASQUERADE rules after it)",
                crate::dataplane::skipnat::CHAIN
            ),
            "",
        ),
    }
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(tool: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(tool).is_file())
}

fn module(name: &str) -> bool {
    if Path::new("/sys/module").join(name).exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()))
        .is_ok_and(|b| b.lines().any(|l| l.ends_with(&format!("/{name}.ko"))))
}

fn mtu(dev: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads this machine; `status` names the peers whose route gives the
/// underlay device.
pub fn gather(status: &Status, tunnel_dev: &str) -> Facts {
    let underlay_dev = status
        .peers
        .iter()
        .filter_map(|p| p.endpoint.as_deref())
        .filter_map(|e| e.parse::<std::net::SocketAddr>().ok())
        .find_map(|e| {
            let route = run("ip", &["-o", "route", "get", &e.ip().to_string()])?;
            let mut words = route.split_whitespace();
            words.find(|w| *w == "dev")?;
            words.next().map(str::to_owned)
        });
    Facts {
        vxlan_module: module("vxlan"),
        wireguard_module: module("wireguard"),
        wireguard_go: on_path("wireguard-go"),
        ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .ok()
            .map(|v| v.trim() == "1"),
        rules: run("ip", &["-4", "rule", "show"]),
        iptables_version: run("iptables", &["--version"]),
        nat_table: run("iptables-save", &["-t", "nat"]),
        raven0: Path::new("/sys/class/net/raven0").exists(),
        tunnel_mtu: mtu(tunnel_dev),
        underlay_mtu: underlay_dev.as_deref().and_then(mtu),
        tunnel_dev: tunnel_dev.to_owned(),
    }
}

/// The findings as a table (`CHECK RESULT DETAIL`, each fix on the line
/// below its finding), or JSON/YAML.
pub fn render(findings: &[Finding], format: raven_cli::output::Format) -> String {
    use raven_cli::output::Format;
    match format {
        Format::Json => {
            let mut out = serde_json::to_string_pretty(findings).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Yaml => {
            raven_cli::output::to_yaml(&serde_json::to_value(findings).unwrap_or_default())
        }
        Format::Table | Format::Wide => {
            let mut t = raven_cli::output::Table::new(&["check", "result", "detail"]);
            for f in findings {
                t.row(vec![
                    f.check.clone(),
                    f.verdict.word().to_owned(),
                    f.detail.clone(),
                ]);
            }
            let mut out = t.render();
            let fixes: Vec<&Finding> = findings
                .iter()
                .filter(|f| {
                    !f.fix.is_empty() && matches!(f.verdict, Verdict::Error | Verdict::Warning)
                })
                .collect();
            if !fixes.is_empty() {
                out.push_str("\nWhat to do:\n");
                for f in fixes {
                    out.push_str(&format!("  {}: {}\n", f.check, f.fix));
                }
            }
            out
        }
    }
}

/// Whether any finding is an error.
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.verdict == Verdict::Error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{CacheInfo, Dataplane, Failover, HubContact, Peer};

    fn gateway_status() -> Status {
        Status {
            node: "h1".into(),
            role: "gateway".into(),
            gateway: Some("gw-hangzhou".into()),
            under_nat: true,
            domain_members: 2,
            proxy: false,
            failover: Failover {
                elected: Some("h1".into()),
                in_use: Some("h1".into()),
                local: Default::default(),
            },
            hub: HubContact {
                connected: true,
                last_contact_seconds: Some(1),
                clock_offset_ms: Some(40),
            },
            cache: CacheInfo {
                epoch: "e".into(),
                revision: 3,
                complete: true,
                resources: 9,
            },
            dataplane: Dataplane {
                revision: 3,
                ok: true,
                last_error: None,
                holding: None,
                reconciles: 1,
                kernel_changes: 1,
            },
            peers: vec![],
        }
    }

    fn healthy_facts() -> Facts {
        Facts {
            vxlan_module: true,
            wireguard_module: false,
            wireguard_go: true,
            ip_forward: Some(true),
            rules: Some("9027:\tfrom all lookup 9027 proto 82\n".into()),
            iptables_version: Some("iptables v1.8.9 (nf_tables)\n".into()),
            nat_table: Some("*nat\n-A POSTROUTING -m comment --comment \"raven\" -j RAVEN-SKIP-NAT\n-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\nCOMMIT\n".into()),
            raven0: true,
            tunnel_mtu: Some(1420),
            underlay_mtu: Some(1500),
            tunnel_dev: "raven-wg0".into(),
        }
    }

    fn peer(name: &str, path: &str, handshake: Option<u64>) -> Peer {
        Peer {
            peer: name.into(),
            gateway: Some(format!("gw-{name}")),
            path: path.into(),
            endpoint: Some("203.0.113.10:4500".into()),
            handshake_seconds: handshake,
            rx_bytes: 0,
            tx_bytes: 0,
            ipsec: None,
        }
    }

    fn verdict(f: &[Finding], check: &str) -> Verdict {
        f.iter()
            .find(|x| x.check.starts_with(check))
            .unwrap_or_else(|| panic!("no {check} finding in {f:#?}"))
            .verdict
    }

    #[test]
    fn a_healthy_gateway_has_no_error_and_names_its_iptables_backend() {
        let mut s = gateway_status();
        s.peers = vec![
            peer("c1", "direct", Some(20)),
            peer("q1", "relayed", Some(30)),
        ];
        let f = findings(&s, &healthy_facts());
        assert!(!failed(&f), "{f:#?}");
        assert!(f.iter().any(|x| x.detail.contains("(nf_tables)")), "{f:#?}");
        assert_eq!(verdict(&f, "NAT"), Verdict::Ok);
        assert_eq!(verdict(&f, "CNI masquerade"), Verdict::Ok);
    }

    #[test]
    fn a_peer_that_never_handshook_is_an_error_that_says_to_open_udp_4500() {
        let mut s = gateway_status();
        s.peers = vec![peer("c1", "direct", None)];
        let f = findings(&s, &healthy_facts());
        let udp = f
            .iter()
            .find(|x| x.check.starts_with("UDP to c1"))
            .expect("finding");
        assert_eq!(udp.verdict, Verdict::Error);
        assert!(
            udp.fix.contains("UDP 4500") && udp.fix.contains("security groups"),
            "{udp:?}"
        );
        assert!(failed(&f));
    }

    #[test]
    fn raven0_missing_in_a_two_node_domain_is_an_error_and_fine_in_a_one_node_domain() {
        let mut facts = healthy_facts();
        facts.raven0 = false;
        assert_eq!(
            verdict(&findings(&gateway_status(), &facts), "raven0"),
            Verdict::Error
        );
        let mut alone = gateway_status();
        alone.domain_members = 1;
        assert_eq!(verdict(&findings(&alone, &facts), "raven0"), Verdict::Ok);
    }

    #[test]
    fn a_cni_rule_before_ravens_jump_is_an_error() {
        let mut facts = healthy_facts();
        facts.nat_table = Some(
            "-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\n-A POSTROUTING -j RAVEN-SKIP-NAT\n"
                .into(),
        );
        assert_eq!(
            verdict(&findings(&gateway_status(), &facts), "CNI masquerade"),
            Verdict::Error
        );
        facts.nat_table = Some("-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\n".into());
        assert_eq!(
            verdict(&findings(&gateway_status(), &facts), "CNI masquerade"),
            Verdict::Error
        );
    }

    #[test]
    fn all_peers_relayed_behind_nat_reads_as_endpoint_dependent_nat() {
        let mut s = gateway_status();
        s.peers = vec![
            peer("q1", "relayed", Some(5)),
            peer("c1", "relayed", Some(5)),
        ];
        let f = findings(&s, &healthy_facts());
        let nat = f.iter().find(|x| x.check == "NAT").expect("NAT finding");
        assert_eq!(nat.verdict, Verdict::Warning);
        assert!(nat.detail.contains("symmetric"), "{nat:?}");
    }

    #[test]
    fn a_tunnel_mtu_too_large_for_the_underlay_and_clock_skew_are_reported() {
        let mut facts = healthy_facts();
        facts.underlay_mtu = Some(1450);
        let mut s = gateway_status();
        s.hub.clock_offset_ms = Some(-12_300);
        let f = findings(&s, &facts);
        assert_eq!(verdict(&f, "MTU"), Verdict::Error);
        let clock = f.iter().find(|x| x.check == "clock vs hub").expect("clock");
        assert_eq!(clock.verdict, Verdict::Warning);
        assert!(clock.detail.contains("12.3s behind"), "{clock:?}");
    }

    #[test]
    fn a_tunnel_node_without_any_wireguard_or_forwarding_is_an_error() {
        let mut facts = healthy_facts();
        facts.wireguard_go = false;
        facts.ip_forward = Some(false);
        let f = findings(&gateway_status(), &facts);
        assert_eq!(verdict(&f, "kernel: WireGuard"), Verdict::Error);
        assert_eq!(verdict(&f, "kernel: IPv4 forwarding"), Verdict::Error);
    }

    #[test]
    fn the_table_lists_what_to_do_for_each_problem() {
        let mut s = gateway_status();
        s.peers = vec![peer("c1", "direct", None)];
        let text = render(
            &findings(&s, &healthy_facts()),
            raven_cli::output::Format::Table,
        );
        assert!(text.starts_with("CHECK "), "{text}");
        assert!(
            text.contains("\nWhat to do:\n  UDP to c1 (gw-c1): allow UDP 4500"),
            "{text}"
        );
    }
}
