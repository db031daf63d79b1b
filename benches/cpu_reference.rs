//! CPU reference benches (no GPU needed): how fast the references that check the GPU outputs run,
//! so checking a large output never becomes the slow part of a test. Throughput counts the f32
//! input bytes read.
//!
//! - `per_token_group/{m}x{k}`: 1x128 activation quantiser, DeepSeek-V3 hidden size 7168.
//! - `per_block/{n}x{k}`: 128x128 weight quantiser with UE8M0 scales.
//! - `calc_diff/1M`: the global similarity over 2^20 f32 pairs.
//!
//! About 20 s in all: 10 samples, 2 s of measurement each.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deepkern::check::calc_diff;
use deepkern::reference::quant::{ScaleFormat, per_block, per_token_group};

/// Deterministic values in about [-500, 500) with every magnitude class E4M3 sees after scaling.
fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i.wrapping_mul(2_654_435_761)) % 1_000_003) as f32 * 1e-3 - 500.0).collect()
}

fn f32_bytes(elements: usize) -> Throughput {
    Throughput::Bytes((elements * std::mem::size_of::<f32>()) as u64)
}

fn quantisers(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_reference");
    for (m, k) in [(256, 7168), (4096, 7168)] {
        let x = values(m * k);
        g.throughput(f32_bytes(m * k));
        g.bench_with_input(BenchmarkId::new("per_token_group", format!("{m}x{k}")), &x, |b, x| {
            b.iter(|| per_token_group(black_box(x), m, k, ScaleFormat::F32))
        });
    }
    let (n, k) = (7168, 2048);
    let w = values(n * k);
    g.throughput(f32_bytes(n * k));
    g.bench_with_input(BenchmarkId::new("per_block", format!("{n}x{k}")), &w, |b, w| {
        b.iter(|| per_block(black_box(w), n, k, ScaleFormat::Ue8m0))
    });
    let len = 1 << 20;
    let x = values(len);
    let y: Vec<f32> = x.iter().map(|v| v * 1.001).collect();
    g.throughput(f32_bytes(2 * len));
    g.bench_function("calc_diff/1M", |b| b.iter(|| calc_diff(black_box(&x), black_box(&y))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = quantisers
}
criterion_main!(benches);
