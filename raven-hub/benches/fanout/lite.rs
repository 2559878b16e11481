//! What a simulated agent decodes of the hub's answers: the `SyncResponse`
//! and `Update` envelopes as `raven.v1` defines them, each resource's name
//! and version, and its body kept as the raw bytes of its message — the
//! same wire (the mirror types below have the fields and tags of
//! `proto/raven/v1/sync.proto` and `resources.proto`), without building a
//! decoded model of every gateway of a 663 KB snapshot. Updates arrive raw
//! ([`RawCodec`]), so the bench counts exactly the bytes received, and
//! [`check_mirror`] proves the mirror against the full `raven.v1` decoding
//! of a real Update once per run.

use prost::Message;
use prost::bytes::{Buf, Bytes};
use raven_proto::v1;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// `raven.v1.SyncResponse` with the Update decoded as [`Update`].
#[derive(Clone, PartialEq, Message)]
pub struct SyncResponse {
    #[prost(oneof = "Resp", tags = "1, 2, 3")]
    pub message: Option<Resp>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Resp {
    #[prost(message, tag = "1")]
    Update(Update),
    #[prost(message, tag = "2")]
    Heartbeat(v1::Heartbeat),
    #[prost(message, tag = "3")]
    InventoryRequest(v1::InventoryRequest),
}

/// `raven.v1.Update`, field for field.
#[derive(Clone, PartialEq, Message)]
pub struct Update {
    #[prost(string, tag = "1")]
    pub epoch: String,
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    #[prost(string, tag = "3")]
    pub nonce: String,
    #[prost(bool, tag = "4")]
    pub snapshot: bool,
    #[prost(bool, tag = "5")]
    pub snapshot_complete: bool,
    #[prost(message, repeated, tag = "6")]
    pub resources: Vec<Resource>,
    #[prost(string, repeated, tag = "7")]
    pub removed: Vec<String>,
    #[prost(bool, tag = "8")]
    pub intentional_removal: bool,
}

/// `raven.v1.Resource`: name, version, and the body's message undecoded.
#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    /// The name's bytes as they arrived (a slice of the message: no
    /// allocation per resource); see [`Resource::name`].
    #[prost(bytes = "bytes", tag = "1")]
    pub name: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub version: Bytes,
    #[prost(oneof = "Body", tags = "3, 4, 5, 6, 7")]
    pub body: Option<Body>,
}

impl Resource {
    /// The name (a `string` on the wire: [`check`] refuses one that is not
    /// UTF-8).
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name).unwrap_or("\u{fffd}")
    }

    pub fn version(&self) -> &str {
        std::str::from_utf8(&self.version).unwrap_or("\u{fffd}")
    }
}

/// The body oneof of `raven.v1.Resource` (settings, gateway, node, peer,
/// prefixes), each kept as its encoded message.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(bytes = "bytes", tag = "3")]
    Settings(Bytes),
    #[prost(bytes = "bytes", tag = "4")]
    Gateway(Bytes),
    #[prost(bytes = "bytes", tag = "5")]
    Node(Bytes),
    #[prost(bytes = "bytes", tag = "6")]
    Peer(Bytes),
    #[prost(bytes = "bytes", tag = "7")]
    Prefixes(Bytes),
}

impl Body {
    /// The kind a resource of this body must be named after.
    fn kind(&self) -> &'static str {
        match self {
            Self::Settings(_) => "settings",
            Self::Gateway(_) => "gateway/",
            Self::Node(_) => "node/",
            Self::Peer(_) => "peer/",
            Self::Prefixes(_) => "prefixes/",
        }
    }
}

/// What is wrong with an Update (the agent ends its stream, as
/// raven-edge NACKs: the bench reports it and fails).
pub fn check(u: &Update) -> Result<(), String> {
    let mut last: Option<&str> = None;
    for r in &u.resources {
        if std::str::from_utf8(&r.name).is_err() || std::str::from_utf8(&r.version).is_err() {
            return Err(format!(
                "resource {:?}: name or version is not UTF-8",
                r.name
            ));
        }
        if last.is_some_and(|l| l >= r.name()) {
            return Err(format!(
                "resources not sorted by name or listed twice at {:?}",
                r.name()
            ));
        }
        last = Some(r.name());
        let Some(body) = &r.body else {
            return Err(format!("resource {} has no body", r.name()));
        };
        if !r.name().starts_with(body.kind()) {
            return Err(format!(
                "resource {} carries a {} body",
                r.name(),
                body.kind()
            ));
        }
        if r.version.len() != 16
            || !r
                .version
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(format!(
                "resource {}: version {:?} is not 16 lower-case hex digits",
                r.name(),
                r.version()
            ));
        }
    }
    if let Some(n) = u.removed.iter().find(|n| {
        u.resources
            .binary_search_by(|r| r.name().cmp(n.as_str()))
            .is_ok()
    }) {
        return Err(format!("{n} is both sent and removed"));
    }
    if u.snapshot_complete && !u.snapshot {
        return Err("snapshot_complete without snapshot".into());
    }
    Ok(())
}

/// The mirror decodes `raw` (a real `SyncResponse` from the hub) to what
/// the full `raven.v1` decoding says: the same envelope, the same
/// resources in the same order with the same names, versions and bodies,
/// and it re-encodes to the same bytes.
pub fn check_mirror(raw: &Bytes) -> Result<(), String> {
    let full = v1::SyncResponse::decode(raw.clone()).map_err(|e| e.to_string())?;
    let lite = SyncResponse::decode(raw.clone()).map_err(|e| e.to_string())?;
    if lite.encode_to_vec() != raw.as_ref() {
        return Err("the mirror does not re-encode to the bytes received".into());
    }
    let (Some(v1::sync_response::Message::Update(f)), Some(Resp::Update(l))) =
        (full.message, lite.message)
    else {
        return Ok(());
    };
    let same_envelope = (
        &f.epoch,
        f.revision,
        &f.nonce,
        f.snapshot,
        f.snapshot_complete,
        &f.removed,
        f.intentional_removal,
    ) == (
        &l.epoch,
        l.revision,
        &l.nonce,
        l.snapshot,
        l.snapshot_complete,
        &l.removed,
        l.intentional_removal,
    );
    if !same_envelope || f.resources.len() != l.resources.len() {
        return Err("the mirror's Update envelope differs from raven.v1's".into());
    }
    for (f, l) in f.resources.iter().zip(&l.resources) {
        use v1::resource::Body as F;
        let full_body = match &f.body {
            Some(F::Settings(b)) => b.encode_to_vec(),
            Some(F::Gateway(b)) => b.encode_to_vec(),
            Some(F::Node(b)) => b.encode_to_vec(),
            Some(F::Peer(b)) => b.encode_to_vec(),
            Some(F::Prefixes(b)) => b.encode_to_vec(),
            None => Vec::new(),
        };
        let lite_body = match &l.body {
            Some(
                Body::Settings(b)
                | Body::Gateway(b)
                | Body::Node(b)
                | Body::Peer(b)
                | Body::Prefixes(b),
            ) => b.to_vec(),
            None => Vec::new(),
        };
        if f.name != l.name() || f.version != l.version() || full_body != lite_body {
            return Err(format!("resource {} differs from raven.v1's", f.name));
        }
    }
    Ok(())
}

/// Encodes `raven.v1.SyncRequest` as tonic's prost codec does; hands each
/// response over as its raw bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawCodec;

#[derive(Debug, Default, Clone, Copy)]
pub struct RequestEncoder;

#[derive(Debug, Default, Clone, Copy)]
pub struct RawDecoder;

impl Encoder for RequestEncoder {
    type Item = v1::SyncRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a SyncRequest: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = v1::SyncRequest;
    type Decode = Bytes;
    type Encoder = RequestEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}
