//! The byte layouts of the codecs, one writer and one reader per layout. All multi-byte values are little-endian;
//! elements are indexed `[head][token][dim]` as in the cache; packed codes fill each byte from its low bits up.
//!
//! - raw: every element as f32 or f16.
//! - fp8: per head, an f32 scale, then one E4M3 byte per element of `x / scale`.
//! - int8: per head and token, an f16 scale, then one i8 per dim.
//! - groups (int4, kivi2 values): per head, token and run of 32 dims, an f16 min and f16 scale, then the codes.
//! - per-channel 2-bit (kivi2 keys): per head and dim, an f16 min and f16 scale over the block's tokens, then the
//!   codes of those tokens.

use super::{BlockShape, Codec, CodecError, GROUP, fp8};
use crate::kv::KvFormat;
use crate::kv::quant::{ByteCode, affine_code, affine_inv, affine_params};
use half::f16;

fn at(s: BlockShape, h: usize, t: usize) -> usize {
    (h * s.block_size + t) * s.head_dim
}

pub(super) fn zero_past_fill(s: BlockShape, fill: usize, x: &mut [f32]) {
    for h in 0..s.kv_heads {
        x[at(s, h, fill)..at(s, h, s.block_size)].fill(0.0);
    }
}

pub(super) fn put_raw(fmt: KvFormat, s: BlockShape, fill: usize, x: &[f32], out: &mut Vec<u8>) {
    let row_bytes = fmt.raw_wire().bytes_per_vector(s.head_dim);
    for h in 0..s.kv_heads {
        let rows = &x[at(s, h, 0)..at(s, h, fill)];
        match fmt.raw_wire() {
            KvFormat::F32 => rows
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            _ => rows
                .iter()
                .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        }
        out.resize(out.len() + (s.block_size - fill) * row_bytes, 0);
    }
}

pub(super) fn put_fp8(s: BlockShape, fill: usize, x: &[f32], out: &mut Vec<u8>) {
    for h in 0..s.kv_heads {
        let rows = &x[at(s, h, 0)..at(s, h, fill)];
        let absmax = rows.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if absmax > 0.0 { absmax / fp8::MAX } else { 1.0 };
        out.extend_from_slice(&scale.to_le_bytes());
        let inv = 1.0 / scale;
        let start = out.len();
        out.resize(start + s.block_size * s.head_dim, 0);
        for (o, &v) in out[start..].iter_mut().zip(rows) {
            *o = fp8::from_f32(v * inv);
        }
    }
}

/// Per head and token: the f16 scale, then the codes, by the int8 cache format's own rule ([`ByteCode::Int8`]);
/// tokens past the fill as a zero scale and zero codes.
pub(super) fn put_int8(s: BlockShape, fill: usize, x: &[f32], out: &mut Vec<u8>) {
    for h in 0..s.kv_heads {
        for t in 0..s.block_size {
            let start = out.len();
            out.resize(start + 2 + s.head_dim, 0);
            if t < fill {
                let row = &x[at(s, h, t)..at(s, h, t) + s.head_dim];
                let scale = ByteCode::Int8.quantize(row, &mut out[start + 2..]);
                out[start..start + 2].copy_from_slice(&scale.to_le_bytes());
            }
        }
    }
}

/// Quantizes `vals` to `bits`-bit codes over `[min, min + scale * levels]` and appends min, scale and the codes.
fn put_run<const BITS: u32>(vals: &[f32], out: &mut Vec<u8>) {
    let levels = (1u32 << BITS) - 1;
    let (min, scale) = affine_params(vals, levels);
    out.extend_from_slice(&min.to_le_bytes());
    out.extend_from_slice(&scale.to_le_bytes());
    let (mf, inv) = (min.to_f32(), affine_inv(scale));
    // Packed through a stack buffer: extending the output byte by byte costs more than this.
    let per_byte = 8 / BITS as usize;
    let mut codes = [0u8; 64];
    let mut packed = [0u8; 32];
    for run in vals.chunks(codes.len()) {
        for (c, &v) in codes.iter_mut().zip(run) {
            *c = affine_code(v, mf, inv, levels);
        }
        codes[run.len()..].fill(0);
        let n = run.len().div_ceil(per_byte);
        for (i, p) in packed[..n].iter_mut().enumerate() {
            let group = &codes[i * per_byte..(i + 1) * per_byte];
            *p = group
                .iter()
                .enumerate()
                .fold(0u8, |b, (j, &q)| b | q << (BITS as usize * j));
        }
        out.extend_from_slice(&packed[..n]);
    }
}

pub(super) fn put_groups(s: BlockShape, fill: usize, x: &[f32], bits: u32, out: &mut Vec<u8>) {
    let zeros = vec![0f32; s.head_dim];
    for h in 0..s.kv_heads {
        for t in 0..s.block_size {
            let row = if t < fill {
                &x[at(s, h, t)..at(s, h, t) + s.head_dim]
            } else {
                &zeros[..]
            };
            for group in row.chunks(GROUP) {
                match bits {
                    2 => put_run::<2>(group, out),
                    _ => put_run::<4>(group, out),
                }
            }
        }
    }
}

/// Keys of a full block: each channel's run over the block's tokens.
pub(super) fn put_per_channel_2bit(s: BlockShape, x: &[f32], out: &mut Vec<u8>) {
    let mut channel = vec![0f32; s.block_size];
    for h in 0..s.kv_heads {
        for d in 0..s.head_dim {
            for (t, c) in channel.iter_mut().enumerate() {
                *c = x[at(s, h, t) + d];
            }
            put_run::<2>(&channel, out);
        }
    }
}

/// Reads the layouts above from a buffer whose total length was checked; every read is still bounds-checked.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    codec: Codec,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8], codec: Codec) -> Self {
        Self {
            bytes,
            pos: 0,
            codec,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(CodecError::Length {
                codec: self.codec,
                expected: self.pos.saturating_add(n),
                got: self.bytes.len(),
            });
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn finite(&self, x: f32, what: &'static str) -> Result<f32, CodecError> {
        if x.is_finite() {
            Ok(x)
        } else {
            Err(CodecError::NonFinite {
                codec: self.codec,
                what,
            })
        }
    }

    fn f16(&mut self, what: &'static str) -> Result<f32, CodecError> {
        let b = self.take(2)?;
        self.finite(f16::from_le_bytes([b[0], b[1]]).to_f32(), what)
    }

    pub(super) fn raw(&mut self, fmt: KvFormat, x: &mut [f32]) -> Result<(), CodecError> {
        let b = self.take(x.len() * fmt.raw_wire().bytes_per_vector(1))?;
        match fmt.raw_wire() {
            KvFormat::F32 => {
                for (o, c) in x.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            _ => {
                for (o, c) in x.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        Ok(())
    }

    pub(super) fn fp8(&mut self, s: BlockShape, x: &mut [f32]) -> Result<(), CodecError> {
        for h in 0..s.kv_heads {
            let b = self.take(4)?;
            let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let scale = self.finite(scale, "scale")?;
            let codes = self.take(s.block_size * s.head_dim)?;
            let rows = &mut x[at(s, h, 0)..at(s, h, s.block_size)];
            for (o, &c) in rows.iter_mut().zip(codes) {
                *o = self.finite(fp8::to_f32(c), "fp8 value")? * scale;
            }
        }
        Ok(())
    }

    pub(super) fn int8(&mut self, s: BlockShape, x: &mut [f32]) -> Result<(), CodecError> {
        for h in 0..s.kv_heads {
            for t in 0..s.block_size {
                let scale = self.f16("scale")?;
                let codes = self.take(s.head_dim)?;
                let row = &mut x[at(s, h, t)..at(s, h, t) + s.head_dim];
                for (o, &c) in row.iter_mut().zip(codes) {
                    *o = f32::from(c as i8) * scale;
                }
            }
        }
        Ok(())
    }

    /// One run written by `put_run`: `n` values handed to `emit` in order.
    fn run(
        &mut self,
        n: usize,
        bits: u32,
        mut emit: impl FnMut(usize, f32),
    ) -> Result<(), CodecError> {
        let min = self.f16("min")?;
        let scale = self.f16("scale")?;
        let per_byte = 8 / bits as usize;
        let mask = (1u8 << bits) - 1;
        let codes = self.take(n.div_ceil(per_byte))?;
        for i in 0..n {
            let q = (codes[i / per_byte] >> (bits as usize * (i % per_byte))) & mask;
            emit(i, min + scale * f32::from(q));
        }
        Ok(())
    }

    pub(super) fn groups(
        &mut self,
        s: BlockShape,
        bits: u32,
        x: &mut [f32],
    ) -> Result<(), CodecError> {
        for h in 0..s.kv_heads {
            for t in 0..s.block_size {
                for g in (0..s.head_dim).step_by(GROUP) {
                    let n = (g + GROUP).min(s.head_dim) - g;
                    let base = at(s, h, t) + g;
                    self.run(n, bits, |i, v| x[base + i] = v)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn per_channel_2bit(
        &mut self,
        s: BlockShape,
        x: &mut [f32],
    ) -> Result<(), CodecError> {
        for h in 0..s.kv_heads {
            for d in 0..s.head_dim {
                self.run(s.block_size, 2, |t, v| x[at(s, h, t) + d] = v)?;
            }
        }
        Ok(())
    }
}
