// Fibers: every simulated CUDA thread runs on a stack of its own and gives the GPU thread back
// control at each operation that involves other threads. The switch saves only what the calling
// convention says a callee must preserve, so it costs a few nanoseconds.
#include <cstring>

#include "sim.hpp"

namespace dksim {

namespace {
constexpr size_t kStackBytes = size_t(256) << 10;
std::vector<Stack>& free_stacks() {
    static auto* v = new std::vector<Stack>();  // never destroyed, as the engine
    return *v;
}
}  // namespace

Stack stack_get() {
    if (!free_stacks().empty()) {
        Stack s = free_stacks().back();
        free_stacks().pop_back();
        return s;
    }
    Region* r = mem_map(MemKind::Stack, kStackBytes, 64);
    return Stack{r, (r->data + r->span) & ~uintptr_t(63)};
}

void stack_put(Stack s) {
    if (s.region != nullptr) {
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
