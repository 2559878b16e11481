//! placeholder
pub mod v1 {
    tonic::include_proto!("raven.v1");
}
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/wire/raven.v1.rs"));
}
pub struct EncodedSyncResponse;
