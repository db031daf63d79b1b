// Failure reports: what happened, in which kernel, CTA and thread, and where in the kernel's
// source (addresses symbolized with addr2line, inlined frames included), plus the seed that
// reproduces the run.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <cinttypes>
#include <cstdio>
#include <map>
#include <sstream>

#include "sim.hpp"

namespace dksim {

namespace {

// addr2line on `file` for `offsets`; one line per offset ("" where it found nothing).
std::vector<std::string> addr2line(const std::string& file, const std::vector<uintptr_t>& offsets) {
    std::vector<std::string> out(offsets.size());
    std::string cmd = "addr2line -C -f -i -p -e '" + file + "'";
    for (uintptr_t o : offsets) {
        cmd += " " + hex(o);
    }
    cmd += " 2>/dev/null";
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) {
        return out;
    }
    // With -i, one address may print several lines: the innermost frame, then "(inlined by) ...".
    std::vector<std::string> lines;
    char buf[4096];
    while (std::fgets(buf, sizeof buf, p) != nullptr) {
        std::string l = buf;
        while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) {
            l.pop_back();
        }
        lines.push_back(l);
    }
    pclose(p);
    size_t i = 0;
    for (size_t k = 0; k < lines.size(); ++k) {
        const std::string& l = lines[k];
        const bool inlined = l.find(" (inlined by) ") != std::string::npos;
        if (inlined && i > 0) {
            out[i - 1] += " <- " + l.substr(l.find(" (inlined by) ") + 14);
        } else if (i < out.size()) {
            out[i++] = l.find("??") == 0 ? "" : l;
        }
    }
    return out;
}

// "func(args) at /abs/path/csrc/ep/a2a.cu:42" -> "csrc/ep/a2a.cu:42 (func)"; empty for frames of the
// C++ library and the simulator's own launch plumbing, which say nothing about the kernel.
std::string tidy_frame(const std::string& frame) {
    const size_t at = frame.rfind(" at ");
    if (at == std::string::npos) {
        return frame;
    }
    std::string func = frame.substr(0, at);
    std::string place = frame.substr(at + 4);
    for (size_t a; (a = func.find("(anonymous namespace)::")) != std::string::npos;) {
        func.erase(a, 23);
    }
    if (place.rfind("/usr/", 0) == 0 || place.find("dksim/kernel.h") != std::string::npos || place.find("/include/c++/") != std::string::npos) {
        return "";
    }
    for (const char* root : {"/csrc/", "/sim/", "/tests/", "/src/"}) {
        const size_t r = place.find(root);
        if (r != std::string::npos) {
            place = place.substr(r + 1);
            break;
        }
    }
    // Drop the parameter list and return type: the name is enough next to the line.
    func = without_parameters(func);
    const size_t space = func.rfind(' ', func.find('<') == std::string::npos ? std::string::npos : func.find('<'));
    if (space != std::string::npos && func.find("operator") == std::string::npos) {
        func = func.substr(space + 1);
    }
    if (func.size() > 80) {
        func = func.substr(0, 77) + "...";
    }
    return place + " (" + func + ")";
}

// An inline chain "inner <- outer <- ..." with the uninformative frames dropped.
std::string tidy_chain(const std::string& chain) {
    std::string out;
    size_t from = 0;
    while (from <= chain.size()) {
        size_t to = chain.find(" <- ", from);
        if (to == std::string::npos) {
            to = chain.size();
        }
        const std::string f = tidy_frame(chain.substr(from, to - from));
        if (!f.empty()) {
            out += out.empty() ? f : " <- " + f;
        }
        from = to + 4;
    }
    return out.empty() ? chain : out;
}

}  // namespace

std::string without_parameters(const std::string& signature) {
    int depth = 0;
    for (size_t i = 0; i < signature.size(); ++i) {
        if (signature[i] == '<') {
            ++depth;
        } else if (signature[i] == '>') {
            --depth;
        } else if (signature[i] == '(' && depth == 0 && i > 0) {
            return signature.substr(0, i);
        }
    }
    return signature;
}

std::string symbolize(void* const* addrs, size_t n) {
    // Group the addresses by the object they lie in; addr2line wants offsets into the file.
    struct Item {
        size_t index;
        uintptr_t offset;
    };
    std::map<std::string, std::vector<Item>> by_file;
    std::vector<std::string> result(n);
    for (size_t i = 0; i < n; ++i) {
        if (addrs[i] == nullptr) {
            continue;
        }
        // Return addresses point after the call: look up the call itself.
        const uintptr_t a = reinterpret_cast<uintptr_t>(addrs[i]) - 1;
        Dl_info info{};
        if (dladdr(reinterpret_cast<void*>(a), &info) == 0 || info.dli_fname == nullptr) {
            result[i] = hex(a);
            continue;
        }
        uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
        // A position-dependent executable is linked at its load address: addr2line wants it whole.
        const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(info.dli_fbase);
        if (eh != nullptr && eh->e_type == ET_EXEC) {
            base = 0;
        }
        std::string file = info.dli_fname;
        if (file.empty() || file.find('/') == std::string::npos) {
            file = "/proc/self/exe";
        }
        by_file[file].push_back(Item{i, a - base});
        result[i] = hex(a) + " in " + file;
    }
    for (auto& [file, items] : by_file) {
        std::vector<uintptr_t> offs;
        for (const Item& it : items) {
            offs.push_back(it.offset);
        }
        const std::vector<std::string> lines = addr2line(file, offs);
        for (size_t k = 0; k < items.size(); ++k) {
            if (!lines[k].empty()) {
                result[items[k].index] = tidy_chain(lines[k]);
            }
        }
    }
    std::string s;
    for (size_t i = 0; i < n; ++i) {
        s += result[i] + "\n";
    }
    return s;
}

void report_failure(const Failure& f, const Kernel* k, const Thread* t) {
    std::ostringstream os;
    os << "deepkern simulator: " << f.title << "\n";
    if (t != nullptr) {
        os << describe_thread(t) << "\n";
    } else if (k != nullptr) {
        os << "    kernel  " << k->name << " (launch #" << k->serial << ")\n";
    }
    if (!f.detail.empty()) {
        os << f.detail << "\n";
    }
    if (f.where != nullptr) {
        std::string place = symbolize(&f.where, 1);
        while (!place.empty() && place.back() == '\n') {
            place.pop_back();
        }
        os << "    at      " << place << "\n";
    }
    os << "    seed    DEEPKERN_SIM_SEED=" << config().seed << " reproduces this run (run the test alone, --test-threads=1)\n";
    std::fputs(os.str().c_str(), stderr);
    std::fflush(stderr);
}

}  // namespace dksim
