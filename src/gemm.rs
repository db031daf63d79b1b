//! FP8 block-scaled GEMM on the GPU (DeepSeek-V3 recipe), checked against
//! [`crate::reference::gemm`].
//!
//! `D[m, n] (bf16) = Σ_kb (Σ_{j in kb} A[m, j] · B[n, j]) · sa[m, kb] · sb[n / 128, kb]`, with A's
//! 1x128 scales in the per-token quantiser's transposed layout and B's 128x128 scales row-major
//! (what [`crate::quantize_per_token_group`] and [`crate::quantize_per_block`] write).
//!
//! Layouts: dense ([`gemm_fp8`]) and the two M-grouped layouts of mixture-of-experts:
//! contiguous ([`gemm_fp8_contiguous`], prefill) and masked ([`gemm_fp8_masked`], decode).
//! Every launch runs the tile shape, pipeline depth and L2 rasterisation that
//! [`crate::plan::gemm::plan`] picks for the problem on this device and SM budget (or the one
//! [`GemmOptions::tile`] forces), from the compiled menu: `{64, 128} x` [`BLOCK_N_MENU`](plan::BLOCK_N_MENU) and
//! `256 x` [`BLOCK_N_MENU_256`](plan::BLOCK_N_MENU_256) (the 256-row tiles for the dense and masked layouts only).

use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};
use float8::F8E4M3;
use half::bf16;

use crate::device::DeviceInfo;
use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, check_aligned, ffi_call};
use crate::layout::{GROUP, ceil_div, tma_aligned_rows};
use crate::plan::gemm::{self as plan, GemmLayout, GemmProblem, MAX_STAGES, Multicast};

/// Activations: E4M3 `[m, k]` and their 1x128 scales `[k / 128, round_up(m, 4)]` (transposed).
pub struct Fp8Activations<'a> {
    /// E4M3 values, row-major `[m, k]` (masked layout: `[groups, max_m, k]`), 16-byte aligned.
    pub q: CudaView<'a, F8E4M3>,
    /// f32 scales, one per row per 128 columns, transposed: `[k / 128, round_up(m, 4)]` (masked
    /// layout: `[groups, k / 128, round_up(max_m, 4)]`), 16-byte aligned.
    pub sf: CudaView<'a, f32>,
}

/// Weights: E4M3 `[n, k]` ("NT": K-major) and their 128x128 scales `[ceil(n / 128), k / 128]`;
/// for the grouped GEMMs, `groups` experts back to back: `[groups, n, k]` and
/// `[groups, ceil(n / 128), k / 128]`.
pub struct Fp8Weights<'a> {
    /// E4M3 values, row-major `[n, k]` (grouped: `[groups, n, k]`), 16-byte aligned.
    pub q: CudaView<'a, F8E4M3>,
    /// f32 scales, one per 128x128 block, row-major `[ceil(n / 128), k / 128]` (grouped:
    /// `[groups, ceil(n / 128), k / 128]`).
    pub sf: CudaView<'a, f32>,
}

/// Rows per arrival counter of [`gemm_fp8_contiguous_arrived`] (and of the expert-parallel
/// receive that writes them): one 128-row block of the contiguous layout.
pub const ARRIVAL_ROWS: usize = ffi::DK_ARRIVAL_ROWS as usize;

/// Problem size of a dense GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of A and D (tokens); for the contiguous layout, all groups' padded rows together.
    pub m: usize,
    /// Rows of B, columns of D (output features).
    pub n: usize,
    /// The reduction dimension (input features); a positive multiple of 128.
    pub k: usize,
}

/// Problem size of a masked grouped GEMM: `groups` blocks of `max_m` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskedShape {
    /// Number of groups (experts).
    pub groups: usize,
    /// Rows allocated per group; group `g` computes its first `masked_m[g]` of them.
    pub max_m: usize,
    /// Rows of each group's B, columns of D.
    pub n: usize,
    /// The reduction dimension; a positive multiple of 128.
    pub k: usize,
}

/// Launch options shared by the GEMMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemmOptions {
    /// Most SMs the persistent grid may occupy (`None`: all of them). Leave room here for
    /// communication kernels running beside the GEMM (see [`crate::ep::Group::set_num_sms`]).
    pub max_sms: Option<usize>,
    /// Masked layout: the rows per group the planner should expect (`None`: `max_m`). A hint for
    /// the tile choice only; the valid rows are read on the device.
    pub expected_m: Option<usize>,
    /// A tile shape to run instead of the planner's choice (benchmarks, tests of every compiled
    /// shape). Must be in the compiled menu and fit the device's shared memory.
    pub tile: Option<TileConfig>,
    /// Dense bf16 GEMM only, with `n % 8 == 0` and D 16-byte aligned (an error otherwise):
    /// stage each output tile in shared memory and write it with one TMA store (the plan gives
    /// the staging tile's bytes up from the pipeline), instead of bounds-checked stores from
    /// registers. Off by default until measurements say where it pays (`benches/gemm.rs`,
    /// `gemm_fp8_dense_tma_store_vs_direct`).
    pub tma_store: bool,
    /// TMA multicast across clusters of two CTAs (dense and contiguous layouts): `None` takes the
    /// planner's choice (no multicast with a forced [`tile`](Self::tile)); `Some(m)` runs `m`
    /// with the planner's (or the forced) tile. Multicast needs at least two SMs and is refused
    /// for the masked layout, for contiguous tiles wider than 128 and for
    /// [`gemm_fp8_contiguous_arrived`].
    pub multicast: Option<Multicast>,
}

/// A tile shape of the compiled menu and a pipeline depth: `block_m` 64 or 128 with `block_n` from
/// [`BLOCK_N_MENU`](plan::BLOCK_N_MENU), or 256 with `block_n` from [`BLOCK_N_MENU_256`](plan::BLOCK_N_MENU_256) (contiguous: 128 only);
/// `1 ..= 16` stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    /// Rows of D per tile: 64, 128 or 256 (the contiguous layout needs 128).
    pub block_m: usize,
    /// Columns of D per tile, from [`BLOCK_N_MENU`](plan::BLOCK_N_MENU) ([`BLOCK_N_MENU_256`](plan::BLOCK_N_MENU_256) for 256 rows).
    pub block_n: usize,
    /// Depth of the shared-memory pipeline of A and B k-blocks, `1 ..= 16`.
    pub stages: usize,
}

/// What one launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LaunchShape {
    block_m: usize,
    block_n: usize,
    stages: usize,
    swizzle_group: usize,
    multicast: Multicast,
}

/// A GEMM to launch: the layout, sizes, and the expected length of every buffer.
struct Problem {
    layout: ffi::dk_gemm_layout,
    /// Rows of A and D as the tensor maps see them (`groups · max_m` for masked).
    m: usize,
    n: usize,
    k: usize,
    groups: usize,
    /// Rows of one group's scale block (masked: `max_m`; otherwise `m`).
    scale_rows: usize,
}

impl Problem {
    fn dense(shape: GemmShape) -> Self {
        Self { layout: ffi::dk_gemm_layout::DK_GEMM_DENSE, m: shape.m, n: shape.n, k: shape.k, groups: 1, scale_rows: shape.m }
    }

    /// The tile shape to launch on `sms` SMs with `smem_limit` bytes of opt-in shared memory:
    /// the planner's choice, or `options.tile` after checking it against the menu and the limit.
    /// `tma_store`: reserve the TMA-store epilogue's staging tile (the caller checked it applies).
    fn launch_shape(&self, sms: usize, smem_limit: usize, options: &GemmOptions, tma_store: bool) -> Result<LaunchShape> {
        let mut shape = self.tile_shape(sms, smem_limit, options, tma_store)?;
        if let Some(forced) = options.multicast {
            if forced != Multicast::None {
                let layout = self.plan_layout(options);
                let why = if !plan::multicast_compiled(&layout, shape.block_n) {
                    Some(match layout {
                        GemmLayout::GroupedMasked { .. } => "the masked layout runs without multicast".to_string(),
                        _ => format!("the contiguous layout runs multicast with block_n <= 128, not {}", shape.block_n),
                    })
                } else if sms < 2 {
                    Some(format!("clusters of two CTAs need at least two SMs; the budget is {sms}"))
                } else {
                    None
                };
                if let Some(reason) = why {
                    return Err(Error::InvalidArgument { arg: "multicast", reason });
                }
            }
            shape.multicast = forced;
        }
        Ok(shape)
    }

    /// The planner's view of this problem's layout (the masked one with its `expected_m` hint).
    fn plan_layout(&self, options: &GemmOptions) -> GemmLayout {
        match self.layout {
            ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS => GemmLayout::GroupedContiguous { groups: self.groups },
            ffi::dk_gemm_layout::DK_GEMM_MASKED => GemmLayout::GroupedMasked {
                groups: self.groups,
                max_m: self.scale_rows,
                expected_m: options.expected_m.unwrap_or(self.scale_rows),
            },
            _ => GemmLayout::Dense,
        }
    }

    fn tile_shape(&self, sms: usize, smem_limit: usize, options: &GemmOptions, tma_store: bool) -> Result<LaunchShape> {
        let layout = self.plan_layout(options);
        let masked_groups = if matches!(layout, GemmLayout::GroupedMasked { .. }) { self.groups } else { 0 };
        let Some(TileConfig { block_m, block_n, stages }) = options.tile else {
            // What the planner reads of a device.
            let device = DeviceInfo {
                ordinal: 0,
                name: String::new(),
                compute_capability: (9, 0),
                sm_count: u32::try_from(sms).unwrap_or(u32::MAX),
                l2_cache_bytes: 0,
                max_shared_memory_per_block_optin: smem_limit,
                total_memory_bytes: 0,
            };
            let problem = GemmProblem { m: self.m, n: self.n, k: self.k, layout };
            let chosen = plan::plan_epilogue(&problem, &device, plan::TileCost::HOPPER, tma_store)?;
            return Ok(LaunchShape {
                block_m: chosen.block_m,
                block_n: chosen.block_n,
                stages: chosen.stages,
                swizzle_group: chosen.swizzle_group,
                multicast: chosen.multicast,
            });
        };
        // A forced tile is checked here, not planned (the planner's minimum depth does not apply).
        if let GemmLayout::GroupedMasked { max_m, expected_m, .. } = layout
            && expected_m > max_m
        {
            return Err(Error::InvalidArgument { arg: "expected_m", reason: format!("{expected_m} exceeds max_m = {max_m}") });
        }
        let bad = |reason: String| Err(Error::InvalidArgument { arg: "tile", reason });
        let compiled = plan::compiled_block_m(&layout);
        if !compiled.contains(&block_m) {
            return bad(format!("block_m = {block_m} is not compiled for this layout ({compiled:?})"));
        }
        let menu = plan::block_n_menu(block_m);
        if !plan::is_compiled(&layout, block_m, block_n) {
            return bad(format!(
                "block_n = {block_n} is not compiled with {block_m}-row tiles of this layout (menu: {menu:?}; contiguous: up to 176)"
            ));
        }
        if !(1..=MAX_STAGES).contains(&stages) {
            return bad(format!("stages = {stages}: 1 ..= {MAX_STAGES}"));
        }
        let smem = plan::smem_plan(block_m, block_n, stages, masked_groups, tma_store).total;
        if smem > smem_limit {
            return bad(format!(
                "{block_m}x{block_n} with {stages} stages needs {smem} bytes of shared memory; the device has {smem_limit}"
            ));
        }
        Ok(LaunchShape { block_m, block_n, stages, swizzle_group: plan::swizzle_group(block_m, block_n, sms), multicast: Multicast::None })
    }

    /// Checks `k`, the sizes, and every buffer length (`index_len`: m_indices or masked_m).
    fn validate(&self, a_len: usize, sfa_len: usize, b_len: usize, sfb_len: usize, d_len: usize, index_len: Option<usize>) -> Result<()> {
        let Problem { m, n, k, groups, scale_rows, .. } = *self;
        if k == 0 || !k.is_multiple_of(GROUP) {
            return Err(Error::Shape { arg: "k", expected: format!("a positive multiple of {GROUP}"), got: k.to_string() });
        }
        if groups == 0 {
            return Err(Error::InvalidArgument { arg: "groups", reason: "must be at least 1".into() });
        }
        let max_masked = ffi::DK_GEMM_MAX_MASKED_GROUPS as usize;
        if self.layout == ffi::dk_gemm_layout::DK_GEMM_MASKED && groups > max_masked {
            return Err(Error::InvalidArgument { arg: "groups", reason: format!("{groups} exceeds the masked layout's {max_masked}") });
        }
        for (arg, v) in [("m", m), ("n", n), ("k", k), ("groups", groups), ("n", groups.saturating_mul(n))] {
            if i32::try_from(v).is_err() {
                return Err(Error::InvalidArgument { arg, reason: format!("{v} does not fit in i32") });
            }
        }
        let kb = k / GROUP;
        let sfa_groups = m.checked_div(scale_rows).unwrap_or(groups);
        let expect = |arg: &'static str, len: usize, want: usize, what: String| {
            if len == want {
                Ok(())
            } else {
                Err(Error::Shape { arg, expected: format!("{want} elements ({what})"), got: format!("{len} elements") })
            }
        };
        expect("a", a_len, m * k, format!("[{m}, {k}] e4m3"))?;
        let pad = tma_aligned_rows(scale_rows);
        expect("sfa", sfa_len, sfa_groups.max(1) * kb * pad, format!("[{}, {kb}, {pad}] f32, transposed", sfa_groups.max(1)))?;
        expect("b", b_len, groups * n * k, format!("[{groups}, {n}, {k}] e4m3"))?;
        expect("sfb", sfb_len, groups * ceil_div(n, GROUP) * kb, format!("[{groups}, {}, {kb}] f32", ceil_div(n, GROUP)))?;
        expect("d", d_len, m * n, format!("[{m}, {n}] bf16"))?;
        match (self.layout, index_len) {
            (ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS, Some(len)) => expect("m_indices", len, m, format!("[{m}] i32")),
            (ffi::dk_gemm_layout::DK_GEMM_MASKED, Some(len)) => expect("masked_m", len, groups, format!("[{groups}] i32")),
            _ => Ok(()),
        }
    }
}

/// Checks every buffer length of a dense FP8 GEMM. Pure: the wrapper calls it before launching.
pub fn validate_gemm_fp8(shape: GemmShape, a_len: usize, sfa_len: usize, b_len: usize, sfb_len: usize, d_len: usize) -> Result<()> {
    Problem::dense(shape).validate(a_len, sfa_len, b_len, sfb_len, d_len, None)
}

/// A 2-D tiled tensor map over `rows x cols` elements of `elem_bytes` bytes (row-major, rows of
/// `cols` elements), with boxes of `box_rows x box_cols`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tensor_map_2d(
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
pub fn gemm_fp8(stream: &CudaStream, a: &Fp8Activations, b: &Fp8Weights, d: &mut impl DevicePtrMut<bf16>, shape: GemmShape) -> Result<()> {
    gemm_fp8_with(stream, a, b, d, shape, GemmOptions::default())
}

/// [`gemm_fp8`] with launch options (an SM budget).
pub fn gemm_fp8_with(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    d: &mut impl DevicePtrMut<bf16>,
    shape: GemmShape,
    options: GemmOptions,
) -> Result<()> {
    let p = Problem::dense(shape);
    p.validate(a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), d.len(), None)?;
    launch(stream, &p, a, b, Bf16Out::Bf16(d), None::<&CudaSlice<i32>>, None::<&CudaSlice<i32>>, options)
}

/// [`gemm_fp8`] into a new `d` (`[m, n]` bf16), returned; with `m · n = 0` it holds one element
/// (CUDA allocates no empty buffer) and nothing is launched. The shape and operands are checked
/// before anything is allocated.
pub fn gemm_fp8_alloc(stream: &Arc<CudaStream>, a: &Fp8Activations, b: &Fp8Weights, shape: GemmShape) -> Result<CudaSlice<bf16>> {
    gemm_fp8_alloc_with(stream, a, b, shape, GemmOptions::default())
}

/// [`gemm_fp8_alloc`] with launch options (an SM budget).
pub fn gemm_fp8_alloc_with(
    stream: &Arc<CudaStream>,
    a: &Fp8Activations,
    b: &Fp8Weights,
    shape: GemmShape,
    options: GemmOptions,
) -> Result<CudaSlice<bf16>> {
    let p = Problem::dense(shape);
    let len =
        shape.m.checked_mul(shape.n).ok_or(Error::InvalidArgument { arg: "shape", reason: format!("{shape:?}: m · n overflows") })?;
    p.validate(a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), len, None)?;
    let mut d = stream.alloc_zeros::<bf16>(len.max(1))?;
    launch(stream, &p, a, b, Bf16Out::Bf16(&mut d.slice_mut(..len)), None::<&CudaSlice<i32>>, None::<&CudaSlice<i32>>, options)?;
    Ok(d)
}

/// The f32 variant for weight gradients: `d = a · bᵀ` in f32, or with `accumulate`, `d += a · bᵀ`
/// (each element read, added to in f32, and written back by the thread that computed it). Same
/// operands and requirements as [`gemm_fp8`]; `d` is `[m, n]` f32, 4-byte aligned.
pub fn gemm_fp8_f32(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    d: &mut impl DevicePtrMut<f32>,
    shape: GemmShape,
    accumulate: bool,
) -> Result<()> {
    let p = Problem::dense(shape);
    p.validate(a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), d.len(), None)?;
    launch::<CudaSlice<bf16>, _, CudaSlice<i32>, CudaSlice<i32>>(
        stream,
        &p,
        a,
        b,
        Output::F32 { d, accumulate },
        None,
        None,
        GemmOptions::default(),
    )
}

/// Where a launch writes.
enum Output<'v, B, F> {
    Bf16(&'v mut B),
    F32 { d: &'v mut F, accumulate: bool },
}

/// A launch writing bf16 (the f32 type is a placeholder).
type Bf16Out<'v, B> = Output<'v, B, CudaSlice<f32>>;

/// M-grouped contiguous GEMM (MoE prefill): `a` holds the rows of all `groups` experts stacked
/// (`[m, k]`, each expert's segment padded to a multiple of 128 rows, so `m % 128 == 0`),
/// `m_indices[r]` is row `r`'s expert (-1 on padding), `b` holds the experts' weights. Rows whose
/// index is -1 are left untouched in `d` (`[m, n]`). An index outside `-1 .. groups` on the device
/// is never used to address memory (its block is skipped).
pub fn gemm_fp8_contiguous(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    m_indices: &impl DevicePtr<i32>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: GemmShape,
    groups: usize,
) -> Result<()> {
    gemm_fp8_contiguous_with(stream, a, b, m_indices, d, shape, groups, GemmOptions::default())
}

/// [`gemm_fp8_contiguous`] with launch options (an SM budget).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fp8_contiguous_with(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    m_indices: &impl DevicePtr<i32>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: GemmShape,
    groups: usize,
    options: GemmOptions,
) -> Result<()> {
    contiguous(stream, a, b, m_indices, None::<&CudaSlice<i32>>, d, shape, groups, options)
}

/// [`gemm_fp8_contiguous_with`] on rows that are still arriving: `arrivals[b]` counts the rows of
/// 128-row block `b` written so far by a kernel running beside this one (the expert-parallel
/// receive of [`crate::ep::Group::dispatch_with_arrivals`], which also writes `a`, its scales and
/// `m_indices`). Each tile waits on the device until its block's count reaches 128, then reads
/// `m_indices` and A, so the experts' tiles start as their rows land instead of after the whole
/// dispatch. `arrivals` has `m / ARRIVAL_ROWS` elements.
///
/// The writer must be able to run beside the GEMM: `options.max_sms` must leave it SMs (fewer than
/// the device's; [`crate::overlap::SmBudget::gemm_options`] does), and it must already be enqueued
/// on its stream, not behind work that waits for this GEMM; CUDA does not promise that kernels of
/// two streams run at once, so avoid graph capture, MPS SM limits or another persistent kernel
/// taking the spare SMs. A block that never completes makes the kernel trap after 30 s instead of
/// hanging: a sticky error after which the CUDA context is unusable. A forced tile must have
/// `block_m = 128`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fp8_contiguous_arrived(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    m_indices: &impl DevicePtr<i32>,
    arrivals: &impl DevicePtr<i32>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: GemmShape,
    groups: usize,
    options: GemmOptions,
) -> Result<()> {
    contiguous(stream, a, b, m_indices, Some(arrivals), d, shape, groups, options)
}

/// The contiguous layout's one path, with or without arrival counters: its checks, then [`launch`].
#[allow(clippy::too_many_arguments)]
fn contiguous<A: DevicePtr<i32>>(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    m_indices: &impl DevicePtr<i32>,
    arrivals: Option<&A>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: GemmShape,
    groups: usize,
    options: GemmOptions,
) -> Result<()> {
    if !shape.m.is_multiple_of(GROUP) {
        return Err(Error::Shape {
            arg: "m",
            expected: format!("a multiple of {GROUP} (segments padded per expert)"),
            got: shape.m.to_string(),
        });
    }
    if let Some(arrivals) = arrivals {
        let blocks = shape.m / ARRIVAL_ROWS;
        if arrivals.len() != blocks {
            return Err(Error::Shape {
                arg: "arrivals",
                expected: format!("{blocks} elements (one per {ARRIVAL_ROWS}-row block)"),
                got: format!("{} elements", arrivals.len()),
            });
        }
        let device_sms = crate::launch::device_facts(stream)?.sm_count;
        if options.max_sms.is_none_or(|n| n >= device_sms) {
            return Err(Error::InvalidArgument {
                arg: "max_sms",
                reason: format!("must leave the rows' writer SMs: fewer than the device's {device_sms}"),
            });
        }
    }
    let p = Problem { layout: ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS, groups, ..Problem::dense(shape) };
    p.validate(a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), d.len(), Some(m_indices.len()))?;
    launch(stream, &p, a, b, Bf16Out::Bf16(d), Some(m_indices), arrivals, options)
}

/// M-grouped masked GEMM (MoE decode, CUDA-graph friendly): `a` is `[groups, max_m, k]` with the
/// per-token quantiser's `[groups, k/128, round_up(max_m, 4)]` scales, `d` is `[groups, max_m, n]`,
/// and only the first `masked_m[g]` rows of group `g` (read on the device, clamped to `max_m`) are
/// computed and written.
pub fn gemm_fp8_masked(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    masked_m: &impl DevicePtr<i32>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: MaskedShape,
) -> Result<()> {
    gemm_fp8_masked_with(stream, a, b, masked_m, d, shape, GemmOptions::default())
}

/// [`gemm_fp8_masked`] with launch options (an SM budget).
pub fn gemm_fp8_masked_with(
    stream: &CudaStream,
    a: &Fp8Activations,
    b: &Fp8Weights,
    masked_m: &impl DevicePtr<i32>,
    d: &mut impl DevicePtrMut<bf16>,
    shape: MaskedShape,
    options: GemmOptions,
) -> Result<()> {
    let MaskedShape { groups, max_m, n, k } = shape;
    let m = groups.checked_mul(max_m).ok_or(Error::InvalidArgument { arg: "max_m", reason: format!("{groups} x {max_m} overflows") })?;
    let p = Problem { layout: ffi::dk_gemm_layout::DK_GEMM_MASKED, m, n, k, groups, scale_rows: max_m };
    p.validate(a.q.len(), a.sf.len(), b.q.len(), b.sf.len(), d.len(), Some(masked_m.len()))?;
    launch(stream, &p, a, b, Bf16Out::Bf16(d), Some(masked_m), None::<&CudaSlice<i32>>, options)
}

/// The one launch path of every layout: pointers, alignment, tensor maps, params, the call.
#[allow(clippy::too_many_arguments)]
fn launch<B: DevicePtrMut<bf16>, F: DevicePtrMut<f32>, I: DevicePtr<i32>, A: DevicePtr<i32>>(
    stream: &CudaStream,
    p: &Problem,
    a: &Fp8Activations,
    b: &Fp8Weights,
    d: Output<B, F>,
    index: Option<&I>,
    arrivals: Option<&A>,
    options: GemmOptions,
) -> Result<()> {
    let mut launch = Launch::new("gemm_fp8", stream)?;
    let (device_sms, smem_limit) = (launch.device().sm_count, launch.device().smem_optin);
    let sms = match options.max_sms {
        None => device_sms,
        Some(n) if n >= 1 && n <= device_sms => n,
        Some(n) => {
            return Err(Error::InvalidArgument { arg: "max_sms", reason: format!("{n} is outside 1..={device_sms} (the device's SMs)") });
        }
    };
    let tma_store = options.tma_store;
    if tma_store && (p.layout != ffi::dk_gemm_layout::DK_GEMM_DENSE || matches!(d, Output::F32 { .. })) {
        return Err(Error::InvalidArgument { arg: "tma_store", reason: "the TMA-store epilogue is for the dense bf16 GEMM only".into() });
    }
    if tma_store && !p.n.is_multiple_of(8) {
        return Err(Error::InvalidArgument {
            arg: "tma_store",
            reason: format!("needs n % 8 == 0 (D's rows 16-byte aligned for the tensor map); n = {}", p.n),
        });
    }
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    let mut shape = p.launch_shape(sms, smem_limit, &options, tma_store)?;
    if arrivals.is_some() && shape.multicast != Multicast::None {
        if options.multicast.is_some() {
            return Err(Error::InvalidArgument { arg: "multicast", reason: "the arrival-gated GEMM runs without multicast".into() });
        }
        shape.multicast = Multicast::None;
    }
    let (a_ptr, sfa_ptr, b_ptr, sfb_ptr) = (launch.input(&a.q), launch.input(&a.sf), launch.input(&b.q), launch.input(&b.sf));
    let index_ptr = index.map(|v| launch.input(v));
    let arrivals_ptr = arrivals.map_or(0, |v| launch.input(v));
    let (d_ptr, d_f32_ptr, accumulate) = match d {
        Output::Bf16(d) => (launch.output(d), 0, false),
        Output::F32 { d, accumulate } => (0, launch.output(d), accumulate),
    };
    for (arg, addr) in [("a", a_ptr), ("sfa", sfa_ptr), ("b", b_ptr), ("sfb", sfb_ptr)] {
        check_aligned(arg, addr, 16)?;
    }
    if d_f32_ptr == 0 {
        // The TMA store's tensor map needs D 16-byte aligned.
        check_aligned("d", d_ptr, if tma_store { 16 } else { 2 })?;
    } else {
        check_aligned("d", d_f32_ptr, 4)?;
    }
    let kb = p.k / GROUP;
    let scale_groups = p.m.checked_div(p.scale_rows).unwrap_or(1).max(1);
    let (u8_t, f32_t) = (CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32);
    let (sw128, none) = (CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B, CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE);
    // Every menu size fits a TMA box dimension (<= 256).
    let (block_m, block_n, block_k) = (shape.block_m as u32, shape.block_n as u32, ffi::DK_GEMM_BLOCK_K);
    let is = |l: ffi::dk_gemm_layout| p.layout == l;
    let params = ffi::dk_gemm_fp8_params {
        tma_a: tensor_map_2d(a_ptr, u8_t, 1, p.m, p.k, block_m, block_k, sw128)?,
        tma_b: tensor_map_2d(b_ptr, u8_t, 1, p.groups * p.n, p.k, block_n, block_k, sw128)?,
        tma_sfa: tensor_map_2d(sfa_ptr, f32_t, 4, scale_groups * kb, tma_aligned_rows(p.scale_rows), 1, block_m, none)?,
        sfb: sfb_ptr as *const f32,
        d: d_ptr as *mut u16,
        d_f32: d_f32_ptr as *mut f32,
        accumulate: i32::from(accumulate),
        m_indices: if is(ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS) { index_ptr.unwrap_or(0) as *const i32 } else { std::ptr::null() },
        masked_m: if is(ffi::dk_gemm_layout::DK_GEMM_MASKED) { index_ptr.unwrap_or(0) as *const i32 } else { std::ptr::null() },
        m: p.m as i32,
        n: p.n as i32,
        k: p.k as i32,
        num_sms: sms as i32,
        groups: p.groups as i32,
        max_m: if is(ffi::dk_gemm_layout::DK_GEMM_MASKED) { p.scale_rows as i32 } else { p.m as i32 },
        layout: p.layout,
        block_m: shape.block_m as i32,
        block_n: shape.block_n as i32,
        stages: shape.stages as i32,
        swizzle_group: shape.swizzle_group as i32,
        arrivals: arrivals_ptr as *const i32,
        tma_store: i32::from(tma_store),
        tma_d: if tma_store {
            // D [m, n] bf16, one box per column chunk of the tile, swizzled as the staging tile.
            let bf16_t = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
            let span = plan::d_swizzle_bytes(shape.block_n);
            let swizzle = match span {
                128 => sw128,
                64 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
                _ => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            };
            tensor_map_2d(d_ptr, bf16_t, 2, p.m, p.n, block_m, (span / 2) as u32, swizzle)?
        } else {
            ffi::dk_tensor_map { opaque: [0; 16] }
        },
        multicast: match shape.multicast {
            Multicast::None => ffi::dk_gemm_multicast::DK_GEMM_MULTICAST_NONE,
            Multicast::A => ffi::dk_gemm_multicast::DK_GEMM_MULTICAST_A,
            Multicast::B => ffi::dk_gemm_multicast::DK_GEMM_MULTICAST_B,
        },
        // The shared operand with half a tile per box: each CTA of a cluster loads one half.
        tma_half: match shape.multicast {
            Multicast::None => ffi::dk_tensor_map { opaque: [0; 16] },
            Multicast::A => tensor_map_2d(a_ptr, u8_t, 1, p.m, p.k, block_m / 2, block_k, sw128)?,
            Multicast::B => tensor_map_2d(b_ptr, u8_t, 1, p.groups * p.n, p.k, block_n / 2, block_k, sw128)?,
        },
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

    #[test]
    fn grouped_validation_counts_experts_and_groups() {
        // Masked: 3 groups of 10 rows, n = 130, k = 256.
        let masked = Problem { layout: ffi::dk_gemm_layout::DK_GEMM_MASKED, m: 30, n: 130, k: 256, groups: 3, scale_rows: 10 };
        let lens = (30 * 256, 3 * 2 * 12, 3 * 130 * 256, 3 * 2 * 2, 30 * 130);
        assert!(masked.validate(lens.0, lens.1, lens.2, lens.3, lens.4, Some(3)).is_ok());
        let arg = |r: Result<()>| match r {
            Err(Error::Shape { arg, .. }) => arg,
            other => panic!("expected a shape error, got {other:?}"),
        };
        assert_eq!(arg(masked.validate(lens.0, 2 * 12, lens.2, lens.3, lens.4, Some(3))), "sfa");
        assert_eq!(arg(masked.validate(lens.0, lens.1, 130 * 256, lens.3, lens.4, Some(3))), "b");
        assert_eq!(arg(masked.validate(lens.0, lens.1, lens.2, lens.3, lens.4, Some(2))), "masked_m");
        let many = Problem { groups: 1025, m: 1025 * 10, ..masked };
        assert!(matches!(many.validate(0, 0, 0, 0, 0, Some(1025)), Err(Error::InvalidArgument { arg: "groups", .. })));
        // Contiguous: 256 rows of 2 experts.
        let contiguous =
            Problem { layout: ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS, groups: 2, ..Problem::dense(GemmShape { m: 256, n: 64, k: 128 }) };
        assert!(contiguous.validate(256 * 128, 256, 2 * 64 * 128, 2, 256 * 64, Some(256)).is_ok());
        assert_eq!(arg(contiguous.validate(256 * 128, 256, 2 * 64 * 128, 2, 256 * 64, Some(255))), "m_indices");
    }

    #[test]
    fn launch_shape_plans_or_checks_the_forced_tile() {
        let dense = Problem::dense(GemmShape { m: 256, n: 7168, k: 7168 });
        let planned = dense.launch_shape(132, 232_448, &GemmOptions::default(), false).unwrap();
        assert_eq!((planned.block_m, planned.block_n), (128, 112), "{planned:?}");
        let force =
            |block_m, block_n, stages| GemmOptions { tile: Some(TileConfig { block_m, block_n, stages }), ..GemmOptions::default() };
        let forced = dense.launch_shape(132, 232_448, &force(64, 16, 1), false).unwrap();
        assert_eq!((forced.block_m, forced.block_n, forced.stages), (64, 16, 1));
        let reason = |r: Result<LaunchShape>| match r {
            Err(Error::InvalidArgument { arg: "tile", reason }) => reason,
            other => panic!("expected a tile error, got {other:?}"),
        };
        assert!(reason(dense.launch_shape(132, 232_448, &force(32, 128, 4), false)).contains("block_m"));
        assert!(reason(dense.launch_shape(132, 232_448, &force(128, 208, 4), false)).contains("not compiled"));
        assert!(dense.launch_shape(132, 232_448, &force(128, 192, 4), false).is_ok());
        assert!(reason(dense.launch_shape(132, 232_448, &force(256, 144, 3), false)).contains("not compiled with 256-row"));
        assert!(dense.launch_shape(132, 232_448, &force(256, 128, 4), false).is_ok());
        assert!(reason(dense.launch_shape(132, 232_448, &force(128, 128, 0), false)).contains("stages"));
        assert!(reason(dense.launch_shape(132, 232_448, &force(128, 176, 16), false)).contains("shared memory"));
        let contiguous = Problem { layout: ffi::dk_gemm_layout::DK_GEMM_CONTIGUOUS, groups: 2, ..dense };
        assert!(reason(contiguous.launch_shape(132, 232_448, &force(64, 128, 4), false)).contains("block_m"));
        assert!(reason(contiguous.launch_shape(132, 232_448, &force(256, 128, 4), false)).contains("block_m"));
        assert!(reason(contiguous.launch_shape(132, 232_448, &force(128, 192, 4), false)).contains("not compiled"));
        // The masked layout's hint must not exceed max_m.
        let masked = Problem { layout: ffi::dk_gemm_layout::DK_GEMM_MASKED, m: 512, n: 4096, k: 7168, groups: 4, scale_rows: 128 };
        let hint = GemmOptions { expected_m: Some(129), ..GemmOptions::default() };
        assert!(matches!(masked.launch_shape(132, 232_448, &hint, false), Err(Error::InvalidArgument { arg: "expected_m", .. })));
        assert!(masked.launch_shape(132, 232_448, &GemmOptions { expected_m: Some(8), ..GemmOptions::default() }, false).is_ok());
        // The TMA-store staging tile comes out of the pipeline: one stage fewer for 128x128.
        let plain = dense.launch_shape(132, 232_448, &force(128, 128, 6), false).unwrap();
        assert_eq!(plain.stages, 6);
        assert!(reason(dense.launch_shape(132, 232_448, &force(128, 128, 6), true)).contains("shared memory"));
        assert!(dense.launch_shape(132, 232_448, &force(128, 128, 5), true).is_ok());
    }

    /// The compiled menu and the shared-memory formula of the C library agree with the planner's
    /// (host-only functions: no GPU needed).
    #[cfg(deepkern_kernels)]
    #[test]
    fn c_library_agrees_with_the_planner() {
        use ffi::dk_gemm_layout as L;
        for layout in [L::DK_GEMM_DENSE, L::DK_GEMM_CONTIGUOUS, L::DK_GEMM_MASKED] {
            for block_m in [32usize, 64, 128, 256] {
                for block_n in (8usize..=256).step_by(8) {
                    let planned =
                        if layout == L::DK_GEMM_CONTIGUOUS { GemmLayout::GroupedContiguous { groups: 1 } } else { GemmLayout::Dense };
                    let want = plan::is_compiled(&planned, block_m, block_n);
                    // SAFETY: host-only function.
                    let got = unsafe { ffi::dk_gemm_fp8_config_supported(layout, block_m as i32, block_n as i32) };
                    assert_eq!(got == 1, want, "{layout:?} {block_m}x{block_n}");
                }
            }
        }
        for (block_m, block_n, stages, groups, tma) in [
            (64, 16, 1, 0, false),
            (128, 176, 5, 0, false),
            (128, 112, 16, 1024, false),
            (64, 144, 7, 3, false),
            (128, 176, 4, 0, true),
            (256, 128, 3, 5, true),
        ] {
            // SAFETY: host-only function.
            let c = unsafe { ffi::dk_gemm_fp8_smem_bytes(block_m as i32, block_n as i32, stages as i32, groups as i32, i32::from(tma)) };
            assert_eq!(
                c,
                plan::smem_plan(block_m, block_n, stages, groups, tma).total as i64,
                "{block_m}x{block_n} {stages} {groups} {tma}"
            );
        }
        // SAFETY: host-only function; out-of-range arguments answer -1.
        assert_eq!(unsafe { ffi::dk_gemm_fp8_smem_bytes(128, 128, 17, 0, 0) }, -1);
    }
}
