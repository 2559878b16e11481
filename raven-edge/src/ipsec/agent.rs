//! The agent's IPsec hook: which VPN to run, and one pass of IPsec for the
//! reconciler (spec → `lo` addresses → VICI diff → health rows).
//!
//! Selection: `raven-edge run --vpn auto` (the default) follows the
//! `raven-cfg` key `vpn-driver` as the hub passes it on in the settings
//! (WireGuard unless it says `ipsec`); `--vpn ipsec` or `--vpn wireguard`
//! force one. Unless forced to WireGuard, the agent makes and reports its
//! IPsec key from the start, so switching `vpn-driver` needs no restart.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use raven_model::topology::{PeerInfo, Settings, VpnDriver};
use raven_proto::v1;

use super::apply::{Ipsec, SaHealth, list_sas};
use super::keys::{IdentityKey, KEY_FILE, KeyError};
use super::spec::{IpsecSpec, spec};
use super::vici::Client;
use crate::dataplane::model::NodeInputs;

/// `--vpn`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VpnChoice {
    /// Follow `raven-cfg` (`vpn-driver`), WireGuard when unset.
    #[default]
    Auto,
    Wireguard,
    Ipsec,
}

impl std::fmt::Display for VpnChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Wireguard => "wireguard",
            Self::Ipsec => "ipsec",
        })
    }
}

impl VpnChoice {
    /// The driver in effect under `settings`. Pure.
    pub fn driver(self, settings: Option<&Settings>) -> VpnDriver {
        match self {
            Self::Wireguard => VpnDriver::Wireguard,
            Self::Ipsec => VpnDriver::Ipsec,
            Self::Auto => settings.map(|s| s.vpn_driver).unwrap_or_default(),
        }
    }
}

/// The agent's IPsec flags (`raven-edge run`).
#[derive(Debug, Clone, clap::Args)]
pub struct IpsecArgs {
    /// VPN between gateways: `auto` (follow `raven-cfg` `vpn-driver`,
    /// WireGuard unless it says `ipsec`), `wireguard` or `ipsec`.
    #[arg(long = "vpn", env = "RAVEN_VPN", default_value = "auto")]
    pub vpn: VpnChoice,
    /// charon's VICI socket (IPsec); charon runs as its own process.
    #[arg(long = "ipsec-vici", env = "RAVEN_IPSEC_VICI", default_value = DEFAULT_VICI)]
    pub vici: PathBuf,
    /// The TUN device of charon's kernel-libipsec datapath; the agent gives
    /// it the underlay MTU minus the ESP-in-UDP overhead (libipsec makes it
    /// 1400 whatever the underlay). Absent with the kernel datapath.
    #[arg(long = "ipsec-dev", env = "RAVEN_IPSEC_DEV", default_value = DEFAULT_IPSEC_DEV)]
    pub dev: String,
}

/// kernel-libipsec's TUN device.
pub const DEFAULT_IPSEC_DEV: &str = "ipsec0";

/// Default VICI socket of the charon next to the agent (in Kubernetes, a
/// directory both containers of the pod mount).
pub const DEFAULT_VICI: &str = "/run/raven/charon.vici";

/// Label of the `lo` addresses raven adds for strongSwan's traffic
/// selector check; raven removes only addresses with this label.
pub const LO_LABEL: &str = "lo:raven";

#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Vici(#[from] super::vici::ViciError),
    #[error("{0}")]
    Netlink(String),
}

/// The agent's IPsec state (none unless `--vpn` allows IPsec).
pub struct IpsecAgent {
    choice: VpnChoice,
    vici: PathBuf,
    dev: String,
    public: String,
    ipsec: tokio::sync::Mutex<Ipsec>,
}

impl std::fmt::Debug for IpsecAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpsecAgent")
            .field("vici", &self.vici)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl IpsecAgent {
    /// Loads or creates the key in `data_dir` unless `choice` is WireGuard.
    pub fn start(args: &IpsecArgs, data_dir: &Path) -> Result<Option<Self>, IpsecError> {
        if args.vpn == VpnChoice::Wireguard {
            return Ok(None);
        }
        let (key, _) = IdentityKey::load_or_create(data_dir, KEY_FILE)?;
        tracing::info!(vpn = %args.vpn, vici = %args.vici.display(), "IPsec available");
        Ok(Some(Self {
            choice: args.vpn,
            vici: args.vici.clone(),
            dev: args.dev.clone(),
            public: key.public_base64(),
            ipsec: tokio::sync::Mutex::new(Ipsec::new(key)),
        }))
    }

    /// IPsec runs instead of WireGuard under `settings`.
    pub fn selected(&self, settings: Option<&Settings>) -> bool {
        self.choice.driver(settings) == VpnDriver::Ipsec
    }

    /// The public key to report.
    pub fn public_base64(&self) -> &str {
        &self.public
    }

    /// One pass: the spec, the `lo` addresses it needs (only when `write`),
    /// the VICI difference, and the health rows of the SAs. Warnings and
    /// per-connection failures come back as errors of the pass.
    pub async fn reconcile(
        &self,
        inputs: &NodeInputs,
        peers: &[PeerInfo],
        write: bool,
    ) -> Result<Pass, IpsecError> {
        let plan = spec(inputs, peers);
        for w in &plan.warnings {
            tracing::warn!(warning = %w, "ipsec");
        }
        if write {
            sync_lo_addresses(&plan.lo_addresses).await?;
            self.sync_mtu(inputs).await?;
        }
        let mut client = Client::connect(&self.vici).await?;
        let applied = if write {
            self.ipsec.lock().await.apply(&mut client, &plan).await?
        } else {
            Default::default()
        };
        if applied.changed() {
            tracing::info!(?applied, "ipsec connections updated");
        }
        let sas = list_sas(&mut client).await?;
        Ok(Pass {
            rows: rows(&plan, &sas),
            tunnels: plan.conns.len() as u32,
            errors: applied.errors,
        })
    }
}

impl IpsecAgent {
    /// Gives the libipsec device the MTU of [`device_mtu`] when it differs
    /// (one read per pass, a write only on a change); no device (kernel
    /// datapath, or charon not up yet) is nothing to do.
    async fn sync_mtu(&self, inputs: &NodeInputs) -> Result<(), IpsecError> {
        let local = inputs.me.as_ref().and_then(|m| m.private_ip);
        let want = device_mtu(inputs.underlay_mtu, local);
        let err = |e: crate::dataplane::DataplaneError| IpsecError::Netlink(e.to_string());
        match crate::dataplane::netlink::link_mtu(&self.dev)
            .await
            .map_err(err)?
        {
            Some(have) if have != want => {
                crate::dataplane::netlink::set_link_up(&self.dev, want)
                    .await
                    .map_err(err)?;
                tracing::info!(dev = %self.dev, from = have, to = want, "ipsec device MTU set");
            }
            _ => {}
        }
        Ok(())
    }
}

/// The largest MTU kernel-libipsec's TUN device can carry: strongSwan
/// 5.9.8 creates it with 1400 and reads packets into a buffer of that size,
/// so a larger device MTU loses bigger packets silently (measured in the
/// lab: with 1420, packets of 1401–1420 bytes vanished). The agent only ever
/// lowers it.
pub const LIBIPSEC_MAX_MTU: u32 = 1400;

/// MTU of the libipsec device over an underlay of `underlay` bytes from
/// `local`: the underlay's minus ESP in UDP over that family (IPv4 68, IPv6
/// 88), never above the WireGuard tunnel's (underlay − 80) that the routes
/// of the domain's members are sized for, nor above [`LIBIPSEC_MAX_MTU`].
/// A member's packets bigger than the device learn its MTU by path MTU
/// discovery from the gateway. Pure.
pub fn device_mtu(underlay: u32, local: Option<IpAddr>) -> u32 {
    let esp = super::spec::inner_mtu(underlay);
    let esp = match local {
        Some(IpAddr::V6(_)) => esp.saturating_sub(super::spec::ESP_UDP_V6_EXTRA),
        _ => esp,
    };
    esp.min(crate::dataplane::model::tunnel_mtu(underlay))
        .min(LIBIPSEC_MAX_MTU)
}

/// What one IPsec pass found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pass {
    pub rows: Vec<v1::PeerTunnelState>,
    pub tunnels: u32,
    pub errors: Vec<String>,
}

/// Report rows: one per wanted connection, from its newest IKE_SA, and one
/// per NATed gateway reached through a relay (`relayed`, with the relay's
/// SA: its traffic shares the relay's CHILD_SA), as the WireGuard rows are.
/// Pure.
pub fn rows(plan: &IpsecSpec, sas: &[SaHealth]) -> Vec<v1::PeerTunnelState> {
    let mut out = Vec::new();
    for c in plan.conns.values() {
        let sa = sas
            .iter()
            .filter(|s| s.conn == c.name)
            .max_by_key(|s| (s.ike_state == "ESTABLISHED", s.ike_id));
        if (c.standby || c.direct) && sa.is_none() {
            continue;
        }
        let child = sa.and_then(|s| s.children.iter().max_by_key(|ch| ch.id));
        let row = v1::PeerTunnelState {
            peer_node: c.peer_node.to_string(),
            // Seconds since the CHILD_SA was installed: since the last
            // rekey (or the first exchange).
            handshake_age_seconds: child.and_then(|ch| ch.install_secs),
            rx_bytes: child.map_or(0, |ch| ch.bytes_in),
            tx_bytes: child.map_or(0, |ch| ch.bytes_out),
            endpoint: sa
                .and_then(|s| s.remote)
                .map(|e| e.to_string())
                .unwrap_or_default(),
            relayed: false,
            direct_device: false,
            ipsec_state: sa.map(SaHealth::state_label).unwrap_or_default(),
        };
        // On the NATed side (it dials the relay's address) `relays_for`
        // are the gateways behind the relay; on the relay, those whose
        // traffic it carries for the peer (no path of its own).
        if c.remote_addr.is_some() {
            out.extend(c.relays_for.iter().map(|n| v1::PeerTunnelState {
                peer_node: n.to_string(),
                relayed: true,
                rx_bytes: 0,
                tx_bytes: 0,
                ..row.clone()
            }));
        }
        out.push(row);
    }
    // A NATed gateway is reached through the relay's active node or, once
    // that is gone, one of its standby candidates, or directly: one row,
    // an established one, direct before relayed.
    let rank = |r: &v1::PeerTunnelState| (r.ipsec_state.starts_with("ESTABLISHED"), !r.relayed);
    out.sort_by(|a, b| a.peer_node.cmp(&b.peer_node).then(rank(b).cmp(&rank(a))));
    out.dedup_by(|a, b| a.peer_node == b.peer_node);
    out
}

/// Makes the `lo:raven` IPv4 host addresses exactly `want` (IPv6 addresses
/// have no labels and are skipped). Addresses without the label are never
/// touched.
pub async fn sync_lo_addresses(want: &BTreeSet<IpAddr>) -> Result<(), IpsecError> {
    use netlink_packet_route::address::AddressAttribute;
    let nl = |op: &str| {
        let op = op.to_owned();
        move |e: rtnetlink::Error| IpsecError::Netlink(format!("{op}: {e}"))
    };
    let handle =
        crate::dataplane::netlink::connect().map_err(|e| IpsecError::Netlink(e.to_string()))?;
    const LO: u32 = 1;
    let mut have = BTreeSet::new();
    let mut stale = Vec::new();
    let mut dump = handle.address().get().set_link_index_filter(LO).execute();
    while let Some(m) = dump.try_next().await.map_err(nl("dumping lo addresses"))? {
        let labelled = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Label(l) if l == LO_LABEL));
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let (true, Some(ip)) = (labelled, addr) {
            if want.contains(&ip) {
                have.insert(ip);
            } else {
                stale.push(m);
            }
        }
    }
    for m in stale {
        handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(nl("removing a lo:raven address"))?;
    }
    for ip in want.iter().filter(|ip| ip.is_ipv4() && !have.contains(ip)) {
        let mut req = handle.address().add(LO, *ip, 32);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Label(LO_LABEL.to_owned()));
        match req.execute().await {
            Ok(()) => {}
            // Already there without our label: someone else's; leave it.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => {}
            Err(e) => return Err(nl(&format!("adding {ip}/32 to lo"))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_raven_cfg_and_forced_choices_win() {
        let ipsec = Settings {
            vxlan_port: 4472,
            vpn_driver: VpnDriver::Ipsec,
            ..raven_model::fixtures::settings()
        };
        assert_eq!(VpnChoice::Auto.driver(None), VpnDriver::Wireguard);
        assert_eq!(VpnChoice::Auto.driver(Some(&ipsec)), VpnDriver::Ipsec);
        assert_eq!(
            VpnChoice::Wireguard.driver(Some(&ipsec)),
            VpnDriver::Wireguard
        );
        assert_eq!(VpnChoice::Ipsec.driver(None), VpnDriver::Ipsec);
    }

    #[test]
    fn the_ipsec_device_mtu_follows_the_underlay_minus_esp_in_udp() {
        let v4: Option<IpAddr> = "192.0.2.1".parse().ok();
        let v6: Option<IpAddr> = "2001:db8::1".parse().ok();
        // A 1400-byte underlay: 1400 − 68 = 1332, capped at the tunnel MTU
        // the members' routes use (1400 − 80), not libipsec's 1400.
        assert_eq!(device_mtu(1400, v4), 1320);
        // IPv6: 1400 − 88.
        assert_eq!(device_mtu(1400, v6), 1312);
        // libipsec carries no more than 1400, whatever the underlay.
        assert_eq!(device_mtu(1500, v4), 1400);
        assert_eq!(device_mtu(9000, v6), 1400);
        assert_eq!(device_mtu(10, None), 0);
    }

    #[test]
    fn wireguard_choice_makes_no_ipsec_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let args = |vpn| IpsecArgs {
            vpn,
            vici: DEFAULT_VICI.into(),
            dev: DEFAULT_IPSEC_DEV.into(),
        };
        let none = IpsecAgent::start(&args(VpnChoice::Wireguard), dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(none.is_none());
        assert!(!dir.path().join(KEY_FILE).exists());
        let some =
            IpsecAgent::start(&args(VpnChoice::Auto), dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            some.is_some_and(|s| !s.selected(None)),
            "auto without raven-cfg: WireGuard"
        );
        assert!(dir.path().join(KEY_FILE).exists());
    }
}
