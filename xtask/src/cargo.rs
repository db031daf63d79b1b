//! Running cargo for the other tasks, and reading its JSON messages.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::toolchain::Toolchain;
use crate::{Result, cmd, project_root};

/// The tests' build and run (`cargo xtask test`); the SASS check reuses its build.
pub const TEST_ARGS: [&str; 2] = ["test", "--workspace"];

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

/// The id cargo gives the `deepkern` package of this workspace, from `cargo metadata`.
pub fn deepkern_id(tc: &Toolchain) -> Result<String> {
    let mut c = cargo(tc);
    c.args(["metadata", "--no-deps", "--format-version", "1"]);
    let text = cmd::output(&mut c)?;
    let metadata: Value = serde_json::from_str(&text).map_err(|e| format!("cargo metadata: {e}"))?;
    package_id(&metadata, &project_root())
}

/// The id of the package whose manifest is `root/Cargo.toml` in `cargo metadata` output. Its form
/// depends on the folder: `path+file:///w/dk#deepkern@0.1.0`, but `path+file:///w/deepkern#0.1.0`
/// when the folder has the package's name, so the id is looked up, never matched by name.
pub fn package_id(metadata: &Value, root: &Path) -> Result<String> {
    let manifest = root.join("Cargo.toml");
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().is_some_and(|m| Path::new(m) == manifest))
        .and_then(|p| p["id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("cargo metadata lists no package with manifest {}", manifest.display()))
}

/// Whether a cargo message belongs to the package `id`.
pub fn is_package(msg: &Value, id: &str) -> bool {
    msg["package_id"].as_str() == Some(id)
}

/// The `OUT_DIR` of package `id`'s build script, from a build's messages.
pub fn build_script_out_dir<'a>(msgs: &'a [Value], id: &str) -> Option<&'a str> {
    msgs.iter().filter(|m| m["reason"] == "build-script-executed" && is_package(m, id)).find_map(|m| m["out_dir"].as_str())
}

/// The kernels manifest the build script wrote, for a build with `args` (e.g. `["build", "-p",
/// "deepkern", "--lib"]`); the build must include deepkern.
pub fn kernels_manifest(tc: &Toolchain, args: &[&str]) -> Result<(PathBuf, Value)> {
    let id = deepkern_id(tc)?;
    let mut c = cargo(tc);
    c.args(args);
    let msgs = messages(c)?;
    let out_dir = build_script_out_dir(&msgs, &id).ok_or_else(|| format!("cargo did not report the build script output of {id}"))?;
    let path = PathBuf::from(out_dir).join("deepkern-kernels.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// Both forms of a path package's id: with the name (`#deepkern@0.1.0`, any folder name) and
    /// without it (`#0.1.0`, a folder named `deepkern`, git's default for a clone).
    #[test]
    fn finds_deepkern_whatever_its_folder_is_called() {
        for (root, id) in [("/w/dk", "path+file:///w/dk#deepkern@0.1.0"), ("/w/deepkern", "path+file:///w/deepkern#0.1.0")] {
            let metadata = json(&format!(
                r#"{{"packages": [
                    {{"name": "xtask", "id": "path+file://{root}/xtask#0.1.0", "manifest_path": "{root}/xtask/Cargo.toml"}},
                    {{"name": "deepkern", "id": "{id}", "manifest_path": "{root}/Cargo.toml"}}
                ]}}"#
            ));
            assert_eq!(package_id(&metadata, Path::new(root)).unwrap(), id);
            let msgs = [
                json(r#"{"reason": "build-script-executed", "package_id": "registry+https://x#cudarc@0.19.10", "out_dir": "/t/cudarc"}"#),
                json(&format!(r#"{{"reason": "compiler-artifact", "package_id": "{id}", "out_dir": "/t/no"}}"#)),
                json(&format!(r#"{{"reason": "build-script-executed", "package_id": "{id}", "out_dir": "/t/deepkern"}}"#)),
            ];
            assert_eq!(build_script_out_dir(&msgs, id), Some("/t/deepkern"), "{id}");
        }
        assert!(package_id(&json(r#"{"packages": []}"#), Path::new("/w")).is_err());
    }
}
