//! The baseline: etcd (Debian's `etcd-server`) delivering one ~650 B put to
//! M watchers of one key, each watcher on its own HTTP/2 connection, measured
//! in the same run as the hub. Speaks etcd's v3 gRPC API with the few
//! messages it needs, declared here (field numbers from etcd's `rpc.proto`
//! and `kv.proto`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(int64, tag = "3")]
    pub revision: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    #[prost(message, optional, tag = "1")]
    pub create_request: Option<WatchCreateRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(bool, tag = "3")]
    pub created: bool,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

type Codec<A, B> = tonic_prost::ProstCodec<A, B>;

async fn put(ch: Channel, key: &[u8], value: Vec<u8>) -> Result<i64, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let r: tonic::Response<PutResponse> = grpc
        .unary(
            tonic::Request::new(PutRequest {
                key: key.to_vec(),
                value,
            }),
            path,
            Codec::<PutRequest, PutResponse>::default(),
        )
        .await?;
    Ok(r.into_inner().header.map(|h| h.revision).unwrap_or(0))
}

/// A running etcd, killed (by its PID) when dropped.
pub struct Etcd {
    child: std::process::Child,
    pub client: SocketAddr,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

pub async fn start(dir: &Path) -> Option<Etcd> {
    let bin = which("etcd")?;
    let (c, p) = (free_port(), free_port());
    let client: SocketAddr = ([127, 0, 0, 1], c).into();
    let child = std::process::Command::new(bin)
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .arg("--listen-client-urls")
        .arg(format!("http://{client}"))
        .arg("--advertise-client-urls")
        .arg(format!("http://{client}"))
        .arg("--listen-peer-urls")
        .arg(format!("http://127.0.0.1:{p}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://127.0.0.1:{p}"))
        .arg("--initial-cluster")
        .arg(format!("default=http://127.0.0.1:{p}"))
        .arg("--log-level")
        .arg("error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let etcd = Etcd { child, client };
    for _ in 0..200 {
        if let Ok(ch) = channel(client).await
            && put(ch, b"/bench/ready", b"1".to_vec()).await.is_ok()
        {
            return Some(etcd);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// The figures of the baseline.
#[derive(Debug, Default)]
pub struct Figures {
    pub watchers: usize,
    pub open: Duration,
    /// Delivery latency of every watcher for every put.
    pub delivery: Vec<Duration>,
    pub cpu_per_change: Duration,
}

/// Opens `m` watchers (own connection each) on one key, then puts a 650 B
/// value `changes` times and records when each watcher saw each put.
pub async fn fanout(etcd: &Etcd, m: usize, changes: usize) -> Figures {
    const KEY: &[u8] = b"/registry/raven.openyurt.io/gateways/gw-00001";
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    let (created_tx, mut created_rx) = mpsc::unbounded_channel::<()>();
    let opened = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    for _ in 0..m {
        let (seen_tx, created_tx, addr, sem) = (
            seen_tx.clone(),
            created_tx.clone(),
            etcd.client,
            sem.clone(),
        );
        tokio::spawn(async move {
            let mut permit = sem.acquire_owned().await.ok();
            let Ok(ch) = channel(addr).await else { return };
            let mut grpc = tonic::client::Grpc::new(ch);
            if grpc.ready().await.is_err() {
                return;
            }
            let (tx, rx) = mpsc::channel(1);
            let _ = tx
                .send(WatchRequest {
                    create_request: Some(WatchCreateRequest { key: KEY.to_vec() }),
                })
                .await;
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
            let Ok(resp) = grpc
                .streaming(
                    tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                    path,
                    Codec::<WatchRequest, WatchResponse>::default(),
                )
                .await
            else {
                return;
            };
            let mut inbound = resp.into_inner();
            while let Ok(Some(r)) = inbound.message().await {
                if r.created {
                    drop(permit.take());
                    let _ = created_tx.send(());
                }
                for e in r.events {
                    let rev = e.kv.map(|kv| kv.mod_revision).unwrap_or(0);
                    let _ = seen_tx.send((rev, Instant::now()));
                }
            }
            drop(tx);
        });
    }
    let mut created = 0;
    while created < m {
        match tokio::time::timeout(Duration::from_secs(60), created_rx.recv()).await {
            Ok(Some(())) => created += 1,
            _ => break,
        }
    }
    let open = opened.elapsed();
    let mut figures = Figures {
        watchers: created,
        open,
        ..Default::default()
    };
    let Ok(ch) = channel(etcd.client).await else {
        return figures;
    };
    let pid = etcd.child.id();
    let cpu0 = crate::proc_cpu(pid);
    for c in 0..changes {
        let value = vec![b'a' + (c % 26) as u8; 650];
        let at = Instant::now();
        let Ok(rev) = put(ch.clone(), KEY, value).await else {
            break;
        };
        let mut got = 0;
        while got < created {
            match tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await {
                Ok(Some((r, t))) if r == rev => {
                    figures.delivery.push(t.saturating_duration_since(at));
                    got += 1;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    figures.cpu_per_change = (crate::proc_cpu(pid).saturating_sub(cpu0)) / changes.max(1) as u32;
    figures
}
