// MLA split-KV schedule on the device: the same walk as deepkern::plan::mla::schedule (the
// reference; property tests hold them equal bit for bit), so that a decode step including its
// planning can be captured in a CUDA graph. Contract: csrc/include/deepkern.h.
//
// One warp: the lanes sum the cost, lane 0 walks the requests (the walk is inherently serial and
// touches a few words per request).
#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::mla {

__device__ __forceinline__ int64_t tiles(int32_t len) {
    return len > 0 ? dk::ceil_div<int64_t>(len, DK_MLA_KV_BLOCK) : 0;
}

__global__ void __launch_bounds__(32) schedule_kernel(const int32_t* __restrict__ lens,  // [batch]
                                                      int32_t* __restrict__ parts,       // [num_parts, 5]
                                                      int32_t* __restrict__ splits,      // [batch + 1]
                                                      int batch,
                                                      int num_parts) {
    const int lane = threadIdx.x;
    int64_t total = 0;
    for (int r = lane; r < batch; r += 32) {
        total += tiles(lens[r]) + DK_MLA_SPLIT_OVERHEAD;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        total += __shfl_xor_sync(0xffffffffu, total, offset);
    }
    for (int p = lane; p < num_parts; p += 32) {
        int32_t* w = parts + int64_t(p) * DK_MLA_PART_WORDS;
        w[0] = -1;
        w[1] = 0;
        w[2] = -1;
        w[3] = 0;
        w[4] = 0;
    }
    __syncwarp();
    if (lane != 0) {
        return;
    }
    const int64_t budget = dk::ceil_div<int64_t>(total, num_parts) + DK_MLA_SPLIT_OVERHEAD;
    int part = 0;
    int64_t left = budget;
    bool part_open = false;
    splits[0] = 0;
    for (int r = 0; r < batch; ++r) {
        const int64_t n = tiles(lens[r]);
        int64_t begin = 0;
        int split = 0;
        while (true) {
            const int64_t need = n == begin ? DK_MLA_SPLIT_OVERHEAD : DK_MLA_SPLIT_OVERHEAD + 1;
            if (left < need) {
                // Never happens with this budget (see the Rust docs); bounded anyway.
                if (part + 1 >= num_parts) {
                    splits[r + 1] = splits[r] + split;
                    break;
                }
                ++part;
                left = budget;
                part_open = false;
            }
            const int64_t take = (n - begin) < (left - DK_MLA_SPLIT_OVERHEAD) ? (n - begin) : (left - DK_MLA_SPLIT_OVERHEAD);
            int32_t* w = parts + int64_t(part) * DK_MLA_PART_WORDS;
            if (!part_open) {
                w[0] = r;
                w[1] = static_cast<int32_t>(begin);
                w[4] = split;
                part_open = true;
            }
            w[2] = r;
            w[3] = static_cast<int32_t>(begin + take);
            left -= take + DK_MLA_SPLIT_OVERHEAD;
            begin += take;
            ++split;
            if (begin == n) {
                splits[r + 1] = splits[r] + split;
                break;
            }
        }
    }
}

}  // namespace dk::mla

extern "C" dk_status_t dk_mla_schedule(const dk_mla_schedule_params_t* p, dk_stream_t stream) {
    if (p == nullptr || p->batch < 0 || p->num_parts < 1 || p->parts == nullptr || p->splits == nullptr || (p->batch > 0 && p->lens == nullptr)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    auto s = reinterpret_cast<cudaStream_t>(stream);
    return dk::launch<dk::mla::schedule_kernel>(1, 32, 0, s, p->lens, p->parts, p->splits, p->batch, p->num_parts);
}
