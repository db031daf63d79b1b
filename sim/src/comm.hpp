// Communication tasks: what the NCCL stand-in (sim/nccl/nccl.cpp, built as libnccl.so) posts and
// the engine (collective.cpp) runs.
//
// A task is one collective of a communicator (every rank a role), or one send matched with its
// receive (two roles: sender, receiver). Ranks post their parts on the host; once every role is
// posted (and the parts agree), each rank enqueues a stream operation of kind OpKind::Comm that
// takes part in its tasks. A task runs when every role's stream has reached its operation: it
// reads all the sources, then writes all the destinations, at one point of the schedule. An
// operation finishes when all its tasks have run, so no rank's operation completes before every
// participant's has been reached.
#pragma once

#include <string>
#include <vector>

#include "sim.hpp"

namespace dksim {

// NCCL's enumerations (the values of nccl.h).
enum NcclType : int {
    kNcclInt8 = 0,
    kNcclUint8 = 1,
    kNcclInt32 = 2,
    kNcclUint32 = 3,
    kNcclInt64 = 4,
    kNcclUint64 = 5,
    kNcclFloat16 = 6,
    kNcclFloat32 = 7,
    kNcclFloat64 = 8,
    kNcclBfloat16 = 9,
    kNcclFloat8e4m3 = 10,
    kNcclFloat8e5m2 = 11,
    kNcclTypes = 12,
};
enum NcclRedOp : int { kNcclSum = 0, kNcclProd = 1, kNcclMax = 2, kNcclMin = 3, kNcclAvg = 4, kNcclOps = 5 };

enum class CommKind : uint8_t { AllGather, AllReduce, Broadcast, Reduce, ReduceScatter, Send, Recv };

// One rank's call, as posted.
struct CommCall {
    CommKind kind = CommKind::AllGather;
    size_t count = 0;   // elements (all-gather: per rank; reduce-scatter: received per rank)
    int type = 0;       // NcclType
    int op = 0;         // NcclRedOp (reductions)
    int root = 0;       // broadcast, reduce: the root; send, receive: the peer
    uintptr_t send = 0, recv = 0;
};

struct CommRole {
    int rank = -1;
    bool posted = false;
    CommCall call;
    OpPtr op;  // the rank's stream operation, once enqueued
    bool reached = false;
};

struct CommTask {
    bool p2p = false;
    uint64_t comm = 0;    // the communicator's number (for reports)
    int nranks = 0;
    uint64_t number = 0;  // collectives: the communicator's operation number; p2p: the pair's
    std::vector<CommRole> roles;  // collectives: by rank; p2p: sender, receiver
    int posted = 0;
    bool executed = false;
    std::string failed;  // why the task can never run (empty: it can)
    CUresult code = CUDA_SUCCESS;  // what its operations end with, if it failed
    int nccl_result = 0;           // failed while posting: the ncclResult_t its posters return
};
using CommTaskPtr = std::shared_ptr<CommTask>;

size_t nccl_type_size(int type);  // 0 for an unknown type
const char* nccl_type_name(int type);
const char* nccl_op_name(int op);
bool nccl_type_reducible(int type);
const char* comm_kind_api(CommKind k);  // "ncclAllGather", ...
// "ncclAllGather(16 x ncclInt32)", "ncclSend(8 x ncclUint8 to rank 1)", ...
std::string comm_call_text(const CommCall& c);
// "ncclAllGather #3 of communicator 1", "ncclSend/ncclRecv #0 from rank 0 to rank 1 of communicator 1"
std::string comm_task_text(const CommTask& t);

// The engine's side (lock held): the stream reached `op`; what a started operation still waits
// for (deadlock reports); ends every task of `op` not yet run (a deadlock, an aborted
// communicator), with a report of `why` if `report`.
void comm_op_start(const OpPtr& op);
std::string comm_op_waiting(const Op& op);
void comm_op_abandon(const OpPtr& op, const std::string& why, CUresult code);
// Marks a task failed (it will never run): participants' operations that were reached end with
// `code`, the others when their streams reach them.
void comm_task_fail(const CommTaskPtr& t, const std::string& why, CUresult code);

}  // namespace dksim
