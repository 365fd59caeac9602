//! The receiving side of links: the open links of one decode worker ([`Links`]), each served by a reader thread of
//! its kind ([`super::unix`], [`super::device`]).
//!
//! The `Push` service asks [`Links::fetch`] for a chunk's payload once the chunk's header arrived; the request goes to
//! the link's reader, which answers it when the payload is its turn (a Unix socket link) or has been received (a
//! device link).

use super::{LinkId, MAX_PAYLOAD, Payload};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tandem_engine::backend::link::DeviceLinks;
use tandem_proto::v1;
use tokio::sync::oneshot;

/// How long a header naming a link not (yet) registered waits for it.
const REGISTER_WAIT: Duration = Duration::from_millis(200);

/// What a link's reader thread is sent.
pub(super) enum Msg {
    /// A chunk's request for its payload.
    Want(Want),
    /// A payload the sender sent (device links announce theirs, in order, on the link's own call).
    Announce { seq: u64, bytes: u64 },
}

/// A chunk's request for its payload.
pub(super) struct Want {
    pub(super) seq: u64,
    pub(super) bytes: u64,
    pub(super) reply: oneshot::Sender<Result<Payload, String>>,
}

/// The links open on one decode worker, by id.
#[derive(Clone, Default)]
pub struct Links {
    open: Arc<Mutex<HashMap<LinkId, mpsc::Sender<Msg>>>>,
    /// Set by [`Links::close`]: readers end.
    closed: Arc<AtomicBool>,
    /// This worker's device links and its cache's staging id, where it accepts them.
    device: Option<(Arc<dyn DeviceLinks>, String)>,
}

impl Links {
    /// Links that also accept device links of `links` for a cache whose staging id is `cache`.
    pub fn with_devices(mut self, links: Arc<dyn DeviceLinks>, cache: String) -> Self {
        self.device = Some((links, cache));
        self
    }

    /// This worker's device links and cache staging id, if it accepts device links.
    pub fn devices(&self) -> Option<&(Arc<dyn DeviceLinks>, String)> {
        self.device.as_ref()
    }

    /// The payload `r` names, read from its link once every earlier payload was; `Err` says why it cannot be had.
    pub async fn fetch(&self, r: &v1::KvLinkRef) -> Result<Payload, String> {
        let id = LinkId(r.link_id);
        if r.bytes > MAX_PAYLOAD {
            return Err(format!(
                "a payload of {} bytes on link {id}; the limit is {MAX_PAYLOAD}",
                r.bytes
            ));
        }
        let tx = self.sender_of(id).await?;
        let (reply, rx) = oneshot::channel();
        let closed = || format!("link {id} closed");
        tx.send(Msg::Want(Want {
            seq: r.seq,
            bytes: r.bytes,
            reply,
        }))
        .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// The queue of link `id`'s reader. A sender sends its first header right after connecting, which can be
    /// before the reader has registered the link, so an unknown link is waited for briefly.
    async fn sender_of(&self, id: LinkId) -> Result<mpsc::Sender<Msg>, String> {
        let started = Instant::now();
        loop {
            if let Some(tx) = self.lock().get(&id) {
                return Ok(tx.clone());
            }
            if started.elapsed() >= REGISTER_WAIT {
                return Err(format!("link {id} is not connected"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Links open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every link: their readers end (a reader in the middle of a payload first finishes it).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.lock().clear();
    }

    /// Registers link `id`: its reader's queue, and a sender for it besides the table's.
    pub(super) fn register(
        &self,
        id: LinkId,
    ) -> Result<(mpsc::Sender<Msg>, mpsc::Receiver<Msg>), String> {
        let (tx, rx) = mpsc::channel();
        let mut open = self.lock();
        if open.contains_key(&id) {
            return Err(format!("link {id} connected twice"));
        }
        open.insert(id, tx.clone());
        Ok((tx, rx))
    }

    /// Removes link `id` from the table (its reader ends once no other sender is left).
    pub(super) fn unregister(&self, id: LinkId) {
        self.lock().remove(&id);
    }

    /// Whether [`Links::close`] was called.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, mpsc::Sender<Msg>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}
