//! The interleaved weight layout the CPU's tiled dot kernels read, made once at load.
//!
//! In a GGUF file each weight row is a run of blocks. The tiled kernel ([`super::dot`]) wants, for every pair of
//! elements of a block, the eight rows of a group side by side, so that one 16-byte load becomes one register of
//! eight rows' element pairs. Building that order on every decode step cost about a fifth of a batched step (word
//! transposes) and kept batch 1 on the per-row kernel; storing it at load costs one pass over the weights and no
//! memory (the same bytes, reordered), the way llama.cpp's repacked CPU formats do.
//!
//! Rows are taken eight at a time ([`GROUP_ROWS`]). Within a group, block `b` of all eight rows is one run of
//! `8 * block_bytes` bytes: first each f16 header field (the scale, then Q4_1's minimum) of rows 0..8, then for each
//! 16-bit word of the block's quants, that word of rows 0..8. Q4 words hold elements `2w, 2w + 1` in their low
//! nibbles and `16 + 2w, 17 + 2w` in their high ones; Q8_0 words hold elements `2w, 2w + 1`. Groups occupy the same
//! byte range as their rows did, and rows past the last whole group keep the file layout.

use super::GgmlType;

/// Weight rows per interleaved group.
pub const GROUP_ROWS: usize = 8;

/// How a matrix's bytes are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As in the model file: row after row.
    File,
    /// Groups of [`GROUP_ROWS`] rows interleaved as this module describes.
    Interleaved,
}

/// Header bytes (f16 fields) and 16-bit quant words of one block of `ty`, or `None` when `ty` has no interleaved
/// layout.
pub fn block_parts(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q4_0 => Some((2, 8)),
        GgmlType::Q4_1 => Some((4, 8)),
        GgmlType::Q8_0 => Some((2, 16)),
        _ => None,
    }
}

/// Whether `ty` has an interleaved layout.
pub fn supports(ty: GgmlType) -> bool {
    block_parts(ty).is_some()
}

/// Rows of a `rows`-row matrix that lie in whole interleaved groups (the rest keep the file layout).
pub fn grouped_rows(rows: usize) -> usize {
    rows / GROUP_ROWS * GROUP_ROWS
}

/// Where byte `at` of block `b` of row `r` (within its group: `r < GROUP_ROWS`) goes, for a block with `header`
/// header bytes. `at` is even and addresses a 16-bit field or word.
fn offset_in_group_block(header: usize, r: usize, at: usize) -> usize {
    if at < header {
        (at / 2) * 2 * GROUP_ROWS + 2 * r
    } else {
        header * GROUP_ROWS + ((at - header) / 2) * 2 * GROUP_ROWS + 2 * r
    }
}

/// `src` (a `row_bytes`-per-row matrix of `ty` in the file layout) in the interleaved layout.
///
/// # Panics
/// If `ty` has no interleaved layout or `src` is not a whole number of rows (callers check both at load).
pub fn interleave(ty: GgmlType, src: &[u8], row_bytes: usize) -> Vec<u8> {
    let (header, _) = block_parts(ty).expect("interleave: type without an interleaved layout");
    assert!(
        row_bytes > 0 && src.len().is_multiple_of(row_bytes),
        "interleave: partial row"
    );
    let bb = ty.block_bytes();
    let grouped = grouped_rows(src.len() / row_bytes) * row_bytes;
    let mut out = src.to_vec();
    for (dst, rows) in out[..grouped]
        .chunks_exact_mut(GROUP_ROWS * row_bytes)
        .zip(src[..grouped].chunks_exact(GROUP_ROWS * row_bytes))
    {
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let base = b * GROUP_ROWS * bb;
                for at in (0..bb).step_by(2) {
                    let to = base + offset_in_group_block(header, r, at);
                    dst[to..to + 2].copy_from_slice(&blk[at..at + 2]);
                }
            }
        }
    }
    out
}

/// Row `r` of an interleaved matrix, in the file layout, into `out` (`row_bytes` long).
pub fn read_row(ty: GgmlType, packed: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    let (header, _) = block_parts(ty).expect("read_row: type without an interleaved layout");
    let src = &packed[r * row_bytes..(r + 1) * row_bytes];
    if r >= grouped_rows(packed.len() / row_bytes) {
        out.copy_from_slice(src);
        return;
    }
    let (group, within) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let g = &packed[group * GROUP_ROWS * row_bytes..(group + 1) * GROUP_ROWS * row_bytes];
    let bb = ty.block_bytes();
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let base = b * GROUP_ROWS * bb;
        for at in (0..bb).step_by(2) {
            let from = base + offset_in_group_block(header, within, at);
            blk[at..at + 2].copy_from_slice(&g[from..from + 2]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_reads_back_as_in_the_file() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            // 19 rows: two groups and three rows that keep the file layout; 3 blocks per row.
            let row_bytes = 3 * ty.block_bytes();
            let src: Vec<u8> = (0..19 * row_bytes).map(|i| (i * 131 % 251) as u8).collect();
            let packed = interleave(ty, &src, row_bytes);
            assert_eq!(packed.len(), src.len());
            assert_ne!(
                packed[..16 * row_bytes],
                src[..16 * row_bytes],
                "{ty}: grouped rows moved"
            );
            assert_eq!(packed[16 * row_bytes..], src[16 * row_bytes..]);
            let mut row = vec![0u8; row_bytes];
            for r in 0..19 {
                read_row(ty, &packed, row_bytes, r, &mut row);
                assert_eq!(row, src[r * row_bytes..(r + 1) * row_bytes], "{ty} row {r}");
            }
        }
    }

    #[test]
    fn a_group_block_starts_with_the_rows_scales_then_their_first_quant_words() {
        let ty = GgmlType::Q4_1;
        let row_bytes = ty.block_bytes();
        let src: Vec<u8> = (0..8 * row_bytes).map(|i| i as u8).collect();
        let packed = interleave(ty, &src, row_bytes);
        // Scales (bytes 0..2 of each row), minimums (2..4), then quant word 0 (bytes 4..6) of rows 0..8.
        for r in 0..8 {
            let row = r * row_bytes;
            assert_eq!(packed[2 * r..2 * r + 2], src[row..row + 2]);
            assert_eq!(packed[16 + 2 * r..18 + 2 * r], src[row + 2..row + 4]);
            assert_eq!(packed[32 + 2 * r..34 + 2 * r], src[row + 4..row + 6]);
        }
    }
}
