// Host threads for the self-test's NCCL scenarios (selftest.cu), in a unit of their own: the
// kernel shim that selftest.cu is compiled with defines clock(), which <thread> would collide with.
#include <thread>
#include <vector>

extern "C" void dksim_selftest_threads(int n, void (*fn)(int, void*), void* arg) {
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
        threads.emplace_back(fn, i, arg);
    }
    for (std::thread& t : threads) {
        t.join();
    }
}

extern "C" void dksim_selftest_yield() { std::this_thread::yield(); }
