// Thread-block clusters: a launch's cluster dimension (along x) groups consecutive CTAs, which the
// engine places and makes live together (engine.cpp). Here: the cluster's special registers and
// barrier.cluster. Distributed shared memory (mapa, remote mbarrier arrivals, multicast TMA) is in
// async_ops.cpp beside the mbarriers it reaches.
//
// Race mode does not model the ordering between the CTAs of a cluster (barrier.cluster, remote
// arrivals and multicast writes carry no happens-before across CTAs), and leaves the accesses they
// order unchecked rather than reporting false races: see docs/simulator.md.
#include <algorithm>

#include "sim.hpp"

namespace dksim {

namespace {

Thread* me() { return eng().running; }

// Completes the cluster barrier's phase once every thread not exited has arrived.
void complete_if_done(Cluster& cl) {
    if (cl.arrived == 0 || cl.arrived < cl.live_threads) {
        return;
    }
    ++cl.phase;
    cl.arrived = 0;
    for (Thread* x : cl.waiters) {
        wake(x);
    }
    cl.waiters.clear();
    made_progress();
}

}  // namespace

uint32_t cluster_ctarank() { return me()->cta->rank; }

uint32_t cluster_nctarank() { return me()->cta->kernel->cluster_size; }

void barrier_cluster_arrive() {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cluster* cl = t->cta->cluster;
    yield_maybe();
    if (cl == nullptr) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "barrier.cluster.arrive in a kernel launched without a cluster dimension (the simulator requires one)");
    }
    if (t->cluster_phase != UINT64_MAX) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "barrier.cluster.arrive twice without a barrier.cluster.wait in between");
    }
    t->cluster_phase = cl->phase;
    ++cl->arrived;
    made_progress();
    complete_if_done(*cl);
}

void barrier_cluster_wait() {
    void* at = __builtin_return_address(0);
    Thread* t = me();
    Cluster* cl = t->cta->cluster;
    if (cl == nullptr) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "barrier.cluster.wait in a kernel launched without a cluster dimension (the simulator requires one)");
    }
    if (t->cluster_phase == UINT64_MAX) {
        fail(CUDA_ERROR_LAUNCH_FAILED, at, "barrier.cluster.wait without a barrier.cluster.arrive before it");
    }
    const uint64_t arrived_in = t->cluster_phase;
    t->cluster_phase = UINT64_MAX;
    while (cl->phase == arrived_in) {
        cl->waiters.push_back(t);
        block_self(WaitInfo{"barrier.cluster.wait", arrived_in, cl->arrived, cl->live_threads, at});
    }
    yield_maybe();
}

void cluster_barrier_on_exit(Thread* t) {
    Cluster* cl = t->cta->cluster;
    if (cl == nullptr) {
        return;
    }
    // An exited thread no longer counts; one that arrived in this phase and exited without waiting
    // leaves the count and the arrivals together.
    --cl->live_threads;
    if (t->cluster_phase == cl->phase) {
        --cl->arrived;
    }
    complete_if_done(*cl);
}

}  // namespace dksim
