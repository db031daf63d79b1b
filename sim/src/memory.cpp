// Simulated memory. Device memory is host memory: a device pointer is the host address of the
// allocation, so kernels compiled for the host dereference it directly. Every allocation gets its
// own mapping whose data ends exactly at an inaccessible guard page, and freed allocations stay
// mapped inaccessible for a while, so reading or writing past the end of an allocation, or after it
// was freed, faults at the instruction that did it (memcheck.cpp turns that into a report).
// Fresh memory is filled with a poison byte (0xff: NaN in every float format) so that reading what
// was never written shows up in results.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "sim.hpp"

namespace dksim {

namespace {

size_t page_size() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

// Every region by the start of its mapping (including freed ones still in quarantine).
// Never destroyed: the exit-time drain (engine.cpp) still runs kernels and reports on them.
std::map<uintptr_t, Region*>& regions() {
    static auto* m = new std::map<uintptr_t, Region*>();
    return *m;
}
std::deque<Region*>& quarantine() {
    static auto* q = new std::deque<Region*>();
    return *q;
}
size_t g_quarantined = 0;
size_t g_in_use = 0;
uint64_t g_serial = 0;
constexpr size_t kQuarantineBytes = size_t(8) << 30;  // of address space
// Each region costs the process a few kernel mappings, and Linux allows 65530 by default
// (vm.max_map_count): the quarantine keeps fewer than half of that.
constexpr size_t kQuarantineRegions = 12000;

Region* map_region(MemKind kind, size_t bytes, size_t align) {
    const size_t page = page_size();
    align = align < 16 ? 16 : align;
    const size_t span = round_up(bytes == 0 ? 1 : bytes, align < 256 ? 256 : align);
    // [guard][slack + data rounded to pages][guard]
    const size_t body = round_up(span, page) + (align > page ? align : 0);
    const size_t len = body + 2 * page;
    void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        return nullptr;
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(m);
    const uintptr_t back_guard = start + len - page;
    const uintptr_t data = back_guard - span;
    if (data % align != 0) {
        munmap(m, len);
        return nullptr;  // cannot happen: span is a multiple of align, back_guard of the page
    }
    if (mprotect(reinterpret_cast<void*>(start + page), body, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, len);
        return nullptr;
    }
    auto* r = new Region{};
    r->kind = kind;
    r->map_start = start;
    r->map_len = len;
    r->data = data;
    r->size = bytes;
    r->span = span;
    r->serial = ++g_serial;
    regions()[start] = r;
    return r;
}

void unmap_region(Region* r) {
    regions().erase(r->map_start);
    munmap(reinterpret_cast<void*>(r->map_start), r->map_len);
    delete r;
}

}  // namespace

Region* mem_alloc(MemKind kind, size_t bytes, size_t align, bool poison) {
    Region* r = map_region(kind, bytes, align);
    if (r == nullptr) {
        return nullptr;
    }
    const int byte = config().poison;
    // The slack before the data is poisoned too: it is inside the mapping but outside the
    // allocation, so a read there returns poison rather than zeros.
    std::memset(reinterpret_cast<void*>(r->map_start + page_size()), poison && byte >= 0 ? byte : 0,
                r->data + r->span - (r->map_start + page_size()));
    g_in_use += r->span;
    return r;
}

CUresult mem_free(uintptr_t base, MemKind kind) {
    auto& m = regions();
    auto it = m.upper_bound(base);
    if (it == m.begin()) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    Region* r = std::prev(it)->second;
    if (r->data != base || r->kind != kind || r->freed) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    r->freed = true;
    g_in_use -= r->span;
    race_forget(r->data, r->span);
    // Keep the address range reserved and inaccessible, so a stale pointer faults (reported as a
    // use after free) instead of reaching a later allocation; give the memory back.
    const size_t page = page_size();
    madvise(reinterpret_cast<void*>(r->map_start + page), r->map_len - 2 * page, MADV_DONTNEED);
    mprotect(reinterpret_cast<void*>(r->map_start), r->map_len, PROT_NONE);
    quarantine().push_back(r);
    g_quarantined += r->map_len;
    while ((g_quarantined > kQuarantineBytes || quarantine().size() > kQuarantineRegions) && !quarantine().empty()) {
        Region* old = quarantine().front();
        quarantine().pop_front();
        g_quarantined -= old->map_len;
        unmap_region(old);
    }
    return CUDA_SUCCESS;
}

const Region* mem_find(uintptr_t p, size_t bytes) {
    auto& m = regions();
    auto it = m.upper_bound(p);
    if (it == m.begin()) {
        return nullptr;
    }
    const Region* r = std::prev(it)->second;
    if (r->freed || (r->kind != MemKind::Device && r->kind != MemKind::Host)) {
        return nullptr;
    }
    if (p < r->data || p + bytes > r->data + r->size || p + bytes < p) {
        return nullptr;
    }
    return r;
}

const Region* mem_find_mapping(uintptr_t p) {
    auto& m = regions();
    auto it = m.upper_bound(p);
    if (it == m.begin()) {
        return nullptr;
    }
    const Region* r = std::prev(it)->second;
    return p < r->map_start + r->map_len ? r : nullptr;
}

Region* mem_map(MemKind kind, size_t bytes, size_t align) { return map_region(kind, bytes, align); }

void mem_exhausted(const char* what, size_t bytes) {
    const int err = errno;
    size_t maps = 0;
    if (FILE* f = std::fopen("/proc/self/maps", "r")) {
        for (int ch = std::fgetc(f); ch != EOF; ch = std::fgetc(f)) {
            maps += ch == '\n' ? 1 : 0;
        }
        std::fclose(f);
    }
    std::fprintf(stderr,
                 "deepkern simulator: the host refused a mapping of %zu bytes for %s (%s). The process holds %zu mappings "
                 "(Linux allows vm.max_map_count, 65530 by default), %zu simulated regions of which %zu freed ones in "
                 "quarantine, %zu bytes of live device and host allocations. Fewer simulated SMs (DEEPKERN_SIM_SMS) keep "
                 "fewer CTAs, stacks and shared windows alive at once.\nseed: DEEPKERN_SIM_SEED=%llu\n",
                 bytes, what, std::strerror(err), maps, regions().size(), quarantine().size(), g_in_use,
                 static_cast<unsigned long long>(config().seed));
    std::fflush(stderr);
    std::abort();
}

size_t page_bytes() { return page_size(); }

Region* mem_map_shared(size_t bytes) {
    const size_t page = page_size();
    const size_t span = round_up(bytes == 0 ? 1 : bytes, 1024);
    const size_t body = round_up(span, page);
    const size_t len = body + 2 * page;
    void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        return nullptr;
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(m);
    const int fd = memfd_create("dksim-shared", MFD_CLOEXEC);
    void* alias = MAP_FAILED;
    if (fd >= 0 && ftruncate(fd, static_cast<off_t>(body)) == 0 &&
        mmap(reinterpret_cast<void*>(start + page), body, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) != MAP_FAILED) {
        alias = mmap(nullptr, body, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (fd >= 0) {
        close(fd);
    }
    if (alias == MAP_FAILED) {
        munmap(m, len);
        return nullptr;
    }
    auto* r = new Region{};
    r->kind = MemKind::Shared;
    r->map_start = start;
    r->map_len = len;
    r->data = start + page + body - span;
    r->size = bytes;
    r->span = span;
    r->serial = ++g_serial;
    r->alias_map = reinterpret_cast<uintptr_t>(alias);
    r->alias_len = body;
    r->alias = r->alias_map + (r->data - (start + page));
    regions()[start] = r;
    return r;
}

void mem_release(Region* r) {
    if (r != nullptr) {
        if (r->alias_map != 0) {
            munmap(reinterpret_cast<void*>(r->alias_map), r->alias_len);
        }
        unmap_region(r);
    }
}

size_t mem_in_use() { return g_in_use; }

std::string mem_check_canaries() {
    const int byte = config().poison;
    if (byte < 0) {
        return "";
    }
    const auto fill = static_cast<uint8_t>(byte);
    std::string report;
    for (auto& [start, r] : regions()) {
        if (r->freed || r->kind != MemKind::Device) {
            continue;
        }
        // The bytes between the allocation's end and its aligned span, and before its start inside
        // the first page: inside the mapping, so no fault, but no kernel may write them.
        const auto check = [&](uintptr_t from, uintptr_t to, bool after) {
            auto* p = reinterpret_cast<uint8_t*>(from);
            size_t first = SIZE_MAX, last = 0;
            for (uintptr_t i = 0; i < to - from; ++i) {
                if (p[i] != fill) {
                    first = std::min<size_t>(first, i);
                    last = i;
                    p[i] = fill;  // reported once
                }
            }
            if (first == SIZE_MAX) {
                return;
            }
            char buf[320];
            if (after) {
                std::snprintf(buf, sizeof buf, "out-of-bounds global write: bytes %zu..%zu past the end of device allocation #%llu of %zu bytes at %p",
                              first, last, static_cast<unsigned long long>(r->serial), r->size, reinterpret_cast<void*>(r->data));
            } else {
                std::snprintf(buf, sizeof buf, "out-of-bounds global write: bytes %zu..%zu before the start of device allocation #%llu of %zu bytes at %p",
                              (to - from) - last, (to - from) - first, static_cast<unsigned long long>(r->serial), r->size,
                              reinterpret_cast<void*>(r->data));
            }
            report += report.empty() ? "" : "\n";
            report += buf;
        };
        check(r->data + r->size, r->data + r->span, true);
        check(r->map_start + page_size(), r->data, false);
    }
    return report;
}

}  // namespace dksim
