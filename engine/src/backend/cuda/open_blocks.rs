//! Which pool entry each open kivi2 block holds: the host's bookkeeping behind [`super::kivi2::Kivi2Store`], with
//! no device work, so that it is tested on any machine.
//!
//! A step's rows each write one key. The block a row writes takes an entry if it has none: a zeroed one when the row
//! writes its slot 0, else one refilled from the block's codes (a block written from the host, by a transfer, then
//! decoded into). A row writing a block's last slot seals it in that step; its entry is handed out again from the
//! next step on (this step's kernels still use it). Each row also learns which block of its sequence stays open
//! after the step, and that block's entry: attention reads that block's keys from the entry.

use crate::backend::BatchLayout;
use std::collections::HashMap;

/// Words per row in the plan: the entry its key goes to, then its open block's index in its block table and that
/// block's entry.
pub const ROW_WORDS: usize = 3;

/// A row whose sequence has no open block after the step reads every block from codes.
pub const NONE: u32 = u32::MAX;

/// How an entry handed to a block must be filled before the step writes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Zeroed: the block starts afresh at slot 0.
    Zero,
    /// The block's keys so far, from its codes (every layer).
    FromCodes,
}

/// A step's assignment: the plan words, the entries to fill first, and how many entries the pool must hold.
#[derive(Debug, Default)]
pub struct StepEntries {
    pub words: Vec<u32>,
    /// (entry, block, how).
    pub fills: Vec<(u32, u32, Fill)>,
    pub entries: usize,
}

#[derive(Debug, Clone)]
pub struct OpenBlocks {
    block_size: u32,
    entry_of: HashMap<u32, u32>,
    free: Vec<u32>,
    /// Entries ever handed out (the pool holds at least this many).
    made: u32,
    /// Entries of blocks the last step sealed.
    sealing: Vec<u32>,
}

impl OpenBlocks {
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size: block_size as u32,
            entry_of: HashMap::new(),
            free: Vec::new(),
            made: 0,
            sealing: Vec::new(),
        }
    }

    /// The entry of `block`, while it is open.
    pub fn entry(&self, block: u32) -> Option<u32> {
        self.entry_of.get(&block).copied()
    }

    /// Blocks open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.entry_of.len()
    }

    /// Assigns the entries of a step writing `layout`'s rows.
    pub fn step(&mut self, layout: &BatchLayout) -> StepEntries {
        let bs = self.block_size;
        self.free.append(&mut self.sealing);
        let mut out = StepEntries {
            words: vec![NONE; ROW_WORDS * layout.slots.len()],
            ..Default::default()
        };
        // Every row writes its key, whether or not a sequence slice names it.
        for r in 0..layout.slots.len() {
            let (block, off) = (layout.slots[r] / bs, layout.slots[r] % bs);
            let entry = match self.entry_of.get(&block) {
                Some(&e) => e,
                None => {
                    let e = self.free.pop().unwrap_or_else(|| {
                        self.made += 1;
                        self.made - 1
                    });
                    let how = if off == 0 {
                        Fill::Zero
                    } else {
                        Fill::FromCodes
                    };
                    out.fills.push((e, block, how));
                    self.entry_of.insert(block, e);
                    e
                }
            };
            out.words[ROW_WORDS * r] = entry;
            if off + 1 == bs {
                self.entry_of.remove(&block);
                self.sealing.push(entry);
            }
        }
        for s in &layout.seqs {
            let rows = s.first_row..s.first_row + s.n_rows;
            // The block of the sequence's newest key stays open unless this step fills it.
            let Some(last) = rows.clone().last() else {
                continue;
            };
            let block = layout.slots[last] / bs;
            if let Some(&entry) = self.entry_of.get(&block) {
                let index = ((s.start_pos + s.n_rows - 1) / bs as usize) as u32;
                for r in rows {
                    out.words[ROW_WORDS * r + 1] = index;
                    out.words[ROW_WORDS * r + 2] = entry;
                }
            }
        }
        out.entries = self.made as usize;
        out
    }

    /// Frees the entries of blocks no sequence holds any more (their sequence ended before they filled).
    pub fn retire(&mut self, blocks: &[u32]) {
        for b in blocks {
            if let Some(e) = self.entry_of.remove(b) {
                self.free.push(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqSlice;

    /// A step of sequences given as (table, first position, rows), blocks of 16.
    fn step(seqs: &[(&[u32], usize, usize)]) -> BatchLayout {
        let mut l = BatchLayout::default();
        for &(table, start, n) in seqs {
            l.seqs.push(SeqSlice {
                first_row: l.tokens.len(),
                n_rows: n,
                start_pos: start,
                block_table: table.to_vec(),
            });
            for p in start..start + n {
                l.tokens.push(0);
                l.positions.push(p as u32);
                l.slots.push(table[p / 16] * 16 + (p % 16) as u32);
            }
        }
        l
    }

    fn row(s: &StepEntries, r: usize) -> [u32; 3] {
        s.words[ROW_WORDS * r..][..3].try_into().unwrap()
    }

    #[test]
    fn a_prefill_chunk_seals_its_full_blocks_and_leaves_the_last_open() {
        let mut o = OpenBlocks::new(16);
        // 40 tokens in blocks 7, 2, 9: 7 and 2 fill, 9 holds 8.
        let s = o.step(&step(&[(&[7, 2, 9], 0, 40)]));
        assert_eq!(s.entries, 3);
        assert_eq!(
            s.fills,
            vec![(0, 7, Fill::Zero), (1, 2, Fill::Zero), (2, 9, Fill::Zero)]
        );
        assert_eq!(row(&s, 0), [0, 2, 2]);
        assert_eq!(row(&s, 15), [0, 2, 2]);
        assert_eq!(row(&s, 16), [1, 2, 2]);
        assert_eq!(row(&s, 39), [2, 2, 2]);
        assert_eq!((o.open(), o.entry(9), o.entry(7)), (1, Some(2), None));
        // The next step reuses the sealed entries (the last one freed first).
        let s = o.step(&step(&[(&[7, 2, 9], 40, 1), (&[4], 0, 1)]));
        assert_eq!(s.fills, vec![(1, 4, Fill::Zero)]);
        assert_eq!((row(&s, 0), row(&s, 1)), ([2, 2, 2], [1, 0, 1]));
        assert_eq!(s.entries, 3, "no new entry was made");
    }

    #[test]
    fn a_decode_step_that_fills_a_block_reads_it_from_codes() {
        let mut o = OpenBlocks::new(16);
        o.step(&step(&[(&[5], 0, 15)]));
        let s = o.step(&step(&[(&[5], 15, 1)]));
        assert_eq!(row(&s, 0), [0, NONE, NONE]);
        assert!(s.fills.is_empty());
        assert_eq!(o.open(), 0);
        // Slot 0 of the next block: a fresh entry (the sealed one is free again).
        let s = o.step(&step(&[(&[5, 6], 16, 1)]));
        assert_eq!(s.fills, vec![(0, 6, Fill::Zero)]);
        assert_eq!(row(&s, 0), [0, 1, 0]);
    }

    #[test]
    fn a_block_written_past_slot_0_without_an_entry_is_refilled_from_codes() {
        let mut o = OpenBlocks::new(16);
        // A transferred prompt of 21 tokens (blocks 3, 1 written from the host), decoded into at position 21.
        let s = o.step(&step(&[(&[3, 1], 21, 1)]));
        assert_eq!(s.fills, vec![(0, 1, Fill::FromCodes)]);
        assert_eq!(row(&s, 0), [0, 1, 0]);
    }

    #[test]
    fn rows_no_sequence_names_still_get_entries() {
        let mut o = OpenBlocks::new(16);
        let layout = BatchLayout {
            tokens: vec![0; 3],
            positions: vec![3, 4, 5],
            slots: vec![35, 36, 47],
            ..Default::default()
        };
        let s = o.step(&layout);
        assert_eq!(s.fills, vec![(0, 2, Fill::FromCodes)]);
        assert_eq!(s.words, vec![0, NONE, NONE, 0, NONE, NONE, 0, NONE, NONE]);
        assert_eq!(o.open(), 0, "slot 15 sealed the block");
    }

    #[test]
    fn retired_blocks_give_their_entries_back() {
        let mut o = OpenBlocks::new(16);
        o.step(&step(&[(&[1], 0, 3), (&[2], 0, 5)]));
        assert_eq!(o.open(), 2);
        o.retire(&[1, 8]);
        assert_eq!((o.open(), o.entry(1), o.entry(2)), (1, None, Some(1)));
        let s = o.step(&step(&[(&[3], 0, 1)]));
        assert_eq!(s.fills, vec![(0, 3, Fill::Zero)]);
        assert_eq!(s.entries, 2);
    }
}
