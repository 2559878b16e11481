//! What the Sync tests share: a hub over the user manual's manifests with
//! real certificates ([`Env`]), a scripted agent on one stream ([`Agent`]),
//! and the prelude most tests start with — dial with a node's certificate,
//! Hello with an empty cache, wait for the snapshot ([`first_snapshot`],
//! [`synced_agent`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use raven_core::NodeName;
use raven_hub::grpc::TlsFiles;
use raven_hub::grpc::sync::SyncConfig;
use raven_hub::hub::{self, HubConfig, RunningHub, Source};
use raven_hub::pipeline::Debounce;
use raven_proto::v1::sync_request::Message as Req;
use raven_proto::v1::sync_response::Message as Resp;
use raven_proto::v1::{self, sync_service_client::SyncServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const HZ_GW: &str = "izbp15inok0kbfkg3in52rz";
pub const HZ_MEMBER: &str = "izbp15inok0kbfkg3in52sz";
pub const QD_MEMBER: &str = "izm5eb24dmjfimuaybpnr0z";
pub const ALL_NODES: [&str; 6] = [
    "izbp15inok0kbfkg3in52rz",
    "izbp15inok0kbfkg3in52sz",
    "izm5eb24dmjfimuaybpnqzz",
    "izm5eb24dmjfimuaybpnr0z",
    "izwz9dohcv74iegqecp4axz",
    "izwz9ey0js5z7mornclpd6z",
];

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual");
        for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
            std::fs::copy(example.join(f), manifests.join(f)).expect("copy example");
        }
        let nodes: Vec<NodeName> = ALL_NODES
            .iter()
            .map(|n| NodeName::new(*n).expect("name"))
            .collect();
        raven_hub::certs::generate_with_operators(
            &dir.path().join("certs"),
            &["localhost".into(), "127.0.0.1".into()],
            &nodes,
            &["ops".into()],
        )
        .expect("certs");
        Self { dir }
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn certs(&self) -> raven_hub::certs::Layout {
        raven_hub::certs::Layout {
            dir: self.dir.path().join("certs"),
        }
    }

    pub fn config(&self, max_initial_syncs: usize) -> HubConfig {
        let l = self.certs();
        HubConfig {
            source: Source::Manifests(self.manifests()),
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            plaintext_addr: Some("127.0.0.1:0".parse().expect("addr")),
            http_addr: None,
            tls: TlsFiles {
                cert: l.hub_cert(),
                key: l.hub_key(),
                client_ca: vec![l.ca_cert()],
                tickets: Some(self.dir.path().join("hub-data").join("tls-tickets.key")),
            },
            data_dir: Some(self.dir.path().join("hub-data")),
            sync: SyncConfig {
                heartbeat: Duration::from_secs(2),
                max_initial_syncs,
                ..Default::default()
            },
            debounce: Debounce {
                quiet: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
            replica: "test".into(),
            epoch: None,
            manifest_limits: Default::default(),
        }
    }

    pub async fn hub(&self) -> RunningHub {
        hub::start(self.config(64)).await.expect("hub starts")
    }

    pub async fn client(&self, hub: &RunningHub, node: &str) -> SyncServiceClient<Channel> {
        SyncServiceClient::new(self.channel(hub, node).await)
    }

    /// An mTLS channel to the hub with `node`'s certificate.
    pub async fn channel(&self, hub: &RunningHub, node: &str) -> Channel {
        let l = self.certs();
        let node = NodeName::new(node).expect("name");
        self.channel_with(hub, &l.node_cert(&node), &l.node_key(&node))
            .await
    }

    /// An mTLS channel to the hub with the operator certificate `ops`.
    pub async fn operator_channel(&self, hub: &RunningHub) -> Channel {
        let dir = self.certs().operator_bundle("ops");
        self.channel_with(
            hub,
            &dir.join("operator.pem"),
            &dir.join("operator-key.pem"),
        )
        .await
    }

    pub async fn channel_with(&self, hub: &RunningHub, cert: &Path, key: &Path) -> Channel {
        let l = self.certs();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(l.ca_cert()).expect("ca"),
            ))
            .identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", hub.grpc_addr))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    }

    pub fn edit(&self, file: &str, from: &str, to: &str) {
        let p = self.manifests().join(file);
        let text = std::fs::read_to_string(&p).expect("read");
        assert!(text.contains(from), "{file} lacks {from}");
        // Keep the mtime moving even on coarse clocks.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, text.replacen(from, to, 1)).expect("write");
    }
}

/// A scripted agent on one stream.
pub struct Agent {
    pub tx: mpsc::Sender<v1::SyncRequest>,
    pub rx: tonic::Streaming<v1::SyncResponse>,
}

pub fn hello(
    node: &str,
    held: &[(String, String)],
    epoch: &str,
    revision: u64,
    complete: bool,
) -> v1::SyncRequest {
    v1::SyncRequest {
        message: Some(Req::Hello(v1::Hello {
            protocol_version: raven_proto::PROTOCOL_VERSION,
            agent_version: "test".into(),
            capabilities: vec![v1::Capability::Delta as i32],
            node_name: node.into(),
            epoch: epoch.into(),
            revision,
            resources: held
                .iter()
                .map(|(n, v)| v1::ResourceVersion {
                    name: n.clone(),
                    version: v.clone(),
                })
                .collect(),
            cache_complete: complete,
            inventory_digest: Vec::new(),
        })),
    }
}

impl Agent {
    /// Reads until the stream ends: the status code it ended with (`None`:
    /// a clean end).
    pub async fn end(&mut self) -> Option<tonic::Code> {
        loop {
            match self.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e.code()),
            }
        }
    }

    pub async fn open(
        client: &mut SyncServiceClient<Channel>,
        first: v1::SyncRequest,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("send hello");
        let rx = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// The next Update, skipping heartbeats.
    pub async fn update(&mut self) -> Result<v1::Update, tonic::Status> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("no update within 10 s"))??;
            match msg.and_then(|m| m.message) {
                Some(Resp::Update(u)) => return Ok(u),
                Some(Resp::Heartbeat(_)) => continue,
                Some(Resp::InventoryRequest(_)) => {
                    return Err(tonic::Status::aborted("an InventoryRequest, not an Update"));
                }
                None => return Err(tonic::Status::aborted("stream ended")),
            }
        }
    }

    /// Asserts no Update arrives within `wait` (heartbeats are fine).
    pub async fn no_update_within(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return,
                Ok(Ok(Some(v1::SyncResponse {
                    message: Some(Resp::Heartbeat(_)),
                }))) => continue,
                Ok(other) => panic!("expected no update, got {other:?}"),
            }
        }
    }

    /// Sends one message on the stream.
    pub async fn send(&self, message: Req) {
        self.tx
            .send(v1::SyncRequest {
                message: Some(message),
            })
            .await
            .expect("send");
    }

    pub async fn ack(&self, u: &v1::Update) {
        let ack = v1::Ack {
            nonce: u.nonce.clone(),
            epoch: u.epoch.clone(),
            revision: u.revision,
        };
        self.tx
            .send(v1::SyncRequest {
                message: Some(Req::Ack(ack)),
            })
            .await
            .expect("ack");
    }

    pub async fn nack(&self, u: &v1::Update, resource: &str) {
        let nack = v1::Nack {
            nonce: u.nonce.clone(),
            epoch: u.epoch.clone(),
            revision: u.revision,
            error: Some(v1::ErrorDetail {
                message: "refused by test".into(),
                resource_name: resource.into(),
                field: String::new(),
            }),
        };
        self.tx
            .send(v1::SyncRequest {
                message: Some(Req::Nack(nack)),
            })
            .await
            .expect("nack");
    }
}

pub fn names(u: &v1::Update) -> Vec<String> {
    u.resources.iter().map(|r| r.name.clone()).collect()
}

pub fn inventory(u: &v1::Update) -> Vec<(String, String)> {
    u.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

/// Dials the hub with `node`'s certificate, says Hello with an empty cache
/// and waits for the snapshot, which is not acknowledged yet.
pub async fn first_snapshot(env: &Env, hub: &RunningHub, node: &str) -> (Agent, v1::Update) {
    let mut client = env.client(hub, node).await;
    let mut agent = Agent::open(&mut client, hello(node, &[], "", 0, false))
        .await
        .expect("open");
    let first = agent.update().await.expect("snapshot");
    (agent, first)
}

/// As [`first_snapshot`], for an agent that takes the compact member view
/// (`CAPABILITY_COMPACT_MEMBER_VIEW`), as `raven-edge` does.
pub async fn first_compact_snapshot(
    env: &Env,
    hub: &RunningHub,
    node: &str,
) -> (Agent, v1::Update) {
    let mut client = env.client(hub, node).await;
    let mut first = hello(node, &[], "", 0, false);
    if let Some(Req::Hello(h)) = &mut first.message {
        h.capabilities
            .push(v1::Capability::CompactMemberView as i32);
    }
    let mut agent = Agent::open(&mut client, first).await.expect("open");
    let first = agent.update().await.expect("snapshot");
    (agent, first)
}

/// Opens `node`'s stream and acknowledges its snapshot.
pub async fn synced_agent(env: &Env, hub: &RunningHub, node: &str) -> Agent {
    let (agent, first) = first_snapshot(env, hub, node).await;
    agent.ack(&first).await;
    agent
}
