//! One byte stream carried by one HTTP/2 stream, both ways.
//!
//! * Half-close: end of input on one side ends the HTTP/2 stream in that
//!   direction (END_STREAM), which shuts down the writing half of the other
//!   side's socket; the other direction goes on until it ends too.
//! * Flow control: received data is released to the peer's window only once
//!   written to the socket, and data is sent only as the peer's window
//!   allows, so a reader that stops reading stalls its own stream and no
//!   other (each stream's window is much smaller than the connection's).

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Initial window of one stream.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// Initial window of a tunnel connection: room for many stalled streams.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame payload.
pub const MAX_FRAME: u32 = 256 << 10;
/// Largest read from a socket at a time.
const READ_CHUNK: usize = 128 << 10;

/// Byte counts of one piped stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Piped {
    pub up: u64,
    pub down: u64,
}

/// Copies `io` to `send` and `recv` to `io` until both directions ended.
pub async fn pipe<IO>(io: IO, send: SendStream<Bytes>, recv: RecvStream) -> std::io::Result<Piped>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(io);
    // A failure either way (a reset stream, a dead socket) ends both.
    let (up, down) = tokio::try_join!(socket_to_stream(r, send), stream_to_socket(recv, w))?;
    Ok(Piped { up, down })
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("h2"))
    } else {
        std::io::Error::other(e)
    }
}

async fn socket_to_stream<R: AsyncRead + Unpin>(
    mut r: R,
    mut send: SendStream<Bytes>,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        let n = match r.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(std::io::Error::other("the stream was reset")),
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut w: W,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        w.write_all(&data).await?;
        total += data.len() as u64;
        // Only now may the peer send more on this stream.
        let _ = recv.flow_control().release_capacity(data.len());
    }
    w.shutdown().await?;
    Ok(total)
}
