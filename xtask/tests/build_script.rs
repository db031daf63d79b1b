//! deepkern's build script (build.rs), compiled on its own and run in scratch folders with a
//! controlled environment: how it finds nvcc, when cargo must rerun it, what it tells dependents,
//! and when a missing nvcc is an error. The nvcc here is a stand-in that writes empty outputs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// build.rs compiled once for this test run.
fn build_script() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("deepkern-build-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("build-script");
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let out = Command::new(rustc)
            .args(["--edition", "2024", "--crate-type", "bin", "--crate-name", "build_script", "-o"])
            .arg(&exe)
            .arg(xtask::project_root().join("build.rs"))
            .output()
            .expect("run rustc");
        assert!(out.status.success(), "rustc build.rs: {}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

/// A scratch crate root (csrc/ with one unit and the header), an OUT_DIR, and a bin folder that
/// is the whole of PATH.
struct Scratch {
    dir: PathBuf,
}

/// The build script's exit code, stdout (cargo directives) and stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn has(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l == line)
    }
}

const FAKE_NVCC: &str = r#"#!/bin/sh
# Shell built-ins only: PATH holds nothing else.
if [ "$1" = "--version" ]; then
    echo "Cuda compilation tools, release 13.0, V13.0.88"
    exit 0
fi
out=""
while [ $# -gt 0 ]; do
    if [ "$1" = "-o" ]; then out="$2"; fi
    shift
done
[ -n "$out" ] && : >"$out"
exit 0
"#;

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("deepkern-build-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root/csrc/include", "out", "bin", "cuda/bin"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("root/csrc/include/deepkern.h"), "/* header */\n").unwrap();
        std::fs::write(dir.join("root/csrc/unit.cu"), "// a unit\n").unwrap();
        Scratch { dir }
    }

    /// Puts the nvcc stand-in at `rel` (under the scratch folder).
    fn nvcc(&self, rel: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(rel);
        std::fs::write(&path, FAKE_NVCC).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn run(&self, env: &[(&str, &str)]) -> Run {
        let out = Command::new(build_script())
            .env_clear()
            .env("PATH", self.dir.join("bin"))
            .env("CARGO_MANIFEST_DIR", self.dir.join("root"))
            .env("OUT_DIR", self.dir.join("out"))
            .envs(env.iter().copied())
            .output()
            .expect("run the build script");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Run { code: out.status.code().unwrap_or(-1), stdout: text(&out.stdout), stderr: text(&out.stderr) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn without_nvcc_a_change_of_path_reruns_the_lookup() {
    let s = Scratch::new("no-nvcc");
    let run = s.run(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("CUDA kernels NOT built"), "{}", run.stdout);
    assert!(!run.has("cargo::rustc-cfg=deepkern_kernels"), "{}", run.stdout);
    assert!(run.has("cargo::rerun-if-env-changed=PATH"), "installing nvcc on PATH must rerun the build script:\n{}", run.stdout);
}

#[test]
fn nvcc_found_on_path_builds_and_watches_path() {
    let s = Scratch::new("path-nvcc");
    s.nvcc("bin/nvcc");
    let run = s.run(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.has("cargo::rustc-cfg=deepkern_kernels"), "{}", run.stdout);
    assert!(run.has("cargo::rerun-if-env-changed=PATH"), "{}", run.stdout);
}

#[test]
fn nvcc_named_by_nvcc_or_cuda_home_does_not_depend_on_path() {
    let s = Scratch::new("named-nvcc");
    let nvcc = s.nvcc("cuda/bin/nvcc");
    let home = s.dir.join("cuda");
    for (var, value) in [("NVCC", nvcc.to_str().unwrap()), ("CUDA_HOME", home.to_str().unwrap())] {
        let run = s.run(&[(var, value)]);
        assert_eq!(run.code, 0, "{var}: {}", run.stderr);
        assert!(run.has("cargo::rustc-cfg=deepkern_kernels"), "{var}: {}", run.stdout);
        assert!(!run.has("cargo::rerun-if-env-changed=PATH"), "{var}: {}", run.stdout);
    }
}

#[test]
fn required_kernels_make_a_missing_nvcc_a_build_error() {
    let s = Scratch::new("required");
    for env in [[("DEEPKERN_REQUIRE_KERNELS", "1")], [("CARGO_FEATURE_REQUIRE_KERNELS", "1")]] {
        let run = s.run(&env);
        assert_ne!(run.code, 0, "{env:?}: a missing nvcc must fail the build:\n{}", run.stdout);
        for advice in ["NVCC", "CUDA_HOME", "PATH"] {
            assert!(run.stderr.contains(advice), "{env:?}: {}", run.stderr);
        }
    }
    let skipped = s.run(&[("DEEPKERN_REQUIRE_KERNELS", "1"), ("DEEPKERN_SKIP_KERNELS", "1")]);
    assert_ne!(skipped.code, 0, "required kernels, skipped: {}", skipped.stdout);
    assert_eq!(s.run(&[("DEEPKERN_REQUIRE_KERNELS", "0")]).code, 0);
}

#[test]
fn dependents_get_the_header_and_library_folders() {
    let s = Scratch::new("metadata");
    let include = format!("cargo::metadata=include={}", s.dir.join("root/csrc/include").display());
    let missing = s.run(&[]);
    assert!(missing.has(&include), "{}", missing.stdout);
    assert!(!missing.stdout.contains("cargo::metadata=lib_dir="), "no library, no folder: {}", missing.stdout);
    s.nvcc("bin/nvcc");
    let built = s.run(&[]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    assert!(built.has(&include), "{}", built.stdout);
    assert!(built.has(&format!("cargo::metadata=lib_dir={}", s.dir.join("out").display())), "{}", built.stdout);
    assert!(s.dir.join("out/libdeepkern_kernels.a").is_file());
}
