//! `target/bundle/`: the release test and bench executables plus `run.sh`, so that a GPU host
//! with no Rust toolchain runs every GPU test (required to pass, never skipped) and every bench.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::toolchain::Toolchain;
use crate::{Result, cargo, cmd, project_root};

/// Benches that need no GPU and would only spend the GPU host's time.
const CPU_ONLY_BENCHES: [&str; 1] = ["cpu_reference"];

/// An executable cargo built: (bundle name, path).
type Executable = (String, PathBuf);

/// Test-profile executables of the deepkern package whose target kind is one of `kinds`.
fn executables(msgs: &[Value], kinds: &[&str]) -> Vec<Executable> {
    msgs.iter()
        .filter(|m| m["reason"] == "compiler-artifact" && cargo::is_deepkern(m) && m["profile"]["test"] == Value::Bool(true))
        .filter_map(|m| {
            let kind = m["target"]["kind"][0].as_str()?;
            let exe = m["executable"].as_str()?;
            kinds.contains(&kind).then(|| {
                let name = if kind == "lib" { "unit".to_string() } else { m["target"]["name"].as_str().unwrap_or("unnamed").to_string() };
                (name, PathBuf::from(exe))
            })
        })
        .collect()
}

/// The commit being bundled, with `-dirty` when the work tree has uncommitted changes.
pub fn commit_id(root: &Path) -> String {
    let git = |args: &[&str]| cmd::output(Command::new("git").current_dir(root).args(args)).unwrap_or_default();
    let id = git(&["rev-parse", "--short", "HEAD"]).trim().to_string();
    if id.is_empty() {
        return "unknown".into();
    }
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).trim().is_empty();
    if dirty { format!("{id}-dirty") } else { id }
}

fn copy_exe(from: &Path, to: &Path) -> Result<u64> {
    fs::copy(from, to).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))
}

/// Builds the bundle and returns its folder.
pub fn run(tc: &Toolchain) -> Result<PathBuf> {
    let root = project_root();
    let (_, manifest) = cargo::kernels_manifest(tc, &["build", "--release"])?;
    if manifest["built"] != Value::Bool(true) {
        return Err(format!("the bundle needs the kernels, which were not built: {}", manifest["reason"].as_str().unwrap_or("?")));
    }
    let mut test = cargo::cargo(tc);
    test.args(["test", "-p", "deepkern", "--release", "--no-run"]);
    let tests = executables(&cargo::messages(test)?, &["lib", "test"]);
    let mut bench = cargo::cargo(tc);
    bench.args(["bench", "-p", "deepkern", "--no-run"]);
    let benches: Vec<Executable> =
        executables(&cargo::messages(bench)?, &["bench"]).into_iter().filter(|(n, _)| !CPU_ONLY_BENCHES.contains(&n.as_str())).collect();
    if tests.is_empty() {
        return Err("cargo reported no test executables".into());
    }

    let dir = root.join("target/bundle");
    let _ = fs::remove_dir_all(&dir);
    let mut listing = Vec::new();
    let mut total = 0u64;
    for (sub, exes) in [("tests", &tests), ("benches", &benches)] {
        let d = dir.join("bin").join(sub);
        fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for (name, path) in exes {
            let bytes = copy_exe(path, &d.join(name))?;
            total += bytes;
            listing.push(format!("bin/{sub}/{name}  {bytes} bytes"));
        }
    }
    let commit = commit_id(&root);
    let run_sh = RUN_SH.replace("@COMMIT@", &commit);
    fs::write(dir.join("run.sh"), run_sh).map_err(|e| e.to_string())?;
    make_executable(&dir.join("run.sh"))?;
    let rustc = cmd::output(Command::new("rustc").arg("--version")).unwrap_or_default();
    let manifest_txt = format!(
        "deepkern GPU bundle\ncommit: {commit}\nbuilt: {}\nrustc: {}\nnvcc: {}\narchs: {}\n\n{}\n",
        cmd::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])).unwrap_or_default().trim(),
        rustc.trim(),
        manifest["nvcc_version"].as_str().unwrap_or("?"),
        manifest["archs"],
        listing.join("\n")
    );
    fs::write(dir.join("MANIFEST.txt"), manifest_txt).map_err(|e| e.to_string())?;
    eprintln!("bundle: {} ({} tests, {} benches, {:.1} MB)", dir.display(), tests.len(), benches.len(), total as f64 / 1e6);
    eprintln!("run it on a GPU host: copy {} there, then `./run.sh results` (bench lines land in results/*.jsonl)", dir.display());
    Ok(dir)
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// The bundle's entry point. `@COMMIT@` is replaced at bundle time.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# deepkern GPU bundle: every test (a GPU is required: DEEPKERN_REQUIRE_GPU=1) and every bench.
# Usage: ./run.sh [RESULTS_DIR]   (default: ./results). Bench lines go to RESULTS_DIR/<device>.jsonl,
# logs to RESULTS_DIR/logs/. Exits non-zero if anything failed, or if there is no GPU.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/results}"
mkdir -p "$out/logs" && out="$(cd "$out" && pwd)"
export DEEPKERN_REQUIRE_GPU=1 DEEPKERN_BENCH_OUT="$out" DEEPKERN_COMMIT="@COMMIT@"

gpu=1
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    gpu=0
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "run.sh: NO NVIDIA GPU FOUND (nvidia-smi -L lists none)." >&2
    echo "run.sh: the tests will fail (DEEPKERN_REQUIRE_GPU=1) and benches are skipped." >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
else
    nvidia-smi -L
fi

# cudarc loads NCCL as libnccl.so and cuBLASLt as libcublasLt.so*: link what this host has.
libs="$out/.libs"
mkdir -p "$libs"
candidates() {
    ldconfig -p 2>/dev/null | awk -v n="$1" '$1 ~ "^"n {print $NF}'
    python3 - "$1" <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", sys.argv[1] + "*")):
        print(p)
PY
    ls /usr/local/cuda*/lib64/"$1"* 2>/dev/null
}
for lib in libnccl.so libcublasLt.so; do
    found="$(candidates "$lib" | head -n 1)"
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/$lib"
        echo "run.sh: $lib -> $found"
    else
        echo "run.sh: warning: $lib not found on this host" >&2
    fi
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

summary=()
status=0
run_one() {
    local kind="$1" exe="$2"; shift 2
    local name log rc
    name="$(basename "$exe")"
    log="$out/logs/$kind-$name.log"
    echo "== $kind $name"
    "$exe" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then summary+=("ok      $kind $name"); else summary+=("FAILED  $kind $name (exit $rc, log $log)"); status=1; fi
}
for t in "$here"/bin/tests/*; do run_one test "$t"; done
if [ "$gpu" -eq 1 ]; then
    for b in "$here"/bin/benches/*; do [ -e "$b" ] && run_one bench "$b" --bench; done
else
    status=1
fi

echo
echo "== summary (commit @COMMIT@)"
printf '%s\n' "${summary[@]}"
[ "$gpu" -eq 1 ] || echo "FAILED  no GPU on this host"
ls "$out"/*.jsonl 2>/dev/null && echo "bench lines: $out/*.jsonl"
exit "$status"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_test_profile_executables_of_deepkern() {
        let msgs: Vec<Value> = [
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w#deepkern@0.1.0","target":{"kind":["lib"],"name":"deepkern"},"profile":{"test":true},"executable":"/t/deepkern-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w#deepkern@0.1.0","target":{"kind":["lib"],"name":"deepkern"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w#deepkern@0.1.0","target":{"kind":["test"],"name":"quant_gpu"},"profile":{"test":true},"executable":"/t/quant_gpu-2"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w#deepkern@0.1.0","target":{"kind":["example"],"name":"quantize"},"profile":{"test":false},"executable":"/t/quantize"}"#,
            r#"{"reason":"compiler-artifact","package_id":"registry+https://x#half@2.7.1","target":{"kind":["lib"],"name":"half"},"profile":{"test":true},"executable":"/t/half"}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let got = executables(&msgs, &["lib", "test"]);
        assert_eq!(
            got,
            vec![("unit".to_string(), PathBuf::from("/t/deepkern-1")), ("quant_gpu".to_string(), PathBuf::from("/t/quant_gpu-2"))]
        );
    }
}
