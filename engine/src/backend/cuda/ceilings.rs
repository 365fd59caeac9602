//! The two ceilings every GPU figure is judged against, measured on the device at hand: device-to-device copy
//! bandwidth (bytes read plus bytes written) and the bf16 GEMM rate of the backend's own GEMM path; and what single
//! kernels reach alone against them (the batch-1 GEMV, decode attention over each cache format).

use super::selfcheck::random;
use super::{CudaBackend, CudaMatrix};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Bytes read plus bytes written per second by a large device-to-device copy.
    pub copy_bytes_per_s: f64,
    /// FLOP/s of an 8192-cube bf16 GEMM (f32 accumulate and output) through the backend.
    pub gemm_flops_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds one run of `op` takes on stream `s`: the median of 10 after a warm-up, the stream drained before and
/// after each.
fn median_time(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    mut op: impl FnMut() -> std::result::Result<(), cudarc::driver::DriverError>,
) -> std::result::Result<f64, cudarc::driver::DriverError> {
    let mut times = Vec::new();
    for i in 0..11 {
        s.synchronize()?;
        let t = Instant::now();
        op()?;
        s.synchronize()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Measures both ceilings (median of 10 after a warm-up; random data, never zeros).
pub fn ceilings(b: &CudaBackend) -> Result<Ceilings> {
    let dev =
        |e: cudarc::driver::DriverError| EngineError::Device(format!("measuring ceilings: {e}"));
    let s = &b.stream;
    let n = 1usize << 29; // 1 GiB of u16
    let host: Vec<u16> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16)
        .collect();
    let src = s.clone_htod(&host).map_err(dev)?;
    let mut dst = s.alloc_zeros::<u16>(n).map_err(dev)?;
    let copy_bytes_per_s =
        2.0 * (n * 2) as f64 / median_time(s, || s.memcpy_dtod(&src, &mut dst)).map_err(dev)?;
    drop((src, dst));

    let d = 8192usize;
    let host: Vec<u16> = (0..(d * d) as u32)
        .map(|i| {
            half::bf16::from_f32(((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0) - 0.5)
                .to_bits()
        })
        .collect();
    let w = CudaMatrix {
        rows: d,
        cols: d,
        data: s.clone_htod(&host).map_err(dev)?,
    };
    let xb = s.clone_htod(&host).map_err(dev)?;
    let mut out = s.alloc_zeros::<f32>(d * d).map_err(dev)?;
    let gemm_s = median_time(s, || {
        b.gemm(&w, &xb, d, &mut out);
        Ok(())
    })
    .map_err(dev)?;
    crate::backend::Backend::check(b)?;
    let gemm_flops_per_s = 2.0 * (d * d * d) as f64 / gemm_s;
    Ok(Ceilings {
        copy_bytes_per_s,
        gemm_flops_per_s,
    })
}

/// Bytes per second the small-batch GEMV reads from a `rows x cols` bf16 weight at one input row (a gate/up pair
/// of that shape through the fused SwiGLU kernel when `swiglu`): the median of 11 timings of 24 back-to-back
/// launches each, after a warm-up. The launches cycle through copies of the weight totalling at least 256 MB, so
/// that none is still in the L2 cache (50 MB on an H200) when read again. Set against the copy ceiling it shows what
/// the batch-1 decode step can reach.
pub fn gemv_read_rate(b: &CudaBackend, rows: usize, cols: usize, swiglu: bool) -> Result<f64> {
    let dev = |e: cudarc::driver::DriverError| EngineError::Device(format!("timing the GEMV: {e}"));
    let values = random(&mut crate::rng::Rng::new(5), rows * cols, 0.5);
    let per_launch = if swiglu { 2 } else { 1 };
    let bytes = rows * cols * 2 * per_launch;
    let copies = (256usize << 20).div_ceil(bytes).max(2);
    // Converted and uploaded once, then copied on the device.
    let first = b
        .matrix(rows, cols, &values)
        .ok_or_else(|| EngineError::Device("uploading the GEMV weights".into()))?;
    let mut weights = Vec::with_capacity(copies * per_launch);
    for _ in 1..copies * per_launch {
        let data = b.stream.clone_dtod(&first.data).map_err(dev)?;
        weights.push(CudaMatrix { rows, cols, data });
    }
    weights.push(first);
    let x = b.tensor(1, cols, &values[..cols]);
    let (mut o1, mut o2) = (
        b.tensor(1, rows, &values[..rows]),
        b.tensor(1, rows, &values[..rows]),
    );
    let seconds = time_launches(b, 24, "the GEMV", |l| {
        let w = &weights[per_launch * (l % copies)..];
        if swiglu {
            b.swiglu_rows(&x, &w[0], &w[1], &mut o1, &mut o2);
        } else {
            b.matmul_rows(&x, &mut [(&w[0], &mut o1)]);
        }
    })?;
    Ok(bytes as f64 / seconds)
}

/// Seconds per launch of what `launch` issues (given the launch's index): the median of 11 timings of `launches`
/// back to back, after a warm-up round; then the backend's error check.
fn time_launches(
    b: &CudaBackend,
    launches: usize,
    what: &str,
    mut launch: impl FnMut(usize),
) -> Result<f64> {
    let dev = |e: cudarc::driver::DriverError| EngineError::Device(format!("timing {what}: {e}"));
    let mut times = Vec::new();
    for i in 0..12 {
        b.stream.synchronize().map_err(dev)?;
        let t = Instant::now();
        for l in 0..launches {
            launch(l);
        }
        b.stream.synchronize().map_err(dev)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() / launches as f64);
        }
    }
    b.check()?;
    Ok(median(times))
}

/// Tokens per cache block in the decode attention timing (the engine's default block size).
const ATTENTION_BLOCK: usize = 16;

/// The cache one decode attention timing reads: `batch` sequences of `context` tokens, `kv_heads` KV heads of
/// `head_dim` dims with `group` query heads each, one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub context: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Bytes of cache one launch reads in `format` (K and V of every token, with their scales or parameters).
    pub fn cache_bytes(&self, format: KvFormat) -> usize {
        let blocks = self.batch * self.context.div_ceil(ATTENTION_BLOCK);
        blocks * self.kv_heads * format.block_head_bytes(self.head_dim, ATTENTION_BLOCK)
    }
}

/// Seconds one decode attention launch takes alone over a cache in `format` of the given shape: the median of 11
/// timings of 8 back-to-back launches, after a warm-up. Keys and values go in through the store kernel, as in
/// serving (so each format holds its own codes), seeded uniform in [-1, 1); each sequence's blocks lie
/// together. Timed for several formats in one run, it gives what a quantized cache saves in attention time without
/// the per-operation profile's synchronizations.
pub fn decode_attention_time(
    b: &CudaBackend,
    format: KvFormat,
    shape: AttentionShape,
) -> Result<f64> {
    let bs = ATTENTION_BLOCK;
    let per_seq = shape.context.div_ceil(bs);
    let layout = KvLayout {
        layers: 1,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        block_size: bs,
        num_blocks: shape.batch * per_seq,
        format,
    };
    let rope = RopeConfig {
        theta: 500_000.0,
        layout: RopeLayout::Halves,
        freq_factors: None,
    };
    let rotation = crate::kv::codec::KeyRotation::new(&rope, shape.head_dim, bs);
    let mut kv = b.alloc_kv(&layout, &rotation)?;
    let tables: Vec<Vec<u32>> = (0..shape.batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut rng = crate::rng::Rng::new(7);
    // Stored a few sequences at a time (about 16k tokens), as prefill chunks would.
    let width = shape.kv_heads * shape.head_dim;
    let chunk = (16_384 / shape.context).max(1);
    for first in (0..shape.batch).step_by(chunk) {
        let seqs = first..(first + chunk).min(shape.batch);
        let contexts = vec![shape.context; seqs.len()];
        let store = super::attention_check::layout_of(&contexts, &tables[seqs], bs, usize::MAX);
        let n = store.tokens.len();
        let k = b.tensor(n, width, &random(&mut rng, n * width, 1.0));
        let v = b.tensor(n, width, &random(&mut rng, n * width, 1.0));
        let plan = b.plan(&store, &rope, shape.head_dim, Some(&mut kv));
        b.store_kv(&mut kv, 0, &k, &v, &plan);
    }
    let contexts = vec![shape.context; shape.batch];
    let query = super::attention_check::layout_of(&contexts, &tables, bs, 1);
    let heads = shape.kv_heads * shape.group;
    let q = b.tensor(
        shape.batch,
        heads * shape.head_dim,
        &random(&mut rng, shape.batch * heads * shape.head_dim, 1.0),
    );
    let plan = b.plan(&query, &rope, shape.head_dim, Some(&mut kv));
    let mut out = b.activations(0, 0);
    time_launches(b, 8, "decode attention", |_| {
        b.attention(&q, &kv, 0, &plan, &mut out, &mut [])
    })
}

/// Bytes per second of a copy of `bytes` from GPU `from` to GPU `to` (median of 10 after a warm-up; peer access
/// enabled first where the two allow it, so the copy takes NVLink or PCIe peer-to-peer rather than the host): the
/// ceiling a GPU-to-GPU KV transfer is judged against.
pub fn peer_copy_rate(from: usize, to: usize, bytes: usize) -> Result<f64> {
    use cudarc::driver::{CudaContext, sys};
    if from == to {
        return Err(EngineError::invalid(format!(
            "a peer copy needs two GPUs; got GPU {from} twice"
        )));
    }
    let dev = |e: cudarc::driver::DriverError| EngineError::Device(format!("peer copy: {e}"));
    let (src_ctx, dst_ctx) = (
        CudaContext::new(from).map_err(dev)?,
        CudaContext::new(to).map_err(dev)?,
    );
    dst_ctx.bind_to_thread().map_err(dev)?;
    // SAFETY: both contexts are alive; the call only changes how `dst_ctx` reaches `src_ctx`'s memory.
    let enabled = unsafe { sys::cuCtxEnablePeerAccess(src_ctx.cu_ctx(), 0) };
    if !matches!(
        enabled,
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
    ) {
        tracing::warn!(
            ?enabled,
            from,
            to,
            "peer access not enabled; the peer copy may go through the host"
        );
    }
    let (s_src, s_dst) = (src_ctx.default_stream(), dst_ctx.new_stream().map_err(dev)?);
    let host: Vec<u8> = (0..bytes).map(|i| (i * 31 + i / 4093) as u8).collect();
    let src = s_src.clone_htod(&host).map_err(dev)?;
    s_src.synchronize().map_err(dev)?;
    let mut dst = s_dst.alloc_zeros::<u8>(bytes).map_err(dev)?;
    let secs = median_time(&s_dst, || s_dst.memcpy_dtod(&src, &mut dst)).map_err(dev)?;
    let back = s_dst.clone_dtoh(&dst).map_err(dev)?;
    if back != host {
        return Err(EngineError::Device(format!(
            "the peer copy from GPU {from} to GPU {to} did not arrive intact"
        )));
    }
    Ok(bytes as f64 / secs)
}
