//! Sequences whose prompt K/V comes from outside the engine (a prefill worker) instead of a forward pass.
//!
//! Flow on the receiving side: [`Engine::add_sequence_for_transfer`] matches the local prefix cache and allocates
//! every block the rest of the prompt needs, before any byte arrives; [`Engine::write_transferred_block`] fills
//! them, accepting only blocks of that sequence past its cached prefix; [`Engine::complete_transfer`] marks the
//! prompt computed and commits its full blocks to the prefix cache. Removing the sequence at any point gives every
//! block back, so a failed or cancelled transfer strands nothing. On the sending side, [`KvView`] reads blocks
//! during a step, layer by layer.

use super::{Engine, SeqId, Sequence, commit_complete_blocks};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv::BlockId;
use crate::kv::codec::BlockShape;
use crate::kv::evict::{CompactBlock, KeepPlan};
use std::collections::HashMap;

/// Read access to the KV store while a step runs (handed to a step's layer observer).
pub struct KvView<'a, B: Backend> {
    backend: &'a B,
    kv: &'a B::KvStore,
    seqs: &'a HashMap<SeqId, Sequence>,
}

impl<'a, B: Backend> KvView<'a, B> {
    pub(super) fn new(
        backend: &'a B,
        kv: &'a B::KvStore,
        seqs: &'a HashMap<SeqId, Sequence>,
    ) -> Self {
        Self { backend, kv, seqs }
    }

    /// One block of `layer`: K and V, each `[kv_heads][block_size][head_dim]` as f32.
    pub fn read_block(&self, layer: usize, block: BlockId) -> (Vec<f32>, Vec<f32>) {
        self.backend.read_kv_block(self.kv, layer, block.0)
    }

    /// Several blocks of `layer`, in `blocks` order (a device backend copies them over at once).
    pub fn read_blocks(&self, layer: usize, blocks: &[BlockId]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        self.backend.read_kv_blocks(self.kv, layer, &ids)
    }

    /// The backend and the store, for a caller that moves blocks on the device itself (a GPU-to-GPU transfer
    /// stages them there rather than reading them to the host).
    pub fn device(&self) -> (&B, &B::KvStore) {
        (self.backend, self.kv)
    }

    /// Sends `layer` of `blocks` over a device link (decision 0015), after the kernels that stored them; returns
    /// the bytes sent.
    pub fn send_blocks(
        &self,
        link: &crate::backend::link::SenderLink,
        layer: usize,
        blocks: &[BlockId],
    ) -> Result<usize> {
        let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        self.backend.send_kv_blocks(self.kv, link, layer, &ids)
    }

    /// The physical id of `seq`'s logical block `index` (blocks of the running step are already allocated).
    pub fn seq_block(&self, seq: SeqId, index: usize) -> Option<BlockId> {
        self.seqs.get(&seq)?.blocks.get(index).copied()
    }
}

/// Where a transferred prompt's K/V must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTarget {
    pub seq: SeqId,
    /// Leading blocks of the prompt already served from the local prefix cache (not transferred).
    pub cached_blocks: usize,
    /// Blocks to fill, for the prompt's blocks `cached_blocks..`, in order.
    pub blocks: Vec<BlockId>,
}

impl<B: Backend> Engine<B> {
    /// Starts a sequence for `prompt` whose uncached K/V will be written by [`Engine::write_transferred_block`];
    /// allocates all its blocks now (all or nothing).
    pub fn add_sequence_for_transfer(&mut self, prompt: &[u32]) -> Result<TransferTarget> {
        let seq = self.add_sequence(prompt)?;
        let bs = self.layout.block_size;
        let s = self.seqs.get_mut(&seq).expect("just added");
        let cached_blocks = s.blocks.len();
        let need = prompt.len().div_ceil(bs) - cached_blocks;
        match self.pool.allocate(need) {
            Ok(fresh) => {
                s.blocks.extend_from_slice(&fresh);
                Ok(TransferTarget {
                    seq,
                    cached_blocks,
                    blocks: fresh,
                })
            }
            Err(e) => {
                self.remove_sequence(seq)?;
                Err(e)
            }
        }
    }

    /// Starts a sequence for `prompt` whose K/V arrives evicted down to `kept` tokens (compacted into consecutive
    /// slots, see [`crate::kv::evict`]); allocates their blocks now (all or nothing). Nothing comes from the prefix
    /// cache, and nothing this sequence computes enters it. Decoding continues at the prompt's true positions.
    pub fn add_sequence_evicted(&mut self, prompt: &[u32], kept: usize) -> Result<TransferTarget> {
        self.validate_prompt(prompt)?;
        if kept == 0 || kept > prompt.len() {
            return Err(EngineError::invalid(format!(
                "eviction keeps {kept} tokens of a {}-token prompt; it must keep 1..={}",
                prompt.len(),
                prompt.len()
            )));
        }
        let bs = self.layout.block_size;
        let blocks = self.pool.allocate(kept.div_ceil(bs))?;
        let mut s = Sequence::new(prompt.to_vec(), Vec::new(), Vec::new(), bs);
        s.blocks = blocks.clone();
        s.evicted = prompt.len() - kept;
        s.shareable = false;
        let seq = self.insert(s);
        Ok(TransferTarget {
            seq,
            cached_blocks: 0,
            blocks,
        })
    }

    /// `seq`'s prompt K/V of `layer` as [`KeepPlan`] compacts it, block by block.
    pub fn compact_layer(
        &self,
        seq: SeqId,
        plan: &KeepPlan,
        layer: usize,
    ) -> Result<Vec<CompactBlock>> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        let l = &self.layout;
        if plan.prompt_len > s.kv_len
            || s.evicted != 0
            || plan.kv_heads != l.kv_heads
            || layer >= l.layers
        {
            return Err(EngineError::invalid(format!(
                "cannot compact sequence {}: plan for {} tokens and {} KV heads, layer {layer}",
                seq.0, plan.prompt_len, plan.kv_heads
            )));
        }
        let full: Vec<(Vec<f32>, Vec<f32>)> = s.blocks[..plan.prompt_len.div_ceil(l.block_size)]
            .iter()
            .map(|b| self.backend.read_kv_block(&self.kv, layer, b.0))
            .collect();
        let shape = BlockShape {
            kv_heads: l.kv_heads,
            block_size: l.block_size,
            head_dim: l.head_dim,
        };
        Ok((0..plan.kept.div_ceil(l.block_size))
            .map(|i| {
                let (mut k, mut v) = (vec![0f32; shape.elems()], vec![0f32; shape.elems()]);
                let fill = plan.compact_block(layer, i, shape, |b| &full[b], &mut k, &mut v);
                CompactBlock { k, v, fill }
            })
            .collect())
    }

    /// Writes one transferred block of `layer` into `seq`'s block `block`, which must be one of the blocks
    /// [`Engine::add_sequence_for_transfer`] returned for it.
    pub fn write_transferred_block(
        &mut self,
        seq: SeqId,
        layer: usize,
        block: BlockId,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.write_transferred_blocks(seq, layer, &[block], &[(k, v)])
    }

    /// Writes transferred blocks of `layer` into `seq`'s blocks `blocks` (each one of the blocks
    /// [`Engine::add_sequence_for_transfer`] returned for it), `data` (K, V) in `blocks` order; all are checked
    /// before any is written.
    pub fn write_transferred_blocks(
        &mut self,
        seq: SeqId,
        layer: usize,
        blocks: &[BlockId],
        data: &[(&[f32], &[f32])],
    ) -> Result<()> {
        let ids = self.check_transfer_write(seq, layer, blocks)?;
        if data.len() != blocks.len() {
            return Err(EngineError::invalid(format!(
                "{} blocks of data for {} destination blocks",
                data.len(),
                blocks.len()
            )));
        }
        let n = self.layout.block_elems();
        if let Some((k, v)) = data.iter().find(|(k, v)| k.len() != n || v.len() != n) {
            return Err(EngineError::invalid(format!(
                "block data has {} K and {} V elements; the layout needs {n}",
                k.len(),
                v.len()
            )));
        }
        self.backend
            .write_kv_blocks(&mut self.kv, layer, &ids, data);
        Ok(())
    }

    /// Writes a payload received over a device link (decision 0015) into `seq`'s blocks `blocks` of `layer`,
    /// checked as for [`Engine::write_transferred_blocks`].
    pub fn write_staged_blocks(
        &mut self,
        seq: SeqId,
        layer: usize,
        blocks: &[BlockId],
        payload: crate::backend::link::DevicePayload,
    ) -> Result<()> {
        let ids = self.check_transfer_write(seq, layer, blocks)?;
        self.backend
            .write_staged_blocks(&mut self.kv, layer, &ids, payload)
    }

    /// Device links of this engine's backend (decision 0015), if it has any.
    pub fn device_links(&self) -> Option<std::sync::Arc<dyn crate::backend::link::DeviceLinks>> {
        self.backend.device_links()
    }

    /// Checks a write of transferred blocks: `seq` waits for K/V, every block is one of its destinations and named
    /// once, `layer` exists. Returns the block ids.
    fn check_transfer_write(
        &self,
        seq: SeqId,
        layer: usize,
        blocks: &[BlockId],
    ) -> Result<Vec<u32>> {
        let bs = self.layout.block_size;
        let s = self
            .seqs
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        if s.kv_len == s.tokens.len() {
            return Err(EngineError::invalid(format!(
                "sequence {} is not waiting for transferred K/V",
                seq.0
            )));
        }
        if let Some(block) = blocks
            .iter()
            .find(|b| !s.blocks[s.kv_len / bs..].contains(b))
        {
            return Err(EngineError::invalid(format!(
                "block {} is not a transfer destination of sequence {}",
                block.0, seq.0
            )));
        }
        // A block named twice would be written twice at once on a device (which copy wins is not defined).
        let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(EngineError::invalid(format!(
                "block {} is named twice in one write",
                w[0]
            )));
        }
        if layer >= self.layout.layers {
            return Err(EngineError::invalid(format!(
                "layer {layer} out of range (model has {})",
                self.layout.layers
            )));
        }
        Ok(ids)
    }

    /// Marks `seq`'s whole prompt as computed (its K/V was written) and, when that K/V is `exact` (what a forward
    /// pass here would have stored, not a lossy codec's approximation), offers its full blocks to the prefix cache.
    /// A sequence with approximate K/V never shares its blocks, so no later request inherits the approximation.
    /// Called once every block of every layer arrived; the caller keeps that count.
    pub fn complete_transfer(&mut self, seq: SeqId, exact: bool) -> Result<()> {
        let bs = self.layout.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq.0))?;
        s.kv_len = s.tokens.len();
        s.shareable &= exact;
        commit_complete_blocks(s, &mut self.pool, self.config.hash_seed, bs);
        Ok(())
    }
}
