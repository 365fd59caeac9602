//! The interleaved weight layout the CPU's tiled dot kernels read, made once at load.
//!
//! In a GGUF file each weight row is a run of blocks. The tiled kernel ([`super::dot`]) wants, for every pair of
//! elements of a block, the eight rows of a group side by side, so that one 16-byte load becomes one register of
//! eight rows' element pairs. Building that order on every decode step cost about a fifth of a batched step (word
//! transposes) and kept batch 1 on the per-row kernel; storing it at load costs one pass over the weights and no
//! memory (the same bytes, reordered), the way llama.cpp's repacked CPU formats do.
//!
//! Rows are taken eight at a time ([`GROUP_ROWS`]). Within a group, block `b` of all eight rows is one run of
//! `8 * block_bytes` bytes holding the rows' blocks as a transposed matrix of 16-bit fields: field `f` (byte `2f`
//! of the block: the f16 scale, Q4_1's f16 minimum, then the quant words) of rows 0..8 side by side. So a block run
//! starts with the eight scales, and each quant word of the eight rows fills 16 bytes: Q4 words hold elements
//! `2w, 2w + 1` in their low nibbles and `16 + 2w, 17 + 2w` in their high ones; Q8_0 words hold elements `2w, 2w + 1`.
//! Groups occupy the same byte range as their rows did, and rows past the last whole group keep the file layout.

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

/// Whether `ty` has an interleaved layout (the types of the integer dot kernels).
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Rows of a `rows`-row matrix that lie in whole interleaved groups (the rest keep the file layout).
pub fn grouped_rows(rows: usize) -> usize {
    rows / GROUP_ROWS * GROUP_ROWS
}

/// Where 16-bit field `f` of row `r` (within its group) lies in a group block.
fn field_offset(r: usize, f: usize) -> usize {
    2 * (f * GROUP_ROWS + r)
}

/// `src` (a `row_bytes`-per-row matrix of `ty` in the file layout) in the interleaved layout.
///
/// # Panics
/// If `ty` has no interleaved layout or `src` is not a whole number of rows (callers check both at load).
pub fn interleave(ty: GgmlType, src: &[u8], row_bytes: usize) -> Vec<u8> {
    assert!(
        supports(ty),
        "interleave: type without an interleaved layout"
    );
    assert!(
        row_bytes > 0 && src.len().is_multiple_of(row_bytes),
        "interleave: partial row"
    );
    let grouped = grouped_rows(src.len() / row_bytes) * row_bytes;
    let mut out = src.to_vec();
    for (dst, rows) in out[..grouped]
        .chunks_exact_mut(GROUP_ROWS * row_bytes)
        .zip(src[..grouped].chunks_exact(GROUP_ROWS * row_bytes))
    {
        transpose_group(ty, row_bytes, |r, at, f| {
            let to = field_offset(r, f);
            dst[at + to..at + to + 2]
                .copy_from_slice(&rows[r * row_bytes + at / GROUP_ROWS + 2 * f..][..2]);
        });
    }
    out
}

/// Calls `visit(row, group_block_start, field)` for every 16-bit field of every block of a group's rows.
fn transpose_group(ty: GgmlType, row_bytes: usize, mut visit: impl FnMut(usize, usize, usize)) {
    let bb = ty.block_bytes();
    for b in 0..row_bytes / bb {
        for r in 0..GROUP_ROWS {
            for f in 0..bb / 2 {
                visit(r, b * GROUP_ROWS * bb, f);
            }
        }
    }
}

/// The rows of one interleaved group (`8 * row_bytes` bytes) in the file layout, into `out` (as long).
pub fn read_group(ty: GgmlType, group: &[u8], row_bytes: usize, out: &mut [u8]) {
    assert!(
        supports(ty),
        "read_group: type without an interleaved layout"
    );
    assert_eq!(
        group.len(),
        GROUP_ROWS * row_bytes,
        "read_group: not one group"
    );
    assert_eq!(out.len(), group.len(), "read_group: output size");
    transpose_group(ty, row_bytes, |r, at, f| {
        let from = at + field_offset(r, f);
        let to = r * row_bytes + at / GROUP_ROWS + 2 * f;
        out[to] = group[from];
        out[to + 1] = group[from + 1];
    });
}

/// Row `r` of an interleaved matrix, in the file layout, into `out` (`row_bytes` long).
pub fn read_row(ty: GgmlType, packed: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    assert!(supports(ty), "read_row: type without an interleaved layout");
    if r >= grouped_rows(packed.len() / row_bytes) {
        out.copy_from_slice(&packed[r * row_bytes..(r + 1) * row_bytes]);
        return;
    }
    let (group, within) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let g = &packed[group * GROUP_ROWS * row_bytes..(group + 1) * GROUP_ROWS * row_bytes];
    let bb = ty.block_bytes();
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let base = b * GROUP_ROWS * bb;
        for f in 0..bb / 2 {
            let from = base + field_offset(within, f);
            blk[2 * f..2 * f + 2].copy_from_slice(&g[from..from + 2]);
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
            let mut group = vec![0u8; 8 * row_bytes];
            read_group(
                ty,
                &packed[8 * row_bytes..16 * row_bytes],
                row_bytes,
                &mut group,
            );
            assert_eq!(
                group,
                src[8 * row_bytes..16 * row_bytes],
                "{ty} second group"
            );
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
