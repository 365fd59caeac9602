//! A decode worker without a model, for measuring the router itself: it answers `Generate` with `max_tokens`
//! tokens on a fixed clock (a first token after `ttft`, then one every `itl`), so that any latency a client sees
//! beyond that clock is what the path in front of it added. `tandem bench serve --mock-workers` puts the router in
//! front of one and compares with calling it directly; the simulator and router tests can serve from it too.
//! Never an end-to-end test's engine: it knows nothing of the prompt beyond its length.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tandem_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The mock's clock.
#[derive(Debug, Clone, Copy)]
pub struct MockTiming {
    /// From the request's arrival to its first token.
    pub ttft: Duration,
    /// Between tokens after the first.
    pub itl: Duration,
}

/// A `DecodeWorker` that streams token ids `prompt_len, prompt_len + 1, ...` on [`MockTiming`]'s clock.
#[derive(Clone)]
pub struct MockDecodeWorker {
    timing: MockTiming,
    running: Arc<AtomicU32>,
    /// Answers load polls but refuses every generation as UNAVAILABLE (a worker on its way down).
    refuse: bool,
    /// Generations refused so far (shared by clones).
    refused: Arc<AtomicU32>,
}

impl MockDecodeWorker {
    pub fn new(timing: MockTiming) -> Self {
        Self {
            timing,
            running: Arc::new(AtomicU32::new(0)),
            refuse: false,
            refused: Arc::new(AtomicU32::new(0)),
        }
    }

    /// How many generations this worker (or a clone) refused.
    pub fn refused(&self) -> u32 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A worker that reports healthy but refuses every request as UNAVAILABLE.
    pub fn refusing(timing: MockTiming) -> Self {
        Self {
            refuse: true,
            ..Self::new(timing)
        }
    }

    pub fn server(self) -> v1::decode_worker_server::DecodeWorkerServer<Self> {
        v1::decode_worker_server::DecodeWorkerServer::new(self)
    }
}

/// Counts a stream as running until it ends or its client goes away.
struct Running(Arc<AtomicU32>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl v1::decode_worker_server::DecodeWorker for MockDecodeWorker {
    type GenerateStream = Boxed<v1::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<v1::DecodeRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if self.refuse {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable("shutting down"));
        }
        let r = request.into_inner();
        let max_tokens = r.stop.map_or(16, |s| s.max_tokens).max(1);
        let prompt_len = r.prompt_token_ids.len() as u32;
        if prompt_len == 0 {
            return Err(Status::invalid_argument("prompt_token_ids is empty"));
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let running = Running(self.running.clone());
        let MockTiming { ttft, itl } = self.timing;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _running = running;
            // Deadlines from the start, so that time spent sending never stretches the clock.
            let start = tokio::time::Instant::now();
            for i in 0..max_tokens {
                tokio::time::sleep_until(start + ttft + itl * i).await;
                let last = i + 1 == max_tokens;
                let msg = v1::GenerateResponse {
                    text: String::new(),
                    token_ids: vec![prompt_len + i],
                    finish_reason: if last {
                        v1::FinishReason::Length as i32
                    } else {
                        v1::FinishReason::Unspecified as i32
                    },
                    usage: last.then_some(v1::Usage {
                        prompt_tokens: prompt_len,
                        completion_tokens: max_tokens,
                        cached_prompt_tokens: 0,
                    }),
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn load(&self, _: Request<v1::LoadRequest>) -> Result<Response<v1::LoadReport>, Status> {
        let naming = crate::workers::BlockNaming::default();
        Ok(Response::new(v1::LoadReport {
            role: v1::WorkerRole::Decode as i32,
            running_requests: self.running.load(Ordering::Relaxed),
            block_size: naming.block_size as u32,
            hash_seed: naming.seed.0,
            ..Default::default()
        }))
    }

    type SubscribeKvEventsStream = Boxed<v1::KvEventBatch>;

    async fn subscribe_kv_events(
        &self,
        _: Request<v1::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        // No cache, so no events: a stream that stays open and silent.
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }

    async fn kv_snapshot(
        &self,
        _: Request<v1::KvSnapshotRequest>,
    ) -> Result<Response<v1::KvSnapshotResponse>, Status> {
        Ok(Response::new(v1::KvSnapshotResponse::default()))
    }
}
