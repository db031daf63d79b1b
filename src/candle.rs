//! deepkern on [candle](https://crates.io/crates/candle-core) tensors (feature `candle`).
//!
//! Every entry point takes `candle_core::Tensor`s that live on a CUDA device, runs deepkern's
//! kernel on that device's stream (`CudaDevice::cuda_stream`, the stream candle's own kernels
//! use, so no synchronisation is needed around the calls) and returns new tensors on the same
//! device. Nothing is copied: inputs are read in place from candle's storage and outputs are
//! allocated on the device and handed to candle as they are.
//!
//! | here | wraps |
//! |---|---|
//! | [`quantize_per_token_group`], [`quantize_per_block`], [`silu_mul_quantize`] | [`crate::quant`]; return an [`Fp8Tensor`]: E4M3 values and f32 scales |
//! | [`gemm_fp8`], [`gemm_fp8_contiguous`], [`gemm_fp8_masked`]; [`gemm_fp8_f32`] and [`gemm_fp8_f32_accumulate`] (in place) | [`crate::gemm`] |
//! | [`MlaDecoder`] | [`crate::mla::decode`] over a paged cache held in tensors ([`PagedCache`]) |
//! | [`new_virtual_group`], [`dispatch`], [`combine`] | [`crate::ep::Group`] on virtual ranks of one device |
//!
//! The `validate_*` functions are the checks of the entry points that cannot be called without a
//! device (they need a group or make a workspace): pure, usable on any tensors.
//!
//! # Checks
//!
//! Before anything touches the GPU, every tensor argument is checked, each failure an
//! [`Error`] naming the argument: its dtype ([`Error::Dtype`]), a contiguous
//! row-major layout ([`Error::Stride`]; an offset into the storage is fine, call
//! `Tensor::contiguous` on a transposed or strided view), its shape ([`Error::Shape`]), then its
//! device: a CUDA device ([`Error::InvalidArgument`] for a CPU or Metal tensor), the same one as
//! the call's other tensors. Then the wrapped entry point checks what it always checks (alignment,
//! lengths). The metadata checks come first, so they hold for CPU tensors too.
//!
//! # Shapes
//!
//! The quantisers take `[m, k]` or a batch `[g, m, k]` and keep that rank in their outputs. Scales
//! have the shapes of the layouts deepkern's kernels read ([`crate::layout`]): per token group
//! `[(g,) k / 128, round_up(m, 4)]` (transposed, rows padded to a multiple of 4), per block
//! `[(g,) ceil(n / 128), k / 128]`.

use std::sync::Arc;

use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, StorageRef, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr, ValidAsZeroBits};
use float8::F8E4M3;
use half::{bf16, f16};

use crate::ep::{self, Group, GroupShape, Handle, Payload};
use crate::error::{Error, Result};
use crate::gemm::{self, Fp8Activations, Fp8Weights, GemmOptions, GemmShape, MaskedShape};
use crate::layout::{BlockShape, GROUP, TokenGroupShape, ceil_div, tma_aligned_rows};
use crate::mla::{self, DecodeShape, DecodeWorkspace, HEAD_DIM_K, HEAD_DIM_V, PagedKv};
use crate::reference::quant::ScaleFormat;

/// FP8 values and their f32 scales, as the quantisers write them and the GEMMs and the
/// expert-parallel dispatch read them: `q` E4M3 with the shape of the input, `sf` the scales in
/// the layout of the quantiser that wrote them (see the module docs).
#[derive(Clone, Debug)]
pub struct Fp8Tensor {
    /// E4M3 values (`DType::F8E4M3`), the input's shape.
    pub q: Tensor,
    /// f32 scales: per token group `[(g,) k / 128, round_up(m, 4)]`, per block
    /// `[(g,) ceil(n / 128), k / 128]`.
    pub sf: Tensor,
}

// ---- argument checks -------------------------------------------------------------------------

/// Checks `t`'s dtype (one of `dtypes`) and that its layout is contiguous and row-major.
fn check_meta(arg: &'static str, t: &Tensor, dtypes: &[DType]) -> Result<()> {
    if !dtypes.contains(&t.dtype()) {
        let expected = match dtypes {
            [DType::BF16, DType::F16] => "bf16 or f16",
            [d] => d.as_str(),
            _ => "another dtype",
        };
        return Err(Error::Dtype { arg, expected, got: t.dtype().as_str() });
    }
    if !t.is_contiguous() {
        return Err(Error::Stride {
            arg,
            expected: "a contiguous row-major layout (call `Tensor::contiguous` first)".into(),
            got: format!("strides {:?} for shape {:?}", t.stride(), t.dims()),
        });
    }
    Ok(())
}

/// The dims of `t`, which must have rank `N`; `what` describes the expected shape.
fn dims<const N: usize>(arg: &'static str, t: &Tensor, what: &str) -> Result<[usize; N]> {
    <[usize; N]>::try_from(t.dims()).map_err(|_| Error::Shape { arg, expected: what.into(), got: format!("shape {:?}", t.dims()) })
}

/// Checks that `t` has exactly the shape `want`.
fn expect_dims(arg: &'static str, t: &Tensor, want: &[usize], what: &str) -> Result<()> {
    if t.dims() == want {
        Ok(())
    } else {
        Err(Error::Shape { arg, expected: format!("shape {want:?} ({what})"), got: format!("shape {:?}", t.dims()) })
    }
}

/// The CUDA device of `t`, which must be the same device as `first`'s (the call's first tensor,
/// named `first_arg`).
fn cuda_device<'t>(arg: &'static str, t: &'t Tensor, first: Option<(&'static str, &Tensor)>) -> Result<&'t CudaDevice> {
    let Device::Cuda(dev) = t.device() else {
        return Err(Error::InvalidArgument {
            arg,
            reason: format!("expected a tensor on a CUDA device, got one on {:?}", t.device().location()),
        });
    };
    if let Some((first_arg, first)) = first
        && !first.device().same_device(t.device())
    {
        return Err(Error::InvalidArgument {
            arg,
            reason: format!("is on {:?}, another device than `{first_arg}` ({:?})", t.device().location(), first.device().location()),
        });
    }
    Ok(dev)
}

/// Checks that every tensor of `args` is on one CUDA device (the first's) and returns it.
fn one_device<'t>(args: &[(&'static str, &'t Tensor)]) -> Result<&'t CudaDevice> {
    let (first_arg, first) = args[0];
    let dev = cuda_device(first_arg, first, None)?;
    for &(arg, t) in &args[1..] {
        cuda_device(arg, t, Some((first_arg, first)))?;
    }
    Ok(dev)
}

/// A candle error met while reaching into a tensor's storage, as an error naming the argument.
fn candle_err(arg: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| Error::InvalidArgument { arg, reason: format!("candle: {e}") }
}

// ---- storage access --------------------------------------------------------------------------

/// A tensor's storage, locked for reading while a kernel is enqueued on it.
struct Held<'t> {
    arg: &'static str,
    tensor: &'t Tensor,
    storage: StorageRef<'t>,
}

impl<'t> Held<'t> {
    fn new(arg: &'static str, tensor: &'t Tensor) -> Self {
        let (storage, _) = tensor.storage_and_layout();
        Self { arg, tensor, storage }
    }

    /// The tensor's elements (its layout's contiguous range of the storage) as a cudarc view.
    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        let Storage::Cuda(storage) = &*self.storage else {
            return Err(Error::InvalidArgument { arg: self.arg, reason: "expected CUDA storage".into() });
        };
        let slice: &CudaSlice<T> = storage.as_cuda_slice::<T>().map_err(candle_err(self.arg))?;
        let (start, end) = self.tensor.layout().contiguous_offsets().ok_or_else(|| Error::Stride {
            arg: self.arg,
            expected: "a contiguous row-major layout".into(),
            got: format!("strides {:?}", self.tensor.stride()),
        })?;
        slice.try_slice(start..end).ok_or_else(|| Error::Shape {
            arg: self.arg,
            expected: format!("elements {start}..{end} inside its storage"),
            got: format!("{} elements of storage", slice.len()),
        })
    }
}

/// A fresh zeroed device buffer of `n` elements (at least one: cudarc allocates no empty buffer).
fn alloc<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    Ok(stream.alloc_zeros::<T>(n.max(1))?)
}

/// Hands a device buffer to candle as a contiguous tensor of `shape` (the buffer may be longer).
fn wrap<T: CudaDType>(dev: &CudaDevice, slice: CudaSlice<T>, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())), shape, BackpropOp::none(), false)
}

// ---- quantisers ------------------------------------------------------------------------------

/// `[m, k]` or `[g, m, k]`: the batch (1 for rank 2), rows, columns, and whether it was batched.
fn batched_dims(arg: &'static str, t: &Tensor, what: &str) -> Result<(usize, usize, usize, bool)> {
    match *t.dims() {
        [m, k] => Ok((1, m, k, false)),
        [g, m, k] => Ok((g, m, k, true)),
        _ => Err(Error::Shape { arg, expected: what.into(), got: format!("shape {:?}", t.dims()) }),
    }
}

/// `[g, rest..]` if batched, else `[rest..]`.
fn with_batch(batched: bool, g: usize, rest: &[usize]) -> Vec<usize> {
    if batched { std::iter::once(g).chain(rest.iter().copied()).collect() } else { rest.to_vec() }
}

/// The three per-token-group quantisers' common path: `input` bf16 `[(g,) m, in_k]`, output
/// `[(g,) m, in_k / in_per_out]`.
fn token_group_quantize(
    arg: &'static str,
    input: &Tensor,
    in_per_out: usize,
    run: impl FnOnce(
        &CudaStream,
        &CudaView<bf16>,
        &mut cudarc::driver::CudaViewMut<F8E4M3>,
        &mut cudarc::driver::CudaViewMut<f32>,
        TokenGroupShape,
    ) -> Result<()>,
) -> Result<Fp8Tensor> {
    check_meta(arg, input, &[DType::BF16])?;
    let what = if in_per_out == 1 { "[m, k] or [g, m, k] bf16" } else { "[m, 2k] or [g, m, 2k] bf16 (gate | up)" };
    let (g, m, in_k, batched) = batched_dims(arg, input, what)?;
    if !in_k.is_multiple_of(in_per_out) {
        return Err(Error::Shape { arg, expected: what.into(), got: format!("shape {:?} (odd last dimension)", input.dims()) });
    }
    let k = in_k / in_per_out;
    if !k.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "k", expected: format!("a multiple of {GROUP}"), got: k.to_string() });
    }
    let dev = cuda_device(arg, input, None)?;
    let stream = dev.cuda_stream();
    let shape = TokenGroupShape::batched(g, m, k);
    let elements = shape.elements().ok_or_else(|| Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} overflows") })?;
    let scales = shape.scale_elements().ok_or_else(|| Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} overflows") })?;
    let mut q = alloc::<F8E4M3>(&stream, elements)?;
    let mut sf = alloc::<f32>(&stream, scales)?;
    {
        let held = Held::new(arg, input);
        let x = held.view::<bf16>()?;
        run(&stream, &x, &mut q.slice_mut(..elements), &mut sf.slice_mut(..scales), shape)?;
    }
    Ok(Fp8Tensor {
        q: wrap(dev, q, with_batch(batched, g, &[m, k])),
        sf: wrap(dev, sf, with_batch(batched, g, &[k / GROUP, tma_aligned_rows(m)])),
    })
}

/// Quantises bf16 activations `x` (`[m, k]` or `[g, m, k]`, `k % 128 == 0`) per 1x128 token group
/// ([`crate::quantize_per_token_group`]): `q` has `x`'s shape, `sf` is
/// `[(g,) k / 128, round_up(m, 4)]` (its padding rows hold zeros).
pub fn quantize_per_token_group(x: &Tensor, format: ScaleFormat) -> Result<Fp8Tensor> {
    token_group_quantize("x", x, 1, |s, x, q, sf, shape| crate::quantize_per_token_group(s, x, q, sf, shape, format))
}

/// A MoE expert's fused activation ([`crate::silu_mul_quantize`]): `h` bf16 `[(g,) m, 2k]` holds
/// gate and up; returns `SiLU(gate) · up` quantised like [`quantize_per_token_group`]
/// (`q` `[(g,) m, k]`).
pub fn silu_mul_quantize(h: &Tensor, format: ScaleFormat) -> Result<Fp8Tensor> {
    token_group_quantize("h", h, 2, |s, h, q, sf, shape| crate::silu_mul_quantize(s, h, q, sf, shape, format))
}

/// Quantises bf16 weights `w` (`[n, k]` or `[g, n, k]`, `k % 128 == 0`) per 128x128 block
/// ([`crate::quantize_per_block`]): `q` has `w`'s shape, `sf` is `[(g,) ceil(n / 128), k / 128]`.
pub fn quantize_per_block(w: &Tensor, format: ScaleFormat) -> Result<Fp8Tensor> {
    check_meta("w", w, &[DType::BF16])?;
    let (g, n, k, batched) = batched_dims("w", w, "[n, k] or [g, n, k] bf16")?;
    if !k.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "k", expected: format!("a multiple of {GROUP}"), got: k.to_string() });
    }
    let dev = cuda_device("w", w, None)?;
    let stream = dev.cuda_stream();
    let shape = BlockShape::batched(g, n, k);
    let elements = shape.elements().ok_or_else(|| Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} overflows") })?;
    let scales = shape.scale_elements().ok_or_else(|| Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} overflows") })?;
    let mut q = alloc::<F8E4M3>(&stream, elements)?;
    let mut sf = alloc::<f32>(&stream, scales)?;
    {
        let held = Held::new("w", w);
        let x = held.view::<bf16>()?;
        crate::quantize_per_block(&stream, &x, &mut q.slice_mut(..elements), &mut sf.slice_mut(..scales), shape, format)?;
    }
    Ok(Fp8Tensor {
        q: wrap(dev, q, with_batch(batched, g, &[n, k])),
        sf: wrap(dev, sf, with_batch(batched, g, &[ceil_div(n, GROUP), k / GROUP])),
    })
}

// ---- GEMMs -----------------------------------------------------------------------------------

/// Checks an FP8 operand's dtypes and layouts (named `q_arg` and `sf_arg`).
fn check_fp8(q_arg: &'static str, sf_arg: &'static str, t: &Fp8Tensor) -> Result<()> {
    check_meta(q_arg, &t.q, &[DType::F8E4M3])?;
    check_meta(sf_arg, &t.sf, &[DType::F32])
}

/// The GEMMs' common path: checks the scales' shapes, finds the device, reads the operands,
/// allocates `d` (`d_dims`, bf16, zeroed) and runs `run`.
#[allow(clippy::too_many_arguments)]
fn gemm_common(
    a: &Fp8Tensor,
    b: &Fp8Tensor,
    index: Option<(&'static str, &Tensor)>,
    sfa_dims: &[usize],
    sfb_dims: &[usize],
    d_dims: Vec<usize>,
    run: impl FnOnce(&CudaStream, &Fp8Activations, &Fp8Weights, Option<&CudaView<i32>>, &mut cudarc::driver::CudaViewMut<bf16>) -> Result<()>,
) -> Result<Tensor> {
    expect_dims("sfa", &a.sf, sfa_dims, "f32 1x128 scales, transposed, rows padded to a multiple of 4")?;
    expect_dims("sfb", &b.sf, sfb_dims, "f32 128x128 block scales")?;
    let mut args = vec![("a", &a.q), ("sfa", &a.sf), ("b", &b.q), ("sfb", &b.sf)];
    args.extend(index);
    let dev = one_device(&args)?;
    let stream = dev.cuda_stream();
    let n_out: usize = d_dims.iter().product();
    let mut d = alloc::<bf16>(&stream, n_out)?;
    {
        let held: Vec<Held> = args.iter().map(|&(arg, t)| Held::new(arg, t)).collect();
        let av = Fp8Activations { q: held[0].view()?, sf: held[1].view()? };
        let bv = Fp8Weights { q: held[2].view()?, sf: held[3].view()? };
        let iv = held.get(4).map(Held::view::<i32>).transpose()?;
        run(&stream, &av, &bv, iv.as_ref(), &mut d.slice_mut(..n_out))?;
    }
    Ok(wrap(dev, d, d_dims))
}

/// Checks a dense GEMM's operands; returns its shape and the scales' expected shapes.
fn dense_operands(a: &Fp8Tensor, b: &Fp8Tensor) -> Result<(GemmShape, [usize; 2], [usize; 2])> {
    check_fp8("a", "sfa", a)?;
    check_fp8("b", "sfb", b)?;
    let [m, k] = dims("a", &a.q, "[m, k] e4m3")?;
    let [n, kb] = dims("b", &b.q, "[n, k] e4m3")?;
    if kb != k {
        return Err(Error::Shape { arg: "b", expected: format!("[n, {k}] (k of `a`)"), got: format!("shape {:?}", b.q.dims()) });
    }
    Ok((GemmShape { m, n, k }, [k / GROUP, tma_aligned_rows(m)], [ceil_div(n, GROUP), k / GROUP]))
}

/// Dense FP8 GEMM ([`crate::gemm::gemm_fp8_with`]): `a` `[m, k]` with scales
/// `[k / 128, round_up(m, 4)]` (as [`quantize_per_token_group`] returns them), `b` `[n, k]` with
/// scales `[ceil(n / 128), k / 128]` (as [`quantize_per_block`] returns them); returns
/// `a · bᵀ` as bf16 `[m, n]`.
pub fn gemm_fp8(a: &Fp8Tensor, b: &Fp8Tensor, options: GemmOptions) -> Result<Tensor> {
    let (shape, sfa, sfb) = dense_operands(a, b)?;
    gemm_common(a, b, None, &sfa, &sfb, vec![shape.m, shape.n], |s, a, b, _, d| gemm::gemm_fp8_with(s, a, b, d, shape, options))
}

/// The f32 GEMM of weight gradients ([`crate::gemm::gemm_fp8_f32`]): the operands of
/// [`gemm_fp8`]; returns `a · bᵀ` as f32 `[m, n]`.
pub fn gemm_fp8_f32(a: &Fp8Tensor, b: &Fp8Tensor) -> Result<Tensor> {
    let (shape, sfa, sfb) = dense_operands(a, b)?;
    expect_dims("sfa", &a.sf, &sfa, "f32 1x128 scales, transposed, rows padded to a multiple of 4")?;
    expect_dims("sfb", &b.sf, &sfb, "f32 128x128 block scales")?;
    let dev = one_device(&[("a", &a.q), ("sfa", &a.sf), ("b", &b.q), ("sfb", &b.sf)])?;
    let stream = dev.cuda_stream();
    let n_out = shape.m * shape.n;
    let mut d = alloc::<f32>(&stream, n_out)?;
    run_f32(&stream, a, b, &mut d.slice_mut(..n_out), shape, false)?;
    Ok(wrap(dev, d, (shape.m, shape.n)))
}

/// [`gemm_fp8_f32`] accumulating in place: `d += a · bᵀ`, `d` an f32 `[m, n]` tensor (contiguous,
/// on the operands' device) that must not share its storage with any operand. Each element is
/// read, added to in f32 and written back by the thread that computed it. The write goes through
/// candle's in-place op on `d`, which holds `d`'s storage for writing while the kernel is enqueued.
pub fn gemm_fp8_f32_accumulate(a: &Fp8Tensor, b: &Fp8Tensor, d: &Tensor) -> Result<()> {
    let (shape, sfa, sfb) = dense_operands(a, b)?;
    expect_dims("sfa", &a.sf, &sfa, "f32 1x128 scales, transposed, rows padded to a multiple of 4")?;
    expect_dims("sfb", &b.sf, &sfb, "f32 128x128 block scales")?;
    check_meta("d", d, &[DType::F32])?;
    expect_dims("d", d, &[shape.m, shape.n], "f32 [m, n]")?;
    let operands = [("a", &a.q), ("sfa", &a.sf), ("b", &b.q), ("sfb", &b.sf)];
    {
        // In place, `d`'s storage is locked for writing while the operands' are read: one storage
        // for both would deadlock, and the kernel would read what it writes.
        let (d_storage, _) = d.storage_and_layout();
        for &(arg, t) in &operands {
            let (storage, _) = t.storage_and_layout();
            if std::ptr::eq(&*storage, &*d_storage) {
                return Err(Error::InvalidArgument { arg: "d", reason: format!("shares its storage with `{arg}`") });
            }
        }
    }
    let mut args = operands.to_vec();
    args.push(("d", d));
    one_device(&args)?;
    let op = AccumulateOp { a, b, shape, error: std::cell::RefCell::new(None) };
    match d.inplace_op1(&op) {
        Ok(()) => Ok(()),
        Err(e) => Err(op.error.take().unwrap_or_else(|| candle_err("d")(e))),
    }
}

/// Runs the f32 GEMM on operands already checked.
fn run_f32(
    stream: &CudaStream,
    a: &Fp8Tensor,
    b: &Fp8Tensor,
    d: &mut cudarc::driver::CudaViewMut<f32>,
    shape: GemmShape,
    accumulate: bool,
) -> Result<()> {
    let held = [Held::new("a", &a.q), Held::new("sfa", &a.sf), Held::new("b", &b.q), Held::new("sfb", &b.sf)];
    let av = Fp8Activations { q: held[0].view()?, sf: held[1].view()? };
    let bv = Fp8Weights { q: held[2].view()?, sf: held[3].view()? };
    gemm::gemm_fp8_f32(stream, &av, &bv, d, shape, accumulate)
}

/// The in-place op of [`gemm_fp8_f32_accumulate`]: candle hands it `d`'s storage for writing; it
/// reads the four operands from theirs. A deepkern error is kept here, so the caller gets it back
/// as it was rather than as candle's text.
struct AccumulateOp<'a> {
    a: &'a Fp8Tensor,
    b: &'a Fp8Tensor,
    shape: GemmShape,
    error: std::cell::RefCell<Option<Error>>,
}

impl candle_core::InplaceOp1 for AccumulateOp<'_> {
    fn name(&self) -> &'static str {
        "deepkern::candle::gemm_fp8_f32_accumulate"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<()> {
        candle_core::bail!("{} needs a CUDA device", self.name())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let mut run = || -> Result<()> {
            let stream = storage.device.cuda_stream();
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::Stride {
                arg: "d",
                expected: "a contiguous row-major layout".into(),
                got: format!("strides {:?}", layout.stride()),
            })?;
            let d = storage.as_cuda_slice_mut::<f32>().map_err(candle_err("d"))?;
            let len = d.len();
            let mut d = d.try_slice_mut(start..end).ok_or_else(|| Error::Shape {
                arg: "d",
                expected: format!("elements {start}..{end} inside its storage"),
                got: format!("{len} elements of storage"),
            })?;
            run_f32(&stream, self.a, self.b, &mut d, self.shape, true)
        };
        run().map_err(|e| {
            let text = e.to_string();
            *self.error.borrow_mut() = Some(e);
            candle_core::Error::Msg(text)
        })
    }
}

/// M-grouped contiguous FP8 GEMM of mixture-of-experts prefill
/// ([`crate::gemm::gemm_fp8_contiguous_with`]): `a` `[m, k]` holds every expert's rows, each
/// expert's segment padded to a multiple of 128 (so `m % 128 == 0`), `m_indices` i32 `[m]` the
/// expert of each row (-1 on padding), `b` the experts' weights `[groups, n, k]` with scales
/// `[groups, ceil(n / 128), k / 128]`. Returns bf16 `[m, n]`, zero on the padding rows.
pub fn gemm_fp8_contiguous(a: &Fp8Tensor, b: &Fp8Tensor, m_indices: &Tensor, options: GemmOptions) -> Result<Tensor> {
    check_fp8("a", "sfa", a)?;
    check_fp8("b", "sfb", b)?;
    check_meta("m_indices", m_indices, &[DType::I32])?;
    let [m, k] = dims("a", &a.q, "[m, k] e4m3")?;
    let [groups, n, kb] = dims("b", &b.q, "[groups, n, k] e4m3")?;
    if kb != k {
        return Err(Error::Shape { arg: "b", expected: format!("[groups, n, {k}] (k of `a`)"), got: format!("shape {:?}", b.q.dims()) });
    }
    expect_dims("m_indices", m_indices, &[m], "i32, one expert per row of `a`")?;
    let shape = GemmShape { m, n, k };
    let sfa = [k / GROUP, tma_aligned_rows(m)];
    let sfb = [groups, ceil_div(n, GROUP), k / GROUP];
    gemm_common(a, b, Some(("m_indices", m_indices)), &sfa, &sfb, vec![m, n], |s, a, b, idx, d| {
        let idx = idx.expect("m_indices is held");
        gemm::gemm_fp8_contiguous_with(s, a, b, idx, d, shape, groups, options)
    })
}

/// M-grouped masked FP8 GEMM of mixture-of-experts decode ([`crate::gemm::gemm_fp8_masked_with`]):
/// `a` `[groups, max_m, k]` with scales `[groups, k / 128, round_up(max_m, 4)]`, `b`
/// `[groups, n, k]` with scales `[groups, ceil(n / 128), k / 128]`, `masked_m` i32 `[groups]` the
/// valid rows of each group (read on the device). Returns bf16 `[groups, max_m, n]`; rows past
/// `masked_m[g]` are zero.
pub fn gemm_fp8_masked(a: &Fp8Tensor, b: &Fp8Tensor, masked_m: &Tensor, options: GemmOptions) -> Result<Tensor> {
    check_fp8("a", "sfa", a)?;
    check_fp8("b", "sfb", b)?;
    check_meta("masked_m", masked_m, &[DType::I32])?;
    let [groups, max_m, k] = dims("a", &a.q, "[groups, max_m, k] e4m3")?;
    let [gb, n, kb] = dims("b", &b.q, "[groups, n, k] e4m3")?;
    if gb != groups || kb != k {
        return Err(Error::Shape {
            arg: "b",
            expected: format!("[{groups}, n, {k}] (groups and k of `a`)"),
            got: format!("shape {:?}", b.q.dims()),
        });
    }
    expect_dims("masked_m", masked_m, &[groups], "i32, valid rows per group")?;
    let shape = MaskedShape { groups, max_m, n, k };
    let sfa = [groups, k / GROUP, tma_aligned_rows(max_m)];
    let sfb = [groups, ceil_div(n, GROUP), k / GROUP];
    gemm_common(a, b, Some(("masked_m", masked_m)), &sfa, &sfb, vec![groups, max_m, n], |s, a, b, mm, d| {
        gemm::gemm_fp8_masked_with(s, a, b, mm.expect("masked_m is held"), d, shape, options)
    })
}

// ---- MLA decode ------------------------------------------------------------------------------

/// A paged MLA latent cache held in tensors.
#[derive(Clone, Copy, Debug)]
pub struct PagedCache<'a> {
    /// `[num_pages, page, 576]`, the queries' dtype (bf16 or f16); `page` one of
    /// [`crate::mla::PAGE_SIZES`].
    pub cache: &'a Tensor,
    /// i32 `[batch, max_pages]`: page indices of each request.
    pub block_table: &'a Tensor,
    /// i32 `[batch]`: sequence lengths (what the kernels read).
    pub lens: &'a Tensor,
    /// The same lengths on the host, when the caller has them: then a length the block table
    /// cannot cover is an error before any launch (see [`crate::mla::PagedKv::lens_host`]).
    pub lens_host: Option<&'a [i32]>,
}

/// MLA decode steps ([`crate::mla::decode`]) on candle tensors. It keeps the decode's device
/// workspace (schedule, split-KV partials) between steps, and makes a new one when a step's
/// `[batch, s_q, h_q]` or device differs from the last one's.
#[derive(Default)]
pub struct MlaDecoder {
    ws: Option<(Arc<CudaStream>, DecodeWorkspace)>,
}

impl MlaDecoder {
    /// A decoder with no workspace yet (the first step makes one).
    pub fn new() -> Self {
        Self::default()
    }

    /// One decode step: `q` `[batch, s_q, h_q, 576]` (bf16 or f16) attends to `kv` with causal
    /// multi-token masking (query token `s` sees keys `0 ..= len - s_q + s`) and `softmax_scale`.
    /// Returns `out` `[batch, s_q, h_q, 512]` (the queries' dtype) and `lse` f32
    /// `[batch, s_q, h_q]` (natural log; -inf and zeros for a row that sees no key).
    pub fn decode(&mut self, q: &Tensor, kv: &PagedCache, softmax_scale: f32) -> Result<(Tensor, Tensor)> {
        let (shape, page, max_pages) = validate_mla_decode(q, kv)?;
        let dev = one_device(&[("q", q), ("cache", kv.cache), ("block_table", kv.block_table), ("lens", kv.lens)])?;
        let stream = dev.cuda_stream();
        let fresh = match &self.ws {
            Some((s, ws)) => s.cu_stream() != stream.cu_stream() || ws.shape() != shape,
            None => true,
        };
        if fresh {
            self.ws = None;
            self.ws = Some((stream.clone(), DecodeWorkspace::new(&stream, shape)?));
        }
        let (_, ws) = self.ws.as_mut().expect("workspace made above");
        match q.dtype() {
            DType::F16 => decode_typed::<f16>(dev, q, kv, page, max_pages, softmax_scale, ws),
            _ => decode_typed::<bf16>(dev, q, kv, page, max_pages, softmax_scale, ws),
        }
    }

    /// What the last step skipped on the device ([`DecodeWorkspace::invalid`]; synchronises the
    /// stream): invalid page indices and malformed schedule entries. Zero for valid input.
    pub fn invalid(&self) -> Result<usize> {
        self.ws.as_ref().map_or(Ok(0), |(s, ws)| ws.invalid(s))
    }
}

/// Checks an MLA decode's tensors (dtypes, layouts, shapes; not their device) and returns the
/// decode's shape, the page size and the block table's width. Pure: [`MlaDecoder::decode`] calls it
/// before anything touches the GPU.
pub fn validate_mla_decode(q: &Tensor, kv: &PagedCache) -> Result<(DecodeShape, usize, usize)> {
    check_meta("q", q, &[DType::BF16, DType::F16])?;
    check_meta("cache", kv.cache, &[q.dtype()])?;
    check_meta("block_table", kv.block_table, &[DType::I32])?;
    check_meta("lens", kv.lens, &[DType::I32])?;
    let [batch, s_q, h_q, dk] = dims("q", q, "[batch, s_q, h_q, 576]")?;
    if dk != HEAD_DIM_K {
        return Err(Error::Shape { arg: "q", expected: format!("[batch, s_q, h_q, {HEAD_DIM_K}]"), got: format!("shape {:?}", q.dims()) });
    }
    let [_, page, ck] = dims("cache", kv.cache, "[num_pages, page, 576]")?;
    if ck != HEAD_DIM_K {
        return Err(Error::Shape {
            arg: "cache",
            expected: format!("[num_pages, page, {HEAD_DIM_K}]"),
            got: format!("shape {:?}", kv.cache.dims()),
        });
    }
    let [bt_batch, max_pages] = dims("block_table", kv.block_table, "[batch, max_pages] i32")?;
    if bt_batch != batch {
        return Err(Error::Shape {
            arg: "block_table",
            expected: format!("[{batch}, max_pages] (the batch of `q`)"),
            got: format!("shape {:?}", kv.block_table.dims()),
        });
    }
    expect_dims("lens", kv.lens, &[batch], "i32, one length per request")?;
    let shape = DecodeShape { batch, s_q, h_q };
    shape.validate()?;
    Ok((shape, page, max_pages))
}

fn decode_typed<T: mla::MlaElement + CudaDType + ValidAsZeroBits>(
    dev: &CudaDevice,
    q: &Tensor,
    kv: &PagedCache,
    page: usize,
    max_pages: usize,
    softmax_scale: f32,
    ws: &mut DecodeWorkspace,
) -> Result<(Tensor, Tensor)> {
    let DecodeShape { batch, s_q, h_q } = ws.shape();
    let stream = dev.cuda_stream();
    let rows = batch * s_q * h_q;
    let mut out = alloc::<T>(&stream, rows * HEAD_DIM_V)?;
    let mut lse = alloc::<f32>(&stream, rows)?;
    {
        let held = [Held::new("q", q), Held::new("cache", kv.cache), Held::new("block_table", kv.block_table), Held::new("lens", kv.lens)];
        let qv = held[0].view::<T>()?;
        let paged = PagedKv {
            cache: held[1].view::<T>()?,
            page,
            block_table: held[2].view::<i32>()?,
            max_pages,
            lens: held[3].view::<i32>()?,
            lens_host: kv.lens_host,
        };
        mla::decode(&stream, &qv, &paged, &mut out.slice_mut(..rows * HEAD_DIM_V), &mut lse.slice_mut(..rows), softmax_scale, ws)?;
    }
    Ok((wrap(dev, out, (batch, s_q, h_q, HEAD_DIM_V)), wrap(dev, lse, (batch, s_q, h_q))))
}

// ---- expert parallelism ----------------------------------------------------------------------

/// An expert-parallel group of `shape.ranks` virtual ranks on `device` ([`Group::new_virtual`]),
/// on the device's stream: what [`dispatch`] and [`combine`] expect.
pub fn new_virtual_group(device: &Device, shape: GroupShape) -> Result<Group> {
    let Device::Cuda(dev) = device else {
        return Err(Error::InvalidArgument { arg: "device", reason: format!("expected a CUDA device, got {:?}", device.location()) });
    };
    Group::new_virtual(&dev.cuda_stream(), shape)
}

/// One rank's tokens: bf16 `[tokens, hidden]`, or FP8 as [`quantize_per_token_group`] returns it
/// (the group's [`Payload`] decides which).
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    /// bf16 `[tokens, hidden]`.
    Bf16(&'a Tensor),
    /// E4M3 `[tokens, hidden]` and f32 scales `[hidden / 128, round_up(tokens, 4)]`.
    Fp8(&'a Fp8Tensor),
}

/// One rank's input to [`dispatch`]: its tokens and the router's i32 `topk_idx` and f32
/// `topk_weights`, both `[tokens, k]` (`topk_idx` -1: no expert).
#[derive(Clone, Copy, Debug)]
pub struct RankInput<'a> {
    /// The rank's tokens.
    pub x: Tokens<'a>,
    /// i32 `[tokens, k]`: each token's experts (global indices; -1 = no expert).
    pub topk_idx: &'a Tensor,
    /// f32 `[tokens, k]`: the router weight of each slot.
    pub topk_weights: &'a Tensor,
}

/// Received rows: bf16 `[rows, hidden]`, or FP8 with scales `[hidden / 128, rows]`.
#[derive(Clone, Debug)]
pub enum Rows {
    /// bf16 `[rows, hidden]`.
    Bf16(Tensor),
    /// E4M3 `[rows, hidden]` and f32 scales `[hidden / 128, rows]`.
    Fp8(Fp8Tensor),
}

/// One rank's result of [`dispatch`], in the contiguous grouped GEMM's layout
/// ([`gemm_fp8_contiguous`]); see [`crate::ep::Dispatched`].
pub struct Dispatched {
    /// The received rows, grouped by local expert, each expert's segment padded to the group's
    /// `m_align` rows.
    pub x: Rows,
    /// i32 `[rows]`: local expert of each row, -1 on padding.
    pub m_indices: Tensor,
    /// f32 `[rows]`: the router weight of each row, 0 on padding.
    pub weights: Tensor,
    /// Valid rows per local expert.
    pub counts: Vec<usize>,
    /// Rows of the layout: Σ round_up(count, m_align).
    pub rows: usize,
    /// What [`combine`] needs to send each row back.
    pub handle: Handle,
}

/// The CUDA device of a group's tensor `t`, which must be the device the group was built on.
fn group_device<'t>(group: &Group, arg: &'static str, t: &'t Tensor) -> Result<&'t CudaDevice> {
    let dev = cuda_device(arg, t, None)?;
    if dev.cuda_stream().cu_stream() != group.stream().cu_stream() {
        return Err(Error::InvalidArgument {
            arg,
            reason: "is on a device whose stream is not the group's (build the group with `deepkern::candle::new_virtual_group`)".into(),
        });
    }
    Ok(dev)
}

/// A rank's token tensors, each with its argument name, and its `tokens` and `k`.
type RankTensors<'a> = (Vec<(&'static str, &'a Tensor)>, usize, usize);

/// One rank's token tensors (named) and its `tokens` and `k`, checked against the group's shape.
fn rank_tensors<'a>(shape: &GroupShape, input: &RankInput<'a>) -> Result<RankTensors<'a>> {
    let hidden = shape.hidden;
    check_meta("topk_idx", input.topk_idx, &[DType::I32])?;
    check_meta("topk_weights", input.topk_weights, &[DType::F32])?;
    let [tokens, k] = dims("topk_idx", input.topk_idx, "[tokens, k] i32")?;
    expect_dims("topk_weights", input.topk_weights, &[tokens, k], "f32, the shape of `topk_idx`")?;
    let x = match (input.x, shape.payload) {
        (Tokens::Bf16(x), Payload::Bf16) => {
            check_meta("x", x, &[DType::BF16])?;
            expect_dims("x", x, &[tokens, hidden], "bf16 [tokens, hidden]")?;
            vec![("x", x)]
        }
        (Tokens::Fp8(x), Payload::Fp8) => {
            check_fp8("x", "sf", x)?;
            expect_dims("x", &x.q, &[tokens, hidden], "e4m3 [tokens, hidden]")?;
            expect_dims("sf", &x.sf, &[hidden / GROUP, tma_aligned_rows(tokens)], "f32 1x128 scales, transposed")?;
            vec![("x", &x.q), ("sf", &x.sf)]
        }
        (_, payload) => {
            return Err(Error::InvalidArgument { arg: "x", reason: format!("does not match the group's payload ({payload:?})") });
        }
    };
    Ok((x, tokens, k))
}

/// Checks [`dispatch`]'s inputs against the group's shape (one per rank; dtypes, layouts, shapes,
/// tokens matching the payload; not their device). Pure: [`dispatch`] calls it before anything
/// touches the GPU.
pub fn validate_dispatch(shape: &GroupShape, inputs: &[RankInput]) -> Result<()> {
    if inputs.len() != shape.ranks {
        return Err(Error::InvalidArgument {
            arg: "inputs",
            reason: format!("expected one per rank ({}), got {}", shape.ranks, inputs.len()),
        });
    }
    inputs.iter().try_for_each(|i| rank_tensors(shape, i).map(drop))
}

/// Normal dispatch of every virtual rank ([`Group::dispatch`]): `inputs[r]` is rank `r`'s. The
/// tokens must match the group's payload (bf16 for [`Payload::Bf16`], FP8 for [`Payload::Fp8`]).
pub fn dispatch(group: &mut Group, inputs: &[RankInput]) -> Result<Vec<Dispatched>> {
    let shape = *group.shape();
    let hidden = shape.hidden;
    validate_dispatch(&shape, inputs)?;
    let per_rank = inputs.iter().map(|i| rank_tensors(&shape, i)).collect::<Result<Vec<_>>>()?;
    for ((x, _, _), input) in per_rank.iter().zip(inputs) {
        for &(arg, t) in x.iter().chain([("topk_idx", input.topk_idx), ("topk_weights", input.topk_weights)].iter()) {
            group_device(group, arg, t)?;
        }
    }
    let dev = group_device(group, "x", per_rank[0].0[0].1)?.clone();
    let received = {
        let held: Vec<(Vec<Held>, Held, Held)> = per_rank
            .iter()
            .zip(inputs)
            .map(|((x, _, _), i)| {
                (
                    x.iter().map(|&(arg, t)| Held::new(arg, t)).collect(),
                    Held::new("topk_idx", i.topk_idx),
                    Held::new("topk_weights", i.topk_weights),
                )
            })
            .collect();
        let rank_inputs = held
            .iter()
            .zip(&per_rank)
            .map(|((x, idx, w), &(_, tokens, k))| {
                let x = match x.as_slice() {
                    [q, sf] => ep::Tokens::Fp8 { q: q.view()?, sf: sf.view()? },
                    [x] => ep::Tokens::Bf16(x.view()?),
                    _ => unreachable!("one or two token tensors per rank"),
                };
                Ok(ep::RankInput { x, topk_idx: idx.view()?, topk_weights: w.view()?, tokens, k })
            })
            .collect::<Result<Vec<_>>>()?;
        group.dispatch(&rank_inputs)?
    };
    Ok(received
        .into_iter()
        .map(|d| {
            let rows = d.rows;
            let x = match d.x {
                ep::Rows::Bf16(x) => Rows::Bf16(wrap(&dev, x, (rows, hidden))),
                ep::Rows::Fp8 { q, sf } => {
                    Rows::Fp8(Fp8Tensor { q: wrap(&dev, q, (rows, hidden)), sf: wrap(&dev, sf, (hidden / GROUP, rows)) })
                }
            };
            Dispatched {
                x,
                m_indices: wrap(&dev, d.m_indices, rows),
                weights: wrap(&dev, d.weights, rows),
                counts: d.counts,
                rows,
                handle: d.handle,
            }
        })
        .collect())
}

/// Checks [`combine`]'s expert outputs: one per rank, `ys[r]` bf16 `[rows[r], hidden]` (the rows
/// of rank `r`'s handle). Pure, like [`validate_dispatch`].
pub fn validate_combine(shape: &GroupShape, ys: &[Tensor], rows: &[usize]) -> Result<()> {
    if ys.len() != shape.ranks || rows.len() != shape.ranks {
        return Err(Error::InvalidArgument {
            arg: "ys",
            reason: format!("expected one tensor and one handle per rank ({}), got {} and {}", shape.ranks, ys.len(), rows.len()),
        });
    }
    for (y, &r) in ys.iter().zip(rows) {
        check_meta("ys", y, &[DType::BF16])?;
        expect_dims("ys", y, &[r, shape.hidden], "bf16 [rows, hidden], the rows of its handle")?;
    }
    Ok(())
}

/// Combine of every virtual rank ([`Group::combine`], or [`Group::combine_unweighted`] when
/// `weighted` is false): `ys[r]` bf16 `[rows, hidden]` are rank `r`'s expert outputs for the rows
/// of `handles[r]` (from the same [`dispatch`]). Returns each rank's bf16 `[tokens, hidden]`.
pub fn combine(group: &mut Group, ys: &[Tensor], handles: &[&Handle], weighted: bool) -> Result<Vec<Tensor>> {
    let hidden = group.shape().hidden;
    let rows: Vec<usize> = handles.iter().map(|h| h.rows()).collect();
    validate_combine(group.shape(), ys, &rows)?;
    let Some(first) = ys.first() else {
        return Err(Error::InvalidArgument { arg: "ys", reason: "expected one tensor per rank, got none".into() });
    };
    let dev = group_device(group, "ys", first)?.clone();
    for y in ys {
        group_device(group, "ys", y)?;
    }
    let outs = {
        let held: Vec<Held> = ys.iter().map(|y| Held::new("ys", y)).collect();
        let views = held.iter().map(Held::view::<bf16>).collect::<Result<Vec<_>>>()?;
        if weighted { group.combine(&views, handles)? } else { group.combine_unweighted(&views, handles)? }
    };
    Ok(outs
        .into_iter()
        .map(|out| {
            // The output holds tokens · hidden elements (at least one).
            let tokens = out.len().checked_div(hidden).unwrap_or(0);
            wrap(&dev, out, (tokens, hidden))
        })
        .collect())
}
