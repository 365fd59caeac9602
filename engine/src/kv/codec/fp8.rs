//! FP8 E4M3 (the OCP "E4M3FN" variant used for KV caches: no infinities, one NaN pattern per sign, largest finite
//! value 448), converted in software: round to nearest even, saturating at ±448, subnormals down to 2^-9.

/// Largest finite E4M3 value.
pub const MAX: f32 = 448.0;

/// Rounds `x` to the nearest E4M3 value (ties to even), saturating; NaN maps to the NaN pattern.
pub fn from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs();
    if a >= MAX {
        return sign | 0x7e;
    }
    // Smallest normal is 2^-6; below it the step is 2^-9 (subnormals).
    if a < f32::from_bits(0x3c80_0000) {
        let q = round_half_even(a * 512.0) as u8; // units of 2^-9, 0..=8
        return sign | q; // q == 8 is the smallest normal (exponent field 1, mantissa 0): same bits
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) as i32) - 127; // -6..=8
    let mant = bits & 0x7f_ffff;
    // Keep 3 mantissa bits, round the 20 dropped ones to nearest even.
    let keep = mant >> 20;
    let rest = mant & 0xf_ffff;
    let half = 0x8_0000;
    let mut m = keep + u32::from(rest > half || (rest == half && keep & 1 == 1));
    let mut e = exp + 7;
    if m == 8 {
        m = 0;
        e += 1;
    }
    // `a < 448` keeps the result at or below 0x7e (448 itself).
    sign | ((e as u8) << 3) | m as u8
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

fn round_half_even(x: f32) -> f32 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
