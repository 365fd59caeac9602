//! What each byte of an encoded block is, so that an entropy coder can model the kinds apart.
//!
//! A codec's payload interleaves quantized codes with the f16 (or f32) parameters they are read with, and the two
//! have nothing in common statistically: codes cluster around the middle of their range (more so for outlier-heavy
//! key channels), while an f16's high byte (sign, exponent) takes a few values and its low byte looks random. The
//! transfer's entropy stage keeps one frequency table per [`ByteClass`]; this module walks the same layout as the
//! encoders (`packed`) and names the class of every byte, in payload order, for any codec, fill and place.
//!
//! int4 keys are named by channel as well: a key byte holds the 4-bit codes of two neighbouring dims, and a
//! channel's codes follow that channel's own distribution token after token (outlier channels at the ends of the
//! range, quiet ones in the middle), so the entropy stage codes each with its channel's table.

use super::{BlockShape, Codec, Fill, GROUP, encoded_len, kivi2_in_f16};
use crate::kv::KvFormat;

/// The kind of one payload byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ByteClass {
    /// A byte of a key's packed codes (fp8, int8, int4 or 2-bit).
    KeyCode = 0,
    /// A byte of a value's packed codes.
    ValueCode = 1,
    /// The low byte of an f16 minimum (asymmetric codecs).
    MinLow = 2,
    /// The high byte of an f16 minimum.
    MinHigh = 3,
    /// The low byte of an f16 scale, or one of the three low bytes of an f32 scale (fp8).
    ScaleLow = 4,
    /// The high byte of an f16 or f32 scale.
    ScaleHigh = 5,
    /// The low byte of a raw f16 element, or one of the three low bytes of an f32 (`none`, kivi2's f16 blocks).
    RawLow = 6,
    /// The high byte of a raw element.
    RawHigh = 7,
    /// A byte of int4 key codes, coded as two 4-bit codes by the tables of their channels
    /// ([`PayloadModel::channels`]) rather than by a byte table.
    KeyNibbles = 8,
}

/// Number of byte classes coded by byte tables (all but [`ByteClass::KeyNibbles`]).
pub const CLASSES: usize = 8;

/// The classes of a payload's bytes, and for each [`ByteClass::KeyNibbles`] byte, in payload order, the channel
/// context of its low code (its high code's is the next): `head * head_dim + dim`. (With an odd head_dim the last
/// byte of a head holds one code and a zero pad, whose context is the next index: the next head's first channel, or
/// the extra context `kv_heads * head_dim` after the last head.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PayloadModel {
    pub classes: Vec<u8>,
    /// One per [`ByteClass::KeyNibbles`] byte (not per byte: a chunk's model stays about the payload's size).
    pub channels: Vec<u32>,
    /// One more than the largest channel context named (0: none).
    channel_count: usize,
}

impl PayloadModel {
    /// A payload of bytes of these classes only (none of them [`ByteClass::KeyNibbles`]).
    pub fn of_byte_classes(classes: Vec<u8>) -> Self {
        debug_assert!(!classes.contains(&(ByteClass::KeyNibbles as u8)));
        Self {
            classes,
            channels: Vec::new(),
            channel_count: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.classes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
    /// Channel contexts the payload names (each with its own table).
    pub fn channel_tables(&self) -> usize {
        self.channel_count
    }

    fn push(&mut self, class: ByteClass, n: usize) {
        self.classes.extend(std::iter::repeat_n(class as u8, n));
    }

    /// Appends the model of one encoded block (`encoded_len` bytes: K, then V).
    pub fn push_block(&mut self, codec: Codec, raw: KvFormat, shape: BlockShape, fill: Fill) {
        use ByteClass::*;
        let (h, t, d) = (shape.kv_heads, shape.block_size, shape.head_dim);
        let start = self.len();
        // A run's f16 min and f16 scale.
        let params = |m: &mut Self| {
            for class in [MinLow, MinHigh, ScaleLow, ScaleHigh] {
                m.push(class, 1);
            }
        };
        // Runs of `n` values at `bits` bits: the parameters, then the codes.
        let run = |m: &mut Self, code: ByteClass, n: usize, bits: usize| {
            params(m);
            m.push(code, (n * bits).div_ceil(8));
        };
        let raw_half = |m: &mut Self, fmt: KvFormat| {
            let per = fmt.raw_wire().bytes_per_vector(1);
            for _ in 0..shape.elems() {
                m.push(RawLow, per - 1);
                m.push(RawHigh, 1);
            }
        };
        // Per head, per token, per group of 32 dims (int4, kivi2's values).
        let groups = |m: &mut Self, code: ByteClass, bits: usize| {
            for _ in 0..h * t {
                for g in (0..d).step_by(GROUP) {
                    run(m, code, (d - g).min(GROUP), bits);
                }
            }
        };
        match codec {
            Codec::None => (0..2).for_each(|_| raw_half(self, raw)),
            Codec::Kivi2 if kivi2_in_f16(shape, fill) => {
                (0..2).for_each(|_| raw_half(self, KvFormat::F16))
            }
            Codec::Kivi2 => {
                for _ in 0..h * d {
                    run(self, KeyCode, t, 2);
                }
                groups(self, ValueCode, 2);
            }
            Codec::Fp8 => {
                for code in [KeyCode, ValueCode] {
                    for _ in 0..h {
                        self.push(ScaleLow, 3);
                        self.push(ScaleHigh, 1);
                        self.push(code, t * d);
                    }
                }
            }
            Codec::Int8 => {
                for code in [KeyCode, ValueCode] {
                    for _ in 0..h * t {
                        self.push(ScaleLow, 1);
                        self.push(ScaleHigh, 1);
                        self.push(code, d);
                    }
                }
            }
            Codec::Int4 => {
                // Keys: each code byte (dims 2j, 2j + 1 of its group) named by its channels.
                for head in 0..h {
                    for _ in 0..t {
                        for g in (0..d).step_by(GROUP) {
                            params(self);
                            for dim in (g..d.min(g + GROUP)).step_by(2) {
                                self.push(KeyNibbles, 1);
                                self.channels.push((head * d + dim) as u32);
                            }
                        }
                    }
                }
                self.channel_count = self.channel_count.max(h * d + 1);
                groups(self, ValueCode, 4);
            }
        }
        debug_assert_eq!(self.len() - start, encoded_len(codec, raw, shape, fill));
    }
}
