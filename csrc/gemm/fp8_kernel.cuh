// FP8 block-scaled GEMM for Hopper, dense and M-grouped (contiguous, masked) for MoE: the kernel
// template, instantiated per layout by fp8_dense.cu, fp8_contiguous.cu and fp8_masked.cu; the C
// entry point is in fp8.cu. Contract: csrc/include/deepkern.h, dk_gemm_fp8_params; CPU twins:
// deepkern::reference::gemm; tile choice: deepkern::plan::gemm.
//
// Persistent CTAs of one producer warpgroup and one (BLOCK_M = 64) or two (128, 256) consumer
// warpgroups. Warpgroup 0 is the producer: one thread streams the A, B and A-scale tiles of every
// (tile, k-block) through a ring of `stages` shared-memory stages with TMA, signalling `full`
// barriers; for tiles that straddle B's scale blocks, its warp 1 (the scale loader) copies those
// scales into shared memory ahead of the consumers. Each consumer warpgroup owns BLOCK_M / 2 rows
// of the BLOCK_M x BLOCK_N tile (64 rows when BLOCK_M = 64), as one or two 64-row sub-tiles: per
// k-block it waits on `full` and, per
// sub-tile, issues four wgmma m64nNk32 (E4M3, f32 accumulate) over the 128 of K, waits for them
// and promotes: final += acc * sa[row] * sb[col / 128] on CUDA cores, so the tensor core's
// accumulator never runs across scale blocks. The two sub-tiles of a 256-row tile share one
// accumulator (two would not fit the register budget beside the promoted sums); the stage is
// released on `empty` once the last sub-tile's wgmma has read it. A tile whose BLOCK_N does not divide 128 may straddle two or three of B's
// 128-column scale blocks; each 8-column slice of the accumulator picks its own. The tile is
// stored from registers with bounds checks (ragged m and n), or, for the dense bf16 output on
// request (`tma_store`), staged in shared memory in swizzled column chunks (no bank conflicts)
// and written by one TMA store per chunk (the tensor map clips ragged edges); that store runs
// while the next tile's main loop does, and only the next tile's staging waits for it to have read
// the tile.
//
// Tiles are walked in an L2-friendly order: `swizzle_group` M blocks are swept for each N block
// before the next group of M blocks (the mirror is deepkern::plan::gemm::tile_coords).
//
// TMA multicast (dense and contiguous, `multicast`): the grid runs in clusters of two CTAs, which
// walk pairs of tiles adjacent along N (they share A) or along M (they share B), in the same order
// over the grid of pairs. Where both tiles of a pair run on the same expert, each CTA loads its half
// of the shared tile with one multicast into the same stage of both CTAs, whose full barriers
// count the two halves; a consumer warp releases a stage on the empty barriers of both CTAs, so
// neither producer overwrites a stage the other CTA still reads. The two stage rings stay in step:
// a CTA whose tile of a pair is skipped passes through its stages empty. Before leaving, each
// producer waits until both CTAs have released every stage, so no arrival or multicast can reach a
// CTA that has gone.
//
// Contiguous layout with arrival counters (`arrivals`, one per 128-row block of A): a kernel
// running beside this one (the expert-parallel dispatch's receive) writes A's rows, their scales and
// m_indices and adds 1 to the block's counter per row, with release semantics. Before a tile's
// m_indices or A rows are touched, every thread that walks the tile waits (acquire) until its
// block's counter reaches 128, so a tile starts as soon as its own rows are in, not when the whole
// dispatch is. The producer then orders those generic-proxy writes before its TMA reads.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::gemm {

constexpr int kBlockK = DK_GEMM_BLOCK_K;
constexpr int kWgmmaK = 32;  // K of one FP8 wgmma
static_assert(kBlockK == 128, "one scale block per stage: the promotion interval is 128 of K");
// setmaxnreg moves registers inside the CTA's pool, fixed at launch (one CTA per SM, registers per
// thread in multiples of 8): the producer's 40 and the consumers' 232 must fit it, or the
// consumers' increase waits forever (checked per tile shape below).
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

// Consumer warpgroups of a BLOCK_M tile, and the 64-row wgmma sub-tiles each one owns.
template <int kBlockM>
__host__ __device__ constexpr int math_warpgroups_of() {
    return kBlockM == 64 ? 1 : 2;
}
template <int kBlockM>
__host__ __device__ constexpr int sub_tiles_of() {
    return kBlockM / 64 / math_warpgroups_of<kBlockM>();
}
// The widest BLOCK_N whose accumulators fit a consumer thread's registers without spilling: a
// wgmma scratch of BLOCK_N / 2 floats and BLOCK_N / 2 promoted sums per sub-tile (checked by
// `cargo xtask sass`; the mirror is deepkern::plan::gemm::block_n_menu).
template <int kBlockM>
__host__ __device__ constexpr int max_block_n_of() {
    return sub_tiles_of<kBlockM>() == 1 ? 192 : 128;
}

// Whether a (layout, BLOCK_N) kernel runs in clusters of two with multicast: dense, and contiguous
// up to BLOCK_N = 128 (wider contiguous tiles spill with the cluster walk beside the arrival wait;
// checked by `cargo xtask sass`). The mirror is deepkern::plan::gemm::multicast_compiled.
__host__ __device__ constexpr bool clusterable(dk_gemm_layout_t layout, int block_n) {
    return layout == DK_GEMM_DENSE || (layout == DK_GEMM_CONTIGUOUS && block_n <= 128);
}

struct KernelParams {
    CUtensorMap tma_a;
    CUtensorMap tma_b;
    CUtensorMap tma_sfa;
    const float* sfb;
    __nv_bfloat16* d;
    float* d_f32;     // instead of d: f32 output
    bool accumulate;  // with d_f32: D += A·Bᵀ
    const int32_t* m_indices;
    const int32_t* masked_m;
    int m, n, k;
    int groups, max_m;
    int stages;
    int swizzle_group;
    const int32_t* arrivals;  // contiguous only, or null: [m / 128] rows arrived per block
    CUtensorMap tma_d;        // with tma_store: D [m, n] bf16, box {block_n, block_m}
    bool tma_store;           // dense bf16 only: the tile leaves through shared memory and TMA
    int multicast;            // DK_GEMM_MULTICAST_*: clusters of two CTAs share A or B
    CUtensorMap tma_half;     // with multicast: the shared operand, half a tile per box
};

// Rows per arrival counter (the contiguous layout's block; the EP receive counts in the same).
constexpr int kArrivalRows = DK_ARRIVAL_ROWS;
// A block whose rows never arrive means the writer is not running (the GEMM's persistent grid left
// it no SM, or it failed): trap after this long instead of hanging the GPU.
constexpr uint64_t kArrivalTimeoutNs = 30ull * 1000 * 1000 * 1000;
// The named barrier through which the consumer that waited for a tile's rows releases the others
// (barrier 0 is __syncthreads, 1 the epilogue's).
constexpr uint32_t kArrivalBarrier = 2;
// Straddling tiles (BLOCK_N not dividing 128) read B's scales from shared memory: three scale
// rows (the tile's first scale block and the next two, clamped to the expert's last) of kSfbChunk
// k-blocks, in two buffers, filled by warp kScaleLoaderWarp of the producer warpgroup (the scale
// loader) ahead of the consumers, through a full (one arrival per lane) and an empty (one per
// consumer warp) mbarrier per buffer.
constexpr int kSfbRows = 3;
constexpr int kSfbChunk = 64;
constexpr int kScaleLoaderWarp = 1;

// Waits until `counter` reaches kArrivalRows: relaxed polls with a growing sleep, then one acquire;
// then orders what it observed before this thread's later TMA reads. One thread per role waits
// (the producer; one consumer, which releases the others through a named barrier).
__device__ __forceinline__ void wait_rows_arrived(const int32_t* counter) {
    if (ptx::ld_relaxed_gpu_global_s32(counter) < kArrivalRows) {
        const uint64_t start = ptx::globaltimer();
        uint32_t sleep = 32;
        while (ptx::ld_relaxed_gpu_global_s32(counter) < kArrivalRows) {
            if (ptx::globaltimer() - start > kArrivalTimeoutNs) {
                __trap();
            }
            __nanosleep(sleep);
            sleep = min(sleep * 2, 512u);
        }
    }
    (void)ptx::ld_acquire_gpu_global_s32(counter);
    ptx::fence_proxy_async_global();
}

// The TMA-store epilogue's staging tile: column chunks as wide as the largest swizzle span (128, 64
// or 32 bytes of bf16) that divides the tile's row, each stored by one TMA store whose tensor map
// has that swizzle and a box of {span / 2, BLOCK_M} (the mirror is
// deepkern::plan::gemm::d_swizzle_bytes).
template <int kBlockN>
__host__ __device__ constexpr uint32_t d_swizzle_bytes() {
    return (kBlockN * 2) % 128 == 0 ? 128 : ((kBlockN * 2) % 64 == 0 ? 64 : 32);
}
// A byte offset of the staging tile (its base 1024-aligned) as TMA's swizzle of `kSwizzle` bytes
// places it: the 16-byte unit XORed with the row of 128 bytes, within the swizzle's span.
template <uint32_t kSwizzle>
__device__ __forceinline__ uint32_t swizzle_d(uint32_t offset) {
    return offset ^ (((offset >> 7) & (kSwizzle / 16 - 1)) << 4);
}

// Byte offsets of the dynamic shared memory, from a 1024-aligned base (the mirror is
// deepkern::plan::gemm::smem_plan; dk_gemm_fp8_smem_bytes exposes `total`).
struct SmemLayout {
    uint32_t a, b, sfa, d, full, empty, sfb, sfb_bars, tile_prefix, rows, total;
};

__host__ __device__ inline SmemLayout smem_layout(int block_m, int block_n, int stages, int masked_groups, bool d_tile) {
    SmemLayout l{};
    const uint32_t s = static_cast<uint32_t>(stages);
    l.d = 0;  // TMA store: block_m x block_n bf16 in swizzled column chunks (a multiple of 1024 B)
    l.a = l.d + (d_tile ? uint32_t(block_m) * block_n * 2 : 0);  // [stages][block_m * 128] e4m3, 128B swizzle
    l.b = l.a + s * uint32_t(block_m) * kBlockK;              // [stages][block_n * 128] e4m3, 128B swizzle
    l.sfa = l.b + s * uint32_t(block_n) * kBlockK;            // [stages][block_m] f32
    l.full = l.sfa + s * uint32_t(block_m) * 4;               // [stages] mbarrier
    l.empty = l.full + s * 8;                                 // [stages] mbarrier
    const bool straddles = 128 % block_n != 0;
    l.sfb = l.empty + s * 8;                                  // straddling tiles: [2][3][64] f32
    l.sfb_bars = l.sfb + (straddles ? 2u * kSfbRows * kSfbChunk * 4 : 0u);  // straddling: full[2], empty[2] mbarrier
    l.tile_prefix = l.sfb_bars + (straddles ? 4u * 8 : 0u);   // masked: [groups + 1] i32
    l.rows = l.tile_prefix + (masked_groups > 0 ? uint32_t(masked_groups + 1) * 4 : 0);  // masked: [groups] i32
    l.total = l.rows + uint32_t(masked_groups) * 4 + 1024;    // + slack to align the base to 1024
    return l;
}

// Where one output tile's operands live, for every layout.
struct TileInfo {
    int m0, n0;     // tile origin in its group's (or the whole) output
    int a_row;      // first row of A (and D) in the tensor maps
    int sfa_y;      // row of A's scale tensor map for k-block 0
    int expert;     // group whose B rows and scales the tile uses
    int row_limit;  // rows m0 + r < row_limit exist (dense and masked)
    bool skip;      // contiguous: the block is padding or names no valid expert
};

// Maps tile indices to operands. Producer and consumers both use it, so they always agree; the
// masked layout's per-group tiles come from a shared-memory snapshot of masked_m (`tile_prefix`,
// groups + 1 entries: tiles of the groups before each; `rows`: the clamped rows of each group).
template <dk_gemm_layout_t kLayout, int kBlockM, int kBlockN>
struct Scheduler {
    const KernelParams& p;
    int n_tiles;
    const int* tile_prefix;
    const int* rows;

    __device__ int num_tiles() const {
        if constexpr (kLayout == DK_GEMM_MASKED) {
            return tile_prefix[p.groups];
        }
        return ceil_div(p.m, kBlockM) * n_tiles;
    }

    // Clusters of two (dense and contiguous): pairs of tiles, adjacent along M (multicast of B)
    // or along N (multicast of A), walked as the tiles of a grid of pairs.
    __device__ __forceinline__ void pair_grid(int* m_pairs, int* n_pairs) const {
        *m_pairs = ceil_div(p.m, kBlockM);
        *n_pairs = n_tiles;
        if (p.multicast == DK_GEMM_MULTICAST_B) {
            *m_pairs = ceil_div(*m_pairs, 2);
        } else {
            *n_pairs = ceil_div(*n_pairs, 2);
        }
    }
    __device__ int num_pairs() const {
        int mp, np;
        pair_grid(&mp, &np);
        return mp * np;
    }

    // Tile (mb, nb) of the dense or contiguous layout (no arrival counters).
    __device__ __forceinline__ TileInfo at(int mb, int nb) const {
        TileInfo t{};
        t.m0 = mb * kBlockM;
        t.n0 = nb * kBlockN;
        t.a_row = t.m0;
        t.row_limit = p.m;
        if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
            t.expert = p.m_indices[t.m0];
            t.skip = t.expert < 0 || t.expert >= p.groups;
        }
        return t;
    }

    // This CTA's tile of pair `pair` (`rank` 0 or 1 of the cluster), skipped when it lies outside
    // D; `*shared` (unless null: the consumers do not need it) tells whether both tiles exist,
    // run and use the same expert, so that the shared operand can be multicast. Both CTAs compute
    // the same answer.
    __device__ __forceinline__ TileInfo pair_tile(int pair, uint32_t rank, bool* shared) const {
        int mp, np;
        pair_grid(&mp, &np);
        int a, b;
        raster(pair, mp, np, &a, &b);
        const bool on_b = p.multicast == DK_GEMM_MULTICAST_B;
        // The pair's tiles: this CTA's (rank) and the other one's.
        const int mb_own = on_b ? 2 * a + int(rank) : a, nb_own = on_b ? b : 2 * b + int(rank);
        const int mb_other = on_b ? 2 * a + int(rank ^ 1) : a, nb_other = on_b ? b : 2 * b + int(rank ^ 1);
        const int m_tiles = ceil_div(p.m, kBlockM);
        TileInfo own{}, other{};
        own.skip = true;
        other.skip = true;
        if (mb_own < m_tiles && nb_own < n_tiles) {
            own = at(mb_own, nb_own);
        }
        if (shared != nullptr) {
            if (mb_other < m_tiles && nb_other < n_tiles) {
                other = at(mb_other, nb_other);
            }
            *shared = !own.skip && !other.skip && own.expert == other.expert;
        }
        return own;
    }

    // Rasterisation: groups of `swizzle_group` M blocks; within a group, M varies fastest.
    __device__ __forceinline__ void raster(int tile, int m_tiles, int n_tiles_, int* mb, int* nb) const {
        // A group of more M blocks than there are walks the same order as one of all of them, and
        // keeps the arithmetic in 32 bits (span <= tiles < 2^31).
        const int group = min(p.swizzle_group, m_tiles);
        const int span = group * n_tiles_;
        const int first_m = (tile / span) * group;
        const int group_rows = min(group, m_tiles - first_m);
        const int in_group = tile - (tile / span) * span;
        *mb = first_m + in_group % group_rows;
        *nb = in_group / group_rows;
    }

    // `wait`: whether to wait for the tile's rows to arrive (contiguous layout with arrival
    // counters); a thread that passes false must be ordered after one that waited.
    __device__ __forceinline__ TileInfo get(int tile, bool wait = true) const {
        TileInfo t{};
        if constexpr (kLayout == DK_GEMM_MASKED) {
            // The last group whose first tile is at or before `tile` (groups with no tiles share
            // their successor's prefix and are passed over).
            int lo = 0, hi = p.groups - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (tile_prefix[mid] <= tile) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            const int g = lo;
            tile -= tile_prefix[g];
            const int m_tiles = ceil_div(rows[g], kBlockM);
            t.m0 = (tile % m_tiles) * kBlockM;
            t.n0 = (tile / m_tiles) * kBlockN;
            t.a_row = g * p.max_m + t.m0;
            t.sfa_y = g * (p.k / kBlockK);
            t.expert = g;
            t.row_limit = rows[g];
        } else {
            int mb, nb;
            raster(tile, ceil_div(p.m, kBlockM), n_tiles, &mb, &nb);
            t.m0 = mb * kBlockM;
            t.n0 = nb * kBlockN;
            t.a_row = t.m0;
            t.sfa_y = 0;
            t.row_limit = p.m;
            if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
                if (p.arrivals != nullptr && wait) {
                    wait_rows_arrived(p.arrivals + t.m0 / kArrivalRows);
                }
                t.expert = p.m_indices[t.m0];
                t.skip = t.expert < 0 || t.expert >= p.groups;
            }
        }
        return t;
    }
};

// Shared-memory matrix descriptor of a K-major operand tile with 128-byte swizzle: rows of 128
// bytes, 8-row (1024-byte) swizzle atoms.
__device__ __forceinline__ uint64_t smem_desc_k_major_sw128(const void* p) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    uint64_t desc = (addr & 0x3ffff) >> 4;  // start address, 16-byte units
    desc |= uint64_t(1) << 16;              // leading byte offset (unused with this swizzle)
    desc |= uint64_t(1024 >> 4) << 32;      // stride byte offset: one 8-row atom
    desc |= uint64_t(1) << 62;              // layout: 128-byte swizzle
    return desc;
}

// Position in the ring of pipeline stages: the stage index and the barrier phase parity, which
// flips each time the ring wraps.
struct PipelineState {
    int stages;
    int index = 0;
    uint32_t phase = 0;

    __device__ __forceinline__ void advance() {
        if (++index == stages) {
            index = 0;
            phase ^= 1;
        }
    }
};

__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
    while (!ptx::mbarrier_try_wait_parity(bar, parity)) {
    }
}

template <int kBlockM>
__host__ __device__ constexpr int threads_of() {
    return 128 * (1 + math_warpgroups_of<kBlockM>());
}

template <dk_gemm_layout_t kLayout, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(threads_of<kBlockM>(), 1) fp8_gemm_kernel(const __grid_constant__ KernelParams p) {
    constexpr int kMathWarpgroups = math_warpgroups_of<kBlockM>();
    constexpr int kSubTiles = sub_tiles_of<kBlockM>();
    constexpr int kWgRows = kBlockM / kMathWarpgroups;
    constexpr int kThreads = threads_of<kBlockM>();
    constexpr uint32_t kTileABytes = kBlockM * kBlockK;
    constexpr uint32_t kTileBBytes = kBlockN * kBlockK;
    constexpr uint32_t kSfaBytes = kBlockM * sizeof(float);
    // B's scale row is the same across the tile when BLOCK_N divides 128 (tiles start at
    // multiples of BLOCK_N); otherwise up to three rows meet in one tile.
    constexpr bool kUniformSfb = 128 % kBlockN == 0;
    static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 256, "one or two consumer warpgroups of one or two sub-tiles");
    static_assert(kBlockN % 16 == 0 && kBlockN >= 16 && kBlockN <= max_block_n_of<kBlockM>(), "BLOCK_N of the menu (wider tiles spill)");
    static_assert(128 * kProducerRegs + kMathWarpgroups * 128 * kConsumerRegs <= kThreads * ((65536 / kThreads) & ~7),
                  "the register split exceeds the CTA's register pool");

    DK_DYNAMIC_SHARED(uint8_t, smem_raw);
    // Aligned to 1024 by offsetting the shared array itself (not through an integer), so the
    // compiler keeps the address space and emits shared-memory loads and stores.
    uint8_t* base = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
    const SmemLayout lay = smem_layout(kBlockM, kBlockN, p.stages, kLayout == DK_GEMM_MASKED ? p.groups : 0, p.tma_store);
    uint8_t* s_a = base + lay.a;
    uint8_t* s_b = base + lay.b;
    float* s_sfa = reinterpret_cast<float*>(base + lay.sfa);
    uint8_t* s_d = base + lay.d;
    uint64_t* s_full = reinterpret_cast<uint64_t*>(base + lay.full);
    uint64_t* s_empty = reinterpret_cast<uint64_t*>(base + lay.empty);
    float* s_sfb = reinterpret_cast<float*>(base + lay.sfb);
    uint64_t* s_sfb_full = reinterpret_cast<uint64_t*>(base + lay.sfb_bars);
    uint64_t* s_sfb_empty = s_sfb_full + 2;
    int* s_tile_prefix = reinterpret_cast<int*>(base + lay.tile_prefix);
    int* s_rows = reinterpret_cast<int*>(base + lay.rows);

    const int n_tiles = ceil_div(p.n, kBlockN);
    const int n_blocks = ceil_div(p.n, 128);  // B scale rows per expert
    const int k_blocks = p.k / kBlockK;
    // Masked layout: one snapshot of masked_m per CTA (clamped rows and the tiles' prefix).
    if constexpr (kLayout == DK_GEMM_MASKED) {
        for (int g = threadIdx.x; g < p.groups; g += kThreads) {
            const int rows = p.masked_m[g];
            s_rows[g] = rows < 0 ? 0 : (rows > p.max_m ? p.max_m : rows);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int tiles = 0;
            for (int g = 0; g < p.groups; ++g) {
                s_tile_prefix[g] = tiles;
                tiles += ceil_div(s_rows[g], kBlockM) * n_tiles;
            }
            s_tile_prefix[p.groups] = tiles;
        }
    }
    const int wg = threadIdx.x / 128;
    // Clusters of two CTAs (dense and contiguous layouts): each walks one tile of every pair, and
    // where both tiles run on the same expert, each loads half of the shared operand's tile into
    // both CTAs' stage with one multicast. The two CTAs' stage rings stay in step (a CTA whose
    // tile of a pair is skipped still passes through the stages), and a stage is refilled only
    // when the consumers of both CTAs have released it.
    const bool clustered = clusterable(kLayout, kBlockN) && p.multicast != DK_GEMM_MULTICAST_NONE;
    const uint32_t rank = clustered ? ptx::cluster_ctarank() : 0;

    if (threadIdx.x == 0) {
        for (int i = 0; i < p.stages; ++i) {
            ptx::mbarrier_init(&s_full[i], 1);
            // One arrival per consumer warp, of each CTA of the cluster.
            ptx::mbarrier_init(&s_empty[i], kMathWarpgroups * 4 * (clustered ? 2 : 1));
        }
        if constexpr (!kUniformSfb) {
            for (int i = 0; i < 2; ++i) {
                ptx::mbarrier_init(&s_sfb_full[i], 32);  // one arrival per loader lane
                ptx::mbarrier_init(&s_sfb_empty[i], kMathWarpgroups * 4);  // one arrival per consumer warp
            }
        }
        ptx::fence_mbarrier_init();
        ptx::prefetch_tensormap(&p.tma_a);
        ptx::prefetch_tensormap(&p.tma_b);
        ptx::prefetch_tensormap(&p.tma_sfa);
        if (p.tma_store) {
            ptx::prefetch_tensormap(&p.tma_d);
        }
        if (clustered) {
            ptx::prefetch_tensormap(&p.tma_half);
        }
    }
    if (clustered) {
        // The other CTA's barriers are initialised before anything arrives on them or lands.
        ptx::barrier_cluster_arrive_release();
        ptx::barrier_cluster_wait_acquire();
    } else {
        __syncthreads();
    }
    const Scheduler<kLayout, kBlockM, kBlockN> sched{p, n_tiles, s_tile_prefix, s_rows};
    // What this CTA walks: tiles, or (clustered) pairs of tiles, one per cluster at a time.
    const int tiles = clustered ? sched.num_pairs() : sched.num_tiles();
    const int first_tile = clustered ? int(blockIdx.x / 2) : int(blockIdx.x);
    const int tile_step = clustered ? int(gridDim.x / 2) : int(gridDim.x);

    if (wg == 0) {
        // NOTES: the producer needs few registers; give them to the consumers.
        ptx::setmaxnreg_dec<kProducerRegs>();
        if constexpr (!kUniformSfb) {
            if (threadIdx.x / 32 == kScaleLoaderWarp) {
                // The scale loader: the same tiles as the consumers; for each chunk of k-blocks,
                // B's three scale rows into the next buffer once the consumers released it, six
                // loads in flight per lane. Lane 0 walks the schedule (and waits for arrivals).
                const int lane = threadIdx.x % 32;
                uint32_t chunks = 0;
                for (int tile = first_tile; tile < tiles; tile += tile_step) {
                    int skip = 0, expert = 0, n0 = 0;
                    if (lane == 0) {
                        const TileInfo t = clustered ? sched.pair_tile(tile, rank, nullptr) : sched.get(tile);
                        skip = t.skip ? 1 : 0;
                        expert = t.expert;
                        n0 = t.n0;
                    }
                    skip = __shfl_sync(0xffffffffu, skip, 0);
                    expert = __shfl_sync(0xffffffffu, expert, 0);
                    n0 = __shfl_sync(0xffffffffu, n0, 0);
                    if (skip != 0) {
                        continue;
                    }
                    const float* sfb = p.sfb + int64_t(expert) * n_blocks * k_blocks;
                    const int first = n0 / 128, last = (min(n0 + kBlockN, p.n) - 1) / 128;
                    for (int kb = 0; kb < k_blocks; kb += kSfbChunk, ++chunks) {
                        const uint32_t buf = chunks & 1;
                        wait(&s_sfb_empty[buf], ((chunks >> 1) & 1) ^ 1);
                        float* out = s_sfb + buf * kSfbRows * kSfbChunk;
                        float v[kSfbRows * kSfbChunk / 32];
#pragma unroll
                        for (int x = 0; x < kSfbRows * kSfbChunk / 32; ++x) {
                            const int e = lane + 32 * x, row = e / kSfbChunk, k = kb + e % kSfbChunk;
                            v[x] = k < k_blocks ? __ldg(sfb + int64_t(min(first + row, last)) * k_blocks + k) : 0.0f;
                        }
#pragma unroll
                        for (int x = 0; x < kSfbRows * kSfbChunk / 32; ++x) {
                            out[lane + 32 * x] = v[x];
                        }
                        ptx::mbarrier_arrive(&s_sfb_full[buf]);  // releases this lane's stores
                    }
                }
                return;
            }
        }
        if (threadIdx.x != 0) {
            return;
        }
        PipelineState ps{p.stages};
        for (int tile = first_tile; tile < tiles; tile += tile_step) {
            bool shared = false;
            const TileInfo t = clustered ? sched.pair_tile(tile, rank, &shared) : sched.get(tile);
            if (t.skip) {
                for (int kb = 0; clustered && kb < k_blocks; ++kb) {
                    // Stages with nothing in them keep the ring in step with the other CTA's.
                    wait(&s_empty[ps.index], ps.phase ^ 1);
                    ptx::mbarrier_arrive(&s_full[ps.index]);
                    ps.advance();
                }
                continue;
            }
            const int b_row = t.expert * p.n + t.n0;
            const bool share_a = shared && p.multicast == DK_GEMM_MULTICAST_A;
            const bool share_b = shared && p.multicast == DK_GEMM_MULTICAST_B;
            for (int kb = 0; kb < k_blocks; ++kb) {
                const int i = ps.index;
                wait(&s_empty[i], ps.phase ^ 1);
                // Out-of-bounds rows are zero-filled by TMA and still count towards the bytes; a
                // shared tile's two halves land in both CTAs, one from each.
                ptx::mbarrier_arrive_expect_tx(&s_full[i], kTileABytes + kTileBBytes + kSfaBytes);
                if (share_a) {
                    ptx::cp_async_bulk_tensor_2d_global_to_shared_multicast(s_a + i * kTileABytes + rank * (kTileABytes / 2), &p.tma_half,
                                                                            &s_full[i], kb * kBlockK, t.a_row + int(rank) * (kBlockM / 2), 0x3);
                } else {
                    ptx::cp_async_bulk_tensor_2d_global_to_shared(s_a + i * kTileABytes, &p.tma_a, &s_full[i], kb * kBlockK, t.a_row);
                }
                if (share_b) {
                    ptx::cp_async_bulk_tensor_2d_global_to_shared_multicast(s_b + i * kTileBBytes + rank * (kTileBBytes / 2), &p.tma_half,
                                                                            &s_full[i], kb * kBlockK, b_row + int(rank) * (kBlockN / 2), 0x3);
                } else {
                    ptx::cp_async_bulk_tensor_2d_global_to_shared(s_b + i * kTileBBytes, &p.tma_b, &s_full[i], kb * kBlockK, b_row);
                }
                ptx::cp_async_bulk_tensor_2d_global_to_shared(s_sfa + i * kBlockM, &p.tma_sfa, &s_full[i], t.m0, t.sfa_y + kb);
                ps.advance();
            }
        }
        if (clustered) {
            // Teardown: this CTA leaves only when both CTAs' consumers have released every stage,
            // so no arrival from the other CTA can still be on its way to these barriers.
            for (int i = 0; i < p.stages; ++i) {
                wait(&s_empty[ps.index], ps.phase ^ 1);
                ps.advance();
            }
        }
        return;
    }

    ptx::setmaxnreg_inc<kConsumerRegs>();
    const int math_wg = wg - 1;
    const int t = threadIdx.x % 128;
    const int warp = t / 32;
    const int lane = t % 32;
    // wgmma m64nN accumulator layout: this thread holds rows r and r + 8 of its warpgroup's first
    // 64-row sub-tile (r + 64 s and r + 64 s + 8 of sub-tile s), columns 8 j + 2 (lane % 4) + {0, 1}
    // for j = 0 .. N/8 - 1.
    const int r = math_wg * kWgRows + warp * 16 + lane / 4;
    constexpr int kAcc = kBlockN / 2;
    // Defined before the first wgmma reads it (its scale-d = 0 ignores the value, but the asm
    // operand is read-write).
    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
        acc[i] = 0.0f;
    }
    // The stage's last reader in this warp is done: release it in this CTA and (clustered) in the
    // other, whose producer may multicast into this CTA's stage too.
    const auto release = [&](int i) {
        __syncwarp();
        if (lane == 0) {
            ptx::mbarrier_arrive(&s_empty[i]);
            if (clustered) {
                ptx::mbarrier_arrive_cluster(ptx::mapa_shared_cluster(&s_empty[i], rank ^ 1));
            }
        }
    };
    PipelineState ps{p.stages};
    uint32_t sfb_chunks = 0;  // B-scale chunks consumed (straddling tiles)
    for (int tile = first_tile; tile < tiles; tile += tile_step) {
        bool waited = true;
        if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
            if (p.arrivals != nullptr) {
                // One consumer thread waits for the tile's rows; a named barrier releases the
                // others, ordered after its acquire, so they read the expert index it saw.
                waited = threadIdx.x == 128;
                if (waited) {
                    (void)sched.get(tile);
                }
                ptx::bar_sync(kArrivalBarrier, kMathWarpgroups * 128);
            }
        }
        const TileInfo t = clustered ? sched.pair_tile(tile, rank, nullptr) : sched.get(tile, waited);
        if (t.skip) {
            for (int kb = 0; clustered && kb < k_blocks; ++kb) {
                wait(&s_full[ps.index], ps.phase);
                release(ps.index);
                ps.advance();
            }
            continue;
        }
        // B's scale rows for this tile: the first, and (straddling tiles) the next two, clamped to
        // the last row that holds a real column so no read leaves this expert's scales.
        // B's scale row for this tile (tiles that divide 128 lie in one scale block; straddling
        // ones read theirs from the scale loader's buffers).
        const float* sfb0 = p.sfb + (int64_t(t.expert) * n_blocks + t.n0 / 128) * k_blocks;
        // Slices j >= j_next lie in the second scale block, j >= j_next + 16 in the third.
        const int j_next = (128 - t.n0 % 128) / 8;
        float sum[kSubTiles][kAcc];
#pragma unroll
        for (int s = 0; s < kSubTiles; ++s) {
#pragma unroll
            for (int i = 0; i < kAcc; ++i) {
                sum[s][i] = 0.0f;
            }
        }
        for (int kb = 0; kb < k_blocks; ++kb) {
            const int i = ps.index;
            float sb0, sb1, sb2;
            if constexpr (kUniformSfb) {
                sb0 = sb1 = sb2 = __ldg(sfb0 + kb);
            } else {
                const int q = kb % kSfbChunk;
                if (q == 0) {
                    wait(&s_sfb_full[sfb_chunks & 1], (sfb_chunks >> 1) & 1);
                }
                const float* chunk = s_sfb + (sfb_chunks & 1) * kSfbRows * kSfbChunk + q;
                sb0 = chunk[0];
                sb1 = chunk[kSfbChunk];
                sb2 = chunk[2 * kSfbChunk];
                if (q == kSfbChunk - 1 || kb == k_blocks - 1) {
                    // This warp has read the chunk: the loader may refill the buffer.
                    __syncwarp();
                    if (lane == 0) {
                        ptx::mbarrier_arrive(&s_sfb_empty[sfb_chunks & 1]);
                    }
                    ++sfb_chunks;
                }
            }
            wait(&s_full[i], ps.phase);
#pragma unroll
            for (int s = 0; s < kSubTiles; ++s) {
                const float sa0 = s_sfa[i * kBlockM + r + 64 * s];
                const float sa1 = s_sfa[i * kBlockM + r + 64 * s + 8];
                ptx::fence_operands(acc);
                ptx::wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk) {
                    const uint64_t desc_a =
                        smem_desc_k_major_sw128(s_a + i * kTileABytes + (math_wg * kWgRows + 64 * s) * kBlockK + kk * kWgmmaK);
                    const uint64_t desc_b = smem_desc_k_major_sw128(s_b + i * kTileBBytes + kk * kWgmmaK);
                    ptx::wgmma_m64k32_f32_e4m3_e4m3<kBlockN>(acc, desc_a, desc_b, kk > 0);
                }
                ptx::wgmma_commit_group();
                ptx::fence_operands(acc);
                ptx::wgmma_wait_group<0>();
                ptx::fence_operands(acc);
                if (s == kSubTiles - 1) {
                    release(i);
                }
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j) {
                    const float sb = kUniformSfb ? sb0 : (j < j_next ? sb0 : (j < j_next + 16 ? sb1 : sb2));
                    const float scale0 = sa0 * sb;
                    const float scale1 = sa1 * sb;
                    sum[s][4 * j + 0] += acc[4 * j + 0] * scale0;
                    sum[s][4 * j + 1] += acc[4 * j + 1] * scale0;
                    sum[s][4 * j + 2] += acc[4 * j + 2] * scale1;
                    sum[s][4 * j + 3] += acc[4 * j + 3] * scale1;
                }
            }
            ps.advance();
        }
        if constexpr (kLayout == DK_GEMM_DENSE) {
            if (p.tma_store) {
                // Through shared memory: one consumer thread owns the bulk stores. The previous
                // tile's store must have read the staging tile before it is overwritten.
                constexpr uint32_t kConsumers = kMathWarpgroups * 128;
                const bool issuer = threadIdx.x == 128;
                if (issuer) {
                    ptx::cp_async_bulk_wait_group_read<0>();
                }
                ptx::bar_sync(1, kConsumers);
                // The tile in column chunks of kSwizzle bytes per row, each chunk [block_m][kSwizzle]
                // in the TMA's swizzle: the 16-byte unit of a row is XORed with address bits 7 and
                // up, so the eight rows one warp writes at once fall in different banks.
                constexpr uint32_t kSwizzle = d_swizzle_bytes<kBlockN>();
                constexpr int kChunkCols = kSwizzle / 2;
#pragma unroll
                for (int s = 0; s < kSubTiles; ++s) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const uint32_t row = uint32_t(r + 64 * s + 8 * half);
#pragma unroll
                        for (int j = 0; j < kBlockN / 8; ++j) {
                            const int col = 8 * j + 2 * (lane % 4);
                            const uint32_t at = swizzle_d<kSwizzle>(uint32_t(col / kChunkCols) * kBlockM * kSwizzle + row * kSwizzle +
                                                                    uint32_t(col % kChunkCols) * 2);
                            const __nv_bfloat162 v = __floats2bfloat162_rn(sum[s][4 * j + 2 * half], sum[s][4 * j + 2 * half + 1]);
                            *reinterpret_cast<uint32_t*>(s_d + at) = *reinterpret_cast<const uint32_t*>(&v);
                        }
                    }
                }
                // Generic-proxy writes, then the async proxy reads them.
                ptx::fence_proxy_async_shared_cta();
                ptx::bar_sync(1, kConsumers);
                if (issuer) {
                    // One store per chunk; rows past m and columns past n are clipped by the map.
#pragma unroll
                    for (int c = 0; c < kBlockN / kChunkCols; ++c) {
                        ptx::cp_async_bulk_tensor_2d_shared_to_global(&p.tma_d, s_d + c * kBlockM * kSwizzle, t.n0 + c * kChunkCols, t.m0);
                    }
                    ptx::cp_async_bulk_commit_group();
                }
                continue;
            }
        }
        // Direct bounds-checked stores (every layout; the grouped ones leave rows untouched).
#pragma unroll
        for (int sh = 0; sh < 2 * kSubTiles; ++sh) {
            const int s = sh / 2, half = sh % 2;
            const int row = t.m0 + r + 64 * s + 8 * half;  // within the group (masked) or the whole of D
            bool keep = row < t.row_limit;
            if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
                keep = keep && p.m_indices[row] == t.expert;
            }
            if (!keep) {
                continue;
            }
            const int64_t row_offset = int64_t(t.a_row + r + 64 * s + 8 * half) * p.n;
            // Writes this thread's columns of the row: value(sum, address) gives what to store.
            const auto store = [&](auto* d_row, auto value) {
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j) {
                    const int col = t.n0 + 8 * j + 2 * (lane % 4);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        if (col + h < p.n) {
                            d_row[col + h] = value(sum[s][4 * j + 2 * half + h], d_row + col + h);
                        }
                    }
                }
            };
            if (p.d_f32 != nullptr) {
                // f32 output; accumulate: each element is read and written by this thread only.
                store(p.d_f32 + row_offset, [&](float v, const float* at) { return p.accumulate ? *at + v : v; });
            } else {
                store(p.d + row_offset, [](float v, const __nv_bfloat16*) { return __float2bfloat16_rn(v); });
            }
        }
    }
    if (kLayout == DK_GEMM_DENSE && p.tma_store && threadIdx.x == 128) {
        // The staging tile must stay valid (and the writes land) before the CTA exits.
        ptx::cp_async_bulk_wait_group<0>();
    }
}

// One launch of a compiled tile shape (shared memory attribute, then the kernel).
template <dk_gemm_layout_t kLayout, int kBlockM, int kBlockN>
dk_status_t launch_shape(const KernelParams& kp, dim3 grid, uint32_t cluster, uint32_t smem, cudaStream_t stream) {
    const auto kernel = fp8_gemm_kernel<kLayout, kBlockM, kBlockN>;
    // setmaxnreg only moves registers inside the pool allocated at launch (registers per thread x
    // threads): a build that gave the kernel fewer than the static_assert assumes would make the
    // consumers' increase wait forever, so refuse it here (once per shape) instead of hanging.
    static const int regs = [] {
        cudaFuncAttributes a{};
        return cudaFuncGetAttributes(&a, fp8_gemm_kernel<kLayout, kBlockM, kBlockN>) == cudaSuccess ? a.numRegs : -1;
    }();
    if (regs < 0) {
        return status_from_cuda(cudaErrorInvalidDeviceFunction);
    }
    if (int64_t(regs) * threads_of<kBlockM>() < 128 * kProducerRegs + math_warpgroups_of<kBlockM>() * 128 * kConsumerRegs) {
        return DK_STATUS_OUT_OF_RESOURCES;
    }
    const dk_status_t attr = status_from_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    if (attr != DK_STATUS_OK) {
        return attr;
    }
    return launch_cluster<fp8_gemm_kernel<kLayout, kBlockM, kBlockN>>(grid, threads_of<kBlockM>(), cluster, smem, stream, kp);
}

// The compiled tile menu: X(block_m, block_n) for every shape a layout instantiates (contiguous:
// block_m 128 only, every 128-row block belongs to one expert; 256-row tiles stop at the
// narrower BLOCK_N their two sub-tiles' sums leave room for). Mirrors
// deepkern::plan::gemm::block_n_menu; dk_gemm_fp8_config_supported answers from it.
#define DK_GEMM_FOR_EACH_BLOCK_N(X, BM) \
    X(BM, 16) X(BM, 32) X(BM, 48) X(BM, 64) X(BM, 80) X(BM, 96) X(BM, 112) X(BM, 128) X(BM, 144) X(BM, 160) X(BM, 176) X(BM, 192)
// The contiguous layout stops at 176: 192 spills there (the arrival wait beside the tile walk).
#define DK_GEMM_FOR_EACH_BLOCK_N_CONTIGUOUS(X) \
    X(128, 16) X(128, 32) X(128, 48) X(128, 64) X(128, 80) X(128, 96) X(128, 112) X(128, 128) X(128, 144) X(128, 160) X(128, 176)
#define DK_GEMM_FOR_EACH_BLOCK_N_256(X) X(256, 16) X(256, 32) X(256, 48) X(256, 64) X(256, 80) X(256, 96) X(256, 112) X(256, 128)

// Entry points of the per-layout units: launch the (block_m, block_n) instantiation, or return
// DK_STATUS_INVALID_ARGUMENT for a shape outside the menu.
dk_status_t launch_dense(const KernelParams& kp, int block_m, int block_n, dim3 grid, uint32_t cluster, uint32_t smem, cudaStream_t stream);
dk_status_t launch_contiguous(const KernelParams& kp, int block_m, int block_n, dim3 grid, uint32_t cluster, uint32_t smem,
                              cudaStream_t stream);
dk_status_t launch_masked(const KernelParams& kp, int block_m, int block_n, dim3 grid, uint32_t cluster, uint32_t smem, cudaStream_t stream);

// The body of a per-layout entry point: one branch per compiled shape.
#define DK_GEMM_LAUNCH_CASE(LAYOUT, BM, BN)                       \
    if (block_m == (BM) && block_n == (BN)) {                     \
        return launch_shape<LAYOUT, BM, BN>(kp, grid, cluster, smem, stream); \
    }

}  // namespace dk::gemm
