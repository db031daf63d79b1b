//! FP8 block-scaled GEMM on the GPU (DeepSeek-V3 recipe), checked against
//! [`crate::reference::gemm`].
//!
//! `D[m, n] (bf16) = Σ_kb (Σ_{j in kb} A[m, j] · B[n, j]) · sa[m, kb] · sb[n / 128, kb]`, with A's
//! 1x128 scales in the per-token quantiser's transposed layout and B's 128x128 scales row-major
//! (what [`crate::quantize_per_token_group`] and [`crate::quantize_per_block`] write).
//!
//! Version 1: dense NT only, one tile configuration (128x128, 6 stages). Grouped layouts and the
//! planner-driven configurations come next.

use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use float8::F8E4M3;
use half::bf16;

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, check_aligned, ffi_call};
use crate::layout::{GROUP, ceil_div, tma_aligned_rows};

/// Activations: E4M3 `[m, k]` and their 1x128 scales `[k / 128, round_up(m, 4)]` (transposed).
pub struct Fp8Activations<'a> {
    pub q: CudaView<'a, F8E4M3>,
    pub sf: CudaView<'a, f32>,
}

/// Weights: E4M3 `[n, k]` ("NT": K-major) and their 128x128 scales `[ceil(n / 128), k / 128]`.
pub struct Fp8Weights<'a> {
    pub q: CudaView<'a, F8E4M3>,
    pub sf: CudaView<'a, f32>,
}

/// Problem size of a dense GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Checks every buffer length of a dense FP8 GEMM. Pure: the wrapper calls it before launching.
pub fn validate_gemm_fp8(shape: GemmShape, a_len: usize, sfa_len: usize, b_len: usize, sfb_len: usize, d_len: usize) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    if k == 0 || !k.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "k", expected: format!("a positive multiple of {GROUP}"), got: k.to_string() });
    }
    for (arg, v) in [("m", m), ("n", n), ("k", k)] {
        if i32::try_from(v).is_err() {
            return Err(Error::InvalidArgument { arg, reason: format!("{v} does not fit in i32") });
        }
    }
    let kb = k / GROUP;
    let expect = |arg: &'static str, len: usize, want: usize, what: String| {
        if len == want {
            Ok(())
        } else {
            Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
        }
    };
    expect("a", a_len, m * k, format!("[{m}, {k}] e4m3"))?;
    expect("sfa", sfa_len, kb * tma_aligned_rows(m), format!("[{kb}, {}] f32, transposed", tma_aligned_rows(m)))?;
    expect("b", b_len, n * k, format!("[{n}, {k}] e4m3"))?;
    expect("sfb", sfb_len, ceil_div(n, GROUP) * kb, format!("[{}, {kb}] f32", ceil_div(n, GROUP)))?;
    expect("d", d_len, m * n, format!("[{m}, {n}] bf16"))
}

/// A 2-D tiled tensor map over `rows x cols` elements of `elem_bytes` bytes (row-major, rows of
/// `cols` elements), with boxes of `box_rows x box_cols`.
#[allow(clippy::too_many_arguments)]
fn tensor_map_2d(
    addr: u64,
    dtype: CUtensorMapDataType,
    elem_bytes: usize,
    rows: usize,
    cols: usize,
    box_rows: u32,
    box_cols: u32,
    swizzle: CUtensorMapSwizzle,
) -> Result<ffi::dk_tensor_map> {
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * elem_bytes) as u64];
    let boxes = [box_cols, box_rows];
    let element_strides = [1u32, 1];
    // SAFETY: CUtensorMap is plain bytes; zero is a valid starting value.
    let mut map: CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: every pointer argument points at a live local array of the rank the call is given
    // (2 dims, 1 stride, 2 boxes, 2 element strides); `map` is a properly aligned CUtensorMap.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()?;
    Ok(ffi::dk_tensor_map { opaque: map.opaque })
}

/// `d = a · bᵀ` with block scales (see the module docs). Requirements, each checked before launch
/// with an error naming the argument: `k` a positive multiple of 128; exact buffer lengths; `a`,
/// `b` and the scales 16-byte aligned (TMA). `m = 0` or `n = 0` is a no-op. Asynchronous on
/// `stream`.
pub fn gemm_fp8(stream: &CudaStream, a: &Fp8Activations, b: &Fp8Weights, d: &mut CudaViewMut<bf16>, shape: GemmShape) -> Result<()> {
    validate_gemm_fp8(shape, a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), d.len())?;
    let mut launch = Launch::new("gemm_fp8", stream)?;
    if shape.m == 0 || shape.n == 0 {
        return Ok(());
    }
    let sms = stream.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let (a_ptr, sfa_ptr, b_ptr, sfb_ptr) = (launch.input(&a.q), launch.input(&a.sf), launch.input(&b.q), launch.input(&b.sf));
    let d_ptr = launch.output(d);
    for (arg, addr) in [("a", a_ptr), ("sfa", sfa_ptr), ("b", b_ptr), ("sfb", sfb_ptr)] {
        check_aligned(arg, addr, 16)?;
    }
    check_aligned("d", d_ptr, 2)?;
    let GemmShape { m, n, k } = shape;
    let block_m = ffi::DK_GEMM_BLOCK_M;
    let block_n = ffi::DK_GEMM_BLOCK_N;
    let (u8_t, f32_t) = (CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32);
    let (sw128, none) = (CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B, CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE);
    let params = ffi::dk_gemm_fp8_params {
        tma_a: tensor_map_2d(a_ptr, u8_t, 1, m, k, block_m, ffi::DK_GEMM_BLOCK_K, sw128)?,
        tma_b: tensor_map_2d(b_ptr, u8_t, 1, n, k, block_n, ffi::DK_GEMM_BLOCK_K, sw128)?,
        tma_sfa: tensor_map_2d(sfa_ptr, f32_t, 4, k / GROUP, tma_aligned_rows(m), 1, block_m, none)?,
        sfb: sfb_ptr as *const f32,
        d: d_ptr as *mut u16,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        num_sms: sms,
    };
    let s = launch.stream();
    // SAFETY: the tensor maps and pointers describe live cudarc buffers of the validated lengths,
    // whose guards `launch` holds until `finish`; the params struct outlives the call.
    let status = ffi_call!(unsafe dk_gemm_fp8(&params, s));
    launch.finish(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_each_bad_argument() {
        let s = GemmShape { m: 5, n: 130, k: 256 };
        let ok = (5 * 256, 2 * 8, 130 * 256, 2 * 2, 5 * 130);
        assert!(validate_gemm_fp8(s, ok.0, ok.1, ok.2, ok.3, ok.4).is_ok());
        let arg = |r: Result<()>| match r {
            Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected an argument error, got {other:?}"),
        };
        assert_eq!(arg(validate_gemm_fp8(GemmShape { k: 100, ..s }, ok.0, ok.1, ok.2, ok.3, ok.4)), "k");
        assert_eq!(arg(validate_gemm_fp8(GemmShape { k: 0, ..s }, 0, 0, 0, 0, ok.4)), "k");
        assert_eq!(arg(validate_gemm_fp8(s, ok.0 + 1, ok.1, ok.2, ok.3, ok.4)), "a");
        assert_eq!(arg(validate_gemm_fp8(s, ok.0, 2 * 5, ok.2, ok.3, ok.4)), "sfa");
        assert_eq!(arg(validate_gemm_fp8(s, ok.0, ok.1, ok.2 - 1, ok.3, ok.4)), "b");
        assert_eq!(arg(validate_gemm_fp8(s, ok.0, ok.1, ok.2, 2, ok.4)), "sfb");
        assert_eq!(arg(validate_gemm_fp8(s, ok.0, ok.1, ok.2, ok.3, 0)), "d");
        assert!(validate_gemm_fp8(GemmShape { m: 0, ..s }, 0, 0, ok.2, ok.3, 0).is_ok());
    }
}
