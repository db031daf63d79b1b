// What a simulated thread can do that involves other threads: CTA barriers, warp collectives,
// atomics, acquire/release accesses, fences, sleeps and clocks; and the checks on each (a barrier
// declared with different thread counts, a shuffle naming an exited lane, a misaligned atomic).
// Each is a scheduling point: the thread may give way to another here, and it does whenever it
// has to wait.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "sim.hpp"

namespace dksim {

namespace {

Thread* me() { return eng().running; }

const char* scope_name(Scope s) { return s == Scope::Cta ? "cta" : (s == Scope::Gpu ? "gpu" : "sys"); }

bool is64(Type t) { return t == Type::S64 || t == Type::U64 || t == Type::F64; }

void check_aligned(const void* addr, size_t bytes, const char* what, void* at) {
    if (reinterpret_cast<uintptr_t>(addr) % bytes != 0) {
        fail(CUDA_ERROR_MISALIGNED_ADDRESS, at, "misaligned address: %s of %zu bytes at %p", what, bytes, addr);
    }
}

// ---- Named barriers ------------------------------------------------------------------------

// Warps whose every non-exited lane has arrived; a warp with no live lane does not take part.
bool barrier_complete(const Cta& c, const NamedBarrier& b, uint32_t* warps_arrived) {
    uint32_t arrived = 0, live = 0;
    for (const Warp& w : c.warps) {
        const uint32_t lanes = w.lanes & ~w.exited;
        if (lanes == 0) {
            continue;
        }
        ++live;
        if ((b.arrived[w.index] & lanes) == lanes) {
            ++arrived;
        }
    }
    *warps_arrived = arrived;
    return b.count == 0 ? arrived == live : arrived * 32 >= b.count;
}

void release(Cta* c, NamedBarrier& b, Thread* except) {
    race_barrier(c, b.waiters);
    for (Thread* x : b.waiters) {
        if (x != except) {
            wake(x);
        }
    }
    b.waiters.clear();
    b.arrived.clear();
    b.count = 0;
    b.warps_arrived = 0;
    made_progress();
}

// ---- Warp collectives --------------------------------------------------------------------------

enum : int { kShfl = 1, kVote = 10, kSyncwarp = 20 };

const char* collective_name(int kind) {
    switch (kind) {
        case kShfl + int(Shfl::Up):
            return "shfl.sync.up";
        case kShfl + int(Shfl::Down):
            return "shfl.sync.down";
        case kShfl + int(Shfl::Bfly):
            return "shfl.sync.bfly";
        case kShfl + int(Shfl::Idx):
            return "shfl.sync.idx";
        case kVote + int(Vote::Ballot):
            return "vote.sync.ballot";
        case kVote + int(Vote::All):
            return "vote.sync.all";
        case kVote + int(Vote::Any):
            return "vote.sync.any";
        default:
            return "bar.warp.sync";
    }
}

void complete(Warp& w, Collective& co) {
    Cta* c = w.cta;
    uint32_t ballot = 0;
    if (co.kind >= kVote && co.kind < kSyncwarp) {
        for (uint32_t l = 0; l < 32; ++l) {
            if ((co.mask >> l) & 1) {
                ballot |= (co.values[l] != 0 ? 1u : 0u) << l;
            }
        }
    }
    for (uint32_t l = 0; l < 32; ++l) {
        if (((co.mask >> l) & 1) == 0) {
            continue;
        }
        uint32_t r = 0;
        if (co.kind >= kShfl && co.kind < kVote) {
            // PTX shfl.sync: segment mask and clamp from c, source lane from b.
            const int seg = (co.c >> 8) & 0x1f;
            const int clamp = co.c & 0x1f;
            const int lane = static_cast<int>(l);
            const int min_lane = lane & seg;
            const int max_lane = min_lane | (clamp & ~seg);
            const int b = co.b[l];
            int j = lane;
            bool ok = false;
            switch (static_cast<Shfl>(co.kind - kShfl)) {
                case Shfl::Up:
                    j = lane - b;
                    ok = j >= max_lane;
                    break;
                case Shfl::Down:
                    j = lane + b;
                    ok = j <= max_lane;
                    break;
                case Shfl::Bfly:
                    j = lane ^ b;
                    ok = j <= max_lane;
                    break;
                case Shfl::Idx:
                    j = min_lane | (b & 0x1f & ~seg);
                    ok = j <= max_lane;
                    break;
            }
            if (!ok) {
                j = lane;
            }
            // A source lane outside the mask: undefined on the GPU; all ones here (NaN as a float).
            r = (j >= 0 && j < 32 && ((co.mask >> j) & 1)) ? co.values[j] : 0xffffffffu;
        } else if (co.kind == kVote + int(Vote::Ballot)) {
            r = ballot;
        } else if (co.kind == kVote + int(Vote::All)) {
            r = ballot == co.mask ? 1 : 0;
        } else if (co.kind == kVote + int(Vote::Any)) {
            r = ballot != 0 ? 1 : 0;
        }
        Thread* t = c->threads[w.index * 32 + l].get();
        t->coll_result = r;
    }
}

uint32_t collective(int kind, uint32_t mask, uint32_t value, int b, int c, void* at) {
    Thread* t = me();
    Warp& w = *t->warp;
    const uint32_t bit = 1u << t->lane;
    const char* name = collective_name(kind);
    if ((mask & bit) == 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s with member mask 0x%08x, which does not include the calling lane %u", name, mask, t->lane);
    }
    if ((mask & ~w.lanes) != 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s with member mask 0x%08x: lanes 0x%08x do not exist in this warp", name, mask, mask & ~w.lanes);
    }
    if ((mask & w.exited) != 0) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s with member mask 0x%08x: lanes 0x%08x have already exited", name, mask, mask & w.exited);
    }
    size_t idx = w.pending.size();
    for (size_t i = 0; i < w.pending.size(); ++i) {
        const Collective& p = w.pending[i];
        if (p.mask == mask) {
            idx = i;
        } else if ((p.mask & mask) != 0) {
            fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s with member mask 0x%08x while lanes 0x%08x wait at %s with mask 0x%08x (the masks overlap)", name,
                 mask, p.arrived, collective_name(p.kind), p.mask);
        }
    }
    if (idx == w.pending.size()) {
        Collective fresh;
        fresh.kind = kind;
        fresh.mask = mask;
        fresh.c = c;
        fresh.where = at;
        w.pending.push_back(fresh);
    }
    Collective& co = w.pending[idx];
    if (co.kind != kind) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "lanes of one member mask 0x%08x meet at different warp collectives: %s here, %s in lanes 0x%08x", mask,
             name, collective_name(co.kind), co.arrived);
    }
    if (co.c != c) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "%s: lanes of member mask 0x%08x pass different segment widths", name, mask);
    }
    co.values[t->lane] = value;
    co.b[t->lane] = b;
    co.arrived |= bit;
    if (co.arrived == mask) {
        complete(w, co);
        if (races_enabled()) {
            std::vector<Thread*> lanes;
            for (uint32_t l = 0; l < 32; ++l) {
                if (((mask >> l) & 1) != 0) {
                    lanes.push_back(w.cta->threads[w.index * 32 + l].get());
                }
            }
            race_barrier(w.cta, lanes);
        }
        for (uint32_t l = 0; l < 32; ++l) {
            if (((mask >> l) & 1) != 0 && l != t->lane) {
                wake(w.cta->threads[w.index * 32 + l].get());
            }
        }
        w.pending.erase(w.pending.begin() + static_cast<std::ptrdiff_t>(idx));
        made_progress();
        yield_maybe();
        return t->coll_result;
    }
    block_self(WaitInfo{name, 0, 0, 0, at});
    return t->coll_result;
}

uint32_t load32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

uint64_t rmw(Type type, Rmw op, uint64_t old, uint64_t operand, uint64_t compare) {
    const auto f32 = [](uint64_t b) {
        float f;
        const uint32_t w = static_cast<uint32_t>(b);
        std::memcpy(&f, &w, 4);
        return f;
    };
    const auto f64 = [](uint64_t b) {
        double d;
        std::memcpy(&d, &b, 8);
        return d;
    };
    const auto bits32 = [](float f) {
        uint32_t w;
        std::memcpy(&w, &f, 4);
        return uint64_t(w);
    };
    const auto bits64 = [](double d) {
        uint64_t w;
        std::memcpy(&w, &d, 8);
        return w;
    };
    switch (op) {
        case Rmw::Exch:
            return operand;
        case Rmw::Cas:
            return old == compare ? operand : old;
        case Rmw::And:
            return old & operand;
        case Rmw::Or:
            return old | operand;
        case Rmw::Xor:
            return old ^ operand;
        case Rmw::Inc: {
            const uint32_t o = static_cast<uint32_t>(old);
            return o >= static_cast<uint32_t>(operand) ? 0 : o + 1;
        }
        case Rmw::Dec: {
            const uint32_t o = static_cast<uint32_t>(old);
            return (o == 0 || o > static_cast<uint32_t>(operand)) ? static_cast<uint32_t>(operand) : o - 1;
        }
        case Rmw::Add:
            switch (type) {
                case Type::S32:
                case Type::U32:
                    return static_cast<uint32_t>(static_cast<uint32_t>(old) + static_cast<uint32_t>(operand));
                case Type::S64:
                case Type::U64:
                    return old + operand;
                case Type::F32:
                    return bits32(f32(old) + f32(operand));
                case Type::F64:
                    return bits64(f64(old) + f64(operand));
            }
            break;
        case Rmw::Min:
        case Rmw::Max: {
            bool less = false;  // operand < old
            switch (type) {
                case Type::S32:
                    less = static_cast<int32_t>(operand) < static_cast<int32_t>(old);
                    break;
                case Type::U32:
                    less = static_cast<uint32_t>(operand) < static_cast<uint32_t>(old);
                    break;
                case Type::S64:
                    less = static_cast<int64_t>(operand) < static_cast<int64_t>(old);
                    break;
                case Type::U64:
                    less = operand < old;
                    break;
                case Type::F32:
                    less = f32(operand) < f32(old);
                    break;
                case Type::F64:
                    less = f64(operand) < f64(old);
                    break;
            }
            return (op == Rmw::Min) == less ? operand : old;
        }
    }
    return old;
}

uint64_t do_rmw(void* addr, Type type, Rmw op, uint64_t operand, uint64_t compare) {
    const size_t bytes = is64(type) ? 8 : 4;
    uint64_t old = 0;
    std::memcpy(&old, addr, bytes);
    const uint64_t next = rmw(type, op, old, operand, compare);
    std::memcpy(addr, &next, bytes);
    made_progress();
    return old;
}

}  // namespace

// ---- The operations ---------------------------------------------------------------------------

void bar_sync(uint32_t id, uint32_t count) {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cta* c = t->cta;
    const uint32_t threads = c->kernel->threads_per_cta;
    if (id >= 16) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "bar.sync %u: barrier ids are 0..15", id);
    }
    if (count != 0 && (count % 32 != 0 || count > (threads + 31) / 32 * 32)) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "bar.sync %u, %u: the thread count must be a multiple of 32 and at most the CTA's %u threads", id, count,
             threads);
    }
    NamedBarrier& b = c->bars[id];
    if (b.waiters.empty()) {
        b.count = count;
        b.arrived.assign(c->warps.size(), 0);
        b.where = at;
    } else if (b.count != count) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at,
             "bar.sync %u reached by a different set of threads than declared: this thread expects %u threads, the %zu already waiting "
             "expect %u (0 = the whole CTA)",
             id, count, b.waiters.size(), b.count);
    }
    b.arrived[t->warp->index] |= 1u << t->lane;
    b.waiters.push_back(t);
    uint32_t warps = 0;
    if (barrier_complete(*c, b, &warps)) {
        release(c, b, t);
        yield_maybe();
        return;
    }
    b.warps_arrived = warps;
    block_self(WaitInfo{"bar.sync", id, count, 0, at});
}

void named_barriers_on_exit(Thread* t) {
    Cta* c = t->cta;
    for (NamedBarrier& b : c->bars) {
        if (b.waiters.empty()) {
            continue;
        }
        uint32_t warps = 0;
        if (barrier_complete(*c, b, &warps)) {
            release(c, b, nullptr);
        } else {
            b.warps_arrived = warps;
        }
    }
}

bool collectives_on_exit(Thread* t, Failure** out) {
    Warp& w = *t->warp;
    const uint32_t bit = 1u << t->lane;
    for (const Collective& co : w.pending) {
        if ((co.mask & bit) != 0 && (co.arrived & bit) == 0) {
            auto* f = new Failure();
            f->code = CUDA_ERROR_LAUNCH_FAILED;
            char buf[256];
            std::snprintf(buf, sizeof buf, "lane %u exited while lanes 0x%08x wait for it at %s (member mask 0x%08x)", t->lane, co.arrived,
                          collective_name(co.kind), co.mask);
            f->title = buf;
            f->where = co.where;
            *out = f;
            return true;
        }
    }
    return false;
}

void syncwarp(uint32_t mask) { collective(kSyncwarp, mask, 0, 0, 0, __builtin_return_address(0)); }

uint32_t shfl(Shfl mode, uint32_t mask, uint32_t value, int b, int c) {
    return collective(kShfl + static_cast<int>(mode), mask, value, b, c, __builtin_return_address(0));
}

uint32_t vote(Vote kind, uint32_t mask, bool pred) { return collective(kVote + static_cast<int>(kind), mask, pred ? 1 : 0, 0, 0, __builtin_return_address(0)); }

uint32_t activemask() {
    const Warp& w = *me()->warp;
    return w.lanes & ~w.exited;
}

namespace {

// The kernel (serial) whose thread last released into each location (release stores and
// reductions, atomics). An acquire that reads such a location while that other kernel still runs
// has acquired generic-proxy writes of a running kernel: TMA loads after it need
// fence.proxy.async.global first (async_ops.cpp checks the flag).
std::unordered_map<uintptr_t, uint64_t>& releasers() {
    static auto* m = new std::unordered_map<uintptr_t, uint64_t>();
    return *m;
}

void note_release(const void* addr) { releasers()[reinterpret_cast<uintptr_t>(addr)] = me()->cta->kernel->serial; }

void note_acquire(Thread* t, const void* addr) {
    auto it = releasers().find(reinterpret_cast<uintptr_t>(addr));
    if (it == releasers().end() || it->second == t->cta->kernel->serial) {
        return;
    }
    for (const Kernel* k : eng().active) {
        if (k->serial == it->second) {
            t->global_proxy_fence = true;
            return;
        }
    }
}

}  // namespace

uint64_t atomic(void* addr, Type type, Rmw op, uint64_t operand, uint64_t compare) {
    void* at = __builtin_return_address(0);
    check_aligned(addr, is64(type) ? 8 : 4, "atomic", at);
    Thread* t = me();
    t->wait.where = at;
    yield_maybe();
    // A relaxed read-modify-write: it continues the location's release sequence, and orders only
    // what fences around it order.
    race_relaxed_read(t->cta, t->linear, reinterpret_cast<uintptr_t>(addr));
    race_relaxed_write(t->cta, t->linear, reinterpret_cast<uintptr_t>(addr));
    note_release(addr);
    return do_rmw(addr, type, op, operand, compare);
}

uint32_t ld_acquire_b32(const void* addr, Scope scope) {
    void* at = __builtin_return_address(0);
    check_aligned(addr, 4, "ld.acquire", at);
    const uint32_t v = load32(addr);
    poll_self(addr, v, WaitInfo{scope == Scope::Sys ? "ld.acquire.sys" : (scope == Scope::Gpu ? "ld.acquire.gpu" : "ld.acquire.cta"),
                                reinterpret_cast<uintptr_t>(addr), v, 0, at});
    race_acquire(me()->cta, me()->linear, reinterpret_cast<uintptr_t>(addr));
    note_acquire(me(), addr);
    return load32(addr);
}

void st_release_b32(void* addr, uint32_t value, Scope scope) {
    void* at = __builtin_return_address(0);
    (void)scope_name(scope);
    check_aligned(addr, 4, "st.release", at);
    me()->wait.where = at;
    yield_maybe();
    race_release(me()->cta, me()->linear, reinterpret_cast<uintptr_t>(addr));
    note_release(addr);
    std::memcpy(addr, &value, 4);
    made_progress();
}

void red_release(void* addr, Type type, Rmw op, uint64_t operand, Scope scope) {
    void* at = __builtin_return_address(0);
    (void)scope;
    check_aligned(addr, is64(type) ? 8 : 4, "red.release", at);
    me()->wait.where = at;
    yield_maybe();
    race_relaxed_read(me()->cta, me()->linear, reinterpret_cast<uintptr_t>(addr));
    race_release(me()->cta, me()->linear, reinterpret_cast<uintptr_t>(addr));
    note_release(addr);
    do_rmw(addr, type, op, operand, 0);
}

void fence(Scope scope) {
    (void)scope;
    me()->wait.where = __builtin_return_address(0);
    yield_maybe();
    race_fence(me()->cta, me()->linear);
}

void nanosleep(uint32_t ns) {
    Thread* t = me();
    (void)ns;
    // A sleep is a poll of nothing: it spins if nothing else changes.
    poll_self(&t->poll_progress, 0, WaitInfo{"nanosleep", 0, 0, 0, __builtin_return_address(0)});
}

uint64_t clock64() { return eng().vtime_ns * 2; }  // a 2 GHz clock

uint64_t globaltimer() { return eng().vtime_ns; }

void trap() { fail(CUDA_ERROR_LAUNCH_FAILED, __builtin_return_address(0), "__trap(): the kernel trapped"); }

void unsupported(const char* what) {
    fail(CUDA_ERROR_NOT_SUPPORTED, __builtin_return_address(0), "%s: an instruction the simulator does not model yet", what);
}

// ---- Shared memory ----------------------------------------------------------------------------

void* cta_shared(const void* tag, size_t bytes, size_t align) {
    Thread* t = me();
    Cta* c = t->cta;
    for (const auto& [k, off] : c->statics) {
        if (k == tag) {
            return reinterpret_cast<void*>(c->window->data + off);
        }
    }
    const uint32_t off = static_cast<uint32_t>((c->static_top + align - 1) / align * align);
    if (off + bytes > c->static_end) {
        fail(CUDA_ERROR_LAUNCH_FAILED, __builtin_return_address(0),
             "static shared memory: %zu more bytes do not fit the %u bytes ptxas reported for this kernel (simulator and device disagree "
             "on the kernel's __shared__ variables)",
             bytes, c->static_end - c->static_base);
    }
    c->static_top = off + static_cast<uint32_t>(bytes);
    c->statics.emplace_back(tag, off);
    return reinterpret_cast<void*>(c->window->data + off);
}

void* dynamic_shared() {
    Cta* c = me()->cta;
    return reinterpret_cast<void*>(c->window->data + c->dynamic_base);
}

uint32_t cvta_shared(const void* p) {
    Cta* c = me()->cta;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a < c->window->data || a > c->window->data + c->window_bytes) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS, __builtin_return_address(0),
             "__cvta_generic_to_shared(%p): not an address in this CTA's shared memory (%s .. +%u bytes)", p, hex(c->window->data).c_str(),
             c->window_bytes);
    }
    return static_cast<uint32_t>(a - c->window->data);
}

// ---- Conversions --------------------------------------------------------------------------------

namespace {

// f32 to E4M3 (bias 7, 3 mantissa bits, no infinities, 0x7f NaN), round to nearest even, values
// beyond the largest finite (448) saturated to it, as cvt.rn.satfinite does.
uint8_t e4m3_satfinite(float x) {
    if (std::isnan(x)) {
        return 0x7f;
    }
    const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
    const double a = std::fabs(static_cast<double>(x));
    if (a >= 448.0) {
        return sign | 0x7e;
    }
    uint32_t code;
    if (a < std::ldexp(1.0, -6)) {
        code = static_cast<uint32_t>(std::nearbyint(a * 512.0));  // subnormal steps of 2^-9 (8 -> the smallest normal)
    } else {
        int e = 0;
        const double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
        const double mant = std::nearbyint((m * 2.0 - 1.0) * 8.0);
        int exp = e - 1;
        uint32_t mi = static_cast<uint32_t>(mant);
        if (mi == 8) {
            mi = 0;
            ++exp;
        }
        code = (static_cast<uint32_t>(exp + 7) << 3) | mi;
        if (code > 0x7e) {
            code = 0x7e;
        }
    }
    return static_cast<uint8_t>(sign | code);
}

}  // namespace

uint16_t cvt_rn_satfinite_e4m3x2(float hi, float lo) { return static_cast<uint16_t>((e4m3_satfinite(hi) << 8) | e4m3_satfinite(lo)); }

// ---- Descriptions ------------------------------------------------------------------------------

std::string describe_thread(const Thread* t) {
    if (t == nullptr || t->cta == nullptr) {
        return "  (no simulated thread)";
    }
    const Cta* c = t->cta;
    const Kernel* k = c->kernel;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "    kernel  %s (launch #%llu: grid (%u, %u, %u), block (%u, %u, %u), %u bytes of dynamic shared memory)\n"
                  "    thread  CTA (%u, %u, %u), thread (%u, %u, %u): warp %u lane %u",
                  k->name.c_str(), static_cast<unsigned long long>(k->serial), k->grid.x, k->grid.y, k->grid.z, k->block.x, k->block.y,
                  k->block.z, k->dynamic_smem, c->idx.x, c->idx.y, c->idx.z, t->ctx.thread_idx.x, t->ctx.thread_idx.y, t->ctx.thread_idx.z,
                  t->warp->index, t->lane);
    return buf;
}

}  // namespace dksim
