//! Device links: moving KV blocks from one device's cache straight into another's, between two processes on one
//! host (decision 0015; docs/kv-links.md for the nodes' protocol around them).
//!
//! The sending end is joined on any thread ([`DeviceLinks::join_sender`]) and then lives on the prefill engine's
//! thread, sending from the backend's own stream ([`super::Backend::send_kv_blocks`]), so a layer's send follows
//! the kernels that stored it. The receiving end ([`DeviceReceiver`]) lives on a thread of its own with a stream of its
//! own, so that a receive waiting for its send never stalls the decode engine's steps; what it receives is handed
//! to the engine as a [`DevicePayload`] and written with [`super::Backend::write_staged_blocks`]. Payloads are the
//! cache's own staging layout (both ends must use one cache format and shape), not a wire codec.

use crate::error::{EngineError, Result};
use std::any::Any;

/// What a backend with device links offers the nodes.
pub trait DeviceLinks: Send + Sync {
    /// This device's identity on its host (its PCI address): two ends on one device cannot link.
    fn device(&self) -> String;
    /// A fresh link id, as text (this process then hosts the link's bootstrap until the receiver has joined).
    fn new_id(&self) -> Result<String>;
    /// Joins link `id` as its receiving end, on a new stream; blocks until the sender has joined too. The receiver
    /// must stay on the thread that joined.
    fn join_receiver(&self, id: &str) -> Result<Box<dyn DeviceReceiver>>;
    /// Joins link `id` (made by [`DeviceLinks::new_id`] in this process) as its sending end, on the backend's own
    /// stream, so sends follow the kernels that stored their blocks; blocks until the receiver has joined too. May
    /// be called from any thread; the link is then used by the engine's thread alone.
    fn join_sender(&self, id: &str) -> Result<SenderLink>;
}

/// The receiving end of a link.
pub trait DeviceReceiver {
    /// Receives the next payload, of exactly `bytes` bytes (the sender's next send must be as long); returns once
    /// it has arrived.
    fn recv(&mut self, bytes: usize) -> Result<DevicePayload>;
}

/// A received payload in device memory, for [`super::Backend::write_staged_blocks`] of the same backend.
pub struct DevicePayload {
    pub buf: Box<dyn Any + Send>,
    pub bytes: usize,
}

impl std::fmt::Debug for DevicePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevicePayload({} bytes)", self.bytes)
    }
}

/// The sending end of a link, used by one thread at a time (the engine's).
pub struct SenderLink(pub Box<dyn Any + Send>);

/// The error of a backend without device links.
pub(crate) fn unsupported() -> EngineError {
    EngineError::BackendUnavailable("this backend has no device links (CUDA with NCCL has)".into())
}
