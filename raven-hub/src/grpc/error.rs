//! Why a `Sync` stream is refused or ended, and the one place each reason
//! becomes a gRPC status (code and message) for the agent.

use std::time::Duration;

use raven_core::NodeName;
use tonic::Status;

use crate::certs::IdentityError;

/// Why the hub refuses or ends a `Sync` stream.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No client certificate on the connection (not mTLS).
    #[error("Sync requires a client certificate (mTLS)")]
    NotMtls,
    /// The client certificate names no node (or none was presented).
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// Too many streams are in their initial sync; retry after the hint.
    #[error("too many agents connecting; retry in {} ms", retry_after.as_millis())]
    Busy { retry_after: Duration },
    #[error("no Hello within the hello timeout")]
    NoHello,
    #[error("the first message must be a Hello")]
    NotHello,
    #[error("protocol version {got} is not supported (this hub speaks {speaks})")]
    ProtocolVersion { got: u32, speaks: u32 },
    #[error("the client certificate is for node {certificate}, the Hello claims {claimed}")]
    ClaimedIdentity {
        certificate: NodeName,
        claimed: String,
    },
    /// A message the protocol does not allow, or one that does not decode.
    #[error("{0}")]
    Invalid(String),
    #[error("a Report of {size} bytes is over the limit of {limit} (--max-report-bytes)")]
    ReportTooLarge { size: usize, limit: usize },
    #[error("the hub has not synced its sources yet")]
    NotReady,
    #[error("the hub is shutting down")]
    ShuttingDown,
    #[error("replaced by a newer stream of node {0} (one stream per node)")]
    Replaced(NodeName),
    #[error("no message from the agent for three heartbeat intervals")]
    Silent,
    #[error("the agent went away")]
    AgentGone,
    /// The agent's side of the stream failed (passed on as it came).
    #[error("{}", .0.message())]
    Stream(#[from] Status),
}

impl SyncError {
    /// A message the protocol does not allow (INVALID_ARGUMENT).
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        Self::Invalid(message.to_string())
    }
}

impl From<raven_proto::ConversionError> for SyncError {
    fn from(e: raven_proto::ConversionError) -> Self {
        Self::invalid(e)
    }
}

impl SyncError {
    /// The gRPC code the agent sees (the one mapping; [`Status::from`]
    /// uses it).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Stream(status) => status.code(),
            Self::Busy { .. } => Code::ResourceExhausted,
            Self::NotMtls | Self::Identity(_) => Code::Unauthenticated,
            Self::NoHello | Self::NotHello | Self::ProtocolVersion { .. } => {
                Code::FailedPrecondition
            }
            Self::ClaimedIdentity { .. } => Code::PermissionDenied,
            Self::Invalid(_) | Self::ReportTooLarge { .. } => Code::InvalidArgument,
            Self::NotReady | Self::ShuttingDown | Self::Silent => Code::Unavailable,
            Self::Replaced(_) => Code::Aborted,
            Self::AgentGone => Code::Cancelled,
        }
    }
}

impl From<SyncError> for Status {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Stream(status) => status,
            // With the retry hint agents wait for.
            SyncError::Busy { retry_after } => raven_proto::resource_exhausted(retry_after),
            e => Status::new(e.code(), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sync_error_has_its_grpc_code_and_keeps_its_message() {
        let node = NodeName::new("n1").expect("name");
        let cases = [
            (SyncError::NotMtls, tonic::Code::Unauthenticated),
            (
                SyncError::Identity(IdentityError::NoCertificate),
                tonic::Code::Unauthenticated,
            ),
            (SyncError::NoHello, tonic::Code::FailedPrecondition),
            (
                SyncError::ProtocolVersion { got: 9, speaks: 1 },
                tonic::Code::FailedPrecondition,
            ),
            (
                SyncError::ClaimedIdentity {
                    certificate: node.clone(),
                    claimed: "n2".into(),
                },
                tonic::Code::PermissionDenied,
            ),
            (
                SyncError::invalid("empty message"),
                tonic::Code::InvalidArgument,
            ),
            (
                SyncError::ReportTooLarge { size: 3, limit: 2 },
                tonic::Code::InvalidArgument,
            ),
            (SyncError::NotReady, tonic::Code::Unavailable),
            (SyncError::ShuttingDown, tonic::Code::Unavailable),
            (SyncError::Silent, tonic::Code::Unavailable),
            (SyncError::Replaced(node), tonic::Code::Aborted),
            (SyncError::AgentGone, tonic::Code::Cancelled),
            (
                SyncError::Stream(Status::data_loss("reset")),
                tonic::Code::DataLoss,
            ),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
        let busy = Status::from(SyncError::Busy {
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            raven_proto::retry_after(&busy),
            Some(Duration::from_millis(1500))
        );
    }
}
