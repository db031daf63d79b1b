// The only file in csrc/ with inline PTX: one small function per instruction, named after it.
// Every function compiles only for the architectures that have the instruction; elsewhere it traps,
// so a wrong-architecture build fails loudly instead of computing garbage. In the simulator's host
// build (DEEPKERN_SIM) each calls the simulator's model of its instruction instead (dksim/abi.h);
// instructions it does not model yet fail the kernel with their name.
#pragma once

#include <cstdint>

namespace dk::ptx {

// cvt.rn.satfinite.e4m3x2.f32: two f32 to a packed pair of FP8 E4M3, round to nearest even,
// saturating to +-448 (NaN stays NaN). `hi` lands in bits 15..8, `lo` in bits 7..0, so for two
// consecutive elements e0, e1 in memory order call it as (e1, e0).
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cvt
// NOTES: register-only, so no "memory" clobber and not volatile: the compiler may schedule it freely.
__device__ __forceinline__ uint16_t cvt_rn_satfinite_e4m3x2_f32(float hi, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
#elif defined(DEEPKERN_SIM)
    return ::dksim::cvt_rn_satfinite_e4m3x2(hi, lo);
#else
    __trap();
    return 0;
#endif
}

// ld.global.nc.L1::no_allocate.v4.u32: a 16-byte read-only load that does not pollute L1, for data
// read exactly once. `ptr` must be 16-byte aligned and must not be written during the kernel.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-ld
__device__ __forceinline__ uint4 ld_global_nc_no_allocate_v4(const void* ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
#elif defined(DEEPKERN_SIM)
    return *static_cast<const uint4*>(ptr);
#else
    __trap();
    return uint4{};
#endif
}


// ---- Cross-GPU signalling ----------------------------------------------------------------------

// ld.acquire.sys.global.u32: read a flag that another GPU (or the host) may write; later reads and
// writes of this thread are ordered after it, at system scope.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#memory-consistency-model
__device__ __forceinline__ uint32_t ld_acquire_sys_global_u32(const uint32_t* ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
#elif defined(DEEPKERN_SIM)
    return ::dksim::ld_acquire_b32(ptr, ::dksim::Scope::Sys);
#else
    __trap();
    return 0;
#endif
}

// ld.relaxed.sys.global.u32: poll a flag that another GPU (or the host) may write, without the
// cost of an acquire (whose cache invalidation every iteration of a polling loop would pay); once
// the value is seen, one ld_acquire_sys_global_u32 of the same flag orders what follows.
__device__ __forceinline__ uint32_t ld_relaxed_sys_global_u32(const uint32_t* ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    uint32_t v;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
#elif defined(DEEPKERN_SIM)
    // A strong relaxed access in the simulator's race mode (volatile, see docs/simulator.md).
    return *static_cast<const volatile uint32_t*>(ptr);
#else
    __trap();
    return 0;
#endif
}

// st.release.sys.global.u32: publish a flag; earlier reads and writes of this thread (and, with a
// preceding barrier, of its block) are visible at system scope before the flag is.
__device__ __forceinline__ void st_release_sys_global_u32(uint32_t* ptr, uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::st_release_b32(ptr, v, ::dksim::Scope::Sys);
#else
    __trap();
#endif
}

// ---- Producer/consumer counters between concurrent kernels of one GPU -----------------------

// ld.acquire.gpu.global.s32: read a counter another kernel on this GPU increments; later reads and
// writes of this thread are ordered after it, at GPU scope.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#memory-consistency-model
__device__ __forceinline__ int32_t ld_acquire_gpu_global_s32(const int32_t* ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    int32_t v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
#elif defined(DEEPKERN_SIM)
    return static_cast<int32_t>(::dksim::ld_acquire_b32(ptr, ::dksim::Scope::Gpu));
#else
    __trap();
    return 0;
#endif
}

// ld.relaxed.gpu.global.s32: poll a counter another kernel on this GPU increments, without an
// acquire's cost in every iteration; once the value is seen, one ld_acquire_gpu_global_s32 of the
// same counter orders what follows.
__device__ __forceinline__ int32_t ld_relaxed_gpu_global_s32(const int32_t* ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    int32_t v;
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
#elif defined(DEEPKERN_SIM)
    // A strong relaxed access in the simulator's race mode (volatile, see docs/simulator.md).
    return *static_cast<const volatile int32_t*>(ptr);
#else
    __trap();
    return 0;
#endif
}

// red.release.gpu.global.add.s32: add to a counter; earlier reads and writes of this thread (and,
// after a barrier, of the threads it synchronised with) are visible at GPU scope before the add.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-red
__device__ __forceinline__ void red_release_gpu_global_add_s32(int32_t* ptr, int32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::red_release(ptr, ::dksim::Type::S32, ::dksim::Rmw::Add, static_cast<uint32_t>(v), ::dksim::Scope::Gpu);
#else
    __trap();
#endif
}

// mov.u64 %globaltimer: the GPU's nanosecond timer (for timeouts, not for timing kernels).
// https://docs.nvidia.com/cuda/parallel-thread-execution/#special-registers-globaltimer
__device__ __forceinline__ uint64_t globaltimer() {
#if defined(__CUDA_ARCH__)
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
#elif defined(DEEPKERN_SIM)
    return ::dksim::globaltimer();
#else
    return 0;
#endif
}

// ---- Hopper (sm_90a) asynchronous machinery -------------------------------------------------
// Each function below compiles only for sm_90a (arch-specific features); elsewhere it traps.

// mbarrier.init: a shared-memory barrier expecting `count` arrivals per phase.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-mbarrier-init
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(count) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::mbarrier_init(bar, count);
#else
    __trap();
#endif
}

// mbarrier.arrive.expect_tx: arrive once and expect `bytes` more of asynchronous transactions.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-mbarrier-arrive
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(bytes)
                 : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::mbarrier_arrive_expect_tx(bar, bytes);
#else
    __trap();
#endif
}

// mbarrier.arrive: one arrival.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-mbarrier-arrive
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::mbarrier_arrive(bar);
#else
    __trap();
#endif
}

// mbarrier.try_wait.parity: whether the phase with parity `parity` has completed.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-mbarrier-test-wait-try-wait
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(parity)
        : "memory");
    return done != 0;
#elif defined(DEEPKERN_SIM)
    return ::dksim::mbarrier_try_wait_parity(bar, parity);
#else
    __trap();
    return false;
#endif
}

// fence.mbarrier_init.release.cluster: make barrier initialisation visible to the async proxy.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-membar
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::fence_mbarrier_init();
#else
    __trap();
#endif
}

// fence.proxy.async.shared::cta: order generic-proxy shared-memory accesses with the async proxy.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-membar
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::fence_proxy_async_shared();
#else
    __trap();
#endif
}

// fence.proxy.async.global: order generic-proxy global-memory accesses (e.g. rows another kernel
// wrote, observed through an acquire) before this thread's later async-proxy (TMA) reads.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-membar
__device__ __forceinline__ void fence_proxy_async_global() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.global;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::fence_proxy_async_global();
#else
    __trap();
#endif
}

// prefetch.tensormap: bring a kernel-parameter tensor map into the descriptor cache.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-prefetch-prefetchu
__device__ __forceinline__ void prefetch_tensormap(const void* map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::prefetch_tensormap(map);
#else
    __trap();
#endif
}

// %cluster_ctarank: this CTA's rank in its cluster (0 outside a cluster launch).
// https://docs.nvidia.com/cuda/parallel-thread-execution/#special-registers-cluster-ctarank
__device__ __forceinline__ uint32_t cluster_ctarank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
#elif defined(DEEPKERN_SIM)
    return ::dksim::cluster_ctarank();
#else
    __trap();
    return 0;
#endif
}

// barrier.cluster.arrive.release.aligned: this thread arrives at the cluster barrier, releasing its
// prior writes (shared memory and mbarrier initialisation included) to the cluster.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-barrier-cluster
__device__ __forceinline__ void barrier_cluster_arrive_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::barrier_cluster_arrive();
#else
    __trap();
#endif
}

// barrier.cluster.wait.acquire.aligned: waits until every thread of the cluster has arrived.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-barrier-cluster
__device__ __forceinline__ void barrier_cluster_wait_acquire() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::barrier_cluster_wait();
#else
    __trap();
#endif
}

// mapa.shared::cluster.u32: the shared::cluster address of `p` (this CTA's shared memory) in the
// CTA of rank `rank` of the cluster.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-mapa
__device__ __forceinline__ uint32_t mapa_shared_cluster(const void* p, uint32_t rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))), "r"(rank));
    return out;
#elif defined(DEEPKERN_SIM)
    return ::dksim::mapa_shared(::dksim::cvta_shared(p), rank);
#else
    __trap();
    return 0;
#endif
}

// mbarrier.arrive.release.cluster.shared::cluster: one arrival on the mbarrier at a shared::cluster
// address (another CTA's, from mapa_shared_cluster), releasing this thread's prior accesses.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-mbarrier-arrive
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t cluster_addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(cluster_addr) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::mbarrier_arrive_cluster(cluster_addr);
#else
    __trap();
#endif
}

// cp.async.bulk.tensor.2d ... .multicast::cluster (TMA multicast load): the box at (x, y) of `map`
// lands at `dst`'s offset in the shared memory of every CTA of the cluster whose rank is set in
// `mask`, completing its bytes on the mbarrier at `bar`'s offset in each of them.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-tensor
__device__ __forceinline__ void cp_async_bulk_tensor_2d_global_to_shared_multicast(void* dst, const void* map, uint64_t* bar, int32_t x,
                                                                                  int32_t y, uint16_t mask) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(
            static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
        "l"(reinterpret_cast<uint64_t>(map)),
        "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
        "r"(x),
        "r"(y),
        "h"(mask)
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::tma_load_2d_multicast(dst, map, bar, x, y, mask);
#else
    __trap();
#endif
}

// cp.async.bulk.tensor.2d (TMA load): the box at (x, y) of `map` into shared memory `dst`,
// completing `bytes` of transactions on `bar`.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-tensor
__device__ __forceinline__ void cp_async_bulk_tensor_2d_global_to_shared(void* dst, const void* map, uint64_t* bar, int32_t x, int32_t y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
            static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
        "l"(reinterpret_cast<uint64_t>(map)),
        "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
        "r"(x),
        "r"(y)
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::tma_load_2d(dst, map, bar, x, y);
#else
    __trap();
#endif
}

// cp.async.bulk.tensor.2d (TMA store): shared memory `src` to the box at (x, y) of `map`, in the
// calling thread's bulk async-group; elements outside the tensor are not written.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-tensor
__device__ __forceinline__ void cp_async_bulk_tensor_2d_shared_to_global(const void* map, const void* src, int32_t x, int32_t y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(reinterpret_cast<uint64_t>(map)),
                 "r"(static_cast<uint32_t>(__cvta_generic_to_shared(src))),
                 "r"(x),
                 "r"(y)
                 : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::tma_store_2d(map, src, x, y);
#else
    __trap();
#endif
}

// cp.async.bulk.commit_group: close the calling thread's bulk async-group of operations so far.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-commit-group
__device__ __forceinline__ void cp_async_bulk_commit_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::bulk_commit_group();
#else
    __trap();
#endif
}

// cp.async.bulk.wait_group.read N: wait until at most N of the calling thread's bulk groups still
// read their shared-memory sources (the sources may then be overwritten).
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-wait-group
template <int N>
__device__ __forceinline__ void cp_async_bulk_wait_group_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::bulk_wait_group(N, true);
#else
    __trap();
#endif
}

// cp.async.bulk.wait_group N: wait until at most N of the calling thread's bulk groups are
// incomplete (their writes done).
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async-bulk-wait-group
template <int N>
__device__ __forceinline__ void cp_async_bulk_wait_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::bulk_wait_group(N, false);
#else
    __trap();
#endif
}

// wgmma.fence: order register and shared-memory accesses before the next wgmma.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-fence
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma_fence();
#else
    __trap();
#endif
}

// Pins an accumulator register around asynchronous wgmma use: the compiler may not move reads or
// writes of `r` across this point (an empty asm with a read-write operand; emits nothing). Use it
// on every accumulator before wgmma.fence, after commit_group and after wait_group, so no
// arithmetic on the accumulators lands between an issue and its wait.
__device__ __forceinline__ void fence_operand(float& r) {
#if defined(DEEPKERN_SIM)
    (void)r;  // the simulator's wgmma is an ordinary call: nothing can move across it
#else
    asm volatile("" : "+f"(r)::"memory");
#endif
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        fence_operand(r[i]);
    }
}

// wgmma.commit_group: close the group of wgmma operations issued so far.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-commit-group
__device__ __forceinline__ void wgmma_commit_group() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma_commit_group();
#else
    __trap();
#endif
}

// wgmma.wait_group: wait until at most N groups are pending.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-wait-group
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma_wait_group(N);
#else
    __trap();
#endif
}

// setmaxnreg.inc / .dec: move registers between the warpgroups of a warp-specialised CTA.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#miscellaneous-instructions-setmaxnreg
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
#elif defined(DEEPKERN_SIM)
    ::dksim::setmaxnreg(true, N);
#else
    __trap();
#endif
}
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#elif defined(DEEPKERN_SIM)
    ::dksim::setmaxnreg(false, N);
#else
    __trap();
#endif
}

// wgmma.mma_async m64nNk32, f32 += e4m3 x e4m3, both operands K-major in shared memory
// (descriptors), one warpgroup, for the N of the FP8 GEMM's tile menu (one function per shape:
// the register list is part of the instruction). `scale_d = false` overwrites the accumulator
// instead of adding.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-mma-async
// NOTES: "memory" clobber: the instruction reads shared memory written by TMA.
__device__ __forceinline__ void wgmma_m64n16k32_f32_e4m3_e4m3(float (&d)[8], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "%8, %9, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 16, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n32k32_f32_e4m3_e4m3(float (&d)[16], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 32, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n48k32_f32_e4m3_e4m3(float (&d)[24], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %26, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n48k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, "
        "%24, %25, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 48, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n64k32_f32_e4m3_e4m3(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 64, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n80k32_f32_e4m3_e4m3(float (&d)[40], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %42, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n80k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, "
        "%40, %41, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 80, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n96k32_f32_e4m3_e4m3(float (&d)[48], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
        "%48, %49, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 96, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n112k32_f32_e4m3_e4m3(float (&d)[56], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %58, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n112k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55}, "
        "%56, %57, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 112, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n128k32_f32_e4m3_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 128, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n144k32_f32_e4m3_e4m3(float (&d)[72], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %74, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n144k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71}, "
        "%72, %73, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 144, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n160k32_f32_e4m3_e4m3(float (&d)[80], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %82, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n160k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79}, "
        "%80, %81, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 160, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n176k32_f32_e4m3_e4m3(float (&d)[88], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, "
        "%88, %89, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 176, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n192k32_f32_e4m3_e4m3(float (&d)[96], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
        "%96, %97, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::E4M3, 192, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}



// The m64nNk32 E4M3 wgmma for a compile-time N of the menu above.
template <int N>
__device__ __forceinline__ void wgmma_m64k32_f32_e4m3_e4m3(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
    if constexpr (N == 16) {
        wgmma_m64n16k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 32) {
        wgmma_m64n32k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 48) {
        wgmma_m64n48k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 64) {
        wgmma_m64n64k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 80) {
        wgmma_m64n80k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 96) {
        wgmma_m64n96k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 112) {
        wgmma_m64n112k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 128) {
        wgmma_m64n128k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 144) {
        wgmma_m64n144k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 160) {
        wgmma_m64n160k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 176) {
        wgmma_m64n176k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else if constexpr (N == 192) {
        wgmma_m64n192k32_f32_e4m3_e4m3(d, desc_a, desc_b, scale_d);
    } else {
        static_assert(N == 16, "no m64nNk32 E4M3 wgmma wrapper for this N");
    }
}

// bar.sync id, count: a named barrier for `count` threads (a multiple of 32) of the CTA; barrier 0
// is __syncthreads', so use 1..15.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-bar
__device__ __forceinline__ void bar_sync(uint32_t id, uint32_t count) {
#if defined(__CUDA_ARCH__)
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::bar_sync(id, count);
#endif
}

// wgmma.mma_async m64n32k16, f32 += bf16 x bf16, A K-major and B K-major, both in shared memory
// (descriptors), one warpgroup. `scale_d = false` overwrites the accumulator instead of adding.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-mma-async
// NOTES: "memory" clobber: the instruction reads shared memory written by TMA and by threads.
__device__ __forceinline__ void wgmma_m64n32k16_f32_bf16_bf16(float (&d)[16], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::BF16, 32, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

// wgmma.mma_async m64n256k16, f32 += bf16 x bf16, A K-major and B MN-major (transposed: N contiguous), both in shared memory
// (descriptors), one warpgroup. `scale_d = false` overwrites the accumulator instead of adding.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-mma-async
// NOTES: "memory" clobber: the instruction reads shared memory written by TMA and by threads.
__device__ __forceinline__ void wgmma_m64n256k16_f32_bf16_bf16_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::BF16, 256, true, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

// wgmma.mma_async m64n32k16, f32 += f16 x f16, A K-major and B K-major, both in shared memory
// (descriptors), one warpgroup. `scale_d = false` overwrites the accumulator instead of adding.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-mma-async
// NOTES: "memory" clobber: the instruction reads shared memory written by TMA and by threads.
__device__ __forceinline__ void wgmma_m64n32k16_f32_f16_f16(float (&d)[16], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::F16, 32, false, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

// wgmma.mma_async m64n256k16, f32 += f16 x f16, A K-major and B MN-major (transposed: N contiguous), both in shared memory
// (descriptors), one warpgroup. `scale_d = false` overwrites the accumulator instead of adding.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#asynchronous-warpgroup-level-matrix-instructions-wgmma-mma-async
// NOTES: "memory" clobber: the instruction reads shared memory written by TMA and by threads.
__device__ __forceinline__ void wgmma_m64n256k16_f32_f16_f16_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(int32_t(scale_d))
        : "memory");
#elif defined(DEEPKERN_SIM)
    ::dksim::wgmma(::dksim::MmaType::F16, 256, true, d, desc_a, desc_b, scale_d);
#else
    __trap();
#endif
}

}  // namespace dk::ptx
