//! The quantization rules of the quantized cache formats, shared with the transfer codecs where their layouts allow,
//! so that a cache block and its wire form round the same values the same way.
//!
//! - int8 ([`ByteCode::Int8`]): symmetric, one f16 scale per vector (`max |x| / 127`, saturated to f16's range),
//!   rounded to f16 first so that quantization and dequantization use the same value. The `int8` codec calls it
//!   for each token of a block (its keys after the Walsh-Hadamard turn, which the int8 cache format does not apply).
//! - fp8 (cache format): E4M3 codes under one f16 scale per vector (`max |x| / 448`, E4M3's largest value), so each
//!   vector uses the whole E4M3 range. The `fp8` codec keeps one f32 scale per head per block instead (it sees the
//!   whole block at once; a cache is written a token at a time).
//! - int4 (and kivi2's 2-bit values): asymmetric over `[min, min + levels * scale]`, min and scale rounded to f16
//!   (saturating) before the codes are computed; the cache format and the `int4` codec take groups of 32 dims, and
//!   both compute their codes with [`affine_params`] and [`affine_code`].
//! - kivi2 (cache format): values by the same rule at 2 bits ([`quantize_groups`]); keys per channel over a block's
//!   tokens ([`quantize_channels`]), the rule of the `kivi2` codec's keys; both give it keys turned into the frame
//!   of the block's first token.

use half::f16;

/// Dims per (min, scale) pair of the int4 cache format and codec.
pub const INT4_GROUP: usize = 32;

/// `x` as f16, saturated to the finite range (an f16 scale or min must never be infinite).
pub fn f16_sat(x: f32) -> f16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0))
}

/// The cache formats of one byte per element and one f16 scale per vector; the cache stores either as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteCode {
    /// Symmetric int8: `q = round(x / scale)` under a scale of `max |x| / 127`.
    Int8,
    /// E4M3 under a scale of `max |x| / 448`.
    Fp8,
}

impl ByteCode {
    /// One vector's codes into `q`; returns its scale.
    pub fn quantize(self, x: &[f32], q: &mut [u8]) -> f16 {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = f16_sat(amax / self.max());
        let inv = affine_inv(s);
        match self {
            Self::Int8 => {
                for (o, &v) in q.iter_mut().zip(x) {
                    *o = round_half_away(v * inv).clamp(-127, 127) as i8 as u8;
                }
            }
            Self::Fp8 => {
                for (o, &v) in q.iter_mut().zip(x) {
                    *o = super::codec::fp8::from_f32(v * inv);
                }
            }
        }
        s
    }

    /// The inverse of [`ByteCode::quantize`].
    pub fn dequantize(self, q: &[u8], scale: f16, out: &mut [f32]) {
        let s = scale.to_f32();
        match self {
            Self::Int8 => {
                for (o, &c) in out.iter_mut().zip(q) {
                    *o = f32::from(c as i8) * s;
                }
            }
            Self::Fp8 => {
                for (o, &c) in out.iter_mut().zip(q) {
                    *o = super::codec::fp8::to_f32(c) * s;
                }
            }
        }
    }

    /// The largest code's magnitude.
    fn max(self) -> f32 {
        match self {
            Self::Int8 => 127.0,
            Self::Fp8 => super::codec::fp8::MAX,
        }
    }
}

/// The asymmetric rule's (min, scale) for a run of values quantized to codes `0..=levels`.
pub fn affine_params(vals: &[f32], levels: u32) -> (f16, f16) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if vals.is_empty() {
        return (f16::ZERO, f16::ZERO);
    }
    let min = f16_sat(lo);
    (min, f16_sat(((hi - min.to_f32()) / levels as f32).max(0.0)))
}

/// The code of `v` under (min, 1 / scale) (0 when the scale is 0): `round((v - min) / scale)`, halves up, clamped to
/// `0..=levels`. Written as a clamp then a truncation, which vectorizes.
#[inline]
pub fn affine_code(v: f32, min: f32, inv: f32, levels: u32) -> u8 {
    ((v - min) * inv + 0.5).clamp(0.0, levels as f32) as u8
}

/// `x` to the nearest integer, halves away from zero: exactly `f32::round` (and CUDA's `roundf`) for every `x` in
/// i32's range, without the libm call `round` costs on x86-64 targets without SSE4.1 (the truncation is an
/// instruction, `x` minus its truncation is exact in f32, and the rest is integer work, so loops vectorize).
#[inline]
pub fn round_half_away(x: f32) -> i32 {
    let t = x as i32;
    let f = x - t as f32;
    // Saturating: `t` is already i32::MAX (or MIN) for an infinite or out-of-range `x`, whose remainder is too.
    t.saturating_add(i32::from(f >= 0.5))
        .saturating_sub(i32::from(f <= -0.5))
}

/// The reciprocal the codes are computed with.
#[inline]
pub fn affine_inv(scale: f16) -> f32 {
    let s = scale.to_f32();
    if s > 0.0 { 1.0 / s } else { 0.0 }
}

/// One vector in the int4 cache format: codes two per byte (even dim in the low nibble) into `codes`
/// (`x.len().div_ceil(2)` bytes), and per group of [`INT4_GROUP`] dims its min and scale into `params`.
pub fn quantize_int4(x: &[f32], codes: &mut [u8], params: &mut [f16]) {
    quantize_groups::<4>(x, codes, params)
}

/// The inverse of [`quantize_int4`]: `out.len()` values from their codes and group parameters. Attention reads
/// every cached token through this.
pub fn dequantize_int4(codes: &[u8], params: &[f16], out: &mut [f32]) {
    dequantize_groups::<4>(codes, params, out)
}

/// One vector at `BITS` bits (4: int4; 2: kivi2's values) in groups of [`INT4_GROUP`] dims: codes `8 / BITS` per
/// byte from the low bits up into `codes` (`x.len().div_ceil(8 / BITS)` bytes), and per group its min and scale into
/// `params`.
pub fn quantize_groups<const BITS: usize>(x: &[f32], codes: &mut [u8], params: &mut [f16]) {
    let (per, levels) = (8 / BITS, (1u32 << BITS) - 1);
    codes.fill(0);
    for (g, run) in x.chunks(INT4_GROUP).enumerate() {
        let (min, scale) = affine_params(run, levels);
        params[2 * g] = min;
        params[2 * g + 1] = scale;
        let (mf, inv) = (min.to_f32(), affine_inv(scale));
        for (i, &v) in run.iter().enumerate() {
            let d = g * INT4_GROUP + i;
            codes[d / per] |= affine_code(v, mf, inv, levels) << (BITS * (d % per));
        }
    }
}

/// The inverse of [`quantize_groups`]: whole bytes go `8 / BITS` values at a time in a loop the compiler unrolls
/// and vectorizes.
pub fn dequantize_groups<const BITS: usize>(codes: &[u8], params: &[f16], out: &mut [f32]) {
    let (per, mask) = (8 / BITS, (1u8 << BITS) - 1);
    for (g, run) in out.chunks_mut(INT4_GROUP).enumerate() {
        let (min, scale) = (params[2 * g].to_f32(), params[2 * g + 1].to_f32());
        let (bytes, n) = (&codes[g * INT4_GROUP / per..], run.len());
        let mut whole = run.chunks_exact_mut(per);
        for (vals, &b) in (&mut whole).zip(bytes) {
            for (j, v) in vals.iter_mut().enumerate() {
                *v = min + scale * f32::from((b >> (BITS * j)) & mask);
            }
        }
        let rest = whole.into_remainder();
        if !rest.is_empty() {
            let b = bytes[n / per];
            for (j, v) in rest.iter_mut().enumerate() {
                *v = min + scale * f32::from((b >> (BITS * j)) & mask);
            }
        }
    }
}

/// A block of `x.len() / head_dim` keys, 2 bits per element, each channel over the block's tokens: an f16 min and
/// scale per channel into `params` (`2 * head_dim`: min then scale, channel after channel) and each token's codes,
/// four per byte from the low bits up, into `codes` (`head_dim.div_ceil(4)` bytes per token, token after token).
pub fn quantize_channels(x: &[f32], head_dim: usize, codes: &mut [u8], params: &mut [f16]) {
    let (cb, tokens) = (head_dim.div_ceil(4), x.len() / head_dim.max(1));
    codes[..tokens * cb].fill(0);
    let mut channel = vec![0f32; tokens];
    for d in 0..head_dim {
        for (t, c) in channel.iter_mut().enumerate() {
            *c = x[t * head_dim + d];
        }
        let (min, scale) = affine_params(&channel, 3);
        params[2 * d] = min;
        params[2 * d + 1] = scale;
        let (mf, inv) = (min.to_f32(), affine_inv(scale));
        for (t, &v) in channel.iter().enumerate() {
            codes[t * cb + d / 4] |= affine_code(v, mf, inv, 3) << (2 * (d % 4));
        }
    }
}

/// The inverse of [`quantize_channels`]: `out.len() / head_dim` keys from their codes and their block's channel
/// parameters (converted once, then four codes a byte).
pub fn dequantize_channels(codes: &[u8], params: &[f16], head_dim: usize, out: &mut [f32]) {
    let cb = head_dim.div_ceil(4);
    let (mins, scales): (Vec<f32>, Vec<f32>) = params
        .chunks_exact(2)
        .map(|p| (p[0].to_f32(), p[1].to_f32()))
        .unzip();
    for (key, row) in out.chunks_exact_mut(head_dim).zip(codes.chunks_exact(cb)) {
        // Four channels a byte; a head_dim that is not a multiple of 4 ends in a short chunk.
        let quads = key.chunks_mut(4).zip(mins.chunks(4).zip(scales.chunks(4)));
        for ((o, (m, s)), &b) in quads.zip(row) {
            for (j, o) in o.iter_mut().enumerate() {
                *o = m[j] + s[j] * f32::from((b >> (2 * j)) & 3);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_is_f32_round() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
        ];
        xs.extend([
            8_388_607.5f32,
            -8_388_607.5,
            16_777_216.0,
            1e9,
            -1e9,
            0.500_000_06,
            2.499_999_8,
        ]);
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            xs.push((s >> 8) as f32 / 65_536.0 - 128.0);
            xs.push(((s >> 16) as f32 - 32_768.0) * 0.5);
        }
        for x in xs {
            assert_eq!(round_half_away(x) as f32, x.round(), "{x}");
        }
        // Beyond i32's range it saturates, so the int8 rule's clamp still lands on the right end.
        for x in [f32::INFINITY, f32::NEG_INFINITY, 1e10, -1e10, 3e38, -3e38] {
            assert_eq!(
                round_half_away(x).clamp(-127, 127) as f32,
                x.round().clamp(-127.0, 127.0),
                "{x}"
            );
        }
        assert_eq!(round_half_away(f32::NAN), 0);
    }

    #[test]
    fn byte_codes_round_trip_within_their_steps() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.53).sin() * 7.0).collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut q = vec![0u8; 64];
        let mut out = vec![0f32; 64];
        // int8 as the signed rule writes it.
        let s = ByteCode::Int8.quantize(&x, &mut q);
        assert_eq!(s, f16::from_f32(amax / 127.0));
        assert!(q.iter().any(|&c| c as i8 == 127 || c as i8 == -127));
        ByteCode::Int8.dequantize(&q, s, &mut out);
        for (a, b) in x.iter().zip(&out) {
            assert!((a - b).abs() <= s.to_f32() / 2.0 + 1e-6, "int8 {a} vs {b}");
        }
        // fp8: the largest value takes (about) the largest code; relative error at most half a step (1/16).
        let s = ByteCode::Fp8.quantize(&x, &mut q);
        assert!((s.to_f32() * 448.0 - amax).abs() <= amax * 1e-3);
        ByteCode::Fp8.dequantize(&q, s, &mut out);
        for (a, b) in x.iter().zip(&out) {
            assert!(
                (a - b).abs() <= a.abs() / 16.0 + s.to_f32() / 512.0,
                "fp8 {a} vs {b}"
            );
        }
        // Zeros stay zeros (scale 0, no NaN).
        let s = ByteCode::Fp8.quantize(&[0.0; 4], &mut q[..4]);
        ByteCode::Fp8.dequantize(&q[..4], s, &mut out[..4]);
        assert_eq!(&out[..4], &[0.0; 4]);
    }

    #[test]
    fn key_channels_round_trip_within_half_their_own_step() {
        // 16 tokens of 6 dims; channel 2 is an outlier channel (large, with a wide range), channel 4 is constant.
        let (hd, tokens) = (6, 16);
        let x: Vec<f32> = (0..tokens * hd)
            .map(|i| match i % hd {
                2 => 40.0 + (i as f32 * 0.3).sin() * 8.0,
                4 => -0.75,
                d => (i as f32 * 0.17 + d as f32).cos() * 0.5,
            })
            .collect();
        let mut codes = vec![0xffu8; tokens * 2];
        let mut params = vec![f16::ZERO; 2 * hd];
        quantize_channels(&x, hd, &mut codes, &mut params);
        let mut all = vec![0f32; tokens * hd];
        dequantize_channels(&codes, &params, hd, &mut all);
        for t in 0..tokens {
            let out = &all[t * hd..(t + 1) * hd];
            for (d, (&a, &b)) in x[t * hd..(t + 1) * hd].iter().zip(out).enumerate() {
                let step = params[2 * d + 1].to_f32();
                // Each channel's own step: the quiet channels keep their precision beside the outlier one.
                assert!(
                    (a - b).abs() <= step / 2.0 + 0.02,
                    "token {t} dim {d}: {a} vs {b}"
                );
                if d != 2 {
                    assert!(step < 0.4, "dim {d} step {step}");
                }
            }
        }
        assert_eq!(params[2 * 4 + 1], f16::ZERO);
        // The pad bits of a token's last byte stay zero.
        assert!(codes.chunks(2).all(|c| c[1] >> 4 == 0));
    }

    #[test]
    fn int4_round_trips_within_half_a_step() {
        // 40 dims: one full group and a short one.
        let x: Vec<f32> = (0..40)
            .map(|i| (i as f32 * 0.71).cos() * 3.0 - 0.5)
            .collect();
        let mut codes = vec![0u8; 20];
        let mut params = vec![f16::ZERO; 4];
        quantize_int4(&x, &mut codes, &mut params);
        let mut out = vec![0f32; 40];
        dequantize_int4(&codes, &params, &mut out);
        // Exactly min + scale * code, element by element.
        for (d, &o) in out.iter().enumerate() {
            let g = d / INT4_GROUP;
            let code = f32::from((codes[d / 2] >> (4 * (d % 2))) & 15);
            assert_eq!(
                o,
                params[2 * g].to_f32() + params[2 * g + 1].to_f32() * code,
                "dim {d}"
            );
        }
        for (g, (xs, os)) in x.chunks(INT4_GROUP).zip(out.chunks(INT4_GROUP)).enumerate() {
            let step = params[2 * g + 1].to_f32();
            assert!(step > 0.0);
            for (a, b) in xs.iter().zip(os) {
                // Half a step, plus the min's own f16 rounding.
                assert!(
                    (a - b).abs() <= step / 2.0 + 3e-3,
                    "group {g}: {a} vs {b} (step {step})"
                );
            }
        }
        // The same rule at 2 bits (kivi2's values): four codes per byte, within half a (wider) step.
        let mut codes2 = vec![0u8; 10];
        quantize_groups::<2>(&x, &mut codes2, &mut params);
        dequantize_groups::<2>(&codes2, &params, &mut out);
        for (d, (&a, &b)) in x.iter().zip(&out).enumerate() {
            let (g, code) = (
                d / INT4_GROUP,
                f32::from((codes2[d / 4] >> (2 * (d % 4))) & 3),
            );
            let (min, step) = (params[2 * g].to_f32(), params[2 * g + 1].to_f32());
            assert_eq!(b, min + step * code, "dim {d}");
            assert!((a - b).abs() <= step / 2.0 + 3e-3, "dim {d}: {a} vs {b}");
        }
        // A constant run: scale 0, every value exact up to the min's rounding, no NaN.
        let mut c = vec![0u8; 2];
        let mut p = vec![f16::ZERO; 2];
        quantize_int4(&[1.25; 4], &mut c, &mut p);
        let mut o = vec![0f32; 4];
        dequantize_int4(&c, &p, &mut o);
        assert_eq!(o, vec![1.25; 4]);
    }
}
