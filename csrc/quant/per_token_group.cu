// Per-token-group (1x128) FP8 E4M3 quantisation of bf16 activations, DeepSeek-V3 recipe.
// Contract and formula: csrc/include/deepkern.h, dk_quant_per_token_group_params.
//
// Work split: one half-warp (16 lanes) per group of 128 elements; each lane owns 8 consecutive
// elements (one 16-byte load, one 8-byte store). Consecutive half-warps take consecutive groups,
// so a warp reads 512 contiguous bytes per step. Scales go to the transposed, TMA-aligned layout.
//
// SASS-EXPECT: per_token_group_kernel F2FP
#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"
#include "quant/recipe.cuh"

namespace dk::quant {

constexpr int kThreads = 256;
constexpr int kLanesPerGroup = 16;
constexpr int kElemsPerLane = DK_QUANT_GROUP / kLanesPerGroup;  // 8 bf16 = 16 bytes
constexpr int kGroupsPerBlock = kThreads / kLanesPerGroup;
static_assert(kElemsPerLane == 8, "each lane loads exactly 16 bytes of bf16");

// Grid-stride over pairs of groups (one pair per warp), so that every lane of a warp takes part in
// every shuffle even when the group count is odd.
template <bool kUe8m0>
__global__ void __launch_bounds__(kThreads) per_token_group_kernel(const uint16_t* __restrict__ x,  // [G, m, k]
                                                                   uint8_t* __restrict__ q,         // [G, m, k]
                                                                   float* __restrict__ sf,          // [G, k/128, m_pad]
                                                                   int64_t m,
                                                                   int64_t k_blocks,
                                                                   int64_t m_pad,
                                                                   int64_t total_groups) {
    const int lane = threadIdx.x % 32;
    const int sub = lane % kLanesPerGroup;  // lane within the half-warp
    const int64_t warps_per_grid = int64_t(gridDim.x) * (kThreads / 32);
    const int64_t first_warp = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;

    for (int64_t pair = first_warp; pair * 2 < total_groups; pair += warps_per_grid) {
        const int64_t group = pair * 2 + lane / kLanesPerGroup;  // (G*m*k_blocks) flat index
        const bool valid = group < total_groups;
        // Contiguous [G, m, k] with k = 128 * k_blocks: group g starts at element g * 128.
        const int64_t elem = group * DK_QUANT_GROUP + sub * kElemsPerLane;

        float v[kElemsPerLane];
        unpack_bf16x8(valid ? ptx::ld_global_nc_no_allocate_v4(x + elem) : uint4{0, 0, 0, 0}, v);
        float scale;
        const uint2 packed = quantize_half_warp_group<kUe8m0>(v, scale);
        if (valid) {
            *reinterpret_cast<uint2*>(q + elem) = packed;
            if (sub == 0) {
                const int64_t row = group / k_blocks;  // G*m flat row
                const int64_t kb = group % k_blocks;
                const int64_t g = row / m;
                const int64_t r = row % m;
                sf[(g * k_blocks + kb) * m_pad + r] = scale;
            }
        }
    }
}

// Enough blocks to fill any Hopper part many times over; larger problems loop in the grid stride.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

}  // namespace dk::quant

extern "C" dk_status_t dk_quant_per_token_group(const dk_quant_per_token_group_params_t* p, dk_stream_t stream) {
    using namespace dk::quant;
    if (p == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    bool empty = false;
    const dk_status_t checked = check_batch(p->num_groups, p->m, p->k, p->x, p->q, p->sf, &empty);
    if (checked != DK_STATUS_OK || empty) {
        return checked;
    }
    const int64_t k_blocks = p->k / DK_QUANT_GROUP;
    const int64_t total_groups = p->num_groups * p->m * k_blocks;
    const int64_t blocks = dk::ceil_div<int64_t>(total_groups, kGroupsPerBlock);
    const dim3 grid(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
    const int64_t m_pad = dk::tma_aligned_rows(p->m);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (p->ue8m0) {
        return dk::launch<per_token_group_kernel<true>>(grid, kThreads, 0, s, p->x, p->q, p->sf, p->m, k_blocks, m_pad, total_groups);
    }
    return dk::launch<per_token_group_kernel<false>>(grid, kThreads, 0, s, p->x, p->q, p->sf, p->m, k_blocks, m_pad, total_groups);
}
