// The simulator's encoding of a CUtensorMap (what cuTensorMapEncodeTiled writes into the 128
// opaque bytes), read back by the TMA unit.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace dksim {

struct TensorMap {
    static constexpr uint32_t kMagic = 0x7e9505a1u;
    uint32_t magic;
    uint8_t type;        // CUtensorMapDataType
    uint8_t elem_bytes;
    uint8_t rank;
    uint8_t interleave;  // CUtensorMapInterleave
    uint8_t swizzle;     // CUtensorMapSwizzle
    uint8_t oob_nan;
    uint64_t address;
    uint64_t dims[5];
    uint64_t strides[4];  // bytes, of dimensions 1..4 (dimension 0's is the element size)
    uint16_t box[5];
    uint8_t element_strides[5];
};

int element_bytes(CUtensorMapDataType t);
// The map `p` points at, or null if it was not made by cuTensorMapEncodeTiled.
const TensorMap* decode_tensor_map(const void* p);

}  // namespace dksim
