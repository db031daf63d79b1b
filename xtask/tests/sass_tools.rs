//! The SASS check against the real tools: `fixtures/sass_probe.cu` is compiled with nvcc (with a
//! register cap that makes two functions spill) and `sass::check_unit` must report exactly what is
//! wrong with it. Needs nvcc and cuobjdump/nvdisasm 13.2+ (`cargo xtask setup` installs them);
//! without them the test is reported as ignored, not passed.

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use xtask::sass::{self, UnitReport};
use xtask::toolchain::{self, Toolchain};

fn fixture(name: &str) -> PathBuf {
    xtask::project_root().join("xtask/tests/fixtures").join(name)
}

/// The installed tools, or why the test cannot run here.
fn tools() -> Result<Toolchain, String> {
    let root = xtask::project_root();
    let nvcc = toolchain::find_nvcc(&root)?.ok_or("nvcc not found (run `cargo xtask setup`)")?;
    let (cuobjdump, nvdisasm) = toolchain::find_tools(&root).ok_or("cuobjdump/nvdisasm 13.2+ not found (run `cargo xtask setup`)")?;
    let nvcc_release = toolchain::release(&nvcc).ok_or("nvcc reports no release")?;
    Ok(Toolchain { nvcc, nvcc_release, cuobjdump, nvdisasm, libclang: false, cutlass_include: toolchain::cutlass_include(&root) })
}

/// Compiles the probe as build.rs compiles a unit, writing nvcc's ptxas report to the log.
fn compile_probe(tc: &Toolchain, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let (object, log) = (dir.join("sass_probe.o"), dir.join("sass_probe.log"));
    let out = Command::new(&tc.nvcc)
        .args(["--ptxas-options=-v", "-maxrregcount=24", "-gencode=arch=compute_90a,code=sm_90a", "-c"])
        .arg(fixture("sass_probe.cu"))
        .arg("-o")
        .arg(&object)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tc.nvcc.display()))?;
    std::fs::write(&log, &out.stderr).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("nvcc failed on the probe:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok((object, log))
}

fn check_probe() -> Result<Completion, Failed> {
    let tc = match tools() {
        Ok(tc) => tc,
        Err(why) => return Ok(Completion::ignored_with(why)),
    };
    let dir = std::env::temp_dir().join(format!("deepkern-sass-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result =
        compile_probe(&tc, &dir).and_then(|(object, log)| sass::check_unit(&tc, "probe", &fixture("sass_probe.cu"), &object, &log));
    let _ = std::fs::remove_dir_all(&dir);
    assert_report(&result?)?;
    Ok(Completion::Completed)
}

fn assert_report(r: &UnitReport) -> Result<(), String> {
    let names: Vec<&str> = r.rows.iter().map(|row| row.res.name.as_str()).collect();
    if names != ["_Z9with_smemPf", "_Z8spillingPKfPfi"] {
        return Err(format!("expected the two kernels as rows, got {names:?}"));
    }
    let smem = &r.rows[0];
    if smem.res.smem_bytes != 1024 || !smem.res.is_clean() || smem.expects != "BAR ok, EXIT ok, QGMMA MISSING" {
        return Err(format!("with_smem: {smem:?}"));
    }
    let spilling = &r.rows[1];
    if spilling.res.registers != 24 || spilling.res.spill_store_bytes == 0 || spilling.res.stack_bytes == 0 {
        return Err(format!("spilling: {spilling:?}"));
    }
    let wanted = [
        "spilling(float const*, float*, int): ",                            // ptxas: stack frame and spills
        "helper(float const*, int): 0 bytes stack frame",                   // a device function's spills count too
        "spilling(float const*, float*, int): the cubin uses local memory", // cuobjdump agrees
        "with_smem(float*) has no QGMMA instruction",
        "SASS-EXPECT `no_such_kernel` matches no function",
    ];
    for w in wanted {
        if !r.problems.iter().any(|p| p.contains(w)) {
            return Err(format!("no problem mentions `{w}`; problems:\n  {}", r.problems.join("\n  ")));
        }
    }
    if r.problems.len() != wanted.len() {
        return Err(format!("expected {} problems, got:\n  {}", wanted.len(), r.problems.join("\n  ")));
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trial = Trial::ignorable_test("sass_check_reports_spills_stack_and_expectations", check_probe);
    libtest_mimic::run(&args, vec![trial]).exit()
}
