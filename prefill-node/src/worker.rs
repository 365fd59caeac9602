//! The engine thread of a prefill worker: it owns the [`Engine`] and runs one prefill job at a time, in arrival
//! order, streaming each layer's new KV blocks to the decode worker as soon as the layer is stored.
//!
//! A job: match the prompt against this worker's own prefix cache; send the blocks the decode worker lacks that
//! are already cached here (all layers); then compute the rest in chunks of `max_batch_tokens`, and after each
//! layer of each chunk send that layer's blocks completed by the chunk (the partial last block with the last
//! chunk). Finally sample the first token and remove the sequence (its blocks stay in the prefix cache). A job with
//! token eviction computes the whole prompt first, then sends only the kept tokens (see `run_evicting_job`). Prefill
//! is compute-bound, so jobs are not batched together; a job whose caller went away stops after its current chunk.
//!
//! The thread also owns the device links the service joined (decision 0015): a job naming one sends each computed
//! layer's blocks on it, staged on the device in the cache's own format, and pushes only their headers.

use crate::error::PrefillError;
use crate::runtime::EventHub;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem_engine::backend::Backend;
use tandem_engine::backend::link::SenderLink;
use tandem_engine::kv::codec::Fill;
use tandem_engine::kv::evict::{self, Eviction};
use tandem_engine::kv::{BlockId, HashSeed};
use tandem_engine::sampling::{Sampled, Sampler, SamplingParams};
use tandem_engine::{Engine, LogitsWanted, StepItem};
use tandem_kv_transfer::chunk::{self, ChunkHeader, ChunkLayout, Encoding};
use tandem_kv_transfer::link::LinkId;
use tandem_kv_transfer::sender::Pusher;
use tandem_kv_transfer::{BlockData, SessionId};
use tandem_proto::{convert, v1};
use tokio::sync::{mpsc, oneshot};

/// One prompt to prefill for a decode worker.
pub struct PrefillJob {
    pub prompt: Vec<u32>,
    /// Leading whole blocks the decode worker already holds (not sent).
    pub blocks_on_decode: usize,
    /// Destination block ids for prompt blocks `blocks_on_decode..`, in order.
    pub dest_blocks: Vec<BlockId>,
    pub session: SessionId,
    /// With the seed set, so the decode worker can continue the same random stream.
    pub sampling: SamplingParams,
    /// How chunks are encoded (the codec the decode worker asked for).
    pub encoding: Encoding,
    pub pusher: Pusher,
    /// Token eviction before sending: then `blocks_on_decode` is 0 and `dest_blocks` hold the kept tokens.
    pub eviction: Option<Eviction>,
    /// A device link to the decode worker (added with [`EngineThread::add_link`]): the blocks each layer computes
    /// go on it, staged, instead of through the pusher's codec.
    pub device_link: Option<LinkId>,
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct PrefillOutcome {
    pub first: Sampled,
    pub cached_tokens: usize,
    pub computed_tokens: usize,
    pub compute_time: Duration,
    pub chunks: u32,
}

enum Command {
    Prefill(
        Box<PrefillJob>,
        oneshot::Sender<Result<PrefillOutcome, PrefillError>>,
    ),
    AddLink(LinkId, SharedLink, Announcer),
    DropLink(LinkId),
    KvSnapshot(oneshot::Sender<v1::KvSnapshotResponse>),
}

/// Queue depth and the pool's block counts as of the last job, readable without waiting for the engine thread
/// (a load report must answer while a long prefill runs).
#[derive(Default)]
struct Queue {
    jobs: AtomicUsize,
    tokens: AtomicU64,
    blocks_total: AtomicUsize,
    blocks_free: AtomicUsize,
    blocks_cached: AtomicUsize,
    step_us: AtomicU64,
    /// Mean tokens per step, as f32 bits.
    step_tokens: std::sync::atomic::AtomicU32,
}

impl Queue {
    /// Keeps the engine's pool and step figures for load reports (read off the engine thread).
    fn record<B: Backend>(&self, engine: &Engine<B>) {
        let s = engine.pool_stats();
        self.blocks_total.store(s.total, Ordering::Relaxed);
        self.blocks_free.store(s.free, Ordering::Relaxed);
        self.blocks_cached.store(s.cached, Ordering::Relaxed);
        let steps = engine.recent_steps();
        self.step_us.store(steps.mean_us(), Ordering::Relaxed);
        self.step_tokens
            .store((steps.mean_tokens as f32).to_bits(), Ordering::Relaxed);
    }
}

/// Owns the engine thread; dropping it stops the thread after its current job and joins it.
pub struct EngineThread {
    tx: Option<mpsc::UnboundedSender<Command>>,
    queue: Arc<Queue>,
    block_size: usize,
    hash_seed: HashSeed,
    join: Option<std::thread::JoinHandle<()>>,
}

impl EngineThread {
    pub fn spawn<B: Backend>(engine: Engine<B>, hub: EventHub) -> std::io::Result<Self>
    where
        Engine<B>: Send,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        queue.record(&engine);
        let (block_size, hash_seed) = (engine.config().block_size, engine.config().hash_seed);
        let q = queue.clone();
        let join = std::thread::Builder::new()
            .name("prefill-engine".into())
            .spawn(move || engine_loop(engine, hub, rx, q))?;
        Ok(Self {
            tx: Some(tx),
            queue,
            block_size,
            hash_seed,
            join: Some(join),
        })
    }

    pub async fn prefill(&self, job: PrefillJob) -> Result<PrefillOutcome, PrefillError> {
        let (reply, rx) = oneshot::channel();
        let tokens = job.prompt.len() as u64;
        self.queue.jobs.fetch_add(1, Ordering::Relaxed);
        self.queue.tokens.fetch_add(tokens, Ordering::Relaxed);
        self.send(Command::Prefill(Box::new(job), reply))?;
        rx.await
            .map_err(|_| PrefillError::Unavailable("engine thread stopped".into()))?
    }

    /// Hands a joined device link to the engine thread, for jobs that name it, with the half of its `DeviceLink`
    /// call that announces each payload sent (dropping the link ends the call).
    pub fn add_link(
        &self,
        id: LinkId,
        link: SharedLink,
        announce: Announcer,
    ) -> Result<(), PrefillError> {
        self.send(Command::AddLink(id, link, announce))
    }

    /// Drops a device link (it failed): jobs that name it later send without it.
    pub fn drop_link(&self, id: LinkId) {
        let _ = self.send(Command::DropLink(id));
    }

    /// The cache's hashes, answered by the engine thread between jobs (so after the one running now).
    pub async fn kv_snapshot(&self) -> Result<v1::KvSnapshotResponse, PrefillError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::KvSnapshot(reply))?;
        rx.await
            .map_err(|_| PrefillError::Unavailable("engine thread stopped".into()))
    }

    pub fn load(&self) -> v1::LoadReport {
        let q = &self.queue;
        v1::LoadReport {
            role: v1::WorkerRole::Prefill as i32,
            running_requests: 0,
            waiting_requests: q.jobs.load(Ordering::Relaxed) as u32,
            kv_blocks_total: q.blocks_total.load(Ordering::Relaxed) as u32,
            kv_blocks_free: q.blocks_free.load(Ordering::Relaxed) as u32,
            kv_blocks_cached: q.blocks_cached.load(Ordering::Relaxed) as u32,
            queued_prefill_tokens: q.tokens.load(Ordering::Relaxed),
            block_size: self.block_size as u32,
            hash_seed: self.hash_seed.0,
            recent_step_us: q.step_us.load(Ordering::Relaxed),
            recent_step_tokens: f32::from_bits(q.step_tokens.load(Ordering::Relaxed)),
        }
    }

    fn send(&self, c: Command) -> Result<(), PrefillError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(c).ok())
            .ok_or_else(|| PrefillError::Unavailable("shutting down".into()))
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn engine_loop<B: Backend>(
    mut engine: Engine<B>,
    hub: EventHub,
    mut rx: mpsc::UnboundedReceiver<Command>,
    queue: Arc<Queue>,
) {
    let mut links: HashMap<LinkId, DeviceSend> = HashMap::new();
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Command::AddLink(id, link, announce) => {
                links.insert(
                    id,
                    DeviceSend {
                        id,
                        link,
                        announce,
                        next_seq: 0,
                    },
                );
            }
            Command::DropLink(id) => {
                links.remove(&id);
            }
            Command::Prefill(job, reply) => {
                let tokens = job.prompt.len() as u64;
                let result = if reply.is_closed() {
                    Err(PrefillError::Unavailable("caller went away".into()))
                } else {
                    let link = job.device_link.and_then(|id| links.get_mut(&id));
                    run_job(&mut engine, &job, link, &|| reply.is_closed())
                };
                if let Err(e) = &result {
                    tracing::warn!(session = %job.session, "prefill failed: {e}");
                }
                queue.record(&engine);
                queue.jobs.fetch_sub(1, Ordering::Relaxed);
                queue.tokens.fetch_sub(tokens, Ordering::Relaxed);
                hub.publish(engine.drain_kv_events());
                let _ = reply.send(result);
            }
            Command::KvSnapshot(reply) => {
                let _ = reply.send(convert::kv_snapshot_to_wire(engine.kv_snapshot()));
            }
        }
    }
}

/// The sending half of a device link's `DeviceLink` call.
pub type Announcer = tokio::sync::mpsc::UnboundedSender<v1::KvDeviceLinkMessage>;

/// A device link's sending end, shared between the engine thread (which sends on it) and the service (which takes
/// it out and drops it, aborting its communicator, when a transfer on it fails: a send whose receiver is gone would
/// otherwise hold the engine's stream for ever). Empty once dropped.
pub type SharedLink = Arc<std::sync::Mutex<Option<SenderLink>>>;

/// A device link on the engine thread, where its payloads are announced, and the number its next payload gets.
struct DeviceSend {
    id: LinkId,
    link: SharedLink,
    announce: Announcer,
    next_seq: u64,
}

impl DeviceSend {
    /// Sends `layer` of `blocks` and announces the payload; returns where it is.
    fn send<B: Backend>(
        &mut self,
        view: &tandem_engine::engine::KvView<'_, B>,
        layer: usize,
        blocks: &[BlockId],
    ) -> Result<v1::KvLinkRef, String> {
        let bytes = {
            let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
            let link = link.as_ref().ok_or("the device link was closed")?;
            view.send_blocks(link, layer, blocks)
                .map_err(|e| e.to_string())?
        };
        let at = v1::KvLinkRef {
            link_id: self.id.0,
            seq: self.next_seq,
            bytes: bytes as u64,
        };
        self.next_seq += 1;
        // Announced whatever becomes of the chunk: the receiver posts its receive on the announcement.
        self.announce
            .send(v1::KvDeviceLinkMessage {
                kind: Some(v1::kv_device_link_message::Kind::Payload(at)),
            })
            .map_err(|_| "the device link's call ended".to_string())?;
        Ok(at)
    }
}

fn run_job<B: Backend>(
    engine: &mut Engine<B>,
    job: &PrefillJob,
    mut link: Option<&mut DeviceSend>,
    cancelled: &dyn Fn() -> bool,
) -> Result<PrefillOutcome, PrefillError> {
    let started = Instant::now();
    engine.validate_prompt(&job.prompt)?;
    job.sampling.validate()?;
    let bs = engine.config().block_size;
    let prompt_len = job.prompt.len();
    let total_blocks = prompt_len.div_ceil(bs);
    let on_decode = job.blocks_on_decode;
    if let Some(e) = &job.eviction {
        return run_evicting_job(engine, job, e, started, cancelled);
    }
    if on_decode >= total_blocks {
        return Err(PrefillError::Invalid(format!(
            "blocks_on_decode {on_decode} must be below the prompt's {total_blocks} blocks"
        )));
    }
    check_dest_blocks(job, total_blocks - on_decode)?;
    let seq = engine.add_sequence(&job.prompt)?;
    let result = (|| {
        let layers = engine.kv_layout().layers;
        let mut ship = Shipper::new(
            job,
            ChunkLayout::of(engine.kv_layout(), engine.key_rotation()),
        );
        let cached_tokens = engine.seq_progress(seq)?.0;
        let cached_blocks = cached_tokens / bs;
        let fill = |i: usize| Fill::of_block(i, prompt_len, bs);
        let dest =
            |r: &std::ops::Range<usize>| &job.dest_blocks[r.start - on_decode..r.end - on_decode];
        // Blocks this worker had cached that the decode worker lacks: all layers at once.
        if cached_blocks > on_decode {
            let ids = engine.seq_blocks(seq)?.to_vec();
            let range = on_decode..cached_blocks;
            for layer in 0..layers {
                let data = range
                    .clone()
                    .map(|i| {
                        let (k, v) = engine.read_kv_block(layer, ids[i]);
                        BlockData { k, v }
                    })
                    .collect();
                ship.send(layer, dest(&range), range.clone().map(fill).collect(), data);
            }
        }
        let mut sent_upto = on_decode.max(cached_blocks);
        // A failed send on the device link: later layers send nothing, and the job fails after the step.
        let mut link_error = None;
        let max_chunk = engine.config().max_batch_tokens;
        loop {
            let (kv_len, len) = engine.seq_progress(seq)?;
            let n = (len - kv_len).min(max_chunk);
            let end = kv_len + n;
            let last = end == len;
            let upto = if last { total_blocks } else { end / bs };
            let range = sent_upto..upto.max(sent_upto);
            let logits = engine.step_observed(
                &[StepItem {
                    seq,
                    n_tokens: n,
                    logits: if last {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                }],
                &mut |layer, view| {
                    if !range.is_empty() && link_error.is_none() {
                        let ids: Vec<_> = range
                            .clone()
                            .map(|i| {
                                view.seq_block(seq, i)
                                    .expect("blocks of this step are allocated")
                            })
                            .collect();
                        if let Some(l) = link.as_mut() {
                            match l.send(view, layer, &ids) {
                                Ok(at) => ship.send_staged(layer, dest(&range), at),
                                Err(e) => link_error = Some(e),
                            }
                            return;
                        }
                        let data = view
                            .read_blocks(layer, &ids)
                            .into_iter()
                            .map(|(k, v)| BlockData { k, v })
                            .collect();
                        ship.send(layer, dest(&range), range.clone().map(fill).collect(), data);
                    }
                },
            )?;
            if let Some(e) = link_error.take() {
                return Err(PrefillError::Unavailable(format!(
                    "sending on the device link: {e}"
                )));
            }
            sent_upto = range.end;
            if last {
                let first = sample_first(job, logits);
                return Ok(PrefillOutcome {
                    first,
                    cached_tokens,
                    computed_tokens: prompt_len - cached_tokens,
                    compute_time: started.elapsed(),
                    chunks: ship.index,
                });
            }
            if cancelled() {
                return Err(PrefillError::Unavailable("caller went away".into()));
            }
        }
    })();
    engine.remove_sequence(seq)?;
    result
}

/// A job with token eviction: the whole prompt is computed (with attention sums when the policy ranks by them,
/// and then without prefix reuse, since a cached prefix has no queries to rank by), cut to the budget, and the
/// kept tokens' K/V sent compacted, layer by layer, once the last chunk is done.
fn run_evicting_job<B: Backend>(
    engine: &mut Engine<B>,
    job: &PrefillJob,
    eviction: &Eviction,
    started: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<PrefillOutcome, PrefillError> {
    let bs = engine.config().block_size;
    let prompt_len = job.prompt.len();
    if job.blocks_on_decode != 0 {
        return Err(PrefillError::Invalid(format!(
            "blocks_on_decode is {} with eviction; an evicted prompt is sent whole, so it must be 0",
            job.blocks_on_decode
        )));
    }
    check_dest_blocks(job, eviction.kept_tokens(prompt_len, bs).div_ceil(bs))?;
    let seq = match eviction.policy.scored_from(prompt_len) {
        Some(from) => engine.add_sequence_scored(&job.prompt, from)?,
        None => engine.add_sequence(&job.prompt)?,
    };
    let result = (|| {
        let cached_tokens = engine.seq_progress(seq)?.0;
        let max_chunk = engine.config().max_batch_tokens;
        let logits = loop {
            let (kv_len, len) = engine.seq_progress(seq)?;
            let n = (len - kv_len).min(max_chunk);
            let last = kv_len + n == len;
            let wants = if last {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            let logits = engine.step(&[StepItem {
                seq,
                n_tokens: n,
                logits: wants,
            }])?;
            if last {
                break logits;
            }
            if cancelled() {
                return Err(PrefillError::Unavailable("caller went away".into()));
            }
        };
        let l = *engine.kv_layout();
        let scores = engine.attention_scores(seq)?;
        let plan = evict::plan(eviction, prompt_len, bs, l.layers, l.kv_heads, scores)?;
        let mut ship = Shipper::new(job, ChunkLayout::of(&l, engine.key_rotation()));
        // The kept tokens, compacted into the first blocks: the same fills for every layer.
        let fills: Vec<Fill> = (0..plan.kept.div_ceil(bs))
            .map(|i| Fill::of_block(i, plan.kept, bs))
            .collect();
        for layer in 0..l.layers {
            let blocks = engine.compact_layer(seq, &plan, layer)?;
            debug_assert_eq!(blocks.len(), fills.len());
            let data = blocks
                .into_iter()
                .map(|b| BlockData { k: b.k, v: b.v })
                .collect();
            ship.send(layer, &job.dest_blocks, fills.clone(), data);
        }
        Ok(PrefillOutcome {
            first: sample_first(job, logits),
            cached_tokens,
            computed_tokens: prompt_len - cached_tokens,
            compute_time: started.elapsed(),
            chunks: ship.index,
        })
    })();
    engine.remove_sequence(seq)?;
    result
}

fn check_dest_blocks(job: &PrefillJob, want: usize) -> Result<(), PrefillError> {
    if job.dest_blocks.len() != want {
        return Err(PrefillError::Invalid(format!(
            "dest_block_ids has {} ids; the prompt needs {want} beyond the {} on the decode worker",
            job.dest_blocks.len(),
            job.blocks_on_decode
        )));
    }
    Ok(())
}

fn sample_first(job: &PrefillJob, logits: Vec<Vec<f32>>) -> Sampled {
    let logits = logits.into_iter().next().unwrap_or_default();
    Sampler::new(job.sampling.clone(), &job.prompt).sample(&logits)
}

/// Encodes and pushes one job's chunks, numbering them.
struct Shipper<'a> {
    job: &'a PrefillJob,
    layout: ChunkLayout,
    index: u32,
}

impl<'a> Shipper<'a> {
    fn new(job: &'a PrefillJob, layout: ChunkLayout) -> Self {
        Self {
            job,
            layout,
            index: 0,
        }
    }

    /// The header of one layer's blocks into `dest`, staged and sent on a device link where `at` says.
    fn send_staged(&mut self, layer: usize, dest: &[BlockId], at: v1::KvLinkRef) {
        let header = ChunkHeader {
            session: self.job.session,
            index: self.index,
            layers: layer..layer + 1,
            blocks: dest.to_vec(),
            fills: Vec::new(),
        };
        self.job
            .pusher
            .push(chunk::staged(&header, &self.layout, at));
        self.index += 1;
    }

    /// One layer's blocks into destination `dest`, holding `fills` tokens each.
    fn send(&mut self, layer: usize, dest: &[BlockId], fills: Vec<Fill>, data: Vec<BlockData>) {
        let header = ChunkHeader {
            session: self.job.session,
            index: self.index,
            layers: layer..layer + 1,
            blocks: dest.to_vec(),
            fills,
        };
        self.job.pusher.push(chunk::encode(
            &header,
            &self.layout,
            self.job.encoding,
            &data,
        ));
        self.index += 1;
    }
}
