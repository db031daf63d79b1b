//! FP8 E4M3 numerics on the CPU, bit-exact with the GPU's conversion instructions. Plain Rust, no CUDA.
//!
//! E4M3 here is the OCP FP8 "fn" variant that Hopper's tensor cores use (`__nv_fp8_e4m3`,
//! `float8::F8E4M3`): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, **no infinities**.
//!
//! | bytes (magnitude) | value |
//! |---|---|
//! | `0x00` | +0 (`0x80` is -0) |
//! | `0x01..=0x07` | subnormals `m · 2^-9` (exponent field 0) |
//! | `0x08..=0x7E` | normals `(1 + m/8) · 2^(e-7)`, from 2^-6 up to 448 (`0x7E`) |
//! | `0x7F` | NaN (as is `0xFF`) |
//!
//! [`e4m3_encode`] is `cvt.rn.satfinite.e4m3x2.f32` (round to nearest even, saturate to ±448),
//! [`e4m3_decode`] is exact, and [`ue8m0_ceil`] rounds a scale up to a power of two the way the
//! quantisers' UE8M0 mode does.

/// Largest finite E4M3 magnitude (`0x7E`).
pub const E4M3_MAX: f32 = 448.0;

/// The E4M3 NaN byte that [`e4m3_encode`] produces for every NaN input (`0xFF` is NaN too).
pub const E4M3_NAN: u8 = 0x7f;

/// Smallest normal E4M3 magnitude, 2^-6 (`0x08`).
pub const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;

/// Smallest non-zero E4M3 magnitude, the subnormal 2^-9 (`0x01`).
pub const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;

/// f32 bits of 448.0: every magnitude at or above it (infinity included) encodes as ±448.
const F32_BITS_448: u32 = 0x43e0_0000;
/// f32 bits of 2^-10, half the smallest subnormal: magnitudes at or below it round to zero (2^-10
/// itself is a tie between 0 and 2^-9 and goes to the even 0).
const F32_BITS_2_POW_M10: u32 = 0x3a80_0000;

/// f32 to E4M3 bits with round-to-nearest-even and saturation.
///
/// - A magnitude that would round above 448, ±infinity included, gives ±448 (`0x7E`/`0xFE`);
///   448 itself and everything up to (not including) 464 round to 448 anyway.
/// - Results below 2^-6 are E4M3 subnormals (multiples of 2^-9), rounded to nearest even like
///   everything else: 2^-10 gives 0, anything above it gives 2^-9.
/// - The sign is kept, also for zero results: -0.0 and tiny negatives give `0x80`.
/// - NaN (any sign or payload) gives [`E4M3_NAN`] (`0x7F`).
///
/// This is PTX `cvt.rn.satfinite.e4m3x2.f32` (one lane) for every non-NaN input. It works on
/// the integer bits only, so there is no double rounding.
pub fn e4m3_encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return E4M3_NAN;
    }
    if a >= F32_BITS_448 {
        return sign | 0x7e;
    }
    if a <= F32_BITS_2_POW_M10 {
        return sign;
    }
    // Here 2^-10 < |x| < 448, so x is an f32 normal with exponent e in -10..=8.
    let e = (a >> 23) as i32 - 127;
    let significand = (a & 0x7f_ffff) | 0x80_0000; // value = significand · 2^(e-23)
    // E4M3 steps are 2^(max(e, -6) - 3): 2^(e-3) for normals, 2^-9 for subnormals. In those units
    // the value is significand >> shift, with shift = 20 for normals and up to 24 at e = -10.
    let e_eff = e.max(-6);
    let shift = (20 + e_eff - e) as u32;
    // Round to nearest even without a branch: adding half a step minus one, plus the lowest kept
    // bit, carries into the kept bits exactly when the rest is above half, or at half with an odd
    // lowest kept bit.
    let half = 1u32 << (shift - 1);
    let steps = (significand + (half - 1) + ((significand >> shift) & 1)) >> shift;
    // Normals: steps is 8..=16 and the byte is ((e + 7) << 3) + steps - 8; a carry to 16 lands on
    // the next exponent's first value. Subnormals (e_eff = -6): the byte is steps, 0..=8, where 8 is
    // the smallest normal. Both are ((e_eff + 6) << 3) + steps, at most 0x7E because |x| < 448.
    let byte = (((e_eff + 6) as u32) << 3) + steps;
    debug_assert!(byte <= 0x7e, "e4m3_encode: {x:e} rounded past 448");
    sign | byte as u8
}

/// E4M3 bits to f32, exactly (every E4M3 value is an f32). `0x7F` and `0xFF` give NaN; `0x80` gives -0.0.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = u32::from(b & 0x80) << 24;
    let e = u32::from((b >> 3) & 0xf);
    let m = u32::from(b & 0x7);
    let magnitude = match (e, m) {
        (0xf, 0x7) => return f32::NAN,
        // Subnormal: m · 2^-9, exact.
        (0, _) => m as f32 * E4M3_MIN_SUBNORMAL,
        // Normal: re-bias the exponent (7 -> 127) and left-align the mantissa.
        _ => f32::from_bits(((e + 120) << 23) | (m << 20)),
    };
    f32::from_bits(sign | magnitude.to_bits())
}

/// Rounds a scale up to a power of two (UE8M0 scales): if any mantissa bit is set, the exponent
/// field goes up by one and the mantissa is cleared; otherwise the input is returned unchanged.
/// This is DeepGEMM's `ceil_to_ue8m0`, the same bit operation the GPU quantisers perform.
///
/// Domain: positive, finite, normal f32 — every scale the quantisers make is at least
/// `1e-4 / 448`. There the result is the smallest power of two `>= scale`, so
/// `scale <= result < 2 · scale`. Outside it the same bit operation is applied, which gives:
/// - +0.0, -0.0, ±infinity: unchanged (no mantissa bits);
/// - a positive subnormal: 2^-126, the smallest normal (a power of two above it, not the least one);
/// - a non-power-of-two above 2^127: +infinity;
/// - a negative input: the negative of the result for its magnitude (the sign bit is kept);
/// - NaN: returned unchanged (NaN in, NaN out; the bare bit operation would not give NaN).
pub fn ue8m0_ceil(scale: f32) -> f32 {
    if scale.is_nan() {
        return scale;
    }
    let bits = scale.to_bits();
    if bits & 0x007f_ffff == 0 {
        return scale;
    }
    // Keeping sign and exponent and adding one to the exponent cannot overflow into the sign:
    // the exponent field is at most 254 here (255 with a mantissa is NaN).
    f32::from_bits((bits & 0xff80_0000) + 0x0080_0000)
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
        assert_eq!(e4m3_encode(0.5), 0x30);
        assert_eq!(e4m3_encode(E4M3_MIN_NORMAL), 0x08);
        assert_eq!(e4m3_encode(448.0), 0x7e);
        assert_eq!(e4m3_encode(416.0), 0x7d);
        assert_eq!(e4m3_encode(432.0), 0x7e, "tie between 416 (odd) and 448 (even)");
        assert_eq!(e4m3_encode(431.99997), 0x7d);
        assert_eq!(e4m3_encode(1e30), 0x7e);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0xfe);
        assert_eq!(e4m3_encode(f32::NAN), E4M3_NAN);
        assert_eq!(e4m3_encode(-f32::NAN), E4M3_NAN);
        assert_eq!(e4m3_encode(f32::from_bits(0x7f80_0001)), E4M3_NAN);
        assert_eq!(e4m3_encode(1.0625), 0x38, "half way between 1 and 1.125 rounds to even");
        assert_eq!(e4m3_encode(1.1875), 0x3a, "half way between 1.125 and 1.25 rounds to even");
        assert_eq!(e4m3_encode(1.0625f32.next_up()), 0x39);
        assert_eq!(e4m3_encode(15.5), 0x58, "15.5 ties to 16: the carry out of the mantissa bumps the exponent");
    }

    #[test]
    fn subnormals_and_underflow() {
        let p = |e: i32| 2f32.powi(e);
        assert_eq!(e4m3_encode(p(-9)), 0x01);
        assert_eq!(e4m3_encode(p(-10)), 0x00, "2^-10 ties to even 0");
        assert_eq!(e4m3_encode(-p(-10)), 0x80);
        assert_eq!(e4m3_encode(p(-10).next_up()), 0x01);
        assert_eq!(e4m3_encode(p(-10).next_down()), 0x00);
        assert_eq!(e4m3_encode(3.0 * p(-10)), 0x02, "1.5 steps ties to even 2");
        assert_eq!(e4m3_encode(5.0 * p(-10)), 0x02, "2.5 steps ties to even 2");
        assert_eq!(e4m3_encode(7.0 * p(-10)), 0x04, "3.5 steps ties to even 4");
        assert_eq!(e4m3_encode(15.0 * p(-10)), 0x08, "7.5 steps ties to 8, the smallest normal");
        assert_eq!(e4m3_encode(15.0 * p(-10).next_down()), 0x07);
        assert_eq!(e4m3_encode(f32::from_bits(1)), 0x00);
        assert_eq!(e4m3_encode(-f32::MIN_POSITIVE), 0x80);
    }

    #[test]
    fn decode_known_values() {
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0xfe), -448.0);
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x01), E4M3_MIN_SUBNORMAL);
        assert_eq!(e4m3_decode(0x07), 7.0 * E4M3_MIN_SUBNORMAL);
        assert_eq!(e4m3_decode(0x08), E4M3_MIN_NORMAL);
        assert_eq!(e4m3_decode(0x0f), 1.875 * E4M3_MIN_NORMAL);
        assert_eq!(e4m3_decode(0x80).to_bits(), (-0.0f32).to_bits());
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
        // Strictly increasing over the non-negative finite bytes.
        for b in 0u8..0x7e {
            assert!(e4m3_decode(b) < e4m3_decode(b + 1), "{b:#04x}");
        }
    }

    #[test]
    fn ue8m0_rounds_up_to_powers_of_two() {
        assert_eq!(ue8m0_ceil(1.0), 1.0);
        assert_eq!(ue8m0_ceil(1.0f32.next_up()), 2.0);
        assert_eq!(ue8m0_ceil(1.0f32.next_down()), 1.0, "just below 1 rounds up to 1");
        assert_eq!(ue8m0_ceil(3.0), 4.0);
        assert_eq!(ue8m0_ceil(0.3), 0.5);
        assert_eq!(ue8m0_ceil(1e-4 / 448.0), 2f32.powi(-22));
        assert_eq!(ue8m0_ceil(2f32.powi(127)), 2f32.powi(127));
        assert_eq!(ue8m0_ceil(f32::MAX), f32::INFINITY);
        assert_eq!(ue8m0_ceil(f32::INFINITY), f32::INFINITY);
        assert_eq!(ue8m0_ceil(0.0).to_bits(), 0);
        assert_eq!(ue8m0_ceil(-0.0).to_bits(), 0x8000_0000);
        assert_eq!(ue8m0_ceil(-3.0), -4.0);
        assert_eq!(ue8m0_ceil(f32::from_bits(3)), f32::MIN_POSITIVE);
        assert_eq!(ue8m0_ceil(f32::from_bits(0x007f_ffff)), f32::MIN_POSITIVE);
        assert!(ue8m0_ceil(f32::NAN).is_nan());
    }
}
