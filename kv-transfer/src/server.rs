//! The receiving end: the gRPC `KvTransfer.Push` service. Each chunk of the inbound stream is checked and handed to
//! its session ([`Sessions::deliver`]) and answered by one ack, in order: ACCEPTED, CORRUPT (resend it) or REFUSED
//! (with the reason). A chunk whose payload travels on a same-host link gets it from [`Links`] first; one whose
//! payload cannot be had there is answered CORRUPT, so its sender resends it inline. A broken or cancelled stream
//! just ends; the session's owner decides what that means.

use crate::error::TransferError;
use crate::link::{Links, Payload};
use crate::session::{SessionId, Sessions};
use tandem_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct KvTransferService {
    sessions: Sessions,
    links: Links,
}

impl KvTransferService {
    /// The service over `sessions`, taking linked payloads from `links` (empty where this worker offers none).
    pub fn new(sessions: Sessions, links: Links) -> Self {
        Self { sessions, links }
    }
    pub fn into_server(self) -> v1::kv_transfer_server::KvTransferServer<Self> {
        // Chunks are a few MiB at most (one layer's blocks of one prompt); allow up to 64 MiB.
        v1::kv_transfer_server::KvTransferServer::new(self).max_decoding_message_size(64 << 20)
    }
}

/// The ack for one chunk.
pub fn ack_for(c: &v1::KvChunk, result: Result<(), TransferError>) -> v1::KvAck {
    let (status, error) = match result {
        Ok(()) => (v1::KvAckStatus::Accepted, String::new()),
        Err(e @ (TransferError::Corrupt { .. } | TransferError::LinkFailed { .. })) => {
            (v1::KvAckStatus::Corrupt, e.to_string())
        }
        Err(e) => (v1::KvAckStatus::Refused, e.to_string()),
    };
    v1::KvAck {
        session_id: c.session_id,
        chunk_index: c.chunk_index,
        status: status as i32,
        error,
    }
}

#[tonic::async_trait]
impl v1::kv_transfer_server::KvTransfer for KvTransferService {
    type DeviceLinkStream = ReceiverStream<Result<v1::KvDeviceLinkReply, Status>>;

    async fn device_link(
        &self,
        request: Request<Streaming<v1::KvDeviceLinkMessage>>,
    ) -> Result<Response<Self::DeviceLinkStream>, Status> {
        use v1::kv_device_link_message::Kind;
        let mut inbound = request.into_inner();
        let Some(Kind::Open(open)) = inbound.message().await?.and_then(|m| m.kind) else {
            return Err(Status::invalid_argument(
                "a device link's first message must open it",
            ));
        };
        if self.links.devices().is_none() {
            return Err(Status::failed_precondition(
                "this worker accepts no device links",
            ));
        }
        let link = self
            .links
            .accept_device(&open)
            .map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(Ok(v1::KvDeviceLinkReply {})).await;
        // Owned by the call: announcements go to the link's reader until the caller ends the call (or it breaks),
        // which closes the link.
        tokio::spawn(async move {
            let _open = tx;
            while let Ok(Some(m)) = inbound.message().await {
                let announced = match m.kind {
                    Some(Kind::Payload(r)) => link.announce(&r),
                    _ => Err("a device link message that announces no payload".into()),
                };
                if let Err(e) = announced {
                    tracing::warn!("kv device link closed: {e}");
                    break;
                }
            }
            drop(link);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type PushStream = ReceiverStream<Result<v1::KvAck, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<v1::KvChunk>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (sessions, links) = (self.sessions.clone(), self.links.clone());
        // Owned by the response stream: it ends when the sender closes its side or stops reading acks.
        tokio::spawn(async move {
            while let Ok(Some(mut c)) = inbound.message().await {
                let result = match c.link.take() {
                    None if c.staged => Err(TransferError::Refused(
                        "a staged chunk without its link".into(),
                    )),
                    None => sessions.deliver(&c),
                    Some(r) => match (links.fetch(&r).await, c.staged) {
                        (Ok(Payload::Host(payload)), false) => {
                            c.payload = payload;
                            sessions.deliver(&c)
                        }
                        (Ok(Payload::Device(payload)), true) => {
                            sessions.deliver_staged(&c, payload)
                        }
                        (Ok(_), staged) => Err(TransferError::Refused(format!(
                            "a chunk marked staged={staged} whose link carries the other kind of payload"
                        ))),
                        (Err(reason), _) => Err(TransferError::LinkFailed {
                            session: SessionId(c.session_id),
                            index: c.chunk_index,
                            reason,
                        }),
                    },
                };
                if let Err(e) = &result {
                    tracing::warn!(
                        session = c.session_id,
                        chunk = c.chunk_index,
                        "kv chunk not accepted: {e}"
                    );
                }
                if tx.send(Ok(ack_for(&c, result))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
