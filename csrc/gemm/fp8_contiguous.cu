// The FP8 GEMM kernel's contiguous-layout instantiations (block_m 128 only: each 128-row block of
// the layout belongs to one expert), every block_n of the menu; one unit per layout so the three
// compile in parallel. Kernel: fp8_kernel.cuh; C entry point: fp8.cu.
//
// SASS-EXPECT: fp8_gemm_kernel QGMMA UTMALDG USETMAXREG NANOSLEEP
#include "gemm/fp8_kernel.cuh"

namespace dk::gemm {

dk_status_t launch_contiguous(const KernelParams& kp, int block_m, int block_n, dim3 grid, uint32_t cluster, uint32_t smem, cudaStream_t stream) {
#define DK_CASE(BM, BN) DK_GEMM_LAUNCH_CASE(DK_GEMM_CONTIGUOUS, BM, BN)
    DK_GEMM_FOR_EACH_BLOCK_N_CONTIGUOUS(DK_CASE)
#undef DK_CASE
    return DK_STATUS_INVALID_ARGUMENT;
}

}  // namespace dk::gemm
