//! The inventory digest of `Hello.inventory_digest` (see
//! `proto/raven/v1/sync.proto`): what an agent with a complete cache sends
//! instead of listing every resource it holds, and what the hub compares it
//! with.
//!
//! The digest is the sum, modulo 2^128, of one 128-bit number per resource
//! ([`of_pair`]): independent of order, so it is kept up to date change by
//! change ([`Digest::add`], [`Digest::remove`]) and the hub sums the parts
//! many views share once.

use sha2::{Digest as _, Sha256};

/// A digest of a set of (name, version) pairs; [`Digest::default`] is the
/// empty set's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Digest(pub u128);

/// The number of one resource: the first 16 bytes, little-endian, of
/// `SHA-256(u32_le(len(name)) || name || u32_le(len(version)) || version)`.
pub fn of_pair(name: &str, version: &str) -> u128 {
    let mut h = Sha256::new();
    // Lengths are bounded far below 4 GiB by the message size limits.
    h.update((name.len() as u32).to_le_bytes());
    h.update(name.as_bytes());
    h.update((version.len() as u32).to_le_bytes());
    h.update(version.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_le_bytes(first)
}

impl Digest {
    /// The digest of `pairs` (in any order; each name once).
    pub fn of<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut d = Self::default();
        for (n, v) in pairs {
            d.add(n, v);
        }
        d
    }

    /// Adds a resource to the set.
    pub fn add(&mut self, name: &str, version: &str) {
        self.0 = self.0.wrapping_add(of_pair(name, version));
    }

    /// Takes a resource out of the set (the version it was added with).
    pub fn remove(&mut self, name: &str, version: &str) {
        self.0 = self.0.wrapping_sub(of_pair(name, version));
    }

    /// Adds a pair's number ([`of_pair`]).
    pub fn add_number(&mut self, number: u128) {
        self.0 = self.0.wrapping_add(number);
    }

    /// The union of two disjoint sets.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self(self.0.wrapping_add(other.0))
    }

    /// `self` without the disjoint subset `other`.
    #[must_use]
    pub fn minus(self, other: Self) -> Self {
        Self(self.0.wrapping_sub(other.0))
    }

    /// The 16 bytes of `Hello.inventory_digest`.
    pub fn to_bytes(self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }

    /// Reads `Hello.inventory_digest`: `None` when it is empty (no digest
    /// sent), an error naming the field when it is not 16 bytes.
    pub fn from_hello(hello: &crate::v1::Hello) -> Result<Option<Self>, crate::ConversionError> {
        let b = hello.inventory_digest.as_slice();
        if b.is_empty() {
            return Ok(None);
        }
        let bytes: [u8; 16] = b
            .try_into()
            .map_err(|_| crate::ConversionError::InvalidValue {
                subject: crate::Subject::Message("hello"),
                field: "inventory_digest".into(),
                value: format!("{} bytes", b.len()),
                reason: "is not 16 bytes",
            })?;
        Ok(Some(Self(u128::from_le_bytes(bytes))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_the_documented_byte_layout() {
        // SHA-256 of 07000000 "gateway" 02000000 "v1", first 16 bytes LE.
        let mut msg = Vec::new();
        msg.extend_from_slice(&7u32.to_le_bytes());
        msg.extend_from_slice(b"gateway");
        msg.extend_from_slice(&2u32.to_le_bytes());
        msg.extend_from_slice(b"v1");
        let sha = Sha256::digest(&msg);
        let want = u128::from_le_bytes(sha[..16].try_into().unwrap_or_else(|_| unreachable!()));
        assert_eq!(of_pair("gateway", "v1"), want);
        // The length prefix keeps name and version apart.
        assert_ne!(of_pair("ab", "c"), of_pair("a", "bc"));
        assert_eq!(Digest::of([]).to_bytes(), vec![0u8; 16]);
    }

    #[test]
    fn the_digest_is_the_same_in_any_order_and_follows_adds_and_removes() {
        let a = Digest::of([("settings", "1"), ("gateway/a", "2"), ("peer/x", "3")]);
        let b = Digest::of([("peer/x", "3"), ("settings", "1"), ("gateway/a", "2")]);
        assert_eq!(a, b);
        let mut c = a;
        c.remove("gateway/a", "2");
        c.add("gateway/a", "4");
        assert_eq!(
            c,
            Digest::of([("settings", "1"), ("gateway/a", "4"), ("peer/x", "3")])
        );
        assert_ne!(a, c);
        assert_eq!(
            a.minus(Digest::of([("peer/x", "3")]))
                .plus(Digest::of([("peer/x", "3")])),
            a
        );
    }

    #[test]
    fn a_digest_of_the_wrong_length_is_refused_naming_the_field() {
        let hello = crate::v1::Hello {
            inventory_digest: vec![1, 2, 3],
            ..Default::default()
        };
        let e = Digest::from_hello(&hello).expect_err("3 bytes");
        assert!(e.to_string().contains("inventory_digest"), "{e}");
        assert_eq!(
            Digest::from_hello(&crate::v1::Hello::default()).ok(),
            Some(None)
        );
    }
}
