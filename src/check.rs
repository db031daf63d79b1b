//! Comparators for checking kernels against the CPU references. Plain Rust, no CUDA.
//!
//! - [`bitwise_eq`]: exact equality of every element's bytes, for kernels that must reproduce a
//!   reference bit for bit (quantisers, layouts, integer outputs).
//! - [`calc_diff`]: DeepGEMM's global similarity `1 - 2·Σxy / Σ(x²+y²)` in f64, for the numerics of
//!   a whole output (FP8 GEMM's bar is about 1e-3).
//! - [`allclose`]: element-wise `|a - e| <= atol + rtol·|e|`, with NaN positions and infinities
//!   matched exactly.
//! - [`assert_no_nan`] / [`first_nan`]: where the first NaN is, since [`calc_diff`] only says NaN.
//!
//! Every comparator takes any mix of element types through [`AsF64`] (f32, f64, bf16, f16, E4M3).

use std::fmt;

/// A scalar the comparators read as f64. The conversion is exact for every implementing type.
pub trait AsF64: Copy {
    /// The value as f64 (NaN stays NaN, infinities stay infinite).
    fn as_f64(self) -> f64;
}

impl AsF64 for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

impl AsF64 for f32 {
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

impl AsF64 for half::bf16 {
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

impl AsF64 for half::f16 {
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

/// Decoded with [`crate::fp8::e4m3_decode`] (`0x7F`/`0xFF` are NaN).
impl AsF64 for float8::F8E4M3 {
    fn as_f64(self) -> f64 {
        f64::from(crate::fp8::e4m3_decode(self.to_bits()))
    }
}

/// DeepGEMM's `calc_diff`: `1 - 2·Σ(x·y) / Σ(x² + y²)`, accumulated in f64 in index order.
///
/// 0 when `x == y`, 2 when `y == -x`, always in `[0, 2]` for finite inputs (by `2|xy| <= x² + y²`),
/// and symmetric in its arguments. It measures the whole output, so a few wrong elements in a
/// large tensor barely move it: pair it with [`allclose`] or sampling where that matters.
///
/// Special cases: both inputs all zero (or empty) gives 0.0. A NaN anywhere gives NaN, and
/// infinities give NaN or a meaningless value, so check with [`assert_no_nan`] first.
///
/// # Panics
/// If the lengths differ.
pub fn calc_diff<A: AsF64, B: AsF64>(x: &[A], y: &[B]) -> f64 {
    assert_eq!(x.len(), y.len(), "calc_diff: lengths differ ({} vs {})", x.len(), y.len());
    let (mut xy, mut squares) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a.as_f64(), b.as_f64());
        xy += a * b;
        squares += a * a + b * b;
    }
    if squares == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / squares }
}

/// Index of the first NaN in `xs`, if any.
pub fn first_nan<A: AsF64>(xs: &[A]) -> Option<usize> {
    xs.iter().position(|v| v.as_f64().is_nan())
}

/// `Ok(())` when `xs` holds no NaN, else `Err(index of the first NaN)`.
pub fn assert_no_nan<A: AsF64>(xs: &[A]) -> Result<(), usize> {
    first_nan(xs).map_or(Ok(()), Err)
}

/// What [`allclose`] found wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Positions that failed: out of tolerance, mismatched NaN or infinity, or missing from the
    /// shorter input when the lengths differ.
    pub count: usize,
    /// The first failing position.
    pub first_index: usize,
    /// `actual` there (NaN if `actual` is too short to have it).
    pub first_actual: f64,
    /// `expected` there (NaN if `expected` is too short to have it).
    pub first_expected: f64,
    /// Largest `|actual - expected|` over the positions where both are finite (0 if none).
    pub max_abs_err: f64,
    /// Positions compared: the longer of the two lengths.
    pub len: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} elements differ; first at {}: got {:e}, want {:e}; max abs error {:e}",
            self.count, self.len, self.first_index, self.first_actual, self.first_expected, self.max_abs_err
        )
    }
}

impl std::error::Error for Mismatch {}

/// Element-wise closeness: every position must satisfy `|a - e| <= atol + rtol·|e|` (in f64,
/// `e` from `expected`), where
/// - NaN must face NaN (NaN vs NaN passes, NaN vs a number fails either way round);
/// - an infinity must face the same infinity;
/// - if the lengths differ, each position present in only one input is a failure (so a length
///   mismatch is always an error, with `first_index` at the shorter length at the latest).
///
/// Returns the count and first failure, plus the largest finite error, in [`Mismatch`].
pub fn allclose<A: AsF64, B: AsF64>(actual: &[A], expected: &[B], atol: f64, rtol: f64) -> Result<(), Mismatch> {
    let len = actual.len().max(expected.len());
    let mut first: Option<(usize, f64, f64)> = None;
    let mut count = 0usize;
    let mut max_abs_err = 0.0f64;
    for i in 0..len {
        let (a, e) = match (actual.get(i), expected.get(i)) {
            (Some(a), Some(e)) => (a.as_f64(), e.as_f64()),
            (a, e) => {
                count += 1;
                first.get_or_insert((i, a.map_or(f64::NAN, |v| v.as_f64()), e.map_or(f64::NAN, |v| v.as_f64())));
                continue;
            }
        };
        let ok = if a.is_nan() || e.is_nan() {
            a.is_nan() && e.is_nan()
        } else if a.is_infinite() || e.is_infinite() {
            a == e
        } else {
            let err = (a - e).abs();
            max_abs_err = max_abs_err.max(err);
            err <= atol + rtol * e.abs()
        };
        if !ok {
            count += 1;
            first.get_or_insert((i, a, e));
        }
    }
    match first {
        None => Ok(()),
        Some((first_index, first_actual, first_expected)) => {
            Err(Mismatch { count, first_index, first_actual, first_expected, max_abs_err, len })
        }
    }
}

/// What [`bitwise_eq`] found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitMismatch {
    /// Positions whose bytes differ, counting each position present in only one input.
    pub count: usize,
    /// The first differing position (the shorter length, if the common prefix is equal).
    pub first_index: usize,
    /// Positions compared: the longer of the two lengths.
    pub len: usize,
    /// Length of `actual`, in elements.
    pub actual_len: usize,
    /// Length of `expected`, in elements.
    pub expected_len: usize,
    /// Bytes of `actual[first_index]` in memory order (empty if `actual` is too short).
    pub first_actual: Vec<u8>,
    /// Bytes of `expected[first_index]` in memory order (empty if `expected` is too short).
    pub first_expected: Vec<u8>,
}

/// An element's bytes as one hex number (most significant byte first on this machine's byte
/// order), or "none" for a missing element.
fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "none".to_string();
    }
    let digits = |b: &u8| format!("{b:02x}");
    let s: String =
        if cfg!(target_endian = "little") { bytes.iter().rev().map(digits).collect() } else { bytes.iter().map(digits).collect() };
    format!("0x{s}")
}

impl fmt::Display for BitMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.actual_len != self.expected_len {
            write!(f, "lengths differ: got {}, want {}; ", self.actual_len, self.expected_len)?;
        }
        write!(
            f,
            "{} of {} elements differ; first at {}: got {}, want {}",
            self.count,
            self.len,
            self.first_index,
            hex(&self.first_actual),
            hex(&self.first_expected)
        )
    }
}

impl std::error::Error for BitMismatch {}

/// Exact equality of every element's bytes: +0.0 differs from -0.0, and NaNs must have the same
/// payload. Different lengths are an error too: the positions beyond the shorter input count as
/// differing (and the Display says "lengths differ"); the first difference is reported either way.
pub fn bitwise_eq<T: bytemuck::NoUninit>(actual: &[T], expected: &[T]) -> Result<(), BitMismatch> {
    let bytes = |v: &T| bytemuck::bytes_of(v).to_vec();
    let mut count = actual.len().abs_diff(expected.len());
    let mut first = None;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        if bytemuck::bytes_of(a) != bytemuck::bytes_of(e) {
            count += 1;
            first.get_or_insert(i);
        }
    }
    if count == 0 {
        return Ok(());
    }
    let first_index = first.unwrap_or(actual.len().min(expected.len()));
    Err(BitMismatch {
        count,
        first_index,
        len: actual.len().max(expected.len()),
        actual_len: actual.len(),
        expected_len: expected.len(),
        first_actual: actual.get(first_index).map(bytes).unwrap_or_default(),
        first_expected: expected.get(first_index).map(bytes).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calc_diff_basics() {
        let x = [1.0f32, -2.0, 3.0];
        assert_eq!(calc_diff(&x, &x), 0.0);
        assert_eq!(calc_diff(&x, &x.map(|v| -v)), 2.0);
        assert_eq!(calc_diff(&x, &[0.0f64; 3]), 1.0, "against zeros: 1 - 0 / Σx²");
        assert_eq!(calc_diff(&[0.0f32; 3], &[0.0f64; 3]), 0.0);
        assert_eq!(calc_diff::<f32, f32>(&[], &[]), 0.0);
        assert!(calc_diff(&[f32::NAN], &[1.0f32]).is_nan());
        let b = [half::bf16::from_f32(1.0), half::bf16::from_f32(-2.0), half::bf16::from_f32(3.0)];
        assert_eq!(calc_diff(&x, &b), 0.0);
        let q = [float8::F8E4M3::from_bits(0x38), float8::F8E4M3::from_bits(0xc0), float8::F8E4M3::from_bits(0x44)];
        assert_eq!(calc_diff(&q, &x), 0.0);
    }

    #[test]
    #[should_panic(expected = "calc_diff: lengths differ (2 vs 1)")]
    fn calc_diff_rejects_different_lengths() {
        calc_diff(&[1.0f32, 2.0], &[1.0f32]);
    }

    #[test]
    fn nan_helpers() {
        assert_eq!(assert_no_nan(&[1.0f32, 2.0]), Ok(()));
        assert_eq!(assert_no_nan(&[1.0f32, f32::NAN, f32::NAN]), Err(1));
        assert_eq!(first_nan(&[float8::F8E4M3::from_bits(0x38), float8::F8E4M3::from_bits(0xff)]), Some(1));
        assert_eq!(first_nan::<f64>(&[]), None);
    }

    #[test]
    fn allclose_reports_the_first_bad_element() {
        let e = [1.0f32, 2.0, f32::NAN, f32::INFINITY];
        assert!(allclose(&e, &e, 0.0, 0.0).is_ok());
        let a = [1.0f32, 2.5, f32::NAN, f32::INFINITY];
        let m = allclose(&a, &e, 0.1, 0.0).unwrap_err();
        assert_eq!((m.count, m.first_index, m.first_actual, m.first_expected, m.len), (1, 1, 2.5, 2.0, 4));
        assert_eq!(m.max_abs_err, 0.5);
        assert_eq!(m.to_string(), "1 of 4 elements differ; first at 1: got 2.5e0, want 2e0; max abs error 5e-1");
        assert!(allclose(&a, &e, 0.0, 0.25).is_ok(), "rtol is relative to expected");
        assert!(allclose(&a, &e, 0.0, 0.2).is_err());
        assert!(allclose(&[1.0f32, 0.0], &[1.0f32, f32::NAN], 1.0, 1.0).is_err());
        assert!(allclose(&[f32::NAN], &[0.0f32], 1.0, 1.0).is_err());
        assert!(allclose(&[f32::NEG_INFINITY], &[f32::INFINITY], 1.0, 1.0).is_err());
        assert!(allclose(&[1e300f64], &[f32::INFINITY], 1.0, 1.0).is_err());
    }

    #[test]
    fn allclose_length_mismatch() {
        let m = allclose(&[1.0f32], &[1.0f32, 2.0, 3.0], 0.0, 0.0).unwrap_err();
        assert_eq!((m.count, m.first_index, m.len), (2, 1, 3));
        assert!(m.first_actual.is_nan());
        assert_eq!(m.first_expected, 2.0);
        let m = allclose(&[5.0f32, 1.0], &[1.0f32], 0.0, 0.0).unwrap_err();
        assert_eq!((m.count, m.first_index), (2, 0));
    }

    #[test]
    fn bitwise_eq_finds_the_first_difference() {
        assert!(bitwise_eq(&[1u8, 2, 3], &[1u8, 2, 3]).is_ok());
        assert!(bitwise_eq::<f32>(&[], &[]).is_ok());
        let m = bitwise_eq(&[1.0f32, 0.0, 5.0], &[1.0f32, -0.0, 6.0]).unwrap_err();
        assert_eq!((m.count, m.first_index, m.len), (2, 1, 3));
        assert_eq!(m.to_string(), "2 of 3 elements differ; first at 1: got 0x00000000, want 0x80000000");
        assert!(bitwise_eq(&[f32::NAN], &[f32::from_bits(0x7fc0_0001)]).is_err(), "NaN payloads count");
    }

    #[test]
    fn bitwise_eq_length_mismatch() {
        let m = bitwise_eq(&[1u8, 2], &[1u8, 2, 3]).unwrap_err();
        assert_eq!((m.count, m.first_index, m.len, m.actual_len, m.expected_len), (1, 2, 3, 2, 3));
        assert_eq!(m.to_string(), "lengths differ: got 2, want 3; 1 of 3 elements differ; first at 2: got none, want 0x03");
        let m = bitwise_eq(&[9u16, 2], &[1u16]).unwrap_err();
        assert_eq!((m.count, m.first_index), (2, 0));
        assert_eq!(m.first_actual, 9u16.to_ne_bytes());
    }
}
