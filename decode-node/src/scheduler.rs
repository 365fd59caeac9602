//! The decode worker's scheduler: one thread that owns the [`Engine`] and every request's state, driven by
//! commands from the async side.
//!
//! A request is admitted when its worst-case blocks (prompt + max_tokens, capped by the context) fit beside the
//! reservations of the requests already admitted; otherwise it waits, in arrival order, so a running request never
//! runs out of blocks mid-generation. An admitted request either waits for its KV from a prefill worker (its
//! blocks are allocated first, and transferred chunks are written into exactly those), or is prefilled here in
//! chunks mixed into the decode steps (Sarathi-style, within `max_batch_tokens`). Then it decodes in the running
//! batch, one token per step, and new requests join between steps (continuous batching, as Orca and vLLM do).
//! Every token goes out on the request's event channel as soon as it is sampled; a closed channel (the client
//! went away) or a `Cancel` removes the request and frees its blocks at once.

use crate::error::DecodeError;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_engine::backend::Backend;
use tandem_engine::generate::{Emitted, Generation, StopConditions};
use tandem_engine::kv::BlockId;
use tandem_engine::kv::evict::Eviction;
use tandem_engine::sampling::{Draw, Sampled, SamplingParams};
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::{Engine, LogitsWanted, SeqId, StepItem};
use tandem_kv_transfer::{DecodedChunk, Delivered, StagedChunk};
use tandem_prefill_node::runtime::EventHub;
use tandem_proto::{convert, v1};
use tokio::sync::{mpsc, oneshot};

/// A tokenized request as the scheduler takes it.
#[derive(Debug, Clone)]
pub struct AdmitRequest {
    pub prompt: Vec<u32>,
    /// The seed is always set (the prefill worker samples the first token with it).
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// A prefill worker is available for this request.
    pub remote_prefill: bool,
    /// Token eviction for K/V that comes from a prefill worker.
    pub eviction: Option<Eviction>,
    /// Tokens another decode worker already streamed before it failed: prefilled here after the prompt, then
    /// generation continues after them.
    pub resume: Vec<u32>,
}

/// How an admitted request gets its prompt's K/V.
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    /// From a prefill worker, into `dest_blocks` (the prompt's blocks from `cached_blocks` on; with `eviction`, the
    /// kept tokens compacted, and `cached_blocks` is 0).
    Remote {
        key: SeqId,
        cached_blocks: usize,
        dest_blocks: Vec<BlockId>,
        eviction: Option<Eviction>,
    },
    /// Prefilled here; tokens follow on the event channel.
    Local { key: SeqId },
}

/// What a finished remote prefill reports.
#[derive(Debug, Clone)]
pub struct RemotePrefill {
    pub first: Sampled,
    pub prefill_cached_tokens: usize,
    pub prefill_time: Duration,
    pub kv_bytes: u64,
    /// Of `kv_bytes`, those that came on a same-host link.
    pub kv_link_bytes: u64,
    /// The K/V arrived exactly (codec `none`, no eviction); lossy K/V is never offered to the prefix cache.
    pub exact: bool,
}

/// What a request's remote prefill reported, kept for its summary.
#[derive(Debug, Clone, Copy)]
struct RemoteTotals {
    prefill_time: Duration,
    kv_bytes: u64,
    kv_link_bytes: u64,
}

/// Totals sent with a request's last token.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub remote_prefill_time: Duration,
    pub kv_bytes: u64,
    pub kv_link_bytes: u64,
    pub prefilled_locally: bool,
}

/// What a request's stream receives.
#[derive(Debug)]
pub enum Event {
    /// A token; `summary` is set on the last one.
    Token {
        emitted: Emitted,
        summary: Option<Summary>,
    },
    Failed(DecodeError),
}

enum Command {
    Admit {
        req: AdmitRequest,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Admitted, DecodeError>>,
    },
    WriteKv {
        key: SeqId,
        chunk: Delivered,
    },
    KvReady {
        key: SeqId,
        prefill: Box<RemotePrefill>,
    },
    PrefillLocally {
        key: SeqId,
    },
    Cancel {
        key: SeqId,
    },
    KvSnapshot(oneshot::Sender<v1::KvSnapshotResponse>),
    /// Fail every request and stop.
    Shutdown,
}

/// Scheduler options.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Uncached prompt tokens below this are prefilled here even when a prefill worker is available.
    pub local_prefill_threshold_tokens: usize,
}

/// Sends commands to the scheduler thread; dropping the last handle stops the thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    /// The load as of the scheduler's last command or step, so a load poll never waits behind a forward pass.
    load: Arc<std::sync::Mutex<v1::LoadReport>>,
}

/// Owns the scheduler thread: dropping it stops the thread (failing what is still running) and joins it.
pub struct SchedulerThread {
    tx: mpsc::UnboundedSender<Command>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// What a step gave one request to choose its next token from.
enum Next {
    Logits(Vec<f32>),
    /// The token drawn where the logits are, for a request that does not need them.
    Drawn(u32),
}

impl Drop for SchedulerThread {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl SchedulerHandle {
    fn send(&self, c: Command) -> Result<(), DecodeError> {
        self.tx
            .send(c)
            .map_err(|_| DecodeError::Unavailable("scheduler stopped".into()))
    }

    /// Admits a request (waiting for room in the KV cache if needed).
    pub async fn admit(
        &self,
        req: AdmitRequest,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Admitted, DecodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Admit { req, events, reply })?;
        rx.await
            .map_err(|_| DecodeError::Unavailable("scheduler stopped".into()))?
    }
    pub fn write_kv(&self, key: SeqId, chunk: Delivered) -> Result<(), DecodeError> {
        self.send(Command::WriteKv { key, chunk })
    }
    pub fn kv_ready(&self, key: SeqId, prefill: RemotePrefill) -> Result<(), DecodeError> {
        self.send(Command::KvReady {
            key,
            prefill: Box::new(prefill),
        })
    }
    pub fn prefill_locally(&self, key: SeqId) -> Result<(), DecodeError> {
        self.send(Command::PrefillLocally { key })
    }
    /// Removes a request and frees its blocks (no-op if it already ended).
    pub fn cancel(&self, key: SeqId) {
        let _ = self.send(Command::Cancel { key });
    }
    /// The load as the scheduler last published it (after its last command or step).
    pub async fn load(&self) -> Result<v1::LoadReport, DecodeError> {
        if self.tx.is_closed() {
            return Err(DecodeError::Unavailable("scheduler stopped".into()));
        }
        Ok(*self.load.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub async fn kv_snapshot(&self) -> Result<v1::KvSnapshotResponse, DecodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::KvSnapshot(reply))?;
        rx.await
            .map_err(|_| DecodeError::Unavailable("scheduler stopped".into()))
    }
}

/// Starts the scheduler thread over `engine`.
pub fn spawn<B: Backend>(
    engine: Engine<B>,
    tokenizer: Arc<Tokenizer>,
    hub: EventHub,
    config: SchedulerConfig,
) -> std::io::Result<(SchedulerHandle, SchedulerThread)>
where
    Engine<B>: Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let scheduler = Scheduler {
        engine,
        tok: tokenizer,
        hub,
        config,
        active: HashMap::new(),
        order: Vec::new(),
        waiting: VecDeque::new(),
        reserved_blocks: 0,
        published: Arc::new(std::sync::Mutex::new(v1::LoadReport::default())),
    };
    scheduler.publish_load();
    let load = scheduler.published.clone();
    let join = std::thread::Builder::new()
        .name("decode-scheduler".into())
        .spawn(move || scheduler.run(rx))?;
    Ok((
        SchedulerHandle {
            tx: tx.clone(),
            load,
        },
        SchedulerThread {
            tx,
            join: Some(join),
        },
    ))
}

enum Phase {
    /// Waiting for a prefill worker: `received[layer * dest.len() + i]` marks block `dest[i]` of `layer` written.
    AwaitingKv {
        dest: Vec<BlockId>,
        received: Vec<bool>,
        /// The blocks hold an evicted prompt's kept tokens.
        evicted: bool,
    },
    Prefilling,
    Running,
}

struct Active {
    phase: Phase,
    generation: Generation,
    events: mpsc::UnboundedSender<Event>,
    prompt_tokens: usize,
    cached_tokens: usize,
    reserved_blocks: usize,
    admitted_at: Instant,
    ttft: Duration,
    remote: Option<RemoteTotals>,
}

struct Waiting {
    req: AdmitRequest,
    events: mpsc::UnboundedSender<Event>,
    reply: oneshot::Sender<Result<Admitted, DecodeError>>,
    blocks: usize,
}

struct Scheduler<B: Backend> {
    engine: Engine<B>,
    tok: Arc<Tokenizer>,
    hub: EventHub,
    config: SchedulerConfig,
    active: HashMap<SeqId, Active>,
    /// Admission order, for fair step composition.
    order: Vec<SeqId>,
    waiting: VecDeque<Waiting>,
    reserved_blocks: usize,
    /// Where the load is published for [`SchedulerHandle::load`].
    published: Arc<std::sync::Mutex<v1::LoadReport>>,
}

impl<B: Backend> Scheduler<B> {
    fn publish_load(&self) {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = self.load();
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let runnable = self
                .active
                .values()
                .any(|a| matches!(a.phase, Phase::Running | Phase::Prefilling));
            if !runnable {
                match rx.blocking_recv() {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => {
                        self.handle(c);
                        self.publish_load();
                    }
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(Command::Shutdown) => return self.shutdown(),
                    Ok(c) => self.handle(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.shutdown(),
                }
            }
            self.admit_waiting();
            self.publish_load();
            self.step();
            self.publish_load();
            self.hub.publish(self.engine.drain_kv_events());
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for key in self.order.clone() {
            self.fail(key, DecodeError::Unavailable("shutting down".into()));
        }
        for w in self.waiting.drain(..) {
            let _ = w
                .reply
                .send(Err(DecodeError::Unavailable("shutting down".into())));
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Admit { req, events, reply } => self.enqueue(req, events, reply),
            Command::WriteKv { key, chunk } => self.write_kv(key, chunk),
            Command::KvReady { key, prefill } => self.kv_ready(key, *prefill),
            Command::PrefillLocally { key } => {
                if let Some(a) = self.active.get_mut(&key)
                    && let Phase::AwaitingKv { evicted, .. } = a.phase
                {
                    // The blocks are allocated; whatever arrived is overwritten by the local computation. Blocks
                    // sized for an evicted prompt are given back first: all of it is computed here.
                    a.phase = Phase::Prefilling;
                    a.remote = None;
                    if evicted && let Err(e) = self.engine.discard_kv(key) {
                        self.fail(key, e.into());
                    }
                }
            }
            Command::Cancel { key } => self.remove(key),
            Command::KvSnapshot(reply) => {
                let _ = reply.send(convert::kv_snapshot_to_wire(self.engine.kv_snapshot()));
            }
            Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn enqueue(
        &mut self,
        req: AdmitRequest,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Admitted, DecodeError>>,
    ) {
        let ctx = self.engine.model.config.context_len;
        let checked = (|| {
            self.engine.validate_prompt(&req.prompt)?;
            req.sampling.validate()?;
            req.stop.validate(ctx)?;
            Ok::<_, tandem_engine::EngineError>(())
        })();
        if let Err(e) = checked {
            let _ = reply.send(Err(e.into()));
            return;
        }
        let bs = self.engine.config().block_size;
        let blocks = (req.prompt.len() + req.stop.max_tokens)
            .min(ctx)
            .div_ceil(bs);
        let total = self.engine.pool_stats().total;
        if blocks > total {
            let _ = reply.send(Err(DecodeError::TooLarge(format!(
                "prompt ({} tokens) + max_tokens ({}) needs {blocks} KV blocks; this worker has {total}",
                req.prompt.len(),
                req.stop.max_tokens
            ))));
            return;
        }
        self.waiting.push_back(Waiting {
            req,
            events,
            reply,
            blocks,
        });
    }

    /// Admits waiting requests in order while their reservations fit.
    fn admit_waiting(&mut self) {
        let total = self.engine.pool_stats().total;
        while let Some(w) = self.waiting.front() {
            if w.reply.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if self.reserved_blocks + w.blocks > total {
                return;
            }
            let w = self.waiting.pop_front().expect("peeked");
            match self.start(&w.req, w.events, w.blocks) {
                Ok((admitted, active)) => {
                    let key = match &admitted {
                        Admitted::Remote { key, .. } | Admitted::Local { key } => *key,
                    };
                    self.reserved_blocks += w.blocks;
                    self.active.insert(key, active);
                    self.order.push(key);
                    if w.reply.send(Ok(admitted)).is_err() {
                        self.remove(key);
                    }
                }
                Err(e) => {
                    let _ = w.reply.send(Err(e));
                }
            }
        }
    }

    /// Creates the engine sequence for an admitted request.
    fn start(
        &mut self,
        req: &AdmitRequest,
        events: mpsc::UnboundedSender<Event>,
        reserved_blocks: usize,
    ) -> Result<(Admitted, Active), DecodeError> {
        let bs = self.engine.config().block_size;
        let layers = self.engine.kv_layout().layers;
        let cached_blocks = self.engine.cached_prefix_blocks(&req.prompt);
        let uncached = req.prompt.len() - cached_blocks * bs;
        let remote = req.remote_prefill
            && req.resume.is_empty()
            && uncached >= self.config.local_prefill_threshold_tokens;
        let (admitted, phase, key) = if remote {
            // Eviction that keeps every token is no eviction (and may use the prefix cache).
            let eviction = req
                .eviction
                .filter(|e| e.kept_tokens(req.prompt.len(), bs) < req.prompt.len());
            let t = match &eviction {
                Some(e) => self
                    .engine
                    .add_sequence_evicted(&req.prompt, e.kept_tokens(req.prompt.len(), bs))?,
                None => self.engine.add_sequence_for_transfer(&req.prompt)?,
            };
            let received = vec![false; layers * t.blocks.len()];
            let key = t.seq;
            (
                Admitted::Remote {
                    key,
                    cached_blocks: t.cached_blocks,
                    dest_blocks: t.blocks.clone(),
                    eviction,
                },
                Phase::AwaitingKv {
                    dest: t.blocks,
                    received,
                    evicted: eviction.is_some(),
                },
                key,
            )
        } else if req.resume.is_empty() {
            let key = self.engine.add_sequence(&req.prompt)?;
            (Admitted::Local { key }, Phase::Prefilling, key)
        } else {
            let tokens: Vec<u32> = req.prompt.iter().chain(&req.resume).copied().collect();
            let key = self.engine.add_sequence(&tokens)?;
            (Admitted::Local { key }, Phase::Prefilling, key)
        };
        let cached_tokens = self.engine.seq_progress(key)?.0.min(req.prompt.len());
        let mut generation = Generation::new(
            req.sampling.clone(),
            req.stop.clone(),
            &req.prompt,
            &self.tok,
        );
        let ctx = self.engine.model.config.context_len;
        if let Err(e) = generation.replay(&self.tok, &req.resume, req.prompt.len(), ctx) {
            let _ = self.engine.remove_sequence(key);
            return Err(e.into());
        }
        Ok((
            admitted,
            Active {
                phase,
                generation,
                events,
                prompt_tokens: req.prompt.len(),
                cached_tokens,
                reserved_blocks,
                admitted_at: Instant::now(),
                ttft: Duration::ZERO,
                remote: None,
            },
        ))
    }

    fn write_kv(&mut self, key: SeqId, chunk: Delivered) {
        // A request that no longer waits for K/V (done, failed, cancelled) takes none.
        let Some(Phase::AwaitingKv { .. }) = self.active.get(&key).map(|a| &a.phase) else {
            return;
        };
        match chunk {
            Delivered::Host(c) => self.write_host_kv(key, c),
            Delivered::Device(c) => self.write_staged_kv(key, c),
        }
    }

    /// A layer received over a device link, written as it is.
    fn write_staged_kv(&mut self, key: SeqId, c: StagedChunk) {
        if let Err(e) = self
            .engine
            .write_staged_blocks(key, c.layer, &c.blocks, c.payload)
        {
            return self.fail(key, e.into());
        }
        self.mark_received(key, c.layer..c.layer + 1, &c.blocks);
    }

    /// Notes that `layers` of `blocks` arrived for `key`.
    fn mark_received(&mut self, key: SeqId, layers: std::ops::Range<usize>, blocks: &[BlockId]) {
        let Some(a) = self.active.get_mut(&key) else {
            return;
        };
        let Phase::AwaitingKv { dest, received, .. } = &mut a.phase else {
            return;
        };
        for layer in layers {
            for block in blocks {
                if let Some(i) = dest.iter().position(|b| b == block) {
                    received[layer * dest.len() + i] = true;
                }
            }
        }
    }

    fn write_host_kv(&mut self, key: SeqId, chunk: DecodedChunk) {
        let nb = chunk.blocks.len();
        // One write per layer (a device engine copies a layer's blocks over at once); the first failure ends the
        // request and nothing after it is written.
        for (li, layer) in chunk.layers.clone().enumerate() {
            let data: Vec<(&[f32], &[f32])> = chunk
                .data
                .iter()
                .skip(li * nb)
                .take(nb)
                .map(|d| (&d.k[..], &d.v[..]))
                .collect();
            // A short chunk has fewer data than blocks: the engine refuses it.
            if let Err(e) = self
                .engine
                .write_transferred_blocks(key, layer, &chunk.blocks, &data)
            {
                self.fail(key, e.into());
                return;
            }
            self.mark_received(key, layer..layer + 1, &chunk.blocks);
        }
    }

    fn kv_ready(&mut self, key: SeqId, p: RemotePrefill) {
        let Some(a) = self.active.get_mut(&key) else {
            return;
        };
        let Phase::AwaitingKv { received, .. } = &a.phase else {
            return;
        };
        let got = received.iter().filter(|&&r| r).count();
        if got != received.len() {
            let expected = received.len();
            return self.fail(
                key,
                DecodeError::TransferIncomplete {
                    received: got,
                    expected,
                },
            );
        }
        a.phase = Phase::Running;
        a.remote = Some(RemoteTotals {
            prefill_time: p.prefill_time,
            kv_bytes: p.kv_bytes,
            kv_link_bytes: p.kv_link_bytes,
        });
        a.cached_tokens = a.cached_tokens.max(p.prefill_cached_tokens);
        if let Err(e) = self.engine.complete_transfer(key, p.exact) {
            return self.fail(key, e.into());
        }
        let a = self.active.get_mut(&key).expect("checked above");
        a.generation.sampler_mut().record_external(p.first.token);
        let ctx = self.engine.model.config.context_len;
        let emitted = a
            .generation
            .accept(&self.tok, p.first, a.prompt_tokens, ctx);
        a.ttft = a.admitted_at.elapsed();
        match emitted {
            Ok(e) => self.deliver(key, e),
            Err(e) => self.fail(key, e.into()),
        }
    }

    /// One forward pass: every running request's next token, then prefill chunks with the budget left.
    fn step(&mut self) {
        let budget = self.engine.config().max_batch_tokens;
        let mut items = Vec::new();
        for key in &self.order {
            if items.len() == budget {
                break;
            }
            if matches!(self.active[key].phase, Phase::Running) {
                items.push(StepItem {
                    seq: *key,
                    n_tokens: 1,
                    logits: LogitsWanted::Last,
                });
            }
        }
        let mut left = budget - items.len();
        for key in &self.order {
            if left == 0 {
                break;
            }
            if matches!(self.active[key].phase, Phase::Prefilling) {
                let Ok((kv_len, len)) = self.engine.seq_progress(*key) else {
                    continue;
                };
                let n = (len - kv_len).min(left);
                left -= n;
                items.push(StepItem {
                    seq: *key,
                    n_tokens: n,
                    logits: if kv_len + n == len {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                });
            }
        }
        if items.is_empty() {
            return;
        }
        // When no request choosing a token this step needs logits (logprobs), tokens are drawn where the logits are,
        // penalties included (on a GPU only the ids come back); otherwise every asked row's logits come to the host.
        let choosing: Vec<SeqId> = items
            .iter()
            .filter(|it| it.logits != LogitsWanted::None)
            .map(|it| it.seq)
            .collect();
        let on_device = choosing.iter().all(|k| {
            self.active
                .get(k)
                .is_some_and(|a| !a.generation.needs_logits())
        });
        let outcome = if on_device {
            let draws: Vec<Draw> = choosing
                .iter()
                .map(|k| {
                    self.active
                        .get_mut(k)
                        .expect("checked above")
                        .generation
                        .next_draw()
                })
                .collect();
            self.engine
                .step_draw(&items, &draws)
                .map(|t| t.into_iter().map(Next::Drawn).collect::<Vec<_>>())
        } else {
            self.engine.step(&items).map(|l| {
                items
                    .iter()
                    .zip(l)
                    .filter(|(it, _)| it.logits != LogitsWanted::None)
                    .map(|(_, l)| Next::Logits(l))
                    .collect()
            })
        };
        let nexts = match outcome {
            Ok(n) => n,
            Err(e) => {
                let e = DecodeError::from(e);
                for it in &items {
                    self.fail(it.seq, e.clone());
                }
                return;
            }
        };
        let ctx = self.engine.model.config.context_len;
        let choosing = items.iter().filter(|it| it.logits != LogitsWanted::None);
        for (it, next) in choosing.zip(nexts) {
            let key = it.seq;
            let Ok((_, len)) = self.engine.seq_progress(key) else {
                continue;
            };
            let a = self
                .active
                .get_mut(&key)
                .expect("stepped requests are active");
            if matches!(a.phase, Phase::Prefilling) {
                a.phase = Phase::Running;
                a.ttft = a.admitted_at.elapsed();
            }
            let emitted = match next {
                Next::Logits(l) => a.generation.sample(&self.tok, &l, len, ctx),
                Next::Drawn(t) => a.generation.take_drawn(&self.tok, t, len, ctx),
            };
            match emitted {
                Ok(e) => self.deliver(key, e),
                Err(e) => self.fail(key, e.into()),
            }
        }
    }

    /// Sends a token to its request; appends it for the next step, or ends the request.
    fn deliver(&mut self, key: SeqId, emitted: Emitted) {
        let a = &self.active[&key];
        let finished = emitted.finished.is_some();
        let summary = finished.then(|| Summary {
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.generation.generated(),
            cached_prompt_tokens: a.cached_tokens,
            time_to_first_token: a.ttft,
            remote_prefill_time: a.remote.map_or(Duration::ZERO, |r| r.prefill_time),
            kv_bytes: a.remote.map_or(0, |r| r.kv_bytes),
            kv_link_bytes: a.remote.map_or(0, |r| r.kv_link_bytes),
            prefilled_locally: a.remote.is_none(),
        });
        let token = emitted.token.token;
        let gone = a.events.send(Event::Token { emitted, summary }).is_err();
        if finished || gone {
            return self.remove(key);
        }
        if let Err(e) = self.engine.append_token(key, token) {
            self.fail(key, e.into());
        }
    }

    fn fail(&mut self, key: SeqId, e: DecodeError) {
        if let Some(a) = self.active.get(&key) {
            tracing::warn!(seq = key.0, "request failed: {e}");
            let _ = a.events.send(Event::Failed(e));
        }
        self.remove(key);
    }

    fn remove(&mut self, key: SeqId) {
        if let Some(a) = self.active.remove(&key) {
            self.reserved_blocks -= a.reserved_blocks;
            self.order.retain(|k| *k != key);
            let _ = self.engine.remove_sequence(key);
        }
    }

    fn load(&self) -> v1::LoadReport {
        let s = self.engine.pool_stats();
        let mut running = 0;
        let mut queued_tokens = 0u64;
        // Queued prefill tokens are the ones this worker will compute itself: a prompt awaiting a prefill worker's
        // K/V, or not yet admitted, is counted in waiting_requests only (routers add it to the prefill side).
        for (key, a) in &self.active {
            match a.phase {
                Phase::Running => running += 1,
                Phase::Prefilling => {
                    if let Ok((kv, len)) = self.engine.seq_progress(*key) {
                        queued_tokens += (len - kv) as u64;
                    }
                }
                _ => {}
            }
        }
        v1::LoadReport {
            role: v1::WorkerRole::Decode as i32,
            running_requests: running,
            waiting_requests: (self.active.len() as u32 - running) + self.waiting.len() as u32,
            kv_blocks_total: s.total as u32,
            kv_blocks_free: s.free as u32,
            kv_blocks_cached: s.cached as u32,
            queued_prefill_tokens: queued_tokens,
            block_size: self.engine.config().block_size as u32,
            hash_seed: self.engine.config().hash_seed.0,
            recent_step_us: self.engine.recent_steps().mean_us(),
            recent_step_tokens: self.engine.recent_steps().mean_tokens as f32,
        }
    }
}
