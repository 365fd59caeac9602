//! The wide tiled kernel: two interleaved weight groups (sixteen rows) per 512-bit register, for batches.
//!
//! [`super::tiles`] holds one group's element pair in a 256-bit register and multiply-accumulates it with
//! `vpdpwssd`. On a CPU that runs 512-bit VNNI at the 256-bit form's rate per element (Zen 4 splits it in two halves;
//! a microbenchmark on this project's 2-vCPU EPYC VM measured 0.14 ns per 256-bit and 0.27 ns per 512-bit
//! `vpdpwssd`), one 512-bit instruction covers two groups with one broadcast activation pair, one scale multiply
//! and one store of sixteen outputs, so a batch spends fewer instructions beside the multiply-adds. The arithmetic of
//! every output lane is the tiles' exactly (integer block sums, then `fma(sum, d * x.d, acc)` and for Q4 types
//! `fma(m, x.dsum, acc)`, block after block), so an activation row's outputs are bit for bit those of the tiles,
//! batched or alone. Small batches and a last odd group go to the tiles.

use super::super::GgmlType;
use super::super::interleave::GROUP_ROWS;
use super::tiles::{GROUP, KIND_TYPES, PASS, Q4_0, Q4_1, Q8_0, prefetch_ahead};
use super::{ActBlock, OutRows};
use std::arch::x86_64::*;

/// Activation rows from which the wide kernel runs (below it the tiles' one-group kernel costs less: the unpacked
/// pair of groups is reused by too few rows).
pub(super) const WIDE_FROM: usize = 8;

/// One unpacked block of a pair of groups: pair `p` (elements `2p, 2p + 1`) of the sixteen rows as i16 (the first
/// group's rows in the low half), and the rows' scales and minimum terms (Q4_1's minimum, Q4_0's `-8 * scale`).
struct Unpacked {
    pairs: [__m512i; 16],
    d: __m512,
    m: __m512,
}

/// Unpacks block `$b` of the groups `$g0` and `$g1` (`8 * block_bytes` bytes of kind `$kind` each, interleaved). A
/// macro, so that it is inlined (a call would return sixteen registers through memory).
macro_rules! unpack {
    ($kind:expr, $g0:expr, $g1:expr) => {{
        let (g0, g1): (&[u8], &[u8]) = ($g0, $g1);
        // Sixteen bytes of each group side by side, the first group's low.
        let load = |at: usize| {
            let (a, b) = (&g0[at..at + 16], &g1[at..at + 16]);
            // SAFETY: 16 bytes each are in bounds (sliced); loadu has no alignment requirement.
            unsafe {
                _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(a.as_ptr() as *const __m128i)),
                    _mm_loadu_si128(b.as_ptr() as *const __m128i),
                )
            }
        };
        let d = _mm512_cvtph_ps(load(0));
        let mut pairs = [_mm512_setzero_si512(); 16];
        if $kind == Q8_0 {
            for (p, v) in pairs.iter_mut().enumerate() {
                *v = _mm512_cvtepi8_epi16(load(16 + 16 * p));
            }
            Unpacked { pairs, d, m: d }
        } else {
            let (m, qs) = if $kind == Q4_1 {
                (_mm512_cvtph_ps(load(16)), 32)
            } else {
                (_mm512_mul_ps(d, _mm512_set1_ps(-8.0)), 16)
            };
            let nibble = _mm256_set1_epi8(0x0f);
            for c in 0..8 {
                let q = load(qs + 16 * c);
                pairs[c] = _mm512_cvtepu8_epi16(_mm256_and_si256(q, nibble));
                pairs[8 + c] =
                    _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), nibble));
            }
            Unpacked { pairs, d, m }
        }
    }};
}

/// `$acc + $w . [*($p + $off); 16]`: `vpdpwssd` with the i32 `$off` bytes past `$p` broadcast to every lane by the
/// instruction itself. Written out because the compiler otherwise splits the intrinsic into a multiply-add and an
/// add (two 512-bit operations, each split in two on Zen 4) and broadcasts with a separate instruction; the offset is
/// a constant of the instruction, so no address arithmetic sits between the multiply-adds.
macro_rules! dpwssd {
    ($acc:expr, $w:expr, $p:expr, $off:expr) => {{
        let (mut acc, w, p): (__m512i, __m512i, *const i16) = ($acc, $w, $p);
        // SAFETY: the caller's `p + off` points at four readable bytes; the instruction reads exactly those (an
        // unaligned 32-bit read is allowed for an embedded broadcast) and writes only `acc`.
        unsafe {
            std::arch::asm!(
                "vpdpwssd {acc}, {w}, dword ptr [{p} + {off}]{{1to16}}",
                acc = inout(zmm_reg) acc,
                w = in(zmm_reg) w,
                p = in(reg) p,
                off = const $off,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        acc
    }};
}

/// Dot products of weight rows `rows` with the activation rows `xs`, as `super::dot_rows` defines them.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C, AVX-512 F, BW, VL and VNNI; sizes as checked by `super::dot_rows`; `rows` lies
/// in whole interleaved groups of `w`. `ty` is Q4_0, Q4_1 or Q8_0.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    xs: &[&[ActBlock]],
    mut out: OutRows<'_>,
) {
    let n = xs.len();
    let wide_rows = 2 * GROUP_ROWS;
    // Rows rows.start..wide_end go two groups at a time here (none below WIDE_FROM activation rows), the rest to
    // the tiles.
    let wide_end = if n >= WIDE_FROM {
        rows.start + (rows.len() / wide_rows) * wide_rows
    } else {
        rows.start
    };
    let group_bytes = GROUP_ROWS * row_bytes;
    for first in (rows.start..wide_end).step_by(wide_rows) {
        let g0 = &w[first * row_bytes..][..group_bytes];
        let g1 = &w[first * row_bytes + group_bytes..][..group_bytes];
        for p0 in (0..n).step_by(PASS) {
            let xp = &xs[p0..n.min(p0 + PASS)];
            let mut acc = [_mm512_setzero_ps(); PASS];
            match ty {
                GgmlType::Q4_0 => pass::<Q4_0>(g0, g1, xp, &mut acc),
                GgmlType::Q8_0 => pass::<Q8_0>(g0, g1, xp, &mut acc),
                _ => pass::<Q4_1>(g0, g1, xp, &mut acc),
            }
            for (j, a) in acc[..xp.len()].iter().enumerate() {
                let o = out.cols(p0 + j, first - rows.start, wide_rows);
                // SAFETY: sixteen f32 = 64 bytes, in bounds (sliced); storeu has no alignment requirement.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
            }
        }
    }
    if wide_end < rows.end {
        let rest = out.skip(wide_end - rows.start);
        // SAFETY: the CPU has what the VNNI tiles need (a subset of this function's features); `wide_end..rows.end`
        // are whole groups, as `rows` were.
        unsafe { super::tiles::vnni::dot_rows(ty, w, row_bytes, wide_end..rows.end, xs, rest) };
    }
}

/// The sixteen outputs of the groups `g0`, `g1` for each activation row of `xs` (at most [`PASS`]) into `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pass<const K: u8>(g0: &[u8], g1: &[u8], xs: &[&[ActBlock]], out: &mut [__m512; PASS]) {
    let run = GROUP_ROWS * KIND_TYPES[K as usize].block_bytes();
    for (b, (blk0, blk1)) in g0.chunks_exact(run).zip(g1.chunks_exact(run)).enumerate() {
        for blk in [blk0, blk1] {
            prefetch_ahead(blk.as_ptr(), run);
        }
        let u = unpack!(K, blk0, blk1);
        for g in (0..xs.len()).step_by(GROUP) {
            let (xg, ag) = (&xs[g..xs.len().min(g + GROUP)], &mut out[g..]);
            match xg.len() {
                1 => block::<1, K>(&u, xg, b, ag),
                2 => block::<2, K>(&u, xg, b, ag),
                3 => block::<3, K>(&u, xg, b, ag),
                _ => block::<GROUP, K>(&u, xg, b, ag),
            }
        }
    }
}

/// Adds block `b` of `N` activation rows dotted with the unpacked block (of kind `K`) into `acc[..N]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn block<const N: usize, const K: u8>(
    u: &Unpacked,
    xs: &[&[ActBlock]],
    b: usize,
    acc: &mut [__m512],
) {
    let x: [&ActBlock; N] = std::array::from_fn(|j| &xs[j][b]);
    let (mut even, mut odd) = ([_mm512_setzero_si512(); N], [_mm512_setzero_si512(); N]);
    let qs: [*const i16; N] = std::array::from_fn(|j| x[j].qs.as_ptr());
    // Pair `p` (elements 2p and 2p + 1) of each row's activation block lies 4p bytes into its `qs`, which holds 32
    // elements, so every offset below (at most 60) is in bounds. Pairs 2q and 2q + 1 go with the unpacked pairs
    // 2q and 2q + 1, into the even and odd sums.
    macro_rules! pairs {
        ($($q:literal)*) => {$(
            let (w0, w1) = (u.pairs[2 * $q], u.pairs[2 * $q + 1]);
            for j in 0..N {
                even[j] = dpwssd!(even[j], w0, qs[j], 8 * $q);
                odd[j] = dpwssd!(odd[j], w1, qs[j], 8 * $q + 4);
            }
        )*};
    }
    pairs!(0 1 2 3 4 5 6 7);
    for j in 0..N {
        let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even[j], odd[j]));
        let mut a = _mm512_fmadd_ps(sum, _mm512_mul_ps(u.d, _mm512_set1_ps(x[j].d)), acc[j]);
        if K != Q8_0 {
            a = _mm512_fmadd_ps(u.m, _mm512_set1_ps(x[j].dsum), a);
        }
        acc[j] = a;
    }
}
