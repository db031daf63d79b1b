//! Finding, and where missing installing, what the build and the checks need: CUDA 13.0's nvcc
//! (PyPI wheels, into the ignored `.toolchain/`), cuobjdump and nvdisasm 13.2+ (older ones cannot
//! read 13.0 cubins), libclang for the bindings drift test, and CUTLASS's CuTe headers (PyPI) for
//! the simulator's check against CuTe.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cmd};

/// nvcc and what builds with it, pinned to 13.0 so the code runs on a 580 driver.
pub const CUDA_PACKAGES: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.*",
    "nvidia-cuda-crt==13.0.*",
    "nvidia-cuda-cccl==13.0.*",
    "nvidia-nvvm==13.0.*",
];
/// SASS readers; any 13.2+ reads 13.0 output.
pub const TOOL_PACKAGES: [&str; 2] = ["nvidia-cuda-cuobjdump>=13.2", "nvidia-cuda-nvdisasm>=13.2"];
/// Where the wheels go, relative to the project root, and their bin folders.
pub const LOCAL_CUDA: &str = ".toolchain/cuda";
pub const LOCAL_TOOLS: &str = ".toolchain/tools";
/// CUTLASS (header-only CuTe inside), pinned, without its Python dependencies.
pub const CUTLASS_PACKAGE: &str = "nvidia-cutlass==4.2.0.0";
pub const LOCAL_CUTLASS: &str = ".toolchain/cutlass";
/// Where the wheel keeps the C++ headers.
const CUTLASS_INCLUDE: &str = "cutlass_library/source/include";
const WHEEL_BIN: &str = "nvidia/cu13/bin";
/// Oldest cuobjdump/nvdisasm that reads CUDA 13.0 cubins.
const MIN_TOOLS: (u32, u32) = (13, 2);

/// What `setup` found or installed.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub nvcc: PathBuf,
    pub nvcc_release: (u32, u32),
    pub cuobjdump: PathBuf,
    pub nvdisasm: PathBuf,
    pub libclang: bool,
    /// The CuTe/CUTLASS include directory (`cute/tensor.hpp` inside).
    pub cutlass_include: PathBuf,
}

impl Toolchain {
    /// Environment for cargo children: the build script reads `NVCC` (PATH is left alone so that
    /// `rerun-if-env-changed` does not rebuild the kernels on every PATH difference).
    pub fn cargo_env(&self) -> [(&'static str, PathBuf); 1] {
        [("NVCC", self.nvcc.clone())]
    }

    /// A `cuobjdump` command that finds nvdisasm (`-sass` needs it on PATH).
    pub fn cuobjdump(&self) -> Command {
        let mut c = Command::new(&self.cuobjdump);
        let dir = self.nvdisasm.parent().map(Path::to_path_buf).unwrap_or_default();
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(dir).chain(env::split_paths(&path))).unwrap_or(path);
        c.env("PATH", joined);
        c
    }
}

/// `(major, minor)` from a CUDA tool's `--version` ("... release 13.0, V13.0.88").
pub fn release(program: &Path) -> Option<(u32, u32)> {
    let text = cmd::output(Command::new(program).arg("--version")).ok()?;
    parse_release(&text)
}

/// Parses "release X.Y" out of a CUDA tool's version text.
pub fn parse_release(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("release ")? + "release ".len()..];
    let ver: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut it = ver.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn env_dir(var: &str) -> Option<PathBuf> {
    env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// nvcc, looked up exactly as build.rs does: `NVCC`, `CUDA_HOME/bin`, `CUDA_PATH/bin`, `PATH`,
/// then the project-local toolchain.
pub fn find_nvcc(root: &Path) -> Result<Option<PathBuf>> {
    if let Some(p) = env_dir("NVCC") {
        return if p.is_file() { Ok(Some(p)) } else { Err(format!("NVCC={} does not exist", p.display())) };
    }
    let candidates = [env_dir("CUDA_HOME"), env_dir("CUDA_PATH")].into_iter().flatten().map(|d| d.join("bin/nvcc"));
    Ok(candidates.chain(on_path("nvcc")).chain([root.join(LOCAL_CUDA).join(WHEEL_BIN).join("nvcc")]).find(|p| p.is_file()))
}

/// A CUDA tool (`cuobjdump`, `nvdisasm`) of release 13.2 or later.
fn find_tool(root: &Path, name: &str) -> Option<PathBuf> {
    let dirs = [env_dir("CUDA_HOME"), env_dir("CUDA_PATH")].into_iter().flatten().map(|d| d.join("bin").join(name));
    on_path(name)
        .into_iter()
        .chain(dirs)
        .chain([root.join(LOCAL_TOOLS).join(WHEEL_BIN).join(name)])
        .filter(|p| p.is_file())
        .find(|p| release(p).is_some_and(|r| r >= MIN_TOOLS))
}

/// cuobjdump and nvdisasm, both 13.2 or later: `PATH`, `CUDA_HOME/bin`, `CUDA_PATH/bin`, then the
/// project-local tools. Installs nothing.
pub fn find_tools(root: &Path) -> Option<(PathBuf, PathBuf)> {
    Some((find_tool(root, "cuobjdump")?, find_tool(root, "nvdisasm")?))
}

fn pip_install(target: &Path, packages: &[&str]) -> Result<()> {
    pip_install_with(target, packages, &[])
}

fn pip_install_with(target: &Path, packages: &[&str], extra: &[&str]) -> Result<()> {
    cmd::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--root-user-action=ignore", "-q", "--upgrade"])
            .args(extra)
            .arg("--target")
            .arg(target)
            .args(packages),
    )
    .map_err(|e| format!("{e}\n(installing CUDA wheels needs python3 with pip and access to PyPI)"))
}

fn is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// Installs libclang with apt where that is possible (root, apt-get present).
fn install_libclang() -> bool {
    if !is_root() || on_path("apt-get").is_none() {
        return false;
    }
    let quiet = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(c).is_ok()
    };
    quiet(Command::new("apt-get").args(["update", "-qq"])) && quiet(Command::new("apt-get").args(["install", "-y", "-qq", "libclang-dev"]))
}

/// The CUDA release the project pins (PyPI wheels), so that the code runs on a 580 driver.
const PINNED: (u32, u32) = (13, 0);

/// nvcc and its release: the one build.rs would find, else CUDA 13.0 installed from PyPI.
fn setup_nvcc(root: &Path) -> Result<(PathBuf, (u32, u32))> {
    let (nvcc, installed) = match find_nvcc(root)? {
        Some(p) => (p, false),
        None => {
            eprintln!("no nvcc found (NVCC, CUDA_HOME, CUDA_PATH, PATH, {LOCAL_CUDA}): installing CUDA 13.0 from PyPI");
            pip_install(&root.join(LOCAL_CUDA), &CUDA_PACKAGES)?;
            (find_nvcc(root)?.ok_or("nvcc is still missing after the install")?, true)
        }
    };
    let nvcc = std::path::absolute(&nvcc).unwrap_or(nvcc);
    let rel = release(&nvcc).ok_or_else(|| format!("`{} --version` did not report a CUDA release", nvcc.display()))?;
    if installed && rel != PINNED {
        return Err(format!("the installed {} reports CUDA {}.{}, not the pinned 13.0", nvcc.display(), rel.0, rel.1));
    }
    if rel.0 < 12 {
        return Err(format!("{} is CUDA {}.{}; sm_90a kernels need CUDA 12 or later", nvcc.display(), rel.0, rel.1));
    }
    if rel != PINNED {
        eprintln!(
            "warning: {} is CUDA {}.{}; the project pins 13.0 (kernels built by newer releases need a newer driver than 580)",
            nvcc.display(),
            rel.0,
            rel.1
        );
    }
    Ok((nvcc, rel))
}

/// Where `setup` puts the CuTe/CUTLASS headers (which may not be there yet).
pub fn cutlass_include(root: &Path) -> PathBuf {
    root.join(LOCAL_CUTLASS).join(CUTLASS_INCLUDE)
}

/// Finds everything, installing what is missing; fast and silent-ish when all is present.
pub fn setup(root: &Path) -> Result<Toolchain> {
    let (nvcc, nvcc_release) = setup_nvcc(root)?;
    let (cuobjdump, nvdisasm) = match find_tools(root) {
        Some(t) => t,
        None => {
            eprintln!("no cuobjdump/nvdisasm 13.2+ found: installing them from PyPI into {LOCAL_TOOLS}/");
            pip_install(&root.join(LOCAL_TOOLS), &TOOL_PACKAGES)?;
            find_tools(root).ok_or("cuobjdump/nvdisasm 13.2+ still missing after the install")?
        }
    };
    let mut libclang = crate::bindings::libclang_available();
    if !libclang {
        eprintln!("libclang not found: trying `apt-get install libclang-dev`");
        libclang = install_libclang() && crate::bindings::libclang_available();
        if !libclang {
            eprintln!("warning: no libclang; the bindings drift test will be reported as ignored");
        }
    }
    let cutlass_include = cutlass_include(root);
    if !cutlass_include.join("cute/tensor.hpp").is_file() {
        eprintln!("no CuTe headers in {LOCAL_CUTLASS}/: installing {CUTLASS_PACKAGE} (headers only) from PyPI");
        pip_install_with(&root.join(LOCAL_CUTLASS), &[CUTLASS_PACKAGE], &["--no-deps"])?;
        if !cutlass_include.join("cute/tensor.hpp").is_file() {
            return Err(format!("{} has no cute/tensor.hpp after installing {CUTLASS_PACKAGE}", cutlass_include.display()));
        }
    }
    let tc = Toolchain { nvcc, nvcc_release, cuobjdump, nvdisasm, libclang, cutlass_include };
    eprintln!(
        "toolchain: nvcc {} (CUDA {}.{}), cuobjdump {}, libclang {}",
        tc.nvcc.display(),
        tc.nvcc_release.0,
        tc.nvcc_release.1,
        tc.cuobjdump.display(),
        if tc.libclang { "yes" } else { "no" }
    );
    Ok(tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cuda_release_lines() {
        let nvcc = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n";
        assert_eq!(parse_release(nvcc), Some((13, 0)));
        assert_eq!(parse_release("Cuda compilation tools, release 13.5, V13.5.37"), Some((13, 5)));
        assert_eq!(parse_release("no version here"), None);
    }
}
