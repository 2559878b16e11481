//! The cross-platform WireGuard UAPI (`/var/run/wireguard/<dev>.sock`), as
//! spoken by wireguard-go: `get=1` lists the device, `set=1` changes it.
//! Keys are hex on the socket; every exchange ends with an empty line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Directory of UAPI sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// A peer as the device reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    pub keepalive: u16,
    pub last_handshake_sec: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as it reports itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub private_key_hex: String,
    pub listen_port: u16,
    /// By public key (hex).
    pub peers: BTreeMap<String, PeerState>,
}

#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("WireGuard UAPI {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("WireGuard UAPI {path}: the device answered errno={errno}")]
    Errno { path: PathBuf, errno: i32 },
}

pub fn socket_path(dev: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{dev}.sock"))
}

async fn exchange(dev: &str, request: &str) -> Result<Vec<String>, UapiError> {
    let path = socket_path(dev);
    let io = |source| UapiError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&path).await.map_err(io)?;
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(stream).lines();
    let mut out = Vec::new();
    // The reply ends with a blank line and the connection stays open.
    while let Some(line) = lines.next_line().await.map_err(io)? {
        if line.is_empty() {
            break;
        }
        out.push(line);
    }
    if let Some(e) = out.iter().find_map(|l| l.strip_prefix("errno=")) {
        let errno = e.parse().unwrap_or(-1);
        if errno != 0 {
            return Err(UapiError::Errno { path, errno });
        }
    }
    Ok(out)
}

/// Reads the device.
pub async fn get(dev: &str) -> Result<DeviceState, UapiError> {
    let lines = exchange(dev, "get=1\n\n").await?;
    let mut d = DeviceState::default();
    let mut current: Option<(String, PeerState)> = None;
    for line in lines {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "private_key" => d.private_key_hex = v.to_owned(),
            "listen_port" => d.listen_port = v.parse().unwrap_or(0),
            "public_key" => {
                if let Some((key, p)) = current.take() {
                    d.peers.insert(key, p);
                }
                current = Some((v.to_owned(), PeerState::default()));
            }
            _ => {
                if let Some((_, p)) = &mut current {
                    match k {
                        "endpoint" => p.endpoint = v.parse().ok(),
                        "allowed_ip" => p.allowed_ips.push(v.to_owned()),
                        "persistent_keepalive_interval" => p.keepalive = v.parse().unwrap_or(0),
                        "last_handshake_time_sec" => p.last_handshake_sec = v.parse().unwrap_or(0),
                        "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                        "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some((key, p)) = current {
        d.peers.insert(key, p);
    }
    Ok(d)
}

/// Applies a `set=1` body (without the `set=1` line and final blank line).
pub async fn set(dev: &str, body: &str) -> Result<(), UapiError> {
    exchange(dev, &format!("set=1\n{body}\n")).await.map(|_| ())
}
