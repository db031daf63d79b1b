// The only file in csrc/ with inline PTX: one small function per instruction, named after it.
// Every function compiles only for the architectures that have the instruction; elsewhere it traps,
// so a wrong-architecture build fails loudly instead of computing garbage.
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
#else
    __trap();
    return uint4{};
#endif
}

}  // namespace dk::ptx
