//! Transfer failures, classified once here; nodes map them to gRPC statuses at their boundary.

use crate::session::SessionId;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransferError {
    /// The checksum did not match: the chunk was damaged on the way and was not written.
    #[error("chunk {index} of session {session}: checksum mismatch")]
    Corrupt { session: SessionId, index: u32 },
    /// The chunk's payload could not be read from its link: the chunk was not written; the sender resends it with
    /// its payload inline.
    #[error("chunk {index} of session {session}: payload not on its link ({reason})")]
    LinkFailed {
        session: SessionId,
        index: u32,
        reason: String,
    },
    /// The chunk is well formed but cannot be accepted (unknown version, codec, layout, blocks or session).
    #[error("chunk refused: {0}")]
    Refused(String),
    /// The session's deadline passed before the transfer finished.
    #[error("transfer of session {0} missed its deadline")]
    DeadlineExceeded(SessionId),
    /// The receiver could not be reached or the stream broke.
    #[error("transfer transport: {0}")]
    Transport(String),
}
