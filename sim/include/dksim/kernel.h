// The host shim: what a kernel source under csrc/ needs from CUDA when it is compiled by the host
// C++ compiler for the simulator instead of by nvcc for a GPU. The build script force-includes it
// (-include dksim/kernel.h) before every kernel unit, with DEEPKERN_SIM defined.
//
// Types, the runtime API's declarations and the host paths of the bf16/fp16 conversions come from
// the CUDA headers themselves. This header adds what only exists on the device: the built-in
// index variables, barriers, warp collectives, atomics, fences, timers and bit intrinsics. Every
// one that involves other threads calls into the simulator (dksim/abi.h), which is where the
// scheduler switches threads. Inline PTX stays in csrc/common/ptx.cuh, whose host branches call
// the simulator's emulation of each instruction.
#pragma once

#if !defined(DEEPKERN_SIM)
#error "dksim/kernel.h is the simulator's host shim; compile with -DDEEPKERN_SIM"
#endif

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "dksim/abi.h"

// Launch bounds only matter to ptxas; the simulator reads the resulting registers from ptxas'
// report instead.
#define __launch_bounds__(...)
// A kernel stays a function of its own (never inlined into the launch), so reports name it.
#undef __global__
#define __global__ __attribute__((noinline))

// ---- Built-in variables ------------------------------------------------------------------------

#define threadIdx (::dksim_current->thread_idx)
#define blockIdx (::dksim_current->block_idx)
#define blockDim (::dksim_current->block_dim)
#define gridDim (::dksim_current->grid_dim)

// ---- Barriers and warp collectives -------------------------------------------------------------

inline void __syncthreads() { ::dksim::bar_sync(0, 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::dksim::syncwarp(mask); }

namespace dksim::detail {

template <typename T>
inline T shfl_any(Shfl mode, unsigned mask, T var, int b, int c) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 2, 4 or 8 bytes");
    if constexpr (sizeof(T) == 8) {
        uint32_t w[2];
        std::memcpy(w, &var, 8);
        w[0] = ::dksim::shfl(mode, mask, w[0], b, c);
        w[1] = ::dksim::shfl(mode, mask, w[1], b, c);
        std::memcpy(&var, w, 8);
    } else {
        uint32_t w = 0;
        std::memcpy(&w, &var, sizeof(T));
        w = ::dksim::shfl(mode, mask, w, b, c);
        std::memcpy(&var, &w, sizeof(T));
    }
    return var;
}

// The c operand CUDA's headers pass to shfl.sync for a segment of `width` lanes.
constexpr int shfl_c(int width, bool clamp_high) { return ((32 - width) << 8) | (clamp_high ? 0x1f : 0); }

}  // namespace dksim::detail

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return ::dksim::detail::shfl_any(::dksim::Shfl::Idx, mask, var, src_lane, ::dksim::detail::shfl_c(width, true));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::dksim::detail::shfl_any(::dksim::Shfl::Up, mask, var, static_cast<int>(delta), ::dksim::detail::shfl_c(width, false));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::dksim::detail::shfl_any(::dksim::Shfl::Down, mask, var, static_cast<int>(delta), ::dksim::detail::shfl_c(width, true));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return ::dksim::detail::shfl_any(::dksim::Shfl::Bfly, mask, var, lane_mask, ::dksim::detail::shfl_c(width, true));
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return ::dksim::vote(::dksim::Vote::Ballot, mask, pred != 0); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(::dksim::vote(::dksim::Vote::All, mask, pred != 0)); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(::dksim::vote(::dksim::Vote::Any, mask, pred != 0)); }
inline unsigned __activemask() { return ::dksim::activemask(); }

// ---- Atomics -----------------------------------------------------------------------------------

namespace dksim::detail {

template <typename T>
constexpr Type type_of() {
    if constexpr (std::is_same_v<T, float>) {
        return Type::F32;
    } else if constexpr (std::is_same_v<T, double>) {
        return Type::F64;
    } else if constexpr (sizeof(T) == 4) {
        return std::is_signed_v<T> ? Type::S32 : Type::U32;
    } else {
        static_assert(sizeof(T) == 8, "atomics on 4- and 8-byte types");
        return std::is_signed_v<T> ? Type::S64 : Type::U64;
    }
}

template <typename T>
inline uint64_t bits_of(T v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

template <typename T>
inline T rmw(T* addr, Rmw op, T operand, T compare = T{}) {
    return from_bits<T>(::dksim::atomic(addr, type_of<T>(), op, bits_of(operand), bits_of(compare)));
}

}  // namespace dksim::detail

#define DKSIM_ATOMIC(NAME, OP)                                              \
    template <typename T>                                                   \
    inline T NAME(T* addr, T v) {                                           \
        return ::dksim::detail::rmw(addr, ::dksim::Rmw::OP, v);             \
    }                                                                       \
    template <typename T>                                                   \
    inline T NAME##_block(T* addr, T v) {                                   \
        return ::dksim::detail::rmw(addr, ::dksim::Rmw::OP, v);             \
    }                                                                       \
    template <typename T>                                                   \
    inline T NAME##_system(T* addr, T v) {                                  \
        return ::dksim::detail::rmw(addr, ::dksim::Rmw::OP, v);             \
    }
DKSIM_ATOMIC(atomicAdd, Add)
DKSIM_ATOMIC(atomicExch, Exch)
DKSIM_ATOMIC(atomicMin, Min)
DKSIM_ATOMIC(atomicMax, Max)
DKSIM_ATOMIC(atomicAnd, And)
DKSIM_ATOMIC(atomicOr, Or)
DKSIM_ATOMIC(atomicXor, Xor)
#undef DKSIM_ATOMIC

template <typename T>
inline T atomicSub(T* addr, T v) {
    return ::dksim::detail::rmw(addr, ::dksim::Rmw::Add, static_cast<T>(T{} - v));
}
inline unsigned atomicInc(unsigned* addr, unsigned limit) { return ::dksim::detail::rmw(addr, ::dksim::Rmw::Inc, limit); }
inline unsigned atomicDec(unsigned* addr, unsigned limit) { return ::dksim::detail::rmw(addr, ::dksim::Rmw::Dec, limit); }
template <typename T>
inline T atomicCAS(T* addr, T compare, T v) {
    return ::dksim::detail::rmw(addr, ::dksim::Rmw::Cas, v, compare);
}

// ---- Fences, timers, traps ---------------------------------------------------------------------

inline void __threadfence_block() { ::dksim::fence(::dksim::Scope::Cta); }
inline void __threadfence() { ::dksim::fence(::dksim::Scope::Gpu); }
inline void __threadfence_system() { ::dksim::fence(::dksim::Scope::Sys); }
inline void __nanosleep(unsigned ns) { ::dksim::nanosleep(ns); }
inline long long clock64() { return static_cast<long long>(::dksim::clock64()); }
inline int clock() { return static_cast<int>(::dksim::clock64()); }
[[noreturn]] inline void __trap() { ::dksim::trap(); }
inline size_t __cvta_generic_to_shared(const void* p) { return ::dksim::cvta_shared(p); }

// ---- Loads -------------------------------------------------------------------------------------

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

// ---- Arithmetic and bit intrinsics -------------------------------------------------------------
// The host compiler is run with -ffp-contract=off, so these are single IEEE operations, rounded to
// nearest even, as the _rn intrinsics are on the GPU. Transcendental functions (expf, exp2f, ...)
// are the host's libm: they may differ from the GPU's in the last bit.

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }

inline unsigned __float_as_uint(float v) { return ::dksim::detail::from_bits<unsigned>(::dksim::detail::bits_of(v)); }
inline float __uint_as_float(unsigned v) { return ::dksim::detail::from_bits<float>(::dksim::detail::bits_of(v)); }
inline int __float_as_int(float v) { return ::dksim::detail::from_bits<int>(::dksim::detail::bits_of(v)); }
inline float __int_as_float(int v) { return ::dksim::detail::from_bits<float>(::dksim::detail::bits_of(v)); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) {
        r |= ((v >> i) & 1u) << (31 - i);
    }
    return r;
}

// CUDA's min and max: overloaded for every integer and floating type, mixed types promoted.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---- Runtime API on kernel entry points --------------------------------------------------------
// nvcc's cuda_runtime.h adds these templates over the `const void*` functions only when it compiles
// CUDA; the launchers call them with a kernel's address.

template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
    return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// ---- Launch ------------------------------------------------------------------------------------

namespace dksim {

// The generated table of ptxas facts (one definition in the kernel library) and its registration,
// run at start-up by every kernel unit.
extern const KernelResources kernel_resources[];
extern const size_t kernel_resource_count;
[[maybe_unused]] static const int kernel_resources_registered = register_kernels(kernel_resources, kernel_resource_count);

namespace detail {
template <auto Kernel, typename... P, typename... A>
inline int launch_as(void (*)(P...), const char* pretty, dim3 grid, dim3 block, uint32_t cluster_x, size_t smem, cudaStream_t stream,
                     const A&... args) {
    // The parameters as the kernel declares them, copied once at launch (a GPU copies them into
    // constant memory); every simulated thread then gets its own copy, as by-value parameters.
    using Params = std::tuple<std::decay_t<P>...>;
    auto* params = new Params(args...);
    return ::dksim::launch(
        reinterpret_cast<const void*>(Kernel), pretty, grid, block, smem, stream,
        [](const void* p) { std::apply(Kernel, *static_cast<const Params*>(p)); }, params,
        [](void* p) { delete static_cast<Params*>(p); }, cluster_x);
}
}  // namespace detail

// Enqueues `Kernel<<<grid, block, smem, stream>>>(args...)` on the simulator.
template <auto Kernel, typename... A>
inline int launch(const char* pretty, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const A&... args) {
    return detail::launch_as<Kernel>(Kernel, pretty, grid, block, 1, smem, stream, args...);
}

// The same with the cluster dimension (cluster_x, 1, 1).
template <auto Kernel, typename... A>
inline int launch_cluster(const char* pretty, dim3 grid, dim3 block, uint32_t cluster_x, size_t smem, cudaStream_t stream, const A&... args) {
    return detail::launch_as<Kernel>(Kernel, pretty, grid, block, cluster_x, smem, stream, args...);
}

}  // namespace dksim
