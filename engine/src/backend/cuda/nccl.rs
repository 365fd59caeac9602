//! A two-rank NCCL communicator between this process's GPU and one peer process's GPU on the same host: the link
//! the GPU-to-GPU KV transport sends staged blocks over (decision 0015). The sending side (rank 0) makes the unique
//! id and must stay alive while the peer joins (the id names a bootstrap socket in the process that made it); the id
//! travels to the peer out of band (over gRPC between nodes, on the peer's command line in the benchmark), and both
//! sides join, each blocking until the other has. Sends and receives are enqueued on the backend's one stream, so
//! they follow the staging copies that fill their buffers ([`super::staging`]) without events, and a copy enqueued
//! after a receive reads what arrived.
//!
//! NCCL is loaded at run time like the other CUDA libraries (`libnccl.so`; [`nccl_present`] says whether it can be).
//! It refuses two ranks on one GPU, so a link needs two GPUs; [`loopback_check`] exercises the library on one
//! (a one-rank communicator sending to itself).

use super::CudaBackend;
use crate::error::{EngineError, Result};
use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id};

/// A device buffer of bytes (staging buffers, acknowledgements).
pub type DeviceBytes = CudaSlice<u8>;

/// Whether the NCCL library can be loaded on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the library; nothing from it is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn require_nccl() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(EngineError::BackendUnavailable(
            "no NCCL library (libnccl.so) on this machine".into(),
        ))
    }
}

/// Makes `stream`'s context current on this thread: NCCL takes its device from there.
fn bind(stream: &cudarc::driver::CudaStream, what: &str) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| EngineError::Device(format!("NCCL {what}: {e}")))
}

fn nccl_error(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("NCCL {what}: {e:?}"))
}

/// An NCCL unique id: 128 opaque bytes, written as 256 hex digits where it crosses a process boundary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl NcclId {
    /// A fresh id from NCCL (this process then hosts the bootstrap and must outlive the peer's join).
    pub fn new() -> Result<Self> {
        require_nccl()?;
        let id = Id::new().map_err(nccl_error("unique id"))?;
        Ok(Self(id.internal().map(|c| c as u8)))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<Self> {
        let bad = || {
            EngineError::invalid(format!(
                "an NCCL id is 256 hex digits; got {} characters",
                s.len()
            ))
        };
        if s.len() != 256 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 128];
        for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            *o = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    fn internal(self) -> [std::ffi::c_char; 128] {
        self.0.map(|b| b as std::ffi::c_char)
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({}..)", &self.to_hex()[..16])
    }
}

/// Which end of a link this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRank {
    /// Rank 0: makes the id, sends blocks.
    Sender,
    /// Rank 1: receives blocks.
    Receiver,
}

impl LinkRank {
    fn rank(self) -> usize {
        match self {
            LinkRank::Sender => 0,
            LinkRank::Receiver => 1,
        }
    }

    fn peer(self) -> i32 {
        match self {
            LinkRank::Sender => 1,
            LinkRank::Receiver => 0,
        }
    }
}

/// One end of a two-rank link on the backend's stream.
pub struct NcclLink {
    comm: Comm,
    peer: i32,
}

impl NcclLink {
    /// Joins the link named by `id` as `rank`; blocks until the peer has joined too.
    pub fn join(b: &CudaBackend, rank: LinkRank, id: NcclId) -> Result<Self> {
        Self::join_on(&b.stream, rank, id)
    }

    /// [`NcclLink::join`] on `stream` (a receiver's own stream, say) instead of the backend's.
    pub fn join_on(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        rank: LinkRank,
        id: NcclId,
    ) -> Result<Self> {
        require_nccl()?;
        bind(stream, "joining a link")?;
        let comm = Comm::from_rank(stream.clone(), rank.rank(), 2, Id::uninit(id.internal()))
            .map_err(nccl_error("joining a link"))?;
        Ok(Self {
            comm,
            peer: rank.peer(),
        })
    }

    /// Enqueues sending the first `bytes` of `buf` to the peer, which must receive exactly as many.
    pub fn send(&self, buf: &CudaSlice<u8>, bytes: usize) -> Result<()> {
        fits(buf, bytes, "send")?;
        let view = buf.slice(..bytes);
        self.comm.send(&view, self.peer).map_err(nccl_error("send"))
    }

    /// Enqueues receiving exactly `bytes` from the peer into the start of `buf`.
    pub fn recv(&self, buf: &mut CudaSlice<u8>, bytes: usize) -> Result<()> {
        fits(buf, bytes, "receive")?;
        let mut view = buf.slice_mut(..bytes);
        self.comm
            .recv(&mut view, self.peer)
            .map(drop)
            .map_err(nccl_error("receive"))
    }
}

/// A message longer than its buffer is refused (clamping it would leave the two ends' sizes unequal, and NCCL
/// would wait for ever on the difference).
fn fits(buf: &CudaSlice<u8>, bytes: usize, what: &str) -> Result<()> {
    if bytes > buf.len() {
        return Err(EngineError::invalid(format!(
            "an NCCL {what} of {bytes} bytes into a buffer of {}",
            buf.len()
        )));
    }
    Ok(())
}

/// The library on one GPU: a one-rank communicator sends `bytes` of a pattern to itself inside one group, and the
/// pattern must come back whole. Returns the number of bytes that differ (0 when NCCL works).
pub fn loopback_check(b: &CudaBackend, bytes: usize) -> Result<usize> {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use cudarc::nccl::{result as nr, sys};
    let id = NcclId::new()?;
    bind(&b.stream, "loopback")?;
    let pattern: Vec<u8> = (0..bytes).map(|i| (i * 7 + i / 251) as u8).collect();
    let dev = |e: cudarc::driver::DriverError| EngineError::Device(format!("NCCL loopback: {e}"));
    let src = b.stream.clone_htod(&pattern).map_err(dev)?;
    let mut dst = b.stream.alloc_zeros::<u8>(bytes).map_err(dev)?;
    let unique = sys::ncclUniqueId {
        internal: id.internal(),
    };
    let mut comm = std::mem::MaybeUninit::uninit();
    // SAFETY: `comm` is written by a successful init before it is read.
    let comm = unsafe {
        nr::comm_init_rank(comm.as_mut_ptr(), 1, unique, 0)
            .map_err(nccl_error("a one-rank communicator"))?;
        comm.assume_init()
    };
    let stream = b.stream.cu_stream() as sys::cudaStream_t;
    let (s, _) = src.device_ptr(&b.stream);
    let (d, _) = dst.device_ptr_mut(&b.stream);
    // SAFETY: both buffers hold `bytes` bytes and live until the stream is synchronized below; the send and the
    // receive are posted in one group, as NCCL requires for a rank talking to itself, and the group is closed
    // whether or not both were posted.
    let sent = unsafe {
        let u8s = sys::ncclDataType_t::ncclUint8;
        nr::group_start().and_then(|_| {
            let posted = nr::send(s as _, bytes, u8s, 0, comm, stream)
                .and_then(|_| nr::recv(d as _, bytes, u8s, 0, comm, stream));
            let closed = nr::group_end();
            posted.and(closed)
        })
    };
    let back = sent
        .map_err(nccl_error("loopback"))
        .and_then(|_| b.stream.clone_dtoh(&dst).map_err(dev));
    // SAFETY: after a successful copy back the stream is drained and destroy is safe; after a failure work may still
    // be in flight, and only abort is. Nothing uses `comm` after this.
    let ended = unsafe {
        if back.is_ok() {
            nr::comm_destroy(comm)
        } else {
            nr::comm_abort(comm)
        }
    };
    let back = back?;
    ended.map_err(nccl_error("ending the loopback communicator"))?;
    Ok(back.iter().zip(&pattern).filter(|(a, b)| a != b).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cross_as_hex_and_bad_text_is_refused() {
        let mut bytes = [0u8; 128];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let id = NcclId(bytes);
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(NcclId::from_hex(&hex).unwrap(), id);
        assert!(NcclId::from_hex(&hex[..254]).is_err());
        let mut bad = hex.clone();
        bad.replace_range(10..11, "g");
        assert!(NcclId::from_hex(&bad).is_err());
        let mut wide = hex[..254].to_string();
        wide.push('é');
        assert!(NcclId::from_hex(&wide).is_err());
    }
}
