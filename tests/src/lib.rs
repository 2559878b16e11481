//! Cross-crate tests of raven, and the one stand-in the project allows: a
//! test-only fake Kubernetes API server that speaks the real wire protocol.

pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod lab;
pub mod proxy_rig;
