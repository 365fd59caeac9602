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
pub mod quant;

pub use hash::{BlockHash, HashSeed, block_hashes};
pub use pool::{BlockId, BlockPool, KvEvent, PoolStats};
pub use quant::{ByteCode, INT4_GROUP};

use crate::error::{EngineError, Result};

/// Element format of the cache as stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvFormat {
    #[default]
    F32,
    F16,
    /// Symmetric int8 with one f16 scale per token per KV head (the `int8` codec's rule); attention dequantizes as
    /// it reads.
    Int8,
    /// E4M3 (FP8) with one f16 scale per token per KV head (`max |x| / 448`): int8's bytes, with a relative rather
    /// than absolute step, so small values of a vector with one large value keep their precision.
    Fp8,
    /// Asymmetric int4 in groups of 32 dims with an f16 min and scale each (the `int4` codec's rule): 5 bits per
    /// element, 3.2x fewer bytes than f16 at head_dim 128. Keys are stored turned by the Walsh-Hadamard transform
    /// ([`KvFormat::turns_keys`]).
    Int4,
    /// KIVI's 2-bit cache (Liu et al. 2024): each key channel quantized over a block's tokens (f16 min and scale per
    /// channel per block), each value per token in groups of 32 dims (f16 min and scale per group), 2-bit codes. A
    /// block's keys are quantized when the block fills; until then the open block's keys stay in f32 beside the
    /// cache (KIVI's full-precision residual of recent tokens). 3.5 bits per element at head_dim 64 and 16-token
    /// blocks: 1.43x the tokens of int4 in the same memory.
    Kivi2,
}

impl KvFormat {
    /// Bytes one token's K (or V) vector of one KV head takes where the format stores each vector on its own; for
    /// kivi2 a value vector (its keys' parameters belong to a whole block: [`KvFormat::block_head_bytes`]).
    pub fn bytes_per_vector(self, head_dim: usize) -> usize {
        match self {
            Self::F32 => 4 * head_dim,
            Self::F16 => 2 * head_dim,
            Self::Int8 | Self::Fp8 => head_dim + 2,
            Self::Int4 => head_dim.div_ceil(2) + 4 * head_dim.div_ceil(INT4_GROUP),
            Self::Kivi2 => head_dim.div_ceil(4) + 4 * head_dim.div_ceil(INT4_GROUP),
        }
    }

    /// Bytes one block of one KV head takes, K and V together.
    pub fn block_head_bytes(self, head_dim: usize, block_size: usize) -> usize {
        match self {
            // Keys: 2-bit codes of every token, and an f16 min and scale per channel; values as their vectors.
            Self::Kivi2 => {
                block_size * head_dim.div_ceil(4)
                    + 4 * head_dim
                    + block_size * self.bytes_per_vector(head_dim)
            }
            _ => 2 * block_size * self.bytes_per_vector(head_dim),
        }
    }
    /// Whether the cache stores each key turned by the orthonormal Walsh-Hadamard transform of
    /// [`codec::spread`] (int4: the turn spreads a key's few large channels over all of them, so its 32-dim groups
    /// get even ranges; decision 0014). Attention then turns each query the same way, which leaves every score as
    /// it was (`Hq . Hk = q . k`); values are stored as they are, so outputs need no turn back. Reading a block out
    /// of the cache (for transfer) turns its keys back.
    pub fn turns_keys(self) -> bool {
        self == Self::Int4
    }

    /// The element type a cache in this format sends uncompressed (codec `none`): its own for f32 and f16, f16 for
    /// the quantized formats (whose values f16 holds up to the rounding of their f16 scale and min).
    pub fn raw_wire(self) -> Self {
        match self {
            Self::Int8 | Self::Fp8 | Self::Int4 | Self::Kivi2 => Self::F16,
            f => f,
        }
    }
    pub const ALL: [KvFormat; 6] = [
        Self::F32,
        Self::F16,
        Self::Int8,
        Self::Fp8,
        Self::Int4,
        Self::Kivi2,
    ];

    /// The rule of a format of one byte per element and a scale per vector.
    pub fn byte_code(self) -> Option<quant::ByteCode> {
        match self {
            Self::Int8 => Some(quant::ByteCode::Int8),
            Self::Fp8 => Some(quant::ByteCode::Fp8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
            Self::Fp8 => "fp8",
            Self::Int4 => "int4",
            Self::Kivi2 => "kivi2",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                EngineError::invalid(format!(
                    "kv format {s:?}: expected f32, f16, int8, fp8, int4 or kivi2"
                ))
            })
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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
    /// The format and shape of one layer's blocks as a device link moves them (`f16:30x3x64x16`: layers, KV
    /// heads, head dim, block size); two caches with the same id can exchange staged blocks.
    pub fn staging_id(&self) -> String {
        format!(
            "{}:{}x{}x{}x{}",
            self.format, self.layers, self.kv_heads, self.head_dim, self.block_size
        )
    }
    /// Bytes one token occupies across all layers (K and V; kivi2's per-block key parameters shared out over the
    /// block's tokens, rounded down).
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_block() / self.block_size.max(1)
    }
    pub fn bytes_per_block(&self) -> usize {
        self.layers * self.kv_heads * self.format.block_head_bytes(self.head_dim, self.block_size)
    }
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_block() * self.num_blocks
    }
    /// Elements of one block of one layer's K (or V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}
