// The NCCL stand-in: libnccl.so of a simulated build. The ranks of a communicator are host threads
// of this process (one per rank, each on its own simulated device, or one thread driving several
// ranks inside ncclGroupStart/End); there is no network and no NCCL algorithm. What is modelled is
// what a program can observe of NCCL:
//
// - Matching, on the host: a rank's call (or its group, at ncclGroupEnd) is posted to the
//   communicator, and the calling thread waits until every peer has posted the matching part:
//   collectives by their number on the communicator, sends and receives by (sender, receiver,
//   order). Parts that disagree (kind, count, type, operation, root) are reported and every poster
//   gets ncclInvalidUsage. A peer that never posts is reported, not waited for forever: at once
//   when every rank of the communicator waits for another (they posted different operations) or
//   a peer destroyed its communicator, otherwise once nothing in the process has changed for
//   DEEPKERN_SIM_NCCL_TIMEOUT seconds (default 30); the posters get ncclRemoteError.
// - Stream order, on the device: each rank then enqueues one stream operation per stream (engine
//   side: comm.hpp, collective.cpp), which reads and writes the buffers when every participant's
//   stream has reached its part, and finishes only then.
//
// Reports go to stderr and, as kernel failures do, make the process exit with status 101.
#include "nccl.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <tuple>

#include "comm.hpp"
#include "sim.hpp"

#define DKSIM_API extern "C" __attribute__((visibility("default")))

struct ncclComm {};  // the handle type; a handle points at a dksim::Member's Comm

namespace dksim {
namespace {

using Lock = std::unique_lock<std::mutex>;

constexpr uint64_t kIdMagic = 0x6c'63'63'6e'6d'69'73'64ull;  // "dsimnccl"

struct IdBody {
    uint64_t magic;
    uint64_t pid;
    uint64_t serial;
};
static_assert(sizeof(IdBody) <= sizeof(ncclUniqueId), "unique id");

struct Clique;

struct Comm : ncclComm {
    Clique* clique = nullptr;
    int rank = 0;
    int device = 0;
    bool finalized = false;
    const char* gone = nullptr;  // the call that ended it (ncclCommDestroy, ncclCommAbort)
    uint64_t next_collective = 0;
    std::map<int, uint64_t> sends, recvs;  // per peer: how many posted
    std::vector<OpPtr> ops;                // its stream operations not yet seen done
};

// A rank's part of a task: the task, its role there, the rank's communicator.
struct Part {
    CommTaskPtr task;
    int role;
    Comm* comm;
};
using Parts = std::vector<Part>;

struct Member {
    Comm* comm = nullptr;
    const Parts* waiting = nullptr;  // the parts its thread waits to see matched
};

struct Clique {
    uint64_t serial = 0;
    int nranks = 0;
    std::vector<Member> members;
    int joined = 0;
    std::string broken;  // why its initialisation failed
    std::map<uint64_t, CommTaskPtr> collectives;               // by number, until matched
    std::map<std::tuple<int, int, uint64_t>, CommTaskPtr> p2p;  // by (sender, receiver, order), until matched
};

struct State {
    std::condition_variable cv;
    std::map<uint64_t, Clique*> by_id;  // unique id serial -> the communicator being formed with it
    uint64_t next_id = 1;
    uint64_t next_comm = 1;
    std::set<const ncclComm*> live;
    uint64_t activity = 0;  // posts, joins, departures
};

State& st() {
    static State* s = new State();  // never destroyed, as the engine
    return *s;
}

// A call collected (inside a group) or being posted.
struct Pending {
    Comm* comm;
    CommCall call;
    Stream* stream;
};

thread_local int t_group_depth = 0;
thread_local std::vector<Pending> t_group;
thread_local ncclResult_t t_group_error = ncclSuccess;  // the first call of the open group that failed
thread_local char t_last_error[1024] = "";

int timeout_s() {
    static const int t = [] {
        const char* v = std::getenv("DEEPKERN_SIM_NCCL_TIMEOUT");
        if (v == nullptr || *v == 0) {
            return 30;
        }
        char* end = nullptr;
        const long x = std::strtol(v, &end, 10);
        if (end == v || *end != 0 || x < 1 || x > (1 << 20)) {
            std::fprintf(stderr, "deepkern simulator: ignoring DEEPKERN_SIM_NCCL_TIMEOUT=%s (expected seconds, 1..%d)\n", v, 1 << 20);
            return 30;
        }
        return static_cast<int>(x);
    }();
    return t;
}

Lock locked() {
    Lock l(eng().mu);
    ensure_started();
    return l;
}

// An error returned to the caller: remembered for ncclGetLastError, explained with
// DEEPKERN_SIM_VERBOSE=1.
ncclResult_t refuse(ncclResult_t r, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
ncclResult_t refuse(ncclResult_t r, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(t_last_error, sizeof t_last_error, fmt, ap);
    va_end(ap);
    if (config().verbose) {
        std::fprintf(stderr, "deepkern simulator: NCCL: %s\n", t_last_error);
    }
    // Inside a group, NCCL's ncclGroupEnd fails too, and posts nothing.
    if (t_group_depth > 0 && t_group_error == ncclSuccess) {
        t_group_error = r;
    }
    return r;
}

// A failure of the program's use of NCCL: reported, and the process fails at exit.
void report(const std::string& text) {
    std::snprintf(t_last_error, sizeof t_last_error, "%s", text.c_str());
    std::fprintf(stderr, "deepkern simulator: NCCL: %s\n  seed    DEEPKERN_SIM_SEED=%" PRIu64 " reproduces this run\n", text.c_str(),
                 config().seed);
    std::fflush(stderr);
    ++eng().failures;
}

void touched() {
    ++st().activity;
    st().cv.notify_all();
}

Comm* comm_of(ncclComm_t h) {
    if (h == nullptr || st().live.count(h) == 0) {
        return nullptr;
    }
    return static_cast<Comm*>(h);
}

std::string name_of(const Comm& m) {
    std::ostringstream os;
    os << "rank " << m.rank << " of communicator " << m.clique->serial << " (" << m.clique->nranks << " ranks)";
    return os.str();
}

// Waits, the engine's lock released meanwhile, until `done()`. Returns "" then, or why it gave up:
// `hopeless()`'s reason, or "timeout" once nothing in the process (the device, host threads'
// driver calls, other ranks' NCCL calls) has changed for DEEPKERN_SIM_NCCL_TIMEOUT seconds.
std::string wait_for_peers(Lock& l, const std::function<bool()>& done, const std::function<std::string()>& hopeless) {
    using Clock = std::chrono::steady_clock;
    auto quiet_since = Clock::now();
    uint64_t progress = eng().progress, activity = st().activity;
    auto host = eng().host_activity;
    while (!done()) {
        std::string why = hopeless();
        if (!why.empty()) {
            return why;
        }
        if (progress != eng().progress || activity != st().activity || host != eng().host_activity) {
            progress = eng().progress;
            activity = st().activity;
            host = eng().host_activity;
            quiet_since = Clock::now();
        } else if (Clock::now() - quiet_since >= std::chrono::seconds(timeout_s())) {
            return "timeout";
        }
        st().cv.wait_for(l, std::chrono::milliseconds(50));
    }
    return "";
}

// ---- Communicators -----------------------------------------------------------------------------

Comm* join(Clique* c, int rank, int device) {
    auto* m = new Comm();
    m->clique = c;
    m->rank = rank;
    m->device = device;
    c->members[static_cast<size_t>(rank)].comm = m;
    ++c->joined;
    st().live.insert(m);
    touched();
    return m;
}

// Once every rank joined: NCCL refuses two ranks of one communicator on one device.
void check_devices(Clique* c) {
    for (int a = 0; a < c->nranks; ++a) {
        for (int b = a + 1; b < c->nranks; ++b) {
            const Comm* x = c->members[size_t(a)].comm;
            const Comm* y = c->members[size_t(b)].comm;
            if (x->device == y->device && c->broken.empty()) {
                std::ostringstream os;
                os << "communicator " << c->serial << ": ranks " << a << " and " << b << " are both on device " << x->device
                   << " (NCCL refuses a communicator with two ranks on one GPU; on the simulator, give each rank its own device: "
                      "DEEPKERN_SIM_DEVICES)";
                c->broken = os.str();
                report(c->broken);
            }
        }
    }
}

ncclResult_t leave(Comm* m, const char* how) {
    m->gone = how;
    st().live.erase(m);
    touched();
    return ncclSuccess;
}

// ---- Posting -------------------------------------------------------------------------------------

bool collective(CommKind k) { return k != CommKind::Send && k != CommKind::Recv; }

// The parts of a complete task agree; else the task fails (reported).
void check_agreement(const CommTaskPtr& t) {
    const CommCall& a = t->roles[0].call;
    bool same = true;
    for (const CommRole& r : t->roles) {
        const CommCall& b = r.call;
        if (t->p2p) {
            same = same && a.count == b.count && a.type == b.type;
            continue;
        }
        same = same && a.kind == b.kind && a.count == b.count && a.type == b.type;
        if (same && (a.kind == CommKind::AllReduce || a.kind == CommKind::Reduce || a.kind == CommKind::ReduceScatter)) {
            same = a.op == b.op;
        }
        if (same && (a.kind == CommKind::Broadcast || a.kind == CommKind::Reduce)) {
            same = a.root == b.root;
        }
    }
    if (same) {
        return;
    }
    std::ostringstream os;
    os << "the ranks disagree at " << comm_task_text(*t) << ":";
    for (const CommRole& r : t->roles) {
        os << "\n    rank " << r.rank << " posted " << comm_call_text(r.call);
    }
    t->failed = os.str();
    t->code = CUDA_ERROR_LAUNCH_FAILED;
    t->nccl_result = ncclInvalidUsage;
    report(t->failed);
}

// Posts `part` of `m`: the task it belongs to (created by the first rank to post) and its role.
Part post_one(Comm* m, const CommCall& call) {
    Clique* c = m->clique;
    CommTaskPtr t;
    int role = 0;
    if (collective(call.kind)) {
        const uint64_t n = m->next_collective++;
        CommTaskPtr& slot = c->collectives[n];
        if (!slot) {
            slot = std::make_shared<CommTask>();
            slot->comm = c->serial;
            slot->nranks = c->nranks;
            slot->number = n;
            slot->roles.resize(size_t(c->nranks));
            for (int r = 0; r < c->nranks; ++r) {
                slot->roles[size_t(r)].rank = r;
            }
        }
        t = slot;
        role = m->rank;
    } else {
        const bool send = call.kind == CommKind::Send;
        const int peer = call.root;
        const uint64_t n = send ? m->sends[peer]++ : m->recvs[peer]++;
        const int from = send ? m->rank : peer, to = send ? peer : m->rank;
        CommTaskPtr& slot = c->p2p[std::make_tuple(from, to, n)];
        if (!slot) {
            slot = std::make_shared<CommTask>();
            slot->p2p = true;
            slot->comm = c->serial;
            slot->nranks = c->nranks;
            slot->number = n;
            slot->roles.resize(2);
            slot->roles[0].rank = from;
            slot->roles[1].rank = to;
        }
        t = slot;
        role = send ? 0 : 1;
    }
    CommRole& r = t->roles[size_t(role)];
    r.posted = true;
    r.call = call;
    if (++t->posted == static_cast<int>(t->roles.size())) {
        if (collective(call.kind)) {
            c->collectives.erase(t->number);
        } else {
            c->p2p.erase(std::make_tuple(t->roles[0].rank, t->roles[1].rank, t->number));
        }
        check_agreement(t);
    }
    return Part{t, role, m};
}

bool complete(const CommTask& t) { return !t.failed.empty() || t.posted == static_cast<int>(t.roles.size()); }

bool member_stuck(const Member& mb) {
    if (mb.waiting == nullptr) {
        return false;
    }
    for (const Part& p : *mb.waiting) {
        if (!complete(*p.task)) {
            return true;
        }
    }
    return false;
}

// What a waiting rank's parts still wait for, for reports.
std::string waiting_text(const Clique* c, int rank) {
    const Member& mb = c->members[size_t(rank)];
    std::ostringstream os;
    const char* sep = "";
    for (const Part& p : *mb.waiting) {
        const CommTask& t = *p.task;
        if (complete(t) || p.comm->rank != rank) {
            continue;
        }
        os << sep << comm_call_text(t.roles[size_t(p.role)].call) << " (" << comm_task_text(t) << ")";
        sep = ", ";
    }
    return os.str();
}

// Fails every incomplete task among `mine` (reported once, with `text`), returning `result`.
void fail_incomplete(const Parts& mine, const std::string& text, int result) {
    report(text);
    for (const Part& p : mine) {
        if (!complete(*p.task)) {
            p.task->nccl_result = result;
            comm_task_fail(p.task, text, CUDA_ERROR_LAUNCH_FAILED);
        }
    }
}

// Checks, while `mine` waits: a peer that left, or every rank of a communicator waiting for
// another (their calls do not match). Fails the tasks concerned (reported); true if it did.
bool check_hopeless(const Parts& mine) {
    for (const Part& p : mine) {
        const CommTask& t = *p.task;
        if (complete(t)) {
            continue;
        }
        Clique* c = p.comm->clique;
        for (const CommRole& r : t.roles) {
            const Comm* peer = c->members[size_t(r.rank)].comm;
            if (!r.posted && peer != nullptr && peer->gone != nullptr) {
                std::ostringstream os;
                os << name_of(*p.comm) << " waits at " << comm_call_text(t.roles[size_t(p.role)].call) << " (" << comm_task_text(t)
                   << ") for rank " << r.rank << ", which left the communicator (" << peer->gone << ") without posting its part";
                fail_incomplete(mine, os.str(), ncclRemoteError);
                return true;
            }
        }
        bool all = true;
        for (const Member& mb : c->members) {
            all = all && mb.comm != nullptr && mb.comm->gone == nullptr && member_stuck(mb);
        }
        if (all) {
            std::ostringstream os;
            os << "every rank of communicator " << c->serial << " waits for another: their calls do not match";
            for (int r = 0; r < c->nranks; ++r) {
                os << "\n    rank " << r << " waits at " << waiting_text(c, r);
            }
            const std::string text = os.str();
            report(text);
            // Every rank's waiting tasks fail, so that every waiting thread returns.
            for (const Member& mb : c->members) {
                for (const Part& q : *mb.waiting) {
                    if (!complete(*q.task)) {
                        q.task->nccl_result = ncclInvalidUsage;
                        comm_task_fail(q.task, text, CUDA_ERROR_LAUNCH_FAILED);
                    }
                }
            }
            touched();
            return true;
        }
    }
    return false;
}

// The peers `mine` still waits for, for the timeout report.
std::string missing_text(const Parts& mine) {
    std::ostringstream os;
    for (const Part& p : mine) {
        const CommTask& t = *p.task;
        if (complete(t)) {
            continue;
        }
        os << "\n    " << name_of(*p.comm) << " waits at " << comm_call_text(t.roles[size_t(p.role)].call) << " (" << comm_task_text(t)
           << ") for rank";
        std::vector<int> missing;
        for (const CommRole& r : t.roles) {
            if (!r.posted) {
                missing.push_back(r.rank);
            }
        }
        os << (missing.size() > 1 ? "s" : "");
        for (size_t i = 0; i < missing.size(); ++i) {
            os << (i > 0 ? ", " : " ") << missing[i];
        }
    }
    return os.str();
}

// Posts `calls` (one call, or a group's), waits until every part is matched, and enqueues each
// stream's operation. Every failure fails all of the calls' tasks, so peers waiting on them (on
// the host or on the device) end too.
ncclResult_t post(Lock& l, const std::vector<Pending>& calls, const char* api) {
    Parts mine;
    for (const Pending& c : calls) {
        mine.push_back(post_one(c.comm, c.call));
    }
    std::vector<Member*> waiting;
    for (const Part& p : mine) {
        Member* mb = &p.comm->clique->members[size_t(p.comm->rank)];
        if (std::find(waiting.begin(), waiting.end(), mb) == waiting.end()) {
            waiting.push_back(mb);
            mb->waiting = &mine;
        }
    }
    touched();
    const std::string why = wait_for_peers(
        l,
        [&] {
            for (const Part& p : mine) {
                if (!complete(*p.task)) {
                    return false;
                }
            }
            return true;
        },
        [&] { return check_hopeless(mine) ? std::string("hopeless") : std::string(); });
    if (why == "timeout") {
        std::ostringstream os;
        os << "a rank waited " << timeout_s() << " s (DEEPKERN_SIM_NCCL_TIMEOUT) for peers that never posted their part, with nothing else "
           << "happening in the process:" << missing_text(mine);
        fail_incomplete(mine, os.str(), ncclRemoteError);
    }
    for (Member* mb : waiting) {
        mb->waiting = nullptr;
    }
    int result = ncclSuccess;
    for (const Part& p : mine) {
        if (!p.task->failed.empty() && result == ncclSuccess) {
            result = p.task->nccl_result != ncclSuccess ? p.task->nccl_result : ncclRemoteError;
        }
    }
    if (result != ncclSuccess) {
        for (const Part& p : mine) {
            if (p.task->failed.empty()) {
                p.task->nccl_result = ncclRemoteError;
                comm_task_fail(p.task, "a participant's group failed (reported above)", CUDA_ERROR_LAUNCH_FAILED);
            }
        }
        touched();
        return static_cast<ncclResult_t>(result);
    }
    // One operation per stream, in the order of the calls.
    std::vector<std::pair<Stream*, OpPtr>> ops;
    for (size_t i = 0; i < calls.size(); ++i) {
        Stream* s = calls[i].stream;
        auto it = std::find_if(ops.begin(), ops.end(), [s](const auto& e) { return e.first == s; });
        if (it == ops.end()) {
            ops.emplace_back(s, enqueue(s, OpKind::Comm, calls.size() == 1 ? comm_kind_api(calls[i].call.kind) : api));
            it = ops.end() - 1;
        }
        const Part& p = mine[i];
        it->second->comm.push_back(CommPart{p.task, p.role});
        p.task->roles[size_t(p.role)].op = it->second;
        Comm* m = calls[i].comm;
        m->ops.erase(std::remove_if(m->ops.begin(), m->ops.end(), [](const OpPtr& o) { return o->done; }), m->ops.end());
        if (std::find(m->ops.begin(), m->ops.end(), it->second) == m->ops.end()) {
            m->ops.push_back(it->second);
        }
    }
    touched();
    return ncclSuccess;
}

// Validates one call and posts it, or collects it inside a group.
ncclResult_t call(ncclComm_t h, const CommCall& c, CUstream stream) {
    const char* api = comm_kind_api(c.kind);
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr) {
        return refuse(ncclInvalidArgument, "%s: not a live communicator (destroyed, aborted or never created)", api);
    }
    const int n = m->clique->nranks;
    const size_t elem = nccl_type_size(c.type);
    if (elem == 0) {
        return refuse(ncclInvalidArgument, "%s: unknown data type %d", api, c.type);
    }
    const bool reduces = c.kind == CommKind::AllReduce || c.kind == CommKind::Reduce || c.kind == CommKind::ReduceScatter;
    if (reduces && (c.op < 0 || c.op >= kNcclOps || !nccl_type_reducible(c.type))) {
        return refuse(ncclInvalidArgument, "%s: cannot reduce %s with %s", api, nccl_type_name(c.type), nccl_op_name(c.op));
    }
    const bool rooted = c.kind == CommKind::Broadcast || c.kind == CommKind::Reduce;
    if ((rooted || !collective(c.kind)) && (c.root < 0 || c.root >= n)) {
        return refuse(ncclInvalidArgument, "%s: %s %d of a communicator of %d ranks", api, rooted ? "root" : "peer", c.root, n);
    }
    const size_t bytes = c.count * elem;
    size_t send = 0, recv = 0;
    switch (c.kind) {
        case CommKind::AllGather: send = bytes, recv = bytes * size_t(n); break;
        case CommKind::AllReduce: send = recv = bytes; break;
        case CommKind::Broadcast: send = m->rank == c.root ? bytes : 0, recv = bytes; break;
        case CommKind::Reduce: send = bytes, recv = m->rank == c.root ? bytes : 0; break;
        case CommKind::ReduceScatter: send = bytes * size_t(n), recv = bytes; break;
        case CommKind::Send: send = bytes; break;
        case CommKind::Recv: recv = bytes; break;
    }
    for (const auto& [p, len, what] : {std::make_tuple(c.send, send, "send"), std::make_tuple(c.recv, recv, "receive")}) {
        if (len == 0) {
            continue;
        }
        if (p == 0) {
            return refuse(ncclInvalidArgument, "%s: null %s buffer for %zu bytes", api, what, len);
        }
        if (mem_find(p, len) == nullptr) {
            return refuse(ncclInvalidArgument, "%s: the %s buffer (%zu bytes at %s) is not inside one live allocation", api, what, len,
                          hex(p).c_str());
        }
    }
    Stream* s = nullptr;
    const uintptr_t v = reinterpret_cast<uintptr_t>(stream);
    if (v == 0 || v == 1) {
        Context* ctx = current_context();
        s = ctx->device == m->device ? ctx->legacy : eng().primary[size_t(m->device)]->legacy;
    } else {
        s = stream_of(stream);
    }
    if (s == nullptr) {
        return refuse(ncclInvalidArgument, "%s: not a live stream", api);
    }
    if (s->ctx->device != m->device) {
        return refuse(ncclInvalidArgument, "%s: a stream of device %d for %s, which is on device %d", api, s->ctx->device,
                      name_of(*m).c_str(), m->device);
    }
    const Pending p{m, c, s};
    if (t_group_depth > 0) {
        t_group.push_back(p);
        return ncclSuccess;
    }
    return post(l, {p}, api);
}

// Waits until every stream operation of `m` is done.
void drain(Lock& l, Comm* m) {
    std::vector<OpPtr> ops = m->ops;
    wait_until(l, [&ops] {
        for (const OpPtr& o : ops) {
            if (!o->done) {
                return false;
            }
        }
        return true;
    });
    m->ops.clear();
}

}  // namespace
}  // namespace dksim

using namespace dksim;

// ---- Versions, ids, errors -----------------------------------------------------------------------

DKSIM_API ncclResult_t ncclGetVersion(int* version) {
    if (version == nullptr) {
        return refuse(ncclInvalidArgument, "ncclGetVersion: null pointer");
    }
    *version = 23000;  // the interface of NCCL 2.30
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (id == nullptr) {
        return refuse(ncclInvalidArgument, "ncclGetUniqueId: null pointer");
    }
    Lock l = locked();
    std::memset(id, 0, sizeof *id);
    const IdBody b{kIdMagic, static_cast<uint64_t>(getpid()), st().next_id++};
    std::memcpy(id->internal, &b, sizeof b);
    return ncclSuccess;
}

DKSIM_API const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument (DEEPKERN_SIM_VERBOSE=1 explains it)";
        case ncclInvalidUsage: return "invalid usage (the simulator's report on stderr explains it)";
        case ncclRemoteError: return "remote process exited or there was a network error (on the simulator: a peer never took part)";
        case ncclInProgress: return "NCCL operation in progress";
        case ncclTimeout: return "timeout";
        default: return "unknown result code";
    }
}

DKSIM_API const char* ncclGetLastError(ncclComm_t) { return t_last_error; }

// ---- Communicators -------------------------------------------------------------------------------

namespace {
ncclResult_t init_rank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    if (out == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommInitRank: null communicator pointer");
    }
    *out = nullptr;
    IdBody b{};
    std::memcpy(&b, id.internal, sizeof b);
    if (b.magic != kIdMagic || b.pid != static_cast<uint64_t>(getpid())) {
        return refuse(ncclInvalidArgument, "ncclCommInitRank: not a unique id from ncclGetUniqueId of this process (the simulator's ranks share one)");
    }
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        return refuse(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d ranks", rank, nranks);
    }
    Lock l = locked();
    Clique*& c = st().by_id[b.serial];
    if (c == nullptr || c->joined == c->nranks) {
        // A fresh communicator (an id may be used again once its communicator has formed).
        c = new Clique();
        c->serial = st().next_comm++;
        c->nranks = nranks;
        c->members.resize(size_t(nranks));
    }
    if (c->nranks != nranks) {
        std::ostringstream os;
        os << "ncclCommInitRank: rank " << rank << " joins communicator " << c->serial << " as one of " << nranks
           << " ranks; the ranks before it said " << c->nranks;
        report(os.str());
        return ncclInvalidUsage;
    }
    if (c->members[size_t(rank)].comm != nullptr) {
        std::ostringstream os;
        os << "ncclCommInitRank: rank " << rank << " of communicator " << c->serial << " joined twice";
        report(os.str());
        return ncclInvalidUsage;
    }
    Comm* m = join(c, rank, current_context()->device);
    if (c->joined == c->nranks) {
        check_devices(c);
    }
    const std::string why = wait_for_peers(
        l, [c] { return c->joined == c->nranks; }, [c] { return c->broken.empty() ? std::string() : std::string("broken"); });
    if (why == "timeout") {
        std::ostringstream os;
        os << "ncclCommInitRank: " << name_of(*m) << " waited " << timeout_s()
           << " s (DEEPKERN_SIM_NCCL_TIMEOUT) for ranks that never joined, with nothing else happening in the process: rank";
        const char* sep = " ";
        for (int r = 0; r < nranks; ++r) {
            if (c->members[size_t(r)].comm == nullptr) {
                os << sep << r;
                sep = ", ";
            }
        }
        report(os.str());
        leave(m, "ncclCommInitRank failed");
        return ncclRemoteError;
    }
    if (!c->broken.empty()) {
        leave(m, "ncclCommInitRank failed");
        return ncclInvalidUsage;
    }
    *out = m;
    return ncclSuccess;
}
}  // namespace

DKSIM_API ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) { return init_rank(out, nranks, id, rank); }

DKSIM_API ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int nranks, ncclUniqueId id, int rank, void*) {
    return init_rank(out, nranks, id, rank);
}

DKSIM_API ncclResult_t ncclCommInitAll(ncclComm_t* comms, int ndev, const int* devlist) {
    if (comms == nullptr || ndev < 1) {
        return refuse(ncclInvalidArgument, "ncclCommInitAll: %d devices", ndev);
    }
    for (int i = 0; i < ndev; ++i) {
        const int d = devlist != nullptr ? devlist[i] : i;
        if (d < 0 || d >= config().devices) {
            return refuse(ncclInvalidArgument, "ncclCommInitAll: device %d of %d simulated devices (DEEPKERN_SIM_DEVICES)", d, config().devices);
        }
    }
    Lock l = locked();
    auto* c = new Clique();
    c->serial = st().next_comm++;
    c->nranks = ndev;
    c->members.resize(size_t(ndev));
    for (int i = 0; i < ndev; ++i) {
        comms[i] = join(c, i, devlist != nullptr ? devlist[i] : i);
    }
    check_devices(c);
    if (!c->broken.empty()) {
        for (int i = 0; i < ndev; ++i) {
            leave(static_cast<Comm*>(comms[i]), "ncclCommInitAll failed");
            comms[i] = nullptr;
        }
        return ncclInvalidUsage;
    }
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclCommFinalize(ncclComm_t h) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommFinalize: not a live communicator");
    }
    drain(l, m);
    m->finalized = true;
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclCommDestroy(ncclComm_t h) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommDestroy: not a live communicator");
    }
    // Destroying waits for the communicator's operations, as ncclCommFinalize does.
    drain(l, m);
    return leave(m, "ncclCommDestroy");
}

DKSIM_API ncclResult_t ncclCommAbort(ncclComm_t h) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommAbort: not a live communicator");
    }
    // Operations not yet run are cancelled (on a GPU, abort kills NCCL's kernels): their
    // participants' operations fail. Dropping a cudarc Comm aborts it, so this is what dropping a
    // communicator before its work is done does.
    std::vector<CommTaskPtr> cancelled;
    for (const OpPtr& op : m->ops) {
        for (const CommPart& p : op->comm) {
            if (!p.task->executed && p.task->failed.empty() &&
                std::find(cancelled.begin(), cancelled.end(), p.task) == cancelled.end()) {
                cancelled.push_back(p.task);
            }
        }
    }
    if (!cancelled.empty()) {
        std::ostringstream os;
        os << name_of(*m) << " was aborted (ncclCommAbort; dropping a cudarc Comm aborts it) before " << cancelled.size()
           << " of its operations had run; they are cancelled and fail on every rank:";
        for (const CommTaskPtr& t : cancelled) {
            os << "\n    " << comm_task_text(*t);
        }
        const std::string text = os.str();
        report(text);
        for (const CommTaskPtr& t : cancelled) {
            comm_task_fail(t, text, CUDA_ERROR_LAUNCH_FAILED);
        }
    }
    m->ops.clear();
    return leave(m, "ncclCommAbort");
}

DKSIM_API ncclResult_t ncclCommCount(const ncclComm_t h, int* count) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr || count == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommCount: not a live communicator, or a null pointer");
    }
    *count = m->clique->nranks;
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclCommUserRank(const ncclComm_t h, int* rank) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr || rank == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommUserRank: not a live communicator, or a null pointer");
    }
    *rank = m->rank;
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclCommCuDevice(const ncclComm_t h, int* device) {
    Lock l = locked();
    Comm* m = comm_of(h);
    if (m == nullptr || device == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommCuDevice: not a live communicator, or a null pointer");
    }
    *device = m->device;
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclCommGetAsyncError(ncclComm_t h, ncclResult_t* error) {
    Lock l = locked();
    if (comm_of(h) == nullptr || error == nullptr) {
        return refuse(ncclInvalidArgument, "ncclCommGetAsyncError: not a live communicator, or a null pointer");
    }
    *error = ncclSuccess;  // failures are reported when they happen; stream operations carry them
    return ncclSuccess;
}

// ---- Groups ----------------------------------------------------------------------------------------

DKSIM_API ncclResult_t ncclGroupStart() {
    ++t_group_depth;
    return ncclSuccess;
}

DKSIM_API ncclResult_t ncclGroupEnd() {
    if (t_group_depth == 0) {
        return refuse(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    }
    if (--t_group_depth > 0) {
        return ncclSuccess;
    }
    std::vector<Pending> calls;
    calls.swap(t_group);
    const ncclResult_t failed = t_group_error;
    t_group_error = ncclSuccess;
    if (failed != ncclSuccess) {
        const std::string first = t_last_error;
        return refuse(failed, "ncclGroupEnd: a call of the group failed (%s); nothing of the group was posted", first.c_str());
    }
    if (calls.empty()) {
        return ncclSuccess;
    }
    Lock l = locked();
    // Communicators may have gone since their calls were collected.
    for (const Pending& p : calls) {
        if (comm_of(p.comm) == nullptr) {
            return refuse(ncclInvalidArgument, "ncclGroupEnd: a call of the group names a communicator destroyed since");
        }
    }
    return post(l, calls, "ncclGroupEnd");
}

// ---- Collectives and point-to-point --------------------------------------------------------------

namespace {
CommCall make(CommKind k, const void* send, void* recv, size_t count, int type, int op, int root) {
    CommCall c;
    c.kind = k;
    c.send = reinterpret_cast<uintptr_t>(send);
    c.recv = reinterpret_cast<uintptr_t>(recv);
    c.count = count;
    c.type = type;
    c.op = op;
    c.root = root;
    return c;
}
}  // namespace

DKSIM_API ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type, ncclComm_t comm, CUstream s) {
    return call(comm, make(CommKind::AllGather, send, recv, count, type, 0, 0), s);
}

DKSIM_API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm,
                                     CUstream s) {
    return call(comm, make(CommKind::AllReduce, send, recv, count, type, op, 0), s);
}

DKSIM_API ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm,
                                     CUstream s) {
    return call(comm, make(CommKind::Broadcast, send, recv, count, type, 0, root), s);
}

DKSIM_API ncclResult_t ncclBcast(void* buff, size_t count, ncclDataType_t type, int root, ncclComm_t comm, CUstream s) {
    return call(comm, make(CommKind::Broadcast, buff, buff, count, type, 0, root), s);
}

DKSIM_API ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root,
                                  ncclComm_t comm, CUstream s) {
    return call(comm, make(CommKind::Reduce, send, recv, count, type, op, root), s);
}

DKSIM_API ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm,
                                         CUstream s) {
    return call(comm, make(CommKind::ReduceScatter, send, recv, count, type, op, 0), s);
}

DKSIM_API ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, CUstream s) {
    return call(comm, make(CommKind::Send, send, nullptr, count, type, 0, peer), s);
}

DKSIM_API ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, CUstream s) {
    return call(comm, make(CommKind::Recv, nullptr, recv, count, type, 0, peer), s);
}
