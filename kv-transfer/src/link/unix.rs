//! The Unix socket kind of link: the decode worker's socket ([`LinkListener`]) and the reading end of each link
//! accepted on it. Frames carry their `seq` and length, so a reader out of step with its sender notices, and
//! payloads whose headers never came can be skipped.

use super::recv::{Links, Source};
use super::{HELLO, LinkId, MAX_PAYLOAD, Payload, host_id, read_frame_head};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tandem_proto::v1;

/// How long a payload whose header arrived may take to arrive itself (its sender wrote it before the header).
const PAYLOAD_WAIT: Duration = Duration::from_secs(10);

/// The decode worker's link socket: accepts links into its [`Links`] until dropped, then removes its file and
/// closes the links.
pub struct LinkListener {
    path: PathBuf,
    links: Links,
    stop: Arc<AtomicBool>,
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
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        self.links.close();
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
    let source = SocketSource {
        id,
        stream: BufReader::with_capacity(64 << 10, stream),
    };
    links.serve(id, Box::new(source))
}

struct SocketSource {
    id: LinkId,
    /// Buffered, so that an idle check can look for data (or the end of the stream) without losing any.
    stream: BufReader<UnixStream>,
}

impl Source for SocketSource {
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
