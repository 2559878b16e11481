//! Cross-crate tests of raven: the network-namespace lab, a harness running
//! a real etcd + kube-apiserver on loopback, and — only for the faults the
//! real server cannot be made to produce — a test-only fake API server that
//! speaks the real wire protocol.

pub mod containers;
pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod kube_apiserver;
pub mod lab;
pub mod objects;
pub mod preflight;
pub mod proxy_rig;
pub mod spdy;
