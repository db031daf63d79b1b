// The interface between kernel code compiled for the simulator (through dksim/kernel.h) and the
// simulator library (libcuda.so, the driver stand-in). Both sides are built by the same C++
// compiler, so this is a C++ interface: one function per operation a simulated thread can perform
// that involves other threads, the scheduler or the memory checks.
//
// Every function here is called from a simulated thread (a fiber) except `launch` and
// `register_kernels`, which the host-side launchers call.
#pragma once

#include <cstddef>
#include <cstdint>

#include <vector_types.h>  // uint3, dim3

namespace dksim {

// What a simulated thread sees of itself. `dksim_current` points at the running thread's.
struct ThreadCtx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

// Per-kernel facts ptxas reported for the sm_90a build of the same source (registers per thread,
// static shared memory, stack frame), keyed by the host function the kernel compiled to. The
// build script generates this table from ptxas' resource report; the simulator uses it for
// occupancy (how many CTAs fit on one SM), for cudaFuncGetAttributes and for the launch checks.
struct KernelResources {
    const void* fn;         // host entry point (null if the build has no such symbol)
    const char* mangled;    // the kernel's mangled name, as ptxas printed it
    int registers;          // per thread
    int static_smem;        // bytes
    int stack_frame;        // bytes per thread
};

// Registers the table above (called once per kernel unit at start-up; idempotent).
int register_kernels(const KernelResources* table, size_t count);

// shfl.sync modes, as PTX numbers them.
enum class Shfl : int { Up = 0, Down = 1, Bfly = 2, Idx = 3 };
enum class Vote : int { Ballot = 0, All = 1, Any = 2 };
// Read-modify-write operations of the atomic and reduction instructions.
enum class Rmw : int { Add, Exch, Min, Max, And, Or, Xor, Inc, Dec, Cas };
enum class Type : int { S32, U32, S64, U64, F32, F64 };
enum class Scope : int { Cta, Gpu, Sys };

// ---- Launch (host side) -------------------------------------------------------------------

using KernelEntry = void (*)(const void* args);
using ArgsDeleter = void (*)(void* args);

// Enqueues `entry(args)` as a grid on `stream`; takes ownership of `args`. `pretty` names the
// kernel when the resource table does not. Returns a cudaError_t (launch-configuration errors are
// returned here, as cudaLaunchKernel would; faults during execution surface at synchronisation).
// `cluster_x` > 1: a launch with the cluster dimension (cluster_x, 1, 1) (cudaLaunchKernelEx with
// cudaLaunchAttributeClusterDimension); grid.x must be a multiple of it.
int launch(const void* fn, const char* pretty, dim3 grid, dim3 block, size_t dynamic_smem, void* stream, KernelEntry entry, void* args,
           ArgsDeleter deleter, uint32_t cluster_x = 1);

// ---- Operations of a simulated thread --------------------------------------------------------

// bar.sync id, count (count 0: every thread of the CTA; __syncthreads is bar.sync 0).
void bar_sync(uint32_t id, uint32_t count);
void syncwarp(uint32_t mask);
// shfl.sync with PTX operands b (lane, delta or mask) and c (clamp and segment mask).
uint32_t shfl(Shfl mode, uint32_t mask, uint32_t value, int b, int c);
uint32_t vote(Vote kind, uint32_t mask, bool pred);
uint32_t activemask();

// An atomic read-modify-write of `type` at `addr`; returns the old value's bits.
uint64_t atomic(void* addr, Type type, Rmw op, uint64_t operand, uint64_t compare);
// ld.acquire / st.release / red.release of 32 bits at `scope`.
uint32_t ld_acquire_b32(const void* addr, Scope scope);
void st_release_b32(void* addr, uint32_t value, Scope scope);
void red_release(void* addr, Type type, Rmw op, uint64_t operand, Scope scope);
void fence(Scope scope);

void nanosleep(uint32_t ns);
uint64_t clock64();
uint64_t globaltimer();
[[noreturn]] void trap();
// An instruction the simulator does not model yet: fails the kernel with `what` named.
[[noreturn]] void unsupported(const char* what);

// Shared memory: a CTA's static variable (one per `tag`, i.e. per declaration), the dynamic
// array, and the shared-window address of a generic pointer (__cvta_generic_to_shared).
void* cta_shared(const void* tag, size_t bytes, size_t align);
void* dynamic_shared();
uint32_t cvta_shared(const void* p);

// cvt.rn.satfinite.e4m3x2.f32: `hi` to bits 15..8, `lo` to bits 7..0.
uint16_t cvt_rn_satfinite_e4m3x2(float hi, float lo);

// ---- Hopper's asynchronous units (mbarrier, TMA, wgmma) and their fences --------------------------

void mbarrier_init(uint64_t* bar, uint32_t count);
void mbarrier_arrive(uint64_t* bar);
void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes);
bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity);
void fence_mbarrier_init();
void fence_proxy_async_shared();
void fence_proxy_async_global();
void prefetch_tensormap(const void* map);

// cp.async.bulk.tensor.2d: a box of `map` at (x, y) into shared memory, completing on `bar`; and
// the store from shared memory, in the calling thread's bulk async-group.
void tma_load_2d(void* dst, const void* map, uint64_t* bar, int32_t x, int32_t y);
void tma_store_2d(const void* map, const void* src, int32_t x, int32_t y);
void bulk_commit_group();
// cp.async.bulk.wait_group[.read] n.
void bulk_wait_group(int n, bool read_only);

enum class MmaType : int { E4M3, BF16, F16 };
// wgmma.mma_async m64nNk(32 for E4M3, 16 otherwise), f32 accumulators `d` (N / 2 per thread), A
// and B in shared memory through descriptors; B K-major, or MN-major when `b_mn_major`.
void wgmma(MmaType type, int n, bool b_mn_major, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d);
void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(int n);
// setmaxnreg.inc / .dec.
void setmaxnreg(bool increase, uint32_t registers);

// ---- Thread-block clusters (launches with a cluster dimension along x) ---------------------------

// %cluster_ctarank and %cluster_nctarank (0 and 1 outside a cluster launch).
uint32_t cluster_ctarank();
uint32_t cluster_nctarank();
// barrier.cluster.arrive.release and barrier.cluster.wait.acquire: the wait returns once every
// thread of every CTA of the cluster (exited ones count as arrived) has arrived in this phase.
void barrier_cluster_arrive();
void barrier_cluster_wait();
// mapa.shared::cluster.u32: the shared::cluster address of shared::cta address `addr` in the CTA of
// rank `rank` (distributed shared memory). A shared::cta address is also the shared::cluster
// address of the same location in the CTA's own window.
uint32_t mapa_shared(uint32_t addr, uint32_t rank);
// mbarrier.arrive.release.cluster.shared::cluster.b64 on the mbarrier at a shared::cluster address.
void mbarrier_arrive_cluster(uint32_t addr);
// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster:
// the box lands at `dst`'s offset in the window of every CTA whose rank is set in `mask`, and
// completes its bytes on the mbarrier at `bar`'s offset in each of them.
void tma_load_2d_multicast(void* dst, const void* map, uint64_t* bar, int32_t x, int32_t y, uint16_t mask);

}  // namespace dksim

// The running simulated thread (null outside kernels).
extern "C" dksim::ThreadCtx* dksim_current;
