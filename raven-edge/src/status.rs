//! `raven-edge status`: this node as the running agent sees it — its role,
//! its gateway and the failover in effect, hub contact, the cached revision,
//! the dataplane, and a peer table like `wg show` / `tailscale status` (peer,
//! domain, path, endpoint, handshake age, bytes).
//!
//! The agent serves the document on its HTTP endpoint (`GET /status`, JSON;
//! [`crate::http`]); the command reads it from there, so it needs no root and
//! works while the agent holds the cache open. Tables by default, `-o wide`,
//! `-o json`, `-o yaml` (the document as served).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raven_cli::output::{Format, Table, age, bytes};
use raven_model::ResourceBody;
use raven_model::topology::EndpointType;
use serde::{Deserialize, Serialize};

use crate::agent::Health;
use crate::cache::CachedState;

/// The status document (`GET /status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    /// `gateway` (its gateway's active tunnel endpoint), `standby` (a tunnel
    /// candidate not carrying the tunnel), `member` (reaches other domains
    /// through its gateway) or `none` (in no gateway's domain, or no view yet).
    pub role: String,
    pub gateway: Option<String>,
    /// Its gateway's endpoints are under NAT.
    #[serde(rename = "underNAT")]
    pub under_nat: bool,
    /// Members of its gateway's domain (nodes with an InternalIP).
    pub domain_members: usize,
    /// Proxy endpoint of its gateway.
    pub proxy: bool,
    /// Which node carries its gateway's tunnel: as the hub elected it, and
    /// as this agent sends (they differ under local failover).
    pub failover: Failover,
    pub hub: HubContact,
    pub cache: CacheInfo,
    pub dataplane: Dataplane,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    pub elected: Option<String>,
    pub in_use: Option<String>,
    /// Gateways this node sends to another node than the hub elected:
    /// gateway → node.
    pub local: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubContact {
    /// A hub stream is open.
    pub connected: bool,
    /// Seconds since the last message from a hub; unset when never.
    pub last_contact_seconds: Option<u64>,
    /// This node's clock minus the hub's (milliseconds), from the hub's last
    /// heartbeat; unset until one arrived.
    pub clock_offset_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheInfo {
    pub epoch: String,
    pub revision: u64,
    pub complete: bool,
    pub resources: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dataplane {
    /// The revision the kernel was last reconciled from.
    pub revision: u64,
    pub ok: bool,
    pub last_error: Option<String>,
    /// Why the agent holds the kernel state as found, when it does.
    pub holding: Option<String>,
    pub reconciles: u64,
    pub kernel_changes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub peer: String,
    /// The peer's gateway (its network domain).
    pub gateway: Option<String>,
    /// `direct` or `relayed`.
    pub path: String,
    pub endpoint: Option<String>,
    pub handshake_seconds: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// IPsec: the IKE_SA's state (`ESTABLISHED`, `CONNECTING`, ..., or
    /// `NONE` while there is none); absent on WireGuard peers. There,
    /// `handshake_seconds` is the age of the CHILD_SA (since its last rekey).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<String>,
}

/// Builds the document from what the agent holds now.
pub fn build(node: &str, health: &Health, state: &CachedState) -> Status {
    let mut gateway_of = BTreeMap::new();
    let mut own = None;
    let mut elected_of = BTreeMap::new();
    let mut domains = BTreeMap::new();
    for r in state.resources.values() {
        match &r.body {
            ResourceBody::Node(n) if n.name.as_str() == node => own = Some(n.clone()),
            ResourceBody::Gateway(g) => {
                for e in g.tunnel_candidates.iter().chain(&g.active_tunnel) {
                    if e.type_ == EndpointType::Tunnel {
                        gateway_of.insert(e.node.to_string(), g.name.to_string());
                    }
                }
                if let Some(a) = &g.active_tunnel {
                    elected_of.insert(g.name.to_string(), a.node.to_string());
                }
                domains.insert(g.name.to_string(), (g.under_nat, g.members.len()));
            }
            ResourceBody::Peer(p) => {
                gateway_of.insert(p.node.to_string(), p.gateway.to_string());
            }
            _ => {}
        }
    }
    let local: BTreeMap<String, String> = health
        .local_failover
        .lock()
        .map(|f| {
            f.iter()
                .map(|(g, n)| (g.to_string(), n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let gateway = own
        .as_ref()
        .and_then(|n| n.gateway.as_ref())
        .map(|g| g.to_string());
    let elected = gateway.as_ref().and_then(|g| elected_of.get(g).cloned());
    let in_use = gateway
        .as_ref()
        .and_then(|g| local.get(g).cloned())
        .or_else(|| elected.clone());
    let role = match &own {
        None => "none",
        Some(n) if n.gateway.is_none() => "none",
        Some(_) if in_use.as_deref() == Some(node) => "gateway",
        Some(n) if n.tunnel_candidate => "standby",
        Some(_) => "member",
    };
    let contact = health.last_contact_ms.load(Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut peers: Vec<Peer> = health
        .peers
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default()
        .into_iter()
        // A relay's rows about direct-path devices carry no traffic here.
        .filter(|p| !p.direct_device)
        .map(|p| Peer {
            gateway: gateway_of.get(&p.peer_node).cloned(),
            path: if p.relayed { "relayed" } else { "direct" }.to_owned(),
            endpoint: (!p.endpoint.is_empty()).then_some(p.endpoint),
            handshake_seconds: p.handshake_age_seconds,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            ipsec: (!p.ipsec_state.is_empty()).then_some(p.ipsec_state),
            peer: p.peer_node,
        })
        .collect();
    peers.sort_by(|a, b| a.peer.cmp(&b.peer));
    Status {
        node: node.to_owned(),
        role: role.to_owned(),
        proxy: own.as_ref().is_some_and(|n| n.proxy_active),
        under_nat: gateway
            .as_ref()
            .and_then(|g| domains.get(g))
            .is_some_and(|d| d.0),
        domain_members: gateway
            .as_ref()
            .and_then(|g| domains.get(g))
            .map_or(0, |d| d.1),
        gateway,
        failover: Failover {
            elected,
            in_use,
            local,
        },
        hub: HubContact {
            connected: health.hub_session.load(Ordering::Relaxed),
            last_contact_seconds: (contact != 0).then(|| now_ms.saturating_sub(contact) / 1000),
            clock_offset_ms: health.hub_clock_offset_ms.lock().ok().and_then(|o| *o),
        },
        cache: CacheInfo {
            epoch: state.epoch.clone(),
            revision: state.revision,
            complete: state.complete,
            resources: state.resources.len(),
        },
        dataplane: Dataplane {
            revision: health.revision.load(Ordering::Relaxed),
            ok: health.dataplane_ok.load(Ordering::Relaxed),
            last_error: health.last_error.lock().ok().and_then(|e| e.clone()),
            holding: health.holding.lock().ok().and_then(|h| h.clone()),
            reconciles: health.reconciles.load(Ordering::Relaxed),
            kernel_changes: health.ops_applied.load(Ordering::Relaxed),
        },
        peers,
    }
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

/// The document as `format` prints it.
pub fn render(s: &Status, format: Format) -> String {
    match format {
        Format::Json => {
            let mut out = serde_json::to_string_pretty(s).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Yaml => raven_cli::output::to_yaml(&serde_json::to_value(s).unwrap_or_default()),
        Format::Table | Format::Wide => table(s, format == Format::Wide),
    }
}

fn table(s: &Status, wide: bool) -> String {
    let mut out = String::new();
    let role = match (s.role.as_str(), s.proxy) {
        (r, true) => format!("{r}, proxy"),
        (r, false) => r.to_owned(),
    };
    out.push_str(&format!("Node:       {}\n", s.node));
    out.push_str(&format!("Role:       {role}\n"));
    out.push_str(&format!(
        "Gateway:    {}\n",
        s.gateway.as_deref().unwrap_or("none")
    ));
    let tunnel = match (&s.failover.elected, &s.failover.in_use) {
        (None, None) => "none elected".to_owned(),
        (e, u) if e == u => format!("{} (elected by the hub)", opt(e)),
        (e, u) => format!(
            "{} (local failover; the hub elected {})",
            opt(u),
            e.as_deref().unwrap_or("none")
        ),
    };
    out.push_str(&format!("Tunnel:     {tunnel}\n"));
    let hub = match (s.hub.connected, s.hub.last_contact_seconds) {
        (true, Some(a)) => format!("connected, last message {} ago", age(a)),
        (true, None) => "connected".to_owned(),
        (false, Some(a)) => format!(
            "not connected, last message {} ago (the dataplane keeps running from the cache)",
            age(a)
        ),
        (false, None) => "never reached".to_owned(),
    };
    out.push_str(&format!("Hub:        {hub}\n"));
    let cache = if s.cache.epoch.is_empty() {
        "empty (no topology from a hub yet)".to_owned()
    } else {
        format!(
            "revision {} (epoch {}), {} resources{}",
            s.cache.revision,
            s.cache.epoch,
            s.cache.resources,
            if s.cache.complete { "" } else { ", incomplete" }
        )
    };
    out.push_str(&format!("Cache:      {cache}\n"));
    let dp = match (
        &s.dataplane.holding,
        s.dataplane.ok,
        &s.dataplane.last_error,
    ) {
        (Some(why), _, _) => format!("holding the kernel state as found: {why}"),
        (None, true, _) => format!("reconciled at revision {}", s.dataplane.revision),
        (None, false, e) => format!("not reconciled: {}", e.as_deref().unwrap_or("not yet")),
    };
    out.push_str(&format!("Dataplane:  {dp}\n"));
    if wide {
        out.push_str(&format!(
            "            {} reconciles, {} kernel changes\n",
            s.dataplane.reconciles, s.dataplane.kernel_changes
        ));
        for (g, n) in &s.failover.local {
            out.push_str(&format!("Failover:   {g} → {n}\n"));
        }
    }
    out.push('\n');
    if s.peers.is_empty() {
        out.push_str("No tunnel peers (only gateways carrying a tunnel have them).\n");
        return out;
    }
    let mut header = vec![
        "peer",
        "gateway",
        "path",
        "endpoint",
        "handshake",
        "rx",
        "tx",
    ];
    let ipsec = s.peers.iter().any(|p| p.ipsec.is_some());
    if ipsec {
        header.push("ipsec");
    }
    if wide {
        header.extend(["rx bytes", "tx bytes"]);
    }
    let mut t = Table::new(&header);
    for p in &s.peers {
        let mut row = vec![
            p.peer.clone(),
            opt(&p.gateway),
            p.path.clone(),
            opt(&p.endpoint),
            p.handshake_seconds
                .map_or_else(|| "never".to_owned(), |a| format!("{} ago", age(a))),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        ];
        if ipsec {
            row.push(opt(&p.ipsec));
        }
        if wide {
            row.push(p.rx_bytes.to_string());
            row.push(p.tx_bytes.to_string());
        }
        t.row(row);
    }
    out.push_str(&t.render());
    out
}

/// Reads the document from the agent's HTTP endpoint at `addr`.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Status> {
    let not_running = |e: std::io::Error| {
        anyhow::anyhow!(
            "no agent answers on {addr} ({e}): is `raven-edge run` running, with this --http-addr? (`raven-edge show` reads the cache without the agent)"
        )
    };
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(not_running)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    write!(
        conn,
        "GET /status HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr} answered with no HTTP response"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        anyhow::bail!(
            "{addr} answered {status_line:?} to GET /status: an agent older than this command, or not raven-edge"
        );
    }
    serde_json::from_str(body)
        .map_err(|e| anyhow::anyhow!("{addr}: GET /status is not a status document: {e}"))
}
