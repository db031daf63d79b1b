//! FP8 quantisation on the CPU: DeepSeek-V3's recipe, as DeepGEMM casts activations and weights.
//!
//! For every group (1x128 along a row for activations, 128x128 blocks for weights), in f32:
//!
//! ```text
//! amax  = fold(0.0, |acc, x| acc.max(|x|))      // f32::max, so NaN inputs are skipped (CUDA fmaxf)
//! scale = max(amax, 1e-4) / 448                 // one f32 division, round to nearest
//! scale = ue8m0_ceil(scale)                     // only for ScaleFormat::Ue8m0: a power of two, rounded up
//! inv   = 1 / scale                             // once per group, f32
//! q     = e4m3_encode(x * inv)                  // one f32 multiply (no FMA), then RNE + saturation
//! ```
//!
//! The GPU quantisers perform exactly these f32 operations (`csrc/quant/recipe.cuh`), so their
//! bytes and scales equal these bit for bit. Do not change the sequence here without changing it
//! there.
//!
//! Consequences worth knowing:
//! - for `F32` scales and a finite amax of at least `1e-4`, the element holding the amax encodes
//!   to exactly ±448 (`x * inv` is within three f32 roundings of 448, far inside E4M3's rounding
//!   interval of 448), and nothing saturates;
//! - `Ue8m0` scales are `>=` the `F32` ones, so `|x * inv| <= 448` (up to f32 rounding) there too;
//! - an infinite input makes its group's scale infinite and `inv` zero: finite elements then encode
//!   to ±0 and the infinite one to NaN (`inf · 0`). NaN inputs encode to NaN (`0x7F`).
//!
//! Scales come out row-major; [`crate::layout::scales_to_tma_layout`] converts activation scales to
//! the kernels' transposed layout.

use crate::fp8::{E4M3_MAX, e4m3_decode, e4m3_encode, ue8m0_ceil};
use crate::layout::{GROUP, ceil_div};

/// Lower bound on a group's amax, so an all-zero group gets a finite, non-zero scale `1e-4 / 448`.
pub const AMAX_FLOOR: f32 = 1e-4;

/// How scales are represented.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleFormat {
    /// Any f32 scale: `max(amax, 1e-4) / 448`.
    #[default]
    F32,
    /// Powers of two (UE8M0): the `F32` scale rounded up with [`ue8m0_ceil`], so nothing saturates.
    Ue8m0,
}

/// The scale of a group whose largest magnitude is `amax`: `max(amax, 1e-4) / 448` in f32, then
/// rounded up to a power of two for [`ScaleFormat::Ue8m0`]. A NaN `amax` is treated as 0 (by
/// `f32::max`); `amax` from [`amax`] is never NaN.
pub fn group_scale(amax: f32, fmt: ScaleFormat) -> f32 {
    let scale = amax.max(AMAX_FLOOR) / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => scale,
        ScaleFormat::Ue8m0 => ue8m0_ceil(scale),
    }
}

/// Largest magnitude in `xs`: `|x|` folded with `f32::max` from 0.0, so NaN elements are skipped
/// (like CUDA's `fmaxf`) and an empty slice gives 0.
pub fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |acc, v| acc.max(v.abs()))
}

/// Encodes `x` with a given `scale` into `q` (same length): `q[i] = e4m3_encode(x[i] * (1 / scale))`
/// with `1 / scale` computed once in f32 — the last step of the recipe, for callers that already
/// have the scale.
///
/// # Panics
/// If `x` and `q` differ in length.
pub fn encode_with_scale(x: &[f32], scale: f32, q: &mut [u8]) {
    assert_eq!(x.len(), q.len(), "encode_with_scale: x has {} elements but q has {}", x.len(), q.len());
    let inv = 1.0f32 / scale;
    for (out, &v) in q.iter_mut().zip(x) {
        *out = e4m3_encode(v * inv);
    }
}

/// `a * b` elements, or a panic naming the function and the shape if that overflows or does not
/// match `len`.
fn check_len(what: &str, name: &str, a: usize, b: usize, len: usize) {
    let want = a.checked_mul(b);
    assert!(want == Some(len), "{what}: {name} must hold {a} * {b} elements, got {len}");
}

/// Activations quantised per token group: one scale per row per 128 columns.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRows {
    /// `[m, k]` E4M3 bits, row-major.
    pub q: Vec<u8>,
    /// `[m, ceil(k / 128)]` f32 scales, row-major: `scales[r * ceil(k/128) + c / 128]` belongs to
    /// element `(r, c)`. (The kernels use the transposed layout of
    /// [`crate::layout::scales_to_tma_layout`].)
    pub scales: Vec<f32>,
    /// Rows (tokens).
    pub m: usize,
    /// Columns (hidden size); need not be a multiple of 128 here.
    pub k: usize,
}

impl QuantizedRows {
    /// Scale groups per row, `ceil(k / 128)`.
    pub fn k_blocks(&self) -> usize {
        ceil_div(self.k, GROUP)
    }

    /// The scale that element `(row, col)` of the `[m, k]` tensor was quantised with.
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.m && col < self.k, "scale_at: ({row}, {col}) outside [{}, {}]", self.m, self.k);
        self.scales[row * self.k_blocks() + col / GROUP]
    }

    /// Dequantised `[m, k]` values in f32, see [`dequant_per_token_group`].
    pub fn dequant(&self) -> Vec<f32> {
        dequant_per_token_group(&self.q, &self.scales, self.m, self.k)
    }

    /// Dequantised `[m, k]` values in f64 (exact), see [`dequant_per_token_group_f64`].
    pub fn dequant_f64(&self) -> Vec<f64> {
        dequant_per_token_group_f64(&self.q, &self.scales, self.m, self.k)
    }
}

/// Quantises `x` (`[m, k]` f32, row-major) in groups of 128 consecutive elements of a row ("1x128"),
/// following the recipe in the module docs. A last partial group (`k % 128 != 0`) takes its amax
/// over the elements it has (the GPU kernels require `k % 128 == 0`; this reference does not).
///
/// Returns `[m, k]` E4M3 bytes and row-major `[m, ceil(k/128)]` scales.
///
/// # Panics
/// If `x.len() != m * k`.
pub fn per_token_group(x: &[f32], m: usize, k: usize, fmt: ScaleFormat) -> QuantizedRows {
    check_len("per_token_group", "x", m, k, x.len());
    let kb = ceil_div(k, GROUP);
    let mut q = vec![0u8; x.len()];
    let mut scales = Vec::with_capacity(m * kb);
    for r in 0..m {
        let (row, q_row) = (&x[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k]);
        for (group, q_group) in row.chunks(GROUP).zip(q_row.chunks_mut(GROUP)) {
            let scale = group_scale(amax(group), fmt);
            encode_with_scale(group, scale, q_group);
            scales.push(scale);
        }
    }
    QuantizedRows { q, scales, m, k }
}

/// SwiGLU in f32, as the fused GPU kernel computes it: `(g / (1 + exp(-g))) * u`, one rounding per
/// operation (the GPU's `expf` may differ from Rust's `exp` in the last bit).
pub fn silu_mul_f32(g: f32, u: f32) -> f32 {
    (g / (1.0 + (-g).exp())) * u
}

/// The activation of a `[m, 2k]` gate/up tensor (`gate` in columns `0..k`, `up` in `k..2k`):
/// `[m, k]` of [`silu_mul_f32`], then quantised per token group like [`per_token_group`].
///
/// # Panics
/// If `h.len() != m * 2k`.
pub fn silu_mul_per_token_group(h: &[f32], m: usize, k: usize, fmt: ScaleFormat) -> QuantizedRows {
    check_len("silu_mul_per_token_group", "h", m, 2 * k, h.len());
    let a: Vec<f32> = (0..m * k).map(|i| silu_mul_f32(h[i / k * 2 * k + i % k], h[i / k * 2 * k + k + i % k])).collect();
    per_token_group(&a, m, k, fmt)
}

/// Checks the shapes of per-token-group data and returns `ceil(k / 128)`.
fn check_token_group(what: &str, q: &[u8], scales: &[f32], m: usize, k: usize) -> usize {
    let kb = ceil_div(k, GROUP);
    check_len(what, "q", m, k, q.len());
    check_len(what, "scales ([m, ceil(k/128)])", m, kb, scales.len());
    kb
}

/// Dequantises per-token-group data: `q` `[m, k]` E4M3 bytes, `scales` row-major `[m, ceil(k/128)]`.
/// Each element is `e4m3_decode(q) * scale` computed in f32 (one rounding; exact when the scale is a
/// power of two and the product is a normal f32). Returns `[m, k]` row-major.
///
/// # Panics
/// If the lengths do not match the shape.
pub fn dequant_per_token_group(q: &[u8], scales: &[f32], m: usize, k: usize) -> Vec<f32> {
    let kb = check_token_group("dequant_per_token_group", q, scales, m, k);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..m {
        for (g, group) in q[r * k..(r + 1) * k].chunks(GROUP).enumerate() {
            let s = scales[r * kb + g];
            out.extend(group.iter().map(|&b| e4m3_decode(b) * s));
        }
    }
    out
}

/// As [`dequant_per_token_group`] but in f64: `decode(q) as f64 * scale as f64`, which is exact
/// (4 significant bits times 24). For GEMM references that must not round before accumulating.
///
/// # Panics
/// If the lengths do not match the shape.
pub fn dequant_per_token_group_f64(q: &[u8], scales: &[f32], m: usize, k: usize) -> Vec<f64> {
    let kb = check_token_group("dequant_per_token_group_f64", q, scales, m, k);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..m {
        for (g, group) in q[r * k..(r + 1) * k].chunks(GROUP).enumerate() {
            let s = f64::from(scales[r * kb + g]);
            out.extend(group.iter().map(|&b| f64::from(e4m3_decode(b)) * s));
        }
    }
    out
}

/// Weights quantised per 128x128 block: one scale per block.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedBlocks {
    /// `[n, k]` E4M3 bits, row-major.
    pub q: Vec<u8>,
    /// `[ceil(n / 128), ceil(k / 128)]` f32 scales, row-major: `scales[(r / 128) * ceil(k/128) + c / 128]`
    /// belongs to element `(r, c)`.
    pub scales: Vec<f32>,
    /// Rows (output features); need not be a multiple of 128.
    pub n: usize,
    /// Columns (input features); need not be a multiple of 128 here.
    pub k: usize,
}

impl QuantizedBlocks {
    /// Block rows, `ceil(n / 128)`.
    pub fn n_blocks(&self) -> usize {
        ceil_div(self.n, GROUP)
    }

    /// Block columns, `ceil(k / 128)`.
    pub fn k_blocks(&self) -> usize {
        ceil_div(self.k, GROUP)
    }

    /// The scale that element `(row, col)` of the `[n, k]` tensor was quantised with.
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.n && col < self.k, "scale_at: ({row}, {col}) outside [{}, {}]", self.n, self.k);
        self.scales[(row / GROUP) * self.k_blocks() + col / GROUP]
    }

    /// Dequantised `[n, k]` values in f32, see [`dequant_per_block`].
    pub fn dequant(&self) -> Vec<f32> {
        dequant_per_block(&self.q, &self.scales, self.n, self.k)
    }

    /// Dequantised `[n, k]` values in f64 (exact), see [`dequant_per_block_f64`].
    pub fn dequant_f64(&self) -> Vec<f64> {
        dequant_per_block_f64(&self.q, &self.scales, self.n, self.k)
    }
}

/// Quantises a weight `w` (`[n, k]` f32, row-major) in 128x128 blocks, following the recipe in the
/// module docs with one amax and one scale per block. Edge blocks (`n` or `k` not a multiple of
/// 128) take their amax over the elements they have, which is the same as zero padding.
///
/// Returns `[n, k]` E4M3 bytes and row-major `[ceil(n/128), ceil(k/128)]` scales.
///
/// # Panics
/// If `w.len() != n * k`.
pub fn per_block(w: &[f32], n: usize, k: usize, fmt: ScaleFormat) -> QuantizedBlocks {
    check_len("per_block", "w", n, k, w.len());
    let (nb, kb) = (ceil_div(n, GROUP), ceil_div(k, GROUP));
    let mut q = vec![0u8; w.len()];
    let mut scales = vec![0.0f32; nb * kb];
    let mut block_amax = vec![0.0f32; kb];
    for bn in 0..nb {
        let rows = bn * GROUP..((bn + 1) * GROUP).min(n);
        // One pass over the block row for the amax of each of its blocks (max is order-free, so
        // this equals any other reduction order), then one pass to encode.
        block_amax.fill(0.0);
        for r in rows.clone() {
            for (acc, group) in block_amax.iter_mut().zip(w[r * k..(r + 1) * k].chunks(GROUP)) {
                *acc = acc.max(amax(group));
            }
        }
        let block_scales = &mut scales[bn * kb..(bn + 1) * kb];
        for (s, &a) in block_scales.iter_mut().zip(&block_amax) {
            *s = group_scale(a, fmt);
        }
        for r in rows {
            let (row, q_row) = (&w[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k]);
            for ((group, q_group), &s) in row.chunks(GROUP).zip(q_row.chunks_mut(GROUP)).zip(block_scales.iter()) {
                encode_with_scale(group, s, q_group);
            }
        }
    }
    QuantizedBlocks { q, scales, n, k }
}

/// Checks the shapes of per-block data and returns `ceil(k / 128)`.
fn check_blocks(what: &str, q: &[u8], scales: &[f32], n: usize, k: usize) -> usize {
    let kb = ceil_div(k, GROUP);
    check_len(what, "q", n, k, q.len());
    check_len(what, "scales ([ceil(n/128), ceil(k/128)])", ceil_div(n, GROUP), kb, scales.len());
    kb
}

/// Dequantises per-block data: `q` `[n, k]` E4M3 bytes, `scales` row-major
/// `[ceil(n/128), ceil(k/128)]`. Each element is `e4m3_decode(q) * scale` computed in f32. Returns
/// `[n, k]` row-major.
///
/// # Panics
/// If the lengths do not match the shape.
pub fn dequant_per_block(q: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<f32> {
    let kb = check_blocks("dequant_per_block", q, scales, n, k);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..n {
        let block_scales = &scales[(r / GROUP) * kb..(r / GROUP + 1) * kb];
        for (group, &s) in q[r * k..(r + 1) * k].chunks(GROUP).zip(block_scales) {
            out.extend(group.iter().map(|&b| e4m3_decode(b) * s));
        }
    }
    out
}

/// As [`dequant_per_block`] but in f64, exactly (see [`dequant_per_token_group_f64`]).
///
/// # Panics
/// If the lengths do not match the shape.
pub fn dequant_per_block_f64(q: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<f64> {
    let kb = check_blocks("dequant_per_block_f64", q, scales, n, k);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..n {
        let block_scales = &scales[(r / GROUP) * kb..(r / GROUP + 1) * kb];
        for (group, &s) in q[r * k..(r + 1) * k].chunks(GROUP).zip(block_scales) {
            let s = f64::from(s);
            out.extend(group.iter().map(|&b| f64::from(e4m3_decode(b)) * s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_group_gets_the_floor_scale() {
        let r = per_token_group(&[0.0; 128], 1, 128, ScaleFormat::F32);
        assert_eq!(r.scales, [1e-4f32 / 448.0]);
        assert!(r.q.iter().all(|&b| b == 0));
        let r = per_token_group(&[0.0; 128], 1, 128, ScaleFormat::Ue8m0);
        assert_eq!(r.scales, [2f32.powi(-22)], "1e-4/448 = 2.23e-7 rounds up to 2^-22 = 2.38e-7");
    }

    #[test]
    fn amax_element_maps_to_448() {
        let mut x = vec![0.5f32; 256];
        x[3] = -7.0;
        x[200] = 3.0;
        let r = per_token_group(&x, 1, 256, ScaleFormat::F32);
        assert_eq!(r.scales, [7.0 / 448.0, 3.0 / 448.0]);
        assert_eq!(r.q[3], 0xfe);
        assert_eq!(r.q[200], 0x7e);
        assert_eq!(r.scale_at(0, 3), 7.0 / 448.0);
        assert_eq!(r.scale_at(0, 200), 3.0 / 448.0);
    }

    #[test]
    fn nan_is_skipped_by_amax_and_encodes_to_nan() {
        let mut x = vec![1.0f32; 128];
        x[5] = f32::NAN;
        x[6] = -2.0;
        assert_eq!(amax(&x), 2.0);
        let r = per_token_group(&x, 1, 128, ScaleFormat::F32);
        assert_eq!(r.scales, [2.0 / 448.0]);
        assert_eq!(r.q[5], 0x7f);
        assert_eq!(r.q[6], 0xfe);
    }

    #[test]
    fn infinity_gives_an_infinite_scale() {
        let mut x = vec![1.0f32; 128];
        x[0] = f32::INFINITY;
        let r = per_token_group(&x, 1, 128, ScaleFormat::F32);
        assert_eq!(r.scales, [f32::INFINITY]);
        assert_eq!(r.q[0], 0x7f, "inf * 0 is NaN");
        assert_eq!(r.q[1], 0x00);
    }

    #[test]
    fn ragged_groups_and_blocks() {
        let x: Vec<f32> = (0..3 * 200).map(|i| i as f32).collect();
        let r = per_token_group(&x, 3, 200, ScaleFormat::F32);
        assert_eq!(r.scales.len(), 6);
        assert_eq!(r.scales[1], 199.0 / 448.0, "partial group of row 0 covers columns 128..200");
        let w: Vec<f32> = (0..130 * 129).map(|i| (i % 1000) as f32).collect();
        let b = per_block(&w, 130, 129, ScaleFormat::Ue8m0);
        assert_eq!(b.scales.len(), 4);
        assert!(b.scales.iter().all(|s| s.to_bits() & 0x7f_ffff == 0));
        assert_eq!(b.scale_at(129, 128), b.scales[3]);
        assert_eq!(b.scale_at(127, 127), b.scales[0]);
    }

    #[test]
    fn empty_shapes() {
        let r = per_token_group(&[], 0, 7168, ScaleFormat::F32);
        assert!(r.q.is_empty() && r.scales.is_empty());
        let r = per_token_group(&[], 4, 0, ScaleFormat::F32);
        assert!(r.q.is_empty() && r.scales.is_empty());
        let b = per_block(&[], 0, 256, ScaleFormat::Ue8m0);
        assert!(b.q.is_empty() && b.scales.is_empty());
        assert!(dequant_per_block(&[], &[], 0, 256).is_empty());
    }

    #[test]
    fn f32_and_f64_dequant_agree_for_power_of_two_scales() {
        let x: Vec<f32> = (0..2 * 300).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let r = per_token_group(&x, 2, 300, ScaleFormat::Ue8m0);
        let (a, b) = (r.dequant(), r.dequant_f64());
        assert!(a.iter().zip(&b).all(|(&a, &b)| f64::from(a) == b));
        let blocks = per_block(&x, 2, 300, ScaleFormat::Ue8m0);
        let (a, b) = (blocks.dequant(), blocks.dequant_f64());
        assert!(a.iter().zip(&b).all(|(&a, &b)| f64::from(a) == b));
    }

    #[test]
    #[should_panic(expected = "per_token_group: x must hold 2 * 128 elements, got 255")]
    fn wrong_length_is_reported() {
        per_token_group(&[0.0; 255], 2, 128, ScaleFormat::F32);
    }
}
