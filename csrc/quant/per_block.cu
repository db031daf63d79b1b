// Per-block (128x128) FP8 E4M3 quantisation of bf16 weights, DeepSeek-V3 recipe.
// Contract and formula: csrc/include/deepkern.h, dk_quant_per_block_params.
//
// Work split: one CTA of 256 threads per 128x128 block. Thread t owns 8 consecutive columns
// ((t % 16) * 8) of rows t / 16 + 16 i, i = 0..7: a warp reads two full 256-byte block rows per
// step. The block's amax is reduced by warp shuffles, then across the 8 warps in shared memory.
// The raw bf16 stay in registers (8 x 16 bytes) between the two passes.
//
// SASS-EXPECT: per_block_kernel F2FP
#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"
#include "quant/recipe.cuh"

namespace dk::quant {

constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / 32;
constexpr int kColLanes = DK_QUANT_GROUP / 8;             // 16 threads cover a 128-wide row
constexpr int kRowsPerStep = kBlockThreads / kColLanes;   // 16 rows per pass of the CTA
constexpr int kSteps = DK_QUANT_GROUP / kRowsPerStep;     // 8 rows per thread
static_assert(kColLanes * 8 == DK_QUANT_GROUP && kRowsPerStep * kSteps == DK_QUANT_GROUP, "a CTA covers one 128x128 block");

template <bool kUe8m0>
__global__ void __launch_bounds__(kBlockThreads) per_block_kernel(const uint16_t* __restrict__ w,  // [G, n, k]
                                                                  uint8_t* __restrict__ q,         // [G, n, k]
                                                                  float* __restrict__ sf,          // [G, n_blocks, k_blocks]
                                                                  int64_t n,
                                                                  int64_t k,
                                                                  int64_t n_blocks,
                                                                  int64_t k_blocks) {
    DK_SHARED(float[kBlockWarps], warp_amax);
    // Flat block index (g * n_blocks + nb) * k_blocks + kb is also the scale's index.
    const int64_t block = blockIdx.x;
    const int64_t kb = block % k_blocks;
    const int64_t nb = (block / k_blocks) % n_blocks;
    const int64_t g = block / (k_blocks * n_blocks);
    const int64_t rows_here = n - nb * DK_QUANT_GROUP < DK_QUANT_GROUP ? n - nb * DK_QUANT_GROUP : DK_QUANT_GROUP;
    const int col = (threadIdx.x % kColLanes) * 8;
    const int row0 = threadIdx.x / kColLanes;
    // Element offset of (g, nb * 128, kb * 128 + col).
    const int64_t base = (g * n + nb * DK_QUANT_GROUP) * k + kb * DK_QUANT_GROUP + col;

    uint4 raw[kSteps];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
        const int r = row0 + i * kRowsPerStep;
        raw[i] = r < rows_here ? ptx::ld_global_nc_no_allocate_v4(w + base + r * k) : uint4{0, 0, 0, 0};
        float v[8];
        unpack_bf16x8(raw[i], v);
        amax = amax8(amax, v);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    if (threadIdx.x % 32 == 0) {
        warp_amax[threadIdx.x / 32] = amax;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kBlockWarps; ++i) {
        amax = fmaxf(amax, warp_amax[i]);
    }
    const float scale = group_scale<kUe8m0>(amax);
    const float inv = __fdiv_rn(1.0f, scale);
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
        const int r = row0 + i * kRowsPerStep;
        if (r < rows_here) {
            float v[8];
            unpack_bf16x8(raw[i], v);
            *reinterpret_cast<uint2*>(q + base + r * k) = quantize_e4m3x8(v, inv);
        }
    }
    if (threadIdx.x == 0) {
        sf[block] = scale;
    }
}

}  // namespace dk::quant

extern "C" dk_status_t dk_quant_per_block(const dk_quant_per_block_params_t* p, dk_stream_t stream) {
    using namespace dk::quant;
    if (p == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    bool empty = false;
    const dk_status_t checked = check_batch(p->num_groups, p->n, p->k, p->w, p->q, p->sf, &empty);
    if (checked != DK_STATUS_OK || empty) {
        return checked;
    }
    const int64_t n_blocks = dk::ceil_div<int64_t>(p->n, DK_QUANT_GROUP);
    const int64_t k_blocks = p->k / DK_QUANT_GROUP;
    const int64_t blocks = p->num_groups * n_blocks * k_blocks;
    if (blocks > int64_t(0x7fffffff)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const dim3 grid(static_cast<unsigned>(blocks));
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (p->ue8m0) {
        return dk::launch<per_block_kernel<true>>(grid, kBlockThreads, 0, s, p->w, p->q, p->sf, p->n, p->k, n_blocks, k_blocks);
    }
    return dk::launch<per_block_kernel<false>>(grid, kBlockThreads, 0, s, p->w, p->q, p->sf, p->n, p->k, n_blocks, k_blocks);
}
