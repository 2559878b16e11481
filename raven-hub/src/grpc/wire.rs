//! The `Sync` service on the wire, without a per-stream copy of each
//! Update.
//!
//! tonic's generated server encodes every response into one buffer per
//! stream and keeps that buffer: after a first snapshot of hundreds of KB
//! (every gateway and peer for a tunnel candidate) each stream held an
//! allocation that large for its whole life, the largest part of the hub's
//! memory per agent. This server decodes requests with tonic as before
//! ([`Streaming`]) and hands them to the same [`SyncService`]
//! implementation, but writes each [`EncodedSyncResponse`] as gRPC frames
//! in pieces of about [`PIECE`] bytes ([`EncodedSyncResponse::write_some`]),
//! each freed once HTTP/2 has sent it: what a stream keeps is bounded by
//! one piece, whatever the size of its Updates. The bytes on the wire are
//! the same as tonic's (length-prefixed messages, `grpc-status` trailers).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body::Frame;
use raven_proto::EncodedSyncResponse;
use raven_proto::wire::sync_service_server::SyncService;
use tonic::Status;
use tonic::codec::{Codec, Streaming};
use tonic::server::NamedService;

use super::Sync;

/// About how many bytes of an Update one HTTP/2 DATA frame carries.
pub const PIECE: usize = 16 * 1024;

/// Largest request message accepted (tonic's default).
const MAX_DECODING: usize = 4 * 1024 * 1024;

const SYNC_PATH: &str = "/raven.v1.SyncService/Sync";

/// The `raven.v1.SyncService` server (see the module docs).
#[derive(Debug, Clone)]
pub struct SyncServer(pub Sync);

impl NamedService for SyncServer {
    const NAME: &'static str = "raven.v1.SyncService";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<B> tower_service::Service<http::Request<B>> for SyncServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + std::marker::Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sync = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != SYNC_PATH {
                return Ok(Status::unimplemented(format!(
                    "no method {} in raven.v1.SyncService",
                    req.uri().path()
                ))
                .into_http());
            }
            // No compression is offered, so a compressed request is refused
            // (as tonic's server does).
            if req
                .headers()
                .get("grpc-encoding")
                .is_some_and(|e| e.as_bytes() != b"identity")
            {
                return Ok(Status::unimplemented(
                    "request compression is not supported; send identity",
                )
                .into_http());
            }
            let mut codec = tonic_prost::ProstCodec::<
                EncodedSyncResponse,
                raven_proto::v1::SyncRequest,
            >::default();
            let req = req.map(|body| {
                Streaming::new_request(SmallBuffer(codec.decoder()), body, None, Some(MAX_DECODING))
            });
            let response = match sync.sync(tonic::Request::from_http(req)).await {
                Ok(r) => r,
                Err(status) => return Ok(status.into_http()),
            };
            let (metadata, stream, _) = response.into_parts();
            let mut http = http::Response::new(tonic::body::Body::new(Pieces {
                stream,
                current: None,
                done: false,
            }));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(http)
        })
    }
}

/// Bytes a stream's request decoder starts with (tonic's default is 8 KB,
/// kept for the stream's life: 8 KB per connected agent). An agent's
/// messages after its Hello are Acks (≈ 60 B), Applied, heartbeats and
/// Reports (a tunnel candidate's ≈ 150 B); the buffer grows for a larger
/// one.
pub const DECODE_BUFFER: usize = 256;

/// A decoder whose stream buffer starts at [`DECODE_BUFFER`] bytes.
struct SmallBuffer<D>(D);

impl<D: tonic::codec::Decoder> tonic::codec::Decoder for SmallBuffer<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        // 32 KB: tonic's default yield threshold (it applies to encoding).
        tonic::codec::BufferSettings::new(DECODE_BUFFER, 32 * 1024)
    }
}

/// The message being written and where it is.
struct Writing {
    message: EncodedSyncResponse,
    next: usize,
}

/// A stream of responses as an HTTP/2 body of bounded pieces.
struct Pieces<S> {
    stream: S,
    current: Option<Writing>,
    done: bool,
}

impl<S> http_body::Body for Pieces<S>
where
    S: Stream<Item = Result<EncodedSyncResponse, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let mut piece = BytesMut::new();
        if this.current.is_none() {
            match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(message)) => {
                    let len = prost::Message::encoded_len(&message);
                    let Ok(len32) = u32::try_from(len) else {
                        this.done = true;
                        return Poll::Ready(Some(Ok(trailers(&Status::resource_exhausted(
                            format!("an Update of {len} bytes is over gRPC's 4 GiB limit"),
                        )))));
                    };
                    piece.reserve(5 + len.min(PIECE));
                    piece.put_u8(0);
                    piece.put_u32(len32);
                    this.current = Some(Writing { message, next: 0 });
                }
                Some(Err(status)) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(trailers(&status))));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(trailers(&Status::ok("")))));
                }
            }
        }
        if let Some(w) = &mut this.current
            && w.message.write_some(&mut w.next, &mut piece, PIECE)
        {
            this.current = None;
        }
        Poll::Ready(Some(Ok(Frame::data(piece.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The `grpc-status` trailers of `status`.
fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut headers) {
        tracing::warn!(error = %e, "could not encode a gRPC status; ending the stream INTERNAL");
        headers.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    Frame::trailers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use raven_proto::{EncodedResource, UpdateHeader, v1};

    /// Polls `body` to its end: its data frames and its trailers.
    fn drain(
        mut body: Pieces<
            futures::stream::Iter<std::vec::IntoIter<Result<EncodedSyncResponse, Status>>>,
        >,
    ) -> (Vec<Bytes>, http::HeaderMap) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            let frame = frame.unwrap_or_else(|s| panic!("{s}"));
            match frame.into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        (data, trailers.unwrap_or_default())
    }

    fn resource(i: usize) -> EncodedResource {
        EncodedResource::from_proto(&v1::Resource {
            name: format!("peer/n{i}"),
            version: format!("{i:016x}"),
            ..Default::default()
        })
    }

    #[test]
    fn a_large_update_is_written_in_bounded_pieces_with_the_bytes_tonic_writes() {
        let resources: Vec<EncodedResource> = (0..20_000).map(resource).collect();
        let header = UpdateHeader {
            epoch: "e".into(),
            revision: 7,
            nonce: "7-1".into(),
            snapshot: true,
            snapshot_complete: true,
            removed: vec![],
            intentional_removal: false,
        };
        let update = EncodedSyncResponse::update(header, resources.iter());
        let beat = EncodedSyncResponse::heartbeat(v1::Heartbeat::default());
        let len = prost::Message::encoded_len(&update);
        assert!(
            len > 20 * PIECE,
            "the Update must span many pieces ({len} bytes)"
        );
        let body = Pieces {
            stream: futures::stream::iter(vec![Ok(update.clone()), Ok(beat.clone())]),
            current: None,
            done: false,
        };
        let (data, trailers) = drain(body);
        let largest = data.iter().map(Bytes::len).max().unwrap_or(0);
        let part = resources
            .iter()
            .map(EncodedResource::len)
            .max()
            .unwrap_or(0)
            + 16;
        assert!(largest <= PIECE + part, "a piece of {largest} bytes");
        // The same bytes as gRPC length-prefixed messages.
        let mut expected = Vec::new();
        for m in [&update, &beat] {
            let bytes = prost::Message::encode_to_vec(m);
            expected.push(0u8);
            expected.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            expected.extend_from_slice(&bytes);
        }
        assert_eq!(data.concat(), expected);
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }

    #[test]
    fn a_session_error_ends_the_body_with_its_status_in_the_trailers() {
        let body = Pieces {
            stream: futures::stream::iter(vec![
                Ok(EncodedSyncResponse::heartbeat(v1::Heartbeat::default())),
                Err(Status::resource_exhausted("busy")),
            ]),
            current: None,
            done: false,
        };
        let (data, trailers) = drain(body);
        assert_eq!(data.len(), 1);
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"8"[..])
        );
        assert_eq!(
            trailers.get("grpc-message").map(|v| v.as_bytes()),
            Some(&b"busy"[..])
        );
    }
}
