//! Running cargo for the other tasks, and reading its JSON messages.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::toolchain::Toolchain;
use crate::{Result, cmd, project_root};

/// `cargo` (the one running xtask), in the project root, with the toolchain's environment.
pub fn cargo(tc: &Toolchain) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(project_root());
    c.envs(tc.cargo_env());
    // The simulated build is asked for explicitly (simulate.rs), never inherited: the GPU build,
    // its SASS check and the bundle are always real kernels.
    c.env_remove("DEEPKERN_SIM");
    c
}

/// Runs a cargo command with `--message-format=json-render-diagnostics` and returns its JSON
/// messages (diagnostics are still printed, rendered, on stderr).
pub fn messages(mut c: Command) -> Result<Vec<Value>> {
    c.arg("--message-format=json-render-diagnostics").stdout(Stdio::piped());
    eprintln!("$ {}", cmd::display(&c));
    let mut child = c.spawn().map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let msgs: Vec<Value> = BufReader::new(stdout).lines().map_while(|l| l.ok()).filter_map(|l| serde_json::from_str(&l).ok()).collect();
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("`{}` failed ({status})", cmd::display(&c)));
    }
    Ok(msgs)
}

/// Whether a cargo message belongs to the `deepkern` package.
pub fn is_deepkern(msg: &Value) -> bool {
    msg["package_id"].as_str().is_some_and(|id| id.contains("#deepkern@") || id.starts_with("deepkern "))
}

/// The kernels manifest the build script wrote, for a build with `args` (e.g. `["build"]` or
/// `["build", "--release"]`).
pub fn kernels_manifest(tc: &Toolchain, args: &[&str]) -> Result<(PathBuf, Value)> {
    let mut c = cargo(tc);
    c.args(args).args(["-p", "deepkern", "--lib"]);
    let msgs = messages(c)?;
    let out_dir = msgs
        .iter()
        .filter(|m| m["reason"] == "build-script-executed" && is_deepkern(m))
        .find_map(|m| m["out_dir"].as_str())
        .ok_or("cargo did not report deepkern's build script output")?;
    let path = PathBuf::from(out_dir).join("deepkern-kernels.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, manifest))
}
