//! The CPU backend: quantized weights used in place from the model map, f32 activations, a paged KV store in host
//! memory, and its own spinning thread pool (`pool`).
//!
//! Matrices are zero-copy views of the memory-mapped model file, so resident memory is the file plus the KV
//! store plus activations. Kernels live in `matmul` (quantized GEMV / dequantize+SGEMM), `attention` (paged,
//! grouped-query) and `simd` (run-time dispatched vector loops).

mod attention;
mod kvbuf;
mod matmul;
mod pages;
pub mod pool;
pub mod simd;

use super::{AttentionTally, Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::gguf::SharedBytes;
use crate::kv::KvLayout;
use crate::model::config::{RopeConfig, RopeLayout};
use crate::model::source::WeightView;
use crate::quant::GgmlType;
use crate::quant::dequant::dequantize_row;
use crate::quant::dot::DotKernels;
use crate::quant::interleave::{self, GROUP_ROWS, Layout};
use kvbuf::{Half, KvBuf};

/// A weight matrix: borrowed from the model file's map as stored there, or (types the tiled kernels read) an owned
/// copy in the interleaved layout ([`crate::quant::interleave`]).
pub struct CpuMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    layout: Layout,
    shared: SharedBytes,
    offset: usize,
    len: usize,
}

impl CpuMatrix {
    fn bytes(&self) -> &[u8] {
        &(*self.shared).as_ref()[self.offset..self.offset + self.len]
    }
    fn row_bytes(&self) -> usize {
        self.len / self.rows
    }
    /// Rows `rows` in the file layout: borrowed, or rebuilt into `scratch` from the interleaved layout (`rows` must
    /// then start on a group boundary, and end on one or at the matrix's end).
    fn rows_in_file_layout<'a>(
        &'a self,
        rows: std::ops::Range<usize>,
        scratch: &'a mut Vec<u8>,
    ) -> &'a [u8] {
        let rb = self.row_bytes();
        let bytes = &self.bytes()[rows.start * rb..rows.end * rb];
        if self.layout == Layout::File {
            return bytes;
        }
        assert!(
            rows.start.is_multiple_of(GROUP_ROWS),
            "rows start inside an interleaved group"
        );
        scratch.clear();
        scratch.extend_from_slice(bytes);
        let grouped = interleave::grouped_rows(self.rows).clamp(rows.start, rows.end) - rows.start;
        for (src, dst) in bytes[..grouped * rb]
            .chunks_exact(GROUP_ROWS * rb)
            .zip(scratch.chunks_exact_mut(GROUP_ROWS * rb))
        {
            interleave::read_group(self.ty, src, rb, dst);
        }
        scratch
    }
    /// Row `r` in the file layout: borrowed, or rebuilt into `scratch` from the interleaved layout.
    fn row<'a>(&'a self, r: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let rb = self.row_bytes();
        match self.layout {
            Layout::File => &self.bytes()[r * rb..(r + 1) * rb],
            Layout::Interleaved => {
                scratch.resize(rb, 0);
                interleave::read_row(self.ty, self.bytes(), rb, r, scratch);
                scratch
            }
        }
    }
}

/// Row-major f32 activations. Buffers are reused across steps; `resize` only grows the allocation.
#[derive(Debug, Clone, Default)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn resize(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.data.resize(rows * cols, 0.0);
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub struct CpuKvStore {
    pub layout: KvLayout,
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
}

/// A batch layout plus the RoPE angles of its tokens, computed once per step.
pub struct CpuPlan {
    pub layout: BatchLayout,
    cos: Vec<f32>,
    sin: Vec<f32>,
    half_dim: usize,
    rope_layout: RopeLayout,
}

/// The CPU backend: run-time chosen kernels and its own compute threads.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    /// The integer dot kernels (the f32 kernels pick theirs in [`simd`]).
    kernels: DotKernels,
    pool: std::sync::Arc<pool::SpinPool>,
}

impl CpuBackend {
    /// A backend computing on `threads` threads (the calling thread included).
    pub fn new(threads: usize) -> Self {
        Self {
            kernels: DotKernels::detect(),
            pool: std::sync::Arc::new(pool::SpinPool::new(threads)),
        }
    }
    /// As many threads as the machine has cores.
    pub fn with_all_cores() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
    /// A backend that never uses SIMD kernels (for tests comparing the two paths).
    pub fn portable(threads: usize) -> Self {
        Self {
            kernels: DotKernels::Portable,
            ..Self::new(threads)
        }
    }
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
    /// Runs `f(i)` for `i in 0..n` on the backend's threads.
    pub fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.pool.run(n, f)
    }
    pub fn simd_name(&self) -> &'static str {
        self.kernels.name()
    }
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Activations = CpuTensor;
    type KvStore = CpuKvStore;
    type Plan = CpuPlan;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load_matrix(&self, w: &WeightView<'_>) -> Result<CpuMatrix> {
        if !w.cols.is_multiple_of(32) {
            return Err(EngineError::UnsupportedModel(format!(
                "matrix with {} columns (must be a multiple of 32)",
                w.cols
            )));
        }
        let row_bytes = w.bytes.len() / w.rows.max(1);
        if self.kernels.layout() == Layout::Interleaved
            && interleave::supports(w.ty)
            && w.rows >= GROUP_ROWS
        {
            let packed: SharedBytes =
                std::sync::Arc::new(interleave::interleave(w.ty, w.bytes, row_bytes));
            w.shared.release(w.offset..w.offset + w.bytes.len());
            return Ok(CpuMatrix {
                ty: w.ty,
                rows: w.rows,
                cols: w.cols,
                layout: Layout::Interleaved,
                len: w.bytes.len(),
                shared: packed,
                offset: 0,
            });
        }
        Ok(CpuMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            layout: Layout::File,
            shared: w.shared.clone(),
            offset: w.offset,
            len: w.bytes.len(),
        })
    }

    fn load_vector(&self, w: &WeightView<'_>) -> Result<Vec<f32>> {
        let mut v = vec![0f32; w.rows * w.cols];
        dequantize_row(w.ty, w.bytes, &mut v);
        Ok(v)
    }

    fn alloc_kv(
        &self,
        layout: &KvLayout,
        keys: &crate::kv::codec::KeyRotation,
    ) -> Result<CpuKvStore> {
        let vectors = layout.num_blocks * layout.kv_heads * layout.block_size;
        let make = |half| {
            KvBuf::new(layout.format, half, vectors, layout.head_dim, keys).map_err(|e| {
                EngineError::Device(format!(
                    "cannot map the KV cache ({} MiB): {e}",
                    layout.total_bytes() >> 20
                ))
            })
        };
        Ok(CpuKvStore {
            layout: *layout,
            k: (0..layout.layers)
                .map(|_| make(Half::Keys))
                .collect::<Result<_>>()?,
            v: (0..layout.layers)
                .map(|_| make(Half::Values))
                .collect::<Result<_>>()?,
        })
    }

    fn activations(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    fn plan(
        &self,
        layout: &BatchLayout,
        rope: &RopeConfig,
        head_dim: usize,
        _kv: Option<&mut CpuKvStore>,
    ) -> CpuPlan {
        let inv = rope.inv_freq(head_dim);
        let half_dim = head_dim / 2;
        let mut cos = Vec::with_capacity(layout.positions.len() * half_dim);
        let mut sin = Vec::with_capacity(layout.positions.len() * half_dim);
        for &p in &layout.positions {
            for f in &inv {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        CpuPlan {
            layout: layout.clone(),
            cos,
            sin,
            half_dim,
            rope_layout: rope.layout,
        }
    }

    fn embed(&self, table: &CpuMatrix, plan: &CpuPlan, out: &mut CpuTensor) {
        out.resize(plan.layout.tokens.len(), table.cols);
        let mut scratch = Vec::new();
        for (r, &t) in plan.layout.tokens.iter().enumerate() {
            dequantize_row(
                table.ty,
                table.row(t as usize, &mut scratch),
                out.row_mut(r),
            );
        }
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32, out: &mut CpuTensor) {
        out.resize(x.rows, x.cols);
        for r in 0..x.rows {
            let xr = x.row(r);
            let ms = simd::dot(xr, xr) / x.cols as f32;
            let scale = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in out.row_mut(r).iter_mut().zip(xr).zip(w) {
                *o = v * scale * g;
            }
        }
    }

    fn matmul(&self, x: &CpuTensor, pairs: &mut [(&CpuMatrix, &mut CpuTensor)]) {
        matmul::matmul(&self.pool, x, pairs, self.kernels);
    }

    fn add_bias(&self, x: &mut CpuTensor, b: &Vec<f32>) {
        for r in 0..x.rows {
            for (v, bb) in x.row_mut(r).iter_mut().zip(b) {
                *v += bb;
            }
        }
    }

    fn rope(&self, x: &mut CpuTensor, heads: usize, plan: &CpuPlan) {
        let hd = plan.half_dim * 2;
        for r in 0..x.rows {
            let cos = &plan.cos[r * plan.half_dim..(r + 1) * plan.half_dim];
            let sin = &plan.sin[r * plan.half_dim..(r + 1) * plan.half_dim];
            let row = x.row_mut(r);
            for h in 0..heads {
                let v = &mut row[h * hd..(h + 1) * hd];
                for i in 0..plan.half_dim {
                    let (a, b) = match plan.rope_layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::Halves => (i, i + plan.half_dim),
                    };
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * cos[i] - x1 * sin[i];
                    v[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }

    fn store_kv(
        &self,
        kv: &mut CpuKvStore,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        plan: &CpuPlan,
    ) {
        let lay = kv.layout;
        let hd = lay.head_dim;
        for (buf, src) in [(&mut kv.k[layer], k), (&mut kv.v[layer], v)] {
            for (r, &slot) in plan.layout.slots.iter().enumerate() {
                let (block, off) = (
                    slot as usize / lay.block_size,
                    slot as usize % lay.block_size,
                );
                for h in 0..lay.kv_heads {
                    let at = (block * lay.kv_heads + h) * lay.block_size + off;
                    buf.write(at, hd, &src.row(r)[h * hd..(h + 1) * hd]);
                }
            }
        }
    }

    fn attention(
        &self,
        q: &CpuTensor,
        kv: &CpuKvStore,
        layer: usize,
        plan: &CpuPlan,
        out: &mut CpuTensor,
        tallies: &mut [AttentionTally<'_>],
    ) {
        attention::attention(&self.pool, q, kv, layer, plan, out, tallies);
    }

    fn silu_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) {
        simd::silu_mul(&mut gate.data, &up.data);
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) {
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn gather_logit_rows(&self, x: &CpuTensor, plan: &CpuPlan, out: &mut CpuTensor) {
        out.resize(plan.layout.logit_rows.len(), x.cols);
        for (i, &r) in plan.layout.logit_rows.iter().enumerate() {
            out.row_mut(i).copy_from_slice(x.row(r));
        }
    }

    fn to_host(&self, x: &CpuTensor) -> Vec<f32> {
        x.data.clone()
    }

    /// Rows in parallel, read in place (the default would copy every logit first).
    fn argmax_rows(&self, x: &CpuTensor, cols: usize) -> Vec<u32> {
        let rows: Vec<&[f32]> = x.data.chunks(cols.max(1)).collect();
        let best: Vec<std::sync::atomic::AtomicU32> =
            rows.iter().map(|_| Default::default()).collect();
        self.pool.run(rows.len(), &|i| {
            best[i].store(
                crate::sampling::argmax(rows[i]),
                std::sync::atomic::Ordering::Relaxed,
            )
        });
        best.into_iter().map(|b| b.into_inner()).collect()
    }

    fn read_kv_block(&self, kv: &CpuKvStore, layer: usize, block: u32) -> (Vec<f32>, Vec<f32>) {
        let (n, hd) = (kv.layout.block_elems(), kv.layout.head_dim);
        let at = block as usize * (n / hd);
        let read = |b: &KvBuf| {
            let mut out = vec![0f32; n];
            b.read_written(at, hd, &mut out);
            out
        };
        (read(&kv.k[layer]), read(&kv.v[layer]))
    }

    fn retire_kv_blocks(&self, kv: &mut CpuKvStore, blocks: &[u32]) {
        for buf in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            buf.retire(blocks, kv.layout.kv_heads);
        }
    }

    fn write_kv_block(&self, kv: &mut CpuKvStore, layer: usize, block: u32, k: &[f32], v: &[f32]) {
        let (n, hd) = (kv.layout.block_elems(), kv.layout.head_dim);
        let at = block as usize * (n / hd);
        kv.k[layer].write(at, hd, k);
        kv.v[layer].write(at, hd, v);
    }
}
