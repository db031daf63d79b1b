//! Project tasks for deepkern (`cargo xtask <task>`). The library half holds what tests check.

pub mod bindings;

use std::path::PathBuf;

/// The workspace root (the directory holding the root Cargo.toml).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the root").to_path_buf()
}
