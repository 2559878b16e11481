//! A minimal SPDY/3.1 server connection, as much of the protocol as
//! Kubernetes' streaming clients use (`k8s.io/apimachinery`'s
//! `httpstream/spdy` on top of `spdystream`): what a kubelet speaks after it
//! answers `Upgrade: SPDY/3.1` with `101` for `exec`, `attach` and
//! `portForward`.
//!
//! * Frames: SYN_STREAM (the client opens every stream; each is answered
//!   with SYN_REPLY at once, which the client waits for), DATA both ways
//!   with FIN for half-close, RST_STREAM, PING (echoed), GOAWAY; SETTINGS,
//!   HEADERS and WINDOW_UPDATE are read and ignored (`spdystream` does no
//!   flow control either).
//! * Header blocks are one zlib stream per direction with the SPDY/3
//!   dictionary; every block (SYN_STREAM, SYN_REPLY, HEADERS) goes through
//!   it in order, so the inflater stays in step with the client's deflater.
//!
//! [`accept`] starts the reader and writer tasks and hands over each stream
//! the client opens, with its headers, as a [`Stream`].

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL.
const CANCEL: u32 = 5;
/// Largest DATA payload sent in one frame.
const MAX_DATA: usize = 32 << 10;

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// section 2.6.10.1; Adler-32 0xe3c6a7c2).
const DICTIONARY: &[u8] = b"\
    \x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\
    \x00\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-char\
    set\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-\
    ranges\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\
    \x0dcache-control\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10c\
    ontent-encoding\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\
    \x00\x10content-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\
    \x00\x0ccontent-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\
    \x00\x00\x07expires\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\
    \x00\x00\x11if-modified-since\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\
    \x00\x00\x13if-unmodified-since\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\
    \x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\
    \x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0br\
    etry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\
    \x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04va\
    ry\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\
    \x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200\x20OK\x00\x00\x00\
    \x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\
    \x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin10010120120220520630030230\
    3304305306307402405406407408409410411412413414415416417502504505203\x20Non-Authoritative\
    \x20Information204\x20No\x20Content301\x20Moved\x20Permanently400\x20Bad\x20Request401\
    \x20Unauthorized403\x20Forbidden404\x20Not\x20Found500\x20Internal\x20Server\x20Error501\
    \x20Not\x20Implemented503\x20Service\x20UnavailableJan\x20Feb\x20Mar\x20Apr\x20May\x20Ju\
    n\x20Jul\x20Aug\x20Sept\x20Oct\x20Nov\x20Dec\x2000:00:00\x20Mon,\x20Tue,\x20Wed,\x20Thu,\
    \x20Fri,\x20Sat,\x20Sun,\x20GMTchunked,text/html,image/png,image/jpg,image/gif,applicati\
    on/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflat\
    e,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// Headers of a stream: lower-case names, each with its values.
pub type Headers = BTreeMap<String, Vec<String>>;

/// What the writer task sends.
#[derive(Debug)]
enum Out {
    Reply(u32),
    Data { id: u32, data: Bytes, fin: bool },
    Reset(u32),
    Ping(u32),
}

/// The sending half of a stream.
#[derive(Debug, Clone)]
pub struct Sender {
    id: u32,
    out: mpsc::UnboundedSender<Out>,
}

impl Sender {
    /// Sends `data` (in frames of at most 32 KiB).
    pub fn send(&self, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(MAX_DATA) {
            self.out
                .send(Out::Data {
                    id: self.id,
                    data: Bytes::copy_from_slice(chunk),
                    fin: false,
                })
                .map_err(|_| std::io::Error::other("SPDY connection closed"))?;
        }
        Ok(())
    }

    /// Half-closes the stream (an empty DATA frame with FIN).
    pub fn close(&self) -> std::io::Result<()> {
        self.out
            .send(Out::Data {
                id: self.id,
                data: Bytes::new(),
                fin: true,
            })
            .map_err(|_| std::io::Error::other("SPDY connection closed"))
    }

    /// Resets the stream.
    pub fn reset(&self) {
        let _ = self.out.send(Out::Reset(self.id));
    }
}

/// One stream the client opened.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub tx: Sender,
    /// DATA from the client; closed at its FIN (or RST_STREAM).
    pub rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Stream {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A server-side SPDY connection: the streams the client opens, in order.
#[derive(Debug)]
pub struct Conn {
    pub streams: mpsc::UnboundedReceiver<Stream>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    reader: tokio::task::JoinHandle<std::io::Result<()>>,
    out: mpsc::UnboundedSender<Out>,
}

/// Starts serving SPDY/3.1 on `io` (after the `101`).
pub fn accept<IO>(io: IO) -> Conn
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (streams_tx, streams_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(w, out_rx));
    let reader = tokio::spawn(read_frames(r, out_tx.clone(), streams_tx));
    Conn {
        streams: streams_rx,
        writer,
        reader,
        out: out_tx,
    }
}

impl Conn {
    /// Waits until the client ends the connection (GOAWAY or EOF), at most
    /// `limit`, after everything queued was written; then closes it.
    pub async fn finish(self, limit: std::time::Duration) -> std::io::Result<()> {
        let Conn {
            streams,
            writer,
            mut reader,
            out,
        } = self;
        drop((out, streams));
        if tokio::time::timeout(limit, &mut reader).await.is_err() {
            // The reader holds a sender of the writer's queue.
            reader.abort();
        }
        match tokio::time::timeout(limit, writer).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other("SPDY writer did not finish")),
        }
    }
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    let len = payload.len() as u32;
    f.push(flags);
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

/// Deflates one header block onto the connection's zlib stream.
fn compress_headers(z: &mut Compress, headers: &[(&str, &str)]) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (k, v) in headers {
        raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
        raw.extend_from_slice(k.as_bytes());
        raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
        raw.extend_from_slice(v.as_bytes());
    }
    let mut out = Vec::with_capacity(raw.len() + 64);
    let mut at = 0;
    loop {
        let before = z.total_in();
        z.compress_vec(&raw[at..], &mut out, FlushCompress::Sync)
            .map_err(std::io::Error::other)?;
        at += (z.total_in() - before) as usize;
        // Done when all input is in and the flush fitted.
        if at == raw.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(64));
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut out: mpsc::UnboundedReceiver<Out>,
) -> std::io::Result<()> {
    let mut z = Compress::new(Compression::default(), true);
    z.set_dictionary(DICTIONARY)
        .map_err(std::io::Error::other)?;
    let mut buf = Vec::new();
    while let Some(first) = out.recv().await {
        buf.clear();
        let mut next = Some(first);
        // Everything queued goes out in one write.
        while let Some(o) = next {
            match o {
                Out::Reply(id) => {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend(compress_headers(&mut z, &[])?);
                    buf.extend(control(SYN_REPLY, 0, &p));
                }
                Out::Data { id, data, fin } => {
                    buf.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                    buf.push(if fin { FLAG_FIN } else { 0 });
                    buf.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
                    buf.extend_from_slice(&data);
                }
                Out::Reset(id) => {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(&CANCEL.to_be_bytes());
                    buf.extend(control(RST_STREAM, 0, &p));
                }
                Out::Ping(id) => buf.extend(control(PING, 0, &id.to_be_bytes())),
            }
            next = out.try_recv().ok();
        }
        w.write_all(&buf).await?;
        w.flush().await?;
    }
    w.shutdown().await
}

/// Inflates one header block from the connection's zlib stream.
fn decompress_headers(z: &mut Decompress, block: &[u8]) -> std::io::Result<Headers> {
    let mut raw = Vec::with_capacity(block.len() * 4 + 64);
    let mut at = 0;
    loop {
        let before = z.total_in();
        match z.decompress_vec(&block[at..], &mut raw, FlushDecompress::Sync) {
            Ok(_) => {}
            Err(e) if e.needs_dictionary().is_some() => {
                z.set_dictionary(DICTIONARY)
                    .map_err(std::io::Error::other)?;
            }
            Err(e) => return Err(std::io::Error::other(format!("SPDY header block: {e}"))),
        }
        at += (z.total_in() - before) as usize;
        if at == block.len() && raw.len() < raw.capacity() {
            break;
        }
        raw.reserve(raw.capacity().max(256));
    }
    parse_headers(&raw)
}

fn parse_headers(raw: &[u8]) -> std::io::Result<Headers> {
    let bad = || std::io::Error::other("SPDY header block is truncated");
    let mut at = 0usize;
    let u32_at = |at: &mut usize| -> std::io::Result<usize> {
        let b = raw.get(*at..*at + 4).ok_or_else(bad)?;
        *at += 4;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = u32_at(&mut at)?;
    let mut out = Headers::new();
    for _ in 0..n {
        let len = u32_at(&mut at)?;
        let name = raw.get(at..at + len).ok_or_else(bad)?;
        at += len;
        let len = u32_at(&mut at)?;
        let value = raw.get(at..at + len).ok_or_else(bad)?;
        at += len;
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        // Several values of one name are NUL-separated.
        let values = value
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        out.entry(name).or_default().extend(values);
    }
    Ok(out)
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut r: R,
    out: mpsc::UnboundedSender<Out>,
    streams: mpsc::UnboundedSender<Stream>,
) -> std::io::Result<()> {
    let mut z = Decompress::new(true);
    let mut open: HashMap<u32, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    loop {
        let mut head = [0u8; 8];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if word & 0x8000_0000 == 0 {
            // DATA.
            let id = word & 0x7fff_ffff;
            if let Some(tx) = open.get(&id)
                && !payload.is_empty()
            {
                let _ = tx.send(Bytes::from(payload));
            }
            if flags & FLAG_FIN != 0 {
                open.remove(&id);
            }
            continue;
        }
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(std::io::Error::other(format!(
                "SPDY version {version}, not 3"
            )));
        }
        let id_at = |p: &[u8]| -> std::io::Result<u32> {
            p.get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                .ok_or_else(|| std::io::Error::other("short SPDY control frame"))
        };
        match (word & 0xffff) as u16 {
            SYN_STREAM => {
                let id = id_at(&payload)?;
                let headers = decompress_headers(&mut z, payload.get(10..).unwrap_or_default())?;
                let (tx, rx) = mpsc::unbounded_channel();
                if flags & FLAG_FIN == 0 {
                    open.insert(id, tx);
                }
                let _ = out.send(Out::Reply(id));
                let _ = streams.send(Stream {
                    id,
                    headers,
                    tx: Sender {
                        id,
                        out: out.clone(),
                    },
                    rx,
                });
            }
            SYN_REPLY | HEADERS => {
                // Kept in step with the client's deflater; nothing to act on.
                decompress_headers(&mut z, payload.get(4..).unwrap_or_default())?;
            }
            RST_STREAM => {
                open.remove(&id_at(&payload)?);
            }
            PING => {
                let _ = out.send(Out::Ping(id_at(&payload)?));
            }
            GOAWAY => return Ok(()),
            // SETTINGS, NOOP, WINDOW_UPDATE, CREDENTIAL.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        let (mut a, mut b) = (1u32, 0u32);
        for x in DICTIONARY {
            a = (a + u32::from(*x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_survive_a_shared_zlib_stream_with_the_dictionary() {
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(DICTIONARY).expect("dict");
        let mut d = Decompress::new(true);
        for round in 0..3 {
            let port = format!("{}", 8000 + round);
            let block = compress_headers(&mut c, &[("streamtype", "data"), ("port", &port)])
                .expect("deflate");
            let h = decompress_headers(&mut d, &block).expect("inflate");
            assert_eq!(h.get("streamtype"), Some(&vec!["data".to_owned()]));
            assert_eq!(h.get("port"), Some(&vec![port]));
        }
    }
}
