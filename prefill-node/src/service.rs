//! The gRPC `PrefillWorker` service: checks a request, opens the KV push stream to the decode worker (with the
//! same-host link it offers, where this worker can reach it), hands the job to the engine thread, and answers once
//! the first token is sampled and every chunk was acknowledged.

use crate::PrefillConfig;
use crate::device_links::DeviceLinkTable;
use crate::error::PrefillError;
use crate::runtime::EventHub;
use crate::worker::{EngineThread, PrefillJob};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_engine::backend::link::DeviceLinks;
use tandem_engine::kv::BlockId;
use tandem_engine::kv::codec::Codec;
use tandem_kv_transfer::chunk::Encoding;
use tandem_kv_transfer::link::LinkSenders;
use tandem_kv_transfer::{Sender, SessionId};
use tandem_proto::{convert, v1};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub struct PrefillService {
    engine: Arc<EngineThread>,
    hub: EventHub,
    channels: crate::channels::ChannelCache,
    links: LinkSenders,
    devices: DeviceLinkTable,
    config: PrefillConfig,
}

impl PrefillService {
    /// `devices`: the engine's device links and its cache's staging id, where it has them.
    pub fn new(
        engine: Arc<EngineThread>,
        hub: EventHub,
        config: PrefillConfig,
        devices: Option<(Arc<dyn DeviceLinks>, String)>,
    ) -> Self {
        Self {
            engine,
            hub,
            channels: Default::default(),
            links: LinkSenders::new(config.kv_link),
            devices: DeviceLinkTable::new(devices),
            config,
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, PrefillError> {
        self.channels
            .get(endpoint)
            .map_err(|e| PrefillError::Invalid(format!("dest_endpoint {e}")))
    }

    async fn prefill(&self, r: v1::PrefillRequest) -> Result<v1::PrefillResponse, PrefillError> {
        if r.dest_endpoint.is_empty() {
            return Err(PrefillError::Invalid("dest_endpoint is empty".into()));
        }
        let codec = convert::kv_codec_from_wire(r.codec)
            .map_err(|e| PrefillError::Invalid(e.to_string()))?
            .unwrap_or_default();
        let eviction = convert::kv_eviction_from_wire(r.eviction.as_ref(), "eviction")
            .map_err(|e| PrefillError::Invalid(e.to_string()))?;
        let mut sampling = convert::sampling_from_wire(&r.sampling.unwrap_or_default());
        if sampling.seed.is_none() {
            // The decode worker always sets it; a direct caller gets a fresh one.
            sampling.seed = Some(tandem_engine::sampling::fresh_seed());
        }
        let deadline = Instant::now()
            + if r.deadline_ms == 0 {
                self.config.default_deadline
            } else {
                Duration::from_millis(r.deadline_ms as u64)
            };
        let session = SessionId(r.transfer_session_id);
        let channel = self.channel(&r.dest_endpoint)?;
        // The device link moves the cache's own blocks: only for transfers that ask for no codec or eviction.
        let device_link = if codec == Codec::None && eviction.is_none() {
            let offer = r.link_offer.as_ref();
            self.devices
                .for_offer(offer, channel.clone(), &self.engine)
                .await
        } else {
            None
        };
        let link = self.links.for_offer(r.link_offer.as_ref());
        let sender = Sender::open(channel, session, deadline, link);
        let job = PrefillJob {
            prompt: r.prompt_token_ids,
            blocks_on_decode: r.blocks_on_decode as usize,
            dest_blocks: r.dest_block_ids.into_iter().map(BlockId).collect(),
            session,
            sampling,
            encoding: Encoding {
                codec,
                lossless: self.config.kv_lossless,
            },
            pusher: sender.pusher(),
            eviction,
            device_link,
        };
        let done = match tokio::time::timeout_at(deadline.into(), self.engine.prefill(job)).await {
            Ok(Ok(outcome)) => sender
                .finish()
                .await
                .map(|stats| (outcome, stats))
                .map_err(PrefillError::from),
            // Payloads already on a device link need no header to be received (they are announced on the link's
            // own call), so the sender is dropped with whatever it still holds.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(tandem_kv_transfer::TransferError::DeadlineExceeded(session).into()),
        };
        if let (Err(e), Some(id)) = (&done, device_link)
            && link_suspect(e)
        {
            tracing::warn!(link = %id, "a transfer on the device link failed, dropping the link: {e}");
            self.devices.broken(id, &self.engine);
        }
        let (outcome, stats) = done?;
        let first = &outcome.first;
        Ok(v1::PrefillResponse {
            first_token_id: first.token,
            first_token_logprob: first.logprob.map(|lp| v1::TokenLogprob {
                token_id: first.token,
                text: String::new(),
                logprob: lp,
                top: first
                    .top_logprobs
                    .iter()
                    .map(|&(t, l)| v1::TopLogprob {
                        token_id: t,
                        text: String::new(),
                        logprob: l,
                    })
                    .collect(),
            }),
            cached_tokens: outcome.cached_tokens as u32,
            computed_tokens: outcome.computed_tokens as u32,
            prefill_us: outcome.compute_time.as_micros() as u64,
            transfer_us: stats.elapsed.as_micros() as u64,
            kv_bytes_sent: stats.payload_bytes,
            kv_bytes_on_link: stats.link_bytes,
            chunks_sent: stats.chunks,
        })
    }
}

/// Whether a failed transfer says its device link may be unusable (a transport failure, a missed deadline, an
/// engine error on the link), rather than the request or its session being refused.
fn link_suspect(e: &PrefillError) -> bool {
    use tandem_kv_transfer::TransferError as T;
    matches!(
        e,
        PrefillError::Unavailable(_)
            | PrefillError::Transfer(
                T::Transport(_) | T::DeadlineExceeded(_) | T::LinkFailed { .. }
            )
    )
}

#[tonic::async_trait]
impl v1::prefill_worker_server::PrefillWorker for PrefillService {
    async fn prefill(
        &self,
        request: Request<v1::PrefillRequest>,
    ) -> Result<Response<v1::PrefillResponse>, Status> {
        let r = request.into_inner();
        let id = r.request_id.clone();
        let span = tracing::info_span!("prefill", request_id = %id, prompt_tokens = r.prompt_token_ids.len());
        match self.prefill(r).instrument(span).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                tracing::warn!(request_id = %id, "prefill failed: {e}");
                Err(e.to_status())
            }
        }
    }

    async fn load(&self, _: Request<v1::LoadRequest>) -> Result<Response<v1::LoadReport>, Status> {
        Ok(Response::new(self.engine.load()))
    }

    type SubscribeKvEventsStream = crate::runtime::KvEventStream;

    async fn subscribe_kv_events(
        &self,
        _: Request<v1::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        Ok(Response::new(self.hub.subscribe()))
    }

    async fn kv_snapshot(
        &self,
        _: Request<v1::KvSnapshotRequest>,
    ) -> Result<Response<v1::KvSnapshotResponse>, Status> {
        self.engine
            .kv_snapshot()
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }
}
