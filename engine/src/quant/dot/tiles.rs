//! Batched decode's kernel: eight weight rows at a time are unpacked once into an interleaved i16 tile (for each
//! pair of elements, the eight rows side by side in one 256-bit register), then every activation row is dotted with
//! the whole tile by broadcasting its element pairs. One `vpmaddwd` + `vpaddd` (or, with AVX-512 VNNI, one
//! `vpdpwssd`) covers two elements of eight rows, and the block scales apply once per block to eight outputs at a
//! time. The per-row kernel ([`super::avx2`]) instead pays a reduction and a scale per row and block, which made
//! batched decode bound by integer instructions; this one spends them on multiply-adds. The layout follows the
//! "repacked" interleaved blocks llama.cpp uses for its CPU matrix kernels, built per call here instead of at load
//! time so that the weights keep their file layout (and the batch-1 kernel its streaming reads).

use super::super::GgmlType;
use super::ActBlock;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per tile.
pub(super) const TILE_ROWS: usize = 8;
/// Activation rows dotted with each tile register at once (their accumulators stay in registers).
const GROUP: usize = 4;

/// One block of a tile: for each of the block's 16 element pairs, eight rows x two i16.
type TileBlock = [__m256i; 16];

/// A tile of eight weight rows: blocks, and each block's eight scales and (Q4_1 only; unread otherwise) minimums.
struct Tile {
    blocks: Vec<TileBlock>,
    d: Vec<__m256>,
    m: Vec<__m256>,
}

thread_local! {
    static TILE: RefCell<Tile> = const { RefCell::new(Tile { blocks: Vec::new(), d: Vec::new(), m: Vec::new() }) };
}

/// Transposes eight rows of eight 16-bit words: word `p` of row `i` goes to word `i` of output `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose_words(a: [__m128i; 8]) -> [__m128i; 8] {
    let t0 = _mm_unpacklo_epi16(a[0], a[1]);
    let t1 = _mm_unpackhi_epi16(a[0], a[1]);
    let t2 = _mm_unpacklo_epi16(a[2], a[3]);
    let t3 = _mm_unpackhi_epi16(a[2], a[3]);
    let t4 = _mm_unpacklo_epi16(a[4], a[5]);
    let t5 = _mm_unpackhi_epi16(a[4], a[5]);
    let t6 = _mm_unpacklo_epi16(a[6], a[7]);
    let t7 = _mm_unpackhi_epi16(a[6], a[7]);
    let u0 = _mm_unpacklo_epi32(t0, t2);
    let u1 = _mm_unpackhi_epi32(t0, t2);
    let u2 = _mm_unpacklo_epi32(t1, t3);
    let u3 = _mm_unpackhi_epi32(t1, t3);
    let u4 = _mm_unpacklo_epi32(t4, t6);
    let u5 = _mm_unpackhi_epi32(t4, t6);
    let u6 = _mm_unpacklo_epi32(t5, t7);
    let u7 = _mm_unpackhi_epi32(t5, t7);
    [
        _mm_unpacklo_epi64(u0, u4),
        _mm_unpackhi_epi64(u0, u4),
        _mm_unpacklo_epi64(u1, u5),
        _mm_unpackhi_epi64(u1, u5),
        _mm_unpacklo_epi64(u2, u6),
        _mm_unpackhi_epi64(u2, u6),
        _mm_unpacklo_epi64(u3, u7),
        _mm_unpackhi_epi64(u3, u7),
    ]
}

#[inline]
fn f16_bits(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Unpacks weight rows `first..first + 8` (all `blocks` of them) into `tile`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack(ty: GgmlType, w: &[u8], row_bytes: usize, first: usize, blocks: usize, tile: &mut Tile) {
    let bb = ty.block_bytes();
    tile.blocks.resize(blocks, [_mm256_setzero_si256(); 16]);
    tile.d.resize(blocks, _mm256_setzero_ps());
    tile.m.resize(blocks, _mm256_setzero_ps());
    let nibble = _mm_set1_epi8(0x0f);
    let eight = _mm256_set1_epi16(8);
    for b in 0..blocks {
        // Per row: elements 0..16 and 16..32 as bytes (unsigned nibbles, or Q8_0's signed bytes).
        let mut lo = [_mm_setzero_si128(); 8];
        let mut hi = [_mm_setzero_si128(); 8];
        let (mut ds, mut ms) = ([0u16; 8], [0u16; 8]);
        for i in 0..TILE_ROWS {
            let at = (first + i) * row_bytes + b * bb;
            let blk = &w[at..at + bb];
            ds[i] = f16_bits(blk, 0);
            let load = |from: usize| {
                let q = &blk[from..from + 16];
                // SAFETY: 16 bytes are in bounds (sliced); loadu has no alignment requirement.
                unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) }
            };
            match ty {
                GgmlType::Q8_0 => (lo[i], hi[i]) = (load(2), load(18)),
                _ => {
                    let q = if ty == GgmlType::Q4_1 {
                        ms[i] = f16_bits(blk, 2);
                        load(4)
                    } else {
                        load(2)
                    };
                    lo[i] = _mm_and_si128(q, nibble);
                    hi[i] = _mm_and_si128(_mm_srli_epi16(q, 4), nibble);
                }
            }
        }
        let pairs = tile.blocks[b].as_mut_slice();
        for (half, rows) in [lo, hi].into_iter().enumerate() {
            for (p, v) in transpose_words(rows).into_iter().enumerate() {
                pairs[half * 8 + p] = match ty {
                    GgmlType::Q8_0 => _mm256_cvtepi8_epi16(v),
                    GgmlType::Q4_0 => _mm256_sub_epi16(_mm256_cvtepu8_epi16(v), eight),
                    _ => _mm256_cvtepu8_epi16(v),
                };
            }
        }
        // Inserted lane by lane: eight narrow stores read back as one vector would stall on store forwarding.
        let halves = |h: [u16; 8]| {
            let h = h.map(|v| v as i16);
            _mm256_cvtph_ps(_mm_set_epi16(
                h[7], h[6], h[5], h[4], h[3], h[2], h[1], h[0],
            ))
        };
        tile.d[b] = halves(ds);
        if ty == GgmlType::Q4_1 {
            tile.m[b] = halves(ms);
        }
    }
}

/// Defines `$name::dot_rows`, the tiled product with one choice of the pairwise multiply-accumulate `$acc(s, w, x)`.
macro_rules! tiled_kernel {
    ($name:ident, $features:literal, |$s:ident, $w:ident, $x:ident| $acc:expr) => {
        pub(super) mod $name {
            use super::*;

            /// # Safety
            /// The CPU must have the instruction sets named in this function's target features; sizes as checked by
            /// `super::super::dot_rows`; `rows.len()` a multiple of [`TILE_ROWS`]. `ty` is Q4_0, Q4_1 or Q8_0.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn dot_rows(
                ty: GgmlType,
                w: &[u8],
                row_bytes: usize,
                rows: std::ops::Range<usize>,
                xs: &[&[ActBlock]],
                out: &mut [f32],
            ) {
                let blocks = row_bytes / ty.block_bytes();
                let n = xs.len();
                TILE.with(|t| {
                    let tile = &mut *t.borrow_mut();
                    for (ti, first) in rows.step_by(TILE_ROWS).enumerate() {
                        unpack(ty, w, row_bytes, first, blocks, tile);
                        for g in (0..n).step_by(GROUP) {
                            let xg = &xs[g..n.min(g + GROUP)];
                            let acc: [__m256; GROUP] = if ty == GgmlType::Q4_1 {
                                outputs::<true>(tile, xg)
                            } else {
                                outputs::<false>(tile, xg)
                            };
                            for (j, a) in acc.iter().take(xg.len()).enumerate() {
                                let mut lanes = [0f32; 8];
                                // SAFETY: eight f32 = 32 bytes; storeu has no alignment requirement.
                                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                                for (i, v) in lanes.into_iter().enumerate() {
                                    out[(ti * TILE_ROWS + i) * n + g + j] = v;
                                }
                            }
                        }
                    }
                });
            }

            /// The tile's eight outputs for each of up to [`GROUP`] activation rows (unused ones zero).
            #[inline]
            #[target_feature(enable = $features)]
            fn outputs<const MIN: bool>(tile: &Tile, xs: &[&[ActBlock]]) -> [__m256; GROUP] {
                fn pad<const N: usize>(a: [__m256; N]) -> [__m256; GROUP] {
                    // SAFETY: an all-zero bit pattern is a valid __m256.
                    std::array::from_fn(|j| {
                        if j < N {
                            a[j]
                        } else {
                            unsafe { std::mem::zeroed() }
                        }
                    })
                }
                match xs.len() {
                    1 => pad(group::<1, MIN>(tile, xs)),
                    2 => pad(group::<2, MIN>(tile, xs)),
                    3 => pad(group::<3, MIN>(tile, xs)),
                    _ => group::<GROUP, MIN>(tile, xs),
                }
            }

            /// The tile's eight outputs for each of `N` activation rows; `MIN`: add the Q4_1 minimum's term.
            #[inline]
            #[target_feature(enable = $features)]
            fn group<const N: usize, const MIN: bool>(
                tile: &Tile,
                xs: &[&[ActBlock]],
            ) -> [__m256; N] {
                let xs: [&[ActBlock]; N] = std::array::from_fn(|j| xs[j]);
                let mut acc = [_mm256_setzero_ps(); N];
                for (b, pairs) in tile.blocks.iter().enumerate() {
                    let x: [&ActBlock; N] = std::array::from_fn(|j| &xs[j][b]);
                    // Two integer accumulators per row (even and odd pairs) halve the dependency chains.
                    let (mut even, mut odd) =
                        ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
                    // The i32 holding elements 2p and 2p+1 of row j's activation block, in every lane.
                    // SAFETY: p < 16, so the read covers qs[2p..2p + 2]; qs opens a 32-byte aligned block.
                    let pair = |j: usize, p: usize| unsafe {
                        (x[j].qs.as_ptr() as *const i32).add(p).read()
                    };
                    for q in 0..8 {
                        let (w0, w1) = (pairs[2 * q], pairs[2 * q + 1]);
                        for j in 0..N {
                            let ($s, $w, $x) = (even[j], w0, _mm256_set1_epi32(pair(j, 2 * q)));
                            even[j] = $acc;
                            let ($s, $w, $x) = (odd[j], w1, _mm256_set1_epi32(pair(j, 2 * q + 1)));
                            odd[j] = $acc;
                        }
                    }
                    for j in 0..N {
                        let sum = _mm256_add_epi32(even[j], odd[j]);
                        let scale = _mm256_mul_ps(tile.d[b], _mm256_set1_ps(x[j].d));
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[j]);
                        if MIN {
                            acc[j] = _mm256_fmadd_ps(tile.m[b], _mm256_set1_ps(x[j].dsum), acc[j]);
                        }
                    }
                }
                acc
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
