//! kivi2 as a CUDA cache format (decision 0018): the store's device buffers, the pool of open blocks whose keys
//! cannot be quantized yet, the per-step assignment of pool entries, and the launches of the kernels in `kivi2.cu`.
//!
//! kivi2 quantizes each key channel over a block's 16 tokens, so a block's keys wait in f32 until its last slot is
//! written. Here they wait in a pool entry (`[layer][kv_head][slot][dim]` f32 for every layer), assigned per step by
//! [`OpenBlocks`] (the store's one record of which block holds which entry): before each step
//! ([`Kivi2Store::prepare`]) every row learns the entry its key goes to and which block of its sequence is still open
//! after the step, and the entries handed out are zeroed or refilled from codes; those words travel in the step's
//! plan, so a recorded decode step replays with the next step's entries. A block whose last slot a step writes is
//! sealed by `seal_k2` right after the store kernel of each layer, so that step's attention already reads its codes
//! (the CPU store quantizes a block as its last slot is written, and both read the same thing); its entry is handed
//! out again from the next step on. The pool grows by doubling (dropping recorded steps, which name its address) and
//! holds one entry per block open at once: one per running sequence, plus the blocks a prefill chunk fills.

use super::kv::{codes_to_device, codes_to_host};
use super::module::prefill_shared_bytes_k2;
use super::open_blocks::{Fill, OpenBlocks};
use super::{CudaBackend, CudaPlan, CudaTensor, cfg, lock};
use crate::backend::BatchLayout;
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::kv::codec::KeyRotation;
use crate::kv::quant::{
    dequantize_channels, dequantize_groups, quantize_channels, quantize_groups,
};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;
use std::sync::Arc;

/// Tokens per block of a kivi2 store on the GPU (`K2_BS` in the kernels): one block of keys shares its channel
/// parameters.
pub const KIVI2_BLOCK: usize = 16;

/// Warps per kivi2 attention block (`K2_WARPS`).
const WARPS: u32 = 4;

pub struct Kivi2Store {
    layout: KvLayout,
    frame: KeyRotation,
    /// 2-bit key codes, `head_dim / 4` bytes per vector (`[layer][block][kv_head][slot]`).
    pub(super) k: CudaSlice<u8>,
    /// 2-bit value codes, likewise.
    pub(super) v: CudaSlice<u8>,
    /// Per block head (`[layer][block][kv_head]`): an f16 (min, scale) per channel, as raw bits.
    pub(super) kp: CudaSlice<u16>,
    /// Per vector: an f16 (min, scale) per 32 dims, as raw bits.
    pub(super) vp: CudaSlice<u16>,
    /// The frame's angles ([`KeyRotation::angles`]), which the seal and attention kernels turn keys by.
    turn: CudaSlice<f32>,
    pool: Option<CudaSlice<f32>>,
    /// Entries the pool has room for.
    capacity: usize,
    open: OpenBlocks,
}

impl Kivi2Store {
    pub(super) fn alloc(
        stream: &Arc<CudaStream>,
        layout: &KvLayout,
        frame: &KeyRotation,
    ) -> Result<Self> {
        if layout.block_size != KIVI2_BLOCK || !matches!(layout.head_dim, 64 | 128) {
            return Err(EngineError::invalid(format!(
                "kv format kivi2 on CUDA takes blocks of {KIVI2_BLOCK} tokens and head_dim 64 or 128 (got blocks of \
                 {} and head_dim {})",
                layout.block_size, layout.head_dim
            )));
        }
        if frame.block_shape() != (layout.head_dim, layout.block_size) {
            return Err(EngineError::invalid(
                "the key rotation given for a kivi2 cache has another block shape",
            ));
        }
        let vectors = layout.layers * layout.num_blocks * layout.kv_heads * layout.block_size;
        let hd = layout.head_dim;
        let dev = |e: cudarc::driver::DriverError| {
            EngineError::Device(format!(
                "allocating the kivi2 KV cache ({vectors} vectors): {e}"
            ))
        };
        Ok(Self {
            layout: *layout,
            frame: frame.clone(),
            k: stream.alloc_zeros(vectors * hd / 4).map_err(dev)?,
            v: stream.alloc_zeros(vectors * hd / 4).map_err(dev)?,
            kp: stream
                .alloc_zeros(vectors / layout.block_size * 2 * hd)
                .map_err(dev)?,
            vp: stream.alloc_zeros(vectors * 2 * (hd / 32)).map_err(dev)?,
            turn: stream.clone_htod(&frame.angles()).map_err(dev)?,
            pool: None,
            capacity: 0,
            open: OpenBlocks::new(layout.block_size),
        })
    }

    /// f32 elements of one pool entry (every layer's keys of one block).
    fn entry_elems(&self) -> usize {
        self.layout.layers * self.layout.block_elems()
    }

    /// Where `entry` lies in the pool.
    fn entry_range(&self, entry: u32) -> std::ops::Range<usize> {
        let at = entry as usize * self.entry_elems();
        at..at + self.entry_elems()
    }

    /// Where `layer` of `entry` lies in the pool.
    fn entry_layer(&self, entry: u32, layer: usize) -> std::ops::Range<usize> {
        let n = self.layout.block_elems();
        let at = self.entry_range(entry).start + layer * n;
        at..at + n
    }

    /// The first vector of `layer` (the kernels' `layer_vec`).
    fn layer_vec(&self, layer: usize) -> usize {
        layer * self.layout.num_blocks * self.layout.kv_heads * self.layout.block_size
    }

    /// Vectors of one block (all KV heads) of `layer`, as a range of vector indices.
    fn block_vectors(&self, layer: usize, block: u32) -> std::ops::Range<usize> {
        let n = self.layout.kv_heads * self.layout.block_size;
        let at = self.layer_vec(layer) + block as usize * n;
        at..at + n
    }

    /// The plan words of a step writing `layout`'s rows ([`super::open_blocks::ROW_WORDS`] per row), after giving each written block an
    /// entry ([`OpenBlocks::step`]) and filling the entries handed out: zeroed, or refilled from a block's codes
    /// (host work, rare: a transferred partial block decoded into). `None` when the pool cannot grow.
    pub(super) fn prepare(&mut self, b: &CudaBackend, layout: &BatchLayout) -> Option<Vec<u32>> {
        let before = self.open.clone();
        let step = self.open.step(layout);
        if !self.hold(b, step.entries) {
            // The failure is recorded and the step undone; a plan without the words launches no kivi2 kernel.
            self.open = before;
            return None;
        }
        for &(entry, block, how) in &step.fills {
            match how {
                Fill::Zero => {
                    let range = self.entry_range(entry);
                    if let Some(pool) = self.pool.as_mut() {
                        b.ok(
                            "zeroing a kivi2 open block",
                            b.stream.memset_zeros(&mut pool.slice_mut(range)),
                        );
                    }
                }
                Fill::FromCodes => self.reopen(b, block, entry),
            }
        }
        Some(step.words)
    }

    /// Makes the pool hold `entries` entries, doubling it (`false`, with the failure recorded, when it cannot).
    fn hold(&mut self, b: &CudaBackend, entries: usize) -> bool {
        if entries <= self.capacity {
            return true;
        }
        let capacity = entries.next_power_of_two().max(8);
        let Some(mut grown) = b.ok(
            "allocating kivi2 open blocks",
            b.stream.alloc_zeros::<f32>(capacity * self.entry_elems()),
        ) else {
            return false;
        };
        if let Some(old) = &self.pool {
            let moved = b
                .stream
                .memcpy_dtod(old, &mut grown.slice_mut(0..old.len()));
            if b.ok("moving kivi2 open blocks", moved).is_none() {
                return false;
            }
        }
        // Recorded steps name the old pool.
        lock(&b.graphs).invalidate();
        self.pool = Some(grown);
        self.capacity = capacity;
        true
    }

    /// Fills `entry` with `block`'s keys from its codes, every layer.
    fn reopen(&mut self, b: &CudaBackend, block: u32, entry: u32) {
        for layer in 0..self.layout.layers {
            let keys = self.keys_from_codes(b, layer, block);
            let range = self.entry_layer(entry, layer);
            if let Some(pool) = self.pool.as_mut() {
                b.ok(
                    "reopening a kivi2 block",
                    b.stream.memcpy_htod(&keys, &mut pool.slice_mut(range)),
                );
            }
        }
    }

    /// One block's keys (`[kv_head][slot][dim]`) from its codes, turned forward out of the block's frame.
    fn keys_from_codes(&self, b: &CudaBackend, layer: usize, block: u32) -> Vec<f32> {
        let (hd, bs) = (self.layout.head_dim, self.layout.block_size);
        let vecs = self.block_vectors(layer, block);
        let heads = vecs.start / bs..vecs.end / bs;
        let (codes, params) = codes_to_host(
            b,
            "reading kivi2 keys",
            &self.k,
            vecs.start * hd / 4..vecs.end * hd / 4,
            &self.kp,
            heads.start * 2 * hd..heads.end * 2 * hd,
        );
        let mut out = vec![0f32; vecs.len() * hd];
        for ((o, c), p) in out
            .chunks_mut(bs * hd)
            .zip(codes.chunks(bs * hd / 4))
            .zip(params.chunks(2 * hd))
        {
            dequantize_channels(c, p, hd, o);
        }
        self.frame.from_block_frame(&mut out);
        out
    }

    /// `block` of `layer` as f32 K and V (`[kv_head][slot][dim]`): keys from the block's entry while it is open,
    /// else from its codes.
    pub(super) fn read_block(
        &self,
        b: &CudaBackend,
        layer: usize,
        block: u32,
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.layout.head_dim;
        let keys = match (self.open.entry(block), &self.pool) {
            (Some(e), Some(pool)) => {
                let mut k = vec![0f32; self.layout.block_elems()];
                b.ok(
                    "reading a kivi2 open block",
                    b.stream
                        .memcpy_dtoh(&pool.slice(self.entry_layer(e, layer)), &mut k),
                );
                k
            }
            _ => self.keys_from_codes(b, layer, block),
        };
        let vecs = self.block_vectors(layer, block);
        let pp = 2 * (hd / 32);
        let (codes, params) = codes_to_host(
            b,
            "reading kivi2 values",
            &self.v,
            vecs.start * hd / 4..vecs.end * hd / 4,
            &self.vp,
            vecs.start * pp..vecs.end * pp,
        );
        let mut values = vec![0f32; vecs.len() * hd];
        for ((o, c), p) in values
            .chunks_mut(hd)
            .zip(codes.chunks(hd / 4))
            .zip(params.chunks(pp))
        {
            dequantize_groups::<2>(c, p, o);
        }
        (keys, values)
    }

    /// Writes a whole block of `layer` from the host (a transfer's blocks). As on the CPU, writing every slot fills
    /// the block: its keys are quantized in the block's frame, and an entry the block held (a block id reused without
    /// being retired) is given back, so that every layer reads the block from its codes.
    pub(super) fn write_block(
        &mut self,
        b: &CudaBackend,
        layer: usize,
        block: u32,
        k: &[f32],
        v: &[f32],
    ) {
        let (hd, bs) = (self.layout.head_dim, self.layout.block_size);
        let vecs = self.block_vectors(layer, block);
        let what = "writing a kivi2 block";
        self.open.retire(&[block]);
        let mut framed = k.to_vec();
        self.frame.to_block_frame(&mut framed);
        let mut codes = vec![0u8; vecs.len() * hd / 4];
        let mut params = vec![f16::ZERO; vecs.len() / bs * 2 * hd];
        for ((x, c), p) in framed
            .chunks(bs * hd)
            .zip(codes.chunks_mut(bs * hd / 4))
            .zip(params.chunks_mut(2 * hd))
        {
            quantize_channels(x, hd, c, p);
        }
        let head0 = vecs.start / bs;
        codes_to_device(
            b,
            what,
            &codes,
            &mut self.k,
            vecs.start * hd / 4,
            &params,
            &mut self.kp,
            head0 * 2 * hd,
        );
        let pp = 2 * (hd / 32);
        let mut codes = vec![0u8; vecs.len() * hd / 4];
        let mut params = vec![f16::ZERO; vecs.len() * pp];
        for ((x, c), p) in v
            .chunks(hd)
            .zip(codes.chunks_mut(hd / 4))
            .zip(params.chunks_mut(pp))
        {
            quantize_groups::<2>(x, c, p);
        }
        codes_to_device(
            b,
            what,
            &codes,
            &mut self.v,
            vecs.start * hd / 4,
            &params,
            &mut self.vp,
            vecs.start * pp,
        );
    }

    /// Frees the entries of blocks no sequence holds any more (their sequence ended before they filled).
    pub(super) fn retire(&mut self, blocks: &[u32]) {
        self.open.retire(blocks);
    }

    fn pool_arg(&self, stream: &Arc<CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        // A store never written has no pool yet; no row of a step names an entry then.
        self.pool.as_ref().map_or(0, |p| p.device_ptr(stream).0)
    }
}

/// The scalar arguments of the kivi2 kernels of one layer.
struct LayerArgs {
    pool: u64,
    kv_heads: i32,
    head_dim: i32,
    layer_vec: u64,
    layer: i32,
    layers: i32,
}

impl LayerArgs {
    /// What both attention kernels take first: the query, the codes and their parameters, the pool, the rows'
    /// open-block words, the turn table and the RoPE pairing.
    fn push_sources<'a>(
        &'a self,
        a: &mut cudarc::driver::LaunchArgs<'a>,
        q: &'a CudaSlice<f32>,
        kv: &'a Kivi2Store,
        plan: &'a CudaPlan,
    ) {
        a.arg(q).arg(&kv.k).arg(&kv.v).arg(&kv.kp).arg(&kv.vp);
        a.arg(&self.pool)
            .arg(&plan.k2rows)
            .arg(&kv.turn)
            .arg(&plan.interleaved);
    }

    /// What both take after the rows: where the layer lies, and the query heads per KV head.
    fn push_layer<'a>(&'a self, a: &mut cudarc::driver::LaunchArgs<'a>, group: &'a i32) {
        a.arg(&self.kv_heads).arg(group).arg(&self.layer_vec);
        a.arg(&self.layer).arg(&self.layers);
    }
}

impl CudaBackend {
    /// RoPE on Q and K and the cache write of one layer, then the seal of every block the step filled.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kivi2_rope_store(
        &self,
        kv: &mut Kivi2Store,
        layer: usize,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        heads: usize,
        plan: &CudaPlan,
    ) {
        let Some(args) = self.kivi2_args(kv, layer, plan) else {
            return;
        };
        q.bf16_fresh = false;
        k.bf16_fresh = false;
        let (Some(qb), Some(kb), Some(vb)) = (q.buf.as_mut(), k.buf.as_mut(), v.buf.as_ref())
        else {
            return;
        };
        let l = kv.layout;
        let h = heads as i32;
        let mut a = self.stream.launch_builder(&self.k.rope_store_k2);
        a.arg(qb)
            .arg(kb)
            .arg(vb)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&kv.kp)
            .arg(&kv.vp);
        a.arg(&args.pool)
            .arg(&plan.k2rows)
            .arg(&plan.slots)
            .arg(&plan.positions)
            .arg(&plan.inv_freq);
        a.arg(&h)
            .arg(&args.kv_heads)
            .arg(&args.head_dim)
            .arg(&plan.interleaved);
        a.arg(&args.layer_vec).arg(&args.layer).arg(&args.layers);
        let grid = cfg(
            (plan.rows as u32, (heads + l.kv_heads) as u32),
            (l.head_dim / 2) as u32,
        );
        self.launch("rope_store_kv", || unsafe { a.launch(grid) }.map(drop));
        self.kivi2_seal(kv, &args, plan);
    }

    /// The cache write of one layer (no RoPE), then the seal of every block the step filled.
    pub(super) fn kivi2_store(
        &self,
        kv: &mut Kivi2Store,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        plan: &CudaPlan,
    ) {
        let Some(args) = self.kivi2_args(kv, layer, plan) else {
            return;
        };
        let (Some(kb), Some(vb)) = (k.buf.as_ref(), v.buf.as_ref()) else {
            return;
        };
        let l = kv.layout;
        let mut a = self.stream.launch_builder(&self.k.store_kv_k2);
        a.arg(kb)
            .arg(vb)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&kv.kp)
            .arg(&kv.vp);
        a.arg(&args.pool).arg(&plan.k2rows).arg(&plan.slots);
        a.arg(&args.kv_heads)
            .arg(&args.head_dim)
            .arg(&args.layer_vec)
            .arg(&args.layer)
            .arg(&args.layers);
        let grid = cfg(
            (plan.rows as u32, l.kv_heads as u32),
            (l.head_dim / 2) as u32,
        );
        self.launch("store_kv", || unsafe { a.launch(grid) }.map(drop));
        self.kivi2_seal(kv, &args, plan);
    }

    fn kivi2_seal(&self, kv: &Kivi2Store, args: &LayerArgs, plan: &CudaPlan) {
        let l = kv.layout;
        let mut a = self.stream.launch_builder(&self.k.seal_k2);
        a.arg(&kv.k)
            .arg(&kv.kp)
            .arg(&args.pool)
            .arg(&plan.k2rows)
            .arg(&plan.slots)
            .arg(&kv.turn);
        a.arg(&args.kv_heads)
            .arg(&args.head_dim)
            .arg(&plan.interleaved);
        a.arg(&args.layer_vec).arg(&args.layer).arg(&args.layers);
        let grid = cfg((plan.rows as u32, l.kv_heads as u32), l.head_dim as u32);
        self.launch("seal_kv", || unsafe { a.launch(grid) }.map(drop));
    }

    /// The scalar arguments every kivi2 kernel of `layer` takes (`None`, with the failure recorded, for a plan made
    /// without the store).
    fn kivi2_args(&self, kv: &Kivi2Store, layer: usize, plan: &CudaPlan) -> Option<LayerArgs> {
        if plan.k2rows == 0 {
            self.fail(
                "kivi2 cache",
                "the step was planned without its kivi2 store (Backend::plan takes the store)",
            );
            return None;
        }
        let l = kv.layout;
        Some(LayerArgs {
            pool: kv.pool_arg(&self.stream),
            kv_heads: l.kv_heads as i32,
            head_dim: l.head_dim as i32,
            layer_vec: kv.layer_vec(layer) as u64,
            layer: layer as i32,
            layers: l.layers as i32,
        })
    }

    /// Attention of a step with prefill rows over a kivi2 cache: the tiled prefill kernel, grid (tile of up to 64
    /// rows of one sequence, query head), its key and value tiles dequantized from the codes into f16.
    pub(super) fn kivi2_prefill_attention(
        &self,
        q: &CudaTensor,
        kv: &Kivi2Store,
        layer: usize,
        plan: &CudaPlan,
        out: &mut CudaTensor,
    ) {
        let l = kv.layout;
        let heads = q.cols / l.head_dim;
        let Some(f) = self.k.prefill_attention_k2.get(&l.head_dim) else {
            return self.fail(
                "attention",
                format!(
                    "no kivi2 prefill kernel for head_dim {} (64 or 128)",
                    l.head_dim
                ),
            );
        };
        let Some(args) = self.kivi2_args(kv, layer, plan) else {
            return;
        };
        let ob = self.bf16_target(out);
        let (Some(qb), Some(o)) = (q.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        let group = (heads / l.kv_heads) as i32;
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let grid = LaunchConfig {
            grid_dim: (plan.n_tiles as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: prefill_shared_bytes_k2(l.head_dim) as u32,
        };
        let mut a = self.stream.launch_builder(f);
        args.push_sources(&mut a, qb, kv, plan);
        a.arg(o).arg(&ob).arg(&plan.tile_row0).arg(&plan.tile_rows);
        a.arg(&plan.row_ctx).arg(&plan.row_table).arg(&plan.tables);
        args.push_layer(&mut a, &group);
        a.arg(&scale);
        self.launch("prefill_attention", || unsafe { a.launch(grid) }.map(drop));
    }

    /// Attention of decode rows over a kivi2 cache: grid (row, KV head, split), as the flash-decoding kernel
    /// splits its rows. (It serves prefill rows too, reading each row's context once per row; steps with prefill
    /// rows take the tiled kernel above.)
    pub(super) fn kivi2_attention(
        &self,
        q: &CudaTensor,
        kv: &Kivi2Store,
        layer: usize,
        plan: &CudaPlan,
        out: &mut CudaTensor,
    ) {
        let l = kv.layout;
        let heads = q.cols / l.head_dim;
        let group = heads / l.kv_heads;
        let (Some(f), true) = (self.k.attention_k2.get(&l.head_dim), group <= 8) else {
            return self.fail(
                "attention",
                format!("no kivi2 kernel for head_dim {} with {group} query heads per KV head (up to 8)", l.head_dim),
            );
        };
        let Some(args) = self.kivi2_args(kv, layer, plan) else {
            return;
        };
        let per_sm = self.k.attention_k2_per_sm[&l.head_dim];
        let Some(mut bufs) =
            self.attention_splits(q.rows, heads, l.kv_heads, l.head_dim, per_sm, plan)
        else {
            return;
        };
        let splits = bufs.n;
        let (Some(qb), Some(o), Some(pb), Some(ab)) = (
            q.buf.as_ref(),
            out.buf.as_mut(),
            bufs.part.as_mut(),
            bufs.arrived.as_mut(),
        ) else {
            return;
        };
        let group = group as i32;
        let (scale, sp) = (1.0 / (l.head_dim as f32).sqrt(), splits as i32);
        let grid = LaunchConfig {
            grid_dim: (q.rows as u32, l.kv_heads as u32, splits as u32),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut a = self.stream.launch_builder(f);
        args.push_sources(&mut a, qb, kv, plan);
        a.arg(o).arg(pb).arg(ab);
        a.arg(&plan.row_ctx).arg(&plan.row_table).arg(&plan.tables);
        args.push_layer(&mut a, &group);
        a.arg(&scale).arg(&sp);
        self.launch("attention", || unsafe { a.launch(grid) }.map(drop));
    }
}
