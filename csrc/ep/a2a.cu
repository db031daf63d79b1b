// Expert-parallel all-to-all: dispatch (normal and low-latency) and combine over a group of ranks
// whose symmetric buffers are reachable through a device table of peer pointers. Contract and
// buffer layout: csrc/include/deepkern.h (dk_ep_group_t and the dk_ep_* launchers); pseudocode:
// docs/kernels/ep_dispatch_combine.md; CPU twin: deepkern::reference::ep.
//
// Every phase is its own launch and never waits for work of a later phase, so running all ranks'
// send phases and then all ranks' receive phases, even one after another on one stream, cannot
// deadlock: the receive buffers are fixed and sized for the worst case.
//
// Data-moving kernels: one warp per token (send) or per row (receive), 16-byte vector copies.
// Every index read from device memory is range-checked before it is used as an address.
//
// Waits poll with relaxed loads and a sleep, then acquire once (no cache invalidation per poll):
// SASS-EXPECT: recv_kernel NANOSLEEP
// SASS-EXPECT: ep::dispatch_send_kernel NANOSLEEP
// SASS-EXPECT: wait_kernel NANOSLEEP
// SASS-EXPECT: barrier_kernel NANOSLEEP
#include <cuda_bf16.h>

#include <cstdint>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::ep {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Error bits a rank publishes to its peers with every signal (DK_EP_ERROR_PEER is local only).
constexpr uint32_t kPublishedErrors = DK_EP_ERROR_TIMEOUT | DK_EP_ERROR_OVERFLOW;
// Longest sleep between two polls of a flag.
constexpr uint32_t kMaxPollSleepNs = 1024;
// Rows per arrival counter of the receive (the contiguous GEMM's 128-row block).
constexpr int kArrivalRows = DK_ARRIVAL_ROWS;

static_assert(DK_EP_MAX_RANKS <= kThreads, "one waiting thread per rank");
static_assert(DK_EP_MAX_TOPK <= 32, "one lane per top-k slot");

template <typename T>
__device__ __forceinline__ T* region(void* base, int64_t offset) {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(base) + offset);
}

__device__ __forceinline__ void* peer(const dk_ep_group_t& g, int r) {
    return g.peers[r];
}

__device__ __forceinline__ uint32_t* own_signals(const dk_ep_group_t& g) {
    return region<uint32_t>(peer(g, g.rank), g.off_signals);
}

__device__ __forceinline__ int64_t row_bytes(const dk_ep_group_t& g) {
    return g.payload == DK_EP_PAYLOAD_FP8 ? int64_t(g.hidden) : int64_t(g.hidden) * 2;
}

__device__ __forceinline__ void raise_error(const dk_ep_group_t& g, uint32_t bits) {
    atomicOr(own_signals(g) + DK_EP_ERROR_WORD, bits);
}

__device__ __forceinline__ bool reached(uint32_t flag, uint32_t epoch) {
    return static_cast<int32_t>(flag - epoch) >= 0;
}

// Waits until every rank's signal of `kind` in this rank's buffer reached the epoch: one thread per
// rank polls its flag with relaxed loads and a growing sleep, then orders what follows with a
// single acquire; the whole block continues after a block barrier. Returns false (in every thread)
// if some rank did not signal within timeout_ns: the error word gets DK_EP_ERROR_TIMEOUT and the
// timeout word the first (kind, source) that did not arrive.
__device__ __forceinline__ bool wait_all(const dk_ep_group_t& g, int kind) {
    DK_SHARED(int, s_missing);
    if (threadIdx.x == 0) {
        s_missing = 0;
    }
    __syncthreads();
    if (threadIdx.x < g.ranks) {
        const uint32_t* flag = own_signals(g) + kind * DK_EP_MAX_RANKS + threadIdx.x;
        if (!reached(ptx::ld_relaxed_sys_global_u32(flag), g.epoch)) {
            const uint64_t start = ptx::globaltimer();
            uint32_t sleep = 32;
            while (!reached(ptx::ld_relaxed_sys_global_u32(flag), g.epoch)) {
                if (ptx::globaltimer() - start > static_cast<uint64_t>(g.timeout_ns)) {
                    raise_error(g, DK_EP_ERROR_TIMEOUT);
                    atomicCAS(own_signals(g) + DK_EP_TIMEOUT_WORD, 0u, 1u + static_cast<uint32_t>(kind * DK_EP_MAX_RANKS + threadIdx.x));
                    atomicOr(&s_missing, 1);
                    break;
                }
                __nanosleep(sleep);
                sleep = min(sleep * 2, kMaxPollSleepNs);
            }
        }
        // Acquire: this thread's (and, after the barrier, the block's) later reads see everything
        // the signalling rank wrote before its release.
        (void)ptx::ld_acquire_sys_global_u32(flag);
    }
    __syncthreads();
    return s_missing == 0;
}

// After a wait: whether any rank published error bits with its last signal (its outputs this
// round are then not to be trusted). Every thread gets the same answer.
__device__ __forceinline__ bool peers_failed(const dk_ep_group_t& g) {
    DK_SHARED(int, s_failed);
    if (threadIdx.x == 0) {
        s_failed = 0;
    }
    __syncthreads();
    if (threadIdx.x < g.ranks && (ptx::ld_relaxed_sys_global_u32(own_signals(g) + DK_EP_PEER_ERROR_WORD + threadIdx.x) & kPublishedErrors) != 0) {
        atomicOr(&s_failed, 1);
    }
    __syncthreads();
    return s_failed != 0;
}

// A receive phase's verdict: true when its outputs must be poisoned (its own wait timed out, or a
// rank reported an error; the latter is recorded as DK_EP_ERROR_PEER).
__device__ __forceinline__ bool must_poison(const dk_ep_group_t& g, bool arrived) {
    const bool failed = peers_failed(g);
    if (failed && arrived && blockIdx.x == 0 && threadIdx.x == 0) {
        raise_error(g, DK_EP_ERROR_PEER);
    }
    return !arrived || failed;
}

// True in every thread of the last block of the grid to get here (all other blocks' writes are
// then visible system-wide); resets the completion counter for the next launch.
__device__ __forceinline__ bool last_block_done(const dk_ep_group_t& g, int kind) {
    DK_SHARED(bool, s_last);
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t* done = own_signals(g) + DK_EP_DONE_WORD + kind;
        __threadfence_system();
        const uint32_t prev = atomicAdd(done, 1u);
        s_last = prev == gridDim.x - 1;
        if (s_last) {
            *done = 0;
            __threadfence_system();
        }
    }
    __syncthreads();
    return s_last;
}

// From the last block: publish this rank's error bits, then `kind` at this call's epoch, in every
// peer's slots of this rank; one thread per peer, each store a release (the block barrier orders
// the block's writes before them).
__device__ __forceinline__ void signal_all(const dk_ep_group_t& g, int kind) {
    __syncthreads();
    if (threadIdx.x < g.ranks) {
        const uint32_t errors = ptx::ld_relaxed_sys_global_u32(own_signals(g) + DK_EP_ERROR_WORD) & kPublishedErrors;
        uint32_t* signals = region<uint32_t>(peer(g, threadIdx.x), g.off_signals);
        *static_cast<volatile uint32_t*>(signals + DK_EP_PEER_ERROR_WORD + g.rank) = errors;
        ptx::st_release_sys_global_u32(signals + kind * DK_EP_MAX_RANKS + g.rank, g.epoch);
    }
}

// Copies `bytes` (a multiple of 16) from src to dst with the warp's lanes.
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int64_t bytes, int lane) {
    auto* d = static_cast<uint4*>(dst);
    const auto* s = static_cast<const uint4*>(src);
    for (int64_t i = lane; i < bytes / 16; i += 32) {
        d[i] = s[i];
    }
}

__device__ __forceinline__ void warp_zero(void* dst, int64_t bytes, int lane) {
    auto* d = static_cast<uint4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += 32) {
        d[i] = uint4{0, 0, 0, 0};
    }
}

// Fills `bytes` (a multiple of 16) with 0xff: NaN in bf16, e4m3 and f32.
__device__ __forceinline__ void warp_poison(void* dst, int64_t bytes, int lane) {
    auto* d = static_cast<uint4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += 32) {
        d[i] = uint4{~0u, ~0u, ~0u, ~0u};
    }
}

__device__ __forceinline__ float nan_f32() {
    return __int_as_float(0x7fffffff);
}

__device__ __forceinline__ bool valid_expert(int32_t e, int num_experts) {
    return e >= 0 && e < num_experts;
}

// Inclusive sum over the block of one value per thread; `total` gets the block's sum.
__device__ __forceinline__ int block_inclusive_sum(int v, int& total) {
    DK_SHARED(int[kWarps], s_warp);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, v, o);
        v += lane >= o ? n : 0;
    }
    if (lane == 31) {
        s_warp[warp] = v;
    }
    __syncthreads();
    int before = 0;
    total = 0;
    for (int w = 0; w < kWarps; ++w) {
        before += w < warp ? s_warp[w] : 0;
        total += s_warp[w];
    }
    __syncthreads();
    return v + before;
}

// ---- pair positions ------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    pair_positions_kernel(const int32_t* __restrict__ idx, int32_t* __restrict__ pos, int tokens, int k, int num_experts) {
    const int64_t slots = int64_t(tokens) * k;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < slots; i += int64_t(gridDim.x) * kThreads) {
        if (!valid_expert(idx[i], num_experts)) {
            pos[i] = -1;
        }
    }
    for (int e = blockIdx.x; e < num_experts; e += gridDim.x) {
        int running = 0;
        for (int base = 0; base < tokens; base += kThreads) {
            const int t = base + threadIdx.x;
            int c = 0;
            if (t < tokens) {
                for (int j = 0; j < k; ++j) {
                    c += idx[int64_t(t) * k + j] == e;
                }
            }
            int total;
            const int incl = block_inclusive_sum(c, total);
            if (c != 0) {
                int p = running + incl - c;
                for (int j = 0; j < k; ++j) {
                    if (idx[int64_t(t) * k + j] == e) {
                        pos[int64_t(t) * k + j] = p++;
                    }
                }
            }
            running += total;
        }
    }
}

// ---- normal dispatch ------------------------------------------------------------------------

// Parity slot of the notify of the group's epoch: the counts region and the notify words have two
// (see the header: a rank is at most one round ahead of a peer that still reads them).
__device__ __forceinline__ int notify_slot(const dk_ep_group_t& g) {
    return static_cast<int>(g.epoch & 1u);
}

// The counts table [ranks, num_experts] of the epoch's parity in the buffer at `base`.
__device__ __forceinline__ int32_t* counts_of(const dk_ep_group_t& g, void* base) {
    return region<int32_t>(base, g.off_counts) + int64_t(notify_slot(g)) * g.ranks * g.num_experts;
}

__global__ void __launch_bounds__(kThreads)
    notify_kernel(dk_ep_group_t g, const int32_t* __restrict__ tokens_per_expert, const int32_t* __restrict__ num_invalid) {
    const int slot = notify_slot(g) * DK_EP_NOTIFY_SLOT_WORDS + g.rank;
    const uint32_t errors = ptx::ld_relaxed_sys_global_u32(own_signals(g) + DK_EP_ERROR_WORD) & kPublishedErrors;
    for (int r = 0; r < g.ranks; ++r) {
        int32_t* dst = counts_of(g, peer(g, r)) + int64_t(g.rank) * g.num_experts;
        for (int e = threadIdx.x; e < g.num_experts; e += kThreads) {
            dst[e] = tokens_per_expert[e];
        }
        if (threadIdx.x == 0) {
            uint32_t* signals = region<uint32_t>(peer(g, r), g.off_signals);
            signals[DK_EP_NOTIFY_INVALID_WORD + slot] = static_cast<uint32_t>(*num_invalid);
            signals[DK_EP_NOTIFY_ERROR_WORD + slot] = errors;
        }
    }
    if (last_block_done(g, DK_EP_SIGNAL_NOTIFY)) {
        signal_all(g, DK_EP_SIGNAL_NOTIFY);
    }
}

// For every expert, the first row of this rank's pairs on the expert's rank (s_base), and for
// every rank the rows its local experts fill (s_rows), from the all-gathered counts.
__device__ __forceinline__ void plan_rows(const dk_ep_group_t& g, int* s_base, int* s_pad, int64_t* s_rows) {
    const int32_t* counts = counts_of(g, peer(g, g.rank));
    for (int e = threadIdx.x; e < g.num_experts; e += kThreads) {
        int total = 0, before = 0;
        for (int s = 0; s < g.ranks; ++s) {
            const int c = max(counts[int64_t(s) * g.num_experts + e], 0);
            total += c;
            before += s < g.rank ? c : 0;
        }
        s_base[e] = before;
        s_pad[e] = round_up(total, g.m_align);
    }
    __syncthreads();
    const int el = g.num_experts / g.ranks;
    if (threadIdx.x < g.ranks) {
        int64_t offset = 0;
        for (int le = 0; le < el; ++le) {
            const int e = threadIdx.x * el + le;
            const int64_t base = offset + s_base[e];
            s_base[e] = static_cast<int>(base < INT32_MAX ? base : INT32_MAX);
            offset += s_pad[e];
        }
        s_rows[threadIdx.x] = offset;
    }
    __syncthreads();
}

enum class Send { kNormal, kLowLatency, kStaged };

// Exclusive prefix over experts of this rank's tokens_per_expert (negative counts as 0): the first
// outbox row of each expert in staged mode. One thread sums (at most DK_EP_MAX_EXPERTS entries).
__device__ __forceinline__ void outbox_prefix(const dk_ep_group_t& g, const int32_t* tokens_per_expert, int* s_prefix) {
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int e = 0; e < g.num_experts; ++e) {
            s_prefix[e] = sum;
            sum += max(tokens_per_expert[e], 0);
        }
    }
    __syncthreads();
}

// One warp per token: the lanes of the token's slots resolve where their pair goes, then the warp
// writes the payload row to every destination of the token. Normal: the pair's final row on the
// expert's rank (s_base from the all-gathered counts); low latency: the expert's per-source staging
// row on the expert's rank; staged: this rank's outbox row s_base[e] + pair_pos.
template <Send kMode>
__device__ __forceinline__ void send_tokens(const dk_ep_group_t& g, const dk_ep_tokens_t& in, const int* s_base, const int64_t* s_rows) {
    const int lane = threadIdx.x % 32;
    const int el = g.num_experts / g.ranks;
    const int64_t bytes = row_bytes(g);
    const int scale_groups = g.hidden / DK_QUANT_GROUP;
    const int64_t stage_rows = kMode == Send::kLowLatency ? int64_t(g.num_experts) * g.ll_max_tokens : g.recv_rows;
    const int64_t outbox_rows = int64_t(g.max_tokens) * g.max_topk;
    int64_t off_x = g.off_recv_x, off_sf = g.off_recv_sf, off_weight = g.off_recv_weight, off_src = g.off_recv_src;
    if (kMode == Send::kLowLatency) {
        off_x = g.off_ll_x, off_sf = g.off_ll_sf, off_src = g.off_ll_src;
    } else if (kMode == Send::kStaged) {
        off_x = g.off_out_x, off_sf = g.off_out_sf, off_weight = g.off_out_weight, off_src = g.off_out_src;
    }
    // tokens <= max_tokens < 2^31 (the launcher checks it).
    for (int t = blockIdx.x * kWarps + threadIdx.x / 32; t < in.tokens; t += gridDim.x * kWarps) {
        void* dst_base = nullptr;
        int64_t row = 0;
        if (lane < in.k) {
            const int32_t e = in.topk_idx[int64_t(t) * in.k + lane];
            const int32_t p = valid_expert(e, g.num_experts) ? in.pair_pos[int64_t(t) * in.k + lane] : -1;
            if (p >= 0) {
                const int d = e / el, le = e % el;
                bool fits;
                if (kMode == Send::kLowLatency) {
                    row = (int64_t(le) * g.ranks + g.rank) * g.ll_max_tokens + p;
                    fits = p < g.ll_max_tokens;
                } else if (kMode == Send::kStaged) {
                    row = int64_t(s_base[e]) + p;
                    fits = row < outbox_rows;
                } else {
                    row = int64_t(s_base[e]) + p;
                    fits = s_rows[d] <= g.recv_rows && row < g.recv_rows;
                }
                if (fits) {
                    dst_base = peer(g, kMode == Send::kStaged ? g.rank : d);
                } else {
                    raise_error(g, DK_EP_ERROR_OVERFLOW);
                }
            }
        }
        if (dst_base != nullptr) {
            const int32_t src = static_cast<int32_t>((int64_t(g.rank) * g.max_tokens + t) * g.max_topk + lane);
            region<int32_t>(dst_base, off_src)[row] = src;
            if (kMode != Send::kLowLatency) {
                region<float>(dst_base, off_weight)[row] = in.topk_weights[int64_t(t) * in.k + lane];
            }
            if (g.payload == DK_EP_PAYLOAD_FP8) {
                float* sf = region<float>(dst_base, off_sf);
                for (int kb = 0; kb < scale_groups; ++kb) {
                    // The outbox keeps a row's scales together, so one destination's rows are one
                    // contiguous run; the peer-written regions are [hidden / 128, rows].
                    const int64_t at = kMode == Send::kStaged ? row * scale_groups + kb : kb * stage_rows + row;
                    sf[at] = in.x_sf[kb * in.x_sf_stride + t];
                }
            }
        }
        const uint8_t* x = static_cast<const uint8_t*>(in.x) + int64_t(t) * bytes;
        unsigned mask = __ballot_sync(0xffffffffu, dst_base != nullptr);
        while (mask != 0) {
            const int j = __ffs(mask) - 1;
            mask &= mask - 1;
            const auto base = static_cast<uintptr_t>(__shfl_sync(0xffffffffu, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(dst_base)), j));
            const int64_t r = __shfl_sync(0xffffffffu, row, j);
            uint8_t* dst = reinterpret_cast<uint8_t*>(base) + off_x + r * bytes;
            warp_copy(dst, x, bytes, lane);
        }
    }
}

__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(dk_ep_group_t g, dk_ep_tokens_t in) {
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_base);
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_pad);
    DK_SHARED(int64_t[DK_EP_MAX_RANKS], s_rows);
    if (g.staged) {
        // Nothing to wait for and nothing to signal: the caller moves the outbox.
        outbox_prefix(g, in.tokens_per_expert, s_base);
        send_tokens<Send::kStaged>(g, in, s_base, nullptr);
        return;
    }
    // The counts are this round's only once every rank's NOTIFY arrived; without them nothing is
    // sent, and the timeout published with the signal makes every receiver poison its outputs.
    if (wait_all(g, DK_EP_SIGNAL_NOTIFY)) {
        plan_rows(g, s_base, s_pad, s_rows);
        send_tokens<Send::kNormal>(g, in, s_base, s_rows);
    }
    if (last_block_done(g, DK_EP_SIGNAL_DISPATCH)) {
        signal_all(g, DK_EP_SIGNAL_DISPATCH);
    }
}

// Segment of local expert `le`: rows [s_off[le], s_off[le] + s_pad) of which s_cnt[le] are valid.
__device__ __forceinline__ int find_segment(const int64_t* s_off, int el, int64_t row) {
    int lo = 0, hi = el - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s_off[mid] <= row) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Staged mode: where output row (local expert le, offset q inside its valid rows) sits in the
// source-major inbox. s_before[le * ranks + s]: rows of lower sources in le's segment;
// s_inner[s * el + le]: source s's rows of lower local experts; s_inbase[s]: source s's block.
__device__ __forceinline__ int64_t inbox_row(const dk_ep_group_t& g, const int* s_before, const int* s_inner, const int64_t* s_inbase,
                                             int el, int le, int64_t q) {
    int s = 0;
    for (int c = 1; c < g.ranks; ++c) {
        s = s_before[le * g.ranks + c] <= q ? c : s;
    }
    return s_inbase[s] + s_inner[s * el + le] + (q - s_before[le * g.ranks + s]);
}

// A poisoned receive: every row keeps its place in the layout (the GEMM still runs on it), with
// NaN payload, scales and weight and no source (combine sends nothing back for it); padding rows
// are zero as usual. Arrival counters still count every row.
__device__ __forceinline__ void poison_rows(const dk_ep_dispatch_recv_params_t& p, const int64_t* s_off, const int* s_cnt, int el) {
    const dk_ep_group_t& g = p.group;
    const int lane = threadIdx.x % 32;
    const int64_t bytes = row_bytes(g);
    const int scale_groups = g.hidden / DK_QUANT_GROUP;
    for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.rows; r += int64_t(gridDim.x) * kWarps) {
        const int le = find_segment(s_off, el, r);
        const bool row = r - s_off[le] < s_cnt[le];
        if (lane == 0) {
            p.m_indices[r] = row ? le : -1;
            p.weights[r] = row ? nan_f32() : 0.0f;
            p.src[r] = -1;
            if (g.staged) {
                p.stage_rows[r] = -1;
            }
        }
        if (g.payload == DK_EP_PAYLOAD_FP8) {
            for (int kb = lane; kb < scale_groups; kb += 32) {
                p.sf[kb * p.rows + r] = row ? nan_f32() : 0.0f;
            }
        }
        uint8_t* x = static_cast<uint8_t*>(p.x) + r * bytes;
        if (row) {
            warp_poison(x, bytes, lane);
        } else {
            warp_zero(x, bytes, lane);
        }
        if (p.arrivals != nullptr) {
            __syncwarp();
            if (lane == 0) {
                ptx::red_release_gpu_global_add_s32(p.arrivals + r / kArrivalRows, 1);
            }
        }
    }
}

__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(dk_ep_dispatch_recv_params_t p) {
    const dk_ep_group_t& g = p.group;
    DK_SHARED(int64_t[DK_EP_MAX_EXPERTS], s_off);
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_cnt);
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_before);  // staged only, [le, s]
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_inner);   // staged only, [s, le]
    DK_SHARED(int64_t[DK_EP_MAX_RANKS], s_inbase);  // staged only
    const bool poison = must_poison(g, wait_all(g, DK_EP_SIGNAL_DISPATCH));
    const int el = g.num_experts / g.ranks;
    const int32_t* counts = counts_of(g, peer(g, g.rank));
    const auto count = [&](int s, int le) { return max(counts[int64_t(s) * g.num_experts + g.rank * el + le], 0); };
    for (int le = threadIdx.x; le < el; le += kThreads) {
        int total = 0;
        for (int s = 0; s < g.ranks; ++s) {
            if (g.staged) {
                s_before[le * g.ranks + s] = total;
            }
            total += count(s, le);
        }
        s_cnt[le] = total;
    }
    if (g.staged && threadIdx.x < g.ranks) {
        const int s = threadIdx.x;
        int inner = 0;
        for (int le = 0; le < el; ++le) {
            s_inner[s * el + le] = inner;
            inner += count(s, le);
        }
        s_inbase[s] = inner;  // this source's block size; turned into offsets below
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t offset = 0;
        for (int le = 0; le < el; ++le) {
            s_off[le] = offset;
            offset += round_up(s_cnt[le], g.m_align);
        }
        if (g.staged) {
            int64_t base = 0;
            for (int s = 0; s < g.ranks; ++s) {
                const int64_t n = s_inbase[s];
                s_inbase[s] = base;
                base += n;
            }
        }
    }
    __syncthreads();
    if (blockIdx.x == 0) {
        for (int le = threadIdx.x; le < el; le += kThreads) {
            p.counts[le] = s_cnt[le];
        }
    }
    void* base = peer(g, g.rank);
    const int lane = threadIdx.x % 32;
    const int64_t bytes = row_bytes(g);
    const int scale_groups = g.hidden / DK_QUANT_GROUP;
    const int64_t stride = int64_t(gridDim.x) * kWarps;
    if (poison) {
        poison_rows(p, s_off, s_cnt, el);
        return;
    }
    for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.rows; r += stride) {
        const int le = find_segment(s_off, el, r);
        const int64_t q = r - s_off[le];
        const int64_t at = g.staged ? inbox_row(g, s_before, s_inner, s_inbase, el, le, q) : r;
        const bool valid = q < s_cnt[le] && at < g.recv_rows;
        if (lane == 0) {
            p.m_indices[r] = valid ? le : -1;
            p.weights[r] = valid ? region<float>(base, g.off_recv_weight)[at] : 0.0f;
            p.src[r] = valid ? region<int32_t>(base, g.off_recv_src)[at] : -1;
            if (g.staged) {
                p.stage_rows[r] = valid ? static_cast<int32_t>(at) : -1;
            }
        }
        if (g.payload == DK_EP_PAYLOAD_FP8) {
            const float* sf = region<float>(base, g.off_recv_sf);
            for (int kb = lane; kb < scale_groups; kb += 32) {
                const int64_t from = g.staged ? at * scale_groups + kb : kb * g.recv_rows + at;
                p.sf[kb * p.rows + r] = valid ? sf[from] : 0.0f;
            }
        }
        uint8_t* x = static_cast<uint8_t*>(p.x) + r * bytes;
        if (valid) {
            warp_copy(x, region<uint8_t>(base, g.off_recv_x) + at * bytes, bytes, lane);
        } else {
            warp_zero(x, bytes, lane);
        }
        if (p.arrivals != nullptr) {
            // The whole warp's writes of this row (ordered before lane 0 by the warp barrier), then
            // one release add per row, cumulative over them: a GEMM acquiring the block's count of
            // 128 sees every row of it.
            __syncwarp();
            if (lane == 0) {
                ptx::red_release_gpu_global_add_s32(p.arrivals + r / kArrivalRows, 1);
            }
        }
    }
}

// ---- low-latency dispatch -------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) ll_dispatch_send_kernel(dk_ep_group_t g, dk_ep_tokens_t in) {
    send_tokens<Send::kLowLatency>(g, in, nullptr, nullptr);
    if (last_block_done(g, DK_EP_SIGNAL_LL_DISPATCH)) {
        const int el = g.num_experts / g.ranks;
        for (int e = threadIdx.x; e < g.num_experts; e += kThreads) {
            const int c = min(max(in.tokens_per_expert[e], 0), g.ll_max_tokens);
            region<int32_t>(peer(g, e / el), g.off_ll_counts)[(e % el) * g.ranks + g.rank] = c;
        }
        signal_all(g, DK_EP_SIGNAL_LL_DISPATCH);
    }
}

__global__ void __launch_bounds__(kThreads) ll_dispatch_recv_kernel(dk_ep_ll_dispatch_recv_params_t p) {
    const dk_ep_group_t& g = p.group;
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_prefix);  // [le, s]: rows of sources before s
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_total);
    const bool poison = must_poison(g, wait_all(g, DK_EP_SIGNAL_LL_DISPATCH));
    void* base = peer(g, g.rank);
    const int el = g.num_experts / g.ranks;
    const int32_t* counts = region<int32_t>(base, g.off_ll_counts);
    const int lane = threadIdx.x % 32;
    const int64_t bytes = row_bytes(g);
    const int scale_groups = g.hidden / DK_QUANT_GROUP;
    const int64_t capacity = int64_t(g.ranks) * g.ll_max_tokens;
    const int64_t stage_rows = int64_t(el) * capacity;
    const int64_t stride = int64_t(gridDim.x) * kWarps;
    if (poison) {
        // Every row of every expert is valid and NaN, with no source: the masked GEMM computes NaN
        // and combine sends nothing back.
        for (int le = blockIdx.x * kThreads + threadIdx.x; le < el; le += gridDim.x * kThreads) {
            p.masked_m[le] = static_cast<int32_t>(capacity);
        }
        for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < stage_rows; r += stride) {
            const int64_t le = r / capacity, row = r % capacity;
            if (lane == 0) {
                p.src[r] = -1;
            }
            if (g.payload == DK_EP_PAYLOAD_FP8) {
                for (int kb = lane; kb < scale_groups; kb += 32) {
                    p.sf[(le * scale_groups + kb) * p.sf_stride + row] = nan_f32();
                }
            }
            warp_poison(static_cast<uint8_t*>(p.x) + r * bytes, bytes, lane);
        }
        return;
    }
    for (int le = threadIdx.x; le < el; le += kThreads) {
        int sum = 0;
        for (int s = 0; s < g.ranks; ++s) {
            s_prefix[le * g.ranks + s] = sum;
            sum += min(max(counts[le * g.ranks + s], 0), g.ll_max_tokens);
        }
        s_total[le] = sum;
    }
    __syncthreads();
    if (blockIdx.x == 0) {
        for (int le = threadIdx.x; le < el; le += kThreads) {
            p.masked_m[le] = s_total[le];
        }
    }
    for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < stage_rows; r += stride) {
        const int le = static_cast<int>(r / capacity);
        const int64_t in_expert = r % capacity;
        const int s = static_cast<int>(in_expert / g.ll_max_tokens);
        const int pos = static_cast<int>(in_expert % g.ll_max_tokens);
        // Rows past the expert's total get src -1 (one pass over the output rows).
        if (lane == 0 && in_expert >= s_total[le]) {
            p.src[le * capacity + in_expert] = -1;
        }
        if (pos >= min(max(counts[le * g.ranks + s], 0), g.ll_max_tokens)) {
            continue;
        }
        const int64_t out_row = s_prefix[le * g.ranks + s] + pos;
        if (lane == 0) {
            p.src[le * capacity + out_row] = region<int32_t>(base, g.off_ll_src)[r];
        }
        if (g.payload == DK_EP_PAYLOAD_FP8) {
            const float* sf = region<float>(base, g.off_ll_sf);
            for (int kb = lane; kb < scale_groups; kb += 32) {
                p.sf[(int64_t(le) * scale_groups + kb) * p.sf_stride + out_row] = sf[kb * stage_rows + r];
            }
        }
        warp_copy(static_cast<uint8_t*>(p.x) + (le * capacity + out_row) * bytes, region<uint8_t>(base, g.off_ll_x) + r * bytes, bytes, lane);
    }
}

__global__ void __launch_bounds__(kThreads) wait_kernel(dk_ep_group_t g, int kind) {
    wait_all(g, kind);
}

__global__ void __launch_bounds__(kThreads) barrier_kernel(dk_ep_group_t g) {
    signal_all(g, DK_EP_SIGNAL_BARRIER);
    wait_all(g, DK_EP_SIGNAL_BARRIER);
}

// ---- combine ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) combine_send_kernel(dk_ep_combine_send_params_t p) {
    const dk_ep_group_t& g = p.group;
    const int lane = threadIdx.x % 32;
    const int64_t bytes = int64_t(g.hidden) * 2;
    const int64_t stride = int64_t(gridDim.x) * kWarps;
    for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.rows; r += stride) {
        const int32_t packed = p.src[r];
        if (packed < 0) {
            continue;
        }
        const int j = packed % g.max_topk;
        const int64_t q = packed / g.max_topk;
        const int64_t t = q % g.max_tokens;
        const int64_t s = q / g.max_tokens;
        if (s >= g.ranks) {
            if (lane == 0) {
                raise_error(g, DK_EP_ERROR_OVERFLOW);
            }
            continue;
        }
        uint8_t* dst;
        if (g.staged) {
            const int32_t at = p.stage_rows[r];
            if (at < 0 || at >= g.recv_rows) {
                if (lane == 0) {
                    raise_error(g, DK_EP_ERROR_OVERFLOW);
                }
                continue;
            }
            dst = region<uint8_t>(peer(g, g.rank), g.off_ret) + int64_t(at) * bytes;
        } else {
            dst = region<uint8_t>(peer(g, static_cast<int>(s)), g.off_comb) + (t * g.max_topk + j) * bytes;
        }
        warp_copy(dst, static_cast<const uint8_t*>(p.y) + r * bytes, bytes, lane);
    }
    if (g.staged) {
        return;  // the caller moves ret's blocks back and signals
    }
    if (last_block_done(g, DK_EP_SIGNAL_COMBINE)) {
        signal_all(g, DK_EP_SIGNAL_COMBINE);
    }
}

__global__ void __launch_bounds__(kThreads) combine_recv_kernel(dk_ep_combine_recv_params_t p) {
    const dk_ep_group_t& g = p.group;
    DK_SHARED(int[DK_EP_MAX_EXPERTS], s_prefix);  // staged only
    const bool poison = must_poison(g, wait_all(g, DK_EP_SIGNAL_COMBINE));
    if (g.staged) {
        outbox_prefix(g, p.tokens_per_expert, s_prefix);
    }
    const int64_t comb_rows = int64_t(g.max_tokens) * g.max_topk;
    const __nv_bfloat16* comb = region<__nv_bfloat16>(peer(g, g.rank), g.off_comb);
    const int chunks = g.hidden / 8;  // 8 bf16 = 16 bytes per item
    const int64_t items = int64_t(p.tokens) * chunks;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += int64_t(gridDim.x) * kThreads) {
        const int64_t t = i / chunks;
        const int c = static_cast<int>(i % chunks);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (poison) {
            reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + t * g.hidden)[c] = uint4{~0u, ~0u, ~0u, ~0u};
            continue;
        }
        for (int j = 0; j < p.k; ++j) {
            const int32_t e = p.topk_idx[t * p.k + j];
            if (!valid_expert(e, g.num_experts)) {
                continue;
            }
            int64_t row = t * g.max_topk + j;
            if (g.staged) {
                const int32_t pos = p.pair_pos[t * p.k + j];
                row = int64_t(s_prefix[e]) + pos;
                if (pos < 0 || row >= comb_rows) {
                    continue;
                }
            }
            const float w = p.topk_weights != nullptr ? p.topk_weights[t * p.k + j] : 1.0f;
            const uint4 v = reinterpret_cast<const uint4*>(comb + row * g.hidden)[c];
            const uint32_t words[4] = {v.x, v.y, v.z, v.w};
            for (int h = 0; h < 4; ++h) {
                acc[2 * h] = __fmaf_rn(w, bf16_bits_to_float(words[h] & 0xffffu), acc[2 * h]);
                acc[2 * h + 1] = __fmaf_rn(w, bf16_bits_to_float(words[h] >> 16), acc[2 * h + 1]);
            }
        }
        uint32_t out[4];
        for (int h = 0; h < 4; ++h) {
            const __nv_bfloat162 pair = __floats2bfloat162_rn(acc[2 * h], acc[2 * h + 1]);
            out[h] = *reinterpret_cast<const uint32_t*>(&pair);
        }
        reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + t * g.hidden)[c] = uint4{out[0], out[1], out[2], out[3]};
    }
}

// ---- host side --------------------------------------------------------------------------------

bool group_ok(const dk_ep_group_t& g) {
    if (g.peers == nullptr || g.ranks < 1 || g.ranks > DK_EP_MAX_RANKS || g.rank < 0 || g.rank >= g.ranks) {
        return false;
    }
    if (g.num_experts < 1 || g.num_experts > DK_EP_MAX_EXPERTS || g.num_experts % g.ranks != 0) {
        return false;
    }
    if (g.hidden < DK_QUANT_GROUP || g.hidden % DK_QUANT_GROUP != 0 || g.max_topk < 1 || g.max_topk > DK_EP_MAX_TOPK) {
        return false;
    }
    if (g.max_tokens < 0 || int64_t(g.ranks) * g.max_tokens * g.max_topk >= (int64_t(1) << 31) || g.ll_max_tokens < 0 ||
        g.ll_max_tokens > g.max_tokens) {
        return false;
    }
    if (g.m_align < 4 || g.m_align % 4 != 0 || g.num_sms < 1 || g.recv_rows < 0 || g.timeout_ns <= 0) {
        return false;
    }
    if (g.payload != DK_EP_PAYLOAD_BF16 && g.payload != DK_EP_PAYLOAD_FP8) {
        return false;
    }
    if (g.staged != 0 && (g.staged != 1 || g.recv_rows >= (int64_t(1) << 31))) {
        return false;
    }
    const int64_t offsets[] = {g.off_signals, g.off_counts, g.off_ll_counts, g.off_recv_x, g.off_recv_sf,
                               g.off_recv_weight, g.off_recv_src, g.off_ll_x, g.off_ll_sf, g.off_ll_src,
                               g.off_comb, g.off_out_x, g.off_out_sf, g.off_out_weight, g.off_out_src,
                               g.off_ret};
    for (int64_t o : offsets) {
        if (o < 0 || o % 16 != 0) {
            return false;
        }
    }
    return true;
}

bool tokens_ok(const dk_ep_group_t& g, const dk_ep_tokens_t& in, bool low_latency) {
    if (in.tokens < 0 || in.tokens > (low_latency ? g.ll_max_tokens : g.max_tokens) || in.k < 1 || in.k > g.max_topk) {
        return false;
    }
    if (in.tokens > 0 && (in.x == nullptr || in.topk_idx == nullptr || in.topk_weights == nullptr || in.pair_pos == nullptr)) {
        return false;
    }
    if (in.tokens > 0 && g.payload == DK_EP_PAYLOAD_FP8 && (in.x_sf == nullptr || in.x_sf_stride < in.tokens)) {
        return false;
    }
    return in.tokens_per_expert != nullptr;
}

dim3 data_grid(const dk_ep_group_t& g) {
    return dim3(static_cast<unsigned>(g.num_sms));
}

}  // namespace dk::ep

using namespace dk::ep;

extern "C" dk_status_t dk_ep_pair_positions(const dk_ep_pair_positions_params_t* p, dk_stream_t stream) {
    if (p == nullptr || p->tokens < 0 || p->k < 1 || p->k > DK_EP_MAX_TOPK || p->num_experts < 1 || p->num_experts > DK_EP_MAX_EXPERTS) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->tokens == 0) {
        return DK_STATUS_OK;
    }
    if (p->topk_idx == nullptr || p->pair_pos == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const unsigned blocks = static_cast<unsigned>(p->num_experts);
    return dk::launch<pair_positions_kernel>(blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->topk_idx, p->pair_pos, p->tokens, p->k, p->num_experts);
}

extern "C" dk_status_t dk_ep_dispatch_notify(const dk_ep_notify_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->tokens_per_expert == nullptr || p->num_invalid == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<notify_kernel>(1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->group, p->tokens_per_expert, p->num_invalid);
}

extern "C" dk_status_t dk_ep_dispatch_send(const dk_ep_dispatch_send_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || !tokens_ok(p->group, p->tokens, false)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<dispatch_send_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->group, p->tokens);
}

extern "C" dk_status_t dk_ep_dispatch_recv(const dk_ep_dispatch_recv_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->rows < 0 || p->counts == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->rows > 0 && (p->x == nullptr || p->m_indices == nullptr || p->weights == nullptr || p->src == nullptr ||
                        (p->group.payload == DK_EP_PAYLOAD_FP8 && p->sf == nullptr) ||
                        (p->group.staged && p->stage_rows == nullptr))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->arrivals != nullptr && p->rows % kArrivalRows != 0) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<dispatch_recv_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), *p);
}

extern "C" dk_status_t dk_ep_ll_dispatch_send(const dk_ep_dispatch_send_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || !tokens_ok(p->group, p->tokens, true)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<ll_dispatch_send_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->group, p->tokens);
}

extern "C" dk_status_t dk_ep_ll_dispatch_recv(const dk_ep_ll_dispatch_recv_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->masked_m == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const int64_t capacity = int64_t(p->group.ranks) * p->group.ll_max_tokens;
    if (capacity > 0 && (p->x == nullptr || p->src == nullptr ||
                         (p->group.payload == DK_EP_PAYLOAD_FP8 && (p->sf == nullptr || p->sf_stride < capacity)))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<ll_dispatch_recv_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), *p);
}

extern "C" dk_status_t dk_ep_combine_send(const dk_ep_combine_send_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->rows < 0 ||
        (p->rows > 0 && (p->y == nullptr || p->src == nullptr || (p->group.staged && p->stage_rows == nullptr)))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<combine_send_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), *p);
}

extern "C" dk_status_t dk_ep_combine_recv(const dk_ep_combine_recv_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->tokens < 0 || p->tokens > p->group.max_tokens || p->k < 1 ||
        p->k > p->group.max_topk) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->tokens > 0 && (p->topk_idx == nullptr || p->out == nullptr ||
                          (p->group.staged && (p->pair_pos == nullptr || p->tokens_per_expert == nullptr)))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<combine_recv_kernel>(data_grid(p->group), kThreads, 0, reinterpret_cast<cudaStream_t>(stream), *p);
}

extern "C" dk_status_t dk_ep_wait(const dk_ep_wait_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->kind < 0 || p->kind >= DK_EP_SIGNAL_KINDS) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<wait_kernel>(1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->group, p->kind);
}

extern "C" dk_status_t dk_ep_barrier(const dk_ep_wait_params_t* p, dk_stream_t stream) {
    if (p == nullptr || !group_ok(p->group) || p->kind != DK_EP_SIGNAL_BARRIER) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    return dk::launch<barrier_kernel>(1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream), p->group);
}
