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

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_body(y, a, x)
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

/// `y += a * x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { axpy_avx2(y, a, x) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_and_axpy_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..67).map(|i| (i % 7) as f32 - 2.0).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((super::dot(&a, &b) - want).abs() < 1e-3);
        let mut y = b.clone();
        super::axpy(&mut y, 0.5, &a);
        for i in 0..67 {
            assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-5);
        }
    }
}
