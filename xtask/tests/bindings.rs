//! The committed bindings (`src/ffi/bindings.rs`) equal what bindgen makes of the header today.
//! Needs libclang; where there is none the test is reported as ignored, not passed.

use libtest_mimic::{Arguments, Completion, Trial};
use xtask::bindings;

fn main() {
    let args = Arguments::from_args();
    let trial = Trial::ignorable_test("committed_bindings_match_the_header", || {
        if !bindings::libclang_available() {
            return Ok(Completion::ignored_with("libclang not found"));
        }
        let root = xtask::project_root();
        let fresh = bindings::generate(&root)?;
        let committed = std::fs::read_to_string(root.join(bindings::OUTPUT)).map_err(|e| e.to_string())?;
        if fresh == committed {
            Ok(Completion::Completed)
        } else {
            Err(format!("{} drifted from {}: run `cargo xtask bindgen` and commit the result", bindings::OUTPUT, bindings::HEADER).into())
        }
    });
    libtest_mimic::run(&args, vec![trial]).exit()
}
