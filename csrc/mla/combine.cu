// MLA split-KV combine: merges per-chunk partial outputs by their log-sum-exp.
// Contract: csrc/include/deepkern.h, dk_mla_combine_params; CPU twin: reference::mla::merge.
//
// Grid (batch, ceil(rows / 8)); 8 warps per block, one warp per (request, row). Each lane owns 16
// of the 512 output columns (four 16-byte loads per chunk). Reading the chunk range from device
// memory keeps the launch graph-capturable; every index is checked against num_chunks first.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::mla {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kColsPerLane = DK_MLA_HEAD_DIM_V / 32;  // 16 floats
static_assert(kColsPerLane % 4 == 0, "lanes load float4s");

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* __restrict__ o_partial,    // [chunks, rows, 512]
                                                           const float* __restrict__ lse_partial,  // [chunks, rows]
                                                           const int32_t* __restrict__ splits,     // [batch + 1]
                                                           T* __restrict__ out,                    // [batch, rows, 512]
                                                           float* __restrict__ lse,                // [batch, rows]
                                                           int32_t* __restrict__ num_invalid,      // [1]
                                                           int rows,
                                                           int num_chunks) {
    const int b = blockIdx.x;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.y * kWarps + warp;
    const int begin = splits[b];
    const int end = splits[b + 1];
    if (begin < 0 || end < begin || end > num_chunks) {
        if (threadIdx.x == 0 && blockIdx.y == 0) {
            atomicAdd(num_invalid, 1);
        }
        return;
    }
    if (end - begin <= 1 || row >= rows) {
        return;  // written directly by the decode kernel, or a padding warp
    }

    float max_lse = -INFINITY;
    for (int c = begin + lane; c < end; c += 32) {
        max_lse = fmaxf(max_lse, lse_partial[int64_t(c) * rows + row]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
    }
    float sum = 0.0f;
    if (max_lse != -INFINITY) {
        for (int c = begin + lane; c < end; c += 32) {
            sum += expf(lse_partial[int64_t(c) * rows + row] - max_lse);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    const float total = max_lse == -INFINITY ? -INFINITY : max_lse + logf(sum);

    float acc[kColsPerLane] = {};
    if (total != -INFINITY) {
        for (int c = begin; c < end; ++c) {
            const float w = expf(lse_partial[int64_t(c) * rows + row] - total);
            const float4* src = reinterpret_cast<const float4*>(o_partial + (int64_t(c) * rows + row) * DK_MLA_HEAD_DIM_V) + lane;
#pragma unroll
            for (int i = 0; i < kColsPerLane / 4; ++i) {
                // Column block i of this lane: columns 4 * (lane + 32 i) .. +4, coalesced per warp.
                const float4 v = src[32 * i];
                acc[4 * i] += w * v.x;
                acc[4 * i + 1] += w * v.y;
                acc[4 * i + 2] += w * v.z;
                acc[4 * i + 3] += w * v.w;
            }
        }
    }
    T* dst = out + (int64_t(b) * rows + row) * DK_MLA_HEAD_DIM_V;
#pragma unroll
    for (int i = 0; i < kColsPerLane / 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            dst[4 * (lane + 32 * i) + j] = from_float<T>(acc[4 * i + j]);
        }
    }
    if (lane == 0) {
        lse[int64_t(b) * rows + row] = total;
    }
}

}  // namespace dk::mla

extern "C" dk_status_t dk_mla_combine(const dk_mla_combine_params_t* p, dk_stream_t stream) {
    using namespace dk::mla;
    if (p == nullptr || p->batch < 0 || p->rows < 1 || p->num_chunks < 0 || p->splits == nullptr || p->num_invalid == nullptr ||
        (p->dtype != DK_DTYPE_BF16 && p->dtype != DK_DTYPE_F16)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    auto s = reinterpret_cast<cudaStream_t>(stream);
    cudaMemsetAsync(p->num_invalid, 0, sizeof(int32_t), s);
    if (p->batch == 0) {
        return dk::status_from_cuda(cudaGetLastError());
    }
    if (p->o_partial == nullptr || p->lse_partial == nullptr || p->out == nullptr || p->lse == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (!dk::is_aligned(p->o_partial, 16) || !dk::is_aligned(p->out, 16)) {
        return DK_STATUS_MISALIGNED;
    }
    const dim3 grid(static_cast<unsigned>(p->batch), static_cast<unsigned>(dk::ceil_div(p->rows, kWarps)));
    if (grid.y > 65535) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->dtype == DK_DTYPE_BF16) {
        return dk::launch<combine_kernel<__nv_bfloat16>>(grid, kThreads, 0, s, p->o_partial, p->lse_partial, p->splits,
                                                         static_cast<__nv_bfloat16*>(p->out), p->lse, p->num_invalid, p->rows, p->num_chunks);
    }
    return dk::launch<combine_kernel<__half>>(grid, kThreads, 0, s, p->o_partial, p->lse_partial, p->splits, static_cast<__half*>(p->out),
                                              p->lse, p->num_invalid, p->rows, p->num_chunks);
}
