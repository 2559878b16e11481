//! Command line of `raven-hub`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::sources::manifests;

/// raven's cloud hub.
#[derive(Debug, Parser)]
#[command(name = "raven-hub", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the topology to agents over mTLS gRPC.
    Serve(Box<ServeArgs>),
    /// Create a CA, a hub certificate and node client certificates for
    /// standalone use (reuses the CA already in --out). Each node's files
    /// go to <out>/nodes/<node>/, the directory to copy to that node; the
    /// CA key (ca-key.pem) never needs to leave <out>.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "raven-certs")]
        out: PathBuf,
        /// Names (DNS or IP) the hub certificate is valid for.
        #[arg(long = "hub-name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "raven-hub".to_owned()])]
        hub_names: Vec<String>,
        /// Nodes to issue client certificates for (repeat or comma-separate).
        #[arg(long = "node", value_delimiter = ',')]
        nodes: Vec<String>,
        /// Operators to issue inspection certificates for (CN
        /// `raven:operator:<name>`: GetTopology, ListAgents and every node's
        /// view over mTLS; node certificates read only their own view).
        #[arg(long = "operator", value_delimiter = ',')]
        operators: Vec<String>,
    },
    /// Show every gateway and agent as a running hub sees them: elected
    /// endpoints, members, relays; each agent's connection, acknowledged and
    /// applied revisions, last NACK; and the problems of the inputs.
    Status {
        /// The hub: its loopback plaintext listener (the default, on the
        /// hub's host), or `https://HOST:10270` with --certs.
        #[arg(long, env = "RAVEN_HUB", default_value = "http://127.0.0.1:10271")]
        hub: String,
        /// An operator bundle (`raven-hub certs --operator NAME` writes
        /// operators/NAME/) for the mTLS listener.
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Name the hub certificate must carry (default: the host of --hub).
        #[arg(long)]
        hub_server_name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: raven_cli::output::Format,
    },
    /// Compile a directory of Gateway/Node/ConfigMap manifests and print the
    /// topology as JSON (stable, sorted). Problems also go to stderr.
    Compile {
        /// Directory of YAML manifests; without it, the embedded user-manual
        /// example (deploy/examples/user-manual) is compiled.
        #[arg(long, env = "RAVEN_MANIFESTS")]
        manifests: Option<PathBuf>,
        /// Exit with status 2 when any object has an error.
        #[arg(long)]
        strict: bool,
    },
}

/// Flags of `raven-hub serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory of manifests to serve (standalone mode), re-read on change.
    #[arg(long, env = "RAVEN_MANIFESTS", conflicts_with = "kubernetes")]
    pub manifests: Option<PathBuf>,
    /// Read Gateways, Nodes and raven-cfg from the Kubernetes API.
    #[arg(long, env = "RAVEN_KUBERNETES")]
    pub kubernetes: bool,
    /// kubeconfig for --kubernetes (default: in-cluster or $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// mTLS gRPC listener (Sync, inspection, reflection, health).
    #[arg(long, env = "RAVEN_GRPC_ADDR", default_value = "0.0.0.0:10270")]
    pub grpc_addr: std::net::SocketAddr,
    /// Plaintext listener for inspection only; loopback addresses only.
    #[arg(long, env = "RAVEN_PLAINTEXT_ADDR", default_value = "127.0.0.1:10271")]
    pub plaintext_addr: Option<std::net::SocketAddr>,
    /// HTTP listener for /metrics, /healthz, /readyz.
    #[arg(long, env = "RAVEN_HTTP_ADDR", default_value = "127.0.0.1:10272")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Directory of certificates as written by `raven-hub certs`.
    #[arg(long, env = "RAVEN_CERTS", default_value = "raven-certs")]
    pub certs: PathBuf,
    /// More CA certificates whose client certificates identify nodes
    /// (CN `system:node:<name>`) and operators, besides the `ca.pem` of
    /// --certs: e.g. the cluster's CA
    /// (/var/run/secrets/kubernetes.io/serviceaccount/ca.crt in a pod), so
    /// that agents can present the kubelet's own client certificate. Repeat
    /// or separate with commas.
    #[arg(long = "client-ca", env = "RAVEN_CLIENT_CA", value_delimiter = ',')]
    pub client_cas: Vec<PathBuf>,
    /// Where the hub persists its epoch and revision.
    #[arg(long, env = "RAVEN_DATA_DIR", default_value = "raven-hub-data")]
    pub data_dir: PathBuf,
    /// Heartbeat interval of Sync streams.
    #[arg(long, env = "RAVEN_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: std::time::Duration,
    /// HTTP/2 keepalive of agent connections: the hub PINGs an agent silent
    /// this long (and drops it when the PING is not answered within
    /// --keepalive-timeout). Raise it for agents on very slow links.
    #[arg(long, env = "RAVEN_KEEPALIVE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub keepalive: std::time::Duration,
    /// How long a keepalive PING may go unanswered before the hub drops the
    /// connection; a powered-off agent's stream ends within --keepalive plus
    /// this. Long enough that a busy hub never drops healthy streams.
    #[arg(long, env = "RAVEN_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: std::time::Duration,
    /// How long an agent's stream must have been gone before the hub counts
    /// it in gateway failover: a tunnel endpoint whose stream has been gone
    /// this long and that a connected member of its gateway probes dead is
    /// no longer elected. Longer than a short reconnect.
    #[arg(long, env = "RAVEN_FAILOVER_GRACE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub failover_grace: std::time::Duration,
    /// Connections open at once on the mTLS listener (TCP accepted, TLS or
    /// not); one over that is closed at once. Lowered to the open-files
    /// limit less 256 descriptors of headroom.
    #[arg(long, env = "RAVEN_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// A TLS handshake that does not finish within this is dropped.
    #[arg(long, env = "RAVEN_TLS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: std::time::Duration,
    /// A connection beyond the first `--max-tls-handshakes-per-source`
    /// queued from its address that still waits for its TLS handshake turn
    /// after this is closed (a node's own dial waits its turn however long
    /// a storm takes).
    #[arg(long, env = "RAVEN_TLS_QUEUE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub tls_queue_timeout: std::time::Duration,
    /// TLS handshakes in progress at once on the mTLS listener; further
    /// connections are accepted at once and wait in the hub (one queue per
    /// source address, served in turn) until one ends, so thousands of
    /// simultaneous dials never run thousands of handshakes at once and
    /// never overflow the kernel's listen backlog.
    #[arg(long, env = "RAVEN_MAX_TLS_HANDSHAKES", default_value_t = 64)]
    pub max_tls_handshakes: usize,
    /// TLS handshakes in progress at once from one source address (an IPv6
    /// /64), so one address holding silent connections cannot take every
    /// handshake slot. Agents behind one NAT address share it.
    #[arg(
        long,
        env = "RAVEN_MAX_TLS_HANDSHAKES_PER_SOURCE",
        default_value_t = 16
    )]
    pub max_tls_handshakes_per_source: usize,
    /// Connections open at once from one source address (an IPv6 /64),
    /// queued, handshaking or established; one over is closed at once.
    /// Raise it for a NAT address with more agents behind it.
    #[arg(long, env = "RAVEN_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 2048)]
    pub max_connections_per_source: usize,
    /// Agents allowed in their initial sync at once; others are told to retry.
    #[arg(long, env = "RAVEN_MAX_INITIAL_SYNCS", default_value_t = 256)]
    pub max_initial_syncs: usize,
    /// Longest one stream holds an admission permit (no Hello, or an initial
    /// sync never ACKed): permits always come back. A node has one stream at
    /// a time — a newer one replaces it — so one node certificate holds at
    /// most one permit.
    #[arg(long, env = "RAVEN_ADMISSION_HOLD", default_value = "20s", value_parser = humantime::parse_duration)]
    pub admission_hold: std::time::Duration,
    /// Reports one node may send per second (bursts of twice that); faster
    /// ones are coalesced, the latest applied when the rate allows.
    #[arg(long, env = "RAVEN_REPORT_RATE", default_value_t = 4.0)]
    pub report_rate: f64,
    /// Largest Report accepted, in encoded bytes; a larger one ends its
    /// stream with INVALID_ARGUMENT.
    #[arg(long, env = "RAVEN_MAX_REPORT_BYTES", default_value_t = 256 * 1024)]
    pub max_report_bytes: usize,
    /// Base of the retry hint sent with RESOURCE_EXHAUSTED to agents over
    /// the admission limit (the hint is uniform in [base, 2·base), and agents
    /// add up to half of it again): what spreads a reconnect storm.
    #[arg(long, env = "RAVEN_ADMISSION_RETRY_AFTER", default_value = "2s", value_parser = humantime::parse_duration)]
    pub admission_retry_after: std::time::Duration,
    /// How long a new stream over `--max-initial-syncs` waits on its
    /// connection for a permit (first come first served) before it is
    /// refused with the retry hint.
    #[arg(long, env = "RAVEN_ADMISSION_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub admission_wait: std::time::Duration,
    /// Epoch of the revision sequence. Replicas serving the same cluster
    /// share it (default with --kubernetes: "kubernetes", revisions then
    /// follow the API server's resourceVersion); a standalone hub picks a
    /// random one and persists it. Change it after restoring etcd from a
    /// backup.
    #[arg(long, env = "RAVEN_EPOCH")]
    pub epoch: Option<String>,
    /// Largest manifest file read (bytes); a larger one is reported and its
    /// last good version kept.
    #[arg(long, env = "RAVEN_MANIFEST_MAX_FILE_BYTES", default_value_t = manifests::DEFAULT_MAX_FILE_BYTES)]
    pub manifest_max_file_bytes: u64,
    /// Most YAML documents read from one manifest file; a file with more is
    /// reported and its last good version kept.
    #[arg(long, env = "RAVEN_MANIFEST_MAX_DOCUMENTS", default_value_t = raven_core::manifest::DEFAULT_MAX_DOCUMENTS)]
    pub manifest_max_documents: usize,
    /// Most `spec.endpoints` of one Gateway manifest; a Gateway with more is
    /// reported and not loaded.
    #[arg(long, env = "RAVEN_MANIFEST_MAX_ENDPOINTS", default_value_t = raven_core::manifest::DEFAULT_MAX_ENDPOINTS)]
    pub manifest_max_endpoints: usize,
    /// Let a change remove most of a node's view (agents otherwise hold
    /// such a removal back, and the hub does not ask them to take it).
    /// Start the hub with it once to confirm a deliberate mass removal.
    #[arg(long, env = "RAVEN_CONFIRM_MASS_REMOVAL")]
    pub confirm_mass_removal: bool,
    /// Seal no TLS session tickets with the secret in --data-dir
    /// (`tls-tickets.key`): agents then resume TLS sessions only with this
    /// process, and every reconnect after a restart is a full handshake.
    #[arg(long, env = "RAVEN_NO_TLS_RESUMPTION")]
    pub no_tls_resumption: bool,
    /// Log as JSON.
    #[arg(long, env = "RAVEN_LOG_JSON")]
    pub log_json: bool,
}

impl Args {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self.command {
            Command::Serve(args) => serve(*args),
            Command::Certs {
                out,
                hub_names,
                nodes,
                operators,
            } => {
                if let Some(bad) = operators.iter().find(|o| {
                    o.is_empty()
                        || !o
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                }) {
                    anyhow::bail!("--operator {bad:?}: use letters, digits, '-', '_' or '.'");
                }
                let nodes = nodes
                    .iter()
                    .map(|n| {
                        raven_core::NodeName::new(n.clone())
                            .map_err(|e| anyhow::anyhow!("--node {n:?}: {e}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let generated =
                    crate::certs::generate_with_operators(&out, &hub_names, &nodes, &operators)?;
                for (path, was) in &generated.fixed {
                    eprintln!(
                        "warning: {} had mode {was:04o} (open to group or others); made it private — a key in it may have been read",
                        path.display()
                    );
                }
                let layout = generated.layout;
                println!(
                    "wrote certificates to {} (keep it, and ca-key.pem in it, on this machine)",
                    layout.dir.display()
                );
                for node in &nodes {
                    println!(
                        "  {node}: copy {} to the node, pass it to `raven-edge run --certs`",
                        layout.node_bundle(node).display()
                    );
                }
                for op in &operators {
                    println!(
                        "  operator {op}: {} (grpcurl -cacert ca.pem -cert operator.pem -key operator-key.pem)",
                        layout.operator_bundle(op).display()
                    );
                }
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::Compile { manifests, strict } => compile(manifests.as_deref(), strict),
            Command::Status {
                hub,
                certs,
                hub_server_name,
                output,
            } => {
                let target = crate::fleet::Target {
                    hub,
                    certs,
                    server_name: hub_server_name,
                };
                let fleet =
                    tokio::runtime::Runtime::new()?.block_on(crate::fleet::fetch(&target))?;
                print!(
                    "{}",
                    crate::fleet::render(&fleet, output, std::time::SystemTime::now())
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    }
}

fn compile(dir: Option<&std::path::Path>, strict: bool) -> anyhow::Result<std::process::ExitCode> {
    let loaded = match dir {
        Some(dir) => manifests::read_dir(dir)?,
        None => raven_core::manifest::load(&crate::embedded::user_manual()),
    };
    let mut compiled = raven_core::compile(&loaded.inputs);
    compiled.topology.problems.extend(loaded.problems);
    compiled.topology.problems.sort();
    for p in &compiled.topology.problems {
        eprintln!("{p}");
    }
    print!("{}", compiled.topology.to_json());
    let errors = compiled
        .topology
        .problems
        .iter()
        .any(|p| p.severity == raven_core::Severity::Error);
    Ok(if strict && errors {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    raven_cli::init_tracing(args.log_json);
    let layout = crate::certs::Layout {
        dir: args.certs.clone(),
    };
    let source = if args.kubernetes {
        crate::hub::Source::Kubernetes {
            kubeconfig: args.kubeconfig.clone(),
        }
    } else if let Some(dir) = &args.manifests {
        crate::hub::Source::Manifests(dir.clone())
    } else {
        tracing::warn!(
            "no --manifests and no --kubernetes: serving the embedded demo topology (the OpenYurt user-manual example), not your cluster"
        );
        crate::hub::Source::Embedded
    };
    let config = crate::hub::HubConfig {
        source,
        grpc_addr: args.grpc_addr,
        plaintext_addr: args.plaintext_addr,
        http_addr: args.http_addr,
        tls: crate::grpc::TlsFiles {
            cert: layout.hub_cert(),
            key: layout.hub_key(),
            client_ca: std::iter::once(layout.ca_cert())
                .chain(args.client_cas.iter().cloned())
                .collect(),
            tickets: (!args.no_tls_resumption)
                .then(|| args.data_dir.join(crate::grpc::tickets::SECRET_FILE)),
        },
        data_dir: Some(args.data_dir.clone()),
        sync: crate::grpc::sync::SyncConfig {
            heartbeat: args.heartbeat,
            max_initial_syncs: args.max_initial_syncs,
            max_connections: args.max_connections,
            tls_handshake_timeout: args.tls_handshake_timeout,
            tls_queue_timeout: args.tls_queue_timeout,
            max_tls_handshakes: args.max_tls_handshakes,
            max_tls_handshakes_per_source: args.max_tls_handshakes_per_source,
            max_connections_per_source: args.max_connections_per_source,
            admission_hold: args.admission_hold,
            report_rate: args.report_rate,
            max_report_bytes: args.max_report_bytes,
            retry_after: args.admission_retry_after,
            admission_wait: args.admission_wait,
            keepalive: args.keepalive,
            keepalive_timeout: args.keepalive_timeout,
            failover_grace: args.failover_grace,
            confirm_mass_removal: args.confirm_mass_removal,
            ..Default::default()
        },
        manifest_limits: manifests::Limits {
            max_file_bytes: args.manifest_max_file_bytes,
            manifest: raven_core::manifest::Limits {
                max_documents: args.manifest_max_documents,
                max_endpoints: args.manifest_max_endpoints,
            },
        },
        debounce: crate::pipeline::Debounce::default(),
        replica: std::env::var("HOSTNAME").unwrap_or_else(|_| "raven-hub".to_owned()),
        epoch: args
            .epoch
            .clone()
            .or_else(|| args.kubernetes.then(|| "kubernetes".to_owned())),
    };
    crate::memory::limit_arenas();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let hub = crate::hub::start(config).await?;
        let shutdown = hub.shutdown.clone();
        tokio::spawn(async move {
            raven_cli::shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
        hub.wait().await.map_err(anyhow::Error::msg)?;
        anyhow::Ok(std::process::ExitCode::SUCCESS)
    })
}
