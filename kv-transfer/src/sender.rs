//! The sending end: one `KvTransfer.Push` stream per transfer session.
//!
//! [`Sender::open`] starts a driver task that owns the stream; [`Pusher::push`] (from [`Sender::pusher`]) queues a chunk without blocking, so
//! the engine thread can call it from inside a forward pass (after each layer) and go on computing while the chunk
//! travels. The driver keeps every chunk until it is acknowledged, resends one the receiver found corrupt (up to
//! [`MAX_RESENDS`] times), and fails the whole transfer on a refusal, a broken stream or the deadline.
//! [`Sender::finish`] closes the stream and waits for the last ack. Dropping a `Sender` cancels its driver.
//!
//! With a same-host link ([`crate::link`]) the driver writes each chunk's payload to the link and sends the header
//! alone; a resend always carries its payload inline, so a link that fails costs one resend per chunk in flight.
//! A staged chunk (its payload already sent on a device link by the engine thread) passes through as it is, and
//! cannot be resent: its loss fails the transfer as a transport failure.

use crate::error::TransferError;
use crate::link::LinkSender;
use crate::session::SessionId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_proto::v1;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Times a corrupt chunk is sent again before the transfer fails.
pub const MAX_RESENDS: u32 = 2;

/// What a finished transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub chunks: u32,
    /// Payload bytes (resends not counted).
    pub payload_bytes: u64,
    /// Of those, the bytes written to a same-host link.
    pub link_bytes: u64,
    /// From opening the stream to the last ack.
    pub elapsed: Duration,
}

pub struct Sender {
    session: SessionId,
    chunks: Option<mpsc::UnboundedSender<v1::KvChunk>>,
    driver: Option<JoinHandle<Result<TransferStats, TransferError>>>,
}

impl Sender {
    /// Opens a push stream for `session` over `channel`, with payloads on `link` where one is given; the whole
    /// transfer must end before `deadline`.
    pub fn open(
        channel: Channel,
        session: SessionId,
        deadline: Instant,
        link: Option<Arc<LinkSender>>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(channel, session, rx, deadline, link));
        Self {
            session,
            chunks: Some(tx),
            driver: Some(driver),
        }
    }

    pub fn session(&self) -> SessionId {
        self.session
    }

    /// A handle that can queue chunks from another thread.
    pub fn pusher(&self) -> Pusher {
        Pusher(self.chunks.clone())
    }

    /// Closes the stream and waits until every chunk is acknowledged (or the transfer fails).
    pub async fn finish(mut self) -> Result<TransferStats, TransferError> {
        self.chunks = None;
        let driver = self.driver.take().expect("finish consumes the sender");
        match driver.await {
            Ok(r) => r,
            Err(e) => Err(TransferError::Transport(format!(
                "transfer task failed: {e}"
            ))),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

/// Queues chunks for a [`Sender`] from any thread (the engine thread holds one during a prefill).
#[derive(Clone)]
pub struct Pusher(Option<mpsc::UnboundedSender<v1::KvChunk>>);

impl Pusher {
    pub fn push(&self, chunk: v1::KvChunk) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(chunk);
        }
    }
}

/// A chunk sent and not yet acknowledged, kept whole (payload inline) for a resend.
struct InFlight {
    chunk: v1::KvChunk,
    resends: u32,
    /// Its payload went on the link (and counts in `link_bytes` until it is resent inline).
    linked: bool,
}

async fn drive(
    channel: Channel,
    session: SessionId,
    mut input: mpsc::UnboundedReceiver<v1::KvChunk>,
    deadline: Instant,
    link: Option<Arc<LinkSender>>,
) -> Result<TransferStats, TransferError> {
    let started = Instant::now();
    let work = async {
        let (out_tx, out_rx) = mpsc::channel::<v1::KvChunk>(64);
        let mut client = v1::kv_transfer_client::KvTransferClient::new(channel)
            .max_encoding_message_size(64 << 20);
        // The call resolves as soon as the receiver answers with headers (it does not wait for chunks); chunks
        // queued meanwhile wait in `input`.
        let mut acks = client
            .push(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| TransferError::Transport(s.message().to_string()))?
            .into_inner();
        let mut stats = TransferStats::default();
        let mut inflight: BTreeMap<u32, InFlight> = BTreeMap::new();
        let mut input_done = false;
        loop {
            if input_done && inflight.is_empty() {
                stats.elapsed = started.elapsed();
                return Ok(stats);
            }
            tokio::select! {
                c = input.recv(), if !input_done => match c {
                    Some(c) => {
                        stats.chunks += 1;
                        stats.payload_bytes += c.payload.len() as u64;
                        let mut wire = c.clone();
                        if let Some(r) = &c.link {
                            // Already sent on a device link by the engine thread (a staged chunk).
                            stats.payload_bytes += r.bytes;
                            stats.link_bytes += r.bytes;
                        } else if let Some(l) = &link {
                            match l.send(std::mem::take(&mut wire.payload)) {
                                Ok(r) => {
                                    stats.link_bytes += r.bytes;
                                    wire.link = Some(r);
                                }
                                Err(payload) => wire.payload = payload,
                            }
                        }
                        let linked = wire.link.is_some();
                        inflight.insert(c.chunk_index, InFlight { chunk: c, resends: 0, linked });
                        out_tx.send(wire).await.map_err(|_| TransferError::Transport("stream closed".into()))?;
                    }
                    None => input_done = true,
                },
                a = acks.message() => {
                    let a = match a {
                        Ok(Some(a)) => a,
                        Ok(None) => return Err(TransferError::Transport("receiver closed the stream".into())),
                        Err(s) => return Err(TransferError::Transport(s.message().to_string())),
                    };
                    match v1::KvAckStatus::try_from(a.status) {
                        Ok(v1::KvAckStatus::Accepted) => {
                            inflight.remove(&a.chunk_index);
                        }
                        Ok(v1::KvAckStatus::Corrupt) => {
                            let Some(f) = inflight.get_mut(&a.chunk_index) else { continue };
                            if f.resends >= MAX_RESENDS {
                                return Err(TransferError::Corrupt { session, index: a.chunk_index });
                            }
                            if f.chunk.staged {
                                // Its payload is on the sender's device only, as the link took it: no resend.
                                return Err(TransferError::Transport(format!(
                                    "the device link lost chunk {}: {}", a.chunk_index, a.error
                                )));
                            }
                            f.resends += 1;
                            if std::mem::take(&mut f.linked) {
                                // It goes inline now: its bytes did not arrive by the link.
                                stats.link_bytes -= f.chunk.payload.len() as u64;
                            }
                            tracing::warn!(%session, chunk = a.chunk_index, "resending a chunk inline: {}", a.error);
                            out_tx.send(f.chunk.clone()).await.map_err(|_| TransferError::Transport("stream closed".into()))?;
                        }
                        _ => return Err(TransferError::Refused(a.error)),
                    }
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(r) => r,
        Err(_) => Err(TransferError::DeadlineExceeded(session)),
    }
}
