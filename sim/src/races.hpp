// The race detector's interface to the rest of the simulator (races.cpp; a no-op unless the kernels
// were built with DEEPKERN_SIM_RACES=1).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dksim {

struct Cta;
struct Thread;
struct Op;

// What an agent (a CTA's thread or unit, or a stream operation) knows of other CTAs' and
// operations' work: races.cpp.
struct Know;
using KnowPtr = std::shared_ptr<const Know>;

// An asynchronous unit's operation: the unit's clock within its CTA, and what it knows beyond.
struct RaceStamp {
    std::vector<uint32_t> clock;
    KnowPtr know;
};

bool races_enabled();
void race_init_cta(Cta* c);
// The CTA's threads have exited (or the kernel failed): what they knew becomes the kernel's.
void race_retire_cta(Cta* c);
// A CTA barrier or warp collective the given threads completed together.
void race_barrier(Cta* c, const std::vector<Thread*>& threads);

// A thread's memory-model operations on a location (global or shared, by address):
// a release write (st.release; the write of red.release), an acquire read (ld.acquire), a strong
// relaxed read (atomics, volatile loads: what it observed is acquired at the thread's next fence),
// a strong relaxed write (atomics, volatile stores: it releases what the thread's last fence
// covered), and a fence.
void race_release(Cta* c, uint32_t slot, uintptr_t key);
void race_acquire(Cta* c, uint32_t slot, uintptr_t key);
void race_relaxed_read(Cta* c, uint32_t slot, uintptr_t key);
void race_relaxed_write(Cta* c, uint32_t slot, uintptr_t key);
void race_fence(Cta* c, uint32_t slot);

// mbarrier phases: an arrival (or a TMA completion, `unit`) releases into (bar, phase); a
// successful wait acquires the completed phase.
void race_phase_arrive(Cta* c, uint32_t slot, uint32_t bar, uint64_t phase, const RaceStamp* unit);
void race_phase_acquire(Cta* c, uint32_t slot, uint32_t bar, uint64_t completed_phase);

// An operation of an asynchronous unit (the TMA, or warpgroup wg's wgmma) issued by `issuers`; its
// shared-memory accesses; the TMA's global-memory accesses; a thread (slot) waiting for the unit.
RaceStamp race_unit_op(Cta* c, bool tma, uint32_t wg, const std::vector<Thread*>& issuers);
bool race_unit_access(Cta* c, bool tma, uint32_t wg, const RaceStamp& stamp, uint32_t shared_addr, uint32_t bytes, bool write, void* pc,
                      std::string* report);
bool race_unit_global(Cta* c, const RaceStamp& stamp, uintptr_t addr, size_t bytes, bool write, void* pc, std::string* report);
void race_join_unit(Cta* c, uint32_t slot, bool tma, uint32_t wg);

// Stream operations: enqueued (what the host knows then), started (what the stream and the
// events it waits for know), their memory accesses (copies, memsets), stream memory operations
// (a write releases, a satisfied wait acquires), finished (what it knew becomes the stream's).
void race_op_enqueued(Op* op);
void race_op_started(Op* op);
bool race_op_access(Op* op, uintptr_t addr, size_t bytes, bool write, std::string* report);
void race_op_release(Op* op, uintptr_t key);
void race_op_acquire(Op* op, uintptr_t key);
void race_op_finished(Op* op);
// Started operations that meet (the participants of one collective): each knows what all of
// them knew, and the others' operations themselves.
void race_ops_meet(const std::vector<Op*>& ops);
// A host thread's wait was satisfied: the host now knows every finished operation.
void race_host_synchronised();
// Device or host memory freed: its records go.
void race_forget(uintptr_t begin, size_t bytes);

}  // namespace dksim
