//! Activations quantized to 16-bit integer blocks of 32, the right-hand side of every quantized dot product.
//!
//! Each block stores a scale, the integer sum of its quants (which folds the Q4_1 minimum and the Q4_0 offset into
//! one multiply), and the 32 quants. Quantizing the activation once per matmul costs O(k); the dot products then run
//! in integer SIMD (`vpmaddwd`). 16 bits rather than llama.cpp's 8: an 8-bit activation moved this model's logits
//! by up to 0.43 against an unquantized reference and flipped greedy choices, while 16 bits keep the engine within
//! 1e-3 of it; the integer kernel costs about a third more instructions, and decode stays bound by weight bytes.
//! Rounding is to nearest, so the error per element is at most half a step (`max|x| / 65534`).

/// Largest quant magnitude.
const QMAX: f32 = 32767.0;

/// One block of 32 activations: `x[i] ~= d * qs[i]`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlock {
    pub qs: [i16; 32],
    pub d: f32,
    pub qsum: i32,
    /// `d * qsum`, precomputed: the Q4_1 minimum and Q4_0 offset terms multiply it.
    pub dsum: f32,
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            d: 0.0,
            qsum: 0,
            dsum: 0.0,
            qs: [0; 32],
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks). Run-time dispatched: the AVX2 loop
/// gives the portable loop's blocks bit for bit (same products, same rounding), about ten times faster.
pub fn quantize_activations(x: &[f32], out: &mut [ActBlock]) {
    assert_eq!(
        x.len(),
        out.len() * 32,
        "quantize_activations: size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if super::dot::avx2_available() {
        // SAFETY: AVX2 is present (checked at run time); sizes were checked above.
        unsafe { avx2::quantize(x, out) };
        return;
    }
    quantize_portable(x, out);
}

/// The block's scale and its reciprocal (zero for an all-zero block).
#[inline]
fn scale_of(amax: f32) -> (f32, f32) {
    let d = amax / QMAX;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

fn quantize_portable(x: &[f32], out: &mut [ActBlock]) {
    for (xs, blk) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, inv) = scale_of(amax);
        let mut sum = 0i32;
        for (q, v) in blk.qs.iter_mut().zip(xs) {
            // Round half away from zero without a libm call (baseline x86_64 has no rounding instruction).
            let t = v * inv;
            let r = if t >= 0.0 {
                (t + 0.5) as i32
            } else {
                (t - 0.5) as i32
            };
            *q = r.clamp(-(QMAX as i32), QMAX as i32) as i16;
            sum += *q as i32;
        }
        blk.d = d;
        blk.qsum = sum;
        blk.dsum = d * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActBlock, QMAX, scale_of};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 must be available; `x.len() == out.len() * 32`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(x: &[f32], out: &mut [ActBlock]) {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let (lo, hi) = (
            _mm256_set1_epi32(-(QMAX as i32)),
            _mm256_set1_epi32(QMAX as i32),
        );
        for (xs, blk) in x.chunks_exact(32).zip(out.iter_mut()) {
            // SAFETY: xs holds 32 floats, four unaligned loads of eight.
            let v: [__m256; 4] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
            let a = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            let (d, inv) = scale_of(_mm_cvtss_f32(m));
            let inv = _mm256_set1_ps(inv);
            // t + 0.5 with t's sign, truncated: the portable loop's rounding, lane by lane.
            let q = v.map(|v| {
                let t = _mm256_mul_ps(v, inv);
                let r = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half));
                _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(r), lo), hi)
            });
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_hadd_epi32(s, s);
            let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
            // packs interleaves the 128-bit halves of its operands; the permute puts them back in order.
            let pack = |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
            let dst = blk.qs.as_mut_ptr() as *mut __m256i;
            // SAFETY: qs is 32 i16 = two 32-byte stores; storeu has no alignment requirement.
            unsafe {
                _mm256_storeu_si256(dst, pack(q[0], q[1]));
                _mm256_storeu_si256(dst.add(1), pack(q[2], q[3]));
            }
            blk.d = d;
            blk.qsum = sum;
            blk.dsum = d * sum as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
            .collect();
        let mut q = vec![ActBlock::default(); 2];
        quantize_activations(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / 32];
            let back = b.d * b.qs[i % 32] as f32;
            assert!(
                (back - v).abs() <= b.d * 0.5 + 1e-6,
                "element {i}: {v} -> {back}"
            );
        }
        assert_eq!(q[0].qsum, q[0].qs.iter().map(|&v| v as i32).sum::<i32>());
    }

    #[test]
    fn simd_blocks_equal_the_portable_ones_bit_for_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Magnitudes from 1e-6 to 1e3, ties at exactly half a step, zeros and negative zeros.
        let mut x: Vec<f32> = (0..32 * 200)
            .map(|_| {
                let r = next();
                let mag = 10f32.powi((r % 10) as i32 - 6);
                ((r >> 8) % 20_001) as f32 / 10_000.0 * mag - mag
            })
            .collect();
        x[..32].copy_from_slice(&[0.0; 32]);
        x[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i % 2 == 0 { -0.0 } else { 0.0 });
        // Scale exactly 1: every other element a tie.
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) + 0.5;
        }
        x[64] = QMAX;
        let mut fast = vec![ActBlock::default(); x.len() / 32];
        let mut slow = fast.clone();
        quantize_activations(&x, &mut fast);
        quantize_portable(&x, &mut slow);
        for (b, (f, s)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(f.qs, s.qs, "block {b}");
            assert_eq!(
                (f.d.to_bits(), f.qsum, f.dsum.to_bits()),
                (s.d.to_bits(), s.qsum, s.dsum.to_bits()),
                "block {b}"
            );
        }
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let mut q = vec![ActBlock::default(); 1];
        quantize_activations(&[0.0; 32], &mut q);
        assert_eq!(q[0].d, 0.0);
        assert!(q[0].qs.iter().all(|&v| v == 0));
    }
}
