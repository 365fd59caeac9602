//! A step's layout on the GPU. Everything a forward pass reads per step (token ids, KV slots, positions and the
//! RoPE frequencies, each row's context length and block table, the logit rows and their draws, the prefill
//! attention tiles) is packed on the host into
//! one array of 32-bit words and copied in one transfer into a device buffer that is reused from step to step and
//! only ever grows. Kernels get raw pointers into it, so a recorded decode step (a CUDA graph, see `graphs.rs`)
//! reads the next step's values from the same addresses.

use super::module::PREFILL_TILE_ROWS;
use crate::backend::BatchLayout;
use crate::model::config::{RopeConfig, RopeLayout};
use crate::sampling::Draw;

/// Sequences with more rows than this in one step use the tiled prefill attention kernel; decode steps (one row
/// per sequence, or a few for speculative checks) use the flash-decoding kernel.
pub const PREFILL_MIN_ROWS: usize = 8;

/// Device addresses (into the plan buffer) and sizes of one step.
pub struct CudaPlan {
    pub rows: usize,
    pub tokens: u64,
    pub slots: u64,
    pub positions: u64,
    pub inv_freq: u64,
    pub row_ctx: u64,
    pub row_table: u64,
    pub tables: u64,
    /// kivi2's words per row ([`super::open_blocks::ROW_WORDS`]: where its key goes, which block stays open), or 0 when
    /// the step was planned without a kivi2 store.
    pub k2rows: u64,
    pub logit_rows: u64,
    pub n_logit_rows: usize,
    /// Each logit row's draw (`struct Draw` of `sample.cu`, seven words), for a step whose head samples. A draw
    /// finds its penalties by an offset from this address: they lie in the last part, whose place and length
    /// change from step to step.
    pub draws: u64,
    /// Prefill attention tiles: first row and row count of each (empty for a decode step).
    pub tile_row0: u64,
    pub tile_rows: u64,
    pub n_tiles: usize,
    /// Power-of-two bucket of the longest context in 64-key chunks (capped at [`MAX_SPLITS`]): decode attention
    /// splits no row into more parts than this, and a recorded step is valid for its bucket only.
    pub ctx_bucket: usize,
    pub half_dim: usize,
    pub interleaved: i32,
}

/// The most key splits of one row's decode attention.
pub const MAX_SPLITS: usize = 128;

/// Parts of the packed words.
const PARTS: usize = 13;

/// The host side of a plan: the packed words and where each part starts (in words).
pub struct Packed {
    pub words: Vec<u32>,
    offsets: [usize; PARTS],
    pub rows: usize,
    pub n_logit_rows: usize,
    pub n_tiles: usize,
    pub ctx_bucket: usize,
    has_k2: bool,
    half_dim: usize,
    interleaved: i32,
}

impl Packed {
    /// `k2rows`: a kivi2 store's words for the step's rows ([`super::kivi2::Kivi2Store::prepare`]).
    pub fn new(
        layout: &BatchLayout,
        rope: &RopeConfig,
        head_dim: usize,
        k2rows: Option<&[u32]>,
    ) -> Self {
        let inv: Vec<u32> = rope
            .inv_freq(head_dim)
            .iter()
            .map(|f| f.to_bits())
            .collect();
        let n = layout.tokens.len();
        let mut row_ctx = vec![0u32; n];
        let mut row_table = vec![0u32; n];
        let mut tables = Vec::new();
        let (mut tile_row0, mut tile_rows) = (Vec::new(), Vec::new());
        let prefill = layout.seqs.iter().any(|s| s.n_rows > PREFILL_MIN_ROWS);
        for s in &layout.seqs {
            let off = tables.len() as u32;
            tables.extend_from_slice(&s.block_table);
            for i in 0..s.n_rows {
                row_ctx[s.first_row + i] = (s.start_pos + i + 1) as u32;
                row_table[s.first_row + i] = off;
            }
            if prefill {
                for first in (0..s.n_rows).step_by(PREFILL_TILE_ROWS) {
                    tile_row0.push((s.first_row + first) as u32);
                    tile_rows.push((s.n_rows - first).min(PREFILL_TILE_ROWS) as u32);
                }
            }
        }
        let logit_rows: Vec<u32> = layout.logit_rows.iter().map(|&r| r as u32).collect();
        // Each draw's penalties as (token, repetition, subtract) words, one run per draw; a draw's offset to its
        // run counts from the penalties part here, from the draws part once the parts' places are known (below).
        let mut penalties = Vec::new();
        let mut draws = Vec::with_capacity(layout.draws.len() * DRAW_WORDS);
        for d in &layout.draws {
            draws.extend(draw_words(d, penalties.len() as u32));
            for p in &d.penalties {
                penalties.extend([p.token, p.repetition.to_bits(), p.subtract.to_bits()]);
            }
        }
        // The block tables and the penalties come last: their lengths change from step to step (a sequence
        // crossing a block boundary, a new token to penalize), and a recorded decode step reads every other part
        // from the address it had when recorded, so those must depend on the step's shape alone.
        let parts: [&[u32]; PARTS] = [
            &layout.tokens,
            &layout.slots,
            &layout.positions,
            &inv,
            &row_ctx,
            &row_table,
            &logit_rows,
            &draws,
            &tile_row0,
            &tile_rows,
            k2rows.unwrap_or_default(),
            &tables,
            &penalties,
        ];
        let mut words = Vec::new();
        let mut offsets = [0; PARTS];
        for (i, part) in parts.iter().enumerate() {
            // Every part starts on a 16-byte boundary.
            words.resize(words.len().next_multiple_of(4), 0);
            offsets[i] = words.len();
            words.extend_from_slice(part);
        }
        words.resize(words.len().max(1), 0);
        // A draw's penalty offset counts words from the start of the draws part.
        for i in 0..layout.draws.len() {
            let at = offsets[7] + i * DRAW_WORDS + 5;
            words[at] += (offsets[12] - offsets[7]) as u32;
        }
        let max_ctx = row_ctx.iter().copied().max().unwrap_or(0) as usize;
        Self {
            ctx_bucket: max_ctx.div_ceil(64).next_power_of_two().min(MAX_SPLITS),
            words,
            offsets,
            rows: n,
            n_logit_rows: logit_rows.len(),
            n_tiles: tile_row0.len(),
            has_k2: k2rows.is_some(),
            half_dim: head_dim / 2,
            interleaved: i32::from(rope.layout == RopeLayout::Interleaved),
        }
    }

    /// The plan once the words are at device address `base`.
    pub fn at(&self, base: u64) -> CudaPlan {
        let p = |i: usize| base + 4 * self.offsets[i] as u64;
        CudaPlan {
            rows: self.rows,
            tokens: p(0),
            slots: p(1),
            positions: p(2),
            inv_freq: p(3),
            row_ctx: p(4),
            row_table: p(5),
            logit_rows: p(6),
            n_logit_rows: self.n_logit_rows,
            draws: p(7),
            tile_row0: p(8),
            tile_rows: p(9),
            k2rows: if self.has_k2 { p(10) } else { 0 },
            tables: p(11),
            n_tiles: self.n_tiles,
            ctx_bucket: self.ctx_bucket,
            half_dim: self.half_dim,
            interleaved: self.interleaved,
        }
    }
}

/// 32-bit words of the device's `struct Draw`.
const DRAW_WORDS: usize = 7;

/// A draw as the device's `struct Draw` (its fields in declaration order), its penalties starting at word
/// `first_penalty` of the penalties part (made an offset from the draws part by [`Packed::new`]).
fn draw_words(d: &Draw, first_penalty: u32) -> [u32; DRAW_WORDS] {
    [
        d.temperature.to_bits(),
        d.top_k,
        d.top_p.to_bits(),
        d.min_p.to_bits(),
        d.u.to_bits(),
        first_penalty,
        d.penalties.len() as u32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqSlice;
    use crate::model::Head;

    /// A decode step of `seqs` sequences, sequence `i` at context `ctx[i]` (one row each), blocks of 16.
    fn decode_step(ctx: &[usize]) -> BatchLayout {
        let seqs = ctx
            .iter()
            .enumerate()
            .map(|(i, &c)| SeqSlice {
                first_row: i,
                n_rows: 1,
                start_pos: c - 1,
                block_table: (0..c.div_ceil(16) as u32)
                    .map(|b| 100 * i as u32 + b)
                    .collect(),
            })
            .collect();
        BatchLayout {
            tokens: vec![7; ctx.len()],
            positions: ctx.iter().map(|&c| c as u32 - 1).collect(),
            slots: vec![0; ctx.len()],
            seqs,
            logit_rows: (0..ctx.len()).collect(),
            head: Head::Argmax,
            draws: Vec::new(),
            capturable: true,
        }
    }

    #[test]
    fn a_decode_steps_parts_stay_put_while_its_block_tables_grow() {
        let rope = RopeConfig {
            theta: 10_000.0,
            layout: RopeLayout::Halves,
            freq_factors: None,
        };
        // Same shape (three rows, three logit rows, one context bucket), 4 vs 10 table entries.
        let (a, b) = (decode_step(&[16, 17, 30]), decode_step(&[40, 60, 63]));
        // With a kivi2 store's words (three per row), which a recorded step reads where they were recorded too.
        let words = [1u32; 9];
        let (pa, pb) = (
            Packed::new(&a, &rope, 64, Some(&words)),
            Packed::new(&b, &rope, 64, Some(&words)),
        );
        assert_eq!(pa.ctx_bucket, pb.ctx_bucket);
        let (pa, pb) = (pa.at(0), pb.at(0));
        for (name, x, y) in [
            ("tokens", pa.tokens, pb.tokens),
            ("slots", pa.slots, pb.slots),
            ("positions", pa.positions, pb.positions),
            ("inv_freq", pa.inv_freq, pb.inv_freq),
            ("row_ctx", pa.row_ctx, pb.row_ctx),
            ("row_table", pa.row_table, pb.row_table),
            ("logit_rows", pa.logit_rows, pb.logit_rows),
            ("draws", pa.draws, pb.draws),
            ("tables", pa.tables, pb.tables),
            ("k2rows", pa.k2rows, pb.k2rows),
        ] {
            assert_eq!(x, y, "{name} moved between two steps of the same shape");
        }
        assert_ne!(pa.k2rows, 0, "the kivi2 words are in the plan");
    }

    #[test]
    fn each_draw_finds_its_own_penalties_from_the_draws_part() {
        use crate::sampling::Penalty;
        let rope = RopeConfig {
            theta: 10_000.0,
            layout: RopeLayout::Halves,
            freq_factors: None,
        };
        let pen = |token| Penalty {
            token,
            repetition: 1.5,
            subtract: 0.25 * token as f32,
        };
        let draw = |penalties: Vec<Penalty>| Draw {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            u: 0.5,
            penalties,
        };
        let mut a = decode_step(&[16, 17, 30]);
        a.head = Head::Sample;
        a.draws = vec![draw(vec![pen(5), pen(9)]), draw(vec![]), draw(vec![pen(3)])];
        let mut b = decode_step(&[40, 60, 63]);
        b.head = Head::Sample;
        b.draws = vec![
            draw(vec![pen(1)]),
            draw(vec![pen(2), pen(4), pen(6)]),
            draw(vec![]),
        ];
        let (pa, pb) = (
            Packed::new(&a, &rope, 64, None),
            Packed::new(&b, &rope, 64, None),
        );
        assert_eq!(pa.at(0).draws, pb.at(0).draws, "the draws part moved");
        for (p, layout) in [(&pa, &a), (&pb, &b)] {
            let base = p.at(0).draws as usize / 4;
            for (i, d) in layout.draws.iter().enumerate() {
                let w = &p.words[base + i * DRAW_WORDS..base + (i + 1) * DRAW_WORDS];
                assert_eq!(w[6] as usize, d.penalties.len());
                for (j, want) in d.penalties.iter().enumerate() {
                    let e = base + w[5] as usize + 3 * j;
                    assert_eq!(p.words[e], want.token);
                    assert_eq!(f32::from_bits(p.words[e + 1]), want.repetition);
                    assert_eq!(f32::from_bits(p.words[e + 2]), want.subtract);
                }
            }
        }
    }
}
