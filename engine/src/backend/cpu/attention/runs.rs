//! A decode row's keys and values as runs of contiguous vectors: one run per block, read in place from a store
//! whose elements attention can read directly (f32, f16, int8 and fp8 codes under a scale per vector, int4 codes
//! under a min and scale per group: [`super::affine`]), or a single run over a gathered f32 copy (kivi2).
//!
//! Reading in place costs no copy, and the bytes read shrink with the format (f16 half of f32, int8 about a
//! quarter); the runs of one sequence lie wherever its blocks do, so the first query head of a group asks for each
//! run's keys and values [`AHEAD`] runs before it reads them (the rest of the group finds them in L2).

use super::super::kvbuf::Elements;
use super::affine::{self, Affine};
use super::kernels::{self, E4m3, Elem};
use crate::kv::KvLayout;
use half::f16;

/// How many runs ahead of the one being scored the keys and values are asked for.
const AHEAD: usize = 2;

/// Vectors of one block and KV head, as stored.
trait Run: Copy {
    fn prefetch(self);
    fn vectors(self, hd: usize) -> usize;
}

/// A run whose scores and weighted sums take the queries and outputs as they are. Scores and outputs are for the
/// query heads of one KV group at once: `q` holds their queries one after another, `out`/`p` a row of `stride`
/// scores per head, of which a run fills or reads columns `at..at + n`.
trait Plain: Run {
    /// `out[h * stride + at + j] = scale * q_h . vector_j` for `j < n`.
    fn scores(self, q: &[f32], hd: usize, scale: f32, out: &mut [f32], at: usize, n: usize);
    /// `out[h * hd..][..hd] += sum_j p[h * stride + at + j] * vector_j` for `j < n`; `p`'s columns may be
    /// rescaled in place (they are consumed).
    fn weighted_sum(self, p: &mut [f32], at: usize, n: usize, hd: usize, out: &mut [f32]);
}

impl<T: Elem> Run for &[T] {
    fn prefetch(self) {
        kernels::prefetch(self);
    }
    fn vectors(self, hd: usize) -> usize {
        self.len() / hd
    }
}

impl<T: Elem> Plain for &[T] {
    fn scores(self, q: &[f32], hd: usize, scale: f32, out: &mut [f32], at: usize, n: usize) {
        kernels::scores(q, self, hd, scale, out, at, n);
    }
    fn weighted_sum(self, p: &mut [f32], at: usize, n: usize, hd: usize, out: &mut [f32]) {
        kernels::weighted_sum(p, at, n, self, hd, out);
    }
}

/// int8 or fp8 codes and their vectors' scales: a vector is `scale * code`, so a score is its codes' dot times the
/// scale, and a weight multiplies the scale before it multiplies the codes.
#[derive(Clone, Copy)]
pub struct Scaled<'a, C> {
    codes: &'a [C],
    scales: &'a [f16],
}

impl<C: Elem> Scaled<'_, C> {
    /// For each of `heads` rows, columns `at..at + n` times the vectors' scales.
    fn rescale(self, rows: &mut [f32], heads: usize, at: usize, n: usize) {
        for row in rows.chunks_exact_mut(rows.len() / heads) {
            for (x, s) in row[at..at + n].iter_mut().zip(self.scales) {
                *x *= s.to_f32();
            }
        }
    }
}

impl<C: Elem> Run for Scaled<'_, C> {
    fn prefetch(self) {
        kernels::prefetch(self.codes);
        kernels::prefetch(self.scales);
    }
    fn vectors(self, _hd: usize) -> usize {
        self.scales.len()
    }
}

impl<C: Elem> Plain for Scaled<'_, C> {
    fn scores(self, q: &[f32], hd: usize, scale: f32, out: &mut [f32], at: usize, n: usize) {
        kernels::scores(q, self.codes, hd, scale, out, at, n);
        self.rescale(out, q.len() / hd, at, n);
    }
    fn weighted_sum(self, p: &mut [f32], at: usize, n: usize, hd: usize, out: &mut [f32]) {
        self.rescale(p, out.len() / hd, at, n);
        kernels::weighted_sum(p, at, n, self.codes, hd, out);
    }
}

impl Run for Affine<'_> {
    fn prefetch(self) {
        kernels::prefetch(self.codes);
        kernels::prefetch(self.params);
    }
    fn vectors(self, hd: usize) -> usize {
        Affine::vectors(self, hd)
    }
}

pub enum Runs<'a> {
    F32(Vec<(&'a [f32], &'a [f32])>),
    F16(Vec<(&'a [f16], &'a [f16])>),
    Int8(Vec<(Scaled<'a, i8>, Scaled<'a, i8>)>),
    Fp8(Vec<(Scaled<'a, E4m3>, Scaled<'a, E4m3>)>),
    Int4(Vec<(Affine<'a>, Affine<'a>)>),
}

impl<'a> Runs<'a> {
    /// Positions `0..ctx` of KV head `kvh` through `table`, in place; `None` where the store's elements are not
    /// read in place (the caller gathers a copy then).
    pub fn in_place(
        k: Option<Elements<'a>>,
        v: Option<Elements<'a>>,
        lay: &KvLayout,
        table: &[u32],
        kvh: usize,
        ctx: usize,
    ) -> Option<Self> {
        let (bs, hd) = (lay.block_size, lay.head_dim);
        // Per block of the context: its first vector and how many of its vectors are in the context.
        let blocks: Vec<(usize, usize)> = (0..ctx.div_ceil(bs))
            .map(|bi| {
                let first = (table[bi] as usize * lay.kv_heads + kvh) * bs;
                (first, bs.min(ctx - bi * bs))
            })
            .collect();
        fn plain<'a, T>(
            k: &'a [T],
            v: &'a [T],
            blocks: &[(usize, usize)],
            hd: usize,
        ) -> Vec<(&'a [T], &'a [T])> {
            blocks
                .iter()
                .map(|&(first, n)| {
                    let r = first * hd..(first + n) * hd;
                    (&k[r.clone()], &v[r])
                })
                .collect()
        }
        fn scaled<'a, C>(
            kc: &'a [C],
            ks: &'a [f16],
            vc: &'a [C],
            vs: &'a [f16],
            blocks: &[(usize, usize)],
            hd: usize,
        ) -> Vec<(Scaled<'a, C>, Scaled<'a, C>)> {
            let run = |codes: &'a [C], scales: &'a [f16], first: usize, n: usize| Scaled {
                codes: &codes[first * hd..(first + n) * hd],
                scales: &scales[first..first + n],
            };
            blocks
                .iter()
                .map(|&(first, n)| (run(kc, ks, first, n), run(vc, vs, first, n)))
                .collect()
        }
        Some(match (k?, v?) {
            (Elements::F32(k), Elements::F32(v)) => Self::F32(plain(k, v, &blocks, hd)),
            (Elements::F16(k), Elements::F16(v)) => Self::F16(plain(k, v, &blocks, hd)),
            (Elements::Int8(kc, ks), Elements::Int8(vc, vs)) => {
                Self::Int8(scaled(kc, ks, vc, vs, &blocks, hd))
            }
            (Elements::Fp8(kc, ks), Elements::Fp8(vc, vs)) => {
                Self::Fp8(scaled(kc, ks, vc, vs, &blocks, hd))
            }
            (Elements::Int4(kc, kp), Elements::Int4(vc, vp))
                if hd.is_multiple_of(affine::GROUP) =>
            {
                let pv = 2 * hd / affine::GROUP; // params per vector
                let run = |codes: &'a [u8], params: &'a [f16], first: usize, n: usize| Affine {
                    codes: &codes[first * hd / 2..(first + n) * hd / 2],
                    params: &params[first * pv..(first + n) * pv],
                };
                Self::Int4(
                    blocks
                        .iter()
                        .map(|&(first, n)| (run(kc, kp, first, n), run(vc, vp, first, n)))
                        .collect(),
                )
            }
            _ => return None,
        })
    }

    /// Asks for the first runs, before the first head's scores start.
    pub fn prefetch_start(&self) {
        match self {
            Self::F32(r) => prefetch_first(r),
            Self::F16(r) => prefetch_first(r),
            Self::Int8(r) => prefetch_first(r),
            Self::Fp8(r) => prefetch_first(r),
            Self::Int4(r) => prefetch_first(r),
        }
    }

    /// The scores of the query heads in `q` over the first `visible` positions, a row of `visible` per head in
    /// `scores`; `prefetch`: ask for later runs.
    pub fn scores(&self, q: &[f32], hd: usize, scale: f32, scores: &mut [f32], prefetch: bool) {
        match self {
            Self::F32(r) => plain_scores(r, q, hd, scale, scores, prefetch),
            Self::F16(r) => plain_scores(r, q, hd, scale, scores, prefetch),
            Self::Int8(r) => plain_scores(r, q, hd, scale, scores, prefetch),
            Self::Fp8(r) => plain_scores(r, q, hd, scale, scores, prefetch),
            Self::Int4(r) => {
                let visible = scores.len() / (q.len() / hd);
                let (qn, qsum) = affine::nibble_query(q, hd);
                over(r, visible, hd, prefetch, |k, at, n| {
                    k.0.scores(&qn, &qsum, hd, scale, scores, at, n)
                });
            }
        }
    }

    /// `out[h * hd..][..hd] += sum_j p[h * visible + j] * value_j` for the heads of `out`; consumes `p` (an int8
    /// run rescales its columns in place).
    pub fn weighted_sum(&self, p: &mut [f32], hd: usize, out: &mut [f32]) {
        match self {
            Self::F32(r) => plain_weighted_sum(r, p, hd, out),
            Self::F16(r) => plain_weighted_sum(r, p, hd, out),
            Self::Int8(r) => plain_weighted_sum(r, p, hd, out),
            Self::Fp8(r) => plain_weighted_sum(r, p, hd, out),
            Self::Int4(r) => {
                let visible = p.len() / (out.len() / hd);
                let mut on = vec![0.0; out.len()];
                affine::to_nibble_order(out, &mut on);
                over(r, visible, hd, false, |v, at, n| {
                    v.1.weighted_sum(p, at, n, hd, &mut on)
                });
                affine::from_nibble_order(&on, out);
            }
        }
    }
}

fn prefetch_first<R: Run>(runs: &[(R, R)]) {
    for &(k, v) in runs.iter().take(AHEAD) {
        k.prefetch();
        v.prefetch();
    }
}

/// Calls `each(run pair, at, n)` over the runs covering the first `visible` vectors (`at`: the first vector's
/// column, `n`: how many of the run's vectors are visible); `prefetch`: ask for each pair [`AHEAD`] runs ahead.
fn over<R: Run>(
    runs: &[(R, R)],
    visible: usize,
    hd: usize,
    prefetch: bool,
    mut each: impl FnMut((R, R), usize, usize),
) {
    let mut at = 0;
    for (i, &(k, v)) in runs.iter().enumerate() {
        if at == visible {
            break;
        }
        if prefetch && let Some(&(nk, nv)) = runs.get(i + AHEAD) {
            nk.prefetch();
            nv.prefetch();
        }
        let n = k.vectors(hd).min(visible - at);
        each((k, v), at, n);
        at += n;
    }
}

fn plain_scores<R: Plain>(
    runs: &[(R, R)],
    q: &[f32],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    prefetch: bool,
) {
    let visible = scores.len() / (q.len() / hd);
    over(runs, visible, hd, prefetch, |(k, _), at, n| {
        k.scores(q, hd, scale, scores, at, n)
    });
}

fn plain_weighted_sum<R: Plain>(runs: &[(R, R)], p: &mut [f32], hd: usize, out: &mut [f32]) {
    let visible = p.len() / (out.len() / hd);
    over(runs, visible, hd, false, |(_, v), at, n| {
        v.weighted_sum(p, at, n, hd, out)
    });
}
