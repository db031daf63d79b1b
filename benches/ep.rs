//! Expert-parallel dispatch and combine on R virtual ranks of one GPU, against the device-to-device
//! copy bandwidth of the same GPU.
//!
//! Byte model (what crosses between ranks, summed over all ranks, all of which run on this GPU):
//! FP8 dispatch moves one row per (token, expert) pair, `hidden` bytes plus `4·hidden/128` bytes of
//! scales; BF16 combine moves `2·hidden` bytes per pair back. The baseline is a device-to-device
//! copy of the same number of bytes, measured in the same run. On one GPU "between ranks" is
//! between buffers of the same DRAM, so the fraction of copy bandwidth is the figure that carries
//! over; NVLink figures need a multi-GPU host.
//!
//! Normal dispatch is timed as a user calls it: layout, positions, notify, one host
//! synchronisation to size the outputs, send, receive. Low-latency cases report µs per call.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::ep::{Group, GroupShape, Payload, RankInput, Tokens, Transport};
use deepkern::reference::ep::{EpConfig, Routing, dispatch};
use deepkern::{F8E4M3, bf16};
use harness::{GpuBench, Record, Span, Xs};
use serde_json::json;

const HIDDEN: usize = 7168;
const EXPERTS: usize = 256;
const TOPK: usize = 8;
/// SMs each communication kernel may use (the budget).
const SMS: usize = 24;

/// Uniform top-k routing with distinct experts; weights in (0, 1].
fn routing(rng: &mut Xs, tokens: usize) -> (Vec<i32>, Vec<f32>) {
    let mut idx = Vec::with_capacity(tokens * TOPK);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(TOPK);
        while row.len() < TOPK {
            let e = (rng.next() % EXPERTS as u64) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        idx.extend(row);
    }
    let w = (0..tokens * TOPK).map(|_| (rng.next() % 1024 + 1) as f32 / 1024.0).collect();
    (idx, w)
}

struct RankData {
    idx: Vec<i32>,
    w: Vec<f32>,
    x: Vec<u8>,
    d_x: CudaSlice<F8E4M3>,
    d_sf: CudaSlice<f32>,
    d_idx: CudaSlice<i32>,
    d_w: CudaSlice<f32>,
    tokens: usize,
}

fn rank_data(stream: &Arc<CudaStream>, rng: &mut Xs, tokens: usize) -> RankData {
    let (idx, w) = routing(rng, tokens);
    let x: Vec<u8> = (0..tokens * HIDDEN).map(|_| (rng.next() % 0x7f) as u8).collect();
    let sf: Vec<f32> = (0..HIDDEN / 128 * tokens.div_ceil(4) * 4).map(|_| (rng.next() % 64 + 1) as f32 / 64.0).collect();
    RankData {
        d_x: stream.clone_htod(&x.iter().map(|&b| F8E4M3::from_bits(b)).collect::<Vec<_>>()).expect("upload x"),
        d_sf: stream.clone_htod(&sf).expect("upload sf"),
        d_idx: stream.clone_htod(&idx).expect("upload idx"),
        d_w: stream.clone_htod(&w).expect("upload w"),
        idx,
        w,
        x,
        tokens,
    }
}

fn inputs(data: &[RankData]) -> Vec<RankInput<'_>> {
    data.iter()
        .map(|d| RankInput {
            x: Tokens::Fp8 { q: d.d_x.slice(..), sf: d.d_sf.slice(..) },
            topk_idx: d.d_idx.slice(..),
            topk_weights: d.d_w.slice(..),
            tokens: d.tokens,
            k: TOPK,
        })
        .collect()
}

/// y of rank `d`: a cheap pattern, exactly representable in bf16.
fn y_value(d: usize, row: usize, c: usize) -> f32 {
    ((d * 131 + row * 7 + c) % 17) as f32 / 8.0 - 1.0
}

fn normal(gpu: &mut GpuBench, c: &mut Criterion) {
    let mut group = c.benchmark_group("ep_normal");
    // Both transports a single GPU can run: SM kernels writing into peers' buffers, and copy
    // engines moving packed runs (the kernels only pack and unpack).
    for (ranks, transport) in [2, 4, 8].into_iter().flat_map(|r| [(r, Transport::Peer), (r, Transport::CopyEngine)]) {
        let tname = match transport {
            Transport::Peer => "peer",
            Transport::CopyEngine => "copy-engine",
            Transport::Nccl => "nccl",
        };
        let stream = gpu.stream.clone();
        let tokens = 4096;
        let mut rng = Xs(0x5eed + ranks as u64);
        let data: Vec<RankData> = (0..ranks).map(|_| rank_data(&stream, &mut rng, tokens)).collect();
        let pairs = ranks * tokens * TOPK;
        // Uniform routing: about tokens·top-k rows per rank; room for 50% imbalance.
        let mut shape = GroupShape::new(ranks, EXPERTS, HIDDEN, tokens, TOPK, Payload::Fp8);
        shape.ll_max_tokens = 0;
        shape.recv_rows = tokens * TOPK * 3 / 2 + EXPERTS / ranks * 128;
        shape.transport = transport;
        let mut ep = Group::new_virtual(&stream, shape).expect("group");
        ep.set_num_sms(SMS.min(gpu.device.info().sm_count as usize)).expect("SM budget");

        // Check once before timing: sources of every row, payload of sampled rows.
        let got = ep.dispatch(&inputs(&data)).expect("dispatch");
        let routings: Vec<Routing> = data.iter().map(|d| Routing { topk_idx: &d.idx, topk_weights: &d.w, tokens, k: TOPK }).collect();
        let want = dispatch(&routings, &EpConfig { ranks, num_experts: EXPERTS, m_align: 128 }).expect("reference");
        let mut where_is = std::collections::HashMap::new();
        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.rows, w.rows.len(), "R={ranks} rank {d}: row count differs from the reference; not timing a wrong kernel");
            let src = stream.clone_dtoh(&g.handle.src()).expect("download src");
            let (q, _) = g.x.fp8().expect("an FP8 group receives FP8 rows");
            let x = stream.clone_dtoh(q).expect("download x");
            for (row, s) in w.rows.iter().enumerate() {
                let want_src = s.map_or(-1, |s| ((s.src_rank as usize * tokens + s.token as usize) * TOPK + s.slot as usize) as i32);
                assert_eq!(src[row], want_src, "R={ranks} rank {d} row {row}: source differs; not timing a wrong kernel");
                if let Some(s) = s {
                    where_is.insert((s.src_rank, s.token, s.slot), (d, row));
                    if row % 97 == 0 {
                        let t = s.token as usize;
                        let want_x = &data[s.src_rank as usize].x[t * HIDDEN..(t + 1) * HIDDEN];
                        assert!(
                            x[row * HIDDEN..(row + 1) * HIDDEN].iter().map(|v| v.to_bits()).eq(want_x.iter().copied()),
                            "R={ranks}: payload differs"
                        );
                    }
                }
            }
        }
        let ys: Vec<CudaSlice<bf16>> = got
            .iter()
            .enumerate()
            .map(|(d, g)| {
                let y: Vec<bf16> = (0..g.rows * HIDDEN).map(|i| bf16::from_f32(y_value(d, i / HIDDEN, i % HIDDEN))).collect();
                stream.clone_htod(&y).expect("upload y")
            })
            .collect();
        let out = ep.combine(&ys, &got).expect("combine");
        let out0 = stream.clone_dtoh(&out[0]).expect("download combine");
        for t in (0..tokens).step_by(61) {
            for c in (0..HIDDEN).step_by(113) {
                let mut acc = 0.0f64;
                for j in 0..TOPK {
                    let (d, row) = where_is[&(0u32, t as u32, j as u32)];
                    acc += f64::from(data[0].w[t * TOPK + j]) * f64::from(y_value(d, row, c));
                }
                let g = f64::from(out0[t * HIDDEN + c].to_f32());
                assert!((g - acc).abs() <= acc.abs() / 128.0 + 1e-5, "R={ranks}: combine token {t} column {c}: {g} vs {acc}");
            }
        }
        ep.check().expect("device error");

        let sms = ep.num_sms();
        let dispatch_bytes = pairs * (HIDDEN + 4 * HIDDEN / 128);
        let shape_json = json!({"ranks": ranks, "tokens_per_rank": tokens, "hidden": HIDDEN, "experts": EXPERTS, "topk": TOPK, "sms": sms, "transport": tname});
        let ins = inputs(&data);
        // A dispatch must be combined before the next one: every round runs both, and times one.
        let mut round = |span: &Span<'_>, time_dispatch: bool| {
            span.one_of_two(
                &mut ep,
                time_dispatch,
                |ep| ep.dispatch(&ins).expect("dispatch"),
                |ep, got| {
                    ep.combine(&ys, &got).expect("combine");
                },
            )
        };
        group.throughput(Throughput::Bytes(dispatch_bytes as u64));
        group.bench_function(BenchmarkId::new(format!("dispatch_fp8_{tname}"), ranks), |b| {
            b.iter_custom(|iters| gpu.time_spans(iters, |s| round(s, true)))
        });
        let median_us = gpu.median_span_us(|s| round(s, true));
        let copy_us = gpu.copy_median_us(dispatch_bytes);
        gpu.record(Record {
            kernel: "ep_dispatch_fp8",
            case: format!("R{ranks}-{tokens}tok-{sms}sm-{tname}"),
            shape: shape_json.clone(),
            median_us,
            flops: None,
            bytes: Some(dispatch_bytes as f64),
            baseline: Some(("d2d_copy_same_bytes", copy_us)),
        });

        let combine_bytes = pairs * 2 * HIDDEN;
        group.throughput(Throughput::Bytes(combine_bytes as u64));
        group.bench_function(BenchmarkId::new(format!("combine_bf16_{tname}"), ranks), |b| {
            b.iter_custom(|iters| gpu.time_spans(iters, |s| round(s, false)))
        });
        let median_us = gpu.median_span_us(|s| round(s, false));
        let copy_us = gpu.copy_median_us(combine_bytes);
        gpu.record(Record {
            kernel: "ep_combine_bf16",
            case: format!("R{ranks}-{tokens}tok-{sms}sm-{tname}"),
            shape: shape_json,
            median_us,
            flops: None,
            bytes: Some(combine_bytes as f64),
            baseline: Some(("d2d_copy_same_bytes", copy_us)),
        });
    }
    group.finish();
}

fn low_latency(gpu: &mut GpuBench, c: &mut Criterion) {
    let mut group = c.benchmark_group("ep_low_latency");
    for ranks in [2, 4, 8] {
        let stream = gpu.stream.clone();
        let tokens = 128;
        let mut rng = Xs(0x1a7e + ranks as u64);
        let data: Vec<RankData> = (0..ranks).map(|_| rank_data(&stream, &mut rng, tokens)).collect();
        let mut shape = GroupShape::new(ranks, EXPERTS, HIDDEN, tokens, TOPK, Payload::Fp8);
        shape.recv_rows = 0;
        let mut ep = Group::new_virtual(&stream, shape).expect("group");
        ep.set_num_sms(SMS.min(gpu.device.info().sm_count as usize)).expect("SM budget");
        let ins = inputs(&data);
        let got = ep.dispatch_low_latency(&ins).expect("dispatch");
        let routings: Vec<Routing> = data.iter().map(|d| Routing { topk_idx: &d.idx, topk_weights: &d.w, tokens, k: TOPK }).collect();
        let want =
            deepkern::reference::ep::dispatch_low_latency(&routings, &EpConfig { ranks, num_experts: EXPERTS, m_align: 128 }, tokens)
                .expect("reference");
        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
            let masked = stream.clone_dtoh(&g.masked_m).expect("download masked_m");
            assert!(
                masked.iter().map(|&c| c as u32).eq(w.counts.iter().copied()),
                "R={ranks} rank {d}: counts differ; not timing a wrong kernel"
            );
        }
        let ys: Vec<CudaSlice<bf16>> = got.iter().map(|g| stream.alloc_zeros::<bf16>(g.handle.rows() * HIDDEN).expect("alloc y")).collect();
        ep.combine(&ys, &got).expect("combine");
        ep.check().expect("device error");

        let sms = ep.num_sms();
        let pairs = ranks * tokens * TOPK;
        let shape_json = json!({"ranks": ranks, "tokens_per_rank": tokens, "hidden": HIDDEN, "experts": EXPERTS, "topk": TOPK, "sms": sms});
        // A dispatch must be combined before the next one: every round runs both, and times one.
        let mut round = |span: &Span<'_>, time_dispatch: bool| {
            span.one_of_two(
                &mut ep,
                time_dispatch,
                |ep| ep.dispatch_low_latency(&ins).expect("dispatch"),
                |ep, got| {
                    ep.combine(&ys, &got).expect("combine");
                },
            )
        };
        group.bench_function(BenchmarkId::new("dispatch_fp8", ranks), |b| b.iter_custom(|iters| gpu.time_spans(iters, |s| round(s, true))));
        let median_us = gpu.median_span_us(|s| round(s, true));
        gpu.record(Record {
            kernel: "ep_ll_dispatch_fp8",
            case: format!("R{ranks}-{tokens}tok-{sms}sm"),
            shape: shape_json.clone(),
            median_us,
            flops: None,
            bytes: Some((pairs * (HIDDEN + 4 * HIDDEN / 128)) as f64),
            baseline: None,
        });
        group
            .bench_function(BenchmarkId::new("combine_bf16", ranks), |b| b.iter_custom(|iters| gpu.time_spans(iters, |s| round(s, false))));
        let median_us = gpu.median_span_us(|s| round(s, false));
        gpu.record(Record {
            kernel: "ep_ll_combine_bf16",
            case: format!("R{ranks}-{tokens}tok-{sms}sm"),
            shape: shape_json,
            median_us,
            flops: None,
            bytes: Some((pairs * 2 * HIDDEN) as f64),
            baseline: None,
        });
    }
    group.finish();
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10)
        .configure_from_args();
    normal(&mut gpu, &mut c);
    low_latency(&mut gpu, &mut c);
    c.final_summary();
}
