//! Memory layouts shared by the kernels and the CPU references. Plain Rust, no CUDA.
//!
//! # FP8 scale layouts
//!
//! Activations are quantised in groups of [`GROUP`] consecutive elements of a row ("1x128"); each
//! group has one f32 scale. The GEMM reads these scales with TMA, so they are stored
//! **transposed and 16-byte aligned**: for a `[m, k]` operand the scales form a `[k / 128, m_pad]`
//! f32 array, where `m_pad = tma_aligned_rows(m)` rounds `m` up to a multiple of 4 (16 bytes of
//! f32). The scale of row `r`, group `g` lives at `g * m_pad + r`. Entries for rows `m..m_pad`
//! are padding: kernels never read meaning into them and quantisers do not write them.
//!
//! A batch of `num_groups` such operands (the masked MoE layout `[G, m, k]`) stores each one's
//! scales back to back, `[G, k / 128, m_pad]`.
//!
//! Weights are quantised in 128x128 blocks: a `[n, k]` weight has a row-major
//! `[ceil(n / 128), ceil(k / 128)]` f32 scale array.

/// Elements per quantisation group along K (and the edge of a weight scale block).
pub const GROUP: usize = 128;

/// TMA requires 16-byte aligned global strides: that many f32 scales.
pub const TMA_ALIGN_F32: usize = 16 / std::mem::size_of::<f32>();

/// `ceil(a / b)` for `b > 0`.
#[inline]
pub const fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Rounds `a` up to a multiple of `b > 0`.
#[inline]
pub const fn round_up(a: usize, b: usize) -> usize {
    ceil_div(a, b) * b
}

/// Rows of the transposed scale array for an operand of `m` rows: `m` rounded up to 16 bytes of f32.
#[inline]
pub const fn tma_aligned_rows(m: usize) -> usize {
    round_up(m, TMA_ALIGN_F32)
}

/// Shape of a batch of per-token-group (1x128) quantised operands `[num_groups, m, k]`.
///
/// `k` must be a multiple of [`GROUP`] for the GPU kernels ([`crate::quant::validate_per_token_group`] checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenGroupShape {
    /// Independent operands stacked along the outermost dimension (1 for a plain 2-D tensor).
    pub num_groups: usize,
    /// Rows (tokens) per operand.
    pub m: usize,
    /// Columns (hidden size) per row.
    pub k: usize,
}

impl TokenGroupShape {
    /// A single 2-D operand `[m, k]`.
    pub const fn new(m: usize, k: usize) -> Self {
        Self { num_groups: 1, m, k }
    }

    /// A batch `[num_groups, m, k]`.
    pub const fn batched(num_groups: usize, m: usize, k: usize) -> Self {
        Self { num_groups, m, k }
    }

    /// Scale groups per row: `k / 128` (rounded up).
    pub const fn k_blocks(&self) -> usize {
        ceil_div(self.k, GROUP)
    }

    /// Padded row count of one operand's scale array.
    pub const fn m_pad(&self) -> usize {
        tma_aligned_rows(self.m)
    }

    /// Elements of the data tensor: `num_groups * m * k`.
    pub fn elements(&self) -> Option<usize> {
        self.num_groups.checked_mul(self.m)?.checked_mul(self.k)
    }

    /// f32 elements of the transposed scale array, padding included: `num_groups * (k/128) * m_pad`.
    pub fn scale_elements(&self) -> Option<usize> {
        self.num_groups.checked_mul(self.k_blocks())?.checked_mul(self.m_pad())
    }

    /// Index of the scale of (`group`, `row`, column block `kb`) in the transposed layout.
    #[inline]
    pub const fn scale_index(&self, group: usize, row: usize, kb: usize) -> usize {
        (group * self.k_blocks() + kb) * self.m_pad() + row
    }

    /// The `(group, row, kb)` that index `i` of the scale array holds; `row >= m` means padding.
    pub const fn scale_position(&self, i: usize) -> (usize, usize, usize) {
        let m_pad = self.m_pad();
        let row = i % m_pad;
        let gk = i / m_pad;
        (gk / self.k_blocks(), row, gk % self.k_blocks())
    }
}

/// Shape of a batch of per-block (128x128) quantised weights `[num_groups, n, k]` (one operand per
/// expert for the grouped GEMMs). Scales are row-major `[num_groups, ceil(n / 128), k / 128]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockShape {
    /// Operands in the batch (experts; 1 for a dense weight).
    pub num_groups: usize,
    /// Rows (output features) per operand.
    pub n: usize,
    /// Columns (input features) per row.
    pub k: usize,
}

impl BlockShape {
    /// A single 2-D weight `[n, k]`.
    pub const fn new(n: usize, k: usize) -> Self {
        Self { num_groups: 1, n, k }
    }

    /// A batch `[num_groups, n, k]`.
    pub const fn batched(num_groups: usize, n: usize, k: usize) -> Self {
        Self { num_groups, n, k }
    }

    /// Block rows per operand: `ceil(n / 128)`.
    pub const fn n_blocks(&self) -> usize {
        ceil_div(self.n, GROUP)
    }

    /// Block columns: `ceil(k / 128)`.
    pub const fn k_blocks(&self) -> usize {
        ceil_div(self.k, GROUP)
    }

    /// Elements of the data tensor: `num_groups * n * k`.
    pub fn elements(&self) -> Option<usize> {
        self.num_groups.checked_mul(self.n)?.checked_mul(self.k)
    }

    /// f32 elements of the scale array: `num_groups * ceil(n/128) * ceil(k/128)`.
    pub fn scale_elements(&self) -> Option<usize> {
        self.num_groups.checked_mul(self.n_blocks())?.checked_mul(self.k_blocks())
    }

    /// Index of the scale of block (`nb`, `kb`) of operand `group`.
    #[inline]
    pub const fn scale_index(&self, group: usize, nb: usize, kb: usize) -> usize {
        (group * self.n_blocks() + nb) * self.k_blocks() + kb
    }
}

/// Converts row-major `[m, k_blocks]` scales into the transposed, TMA-aligned `[k_blocks, m_pad]`
/// layout. Padding rows are filled with `pad`.
pub fn scales_to_tma_layout(row_major: &[f32], m: usize, k_blocks: usize, pad: f32) -> Vec<f32> {
    assert_eq!(row_major.len(), m * k_blocks, "scales_to_tma_layout: expected [m, k_blocks] scales");
    let m_pad = tma_aligned_rows(m);
    let mut out = vec![pad; k_blocks * m_pad];
    for r in 0..m {
        for kb in 0..k_blocks {
            out[kb * m_pad + r] = row_major[r * k_blocks + kb];
        }
    }
    out
}

/// Inverse of [`scales_to_tma_layout`]: row-major `[m, k_blocks]` scales, padding dropped.
pub fn scales_from_tma_layout(tma: &[f32], m: usize, k_blocks: usize) -> Vec<f32> {
    let m_pad = tma_aligned_rows(m);
    assert_eq!(tma.len(), k_blocks * m_pad, "scales_from_tma_layout: expected [k_blocks, m_pad] scales");
    let mut out = vec![0.0; m * k_blocks];
    for r in 0..m {
        for kb in 0..k_blocks {
            out[r * k_blocks + kb] = tma[kb * m_pad + r];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tma_rows_are_16_byte_multiples() {
        for m in 0..64 {
            let p = tma_aligned_rows(m);
            assert!(p >= m && p < m + 4 && (p * 4).is_multiple_of(16), "m={m} p={p}");
        }
    }

    #[test]
    fn scale_layout_round_trips_and_pads() {
        let (m, kb) = (5, 3);
        let rm: Vec<f32> = (0..m * kb).map(|i| i as f32).collect();
        let t = scales_to_tma_layout(&rm, m, kb, -1.0);
        assert_eq!(t.len(), 3 * 8);
        assert_eq!(t[8 + 2], rm[2 * kb + 1]);
        assert_eq!(t[5..8], [-1.0; 3]);
        assert_eq!(scales_from_tma_layout(&t, m, kb), rm);
        let s = TokenGroupShape::batched(2, m, kb * GROUP);
        assert_eq!(s.scale_index(1, 2, 1), (kb + 1) * 8 + 2);
        assert_eq!(s.scale_position(s.scale_index(1, 2, 1)), (1, 2, 1));
    }
}
