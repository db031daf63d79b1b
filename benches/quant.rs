//! FP8 quantisers against the device-to-device copy bandwidth of the same GPU.
//!
//! Byte model (what one launch must move through DRAM): read `2·rows·k` (bf16), write `rows·k`
//! (e4m3) plus the f32 scales. The baseline is a device-to-device copy of half that many bytes,
//! which moves the same total (read + write), measured in the same run: a quantiser's "vs
//! baseline" is its fraction of the achievable copy bandwidth.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use deepkern::cudarc::driver::CudaStream;
use deepkern::layout::{BlockShape, TokenGroupShape, scales_from_tma_layout};
use deepkern::reference::quant::{per_block, per_token_group};
use deepkern::{F8E4M3, ScaleFormat, bf16, quantize_per_block, quantize_per_token_group};
use harness::{GpuBench, Record};
use serde_json::{Value, json};

/// Activations (m, k): decode- and prefill-sized, DeepSeek-V3 widths (hidden 7168, MoE 2048, q 1536).
const TOKEN_CASES: [(usize, usize, ScaleFormat); 6] = [
    (128, 7168, ScaleFormat::F32),
    (4096, 7168, ScaleFormat::F32),
    (16384, 7168, ScaleFormat::F32),
    (16384, 7168, ScaleFormat::Ue8m0),
    (4096, 2048, ScaleFormat::F32),
    (32768, 1536, ScaleFormat::F32),
];

/// Weights (experts, n, k): a dense projection, and a layer's experts at once.
const BLOCK_CASES: [(usize, usize, usize, ScaleFormat); 3] =
    [(1, 24576, 1536, ScaleFormat::F32), (1, 7168, 16384, ScaleFormat::Ue8m0), (8, 4096, 7168, ScaleFormat::F32)];

/// Deterministic bf16 inputs whose rows span many binades.
fn inputs(rows: usize, k: usize) -> Vec<bf16> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..rows * k)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            bf16::from_f32(unit * 2f32.powi((i / k % 24) as i32 - 12))
        })
        .collect()
}

fn bits(q: Vec<F8E4M3>) -> Vec<u8> {
    q.iter().map(F8E4M3::to_bits).collect()
}

/// Times `launch` in criterion and for the record, beside a copy of the same bytes.
fn measure(
    gpu: &mut GpuBench,
    group: &mut BenchmarkGroup<WallTime>,
    kernel: &'static str,
    case: String,
    shape: Value,
    bytes: usize,
    mut launch: impl FnMut(&Arc<CudaStream>),
) {
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(BenchmarkId::new(kernel, &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut launch)));
    let median_us = gpu.median_us(&mut launch);
    let copy_us = gpu.copy_median_us(bytes / 2);
    gpu.record(Record {
        kernel,
        case,
        shape,
        median_us,
        flops: None,
        bytes: Some(bytes as f64),
        baseline: Some(("d2d_copy_same_bytes", copy_us)),
    });
}

fn suffix(fmt: ScaleFormat) -> &'static str {
    if fmt == ScaleFormat::Ue8m0 { "-ue8m0" } else { "" }
}

fn token_group(gpu: &mut GpuBench, group: &mut BenchmarkGroup<WallTime>) {
    for (m, k, fmt) in TOKEN_CASES {
        let shape = TokenGroupShape::new(m, k);
        let x = inputs(m, k);
        let stream = gpu.stream.clone();
        let d_x = stream.clone_htod(&x).expect("upload x");
        let mut d_q = stream.alloc_zeros::<F8E4M3>(m * k).expect("alloc q");
        let mut d_sf = stream.alloc_zeros::<f32>(shape.scale_elements().unwrap()).expect("alloc sf");

        // Check once before timing: bitwise against the CPU quantiser.
        quantize_per_token_group(&stream, &d_x, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        let want = per_token_group(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), m, k, fmt);
        let sf = scales_from_tma_layout(&stream.clone_dtoh(&d_sf).expect("download sf"), m, shape.k_blocks());
        assert!(
            bits(stream.clone_dtoh(&d_q).expect("download q")) == want.q,
            "{m}x{k} {fmt:?}: e4m3 differs from the CPU; not timing a wrong kernel"
        );
        assert!(sf.iter().map(|s| s.to_bits()).eq(want.scales.iter().map(|s| s.to_bits())), "{m}x{k} {fmt:?}: scales differ");

        let bytes = 3 * m * k + 4 * shape.scale_elements().unwrap();
        let launch = |s: &Arc<CudaStream>| quantize_per_token_group(s, &d_x, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        let json = json!({"m": m, "k": k, "scale": format!("{fmt:?}")});
        measure(gpu, group, "quant_per_token_group", format!("{m}x{k}{}", suffix(fmt)), json, bytes, launch);
    }
}

fn block(gpu: &mut GpuBench, group: &mut BenchmarkGroup<WallTime>) {
    for (g, n, k, fmt) in BLOCK_CASES {
        let shape = BlockShape::batched(g, n, k);
        let w = inputs(g * n, k);
        let stream = gpu.stream.clone();
        let d_w = stream.clone_htod(&w).expect("upload w");
        let mut d_q = stream.alloc_zeros::<F8E4M3>(shape.elements().unwrap()).expect("alloc q");
        let mut d_sf = stream.alloc_zeros::<f32>(shape.scale_elements().unwrap()).expect("alloc sf");

        quantize_per_block(&stream, &d_w, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        let (q, sf) = (bits(stream.clone_dtoh(&d_q).expect("download q")), stream.clone_dtoh(&d_sf).expect("download sf"));
        let (per_op, per_op_sf) = (n * k, shape.n_blocks() * shape.k_blocks());
        for e in 0..g {
            let want = per_block(&w[e * per_op..(e + 1) * per_op].iter().map(|v| v.to_f32()).collect::<Vec<_>>(), n, k, fmt);
            assert!(q[e * per_op..(e + 1) * per_op] == want.q[..], "{g}x{n}x{k} {fmt:?}: e4m3 differs; not timing a wrong kernel");
            let got = &sf[e * per_op_sf..(e + 1) * per_op_sf];
            assert!(got.iter().map(|s| s.to_bits()).eq(want.scales.iter().map(|s| s.to_bits())), "{g}x{n}x{k} {fmt:?}: scales differ");
        }

        let bytes = 3 * g * n * k + 4 * shape.scale_elements().unwrap();
        let launch = |s: &Arc<CudaStream>| quantize_per_block(s, &d_w, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        let json = json!({"experts": g, "n": n, "k": k, "scale": format!("{fmt:?}")});
        measure(gpu, group, "quant_per_block", format!("{g}x{n}x{k}{}", suffix(fmt)), json, bytes, launch);
    }
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let mut group = c.benchmark_group("quant");
    token_group(&mut gpu, &mut group);
    block(&mut gpu, &mut group);
    group.finish();
    c.final_summary();
}
