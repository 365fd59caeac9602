//! The tiled kernel: dot products of interleaved weight groups ([`crate::quant::interleave`]) with activation rows.
//!
//! Each block of an eight-row group unpacks into sixteen registers, one per pair of elements, holding that pair for
//! all eight rows as i16 (one 16-byte load, nibble masks, a widening move: no shuffles, since the layout was
//! built at load). Every activation row is then dotted with all eight rows at once by broadcasting its element pairs:
//! one `vpmaddwd` + `vpaddd` (or, with AVX-512 VNNI, one `vpdpwssd`) covers two elements of eight rows, and the block
//! scales apply once per block to eight outputs. Against the per-row kernel ([`super::avx2`]), which pays a
//! widening, a reduction and a scalar scale per row and block, this spends the instructions on multiply-adds, at
//! batch 1 as well as in batches (where the unpacked block is reused by every activation row).

use super::super::GgmlType;
use super::super::interleave::GROUP_ROWS;
use super::{ActBlock, OutRows};
use std::arch::x86_64::*;

/// Weight rows per tile: one interleaved group.
pub(super) const TILE_ROWS: usize = GROUP_ROWS;
/// Activation rows whose accumulators stay in registers while one unpacked block is dotted with them.
pub(super) const GROUP: usize = 4;
/// Activation rows whose f32 outputs one pass over a weight group keeps.
pub(super) const PASS: usize = 16;

/// Activation rows from which two groups of a Q4 type are dotted at once ([`avx2::paired_rows`]; below it the second
/// group's registers cost more than the shared broadcasts save).
const PAIRED_FROM: usize = 4;
/// The same for Q8_0, whose unpacked pairs are plain loads that the one-group kernel folds into its multiply-adds:
/// pairing pays only in large batches (one thread, ns per block and row of the 49152 x 576 head, one group / two:
/// 16 rows 0.79 / 0.70-0.75; 8 rows 0.89 / 0.86-0.94; 4 rows 0.87 / 1.20).
const PAIRED_Q8_FROM: usize = 12;

/// How many blocks ahead of the one being unpacked the kernel prefetches weights.
const PREFETCH_BLOCKS: usize = 40;

/// Prefetches the `len` bytes (a block of a group's rows) [`PREFETCH_BLOCKS`] blocks of that size ahead of `blk`.
#[inline]
pub(super) fn prefetch_ahead(blk: *const u8, len: usize) {
    // Prefetching has no effect on memory; wrapping_add keeps the address computation defined.
    let ahead = blk.wrapping_add(PREFETCH_BLOCKS * len) as *const i8;
    for line in 0..len.div_ceil(64) {
        // SAFETY: a prefetch of any address is allowed (it never faults).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line)) };
    }
}

/// Kinds of tiles, as const parameters (the type's branches then vanish from the inner loops).
pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q8_0: u8 = 2;
/// The element type of each kind.
pub(super) const KIND_TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

/// One unpacked block of a group: pair `p` (elements `2p, 2p + 1`) of the eight rows, and the rows' scales and
/// minimum terms (Q4_1's minimum, Q4_0's `-8 * scale`, nothing for Q8_0).
struct Unpacked {
    pairs: [__m256i; 16],
    d: __m256,
    m: __m256,
}

/// Unpacks the group block `$blk` (`8 * block_bytes` bytes of kind `$kind`, interleaved) into an [`Unpacked`]. A
/// macro, so that it is inlined into each kernel (a call would return sixteen registers through memory).
macro_rules! unpack {
    ($kind:expr, $blk:expr) => {{
        let blk: &[u8] = $blk;
        let load = |at: usize| {
            let b = &blk[at..at + 16];
            // SAFETY: 16 bytes are in bounds (sliced); loadu has no alignment requirement.
            unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
        };
        let d = _mm256_cvtph_ps(load(0));
        let mut pairs = [_mm256_setzero_si256(); 16];
        if $kind == Q8_0 {
            for (p, v) in pairs.iter_mut().enumerate() {
                *v = _mm256_cvtepi8_epi16(load(16 + 16 * p));
            }
            Unpacked { pairs, d, m: d }
        } else {
            let (m, qs) = if $kind == Q4_1 {
                (_mm256_cvtph_ps(load(16)), 32)
            } else {
                (_mm256_mul_ps(d, _mm256_set1_ps(-8.0)), 16)
            };
            let nibble = _mm_set1_epi8(0x0f);
            for c in 0..8 {
                let q = load(qs + 16 * c);
                pairs[c] = _mm256_cvtepu8_epi16(_mm_and_si128(q, nibble));
                pairs[8 + c] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), nibble));
            }
            Unpacked { pairs, d, m }
        }
    }};
}

/// Defines `$name::dot_rows`, the tiled product with one choice of the pairwise multiply-accumulate `$acc(s, w, x)`.
macro_rules! tiled_kernel {
    ($name:ident, $features:literal, |$s:ident, $w:ident, $x:ident| $acc:expr) => {
        pub(super) mod $name {
            use super::*;

            /// # Safety
            /// The CPU must have the instruction sets named in this function's target features; sizes as checked by
            /// `super::super::dot_rows`; `rows` lies in whole interleaved groups of `w`. `ty` is Q4_0, Q4_1 or Q8_0.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn dot_rows(
                ty: GgmlType,
                w: &[u8],
                row_bytes: usize,
                rows: std::ops::Range<usize>,
                xs: &[&[ActBlock]],
                mut out: OutRows<'_>,
            ) {
                let n = xs.len();
                let paired_from = if ty == GgmlType::Q8_0 {
                    PAIRED_Q8_FROM
                } else {
                    PAIRED_FROM
                };
                if n >= paired_from {
                    return paired_rows(ty, w, row_bytes, rows, xs, out);
                }
                let group_bytes = TILE_ROWS * row_bytes;
                for (ti, first) in rows.step_by(TILE_ROWS).enumerate() {
                    let group = &w[first * row_bytes..first * row_bytes + group_bytes];
                    for p0 in (0..n).step_by(PASS) {
                        let xp = &xs[p0..n.min(p0 + PASS)];
                        let mut acc = [_mm256_setzero_ps(); PASS];
                        match ty {
                            GgmlType::Q4_0 => pass_of::<Q4_0>(group, xp, &mut acc),
                            GgmlType::Q4_1 => pass_of::<Q4_1>(group, xp, &mut acc),
                            _ => pass_of::<Q8_0>(group, xp, &mut acc),
                        }
                        store(&mut out, p0, ti * TILE_ROWS, &acc[..xp.len()]);
                    }
                }
            }

            /// [`dot_rows`] from [`PAIRED_FROM`] activation rows ([`PAIRED_Q8_FROM`] for Q8_0): two groups at a
            /// time, so that each broadcast activation pair feeds two weight registers (a last odd group goes
            /// alone).
            #[target_feature(enable = $features)]
            fn paired_rows(
                ty: GgmlType,
                w: &[u8],
                row_bytes: usize,
                rows: std::ops::Range<usize>,
                xs: &[&[ActBlock]],
                mut out: OutRows<'_>,
            ) {
                let n = xs.len();
                let group_bytes = TILE_ROWS * row_bytes;
                let mut first = rows.start;
                while first < rows.end {
                    let g0 = &w[first * row_bytes..][..group_bytes];
                    let two = rows.end - first >= 2 * TILE_ROWS;
                    for p0 in (0..n).step_by(PASS) {
                        let xp = &xs[p0..n.min(p0 + PASS)];
                        let mut acc = [[_mm256_setzero_ps(); PASS]; 2];
                        if two {
                            let g1 = &w[first * row_bytes + group_bytes..][..group_bytes];
                            // Exactly four rows keep their f32 accumulators in registers too.
                            match (ty, xp.len()) {
                                (GgmlType::Q4_0, GROUP) => {
                                    paired_pass::<GROUP, Q4_0>([g0, g1], xp, &mut acc)
                                }
                                (GgmlType::Q4_0, _) => {
                                    paired_pass::<PASS, Q4_0>([g0, g1], xp, &mut acc)
                                }
                                (GgmlType::Q8_0, GROUP) => {
                                    paired_pass::<GROUP, Q8_0>([g0, g1], xp, &mut acc)
                                }
                                (GgmlType::Q8_0, _) => {
                                    paired_pass::<PASS, Q8_0>([g0, g1], xp, &mut acc)
                                }
                                (_, GROUP) => paired_pass::<GROUP, Q4_1>([g0, g1], xp, &mut acc),
                                _ => paired_pass::<PASS, Q4_1>([g0, g1], xp, &mut acc),
                            }
                        } else {
                            match ty {
                                GgmlType::Q4_0 => pass_of::<Q4_0>(g0, xp, &mut acc[0]),
                                GgmlType::Q8_0 => pass_of::<Q8_0>(g0, xp, &mut acc[0]),
                                _ => pass_of::<Q4_1>(g0, xp, &mut acc[0]),
                            }
                        }
                        let at = first - rows.start;
                        store(&mut out, p0, at, &acc[0][..xp.len()]);
                        if two {
                            store(&mut out, p0, at + TILE_ROWS, &acc[1][..xp.len()]);
                        }
                    }
                    first += if two { 2 * TILE_ROWS } else { TILE_ROWS };
                }
            }

            /// Stores the eight outputs of activation rows `p0..p0 + acc.len()` from output column `col` on.
            #[inline]
            #[target_feature(enable = $features)]
            fn store(out: &mut OutRows<'_>, p0: usize, col: usize, acc: &[__m256]) {
                for (j, a) in acc.iter().enumerate() {
                    let o = out.cols(p0 + j, col, TILE_ROWS);
                    // SAFETY: eight f32 = 32 bytes, in bounds (sliced); storeu has no alignment requirement.
                    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), *a) };
                }
            }

            /// [`pass`] for the number of activation rows in `xs` (at most [`PASS`]).
            #[inline]
            #[target_feature(enable = $features)]
            fn pass_of<const K: u8>(group: &[u8], xs: &[&[ActBlock]], out: &mut [__m256]) {
                match xs.len() {
                    1 => pass::<1, K>(group, xs, out),
                    2 => pass::<2, K>(group, xs, out),
                    3 => pass::<3, K>(group, xs, out),
                    4 => pass::<4, K>(group, xs, out),
                    _ => pass::<PASS, K>(group, xs, out),
                }
            }

            /// The group's eight outputs for each of the activation rows `xs` (at most `M`; `M` is their exact
            /// number when it is at most [`GROUP`], so that the accumulators live in registers) into `out`.
            #[inline]
            #[target_feature(enable = $features)]
            fn pass<const M: usize, const K: u8>(
                group: &[u8],
                xs: &[&[ActBlock]],
                out: &mut [__m256],
            ) {
                let mut acc = [_mm256_setzero_ps(); M];
                let bb = KIND_TYPES[K as usize].block_bytes();
                for (b, blk) in group.chunks_exact(TILE_ROWS * bb).enumerate() {
                    prefetch_ahead(blk.as_ptr(), TILE_ROWS * bb);
                    let u = unpack!(K, blk);
                    for g in (0..xs.len()).step_by(GROUP) {
                        let (xg, ag) = (&xs[g..xs.len().min(g + GROUP)], &mut acc[g..]);
                        match xg.len() {
                            1 => block::<1, K>(&u, xg, b, ag),
                            2 => block::<2, K>(&u, xg, b, ag),
                            3 => block::<3, K>(&u, xg, b, ag),
                            _ => block::<GROUP, K>(&u, xg, b, ag),
                        }
                    }
                }
                out[..M].copy_from_slice(&acc);
            }

            /// Adds block `b` of `N` activation rows dotted with the unpacked block (of kind `K`) into `acc[..N]`.
            #[inline]
            #[target_feature(enable = $features)]
            fn block<const N: usize, const K: u8>(
                u: &Unpacked,
                xs: &[&[ActBlock]],
                b: usize,
                acc: &mut [__m256],
            ) {
                let x: [&ActBlock; N] = std::array::from_fn(|j| &xs[j][b]);
                // Two integer accumulators per row (even and odd pairs) halve the dependency chains.
                let (mut even, mut odd) =
                    ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
                // The i32 holding elements 2p and 2p+1 of row j's activation block, in every lane.
                // SAFETY: p < 16, so the read covers qs[2p..2p + 2] of a 32-element block.
                let pair = |j: usize, p: usize| unsafe {
                    _mm256_set1_epi32((x[j].qs.as_ptr() as *const i32).add(p).read_unaligned())
                };
                for q in 0..8 {
                    let (w0, w1) = (u.pairs[2 * q], u.pairs[2 * q + 1]);
                    for j in 0..N {
                        let ($s, $w, $x) = (even[j], w0, pair(j, 2 * q));
                        even[j] = $acc;
                        let ($s, $w, $x) = (odd[j], w1, pair(j, 2 * q + 1));
                        odd[j] = $acc;
                    }
                }
                for j in 0..N {
                    let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(even[j], odd[j]));
                    let mut a =
                        _mm256_fmadd_ps(sum, _mm256_mul_ps(u.d, _mm256_set1_ps(x[j].d)), acc[j]);
                    if K != Q8_0 {
                        a = _mm256_fmadd_ps(u.m, _mm256_set1_ps(x[j].dsum), a);
                    }
                    acc[j] = a;
                }
            }

            /// As [`pass`] for two groups at once (`xs` at most `M` rows; `M` is [`GROUP`] for exactly four, so
            /// that the accumulators live in registers, else [`PASS`]): one broadcast of each activation pair feeds
            /// both groups' weight registers.
            #[inline]
            #[target_feature(enable = $features)]
            fn paired_pass<const M: usize, const K: u8>(
                groups: [&[u8]; 2],
                xs: &[&[ActBlock]],
                out: &mut [[__m256; PASS]; 2],
            ) {
                let mut acc = [[_mm256_setzero_ps(); M]; 2];
                let run = TILE_ROWS * KIND_TYPES[K as usize].block_bytes();
                for (b, (blk0, blk1)) in groups[0]
                    .chunks_exact(run)
                    .zip(groups[1].chunks_exact(run))
                    .enumerate()
                {
                    for blk in [blk0, blk1] {
                        prefetch_ahead(blk.as_ptr(), run);
                    }
                    let u = [unpack!(K, blk0), unpack!(K, blk1)];
                    for g in (0..xs.len()).step_by(GROUP) {
                        let xg = &xs[g..xs.len().min(g + GROUP)];
                        match xg.len() {
                            1 => paired_block::<1, K, M>(&u, xg, b, g, &mut acc),
                            2 => paired_block::<2, K, M>(&u, xg, b, g, &mut acc),
                            3 => paired_block::<3, K, M>(&u, xg, b, g, &mut acc),
                            _ => paired_block::<GROUP, K, M>(&u, xg, b, g, &mut acc),
                        }
                    }
                }
                for (o, a) in out.iter_mut().zip(&acc) {
                    o[..M].copy_from_slice(a);
                }
            }

            /// As [`block`] for two unpacked groups: adds block `b` of the `N` activation rows `xs` (rows
            /// `at..at + N` of the pass) into both groups' accumulators.
            #[inline]
            #[target_feature(enable = $features)]
            fn paired_block<const N: usize, const K: u8, const M: usize>(
                u: &[Unpacked; 2],
                xs: &[&[ActBlock]],
                b: usize,
                at: usize,
                acc: &mut [[__m256; M]; 2],
            ) {
                let x: [&ActBlock; N] = std::array::from_fn(|j| &xs[j][b]);
                let mut sums = [[_mm256_setzero_si256(); N]; 2];
                for p in 0..16 {
                    let (w0, w1) = (u[0].pairs[p], u[1].pairs[p]);
                    for j in 0..N {
                        // SAFETY: p < 16, so the read covers qs[2p..2p + 2] of a 32-element block.
                        let xv = unsafe {
                            _mm256_set1_epi32(
                                (x[j].qs.as_ptr() as *const i32).add(p).read_unaligned(),
                            )
                        };
                        let ($s, $w, $x) = (sums[0][j], w0, xv);
                        sums[0][j] = $acc;
                        let ($s, $w, $x) = (sums[1][j], w1, xv);
                        sums[1][j] = $acc;
                    }
                }
                for (g, ug) in u.iter().enumerate() {
                    for j in 0..N {
                        let sum = _mm256_cvtepi32_ps(sums[g][j]);
                        let mut a = _mm256_fmadd_ps(
                            sum,
                            _mm256_mul_ps(ug.d, _mm256_set1_ps(x[j].d)),
                            acc[g][at + j],
                        );
                        if K != Q8_0 {
                            a = _mm256_fmadd_ps(ug.m, _mm256_set1_ps(x[j].dsum), a);
                        }
                        acc[g][at + j] = a;
                    }
                }
            }
        }
    };
}

tiled_kernel!(avx2, "avx2,fma,f16c", |s, w, x| _mm256_add_epi32(
    s,
    _mm256_madd_epi16(w, x)
));
tiled_kernel!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |s, w, x| _mm256_dpwssd_epi32(s, w, x)
);
