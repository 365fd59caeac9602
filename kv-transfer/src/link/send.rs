//! The sending side of links: one [`LinkSender`] per decode worker socket, kept by [`LinkSenders`].
//!
//! [`LinkSender::send`] numbers a payload and queues it for the link's writer thread, without blocking, so the
//! transfer driver can go on to send the chunk's header. The writer writes payloads in `seq` order; the first
//! failed write marks the link broken (later sends give their payload back, to go inline) and ends the thread.

use super::{HELLO, LinkId, host_id, write_frame};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tandem_proto::v1;

/// A payload and its `seq`, as the writer thread takes them.
type Numbered = (u64, Vec<u8>);

/// How long one write may wait for the receiver to read.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// The prefill side's end of one link.
pub struct LinkSender {
    id: LinkId,
    /// The next payload's number and the writer's queue, under one lock so numbers and queue order agree.
    queue: Mutex<(u64, mpsc::Sender<Numbered>)>,
    broken: Arc<AtomicBool>,
}

impl LinkSender {
    /// Connects to the decode worker's socket at `path` and starts the writer thread.
    pub fn connect(path: &Path) -> std::io::Result<Arc<Self>> {
        let mut stream = UnixStream::connect(path)?;
        // A receiver that stops reading (stuck, or gone without closing) breaks the link instead of the writer.
        stream.set_write_timeout(Some(WRITE_WAIT))?;
        let id = LinkId(tandem_engine::sampling::fresh_seed());
        stream.write_all(HELLO)?;
        stream.write_all(&id.0.to_le_bytes())?;
        let (tx, rx) = mpsc::channel::<Numbered>();
        let broken = Arc::new(AtomicBool::new(false));
        let flag = broken.clone();
        std::thread::Builder::new()
            .name("kv-link-writer".into())
            .spawn(move || {
                for (seq, payload) in rx {
                    if let Err(e) = write_frame(&mut stream, seq, &payload) {
                        tracing::warn!(link = %id, seq, "kv link broke, sending over gRPC from now on: {e}");
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })?;
        Ok(Arc::new(Self {
            id,
            queue: Mutex::new((0, tx)),
            broken,
        }))
    }

    pub fn id(&self) -> LinkId {
        self.id
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Queues `payload` and returns where the receiver will find it; gives the payload back when the link is
    /// broken (it then goes inline).
    pub fn send(&self, payload: Vec<u8>) -> Result<v1::KvLinkRef, Vec<u8>> {
        if self.is_broken() {
            return Err(payload);
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = q.0;
        let bytes = payload.len() as u64;
        match q.1.send((seq, payload)) {
            Ok(()) => {
                q.0 += 1;
                Ok(v1::KvLinkRef {
                    link_id: self.id.0,
                    seq,
                    bytes,
                })
            }
            Err(mpsc::SendError((_, payload))) => {
                self.broken.store(true, Ordering::Relaxed);
                Err(payload)
            }
        }
    }
}

/// The prefill worker's links, by the socket path a decode worker offers.
pub struct LinkSenders {
    /// This host, or `None` when links are off (or the host cannot be named): every offer is then declined.
    host: Option<String>,
    inner: Mutex<Senders>,
}

#[derive(Default)]
struct Senders {
    links: HashMap<PathBuf, Arc<LinkSender>>,
    /// Sockets that refused a connection, and when: not tried again for [`LinkSenders::RETRY_AFTER`].
    failed: HashMap<PathBuf, Instant>,
}

impl LinkSenders {
    /// Links kept at once (offers come from requests, so the table is bounded; past it, transfers use gRPC).
    pub const CAPACITY: usize = 64;
    /// How long a socket that refused a connection is left alone.
    pub const RETRY_AFTER: Duration = Duration::from_secs(30);

    /// A table that connects when `enabled`, else declines every offer.
    pub fn new(enabled: bool) -> Self {
        Self {
            host: if enabled { host_id() } else { None },
            inner: Mutex::default(),
        }
    }

    /// The link for a transfer to the decode worker that made `offer`: `None` (gRPC) when there is no offer, it is
    /// from another host, or its socket cannot be reached.
    pub fn for_offer(&self, offer: Option<&v1::KvLinkOffer>) -> Option<Arc<LinkSender>> {
        let host = self.host.as_deref()?;
        let offer = offer.filter(|o| o.host_id == host && !o.unix_socket.is_empty())?;
        let path = PathBuf::from(&offer.unix_socket);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.links.get(&path) {
            Some(l) if !l.is_broken() => return Some(l.clone()),
            Some(_) => {
                g.links.remove(&path);
            }
            None => {}
        }
        if g.failed
            .get(&path)
            .is_some_and(|t| t.elapsed() < Self::RETRY_AFTER)
        {
            return None;
        }
        if g.links.len() >= Self::CAPACITY {
            g.links.retain(|_, l| !l.is_broken());
            if g.links.len() >= Self::CAPACITY {
                return None;
            }
        }
        match LinkSender::connect(&path) {
            Ok(l) => {
                tracing::info!(link = %l.id(), socket = %path.display(), "kv link connected");
                g.failed.remove(&path);
                g.links.insert(path, l.clone());
                Some(l)
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), "kv link not connected, sending over gRPC: {e}");
                g.failed.retain(|_, t| t.elapsed() < Self::RETRY_AFTER);
                if g.failed.len() >= 16 * Self::CAPACITY {
                    g.failed.clear();
                }
                g.failed.insert(path, Instant::now());
                None
            }
        }
    }
}
