//! Per-token-group FP8 quantiser against the device-to-device copy bandwidth of the same GPU.
//!
//! Byte model (what one launch must move through DRAM): read `2·m·k` (bf16), write `m·k` (e4m3)
//! and `4·(k/128)·round_up(m, 4)` (f32 scales). The baseline is a device-to-device copy of half
//! that many bytes, which moves the same total (read + write), measured in the same run: the
//! quantiser's "vs baseline" is its fraction of the achievable copy bandwidth.

mod harness;

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use deepkern::layout::{TokenGroupShape, scales_from_tma_layout};
use deepkern::reference::quant::per_token_group;
use deepkern::{F8E4M3, ScaleFormat, bf16, quantize_per_token_group};
use harness::{GpuBench, Record};
use serde_json::json;

/// (m, k): decode-sized and prefill-sized activations of DeepSeek-V3 (hidden 7168, MoE 2048, q 1536).
const CASES: [(usize, usize, ScaleFormat); 6] = [
    (128, 7168, ScaleFormat::F32),
    (4096, 7168, ScaleFormat::F32),
    (16384, 7168, ScaleFormat::F32),
    (16384, 7168, ScaleFormat::Ue8m0),
    (4096, 2048, ScaleFormat::F32),
    (32768, 1536, ScaleFormat::F32),
];

/// Deterministic bf16 inputs with row magnitudes spread over many binades.
fn inputs(m: usize, k: usize) -> Vec<bf16> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..m * k)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            bf16::from_f32(unit * 2f32.powi((i / k % 24) as i32 - 12))
        })
        .collect()
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let mut group = c.benchmark_group("quant_per_token_group");
    for (m, k, fmt) in CASES {
        let shape = TokenGroupShape::new(m, k);
        let x = inputs(m, k);
        let stream = gpu.stream.clone();
        let d_x = stream.clone_htod(&x).expect("upload x");
        let mut d_q = stream.alloc_zeros::<F8E4M3>(m * k).expect("alloc q");
        let mut d_sf = stream.alloc_zeros::<f32>(shape.scale_elements().unwrap()).expect("alloc sf");

        // Check once before timing: bitwise against the CPU quantiser.
        quantize_per_token_group(&stream, &d_x, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let want = per_token_group(&xf, m, k, fmt);
        let q: Vec<u8> = stream.clone_dtoh(&d_q).expect("download q").iter().map(F8E4M3::to_bits).collect();
        let sf = scales_from_tma_layout(&stream.clone_dtoh(&d_sf).expect("download sf"), m, shape.k_blocks());
        assert!(q == want.q, "{m}x{k} {fmt:?}: GPU e4m3 differs from the CPU reference; not timing a wrong kernel");
        assert!(sf.iter().map(|s| s.to_bits()).eq(want.scales.iter().map(|s| s.to_bits())), "{m}x{k} {fmt:?}: scales differ");

        let bytes = 2 * m * k + m * k + 4 * shape.scale_elements().unwrap();
        let case = format!("{m}x{k}{}", if fmt == ScaleFormat::Ue8m0 { "-ue8m0" } else { "" });
        let mut launch = |s: &std::sync::Arc<deepkern::cudarc::driver::CudaStream>| {
            quantize_per_token_group(s, &d_x, &mut d_q, &mut d_sf, shape, fmt).expect("quantise");
        };
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("bf16_to_e4m3", &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut launch)));
        let median_us = gpu.median_us(&mut launch);
        let copy_us = gpu.copy_median_us(bytes / 2);
        gpu.record(Record {
            kernel: "quant_per_token_group",
            case,
            shape: json!({"m": m, "k": k, "scale": format!("{fmt:?}")}),
            median_us,
            flops: None,
            bytes: Some(bytes as f64),
            baseline: Some(("d2d_copy_same_bytes", copy_us)),
        });
    }
    group.finish();
    c.final_summary();
}
