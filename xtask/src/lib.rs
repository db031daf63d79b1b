//! Project tasks for deepkern (`cargo xtask <task>`). The library half holds the logic and what
//! the tests check; `main.rs` only dispatches.

pub mod bindings;
pub mod bundle;
pub mod cargo;
pub mod cmd;
pub mod mutants;
pub mod report;
pub mod sass;
pub mod simulate;
pub mod toolchain;

use std::path::PathBuf;

/// A task's failure: one readable sentence or paragraph.
pub type Result<T, E = String> = std::result::Result<T, E>;

/// The workspace root (the directory holding the root Cargo.toml).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the root").to_path_buf()
}
