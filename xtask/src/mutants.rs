//! `cargo xtask mutants`: how well the simulated tests catch the bugs these kernels are most
//! likely to hide. Each mutant below is one seeded bug; it is applied to a scratch copy of the
//! project, the simulator build is rebuilt, and the tests named for it run on the simulator. A
//! mutant is killed when one of them fails (a wrong result, or the simulator's report: an
//! unexpected transaction count, a generic-proxy write read without a fence, a deadlock, ...).
//! The table says which test killed each, or "survived"; survivors are listed in
//! docs/simulator.md with the reason.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::toolchain::Toolchain;
use crate::{Result, cargo, cmd, project_root, simulate};

/// One seeded bug: text replacements in one file (each `find` must occur exactly as often as
/// `count` says), the tests that should catch it (binary, exact test name), extra environment.
pub struct Mutant {
    pub name: &'static str,
    pub file: &'static str,
    pub edits: &'static [(&'static str, &'static str, usize)],
    pub tests: &'static [(&'static str, &'static str)],
    pub env: &'static [(&'static str, &'static str)],
    /// Run the tests on the race-checking build (`DEEPKERN_SIM_RACES=1`): the bug is an unordered
    /// access that gives the right answer under the simulator's schedules but is a race.
    pub races: bool,
}

const GEMM: &str = "csrc/gemm/fp8_kernel.cuh";
const MLA: &str = "csrc/mla/decode.cu";
const EP: &str = "csrc/ep/a2a.cu";

/// The twelve, then ours.
pub const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "wgmma descriptor with swizzle mode 64 B instead of 128 B",
        file: GEMM,
        edits: &[("desc |= uint64_t(1) << 62;              // layout: 128-byte swizzle", "desc |= uint64_t(2) << 62;", 1)],
        tests: &[("gemm_gpu", "exact_small_integers")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "LBO and SBO swapped in the MN-major V descriptor",
        file: MLA,
        edits: &[(
            "const uint64_t db = smem_desc_sw128(kv + (4 * wg) * kBoxBytes + kk * 16 * 128, kBoxBytes);",
            "const uint64_t db = (smem_desc_sw128(kv + (4 * wg) * kBoxBytes + kk * 16 * 128, 1024) & ~(uint64_t(0x3fff) << 32)) | (uint64_t(kBoxBytes >> 4) << 32);",
            1,
        )],
        tests: &[("mla_gpu", "decode_matches_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "expect_tx one box short",
        file: GEMM,
        edits: &[("kTileABytes + kTileBBytes + kSfaBytes);", "kTileABytes + kTileBBytes);", 1)],
        tests: &[("gemm_gpu", "exact_small_integers")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "a consumer skipping the full-barrier wait before its wgmma",
        file: GEMM,
        edits: &[("            wait(&s_full[i], ps.phase);\n", "", 1)],
        tests: &[("gemm_gpu", "exact_small_integers"), ("gemm_gpu", "random_inputs")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "missing fence.proxy.async before the TMA store of the staged D tile",
        file: GEMM,
        edits: &[(
            "                ptx::fence_proxy_async_shared_cta();\n                ptx::bar_sync(1, kConsumers);\n                if (issuer) {",
            "                ptx::bar_sync(1, kConsumers);\n                if (issuer) {",
            1,
        )],
        tests: &[("gemm_gpu", "every_compiled_tile")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "off-by-one in the persistent tile walk: the last tile is skipped",
        file: GEMM,
        edits: &[("tile < tiles; tile += tile_step", "tile < tiles - 1; tile += tile_step", 3)],
        tests: &[("gemm_gpu", "exact_small_integers")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "epilogue column mapping using l % 4 without the factor 2",
        file: GEMM,
        edits: &[("const int col = t.n0 + 8 * j + 2 * (lane % 4);", "const int col = t.n0 + 8 * j + (lane % 4);", 1)],
        tests: &[("gemm_gpu", "exact_small_integers")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "the second warpgroup reading the first warpgroup's A rows",
        file: GEMM,
        edits: &[(
            "s_a + i * kTileABytes + (math_wg * kWgRows + 64 * s) * kBlockK + kk * kWgmmaK",
            "s_a + i * kTileABytes + 64 * s * kBlockK + kk * kWgmmaK",
            1,
        )],
        tests: &[("gemm_gpu", "exact_small_integers"), ("gemm_gpu", "every_compiled_tile")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "MLA online-softmax rescale using the new max for both factors",
        file: MLA,
        edits: &[("scale_o[h] = exp2f(m_run[h] - m_use);", "scale_o[h] = exp2f(m_use - m_use);", 1)],
        tests: &[("mla_gpu", "decode_matches_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "a release store on an EP signal weakened to relaxed",
        file: EP,
        edits: &[(
            "ptx::st_release_sys_global_u32(signals + kind * DK_EP_MAX_RANKS + g.rank, g.epoch);",
            "*reinterpret_cast<volatile uint32_t*>(signals + kind * DK_EP_MAX_RANKS + g.rank) = g.epoch;",
            1,
        )],
        tests: &[("ep_gpu", "concurrent_ranks_match_reference"), ("ep_gpu", "low_latency_matches_reference")],
        env: &[],
        races: true,
    },
    Mutant {
        name: "combine applying the router weight twice",
        file: EP,
        edits: &[("= __fmaf_rn(w, bf16_bits_to_float(", "= __fmaf_rn(w * w, bf16_bits_to_float(", 2)],
        tests: &[("ep_gpu", "identity_experts_combine_to_weighted_x"), ("ep_gpu", "dispatch_combine_match_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "the GEMM without its per-128-K promotion (all of K in the wgmma accumulator), reduced-precision FP8 accumulation",
        file: GEMM,
        edits: &[("(acc, desc_a, desc_b, kk > 0);", "(acc, desc_a, desc_b, kk > 0 || kb > 0);", 1), ("] += acc[", "] = acc[", 4)],
        tests: &[("gemm_gpu", "exact_small_integers"), ("gemm_gpu", "random_inputs")],
        env: &[("DEEPKERN_SIM_FP8_ACCUMULATOR", "reduced")],
        races: false,
    },
    Mutant {
        name: "the EP receive's per-block arrival count (read by the overlapped GEMM on another stream) added relaxed instead of release",
        file: EP,
        edits: &[(
            "ptx::red_release_gpu_global_add_s32(p.arrivals + r / kArrivalRows, 1);",
            "atomicAdd(p.arrivals + r / kArrivalRows, 1);",
            2,
        )],
        tests: &[("moe_gpu", "two_batch_is_bit_identical")],
        env: &[],
        races: true,
    },
    Mutant {
        name: "the arrival-gated GEMM loading rows with TMA after its acquire, without fence.proxy.async.global",
        file: GEMM,
        edits: &[(
            "    (void)ptx::ld_acquire_gpu_global_s32(counter);\n    ptx::fence_proxy_async_global();\n}",
            "    (void)ptx::ld_acquire_gpu_global_s32(counter);\n}",
            1,
        )],
        tests: &[("moe_gpu", "two_batch_is_bit_identical")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "a consumer releasing its stage before its wgmma read it (arrive before wgmma.wait_group)",
        file: GEMM,
        edits: &[(
            "                ptx::wgmma_commit_group();\n                ptx::fence_operands(acc);\n                ptx::wgmma_wait_group<0>();\n                ptx::fence_operands(acc);\n                if (s == kSubTiles - 1) {\n                    release(i);\n                }\n",
            "                ptx::wgmma_commit_group();\n                if (s == kSubTiles - 1) {\n                    release(i);\n                }\n                ptx::fence_operands(acc);\n                ptx::wgmma_wait_group<0>();\n                ptx::fence_operands(acc);\n",
            1,
        )],
        tests: &[("gemm_gpu", "exact_small_integers"), ("gemm_gpu", "every_compiled_tile")],
        env: &[],
        races: true,
    },
    Mutant {
        name: "MLA without fence.proxy.async between writing P and the P·V wgmma",
        file: MLA,
        edits: &[(
            "            ptx::fence_proxy_async_shared_cta();\n            ptx::bar_sync(1, kThreads);\n\n            // O[:, 256",
            "            ptx::bar_sync(1, kThreads);\n\n            // O[:, 256",
            1,
        )],
        tests: &[("mla_gpu", "decode_matches_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "MLA reading the second stage's tile from the first stage",
        file: MLA,
        edits: &[("uint8_t* kv = s_kv + stage * kBoxes * kBoxBytes;", "uint8_t* kv = s_kv;", 1)],
        tests: &[("mla_gpu", "decode_matches_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "EP dispatch receive not waiting for the senders' signal",
        file: EP,
        edits: &[("must_poison(g, wait_all(g, DK_EP_SIGNAL_DISPATCH))", "must_poison(g, true)", 1)],
        tests: &[("ep_gpu", "concurrent_ranks_match_reference")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "the EP signal's release weakened to relaxed, with the fences between the block counter and the signal removed",
        file: EP,
        edits: &[
            ("            *done = 0;\n            __threadfence_system();\n", "            *done = 0;\n", 1),
            (
                "ptx::st_release_sys_global_u32(signals + kind * DK_EP_MAX_RANKS + g.rank, g.epoch);",
                "*reinterpret_cast<volatile uint32_t*>(signals + kind * DK_EP_MAX_RANKS + g.rank) = g.epoch;",
                1,
            ),
        ],
        tests: &[("ep_gpu", "concurrent_ranks_match_reference")],
        env: &[],
        races: true,
    },
    Mutant {
        name: "quantiser taking the amax over half of each 128-group",
        file: "csrc/quant/recipe.cuh",
        edits: &[("for (int offset = 8; offset > 0; offset /= 2) {", "for (int offset = 4; offset > 0; offset /= 2) {", 1)],
        tests: &[("quant_gpu", "random_f32_scales")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "multicast without the cluster barrier after the barrier initialisation (a CTA's multicast can reach the other before its barriers exist)",
        file: GEMM,
        edits: &[(
            "        ptx::barrier_cluster_arrive_release();\n        ptx::barrier_cluster_wait_acquire();\n",
            "        __syncthreads();\n",
            1,
        )],
        tests: &[("gemm_gpu", "multicast_pairs")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "multicast with each consumer warp releasing a stage in its own CTA only",
        file: GEMM,
        edits: &[("ptx::mbarrier_arrive_cluster(ptx::mapa_shared_cluster(&s_empty[i], rank ^ 1));", "(void)0;", 1)],
        tests: &[("gemm_gpu", "multicast_pairs")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "multicast with a producer leaving before the other CTA released every stage",
        file: GEMM,
        edits: &[(
            "            for (int i = 0; i < p.stages; ++i) {\n                wait(&s_empty[ps.index], ps.phase ^ 1);\n                ps.advance();\n            }\n",
            "",
            1,
        )],
        tests: &[("gemm_gpu", "multicast_pairs")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "the TMA-store staging tile swizzled with the 128-byte pattern whatever its span",
        file: GEMM,
        edits: &[("return offset ^ (((offset >> 7) & (kSwizzle / 16 - 1)) << 4);", "return offset ^ (((offset >> 7) & 7) << 4);", 1)],
        tests: &[("gemm_gpu", "every_compiled_tile")],
        env: &[],
        races: false,
    },
    Mutant {
        name: "a straddling tile reading B's scales from the other shared-memory buffer",
        file: GEMM,
        edits: &[(
            "const float* chunk = s_sfb + (sfb_chunks & 1) * kSfbRows * kSfbChunk + q;",
            "const float* chunk = s_sfb + ((sfb_chunks + 1) & 1) * kSfbRows * kSfbChunk + q;",
            1,
        )],
        tests: &[("gemm_gpu", "straddling_scales_over_long_k")],
        env: &[],
        races: false,
    },
];

/// Where the scratch copy and its build live.
const SCRATCH: &str = "target/mutants";

/// Copies the tracked files of the project into `dst` (fresh).
fn copy_project(root: &Path, dst: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dst);
    let files = cmd::output(Command::new("git").current_dir(root).args(["ls-files", "-z"]))?;
    for f in files.split('\0').filter(|f| !f.is_empty()) {
        let (from, to) = (root.join(f), dst.join(f));
        if !from.is_file() {
            continue;
        }
        fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        fs::copy(&from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
    }
    Ok(())
}

/// The simulated test executables (target name -> path), building them in `work`.
/// Builds the simulated tests in the scratch copy. `reuse_ptxas`: keep the ptxas reports of an
/// earlier build (the mutants' builds; a one-line change does not move registers) instead of
/// recompiling with nvcc: the baseline build must not, or reports of older sources (an earlier
/// run of the scratch copy) would stand for the current kernels.
fn build(
    tc: &Toolchain,
    work: &Path,
    target_dir: &Path,
    targets: &[&str],
    races: bool,
    reuse_ptxas: bool,
) -> Result<Vec<(String, PathBuf)>> {
    let mut c = cargo::cargo(tc);
    c.current_dir(work);
    c.args(["test", "-p", "deepkern", "--no-run", "--profile", simulate::PROFILE, "--target-dir"]).arg(target_dir);
    for t in targets {
        c.args(["--test", t]);
    }
    c.env("DEEPKERN_SIM", "1");
    if reuse_ptxas {
        c.env("DEEPKERN_SIM_REUSE_PTXAS", "1");
    }
    if races {
        c.env("DEEPKERN_SIM_RACES", "1");
    }
    let msgs = cargo::messages(c)?;
    Ok(msgs
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| Some((m["target"]["name"].as_str()?.to_string(), PathBuf::from(m["executable"].as_str()?))))
        .collect::<Vec<_>>())
}

/// Runs one test on the simulator; true if it passed.
fn passes(exes: &[(String, PathBuf)], binary: &str, test: &str, env: &[(&str, &str)]) -> Result<bool> {
    let exe = exes.iter().find(|(n, _)| n == binary).map(|(_, p)| p).ok_or_else(|| format!("no test binary {binary}"))?;
    let mut c = Command::new("timeout");
    c.arg("900").arg(exe).args([test, "--exact"]);
    c.env("DEEPKERN_SIM_SEED", "1").env("DEEPKERN_SEED", "1").env("DEEPKERN_REQUIRE_GPU", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !text.contains(" 1 passed") {
        return Err(format!("{binary} {test}: the test did not run (filtered out?)"));
    }
    Ok(out.status.success())
}

fn apply(original: &str, m: &Mutant) -> Result<String> {
    let mut s = original.to_string();
    for (find, replace, count) in m.edits {
        let n = s.matches(find).count();
        if n != *count {
            return Err(format!("mutant `{}`: {:?} occurs {n} times in {}, not {count}", m.name, find, m.file));
        }
        s = s.replace(find, replace);
    }
    Ok(s)
}

/// `cargo xtask mutants [substring]`: every mutant (or those whose name contains the substring).
pub fn run(tc: &Toolchain, only: Option<&str>) -> Result<()> {
    let root = project_root();
    let work = root.join(SCRATCH).join("src");
    let target_dir = root.join(SCRATCH).join("target");
    copy_project(&root, &work)?;
    let mutants: Vec<&Mutant> = MUTANTS.iter().filter(|m| only.is_none_or(|o| m.name.contains(o))).collect();
    let mut targets: Vec<&str> = mutants.iter().flat_map(|m| m.tests.iter().map(|(b, _)| *b)).collect();
    targets.sort();
    targets.dedup();

    let race_dir = root.join(SCRATCH).join("target-races");
    let dir = |races: bool| if races { &race_dir } else { &target_dir };

    eprintln!("== baseline: the unmutated kernels must pass the mutants' tests");
    for races in [false, true] {
        let chosen: Vec<&&Mutant> = mutants.iter().filter(|m| m.races == races).collect();
        if chosen.is_empty() {
            continue;
        }
        let exes = build(tc, &work, dir(races), &targets, races, false)?;
        for m in chosen {
            for (b, t) in m.tests {
                if !passes(&exes, b, t, m.env)? {
                    return Err(format!("baseline: {b} {t} fails without any mutant (environment {:?}, races {races})", m.env));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (i, m) in mutants.iter().enumerate() {
        let path = work.join(m.file);
        let original = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        fs::write(&path, apply(&original, m)?).map_err(|e| e.to_string())?;
        let start = Instant::now();
        eprintln!("== mutant {} of {}: {}", i + 1, mutants.len(), m.name);
        let verdict = match build(tc, &work, dir(m.races), &targets, m.races, true) {
            Err(e) => format!("killed by the build ({})", e.lines().next().unwrap_or_default()),
            Ok(exes) => {
                let mut killer = None;
                for (b, t) in m.tests {
                    if !passes(&exes, b, t, m.env)? {
                        killer = Some(format!("{b} {t}{}", if m.races { " (race build)" } else { "" }));
                        break;
                    }
                }
                killer.map_or_else(|| "**survived**".to_string(), |k| format!("killed by {k}"))
            }
        };
        fs::write(&path, &original).map_err(|e| e.to_string())?;
        eprintln!("   {verdict} ({:.0} s)", start.elapsed().as_secs_f64());
        rows.push((m.name, verdict, start.elapsed()));
    }
    println!();
    println!("| # | seeded bug | result |");
    println!("|---|---|---|");
    for (i, (name, verdict, _)) in rows.iter().enumerate() {
        println!("| {} | {name} | {verdict} |", i + 1);
    }
    let survivors = rows.iter().filter(|(_, v, _)| v.contains("survived")).count();
    let total: Duration = rows.iter().map(|r| r.2).sum();
    println!();
    println!(
        "{} mutants, {} killed, {survivors} survived ({:.0} s); simulated with DEEPKERN_SIM_SEED=1",
        rows.len(),
        rows.len() - survivors,
        total.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seeded bug still applies to the sources as they are (an edit to a kernel that moves a
    /// mutated line fails here, not in a long mutation run).
    #[test]
    fn every_mutant_applies_to_the_current_sources() {
        let root = project_root();
        for m in MUTANTS {
            let text = fs::read_to_string(root.join(m.file)).unwrap();
            apply(&text, m).unwrap();
            assert!(!m.tests.is_empty(), "{}: no test named", m.name);
            for (b, _) in m.tests {
                assert!(root.join("tests").join(format!("{b}.rs")).is_file(), "{}: no test binary {b}", m.name);
            }
        }
    }
}
