//! f32 vector kernels with run-time CPU dispatch: AVX2+FMA where present, portable loops elsewhere.
//!
//! The portable build targets baseline x86_64 (SSE2), so the hot loops of attention and normalization are compiled
//! twice: once inside a `#[target_feature(enable = "avx2,fma")]` wrapper, once plain; `has_avx2()` picks one.

use std::sync::OnceLock;

pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(crate::quant::dot::avx2_available)
}

/// Eight independent accumulators so that the compiler can keep a vector register per lane group.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// `sum(a[i] * b[i])`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { dot_avx2(a, b) };
    }
    // Without FMA hardware `mul_add` is a slow libm call; use plain multiply-add there.
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

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
/// the sixteen vector registers of AVX2 (three heads times four keys, or times 32 dims).
const HEADS_PER_PASS: usize = 3;

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

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + e^-g)`: SwiGLU's elementwise step. Every element goes
/// through the same vector code (a short tail is padded, not looped), so an element's result does not depend on
/// where it sits, and a batched row equals the same row alone.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: sizes");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { silu_mul_avx2(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma")]
    fn eight(g: &mut [f32], u: &[f32]) {
        // SAFETY: both slices hold eight floats (chunks of eight, or the padded tail).
        unsafe {
            let gv = _mm256_loadu_ps(g.as_ptr());
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(
                g.as_mut_ptr(),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
            );
        }
    }
    let mut gc = gate.chunks_exact_mut(8);
    let mut uc = up.chunks_exact(8);
    for (g, u) in (&mut gc).zip(&mut uc) {
        eight(g, u);
    }
    let (gr, ur) = (gc.into_remainder(), uc.remainder());
    if !gr.is_empty() {
        let (mut g, mut u) = ([0f32; 8], [0f32; 8]);
        g[..gr.len()].copy_from_slice(gr);
        u[..ur.len()].copy_from_slice(ur);
        eight(&mut g, &u);
        gr.copy_from_slice(&g[..gr.len()]);
    }
}

/// `x = softmax(x)`, max-subtracted: `e^(x_i - max) / sum_j e^(x_j - max)`. The AVX2 path takes `e^` from the
/// same polynomial as SwiGLU (within a few ulp of libm) eight lanes at a time and sums in eight lanes; a row's
/// result depends only on the row.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { softmax_avx2(x) };
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let hsum = |v: __m256| {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    };
    let n8 = x.len() / 8 * 8;
    let (body, tail) = x.split_at_mut(n8);
    // SAFETY (all loads and stores): chunks of eight floats of `body`.
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in body.chunks_exact(8) {
        m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let max = tail.iter().fold(_mm_cvtss_f32(m), |a, &v| a.max(v));
    let mv = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for c in body.chunks_exact_mut(8) {
        let e = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, mv));
        sum = _mm256_add_ps(sum, e);
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
    }
    // The tail through the same polynomial, padded (lanes past the tail are e^-inf's clamp, not summed).
    let mut pad = [f32::NEG_INFINITY; 8];
    pad[..tail.len()].copy_from_slice(tail);
    let e = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(pad.as_ptr()) }, mv));
    unsafe { _mm256_storeu_ps(pad.as_mut_ptr(), e) };
    tail.copy_from_slice(&pad[..tail.len()]);
    let total = hsum(sum) + tail.iter().sum::<f32>();
    let inv = _mm256_set1_ps(1.0 / total);
    for c in body.chunks_exact_mut(8) {
        unsafe {
            _mm256_storeu_ps(
                c.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv),
            )
        };
    }
    let inv = 1.0 / total;
    for v in tail.iter_mut() {
        *v *= inv;
    }
}

/// `e^x` per lane, within a few ulp of the correctly rounded value where the result is a normal float; inputs are
/// clamped to `[-87.3, 88]` (results from about 1.2e-38 to 1.7e38). Range reduction `x = n ln2 + r` with ln2 in two
/// parts, then Cephes' degree-5 polynomial for `e^r` on `|r| <= ln2 / 2`, scaled by `2^n` through the exponent bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_matches_a_plain_loop() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..67).map(|i| (i % 7) as f32 - 2.0).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((super::dot(&a, &b) - want).abs() < 1e-3);
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
                        for h in 0..heads {
                            let qh = &qs[h * hd..(h + 1) * hd];
                            for j in 0..n {
                                let want: f32 =
                                    (0..hd).map(|d| qh[d] * kf[j * hd + d]).sum::<f32>() * 0.125;
                                let got = s[h * stride + 1 + j];
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "hd {hd} n {n} heads {heads} head {h} key {j}: {got} vs {want}"
                                );
                            }
                            for d in 0..hd {
                                let want = start[h * hd + d]
                                    + (0..n)
                                        .map(|j| s[h * stride + 1 + j] * kf[j * hd + d])
                                        .sum::<f32>();
                                let got = out[h * hd + d];
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "hd {hd} n {n} heads {heads} head {h} dim {d}: {got} vs {want}"
                                );
                            }
                        }
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

    #[test]
    fn softmax_matches_libm_and_sums_to_one() {
        for n in [1, 5, 8, 13, 64, 301] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 * 0.7 - 9.0).collect();
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut got = x.clone();
            super::softmax(&mut got);
            for (i, (&v, &p)) in x.iter().zip(&got).enumerate() {
                let want = ((v as f64 - max).exp() / sum) as f32;
                assert!(
                    (p - want).abs() <= 1e-6 * want.max(1e-3),
                    "n {n} element {i}: {p} vs {want}"
                );
            }
            assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5, "n {n}");
        }
    }

    #[test]
    fn silu_mul_is_within_a_few_ulp_of_libm_and_independent_of_position() {
        // Values over the whole useful range, then the clamped extremes.
        let mut g: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.045).collect();
        g.extend([
            -200.0, -88.5, -87.0, 87.0, 88.5, 200.0, 0.0, -0.0, 1e-30, -1e-30,
        ]);
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut got = g.clone();
        super::silu_mul(&mut got, &u);
        for (i, ((&x, &w), &y)) in g.iter().zip(&u).zip(&got).enumerate() {
            let want = (x as f64 / (1.0 + (-x as f64).exp()) * w as f64) as f32;
            // Below e^-87 the clamp leaves results within 1e-35 of zero, as the true ones are.
            let tol = 4.0 * f32::EPSILON * want.abs() + 1e-35;
            assert!(
                (y - want).abs() <= tol,
                "element {i}: silu({x}) * {w} = {y}, want {want}"
            );
        }
        // The same element alone (the padded tail) and inside a full chunk gives the same bits.
        for i in [0, 1000, 2345, g.len() - 1] {
            let mut one = [g[i]];
            super::silu_mul(&mut one, &u[i..i + 1]);
            assert_eq!(one[0].to_bits(), got[i].to_bits(), "element {i}");
        }
    }
}
