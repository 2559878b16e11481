//! Cross-crate tests of raven, and the one stand-in the project allows: a
//! test-only fake Kubernetes API server that speaks the real wire protocol.

pub mod containers;
pub mod fake_apiserver;
pub mod lab;
