// Fibers: every simulated CUDA thread runs on a stack of its own and gives the GPU thread back
// control at each operation that involves other threads. The switch saves only what the calling
// convention says a callee must preserve, so it costs a few nanoseconds.
#include <cstring>

#include "sim.hpp"

namespace dksim {

namespace {
constexpr size_t kStackBytes = size_t(256) << 10;
// Stacks of their own mapping, between guard pages, cost the process two or three kernel mappings
// each, and Linux allows 65530 in all (vm.max_map_count). Past this many, further stacks come from
// slabs of one mapping each, with a red zone below every stack: the engine checks the stack
// pointer at every switch and the red zone's pattern when the thread ends, so overflow is caught
// after the fact rather than at the fault.
constexpr size_t kGuardedStacks = 6000;
constexpr size_t kRedZone = size_t(64) << 10;
constexpr size_t kSlabStacks = 32;
constexpr size_t kCanaryWords = 8;
constexpr uint64_t kCanary = 0xdead57acca4a27edull;

std::vector<Stack>& free_stacks() {
    static auto* v = new std::vector<Stack>();  // never destroyed, as the engine
    return *v;
}
size_t g_guarded = 0;

Stack slab_stack() {
    static uintptr_t next = 0;
    static size_t left = 0;
    if (left == 0) {
        Region* r = mem_map(MemKind::Stack, kSlabStacks * (kRedZone + kStackBytes), 4096);
        if (r == nullptr) {
            mem_exhausted("a slab of simulated threads' stacks", kSlabStacks * (kRedZone + kStackBytes));
        }
        next = r->data;
        left = kSlabStacks;
    }
    Stack s;
    s.canary = next + kRedZone - kCanaryWords * 8;
    s.top = next + kRedZone + kStackBytes;
    next += kRedZone + kStackBytes;
    --left;
    auto* w = reinterpret_cast<uint64_t*>(s.canary);
    for (size_t i = 0; i < kCanaryWords; ++i) {
        w[i] = kCanary;
    }
    return s;
}
}  // namespace

Stack stack_get() {
    if (!free_stacks().empty()) {
        Stack s = free_stacks().back();
        free_stacks().pop_back();
        return s;
    }
    if (g_guarded >= kGuardedStacks) {
        return slab_stack();
    }
    Region* r = mem_map(MemKind::Stack, kStackBytes, 64);
    if (r == nullptr) {
        mem_exhausted("a simulated thread's stack", kStackBytes);
    }
    ++g_guarded;
    return Stack{r, (r->data + r->span) & ~uintptr_t(63), 0};
}

bool stack_intact(const Stack& s) {
    if (s.canary == 0) {
        return true;
    }
    const auto* w = reinterpret_cast<const uint64_t*>(s.canary);
    for (size_t i = 0; i < kCanaryWords; ++i) {
        if (w[i] != kCanary) {
            return false;
        }
    }
    return true;
}

size_t stack_bytes() { return kStackBytes; }

void stack_put(Stack s) {
    if (s.top != 0 && stack_intact(s)) {
        free_stacks().push_back(s);
    }
}

#if defined(__x86_64__)

// dksim_fiber_switch(save, next): pushes the callee-saved registers and the SSE/x87 control words,
// stores the stack pointer in *save, loads `next` and pops the same frame from there.
asm(R"(
    .text
    .globl dksim_fiber_switch
    .type dksim_fiber_switch,@function
dksim_fiber_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size dksim_fiber_switch,.-dksim_fiber_switch

    .globl dksim_fiber_start
    .type dksim_fiber_start,@function
dksim_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size dksim_fiber_start,.-dksim_fiber_start
)");

extern "C" void dksim_fiber_start();

void* fiber_init(const Stack& s, void (*fn)(void*), void* arg) {
    // The frame dksim_fiber_switch pops: control words, r15, r14, r13 = fn, r12 = arg, rbx, rbp,
    // then the return address (the start trampoline), so that after the `ret` the stack pointer
    // is 16-byte aligned, as at a call site.
    auto* top = reinterpret_cast<uint64_t*>(s.top);
    uint64_t* sp = top - 8;
    const uint32_t mxcsr = 0x1f80;
    const uint16_t fpucw = 0x037f;
    std::memcpy(&sp[0], &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(&sp[0]) + 4, &fpucw, 2);
    sp[1] = 0;                                        // r15
    sp[2] = 0;                                        // r14
    sp[3] = reinterpret_cast<uint64_t>(fn);           // r13
    sp[4] = reinterpret_cast<uint64_t>(arg);          // r12
    sp[5] = 0;                                        // rbx
    sp[6] = 0;                                        // rbp: end of the frame chain
    sp[7] = reinterpret_cast<uint64_t>(&dksim_fiber_start);
    return sp;
}

#elif defined(__aarch64__)

// The AArch64 procedure call standard: x19-x29, lr (x30), sp, d8-d15 and the FP control register.
asm(R"(
    .text
    .globl dksim_fiber_switch
    .type dksim_fiber_switch,%function
dksim_fiber_switch:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mrs x9, fpcr
    str x9, [sp, #160]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldr x9, [sp, #160]
    msr fpcr, x9
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
    .size dksim_fiber_switch,.-dksim_fiber_switch

    .globl dksim_fiber_start
    .type dksim_fiber_start,%function
dksim_fiber_start:
    mov x0, x19
    blr x20
    brk #0
    .size dksim_fiber_start,.-dksim_fiber_start
)");

extern "C" void dksim_fiber_start();

void* fiber_init(const Stack& s, void (*fn)(void*), void* arg) {
    auto* top = reinterpret_cast<uint64_t*>(s.top & ~uintptr_t(15));
    uint64_t* sp = top - 22;  // 176 bytes
    std::memset(sp, 0, 176);
    sp[0] = reinterpret_cast<uint64_t>(arg);                 // x19
    sp[1] = reinterpret_cast<uint64_t>(fn);                  // x20
    sp[11] = reinterpret_cast<uint64_t>(&dksim_fiber_start);  // x30
    return sp;
}

#else
#error "the simulator's fibers support x86-64 and AArch64"
#endif

}  // namespace dksim
