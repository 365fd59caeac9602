//! One layer's K or V for every block, in the cache's element format, and the only code that knows those formats.
//!
//! The store is a sequence of `head_dim`-long vectors (one per block, KV head and slot, laid out
//! `[block][kv_head][slot]`). `f32` and `f16` hold the values; `int8` and `fp8` hold each vector as one byte per
//! element under one f16 scale ([`ByteCode`]: 8.25 bits per element at head_dim 64), so the same memory holds 3.9x
//! the tokens of `f32`; `int4` holds each vector in 4-bit codes with an f16 min and scale per 32 dims
//! (the `int4` codec's rule, 5 bits per element), 6.4x the tokens of `f32`; an int4 key store holds each key turned
//! ([`KvFormat::turns_keys`]). kivi2 holds values by the same group rule at 2 bits, and keys as [`KeyChannels`]:
//! per block and KV head, 2-bit codes per token under an f16 min and scale per channel, quantized when the block's
//! last slot is written; until then that block's keys wait in f32 beside the codes. Decode attention reads f32, f16,
//! int8, fp8 and int4 stores where they lie ([`KvBuf::elements`]); everything else reads a range of vectors as f32 through
//! [`KvBuf::read`], which dequantizes on the fly into a tile's scratch: nothing is ever expanded cache-wide. Every
//! buffer is its own anonymous mapping on huge pages where the kernel grants them ([`super::pages`]).

use super::attention::kernels::E4m3;
use super::pages::Pages;
use crate::kv::KvFormat;
use crate::kv::codec::{KeyRotation, spread};
use crate::kv::quant::{
    ByteCode, INT4_GROUP, dequantize_channels, dequantize_groups, quantize_channels,
    quantize_groups,
};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::collections::HashMap;

pub enum KvBuf {
    F32(Pages<f32>),
    F16(Pages<f16>),
    /// int8 or fp8: a byte per element and an f16 scale per vector.
    Bytes {
        code: ByteCode,
        q: Pages<u8>,
        scale: Pages<f16>,
    },
    /// Per vector: `head_dim * bits / 8` bytes of codes (`bits` 4: int4; 2: kivi2's values), and (min, scale) per
    /// group of 32 dims; `turned`: each vector was turned before it was quantized (an int4 key store).
    Groups {
        bits: u8,
        q: Pages<u8>,
        params: Pages<f16>,
        turned: bool,
    },
    /// kivi2's keys.
    Channels(KeyChannels),
}

/// A store's elements, borrowed as they lie ([`KvBuf::elements`]).
pub enum Elements<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// The int8 format: a vector is its codes times its scale.
    Int8(&'a [i8], &'a [f16]),
    /// The fp8 format: a vector is its E4M3 codes' values times its scale.
    Fp8(&'a [E4m3], &'a [f16]),
    /// The int4 format: per vector `head_dim / 2` bytes of codes (two per byte, low nibble first) and a (min,
    /// scale) pair per 32 dims; a vector is `min + scale * code` group by group.
    Int4(&'a [u8], &'a [f16]),
}

/// kivi2's key store. Vectors are addressed as in every store (`[block][kv_head][slot]`); a run of `block_size`
/// of them (one block of one KV head, a "block head") shares one f16 (min, scale) per channel, so its codes can be
/// computed only once all its slots are written. Until then its keys are `open`: kept in f32 and read from there.
/// Writing a block head's last slot quantizes it and drops the f32 copy; writing its slot 0 starts it afresh;
/// writing a later slot of a quantized block head (a partial block received from a transfer, then decoded into)
/// opens it again from its dequantized keys. [`KeyChannels::retire`] drops the open keys of blocks whose sequence
/// ended before they filled.
pub struct KeyChannels {
    block_size: usize,
    head_dim: usize,
    /// Keys are quantized in the frame of their block's first token (as the `kivi2` codec's are), where a
    /// channel varies far less across the block than RoPE makes it vary in the cache's frame.
    frame: KeyRotation,
    /// Per vector: `head_dim / 4` bytes of codes.
    q: Pages<u8>,
    /// Per block head: (min, scale) per channel.
    params: Pages<f16>,
    open: HashMap<usize, Vec<f32>>,
}

/// Which half of the cache a store holds: keys are turned where the format says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Keys,
    Values,
}

impl KvBuf {
    /// Room for `vectors` vectors of `head_dim` elements, zeroed, in blocks of `block_size` slots.
    pub fn new(
        format: KvFormat,
        half: Half,
        vectors: usize,
        head_dim: usize,
        frame: &KeyRotation,
    ) -> std::io::Result<Self> {
        let n = vectors * head_dim;
        Ok(match format {
            KvFormat::F32 => Self::F32(Pages::zeroed(n)?),
            KvFormat::F16 => Self::F16(Pages::zeroed(n)?),
            KvFormat::Int8 | KvFormat::Fp8 => Self::Bytes {
                code: format.byte_code().expect("a byte format"),
                q: Pages::zeroed(n)?,
                scale: Pages::zeroed(vectors)?,
            },
            KvFormat::Int4 => Self::groups(4, vectors, head_dim, half == Half::Keys)?,
            KvFormat::Kivi2 if half == Half::Values => Self::groups(2, vectors, head_dim, false)?,
            KvFormat::Kivi2 => Self::Channels(KeyChannels {
                block_size: frame.block_shape().1,
                head_dim,
                frame: frame.clone(),
                q: Pages::zeroed(vectors * head_dim.div_ceil(4))?,
                params: Pages::zeroed(vectors.div_ceil(frame.block_shape().1) * 2 * head_dim)?,
                open: HashMap::new(),
            }),
        })
    }

    fn groups(bits: u8, vectors: usize, head_dim: usize, turned: bool) -> std::io::Result<Self> {
        Ok(Self::Groups {
            bits,
            q: Pages::zeroed(vectors * (head_dim * bits as usize).div_ceil(8))?,
            params: Pages::zeroed(vectors * 2 * head_dim.div_ceil(INT4_GROUP))?,
            turned,
        })
    }

    /// Stores `src` (a whole number of vectors) starting at vector `at`.
    pub fn write(&mut self, at: usize, hd: usize, src: &[f32]) {
        let e = at * hd;
        match self {
            Self::F32(b) => b[e..e + src.len()].copy_from_slice(src),
            Self::F16(b) => b[e..e + src.len()].convert_from_f32_slice(src),
            Self::Bytes { code, q, scale } => {
                for (i, x) in src.chunks_exact(hd).enumerate() {
                    scale[at + i] = code.quantize(x, &mut q[e + i * hd..e + (i + 1) * hd]);
                }
            }
            Self::Groups {
                bits,
                q,
                params,
                turned,
            } => {
                let (cb, pb) = (
                    (hd * *bits as usize).div_ceil(8),
                    2 * hd.div_ceil(INT4_GROUP),
                );
                let mut y = if *turned { vec![0f32; hd] } else { Vec::new() };
                for (i, x) in src.chunks_exact(hd).enumerate() {
                    let v = at + i;
                    let x = if *turned {
                        y.copy_from_slice(x);
                        spread::turn(&mut y);
                        &y[..]
                    } else {
                        x
                    };
                    let (q, p) = (
                        &mut q[v * cb..(v + 1) * cb],
                        &mut params[v * pb..(v + 1) * pb],
                    );
                    match bits {
                        2 => quantize_groups::<2>(x, q, p),
                        _ => quantize_groups::<4>(x, q, p),
                    }
                }
            }
            Self::Channels(c) => c.write(at, src),
        }
    }

    /// Drops what the store keeps for blocks no sequence holds any more (kivi2's open keys).
    pub fn retire(&mut self, blocks: &[u32], kv_heads: usize) {
        if let Self::Channels(c) = self {
            c.retire(blocks, kv_heads);
        }
    }

    /// Whether the vectors are stored turned (attention then turns its queries).
    pub fn turned(&self) -> bool {
        matches!(self, Self::Groups { turned: true, .. })
    }

    /// Reads `dst.len() / hd` vectors starting at vector `at` into `dst` as the values written, turned back where
    /// they are stored turned (for moving blocks out; attention reads them as stored).
    pub fn read_written(&self, at: usize, hd: usize, dst: &mut [f32]) {
        self.read(at, hd, dst);
        if self.turned() {
            spread::turn_all(dst, hd);
        }
    }

    /// Reads `dst.len() / hd` vectors starting at vector `at` into `dst` as f32, as stored.
    pub fn read(&self, at: usize, hd: usize, dst: &mut [f32]) {
        let e = at * hd;
        match self {
            Self::F32(b) => dst.copy_from_slice(&b[e..e + dst.len()]),
            Self::F16(b) => b[e..e + dst.len()].convert_to_f32_slice(dst),
            Self::Bytes { code, q, scale } => {
                for (i, d) in dst.chunks_exact_mut(hd).enumerate() {
                    code.dequantize(&q[e + i * hd..e + (i + 1) * hd], scale[at + i], d);
                }
            }
            Self::Groups {
                bits, q, params, ..
            } => {
                let (cb, pb) = (
                    (hd * *bits as usize).div_ceil(8),
                    2 * hd.div_ceil(INT4_GROUP),
                );
                for (i, d) in dst.chunks_exact_mut(hd).enumerate() {
                    let v = at + i;
                    let (q, p) = (&q[v * cb..(v + 1) * cb], &params[v * pb..(v + 1) * pb]);
                    match bits {
                        2 => dequantize_groups::<2>(q, p, d),
                        _ => dequantize_groups::<4>(q, p, d),
                    }
                }
            }
            Self::Channels(c) => c.read(at, dst),
        }
    }

    /// The store's elements as they lie, where attention reads them in place (every format but kivi2).
    pub fn elements(&self) -> Option<Elements<'_>> {
        match self {
            Self::F32(b) => Some(Elements::F32(b)),
            Self::F16(b) => Some(Elements::F16(b)),
            Self::Bytes {
                code: ByteCode::Int8,
                q,
                scale,
            } => {
                // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid for both.
                let codes = unsafe { std::slice::from_raw_parts(q.as_ptr().cast::<i8>(), q.len()) };
                Some(Elements::Int8(codes, scale))
            }
            Self::Bytes {
                code: ByteCode::Fp8,
                q,
                scale,
            } => {
                // SAFETY: E4m3 is a transparent u8.
                let codes =
                    unsafe { std::slice::from_raw_parts(q.as_ptr().cast::<E4m3>(), q.len()) };
                Some(Elements::Fp8(codes, scale))
            }
            Self::Groups {
                bits: 4, q, params, ..
            } => Some(Elements::Int4(q, params)),
            Self::Groups { .. } | Self::Channels(_) => None,
        }
    }
}

impl KeyChannels {
    fn code_bytes(&self) -> usize {
        self.head_dim.div_ceil(4)
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        let (bs, hd) = (self.block_size, self.head_dim);
        for (i, x) in src.chunks_exact(hd).enumerate() {
            let (bh, slot) = ((at + i) / bs, (at + i) % bs);
            let mut keys = match self.open.remove(&bh) {
                Some(keys) if slot > 0 => keys,
                None if slot > 0 => {
                    let mut keys = vec![0.0; bs * hd];
                    self.dequantize(bh, &mut keys);
                    keys
                }
                _ => vec![0.0; bs * hd],
            };
            keys[slot * hd..(slot + 1) * hd].copy_from_slice(x);
            if slot + 1 < bs {
                self.open.insert(bh, keys);
            } else {
                self.frame.to_block_frame(&mut keys);
                let cb = self.code_bytes();
                quantize_channels(
                    &keys,
                    hd,
                    &mut self.q[bh * bs * cb..(bh + 1) * bs * cb],
                    &mut self.params[bh * 2 * hd..(bh + 1) * 2 * hd],
                );
            }
        }
    }

    /// Vectors `at..` into `dst`: from the open keys where their block head is open, else from the codes.
    fn read(&self, at: usize, dst: &mut [f32]) {
        let (bs, hd) = (self.block_size, self.head_dim);
        let (mut v, mut rest) = (at, dst);
        while !rest.is_empty() {
            let (bh, slot) = (v / bs, v % bs);
            let n = (bs - slot).min(rest.len() / hd);
            let (run, tail) = std::mem::take(&mut rest).split_at_mut(n * hd);
            rest = tail;
            match self.open.get(&bh) {
                Some(keys) => run.copy_from_slice(&keys[slot * hd..(slot + n) * hd]),
                // A whole block head turns forward in place; part of one is cut from its whole.
                None if n == bs => self.dequantize(bh, run),
                None => {
                    let mut whole = vec![0f32; bs * hd];
                    self.dequantize(bh, &mut whole);
                    run.copy_from_slice(&whole[slot * hd..(slot + n) * hd]);
                }
            }
            v += n;
        }
    }

    /// Block head `bh`'s keys from its codes, turned forward out of the block's frame.
    fn dequantize(&self, bh: usize, out: &mut [f32]) {
        let (bs, hd, cb) = (self.block_size, self.head_dim, self.code_bytes());
        dequantize_channels(
            &self.q[bh * bs * cb..(bh + 1) * bs * cb],
            &self.params[bh * 2 * hd..(bh + 1) * 2 * hd],
            hd,
            out,
        );
        self.frame.from_block_frame(out);
    }

    fn retire(&mut self, blocks: &[u32], kv_heads: usize) {
        for &b in blocks {
            for h in 0..kv_heads {
                self.open.remove(&(b as usize * kv_heads + h));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(head_dim: usize, block_size: usize) -> KeyRotation {
        let rope = crate::model::RopeConfig {
            theta: 10_000.0,
            layout: crate::model::RopeLayout::Halves,
            freq_factors: None,
        };
        KeyRotation::new(&rope, head_dim, block_size)
    }

    #[test]
    fn every_format_round_trips_within_its_precision() {
        let hd = 8;
        let src: Vec<f32> = (0..3 * hd).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        for (format, tol) in [
            (KvFormat::F32, 0.0),
            (KvFormat::F16, 5.0 / 1024.0),
            (KvFormat::Int8, 5.0 / 127.0),
            // Half a step of E4M3 (1/16 relative) of values up to 5.
            (KvFormat::Fp8, 5.0 / 16.0),
            // Half a step of a group spanning about [-5, 5], plus the min's f16 rounding.
            (KvFormat::Int4, 10.0 / 15.0 / 2.0 + 5e-3),
            // 2-bit values: half a step of a group spanning about [-5, 5].
            (KvFormat::Kivi2, 10.0 / 3.0 / 2.0 + 5e-3),
        ] {
            let mut b = KvBuf::new(format, Half::Values, 10, hd, &frame(hd, 16)).expect("map");
            b.write(4, hd, &src);
            let mut out = vec![0f32; src.len()];
            b.read(4, hd, &mut out);
            for (a, o) in src.iter().zip(&out) {
                assert!((a - o).abs() <= tol, "{format:?}: {a} vs {o}");
            }
            // Neighbouring vectors stay zero.
            let mut before = vec![1f32; hd];
            b.read(3, hd, &mut before);
            assert!(before.iter().all(|&x| x == 0.0), "{format:?}");
        }
        // An all-zero vector quantizes to zeros, not NaN.
        for format in [
            KvFormat::Int8,
            KvFormat::Fp8,
            KvFormat::Int4,
            KvFormat::Kivi2,
        ] {
            let mut b = KvBuf::new(format, Half::Keys, 1, hd, &frame(hd, 16)).expect("map");
            b.write(0, hd, &vec![0.0; hd]);
            let mut out = vec![1f32; hd];
            b.read(0, hd, &mut out);
            assert!(out.iter().all(|&x| x == 0.0), "{format:?}");
        }
    }

    #[test]
    fn an_int4_key_store_holds_turned_keys_and_gives_back_the_written_ones() {
        // A key with one large channel: turned, the 32-dim groups get even ranges, so the round trip is closer.
        let hd = 64;
        let mut key: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.9).sin() * 0.3).collect();
        key[3] = 12.0;
        let (mut keys, mut values) = (
            KvBuf::new(KvFormat::Int4, Half::Keys, 2, hd, &frame(hd, 16)).expect("map"),
            KvBuf::new(KvFormat::Int4, Half::Values, 2, hd, &frame(hd, 16)).expect("map"),
        );
        assert!(keys.turned() && !values.turned());
        assert!(
            !KvBuf::new(KvFormat::Int8, Half::Keys, 1, hd, &frame(hd, 16))
                .expect("map")
                .turned()
        );
        keys.write(1, hd, &key);
        values.write(1, hd, &key);
        let (mut stored, mut back, mut plain) = (vec![0f32; hd], vec![0f32; hd], vec![0f32; hd]);
        keys.read(1, hd, &mut stored);
        keys.read_written(1, hd, &mut back);
        values.read_written(1, hd, &mut plain);
        let mut turned = key.clone();
        spread::turn(&mut turned);
        let err = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // As stored: the turned key, within a step of its (even) groups.
        assert!(err(&stored, &turned) < 0.15, "{}", err(&stored, &turned));
        // Read back: the key itself, and closer (in length of the error) than the unturned store gets.
        let l2 = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt()
        };
        let (t, p) = (l2(&back, &key), l2(&plain, &key));
        assert!(t < p * 0.75, "{t} vs {p}");
    }

    #[test]
    fn kivi2_keys_stay_exact_until_their_block_fills_then_quantize_in_the_blocks_frame() {
        // 2 blocks of 4 slots, 2 KV heads, head_dim 8: vectors [block][head][slot]. The keys of one block are
        // RoPE turns (by their offset in the block) of one key with a large channel, plus a little noise: in the
        // block's frame each channel barely moves, while in the cache's frame the large channel sweeps its pair.
        let (hd, bs, heads) = (8, 4, 2);
        let rot = frame(hd, bs);
        let mut block: Vec<f32> = (0..bs * hd)
            .map(|i| {
                let (t, d) = (i / hd, i % hd);
                let base = if d == 5 { 30.0 } else { (d as f32).sin() };
                base + 0.05 * ((t * 7 + d) as f32).cos()
            })
            .collect();
        rot.from_block_frame(&mut block);
        let key = |t: usize, d: usize| block[t * hd + d];
        let mut b = KvBuf::new(
            KvFormat::Kivi2,
            Half::Keys,
            2 * heads * bs,
            hd,
            &frame(hd, bs),
        )
        .expect("map");
        let at = |block: usize, h: usize, slot: usize| (block * heads + h) * bs + slot;
        let mut out = vec![0f32; hd];
        // Block 1, head 1: three slots written one at a time read back exactly (open).
        for t in 0..3 {
            let x: Vec<f32> = (0..hd).map(|d| key(t, d)).collect();
            b.write(at(1, 1, t), hd, &x);
            b.read(at(1, 1, t), hd, &mut out);
            assert_eq!(out, x, "slot {t}");
        }
        // The last slot quantizes the block head in its frame: every key comes back within the noise's step
        // (plus the f16 rounding of a min near 30), though in the cache's frame channel 1 spans several units.
        let x: Vec<f32> = (0..hd).map(|d| key(3, d)).collect();
        b.write(at(1, 1, 3), hd, &x);
        let mut all = vec![0f32; bs * hd];
        b.read(at(1, 1, 0), hd, &mut all);
        let span = (0..bs).map(|t| key(t, 1)).fold(0f32, f32::max)
            - (0..bs).map(|t| key(t, 1)).fold(f32::MAX, f32::min);
        assert!(span > 5.0, "{span}");
        for t in 0..bs {
            for d in 0..hd {
                let err = (all[t * hd + d] - key(t, d)).abs();
                assert!(err <= 0.05, "slot {t} dim {d}: {err}");
            }
        }
        assert!(
            all != (0..bs * hd)
                .map(|i| key(i / hd, i % hd))
                .collect::<Vec<_>>()
        );
        // The neighbouring block head (block 1, head 0) was never written: zeros, and reading across the
        // boundary takes each side from its own place.
        let mut across = vec![1f32; 2 * hd];
        b.read(at(1, 0, 3), hd, &mut across);
        assert!(across[..hd].iter().all(|&v| v == 0.0));
        assert_eq!(&across[hd..], &all[..hd]);
        // Writing slot 1 of the quantized block head opens it again from its dequantized keys.
        let y = vec![0.25f32; hd];
        b.write(at(1, 1, 1), hd, &y);
        let mut reopened = vec![0f32; bs * hd];
        b.read(at(1, 1, 0), hd, &mut reopened);
        assert_eq!(&reopened[..hd], &all[..hd]);
        assert_eq!(&reopened[hd..2 * hd], &y[..]);
        assert_eq!(&reopened[2 * hd..], &all[2 * hd..]);
        // Retiring block 1 drops the open keys: the block head reads its last codes again.
        b.retire(&[1], heads);
        b.read(at(1, 1, 0), hd, &mut reopened);
        assert_eq!(reopened, all);
        // Slot 0 starts a block head afresh: the slots after it read as zeros until written.
        b.write(at(1, 1, 0), hd, &y);
        b.read(at(1, 1, 0), hd, &mut reopened);
        assert_eq!(&reopened[..hd], &y[..]);
        assert!(reopened[hd..].iter().all(|&v| v == 0.0));
    }
}
