//! Running child processes: each command is shown before it runs; failures are sentences.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::Result;

/// The command as a shell-like line, for display.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; an error unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))?;
    if status.success() { Ok(()) } else { Err(format!("`{}` failed ({status})", display(cmd))) }
}

/// Runs `cmd` quietly and returns its stdout; an error (with stderr) unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))?;
    if !out.status.success() {
        return Err(format!("`{}` failed ({}):\n{}", display(cmd), out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` can be started (it exists and runs with `arg`).
pub fn works(program: &Path, arg: &str) -> bool {
    Command::new(program).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}
