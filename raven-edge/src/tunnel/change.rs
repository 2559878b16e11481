//! A change of a WireGuard device, as a value: what [`super::diff`] and
//! [`super::Nudges`] compute, and what each backend renders in its own
//! language — UAPI `set=1` text for wireguard-go ([`Change::to_uapi`]),
//! `WG_CMD_SET_DEVICE` messages for the kernel
//! ([`super::kernel::set_messages`]). `raven-edge plan` prints it as the
//! `wg set` commands that would make it ([`Change::commands`]).
//!
//! Settings layer on top of the device's, as in WireGuard itself: a
//! device setting left `None` stays as it is, and a peer that is mentioned
//! keeps whatever its [`PeerChange`] does not set.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use super::keys::{Key, Secret};

/// One peer's part of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub key: Key,
    /// Remove the peer (with its session). A later entry with the same key
    /// adds it back: a nudge is a removal and a re-add.
    pub remove: bool,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    /// `Some`: the peer's allowed IPs become exactly these.
    pub allowed_ips: Option<Vec<IpNet>>,
}

impl PeerChange {
    /// A change of the peer `key` that sets nothing yet.
    pub fn new(key: Key) -> Self {
        Self {
            key,
            remove: false,
            endpoint: None,
            keepalive: None,
            allowed_ips: None,
        }
    }

    /// The removal of peer `key`.
    pub fn removal(key: Key) -> Self {
        Self {
            remove: true,
            ..Self::new(key)
        }
    }

    pub fn endpoint(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    pub fn keepalive(mut self, seconds: u16) -> Self {
        self.keepalive = Some(seconds);
        self
    }

    /// The peer's allowed IPs become exactly `ips`.
    pub fn replace_allowed_ips(mut self, ips: impl IntoIterator<Item = IpNet>) -> Self {
        self.allowed_ips = Some(ips.into_iter().collect());
        self
    }
}

/// A device change; [`Change::is_empty`] when there is nothing to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub private_key: Option<Secret>,
    pub listen_port: Option<u16>,
    /// In the order they are applied.
    pub peers: Vec<PeerChange>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none() && self.listen_port.is_none() && self.peers.is_empty()
    }

    /// Peers removed (a nudge's removal counts, though the peer is added
    /// back).
    pub fn removals(&self) -> usize {
        self.peers.iter().filter(|p| p.remove).count()
    }

    /// The body of a UAPI `set=1` request (without the `set=1` line and the
    /// final blank line), keys in hex as the protocol wants them. Pure.
    pub fn to_uapi(&self) -> String {
        let mut body = String::new();
        if let Some(k) = &self.private_key {
            let _ = writeln!(body, "private_key={}", k.0.to_hex());
        }
        if let Some(p) = self.listen_port {
            let _ = writeln!(body, "listen_port={p}");
        }
        for p in &self.peers {
            let _ = writeln!(body, "public_key={}", p.key.to_hex());
            if p.remove {
                body.push_str("remove=true\n");
                continue;
            }
            if let Some(e) = p.endpoint {
                let _ = writeln!(body, "endpoint={e}");
            }
            if let Some(k) = p.keepalive {
                let _ = writeln!(body, "persistent_keepalive_interval={k}");
            }
            if let Some(ips) = &p.allowed_ips {
                body.push_str("replace_allowed_ips=true\n");
                for ip in ips {
                    let _ = writeln!(body, "allowed_ip={ip}");
                }
            }
        }
        body
    }

    /// The change as the `wg set` commands on `dev` that would make it, one
    /// per line, for people (`raven-edge plan`). The private key is never
    /// printed. Pure.
    pub fn commands(&self, dev: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.private_key.is_some() {
            out.push(format!("wg set {dev} private-key <the node's key>"));
        }
        if let Some(p) = self.listen_port {
            out.push(format!("wg set {dev} listen-port {p}"));
        }
        for p in &self.peers {
            let mut line = format!("wg set {dev} peer {}", p.key);
            if p.remove {
                line.push_str(" remove");
            }
            if let Some(e) = p.endpoint {
                let _ = write!(line, " endpoint {e}");
            }
            if let Some(k) = p.keepalive {
                let _ = write!(line, " persistent-keepalive {k}");
            }
            if let Some(ips) = &p.allowed_ips {
                let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                let _ = write!(line, " allowed-ips {:?}", ips.join(","));
            }
            out.push(line);
        }
        out
    }
}

/// A change touching every setting, for the renderers' tests: private key
/// `[9; 32]`, listen port 4500, the removal of peer `[2; 32]` and peer
/// `[1; 32]` at 198.51.100.1:4500, keepalive 25, two allowed IPs.
#[cfg(test)]
pub(crate) fn sample() -> Change {
    let net = |s: &str| s.parse::<IpNet>().unwrap_or_else(|e| panic!("{s}: {e}"));
    Change {
        private_key: Some(Secret(Key([9; 32]))),
        listen_port: Some(4500),
        peers: vec![
            PeerChange::removal(Key([2; 32])),
            PeerChange::new(Key([1; 32]))
                .endpoint(
                    "198.51.100.1:4500"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                )
                .keepalive(25)
                .replace_allowed_ips([net("10.1.0.0/24"), net("fd00::/64")]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    #[test]
    fn a_change_renders_as_the_uapi_body_wireguard_go_reads() {
        let k1 = "01".repeat(32);
        let k2 = "02".repeat(32);
        let k9 = "09".repeat(32);
        assert_eq!(
            sample().to_uapi(),
            format!(
                "private_key={k9}\nlisten_port=4500\npublic_key={k2}\nremove=true\npublic_key={k1}\nendpoint=198.51.100.1:4500\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/24\nallowed_ip=fd00::/64\n"
            )
        );
        assert_eq!(Change::default().to_uapi(), "");
        assert!(Change::default().is_empty());
        assert_eq!(sample().removals(), 1);
    }

    #[test]
    fn a_change_reads_as_wg_commands_without_the_private_key() {
        let lines = sample().commands("raven-wg0");
        assert_eq!(
            lines,
            vec![
                "wg set raven-wg0 private-key <the node's key>".to_owned(),
                "wg set raven-wg0 listen-port 4500".to_owned(),
                format!("wg set raven-wg0 peer {} remove", key(2)),
                format!(
                    "wg set raven-wg0 peer {} endpoint 198.51.100.1:4500 persistent-keepalive 25 allowed-ips \"10.1.0.0/24,fd00::/64\"",
                    key(1)
                ),
            ]
        );
        let debug = format!("{:?}", sample());
        assert!(
            !debug.contains(&key(9).to_base64()) && !debug.contains(&key(9).to_hex()),
            "the private key is never formatted: {debug}"
        );
    }
}
