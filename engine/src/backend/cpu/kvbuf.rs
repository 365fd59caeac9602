//! One layer's K or V for every block, in the cache's element format, and the only code that knows those formats.
//!
//! The store is a sequence of `head_dim`-long vectors (one per block, KV head and slot, laid out
//! `[block][kv_head][slot]`). `f32` and `f16` hold the values; `int8` and `fp8` hold each vector as one byte per
//! element under one f16 scale ([`ByteCode`]: 8.25 bits per element at head_dim 64), so the same memory holds 3.9x
//! the tokens of `f32`; `int4` holds each vector in 4-bit codes with an f16 min and scale per 32 dims
//! (the `int4` codec's rule, 5 bits per element), 6.4x the tokens of `f32`; an int4 key store holds each key turned
//! ([`KvFormat::turns_keys`]). Attention reads a range of vectors as f32, as stored, through [`KvBuf::read`], which
//! dequantizes on the fly into its tile scratch: nothing is ever expanded cache-wide.

use crate::kv::KvFormat;
use crate::kv::codec::spread;
use crate::kv::quant::{ByteCode, INT4_GROUP, dequantize_int4, quantize_int4};
use half::f16;
use half::slice::HalfFloatSliceExt;

pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// int8 or fp8: a byte per element and an f16 scale per vector.
    Bytes {
        code: ByteCode,
        q: Vec<u8>,
        scale: Vec<f16>,
    },
    /// Per vector: `head_dim / 2` bytes of codes, and (min, scale) per group of 32 dims; `turned`: each vector
    /// was turned before it was quantized (a key store).
    Int4 {
        q: Vec<u8>,
        params: Vec<f16>,
        turned: bool,
    },
}

/// Which half of the cache a store holds: keys are turned where the format says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Keys,
    Values,
}

impl KvBuf {
    /// Room for `vectors` vectors of `head_dim` elements, zeroed.
    pub fn new(format: KvFormat, half: Half, vectors: usize, head_dim: usize) -> Self {
        let n = vectors * head_dim;
        match format {
            KvFormat::F32 => Self::F32(vec![0.0; n]),
            KvFormat::F16 => Self::F16(vec![f16::ZERO; n]),
            KvFormat::Int8 | KvFormat::Fp8 => Self::Bytes {
                code: format.byte_code().expect("a byte format"),
                q: vec![0; n],
                scale: vec![f16::ZERO; vectors],
            },
            KvFormat::Int4 => Self::Int4 {
                q: vec![0; vectors * head_dim.div_ceil(2)],
                params: vec![f16::ZERO; vectors * 2 * head_dim.div_ceil(INT4_GROUP)],
                turned: half == Half::Keys && format.turns_keys(),
            },
        }
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
            Self::Int4 { q, params, turned } => {
                let (cb, pb) = (hd.div_ceil(2), 2 * hd.div_ceil(INT4_GROUP));
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
                    quantize_int4(
                        x,
                        &mut q[v * cb..(v + 1) * cb],
                        &mut params[v * pb..(v + 1) * pb],
                    );
                }
            }
        }
    }

    /// Whether the vectors are stored turned (attention then turns its queries).
    pub fn turned(&self) -> bool {
        matches!(self, Self::Int4 { turned: true, .. })
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
            Self::Int4 { q, params, .. } => {
                let (cb, pb) = (hd.div_ceil(2), 2 * hd.div_ceil(INT4_GROUP));
                for (i, d) in dst.chunks_exact_mut(hd).enumerate() {
                    let v = at + i;
                    dequantize_int4(&q[v * cb..(v + 1) * cb], &params[v * pb..(v + 1) * pb], d);
                }
            }
        }
    }

    /// The f32 values themselves, where the format stores f32 (attention then reads them in place).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Self::F32(b) => Some(b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            let mut b = KvBuf::new(format, Half::Values, 10, hd);
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
        for format in [KvFormat::Int8, KvFormat::Fp8, KvFormat::Int4] {
            let mut b = KvBuf::new(format, Half::Keys, 1, hd);
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
            KvBuf::new(KvFormat::Int4, Half::Keys, 2, hd),
            KvBuf::new(KvFormat::Int4, Half::Values, 2, hd),
        );
        assert!(keys.turned() && !values.turned());
        assert!(!KvBuf::new(KvFormat::Int8, Half::Keys, 1, hd).turned());
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
}
