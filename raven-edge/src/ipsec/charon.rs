//! The `strongswan.conf` raven's charon runs with.
//!
//! charon is its own long-lived process (in Kubernetes a separate container
//! of the agent's pod sharing the VICI socket directory), so an agent restart
//! or upgrade never drops an SA: the agent only talks to it over VICI.
//!
//! Two datapaths, chosen when charon starts:
//! - [`Datapath::Libipsec`]: userspace ESP in UDP over a TUN device
//!   (`ipsec0`), for hosts without kernel ESP (as in this project's test
//!   machines). `kernel-libipsec` must load before `kernel-netlink`; it
//!   installs its routes in table 220 (policy rule priority 220).
//! - [`Datapath::Kernel`]: kernel XFRM (policy based) via `kernel-netlink`
//!   alone. Not exercised by the tests here: these kernels have no ESP
//!   (`Add SA … Function not implemented`); the generated file is
//!   unit-tested only.
//!
//! UDP 4500 only (`port = 0`): IKE and ESP are always encapsulated
//! (`encap = yes` on every connection), one port to open and to forward.

use std::path::Path;

/// How charon moves ESP packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    /// Userspace ESP over TUN `ipsec0` (kernel-libipsec).
    Libipsec,
    /// Kernel XFRM.
    Kernel,
}

impl std::str::FromStr for Datapath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "libipsec" => Ok(Self::Libipsec),
            "kernel" => Ok(Self::Kernel),
            _ => Err(format!(
                "{s:?} is not an IPsec datapath (libipsec or kernel)"
            )),
        }
    }
}

/// Plugins charon loads, in order (`strongswan.conf` has no separators but
/// spaces). Ed25519 and X25519 come from `openssl`.
fn plugins(dp: Datapath) -> &'static str {
    match dp {
        Datapath::Libipsec => {
            "random nonce openssl pem pkcs1 pkcs8 pubkey sha2 aes gcm hmac kdf x509 kernel-libipsec kernel-netlink socket-default vici"
        }
        Datapath::Kernel => {
            "random nonce openssl pem pkcs1 pkcs8 pubkey sha2 aes gcm hmac kdf x509 kernel-netlink socket-default vici"
        }
    }
}

/// Retransmissions of an unanswered IKE request before charon gives up on
/// the peer (`charon.retransmit_tries`): the request is sent
/// `1 + RETRANSMIT_TRIES` times.
pub const RETRANSMIT_TRIES: u32 = 3;
/// Seconds charon waits for the answer to the first send of a request
/// (`charon.retransmit_timeout`).
pub const RETRANSMIT_TIMEOUT_SECS: f64 = 1.0;
/// Growth of that wait per retransmission (`charon.retransmit_base`): the
/// wait after send `n` (0 for the first) is `timeout × base^n`.
pub const RETRANSMIT_BASE: f64 = 1.2;

/// Seconds from the first send of an IKE request (a DPD probe, a rekey) to
/// charon declaring the peer dead when nothing answers: the sum of the
/// waits after each of the `1 + tries` sends (strongSwan 5.9: `timeout ×
/// base^n` after send `n`), 1 + 1.2 + 1.44 + 1.73 ≈ 5.4 s here — with the
/// defaults (5 tries, 4 s, 1.8) it is 165 s, with 3 tries 47 s. Four sends
/// over 5.4 s ride out a lost packet or a charon busy for a second or two
/// (this also bounds each IKE_SA_INIT attempt; `keyingtries = 0` tries again
/// for ever). Together with [`super::spec::DPD_DELAY_SECS`] a peer silent
/// under traffic is declared dead ≈ 7.4 s after its last packet.
pub fn dead_peer_secs() -> f64 {
    (0..=RETRANSMIT_TRIES)
        .map(|n| RETRANSMIT_TIMEOUT_SECS * RETRANSMIT_BASE.powi(n as i32))
        .sum()
}

/// The `strongswan.conf` of a raven charon with its VICI socket at `vici`
/// and, when `log` is given, a file log flushed line by line.
pub fn strongswan_conf(dp: Datapath, vici: &Path, log: Option<&Path>, port: u16) -> String {
    let mut s = format!(
        "charon {{\n  load = {}\n  port = 0\n  port_nat_t = {port}\n  install_virtual_ip = no\n  retransmit_tries = {RETRANSMIT_TRIES}\n  retransmit_timeout = {RETRANSMIT_TIMEOUT_SECS:.1}\n  retransmit_base = {RETRANSMIT_BASE:.1}\n  make_before_break = yes\n  plugins {{\n    vici {{\n      socket = unix://{}\n    }}\n  }}\n",
        plugins(dp),
        vici.display()
    );
    if let Some(log) = log {
        s.push_str(&format!(
            "  filelog {{\n    raven {{\n      path = {}\n      default = 1\n      ike = 2\n      cfg = 2\n      flush_line = yes\n      time_format = %H:%M:%S\n      time_add_ms = yes\n    }}\n  }}\n",
            log.display()
        ));
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libipsec_loads_before_kernel_netlink_and_only_udp_4500_listens() {
        let s = strongswan_conf(
            Datapath::Libipsec,
            Path::new("/run/raven/charon.vici"),
            None,
            4500,
        );
        let lib = s.find("kernel-libipsec").unwrap_or(usize::MAX);
        let nl = s.find("kernel-netlink").unwrap_or(0);
        assert!(lib < nl, "{s}");
        assert!(
            s.contains("port = 0\n") && s.contains("port_nat_t = 4500\n"),
            "{s}"
        );
        assert!(s.contains("socket = unix:///run/raven/charon.vici"), "{s}");
        assert!(
            !s.contains(';'),
            "strongswan.conf has no ';' separators: {s}"
        );
    }

    #[test]
    fn a_silent_peer_is_declared_dead_within_a_few_seconds_of_the_first_probe() {
        let s = strongswan_conf(Datapath::Libipsec, Path::new("/v.sock"), None, 4500);
        for line in [
            "  retransmit_tries = 3\n",
            "  retransmit_timeout = 1.0\n",
            "  retransmit_base = 1.2\n",
        ] {
            assert!(s.contains(line), "{line:?} missing: {s}");
        }
        let dead = dead_peer_secs();
        assert!((5.3..5.5).contains(&dead), "{dead}");
        let detect = dead + f64::from(crate::ipsec::spec::DPD_DELAY_SECS);
        assert!(
            (5.0..=8.0).contains(&detect),
            "a peer silent under traffic is declared dead after {detect} s"
        );
    }

    #[test]
    fn kernel_datapath_has_no_libipsec_and_log_flushes_lines() {
        let s = strongswan_conf(
            Datapath::Kernel,
            Path::new("/v.sock"),
            Some(Path::new("/var/log/charon.log")),
            4500,
        );
        assert!(!s.contains("libipsec"), "{s}");
        assert!(s.contains("kernel-netlink"), "{s}");
        assert!(s.contains("flush_line = yes"), "{s}");
        // Milliseconds: an IKE exchange and the packets around it fit in one second.
        assert!(s.contains("time_add_ms = yes"), "{s}");
        assert_eq!(s.matches('{').count(), s.matches('}').count(), "{s}");
    }
}
