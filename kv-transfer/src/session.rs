//! The receiver's open transfer sessions: which blocks each may write, until when, and where its chunks go.
//!
//! A decode worker opens a session per remote prefill, naming the destination blocks it allocated and a deadline,
//! and holds the returned [`SessionGuard`] for as long as the request waits for KV. Dropping the guard (request
//! done, failed, timed out or cancelled) closes the session: later chunks for it are refused, so nothing can write
//! into blocks that were given back. Chunks are checked (checksum, layout, blocks, deadline) before the sink sees
//! them. The table is the only shared state here; its lock is never held while a sink runs.

use crate::chunk::{self, ChunkLayout, DecodedChunk};
use crate::error::TransferError;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tandem_engine::backend::link::DevicePayload;
use tandem_engine::kv::BlockId;
use tandem_proto::v1;

/// Names one transfer on its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Where a session's verified chunks go; an `Err` refuses the chunk with that reason.
pub type SessionSink = Box<dyn Fn(Delivered) -> Result<(), String> + Send + Sync>;

/// A verified chunk as its session's sink gets it.
#[derive(Debug)]
pub enum Delivered {
    /// Decoded to f32 blocks on the host.
    Host(DecodedChunk),
    /// One layer's blocks as the sender's cache stores them, received over a device link into device memory.
    Device(StagedChunk),
}

/// One layer of blocks received over a device link: written as they are into a cache of the same format.
#[derive(Debug)]
pub struct StagedChunk {
    pub session: SessionId,
    pub index: u32,
    pub layer: usize,
    pub blocks: Vec<BlockId>,
    pub payload: DevicePayload,
}

struct Entry {
    allowed: HashSet<BlockId>,
    deadline: Instant,
    sink: Arc<SessionSink>,
}

struct Inner {
    next: u64,
    open: HashMap<SessionId, Entry>,
}

/// The session table of one receiver.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    layout: ChunkLayout,
    layers: usize,
}

impl Sessions {
    /// A table for a cache of `layers` layers in `layout`.
    pub fn new(layout: ChunkLayout, layers: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                // Start at a random point so ids from an earlier run of this worker are not reused.
                next: tandem_engine::sampling::fresh_seed(),
                open: HashMap::new(),
            })),
            layout,
            layers,
        }
    }

    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a session that may write `blocks` until `deadline`.
    pub fn open(&self, blocks: &[BlockId], deadline: Instant, sink: SessionSink) -> SessionGuard {
        let mut g = self.lock();
        let id = loop {
            g.next = g.next.wrapping_add(1);
            let id = SessionId(g.next);
            if !g.open.contains_key(&id) {
                break id;
            }
        };
        g.open.insert(
            id,
            Entry {
                allowed: blocks.iter().copied().collect(),
                deadline,
                sink: Arc::new(sink),
            },
        );
        SessionGuard {
            id,
            sessions: self.clone(),
        }
    }

    /// Verifies one chunk and hands it to its session's sink. What the chunk's header names (session, destination
    /// blocks, layers) is checked against the open sessions before its payload is decoded, so a chunk no session
    /// expects costs neither the decoding nor the memory of its decoded blocks; the session is checked again once
    /// the chunk is decoded (and so its checksum verified), since it may have closed meanwhile.
    pub fn deliver(&self, c: &v1::KvChunk) -> Result<(), TransferError> {
        let (start, end) = (c.layer_start as usize, c.layer_end as usize);
        if end > self.layers {
            return Err(TransferError::Refused(format!(
                "layers {start}..{end} beyond the receiver's {}",
                self.layers
            )));
        }
        let session = SessionId(c.session_id);
        self.sink_for(session, &c.dest_block_ids)?;
        let d = chunk::decode(c, &self.layout)?;
        // The decoded chunk names the header's session and blocks (`chunk::decode` takes them as they are).
        let sink = self.sink_for(session, &c.dest_block_ids)?;
        sink(Delivered::Host(d)).map_err(TransferError::Refused)
    }

    /// Hands a chunk whose payload came over a device link to its session's sink, after the checks a staged chunk
    /// allows (no checksum: the payload is in device memory): one layer within the receiver's, version, layout
    /// (key rotation included), and the session's blocks. The payload's size is the engine's to check against its cache.
    pub fn deliver_staged(
        &self,
        c: &v1::KvChunk,
        payload: DevicePayload,
    ) -> Result<(), TransferError> {
        let refuse = |m: String| Err(TransferError::Refused(m));
        let (start, end) = (c.layer_start as usize, c.layer_end as usize);
        if end != start + 1 || end > self.layers {
            return refuse(format!(
                "a staged chunk holds one layer of the receiver's {}; this one {start}..{end}",
                self.layers
            ));
        }
        if c.format_version != chunk::FORMAT_VERSION {
            return refuse(format!(
                "format_version {} (this receiver reads {})",
                c.format_version,
                chunk::FORMAT_VERSION
            ));
        }
        let l = c.layout.unwrap_or_default();
        let want = &self.layout;
        if (l.kv_heads, l.head_dim, l.block_size) != (want.kv_heads, want.head_dim, want.block_size)
        {
            return refuse(format!(
                "layout kv_heads={} head_dim={} block_size={} differs from the receiver's {}/{}/{}",
                l.kv_heads, l.head_dim, l.block_size, want.kv_heads, want.head_dim, want.block_size
            ));
        }
        if l.key_rotation != want.key_rotation_id() {
            return refuse(format!(
                "key_rotation {:08x} differs from the receiver's {:08x} (another model's RoPE)",
                l.key_rotation,
                want.key_rotation_id()
            ));
        }
        let session = SessionId(c.session_id);
        let sink = self.sink_for(session, &c.dest_block_ids)?;
        sink(Delivered::Device(StagedChunk {
            session,
            index: c.chunk_index,
            layer: start,
            blocks: c.dest_block_ids.iter().copied().map(BlockId).collect(),
            payload,
        }))
        .map_err(TransferError::Refused)
    }

    /// The sink of `session` if it is open, within its deadline (else it closes) and may write every one of
    /// `blocks`.
    fn sink_for(
        &self,
        session: SessionId,
        blocks: &[u32],
    ) -> Result<Arc<SessionSink>, TransferError> {
        let mut g = self.lock();
        let Some(e) = g.open.get(&session) else {
            return Err(TransferError::Refused(format!(
                "session {session} is not open (finished, cancelled or never opened)"
            )));
        };
        if Instant::now() > e.deadline {
            g.open.remove(&session);
            return Err(TransferError::DeadlineExceeded(session));
        }
        if let Some(b) = blocks.iter().find(|&&b| !e.allowed.contains(&BlockId(b))) {
            return Err(TransferError::Refused(format!(
                "block {b} is not a destination of session {session}"
            )));
        }
        Ok(e.sink.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the map consistent (every operation is one insert or remove).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a session open; dropping it closes the session.
pub struct SessionGuard {
    id: SessionId,
    sessions: Sessions,
}

impl SessionGuard {
    pub fn id(&self) -> SessionId {
        self.id
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{chunk, layout};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn delivers_only_to_open_sessions_and_their_blocks() {
        let s = Sessions::new(layout(), 2);
        let got = Arc::new(AtomicUsize::new(0));
        let g2 = got.clone();
        let guard = s.open(
            &[BlockId(4), BlockId(5)],
            Instant::now() + Duration::from_secs(60),
            Box::new(move |d| {
                let Delivered::Host(d) = d else {
                    return Err("a staged chunk".into());
                };
                g2.fetch_add(d.data.len(), Ordering::SeqCst);
                Ok(())
            }),
        );
        let id = guard.id();
        s.deliver(&chunk(id, &[4, 5], 1)).unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 2);
        let e = s.deliver(&chunk(id, &[4, 6], 0)).unwrap_err().to_string();
        assert!(e.contains("block 6"), "{e}");
        let e = s.deliver(&chunk(id, &[4], 2)).unwrap_err().to_string();
        assert!(e.contains("beyond"), "{e}");
        drop(guard);
        assert!(s.is_empty());
        let e = s.deliver(&chunk(id, &[4], 0)).unwrap_err().to_string();
        assert!(e.contains("not open"), "{e}");
        assert_eq!(got.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_chunk_no_session_expects_is_refused_before_its_payload_is_decoded() {
        let s = Sessions::new(layout(), 2);
        let guard = s.open(
            &[BlockId(4)],
            Instant::now() + Duration::from_secs(60),
            Box::new(|_| Ok(())),
        );
        // A payload that could never decode (and a stale checksum): the session or block check answers first.
        let mut c = chunk(SessionId(guard.id().0 + 1), &[4], 0);
        c.payload.truncate(1);
        let e = s.deliver(&c).unwrap_err().to_string();
        assert!(e.contains("not open"), "{e}");
        let mut c = chunk(guard.id(), &[9], 0);
        c.payload.truncate(1);
        let e = s.deliver(&c).unwrap_err().to_string();
        assert!(e.contains("block 9"), "{e}");
        // For the session and block it expects, the same payload is decoded and found corrupt.
        let mut c = chunk(guard.id(), &[4], 0);
        c.payload.truncate(1);
        assert!(matches!(s.deliver(&c), Err(TransferError::Corrupt { .. })));
    }

    #[test]
    fn expired_sessions_refuse_and_close() {
        let s = Sessions::new(layout(), 1);
        let guard = s.open(&[BlockId(0)], Instant::now(), Box::new(|_| Ok(())));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            s.deliver(&chunk(guard.id(), &[0], 0)),
            Err(TransferError::DeadlineExceeded(guard.id()))
        );
        assert!(s.is_empty());
    }
}
