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
