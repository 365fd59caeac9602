//! Tensor element types of GGUF/ggml files and the arithmetic on them.
//!
//! Owns the block layouts (documented in the GGUF specification and ggml's `ggml-common.h`), scalar
//! dequantization of every supported type (`dequant`), quantization of activations to 16-bit integer blocks (`actq`), and the
//! SIMD dot products that let the decode path read quantized weights directly (`dot`). Weights are never expanded
//! to f32 wholesale: decode is bound by the bytes it reads, and a 4-bit weight is 8x fewer bytes than f32.

pub mod actq;
pub mod dequant;
pub mod dot;
pub mod interleave;

use crate::error::{EngineError, Result};

/// The element types this engine reads. The discriminants are ggml's type ids as stored in GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    BF16 = 30,
}

impl GgmlType {
    /// Maps a GGUF type id; ids of types this engine does not implement give a clear error.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => {
                let name = match other {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 => "an IQ type",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    _ => "an unknown type",
                };
                return Err(EngineError::UnsupportedModel(format!(
                    "tensor type id {other} ({name}); supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"
                )));
            }
        })
    }

    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of a row of `elems` elements, or an error when `elems` is not a whole number of blocks.
    pub fn row_bytes(self, elems: usize) -> Result<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return Err(EngineError::malformed(format!(
                "row of {elems} elements is not a multiple of the {self:?} block size {}",
                self.block_elems()
            )));
        }
        Ok(elems / self.block_elems() * self.block_bytes())
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
