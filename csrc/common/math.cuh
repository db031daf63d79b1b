// Small arithmetic helpers shared by host launchers and device code.
#pragma once

#include <cstdint>

namespace dk {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ constexpr T round_up(T a, T b) {
    return ceil_div(a, b) * b;
}

// Rows of a transposed f32 scale array: m rounded up to 16 bytes, as TMA requires.
__host__ __device__ constexpr int64_t tma_aligned_rows(int64_t m) {
    return round_up<int64_t>(m, 4);
}

// bf16 bits to f32: exact (bf16 is the upper half of an f32).
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) {
    return __uint_as_float(bits16 << 16);
}

inline bool is_aligned(const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace dk
