//! `raven-hub status`: every gateway and agent as a hub replica sees them —
//! elected endpoints, members, relays; each agent's connection, what it
//! acknowledged and applied against the published revision, its last NACK;
//! and the problems of the inputs. Built from the inspection RPCs
//! (`GetTopology`, `ListAgents`) over the loopback plaintext listener or, with
//! an operator bundle (`raven-hub certs --operator NAME`), over mTLS.
//!
//! Tables by default, `-o wide` for more columns, `-o json|yaml` for the
//! document.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use raven_cli::output::{Format, Table, age};
use raven_core::topology::EndpointType;
use raven_core::{ResourceBody, Severity};
use raven_proto::v1;
use serde::{Deserialize, Serialize};

/// The document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    pub epoch: String,
    pub revision: u64,
    pub gateways: Vec<GatewayRow>,
    pub agents: Vec<AgentRow>,
    pub problems: Vec<ProblemRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRow {
    pub name: String,
    pub expose_type: String,
    #[serde(rename = "underNAT")]
    pub under_nat: bool,
    /// The elected tunnel endpoint's node.
    pub tunnel: Option<String>,
    /// Its public address (`ip:port`), when it has one.
    pub tunnel_endpoint: Option<String>,
    /// Tunnel candidates in failover order.
    pub candidates: Vec<String>,
    pub proxies: Vec<String>,
    pub members: usize,
    pub ready_members: usize,
    pub relay: Option<String>,
    /// Problems naming this gateway.
    pub problems: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub node: String,
    pub gateway: Option<String>,
    /// `gateway` (active tunnel endpoint), `standby`, `member` or `none`.
    pub role: String,
    /// `ready` (connected, the published revision acknowledged and applied),
    /// `behind`, `apply-failed`, `nacked` or `disconnected`.
    pub state: String,
    pub connected: bool,
    /// `epoch/revision` acknowledged (persisted on the node).
    pub acked: Option<String>,
    /// `epoch/revision` the node reported applied.
    pub applied: Option<String>,
    pub applied_error: Option<String>,
    pub last_nack: Option<NackRow>,
    pub version: String,
    pub remote_address: Option<String>,
    /// RFC 3339.
    pub connected_since: Option<String>,
    /// RFC 3339.
    pub last_seen: Option<String>,
    pub peers: usize,
    pub local_failover: Vec<String>,
    pub dead_candidates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NackRow {
    pub revision: u64,
    pub message: String,
    /// RFC 3339.
    pub at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemRow {
    pub severity: String,
    pub object: String,
    pub field: String,
    pub value: String,
    pub message: String,
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    SystemTime::try_from(*t).ok()
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn version(epoch: &str, revision: u64) -> Option<String> {
    (!epoch.is_empty()).then(|| format!("{epoch}/{revision}"))
}

/// Builds the document from the two inspection answers.
pub fn build(topology: &v1::GetTopologyResponse, agents: &v1::ListAgentsResponse) -> Fleet {
    let mut gateways = Vec::new();
    let mut node_gateway = BTreeMap::new();
    let mut role = BTreeMap::new();
    for r in &topology.resources {
        let Ok((_, resource)) = raven_proto::resource_from_proto(r) else {
            continue;
        };
        match resource.into_body() {
            ResourceBody::Gateway(g) => {
                let tunnel = g.active_tunnel.as_ref();
                for c in &g.tunnel_candidates {
                    role.insert(c.node.to_string(), "standby");
                }
                if let Some(t) = tunnel {
                    role.insert(t.node.to_string(), "gateway");
                }
                for m in &g.members {
                    node_gateway.insert(m.node.to_string(), g.name.to_string());
                }
                let name = g.name.to_string();
                let object = format!("Gateway/{name}");
                gateways.push(GatewayRow {
                    expose_type: serde_json::to_value(g.expose_type)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    under_nat: g.under_nat,
                    tunnel: tunnel.map(|t| t.node.to_string()),
                    tunnel_endpoint: tunnel.and_then(|t| {
                        t.public_ip.map(|ip| {
                            std::net::SocketAddr::new(ip, t.public_port.unwrap_or(t.port))
                                .to_string()
                        })
                    }),
                    candidates: g
                        .tunnel_candidates
                        .iter()
                        .filter(|c| c.type_ == EndpointType::Tunnel)
                        .map(|c| c.node.to_string())
                        .collect(),
                    proxies: g
                        .active_proxies
                        .iter()
                        .map(|p| p.node.to_string())
                        .collect(),
                    members: g.members.len(),
                    ready_members: g.members.iter().filter(|m| m.ready).count(),
                    relay: g.relay.as_ref().map(|r| r.to_string()),
                    problems: topology
                        .problems
                        .iter()
                        .filter(|p| p.object == object)
                        .count(),
                    name,
                });
            }
            ResourceBody::Node(n) => {
                if let Some(g) = &n.gateway {
                    node_gateway.insert(n.name.to_string(), g.to_string());
                }
            }
            _ => {}
        }
    }
    gateways.sort_by(|a, b| a.name.cmp(&b.name));
    let current = (topology.epoch.as_str(), topology.revision);
    let agents = agents
        .agents
        .iter()
        .map(|a| {
            let gateway = node_gateway.get(&a.node_name).cloned();
            let acked_now = (a.acked_epoch.as_str(), a.acked_revision) == current;
            let applied_now = (a.applied_epoch.as_str(), a.applied_revision) == current;
            let nacked_now = a
                .last_nack
                .as_ref()
                .is_some_and(|n| (n.epoch.as_str(), n.revision) == current);
            let state = if !a.connected {
                "disconnected"
            } else if nacked_now {
                "nacked"
            } else if !a.applied_epoch.is_empty() && !a.applied_success {
                "apply-failed"
            } else if acked_now && applied_now {
                "ready"
            } else {
                "behind"
            };
            AgentRow {
                role: match (role.get(&a.node_name), &gateway) {
                    (Some(r), _) => (*r).to_owned(),
                    (None, Some(_)) => "member".to_owned(),
                    (None, None) => "none".to_owned(),
                },
                gateway,
                state: state.to_owned(),
                connected: a.connected,
                acked: version(&a.acked_epoch, a.acked_revision),
                applied: version(&a.applied_epoch, a.applied_revision),
                applied_error: a.applied_error.as_ref().map(|e| e.message.clone()),
                last_nack: a.last_nack.as_ref().map(|n| NackRow {
                    revision: n.revision,
                    message: n
                        .error
                        .as_ref()
                        .map(|e| e.message.clone())
                        .unwrap_or_default(),
                    at: rfc3339(time(&n.at)),
                }),
                version: a.agent_version.clone(),
                remote_address: (!a.remote_address.is_empty()).then(|| a.remote_address.clone()),
                connected_since: rfc3339(time(&a.connected_since)),
                last_seen: rfc3339(time(&a.last_seen)),
                peers: a.peers.iter().filter(|p| !p.direct_device).count(),
                local_failover: a
                    .local_failover
                    .iter()
                    .map(|f| format!("{}→{}", f.gateway, f.active_node))
                    .collect(),
                dead_candidates: a.dead_candidates.clone(),
                node: a.node_name.clone(),
            }
        })
        .collect();
    let problems = topology
        .problems
        .iter()
        .map(|p| ProblemRow {
            severity: if p.severity == v1::Severity::Warning as i32 {
                "warning"
            } else {
                "error"
            }
            .to_owned(),
            object: p.object.clone(),
            field: p.field.clone(),
            value: p.value.clone(),
            message: p.message.clone(),
        })
        .collect();
    Fleet {
        epoch: topology.epoch.clone(),
        revision: topology.revision,
        gateways,
        agents,
        problems,
    }
}

/// The document as `format` prints it; ages in tables are against `now`.
pub fn render(f: &Fleet, format: Format, now: SystemTime) -> String {
    match format {
        Format::Json => {
            let mut out = serde_json::to_string_pretty(f).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Yaml => raven_cli::output::to_yaml(&serde_json::to_value(f).unwrap_or_default()),
        Format::Table | Format::Wide => table(f, format == Format::Wide, now),
    }
}

fn ago(t: &Option<String>, now: SystemTime) -> String {
    t.as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .map(|t| age(now.duration_since(t).unwrap_or_default().as_secs()))
        .unwrap_or_default()
}

/// The NACK of the published revision, else a failed apply, else an older
/// NACK.
fn last_error(r: &AgentRow) -> String {
    let nack = r
        .last_nack
        .as_ref()
        .map(|n| format!("NACK of revision {}: {}", n.revision, n.message));
    match (r.state.as_str(), &r.applied_error) {
        ("nacked", _) => nack.unwrap_or_default(),
        (_, Some(e)) => format!("apply failed: {e}"),
        _ => nack.unwrap_or_default(),
    }
}

fn table(f: &Fleet, wide: bool, now: SystemTime) -> String {
    let mut out = format!("Topology: epoch {} revision {}\n\n", f.epoch, f.revision);
    let list = |v: &[String]| v.join(",");
    let mut header = vec!["gateway", "expose", "nat", "tunnel"];
    if wide {
        header.extend(["endpoint", "candidates"]);
    }
    header.extend(["proxies", "members", "relay", "problems"]);
    let mut g = Table::new(&header);
    for r in &f.gateways {
        let mut row = vec![
            r.name.clone(),
            r.expose_type.clone(),
            if r.under_nat { "yes" } else { "no" }.to_owned(),
            r.tunnel.clone().unwrap_or_else(|| "none".to_owned()),
        ];
        if wide {
            row.push(r.tunnel_endpoint.clone().unwrap_or_default());
            row.push(list(&r.candidates));
        }
        row.push(list(&r.proxies));
        row.push(format!("{}/{}", r.ready_members, r.members));
        row.push(r.relay.clone().unwrap_or_default());
        row.push(r.problems.to_string());
        g.row(row);
    }
    if g.is_empty() {
        out.push_str("No gateways.\n");
    } else {
        out.push_str(&g.render());
    }
    out.push('\n');
    let mut header = vec![
        "node",
        "gateway",
        "role",
        "state",
        "acked",
        "applied",
        "last error",
    ];
    if wide {
        header.extend([
            "version",
            "remote",
            "connected",
            "last seen",
            "peers",
            "failover",
        ]);
    }
    let mut a = Table::new(&header);
    for r in &f.agents {
        let mut row = vec![
            r.node.clone(),
            r.gateway.clone().unwrap_or_default(),
            r.role.clone(),
            r.state.clone(),
            r.acked.clone().unwrap_or_default(),
            r.applied.clone().unwrap_or_default(),
            last_error(r),
        ];
        if wide {
            row.push(r.version.clone());
            row.push(r.remote_address.clone().unwrap_or_default());
            row.push(ago(&r.connected_since, now));
            row.push(ago(&r.last_seen, now));
            row.push(r.peers.to_string());
            row.push(list(&r.local_failover));
        }
        a.row(row);
    }
    if a.is_empty() {
        out.push_str("No agents have connected to this hub replica.\n");
    } else {
        out.push_str(&a.render());
    }
    let errors = f.problems.iter().filter(|p| p.severity == "error").count();
    out.push_str(&format!(
        "\nProblems: {} ({errors} errors, {} warnings)\n",
        f.problems.len(),
        f.problems.len() - errors
    ));
    for p in &f.problems {
        let sev = if p.severity == "error" {
            Severity::Error
        } else {
            Severity::Warning
        };
        let problem = raven_core::Problem {
            severity: sev,
            object: p.object.clone(),
            field: p.field.clone(),
            value: p.value.clone(),
            message: p.message.clone(),
        };
        out.push_str(&format!("  {problem}\n"));
    }
    out
}

/// Where `raven-hub status` asks.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:10271` (the loopback plaintext listener) or
    /// `https://host:10270` (mTLS, with `certs`).
    pub hub: String,
    /// An operator bundle (`ca.pem`, `operator.pem`, `operator-key.pem`).
    pub certs: Option<PathBuf>,
    /// Name the hub certificate must carry (default: the address's host).
    pub server_name: Option<String>,
}

fn read(dir: &Path, file: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

/// Asks the hub for its topology and agent table.
pub async fn fetch(target: &Target) -> anyhow::Result<Fleet> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut endpoint = Endpoint::from_shared(target.hub.clone())
        .map_err(|e| anyhow::anyhow!("--hub {}: {e}", target.hub))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(dir) = &target.certs {
        let host = target.server_name.clone().or_else(|| {
            endpoint
                .uri()
                .host()
                .map(|h| h.trim_matches(['[', ']']).to_owned())
        });
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(dir, "ca.pem")?))
            .identity(Identity::from_pem(
                read(dir, "operator.pem")?,
                read(dir, "operator-key.pem")?,
            ));
        if let Some(h) = host {
            tls = tls.domain_name(h);
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS with {}: {e}", dir.display()))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the hub at {}: {e} (is `raven-hub serve` running? off its host use --hub https://HOST:10270 --certs OPERATOR-BUNDLE)",
            target.hub
        )
    })?;
    let mut client = v1::inspect_service_client::InspectServiceClient::new(channel)
        .max_decoding_message_size(256 << 20);
    let status = |what: &str| {
        let what = what.to_owned();
        move |s: tonic::Status| anyhow::anyhow!("{what}: {}: {}", s.code(), s.message())
    };
    let topology = client
        .get_topology(v1::GetTopologyRequest::default())
        .await
        .map_err(status("GetTopology"))?
        .into_inner();
    let agents = client
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .map_err(status("ListAgents"))?
        .into_inner();
    Ok(build(&topology, &agents))
}
