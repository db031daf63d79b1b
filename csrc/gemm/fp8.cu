// FP8 block-scaled GEMM for Hopper, dense and M-grouped (contiguous, masked) for MoE (version 1).
// Contract: csrc/include/deepkern.h, dk_gemm_fp8_params; CPU twins: deepkern::reference::gemm.
//
// Persistent CTAs of three warpgroups. Warpgroup 0 is the producer: one thread streams the A, B and
// A-scale tiles of every (tile, k-block) through a ring of kStages shared-memory stages with TMA,
// signalling `full` barriers. Warpgroups 1 and 2 each own 64 rows of the 128x128 tile: per k-block
// they wait on `full`, issue four wgmma m64n128k32 (E4M3, f32 accumulate) over the 128 of K, wait
// for them, release the stage on `empty`, then promote: final += acc * sa[row] * sb on CUDA cores,
// so the tensor core's accumulator never runs across scale blocks. The bf16 tile is stored from
// registers with bounds checks (ragged m and n).
//
// SASS-EXPECT: fp8_gemm_kernel QGMMA UTMALDG USETMAXREG
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::gemm {

constexpr int kBlockM = DK_GEMM_BLOCK_M;
constexpr int kBlockN = DK_GEMM_BLOCK_N;
constexpr int kBlockK = DK_GEMM_BLOCK_K;
constexpr int kStages = 6;
constexpr int kMathWarpgroups = kBlockM / 64;
constexpr int kThreads = 128 * (1 + kMathWarpgroups);
// setmaxnreg moves registers inside the CTA's pool, fixed at launch (one CTA per SM, registers per
// thread in multiples of 8): the producer's 40 and the consumers' 232 must fit it, or the
// consumers' increase waits forever.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(128 * kProducerRegs + kMathWarpgroups * 128 * kConsumerRegs <= kThreads * ((65536 / kThreads) & ~7),
              "the register split exceeds the CTA's register pool");
constexpr int kWgmmaK = 32;  // K of one FP8 wgmma
constexpr uint32_t kTileABytes = kBlockM * kBlockK;
constexpr uint32_t kTileBBytes = kBlockN * kBlockK;
constexpr uint32_t kSfaBytes = kBlockM * sizeof(float);
static_assert(kBlockK == 128, "one scale block per stage: the promotion interval is 128 of K");
static_assert(kBlockN == 128, "version 1: B's scale row is the same across the whole tile");

struct SharedStorage {
    alignas(1024) uint8_t a[kStages][kTileABytes];  // (BLOCK_M, BLOCK_K) per stage, 128B swizzle
    alignas(1024) uint8_t b[kStages][kTileBBytes];  // (BLOCK_N, BLOCK_K) per stage, 128B swizzle
    alignas(128) float sfa[kStages][kBlockM];       // (BLOCK_M) per stage
    uint64_t full[kStages];
    uint64_t empty[kStages];
};
constexpr size_t kSmemBytes = sizeof(SharedStorage) + 1024;  // + slack to align the base to 1024
// Dynamic plus the masked layout's static snapshot of the per-group tiles and rows.
static_assert(kSmemBytes + (2 * DK_GEMM_MAX_MASKED_GROUPS + 1) * sizeof(int) <= 232448,
              "shared memory plan exceeds Hopper's 227 KiB opt-in limit");

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
};

// Where one output tile's operands live, for every layout.
struct TileInfo {
    int m0, n0;       // tile origin in its group's (or the whole) output
    int a_row;        // first row of A (and D) in the tensor maps
    int sfa_y;        // row of A's scale tensor map for k-block 0
    int expert;       // group whose B rows and scales the tile uses
    int row_limit;    // rows m0 + r < row_limit exist (dense and masked)
    bool skip;        // contiguous: the block is padding or names no valid expert
};

// Maps tile indices to operands. Producer and consumers both use it, so they always agree; the
// masked layout's per-group tiles come from a shared-memory snapshot of masked_m (`tile_prefix`,
// groups + 1 entries: tiles of the groups before each; `rows`: the clamped rows of each group).
template <dk_gemm_layout_t kLayout>
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

    __device__ TileInfo get(int tile) const {
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
            const int m_tiles = ceil_div(p.m, kBlockM);
            t.m0 = (tile % m_tiles) * kBlockM;
            t.n0 = (tile / m_tiles) * kBlockN;
            t.a_row = t.m0;
            t.sfa_y = 0;
            t.row_limit = p.m;
            if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
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
    uint64_t desc = (addr & 0x3ffff) >> 4;     // start address, 16-byte units
    desc |= uint64_t(1) << 16;                 // leading byte offset (unused with this swizzle)
    desc |= uint64_t(1024 >> 4) << 32;         // stride byte offset: one 8-row atom
    desc |= uint64_t(1) << 62;                 // layout: 128-byte swizzle
    return desc;
}

// Position in the ring of pipeline stages: the stage index and the barrier phase parity, which
// flips each time the ring wraps.
struct PipelineState {
    int index = 0;
    uint32_t phase = 0;

    __device__ __forceinline__ void advance() {
        if (++index == kStages) {
            index = 0;
            phase ^= 1;
        }
    }
};

__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
    while (!ptx::mbarrier_try_wait_parity(bar, parity)) {
    }
}

template <dk_gemm_layout_t kLayout>
__global__ void __launch_bounds__(kThreads, 1) fp8_gemm_kernel(const __grid_constant__ KernelParams p) {
    extern __shared__ uint8_t smem_raw[];
    auto& s = *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    const int n_tiles = ceil_div(p.n, kBlockN);
    const int n_blocks = ceil_div(p.n, 128);  // B scale rows per expert
    const int k_blocks = p.k / kBlockK;
    // Masked layout: one snapshot of masked_m per CTA (clamped rows and the tiles' prefix).
    __shared__ int s_tile_prefix[kLayout == DK_GEMM_MASKED ? DK_GEMM_MAX_MASKED_GROUPS + 1 : 1];
    __shared__ int s_rows[kLayout == DK_GEMM_MASKED ? DK_GEMM_MAX_MASKED_GROUPS : 1];
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

    if (threadIdx.x == 0) {
        for (int i = 0; i < kStages; ++i) {
            ptx::mbarrier_init(&s.full[i], 1);
            ptx::mbarrier_init(&s.empty[i], kMathWarpgroups * 4);  // one arrival per consumer warp
        }
        ptx::fence_mbarrier_init();
        ptx::prefetch_tensormap(&p.tma_a);
        ptx::prefetch_tensormap(&p.tma_b);
        ptx::prefetch_tensormap(&p.tma_sfa);
    }
    __syncthreads();
    const Scheduler<kLayout> sched{p, n_tiles, s_tile_prefix, s_rows};
    const int tiles = sched.num_tiles();

    if (wg == 0) {
        // NOTES: the producer needs few registers; give them to the consumers.
        ptx::setmaxnreg_dec<kProducerRegs>();
        if (threadIdx.x != 0) {
            return;
        }
        PipelineState ps;
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const TileInfo t = sched.get(tile);
            if (t.skip) {
                continue;
            }
            const int b_row = t.expert * p.n + t.n0;
            for (int kb = 0; kb < k_blocks; ++kb) {
                const int i = ps.index;
                wait(&s.empty[i], ps.phase ^ 1);
                // Out-of-bounds rows are zero-filled by TMA and still count towards the bytes.
                ptx::mbarrier_arrive_expect_tx(&s.full[i], kTileABytes + kTileBBytes + kSfaBytes);
                ptx::cp_async_bulk_tensor_2d_global_to_shared(s.a[i], &p.tma_a, &s.full[i], kb * kBlockK, t.a_row);
                ptx::cp_async_bulk_tensor_2d_global_to_shared(s.b[i], &p.tma_b, &s.full[i], kb * kBlockK, b_row);
                ptx::cp_async_bulk_tensor_2d_global_to_shared(s.sfa[i], &p.tma_sfa, &s.full[i], t.m0, t.sfa_y + kb);
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
    // wgmma m64nN accumulator layout: this thread holds rows r and r + 8 of its warpgroup's 64,
    // columns 8 j + 2 (lane % 4) + {0, 1} for j = 0 .. N/8 - 1.
    const int r = math_wg * 64 + warp * 16 + lane / 4;
    // Defined before the first wgmma reads it (its scale-d = 0 ignores the value, but the asm
    // operand is read-write).
    float acc[kBlockN / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
        acc[i] = 0.0f;
    }
    PipelineState ps;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const TileInfo t = sched.get(tile);
        if (t.skip) {
            continue;
        }
        const float* sfb = p.sfb + (int64_t(t.expert) * n_blocks + t.n0 / 128) * k_blocks;
        float sum[kBlockN / 2];
#pragma unroll
        for (int i = 0; i < kBlockN / 2; ++i) {
            sum[i] = 0.0f;
        }
        for (int kb = 0; kb < k_blocks; ++kb) {
            const int i = ps.index;
            wait(&s.full[i], ps.phase);
            const float sb = __ldg(sfb + kb);
            const float scale0 = s.sfa[i][r] * sb;
            const float scale1 = s.sfa[i][r + 8] * sb;
            ptx::fence_operands(acc);
            ptx::wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk) {
                const uint64_t desc_a = smem_desc_k_major_sw128(s.a[i] + math_wg * 64 * kBlockK + kk * kWgmmaK);
                const uint64_t desc_b = smem_desc_k_major_sw128(s.b[i] + kk * kWgmmaK);
                ptx::wgmma_m64n128k32_f32_e4m3_e4m3(acc, desc_a, desc_b, kk > 0);
            }
            ptx::wgmma_commit_group();
            ptx::fence_operands(acc);
            ptx::wgmma_wait_group<0>();
            ptx::fence_operands(acc);
            __syncwarp();
            if (lane == 0) {
                ptx::mbarrier_arrive(&s.empty[i]);
            }
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
                sum[4 * j + 0] += acc[4 * j + 0] * scale0;
                sum[4 * j + 1] += acc[4 * j + 1] * scale0;
                sum[4 * j + 2] += acc[4 * j + 2] * scale1;
                sum[4 * j + 3] += acc[4 * j + 3] * scale1;
            }
            ps.advance();
        }
        // NOTES: direct bounds-checked stores; a TMA store of a swizzled smem tile comes later.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = t.m0 + r + 8 * half;  // within the group (masked) or the whole of D
            bool keep = row < t.row_limit;
            if constexpr (kLayout == DK_GEMM_CONTIGUOUS) {
                keep = keep && p.m_indices[row] == t.expert;
            }
            if (!keep) {
                continue;
            }
            const int64_t row_offset = int64_t(t.a_row + r + 8 * half) * p.n;
            // Writes this thread's columns of the row: value(sum, address) gives what to store.
            const auto store = [&](auto* d_row, auto value) {
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j) {
                    const int col = t.n0 + 8 * j + 2 * (lane % 4);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        if (col + h < p.n) {
                            d_row[col + h] = value(sum[4 * j + 2 * half + h], d_row + col + h);
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
}

}  // namespace dk::gemm

extern "C" dk_status_t dk_gemm_fp8(const dk_gemm_fp8_params_t* p, dk_stream_t stream) {
    using namespace dk::gemm;
    if (p == nullptr || p->m < 0 || p->n < 0 || p->k <= 0 || p->k % kBlockK != 0 || p->num_sms < 1 || p->groups < 1) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout == DK_GEMM_CONTIGUOUS && p->m_indices == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout == DK_GEMM_MASKED && (p->masked_m == nullptr || p->max_m < 0 || p->groups > DK_GEMM_MAX_MASKED_GROUPS ||
                                        int64_t(p->groups) * p->max_m != p->m)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout != DK_GEMM_DENSE && p->layout != DK_GEMM_CONTIGUOUS && p->layout != DK_GEMM_MASKED) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->m == 0 || p->n == 0) {
        return DK_STATUS_OK;
    }
    if (p->sfb == nullptr || (p->d == nullptr) == (p->d_f32 == nullptr) || (p->accumulate != 0 && p->d_f32 == nullptr)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    KernelParams kp;
    static_assert(sizeof(CUtensorMap) == sizeof(dk_tensor_map_t), "tensor map size");
    std::memcpy(&kp.tma_a, &p->tma_a, sizeof(CUtensorMap));
    std::memcpy(&kp.tma_b, &p->tma_b, sizeof(CUtensorMap));
    std::memcpy(&kp.tma_sfa, &p->tma_sfa, sizeof(CUtensorMap));
    kp.sfb = p->sfb;
    kp.d = reinterpret_cast<__nv_bfloat16*>(p->d);
    kp.d_f32 = p->d_f32;
    kp.accumulate = p->accumulate != 0;
    kp.m_indices = p->m_indices;
    kp.masked_m = p->masked_m;
    kp.m = p->m;
    kp.n = p->n;
    kp.k = p->k;
    kp.groups = p->groups;
    kp.max_m = p->max_m;
    // Upper bound on tiles (the masked layout's real count is read on the device).
    const int64_t tiles = int64_t(dk::ceil_div(p->m, kBlockM) + (p->layout == DK_GEMM_MASKED ? p->groups : 0)) * dk::ceil_div(p->n, kBlockN);
    if (tiles > INT32_MAX) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const dim3 grid(static_cast<unsigned>(tiles < p->num_sms ? tiles : p->num_sms));
    auto s = reinterpret_cast<cudaStream_t>(stream);
    auto launch = [&](auto kernel) -> dk_status_t {
        const dk_status_t attr =
            dk::status_from_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
        if (attr != DK_STATUS_OK) {
            return attr;
        }
        return dk::checked_launch([&] { kernel<<<grid, kThreads, kSmemBytes, s>>>(kp); });
    };
    switch (p->layout) {
        case DK_GEMM_CONTIGUOUS:
            return launch(fp8_gemm_kernel<DK_GEMM_CONTIGUOUS>);
        case DK_GEMM_MASKED:
            return launch(fp8_gemm_kernel<DK_GEMM_MASKED>);
        default:
            return launch(fp8_gemm_kernel<DK_GEMM_DENSE>);
    }
}
