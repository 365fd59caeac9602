//! The receiving side of links: the decode worker's socket ([`LinkListener`]) and its open links ([`Links`]).
//!
//! Each accepted link has a reader thread that owns the stream. The `Push` service asks [`Links::fetch`] for a
//! chunk's payload once the chunk's header arrived; the reader reads payloads strictly in `seq` order, keeping
//! requests that came early until their turn. A payload whose header never comes (its sender's gRPC stream broke
//! after the payload was written) holds the line for [`HEADER_WAIT`] at most: then the reader skips past it to the
//! oldest payload asked for, and a late header finds its payload gone (its chunk is resent inline).

use super::{HELLO, LinkId, MAX_PAYLOAD, host_id, read_frame_head};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tandem_proto::v1;
use tokio::sync::oneshot;

/// How long the reader waits for the header of the next payload on the stream while later payloads are asked for.
pub const HEADER_WAIT: Duration = Duration::from_secs(2);
/// How long a payload whose header arrived may take to arrive itself (its sender wrote it before the header).
const PAYLOAD_WAIT: Duration = Duration::from_secs(10);
/// How long a header naming a link not (yet) registered waits for it.
const REGISTER_WAIT: Duration = Duration::from_millis(200);
/// How often an idle reader checks whether its sender went away.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// A chunk's request for its payload.
struct Want {
    seq: u64,
    bytes: u64,
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// The links open on one decode worker, by id.
#[derive(Clone, Default)]
pub struct Links {
    open: Arc<Mutex<HashMap<LinkId, mpsc::Sender<Want>>>>,
}

impl Links {
    /// The payload `r` names, read from its link once every earlier payload was; `Err` says why it cannot be had
    /// (the chunk is then resent inline).
    pub async fn fetch(&self, r: &v1::KvLinkRef) -> Result<Vec<u8>, String> {
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
        tx.send(Want {
            seq: r.seq,
            bytes: r.bytes,
            reply,
        })
        .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// The queue of link `id`'s reader. A sender sends its first header right after connecting, which can be
    /// before the reader has registered the link, so an unknown link is waited for briefly.
    async fn sender_of(&self, id: LinkId) -> Result<mpsc::Sender<Want>, String> {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, mpsc::Sender<Want>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The decode worker's link socket: accepts links until dropped, then removes its file.
pub struct LinkListener {
    path: PathBuf,
    links: Links,
    stop: Arc<AtomicBool>,
}

impl LinkListener {
    /// Listens at a fresh path in the temporary directory.
    pub fn bind_temp() -> std::io::Result<Self> {
        let name = format!(
            "tandem-kv-{}-{:08x}.sock",
            std::process::id(),
            tandem_engine::sampling::fresh_seed() as u32
        );
        Self::bind(&std::env::temp_dir().join(name))
    }

    /// Listens at `path` (readable and writable by this user only).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let links = Links::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (links.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kv-link-accept".into())
            .spawn(move || accept_loop(listener, l, s))?;
        Ok(Self {
            path: path.to_path_buf(),
            links,
            stop,
        })
    }

    pub fn links(&self) -> Links {
        self.links.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the decode worker sends prefill workers; `None` where the host cannot be named.
    pub fn offer(&self) -> Option<v1::KvLinkOffer> {
        Some(v1::KvLinkOffer {
            host_id: host_id()?,
            unix_socket: self.path.to_string_lossy().into_owned(),
        })
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        // Readers see their queue close and end.
        self.links.lock().clear();
    }
}

fn accept_loop(listener: UnixListener, links: Links, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("kv link socket: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (links, stop) = (links.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("kv-link-reader".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &links, stop) {
                    tracing::warn!("kv link ended: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("kv link not accepted: {e}");
        }
    }
}

/// Reads a link's hello, registers it, and reads its payloads until the sender goes away, the link fails or the
/// listener is dropped (`stop`).
fn serve(mut stream: UnixStream, links: &Links, stop: Arc<AtomicBool>) -> Result<(), String> {
    stream
        .set_read_timeout(Some(PAYLOAD_WAIT))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 16];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no hello: {e}"))?;
    if &hello[..8] != HELLO {
        return Err("not a tandem kv link (or another version)".into());
    }
    let id = LinkId(u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")));
    let (tx, rx) = mpsc::channel();
    if links.lock().insert(id, tx).is_some() {
        return Err(format!("link {id} connected twice"));
    }
    tracing::info!(link = %id, "kv link accepted");
    let result = Reader {
        id,
        stop,
        stream: BufReader::with_capacity(64 << 10, stream),
        next: 0,
        pending: BTreeMap::new(),
    }
    .run(&rx);
    links.lock().remove(&id);
    result
}

struct Reader {
    id: LinkId,
    /// Set when the listener is dropped (a link registered just after it cleared the table ends here).
    stop: Arc<AtomicBool>,
    /// Buffered, so that an idle check can look for data (or the end of the stream) without losing any.
    stream: BufReader<UnixStream>,
    /// The `seq` of the next payload on the stream.
    next: u64,
    /// Requests waiting for their turn, by `seq`.
    pending: BTreeMap<u64, Want>,
}

impl Reader {
    fn run(mut self, rx: &mpsc::Receiver<Want>) -> Result<(), String> {
        let mut waiting_since: Option<Instant> = None;
        loop {
            if let Some(w) = self.pending.remove(&self.next) {
                match self.read_payload(w.seq, w.bytes) {
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
                Ok(w) if w.seq < self.next => {
                    let _ = w.reply.send(Err(format!(
                        "payload {} of link {} was skipped or already read",
                        w.seq, self.id
                    )));
                }
                Ok(w) => {
                    if let Some(old) = self.pending.insert(w.seq, w) {
                        let _ = old.reply.send(Err(format!(
                            "payload {} of link {} asked for twice",
                            old.seq, self.id
                        )));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if self.pending.is_empty() => {
                    if self.stop.load(Ordering::Relaxed) || self.sender_gone() {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.skip_unclaimed() {
                        return Err(self.fail_all(e));
                    }
                    waiting_since = None;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Reads the next frame, which must be payload `seq` of `bytes` bytes.
    fn read_payload(&mut self, seq: u64, bytes: u64) -> Result<Vec<u8>, String> {
        let (got_seq, got_len) = read_frame_head(&mut self.stream)
            .map_err(|e| format!("link {}: reading payload {seq}: {e}", self.id))?;
        if (got_seq, got_len) != (seq, bytes) {
            return Err(format!(
                "link {} out of step: expected payload {seq} of {bytes} bytes, the stream has {got_seq} of {got_len}",
                self.id
            ));
        }
        let mut p = vec![0u8; bytes as usize];
        self.stream
            .read_exact(&mut p)
            .map_err(|e| format!("link {}: reading payload {seq}: {e}", self.id))?;
        Ok(p)
    }

    /// Discards the payloads before the oldest one asked for, whose headers did not come.
    fn skip_unclaimed(&mut self) -> Result<(), String> {
        let first = *self
            .pending
            .keys()
            .next()
            .expect("called with requests waiting");
        while self.next < first {
            let (seq, len) = read_frame_head(&mut self.stream)
                .map_err(|e| format!("link {}: skipping payload {}: {e}", self.id, self.next))?;
            if seq != self.next || len > MAX_PAYLOAD {
                return Err(format!(
                    "link {} out of step: expected payload {}, the stream has {seq} of {len} bytes",
                    self.id, self.next
                ));
            }
            std::io::copy(&mut (&mut self.stream).take(len), &mut std::io::sink())
                .map_err(|e| format!("link {}: skipping payload {seq}: {e}", self.id))?;
            tracing::warn!(link = %self.id, seq, "kv link payload skipped: its chunk header did not arrive");
            self.next += 1;
        }
        Ok(())
    }

    /// Whether the sender closed its end (what is read meanwhile stays in the buffer).
    fn sender_gone(&mut self) -> bool {
        let _ = self
            .stream
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(1)));
        let gone = matches!(self.stream.fill_buf(), Ok(b) if b.is_empty());
        let _ = self.stream.get_ref().set_read_timeout(Some(PAYLOAD_WAIT));
        gone
    }

    /// Answers every waiting request with `e` (the link is unusable); returns `e`.
    fn fail_all(&mut self, e: String) -> String {
        for (_, w) in std::mem::take(&mut self.pending) {
            let _ = w.reply.send(Err(e.clone()));
        }
        e
    }
}
