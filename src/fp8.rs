//! FP8 E4M3 numerics on the CPU, bit-exact with the GPU's conversion instructions.
//!
//! E4M3 (OCP FP8, "fn" variant): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no
//! infinities; `0x7F`/`0xFF` are NaN; the largest finite magnitude is 448 (`0x7E`). Magnitudes
//! below 2^-6 are subnormal, in steps of 2^-9.

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The canonical E4M3 NaN byte.
pub const E4M3_NAN: u8 = 0x7f;

/// Smallest normal E4M3 magnitude, 2^-6.
const MIN_NORMAL: f32 = 1.0 / 64.0;

/// f32 to E4M3 with round-to-nearest-even and saturation: any magnitude that would round above 448
/// (infinity included) becomes ±448. NaN becomes [`E4M3_NAN`]; -0.0 becomes `0x80`.
///
/// This is PTX `cvt.rn.satfinite.e4m3x2.f32` for every non-NaN input, computed exactly on bits
/// (no double rounding).
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    if a < MIN_NORMAL {
        // Subnormal: a / 2^-9 rounded to an integer in 0..=8 (8 is the smallest normal, 0x08).
        // Scaling by 2^9 is exact for every f32.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exponent = (bits >> 23) as i32 - 127; // -6 ..= 8
    let mantissa = bits & 0x7f_ffff;
    let kept = mantissa >> 20;
    let rest = mantissa & 0xf_ffff;
    const HALF: u32 = 0x8_0000;
    // A carry out of the mantissa correctly bumps the exponent field.
    let mut v = (((exponent + 7) as u32) << 3) | kept;
    if rest > HALF || (rest == HALF && kept & 1 == 1) {
        v += 1;
    }
    sign | v.min(0x7e) as u8
}

/// E4M3 to f32, exactly. `0x7F` and `0xFF` decode to NaN.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = (b >> 3) & 0xf;
    let m = f32::from(b & 0x7);
    if e == 0xf && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    let magnitude = if e == 0 { m * (1.0 / 512.0) } else { (1.0 + m / 8.0) * 2f32.powi(i32::from(e) - 7) };
    sign * magnitude
}

/// Rounds a scale up to a power of two (UE8M0 scales): if any mantissa bit is set, the exponent
/// goes up by one and the mantissa is cleared; powers of two are returned unchanged.
///
/// Domain: positive finite normal f32 (the quantisers' scales are at least 1e-4/448). Other inputs
/// are returned unchanged when they are +inf, zero or NaN; a negative input gives the negative of
/// its magnitude's result; a subnormal input is rounded up to a power of two in the same way on its
/// bits (so the result is the next power of two above it, possibly the smallest normal); a value
/// above 2^127 that is not a power of two rounds up to +inf.
pub fn ue8m0_ceil(scale: f32) -> f32 {
    if !scale.is_finite() || scale == 0.0 {
        return scale;
    }
    let bits = scale.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    let sign = bits & 0x8000_0000;
    if magnitude < 0x0080_0000 {
        // Subnormal: the next power of two at or above it.
        let p = 1u32 << (31 - magnitude.leading_zeros());
        let up = if p == magnitude { p } else { p << 1 };
        return f32::from_bits(sign | up);
    }
    if magnitude & 0x007f_ffff == 0 {
        return scale;
    }
    f32::from_bits(sign | ((magnitude & 0x7f80_0000) + 0x0080_0000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(e4m3_encode(0.0), 0x00);
        assert_eq!(e4m3_encode(-0.0), 0x80);
        assert_eq!(e4m3_encode(1.0), 0x38);
        assert_eq!(e4m3_encode(-2.0), 0xc0);
        assert_eq!(e4m3_encode(448.0), 0x7e);
        assert_eq!(e4m3_encode(1e30), 0x7e);
        assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0xfe);
        assert_eq!(e4m3_encode(f32::NAN), 0x7f);
        assert_eq!(e4m3_encode(2f32.powi(-9)), 0x01);
        assert_eq!(e4m3_encode(2f32.powi(-10)), 0x00, "tie to even at the bottom");
        assert_eq!(e4m3_encode(f32::from_bits(2f32.powi(-10).to_bits() + 1)), 0x01);
        assert_eq!(e4m3_encode(3.0 * 2f32.powi(-10)), 0x02, "1.5 ulp rounds to even 2");
        assert_eq!(e4m3_encode(1.0625), 0x38, "half way between 1 and 1.125 rounds to even");
        assert_eq!(e4m3_encode(1.1875), 0x3a, "half way between 1.125 and 1.25 rounds to even");
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
    }

    #[test]
    fn ue8m0_rounds_up_to_powers_of_two() {
        assert_eq!(ue8m0_ceil(1.0), 1.0);
        assert_eq!(ue8m0_ceil(1.0000001), 2.0);
        assert_eq!(ue8m0_ceil(3.0), 4.0);
        assert_eq!(ue8m0_ceil(0.3), 0.5);
        assert_eq!(ue8m0_ceil(f32::INFINITY), f32::INFINITY);
        assert_eq!(ue8m0_ceil(2f32.powi(127)), 2f32.powi(127));
        assert_eq!(ue8m0_ceil(f32::MAX), f32::INFINITY);
        assert_eq!(ue8m0_ceil(f32::from_bits(3)), f32::from_bits(4));
        assert_eq!(ue8m0_ceil(f32::from_bits(0x007f_ffff)), f32::from_bits(0x0080_0000));
    }
}
