//! What deepkern's manifest imposes on the crates that depend on it: cudarc's link mode and CUDA
//! version stay theirs to choose, and nothing only the benches use is a normal dependency.

use std::process::Command;

use serde_json::Value;

/// deepkern's entry in `cargo metadata` (manifest only, no dependency resolution).
fn deepkern() -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(xtask::project_root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "deepkern").expect("deepkern in the workspace").clone()
}

/// The features deepkern's normal (not dev, not build) dependency `name` asks for.
fn normal_features(pkg: &Value, name: &str) -> Vec<String> {
    let dep = pkg["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name && d["kind"].is_null())
        .unwrap_or_else(|| panic!("no normal dependency {name}"));
    dep["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
}

#[test]
fn cudarc_link_mode_and_cuda_version_are_left_to_dependents() {
    let features = normal_features(&deepkern(), "cudarc");
    assert!(features.iter().any(|f| f == "fallback-dynamic-loading"), "{features:?}");
    for f in &features {
        let forced = ["dynamic-loading", "dynamic-linking", "static-linking"].contains(&f.as_str())
            || f.strip_prefix("cuda-").is_some_and(|v| v.chars().all(|c| c.is_ascii_digit()));
        assert!(!forced, "deepkern forces cudarc's `{f}` on its dependents: {features:?}");
    }
}

#[test]
fn unused_and_bench_only_features_are_not_imposed() {
    let pkg = deepkern();
    let cudarc = normal_features(&pkg, "cudarc");
    for f in ["nvrtc", "cublaslt", "cublas"] {
        assert!(!cudarc.iter().any(|x| x == f), "cudarc's `{f}` is a normal feature: {cudarc:?}");
    }
    let bytemuck = normal_features(&pkg, "bytemuck");
    assert!(bytemuck.is_empty(), "bytemuck's {bytemuck:?} are unused");
}

#[test]
fn nccl_is_a_default_feature_of_deepkern_not_a_forced_one() {
    let pkg = deepkern();
    let cudarc = normal_features(&pkg, "cudarc");
    assert!(!cudarc.iter().any(|f| f.starts_with("nccl")), "NCCL cannot be turned off: cudarc's {cudarc:?}");
    let features = &pkg["features"];
    assert_eq!(features["nccl"], serde_json::json!(["cudarc/nccl"]), "{features}");
    assert!(features["default"].as_array().is_some_and(|d| d.iter().any(|f| f == "nccl")), "{features}");
}
