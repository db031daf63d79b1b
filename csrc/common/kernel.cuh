// What lets one kernel source compile for both targets: nvcc for the GPU, and the host C++
// compiler for the simulator (DEEPKERN_SIM, see docs/simulator.md). The two constructs host C++
// cannot express, the launch (triple chevrons) and CTA-wide `__shared__` variables, go through
// these instead; everything else in a kernel is plain CUDA C++.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/status.cuh"

namespace dk {

// The declared type itself: lets `DK_SHARED(int[8], name)` declare an array.
template <typename T>
using shared_type = T;

}  // namespace dk

#if defined(DEEPKERN_SIM)
// One instance per CTA, allocated in the CTA's shared memory when a thread first reaches the
// declaration (the tag's address identifies the declaration).
#define DK_SHARED(T, name)                            \
    static const char dk_shared_tag_##name = 0;       \
    ::dk::shared_type<T>& name = *static_cast<::dk::shared_type<T>*>( \
        ::dksim::cta_shared(&dk_shared_tag_##name, sizeof(::dk::shared_type<T>), alignof(::dk::shared_type<T>)))
#define DK_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::dksim::dynamic_shared())
#else
// A CTA-wide variable of type T (an array type is fine): `__shared__ T name`.
#define DK_SHARED(T, name) __shared__ ::dk::shared_type<T> name
// The dynamic shared-memory array of the launch: `extern __shared__ T name[]`.
#define DK_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace dk {

// Launches `Kernel<<<grid, block, smem, stream>>>(args...)` and returns the launch's status (the
// launch-configuration error, if any, recorded for dk_last_cuda_error).
template <auto Kernel, typename... Args>
dk_status_t launch(dim3 grid, dim3 block, uint32_t smem, cudaStream_t stream, const Args&... args) {
#if defined(DEEPKERN_SIM)
    ::dksim::launch<Kernel>(__PRETTY_FUNCTION__, grid, block, smem, stream, args...);
#else
    Kernel<<<grid, block, smem, stream>>>(args...);
#endif
    return status_from_cuda(cudaGetLastError());
}

// Launches `Kernel` with clusters of `cluster_x` CTAs along x (cudaLaunchKernelEx with the cluster
// dimension; grid.x a multiple of cluster_x), or as `launch` when cluster_x is 1.
template <auto Kernel, typename... Args>
dk_status_t launch_cluster(dim3 grid, dim3 block, uint32_t cluster_x, uint32_t smem, cudaStream_t stream, const Args&... args) {
    if (cluster_x <= 1) {
        return launch<Kernel>(grid, block, smem, stream, args...);
    }
#if defined(DEEPKERN_SIM)
    ::dksim::launch_cluster<Kernel>(__PRETTY_FUNCTION__, grid, block, cluster_x, smem, stream, args...);
    return status_from_cuda(cudaGetLastError());
#else
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_x;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    return status_from_cuda(cudaLaunchKernelEx(&config, Kernel, args...));
#endif
}

}  // namespace dk
