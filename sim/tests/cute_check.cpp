// The simulator's reading of Hopper's layouts, checked bit for bit against CuTe (CUTLASS's
// header-only layout algebra, compiled for the host), so that it does not merely repeat what the
// kernels' authors believe:
// - swizzle: sim/src/layouts.hpp's swizzle against Swizzle<1..3,4,3> on every shared address;
// - accumulators: the fragment map against CLayout_64xN for every N given;
// - descriptors: every wgmma descriptor the kernels built during a simulated run (the file
//   DEEPKERN_SIM_DESCRIPTORS names) is matched to the CuTe layout of its operand (GEMM A and B of
//   every tile, MLA Q, K, P and V): its LBO, SBO and swizzle mode must equal make_gmma_desc's for
//   that layout, and the simulator's decoded (row, k) -> address map must equal CuTe's.
//
// Usage: cute_check <descriptor dump>   (prints a summary; exit status 1 on any mismatch)
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "layouts.hpp"

using namespace cute;
namespace L = dksim::layouts;

namespace {

int g_failures = 0;

void failure(const std::string& what) {
    if (g_failures < 20) {
        std::printf("MISMATCH %s\n", what.c_str());
    }
    ++g_failures;
}

// ---- swizzle ---------------------------------------------------------------------------------------

template <int B>
void check_swizzle(uint32_t span) {
    for (uint32_t a = 0; a < (1u << 18); ++a) {
        if (L::swizzle(a, span) != static_cast<uint32_t>(Swizzle<B, 4, 3>{}(a))) {
            failure("swizzle span " + std::to_string(span) + " at address " + std::to_string(a));
            return;
        }
    }
    std::printf("swizzle %3u B: equal to Swizzle<%d,4,3> on 2^18 shared addresses\n", span, B);
}

// ---- accumulators ------------------------------------------------------------------------------------

template <int N>
void check_accumulator() {
    using CL = SM90::GMMA::CLayout_64xN<N>;
    for (int t = 0; t < 128; ++t) {
        for (int v = 0; v < N / 2; ++v) {
            const int idx = CL{}(t, v);  // column-major index into the 64 x N tile
            if (L::acc_row(t, v) != idx % 64 || L::acc_col(t, v) != idx / 64) {
                failure("accumulator m64n" + std::to_string(N) + " thread " + std::to_string(t) + " register " + std::to_string(v));
                return;
            }
        }
    }
}

template <int... Ns>
void check_accumulators(std::integer_sequence<int, Ns...>) {
    (check_accumulator<Ns>(), ...);
    std::printf("accumulators: equal to CLayout_64xN for N in {");
    ((std::printf(" %d", Ns)), ...);
    std::printf(" }\n");
}

// ---- descriptors -----------------------------------------------------------------------------------

// One wgmma operand as CuTe lays it out: what make_gmma_desc gives for it, and where each (mn, k)
// lies relative to the 1024-aligned origin of the tile.
struct Operand {
    std::string name;
    int type;  // dksim::MmaType: 0 E4M3, 1 BF16, 2 F16
    bool mn_major;
    int rows, k;
    uint32_t lbo, sbo, span;  // make_gmma_desc's fields, in bytes
    uint32_t start;           // the operand's start offset from the origin (unswizzled)
    std::vector<uint32_t> addr;  // [rows][k]: byte offset from the origin
};

std::vector<Operand> g_operands;

// Records every MMA-sized sub-tile of `full` (R x Ktile elements of T, major `major`) at each K step.
template <class T, SM90::GMMA::Major kMajor, int R, int KMma, class FullLayout>
void add_operand(const std::string& name, int type, FullLayout full, int row0 = 0) {
    constexpr int e = sizeof(T);
    alignas(1024) static T buf[1 << 16];
    auto tensor = make_tensor(make_smem_ptr(buf), full);
    const int ktile = size<1>(full);
    for (int k0 = 0; k0 < ktile; k0 += KMma) {
        auto sub = local_tile(tensor, make_shape(Int<R>{}, Int<KMma>{}), make_coord(row0 / R, k0 / KMma));
        // make_gmma_desc cannot take a host pointer's shared address and says so on stdout: the
        // start address is compared separately (below), so that complaint is silenced.
        std::fflush(stdout);
        const int saved = dup(1);
        const int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        const GmmaDescriptor d = SM90::GMMA::make_gmma_desc<kMajor>(sub);
        std::fflush(stdout);
        dup2(saved, 1);
        close(saved);
        close(null);
        Operand op;
        op.name = name + " k0=" + std::to_string(k0);
        op.type = type;
        op.mn_major = kMajor == SM90::GMMA::Major::MN;
        op.rows = R;
        op.k = KMma;
        op.lbo = uint32_t(d.bitfield.leading_byte_offset_) << 4;
        op.sbo = uint32_t(d.bitfield.stride_byte_offset_) << 4;
        const int lt = d.bitfield.layout_type_;
        op.span = lt == 1 ? 128 : (lt == 2 ? 64 : (lt == 3 ? 32 : 0));
        // Offsets from the operand's 1024-aligned origin (its first row at K = 0; rows start on
        // 8-row atoms, so the swizzle is the same relative to it): the unswizzled offset of its
        // first element, what a descriptor's start holds, and the swizzled address of each element.
        const uint32_t origin = uint32_t(full.layout_b()(row0, 0)) * e;
        op.start = uint32_t(full.layout_b()(row0, k0)) * e - origin;
        for (int r = 0; r < R; ++r) {
            for (int k = 0; k < KMma; ++k) {
                const auto* p = raw_pointer_cast(&tensor(row0 + r, k0 + k));
                op.addr.push_back(uint32_t(reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(buf)) - origin);
            }
        }
        g_operands.push_back(std::move(op));
    }
}

template <int N>
void add_gemm_b() {
    using E = cutlass::float_e4m3_t;
    add_operand<E, SM90::GMMA::Major::K, N, 32>("GEMM B n" + std::to_string(N), 0,
                                                tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, make_shape(Int<N>{}, Int<128>{})));
}

void add_kernel_operands() {
    using E = cutlass::float_e4m3_t;
    using B16 = cutlass::bfloat16_t;
    using H16 = cutlass::half_t;
    // FP8 GEMM: per consumer warpgroup, 64 rows of A x 128 of K; B: block_n rows x 128 of K.
    add_operand<E, SM90::GMMA::Major::K, 64, 32>("GEMM A (and B of N = 64)", 0, tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, make_shape(Int<64>{}, Int<128>{})));
    add_gemm_b<16>();
    add_gemm_b<32>();
    add_gemm_b<48>();
    add_gemm_b<64>();
    add_gemm_b<80>();
    add_gemm_b<96>();
    add_gemm_b<112>();
    add_gemm_b<128>();
    add_gemm_b<144>();
    add_gemm_b<160>();
    add_gemm_b<176>();
    add_gemm_b<192>();
    // MLA decode: one 64-column box of Q, of the KV tile and of P, each 64 rows x 128 bytes; a
    // warpgroup's K is 32 of the box's rows (QK), V the MN-major view of four boxes (PV).
    for (int type : {1, 2}) {
        const auto box = [&](auto t) { return tile_to_shape(GMMA::Layout_K_SW128_Atom<decltype(t)>{}, make_shape(Int<64>{}, Int<64>{})); };
        const auto vtile = [&](auto t) {
            return tile_to_shape(GMMA::Layout_MN_SW128_Atom<decltype(t)>{}, make_shape(Int<256>{}, Int<64>{}), Step<_2, _1>{});
        };
        const std::string ty = type == 1 ? "bf16" : "f16";
        if (type == 1) {
            add_operand<B16, SM90::GMMA::Major::K, 64, 16>("MLA Q/P " + ty, type, box(B16{}));
            add_operand<B16, SM90::GMMA::Major::K, 32, 16>("MLA K " + ty + " rows 0-31", type, box(B16{}), 0);
            add_operand<B16, SM90::GMMA::Major::K, 32, 16>("MLA K " + ty + " rows 32-63", type, box(B16{}), 32);
            add_operand<B16, SM90::GMMA::Major::MN, 256, 16>("MLA V " + ty, type, vtile(B16{}));
        } else {
            add_operand<H16, SM90::GMMA::Major::K, 64, 16>("MLA Q/P " + ty, type, box(H16{}));
            add_operand<H16, SM90::GMMA::Major::K, 32, 16>("MLA K " + ty + " rows 0-31", type, box(H16{}), 0);
            add_operand<H16, SM90::GMMA::Major::K, 32, 16>("MLA K " + ty + " rows 32-63", type, box(H16{}), 32);
            add_operand<H16, SM90::GMMA::Major::MN, 256, 16>("MLA V " + ty, type, vtile(H16{}));
        }
    }
}

// Checks one descriptor the kernels built against the CuTe operands of its shape: the fields must
// equal make_gmma_desc's, and the decoded addresses CuTe's, from the operand's 1024-aligned origin
// (the start address less the operand's offset inside its tile).
void check_descriptor(int type, int n, bool mn_major, int rows, uint64_t desc, const std::string& role, std::map<std::string, int>& matched) {
    const int e = type == 0 ? 1 : 2, k = type == 0 ? 32 : 16;
    const L::Descriptor d = L::decode(desc);
    std::string differs;
    for (const Operand& op : g_operands) {
        if (op.type != type || op.mn_major != mn_major || op.rows != rows || op.k != k || op.start > d.start || (d.start - op.start) % 1024 != 0) {
            continue;
        }
        if (op.span != d.span || op.sbo != d.sbo || op.lbo != d.lbo || d.base_offset != 0) {
            continue;
        }
        const uint32_t origin = d.start - op.start;
        bool same = true;
        for (int r = 0; r < rows && same; ++r) {
            for (int kk = 0; kk < k && same; ++kk) {
                const uint32_t sim = L::operand_addr(desc, mn_major, e, r, kk) - origin;
                const uint32_t cute_addr = op.addr[size_t(r) * k + kk];
                if (sim != cute_addr) {
                    char buf[200];
                    std::snprintf(buf, sizeof buf, " (%s: element (%d, %d) at %u, CuTe says %u)", op.name.c_str(), r, kk, sim, cute_addr);
                    differs += buf;
                    same = false;
                }
            }
        }
        if (same) {
            ++matched[op.name.substr(0, op.name.find(" k0="))];
            return;
        }
    }
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "%s descriptor %#llx of a m64n%dk%d wgmma (%s, %s-major, %d rows): start %u, LBO %u, SBO %u, span %u, base offset %u "
                  "matches no CuTe layout of the kernels' operands",
                  role.c_str(), static_cast<unsigned long long>(desc), n, k, type == 0 ? "e4m3" : (type == 1 ? "bf16" : "f16"),
                  mn_major ? "MN" : "K", rows, d.start, d.lbo, d.sbo, d.span, d.base_offset);
    failure(buf + differs);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <descriptor dump from DEEPKERN_SIM_DESCRIPTORS>\n", argv[0]);
        return 2;
    }
    check_swizzle<1>(32);
    check_swizzle<2>(64);
    check_swizzle<3>(128);
    check_accumulators(std::integer_sequence<int, 8, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 256>{});
    add_kernel_operands();

    FILE* f = std::fopen(argv[1], "r");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    std::set<std::string> seen;
    std::map<std::string, int> matched;
    int type = 0, n = 0, mn = 0;
    unsigned long long da = 0, db = 0;
    char line[512];
    size_t lines = 0;
    while (std::fgets(line, sizeof line, f) != nullptr) {
        if (std::sscanf(line, "%d %d %d %llx %llx", &type, &n, &mn, &da, &db) != 5 || !seen.insert(line).second) {
            continue;
        }
        ++lines;
        check_descriptor(type, n, false, 64, da, "A", matched);
        check_descriptor(type, n, mn != 0, n, db, "B", matched);
    }
    std::fclose(f);
    if (lines == 0) {
        failure("no descriptors in the dump: the GEMM and MLA tests did not run");
    }
    for (const auto& [name, count] : matched) {
        std::printf("descriptors: %-24s %5d matched CuTe's layout and make_gmma_desc\n", name.c_str(), count);
    }
    std::printf("%zu distinct wgmma operand pairs checked; %d mismatch(es)\n", lines, g_failures);
    return g_failures == 0 ? 0 : 1;
}
