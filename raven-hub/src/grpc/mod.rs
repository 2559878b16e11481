//! The hub's gRPC servers.
//!
//! - The mTLS listener serves `Sync` (node identity from the client
//!   certificate), the inspection RPCs, reflection (v1 and v1alpha) and health.
//! - An optional plaintext listener, allowed on loopback addresses only,
//!   serves inspection, reflection and health — never `Sync`.

pub mod conn;
pub mod error;
mod held;
pub mod inspect;
pub mod resume;
pub mod runs;
pub mod sync;
pub mod tickets;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use raven_proto::v1::inspect_service_server::InspectServiceServer;
use raven_proto::wire::sync_service_server::SyncService;
use raven_proto::{EncodedSyncResponse, v1};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use self::error::SyncError;
use self::inspect::Inspect;
use self::sync::{Session, SyncShared};
use crate::certs;

/// PEM files of the mTLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CAs that sign agent (client) certificates: raven's own `ca.pem` and
    /// any `--client-ca` (e.g. the cluster's CA), in one trust store.
    pub client_ca: Vec<PathBuf>,
    /// The secret that seals TLS session tickets across restarts (see
    /// [`tickets`]); `None`: tickets live only as long as the process.
    pub tickets: Option<PathBuf>,
}

/// The hub's TLS configuration, built again from its files when they
/// change ([`TlsFiles::watch`]).
pub type ServerTls = raven_cli::reload::Reloading<rustls::ServerConfig>;

/// ALPN of gRPC.
const ALPN_H2: &[u8] = b"h2";

impl TlsFiles {
    /// Reads the hub's private key: one that group or others may read is
    /// made 0600 with a warning when the hub owns it, refused otherwise
    /// (see [`raven_cli::files`]).
    pub fn read_key(&self) -> Result<Vec<u8>, ServeError> {
        let (key, found) = raven_cli::files::read_private_key(&self.key)?;
        if let raven_cli::files::Found::Fixed { was } = found {
            tracing::warn!(
                path = %self.key.display(),
                mode = format!("{was:04o}"),
                "the hub's TLS private key was readable by group or others; made it 0600 (it may have been read: consider issuing a new one)"
            );
        }
        Ok(key)
    }

    /// Every file of the mTLS listener, for watching.
    fn paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone()];
        v.extend(self.client_ca.iter().cloned());
        v
    }

    /// Reads and checks every file of the mTLS listener and builds its TLS
    /// configuration, so a missing, unreadable or malformed file is named.
    /// At start it stops the hub; afterwards ([`Self::watch`]) it is
    /// refused and the configuration in use stays.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ServeError> {
        let cert = read(&self.cert)?;
        check_pem(&self.cert, &cert, "certificate", |label| {
            label == "CERTIFICATE"
        })?;
        let key = self.read_key()?;
        check_pem(&self.key, &key, "private key", |label| {
            label.ends_with("PRIVATE KEY")
        })?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::BadPem {
                path: self.cert.clone(),
                what: "certificate",
                reason: format!("not PEM ({e})"),
            })?;
        let key_der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| ServeError::BadPem {
            path: self.key.clone(),
            what: "private key",
            reason: format!("the key does not parse ({e})"),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        let mut cas = Vec::with_capacity(self.client_ca.len());
        for path in &self.client_ca {
            let ca = read(path)?;
            cas.push(ca.clone());
            check_pem(path, &ca, "CA certificate", |label| label == "CERTIFICATE")?;
            for der in CertificateDer::pem_slice_iter(&ca) {
                let der = der.map_err(|e| ServeError::BadPem {
                    path: path.clone(),
                    what: "CA certificate",
                    reason: format!("not PEM ({e})"),
                })?;
                roots.add(der).map_err(|e| ServeError::BadPem {
                    path: path.clone(),
                    what: "CA certificate",
                    reason: e.to_string(),
                })?;
            }
        }
        let config_err = |e: &dyn std::error::Error| ServeError::TlsConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason: error_chain(e),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| config_err(&e))?;
        // A key that does not match the certificate fails here.
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key_der)
            })
            .map_err(|e| config_err(&e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        if let Some(path) = &self.tickets {
            let secret = tickets::load_or_make_secret(path)?;
            config.ticketer =
                Arc::new(tickets::Tickets::new(secret, cas.iter().map(Vec::as_slice)));
            // One per handshake: each resumption hands out the next.
            config.send_tls13_tickets = 1;
        }
        Ok(Arc::new(config))
    }

    /// [`Self::server_config`] now (an error stops the hub), and again
    /// whenever one of the files changes — a Secret volume's `..data`
    /// swap, cert-manager's renewal, a rename or an edit in place. A new
    /// version that does not build, or whose certificate has expired, is
    /// refused with an error naming the file, and the one in use keeps
    /// serving. Connections made before a change keep the certificate
    /// they were made with.
    pub fn watch(&self) -> Result<ServerTls, ServeError> {
        let files = self.clone();
        // The first build is the hub's start: its certificate is taken as
        // it is; a renewed one must not have expired.
        let mut started = false;
        raven_cli::reload::Reloading::start(
            "the hub's serving certificate and client CAs",
            self.paths(),
            move || {
                if started {
                    files.check_not_expired()?;
                }
                started = true;
                files.server_config().map(Arc::unwrap_or_clone)
            },
        )
    }

    /// The serving certificate has not expired: a renewed file that holds
    /// an expired certificate is not taken.
    fn check_not_expired(&self) -> Result<(), ServeError> {
        let pem = read(&self.cert)?;
        let bad = |reason: String| ServeError::BadPem {
            path: self.cert.clone(),
            what: "certificate",
            reason,
        };
        let (_, block) =
            x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(format!("not PEM ({e})")))?;
        let cert = block
            .parse_x509()
            .map_err(|e| bad(format!("the certificate does not parse ({e})")))?;
        let not_after = cert.validity().not_after;
        if not_after.timestamp() < time_now() {
            return Err(bad(format!("the certificate expired at {not_after}")));
        }
        Ok(())
    }
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `error: cause: cause`, the whole chain on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `bytes` (read from `path`) hold a PEM block with a label `wanted`
/// accepts, whose content parses as PEM; anything else is named.
fn check_pem(
    path: &std::path::Path,
    bytes: &[u8],
    what: &'static str,
    wanted: impl Fn(&str) -> bool,
) -> Result<(), ServeError> {
    let bad = |reason: String| ServeError::BadPem {
        path: path.to_path_buf(),
        what,
        reason,
    };
    let mut labels = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(|e| bad(format!("not PEM ({e})")))?;
        if wanted(&pem.label) {
            if pem.label == "CERTIFICATE" {
                pem.parse_x509()
                    .map_err(|e| bad(format!("the certificate does not parse ({e})")))?;
            }
            return Ok(());
        }
        labels.push(pem.label);
    }
    Err(bad(if labels.is_empty() {
        "no PEM block in it".to_owned()
    } else {
        format!("no {what} in it (found {})", labels.join(", "))
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading {path}: {source}", path = path.display())]
    ReadTls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the plaintext listener {0} is not a loopback address; use the mTLS listener off loopback"
    )]
    PlaintextNotLoopback(SocketAddr),
    #[error("the hub's TLS key: {0}")]
    TlsKey(#[from] raven_cli::files::FileError),
    #[error("{path} is not a usable {what}: {reason}", path = path.display())]
    BadPem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(
        "TLS configuration from {cert} and {key}: {reason}",
        cert = cert.display(),
        key = key.display()
    )]
    TlsConfig {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("gRPC server: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The `Sync` service.
#[derive(Debug, Clone)]
pub struct Sync {
    /// One for every session (each holds a reference, not a copy: the
    /// shared handles and the configuration are ≈ 0.5 KB).
    pub shared: Arc<SyncShared>,
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<EncodedSyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SyncService for Sync {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<v1::SyncRequest>>,
    ) -> Result<Response<SyncStream>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let certs = request.peer_certs().ok_or(SyncError::NotMtls)?;
        let leaf = certs
            .first()
            .ok_or(SyncError::Identity(certs::IdentityError::NoCertificate))?;
        let node = certs::node_identity(leaf.as_ref()).map_err(|e| {
            tracing::warn!(%remote, error = %e, "refused a Sync stream");
            SyncError::from(e)
        })?;
        // A stream must not outlive its credential: the session ends when
        // the client certificate expires (the agent moves to its renewed
        // one before that, on a new stream).
        let presented = certs::presented(leaf.as_ref()).map_err(SyncError::from)?;
        // TLS checks expiry to the second, inclusive; a stream starts only
        // before the instant its certificate expires.
        if presented.not_after <= std::time::SystemTime::now() {
            let at = humantime::format_rfc3339_seconds(presented.not_after).to_string();
            tracing::warn!(%node, %remote, expired = %at, "refused a Sync stream: its client certificate expired");
            return Err(SyncError::CertificateExpired { node, at }.into());
        }
        let permit = self.shared.admit_within().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let session = Session::new(node, self.shared.clone(), tx, permit, presented);
        spawn_session(
            &self.shared.sessions,
            session.run(request.into_inner(), remote),
        );
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(rx),
            |m| *m,
        ))))
    }
}

/// Most bytes a session's task may take (the session and its stream's
/// state, every future it waits on): one per connected agent, 2.1 KB
/// measured (3.6 KB while `Session::run` was an `async fn`, which keeps
/// its arguments twice). Checked when the hub is built ([`spawn_session`]).
pub const SESSION_TASK_MAX: usize = 2560;

/// Spawns a session's task on `sessions`; a task over
/// [`SESSION_TASK_MAX`] does not build: box a large state it rarely
/// needs, or keep a value out of scope across the awaits it is not used
/// at (a value in scope is kept in the task until the scope ends).
fn spawn_session<F>(sessions: &tokio_util::task::TaskTracker, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    const {
        assert!(
            std::mem::size_of::<F>() <= SESSION_TASK_MAX,
            "a session's task grew over SESSION_TASK_MAX"
        );
    }
    sessions.spawn(task);
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::ReadTls {
        path: path.clone(),
        source,
    })
}

/// Services of the mTLS listener, as reflection lists them and health
/// reports them.
const TLS_SERVICES: [&str; 5] = [
    "raven.v1.SyncService",
    "raven.v1.InspectService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
/// Services of the loopback plaintext listener: the same, without Sync.
const PLAINTEXT_SERVICES: [&str; 4] = [
    "raven.v1.InspectService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reports SERVING for `services` (and the whole server, `""`) once the
/// hub is ready, NOT_SERVING from shutdown on.
fn spawn_health(
    reporter: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    mut published: crate::pipeline::PublishedRx,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let _ = tokio::select! {
            r = published.wait_for(|p| p.ready) => r.map(|_| ()),
            () = shutdown.cancelled() => Ok(()),
        };
        let set = |status| {
            let reporter = reporter.clone();
            async move {
                for name in services.iter().copied().chain([""]) {
                    reporter.set_service_status(name, status).await;
                }
            }
        };
        if !shutdown.is_cancelled() {
            set(tonic_health::ServingStatus::Serving).await;
        }
        shutdown.cancelled().await;
        set(tonic_health::ServingStatus::NotServing).await;
    });
}

fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    // Both reflection versions know every descriptor, including each other's,
    // so `grpcurl` (v1alpha) and `buf curl` (v1) see the same services.
    // Both list only the services of their listener (a symbol of another
    // service still resolves, for `describe`).
    let builder = || {
        services
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, s| {
                b.with_service_name(*s)
            })
            .register_encoded_file_descriptor_set(raven_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let v1 = builder().build_v1()?;
    let v1alpha = builder().build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Pending connections the agent listener queues before `accept` (capped by
/// the kernel's `net.core.somaxconn`): thousands of agents redial at once
/// after a hub restart, and a short queue resets their dials.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Bound listeners, before serving.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub plaintext: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(grpc: SocketAddr, plaintext: Option<SocketAddr>) -> Result<Self, ServeError> {
        Self::bind_now(grpc, plaintext)
    }

    fn bind_now(grpc: SocketAddr, plaintext: Option<SocketAddr>) -> Result<Self, ServeError> {
        if let Some(p) = plaintext
            && !p.ip().is_loopback()
        {
            return Err(ServeError::PlaintextNotLoopback(p));
        }
        let bind = |addr: SocketAddr, backlog: u32| {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            socket
                .and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(addr)?;
                    s.listen(backlog)
                })
                .map_err(|source| ServeError::Bind { addr, source })
        };
        Ok(Self {
            grpc: bind(grpc, LISTEN_BACKLOG)?,
            plaintext: match plaintext {
                Some(p) => Some(bind(p, 128)?),
                None => None,
            },
        })
    }
}

/// Serves until `shutdown`; health reports SERVING once the hub is ready.
pub async fn serve(
    listeners: Listeners,
    tls: ServerTls,
    shared: SyncShared,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let max_connections = conn::effective_max(shared.config.max_connections);
    if max_connections < shared.config.max_connections {
        tracing::warn!(
            wanted = shared.config.max_connections,
            max_connections,
            "the open-files limit caps agent connections; raise it (ulimit -n) for more"
        );
    }

    let (tls_health_reporter, tls_health) = tonic_health::server::health_reporter();
    spawn_health(
        tls_health_reporter,
        &TLS_SERVICES,
        shared.published.clone(),
        shutdown.clone(),
    );
    let (plain_health_reporter, plain_health) = tonic_health::server::health_reporter();
    spawn_health(
        plain_health_reporter,
        &PLAINTEXT_SERVICES,
        shared.published.clone(),
        shutdown.clone(),
    );

    let inspect = Inspect {
        published: shared.published.clone(),
        agents: shared.agents.clone(),
        authorize: true,
    };
    let (refl_v1, refl_v1alpha) = reflection(&TLS_SERVICES)?;
    let (plain_refl_v1, plain_refl_v1alpha) = reflection(&PLAINTEXT_SERVICES)?;
    let http2 = conn::Http2 {
        keepalive: shared.config.keepalive,
        keepalive_timeout: shared.config.keepalive_timeout,
        max_send_buf: conn::MAX_SEND_BUF,
    };
    let metrics = shared.metrics.clone();
    let limits = conn::AcceptLimits {
        max_connections,
        max_connections_per_source: shared.config.max_connections_per_source,
        max_handshakes: shared.config.max_tls_handshakes,
        max_handshakes_per_source: shared.config.max_tls_handshakes_per_source,
        handshake_timeout: shared.config.tls_handshake_timeout,
        queue_timeout: shared.config.tls_queue_timeout,
    };
    // Sync streams write Updates in bounded pieces (see `wire`).
    let sync = wire::SyncServer(Sync {
        shared: Arc::new(shared),
    });
    let routes = tonic::service::Routes::new(tls_health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(InspectServiceServer::new(inspect.clone()))
        .add_service(sync)
        .prepare();
    // TLS is done by `conn::tls_incoming` (admission before the handshake),
    // HTTP/2 by `conn::serve_http2` (each stream's send buffer bounded),
    // not by tonic's server.
    let tls_shutdown = shutdown.clone();
    let handshakes = metrics.clone();
    let tls_server = async move {
        use futures::StreamExt as _;
        conn::serve_http2(
            conn::tls_incoming(listeners.grpc, tls, limits, move |_| {
                metrics.connection_refused();
            })
            .inspect(move |tls| {
                if let Ok(tls) = tls {
                    let kind = tls.get_ref().1.handshake_kind();
                    handshakes.tls_handshake(kind == Some(rustls::HandshakeKind::Resumed));
                }
            }),
            routes,
            http2,
            tls_shutdown,
        )
        .await;
        Ok::<(), ServeError>(())
    };

    match listeners.plaintext {
        None => tls_server.await?,
        Some(plain) => {
            let plain_server = Server::builder()
                .add_service(plain_health)
                .add_service(plain_refl_v1)
                .add_service(plain_refl_v1alpha)
                .add_service(InspectServiceServer::new(Inspect {
                    authorize: false,
                    ..inspect
                }))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(plain),
                    shutdown.cancelled_owned(),
                );
            let (a, b) = tokio::join!(tls_server, plain_server);
            a?;
            b?;
        }
    }
    Ok(())
}
