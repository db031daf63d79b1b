// Host-only entry points of the C ABI: status names, the last CUDA error, the ABI version.
#include <cuda_runtime.h>

#include "common/status.cuh"
#include "deepkern.h"

namespace {
thread_local int32_t g_last_cuda_error = 0;
}

namespace dk {
void set_last_cuda_error(cudaError_t err) {
    g_last_cuda_error = static_cast<int32_t>(err);
}
}  // namespace dk

extern "C" const char* dk_status_string(dk_status_t status) {
    switch (status) {
        case DK_STATUS_OK:
            return "ok";
        case DK_STATUS_INVALID_ARGUMENT:
            return "invalid argument";
        case DK_STATUS_MISALIGNED:
            return "misaligned pointer or stride";
        case DK_STATUS_UNSUPPORTED_DEVICE:
            return "unsupported device (kernels are built for sm_90a)";
        case DK_STATUS_OUT_OF_RESOURCES:
            return "out of device resources";
        case DK_STATUS_CUDA_ERROR:
            return "CUDA error";
    }
    return "unknown status";
}

extern "C" int32_t dk_last_cuda_error(void) {
    return g_last_cuda_error;
}

extern "C" const char* dk_cuda_error_name(int32_t cuda_error) {
    return cudaGetErrorName(static_cast<cudaError_t>(cuda_error));
}

extern "C" uint32_t dk_abi_version(void) {
    return DK_ABI_VERSION;
}
