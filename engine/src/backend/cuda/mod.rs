//! The CUDA backend: bf16 weights in GPU memory, f32 activations, a paged KV store (f32 or f16) in GPU memory,
//! kernels in CUDA C compiled at start-up with NVRTC ([`module`]), and GEMMs through cuBLAS (bf16 operands, f32
//! accumulate and output). CUDA is loaded at run time (cudarc's dynamic loading), so the binary builds and runs
//! on machines without it; [`CudaBackend::new`] says clearly when there is no usable GPU.
//!
//! The backend trait's operations cannot fail one by one; the first CUDA error is kept (as CUDA itself keeps a
//! sticky error) and [`Backend::check`] reports it at the end of the forward pass.

mod ceilings;
mod module;

pub use ceilings::{Ceilings, ceilings};

use super::{AttentionTally, Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use crate::model::source::WeightView;
use crate::quant::GgmlType;
use crate::quant::dequant::dequantize_row;
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use module::Kernels;
use std::sync::{Arc, Mutex};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the driver library; nothing from it is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    /// The bf16 copy of a GEMM's input (activations are f32).
    xb: Mutex<CudaSlice<u16>>,
    /// Split attention's partial results.
    part: Mutex<Option<CudaSlice<f32>>>,
    /// Streaming multiprocessors, for sizing grids.
    sms: usize,
    error: Mutex<Option<String>>,
    /// With `TANDEM_CUDA_PROFILE` set: synchronize after every operation and sum wall time per operation.
    profile: Option<Mutex<Profile>>,
    tally_warned: std::sync::atomic::AtomicBool,
}

/// Time per operation, when profiling.
struct Profile {
    last: std::time::Instant,
    spent: Vec<(&'static str, f64)>,
}

/// A bf16 weight matrix on the device, row-major `rows x cols`.
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<u16>,
}

/// Row-major f32 activations on the device; the allocation only grows.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    buf: Option<CudaSlice<f32>>,
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

enum KvBufs {
    F32 {
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
    /// IEEE half, as raw bits.
    F16 {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
    },
}

pub struct CudaKvStore {
    layout: KvLayout,
    bufs: KvBufs,
}

impl CudaKvStore {
    /// Elements of one layer (K or V).
    fn layer_elems(&self) -> usize {
        self.layout.num_blocks * self.layout.block_elems()
    }
}

/// A step's layout, uploaded once.
pub struct CudaPlan {
    rows: usize,
    tokens: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    row_ctx: CudaSlice<u32>,
    row_table: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    logit_rows: CudaSlice<u32>,
    n_logit_rows: usize,
    /// Most keys any row attends to.
    max_ctx: usize,
    half_dim: usize,
    interleaved: i32,
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cfg(grid: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the on-disk cache) the kernels and creates the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(EngineError::BackendUnavailable(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        let dev = |e: cudarc::driver::DriverError| EngineError::Device(format!("CUDA: {e}"));
        let count = CudaContext::device_count().map_err(dev)?;
        if ordinal >= count as usize {
            return Err(EngineError::BackendUnavailable(format!(
                "GPU {ordinal} requested; this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        let stream = ctx.default_stream();
        let k = Kernels::load(&ctx)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| EngineError::Device(format!("cuBLAS: {e:?}")))?;
        let xb = stream.alloc_zeros::<u16>(1).map_err(dev)?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev)? as usize;
        Ok(Self {
            part: Mutex::new(None),
            sms,
            ctx,
            stream,
            blas,
            k,
            xb: Mutex::new(xb),
            error: Mutex::new(None),
            profile: std::env::var_os("TANDEM_CUDA_PROFILE").map(|_| {
                Mutex::new(Profile {
                    last: std::time::Instant::now(),
                    spent: Vec::new(),
                })
            }),
            tally_warned: Default::default(),
        })
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Keeps the first error.
    fn fail(&self, what: &str, e: impl std::fmt::Debug) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("{what}: {e:?}"));
        }
    }

    fn ok<T, E: std::fmt::Debug>(&self, what: &str, r: std::result::Result<T, E>) -> Option<T> {
        r.map_err(|e| self.fail(what, e)).ok()
    }

    fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        what: &str,
        host: &[T],
    ) -> Option<CudaSlice<T>> {
        if host.is_empty() {
            return self.ok(what, self.stream.alloc_zeros::<T>(1));
        }
        self.ok(what, self.stream.clone_htod(host))
    }

    /// Makes `t` hold `rows x cols`, growing its allocation if needed.
    fn resize(&self, t: &mut CudaTensor, rows: usize, cols: usize) {
        let need = (rows * cols).max(1);
        let have = t.buf.as_ref().map_or(0, |b| b.len());
        if have < need {
            t.buf = self.ok(
                "allocating activations",
                self.stream.alloc_zeros::<f32>(need),
            );
        }
        t.rows = rows;
        t.cols = cols;
    }

    fn launch(&self, what: &'static str, r: std::result::Result<(), cudarc::driver::DriverError>) {
        self.ok(what, r);
        self.mark(what);
    }

    /// Profiling: charges the time since the previous mark to `what` (after the device finished it).
    fn mark(&self, what: &'static str) {
        let Some(p) = &self.profile else { return };
        let _ = self.stream.synchronize();
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let dt = (now - p.last).as_secs_f64();
        p.last = now;
        match p.spent.iter_mut().find(|(n, _)| *n == what) {
            Some((_, t)) => *t += dt,
            None => p.spent.push((what, dt)),
        }
    }

    /// Profiling: seconds per operation since the last call (empty unless `TANDEM_CUDA_PROFILE` is set).
    pub fn take_profile(&self) -> Vec<(&'static str, f64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        p.last = std::time::Instant::now();
        std::mem::take(&mut p.spent)
    }
}

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

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CudaKvStore> {
        let n = layout.layers * layout.num_blocks * layout.block_elems();
        let dev = |e: cudarc::driver::DriverError| {
            EngineError::Device(format!("allocating the KV cache ({n} elements x2): {e}"))
        };
        let bufs = match layout.format {
            KvFormat::F32 => KvBufs::F32 {
                k: self.stream.alloc_zeros(n).map_err(dev)?,
                v: self.stream.alloc_zeros(n).map_err(dev)?,
            },
            KvFormat::F16 => KvBufs::F16 {
                k: self.stream.alloc_zeros(n).map_err(dev)?,
                v: self.stream.alloc_zeros(n).map_err(dev)?,
            },
            other => {
                return Err(EngineError::Device(format!(
                    "KV format {other:?} is not supported on CUDA yet (use f32 or f16)"
                )));
            }
        };
        Ok(CudaKvStore {
            layout: *layout,
            bufs,
        })
    }

    fn activations(&self, rows: usize, cols: usize) -> CudaTensor {
        let mut t = CudaTensor {
            rows: 0,
            cols: 0,
            buf: None,
        };
        self.resize(&mut t, rows, cols);
        t
    }

    fn plan(&self, layout: &BatchLayout, rope: &RopeConfig, head_dim: usize) -> CudaPlan {
        self.mark("host (between steps)");
        let _uploaded = Marked(self, "plan upload");
        let inv = rope.inv_freq(head_dim);
        let half_dim = head_dim / 2;
        let n = layout.tokens.len();
        let mut cos = Vec::with_capacity(n * half_dim);
        let mut sin = Vec::with_capacity(n * half_dim);
        for &p in &layout.positions {
            for f in &inv {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        let mut row_ctx = vec![0u32; n];
        let mut row_table = vec![0u32; n];
        let mut tables = Vec::new();
        for s in &layout.seqs {
            let off = tables.len() as u32;
            tables.extend_from_slice(&s.block_table);
            for i in 0..s.n_rows {
                row_ctx[s.first_row + i] = (s.start_pos + i + 1) as u32;
                row_table[s.first_row + i] = off;
            }
        }
        let logit_rows: Vec<u32> = layout.logit_rows.iter().map(|&r| r as u32).collect();
        let up32 = |what, v: &[u32]| self.upload(what, v).unwrap_or_else(|| self.empty_u32());
        let upf = |what, v: &[f32]| self.upload(what, v).unwrap_or_else(|| self.empty_f32());
        CudaPlan {
            rows: n,
            tokens: up32("plan tokens", &layout.tokens),
            slots: up32("plan slots", &layout.slots),
            cos: upf("plan cos", &cos),
            sin: upf("plan sin", &sin),
            row_ctx: up32("plan contexts", &row_ctx),
            row_table: up32("plan tables", &row_table),
            tables: up32("plan tables", &tables),
            logit_rows: up32("plan logit rows", &logit_rows),
            n_logit_rows: logit_rows.len(),
            max_ctx: row_ctx.iter().copied().max().unwrap_or(0) as usize,
            half_dim,
            interleaved: i32::from(rope.layout == RopeLayout::Interleaved),
        }
    }

    fn embed(&self, table: &CudaMatrix, plan: &CudaPlan, out: &mut CudaTensor) {
        self.resize(out, plan.rows, table.cols);
        let Some(o) = out.buf.as_mut() else { return };
        let cols = table.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.embed_bf16);
        b.arg(&table.data).arg(&plan.tokens).arg(o).arg(&cols);
        self.launch(
            "embed",
            unsafe { b.launch(cfg((plan.rows as u32, 1), 256)) }.map(drop),
        );
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaSlice<f32>, eps: f32, out: &mut CudaTensor) {
        self.resize(out, x.rows, x.cols);
        let (Some(xb), Some(o)) = (x.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        let cols = x.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(xb).arg(w).arg(o).arg(&cols).arg(&eps);
        self.launch(
            "rms_norm",
            unsafe { b.launch(cfg((x.rows as u32, 1), 256)) }.map(drop),
        );
    }

    fn matmul(&self, x: &CudaTensor, pairs: &mut [(&CudaMatrix, &mut CudaTensor)]) {
        let Some(xf) = x.buf.as_ref() else { return };
        // Small batches: one pass over each weight at full load width, no bf16 copy of the input.
        if (1..=self.k.gemv.len()).contains(&x.rows) && x.cols.is_multiple_of(8) {
            for group in pairs.chunks_mut(3) {
                self.gemv(x.rows, x.cols, xf, group);
            }
            return;
        }
        let n = x.len();
        let mut xb = self.xb.lock().unwrap_or_else(|p| p.into_inner());
        if xb.len() < n {
            match self.stream.alloc_zeros::<u16>(n) {
                Ok(b) => *xb = b,
                Err(e) => return self.fail("allocating the GEMM input", e),
            }
        }
        let nn = n as u64;
        let mut b = self.stream.launch_builder(&self.k.to_bf16);
        b.arg(xf).arg(&mut *xb).arg(&nn);
        self.launch("to_bf16", unsafe { b.launch(grid_1d(n)) }.map(drop));
        for (w, out) in pairs.iter_mut() {
            self.resize(out, x.rows, w.rows);
            let Some(o) = out.buf.as_mut() else { return };
            self.gemm(w, &xb, x.rows, o);
            self.mark("gemm");
        }
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaSlice<f32>) {
        let (n, cols) = (x.len() as u64, x.cols as i32);
        let Some(xb) = x.buf.as_mut() else { return };
        let mut b = self.stream.launch_builder(&self.k.add_bias);
        b.arg(xb).arg(bias).arg(&n).arg(&cols);
        self.launch(
            "add_bias",
            unsafe { b.launch(grid_1d(n as usize)) }.map(drop),
        );
    }

    fn rope(&self, x: &mut CudaTensor, heads: usize, plan: &CudaPlan) {
        let head_dim = (plan.half_dim * 2) as i32;
        let (rows, h) = (x.rows as u32, heads as i32);
        let Some(xb) = x.buf.as_mut() else { return };
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(xb)
            .arg(&plan.cos)
            .arg(&plan.sin)
            .arg(&h)
            .arg(&head_dim)
            .arg(&plan.interleaved);
        let threads = (plan.half_dim as u32).max(1);
        self.launch(
            "rope",
            unsafe { b.launch(cfg((rows, heads as u32), threads)) }.map(drop),
        );
    }

    fn store_kv(
        &self,
        kv: &mut CudaKvStore,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        plan: &CudaPlan,
    ) {
        let l = kv.layout;
        let layer_off = (layer * kv.layer_elems()) as u64;
        let (Some(kb), Some(vb)) = (k.buf.as_ref(), v.buf.as_ref()) else {
            return;
        };
        let (kvh, hd, bs) = (l.kv_heads as i32, l.head_dim as i32, l.block_size as i32);
        let grid = cfg((plan.rows as u32, l.kv_heads as u32), l.head_dim as u32);
        let r = match &mut kv.bufs {
            KvBufs::F32 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.store_kv_f32);
                b.arg(kb).arg(vb).arg(kc).arg(vc).arg(&plan.slots);
                b.arg(&kvh).arg(&hd).arg(&bs).arg(&layer_off);
                unsafe { b.launch(grid) }.map(drop)
            }
            KvBufs::F16 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.store_kv_f16);
                b.arg(kb).arg(vb).arg(kc).arg(vc).arg(&plan.slots);
                b.arg(&kvh).arg(&hd).arg(&bs).arg(&layer_off);
                unsafe { b.launch(grid) }.map(drop)
            }
        };
        self.launch("store_kv", r);
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
        let l = kv.layout;
        let heads = q.cols / l.head_dim;
        let group = heads / l.kv_heads;
        let f16 = matches!(kv.bufs, KvBufs::F16 { .. });
        let Some(f) = self
            .k
            .attention
            .get(&(f16, group, l.head_dim / 32))
            .filter(|_| l.head_dim.is_multiple_of(32))
        else {
            return self.fail(
                "attention",
                format!(
                    "no kernel for head_dim {} with {group} query heads per KV head (head_dim 64 or 128, up to 8)",
                    l.head_dim
                ),
            );
        };
        self.resize(out, q.rows, q.cols);
        // Split each row's keys so that the grid covers the GPU eight blocks deep, in chunks of at least 64 keys.
        let blocks = q.rows * l.kv_heads;
        let splits = (8 * self.sms)
            .div_ceil(blocks.max(1))
            .clamp(1, plan.max_ctx.div_ceil(64).max(1));
        let mut part = self.part.lock().unwrap_or_else(|p| p.into_inner());
        let need = (q.rows * heads * splits * (l.head_dim + 2)).max(1);
        if part.as_ref().is_none_or(|p| p.len() < need) {
            *part = self.ok(
                "allocating attention splits",
                self.stream.alloc_zeros::<f32>(need),
            );
        }
        let (Some(qb), Some(o), Some(pb)) = (q.buf.as_ref(), out.buf.as_mut(), part.as_mut())
        else {
            return;
        };
        let layer_off = (layer * kv.layer_elems()) as u64;
        let (h, kvh, hd, bs) = (
            heads as i32,
            l.kv_heads as i32,
            l.head_dim as i32,
            l.block_size as i32,
        );
        let (scale, sp) = (1.0 / (l.head_dim as f32).sqrt(), splits as i32);
        let grid = LaunchConfig {
            grid_dim: (q.rows as u32, l.kv_heads as u32, splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(qb);
        match &kv.bufs {
            KvBufs::F32 { k, v } => b.arg(k).arg(v),
            KvBufs::F16 { k, v } => b.arg(k).arg(v),
        };
        b.arg(&mut *o)
            .arg(&mut *pb)
            .arg(&plan.row_ctx)
            .arg(&plan.row_table)
            .arg(&plan.tables);
        b.arg(&kvh).arg(&bs).arg(&layer_off).arg(&scale).arg(&sp);
        self.launch("attention", unsafe { b.launch(grid) }.map(drop));
        if splits > 1 {
            let mut b = self.stream.launch_builder(&self.k.attention_combine);
            b.arg(&*pb).arg(o).arg(&h).arg(&hd).arg(&sp);
            let grid = cfg((q.rows as u32, heads as u32), l.head_dim as u32);
            self.launch("attention_combine", unsafe { b.launch(grid) }.map(drop));
        }
    }

    fn add_rms_norm(&self, x: &mut CudaTensor, y: &mut CudaTensor, w: &CudaSlice<f32>, eps: f32) {
        let (rows, cols) = (x.rows as u32, x.cols as i32);
        let (Some(xb), Some(yb)) = (x.buf.as_mut(), y.buf.as_mut()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.add_rms_norm);
        b.arg(xb).arg(yb).arg(w).arg(&cols).arg(&eps);
        self.launch(
            "add_rms_norm",
            unsafe { b.launch(cfg((rows, 1), 256)) }.map(drop),
        );
    }

    fn silu_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) {
        let n = gate.len() as u64;
        let (Some(g), Some(u)) = (gate.buf.as_mut(), up.buf.as_ref()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.silu_mul);
        b.arg(g).arg(u).arg(&n);
        self.launch(
            "silu_mul",
            unsafe { b.launch(grid_1d(n as usize)) }.map(drop),
        );
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let n = x.len() as u64;
        let (Some(xb), Some(yb)) = (x.buf.as_mut(), y.buf.as_ref()) else {
            return;
        };
        let mut b = self.stream.launch_builder(&self.k.add);
        b.arg(xb).arg(yb).arg(&n);
        self.launch("add", unsafe { b.launch(grid_1d(n as usize)) }.map(drop));
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
        self.launch(
            "gather_rows",
            unsafe { b.launch(cfg((plan.n_logit_rows as u32, 1), 256)) }.map(drop),
        );
    }

    fn to_host(&self, x: &CudaTensor) -> Vec<f32> {
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
        let _mark = Marked(self, "argmax");
        let rows = x.len() / cols.max(1);
        let (Some(xb), true) = (x.buf.as_ref(), rows > 0) else {
            return Vec::new();
        };
        let Some(mut ids) = self.ok("argmax buffer", self.stream.alloc_zeros::<u32>(rows)) else {
            return vec![0; rows];
        };
        let c = cols as i32;
        let mut b = self.stream.launch_builder(&self.k.argmax_rows);
        b.arg(xb).arg(&mut ids).arg(&c);
        self.ok(
            "argmax",
            unsafe { b.launch(cfg((rows as u32, 1), 1024)) }.map(drop),
        );
        let mut out = vec![0u32; rows];
        self.ok(
            "copying token ids to the host",
            self.stream.memcpy_dtoh(&ids, &mut out),
        );
        out
    }

    fn read_kv_block(&self, kv: &CudaKvStore, layer: usize, block: u32) -> (Vec<f32>, Vec<f32>) {
        let n = kv.layout.block_elems();
        let at = layer * kv.layer_elems() + block as usize * n;
        let mut k = vec![0f32; n];
        let mut v = vec![0f32; n];
        match &kv.bufs {
            KvBufs::F32 { k: kc, v: vc } => {
                self.ok(
                    "reading a KV block",
                    self.stream.memcpy_dtoh(&kc.slice(at..at + n), &mut k),
                );
                self.ok(
                    "reading a KV block",
                    self.stream.memcpy_dtoh(&vc.slice(at..at + n), &mut v),
                );
            }
            KvBufs::F16 { k: kc, v: vc } => {
                let mut bits = vec![0u16; n];
                self.ok(
                    "reading a KV block",
                    self.stream.memcpy_dtoh(&kc.slice(at..at + n), &mut bits),
                );
                k = bits
                    .iter()
                    .map(|&b| half::f16::from_bits(b).to_f32())
                    .collect();
                self.ok(
                    "reading a KV block",
                    self.stream.memcpy_dtoh(&vc.slice(at..at + n), &mut bits),
                );
                v = bits
                    .iter()
                    .map(|&b| half::f16::from_bits(b).to_f32())
                    .collect();
            }
        }
        (k, v)
    }

    fn write_kv_block(&self, kv: &mut CudaKvStore, layer: usize, block: u32, k: &[f32], v: &[f32]) {
        let n = kv.layout.block_elems();
        let at = layer * kv.layer_elems() + block as usize * n;
        match &mut kv.bufs {
            KvBufs::F32 { k: kc, v: vc } => {
                self.ok(
                    "writing a KV block",
                    self.stream.memcpy_htod(k, &mut kc.slice_mut(at..at + n)),
                );
                self.ok(
                    "writing a KV block",
                    self.stream.memcpy_htod(v, &mut vc.slice_mut(at..at + n)),
                );
            }
            KvBufs::F16 { k: kc, v: vc } => {
                let bits = |x: &[f32]| -> Vec<u16> {
                    x.iter()
                        .map(|&f| half::f16::from_f32(f).to_bits())
                        .collect()
                };
                self.ok(
                    "writing a KV block",
                    self.stream
                        .memcpy_htod(&bits(k), &mut kc.slice_mut(at..at + n)),
                );
                self.ok(
                    "writing a KV block",
                    self.stream
                        .memcpy_htod(&bits(v), &mut vc.slice_mut(at..at + n)),
                );
            }
        }
    }

    fn check(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(EngineError::Device(e)),
            None => Ok(()),
        }
    }
}

/// Marks its operation when dropped.
struct Marked<'a>(&'a CudaBackend, &'static str);

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        self.0.mark(self.1);
    }
}

impl CudaBackend {
    fn empty_u32(&self) -> CudaSlice<u32> {
        self.stream
            .alloc_zeros::<u32>(1)
            .expect("a 4-byte allocation")
    }
    fn empty_f32(&self) -> CudaSlice<f32> {
        self.stream
            .alloc_zeros::<f32>(1)
            .expect("a 4-byte allocation")
    }

    /// Up to three weights sharing the input `x` (`rows x k`, rows <= 8) in one launch of the small-batch kernel.
    fn gemv(
        &self,
        rows: usize,
        k: usize,
        x: &CudaSlice<f32>,
        group: &mut [(&CudaMatrix, &mut CudaTensor)],
    ) {
        let total: usize = group.iter().map(|(w, _)| w.rows).sum();
        for (w, out) in group.iter_mut() {
            self.resize(out, rows, w.rows);
        }
        let f = &self.k.gemv[rows - 1];
        let mut b = self.stream.launch_builder(f);
        let ns: Vec<i32> = group.iter().map(|(w, _)| w.rows as i32).collect();
        let zero = 0i32;
        let first = &group[0].0.data;
        let slots = group
            .iter_mut()
            .map(Some)
            .chain(std::iter::repeat_with(|| None));
        for (slot, n) in slots.zip(ns.iter().chain(std::iter::repeat(&zero))).take(3) {
            match slot {
                Some((w, out)) => {
                    let Some(o) = out.buf.as_mut() else { return };
                    b.arg(&w.data).arg(o).arg(n);
                }
                // Unused slots: a real pointer with no rows.
                None => {
                    b.arg(first).arg(first).arg(n);
                }
            }
        }
        let k = k as i32;
        b.arg(x).arg(&k);
        let blocks = total.div_ceil(8) as u32;
        self.launch("gemv", unsafe { b.launch(cfg((blocks, 1), 256)) }.map(drop));
    }

    /// `out (rows x w.rows) = x (rows x w.cols) @ w^T` in cuBLAS's column-major terms: `out^T = w . x^T`, with `w`
    /// (row-major, so column-major `w^T`) transposed and `x^T` as is.
    fn gemm(&self, w: &CudaMatrix, xb: &CudaSlice<u16>, rows: usize, out: &mut CudaSlice<f32>) {
        let (m, n, k) = (w.rows as i32, rows as i32, w.cols as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.data.device_ptr(&self.stream);
        let (b, _gb) = xb.device_ptr(&self.stream);
        let (c, _gc) = out.device_ptr_mut(&self.stream);
        let r = unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                b as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        self.ok("cuBLAS GEMM", r);
    }
}
