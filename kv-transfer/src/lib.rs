//! Moves KV cache blocks from a prefill worker to a decode worker.
//!
//! - [`chunk`]: the wire format of one chunk (a range of layers for some blocks), versioned, with a CRC32C over
//!   header and payload; encoding from and decoding to f32 block data.
//! - [`session`]: the receiver's table of open transfer sessions: which blocks each may write, until when, and
//!   where its chunks go. A session is removed by its guard when the request it serves ends, so a stalled or
//!   cancelled transfer leaves nothing behind.
//! - [`server`]: the gRPC `KvTransfer.Push` service over the session table.
//! - [`link`]: same-host links that carry chunk payloads beside the gRPC stream (a Unix socket between CPU
//!   workers), in order, each read once its header arrived.
//! - [`sender`]: the prefill side: a stream that pushes chunks as layers finish and waits for every ack before a
//!   deadline, resending a chunk the receiver found corrupt.
//!
//! Layer-wise pipelining follows Splitwise/DistServe: the sender ships each layer's blocks as soon as that layer
//! is stored, so transfer overlaps the rest of the forward pass.

pub mod chunk;
pub mod entropy;
pub mod error;
pub mod link;
pub mod sender;
pub mod server;
pub mod session;
#[cfg(test)]
mod test_support;

pub use chunk::{BlockData, ChunkLayout, DecodedChunk, FORMAT_VERSION};
pub use error::TransferError;
pub use sender::{Sender, TransferStats};
pub use server::KvTransferService;
pub use session::{Delivered, SessionGuard, SessionId, SessionSink, Sessions, StagedChunk};
