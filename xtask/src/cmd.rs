//! Running child processes: each command is shown before it runs; failures are sentences.

use std::process::{Command, Stdio};

use crate::Result;

/// `word` as a shell would need it: as is when plain, else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "_-./,:=+@%".contains(c));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// The command as a line one could paste into a shell, for display.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|w| shell_quote(&w.to_string_lossy())).collect::<Vec<_>>().join(" ")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_commands_ready_to_paste() {
        let mut c = Command::new("python3");
        c.args(["-m", "pip", "nvidia-nvvm==13.0.*", "--bench", "it's", ""]);
        assert_eq!(display(&c), r"python3 -m pip 'nvidia-nvvm==13.0.*' --bench 'it'\''s' ''");
    }
}
