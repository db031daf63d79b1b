//! Dense FP8 block-scaled GEMM on DeepSeek-V3's projection shapes.
//!
//! Models: FLOPs = `2·m·n·k`; bytes = `m·k + n·k` (E4M3) `+ 2·m·n` (bf16 D) plus the scales.
//! Baseline in the same run: cuBLASLt's BF16 GEMM on the same shape (`cublaslt_bf16`): the
//! measured dense-GEMM rate of this GPU without FP8. The FP8 block-scaled cuBLASLt baseline
//! (VEC128 x BLK128x128 scales) is still to be added; until then no "vs cuBLASLt FP8" claim is made.
//! Operands come from the GPU quantisers; every case is checked on a random sample of entries
//! against the f64 reference before it is timed.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use deepkern::check::calc_diff;
use deepkern::cudarc::cublaslt::{CudaBlasLT, Matmul};
use deepkern::cudarc::driver::CudaStream;
use deepkern::gemm::{Fp8Activations, Fp8Weights, GemmShape, gemm_fp8};
use deepkern::layout::{BlockShape, TokenGroupShape, scales_from_tma_layout};
use deepkern::reference::gemm::{Fp8Operand, gemm_entries};
use deepkern::{F8E4M3, ScaleFormat, bf16, quantize_per_block, quantize_per_token_group};
use harness::{GpuBench, Record};
use serde_json::json;

const MS: [usize; 3] = [64, 128, 4096];
const NKS: [(usize, usize); 6] = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];

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
        let w = random_bf16(n * k, 0.2, (n * 31 + k) as u64);
        let d_w = stream.clone_htod(&w).expect("upload w");
        let bs = BlockShape::new(n, k);
        let mut qb = stream.alloc_zeros::<F8E4M3>(n * k).expect("alloc");
        let mut sb = stream.alloc_zeros::<f32>(bs.scale_elements().unwrap()).expect("alloc");
        quantize_per_block(&stream, &d_w, &mut qb, &mut sb, bs, ScaleFormat::F32).expect("quantise w");
        for &m in &MS {
            let shape = GemmShape { m, n, k };
            let x = random_bf16(m * k, 4.0, (m * 7 + k) as u64);
            let d_x = stream.clone_htod(&x).expect("upload x");
            let ts = TokenGroupShape::new(m, k);
            let mut qa = stream.alloc_zeros::<F8E4M3>(m * k).expect("alloc");
            let mut sa = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap()).expect("alloc");
            quantize_per_token_group(&stream, &d_x, &mut qa, &mut sa, ts, ScaleFormat::F32).expect("quantise x");
            let mut d = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            let run = |s: &Arc<CudaStream>, d: &mut deepkern::cudarc::driver::CudaSlice<bf16>| {
                let a = Fp8Activations { q: qa.as_view(), sf: sa.as_view() };
                let b = Fp8Weights { q: qb.as_view(), sf: sb.as_view() };
                gemm_fp8(s, &a, &b, &mut d.as_view_mut(), shape).expect("gemm");
            };
            run(&stream, &mut d);
            check(&stream, &qa, &sa, &qb, &sb, &d, shape);
            let mut launch = |s: &Arc<CudaStream>| run(s, &mut d);

            let flops = 2 * m * n * k;
            let bytes = m * k + n * k + 2 * m * n + 4 * (ts.scale_elements().unwrap() + bs.scale_elements().unwrap());
            let case = format!("m{m}_n{n}_k{k}");
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(BenchmarkId::new("fp8", &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut launch)));
            let median_us = gpu.median_us(&mut launch);
            let baseline = blas.as_ref().map(|blas| {
                let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
                let cfg = harness::cublaslt_nt(m, n, k);
                // SAFETY: the buffers hold n·k, m·k and m·n bf16 elements as the config describes.
                let us = gpu.median_us(|_| unsafe { blas.matmul(cfg, &d_w, &d_x, &mut out, None, None) }.expect("cuBLASLt bf16 matmul"));
                ("cublaslt_bf16", us)
            });
            gpu.record(Record {
                kernel: "gemm_fp8_dense",
                case,
                shape: json!({"m": m, "n": n, "k": k}),
                median_us,
                flops: Some(flops as f64),
                bytes: Some(bytes as f64),
                baseline,
            });
        }
    }
    group.finish();
    c.final_summary();
}

/// Refuses to time a wrong kernel: a random sample of D against the f64 reference on the same
/// quantised operands.
fn check(
    stream: &Arc<CudaStream>,
    qa: &deepkern::cudarc::driver::CudaSlice<F8E4M3>,
    sa: &deepkern::cudarc::driver::CudaSlice<f32>,
    qb: &deepkern::cudarc::driver::CudaSlice<F8E4M3>,
    sb: &deepkern::cudarc::driver::CudaSlice<f32>,
    d: &deepkern::cudarc::driver::CudaSlice<bf16>,
    shape: GemmShape,
) {
    let GemmShape { m, n, k } = shape;
    let bytes = |v: Vec<F8E4M3>| v.iter().map(F8E4M3::to_bits).collect::<Vec<u8>>();
    let (a, b) = (bytes(stream.clone_dtoh(qa).unwrap()), bytes(stream.clone_dtoh(qb).unwrap()));
    let sa_rows = scales_from_tma_layout(&stream.clone_dtoh(sa).unwrap(), m, k / 128);
    let sb_h = stream.clone_dtoh(sb).unwrap();
    let got_all = stream.clone_dtoh(d).unwrap();
    let at: Vec<(usize, usize)> = (0..1024usize).map(|i| ((i * 2_654_435_761) % m, (i * 40_503 + 17) % n)).collect();
    let want = gemm_entries(Fp8Operand { q: &a, scales: &sa_rows, rows: m }, Fp8Operand { q: &b, scales: &sb_h, rows: n }, k, &at);
    let got: Vec<f32> = at.iter().map(|&(r, c)| got_all[r * n + c].to_f32()).collect();
    let diff = calc_diff(&got, &want);
    assert!(diff < 1e-4, "{shape:?}: calc_diff {diff:e} against the reference; not timing a wrong kernel");
}
