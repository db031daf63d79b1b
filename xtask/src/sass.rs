//! The resource and SASS check: every kernel is free of spills and stack frames, and every kernel
//! that declares instructions it must use (`// SASS-EXPECT: <name-substring> <OPCODE>...` in its
//! `.cu`) shows them in its SASS. Prints registers and shared memory per kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::toolchain::Toolchain;
use crate::{Result, cargo, cmd};

/// What ptxas reported for one function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub name: String,
    /// A `__global__` kernel (ptxas compiled it as an entry function).
    pub entry: bool,
    pub registers: u32,
    pub smem_bytes: u64,
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl Resources {
    pub fn is_clean(&self) -> bool {
        self.stack_bytes == 0 && self.spill_store_bytes == 0 && self.spill_load_bytes == 0
    }
}

/// The number before `unit` in `text` ("864 bytes stack frame" -> 864 for "bytes stack frame").
fn number_before(text: &str, unit: &str) -> Option<u64> {
    let head = &text[..text.find(unit)?];
    head.trim_end().rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Parses ptxas' `-v` report (nvcc's stderr) into one entry per function, in report order.
pub fn parse_ptxas_log(text: &str) -> Vec<Resources> {
    let mut funcs: Vec<Resources> = Vec::new();
    let mut entry_idx: Option<usize> = None;
    let mut props_idx: Option<usize> = None;
    let index_of = |funcs: &mut Vec<Resources>, name: &str| match funcs.iter().position(|f| f.name == name) {
        Some(i) => i,
        None => {
            funcs.push(Resources { name: name.to_string(), ..Default::default() });
            funcs.len() - 1
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            let i = index_of(&mut funcs, name);
            funcs[i].entry = true;
            entry_idx = Some(i);
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            props_idx = Some(index_of(&mut funcs, name.trim()));
        } else if line.contains("bytes stack frame") {
            if let Some(i) = props_idx.take() {
                let f = &mut funcs[i];
                f.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                f.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                f.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some(i) = entry_idx
        {
            let f = &mut funcs[i];
            f.registers = number_before(line, " registers").unwrap_or(0) as u32;
            f.smem_bytes = number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    funcs
}

/// Opcode mnemonics per function from `cuobjdump -sass` text ("QGMMA.64x128x32.F32.E4M3.E4M3" is
/// kept whole; matching is by prefix).
pub fn parse_sass(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("Function : ") {
            current = Some(name.trim().to_string());
            out.entry(name.trim().to_string()).or_default();
            continue;
        }
        let (Some(func), Some(rest)) = (current.as_ref(), t.strip_prefix("/*")) else { continue };
        // "/*0260*/  @!P0 LDG.E.NA.128.CONSTANT R4, ... ;  /* 0x... */"
        let Some((addr, body)) = rest.split_once("*/") else { continue };
        if !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let mut words = body.split_whitespace();
        let mut op = words.next().unwrap_or_default();
        if op.starts_with('@') {
            op = words.next().unwrap_or_default();
        }
        let op = op.trim_end_matches(';');
        if !op.is_empty() {
            out.get_mut(func).expect("function seen").insert(op.to_string());
        }
    }
    out
}

/// One `// SASS-EXPECT:` line: functions whose name (mangled or demangled, e.g.
/// `ep::dispatch_send_kernel`) contains `kernel` must use each opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    pub kernel: String,
    pub opcodes: Vec<String>,
}

impl Expectation {
    /// Whether the expectation applies to the function with mangled name `name`.
    pub fn names(&self, name: &str) -> bool {
        name.contains(&self.kernel) || demangle(name).contains(&self.kernel)
    }
}

/// The expectations declared in a source file.
pub fn parse_expectations(source: &str) -> Vec<Expectation> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// SASS-EXPECT:"))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace().map(str::to_string);
            let kernel = words.next()?;
            Some(Expectation { kernel, opcodes: words.collect() })
        })
        .collect()
}

/// Problems with one unit's expectations ("" when all hold).
pub fn check_expectations(exps: &[Expectation], sass: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for e in exps {
        let funcs: Vec<_> = sass.iter().filter(|(name, _)| e.names(name)).collect();
        if funcs.is_empty() {
            problems.push(format!("SASS-EXPECT `{}` matches no function", e.kernel));
        }
        for (name, ops) in funcs {
            for want in &e.opcodes {
                if !ops.iter().any(|op| op.starts_with(want.as_str())) {
                    problems.push(format!("{} has no {want} instruction", demangle(name)));
                }
            }
        }
    }
    problems
}

/// Demangled name through `c++filt` when available, else the mangled one.
pub fn demangle(name: &str) -> String {
    cmd::output(Command::new("c++filt").arg(name)).map(|s| s.trim().to_string()).unwrap_or_else(|_| name.to_string())
}

/// Resource counters per function from `cuobjdump -res-usage` ("REG:24 STACK:496 SHARED:0 ...").
pub fn parse_res_usage(text: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("Function ").and_then(|r| r.strip_suffix(':')) {
            current = Some(name.to_string());
            out.entry(name.to_string()).or_default();
        } else if let Some(func) = current.take() {
            let counters =
                line.split_whitespace().filter_map(|w| w.split_once(':')).filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)));
            out.get_mut(&func).expect("function seen").extend(counters);
        }
    }
    out
}

/// One kernel's row in the printed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub unit: String,
    pub res: Resources,
    /// "F2FP ok, QGMMA MISSING"; empty when no expectation names the kernel.
    pub expects: String,
}

/// What the check found in one unit: a row per kernel, and every problem as a sentence.
#[derive(Clone, Debug, Default)]
pub struct UnitReport {
    pub rows: Vec<Row>,
    pub problems: Vec<String>,
}

/// The build whose kernels are checked: the tests' own (`cargo xtask test` runs `cargo test
/// --workspace`), so that after the tests nothing is rebuilt. A narrower build (`cargo build -p
/// deepkern`) resolves other dependency features and would rebuild a score of crates.
pub const BUILD_ARGS: [&str; 3] = [cargo::TEST_ARGS[0], cargo::TEST_ARGS[1], "--no-run"];

/// Builds (dev profile, as the tests do), reads the kernels manifest, and checks every unit.
pub fn run(tc: &Toolchain) -> Result<()> {
    let (path, manifest) = cargo::kernels_manifest(tc, &BUILD_ARGS)?;
    if manifest["built"] != Value::Bool(true) {
        return Err(format!("kernels were not built ({}): {}", path.display(), manifest["reason"].as_str().unwrap_or("no reason given")));
    }
    let units = manifest["units"].as_array().cloned().unwrap_or_default();
    let mut all = UnitReport::default();
    for unit in &units {
        let field = |k: &str| unit[k].as_str().map(PathBuf::from).ok_or(format!("{}: a unit without `{k}`", path.display()));
        let (source, object, log) = (field("source")?, field("object")?, field("ptxas_log")?);
        let report = check_unit(tc, &source.to_string_lossy(), &crate::project_root().join(&source), &object, &log)?;
        all.rows.extend(report.rows);
        all.problems.extend(report.problems);
    }
    print_table(&all.rows);
    if all.rows.is_empty() {
        all.problems.push("no kernels found in any unit".into());
    }
    if all.problems.is_empty() {
        eprintln!("sass check: {} kernels in {} units: no spills, no stack frames, expectations hold", all.rows.len(), units.len());
        Ok(())
    } else {
        Err(format!("sass check failed:\n  {}", all.problems.join("\n  ")))
    }
}

/// Checks one compiled unit: `source` (for its SASS-EXPECT lines), its `object`, and the ptxas
/// `log` of its compilation. `unit` names it in rows and problems.
pub fn check_unit(tc: &Toolchain, unit: &str, source: &Path, object: &Path, log: &Path) -> Result<UnitReport> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let expectations = parse_expectations(&read(source)?);
    let functions = parse_ptxas_log(&read(log)?);
    let sass = parse_sass(&cmd::output(tc.cuobjdump().arg("-sass").arg(object))?);
    let res_usage = parse_res_usage(&cmd::output(tc.cuobjdump().arg("-res-usage").arg(object))?);
    let mut report = UnitReport::default();
    for f in &functions {
        if !f.is_clean() {
            report.problems.push(format!(
                "{unit}: {}: {} bytes stack frame, {} bytes spill stores, {} bytes spill loads",
                demangle(&f.name),
                f.stack_bytes,
                f.spill_store_bytes,
                f.spill_load_bytes
            ));
        }
    }
    for f in functions.into_iter().filter(|f| f.entry) {
        match res_usage.get(&f.name) {
            None => report.problems.push(format!("{unit}: `cuobjdump -res-usage` does not list {}", f.name)),
            // The final cubin must agree (a stale ptxas log would show here).
            Some(c) if c.get("STACK").is_some_and(|&v| v > 0) || c.get("LOCAL").is_some_and(|&v| v > 0) => report.problems.push(format!(
                "{unit}: {}: the cubin uses local memory (STACK:{} LOCAL:{})",
                demangle(&f.name),
                c.get("STACK").copied().unwrap_or(0),
                c.get("LOCAL").copied().unwrap_or(0)
            )),
            Some(_) => {}
        }
        let expects = expectation_summary(&expectations, &f.name, &sass);
        report.rows.push(Row { unit: unit.to_string(), res: f, expects });
    }
    report.problems.extend(check_expectations(&expectations, &sass).into_iter().map(|p| format!("{unit}: {p}")));
    Ok(report)
}

/// "OPCODE ok" or "OPCODE MISSING" for each opcode expected of the function `name`.
fn expectation_summary(exps: &[Expectation], name: &str, sass: &BTreeMap<String, BTreeSet<String>>) -> String {
    let ops = sass.get(name);
    exps.iter()
        .filter(|e| e.names(name))
        .flat_map(|e| e.opcodes.iter())
        .map(|want| {
            let found = ops.is_some_and(|ops| ops.iter().any(|o| o.starts_with(want.as_str())));
            format!("{want} {}", if found { "ok" } else { "MISSING" })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_table(rows: &[Row]) {
    println!("| unit | kernel | regs | smem (B) | stack (B) | spills st/ld (B) | SASS expectations |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | `{}` | {} | {} | {} | {}/{} | {} |",
            r.unit,
            demangle(&r.res.name),
            r.res.registers,
            r.res.smem_bytes,
            r.res.stack_bytes,
            r.res.spill_store_bytes,
            r.res.spill_load_bytes,
            if r.expects.is_empty() { "-" } else { &r.expects }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(crate::project_root().join("xtask/tests/fixtures").join(name)).unwrap()
    }

    /// The check reads the kernels of the tests' own build: any other cargo command may resolve
    /// other dependency features and rebuild a score of crates after the tests.
    #[test]
    fn checks_the_kernels_of_the_test_build() {
        assert_eq!(BUILD_ARGS[..2], cargo::TEST_ARGS);
        assert_eq!(BUILD_ARGS[2..], ["--no-run"]);
    }

    #[test]
    fn ptxas_log_with_spills_smem_and_a_device_function() {
        let f = parse_ptxas_log(&fixture("ptxas_spills.log"));
        assert_eq!(f.len(), 3);
        let spilling = &f[0];
        assert_eq!((spilling.name.as_str(), spilling.entry, spilling.registers), ("_Z8spillingPKfPfi", true, 24));
        assert_eq!((spilling.stack_bytes, spilling.spill_store_bytes, spilling.spill_load_bytes), (864, 572, 760));
        let helper = &f[1];
        assert_eq!(
            (helper.name.as_str(), helper.entry, helper.spill_store_bytes, helper.spill_load_bytes),
            ("_Z6helperPKfi", false, 360, 392)
        );
        assert!(!helper.is_clean());
        let smem = &f[2];
        assert_eq!((smem.registers, smem.smem_bytes, smem.is_clean()), (12, 1024, true));
    }

    #[test]
    fn ptxas_log_of_the_quantiser_is_clean() {
        let f = parse_ptxas_log(&fixture("ptxas_quant.log"));
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|k| k.entry && k.is_clean() && k.registers > 0));
    }

    #[test]
    fn res_usage_counters_per_function() {
        let r = parse_res_usage(&fixture("res_usage_probe.txt"));
        assert_eq!(r.len(), 2, "{r:?}");
        let smem = &r["_Z9with_smemPf"];
        assert_eq!((smem["REG"], smem["STACK"], smem["SHARED"], smem["LOCAL"]), (12, 0, 2048, 0));
        assert_eq!((r["_Z8spillingPKfPfi"]["REG"], r["_Z8spillingPKfPfi"]["STACK"]), (24, 496));
    }

    const SASS: &str = "\
\t\tFunction : _ZN2dk5quant22per_token_group_kernelILb0EEEvPKtPhPfllll
\t.headerflags\t@\"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                       /* 0x00000a00ff017b82 */
                                                                                                /* 0x000fe20000000800 */
        /*0260*/              @!P0 LDG.E.NA.128.CONSTANT R4, desc[UR4][R22.64] ;                /* 0x0000000416048981 */
        /*06a0*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R15, R15, R6, RZ ;   /* 0x000000060f0f723e */
        /*0710*/                   EXIT ;                                                       /* 0x000000000000794d */
\t\tFunction : _Z9with_smemPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                       /* 0x00000a00ff017b82 */
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                                /* 0x0000000000007b1d */
";

    #[test]
    fn sass_opcodes_per_function() {
        let s = parse_sass(SASS);
        let quant = &s["_ZN2dk5quant22per_token_group_kernelILb0EEEvPKtPhPfllll"];
        assert!(
            quant.contains("LDG.E.NA.128.CONSTANT") && quant.contains("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C") && quant.contains("EXIT")
        );
        assert_eq!(quant.len(), 4, "{quant:?}");
        assert!(s["_Z9with_smemPf"].contains("BAR.SYNC.DEFER_BLOCKING"));
    }

    #[test]
    fn expectations_are_checked_by_prefix_and_must_match_a_function() {
        let src = "// x\n// SASS-EXPECT: per_token_group F2FP LDG\n  // SASS-EXPECT: with_smem QGMMA\n// SASS-EXPECT: nothing_here HGMMA\n\
                   // SASS-EXPECT: quant::per_token_group_kernel<false> EXIT\n";
        let exps = parse_expectations(src);
        assert_eq!(exps[0], Expectation { kernel: "per_token_group".into(), opcodes: vec!["F2FP".into(), "LDG".into()] });
        let problems = check_expectations(&exps, &parse_sass(SASS));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].ends_with("has no QGMMA instruction"));
        assert_eq!(problems[1], "SASS-EXPECT `nothing_here` matches no function");
    }
}
