//! The packed prefix sets of `DomainPrefixes` (`PackedPrefixes` in
//! `resources.proto`, which specifies the format): per family, one group
//! per prefix length, each address a varint difference from the one
//! before, shifted right by its host bits when the whole group is aligned.
//! A domain's addresses and subnets sit close together (one LAN, subnets
//! handed out in order), so most differences are one byte: the prefixes of
//! a ten-node domain take about 30 bytes instead of about 280 as strings.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::v1;

/// Why packed bytes do not decode; `field` is `ipv4` or `ipv6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackError {
    pub field: &'static str,
    pub reason: &'static str,
}

/// Packs `nets` (any order, repeats allowed). `None` for an empty set.
pub fn pack(nets: impl IntoIterator<Item = IpNet>) -> Option<v1::PackedPrefixes> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push((n.prefix_len(), u128::from(u32::from(n.addr())))),
            IpNet::V6(n) => v6.push((n.prefix_len(), u128::from(n.addr()))),
        }
    }
    if v4.is_empty() && v6.is_empty() {
        return None;
    }
    Some(v1::PackedPrefixes {
        ipv4: pack_family(v4, 32),
        ipv6: pack_family(v6, 128),
    })
}

/// Packs host addresses as host prefixes. `None` for an empty set.
pub fn pack_addresses(addrs: impl IntoIterator<Item = IpAddr>) -> Option<v1::PackedPrefixes> {
    pack(addrs.into_iter().map(IpNet::from))
}

/// Unpacks a set, sorted and without repeats. An absent set is empty.
pub fn unpack(p: Option<&v1::PackedPrefixes>) -> Result<Vec<IpNet>, PackError> {
    let Some(p) = p else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (field, bytes, bits) in [("ipv4", &p.ipv4, 32u32), ("ipv6", &p.ipv6, 128)] {
        let err = |reason| PackError { field, reason };
        for (len, addr) in unpack_family(bytes, bits).map_err(err)? {
            out.push(if bits == 32 {
                let a = Ipv4Addr::from(u32::try_from(addr).map_err(|_| err("overflows"))?);
                IpNet::V4(ipnet::Ipv4Net::new(a, len).map_err(|_| err("bad length"))?)
            } else {
                IpNet::V6(
                    ipnet::Ipv6Net::new(Ipv6Addr::from(addr), len)
                        .map_err(|_| err("bad length"))?,
                )
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Unpacks a set of host addresses, sorted and without repeats; a prefix
/// that is not a host prefix is refused.
pub fn unpack_addresses(p: Option<&v1::PackedPrefixes>) -> Result<Vec<IpAddr>, PackError> {
    let nets = unpack(p)?;
    let mut out = Vec::with_capacity(nets.len());
    for n in nets {
        if n.prefix_len() != n.max_prefix_len() {
            return Err(PackError {
                field: if n.addr().is_ipv4() { "ipv4" } else { "ipv6" },
                reason: "holds a prefix that is not a host address",
            });
        }
        out.push(n.addr());
    }
    Ok(out)
}

fn host_mask(bits: u32, len: u8) -> u128 {
    let host = bits - u32::from(len);
    if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    }
}

fn shr(v: u128, by: u32) -> u128 {
    if by >= 128 { 0 } else { v >> by }
}

fn pack_family(mut items: Vec<(u8, u128)>, bits: u32) -> Vec<u8> {
    items.sort_unstable();
    items.dedup();
    let mut out = Vec::new();
    let mut rest = items.as_slice();
    while let Some(&(len, _)) = rest.first() {
        let n = rest.iter().take_while(|(l, _)| *l == len).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let mask = host_mask(bits, len);
        let aligned = group.iter().all(|(_, a)| a & mask == 0);
        let host = bits - u32::from(len);
        put_varint(&mut out, (u128::from(len) << 1) | u128::from(aligned));
        put_varint(&mut out, group.len() as u128);
        let mut prev = 0u128;
        for &(_, addr) in group {
            let v = if aligned { shr(addr, host) } else { addr };
            put_varint(&mut out, v - prev);
            prev = v;
        }
    }
    out
}

fn unpack_family(mut bytes: &[u8], bits: u32) -> Result<Vec<(u8, u128)>, &'static str> {
    let mut out = Vec::new();
    let mut last_len: Option<u8> = None;
    while !bytes.is_empty() {
        let header = take_varint(&mut bytes)?;
        let len = u8::try_from(header >> 1).map_err(|_| "has a prefix length out of range")?;
        if u32::from(len) > bits {
            return Err("has a prefix length out of range");
        }
        if last_len.is_some_and(|l| l >= len) {
            return Err("has groups out of order or repeated");
        }
        last_len = Some(len);
        let aligned = header & 1 == 1;
        let count = take_varint(&mut bytes)?;
        if count == 0 {
            return Err("has an empty group");
        }
        let host = bits - u32::from(len);
        let limit = if aligned { u32::from(len) } else { bits };
        let mut v = 0u128;
        for i in 0..count {
            let d = take_varint(&mut bytes)?;
            if i > 0 && d == 0 {
                return Err("repeats an address");
            }
            v = v.checked_add(d).ok_or("has an address that overflows")?;
            if limit < 128 && v >> limit != 0 {
                return Err("has an address that overflows");
            }
            let addr = if aligned && host < 128 {
                v << host
            } else if aligned {
                0
            } else {
                v
            };
            out.push((len, addr));
        }
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn take_varint(bytes: &mut &[u8]) -> Result<u128, &'static str> {
    let mut v = 0u128;
    for i in 0..19 {
        let Some((&b, rest)) = bytes.split_first() else {
            return Err("ends inside a varint");
        };
        *bytes = rest;
        let bits = u128::from(b & 0x7f);
        let shift = 7 * i;
        if shift >= 128 || (shift > 121 && bits >> (128 - shift) != 0) {
            return Err("has a varint that overflows");
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("has a varint that overflows")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    #[test]
    fn ten_consecutive_nodes_pack_into_one_byte_per_prefix() {
        let mut all = Vec::new();
        for i in 0..10u8 {
            all.push(format!("172.16.0.{}/32", i + 1));
            all.push(format!("10.64.{i}.0/24"));
        }
        let all: Vec<IpNet> = all
            .iter()
            .map(|s| s.parse().unwrap_or_else(|_| unreachable!()))
            .collect();
        let p = pack(all.clone()).unwrap_or_default();
        // Two groups: header, count, a first address of 3 and 5 bytes, then
        // nine one-byte differences each.
        assert_eq!(p.ipv4.len(), 2 + 3 + 9 + 2 + 5 + 9, "{:?}", p.ipv4);
        let mut sorted = all;
        sorted.sort();
        assert_eq!(unpack(Some(&p)), Ok(sorted));
    }

    #[test]
    fn host_bits_are_kept_exactly() {
        let all = nets(&[
            "10.244.1.7/24",
            "10.244.0.0/16",
            "0.0.0.0/0",
            "fd00::1/64",
            "::/0",
        ]);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(unpack(pack(all).as_ref()), Ok(sorted));
    }

    #[test]
    fn malformed_bytes_are_refused_with_a_reason() {
        let bad = |ipv4: Vec<u8>| {
            unpack(Some(&v1::PackedPrefixes {
                ipv4,
                ipv6: Vec::new(),
            }))
            .err()
            .map(|e| e.reason)
        };
        assert_eq!(
            bad(vec![33 << 1, 1, 0]),
            Some("has a prefix length out of range")
        );
        assert_eq!(bad(vec![64, 0]), Some("has an empty group"));
        assert_eq!(bad(vec![64, 2, 1, 0]), Some("repeats an address"));
        assert_eq!(
            bad(vec![64, 1, 1, 64, 1, 2]),
            Some("has groups out of order or repeated")
        );
        assert_eq!(bad(vec![64, 1, 0x80]), Some("ends inside a varint"));
        // An aligned /8 holds at most 8 significant bits.
        assert_eq!(
            bad(vec![(8 << 1) | 1, 1, 0x80, 0x02]),
            Some("has an address that overflows")
        );
        assert_eq!(
            bad(vec![64, 1, 0xff, 0xff, 0xff, 0xff, 0x1f]),
            Some("has an address that overflows")
        );
        assert_eq!(
            unpack_addresses(pack(nets(&["10.0.0.0/8"])).as_ref())
                .err()
                .map(|e| e.reason),
            Some("holds a prefix that is not a host address")
        );
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), l).unwrap_or_else(|_| unreachable!())
            )),
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), l)
                    .unwrap_or_else(|_| unreachable!())
                    .trunc()
            )),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(
                ipnet::Ipv6Net::new(Ipv6Addr::from(a), l).unwrap_or_else(|_| unreachable!())
            )),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(
                ipnet::Ipv6Net::new(Ipv6Addr::from(a), l)
                    .unwrap_or_else(|_| unreachable!())
                    .trunc()
            )),
        ]
    }

    proptest! {
        #[test]
        fn any_set_unpacks_to_itself_sorted_without_repeats(set in proptest::collection::vec(any_net(), 0..12)) {
            let mut want = set.clone();
            want.sort();
            want.dedup();
            prop_assert_eq!(unpack(pack(set).as_ref()), Ok(want));
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panicking(ipv4 in proptest::collection::vec(any::<u8>(), 0..24), ipv6 in proptest::collection::vec(any::<u8>(), 0..40)) {
            let p = v1::PackedPrefixes { ipv4, ipv6 };
            if let Ok(got) = unpack(Some(&p)) {
                // Whatever decodes packs back to an equal set.
                prop_assert_eq!(unpack(pack(got.clone()).as_ref()), Ok(got));
            }
        }
    }
}
