//! Dot products of quantized weight rows with quantized activation rows, the inner loop of decode.
//!
//! `dot_rows` computes one weight row against up to four activation rows at once so the unpacked weight block is
//! reused from registers; with a batch of sequences this turns a memory-bound matvec into one read of each weight
//! byte per step. AVX2+FMA+F16C kernels (monomorphized per type and row count so accumulators stay in registers)
//! are chosen at run time; a portable scalar path computes the same integer sums. Types without a kernel here
//! (K-quants, floats) return `false` from [`has_kernel`] and are served by dequantizing rows (`backend::cpu::matmul`).

use super::GgmlType;
use super::actq::ActBlock;
use half::f16;

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

/// Dot products of weight rows `rows` (each `row_bytes` long in `w`) with every activation row in `xs`:
/// `out[(r - rows.start) * xs.len() + i] = dot(w_row(r), xs[i])`. `ty` must satisfy [`has_kernel`].
///
/// The row loop lives inside the SIMD function so that the kernel is inlined and dispatch happens once per call;
/// activation rows are taken four at a time, each weight row staying in L1 while all groups use it.
pub fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    xs: &[&[ActBlock]],
    out: &mut [f32],
    use_simd: bool,
) {
    assert_eq!(out.len(), rows.len() * xs.len(), "dot_rows: output size");
    assert!(
        rows.end * row_bytes <= w.len(),
        "dot_rows: rows out of range"
    );
    let blocks = row_bytes / ty.block_bytes();
    assert!(
        xs.iter().all(|x| x.len() >= blocks),
        "dot_rows: activation rows too short"
    );
    #[cfg(target_arch = "x86_64")]
    if use_simd {
        // SAFETY: `use_simd` is only true when `avx2_available()` returned true; sizes were checked above.
        unsafe { avx2::dot_rows(ty, w, row_bytes, rows, xs, out) };
        return;
    }
    let _ = use_simd;
    let n = xs.len();
    for (i, r) in rows.enumerate() {
        let w_row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (j, x) in xs.iter().enumerate() {
            out[i * n + j] = dot_scalar(ty, w_row, x);
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActBlock, GgmlType};
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
        out: &mut [f32],
    ) {
        macro_rules! go {
            ($kernel:ident) => {{
                let n = xs.len();
                for (i, r) in rows.clone().enumerate() {
                    let w_row = &w[r * row_bytes..(r + 1) * row_bytes];
                    let o = &mut out[i * n..(i + 1) * n];
                    for g in (0..n).step_by(4) {
                        match n - g {
                            1 => o[g..g + 1].copy_from_slice(&$kernel::<1>(w_row, [xs[g]])),
                            2 => o[g..g + 2]
                                .copy_from_slice(&$kernel::<2>(w_row, [xs[g], xs[g + 1]])),
                            3 => o[g..g + 3].copy_from_slice(&$kernel::<3>(
                                w_row,
                                [xs[g], xs[g + 1], xs[g + 2]],
                            )),
                            _ => o[g..g + 4].copy_from_slice(&$kernel::<4>(
                                w_row,
                                [xs[g], xs[g + 1], xs[g + 2], xs[g + 3]],
                            )),
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

    #[test]
    fn kernels_match_dequantized_f32_dot() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let k = 256;
            let w = random_blocks(ty, k / 32, 7 + ty as u64);
            let mut wf = vec![0f32; k];
            dequantize_row(ty, &w, &mut wf);
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    (0..k)
                        .map(|i| ((i * 7 + r * 3) % 23) as f32 * 0.1 - 1.1)
                        .collect()
                })
                .collect();
            let xq: Vec<Vec<ActBlock>> = xs
                .iter()
                .map(|x| {
                    let mut q = vec![ActBlock::default(); k / 32];
                    quantize_activations(x, &mut q);
                    q
                })
                .collect();
            let refs: Vec<&[ActBlock]> = xq.iter().map(|v| v.as_slice()).collect();
            for n in 1..=4 {
                for simd in [false, avx2_available()] {
                    let mut out = [0f32; 4];
                    dot_rows(ty, &w, w.len(), 0..1, &refs[..n], &mut out[..n], simd);
                    for r in 0..n {
                        let exact: f32 = wf.iter().zip(&xs[r]).map(|(a, b)| a * b).sum();
                        let scalar = dot_scalar(ty, &w, &xq[r]);
                        assert!(
                            (out[r] - scalar).abs() <= 1e-4 * (1.0 + scalar.abs()),
                            "{ty} n={n} simd={simd} row {r}"
                        );
                        // 16-bit activations: the error is tiny against the f32 dot.
                        assert!(
                            (out[r] - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
                            "{ty} row {r}: {} vs {exact}",
                            out[r]
                        );
                    }
                }
            }
        }
    }
}
