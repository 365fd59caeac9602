//! Scalar dequantization of one row of any supported type into f32.
//!
//! Used for embeddings lookups, for the prefill path (a weight panel is expanded once and reused by every token of
//! the chunk), and as the generic decode path for types without a dedicated dot kernel. Layouts follow ggml's
//! `ggml-common.h`; the unit tests compare against values produced by the `gguf` Python package.

use super::GgmlType;
use half::{bf16, f16};

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Expands `src` (exactly `out.len()` elements of type `ty`) into `out`, with AVX2 where the CPU has it for the
/// types the prefill path expands most (Q4_0, Q4_1, Q8_0).
///
/// Panics only on a caller bug (length mismatch); tensor sizes are validated when the file is opened.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    assert_eq!(
        src.len() * ty.block_elems(),
        out.len() * ty.block_bytes(),
        "dequantize_row: size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
        && crate::backend::cpu::simd::has_avx2()
    {
        // SAFETY: AVX2/FMA/F16C are available (checked); sizes were asserted above.
        unsafe { avx2::dequantize(ty, src, out) };
        return;
    }
    dequantize_row_scalar(ty, src, out);
}

/// The portable implementation of [`dequantize_row`].
pub fn dequantize_row_scalar(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    assert_eq!(
        src.len() * ty.block_elems(),
        out.len() * ty.block_bytes(),
        "dequantize_row: size mismatch"
    );
    let blocks = src.chunks_exact(ty.block_bytes());
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(blocks) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(blocks) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(blocks) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(blocks) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(blocks) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(blocks) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (o, b) in out.chunks_exact_mut(256).zip(blocks) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, (o64, q32)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * g, scales);
                    let (s2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        o64[l] = d1 * (q32[l] & 0x0f) as f32 - m1;
                        o64[l + 32] = d2 * (q32[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q5K => {
            for (o, b) in out.chunks_exact_mut(256).zip(blocks) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (g, (o64, q32)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * g, scales);
                    let (s2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                    for l in 0..32 {
                        let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        o64[l] = d1 * ((q32[l] & 0x0f) + hi1) as f32 - m1;
                        o64[l + 32] = d2 * ((q32[l] >> 4) + hi2) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (o, b) in out.chunks_exact_mut(256).zip(blocks) {
                let d = f16_at(b, 208);
                for half_block in 0..2 {
                    let ql = &b[64 * half_block..64 * half_block + 64];
                    let qh = &b[128 + 32 * half_block..128 + 32 * half_block + 32];
                    let sc = &b[192 + 8 * half_block..192 + 8 * half_block + 8];
                    let o128 = &mut o[128 * half_block..128 * half_block + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o128[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        o128[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        o128[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        o128[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::GgmlType;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `src` holds exactly `out.len()` elements of `ty`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
        let bb = ty.block_bytes();
        for (b, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
            let scale = |at: usize| {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    u16::from_le_bytes([b[at], b[at + 1]]) as i32,
                )))
            };
            let d = _mm256_set1_ps(scale(0));
            // Eight groups of 4 bytes -> 8 lanes each; quants as 32 bytes, unsigned (Q4) or signed (Q8).
            let (bytes, offset): ([u8; 32], __m256) = match ty {
                GgmlType::Q8_0 => (
                    b[2..34].try_into().expect("32 quant bytes"),
                    _mm256_setzero_ps(),
                ),
                GgmlType::Q4_0 | GgmlType::Q4_1 => {
                    let qs = if ty == GgmlType::Q4_0 {
                        &b[2..18]
                    } else {
                        &b[4..20]
                    };
                    let mut q = [0u8; 32];
                    for j in 0..16 {
                        q[j] = qs[j] & 0x0f;
                        q[j + 16] = qs[j] >> 4;
                    }
                    let off = if ty == GgmlType::Q4_0 {
                        _mm256_set1_ps(-8.0 * scale(0))
                    } else {
                        _mm256_set1_ps(scale(2))
                    };
                    (q, off)
                }
                other => unreachable!("avx2 dequantize called for {other}"),
            };
            for g in 0..4 {
                // SAFETY: 8 bytes at g * 8 lie inside the 32-byte array; unaligned loads are allowed.
                let raw = unsafe { _mm_loadl_epi64(bytes.as_ptr().add(g * 8) as *const __m128i) };
                let ints = if ty == GgmlType::Q8_0 {
                    _mm256_cvtepi8_epi32(raw)
                } else {
                    _mm256_cvtepu8_epi32(raw)
                };
                let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), d, offset);
                // SAFETY: o has 32 floats; this writes 8 of them at g * 8.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(g * 8), v) };
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 scale bytes of Q4_K / Q5_K.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type against values produced by the `gguf` Python package (`tests/reference/quant_fixtures.py`).
    #[test]
    fn matches_gguf_python_reference() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/reference/fixtures/dequant.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for c in cases {
            let ty = match c["type"].as_str().unwrap() {
                "F16" => GgmlType::F16,
                "BF16" => GgmlType::BF16,
                "Q8_0" => GgmlType::Q8_0,
                "Q4_0" => GgmlType::Q4_0,
                "Q4_1" => GgmlType::Q4_1,
                "Q4_K" => GgmlType::Q4K,
                "Q5_K" => GgmlType::Q5K,
                "Q6_K" => GgmlType::Q6K,
                other => panic!("unexpected type {other}"),
            };
            let hex = c["raw_hex"].as_str().unwrap();
            let raw: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = c["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            for simd in [false, true] {
                let mut got = vec![0f32; want.len()];
                if simd {
                    dequantize_row(ty, &raw, &mut got);
                } else {
                    dequantize_row_scalar(ty, &raw, &mut got);
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{ty} simd={simd} element {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
