// FP8 block-scaled GEMM for Hopper: the C entry point (checks, params, dispatch to the compiled tile
// shape of the requested layout) and the host-side queries of the tile menu. The kernel is in
// fp8_kernel.cuh, its instantiations in fp8_dense.cu, fp8_contiguous.cu and fp8_masked.cu.
#include <cstring>

#include "gemm/fp8_kernel.cuh"

extern "C" int32_t dk_gemm_fp8_config_supported(dk_gemm_layout_t layout, int32_t block_m, int32_t block_n) {
    bool found = false;
#define DK_CASE(BM, BN) found = found || (block_m == (BM) && block_n == (BN));
    if (layout == DK_GEMM_DENSE || layout == DK_GEMM_MASKED) {
        DK_GEMM_FOR_EACH_BLOCK_N(DK_CASE, 64)
        DK_GEMM_FOR_EACH_BLOCK_N(DK_CASE, 128)
        DK_GEMM_FOR_EACH_BLOCK_N_256(DK_CASE)
    }
    if (layout == DK_GEMM_CONTIGUOUS) {
        DK_GEMM_FOR_EACH_BLOCK_N_CONTIGUOUS(DK_CASE)
    }
#undef DK_CASE
    return found ? 1 : 0;
}

extern "C" int64_t dk_gemm_fp8_smem_bytes(int32_t block_m, int32_t block_n, int32_t stages, int32_t masked_groups, int32_t tma_store) {
    if (block_m < 1 || block_m > 256 || block_n < 1 || block_n > 256 || stages < 1 || stages > DK_GEMM_MAX_STAGES || masked_groups < 0 ||
        masked_groups > DK_GEMM_MAX_MASKED_GROUPS) {
        return -1;
    }
    return dk::gemm::smem_layout(block_m, block_n, stages, masked_groups, tma_store != 0).total;
}

extern "C" dk_status_t dk_gemm_fp8(const dk_gemm_fp8_params_t* p, dk_stream_t stream) {
    using namespace dk::gemm;
    if (p == nullptr || p->m < 0 || p->n < 0 || p->k <= 0 || p->k % kBlockK != 0 || p->num_sms < 1 || p->groups < 1) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout != DK_GEMM_DENSE && p->layout != DK_GEMM_CONTIGUOUS && p->layout != DK_GEMM_MASKED) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (dk_gemm_fp8_config_supported(p->layout, p->block_m, p->block_n) == 0 || p->stages < 1 || p->stages > DK_GEMM_MAX_STAGES ||
        p->swizzle_group < 1) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout == DK_GEMM_CONTIGUOUS &&
        (p->m_indices == nullptr || (p->arrivals != nullptr && (p->block_m != kArrivalRows || p->m % kArrivalRows != 0)))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout != DK_GEMM_CONTIGUOUS && p->arrivals != nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->layout == DK_GEMM_MASKED && (p->masked_m == nullptr || p->max_m < 0 || p->groups > DK_GEMM_MAX_MASKED_GROUPS ||
                                        int64_t(p->groups) * p->max_m != p->m)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->m == 0 || p->n == 0) {
        return DK_STATUS_OK;
    }
    if (p->sfb == nullptr || (p->d == nullptr) == (p->d_f32 == nullptr) || (p->accumulate != 0 && p->d_f32 == nullptr)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->tma_store != 0 && (p->layout != DK_GEMM_DENSE || p->d == nullptr)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->multicast != DK_GEMM_MULTICAST_NONE && p->multicast != DK_GEMM_MULTICAST_A && p->multicast != DK_GEMM_MULTICAST_B) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const bool clustered = p->multicast != DK_GEMM_MULTICAST_NONE;
    if (clustered && (!clusterable(p->layout, p->block_n) || p->arrivals != nullptr || p->num_sms < 2)) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    KernelParams kp;
    static_assert(sizeof(CUtensorMap) == sizeof(dk_tensor_map_t), "tensor map size");
    std::memcpy(&kp.tma_a, &p->tma_a, sizeof(CUtensorMap));
    std::memcpy(&kp.tma_b, &p->tma_b, sizeof(CUtensorMap));
    std::memcpy(&kp.tma_sfa, &p->tma_sfa, sizeof(CUtensorMap));
    kp.sfb = p->sfb;
    kp.d = reinterpret_cast<__nv_bfloat16*>(p->d);
    kp.d_f32 = p->d_f32;
    kp.accumulate = p->accumulate != 0;
    kp.m_indices = p->m_indices;
    kp.masked_m = p->masked_m;
    kp.m = p->m;
    kp.n = p->n;
    kp.k = p->k;
    kp.groups = p->groups;
    kp.max_m = p->max_m;
    kp.stages = p->stages;
    kp.swizzle_group = p->swizzle_group;
    kp.arrivals = p->arrivals;
    std::memcpy(&kp.tma_d, &p->tma_d, sizeof(CUtensorMap));
    kp.tma_store = p->tma_store != 0;
    kp.multicast = p->multicast;
    std::memcpy(&kp.tma_half, &p->tma_half, sizeof(CUtensorMap));
    // Upper bound on tiles (the masked layout's real count is read on the device); the tile walk
    // computes in 32 bits below this bound.
    const int64_t tiles =
        int64_t(dk::ceil_div(p->m, p->block_m) + (p->layout == DK_GEMM_MASKED ? p->groups : 0)) * dk::ceil_div(p->n, p->block_n);
    if (tiles > INT32_MAX) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    dim3 grid(static_cast<unsigned>(tiles < p->num_sms ? tiles : p->num_sms));
    if (clustered) {
        // One cluster of two per pair of tiles, at most num_sms / 2 clusters.
        const int64_t m_tiles = dk::ceil_div(p->m, p->block_m), n_tiles = dk::ceil_div(p->n, p->block_n);
        const int64_t pairs = p->multicast == DK_GEMM_MULTICAST_B ? dk::ceil_div(m_tiles, int64_t(2)) * n_tiles
                                                                  : m_tiles * dk::ceil_div(n_tiles, int64_t(2));
        grid.x = static_cast<unsigned>(2 * (pairs < p->num_sms / 2 ? pairs : p->num_sms / 2));
    }
    const uint32_t smem = smem_layout(p->block_m, p->block_n, p->stages, p->layout == DK_GEMM_MASKED ? p->groups : 0, kp.tma_store).total;
    auto s = reinterpret_cast<cudaStream_t>(stream);
    const uint32_t cluster = clustered ? 2 : 1;
    switch (p->layout) {
        case DK_GEMM_CONTIGUOUS:
            return launch_contiguous(kp, p->block_m, p->block_n, grid, cluster, smem, s);
        case DK_GEMM_MASKED:
            return launch_masked(kp, p->block_m, p->block_n, grid, cluster, smem, s);
        default:
            return launch_dense(kp, p->block_m, p->block_n, grid, cluster, smem, s);
    }
}
