//! MLA decode (schedule + split-KV kernel + combine, as `mla::decode` runs them) against this
//! GPU's measured rooflines.
//!
//! Models (FlashMLA's, so figures compare directly): FLOPs = `2·s_q·h_q·(576 + 512)·Σ len`;
//! bytes = `Σ len · 576 · 2` (the cache) `+ q + out`. Measured once per run on the same GPU: the
//! device-to-device copy bandwidth (a 1 GiB copy) and the cuBLASLt BF16 GEMM rate (8192³). Each
//! case's baseline is its roofline time `max(bytes / copy bandwidth, FLOPs / GEMM rate)`, so
//! "vs baseline" is the fraction of the roofline reached. Every case is checked on sampled rows
//! against an f64 computation before it is timed.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use deepkern::bf16;
use deepkern::check::calc_diff;
use deepkern::cudarc::cublaslt::{CudaBlasLT, Matmul};
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::mla::{DecodeShape, DecodeWorkspace, HEAD_DIM_K, HEAD_DIM_V, PagedKv, decode};
use deepkern::reference::mla::visible_keys;
use harness::{GpuBench, Record};
use serde_json::json;

const PAGE: usize = 64;

fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// One request's row of the attention in f64: (out, lse).
fn row_reference(q: &[bf16], cache: &[bf16], first_key: usize, keys: usize, scale: f64) -> (Vec<f64>, f64) {
    let logits: Vec<f64> = (0..keys)
        .map(|t| {
            let k = &cache[(first_key + t) * HEAD_DIM_K..(first_key + t + 1) * HEAD_DIM_K];
            scale * q.iter().zip(k).map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32())).sum::<f64>()
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut out = vec![0.0; HEAD_DIM_V];
    for (t, l) in logits.iter().enumerate() {
        let p = (l - max).exp() / sum;
        let v = &cache[(first_key + t) * HEAD_DIM_K..(first_key + t) * HEAD_DIM_K + HEAD_DIM_V];
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * f64::from(x.to_f32());
        }
    }
    (out, max + sum.ln())
}

/// Device-to-device copy bandwidth (bytes/s, read + write counted once each as in the byte model)
/// and the cuBLASLt BF16 GEMM rate (FLOP/s) of this GPU.
fn rooflines(gpu: &mut GpuBench) -> (f64, Option<f64>) {
    let bytes = 1usize << 30;
    let copy_us = gpu.copy_median_us(bytes);
    let copy_bw = 2.0 * bytes as f64 / (copy_us * 1e-6);
    let stream = gpu.stream.clone();
    // SAFETY: only probes for the library; cudarc's loader panics when it is absent.
    if !unsafe { deepkern::cudarc::cublaslt::sys::is_culib_present() } {
        eprintln!("libcublasLt not found: no GEMM roofline");
        return (copy_bw, None);
    }
    let blas = CudaBlasLT::new(stream.clone()).expect("create cuBLASLt handle");
    let n = 8192usize;
    let a = stream.clone_htod(&values(n * n, 1)).expect("upload");
    let b = stream.clone_htod(&values(n * n, 2)).expect("upload");
    let mut c = stream.alloc_zeros::<bf16>(n * n).expect("alloc");
    let cfg = harness::cublaslt_nt(n, n, n);
    // SAFETY: the buffers hold n·n bf16 elements each, as the config describes.
    let us = gpu.median_us(|_| unsafe { blas.matmul(cfg, &a, &b, &mut c, None, None) }.expect("cuBLASLt bf16 matmul"));
    (copy_bw, Some(2.0 * (n * n * n) as f64 / (us * 1e-6)))
}

struct Cache {
    lens: Vec<i32>,
    starts: Vec<usize>,
    host: Vec<bf16>,
    cache: CudaSlice<bf16>,
    block_table: CudaSlice<i32>,
    d_lens: CudaSlice<i32>,
    max_pages: usize,
}

/// A contiguous paged cache for `lens` (request r's pages follow request r - 1's).
fn cache(stream: &Arc<CudaStream>, lens: Vec<i32>) -> Cache {
    let pages: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(PAGE)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(1).max(1);
    let total_pages: usize = pages.iter().sum::<usize>().max(1);
    let mut block_table = vec![0i32; lens.len() * max_pages];
    let mut starts = Vec::new();
    let mut next = 0;
    for (r, &n) in pages.iter().enumerate() {
        starts.push(next * PAGE);
        for j in 0..n {
            block_table[r * max_pages + j] = (next + j) as i32;
        }
        next += n;
    }
    let host = values(total_pages * PAGE * HEAD_DIM_K, lens.len() as u64 * 131 + lens[0] as u64);
    Cache {
        cache: stream.clone_htod(&host).expect("upload cache"),
        block_table: stream.clone_htod(&block_table).expect("upload block table"),
        d_lens: stream.clone_htod(&lens).expect("upload lens"),
        lens,
        starts,
        host,
        max_pages,
    }
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let (copy_bw, gemm_rate) = rooflines(&mut gpu);
    eprintln!("rooflines: copy {:.0} GB/s, cuBLASLt BF16 {:?} TFLOP/s", copy_bw / 1e9, gemm_rate.map(|r| (r / 1e12).round()));
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .sample_size(10)
        .configure_from_args();
    let mut group = c.benchmark_group("mla_decode");
    let stream = gpu.stream.clone();
    let mut cases: Vec<(String, Vec<i32>)> = Vec::new();
    for b in [32, 64, 128] {
        for len in [1024, 4096, 8192, 16384] {
            cases.push((format!("b{b}_len{len}"), vec![len; b]));
        }
    }
    // Varlen: lengths drawn around a mean of 4096 (uniform in [1024, 7168]).
    let mut s = 7u64;
    let varlen = (0..128)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            1024 + ((s >> 33) % 6144) as i32
        })
        .collect();
    cases.push(("b128_varlen4096".into(), varlen));
    let scale = 1.0 / (HEAD_DIM_K as f32).sqrt();
    for (name, lens) in cases {
        let kv = cache(&stream, lens);
        let batch = kv.lens.len();
        let total_keys: usize = kv.lens.iter().map(|&l| l as usize).sum();
        for s_q in [1, 2] {
            for h_q in [16, 32, 64, 128] {
                let shape = DecodeShape { batch, s_q, h_q };
                let rows = batch * shape.rows();
                let q_host = values(rows * HEAD_DIM_K, (s_q * 1000 + h_q) as u64);
                let q = stream.clone_htod(&q_host).expect("upload q");
                let mut out = stream.alloc_zeros::<bf16>(rows * HEAD_DIM_V).expect("alloc out");
                let mut lse = stream.alloc_zeros::<f32>(rows).expect("alloc lse");
                let mut ws = DecodeWorkspace::new(&stream, shape).expect("workspace");
                let paged = PagedKv {
                    cache: kv.cache.as_view(),
                    page: PAGE,
                    block_table: kv.block_table.as_view(),
                    max_pages: kv.max_pages,
                    lens: kv.d_lens.as_view(),
                    lens_host: None,
                };
                decode(&stream, &q.as_view(), &paged, &mut out.as_view_mut(), &mut lse.as_view_mut(), scale, &mut ws).expect("decode");
                // Check request 0's first row and the last request's last row.
                let got_out = stream.clone_dtoh(&out).expect("download out");
                let got_lse = stream.clone_dtoh(&lse).expect("download lse");
                for (r, row) in [(0, 0), (batch - 1, shape.rows() - 1)] {
                    let flat = r * shape.rows() + row;
                    let keys = visible_keys(kv.lens[r] as usize, s_q, row / h_q);
                    let (want, want_lse) =
                        row_reference(&q_host[flat * HEAD_DIM_K..(flat + 1) * HEAD_DIM_K], &kv.host, kv.starts[r], keys, f64::from(scale));
                    let got: Vec<f32> = got_out[flat * HEAD_DIM_V..(flat + 1) * HEAD_DIM_V].iter().map(|v| v.to_f32()).collect();
                    let diff = calc_diff(&got, &want);
                    assert!(diff <= 1e-5, "{name} s_q {s_q} h_q {h_q}: calc_diff {diff:e}; not timing a wrong kernel");
                    assert!((f64::from(got_lse[flat]) - want_lse).abs() <= 1e-3, "{name} s_q {s_q} h_q {h_q}: lse differs");
                }

                let mut run = |st: &Arc<CudaStream>| {
                    decode(st, &q.as_view(), &paged, &mut out.as_view_mut(), &mut lse.as_view_mut(), scale, &mut ws).expect("decode");
                };
                let flops = 2.0 * (s_q * h_q * (HEAD_DIM_K + HEAD_DIM_V) * total_keys) as f64;
                let bytes = (total_keys * HEAD_DIM_K * 2 + rows * HEAD_DIM_K * 2 + rows * HEAD_DIM_V * 2) as f64;
                let case = format!("{name}_sq{s_q}_h{h_q}");
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_function(BenchmarkId::new("bf16", &case), |b| b.iter_custom(|iters| gpu.time(iters, &mut run)));
                let median_us = gpu.median_us(&mut run);
                let roofline_us = (bytes / copy_bw).max(gemm_rate.map_or(0.0, |g| flops / g)) * 1e6;
                gpu.record(Record {
                    kernel: "mla_decode_bf16",
                    case,
                    shape: json!({
                        "batch": batch, "s_q": s_q, "h_q": h_q, "page": PAGE, "total_keys": total_keys,
                        "copy_gbps": (copy_bw / 1e9).round(), "gemm_bf16_tflops": gemm_rate.map(|g| (g / 1e12).round()),
                    }),
                    median_us,
                    flops: Some(flops),
                    bytes: Some(bytes),
                    baseline: Some(("roofline_copy_or_cublaslt_bf16", roofline_us)),
                });
            }
        }
    }
    group.finish();
    c.final_summary();
}
