//! `cargo xtask <task>`: see `usage()`.

use std::process::{Command, ExitCode};

use xtask::toolchain::{self, Toolchain};
use xtask::{Result, bundle, cargo, cmd, mutants, project_root, report, sass, simulate};

fn usage() -> &'static str {
    "usage: cargo xtask <task> [args]

  setup     find or install nvcc (CUDA 13.0, PyPI), cuobjdump/nvdisasm 13.2+, libclang
  test      setup, `cargo test --workspace [args]`, the sass check, then (without a GPU, or with
            DEEPKERN_SIM=1) the GPU tests on the simulator; args after `--` go to every test
            binary, DEEPKERN_SIM_RUNS=n runs the simulated suite with n seeds
  sim       only the simulated GPU suite (args after `--` go to every test binary)
  mutants   seeded kernel bugs, each applied to a scratch copy and run on the simulated tests
            that should catch it; prints which test killed each (`mutants <substring>`: some)
  sass      every kernel: no spills, no stack frame, declared SASS instructions present
  bench     setup, `cargo bench -p deepkern [args]` (GPU benches skip without a GPU), then
            report if bench-results/ has results
  bundle    release test and bench executables + run.sh in target/bundle/ (and a .tar.gz) for
            a GPU host with no Rust: run.sh runs every test and bench there
  report    bench-results/*.jsonl -> bench-results/README.md, PNG plots, README table
  bindgen   regenerate src/ffi/bindings.rs from csrc/include/deepkern.h"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, rest)) => (t.as_str(), rest),
        None => {
            eprintln!("{}", usage());
            return ExitCode::FAILURE;
        }
    };
    let result = match task {
        "setup" => setup().map(|_| ()),
        "test" => test(rest),
        "sass" => setup().and_then(|tc| sass::run(&tc)),
        "mutants" => setup().and_then(|tc| mutants::run(&tc, rest.first().map(String::as_str))),
        "sim" => setup().and_then(|tc| simulate::run(&tc, rest.iter().position(|a| a == "--").map(|i| &rest[i + 1..]).unwrap_or(rest))),
        "bench" => bench(rest),
        "bundle" => setup().and_then(|tc| bundle::run(&tc)).map(|_| ()),
        "report" => report::run(),
        "bindgen" => bindgen(),
        "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => Err(format!("unknown task `{other}`\n\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn setup() -> Result<Toolchain> {
    toolchain::setup(&project_root())
}

fn test(extra: &[String]) -> Result<()> {
    let tc = setup()?;
    let mut c = cargo::cargo(&tc);
    c.args(cargo::TEST_ARGS).args(extra);
    let tests = cmd::run(&mut c);
    // The sass check and the simulated suite run even when a test failed, so one run shows all.
    let checked = sass::run(&tc);
    let forced = std::env::var("DEEPKERN_SIM").is_ok_and(|v| v == "1");
    let simulated = if gpu_present() && !forced {
        eprintln!("a GPU is present: the GPU tests ran on it (DEEPKERN_SIM=1 runs them on the simulator as well)");
        Ok(())
    } else {
        let test_args = extra.iter().position(|a| a == "--").map(|i| &extra[i + 1..]).unwrap_or(&[]);
        simulate::run(&tc, test_args)
    };
    tests.and(checked).and(simulated)
}

/// Whether an NVIDIA GPU is visible: `nvidia-smi -L` runs and lists one.
fn gpu_present() -> bool {
    cmd::output(Command::new("nvidia-smi").arg("-L")).is_ok_and(|s| s.lines().any(|l| l.starts_with("GPU ")))
}

fn bench(extra: &[String]) -> Result<()> {
    let tc = setup()?;
    let root = project_root();
    let gpu = gpu_present();
    let mut c = cargo::cargo(&tc);
    c.args(bench_args(extra));
    c.env("DEEPKERN_BENCH_OUT", root.join("bench-results")).env("DEEPKERN_COMMIT", bundle::commit_id(&root));
    cmd::run(&mut c)?;
    if !gpu {
        eprintln!();
        eprintln!("no CUDA GPU here: ran the CPU reference benches only; GPU figures come from `cargo xtask bundle` on a GPU host");
    }
    if report::has_results(&root) { report::run() } else { Ok(()) }
}

/// `cargo bench` for the bench targets only: without `--benches`, cargo also runs the library's
/// unit tests in bench mode, where every one of them is listed as ignored.
fn bench_args(extra: &[String]) -> Vec<String> {
    ["bench", "-p", "deepkern", "--benches"].into_iter().map(String::from).chain(extra.iter().cloned()).collect()
}

fn bindgen() -> Result<()> {
    let root = project_root();
    let text = xtask::bindings::generate(&root)?;
    std::fs::write(root.join(xtask::bindings::OUTPUT), text).map_err(|e| e.to_string())?;
    println!("wrote {}", xtask::bindings::OUTPUT);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_runs_only_the_benches() {
        let args = bench_args(&["--".to_string(), "gemm".to_string()]);
        assert_eq!(args, ["bench", "-p", "deepkern", "--benches", "--", "gemm"]);
    }
}
