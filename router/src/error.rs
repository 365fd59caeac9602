//! Router failures, classified once. [`RouterError::http_status`] and [`RouterError::to_status`] are the only places
//! they become HTTP or gRPC codes; the OpenAI error body is built from [`RouterError::kind`].

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouterError {
    /// The request is malformed or out of range; `param` names the field when there is one.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    /// The request names a model this cluster does not serve.
    #[error("model {0:?} is not served here (see /v1/models)")]
    UnknownModel(String),
    /// No healthy decode worker.
    #[error("no decode worker is available")]
    NoWorker,
    /// A worker failed the request; its status is kept.
    #[error("{message}")]
    Worker { code: Code, message: String },
    /// The router is draining before it stops; another replica (or this one, restarted) will serve.
    #[error("this router is shutting down; retry on another router")]
    ShuttingDown,
    /// Admission control refused the request (too many in flight, or the caller's rate limit); retry later.
    #[error("{message}; retry after {retry_after_s} s")]
    Overloaded { message: String, retry_after_s: u32 },
}

impl RouterError {
    pub fn invalid(message: impl Into<String>, param: &str) -> Self {
        Self::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// A worker's status, keeping whether it was the caller's fault.
    pub fn from_worker(s: &Status) -> Self {
        match s.code() {
            Code::InvalidArgument | Code::ResourceExhausted => Self::Invalid {
                message: s.message().to_string(),
                param: None,
            },
            code => Self::Worker {
                code,
                message: s.message().to_string(),
            },
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Self::Invalid { .. } | Self::UnknownModel(_) => 400,
            Self::NoWorker | Self::ShuttingDown => 503,
            Self::Overloaded { .. } => 429,
            Self::Worker { code, .. } => match code {
                Code::Unavailable => 503,
                Code::DeadlineExceeded => 504,
                _ => 500,
            },
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. } | Self::UnknownModel(_) => "invalid_request_error",
            Self::NoWorker | Self::ShuttingDown | Self::Worker { .. } => "server_error",
            Self::Overloaded { .. } => "rate_limit_error",
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } => param.as_deref(),
            Self::UnknownModel(_) => Some("model"),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel(_) => Some("model_not_found"),
            Self::Overloaded { .. } => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::UnknownModel(_) => Code::NotFound,
            Self::NoWorker | Self::ShuttingDown => Code::Unavailable,
            Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::Worker { code, .. } => *code,
        };
        let mut status = Status::new(code, self.to_string());
        if let Some(s) = self.retry_after_s() {
            status.metadata_mut().insert("retry-after", s.into());
        }
        status
    }

    /// Seconds a refused caller should wait before trying again.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            Self::Overloaded { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }
}
