//! Command line of `raven-edge`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use raven_model::NodeName;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentConfig};
use crate::cache;
use crate::client::{ClientConfig, ClientTls};
use crate::dataplane;

/// raven's node agent.
#[derive(Debug, Parser)]
#[command(name = "raven-edge", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// This node's name (as the Kubernetes Node and its certificate name it).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Where the agent keeps its cache.
    #[arg(long, env = "RAVEN_DATA_DIR", default_value = "/var/lib/raven")]
    pub data_dir: PathBuf,
}

/// Local gateway failover: agents probe their gateway's tunnel candidates
/// and move to the next live one on their own, without the hub.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Period of the ICMP probes of the tunnel candidates of this node's
    /// gateway.
    #[arg(long, env = "RAVEN_PROBE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Missed probes in a row that make a candidate dead.
    #[arg(long, env = "RAVEN_PROBE_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub probe_failures: u32,
}

/// How the agent redials the hub (exponential backoff with full jitter).
#[derive(Debug, clap::Args)]
pub struct ReconnectArgs {
    /// First reconnect delay cap: the first redial waits a random time up
    /// to this.
    #[arg(long, env = "RAVEN_RECONNECT_MIN", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub reconnect_min: Duration,
    /// Highest reconnect delay cap, however long the hub has been away: an
    /// agent is back at most about this long after a hub serves again. Kept
    /// low on purpose; a hub spreads a reconnect storm by admission control
    /// (RESOURCE_EXHAUSTED with a retry hint, which the agent follows
    /// instead of its backoff), not by long sleeps.
    #[arg(long, env = "RAVEN_RECONNECT_MAX", default_value = "2s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,
}

/// How the agent and the hub prove who they are, beyond the `--certs`
/// bundle: the name the hub's certificate carries, and a client
/// certificate or hub CA in place of the bundle's.
#[derive(Debug, clap::Args)]
pub struct IdentityArgs {
    /// Name the hub certificate must carry (default: the address's host).
    #[arg(long, env = "RAVEN_HUB_SERVER_NAME")]
    pub hub_server_name: Option<String>,
    /// The node's client certificate instead of the bundle's `node.pem`:
    /// e.g. the kubelet's own (CN `system:node:<node>`),
    /// /var/lib/kubelet/pki/kubelet-client-current.pem, certificate and
    /// key in one PEM file, which the kubelet rotates. Read again at
    /// every connection, so a rotated certificate is used from the next.
    #[arg(long, env = "RAVEN_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (default: the --client-cert file itself,
    /// holding both, as the kubelet's does).
    #[arg(long, env = "RAVEN_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// CA certificate(s) the hub's certificate is checked against,
    /// instead of the bundle's `ca.pem` (e.g. a ConfigMap mount).
    #[arg(long, env = "RAVEN_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
}

/// The layer-7 proxy. Which role a node plays (cloud proxy server, edge
/// tunnel, none) follows the topology: `enable-l7-proxy` and the Gateways'
/// proxy endpoints.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Where a cloud proxy server takes HTTP CONNECT on TCP: plain HTTP,
    /// not authenticated (keep it on loopback), unless
    /// `--proxy-connect-tls-cert` makes it TLS with client certificates.
    #[arg(
        long,
        env = "RAVEN_PROXY_CONNECT_ADDR",
        default_value = "127.0.0.1:10263"
    )]
    pub proxy_connect_addr: Option<std::net::SocketAddr>,
    /// Where a cloud proxy server takes HTTP CONNECT on a Unix socket (mode
    /// 0600), what kube-apiserver's egress selector dials
    /// (`transport.uds.udsName`).
    #[arg(long, env = "RAVEN_PROXY_CONNECT_SOCKET")]
    pub proxy_connect_socket: Option<PathBuf>,
    /// Serving certificate (PEM) of the TCP CONNECT listener: with it the
    /// listener speaks TLS and requires a client certificate from
    /// `--proxy-connect-client-ca` (kube-apiserver's egress selector:
    /// `transport.tcp.url: https://…` with `tlsConfig`). Its names must
    /// include the host of that URL.
    #[arg(
        long,
        env = "RAVEN_PROXY_CONNECT_TLS_CERT",
        requires_all = ["proxy_connect_tls_key", "proxy_connect_client_ca"]
    )]
    pub proxy_connect_tls_cert: Option<PathBuf>,
    /// Private key of `--proxy-connect-tls-cert`.
    #[arg(
        long,
        env = "RAVEN_PROXY_CONNECT_TLS_KEY",
        requires = "proxy_connect_tls_cert"
    )]
    pub proxy_connect_tls_key: Option<PathBuf>,
    /// CA (PEM) of the client certificates the TCP CONNECT listener accepts.
    #[arg(
        long,
        env = "RAVEN_PROXY_CONNECT_CLIENT_CA",
        requires = "proxy_connect_tls_cert"
    )]
    pub proxy_connect_client_ca: Option<PathBuf>,
    /// Never run the layer-7 proxy, whatever the topology says.
    #[arg(long, env = "RAVEN_NO_PROXY")]
    pub no_proxy: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: program the kernel from the cache, then follow the hub.
    Run {
        #[command(flatten)]
        common: Box<Common>,
        /// Hub address, `https://host:port`; repeat for replicas (failover).
        #[arg(long = "hub", env = "RAVEN_HUBS", value_delimiter = ',')]
        hubs: Vec<String>,
        /// The node's certificate bundle: the directory `raven-hub certs`
        /// writes as nodes/<node>/ (ca.pem, node.pem, node-key.pem). A
        /// `raven-hub certs` output directory or the older flat layout
        /// (ca.pem, node-<node>.pem, node-<node>-key.pem) work too.
        #[arg(long, env = "RAVEN_CERTS", default_value = "/etc/raven/certs")]
        certs: PathBuf,
        #[command(flatten)]
        identity: Box<IdentityArgs>,
        /// HTTP listener for /healthz, /readyz, /metrics.
        #[arg(long, env = "RAVEN_HTTP_ADDR", default_value = "127.0.0.1:10273")]
        http_addr: Option<std::net::SocketAddr>,
        /// Drift repair period.
        #[arg(long, env = "RAVEN_RESYNC", default_value = "30s", value_parser = humantime::parse_duration)]
        resync: Duration,
        /// Heartbeat interval of the hub stream.
        #[arg(long, env = "RAVEN_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
        heartbeat: Duration,
        /// Observe and plan, never change the kernel.
        #[arg(long)]
        dry_run: bool,
        /// Name of the gateway tunnel device (userspace WireGuard).
        #[arg(long, env = "RAVEN_TUNNEL_DEV", default_value = "raven-wg0")]
        tunnel_dev: String,
        /// WireGuard implementation: `auto` (the kernel's where it exists,
        /// wireguard-go otherwise), `kernel` or `userspace`.
        #[arg(long, env = "RAVEN_WIREGUARD", default_value = "auto")]
        wireguard: crate::tunnel::backend::WgMode,
        /// Who runs wireguard-go (userspace WireGuard): `spawn` — the agent
        /// starts it in a session of its own (host installs) — or
        /// `external` — another container runs it (Kubernetes: a process
        /// started in the agent's container dies with that container) and
        /// the agent only waits for its UAPI socket.
        #[arg(long, env = "RAVEN_WIREGUARD_GO", default_value = "spawn")]
        wireguard_go: crate::tunnel::backend::WireguardGo,
        #[command(flatten)]
        ipsec: Box<crate::ipsec::agent::IpsecArgs>,
        #[command(flatten)]
        failover: Box<FailoverArgs>,
        #[command(flatten)]
        reconnect: Box<ReconnectArgs>,
        #[command(flatten)]
        proxy: Box<ProxyArgs>,
        /// Log as JSON.
        #[arg(long, env = "RAVEN_LOG_JSON")]
        log_json: bool,
    },
    /// Show this node as the running agent sees it: role, gateway and
    /// failover, hub contact, cached revision, dataplane, and the tunnel
    /// peers (path, endpoint, handshake, bytes). Asks the agent's HTTP
    /// endpoint, so no root is needed.
    Status {
        /// The agent's HTTP endpoint (as given to `run --http-addr`).
        #[arg(long, env = "RAVEN_HTTP_ADDR", default_value = "127.0.0.1:10273")]
        http_addr: std::net::SocketAddr,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: raven_cli::output::Format,
    },
    /// Check this node: kernel features, iptables backend and the CNI's
    /// masquerade rules, UDP reachability of every tunnel peer (from the
    /// tunnel's own handshakes), raven0, NAT behaviour, MTU, clock skew
    /// against the hub; each finding with what to do. Exits 1 when a
    /// finding is an error. Reading the nat table needs root.
    Diagnose {
        /// The agent's HTTP endpoint (as given to `run --http-addr`).
        #[arg(long, env = "RAVEN_HTTP_ADDR", default_value = "127.0.0.1:10273")]
        http_addr: std::net::SocketAddr,
        /// Name of the gateway tunnel device, as given to `run`.
        #[arg(long, env = "RAVEN_TUNNEL_DEV", default_value = "raven-wg0")]
        tunnel_dev: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: raven_cli::output::Format,
    },
    /// Print the cached topology and versions as JSON (works with the agent
    /// stopped and the hub down).
    Show {
        #[command(flatten)]
        common: Common,
    },
    /// Print what reconciling the cached state would change (no root
    /// needed); with the cache unusable or empty, that `run` would hold the
    /// kernel state as it is and change nothing.
    ///
    /// Shows what `run` would do now, one command per change: the WireGuard
    /// devices (from the running devices and the node's key), the routes,
    /// rules and raven0, and the skip-NAT rules.
    Plan {
        #[command(flatten)]
        common: Common,
        /// Name of the gateway tunnel device, as given to `run`.
        #[arg(long, env = "RAVEN_TUNNEL_DEV", default_value = "raven-wg0")]
        tunnel_dev: String,
        /// WireGuard implementation, as given to `run`.
        #[arg(long, env = "RAVEN_WIREGUARD", default_value = "auto")]
        wireguard: crate::tunnel::backend::WgMode,
        /// Exit 1 when there is drift (something to change), 0 when there is
        /// none, like `kubectl diff`; errors exit 2.
        #[arg(long)]
        exit_code: bool,
    },
    /// Print the `strongswan.conf` of the charon beside the agent (IPsec):
    /// its VICI socket, UDP 4500 only, and the datapath — `libipsec`
    /// (userspace ESP over TUN `ipsec0`, for kernels without ESP) or
    /// `kernel` (XFRM). Start charon with `STRONGSWAN_CONF=<file>`.
    CharonConf {
        /// charon's VICI socket, as given to `run --ipsec-vici`.
        #[arg(long, env = "RAVEN_IPSEC_VICI", default_value = crate::ipsec::agent::DEFAULT_VICI)]
        vici: std::path::PathBuf,
        /// ESP datapath: `libipsec` or `kernel`.
        #[arg(long, default_value = "libipsec")]
        datapath: crate::ipsec::charon::Datapath,
        /// A file charon logs to, line by line (default: none).
        #[arg(long)]
        log: Option<std::path::PathBuf>,
        /// UDP port of IKE and ESP-in-UDP.
        #[arg(long, default_value_t = 4500)]
        port: u16,
    },
    /// Remove everything raven installed on this node. The only command that
    /// tears the dataplane down.
    Teardown {
        /// Name of the gateway tunnel device, as given to `run`.
        #[arg(long, env = "RAVEN_TUNNEL_DEV", default_value = "raven-wg0")]
        tunnel_dev: String,
    },
}

fn node(common: &Common) -> anyhow::Result<NodeName> {
    NodeName::new(common.node.clone()).map_err(|e| anyhow::anyhow!("--node {:?}: {e}", common.node))
}

/// The node and the state `run` would start from, read without changing
/// anything: `Err` with the reason when `run` would hold the kernel state
/// as it is (see [`crate::hold`]).
fn start_state(
    common: &Common,
) -> anyhow::Result<(
    NodeName,
    Result<cache::CachedState, crate::hold::HoldReason>,
)> {
    let node = node(common)?;
    let snap = raven_store::Store::open_read_only_snapshot(
        &common.data_dir.join("cache"),
        &cache::purpose(&node),
    );
    // What `Cache::open` moves aside: a store that fails its checks, or
    // holds a resource that does not decode.
    let unusable = match snap {
        Ok(snap) => match cache::decode_snapshot(&snap) {
            Ok(state) => {
                return Ok(match crate::hold::at_start(&state, None) {
                    Some(reason) => (node, Err(reason)),
                    None => (node, Ok(state)),
                });
            }
            Err(e) => e.to_string(),
        },
        Err(e) if e.moves_store_aside() => e.to_string(),
        Err(e) => return Err(e.into()),
    };
    Ok((node, Err(crate::hold::HoldReason::Unusable(unusable))))
}

/// The node and its cached state, read without changing anything.
fn cached(common: &Common) -> anyhow::Result<(NodeName, cache::CachedState)> {
    let node = node(common)?;
    let snap = raven_store::Store::open_read_only_snapshot(
        &common.data_dir.join("cache"),
        &cache::purpose(&node),
    )?;
    Ok((node, cache::decode_snapshot(&snap)?))
}

impl Args {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let rt = tokio::runtime::Runtime::new()?;
        match self.command {
            Command::Run {
                common,
                hubs,
                certs,
                identity,
                http_addr,
                resync,
                heartbeat,
                dry_run,
                tunnel_dev,
                wireguard,
                ipsec,
                wireguard_go,
                failover,
                reconnect,
                proxy,
                log_json,
            } => {
                raven_cli::init_tracing(log_json);
                let node = node(&common)?;
                if let Some(ca_key) = ClientTls::ca_key_beside(&certs) {
                    tracing::warn!(
                        path = %ca_key.display(),
                        "the CA's private key is in this node's certificate directory: whoever reads it can issue certificates for any node; give the agent only its bundle (nodes/<node>/ of `raven-hub certs`)"
                    );
                }
                let IdentityArgs {
                    hub_server_name,
                    client_cert,
                    client_key,
                    hub_ca,
                } = *identity;
                let tls =
                    ClientTls::in_dir(&certs, &node).with_files(client_cert, client_key, hub_ca);
                // The proxy tunnel speaks as the node, with the Sync stream's
                // certificates.
                let proxy = (!proxy.no_proxy).then(|| raven_proxy::ProxyConfig {
                    connect_addr: proxy.proxy_connect_addr,
                    connect_socket: proxy.proxy_connect_socket.clone(),
                    connect_tls: match (
                        &proxy.proxy_connect_tls_cert,
                        &proxy.proxy_connect_tls_key,
                        &proxy.proxy_connect_client_ca,
                    ) {
                        (Some(cert), Some(key), Some(ca)) => Some(raven_proxy::ConnectTls {
                            cert: cert.clone(),
                            key: key.clone(),
                            client_ca: ca.clone(),
                        }),
                        _ => None,
                    },
                    ..raven_proxy::ProxyConfig::new(
                        node.clone(),
                        raven_proxy::NodeTls {
                            ca: tls.ca.clone(),
                            cert: tls.cert.clone(),
                            key: tls.key.clone(),
                        },
                    )
                });
                let client = (!hubs.is_empty()).then(|| ClientConfig {
                    node: node.clone(),
                    hubs,
                    server_name: hub_server_name,
                    tls,
                    heartbeat,
                    backoff_min: reconnect.reconnect_min,
                    backoff_max: reconnect.reconnect_max.max(reconnect.reconnect_min),
                    ipsec: ipsec.vpn != crate::ipsec::agent::VpnChoice::Wireguard,
                    sessions: Default::default(),
                });
                let cfg = AgentConfig {
                    node,
                    data_dir: common.data_dir,
                    client,
                    apply: !dry_run,
                    resync,
                    cache_max_bytes: 64 << 20,
                    http_addr,
                    tunnel_dev,
                    wireguard,
                    ipsec: *ipsec,
                    wireguard_go,
                    probe_interval: failover.probe_interval,
                    probe_failures: failover.probe_failures,
                    // The client redials after three silent heartbeats.
                    hub_silence: heartbeat * 3,
                    proxy,
                };
                rt.block_on(async {
                    let shutdown = CancellationToken::new();
                    let s = shutdown.clone();
                    tokio::spawn(async move {
                        raven_cli::shutdown_signal().await;
                        s.cancel();
                    });
                    agent::run(cfg, shutdown).await
                })?;
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::CharonConf {
                vici,
                datapath,
                log,
                port,
            } => {
                print!(
                    "{}",
                    crate::ipsec::charon::strongswan_conf(datapath, &vici, log.as_deref(), port)
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::Status { http_addr, output } => {
                let status = crate::status::fetch(http_addr, Duration::from_secs(5))?;
                print!("{}", crate::status::render(&status, output));
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::Diagnose {
                http_addr,
                tunnel_dev,
                output,
            } => {
                let status = crate::status::fetch(http_addr, Duration::from_secs(5))?;
                let facts = crate::diagnose::gather(&status, &tunnel_dev);
                let findings = crate::diagnose::findings(&status, &facts);
                print!("{}", crate::diagnose::render(&findings, output));
                Ok(if crate::diagnose::failed(&findings) {
                    std::process::ExitCode::FAILURE
                } else {
                    std::process::ExitCode::SUCCESS
                })
            }
            Command::Show { common } => {
                let dir = common.data_dir.join("cache");
                if !dir.exists() {
                    anyhow::bail!(
                        "no cache in {}: the agent has not run on this node with --data-dir {} (nothing to show)",
                        dir.display(),
                        common.data_dir.display()
                    );
                }
                let (node, state) = cached(&common)?;
                if state.epoch.is_empty() && state.resources.is_empty() {
                    eprintln!(
                        "the cache in {} is empty: the agent has not yet persisted a topology from a hub",
                        dir.display()
                    );
                }
                let out = serde_json::json!({
                    "node": node,
                    "epoch": state.epoch,
                    "revision": state.revision,
                    "complete": state.complete,
                    "resources": state.resources,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::Plan {
                common,
                tunnel_dev,
                wireguard,
                exit_code,
            } => {
                let planned = start_state(&common).and_then(|(node, state)| match state {
                    Ok(state) => Ok(Some(rt.block_on(crate::plan::plan(
                        &node,
                        &state,
                        &common.data_dir,
                        &tunnel_dev,
                        wireguard,
                    ))?)),
                    Err(reason) => {
                        eprintln!(
                            "`run` would hold the kernel state as it is — {reason} — and change nothing until a hub sends a complete snapshot"
                        );
                        Ok(None)
                    }
                });
                let planned = match planned {
                    Ok(p) => p,
                    Err(e) if exit_code => {
                        eprintln!("error: {e:#}");
                        return Ok(std::process::ExitCode::from(2));
                    }
                    Err(e) => return Err(e),
                };
                let lines = planned
                    .as_ref()
                    .map(crate::plan::NodePlan::lines)
                    .unwrap_or_default();
                for w in planned.iter().flat_map(|p| &p.warnings) {
                    eprintln!("warning: {w}");
                }
                for l in &lines {
                    println!("{l}");
                }
                eprintln!("{} change(s)", lines.len());
                Ok(if exit_code && !lines.is_empty() {
                    std::process::ExitCode::from(1)
                } else {
                    std::process::ExitCode::SUCCESS
                })
            }
            Command::Teardown { tunnel_dev } => {
                raven_cli::init_tracing(false);
                rt.block_on(dataplane::Kernel::new(true).teardown(&tunnel_dev))?;
                eprintln!(
                    "removed raven's links (raven0, {tunnel_dev}), routes, rules and skip-NAT rules"
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn by_default_an_agent_redials_within_two_seconds_however_long_the_hub_was_away() {
        let args = Args::try_parse_from(["raven-edge", "run", "--node", "n1"])
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run {
            reconnect,
            failover,
            ..
        } = args.command
        else {
            unreachable!("parsed run")
        };
        assert_eq!(reconnect.reconnect_max, Duration::from_secs(2));
        let mut b = raven_cli::pace::Backoff::new(reconnect.reconnect_min, reconnect.reconnect_max);
        // An hour of failed attempts: no delay above the cap.
        assert!((0..3600).all(|_| b.next_delay() <= reconnect.reconnect_max));
        // And a dead candidate is known within about three seconds.
        assert!(failover.probe_interval * failover.probe_failures <= Duration::from_secs(3));
    }
}
