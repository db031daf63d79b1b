/*
 * deepkern C ABI: the only header the Rust side (and any C caller) sees.
 *
 * Rules:
 *   - Plain C99: no CUDA headers, no C++ types. Streams are passed as `dk_stream_t`, which is
 *     ABI-identical to both `CUstream` (driver API) and `cudaStream_t` (runtime API).
 *   - One params struct per launcher, passed by const pointer and read before the call returns.
 *     Pointer fields carry their shape in a comment; sizes and strides are in elements.
 *   - Every entry point returns a `dk_status_t`. Nothing throws, exits or aborts across this
 *     boundary. Launchers re-check only what would otherwise be undefined behaviour on the device;
 *     all user-facing validation happens in the safe Rust wrappers before any call.
 *   - Launches are asynchronous on the given stream. The current CUDA context of the calling thread
 *     must be the primary context of the device that owns the stream and every pointer.
 */
#ifndef DEEPKERN_H
#define DEEPKERN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a struct layout or a signature in this header changes. */
#define DK_ABI_VERSION 11

/* Elements per FP8 quantisation group along K (1x128 activations, 128x128 weights). */
#define DK_QUANT_GROUP 128

typedef struct CUstream_st* dk_stream_t;

typedef enum dk_status {
    DK_STATUS_OK = 0,
    /* A params field is out of its documented range (a bug in the caller's validation). */
    DK_STATUS_INVALID_ARGUMENT = 1,
    /* A pointer or stride does not meet the kernel's alignment contract. */
    DK_STATUS_MISALIGNED = 2,
    /* The device cannot run this build's kernels (they are compiled for sm_90a only). */
    DK_STATUS_UNSUPPORTED_DEVICE = 3,
    /* The launch asked for more registers, shared memory or threads than the device has. */
    DK_STATUS_OUT_OF_RESOURCES = 4,
    /* Any other CUDA runtime error; dk_last_cuda_error() returns its code. */
    DK_STATUS_CUDA_ERROR = 5,
} dk_status_t;

/* Static, human-readable name of a status ("unknown status" for values outside the enum). */
const char* dk_status_string(dk_status_t status);

/* The cudaError_t behind the most recent DK_STATUS_CUDA_ERROR (or other launch failure) returned
 * on the calling thread; 0 if none. */
int32_t dk_last_cuda_error(void);

/* Static name of a cudaError_t code, as cudaGetErrorName gives it. */
const char* dk_cuda_error_name(int32_t cuda_error);

/* DK_ABI_VERSION of the compiled library. */
uint32_t dk_abi_version(void);

/*
 * Per-token-group FP8 quantisation (1x128), DeepSeek-V3 recipe, for a batch of operands.
 *
 * For every row r of operand g and every group kb of 128 columns:
 *   amax  = max(max_j |x[g, r, kb*128 + j]|, 1e-4)
 *   scale = amax / 448                          (f32 division, round to nearest)
 *   scale = 2^ceil(log2(scale)) if ue8m0        (exact: bumps the exponent when the mantissa is non-zero)
 *   q[g, r, kb*128 + j] = e4m3_rn_satfinite(x[g, r, kb*128 + j] * (1 / scale))
 *   sf[g, kb, r] = scale
 * Rows m..m_pad of sf (m_pad = m rounded up to a multiple of 4) are padding and are not written.
 *
 * Contract (checked by the Rust wrapper): k % 128 == 0; x and sf 16-byte aligned; q 8-byte aligned;
 * num_groups * m * k < 2^62.
 */
typedef struct dk_quant_per_token_group_params {
    const uint16_t* x; /* [num_groups, m, k] bf16 bits, row-major, contiguous */
    uint8_t* q;        /* [num_groups, m, k] e4m3, row-major, contiguous */
    float* sf;         /* [num_groups, k / 128, m_pad] f32, m_pad = round_up(m, 4) */
    int64_t num_groups;
    int64_t m;
    int64_t k;
    int32_t ue8m0; /* non-zero: round every scale up to a power of two */
} dk_quant_per_token_group_params_t;

dk_status_t dk_quant_per_token_group(const dk_quant_per_token_group_params_t* params, dk_stream_t stream);

/*
 * Fused SwiGLU and per-token-group FP8 quantisation (the MoE expert's activation): for every
 * operand g, row r and column c < k of the [num_groups, m, 2k] bf16 input h = [gate | up],
 *   a[g, r, c] = (gate / (1 + exp(-gate))) * up      in f32 (gate = h[g, r, c], up = h[g, r, k + c])
 * then a is quantised exactly as dk_quant_per_token_group quantises x (same recipe, same layouts).
 *
 * Contract (checked by the Rust wrapper): k % 128 == 0; h and sf 16-byte aligned; q 8-byte
 * aligned; num_groups * m * 2k < 2^62.
 */
typedef struct dk_silu_mul_quant_params {
    const uint16_t* h; /* [num_groups, m, 2k] bf16 bits: gate in columns 0..k, up in k..2k */
    uint8_t* q;        /* [num_groups, m, k] e4m3 */
    float* sf;         /* [num_groups, k / 128, m_pad] f32, m_pad = round_up(m, 4) */
    int64_t num_groups;
    int64_t m;
    int64_t k;
    int32_t ue8m0;
} dk_silu_mul_quant_params_t;

dk_status_t dk_silu_mul_quant(const dk_silu_mul_quant_params_t* params, dk_stream_t stream);

/*
 * Per-block FP8 quantisation (128x128) of weights, for a batch of operands (one per expert).
 *
 * For every operand g and every block (nb, kb) of 128 rows x 128 columns (the last block row may
 * be partial when n % 128 != 0; it uses the rows it has):
 *   amax  = max(max over the block of |w|, 1e-4)
 *   scale = amax / 448, then 2^ceil(log2(scale)) if ue8m0       (as for the per-token quantiser)
 *   q     = e4m3_rn_satfinite(w * (1 / scale))
 *   sf[g, nb, kb] = scale
 *
 * Contract (checked by the Rust wrapper): k % 128 == 0; w and sf 16-byte aligned; q 8-byte aligned;
 * num_groups * n * k < 2^62.
 */
typedef struct dk_quant_per_block_params {
    const uint16_t* w; /* [num_groups, n, k] bf16 bits, row-major, contiguous */
    uint8_t* q;        /* [num_groups, n, k] e4m3, row-major, contiguous */
    float* sf;         /* [num_groups, ceil(n / 128), k / 128] f32, row-major */
    int64_t num_groups;
    int64_t n;
    int64_t k;
    int32_t ue8m0; /* non-zero: round every scale up to a power of two */
} dk_quant_per_block_params_t;

dk_status_t dk_quant_per_block(const dk_quant_per_block_params_t* params, dk_stream_t stream);

/* A CUDA tensor map (the 128 opaque bytes of a CUtensorMap), encoded by the caller with
 * cuTensorMapEncodeTiled. */
typedef struct dk_tensor_map {
    uint64_t opaque[16];
} dk_tensor_map_t;

/* K per pipeline stage of the FP8 GEMM (one scale block). Tile shapes (block_m x block_n) come from
 * a compiled menu: block_m 64 or 128 with block_n in {16, 32, 48, 64, 80, 96, 112, 128, 144, 160,
 * 176, 192}, and block_m 256 (dense and masked) with block_n up to 128; the contiguous layout takes
 * block_m 128 with block_n up to 176 only. dk_gemm_fp8_config_supported answers for one shape. */
#define DK_GEMM_BLOCK_K 128
/* Deepest pipeline a launch may ask for. */
#define DK_GEMM_MAX_STAGES 16
/* Rows per arrival counter shared by the EP receive and the contiguous GEMM (its 128-row block). */
#define DK_ARRIVAL_ROWS 128
/* Most groups of the masked layout (each CTA snapshots the per-group tile counts in shared memory). */
#define DK_GEMM_MAX_MASKED_GROUPS 1024

/*
 * Dense FP8 block-scaled GEMM, NT (DeepSeek-V3 recipe):
 *   D[r, c] = sum_kb ( sum_{j in block kb} A[r, j] * B[c, j] ) * sa[r, kb] * sb[c / 128, kb]   (bf16 out)
 * accumulated in f32 and promoted on CUDA cores after every 128 of K.
 *
 *   tma_a   A  [m, k] e4m3 row-major: dims {k, m}, box {128, block_m}, 128-byte swizzle
 *   tma_b   B  [n, k] e4m3 row-major: dims {k, n}, box {128, block_n}, 128-byte swizzle
 *   tma_sfa sa [k/128, m_pad] f32 (the per-token quantiser's layout): dims {m_pad, k/128}, box {block_m, 1}
 *   sfb     sb [ceil(n/128), k/128] f32 row-major
 *   d       D  [m, n] bf16 row-major; every element is written, nothing outside
 *
 * Grouped layouts for mixture-of-experts (B holds `groups` experts: [groups * n, k], scales
 * [groups, ceil(n/128), k/128]; tma_b covers groups * n rows):
 *   DK_GEMM_CONTIGUOUS: A is [m, k], the rows of all experts stacked, each expert's segment padded
 *     to 128 rows; m_indices[r] is row r's expert, -1 on padding. A 128-row block takes the expert
 *     of its first row (a block whose first row is -1 or >= groups is skipped); only rows whose
 *     index equals the block's expert are stored, the others are left untouched.
 *   DK_GEMM_MASKED: A is [groups, max_m, k] (tma_a covers groups * max_m rows; tma_sfa the
 *     per-token quantiser's [groups, k/128, m_pad] scales as groups * k/128 rows), D is
 *     [groups, max_m, n]; only rows r < masked_m[g] (device memory, clamped to max_m) are computed
 *     and stored. Every CTA reads masked_m once, at its start, into shared memory, so its producer
 *     and consumers walk the same tiles even if masked_m changed during the launch;
 *     groups <= DK_GEMM_MAX_MASKED_GROUPS.
 *
 * Launch shape (chosen by deepkern::plan::gemm): a (block_m, block_n) of the menu for the layout,
 * 1 <= stages <= DK_GEMM_MAX_STAGES pipeline stages, and swizzle_group >= 1 M blocks swept per N
 * block (L2 reuse; the masked layout walks each group's tiles M-fastest instead). The dynamic
 * shared memory is dk_gemm_fp8_smem_bytes(block_m, block_n, stages, masked ? groups : 0); a shape
 * that exceeds the device's limit fails to launch (DK_STATUS_CUDA_ERROR or OUT_OF_RESOURCES).
 *
 * Contract (checked by the Rust wrapper, which also encodes the tensor maps): m, n >= 0;
 * k > 0 and k % 128 == 0; num_sms >= 1; groups >= 1 for the grouped layouts; masked: m ==
 * groups * max_m.
 */
typedef enum dk_gemm_layout {
    DK_GEMM_DENSE = 0,
    DK_GEMM_CONTIGUOUS = 1,
    DK_GEMM_MASKED = 2,
} dk_gemm_layout_t;

/* TMA multicast across clusters of two CTAs (dense and contiguous layouts). The CTAs of a cluster
 * compute a pair of tiles adjacent along N (DK_GEMM_MULTICAST_A: both read the same A tile) or
 * along M (DK_GEMM_MULTICAST_B: the same B tile); each loads half of the shared tile into both
 * CTAs' shared memory with one multicast, halving that operand's L2 traffic. A pair whose second
 * tile lies outside D, is skipped (contiguous padding) or uses another expert loads its operands
 * without multicast. */
typedef enum dk_gemm_multicast {
    DK_GEMM_MULTICAST_NONE = 0,
    DK_GEMM_MULTICAST_A = 1,
    DK_GEMM_MULTICAST_B = 2,
} dk_gemm_multicast_t;

typedef struct dk_gemm_fp8_params {
    dk_tensor_map_t tma_a;
    dk_tensor_map_t tma_b;
    dk_tensor_map_t tma_sfa;
    const float* sfb;         /* [groups, ceil(n / 128), k / 128] */
    uint16_t* d;              /* [m, n] bf16 bits; NULL when d_f32 is given */
    float* d_f32;             /* or [m, n] f32: D = A·Bᵀ, or D += A·Bᵀ with accumulate (weight gradients) */
    int32_t accumulate;       /* with d_f32 only: 1 reads D and adds the product in f32 */
    const int32_t* m_indices; /* DK_GEMM_CONTIGUOUS: [m] */
    const int32_t* masked_m;  /* DK_GEMM_MASKED: [groups] */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t num_sms; /* persistent CTAs at most */
    int32_t groups;  /* 1 for DK_GEMM_DENSE */
    int32_t max_m;   /* DK_GEMM_MASKED: rows per group */
    dk_gemm_layout_t layout;
    int32_t block_m;       /* tile rows: 64, 128 or 256 (contiguous: 128) */
    int32_t block_n;       /* tile columns, from the menu */
    int32_t stages;        /* pipeline depth, 1 ..= DK_GEMM_MAX_STAGES */
    int32_t swizzle_group; /* M blocks per rasterisation group, >= 1 */
    /* DK_GEMM_CONTIGUOUS only, or NULL: [m / 128] counters of rows arrived per 128-row block,
     * incremented with release semantics by a kernel running concurrently (the EP dispatch's
     * receive with its own `arrivals`). Each tile waits (acquire) for its block to reach 128 before
     * reading m_indices and A, so tiles start as their rows land; block_m must be 128 and
     * m % 128 == 0. The writer must be able to run beside the GEMM (num_sms leaves it SMs); a
     * block still short after 30 s traps rather than hanging: a sticky error that leaves the
     * CUDA context unusable. */
    const int32_t* arrivals;
    /* DK_GEMM_DENSE with d (bf16) only: 1 stages each output tile in shared memory and writes it
     * with TMA stores through tma_d, instead of bounds-checked stores from registers; the tile takes
     * block_m * block_n * 2 bytes of shared memory. tma_d: D [m, n] bf16, dims {n, m}, box
     * {S / 2, block_m} with swizzle S bytes, S the largest of 128, 64 and 32 that divides
     * block_n * 2 (one store per column chunk of S / 2). 0: tma_d is unused. */
    int32_t tma_store;
    dk_tensor_map_t tma_d;
    /* DK_GEMM_MULTICAST_NONE, or (dense; contiguous with block_n <= 128; without arrivals;
     * num_sms >= 2) the operand clusters of two CTAs share; the launch then runs an even number of
     * CTAs, at most num_sms. */
    dk_gemm_multicast_t multicast;
    /* With multicast: the shared operand's tensor map with half a tile per box: A as tma_a with
     * box {128, block_m / 2}, or B as tma_b with box {128, block_n / 2}. Unused otherwise. */
    dk_tensor_map_t tma_half;
} dk_gemm_fp8_params_t;

dk_status_t dk_gemm_fp8(const dk_gemm_fp8_params_t* params, dk_stream_t stream);

/* 1 when this build has a kernel for the (block_m, block_n) tile of `layout`, else 0. Host only: no
 * CUDA call, no device needed. */
int32_t dk_gemm_fp8_config_supported(dk_gemm_layout_t layout, int32_t block_m, int32_t block_n);

/* Dynamic shared memory of one CTA in bytes (including 1024 bytes of alignment slack), or -1 for
 * arguments outside 1 ..= 256 (block sizes), 1 ..= DK_GEMM_MAX_STAGES, 0 ..= DK_GEMM_MAX_MASKED_GROUPS;
 * tma_store != 0 adds the staging tile. Host only; deepkern::plan::gemm::smem_plan is its mirror. */
int64_t dk_gemm_fp8_smem_bytes(int32_t block_m, int32_t block_n, int32_t stages, int32_t masked_groups, int32_t tma_store);

/* Element types of 16-bit tensors. */
typedef enum dk_dtype {
    DK_DTYPE_BF16 = 0,
    DK_DTYPE_F16 = 1,
} dk_dtype_t;

/* MLA value width (the latent part of the 576-wide keys). */
#define DK_MLA_HEAD_DIM_V 512

/*
 * MLA split-KV combine: merges the partial results of the chunks of each request (the schedule
 * of deepkern::plan::mla), per query row r (rows = s_q * h_q, heads fastest):
 *   lse[b, r] = ln sum_c exp(lse_partial[c, r])                     over c in splits[b] .. splits[b+1]
 *   out[b, r] = sum_c exp(lse_partial[c, r] - lse[b, r]) * o_partial[c, r]      (then rounded)
 * A row that no chunk saw (every lse_partial -inf) gets zeros and lse -inf. Requests with a single
 * chunk are skipped (the decode kernel writes their outputs directly). A request whose chunk range
 * is malformed (decreasing, negative, or past num_chunks) is skipped and counted in num_invalid.
 *
 * Contract (checked by the Rust wrapper): batch >= 0, rows >= 1, num_chunks >= 0; all pointers
 * 16-byte aligned.
 */
typedef struct dk_mla_combine_params {
    const float* o_partial;   /* [num_chunks, rows, 512] f32 */
    const float* lse_partial; /* [num_chunks, rows] f32, natural log */
    const int32_t* splits;    /* [batch + 1] cumulative chunk counts (device memory) */
    void* out;                /* [batch, rows, 512] bf16 or f16 (dtype) */
    float* lse;               /* [batch, rows] f32 */
    int32_t* num_invalid;     /* [1]: requests skipped for a malformed chunk range (zeroed first) */
    int32_t batch;
    int32_t rows;
    int32_t num_chunks;
    dk_dtype_t dtype;
} dk_mla_combine_params_t;

dk_status_t dk_mla_combine(const dk_mla_combine_params_t* params, dk_stream_t stream);

/* Words per part in an MLA split-KV schedule, and the schedule's cost model (in 64-key tiles). */
#define DK_MLA_PART_WORDS 5
#define DK_MLA_KV_BLOCK 64
#define DK_MLA_SPLIT_OVERHEAD 5

/*
 * MLA split-KV schedule on the device (graph-capturable: lengths are read from device memory).
 * Writes exactly the plan of deepkern::plan::mla::schedule, encoded per part as
 * [begin_req, begin_block, end_req, end_block, begin_split] ([-1, 0, -1, 0, 0] for an empty part),
 * and splits[b + 1] = cumulative chunk counts. Negative lengths count as 0.
 *
 * Contract (checked by the Rust wrapper): batch >= 0; num_parts >= 1.
 */
typedef struct dk_mla_schedule_params {
    const int32_t* lens; /* [batch] (device memory) */
    int32_t* parts;      /* [num_parts, DK_MLA_PART_WORDS] */
    int32_t* splits;     /* [batch + 1] */
    int32_t batch;
    int32_t num_parts;
} dk_mla_schedule_params_t;

dk_status_t dk_mla_schedule(const dk_mla_schedule_params_t* params, dk_stream_t stream);

/*
 * MLA decode attention over a paged latent cache (one KV head of 576 = 512 latent + 64 RoPE
 * columns; values are the first 512), split-KV along the plan of dk_mla_schedule. For request b,
 * query row r = s * h_q + h (token s of s_q, head h), with causal multi-token decode (token s sees
 * keys 0 ..= lens[b] - s_q + s):
 *   requests with one chunk:  out[b, r, :] and lse[b, r] (natural log) directly
 *   requests with n > 1:      o_partial[splits[b] + c, r, :] (normalised, f32) and
 *                             lse_partial[splits[b] + c, r] for each chunk c; dk_mla_combine merges
 * A row that sees no key gets zeros and lse -inf. Keys past a sequence's length are never loaded,
 * and a block-table entry outside 0 .. num_pages - 1 is never dereferenced (its keys count as
 * masked, and a malformed part or chunk range is skipped; both are counted in num_invalid).
 *
 * Tensor maps (encoded by the caller, 16-bit elements, 128-byte swizzle, 64-column boxes):
 *   tma_q:  q as [batch * s_q * h_q rows, 576 cols], box 64 rows
 *   tma_kv: cache as [num_pages * page rows, 576 cols], box min(page, 64) rows
 * Contract (checked by the Rust wrapper): page in {16, 32, 64, 128}; s_q, h_q >= 1; block_table
 * covers every length; parts and splits from dk_mla_schedule for these lengths and num_parts.
 */
typedef struct dk_mla_decode_params {
    dk_tensor_map_t tma_q;
    dk_tensor_map_t tma_kv;
    const int32_t* block_table; /* [batch, max_pages] */
    const int32_t* lens;        /* [batch] */
    const int32_t* parts;       /* [num_parts, DK_MLA_PART_WORDS] */
    const int32_t* splits;      /* [batch + 1] */
    void* out;                  /* [batch, s_q * h_q, 512] bf16 or f16 (dtype) */
    float* lse;                 /* [batch, s_q * h_q] */
    float* o_partial;           /* [num_chunks, s_q * h_q, 512] */
    float* lse_partial;         /* [num_chunks, s_q * h_q] */
    int32_t* num_invalid;       /* [1] (zeroed first) */
    int32_t batch;
    int32_t s_q;
    int32_t h_q;
    int32_t page;
    int32_t max_pages;
    int32_t num_pages;
    int32_t num_parts;
    int32_t num_chunks;
    float softmax_scale;
    dk_dtype_t dtype;
} dk_mla_decode_params_t;

dk_status_t dk_mla_decode(const dk_mla_decode_params_t* params, dk_stream_t stream);

/* Limits of the expert-parallel kernels. */
#define DK_EP_MAX_RANKS 64
#define DK_EP_MAX_EXPERTS 1024

/*
 * Expert-parallel dispatch layout of one rank's router output. Experts are split evenly over the
 * ranks: expert e lives on rank e / (num_experts / ranks). Index -1 means "no expert".
 *
 *   tokens_per_expert[e] = number of slots naming expert e
 *   is_token_in_rank[t, r] = 1 if some slot of token t names an expert of rank r, else 0
 *   tokens_per_rank[r]   = number of tokens t with is_token_in_rank[t, r] = 1
 *   num_invalid[0]       = number of slots whose index is outside -1 .. num_experts - 1
 *                          (such slots are ignored: nothing is written for them)
 *
 * All outputs are overwritten (the counters are zeroed on the stream first).
 * Contract (checked by the Rust wrapper): 1 <= ranks <= DK_EP_MAX_RANKS; 1 <= num_experts <=
 * DK_EP_MAX_EXPERTS; num_experts % ranks == 0; k >= 1; tokens >= 0.
 */
typedef struct dk_ep_layout_params {
    const int32_t* topk_idx;   /* [tokens, k] */
    int32_t* tokens_per_rank;  /* [ranks] */
    int32_t* tokens_per_expert; /* [num_experts] */
    uint8_t* is_token_in_rank; /* [tokens, ranks] */
    int32_t* num_invalid;      /* [1] */
    int64_t tokens;
    int32_t k;
    int32_t ranks;
    int32_t num_experts;
} dk_ep_layout_params_t;

dk_status_t dk_ep_layout(const dk_ep_layout_params_t* params, dk_stream_t stream);

/*
 * Expert-parallel all-to-all over a group of ranks whose symmetric buffers are reachable through
 * a device-side table of peer pointers (one process driving R virtual ranks on one GPU, or one
 * process per GPU with the peers' buffers mapped through CUDA IPC: the device code is the same).
 *
 * Every rank's symmetric buffer has the same layout; the byte offsets below are planned by the
 * Rust side (deepkern::plan::ep) and must be 16-byte aligned. Regions:
 *   signals   u32 [DK_EP_SIGNAL_WORDS]: per kind and source rank, the epoch of the last signal;
 *             per kind a block-completion counter; this rank's error word (DK_EP_ERROR_* bits)
 *             and the first wait that timed out (DK_EP_TIMEOUT_WORD); per source rank, the error
 *             bits it published with its last signal; per epoch parity and source rank, the
 *             invalid slots and error bits of its notify of that parity
 *   counts    i32 [2, ranks, num_experts]: per epoch parity, every source rank's tokens_per_expert
 *             (normal dispatch; the notify of epoch e writes slot e & 1, see below)
 *   ll_counts i32 [experts_per_rank, ranks]: rows each source sent to each local expert (low latency)
 *   recv_*    normal-mode staging: x [recv_rows, hidden] (payload), sf f32 [hidden / 128, recv_rows],
 *             weight f32 [recv_rows], src i32 [recv_rows]
 *   ll_*      low-latency staging: x [experts_per_rank * ranks * ll_max_tokens, hidden], sf f32
 *             [hidden / 128, same rows], src i32 [same rows]; row (le * ranks + s) * ll_max_tokens + p
 *   comb      bf16 [max_tokens * max_topk, hidden]: expert outputs sent back, row t * max_topk + j
 *             (staged: row prefix[e] + pair_pos, the row the pair had in this rank's outbox)
 *   out_*     staged only: this rank's outbox, x [max_tokens * max_topk, hidden], sf f32
 *             [same rows, hidden / 128] (row-major), weight f32, src i32; row prefix[e] + pair_pos,
 *             prefix[e] = sum of tokens_per_expert over experts below e (so rows go out grouped by
 *             destination rank, then local expert, then token)
 *   ret       staged only: bf16 [recv_rows, hidden], expert outputs in inbox order, to go back
 *
 * Staged transport (staged = 1: copy engines or NCCL move the bytes, not the kernels): the normal
 * send phase writes only this rank's outbox and signals nothing; the caller moves the block of
 * rows bound for each destination (one contiguous run per destination) into the destination's
 * recv_* regions, which then hold source-major rows (source s's block at the sum of the rows of
 * lower sources, inside it local expert then token order; sf row-major [rows, hidden / 128]), and
 * sets the DISPATCH signal words itself (stream memory operations). Combine mirrors it through ret
 * and comb. The receive phases wait on the same signal words in both transports. Low-latency mode
 * needs the peer transport.
 *
 * A received row's source is packed as (src_rank * max_tokens + token) * max_topk + slot; -1 marks
 * padding. A phase signals a kind by storing the epoch into every peer's slot (kind, rank) with
 * system-scope release semantics once all its blocks are done, after storing its own error bits
 * (timeout and overflow; DK_EP_ERROR_PEER is never forwarded) into every peer's
 * DK_EP_PEER_ERROR_WORD slot; a phase that needs the data waits (system-scope acquire) until all
 * ranks' slots of that kind reach the epoch. A wait that exceeds timeout_ns sets
 * DK_EP_ERROR_TIMEOUT, records the first (kind, source) that did not arrive in
 * DK_EP_TIMEOUT_WORD, and gives up, never hanging the GPU. A receive phase whose wait timed out, or
 * that finds a peer's published error bits non-zero, poisons its outputs (payload and scales NaN,
 * weights NaN, sources -1; the combine's output NaN) and sets DK_EP_ERROR_PEER in the second case.
 * The host reads and clears the error words between calls (the kernels never clear them).
 *
 * The caller passes each launch the epoch of its round: the normal dispatch's notify, send and
 * receive share one epoch (the send waits for NOTIFY and signals DISPATCH at it), so a round that
 * is refused between two phases leaves no counter behind. What a notify sends (counts, invalid
 * slots, error bits) goes to the slot of its epoch's parity: after a refused round a rank may
 * notify the next round before a slower peer has read the refused one, but never two rounds
 * ahead (its next wait needs that peer's notify of the next round).
 *
 * Contract (checked by the Rust wrapper): 1 <= ranks <= DK_EP_MAX_RANKS, 0 <= rank < ranks;
 * num_experts % ranks == 0, num_experts <= DK_EP_MAX_EXPERTS; hidden a positive multiple of 128;
 * 1 <= max_topk <= DK_EP_MAX_TOPK; ranks * max_tokens * max_topk < 2^31; 0 <= ll_max_tokens <=
 * max_tokens; m_align a positive
 * multiple of 4; num_sms >= 1.
 */
#define DK_EP_MAX_TOPK 16
#define DK_EP_SIGNAL_KINDS 5
#define DK_EP_SIGNAL_NOTIFY 0
#define DK_EP_SIGNAL_DISPATCH 1
#define DK_EP_SIGNAL_LL_DISPATCH 2
#define DK_EP_SIGNAL_COMBINE 3
#define DK_EP_SIGNAL_BARRIER 4 /* dk_ep_barrier: every rank is done with the group */
/* Word indices in the signals region. */
#define DK_EP_DONE_WORD (DK_EP_SIGNAL_KINDS * DK_EP_MAX_RANKS)
#define DK_EP_ERROR_WORD (DK_EP_DONE_WORD + DK_EP_SIGNAL_KINDS)
/* 0, or 1 + kind * DK_EP_MAX_RANKS + source of the first wait that timed out. */
#define DK_EP_TIMEOUT_WORD (DK_EP_ERROR_WORD + 1)
/* [DK_EP_MAX_RANKS]: each source rank's error bits, published with its last signal. */
#define DK_EP_PEER_ERROR_WORD (DK_EP_TIMEOUT_WORD + 1)
/* Per epoch parity p, DK_EP_NOTIFY_SLOT_WORDS words from DK_EP_NOTIFY_INVALID_WORD + p *
 * DK_EP_NOTIFY_SLOT_WORDS: [DK_EP_MAX_RANKS] each source rank's slots naming an expert outside
 * 0 .. num_experts - 1, as of its notify of that parity (normal dispatch; all ranks see every
 * rank's count and refuse together), then (from DK_EP_NOTIFY_ERROR_WORD + p *
 * DK_EP_NOTIFY_SLOT_WORDS) [DK_EP_MAX_RANKS] the error bits it published with that notify (so
 * every rank refuses the same round). */
#define DK_EP_NOTIFY_SLOT_WORDS (2 * DK_EP_MAX_RANKS)
#define DK_EP_NOTIFY_INVALID_WORD (DK_EP_PEER_ERROR_WORD + DK_EP_MAX_RANKS)
#define DK_EP_NOTIFY_ERROR_WORD (DK_EP_NOTIFY_INVALID_WORD + DK_EP_MAX_RANKS)
#define DK_EP_SIGNAL_WORDS (DK_EP_NOTIFY_INVALID_WORD + 2 * DK_EP_NOTIFY_SLOT_WORDS)
#define DK_EP_ERROR_TIMEOUT 1u  /* a wait gave up: see DK_EP_TIMEOUT_WORD */
#define DK_EP_ERROR_OVERFLOW 2u /* rows did not fit their receive buffers and were dropped */
#define DK_EP_ERROR_PEER 4u     /* a peer published an error; this rank's outputs were poisoned */

typedef enum dk_ep_payload {
    DK_EP_PAYLOAD_BF16 = 0,
    DK_EP_PAYLOAD_FP8 = 1, /* e4m3 plus f32 1x128 scales */
} dk_ep_payload_t;

typedef struct dk_ep_group {
    void* const* peers; /* [ranks] device array: base address of every rank's symmetric buffer */
    int32_t rank;
    int32_t ranks;
    int32_t num_experts;
    int32_t hidden;
    int32_t max_tokens;    /* per rank, normal dispatch and combine */
    int32_t ll_max_tokens; /* per rank, low-latency dispatch (<= max_tokens; 0: no low-latency regions) */
    int32_t max_topk;
    int32_t m_align;
    int32_t num_sms;   /* blocks a data-moving kernel may use */
    int64_t recv_rows; /* normal-mode staging capacity, rows */
    dk_ep_payload_t payload;
    uint32_t epoch; /* this call's epoch (the caller counts calls, starting at 1) */
    int64_t off_signals;
    int64_t off_counts;
    int64_t off_ll_counts;
    int64_t off_recv_x;
    int64_t off_recv_sf;
    int64_t off_recv_weight;
    int64_t off_recv_src;
    int64_t off_ll_x;
    int64_t off_ll_sf;
    int64_t off_ll_src;
    int64_t off_comb;
    int32_t staged; /* 0: peer transport; 1: staged (outbox and inbox, moved by the caller) */
    int32_t reserved;
    int64_t off_out_x;
    int64_t off_out_sf;
    int64_t off_out_weight;
    int64_t off_out_src;
    int64_t off_ret;
    int64_t timeout_ns; /* > 0: how long a wait for peers may last (globaltimer) */
} dk_ep_group_t;

/* One rank's router output and payload, read by the send phases. */
typedef struct dk_ep_tokens {
    const void* x;             /* [tokens, hidden] bf16 or e4m3 (the group's payload) */
    const float* x_sf;         /* FP8 only: [hidden / 128, x_sf_stride] (the quantiser's layout) */
    int64_t x_sf_stride;       /* >= tokens */
    const int32_t* topk_idx;   /* [tokens, k] */
    const float* topk_weights; /* [tokens, k] */
    const int32_t* tokens_per_expert; /* [num_experts], from dk_ep_layout of this topk_idx */
    const int32_t* pair_pos;   /* [tokens, k], from dk_ep_pair_positions of this topk_idx */
    int32_t tokens;            /* <= max_tokens (normal) or ll_max_tokens (low latency) */
    int32_t k;                 /* <= max_topk */
} dk_ep_tokens_t;

/*
 * pair_pos[t, j] = number of slots (t', j') before (t, j) in (token, slot) order that name the same
 * expert as slot (t, j); -1 for slots naming no valid expert.
 */
typedef struct dk_ep_pair_positions_params {
    const int32_t* topk_idx; /* [tokens, k] */
    int32_t* pair_pos;       /* [tokens, k] */
    int32_t tokens;
    int32_t k;
    int32_t num_experts;
} dk_ep_pair_positions_params_t;

dk_status_t dk_ep_pair_positions(const dk_ep_pair_positions_params_t* params, dk_stream_t stream);

/*
 * Normal dispatch, phase 1 of 3: send this rank's tokens_per_expert (counts slot epoch & 1),
 * num_invalid (DK_EP_NOTIFY_INVALID_WORD) and published error bits (DK_EP_NOTIFY_ERROR_WORD, both
 * at parity epoch & 1) to every peer, then signal NOTIFY.
 */
typedef struct dk_ep_notify_params {
    dk_ep_group_t group;
    const int32_t* tokens_per_expert; /* [num_experts] */
    const int32_t* num_invalid;       /* [1], from dk_ep_layout of this rank's topk_idx */
} dk_ep_notify_params_t;

dk_status_t dk_ep_dispatch_notify(const dk_ep_notify_params_t* params, dk_stream_t stream);

/*
 * Normal dispatch, phase 2 of 3: wait for every rank's NOTIFY, then write each (token, slot) pair
 * into its expert's rank at the row the contiguous layout gives it (local experts in order, each
 * padded to m_align; inside an expert, source rank, token, slot order), then signal DISPATCH. A
 * destination whose rows would exceed recv_rows gets nothing, and DK_EP_ERROR_OVERFLOW is set.
 * Staged: no wait, the pairs go to this rank's outbox (see above), no signal.
 */
typedef struct dk_ep_dispatch_send_params {
    dk_ep_group_t group;
    dk_ep_tokens_t tokens;
} dk_ep_dispatch_send_params_t;

dk_status_t dk_ep_dispatch_send(const dk_ep_dispatch_send_params_t* params, dk_stream_t stream);

/*
 * Normal dispatch, phase 3 of 3: wait for every rank's DISPATCH, then copy the staged rows into
 * the caller's buffers. rows = sum over local experts of round_up(count, m_align), which the caller
 * learned from the counts region; padding rows get zero payload and scales, weight 0, expert -1.
 * Staged: the staged rows are source-major (see above) and stage_rows records where each came from.
 */
typedef struct dk_ep_dispatch_recv_params {
    dk_ep_group_t group;
    void* x;            /* [rows, hidden] payload */
    float* sf;          /* FP8 only: [hidden / 128, rows] */
    int32_t* m_indices; /* [rows]: local expert of each row, -1 on padding */
    float* weights;     /* [rows] */
    int32_t* src;       /* [rows]: packed source, -1 on padding */
    int32_t* counts;    /* [experts_per_rank] */
    int32_t* stage_rows; /* staged only: [rows], the inbox row each row came from, -1 on padding */
    int64_t rows;
    /* Or NULL: [rows / 128] zeroed counters; after writing a row (payload, scales, m_indices,
     * weight, src) the kernel adds 1 to its 128-row block's counter with release semantics, for a
     * contiguous GEMM running concurrently (dk_gemm_fp8_params.arrivals). rows % 128 == 0. */
    int32_t* arrivals;
} dk_ep_dispatch_recv_params_t;

dk_status_t dk_ep_dispatch_recv(const dk_ep_dispatch_recv_params_t* params, dk_stream_t stream);

/*
 * Low-latency dispatch, send phase: write each pair into its expert's rank at staging row
 * (local_expert * ranks + rank) * ll_max_tokens + pair_pos, then the per-expert counts, then signal
 * LL_DISPATCH. tokens <= ll_max_tokens. Tokens must name distinct experts (a pair whose position
 * reaches ll_max_tokens is dropped and DK_EP_ERROR_OVERFLOW set).
 */
dk_status_t dk_ep_ll_dispatch_send(const dk_ep_dispatch_send_params_t* params, dk_stream_t stream);

/*
 * Low-latency dispatch, receive phase: wait for every rank's LL_DISPATCH, then pack the staged rows
 * into the masked layout: expert le's rows at [le, 0 .. masked_m[le]) in source rank order.
 * capacity = ranks * ll_max_tokens rows per expert; rows past masked_m keep their old payload and get
 * src -1.
 */
typedef struct dk_ep_ll_dispatch_recv_params {
    dk_ep_group_t group;
    void* x;           /* [experts_per_rank, capacity, hidden] payload */
    float* sf;         /* FP8 only: [experts_per_rank, hidden / 128, sf_stride] */
    int64_t sf_stride; /* >= capacity */
    int32_t* src;      /* [experts_per_rank, capacity] packed source, -1 past masked_m */
    int32_t* masked_m; /* [experts_per_rank] */
} dk_ep_ll_dispatch_recv_params_t;

dk_status_t dk_ep_ll_dispatch_recv(const dk_ep_ll_dispatch_recv_params_t* params, dk_stream_t stream);

/*
 * Waits on the stream, on the device, until every rank has signalled `kind` (one of
 * DK_EP_SIGNAL_*) at the group's epoch: what a host that is about to read the counts region needs
 * when the other ranks are other processes.
 */
typedef struct dk_ep_wait_params {
    dk_ep_group_t group;
    int32_t kind;
} dk_ep_wait_params_t;

dk_status_t dk_ep_wait(const dk_ep_wait_params_t* params, dk_stream_t stream);

/*
 * Signals DK_EP_SIGNAL_BARRIER at the group's epoch to every peer, then waits for every rank's:
 * once it returns, every rank's earlier work on its stream, including writes into this rank's
 * buffer, is complete. Run before a rank unmaps its peers' buffers and frees its own.
 */
dk_status_t dk_ep_barrier(const dk_ep_wait_params_t* params, dk_stream_t stream);

/*
 * Combine, send phase (both modes): every row of y whose src is not -1 goes back to its source
 * rank's comb region at row token * max_topk + slot; then signal COMBINE. Staged: row r goes to
 * this rank's ret region at row stage_rows[r], no signal (the caller moves ret's blocks back).
 */
typedef struct dk_ep_combine_send_params {
    dk_ep_group_t group;
    const void* y;      /* [rows, hidden] bf16 */
    const int32_t* src; /* [rows] */
    const int32_t* stage_rows; /* staged only: [rows], from the dispatch's receive phase */
    int64_t rows;
} dk_ep_combine_send_params_t;

dk_status_t dk_ep_combine_send(const dk_ep_combine_send_params_t* params, dk_stream_t stream);

/*
 * Combine, receive phase: wait for every rank's COMBINE, then
 * out[t, :] = bf16( sum over slots j with 0 <= topk_idx[t, j] < num_experts of
 *                   topk_weights[t, j] * comb[t * max_topk + j, :] ), in f32, slot order.
 * topk_weights NULL: every weight is 1 (the plain sum of the expert outputs).
 * Staged: comb row prefix[topk_idx[t, j]] + pair_pos[t, j] instead (the pair's outbox row).
 */
typedef struct dk_ep_combine_recv_params {
    dk_ep_group_t group;
    const int32_t* topk_idx;   /* [tokens, k] */
    const float* topk_weights; /* [tokens, k], or NULL for weights of 1 */
    void* out;                 /* [tokens, hidden] bf16 */
    const int32_t* pair_pos;          /* staged only: [tokens, k], from the dispatch */
    const int32_t* tokens_per_expert; /* staged only: [num_experts], from the dispatch */
    int32_t tokens;
    int32_t k;
} dk_ep_combine_recv_params_t;

dk_status_t dk_ep_combine_recv(const dk_ep_combine_recv_params_t* params, dk_stream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DEEPKERN_H */
