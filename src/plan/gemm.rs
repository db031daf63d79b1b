//! Tile, pipeline and grid choice for the FP8 block-scaled GEMMs (dense, M-grouped contiguous,
//! M-grouped masked). Plain Rust, no CUDA: property-tested on the CPU.
//!
//! The kernel this plans for (Hopper, sm_90a; `csrc/gemm/fp8_kernel.cuh`): a persistent grid of
//! one CTA per SM; a producer warpgroup issuing TMA loads of A, A's scales and B into a ring of
//! `stages` shared-memory buffers; one (`block_m = 64`) or two consumer warpgroups, each running
//! `wgmma m64nNk32` (E4M3) on one or (`block_m = 256`) two 64-row sub-tiles with f32 accumulators,
//! promoted on CUDA cores every `BLOCK_K = 128` of K; the tile stored from registers. Tile shapes
//! come from a compiled menu ([`block_n_menu`]); the stage count is a launch parameter; tiles are
//! walked in groups of `swizzle_group` M blocks ([`tile_coords`]).
//!
//! Choice: among the legal `(block_m, block_n)` with the deepest pipeline that fits shared memory,
//! take the one with the lowest estimated time of the whole launch ([`TileCost::launch_clocks`]):
//! per k-block of every wave, the slowest of tensor-core time, the SM's own load rate, its share
//! of what L2 supplies to all the SMs running at once, and the load latency the pipeline depth
//! leaves exposed, plus a charge for each extra scale block of B a tile straddles. The constants
//! are an initial model from Hopper's specification, to be calibrated against measurements
//! (`benches/gemm.rs`, the tile sweep).

use crate::device::DeviceInfo;
use crate::error::{Error, Result};
use crate::layout::{GROUP, ceil_div};

/// K per pipeline stage: exactly one scale block along K.
pub const BLOCK_K: usize = GROUP;
/// TMA with 128-byte swizzle needs 1024-byte aligned shared-memory buffers.
pub const SMEM_ALIGN: usize = 1024;
/// The `block_n` the kernel library is compiled for with 64- and 128-row tiles
/// (`DK_GEMM_FOR_EACH_BLOCK_N` in `csrc/gemm/fp8_kernel.cuh`; a test checks the two agree).
/// Multiples of 16 (wgmma needs 8; 16 keeps 8-column slices inside one of B's 128-column scale
/// blocks); the ones that do not divide 128 fill the SMs better on some N (7168 / 112 = 64 tiles;
/// 48 and 80 straddle at most two of B's scale blocks).
pub const BLOCK_N_MENU: [usize; 12] = [16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192];
/// The `block_n` compiled with 256-row tiles (`DK_GEMM_FOR_EACH_BLOCK_N_256`): each consumer
/// thread holds a promoted sum of `block_n / 2` registers for each of its two sub-tiles beside
/// the shared wgmma scratch, so the menu stops at 128 (144 spills).
pub const BLOCK_N_MENU_256: [usize; 8] = [16, 32, 48, 64, 80, 96, 112, 128];
/// Largest `block_n`: two f32 accumulators of `block_n / 2` registers per consumer thread (the
/// wgmma scratch and the promoted sum) must fit the 232-register budget beside the rest; 192 does
/// with B's scales in shared memory.
pub const MAX_BLOCK_N: usize = 192;
/// The TMA-store epilogue's swizzle span for `block_n`-wide tiles, in bytes: the largest of 128, 64
/// and 32 that divides a row of the bf16 tile (`block_n · 2` bytes). The staging tile is stored in
/// column chunks of `span / 2`, one TMA store each, through a tensor map with that swizzle (the
/// mirror of `d_swizzle_bytes` in `csrc/gemm/fp8_kernel.cuh`).
pub fn d_swizzle_bytes(block_n: usize) -> usize {
    [128, 64, 32].into_iter().find(|s| (block_n * 2).is_multiple_of(*s)).unwrap_or(32)
}

/// Shared memory a straddling tile keeps B's scales in: two buffers of three scale rows of 64
/// k-blocks, f32, and a full and an empty barrier per buffer.
pub const SFB_SMEM_BYTES: usize = 2 * 3 * 64 * 4 + 4 * 8;

/// Fewest pipeline stages the planner accepts for a tile (one more for tiles smaller than
/// 128x176, which finish a stage sooner).
pub const MIN_STAGES: usize = 3;
/// `DK_GEMM_MAX_STAGES`.
pub const MAX_STAGES: usize = 16;
/// `DK_GEMM_MAX_MASKED_GROUPS`.
pub const MAX_MASKED_GROUPS: usize = 1024;

/// TMA multicast across clusters of two CTAs: which operand the two CTAs of a cluster share
/// (`DK_GEMM_MULTICAST_*`). Each loads half of the shared tile into both CTAs' shared memory, so
/// that operand's traffic from L2 halves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Multicast {
    /// One CTA per tile, no cluster.
    #[default]
    None,
    /// The two CTAs compute tiles adjacent along N and share the A tile.
    A,
    /// The two CTAs compute tiles adjacent along M and share the B tile.
    B,
}

/// Which GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLayout {
    /// `D[m, n] = A[m, k] · B[n, k]ᵀ`.
    Dense,
    /// MoE prefill: `m` rows of `groups` experts stacked, each expert's segment padded to 128 rows.
    GroupedContiguous {
        /// Experts (weight operands).
        groups: usize,
    },
    /// MoE decode: `groups` blocks of `max_m` rows, of which about `expected_m` are valid (a host
    /// hint: the valid counts live on the device).
    GroupedMasked {
        /// Experts (weight operands), one block of rows each.
        groups: usize,
        /// Rows allocated per group.
        max_m: usize,
        /// Rows per group the planner expects to be valid.
        expected_m: usize,
    },
}

/// A GEMM to plan: `m` rows of A (for [`GemmLayout::GroupedMasked`], `groups · max_m`), `n`
/// output columns, `k` the reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmProblem {
    /// Rows of A and D (masked: `groups · max_m`).
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// The reduction dimension, a multiple of 128.
    pub k: usize,
    /// Dense or one of the grouped layouts.
    pub layout: GemmLayout,
}

impl GemmProblem {
    /// Whether the plan reserves the TMA-store epilogue's staging tile: the dense layout with
    /// `tma_store` requested (the grouped layouts always store from registers).
    fn tma_store(&self, requested: bool) -> bool {
        requested && self.layout == GemmLayout::Dense
    }
}

/// Where a plan's shared memory goes, in bytes (the kernel's dynamic shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmemPlan {
    /// One pipeline stage: A tile, B tile, A's scales, its two barriers.
    pub per_stage: usize,
    /// The masked layout's per-group snapshot, the TMA-store staging tile when reserved, and 1024
    /// bytes of slack to align the base.
    pub fixed: usize,
    /// `fixed + stages · per_stage`: the launch's dynamic shared memory.
    pub total: usize,
}

/// A roofline model of one launch, in SM clock cycles. Per k-block (`BLOCK_K` of the reduction),
/// a tile takes the longest of:
/// - tensor-core time, `block_m · block_n · 128 / macs_per_clock`;
/// - its bytes at the SM's own rate: the A and B tiles, A's scales, B's scales (one word per
///   128-column scale block the tile touches) and its share of the output (`block_m · block_n`
///   bf16 written once, spread over the k-blocks);
/// - the same bytes times the tiles running at once, at the rate L2 supplies all SMs together;
/// - the load latency that `stages - 1` loads in flight do not hide;
///
/// plus `scale_block_clocks` for every scale block of B beyond the first that the tile straddles
/// (averaged over the tiles along N). With [`Multicast`], the shared operand's tile counts half
/// towards L2's supply (each CTA of the pair pulls half of it), and fully towards the SM's own
/// rate (it still lands whole in each SM). A launch runs `waves` rounds of tiles, the last one
/// with only `last_wave_tiles` of them drawing on L2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileCost {
    /// FP8 multiply-adds per SM per clock (H100: ~1979 TFLOP/s dense over 132 SMs at 1.83 GHz).
    pub macs_per_clock: f64,
    /// Bytes one SM can move per clock to or from L2.
    pub load_bytes_per_clock: f64,
    /// Bytes L2 can supply per clock to all SMs together: just under the 64 B per clock that
    /// a 128x128 tile pulls at full tensor-core rate on each of 132 SMs.
    pub l2_bytes_per_clock: f64,
    /// Clocks from issuing a tile's loads to its data in shared memory.
    pub load_latency_clocks: f64,
    /// Clocks each k-block costs for every scale block of B beyond the first that a tile touches
    /// (its scales are read from global memory at every k-block).
    pub scale_block_clocks: f64,
}

impl TileCost {
    /// The estimates used for every Hopper part (from the specification and DeepGEMM's published
    /// behaviour, never fitted to measurements yet).
    pub const HOPPER: TileCost = TileCost {
        macs_per_clock: 4096.0,
        load_bytes_per_clock: 64.0,
        l2_bytes_per_clock: 8192.0,
        load_latency_clocks: 1200.0,
        scale_block_clocks: 8.0,
    };

    /// Clocks for one k-block of a `block_m x block_n` tile with `stages` pipeline stages, while
    /// `active` tiles run at once, in a problem of `k` (a multiple of `BLOCK_K`), its operand
    /// `multicast` or not.
    pub fn step_clocks(&self, block_m: usize, block_n: usize, stages: usize, active: usize, k: usize, multicast: Multicast) -> f64 {
        let k_blocks = (k / BLOCK_K).max(1) as f64;
        let scale_blocks = scale_blocks_per_tile(block_n);
        let bytes = ((block_m + block_n) * BLOCK_K + block_m * 4) as f64 + scale_blocks * 4.0 + (block_m * block_n * 2) as f64 / k_blocks;
        let halved = match multicast {
            Multicast::None => 0,
            Multicast::A => block_m * BLOCK_K / 2,
            Multicast::B => block_n * BLOCK_K / 2,
        };
        let compute = (block_m * block_n * BLOCK_K) as f64 / self.macs_per_clock;
        let own = bytes / self.load_bytes_per_clock;
        let shared = (bytes - halved as f64) * active.max(1) as f64 / self.l2_bytes_per_clock;
        let latency = self.load_latency_clocks / stages.saturating_sub(1).max(1) as f64;
        compute.max(own).max(shared).max(latency) + (scale_blocks - 1.0) * self.scale_block_clocks
    }

    /// Estimated clocks of a launch of `tiles` tiles on `sms` SMs (persistent, one tile per SM
    /// at a time; with multicast, `sms` rounded down to whole clusters of two).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_clocks(
        &self,
        block_m: usize,
        block_n: usize,
        stages: usize,
        tiles: usize,
        sms: usize,
        k: usize,
        multicast: Multicast,
    ) -> f64 {
        if tiles == 0 {
            return 0.0;
        }
        let sms = if multicast == Multicast::None { sms.max(1) } else { (sms / 2 * 2).max(2) };
        let waves = tiles.div_ceil(sms);
        let last = tiles - (waves - 1) * sms;
        let k_blocks = (k / BLOCK_K).max(1) as f64;
        let full = (waves - 1) as f64 * self.step_clocks(block_m, block_n, stages, tiles.min(sms), k, multicast);
        k_blocks * (full + self.step_clocks(block_m, block_n, stages, last, k, multicast))
    }
}

/// Scale blocks of B (128 columns each) that a `block_n`-wide tile touches, averaged over the
/// tiles along N (tiles start at multiples of `block_n`; the pattern repeats every
/// `lcm(block_n, 128)` columns). 1 when `block_n` divides 128.
pub fn scale_blocks_per_tile(block_n: usize) -> f64 {
    let block_n = block_n.max(1);
    let period = block_n / gcd(block_n, GROUP) * GROUP;
    let tiles = period / block_n;
    let touched: usize = (0..tiles).map(|j| (j * block_n + block_n - 1) / GROUP - (j * block_n) / GROUP + 1).sum();
    touched as f64 / tiles as f64
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The plan for one GEMM launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPlan {
    /// Rows of D per tile: 64, 128 or 256.
    pub block_m: usize,
    /// Columns of D per tile, from [`BLOCK_N_MENU`].
    pub block_n: usize,
    /// Shared-memory pipeline depth, in k-blocks of [`BLOCK_K`].
    pub stages: usize,
    /// Consumer warpgroups (1 for `block_m = 64`, else 2); the CTA has one more, the producer.
    pub math_warpgroups: usize,
    /// Threads per CTA: 128 per warpgroup, the producer's included.
    pub threads: usize,
    /// The dynamic shared memory the launch needs.
    pub smem: SmemPlan,
    /// Output tiles (expected tiles for the masked layout).
    pub tiles: usize,
    /// Persistent CTAs: `min(tiles, SMs)`.
    pub grid: usize,
    /// `ceil(tiles / SMs)` (with multicast, SMs in whole pairs): rounds of tiles the persistent
    /// grid runs.
    pub waves: usize,
    /// Tiles in the last wave.
    pub last_wave_tiles: usize,
    /// Rasterisation group for L2 reuse (M blocks swept together).
    pub swizzle_group: usize,
    /// Estimated clocks of the launch ([`TileCost::launch_clocks`]): what the choice minimised.
    pub cost: f64,
    /// The plan reserves the TMA-store epilogue's staging tile (dense, on request).
    pub tma_store: bool,
    /// The operand clusters of two CTAs share through TMA multicast, if any.
    pub multicast: Multicast,
}

/// Dynamic shared memory of a `block_m x block_n` tile with `stages` stages; `masked_groups` is
/// the masked layout's group count (0 for the others); `tma_store` adds the bf16 staging tile of
/// the TMA-store epilogue. The mirror of the kernel's `smem_layout`
/// (`dk_gemm_fp8_smem_bytes`; a test checks the two agree): per stage the A tile (`block_m`
/// rows of 128 bytes), the B tile, A's `block_m` f32 scales and two 8-byte barriers; the A and B
/// tiles are multiples of 1024 bytes for every menu shape, as the 128-byte swizzle needs. Tiles
/// whose `block_n` does not divide 128 also keep B's scales in shared memory: two buffers of three
/// rows of 64 k-blocks and their barriers ([`SFB_SMEM_BYTES`]).
pub fn smem_plan(block_m: usize, block_n: usize, stages: usize, masked_groups: usize, tma_store: bool) -> SmemPlan {
    let per_stage = block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4 + 2 * 8;
    let d_tile = if tma_store { block_m * block_n * 2 } else { 0 };
    let sfb = if GROUP.is_multiple_of(block_n.max(1)) { 0 } else { SFB_SMEM_BYTES };
    let fixed = if masked_groups > 0 { (2 * masked_groups + 1) * 4 } else { 0 } + d_tile + sfb + SMEM_ALIGN;
    SmemPlan { per_stage, fixed, total: fixed + stages * per_stage }
}

/// The deepest pipeline (up to [`MAX_STAGES`]) that fits `limit` bytes, if at least the minimum does.
pub fn max_stages(block_m: usize, block_n: usize, masked_groups: usize, tma_store: bool, limit: usize) -> Option<usize> {
    // Small tiles finish a stage quickly and need more of them in flight to hide load latency.
    let min = if block_m * block_n < 128 * 176 { MIN_STAGES + 1 } else { MIN_STAGES };
    (min..=MAX_STAGES).rev().find(|&s| smem_plan(block_m, block_n, s, masked_groups, tma_store).total <= limit)
}

/// Tile `tile` of a dense or contiguous launch as `(m_block, n_block)`: tiles come in groups of
/// `group` M blocks (the last group may be shorter), and within a group M varies fastest, so
/// consecutive CTAs share B tiles and a group's A rows stay in L2. The kernel's scheduler computes
/// the same (`csrc/gemm/fp8_kernel.cuh`); every tile of `m_tiles x n_tiles` appears exactly once.
pub fn tile_coords(tile: usize, m_tiles: usize, n_tiles: usize, group: usize) -> (usize, usize) {
    let span = group * n_tiles;
    let first_m = (tile / span) * group;
    let rows = group.min(m_tiles - first_m);
    let in_group = tile % span;
    (first_m + in_group % rows, in_group / rows)
}

/// Rows of work per group that the tile count is based on, and the number of groups.
fn m_work(p: &GemmProblem) -> (usize, usize) {
    match p.layout {
        GemmLayout::Dense => (p.m, 1),
        GemmLayout::GroupedContiguous { .. } => (p.m, 1),
        GemmLayout::GroupedMasked { groups, expected_m, .. } => (expected_m, groups),
    }
}

/// The `block_m` the kernel library is compiled for in `layout` (the mirror of the C menu): 64,
/// 128 and 256, except the contiguous layout, where every 128-row block belongs to one expert
/// (a 256-row tile could hold two experts' rows, which need different B tiles).
pub fn compiled_block_m(layout: &GemmLayout) -> &'static [usize] {
    match layout {
        GemmLayout::GroupedContiguous { .. } => &[128],
        _ => &[64, 128, 256],
    }
}

/// The `block_n` compiled with `block_m`-row tiles: [`BLOCK_N_MENU`], or [`BLOCK_N_MENU_256`]
/// for 256 rows; empty for a `block_m` outside the menu.
pub fn block_n_menu(block_m: usize) -> &'static [usize] {
    match block_m {
        64 | 128 => &BLOCK_N_MENU,
        256 => &BLOCK_N_MENU_256,
        _ => &[],
    }
}

/// Whether the kernel library is compiled for `block_m x block_n` tiles in `layout`: the menus
/// above, except the contiguous layout's 192, which would spill registers there.
pub fn is_compiled(layout: &GemmLayout, block_m: usize, block_n: usize) -> bool {
    let contiguous_192 = matches!(layout, GemmLayout::GroupedContiguous { .. }) && block_n == 192;
    compiled_block_m(layout).contains(&block_m) && block_n_menu(block_m).contains(&block_n) && !contiguous_192
}

/// `block_m` candidates for a problem: the compiled ones, only 64 when that already covers the
/// rows, and no 256-row tile when 128 rows already cover them.
fn block_m_candidates(p: &GemmProblem) -> &'static [usize] {
    let (rows, _) = m_work(p);
    match compiled_block_m(&p.layout) {
        all @ [64, 128, 256] if rows <= 64 => &all[..1],
        all @ [64, 128, 256] if rows <= 128 => &all[..2],
        compiled => compiled,
    }
}

/// Consumer warpgroups of a `block_m`-row tile: one for 64 rows, two (of 64 or 128 rows) above.
pub fn math_warpgroups(block_m: usize) -> usize {
    if block_m <= 64 { 1 } else { 2 }
}

/// DeepGEMM's rasterisation rule: the group size in {8, 16} minimising `g·block_m + ceil(sms/g)·block_n`.
pub fn swizzle_group(block_m: usize, block_n: usize, sms: usize) -> usize {
    [8usize, 16].into_iter().min_by_key(|&g| g * block_m + sms.div_ceil(g) * block_n).expect("two candidates")
}

/// Whether the kernel library runs `block_n`-wide tiles of `layout` with multicast (the mirror of
/// `clusterable` in `csrc/gemm/fp8_kernel.cuh`): the dense layout, and the contiguous one up to
/// `block_n = 128` (wider contiguous tiles would spill registers with the cluster's tile walk
/// beside the arrival wait); never the masked layout.
pub fn multicast_compiled(layout: &GemmLayout, block_n: usize) -> bool {
    match layout {
        GemmLayout::Dense => true,
        GemmLayout::GroupedContiguous { .. } => block_n <= 128,
        GemmLayout::GroupedMasked { .. } => false,
    }
}

/// Fewest rows for which the planner prices multicast (DeepGEMM's threshold). Below it the
/// weights stream from HBM once per use and L2's supply to the SMs is not what binds; this model
/// has no HBM term, so it would credit multicast with a saving the hardware cannot show.
pub const MULTICAST_MIN_ROWS: usize = 512;

/// The multicasts worth pricing for `block_m x block_n` tiles of `p` on `sms` SMs: none always;
/// A or B for the dense and contiguous layouts with at least [`MULTICAST_MIN_ROWS`] rows, when
/// the launch runs more than one wave (in one wave L2 serves every tile once anyway) and the tiles
/// along the pairing direction come in whole pairs (an odd count leaves the last row or column of
/// tiles without a partner), on at least two SMs.
pub fn multicast_candidates(p: &GemmProblem, block_m: usize, block_n: usize, sms: usize) -> Vec<Multicast> {
    let mut out = vec![Multicast::None];
    if !multicast_compiled(&p.layout, block_n) || sms < 2 || p.m < MULTICAST_MIN_ROWS {
        return out;
    }
    let (m_tiles, n_tiles) = (ceil_div(p.m, block_m), ceil_div(p.n, block_n));
    if m_tiles * n_tiles <= sms / 2 * 2 {
        return out;
    }
    if n_tiles.is_multiple_of(2) {
        out.push(Multicast::A);
    }
    if m_tiles.is_multiple_of(2) {
        out.push(Multicast::B);
    }
    out
}

/// The masked layout's group count (0 for the others): its snapshot lives in shared memory.
fn masked_groups(p: &GemmProblem) -> usize {
    match p.layout {
        GemmLayout::GroupedMasked { groups, .. } => groups,
        _ => 0,
    }
}

fn validate(p: &GemmProblem, dev: &DeviceInfo) -> Result<()> {
    if !p.k.is_multiple_of(BLOCK_K) {
        return Err(Error::Shape { arg: "k", expected: format!("a multiple of {BLOCK_K}"), got: p.k.to_string() });
    }
    if dev.sm_count == 0 {
        return Err(Error::InvalidArgument { arg: "device", reason: "reports 0 SMs".into() });
    }
    match p.layout {
        GemmLayout::GroupedContiguous { groups } => {
            if groups == 0 {
                return Err(Error::InvalidArgument { arg: "groups", reason: "must be at least 1".into() });
            }
            if !p.m.is_multiple_of(GROUP) {
                return Err(Error::Shape {
                    arg: "m",
                    expected: format!("a multiple of {GROUP} (each expert padded)"),
                    got: p.m.to_string(),
                });
            }
        }
        GemmLayout::GroupedMasked { groups, max_m, expected_m } => {
            if groups == 0 || p.m != groups * max_m {
                return Err(Error::Shape { arg: "m", expected: format!("groups · max_m = {groups} · {max_m}"), got: p.m.to_string() });
            }
            if expected_m > max_m {
                return Err(Error::InvalidArgument { arg: "expected_m", reason: format!("{expected_m} exceeds max_m = {max_m}") });
            }
            if groups > MAX_MASKED_GROUPS {
                return Err(Error::InvalidArgument {
                    arg: "groups",
                    reason: format!("{groups} exceeds the masked layout's {MAX_MASKED_GROUPS}"),
                });
            }
        }
        GemmLayout::Dense => {}
    }
    Ok(())
}

/// Every feasible plan for `p` on `dev`, in candidate order.
pub fn candidates(p: &GemmProblem, dev: &DeviceInfo, cost: TileCost) -> Result<Vec<GemmPlan>> {
    candidates_with(p, dev, cost, false)
}

/// [`candidates`], reserving the TMA-store staging tile when `tma_store` (dense only).
pub fn candidates_with(p: &GemmProblem, dev: &DeviceInfo, cost: TileCost, tma_store: bool) -> Result<Vec<GemmPlan>> {
    validate(p, dev)?;
    let tma_store = p.tma_store(tma_store);
    let sms = dev.sm_count as usize;
    let (rows, groups) = m_work(p);
    let mut out = Vec::new();
    for &block_m in block_m_candidates(p) {
        for &block_n in block_n_menu(block_m).iter().filter(|&&bn| is_compiled(&p.layout, block_m, bn)) {
            let Some(stages) = max_stages(block_m, block_n, masked_groups(p), tma_store, dev.max_shared_memory_per_block_optin) else {
                continue;
            };
            let tiles = groups * ceil_div(rows, block_m) * ceil_div(p.n, block_n);
            for multicast in multicast_candidates(p, block_m, block_n, sms) {
                // Clusters of two: whole pairs of SMs.
                let slots = if multicast == Multicast::None { sms } else { sms / 2 * 2 };
                let waves = ceil_div(tiles, slots);
                out.push(GemmPlan {
                    block_m,
                    block_n,
                    stages,
                    math_warpgroups: math_warpgroups(block_m),
                    threads: 128 * (1 + math_warpgroups(block_m)),
                    smem: smem_plan(block_m, block_n, stages, masked_groups(p), tma_store),
                    tma_store,
                    tiles,
                    grid: tiles.min(slots),
                    waves,
                    last_wave_tiles: if tiles == 0 { 0 } else { tiles - (waves - 1) * slots },
                    swizzle_group: swizzle_group(block_m, block_n, sms),
                    cost: cost.launch_clocks(block_m, block_n, stages, tiles, sms, p.k, multicast),
                    multicast,
                });
            }
        }
    }
    Ok(out)
}

/// The plan with the lowest cost; ties go to the larger tile, then the wider `block_n`, then no
/// multicast.
pub fn plan(p: &GemmProblem, dev: &DeviceInfo) -> Result<GemmPlan> {
    plan_with(p, dev, TileCost::HOPPER)
}

/// [`plan`] under another cost model.
pub fn plan_with(p: &GemmProblem, dev: &DeviceInfo, cost: TileCost) -> Result<GemmPlan> {
    plan_epilogue(p, dev, cost, false)
}

/// [`plan_with`], reserving the TMA-store epilogue's staging tile when `tma_store` (dense only):
/// the same choice with the tile's bytes taken from the pipeline.
pub fn plan_epilogue(p: &GemmProblem, dev: &DeviceInfo, cost: TileCost, tma_store: bool) -> Result<GemmPlan> {
    let all = candidates_with(p, dev, cost, tma_store)?;
    all.into_iter()
        .min_by(|a, b| {
            a.cost
                .total_cmp(&b.cost)
                .then((b.block_m * b.block_n).cmp(&(a.block_m * a.block_n)))
                .then(b.block_n.cmp(&a.block_n))
                .then((a.multicast != Multicast::None).cmp(&(b.multicast != Multicast::None)))
        })
        .ok_or_else(|| Error::InvalidArgument {
            arg: "device",
            reason: format!("no tile fits in {} bytes of shared memory", dev.max_shared_memory_per_block_optin),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn h100() -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            l2_cache_bytes: 50 << 20,
            max_shared_memory_per_block_optin: 232_448,
            total_memory_bytes: 80 << 30,
        }
    }

    #[test]
    fn unaligned_block_n_fills_the_sms() {
        // DeepGEMM's example: M=256, N=7168 on 132 SMs. 128x128 tiles keep 112 SMs busy;
        // a 112-wide tile keeps 128 busy in one wave.
        let p = GemmProblem { m: 256, n: 7168, k: 7168, layout: GemmLayout::Dense };
        let plan = plan(&p, &h100()).unwrap();
        assert_eq!((plan.block_m, plan.block_n, plan.tiles, plan.waves), (128, 112, 128, 1), "{plan:?}");
    }

    #[test]
    fn staging_chunks_divide_every_tile() {
        for bn in BLOCK_N_MENU {
            let span = d_swizzle_bytes(bn);
            assert!((bn * 2).is_multiple_of(span), "{bn}: {span}");
        }
        assert_eq!([64, 128, 96, 160, 16, 112, 176].map(d_swizzle_bytes), [128, 128, 64, 64, 32, 32, 32]);
    }

    #[test]
    fn straddled_scale_blocks() {
        for bn in [16, 32, 64, 128] {
            assert_eq!(scale_blocks_per_tile(bn), 1.0, "{bn}");
        }
        assert_eq!(scale_blocks_per_tile(48), 1.25);
        assert_eq!(scale_blocks_per_tile(80), 1.5);
        assert_eq!(scale_blocks_per_tile(96), 1.5);
        assert_eq!(scale_blocks_per_tile(112), 1.75);
        assert_eq!(scale_blocks_per_tile(160), 2.0);
        assert_eq!(scale_blocks_per_tile(176), 2.25);
    }

    #[test]
    fn the_cost_model_prices_supply_latency_and_straddling() {
        let c = TileCost::HOPPER;
        // 128x128, 16 k-blocks: 512 clocks of tensor-core time, but alone its bytes (A and B
        // tiles, A's 128 scales, B's one, 1/16 of the bf16 output) at 64 B per clock take longer;
        // 132 tiles at once are L2-bound.
        let alone = c.step_clocks(128, 128, 6, 1, 2048, Multicast::None);
        let crowded = c.step_clocks(128, 128, 6, 132, 2048, Multicast::None);
        assert_eq!(alone, (256.0 * 128.0 + 128.0 * 4.0 + 4.0 + 128.0 * 128.0 * 2.0 / 16.0) / 64.0);
        assert!(crowded > alone && crowded > 512.0, "{crowded}");
        // Two stages hide less latency than six.
        assert!(c.step_clocks(128, 128, 2, 1, 2048, Multicast::None) > alone);
        // Without the charge and the cap, a straddling tile costs its roofline only.
        let free = TileCost { scale_block_clocks: 0.0, l2_bytes_per_clock: f64::INFINITY, load_latency_clocks: 0.0, ..c };
        assert_eq!(
            c.step_clocks(128, 176, 6, 1, 2048, Multicast::None) - free.step_clocks(128, 176, 6, 1, 2048, Multicast::None),
            1.25 * c.scale_block_clocks
        );
        // A launch: full waves at the crowded rate, the last at its own.
        let k_blocks = 16.0;
        let expect =
            k_blocks * (c.step_clocks(128, 128, 6, 132, 2048, Multicast::None) + c.step_clocks(128, 128, 6, 8, 2048, Multicast::None));
        assert_eq!(c.launch_clocks(128, 128, 6, 140, 132, 2048, Multicast::None), expect);
        assert_eq!(c.launch_clocks(128, 128, 6, 0, 132, 2048, Multicast::None), 0.0);
    }

    #[test]
    fn stage_bytes_match_the_kernel_layout() {
        // 128x128: A 16 KiB + B 16 KiB + A scales 512 B + two barriers per stage.
        assert_eq!(smem_plan(128, 128, 1, 0, false).per_stage, 16384 + 16384 + 512 + 16);
        let s = max_stages(128, 128, 0, false, 232_448).unwrap();
        assert_eq!(s, 6);
        assert!(smem_plan(128, 128, s, 0, false).total <= 232_448 && smem_plan(128, 128, s + 1, 0, false).total > 232_448);
        // The masked snapshot: 4 groups take 9 ints.
        assert_eq!(smem_plan(64, 16, 2, 4, false).fixed, 36 + 1024);
        // The TMA-store staging tile costs 128x128 bf16 = one stage here.
        assert_eq!(smem_plan(128, 128, 1, 0, true).fixed, 32768 + 1024);
        assert_eq!(max_stages(128, 128, 0, true, 232_448), Some(5));
    }

    #[test]
    fn tile_walk_covers_every_tile_once() {
        for (m_tiles, n_tiles, group) in [(1, 1, 8), (3, 5, 8), (17, 4, 8), (32, 41, 16), (9, 1, 16), (16, 3, 16)] {
            let mut seen = vec![false; m_tiles * n_tiles];
            for t in 0..m_tiles * n_tiles {
                let (mb, nb) = tile_coords(t, m_tiles, n_tiles, group);
                assert!(mb < m_tiles && nb < n_tiles && !std::mem::replace(&mut seen[mb * n_tiles + nb], true), "{t} -> {mb},{nb}");
            }
        }
        // Within a group M varies fastest: tiles 0..8 of a 32x4 walk share N block 0.
        assert!((0..8).all(|t| tile_coords(t, 32, 4, 8) == (t, 0)));
    }

    #[test]
    fn bad_problems_are_errors() {
        let dense = |k| GemmProblem { m: 64, n: 64, k, layout: GemmLayout::Dense };
        assert!(matches!(plan(&dense(200), &h100()), Err(Error::Shape { arg: "k", .. })));
        let contiguous = GemmProblem { m: 100, n: 64, k: 128, layout: GemmLayout::GroupedContiguous { groups: 2 } };
        assert!(matches!(plan(&contiguous, &h100()), Err(Error::Shape { arg: "m", .. })));
        let masked = GemmProblem { m: 512, n: 64, k: 128, layout: GemmLayout::GroupedMasked { groups: 2, max_m: 256, expected_m: 300 } };
        assert!(matches!(plan(&masked, &h100()), Err(Error::InvalidArgument { arg: "expected_m", .. })));
        let mut tiny = h100();
        tiny.max_shared_memory_per_block_optin = 16 << 10;
        assert!(plan(&dense(7168), &tiny).is_err());
    }
}
