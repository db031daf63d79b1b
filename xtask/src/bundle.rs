//! `target/bundle/`: the release test and bench executables plus `run.sh`, so that a GPU host
//! with no Rust toolchain runs every GPU test (required to pass, never skipped) and every bench.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::toolchain::Toolchain;
use crate::{Result, cargo, cmd, project_root};

/// Benches that need no GPU and would only spend the GPU host's time (they write no results).
const CPU_ONLY_BENCHES: [&str; 1] = ["cpu_reference"];
/// The bundle's folder and its compressed copy, relative to the project root.
pub const BUNDLE_DIR: &str = "target/bundle";
pub const BUNDLE_TARBALL: &str = "target/deepkern-bundle.tar.gz";

/// An executable cargo built: (bundle name, path).
type Executable = (String, PathBuf);

/// Test-profile executables of the package `id` whose target kind is one of `kinds`.
fn executables(msgs: &[Value], id: &str, kinds: &[&str]) -> Vec<Executable> {
    msgs.iter()
        .filter(|m| m["reason"] == "compiler-artifact" && cargo::is_package(m, id) && m["profile"]["test"] == Value::Bool(true))
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

/// The commit being bundled, with `-dirty` when tracked files have uncommitted changes.
pub fn commit_id(root: &Path) -> String {
    let git = |args: &[&str]| cmd::output(Command::new("git").current_dir(root).args(args)).unwrap_or_default();
    let id = git(&["rev-parse", "--short", "HEAD"]).trim().to_string();
    if id.is_empty() {
        return "unknown".into();
    }
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).trim().is_empty();
    if dirty { format!("{id}-dirty") } else { id }
}

/// The release test executables (`cargo test --release --no-run`): lib unit tests as `unit`.
fn test_executables(tc: &Toolchain, id: &str) -> Result<Vec<Executable>> {
    let mut c = cargo::cargo(tc);
    c.args(["test", "-p", "deepkern", "--release", "--no-run"]);
    let tests = executables(&cargo::messages(c)?, id, &["lib", "test"]);
    if tests.is_empty() {
        return Err("cargo reported no test executables for deepkern".into());
    }
    Ok(tests)
}

/// The bench executables (`cargo bench --no-run`), less the CPU-only ones.
fn bench_executables(tc: &Toolchain, id: &str) -> Result<Vec<Executable>> {
    let mut c = cargo::cargo(tc);
    c.args(["bench", "-p", "deepkern", "--no-run"]);
    let all = executables(&cargo::messages(c)?, id, &["bench"]);
    Ok(all.into_iter().filter(|(n, _)| !CPU_ONLY_BENCHES.contains(&n.as_str())).collect())
}

/// Copies `from` to `to` and strips the copy's symbol table (a quarter of its size; panics still
/// name file and line). Returns the copy's size.
fn copy_exe(from: &Path, to: &Path) -> Result<u64> {
    fs::copy(from, to).map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    if let Err(e) = cmd::output(Command::new("strip").arg(to)) {
        eprintln!("bundle: note: {} kept its symbols ({})", to.display(), e.lines().next().unwrap_or_default());
    }
    fs::metadata(to).map(|m| m.len()).map_err(|e| format!("{}: {e}", to.display()))
}

/// Copies the executables into `dir/bin/{tests,benches}/` and lists them with their sizes.
fn copy_executables(dir: &Path, tests: &[Executable], benches: &[Executable]) -> Result<(Vec<String>, u64)> {
    let mut listing = Vec::new();
    let mut total = 0;
    for (sub, exes) in [("tests", tests), ("benches", benches)] {
        let d = dir.join("bin").join(sub);
        fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        for (name, path) in exes {
            let bytes = copy_exe(path, &d.join(name))?;
            total += bytes;
            listing.push(format!("bin/{sub}/{name}  {bytes} bytes"));
        }
    }
    Ok((listing, total))
}

/// `MANIFEST.txt`: what was bundled, from which commit, with which compilers.
fn manifest_text(commit: &str, kernels: &Value, listing: &[String]) -> String {
    let first_line = |c: &mut Command| cmd::output(c).unwrap_or_default().lines().next().unwrap_or("?").trim().to_string();
    format!(
        "deepkern GPU bundle\ncommit: {commit}\ndate: {}\nrustc: {}\nnvcc: {}\narchs: {}\n\nfiles:\n{}\n",
        first_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        first_line(Command::new("rustc").arg("--version")),
        kernels["nvcc_version"].as_str().unwrap_or("?"),
        kernels["archs"],
        listing.join("\n")
    )
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// `run.sh` with the commit baked in.
pub fn run_script(commit: &str) -> String {
    RUN_SH.replace("@COMMIT@", commit)
}

/// Builds the bundle and returns its folder.
pub fn run(tc: &Toolchain) -> Result<PathBuf> {
    let root = project_root();
    let (_, kernels) = cargo::kernels_manifest(tc, &["build", "--release", "-p", "deepkern", "--lib"])?;
    if kernels["built"] != Value::Bool(true) {
        return Err(format!(
            "the bundle needs the kernels, and build.rs did not build them: {}",
            kernels["reason"].as_str().unwrap_or("no reason given")
        ));
    }
    let id = cargo::deepkern_id(tc)?;
    let tests = test_executables(tc, &id)?;
    let benches = bench_executables(tc, &id)?;
    let dir = root.join(BUNDLE_DIR);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("cannot remove the old {}: {e}", dir.display()))?;
    }
    let (listing, total) = copy_executables(&dir, &tests, &benches)?;
    let commit = commit_id(&root);
    write_file(&dir.join("run.sh"), &run_script(&commit))?;
    make_executable(&dir.join("run.sh"))?;
    write_file(&dir.join("MANIFEST.txt"), &manifest_text(&commit, &kernels, &listing))?;
    let tarball = root.join(BUNDLE_TARBALL);
    cmd::run(Command::new("tar").arg("-czf").arg(&tarball).arg("-C").arg(root.join("target")).arg("bundle"))?;
    let packed = fs::metadata(&tarball).map(|m| m.len()).unwrap_or(0);
    print_how_to_run(&dir, &tarball, &commit, (tests.len(), benches.len()), (total, packed));
    Ok(dir)
}

fn print_how_to_run(dir: &Path, tarball: &Path, commit: &str, counts: (usize, usize), sizes: (u64, u64)) {
    eprintln!();
    eprint!("{}", how_to_run(dir, tarball, commit, counts, sizes));
}

/// What the bundle holds and how to run it on a GPU host.
fn how_to_run(dir: &Path, tarball: &Path, commit: &str, (tests, benches): (usize, usize), (total, packed): (u64, u64)) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    format!(
        "bundle {commit}: {} ({tests} test and {benches} bench executables, {:.1} MB)\n\
         packed: {} ({:.1} MB)\n\
         copy the folder to a GPU host (CUDA driver 580+, no Rust needed) and run it there:\n    \
         scp -r {} gpu-host:deepkern && ssh gpu-host 'cd deepkern && ./run.sh results'\n\
         (or copy {} and unpack it there: `tar -xzf deepkern-bundle.tar.gz && bundle/run.sh results`)\n\
         then copy results/*.jsonl into bench-results/ here and run `cargo xtask report`\n",
        dir.display(),
        mb(total),
        tarball.display(),
        mb(packed),
        dir.display(),
        tarball.display(),
    )
}

/// The bundle's entry point. `@COMMIT@` is replaced at bundle time.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# deepkern GPU bundle: every test (a GPU is required: DEEPKERN_REQUIRE_GPU=1), then every bench.
# Usage: ./run.sh [RESULTS_DIR]   (default: ./results). Bench lines go to RESULTS_DIR/<device>.jsonl,
# logs to RESULTS_DIR/logs/. Exits non-zero if anything failed, or if there is no GPU.
# DEEPKERN_ONLY="gemm_gpu bench:gemm ..." runs only the named tests and benches ("name" or
# "test:name" for a test, "bench:name" for a bench); DEEPKERN_STEP_TIMEOUT (seconds, default 480)
# stops any one executable that runs longer, so a hang cannot use up a GPU session;
# DEEPKERN_BENCH_ARGS is appended to every bench's arguments (e.g. "--quick" for criterion's short
# mode; the recorded medians are measured the same way either way).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-results}"
mkdir -p "$out/logs" && out="$(cd "$out" && pwd)"
export DEEPKERN_REQUIRE_GPU=1 DEEPKERN_BENCH_OUT="$out" DEEPKERN_COMMIT="@COMMIT@"
echo "run.sh: deepkern bundle @COMMIT@; results in $out"
cp "$here/MANIFEST.txt" "$out/MANIFEST.txt" 2>/dev/null

gpu=1
gpus="$(nvidia-smi -L 2>/dev/null)"
if ! grep -q '^GPU ' <<<"$gpus"; then
    gpu=0
    {
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        echo "run.sh: NO NVIDIA GPU FOUND (\`nvidia-smi -L\` lists none)."
        echo "run.sh: the GPU tests will fail (DEEPKERN_REQUIRE_GPU=1); benches are not run."
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    } >&2
else
    echo "$gpus"
    nvidia-smi >"$out/logs/nvidia-smi.txt" 2>&1
fi

# cudarc opens NCCL as libnccl.so (the real soname, libnccl.so.2, is not among the names it tries)
# and cuBLASLt as libcublasLt.so.13 or libcublasLt.so: link what this host has into a private
# folder put first on LD_LIBRARY_PATH.
lib_dirs() {
    python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = []
try:
    import nvidia
    roots += [os.path.dirname(p) for p in nvidia.__path__]
except Exception:
    pass
roots += site.getsitepackages() + [site.getusersitepackages()]
seen = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.append(d)
            print(d)
PY
    ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 2>/dev/null
}
find_lib() { # the first of the names found, in ldconfig's cache or a library folder
    local name found d
    for name in "$@"; do
        found="$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF}' | head -n 1)"
        [ -n "$found" ] && { echo "$found"; return 0; }
        while read -r d; do
            [ -e "$d/$name" ] && { echo "$d/$name"; return 0; }
        done < <(lib_dirs)
    done
    return 1
}
libs="$(mktemp -d "${TMPDIR:-/tmp}/deepkern-libs.XXXXXX")"
trap 'rm -rf "$libs"' EXIT
lib_path="$libs"
link_lib() { # link_lib LINK NAME...
    local link="$1" found
    shift
    if found="$(find_lib "$@")"; then
        ln -sf "$found" "$libs/$link"
        lib_path="$lib_path:$(dirname "$found")"
        echo "run.sh: $link -> $found"
    else
        echo "run.sh: warning: no $* on this host; what needs it will fail" >&2
    fi
}
link_lib libnccl.so libnccl.so.2 libnccl.so
link_lib libcublasLt.so libcublasLt.so.13 libcublasLt.so
export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

summary=()
status=0
only="${DEEPKERN_ONLY:-}"
step_timeout="${DEEPKERN_STEP_TIMEOUT:-480}"
selected() { # selected KIND NAME: whether DEEPKERN_ONLY (if set) names it
    local w
    [ -z "$only" ] && return 0
    for w in $only; do
        [ "$w" = "$2" ] && [ "$1" = test ] && return 0
        [ "$w" = "$1:$2" ] && return 0
    done
    return 1
}
run_one() { # run_one KIND EXE ARGS...
    local kind="$1" exe="$2" name log rc
    shift 2
    name="$(basename "$exe")"
    selected "$kind" "$name" || return 0
    log="$out/logs/$kind-$name.log"
    echo
    echo "== $kind $name"
    timeout -k 10 "$step_timeout" "$exe" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        summary+=("ok      $kind $name")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        summary+=("FAILED  $kind $name (stopped after ${step_timeout} s; $log)")
        status=1
    else
        summary+=("FAILED  $kind $name (exit $rc; $log)")
        status=1
    fi
}
for t in "$here"/bin/tests/*; do
    [ -e "$t" ] && run_one test "$t"
done
if [ "$gpu" -eq 1 ]; then
    for b in "$here"/bin/benches/*; do
        # shellcheck disable=SC2086 # the extra arguments are meant to split
        [ -e "$b" ] && run_one bench "$b" --bench ${DEEPKERN_BENCH_ARGS:-}
    done
else
    summary+=("FAILED  no GPU on this host: benches not run")
    status=1
fi

echo
echo "== summary (deepkern @COMMIT@)"
printf '%s\n' "${summary[@]}"
for f in "$out"/*.jsonl; do
    [ -e "$f" ] && echo "bench lines: $f"
done
[ "$status" -eq 0 ] && echo "all passed" || echo "run.sh: FAILED (see above)" >&2
exit "$status"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_message_speaks_of_a_gpu_host() {
        let text = how_to_run(
            Path::new("/w/target/bundle"),
            Path::new("/w/target/deepkern-bundle.tar.gz"),
            "abc1234",
            (7, 5),
            (9e6 as u64, 3e6 as u64),
        );
        assert!(text.contains("copy the folder to a GPU host"), "{text}");
        assert!(text.contains("scp -r /w/target/bundle gpu-host:deepkern") && text.contains("./run.sh results"), "{text}");
        for foreign in ["device tool", "carry", "$OUT"] {
            assert!(!text.contains(foreign), "`{foreign}` means nothing to a user: {text}");
        }
    }

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
        let got = executables(&msgs, "path+file:///w#deepkern@0.1.0", &["lib", "test"]);
        assert_eq!(
            got,
            vec![("unit".to_string(), PathBuf::from("/t/deepkern-1")), ("quant_gpu".to_string(), PathBuf::from("/t/quant_gpu-2"))]
        );
    }

    /// A scratch bundle of shell-script "executables", with a fake `nvidia-smi` first on PATH.
    struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        fn new(tag: &str, gpu: bool) -> Self {
            let dir = std::env::temp_dir().join(format!("deepkern-bundle-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for sub in ["bin/tests", "bin/benches", "fakebin"] {
                fs::create_dir_all(dir.join(sub)).unwrap();
            }
            let smi = if gpu { "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-x)'" } else { "echo 'NVIDIA-SMI has failed' >&2; exit 9" };
            let s = Scratch { dir };
            s.exe("fakebin/nvidia-smi", smi);
            s.exe("run.sh", &run_script("abc1234-dirty"));
            fs::write(s.dir.join("MANIFEST.txt"), "manifest\n").unwrap();
            s
        }

        fn exe(&self, rel: &str, body: &str) {
            let body = if body.starts_with("#!") { body.to_string() } else { format!("#!/usr/bin/env bash\n{body}\n") };
            fs::write(self.dir.join(rel), body).unwrap();
            make_executable(&self.dir.join(rel)).unwrap();
        }

        /// Runs run.sh with the results in `<dir>/res`: (exit code, stdout, stderr).
        fn run(&self) -> (i32, String, String) {
            self.run_with(&[])
        }

        /// [`Scratch::run`] with extra environment variables.
        fn run_with(&self, env: &[(&str, &str)]) -> (i32, String, String) {
            let path = format!("{}:/usr/bin:/bin", self.dir.join("fakebin").display());
            let out = Command::new("bash")
                .arg(self.dir.join("run.sh"))
                .arg(self.dir.join("res"))
                .env("PATH", path)
                .env_remove("LD_LIBRARY_PATH")
                .envs(env.iter().copied())
                .output()
                .unwrap();
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn run_sh_runs_everything_and_reports_failures() {
        let s = Scratch::new("gpu", true);
        s.exe("bin/tests/good", "echo \"req=$DEEPKERN_REQUIRE_GPU out=$DEEPKERN_BENCH_OUT commit=$DEEPKERN_COMMIT\"");
        s.exe("bin/tests/bad", "echo boom; exit 3");
        s.exe("bin/benches/quant", "echo \"args=$*\"; echo '{}' >> \"$DEEPKERN_BENCH_OUT/h100.jsonl\"");
        let (code, stdout, stderr) = s.run();
        assert_eq!(code, 1, "{stdout}\n{stderr}");
        let res = s.dir.join("res");
        assert_eq!(s.read("res/logs/test-good.log").trim(), format!("req=1 out={} commit=abc1234-dirty", res.display()));
        assert_eq!(s.read("res/logs/test-bad.log").trim(), "boom");
        assert_eq!(s.read("res/logs/bench-quant.log").trim(), "args=--bench");
        assert_eq!(s.read("res/h100.jsonl"), "{}\n");
        assert_eq!(s.read("res/MANIFEST.txt"), "manifest\n");
        assert!(stdout.contains("ok      test good") && stdout.contains("FAILED  test bad (exit 3;"), "{stdout}");
        assert!(stdout.contains("ok      bench quant"), "{stdout}");
    }

    #[test]
    fn run_sh_passes_when_everything_passes() {
        let s = Scratch::new("pass", true);
        s.exe("bin/tests/good", "exit 0");
        s.exe("bin/benches/quant", "exit 0");
        let (code, stdout, stderr) = s.run();
        assert_eq!(code, 0, "{stdout}\n{stderr}");
        assert!(stdout.contains("all passed"), "{stdout}");
    }

    #[test]
    fn run_sh_runs_only_what_is_named_and_stops_hangs() {
        let s = Scratch::new("only", true);
        s.exe("bin/tests/gemm_gpu", "echo t-gemm");
        s.exe("bin/tests/ep_gpu", "echo t-ep");
        s.exe("bin/tests/slow", "sleep 30");
        s.exe("bin/benches/gemm", "echo \"b-gemm $*\"");
        s.exe("bin/benches/ep", "echo b-ep");
        let (code, stdout, _) = s.run_with(&[
            ("DEEPKERN_ONLY", "gemm_gpu test:slow bench:gemm"),
            ("DEEPKERN_BENCH_ARGS", "--quick"),
            ("DEEPKERN_STEP_TIMEOUT", "1"),
        ]);
        assert_eq!(code, 1, "{stdout}");
        assert!(stdout.contains("ok      test gemm_gpu") && stdout.contains("ok      bench gemm"), "{stdout}");
        assert!(stdout.contains("FAILED  test slow (stopped after 1 s;"), "{stdout}");
        assert!(!stdout.contains("t-ep") && !stdout.contains("b-ep"), "{stdout}");
        assert!(stdout.contains("b-gemm --bench --quick"), "{stdout}");
    }

    #[test]
    fn run_sh_fails_loudly_without_a_gpu() {
        let s = Scratch::new("nogpu", false);
        s.exe("bin/tests/good", "exit 0");
        s.exe("bin/benches/quant", "echo ran; exit 0");
        let (code, stdout, stderr) = s.run();
        assert_ne!(code, 0, "{stdout}\n{stderr}");
        assert!(stderr.contains("NO NVIDIA GPU FOUND"), "{stderr}");
        assert!(stdout.contains("FAILED  no GPU on this host"), "{stdout}");
        assert!(!s.dir.join("res/logs/bench-quant.log").exists(), "benches must not run without a GPU");
    }
}
