//! Causal grouped-query attention over the paged KV store.
//!
//! Each query row of a sequence at position `p` attends to positions `0..=p` of that sequence, read through its
//! block table (vLLM's PagedAttention). Work is split into tasks of (sequence, KV head, tile of up to
//! [`ROWS_PER_TASK`] query rows). A prefill tile gathers its KV head's keys and values once into contiguous f32
//! scratch (dequantizing as it copies), then for each query head of the group computes scores = Q K^T as one SGEMM,
//! applies the causal mask and a max-subtracted softmax, and writes P V with a second SGEMM: prefill runs at matrix
//! speed. Tiles of at most [`VECTOR_MAX_ROWS`] rows (decode) skip the SGEMMs and read each block where it lies
//! ([`runs`]: f32, f16, int8, fp8 and int4 stores in place; kivi2 through a gathered copy), the query heads of the KV
//! group sharing each pass over a block's keys and then its values, so a decode row costs one pass over its context
//! (decision 0017). Where the key store holds turned keys (int4, [`crate::kv::KvFormat::turns_keys`]) each query is
//! turned the same way first, into scratch.

use super::pool::{Disjoint, SpinPool};
use super::simd;
use super::{CpuKvStore, CpuPlan, CpuTensor, KvBuf};
use crate::backend::AttentionTally;
use crate::kv::codec::spread;
use runs::Runs;
use std::cell::RefCell;
use std::sync::Mutex;

const ROWS_PER_TASK: usize = 64;

/// Tiles this small are computed with vector loops instead of SGEMM.
const VECTOR_MAX_ROWS: usize = 2;

#[derive(Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    /// The task's query rows of one head, turned (only over a turned key store).
    q: Vec<f32>,
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

pub fn attention(
    pool: &SpinPool,
    q: &CpuTensor,
    kv: &CpuKvStore,
    layer: usize,
    plan: &CpuPlan,
    out: &mut CpuTensor,
    tallies: &mut [AttentionTally<'_>],
) {
    let lay = &kv.layout;
    let hd = lay.head_dim;
    let heads = q.cols / hd;
    let group = heads / lay.kv_heads;
    out.resize(q.rows, heads * hd);
    let mut tasks = Vec::new();
    for (si, s) in plan.layout.seqs.iter().enumerate() {
        for kvh in 0..lay.kv_heads {
            for r0 in (0..s.n_rows).step_by(ROWS_PER_TASK) {
                tasks.push((si, kvh, r0, (r0 + ROWS_PER_TASK).min(s.n_rows)));
            }
        }
    }
    // Tallied rows sum their probabilities into a buffer of their task's own, reduced after the parallel region.
    let tallied_from = |si: usize| tallies.iter().find(|t| t.seq == si).map(|t| t.from_pos);
    // (No tallies, the usual case: no buffers at all.)
    let partials: Vec<Mutex<Vec<f32>>> = if tallies.is_empty() {
        &[][..]
    } else {
        &tasks[..]
    }
    .iter()
    .map(|&(si, _, _, r1)| {
        let s = &plan.layout.seqs[si];
        let wanted = tallied_from(si).is_some_and(|from| s.start_pos + r1 > from);
        Mutex::new(vec![0.0; if wanted { s.start_pos + r1 } else { 0 }])
    })
    .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let optr = Disjoint::new(&mut out.data);
    let (kbuf, vbuf) = (&kv.k[layer], &kv.v[layer]);
    pool.run(tasks.len(), &|t| {
        let (si, kvh, r0, r1) = tasks[t];
        let s = &plan.layout.seqs[si];
        let ctx = s.start_pos + r1;
        let rows = r1 - r0;
        let mut partial = partials
            .get(t)
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()));
        let tally_from = match &partial {
            Some(p) if !p.is_empty() => tallied_from(si).unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        let mut tally = |pos: usize, probs: &[f32]| {
            if pos >= tally_from
                && let Some(partial) = partial.as_deref_mut()
            {
                for (acc, &p) in partial.iter_mut().zip(probs) {
                    *acc += p;
                }
            }
        };
        SCRATCH.with(|cell| {
            let sc = &mut *cell.borrow_mut();
            let turn = kbuf.turned();
            if rows <= VECTOR_MAX_ROWS {
                // Decode rows: keys and values in place where the store holds plain elements, else a copy.
                let runs = Runs::in_place(
                    kbuf.elements(),
                    vbuf.elements(),
                    lay,
                    &s.block_table,
                    kvh,
                    ctx,
                )
                .unwrap_or_else(|| {
                    gather(kbuf, lay, &s.block_table, kvh, ctx, &mut sc.k);
                    gather(vbuf, lay, &s.block_table, kvh, ctx, &mut sc.v);
                    Runs::F32(vec![(&sc.k[..ctx * hd], &sc.v[..ctx * hd])])
                });
                runs.prefetch_start();
                let (h0, hs) = (kvh * group * hd, (kvh + 1) * group * hd);
                for r in 0..rows {
                    let row = s.first_row + r0 + r;
                    let visible = s.start_pos + r0 + r + 1;
                    // The group's queries, one after another as the row holds them.
                    let mut qg = &q.row(row)[h0..hs];
                    if turn {
                        sc.q.clear();
                        sc.q.extend_from_slice(qg);
                        spread::turn_all(&mut sc.q, hd);
                        qg = &sc.q;
                    }
                    sc.scores.resize(group * visible, 0.0);
                    let scores = &mut sc.scores[..group * visible];
                    // The first row reads the keys and values from memory: it asks ahead.
                    runs.scores(qg, hd, scale, scores, r == 0);
                    for p in scores.chunks_exact_mut(visible) {
                        simd::softmax(p);
                        tally(visible - 1, p);
                    }
                    // SAFETY: this task alone writes the group's heads of this row; the slice lies inside `out`.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(optr.at(row * heads * hd + h0), hs - h0)
                    };
                    o.fill(0.0);
                    runs.weighted_sum(scores, hd, o);
                }
                return;
            }
            gather(kbuf, lay, &s.block_table, kvh, ctx, &mut sc.k);
            gather(vbuf, lay, &s.block_table, kvh, ctx, &mut sc.v);
            sc.scores.resize(rows * ctx, 0.0);
            let Scratch {
                k: gk,
                v: gv,
                q: turned_q,
                scores: all_scores,
            } = sc;
            for h in kvh * group..(kvh + 1) * group {
                let (mut qp, mut q_stride) = (
                    q.data[(s.first_row + r0) * q.cols + h * hd..].as_ptr(),
                    q.cols,
                );
                if turn {
                    turned_q.clear();
                    for r in s.first_row + r0..s.first_row + r1 {
                        turned_q.extend_from_slice(&q.row(r)[h * hd..(h + 1) * hd]);
                    }
                    spread::turn_all(turned_q, hd);
                    (qp, q_stride) = (turned_q.as_ptr(), hd);
                }
                // SAFETY: Q rows r0..r1 of head h are `rows` x hd with row stride `q_stride`, inside q (or the
                // turned copy); K is ctx x hd contiguous, read transposed; scores is rows x ctx contiguous and
                // exclusively ours.
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        hd,
                        ctx,
                        scale,
                        qp,
                        q_stride as isize,
                        1,
                        gk.as_ptr(),
                        1,
                        hd as isize,
                        0.0,
                        all_scores.as_mut_ptr(),
                        ctx as isize,
                        1,
                    );
                }
                for r in 0..rows {
                    let visible = s.start_pos + r0 + r + 1;
                    let row = &mut all_scores[r * ctx..(r + 1) * ctx];
                    simd::softmax(&mut row[..visible]);
                    row[visible..].fill(0.0);
                    tally(visible - 1, &row[..visible]);
                }
                // SAFETY: the output rows r0..r1, head h slice, are written by this task only (row stride out.cols).
                unsafe {
                    let op = optr.at((s.first_row + r0) * heads * hd + h * hd);
                    matrixmultiply::sgemm(
                        rows,
                        ctx,
                        hd,
                        1.0,
                        all_scores.as_ptr(),
                        ctx as isize,
                        1,
                        gv.as_ptr(),
                        hd as isize,
                        1,
                        0.0,
                        op,
                        (heads * hd) as isize,
                        1,
                    );
                }
            }
        });
    });
    for (&(si, kvh, _, _), partial) in tasks.iter().zip(partials) {
        let partial = partial.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tallies
            .iter_mut()
            .find(|t| t.seq == si && !partial.is_empty())
        {
            let at = (layer * lay.kv_heads + kvh) * t.positions;
            let n = partial.len().min(t.positions);
            for (acc, p) in t.sums[at..at + n].iter_mut().zip(&partial) {
                *acc += p;
            }
        }
    }
}

/// Copies positions `0..ctx` of one KV head into `dst` as a contiguous `ctx x head_dim` f32 matrix.
fn gather(
    buf: &KvBuf,
    lay: &crate::kv::KvLayout,
    table: &[u32],
    kvh: usize,
    ctx: usize,
    dst: &mut Vec<f32>,
) {
    let (bs, hd) = (lay.block_size, lay.head_dim);
    dst.resize(ctx * hd, 0.0);
    for (bi, &block) in table.iter().enumerate().take(ctx.div_ceil(bs)) {
        let n = bs.min(ctx - bi * bs);
        let first = (block as usize * lay.kv_heads + kvh) * bs;
        buf.read(first, hd, &mut dst[bi * bs * hd..(bi * bs + n) * hd]);
    }
}

mod affine;
pub(super) mod kernels;
mod runs;
#[cfg(test)]
mod tests;
