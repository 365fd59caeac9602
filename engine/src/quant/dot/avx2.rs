//! AVX2+FMA+F16C kernels: 256-bit lanes, each 32-weight block unpacked to two 16-lane halves of i16 and dotted with
//! `vpmaddwd`; activation rows four at a time share the unpacked block.

use super::super::GgmlType;
use super::{ActBlock, OutRows};
use std::arch::x86_64::*;

/// # Safety
/// AVX2, FMA and F16C must be available; sizes as checked by `super::dot_rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    xs: &[&[ActBlock]],
    mut out: OutRows<'_>,
) {
    macro_rules! go {
        ($kernel:ident) => {{
            let n = xs.len();
            for (i, r) in rows.clone().enumerate() {
                let w_row = &w[r * row_bytes..(r + 1) * row_bytes];
                for g in (0..n).step_by(4) {
                    let sums: &[f32] = match n - g {
                        1 => &$kernel::<1>(w_row, [xs[g]]),
                        2 => &$kernel::<2>(w_row, [xs[g], xs[g + 1]]),
                        3 => &$kernel::<3>(w_row, [xs[g], xs[g + 1], xs[g + 2]]),
                        _ => &$kernel::<4>(w_row, [xs[g], xs[g + 1], xs[g + 2], xs[g + 3]]),
                    };
                    for (j, &v) in sums.iter().enumerate() {
                        out.cols(g + j, i, 1)[0] = v;
                    }
                }
            }
        }};
    }
    match ty {
        GgmlType::Q4_1 => go!(q4_1),
        GgmlType::Q4_0 => go!(q4_0),
        GgmlType::Q8_0 => go!(q8_0),
        other => unreachable!("avx2 dot called for {other} without a kernel"),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(b: &[u8], at: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes([b[at], b[at + 1]]) as i32,
    )))
}

/// The two f16 values at the start of a Q4_1 block (scale and minimum), converted in one instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_pair(b: &[u8]) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
        b[0], b[1], b[2], b[3],
    ])));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// 16 bytes of nibbles -> (elements 0..16, elements 16..32) as unsigned 16-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles_i16(p: &[u8]) -> (__m256i, __m256i) {
    assert!(p.len() >= 16);
    // SAFETY: 16 bytes are in bounds (asserted); loadu has no alignment requirement.
    let q = unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) };
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
}

/// Integer dot of 32 weights (two 16-lane halves) with a block's 32 activations, as 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_dot(w_lo: __m256i, w_hi: __m256i, x: &ActBlock) -> __m256 {
    // SAFETY: `qs` is 32 i16 = 64 bytes; loadu has no alignment requirement.
    let (x_lo, x_hi) = unsafe {
        let p = x.qs.as_ptr() as *const __m256i;
        (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
    };
    let s = _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
    _mm256_cvtepi32_ps(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut extra = [0f32; N];
    for (bi, b) in w.chunks_exact(20).enumerate() {
        let (d, m) = f16_pair(b);
        let (lo, hi) = nibbles_i16(&b[4..20]);
        for r in 0..N {
            let x = &xs[r][bi];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), block_dot(lo, hi, x), acc[r]);
            extra[r] = m.mul_add(x.dsum, extra[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + extra[r])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut extra = [0f32; N];
    for (bi, b) in w.chunks_exact(18).enumerate() {
        let d = f16_at(b, 0);
        let (lo, hi) = nibbles_i16(&b[2..18]);
        for r in 0..N {
            let x = &xs[r][bi];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), block_dot(lo, hi, x), acc[r]);
            extra[r] = (-8.0 * d).mul_add(x.dsum, extra[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + extra[r])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    for (bi, b) in w.chunks_exact(34).enumerate() {
        let d = f16_at(b, 0);
        let q = &b[2..34];
        // SAFETY: 32 quant bytes follow the scale; loadu has no alignment requirement.
        let (lo, hi) = unsafe {
            let p = q.as_ptr() as *const __m128i;
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(1))),
            )
        };
        for r in 0..N {
            let x = &xs[r][bi];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), block_dot(lo, hi, x), acc[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]))
}
