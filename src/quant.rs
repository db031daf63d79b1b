//! FP8 quantisers on the GPU, bit-identical to the CPU references in [`crate::reference::quant`].
//!
//! - [`quantize_per_token_group`]: bf16 activations `[G, m, k]` to E4M3 plus one f32 scale per row
//!   per 128 columns, written straight into the transposed, 16-byte-aligned layout the GEMM's TMA
//!   reads (see [`crate::layout`]).
//! - [`silu_mul_quantize`]: a MoE expert's activation, fused: bf16 `[G, m, 2k]` gate/up to
//!   `SiLU(gate) · up` quantised like [`quantize_per_token_group`] (equal to
//!   [`crate::reference::quant::silu_mul_per_token_group`] up to the last bit of `exp`).
//! - [`quantize_per_block`]: bf16 weights `[G, n, k]` to E4M3 plus one f32 scale per 128x128 block,
//!   row-major `[G, ceil(n/128), k/128]`.
//!
//! Recipe (DeepSeek-V3): `scale = max(amax, 1e-4) / 448`, rounded up to a power of two for
//! [`ScaleFormat::Ue8m0`]; `q = e4m3_rn_satfinite(x * (1 / scale))`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};
use float8::F8E4M3;
use half::bf16;

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, check_aligned, ffi_call, int_arg};
use crate::layout::{BlockShape, GROUP, TokenGroupShape};
use crate::reference::quant::ScaleFormat;

/// The lengths a quantiser's three buffers must have, and how to describe them in errors.
struct Expected {
    k: usize,
    dims: [usize; 3],
    elements: Option<usize>,
    scales: Option<usize>,
    scale_dims: String,
}

/// Checks `k` and the three buffer lengths (input `x_arg`, `q`, `sf`) against `want`.
fn check_lengths(want: Expected, x_arg: &'static str, x_len: usize, q_len: usize, sf_len: usize) -> Result<()> {
    if !want.k.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "k", expected: format!("a multiple of {GROUP}"), got: want.k.to_string() });
    }
    let [g, rows, k] = want.dims;
    let too_big = || Error::InvalidArgument { arg: "shape", reason: format!("[{g}, {rows}, {k}] has more than 2^62 elements") };
    let elements = want.elements.filter(|&n| n < 1 << 62).ok_or_else(too_big)?;
    let scales = want.scales.ok_or_else(too_big)?;
    let expect_len = |arg: &'static str, len: usize, want: usize, what: &str| {
        if len == want {
            Ok(())
        } else {
            Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
        }
    };
    expect_len(x_arg, x_len, elements, &format!("[{g}, {rows}, {k}] bf16"))?;
    expect_len("q", q_len, elements, &format!("[{g}, {rows}, {k}] e4m3"))?;
    expect_len("sf", sf_len, scales, &want.scale_dims)
}

/// Checks the buffers of a per-token-group quantisation against `shape`. Pure: the wrapper calls it
/// before anything touches the GPU.
pub fn validate_per_token_group(shape: TokenGroupShape, x_len: usize, q_len: usize, sf_len: usize) -> Result<()> {
    let want = Expected {
        k: shape.k,
        dims: [shape.num_groups, shape.m, shape.k],
        elements: shape.elements(),
        scales: shape.scale_elements(),
        scale_dims: format!("[{}, {}, {}] f32, rows padded to a multiple of 4", shape.num_groups, shape.k_blocks(), shape.m_pad()),
    };
    check_lengths(want, "x", x_len, q_len, sf_len)
}

/// Checks the buffers of a per-block quantisation against `shape`. Pure, like
/// [`validate_per_token_group`].
pub fn validate_per_block(shape: BlockShape, w_len: usize, q_len: usize, sf_len: usize) -> Result<()> {
    let want = Expected {
        k: shape.k,
        dims: [shape.num_groups, shape.n, shape.k],
        elements: shape.elements(),
        scales: shape.scale_elements(),
        scale_dims: format!("[{}, {}, {}] f32", shape.num_groups, shape.n_blocks(), shape.k_blocks()),
    };
    check_lengths(want, "w", w_len, q_len, sf_len)
}

/// Raw addresses of a quantiser's operands, checked for the kernels' alignment.
struct Operands {
    input: u64,
    q: u64,
    sf: u64,
}

/// Takes the three pointers (their guards live in `launch`) and checks alignment: the input and
/// `sf` 16 bytes (vector loads; TMA for scales), `q` 8 bytes (vector stores).
fn operands<'a>(
    launch: &mut Launch<'a>,
    input_arg: &'static str,
    input: &'a impl DevicePtr<bf16>,
    q: &'a mut impl DevicePtrMut<F8E4M3>,
    sf: &'a mut impl DevicePtrMut<f32>,
) -> Result<Operands> {
    let ops = Operands { input: launch.input(input), q: launch.output(q), sf: launch.output(sf) };
    check_aligned(input_arg, ops.input, 16)?;
    check_aligned("q", ops.q, 8)?;
    check_aligned("sf", ops.sf, 16)?;
    Ok(ops)
}

/// Quantises bf16 `x` `[G, m, k]` to E4M3 `q` `[G, m, k]` with 1x128 scales `sf`
/// `[G, k / 128, round_up(m, 4)]` (transposed, TMA-aligned; padding rows are not written).
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
    let ops = operands(&mut launch, "x", x, q, sf)?;
    let params = ffi::dk_quant_per_token_group_params {
        x: ops.input as *const u16,
        q: ops.q as *mut u8,
        sf: ops.sf as *mut f32,
        num_groups: int_arg::<i64>("num_groups", shape.num_groups)?,
        m: int_arg::<i64>("m", shape.m)?,
        k: int_arg::<i64>("k", shape.k)?,
        ue8m0: i32::from(format == ScaleFormat::Ue8m0),
    };
    let s = launch.stream();
    // SAFETY: every pointer comes from a live cudarc buffer of the validated length whose guard
    // `launch` holds until `finish`; the params struct outlives the call, which only reads it.
    let status = ffi_call!(unsafe dk_quant_per_token_group(&params, s));
    launch.finish(status)
}

/// Quantises bf16 weights `w` `[G, n, k]` to E4M3 `q` `[G, n, k]` with one scale per 128x128
/// block, `sf` `[G, ceil(n / 128), k / 128]` row-major. `n` may be ragged (the last block row uses
/// the rows it has); `k % 128 == 0`. Same alignment rules and errors as
/// [`quantize_per_token_group`] (`w` in place of `x`). Asynchronous on `stream`.
pub fn quantize_per_block(
    stream: &CudaStream,
    w: &impl DevicePtr<bf16>,
    q: &mut impl DevicePtrMut<F8E4M3>,
    sf: &mut impl DevicePtrMut<f32>,
    shape: BlockShape,
    format: ScaleFormat,
) -> Result<()> {
    validate_per_block(shape, w.len(), q.len(), sf.len())?;
    let mut launch = Launch::new("quantize_per_block", stream)?;
    if shape.elements() == Some(0) {
        return Ok(());
    }
    if shape.scale_elements().is_none_or(|b| b > i32::MAX as usize) {
        return Err(Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} has more than 2^31 blocks") });
    }
    let ops = operands(&mut launch, "w", w, q, sf)?;
    let params = ffi::dk_quant_per_block_params {
        w: ops.input as *const u16,
        q: ops.q as *mut u8,
        sf: ops.sf as *mut f32,
        num_groups: int_arg::<i64>("num_groups", shape.num_groups)?,
        n: int_arg::<i64>("n", shape.n)?,
        k: int_arg::<i64>("k", shape.k)?,
        ue8m0: i32::from(format == ScaleFormat::Ue8m0),
    };
    let s = launch.stream();
    // SAFETY: as in `quantize_per_token_group`.
    let status = ffi_call!(unsafe dk_quant_per_block(&params, s));
    launch.finish(status)
}

/// The fused activation of a MoE expert: `h` `[G, m, 2k]` bf16 holds gate (columns `0..k`) and
/// up (`k..2k`); writes `a = SiLU(gate) · up` (f32) quantised per token group into `q`
/// `[G, m, k]` and `sf` `[G, k / 128, round_up(m, 4)]`, exactly the layouts
/// [`quantize_per_token_group`] writes (and the grouped GEMMs read). Same requirements and errors
/// (`h` in place of `x`, with twice the columns). Asynchronous on `stream`.
pub fn silu_mul_quantize(
    stream: &CudaStream,
    h: &impl DevicePtr<bf16>,
    q: &mut impl DevicePtrMut<F8E4M3>,
    sf: &mut impl DevicePtrMut<f32>,
    shape: TokenGroupShape,
    format: ScaleFormat,
) -> Result<()> {
    validate_per_token_group(shape, shape.elements().unwrap_or(usize::MAX), q.len(), sf.len())?;
    let want_h = shape.elements().and_then(|n| n.checked_mul(2)).unwrap_or(usize::MAX);
    if h.len() != want_h {
        return Err(Error::Shape {
            arg: "h",
            expected: format!("{want_h} elements ([{}, {}, {}] bf16: gate | up)", shape.num_groups, shape.m, 2 * shape.k),
            got: format!("{} elements", h.len()),
        });
    }
    let mut launch = Launch::new("silu_mul_quantize", stream)?;
    if shape.elements() == Some(0) {
        return Ok(());
    }
    let ops = operands(&mut launch, "h", h, q, sf)?;
    let params = ffi::dk_silu_mul_quant_params {
        h: ops.input as *const u16,
        q: ops.q as *mut u8,
        sf: ops.sf as *mut f32,
        num_groups: int_arg::<i64>("num_groups", shape.num_groups)?,
        m: int_arg::<i64>("m", shape.m)?,
        k: int_arg::<i64>("k", shape.k)?,
        ue8m0: i32::from(format == ScaleFormat::Ue8m0),
    };
    let s = launch.stream();
    // SAFETY: as in `quantize_per_token_group`; h holds G·m·2k elements (checked above).
    let status = ffi_call!(unsafe dk_silu_mul_quant(&params, s));
    launch.finish(status)
}

/// The shape of an [`Fp8Tensor`]: 1x128 activations or 128x128-block weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Shape {
    /// `[G, m, k]` with scales `[G, k / 128, round_up(m, 4)]` ([`quantize_per_token_group`]).
    TokenGroup(TokenGroupShape),
    /// `[G, n, k]` with scales `[G, ceil(n / 128), k / 128]` ([`quantize_per_block`]).
    Block(BlockShape),
}

impl From<TokenGroupShape> for Fp8Shape {
    fn from(s: TokenGroupShape) -> Self {
        Fp8Shape::TokenGroup(s)
    }
}

impl From<BlockShape> for Fp8Shape {
    fn from(s: BlockShape) -> Self {
        Fp8Shape::Block(s)
    }
}

impl Fp8Shape {
    /// Elements of the e4m3 tensor (`None` on overflow).
    pub fn elements(&self) -> Option<usize> {
        match self {
            Fp8Shape::TokenGroup(s) => s.elements(),
            Fp8Shape::Block(s) => s.elements(),
        }
    }

    /// f32 elements of the scale array, padding included (`None` on overflow).
    pub fn scale_elements(&self) -> Option<usize> {
        match self {
            Fp8Shape::TokenGroup(s) => s.scale_elements(),
            Fp8Shape::Block(s) => s.scale_elements(),
        }
    }
}

/// An owned FP8 tensor: the e4m3 values, their f32 scales, the shape and the scale format, as
/// [`quantize`] returns them. No scale sizes to work out: [`Fp8Tensor::activations`] and
/// [`Fp8Tensor::weights`] hand the pair to the GEMMs.
#[derive(Debug)]
pub struct Fp8Tensor {
    q: CudaSlice<F8E4M3>,
    sf: CudaSlice<f32>,
    shape: Fp8Shape,
    format: ScaleFormat,
}

impl Fp8Tensor {
    /// Zeroed buffers for `shape` on `stream` (what the quantisers fill in place).
    pub fn zeros(stream: &Arc<CudaStream>, shape: impl Into<Fp8Shape>, format: ScaleFormat) -> Result<Self> {
        let shape = shape.into();
        let too_big = || Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} has more than 2^62 elements") };
        let elements = shape.elements().filter(|&n| n < 1 << 62).ok_or_else(too_big)?;
        let scales = shape.scale_elements().ok_or_else(too_big)?;
        // CUDA cannot allocate zero bytes: an empty tensor holds one element, which q() and sf() hide.
        Ok(Self { q: stream.alloc_zeros(elements.max(1))?, sf: stream.alloc_zeros(scales.max(1))?, shape, format })
    }

    /// The shape the buffers were sized for.
    pub fn shape(&self) -> Fp8Shape {
        self.shape
    }

    /// Whether the scales are any f32 or powers of two (UE8M0).
    pub fn format(&self) -> ScaleFormat {
        self.format
    }

    /// The e4m3 values, exactly `shape.elements()` of them.
    pub fn q(&self) -> CudaView<'_, F8E4M3> {
        self.q.slice(..self.shape.elements().unwrap_or(0))
    }

    /// The scales, exactly `shape.scale_elements()` of them.
    pub fn sf(&self) -> CudaView<'_, f32> {
        self.sf.slice(..self.shape.scale_elements().unwrap_or(0))
    }

    /// The GEMMs' activation operand (meaningful for a [`Fp8Shape::TokenGroup`] tensor; the GEMM
    /// checks the lengths).
    pub fn activations(&self) -> crate::gemm::Fp8Activations<'_> {
        crate::gemm::Fp8Activations { q: self.q(), sf: self.sf() }
    }

    /// The GEMMs' weight operand (meaningful for a [`Fp8Shape::Block`] tensor; the GEMM checks
    /// the lengths).
    pub fn weights(&self) -> crate::gemm::Fp8Weights<'_> {
        crate::gemm::Fp8Weights { q: self.q(), sf: self.sf() }
    }

    /// The owned buffers, `(q, sf)`; an empty tensor's hold one element each.
    pub fn into_parts(self) -> (CudaSlice<F8E4M3>, CudaSlice<f32>) {
        (self.q, self.sf)
    }
}

/// Quantises `x` into a new [`Fp8Tensor`]: per token group for a [`TokenGroupShape`]
/// ([`quantize_per_token_group`]), per 128x128 block for a [`BlockShape`]
/// ([`quantize_per_block`]). Same requirements and errors as those; asynchronous on `stream`.
pub fn quantize(stream: &Arc<CudaStream>, x: &impl DevicePtr<bf16>, shape: impl Into<Fp8Shape>, format: ScaleFormat) -> Result<Fp8Tensor> {
    let shape = shape.into();
    // Validated before anything is allocated.
    match shape {
        Fp8Shape::TokenGroup(s) => validate_per_token_group(s, x.len(), s.elements().unwrap_or(0), s.scale_elements().unwrap_or(0))?,
        Fp8Shape::Block(s) => validate_per_block(s, x.len(), s.elements().unwrap_or(0), s.scale_elements().unwrap_or(0))?,
    }
    let mut t = Fp8Tensor::zeros(stream, shape, format)?;
    let (n, ns) = (shape.elements().unwrap_or(0), shape.scale_elements().unwrap_or(0));
    let (q, sf) = (&mut t.q.slice_mut(..n), &mut t.sf.slice_mut(..ns));
    match shape {
        Fp8Shape::TokenGroup(s) => quantize_per_token_group(stream, x, q, sf, s, format)?,
        Fp8Shape::Block(s) => quantize_per_block(stream, x, q, sf, s, format)?,
    }
    Ok(t)
}

/// [`silu_mul_quantize`] into a new [`Fp8Tensor`] (`shape` is the output's: `h` has `2k` columns).
pub fn silu_mul_quantize_new(
    stream: &Arc<CudaStream>,
    h: &impl DevicePtr<bf16>,
    shape: TokenGroupShape,
    format: ScaleFormat,
) -> Result<Fp8Tensor> {
    let (n, ns) = (shape.elements().unwrap_or(0), shape.scale_elements().unwrap_or(0));
    validate_per_token_group(shape, n, n, ns)?;
    let mut t = Fp8Tensor::zeros(stream, shape, format)?;
    silu_mul_quantize(stream, h, &mut t.q.slice_mut(..n), &mut t.sf.slice_mut(..ns), shape, format)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_arg(r: Result<()>) -> &'static str {
        match r {
            Err(Error::Shape { arg, .. }) => arg,
            other => panic!("expected a shape error, got {other:?}"),
        }
    }

    #[test]
    fn token_group_validation_names_each_bad_argument() {
        let s = TokenGroupShape::batched(2, 5, 256);
        let (n, sf) = (2 * 5 * 256, 2 * 2 * 8);
        assert!(validate_per_token_group(s, n, n, sf).is_ok());
        assert_eq!(shape_arg(validate_per_token_group(TokenGroupShape::new(5, 200), 1000, 1000, 16)), "k");
        assert_eq!(shape_arg(validate_per_token_group(s, n - 1, n, sf)), "x");
        assert_eq!(shape_arg(validate_per_token_group(s, n, n + 1, sf)), "q");
        assert_eq!(shape_arg(validate_per_token_group(s, n, n, 2 * 2 * 5)), "sf");
        let e = validate_per_token_group(s, n, n, 20).unwrap_err().to_string();
        assert!(e.contains("`sf`") && e.contains("32 elements") && e.contains("got 20"), "{e}");
        assert!(matches!(
            validate_per_token_group(TokenGroupShape::batched(1 << 40, 1 << 20, 128), 0, 0, 0),
            Err(Error::InvalidArgument { arg: "shape", .. })
        ));
        assert!(validate_per_token_group(TokenGroupShape::new(0, 7168), 0, 0, 0).is_ok());
    }

    #[test]
    fn block_validation_names_each_bad_argument() {
        let s = BlockShape::batched(3, 130, 256);
        let (n, sf) = (3 * 130 * 256, 3 * 2 * 2);
        assert!(validate_per_block(s, n, n, sf).is_ok());
        assert_eq!(shape_arg(validate_per_block(BlockShape::new(128, 100), 12800, 12800, 1)), "k");
        assert_eq!(shape_arg(validate_per_block(s, n + 1, n, sf)), "w");
        assert_eq!(shape_arg(validate_per_block(s, n, n - 1, sf)), "q");
        let e = validate_per_block(s, n, n, 6).unwrap_err().to_string();
        assert!(e.contains("`sf`") && e.contains("12 elements ([3, 2, 2] f32)"), "{e}");
        assert!(validate_per_block(BlockShape::new(0, 7168), 0, 0, 0).is_ok());
    }

    #[test]
    fn silu_mul_reference_is_swiglu() {
        use crate::reference::quant::{silu_mul_f32, silu_mul_per_token_group};
        assert_eq!(silu_mul_f32(0.0, 5.0), 0.0);
        assert!((silu_mul_f32(2.0, 3.0) - 3.0 * 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        // One row, k = 128: gate = 1, up = i / 64.
        let h: Vec<f32> = (0..256).map(|i| if i < 128 { 1.0 } else { (i - 128) as f32 / 64.0 }).collect();
        let r = silu_mul_per_token_group(&h, 1, 128, ScaleFormat::F32);
        let silu1 = 1.0f32 / (1.0 + (-1.0f32).exp());
        assert_eq!(r.scales, vec![(silu1 * (127.0 / 64.0)) / 448.0]);
        let back = r.dequant();
        assert!(back.iter().enumerate().all(|(i, &v)| (v - silu1 * i as f32 / 64.0).abs() <= 0.07 * silu1 * i as f32 / 64.0 + 1e-6));
    }
}
