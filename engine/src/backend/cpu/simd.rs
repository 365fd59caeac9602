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

/// `out[j] = scale * dot(q, keys[j])` for the `out.len()` keys of `hd` floats stored one after another in `keys`:
/// one query head's attention scores over a contiguous run of cached keys.
pub fn scores(q: &[f32], keys: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
    assert!(
        q.len() >= hd && keys.len() >= out.len() * hd,
        "scores: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA are present (checked at run time); sizes checked above, hd a multiple of 8.
        return unsafe { scores_avx2(q, keys, hd, scale, out) };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = scale
            * q[..hd]
                .iter()
                .zip(&keys[j * hd..(j + 1) * hd])
                .map(|(a, b)| a * b)
                .sum::<f32>();
    }
}

/// `out += sum_j p[j] * values[j]` for the `p.len()` value vectors of `hd` floats stored one after another:
/// one query head's attention output over a contiguous run of cached values.
pub fn weighted_sum(p: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
    assert!(
        out.len() >= hd && values.len() >= p.len() * hd,
        "weighted_sum: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd.is_multiple_of(8) {
        // SAFETY: as in `scores`.
        return unsafe { weighted_sum_avx2(p, values, hd, out) };
    }
    for (j, &pj) in p.iter().enumerate() {
        for (o, v) in out[..hd].iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
            *o += pj * v;
        }
    }
}

/// Four keys at a time, each with its own accumulator (four independent FMA chains), reduced together by three
/// horizontal adds: the per-key reduction that dominated a one-dot-per-key loop is shared by four keys.
///
/// # Safety
/// AVX2 and FMA must be available; `q` holds `hd` floats, `keys` `out.len() * hd`, `hd` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let n = out.len();
    let mut j = 0;
    // SAFETY (all loads): key j + i < n, dims d + 8 <= hd, within the sizes the caller guarantees.
    while j + 4 <= n {
        let mut a = [_mm256_setzero_ps(); 4];
        for d in (0..hd).step_by(8) {
            let qv = unsafe { _mm256_loadu_ps(qp.add(d)) };
            for (i, acc) in a.iter_mut().enumerate() {
                let kv = unsafe { _mm256_loadu_ps(kp.add((j + i) * hd + d)) };
                *acc = _mm256_fmadd_ps(qv, kv, *acc);
            }
        }
        // [a0 a0 a1 a1 | a0 a0 a1 a1] and likewise for a2, a3; then [a0 a1 a2 a3 | a0 a1 a2 a3]; halves added.
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let s = _mm_mul_ps(s, _mm_set1_ps(scale));
        // SAFETY: out[j..j + 4] is in bounds (j + 4 <= n).
        unsafe { _mm_storeu_ps(out.as_mut_ptr().add(j), s) };
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = scale * dot_body(&q[..hd], &keys[jj * hd..(jj + 1) * hd]);
    }
}

/// The output kept in registers (up to 64 dims at a time) while the values stream past.
///
/// # Safety
/// As [`scores_avx2`], with `values` holding `p.len() * hd` floats and `out` `hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(p: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    for d0 in (0..hd).step_by(64) {
        let lanes = ((hd - d0) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        // SAFETY (all loads and stores): dims d0 + 8 * r + 8 <= hd for r < lanes; value rows j < p.len().
        for (r, a) in acc.iter_mut().enumerate().take(lanes) {
            *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(d0 + 8 * r)) };
        }
        for (j, &pj) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pj);
            let row = unsafe { values.as_ptr().add(j * hd + d0) };
            for (r, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(row.add(8 * r)) }, *a);
            }
        }
        for (r, a) in acc.iter().enumerate().take(lanes) {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * r), *a) };
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
        // Head sizes with and without the vector path, key counts around the four-key step.
        for hd in [8, 64, 72, 128, 6] {
            for n in [1, 3, 4, 5, 11] {
                let q: Vec<f32> = (0..hd).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
                let kv: Vec<f32> = (0..n * hd)
                    .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
                    .collect();
                let mut s = vec![0f32; n];
                super::scores(&q, &kv, hd, 0.125, &mut s);
                let mut out: Vec<f32> = (0..hd).map(|i| i as f32 * 0.01).collect();
                let start = out.clone();
                super::weighted_sum(&s, &kv, hd, &mut out);
                for j in 0..n {
                    let want: f32 = (0..hd).map(|d| q[d] * kv[j * hd + d]).sum::<f32>() * 0.125;
                    assert!(
                        (s[j] - want).abs() < 1e-4,
                        "hd {hd} n {n} key {j}: {} vs {want}",
                        s[j]
                    );
                }
                for d in 0..hd {
                    let want = start[d] + (0..n).map(|j| s[j] * kv[j * hd + d]).sum::<f32>();
                    assert!(
                        (out[d] - want).abs() < 1e-4,
                        "hd {hd} n {n} dim {d}: {} vs {want}",
                        out[d]
                    );
                }
            }
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
