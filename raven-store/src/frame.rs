//! The framing every stored value carries, and the bodies inside it.
//!
//! ```text
//! b"RVS1" | schema: u16 LE | crc32(body): u32 LE | body length: u32 LE | body
//! ```

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Meta, StoredResource};

/// Schema version this code reads and writes.
pub const SCHEMA_VERSION: u16 = 1;

pub(crate) const MAGIC: &[u8; 4] = b"RVS1";
pub(crate) const HEADER_LEN: usize = 4 + 2 + 4 + 4;

/// A value whose framing checked out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framed<'a> {
    pub schema: u16,
    pub crc: u32,
    pub body: &'a [u8],
}

/// Why a value's framing is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    TooShort(usize),
    BadMagic,
    Torn { header_len: u32, actual: usize },
    Checksum { stored: u32, computed: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(n) => write!(
                f,
                "{n} bytes, shorter than the {HEADER_LEN}-byte frame header"
            ),
            Self::BadMagic => write!(f, "bad magic (not an RVS1 frame)"),
            Self::Torn { header_len, actual } => write!(
                f,
                "body is {actual} bytes but the header says {header_len} (torn write)"
            ),
            Self::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
        }
    }
}

/// Frames `body` at the current schema. `None` if the body does not fit a
/// u32 length.
pub(crate) fn frame(body: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(body.len()).ok()?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    Some(out)
}

/// Checks magic, length and checksum. The schema is returned, not judged.
pub(crate) fn unframe(value: &[u8]) -> Result<Framed<'_>, FrameError> {
    let Some((header, body)) = value.split_first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::TooShort(value.len()));
    };
    let [m0, m1, m2, m3, s0, s1, c0, c1, c2, c3, l0, l1, l2, l3] = *header;
    if [m0, m1, m2, m3] != *MAGIC {
        return Err(FrameError::BadMagic);
    }
    let schema = u16::from_le_bytes([s0, s1]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    let header_len = u32::from_le_bytes([l0, l1, l2, l3]);
    if usize::try_from(header_len).ok() != Some(body.len()) {
        return Err(FrameError::Torn {
            header_len,
            actual: body.len(),
        });
    }
    let computed = crc32fast::hash(body);
    if computed != crc {
        return Err(FrameError::Checksum {
            stored: crc,
            computed,
        });
    }
    Ok(Framed { schema, crc, body })
}

/// Body of the `format` record. In every schema version this stays JSON
/// with a `schema` field equal to the frame's, so that an older build can
/// tell a newer store from a damaged one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FormatBody {
    pub schema: u16,
    pub purpose: String,
    pub created_at_unix_ms: u64,
}

/// The one field of a format body every version shares.
#[derive(Debug, Deserialize)]
pub(crate) struct SchemaOnly {
    pub schema: u16,
}

/// Body of the `meta` record: the caller's [`Meta`] plus the CRC32 of every
/// resource body this commit left in the store, so that a resource from
/// another commit (or a missing or extra one) is detected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetaBody {
    #[serde(flatten)]
    pub meta: Meta,
    pub resources: BTreeMap<String, u32>,
}

/// Resource body: `u16 LE version length | version (UTF-8) | payload`.
/// `None` if the version is longer than 65535 bytes.
pub(crate) fn encode_resource(r: &StoredResource) -> Option<Vec<u8>> {
    let version = r.version.as_bytes();
    let vlen = u16::try_from(version.len()).ok()?;
    let mut body = Vec::with_capacity(2 + version.len() + r.payload.len());
    body.extend_from_slice(&vlen.to_le_bytes());
    body.extend_from_slice(version);
    body.extend_from_slice(&r.payload);
    Some(body)
}

pub(crate) fn decode_resource(body: &[u8]) -> Result<StoredResource, String> {
    let Some((vlen, rest)) = body.split_first_chunk::<2>() else {
        return Err("body is shorter than its version length".into());
    };
    let vlen = usize::from(u16::from_le_bytes(*vlen));
    if rest.len() < vlen {
        return Err(format!(
            "version length {vlen} runs past the {}-byte body",
            body.len()
        ));
    }
    let (version, payload) = rest.split_at(vlen);
    let version = std::str::from_utf8(version).map_err(|e| format!("version: {e}"))?;
    Ok(StoredResource {
        version: version.to_owned(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// Body of the `seq` record and the head file: a write count, u64 LE.
pub(crate) fn decode_seq(body: &[u8]) -> Result<u64, String> {
    <[u8; 8]>::try_from(body)
        .map(u64::from_le_bytes)
        .map_err(|_| format!("{} bytes, not 8", body.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_value_unframes_to_its_body() {
        let v = frame(b"hello").expect("frame");
        let f = unframe(&v).expect("unframe");
        assert_eq!((f.schema, f.body), (SCHEMA_VERSION, &b"hello"[..]));
    }

    #[test]
    fn every_single_flipped_bit_or_truncation_is_rejected() {
        let v = frame(b"some body bytes").expect("frame");
        for i in 0..v.len() {
            // The schema field is not covered by the CRC; the store judges
            // it against the format record.
            if (4..6).contains(&i) {
                continue;
            }
            for bit in 0..8 {
                let mut bad = v.clone();
                bad[i] ^= 1 << bit;
                assert!(unframe(&bad).is_err(), "flip of bit {bit} in byte {i}");
            }
        }
        for n in 0..v.len() {
            assert!(unframe(&v[..n]).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn resource_bodies_round_trip_and_bad_ones_are_named() {
        let r = StoredResource {
            version: "v7".into(),
            payload: Bytes::from_static(b"\x00\x01proto"),
        };
        let body = encode_resource(&r).expect("encode");
        assert_eq!(decode_resource(&body), Ok(r));
        assert!(decode_resource(&[9]).is_err());
        assert!(decode_resource(&[9, 0, b'a']).is_err());
        assert!(decode_resource(&[1, 0, 0xff]).is_err());
    }

    #[test]
    fn an_overlong_version_is_refused_not_truncated() {
        let r = StoredResource {
            version: "v".repeat(70_000),
            payload: Bytes::new(),
        };
        assert_eq!(encode_resource(&r), None);
    }
}
