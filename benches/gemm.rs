//! FP8 block-scaled GEMM on DeepSeek-V3's projection shapes (dense) and MoE shapes (grouped
//! contiguous and masked).
//!
//! Models: FLOPs = `2·m·n·k`; bytes = `m·k + n·k` (E4M3) `+ 2·m·n` (bf16 D) plus the scales.
//! Baselines in the same run, one line each per case:
//! - `gemm_fp8_dense` against `cublaslt_fp8_blockscaled`: cuBLASLt's FP8 GEMM with the same
//!   DeepSeek-style scales (CUDA ≥ 12.9 on Hopper: 1x128 `VEC128_32F` on the activations,
//!   128x128 `BLK128x128_32F` on the weights), on the very buffers our kernel reads. Its output is
//!   compared with ours first; where cuBLASLt refuses the case or disagrees, the line has no
//!   baseline and the bench says why.
//! - `gemm_fp8_dense_vs_bf16` against `cublaslt_bf16`: cuBLASLt's BF16 GEMM on the same shape, the
//!   rate a user without FP8 gets.
//! - `gemm_fp8_dense_planned_vs_fixed` against `deepkern_fixed_128x128`: the same kernel forced to
//!   the first version's one shape (128x128, 6 stages): what the planner's tile choice buys.
//!   Expected before measuring: most at m <= 128, where 128x128 tiles leave SMs idle and the
//!   GEMM is bound by how many SMs pull weights (m = 64, n = 2112: 17 tiles against 132, so up to
//!   ~4x); a few percent at m = 4096 from wave quantisation (n = 7168: 176-wide tiles fill 10 waves
//!   to 99%, 128-wide ones fill 14 waves to 97%).
//!
//! - `gemm_fp8_dense_tma_store_vs_direct` against `deepkern_direct_store`: the opt-in TMA-store
//!   epilogue (`GemmOptions::tma_store`) against the default bounds-checked stores from
//!   registers, both planned. Expected before measuring: near 0 where the operands dominate the
//!   traffic; a gain where D does (m = 4096, n = 32768, k = 512: D is 256 MiB against 18 MiB of
//!   operands, and each warp's direct store fills half of every 32-byte sector); a loss where
//!   the staging tile costs a pipeline stage the main loop needed (small m, large k).
//!
//! - `gemm_fp8_dense_vs_128_rows` against `deepkern_128_rows` (m >= 1024 only): the planned
//!   launch against the same kernel with the best 128-row tile the planner would take if 256-row
//!   tiles did not exist (no multicast either way). Expected before measuring, and recorded in the
//!   shape as `model_speedup` (the model's estimate of the 128-row launch over the planned one):
//!   1.0 on the four shapes where the planner keeps 128 rows at m = 4096 (2112x7168, 24576x1536,
//!   7168x2048: 128x176; 7168x16384: 128x160), 1.05 on 4096x7168 (256x128 in 4 waves against
//!   128x176 in 6) and 1.11 on 32768x512 (32 waves against 46). The target of 1.15 at m >= 1024
//!   needs TMA multicast as well: the model says 256-row tiles alone do not reach it.
//!
//! - `gemm_fp8_dense_multicast_vs_none` against `deepkern_no_multicast` (only where the planner
//!   takes multicast): the planned launch against the same tile without it, its output checked
//!   first. Expected before measuring, recorded as `model_speedup`: small, 1.03 on 32768x512 at
//!   m = 4096 (256x128 sharing A: the k-block drops from 1073 clocks, L2-bound, to 1040) and
//!   1.005 on 7168x2048 (128x160 sharing B); the model calls most of these shapes tensor-core
//!   bound, so a larger measured gain would say that L2's supply is lower than its 8192 B per
//!   clock.
//!
//! - `gemm_fp8_dense_tile_sweep` against `deepkern_planned`: every compiled dense tile on three
//!   shapes (memory-bound m = 64, mid m = 128, compute-bound m = 4096), each against the
//!   planner's choice in the same run: how good the planner's ranking is, and the data to fit its
//!   cost model.
//!
//! Every record's shape names the tile the planner chose (`tile`: block_m x block_n / stages).
//!
//! Operands come from the GPU quantisers; every case is checked on a random sample of entries
//! against the f64 reference before it is timed.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use deepkern::check::calc_diff;
use deepkern::cudarc::cublaslt::{CudaBlasLT, Matmul};
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::gemm::{
    Fp8Activations, Fp8Weights, GemmOptions, GemmShape, MaskedShape, TileConfig, gemm_fp8_contiguous, gemm_fp8_masked, gemm_fp8_with,
};
use deepkern::layout::{BlockShape, TokenGroupShape, scales_from_tma_layout};
use deepkern::plan::gemm::{GemmLayout, GemmProblem, Multicast, TileCost, block_n_menu, candidates, max_stages, plan};
use deepkern::reference::gemm::{Fp8Operand, gemm_entries};
use deepkern::{F8E4M3, ScaleFormat, bf16, quantize_per_block, quantize_per_token_group};
use harness::{GpuBench, Record};
use serde_json::json;

const MS: [usize; 3] = [64, 128, 4096];
const NKS: [(usize, usize); 6] = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];

/// Device operands of a benchmark case: the bf16 values and their FP8 quantisation.
type Quantised = (CudaSlice<bf16>, CudaSlice<F8E4M3>, CudaSlice<f32>);

/// Random activations in `ts`'s layout (values up to `4.0`, seeded), quantised 1x128 on the GPU.
fn quantised_activations(stream: &Arc<CudaStream>, ts: TokenGroupShape, seed: u64) -> Quantised {
    let len = ts.num_groups * ts.m * ts.k;
    let x = stream.clone_htod(&random_bf16(len, 4.0, seed)).expect("upload x");
    let mut q = stream.alloc_zeros::<F8E4M3>(len).expect("alloc");
    let mut sf = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap()).expect("alloc");
    quantize_per_token_group(stream, &x, &mut q, &mut sf, ts, ScaleFormat::F32).expect("quantise x");
    (x, q, sf)
}

/// Random weights in `bs`'s layout (values up to `0.2`, seeded), quantised 128x128 on the GPU.
fn quantised_weights(stream: &Arc<CudaStream>, bs: BlockShape, seed: u64) -> Quantised {
    let len = bs.num_groups * bs.n * bs.k;
    let w = stream.clone_htod(&random_bf16(len, 0.2, seed)).expect("upload w");
    let mut q = stream.alloc_zeros::<F8E4M3>(len).expect("alloc");
    let mut sf = stream.alloc_zeros::<f32>(bs.scale_elements().unwrap()).expect("alloc");
    quantize_per_block(stream, &w, &mut q, &mut sf, bs, ScaleFormat::F32).expect("quantise w");
    (w, q, sf)
}

fn random_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
        })
        .collect()
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let stream = gpu.stream.clone();
    // SAFETY: only probes for the library; cudarc's loader panics when it is absent.
    let blas = if unsafe { deepkern::cudarc::cublaslt::sys::is_culib_present() } {
        Some(CudaBlasLT::new(stream.clone()).expect("create cuBLASLt handle"))
    } else {
        eprintln!("libcublasLt not found: recording without the cuBLASLt BF16 baseline");
        None
    };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let mut group = c.benchmark_group("gemm_fp8_dense");
    for &(n, k) in &NKS {
        let bs = BlockShape::new(n, k);
        let (d_w, qb, sb) = quantised_weights(&stream, bs, (n * 31 + k) as u64);
        for &m in &MS {
            let shape = GemmShape { m, n, k };
            let ts = TokenGroupShape::new(m, k);
            let (d_x, qa, sa) = quantised_activations(&stream, ts, (m * 7 + k) as u64);
            let mut d = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            let run = |s: &Arc<CudaStream>, d: &mut CudaSlice<bf16>, options: GemmOptions, what: &str| {
                let a = Fp8Activations { q: qa.as_view(), sf: sa.as_view() };
                let b = Fp8Weights { q: qb.as_view(), sf: sb.as_view() };
                gemm_fp8_with(s, &a, &b, &mut d.as_view_mut(), shape, options).unwrap_or_else(|e| panic!("{what}: {e}"));
            };
            run(&stream, &mut d, GemmOptions::default(), "gemm");
            // A dense GEMM is one group of all the rows.
            check_grouped(&stream, &qa, &sa, &qb, &sb, &d, shape, 1, m, true);
            let mut launch = |s: &Arc<CudaStream>| run(s, &mut d, GemmOptions::default(), "gemm");

            let flops = 2 * m * n * k;
            let bytes = m * k + n * k + 2 * m * n + 4 * (ts.scale_elements().unwrap() + bs.scale_elements().unwrap());
            let case = format!("m{m}_n{n}_k{k}");
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(BenchmarkId::new("fp8", &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut launch)));
            let median_us = gpu.median_us(&mut launch);
            let fp8_baseline = blas.as_ref().and_then(|blas| {
                let lt = match LtFp8::new(blas, &stream, shape, &sb, &sa) {
                    Ok(lt) => lt,
                    Err(why) => {
                        eprintln!("{case}: no cuBLASLt FP8 block-scaled baseline: {why}");
                        return None;
                    }
                };
                let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
                if let Err(why) = lt.run(blas, &stream, &qb, &qa, &mut out) {
                    eprintln!("{case}: cuBLASLt FP8 block-scaled matmul failed: {why}");
                    return None;
                }
                let (ours, theirs) = (stream.clone_dtoh(&d).expect("download"), stream.clone_dtoh(&out).expect("download"));
                let diff = calc_diff(&ours, &theirs);
                if diff.is_nan() || diff >= 1e-3 {
                    eprintln!(
                        "{case}: cuBLASLt FP8 block-scaled output differs from ours (calc_diff {diff:e}); not using it as a baseline"
                    );
                    return None;
                }
                let us = gpu.median_us(|s| lt.run(blas, s, &qb, &qa, &mut out).expect("cuBLASLt FP8 matmul"));
                Some(("cublaslt_fp8_blockscaled", us))
            });
            let shape_json = json!({"m": m, "n": n, "k": k, "tile": tile_name(&gpu, GemmProblem { m, n, k, layout: GemmLayout::Dense })});
            let fixed = TileConfig { block_m: 128, block_n: 128, stages: 6 };
            let fixed_us =
                gpu.median_us(|s| run(s, &mut d, GemmOptions { tile: Some(fixed), ..GemmOptions::default() }, "gemm, fixed tile"));
            // D poisoned first, so the check below sees what the TMA-store epilogue wrote.
            stream.memcpy_htod(&vec![bf16::NAN; m * n], &mut d).expect("poison d");
            let tma_us = gpu.median_us(|s| run(s, &mut d, GemmOptions { tma_store: true, ..GemmOptions::default() }, "gemm, TMA store"));
            // The TMA-store output is checked like the default one before its time is recorded.
            check_grouped(&stream, &qa, &sa, &qb, &sb, &d, shape, 1, m, true);
            gpu.record(Record {
                kernel: "gemm_fp8_dense_tma_store_vs_direct",
                case: case.clone(),
                shape: shape_json.clone(),
                median_us: tma_us,
                flops: Some(flops as f64),
                bytes: Some(bytes as f64),
                baseline: Some(("deepkern_direct_store", median_us)),
            });
            if m >= 1024 {
                rows_128(&mut gpu, shape, &shape_json, median_us, &mut |s, options| run(s, &mut d, options, "gemm, 128-row tile"));
            }
            if let Ok(planned) = plan(&GemmProblem { m, n, k, layout: GemmLayout::Dense }, gpu.device.info())
                && planned.multicast != Multicast::None
            {
                // The planner's tile without its multicast, checked like the planned launch.
                let off = GemmOptions { multicast: Some(Multicast::None), ..GemmOptions::default() };
                stream.memcpy_htod(&vec![bf16::NAN; m * n], &mut d).expect("poison d");
                let off_us = gpu.median_us(|s| run(s, &mut d, off, "gemm, no multicast"));
                check_grouped(&stream, &qa, &sa, &qb, &sb, &d, shape, 1, m, true);
                let info = gpu.device.info().clone();
                let without = TileCost::HOPPER.launch_clocks(
                    planned.block_m,
                    planned.block_n,
                    planned.stages,
                    planned.tiles,
                    info.sm_count as usize,
                    k,
                    Multicast::None,
                );
                let mut shape_json = shape_json.clone();
                shape_json["multicast"] = json!(format!("{:?}", planned.multicast));
                shape_json["model_speedup"] = json!(without / planned.cost);
                gpu.record(Record {
                    kernel: "gemm_fp8_dense_multicast_vs_none",
                    case: case.clone(),
                    shape: shape_json,
                    median_us,
                    flops: Some(flops as f64),
                    bytes: Some(bytes as f64),
                    baseline: Some(("deepkern_no_multicast", off_us)),
                });
            }
            gpu.record(Record {
                kernel: "gemm_fp8_dense_planned_vs_fixed",
                case: case.clone(),
                shape: shape_json.clone(),
                median_us,
                flops: Some(flops as f64),
                bytes: Some(bytes as f64),
                baseline: Some(("deepkern_fixed_128x128", fixed_us)),
            });
            gpu.record(Record {
                kernel: "gemm_fp8_dense",
                case: case.clone(),
                shape: shape_json.clone(),
                median_us,
                flops: Some(flops as f64),
                bytes: Some(bytes as f64),
                baseline: fp8_baseline,
            });
            if let Some(blas) = &blas {
                let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
                let cfg = harness::cublaslt_nt(m, n, k);
                // SAFETY: the buffers hold n·k, m·k and m·n bf16 elements as the config describes.
                let us = gpu.median_us(|_| unsafe { blas.matmul(cfg, &d_w, &d_x, &mut out, None, None) }.expect("cuBLASLt bf16 matmul"));
                gpu.record(Record {
                    kernel: "gemm_fp8_dense_vs_bf16",
                    case,
                    shape: shape_json,
                    median_us,
                    flops: Some(flops as f64),
                    bytes: Some(bytes as f64),
                    baseline: Some(("cublaslt_bf16", us)),
                });
            }
        }
    }
    group.finish();
    grouped(&mut gpu, &mut c, blas.as_ref());
    tile_sweep(&mut gpu);
    c.final_summary();
}

/// Records the planned launch (`planned_us`) against the best 128-row tile of the planner's model.
fn rows_128(
    gpu: &mut GpuBench,
    shape: GemmShape,
    shape_json: &serde_json::Value,
    planned_us: f64,
    run: &mut dyn FnMut(&Arc<CudaStream>, GemmOptions),
) {
    let GemmShape { m, n, k } = shape;
    let problem = GemmProblem { m, n, k, layout: GemmLayout::Dense };
    let info = gpu.device.info().clone();
    let (Ok(planned), Ok(all)) = (plan(&problem, &info), candidates(&problem, &info, TileCost::HOPPER)) else { return };
    let Some(best) =
        all.into_iter().filter(|c| c.block_m == 128 && c.multicast == Multicast::None).min_by(|a, b| a.cost.total_cmp(&b.cost))
    else {
        return;
    };
    let tile = TileConfig { block_m: 128, block_n: best.block_n, stages: best.stages };
    let us = gpu.median_us(|s| run(s, GemmOptions { tile: Some(tile), multicast: Some(Multicast::None), ..GemmOptions::default() }));
    let mut shape_json = shape_json.clone();
    shape_json["rows_128"] = json!(format!("128x{}/{}", best.block_n, best.stages));
    shape_json["model_speedup"] = json!(best.cost / planned.cost);
    gpu.record(Record {
        kernel: "gemm_fp8_dense_vs_128_rows",
        case: format!("m{m}_n{n}_k{k}"),
        shape: shape_json,
        median_us: planned_us,
        flops: Some((2 * m * n * k) as f64),
        bytes: None,
        baseline: Some(("deepkern_128_rows", us)),
    });
}

/// Every compiled dense tile (deepest pipeline that fits) on three shapes, against the planner's
/// choice: the data to calibrate `plan::gemm::TileCost` (an initial model, never fitted yet).
/// One `gemm_fp8_dense_tile_sweep` line per tile, baseline `deepkern_planned`; its shape carries
/// the model's prediction, written before any measurement: `model_vs_planned`, the tile's
/// estimated launch time over the planned tile's (the measured ratio is `median_us` over the
/// baseline's).
fn tile_sweep(gpu: &mut GpuBench) {
    let stream = gpu.stream.clone();
    let limit = gpu.device.info().max_shared_memory_per_block_optin;
    for (m, n, k) in [(64, 2112, 7168), (128, 7168, 2048), (4096, 7168, 2048)] {
        let shape = GemmShape { m, n, k };
        let (ts, bs) = (TokenGroupShape::new(m, k), BlockShape::new(n, k));
        let (_, qa, sa) = quantised_activations(&stream, ts, (m + k) as u64);
        let (_, qb, sb) = quantised_weights(&stream, bs, (n + k) as u64);
        let mut d = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
        let run = |s: &Arc<CudaStream>, d: &mut CudaSlice<bf16>, options: GemmOptions| {
            let a = Fp8Activations { q: qa.as_view(), sf: sa.as_view() };
            let b = Fp8Weights { q: qb.as_view(), sf: sb.as_view() };
            gemm_fp8_with(s, &a, &b, &mut d.as_view_mut(), shape, options)
        };
        let planned_us = gpu.median_us(|s| run(s, &mut d, GemmOptions::default()).expect("gemm"));
        let problem = GemmProblem { m, n, k, layout: GemmLayout::Dense };
        let planned = tile_name(gpu, problem);
        let sms = gpu.device.info().sm_count as usize;
        // Forced tiles run without multicast; the planned one as planned.
        let model = |bm: usize, bn: usize, stages: usize| {
            TileCost::HOPPER.launch_clocks(bm, bn, stages, m.div_ceil(bm) * n.div_ceil(bn), sms, k, Multicast::None)
        };
        let planned_model = plan(&problem, gpu.device.info()).map_or(f64::NAN, |t| t.cost);
        let mut best = (f64::INFINITY, String::new());
        for block_m in [64, 128, 256] {
            for &block_n in block_n_menu(block_m) {
                let Some(stages) = max_stages(block_m, block_n, 0, false, limit) else { continue };
                let tile = TileConfig { block_m, block_n, stages };
                let options = GemmOptions { tile: Some(tile), ..GemmOptions::default() };
                // A shape this device or build refuses is reported and skipped, not timed.
                stream.memcpy_htod(&vec![bf16::NAN; m * n], &mut d).expect("poison d");
                if let Err(e) = run(&stream, &mut d, options) {
                    eprintln!("tile sweep m{m} n{n} k{k}: {block_m}x{block_n}/{stages} refused: {e}");
                    continue;
                }
                check_grouped(&stream, &qa, &sa, &qb, &sb, &d, shape, 1, m, true);
                let us = gpu.median_us(|s| run(s, &mut d, options).expect("gemm"));
                let name = format!("{block_m}x{block_n}/{stages}");
                if us < best.0 {
                    best = (us, name.clone());
                }
                gpu.record(Record {
                    kernel: "gemm_fp8_dense_tile_sweep",
                    case: format!("m{m}_n{n}_k{k}_{block_m}x{block_n}"),
                    shape: json!({
                        "m": m, "n": n, "k": k, "tile": name, "planned": planned,
                        "model_vs_planned": model(block_m, block_n, stages) / planned_model,
                    }),
                    median_us: us,
                    flops: Some((2 * m * n * k) as f64),
                    bytes: None,
                    baseline: Some(("deepkern_planned", planned_us)),
                });
            }
        }
        eprintln!("tile sweep m{m} n{n} k{k}: planned {planned} {planned_us:.1} us; fastest {} {:.1} us", best.1, best.0);
    }
}

/// MoE shapes: contiguous (groups, rows per group) and masked (groups, rows per group), each with
/// every expert full (uniform segments; masked_m = rows). Baseline: cuBLASLt's FP8 block-scaled
/// dense GEMM over all the rows with one expert's weights, the same FLOPs in one dense call (a
/// ceiling for a grouped kernel, which also reads `groups` weight matrices).
fn grouped(gpu: &mut GpuBench, c: &mut Criterion, blas: Option<&CudaBlasLT>) {
    let stream = gpu.stream.clone();
    let mut group = c.benchmark_group("gemm_fp8_grouped");
    let cases = [(true, 4, 8192), (true, 8, 4096), (false, 1, 1024), (false, 2, 512), (false, 4, 256)];
    for (n, k) in [(4096usize, 7168usize), (7168, 2048)] {
        for (contiguous, groups, rows) in cases {
            let m = groups * rows;
            let shape = GemmShape { m, n, k };
            let bs = BlockShape::batched(groups, n, k);
            let (_, qb, sb) = quantised_weights(&stream, bs, (groups * n + k) as u64);
            let ts = if contiguous { TokenGroupShape::new(m, k) } else { TokenGroupShape::batched(groups, rows, k) };
            let (_, qa, sa) = quantised_activations(&stream, ts, (m * 3 + k) as u64);
            let index: Vec<i32> = if contiguous { (0..m).map(|r| (r / rows) as i32).collect() } else { vec![rows as i32; groups] };
            let d_index = stream.clone_htod(&index).expect("upload index");
            let mut d = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            let run = |s: &Arc<CudaStream>, d: &mut CudaSlice<bf16>| {
                let a = Fp8Activations { q: qa.as_view(), sf: sa.as_view() };
                let b = Fp8Weights { q: qb.as_view(), sf: sb.as_view() };
                if contiguous {
                    gemm_fp8_contiguous(s, &a, &b, &d_index.as_view(), &mut d.as_view_mut(), shape, groups).expect("contiguous gemm");
                } else {
                    let ms = MaskedShape { groups, max_m: rows, n, k };
                    gemm_fp8_masked(s, &a, &b, &d_index.as_view(), &mut d.as_view_mut(), ms).expect("masked gemm");
                }
            };
            run(&stream, &mut d);
            check_grouped(&stream, &qa, &sa, &qb, &sb, &d, shape, groups, rows, contiguous);
            let mut launch = |s: &Arc<CudaStream>| run(s, &mut d);
            let flops = 2 * m * n * k;
            let bytes = m * k + groups * n * k + 2 * m * n + 4 * (ts.scale_elements().unwrap() + bs.scale_elements().unwrap());
            let layout = if contiguous { "contiguous" } else { "masked" };
            let case = format!("{layout}_g{groups}_m{rows}_n{n}_k{k}");
            let problem = GemmProblem {
                m,
                n,
                k,
                layout: if contiguous {
                    GemmLayout::GroupedContiguous { groups }
                } else {
                    GemmLayout::GroupedMasked { groups, max_m: rows, expected_m: rows }
                },
            };
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(BenchmarkId::new(layout, &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut launch)));
            let median_us = gpu.median_us(&mut launch);
            // The dense ceiling: all rows against expert 0's weights, in one cuBLASLt call (the
            // contiguous layout's scales are already the dense layout; masked ones are not).
            let baseline = blas.filter(|_| contiguous).and_then(|blas| {
                let (qb0, sb0) = (qb.slice(..n * k), sb.slice(..BlockShape::new(n, k).scale_elements().unwrap()));
                let lt =
                    LtFp8::new(blas, &stream, shape, &sb0, &sa).map_err(|why| eprintln!("{case}: no cuBLASLt baseline: {why}")).ok()?;
                let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
                lt.run(blas, &stream, &qb0, &qa, &mut out).map_err(|why| eprintln!("{case}: cuBLASLt failed: {why}")).ok()?;
                Some((
                    "cublaslt_fp8_blockscaled_dense_same_flops",
                    gpu.median_us(|s| lt.run(blas, s, &qb0, &qa, &mut out).expect("cuBLASLt")),
                ))
            });
            gpu.record(Record {
                kernel: "gemm_fp8_grouped",
                case,
                shape: json!({"layout": layout, "groups": groups, "m_per_group": rows, "n": n, "k": k, "tile": tile_name(gpu, problem)}),
                median_us,
                flops: Some(flops as f64),
                bytes: Some(bytes as f64),
                baseline,
            });
        }
    }
    group.finish();
}

/// The planner's tile for `p` on this GPU, as `block_m x block_n / stages`.
fn tile_name(gpu: &GpuBench, p: GemmProblem) -> String {
    match plan(&p, gpu.device.info()) {
        Ok(t) => format!("{}x{}/{}", t.block_m, t.block_n, t.stages),
        Err(e) => format!("no plan: {e}"),
    }
}

/// Refuses to time a wrong kernel: a sample of entries against the f64 reference on the same
/// quantised operands, each row against its own group's weights (`rows` rows per group).
#[allow(clippy::too_many_arguments)]
fn check_grouped(
    stream: &Arc<CudaStream>,
    qa: &CudaSlice<F8E4M3>,
    sa: &CudaSlice<f32>,
    qb: &CudaSlice<F8E4M3>,
    sb: &CudaSlice<f32>,
    d: &CudaSlice<bf16>,
    shape: GemmShape,
    groups: usize,
    rows: usize,
    contiguous: bool,
) {
    let GemmShape { m, n, k } = shape;
    let kb = k / 128;
    let bytes = |v: Vec<F8E4M3>| v.iter().map(F8E4M3::to_bits).collect::<Vec<u8>>();
    let (a, b) = (bytes(stream.clone_dtoh(qa).unwrap()), bytes(stream.clone_dtoh(qb).unwrap()));
    let sa_h = stream.clone_dtoh(sa).unwrap();
    // Row-major [m, kb] scales of A from either layout.
    let sa_rows = if contiguous {
        scales_from_tma_layout(&sa_h, m, kb)
    } else {
        let per = sa_h.len() / groups;
        (0..groups).flat_map(|g| scales_from_tma_layout(&sa_h[g * per..(g + 1) * per], rows, kb)).collect()
    };
    let sb_h = stream.clone_dtoh(sb).unwrap();
    let got_all = stream.clone_dtoh(d).unwrap();
    let sb_per = n.div_ceil(128) * kb;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in 0..512usize {
        let (r, col) = ((i * 2_654_435_761) % m, (i * 40_503 + 17) % n);
        let g = r / rows;
        let b_g = Fp8Operand { q: &b[g * n * k..(g + 1) * n * k], scales: &sb_h[g * sb_per..(g + 1) * sb_per], rows: n };
        let a_r = Fp8Operand { q: &a[r * k..(r + 1) * k], scales: &sa_rows[r * kb..(r + 1) * kb], rows: 1 };
        want.extend(gemm_entries(a_r, b_g, k, &[(0, col)]));
        got.push(got_all[r * n + col].to_f32());
    }
    let diff = calc_diff(&got, &want);
    assert!(diff < 1e-4, "grouped {shape:?}: calc_diff {diff:e} against the reference; not timing a wrong kernel");
}

/// cuBLASLt's FP8 GEMM with DeepSeek-style block scales, set up for row-major
/// `D[m, n] = A[m, k] · B[n, k]ᵀ` (column-major `Dᵀ = op(B) · Aᵀ`: B is cuBLASLt's A operand,
/// transposed, with 128x128 scales; A is its B operand with 1x128 scales). cuBLASLt reads A's
/// scales as `[k/128, m]` with m contiguous and B's as `[n/128, round_up(k/128, 4)]` with the
/// K blocks contiguous; our quantisers' layouts are exactly these when `m % 4 == 0` and
/// `(k/128) % 4 == 0`, so other cases are refused rather than repacked.
struct LtFp8 {
    desc: lt::sys::cublasLtMatmulDesc_t,
    layouts: [lt::sys::cublasLtMatrixLayout_t; 3],
    algo: lt::sys::cublasLtMatmulAlgo_t,
    workspace: CudaSlice<u8>,
}

use deepkern::cudarc::cublaslt as lt;
use deepkern::cudarc::cublaslt::MatmulShared;
use deepkern::cudarc::driver::{DevicePtr, DevicePtrMut};

const LT_WORKSPACE: usize = 32 << 20;

impl LtFp8 {
    fn new(
        blas: &CudaBlasLT,
        stream: &Arc<CudaStream>,
        shape: GemmShape,
        sb: &impl DevicePtr<f32>,
        sa: &impl DevicePtr<f32>,
    ) -> Result<Self, String> {
        use lt::sys::cublasLtMatmulDescAttributes_t as A;
        let GemmShape { m, n, k } = shape;
        if m % 4 != 0 || (k / 128) % 4 != 0 {
            return Err(format!("m = {m} or k/128 = {} is not a multiple of 4 (scale layouts differ)", k / 128));
        }
        let e = |what: &'static str| move |err: lt::result::CublasError| format!("{what}: {err:?}");
        let desc = lt::result::create_matmul_desc(lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::sys::cudaDataType_t::CUDA_R_32F)
            .map_err(e("matmul descriptor"))?;
        let f8 = lt::sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let layouts = [
            lt::result::create_matrix_layout(f8, k as u64, n as u64, k as i64).map_err(e("layout of B"))?,
            lt::result::create_matrix_layout(f8, k as u64, m as u64, k as i64).map_err(e("layout of A"))?,
            lt::result::create_matrix_layout(lt::sys::cudaDataType_t::CUDA_R_16BF, n as u64, m as u64, n as i64)
                .map_err(e("layout of D"))?,
        ];
        let mut me = Self {
            desc,
            layouts,
            algo: unsafe { std::mem::zeroed() },
            workspace: stream.alloc_zeros::<u8>(LT_WORKSPACE).map_err(|err| format!("{err:?}"))?,
        };
        let (sb_ptr, _g1) = sb.device_ptr(stream);
        let (sa_ptr, _g2) = sa.device_ptr(stream);
        let set = |attr: A, value: &[u8]| {
            // SAFETY: `value` is the attribute's documented type, read during the call only.
            unsafe { lt::result::set_matmul_desc_attribute(desc, attr, value.as_ptr().cast(), value.len()) }
                .map_err(e("descriptor attribute"))
        };
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32.to_ne_bytes() /* CUBLAS_OP_T */)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32.to_ne_bytes() /* CUBLAS_OP_N */)?;
        set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb_ptr.to_ne_bytes())?;
        set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa_ptr.to_ne_bytes())?;
        let mode = |m: lt::sys::cublasLtMatmulMatrixScale_t| (m as u32).to_ne_bytes();
        set(
            A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
            &mode(lt::sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F),
        )?;
        set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode(lt::sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F))?;
        let pref = lt::result::create_matmul_pref().map_err(e("preference"))?;
        let ws = (LT_WORKSPACE as u64).to_ne_bytes();
        // SAFETY: a u64, as the attribute requires.
        let heuristic = unsafe {
            lt::result::set_matmul_pref_attribute(
                pref,
                lt::sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                ws.as_ptr().cast(),
                ws.len(),
            )
            .and_then(|()| {
                lt::result::get_matmul_algo_heuristic(*blas.handle(), desc, layouts[0], layouts[1], layouts[2], layouts[2], pref)
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::result::destroy_matmul_pref(pref) };
        me.algo = heuristic.map_err(e("no algorithm for this case"))?.algo;
        Ok(me)
    }

    /// `d = a · bᵀ` on `stream` (bf16 `[m, n]`).
    fn run(
        &self,
        blas: &CudaBlasLT,
        stream: &Arc<CudaStream>,
        b: &impl DevicePtr<F8E4M3>,
        a: &impl DevicePtr<F8E4M3>,
        d: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (b_ptr, _g1) = b.device_ptr(stream);
        let (a_ptr, _g2) = a.device_ptr(stream);
        let (d_ptr, _g3) = d.device_ptr_mut(stream);
        let (ws_ptr, _g4) = self.workspace.device_ptr(stream);
        // SAFETY: the layouts describe these buffers (checked lengths: the bench allocated them
        // for this shape); the scale pointers set in `new` outlive the bench case.
        unsafe {
            lt::result::matmul(
                *blas.handle(),
                self.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                b_ptr as *const _,
                self.layouts[0],
                a_ptr as *const _,
                self.layouts[1],
                d_ptr as *const _,
                self.layouts[2],
                d_ptr as *mut _,
                self.layouts[2],
                &self.algo,
                ws_ptr as *mut _,
                LT_WORKSPACE,
                stream.cu_stream() as _,
            )
        }
        .map_err(|err| format!("{err:?}"))
    }
}

impl Drop for LtFp8 {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; errors cannot be reported from drop.
        unsafe {
            let _ = lt::result::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::result::destroy_matrix_layout(l);
            }
        }
    }
}
