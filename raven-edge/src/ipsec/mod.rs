//! The IPsec (IKEv2) backend, an alternative to WireGuard between gateways:
//! strongSwan's charon, driven over VICI.
//!
//! - [`keys`]: the node's Ed25519 identity key, generated on the node,
//!   persisted 0600; only the public key is reported (`Report.ipsec_public_key`)
//!   and passed on by the hub (`PeerInfo.ipsec_public_key`).
//! - [`spec`]: topology → the connections wanted (one IKE_SA + one CHILD_SA
//!   per gateway pair, every subnet a traffic selector, the NATed side
//!   initiates, relay as for WireGuard). Pure.
//! - [`apply`]: the difference against charon's `list-conns`/`list-sas`,
//!   sent over [`vici`], never touching what raven did not create; SA
//!   health (state, bytes, rekey age).
//! - [`charon`]: the `strongswan.conf` of raven's charon (libipsec or
//!   kernel datapath).
//!
//! charon runs as its own process and outlives the agent: an agent restart
//! re-sends what it wants and every SA stays up.

pub mod agent;
pub mod apply;
pub mod charon;
pub mod keys;
pub mod spec;
pub mod vici;
