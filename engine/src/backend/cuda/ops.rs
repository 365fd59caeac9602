//! The backend trait on CUDA: each operation is one kernel launch (or one cuBLAS call, or one GEMV launch for up to
//! three weights) on the backend's stream, issued through [`CudaBackend::launch`] so that a step being replayed
//! from a recorded graph issues nothing.

use super::graphs::Shape;
use super::kv::{CudaKvStore, KvBufs};
use super::module::{DECODE_WARPS, decode_shared_bytes, decode_stages, prefill_shared_bytes};
use super::plan::{CudaPlan, Packed};
use super::{CudaBackend, CudaMatrix, CudaTensor, Marked, cfg, grid_1d, lock};
use crate::backend::{AttentionTally, Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::model::config::RopeConfig;
use crate::model::source::WeightView;
use crate::quant::GgmlType;
use crate::quant::dequant::dequantize_row;
use crate::sampling::Draw;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Vector = CudaSlice<f32>;
    type Activations = CudaTensor;
    type KvStore = CudaKvStore;
    type Plan = CudaPlan;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_matrix(&self, w: &WeightView<'_>) -> Result<CudaMatrix> {
        let bits: Vec<u16> = if w.ty == GgmlType::BF16 {
            w.bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect()
        } else {
            let rb = w.bytes.len() / w.rows.max(1);
            let mut row = vec![0f32; w.cols];
            let mut out = Vec::with_capacity(w.rows * w.cols);
            for r in 0..w.rows {
                dequantize_row(w.ty, &w.bytes[r * rb..(r + 1) * rb], &mut row);
                out.extend(row.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
            }
            out
        };
        let data = self.stream.clone_htod(&bits).map_err(|e| {
            EngineError::Device(format!("uploading a {}x{} matrix: {e}", w.rows, w.cols))
        })?;
        w.shared.release(w.offset..w.offset + w.bytes.len());
        Ok(CudaMatrix {
            rows: w.rows,
            cols: w.cols,
            data,
        })
    }

    fn load_vector(&self, w: &WeightView<'_>) -> Result<CudaSlice<f32>> {
        let mut v = vec![0f32; w.rows * w.cols];
        dequantize_row(w.ty, w.bytes, &mut v);
        self.stream
            .clone_htod(&v)
            .map_err(|e| EngineError::Device(format!("uploading a vector: {e}")))
    }

    fn alloc_kv(
        &self,
        layout: &KvLayout,
        keys: &crate::kv::codec::KeyRotation,
    ) -> Result<CudaKvStore> {
        CudaKvStore::alloc(&self.stream, layout, keys)
    }

    fn activations(&self, rows: usize, cols: usize) -> CudaTensor {
        let mut t = CudaTensor {
            rows: 0,
            cols: 0,
            buf: None,
            bf16: None,
            bf16_fresh: false,
        };
        self.resize(&mut t, rows, cols);
        t
    }

    fn plan(
        &self,
        layout: &BatchLayout,
        rope: &RopeConfig,
        head_dim: usize,
        kv: Option<&mut CudaKvStore>,
    ) -> CudaPlan {
        self.mark("host (between steps)");
        let _uploaded = Marked(self, "plan upload");
        let (k2rows, k2_missing) = match kv.map(|kv| &mut kv.bufs) {
            Some(KvBufs::Kivi2(s)) => {
                let words = s.prepare(self, layout);
                let missing = words.is_none();
                (words, missing)
            }
            _ => (None, false),
        };
        let packed = Packed::new(layout, rope, head_dim, k2rows.as_deref());
        let mut buf = lock(&self.plan_buf);
        // Room to spare, so that growing contexts do not reallocate (and drop the recorded graphs) every step.
        let need = packed.words.len();
        let fits = buf.as_ref().is_some_and(|b| b.len() >= need);
        if !fits
            && !self.ensure(
                "allocating the step plan",
                &mut buf,
                need.next_power_of_two(),
            )
        {
            return packed.at(0);
        }
        let Some(b) = buf.as_mut() else {
            return packed.at(0);
        };
        let r = self
            .stream
            .memcpy_htod(&packed.words, &mut b.slice_mut(0..need));
        self.ok("uploading the step plan", r);
        let base = {
            let (ptr, _guard) = b.device_ptr(&self.stream);
            ptr
        };
        // (A kivi2 step planned without its words must not replay a recording, which would read them.)
        let decode = layout.capturable
            && !k2_missing
            && !layout.logit_rows.is_empty()
            && layout.seqs.iter().all(|s| s.n_rows == 1);
        let shape = decode.then_some(Shape {
            rows: packed.rows,
            logit_rows: packed.n_logit_rows,
            head: layout.head,
            ctx_bucket: packed.ctx_bucket,
        });
        let r = lock(&self.graphs).begin(&self.stream, shape);
        self.ok("CUDA graph", r);
        packed.at(base)
    }

    fn embed(&self, table: &CudaMatrix, plan: &CudaPlan, out: &mut CudaTensor) {
        self.resize(out, plan.rows, table.cols);
        let Some(o) = out.buf.as_mut() else { return };
        let cols = table.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.embed_bf16);
        b.arg(&table.data).arg(&plan.tokens).arg(o).arg(&cols);
        self.launch("embed", || {
            unsafe { b.launch(cfg((plan.rows as u32, 1), 256)) }.map(drop)
        });
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaSlice<f32>, eps: f32, out: &mut CudaTensor) {
        self.resize(out, x.rows, x.cols);
        let ob = self.bf16_target(out);
        let (Some(xb), Some(o)) = (x.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        let cols = x.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(xb).arg(w).arg(o).arg(&cols).arg(&eps).arg(&ob);
        self.launch("rms_norm", || {
            unsafe { b.launch(cfg((x.rows as u32, 1), 1024)) }.map(drop)
        });
    }

    fn matmul(&self, x: &CudaTensor, pairs: &mut [(&CudaMatrix, &mut CudaTensor)]) {
        self.matmul_rows(x, pairs);
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaSlice<f32>) {
        let (n, cols) = (x.len() as u64, x.cols as i32);
        x.bf16_fresh = false;
        let Some(xb) = x.buf.as_mut() else { return };
        let mut b = self.stream.launch_builder(&self.k.add_bias);
        b.arg(xb).arg(bias).arg(&n).arg(&cols);
        self.launch("add_bias", || {
            unsafe { b.launch(grid_1d(n as usize)) }.map(drop)
        });
    }

    fn rope(&self, x: &mut CudaTensor, heads: usize, plan: &CudaPlan) {
        let head_dim = (plan.half_dim * 2) as i32;
        let (rows, h) = (x.rows as u32, heads as i32);
        x.bf16_fresh = false;
        let Some(xb) = x.buf.as_mut() else { return };
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(xb)
            .arg(&plan.positions)
            .arg(&plan.inv_freq)
            .arg(&h)
            .arg(&head_dim)
            .arg(&plan.interleaved);
        let threads = (plan.half_dim as u32).max(1);
        self.launch("rope", || {
            unsafe { b.launch(cfg((rows, heads as u32), threads)) }.map(drop)
        });
    }

    fn store_kv(
        &self,
        kv: &mut CudaKvStore,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        plan: &CudaPlan,
    ) {
        if let KvBufs::Kivi2(s) = &mut kv.bufs {
            return self.kivi2_store(s, layer, k, v, plan);
        }
        let l = kv.layout;
        let layer_off = (layer * kv.layer_elems()) as u64;
        let (Some(kb), Some(vb)) = (k.buf.as_ref(), v.buf.as_ref()) else {
            return;
        };
        let (kvh, hd, bs) = (l.kv_heads as i32, l.head_dim as i32, l.block_size as i32);
        let grid = cfg(
            (plan.rows as u32, l.kv_heads as u32),
            (l.head_dim / 2) as u32,
        );
        let Some(f) = self.k.store_kv.get(&l.format) else {
            return self.fail("store_kv", format!("no kernel for {:?}", l.format));
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(kb).arg(vb);
        kv.bufs.push_args(&mut b);
        b.arg(&plan.slots)
            .arg(&kvh)
            .arg(&hd)
            .arg(&bs)
            .arg(&layer_off);
        self.launch("store_kv", || unsafe { b.launch(grid) }.map(drop));
    }

    fn rope_store_kv(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        heads: usize,
        kv_heads: usize,
        kv: &mut CudaKvStore,
        layer: usize,
        plan: &CudaPlan,
    ) {
        if let KvBufs::Kivi2(s) = &mut kv.bufs {
            return self.kivi2_rope_store(s, layer, q, k, v, heads, plan);
        }
        let l = kv.layout;
        let layer_off = (layer * kv.layer_elems()) as u64;
        q.bf16_fresh = false;
        k.bf16_fresh = false;
        let (Some(qb), Some(kb), Some(vb)) = (q.buf.as_mut(), k.buf.as_mut(), v.buf.as_ref())
        else {
            return;
        };
        let (h, kvh, hd, bs) = (
            heads as i32,
            kv_heads as i32,
            l.head_dim as i32,
            l.block_size as i32,
        );
        let Some(f) = self.k.rope_store.get(&l.format) else {
            return self.fail("rope_store_kv", format!("no kernel for {:?}", l.format));
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(qb).arg(kb).arg(vb);
        kv.bufs.push_args(&mut b);
        b.arg(&plan.slots)
            .arg(&plan.positions)
            .arg(&plan.inv_freq)
            .arg(&h)
            .arg(&kvh)
            .arg(&hd)
            .arg(&plan.interleaved)
            .arg(&bs)
            .arg(&layer_off);
        let grid = cfg(
            (plan.rows as u32, (heads + kv_heads) as u32),
            (plan.half_dim as u32).max(1),
        );
        self.launch("rope_store_kv", || unsafe { b.launch(grid) }.map(drop));
    }

    fn swiglu(
        &self,
        x: &CudaTensor,
        w_gate: &CudaMatrix,
        w_up: &CudaMatrix,
        gate: &mut CudaTensor,
        up: &mut CudaTensor,
    ) {
        self.swiglu_rows(x, w_gate, w_up, gate, up);
    }

    fn attention(
        &self,
        q: &CudaTensor,
        kv: &CudaKvStore,
        layer: usize,
        plan: &CudaPlan,
        out: &mut CudaTensor,
        tallies: &mut [AttentionTally<'_>],
    ) {
        if !tallies.is_empty()
            && !self
                .tally_warned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "attention tallies (snapkv/h2o eviction scores) are not computed on CUDA yet"
            );
        }
        self.resize(out, q.rows, q.cols);
        if let KvBufs::Kivi2(s) = &kv.bufs {
            if plan.n_tiles > 0 {
                self.kivi2_prefill_attention(q, s, layer, plan, out);
            } else {
                self.kivi2_attention(q, s, layer, plan, out);
            }
        } else if plan.n_tiles > 0 {
            self.prefill_attention(q, kv, layer, plan, out);
        } else {
            self.decode_attention(q, kv, layer, plan, out);
        }
    }

    fn add_rms_norm(&self, x: &mut CudaTensor, y: &mut CudaTensor, w: &CudaSlice<f32>, eps: f32) {
        let (rows, cols) = (x.rows as u32, x.cols as i32);
        x.bf16_fresh = false;
        let ob = self.bf16_target(y);
        let (Some(xb), Some(yb)) = (x.buf.as_mut(), y.buf.as_mut()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.add_rms_norm);
        b.arg(xb).arg(yb).arg(w).arg(&cols).arg(&eps).arg(&ob);
        self.launch("add_rms_norm", || {
            unsafe { b.launch(cfg((rows, 1), 1024)) }.map(drop)
        });
    }

    fn silu_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) {
        let n = gate.len() as u64;
        let ob = self.bf16_target(gate);
        let (Some(g), Some(u)) = (gate.buf.as_mut(), up.buf.as_ref()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.silu_mul);
        b.arg(g).arg(u).arg(&n).arg(&ob);
        self.launch("silu_mul", || {
            unsafe { b.launch(grid_1d(n as usize)) }.map(drop)
        });
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let n = x.len() as u64;
        x.bf16_fresh = false;
        let (Some(xb), Some(yb)) = (x.buf.as_mut(), y.buf.as_ref()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.add);
        b.arg(xb).arg(yb).arg(&n);
        self.launch("add", || unsafe { b.launch(grid_1d(n as usize)) }.map(drop));
    }

    fn gather_logit_rows(&self, x: &CudaTensor, plan: &CudaPlan, out: &mut CudaTensor) {
        self.resize(out, plan.n_logit_rows, x.cols);
        if plan.n_logit_rows == 0 {
            return;
        }
        let (Some(xb), Some(o)) = (x.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        let cols = x.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.gather_rows);
        b.arg(xb).arg(o).arg(&plan.logit_rows).arg(&cols);
        self.launch("gather_rows", || {
            unsafe { b.launch(cfg((plan.n_logit_rows as u32, 1), 256)) }.map(drop)
        });
    }

    fn to_host(&self, x: &CudaTensor) -> Vec<f32> {
        self.finish_step();
        let _mark = Marked(self, "logits to host");
        let n = x.len();
        let Some(b) = x.buf.as_ref() else {
            return vec![0.0; n];
        };
        let mut out = vec![0f32; n];
        if n > 0 {
            let r = self.stream.memcpy_dtoh(&b.slice(0..n), &mut out);
            self.ok("copying activations to the host", r);
        }
        out
    }

    fn argmax_rows(&self, x: &CudaTensor, cols: usize) -> Vec<u32> {
        let rows = x.len() / cols.max(1);
        let c = cols as i32;
        self.token_ids(x, rows, |xb, ids| {
            let mut b = self.stream.launch_builder(&self.k.argmax_rows);
            b.arg(xb).arg(ids).arg(&c);
            self.launch("argmax", || {
                unsafe { b.launch(cfg((rows as u32, 1), 1024)) }.map(drop)
            });
        })
    }

    fn sample_rows(
        &self,
        x: &CudaTensor,
        cols: usize,
        plan: &CudaPlan,
        draws: &[Draw],
    ) -> Vec<u32> {
        // The draws were uploaded with the plan (an upload here would be recorded into a step's graph).
        let rows = (x.len() / cols.max(1))
            .min(draws.len())
            .min(plan.n_logit_rows);
        let c = cols as i32;
        self.token_ids(x, rows, |xb, ids| {
            // The kernel turns the logits into weights in place: nothing reads them again this step.
            let mut b = self.stream.launch_builder(&self.k.sample_rows);
            b.arg(xb).arg(&plan.draws).arg(ids).arg(&c);
            self.launch("sample", || {
                unsafe { b.launch(cfg((rows as u32, 1), 1024)) }.map(drop)
            });
        })
    }

    fn read_kv_block(&self, kv: &CudaKvStore, layer: usize, block: u32) -> (Vec<f32>, Vec<f32>) {
        kv.read_block(self, layer, block)
    }

    fn read_kv_blocks(
        &self,
        kv: &CudaKvStore,
        layer: usize,
        blocks: &[u32],
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        // kivi2, and blocks whose planes are not whole 16-byte words (small custom block sizes), go one by one.
        if blocks.is_empty() || kv.staging_shape(self, 1, blocks.len()).is_err() {
            return blocks
                .iter()
                .map(|&b| kv.read_block(self, layer, b))
                .collect();
        }
        match kv.read_blocks(self, layer, blocks) {
            Ok(read) => read,
            Err(e) => {
                // Like every operation here: the error is kept and reported by `check`, the data is zeros.
                self.fail("reading KV blocks", e);
                let n = kv.layout.block_elems();
                vec![(vec![0.0; n], vec![0.0; n]); blocks.len()]
            }
        }
    }

    fn write_kv_block(&self, kv: &mut CudaKvStore, layer: usize, block: u32, k: &[f32], v: &[f32]) {
        kv.write_block(self, layer, block, k, v)
    }

    fn write_kv_blocks(
        &self,
        kv: &mut CudaKvStore,
        layer: usize,
        blocks: &[u32],
        data: &[(&[f32], &[f32])],
    ) {
        // As for reads: what the staging cannot take goes one by one.
        if blocks.is_empty() || kv.staging_shape(self, 1, blocks.len()).is_err() {
            for (&b, (k, v)) in blocks.iter().zip(data) {
                kv.write_block(self, layer, b, k, v);
            }
            return;
        }
        if let Err(e) = kv.write_blocks(self, layer, blocks, data) {
            // Kept and reported by `check`, like every operation here.
            self.fail("writing KV blocks", e);
        }
    }

    fn device_links(&self) -> Option<std::sync::Arc<dyn crate::backend::link::DeviceLinks>> {
        super::device_link::CudaDeviceLinks::of(self)
    }

    fn send_kv_blocks(
        &self,
        kv: &CudaKvStore,
        link: &crate::backend::link::SenderLink,
        layer: usize,
        blocks: &[u32],
    ) -> Result<usize> {
        super::device_link::send(self, kv, link, layer, blocks)
    }

    fn write_staged_blocks(
        &self,
        kv: &mut CudaKvStore,
        layer: usize,
        blocks: &[u32],
        payload: crate::backend::link::DevicePayload,
    ) -> Result<()> {
        super::device_link::write_staged(self, kv, layer, blocks, payload)
    }

    fn retire_kv_blocks(&self, kv: &mut CudaKvStore, blocks: &[u32]) {
        if let KvBufs::Kivi2(s) = &mut kv.bufs {
            s.retire(blocks);
        }
    }

    fn check(&self) -> Result<()> {
        // A step that ended before its head (no logit rows) leaves no capture open.
        lock(&self.graphs).abort(&self.stream);
        match lock(&self.error).take() {
            Some(e) => Err(EngineError::Device(e)),
            None => Ok(()),
        }
    }
}

impl CudaBackend {
    /// Flash-decoding attention on tensor cores: grid (row, KV head, split), each row's keys split so that the grid
    /// fills whole waves of resident blocks ([`choose_splits`]), in chunks of at least 64 keys of the longest
    /// context's bucket (so a recorded step fits every context of its bucket; splits past a short context find no
    /// keys); the last split to finish merges them.
    fn decode_attention(
        &self,
        q: &CudaTensor,
        kv: &CudaKvStore,
        layer: usize,
        plan: &CudaPlan,
        out: &mut CudaTensor,
    ) {
        let l = kv.layout;
        let heads = q.cols / l.head_dim;
        let group = heads / l.kv_heads;
        let f = match self.k.attention.get(&(l.format, l.head_dim)) {
            Some(f) if group <= 8 => f,
            _ => {
                return self.fail(
                    "attention",
                    format!(
                        "no kernel for head_dim {} with {group} query heads per KV head (head_dim 64 or 128, up to 8)",
                        l.head_dim
                    ),
                );
            }
        };
        let (_, stage_bytes) = decode_stages(l.format, l.head_dim);
        let shared = decode_shared_bytes(l.format, l.head_dim);
        let per_sm = self.k.attention_per_sm[&(l.format, l.head_dim)];
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
        let layer_off = (layer * kv.layer_elems()) as u64;
        let (kvh, bs) = (l.kv_heads as i32, l.block_size as i32);
        let (scale, sp) = (1.0 / (l.head_dim as f32).sqrt(), splits as i32);
        let (group, stage_bytes) = (group as i32, stage_bytes as i32);
        let grid = LaunchConfig {
            grid_dim: (q.rows as u32, l.kv_heads as u32, splits as u32),
            block_dim: (32 * DECODE_WARPS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(qb);
        kv.bufs.push_args(&mut b);
        b.arg(o)
            .arg(pb)
            .arg(ab)
            .arg(&plan.row_ctx)
            .arg(&plan.row_table)
            .arg(&plan.tables);
        b.arg(&kvh)
            .arg(&group)
            .arg(&bs)
            .arg(&layer_off)
            .arg(&scale)
            .arg(&sp)
            .arg(&stage_bytes);
        self.launch("attention", || unsafe { b.launch(grid) }.map(drop));
    }

    /// How many splits each (row, KV head) of a split attention launch over `rows` rows takes ([`choose_splits`],
    /// for kernels of which one SM holds `per_sm` blocks), with the partial results and arrival counts made to hold
    /// them and locked for the launch (`None`, with the failure recorded, when they cannot be).
    pub(super) fn attention_splits(
        &self,
        rows: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        per_sm: usize,
        plan: &CudaPlan,
    ) -> Option<Splits<'_>> {
        let blocks = rows * kv_heads;
        let n = choose_splits(
            blocks,
            64 * plan.ctx_bucket,
            per_sm * self.sms,
            plan.ctx_bucket,
        );
        let (mut part, mut arrived) = (lock(&self.part), lock(&self.arrived));
        let need = rows * heads * n * (head_dim + 2);
        (self.ensure("allocating attention splits", &mut part, need)
            && self.ensure("allocating attention counts", &mut arrived, blocks))
        .then_some(Splits { n, part, arrived })
    }

    /// Tiled tensor-core attention over 64-row tiles of each sequence's rows: grid (tile, query head).
    fn prefill_attention(
        &self,
        q: &CudaTensor,
        kv: &CudaKvStore,
        layer: usize,
        plan: &CudaPlan,
        out: &mut CudaTensor,
    ) {
        let l = kv.layout;
        let heads = q.cols / l.head_dim;
        let Some(f) = self.k.prefill_attention.get(&(l.format, l.head_dim)) else {
            return self.fail(
                "attention",
                format!("no prefill kernel for head_dim {} (64 or 128)", l.head_dim),
            );
        };
        let ob = self.bf16_target(out);
        let (Some(qb), Some(o)) = (q.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        let layer_off = (layer * kv.layer_elems()) as u64;
        let (kvh, group, bs) = (
            l.kv_heads as i32,
            (heads / l.kv_heads) as i32,
            l.block_size as i32,
        );
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let grid = LaunchConfig {
            grid_dim: (plan.n_tiles as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: prefill_shared_bytes(l.head_dim) as u32,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(qb);
        kv.bufs.push_args(&mut b);
        b.arg(o)
            .arg(&ob)
            .arg(&plan.tile_row0)
            .arg(&plan.tile_rows)
            .arg(&plan.row_ctx)
            .arg(&plan.row_table)
            .arg(&plan.tables);
        b.arg(&kvh).arg(&group).arg(&bs).arg(&layer_off).arg(&scale);
        self.launch("prefill_attention", || unsafe { b.launch(grid) }.map(drop));
    }
}

/// A split attention launch's split count and its buffers, locked while the launch is issued.
pub(super) struct Splits<'a> {
    pub n: usize,
    pub part: std::sync::MutexGuard<'a, Option<cudarc::driver::CudaSlice<f32>>>,
    pub arrived: std::sync::MutexGuard<'a, Option<cudarc::driver::CudaSlice<u32>>>,
}

/// Splits per (row, KV head) for `blocks` such pairs of up to `keys` keys each (the context bucket's upper end), on
/// a GPU holding `resident` blocks at once, at most `cap`. Blocks of one launch take about the same time, so a grid
/// runs in whole waves: the estimate is waves x (keys per split + a fixed cost per block, about 64 keys' worth: the
/// query load and the block's own merge) + the final merge, about 4 keys' worth per split (one block per pair reads
/// every split's partial result), and the cheapest count wins, the smaller on a tie.
pub(super) fn choose_splits(blocks: usize, keys: usize, resident: usize, cap: usize) -> usize {
    const FIXED_KEYS: f64 = 64.0;
    const MERGE_KEYS: f64 = 4.0;
    let (blocks, resident) = (blocks.max(1), resident.max(1));
    let cost = |s: usize| {
        (blocks * s).div_ceil(resident) as f64 * (keys as f64 / s as f64 + FIXED_KEYS)
            + MERGE_KEYS * s as f64
    };
    (1..=cap.max(1)).fold(
        1,
        |best, s| if cost(s) < cost(best) - 1e-9 { s } else { best },
    )
}

#[cfg(test)]
mod tests {
    use super::choose_splits;

    #[test]
    fn splits_fill_whole_waves() {
        // One sequence, 8 KV heads, 8k keys, 396 resident blocks: one wave either way (up to 49 splits), and 45 is
        // where shorter splits stop paying for the longer final merge.
        assert_eq!(choose_splits(8, 8192, 396, 128), 45);
        // With 264 places, 33 splits fill one wave; more would need a second.
        assert_eq!(choose_splits(8, 8192, 264, 128), 33);
        // 256 pairs: 3 splits, two waves, 768 of 792 places (2 splits also take two waves, with longer blocks; 17
        // fill 11 waves almost exactly but pay the fixed cost 17 times).
        assert_eq!(choose_splits(256, 8192, 396, 128), 3);
        // 512 pairs of 1k keys on 264 places: two waves without splitting beat everything else.
        assert_eq!(choose_splits(512, 1024, 264, 16), 1);
        // The context bucket caps the count.
        assert_eq!(choose_splits(8, 1024, 264, 16), 16);
        assert_eq!(choose_splits(8, 64, 264, 0), 1);
    }
}
