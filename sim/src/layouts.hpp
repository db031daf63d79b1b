// The simulator's reading of Hopper's shared-memory layouts, as pure functions: the swizzle TMA and
// wgmma apply to shared addresses, the wgmma matrix descriptor's operand layouts, and the
// accumulator fragment. async_ops.cpp uses them; sim/tests/cute_check.cpp compares them with CuTe
// (Swizzle<B,4,3>, the canonical GMMA layouts and make_gmma_desc, CLayout_64xN).
#pragma once

#include <cstdint>

namespace dksim::layouts {

// The 16-byte chunk index (address bits 4..) XOR the 128-byte row index (bits 7..), over 1, 2 or 3
// bits for a 32-, 64- or 128-byte swizzle span; 0: no swizzle.
inline uint32_t swizzle(uint32_t addr, uint32_t span) {
    const uint32_t mask = span == 128 ? 7 : (span == 64 ? 3 : (span == 32 ? 1 : 0));
    return addr ^ (((addr >> 7) & mask) << 4);
}

// Fields of a wgmma shared-memory matrix descriptor (PTX "Matrix Descriptor Format").
struct Descriptor {
    uint32_t start, lbo, sbo;  // bytes
    uint32_t base_offset;
    uint32_t span;             // swizzle span in bytes (128, 64, 32), 0 for the interleaved layout
};

inline Descriptor decode(uint64_t desc) {
    const uint32_t mode = uint32_t(desc >> 62);
    return Descriptor{uint32_t(desc & 0x3fff) << 4, uint32_t((desc >> 16) & 0x3fff) << 4, uint32_t((desc >> 32) & 0x3fff) << 4,
                      uint32_t((desc >> 49) & 7), mode == 1 ? 128u : (mode == 2 ? 64u : (mode == 3 ? 32u : 0u))};
}

// Shared address of element (mn, k) of a swizzled operand (span > 0) through its descriptor. K-major:
// rows of `span` bytes along K, 8-row atoms SBO apart, further K atoms LBO apart. MN-major: rows of
// `span` bytes along MN for each k, 8-k atoms SBO apart, further MN atoms LBO apart. The swizzle
// applies to the resulting address.
inline uint32_t operand_addr(uint64_t desc, bool mn_major, int elem_bytes, int mn, int k) {
    const Descriptor d = decode(desc);
    const uint32_t e = uint32_t(elem_bytes);
    uint32_t a;
    if (!mn_major) {
        const uint32_t kb = uint32_t(k) * e;
        a = d.start + uint32_t(mn / 8) * d.sbo + uint32_t(mn % 8) * d.span + (kb / d.span) * d.lbo + kb % d.span;
    } else {
        const uint32_t per = d.span / e;
        a = d.start + (uint32_t(mn) / per) * d.lbo + uint32_t(k / 8) * d.sbo + uint32_t(k % 8) * d.span + (uint32_t(mn) % per) * e;
    }
    return swizzle(a, d.span);
}

// Register i of thread t (0..127) of a warpgroup's m64nN f32 accumulator: its row and column of D.
inline int acc_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i >> 1) & 1); }
inline int acc_col(int t, int i) { return 8 * (i >> 2) + 2 * (t % 4) + (i & 1); }

}  // namespace dksim::layouts
