//! The engine's one error type. Every failure is classified here, by the component closest to its cause, so that
//! callers (the CLI, later the nodes) can map it to an exit code or a gRPC status without parsing messages.

use std::path::PathBuf;

/// What went wrong inside the engine. Messages are one line and name the offending field and limit.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model path does not exist or cannot be read.
    #[error("cannot read model {path}: {source}")]
    ModelIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model file is structurally broken (truncated, bad magic, out-of-bounds offsets, lying counts).
    #[error("malformed model file: {0}")]
    MalformedModel(String),
    /// The file is well formed but uses something this engine does not implement.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// A tensor the architecture needs is missing or has the wrong shape.
    #[error("bad tensor {name}: {reason}")]
    BadTensor { name: String, reason: String },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A request parameter is out of range; the message names the field and the limit.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The KV block pool cannot hold what was asked.
    #[error("out of KV cache blocks: need {needed}, {available} available")]
    OutOfBlocks { needed: usize, available: usize },
    /// A sequence id the engine does not know.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// The selected backend cannot run here (e.g. no GPU driver).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// The device failed an operation (a CUDA error, or out of device memory).
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        Self::MalformedModel(msg.into())
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidRequest(msg.into())
    }
}
