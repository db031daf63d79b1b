// cuTensorMapEncodeTiled: the validity rules the driver documents (alignment of the address and
// strides, box sizes, the inner box against the swizzle span, element types), with the driver's
// error code, so that the Rust encoder is checked by the simulator too. The encoded map is the
// simulator's own layout (TensorMap below), read back by its TMA unit.
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "sim.hpp"
#include "tensormap.hpp"

#define DKSIM_API extern "C" __attribute__((visibility("default")))

using namespace dksim;

namespace dksim {

int element_bytes(CUtensorMapDataType t) {
    switch (t) {
        case CU_TENSOR_MAP_DATA_TYPE_UINT8:
            return 1;
        case CU_TENSOR_MAP_DATA_TYPE_UINT16:
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
        case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
            return 2;
        case CU_TENSOR_MAP_DATA_TYPE_UINT32:
        case CU_TENSOR_MAP_DATA_TYPE_INT32:
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
        case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
        case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ:
            return 4;
        case CU_TENSOR_MAP_DATA_TYPE_UINT64:
        case CU_TENSOR_MAP_DATA_TYPE_INT64:
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT64:
            return 8;
        default:
            return 0;
    }
}

const TensorMap* decode_tensor_map(const void* p) {
    const auto* m = static_cast<const TensorMap*>(p);
    return m->magic == TensorMap::kMagic ? m : nullptr;
}

}  // namespace dksim

namespace {

CUresult invalid(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
CUresult invalid(const char* fmt, ...) {
    if (config().verbose) {
        char buf[256];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        std::fprintf(stderr, "deepkern simulator: cuTensorMapEncodeTiled: %s\n", buf);
    }
    return CUDA_ERROR_INVALID_VALUE;
}

}  // namespace

DKSIM_API CUresult cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address, const cuuint64_t* dims,
                                          const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* element_strides,
                                          CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                                          CUtensorMapFloatOOBfill fill) {
    if (map == nullptr || dims == nullptr || box == nullptr || element_strides == nullptr || (rank > 1 && strides == nullptr)) {
        return invalid("null pointer argument");
    }
    if (reinterpret_cast<uintptr_t>(map) % 64 != 0) {
        return invalid("tensorMap is not 64-byte aligned");
    }
    const int elem = element_bytes(type);
    if (elem == 0) {
        return invalid("unsupported tensorDataType %d", static_cast<int>(type));
    }
    if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE && interleave != CU_TENSOR_MAP_INTERLEAVE_16B && interleave != CU_TENSOR_MAP_INTERLEAVE_32B) {
        return invalid("invalid interleave");
    }
    if (rank < 1 || rank > 5 || (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE && rank < 3)) {
        return invalid("tensorRank %u (1..5, at least 3 when interleaved)", rank);
    }
    const uintptr_t addr = reinterpret_cast<uintptr_t>(address);
    const uintptr_t need = interleave == CU_TENSOR_MAP_INTERLEAVE_32B ? 32 : 16;
    if (addr % need != 0) {
        return invalid("globalAddress %p is not %zu-byte aligned", address, static_cast<size_t>(need));
    }
    for (cuuint32_t i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (cuuint64_t(1) << 32)) {
            return invalid("globalDim[%u] = %llu (1 .. 2^32)", i, static_cast<unsigned long long>(dims[i]));
        }
        if (box[i] == 0 || box[i] > 256) {
            return invalid("boxDim[%u] = %u (1 .. 256)", i, box[i]);
        }
        if (element_strides[i] == 0 || element_strides[i] > 8) {
            return invalid("elementStrides[%u] = %u (1 .. 8)", i, element_strides[i]);
        }
    }
    for (cuuint32_t i = 0; i + 1 < rank; ++i) {
        if (strides[i] % need != 0 || strides[i] >= (cuuint64_t(1) << 40)) {
            return invalid("globalStrides[%u] = %llu (a multiple of %zu below 2^40)", i, static_cast<unsigned long long>(strides[i]),
                           static_cast<size_t>(need));
        }
    }
    const uint64_t inner_bytes = uint64_t(box[0]) * elem;
    if (interleave == CU_TENSOR_MAP_INTERLEAVE_NONE) {
        if (inner_bytes % 16 != 0) {
            return invalid("boxDim[0] * element size = %llu bytes is not a multiple of 16", static_cast<unsigned long long>(inner_bytes));
        }
        uint64_t span = 0;
        switch (swizzle) {
            case CU_TENSOR_MAP_SWIZZLE_NONE:
                break;
            case CU_TENSOR_MAP_SWIZZLE_32B:
                span = 32;
                break;
            case CU_TENSOR_MAP_SWIZZLE_64B:
                span = 64;
                break;
            case CU_TENSOR_MAP_SWIZZLE_128B:
                span = 128;
                break;
            default:
                return invalid("unsupported swizzle %d", static_cast<int>(swizzle));
        }
        if (span != 0 && inner_bytes > span) {
            return invalid("the inner box (%llu bytes) exceeds the %llu-byte swizzle span", static_cast<unsigned long long>(inner_bytes),
                           static_cast<unsigned long long>(span));
        }
    } else if (interleave == CU_TENSOR_MAP_INTERLEAVE_32B && swizzle != CU_TENSOR_MAP_SWIZZLE_32B && swizzle != CU_TENSOR_MAP_SWIZZLE_NONE) {
        return invalid("32-byte interleave needs 32-byte or no swizzle");
    }
    if (l2 != CU_TENSOR_MAP_L2_PROMOTION_NONE && l2 != CU_TENSOR_MAP_L2_PROMOTION_L2_64B && l2 != CU_TENSOR_MAP_L2_PROMOTION_L2_128B &&
        l2 != CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
        return invalid("invalid l2Promotion");
    }
    if (fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE && fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA) {
        return invalid("invalid oobFill");
    }
    const bool is_float = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
                          type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 || type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ ||
                          type == CU_TENSOR_MAP_DATA_TYPE_FLOAT64 || type == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 ||
                          type == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ;
    if (fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !is_float) {
        return invalid("NaN out-of-bounds fill needs a floating-point type");
    }
    TensorMap m{};
    m.magic = TensorMap::kMagic;
    m.type = static_cast<uint8_t>(type);
    m.elem_bytes = static_cast<uint8_t>(elem);
    m.rank = static_cast<uint8_t>(rank);
    m.address = addr;
    for (cuuint32_t i = 0; i < rank; ++i) {
        m.dims[i] = dims[i];
        m.box[i] = static_cast<uint16_t>(box[i]);
        m.element_strides[i] = static_cast<uint8_t>(element_strides[i]);
        if (i > 0) {
            m.strides[i - 1] = strides[i - 1];
        }
    }
    m.interleave = static_cast<uint8_t>(interleave);
    m.swizzle = static_cast<uint8_t>(swizzle);
    m.oob_nan = fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA ? 1 : 0;
    static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the simulator's tensor map fits the driver's 128 bytes");
    std::memset(map, 0, sizeof *map);
    std::memcpy(map, &m, sizeof m);
    return CUDA_SUCCESS;
}
