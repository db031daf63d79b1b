// The CUDA driver API, as far as cudarc and deepkern call it: devices and their attributes (a
// Hopper, compute capability 9.0), contexts, memory, copies and memsets, streams, events, stream
// memory operations, batched copies, IPC handles between the virtual ranks of one process, and
// host callbacks. Everything runs on the simulator (engine.cpp); nothing here touches a GPU.
//
// Functions that need a GPU's code loader (modules, cuLaunchKernel) return
// CUDA_ERROR_NOT_SUPPORTED: the simulator runs only kernels compiled into the program for it.
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "sim.hpp"

#define DKSIM_API extern "C" __attribute__((visibility("default")))

using namespace dksim;

namespace {

using Lock = std::unique_lock<std::mutex>;

thread_local Context* t_current = nullptr;
thread_local Stream* t_per_thread = nullptr;

bool g_initialized = false;

Lock locked() {
    Lock l(eng().mu);
    ensure_started();
    return l;
}

bool valid_device(CUdevice d) { return d >= 0 && d < config().devices; }

Context* ctx_of(CUcontext c) { return reinterpret_cast<Context*>(c); }

Stream* new_stream(Context* ctx, bool blocking) {
    Engine& g = eng();
    auto* s = new Stream();
    s->id = g.next_stream_id++;
    s->ctx = ctx;
    s->blocking = blocking;
    ctx->streams.push_back(s);
    g.streams.push_back(s);
    return s;
}

// The stream a handle names: 0 is the current context's legacy default stream, 2 its per-thread
// default stream (1, CU_STREAM_LEGACY, is the legacy one too).
Stream* resolve(CUstream h) {
    const uintptr_t v = reinterpret_cast<uintptr_t>(h);
    Context* ctx = t_current != nullptr ? t_current : eng().primary[0];
    if (v == 0 || v == 1) {
        return ctx->legacy;
    }
    if (v == 2) {
        if (t_per_thread == nullptr) {
            t_per_thread = new_stream(ctx, true);
        }
        return t_per_thread;
    }
    for (Stream* s : eng().streams) {
        if (s == reinterpret_cast<Stream*>(h) && !s->destroyed) {
            return s;
        }
    }
    return nullptr;
}

bool device_range(CUdeviceptr p, size_t bytes) { return bytes == 0 || mem_find(p, bytes) != nullptr; }

void complain(const char* api, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void complain(const char* api, const char* fmt, ...) {
    if (!config().verbose) {
        return;
    }
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "deepkern simulator: %s: %s\n", api, buf);
}

// Waits until every operation enqueued on `s` so far is done; returns the stream's error.
CUresult sync_stream(Lock& l, Stream* s) {
    OpPtr last = s->last;
    if (last) {
        wait_until(l, [last] { return last->done; });
    }
    return s->error;
}

// Waits until every operation enqueued so far on `device` is done; returns the first error among
// them. One
// device's implicit synchronisations (cuCtxSynchronize, cuMemFree, ...) never wait for another's
// work: simulated devices stand for the GPUs of separate processes, and a rank that frees memory
// must not wait for a peer's kernel that waits, in turn, for this rank.
CUresult sync_device(Lock& l, int device) {
    std::vector<OpPtr> lasts;
    for (Stream* s : eng().streams) {
        if (s->last && s->ctx->device == device) {
            lasts.push_back(s->last);
        }
    }
    wait_until(l, [&lasts] {
        for (const OpPtr& o : lasts) {
            if (!o->done) {
                return false;
            }
        }
        return true;
    });
    CUresult r = CUDA_SUCCESS;
    for (const OpPtr& o : lasts) {
        if (r == CUDA_SUCCESS && o->result != CUDA_SUCCESS) {
            r = o->result;
        }
    }
    return r;
}

// Pageable host memory: neither device memory nor pinned host memory (cuMemHostAlloc).
bool pageable(uintptr_t p) { return mem_find_mapping(p) == nullptr; }

// Enqueues copies in one operation, with the driver's rules for pageable host memory: a source
// there is staged at once (the caller may reuse its buffer as soon as the call returns), and a
// destination there makes the call return only when the copy is done.
CUresult enqueue_copies(Lock& l, const char* api, Stream* s, const std::vector<Copy>& copies) {
    size_t staged = 0;
    bool wait = false;
    for (const Copy& c : copies) {
        const bool dst_device = !pageable(c.dst), src_device = !pageable(c.src);
        if ((dst_device && !device_range(c.dst, c.bytes)) || (src_device && !device_range(c.src, c.bytes))) {
            complain(api, "a copy of %zu bytes from 0x%lx to 0x%lx leaves its allocation", c.bytes, static_cast<unsigned long>(c.src),
                     static_cast<unsigned long>(c.dst));
            return CUDA_ERROR_INVALID_VALUE;
        }
        staged += src_device ? 0 : c.bytes;
        wait = wait || !dst_device;
    }
    OpPtr op = enqueue(s, OpKind::Copy, api);
    op->staging.resize(staged);
    size_t at = 0;
    for (const Copy& c : copies) {
        if (pageable(c.src) && c.bytes > 0) {
            std::memcpy(op->staging.data() + at, reinterpret_cast<const void*>(c.src), c.bytes);
            op->copies.push_back(Copy{c.dst, reinterpret_cast<uintptr_t>(op->staging.data() + at), c.bytes});
            at += c.bytes;
        } else {
            op->copies.push_back(c);
        }
    }
    if (wait) {
        wait_until(l, [op] { return op->done; });
        return op->result;
    }
    return CUDA_SUCCESS;
}

CUresult copy_async(const char* api, uintptr_t dst, uintptr_t src, size_t bytes, CUstream h, bool dst_device, bool src_device) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if ((dst_device && pageable(dst)) || (src_device && pageable(src))) {
        complain(api, "0x%lx or 0x%lx is not device memory", static_cast<unsigned long>(dst), static_cast<unsigned long>(src));
        return CUDA_ERROR_INVALID_VALUE;
    }
    return enqueue_copies(l, api, s, {Copy{dst, src, bytes}});
}

CUresult copy_sync(const char* api, uintptr_t dst, uintptr_t src, size_t bytes, bool dst_device, bool src_device) {
    CUresult r = copy_async(api, dst, src, bytes, nullptr, dst_device, src_device);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    Lock l = locked();
    return sync_stream(l, resolve(nullptr));
}

CUresult memset_async(const char* api, CUdeviceptr dst, uint64_t value, unsigned elem, size_t count, CUstream h) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (dst % elem != 0 || !device_range(dst, count * elem)) {
        complain(api, "%zu elements of %u bytes at 0x%lx are not inside one device allocation (or misaligned)", count, elem,
                 static_cast<unsigned long>(dst));
        return CUDA_ERROR_INVALID_VALUE;
    }
    OpPtr op = enqueue(s, OpKind::Memset, api);
    op->addr = dst;
    op->value = value;
    op->elem = elem;
    op->count = count;
    return CUDA_SUCCESS;
}

}  // namespace

namespace dksim {
Stream* stream_of(CUstream s) { return resolve(s); }
Context* current_context() { return t_current != nullptr ? t_current : eng().primary[0]; }
}  // namespace dksim

// ---- Initialisation, devices -------------------------------------------------------------------

DKSIM_API CUresult cuInit(unsigned int flags) {
    if (flags != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    g_initialized = true;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDriverGetVersion(int* v) {
    if (v == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *v = 13000;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceGetCount(int* n) {
    if (n == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *n = config().devices;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (d == nullptr || !valid_device(ordinal)) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *d = ordinal;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (name == nullptr || len <= 0 || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::snprintf(name, static_cast<size_t>(len), "deepkern simulator (Hopper sm_90a model)");
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice d) {
    if (uuid == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::memset(uuid->bytes, 0, sizeof uuid->bytes);
    std::memcpy(uuid->bytes, "dksim", 5);
    uuid->bytes[15] = static_cast<char>(d);
    return CUDA_SUCCESS;
}

#undef cuDeviceGetUuid
DKSIM_API CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice d) { return cuDeviceGetUuid_v2(uuid, d); }

DKSIM_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (bytes == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *bytes = config().memory;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    if (v == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    int x = 0;
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: x = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: x = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: x = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: x = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: x = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: x = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: x = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: x = kDefaultMaxDynamicShared; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: x = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: x = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_PITCH: x = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: x = kSmRegisters; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: x = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: x = 512; break;
        case CU_DEVICE_ATTRIBUTE_GPU_OVERLAP: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: x = config().sms; break;
        case CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: x = CU_COMPUTEMODE_DEFAULT; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: x = 0x10 + d; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: x = 3201000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: x = 6144; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: x = 50 << 20; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: x = kSmMaxThreads; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: x = 3; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: x = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: x = kSmSharedBytes; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: x = kSmRegisters; break;
        case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: x = kMaxSharedPerCta; break;
        case CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_WAIT_VALUE_NOR: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: x = kSmMaxCtas; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: x = 1; break;  // cuMemAllocAsync / cuMemFreeAsync, as cudarc uses them
        case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: x = kCtaReservedShared; break;
        case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH: x = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE: x = 0; break;
        case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: x = 0; break;
        default: x = 0; break;
    }
    *v = x;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceComputeCapability(int* major, int* minor, CUdevice d) {
    if (major == nullptr || minor == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *major = 9;
    *minor = 0;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDeviceCanAccessPeer(int* can, CUdevice a, CUdevice b) {
    if (can == nullptr || !valid_device(a) || !valid_device(b)) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *can = a != b ? 1 : 0;
    return CUDA_SUCCESS;
}

// ---- Contexts ------------------------------------------------------------------------------------

DKSIM_API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (c == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    Lock l = locked();
    Context* ctx = eng().primary[static_cast<size_t>(d)];
    ++ctx->refs;
    *c = reinterpret_cast<CUcontext>(ctx);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (!valid_device(d)) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    Lock l = locked();
    Context* ctx = eng().primary[static_cast<size_t>(d)];
    if (ctx->refs > 0) {
        --ctx->refs;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned int* flags, int* active) {
    if (!valid_device(d) || flags == nullptr || active == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    *flags = 0;
    *active = eng().primary[static_cast<size_t>(d)]->refs > 0 ? 1 : 0;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned int) { return valid_device(d) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }

DKSIM_API CUresult cuCtxCreate_v4(CUcontext* c, CUctxCreateParams*, unsigned int, CUdevice d) {
    if (c == nullptr || !valid_device(d)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    auto* ctx = new Context();
    ctx->device = d;
    ctx->primary = false;
    ctx->refs = 1;
    auto* legacy = new Stream();
    legacy->id = eng().next_stream_id++;
    legacy->ctx = ctx;
    legacy->legacy = true;
    ctx->legacy = legacy;
    ctx->streams.push_back(legacy);
    eng().streams.push_back(legacy);
    *c = reinterpret_cast<CUcontext>(ctx);
    t_current = ctx;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxDestroy_v2(CUcontext c) {
    if (c == nullptr) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    Lock l = locked();
    sync_device(l, ctx_of(c)->device);
    if (t_current == ctx_of(c)) {
        t_current = nullptr;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxGetCurrent(CUcontext* c) {
    if (c == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *c = reinterpret_cast<CUcontext>(t_current);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxSetCurrent(CUcontext c) {
    t_current = ctx_of(c);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxPushCurrent_v2(CUcontext c) {
    t_current = ctx_of(c);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c != nullptr) {
        *c = reinterpret_cast<CUcontext>(t_current);
    }
    t_current = nullptr;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxGetDevice(CUdevice* d) {
    if (d == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (t_current == nullptr) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *d = t_current->device;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxSynchronize() {
    Lock l = locked();
    return sync_device(l, current_context()->device);
}

DKSIM_API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least != nullptr) {
        *least = 0;
    }
    if (greatest != nullptr) {
        *greatest = -5;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxGetLimit(size_t* v, CUlimit limit) {
    if (v == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *v = limit == CU_LIMIT_STACK_SIZE ? 1024 : 0;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuCtxSetLimit(CUlimit, size_t) { return CUDA_SUCCESS; }
DKSIM_API CUresult cuCtxGetFlags(unsigned int* flags) {
    if (flags != nullptr) {
        *flags = 0;
    }
    return CUDA_SUCCESS;
}
DKSIM_API CUresult cuCtxSetFlags(unsigned int) { return CUDA_SUCCESS; }
DKSIM_API CUresult cuCtxGetApiVersion(CUcontext, unsigned int* v) {
    if (v != nullptr) {
        *v = 13000;
    }
    return CUDA_SUCCESS;
}
DKSIM_API CUresult cuCtxEnablePeerAccess(CUcontext, unsigned int) { return CUDA_SUCCESS; }
DKSIM_API CUresult cuCtxGetCacheConfig(CUfunc_cache* c) {
    if (c != nullptr) {
        *c = CU_FUNC_CACHE_PREFER_NONE;
    }
    return CUDA_SUCCESS;
}
DKSIM_API CUresult cuCtxSetCacheConfig(CUfunc_cache) { return CUDA_SUCCESS; }

// ---- Memory ------------------------------------------------------------------------------------

namespace {

// Device memory of `bytes` (256-byte aligned, poisoned) within the reported capacity, or null for
// no bytes; the engine's lock is held.
CUresult alloc_device(CUdeviceptr* p, size_t bytes) {
    if (bytes == 0) {
        *p = 0;
        return CUDA_SUCCESS;
    }
    if (bytes > config().memory - std::min(config().memory, mem_in_use())) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    Region* r = mem_alloc(MemKind::Device, bytes, 256, true);
    if (r == nullptr) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *p = r->data;
    return CUDA_SUCCESS;
}

}  // namespace

DKSIM_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (p == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    return alloc_device(p, bytes);
}

DKSIM_API CUresult cuMemFree_v2(CUdeviceptr p) {
    if (p == 0) {
        return CUDA_SUCCESS;
    }
    Lock l = locked();
    // As cudaFree does, wait for the (current) device: work still in flight may use the memory.
    sync_device(l, current_context()->device);
    return mem_free(p, MemKind::Device);
}

// Stream-ordered allocation (the device's default pool). The memory exists at once (a pool hands
// out its addresses at the call); the free is an operation of the stream, so memory the stream's
// earlier work uses stays valid until that work is done, and no host thread waits. As with any
// free, work that touches the memory after the free operation ran faults (the quarantine).
DKSIM_API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream h) {
    if (p == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    if (resolve(h) == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return alloc_device(p, bytes);
}

DKSIM_API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream h) {
    if (p == 0) {
        return CUDA_SUCCESS;
    }
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    const Region* r = mem_find(p, 1);
    if (r == nullptr || r->data != p || r->kind != MemKind::Device) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    OpPtr op = enqueue(s, OpKind::Free, "cuMemFreeAsync");
    op->addr = p;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    if (p == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    Region* r = mem_alloc(MemKind::Host, bytes, 256, false);
    if (r == nullptr) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *p = reinterpret_cast<void*>(r->data);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned int) { return cuMemAllocHost_v2(p, bytes); }

DKSIM_API CUresult cuMemFreeHost(void* p) {
    if (p == nullptr) {
        return CUDA_SUCCESS;
    }
    Lock l = locked();
    sync_device(l, current_context()->device);
    return mem_free(reinterpret_cast<uintptr_t>(p), MemKind::Host);
}

DKSIM_API CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned int) {
    if (d == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *d = reinterpret_cast<CUdeviceptr>(p);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Lock l = locked();
    const size_t used = std::min(config().memory, mem_in_use());
    if (free_bytes != nullptr) {
        *free_bytes = config().memory - used;
    }
    if (total != nullptr) {
        *total = config().memory;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* size, CUdeviceptr p) {
    Lock l = locked();
    const Region* r = mem_find(p, 1);
    if (r == nullptr) {
        return CUDA_ERROR_NOT_FOUND;
    }
    if (base != nullptr) {
        *base = r->data;
    }
    if (size != nullptr) {
        *size = r->size;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuPointerGetAttribute(void* data, CUpointer_attribute attr, CUdeviceptr p) {
    Lock l = locked();
    const Region* r = mem_find(p, 1);
    switch (attr) {
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
            if (r == nullptr) {
                return CUDA_ERROR_INVALID_VALUE;
            }
            *static_cast<unsigned int*>(data) = r->kind == MemKind::Device ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST;
            return CUDA_SUCCESS;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
            *static_cast<int*>(data) = 0;
            return CUDA_SUCCESS;
        case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
            if (r == nullptr) {
                return CUDA_ERROR_INVALID_VALUE;
            }
            *static_cast<CUdeviceptr*>(data) = r->data;
            return CUDA_SUCCESS;
        case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
            if (r == nullptr) {
                return CUDA_ERROR_INVALID_VALUE;
            }
            *static_cast<size_t*>(data) = r->size;
            return CUDA_SUCCESS;
        default:
            return CUDA_ERROR_NOT_SUPPORTED;
    }
}

// ---- Copies and memsets ------------------------------------------------------------------------

DKSIM_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    return copy_async("cuMemcpyHtoDAsync", dst, reinterpret_cast<uintptr_t>(src), bytes, s, true, false);
}
DKSIM_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    return copy_async("cuMemcpyDtoHAsync", reinterpret_cast<uintptr_t>(dst), src, bytes, s, false, true);
}
DKSIM_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    return copy_async("cuMemcpyDtoDAsync", dst, src, bytes, s, true, true);
}
DKSIM_API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    // Unified addressing: either end may be host or device memory.
    const bool dd = mem_find_mapping(dst) != nullptr, sd = mem_find_mapping(src) != nullptr;
    return copy_async("cuMemcpyAsync", dst, src, bytes, s, dd, sd);
}
DKSIM_API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t bytes, CUstream s) {
    return copy_async("cuMemcpyPeerAsync", dst, src, bytes, s, true, true);
}
DKSIM_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    return copy_sync("cuMemcpyHtoD", dst, reinterpret_cast<uintptr_t>(src), bytes, true, false);
}
DKSIM_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    return copy_sync("cuMemcpyDtoH", reinterpret_cast<uintptr_t>(dst), src, bytes, false, true);
}
DKSIM_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return copy_sync("cuMemcpyDtoD", dst, src, bytes, true, true); }
DKSIM_API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    const bool dd = mem_find_mapping(dst) != nullptr, sd = mem_find_mapping(src) != nullptr;
    return copy_sync("cuMemcpy", dst, src, bytes, dd, sd);
}
DKSIM_API CUresult cuMemcpyPeer(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t bytes) {
    return copy_sync("cuMemcpyPeer", dst, src, bytes, true, true);
}

DKSIM_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) { return memset_async("cuMemsetD8Async", dst, v, 1, n, s); }
DKSIM_API CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, CUstream s) {
    return memset_async("cuMemsetD16Async", dst, v, 2, n, s);
}
DKSIM_API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s) {
    return memset_async("cuMemsetD32Async", dst, v, 4, n, s);
}
DKSIM_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult r = memset_async("cuMemsetD8", dst, v, 1, n, nullptr);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    Lock l = locked();
    return sync_stream(l, resolve(nullptr));
}
DKSIM_API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n) {
    CUresult r = memset_async("cuMemsetD32", dst, v, 4, n, nullptr);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    Lock l = locked();
    return sync_stream(l, resolve(nullptr));
}

// Batched copies (CUDA 12.8+): one operation moving every (dst, src, size) in order.
DKSIM_API CUresult cuMemcpyBatchAsync_v2(CUdeviceptr* dsts, CUdeviceptr* srcs, size_t* sizes, size_t count, CUmemcpyAttributes* attrs,
                                         size_t* attr_idxs, size_t num_attrs, CUstream h) {
    if (count == 0 || dsts == nullptr || srcs == nullptr || sizes == nullptr || attrs == nullptr || attr_idxs == nullptr || num_attrs == 0 ||
        num_attrs > count) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (size_t i = 0; i < num_attrs; ++i) {
        if (attr_idxs[i] >= count || (i > 0 && attr_idxs[i] <= attr_idxs[i - 1]) || (i == 0 && attr_idxs[0] != 0)) {
            return CUDA_ERROR_INVALID_VALUE;
        }
        // A stream-ordered source is the only order a batch on the legacy stream cannot use.
        if (attrs[i].srcAccessOrder == CU_MEMCPY_SRC_ACCESS_ORDER_INVALID) {
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (h == nullptr || reinterpret_cast<uintptr_t>(h) == 1) {
        return CUDA_ERROR_INVALID_VALUE;  // the legacy default stream is refused by the driver
    }
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    std::vector<Copy> copies;
    for (size_t i = 0; i < count; ++i) {
        copies.push_back(Copy{dsts[i], srcs[i], sizes[i]});
    }
    return enqueue_copies(l, "cuMemcpyBatchAsync", s, copies);
}

// ---- Streams -----------------------------------------------------------------------------------

DKSIM_API CUresult cuStreamCreate(CUstream* s, unsigned int flags) {
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    Stream* st = new_stream(current_context(), (flags & CU_STREAM_NON_BLOCKING) == 0);
    *s = reinterpret_cast<CUstream>(st);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int flags, int) { return cuStreamCreate(s, flags); }

DKSIM_API CUresult cuStreamDestroy_v2(CUstream h) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr || s->legacy) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // Work already enqueued still runs; the handle is gone at once.
    s->destroyed = true;
    auto& v = s->ctx->streams;
    v.erase(std::remove(v.begin(), v.end(), s), v.end());
    if (t_per_thread == s) {
        t_per_thread = nullptr;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamSynchronize(CUstream h) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return sync_stream(l, s);
}

DKSIM_API CUresult cuStreamQuery(CUstream h) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    OpPtr last = s->last;
    if (last) {
        drive(l, [last] { return last->done; });
        if (!last->done) {
            return CUDA_ERROR_NOT_READY;
        }
    }
    return s->error;
}

DKSIM_API CUresult cuStreamWaitEvent(CUstream h, CUevent e, unsigned int) {
    Lock l = locked();
    Stream* s = resolve(h);
    auto* ev = reinterpret_cast<Event*>(e);
    if (s == nullptr || ev == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!ev->record) {
        return CUDA_SUCCESS;  // never recorded: nothing to wait for
    }
    OpPtr op = enqueue(s, OpKind::WaitEvent, "cuStreamWaitEvent");
    op->deps.push_back(ev->record);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamGetFlags(CUstream h, unsigned int* flags) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr || flags == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *flags = s->blocking ? CU_STREAM_DEFAULT : CU_STREAM_NON_BLOCKING;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamGetPriority(CUstream, int* p) {
    if (p != nullptr) {
        *p = 0;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamGetCtx(CUstream h, CUcontext* c) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr || c == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *c = reinterpret_cast<CUcontext>(s->ctx);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamIsCapturing(CUstream, CUstreamCaptureStatus* status) {
    if (status != nullptr) {
        *status = CU_STREAM_CAPTURE_STATUS_NONE;
    }
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuStreamBeginCapture_v2(CUstream, CUstreamCaptureMode) { return CUDA_ERROR_NOT_SUPPORTED; }

namespace {
CUresult write_value(CUstream h, CUdeviceptr addr, uint64_t value, bool is64, unsigned int flags) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (addr % (is64 ? 8 : 4) != 0 || (flags & ~CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER) != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!device_range(addr, is64 ? 8 : 4) && mem_find_mapping(addr) != nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    OpPtr op = enqueue(s, OpKind::WriteValue, is64 ? "cuStreamWriteValue64" : "cuStreamWriteValue32");
    op->addr = addr;
    op->value = value;
    op->value64 = is64;
    op->flags = flags;
    return CUDA_SUCCESS;
}

CUresult wait_value(CUstream h, CUdeviceptr addr, uint64_t value, bool is64, unsigned int flags) {
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (addr % (is64 ? 8 : 4) != 0 || (flags & 0xf) > CU_STREAM_WAIT_VALUE_NOR) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    OpPtr op = enqueue(s, OpKind::WaitValue, is64 ? "cuStreamWaitValue64" : "cuStreamWaitValue32");
    op->addr = addr;
    op->value = value;
    op->value64 = is64;
    op->flags = flags;
    return CUDA_SUCCESS;
}
}  // namespace

DKSIM_API CUresult cuStreamWriteValue32_v2(CUstream s, CUdeviceptr addr, cuuint32_t value, unsigned int flags) {
    return write_value(s, addr, value, false, flags);
}
DKSIM_API CUresult cuStreamWriteValue64_v2(CUstream s, CUdeviceptr addr, cuuint64_t value, unsigned int flags) {
    return write_value(s, addr, value, true, flags);
}
DKSIM_API CUresult cuStreamWaitValue32_v2(CUstream s, CUdeviceptr addr, cuuint32_t value, unsigned int flags) {
    return wait_value(s, addr, value, false, flags);
}
DKSIM_API CUresult cuStreamWaitValue64_v2(CUstream s, CUdeviceptr addr, cuuint64_t value, unsigned int flags) {
    return wait_value(s, addr, value, true, flags);
}

DKSIM_API CUresult cuLaunchHostFunc(CUstream h, CUhostFn fn, void* data) {
    if (fn == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    Stream* s = resolve(h);
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    OpPtr op = enqueue(s, OpKind::HostFunc, "cuLaunchHostFunc");
    op->host_fn = fn;
    op->host_data = data;
    return CUDA_SUCCESS;
}

// ---- Events ------------------------------------------------------------------------------------

DKSIM_API CUresult cuEventCreate(CUevent* e, unsigned int flags) {
    if (e == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    auto* ev = new Event();
    ev->flags = flags;
    ev->ctx = current_context();
    *e = reinterpret_cast<CUevent>(ev);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuEventDestroy_v2(CUevent e) {
    if (e == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    Lock l = locked();
    delete reinterpret_cast<Event*>(e);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuEventRecord(CUevent e, CUstream h) {
    Lock l = locked();
    auto* ev = reinterpret_cast<Event*>(e);
    Stream* s = resolve(h);
    if (ev == nullptr || s == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    ev->record = enqueue(s, OpKind::Record, "cuEventRecord");
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuEventRecordWithFlags(CUevent e, CUstream h, unsigned int) { return cuEventRecord(e, h); }

DKSIM_API CUresult cuEventQuery(CUevent e) {
    Lock l = locked();
    auto* ev = reinterpret_cast<Event*>(e);
    if (ev == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    OpPtr r = ev->record;
    if (!r) {
        return CUDA_SUCCESS;
    }
    drive(l, [r] { return r->done; });
    return r->done ? r->result : CUDA_ERROR_NOT_READY;
}

DKSIM_API CUresult cuEventSynchronize(CUevent e) {
    Lock l = locked();
    auto* ev = reinterpret_cast<Event*>(e);
    if (ev == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    OpPtr r = ev->record;
    if (!r) {
        return CUDA_SUCCESS;
    }
    wait_until(l, [r] { return r->done; });
    return r->result;
}

DKSIM_API CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    Lock l = locked();
    auto* a = reinterpret_cast<Event*>(start);
    auto* b = reinterpret_cast<Event*>(end);
    if (ms == nullptr || a == nullptr || b == nullptr) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if ((a->flags & CU_EVENT_DISABLE_TIMING) != 0 || (b->flags & CU_EVENT_DISABLE_TIMING) != 0 || !a->record || !b->record) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!a->record->done || !b->record->done) {
        return CUDA_ERROR_NOT_READY;
    }
    // Virtual time: it orders events but measures nothing about a GPU.
    *ms = static_cast<float>(static_cast<double>(b->record->done_at_ns) - static_cast<double>(a->record->done_at_ns)) / 1e6f;
    return CUDA_SUCCESS;
}

#undef cuEventElapsedTime
DKSIM_API CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime_v2(ms, start, end); }

// ---- IPC between the virtual ranks of this process --------------------------------------------

namespace {
constexpr uint64_t kIpcMagic = 0x64'6b'73'69'6d'69'70'63ull;  // "dksimipc"
struct IpcHandle {
    uint64_t magic;
    uint64_t base;
    uint64_t serial;
    uint64_t pid;
};
static_assert(sizeof(IpcHandle) <= sizeof(CUipcMemHandle), "IPC handle");
}  // namespace

DKSIM_API CUresult cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr p) {
    if (h == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Lock l = locked();
    const Region* r = mem_find(p, 1);
    if (r == nullptr || r->kind != MemKind::Device || r->data != p) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::memset(h, 0, sizeof *h);
    const IpcHandle x{kIpcMagic, r->data, r->serial, static_cast<uint64_t>(getpid())};
    std::memcpy(h->reserved, &x, sizeof x);
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr* p, CUipcMemHandle h, unsigned int) {
    if (p == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    IpcHandle x{};
    std::memcpy(&x, h.reserved, sizeof x);
    if (x.magic != kIpcMagic) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (x.pid != static_cast<uint64_t>(getpid())) {
        return CUDA_ERROR_NOT_SUPPORTED;  // the simulator's ranks share one process
    }
    Lock l = locked();
    const Region* r = mem_find(x.base, 1);
    if (r == nullptr || r->serial != x.serial || r->data != x.base) {
        return CUDA_ERROR_INVALID_VALUE;  // freed since the handle was made
    }
    *p = x.base;
    return CUDA_SUCCESS;
}

DKSIM_API CUresult cuIpcCloseMemHandle(CUdeviceptr) { return CUDA_SUCCESS; }

// ---- What the simulator does not provide -------------------------------------------------------

DKSIM_API CUresult cuModuleLoadData(CUmodule*, const void*) { return CUDA_ERROR_NOT_SUPPORTED; }
DKSIM_API CUresult cuModuleLoad(CUmodule*, const char*) { return CUDA_ERROR_NOT_SUPPORTED; }
DKSIM_API CUresult cuModuleUnload(CUmodule) { return CUDA_ERROR_NOT_SUPPORTED; }
DKSIM_API CUresult cuModuleGetFunction(CUfunction*, CUmodule, const char*) { return CUDA_ERROR_NOT_SUPPORTED; }
DKSIM_API CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void**, void**) {
    return CUDA_ERROR_NOT_SUPPORTED;
}

// ---- Errors --------------------------------------------------------------------------------------

namespace {
struct ErrorName {
    CUresult code;
    const char* name;
    const char* text;
};
const ErrorName kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_LAUNCH_TIMEOUT, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated (a deadlock on the simulator)"},
    {CUDA_ERROR_ILLEGAL_INSTRUCTION, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {CUDA_ERROR_MISALIGNED_ADDRESS, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported (by the simulator)"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};
}  // namespace

DKSIM_API CUresult cuGetErrorName(CUresult e, const char** s) {
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (const ErrorName& x : kErrors) {
        if (x.code == e) {
            *s = x.name;
            return CUDA_SUCCESS;
        }
    }
    *s = "CUDA_ERROR_UNKNOWN";
    return CUDA_ERROR_INVALID_VALUE;
}

DKSIM_API CUresult cuGetErrorString(CUresult e, const char** s) {
    if (s == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (const ErrorName& x : kErrors) {
        if (x.code == e) {
            *s = x.text;
            return CUDA_SUCCESS;
        }
    }
    *s = "unknown error";
    return CUDA_ERROR_INVALID_VALUE;
}

// The seed of this run, for the test harness's header line.
DKSIM_API uint64_t dksim_seed() { return config().seed; }
DKSIM_API int dksim_sms() { return config().sms; }
