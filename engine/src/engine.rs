//! The batched API the nodes call: sequences with block tables over one paged KV store, advanced by steps.
//!
//! A sequence is a list of tokens of which the first `kv_len` have K/V in the cache. A [`StepItem`] asks for the
//! next `n` pending tokens of a sequence to be computed; one [`Engine::step`] runs any mix of prefill chunks and
//! decode tokens (one each) as a single forward pass and returns the requested logits. Blocks are allocated before
//! the step (all-or-nothing, so a failed step leaves every sequence as it was) and completed blocks are hashed and
//! committed to the prefix cache after it. A new sequence starts from the longest cached prefix of its prompt.
//!
//! The engine is single-owner state (`&mut self`): a node runs it on one task and sends it commands.

use crate::backend::{AttentionTally, Backend, BatchLayout, SeqSlice};
use crate::error::{EngineError, Result};
use crate::kv::{
    BlockHash, BlockId, BlockPool, HashSeed, KvEvent, KvFormat, KvLayout, PoolStats,
    evict::AttentionScores, hash::hash_block,
};
use crate::model::{Head, HeadOut, LlamaModel, ModelSource, Scratch};
use crate::sampling::Draw;
use std::collections::HashMap;

mod external;
pub mod step_times;
pub use external::{KvView, TransferTarget};

/// Identifies a sequence inside one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Told each layer's index as soon as that layer's K/V of a step are in the store.
pub type LayerObserver<'a, B> = dyn FnMut(usize, &KvView<'_, B>) + 'a;

/// Engine construction options.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the pool; with `block_size` this is the KV budget.
    pub num_blocks: usize,
    pub kv_format: KvFormat,
    pub hash_seed: HashSeed,
    /// Largest number of tokens computed in one step (prefill chunk size).
    pub max_batch_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 1024,
            kv_format: KvFormat::F32,
            hash_seed: HashSeed::default(),
            max_batch_tokens: 512,
        }
    }
}

impl EngineConfig {
    /// Sizes the pool to fit a byte budget.
    pub fn with_kv_budget_bytes(mut self, model: &crate::model::ModelConfig, bytes: usize) -> Self {
        let per_block = model.layers
            * model.kv_heads
            * self
                .kv_format
                .block_head_bytes(model.head_dim, self.block_size);
        self.num_blocks = (bytes / per_block.max(1)).max(1);
        self
    }
}

/// Which logits a step item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// The last computed token's (to sample the next one).
    Last,
    /// Every computed token's (perplexity, fixtures).
    All,
}

#[derive(Debug, Clone, Copy)]
pub struct StepItem {
    pub seq: SeqId,
    /// Pending tokens to compute now (at most what is pending).
    pub n_tokens: usize,
    pub logits: LogitsWanted,
}

#[derive(Debug)]
struct Sequence {
    tokens: Vec<u32>,
    kv_len: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the complete blocks committed so far.
    hashes: Vec<BlockHash>,
    /// Whether this sequence's new blocks may enter the prefix cache: false once approximate K/V (a lossy transfer
    /// codec, eviction) was written, since everything computed after it attends to that approximation.
    shareable: bool,
    /// Prompt tokens whose K/V was evicted: token `p` (past the kept prompt) lives in cache slot `p - evicted`.
    evicted: usize,
    /// Attention summed per prompt position, for eviction policies, with the first query position that adds.
    scores: Option<(usize, AttentionScores)>,
}

impl Sequence {
    fn new(tokens: Vec<u32>, blocks: Vec<BlockId>, hashes: Vec<BlockHash>, bs: usize) -> Self {
        Self {
            tokens,
            kv_len: blocks.len() * bs,
            blocks,
            hashes,
            shareable: true,
            evicted: 0,
            scores: None,
        }
    }
    /// Cache slots in use.
    fn slots(&self) -> usize {
        self.kv_len - self.evicted
    }
}

/// Model + backend + KV store + block pool + sequences.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: LlamaModel<B>,
    kv: B::KvStore,
    pool: BlockPool,
    layout: KvLayout,
    seqs: HashMap<SeqId, Sequence>,
    next_id: u64,
    scratch: Scratch<B>,
    config: EngineConfig,
    prefix_hit_tokens: u64,
    steps: step_times::StepTimes,
}

impl<B: Backend> Engine<B> {
    pub fn new(
        backend: B,
        src: &ModelSource,
        config: EngineConfig,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        if config.block_size == 0 || config.block_size > 256 {
            return Err(EngineError::invalid(format!(
                "block_size {} must be in 1..=256",
                config.block_size
            )));
        }
        if config.max_batch_tokens == 0 {
            return Err(EngineError::invalid("max_batch_tokens must be at least 1"));
        }
        let model = LlamaModel::load(src, &backend, progress)?;
        let c = &model.config;
        let layout = KvLayout {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            format: config.kv_format,
        };
        let kv = backend.alloc_kv(
            &layout,
            &crate::kv::codec::KeyRotation::new(
                &model.config.rope,
                layout.head_dim,
                layout.block_size,
            ),
        )?;
        let scratch = Scratch::new(&backend);
        Ok(Self {
            backend,
            model,
            kv,
            pool: BlockPool::new(config.num_blocks),
            layout,
            seqs: HashMap::new(),
            next_id: 0,
            scratch,
            config,
            prefix_hit_tokens: 0,
            steps: Default::default(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
    pub fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }
    /// How this model's RoPE turns keys within a block: what the kivi2 codec undoes before quantizing them.
    pub fn key_rotation(&self) -> crate::kv::codec::KeyRotation {
        crate::kv::codec::KeyRotation::new(
            &self.model.config.rope,
            self.layout.head_dim,
            self.layout.block_size,
        )
    }
    /// How long recent forward passes took.
    pub fn recent_steps(&self) -> step_times::StepTimes {
        self.steps
    }
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.pool.drain_events()
    }

    /// Every block hash the cache holds, with the number of the last event recorded (see `BlockPool::snapshot`).
    pub fn kv_snapshot(&self) -> (u64, Vec<BlockHash>) {
        self.pool.snapshot()
    }
    /// Prompt tokens served from the prefix cache since the engine started.
    pub fn prefix_hit_tokens(&self) -> u64 {
        self.prefix_hit_tokens
    }

    /// Starts a sequence with `prompt`, reusing the longest cached prefix (always leaving at least one token to
    /// compute, since its logits are what the caller samples from).
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<SeqId> {
        self.validate_prompt(prompt)?;
        let bs = self.layout.block_size;
        let reusable = (prompt.len() - 1) / bs;
        let hashes = crate::kv::block_hashes(self.config.hash_seed, &prompt[..reusable * bs], bs);
        let blocks = self.pool.acquire_prefix(&hashes);
        self.prefix_hit_tokens += (blocks.len() * bs) as u64;
        let hashes = hashes[..blocks.len()].to_vec();
        Ok(self.insert(Sequence::new(prompt.to_vec(), blocks, hashes, bs)))
    }

    fn insert(&mut self, s: Sequence) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, s);
        id
    }

    /// Starts a sequence whose prompt is computed in full (no prefix reuse), summing, per layer and KV head, the
    /// attention that its query positions `from_pos..` pay to each prompt position; read them with
    /// [`Engine::attention_scores`] once the prompt is computed. Eviction policies rank tokens by these sums.
    pub fn add_sequence_scored(&mut self, prompt: &[u32], from_pos: usize) -> Result<SeqId> {
        self.validate_prompt(prompt)?;
        let l = &self.layout;
        let mut s = Sequence::new(prompt.to_vec(), Vec::new(), Vec::new(), l.block_size);
        s.scores = Some((
            from_pos,
            AttentionScores::zeros(l.layers, l.kv_heads, prompt.len()),
        ));
        Ok(self.insert(s))
    }

    /// The attention sums of a sequence started with [`Engine::add_sequence_scored`].
    pub fn attention_scores(&self, seq: SeqId) -> Result<Option<&AttentionScores>> {
        Ok(self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?
            .scores
            .as_ref()
            .map(|(_, s)| s))
    }

    /// Leading blocks of `prompt` that [`Engine::add_sequence`] would take from the prefix cache now.
    pub fn cached_prefix_blocks(&self, prompt: &[u32]) -> usize {
        let bs = self.layout.block_size;
        let reusable = prompt.len().saturating_sub(1) / bs;
        let hashes = crate::kv::block_hashes(self.config.hash_seed, &prompt[..reusable * bs], bs);
        self.pool.cached_prefix_len(&hashes)
    }

    /// Checks a prompt against the model: not empty, shorter than the context, every id in the vocabulary.
    pub fn validate_prompt(&self, prompt: &[u32]) -> Result<()> {
        let ctx = self.model.config.context_len;
        if prompt.is_empty() {
            return Err(EngineError::invalid("prompt is empty"));
        }
        if prompt.len() >= ctx {
            return Err(EngineError::invalid(format!(
                "prompt has {} tokens; the model's context is {ctx}",
                prompt.len()
            )));
        }
        if let Some(&t) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab)
        {
            return Err(EngineError::invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.model.config.vocab
            )));
        }
        Ok(())
    }

    /// Appends a token (usually the one just sampled); it is computed by the next step that includes the sequence.
    pub fn append_token(&mut self, seq: SeqId, token: u32) -> Result<()> {
        let ctx = self.model.config.context_len;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        if s.tokens.len() >= ctx {
            return Err(EngineError::invalid(format!(
                "sequence reached the model's context of {ctx} tokens"
            )));
        }
        s.tokens.push(token);
        Ok(())
    }

    /// Frees a sequence's blocks (cached blocks stay reusable by later prompts).
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        self.release_blocks(&s.blocks);
        Ok(())
    }

    /// Gives a sequence's blocks back: the store drops what it kept beside them, the pool takes them back.
    fn release_blocks(&mut self, blocks: &[BlockId]) {
        let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        self.backend.retire_kv_blocks(&mut self.kv, &ids);
        self.pool.release(blocks);
    }

    /// Drops every block of `seq` so its tokens are computed again from the first (a transfer that failed part-way
    /// falls back to local prefill this way, evicted or not); the sequence's id stays valid.
    pub fn discard_kv(&mut self, seq: SeqId) -> Result<()> {
        let bs = self.layout.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        let blocks = std::mem::take(&mut s.blocks);
        *s = Sequence::new(std::mem::take(&mut s.tokens), Vec::new(), Vec::new(), bs);
        self.release_blocks(&blocks);
        Ok(())
    }

    /// Tokens of a sequence whose K/V is cached, and all its tokens.
    pub fn seq_progress(&self, seq: SeqId) -> Result<(usize, usize)> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        Ok((s.kv_len, s.tokens.len()))
    }

    pub fn seq_tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?
            .tokens)
    }

    pub fn seq_blocks(&self, seq: SeqId) -> Result<&[BlockId]> {
        Ok(&self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?
            .blocks)
    }

    /// Runs one forward pass over `items`; returns, per item, its logits rows (`vocab` floats each; none, the last,
    /// or all computed tokens, as asked).
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<Vec<f32>>> {
        let (rows_of, out) = self.step_with(items, None, Head::Logits, &[])?;
        Ok(self.split_logits(&rows_of, out))
    }

    /// [`Engine::step`], calling `after_layer(layer, view)` as soon as each layer's K/V of this step is stored (a
    /// prefill worker ships blocks from there while later layers compute).
    pub fn step_observed(
        &mut self,
        items: &[StepItem],
        after_layer: &mut dyn FnMut(usize, &KvView<'_, B>),
    ) -> Result<Vec<Vec<f32>>> {
        let (rows_of, out) = self.step_with(items, Some(after_layer), Head::Logits, &[])?;
        Ok(self.split_logits(&rows_of, out))
    }

    /// Each item's rows of a step's logits.
    fn split_logits(&self, rows_of: &[usize], out: HeadOut) -> Vec<Vec<f32>> {
        let vocab = self.model.config.vocab;
        let HeadOut::Logits(logits) = out else {
            unreachable!("asked for logits")
        };
        let mut split = Vec::with_capacity(rows_of.len());
        let mut at = 0;
        for &n in rows_of {
            split.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        split
    }

    /// One step of `items`, each wanting at most its last row, greedy: the next token of each item that asked
    /// for logits, chosen where the logits are (on a GPU only the ids come back).
    pub fn step_argmax(&mut self, items: &[StepItem]) -> Result<Vec<u32>> {
        if items.iter().any(|i| i.logits == LogitsWanted::All) {
            return Err(EngineError::invalid(
                "step_argmax takes the last row of each item only",
            ));
        }
        match self.step_with(items, None, Head::Argmax, &[])?.1 {
            HeadOut::Tokens(t) => Ok(t),
            HeadOut::Logits(_) => unreachable!("asked for tokens"),
        }
    }

    /// One step of `items`, each wanting at most its last row: the next token of each item that asked for logits,
    /// drawn with its `draws` entry (in item order) where the logits are (on a GPU only the ids come back).
    pub fn step_draw(&mut self, items: &[StepItem], draws: &[Draw]) -> Result<Vec<u32>> {
        if items.iter().any(|i| i.logits == LogitsWanted::All) {
            return Err(EngineError::invalid(
                "step_draw takes the last row of each item only",
            ));
        }
        let asked = items
            .iter()
            .filter(|i| i.logits == LogitsWanted::Last)
            .count();
        if draws.len() != asked {
            return Err(EngineError::invalid(format!(
                "step_draw: {} draws for {asked} rows that ask for a token",
                draws.len()
            )));
        }
        // All greedy without penalties: the argmax head (and its recorded steps on a GPU) does the same with less.
        let head = if draws
            .iter()
            .all(|d| d.temperature == 0.0 && d.penalties.is_empty())
        {
            Head::Argmax
        } else {
            Head::Sample
        };
        match self.step_with(items, None, head, draws)?.1 {
            HeadOut::Tokens(t) => Ok(t),
            HeadOut::Logits(_) => unreachable!("asked for tokens"),
        }
    }

    /// The step itself; returns how many logit rows each item got, and the head's output.
    fn step_with(
        &mut self,
        items: &[StepItem],
        mut after_layer: Option<&mut LayerObserver<'_, B>>,
        head: Head,
        draws: &[Draw],
    ) -> Result<(Vec<usize>, HeadOut)> {
        let bs = self.layout.block_size;
        let total: usize = items.iter().map(|i| i.n_tokens).sum();
        if total == 0 {
            return Err(EngineError::invalid("step with no tokens"));
        }
        if total > self.config.max_batch_tokens {
            return Err(EngineError::invalid(format!(
                "step of {total} tokens exceeds max_batch_tokens {}",
                self.config.max_batch_tokens
            )));
        }
        // Validate and count the blocks every item needs before touching anything.
        let mut need = 0;
        let mut seen = std::collections::HashSet::new();
        for it in items {
            if !seen.insert(it.seq) {
                return Err(EngineError::invalid(format!(
                    "sequence {} appears twice in one step",
                    it.seq.0
                )));
            }
            let s = self
                .seqs
                .get(&it.seq)
                .ok_or(EngineError::UnknownSequence(it.seq.0))?;
            if s.kv_len < s.evicted {
                return Err(EngineError::invalid(format!(
                    "sequence {} is waiting for its transferred K/V",
                    it.seq.0
                )));
            }
            let pending = s.tokens.len() - s.kv_len;
            if it.n_tokens == 0 || it.n_tokens > pending {
                return Err(EngineError::invalid(format!(
                    "sequence {}: {} tokens asked, {pending} pending",
                    it.seq.0, it.n_tokens
                )));
            }
            need += (s.slots() + it.n_tokens)
                .div_ceil(bs)
                .saturating_sub(s.blocks.len());
        }
        let mut fresh = self.pool.allocate(need)?.into_iter();
        let mut batch = BatchLayout {
            head,
            draws: if head == Head::Sample {
                draws.to_vec()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let mut rows_of = Vec::with_capacity(items.len());
        for it in items {
            let s = self.seqs.get_mut(&it.seq).expect("validated above");
            let want_blocks = (s.slots() + it.n_tokens).div_ceil(bs);
            while s.blocks.len() < want_blocks {
                s.blocks.push(fresh.next().expect("allocated above"));
            }
            let first_row = batch.tokens.len();
            for p in s.kv_len..s.kv_len + it.n_tokens {
                let slot = p - s.evicted;
                batch.tokens.push(s.tokens[p]);
                batch.positions.push(p as u32);
                batch
                    .slots
                    .push(s.blocks[slot / bs].0 * bs as u32 + (slot % bs) as u32);
            }
            let logit_rows: Vec<usize> = match it.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last => vec![first_row + it.n_tokens - 1],
                LogitsWanted::All => (first_row..first_row + it.n_tokens).collect(),
            };
            rows_of.push(logit_rows.len());
            batch.logit_rows.extend(logit_rows);
            batch.seqs.push(SeqSlice {
                first_row,
                n_rows: it.n_tokens,
                start_pos: s.slots(),
                block_table: s.blocks.iter().map(|b| b.0).collect(),
            });
        }
        // Score sums move out of their sequences for the pass (the layer observer reads the sequences meanwhile).
        let mut scored: Vec<(SeqId, usize, AttentionScores)> = Vec::new();
        for it in items {
            let s = self.seqs.get_mut(&it.seq).expect("validated above");
            if let Some((from, sums)) = s.scores.take() {
                scored.push((it.seq, from, sums));
            }
        }
        let mut tallies: Vec<AttentionTally<'_>> = scored
            .iter_mut()
            .map(|(seq, from, sums)| AttentionTally {
                seq: items
                    .iter()
                    .position(|i| i.seq == *seq)
                    .expect("from items"),
                from_pos: *from,
                positions: sums.positions,
                sums: &mut sums.sums,
            })
            .collect();
        batch.capturable = after_layer.is_none() && tallies.is_empty();
        let (backend, seqs) = (&self.backend, &self.seqs);
        let started = std::time::Instant::now();
        let logits = self.model.forward(
            backend,
            &mut self.kv,
            &batch,
            &mut self.scratch,
            &mut tallies,
            &mut |layer, kv| {
                if let Some(f) = after_layer.as_mut() {
                    f(layer, &KvView::new(backend, kv, seqs))
                }
            },
        );
        drop(tallies);
        for (seq, from, sums) in scored {
            self.seqs.get_mut(&seq).expect("validated above").scores = Some((from, sums));
        }
        let logits = logits?;
        self.steps.record(started.elapsed(), total);
        // Commit progress and newly completed blocks.
        for it in items {
            let s = self.seqs.get_mut(&it.seq).expect("validated above");
            s.kv_len += it.n_tokens;
            commit_complete_blocks(s, &mut self.pool, self.config.hash_seed, bs);
        }
        Ok((rows_of, logits))
    }

    /// Computes every pending token of `seq` in chunks of at most `max_batch_tokens`; returns the last token's logits.
    pub fn prefill(&mut self, seq: SeqId) -> Result<Vec<f32>> {
        let mut last = Vec::new();
        loop {
            let (kv_len, len) = self.seq_progress(seq)?;
            let pending = len - kv_len;
            if pending == 0 {
                return Ok(last);
            }
            let n = pending.min(self.config.max_batch_tokens);
            let logits = if n == pending {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            last = self
                .step(&[StepItem {
                    seq,
                    n_tokens: n,
                    logits,
                }])?
                .pop()
                .unwrap_or_default();
        }
    }

    /// One decode step for every sequence in `seqs` (each with exactly one pending token): appends each one's
    /// greedy next token and returns them. Benchmarks and tests drive decoding with it.
    pub fn step_greedy(&mut self, seqs: &[SeqId]) -> Result<Vec<u32>> {
        let items: Vec<StepItem> = seqs
            .iter()
            .map(|&seq| StepItem {
                seq,
                n_tokens: 1,
                logits: LogitsWanted::Last,
            })
            .collect();
        let tokens = self.step_argmax(&items)?;
        for (&seq, &t) in seqs.iter().zip(&tokens) {
            self.append_token(seq, t)?;
        }
        Ok(tokens)
    }

    /// Forgets every cached prefix no sequence uses (see [`BlockPool::reset_prefix_cache`]); returns the number of
    /// blocks dropped. Evaluations use it so that one run's blocks are never another's cache hit.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.pool.reset_prefix_cache()
    }

    /// Copies a block of one layer out of the store (tests and transfer).
    pub fn read_kv_block(&self, layer: usize, block: BlockId) -> (Vec<f32>, Vec<f32>) {
        self.backend.read_kv_block(&self.kv, layer, block.0)
    }
}

/// Hashes the sequence's newly complete blocks and offers them to the prefix cache.
fn commit_complete_blocks(s: &mut Sequence, pool: &mut BlockPool, seed: HashSeed, bs: usize) {
    if !s.shareable {
        return;
    }
    while s.hashes.len() < s.kv_len / bs {
        let i = s.hashes.len();
        let h = hash_block(
            seed,
            s.hashes.last().copied(),
            &s.tokens[i * bs..(i + 1) * bs],
        );
        pool.commit(s.blocks[i], h);
        s.hashes.push(h);
    }
}
