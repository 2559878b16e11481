//! raven-edge: the node agent.
//!
//! ```text
//! sled cache ──(boot, before any network call)──▶ reconcile ──▶ kernel
//! hub stream ──▶ check ▸ persist ▸ ACK ──▶ cache ──▶ reconcile ──▶ Applied report
//! ```
//!
//! The dataplane survives the agent: stopping or upgrading it changes
//! nothing in the kernel, and `raven-edge teardown` is the only way to remove
//! what raven installed.

pub mod agent;
pub mod args;
pub mod cache;
pub mod client;
pub mod dataplane;
pub mod diagnose;
pub mod failover;
pub mod hold;
pub mod http;
pub mod hub_tls;
pub mod ipsec;
pub mod plan;
pub mod proxy;
pub mod reach;
pub mod status;
pub mod tunnel;
