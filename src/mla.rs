//! MLA decode attention on the GPU: [`decode`] runs a whole decode step over a paged latent cache
//! (schedule on the device, split-KV decode kernel, combine), checked against
//! [`crate::reference::mla`]. Its pieces are public too: the split-KV schedule written on the
//! device (the same plan as [`crate::plan::mla::schedule`], bit for bit) and the combine, which
//! merges the partial results of a request's chunks by their log-sum-exp, as
//! [`crate::reference::mla::merge`] does.

use std::sync::Arc;

use cudarc::driver::sys::{CUtensorMapDataType, CUtensorMapSwizzle};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::ffi;
use crate::gemm::tensor_map_2d;
use crate::launch::{Launch, check_aligned, ffi_call, int_arg};
use crate::plan::mla::{BLOCK_M, num_parts};

/// Value width of MLA outputs.
pub const HEAD_DIM_V: usize = ffi::DK_MLA_HEAD_DIM_V as usize;

/// A 16-bit element type of the MLA kernels (queries, cache and outputs): [`bf16`] or [`f16`](struct@f16).
///
/// Sealed: the kernels are compiled for these two types only, so no other type can implement it.
pub trait MlaElement: sealed::Sealed + cudarc::driver::DeviceRepr {}
impl MlaElement for bf16 {}
impl MlaElement for f16 {}

/// The private supertrait that seals [`MlaElement`] and carries what the launchers need to know of
/// an element type (types of the private C bindings, which users cannot name).
mod sealed {
    use super::*;

    pub trait Sealed {
        const DTYPE: ffi::dk_dtype;
        const TMA_DTYPE: CUtensorMapDataType;
    }
    impl Sealed for bf16 {
        const DTYPE: ffi::dk_dtype = ffi::dk_dtype::DK_DTYPE_BF16;
        const TMA_DTYPE: CUtensorMapDataType = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    }
    impl Sealed for f16 {
        const DTYPE: ffi::dk_dtype = ffi::dk_dtype::DK_DTYPE_F16;
        const TMA_DTYPE: CUtensorMapDataType = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    }
}

/// The seal, checked where users stand (doctests compile against the public API only):
///
/// ```compile_fail
/// // The element's C type is no longer reachable through the public trait.
/// let _ = <deepkern::bf16 as deepkern::mla::MlaElement>::DTYPE;
/// ```
///
/// ```compile_fail
/// // No type outside the crate can implement it, even one cudarc can copy.
/// #[derive(Clone, Copy)]
/// struct Mine(u16);
/// unsafe impl deepkern::cudarc::driver::DeviceRepr for Mine {}
/// impl deepkern::mla::MlaElement for Mine {}
/// ```
///
/// ```
/// fn element<T: deepkern::mla::MlaElement>() {}
/// element::<deepkern::bf16>();
/// element::<half::f16>();
/// ```
#[cfg(doctest)]
pub struct MlaElementIsSealed;

/// The split kernel's partial results, on the device.
pub struct Partials<'a> {
    /// `[num_chunks, rows, 512]` f32, each normalised within its chunk.
    pub o: CudaView<'a, f32>,
    /// `[num_chunks, rows]` f32, natural log (-inf for a chunk that saw no key).
    pub lse: CudaView<'a, f32>,
    /// `[batch + 1]` cumulative chunk counts (the schedule's `splits`).
    pub splits: CudaView<'a, i32>,
}

/// Where the combine writes.
pub struct CombineOut<'a, T> {
    /// `[batch, rows, 512]`.
    pub out: CudaViewMut<'a, T>,
    /// `[batch, rows]` f32, natural log.
    pub lse: CudaViewMut<'a, f32>,
    /// `[1]`: requests skipped because their chunk range in `splits` was malformed.
    pub num_invalid: CudaViewMut<'a, i32>,
}

/// Merges the partials of every request with two or more chunks into `out` (requests with a
/// single chunk are left alone: the decode kernel writes them directly). `rows = s_q · h_q`.
/// Lengths and alignment (16 bytes for the partials and the output) are checked here; the chunk
/// ranges live on the device and are checked there (a malformed one is skipped and counted).
pub fn combine<T: MlaElement>(stream: &CudaStream, partials: &Partials, out: &mut CombineOut<T>, batch: usize, rows: usize) -> Result<()> {
    let CombineOut { out, lse, num_invalid } = out;
    combine_into(stream, &partials.o, &partials.lse, &partials.splits, out, lse, num_invalid, batch, rows)
}

/// [`combine`] on any cudarc buffers: `o`, `lse_partial` and `splits` as in [`Partials`], `out`,
/// `lse` and `num_invalid` as in [`CombineOut`].
#[allow(clippy::too_many_arguments)]
fn combine_into<T: MlaElement>(
    stream: &CudaStream,
    o: &impl DevicePtr<f32>,
    lse_partial: &impl DevicePtr<f32>,
    splits: &impl DevicePtr<i32>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    num_invalid: &mut impl DevicePtrMut<i32>,
    batch: usize,
    rows: usize,
) -> Result<()> {
    if rows == 0 {
        return Err(Error::InvalidArgument { arg: "rows", reason: "must be at least 1 (s_q · h_q)".into() });
    }
    let per_chunk = rows * HEAD_DIM_V;
    if o.len() % per_chunk != 0 {
        return Err(Error::Shape {
            arg: "o_partial",
            expected: format!("[num_chunks, {rows}, {HEAD_DIM_V}]"),
            got: format!("{} elements", o.len()),
        });
    }
    if rows.div_ceil(COMBINE_ROWS) > MAX_GRID_Y {
        return Err(Error::InvalidArgument {
            arg: "rows",
            reason: format!("{rows} rows exceed the combine grid's {MAX_GRID_Y} blocks of {COMBINE_ROWS} rows"),
        });
    }
    let num_chunks = o.len() / per_chunk;
    let expect = |arg: &'static str, len: usize, want: usize, what: String| {
        if len == want {
            Ok(())
        } else {
            Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
        }
    };
    expect("lse_partial", lse_partial.len(), num_chunks * rows, format!("[{num_chunks}, {rows}]"))?;
    expect("splits", splits.len(), batch + 1, format!("[{batch} + 1]"))?;
    expect("out", out.len(), batch * per_chunk, format!("[{batch}, {rows}, {HEAD_DIM_V}]"))?;
    expect("lse", lse.len(), batch * rows, format!("[{batch}, {rows}]"))?;
    expect("num_invalid", num_invalid.len(), 1, "[1]".into())?;
    let (batch32, rows32, chunks32) =
        (int_arg::<i32>("batch", batch)?, int_arg::<i32>("rows", rows)?, int_arg::<i32>("o_partial", num_chunks)?);

    let mut launch = Launch::new("mla_combine", stream)?;
    let params = ffi::dk_mla_combine_params {
        o_partial: launch.input(o) as *const f32,
        lse_partial: launch.input(lse_partial) as *const f32,
        splits: launch.input(splits) as *const i32,
        out: launch.output(out) as *mut std::ffi::c_void,
        lse: launch.output(lse) as *mut f32,
        num_invalid: launch.output(num_invalid) as *mut i32,
        batch: batch32,
        rows: rows32,
        num_chunks: chunks32,
        dtype: T::DTYPE,
    };
    check_aligned("o_partial", params.o_partial as u64, 16)?;
    check_aligned("out", params.out as u64, 16)?;
    let s = launch.stream();
    // SAFETY: all pointers come from live cudarc views of the lengths checked above, whose guards
    // `launch` holds until `finish`; chunk indices read on the device are bounded by num_chunks.
    let status = ffi_call!(unsafe dk_mla_combine(&params, s));
    launch.finish(status)
}

/// `i32`s per part in a device schedule.
pub const PART_WORDS: usize = ffi::DK_MLA_PART_WORDS as usize;

/// A split-KV schedule in device memory, in [`crate::plan::mla::Schedule::encode`]'s format.
#[derive(Debug)]
pub struct DeviceSchedule {
    /// `[num_parts, PART_WORDS]`.
    pub parts: CudaSlice<i32>,
    /// `[batch + 1]` cumulative chunk counts.
    pub splits: CudaSlice<i32>,
    /// Requests the schedule covers.
    pub batch: usize,
    /// Parts (persistent CTAs of the decode kernel) it was allocated for.
    pub num_parts: usize,
}

impl DeviceSchedule {
    /// Allocates a schedule for `batch` requests over `num_parts` CTAs.
    pub fn new(stream: &Arc<CudaStream>, batch: usize, num_parts: usize) -> Result<Self> {
        if num_parts == 0 {
            return Err(Error::InvalidArgument { arg: "num_parts", reason: "must be at least 1".into() });
        }
        Ok(Self { parts: stream.alloc_zeros(num_parts * PART_WORDS)?, splits: stream.alloc_zeros(batch + 1)?, batch, num_parts })
    }

    /// Copies the schedule back (synchronising `stream`): the encoded parts and the splits.
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<(Vec<i32>, Vec<u32>)> {
        let splits = stream.clone_dtoh(&self.splits)?.into_iter().map(|s| u32::try_from(s).unwrap_or(u32::MAX)).collect();
        Ok((stream.clone_dtoh(&self.parts)?, splits))
    }
}

/// Plans a decode step on the device from the sequence lengths in device memory (`[batch]`;
/// negative lengths count as 0), so the whole step can be captured in a CUDA graph.
pub fn plan_on_device(stream: &CudaStream, lens: &impl DevicePtr<i32>, out: &mut DeviceSchedule) -> Result<()> {
    if lens.len() != out.batch {
        return Err(Error::Shape {
            arg: "lens",
            expected: format!("{} elements (batch)", out.batch),
            got: format!("{} elements", lens.len()),
        });
    }
    let (batch, num_parts) = (int_arg::<i32>("batch", out.batch)?, int_arg::<i32>("num_parts", out.num_parts)?);
    let mut launch = Launch::new("mla_schedule", stream)?;
    let params = ffi::dk_mla_schedule_params {
        lens: launch.input(lens) as *const i32,
        parts: launch.output(&mut out.parts) as *mut i32,
        splits: launch.output(&mut out.splits) as *mut i32,
        batch,
        num_parts,
    };
    let s = launch.stream();
    // SAFETY: buffers sized by `DeviceSchedule::new` for this batch and part count, `lens` checked
    // above; `launch` holds the guards until `finish`.
    let status = ffi_call!(unsafe dk_mla_schedule(&params, s));
    launch.finish(status)
}

/// Key width of the latent cache: 512 latent + 64 RoPE columns.
pub const HEAD_DIM_K: usize = 576;
/// Page sizes (keys per page) the decode kernel accepts.
pub const PAGE_SIZES: [usize; 4] = [16, 32, 64, 128];

/// Problem size of a decode step: `batch` requests of `s_q` query tokens of `h_q` heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Requests in the step.
    pub batch: usize,
    /// Query tokens per request (1 for plain decode; more for speculative tokens, causal among
    /// themselves).
    pub s_q: usize,
    /// Query heads per token.
    pub h_q: usize,
}

impl DecodeShape {
    /// Query rows per request: `s_q · h_q` (heads fastest).
    pub fn rows(&self) -> usize {
        self.s_q * self.h_q
    }

    /// Checks the shape against what the kernels can launch: `s_q` and `h_q` at least 1, and the
    /// rows per request within the grids' second dimension (at most 65535 blocks: of
    /// 64 rows in the decode kernel, of 8 rows in the combine, so
    /// `s_q · h_q <= 65535 · 8`). [`DecodeWorkspace::new`] calls it.
    pub fn validate(&self) -> Result<()> {
        if self.s_q == 0 || self.h_q == 0 {
            return Err(Error::InvalidArgument { arg: "shape", reason: format!("{self:?}: s_q and h_q must be at least 1") });
        }
        let max_rows = MAX_GRID_Y * BLOCK_M.min(COMBINE_ROWS);
        match self.s_q.checked_mul(self.h_q) {
            Some(rows) if rows <= max_rows => Ok(()),
            _ => Err(Error::InvalidArgument {
                arg: "shape",
                reason: format!(
                    "{self:?}: s_q · h_q exceeds {max_rows} rows, the launch grids' limit (65535 blocks of {COMBINE_ROWS} rows)"
                ),
            }),
        }
    }
}

/// The largest second grid dimension of a launch.
const MAX_GRID_Y: usize = 65535;
/// Query rows per block of the combine (`csrc/mla/combine.cu`: one warp per row, eight warps).
const COMBINE_ROWS: usize = 8;

/// A paged latent KV cache and the requests' addressing into it.
pub struct PagedKv<'a, T> {
    /// `[num_pages, page, 576]`.
    pub cache: CudaView<'a, T>,
    /// Keys per page: 16, 32, 64 or 128.
    pub page: usize,
    /// `[batch, max_pages]` page indices.
    pub block_table: CudaView<'a, i32>,
    /// Columns of `block_table`: the most pages any request may address.
    pub max_pages: usize,
    /// `[batch]` sequence lengths, on the device (what the kernels read).
    pub lens: CudaView<'a, i32>,
    /// The same lengths on the host, when the caller has them: then a negative length or a block
    /// table too short for a length is an error before any launch. Without them (a CUDA-graph
    /// step), keys whose page slot is past `max_pages` or whose page index is out of range are
    /// treated as masked and counted ([`DecodeWorkspace::invalid`]).
    pub lens_host: Option<&'a [i32]>,
}

impl<'a, T> PagedKv<'a, T> {
    /// A cache of pages of `page` keys, the block table `[batch, max_pages]` and the lengths
    /// `[batch]`, given once, on the device: `max_pages` is derived (`block_table.len() /
    /// lens.len()`; a table whose length is not a multiple of the batch is refused by the decode,
    /// naming `block_table`). No host copy of the lengths: add one with
    /// [`PagedKv::with_lens_host`] to have them checked against the table before launch.
    pub fn new(cache: &'a CudaSlice<T>, page: usize, block_table: &'a CudaSlice<i32>, lens: &'a CudaSlice<i32>) -> Self {
        let max_pages = block_table.len().checked_div(lens.len()).unwrap_or(0);
        Self { cache: cache.as_view(), page, block_table: block_table.as_view(), max_pages, lens: lens.as_view(), lens_host: None }
    }

    /// The same lengths on the host (they must equal `lens`): a negative length or one past its
    /// block table is then an error before any launch (see [`PagedKv::lens_host`]).
    pub fn with_lens_host(self, lens_host: &'a [i32]) -> Self {
        Self { lens_host: Some(lens_host), ..self }
    }
}

/// Device buffers of a decode step that outlive one call: the schedule, the split-KV partials and
/// the error counters. Sized for one [`DecodeShape`].
pub struct DecodeWorkspace {
    shape: DecodeShape,
    schedule: DeviceSchedule,
    num_chunks: usize,
    o_partial: CudaSlice<f32>,
    lse_partial: CudaSlice<f32>,
    invalid: CudaSlice<i32>,
    combine_invalid: CudaSlice<i32>,
}

impl DecodeWorkspace {
    /// A workspace for `shape` on `stream`'s device: one part per SM and M tile
    /// ([`crate::plan::mla::num_parts`]).
    pub fn new(stream: &Arc<CudaStream>, shape: DecodeShape) -> Result<Self> {
        shape.validate()?;
        let sms = crate::launch::device_facts(stream)?.sm_count;
        let parts = num_parts(sms.max(1), shape.s_q, shape.h_q);
        // Each part boundary splits at most one request: at most batch + parts - 1 chunks.
        let num_chunks = shape.batch + parts;
        let rows = shape.rows();
        Ok(Self {
            shape,
            schedule: DeviceSchedule::new(stream, shape.batch, parts)?,
            num_chunks,
            o_partial: stream.alloc_zeros(num_chunks * rows * HEAD_DIM_V)?,
            lse_partial: stream.alloc_zeros(num_chunks * rows)?,
            invalid: stream.alloc_zeros(1)?,
            combine_invalid: stream.alloc_zeros(1)?,
        })
    }

    /// The shape this workspace was sized for.
    pub fn shape(&self) -> DecodeShape {
        self.shape
    }

    /// The schedule of the last step (on the device).
    pub fn schedule(&self) -> &DeviceSchedule {
        &self.schedule
    }

    /// What the last step skipped on the device (synchronises `stream`): invalid page indices
    /// and malformed schedule entries. Zero for every valid input.
    pub fn invalid(&self, stream: &Arc<CudaStream>) -> Result<usize> {
        let a = stream.clone_dtoh(&self.invalid)?[0];
        let b = stream.clone_dtoh(&self.combine_invalid)?[0];
        Ok(usize::try_from(a).unwrap_or(0) + usize::try_from(b).unwrap_or(0))
    }
}

/// The checks of a decode step that need no device: the buffer lengths against `shape`, the page
/// size, and (with `kv.lens_host`) every length against the block table.
fn validate_decode<T>(q_len: usize, kv: &PagedKv<T>, out_len: usize, lse_len: usize, shape: DecodeShape) -> Result<()> {
    let DecodeShape { batch, s_q, h_q } = shape;
    let rows = shape.rows();
    let shape_err = |arg: &'static str, expected: String, got: usize| Err(Error::Shape { arg, expected, got: format!("{got} elements") });
    if q_len != batch * rows * HEAD_DIM_K {
        return shape_err("q", format!("[{batch}, {s_q}, {h_q}, {HEAD_DIM_K}]"), q_len);
    }
    if !PAGE_SIZES.contains(&kv.page) {
        return Err(Error::InvalidArgument { arg: "page", reason: format!("{} is not one of {PAGE_SIZES:?}", kv.page) });
    }
    let page_elems = kv.page * HEAD_DIM_K;
    if kv.cache.is_empty() || !kv.cache.len().is_multiple_of(page_elems) {
        return shape_err("cache", format!("[num_pages, {}, {HEAD_DIM_K}] with num_pages >= 1", kv.page), kv.cache.len());
    }
    if kv.lens.len() != batch {
        return shape_err("lens", format!("[{batch}] (the batch)"), kv.lens.len());
    }
    if kv.block_table.len() != batch * kv.max_pages {
        return shape_err("block_table", format!("[{batch}, {}]", kv.max_pages), kv.block_table.len());
    }
    if let Some(lens) = kv.lens_host {
        if lens.len() != batch {
            return shape_err("lens_host", format!("[{batch}] (the batch)"), lens.len());
        }
        if let Some((b, &len)) = lens.iter().enumerate().find(|&(_, &len)| len < 0 || len as usize > kv.max_pages * kv.page) {
            return Err(Error::InvalidArgument {
                arg: "block_table",
                reason: format!(
                    "request {b} has length {len}: its block table of {} pages of {} covers 0..={}",
                    kv.max_pages,
                    kv.page,
                    kv.max_pages * kv.page
                ),
            });
        }
    }
    if out_len != batch * rows * HEAD_DIM_V {
        return shape_err("out", format!("[{batch}, {s_q}, {h_q}, {HEAD_DIM_V}]"), out_len);
    }
    if lse_len != batch * rows {
        return shape_err("lse", format!("[{batch}, {s_q}, {h_q}]"), lse_len);
    }
    Ok(())
}

/// One MLA decode step: `q` (`[batch, s_q, h_q, 576]`) attends to the paged cache with causal
/// multi-token masking (query token `s` sees keys `0 ..= len - s_q + s`) and `softmax_scale`;
/// writes `out` (`[batch, s_q, h_q, 512]`) and `lse` (`[batch, s_q, h_q]`, natural log; -inf and
/// zeros for a row that sees no key). Three launches on `stream`: the schedule (from the lengths on
/// the device), the split-KV decode kernel, the combine. Asynchronous; capturable in a CUDA graph
/// when `kv.lens_host` is `None`.
pub fn decode<T: MlaElement>(
    stream: &CudaStream,
    q: &impl DevicePtr<T>,
    kv: &PagedKv<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    softmax_scale: f32,
    ws: &mut DecodeWorkspace,
) -> Result<()> {
    validate_decode(q.len(), kv, out.len(), lse.len(), ws.shape)?;
    let DecodeShape { batch, s_q, h_q } = ws.shape;
    let rows = ws.shape.rows();
    let num_pages = kv.cache.len() / (kv.page * HEAD_DIM_K);
    if batch == 0 {
        return Ok(());
    }
    let (batch32, s_q32, h_q32) = (int_arg::<i32>("batch", batch)?, int_arg::<i32>("s_q", s_q)?, int_arg::<i32>("h_q", h_q)?);
    let (max_pages32, num_pages32) = (int_arg::<i32>("max_pages", kv.max_pages)?, int_arg::<i32>("cache", num_pages)?);
    int_arg::<i32>("cache", num_pages * kv.page)?;
    int_arg::<i32>("q", batch * rows)?;
    // TMA reads q and the cache in 16-byte units; the kernel stores out in 4-byte pairs and the
    // combine in 16-byte vectors: all checked before the first launch (the schedule's).
    check_aligned("q", q.device_ptr(stream).0, 16)?;
    check_aligned("cache", kv.cache.device_ptr(stream).0, 16)?;
    check_aligned("out", out.device_ptr_mut(stream).0, 16)?;

    plan_on_device(stream, &kv.lens, &mut ws.schedule)?;
    {
        let mut launch = Launch::new("mla_decode", stream)?;
        let q_ptr = launch.input(q);
        let kv_ptr = launch.input(&kv.cache);
        let sw128 = CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B;
        let box_rows = kv.page.min(64) as u32;
        let params = ffi::dk_mla_decode_params {
            tma_q: tensor_map_2d(q_ptr, T::TMA_DTYPE, 2, batch * rows, HEAD_DIM_K, 64, 64, sw128)?,
            tma_kv: tensor_map_2d(kv_ptr, T::TMA_DTYPE, 2, num_pages * kv.page, HEAD_DIM_K, box_rows, 64, sw128)?,
            block_table: launch.input(&kv.block_table) as *const i32,
            lens: launch.input(&kv.lens) as *const i32,
            parts: launch.input(&ws.schedule.parts) as *const i32,
            splits: launch.input(&ws.schedule.splits) as *const i32,
            out: launch.output(out) as *mut std::ffi::c_void,
            lse: launch.output(lse) as *mut f32,
            o_partial: launch.output(&mut ws.o_partial) as *mut f32,
            lse_partial: launch.output(&mut ws.lse_partial) as *mut f32,
            num_invalid: launch.output(&mut ws.invalid) as *mut i32,
            batch: batch32,
            s_q: s_q32,
            h_q: h_q32,
            page: kv.page as i32,
            max_pages: max_pages32,
            num_pages: num_pages32,
            num_parts: int_arg("num_parts", ws.schedule.num_parts)?,
            num_chunks: int_arg("num_chunks", ws.num_chunks)?,
            softmax_scale,
            dtype: T::DTYPE,
        };
        let s = launch.stream();
        // SAFETY: the tensor maps cover exactly q and the cache (lengths checked above); the other
        // pointers are live cudarc buffers of the documented shapes (the workspace was sized for
        // this shape); every index the kernel reads from device memory is range-checked there.
        let status = ffi_call!(unsafe dk_mla_decode(&params, s));
        launch.finish(status)?;
    }
    let o = ws.o_partial.slice(..ws.num_chunks * rows * HEAD_DIM_V);
    let lse_partial = ws.lse_partial.slice(..ws.num_chunks * rows);
    combine_into(stream, &o, &lse_partial, &ws.schedule.splits, out, lse, &mut ws.combine_invalid, batch, rows)
}

/// FlashMLA's default softmax scale for DeepSeek's MLA: `1 / sqrt(576)`, over the key width
/// [`HEAD_DIM_K`] (exactly 1/24).
pub const DEFAULT_SOFTMAX_SCALE: f32 = 1.0 / 24.0;

/// [`decode`] into new buffers: returns `(out, lse)`, `[batch, s_q, h_q, 512]` and
/// `[batch, s_q, h_q]` (with `batch = 0`, one element each: CUDA allocates no empty buffer).
/// `softmax_scale`: `None` for [`DEFAULT_SOFTMAX_SCALE`] (FlashMLA's `1 / sqrt(576)`), or the
/// scale to use. Everything is checked before anything is allocated.
pub fn decode_alloc<T: MlaElement + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    q: &impl DevicePtr<T>,
    kv: &PagedKv<T>,
    softmax_scale: Option<f32>,
    ws: &mut DecodeWorkspace,
) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
    let rows = ws.shape.batch * ws.shape.rows();
    validate_decode(q.len(), kv, rows * HEAD_DIM_V, rows, ws.shape)?;
    let mut out = stream.alloc_zeros::<T>((rows * HEAD_DIM_V).max(1))?;
    let mut lse = stream.alloc_zeros::<f32>(rows.max(1))?;
    decode(
        stream,
        q,
        kv,
        &mut out.slice_mut(..rows * HEAD_DIM_V),
        &mut lse.slice_mut(..rows),
        softmax_scale.unwrap_or(DEFAULT_SOFTMAX_SCALE),
        ws,
    )?;
    Ok((out, lse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_beyond_the_launch_grids_are_refused() {
        let shape = |s_q, h_q| DecodeShape { batch: 1, s_q, h_q };
        let arg = |r: Result<()>| match r {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected an argument error, got {other:?}"),
        };
        shape(1, 128).validate().unwrap();
        // The largest: 65535 combine blocks of 8 rows (the decode grid's 64-row blocks allow more).
        shape(4, 65535 * 2).validate().unwrap();
        assert_eq!(arg(shape(1, 65535 * 8 + 1).validate()), "shape");
        assert_eq!(arg(shape(2, 65535 * 32).validate()), "shape");
        // Past the decode grid's 65535 blocks of 64 rows as well.
        assert_eq!(arg(shape(1, 65536 * 64).validate()), "shape");
        assert_eq!(arg(shape(usize::MAX, 2).validate()), "shape");
        assert_eq!(arg(shape(0, 4).validate()), "shape");
        assert_eq!(arg(shape(1, 0).validate()), "shape");
    }
}
