//! Properties of the CPU FP8 numerics (`deepkern::fp8`, `reference::quant`, `check`); no GPU.
//!
//! What each group of tests pins down:
//! - Rounding of `e4m3_encode`: equal to an independent oracle (the nearest of all finite E4M3 values
//!   computed in f64, ties to the even mantissa, saturating) at every rounding boundary and on random
//!   inputs, and equal to the `float8` crate (a port of CUDA's cuda_fp8.hpp, RNE + satfinite) on
//!   random bit patterns and on a dense strided sweep of every magnitude from 2^-12 to 2^10. The
//!   GPU's `cvt.rn.satfinite.e4m3x2.f32` must match the same function.
//! - Exhaustive byte round trips, monotonicity, saturation, UE8M0 rounding.
//! - The quantisers: error bounds, the amax element landing on 448, power-of-two scales, exact
//!   power-of-two cases, ragged shapes, and per-block scale coverage.
//! - The comparators flag what they should and nothing else.

use deepkern::check::{allclose, assert_no_nan, bitwise_eq, calc_diff};
use deepkern::fp8::{E4M3_MAX, e4m3_decode, e4m3_encode, ue8m0_ceil};
use deepkern::layout::GROUP;
use deepkern::reference::quant::{AMAX_FLOOR, ScaleFormat, amax, group_scale, per_block, per_token_group};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Oracle: the E4M3 byte nearest to `x`, searched over all 127 non-negative finite values in f64
/// (exact here), ties to the even mantissa (the even byte), magnitudes of 448 and above saturating.
/// Shares nothing with the implementation under test but `e4m3_decode`, which is checked
/// separately against `float8`.
fn oracle(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = f64::from(x.abs());
    if a >= 448.0 {
        return sign | 0x7e;
    }
    let mut best = 0u8;
    let mut best_err = f64::INFINITY;
    for b in 0u8..=0x7e {
        let err = (f64::from(e4m3_decode(b)) - a).abs();
        if err < best_err || (err == best_err && b & 1 == 0) {
            best = b;
            best_err = err;
        }
    }
    sign | best
}

fn float8_bits(x: f32) -> u8 {
    float8::F8E4M3::from_f32(x).to_bits()
}

/// f32 with magnitude in [2^-13, 512) and either sign: where E4M3 rounding happens.
fn e4m3_range() -> impl Strategy<Value = f32> {
    (any::<bool>(), 0x3900_0000u32..0x4400_0000).prop_map(|(neg, bits)| f32::from_bits(bits | if neg { 0x8000_0000 } else { 0 }))
}

fn fmt_of(ue8m0: bool) -> ScaleFormat {
    if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 }
}

/// A provable bound on `|dequant(quant(x)) - x|` for an element quantised with scale `s` (no
/// saturation, which the recipe guarantees for finite inputs): E4M3 rounds `y = x · inv` to within
/// half a step, which is at most 2^-4·|y| for normals and 2^-10 for subnormals; scaling back by `s`
/// and the three f32 roundings (`1/s`, `x·inv`, `q·s`) add less than 2^-21·(|x| + s).
fn error_bound(x: f32, s: f32) -> f64 {
    let (x, s) = (f64::from(x.abs()), f64::from(s));
    (x * 2f64.powi(-4)).max(s * 2f64.powi(-10)) + 2f64.powi(-21) * (x + s)
}

/// Deterministic values of magnitude up to `scale`, with exact zeros and sign changes mixed in.
fn values(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| if rng.random_ratio(1, 17) { 0.0 } else { rng.random_range(-scale..=scale) }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_matches_float8_on_random_bits(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            prop_assert_eq!(e4m3_encode(x), 0x7f);
            prop_assert!(e4m3_decode(float8_bits(x)).is_nan(), "float8 keeps NaN");
        } else {
            prop_assert_eq!(e4m3_encode(x), float8_bits(x), "x = {:e} ({:#010x})", x, bits);
        }
    }

    #[test]
    fn encode_matches_oracle_on_random_bits(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        prop_assume!(!x.is_nan());
        prop_assert_eq!(e4m3_encode(x), oracle(x), "x = {:e} ({:#010x})", x, bits);
    }

    #[test]
    fn encode_matches_oracle_and_float8_in_range(x in e4m3_range()) {
        prop_assert_eq!(e4m3_encode(x), oracle(x), "x = {:e} ({:#010x})", x, x.to_bits());
        prop_assert_eq!(e4m3_encode(x), float8_bits(x), "x = {:e} ({:#010x})", x, x.to_bits());
    }

    #[test]
    fn encode_is_monotonic(a in any::<u32>(), b in any::<u32>()) {
        let (a, b) = (f32::from_bits(a), f32::from_bits(b));
        prop_assume!(!a.is_nan() && !b.is_nan());
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(e4m3_decode(e4m3_encode(lo)) <= e4m3_decode(e4m3_encode(hi)), "{:e} <= {:e}", lo, hi);
    }

    #[test]
    fn encode_is_monotonic_in_range(a in e4m3_range(), b in e4m3_range()) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(e4m3_decode(e4m3_encode(lo)) <= e4m3_decode(e4m3_encode(hi)), "{:e} <= {:e}", lo, hi);
    }

    #[test]
    fn ue8m0_is_the_next_power_of_two(bits in 0x0080_0000u32..0x7f00_0000) {
        // Positive normals below 2^127 (above it, non-powers round to +inf: see the unit tests).
        let s = f32::from_bits(bits);
        let p = ue8m0_ceil(s);
        prop_assert_eq!(p.to_bits() & 0x007f_ffff, 0, "{:e} -> {:e} is not a power of two", s, p);
        prop_assert!(p >= s && p < 2.0 * s, "{:e} -> {:e}", s, p);
        prop_assert_eq!(ue8m0_ceil(-s), -p);
        prop_assert_eq!(ue8m0_ceil(p), p, "powers of two are fixed points");
    }

    #[test]
    fn ue8m0_keeps_powers_of_two(e in -126i32..=127) {
        let p = 2f32.powi(e);
        prop_assert_eq!(ue8m0_ceil(p), p);
    }

    #[test]
    fn token_group_error_is_bounded(
        m in 1usize..4, k in 1usize..300, log_mag in -8.0f32..6.0, seed in any::<u64>(), ue8m0 in any::<bool>()
    ) {
        let fmt = fmt_of(ue8m0);
        let x = values(m * k, 10f32.powf(log_mag), seed);
        let r = per_token_group(&x, m, k, fmt);
        prop_assert_eq!(r.q.len(), m * k);
        prop_assert_eq!(r.scales.len(), m * k.div_ceil(GROUP));
        let back = r.dequant();
        for (i, (&v, &d)) in x.iter().zip(&back).enumerate() {
            let s = r.scale_at(i / k, i % k);
            let err = f64::from(d) - f64::from(v);
            prop_assert!(err.abs() <= error_bound(v, s), "element {}: {:e} -> {:e} (scale {:e})", i, v, d, s);
        }
    }

    #[test]
    fn token_group_scales_follow_the_recipe(m in 1usize..4, k in 1usize..300, log_mag in -8.0f32..6.0, seed in any::<u64>()) {
        let x = values(m * k, 10f32.powf(log_mag), seed);
        let (f, u) = (per_token_group(&x, m, k, ScaleFormat::F32), per_token_group(&x, m, k, ScaleFormat::Ue8m0));
        let kb = k.div_ceil(GROUP);
        for r in 0..m {
            for (g, chunk) in x[r * k..(r + 1) * k].chunks(GROUP).enumerate() {
                let a = chunk.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
                let (sf, su) = (f.scales[r * kb + g], u.scales[r * kb + g]);
                prop_assert_eq!(sf, a.max(AMAX_FLOOR) / 448.0);
                prop_assert_eq!(su, ue8m0_ceil(sf));
                prop_assert_eq!(su.to_bits() & 0x007f_ffff, 0, "UE8M0 scale {:e} is not a power of two", su);
                prop_assert!(su >= sf && su < 2.0 * sf);
            }
        }
    }

    #[test]
    fn token_group_amax_lands_on_448(k in 1usize..300, log_mag in -6.0f32..30.0, seed in any::<u64>()) {
        // F32 scales: amax · fl(1 / fl(amax / 448)) is within three f32 roundings of 448, and E4M3
        // rounds everything in (432, 464) to 448: the amax element is exactly ±448 (0x7E / 0xFE)
        // whenever amax >= 1e-4 and is finite. UE8M0 scales are up to 2x larger: the amax element
        // lands in [224, 448]. Nothing saturates. Below the floor the code shrinks in proportion.
        let x = values(k, 10f32.powf(log_mag), seed);
        let (f, u) = (per_token_group(&x, 1, k, ScaleFormat::F32), per_token_group(&x, 1, k, ScaleFormat::Ue8m0));
        for (g, chunk) in x.chunks(GROUP).enumerate() {
            let a = amax(chunk);
            let Some(j) = chunk.iter().position(|v| v.abs() == a) else { continue };
            let at = g * GROUP + j;
            if a >= AMAX_FLOOR {
                prop_assert_eq!(f.q[at] & 0x7f, 0x7e, "amax {:e} encodes to {:#04x}", a, f.q[at]);
                prop_assert_eq!(f.q[at] & 0x80, if chunk[j] < 0.0 { 0x80 } else { 0 });
                let d = e4m3_decode(u.q[at]).abs();
                prop_assert!((224.0..=E4M3_MAX).contains(&d), "UE8M0: amax {:e} decodes to {:e}", a, d);
            } else {
                // Below the floor the scale is fl(1e-4 / 448), so the amax element encodes about
                // 448 · amax / 1e-4 (just under the floor that still rounds to 448).
                let y = 448.0 * f64::from(a) / f64::from(AMAX_FLOOR);
                let d = f64::from(e4m3_decode(f.q[at]).abs());
                let bound = (y * 2f64.powi(-4)).max(2f64.powi(-10)) + 2f64.powi(-20) * (y + 1.0);
                prop_assert!((d - y).abs() <= bound, "amax {:e} under the floor decodes to {:e}, want about {:e}", a, d, y);
            }
        }
    }

    #[test]
    fn exact_power_of_two_cases_round_trip(
        exps in proptest::collection::vec(-22i32..=40, 1..5), tail in 0usize..GROUP, seed in any::<u64>()
    ) {
        // Each group: arbitrary finite E4M3 values times 2^e, one of them ±448 · 2^e (the amax). Then
        // the scale is exactly 2^e in both formats (448 · 2^e >= 1e-4 for e >= -22), `x · inv` is the
        // E4M3 value itself, and quantising gives back exactly the chosen bytes and values.
        let mut rng = SmallRng::seed_from_u64(seed);
        let groups = exps.len();
        let k = (groups - 1) * GROUP + tail + 1; // the last group may be partial
        let (mut x, mut bytes) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for (g, &e) in exps.iter().enumerate() {
            let len = (k - g * GROUP).min(GROUP);
            let top = rng.random_range(0..len);
            let p = 2f32.powi(e);
            for j in 0..len {
                let magnitude = if j == top { 0x7e } else { rng.random_range(0u8..=0x7e) };
                let b = magnitude | if rng.random_bool(0.5) { 0x80 } else { 0 };
                bytes.push(b);
                x.push(e4m3_decode(b) * p);
            }
        }
        for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let r = per_token_group(&x, 1, k, fmt);
            let want: Vec<f32> = exps.iter().map(|&e| 2f32.powi(e)).collect();
            prop_assert_eq!(&r.scales, &want, "{:?}", fmt);
            prop_assert!(bitwise_eq(&r.q, &bytes).is_ok(), "{:?}: {}", fmt, bitwise_eq(&r.q, &bytes).unwrap_err());
            let back = r.dequant();
            prop_assert!(bitwise_eq(&back, &x).is_ok(), "{:?}: {}", fmt, bitwise_eq(&back, &x).unwrap_err());
            prop_assert!(r.dequant_f64().iter().zip(&x).all(|(&d, &v)| d == f64::from(v)));
        }
    }

    #[test]
    fn comparators(xs in proptest::collection::vec(-1e3f32..1e3, 1..64), ys in proptest::collection::vec(-1e3f32..1e3, 64), at in any::<prop::sample::Index>()) {
        prop_assume!(xs.iter().any(|&v| v != 0.0));
        let ys = &ys[..xs.len()];
        prop_assert_eq!(calc_diff(&xs, &xs), 0.0);
        let neg: Vec<f32> = xs.iter().map(|v| -v).collect();
        prop_assert_eq!(calc_diff(&xs, &neg), 2.0);
        let d = calc_diff(&xs, ys);
        prop_assert_eq!(d, calc_diff(ys, &xs), "symmetric");
        prop_assert!((-1e-12..=2.0 + 1e-12).contains(&d), "calc_diff {} outside [0, 2]", d);
        // One perturbed element: found by allclose (count and index) and bitwise_eq.
        let i = at.index(xs.len());
        let mut perturbed = xs.clone();
        perturbed[i] += 1.0 + perturbed[i].abs();
        prop_assert!(calc_diff(&xs, &perturbed) > 0.0);
        let m = allclose(&perturbed, &xs, 1e-3, 1e-3).unwrap_err();
        prop_assert_eq!((m.count, m.first_index, m.len), (1, i, xs.len()));
        prop_assert_eq!(m.first_actual, f64::from(perturbed[i]));
        prop_assert!(allclose(&xs, &xs, 0.0, 0.0).is_ok());
        let bm = bitwise_eq(&perturbed, &xs).unwrap_err();
        prop_assert_eq!((bm.count, bm.first_index), (1, i));
        // NaN against a number fails whatever the tolerance; NaN against NaN passes.
        perturbed[i] = f32::NAN;
        prop_assert!(allclose(&perturbed, &xs, 1e9, 1e9).is_err());
        prop_assert!(allclose(&xs, &perturbed, 1e9, 1e9).is_err());
        prop_assert_eq!(assert_no_nan(&perturbed), Err(i));
        let mut nan_too = xs.clone();
        nan_too[i] = f32::NAN;
        prop_assert!(allclose(&perturbed, &nan_too, 0.0, 0.0).is_ok());
    }
}

proptest! {
    // Up to 260 x 260 elements per case, each re-encoded by the check: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn per_block_uses_each_blocks_scale(n in 1usize..260, k in 1usize..260, seed in any::<u64>(), ue8m0 in any::<bool>()) {
        let fmt = fmt_of(ue8m0);
        let w = values(n * k, 3.0, seed);
        let b = per_block(&w, n, k, fmt);
        let (nb, kb) = (n.div_ceil(GROUP), k.div_ceil(GROUP));
        prop_assert_eq!(b.scales.len(), nb * kb);
        prop_assert_eq!(b.q.len(), n * k);
        // Scales: the recipe over each (possibly ragged) block, computed independently.
        for bn in 0..nb {
            for bk in 0..kb {
                let mut a = 0.0f32;
                for r in bn * GROUP..((bn + 1) * GROUP).min(n) {
                    for c in bk * GROUP..((bk + 1) * GROUP).min(k) {
                        a = a.max(w[r * k + c].abs());
                    }
                }
                prop_assert_eq!(b.scales[bn * kb + bk], group_scale(a, fmt), "block ({}, {})", bn, bk);
            }
        }
        // Every element is encoded with its own block's scale, and dequantises within the bound.
        let back = b.dequant();
        for r in 0..n {
            for c in 0..k {
                let s = b.scales[(r / GROUP) * kb + c / GROUP];
                let i = r * k + c;
                prop_assert_eq!(b.q[i], e4m3_encode(w[i] * (1.0f32 / s)), "element ({}, {})", r, c);
                prop_assert!((f64::from(back[i]) - f64::from(w[i])).abs() <= error_bound(w[i], s), "element ({}, {})", r, c);
            }
        }
        // A single row is a 1x128 grouping: per_block and per_token_group must agree on it.
        let row = per_token_group(&w[..k], 1, k, fmt);
        let first = per_block(&w[..k], 1, k, fmt);
        prop_assert_eq!((&row.q, &row.scales), (&first.q, &first.scales));
    }
}

#[test]
fn every_byte_round_trips() {
    for b in 0u8..=255 {
        let v = e4m3_decode(b);
        let f8 = float8::F8E4M3::from_bits(b).to_f32();
        if b & 0x7f == 0x7f {
            assert!(v.is_nan() && f8.is_nan(), "{b:#04x} must be NaN");
        } else {
            assert_eq!(v.to_bits(), f8.to_bits(), "{b:#04x}: decode disagrees with float8");
            assert_eq!(e4m3_encode(v), b, "{b:#04x} decodes to {v:e}");
        }
    }
    assert_eq!(e4m3_encode(-0.0), 0x80);
    assert_eq!(e4m3_decode(0x80).to_bits(), 0x8000_0000);
}

#[test]
fn saturation() {
    let cases = [(448.0f32, 0x7e), (449.0, 0x7e), (463.99997, 0x7e), (464.0, 0x7e), (464.00003, 0x7e), (1e30, 0x7e)];
    for (x, b) in cases.into_iter().chain([(f32::INFINITY, 0x7e), (f32::MAX, 0x7e)]) {
        assert_eq!(e4m3_encode(x), b, "{x:e}");
        assert_eq!(e4m3_encode(-x), b | 0x80, "{:e}", -x);
        assert_eq!(float8_bits(x), b, "float8 at {x:e}");
    }
    assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0xfe);
}

/// Every rounding boundary: each midpoint between consecutive E4M3 magnitudes (from 0 up to the
/// virtual 480 above 448), its f32 neighbours up to 3 ulps away, and the same around each E4M3
/// value, in both signs. At a midpoint the even byte wins, below it the lower value, above it the
/// upper one (saturating to 448). Checked against that rule, the oracle and float8.
#[test]
fn encode_at_every_boundary() {
    let mut vals: Vec<f64> = (0u8..=0x7e).map(|b| f64::from(e4m3_decode(b))).collect();
    vals.push(480.0); // what 0x7F would be without the NaN encoding: the midpoint 464 saturates
    let mut checked = 0;
    for (lo, w) in vals.windows(2).enumerate() {
        let lo = lo as u8;
        let hi = (lo + 1).min(0x7e);
        let mid = ((w[0] + w[1]) / 2.0) as f32; // exact: at most 5 significant bits
        let even = if lo & 1 == 0 { lo } else { hi };
        for d in -3i32..=3 {
            let x = f32::from_bits((mid.to_bits() as i32 + d) as u32);
            let want = match d.signum() {
                -1 => lo,
                0 => even,
                _ => hi,
            };
            for p in [w[0] as f32, w[1] as f32] {
                let y = f32::from_bits((p.to_bits() as i32 + d).max(0) as u32);
                for y in [y, -y] {
                    assert_eq!(e4m3_encode(y), oracle(y), "near a value: x = {y:e} ({:#010x})", y.to_bits());
                    assert_eq!(e4m3_encode(y), float8_bits(y), "float8 near a value: x = {y:e}");
                }
            }
            for (x, want) in [(x, want), (-x, want | 0x80)] {
                assert_eq!(e4m3_encode(x), want, "x = {x:e} ({:#010x}), {d} ulps from the midpoint {mid:e}", x.to_bits());
                assert_eq!(oracle(x), want, "oracle at {x:e}");
                assert_eq!(float8_bits(x), want, "float8 at {x:e}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 127 * 7 * 2);
}

/// A dense strided sweep over every f32 whose magnitude lies in [2^-12, 2^10] (all of E4M3's range
/// and past both ends), both signs: equal to float8 everywhere, and non-decreasing in the input.
/// The stride is odd, so the sweep visits every residue of the low mantissa bits that decide
/// rounding; `encode_at_every_boundary` covers the exact ties.
#[test]
fn encode_matches_float8_on_a_dense_sweep() {
    const LO: u32 = 0x3980_0000; // 2^-12
    const HI: u32 = 0x4480_0000; // 2^10
    const STRIDE: u32 = 53;
    let mut prev = 0u8;
    let mut bits = LO;
    let mut n = 0u32;
    while bits <= HI {
        let x = f32::from_bits(bits);
        let q = e4m3_encode(x);
        assert_eq!(q, float8_bits(x), "x = {x:e} ({bits:#010x})");
        assert_eq!(e4m3_encode(-x), q | 0x80, "sign symmetry at {x:e}");
        assert!(q >= prev, "not monotonic at {x:e}: {q:#04x} after {prev:#04x}");
        prev = q;
        bits += STRIDE;
        n += 1;
    }
    assert!(n > 3_000_000);
    assert_eq!(prev, 0x7e);
}

/// A coarse sweep over the whole f32 bit space (both signs, NaN excluded) against float8.
#[test]
fn encode_matches_float8_on_all_bit_patterns_strided() {
    let mut bits = 0u64;
    while bits < 1 << 32 {
        let x = f32::from_bits(bits as u32);
        if !x.is_nan() {
            assert_eq!(e4m3_encode(x), float8_bits(x), "x = {x:e} ({bits:#010x})");
        }
        bits += 16411;
    }
}

/// 128x128 blocks with distinct amaxes: each block gets exactly its own scale, and each block's
/// amax element encodes to 448 (shapes ragged in both dimensions).
#[test]
fn per_block_blocks_are_independent() {
    let (n, k) = (300, 200);
    let (nb, kb) = (3, 2);
    let mut w = vec![0.0f32; n * k];
    for r in 0..n {
        for c in 0..k {
            let block = (r / GROUP) * kb + c / GROUP;
            let top = (block + 1) as f32;
            // The block's first element is its amax; the rest are smaller.
            let first = r % GROUP == 0 && c % GROUP == 0;
            w[r * k + c] = if first { top } else { top * ((r * 7 + c * 3) % 97) as f32 / 100.0 };
        }
    }
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let b = per_block(&w, n, k, fmt);
        assert_eq!((b.n_blocks(), b.k_blocks()), (nb, kb));
        for block in 0..nb * kb {
            assert_eq!(b.scales[block], group_scale((block + 1) as f32, fmt), "{fmt:?} block {block}");
        }
        for r in 0..n {
            for c in 0..k {
                assert_eq!(b.scale_at(r, c), b.scales[(r / GROUP) * kb + c / GROUP]);
            }
        }
        if fmt == ScaleFormat::F32 {
            for bn in 0..nb {
                for bk in 0..kb {
                    assert_eq!(b.q[bn * GROUP * k + bk * GROUP], 0x7e, "block ({bn}, {bk})");
                }
            }
        }
        let back = b.dequant();
        assert!(calc_diff(&back, &w) < 1e-3, "calc_diff {}", calc_diff(&back, &w));
    }
}
