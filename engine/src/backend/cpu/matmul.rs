//! `out = x @ W^T` with W in its stored format, the bulk of every forward step.
//!
//! Two paths:
//! - the integer path: activations are quantized to 16-bit blocks once and each weight row is read once from
//!   memory and dotted, in integer SIMD, with every activation row (in passes of up to sixteen rows, the weights
//!   staying in L1 between passes). Bound by weight bytes at batch 1, by multiply-adds on batches and prefill.
//! - dequantize + SGEMM: tiles of W are expanded to f32 in a per-thread scratch buffer and multiplied with
//!   `matrixmultiply`'s packed SGEMM, the expansion amortized over every row of the chunk.
//!
//! With the tiled kernels (AVX2 and up) the integer path serves every number of rows, prefill chunks included: at
//! 512 rows it computes about 1.7x the f32 SGEMM's rate on the same cores (decision 0001, addendum). Without them
//! (per-row AVX2 kernels, portable code) it serves up to [`crate::quant::dot::SMALL_BATCH_ROWS`] rows and SGEMM the
//! rest.
//!
//! Work is split over output columns (weight rows) across the backend's [`SpinPool`]; tasks write disjoint column ranges of the
//! output.

use super::pool::{Disjoint, SpinPool};
use super::{CpuMatrix, CpuTensor};
use crate::quant::actq::{ActBlock, quantize_activations};
use crate::quant::dequant::dequantize_row;
use crate::quant::dot::{DotKernels, OutRows, dot_rows, has_kernel, task_rows};
use std::cell::RefCell;

/// Weight rows per SGEMM tile: 64 rows x 1536 cols of f32 is 384 KiB, about an L2.
const GEMM_TILE_ROWS: usize = 64;

/// Activation rows from which quantizing them is spread over the pool (below it, one thread does it faster than
/// the region costs).
const PARALLEL_QUANT_ROWS: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static ACTS: RefCell<Vec<ActBlock>> = const { RefCell::new(Vec::new()) };
}

pub fn matmul(
    pool: &SpinPool,
    x: &CpuTensor,
    pairs: &mut [(&CpuMatrix, &mut CpuTensor)],
    kernels: DotKernels,
) {
    let m = x.rows;
    for (w, out) in pairs.iter_mut() {
        assert_eq!(
            w.cols, x.cols,
            "matmul: x has {} cols, weight {}",
            x.cols, w.cols
        );
        out.resize(m, w.rows);
    }
    if m == 0 {
        return;
    }
    let int_path = m <= kernels.int_path_max_rows() && pairs.iter().all(|(w, _)| has_kernel(w.ty));
    // One task list over all pairs, so that q/k/v (or gate/up) share one parallel region.
    let threads = pool.threads();
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (pi, (w, _)) in pairs.iter().enumerate() {
        let chunk = if int_path {
            // Enough tasks to balance, big enough to amortize scheduling (a row is ~0.5 KiB of weights); whole
            // interleaved groups. A task's time grows with the activation rows, and the region waits for its last
            // task: batches get finer tasks. Decode batches of 8-32 rows take two tasks a thread: each thread then
            // streams long runs of weights that its own prefetches (40 blocks ahead) serve, where 16-row tasks
            // left most of a thread's prefetched lines to the task the other thread claimed next (batch 16 about
            // 5% faster, bench/RESULTS.md 2026-12-06).
            let per_thread = if (8..=32).contains(&m) {
                2
            } else {
                4 * m.min(4)
            };
            let granule = task_rows(kernels, m);
            (w.rows / (threads * per_thread)).clamp(granule, 512) / granule * granule
        } else {
            GEMM_TILE_ROWS
        };
        let mut r0 = 0;
        while r0 < w.rows {
            let r1 = (r0 + chunk).min(w.rows);
            tasks.push((pi, r0, r1));
            r0 = r1;
        }
    }
    let outs: Vec<(Disjoint<f32>, usize)> = pairs
        .iter_mut()
        .map(|(w, o)| (Disjoint::new(&mut o.data), w.rows))
        .collect();
    let weights: Vec<&CpuMatrix> = pairs.iter().map(|(w, _)| *w).collect();
    let run = |xq: Option<&[&[ActBlock]]>| {
        pool.run(tasks.len(), &|t| {
            let (pi, r0, r1) = tasks[t];
            let w = weights[pi];
            let (out, n) = outs[pi];
            match xq {
                Some(xrows) => int_rows(w, xrows, r0, r1, out, n, kernels),
                None => gemm_rows(w, x, r0, r1, out, n),
            }
        })
    };
    if !int_path {
        return run(None);
    }
    // The activations are quantized once, into a buffer this (calling) thread keeps across steps.
    ACTS.with(|q| {
        let mut q = q.borrow_mut();
        let bpr = x.cols / 32;
        if q.len() < m * bpr {
            q.resize(m * bpr, ActBlock::default());
        }
        if m < PARALLEL_QUANT_ROWS {
            for r in 0..m {
                quantize_activations(x.row(r), &mut q[r * bpr..(r + 1) * bpr]);
            }
        } else {
            // One row per task: a batch's rows cost as much as a small matmul, and the other threads would wait.
            let dst = Disjoint::new(&mut q[..]);
            pool.run(m, &|r| {
                // SAFETY: row r's blocks lie within `q` (resized above) and only this task writes them; `q`
                // outlives the region.
                let row = unsafe { dst.slice(r * bpr, bpr) };
                quantize_activations(x.row(r), row);
            });
        }
        let rows: Vec<&[ActBlock]> = q[..m * bpr].chunks_exact(bpr).collect();
        run(Some(&rows));
    });
}

/// Dots weight rows `r0..r1` with every activation row, straight into those columns of the `xrows.len() x n` output.
fn int_rows(
    w: &CpuMatrix,
    xrows: &[&[ActBlock]],
    r0: usize,
    r1: usize,
    out: Disjoint<f32>,
    n: usize,
    kernels: DotKernels,
) {
    // SAFETY: the output is m x n row-major and outlives the parallel region; columns r0..r1 of every row belong
    // to this task only.
    let cols = unsafe { OutRows::strided(out.at(r0), n, xrows.len(), r1 - r0) };
    dot_rows(
        w.ty,
        w.layout,
        w.bytes(),
        w.row_bytes(),
        r0..r1,
        xrows,
        cols,
        kernels,
    );
}

fn gemm_rows(w: &CpuMatrix, x: &CpuTensor, r0: usize, r1: usize, out: Disjoint<f32>, n: usize) {
    let k = w.cols;
    let tile = r1 - r0;
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        s.resize(tile * k, 0.0);
        BYTES.with(|b| {
            let mut b = b.borrow_mut();
            let rows = w.rows_in_file_layout(r0..r1, &mut b);
            let rb = w.row_bytes();
            for (i, row) in rows.chunks_exact(rb).enumerate() {
                dequantize_row(w.ty, row, &mut s[i * k..(i + 1) * k]);
            }
        });
        // SAFETY: x is m x k row-major; the tile is `tile` x k row-major, read as its transpose (k x tile) through
        // strides; the output block is columns r0..r1 of every row of the m x n output, owned by this task.
        unsafe {
            matrixmultiply::sgemm(
                x.rows,
                k,
                tile,
                1.0,
                x.data.as_ptr(),
                k as isize,
                1,
                s.as_ptr(),
                1,
                k as isize,
                0.0,
                out.at(r0),
                n as isize,
                1,
            );
        }
    });
}
