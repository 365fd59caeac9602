//! A decode row's keys and values as runs of contiguous vectors: one run per block, read in place from a store
//! that holds plain elements (f32 or f16), or a single run over a gathered f32 copy (the quantized stores).
//!
//! Reading in place costs no copy and, at f16, half the bytes of f32; the runs of one sequence lie wherever its
//! blocks do, so the first query head of a group asks for each run's keys and values [`AHEAD`] runs before it
//! reads them (the rest of the group finds them in L2).

use super::super::kvbuf::Elements;
use super::super::simd::{self, Elem};
use crate::kv::KvLayout;
use half::f16;

/// How many runs ahead of the one being scored the keys and values are asked for.
const AHEAD: usize = 2;

pub enum Runs<'a> {
    F32(Vec<(&'a [f32], &'a [f32])>),
    F16(Vec<(&'a [f16], &'a [f16])>),
}

impl<'a> Runs<'a> {
    /// Positions `0..ctx` of KV head `kvh` through `table`, in place; `None` where the store's elements are not
    /// plain (the caller gathers a copy then).
    pub fn in_place(
        k: Option<Elements<'a>>,
        v: Option<Elements<'a>>,
        lay: &KvLayout,
        table: &[u32],
        kvh: usize,
        ctx: usize,
    ) -> Option<Self> {
        fn runs<'a, T>(
            k: &'a [T],
            v: &'a [T],
            lay: &KvLayout,
            table: &[u32],
            kvh: usize,
            ctx: usize,
        ) -> Vec<(&'a [T], &'a [T])> {
            let (bs, hd) = (lay.block_size, lay.head_dim);
            (0..ctx.div_ceil(bs))
                .map(|bi| {
                    let n = bs.min(ctx - bi * bs);
                    let at = ((table[bi] as usize * lay.kv_heads + kvh) * bs) * hd;
                    (&k[at..at + n * hd], &v[at..at + n * hd])
                })
                .collect()
        }
        match (k?, v?) {
            (Elements::F32(k), Elements::F32(v)) => {
                Some(Self::F32(runs(k, v, lay, table, kvh, ctx)))
            }
            (Elements::F16(k), Elements::F16(v)) => {
                Some(Self::F16(runs(k, v, lay, table, kvh, ctx)))
            }
            _ => None,
        }
    }

    /// Asks for the first runs, before the first head's scores start.
    pub fn prefetch_start(&self) {
        match self {
            Self::F32(r) => prefetch_from(r, 0),
            Self::F16(r) => prefetch_from(r, 0),
        }
    }

    /// `scores[j] = scale * q . key_j` over the first `scores.len()` positions; `prefetch`: ask for later runs.
    pub fn scores(&self, q: &[f32], hd: usize, scale: f32, scores: &mut [f32], prefetch: bool) {
        match self {
            Self::F32(r) => scores_over(r, q, hd, scale, scores, prefetch),
            Self::F16(r) => scores_over(r, q, hd, scale, scores, prefetch),
        }
    }

    /// `out += sum_j p[j] * value_j` over the first `p.len()` positions.
    pub fn weighted_sum(&self, p: &[f32], hd: usize, out: &mut [f32]) {
        match self {
            Self::F32(r) => weighted_sum_over(r, p, hd, out),
            Self::F16(r) => weighted_sum_over(r, p, hd, out),
        }
    }
}

fn prefetch_from<T>(runs: &[(&[T], &[T])], from: usize) {
    for (k, v) in runs.iter().skip(from).take(AHEAD) {
        simd::prefetch(k);
        simd::prefetch(v);
    }
}

fn scores_over<T: Elem>(
    runs: &[(&[T], &[T])],
    q: &[f32],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    prefetch: bool,
) {
    let mut at = 0;
    for (i, (k, _)) in runs.iter().enumerate() {
        if at == scores.len() {
            break;
        }
        if prefetch && let Some((nk, nv)) = runs.get(i + AHEAD) {
            simd::prefetch(nk);
            simd::prefetch(nv);
        }
        let n = (k.len() / hd).min(scores.len() - at);
        simd::scores(q, k, hd, scale, &mut scores[at..at + n]);
        at += n;
    }
}

fn weighted_sum_over<T: Elem>(runs: &[(&[T], &[T])], p: &[f32], hd: usize, out: &mut [f32]) {
    let mut at = 0;
    for (_, v) in runs {
        if at == p.len() {
            break;
        }
        let n = (v.len() / hd).min(p.len() - at);
        simd::weighted_sum(&p[at..at + n], v, hd, out);
        at += n;
    }
}
