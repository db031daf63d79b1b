// The engine's side of the NCCL stand-in (comm.hpp): a communication task runs when every
// participant's stream has reached its operation. It reads every source, then writes every
// destination, in one step of the schedule; reductions combine the ranks' values in rank order,
// rounding to the element type after each step, so the result does not depend on the schedule.
//
// Race mode: the participants' operations meet first (each then knows what the others knew, as
// the data a collective moves orders the ranks' work), then the reads count as accesses of the
// sending rank's operation and the writes as accesses of the receiving rank's.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "comm.hpp"

namespace dksim {

namespace {

struct TypeInfo {
    const char* name;
    size_t size;
    bool reducible;
};

const TypeInfo kTypes[kNcclTypes] = {
    {"ncclInt8", 1, true},     {"ncclUint8", 1, true},    {"ncclInt32", 4, true},       {"ncclUint32", 4, true},
    {"ncclInt64", 8, true},    {"ncclUint64", 8, true},   {"ncclFloat16", 2, true},     {"ncclFloat32", 4, true},
    {"ncclFloat64", 8, true},  {"ncclBfloat16", 2, true}, {"ncclFloat8e4m3", 1, false}, {"ncclFloat8e5m2", 1, false},
};

const char* const kOps[kNcclOps] = {"ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg"};

float bf16_to_float(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return static_cast<uint16_t>((u >> 16) | 0x40);  // a quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

template <typename T>
T combine(T a, T b, int op) {
    switch (op) {
        case kNcclProd: return a * b;
        case kNcclMax: return a < b ? b : a;
        case kNcclMin: return b < a ? b : a;
        default: return a + b;  // sum, avg (divided at the end)
    }
}

// Integers: sums and products wrap (in the unsigned type), as on the GPU.
template <typename T>
T combine_int(T a, T b, int op) {
    using U = std::make_unsigned_t<T>;
    switch (op) {
        case kNcclProd: return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
        case kNcclMax: return a < b ? b : a;
        case kNcclMin: return b < a ? b : a;
        default: return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
    }
}

template <typename T, typename F>
void each(uint8_t* acc, const uint8_t* in, size_t n, F f) {
    for (size_t i = 0; i < n; ++i) {
        T a, b;
        std::memcpy(&a, acc + i * sizeof(T), sizeof(T));
        std::memcpy(&b, in + i * sizeof(T), sizeof(T));
        const T r = f(a, b);
        std::memcpy(acc + i * sizeof(T), &r, sizeof(T));
    }
}

// acc[i] = acc[i] op in[i] for n elements of `type`.
void reduce_into(uint8_t* acc, const uint8_t* in, size_t n, int type, int op) {
    switch (type) {
        case kNcclInt8: each<int8_t>(acc, in, n, [op](int8_t a, int8_t b) { return combine_int(a, b, op); }); break;
        case kNcclUint8: each<uint8_t>(acc, in, n, [op](uint8_t a, uint8_t b) { return combine_int(a, b, op); }); break;
        case kNcclInt32: each<int32_t>(acc, in, n, [op](int32_t a, int32_t b) { return combine_int(a, b, op); }); break;
        case kNcclUint32: each<uint32_t>(acc, in, n, [op](uint32_t a, uint32_t b) { return combine_int(a, b, op); }); break;
        case kNcclInt64: each<int64_t>(acc, in, n, [op](int64_t a, int64_t b) { return combine_int(a, b, op); }); break;
        case kNcclUint64: each<uint64_t>(acc, in, n, [op](uint64_t a, uint64_t b) { return combine_int(a, b, op); }); break;
        case kNcclFloat32: each<float>(acc, in, n, [op](float a, float b) { return combine(a, b, op); }); break;
        case kNcclFloat64: each<double>(acc, in, n, [op](double a, double b) { return combine(a, b, op); }); break;
        case kNcclFloat16:
            each<_Float16>(acc, in, n, [op](_Float16 a, _Float16 b) { return static_cast<_Float16>(combine(float(a), float(b), op)); });
            break;
        case kNcclBfloat16:
            each<uint16_t>(acc, in, n, [op](uint16_t a, uint16_t b) { return float_to_bf16(combine(bf16_to_float(a), bf16_to_float(b), op)); });
            break;
        default: break;
    }
}

// ncclAvg: the sum divided by the number of ranks.
void divide(uint8_t* acc, size_t n, int type, int ranks) {
    auto div = [&](auto tag) {
        using T = decltype(tag);
        each<T>(acc, acc, n, [ranks](T a, T) { return static_cast<T>(a / static_cast<T>(ranks)); });
    };
    switch (type) {
        case kNcclInt8: div(int8_t{}); break;
        case kNcclUint8: div(uint8_t{}); break;
        case kNcclInt32: div(int32_t{}); break;
        case kNcclUint32: div(uint32_t{}); break;
        case kNcclInt64: div(int64_t{}); break;
        case kNcclUint64: div(uint64_t{}); break;
        case kNcclFloat32: div(float{}); break;
        case kNcclFloat64: div(double{}); break;
        case kNcclFloat16:
            each<_Float16>(acc, acc, n, [ranks](_Float16 a, _Float16) { return static_cast<_Float16>(float(a) / float(ranks)); });
            break;
        case kNcclBfloat16:
            each<uint16_t>(acc, acc, n, [ranks](uint16_t a, uint16_t) { return float_to_bf16(bf16_to_float(a) / float(ranks)); });
            break;
        default: break;
    }
}

void report(const CommTask& t, const std::string& text) {
    std::fprintf(stderr, "deepkern simulator: NCCL: %s failed\n  %s\n  seed    DEEPKERN_SIM_SEED=%" PRIu64 " reproduces this run\n",
                 comm_task_text(t).c_str(), text.c_str(), config().seed);
    std::fflush(stderr);
}

// Ends `op` if every task it takes part in has run or failed.
void maybe_finish(const OpPtr& op) {
    if (!op || op->done || !op->started) {
        return;
    }
    CUresult code = CUDA_SUCCESS;
    for (const CommPart& p : op->comm) {
        const CommTask& t = *p.task;
        if (!t.failed.empty()) {
            code = code == CUDA_SUCCESS ? t.code : code;
        } else if (!t.executed) {
            return;
        }
    }
    finish_operation(op, code);
    op->comm.clear();  // the tasks keep the operation, not the reverse, once it is done
}

// Runs a task whose roles were all reached. False (the task failed, reported) on a bad access.
class Runner {
public:
    explicit Runner(CommTask& t) : t_(t) {}

    bool read(int role, uintptr_t p, size_t bytes, std::vector<uint8_t>& out) {
        out.clear();
        if (bytes == 0) {
            return true;
        }
        if (!access(role, p, bytes, false)) {
            return false;
        }
        out.assign(reinterpret_cast<const uint8_t*>(p), reinterpret_cast<const uint8_t*>(p) + bytes);
        return true;
    }

    bool write(int role, uintptr_t p, const uint8_t* data, size_t bytes) {
        if (bytes == 0) {
            return true;
        }
        if (!access(role, p, bytes, true)) {
            return false;
        }
        std::memmove(reinterpret_cast<void*>(p), data, bytes);
        return true;
    }

private:
    bool access(int role, uintptr_t p, size_t bytes, bool write) {
        const CommRole& r = t_.roles[static_cast<size_t>(role)];
        if (mem_find(p, bytes) == nullptr) {
            std::ostringstream os;
            os << "rank " << r.rank << "'s " << (write ? "destination" : "source") << " (" << bytes << " bytes at " << hex(p)
               << ") is not inside live device memory (freed since the call?)";
            fail(os.str(), CUDA_ERROR_ILLEGAL_ADDRESS);
            return false;
        }
        std::string race;
        if (!race_op_access(r.op.get(), p, bytes, write, &race)) {
            fail(race, CUDA_ERROR_LAUNCH_FAILED);
            return false;
        }
        return true;
    }

    void fail(const std::string& text, CUresult code) {
        report(t_, text);
        ++eng().failures;
        t_.failed = text;
        t_.code = code;
    }

    CommTask& t_;
};

void execute(CommTask& t) {
    std::vector<Op*> ops;
    for (const CommRole& r : t.roles) {
        if (std::find(ops.begin(), ops.end(), r.op.get()) == ops.end()) {
            ops.push_back(r.op.get());
        }
    }
    race_ops_meet(ops);
    const CommCall& c0 = t.roles[0].call;
    const size_t elem = nccl_type_size(c0.type);
    const size_t bytes = c0.count * elem;
    const int n = static_cast<int>(t.roles.size());
    Runner run(t);
    std::vector<std::vector<uint8_t>> in(static_cast<size_t>(n));
    auto reduce_all = [&](size_t offset, size_t len, std::vector<uint8_t>& acc) {
        acc.assign(in[0].begin() + static_cast<ptrdiff_t>(offset), in[0].begin() + static_cast<ptrdiff_t>(offset + len));
        for (int r = 1; r < n; ++r) {
            reduce_into(acc.data(), in[static_cast<size_t>(r)].data() + offset, c0.count, c0.type, c0.op);
        }
        if (c0.op == kNcclAvg) {
            divide(acc.data(), c0.count, c0.type, n);
        }
    };
    bool ok = true;
    switch (t.p2p ? CommKind::Send : c0.kind) {
        case CommKind::Send:
        case CommKind::Recv:
            ok = run.read(0, t.roles[0].call.send, bytes, in[0]) && run.write(1, t.roles[1].call.recv, in[0].data(), bytes);
            break;
        case CommKind::AllGather: {
            for (int r = 0; r < n && ok; ++r) {
                ok = run.read(r, t.roles[size_t(r)].call.send, bytes, in[size_t(r)]);
            }
            std::vector<uint8_t> all;
            for (const auto& v : in) {
                all.insert(all.end(), v.begin(), v.end());
            }
            for (int r = 0; r < n && ok; ++r) {
                ok = run.write(r, t.roles[size_t(r)].call.recv, all.data(), all.size());
            }
            break;
        }
        case CommKind::Broadcast: {
            ok = run.read(c0.root, t.roles[size_t(c0.root)].call.send, bytes, in[0]);
            for (int r = 0; r < n && ok; ++r) {
                ok = run.write(r, t.roles[size_t(r)].call.recv, in[0].data(), bytes);
            }
            break;
        }
        case CommKind::AllReduce:
        case CommKind::Reduce: {
            for (int r = 0; r < n && ok; ++r) {
                ok = run.read(r, t.roles[size_t(r)].call.send, bytes, in[size_t(r)]);
            }
            if (!ok) {
                break;
            }
            std::vector<uint8_t> acc;
            reduce_all(0, bytes, acc);
            for (int r = 0; r < n && ok; ++r) {
                if (c0.kind == CommKind::AllReduce || r == c0.root) {
                    ok = run.write(r, t.roles[size_t(r)].call.recv, acc.data(), bytes);
                }
            }
            break;
        }
        case CommKind::ReduceScatter: {
            for (int r = 0; r < n && ok; ++r) {
                ok = run.read(r, t.roles[size_t(r)].call.send, bytes * size_t(n), in[size_t(r)]);
            }
            std::vector<uint8_t> acc;
            for (int r = 0; r < n && ok; ++r) {
                reduce_all(bytes * size_t(r), bytes, acc);
                ok = run.write(r, t.roles[size_t(r)].call.recv, acc.data(), bytes);
            }
            break;
        }
    }
    if (ok) {
        t.executed = true;
    }
    made_progress();
}

}  // namespace

size_t nccl_type_size(int type) { return type >= 0 && type < kNcclTypes ? kTypes[type].size : 0; }
const char* nccl_type_name(int type) { return type >= 0 && type < kNcclTypes ? kTypes[type].name : "(unknown type)"; }
const char* nccl_op_name(int op) { return op >= 0 && op < kNcclOps ? kOps[op] : "(unknown operation)"; }
bool nccl_type_reducible(int type) { return type >= 0 && type < kNcclTypes && kTypes[type].reducible; }

const char* comm_kind_api(CommKind k) {
    switch (k) {
        case CommKind::AllGather: return "ncclAllGather";
        case CommKind::AllReduce: return "ncclAllReduce";
        case CommKind::Broadcast: return "ncclBroadcast";
        case CommKind::Reduce: return "ncclReduce";
        case CommKind::ReduceScatter: return "ncclReduceScatter";
        case CommKind::Send: return "ncclSend";
        case CommKind::Recv: return "ncclRecv";
    }
    return "nccl?";
}

std::string comm_call_text(const CommCall& c) {
    std::ostringstream os;
    os << comm_kind_api(c.kind) << "(" << c.count << " x " << nccl_type_name(c.type);
    switch (c.kind) {
        case CommKind::AllReduce:
        case CommKind::ReduceScatter: os << ", " << nccl_op_name(c.op); break;
        case CommKind::Reduce: os << ", " << nccl_op_name(c.op) << ", root " << c.root; break;
        case CommKind::Broadcast: os << ", root " << c.root; break;
        case CommKind::Send: os << " to rank " << c.root; break;
        case CommKind::Recv: os << " from rank " << c.root; break;
        case CommKind::AllGather: break;
    }
    os << ")";
    return os.str();
}

std::string comm_task_text(const CommTask& t) {
    std::ostringstream os;
    if (t.p2p) {
        os << "ncclSend/ncclRecv #" << t.number << " from rank " << t.roles[0].rank << " to rank " << t.roles[1].rank << " of communicator "
           << t.comm;
    } else {
        const CommRole* first = nullptr;
        for (const CommRole& r : t.roles) {
            if (r.posted) {
                first = &r;
                break;
            }
        }
        os << (first != nullptr ? comm_kind_api(first->call.kind) : "collective") << " #" << t.number << " of communicator " << t.comm;
    }
    return os.str();
}

void comm_op_start(const OpPtr& op) {
    for (CommPart& p : op->comm) {
        CommTask& t = *p.task;
        t.roles[static_cast<size_t>(p.role)].reached = true;
    }
    std::vector<OpPtr> touched{op};
    for (CommPart& p : op->comm) {
        CommTask& t = *p.task;
        if (t.executed || !t.failed.empty()) {
            continue;
        }
        bool all = true;
        for (const CommRole& r : t.roles) {
            all = all && r.reached;
        }
        if (all) {
            execute(t);
            for (const CommRole& r : t.roles) {
                touched.push_back(r.op);
            }
        }
    }
    for (const OpPtr& o : touched) {
        maybe_finish(o);
    }
}

std::string comm_op_waiting(const Op& op) {
    std::ostringstream os;
    os << op.api;
    const char* sep = " waits for ";
    for (const CommPart& p : op.comm) {
        const CommTask& t = *p.task;
        if (t.executed || !t.failed.empty()) {
            continue;
        }
        os << sep << comm_task_text(t) << ": rank";
        std::vector<int> missing;
        for (const CommRole& r : t.roles) {
            if (!r.reached && std::find(missing.begin(), missing.end(), r.rank) == missing.end()) {
                missing.push_back(r.rank);
            }
        }
        os << (missing.size() > 1 ? "s" : "");
        for (size_t i = 0; i < missing.size(); ++i) {
            os << (i > 0 ? ", " : " ") << missing[i];
        }
        os << (missing.size() > 1 ? " have" : " has") << " not reached its part on its stream";
        sep = "; ";
    }
    return os.str();
}

void comm_task_fail(const CommTaskPtr& t, const std::string& why, CUresult code) {
    if (t->executed || !t->failed.empty()) {
        return;
    }
    t->failed = why;
    t->code = code;
    made_progress();
    for (const CommRole& r : t->roles) {
        maybe_finish(r.op);
    }
}

void comm_op_abandon(const OpPtr& op, const std::string& why, CUresult code) {
    const std::vector<CommPart> parts = op->comm;
    for (const CommPart& p : parts) {
        comm_task_fail(p.task, why, code);
    }
}

}  // namespace dksim
