//! The HTTP CONNECT side, as kube-apiserver's egress selector speaks it
//! (`tunnelHTTPConnect` in `k8s.io/apiserver/pkg/server/egressselector`):
//!
//! ```text
//! CONNECT <host>:<port> HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n
//! ```
//!
//! then `http.ReadResponse`; anything but 200 fails the dial with the
//! status line in the error, and bytes buffered after the response head
//! are an error too, so the answer is the head alone and the tunnel's
//! bytes start only when the client speaks (TLS: the client speaks first).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::route::Refusal;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 << 10;

/// Reads one request head and returns the CONNECT target. Reads byte by
/// byte up to the blank line, so nothing the client sends after it is
/// consumed here.
pub async fn read_connect<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, Refusal> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Err(Refusal::new(431, "request head too large"));
        }
        match r.read(&mut byte).await {
            Ok(0) | Err(_) => {
                return Err(Refusal::new(400, "connection closed in the request head"));
            }
            Ok(_) => head.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some(v)) if v.starts_with("HTTP/1.") => {
            Ok(target.to_owned())
        }
        (Some(m), ..) if m != "CONNECT" => Err(Refusal::new(
            405,
            format!("only CONNECT is served here, not {m}"),
        )),
        _ => Err(Refusal::new(400, format!("bad request line {line:?}"))),
    }
}

/// Sends `200 Connection established` and nothing else.
pub async fn established<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    w.flush().await
}

/// Sends a refusal: its reason as the status line's phrase (what the
/// egress dialer reports) and as the body.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, why: &Refusal) -> std::io::Result<()> {
    let reason: String = why
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = format!("{reason}\n");
    let msg = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        why.status,
        body.len()
    );
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_egress_selectors_request_yields_its_target_and_leaves_what_follows() {
        let sent = b"CONNECT izbp15inok0kbfkg3in52rz:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\x16\x03\x01";
        let mut r = &sent[..];
        assert_eq!(
            read_connect(&mut r).await.as_deref(),
            Ok("izbp15inok0kbfkg3in52rz:10250")
        );
        assert_eq!(r, b"\x16\x03\x01");
        let mut get = &b"GET / HTTP/1.1\r\n\r\n"[..];
        assert_eq!(
            read_connect(&mut get).await.expect_err("refused").status,
            405
        );
    }

    #[tokio::test]
    async fn a_refusal_carries_its_reason_in_the_status_line() {
        let mut out = Vec::new();
        refuse(&mut out, &Refusal::new(403, "port 22 of n1 is not proxied"))
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 403 port 22 of n1 is not proxied\r\n"),
            "{text}"
        );
    }
}
