//! The simulated GPU suite: every GPU test binary (`tests/*_gpu.rs`) built with `DEEPKERN_SIM=1`,
//! so that its kernels are compiled for the host and the CUDA driver is the simulator's stand-in
//! (docs/simulator.md), then run on the simulator. This is how the GPU tests run on a machine with
//! no GPU; what passes here passed on the simulator, not on a GPU. Every wgmma descriptor the
//! kernels build during the run is then checked against CuTe (sim/tests/cute_check.cpp).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::toolchain::Toolchain;
use crate::{Result, cargo, cmd, project_root};

/// Where the simulated build goes (its own target directory: the GPU build is not rebuilt).
pub const TARGET_DIR: &str = "target/sim";
/// The cargo profile of the simulated suite (optimised, assertions on; see Cargo.toml).
pub const PROFILE: &str = "sim";
/// The simulator's self-test target (tests/simulator.rs).
pub const SELF_TEST: &str = "simulator";

/// The GPU test targets: the stems of `tests/*_gpu.rs`, sorted.
pub fn gpu_test_targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("tests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".rs")).map(str::to_string))
        .filter(|n| n.ends_with("_gpu"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no GPU test targets (*_gpu.rs) in {}", dir.display()));
    }
    Ok(names)
}

/// `n` from `DEEPKERN_SIM_RUNS` (how many seeds to run the suite with; default 1).
fn runs() -> Result<u64> {
    match std::env::var("DEEPKERN_SIM_RUNS") {
        Err(_) => Ok(1),
        Ok(v) => v.parse::<u64>().ok().filter(|&n| n >= 1).ok_or_else(|| format!("DEEPKERN_SIM_RUNS={v}: expected a positive integer")),
    }
}

/// The first seed: `DEEPKERN_SIM_SEED`, else drawn from the clock (and printed, so a run can be
/// repeated).
fn first_seed() -> Result<u64> {
    match std::env::var("DEEPKERN_SIM_SEED") {
        Ok(v) => v.parse().map_err(|_| format!("DEEPKERN_SIM_SEED={v}: expected an integer")),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Ok((t.as_nanos() as u64 ^ u64::from(std::process::id())) % 1_000_000_007)
        }
    }
}

/// The CUDA include directory beside nvcc (with its `cccl` folder, which CuTe needs).
fn cuda_include(tc: &Toolchain) -> Result<PathBuf> {
    let root = tc.nvcc.parent().and_then(Path::parent).ok_or("nvcc has no parent directory")?;
    ["include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("cuda_runtime.h").is_file())
        .ok_or_else(|| format!("no CUDA include directory beside {}", tc.nvcc.display()))
}

/// Compiles sim/tests/cute_check.cpp against CuTe and runs it on the descriptors in `dump`.
pub fn check_against_cute(tc: &Toolchain, dump: &Path) -> Result<()> {
    let root = project_root();
    let include = cuda_include(tc)?;
    let exe = root.join(TARGET_DIR).join("cute_check");
    let cxx = std::env::var_os("CXX").filter(|v| !v.is_empty()).unwrap_or_else(|| "c++".into());
    cmd::run(
        Command::new(cxx)
            .args(["-std=c++17", "-O2", "-w"])
            .arg(format!("-I{}", tc.cutlass_include.display()))
            .arg(format!("-I{}", include.join("cccl").display()))
            .arg(format!("-I{}", include.display()))
            .arg(format!("-I{}", root.join("sim/src").display()))
            .arg(root.join("sim/tests/cute_check.cpp"))
            .arg("-o")
            .arg(&exe),
    )?;
    cmd::run(Command::new(&exe).arg(dump)).map_err(|e| format!("{e}\n(the simulator disagrees with CuTe: see the MISMATCH lines above)"))
}

/// Where the race-mode build goes.
pub const RACES_TARGET_DIR: &str = "target/sim-races";

/// Race mode (the kernels instrumented, vector clocks over every access): the simulator's own race
/// checks and at least one small case per kernel, which must find no race.
pub const RACE_CASES: &[(&str, &str)] = &[
    ("quant_gpu", "exact_small_integers"),
    ("quant_gpu", "block_exact_powers_of_two"),
    ("quant_gpu", "silu_mul_matches_reference"),
    ("ep_gpu", "layout_matches_reference"),
    ("ep_gpu", "identity_experts_combine_to_weighted_x"),
    // Ranks on streams of their own: the dispatch signals are the only ordering.
    ("ep_gpu", "concurrent_ranks_match_reference"),
    // Two ranks on host threads and devices of their own: node group (IPC buffers, signals across
    // devices, the teardown barrier) and NCCL transport (the stand-in's collectives and sends).
    ("ep_gpu", "node_group_of_two_ranks"),
    ("ep_gpu", "nccl_group_of_two_ranks"),
    ("mla_gpu", "device_schedule_matches_the_reference"),
    ("mla_gpu", "combine_matches_reference"),
    ("mla_gpu", "decode_is_deterministic"),
    ("gemm_gpu", "exact_small_integers"),
    // Every tile shape: stage reuse, both warpgroups, the TMA-store epilogue.
    ("gemm_gpu", "every_compiled_tile"),
    // The scale loader's shared-memory buffers; clusters (each CTA's own accesses).
    ("gemm_gpu", "straddling_scales_over_long_k"),
    ("gemm_gpu", "multicast_pairs"),
    ("moe_gpu", "low_latency_equals_normal"),
    // The overlapped layer: the EP receive's arrival counts read by the GEMM on another stream.
    ("moe_gpu", "two_batch_is_bit_identical"),
];

/// Builds the race-mode suite and runs RACE_CASES (and the simulator's self-test) on it.
pub fn run_races(tc: &Toolchain, seed: u64) -> Result<()> {
    eprintln!();
    eprintln!("== race mode (DEEPKERN_SIM_RACES=1): the simulator's race checks and one small case per kernel, DEEPKERN_SIM_SEED={seed}");
    let mut c = cargo::cargo(tc);
    c.args(["test", "-p", "deepkern", "--profile", PROFILE, "--target-dir", RACES_TARGET_DIR, "--test", SELF_TEST]);
    c.env("DEEPKERN_SIM", "1").env("DEEPKERN_SIM_RACES", "1").env("DEEPKERN_REQUIRE_GPU", "1").env("DEEPKERN_SIM_SEED", seed.to_string());
    cmd::run(&mut c)?;
    for (binary, test) in RACE_CASES {
        let mut c = cargo::cargo(tc);
        c.args(["test", "-p", "deepkern", "--profile", PROFILE, "--target-dir", RACES_TARGET_DIR, "--test", binary, "--", test, "--exact"]);
        c.env("DEEPKERN_SIM", "1")
            .env("DEEPKERN_SIM_RACES", "1")
            .env("DEEPKERN_REQUIRE_GPU", "1")
            .env("DEEPKERN_SIM_SEED", seed.to_string());
        cmd::run(&mut c).map_err(|e| format!("{e}\n(race mode, DEEPKERN_SIM_SEED={seed})"))?;
    }
    Ok(())
}

/// Builds the simulated suite and runs it once per seed; `test_args` go to every test binary.
pub fn run(tc: &Toolchain, test_args: &[String]) -> Result<()> {
    let root = project_root();
    let targets = gpu_test_targets(&root)?;
    let (runs, seed) = (runs()?, first_seed()?);
    let dump = root.join(TARGET_DIR).join("wgmma-descriptors.txt");
    let _ = std::fs::remove_file(&dump);
    for i in 0..runs {
        let seed = seed.wrapping_add(i);
        eprintln!();
        eprintln!(
            "== simulated GPU suite ({} of {runs}): DEEPKERN_SIM_SEED={seed}; results come from the simulator, not from a GPU",
            i + 1
        );
        let mut c = cargo::cargo(tc);
        c.args(["test", "-p", "deepkern", "--profile", PROFILE, "--target-dir", TARGET_DIR]);
        // The simulator's own checks first, then every GPU test on it.
        c.args(["--test", SELF_TEST]);
        for t in &targets {
            c.args(["--test", t]);
        }
        if !test_args.is_empty() {
            c.arg("--").args(test_args);
        }
        // Required: a test that found no device would fail, never be skipped.
        c.env("DEEPKERN_SIM", "1").env("DEEPKERN_REQUIRE_GPU", "1").env("DEEPKERN_SIM_SEED", seed.to_string());
        c.env("DEEPKERN_SIM_DESCRIPTORS", &dump);
        cmd::run(&mut c).map_err(|e| format!("{e}\n(simulated GPU suite, DEEPKERN_SIM_SEED={seed})"))?;
    }
    // Only when the GEMM and MLA tests ran (a filter may have left them out).
    if dump.is_file() {
        eprintln!();
        eprintln!("== the simulator's layouts against CuTe");
        check_against_cute(tc, &dump)?;
    }
    if test_args.is_empty() {
        run_races(tc, seed)?;
    }
    eprintln!("simulated GPU suite passed with {runs} seed(s), on the simulator (not a GPU run)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gpu_test_target_is_simulated() {
        let targets = gpu_test_targets(&project_root()).unwrap();
        for t in ["ep_gpu", "gemm_gpu", "mla_gpu", "moe_gpu", "quant_gpu", "runtime_gpu"] {
            assert!(targets.iter().any(|x| x == t), "{t} missing from {targets:?}");
        }
        assert!(targets.iter().all(|t| t.ends_with("_gpu")));
        assert!(project_root().join("tests").join(format!("{SELF_TEST}.rs")).is_file());
    }
}
