//! Pre-encoded fan-out: the protocol's rule is that a resource shared by
//! many nodes' views is serialized once, and the same bytes are sent on
//! every stream that carries it.
//!
//! The hub turns each resource version into an [`EncodedResource`] once. An
//! [`EncodedSyncResponse`] for one agent is then a handful of small header
//! chunks around reference-counted resource bytes: building it copies no
//! resource, and encoding it on the stream copies each resource's bytes into
//! the HTTP/2 frame without re-serializing anything. The bytes are exactly
//! what prost produces for the equivalent [`v1::SyncResponse`], so the agent
//! decodes them with the ordinary generated client.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};
use raven_model::topology::{Resource, ResourceName};

use crate::convert::{UpdateHeader, resource_to_proto};
use crate::v1;

/// Field number of `update` in `SyncResponse`.
pub(crate) const SYNC_RESPONSE_UPDATE_FIELD: u32 = 1;
/// Field number of `resources` in `Update`.
pub(crate) const UPDATE_RESOURCES_FIELD: u32 = 6;

/// The prost encoding of one [`v1::Resource`], made once per resource version
/// and shared by every stream that sends it. Cloning shares the bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EncodedResource(Bytes);

impl EncodedResource {
    /// Encodes a named domain resource.
    pub fn new(name: &ResourceName, resource: &Resource) -> Self {
        Self::from_proto(&resource_to_proto(name, resource))
    }

    /// Encodes a resource already converted.
    pub fn from_proto(resource: &v1::Resource) -> Self {
        Self(Bytes::from(resource.encode_to_vec()))
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for EncodedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncodedResource({} bytes)", self.0.len())
    }
}

/// A `raven.v1.SyncResponse` held as encoded chunks. It implements
/// [`prost::Message`] by writing the chunks out, so the fan-out server
/// ([`crate::wire`]) streams it like any message.
///
/// Decoding into it (`merge`) keeps each field's raw bytes, which is exactly
/// protobuf's merge semantics; it exists so the `Message` contract holds, not
/// for use: clients decode [`v1::SyncResponse`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncodedSyncResponse {
    parts: Vec<Part>,
    /// Sum of the encoded lengths of `parts`.
    len: usize,
}

#[derive(Clone, PartialEq, Eq)]
enum Part {
    /// Bytes written as they are.
    Raw(Bytes),
    /// An encoded resource, written as field `Update.resources`.
    Resource(Bytes),
}

impl Part {
    fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::Raw(b) => buf.put_slice(b),
            Self::Resource(b) => {
                prost::encoding::encode_key(UPDATE_RESOURCES_FIELD, WireType::LengthDelimited, buf);
                prost::encoding::encode_varint(b.len() as u64, buf);
                buf.put_slice(b);
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Self::Raw(b) => b.len(),
            Self::Resource(b) => resource_field_len(b.len()),
        }
    }
}

fn resource_field_len(len: usize) -> usize {
    prost::encoding::key_len(UPDATE_RESOURCES_FIELD)
        + prost::encoding::encoded_len_varint(len as u64)
        + len
}

impl EncodedSyncResponse {
    /// A `SyncResponse { update }` with the given header and resources, in
    /// the order given (the hub sends them sorted by name). Equal to
    /// prost-encoding [`crate::update_to_proto`]`(&header, ..)` wrapped in a
    /// `SyncResponse`, byte for byte.
    pub fn update<'a>(
        header: UpdateHeader,
        resources: impl IntoIterator<Item = &'a EncodedResource>,
    ) -> Self {
        // prost writes fields in field-number order and leaves default values
        // out, so the Update is: fields 1-5, then each resource (field 6),
        // then fields 7-8. Encode the two header halves with prost itself.
        let head = v1::Update {
            epoch: header.epoch,
            revision: header.revision,
            nonce: header.nonce,
            snapshot: header.snapshot,
            snapshot_complete: header.snapshot_complete,
            ..Default::default()
        }
        .encode_to_vec();
        let tail = v1::Update {
            removed: header.removed.iter().map(ToString::to_string).collect(),
            intentional_removal: header.intentional_removal,
            ..Default::default()
        }
        .encode_to_vec();

        let resources: Vec<Part> = resources
            .into_iter()
            .map(|r| Part::Resource(r.0.clone()))
            .collect();
        let update_len =
            head.len() + resources.iter().map(Part::encoded_len).sum::<usize>() + tail.len();

        let mut prefix = Vec::with_capacity(
            prost::encoding::key_len(SYNC_RESPONSE_UPDATE_FIELD)
                + prost::encoding::encoded_len_varint(update_len as u64)
                + head.len(),
        );
        prost::encoding::encode_key(
            SYNC_RESPONSE_UPDATE_FIELD,
            WireType::LengthDelimited,
            &mut prefix,
        );
        prost::encoding::encode_varint(update_len as u64, &mut prefix);
        prefix.extend_from_slice(&head);

        let mut parts = Vec::with_capacity(resources.len() + 2);
        parts.push(Part::Raw(prefix.into()));
        parts.extend(resources);
        if !tail.is_empty() {
            parts.push(Part::Raw(tail.into()));
        }
        Self::from_parts(parts)
    }

    /// A `SyncResponse { heartbeat }`.
    pub fn heartbeat(heartbeat: v1::Heartbeat) -> Self {
        Self::from_message(&v1::SyncResponse {
            message: Some(v1::sync_response::Message::Heartbeat(heartbeat)),
        })
    }

    /// Any `SyncResponse`, encoded now.
    pub fn from_message(message: &v1::SyncResponse) -> Self {
        Self::from_parts(vec![Part::Raw(message.encode_to_vec().into())])
    }

    /// Writes the encoding of parts `*next..` into `buf` until `buf` holds
    /// at least `at_least` bytes or the message is written out (then
    /// returns true); advances `*next`. A server streams a message in
    /// pieces this way, with no buffer the size of the whole message (a
    /// first snapshot is hundreds of KB, and a buffer grown to that size
    /// would stay with the stream).
    pub fn write_some(&self, next: &mut usize, buf: &mut BytesMut, at_least: usize) -> bool {
        while buf.len() < at_least {
            let Some(part) = self.parts.get(*next) else {
                return true;
            };
            buf.reserve(part.encoded_len());
            part.encode(buf);
            *next += 1;
        }
        *next >= self.parts.len()
    }

    /// Number of resources carried as shared pre-encoded bytes.
    pub fn shared_resources(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| matches!(p, Part::Resource(_)))
            .count()
    }

    fn from_parts(parts: Vec<Part>) -> Self {
        let len = parts.iter().map(Part::encoded_len).sum();
        Self { parts, len }
    }
}

impl From<&v1::SyncResponse> for EncodedSyncResponse {
    fn from(message: &v1::SyncResponse) -> Self {
        Self::from_message(message)
    }
}

impl fmt::Debug for EncodedSyncResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedSyncResponse")
            .field("len", &self.len)
            .field("shared_resources", &self.shared_resources())
            .finish()
    }
}

impl Message for EncodedSyncResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for part in &self.parts {
            part.encode(buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Keep the field as raw bytes: concatenating encoded fields is how
        // protobuf merges, so the result re-encodes to an equivalent message.
        let mut raw = Vec::new();
        prost::encoding::encode_key(tag, wire_type, &mut raw);
        match wire_type {
            WireType::Varint => {
                let mut v = 0u64;
                prost::encoding::uint64::merge(wire_type, &mut v, buf, ctx)?;
                prost::encoding::encode_varint(v, &mut raw);
            }
            WireType::ThirtyTwoBit => {
                let mut v = 0u32;
                prost::encoding::fixed32::merge(wire_type, &mut v, buf, ctx)?;
                raw.put_u32_le(v);
            }
            WireType::SixtyFourBit => {
                let mut v = 0u64;
                prost::encoding::fixed64::merge(wire_type, &mut v, buf, ctx)?;
                raw.put_u64_le(v);
            }
            WireType::LengthDelimited => {
                let mut v = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut v, buf, ctx)?;
                prost::encoding::encode_varint(v.len() as u64, &mut raw);
                raw.extend_from_slice(&v);
            }
            // SyncResponse has no groups: report prost's wire-type error.
            WireType::StartGroup | WireType::EndGroup => {
                return prost::encoding::check_wire_type(WireType::LengthDelimited, wire_type);
            }
        }
        self.len += raw.len();
        self.parts.push(Part::Raw(raw.into()));
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.parts.clear();
        self.len = 0;
    }
}
