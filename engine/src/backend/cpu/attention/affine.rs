//! int4 blocks read in place by decode attention: each vector's 4-bit codes under an f16 (min, scale) per
//! [`GROUP`] dims (the `int4` cache format's rule, `kv::quant::quantize_groups`).
//!
//! No vector is dequantized. Over one group a key's score is `scale * (q . codes) + min * sum(q)`, and a value's
//! contribution to head `h` is `(p_h * scale) * codes + p_h * min` on every dim of the group: the codes are widened
//! to f32 as loaded, and the group's two numbers are applied once per group and head instead of once per element.
//! A byte holds dims `2i` (low nibble) and `2i + 1` (high nibble); rather than interleave nibbles, queries and
//! outputs are taken in the nibbles' order within each group, its even dims and then its odd ones
//! ([`to_nibble_order`], [`from_nibble_order`]). Needs a head dim that is a multiple of [`GROUP`].

use super::super::simd::has_avx2;
use super::kernels::HEADS_PER_PASS;
use half::f16;

/// Dims per (min, scale) pair.
pub const GROUP: usize = crate::kv::quant::INT4_GROUP;

/// The vectors of one block and KV head: `codes` `hd / 2` bytes each, `params` (min, scale) per group each.
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    pub codes: &'a [u8],
    pub params: &'a [f16],
}

/// `x` (whole groups) with each group's even dims first, then its odd dims, into `out`.
pub fn to_nibble_order(x: &[f32], out: &mut [f32]) {
    for (src, dst) in x.chunks_exact(GROUP).zip(out.chunks_exact_mut(GROUP)) {
        for i in 0..GROUP / 2 {
            dst[i] = src[2 * i];
            dst[GROUP / 2 + i] = src[2 * i + 1];
        }
    }
}

/// A KV group's queries (`heads` of `hd`, one after another) in nibble order, and each head's sum over each group
/// of dims (head-major), which the mins multiply.
pub fn nibble_query(q: &[f32], hd: usize) -> (Vec<f32>, Vec<f32>) {
    let mut qn = vec![0.0; q.len()];
    to_nibble_order(q, &mut qn);
    let sums = q.chunks_exact(GROUP).map(|g| g.iter().sum()).collect();
    debug_assert_eq!(q.len() % hd, 0);
    (qn, sums)
}

/// The inverse of [`to_nibble_order`].
pub fn from_nibble_order(x: &[f32], out: &mut [f32]) {
    for (src, dst) in x.chunks_exact(GROUP).zip(out.chunks_exact_mut(GROUP)) {
        for i in 0..GROUP / 2 {
            dst[2 * i] = src[i];
            dst[2 * i + 1] = src[GROUP / 2 + i];
        }
    }
}

impl Affine<'_> {
    pub fn vectors(self, hd: usize) -> usize {
        self.codes.len() / (hd / 2)
    }

    /// The code of dim `d` (in natural order) of vector `j`, and that vector's (min, scale) for the dim's group.
    fn code(self, hd: usize, j: usize, d: usize) -> (f32, f32, f32) {
        let b = self.codes[j * hd / 2 + d / 2];
        let c = if d.is_multiple_of(2) { b & 15 } else { b >> 4 };
        let p = j * 2 * (hd / GROUP) + 2 * (d / GROUP);
        (
            f32::from(c),
            self.params[p].to_f32(),
            self.params[p + 1].to_f32(),
        )
    }

    /// `out[h * stride + at + j] = scale * q_h . vector_j` for `j < n`, with the heads' queries `q` and their
    /// group sums `qsum` as [`nibble_query`] gives them.
    #[allow(clippy::too_many_arguments)]
    pub fn scores(
        self,
        q: &[f32],
        qsum: &[f32],
        hd: usize,
        scale: f32,
        out: &mut [f32],
        at: usize,
        n: usize,
    ) {
        let heads = q.len() / hd;
        let stride = out.len() / heads.max(1);
        assert!(
            hd.is_multiple_of(GROUP)
                && heads * hd == q.len()
                && qsum.len() == heads * (hd / GROUP)
                && self.codes.len() >= n * hd / 2
                && self.params.len() >= n * 2 * (hd / GROUP)
                && at + n <= stride,
            "int4 scores: sizes"
        );
        for h0 in (0..heads).step_by(HEADS_PER_PASS) {
            let g = HEADS_PER_PASS.min(heads - h0);
            let q = &q[h0 * hd..(h0 + g) * hd];
            let qsum = &qsum[h0 * (hd / GROUP)..(h0 + g) * (hd / GROUP)];
            let out = &mut out[h0 * stride..(h0 + g) * stride];
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2, FMA and F16C are present (checked at run time); sizes checked above.
                unsafe {
                    match g {
                        1 => scores_avx2::<1>(self, q, qsum, hd, scale, out, stride, at, n),
                        2 => scores_avx2::<2>(self, q, qsum, hd, scale, out, stride, at, n),
                        _ => scores_avx2::<3>(self, q, qsum, hd, scale, out, stride, at, n),
                    }
                }
                continue;
            }
            for h in 0..g {
                let qh = natural(&q[h * hd..(h + 1) * hd]);
                for j in 0..n {
                    let mut s = 0.0;
                    for (d, &qd) in qh.iter().enumerate() {
                        let (c, min, sc) = self.code(hd, j, d);
                        s += qd * (min + sc * c);
                    }
                    out[h * stride + at + j] = scale * s;
                }
            }
        }
    }

    /// `out[h * hd..][..hd] += sum_j p[h * stride + at + j] * vector_j` for `j < n`, `out` in nibble order.
    pub fn weighted_sum(self, p: &[f32], at: usize, n: usize, hd: usize, out: &mut [f32]) {
        let heads = out.len() / hd;
        let stride = p.len() / heads.max(1);
        assert!(
            hd.is_multiple_of(GROUP)
                && heads * hd == out.len()
                && self.codes.len() >= n * hd / 2
                && self.params.len() >= n * 2 * (hd / GROUP)
                && at + n <= stride,
            "int4 weighted_sum: sizes"
        );
        for h0 in (0..heads).step_by(HEADS_PER_PASS) {
            let g = HEADS_PER_PASS.min(heads - h0);
            let p = &p[h0 * stride..(h0 + g) * stride];
            let out = &mut out[h0 * hd..(h0 + g) * hd];
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: as in `scores`.
                unsafe {
                    match g {
                        1 => weighted_sum_avx2::<1>(self, p, stride, at, n, hd, out),
                        2 => weighted_sum_avx2::<2>(self, p, stride, at, n, hd, out),
                        _ => weighted_sum_avx2::<3>(self, p, stride, at, n, hd, out),
                    }
                }
                continue;
            }
            for h in 0..g {
                let mut acc = natural(&out[h * hd..(h + 1) * hd]);
                for j in 0..n {
                    let w = p[h * stride + at + j];
                    for (d, a) in acc.iter_mut().enumerate() {
                        let (c, min, sc) = self.code(hd, j, d);
                        *a += w * (min + sc * c);
                    }
                }
                to_nibble_order(&acc, &mut out[h * hd..(h + 1) * hd]);
            }
        }
    }
}

/// A vector in nibble order back in natural order (the portable loops' view).
fn natural(x: &[f32]) -> Vec<f32> {
    let mut v = vec![0.0; x.len()];
    from_nibble_order(x, &mut v);
    v
}

/// One group of a vector's codes (16 bytes) as four vectors of eight f32 in nibble order: the low nibbles of bytes
/// 0-7 and 8-15, then the high nibbles of bytes 0-7 and 8-15.
///
/// # Safety
/// AVX2 must be available and `p..p + 16` readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_group(p: *const u8) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 16 readable bytes and AVX2.
    unsafe {
        let b = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), mask);
        let f = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
        [
            f(lo),
            f(_mm_srli_si128::<8>(lo)),
            f(hi),
            f(_mm_srli_si128::<8>(hi)),
        ]
    }
}

/// Per key: each group's four code vectors dotted with each head's query (one multiply, three FMAs), scaled by the
/// group's scale into one accumulator per head; the mins times the query's group sums added once per key.
///
/// # Safety
/// AVX2, FMA and F16C must be available; sizes as `Affine::scores` checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2<const G: usize>(
    run: Affine<'_>,
    q: &[f32],
    qsum: &[f32],
    hd: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
    at: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    let (groups, cb) = (hd / GROUP, hd / 2);
    let qp = q.as_ptr();
    for j in 0..n {
        let mut acc = [_mm256_setzero_ps(); G];
        let mut mins = [0f32; G];
        for gi in 0..groups {
            // SAFETY (all loads): vector j < n, group gi < hd / GROUP, heads h < G: inside the checked sizes.
            let c = unsafe { widen_group(run.codes.as_ptr().add(j * cb + gi * GROUP / 2)) };
            let pi = (j * groups + gi) * 2;
            let (min, sc) = (run.params[pi].to_f32(), run.params[pi + 1].to_f32());
            for h in 0..G {
                let qg = unsafe { qp.add(h * hd + gi * GROUP) };
                let mut t = _mm256_mul_ps(unsafe { _mm256_loadu_ps(qg) }, c[0]);
                for (r, cr) in c.iter().enumerate().skip(1) {
                    t = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(qg.add(8 * r)) }, *cr, t);
                }
                acc[h] = _mm256_fmadd_ps(t, _mm256_set1_ps(sc), acc[h]);
                mins[h] += min * qsum[h * groups + gi];
            }
        }
        for h in 0..G {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(acc[h]),
                _mm256_extractf128_ps::<1>(acc[h]),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            out[h * stride + at + j] = scale * (_mm_cvtss_f32(s) + mins[h]);
        }
    }
}

/// Per group, the heads' 32 outputs in registers while the values stream past: each value's codes widened once
/// and added times `p * scale` for every head; `p * min` summed apart and added to the group's dims at the end.
///
/// # Safety
/// AVX2, FMA and F16C must be available; sizes as `Affine::weighted_sum` checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<const G: usize>(
    run: Affine<'_>,
    p: &[f32],
    stride: usize,
    at: usize,
    n: usize,
    hd: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (groups, cb) = (hd / GROUP, hd / 2);
    for gi in 0..groups {
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        let mut mins = [0f32; G];
        for j in 0..n {
            // SAFETY (all loads and stores): vector j < n, group gi < hd / GROUP, heads h < G.
            let c = unsafe { widen_group(run.codes.as_ptr().add(j * cb + gi * GROUP / 2)) };
            let pi = (j * groups + gi) * 2;
            let (min, sc) = (run.params[pi].to_f32(), run.params[pi + 1].to_f32());
            for h in 0..G {
                let w = p[h * stride + at + j];
                let ws = _mm256_set1_ps(w * sc);
                for (a, cr) in acc[h].iter_mut().zip(&c) {
                    *a = _mm256_fmadd_ps(ws, *cr, *a);
                }
                mins[h] += w * min;
            }
        }
        for h in 0..G {
            let m = _mm256_set1_ps(mins[h]);
            for (r, a) in acc[h].iter().enumerate() {
                let o = unsafe { out.as_mut_ptr().add(h * hd + gi * GROUP + 8 * r) };
                unsafe {
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(*a, m)))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::assert_matches_plain_loops;
    use super::*;
    use crate::kv::quant::quantize_groups;

    #[test]
    fn int4_runs_match_their_dequantized_vectors() {
        for hd in [32, 64, 128] {
            for n in [1, 3, 5, 16] {
                let x: Vec<f32> = (0..n * hd)
                    .map(|i| ((i * 37) % 23) as f32 * 0.13 - 1.4)
                    .collect();
                let (cb, pb) = (hd / 2, 2 * hd / GROUP);
                let (mut codes, mut params) = (vec![0u8; n * cb], vec![f16::ZERO; n * pb]);
                let mut deq = vec![0f32; n * hd];
                for j in 0..n {
                    let (c, p) = (&mut codes[j * cb..][..cb], &mut params[j * pb..][..pb]);
                    quantize_groups::<4>(&x[j * hd..][..hd], c, p);
                    crate::kv::quant::dequantize_groups::<4>(c, p, &mut deq[j * hd..][..hd]);
                }
                let run = Affine {
                    codes: &codes,
                    params: &params,
                };
                for heads in [1, 3, 4] {
                    let q: Vec<f32> = (0..heads * hd)
                        .map(|i| ((i * 11) % 17) as f32 * 0.1 - 0.8)
                        .collect();
                    let (qn, qsum) = nibble_query(&q, hd);
                    let stride = n + 3;
                    let mut s = vec![0f32; heads * stride];
                    run.scores(&qn, &qsum, hd, 0.125, &mut s, 2, n);
                    let start: Vec<f32> = (0..heads * hd).map(|i| i as f32 * 0.01).collect();
                    let mut out = vec![0f32; start.len()];
                    to_nibble_order(&start, &mut out);
                    run.weighted_sum(&s, 2, n, hd, &mut out);
                    let mut got = vec![0f32; out.len()];
                    from_nibble_order(&out, &mut got);
                    assert_matches_plain_loops(&q, &deq, hd, n, &s, 2, &start, &got);
                }
            }
        }
    }

    #[test]
    fn nibble_order_round_trips() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        to_nibble_order(&x, &mut a);
        assert_eq!(&a[..4], &[0.0, 2.0, 4.0, 6.0]);
        assert_eq!(a[16], 1.0);
        from_nibble_order(&a, &mut b);
        assert_eq!(x, b);
    }
}
