//! The gRPC `DecodeWorker` service: admits a request, gets its KV from a prefill worker (or has the scheduler
//! prefill it), and relays the scheduler's tokens as the response stream.
//!
//! Each call's work runs in a task owned by its response stream. Whatever ends the call (last token, error,
//! client gone, deadline) drops the request's [`CancelGuard`], which tells the scheduler to free the blocks, and
//! drops the transfer session, which refuses any late chunk. A prefill worker that cannot be reached makes the
//! request prefill locally when `fallback_to_local_prefill` is on; any other prefill failure ends the call with
//! the reason.

use crate::DecodeConfig;
use crate::error::DecodeError;
use crate::scheduler::{AdmitRequest, Admitted, Event, RemotePrefill, SchedulerHandle, Summary};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_engine::SeqId;
use tandem_engine::generate::Emitted;
use tandem_engine::kv::BlockId;
use tandem_engine::kv::codec::Codec;
use tandem_engine::kv::evict::Eviction;
use tandem_engine::sampling::{Sampled, SamplingParams};
use tandem_engine::tokenizer::Tokenizer;
use tandem_kv_transfer::Sessions;
use tandem_prefill_node::runtime::EventHub;
use tandem_proto::{convert, v1};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// Most prefill workers a request may name besides its first (the router names two).
pub const MAX_PREFILL_ALTERNATES: usize = 8;
/// The longest pause before trying the next prefill worker (pauses double from 25 ms).
const MAX_ALTERNATE_PAUSE: Duration = Duration::from_secs(1);

pub struct DecodeService {
    shared: Arc<Shared>,
}

struct Shared {
    sched: SchedulerHandle,
    tok: Arc<Tokenizer>,
    sessions: Sessions,
    hub: EventHub,
    config: DecodeConfig,
    /// Where prefill workers send this worker's KV.
    transfer_endpoint: String,
    /// The same-host link prefill workers may send payloads on (`None`: gRPC only).
    link_offer: Option<v1::KvLinkOffer>,
    channels: tandem_prefill_node::channels::ChannelCache,
}

impl DecodeService {
    pub fn new(
        sched: SchedulerHandle,
        tok: Arc<Tokenizer>,
        sessions: Sessions,
        hub: EventHub,
        config: DecodeConfig,
        transfer_endpoint: String,
        link_offer: Option<v1::KvLinkOffer>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                sched,
                tok,
                sessions,
                hub,
                config,
                transfer_endpoint,
                link_offer,
                channels: Default::default(),
            }),
        }
    }
}

/// Frees a request's blocks when the call that owns it ends, however it ends.
struct CancelGuard {
    sched: SchedulerHandle,
    key: SeqId,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.sched.cancel(self.key);
    }
}

struct RemoteJob {
    request_id: String,
    /// Prefill workers in the order to try them.
    endpoints: Vec<String>,
    prompt: Vec<u32>,
    sampling: SamplingParams,
    cached_blocks: usize,
    dest_blocks: Vec<BlockId>,
    codec: Codec,
    eviction: Option<Eviction>,
}

impl Shared {
    fn channel(&self, endpoint: &str) -> Result<Channel, DecodeError> {
        self.channels
            .get(endpoint)
            .map_err(|e| DecodeError::Invalid(format!("prefill_endpoint {e}")))
    }

    /// Asks the job's prefill workers in turn for the prompt's KV, moving on from one that is unavailable after a
    /// pause that doubles each time; returns once every block arrived, or the last failure.
    async fn remote_prefill(
        &self,
        key: SeqId,
        job: &RemoteJob,
    ) -> Result<RemotePrefill, DecodeError> {
        let mut pause = Duration::from_millis(25);
        for (i, endpoint) in job.endpoints.iter().enumerate() {
            match self.prefill_from(key, job, endpoint).await {
                Err(DecodeError::Prefill {
                    code: Code::Unavailable,
                    message,
                    ..
                }) if i + 1 < job.endpoints.len() => {
                    let next = &job.endpoints[i + 1];
                    tracing::warn!(%endpoint, %next, "prefill worker unavailable ({message}); trying the next");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_ALTERNATE_PAUSE);
                }
                r => return r,
            }
        }
        Err(DecodeError::Invalid("no prefill worker named".into()))
    }

    /// One prefill worker's attempt at the job, under its own transfer session and deadline.
    async fn prefill_from(
        &self,
        key: SeqId,
        job: &RemoteJob,
        endpoint: &str,
    ) -> Result<RemotePrefill, DecodeError> {
        let timeout = self.config.transfer_timeout;
        let deadline = Instant::now() + timeout;
        let exact = job.codec == Codec::None && job.eviction.is_none();
        let sched = self.sched.clone();
        let _session = self.sessions.open(
            &job.dest_blocks,
            deadline,
            Box::new(move |chunk| sched.write_kv(key, chunk).map_err(|e| e.to_string())),
        );
        let request = v1::PrefillRequest {
            request_id: job.request_id.clone(),
            prompt_token_ids: job.prompt.clone(),
            blocks_on_decode: job.cached_blocks as u32,
            dest_endpoint: self.transfer_endpoint.clone(),
            transfer_session_id: _session.id().0,
            dest_block_ids: job.dest_blocks.iter().map(|b| b.0).collect(),
            codec: convert::kv_codec_to_wire(job.codec) as i32,
            // Past u32's range (49 days) the deadline is as good as none: saturate rather than wrap.
            deadline_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            sampling: Some(convert::sampling_to_wire(&job.sampling)),
            eviction: job.eviction.as_ref().map(convert::kv_eviction_to_wire),
            link_offer: self.link_offer.clone(),
        };
        let mut client =
            v1::prefill_worker_client::PrefillWorkerClient::new(self.channel(endpoint)?);
        let prefill_error = |s: Status| DecodeError::Prefill {
            endpoint: endpoint.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        };
        let r = match tokio::time::timeout_at(deadline.into(), client.prefill(request)).await {
            Err(_) => {
                return Err(DecodeError::TransferDeadline {
                    endpoint: endpoint.to_string(),
                    deadline_ms: timeout.as_millis() as u64,
                });
            }
            Ok(Err(s)) if s.code() == Code::DeadlineExceeded => {
                return Err(DecodeError::TransferDeadline {
                    endpoint: endpoint.to_string(),
                    deadline_ms: timeout.as_millis() as u64,
                });
            }
            Ok(r) => r.map_err(prefill_error)?.into_inner(),
        };
        let lp = r.first_token_logprob.as_ref();
        Ok(RemotePrefill {
            first: Sampled {
                token: r.first_token_id,
                logprob: lp.map(|l| l.logprob),
                top_logprobs: lp.map_or_else(Vec::new, |l| {
                    l.top.iter().map(|t| (t.token_id, t.logprob)).collect()
                }),
            },
            prefill_cached_tokens: r.cached_tokens as usize,
            prefill_time: Duration::from_micros(r.prefill_us),
            kv_bytes: r.kv_bytes_sent,
            kv_link_bytes: r.kv_bytes_on_link,
            exact,
        })
    }

    fn response(&self, e: Emitted, summary: Option<Summary>) -> v1::GenerateResponse {
        let text_of = |t: u32| self.tok.decode(&[t]).unwrap_or_default();
        let s = &e.token;
        v1::GenerateResponse {
            text: e.text,
            token_ids: vec![s.token],
            logprobs: s
                .logprob
                .map(|lp| v1::TokenLogprob {
                    token_id: s.token,
                    text: text_of(s.token),
                    logprob: lp,
                    top: s
                        .top_logprobs
                        .iter()
                        .map(|&(t, l)| v1::TopLogprob {
                            token_id: t,
                            text: text_of(t),
                            logprob: l,
                        })
                        .collect(),
                })
                .into_iter()
                .collect(),
            finish_reason: e.finished.map_or(
                v1::FinishReason::Unspecified,
                convert::finish_reason_to_wire,
            ) as i32,
            usage: summary.as_ref().map(|s| v1::Usage {
                prompt_tokens: s.prompt_tokens as u32,
                completion_tokens: s.completion_tokens as u32,
                cached_prompt_tokens: s.cached_prompt_tokens as u32,
            }),
            timings: summary.as_ref().map(|s| v1::Timings {
                time_to_first_token_us: s.time_to_first_token.as_micros() as u64,
                remote_prefill_us: s.remote_prefill_time.as_micros() as u64,
                kv_bytes_transferred: s.kv_bytes,
                prefilled_locally: s.prefilled_locally,
                kv_bytes_on_link: s.kv_link_bytes,
            }),
        }
    }
}

/// The work of one call: remote prefill if asked, then relaying tokens until the last one or until the client
/// goes away.
async fn drive(
    shared: Arc<Shared>,
    guard: CancelGuard,
    remote: Option<RemoteJob>,
    mut events: mpsc::UnboundedReceiver<Event>,
    out: mpsc::Sender<Result<v1::GenerateResponse, Status>>,
) {
    let key = guard.key;
    if let Some(job) = remote {
        let endpoint = job.endpoints.join(", ");
        let result = tokio::select! {
            r = shared.remote_prefill(key, &job) => r,
            _ = out.closed() => return,
        };
        let next = match result {
            Ok(p) => shared.sched.kv_ready(key, p),
            Err(DecodeError::Prefill {
                code: Code::Unavailable,
                message,
                ..
            }) if shared.config.fallback_to_local_prefill => {
                tracing::warn!(%endpoint, "prefill worker unavailable ({message}); prefilling locally");
                shared.sched.prefill_locally(key)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = next {
            let _ = out.send(Err(e.to_status())).await;
            return;
        }
    }
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = out.closed() => return,
        };
        match event {
            Some(Event::Token { emitted, summary }) => {
                let last = summary.is_some();
                if out
                    .send(Ok(shared.response(emitted, summary)))
                    .await
                    .is_err()
                    || last
                {
                    return;
                }
            }
            Some(Event::Failed(e)) => {
                let _ = out.send(Err(e.to_status())).await;
                return;
            }
            None => {
                let _ = out
                    .send(Err(
                        DecodeError::Unavailable("scheduler stopped".into()).to_status()
                    ))
                    .await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl v1::decode_worker_server::DecodeWorker for DecodeService {
    type GenerateStream = ReceiverStream<Result<v1::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<v1::DecodeRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        // Negotiation: a codec this worker cannot read is refused here, before a block is allocated or a byte moves.
        let codec = convert::kv_codec_from_wire(r.codec)
            .map_err(|e| DecodeError::Invalid(e.to_string()).to_status())?
            .unwrap_or(self.shared.config.kv_codec);
        let eviction = convert::kv_eviction_from_wire(r.eviction.as_ref(), "eviction")
            .map_err(|e| DecodeError::Invalid(e.to_string()).to_status())?;
        let mut sampling = convert::sampling_from_wire(&r.sampling.unwrap_or_default());
        sampling.seed = Some(
            sampling
                .seed
                .unwrap_or_else(tandem_engine::sampling::fresh_seed),
        );
        let stop = convert::stop_from_wire(&r.stop.unwrap_or_default());
        if r.prefill_alternates.len() > MAX_PREFILL_ALTERNATES {
            return Err(DecodeError::Invalid(format!(
                "prefill_alternates: {} given, at most {MAX_PREFILL_ALTERNATES}",
                r.prefill_alternates.len()
            ))
            .to_status());
        }
        if !r.resume_token_ids.is_empty() && !r.prefill_endpoint.is_empty() {
            return Err(DecodeError::Invalid(
                "resume_token_ids: a resumed request is prefilled here; prefill_endpoint must be empty".into(),
            )
            .to_status());
        }
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let admitted = self
            .shared
            .sched
            .admit(
                AdmitRequest {
                    prompt: r.prompt_token_ids.clone(),
                    sampling: sampling.clone(),
                    stop,
                    remote_prefill: !r.prefill_endpoint.is_empty(),
                    eviction,
                    resume: r.resume_token_ids.clone(),
                },
                ev_tx,
            )
            .await
            .map_err(|e| e.to_status())?;
        let (key, remote) = match admitted {
            Admitted::Local { key } => (key, None),
            Admitted::Remote {
                key,
                cached_blocks,
                dest_blocks,
                eviction,
            } => (
                key,
                Some(RemoteJob {
                    request_id: r.request_id.clone(),
                    endpoints: std::iter::once(r.prefill_endpoint.clone())
                        .chain(r.prefill_alternates.iter().cloned())
                        .collect(),
                    prompt: r.prompt_token_ids,
                    sampling,
                    cached_blocks,
                    dest_blocks,
                    codec,
                    eviction,
                }),
            ),
        };
        let guard = CancelGuard {
            sched: self.shared.sched.clone(),
            key,
        };
        let (out_tx, out_rx) = mpsc::channel(64);
        let span = tracing::info_span!("decode", request_id = %r.request_id);
        tokio::spawn(tracing::Instrument::instrument(
            drive(self.shared.clone(), guard, remote, ev_rx, out_tx),
            span,
        ));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn load(&self, _: Request<v1::LoadRequest>) -> Result<Response<v1::LoadReport>, Status> {
        self.shared
            .sched
            .load()
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    type SubscribeKvEventsStream = tandem_prefill_node::runtime::KvEventStream;

    async fn subscribe_kv_events(
        &self,
        _: Request<v1::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        Ok(Response::new(self.shared.hub.subscribe()))
    }

    async fn kv_snapshot(
        &self,
        _: Request<v1::KvSnapshotRequest>,
    ) -> Result<Response<v1::KvSnapshotResponse>, Status> {
        self.shared
            .sched
            .kv_snapshot()
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }
}
