//! KV codecs: how one block's K and V (`[kv_heads][block_size][head_dim]` f32 each) become bytes and back. The
//! transfer wire (kv-transfer/) and `tandem eval kv` both use exactly these functions, so the quality the eval
//! measures is the quality the cluster serves.
//!
//! | codec | K | V | bits per element (head_dim 64, block 16) |
//! |---|---|---|---|
//! | `none` | the cache dtype | same | 32 (f32) or 16 (f16) |
//! | `fp8` | E4M3, one f32 scale per head per block, after a Walsh-Hadamard turn | E4M3, one f32 scale per head per block | ~8.0 |
//! | `int8` | symmetric, f16 scale per token per head, after a Walsh-Hadamard turn | symmetric, per token per head | 8.25 |
//! | `int4` | asymmetric, f16 min and scale per 32 elements along head_dim, after a Walsh-Hadamard turn | asymmetric, per 32 elements | 5 |
//! | `kivi2` | 2-bit, f16 min and scale per channel over the block's tokens | 2-bit, per 32 elements along head_dim | 3.5 |
//!
//! `kivi2` follows KIVI (Liu et al., 2024: keys per channel, values per token): a block that is not full yet holds
//! a sequence's most recent tokens, whose key group has not filled, so it travels in f16, and so does the newest
//! full block before it (together KIVI's full-precision residual of recent tokens) and the sequence's first block,
//! which holds the attention sink ([`Place`]). Its keys are quantized in the frame of the block's first token
//! ([`KeyRotation`]: each key turned back by RoPE for its offset within the block), where a channel varies far less
//! across the block's tokens than in the cache's frame; the decoder turns them forward again.
//!
//! `fp8`, `int8` and `int4` turn each key by an orthonormal Walsh-Hadamard transform before quantizing it and turn
//! it back after decoding ([`spread`]), so that a key's few large channels do not widen the range of the groups (or
//! the scale of the vector) that hold them.
//!
//! Every codec zeroes the tokens of a block past its fill and encodes fixed-size output for a given shape and fill,
//! so a decoder checks one length before reading anything. Decoding never panics: a wrong length or a non-finite
//! scale is a [`CodecError`].

mod classes;
pub mod fp8;
mod packed;
pub mod rotation;
pub mod spread;

pub use classes::{ByteClass, CLASSES, PayloadModel};
pub use rotation::KeyRotation;

use super::KvFormat;

/// Dims per (min, scale) pair of int4 and of kivi2's values: the int4 cache format's group.
const GROUP: usize = super::INT4_GROUP;

/// How blocks are encoded for transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// The cache's own element type.
    #[default]
    None,
    Fp8,
    Int8,
    Int4,
    Kivi2,
}

impl Codec {
    pub const ALL: [Codec; 5] = [
        Codec::None,
        Codec::Fp8,
        Codec::Int8,
        Codec::Int4,
        Codec::Kivi2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Kivi2 => "kivi2",
        }
    }

    /// Whether keys are turned by the orthonormal Walsh-Hadamard transform before quantizing and turned back after
    /// decoding (fp8, int8, int4: [`spread`]; decision 0014).
    pub fn turns_keys(self) -> bool {
        matches!(self, Self::Fp8 | Self::Int8 | Self::Int4)
    }

    pub fn parse(s: &str) -> Result<Self, CodecError> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| CodecError::Unknown(s.to_string()))
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of one block of one layer's K (or V).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl BlockShape {
    pub fn elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown KV codec {0:?}: expected none, fp8, int8, int4 or kivi2")]
    Unknown(String),
    #[error("{codec} block is {got} bytes, expected {expected}")]
    Length {
        codec: Codec,
        expected: usize,
        got: usize,
    },
    #[error("block fill {fill} exceeds the block size {block_size}")]
    Fill { fill: usize, block_size: usize },
    #[error("{codec} block holds a non-finite {what}")]
    NonFinite { codec: Codec, what: &'static str },
}

/// Where a block sits in its sequence. kivi2 sends the first and the newest full block in f16; other codecs treat
/// every place alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Place {
    #[default]
    Middle,
    /// The sequence's first block. Its first tokens are the attention sink: every later query puts much of its
    /// attention there (Xiao et al. 2023, StreamingLLM), so an error in them reaches every token (IntactKV, Liu et
    /// al. 2024, keeps such tokens exact for the same reason).
    First,
    /// The sequence's newest full block: with the partial block after it, kivi2's full-precision residual of
    /// recent tokens (KIVI keeps 32 to 128).
    Newest,
}

/// How many of a block's tokens hold data, and where the block sits in its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub tokens: usize,
    pub place: Place,
}

impl Fill {
    /// A block in the middle of its sequence holding `tokens` tokens.
    pub fn middle(tokens: usize) -> Self {
        Self {
            tokens,
            place: Place::Middle,
        }
    }

    /// Block `i` of a sequence of `tokens` tokens in blocks of `block_size`.
    pub fn of_block(i: usize, tokens: usize, block_size: usize) -> Self {
        let place = if i == 0 {
            Place::First
        } else if i + 1 == tokens / block_size {
            Place::Newest
        } else {
            Place::Middle
        };
        Self {
            tokens: tokens.saturating_sub(i * block_size).min(block_size),
            place,
        }
    }
}

/// What every block of one stream shares: the codec, the element type `none` sends, the shape, and the model's key
/// rotation (which kivi2 undoes within a block).
#[derive(Debug, Clone, Copy)]
pub struct BlockCoding<'a> {
    pub codec: Codec,
    pub raw: KvFormat,
    pub shape: BlockShape,
    pub keys: &'a KeyRotation,
}

/// One block's K and V in the cache's layout, and which of its tokens hold data.
#[derive(Debug, Clone, Copy)]
pub struct BlockRef<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub fill: Fill,
}

/// Whether kivi2 sends a block in f16: one still filling (its key group is not complete), or the first or the
/// newest full one of its sequence.
fn kivi2_in_f16(shape: BlockShape, fill: Fill) -> bool {
    fill.tokens < shape.block_size || fill.place != Place::Middle
}

/// Bytes of one encoded block (K and V) of `shape` with `fill`.
pub fn encoded_len(codec: Codec, raw: KvFormat, shape: BlockShape, fill: Fill) -> usize {
    let (h, t, d) = (shape.kv_heads, shape.block_size, shape.head_dim);
    let groups32 = |per: fn(usize) -> usize| -> usize {
        (0..d.div_ceil(32))
            .map(|g| 4 + per((d - 32 * g).min(32)))
            .sum()
    };
    match codec {
        Codec::None => 2 * shape.elems() * raw.raw_wire().bytes_per_vector(1),
        Codec::Fp8 => 2 * h * (4 + t * d),
        Codec::Int8 => 2 * h * t * (2 + d),
        Codec::Int4 => 2 * h * t * groups32(|n| n.div_ceil(2)),
        Codec::Kivi2 if kivi2_in_f16(shape, fill) => 2 * shape.elems() * 2,
        Codec::Kivi2 => h * d * (4 + t.div_ceil(4)) + h * t * groups32(|n| n.div_ceil(4)),
    }
}

/// Appends the encoding of `block` to `out`. `block.k`/`block.v` have `shape.elems()` values.
pub fn encode_block(c: &BlockCoding<'_>, block: BlockRef<'_>, out: &mut Vec<u8>) {
    let (shape, raw) = (c.shape, c.raw);
    debug_assert!(block.k.len() == shape.elems() && block.v.len() == shape.elems());
    let fill = Fill {
        tokens: block.fill.tokens.min(shape.block_size),
        place: block.fill.place,
    };
    let tokens = fill.tokens;
    let start = out.len();
    match c.codec {
        Codec::None => {
            for half in [block.k, block.v] {
                packed::put_raw(raw, shape, tokens, half, out);
            }
        }
        Codec::Kivi2 if kivi2_in_f16(shape, fill) => {
            for half in [block.k, block.v] {
                packed::put_raw(KvFormat::F16, shape, tokens, half, out);
            }
        }
        Codec::Kivi2 => {
            debug_assert_eq!(c.keys.block_shape(), (shape.head_dim, shape.block_size));
            let mut framed = block.k.to_vec();
            c.keys.to_block_frame(&mut framed);
            packed::put_per_channel_2bit(shape, &framed, out);
            packed::put_groups(shape, tokens, block.v, 2, out);
        }
        Codec::Fp8 | Codec::Int8 | Codec::Int4 => {
            let mut turned = block.k.to_vec();
            spread::turn_all(&mut turned, shape.head_dim);
            for half in [&turned[..], block.v] {
                match c.codec {
                    Codec::Fp8 => packed::put_fp8(shape, tokens, half, out),
                    Codec::Int8 => packed::put_int8(shape, tokens, half, out),
                    _ => packed::put_groups(shape, tokens, half, 4, out),
                }
            }
        }
    }
    debug_assert_eq!(out.len() - start, encoded_len(c.codec, raw, shape, fill));
}

/// Decodes one block into `k` and `v` (`shape.elems()` each); tokens past the fill come out as zeros. `fill` must
/// be what the encoder was given (the transfer header carries it).
pub fn decode_block(
    c: &BlockCoding<'_>,
    fill: Fill,
    bytes: &[u8],
    k: &mut [f32],
    v: &mut [f32],
) -> Result<(), CodecError> {
    let (codec, raw, shape) = (c.codec, c.raw, c.shape);
    if fill.tokens > shape.block_size {
        return Err(CodecError::Fill {
            fill: fill.tokens,
            block_size: shape.block_size,
        });
    }
    let expected = encoded_len(codec, raw, shape, fill);
    if bytes.len() != expected || k.len() != shape.elems() || v.len() != shape.elems() {
        return Err(CodecError::Length {
            codec,
            expected,
            got: bytes.len(),
        });
    }
    let mut r = packed::Reader::new(bytes, codec);
    match codec {
        Codec::None => {
            r.raw(raw, k)?;
            r.raw(raw, v)?;
        }
        Codec::Kivi2 if kivi2_in_f16(shape, fill) => {
            r.raw(KvFormat::F16, k)?;
            r.raw(KvFormat::F16, v)?;
        }
        Codec::Kivi2 => {
            r.per_channel_2bit(shape, k)?;
            debug_assert_eq!(c.keys.block_shape(), (shape.head_dim, shape.block_size));
            c.keys.from_block_frame(k);
            r.groups(shape, 2, v)?;
        }
        Codec::Fp8 | Codec::Int8 | Codec::Int4 => {
            for half in [&mut *k, &mut *v] {
                match codec {
                    Codec::Fp8 => r.fp8(shape, half)?,
                    Codec::Int8 => r.int8(shape, half)?,
                    _ => r.groups(shape, 4, half)?,
                }
            }
            spread::turn_all(k, shape.head_dim);
        }
    }
    // Scales, minimums and raw elements were read from the wire: nothing non-finite reaches a cache.
    for half in [k, v] {
        packed::zero_past_fill(shape, fill.tokens, half);
        if half.iter().any(|x| !x.is_finite()) {
            return Err(CodecError::NonFinite {
                codec,
                what: "value",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
