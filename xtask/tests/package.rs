//! What `cargo package` would publish of deepkern: the sources and nothing of this repository's
//! own machinery, and the metadata crates.io shows.

use std::process::Command;

fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo).args(args).current_dir(xtask::project_root()).output().expect("run cargo");
    assert!(out.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_package_holds_the_sources_and_not_the_repository_machinery() {
    let listing = cargo(&["package", "--list", "-p", "deepkern", "--allow-dirty", "--offline"]);
    let files: Vec<&str> = listing.lines().collect();
    for needed in ["build.rs", "sim/build.rs", "csrc/include/deepkern.h", "src/lib.rs", "src/ffi/bindings.rs"] {
        assert!(files.contains(&needed), "{needed} missing from the package:\n{listing}");
    }
    for f in &files {
        let foreign = f.starts_with(".cargo/")
            || f.starts_with(".ci/")
            || f.ends_with(".proptest-regressions")
            || f.starts_with("tests/candle-compat/")
            || f.starts_with("bench-results/");
        assert!(!foreign, "{f} is packaged");
    }
}

#[test]
fn crates_io_metadata_is_set() {
    let meta: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1", "--offline"])).expect("cargo metadata JSON");
    let pkg = meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "deepkern").unwrap();
    assert!(pkg["documentation"].as_str().is_some_and(|d| d.starts_with("https://")), "documentation: {}", pkg["documentation"]);
    let count = |k: &str| pkg[k].as_array().map_or(0, Vec::len);
    assert!((1..=5).contains(&count("keywords")), "keywords: {}", pkg["keywords"]);
    assert!((1..=5).contains(&count("categories")), "categories: {}", pkg["categories"]);
}
