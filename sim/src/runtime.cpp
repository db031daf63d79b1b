// The part of the CUDA runtime API the C launchers under csrc/ call (they are written against the
// runtime, as nvcc's output is): the last-error state, cudaMemsetAsync, the function attributes,
// error names, and the kernel launch itself (dksim::launch, what dk::launch calls instead of the
// triple-chevron launch). Launch-configuration errors are returned at once, as the runtime does.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "sim.hpp"

#define DKSIM_API extern "C" __attribute__((visibility("default")))

using namespace dksim;

namespace {

thread_local cudaError_t t_last_error = cudaSuccess;

cudaError_t record(cudaError_t e) {
    if (e != cudaSuccess) {
        t_last_error = e;
    }
    return e;
}

cudaError_t from_driver(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS:
            return cudaSuccess;
        case CUDA_ERROR_INVALID_VALUE:
            return cudaErrorInvalidValue;
        case CUDA_ERROR_OUT_OF_MEMORY:
            return cudaErrorMemoryAllocation;
        case CUDA_ERROR_INVALID_HANDLE:
            return cudaErrorInvalidResourceHandle;
        case CUDA_ERROR_ILLEGAL_ADDRESS:
            return cudaErrorIllegalAddress;
        case CUDA_ERROR_LAUNCH_TIMEOUT:
            return cudaErrorLaunchTimeout;
        case CUDA_ERROR_LAUNCH_FAILED:
            return cudaErrorLaunchFailure;
        case CUDA_ERROR_MISALIGNED_ADDRESS:
            return cudaErrorMisalignedAddress;
        case CUDA_ERROR_NOT_SUPPORTED:
            return cudaErrorNotSupported;
        default:
            return cudaErrorUnknown;
    }
}

int round_up(int a, int b) { return (a + b - 1) / b * b; }

void complain(const KernelInfo& info, const char* what) {
    std::fprintf(stderr, "deepkern simulator: launch of %s refused: %s\n", info.name.c_str(), what);
}

}  // namespace

DKSIM_API cudaError_t cudaGetLastError() {
    const cudaError_t e = t_last_error;
    t_last_error = cudaSuccess;
    return e;
}

DKSIM_API cudaError_t cudaPeekAtLastError() { return t_last_error; }

DKSIM_API cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t stream) {
    return record(from_driver(cuMemsetD8Async(reinterpret_cast<CUdeviceptr>(p), static_cast<unsigned char>(value), count,
                                              reinterpret_cast<CUstream>(stream))));
}

DKSIM_API cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute attr, int value) {
    std::lock_guard<std::mutex> lock(eng().mu);
    KernelInfo& info = kernel_info(fn, nullptr);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value + info.static_smem > kMaxSharedPerCta) {
            return record(cudaErrorInvalidValue);
        }
        info.max_dynamic_smem = value;
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
        return value >= -1 && value <= 100 ? cudaSuccess : record(cudaErrorInvalidValue);
    }
    return record(cudaErrorInvalidValue);
}

DKSIM_API cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* fn) {
    if (a == nullptr) {
        return record(cudaErrorInvalidValue);
    }
    std::lock_guard<std::mutex> lock(eng().mu);
    KernelInfo& info = kernel_info(fn, nullptr);
    std::memset(a, 0, sizeof *a);
    a->sharedSizeBytes = static_cast<size_t>(info.static_smem);
    a->localSizeBytes = static_cast<size_t>(info.stack_frame);
    a->numRegs = info.registers > 0 ? info.registers : 64;
    a->maxThreadsPerBlock = 1024;
    a->maxDynamicSharedSizeBytes = info.max_dynamic_smem;
    a->ptxVersion = 90;
    a->binaryVersion = 90;
    return cudaSuccess;
}

DKSIM_API const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess:
            return "cudaSuccess";
        case cudaErrorInvalidValue:
            return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation:
            return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration:
            return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDeviceFunction:
            return "cudaErrorInvalidDeviceFunction";
        case cudaErrorInvalidResourceHandle:
            return "cudaErrorInvalidResourceHandle";
        case cudaErrorIllegalAddress:
            return "cudaErrorIllegalAddress";
        case cudaErrorLaunchOutOfResources:
            return "cudaErrorLaunchOutOfResources";
        case cudaErrorLaunchTimeout:
            return "cudaErrorLaunchTimeout";
        case cudaErrorMisalignedAddress:
            return "cudaErrorMisalignedAddress";
        case cudaErrorLaunchFailure:
            return "cudaErrorLaunchFailure";
        case cudaErrorNotSupported:
            return "cudaErrorNotSupported";
        case cudaErrorNoKernelImageForDevice:
            return "cudaErrorNoKernelImageForDevice";
        default:
            return "cudaErrorUnknown";
    }
}

DKSIM_API const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

namespace dksim {

int launch(const void* fn, const char* pretty, dim3 grid, dim3 block, size_t dynamic_smem, void* stream, KernelEntry entry, void* args,
           ArgsDeleter deleter, uint32_t cluster_x) {
    Engine& g = eng();
    std::unique_lock<std::mutex> lock(g.mu);
    ensure_started();
    auto refuse = [&](cudaError_t e) {
        deleter(args);
        return static_cast<int>(record(e));
    };
    KernelInfo& info = kernel_info(fn, pretty);
    Stream* s = stream_of(reinterpret_cast<CUstream>(stream));
    if (s == nullptr) {
        return refuse(cudaErrorInvalidResourceHandle);
    }
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        complain(info, "grid or block dimensions outside the device's limits");
        return refuse(cudaErrorInvalidConfiguration);
    }
    if (cluster_x == 0 || cluster_x > 8 || grid.x % cluster_x != 0) {
        complain(info, "a cluster dimension outside 1 .. 8 (the portable limit), or a grid.x that is not a multiple of it");
        return refuse(cudaErrorInvalidClusterSize);
    }
    if (dynamic_smem > static_cast<size_t>(info.max_dynamic_smem)) {
        complain(info, "more dynamic shared memory than the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB unless raised)");
        return refuse(cudaErrorInvalidValue);
    }
    if (dynamic_smem + static_cast<size_t>(info.static_smem) > static_cast<size_t>(kMaxSharedPerCta)) {
        complain(info, "static plus dynamic shared memory beyond 227 KiB");
        return refuse(cudaErrorInvalidValue);
    }
    auto* k = new Kernel();
    k->serial = g.next_kernel_serial++;
    k->info = &info;
    k->name = info.name;
    k->entry = entry;
    k->args = args;
    k->deleter = deleter;
    k->grid = grid;
    k->block = block;
    k->threads_per_cta = static_cast<uint32_t>(threads);
    k->dynamic_smem = static_cast<uint32_t>(dynamic_smem);
    k->ctas_total = uint64_t(grid.x) * grid.y * grid.z;
    k->cluster_size = cluster_x;
    k->device = s->ctx->device;
    const int warps = static_cast<int>((threads + 31) / 32);
    const int regs = info.registers > 0 ? info.registers : 64;
    k->cta_threads = warps * 32;
    k->cta_warps = warps;
    k->cta_registers = round_up(regs * 32, 256) * warps;
    k->cta_shared = round_up(static_cast<int>(dynamic_smem) + info.static_smem + kCtaReservedShared, 128);
    if (k->cta_registers > kSmRegisters || k->cta_shared > kSmSharedBytes || k->cta_threads > kSmMaxThreads) {
        complain(info, "one CTA needs more registers or shared memory than an SM has");
        delete k;  // runs the deleter
        return static_cast<int>(record(cudaErrorLaunchOutOfResources));
    }
    OpPtr op = enqueue(s, OpKind::Kernel, "kernel launch");
    op->kernel = k;
    k->op = op;
    return cudaSuccess;
}

}  // namespace dksim
