// Status plumbing for the C ABI: CUDA runtime errors become dk_status_t, never exceptions or exits.
#pragma once

#include <cuda_runtime.h>

#include "deepkern.h"

namespace dk {

// Records `err` as the calling thread's last CUDA error (read by dk_last_cuda_error).
void set_last_cuda_error(cudaError_t err);

// Maps the result of a launch (cudaGetLastError() right after it) to a status, recording the
// CUDA error for dk_last_cuda_error().
inline dk_status_t status_from_cuda(cudaError_t err) {
    if (err == cudaSuccess) {
        return DK_STATUS_OK;
    }
    set_last_cuda_error(err);
    switch (err) {
        case cudaErrorNoKernelImageForDevice:
        case cudaErrorInvalidDeviceFunction:
        case cudaErrorUnsupportedPtxVersion:
            return DK_STATUS_UNSUPPORTED_DEVICE;
        case cudaErrorLaunchOutOfResources:
        case cudaErrorMemoryAllocation:
            return DK_STATUS_OUT_OF_RESOURCES;
        default:
            return DK_STATUS_CUDA_ERROR;
    }
}

}  // namespace dk
