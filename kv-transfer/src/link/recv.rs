//! The receiving side of links: the open links of one decode worker ([`Links`]) and the reader thread each has.
//!
//! The `Push` service asks [`Links::fetch`] for a chunk's payload once the chunk's header arrived; the link's reader
//! reads payloads strictly in `seq` order from its [`Source`] (a Unix socket, [`super::unix`], or a device link,
//! [`super::device`]), keeping requests that came early until their turn. A payload whose header never comes (its
//! sender's gRPC stream broke after the payload was written) holds the line for [`HEADER_WAIT`] at most: then a
//! Unix socket reader skips past it to the oldest payload asked for, and a late header finds its payload gone (its
//! chunk is resent inline). A device link's payloads are announced on the link's own call instead, and received in
//! that order whatever becomes of their chunks ([`super::device`]).

use super::{LinkId, MAX_PAYLOAD, Payload};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tandem_engine::backend::link::DeviceLinks;
use tandem_proto::v1;
use tokio::sync::oneshot;

/// How long the reader waits for the header of the next payload on the stream while later payloads are asked for.
pub const HEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a header naming a link not (yet) registered waits for it.
const REGISTER_WAIT: Duration = Duration::from_millis(200);
/// How often an idle reader checks whether its sender went away or its links were closed.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Where a Unix socket link's payloads come from, in order.
pub(super) trait Source {
    /// Reads the next payload, which must be number `seq` of `bytes` bytes.
    fn read(&mut self, seq: u64, bytes: u64) -> Result<Payload, String>;
    /// Discards payloads `from..to`, whose headers did not come; `Err` where this kind of link cannot.
    fn skip(&mut self, from: u64, to: u64) -> Result<(), String>;
    /// Whether the sender went away (asked while idle).
    fn gone(&mut self) -> bool;
}

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

    /// Registers link `id` and reads its payloads from `source` on this thread until the sender goes away, the
    /// link fails or the links are closed.
    pub(super) fn serve(&self, id: LinkId, source: Box<dyn Source>) -> Result<(), String> {
        let (tx, rx) = self.register(id)?;
        drop(tx);
        tracing::info!(link = %id, "kv link accepted");
        let result = Reader {
            id,
            links: self.clone(),
            source,
            next: 0,
            pending: BTreeMap::new(),
        }
        .run(&rx);
        self.unregister(id);
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, mpsc::Sender<Msg>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Reader {
    id: LinkId,
    links: Links,
    source: Box<dyn Source>,
    /// The `seq` of the next payload on the link.
    next: u64,
    /// Requests waiting for their turn, by `seq`.
    pending: BTreeMap<u64, Want>,
}

impl Reader {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<(), String> {
        let mut waiting_since: Option<Instant> = None;
        loop {
            if let Some(w) = self.pending.remove(&self.next) {
                match self.source.read(w.seq, w.bytes) {
                    Ok(p) => {
                        let _ = w.reply.send(Ok(p));
                        self.next += 1;
                        waiting_since = None;
                        continue;
                    }
                    Err(e) => {
                        let _ = w.reply.send(Err(e.clone()));
                        return Err(self.fail_all(e));
                    }
                }
            }
            let timeout = match (self.pending.is_empty(), waiting_since) {
                (true, _) => IDLE_CHECK,
                (false, Some(t)) => HEADER_WAIT.saturating_sub(t.elapsed()),
                (false, None) => {
                    waiting_since = Some(Instant::now());
                    HEADER_WAIT
                }
            };
            match rx.recv_timeout(timeout) {
                // A Unix socket link's frames say their own seq and length: nothing is announced.
                Ok(Msg::Announce { .. }) => {}
                Ok(Msg::Want(w)) if w.seq < self.next => {
                    let _ = w.reply.send(Err(format!(
                        "payload {} of link {} was skipped or already read",
                        w.seq, self.id
                    )));
                }
                Ok(Msg::Want(w)) => {
                    if let Some(old) = self.pending.insert(w.seq, w) {
                        let _ = old.reply.send(Err(format!(
                            "payload {} of link {} asked for twice",
                            old.seq, self.id
                        )));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if self.pending.is_empty() => {
                    if self.links.is_closed() || self.source.gone() {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let first = *self.pending.keys().next().expect("requests are waiting");
                    if let Err(e) = self.source.skip(self.next, first) {
                        return Err(self.fail_all(e));
                    }
                    tracing::warn!(link = %self.id, from = self.next, to = first, "kv link payloads skipped: their chunk headers did not arrive");
                    self.next = first;
                    waiting_since = None;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Answers every waiting request with `e` (the link is unusable); returns `e`.
    fn fail_all(&mut self, e: String) -> String {
        for (_, w) in std::mem::take(&mut self.pending) {
            let _ = w.reply.send(Err(e.clone()));
        }
        e
    }
}
