// The FP8 GEMM kernel's dense-layout instantiations (block_m 64, 128 and 256), every block_n of
// the menu; one unit per layout so the three compile in parallel. Kernel: fp8_kernel.cuh; C entry
// point: fp8.cu.
//
// SASS-EXPECT: fp8_gemm_kernel QGMMA UTMALDG USETMAXREG UTMASTG
#include "gemm/fp8_kernel.cuh"

namespace dk::gemm {

dk_status_t launch_dense(const KernelParams& kp, int block_m, int block_n, dim3 grid, uint32_t cluster, uint32_t smem, cudaStream_t stream) {
#define DK_CASE(BM, BN) DK_GEMM_LAUNCH_CASE(DK_GEMM_DENSE, BM, BN)
    DK_GEMM_FOR_EACH_BLOCK_N(DK_CASE, 64)
    DK_GEMM_FOR_EACH_BLOCK_N(DK_CASE, 128)
    DK_GEMM_FOR_EACH_BLOCK_N_256(DK_CASE)
#undef DK_CASE
    return DK_STATUS_INVALID_ARGUMENT;
}

}  // namespace dk::gemm
