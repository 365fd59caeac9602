//! The seam between model code and hardware.
//!
//! The transformer (`model::llama`) is written once against [`Backend`]; a backend owns its memory (weights,
//! activations, the paged KV store) and its kernels. Everything a forward pass needs per step (positions, the slots
//! new K/V go to, each sequence's block table) is handed over once as a [`BatchLayout`] and turned into the
//! backend's own [`Backend::Plan`], so a GPU backend uploads it once per step and never round-trips per token or
//! per layer. Only the logits of the rows asked for come back to the host.

pub mod cpu;
pub mod cuda;
pub mod link;

use crate::error::Result;
use crate::kv::KvLayout;
use crate::model::config::RopeConfig;
use crate::model::source::WeightView;

/// One sequence's part of a batch.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// Rows of the batch (tokens) that belong to this sequence: `first_row..first_row + n_rows`.
    pub first_row: usize,
    pub n_rows: usize,
    /// Cache slot of the first of those tokens; the sequence's cached context after this step is `start_pos +
    /// n_rows` slots. Equal to the token's position unless the sequence's prompt K/V was evicted down to fewer slots
    /// (RoPE then uses [`BatchLayout::positions`], the true positions).
    pub start_pos: usize,
    /// Physical KV block ids in logical order, covering at least `start_pos + n_rows` slots.
    pub block_table: Vec<u32>,
}

/// What a forward step computes: tokens of several sequences, each attending to its own cached prefix.
#[derive(Debug, Clone, Default)]
pub struct BatchLayout {
    pub tokens: Vec<u32>,
    /// Absolute position of each token.
    pub positions: Vec<u32>,
    /// KV slot (`block * block_size + offset`) each token's K/V is written to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Rows whose logits are wanted, in output order.
    pub logit_rows: Vec<usize>,
    /// Whether those rows come back as logits, as their argmax, or as drawn tokens.
    pub head: crate::model::Head,
    /// With [`crate::model::Head::Sample`], each logit row's draw (in `logit_rows` order).
    pub draws: Vec<crate::sampling::Draw>,
    /// Nothing observes this step from outside the forward pass (no layer observer reads the cache mid-step, no
    /// attention tallies), so a device backend may record the step's work once and replay it for later steps of
    /// the same shape.
    pub capturable: bool,
}

/// Where a step's attention probabilities are summed per key position for one sequence (eviction policies rank
/// tokens by them): query rows at positions `from_pos..` of sequence `seq` (an index into [`BatchLayout::seqs`])
/// add their probabilities, summed over the query heads of each KV head's group, into
/// `sums[(layer * kv_heads + kv_head) * positions + key_position]`.
#[derive(Debug)]
pub struct AttentionTally<'a> {
    pub seq: usize,
    pub from_pos: usize,
    pub positions: usize,
    pub sums: &'a mut [f32],
}

/// A backend: memory and kernels for one device.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix in its stored (possibly quantized) format.
    type Matrix: Send + Sync;
    /// A small f32 parameter vector (norm weights, biases).
    type Vector: Send + Sync;
    /// A `rows x cols` f32 activation buffer.
    type Activations: Send;
    /// The paged K/V store for all layers.
    type KvStore: Send;
    /// A [`BatchLayout`] prepared for this device.
    type Plan;

    fn name(&self) -> &'static str;
    fn load_matrix(&self, w: &WeightView<'_>) -> Result<Self::Matrix>;
    fn load_vector(&self, w: &WeightView<'_>) -> Result<Self::Vector>;
    /// The paged K/V store of `layout`; `keys` is the model's key rotation within a block, the frame a format that
    /// quantizes key channels across a block's tokens (kivi2) quantizes them in.
    fn alloc_kv(
        &self,
        layout: &KvLayout,
        keys: &crate::kv::codec::KeyRotation,
    ) -> Result<Self::KvStore>;
    fn activations(&self, rows: usize, cols: usize) -> Self::Activations;
    /// The device's form of a step's layout. `kv` is the store the step writes, where a backend's cache format
    /// needs to know the step's writes ahead of them (kivi2 on CUDA gives each written block a place for its keys);
    /// `None` for a step that writes no cache.
    fn plan(
        &self,
        layout: &BatchLayout,
        rope: &RopeConfig,
        head_dim: usize,
        kv: Option<&mut Self::KvStore>,
    ) -> Self::Plan;

    /// `out[r] = table[tokens[r]]`.
    fn embed(&self, table: &Self::Matrix, plan: &Self::Plan, out: &mut Self::Activations);
    /// `out = x / rms(x) * w`, per row.
    fn rms_norm(
        &self,
        x: &Self::Activations,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Activations,
    );
    /// For each pair, `out = x @ w^T`. Several weights sharing one input run as one parallel region.
    fn matmul(&self, x: &Self::Activations, pairs: &mut [(&Self::Matrix, &mut Self::Activations)]);
    /// `x[r] += b` for every row.
    fn add_bias(&self, x: &mut Self::Activations, b: &Self::Vector);
    /// Rotates each head of `x` by its token's position.
    fn rope(&self, x: &mut Self::Activations, heads: usize, plan: &Self::Plan);
    /// Writes each row's K and V into its slot of `layer`.
    fn store_kv(
        &self,
        kv: &mut Self::KvStore,
        layer: usize,
        k: &Self::Activations,
        v: &Self::Activations,
        plan: &Self::Plan,
    );
    /// Causal attention of every query row over its sequence's cached K/V (grouped-query aware), adding the
    /// probabilities of the tallied rows to `tallies`.
    fn attention(
        &self,
        q: &Self::Activations,
        kv: &Self::KvStore,
        layer: usize,
        plan: &Self::Plan,
        out: &mut Self::Activations,
        tallies: &mut [AttentionTally<'_>],
    );
    /// `x += y`, then `y = x / rms(x) * w` per row (the residual add and the next norm, fused on a device).
    fn add_rms_norm(
        &self,
        x: &mut Self::Activations,
        y: &mut Self::Activations,
        w: &Self::Vector,
        eps: f32,
    ) {
        self.add(x, y);
        self.rms_norm(x, w, eps, y);
    }
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Activations, up: &Self::Activations);
    /// The SwiGLU feed-forward's first half: `gate = silu(x @ w_gate^T) * (x @ w_up^T)` (`up` is scratch). A device
    /// may do it in one pass over both weights.
    fn swiglu(
        &self,
        x: &Self::Activations,
        w_gate: &Self::Matrix,
        w_up: &Self::Matrix,
        gate: &mut Self::Activations,
        up: &mut Self::Activations,
    ) {
        self.matmul(x, &mut [(w_gate, &mut *gate), (w_up, &mut *up)]);
        self.silu_mul(gate, up);
    }
    /// RoPE on `q` (`heads`) and `k` (`kv_heads`), then `k` and `v` into their slots of `layer`. A device may do it
    /// in one pass.
    #[allow(clippy::too_many_arguments)]
    fn rope_store_kv(
        &self,
        q: &mut Self::Activations,
        k: &mut Self::Activations,
        v: &Self::Activations,
        heads: usize,
        kv_heads: usize,
        kv: &mut Self::KvStore,
        layer: usize,
        plan: &Self::Plan,
    ) {
        self.rope(q, heads, plan);
        self.rope(k, kv_heads, plan);
        self.store_kv(kv, layer, k, v, plan);
    }
    /// `x += y`.
    fn add(&self, x: &mut Self::Activations, y: &Self::Activations);
    /// Copies the plan's logit rows of `x` into `out` (`logit_rows.len()` rows).
    fn gather_logit_rows(
        &self,
        x: &Self::Activations,
        plan: &Self::Plan,
        out: &mut Self::Activations,
    );
    /// Copies activations to the host.
    fn to_host(&self, x: &Self::Activations) -> Vec<f32>;
    /// The index of each row's largest value (greedy sampling; the lowest index on ties), so that a device backend
    /// sends only token ids to the host.
    fn argmax_rows(&self, x: &Self::Activations, cols: usize) -> Vec<u32> {
        self.to_host(x)
            .chunks(cols.max(1))
            .map(crate::sampling::argmax)
            .collect()
    }
    /// Each row's token drawn with its [`crate::sampling::Draw`] (one per row), by the rule of
    /// [`crate::sampling::draw`], so that a device backend sends only token ids to the host. `draws` are the
    /// step's [`BatchLayout::draws`], which `plan` was made from: a device backend reads them from its copy of the
    /// plan (uploaded with the rest of the step's inputs, so that a recorded step finds each step's draws at the
    /// same address), a host backend from `draws`.
    fn sample_rows(
        &self,
        x: &Self::Activations,
        cols: usize,
        _plan: &Self::Plan,
        draws: &[crate::sampling::Draw],
    ) -> Vec<u32> {
        self.to_host(x)
            .chunks(cols.max(1))
            .zip(draws)
            .map(|(row, d)| crate::sampling::draw(row, d))
            .collect()
    }
    /// Copies one block's K and V of `layer` to the host (`[kv_heads][block_size][head_dim]` each), for transfer and tests.
    fn read_kv_block(&self, kv: &Self::KvStore, layer: usize, block: u32) -> (Vec<f32>, Vec<f32>);
    /// [`Backend::read_kv_block`] for several blocks of `layer`, in `blocks` order. A device backend copies them
    /// over at once.
    fn read_kv_blocks(
        &self,
        kv: &Self::KvStore,
        layer: usize,
        blocks: &[u32],
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        blocks
            .iter()
            .map(|&b| self.read_kv_block(kv, layer, b))
            .collect()
    }
    /// Overwrites one block's K and V of `layer` (same shapes as [`Backend::read_kv_block`]); the caller checks
    /// `layer`, `block` and the lengths against the layout.
    fn write_kv_block(
        &self,
        kv: &mut Self::KvStore,
        layer: usize,
        block: u32,
        k: &[f32],
        v: &[f32],
    );
    /// [`Backend::write_kv_block`] for several blocks of `layer`, `data` (K, V) in `blocks` order; the caller
    /// checks as for one block. A device backend copies them over at once.
    fn write_kv_blocks(
        &self,
        kv: &mut Self::KvStore,
        layer: usize,
        blocks: &[u32],
        data: &[(&[f32], &[f32])],
    ) {
        for (&b, (k, v)) in blocks.iter().zip(data) {
            self.write_kv_block(kv, layer, b, k, v);
        }
    }
    /// Device links to another process's device on this host (decision 0015); `None` where this backend has none.
    fn device_links(&self) -> Option<std::sync::Arc<dyn link::DeviceLinks>> {
        None
    }
    /// Sends `layer` of `blocks` over `link` in the cache's staging layout, after the operations enqueued so far;
    /// returns the bytes sent (the receiver must receive exactly as many).
    fn send_kv_blocks(
        &self,
        _kv: &Self::KvStore,
        _link: &link::SenderLink,
        _layer: usize,
        _blocks: &[u32],
    ) -> Result<usize> {
        Err(link::unsupported())
    }
    /// Writes a received payload (`layer` of `blocks`, as [`Backend::send_kv_blocks`] sent them) into `blocks`; the
    /// caller checks the blocks as for [`Backend::write_kv_blocks`]. Returns once the payload may be freed.
    fn write_staged_blocks(
        &self,
        _kv: &mut Self::KvStore,
        _layer: usize,
        _blocks: &[u32],
        _payload: link::DevicePayload,
    ) -> Result<()> {
        Err(link::unsupported())
    }
    /// Tells the store that no sequence holds `blocks` any more, so it may drop what it keeps for them beside the
    /// cache (kivi2's keys of a block that had not filled). Blocks kept in the prefix cache are complete, so nothing
    /// a later prompt could reuse is lost.
    fn retire_kv_blocks(&self, _kv: &mut Self::KvStore, _blocks: &[u32]) {}
    /// The first error of the operations since the last check (operations on a device run asynchronously and
    /// cannot fail one by one; like CUDA's sticky error, it is reported here). The forward pass checks before it
    /// returns.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}
