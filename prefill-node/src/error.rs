//! Prefill failures, classified once; [`PrefillError::to_status`] is the only place they become gRPC statuses.

use tandem_engine::EngineError;
use tandem_kv_transfer::TransferError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    /// The request is malformed; the message names the field.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The node is shutting down or its engine thread stopped.
    #[error("prefill worker unavailable: {0}")]
    Unavailable(String),
}

impl PrefillError {
    pub fn to_status(&self) -> Status {
        match self {
            Self::Invalid(m) => Status::invalid_argument(m.clone()),
            Self::Engine(e) => crate::runtime::engine_status(e),
            Self::Transfer(TransferError::DeadlineExceeded(_)) => {
                Status::deadline_exceeded(self.to_string())
            }
            Self::Transfer(TransferError::Transport(_)) => Status::unavailable(self.to_string()),
            Self::Transfer(_) => Status::aborted(self.to_string()),
            Self::Unavailable(_) => Status::unavailable(self.to_string()),
        }
    }
}
