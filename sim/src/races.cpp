// Race detection (opt-in). A simulated build made with DEEPKERN_SIM_RACES=1 compiles the kernels
// with GCC's memory-access instrumentation (-fsanitize=thread, without its runtime: the hooks it
// calls are defined here), so every load and store of kernel code reaches the simulator.
//
// Happens-before is tracked with vector clocks in two levels.
// - Within a CTA, every thread and each asynchronous unit (the TMA, and each warpgroup's wgmma)
//   has a dense vector clock over the CTA's threads and units. They are joined where the PTX memory
//   model orders accesses: CTA barriers, warp collectives, mbarrier phases (arrivals and TMA
//   completions release into the phase, a successful try_wait acquires it), wgmma issue and
//   wait_group, bulk waits, and release/acquire patterns on a location.
// - Beyond its CTA, each of them also carries a `Know`: the stream operations it knows finished
//   (per stream, the last operation id: stream order makes every earlier one finished too) and,
//   for CTAs of kernels still running, the latest clock of each of their threads it knows. It
//   grows at acquires (a release store, or a fence after a relaxed read, of another CTA), at
//   kernel start (what the stream and the events it waited for knew) and is handed on at kernel
//   end (a kernel's completion is known to later work on its stream and to whoever waits for it).
//   The host knows whatever had finished when one of its waits returned.
//
// Release and acquire follow the PTX patterns: st.release / red.release release the thread's
// clock into the location, ld.acquire acquires it; a relaxed strong write (an atomic, a volatile
// store) releases only what the thread's last fence covered, and what a relaxed read observed is
// acquired at the thread's next fence. Atomics on a location are never a race with each other.
//
// Each 4-byte word of shared memory, and of every device or host allocation, remembers its last
// write and its latest reads (by whom, at which clock, which bytes). Two accesses to the same
// bytes, one a write, from different threads, units or operations with no happens-before between
// them, are a data race, reported with both operations.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <unordered_map>

#include "races.hpp"
#include "sim.hpp"

namespace dksim {

namespace {

bool g_races = false;

// Agents that access memory: CTAs (ids with kCtaBit) and stream operations (their op ids).
constexpr uint64_t kCtaBit = uint64_t(1) << 62;
uint64_t g_next_cta = 0;

struct Agent {
    uint64_t stream = 0, op = 0;  // the operation (and its stream) the agent belongs to
    uint32_t threads = 0;         // CTAs: threads (slots beyond are the TMA unit, then wgmma units)
    uint3 block{};
    std::string name;  // the kernel, or the API call of an operation
};

std::unordered_map<uint64_t, Agent>& agents() {
    static auto* m = new std::unordered_map<uint64_t, Agent>();
    return *m;
}

}  // namespace

struct Know {
    std::vector<std::pair<uint64_t, uint64_t>> streams;           // stream id -> last op id known finished, by stream id
    std::vector<std::pair<uint64_t, std::vector<uint32_t>>> ctas;  // CTA agent -> its slots' clocks known, by agent id
};

namespace {

uint64_t finished_on(const Know& k, uint64_t stream) {
    auto it = std::lower_bound(k.streams.begin(), k.streams.end(), std::make_pair(stream, uint64_t(0)));
    return it != k.streams.end() && it->first == stream ? it->second : 0;
}

const std::vector<uint32_t>* cta_clock(const Know& k, uint64_t who) {
    auto it = std::lower_bound(k.ctas.begin(), k.ctas.end(), who, [](const auto& e, uint64_t w) { return e.first < w; });
    return it != k.ctas.end() && it->first == who ? &it->second : nullptr;
}

// Whether `k` knows the access of agent `who` (slot, clock).
bool knows(const Know* k, uint64_t who, uint32_t slot, uint32_t clock) {
    if (k == nullptr) {
        return false;
    }
    auto it = agents().find(who);
    if (it != agents().end() && finished_on(*k, it->second.stream) >= it->second.op) {
        return true;
    }
    if ((who & kCtaBit) != 0) {
        const std::vector<uint32_t>* v = cta_clock(*k, who);
        return v != nullptr && slot < v->size() && (*v)[slot] >= clock;
    }
    return false;
}

// Drops CTA entries whose kernel is known finished (the stream entry covers them).
void prune(Know& k) {
    k.ctas.erase(std::remove_if(k.ctas.begin(), k.ctas.end(),
                                [&](const auto& e) {
                                    auto it = agents().find(e.first);
                                    return it != agents().end() && finished_on(k, it->second.stream) >= it->second.op;
                                }),
                 k.ctas.end());
}

// a ∪ b. Returns `a` itself when b adds nothing.
// Merges two lists of (key, value) sorted by key into `out`: a key in one list only keeps its
// value, a key in both gets combine(x value, y value, grew). `grew` is set when y adds a key.
template <typename V, typename Combine>
void merge_by_key(const std::vector<std::pair<uint64_t, V>>& x, const std::vector<std::pair<uint64_t, V>>& y,
                  std::vector<std::pair<uint64_t, V>>& out, bool& grew, Combine combine) {
    size_t i = 0, j = 0;
    while (i < x.size() || j < y.size()) {
        if (j == y.size() || (i < x.size() && x[i].first < y[j].first)) {
            out.push_back(x[i++]);
        } else if (i == x.size() || y[j].first < x[i].first) {
            out.push_back(y[j++]);
            grew = true;
        } else {
            out.emplace_back(x[i].first, combine(x[i].second, y[j].second, grew));
            ++i;
            ++j;
        }
    }
}

KnowPtr join(const KnowPtr& a, const KnowPtr& b) {
    if (!b || a == b) {
        return a;
    }
    if (!a) {
        return b;
    }
    auto out = std::make_shared<Know>();
    bool grew = false;
    merge_by_key(a->streams, b->streams, out->streams, grew, [](uint64_t x, uint64_t y, bool& g) {
        g = g || y > x;
        return std::max(x, y);
    });
    merge_by_key(a->ctas, b->ctas, out->ctas, grew, [](const std::vector<uint32_t>& x, const std::vector<uint32_t>& w, bool& g) {
        std::vector<uint32_t> v = x;
        if (v.size() < w.size()) {
            v.resize(w.size(), 0);
        }
        for (size_t s = 0; s < w.size(); ++s) {
            if (w[s] > v[s]) {
                v[s] = w[s];
                g = true;
            }
        }
        return v;
    });
    if (!grew) {
        return a;
    }
    prune(*out);
    return out;
}

// `k` plus CTA `who`'s clock `vc`.
KnowPtr with_cta(const KnowPtr& k, uint64_t who, const std::vector<uint32_t>& vc) {
    auto own = std::make_shared<Know>();
    own->ctas.emplace_back(who, vc);
    return join(k, own);
}

// `k` without CTA `who`'s entry, which is joined into `vc` instead.
KnowPtr split_own(const KnowPtr& k, uint64_t who, std::vector<uint32_t>& vc) {
    if (!k) {
        return k;
    }
    const std::vector<uint32_t>* own = cta_clock(*k, who);
    if (own == nullptr) {
        return k;
    }
    for (size_t s = 0; s < own->size() && s < vc.size(); ++s) {
        vc[s] = std::max(vc[s], (*own)[s]);
    }
    auto out = std::make_shared<Know>(*k);
    out->ctas.erase(std::remove_if(out->ctas.begin(), out->ctas.end(), [&](const auto& e) { return e.first == who; }), out->ctas.end());
    return out;
}

// Released knowledge per location (global or shared address).
std::map<uintptr_t, KnowPtr>& released() {
    static auto* m = new std::map<uintptr_t, KnowPtr>();
    return *m;
}

KnowPtr released_at(uintptr_t key) {
    auto it = released().find(key);
    return it == released().end() ? KnowPtr{} : it->second;
}

// What the host knows (joined from every finished operation when a wait returns), and what every
// finished operation knew.
KnowPtr g_host_know, g_finished_know;

// ---- Shadow words ----------------------------------------------------------------------------------

struct Access {
    uint64_t who = 0;  // 0: none; shared memory: the CTA's own agent id
    uint32_t slot = 0, clock = 0;
    void* pc = nullptr;
    uint8_t bytes = 0;  // which bytes of the word
};

constexpr int kReads = 3;

struct Word {
    Access write;
    Access reads[kReads];
    uint8_t next_read = 0;
};

// Who is accessing, and what it knows.
struct Accessor {
    uint64_t who = 0;
    uint32_t slot = 0;
    const std::vector<uint32_t>* vc = nullptr;  // CTAs: the slot's clock within the CTA
    const Know* know = nullptr;
    uint32_t clock() const { return vc != nullptr ? (*vc)[slot] : 1; }
};

bool ordered(const Access& a, const Accessor& x, uint8_t bytes) {
    if (a.who == 0 || (a.bytes & bytes) == 0) {
        return true;
    }
    if (a.who == x.who) {
        // An operation is one agent; within a CTA, program order or the CTA's clocks.
        return x.vc == nullptr || a.slot == x.slot || a.clock <= (*x.vc)[a.slot];
    }
    return knows(x.know, a.who, a.slot, a.clock);
}

// Checks and records an access to the word `w`. False, with the racing access, when it races.
bool access(Word& w, const Accessor& x, bool write, void* pc, uint8_t bytes, Access* racing, bool* racing_write) {
    if (!ordered(w.write, x, bytes)) {
        *racing = w.write;
        *racing_write = true;
        return false;
    }
    if (write) {
        for (const Access& r : w.reads) {
            if (!ordered(r, x, bytes)) {
                *racing = r;
                *racing_write = false;
                return false;
            }
        }
    }
    const Access now{x.who, x.slot, x.clock(), pc, bytes};
    if (write) {
        if (w.write.who == now.who && w.write.slot == now.slot && w.write.clock == now.clock) {
            w.write.bytes |= bytes;  // the same operation writing the word's next bytes
        } else {
            w.write = now;
        }
        for (Access& r : w.reads) {
            r = Access{};
        }
        return true;
    }
    // Reads: the same agent at the same clock merges; a read this one is ordered after is
    // replaced; otherwise the oldest record goes.
    for (Access& r : w.reads) {
        if (r.who == now.who && r.slot == now.slot && r.clock == now.clock) {
            r.bytes |= bytes;
            r.pc = pc;
            return true;
        }
    }
    for (Access& r : w.reads) {
        if (r.who == 0 || (ordered(r, x, 0xf) && (r.bytes & ~bytes) == 0)) {
            r = now;
            return true;
        }
    }
    w.reads[w.next_read] = now;
    w.next_read = uint8_t((w.next_read + 1) % kReads);
    return true;
}

// The bytes of the word at `word` that [addr, addr + bytes) covers.
uint8_t byte_mask(uintptr_t word, uintptr_t addr, size_t bytes) {
    uint8_t m = 0;
    for (uintptr_t b = 0; b < 4; ++b) {
        if (word + b >= addr && word + b < addr + bytes) {
            m |= uint8_t(1u << b);
        }
    }
    return m;
}

// Global shadow: per allocation (by its data address), per word.
std::map<uintptr_t, std::unordered_map<uintptr_t, Word>>& global_shadow() {
    static auto* m = new std::map<uintptr_t, std::unordered_map<uintptr_t, Word>>();
    return *m;
}

// Checks and records an access to global memory; false with the racing access and its address.
bool global_access(const Accessor& x, uintptr_t addr, size_t bytes, bool write, void* pc, Access* racing, bool* racing_write,
                   uintptr_t* racing_addr) {
    const Region* r = mem_find(addr, bytes);
    if (r == nullptr || bytes == 0) {
        return true;  // not an allocation (a pageable host buffer, or a fault about to be reported)
    }
    auto& words = global_shadow()[r->data];
    for (uintptr_t a = addr & ~uintptr_t(3); a < addr + bytes; a += 4) {
        if (!access(words[a], x, write, pc, byte_mask(a, addr, bytes), racing, racing_write)) {
            *racing_addr = a;
            return false;
        }
    }
    return true;
}

}  // namespace

// ---- Per-CTA state -------------------------------------------------------------------------------

struct RaceState {
    uint64_t who = 0;
    uint32_t threads = 0, slots = 0;
    std::vector<std::vector<uint32_t>> vc;  // [slot][slot]
    std::vector<KnowPtr> know;              // [slot]: beyond the CTA
    std::vector<KnowPtr> pending;           // [slot]: observed by relaxed reads, acquired at the next fence
    std::vector<KnowPtr> fenced;            // [slot]: what the last fence covered (own clock included)
    std::vector<Word> shared;               // per 4-byte word of the window
    std::unordered_map<uint64_t, std::pair<std::vector<uint32_t>, KnowPtr>> phase;  // (mbarrier, phase)
};

namespace {

void join_vc(std::vector<uint32_t>& into, const std::vector<uint32_t>& from) {
    for (size_t i = 0; i < into.size() && i < from.size(); ++i) {
        into[i] = std::max(into[i], from[i]);
    }
}

uint32_t tma_slot(const RaceState& r) { return r.threads; }
uint32_t wgmma_slot(const RaceState& r, uint32_t wg) { return r.threads + 1 + wg; }

std::string slot_name(uint32_t threads, uint32_t slot) {
    char buf[96];
    if (slot < threads) {
        std::snprintf(buf, sizeof buf, "thread %u (warp %u lane %u)", slot, slot / 32, slot % 32);
    } else if (slot == threads) {
        std::snprintf(buf, sizeof buf, "the TMA unit");
    } else {
        std::snprintf(buf, sizeof buf, "warpgroup %u's wgmma", slot - threads - 1);
    }
    return buf;
}

// "thread 3 (warp 0 lane 3) of block (1, 0, 0) of kernel_name", or the operation.
std::string agent_name(uint64_t who, uint32_t slot, uint64_t self) {
    auto it = agents().find(who);
    if (it == agents().end()) {
        return "an unknown agent";
    }
    const Agent& a = it->second;
    if ((who & kCtaBit) == 0) {
        return a.name + " (a stream operation)";
    }
    std::string s = slot_name(a.threads, slot);
    if (who != self) {
        char buf[64];
        std::snprintf(buf, sizeof buf, " of block (%u, %u, %u) of ", a.block.x, a.block.y, a.block.z);
        s += buf + a.name;
    }
    return s;
}

std::string place(void* pc) {
    if (pc == nullptr) {
        return "-";
    }
    void* pcs[1] = {pc};
    std::string s = symbolize(pcs, 1);
    const size_t nl = s.find('\n');
    return nl == std::string::npos ? s : s.substr(0, nl);
}

// Where a global address is, for reports: the allocation and the offset.
std::string global_place(uintptr_t a) {
    const Region* r = mem_find(a, 1);
    char buf[96];
    if (r == nullptr) {
        return hex(a);
    }
    std::snprintf(buf, sizeof buf, "%s (allocation #%llu, byte %llu)", hex(a).c_str(), static_cast<unsigned long long>(r->serial),
                  static_cast<unsigned long long>(a - r->data));
    return buf;
}

std::string race_text(const char* space, const std::string& where, const Access& before, bool before_write, uint64_t who, uint32_t slot,
                      bool write, void* pc, uint64_t self) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "data race on %s memory at %s: a %s and a %s with no happens-before between them", space, where.c_str(),
                  before_write ? "write" : "read", write ? "write" : "read");
    return std::string(buf) + "\n    first   " + (before_write ? "write" : "read") + " by " + agent_name(before.who, before.slot, self) +
           " at " + place(before.pc) + "\n    then    " + (write ? "write" : "read") + " by " + agent_name(who, slot, self) + " at " +
           place(pc) +
           "\n    (no barrier, mbarrier phase, warp collective, release/acquire pattern, stream order or event orders them)";
}

[[noreturn]] void report_thread_race(const std::string& text, void* pc) {
    auto* f = new Failure();
    f->code = CUDA_ERROR_LAUNCH_FAILED;
    const size_t nl = text.find('\n');
    f->title = text.substr(0, nl);
    f->detail = nl == std::string::npos ? "" : text.substr(nl + 1);
    f->where = pc;
    fail_self(f);
}

Accessor accessor(Cta* c, uint32_t slot) {
    RaceState& r = *c->race;
    return Accessor{r.who, slot, &r.vc[slot], r.know[slot].get()};
}

// A thread's plain access (the instrumentation hooks).
void thread_access(uintptr_t addr, size_t bytes, bool write, void* pc) {
    if (!g_races || dksim_current == nullptr) {
        return;
    }
    Thread* t = eng().running;
    if (t == nullptr || !t->cta->race) {
        return;
    }
    Cta* c = t->cta;
    RaceState* r = c->race.get();
    const Accessor x = accessor(c, t->linear);
    Access racing;
    bool racing_write = false;
    const uintptr_t window = c->window->data;
    if (addr >= window && addr < window + c->window_bytes) {
        for (uintptr_t a = addr & ~uintptr_t(3); a < addr + bytes; a += 4) {
            if (!access(r->shared[(a - window) / 4], x, write, pc, byte_mask(a, addr, bytes), &racing, &racing_write)) {
                report_thread_race(race_text("shared", "shared address " + std::to_string(a - window), racing, racing_write, x.who, x.slot,
                                             write, pc, r->who),
                                   pc);
            }
        }
        return;
    }
    uintptr_t at = 0;
    if (!global_access(x, addr, bytes, write, pc, &racing, &racing_write, &at)) {
        report_thread_race(race_text("global", global_place(at), racing, racing_write, x.who, x.slot, write, pc, r->who), pc);
    }
}

// Strong relaxed accesses by kernel code (volatile loads and stores).
void thread_relaxed(uintptr_t addr, bool write) {
    if (!g_races || dksim_current == nullptr) {
        return;
    }
    Thread* t = eng().running;
    if (t == nullptr || !t->cta->race) {
        return;
    }
    if (write) {
        race_relaxed_write(t->cta, t->linear, addr);
    } else {
        race_relaxed_read(t->cta, t->linear, addr);
    }
}

void tick(RaceState& r, uint32_t slot) { ++r.vc[slot][slot]; }

// What `slot` releases: its clock within the CTA, and what it knows beyond.
KnowPtr snapshot(RaceState& r, uint32_t slot) { return with_cta(r.know[slot], r.who, r.vc[slot]); }

void absorb(RaceState& r, uint32_t slot, const KnowPtr& k) {
    if (k) {
        r.know[slot] = join(r.know[slot], split_own(k, r.who, r.vc[slot]));
    }
}

}  // namespace

bool races_enabled() { return g_races; }

void race_init_cta(Cta* c) {
    if (!g_races) {
        return;
    }
    auto r = std::make_unique<RaceState>();
    r->who = kCtaBit | ++g_next_cta;
    r->threads = c->kernel->threads_per_cta;
    r->slots = r->threads + 1 + static_cast<uint32_t>(c->warpgroups.size());
    r->vc.assign(r->slots, std::vector<uint32_t>(r->slots, 0));
    for (uint32_t s = 0; s < r->slots; ++s) {
        r->vc[s][s] = 1;
    }
    const Op* op = c->kernel->op.get();
    r->know.assign(r->slots, op != nullptr ? op->race_know : KnowPtr{});
    r->pending.assign(r->slots, KnowPtr{});
    r->fenced.assign(r->slots, KnowPtr{});
    r->shared.assign(c->window_bytes / 4 + 1, Word{});
    Agent& a = agents()[r->who];
    a.stream = op != nullptr ? op->stream->id : 0;
    a.op = op != nullptr ? op->id : 0;
    a.threads = r->threads;
    a.block = c->idx;
    a.name = c->kernel->name;
    c->race = std::move(r);
}

void race_retire_cta(Cta* c) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    if (c->kernel->op) {
        Op& op = *c->kernel->op;
        for (const KnowPtr& k : r->know) {
            op.race_acc = join(op.race_acc, k);
        }
    }
    if (c->window != nullptr) {
        race_forget(c->window->data, c->window_bytes);
    }
    c->race.reset();
}

void race_barrier(Cta* c, const std::vector<Thread*>& threads) {
    RaceState* r = c->race.get();
    if (r == nullptr || threads.empty()) {
        return;
    }
    std::vector<uint32_t> all(r->slots, 0);
    KnowPtr know;
    for (const Thread* t : threads) {
        join_vc(all, r->vc[t->linear]);
        know = join(know, r->know[t->linear]);
    }
    for (const Thread* t : threads) {
        r->vc[t->linear] = all;
        r->know[t->linear] = know;
        tick(*r, t->linear);
    }
}

void race_release(Cta* c, uint32_t slot, uintptr_t key) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    KnowPtr& rel = released()[key];
    rel = join(rel, snapshot(*r, slot));
    tick(*r, slot);
}

void race_acquire(Cta* c, uint32_t slot, uintptr_t key) {
    RaceState* r = c->race.get();
    if (r != nullptr) {
        absorb(*r, slot, released_at(key));
    }
}

void race_relaxed_read(Cta* c, uint32_t slot, uintptr_t key) {
    RaceState* r = c->race.get();
    if (r != nullptr) {
        r->pending[slot] = join(r->pending[slot], released_at(key));
    }
}

void race_relaxed_write(Cta* c, uint32_t slot, uintptr_t key) {
    RaceState* r = c->race.get();
    if (r != nullptr && r->fenced[slot]) {
        KnowPtr& rel = released()[key];
        rel = join(rel, r->fenced[slot]);
    }
}

void race_fence(Cta* c, uint32_t slot) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    absorb(*r, slot, r->pending[slot]);
    r->pending[slot].reset();
    r->fenced[slot] = snapshot(*r, slot);
    tick(*r, slot);
}

void race_phase_arrive(Cta* c, uint32_t slot, uint32_t bar, uint64_t phase, const RaceStamp* unit) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    auto& p = r->phase[(uint64_t(bar) << 32) | (phase & 0xffffffffu)];
    p.first.resize(r->slots, 0);
    join_vc(p.first, unit != nullptr ? unit->clock : r->vc[slot]);
    p.second = join(p.second, unit != nullptr ? unit->know : r->know[slot]);
    if (unit == nullptr) {
        tick(*r, slot);
    }
}

void race_phase_acquire(Cta* c, uint32_t slot, uint32_t bar, uint64_t completed_phase) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    auto it = r->phase.find((uint64_t(bar) << 32) | (completed_phase & 0xffffffffu));
    if (it != r->phase.end()) {
        join_vc(r->vc[slot], it->second.first);
        r->know[slot] = join(r->know[slot], it->second.second);
    }
}

RaceStamp race_unit_op(Cta* c, bool tma, uint32_t wg, const std::vector<Thread*>& issuers) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return {};
    }
    const uint32_t unit = tma ? tma_slot(*r) : wgmma_slot(*r, wg);
    for (const Thread* t : issuers) {
        join_vc(r->vc[unit], r->vc[t->linear]);
        r->know[unit] = join(r->know[unit], r->know[t->linear]);
    }
    tick(*r, unit);
    return RaceStamp{r->vc[unit], r->know[unit]};
}

bool race_unit_access(Cta* c, bool tma, uint32_t wg, const RaceStamp& stamp, uint32_t shared_addr, uint32_t bytes, bool write, void* pc,
                      std::string* report) {
    RaceState* r = c->race.get();
    if (r == nullptr || stamp.clock.empty()) {
        return true;
    }
    const Accessor x{r->who, tma ? tma_slot(*r) : wgmma_slot(*r, wg), &stamp.clock, stamp.know.get()};
    for (uint32_t a = shared_addr & ~3u; a < shared_addr + bytes; a += 4) {
        Access racing;
        bool racing_write = false;
        if (!access(r->shared[a / 4], x, write, pc, byte_mask(a, shared_addr, bytes), &racing, &racing_write)) {
            *report = race_text("shared", "shared address " + std::to_string(a), racing, racing_write, x.who, x.slot, write, pc, r->who);
            return false;
        }
    }
    return true;
}

bool race_unit_global(Cta* c, const RaceStamp& stamp, uintptr_t addr, size_t bytes, bool write, void* pc, std::string* report) {
    RaceState* r = c->race.get();
    if (r == nullptr || stamp.clock.empty()) {
        return true;
    }
    const Accessor x{r->who, tma_slot(*r), &stamp.clock, stamp.know.get()};
    Access racing;
    bool racing_write = false;
    uintptr_t at = 0;
    if (!global_access(x, addr, bytes, write, pc, &racing, &racing_write, &at)) {
        *report = race_text("global", global_place(at), racing, racing_write, x.who, x.slot, write, pc, r->who);
        return false;
    }
    return true;
}

void race_join_unit(Cta* c, uint32_t slot, bool tma, uint32_t wg) {
    RaceState* r = c->race.get();
    if (r == nullptr) {
        return;
    }
    const uint32_t unit = tma ? tma_slot(*r) : wgmma_slot(*r, wg);
    join_vc(r->vc[slot], r->vc[unit]);
    r->know[slot] = join(r->know[slot], r->know[unit]);
}

// ---- Stream operations ---------------------------------------------------------------------------

void race_op_enqueued(Op* op) {
    if (g_races) {
        op->race_know = g_host_know;
    }
}

void race_op_started(Op* op) {
    if (!g_races) {
        return;
    }
    KnowPtr k = join(op->race_know, op->stream->race_know);
    for (const OpPtr& d : op->deps) {
        k = join(k, d->race_done);
    }
    op->race_know = k;
    op->race_started = true;
    if (op->kind != OpKind::Kernel) {
        Agent& a = agents()[op->id];
        a.stream = op->stream->id;
        a.op = op->id;
        a.name = op->api;
    }
}

bool race_op_access(Op* op, uintptr_t addr, size_t bytes, bool write, std::string* report) {
    if (!g_races) {
        return true;
    }
    const Accessor x{op->id, 0, nullptr, op->race_know.get()};
    Access racing;
    bool racing_write = false;
    uintptr_t at = 0;
    if (!global_access(x, addr, bytes, write, nullptr, &racing, &racing_write, &at)) {
        *report = race_text("global", global_place(at), racing, racing_write, x.who, 0, write, nullptr, 0);
        return false;
    }
    return true;
}

void race_op_release(Op* op, uintptr_t key) {
    if (g_races) {
        KnowPtr& rel = released()[key];
        rel = join(rel, op->race_know);
    }
}

void race_op_acquire(Op* op, uintptr_t key) {
    if (g_races) {
        op->race_acc = join(op->race_acc, released_at(key));
    }
}

void race_op_finished(Op* op) {
    if (!g_races) {
        return;
    }
    if (!op->race_started) {
        race_op_started(op);  // an operation that never ran (its stream had failed)
    }
    auto mine = std::make_shared<Know>();
    mine->streams.emplace_back(op->stream->id, op->id);
    KnowPtr done = join(join(op->race_know, op->race_acc), mine);
    op->race_done = done;
    op->race_know.reset();
    op->race_acc.reset();
    op->stream->race_know = done;
    g_finished_know = join(g_finished_know, done);
}

void race_ops_meet(const std::vector<Op*>& ops) {
    if (!g_races) {
        return;
    }
    KnowPtr all;
    for (Op* op : ops) {
        auto own = std::make_shared<Know>();
        own->streams.emplace_back(op->stream->id, op->id);
        all = join(join(all, op->race_know), own);
    }
    for (Op* op : ops) {
        op->race_know = all;
    }
}

void race_host_synchronised() {
    if (g_races) {
        g_host_know = g_finished_know;
    }
}

void race_forget(uintptr_t begin, size_t bytes) {
    if (!g_races) {
        return;
    }
    global_shadow().erase(begin);
    auto& rel = released();
    rel.erase(rel.lower_bound(begin), rel.lower_bound(begin + bytes));
}

Cta::Cta() = default;
Cta::~Cta() = default;

}  // namespace dksim

// ---- The instrumentation's hooks (what -fsanitize=thread calls) -----------------------------------

#define DKSIM_HOOK extern "C" __attribute__((visibility("default")))

DKSIM_HOOK void __tsan_init() { dksim::g_races = true; }
DKSIM_HOOK void __tsan_func_entry(void*) {}
DKSIM_HOOK void __tsan_func_exit() {}
DKSIM_HOOK void __tsan_vptr_update(void**, void*) {}
DKSIM_HOOK void __tsan_vptr_read(void**) {}

#define DKSIM_RW(N)                                                                                            \
    DKSIM_HOOK void __tsan_read##N(void* a) { dksim::thread_access(reinterpret_cast<uintptr_t>(a), N, false, __builtin_return_address(0)); } \
    DKSIM_HOOK void __tsan_write##N(void* a) { dksim::thread_access(reinterpret_cast<uintptr_t>(a), N, true, __builtin_return_address(0)); } \
    DKSIM_HOOK void __tsan_unaligned_read##N(void* a) {                                                        \
        dksim::thread_access(reinterpret_cast<uintptr_t>(a), N, false, __builtin_return_address(0));            \
    }                                                                                                          \
    DKSIM_HOOK void __tsan_unaligned_write##N(void* a) {                                                       \
        dksim::thread_access(reinterpret_cast<uintptr_t>(a), N, true, __builtin_return_address(0));             \
    }                                                                                                          \
    DKSIM_HOOK void __tsan_volatile_read##N(void* a) { dksim::thread_relaxed(reinterpret_cast<uintptr_t>(a), false); }                 \
    DKSIM_HOOK void __tsan_volatile_write##N(void* a) { dksim::thread_relaxed(reinterpret_cast<uintptr_t>(a), true); }
DKSIM_RW(1)
DKSIM_RW(2)
DKSIM_RW(4)
DKSIM_RW(8)
DKSIM_RW(16)
#undef DKSIM_RW

DKSIM_HOOK void __tsan_read_range(void* a, unsigned long n) {
    dksim::thread_access(reinterpret_cast<uintptr_t>(a), n, false, __builtin_return_address(0));
}
DKSIM_HOOK void __tsan_write_range(void* a, unsigned long n) {
    dksim::thread_access(reinterpret_cast<uintptr_t>(a), n, true, __builtin_return_address(0));
}
DKSIM_HOOK void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
    dksim::thread_access(reinterpret_cast<uintptr_t>(s), n, false, __builtin_return_address(0));
    dksim::thread_access(reinterpret_cast<uintptr_t>(d), n, true, __builtin_return_address(0));
    return std::memcpy(d, s, n);
}
DKSIM_HOOK void* __tsan_memmove(void* d, const void* s, unsigned long n) {
    dksim::thread_access(reinterpret_cast<uintptr_t>(s), n, false, __builtin_return_address(0));
    dksim::thread_access(reinterpret_cast<uintptr_t>(d), n, true, __builtin_return_address(0));
    return std::memmove(d, s, n);
}
DKSIM_HOOK void* __tsan_memset(void* d, int c, unsigned long n) {
    dksim::thread_access(reinterpret_cast<uintptr_t>(d), n, true, __builtin_return_address(0));
    return std::memset(d, c, n);
}

// C++ atomics in instrumented code (the launchers' function-local statics use them for their
// guards): performed as they are, outside the race detector (host code, not kernel code).
#define DKSIM_ATOMIC_HOOKS(N, T)                                                                                         \
    DKSIM_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }      \
    DKSIM_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }      \
    DKSIM_HOOK T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    DKSIM_HOOK T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    DKSIM_HOOK T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    DKSIM_HOOK T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    DKSIM_HOOK T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
    DKSIM_HOOK T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    DKSIM_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                      \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                           \
    }                                                                                                                    \
    DKSIM_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                        \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                            \
    }                                                                                                                    \
    DKSIM_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                           \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                 \
        return c;                                                                                                        \
    }
DKSIM_ATOMIC_HOOKS(8, uint8_t)
DKSIM_ATOMIC_HOOKS(16, uint16_t)
DKSIM_ATOMIC_HOOKS(32, uint32_t)
DKSIM_ATOMIC_HOOKS(64, uint64_t)
#undef DKSIM_ATOMIC_HOOKS
DKSIM_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
DKSIM_HOOK void __tsan_atomic_signal_fence(int) {}
