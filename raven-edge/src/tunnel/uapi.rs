//! The cross-platform WireGuard UAPI (`/var/run/wireguard/<dev>.sock`), as
//! spoken by wireguard-go: `get=1` lists the device, `set=1` changes it.
//! Keys are hex on the socket; every exchange ends with an empty line.
//! Read into a typed [`DeviceState`]; written from a [`Change`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::change::Change;
use super::keys::{Key, Secret};

/// Directory of UAPI sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// A peer as the device reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: u16,
    pub last_handshake_sec: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as it reports itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// `None`: the device has no private key yet.
    pub private_key: Option<Secret>,
    pub listen_port: u16,
    pub peers: BTreeMap<Key, PeerState>,
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
    Ok(parse_get(&exchange(dev, "get=1\n\n").await?))
}

/// The device a `get=1` reply describes (keys in hex). Lines raven does
/// not use, and values that do not parse, are skipped. Pure.
pub fn parse_get(lines: &[String]) -> DeviceState {
    let mut d = DeviceState::default();
    let mut current: Option<(Key, PeerState)> = None;
    for line in lines {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "private_key" => d.private_key = Key::from_hex(v).map(Secret),
            "listen_port" => d.listen_port = v.parse().unwrap_or(0),
            "public_key" => {
                if let Some((key, p)) = current.take() {
                    d.peers.insert(key, p);
                }
                current = Key::from_hex(v).map(|k| (k, PeerState::default()));
            }
            _ => {
                if let Some((_, p)) = &mut current {
                    match k {
                        "endpoint" => p.endpoint = v.parse().ok(),
                        "allowed_ip" => p.allowed_ips.extend(v.parse::<IpNet>().ok()),
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
    d
}

/// Applies `change` as one `set=1` request.
pub async fn set(dev: &str, change: &Change) -> Result<(), UapiError> {
    exchange(dev, &format!("set=1\n{}\n", change.to_uapi()))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_reply_reads_into_typed_keys_and_prefixes() {
        let lines: Vec<String> = [
            format!("private_key={}", "01".repeat(32)),
            "listen_port=4500".to_owned(),
            format!("public_key={}", "02".repeat(32)),
            "endpoint=198.51.100.1:4500".to_owned(),
            "allowed_ip=10.1.0.0/24".to_owned(),
            "allowed_ip=fd00::/64".to_owned(),
            "persistent_keepalive_interval=25".to_owned(),
            "last_handshake_time_sec=1700000000".to_owned(),
            "rx_bytes=7".to_owned(),
            "errno=0".to_owned(),
        ]
        .into();
        let d = parse_get(&lines);
        assert_eq!(d.private_key, Some(Secret(Key([1; 32]))));
        assert_eq!(d.listen_port, 4500);
        let p = &d.peers[&Key([2; 32])];
        assert_eq!(
            p.allowed_ips,
            vec![
                "10.1.0.0/24"
                    .parse::<IpNet>()
                    .unwrap_or_else(|_| unreachable!()),
                "fd00::/64".parse().unwrap_or_else(|_| unreachable!())
            ]
        );
        assert_eq!(
            (p.keepalive, p.last_handshake_sec, p.rx_bytes),
            (25, 1_700_000_000, 7)
        );
        assert_eq!(p.endpoint, "198.51.100.1:4500".parse().ok());
    }
}
