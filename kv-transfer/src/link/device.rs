//! The device kind of link (NCCL between two GPUs of one host, decision 0015): the receiving end, opened by a
//! prefill worker's `DeviceLink` call and joined on a thread of its own with a CUDA stream of its own.
//!
//! An NCCL receive must be posted with the exact size of the matching send, in the order of the sends, or the
//! sender's stream waits for ever. So payloads are not received when their chunk headers ask for them (a header can
//! be lost with its transfer, or overtaken): the sender announces every payload, in order, on the link's own call,
//! and the reader thread receives each announced payload at once and keeps it until a header claims it. A payload
//! no header claims within [`UNCLAIMED`] is freed; a header whose payload was not announced within [`UNANNOUNCED`] is
//! answered with an error (its chunk then fails its transfer). The link closes when the call ends.

use super::recv::{Links, Msg, Want};
use super::{LinkId, Payload};
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tandem_engine::backend::link::DeviceReceiver;
use tandem_proto::v1;

/// How long a received payload waits for the header that claims it.
pub const UNCLAIMED: Duration = Duration::from_secs(30);
/// How long a header waits for its payload's announcement (sent before the header).
pub const UNANNOUNCED: Duration = Duration::from_secs(5);
/// The largest payload a device link receives (one layer of a prompt's blocks).
const MAX_DEVICE_PAYLOAD: u64 = 1 << 30;
/// How often the reader looks for stale payloads and requests while idle.
const SWEEP: Duration = Duration::from_millis(200);

/// A device link being served: its payload announcements go to its reader; dropping it closes the link.
pub struct DeviceLinkHandle {
    id: LinkId,
    tx: mpsc::Sender<Msg>,
    links: Links,
}

impl DeviceLinkHandle {
    /// Passes on the sender's announcement of payload `r`.
    pub fn announce(&self, r: &v1::KvLinkRef) -> Result<(), String> {
        if r.link_id != self.id.0 {
            return Err(format!(
                "an announcement for link {:016x} on link {}",
                r.link_id, self.id
            ));
        }
        self.tx
            .send(Msg::Announce {
                seq: r.seq,
                bytes: r.bytes,
            })
            .map_err(|_| format!("link {} closed", self.id))
    }
}

impl Drop for DeviceLinkHandle {
    fn drop(&mut self) {
        self.links.unregister(self.id);
    }
}

impl Links {
    /// Checks a `DeviceLink` call's opening and starts joining its link on a new thread (the sender joins once
    /// this returns).
    pub fn accept_device(&self, r: &v1::KvDeviceLinkRequest) -> Result<DeviceLinkHandle, String> {
        let Some((devices, cache)) = self.devices().cloned() else {
            return Err("this worker accepts no device links".into());
        };
        if r.device_cache != *cache {
            return Err(format!(
                "device_cache {:?} differs from this worker's {cache:?}",
                r.device_cache
            ));
        }
        let id = LinkId(r.link_id);
        let (tx, rx) = self.register(id)?;
        let (nccl_id, links) = (r.nccl_id.clone(), self.clone());
        std::thread::Builder::new()
            .name("kv-link-device".into())
            .spawn(move || {
                let result = devices
                    .join_receiver(&nccl_id)
                    .map_err(|e| e.to_string())
                    .and_then(|receiver| {
                        tracing::info!(link = %id, "kv device link joined");
                        DeviceReader::new(id, receiver, links).run(&rx)
                    });
                if let Err(e) = result {
                    tracing::warn!(link = %id, "kv device link ended: {e}");
                }
            })
            .map_err(|e| {
                self.unregister(id);
                format!("no thread for the link: {e}")
            })?;
        Ok(DeviceLinkHandle {
            id,
            tx,
            links: self.clone(),
        })
    }
}

struct DeviceReader {
    id: LinkId,
    receiver: Box<dyn DeviceReceiver>,
    links: Links,
    /// The next payload the sender will announce.
    next: u64,
    /// Received payloads no header has claimed yet, with when they arrived.
    received: HashMap<u64, (Payload, u64, Instant)>,
    /// Headers waiting for their payload's announcement, with when they asked.
    waiting: HashMap<u64, (Want, Instant)>,
}

impl DeviceReader {
    fn new(id: LinkId, receiver: Box<dyn DeviceReceiver>, links: Links) -> Self {
        Self {
            id,
            receiver,
            links,
            next: 0,
            received: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<(), String> {
        loop {
            match rx.recv_timeout(SWEEP) {
                Ok(Msg::Announce { seq, bytes }) => self.receive(seq, bytes)?,
                Ok(Msg::Want(w)) => self.claim(w),
                Err(mpsc::RecvTimeoutError::Timeout) if self.links.is_closed() => return Ok(()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.sweep();
        }
    }

    /// Receives announced payload `seq`; an announcement out of order or a failed receive ends the link.
    fn receive(&mut self, seq: u64, bytes: u64) -> Result<(), String> {
        if seq != self.next || bytes > MAX_DEVICE_PAYLOAD {
            return Err(self.fail_all(format!(
                "link {}: announced payload {seq} of {bytes} bytes, expected payload {} of at most {MAX_DEVICE_PAYLOAD}",
                self.id, self.next
            )));
        }
        self.next += 1;
        let payload = match self.receiver.recv(bytes as usize) {
            Ok(p) => Payload::Device(p),
            Err(e) => {
                return Err(
                    self.fail_all(format!("link {}: receiving payload {seq}: {e}", self.id))
                );
            }
        };
        match self.waiting.remove(&seq) {
            Some((w, _)) => answer(w, payload, bytes),
            None => {
                self.received.insert(seq, (payload, bytes, Instant::now()));
            }
        }
        Ok(())
    }

    /// A header asks for its payload: given if received, kept if not yet announced, refused if gone.
    fn claim(&mut self, w: Want) {
        if let Some((payload, bytes, _)) = self.received.remove(&w.seq) {
            answer(w, payload, bytes);
        } else if w.seq < self.next {
            let _ = w.reply.send(Err(format!(
                "payload {} of link {} was claimed already or freed unclaimed",
                w.seq, self.id
            )));
        } else if let Some((old, _)) = self.waiting.insert(w.seq, (w, Instant::now())) {
            let _ = old.reply.send(Err(format!(
                "payload {} of link {} asked for twice",
                old.seq, self.id
            )));
        }
    }

    /// Frees payloads nobody claimed and refuses headers whose payload was never announced.
    fn sweep(&mut self) {
        let id = self.id;
        self.received.retain(|seq, (_, _, at)| {
            let keep = at.elapsed() < UNCLAIMED;
            if !keep {
                tracing::warn!(link = %id, seq, "kv device link payload freed: no chunk header claimed it");
            }
            keep
        });
        let stale: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (_, at))| at.elapsed() >= UNANNOUNCED)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in stale {
            if let Some((w, _)) = self.waiting.remove(&seq) {
                let _ = w.reply.send(Err(format!(
                    "payload {seq} of link {id} was not announced within {UNANNOUNCED:?}"
                )));
            }
        }
    }

    /// Answers every waiting header with `e` (the link is unusable); returns `e`.
    fn fail_all(&mut self, e: String) -> String {
        for (_, (w, _)) in self.waiting.drain() {
            let _ = w.reply.send(Err(e.clone()));
        }
        e
    }
}

/// Hands a payload to the header that claimed it, if the sizes agree.
fn answer(w: Want, payload: Payload, bytes: u64) {
    let r = if w.bytes == bytes {
        Ok(payload)
    } else {
        Err(format!(
            "payload {} is {bytes} bytes; its chunk header says {}",
            w.seq, w.bytes
        ))
    };
    let _ = w.reply.send(r);
}
