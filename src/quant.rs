//! FP8 quantisers on the GPU.
//!
//! [`quantize_per_token_group`] turns bf16 activations `[G, m, k]` into E4M3 values plus one f32
//! scale per row per 128 columns, written straight into the transposed, 16-byte-aligned layout the
//! GEMM's TMA reads (see [`crate::layout`]). It is bit-identical to
//! [`crate::reference::quant::per_token_group`] on the CPU.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use float8::F8E4M3;
use half::bf16;

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, check_aligned, ffi_call};
use crate::layout::{GROUP, TokenGroupShape};
use crate::reference::quant::ScaleFormat;

/// Checks the lengths of the three buffers of a per-token-group quantisation against `shape`.
/// Pure: the safe wrapper calls it before anything touches the GPU.
pub fn validate_per_token_group(shape: TokenGroupShape, x_len: usize, q_len: usize, sf_len: usize) -> Result<()> {
    if !shape.k.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "k", expected: format!("a multiple of {GROUP}"), got: shape.k.to_string() });
    }
    let too_big = || Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} has more than 2^62 elements") };
    let elements = shape.elements().filter(|&n| n < 1 << 62).ok_or_else(too_big)?;
    let scales = shape.scale_elements().ok_or_else(too_big)?;
    let dims = format!("[{}, {}, {}]", shape.num_groups, shape.m, shape.k);
    let expect_len = |arg: &'static str, len: usize, want: usize, what: &str| {
        if len == want {
            Ok(())
        } else {
            Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
        }
    };
    expect_len("x", x_len, elements, &format!("{dims} bf16"))?;
    expect_len("q", q_len, elements, &format!("{dims} e4m3"))?;
    let sf_dims = format!("[{}, {}, {}] f32, rows padded to a multiple of 4", shape.num_groups, shape.k_blocks(), shape.m_pad());
    expect_len("sf", sf_len, scales, &sf_dims)
}

/// Quantises bf16 `x` `[G, m, k]` to E4M3 `q` `[G, m, k]` with 1x128 scales `sf`
/// `[G, k / 128, round_up(m, 4)]` (transposed, TMA-aligned; padding rows are not written).
///
/// Recipe (DeepSeek-V3): per group of 128, `scale = max(amax, 1e-4) / 448`, rounded up to a power
/// of two for [`ScaleFormat::Ue8m0`]; `q = e4m3_rn_satfinite(x * (1 / scale))`.
///
/// Requirements, each checked before launch with an error naming the argument: `k % 128 == 0`;
/// exact buffer lengths; `x` and `sf` 16-byte aligned, `q` 8-byte aligned (whole cudarc
/// allocations always are; views at odd offsets may not be). An empty shape is a no-op.
/// Asynchronous on `stream`.
pub fn quantize_per_token_group(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    q: &mut impl DevicePtrMut<F8E4M3>,
    sf: &mut impl DevicePtrMut<f32>,
    shape: TokenGroupShape,
    format: ScaleFormat,
) -> Result<()> {
    validate_per_token_group(shape, x.len(), q.len(), sf.len())?;
    let mut launch = Launch::new("quantize_per_token_group", stream)?;
    if shape.elements() == Some(0) {
        return Ok(());
    }
    let x_ptr = launch.input(x);
    let q_ptr = launch.output(q);
    let sf_ptr = launch.output(sf);
    check_aligned("x", x_ptr, 16)?;
    check_aligned("q", q_ptr, 8)?;
    check_aligned("sf", sf_ptr, 16)?;
    let params = ffi::dk_quant_per_token_group_params {
        x: x_ptr as *const u16,
        q: q_ptr as *mut u8,
        sf: sf_ptr as *mut f32,
        num_groups: to_i64(shape.num_groups)?,
        m: to_i64(shape.m)?,
        k: to_i64(shape.k)?,
        ue8m0: i32::from(format == ScaleFormat::Ue8m0),
    };
    let stream_handle = launch.stream();
    // SAFETY: every pointer comes from a live cudarc buffer of the validated length whose guard
    // `launch` holds until `finish`; the params struct outlives the call, which only reads it.
    let status = ffi_call!(unsafe dk_quant_per_token_group(&params, stream_handle));
    launch.finish(status)
}

fn to_i64(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument { arg: "shape", reason: format!("{v} does not fit in i64") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_each_bad_argument() {
        let s = TokenGroupShape::batched(2, 5, 256);
        let (n, sf) = (2 * 5 * 256, 2 * 2 * 8);
        assert!(validate_per_token_group(s, n, n, sf).is_ok());
        let arg = |r: Result<()>| match r {
            Err(Error::Shape { arg, .. }) => arg,
            other => panic!("expected a shape error, got {other:?}"),
        };
        assert_eq!(arg(validate_per_token_group(TokenGroupShape::new(5, 200), 1000, 1000, 16)), "k");
        assert_eq!(arg(validate_per_token_group(s, n - 1, n, sf)), "x");
        assert_eq!(arg(validate_per_token_group(s, n, n + 1, sf)), "q");
        assert_eq!(arg(validate_per_token_group(s, n, n, 2 * 2 * 5)), "sf");
        let e = validate_per_token_group(s, n, n, 20).unwrap_err().to_string();
        assert!(e.contains("`sf`") && e.contains("32 elements") && e.contains("got 20"), "{e}");
        assert!(matches!(
            validate_per_token_group(TokenGroupShape::batched(1 << 40, 1 << 20, 128), 0, 0, 0),
            Err(Error::InvalidArgument { arg: "shape", .. })
        ));
        assert!(validate_per_token_group(TokenGroupShape::new(0, 7168), 0, 0, 0).is_ok());
    }
}
