// Expert-parallel dispatch layout: per-expert and per-rank counts and the token-in-rank map of
// one rank's top-k routing. Contract: csrc/include/deepkern.h, dk_ep_layout_params.
//
// One thread per token (grid stride). Counts accumulate in shared memory, then one global atomic
// per non-zero counter per block. Integer sums, so the result does not depend on the order.
#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::ep {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;
static_assert(DK_EP_MAX_RANKS <= 64, "the per-token rank set is a 64-bit mask");

__global__ void __launch_bounds__(kThreads) layout_kernel(const int32_t* __restrict__ topk_idx,  // [tokens, k]
                                                          int32_t* __restrict__ tokens_per_rank,   // [ranks]
                                                          int32_t* __restrict__ tokens_per_expert, // [num_experts]
                                                          uint8_t* __restrict__ is_token_in_rank,  // [tokens, ranks]
                                                          int32_t* __restrict__ num_invalid,       // [1]
                                                          int64_t tokens,
                                                          int k,
                                                          int ranks,
                                                          int num_experts) {
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_expert);
    DK_SHARED(int[DK_EP_MAX_RANKS], s_rank);
    DK_SHARED(int, s_invalid);
    for (int i = threadIdx.x; i < num_experts; i += kThreads) {
        s_expert[i] = 0;
    }
    for (int i = threadIdx.x; i < ranks; i += kThreads) {
        s_rank[i] = 0;
    }
    if (threadIdx.x == 0) {
        s_invalid = 0;
    }
    __syncthreads();

    const int experts_per_rank = num_experts / ranks;
    for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * kThreads) {
        uint64_t in_rank = 0;
        for (int j = 0; j < k; ++j) {
            const int e = topk_idx[t * k + j];
            if (e == -1) {
                continue;
            }
            if (e < -1 || e >= num_experts) {
                atomicAdd(&s_invalid, 1);
                continue;
            }
            atomicAdd(&s_expert[e], 1);
            in_rank |= uint64_t(1) << (e / experts_per_rank);
        }
        for (int r = 0; r < ranks; ++r) {
            const bool hit = (in_rank >> r) & 1;
            is_token_in_rank[t * ranks + r] = hit;
            if (hit) {
                atomicAdd(&s_rank[r], 1);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += kThreads) {
        if (s_expert[i] != 0) {
            atomicAdd(&tokens_per_expert[i], s_expert[i]);
        }
    }
    for (int i = threadIdx.x; i < ranks; i += kThreads) {
        if (s_rank[i] != 0) {
            atomicAdd(&tokens_per_rank[i], s_rank[i]);
        }
    }
    if (threadIdx.x == 0 && s_invalid != 0) {
        atomicAdd(num_invalid, s_invalid);
    }
}

}  // namespace dk::ep

extern "C" dk_status_t dk_ep_layout(const dk_ep_layout_params_t* p, dk_stream_t stream) {
    using namespace dk::ep;
    if (p == nullptr || p->tokens < 0 || p->k < 1 || p->ranks < 1 || p->ranks > DK_EP_MAX_RANKS || p->num_experts < 1 ||
        p->num_experts > DK_EP_MAX_EXPERTS || p->num_experts % p->ranks != 0) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->tokens_per_rank == nullptr || p->tokens_per_expert == nullptr || p->num_invalid == nullptr ||
        (p->tokens > 0 && (p->topk_idx == nullptr || p->is_token_in_rank == nullptr))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->tokens > (int64_t(1) << 40)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    auto s = reinterpret_cast<cudaStream_t>(stream);
    // Counters are accumulated with atomics: zero them first, on the same stream.
    cudaMemsetAsync(p->tokens_per_rank, 0, sizeof(int32_t) * p->ranks, s);
    cudaMemsetAsync(p->tokens_per_expert, 0, sizeof(int32_t) * p->num_experts, s);
    cudaMemsetAsync(p->num_invalid, 0, sizeof(int32_t), s);
    if (p->tokens == 0) {
        return dk::status_from_cuda(cudaGetLastError());
    }
    const int64_t blocks = dk::ceil_div<int64_t>(p->tokens, kThreads);
    const dim3 grid(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
    return dk::launch<layout_kernel>(grid, kThreads, 0, s, p->topk_idx, p->tokens_per_rank, p->tokens_per_expert, p->is_token_in_rank, p->num_invalid, p->tokens, p->k, p->ranks, p->num_experts);
}
