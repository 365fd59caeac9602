//! The vector loops of decode attention: the element types the cache is read in place as ([`Elem`]: f32, f16,
//! int8 and fp8 codes), the prefetch hint, and scores and weighted sums of a KV group's query heads over a run of
//! keys or values, with run-time CPU dispatch (AVX2 + FMA + F16C where present, portable loops elsewhere; see
//! [`super::super::simd`] for why each loop is compiled twice).

use super::super::simd::has_avx2;

/// An element type the cache keeps keys and values in, which attention reads in place: `f32`; `f16` widened eight
/// lanes at a time by F16C as it is loaded (half the bytes from memory, no copy); `i8` and [`E4m3`], the int8 and
/// fp8 formats' codes, whose per-vector scale the caller applies to each score and weight.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and `p..p + 8` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees eight readable floats and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable halves and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl Elem for i8 {
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable bytes and AVX2.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }
}

/// An E4M3 code as the fp8 cache format stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

impl Elem for E4m3 {
    fn to_f32(self) -> f32 {
        crate::kv::codec::fp8::to_f32(self.0)
    }
    /// The code's bits moved into an f16's (sign to bit 15, exponent and mantissa to bits 7-14) make the f16 whose
    /// value is the code's times 2^-8 (exponent bias 15 against 7), subnormals included; F16C widens it. The NaN
    /// codes (0x7f, 0xff), which quantizing finite values never writes, read as 480.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const E4m3) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable bytes, AVX2 and F16C.
        unsafe {
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.cast()));
            let magnitude = _mm_slli_epi16::<7>(_mm_and_si128(b, _mm_set1_epi16(0x7f)));
            let sign = _mm_slli_epi16::<8>(_mm_and_si128(b, _mm_set1_epi16(0x80)));
            _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_or_si128(magnitude, sign)),
                _mm256_set1_ps(256.0),
            )
        }
    }
}

/// Asks for every line of `data` to be brought into the core's L2 ahead of its use (a hint: it never faults and
/// changes no result). Into L2 rather than L1, since the core keeps many more L2 misses in flight: on this
/// project's development VM, reading scattered 4 KiB runs went from 6.3 to about 11 GB/s on one core with each
/// run requested two runs ahead.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        for line in data.chunks(64 / size_of::<T>().max(1)) {
            // SAFETY: a prefetch never faults; the address lies inside `data` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
        }
    }
}

/// Most query heads one pass over a run of keys or values serves: their accumulators and the run's vectors fit
/// the sixteen vector registers of AVX2 (three heads times four keys, or times 32 dims; for int4 runs, three heads
/// times a group's 32 dims, `super::affine`).
pub(super) const HEADS_PER_PASS: usize = 3;

/// Attention scores of the query heads in `q` (`q.len() / hd` heads, one after another, as a row of Q holds the
/// heads of one KV group) over a run of `n` keys of `hd` elements: `out[h * stride + at + j] = scale * q_h .
/// key_j`, with `stride = out.len() / heads` (a row of scores per head). Each key is loaded once for up to three
/// heads.
pub fn scores<T: Elem>(
    q: &[f32],
    keys: &[T],
    hd: usize,
    scale: f32,
    out: &mut [f32],
    at: usize,
    n: usize,
) {
    let heads = q.len() / hd;
    let stride = out.len() / heads.max(1);
    assert!(
        heads * hd == q.len() && keys.len() >= n * hd && at + n <= stride,
        "scores: sizes"
    );
    for h0 in (0..heads).step_by(HEADS_PER_PASS) {
        let g = HEADS_PER_PASS.min(heads - h0);
        let q = &q[h0 * hd..(h0 + g) * hd];
        let out = &mut out[h0 * stride..(h0 + g) * stride];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && hd.is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time); sizes checked above, hd a multiple
            // of 8.
            unsafe {
                match g {
                    1 => scores_avx2::<T, 1>(q, keys, hd, scale, out, stride, at, n),
                    2 => scores_avx2::<T, 2>(q, keys, hd, scale, out, stride, at, n),
                    _ => scores_avx2::<T, 3>(q, keys, hd, scale, out, stride, at, n),
                }
            }
            continue;
        }
        for h in 0..g {
            for j in 0..n {
                out[h * stride + at + j] =
                    scale * key_dot(&q[h * hd..(h + 1) * hd], &keys[j * hd..(j + 1) * hd]);
            }
        }
    }
}

fn key_dot<T: Elem>(q: &[f32], key: &[T]) -> f32 {
    q.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>()
}

/// The attention output of several query heads over a run of `n` values of `hd` elements: `out[h * hd + d] +=
/// sum_j p[h * stride + at + j] * value_j[d]` for the `out.len() / hd` heads, with `stride = p.len() / heads` (a
/// row of probabilities per head). Each value is loaded once for up to three heads.
pub fn weighted_sum<T: Elem>(
    p: &[f32],
    at: usize,
    n: usize,
    values: &[T],
    hd: usize,
    out: &mut [f32],
) {
    let heads = out.len() / hd;
    let stride = p.len() / heads.max(1);
    assert!(
        heads * hd == out.len() && values.len() >= n * hd && at + n <= stride,
        "weighted_sum: sizes"
    );
    for h0 in (0..heads).step_by(HEADS_PER_PASS) {
        let g = HEADS_PER_PASS.min(heads - h0);
        let p = &p[h0 * stride..(h0 + g) * stride];
        let out = &mut out[h0 * hd..(h0 + g) * hd];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && hd.is_multiple_of(8) {
            // SAFETY: as in `scores`.
            unsafe {
                match g {
                    1 => weighted_sum_avx2::<T, 1>(p, stride, at, n, values, hd, out),
                    2 => weighted_sum_avx2::<T, 2>(p, stride, at, n, values, hd, out),
                    _ => weighted_sum_avx2::<T, 3>(p, stride, at, n, values, hd, out),
                }
            }
            continue;
        }
        for h in 0..g {
            for j in 0..n {
                let pj = p[h * stride + at + j];
                for (o, v) in out[h * hd..(h + 1) * hd]
                    .iter_mut()
                    .zip(&values[j * hd..(j + 1) * hd])
                {
                    *o += pj * v.to_f32();
                }
            }
        }
    }
}

/// Four keys at a time, each with its own accumulator per head (independent FMA chains), reduced together by three
/// horizontal adds: the per-key reduction that dominated a one-dot-per-key loop is shared by four keys, and each
/// key vector loaded (and widened) serves all `G` heads.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `q` holds `G * hd` floats, `keys` `n * hd` elements, `out` `G` rows of
/// `stride` with `at + n <= stride`; `hd` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2<T: Elem, const G: usize>(
    q: &[f32],
    keys: &[T],
    hd: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
    at: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let mut j = 0;
    // SAFETY (all loads): key j + i < n, dims d + 8 <= hd, heads g < G, within the sizes the caller guarantees.
    while j + 4 <= n {
        let mut a = [[_mm256_setzero_ps(); 4]; G];
        for d in (0..hd).step_by(8) {
            for i in 0..4 {
                let kv = unsafe { T::load8(kp.add((j + i) * hd + d)) };
                for (g, acc) in a.iter_mut().enumerate() {
                    let qv = unsafe { _mm256_loadu_ps(qp.add(g * hd + d)) };
                    acc[i] = _mm256_fmadd_ps(qv, kv, acc[i]);
                }
            }
        }
        for (g, a) in a.iter().enumerate() {
            // [a0 a0 a1 a1 | a0 a0 a1 a1] and likewise for a2, a3; then [a0 a1 a2 a3 | a0 a1 a2 a3]; halves added.
            let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let s = _mm_mul_ps(s, _mm_set1_ps(scale));
            // SAFETY: out[g * stride + at + j..][..4] is in bounds (j + 4 <= n, at + n <= stride).
            unsafe { _mm_storeu_ps(out.as_mut_ptr().add(g * stride + at + j), s) };
        }
        j += 4;
    }
    for jj in j..n {
        for g in 0..G {
            out[g * stride + at + jj] =
                scale * key_dot(&q[g * hd..(g + 1) * hd], &keys[jj * hd..(jj + 1) * hd]);
        }
    }
}

/// The outputs of `G` heads kept in registers, 32 dims at a time, while the values stream past.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `p` holds `G` rows of `stride` with `at + n <= stride`, `values` `n * hd`
/// elements, `out` `G * hd` floats; `hd` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<T: Elem, const G: usize>(
    p: &[f32],
    stride: usize,
    at: usize,
    n: usize,
    values: &[T],
    hd: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    for d0 in (0..hd).step_by(32) {
        let lanes = ((hd - d0) / 8).min(4);
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        // SAFETY (all loads and stores): dims d0 + 8 * r + 8 <= hd for r < lanes; heads g < G; value rows j < n.
        for (g, acc) in acc.iter_mut().enumerate() {
            for (r, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(g * hd + d0 + 8 * r)) };
            }
        }
        for j in 0..n {
            let w: [__m256; G] = std::array::from_fn(|g| _mm256_set1_ps(p[g * stride + at + j]));
            let row = unsafe { values.as_ptr().add(j * hd + d0) };
            for r in 0..lanes {
                let v = unsafe { T::load8(row.add(8 * r)) };
                for (acc, w) in acc.iter_mut().zip(&w) {
                    acc[r] = _mm256_fmadd_ps(*w, v, acc[r]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate().take(lanes) {
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(g * hd + d0 + 8 * r), *a) };
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    /// Checks scores `s` (a row of `stride = s.len() / heads` per head, columns `at..at + n`) and outputs `out`
    /// (heads of `hd`, from `start`) against plain loops over the queries `q` and the `n` vectors `kf` as f32,
    /// with the scale 0.125.
    #[allow(clippy::too_many_arguments)]
    pub fn assert_matches_plain_loops(
        q: &[f32],
        kf: &[f32],
        hd: usize,
        n: usize,
        s: &[f32],
        at: usize,
        start: &[f32],
        out: &[f32],
    ) {
        let heads = q.len() / hd;
        let stride = s.len() / heads;
        for h in 0..heads {
            let qh = &q[h * hd..(h + 1) * hd];
            for j in 0..n {
                let want: f32 = (0..hd).map(|d| qh[d] * kf[j * hd + d]).sum::<f32>() * 0.125;
                let got = s[h * stride + at + j];
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "hd {hd} n {n} heads {heads} head {h} key {j}: {got} vs {want}"
                );
            }
            for d in 0..hd {
                let want = start[h * hd + d]
                    + (0..n)
                        .map(|j| s[h * stride + at + j] * kf[j * hd + d])
                        .sum::<f32>();
                let got = out[h * hd + d];
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "hd {hd} n {n} heads {heads} head {h} dim {d}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn attention_kernels_match_plain_loops() {
        fn check<T: super::Elem>(from: fn(f32) -> T) {
            // Head sizes with and without the vector path, key counts around the four-key step.
            for hd in [8, 64, 72, 128, 6] {
                for n in [1, 3, 4, 5, 11] {
                    let q: Vec<f32> = (0..hd).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
                    let kv: Vec<T> = (0..n * hd)
                        .map(|i| from(((i * 7) % 13) as f32 * 0.1 - 0.6))
                        .collect();
                    let kf: Vec<f32> = kv.iter().map(|x| x.to_f32()).collect();
                    // One head alone, then three heads at once (the second and third queries scaled copies).
                    for heads in [1, 3, 4] {
                        let qs: Vec<f32> = (0..heads)
                            .flat_map(|h| q.iter().map(move |x| x * (1.0 + h as f32 * 0.5)))
                            .collect();
                        let stride = n + 2;
                        let mut s = vec![0f32; heads * stride];
                        super::scores(&qs, &kv, hd, 0.125, &mut s, 1, n);
                        let mut out: Vec<f32> = (0..heads * hd).map(|i| i as f32 * 0.01).collect();
                        let start = out.clone();
                        super::weighted_sum(&s, 1, n, &kv, hd, &mut out);
                        assert_matches_plain_loops(&qs, &kf, hd, n, &s, 1, &start, &out);
                    }
                }
            }
        }
        check::<f32>(|x| x);
        check::<half::f16>(half::f16::from_f32);
        check::<i8>(|x| (x * 10.0).round() as i8);
        check::<super::E4m3>(|x| super::E4m3(crate::kv::codec::fp8::from_f32(x * 100.0)));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_fp8_code_widens_to_its_value() {
        if !super::has_avx2() {
            return;
        }
        let codes: Vec<super::E4m3> = (0..=255u8).map(super::E4m3).collect();
        for chunk in codes.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: eight codes; AVX2 and F16C checked above.
            unsafe {
                std::arch::x86_64::_mm256_storeu_ps(
                    got.as_mut_ptr(),
                    super::Elem::load8(chunk.as_ptr()),
                )
            };
            for (c, g) in chunk.iter().zip(got) {
                let want = super::Elem::to_f32(*c);
                if c.0 & 0x7f == 0x7f {
                    assert!(want.is_nan(), "code {:#x}", c.0);
                } else {
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "code {:#x}: {g} vs {want}",
                        c.0
                    );
                }
            }
        }
    }
}
