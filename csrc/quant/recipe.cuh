// The FP8 scaling recipe shared by the quantisers (DeepSeek-V3): scale = max(amax, 1e-4) / 448,
// optionally rounded up to a power of two, and q = e4m3_rn_satfinite(x * (1 / scale)).
// NOTES: explicit _rn operations keep every quantiser bit-identical to the CPU reference
// (deepkern::reference::quant): no FMA contraction, IEEE division whatever the compiler flags.
#pragma once

#include <cstdint>

#include "common/math.cuh"
#include "common/ptx.cuh"
#include "deepkern.h"

namespace dk::quant {

constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Rounds a positive normal scale up to a power of two (UE8M0): bump the exponent when the
// mantissa is non-zero. Matches deepkern::fp8::ue8m0_ceil bit for bit on that domain.
__device__ __forceinline__ float ue8m0_ceil(float s) {
    uint32_t bits = __float_as_uint(s);
    if (bits & 0x007fffffu) {
        bits = (bits & 0xff800000u) + 0x00800000u;
    }
    return __uint_as_float(bits);
}

// The scale of a group whose largest magnitude is `amax` (NaN-free: callers fold with fmaxf).
template <bool kUe8m0>
__device__ __forceinline__ float group_scale(float amax) {
    const float scale = __fdiv_rn(fmaxf(amax, kAmaxFloor), kE4m3Max);
    if constexpr (kUe8m0) {
        return ue8m0_ceil(scale);
    }
    return scale;
}

// Eight consecutive bf16 (one 16-byte load) to f32, in memory order.
__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[8]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = bf16_bits_to_float(words[i] & 0xffffu);
        v[2 * i + 1] = bf16_bits_to_float(words[i] >> 16);
    }
}

// max(acc, |v[i]|) over eight values; fmaxf drops NaN, like f32::max on the CPU.
__device__ __forceinline__ float amax8(float acc, const float (&v)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        acc = fmaxf(acc, fabsf(v[i]));
    }
    return acc;
}

// Eight values times `inv`, to E4M3, packed in memory order into 8 bytes.
__device__ __forceinline__ uint2 quantize_e4m3x8(const float (&v)[8], float inv) {
    uint32_t packed[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t lo = ptx::cvt_rn_satfinite_e4m3x2_f32(__fmul_rn(v[4 * i + 1], inv), __fmul_rn(v[4 * i], inv));
        const uint32_t hi = ptx::cvt_rn_satfinite_e4m3x2_f32(__fmul_rn(v[4 * i + 3], inv), __fmul_rn(v[4 * i + 2], inv));
        packed[i] = lo | (hi << 16);
    }
    return make_uint2(packed[0], packed[1]);
}

// One lane's share of a 128-group held by a half-warp (16 lanes x 8 values): the group's amax
// across the half-warp, its scale (returned through `scale`), and this lane's 8 codes.
template <bool kUe8m0>
__device__ __forceinline__ uint2 quantize_half_warp_group(const float (&v)[8], float& scale) {
    float amax = amax8(0.0f, v);
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    scale = group_scale<kUe8m0>(amax);
    return quantize_e4m3x8(v, __fdiv_rn(1.0f, scale));
}

// The launchers' checks for a batch of [num_groups, rows, k] bf16 -> e4m3 operands with f32
// scales: DK_STATUS_OK with `*empty` set when there is nothing to do. These re-check only what
// would be undefined behaviour on the device; the Rust wrappers validate user input first.
inline dk_status_t check_batch(int64_t num_groups, int64_t rows, int64_t k, const void* x, const void* q, const void* sf, bool* empty) {
    *empty = false;
    if (num_groups < 0 || rows < 0 || k < 0 || k % DK_QUANT_GROUP != 0) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (num_groups == 0 || rows == 0 || k == 0) {
        *empty = true;
        return DK_STATUS_OK;
    }
    constexpr int64_t kLimit = int64_t(1) << 62;
    if (rows > kLimit / k || num_groups > kLimit / (rows * k)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (x == nullptr || q == nullptr || sf == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (!is_aligned(x, 16) || !is_aligned(q, 8) || !is_aligned(sf, 16)) {
        return DK_STATUS_MISALIGNED;
    }
    return DK_STATUS_OK;
}

}  // namespace dk::quant
