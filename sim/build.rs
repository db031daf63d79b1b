//! The simulator's half of the build script (a module of the crate's build.rs, used when
//! `DEEPKERN_SIM=1`):
//! - every `.cu` under `csrc/` compiled by the host C++ compiler, the shim `dksim/kernel.h`
//!   force-included, into `libdeepkern_kernels.a` (same C ABI as the GPU build);
//! - a generated table of each kernel's registers, static shared memory and stack frame, read from
//!   the ptxas report of the nvcc build of the same sources, linked into that library;
//! - the driver stand-in `sim/libcuda.so` (engine, driver and runtime API), which the test, bench
//!   and example executables load through their run path and cudarc finds by its name;
//! - the NCCL stand-in `sim/libnccl.so` (sim/nccl/), on top of the driver stand-in, linked into the
//!   same executables so that cudarc's `libnccl.so` is the one already loaded.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::{Unit, hash_of, walk};

/// Flags of the host compile of a kernel unit. `-ffp-contract=off` keeps every float operation a
/// single IEEE operation (no FMA the kernel did not write); `-fno-strict-aliasing` and `-fwrapv`
/// give the type punning and integer wrap-around that nvcc's device code has.
const KERNEL_FLAGS: &[&str] = &[
    "-x",
    "c++",
    "-std=c++17",
    "-O2",
    "-g",
    "-fPIC",
    "-DDEEPKERN_SIM",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-fwrapv",
    "-fno-omit-frame-pointer",
    // Calls into the simulator stay calls, so every report names the kernel line that made them.
    "-fno-optimize-sibling-calls",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
    "-Wno-unused-function",
    "-Wno-psabi",
];

const ENGINE_FLAGS: &[&str] = &["-std=c++17", "-O2", "-g", "-fPIC", "-pthread", "-Wall", "-Wextra"];

fn cxx() -> PathBuf {
    std::env::var_os("CXX").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("c++"))
}

/// The CUDA headers beside `nvcc` (the runtime's types and the bf16/fp16 host conversions).
fn cuda_include(nvcc: &Path) -> PathBuf {
    let root = nvcc.parent().and_then(Path::parent).expect("nvcc lives in <cuda>/bin");
    ["include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("cuda_runtime.h").is_file())
        .unwrap_or_else(|| panic!("cuda_runtime.h not found beside {}: the simulator build needs the CUDA headers", nvcc.display()))
}

/// Compiles `jobs` (source, object, extra args) in parallel, skipping objects whose stamp matches.
fn compile(jobs: Vec<(PathBuf, PathBuf, Vec<String>)>, threads: usize) {
    let queue = Mutex::new(jobs);
    let failures = Mutex::new(Vec::new());
    let compiler = cxx();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let Some((src, obj, args)) = queue.lock().unwrap().pop() else { break };
                    let stamp = obj.with_extension("stamp");
                    let text = fs::read(&src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
                    let key = format!("{:016x}", hash_of(&(&text, &args, &compiler)));
                    if obj.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
                        continue;
                    }
                    fs::create_dir_all(obj.parent().unwrap()).unwrap();
                    let out = Command::new(&compiler)
                        .args(&args)
                        .arg("-c")
                        .arg(&src)
                        .arg("-o")
                        .arg(&obj)
                        .output()
                        .unwrap_or_else(|e| panic!("cannot run {}: {e}", compiler.display()));
                    if out.status.success() {
                        fs::write(&stamp, key).unwrap();
                    } else {
                        failures.lock().unwrap().push(format!(
                            "--- {} ---\n{}{}",
                            src.display(),
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "the simulator's host compile failed:\n{}", failures.join("\n"));
}

/// One kernel of ptxas' report.
struct Entry {
    mangled: String,
    registers: u32,
    smem: u32,
    stack: u32,
}

/// Entry functions of a ptxas `-v` report for sm_90a (the first architecture's, if several).
fn parse_ptxas(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut current: Option<(String, u32)> = None;
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch_ok = line.contains("'sm_90a'") || !line.contains("for 'sm_");
            current = arch_ok.then_some((name, 0));
        } else if line.contains("bytes stack frame") {
            if let Some((_, stack)) = current.as_mut() {
                *stack = number_before(line, " bytes stack frame").unwrap_or(0);
            }
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some((mangled, stack)) = current.take()
        {
            let registers = number_before(line, " registers").unwrap_or(0);
            let smem = number_before(line, " bytes smem").unwrap_or(0);
            if !entries.iter().any(|e: &Entry| e.mangled == mangled) {
                entries.push(Entry { mangled, registers, smem, stack });
            }
        }
    }
    entries
}

/// The generated table (dksim::kernel_resources): each entry refers to the host function of the
/// same mangled name through a weak reference, null if the host build has no such function.
fn resource_table(entries: &[Entry]) -> String {
    let mut s = String::from("// Generated by build.rs from ptxas' resource report of the sm_90a build. Do not edit.\n");
    s.push_str("#include <cstddef>\n#include \"dksim/abi.h\"\n\n");
    for (i, e) in entries.iter().enumerate() {
        assert!(e.mangled.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "unexpected kernel name {}", e.mangled);
        writeln!(s, "extern \"C++\" void dksim_kernel_{i}() __asm__(\"{}\") __attribute__((weak));", e.mangled).unwrap();
    }
    s.push_str("\nnamespace dksim {\nextern const KernelResources kernel_resources[] = {\n");
    for (i, e) in entries.iter().enumerate() {
        writeln!(
            s,
            "    {{reinterpret_cast<const void*>(&dksim_kernel_{i}), \"{}\", {}, {}, {}}},",
            e.mangled, e.registers, e.smem, e.stack
        )
        .unwrap();
    }
    s.push_str("    {nullptr, nullptr, 0, 0, 0},\n};\n");
    writeln!(s, "extern const size_t kernel_resource_count = {};\n}}  // namespace dksim", entries.len()).unwrap();
    s
}

fn archive(library: &Path, objects: &[PathBuf]) {
    let _ = fs::remove_file(library);
    let ar = std::env::var_os("AR").filter(|v| !v.is_empty()).unwrap_or_else(|| "ar".into());
    let status = Command::new(&ar).arg("crs").arg(library).args(objects).status().unwrap_or_else(|e| panic!("cannot run ar: {e}"));
    assert!(status.success(), "ar failed for {}", library.display());
}

/// Builds the simulator (see the module docs) and emits its link directives.
#[allow(clippy::too_many_arguments)]
pub fn build(root: &Path, out: &Path, nvcc: &Path, units: &[PathBuf], compiled: &[Unit], header_hash: u64, jobs: usize, library: &Path) {
    let sim_out = out.join("sim");
    let include = cuda_include(nvcc);
    let sim_include = root.join("sim/include");

    // The resource table, from the nvcc build's ptxas logs.
    let mut entries = Vec::new();
    for u in compiled {
        let text = fs::read_to_string(&u.ptxas_log).unwrap_or_default();
        entries.extend(parse_ptxas(&text));
    }
    let table = sim_out.join("kernel_resources.cpp");
    fs::create_dir_all(&sim_out).unwrap();
    fs::write(&table, resource_table(&entries)).unwrap();

    // Host objects of every kernel unit (a header change recompiles all of them).
    let mut kernel_args: Vec<String> = KERNEL_FLAGS.iter().map(|s| s.to_string()).collect();
    // Race mode: every memory access of the kernels calls the simulator (races.cpp).
    if std::env::var("DEEPKERN_SIM_RACES").is_ok_and(|v| v == "1") {
        kernel_args.push("-fsanitize=thread".into());
        // Volatile accesses through __tsan_volatile_* (strong relaxed), not as plain ones.
        kernel_args.push("--param=tsan-distinguish-volatile=1".into());
        println!("cargo::rustc-cfg=deepkern_sim_races");
    }
    kernel_args.push("-include".into());
    kernel_args.push("dksim/kernel.h".into());
    for dir in [&sim_include, &root.join("csrc/include"), &root.join("csrc"), &include] {
        kernel_args.push(format!("-I{}", dir.display()));
    }
    let mut sim_headers = Vec::new();
    walk(&root.join("sim/include"), &mut |p| sim_headers.push(fs::read(p).unwrap_or_default()));
    kernel_args.push(format!("-DDKSIM_HEADERS={:016x}", hash_of(&(header_hash, &sim_headers))));
    let mut jobs_list = Vec::new();
    let mut objects = Vec::new();
    for src in units {
        let rel = src.strip_prefix(root.join("csrc")).unwrap_or(src);
        let obj = sim_out.join("obj").join(rel).with_extension("o");
        objects.push(obj.clone());
        jobs_list.push((src.clone(), obj, kernel_args.clone()));
    }
    let table_obj = sim_out.join("obj/kernel_resources.o");
    objects.push(table_obj.clone());
    let mut table_args: Vec<String> = ["-std=c++17", "-O2", "-fPIC"].iter().map(|s| s.to_string()).collect();
    table_args.push(format!("-I{}", sim_include.display()));
    table_args.push(format!("-I{}", include.display()));
    jobs_list.push((table, table_obj, table_args));

    // The driver stand-in.
    let mut engine_args: Vec<String> = ENGINE_FLAGS.iter().map(|s| s.to_string()).collect();
    for dir in [&sim_include, &root.join("sim/src"), &include] {
        engine_args.push(format!("-I{}", dir.display()));
    }
    let mut engine_headers = Vec::new();
    walk(&root.join("sim"), &mut |p| {
        if p.extension().is_some_and(|e| e == "hpp" || e == "h") {
            engine_headers.push(fs::read(p).unwrap_or_default());
        }
    });
    engine_args.push(format!("-DDKSIM_HEADERS={:016x}", hash_of(&engine_headers)));
    let mut engine_objects = Vec::new();
    walk(&root.join("sim/src"), &mut |p| {
        if p.extension().is_some_and(|e| e == "cpp") {
            let obj = sim_out.join("engine").join(p.file_name().unwrap()).with_extension("o");
            engine_objects.push(obj.clone());
            jobs_list.push((p.to_path_buf(), obj, engine_args.clone()));
        }
    });
    engine_objects.sort();
    // The NCCL stand-in.
    let nccl_obj = sim_out.join("engine/nccl_stand_in.o");
    jobs_list.push((root.join("sim/nccl/nccl.cpp"), nccl_obj.clone(), engine_args.clone()));
    // The simulator's self-test program (tests/simulator.rs runs it).
    let selftest_obj = sim_out.join("obj/selftest.o");
    jobs_list.push((root.join("sim/tests/selftest.cu"), selftest_obj.clone(), kernel_args.clone()));
    let threads_obj = sim_out.join("obj/selftest_threads.o");
    jobs_list.push((root.join("sim/tests/threads.cpp"), threads_obj.clone(), engine_args.clone()));
    compile(jobs_list, jobs);

    archive(library, &objects);
    let stand_in = sim_out.join("libcuda.so");
    let status = Command::new(cxx())
        .args(["-shared", "-pthread", "-Wl,-soname,libcuda.so", "-o"])
        .arg(&stand_in)
        .args(&engine_objects)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot link the simulator: {e}"));
    assert!(status.success(), "linking {} failed", stand_in.display());
    let nccl = sim_out.join("libnccl.so");
    let status = Command::new(cxx())
        .args(["-shared", "-pthread", "-Wl,-soname,libnccl.so", "-o"])
        .arg(&nccl)
        .arg(&nccl_obj)
        .arg(format!("-L{}", sim_out.display()))
        .arg(format!("-Wl,-rpath,{}", sim_out.display()))
        .arg("-lcuda")
        .status()
        .unwrap_or_else(|e| panic!("cannot link the NCCL stand-in: {e}"));
    assert!(status.success(), "linking {} failed", nccl.display());
    let selftest = sim_out.join("dksim-selftest");
    let status = Command::new(cxx())
        .arg("-o")
        .arg(&selftest)
        .arg(&selftest_obj)
        .arg(&threads_obj)
        .arg(library)
        .arg(format!("-L{}", sim_out.display()))
        .arg(format!("-Wl,-rpath,{}", sim_out.display()))
        .args(["-lnccl", "-lcuda", "-pthread"])
        .status()
        .unwrap_or_else(|e| panic!("cannot link the simulator's self-test: {e}"));
    assert!(status.success(), "linking {} failed", selftest.display());
    println!("cargo::rustc-env=DKSIM_SELFTEST={}", selftest.display());

    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static={}", super::LIB_NAME);
    println!("cargo::rustc-link-search=native={}", sim_out.display());
    println!("cargo::rustc-link-lib=dylib=cuda");
    println!("cargo::rustc-link-lib=dylib=stdc++");
    // The stand-in must be the libcuda.so this program loads (cudarc opens it by that name, and
    // finds it already loaded): the run path points at it.
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", sim_out.display());
    // The same for libnccl.so, which no Rust code links to (cudarc opens it when a program first
    // calls NCCL): loaded at start, whatever LD_LIBRARY_PATH holds, so that a real NCCL (which
    // would load the real driver) is never the one cudarc finds.
    println!("cargo::rustc-link-arg=-Wl,--push-state,--no-as-needed,-lnccl,--pop-state");
}
