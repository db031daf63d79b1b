// Memory checks: a simulated thread that touches memory it does not own faults on a guard page
// (see memory.cpp); the handler here turns the fault into a report naming the kernel, CTA,
// thread, the access and the allocation it missed, and ends the kernel with
// CUDA_ERROR_ILLEGAL_ADDRESS, as the GPU would. Faults outside simulated threads go to whatever
// handler the program had before.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "sim.hpp"

namespace dksim {

namespace {

struct sigaction g_old[32];

void chain(int sig, siginfo_t* si, void* uc) {
    const struct sigaction& old = g_old[sig];
    if ((old.sa_flags & SA_SIGINFO) != 0 && old.sa_sigaction != nullptr) {
        old.sa_sigaction(sig, si, uc);
        return;
    }
    if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler != nullptr) {
        old.sa_handler(sig);
        return;
    }
    // Default action: restore it and return, so the instruction faults again and the process
    // dies with the signal.
    signal(sig, SIG_DFL);
}

std::string describe_access(uintptr_t addr, bool write, bool known_rw) {
    const char* rw = !known_rw ? "access" : (write ? "write" : "read");
    char buf[512];
    const Region* r = mem_find_mapping(addr);
    if (r == nullptr) {
        if (addr < 4096) {
            std::snprintf(buf, sizeof buf, "invalid global %s at %p: a null pointer", rw, reinterpret_cast<void*>(addr));
        } else {
            std::snprintf(buf, sizeof buf, "invalid %s at %p: not in any allocation", rw, reinterpret_cast<void*>(addr));
        }
        return buf;
    }
    const uintptr_t end = r->data + r->size;
    switch (r->kind) {
        case MemKind::Device:
        case MemKind::Host: {
            const char* what = r->kind == MemKind::Device ? "device" : "host";
            if (r->freed) {
                std::snprintf(buf, sizeof buf, "use after free: %s at %p, %lld bytes into %s allocation #%llu of %zu bytes at %p, which was freed",
                              rw, reinterpret_cast<void*>(addr), static_cast<long long>(addr - r->data), what,
                              static_cast<unsigned long long>(r->serial), r->size, reinterpret_cast<void*>(r->data));
            } else if (addr >= end) {
                std::snprintf(buf, sizeof buf, "out-of-bounds global %s at %p: %llu bytes past the end of %s allocation #%llu of %zu bytes at %p", rw,
                              reinterpret_cast<void*>(addr), static_cast<unsigned long long>(addr - end), what,
                              static_cast<unsigned long long>(r->serial), r->size, reinterpret_cast<void*>(r->data));
            } else {
                std::snprintf(buf, sizeof buf, "out-of-bounds global %s at %p: %llu bytes before the start of %s allocation #%llu of %zu bytes at %p",
                              rw, reinterpret_cast<void*>(addr), static_cast<unsigned long long>(r->data - addr), what,
                              static_cast<unsigned long long>(r->serial), r->size, reinterpret_cast<void*>(r->data));
            }
            return buf;
        }
        case MemKind::Shared:
            std::snprintf(buf, sizeof buf, "out-of-bounds shared %s at shared address %lld: outside the CTA's %zu bytes of shared memory", rw,
                          static_cast<long long>(addr) - static_cast<long long>(r->data), r->size);
            return buf;
        case MemKind::Stack:
            std::snprintf(buf, sizeof buf, "stack overflow of a simulated thread (its locals exceed the simulator's %zu-byte stacks)", r->span);
            return buf;
    }
    return "invalid access";
}

// A generic write to the shared memory of a CTA whose proxy use is tracked: the page opens (a
// snapshot of it is kept, it becomes writable) and the write happens; see Cta::proxy_open.
bool tracked_write(Thread* t, siginfo_t* si) {
    Cta* c = t->cta;
    const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
    if (si->si_code != SEGV_ACCERR || !c->proxy_armed || a < c->window->data || a >= c->window->data + c->window_bytes) {
        return false;
    }
    const uintptr_t page = a & ~(uintptr_t(page_bytes()) - 1);
    if (c->proxy_open.count(page) != 0) {
        return false;  // already writable: not a tracking fault
    }
    const auto* p = reinterpret_cast<const uint8_t*>(page);
    c->proxy_open.emplace(page, std::vector<uint8_t>(p, p + page_bytes()));
    mprotect(reinterpret_cast<void*>(page), page_bytes(), PROT_READ | PROT_WRITE);
    return true;
}

void on_fault(int sig, siginfo_t* si, void* ucv) {
    Engine& g = eng();
    Thread* t = g.running;
    if (t == nullptr || std::this_thread::get_id() != g.gpu_id) {
        chain(sig, si, ucv);
        return;
    }
    auto* uc = static_cast<ucontext_t*>(ucv);
    if (sig == SIGSEGV && tracked_write(t, si)) {
        return;
    }
    uintptr_t pc = 0;
    bool write = false, known_rw = false;
#if defined(__x86_64__)
    pc = static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
    write = (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    known_rw = sig == SIGSEGV && si->si_code != SI_KERNEL;
#elif defined(__aarch64__)
    pc = static_cast<uintptr_t>(uc->uc_mcontext.pc);
#endif
    auto* f = new Failure();
    f->where = reinterpret_cast<void*>(pc + 1);  // symbolize() looks one byte back, as for return addresses
    const uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr);
    if (sig == SIGFPE) {
        f->code = CUDA_ERROR_LAUNCH_FAILED;
        f->title = "arithmetic fault (integer division by zero or overflow): undefined on the GPU";
    } else if (sig == SIGILL) {
        f->code = CUDA_ERROR_ILLEGAL_INSTRUCTION;
        f->title = "illegal instruction";
    } else if (sig == SIGSEGV && si->si_code == SI_KERNEL) {
        f->code = CUDA_ERROR_MISALIGNED_ADDRESS;
        f->title = "general protection fault: a misaligned vector access (a misaligned address on the GPU) or a non-canonical pointer";
    } else {
        const Region* r = mem_find_mapping(addr);
        f->code = CUDA_ERROR_ILLEGAL_ADDRESS;
        f->title = describe_access(addr, write, known_rw);
        if (r != nullptr && r->kind == MemKind::Stack) {
            f->code = CUDA_ERROR_LAUNCH_FAILED;
        }
    }
    // Unblock the signal (we leave the handler without returning) and hand the thread back to the
    // scheduler as failed; it is never resumed.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    g.pending_failure = f;
    t->state = ThreadState::Blocked;
    void* dead = nullptr;
    dksim_fiber_switch(&dead, g.sched_sp);
}

}  // namespace

void gpu_thread_signal_stack() {
    static thread_local std::vector<char> alt(size_t(256) << 10);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
}

void install_fault_handlers() {
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(sig, &sa, &g_old[sig]);
    }
}

}  // namespace dksim
