//! Comparators for checking kernels against references.
//!
//! - [`bitwise_eq`]: exact equality of the bytes (layout and indexing bugs show up exactly).
//! - [`calc_diff`]: DeepGEMM's global similarity `1 - 2·Σxy / Σ(x²+y²)` in f64 (numerics of a
//!   whole output; ~1e-3 is FP8 GEMM's bar).
//! - [`allclose`]: element-wise `|a - e| <= atol + rtol·|e|`, NaN positions and infinities matched.

use std::fmt;

/// A scalar the comparators can read as f64 (exactly, for every type here).
pub trait AsF64: Copy {
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
impl AsF64 for float8::F8E4M3 {
    fn as_f64(self) -> f64 {
        f64::from(crate::fp8::e4m3_decode(self.to_bits()))
    }
}

/// `1 - 2·Σxy / Σ(x²+y²)` in f64: 0 for identical inputs, 2 for `y = -x`, in `[0, 2]` otherwise.
/// Both all zero gives 0. A NaN anywhere gives NaN (check for NaN separately).
pub fn calc_diff<A: AsF64, B: AsF64>(x: &[A], y: &[B]) -> f64 {
    assert_eq!(x.len(), y.len(), "calc_diff: lengths differ");
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a.as_f64(), b.as_f64());
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / sq }
}

/// Index of the first NaN, if any.
pub fn first_nan<A: AsF64>(xs: &[A]) -> Option<usize> {
    xs.iter().position(|v| v.as_f64().is_nan())
}

/// Where [`allclose`] failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Number of elements out of tolerance (or with mismatched NaN/infinity, or missing).
    pub count: usize,
    pub first_index: usize,
    pub first_actual: f64,
    pub first_expected: f64,
    /// Largest |actual - expected| over elements where both are finite.
    pub max_abs_err: f64,
    /// Elements compared (the longer length when lengths differ).
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

/// Element-wise `|a - e| <= atol + rtol·|e|`. NaN must face NaN, an infinity the same infinity.
/// Different lengths are a mismatch at the first missing index (the missing side reads as NaN).
pub fn allclose<A: AsF64, B: AsF64>(actual: &[A], expected: &[B], atol: f64, rtol: f64) -> Result<(), Mismatch> {
    let len = actual.len().max(expected.len());
    let mut bad: Option<Mismatch> = None;
    let mut max_abs_err = 0.0f64;
    for i in 0..len {
        let a = actual.get(i).map_or(f64::NAN, |v| v.as_f64());
        let e = expected.get(i).map_or(f64::NAN, |v| v.as_f64());
        let missing = i >= actual.len() || i >= expected.len();
        let ok = if missing {
            false
        } else if a.is_nan() || e.is_nan() {
            a.is_nan() && e.is_nan()
        } else if a.is_infinite() || e.is_infinite() {
            a == e
        } else {
            let err = (a - e).abs();
            max_abs_err = max_abs_err.max(err);
            err <= atol + rtol * e.abs()
        };
        if !ok {
            let m = bad.get_or_insert(Mismatch { count: 0, first_index: i, first_actual: a, first_expected: e, max_abs_err: 0.0, len });
            m.count += 1;
        }
    }
    match bad {
        None => Ok(()),
        Some(m) => Err(Mismatch { max_abs_err, ..m }),
    }
}

/// Where [`bitwise_eq`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitMismatch {
    /// Elements whose bytes differ (plus the length difference, when lengths differ).
    pub count: usize,
    /// First differing element (the shorter length when only the lengths differ).
    pub first_index: usize,
    pub first_actual: Vec<u8>,
    pub first_expected: Vec<u8>,
    pub actual_len: usize,
    pub expected_len: usize,
}

impl fmt::Display for BitMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |b: &[u8]| b.iter().rev().map(|x| format!("{x:02x}")).collect::<String>();
        if self.actual_len != self.expected_len {
            write!(f, "lengths differ: got {}, want {}; ", self.actual_len, self.expected_len)?;
        }
        write!(
            f,
            "{} elements differ; first at {}: got 0x{}, want 0x{}",
            self.count,
            self.first_index,
            hex(&self.first_actual),
            hex(&self.first_expected)
        )
    }
}

impl std::error::Error for BitMismatch {}

/// Exact equality of every element's bytes (so +0.0 differs from -0.0, and NaN payloads count).
pub fn bitwise_eq<T: bytemuck::NoUninit>(actual: &[T], expected: &[T]) -> Result<(), BitMismatch> {
    let size = std::mem::size_of::<T>();
    let (a, e): (&[u8], &[u8]) = (bytemuck::cast_slice(actual), bytemuck::cast_slice(expected));
    let common = actual.len().min(expected.len());
    let differs = |i: usize| a[i * size..(i + 1) * size] != e[i * size..(i + 1) * size];
    let mut first = (0..common).find(|&i| differs(i));
    let extra = actual.len().abs_diff(expected.len());
    if first.is_none() && extra == 0 {
        return Ok(());
    }
    let count = (first.unwrap_or(common)..common).filter(|&i| differs(i)).count() + extra;
    let i = *first.get_or_insert(common);
    let bytes = |s: &[u8], len: usize| if i < len { s[i * size..(i + 1) * size].to_vec() } else { Vec::new() };
    Err(BitMismatch {
        count,
        first_index: i,
        first_actual: bytes(a, actual.len()),
        first_expected: bytes(e, expected.len()),
        actual_len: actual.len(),
        expected_len: expected.len(),
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
        assert_eq!(calc_diff(&[0.0f32; 3], &[0.0f64; 3]), 0.0);
        assert!(calc_diff(&[f32::NAN], &[1.0f32]).is_nan());
    }

    #[test]
    fn allclose_reports_the_first_bad_element() {
        let e = [1.0f32, 2.0, f32::NAN, f32::INFINITY];
        assert!(allclose(&e, &e, 0.0, 0.0).is_ok());
        let a = [1.0f32, 2.5, f32::NAN, f32::INFINITY];
        let m = allclose(&a, &e, 0.1, 0.0).unwrap_err();
        assert_eq!((m.count, m.first_index, m.first_actual, m.first_expected), (1, 1, 2.5, 2.0));
        assert!(allclose(&[1.0f32, 0.0], &[1.0f32, f32::NAN], 1.0, 1.0).is_err());
        assert!(allclose(&[f32::NEG_INFINITY], &[f32::INFINITY], 1.0, 1.0).is_err());
        assert_eq!(allclose(&[1.0f32], &[1.0f32, 2.0], 0.0, 0.0).unwrap_err().first_index, 1);
        assert!(m.to_string().starts_with("1 of 4 elements differ; first at 1"));
    }

    #[test]
    fn bitwise_eq_finds_the_first_difference() {
        assert!(bitwise_eq(&[1u8, 2, 3], &[1u8, 2, 3]).is_ok());
        let m = bitwise_eq(&[1.0f32, 0.0, 5.0], &[1.0f32, -0.0, 6.0]).unwrap_err();
        assert_eq!((m.count, m.first_index), (2, 1));
        assert_eq!(m.to_string(), "2 elements differ; first at 1: got 0x00000000, want 0x80000000");
        let m = bitwise_eq(&[1u8, 2], &[1u8, 2, 3]).unwrap_err();
        assert_eq!((m.count, m.first_index), (1, 2));
    }
}
