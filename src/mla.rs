//! MLA decode attention on the GPU. So far: the split-KV schedule written on the device (the same
//! plan as [`crate::plan::mla::schedule`], bit for bit) and the combine, which merges the partial
//! results of a request's chunks by their log-sum-exp, as [`crate::reference::mla::merge`] does.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, check_aligned, ffi_call, int_arg};

/// Value width of MLA outputs.
pub const HEAD_DIM_V: usize = ffi::DK_MLA_HEAD_DIM_V as usize;

/// A 16-bit output element type of the MLA kernels.
pub trait MlaElement: cudarc::driver::DeviceRepr {
    const DTYPE: ffi::dk_dtype;
}
impl MlaElement for bf16 {
    const DTYPE: ffi::dk_dtype = ffi::dk_dtype::DK_DTYPE_BF16;
}
impl MlaElement for f16 {
    const DTYPE: ffi::dk_dtype = ffi::dk_dtype::DK_DTYPE_F16;
}

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
    if rows == 0 {
        return Err(Error::InvalidArgument { arg: "rows", reason: "must be at least 1 (s_q · h_q)".into() });
    }
    let per_chunk = rows * HEAD_DIM_V;
    if partials.o.len() % per_chunk != 0 {
        return Err(Error::Shape {
            arg: "o_partial",
            expected: format!("[num_chunks, {rows}, {HEAD_DIM_V}]"),
            got: format!("{} elements", partials.o.len()),
        });
    }
    let num_chunks = partials.o.len() / per_chunk;
    let expect = |arg: &'static str, len: usize, want: usize, what: String| {
        if len == want {
            Ok(())
        } else {
            Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
        }
    };
    expect("lse_partial", partials.lse.len(), num_chunks * rows, format!("[{num_chunks}, {rows}]"))?;
    expect("splits", partials.splits.len(), batch + 1, format!("[{batch} + 1]"))?;
    expect("out", out.out.len(), batch * per_chunk, format!("[{batch}, {rows}, {HEAD_DIM_V}]"))?;
    expect("lse", out.lse.len(), batch * rows, format!("[{batch}, {rows}]"))?;
    expect("num_invalid", out.num_invalid.len(), 1, "[1]".into())?;
    let (batch32, rows32, chunks32) =
        (int_arg::<i32>("batch", batch)?, int_arg::<i32>("rows", rows)?, int_arg::<i32>("o_partial", num_chunks)?);

    let mut launch = Launch::new("mla_combine", stream)?;
    let params = ffi::dk_mla_combine_params {
        o_partial: launch.input(&partials.o) as *const f32,
        lse_partial: launch.input(&partials.lse) as *const f32,
        splits: launch.input(&partials.splits) as *const i32,
        out: launch.output(&mut out.out) as *mut std::ffi::c_void,
        lse: launch.output(&mut out.lse) as *mut f32,
        num_invalid: launch.output(&mut out.num_invalid) as *mut i32,
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
    pub batch: usize,
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
pub fn plan_on_device(stream: &CudaStream, lens: &CudaView<i32>, out: &mut DeviceSchedule) -> Result<()> {
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
