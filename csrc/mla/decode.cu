// MLA decode attention over a paged latent KV cache, split-KV (version 1). Contract:
// csrc/include/deepkern.h, dk_mla_decode_params; pseudocode: docs/kernels/mla_decode.md; CPU twin:
// deepkern::reference::mla.
//
// Grid (num_parts, m_blocks): CTA (x, y) walks part x of the schedule (dk_mla_schedule) for the
// query rows 64·y .. 64·y + 63 of each request (rows = s_q·h_q, heads fastest). 256 threads, two
// warpgroups. Per 64-key tile, double-buffered in shared memory by TMA (128-byte swizzle, one
// 64-column box per 64 columns of the 576, one TMA per page piece, so pages of 16..128 keys work):
//   S = Q·Kᵀ: warpgroup g computes keys 32g .. 32g + 31 (wgmma m64n32k16, 36 k-steps over 576);
//   online softmax in f32 (exp2 domain), row maxima exchanged through shared memory;
//   P (16-bit) into shared memory; O[:, 256g .. 256g + 255] += P·V (wgmma m64n256k16, V being the
//   first 512 columns of the same tile read MN-major, so it is never loaded twice).
// Keys past the sequence, past the causal limit, or on an invalid page are masked to -inf, and
// their shared-memory rows zeroed, so NaN in unowned cache memory never reaches the output.
// Requests with one chunk write the output and lse; others write f32 partials for dk_mla_combine.
//
// SASS-EXPECT: mla_decode_kernel HGMMA UTMALDG
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "common/kernel.cuh"
#include "common/math.cuh"
#include "common/ptx.cuh"
#include "common/status.cuh"
#include "deepkern.h"

namespace dk::mla {

constexpr int kBlockM = 64;
constexpr int kBlockN = DK_MLA_KV_BLOCK;
constexpr int kDimK = 576;
constexpr int kDimV = DK_MLA_HEAD_DIM_V;
constexpr int kBoxCols = 64;                       // 128 bytes of 16-bit elements: one swizzle row
constexpr int kBoxes = kDimK / kBoxCols;           // 9
constexpr int kBoxBytes = kBlockN * kBoxCols * 2;  // 8 KiB: 64 rows x 128 bytes
constexpr int kThreads = 256;
constexpr int kStages = 2;
static_assert(kBlockN == 64 && kBlockM == 64, "tile shapes are fixed by the wgmma split below");

// Shared memory, by hand (a struct would round its size up to its 1024-byte alignment):
constexpr int kOffQ = 0;                                  // [9][64 x 128 B]
constexpr int kOffKv = kOffQ + kBoxes * kBoxBytes;        // [2][9][64 x 128 B]
constexpr int kOffP = kOffKv + kStages * kBoxes * kBoxBytes;  // [64 x 128 B]
constexpr int kOffMax = kOffP + kBoxBytes;                // f32 [2][64]
constexpr int kOffSum = kOffMax + 2 * kBlockM * 4;        // f32 [2][64]
constexpr int kOffBars = kOffSum + 2 * kBlockM * 4;       // u64 q_full, kv_full[2]
constexpr int kOffLoaded = kOffBars + 3 * 8;              // u32 [2]: per stage, which pieces were loaded
constexpr int kSmemUsed = kOffLoaded + 2 * 4;
constexpr int kSmemBytes = kSmemUsed + 1024;              // + slack to align the base to 1024
static_assert(kSmemBytes <= 232448, "shared memory plan exceeds Hopper's 227 KiB opt-in limit");

struct KernelParams {
    CUtensorMap tma_q;
    CUtensorMap tma_kv;
    const int32_t* block_table;
    const int32_t* lens;
    const int32_t* parts;
    const int32_t* splits;
    void* out;
    float* lse;
    float* o_partial;
    float* lse_partial;
    int32_t* num_invalid;
    int batch, s_q, h_q, rows, page, max_pages, num_pages, num_parts, num_chunks;
    float scale_log2;
};

// Shared-memory matrix descriptor, 128-byte swizzle. K-major (Q, K, P): 8-row atoms 1024 bytes
// apart (SBO); the leading offset is unused. MN-major (V): 64-element MN atoms `lbo` bytes apart,
// 8-row K groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* p, uint32_t lbo) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    uint64_t desc = (addr & 0x3ffff) >> 4;
    desc |= uint64_t((lbo >> 4) & 0x3fff) << 16;
    desc |= uint64_t(1024 >> 4) << 32;
    desc |= uint64_t(1) << 62;
    return desc;
}

__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
    while (!ptx::mbarrier_try_wait_parity(bar, parity)) {
    }
}

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
    static __device__ __forceinline__ void qk(float (&d)[16], uint64_t a, uint64_t b, bool acc) {
        ptx::wgmma_m64n32k16_f32_bf16_bf16(d, a, b, acc);
    }
    static __device__ __forceinline__ void pv(float (&d)[128], uint64_t a, uint64_t b) {
        ptx::wgmma_m64n256k16_f32_bf16_bf16_tb(d, a, b, true);
    }
};
template <>
struct Elem<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
    static __device__ __forceinline__ void qk(float (&d)[16], uint64_t a, uint64_t b, bool acc) {
        ptx::wgmma_m64n32k16_f32_f16_f16(d, a, b, acc);
    }
    static __device__ __forceinline__ void pv(float (&d)[128], uint64_t a, uint64_t b) {
        ptx::wgmma_m64n256k16_f32_f16_f16_tb(d, a, b, true);
    }
};

// Keys of tile `blk` are loaded in pieces of min(page, 64) rows; piece j is valid when it starts
// inside the sequence and its page index is in range. Returns the page row of piece j, or -1.
__device__ __forceinline__ int64_t piece_row(const KernelParams& p, int req, int len, int blk, int j, int piece) {
    const int key0 = blk * kBlockN + j * piece;
    if (key0 >= len) {
        return -1;
    }
    const int slot = key0 / p.page;
    if (slot >= p.max_pages) {
        return -1;
    }
    const int page = p.block_table[int64_t(req) * p.max_pages + slot];
    if (page < 0 || page >= p.num_pages) {
        return -1;
    }
    return int64_t(page) * p.page + key0 % p.page;
}

constexpr int kMaxPieces = kBlockN / 16;  // pages of at least 16 keys

// Issues the TMA loads of tile `blk` of request `req` into `dst` (9 boxes), completing on `bar`,
// and records in `*loaded` (bit j: piece j) which pieces it loaded, for the consumers to read once
// the phase completes. The block table is read once per piece: the byte count the barrier expects,
// the loads issued and the consumers' mask all come from that one read, so a table changed
// meanwhile (a caller's concurrent writer) can at worst mask or load a piece, never leave the
// barrier short of bytes or over-filled.
__device__ void load_tile(const KernelParams& p, uint8_t* dst, uint64_t* bar, uint32_t* loaded, int req, int len, int blk) {
    const int piece = p.page < kBlockN ? p.page : kBlockN;
    const int pieces = kBlockN / piece;
    // Unrolled over the most pieces a tile can have, so `rows` stays in registers.
    int64_t rows[kMaxPieces];
    uint32_t bytes = 0;
    uint32_t mask = 0;
#pragma unroll
    for (int j = 0; j < kMaxPieces; ++j) {
        rows[j] = j < pieces ? piece_row(p, req, len, blk, j, piece) : -1;
        if (rows[j] >= 0) {
            bytes += uint32_t(piece) * kBoxCols * 2 * kBoxes;
            mask |= 1u << j;
        }
    }
    *loaded = mask;
    ptx::mbarrier_arrive_expect_tx(bar, bytes);
#pragma unroll
    for (int j = 0; j < kMaxPieces; ++j) {
        const int64_t row = rows[j];
        if (row < 0) {
            if (j < pieces && blk * kBlockN + j * piece < len) {
                atomicAdd(p.num_invalid, 1);  // a bad page index inside the sequence: masked
            }
            continue;
        }
        for (int b = 0; b < kBoxes; ++b) {
            ptx::cp_async_bulk_tensor_2d_global_to_shared(dst + b * kBoxBytes + j * piece * 128, &p.tma_kv, bar, b * kBoxCols,
                                                          static_cast<int32_t>(row));
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ KernelParams p) {
    DK_DYNAMIC_SHARED(uint8_t, smem_raw);
    // Aligned to 1024 by offsetting the shared array itself (not through an integer), so the
    // compiler keeps the address space and emits shared-memory loads and stores.
    uint8_t* smem = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
    uint8_t* s_q = smem + kOffQ;
    uint8_t* s_kv = smem + kOffKv;
    uint8_t* s_p = smem + kOffP;
    float* s_max = reinterpret_cast<float*>(smem + kOffMax);
    float* s_sum = reinterpret_cast<float*>(smem + kOffSum);
    uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + kOffBars);
    uint64_t* kv_full = q_full + 1;
    uint32_t* s_loaded = reinterpret_cast<uint32_t*>(smem + kOffLoaded);

    const int32_t* w = p.parts + int64_t(blockIdx.x) * DK_MLA_PART_WORDS;
    const int begin_req = w[0], begin_block = w[1], end_req = w[2], end_block = w[3], begin_split = w[4];
    if (begin_req < 0) {
        return;  // an empty part
    }
    if (begin_req >= p.batch || end_req < begin_req || end_req >= p.batch || begin_block < 0 || end_block < 0 || begin_split < 0) {
        if (threadIdx.x == 0 && blockIdx.y == 0) {
            atomicAdd(p.num_invalid, 1);
        }
        return;
    }

    const int wg = threadIdx.x / 128;
    const int warp = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    // Accumulator layout of wgmma m64nN: rows r and r + 8 of the 64, columns 8j + 2·quad + {0, 1}.
    const int r_local = warp * 16 + lane / 4;
    const int m0 = blockIdx.y * kBlockM;

    if (threadIdx.x == 0) {
        ptx::mbarrier_init(q_full, 1);
        ptx::mbarrier_init(&kv_full[0], 1);
        ptx::mbarrier_init(&kv_full[1], 1);
        ptx::fence_mbarrier_init();
        ptx::prefetch_tensormap(&p.tma_q);
        ptx::prefetch_tensormap(&p.tma_kv);
    }
    __syncthreads();

    uint32_t q_phase = 0;
    uint32_t kv_phase = 0;  // bit s: parity of stage s
    int stage = 0;

    for (int req = begin_req; req <= end_req; ++req) {
        // Keys walked: the length, clamped to what the block table can address (keys past it have no
        // page and would be masked anyway) and below INT32_MAX - kBlockN, so key indices and the
        // tile count stay in 32 bits whatever the device array holds. The causal window below
        // uses the real length.
        const int64_t len_real = max(p.lens[req], 0);
        const int len = static_cast<int>(min(len_real, min(int64_t(p.max_pages) * p.page, int64_t(INT32_MAX - kBlockN))));
        const int n_blocks = ceil_div(len, kBlockN);
        // A length past its block table is a caller error (masked keys): counted once per request,
        // by the part that holds its first block, in the first M tile.
        if (len < len_real && threadIdx.x == 0 && blockIdx.y == 0 && (req != begin_req || begin_block == 0)) {
            atomicAdd(p.num_invalid, 1);
        }
        const int b0 = min(req == begin_req ? begin_block : 0, n_blocks);
        const int b1 = max(min(req == end_req ? end_block : n_blocks, n_blocks), b0);
        const int split = req == begin_req ? begin_split : 0;
        const int first_chunk = p.splits[req];
        const int n_splits = p.splits[req + 1] - first_chunk;
        const int64_t chunk = int64_t(first_chunk) + split;

        // Everyone is done with the previous request's Q and tiles before they are overwritten.
        __syncthreads();
        if (threadIdx.x == 0) {
            ptx::mbarrier_arrive_expect_tx(q_full, kBoxes * kBoxBytes);
            for (int b = 0; b < kBoxes; ++b) {
                ptx::cp_async_bulk_tensor_2d_global_to_shared(s_q + b * kBoxBytes, &p.tma_q, q_full, b * kBoxCols, req * p.rows + m0);
            }
            if (b0 < b1) {
                load_tile(p, s_kv + stage * kBoxes * kBoxBytes, &kv_full[stage], &s_loaded[stage], req, len, b0);
            }
        }

        // Causal limit of this thread's two rows: query token s sees keys 0 ..= len - s_q + s.
        int visible[2];
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + r_local + 8 * h;
            const int s_idx = row < p.rows ? row / p.h_q : p.s_q - 1;
            visible[h] = static_cast<int>(min(len_real - p.s_q + s_idx + 1, int64_t(len)));
        }
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) {
            o[i] = 0.0f;
        }
        float m_run[2] = {-INFINITY, -INFINITY};
        float l_run[2] = {0.0f, 0.0f};

        wait(q_full, q_phase);
        q_phase ^= 1;

        for (int blk = b0; blk < b1; ++blk) {
            uint8_t* kv = s_kv + stage * kBoxes * kBoxBytes;
            wait(&kv_full[stage], (kv_phase >> stage) & 1);
            kv_phase ^= 1u << stage;

            // Rows past the sequence or on invalid pages were not loaded: zero them (they are V too).
            const int piece = p.page < kBlockN ? p.page : kBlockN;
            // A tail inside the tile: loaded pieces may still hold keys past the length (the rest
            // of the last page), which must not reach P·V even with P = 0 (0 · NaN = NaN).
            // Bit j: piece j of the tile was loaded (what load_tile read from the block table, not a
            // second read of it). Keys of other pieces are masked below like keys past the length,
            // so they never enter the softmax.
            const uint32_t loaded = s_loaded[stage];
            const bool any_hole = (blk + 1) * kBlockN > len || loaded != (1u << (kBlockN / piece)) - 1u;
            if (any_hole) {
                for (int i = threadIdx.x; i < kBoxes * kBlockN * 8; i += kThreads) {
                    const int box = i / (kBlockN * 8), row = (i / 8) % kBlockN, chunk16 = i % 8;
                    const int key = blk * kBlockN + row;
                    if (key >= len || ((loaded >> (row / piece)) & 1u) == 0) {
                        reinterpret_cast<uint4*>(kv + box * kBoxBytes + row * 128)[chunk16] = uint4{0, 0, 0, 0};
                    }
                }
                ptx::fence_proxy_async_shared_cta();
                ptx::bar_sync(1, kThreads);
            }

            // S = Q·Kᵀ for keys 32·wg .. 32·wg + 31 of the tile. The accumulators are defined
            // before the first wgmma (scale-d = 0 ignores them, but the operand is read-write) and
            // pinned around the asynchronous section (ptx::fence_operands).
            float s[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                s[i] = 0.0f;
            }
            ptx::fence_operands(s);
            ptx::wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kDimK / 16; ++kk) {
                const int box = kk / 4, off = (kk % 4) * 32;
                const uint64_t da = smem_desc_sw128(s_q + box * kBoxBytes + off, 16);
                const uint64_t db = smem_desc_sw128(kv + box * kBoxBytes + wg * 32 * 128 + off, 16);
                Elem<T>::qk(s, da, db, kk > 0);
            }
            ptx::wgmma_commit_group();
            ptx::fence_operands(s);
            ptx::wgmma_wait_group<0>();
            ptx::fence_operands(s);

            // Mask, scale, and this warpgroup's row maxima.
            float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e / 2;
                    const int in_tile = wg * 32 + 8 * j + 2 * quad + (e % 2);
                    const int key = blk * kBlockN + in_tile;
                    float& v = s[4 * j + e];
                    const bool keep = key < visible[h] && ((loaded >> (in_tile / piece)) & 1u) != 0;
                    v = keep ? v * p.scale_log2 : -INFINITY;
                    tile_max[h] = fmaxf(tile_max[h], v);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
                if (quad == 0) {
                    s_max[wg * kBlockM + r_local + 8 * h] = tile_max[h];
                }
            }
            ptx::bar_sync(1, kThreads);
            // Both warpgroups are past the previous tile's P·V: the other stage may be refilled.
            if (threadIdx.x == 0 && blk + 1 < b1) {
                const int next = stage ^ 1;
                load_tile(p, s_kv + next * kBoxes * kBoxBytes, &kv_full[next], &s_loaded[next], req, len, blk + 1);
            }

            float scale_o[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r_local + 8 * h;
                const float m_new = fmaxf(m_run[h], fmaxf(s_max[r], s_max[kBlockM + r]));
                const float m_use = m_new == -INFINITY ? 0.0f : m_new;
                scale_o[h] = exp2f(m_run[h] - m_use);
                m_run[h] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    s[4 * j + 2 * h] = exp2f(s[4 * j + 2 * h] - m_use);
                    s[4 * j + 2 * h + 1] = exp2f(s[4 * j + 2 * h + 1] - m_use);
                    sum += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
                }
                l_run[h] = l_run[h] * scale_o[h] + sum;
            }
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                o[4 * j + 0] *= scale_o[0];
                o[4 * j + 1] *= scale_o[0];
                o[4 * j + 2] *= scale_o[1];
                o[4 * j + 3] *= scale_o[1];
            }
            // P into shared memory, K-major with the 128-byte swizzle (16-byte chunk ^= row % 8).
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = r_local + 8 * h;
                    const int key = wg * 32 + 8 * j + 2 * quad;
                    const int byte = r * 128 + (((key / 8) ^ (r % 8)) * 16) + (key % 8) * 2;
                    *reinterpret_cast<uint32_t*>(s_p + byte) = Elem<T>::pack(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]);
                }
            }
            ptx::fence_proxy_async_shared_cta();
            ptx::bar_sync(1, kThreads);

            // O[:, 256·wg ..] += P·V: V rows are the tile's keys, its columns boxes 4·wg .. 4·wg + 3.
            ptx::fence_operands(o);
            ptx::wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                const uint64_t da = smem_desc_sw128(s_p + kk * 32, 16);
                const uint64_t db = smem_desc_sw128(kv + (4 * wg) * kBoxBytes + kk * 16 * 128, kBoxBytes);
                Elem<T>::pv(o, da, db);
            }
            ptx::wgmma_commit_group();
            ptx::fence_operands(o);
            ptx::wgmma_wait_group<0>();
            ptx::fence_operands(o);
            stage ^= 1;
        }

        // Row sums: this thread's partial -> quad -> both warpgroups.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
            l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
            if (quad == 0) {
                s_sum[wg * kBlockM + r_local + 8 * h] = l_run[h];
            }
        }
        ptx::bar_sync(1, kThreads);
        const bool direct = n_splits == 1;
        // The chunk must be one of this request's (split < n_splits): another index inside the
        // partials would overwrite a chunk of another request.
        const bool chunk_ok = split < n_splits && (direct || (chunk >= 0 && chunk < p.num_chunks));
        if (!chunk_ok) {
            if (threadIdx.x == 0 && blockIdx.y == 0) {
                atomicAdd(p.num_invalid, 1);
            }
            continue;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r_local + 8 * h;
            const int row = m0 + r;
            if (row >= p.rows) {
                continue;
            }
            const float l = s_sum[r] + s_sum[kBlockM + r];
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const float lse = l > 0.0f ? (m_run[h] + log2f(l)) * 0.69314718055994530942f : -INFINITY;
            if (direct) {
                T* out = static_cast<T*>(p.out) + (int64_t(req) * p.rows + row) * kDimV + wg * 256;
#pragma unroll
                for (int j = 0; j < 32; ++j) {
                    *reinterpret_cast<uint32_t*>(out + 8 * j + 2 * quad) = Elem<T>::pack(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
                }
                if (wg == 0 && quad == 0) {
                    p.lse[int64_t(req) * p.rows + row] = lse;
                }
            } else {
                float* out = p.o_partial + (chunk * p.rows + row) * kDimV + wg * 256;
#pragma unroll
                for (int j = 0; j < 32; ++j) {
                    *reinterpret_cast<float2*>(out + 8 * j + 2 * quad) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
                }
                if (wg == 0 && quad == 0) {
                    p.lse_partial[chunk * p.rows + row] = lse;
                }
            }
        }
    }
}

// Opts the kernel in to its shared memory, then launches it.
template <auto Kernel>
dk_status_t launch_decode(dim3 grid, cudaStream_t stream, const KernelParams& kp) {
    const dk_status_t attr = status_from_cuda(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    if (attr != DK_STATUS_OK) {
        return attr;
    }
    return launch<Kernel>(grid, kThreads, kSmemBytes, stream, kp);
}

}  // namespace dk::mla

extern "C" dk_status_t dk_mla_decode(const dk_mla_decode_params_t* p, dk_stream_t stream) {
    using namespace dk::mla;
    if (p == nullptr || p->batch < 0 || p->s_q < 1 || p->h_q < 1 || p->num_parts < 1 || p->num_chunks < 0 || p->max_pages < 0 ||
        p->num_pages < 0) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->page != 16 && p->page != 32 && p->page != 64 && p->page != 128) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (p->dtype != DK_DTYPE_BF16 && p->dtype != DK_DTYPE_F16) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    const int64_t rows = int64_t(p->s_q) * p->h_q;
    if (rows > INT32_MAX / 2 || int64_t(p->batch) * rows > INT32_MAX) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    if (int64_t(p->num_pages) * p->page > INT32_MAX) {
        return DK_STATUS_INVALID_ARGUMENT;  // TMA row coordinates of the cache are 32-bit
    }
    if (p->num_invalid == nullptr) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    auto s = reinterpret_cast<cudaStream_t>(stream);
    // Zeroed first, whatever the batch: a count left from an earlier step is never reported.
    cudaMemsetAsync(p->num_invalid, 0, sizeof(int32_t), s);
    if (p->batch == 0) {
        return dk::status_from_cuda(cudaGetLastError());
    }
    if (p->block_table == nullptr || p->lens == nullptr || p->parts == nullptr || p->splits == nullptr || p->out == nullptr ||
        p->lse == nullptr || (p->num_chunks > 0 && (p->o_partial == nullptr || p->lse_partial == nullptr))) {
        return DK_STATUS_INVALID_ARGUMENT;
    }
    KernelParams kp;
    static_assert(sizeof(CUtensorMap) == sizeof(dk_tensor_map_t), "tensor map size");
    std::memcpy(&kp.tma_q, &p->tma_q, sizeof(CUtensorMap));
    std::memcpy(&kp.tma_kv, &p->tma_kv, sizeof(CUtensorMap));
    kp.block_table = p->block_table;
    kp.lens = p->lens;
    kp.parts = p->parts;
    kp.splits = p->splits;
    kp.out = p->out;
    kp.lse = p->lse;
    kp.o_partial = p->o_partial;
    kp.lse_partial = p->lse_partial;
    kp.num_invalid = p->num_invalid;
    kp.batch = p->batch;
    kp.s_q = p->s_q;
    kp.h_q = p->h_q;
    kp.rows = static_cast<int>(rows);
    kp.page = p->page;
    kp.max_pages = p->max_pages;
    kp.num_pages = p->num_pages;
    kp.num_parts = p->num_parts;
    kp.num_chunks = p->num_chunks;
    kp.scale_log2 = p->softmax_scale * 1.44269504088896340736f;
    const int64_t m_blocks = dk::ceil_div<int64_t>(rows, kBlockM);
    if (m_blocks > 65535) {
        return DK_STATUS_INVALID_ARGUMENT;  // the grid's second dimension
    }
    const dim3 grid(static_cast<unsigned>(p->num_parts), static_cast<unsigned>(m_blocks));
    return p->dtype == DK_DTYPE_F16 ? launch_decode<mla_decode_kernel<__half>>(grid, s, kp)
                                    : launch_decode<mla_decode_kernel<__nv_bfloat16>>(grid, s, kp);
}
