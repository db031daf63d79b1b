// The engine: streams and their operations, kernels and their CTAs on the simulated SMs, and the
// scheduler that runs every simulated thread as a fiber on the GPU thread.
//
// Execution is lazy and deterministic: the GPU thread runs only while some host thread waits for
// the device (a synchronisation, a blocking copy, a query), and every choice it makes (which CTA
// starts, which thread runs next, whether a thread yields at an atomic) comes from one random
// generator seeded by DEEPKERN_SIM_SEED. A single host thread therefore sees the same
// interleaving for the same seed.
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>

#include "comm.hpp"
#include "sim.hpp"

extern "C" {
__attribute__((visibility("default"))) dksim::ThreadCtx* dksim_current = nullptr;
}

namespace dksim {

// ---- Configuration ----------------------------------------------------------------------------

namespace {

long env_long(const char* name, long fallback, long lo, long hi) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == 0) {
        return fallback;
    }
    char* end = nullptr;
    const long x = std::strtol(v, &end, 0);
    if (end == v || *end != 0 || x < lo || x > hi) {
        std::fprintf(stderr, "deepkern simulator: ignoring %s=%s (expected an integer in %ld..%ld)\n", name, v, lo, hi);
        return fallback;
    }
    return x;
}

Config make_config() {
    Config c;
    if (const char* s = std::getenv("DEEPKERN_SIM_SEED"); s != nullptr && *s != 0) {
        char* end = nullptr;
        c.seed = std::strtoull(s, &end, 0);
        c.seed_from_env = end != s && *end == 0;
        if (!c.seed_from_env) {
            std::fprintf(stderr, "deepkern simulator: ignoring DEEPKERN_SIM_SEED=%s (not an integer)\n", s);
        }
    }
    if (!c.seed_from_env) {
        c.seed = (static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^ (uint64_t(getpid()) << 32)) % 1000000007ull;
    }
    c.sms = static_cast<int>(env_long("DEEPKERN_SIM_SMS", 132, 1, 1024));
    c.devices = static_cast<int>(env_long("DEEPKERN_SIM_DEVICES", 1, 1, 16));
    c.live_ctas = static_cast<int>(env_long("DEEPKERN_SIM_LIVE_CTAS", 8, 1, 1 << 20));
    if (const char* p = std::getenv("DEEPKERN_SIM_POISON"); p != nullptr && std::strcmp(p, "off") == 0) {
        c.poison = -1;
    } else {
        c.poison = static_cast<int>(env_long("DEEPKERN_SIM_POISON", 0xff, 0, 255));
    }
    c.yield_percent = static_cast<int>(env_long("DEEPKERN_SIM_YIELD", 25, 0, 100));
    c.watchdog_s = static_cast<int>(env_long("DEEPKERN_SIM_WATCHDOG", 120, 1, 1 << 20));
    c.verbose = env_long("DEEPKERN_SIM_VERBOSE", 0, 0, 1) != 0;
    return c;
}

}  // namespace

const Config& config() {
    static const Config c = make_config();
    return c;
}

Engine& eng() {
    static Engine* e = new Engine();  // never destroyed: threads may still use it at exit
    return *e;
}

std::string hex(uint64_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "0x%" PRIx64, v);
    return b;
}

// ---- Kernel facts ---------------------------------------------------------------------------

namespace {

// Never destroyed (as the engine): kernels may still run at exit.
std::vector<std::pair<const KernelResources*, size_t>>& tables() {
    static auto* t = new std::vector<std::pair<const KernelResources*, size_t>>();
    return *t;
}

std::map<const void*, std::unique_ptr<KernelInfo>>& infos() {
    static auto* m = new std::map<const void*, std::unique_ptr<KernelInfo>>();
    return *m;
}

std::string demangled_name(const char* mangled);

// "dk::quant::per_block_kernel<true>" out of g++'s __PRETTY_FUNCTION__ of dk::launch<Kernel>.
std::string name_from_pretty(const char* pretty) {
    if (pretty == nullptr) {
        return "kernel";
    }
    std::string p = pretty;
    const std::string key = "Kernel = ";
    const size_t at = p.find(key);
    if (at == std::string::npos) {
        return p;
    }
    size_t end = at + key.size();
    int depth = 0;
    for (; end < p.size(); ++end) {
        const char c = p[end];
        if (c == '<' || c == '(') {
            ++depth;
        } else if (c == '>' || c == ')') {
            if (depth == 0) {
                break;
            }
            --depth;
        } else if ((c == ';' || c == ']') && depth == 0) {
            break;
        }
    }
    return p.substr(at + key.size(), end - at - key.size());
}

}  // namespace

int register_kernels(const KernelResources* table, size_t count) {
    std::lock_guard<std::mutex> lock(eng().mu);
    for (const auto& t : tables()) {
        if (t.first == table) {
            return 1;
        }
    }
    tables().emplace_back(table, count);
    return 1;
}

KernelInfo& kernel_info(const void* fn, const char* pretty) {
    auto& m = infos();
    auto it = m.find(fn);
    if (it != m.end()) {
        if (!it->second->from_table && it->second->name == "kernel" && pretty != nullptr) {
            it->second->name = name_from_pretty(pretty);
        }
        return *it->second;
    }
    auto info = std::make_unique<KernelInfo>();
    info->fn = fn;
    for (const auto& t : tables()) {
        for (size_t i = 0; i < t.second; ++i) {
            const KernelResources& r = t.first[i];
            if (r.fn == fn && fn != nullptr) {
                info->registers = r.registers;
                info->static_smem = r.static_smem;
                info->stack_frame = r.stack_frame;
                info->from_table = true;
                info->name = demangled_name(r.mangled);
            }
        }
    }
    if (!info->from_table) {
        info->name = pretty != nullptr ? name_from_pretty(pretty) : std::string("kernel");
    }
    KernelInfo& ref = *info;
    m.emplace(fn, std::move(info));
    return ref;
}

Kernel::~Kernel() {
    if (deleter != nullptr && args != nullptr) {
        deleter(args);
    }
}

// ---- Host threads ----------------------------------------------------------------------------

namespace {

// Host threads that have called the driver, and how many of them wait for the device now: when
// all of them wait, no more host work can come and a stuck device is stuck for good.
std::atomic<int> g_host_threads{0};

struct HostThread {
    HostThread() { ++g_host_threads; }
    ~HostThread() { --g_host_threads; }
};

}  // namespace

void host_activity() {
    static thread_local HostThread registered;
    (void)registered;
    eng().host_activity = std::chrono::steady_clock::now();
}

// ---- Streams and operations ----------------------------------------------------------------

namespace {

void finish_op(const OpPtr& op, CUresult result) {
    Engine& g = eng();
    op->started = true;
    op->done = true;
    op->result = result;
    op->done_at_ns = g.vtime_ns;
    if (result != CUDA_SUCCESS && op->stream->error == CUDA_SUCCESS) {
        op->stream->error = result;
    }
    if (op->kind == OpKind::WaitValue) {
        --eng().wait_values;
        if (result == CUDA_SUCCESS) {
            race_op_acquire(op.get(), op->addr);
        }
    }
    race_op_finished(op.get());
    made_progress();
    eng().pump_needed = true;
}

bool wait_value_met(const Op& op) {
    uint64_t v = 0;
    if (op.value64) {
        std::memcpy(&v, reinterpret_cast<const void*>(op.addr), 8);
    } else {
        uint32_t w;
        std::memcpy(&w, reinterpret_cast<const void*>(op.addr), 4);
        v = w;
    }
    const uint64_t want = op.value;
    switch (op.flags & 0xf) {
        case CU_STREAM_WAIT_VALUE_GEQ:
            return op.value64 ? int64_t(v - want) >= 0 : int32_t(uint32_t(v) - uint32_t(want)) >= 0;
        case CU_STREAM_WAIT_VALUE_EQ:
            return v == want;
        case CU_STREAM_WAIT_VALUE_AND:
            return (v & want) != 0;
        case CU_STREAM_WAIT_VALUE_NOR:
            return ~(v | want) != 0;
        default:
            return true;
    }
}

bool check_range(uintptr_t p, size_t bytes) { return bytes == 0 || mem_find(p, bytes) != nullptr || mem_find_mapping(p) == nullptr; }

void start_kernel(const OpPtr& op);

// A copy or memset racing with other work (race mode): reported like a kernel failure.
void race_failure(const OpPtr& op, const std::string& text) {
    std::fprintf(stderr, "deepkern simulator: %s failed\n  %s\n  seed    DEEPKERN_SIM_SEED=%llu reproduces this run\n", op->api, text.c_str(),
                 static_cast<unsigned long long>(config().seed));
    ++eng().failures;
    finish_op(op, CUDA_ERROR_LAUNCH_FAILED);
}

void start_op(const OpPtr& op) {
    op->started = true;
    race_op_started(op.get());
    switch (op->kind) {
        case OpKind::Kernel:
            start_kernel(op);
            return;
        case OpKind::Copy:
            for (const Copy& c : op->copies) {
                // Both ends may be device memory freed since the copy was enqueued.
                if (!check_range(c.dst, c.bytes) || !check_range(c.src, c.bytes)) {
                    std::fprintf(stderr, "deepkern simulator: %s: a copy of %zu bytes from %s to %s touches freed or unallocated device memory\n",
                                 op->api, c.bytes, hex(c.src).c_str(), hex(c.dst).c_str());
                    finish_op(op, CUDA_ERROR_ILLEGAL_ADDRESS);
                    return;
                }
                std::string race;
                if (!race_op_access(op.get(), c.src, c.bytes, false, &race) || !race_op_access(op.get(), c.dst, c.bytes, true, &race)) {
                    race_failure(op, race);
                    return;
                }
                std::memmove(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes);
            }
            finish_op(op, CUDA_SUCCESS);
            return;
        case OpKind::Memset: {
            if (!check_range(op->addr, op->count * op->elem)) {
                std::fprintf(stderr, "deepkern simulator: %s: a memset of %zu bytes at %s touches freed or unallocated device memory\n", op->api,
                             op->count * op->elem, hex(op->addr).c_str());
                finish_op(op, CUDA_ERROR_ILLEGAL_ADDRESS);
                return;
            }
            std::string race;
            if (!race_op_access(op.get(), op->addr, op->count * op->elem, true, &race)) {
                race_failure(op, race);
                return;
            }
            auto* p = reinterpret_cast<uint8_t*>(op->addr);
            for (size_t i = 0; i < op->count; ++i) {
                std::memcpy(p + i * op->elem, &op->value, op->elem);
            }
            finish_op(op, CUDA_SUCCESS);
            return;
        }
        case OpKind::WriteValue:
            if (!check_range(op->addr, op->value64 ? 8 : 4)) {
                finish_op(op, CUDA_ERROR_ILLEGAL_ADDRESS);
                return;
            }
            race_op_release(op.get(), op->addr);
            std::memcpy(reinterpret_cast<void*>(op->addr), &op->value, op->value64 ? 8 : 4);
            finish_op(op, CUDA_SUCCESS);
            return;
        case OpKind::WaitValue:
            ++eng().wait_values;
            if (wait_value_met(*op)) {
                finish_op(op, CUDA_SUCCESS);
            }
            return;
        case OpKind::HostFunc:
            ++eng().callbacks_running;
            eng().callbacks.push_back(op);
            eng().callback_cv.notify_one();
            return;
        case OpKind::Free:
            // Validated when enqueued; a second free of the same memory in between fails here.
            finish_op(op, mem_free(op->addr, MemKind::Device));
            return;
        case OpKind::Comm:
            comm_op_start(op);
            return;
        case OpKind::Record:
        case OpKind::WaitEvent:
        case OpKind::Barrier:
            finish_op(op, CUDA_SUCCESS);
            return;
    }
}

void pump() {
    Engine& g = eng();
    eng().pump_needed = false;
    for (Stream* s : g.streams) {
        while (!s->queue.empty()) {
            OpPtr op = s->queue.front();
            if (op->done) {
                s->queue.pop_front();
                continue;
            }
            if (op->started) {
                if (op->kind == OpKind::WaitValue && wait_value_met(*op)) {
                    finish_op(op, CUDA_SUCCESS);
                    continue;
                }
                break;
            }
            bool ready = true;
            CUresult inherited = CUDA_SUCCESS;
            for (const OpPtr& d : op->deps) {
                ready = ready && d->done;
                if (d->done && d->result != CUDA_SUCCESS && inherited == CUDA_SUCCESS) {
                    inherited = d->result;
                }
            }
            if (!ready) {
                break;
            }
            if (s->error != CUDA_SUCCESS || inherited != CUDA_SUCCESS) {
                // A failed stream runs nothing more; the error is what every later wait returns.
                finish_op(op, s->error != CUDA_SUCCESS ? s->error : inherited);
                if (op->kind == OpKind::Comm) {
                    // Its peers' parts can never run either.
                    comm_op_abandon(op, "a participant's stream failed before reaching its part", s->error != CUDA_SUCCESS ? s->error : inherited);
                    op->comm.clear();
                }
                if (op->kind == OpKind::Kernel) {
                    delete op->kernel;
                    op->kernel = nullptr;
                }
                continue;
            }
            start_op(op);
        }
    }
    // Destroyed streams leave once they have drained.
    g.streams.erase(std::remove_if(g.streams.begin(), g.streams.end(),
                                   [](Stream* s) {
                                       if (s->destroyed && s->queue.empty()) {
                                           delete s;
                                           return true;
                                       }
                                       return false;
                                   }),
                    g.streams.end());
}

}  // namespace

void finish_operation(const OpPtr& op, CUresult result) { finish_op(op, result); }

OpPtr enqueue(Stream* s, OpKind kind, const char* api) {
    Engine& g = eng();
    auto op = std::make_shared<Op>();
    op->id = g.next_op_id++;
    op->kind = kind;
    op->stream = s;
    op->api = api;
    // The legacy default stream waits for all blocking streams of its context, and they for it.
    Context* ctx = s->ctx;
    if (s->legacy) {
        for (Stream* o : ctx->streams) {
            if (o != s && o->blocking && o->last && !o->last->done) {
                op->deps.push_back(o->last);
            }
        }
    } else if (s->blocking && ctx->legacy->last && !ctx->legacy->last->done) {
        op->deps.push_back(ctx->legacy->last);
    }
    race_op_enqueued(op.get());
    s->queue.push_back(op);
    s->last = op;
    host_activity();
    made_progress();
    eng().pump_needed = true;
    return op;
}

// ---- Kernels and CTAs -------------------------------------------------------------------------

namespace {

std::atomic<uint64_t> g_watch_steps{0};
std::atomic<Thread*> g_watch_running{nullptr};

bool fits(const Sm& sm, const Kernel& k) {
    return sm.threads + k.cta_threads <= kSmMaxThreads && sm.warps + k.cta_warps <= kSmMaxWarps && sm.ctas + 1 <= kSmMaxCtas &&
           sm.registers + k.cta_registers <= kSmRegisters && sm.shared + k.cta_shared <= kSmSharedBytes;
}

void take(Sm& sm, const Kernel& k, int sign) {
    sm.threads += sign * k.cta_threads;
    sm.warps += sign * k.cta_warps;
    sm.ctas += sign;
    sm.registers += sign * k.cta_registers;
    sm.shared += sign * k.cta_shared;
}

// Makes CTAs resident on SMs with room, each device's kernels in the order they started (a
// kernel's CTAs are all placed before the next kernel's of its device, as the hardware's work
// distributor does; a full device never holds back another's kernels). The CTAs of a cluster
// (consecutive along x) are placed together, on distinct SMs, or not at all.
void dispatch_ctas() {
    Engine& g = eng();
    const int per_device = config().sms;
    std::vector<bool> full(size_t(config().devices), false);
    for (Kernel* k : g.active) {
        if (full[size_t(k->device)]) {
            continue;
        }
        while (k->next_cta < k->ctas_total) {
            std::vector<int> found;
            for (int i = 0; i < per_device && found.size() < k->cluster_size; ++i) {
                const int sm = k->device * per_device + static_cast<int>((eng().sm_cursor + i) % per_device);
                if (fits(g.sms[sm], *k)) {
                    found.push_back(sm);
                }
            }
            if (found.size() < k->cluster_size) {
                full[size_t(k->device)] = true;
                break;
            }
            eng().sm_cursor = (found.back() % per_device) + 1;
            Cluster* cluster = nullptr;
            if (k->cluster_size > 1) {
                cluster = new Cluster();
                cluster->ctas.assign(k->cluster_size, nullptr);
            }
            for (uint32_t r = 0; r < k->cluster_size; ++r) {
                take(g.sms[found[r]], *k, 1);
                auto* c = new Cta();
                c->kernel = k;
                c->sm = found[r];
                c->linear = k->next_cta++;
                c->idx.x = static_cast<unsigned>(c->linear % k->grid.x);
                c->idx.y = static_cast<unsigned>((c->linear / k->grid.x) % k->grid.y);
                c->idx.z = static_cast<unsigned>(c->linear / (uint64_t(k->grid.x) * k->grid.y));
                if (cluster != nullptr) {
                    c->cluster = cluster;
                    c->rank = r;
                    cluster->ctas[r] = c;
                }
                k->resident.push_back(c);
                eng().waiting_ctas.push_back(c);
            }
            made_progress();
        }
    }
}

void thread_main(void* arg);

void add_runnable(Thread* t) {
    Engine& g = eng();
    t->state = ThreadState::Runnable;
    t->runnable_slot = g.runnable.size();
    g.runnable.push_back(t);
}

void remove_runnable(Thread* t) {
    Engine& g = eng();
    if (t->runnable_slot == SIZE_MAX) {
        return;
    }
    Thread* last = g.runnable.back();
    g.runnable[t->runnable_slot] = last;
    last->runnable_slot = t->runnable_slot;
    g.runnable.pop_back();
    t->runnable_slot = SIZE_MAX;
}

// Makes a resident CTA live: its shared window and threads. `hold`: its threads wait in Engine::held
// before their first step (another CTA of its cluster starts first).
void make_live(Cta* c, bool hold = false) {
    Engine& g = eng();
    Kernel* k = c->kernel;
    c->live = true;
    ++g.live_ctas;
    // Shared window: [1 KiB reserved][static][dynamic], shared addresses from 0.
    const uint32_t static_bytes = k->info->from_table ? static_cast<uint32_t>(k->info->static_smem) : 48u << 10;
    c->static_base = kCtaReservedShared;
    c->static_top = c->static_base;
    c->static_end = c->static_base + static_bytes;
    c->dynamic_base = (c->static_end + 15u) & ~15u;
    c->window_bytes = c->dynamic_base + k->dynamic_smem;
    c->window = mem_map_shared(c->window_bytes);
    if (c->window == nullptr) {
        mem_exhausted("a CTA's shared memory window", c->window_bytes);
    }
    if (config().poison >= 0) {
        std::memset(reinterpret_cast<void*>(c->window->data), config().poison, c->window_bytes);
    }
    const uint32_t n = k->threads_per_cta;
    const uint32_t warps = (n + 31) / 32;
    c->warps.resize(warps);
    for (uint32_t w = 0; w < warps; ++w) {
        c->warps[w].cta = c;
        c->warps[w].index = w;
        const uint32_t lanes = std::min(32u, n - w * 32);
        c->warps[w].lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    }
    async_init_cta(c);
    race_init_cta(c);
    c->threads.reserve(n);
    c->running = n;
    if (c->cluster != nullptr) {
        c->cluster->live_threads += n;
    }
    for (uint32_t i = 0; i < n; ++i) {
        auto t = std::make_unique<Thread>();
        t->cta = c;
        t->linear = i;
        t->lane = i % 32;
        t->warp = &c->warps[i / 32];
        t->ctx.thread_idx.x = i % k->block.x;
        t->ctx.thread_idx.y = (i / k->block.x) % k->block.y;
        t->ctx.thread_idx.z = i / (k->block.x * k->block.y);
        t->ctx.block_idx = c->idx;
        t->ctx.block_dim = k->block;
        t->ctx.grid_dim = k->grid;
        t->stack = stack_get();
        t->sp = fiber_init(t->stack, thread_main, t.get());
        if (hold) {
            t->state = ThreadState::Blocked;
            t->wait = WaitInfo{"its start (the simulator holds it back: another CTA of its cluster started first)", 0, 0, 0, nullptr};
            g.held.push_back(t.get());
        } else {
            add_runnable(t.get());
        }
        c->threads.push_back(std::move(t));
    }
    made_progress();
}

bool make_one_live() {
    Engine& g = eng();
    if (eng().waiting_ctas.empty()) {
        return false;
    }
    const size_t i = g.rng.below(eng().waiting_ctas.size());
    Cta* c = eng().waiting_ctas[i];
    if (c->cluster == nullptr) {
        eng().waiting_ctas[i] = eng().waiting_ctas.back();
        eng().waiting_ctas.pop_back();
        make_live(c);
        return true;
    }
    // A cluster's CTAs are live together (they may wait for each other at barrier.cluster); the
    // seed may hold all but one back at their start, as launch skew would: a CTA that reaches
    // into another before a cluster barrier finds it not started.
    const bool skew = g.rng.percent(50);
    for (Cta* x : std::vector<Cta*>(c->cluster->ctas)) {
        if (x != nullptr && !x->live) {
            eng().waiting_ctas.erase(std::remove(eng().waiting_ctas.begin(), eng().waiting_ctas.end(), x), eng().waiting_ctas.end());
            make_live(x, skew && x != c);
        }
    }
    return true;
}

void complete_kernel(Kernel* k, CUresult result) {
    Engine& g = eng();
    if (result == CUDA_SUCCESS) {
        const std::string overwritten = mem_check_canaries();
        if (!overwritten.empty()) {
            Failure f;
            f.code = CUDA_ERROR_ILLEGAL_ADDRESS;
            f.title = overwritten;
            f.detail = "    found when the kernel completed (this kernel, or one that ran beside it, wrote there; the GPU would not fault "
                       "inside a 256-byte allocation granule)";
            report_failure(f, k, nullptr);
            ++g.failures;
            result = f.code;
        }
    }
    g.active.erase(std::remove(g.active.begin(), g.active.end(), k), g.active.end());
    OpPtr op = k->op;
    op->kernel = nullptr;
    finish_op(op, result);
    delete k;
    dispatch_ctas();
}

void release_cta(Cta* c) {
    Engine& g = eng();
    Kernel* k = c->kernel;
    async_drop_cta(c);
    race_retire_cta(c);
    if (c->live) {
        for (auto& t : c->threads) {
            g.held.erase(std::remove(g.held.begin(), g.held.end(), t.get()), g.held.end());
            remove_runnable(t.get());
            if (t->state == ThreadState::Parked) {
                g.parked.erase(std::remove(g.parked.begin(), g.parked.end(), t.get()), g.parked.end());
            }
            stack_put(t->stack);
            t->stack = Stack{};
        }
        mem_release(c->window);
        c->window = nullptr;
        --g.live_ctas;
    } else {
        eng().waiting_ctas.erase(std::remove(eng().waiting_ctas.begin(), eng().waiting_ctas.end(), c), eng().waiting_ctas.end());
    }
    take(g.sms[c->sm], *k, -1);
    k->resident.erase(std::remove(k->resident.begin(), k->resident.end(), c), k->resident.end());
    if (Cluster* cl = c->cluster; cl != nullptr) {
        cl->ctas[c->rank] = nullptr;
        if (++cl->released == cl->ctas.size()) {
            delete cl;
        }
    }
    delete c;
    made_progress();
}

void finish_cta(Cta* c) {
    Kernel* k = c->kernel;
    release_cta(c);
    if (++k->ctas_done == k->ctas_total) {
        complete_kernel(k, CUDA_SUCCESS);
    } else {
        dispatch_ctas();
    }
}

// Ends a kernel that failed: its CTAs are dropped wherever their threads are, the rest never run.
void abort_kernel(Kernel* k, CUresult code) {
    k->failed = true;
    while (!k->resident.empty()) {
        release_cta(k->resident.back());
    }
    k->next_cta = k->ctas_total;
    complete_kernel(k, code);
}

void start_kernel(const OpPtr& op) {
    Engine& g = eng();
    Kernel* k = op->kernel;
    k->op = op;
    g.active.push_back(k);
    dispatch_ctas();
}

}  // namespace

// ---- Threads (fiber side) -------------------------------------------------------------------

Thread* self() { return eng().running; }

namespace {

void switch_out(Thread* t) {
    // Slab stacks (fiber.cpp): the stack pointer at every switch, the red zone's pattern when the
    // thread ends.
    const auto sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
    if (t->stack.canary != 0 && (sp < t->stack.canary + 64 || (t->state == ThreadState::Exited && !stack_intact(t->stack)))) {
        auto* f = new Failure();
        f->title = "stack overflow of a simulated thread (its locals exceed the simulator's " + std::to_string(stack_bytes() >> 10) +
                   " KiB stacks): it wrote the red zone below its stack";
        t->stack.canary = 0;  // reported once; the stack is not reused
        t->stack.top = 0;
        Engine& g = eng();
        g.pending_failure = f;
        remove_runnable(t);
        t->state = ThreadState::Blocked;
    }
    dksim_fiber_switch(&t->sp, eng().sched_sp);
}

}  // namespace

void yield_maybe() {
    Engine& g = eng();
    Thread* t = g.running;
    if (g.rng.percent(config().yield_percent)) {
        switch_out(t);
    }
}

void block_self(const WaitInfo& w) {
    Thread* t = self();
    remove_runnable(t);
    t->state = ThreadState::Blocked;
    t->wait = w;
    switch_out(t);
}

void wake(Thread* t) {
    if (t->state == ThreadState::Blocked) {
        add_runnable(t);
    }
}

void poll_self(const void* addr, uint64_t value, const WaitInfo& w) {
    Engine& g = eng();
    Thread* t = self();
    // Polling the same value again with nothing changed anywhere since: the thread spins. Park it
    // until something changes (or the device is stuck and virtual time moves on).
    // A thread that polls different addresses in turn (a flag and a sleep, say) spins as well once
    // a few polls in a row saw nothing change.
    const bool quiet = t->poll_progress == g.progress;
    t->poll_streak = quiet ? t->poll_streak + 1 : 0;
    const bool spinning = quiet && ((t->poll_addr == addr && t->poll_value == value) || t->poll_streak >= 4);
    t->poll_addr = addr;
    t->poll_value = value;
    t->poll_progress = g.progress;
    // While other threads make progress, a poll is rarely quiet, yet a thread that keeps seeing
    // the same values spins all the same: it polls again only after exponentially more progress
    // (at most kMaxBackoff operations elsewhere). How often a spin loop goes round changes
    // nothing it computes, and a device with nothing else to run polls every parked thread.
    bool fruitless = false, seen = false;
    for (auto& [a, v] : t->poll_seen) {
        if (a == addr) {
            seen = true;
            fruitless = v == value;
            v = value;
        }
    }
    if (!seen) {
        t->poll_seen[t->poll_seen_next++ % t->poll_seen.size()] = {addr, value};
    }
    t->poll_fruitless = fruitless ? t->poll_fruitless + 1 : (seen ? 0 : t->poll_fruitless);
    constexpr uint32_t kMaxBackoffLog = 12;
    const bool backoff = t->poll_fruitless >= 2;
    if (spinning || backoff) {
        remove_runnable(t);
        t->state = ThreadState::Parked;
        t->wait = w;
        t->wake_at = g.progress + (backoff ? uint64_t(1) << std::min(t->poll_fruitless - 1, kMaxBackoffLog) : 1);
        g.next_wake = std::min(g.next_wake, t->wake_at);
        g.parked.push_back(t);
    }
    switch_out(t);
}

void fail(CUresult code, void* at, const char* fmt, ...) {
    char buf[640];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    auto* f = new Failure();
    f->code = code;
    f->title = buf;
    f->where = at;
    fail_self(f);
}

void fail_self(Failure* f) {
    Engine& g = eng();
    Thread* t = self();
    g.pending_failure = f;
    remove_runnable(t);
    t->state = ThreadState::Blocked;
    switch_out(t);
    std::abort();  // a failed thread is never resumed
}

void exit_self() {
    Thread* t = self();
    remove_runnable(t);
    t->state = ThreadState::Exited;
    switch_out(t);
    std::abort();
}

namespace {

void thread_main(void* arg) {
    auto* t = static_cast<Thread*>(arg);
    t->started = true;
    Kernel* k = t->cta->kernel;
    k->entry(k->args);
    exit_self();
}

void fail_kernel_now(Kernel* k, Failure* f, const Thread* t) {
    report_failure(*f, k, t);
    ++eng().failures;
    abort_kernel(k, f->code);
    delete f;
}

}  // namespace

void fail_kernel(Kernel* k, Failure* f) { fail_kernel_now(k, f, nullptr); }

namespace {

void on_thread_exit(Thread* t) {
    Engine& g = eng();
    Cta* c = t->cta;
    Warp* w = t->warp;
    stack_put(t->stack);
    t->stack = Stack{};
    w->exited |= 1u << t->lane;
    --c->running;
    made_progress();
    (void)g;
    Failure* f = nullptr;
    if (collectives_on_exit(t, &f)) {
        fail_kernel_now(c->kernel, f, t);
        return;
    }
    named_barriers_on_exit(t);
    cluster_barrier_on_exit(t);
    if (c->running == 0) {
        if (async_on_cta_exit(c, &f)) {
            fail_kernel_now(c->kernel, f, nullptr);
            return;
        }
        finish_cta(c);
    }
}

void run(Thread* t) {
    Engine& g = eng();
    g.running = t;
    dksim_current = &t->ctx;
    ++g.steps;
    ++g.vtime_ns;
    g_watch_steps.store(g.steps, std::memory_order_relaxed);
    g_watch_running.store(t, std::memory_order_relaxed);
    dksim_fiber_switch(&g.sched_sp, t->sp);
    g_watch_running.store(nullptr, std::memory_order_relaxed);
    dksim_current = nullptr;
    g.running = nullptr;
    if (g.pending_failure != nullptr) {
        Failure* f = g.pending_failure;
        g.pending_failure = nullptr;
        fail_kernel_now(t->cta->kernel, f, t);
        return;
    }
    if (t->state == ThreadState::Exited) {
        on_thread_exit(t);
    }
}

void wake_parked() {
    Engine& g = eng();
    for (Thread* t : g.parked) {
        add_runnable(t);
    }
    g.parked.clear();
    g.next_wake = UINT64_MAX;
}

// Wakes the parked threads whose backoff has passed, and, when `idle` (no thread can run), every
// one that has not polled since the last progress. True if any woke.
bool wake_due(bool idle) {
    Engine& g = eng();
    bool woke = false;
    uint64_t next = UINT64_MAX;
    size_t keep = 0;
    for (Thread* t : g.parked) {
        if (g.progress >= t->wake_at || (idle && t->poll_progress != g.progress)) {
            add_runnable(t);
            woke = true;
        } else {
            next = std::min(next, t->wake_at);
            g.parked[keep++] = t;
        }
    }
    g.parked.resize(keep);
    g.next_wake = next;
    return woke;
}

// One scheduling decision. False when nothing can run.
bool step() {
    Engine& g = eng();
    const uint64_t before = g.progress;
    // Until the streams are stable: one operation finishing may let others start.
    eng().pump_needed = eng().pump_needed || eng().wait_values > 0;
    while (eng().pump_needed) {
        pump();
    }
    while (g.live_ctas < static_cast<size_t>(config().live_ctas) && !eng().waiting_ctas.empty()) {
        make_one_live();
    }
    if (!g.parked.empty() && g.progress >= g.next_wake) {
        wake_due(false);
    }
    // TMA transfers and wgmma operand reads happen between threads' steps, at points the seed
    // chooses (always when no thread can run).
    if (async_progress()) {
        return true;
    }
    if (!g.held.empty() && g.runnable.empty()) {
        for (Thread* t : g.held) {
            add_runnable(t);
        }
        g.held.clear();
        made_progress();
        return true;
    }
    if (g.runnable.empty()) {
        return make_one_live() || g.progress != before || (!g.parked.empty() && wake_due(true));
    }
    run(g.runnable[g.rng.below(g.runnable.size())]);
    return true;
}

void deadlock();

}  // namespace

// ---- The GPU thread ---------------------------------------------------------------------------

namespace {

// Marks satisfied waiters done; true if a blocking one is left.
bool check_waiters() {
    Engine& g = eng();
    bool blocking_left = false;
    for (Waiter* w : g.waiters) {
        if (w->done) {
            continue;
        }
        if (w->ready()) {
            w->done = true;
            race_host_synchronised();
            w->cv.notify_all();
        } else if (!w->query) {
            blocking_left = true;
        }
    }
    return blocking_left;
}

bool any_waiter_pending() {
    for (Waiter* w : eng().waiters) {
        if (!w->done) {
            return true;
        }
    }
    return false;
}

constexpr int kMaxTimeJumps = 200;  // 200 s of virtual time with nothing else changing

void stuck(std::unique_lock<std::mutex>& lock) {
    Engine& g = eng();
    // Queries get their answer now: nothing more happens without further host work.
    for (Waiter* w : g.waiters) {
        if (!w->done && w->query) {
            w->done = true;
            w->cv.notify_all();
        }
    }
    if (!check_waiters()) {
        return;
    }
    // A host thread whose wait is over but that has not woken yet (it needs this lock) is about
    // to do more host work: let it run before deciding anything. So is a host callback.
    const bool waking = std::any_of(g.waiters.begin(), g.waiters.end(), [](const Waiter* w) { return w->done; });
    if (waking || eng().callbacks_running > 0) {
        g.gpu_cv.wait_for(lock, std::chrono::milliseconds(5));
        return;
    }
    // Another host thread may still enqueue what the device waits for (measured since the last host
    // activity or the last time jump, whichever is later).
    const auto now = std::chrono::steady_clock::now();
    const auto idle = now - std::max(g.host_activity, g.last_jump);
    const int waiting = static_cast<int>(std::count_if(g.waiters.begin(), g.waiters.end(), [](const Waiter* w) { return !w->done && !w->query; }));
    if (waiting < g_host_threads.load() && idle < std::chrono::milliseconds(config().grace_ms)) {
        if (config().verbose) { std::fprintf(stderr, "dksim: stuck, waiting for host work (%d of %d host threads wait)\n", waiting, g_host_threads.load()); }
        g.gpu_cv.wait_for(lock, std::chrono::milliseconds(20));
        return;
    }
    // Threads that spin on a clock: let virtual time pass.
    if (!g.parked.empty() && g.time_jumps < kMaxTimeJumps) {
        ++g.time_jumps;
        g.last_jump = now;
        g.vtime_ns += 1'000'000'000;
        wake_parked();
        return;
    }
    deadlock();
}

void gpu_main() {
    Engine& g = eng();
    gpu_thread_signal_stack();
    install_fault_handlers();
    std::unique_lock<std::mutex> lock(g.mu);
    uint64_t seen_progress = g.progress;
    for (;;) {
        g.gpu_cv.wait(lock, [] { return any_waiter_pending(); });
        unsigned n = 0;
        while (any_waiter_pending()) {
            if (!check_waiters() && !any_waiter_pending()) {
                break;
            }
            if (!step()) {
                stuck(lock);
            }
            if (g.progress != seen_progress) {
                seen_progress = g.progress;
                g.time_jumps = 0;
            }
            if (++n % 1024 == 0) {
                // Let host threads enqueue (they need the lock).
                lock.unlock();
                std::this_thread::yield();
                lock.lock();
            }
        }
    }
}

void callback_main() {
    Engine& g = eng();
    std::unique_lock<std::mutex> lock(g.mu);
    for (;;) {
        eng().callback_cv.wait(lock, [] { return !eng().callbacks.empty(); });
        OpPtr op = eng().callbacks.front();
        eng().callbacks.pop_front();
        lock.unlock();
        op->host_fn(op->host_data);
        lock.lock();
        --eng().callbacks_running;
        finish_op(op, CUDA_SUCCESS);
        g.gpu_cv.notify_one();
    }
}

void watchdog_main() {
    uint64_t last = 0;
    int still = 0;
    for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        const uint64_t s = g_watch_steps.load(std::memory_order_relaxed);
        Thread* t = g_watch_running.load(std::memory_order_relaxed);
        if (t != nullptr && s == last) {
            if (++still >= config().watchdog_s) {
                std::fprintf(stderr,
                             "deepkern simulator: a simulated thread has run for %d s without reaching a synchronising operation: an endless "
                             "loop, or a spin on a plain (non-volatile, non-acquire) load, which the simulator cannot interleave.\n%s\n"
                             "seed: DEEPKERN_SIM_SEED=%" PRIu64 "\n",
                             still, describe_thread(t).c_str(), config().seed);
                std::fflush(stderr);
                std::abort();
            }
        } else {
            still = 0;
        }
        last = s;
    }
}

}  // namespace

namespace {

// A kernel that failed on the simulator fails the process, even if the program never synchronised
// with it (or ignored the error): no simulated failure goes unnoticed.
void check_at_exit() {
    Engine& g = eng();
    {
        // A GPU runs what was enqueued whether or not the program waits for it: so does the
        // simulator, before the process ends.
        std::unique_lock<std::mutex> lock(g.mu);
        wait_until(lock, [] {
            for (Stream* s : eng().streams) {
                if (!s->queue.empty()) {
                    return false;
                }
            }
            return true;
        });
    }
    const uint64_t failures = g.failures;
    if (failures > 0 && std::getenv("DEEPKERN_SIM_ALLOW_FAILURES") == nullptr) {
        std::fprintf(stderr,
                     "deepkern simulator: %llu simulated kernel failure(s) in this process (reported above); exiting with status 101 "
                     "(DEEPKERN_SIM_SEED=%llu)\n",
                     static_cast<unsigned long long>(failures), static_cast<unsigned long long>(config().seed));
        std::fflush(stderr);
        _exit(101);
    }
}

}  // namespace

void ensure_started() {
    Engine& g = eng();
    if (g.gpu_started) {
        return;
    }
    g.gpu_started = true;
    std::atexit(check_at_exit);
    g.rng = Rng{config().seed * 0x2545f4914f6cdd1dull + 1};
    g.sms.assign(size_t(config().sms) * config().devices, Sm{});
    g.host_activity = std::chrono::steady_clock::now();
    for (int d = 0; d < config().devices; ++d) {
        auto* ctx = new Context();
        ctx->device = d;
        ctx->primary = true;
        auto* legacy = new Stream();
        legacy->id = g.next_stream_id++;
        legacy->ctx = ctx;
        legacy->legacy = true;
        legacy->blocking = true;
        ctx->legacy = legacy;
        ctx->streams.push_back(legacy);
        g.streams.push_back(legacy);
        g.primary.push_back(ctx);
    }
    g.gpu = std::thread(gpu_main);
    g.gpu_id = g.gpu.get_id();
    g.gpu.detach();
    std::thread(callback_main).detach();
    std::thread(watchdog_main).detach();
}

void wait_until(std::unique_lock<std::mutex>& lock, std::function<bool()> ready) {
    Engine& g = eng();
    ensure_started();
    host_activity();
    if (ready()) {
        return;
    }
    Waiter w;
    w.ready = std::move(ready);
    g.waiters.push_back(&w);
    g.gpu_cv.notify_one();
    w.cv.wait(lock, [&] { return w.done; });
    g.waiters.erase(std::remove(g.waiters.begin(), g.waiters.end(), &w), g.waiters.end());
}

void drive(std::unique_lock<std::mutex>& lock, std::function<bool()> ready) {
    Engine& g = eng();
    ensure_started();
    host_activity();
    if (ready()) {
        return;
    }
    Waiter w;
    w.ready = std::move(ready);
    g.waiters.push_back(&w);
    w.query = true;
    g.gpu_cv.notify_one();
    w.cv.wait(lock, [&] { return w.done; });
    g.waiters.erase(std::remove(g.waiters.begin(), g.waiters.end(), &w), g.waiters.end());
}

// ---- Deadlocks --------------------------------------------------------------------------------

namespace {

void deadlock() {
    Engine& g = eng();
    std::ostringstream os;
    os << "deepkern simulator: deadlock: every simulated thread waits and nothing can change what it waits for";
    if (g.time_jumps > 0) {
        os << " (also after " << g.time_jumps << " s of virtual time)";
    }
    os << "\n";
    // Warps grouped by kernel, what their lanes wait on and where: one line per group, with up to
    // four examples, so a grid of identical waiters reads as one line.
    struct Group {
        const Kernel* kernel;
        std::string what;
        void* where;
        std::vector<std::string> warps;
    };
    std::vector<Group> groups;
    for (Kernel* k : g.active) {
        for (Cta* c : k->resident) {
            if (!c->live) {
                continue;
            }
            for (Warp& w : c->warps) {
                std::map<std::pair<std::string, void*>, uint32_t> lanes_of;
                for (uint32_t lane = 0; lane < 32; ++lane) {
                    if (((w.lanes >> lane) & 1) == 0 || ((w.exited >> lane) & 1) != 0) {
                        continue;
                    }
                    const Thread* t = c->threads[w.index * 32 + lane].get();
                    std::ostringstream what;
                    what << (t->state == ThreadState::Parked ? "spinning on " : "waiting at ") << t->wait.what;
                    if (std::strncmp(t->wait.what, "bar.sync", 8) == 0) {
                        const NamedBarrier& b = c->bars[t->wait.a];
                        what << " " << t->wait.a << " (" << (b.count == 0 ? "all threads" : std::to_string(b.count) + " threads") << "; "
                             << b.warps_arrived << " warps arrived)";
                    } else if (const std::string more = async_describe_wait(c, t->wait); !more.empty()) {
                        what << " " << more;
                    } else if (t->wait.a != 0) {
                        what << " [" << hex(t->wait.a) << "] = " << t->wait.b;
                    }
                    lanes_of[{what.str(), t->wait.where}] |= 1u << lane;
                }
                for (auto& [key, lanes] : lanes_of) {
                    std::ostringstream ex;
                    ex << "CTA (" << c->idx.x << ", " << c->idx.y << ", " << c->idx.z << ") warp " << w.index << " lanes " << hex(lanes);
                    auto it = std::find_if(groups.begin(), groups.end(),
                                           [&](const Group& gr) { return gr.kernel == k && gr.what == key.first && gr.where == key.second; });
                    if (it == groups.end()) {
                        groups.push_back(Group{k, key.first, key.second, {}});
                        it = groups.end() - 1;
                    }
                    it->warps.push_back(ex.str());
                }
            }
        }
    }
    std::vector<void*> where;
    for (const Group& gr : groups) {
        where.push_back(gr.where);
    }
    std::vector<std::string> places;
    {
        std::istringstream in(symbolize(where.data(), where.size()));
        std::string l;
        while (std::getline(in, l)) {
            places.push_back(l);
        }
    }
    for (Kernel* k : g.active) {
        os << "  kernel " << k->name << " (launch #" << k->serial << ", grid (" << k->grid.x << ", " << k->grid.y << ", " << k->grid.z
           << "): " << k->ctas_done << " of " << k->ctas_total << " CTAs done, " << k->resident.size() << " resident on SMs)\n";
        for (size_t i = 0; i < groups.size(); ++i) {
            const Group& gr = groups[i];
            if (gr.kernel != k) {
                continue;
            }
            os << "    " << gr.warps.size() << (gr.warps.size() == 1 ? " warp " : " warps ") << gr.what << "\n";
            if (i < places.size() && !places[i].empty()) {
                os << "      at " << places[i] << "\n";
            }
            os << "      e.g. ";
            for (size_t j = 0; j < gr.warps.size() && j < 4; ++j) {
                os << (j > 0 ? "; " : "") << gr.warps[j];
            }
            os << (gr.warps.size() > 4 ? "; ..." : "") << "\n";
        }
    }
    for (Stream* s : g.streams) {
        if (!s->queue.empty() && s->queue.front()->kind == OpKind::WaitValue && s->queue.front()->started) {
            const Op& op = *s->queue.front();
            os << "  stream " << s->id << ": " << op.api << " waits for [" << hex(op.addr) << "] (flags " << op.flags << ", value " << op.value
               << ")\n";
        }
        if (!s->queue.empty() && s->queue.front()->kind == OpKind::Comm && s->queue.front()->started && !s->queue.front()->done) {
            os << "  stream " << s->id << ": " << comm_op_waiting(*s->queue.front()) << "\n";
        }
    }
    // Operations that have not started, and what each waits for: an earlier operation of another
    // stream (an event, the legacy default stream) or a kernel that finds no room on its device.
    for (Stream* s : g.streams) {
        if (s->queue.empty() || s->queue.front()->started) {
            continue;
        }
        const Op& op = *s->queue.front();
        os << "  stream " << s->id << " (device " << s->ctx->device << "): " << op.api << " has not started";
        bool first = true;
        for (const OpPtr& d : op.deps) {
            if (!d->done) {
                os << (first ? "; it waits for " : ", ") << d->api << " on stream " << d->stream->id << (d->started ? " (running)" : " (not started)");
                first = false;
            }
        }
        os << " (" << s->queue.size() << " operation" << (s->queue.size() == 1 ? "" : "s") << " queued)\n";
    }
    for (Stream* s : g.streams) {
        if (!s->queue.empty() && s->queue.front()->kind == OpKind::Kernel && s->queue.front()->started && s->queue.front()->kernel != nullptr &&
            s->queue.front()->kernel->next_cta < s->queue.front()->kernel->ctas_total) {
            const Kernel* k = s->queue.front()->kernel;
            os << "  kernel " << k->name << " (launch #" << k->serial << ") on stream " << s->id << ": " << (k->ctas_total - k->next_cta)
               << " CTAs find no room on device " << k->device << "\n";
        }
    }
    os << "  seed: DEEPKERN_SIM_SEED=" << config().seed << " reproduces this run (run the test alone, --test-threads=1)\n";
    std::fputs(os.str().c_str(), stderr);
    std::fflush(stderr);
    ++g.failures;
    // Every kernel involved fails with a launch timeout; so do stream waits that cannot finish.
    while (!g.active.empty()) {
        abort_kernel(g.active.front(), CUDA_ERROR_LAUNCH_TIMEOUT);
    }
    for (Stream* s : g.streams) {
        if (!s->queue.empty() && s->queue.front()->kind == OpKind::WaitValue && s->queue.front()->started && !s->queue.front()->done) {
            finish_op(s->queue.front(), CUDA_ERROR_LAUNCH_TIMEOUT);
        }
    }
    // Communication operations waiting for peers whose streams never reach their part: their
    // tasks fail, so every participant's operation ends (now, or when its stream reaches it).
    std::vector<OpPtr> comms;
    for (Stream* s : g.streams) {
        if (!s->queue.empty() && s->queue.front()->kind == OpKind::Comm && s->queue.front()->started && !s->queue.front()->done) {
            comms.push_back(s->queue.front());
        }
    }
    for (const OpPtr& op : comms) {
        comm_op_abandon(op, "a deadlock: the other participants' streams never reached their part", CUDA_ERROR_LAUNCH_TIMEOUT);
    }
    g.time_jumps = 0;
}

}  // namespace

}  // namespace dksim

// ---- Names -----------------------------------------------------------------------------------

#include <cxxabi.h>

namespace dksim {
namespace {
std::string demangled_name(const char* mangled) {
    if (mangled == nullptr) {
        return "kernel";
    }
    int status = 0;
    char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || d == nullptr) {
        return mangled;
    }
    std::string s = d;
    std::free(d);
    // "void dk::quant::per_block_kernel<true>(unsigned short const*, ...)" -> "dk::quant::per_block_kernel<true>"
    if (s.rfind("void ", 0) == 0) {
        s = s.substr(5);
    }
    return without_parameters(s);
}
}  // namespace
}  // namespace dksim
