//! The CUDA backend's device links (decision 0015): NCCL links of two ranks, the prefill side sending from the
//! backend's stream (rank 0), the decode side receiving on a stream of its own (rank 1), payloads in the staging
//! layout of [`super::staging`].
//!
//! The backend runs without cudarc's event tracking, so crossing streams is ordered by hand: a receiver returns a
//! payload only after its stream has finished the receive, and [`write_staged`] waits for its scatter before the
//! payload (allocated on the receiver's stream) may be freed.

use super::module::dev;
use super::nccl::{LinkRank, NcclId, NcclLink, nccl_present};
use super::{CudaBackend, CudaKvStore};
use crate::backend::link::{DeviceLinks, DevicePayload, DeviceReceiver, SenderLink};
use crate::error::{EngineError, Result};
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::sync::Arc;

/// What the nodes use to link this backend's device with another process's.
pub struct CudaDeviceLinks {
    ctx: Arc<CudaContext>,
    /// The backend's stream, which sending ends join on.
    stream: Arc<CudaStream>,
    device: String,
}

impl CudaDeviceLinks {
    /// `None` without NCCL on this machine.
    pub(super) fn of(b: &CudaBackend) -> Option<Arc<dyn DeviceLinks>> {
        if !nccl_present() {
            return None;
        }
        let attr = |a| b.ctx.attribute(a).unwrap_or(-1);
        let device = format!(
            "{:04x}:{:02x}:{:02x}",
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)
        );
        Some(Arc::new(Self {
            ctx: b.ctx.clone(),
            stream: b.stream.clone(),
            device,
        }))
    }
}

impl DeviceLinks for CudaDeviceLinks {
    fn device(&self) -> String {
        self.device.clone()
    }

    fn new_id(&self) -> Result<String> {
        Ok(NcclId::new()?.to_hex())
    }

    fn join_receiver(&self, id: &str) -> Result<Box<dyn DeviceReceiver>> {
        let id = NcclId::from_hex(id)?;
        let stream = self.ctx.new_stream().map_err(dev("a link's stream"))?;
        let link = NcclLink::join_on(&stream, LinkRank::Receiver, id)?;
        Ok(Box::new(CudaReceiver { stream, link }))
    }

    fn join_sender(&self, id: &str) -> Result<SenderLink> {
        let link = NcclLink::join_on(&self.stream, LinkRank::Sender, NcclId::from_hex(id)?)?;
        Ok(SenderLink(Box::new(SendLink(link))))
    }
}

/// A sending end, movable to the engine's thread once joined.
struct SendLink(NcclLink);

// SAFETY: an NCCL communicator may be used from any thread as long as one thread at a time uses it; a `SendLink`
// is joined on one thread and then only used (and dropped) by the engine's thread, which owns it.
unsafe impl Send for SendLink {}

struct CudaReceiver {
    stream: Arc<CudaStream>,
    link: NcclLink,
}

impl DeviceReceiver for CudaReceiver {
    fn recv(&mut self, bytes: usize) -> Result<DevicePayload> {
        let mut buf: CudaSlice<u8> = self
            .stream
            .alloc_zeros(bytes.max(1))
            .map_err(dev("a link payload's buffer"))?;
        self.link.recv(&mut buf, bytes)?;
        self.stream
            .synchronize()
            .map_err(dev("receiving a link payload"))?;
        Ok(received(buf, bytes))
    }
}

/// A received buffer. It may be dropped on any thread (a refused chunk's payload is dropped where it was refused),
/// so it makes its context current before freeing.
struct Received(std::mem::ManuallyDrop<CudaSlice<u8>>);

impl Drop for Received {
    fn drop(&mut self) {
        let _ = self.0.context().bind_to_thread();
        // SAFETY: dropped once, here; nothing uses the slice afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.0) };
    }
}

/// `buf`'s first `bytes` as a payload (what a receiver hands on).
pub(super) fn received(buf: CudaSlice<u8>, bytes: usize) -> DevicePayload {
    DevicePayload {
        buf: Box::new(Received(std::mem::ManuallyDrop::new(buf))),
        bytes,
    }
}

/// Gathers `layer` of `blocks` into a staging buffer and sends it, both on the backend's stream.
pub(super) fn send(
    b: &CudaBackend,
    kv: &CudaKvStore,
    link: &SenderLink,
    layer: usize,
    blocks: &[u32],
) -> Result<usize> {
    let SendLink(link) = link
        .0
        .downcast_ref::<SendLink>()
        .ok_or_else(|| EngineError::invalid("a sender link of another backend"))?;
    let bytes = kv.staging_shape(b, 1, blocks.len())?.bytes();
    let mut staged: CudaSlice<u8> = b
        .stream
        .alloc_zeros(bytes)
        .map_err(dev("a link payload's buffer"))?;
    b.gather_kv(kv, layer..layer + 1, blocks, &mut staged)?;
    link.send(&staged, bytes)?;
    // Freed in stream order, after the send.
    drop(staged);
    Ok(bytes)
}

/// Scatters a received payload into `blocks` of `layer` and waits for it, so the payload can be freed.
pub(super) fn write_staged(
    b: &CudaBackend,
    kv: &mut CudaKvStore,
    layer: usize,
    blocks: &[u32],
    payload: DevicePayload,
) -> Result<()> {
    let want = kv.staging_shape(b, 1, blocks.len())?.bytes();
    if payload.bytes != want {
        return Err(EngineError::invalid(format!(
            "a link payload of {} bytes for {} blocks of one layer ({want} bytes in this cache's format)",
            payload.bytes,
            blocks.len()
        )));
    }
    let buf = payload
        .buf
        .downcast::<Received>()
        .map_err(|_| EngineError::invalid("a link payload of another backend"))?;
    b.scatter_kv(kv, layer..layer + 1, blocks, &buf.0)?;
    b.stream
        .synchronize()
        .map_err(dev("writing a link payload"))?;
    Ok(())
}
