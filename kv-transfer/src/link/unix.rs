//! The Unix socket kind of link: the decode worker's socket ([`LinkListener`]) and the reading end of each link
//! accepted on it. Frames carry their `seq` and length, so a reader out of step with its sender notices, and
//! payloads whose headers never came can be skipped: the reader reads payloads strictly in `seq` order, keeping
//! requests that came early until their turn, and a payload whose header never comes (its sender's gRPC stream broke
//! after the payload was written) holds the line for [`HEADER_WAIT`] at most. Then the reader skips past it to the
//! oldest payload asked for, and a late header finds its payload gone (its chunk is resent inline).

use super::recv::{Links, Msg, Want};
use super::{HELLO, LinkId, MAX_PAYLOAD, Payload, host_id, read_frame_head};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tandem_proto::v1;

/// How long a payload whose header arrived may take to arrive itself (its sender wrote it before the header).
const PAYLOAD_WAIT: Duration = Duration::from_secs(10);
/// How long the reader waits for the header of the next payload on the stream while later payloads are asked for.
pub const HEADER_WAIT: Duration = Duration::from_secs(2);
/// How often an idle reader checks whether its sender went away or its links were closed.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// The decode worker's link socket: accepts links into its [`Links`] until dropped, then removes its file and
/// closes the links.
pub struct LinkListener {
    path: PathBuf,
    links: Links,
}

impl LinkListener {
    /// Listens at a fresh path in the temporary directory, for `links`.
    pub fn bind_temp(links: Links) -> std::io::Result<Self> {
        let name = format!(
            "tandem-kv-{}-{:08x}.sock",
            std::process::id(),
            tandem_engine::sampling::fresh_seed() as u32
        );
        Self::bind(&std::env::temp_dir().join(name), links)
    }

    /// Listens at `path` (readable and writable by this user only), for `links`.
    pub fn bind(path: &Path, links: Links) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let l = links.clone();
        std::thread::Builder::new()
            .name("kv-link-accept".into())
            .spawn(move || accept_loop(listener, l))?;
        Ok(Self {
            path: path.to_path_buf(),
            links,
        })
    }

    pub fn links(&self) -> Links {
        self.links.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the decode worker sends prefill workers (its device, where it accepts device links); `None` where the
    /// host cannot be named.
    pub fn offer(&self) -> Option<v1::KvLinkOffer> {
        let (device, device_cache) = self
            .links
            .devices()
            .map(|(d, cache)| (d.device(), cache.clone()))
            .unwrap_or_default();
        Some(v1::KvLinkOffer {
            host_id: host_id()?,
            unix_socket: self.path.to_string_lossy().into_owned(),
            device,
            device_cache,
        })
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        // Readers end, and the accept loop, woken by a connection, sees the links closed.
        self.links.close();
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, links: Links) {
    for conn in listener.incoming() {
        if links.is_closed() {
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
        let links = links.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-link-reader".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &links) {
                    tracing::warn!("kv link ended: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("kv link not accepted: {e}");
        }
    }
}

/// Reads a link's hello, then serves its payloads.
fn serve(mut stream: UnixStream, links: &Links) -> Result<(), String> {
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
    let (tx, rx) = links.register(id)?;
    drop(tx);
    tracing::info!(link = %id, "kv link accepted");
    let result = Reader {
        id,
        links: links.clone(),
        stream: BufReader::with_capacity(64 << 10, stream),
        next: 0,
        pending: BTreeMap::new(),
    }
    .run(&rx);
    links.unregister(id);
    result
}

/// The reading end of one Unix socket link: payloads strictly in `seq` order, each once its header asked for it.
struct Reader {
    id: LinkId,
    links: Links,
    /// Buffered, so that an idle check can look for data (or the end of the stream) without losing any.
    stream: BufReader<UnixStream>,
    /// The `seq` of the next payload on the stream.
    next: u64,
    /// Requests waiting for their turn, by `seq`.
    pending: BTreeMap<u64, Want>,
}

impl Reader {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<(), String> {
        let mut waiting_since: Option<Instant> = None;
        loop {
            if let Some(w) = self.pending.remove(&self.next) {
                match self.read(w.seq, w.bytes) {
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
                // The frames say their own seq and length: nothing is announced on a socket link.
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
                    if self.links.is_closed() || self.gone() {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let first = *self.pending.keys().next().expect("requests are waiting");
                    if let Err(e) = self.skip(self.next, first) {
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

    /// Reads the next frame, which must be payload `seq` of `bytes` bytes.
    fn read(&mut self, seq: u64, bytes: u64) -> Result<Payload, String> {
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
        Ok(Payload::Host(p))
    }

    /// Discards payloads `from..to`, whose headers did not come.
    fn skip(&mut self, from: u64, to: u64) -> Result<(), String> {
        for want in from..to {
            let (seq, len) = read_frame_head(&mut self.stream)
                .map_err(|e| format!("link {}: skipping payload {want}: {e}", self.id))?;
            if seq != want || len > MAX_PAYLOAD {
                return Err(format!(
                    "link {} out of step: expected payload {want}, the stream has {seq} of {len} bytes",
                    self.id
                ));
            }
            std::io::copy(&mut (&mut self.stream).take(len), &mut std::io::sink())
                .map_err(|e| format!("link {}: skipping payload {seq}: {e}", self.id))?;
        }
        Ok(())
    }

    /// Whether the sender closed its end (what is read meanwhile stays in the buffer).
    fn gone(&mut self) -> bool {
        let _ = self
            .stream
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(1)));
        let gone = matches!(self.stream.fill_buf(), Ok(b) if b.is_empty());
        let _ = self.stream.get_ref().set_read_timeout(Some(PAYLOAD_WAIT));
        gone
    }
}
