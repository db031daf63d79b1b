// Hopper's asynchronous units, as the PTX ISA defines them:
// - mbarrier objects: init, arrive, arrive.expect_tx, the complete-tx of TMA loads, try_wait.parity
//   with phase semantics;
// - TMA (cp.async.bulk.tensor.2d): loads into shared memory that land later, at a point the seed
//   chooses, through the tensor map cuTensorMapEncodeTiled encoded (swizzle none/32/64/128 B on
//   shared addresses, out-of-bounds elements zero-filled and still counted); stores with bulk
//   async-groups (commit, wait_group, wait_group.read);
// - wgmma.mma_async: operands read from shared memory through the descriptor, as the hardware
//   decodes it, at a point between issue and the wait that covers them; accumulators undefined
//   (NaN) until that wait; FP8 products accumulated in f32, or with Hopper's reduced precision on
//   request (DEEPKERN_SIM_FP8_ACCUMULATOR=reduced);
// - setmaxnreg against the CTA's register pool; the proxy fences.
#include <cuda_fp16.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <set>
#include <tuple>

#include "layouts.hpp"
#include "sim.hpp"

namespace dksim {

namespace {

Thread* me() { return eng().running; }

// A failure found while an asynchronous operation completes. Inside a simulated thread (a wait
// that executes operations) it fails that thread's kernel at once; on the engine's side it is kept
// until the operation's caller can end the kernel (`take_async_failure`).
Failure* g_async_failure = nullptr;
Kernel* g_async_failed = nullptr;

void fail_async(Cta* c, void* at, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void fail_async(Cta* c, void* at, const char* fmt, ...) {
    char buf[640];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    auto* f = new Failure();
    f->code = CUDA_ERROR_ILLEGAL_ADDRESS;
    f->title = buf;
    f->where = at;
    char cta[96];
    std::snprintf(cta, sizeof cta, "    CTA     (%u, %u, %u), asynchronous unit", c->idx.x, c->idx.y, c->idx.z);
    f->detail = cta;
    if (eng().running != nullptr) {
        fail_self(f);
    }
    delete g_async_failure;
    g_async_failure = f;
    g_async_failed = c->kernel;
}

// Ends the kernel whose asynchronous operation failed; true if one did.
bool take_async_failure() {
    if (g_async_failure == nullptr) {
        return false;
    }
    Failure* f = g_async_failure;
    g_async_failure = nullptr;
    fail_kernel(g_async_failed, f);
    return true;
}

bool reduced_fp8_accumulation() {
    static const bool reduced = [] {
        const char* v = std::getenv("DEEPKERN_SIM_FP8_ACCUMULATOR");
        return v != nullptr && std::strcmp(v, "reduced") == 0;
    }();
    return reduced;
}

int async_percent() {
    static const int p = [] {
        const char* v = std::getenv("DEEPKERN_SIM_ASYNC");
        const int x = v != nullptr ? std::atoi(v) : 10;
        return x < 1 ? 1 : (x > 100 ? 100 : x);
    }();
    return p;
}

// The shared address of [p, p + bytes) in the calling thread's CTA, or a failure naming `what`.
uint32_t shared_addr(Cta* c, const void* p, size_t bytes, const char* what, void* at) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a < c->window->data || a + bytes > c->window->data + c->window_bytes) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS, at, "%s: %p (%zu bytes) is not in this CTA's shared memory", what, p, bytes);
    }
    return static_cast<uint32_t>(a - c->window->data);
}

// The simulator's own view of shared memory (the alias mapping: never protected).
uint8_t* shared_ptr(Cta* c, uint32_t addr) { return reinterpret_cast<uint8_t*>(c->window->alias + addr); }

// From a CTA's first use of the async proxy on, its generic writes to shared memory are tracked
// (memcheck.cpp records each one; fence.proxy.async.shared::cta clears them).
void protect_window(Cta* c) {
    const uintptr_t page = page_bytes();
    const uintptr_t from = c->window->data & ~(page - 1);
    const uintptr_t to = (c->window->data + c->window_bytes + page - 1) & ~(page - 1);
    mprotect(reinterpret_cast<void*>(from), to - from, PROT_READ);
}

void arm_proxy(Cta* c) {
    if (c->proxy_armed) {
        return;
    }
    c->proxy_armed = true;
    protect_window(c);
    if (c->proxy_fenced) {
        return;  // a fence ordered every generic write so far
    }
    // Generic writes since the CTA started, with no fence yet: every page they changed opens now,
    // with the CTA's initial contents (the fill byte) as its snapshot.
    const auto fill = static_cast<uint8_t>(config().poison >= 0 ? config().poison : 0);
    const uintptr_t page = page_bytes(), begin = c->window->data, end = begin + c->window_bytes;
    for (uintptr_t p = begin & ~(page - 1); p < end; p += page) {
        const auto* bytes = reinterpret_cast<const uint8_t*>(p);
        const uintptr_t lo = std::max(p, begin), hi = std::min(p + page, end);
        if (std::all_of(bytes + (lo - p), bytes + (hi - p), [&](uint8_t b) { return b == fill; })) {
            continue;
        }
        std::vector<uint8_t> snapshot(bytes, bytes + page);
        std::fill(snapshot.begin() + (lo - p), snapshot.begin() + (hi - p), fill);
        c->proxy_open.emplace(p, std::move(snapshot));
        mprotect(reinterpret_cast<void*>(p), page, PROT_READ | PROT_WRITE);
    }
}

// Closes every page generic writes opened: they are ordered before later async-proxy reads now.
void close_proxy_pages(Cta* c) {
    for (auto& [page, snapshot] : c->proxy_open) {
        mprotect(reinterpret_cast<void*>(page), page_bytes(), PROT_READ);
    }
    c->proxy_open.clear();
}

// Whether generic-proxy writes since the last fence changed bytes of [addr, addr + bytes); the
// first such shared address in *first.
bool proxy_dirty(const Cta* c, uint32_t addr, uint32_t bytes, uint32_t* first) {
    if (c->proxy_open.empty()) {
        return false;
    }
    const uintptr_t page_size = page_bytes();
    for (uint32_t i = 0; i < bytes; ++i) {
        const uintptr_t k = c->window->data + addr + i;
        auto it = c->proxy_open.find(k & ~(page_size - 1));
        if (it != c->proxy_open.end() && it->second[k & (page_size - 1)] != *reinterpret_cast<const uint8_t*>(k)) {
            *first = addr + i;
            return true;
        }
    }
    return false;
}

// The simulator's own (async-proxy) write of shared memory: through the alias, mirrored into the
// snapshot of an open page so that it does not read as a generic write.
void async_write(Cta* c, uint32_t addr, const void* src, size_t bytes) {
    std::memcpy(shared_ptr(c, addr), src, bytes);
    if (!c->proxy_open.empty()) {
        const uintptr_t page_size = page_bytes();
        for (size_t i = 0; i < bytes; ++i) {
            const uintptr_t k = c->window->data + addr + i;
            auto it = c->proxy_open.find(k & ~(page_size - 1));
            if (it != c->proxy_open.end()) {
                it->second[k & (page_size - 1)] = static_cast<const uint8_t*>(src)[i];
            }
        }
    }
}

using layouts::swizzle;

uint32_t tma_span(const TensorMap& m) {
    switch (m.swizzle) {
        case CU_TENSOR_MAP_SWIZZLE_32B:
            return 32;
        case CU_TENSOR_MAP_SWIZZLE_64B:
            return 64;
        case CU_TENSOR_MAP_SWIZZLE_128B:
            return 128;
        default:
            return 0;
    }
}

void list_async(Cta* c) {
    if (!c->async_listed) {
        c->async_listed = true;
        eng().async_ctas.push_back(c);
    }
}

MBarrier& barrier(Cta* c, const uint64_t* bar, const char* op, void* at, uint32_t* addr_out) {
    const uint32_t addr = shared_addr(c, bar, 8, op, at);
    if (addr % 8 != 0) {
        fail(CUDA_ERROR_MISALIGNED_ADDRESS, at, "%s: mbarrier at shared address %u is not 8-byte aligned", op, addr);
    }
    auto it = c->mbarriers.find(addr);
    if (it == c->mbarriers.end()) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s: no mbarrier was initialised at shared address %u", op, addr);
    }
    *addr_out = addr;
    return it->second;
}

void complete_phase_if_done(MBarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
        ++b.phase;
        b.pending = b.count;
        made_progress();
    }
}

const TensorMap& tensor_map(const void* p, const char* op, void* at) {
    const TensorMap* m = decode_tensor_map(p);
    if (m == nullptr) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS, at, "%s: %p is not a tensor map encoded by cuTensorMapEncodeTiled", op, p);
    }
    if (m->rank != 2 || m->interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || m->element_strides[0] != 1 || m->element_strides[1] != 1) {
        fail(CUDA_ERROR_NOT_SUPPORTED, at, "%s: the simulator models 2D tiled maps without interleave or element strides", op);
    }
    return *m;
}

// The global bytes of box row `j` that exist (columns clipped to the tensor), as [first column,
// end column); empty when the row is outside the tensor.
struct RowSpan {
    int64_t c0 = 0, c1 = 0;
    uintptr_t addr = 0;  // of column c0
};
RowSpan row_span(const AsyncCopy& op, int j) {
    const TensorMap& m = op.map;
    RowSpan r;
    const int64_t gy = int64_t(op.y) + j;
    if (gy < 0 || gy >= static_cast<int64_t>(m.dims[1])) {
        return r;
    }
    r.c0 = std::max<int64_t>(0, -int64_t(op.x));
    r.c1 = std::min<int64_t>(m.box[0], static_cast<int64_t>(m.dims[0]) - op.x);
    if (r.c1 <= r.c0) {
        r.c0 = r.c1 = 0;
        return r;
    }
    r.addr = m.address + uint64_t(gy) * m.strides[0] + uint64_t(int64_t(op.x) + r.c0) * m.elem_bytes;
    return r;
}

// Loads land: the box into shared memory (swizzled), zeros outside the tensor, then complete-tx.
void finish_load(Cta* c, const AsyncCopy& op) {
    const TensorMap& m = op.map;
    const uint32_t e = m.elem_bytes, inner = m.box[0] * e, span = tma_span(m);
    for (int j = 0; j < m.box[1]; ++j) {
        const RowSpan r = row_span(op, j);
        const size_t bytes = size_t(r.c1 - r.c0) * e;
        if (bytes > 0 && mem_find(r.addr, bytes) == nullptr) {
            fail_async(c, op.where, "TMA load from outside its allocation: row %d of the box at (%d, %d) reads %zu bytes at %p", j, op.x, op.y,
                       bytes, reinterpret_cast<void*>(r.addr));
            return;
        }
        std::string global_race;
        if (!race_unit_global(c, op.race, r.addr, bytes, false, op.where, &global_race)) {
            fail_async(c, op.where, "%s", global_race.c_str());
            return;
        }
        const uint8_t fill[8] = {0, 0, 0, 0, 0, 0, 0, 0}, nan_fill[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
        for (uint32_t col = 0; col < m.box[0]; ++col) {
            const uint32_t at = swizzle(op.smem + uint32_t(j) * inner + col * e, span);
            std::string race;
            if (!race_unit_access(c, true, 0, op.race, at, e, true, op.where, &race)) {
                fail_async(c, op.where, "%s", race.c_str());
                return;
            }
            if (int64_t(col) >= r.c0 && int64_t(col) < r.c1) {
                async_write(c, at, reinterpret_cast<const void*>(r.addr + (col - r.c0) * e), e);
            } else {
                async_write(c, at, m.oob_nan ? nan_fill : fill, e);
            }
        }
    }
    auto it = c->mbarriers.find(op.bar);
    if (it == c->mbarriers.end()) {
        fail_async(c, op.where, "TMA load completed on shared address %u, which no longer holds an mbarrier", op.bar);
        return;
    }
    MBarrier& b = it->second;
    if (b.phase != op.bar_phase) {
        fail_async(c, op.where,
                   "TMA load of %u bytes completed on the mbarrier at shared address %u after the phase it was issued in had completed: the "
                   "phase did not expect these bytes (arrive.expect_tx too small?)",
                   op.bytes, op.bar);
        return;
    }
    race_phase_arrive(c, 0, op.bar, op.bar_phase, &op.race);
    b.tx -= op.bytes;
    // The count may go below zero while arrivals are missing (a multicast from another CTA of the
    // cluster can land before this CTA's arrive.expect_tx); with every arrival in, it may not.
    if (b.tx < 0 && b.pending == 0) {
        fail_async(c, op.where, "the mbarrier at shared address %u received %lld more transaction bytes than its phase expected", op.bar,
                   static_cast<long long>(-b.tx));
        return;
    }
    complete_phase_if_done(b);
}

bool read_store(Cta* c, AsyncCopy& op) {
    const TensorMap& m = op.map;
    const uint32_t e = m.elem_bytes, inner = m.box[0] * e, span = tma_span(m);
    uint32_t dirty = 0;
    if (proxy_dirty(c, op.smem, op.bytes, &dirty)) {
        fail_async(c, op.where,
                   "a TMA store reads shared memory (shared address %u) that generic-proxy writes changed with no "
                   "fence.proxy.async.shared::cta since: the async proxy may not see them",
                   dirty);
        return false;
    }
    op.data.resize(op.bytes);
    for (int j = 0; j < m.box[1]; ++j) {
        for (uint32_t col = 0; col < m.box[0]; ++col) {
            const uint32_t at = swizzle(op.smem + uint32_t(j) * inner + col * e, span);
            std::string race;
            if (!race_unit_access(c, true, 0, op.race, at, e, false, op.where, &race)) {
                fail_async(c, op.where, "%s", race.c_str());
                return false;
            }
            std::memcpy(op.data.data() + size_t(j) * inner + col * e, shared_ptr(c, at), e);
        }
    }
    op.read = true;
    return true;
}

bool write_store(Cta* c, const AsyncCopy& op) {
    const TensorMap& m = op.map;
    const uint32_t e = m.elem_bytes, inner = m.box[0] * e;
    for (int j = 0; j < m.box[1]; ++j) {
        const RowSpan r = row_span(op, j);
        const size_t bytes = size_t(r.c1 - r.c0) * e;
        if (bytes == 0) {
            continue;  // clipped by the tensor's bounds
        }
        if (mem_find(r.addr, bytes) == nullptr) {
            fail_async(c, op.where, "TMA store to outside its allocation: row %d of the box at (%d, %d) writes %zu bytes at %p", j, op.x, op.y,
                       bytes, reinterpret_cast<void*>(r.addr));
            return false;
        }
        std::string race;
        if (!race_unit_global(c, op.race, r.addr, bytes, true, op.where, &race)) {
            fail_async(c, op.where, "%s", race.c_str());
            return false;
        }
        std::memcpy(reinterpret_cast<void*>(r.addr), op.data.data() + size_t(j) * inner + size_t(r.c0) * e, bytes);
    }
    return true;
}

// ---- wgmma ---------------------------------------------------------------------------------------

int elem_bytes(MmaType t) { return t == MmaType::E4M3 ? 1 : 2; }
int mma_k(MmaType t) { return t == MmaType::E4M3 ? 32 : 16; }

float decode(MmaType t, const uint8_t* p) {
    if (t == MmaType::E4M3) {
        static const auto table = [] {
            std::array<float, 256> v{};
            for (int b = 0; b < 256; ++b) {
                const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
                float x;
                if (e == 15 && m == 7) {
                    x = NAN;
                } else if (e == 0) {
                    x = std::ldexp(float(m), -9);
                } else {
                    x = std::ldexp(1.0f + float(m) / 8.0f, e - 7);
                }
                v[b] = s ? -x : x;
            }
            return v;
        }();
        return table[*p];
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    if (t == MmaType::BF16) {
        const uint32_t w = uint32_t(h) << 16;
        float f;
        std::memcpy(&f, &w, 4);
        return f;
    }
    __half x;
    std::memcpy(&x, &h, 2);
    return __half2float(x);
}

using layouts::acc_col;
using layouts::acc_row;
using layouts::operand_addr;

void scatter(Accumulators& a) {
    for (int t = 0; t < 128; ++t) {
        for (int i = 0; i < a.n / 2; ++i) {
            a.regs[t][i] = a.v[size_t(acc_row(t, i)) * a.n + acc_col(t, i)];
        }
    }
}

// Executes the warpgroup's oldest issued wgmma: reads A (64 x K) and B (N x K) through the
// descriptors now, and accumulates.
bool execute_mma(Cta* c, Warpgroup& w) {
    const uint32_t wg = static_cast<uint32_t>(&w - c->warpgroups.data());
    MmaOp op = std::move(w.ops.front());
    w.ops.pop_front();
    const int K = mma_k(op.type), e = elem_bytes(op.type), n = op.n;
    for (uint64_t d : {op.desc_a, op.desc_b}) {
        if ((d >> 62) == 0 || ((d >> 49) & 7) != 0) {
            fail_async(c, op.where,
                       "wgmma descriptor %#llx: the simulator models the 32-, 64- and 128-byte swizzled layouts with base offset 0 only",
                       static_cast<unsigned long long>(d));
            return false;
        }
    }
    std::vector<float> a(64 * size_t(K)), b(size_t(n) * K);
    const auto load = [&](uint64_t desc, bool mn_major, int mn, int k, float* out) {
        const uint32_t addr = operand_addr(desc, mn_major, e, mn, k);
        if (addr + uint32_t(e) > c->window_bytes) {
            fail_async(c, op.where, "wgmma operand outside the CTA's shared memory: element (%d, %d) of descriptor %#llx at shared address %u", mn,
                       k, static_cast<unsigned long long>(desc), addr);
            return false;
        }
        std::string race;
        if (!race_unit_access(c, false, wg, op.race, addr, uint32_t(e), false, op.where, &race)) {
            fail_async(c, op.where, "%s", race.c_str());
            return false;
        }
        uint32_t dirty = 0;
        if (proxy_dirty(c, addr, uint32_t(e), &dirty)) {
            fail_async(c, op.where,
                       "wgmma reads shared memory (shared address %u, descriptor %#llx) that generic-proxy writes changed with no "
                       "fence.proxy.async.shared::cta since: the async proxy may not see them",
                       dirty, static_cast<unsigned long long>(desc));
            return false;
        }
        *out = decode(op.type, shared_ptr(c, addr));
        return true;
    };
    for (int r = 0; r < 64; ++r) {
        for (int k = 0; k < K; ++k) {
            if (!load(op.desc_a, false, r, k, &a[size_t(r) * K + k])) {
                return false;
            }
        }
    }
    for (int col = 0; col < n; ++col) {
        for (int k = 0; k < K; ++k) {
            if (!load(op.desc_b, op.b_mn_major, col, k, &b[size_t(col) * K + k])) {
                return false;
            }
        }
    }
    Accumulators& acc = *op.acc;
    const bool reduced = reduced_fp8_accumulation() && op.type == MmaType::E4M3;
    for (int r = 0; r < 64; ++r) {
        for (int col = 0; col < n; ++col) {
            double dot = 0.0;
            for (int k = 0; k < K; ++k) {
                dot += double(a[size_t(r) * K + k]) * double(b[size_t(col) * K + k]);
            }
            float& d = acc.v[size_t(r) * n + col];
            float next = static_cast<float>((op.scale_d ? double(d) : 0.0) + dot);
            if (reduced) {
                // Hopper's FP8 tensor cores keep about 14 bits of the accumulator: truncate the
                // f32 sum to 13 explicit mantissa bits after each instruction.
                uint32_t bits;
                std::memcpy(&bits, &next, 4);
                bits &= ~((1u << 10) - 1);
                std::memcpy(&next, &bits, 4);
            }
            d = next;
        }
    }
    --acc.pending;
    made_progress();
    return true;
}

// DEEPKERN_SIM_DESCRIPTORS=<file>: every distinct (type, N, B major, descriptor A, descriptor B)
// a kernel issues is appended there, for the check against CuTe (sim/tests/cute_check.cpp).
void record_descriptors(MmaType type, int n, bool b_mn_major, uint64_t desc_a, uint64_t desc_b) {
    static const char* path = std::getenv("DEEPKERN_SIM_DESCRIPTORS");
    if (path == nullptr || *path == 0) {
        return;
    }
    static auto* seen = new std::set<std::tuple<int, int, bool, uint64_t, uint64_t>>();
    if (!seen->emplace(int(type), n, b_mn_major, desc_a, desc_b).second) {
        return;
    }
    if (FILE* f = std::fopen(path, "a"); f != nullptr) {
        std::fprintf(f, "%d %d %d %llx %llx\n", int(type), n, b_mn_major ? 1 : 0, static_cast<unsigned long long>(desc_a),
                     static_cast<unsigned long long>(desc_b));
        std::fclose(f);
    }
}

Warpgroup& warpgroup_of(Thread* t) { return t->cta->warpgroups[t->linear / 128]; }

// The live threads of thread t's warpgroup.
uint32_t live_in_warpgroup(const Thread* t) {
    const Cta* c = t->cta;
    uint32_t live = 0;
    for (uint32_t w = (t->linear / 128) * 4; w < (t->linear / 128) * 4 + 4 && w < c->warps.size(); ++w) {
        live += static_cast<uint32_t>(__builtin_popcount(c->warps[w].lanes & ~c->warps[w].exited));
    }
    return live;
}

enum : int { kWgFence = 1, kWgMma, kWgCommit, kWgWait };

const char* wg_name(int kind) {
    switch (kind) {
        case kWgFence:
            return "wgmma.fence";
        case kWgMma:
            return "wgmma.mma_async";
        case kWgCommit:
            return "wgmma.commit_group";
        default:
            return "wgmma.wait_group";
    }
}

// The .sync.aligned warpgroup instructions: every live thread of the warpgroup executes the same
// one with the same operands; the last to arrive performs it for all.
template <typename Action>
void warpgroup_meet(int kind, uint64_t a, uint64_t b, uint64_t cc, float* regs, void* at, Action&& action) {
    Thread* t = me();
    Cta* c = t->cta;
    if (c->kernel->threads_per_cta % 128 != 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s in a CTA of %u threads: warpgroups are 128 threads", wg_name(kind), c->kernel->threads_per_cta);
    }
    Warpgroup& w = warpgroup_of(t);
    if (w.rv_arrived == 0) {
        w.rv_kind = kind;
        w.rv_a = a;
        w.rv_b = b;
        w.rv_c = cc;
        w.rv_where = at;
    } else if (w.rv_kind != kind || w.rv_a != a || w.rv_b != b || w.rv_c != cc) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at,
             "warpgroup %u: this thread executes %s (%#llx, %#llx, %#llx) while %u of its threads wait at %s (%#llx, %#llx, %#llx): "
             ".sync.aligned instructions need the same instruction and operands in every thread",
             t->linear / 128, wg_name(kind), static_cast<unsigned long long>(a), static_cast<unsigned long long>(b),
             static_cast<unsigned long long>(cc), w.rv_arrived, wg_name(w.rv_kind), static_cast<unsigned long long>(w.rv_a),
             static_cast<unsigned long long>(w.rv_b), static_cast<unsigned long long>(w.rv_c));
    }
    w.rv_regs[t->linear % 128] = regs;
    ++w.rv_arrived;
    if (w.rv_arrived == live_in_warpgroup(t)) {
        action(w);
        for (Thread* x : w.rv_waiters) {
            wake(x);
        }
        w.rv_waiters.clear();
        w.rv_arrived = 0;
        made_progress();
        yield_maybe();
        return;
    }
    w.rv_waiters.push_back(t);
    block_self(WaitInfo{wg_name(kind), t->linear / 128, 0, 0, at});
}

}  // namespace

// ---- mbarrier ------------------------------------------------------------------------------------

void mbarrier_init(uint64_t* bar, uint32_t count) {
    void* at = __builtin_return_address(0);
    Cta* c = me()->cta;
    const uint32_t addr = shared_addr(c, bar, 8, "mbarrier.init", at);
    if (addr % 8 != 0) {
        fail(CUDA_ERROR_MISALIGNED_ADDRESS, at, "mbarrier.init: shared address %u is not 8-byte aligned", addr);
    }
    if (count == 0 || count >= (1u << 20)) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "mbarrier.init: count %u outside 1 .. 2^20 - 1", count);
    }
    for (const auto& op : c->copies) {
        if (!op->store && op->bar == addr) {
            fail(CUDA_ERROR_LAUNCH_FAILED, at, "mbarrier.init at shared address %u while a TMA load still completes on it", addr);
        }
    }
    c->mbarriers[addr] = MBarrier{count, count, 0, 0};
    made_progress();
    yield_maybe();
}

void mbarrier_arrive(uint64_t* bar) {
    void* at = __builtin_return_address(0);
    yield_maybe();
    uint32_t addr;
    MBarrier& b = barrier(me()->cta, bar, "mbarrier.arrive", at, &addr);
    race_phase_arrive(me()->cta, me()->linear, addr, b.phase, nullptr);
    --b.pending;
    made_progress();
    complete_phase_if_done(b);
}

void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    void* at = __builtin_return_address(0);
    yield_maybe();
    uint32_t addr;
    MBarrier& b = barrier(me()->cta, bar, "mbarrier.arrive.expect_tx", at, &addr);
    race_phase_arrive(me()->cta, me()->linear, addr, b.phase, nullptr);
    b.tx += bytes;
    if (b.tx >= (int64_t(1) << 20)) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "mbarrier.arrive.expect_tx: %lld transaction bytes pending, beyond the 2^20 - 1 an mbarrier holds",
             static_cast<long long>(b.tx));
    }
    if (b.tx < 0 && b.pending == 1) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at,
             "mbarrier.arrive.expect_tx: the phase's last arrival expects %u bytes, but %lld more than that have already landed", bytes,
             static_cast<long long>(-b.tx));
    }
    --b.pending;
    made_progress();
    complete_phase_if_done(b);
}

bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    uint32_t addr;
    MBarrier* b = &barrier(t->cta, bar, "mbarrier.try_wait.parity", at, &addr);
    // The phase of parity P has completed when the current phase's parity differs from P; a
    // successful wait acquires what that phase's arrivals and transactions released.
    const auto done = [&] {
        if ((b->phase & 1) == (parity & 1)) {
            return false;
        }
        if (b->phase > 0) {
            race_phase_acquire(t->cta, t->linear, addr, b->phase - 1);
        }
        return true;
    };
    if (done()) {
        return true;
    }
    poll_self(bar, b->phase, WaitInfo{"mbarrier.try_wait.parity", addr, parity & 1, 0, at});
    b = &barrier(t->cta, bar, "mbarrier.try_wait.parity", at, &addr);
    return done();
}

void fence_mbarrier_init() { yield_maybe(); }

void fence_proxy_async_shared() {
    me()->cta->proxy_fenced = true;
    close_proxy_pages(me()->cta);
    yield_maybe();
}

void fence_proxy_async_global() {
    me()->global_proxy_fence = false;
    yield_maybe();
}

void prefetch_tensormap(const void* map) { (void)tensor_map(map, "prefetch.tensormap", __builtin_return_address(0)); }

// ---- TMA -----------------------------------------------------------------------------------------

namespace {

// A TMA load (`what`) by a thread that acquired writes of a kernel still running must follow a
// fence.proxy.async.global, or the async proxy may not see them.
void require_global_proxy_fence(const Thread* t, const char* what, void* at) {
    if (t->global_proxy_fence) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at,
             "%s after acquiring writes of a kernel still running, with no fence.proxy.async.global in between: the async proxy may not "
             "see them",
             what);
    }
}

// A TMA copy of the box at (x, y) of `map` to or from `smem` (128-byte aligned), issued by the
// calling thread at `at`.
std::unique_ptr<AsyncCopy> tma_copy(Thread* t, const void* map, const void* smem, int32_t x, int32_t y, bool store, void* at) {
    const char* what = store ? "cp.async.bulk.tensor (store)" : "cp.async.bulk.tensor (load)";
    const TensorMap& m = tensor_map(map, what, at);
    auto op = std::make_unique<AsyncCopy>();
    op->store = store;
    op->map = m;
    op->x = x;
    op->y = y;
    op->bytes = uint32_t(m.box[0]) * m.box[1] * m.elem_bytes;
    op->smem = shared_addr(t->cta, smem, op->bytes, store ? "cp.async.bulk.tensor (store) source" : "cp.async.bulk.tensor (load) destination", at);
    if (op->smem % 128 != 0) {
        fail(CUDA_ERROR_MISALIGNED_ADDRESS, at, "%s: %s shared address %u is not 128-byte aligned", what, store ? "source" : "destination", op->smem);
    }
    op->thread = t->linear;
    op->where = at;
    return op;
}

}  // namespace

void tma_load_2d(void* dst, const void* map, uint64_t* bar, int32_t x, int32_t y) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cta* c = t->cta;
    auto op = tma_copy(t, map, dst, x, y, false, at);
    require_global_proxy_fence(t, "cp.async.bulk.tensor (load)", at);
    MBarrier& b = barrier(c, bar, "cp.async.bulk.tensor (load)", at, &op->bar);
    op->bar_phase = b.phase;
    op->race = race_unit_op(c, true, 0, {t});
    arm_proxy(c);
    c->copies.push_back(std::move(op));
    list_async(c);
    made_progress();
    yield_maybe();
}

void tma_store_2d(const void* map, const void* src, int32_t x, int32_t y) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cta* c = t->cta;
    auto op = tma_copy(t, map, src, x, y, true, at);
    op->race = race_unit_op(c, true, 0, {t});
    arm_proxy(c);
    c->copies.push_back(std::move(op));
    list_async(c);
    made_progress();
    yield_maybe();
}

// ---- Clusters: distributed shared memory ---------------------------------------------------------

namespace {

// shared::cluster addresses of another CTA's window: bit 31 set, the rank in bits 24..30, the
// shared::cta offset below. An address without bit 31 is the CTA's own window.
constexpr uint32_t kClusterBit = 0x80000000u;

// The CTA of the calling thread's cluster with `rank`, or a failure naming `what`.
Cta* cluster_peer(Thread* t, uint32_t rank, const char* what, void* at) {
    Cluster* cl = t->cta->cluster;
    if (cl == nullptr) {
        if (rank == 0) {
            return t->cta;
        }
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s: CTA rank %u of a cluster, in a kernel launched without a cluster dimension", what, rank);
    }
    if (rank >= cl->ctas.size()) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s: CTA rank %u of a cluster of %zu", what, rank, cl->ctas.size());
    }
    Cta* c = cl->ctas[rank];
    if (c == nullptr) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS, at, "%s: CTA rank %u of the cluster has exited: its shared memory is gone", what, rank);
    }
    return c;
}

}  // namespace

uint32_t mapa_shared(uint32_t addr, uint32_t rank) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    const uint32_t offset = addr & ~kClusterBit & 0x00ffffffu;
    if ((addr & kClusterBit) != 0 || offset >= t->cta->window_bytes) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS, at, "mapa.shared::cluster: %u is not a shared::cta address of this CTA's window (%u bytes)", addr,
             t->cta->window_bytes);
    }
    (void)cluster_peer(t, rank, "mapa.shared::cluster", at);
    return kClusterBit | (rank << 24) | offset;
}

void mbarrier_arrive_cluster(uint32_t addr) {
    void* at = __builtin_return_address(0);
    yield_maybe();
    Thread* t = me();
    Cta* c = (addr & kClusterBit) != 0 ? cluster_peer(t, (addr >> 24) & 0x7f, "mbarrier.arrive.shared::cluster", at) : t->cta;
    const uint32_t offset = (addr & kClusterBit) != 0 ? addr & 0x00ffffffu : addr;
    auto it = c->mbarriers.find(offset);
    if (offset % 8 != 0 || it == c->mbarriers.end()) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "mbarrier.arrive.shared::cluster: no mbarrier was initialised at shared address %u of CTA rank %u",
             offset, c->rank);
    }
    MBarrier& b = it->second;
    if (c == t->cta) {
        race_phase_arrive(c, t->linear, offset, b.phase, nullptr);
    }
    --b.pending;
    made_progress();
    complete_phase_if_done(b);
}

void tma_load_2d_multicast(void* dst, const void* map, uint64_t* bar, int32_t x, int32_t y, uint16_t mask) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    const uint32_t size = t->cta->cluster != nullptr ? static_cast<uint32_t>(t->cta->cluster->ctas.size()) : 1;
    if (mask == 0 || (mask >> size) != 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "cp.async.bulk.tensor (multicast): CTA mask 0x%x names ranks outside the cluster of %u", mask, size);
    }
    require_global_proxy_fence(t, "cp.async.bulk.tensor (multicast)", at);
    uint32_t bar_addr = 0;
    (void)barrier(t->cta, bar, "cp.async.bulk.tensor (multicast)", at, &bar_addr);
    for (uint32_t r = 0; r < size; ++r) {
        if ((mask >> r & 1) == 0) {
            continue;
        }
        Cta* c = cluster_peer(t, r, "cp.async.bulk.tensor (multicast)", at);
        auto op = tma_copy(t, map, dst, x, y, false, at);
        auto it = c->mbarriers.find(bar_addr);
        if (it == c->mbarriers.end()) {
            fail(CUDA_ERROR_LAUNCH_FAILED, at,
                 "cp.async.bulk.tensor (multicast): no mbarrier was initialised at shared address %u of CTA rank %u (a cluster barrier "
                 "after the initialisation orders it before other CTAs use it)",
                 bar_addr, r);
        }
        op->bar = bar_addr;
        op->bar_phase = it->second.phase;
        // Race mode checks the issuing CTA's own copy only (see cluster.cpp).
        if (c == t->cta) {
            op->race = race_unit_op(c, true, 0, {t});
        }
        arm_proxy(c);
        c->copies.push_back(std::move(op));
        list_async(c);
    }
    made_progress();
    yield_maybe();
}

void bulk_commit_group() {
    Thread* t = me();
    for (auto& op : t->cta->copies) {
        if (op->store && op->thread == t->linear && op->group < 0) {
            op->group = t->bulk_commits;
        }
    }
    ++t->bulk_commits;
    yield_maybe();
}

void bulk_wait_group(int n, bool read_only) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    for (;;) {
        // Committed groups of this thread with work left (reading shared memory, or at all).
        std::vector<int> groups;
        for (const auto& op : t->cta->copies) {
            if (op->store && op->thread == t->linear && op->group >= 0 && (!read_only || !op->read) &&
                std::find(groups.begin(), groups.end(), op->group) == groups.end()) {
                groups.push_back(op->group);
            }
        }
        if (static_cast<int>(groups.size()) <= n) {
            race_join_unit(t->cta, t->linear, true, 0);
            return;
        }
        poll_self(&t->bulk_commits, groups.size(), WaitInfo{read_only ? "cp.async.bulk.wait_group.read" : "cp.async.bulk.wait_group",
                                                            static_cast<uint64_t>(n), groups.size(), 0, at});
    }
}

// ---- wgmma ---------------------------------------------------------------------------------------

void wgmma_fence() { warpgroup_meet(kWgFence, 0, 0, 0, nullptr, __builtin_return_address(0), [](Warpgroup&) {}); }

void wgmma_commit_group() {
    warpgroup_meet(kWgCommit, 0, 0, 0, nullptr, __builtin_return_address(0), [](Warpgroup& w) { ++w.commits; });
}

void wgmma_wait_group(int n) {
    void* at = __builtin_return_address(0);
    Cta* c = me()->cta;
    warpgroup_meet(kWgWait, static_cast<uint64_t>(n), 0, 0, nullptr, at, [&](Warpgroup& w) {
        while (!w.ops.empty() && w.ops.front().group < w.commits - n) {
            if (!execute_mma(c, w)) {
                return;
            }
        }
        // The warpgroup's threads now see what the executed operations read.
        const uint32_t wg = me()->linear / 128;
        race_join_unit(c, me()->linear, false, wg);
        for (Thread* x : w.rv_waiters) {
            race_join_unit(c, x->linear, false, wg);
        }
        // Accumulators no operation still uses return to the registers.
        for (auto it = w.accs.begin(); it != w.accs.end();) {
            if ((*it)->pending == 0) {
                scatter(**it);
                it = w.accs.erase(it);
            } else {
                ++it;
            }
        }
    });
}

void wgmma(MmaType type, int n, bool b_mn_major, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d) {
    void* at = __builtin_return_address(0);
    const uint64_t shape = uint64_t(n) | (uint64_t(type) << 16) | (uint64_t(b_mn_major) << 20) | (uint64_t(scale_d) << 21);
    warpgroup_meet(kWgMma, desc_a, desc_b, shape, d, at, [&](Warpgroup& w) {
        // The registers are the unit's until a wait returns them; a chain of operations on the same
        // registers accumulates in the unit, the first takes the registers' values.
        std::shared_ptr<Accumulators> acc;
        for (auto& a : w.accs) {
            if (a->n == n && std::equal(std::begin(a->regs), std::end(a->regs), std::begin(w.rv_regs))) {
                acc = a;
            }
        }
        if (!acc) {
            acc = std::make_shared<Accumulators>();
            acc->n = n;
            acc->v.assign(64 * size_t(n), 0.0f);
            std::copy(std::begin(w.rv_regs), std::end(w.rv_regs), std::begin(acc->regs));
            for (int t = 0; t < 128; ++t) {
                for (int i = 0; i < n / 2; ++i) {
                    acc->v[size_t(acc_row(t, i)) * n + acc_col(t, i)] = acc->regs[t][i];
                }
            }
            w.accs.push_back(acc);
        }
        // Undefined until the wait that covers this operation: NaN shows any early read.
        for (int t = 0; t < 128; ++t) {
            for (int i = 0; i < n / 2; ++i) {
                acc->regs[t][i] = NAN;
            }
        }
        ++acc->pending;
        record_descriptors(type, n, b_mn_major, desc_a, desc_b);
        Cta* c = me()->cta;
        arm_proxy(c);
        std::vector<Thread*> issuers = w.rv_waiters;
        issuers.push_back(me());
        w.ops.push_back(MmaOp{type, n, b_mn_major, desc_a, desc_b, scale_d, w.commits, acc, at,
                              race_unit_op(c, false, me()->linear / 128, issuers)});
        list_async(me()->cta);
    });
}

// ---- setmaxnreg ----------------------------------------------------------------------------------

void setmaxnreg(bool increase, uint32_t regs) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cta* c = t->cta;
    Warp& warp = *t->warp;
    const char* op = increase ? "setmaxnreg.inc" : "setmaxnreg.dec";
    if (regs < 24 || regs > 256 || regs % 8 != 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s %u: the count must be a multiple of 8 in 24 .. 256", op, regs);
    }
    // .sync.aligned: the warp's live lanes meet, the first of them moves the registers, they meet again.
    const uint32_t live = warp.lanes & ~warp.exited;
    syncwarp(live);
    if (t->lane == static_cast<uint32_t>(__builtin_ctz(live))) {
        int& cur = c->warp_registers[warp.index];
        if (increase ? int(regs) < cur : int(regs) > cur) {
            fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s %u with %d registers per thread already", op, regs, cur);
        }
        const int delta = (int(regs) - cur) * 32;
        while (increase && delta > c->free_registers) {
            poll_self(&c->free_registers, static_cast<uint64_t>(c->free_registers), WaitInfo{"setmaxnreg.inc", regs, uint64_t(delta), 0, at});
        }
        c->free_registers -= delta;
        cur = int(regs);
        made_progress();
    }
    syncwarp(live);
}

// ---- Engine side ---------------------------------------------------------------------------------

void async_init_cta(Cta* c) {
    const KernelInfo& info = *c->kernel->info;
    const int regs = info.registers > 0 ? (info.registers + 7) / 8 * 8 : 64;
    c->warp_registers.assign(c->warps.size(), regs);
    c->free_registers = 0;
    c->warpgroups.resize((c->kernel->threads_per_cta + 127) / 128);
}

bool async_progress() {
    Engine& g = eng();
    if (g.async_ctas.empty() || (!g.runnable.empty() && !g.rng.percent(async_percent()))) {
        return false;
    }
    const size_t ci = g.rng.below(g.async_ctas.size());
    Cta* c = g.async_ctas[ci];
    // Candidates: every TMA copy in flight, and each warpgroup's oldest wgmma.
    std::vector<std::pair<int, size_t>> cand;  // (0 copy / 1 warpgroup, index)
    for (size_t i = 0; i < c->copies.size(); ++i) {
        cand.emplace_back(0, i);
    }
    for (size_t i = 0; i < c->warpgroups.size(); ++i) {
        if (!c->warpgroups[i].ops.empty()) {
            cand.emplace_back(1, i);
        }
    }
    if (!cand.empty()) {
        const auto [kind, i] = cand[g.rng.below(cand.size())];
        if (kind == 0) {
            AsyncCopy& op = *c->copies[i];
            bool done = true;
            if (!op.store) {
                finish_load(c, op);
            } else if (!op.read) {
                read_store(c, op);
                done = false;
            } else {
                write_store(c, op);
            }
            if (take_async_failure()) {
                return true;  // the kernel failed: its CTAs are gone
            }
            if (done) {
                c->copies.erase(c->copies.begin() + static_cast<std::ptrdiff_t>(i));
            }
            made_progress();
        } else if (!execute_mma(c, c->warpgroups[i])) {
            take_async_failure();
            return true;
        }
    }
    bool left = !c->copies.empty();
    for (const Warpgroup& w : c->warpgroups) {
        left = left || !w.ops.empty();
    }
    if (!left) {
        c->async_listed = false;
        g.async_ctas.erase(std::remove(g.async_ctas.begin(), g.async_ctas.end(), c), g.async_ctas.end());
    }
    return true;
}

bool async_on_cta_exit(Cta* c, Failure** out) {
    std::string problems;
    void* where = nullptr;
    for (auto& op : c->copies) {
        if (op->store && op->read) {
            continue;  // only its global writes are left: they land before the kernel completes
        }
        problems += problems.empty() ? "" : "; ";
        problems += op->store ? "a TMA store had not read its shared-memory source" : "a TMA load had not landed";
        where = op->where;
    }
    for (const Warpgroup& w : c->warpgroups) {
        if (!w.ops.empty()) {
            problems += problems.empty() ? "" : "; ";
            problems += "wgmma operations had not read their operands (no wgmma.wait_group covered them)";
            where = w.ops.front().where;
        }
    }
    if (!problems.empty()) {
        auto* f = new Failure();
        f->code = CUDA_ERROR_ILLEGAL_ADDRESS;
        f->title = "a CTA exited while " + problems + ": they would use its shared memory after it is gone";
        f->where = where;
        *out = f;
        return true;
    }
    for (auto& op : c->copies) {
        if (!write_store(c, *op)) {
            *out = g_async_failure;
            g_async_failure = nullptr;
            return true;
        }
    }
    c->copies.clear();
    return false;
}

void async_drop_cta(Cta* c) {
    Engine& g = eng();
    if (c->async_listed) {
        c->async_listed = false;
        g.async_ctas.erase(std::remove(g.async_ctas.begin(), g.async_ctas.end(), c), g.async_ctas.end());
    }
    c->copies.clear();
    c->warpgroups.clear();
}

std::string async_describe_wait(const Cta* c, const WaitInfo& w) {
    char buf[256];
    if (std::strcmp(w.what, "mbarrier.try_wait.parity") == 0) {
        auto it = c->mbarriers.find(static_cast<uint32_t>(w.a));
        if (it == c->mbarriers.end()) {
            std::snprintf(buf, sizeof buf, "(shared address %llu, parity %llu)", static_cast<unsigned long long>(w.a),
                          static_cast<unsigned long long>(w.b));
        } else {
            const MBarrier& b = it->second;
            std::snprintf(buf, sizeof buf, "(shared address %llu, parity %llu: %u of %u arrivals missing, %lld transaction bytes expected, %llu phases done)",
                          static_cast<unsigned long long>(w.a), static_cast<unsigned long long>(w.b), b.pending, b.count,
                          static_cast<long long>(b.tx), static_cast<unsigned long long>(b.phase));
        }
        return buf;
    }
    if (std::strcmp(w.what, "setmaxnreg.inc") == 0) {
        std::snprintf(buf, sizeof buf, "%llu (needs %llu registers; the CTA's pool has %d free)", static_cast<unsigned long long>(w.a),
                      static_cast<unsigned long long>(w.b), c->free_registers);
        return buf;
    }
    if (std::strncmp(w.what, "wgmma", 5) == 0) {
        std::snprintf(buf, sizeof buf, "(warpgroup %llu)", static_cast<unsigned long long>(w.a));
        return buf;
    }
    return "";
}

}  // namespace dksim
