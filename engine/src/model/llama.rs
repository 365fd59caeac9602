//! The Llama-family transformer forward pass, written once against [`Backend`].
//!
//! Per layer: RMSNorm -> Q/K/V projections (+ bias for Qwen2) -> RoPE -> write K/V into the paged store ->
//! grouped-query causal attention -> output projection -> residual; RMSNorm -> SwiGLU MLP -> residual. Then the
//! final norm and the output head (tied to the embeddings when the file has no `output.weight`), computed only for
//! the rows whose logits were asked for. The same function serves prefill chunks and batched decode: a batch is
//! just rows of tokens, each with a position and a sequence.

use crate::backend::{AttentionTally, Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::model::config::ModelConfig;
use crate::model::source::ModelSource;

struct Layer<B: Backend> {
    attn_norm: B::Vector,
    wq: B::Matrix,
    wk: B::Matrix,
    wv: B::Matrix,
    bias: Option<[B::Vector; 3]>,
    wo: B::Matrix,
    ffn_norm: B::Vector,
    w_gate: B::Matrix,
    w_up: B::Matrix,
    w_down: B::Matrix,
}

/// What the output head hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Head {
    /// Every logit of the asked rows, row-major.
    #[default]
    Logits,
    /// Each asked row's most likely token (greedy), computed where the logits are.
    Argmax,
    /// Each asked row's token drawn with its [`crate::sampling::Draw`] (`BatchLayout::draws`), where the logits are.
    Sample,
}

/// The output head's result, as [`Head`] asked.
#[derive(Debug)]
pub enum HeadOut {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

/// A loaded model on one backend.
pub struct LlamaModel<B: Backend> {
    pub config: ModelConfig,
    embed: B::Matrix,
    /// `None` when the output head is tied to the embeddings.
    output: Option<B::Matrix>,
    output_norm: B::Vector,
    layers: Vec<Layer<B>>,
}

/// Activation buffers reused across steps (one set per engine).
pub struct Scratch<B: Backend> {
    x: B::Activations,
    h: B::Activations,
    q: B::Activations,
    k: B::Activations,
    v: B::Activations,
    att: B::Activations,
    gate: B::Activations,
    up: B::Activations,
    sel: B::Activations,
    logits: B::Activations,
}

impl<B: Backend> Scratch<B> {
    pub fn new(backend: &B) -> Self {
        let a = || backend.activations(0, 0);
        Self {
            x: a(),
            h: a(),
            q: a(),
            k: a(),
            v: a(),
            att: a(),
            gate: a(),
            up: a(),
            sel: a(),
            logits: a(),
        }
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Loads every tensor the config calls for, checking names and shapes; `progress` is told after each layer.
    pub fn load(
        src: &ModelSource,
        backend: &B,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let c = src.config()?;
        let (d, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let embed_view = src.require("token_embd.weight", c.vocab, d)?;
        let embed = backend.load_matrix(&embed_view)?;
        let output = match src.tensor("output.weight")? {
            Some(_) => Some(backend.load_matrix(&src.require("output.weight", c.vocab, d)?)?),
            None => None,
        };
        let vec = |name: &str, n: usize| -> Result<B::Vector> {
            backend.load_vector(&src.require(name, 1, n)?)
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Matrix> {
            backend.load_matrix(&src.require(name, rows, cols)?)
        };
        let output_norm = vec("output_norm.weight", d)?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = if c.qkv_bias {
                Some([
                    vec(&p("attn_q.bias"), qd)?,
                    vec(&p("attn_k.bias"), kvd)?,
                    vec(&p("attn_v.bias"), kvd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec(&p("attn_norm.weight"), d)?,
                wq: mat(&p("attn_q.weight"), qd, d)?,
                wk: mat(&p("attn_k.weight"), kvd, d)?,
                wv: mat(&p("attn_v.weight"), kvd, d)?,
                bias,
                wo: mat(&p("attn_output.weight"), d, qd)?,
                ffn_norm: vec(&p("ffn_norm.weight"), d)?,
                w_gate: mat(&p("ffn_gate.weight"), c.ffn, d)?,
                w_up: mat(&p("ffn_up.weight"), c.ffn, d)?,
                w_down: mat(&p("ffn_down.weight"), d, c.ffn)?,
            });
            progress(i + 1, c.layers);
        }
        Ok(Self {
            config: c,
            embed,
            output,
            output_norm,
            layers,
        })
    }

    /// Runs one step over `batch`, writing every token's K/V into `kv`, and returns the logits of
    /// `batch.logit_rows` (row-major, `logit_rows.len() x vocab`) or their argmax, as `batch.head` asks, with attention
    /// summed into `tallies`.
    /// `after_layer(i, kv)` runs as soon as layer `i`'s K/V of this step are in the store, so a caller can ship
    /// them while later layers compute.
    pub fn forward(
        &self,
        backend: &B,
        kv: &mut B::KvStore,
        batch: &BatchLayout,
        s: &mut Scratch<B>,
        tallies: &mut [AttentionTally<'_>],
        after_layer: &mut dyn FnMut(usize, &B::KvStore),
    ) -> Result<HeadOut> {
        let head = batch.head;
        let c = &self.config;
        let n = batch.tokens.len();
        if n == 0 || batch.positions.len() != n || batch.slots.len() != n {
            return Err(EngineError::invalid(format!(
                "batch of {n} tokens with {} positions and {} slots",
                batch.positions.len(),
                batch.slots.len()
            )));
        }
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(EngineError::invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab
            )));
        }
        let plan = backend.plan(batch, &c.rope, c.head_dim, Some(&mut *kv));
        backend.embed(&self.embed, &plan, &mut s.x);
        if let Some(first) = self.layers.first() {
            backend.rms_norm(&s.x, &first.attn_norm, c.rms_eps, &mut s.h);
        }
        for (li, l) in self.layers.iter().enumerate() {
            // s.h holds this layer's normalized input here.
            backend.matmul(
                &s.h,
                &mut [(&l.wq, &mut s.q), (&l.wk, &mut s.k), (&l.wv, &mut s.v)],
            );
            if let Some([bq, bk, bv]) = &l.bias {
                backend.add_bias(&mut s.q, bq);
                backend.add_bias(&mut s.k, bk);
                backend.add_bias(&mut s.v, bv);
            }
            backend.rope_store_kv(&mut s.q, &mut s.k, &s.v, c.heads, c.kv_heads, kv, li, &plan);
            after_layer(li, kv);
            backend.attention(&s.q, kv, li, &plan, &mut s.att, tallies);
            backend.matmul(&s.att, &mut [(&l.wo, &mut s.h)]);
            backend.add_rms_norm(&mut s.x, &mut s.h, &l.ffn_norm, c.rms_eps);
            backend.swiglu(&s.h, &l.w_gate, &l.w_up, &mut s.gate, &mut s.up);
            backend.matmul(&s.gate, &mut [(&l.w_down, &mut s.h)]);
            match self.layers.get(li + 1) {
                Some(next) => backend.add_rms_norm(&mut s.x, &mut s.h, &next.attn_norm, c.rms_eps),
                None => backend.add(&mut s.x, &s.h),
            }
        }
        if batch.logit_rows.is_empty() {
            backend.check()?;
            return Ok(match head {
                Head::Logits => HeadOut::Logits(Vec::new()),
                Head::Argmax | Head::Sample => HeadOut::Tokens(Vec::new()),
            });
        }
        backend.gather_logit_rows(&s.x, &plan, &mut s.sel);
        backend.rms_norm(&s.sel, &self.output_norm, c.rms_eps, &mut s.h);
        let output = self.output.as_ref().unwrap_or(&self.embed);
        backend.matmul(&s.h, &mut [(output, &mut s.logits)]);
        let out = match head {
            Head::Logits => HeadOut::Logits(backend.to_host(&s.logits)),
            Head::Argmax => HeadOut::Tokens(backend.argmax_rows(&s.logits, c.vocab)),
            Head::Sample => {
                HeadOut::Tokens(backend.sample_rows(&s.logits, c.vocab, &plan, &batch.draws))
            }
        };
        backend.check()?;
        Ok(out)
    }
}
