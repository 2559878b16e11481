//! Applying a [`IpsecSpec`] to charon over VICI, touching nothing raven did not
//! create, and reading back the SAs' health.
//!
//! Each pass lists charon's connections and SAs and sends only the
//! difference: a connection that is missing or differs from what this
//! process last loaded is (re)loaded — re-sending `load-conn` for a live
//! connection keeps its SAs, so the first pass after an agent restart
//! re-sends every wanted connection and drops nothing — a `raven-`
//! connection that is no longer wanted is unloaded and its SAs terminated,
//! and an initiator connection without an IKE_SA is initiated (in the
//! background: the next pass sees how it went). Connections, SAs and keys
//! without the `raven-` prefix are never read into a decision, let alone
//! changed.
//!
//! When a key changes on either side (rotation), the connection is
//! reloaded with the new keys and a fresh IKE_SA is made with them (a
//! `rekey` with `reauth` would reuse the old connection's identities and
//! keys); once it is established, the IKE_SAs still carrying the old
//! identities are terminated — make before break, by unique ID, on both
//! sides. The IKE identity of a node includes a fingerprint of its key (see
//! [`ike_id`]), so "old" is visible in `list-sas`.

use std::collections::{BTreeMap, BTreeSet};

use super::keys::{IdentityKey, decode_public, public_pem};
use super::spec::{CONN_PREFIX, ConnSpec, DPD_DELAY_SECS, ESP_PROPOSAL, IKE_PROPOSAL, IpsecSpec};
use super::vici::{Client, Message, ViciError};

/// Seconds between CHILD_SA rekeys (new ESP keys, new X25519 exchange).
pub const CHILD_REKEY_SECS: u32 = 3600;
/// Seconds between IKE_SA rekeys.
pub const IKE_REKEY_SECS: u32 = 4 * 3600;
/// Seconds between IKE_SA reauthentications (each side proves its key
/// again, so a peer's key change takes effect even when no one asks).
pub const IKE_REAUTH_SECS: u32 = 24 * 3600;

/// The IKE identity of `node` holding `key`: the node name and a
/// fingerprint of the key (its first 8 bytes, hex), e.g. `b-1.3fa9c0d2e1b2a3f4`.
/// The key itself authenticates (it is pinned); the fingerprint gives every
/// key an identity of its own, because charon keeps the raw keys of a
/// replaced connection under their identity and would try a rotated-out key
/// under the same name first (and refuse the new one:
/// `constraint check failed: peer not authenticated with peer cert`).
pub fn ike_id(node: &str, key: &[u8; 32]) -> String {
    format!("{node}.{}", hex::encode(&key[..8]))
}

/// The `load-conn` request for `spec`, with this node's public key. Pure.
pub fn conn_message(spec: &ConnSpec, local_public: &[u8; 32]) -> Result<Message, String> {
    let remote_key = decode_public(&spec.remote_key).ok_or_else(|| {
        format!(
            "connection {}: the IPsec key of {} is not a base64 Ed25519 key",
            spec.name, spec.peer_node
        )
    })?;
    let ts = |set: &BTreeSet<ipnet::IpNet>| set.iter().map(ToString::to_string).collect::<Vec<_>>();
    let restart = spec.initiator && !spec.standby && !spec.direct;
    let addr = |a: Option<std::net::IpAddr>| a.map_or_else(|| "%any".to_owned(), |a| a.to_string());
    let child = Message::new()
        .list("local_ts", ts(&spec.local_ts))
        .list("remote_ts", ts(&spec.remote_ts))
        .list("esp_proposals", [ESP_PROPOSAL])
        .kv("mode", "tunnel")
        .kv("rekey_time", format!("{CHILD_REKEY_SECS}s"))
        .kv("start_action", "none")
        // charon restarts what this side must keep up; a standby is
        // (re)dialled by the agent only while its gateway's active node has
        // no IKE_SA, and a direct path by the agent on both sides (see
        // below), so charon must not redial them on its own.
        .kv("dpd_action", if restart { "restart" } else { "clear" })
        .kv("close_action", if restart { "restart" } else { "none" });
    let body = Message::new()
        .kv("version", "2")
        .list("local_addrs", [addr(spec.local_addr)])
        .list("remote_addrs", [addr(spec.remote_addr)])
        .kv("local_port", spec.local_port.to_string())
        .kv("remote_port", spec.remote_port.to_string())
        .kv("encap", "yes")
        .kv("mobike", "no")
        .list("proposals", [IKE_PROPOSAL])
        .kv("dpd_delay", format!("{DPD_DELAY_SECS}s"))
        .kv("rekey_time", format!("{IKE_REKEY_SECS}s"))
        .kv("reauth_time", format!("{IKE_REAUTH_SECS}s"))
        .kv("keyingtries", "0")
        // Both ends of a direct path dial: two IKE_SAs, one of which the
        // agent with the larger node name closes (`replace` would have each
        // side drop the other's, leaving none).
        .kv("unique", if spec.direct { "never" } else { "replace" })
        .section(
            "local",
            Message::new()
                .kv("auth", "pubkey")
                .kv("id", ike_id(&spec.local_id, local_public))
                .list("pubkeys", [public_pem(local_public)]),
        )
        .section(
            "remote",
            Message::new()
                .kv("auth", "pubkey")
                .kv("id", ike_id(&spec.remote_id, &remote_key))
                .list("pubkeys", [public_pem(&remote_key)]),
        )
        .section("children", Message::new().section(&spec.name, child));
    Ok(Message::new().section(&spec.name, body))
}

/// One IKE_SA of a raven connection as charon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaHealth {
    /// Connection name (`raven-<peer>`).
    pub conn: String,
    pub ike_id: u64,
    pub ike_state: String,
    /// The identities it was made with (see [`ike_id`]).
    pub local_id: String,
    pub remote_id: String,
    /// Seconds since the IKE_SA was established.
    pub established_secs: Option<u64>,
    pub remote: Option<std::net::SocketAddr>,
    pub initiator: bool,
    pub children: Vec<ChildHealth>,
}

/// One CHILD_SA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildHealth {
    pub name: String,
    pub id: u64,
    pub state: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Seconds since it was installed: since the last rekey.
    pub install_secs: Option<u64>,
    /// Seconds until its next rekey.
    pub rekey_in_secs: Option<u64>,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

impl SaHealth {
    /// An IKE_SA of `conn` in `state` without CHILD_SAs (tests).
    #[cfg(test)]
    pub fn bare(conn: &str, ike_id: u64, state: &str, initiator: bool) -> Self {
        Self {
            conn: conn.into(),
            ike_id,
            ike_state: state.into(),
            local_id: String::new(),
            remote_id: String::new(),
            established_secs: None,
            remote: None,
            initiator,
            children: Vec::new(),
        }
    }

    fn from_vici(conn: &str, m: &Message) -> Self {
        let remote = m
            .str("remote-host")
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .zip(m.str("remote-port").and_then(|p| p.parse::<u16>().ok()))
            .map(|(ip, port)| std::net::SocketAddr::new(ip, port));
        let children = m
            .sec("child-sas")
            .map(|c| {
                c.sections()
                    .map(|(_, c)| ChildHealth {
                        name: c.str("name").unwrap_or_default(),
                        id: c.u64("uniqueid").unwrap_or(0),
                        state: c.str("state").unwrap_or_default(),
                        bytes_in: c.u64("bytes-in").unwrap_or(0),
                        bytes_out: c.u64("bytes-out").unwrap_or(0),
                        packets_in: c.u64("packets-in").unwrap_or(0),
                        packets_out: c.u64("packets-out").unwrap_or(0),
                        install_secs: c.u64("install-time"),
                        rekey_in_secs: c.u64("rekey-time"),
                        local_ts: c.strs("local-ts"),
                        remote_ts: c.strs("remote-ts"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            conn: conn.to_owned(),
            ike_id: m.u64("uniqueid").unwrap_or(0),
            ike_state: m.str("state").unwrap_or_default(),
            local_id: m.str("local-id").unwrap_or_default(),
            remote_id: m.str("remote-id").unwrap_or_default(),
            established_secs: m.u64("established"),
            remote,
            initiator: m.str("initiator").as_deref() == Some("yes"),
            children,
        }
    }

    /// The state as a Report row shows it: IKE state, then the first
    /// CHILD_SA's after a slash.
    pub fn state_label(&self) -> String {
        match self.children.first() {
            Some(c) => format!("{}/{}", self.ike_state, c.state),
            None => self.ike_state.clone(),
        }
    }
}

/// What one pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpsecApplied {
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
    pub initiated: Vec<String>,
    /// IKE_SAs (`conn[unique id]`) with old identities, terminated once a
    /// fresh one was up.
    pub replaced: Vec<String>,
    pub key_loaded: bool,
    /// Connections that could not be applied, with why; the others were.
    pub errors: Vec<String>,
}

impl IpsecApplied {
    pub fn changed(&self) -> bool {
        self.key_loaded
            || !(self.loaded.is_empty()
                && self.unloaded.is_empty()
                && self.initiated.is_empty()
                && self.replaced.is_empty())
    }
}

/// The agent's side of charon: what this process loaded (to send only what
/// changed). Dropping it loses nothing in charon; a new one re-sends what
/// is wanted once and keeps every SA.
#[derive(Debug)]
pub struct Ipsec {
    key: IdentityKey,
    key_loaded: bool,
    /// Connection → what was loaded: its spec and this node's public key.
    loaded: BTreeMap<String, (ConnSpec, [u8; 32])>,
}

/// Whether an IKE_SA of a non-standby connection to `conn`'s peer gateway
/// is established: while it is, a standby candidate of that gateway is not
/// dialled (its domain still runs on the active node; a candidate that
/// briefly believes otherwise must not pull the traffic). Pure.
pub fn active_established(plan: &IpsecSpec, sas: &[SaHealth], conn: &ConnSpec) -> bool {
    plan.conns
        .values()
        .filter(|c| c.peer_gateway == conn.peer_gateway && !c.standby)
        .any(|c| {
            sas.iter()
                .any(|s| s.conn == c.name && s.ike_state == "ESTABLISHED")
        })
}

/// Of the IKE_SAs `fresh` of a direct connection, those to close: both ends
/// dial, and once an IKE_SA the peer initiated is established, the end with
/// the larger node name closes the ones it initiated, so one IKE_SA (and
/// one CHILD_SA) per gateway pair remains. Empty for every other
/// connection and on the smaller end. Pure.
pub fn duplicate_direct_sas<'a>(spec: &ConnSpec, fresh: &[&'a SaHealth]) -> Vec<&'a SaHealth> {
    let answered = fresh
        .iter()
        .any(|s| !s.initiator && s.ike_state == "ESTABLISHED");
    if !spec.direct || spec.local_id <= spec.remote_id || !answered {
        return Vec::new();
    }
    fresh.iter().copied().filter(|s| s.initiator).collect()
}

/// The raven connections charon has loaded.
pub async fn list_conns(client: &mut Client) -> Result<BTreeSet<String>, ViciError> {
    let events = client
        .stream("list-conns", "list-conn", &Message::new())
        .await?;
    Ok(events
        .iter()
        .flat_map(|e| e.sections().map(|(n, _)| n.to_owned()))
        .filter(|n| n.starts_with(CONN_PREFIX))
        .collect())
}

/// The IKE_SAs of raven connections.
pub async fn list_sas(client: &mut Client) -> Result<Vec<SaHealth>, ViciError> {
    let events = client
        .stream("list-sas", "list-sa", &Message::new())
        .await?;
    Ok(events
        .iter()
        .flat_map(|e| {
            e.sections()
                .filter(|(n, _)| n.starts_with(CONN_PREFIX))
                .map(|(n, m)| SaHealth::from_vici(n, m))
                .collect::<Vec<_>>()
        })
        .collect())
}

impl Ipsec {
    pub fn new(key: IdentityKey) -> Self {
        Self {
            key,
            key_loaded: false,
            loaded: BTreeMap::new(),
        }
    }

    pub fn key(&self) -> &IdentityKey {
        &self.key
    }

    /// Replaces this node's key (rotation): the next pass loads it, loads
    /// every connection again with the new public key and replaces the
    /// IKE_SAs made with the old one.
    pub fn set_key(&mut self, key: IdentityKey) {
        self.key = key;
        self.key_loaded = false;
    }

    /// One pass: brings charon's raven connections to `plan` (the spec). A connection
    /// that fails is reported in `errors`; the rest are applied.
    pub async fn apply(
        &mut self,
        client: &mut Client,
        plan: &IpsecSpec,
    ) -> Result<IpsecApplied, ViciError> {
        let mut out = IpsecApplied::default();
        if !self.key_loaded {
            client
                .call(
                    "load-key",
                    &Message::new()
                        .kv("type", "ed25519")
                        .kv("data", self.key.private_pkcs8_der()),
                )
                .await?;
            self.key_loaded = true;
            out.key_loaded = true;
        }
        let have = list_conns(client).await?;
        let sas = list_sas(client).await?;
        for (name, spec) in &plan.conns {
            let previous = self.loaded.get(name);
            let same = |(p, k): &(ConnSpec, [u8; 32])| p == spec && *k == self.key.public;
            if have.contains(name) && previous.is_some_and(same) {
                continue;
            }
            let msg = match conn_message(spec, &self.key.public) {
                Ok(m) => m,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            match client.call("load-conn", &msg).await {
                Ok(_) => {
                    self.loaded
                        .insert(name.clone(), (spec.clone(), self.key.public));
                    out.loaded.push(name.clone());
                }
                Err(e) => out.errors.push(format!("loading {name}: {e}")),
            }
        }
        for name in have.iter().filter(|n| !plan.conns.contains_key(*n)) {
            match client
                .call("unload-conn", &Message::new().kv("name", name))
                .await
            {
                Ok(_) => {
                    self.loaded.remove(name);
                    out.unloaded.push(name.clone());
                }
                Err(e) => out.errors.push(format!("unloading {name}: {e}")),
            }
            if sas.iter().any(|s| &s.conn == name)
                && let Err(e) = client
                    .call(
                        "terminate",
                        &Message::new().kv("ike", name).kv("timeout", "-1"),
                    )
                    .await
            {
                out.errors.push(format!("terminating {name}: {e}"));
            }
        }
        let gateway_up = |standby: &ConnSpec| active_established(plan, &sas, standby);
        for (name, spec) in &plan.conns {
            if !self.loaded.contains_key(name) {
                continue;
            }
            let Some(remote_key) = decode_public(&spec.remote_key) else {
                continue;
            };
            let want = (
                ike_id(&spec.local_id, &self.key.public),
                ike_id(&spec.remote_id, &remote_key),
            );
            let (fresh, stale): (Vec<&SaHealth>, Vec<&SaHealth>) = sas
                .iter()
                .filter(|s| &s.conn == name)
                .partition(|s| (s.local_id.clone(), s.remote_id.clone()) == want);
            if fresh.iter().any(|s| s.ike_state == "ESTABLISHED") {
                let duplicates = duplicate_direct_sas(spec, &fresh);
                for s in stale.iter().chain(&duplicates) {
                    match client
                        .call(
                            "terminate",
                            &Message::new()
                                .kv("ike-id", s.ike_id.to_string())
                                .kv("timeout", "-1"),
                        )
                        .await
                    {
                        Ok(_) => out.replaced.push(format!("{name}[{}]", s.ike_id)),
                        Err(e) => out
                            .errors
                            .push(format!("terminating {name}[{}]: {e}", s.ike_id)),
                    }
                }
            } else if fresh.is_empty() && spec.initiator && !(spec.standby && gateway_up(spec)) {
                match self.initiate(client, name, -1).await {
                    Ok(()) => out.initiated.push(name.clone()),
                    Err(e) => out.errors.push(format!("initiating {name}: {e}")),
                }
            }
        }
        Ok(out)
    }

    /// Starts connection `name` (IKE_SA and CHILD_SA); waits up to
    /// `timeout_ms` for it (negative: returns at once).
    pub async fn initiate(
        &self,
        client: &mut Client,
        name: &str,
        timeout_ms: i64,
    ) -> Result<(), ViciError> {
        client
            .call(
                "initiate",
                &Message::new()
                    .kv("child", name)
                    .kv("ike", name)
                    .kv("timeout", timeout_ms.to_string())
                    .kv("init-limits", "no"),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::NodeName;

    fn spec(initiator: bool) -> ConnSpec {
        let key = IdentityKey::from_seed([7; 32]);
        ConnSpec {
            name: "raven-b-1".into(),
            peer_node: NodeName::new("b-1").unwrap_or_else(|e| panic!("{e}")),
            peer_gateway: raven_model::GatewayName::new("gw-b").unwrap_or_else(|e| panic!("{e}")),
            local_addr: "192.0.2.1".parse().ok(),
            remote_addr: None,
            local_port: 4500,
            remote_port: 4500,
            local_id: "a-1".into(),
            remote_id: "b-1".into(),
            remote_key: key.public_base64(),
            local_ts: ["10.1.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"))].into(),
            remote_ts: [
                "10.2.0.0/24".parse().unwrap_or_else(|e| panic!("{e}")),
                "10.3.0.0/16".parse().unwrap_or_else(|e| panic!("{e}")),
            ]
            .into(),
            initiator,
            relays_for: Vec::new(),
            standby: false,
            direct: false,
        }
    }

    #[test]
    fn conn_message_is_one_ike_sa_with_one_child_carrying_every_subnet() {
        let m = conn_message(&spec(true), &[1; 32]).unwrap_or_default();
        let conn = m.sec("raven-b-1").cloned().unwrap_or_default();
        assert_eq!(conn.strs("remote_addrs"), ["%any"]);
        assert_eq!(conn.str("encap").as_deref(), Some("yes"));
        assert_eq!(conn.str("local_port").as_deref(), Some("4500"));
        assert_eq!(conn.str("dpd_delay").as_deref(), Some("10s"));
        let remote = conn.sec("remote").cloned().unwrap_or_default();
        assert_eq!(remote.str("auth").as_deref(), Some("pubkey"));
        let key = IdentityKey::from_seed([7; 32]).public;
        assert_eq!(remote.str("id"), Some(ike_id("b-1", &key)));
        assert!(ike_id("b-1", &key).starts_with("b-1."));
        assert_ne!(
            ike_id("b-1", &key),
            ike_id("b-1", &[1; 32]),
            "one identity per key"
        );
        assert!(remote.strs("pubkeys")[0].starts_with("-----BEGIN PUBLIC KEY-----"));
        let children: Vec<_> = conn
            .sec("children")
            .map(|c| {
                c.sections()
                    .map(|(n, m)| (n.to_owned(), m.clone()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(children.len(), 1, "one CHILD_SA per gateway pair");
        assert_eq!(
            children[0].1.strs("remote_ts"),
            ["10.2.0.0/24", "10.3.0.0/16"]
        );
        assert_eq!(children[0].1.str("dpd_action").as_deref(), Some("restart"));
        assert_eq!(children[0].1.str("start_action").as_deref(), Some("none"));
    }

    #[test]
    fn responder_clears_on_dpd_instead_of_restarting() {
        let m = conn_message(&spec(false), &[1; 32]).unwrap_or_default();
        let child = m
            .sec("raven-b-1")
            .and_then(|c| c.sec("children"))
            .and_then(|c| c.sec("raven-b-1"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(child.str("dpd_action").as_deref(), Some("clear"));
        assert_eq!(child.str("close_action").as_deref(), Some("none"));
    }

    #[test]
    fn a_standby_is_redialled_by_the_agent_not_by_charon_and_only_while_its_gateway_is_down() {
        let mut standby = spec(true);
        standby.name = "raven-b-2".into();
        standby.standby = true;
        let child = conn_message(&standby, &[1; 32])
            .unwrap_or_default()
            .sec("raven-b-2")
            .and_then(|c| c.sec("children"))
            .and_then(|c| c.sec("raven-b-2"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(child.str("dpd_action").as_deref(), Some("clear"));
        assert_eq!(child.str("close_action").as_deref(), Some("none"));
        let active = spec(true);
        let plan = IpsecSpec {
            conns: [
                (active.name.clone(), active.clone()),
                (standby.name.clone(), standby.clone()),
            ]
            .into(),
            ..Default::default()
        };
        let sa = |conn: &str, state: &str| SaHealth::bare(conn, 1, state, true);
        assert!(active_established(
            &plan,
            &[sa("raven-b-1", "ESTABLISHED")],
            &standby
        ));
        // Dead peer detection restarted it: connecting again, not up.
        assert!(!active_established(
            &plan,
            &[sa("raven-b-1", "CONNECTING")],
            &standby
        ));
        assert!(!active_established(&plan, &[], &standby));
        // The standby's own SA does not count as the gateway's.
        assert!(!active_established(
            &plan,
            &[sa("raven-b-2", "ESTABLISHED")],
            &standby
        ));
    }

    #[test]
    fn on_a_direct_path_the_larger_node_name_closes_the_ike_sa_it_dialled_once_the_peers_is_up() {
        let sa = |id: u64, initiator: bool, state: &str| {
            SaHealth::bare("raven-b-1", id, state, initiator)
        };
        let (mine, theirs) = (sa(1, true, "ESTABLISHED"), sa(2, false, "ESTABLISHED"));
        let mut larger = spec(true);
        larger.direct = true;
        larger.local_id = "c-1".into();
        let ids = |v: Vec<&SaHealth>| v.iter().map(|s| s.ike_id).collect::<Vec<_>>();
        assert_eq!(ids(duplicate_direct_sas(&larger, &[&mine, &theirs])), [1]);
        // Not before the peer's is up: no path would be left.
        let connecting = sa(2, false, "CONNECTING");
        assert!(duplicate_direct_sas(&larger, &[&mine, &connecting]).is_empty());
        // The smaller end keeps both (the larger closes one); other
        // connections are never touched.
        let mut smaller = larger.clone();
        smaller.local_id = "a-1".into();
        assert!(duplicate_direct_sas(&smaller, &[&mine, &theirs]).is_empty());
        let mut relay = larger.clone();
        relay.direct = false;
        assert!(duplicate_direct_sas(&relay, &[&mine, &theirs]).is_empty());
        // Both ends dial and charon leaves redialling to the agent.
        let m = conn_message(&larger, &[1; 32]).unwrap_or_default();
        let conn = m.sec("raven-b-1").cloned().unwrap_or_default();
        assert_eq!(conn.str("unique").as_deref(), Some("never"));
        let child = conn
            .sec("children")
            .and_then(|c| c.sec("raven-b-1"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(child.str("dpd_action").as_deref(), Some("clear"));
        assert_eq!(child.str("close_action").as_deref(), Some("none"));
    }

    #[test]
    fn malformed_peer_key_is_an_error_naming_the_connection_and_peer() {
        let mut s = spec(true);
        s.remote_key = "short".into();
        let err = conn_message(&s, &[1; 32]).err().unwrap_or_default();
        assert!(err.contains("raven-b-1") && err.contains("b-1"), "{err}");
    }

    #[test]
    fn sa_health_reads_list_sas_fields() {
        let m = Message::new()
            .kv("uniqueid", "7")
            .kv("state", "ESTABLISHED")
            .kv("remote-host", "203.0.113.9")
            .kv("remote-port", "4500")
            .kv("initiator", "yes")
            .kv("established", "12")
            .section(
                "child-sas",
                Message::new().section(
                    "raven-b-1-3",
                    Message::new()
                        .kv("name", "raven-b-1")
                        .kv("uniqueid", "3")
                        .kv("state", "INSTALLED")
                        .kv("bytes-in", "840")
                        .kv("bytes-out", "420")
                        .kv("install-time", "5")
                        .list("remote-ts", ["10.2.0.0/24"]),
                ),
            );
        let h = SaHealth::from_vici("raven-b-1", &m);
        assert_eq!(h.ike_id, 7);
        assert_eq!(h.remote, "203.0.113.9:4500".parse().ok());
        assert_eq!(h.state_label(), "ESTABLISHED/INSTALLED");
        assert_eq!(h.children[0].bytes_in, 840);
        assert_eq!(h.children[0].install_secs, Some(5));
    }
}
