//! FP8 E4M3 (the OCP "E4M3FN" variant used for KV caches: no infinities, one NaN pattern per sign, largest finite
//! value 448), converted in software: round to nearest even, saturating at ±448, subnormals down to 2^-9.

/// Largest finite E4M3 value.
pub const MAX: f32 = 448.0;

/// Rounds `x` to the nearest E4M3 value (ties to even), saturating; NaN maps to the NaN pattern. Every case is
/// computed and one selected, without branches, so a loop over a slice vectorizes.
#[inline]
pub fn from_f32(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abits = bits & 0x7fff_ffff;
    let a = f32::from_bits(abits);
    // Normal range [2^-6, 448): keep 3 mantissa bits, rounding the 20 dropped ones to nearest even by an integer
    // add (a carry moves into the exponent as it should), then rebias the exponent from 127 to 7.
    let normal = ((abits + 0x7_ffff + ((abits >> 20) & 1)) >> 20).wrapping_sub(120 << 3);
    // Below 2^-6 the step is 2^-9: the float add to 2^23 rounds `a * 512` to an integer, ties to even.
    let subnormal = (a * 512.0 + 8_388_608.0)
        .to_bits()
        .wrapping_sub(0x4b00_0000);
    let code = if a < f32::from_bits(0x3c80_0000) {
        subnormal
    } else if a < MAX {
        normal
    } else {
        0x7e
    };
    // (A NaN fails both comparisons above; it takes the NaN pattern.)
    sign | if a.is_nan() { 0x7f } else { code as u8 }
}

/// The value of an E4M3 byte (a table lookup).
pub fn to_f32(b: u8) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| compute_f32(i as u8)))[b as usize]
}

fn compute_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = (b >> 3) & 0xf;
    let m = (b & 7) as f32;
    if e == 0xf && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        return sign * m * (1.0 / 512.0);
    }
    sign * (1.0 + m / 8.0) * f32::powi(2.0, e as i32 - 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversion written case by case: the reference the branch-free one must equal.
    fn reference(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return sign | 0x7f;
        }
        let a = x.abs();
        if a >= MAX {
            return sign | 0x7e;
        }
        if a < f32::from_bits(0x3c80_0000) {
            let r = (a * 512.0).round();
            let even = if (a * 512.0 - (a * 512.0).trunc()) == 0.5 && r % 2.0 != 0.0 {
                r - 1.0
            } else {
                r
            };
            return sign | even as u8;
        }
        let bits = a.to_bits();
        let exp = ((bits >> 23) as i32) - 127;
        let (keep, rest) = ((bits & 0x7f_ffff) >> 20, bits & 0xf_ffff);
        let mut m = keep + u32::from(rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1));
        let mut e = exp + 7;
        if m == 8 {
            m = 0;
            e += 1;
        }
        sign | ((e as u8) << 3) | m as u8
    }

    #[test]
    fn equals_the_case_by_case_conversion() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            448.0,
            447.9,
            464.0,
        ];
        // Every code's value, every midpoint between neighbouring codes, and a step either side of each.
        let values: Vec<f32> = (0..=0x7eu8).map(to_f32).collect();
        for w in values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            xs.extend([
                w[0],
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ]);
        }
        let mut s = 7u32;
        for _ in 0..200_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            // Exponents from 2^-12 to 2^10 with random mantissas.
            xs.push(f32::from_bits(
                ((115 + (s >> 27) % 23) << 23) | (s >> 5 & 0x7f_ffff),
            ));
        }
        for x in xs {
            for v in [x, -x] {
                assert_eq!(from_f32(v), reference(v), "{v} ({:#010x})", v.to_bits());
            }
        }
    }

    #[test]
    fn every_finite_code_round_trips() {
        for b in 0..=255u8 {
            let x = to_f32(b);
            if x.is_nan() {
                continue;
            }
            let back = from_f32(x);
            // +0 and -0 are distinct codes with equal values.
            assert_eq!(to_f32(back), x, "code {b:#04x} = {x}");
        }
    }

    #[test]
    fn known_values_and_saturation() {
        assert_eq!(to_f32(0x7e), 448.0);
        assert_eq!(from_f32(1e6), 0x7e);
        assert_eq!(from_f32(-1e6), 0xfe);
        assert_eq!(to_f32(from_f32(1.0)), 1.0);
        assert_eq!(to_f32(0x01), 1.0 / 512.0);
        assert!(to_f32(from_f32(f32::NAN)).is_nan());
        // 1.0625 is halfway between 1.0 and 1.125: ties to even (1.0).
        assert_eq!(to_f32(from_f32(1.0625)), 1.0);
        assert_eq!(to_f32(from_f32(1.1875)), 1.25);
    }

    #[test]
    fn relative_error_is_at_most_half_a_step() {
        let mut x = 0.02f32;
        while x < 440.0 {
            let y = to_f32(from_f32(x));
            assert!((y - x).abs() <= x / 16.0 + 1e-6, "{x} -> {y}");
            x *= 1.013;
        }
    }
}
