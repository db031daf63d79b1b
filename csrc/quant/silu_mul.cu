// Fused SwiGLU activation and per-token-group FP8 quantisation, the step between a MoE expert's
// gate/up GEMM and its down GEMM. Contract: csrc/include/deepkern.h, dk_silu_mul_quant_params.
//
// Same work split as the per-token-group quantiser: one half-warp per group of 128 outputs, 8 per
// lane; the lane reads 8 gate and 8 up values (two 16-byte loads), forms
// a = (g / (1 + exp(-g))) * u in f32 with explicit round-to-nearest operations, and the group is
// quantised with the shared recipe into the transposed scale layout the down GEMM's TMA reads.
//
// SASS-EXPECT: silu_mul_quant_kernel F2FP
#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"
#include "quant/recipe.cuh"

namespace dk::quant {

constexpr int kSiluThreads = 256;
constexpr int kSiluLanesPerGroup = 16;
constexpr int kSiluGroupsPerBlock = kSiluThreads / kSiluLanesPerGroup;

template <bool kUe8m0>
__global__ void __launch_bounds__(kSiluThreads) silu_mul_quant_kernel(const uint16_t* __restrict__ h,  // [G, m, 2k]
                                                                      uint8_t* __restrict__ q,         // [G, m, k]
                                                                      float* __restrict__ sf,          // [G, k/128, m_pad]
                                                                      int64_t m,
                                                                      int64_t k_blocks,
                                                                      int64_t m_pad,
                                                                      int64_t total_groups) {
    const int lane = threadIdx.x % 32;
    const int sub = lane % kSiluLanesPerGroup;
    const int64_t k = k_blocks * DK_QUANT_GROUP;
    const int64_t warps_per_grid = int64_t(gridDim.x) * (kSiluThreads / 32);
    const int64_t first_warp = int64_t(blockIdx.x) * (kSiluThreads / 32) + threadIdx.x / 32;
    for (int64_t pair = first_warp; pair * 2 < total_groups; pair += warps_per_grid) {
        const int64_t group = pair * 2 + lane / kSiluLanesPerGroup;
        const bool valid = group < total_groups;
        const int64_t row = group / k_blocks;  // G*m flat row
        const int64_t kb = group % k_blocks;
        const int64_t col = kb * DK_QUANT_GROUP + sub * 8;
        float g[8], u[8], a[8];
        unpack_bf16x8(valid ? ptx::ld_global_nc_no_allocate_v4(h + row * 2 * k + col) : uint4{0, 0, 0, 0}, g);
        unpack_bf16x8(valid ? ptx::ld_global_nc_no_allocate_v4(h + row * 2 * k + k + col) : uint4{0, 0, 0, 0}, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a[i] = __fmul_rn(__fdiv_rn(g[i], __fadd_rn(1.0f, expf(-g[i]))), u[i]);
        }
        float scale;
        const uint2 packed = quantize_half_warp_group<kUe8m0>(a, scale);
        if (valid) {
            *reinterpret_cast<uint2*>(q + row * k + col) = packed;
            if (sub == 0) {
                sf[((row / m) * k_blocks + kb) * m_pad + row % m] = scale;
            }
        }
    }
}

}  // namespace dk::quant

extern "C" dk_status_t dk_silu_mul_quant(const dk_silu_mul_quant_params_t* p, dk_stream_t stream) {
    using namespace dk::quant;
    if (p == nullptr || p->k < 0 || p->k % DK_QUANT_GROUP != 0) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    bool empty = false;
    // The input is [G, m, 2k]: check it as a batch of 2k-wide rows, the outputs as k-wide ones.
    dk_status_t checked = check_batch(p->num_groups, p->m, 2 * p->k, p->h, p->q, p->sf, &empty);
    if (checked != DK_STATUS_OK || empty) {
        return checked;
    }
    const int64_t k_blocks = p->k / DK_QUANT_GROUP;
    const int64_t total_groups = p->num_groups * p->m * k_blocks;
    const int64_t blocks = dk::ceil_div<int64_t>(total_groups, kSiluGroupsPerBlock);
    constexpr int64_t kMax = int64_t(1) << 16;
    const dim3 grid(static_cast<unsigned>(blocks < kMax ? blocks : kMax));
    const int64_t m_pad = dk::tma_aligned_rows(p->m);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (p->ue8m0) {
        return dk::launch<silu_mul_quant_kernel<true>>(grid, kSiluThreads, 0, s, p->h, p->q, p->sf, p->m, k_blocks, m_pad, total_groups);
    }
    return dk::launch<silu_mul_quant_kernel<false>>(grid, kSiluThreads, 0, s, p->h, p->q, p->sf, p->m, k_blocks, m_pad, total_groups);
}
