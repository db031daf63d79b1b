//! Compiles every `.cu` under `csrc/` with nvcc into `libdeepkern_kernels.a` (C ABI, static CUDA
//! runtime) and records ptxas' resource report for each unit.
//!
//! With `DEEPKERN_SIM=1` it builds the simulator instead (docs/simulator.md): the same sources are
//! compiled a second time by the host C++ compiler (`CXX`, else `c++`) with the shim
//! `sim/include/dksim/kernel.h`, archived as `libdeepkern_kernels.a`, and linked against the
//! driver stand-in `libcuda.so` built from `sim/src/`. nvcc still compiles every unit, because
//! the simulator takes each kernel's registers and static shared memory from ptxas' report.
//!
//! nvcc is looked up in `NVCC`, `CUDA_HOME/bin`, `CUDA_PATH/bin`, `PATH`, then the project-local
//! toolchain that `cargo xtask setup` installs; a change of `PATH` reruns the lookup unless `NVCC`,
//! `CUDA_HOME` or `CUDA_PATH` named the nvcc. Without nvcc the crate still builds: a cargo warning
//! says so and every GPU entry point returns `Error::KernelsNotBuilt`; with the `require-kernels`
//! feature or `DEEPKERN_REQUIRE_KERNELS=1` the build fails instead. This script never touches the
//! network.
//!
//! Outputs in `OUT_DIR`: `obj/<unit>.o`, `ptxas/<unit>.log`, `libdeepkern_kernels.a`, and the
//! manifest `deepkern-kernels.json` that `cargo xtask sass` reads. For dependents' build scripts
//! (`links = "deepkern_kernels"`): `DEP_DEEPKERN_KERNELS_INCLUDE`, the folder of `deepkern.h`, and,
//! when the kernels were built, `DEP_DEEPKERN_KERNELS_LIB_DIR`, the folder of the library.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const LIB_NAME: &str = "deepkern_kernels";
const DEFAULT_ARCHS: &str = "90a";
const LOCAL_NVCC: &str = ".toolchain/cuda/nvidia/cu13/bin/nvcc";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(deepkern_kernels)");
    println!("cargo::rustc-check-cfg=cfg(deepkern_sim)");
    println!("cargo::rustc-check-cfg=cfg(deepkern_sim_races)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=csrc");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "NVCC_CCBIN",
        "DEEPKERN_CUDA_ARCHS",
        "DEEPKERN_SKIP_KERNELS",
        "DEEPKERN_REQUIRE_KERNELS",
        "DEEPKERN_SIM",
        "DEEPKERN_SIM_REUSE_PTXAS",
        "DEEPKERN_SIM_RACES",
        "CXX",
        "AR",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let local = root.join(LOCAL_NVCC);
    if local.parent().is_some_and(Path::is_dir) {
        println!("cargo::rerun-if-changed={}", local.display());
    }
    // The C header, for dependents' build scripts (DEP_DEEPKERN_KERNELS_INCLUDE).
    println!("cargo::metadata=include={}", root.join("csrc/include").display());

    if env::var_os("DEEPKERN_SKIP_KERNELS").is_some_and(|v| !v.is_empty() && v != "0") {
        return skip(&out, "DEEPKERN_SKIP_KERNELS is set");
    }
    let (found, searched_path) = find_nvcc(&local);
    if searched_path {
        // An nvcc installed on PATH after a kernel-less build is found on the next build.
        println!("cargo::rerun-if-env-changed=PATH");
    }
    let Some(nvcc) = found else {
        return skip(&out, "nvcc not found (looked in NVCC, CUDA_HOME/bin, CUDA_PATH/bin and PATH; install nvcc or set NVCC or CUDA_HOME)");
    };
    let version = nvcc_version(&nvcc);
    let archs = archs();
    let units = cu_sources(&root.join("csrc"));
    let header_hash = headers_hash(&root.join("csrc"));
    let flags = nvcc_flags(&root, &archs);

    let jobs = env::var("NUM_JOBS").ok().and_then(|j| j.parse::<usize>().ok()).unwrap_or(1).max(1);
    let compiled = compile_all(&nvcc, &root, &out, &units, &flags, header_hash ^ hash_of(&version), jobs);
    let library = out.join(format!("lib{LIB_NAME}.a"));
    if env::var("DEEPKERN_SIM").is_ok_and(|v| v == "1") {
        println!("cargo::rerun-if-changed=sim");
        sim::build(&root, &out, &nvcc, &units, &compiled, header_hash, jobs, &library);
        println!("cargo::metadata=lib_dir={}", out.display());
        println!("cargo::rustc-cfg=deepkern_kernels");
        println!("cargo::rustc-cfg=deepkern_sim");
        write_manifest(
            &out,
            &Manifest {
                nvcc: Some(&nvcc),
                version: Some(&version),
                archs: &archs,
                library: Some(&library),
                units: &compiled,
                reason: None,
            },
        );
        return;
    }
    archive(&nvcc, &library, compiled.iter().map(|u| u.object.as_path()));

    println!("cargo::rustc-cfg=deepkern_kernels");
    println!("cargo::metadata=lib_dir={}", out.display());
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static={LIB_NAME}");
    match cudart_dir(&nvcc) {
        Some(dir) => println!("cargo::rustc-link-search=native={}", dir.display()),
        None => println!("cargo::warning=libcudart_static.a not found beside {}; linking may fail", nvcc.display()),
    }
    println!("cargo::rustc-link-lib=static=cudart_static");
    println!("cargo::rustc-link-lib=dylib=stdc++");

    write_manifest(
        &out,
        &Manifest { nvcc: Some(&nvcc), version: Some(&version), archs: &archs, library: Some(&library), units: &compiled, reason: None },
    );
}

/// The simulator's build (DEEPKERN_SIM=1): host objects of the kernel sources, the ptxas resource
/// table, and the driver stand-in.
#[path = "sim/build.rs"]
mod sim;

/// A compiled translation unit.
struct Unit {
    source: String,
    object: PathBuf,
    ptxas_log: PathBuf,
}

/// Whether a build without kernels must fail: the `require-kernels` feature, or
/// `DEEPKERN_REQUIRE_KERNELS=1` (for a build whose features one cannot change).
fn kernels_required() -> bool {
    env::var_os("CARGO_FEATURE_REQUIRE_KERNELS").is_some() || env::var("DEEPKERN_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

fn skip(out: &Path, reason: &str) {
    if kernels_required() {
        eprintln!(
            "error: deepkern: the CUDA kernels are required (the `require-kernels` feature or DEEPKERN_REQUIRE_KERNELS=1) \
             and were not built: {reason}.\n\
             Install nvcc (CUDA 12 or later; 13.0 is what deepkern is tested with) on PATH, or set NVCC to the nvcc \
             executable or CUDA_HOME to the CUDA installation, and build again."
        );
        std::process::exit(1);
    }
    println!(
        "cargo::warning=deepkern: CUDA kernels NOT built: {reason}. GPU entry points will return Error::KernelsNotBuilt \
         (the `require-kernels` feature makes this a build error)."
    );
    write_manifest(out, &Manifest { nvcc: None, version: None, archs: &[], library: None, units: &[], reason: Some(reason) });
}

/// The nvcc to use, and whether `PATH` was searched (so that the answer depends on it).
fn find_nvcc(local: &Path) -> (Option<PathBuf>, bool) {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        return (exe(PathBuf::from(p)), false);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var).filter(|v| !v.is_empty()).and_then(|d| exe(PathBuf::from(d).join("bin/nvcc"))) {
            return (Some(p), false);
        }
    }
    if let Some(p) = env::var_os("PATH").and_then(|path| env::split_paths(&path).find_map(|d| exe(d.join("nvcc")))) {
        return (Some(p), true);
    }
    (exe(local.to_path_buf()), true)
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc).arg("--version").output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    assert!(out.status.success(), "{} --version failed: {}", nvcc.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find(|l| l.contains("release")).unwrap_or("unknown").trim().to_string()
}

/// `DEEPKERN_CUDA_ARCHS` ("90a" by default; comma separated, e.g. "90a,100a").
fn archs() -> Vec<String> {
    let raw = env::var("DEEPKERN_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = raw.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
    for a in &archs {
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "DEEPKERN_CUDA_ARCHS: bad architecture `{a}`");
    }
    assert!(!archs.is_empty(), "DEEPKERN_CUDA_ARCHS is empty");
    archs
}

fn nvcc_flags(root: &Path, archs: &[String]) -> Vec<String> {
    let mut flags: Vec<String> =
        ["-std=c++17", "-O3", "-lineinfo", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "--ptxas-options=-v"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for a in archs {
        flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    flags.push(format!("-I{}", root.join("csrc/include").display()));
    flags.push(format!("-I{}", root.join("csrc").display()));
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        flags.push(format!("-ccbin={ccbin}"));
    }
    flags
}

/// Every `.cu` file under `dir`, sorted, relative to the project root.
fn cu_sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(dir, &mut |p| {
        if p.extension().is_some_and(|e| e == "cu") {
            found.push(p.to_path_buf());
        }
    });
    found.sort();
    found
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            walk(&path, f);
        } else {
            f(&path);
        }
    }
}

fn hash_of(x: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

/// Hash of every header under csrc/: a header change recompiles every unit.
fn headers_hash(dir: &Path) -> u64 {
    let mut headers = Vec::new();
    walk(dir, &mut |p| {
        if p.extension().is_some_and(|e| e == "cuh" || e == "h") {
            headers.push(p.to_path_buf());
        }
    });
    headers.sort();
    let mut h = DefaultHasher::new();
    for p in headers {
        p.hash(&mut h);
        fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display())).hash(&mut h);
    }
    h.finish()
}

fn compile_all(nvcc: &Path, root: &Path, out: &Path, sources: &[PathBuf], flags: &[String], salt: u64, jobs: usize) -> Vec<Unit> {
    let queue = Mutex::new(sources.iter().collect::<Vec<_>>());
    let done = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(sources.len()) {
            s.spawn(|| {
                while let Some(src) = queue.lock().unwrap().pop() {
                    match compile_one(nvcc, root, out, src, flags, salt) {
                        Ok(unit) => done.lock().unwrap().push(unit),
                        Err(msg) => failures.lock().unwrap().push(msg),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!("nvcc failed:\n{}", failures.join("\n"));
    }
    let mut units = done.into_inner().unwrap();
    units.sort_by(|a, b| a.source.cmp(&b.source));
    units
}

fn compile_one(nvcc: &Path, root: &Path, out: &Path, src: &Path, flags: &[String], salt: u64) -> Result<Unit, String> {
    let rel = src.strip_prefix(root).unwrap_or(src);
    let stem = rel.strip_prefix("csrc").unwrap_or(rel).with_extension("");
    let object = out.join("obj").join(&stem).with_extension("o");
    let ptxas_log = out.join("ptxas").join(&stem).with_extension("log");
    let stamp = object.with_extension("stamp");
    for p in [&object, &ptxas_log] {
        fs::create_dir_all(p.parent().unwrap()).map_err(|e| e.to_string())?;
    }
    let source_text = fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let key = format!("{:016x}", hash_of(&(salt, &source_text, flags, nvcc)));
    let unit = Unit { source: rel.to_string_lossy().into_owned(), object, ptxas_log };
    if unit.object.is_file() && unit.ptxas_log.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
        return Ok(unit);
    }
    // `cargo xtask mutants` rebuilds the simulator once per seeded bug: the simulator needs only
    // ptxas' report, which a one-line change does not move, so an earlier build's is reused.
    if env::var("DEEPKERN_SIM_REUSE_PTXAS").is_ok_and(|v| v == "1") && unit.ptxas_log.is_file() {
        return Ok(unit);
    }
    let output = Command::new(nvcc)
        .args(flags)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&unit.object)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("--- {} ---\n{}{}", rel.display(), String::from_utf8_lossy(&output.stdout), stderr));
    }
    fs::write(&unit.ptxas_log, stderr.as_bytes()).map_err(|e| e.to_string())?;
    fs::write(&stamp, key).map_err(|e| e.to_string())?;
    Ok(unit)
}

fn archive<'a>(nvcc: &Path, library: &Path, objects: impl Iterator<Item = &'a Path>) {
    let _ = fs::remove_file(library);
    let status = Command::new(nvcc)
        .arg("--lib")
        .arg("-o")
        .arg(library)
        .args(objects)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} --lib: {e}", nvcc.display()));
    assert!(status.success(), "nvcc --lib failed for {}", library.display());
}

/// The directory holding `libcudart_static.a` for this nvcc (the pip layout uses `lib`).
fn cudart_dir(nvcc: &Path) -> Option<PathBuf> {
    let root = nvcc.parent()?.parent()?;
    ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"]
        .iter()
        .map(|sub| root.join(sub))
        .find(|d| d.join("libcudart_static.a").is_file())
}

struct Manifest<'a> {
    nvcc: Option<&'a Path>,
    version: Option<&'a str>,
    archs: &'a [String],
    library: Option<&'a Path>,
    units: &'a [Unit],
    reason: Option<&'a str>,
}

fn json_str(s: Option<&str>) -> String {
    match s {
        None => "null".to_string(),
        Some(s) => {
            let mut o = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (c as u32) < 0x20 => write!(o, "\\u{:04x}", c as u32).unwrap(),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
    }
}

fn json_path(p: Option<&Path>) -> String {
    json_str(p.map(|p| p.to_str().expect("non-UTF-8 build path")))
}

fn write_manifest(out: &Path, m: &Manifest) {
    let archs: Vec<String> = m.archs.iter().map(|a| json_str(Some(a))).collect();
    let units: Vec<String> = m
        .units
        .iter()
        .map(|u| {
            format!(
                "{{\"source\": {}, \"object\": {}, \"ptxas_log\": {}}}",
                json_str(Some(&u.source)),
                json_path(Some(&u.object)),
                json_path(Some(&u.ptxas_log))
            )
        })
        .collect();
    let text = format!(
        "{{\"built\": {}, \"reason\": {}, \"nvcc\": {}, \"nvcc_version\": {}, \"archs\": [{}], \"library\": {}, \"units\": [{}]}}\n",
        m.reason.is_none(),
        json_str(m.reason),
        json_path(m.nvcc),
        json_str(m.version),
        archs.join(", "),
        json_path(m.library),
        units.join(", ")
    );
    fs::write(out.join("deepkern-kernels.json"), text).expect("write deepkern-kernels.json");
}
