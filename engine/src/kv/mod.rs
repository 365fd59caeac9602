//! The paged KV cache: block ids, their reference counts, and the prefix cache that lets sequences share blocks.
//!
//! Follows vLLM's PagedAttention design: K/V of every layer live in fixed blocks of `block_size` tokens; a
//! sequence owns a block table (logical block -> physical id); complete blocks are named by a hash chain over their
//! tokens (`hash`), so a later sequence with the same prefix maps the same physical blocks. Freed blocks keep their
//! hash and stay reusable until the pool needs them back (LRU eviction, as vLLM's `BlockPool`). This module owns
//! only ids and bookkeeping; the bytes live in the backend's `KvStore`, laid out by [`KvLayout`].

pub mod codec;
pub mod evict;
pub mod hash;
pub mod pool;

pub use hash::{BlockHash, HashSeed, block_hashes};
pub use pool::{BlockId, BlockPool, KvEvent, PoolStats};

use crate::error::{EngineError, Result};

/// Element format of the cache as stored on the device. Compressed formats join this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvFormat {
    #[default]
    F32,
    F16,
}

impl KvFormat {
    pub fn bytes_per_elem(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(EngineError::invalid(format!(
                "kv format {other:?}: expected f32 or f16"
            ))),
        }
    }
}

/// Shape of the paged store: per layer, K and V each hold `num_blocks x kv_heads x block_size x head_dim` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub format: KvFormat,
}

impl KvLayout {
    /// Bytes one token occupies across all layers (K and V).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.format.bytes_per_elem()
    }
    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * self.block_size
    }
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_block() * self.num_blocks
    }
    /// Elements of one block of one layer's K (or V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}
