//! FP8 block-scaled GEMM on the CPU, in f64: the reference for the GEMM kernels.
//!
//! The contract (DeepSeek-V3 recipe, DeepGEMM's "1D2D" NT layout):
//!
//! ```text
//! D[r, c] = Σ_kb ( Σ_{j in block kb} A[r, j] · B[c, j] ) · sa[r, kb] · sb[c / 128, kb]
//! ```
//!
//! `A` is `[m, k]` E4M3 (row-major) with one scale per row per 128 columns (`sa`, row-major
//! `[m, k/128]`; the kernels read the transposed layout, see [`crate::layout`]); `B` is `[n, k]`
//! E4M3 ("NT", K-major) with one scale per 128x128 block (`sb`, row-major `[ceil(n/128), k/128]`).
//! Everything here is computed in f64 from the exact E4M3 values, so it is the ground truth the
//! kernels' f32 accumulation is compared against (`calc_diff < 1e-3`), and exact whenever the
//! inputs are small integers with power-of-two scales.
//!
//! Large problems are checked on a sample of rows and columns: every function here computes only
//! the `(row, col)` entries it is asked for.

use crate::fp8::e4m3_decode;
use crate::layout::{GROUP, ceil_div};

/// One FP8 operand with its scales.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Operand<'a> {
    /// `[rows, k]` E4M3 bits, row-major.
    pub q: &'a [u8],
    /// Row-major scales: `[rows, k/128]` for 1x128 (A), `[ceil(rows/128), k/128]` for 128x128 (B).
    pub scales: &'a [f32],
    /// Rows of the operand (`m` for A, `n` for B).
    pub rows: usize,
}

/// How an operand's scales are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Granularity {
    /// One scale per row per 128 columns.
    Row,
    /// One scale per 128x128 block.
    Block,
}

/// Exact f64 values of all 256 E4M3 bytes (NaN for 0x7F/0xFF).
fn e4m3_table() -> [f64; 256] {
    std::array::from_fn(|b| f64::from(e4m3_decode(b as u8)))
}

fn check_operand(name: &str, op: &Fp8Operand, k: usize, g: Granularity) {
    let kb = ceil_div(k, GROUP);
    assert_eq!(op.q.len(), op.rows * k, "{name}: expected [{}, {k}] E4M3 values", op.rows);
    let scale_rows = match g {
        Granularity::Row => op.rows,
        Granularity::Block => ceil_div(op.rows, GROUP),
    };
    assert_eq!(op.scales.len(), scale_rows * kb, "{name}: expected [{scale_rows}, {kb}] scales");
}

/// `Σ_kb (Σ_j a·b) · sa · sb` for row `r` of `a` (1x128 scales) and row `c` of `b` (128x128).
fn entry(t: &[f64; 256], a: &Fp8Operand, b: &Fp8Operand, k: usize, r: usize, c: usize) -> f64 {
    let kb_count = ceil_div(k, GROUP);
    let (arow, brow) = (&a.q[r * k..(r + 1) * k], &b.q[c * k..(c + 1) * k]);
    let mut total = 0.0f64;
    for kb in 0..kb_count {
        let cols = kb * GROUP..((kb + 1) * GROUP).min(k);
        let partial: f64 = arow[cols.clone()].iter().zip(&brow[cols]).map(|(&x, &y)| t[x as usize] * t[y as usize]).sum();
        total += partial * f64::from(a.scales[r * kb_count + kb]) * f64::from(b.scales[(c / GROUP) * kb_count + kb]);
    }
    total
}

/// Dense `D = A · Bᵀ` at the requested `(row, col)` entries (all of them: use [`all_entries`]).
pub fn gemm_entries(a: Fp8Operand, b: Fp8Operand, k: usize, at: &[(usize, usize)]) -> Vec<f64> {
    check_operand("a", &a, k, Granularity::Row);
    check_operand("b", &b, k, Granularity::Block);
    let t = e4m3_table();
    at.iter()
        .map(|&(r, c)| {
            assert!(r < a.rows && c < b.rows, "entry ({r}, {c}) outside [{}, {}]", a.rows, b.rows);
            entry(&t, &a, &b, k, r, c)
        })
        .collect()
}

/// Every `(row, col)` of an `[m, n]` output, row-major.
pub fn all_entries(m: usize, n: usize) -> Vec<(usize, usize)> {
    (0..m).flat_map(|r| (0..n).map(move |c| (r, c))).collect()
}

/// Dense `D = A · Bᵀ`, `[m, n]` row-major.
pub fn gemm(a: Fp8Operand, b: Fp8Operand, k: usize) -> Vec<f64> {
    let at = all_entries(a.rows, b.rows);
    gemm_entries(a, b, k, &at)
}

/// `D = C + A · Bᵀ` (the f32-accumulating variant): `c` is `[m, n]` row-major.
pub fn gemm_accumulate(a: Fp8Operand, b: Fp8Operand, k: usize, c: &[f32]) -> Vec<f64> {
    assert_eq!(c.len(), a.rows * b.rows, "c: expected [{}, {}]", a.rows, b.rows);
    gemm(a, b, k).into_iter().zip(c).map(|(d, &c)| d + f64::from(c)).collect()
}

/// M-grouped contiguous layout (MoE prefill): rows of all experts stacked in `a` (`[m_sum, k]`),
/// `expert[r]` the expert of row `r` (-1: padding), `b` the experts' weights `[G, n, k]` with scales
/// `[G, ceil(n/128), k/128]`. Returns `[m_sum, n]`, `None` on padding rows (the kernel leaves them).
pub fn grouped_contiguous(a: Fp8Operand, b: Fp8Operand, groups: usize, k: usize, expert: &[i32]) -> Vec<Option<f64>> {
    assert!(groups > 0 && b.rows.is_multiple_of(groups), "b: {} rows do not split into {groups} experts", b.rows);
    assert_eq!(expert.len(), a.rows, "expert: one index per row of a");
    let n = b.rows / groups;
    let per_expert = |g: usize| expert_operand(&b, groups, g, k);
    let mut out = Vec::with_capacity(a.rows * n);
    for (r, &e) in expert.iter().enumerate() {
        assert!(e >= -1 && (e as i64) < groups as i64, "expert[{r}] = {e} is outside -1..{groups}");
        if e < 0 {
            out.extend(std::iter::repeat_n(None, n));
            continue;
        }
        let be = per_expert(e as usize);
        let a_row =
            Fp8Operand { q: &a.q[r * k..(r + 1) * k], scales: &a.scales[r * ceil_div(k, GROUP)..(r + 1) * ceil_div(k, GROUP)], rows: 1 };
        out.extend(gemm_entries(a_row, be, k, &all_entries(1, n)).into_iter().map(Some));
    }
    out
}

/// M-grouped masked layout (MoE decode): `a` is `[G, max_m, k]` (scales `[G, max_m, k/128]`),
/// `b` is `[G, n, k]`, and only the first `valid[g]` rows of group `g` are computed. Returns
/// `[G, max_m, n]`, `None` beyond `valid[g]` (the kernel must leave those untouched).
pub fn grouped_masked(a: Fp8Operand, b: Fp8Operand, groups: usize, k: usize, valid: &[usize]) -> Vec<Option<f64>> {
    assert!(groups > 0 && a.rows.is_multiple_of(groups) && b.rows.is_multiple_of(groups), "a and b must split into {groups} groups");
    assert_eq!(valid.len(), groups, "valid: one count per group");
    let (max_m, n) = (a.rows / groups, b.rows / groups);
    let mut out = Vec::with_capacity(a.rows * n);
    for (g, &rows) in valid.iter().enumerate() {
        assert!(rows <= max_m, "valid[{g}] = {rows} exceeds max_m = {max_m}");
        let kb = ceil_div(k, GROUP);
        let a_g = Fp8Operand {
            q: &a.q[g * max_m * k..(g + 1) * max_m * k],
            scales: &a.scales[g * max_m * kb..(g + 1) * max_m * kb],
            rows: max_m,
        };
        let b_g = expert_operand(&b, groups, g, k);
        let d = gemm_entries(a_g, b_g, k, &all_entries(rows, n));
        out.extend(d.into_iter().map(Some));
        out.extend(std::iter::repeat_n(None, (max_m - rows) * n));
    }
    out
}

/// Expert `g` of a `[G, n, k]` weight with `[G, ceil(n/128), k/128]` scales.
fn expert_operand<'a>(b: &Fp8Operand<'a>, groups: usize, g: usize, k: usize) -> Fp8Operand<'a> {
    let n = b.rows / groups;
    let sb = ceil_div(n, GROUP) * ceil_div(k, GROUP);
    assert_eq!(b.scales.len(), groups * sb, "b: expected [{groups}, {}, {}] scales", ceil_div(n, GROUP), ceil_div(k, GROUP));
    Fp8Operand { q: &b.q[g * n * k..(g + 1) * n * k], scales: &b.scales[g * sb..(g + 1) * sb], rows: n }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::e4m3_encode;
    use crate::reference::quant::{ScaleFormat, per_block, per_token_group};

    /// Small integers with power-of-two scales: the reference is exact and checkable by hand.
    #[test]
    fn exact_small_integer_gemm() {
        let (m, n, k) = (3, 130, 256);
        let av: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 9) as f32 - 4.0).collect();
        let bv: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 7) as f32 - 3.0).collect();
        let a_q: Vec<u8> = av.iter().map(|&v| e4m3_encode(v)).collect();
        let b_q: Vec<u8> = bv.iter().map(|&v| e4m3_encode(v)).collect();
        let sa: Vec<f32> = (0..m * 2).map(|i| 2f32.powi(i as i32 % 3 - 1)).collect();
        let sb: Vec<f32> = (0..2 * 2).map(|i| 2f32.powi(-i)).collect();
        let a = Fp8Operand { q: &a_q, scales: &sa, rows: m };
        let b = Fp8Operand { q: &b_q, scales: &sb, rows: n };
        let d = gemm(a, b, k);
        for r in 0..m {
            for c in 0..n {
                let mut want = 0.0f64;
                for j in 0..k {
                    let s = f64::from(sa[r * 2 + j / 128]) * f64::from(sb[(c / 128) * 2 + j / 128]);
                    want += f64::from(av[r * k + j]) * f64::from(bv[c * k + j]) * s;
                }
                assert_eq!(d[r * n + c], want, "({r}, {c})");
            }
        }
        let acc = gemm_accumulate(a, b, k, &vec![0.5; m * n]);
        assert_eq!(acc[7], d[7] + 0.5);
    }

    /// Quantise-then-multiply stays close to the unquantised product (FP8's expected error).
    #[test]
    fn quantised_gemm_is_close_to_the_real_product() {
        let (m, n, k) = (4, 96, 384);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53) % 97) as f32 / 40.0 - 1.2).collect();
        let (qa, qb) = (per_token_group(&x, m, k, ScaleFormat::F32), per_block(&w, n, k, ScaleFormat::F32));
        let d = gemm(Fp8Operand { q: &qa.q, scales: &qa.scales, rows: m }, Fp8Operand { q: &qb.q, scales: &qb.scales, rows: n }, k);
        let exact: Vec<f64> =
            all_entries(m, n).iter().map(|&(r, c)| (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[c * k + j])).sum()).collect();
        let diff = crate::check::calc_diff(&d, &exact);
        assert!(diff < 1e-3, "calc_diff {diff}");
    }

    #[test]
    fn grouped_layouts_pick_each_rows_expert_and_skip_padding() {
        let (g, n, k) = (3, 8, 128);
        let b_q: Vec<u8> = (0..g * n * k).map(|i| e4m3_encode((i / (n * k)) as f32 + 1.0)).collect(); // expert e is all (e+1)
        let sb = vec![1.0f32; g];
        let b = Fp8Operand { q: &b_q, scales: &sb, rows: g * n };
        let a_q = vec![e4m3_encode(1.0); 4 * k];
        let sa = vec![1.0f32; 4];
        let a = Fp8Operand { q: &a_q, scales: &sa, rows: 4 };
        let d = grouped_contiguous(a, b, g, k, &[2, -1, 0, 1]);
        assert_eq!(d[0], Some(3.0 * 128.0));
        assert_eq!(d[n], None);
        assert_eq!(d[2 * n], Some(128.0));
        assert_eq!(d[3 * n + 5], Some(2.0 * 128.0));
        let a_q = vec![e4m3_encode(1.0); g * 2 * k];
        let sa = vec![1.0f32; g * 2];
        let masked = grouped_masked(Fp8Operand { q: &a_q, scales: &sa, rows: g * 2 }, b, g, k, &[1, 0, 2]);
        assert_eq!(masked.len(), g * 2 * n);
        assert_eq!((masked[0], masked[n]), (Some(128.0), None));
        assert!(masked[2 * n..4 * n].iter().all(Option::is_none));
        assert_eq!(masked[5 * n], Some(3.0 * 128.0));
    }
}
