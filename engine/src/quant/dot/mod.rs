//! Dot products of quantized weight rows with quantized activation rows, the inner loop of decode.
//!
//! `dot_rows` computes weight rows against several activation rows at once so the unpacked weights are reused from
//! registers or L1; with a batch of sequences this turns a memory-bound matvec into one read of each weight byte
//! per step. Two AVX2 kernels, monomorphized per type and row count so accumulators stay in registers: [`tiles`]
//! eight weight rows at a time from the interleaved layout made at load (the default, every batch size), and
//! [`avx2`] one weight row at a time from the file layout (rows past the last whole group, and the baseline the
//! tiles are measured against); with AVX-512, [`wide`] dots batches with two groups (sixteen rows) per 512-bit
//! register, bit for bit as the tiles do. [`DotKernels`] is chosen at run time, and a portable scalar path computes
//! the same integer sums from either layout.
//! Types without a kernel here (K-quants, floats) return `false` from [`has_kernel`] and are served by dequantizing
//! rows (`backend::cpu::matmul`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod tiles;
#[cfg(target_arch = "x86_64")]
mod wide;

use super::GgmlType;
use super::actq::ActBlock;
use super::interleave::{self, GROUP_ROWS, Layout};
use half::f16;
use std::sync::OnceLock;

/// Whether `ty` has an integer dot kernel against [`ActBlock`] activations.
pub fn has_kernel(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Whether the AVX2 kernels can run on this CPU.
#[inline]
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which integer dot kernels run. A value other than `Portable` is only ever made by [`DotKernels::detect`] or
/// [`DotKernels::available`], after checking that the CPU has the instructions it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DotKernels {
    Portable,
    /// AVX2 kernels one weight row at a time over the file layout (the baseline the tiles are measured against).
    Avx2Rows,
    /// AVX2 tiles of eight weight rows over the interleaved layout, for every batch size.
    Avx2Tiles,
    /// As `Avx2Tiles`, the tiles multiply-accumulating with AVX-512 VNNI's `vpdpwssd` (256-bit form).
    VnniTiles,
    /// As `VnniTiles`, batches of eight activation rows or more (`wide::WIDE_FROM`) dotted with two groups at once
    /// in 512-bit registers ([`wide`]).
    Avx512Wide,
}

/// Above this many activation rows, dequantize + SGEMM beats the per-row and portable kernels. Measured on the
/// 2-vCPU development VM with SmolLM2 Q4_1 and the per-row AVX2 kernel: at 8 and 16 rows the integer path decoded
/// 176 and 196 tok/s, SGEMM 112 and 160.
pub const SMALL_BATCH_ROWS: usize = 16;

impl DotKernels {
    /// The most activation rows for which these kernels beat dequantizing the weights and multiplying in f32: the
    /// tiled kernels at every size measured (prefill of 512 rows: 1.3-1.7x SGEMM's tokens/s on the same cores),
    /// the per-row and portable ones up to [`SMALL_BATCH_ROWS`].
    pub fn int_path_max_rows(self) -> usize {
        if self >= Self::Avx2Tiles {
            usize::MAX
        } else {
            SMALL_BATCH_ROWS
        }
    }
    /// The best kernels this CPU runs, capped by `TANDEM_CPU_KERNELS` (`portable`, `avx2-rows`, `avx2-tiles`,
    /// `vnni-tiles` or `avx512-wide`) when set, so that a benchmark can measure older kernels as its baseline on the
    /// same machine.
    pub fn detect() -> Self {
        static KERNELS: OnceLock<DotKernels> = OnceLock::new();
        *KERNELS.get_or_init(|| {
            let available = Self::available();
            let best = available.iter().copied().max().unwrap_or(Self::Portable);
            let cap = std::env::var("TANDEM_CPU_KERNELS")
                .ok()
                .and_then(|v| available.into_iter().find(|k| k.name() == v));
            cap.map_or(best, |c| c.min(best))
        })
    }

    /// Every choice this CPU runs, portable first (tests compare them all).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        if avx2_available() {
            v.extend([Self::Avx2Rows, Self::Avx2Tiles]);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                v.push(Self::VnniTiles);
                if std::is_x86_feature_detected!("avx512bw") {
                    v.push(Self::Avx512Wide);
                }
            }
        }
        v
    }

    /// The weight layout these kernels read: matrices of a type with an interleaved layout are stored in it at load
    /// when the tiles will read them.
    pub fn layout(self) -> Layout {
        if self >= Self::Avx2Tiles {
            Layout::Interleaved
        } else {
            Layout::File
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2Rows => "avx2-rows",
            Self::Avx2Tiles => "avx2-tiles",
            Self::VnniTiles => "vnni-tiles",
            Self::Avx512Wide => "avx512-wide",
        }
    }
}

/// The multiple of weight rows a task of [`dot_rows`] over `n` activation rows should take, so that no task leaves
/// the kernels a part they run more slowly (the wide kernel dots two groups at a time and leaves an odd one to the
/// tiles).
pub fn task_rows(kernels: DotKernels, n: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if kernels == DotKernels::Avx512Wide && n >= wide::WIDE_FROM {
        return 2 * GROUP_ROWS;
    }
    let _ = (kernels, n);
    GROUP_ROWS
}

/// Where [`dot_rows`] writes: the result for activation row `j` and weight row `rows.start + k` goes to
/// `j * stride + k` from the start, so that each activation row's outputs are contiguous (the tiles store eight of
/// them with one instruction). Either a whole `rows x cols` slice ([`OutRows::new`]) or, for a matmul task that owns
/// a range of columns of a wider output, those columns in place ([`OutRows::strided`]), so no result is copied.
pub struct OutRows<'a> {
    ptr: *mut f32,
    stride: usize,
    rows: usize,
    cols: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> OutRows<'a> {
    /// All of `out`, as rows of `cols` outputs.
    pub fn new(out: &'a mut [f32], cols: usize) -> Self {
        assert!(
            cols > 0 && out.len().is_multiple_of(cols),
            "OutRows: {} outputs are not rows of {cols}",
            out.len()
        );
        Self {
            ptr: out.as_mut_ptr(),
            stride: cols,
            rows: out.len() / cols,
            cols,
            _out: std::marker::PhantomData,
        }
    }

    /// `rows` rows of `cols` outputs, row `j` starting at `ptr + j * stride`.
    ///
    /// # Safety
    /// For every `j < rows` and `k < cols`, `ptr + j * stride + k` is valid for writes for `'a`, and nothing else
    /// reads or writes those elements while this value lives.
    pub unsafe fn strided(ptr: *mut f32, stride: usize, rows: usize, cols: usize) -> Self {
        assert!(cols <= stride || rows <= 1, "OutRows: rows overlap");
        Self {
            ptr,
            stride,
            rows,
            cols,
            _out: std::marker::PhantomData,
        }
    }

    /// The same outputs, for a shorter borrow.
    fn reborrow(&mut self) -> OutRows<'_> {
        OutRows {
            _out: std::marker::PhantomData,
            ..*self
        }
    }

    /// The columns from `k` on.
    fn skip(self, k: usize) -> Self {
        assert!(k <= self.cols, "OutRows: skipping past the last column");
        Self {
            // SAFETY: k <= cols, so the pointer stays within (or one past) row 0's columns.
            ptr: unsafe { self.ptr.add(k) },
            cols: self.cols - k,
            ..self
        }
    }

    /// The `len` outputs of activation row `j` from weight row `rows.start + k` on.
    #[inline]
    fn cols(&mut self, j: usize, k: usize, len: usize) -> &mut [f32] {
        assert!(
            j < self.rows && k + len <= self.cols,
            "OutRows: ({j}, {k}..{}) outside {} x {}",
            k + len,
            self.rows,
            self.cols
        );
        // SAFETY: in bounds (checked above), and these elements are ours alone (the constructors' contracts).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(j * self.stride + k), len) }
    }
}

/// Dot products of weight rows `rows` (each `row_bytes` long in `w`, ordered as `layout` says) with every activation
/// row in `xs`: output `(i, r - rows.start)` of `out` is `dot(w_row(r), xs[i])` (one output row per activation
/// row). `ty` must satisfy [`has_kernel`]; with the interleaved layout, `rows` must start and (unless it runs past the last whole group) end on a group
/// boundary.
///
/// The row loop lives inside the SIMD function so that the kernel is inlined and dispatch happens once per call.
#[allow(clippy::too_many_arguments)] // a leaf kernel; bundling these would only add indirection
pub fn dot_rows(
    ty: GgmlType,
    layout: Layout,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    xs: &[&[ActBlock]],
    mut out: OutRows<'_>,
    kernels: DotKernels,
) {
    assert!(
        out.rows == xs.len() && out.cols == rows.len(),
        "dot_rows: output of {} x {} for {} x {}",
        out.rows,
        out.cols,
        xs.len(),
        rows.len()
    );
    assert!(
        rows.end * row_bytes <= w.len(),
        "dot_rows: rows out of range"
    );
    let blocks = row_bytes / ty.block_bytes();
    assert!(
        xs.iter().all(|x| x.len() >= blocks),
        "dot_rows: activation rows too short"
    );
    // Rows rows.start..split are in interleaved groups, the rest in the file layout.
    let split = match layout {
        Layout::File => rows.start,
        Layout::Interleaved => {
            let grouped = interleave::grouped_rows(w.len() / row_bytes);
            let split = rows.end.min(grouped).max(rows.start);
            assert!(
                rows.start.is_multiple_of(GROUP_ROWS) || rows.start >= grouped,
                "dot_rows: rows start inside an interleaved group"
            );
            assert!(
                split.is_multiple_of(GROUP_ROWS) || split == rows.start,
                "dot_rows: rows end inside an interleaved group"
            );
            split
        }
    };
    #[cfg(target_arch = "x86_64")]
    if kernels >= DotKernels::Avx2Rows && (split == rows.start || kernels >= DotKernels::Avx2Tiles)
    {
        // SAFETY: a DotKernels other than Portable is only made after checking that the CPU has what it needs;
        // sizes were checked above; rows.start..split are whole interleaved groups.
        unsafe {
            if split > rows.start {
                let head = out.reborrow();
                if kernels == DotKernels::Avx512Wide {
                    wide::dot_rows(ty, w, row_bytes, rows.start..split, xs, head);
                } else if kernels == DotKernels::VnniTiles {
                    tiles::vnni::dot_rows(ty, w, row_bytes, rows.start..split, xs, head);
                } else {
                    tiles::avx2::dot_rows(ty, w, row_bytes, rows.start..split, xs, head);
                }
            }
            let tail = out.skip(split - rows.start);
            avx2::dot_rows(ty, w, row_bytes, split..rows.end, xs, tail);
        }
        return;
    }
    let _ = kernels;
    let mut row = vec![0u8; row_bytes];
    for (i, r) in rows.enumerate() {
        let w_row = if r < split {
            interleave::read_row(ty, w, row_bytes, r, &mut row);
            &row[..]
        } else {
            &w[r * row_bytes..(r + 1) * row_bytes]
        };
        for (j, x) in xs.iter().enumerate() {
            out.cols(j, i, 1)[0] = dot_scalar(ty, w_row, x);
        }
    }
}

/// Portable reference kernel.
pub fn dot_scalar(ty: GgmlType, w_row: &[u8], x: &[ActBlock]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for (b, xb) in w_row.chunks_exact(bb).zip(x) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        match ty {
            GgmlType::Q4_1 => {
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                let s = nibble_dot(&b[4..20], xb);
                acc += d * xb.d * s as f32 + m * xb.d * xb.qsum as f32;
            }
            GgmlType::Q4_0 => {
                let s = nibble_dot(&b[2..18], xb);
                acc += d * xb.d * (s - 8 * xb.qsum as i64) as f32;
            }
            GgmlType::Q8_0 => {
                let mut s = 0i64;
                for j in 0..32 {
                    s += b[2 + j] as i8 as i64 * xb.qs[j] as i64;
                }
                acc += d * xb.d * s as f32;
            }
            other => unreachable!("dot_scalar called for {other} without a kernel"),
        }
    }
    acc
}

/// Integer dot of 16 bytes of nibbles (low nibbles are elements 0..16, high ones 16..32) with a block.
fn nibble_dot(qs: &[u8], x: &ActBlock) -> i64 {
    let (lo, hi) = x.qs.split_at(16);
    qs.iter()
        .zip(lo.iter().zip(hi))
        .map(|(&q, (&a, &b))| (q & 0x0f) as i64 * a as i64 + (q >> 4) as i64 * b as i64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::actq::quantize_activations;
    use crate::quant::dequant::dequantize_row;

    fn random_blocks(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = vec![0u8; blocks * ty.block_bytes()];
        for b in out.chunks_exact_mut(ty.block_bytes()) {
            for v in b.iter_mut() {
                *v = next() as u8;
            }
            let d = f16::from_f32(0.01 + (next() % 100) as f32 * 0.001).to_le_bytes();
            b[0..2].copy_from_slice(&d);
            if ty == GgmlType::Q4_1 {
                let m = f16::from_f32(-0.05 + (next() % 100) as f32 * 0.001).to_le_bytes();
                b[2..4].copy_from_slice(&m);
            }
        }
        out
    }

    fn quantized(xs: &[Vec<f32>]) -> Vec<Vec<ActBlock>> {
        xs.iter()
            .map(|x| {
                let mut q = vec![ActBlock::default(); x.len() / 32];
                quantize_activations(x, &mut q);
                q
            })
            .collect()
    }

    #[test]
    fn kernels_match_dequantized_f32_dot() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            // 19 weight rows: two tiles of eight (paired from four activation rows on) and three rows by the
            // per-row kernel; 27: a third tile, which the paired kernel takes alone.
            for wrows in [19, 27] {
                let k = 256;
                let w = random_blocks(ty, wrows * k / 32, 7 + ty as u64);
                let row_bytes = w.len() / wrows;
                let wf: Vec<Vec<f32>> = w
                    .chunks_exact(row_bytes)
                    .map(|row| {
                        let mut f = vec![0f32; k];
                        dequantize_row(ty, row, &mut f);
                        f
                    })
                    .collect();
                // Up to 19 activation rows: more than one pass of the tiles, groups of four and remainders.
                let xs: Vec<Vec<f32>> = (0..19)
                    .map(|r| {
                        (0..k)
                            .map(|i| ((i * 7 + r * 3) % 23) as f32 * 0.1 - 1.1)
                            .collect()
                    })
                    .collect();
                let xq = quantized(&xs);
                let refs: Vec<&[ActBlock]> = xq.iter().map(|v| v.as_slice()).collect();
                let packed = interleave::interleave(ty, &w, row_bytes);
                for n in 1..=xs.len() {
                    for (kernels, layout) in DotKernels::available()
                        .into_iter()
                        .flat_map(|k| [(k, Layout::File), (k, Layout::Interleaved)])
                    {
                        let bytes = if layout == Layout::File { &w } else { &packed };
                        let mut out = vec![0f32; wrows * n];
                        dot_rows(
                            ty,
                            layout,
                            bytes,
                            row_bytes,
                            0..wrows,
                            &refs[..n],
                            OutRows::new(&mut out, wrows),
                            kernels,
                        );
                        // Batch invariance, bit for bit: a row's outputs in a batch of n (the paired kernel from four
                        // rows on) equal its outputs alone (the one-group kernel), so batched decode gives the tokens
                        // of one sequence at a time.
                        for r in 0..n {
                            let mut alone = vec![0f32; wrows];
                            let one = &refs[r..r + 1];
                            dot_rows(
                                ty,
                                layout,
                                bytes,
                                row_bytes,
                                0..wrows,
                                one,
                                OutRows::new(&mut alone, wrows),
                                kernels,
                            );
                            let batched = &out[r * wrows..(r + 1) * wrows];
                            assert!(
                                alone
                                    .iter()
                                    .zip(batched)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{ty} n={n} {kernels:?} {layout:?} row {r}: batched differs from alone"
                            );
                        }
                        for (i, (wq, wf)) in w.chunks_exact(row_bytes).zip(&wf).enumerate() {
                            for r in 0..n {
                                let got = out[r * wrows + i];
                                let exact: f32 = wf.iter().zip(&xs[r]).map(|(a, b)| a * b).sum();
                                let scalar = dot_scalar(ty, wq, &xq[r]);
                                assert!(
                                    (got - scalar).abs() <= 1e-4 * (1.0 + scalar.abs()),
                                    "{ty} n={n} {kernels:?} {layout:?} weight row {i}, row {r}: {got} vs {scalar}"
                                );
                                // 16-bit activations: the error is tiny against the f32 dot.
                                assert!(
                                    (got - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
                                    "{ty} weight row {i}, row {r}: {got} vs {exact}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Kernel timing, one thread, per-row kernels on the file layout against the tiles on the interleaved one,
    /// alternating in one process: `cargo test --release -p tandem-engine kernel_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn kernel_timing() {
        let best = DotKernels::detect();
        if best < DotKernels::Avx2Tiles {
            eprintln!("no tiled kernels on this CPU");
            return;
        }
        // SmolLM2-135M's shapes in cache (the FFN's up and down, a K/V projection), then a Q4_1 matrix larger than
        // the last-level cache and the output head, both read from memory as the model's weights are in a step.
        for (ty, wrows, k) in [
            (GgmlType::Q4_1, 1536, 576),
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q4_1, 192, 576),
            (GgmlType::Q4_1, 276480, 576),
            (GgmlType::Q8_0, 49152, 576),
        ] {
            let w = random_blocks(ty, wrows * k / 32, 3);
            let row_bytes = w.len() / wrows;
            let packed = interleave::interleave(ty, &w, row_bytes);
            for n in [1, 2, 4, 8, 16] {
                let xs: Vec<Vec<f32>> = (0..n)
                    .map(|r| {
                        (0..k)
                            .map(|i| ((i * 7 + r * 3) % 23) as f32 - 11.0)
                            .collect()
                    })
                    .collect();
                let xq = quantized(&xs);
                let refs: Vec<&[ActBlock]> = xq.iter().map(|v| v.as_slice()).collect();
                let mut out = vec![0f32; wrows * n];
                let mut time = |layout: Layout, bytes: &[u8], kernels: DotKernels| {
                    let reps = (4_000_000 / (wrows * n)).max(2);
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        dot_rows(
                            ty,
                            layout,
                            bytes,
                            row_bytes,
                            0..wrows,
                            &refs,
                            OutRows::new(&mut out, wrows),
                            kernels,
                        );
                    }
                    t.elapsed().as_secs_f64() * 1e9 / (reps * wrows * n * k / 32) as f64
                };
                let (mut rows, mut tiles, mut vnni) = (f64::MAX, f64::MAX, f64::MAX);
                for _ in 0..5 {
                    rows = rows.min(time(Layout::File, &w, DotKernels::Avx2Rows));
                    tiles = tiles.min(time(Layout::Interleaved, &packed, best));
                    if best > DotKernels::VnniTiles {
                        vnni = vnni.min(time(Layout::Interleaved, &packed, DotKernels::VnniTiles));
                    }
                }
                eprintln!(
                    "{ty} {wrows}x{k}, {n:2} rows: per-row {rows:.3} ns, vnni-tiles {vnni:.3} ns, {} {tiles:.3} ns per block and row ({:.2}x per-row)",
                    best.name(),
                    rows / tiles
                );
            }
        }
    }
}
