//! The simulated GPU suite: every GPU test binary (`tests/*_gpu.rs`) built with `DEEPKERN_SIM=1`,
//! so that its kernels are compiled for the host and the CUDA driver is the simulator's stand-in
//! (docs/simulator.md), then run on the simulator. This is how the GPU tests run on a machine with
//! no GPU; what passes here passed on the simulator, not on a GPU.

use std::path::Path;

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

/// Builds the simulated suite and runs it once per seed; `test_args` go to every test binary.
pub fn run(tc: &Toolchain, test_args: &[String]) -> Result<()> {
    let root = project_root();
    let targets = gpu_test_targets(&root)?;
    let (runs, seed) = (runs()?, first_seed()?);
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
        cmd::run(&mut c).map_err(|e| format!("{e}\n(simulated GPU suite, DEEPKERN_SIM_SEED={seed})"))?;
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
