//! FP8 quantisation on the CPU, DeepSeek-V3's recipe (DeepGEMM's casts).
//!
//! For every group (1x128 along a row for activations, 128x128 blocks for weights):
//! `amax = max |x|` (NaN ignored), `scale = max(amax, 1e-4) / 448` (f32 division), rounded up to a
//! power of two for [`ScaleFormat::Ue8m0`], and `q = e4m3(x * (1 / scale))` with `1 / scale`
//! computed once in f32. The GPU quantisers perform exactly these f32 operations, so their output
//! equals this bit for bit.

use crate::fp8::{E4M3_MAX, e4m3_decode, e4m3_encode, ue8m0_ceil};
use crate::layout::{GROUP, ceil_div};

/// Lower bound on a group's amax, so an all-zero group gets a finite scale.
pub const AMAX_FLOOR: f32 = 1e-4;

/// How scales are represented.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleFormat {
    /// Any f32 scale: `amax / 448`.
    #[default]
    F32,
    /// Powers of two (UE8M0), rounded up so no value saturates.
    Ue8m0,
}

/// The scale of a group whose largest magnitude is `amax`.
pub fn group_scale(amax: f32, fmt: ScaleFormat) -> f32 {
    let scale = amax.max(AMAX_FLOOR) / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => scale,
        ScaleFormat::Ue8m0 => ue8m0_ceil(scale),
    }
}

/// Largest magnitude of `xs`, ignoring NaN (as CUDA's `fmaxf` does); 0 for an empty slice.
pub fn amax(xs: impl IntoIterator<Item = f32>) -> f32 {
    xs.into_iter().fold(0.0f32, |acc, v| acc.max(v.abs()))
}

/// Per-token-group quantised rows.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRows {
    /// `[m, k]` E4M3 bits, row-major.
    pub q: Vec<u8>,
    /// `[m, ceil(k / 128)]` scales, row-major (see [`crate::layout::scales_to_tma_layout`] for the
    /// kernels' transposed layout).
    pub scales: Vec<f32>,
    pub m: usize,
    pub k: usize,
}

impl QuantizedRows {
    /// Dequantised values `[m, k]`.
    pub fn dequant(&self) -> Vec<f32> {
        dequant_per_token_group(&self.q, &self.scales, self.m, self.k)
    }
}

/// Quantises `x` (`[m, k]`, row-major) in groups of 128 consecutive elements of a row. A last
/// partial group (k not a multiple of 128) uses the elements it has.
pub fn per_token_group(x: &[f32], m: usize, k: usize, fmt: ScaleFormat) -> QuantizedRows {
    assert_eq!(x.len(), m * k, "per_token_group: x must hold m * k = {m} * {k} elements");
    let kb = ceil_div(k, GROUP);
    let mut q = vec![0u8; m * k];
    let mut scales = vec![0.0f32; m * kb];
    for r in 0..m {
        for b in 0..kb {
            let cols = b * GROUP..((b + 1) * GROUP).min(k);
            let row = &x[r * k..(r + 1) * k];
            let scale = group_scale(amax(row[cols.clone()].iter().copied()), fmt);
            let inv = 1.0f32 / scale;
            scales[r * kb + b] = scale;
            for c in cols {
                q[r * k + c] = e4m3_encode(row[c] * inv);
            }
        }
    }
    QuantizedRows { q, scales, m, k }
}

/// `[m, k]` values from per-token-group E4M3 bits and their row-major `[m, ceil(k/128)]` scales.
pub fn dequant_per_token_group(q: &[u8], scales: &[f32], m: usize, k: usize) -> Vec<f32> {
    let kb = ceil_div(k, GROUP);
    assert_eq!(q.len(), m * k, "dequant_per_token_group: q must hold m * k elements");
    assert_eq!(scales.len(), m * kb, "dequant_per_token_group: scales must be [m, ceil(k/128)]");
    (0..m * k).map(|i| e4m3_decode(q[i]) * scales[(i / k) * kb + (i % k) / GROUP]).collect()
}

/// Per-block (128x128) quantised weights.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedBlocks {
    /// `[n, k]` E4M3 bits, row-major.
    pub q: Vec<u8>,
    /// `[ceil(n / 128), ceil(k / 128)]` scales, row-major.
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

impl QuantizedBlocks {
    /// Dequantised values `[n, k]`.
    pub fn dequant(&self) -> Vec<f32> {
        dequant_per_block(&self.q, &self.scales, self.n, self.k)
    }
}

/// Quantises a weight `w` (`[n, k]`, row-major) in 128x128 blocks; edge blocks use the elements
/// they have (the same as zero padding).
pub fn per_block(w: &[f32], n: usize, k: usize, fmt: ScaleFormat) -> QuantizedBlocks {
    assert_eq!(w.len(), n * k, "per_block: w must hold n * k = {n} * {k} elements");
    let (nb, kb) = (ceil_div(n, GROUP), ceil_div(k, GROUP));
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0.0f32; nb * kb];
    for bn in 0..nb {
        let rows = bn * GROUP..((bn + 1) * GROUP).min(n);
        for bk in 0..kb {
            let cols = bk * GROUP..((bk + 1) * GROUP).min(k);
            let block = || rows.clone().flat_map(|r| cols.clone().map(move |c| r * k + c));
            let scale = group_scale(amax(block().map(|i| w[i])), fmt);
            let inv = 1.0f32 / scale;
            scales[bn * kb + bk] = scale;
            for i in block() {
                q[i] = e4m3_encode(w[i] * inv);
            }
        }
    }
    QuantizedBlocks { q, scales, n, k }
}

/// `[n, k]` values from per-block E4M3 bits and their `[ceil(n/128), ceil(k/128)]` scales.
pub fn dequant_per_block(q: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<f32> {
    let kb = ceil_div(k, GROUP);
    assert_eq!(q.len(), n * k, "dequant_per_block: q must hold n * k elements");
    assert_eq!(scales.len(), ceil_div(n, GROUP) * kb, "dequant_per_block: scales must be [ceil(n/128), ceil(k/128)]");
    (0..n * k).map(|i| e4m3_decode(q[i]) * scales[(i / k / GROUP) * kb + (i % k) / GROUP]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_group_gets_the_floor_scale() {
        let r = per_token_group(&[0.0; 128], 1, 128, ScaleFormat::F32);
        assert_eq!(r.scales, [1e-4f32 / 448.0]);
        assert!(r.q.iter().all(|&b| b == 0));
    }

    #[test]
    fn amax_element_maps_to_448() {
        let mut x = vec![0.5f32; 256];
        x[3] = -7.0;
        x[200] = 3.0;
        let r = per_token_group(&x, 1, 256, ScaleFormat::F32);
        assert_eq!(r.scales, [7.0 / 448.0, 3.0 / 448.0]);
        assert_eq!(e4m3_decode(r.q[3]), -448.0);
        assert_eq!(e4m3_decode(r.q[200]), 448.0);
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
    }
}
