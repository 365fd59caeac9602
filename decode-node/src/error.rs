//! Decode failures, classified once; [`DecodeError::to_status`] is the only place they become gRPC statuses.

use tandem_engine::EngineError;
use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    /// The request is malformed or out of range; the message names the field and the limit.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request can never fit this worker's KV cache.
    #[error("{0}")]
    TooLarge(String),
    /// The engine failed on a request it had accepted.
    #[error("engine: {0}")]
    Engine(String),
    /// The prefill worker failed or could not be reached (and local prefill was not allowed).
    #[error("prefill worker {endpoint}: {message}")]
    Prefill {
        endpoint: String,
        code: Code,
        message: String,
    },
    /// The KV transfer did not finish before its deadline.
    #[error("KV transfer from {endpoint} missed its deadline of {deadline_ms} ms")]
    TransferDeadline { endpoint: String, deadline_ms: u64 },
    /// The transfer finished but blocks are missing.
    #[error("KV transfer incomplete: {received} of {expected} block-layers arrived")]
    TransferIncomplete { received: usize, expected: usize },
    /// The worker is shutting down.
    #[error("decode worker unavailable: {0}")]
    Unavailable(String),
}

impl From<EngineError> for DecodeError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) => Self::Invalid(m),
            other => Self::Engine(other.to_string()),
        }
    }
}

impl DecodeError {
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::TooLarge(_) => Code::ResourceExhausted,
            Self::Engine(_) => Code::Internal,
            Self::Prefill { code, .. } => match code {
                Code::InvalidArgument => Code::InvalidArgument,
                _ => Code::Unavailable,
            },
            Self::TransferDeadline { .. } => Code::DeadlineExceeded,
            Self::TransferIncomplete { .. } => Code::Aborted,
            Self::Unavailable(_) => Code::Unavailable,
        };
        Status::new(code, self.to_string())
    }
}
