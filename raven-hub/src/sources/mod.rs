//! Where the hub learns about the cluster: a manifest directory (standalone)
//! or the Kubernetes API.

pub mod kube;
pub mod manifests;
