//! Same-host links: a byte stream between one prefill worker and one decode worker that carries chunk payloads
//! beside the gRPC stream, while each chunk's header (and its checksum, and the ack) stays on gRPC
//! (docs/kv-links.md).
//!
//! A link is an ordered stream of payloads: the sender numbers them (`seq`) in the order it writes them, the chunk
//! header names its payload's `seq` and length ([`v1::KvLinkRef`]), and the receiver reads each payload only once
//! its header has arrived, in `seq` order, since headers of different sessions travel on different gRPC streams and
//! may overtake each other. That is also what an NCCL link needs (a receive must be posted with its exact size, in
//! the order of the sends), so the nodes' protocol is shared; the Unix socket link here is the one a CPU worker has
//! (`tandem up` runs every worker on one host).
//!
//! Any failure of a link costs nothing but a resend: the receiver answers a chunk whose payload it could not read
//! with a CORRUPT ack, and the sender resends that chunk with its payload inline. A sender marks a link broken when
//! a write fails and uses gRPC until it connects again.
//!
//! - [`send`]: [`LinkSenders`], the prefill side's Unix socket links by the decode worker's offer, each with a
//!   writer thread. (A device link's sending end lives on the prefill engine thread: see the prefill node.)
//! - [`recv`]: [`Links`], the decode side's open links, which hands each chunk its payload in order.
//! - [`unix`]: the decode side's socket ([`LinkListener`]) and its links' reading ends.
//! - [`device`]: the decode side's device links (NCCL), joined on a `DeviceLink` call.

pub mod device;
pub mod recv;
pub mod send;
pub mod unix;

pub use recv::Links;
pub use send::{LinkSender, LinkSenders};
pub use unix::LinkListener;

use tandem_engine::backend::link::DevicePayload;

/// A payload as its link delivered it.
#[derive(Debug)]
pub enum Payload {
    /// Bytes on the host (a Unix socket link): the chunk's payload as it would have come inline.
    Host(Vec<u8>),
    /// The sender's cache blocks of one layer in device memory (a device link).
    Device(DevicePayload),
}

use std::io::{Read, Write};

/// Names one link on its receiver (chosen at random by the sender when it connects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(pub u64);

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The largest payload a link carries (the gRPC chunk limit): a header naming more is refused before anything is
/// allocated for it.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// The first bytes on a link: this magic (the version in its last byte), then the link id.
const HELLO: &[u8; 8] = b"TDMLINK1";

/// The machine as the kernel names its current boot, so two workers on one host (or in two containers of one host)
/// agree, and a restarted host is another host. `None` where the kernel does not say (non-Linux).
pub fn host_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// What precedes each payload on the stream: its `seq` and length, so a receiver out of step with its sender
/// notices at the next payload instead of reading one payload's bytes as another's.
fn write_frame(w: &mut impl Write, seq: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Reads a frame's head: `(seq, length)`.
fn read_frame_head(r: &mut impl Read) -> std::io::Result<(u64, u64)> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(8)))
}

#[cfg(test)]
mod tests;
