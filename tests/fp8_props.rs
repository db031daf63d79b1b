//! Properties of the CPU FP8 numerics (no GPU). What each proves:
//! - `encode_matches_oracle_*`: E4M3 rounding equals an independent oracle (nearest of all 254
//!   finite E4M3 values in f64, ties to the even mantissa, saturating), on random bit patterns and a
//!   dense sweep of every rounding boundary. This pins the rounding the GPU's `cvt` must match.
//! - `encode_matches_float8`: agreement with the `float8` crate (a port of CUDA's cuda_fp8.hpp).
//! - decode/encode round trips, monotonicity, saturation, UE8M0 rounding.
//! - quantiser error bounds, exact power-of-two cases, per-block scale coverage.
//! - the comparators flag what they should.

use deepkern::check::{allclose, bitwise_eq, calc_diff};
use deepkern::fp8::{E4M3_MAX, e4m3_decode, e4m3_encode, ue8m0_ceil};
use deepkern::layout::GROUP;
use deepkern::reference::quant::{AMAX_FLOOR, ScaleFormat, per_block, per_token_group};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The finite E4M3 bytes of non-negative value, in increasing order (0x00..=0x7E).
fn finite_positive() -> impl Iterator<Item = u8> {
    0u8..=0x7e
}

/// Oracle: the E4M3 byte nearest to `x` (f64 arithmetic, exact for these magnitudes), ties to the
/// even mantissa, magnitudes beyond 448 saturating.
fn oracle(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = f64::from(x.abs());
    if a >= 448.0 {
        return sign | 0x7e;
    }
    let mut best = 0u8;
    let mut best_err = f64::INFINITY;
    for b in finite_positive() {
        let err = (f64::from(e4m3_decode(b)) - a).abs();
        if err < best_err || (err == best_err && b & 1 == 0) {
            best = b;
            best_err = err;
        }
    }
    sign | best
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(512)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encode_matches_oracle_on_random_bits(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            prop_assert!(e4m3_decode(e4m3_encode(x)).is_nan());
        } else {
            prop_assert_eq!(e4m3_encode(x), oracle(x), "x = {:e} ({:#x})", x, bits);
        }
    }

    #[test]
    fn encode_matches_oracle_in_range(x in -500.0f32..500.0) {
        prop_assert_eq!(e4m3_encode(x), oracle(x), "x = {:e}", x);
    }

    #[test]
    fn encode_matches_float8(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        if !x.is_nan() {
            prop_assert_eq!(e4m3_encode(x), float8::F8E4M3::from_f32(x).to_bits(), "x = {:e}", x);
        }
    }

    #[test]
    fn encode_is_monotonic(a in -1000.0f32..1000.0, b in -1000.0f32..1000.0) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(e4m3_decode(e4m3_encode(lo)) <= e4m3_decode(e4m3_encode(hi)));
    }

    #[test]
    fn ue8m0_is_the_next_power_of_two(bits in 0x0080_0000u32..=0x7f00_0000) {
        // Above 2^127 the next power of two is +inf (checked in the unit tests).
        let s = f32::from_bits(bits);
        let p = ue8m0_ceil(s);
        prop_assert_eq!(p.to_bits() & 0x007f_ffff, 0, "not a power of two");
        prop_assert!(p >= s && p < 2.0 * s, "{:e} -> {:e}", s, p);
    }

    #[test]
    fn token_group_error_is_within_half_an_ulp(
        m in 1usize..4, k in 1usize..300, log_mag in -8.0f32..6.0, seed in any::<u64>(), ue8m0 in any::<bool>()
    ) {
        let fmt = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let x = values(m * k, 10f32.powf(log_mag), seed);
        let r = per_token_group(&x, m, k, fmt);
        let back = r.dequant();
        let kb = k.div_ceil(GROUP);
        for (i, (&v, &d)) in x.iter().zip(&back).enumerate() {
            let scale = r.scales[(i / k) * kb + (i % k) / GROUP];
            // E4M3 has 3 mantissa bits: half an ulp is 2^-4 relative for normals, and 2^-10
            // absolute (times the scale) in the subnormal range. No saturation: |x / scale| <= 448.
            let bound = (f64::from(v.abs()) * 2f64.powi(-4)).max(f64::from(scale) * 2f64.powi(-10));
            prop_assert!(f64::from((d - v).abs()) <= bound * (1.0 + 1e-6), "element {}: {:e} -> {:e}", i, v, d);
        }
    }

    #[test]
    fn token_group_amax_lands_on_448(k in 1usize..260, log_mag in -3.0f32..6.0, seed in any::<u64>()) {
        let x = values(k, 10f32.powf(log_mag), seed);
        let r = per_token_group(&x, 1, k, ScaleFormat::F32);
        for (g, chunk) in x.chunks(GROUP).enumerate() {
            let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            if amax < AMAX_FLOOR {
                continue;
            }
            let at = g * GROUP + chunk.iter().position(|v| v.abs() == amax).unwrap();
            // amax * (1 / (amax / 448)) is within two f32 roundings of 448, which E4M3 maps to 448.
            prop_assert_eq!(e4m3_decode(r.q[at]).abs(), E4M3_MAX);
        }
    }

    #[test]
    fn exact_power_of_two_cases_round_trip(exps in proptest::collection::vec(-30i32..30, 1..6), seed in any::<u64>()) {
        // Each group: small E4M3-representable integers times 2^e, with one element at 448·2^e.
        const INTS: [f32; 9] = [0.0, 1.0, 2.0, 3.0, 6.0, 13.0, 56.0, 208.0, 448.0];
        let mut rng = SmallRng::seed_from_u64(seed);
        let k = exps.len() * GROUP;
        let mut x = Vec::with_capacity(k);
        for &e in &exps {
            let p = 2f32.powi(e);
            for j in 0..GROUP {
                let n = if j == 0 { 448.0 } else { INTS[rng.random_range(0..INTS.len())] };
                x.push(if rng.random_bool(0.5) { n * p } else { -n * p });
            }
        }
        for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let r = per_token_group(&x, 1, k, fmt);
            let want: Vec<f32> = exps.iter().map(|&e| 2f32.powi(e).max(AMAX_FLOOR / 448.0)).collect();
            if exps.iter().all(|&e| 448.0 * 2f32.powi(e) >= AMAX_FLOOR) {
                prop_assert_eq!(&r.scales, &want);
                prop_assert!(bitwise_eq(&r.dequant(), &x).is_ok());
            }
        }
    }

    #[test]
    fn per_block_uses_each_blocks_scale(n in 1usize..300, k in 1usize..300, seed in any::<u64>(), ue8m0 in any::<bool>()) {
        let fmt = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let w = values(n * k, 3.0, seed);
        let b = per_block(&w, n, k, fmt);
        let kb = k.div_ceil(GROUP);
        prop_assert_eq!(b.scales.len(), n.div_ceil(GROUP) * kb);
        for bn in 0..n.div_ceil(GROUP) {
            for bk in 0..kb {
                let mut amax = 0.0f32;
                for r in bn * GROUP..((bn + 1) * GROUP).min(n) {
                    for c in bk * GROUP..((bk + 1) * GROUP).min(k) {
                        amax = amax.max(w[r * k + c].abs());
                    }
                }
                let s = amax.max(AMAX_FLOOR) / 448.0;
                let s = if ue8m0 { ue8m0_ceil(s) } else { s };
                prop_assert_eq!(b.scales[bn * kb + bk], s);
            }
        }
        let back = b.dequant();
        prop_assert!(calc_diff(&back, &w) < 1e-2, "calc_diff {}", calc_diff(&back, &w));
    }

    #[test]
    fn comparators(xs in proptest::collection::vec(-1e3f32..1e3, 1..64), at in any::<prop::sample::Index>()) {
        prop_assume!(xs.iter().any(|&v| v != 0.0));
        prop_assert_eq!(calc_diff(&xs, &xs), 0.0);
        let neg: Vec<f32> = xs.iter().map(|v| -v).collect();
        prop_assert!((calc_diff(&xs, &neg) - 2.0).abs() < 1e-12);
        let i = at.index(xs.len());
        let mut ys = xs.clone();
        ys[i] += 1.0 + ys[i].abs();
        let d = calc_diff(&xs, &ys);
        prop_assert!(d > 0.0 && d <= 2.0 && (d - calc_diff(&ys, &xs)).abs() < 1e-15);
        let m = allclose(&ys, &xs, 1e-3, 1e-3).unwrap_err();
        prop_assert_eq!((m.count, m.first_index), (1, i));
        prop_assert_eq!(bitwise_eq(&ys, &xs).unwrap_err().first_index, i);
        ys[i] = f32::NAN;
        prop_assert!(allclose(&ys, &xs, 1e9, 1e9).is_err());
        let mut nan_both = xs.clone();
        nan_both[i] = f32::NAN;
        prop_assert!(allclose(&ys, &nan_both, 0.0, 0.0).is_ok());
    }
}

/// Deterministic pseudo-random values of magnitude up to `scale`, with exact zeros and
/// sign changes mixed in.
fn values(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| if rng.random_ratio(1, 17) { 0.0 } else { rng.random_range(-scale..=scale) }).collect()
}

#[test]
fn every_byte_round_trips() {
    for b in 0u8..=255 {
        let v = e4m3_decode(b);
        if b & 0x7f == 0x7f {
            assert!(v.is_nan(), "{b:#04x}");
        } else {
            assert_eq!(e4m3_encode(v), b, "{b:#04x} decodes to {v:e}");
        }
    }
}

#[test]
fn saturation() {
    for (x, b) in [(448.0f32, 0x7e), (449.0, 0x7e), (464.0, 0x7e), (1e30, 0x7e), (f32::INFINITY, 0x7e), (f32::MAX, 0x7e)] {
        assert_eq!(e4m3_encode(x), b, "{x:e}");
        assert_eq!(e4m3_encode(-x), b | 0x80, "{:e}", -x);
    }
}

/// Every rounding boundary: each midpoint between consecutive E4M3 values, and the f32 values a
/// few ulps either side of it and of each E4M3 value, in both signs.
#[test]
fn encode_matches_oracle_at_every_boundary() {
    let vals: Vec<f32> = finite_positive().map(e4m3_decode).collect();
    let mut points = Vec::new();
    for w in vals.windows(2) {
        let mid = ((f64::from(w[0]) + f64::from(w[1])) / 2.0) as f32; // exact: 5 significant bits
        for p in [w[0], mid, w[1]] {
            for d in -3i32..=3 {
                points.push(f32::from_bits((p.to_bits() as i32 + d).max(0) as u32));
            }
        }
    }
    points.extend([2f32.powi(-10), 2f32.powi(-11), 464.0, 447.99997, 448.00003, 1e-45]);
    for x in points {
        for x in [x, -x] {
            assert_eq!(e4m3_encode(x), oracle(x), "x = {x:e} ({:#x})", x.to_bits());
            assert_eq!(e4m3_encode(x), float8::F8E4M3::from_f32(x).to_bits(), "float8 disagrees at {x:e}");
        }
    }
}

/// A strided sweep over all f32 bit patterns against float8 (cheap per value, no oracle search).
#[test]
fn encode_matches_float8_on_a_sweep() {
    let mut bits = 0u64;
    while bits < 1 << 32 {
        let x = f32::from_bits(bits as u32);
        if !x.is_nan() {
            assert_eq!(e4m3_encode(x), float8::F8E4M3::from_f32(x).to_bits(), "x = {x:e} ({bits:#x})");
        }
        bits += 4099;
    }
}
