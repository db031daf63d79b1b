// The simulator's own tests: small kernels that break one rule each (or rely on one guarantee),
// run on the simulator through the same launch path as deepkern's kernels. One scenario per
// invocation (`dksim-selftest <scenario>`), because a failed kernel fails the whole process; the
// Rust test tests/simulator.rs runs each and checks its exit status and report.
//
// Each scenario prints "RESULT <name of the CUresult the host saw>" on stdout.
#include <cuda.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../nccl/nccl.h"

#include "common/kernel.cuh"
#include "common/ptx.cuh"

namespace {

const char* name_of(CUresult r) {
    const char* s = nullptr;
    cuGetErrorName(r, &s);
    return s != nullptr ? s : "?";
}

int report(CUresult r) {
    std::printf("RESULT %s\n", name_of(r));
    std::fflush(stdout);
    return 0;
}

#define CHECK(x)                                                                   \
    do {                                                                           \
        CUresult r_ = (x);                                                         \
        if (r_ != CUDA_SUCCESS) {                                                  \
            std::printf("SETUP FAILED %s: %s at line %d\n", #x, name_of(r_), __LINE__); \
            std::exit(3);                                                          \
        }                                                                          \
    } while (0)

CUstream g_stream = nullptr;

void setup() {
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, 0));
    CHECK(cuCtxSetCurrent(ctx));
    CHECK(cuStreamCreate(&g_stream, CU_STREAM_NON_BLOCKING));
}

template <typename T>
T* alloc(size_t n) {
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n * sizeof(T)));
    return reinterpret_cast<T*>(p);
}

template <auto Kernel, typename... A>
void launch(dim3 grid, dim3 block, const A&... args) {
    const dk_status_t s = dk::launch<Kernel>(grid, block, 0, reinterpret_cast<cudaStream_t>(g_stream), args...);
    if (s != DK_STATUS_OK) {
        std::printf("LAUNCH %d\n", static_cast<int>(s));
    }
}

CUresult sync() { return cuStreamSynchronize(g_stream); }

// ---- kernels -------------------------------------------------------------------------------------

__global__ void write_at(float* p, int64_t index) {
    if (threadIdx.x == 0) {
        p[index] = 1.0f;
    }
}

__global__ void read_at(const float* p, int64_t index, float* out) {
    if (threadIdx.x == 0) {
        out[0] = p[index];
    }
}

__global__ void copy_words(const uint32_t* in, uint32_t* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        out[i] = in[i];
    }
}

__global__ void shared_out_of_bounds(int index) {
    DK_SHARED(int[64], s);
    s[threadIdx.x % 64] = 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        reinterpret_cast<volatile int*>(s)[index] = 2;
    }
}

__global__ void barrier_counts_differ() {
    // Warps 0-1 declare 64 threads, warps 2-3 declare 128, at the same barrier.
    dk::ptx::bar_sync(1, threadIdx.x < 64 ? 64 : 128);
}

__global__ void barriers_never_meet() {
    // Two halves, each waiting for 128 threads at its own barrier: neither ever completes.
    dk::ptx::bar_sync(threadIdx.x < 64 ? 1 : 2, 128);
}

__global__ void partial_warp_exit_then_syncthreads(int* out) {
    // Lanes 16..31 of every warp leave; __syncthreads waits for the threads that did not exit.
    if (threadIdx.x % 32 >= 16) {
        return;
    }
    __syncthreads();
    atomicAdd(out, 1);
}

__global__ void shuffle_with_exited_lanes(int* out) {
    if (threadIdx.x >= 16) {
        return;
    }
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffles_and_votes(int* out) {
    const int lane = threadIdx.x % 32;
    int v = lane;
    for (int o = 16; o > 0; o /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    const int up = __shfl_up_sync(0xffffffffu, lane, 3);
    const int down = __shfl_down_sync(0xffffffffu, lane, 5, 16);
    const int idx = __shfl_sync(0xffffffffu, lane * 10, 7);
    const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
    out[threadIdx.x * 5 + 0] = v;
    out[threadIdx.x * 5 + 1] = up;
    out[threadIdx.x * 5 + 2] = down;
    out[threadIdx.x * 5 + 3] = idx;
    out[threadIdx.x * 5 + 4] = static_cast<int>(ballot);
}

__global__ void spin_on_flag(const uint32_t* flag) {
    while (dk::ptx::ld_acquire_sys_global_u32(flag) == 0) {
    }
}

__global__ void spin_with_timeout(const uint32_t* flag, int* timed_out) {
    const long long start = clock64();
    while (dk::ptx::ld_acquire_sys_global_u32(flag) == 0) {
        if (clock64() - start > (1LL << 34)) {
            atomicOr(timed_out, 1);
            break;
        }
    }
}

__global__ void set_flag(uint32_t* flag) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        dk::ptx::st_release_sys_global_u32(flag, 1);
    }
}

__global__ void trap_in_block(int block) {
    if (blockIdx.x == static_cast<unsigned>(block) && threadIdx.x == 5) {
        __trap();
    }
}

__global__ void misaligned_atomic(int* p) {
    if (threadIdx.x == 0) {
        atomicAdd(reinterpret_cast<int*>(reinterpret_cast<char*>(p) + 2), 1);
    }
}

__global__ void shared_handoff(int* out, bool barrier) {
    DK_SHARED(int, value);
    if (threadIdx.x == 0) {
        value = 42;
    }
    if (barrier) {
        __syncthreads();
    }
    if (threadIdx.x == 32) {
        out[0] = value;  // another warp: ordered only by the barrier
    }
}

// Block 0 publishes data[0] through a flag, block 1 waits for the flag and reads it. Modes:
// 0 relaxed flag, no fences (a race); 1 st.release / ld.acquire; 2 relaxed flag with a fence on
// each side (the PTX release and acquire patterns); 3 a release the reader never acquires (no
// fence after its relaxed read: a race).
__global__ void flag_handoff(int* data, uint32_t* flag, int* out, int mode) {
    if (threadIdx.x != 0) {
        return;
    }
    if (blockIdx.x == 0) {
        data[0] = 42;
        if (mode == 1) {
            dk::ptx::st_release_sys_global_u32(flag, 1);
        } else {
            if (mode == 2 || mode == 3) {
                __threadfence();
            }
            atomicExch(flag, 1u);
        }
    } else {
        if (mode == 1) {
            while (dk::ptx::ld_acquire_sys_global_u32(flag) == 0) {
            }
        } else {
            while (atomicAdd(flag, 0u) == 0) {
            }
            if (mode == 2) {
                __threadfence();
            }
        }
        out[0] = data[0];
    }
}

__global__ void fill(int* p, int n, int v) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        p[i] = v;
    }
}

__global__ void sum_into(const int* p, int n, int* out) {
    if (threadIdx.x == 0) {
        int s = 0;
        for (int i = 0; i < n; ++i) {
            s += p[i];
        }
        out[0] = s;
    }
}

__global__ void take_tickets(int* counter, int* order) {
    order[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(counter, 1);
}

// Hopper's asynchronous units on one 512-byte box (64 x 8 bytes of a 64 x 16 byte matrix), by
// thread 0 of one warp:
//  0: load it with the right expect_tx, wait, sum it;
//  1: expect_tx 256 bytes short: the load lands more bytes than its phase expected;
//  2: exit without waiting for the load (it would write the CTA's shared memory after it is gone);
//  3: load, then overwrite the box with generic stores and store it to rows 8..15 with TMA,
//     without fence.proxy.async.shared::cta;
//  4: the same with the fence;
//  5: no load: generic stores, then the TMA store, without the fence (the first use of the async
//     proxy comes after the writes).
struct TmaParams {
    CUtensorMap map;
    uint32_t* out;
    int mode;
};
struct alignas(128) TmaBox {
    uint8_t b[512];
};

__global__ void tma_box(const __grid_constant__ TmaParams p) {
    DK_SHARED(TmaBox, s_box);
    DK_SHARED(uint64_t, s_bar);
    if (threadIdx.x != 0) {
        return;
    }
    uint32_t sum = 0;
    if (p.mode != 5) {
        dk::ptx::mbarrier_init(&s_bar, 1);
        dk::ptx::fence_mbarrier_init();
        dk::ptx::mbarrier_arrive_expect_tx(&s_bar, p.mode == 1 ? 256 : 512);
        dk::ptx::cp_async_bulk_tensor_2d_global_to_shared(s_box.b, &p.map, &s_bar, 0, 0);
        if (p.mode == 2) {
            return;
        }
        while (!dk::ptx::mbarrier_try_wait_parity(&s_bar, 0)) {
        }
        for (int i = 0; i < 512; ++i) {
            sum += s_box.b[i];
        }
    }
    if (p.mode >= 3) {
        for (int i = 0; i < 512; ++i) {
            s_box.b[i] = static_cast<uint8_t>(i * 3);
        }
        if (p.mode == 4) {
            dk::ptx::fence_proxy_async_shared_cta();
        }
        dk::ptx::cp_async_bulk_tensor_2d_shared_to_global(&p.map, s_box.b, 0, 8);
        dk::ptx::cp_async_bulk_commit_group();
        dk::ptx::cp_async_bulk_wait_group<0>();
    }
    *p.out = sum;
}

// mbarrier waits and setmaxnreg in a CTA of two warpgroups (the kernel starts with the
// simulator's 64 registers per thread: it has no ptxas report):
//  0: warpgroup 1 gives 32 registers per thread back, warpgroup 0 takes them (96);
//  1: warpgroup 0 asks for 96 with nobody giving any back: a deadlock report;
//  2: a "decrease" to 256;
//  3: a wait on an mbarrier phase nobody arrives at: a deadlock report.
__global__ void registers_and_barriers(int mode, int* out) {
    DK_SHARED(uint64_t, s_bar);
    const int wg = threadIdx.x / 128;
    if (mode == 0 || mode == 1) {
        if (wg == 0) {
            dk::ptx::setmaxnreg_inc<96>();
        } else if (mode == 0) {
            dk::ptx::setmaxnreg_dec<32>();
        }
    } else if (mode == 2) {
        dk::ptx::setmaxnreg_dec<256>();
    } else if (mode == 3) {
        if (threadIdx.x == 0) {
            dk::ptx::mbarrier_init(&s_bar, 1);
            dk::ptx::fence_mbarrier_init();
        }
        __syncthreads();
        while (!dk::ptx::mbarrier_try_wait_parity(&s_bar, 0)) {
        }
    }
    atomicAdd(out, 1);
}

// One wgmma on one warpgroup: A (64 x 32) and B (16 x 32) e4m3 ones in shared memory, K-major
// in the 128-byte swizzle the kernels use (rows of 128 bytes, of which the first 32 are read;
// SBO 1024 bytes between 8-row groups). out[0]: an accumulator read before wgmma.wait_group
// (undefined; NaN on the simulator), out[1]: after it (32).
struct alignas(1024) WgmmaTiles {
    uint8_t a[64 * 128];
    uint8_t b[16 * 128];
};

__device__ uint64_t sw128_desc(const void* p) {
    const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return ((addr >> 4) & 0x3fff) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__global__ void wgmma_ones(float* out) {
    DK_SHARED(WgmmaTiles, s);
    for (int i = threadIdx.x; i < 64 * 128; i += 128) {
        s.a[i] = 0x38;  // 1.0
    }
    for (int i = threadIdx.x; i < 16 * 128; i += 128) {
        s.b[i] = 0x38;
    }
    dk::ptx::fence_proxy_async_shared_cta();
    __syncthreads();
    float d[8];
    dk::ptx::wgmma_fence();
    dk::ptx::wgmma_m64n16k32_f32_e4m3_e4m3(d, sw128_desc(s.a), sw128_desc(s.b), false);
    dk::ptx::wgmma_commit_group();
    if (threadIdx.x == 0) {
        out[0] = d[0];
    }
    dk::ptx::wgmma_wait_group<0>();
    dk::ptx::fence_operands(d);
    if (threadIdx.x == 0) {
        out[1] = d[0];
    }
}

// Thread-block clusters of two CTAs (64 threads each), one 512-byte box (8 rows of 64 bytes) that
// each CTA's rank r loads half of (rows 4r .. 4r + 3) with TMA multicast into both CTAs:
//  0: barrier init, cluster barrier, multicast, wait, sum the whole box into out[cta]; then each
//     CTA arrives on its peer's `done` barrier (mapa + remote arrive) and waits for its own;
//  1: rank 1 never initialises its barrier (and waits for a flag nobody sets) and there is no
//     cluster barrier: rank 0's multicast finds no mbarrier in rank 1;
//  2: rank 1 exits right after the cluster barrier; rank 0 sleeps, then arrives on rank 1's
//     barrier: a CTA that is gone;
//  3: (host) a grid of 3 CTAs in clusters of 2: refused at launch.
struct ClusterParams {
    CUtensorMap half;  // box {64, 4}
    uint32_t* out;
    const int32_t* flag;  // mode 1: never set
    int mode;
};

__global__ void cluster_multicast(const __grid_constant__ ClusterParams p) {
    DK_SHARED(TmaBox, s_box);
    DK_SHARED(uint64_t, s_full);
    DK_SHARED(uint64_t, s_done);
    const uint32_t rank = dk::ptx::cluster_ctarank();
    if (threadIdx.x == 0 && !(p.mode == 1 && rank == 1)) {
        dk::ptx::mbarrier_init(&s_full, 1);
        dk::ptx::mbarrier_init(&s_done, 1);
        dk::ptx::fence_mbarrier_init();
    }
    if (p.mode != 1) {
        dk::ptx::barrier_cluster_arrive_release();
        dk::ptx::barrier_cluster_wait_acquire();
    }
    if (p.mode == 2 && rank == 1) {
        return;
    }
    if (threadIdx.x != 0) {
        return;
    }
    if (p.mode == 1 && rank == 1) {
        while (dk::ptx::ld_acquire_gpu_global_s32(p.flag) == 0) {
            __nanosleep(1000);
        }
        return;
    }
    if (p.mode == 2) {
        for (int i = 0; i < 100; ++i) {
            __nanosleep(1000);
        }
        dk::ptx::mbarrier_arrive_cluster(dk::ptx::mapa_shared_cluster(&s_done, 1));
        return;
    }
    dk::ptx::mbarrier_arrive_expect_tx(&s_full, 512);
    dk::ptx::cp_async_bulk_tensor_2d_global_to_shared_multicast(s_box.b + rank * 256, &p.half, &s_full, 0, int32_t(rank * 4), 0x3);
    while (!dk::ptx::mbarrier_try_wait_parity(&s_full, 0)) {
    }
    uint32_t sum = 0;
    for (int i = 0; i < 512; ++i) {
        sum += s_box.b[i];
    }
    p.out[blockIdx.x] = sum;
    if (p.mode == 0) {
        // Neither CTA leaves before its peer's arrival: the peer no longer needs this one.
        dk::ptx::mbarrier_arrive_cluster(dk::ptx::mapa_shared_cluster(&s_done, rank ^ 1));
        while (!dk::ptx::mbarrier_try_wait_parity(&s_done, 0)) {
        }
    }
}

// ---- scenarios -----------------------------------------------------------------------------------

int oob_write_past_guard() {
    float* p = alloc<float>(1024);  // 4096 bytes: the guard page starts right after
    launch<write_at>(1, 32, p, int64_t(1024 + 7));
    return report(sync());
}

int oob_write_in_slack() {
    float* p = alloc<float>(100);  // 400 bytes: bytes 400..511 are slack inside the granule
    launch<write_at>(1, 32, p, int64_t(101));
    return report(sync());
}

int oob_read_before_start() {
    float* p = alloc<float>(1024);
    float* out = alloc<float>(1);
    launch<read_at>(1, 32, p, int64_t(-1), out);
    return report(sync());
}

int use_after_free() {
    float* p = alloc<float>(256);
    float* out = alloc<float>(1);
    CHECK(cuMemFree(reinterpret_cast<CUdeviceptr>(p)));
    launch<read_at>(1, 32, p, int64_t(3), out);
    return report(sync());
}

int null_pointer() {
    float* out = alloc<float>(1);
    launch<read_at>(1, 32, static_cast<const float*>(nullptr), int64_t(0), out);
    return report(sync());
}

int fresh_memory_is_poisoned() {
    uint32_t* fresh = alloc<uint32_t>(64);
    uint32_t* out = alloc<uint32_t>(64);
    launch<copy_words>(1, 64, static_cast<const uint32_t*>(fresh), out, 64);
    const CUresult r = sync();
    std::vector<uint32_t> host(64);
    CHECK(cuMemcpyDtoH(host.data(), reinterpret_cast<CUdeviceptr>(out), 64 * 4));
    int poisoned = 0;
    for (uint32_t w : host) {
        poisoned += w == 0xffffffffu;
    }
    std::printf("POISONED %d of 64\n", poisoned);
    return report(r);
}

int shared_oob() {
    // s is the first static variable (shared address 1024); the window ends at 1024 + 48 KiB.
    launch<shared_out_of_bounds>(1, 64, (48 << 10) / 4 + 1);
    return report(sync());
}

int barrier_mismatch() {
    launch<barrier_counts_differ>(1, 128);
    return report(sync());
}

int barrier_deadlock() {
    launch<barriers_never_meet>(1, 128);
    return report(sync());
}

int partial_warp_exit() {
    int* out = alloc<int>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(out), 0, 1));
    launch<partial_warp_exit_then_syncthreads>(1, 128, out);
    const CUresult r = sync();
    int host = 0;
    CHECK(cuMemcpyDtoH(&host, reinterpret_cast<CUdeviceptr>(out), 4));
    std::printf("ARRIVED %d\n", host);
    return report(r);
}

int shuffle_exited() {
    int* out = alloc<int>(32);
    launch<shuffle_with_exited_lanes>(1, 32, out);
    return report(sync());
}

int warp_collectives() {
    int* out = alloc<int>(64 * 5);
    launch<shuffles_and_votes>(1, 64, out);
    const CUresult r = sync();
    std::vector<int> h(64 * 5);
    CHECK(cuMemcpyDtoH(h.data(), reinterpret_cast<CUdeviceptr>(out), h.size() * 4));
    int wrong = 0;
    unsigned want_ballot = 0;
    for (int l = 0; l < 32; l += 3) {
        want_ballot |= 1u << l;
    }
    for (int t = 0; t < 64; ++t) {
        const int lane = t % 32;
        const int seg = lane & ~15;
        const int want[5] = {496, lane >= 3 ? lane - 3 : lane, lane + 5 < seg + 16 ? lane + 5 : lane, 70, static_cast<int>(want_ballot)};
        for (int i = 0; i < 5; ++i) {
            wrong += h[t * 5 + i] != want[i];
        }
    }
    std::printf("WRONG %d\n", wrong);
    return report(r);
}

int spin_deadlock() {
    uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    launch<spin_on_flag>(2, 64, static_cast<const uint32_t*>(flag));
    return report(sync());
}

int timeout_fires() {
    uint32_t* flag = alloc<uint32_t>(1);
    int* timed_out = alloc<int>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(timed_out), 0, 1));
    launch<spin_with_timeout>(1, 32, static_cast<const uint32_t*>(flag), timed_out);
    const CUresult r = sync();
    int host = 0;
    CHECK(cuMemcpyDtoH(&host, reinterpret_cast<CUdeviceptr>(timed_out), 4));
    std::printf("TIMED_OUT %d\n", host);
    return report(r);
}

// A kernel that waits for one launched after it on another stream: fine while both fit the SMs.
// Each waiting CTA takes 150 KiB of shared memory, so one fits an SM.
int concurrent_kernels(unsigned waiting_ctas) {
    uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    CUstream other;
    CHECK(cuStreamCreate(&other, CU_STREAM_NON_BLOCKING));
    constexpr uint32_t kSmem = 150 << 10;
    if (cudaFuncSetAttribute(spin_on_flag, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess) {
        std::printf("SETUP FAILED cudaFuncSetAttribute\n");
        return 3;
    }
    const dk_status_t w = dk::launch<spin_on_flag>(waiting_ctas, 32, kSmem, reinterpret_cast<cudaStream_t>(g_stream), static_cast<const uint32_t*>(flag));
    if (w != DK_STATUS_OK) {
        std::printf("LAUNCH %d\n", static_cast<int>(w));
    }
    const dk_status_t s = dk::launch<set_flag>(1, 32, 0, reinterpret_cast<cudaStream_t>(other), flag);
    if (s != DK_STATUS_OK) {
        std::printf("LAUNCH %d\n", static_cast<int>(s));
    }
    const CUresult a = sync();
    const CUresult b = cuStreamSynchronize(other);
    return report(a != CUDA_SUCCESS ? a : b);
}

int trap() {
    launch<trap_in_block>(4, 64, 2);
    return report(sync());
}

int misaligned() {
    int* p = alloc<int>(4);
    launch<misaligned_atomic>(1, 32, p);
    return report(sync());
}

int unsynchronised_failure() {
    float* p = alloc<float>(1024);
    launch<write_at>(1, 32, p, int64_t(1024 + 7));
    std::printf("EXITING without synchronising\n");
    std::fflush(stdout);
    return 0;
}

int ticket_order() {
    int* counter = alloc<int>(1);
    int* order = alloc<int>(256);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(counter), 0, 1));
    launch<take_tickets>(4, 64, counter, order);
    const CUresult r = sync();
    std::vector<int> h(256);
    CHECK(cuMemcpyDtoH(h.data(), reinterpret_cast<CUdeviceptr>(order), h.size() * 4));
    unsigned long long hash = 1469598103934665603ull;
    for (int v : h) {
        hash = (hash ^ static_cast<unsigned>(v)) * 1099511628211ull;
    }
    std::printf("ORDER %llx\n", hash);
    return report(r);
}

int launch_limits() {
    const dk_status_t big = dk::launch<copy_words>(1, 2048, 0, reinterpret_cast<cudaStream_t>(g_stream), static_cast<const uint32_t*>(nullptr),
                                                  static_cast<uint32_t*>(nullptr), 0);
    const dk_status_t smem = dk::launch<copy_words>(1, 32, 64 << 10, reinterpret_cast<cudaStream_t>(g_stream),
                                                   static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), 0);
    std::printf("BLOCK_2048 %d DYNAMIC_64K %d\n", static_cast<int>(big), static_cast<int>(smem));
    return report(sync());
}

int tensor_map_rules() {
    CUtensorMap map;
    uint8_t* base = alloc<uint8_t>(1 << 20);
    const cuuint64_t dims[2] = {256, 64};
    const cuuint32_t box[2] = {128, 32};
    const cuuint32_t estr[2] = {1, 1};
    const auto encode = [&](void* addr, cuuint64_t stride, CUtensorMapSwizzle swz, cuuint32_t box0) {
        const cuuint64_t strides[1] = {stride};
        const cuuint32_t b[2] = {box0, box[1]};
        return cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, addr, dims, strides, b, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, swz,
                                      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    };
    std::printf("OK %s\n", name_of(encode(base, 256, CU_TENSOR_MAP_SWIZZLE_128B, 128)));
    std::printf("MISALIGNED_ADDRESS %s\n", name_of(encode(base + 8, 256, CU_TENSOR_MAP_SWIZZLE_128B, 128)));
    std::printf("STRIDE_NOT_16 %s\n", name_of(encode(base, 264 - 1, CU_TENSOR_MAP_SWIZZLE_128B, 128)));
    std::printf("BOX_OVER_SWIZZLE %s\n", name_of(encode(base, 256, CU_TENSOR_MAP_SWIZZLE_64B, 128)));
    std::printf("INNER_BOX_NOT_16 %s\n", name_of(encode(base, 256, CU_TENSOR_MAP_SWIZZLE_NONE, 24)));
    (void)box;
    return report(sync());
}

// Race mode (a build with DEEPKERN_SIM_RACES=1): a shared variable handed from one warp to
// another with and without a barrier.
int shared_race() {
    int* out = alloc<int>(1);
    launch<shared_handoff>(1, 64, out, false);
    return report(sync());
}

int shared_handoff_with_barrier() {
    int* out = alloc<int>(1);
    launch<shared_handoff>(1, 64, out, true);
    return report(sync());
}

// Race mode: a flag between two CTAs of one kernel (see flag_handoff).
int flag_handoff_mode(int mode) {
    int* data = alloc<int>(1);
    int* out = alloc<int>(1);
    uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    launch<flag_handoff>(2, 32, data, flag, out, mode);
    return report(sync());
}

// Race mode: a kernel on one stream writes a buffer another stream's kernel reads: ordered by
// an event (1), by the host waiting for the first stream before enqueuing the second kernel (2),
// or not at all (0: a race).
int cross_stream_mode(int mode) {
    const int n = 256;
    int* buf = alloc<int>(n);
    int* out = alloc<int>(1);
    CUstream other;
    CHECK(cuStreamCreate(&other, CU_STREAM_NON_BLOCKING));
    launch<fill>(1, 64, buf, n, 1);
    if (mode == 1) {
        CUevent e;
        CHECK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
        CHECK(cuEventRecord(e, g_stream));
        CHECK(cuStreamWaitEvent(other, e, 0));
    } else if (mode == 2) {
        CHECK(sync());
    }
    const dk_status_t s = dk::launch<sum_into>(dim3(1), dim3(32), 0, reinterpret_cast<cudaStream_t>(other), buf, n, out);
    if (s != DK_STATUS_OK) {
        std::printf("LAUNCH %d\n", static_cast<int>(s));
    }
    const CUresult r = cuStreamSynchronize(other);
    (void)sync();
    return report(r);
}

// Encodes `map` (64-byte aligned, as the driver requires) over a row-major byte matrix of `cols` x
// `rows`, boxes of 64 x `box_rows`, no swizzle.
void encode_byte_matrix(CUtensorMap* map, uint8_t* matrix, int cols, int rows, uint32_t box_rows) {
    const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
    const cuuint64_t strides[1] = {cuuint64_t(cols)};
    const cuuint32_t box[2] = {64, box_rows};
    const cuuint32_t estr[2] = {1, 1};
    CHECK(cuTensorMapEncodeTiled(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, matrix, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
}

int cluster_mode(int mode) {
    const int cols = 64, rows = 8;
    uint8_t* matrix = alloc<uint8_t>(cols * rows);
    std::vector<uint8_t> host(cols * rows);
    uint32_t want = 0;
    for (int i = 0; i < cols * rows; ++i) {
        host[i] = static_cast<uint8_t>(i % 11 + 1);
        want += host[i];
    }
    CHECK(cuMemcpyHtoD(reinterpret_cast<CUdeviceptr>(matrix), host.data(), host.size()));
    ClusterParams p{};
    encode_byte_matrix(&p.half, matrix, cols, rows, 4);
    const int ctas = 6;
    p.out = alloc<uint32_t>(ctas);
    int32_t* flag = alloc<int32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    p.flag = flag;
    p.mode = mode;
    const auto s = reinterpret_cast<cudaStream_t>(g_stream);
    if (mode == 3) {
        // A grid that is not a whole number of clusters is refused at launch.
        const dk_status_t odd = dk::launch_cluster<cluster_multicast>(dim3(3), dim3(64), 2, 0, s, p);
        std::printf("ODD GRID REFUSED %d\n", odd != DK_STATUS_OK ? 1 : 0);
        return 0;
    }
    if (dk::launch_cluster<cluster_multicast>(dim3(ctas), dim3(64), 2, 0, s, p) != DK_STATUS_OK) {
        std::printf("LAUNCH FAILED\n");
    }
    const CUresult r = sync();
    if (r == CUDA_SUCCESS) {
        std::vector<uint32_t> got(ctas);
        CHECK(cuMemcpyDtoH(got.data(), reinterpret_cast<CUdeviceptr>(p.out), ctas * 4));
        int right = 0;
        for (uint32_t v : got) {
            right += v == want;
        }
        std::printf("SUMS RIGHT %d of %d\n", right, ctas);
    }
    return report(r);
}

int tma_box_mode(int mode) {
    const int cols = 64, rows = 16;
    uint8_t* matrix = alloc<uint8_t>(cols * rows);
    std::vector<uint8_t> host(cols * rows);
    uint32_t want = 0;
    for (int i = 0; i < cols * rows; ++i) {
        host[i] = static_cast<uint8_t>(i % 7 + 1);
        want += i < 512 ? host[i] : 0;
    }
    CHECK(cuMemcpyHtoD(reinterpret_cast<CUdeviceptr>(matrix), host.data(), host.size()));
    TmaParams p{};
    encode_byte_matrix(&p.map, matrix, cols, rows, 8);
    p.out = alloc<uint32_t>(1);
    p.mode = mode;
    launch<tma_box>(1, 32, p);
    const CUresult r = sync();
    if (r == CUDA_SUCCESS) {
        uint32_t sum = 0;
        CHECK(cuMemcpyDtoH(&sum, reinterpret_cast<CUdeviceptr>(p.out), 4));
        CHECK(cuMemcpyDtoH(host.data(), reinterpret_cast<CUdeviceptr>(matrix), host.size()));
        int stored = 0;
        for (int i = 0; i < 512; ++i) {
            stored += host[512 + i] == static_cast<uint8_t>(i * 3);
        }
        std::printf("SUM %u WANT %u STORED %d\n", sum, want, stored);
    }
    return report(r);
}

int registers_and_barriers_mode(int mode) {
    int* out = alloc<int>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(out), 0, 1));
    launch<registers_and_barriers>(1, 256, mode, out);
    const CUresult r = sync();
    if (r == CUDA_SUCCESS) {
        int done = 0;
        CHECK(cuMemcpyDtoH(&done, reinterpret_cast<CUdeviceptr>(out), 4));
        std::printf("DONE %d\n", done);
    }
    return report(r);
}

int wgmma_accumulators() {
    float* out = alloc<float>(2);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(out), 0, 2));
    launch<wgmma_ones>(1, 128, out);
    const CUresult r = sync();
    if (r == CUDA_SUCCESS) {
        float h[2];
        CHECK(cuMemcpyDtoH(h, reinterpret_cast<CUdeviceptr>(out), 8));
        std::printf("BEFORE_WAIT_NAN %d AFTER %g\n", h[0] != h[0] ? 1 : 0, h[1]);
    }
    return report(r);
}


// ---- NCCL: ranks on host threads, each on its own device (DEEPKERN_SIM_DEVICES) ------------------

__global__ void fill_ramp(int* p, int n, int base) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        p[i] = base + i;
    }
}

const char* nccl_name(ncclResult_t r) {
    static const char* const names[] = {"ncclSuccess",     "ncclUnhandledCudaError", "ncclSystemError", "ncclInternalError",
                                        "ncclInvalidArgument", "ncclInvalidUsage", "ncclRemoteError", "ncclInProgress", "ncclTimeout"};
    return r >= 0 && r <= ncclTimeout ? names[r] : "?";
}

#define NCHECK(x)                                                                                  \
    do {                                                                                           \
        ncclResult_t r_ = (x);                                                                     \
        if (r_ != ncclSuccess) {                                                                   \
            std::printf("SETUP FAILED %s: %s at line %d\n", #x, nccl_name(r_), __LINE__);          \
            std::fflush(stdout);                                                                   \
            std::exit(3);                                                                          \
        }                                                                                          \
    } while (0)

struct Rank {
    int rank;
    int ranks;
    CUstream stream;
    ncclComm_t comm;
};

extern "C" void dksim_selftest_threads(int n, void (*fn)(int, void*), void* arg);  // threads.cpp
extern "C" void dksim_selftest_yield();                                              // threads.cpp

// Runs body(rank) for `ranks` ranks, each on a host thread of its own with device `rank`'s context
// and a stream; the communicator is formed from one unique id. Returns the first stream error.
CUresult on_ranks(int ranks, const std::function<void(Rank&)>& body) {
    ncclUniqueId id;
    NCHECK(ncclGetUniqueId(&id));
    std::vector<CUresult> results(size_t(ranks), CUDA_SUCCESS);
    const std::function<void(int)> each = [&](int r) {
            CUcontext ctx;
            CHECK(cuDevicePrimaryCtxRetain(&ctx, r));
            CHECK(cuCtxSetCurrent(ctx));
            Rank me{r, ranks, nullptr, nullptr};
            CHECK(cuStreamCreate(&me.stream, CU_STREAM_NON_BLOCKING));
            NCHECK(ncclCommInitRank(&me.comm, ranks, id, r));
            body(me);
            results[size_t(r)] = cuStreamSynchronize(me.stream);
    };
    dksim_selftest_threads(
        ranks, [](int r, void* f) { (*static_cast<const std::function<void(int)>*>(f))(r); }, const_cast<std::function<void(int)>*>(&each));
    for (CUresult r : results) {
        if (r != CUDA_SUCCESS) {
            return r;
        }
    }
    return CUDA_SUCCESS;
}

template <typename T>
std::vector<T> download(const T* p, size_t n) {
    std::vector<T> h(n);
    CHECK(cuMemcpyDtoH(h.data(), reinterpret_cast<CUdeviceptr>(p), n * sizeof(T)));
    return h;
}

template <typename T>
T* upload(const std::vector<T>& v) {
    T* p = alloc<T>(v.size());
    CHECK(cuMemcpyHtoD(reinterpret_cast<CUdeviceptr>(p), v.data(), v.size() * sizeof(T)));
    return p;
}

uint16_t bf16_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);  // exact for the small integers used here
}

// Implicit synchronisations wait for their own device only, as a process's would: device 1
// spins until device 0 sets a flag, which device 0 does only after a cuMemFree and a
// cuCtxSynchronize of its own (waiting for device 1 too would be a deadlock).
int free_waits_for_its_own_device() {
    uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    std::atomic<int> spinning{0};
    std::atomic<int> freed{0};
    const CUresult r = on_ranks(2, [&](Rank& me) {
        if (me.rank == 1) {
            (void)dk::launch<spin_on_flag>(1, 32, 0, reinterpret_cast<cudaStream_t>(me.stream), static_cast<const uint32_t*>(flag));
            spinning = 1;
            return;
        }
        while (spinning == 0) {
            dksim_selftest_yield();
        }
        CUdeviceptr p = 0;
        CHECK(cuMemAlloc(&p, 256));
        CHECK(cuMemFree(p));
        CHECK(cuCtxSynchronize());
        freed = 1;
        (void)dk::launch<set_flag>(1, 32, 0, reinterpret_cast<cudaStream_t>(me.stream), flag);
    });
    std::printf("FREED %d\n", freed.load());
    return report(r);
}

// All-gather, all-reduce (sum of f32, max of i32, sum of bf16), broadcast: every rank checks.
int nccl_collectives(int ranks) {
    std::atomic<int> wrong{0};
    const CUresult r = on_ranks(ranks, [&](Rank& me) {
        const int n = 5;
        std::vector<int> mine(n);
        for (int i = 0; i < n; ++i) {
            mine[size_t(i)] = me.rank * 100 + i;
        }
        int* send = upload(mine);
        int* gathered = alloc<int>(size_t(n * ranks));
        NCHECK(ncclAllGather(send, gathered, n, ncclInt32, me.comm, me.stream));
        std::vector<float> f(n);
        for (int i = 0; i < n; ++i) {
            f[size_t(i)] = float(me.rank + 1) * float(i + 1) * 0.5f;
        }
        float* fsend = upload(f);
        float* fsum = alloc<float>(n);
        NCHECK(ncclAllReduce(fsend, fsum, n, ncclFloat32, ncclSum, me.comm, me.stream));
        int* imax = alloc<int>(n);
        NCHECK(ncclAllReduce(send, imax, n, ncclInt32, ncclMax, me.comm, me.stream));
        std::vector<uint16_t> b(n);
        for (int i = 0; i < n; ++i) {
            b[size_t(i)] = bf16_of(float(me.rank + i));
        }
        uint16_t* bsend = upload(b);
        uint16_t* bsum = alloc<uint16_t>(n);
        NCHECK(ncclAllReduce(bsend, bsum, n, ncclBfloat16, ncclSum, me.comm, me.stream));
        const int root = ranks - 1;
        int* bcast = alloc<int>(n);
        NCHECK(ncclBroadcast(me.rank == root ? send : nullptr, bcast, n, ncclInt32, root, me.comm, me.stream));
        CHECK(cuStreamSynchronize(me.stream));
        const auto g = download(gathered, size_t(n * ranks));
        const auto fs = download(fsum, n);
        const auto im = download(imax, n);
        const auto bs = download(bsum, n);
        const auto bc = download(bcast, n);
        const int tri = ranks * (ranks + 1) / 2;
        for (int i = 0; i < n; ++i) {
            for (int q = 0; q < ranks; ++q) {
                wrong += g[size_t(q * n + i)] != q * 100 + i;
            }
            wrong += fs[size_t(i)] != float(tri) * float(i + 1) * 0.5f;
            wrong += im[size_t(i)] != (ranks - 1) * 100 + i;
            wrong += bs[size_t(i)] != bf16_of(float(ranks * i + tri - ranks));
            wrong += bc[size_t(i)] != root * 100 + i;
        }
        NCHECK(ncclCommDestroy(me.comm));
    });
    std::printf("RANKS %d WRONG %d\n", ranks, wrong.load());
    return report(r);
}

// Grouped sends and receives between every pair (each rank to itself too), 4 ints each, with a
// zero-byte send and receive around a ring (null buffers), in one group per rank.
int nccl_send_recv(int ranks) {
    std::atomic<int> wrong{0};
    const CUresult r = on_ranks(ranks, [&](Rank& me) {
        const int n = 4;
        std::vector<int> out(size_t(n * ranks));
        for (int p = 0; p < ranks; ++p) {
            for (int i = 0; i < n; ++i) {
                out[size_t(p * n + i)] = me.rank * 1000 + p * 10 + i;
            }
        }
        int* send = upload(out);
        int* recv = alloc<int>(size_t(n * ranks));
        NCHECK(ncclGroupStart());
        for (int p = 0; p < ranks; ++p) {
            NCHECK(ncclSend(send + p * n, n, ncclInt32, p, me.comm, me.stream));
            NCHECK(ncclRecv(recv + p * n, n, ncclInt32, p, me.comm, me.stream));
        }
        NCHECK(ncclSend(nullptr, 0, ncclUint8, (me.rank + 1) % ranks, me.comm, me.stream));
        NCHECK(ncclRecv(nullptr, 0, ncclUint8, (me.rank + ranks - 1) % ranks, me.comm, me.stream));
        NCHECK(ncclGroupEnd());
        CHECK(cuStreamSynchronize(me.stream));
        const auto got = download(recv, size_t(n * ranks));
        for (int p = 0; p < ranks; ++p) {
            for (int i = 0; i < n; ++i) {
                wrong += got[size_t(p * n + i)] != p * 1000 + me.rank * 10 + i;
            }
        }
        NCHECK(ncclCommDestroy(me.comm));
    });
    std::printf("RANKS %d WRONG %d\n", ranks, wrong.load());
    return report(r);
}

// Stream order: rank 0's kernel fills its send buffer, the all-gather sends it, and a memset then
// clears it; rank 1's stream reaches its all-gather only once a flag is set, so rank 0's
// operation (and the memset behind it) must wait. A kernel behind the all-gather on each stream
// copies what arrived.
int nccl_stream_order() {
    static uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    std::atomic<int> wrong{0};
    std::atomic<int> query{-1};
    const int n = 64;
    const CUresult r = on_ranks(2, [&](Rank& me) {
        int* send = alloc<int>(n);
        int* recv = alloc<int>(2 * n);
        int* seen = alloc<int>(2 * n);
        CHECK(cuMemsetD32Async(reinterpret_cast<CUdeviceptr>(send), 0xdead, n, me.stream));
        dk::launch<fill_ramp>(1, 32, 0, reinterpret_cast<cudaStream_t>(me.stream), send, n, 1000 * (me.rank + 1));
        if (me.rank == 1) {
            CHECK(cuStreamWaitValue32(me.stream, reinterpret_cast<CUdeviceptr>(flag), 1, CU_STREAM_WAIT_VALUE_GEQ));
        }
        NCHECK(ncclAllGather(send, recv, n, ncclInt32, me.comm, me.stream));
        CHECK(cuMemsetD32Async(reinterpret_cast<CUdeviceptr>(send), 0, n, me.stream));
        dk::launch<copy_words>(1, 32, 0, reinterpret_cast<cudaStream_t>(me.stream), reinterpret_cast<const uint32_t*>(recv),
                               reinterpret_cast<uint32_t*>(seen), 2 * n);
        if (me.rank == 0) {
            query = static_cast<int>(cuStreamQuery(me.stream));
            CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 1, 1));
        }
        CHECK(cuStreamSynchronize(me.stream));
        const auto got = download(seen, size_t(2 * n));
        for (int q = 0; q < 2; ++q) {
            for (int i = 0; i < n; ++i) {
                wrong += got[size_t(q * n + i)] != 1000 * (q + 1) + i;
            }
        }
        wrong += download(send, n)[0] != 0;
        NCHECK(ncclCommDestroy(me.comm));
    });
    std::printf("QUERY_BEFORE %s WRONG %d\n", name_of(static_cast<CUresult>(query.load())), wrong.load());
    return report(r);
}

// Ranks that post different operations: every poster gets ncclInvalidUsage, and the report names
// each rank's call. mode 0: counts differ; 1: an all-gather against a send.
int nccl_mismatch(int mode) {
    std::vector<ncclResult_t> got(2, ncclSuccess);
    const CUresult r = on_ranks(2, [&](Rank& me) {
        int* buf = alloc<int>(16);
        if (mode == 0) {
            got[size_t(me.rank)] = ncclAllGather(buf, buf, me.rank == 0 ? 4 : 8, ncclInt32, me.comm, me.stream);
        } else if (me.rank == 0) {
            got[0] = ncclAllGather(buf, buf, 4, ncclInt32, me.comm, me.stream);
        } else {
            got[1] = ncclSend(buf, 4, ncclInt32, 0, me.comm, me.stream);
        }
        NCHECK(ncclCommDestroy(me.comm));
    });
    std::printf("RANK0 %s RANK1 %s\n", nccl_name(got[0]), nccl_name(got[1]));
    return report(r);
}

// A peer that never posts its part. mode 0: rank 1 just stops (reported once nothing changes for
// DEEPKERN_SIM_NCCL_TIMEOUT); 1: rank 1 destroys its communicator instead (reported at once).
int nccl_missing_peer(int mode) {
    ncclResult_t got = ncclSuccess;
    const CUresult r = on_ranks(2, [&](Rank& me) {
        int* buf = alloc<int>(8);
        if (me.rank == 0) {
            got = ncclAllReduce(buf, buf, 8, ncclInt32, ncclSum, me.comm, me.stream);
            NCHECK(ncclCommDestroy(me.comm));
        } else if (mode == 1) {
            NCHECK(ncclCommDestroy(me.comm));
        }
    });
    std::printf("RANK0 %s\n", nccl_name(got));
    return report(r);
}

// Both ranks post, but rank 1's stream never reaches its part: the device is stuck, and the
// engine's deadlock report names the operation and the rank it waits for. mode 1: rank 1 aborts
// its communicator before its part ran instead (a teardown-order bug): reported, and rank 0's
// operation fails.
int nccl_unreached(int mode) {
    static uint32_t* flag = alloc<uint32_t>(1);
    CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 0, 1));
    // Rank 1 aborts only once rank 0's call has returned, so rank 0 always sees the abort at its
    // synchronisation (a cancelled operation), never at the call.
    static std::atomic<bool> posted{false};
    posted = false;
    const CUresult r = on_ranks(2, [&](Rank& me) {
        int* send = alloc<int>(8);
        int* recv = alloc<int>(16);
        if (me.rank == 1) {
            CHECK(cuStreamWaitValue32(me.stream, reinterpret_cast<CUdeviceptr>(flag), 1, CU_STREAM_WAIT_VALUE_GEQ));
        }
        NCHECK(ncclAllGather(send, recv, 8, ncclInt32, me.comm, me.stream));
        if (me.rank == 0) {
            posted = true;
        }
        if (me.rank == 1 && mode == 1) {
            while (!posted.load()) {
                // Spin: <thread> cannot be included beside the simulator's kernel header.
            }
            NCHECK(ncclCommAbort(me.comm));
            CHECK(cuMemsetD32(reinterpret_cast<CUdeviceptr>(flag), 1, 1));
        }
    });
    return report(r);
}

// Wrong arguments are ncclInvalidArgument, reported nowhere else; zero-byte calls with null
// buffers are fine. One rank (ncclCommInitAll).
int nccl_bad_arguments() {
    ncclComm_t comm;
    int dev = 0;
    NCHECK(ncclCommInitAll(&comm, 1, &dev));
    int* buf = alloc<int>(4);
    std::printf("NULL %s ", nccl_name(ncclAllReduce(nullptr, buf, 4, ncclInt32, ncclSum, comm, g_stream)));
    std::printf("PEER %s ", nccl_name(ncclSend(buf, 4, ncclInt32, 1, comm, g_stream)));
    std::printf("ROOT %s ", nccl_name(ncclBroadcast(buf, buf, 4, ncclInt32, -1, comm, g_stream)));
    std::printf("TYPE %s ", nccl_name(ncclAllGather(buf, buf, 1, static_cast<ncclDataType_t>(99), comm, g_stream)));
    std::printf("FP8_SUM %s ", nccl_name(ncclAllReduce(buf, buf, 4, ncclFloat8e4m3, ncclSum, comm, g_stream)));
    std::printf("TOO_LONG %s ", nccl_name(ncclAllGather(buf, buf, 5, ncclInt32, comm, g_stream)));
    std::printf("ZERO %s\n", nccl_name(ncclAllGather(nullptr, nullptr, 0, ncclInt32, comm, g_stream)));
    // A group with a bad call fails at ncclGroupEnd too, and posts none of its calls.
    NCHECK(ncclGroupStart());
    NCHECK(ncclSend(buf, 4, ncclInt32, 0, comm, g_stream));
    const ncclResult_t bad_recv = ncclRecv(buf, 4, ncclInt32, 3, comm, g_stream);
    std::printf("GROUP %s %s\n", nccl_name(bad_recv), nccl_name(ncclGroupEnd()));
    const CUresult r = sync();
    NCHECK(ncclCommDestroy(comm));
    std::printf("AFTER_DESTROY %s\n", nccl_name(ncclAllGather(buf, buf, 1, ncclInt32, comm, g_stream)));
    return report(r);
}

struct Scenario {
    const char* name;
    int (*run)();
};

const Scenario kScenarios[] = {
    {"oob_write_past_guard", oob_write_past_guard},
    {"oob_write_in_slack", oob_write_in_slack},
    {"oob_read_before_start", oob_read_before_start},
    {"use_after_free", use_after_free},
    {"null_pointer", null_pointer},
    {"fresh_memory_is_poisoned", fresh_memory_is_poisoned},
    {"shared_oob", shared_oob},
    {"barrier_mismatch", barrier_mismatch},
    {"barrier_deadlock", barrier_deadlock},
    {"partial_warp_exit", partial_warp_exit},
    {"shuffle_exited", shuffle_exited},
    {"warp_collectives", warp_collectives},
    {"spin_deadlock", spin_deadlock},
    {"timeout_fires", timeout_fires},
    {"concurrent_kernels_fit", [] { return concurrent_kernels(64); }},
    {"concurrent_kernels_starve", [] { return concurrent_kernels(132 * 2); }},
    {"trap", trap},
    {"misaligned", misaligned},
    {"unsynchronised_failure", unsynchronised_failure},
    {"ticket_order", ticket_order},
    {"launch_limits", launch_limits},
    {"tensor_map_rules", tensor_map_rules},
    {"shared_race", shared_race},
    {"shared_handoff_with_barrier", shared_handoff_with_barrier},
    {"flag_relaxed_race", [] { return flag_handoff_mode(0); }},
    {"flag_release_acquire", [] { return flag_handoff_mode(1); }},
    {"flag_fences", [] { return flag_handoff_mode(2); }},
    {"flag_unacquired_race", [] { return flag_handoff_mode(3); }},
    {"cross_stream_race", [] { return cross_stream_mode(0); }},
    {"cross_stream_event", [] { return cross_stream_mode(1); }},
    {"cross_stream_host_sync", [] { return cross_stream_mode(2); }},
    {"tma_load", [] { return tma_box_mode(0); }},
    {"tma_more_bytes_than_expected", [] { return tma_box_mode(1); }},
    {"tma_load_in_flight_at_exit", [] { return tma_box_mode(2); }},
    {"tma_store_without_proxy_fence", [] { return tma_box_mode(3); }},
    {"tma_store_with_proxy_fence", [] { return tma_box_mode(4); }},
    {"tma_store_of_early_writes_without_fence", [] { return tma_box_mode(5); }},
    {"setmaxnreg_moves_registers", [] { return registers_and_barriers_mode(0); }},
    {"setmaxnreg_beyond_the_pool", [] { return registers_and_barriers_mode(1); }},
    {"setmaxnreg_dec_upwards", [] { return registers_and_barriers_mode(2); }},
    {"mbarrier_never_completes", [] { return registers_and_barriers_mode(3); }},
    {"wgmma_accumulators", wgmma_accumulators},
    {"free_waits_for_its_own_device", free_waits_for_its_own_device},
    {"cluster_multicast", [] { return cluster_mode(0); }},
    {"cluster_barrier_not_initialised", [] { return cluster_mode(1); }},
    {"cluster_peer_exits_early", [] { return cluster_mode(2); }},
    {"cluster_odd_grid", [] { return cluster_mode(3); }},
    {"nccl_collectives_2", [] { return nccl_collectives(2); }},
    {"nccl_collectives_4", [] { return nccl_collectives(4); }},
    {"nccl_send_recv_2", [] { return nccl_send_recv(2); }},
    {"nccl_send_recv_4", [] { return nccl_send_recv(4); }},
    {"nccl_stream_order", nccl_stream_order},
    {"nccl_count_mismatch", [] { return nccl_mismatch(0); }},
    {"nccl_kind_mismatch", [] { return nccl_mismatch(1); }},
    {"nccl_peer_never_posts", [] { return nccl_missing_peer(0); }},
    {"nccl_peer_destroys_first", [] { return nccl_missing_peer(1); }},
    {"nccl_peer_stream_never_reaches", [] { return nccl_unreached(0); }},
    {"nccl_peer_aborts_first", [] { return nccl_unreached(1); }},
    {"nccl_bad_arguments", nccl_bad_arguments},
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <scenario>\nscenarios:", argv[0]);
        for (const Scenario& s : kScenarios) {
            std::fprintf(stderr, " %s", s.name);
        }
        std::fprintf(stderr, "\n");
        return 2;
    }
    for (const Scenario& s : kScenarios) {
        if (std::strcmp(s.name, argv[1]) == 0) {
            setup();
            return s.run();
        }
    }
    std::fprintf(stderr, "unknown scenario %s\n", argv[1]);
    return 2;
}
