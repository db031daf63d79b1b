//! CPU reference benches: what `cargo xtask bench` runs on a machine without a GPU, and a guard
//! against the references becoming too slow to check large GPU outputs.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deepkern::check::calc_diff;
use deepkern::reference::quant::{ScaleFormat, per_block, per_token_group};

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 2_654_435_761) % 1_000_003) as f32 * 1e-3 - 500.0).collect()
}

fn quantisers(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_reference");
    for (m, k) in [(256, 7168), (4096, 7168)] {
        let x = values(m * k);
        g.throughput(Throughput::Bytes((m * k * 4) as u64));
        g.bench_with_input(BenchmarkId::new("per_token_group", format!("{m}x{k}")), &x, |b, x| {
            b.iter(|| per_token_group(black_box(x), m, k, ScaleFormat::F32))
        });
    }
    let (n, k) = (7168, 2048);
    let w = values(n * k);
    g.throughput(Throughput::Bytes((n * k * 4) as u64));
    g.bench_with_input(BenchmarkId::new("per_block", format!("{n}x{k}")), &w, |b, w| {
        b.iter(|| per_block(black_box(w), n, k, ScaleFormat::Ue8m0))
    });
    let (x, y) = (values(1 << 20), values(1 << 20).into_iter().map(|v| v * 1.001).collect::<Vec<_>>());
    g.throughput(Throughput::Bytes(8 << 20));
    g.bench_function("calc_diff/1M", |b| b.iter(|| calc_diff(black_box(&x), black_box(&y))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = quantisers
}
criterion_main!(benches);
