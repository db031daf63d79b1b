// Internal structures of the simulator: the device model, streams and their operations, kernels,
// CTAs, warps and simulated threads, and the scheduler that runs them as fibers.
//
// Concurrency: one mutex (`g.mu`) guards everything. Host threads take it in every driver call.
// All simulated threads run as fibers on one dedicated OS thread (the "GPU thread"), which holds
// the mutex while a fiber runs; the operations in thread_ops.cpp therefore run with it held.
#pragma once

#include <cuda.h>

#include <atomic>
#include <condition_variable>
#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dksim/abi.h"
#include "races.hpp"
#include "tensormap.hpp"

namespace dksim {

// ---- Configuration (environment, read once) ---------------------------------------------------

struct Config {
    uint64_t seed = 0;           // DEEPKERN_SIM_SEED
    bool seed_from_env = false;
    int sms = 132;               // DEEPKERN_SIM_SMS
    int devices = 1;             // DEEPKERN_SIM_DEVICES
    int live_ctas = 8;           // DEEPKERN_SIM_LIVE_CTAS: CTAs whose threads run interleaved
    int poison = 0xff;           // DEEPKERN_SIM_POISON: byte fresh memory is filled with (-1: off)
    int yield_percent = 25;      // DEEPKERN_SIM_YIELD: chance to switch threads at a non-blocking op
    int watchdog_s = 120;        // DEEPKERN_SIM_WATCHDOG: seconds one thread may run without an op
    int grace_ms = 3000;         // how long a stuck device waits for more host work
    size_t memory = size_t(80) << 30;  // reported device memory
    bool verbose = false;        // DEEPKERN_SIM_VERBOSE
};
const Config& config();

// ---- Random numbers (deterministic per seed) -----------------------------------------------

struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }
    bool percent(int p) { return below(100) < uint64_t(p); }
};

// ---- Memory ------------------------------------------------------------------------------------

enum class MemKind : uint8_t { Device, Host, Shared, Stack };

// One mapping with guard pages: [guard][slack][data ... end][guard]. `data` ends where the back
// guard page begins, so running off the end faults at once.
struct Region {
    MemKind kind;
    uintptr_t map_start = 0;
    size_t map_len = 0;
    uintptr_t data = 0;
    size_t size = 0;      // bytes the caller asked for
    size_t span = 0;      // bytes from data to the back guard (size rounded up)
    bool freed = false;
    uint64_t serial = 0;  // allocation number, for reports
    // Shared windows: a second mapping of the same memory, always writable, through which the
    // simulator's own units (TMA) write, so they never trip the proxy tracking's protection.
    uintptr_t alias = 0;  // the data's address in that mapping
    uintptr_t alias_map = 0;
    size_t alias_len = 0;
};

// Device and host allocations (cuMemAlloc, cuMemHostAlloc).
Region* mem_alloc(MemKind kind, size_t bytes, size_t align, bool poison);
CUresult mem_free(uintptr_t base, MemKind kind);
// The live allocation containing [p, p + bytes), or null.
const Region* mem_find(uintptr_t p, size_t bytes);
// Any region (live, freed or guard) whose mapping contains p, for fault reports.
const Region* mem_find_mapping(uintptr_t p);
// A fresh mapping for a CTA's shared window or a thread's stack; not in the allocation map's
// device view. Released with mem_release.
Region* mem_map(MemKind kind, size_t bytes, size_t align);
// A CTA's shared window: 1024-aligned, ending at a guard page, with an alias mapping (Region::alias).
Region* mem_map_shared(size_t bytes);
// The host refused a mapping the engine cannot do without (a stack, a shared window): reports
// what the process holds and aborts.
[[noreturn]] void mem_exhausted(const char* what, size_t bytes);
void mem_release(Region* r);
size_t page_bytes();
size_t mem_in_use();
// Device allocations whose alignment slack (the bytes past the end up to the next 256 bytes, and
// before the start inside its first page: no guard page can catch those) no longer holds the
// poison byte: one line per allocation, empty if none. Restores the bytes.
std::string mem_check_canaries();

// ---- Fibers --------------------------------------------------------------------------------------

struct Stack {
    Region* region = nullptr;  // its own mapping between guard pages, or null (from a slab)
    uintptr_t top = 0;
    uintptr_t canary = 0;  // slab stacks: the red-zone pattern below the stack, else 0
};
Stack stack_get();
void stack_put(Stack s);
// False once a slab stack's red zone was written (the thread overflowed its stack).
bool stack_intact(const Stack& s);
size_t stack_bytes();
// Prepares `sp` so that switching to it calls fn(arg) on the stack.
void* fiber_init(const Stack& s, void (*fn)(void*), void* arg);
extern "C" void dksim_fiber_switch(void** save_sp, void* next_sp);

// ---- Device model -------------------------------------------------------------------------------

constexpr int kSmMaxThreads = 2048;
constexpr int kSmMaxWarps = 64;
constexpr int kSmMaxCtas = 32;
constexpr int kSmRegisters = 65536;
constexpr int kSmSharedBytes = 233472;       // 228 KiB
constexpr int kCtaReservedShared = 1024;     // per CTA, for the system
constexpr int kMaxSharedPerCta = 232448;     // 227 KiB: the opt-in limit
constexpr int kDefaultMaxDynamicShared = 49152;

struct Sm {
    int threads = 0, warps = 0, ctas = 0, registers = 0, shared = 0;
};

struct KernelInfo;
struct Kernel;
struct Cta;
struct Warp;
struct Thread;
struct Stream;
struct RaceState;
struct Context;

// What a kernel function is, from the resource table and cudaFuncSetAttribute.
struct KernelInfo {
    const void* fn = nullptr;
    std::string name;
    int registers = 0;  // 0: unknown (no ptxas entry)
    int static_smem = 0;
    int stack_frame = 0;
    bool from_table = false;
    int max_dynamic_smem = kDefaultMaxDynamicShared;
};
KernelInfo& kernel_info(const void* fn, const char* pretty);

// ---- Streams and their operations ---------------------------------------------------------------

enum class OpKind : uint8_t { Kernel, Copy, Memset, Record, WaitEvent, WriteValue, WaitValue, HostFunc, Barrier, Free, Comm };

// The NCCL stand-in's communication (comm.hpp): an operation of kind Comm takes part in one or
// more tasks (a collective, or one send matched with its receive), each in one role.
struct CommTask;
struct CommPart {
    std::shared_ptr<CommTask> task;
    int role = 0;
};

struct Copy {
    uintptr_t dst, src;
    size_t bytes;
};

struct Op {
    uint64_t id = 0;
    OpKind kind = OpKind::Barrier;
    Stream* stream = nullptr;
    std::vector<std::shared_ptr<Op>> deps;  // must be done before this starts (besides stream order)
    bool started = false;
    bool done = false;
    CUresult result = CUDA_SUCCESS;
    uint64_t done_at_ns = 0;  // virtual time of completion
    const char* api = "";     // the API call that enqueued it, for reports
    // payloads
    std::vector<Copy> copies;
    std::vector<uint8_t> staging;  // pageable host sources, copied when the copy was enqueued
    uintptr_t addr = 0;
    uint64_t value = 0;
    uint32_t elem = 1;    // memset element size
    size_t count = 0;     // memset elements
    uint32_t flags = 0;   // wait/write value flags
    bool value64 = false;
    CUhostFn host_fn = nullptr;
    void* host_data = nullptr;
    Kernel* kernel = nullptr;
    std::vector<CommPart> comm;  // OpKind::Comm: the tasks it takes part in
    // Race mode (races.cpp): what the operation knows (from the host at enqueue, then from its
    // stream and dependencies at start), what it learned while running, and what it knew when done.
    KnowPtr race_know, race_acc, race_done;
    bool race_started = false;
};
using OpPtr = std::shared_ptr<Op>;

struct Stream {
    uint64_t id = 0;
    Context* ctx = nullptr;
    bool blocking = true;  // synchronises with the legacy default stream
    bool legacy = false;   // the legacy default stream (handle 0)
    std::deque<OpPtr> queue;  // not yet done, in order
    OpPtr last;               // most recently enqueued
    CUresult error = CUDA_SUCCESS;  // sticky: the first failure of an operation here
    bool destroyed = false;
    KnowPtr race_know;  // race mode: what the last finished operation knew
};

struct Event {
    OpPtr record;  // the latest cuEventRecord
    unsigned flags = 0;
    Context* ctx = nullptr;
};

struct Context {
    int device = 0;
    bool primary = true;
    int refs = 0;
    Stream* legacy = nullptr;
    std::vector<Stream*> streams;
};

// ---- Kernels, CTAs, warps, threads -----------------------------------------------------------

enum class ThreadState : uint8_t { Runnable, Blocked, Parked, Exited };

// What a blocked or polling thread waits on, for deadlock reports.
struct WaitInfo {
    const char* what = "";  // e.g. "bar.sync", "shfl.sync", "ld.acquire (spinning)"
    uint64_t a = 0, b = 0, c = 0;
    void* where = nullptr;  // return address inside kernel code
};

struct Thread {
    ThreadCtx ctx;  // first: dksim_current points here
    Cta* cta = nullptr;
    Warp* warp = nullptr;
    uint32_t linear = 0, lane = 0;
    ThreadState state = ThreadState::Runnable;
    Stack stack;
    void* sp = nullptr;
    size_t runnable_slot = SIZE_MAX;
    WaitInfo wait;
    // Spin detection: the last poll, and the device's progress count when it happened.
    const void* poll_addr = nullptr;
    uint64_t poll_value = 0;
    uint64_t poll_progress = UINT64_MAX;
    uint32_t poll_streak = 0;
    // Polls in a row that saw an unchanged value at an address the thread polled recently (the
    // last few addresses: a loop may poll a flag and sleep in turn), and what they saw.
    uint32_t poll_fruitless = 0;
    std::array<std::pair<const void*, uint64_t>, 4> poll_seen{};
    uint32_t poll_seen_next = 0;
    uint64_t wake_at = 0;  // parked: the device's progress count at which it polls again
    uint32_t coll_result = 0;
    bool started = false;
    uint64_t cluster_phase = UINT64_MAX;  // the barrier.cluster phase it arrived in, until its wait
    int bulk_commits = 0;           // cp.async.bulk groups committed
    bool global_proxy_fence = false;  // acquired another kernel's writes: TMA loads need fence.proxy.async.global first
};

// A warp collective (shfl, vote, syncwarp) waiting for the lanes of its mask.
struct Collective {
    int kind = 0;  // 1 + Shfl, 10 + Vote, 20 syncwarp
    uint32_t mask = 0;
    uint32_t arrived = 0;
    uint32_t values[32] = {};
    int b[32] = {};
    int c = 0;
    void* where = nullptr;
};

struct Warp {
    Cta* cta = nullptr;
    uint32_t index = 0;
    uint32_t lanes = 0;   // mask of lanes that exist (the last warp may be partial)
    uint32_t exited = 0;  // lanes that returned
    std::vector<Collective> pending;
};

// A named barrier (bar.sync id): arrivals per warp; a warp has arrived when all its non-exited
// lanes have.
struct NamedBarrier {
    uint32_t count = 0;  // declared threads (0: the whole CTA); fixed by the first arrival
    std::vector<uint32_t> arrived;  // per warp: lanes arrived
    uint32_t warps_arrived = 0;
    std::vector<Thread*> waiters;
    void* where = nullptr;
};

// An mbarrier object (the simulator keeps its state beside shared memory, keyed by its address).
struct MBarrier {
    uint32_t count = 0;    // arrivals per phase
    uint32_t pending = 0;  // arrivals still missing in the current phase
    int64_t tx = 0;        // transaction bytes still expected in the current phase
    uint64_t phase = 0;    // phases completed
};

// A TMA load or store in flight.
struct AsyncCopy {
    bool store = false;
    TensorMap map{};
    int32_t x = 0, y = 0;
    uint32_t smem = 0;       // shared address of the box
    uint32_t bar = 0;        // loads: the mbarrier they complete on
    uint64_t bar_phase = 0;  // loads: its phase when they were issued
    uint32_t bytes = 0;
    uint32_t thread = 0;     // the issuing thread (linear index in the CTA)
    int group = -1;          // stores: the issuer's bulk async-group (-1 until committed)
    bool read = false;       // stores: shared memory read into `data`
    std::vector<uint8_t> data;
    void* where = nullptr;
    RaceStamp race;  // race mode: the TMA unit's clock for this operation
};

// Accumulator registers a warpgroup handed to wgmma: the values the asynchronous unit holds until
// a wait returns them to the threads' registers (`regs`, one array of n / 2 floats per thread).
struct Accumulators {
    int n = 0;
    std::vector<float> v;  // [64][n]
    float* regs[128] = {};
    int pending = 0;       // issued operations not yet executed
};

struct MmaOp {
    MmaType type = MmaType::E4M3;
    int n = 0;
    bool b_mn_major = false;
    uint64_t desc_a = 0, desc_b = 0;
    bool scale_d = false;
    int group = 0;  // the warpgroup's commit count when issued
    std::shared_ptr<Accumulators> acc;
    void* where = nullptr;
    RaceStamp race;  // race mode: the wgmma unit's clock for this operation
};

// A warpgroup's wgmma state, and the rendezvous its .sync.aligned instructions meet at.
struct Warpgroup {
    std::deque<MmaOp> ops;  // issued, not yet executed (executed in order)
    int commits = 0;
    std::vector<std::shared_ptr<Accumulators>> accs;
    int rv_kind = 0;
    uint32_t rv_arrived = 0;
    uint64_t rv_a = 0, rv_b = 0, rv_c = 0;
    float* rv_regs[128] = {};
    std::vector<Thread*> rv_waiters;
    void* rv_where = nullptr;
};

// The CTAs of one cluster (a launch with a cluster dimension): placed and made live together,
// their windows reachable from each other by rank (distributed shared memory), and barrier.cluster.
struct Cluster {
    std::vector<Cta*> ctas;     // by rank; null once that CTA has exited
    uint32_t released = 0;      // CTAs gone (the cluster goes with the last)
    uint32_t live_threads = 0;  // threads of its CTAs not exited: barrier.cluster's count
    uint32_t arrived = 0;       // barrier.cluster arrivals in the current phase
    uint64_t phase = 0;         // barrier.cluster phases completed
    std::vector<Thread*> waiters;
};

struct Cta {
    Kernel* kernel = nullptr;
    uint3 idx{};
    uint64_t linear = 0;
    Cluster* cluster = nullptr;  // cluster launches only
    uint32_t rank = 0;           // %cluster_ctarank
    int sm = -1;
    bool live = false;
    std::vector<std::unique_ptr<Thread>> threads;
    std::vector<Warp> warps;
    NamedBarrier bars[16];
    uint32_t running = 0;  // threads not exited
    // Shared memory: [reserved 1 KiB][static][dynamic], shared addresses from 0.
    Region* window = nullptr;
    uint32_t window_bytes = 0;
    uint32_t static_base = 0, static_top = 0, static_end = 0, dynamic_base = 0;
    std::vector<std::pair<const void*, uint32_t>> statics;  // declaration tag -> offset
    // Hopper's asynchronous units.
    std::map<uint32_t, MBarrier> mbarriers;  // by shared address
    std::vector<std::unique_ptr<AsyncCopy>> copies;
    std::vector<Warpgroup> warpgroups;
    std::vector<int> warp_registers;  // setmaxnreg: registers per thread of each warp
    int free_registers = 0;           // the CTA's pool, released by setmaxnreg.dec
    bool async_listed = false;        // in Engine::async_ctas
    // Proxy tracking, from the CTA's first use of the async proxy (TMA, wgmma): its window is
    // read-only to kernel code; the first generic write to a page after a
    // fence.proxy.async.shared::cta opens it (a snapshot is kept, the page made writable), and a
    // TMA store or wgmma reading bytes of an open page that differ from the snapshot reads
    // generic-proxy writes no fence ordered: a failure. A fence closes every open page. Generic
    // writes before arming count too: unless a fence ran before, arming opens each page that
    // differs from the CTA's initial contents, with those as its snapshot.
    bool proxy_armed = false;
    bool proxy_fenced = false;  // a fence.proxy.async.shared::cta ran (before arming: generic writes so far are ordered)
    std::map<uintptr_t, std::vector<uint8_t>> proxy_open;  // kernel-view page -> its contents when opened
    std::unique_ptr<RaceState> race;  // race mode only (races.cpp)
    Cta();
    ~Cta();
};

struct Kernel {
    uint64_t serial = 0;
    KernelInfo* info = nullptr;
    std::string name;
    KernelEntry entry = nullptr;
    void* args = nullptr;
    ArgsDeleter deleter = nullptr;
    dim3 grid{}, block{};
    uint32_t threads_per_cta = 0;
    uint32_t dynamic_smem = 0;
    uint64_t ctas_total = 0;
    uint32_t cluster_size = 1;  // CTAs per cluster, along x
    uint64_t next_cta = 0;   // next to make resident
    uint64_t ctas_done = 0;
    std::vector<Cta*> resident;  // resident CTAs (live or waiting to start)
    int device = 0;
    OpPtr op;
    bool failed = false;
    // SM resources one CTA takes
    int cta_threads = 0, cta_warps = 0, cta_registers = 0, cta_shared = 0;
    ~Kernel();
};

// ---- The engine -------------------------------------------------------------------------------

struct Waiter {
    std::function<bool()> ready;
    bool query = false;  // answered as soon as the device cannot progress (a query, not a wait)
    bool done = false;
    std::condition_variable cv;
};

// A failure of a kernel (fault, trap, deadlock, bad operation), reported once.
struct Failure {
    CUresult code = CUDA_ERROR_LAUNCH_FAILED;
    std::string title;   // one line: what happened
    std::string detail;  // further lines
    void* where = nullptr;  // kernel-code address to symbolize
};

struct Engine {
    std::mutex mu;
    std::condition_variable gpu_cv;  // wakes the GPU thread
    std::thread gpu;
    bool gpu_started = false;
    std::thread::id gpu_id;
    std::vector<Waiter*> waiters;

    Rng rng{1};
    uint64_t next_op_id = 1;
    uint64_t next_kernel_serial = 1;
    uint64_t next_stream_id = 1;

    std::vector<Sm> sms;  // devices × config().sms
    std::vector<Context*> primary;  // per device
    std::vector<Kernel*> active;    // kernels whose op has started, in start order
    std::vector<Thread*> runnable;
    std::vector<Thread*> parked;
    // Threads of cluster CTAs held back at their start (launch skew between the CTAs of a cluster):
    // released when nothing else can run.
    std::vector<Thread*> held;
    size_t live_ctas = 0;
    std::vector<Stream*> streams;

    // Progress accounting for stuck detection: bumped by every operation that changes state.
    uint64_t progress = 0;
    uint64_t next_wake = UINT64_MAX;  // the least wake_at of the parked threads
    int time_jumps = 0;
    uint64_t vtime_ns = 1'000'000'000;  // virtual time
    uint64_t steps = 0;                 // fiber segments run (watchdog)
    std::chrono::steady_clock::time_point host_activity;
    // When virtual time last jumped: while a host thread is busy (not waiting on the device), each
    // jump needs a full grace period of its own, so host work that takes seconds of wall time
    // lets only a few seconds of virtual time pass, not every timeout in the process.
    std::chrono::steady_clock::time_point last_jump;

    std::vector<Cta*> waiting_ctas;  // resident, not yet live
    std::vector<Cta*> async_ctas;    // live CTAs with TMA or wgmma operations in flight
    size_t sm_cursor = 0;
    bool pump_needed = true;       // an operation was enqueued or finished: look at the streams
    int wait_values = 0;           // cuStreamWaitValue operations waiting
    // Host callbacks (cuLaunchHostFunc) run on a thread of their own, as the driver's do.
    std::deque<OpPtr> callbacks;
    std::condition_variable callback_cv;
    int callbacks_running = 0;

    Thread* running = nullptr;  // the fiber now running, if any
    void* sched_sp = nullptr;   // the GPU thread's own context while a fiber runs
    Failure* pending_failure = nullptr;  // set by a fiber that must end its kernel
    uint64_t failures = 0;
};
Engine& eng();

// Marks a state change (wakes spinning threads, resets the stuck counters).
inline void made_progress() { ++eng().progress; }

// Host side (lock held): enqueue and wait.
void host_activity();
// Marks `op` done with `result` (the engine's lock held; any thread).
void finish_operation(const OpPtr& op, CUresult result);
OpPtr enqueue(Stream* s, OpKind kind, const char* api);
// Blocks the calling host thread until `ready()` holds (the GPU thread runs meanwhile).
void wait_until(std::unique_lock<std::mutex>& lock, std::function<bool()> ready);
// Runs the device until `ready()` holds or nothing can progress without more host work.
void drive(std::unique_lock<std::mutex>& lock, std::function<bool()> ready);
Stream* stream_of(CUstream s);  // null for invalid handles
Context* current_context();
void ensure_started();

// Thread side (called from fibers).
Thread* self();
void yield_maybe();
void block_self(const WaitInfo& w);
void wake(Thread* t);
void poll_self(const void* addr, uint64_t value, const WaitInfo& w);
[[noreturn]] void fail_self(Failure* f);
// fail_self with a failure of `code` whose title is the formatted message, at kernel address `at`.
[[noreturn]] void fail(CUresult code, void* at, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void exit_self();

// Hopper's asynchronous units (async_ops.cpp): progress one operation in flight (a TMA transfer,
// or a wgmma reading its operands), chosen by the seed; false if none. When a CTA ends: fails for
// work still in flight that would touch its shared memory (the description in *out), and finishes
// stores that only have their global writes left.
bool async_progress();
// Ends kernel k with failure f (reports it), from the engine's side.
void fail_kernel(Kernel* k, Failure* f);
bool async_on_cta_exit(Cta* c, Failure** out);
void async_drop_cta(Cta* c);
// Describes what a thread waiting at an mbarrier or a warpgroup instruction waits for.
std::string async_describe_wait(const Cta* c, const WaitInfo& w);
// Initial register pool of a CTA that starts (setmaxnreg).
void async_init_cta(Cta* c);

// When a thread exits: the warp collectives that now cannot complete (a failure, returned in
// *out), and the named barriers (and the cluster barrier) its exit completes.
bool collectives_on_exit(Thread* t, Failure** out);
void named_barriers_on_exit(Thread* t);
void cluster_barrier_on_exit(Thread* t);

// Reports.
std::string describe_thread(const Thread* t);
// One line per address: file:line (function), inlined frames joined by " <- ".
// A demangled function signature cut before its parameter list ("ns::f<(a, b)>(int)" -> "ns::f<(a, b)>").
std::string without_parameters(const std::string& signature);
std::string symbolize(void* const* addrs, size_t n);
void report_failure(const Failure& f, const Kernel* k, const Thread* t);
std::string hex(uint64_t v);

// Installs the fault handlers (on the GPU thread, after the host program's own).
void install_fault_handlers();
void gpu_thread_signal_stack();

}  // namespace dksim
