//! The expert-parallel MoE layer at DeepSeek-V3 sizes scaled to one GPU (hidden 7168, expert
//! intermediate 2048, 256 experts, top-8) on R ∈ {4, 8} virtual ranks, 4096 and 128 tokens per
//! rank: every schedule and its parts, timed in the same run.
//!
//! Per case (`moe_layer` lines, `case` = `R<r>-<tokens>tok-<what>`):
//! - `comm`: quantise + dispatch + combine alone (`moe::dispatch_stage`, `moe::combine_stage`);
//! - `compute`: the experts alone on all SMs (`moe::expert_stage` on already received rows);
//! - `seq`: `moe::forward`, every stage one after another;
//! - `overlap-peer`, `overlap-copy-engine`: `moe::forward_two_batch` with peer-transport and
//!   copy-engine-transport groups; their baseline is the lower bound max(T_comm, T_compute);
//! - `overlap-peer-arrivals`, `overlap-copy-engine-arrivals`: the same with the fine-grained
//!   hand-off (`Handoff::PerBlock`: the gate/up GEMM starts each tile as its 128 rows land).
//!   Expected before measuring: it hides the receive kernel's tail behind the first GEMM, so it
//!   should gain at most T_recv per micro-batch (the receive is a copy of the dispatched rows,
//!   a small part of T_comm), and lose where the GEMM's tiles wait on late blocks;
//! - `low-latency` (128 tokens): `moe::forward_low_latency`.
//!
//! Before timing, the sequential, overlapped and low-latency outputs are checked bit for bit
//! against each other, and sampled tokens against the f64 CPU reference (`reference::moe`), whose
//! cost is why every expert uses the same (randomly drawn) weights: the GEMMs still read each
//! expert's own copy, so the memory traffic is that of distinct experts.

#[path = "harness/mod.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use deepkern::check::calc_diff;
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::ep::{Group, GroupShape, Payload, Transport};
use deepkern::gemm::{Fp8Weights, GemmOptions};
use deepkern::moe::{
    LayerInput, LocalExperts, combine_stage, dispatch_stage, expert_stage, forward, forward_low_latency, forward_two_batch,
    forward_two_batch_with,
};
use deepkern::overlap::Handoff;
use deepkern::reference::ep::Routing;
use deepkern::reference::moe::{ExpertRef, forward as reference_forward};
use deepkern::reference::quant::{QuantizedBlocks, ScaleFormat, per_block};
use deepkern::{F8E4M3, bf16};
use harness::{GpuBench, Record, Xs};
use serde_json::json;

const HIDDEN: usize = 7168;
const INTER: usize = 2048;
const EXPERTS: usize = 256;
const TOPK: usize = 8;
const SMS: usize = 24;

struct Rank {
    x: Vec<f32>,
    w: Vec<f32>,
    d_x: CudaSlice<bf16>,
    d_idx: CudaSlice<i32>,
    d_w: CudaSlice<f32>,
    w13: (CudaSlice<F8E4M3>, CudaSlice<f32>),
    w2: (CudaSlice<F8E4M3>, CudaSlice<f32>),
}

/// `n` device copies of one quantised weight, back to back.
fn replicate(stream: &Arc<CudaStream>, w: &QuantizedBlocks, n: usize) -> (CudaSlice<F8E4M3>, CudaSlice<f32>) {
    let q: Vec<F8E4M3> = w.q.iter().map(|&v| F8E4M3::from_bits(v)).collect();
    let one_q = stream.clone_htod(&q).expect("upload weight");
    let one_sf = stream.clone_htod(&w.scales).expect("upload scales");
    let mut all_q = stream.alloc_zeros::<F8E4M3>(n * q.len()).expect("alloc weights");
    let mut all_sf = stream.alloc_zeros::<f32>(n * w.scales.len()).expect("alloc scales");
    for i in 0..n {
        stream.memcpy_dtod(&one_q, &mut all_q.slice_mut(i * q.len()..(i + 1) * q.len())).expect("copy weight");
        stream.memcpy_dtod(&one_sf, &mut all_sf.slice_mut(i * w.scales.len()..(i + 1) * w.scales.len())).expect("copy scales");
    }
    (all_q, all_sf)
}

fn ranks_data(
    stream: &Arc<CudaStream>,
    rng: &mut Xs,
    ranks: usize,
    tokens: usize,
    w13: &QuantizedBlocks,
    w2: &QuantizedBlocks,
) -> Vec<Rank> {
    let el = EXPERTS / ranks;
    (0..ranks)
        .map(|_| {
            let x: Vec<f32> = (0..tokens * HIDDEN).map(|_| bf16::from_f32(rng.f(-2.0, 2.0)).to_f32()).collect();
            let mut idx = Vec::with_capacity(tokens * TOPK);
            for _ in 0..tokens {
                let mut row: Vec<i32> = Vec::new();
                while row.len() < TOPK {
                    let e = (rng.f(0.0, 1.0) * EXPERTS as f32) as i32 % EXPERTS as i32;
                    if !row.contains(&e) {
                        row.push(e);
                    }
                }
                idx.extend(row);
            }
            let w: Vec<f32> = (0..tokens * TOPK).map(|_| rng.f(0.05, 1.0)).collect();
            Rank {
                d_x: stream.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).expect("upload x"),
                d_idx: stream.clone_htod(&idx).expect("upload idx"),
                d_w: stream.clone_htod(&w).expect("upload weights"),
                w13: replicate(stream, w13, el),
                w2: replicate(stream, w2, el),
                x,
                w,
            }
        })
        .collect()
}

fn views(data: &[Rank], tokens: usize) -> (Vec<LocalExperts<'_>>, Vec<LayerInput<'_>>) {
    let experts = data
        .iter()
        .map(|d| LocalExperts {
            w13: Fp8Weights { q: d.w13.0.slice(..), sf: d.w13.1.slice(..) },
            w2: Fp8Weights { q: d.w2.0.slice(..), sf: d.w2.1.slice(..) },
        })
        .collect();
    let inputs = data
        .iter()
        .map(|d| LayerInput { x: d.d_x.slice(..), topk_idx: d.d_idx.slice(..), topk_weights: d.d_w.slice(..), tokens, k: TOPK })
        .collect();
    (experts, inputs)
}

/// A group for `tokens` per rank with receive room for 1.5x the uniform load.
fn group(stream: &Arc<CudaStream>, ranks: usize, tokens: usize, ll: usize, transport: Transport) -> Group {
    let mut shape = GroupShape::new(ranks, EXPERTS, HIDDEN, tokens, TOPK, Payload::Fp8);
    shape.ll_max_tokens = ll;
    shape.recv_rows = tokens * TOPK * 3 / 2 + EXPERTS / ranks * 128;
    shape.transport = transport;
    let mut g = Group::new_virtual(stream, shape).expect("group");
    g.set_num_sms(SMS).expect("SM budget");
    g
}

fn download(stream: &Arc<CudaStream>, outs: &[CudaSlice<bf16>]) -> Vec<Vec<u16>> {
    outs.iter().map(|o| stream.clone_dtoh(o).expect("download").iter().map(|v| v.to_bits()).collect()).collect()
}

fn case(gpu: &mut GpuBench, c: &mut Criterion, ranks: usize, tokens: usize, w13: &QuantizedBlocks, w2: &QuantizedBlocks) {
    let stream = gpu.stream.clone();
    let compute = stream.context().new_stream().expect("compute stream");
    let mut rng = Xs(0x3e3e + (ranks * tokens) as u64);
    let data = ranks_data(&stream, &mut rng, ranks, tokens, w13, w2);
    let (experts, inputs) = views(&data, tokens);
    let ll = if tokens <= 128 { tokens } else { 0 };
    let mut seq = group(&stream, ranks, tokens, ll, Transport::Peer);
    let half = tokens.div_ceil(2);
    let mut pair = [Transport::Peer, Transport::CopyEngine].map(|t| [group(&stream, ranks, half, 0, t), group(&stream, ranks, half, 0, t)]);

    // Check: every schedule gives the same bits; sampled tokens match the f64 reference.
    let want = download(&stream, &forward(&mut seq, INTER, &experts, &inputs).expect("forward"));
    // The per-block hand-off is checked and timed last in each case: if its device-side waits
    // ever trap, the context is lost, and everything else of the case is recorded by then.
    let check_pairs = |pair: &mut [[Group; 2]; 2], handoff: Handoff| {
        for p in pair.iter_mut() {
            let [a, b] = p;
            let got = forward_two_batch_with([a, b], &compute, INTER, &experts, &inputs, handoff).expect("two-batch");
            compute.synchronize().expect("sync");
            assert!(
                download(&stream, &got) == want,
                "R={ranks} T={tokens}: the overlapped layer ({handoff:?}) differs from the sequential one"
            );
        }
    };
    check_pairs(&mut pair, Handoff::AfterDispatch);
    if ll > 0 {
        let got = forward_low_latency(&mut seq, INTER, &experts, &inputs).expect("low latency");
        assert!(download(&stream, &got) == want, "R={ranks} T={tokens}: the low-latency layer differs from the sequential one");
    }
    let refs = [ExpertRef { w13, w2 }];
    for (r, t) in [(0, 0), (ranks - 1, tokens - 1)] {
        let d = &data[r];
        // Every expert has the same weights: route to expert 0 of the one-expert reference.
        let idx = vec![0i32; TOPK];
        let routing = Routing { topk_idx: &idx, topk_weights: &d.w[t * TOPK..(t + 1) * TOPK], tokens: 1, k: TOPK };
        let out = reference_forward(&d.x[t * HIDDEN..(t + 1) * HIDDEN], HIDDEN, INTER, &routing, &refs, ScaleFormat::F32);
        let got: Vec<f64> = want[r][t * HIDDEN..(t + 1) * HIDDEN].iter().map(|&b| f64::from(bf16::from_bits(b).to_f32())).collect();
        let diff = calc_diff(&got, &out);
        assert!(diff < 1e-3, "R={ranks} T={tokens}: token {t} of rank {r} differs from the reference (calc_diff {diff:e})");
    }
    seq.check().expect("device error");

    let shape = json!({"ranks": ranks, "tokens_per_rank": tokens, "hidden": HIDDEN, "inter": INTER, "experts": EXPERTS, "topk": TOPK, "comm_sms": SMS});
    let flops = 2.0 * (ranks * tokens * TOPK) as f64 * (3 * HIDDEN * INTER) as f64;
    let record = |gpu: &GpuBench, what: &str, median_us: f64, baseline: Option<(&'static str, f64)>| {
        gpu.record(Record {
            kernel: "moe_layer",
            case: format!("R{ranks}-{tokens}tok-{what}"),
            shape: shape.clone(),
            median_us,
            flops: Some(flops),
            bytes: None,
            baseline,
        });
    };
    let mut bench = c.benchmark_group(format!("moe_R{ranks}_{tokens}tok"));

    // The parts: communication alone, computation alone.
    let received = dispatch_stage(&mut seq, &inputs).expect("dispatch");
    let gshape = *seq.shape();
    let ys = expert_stage(&stream, &gshape, INTER, GemmOptions::default(), &experts, &received).expect("experts");
    let mut run_comm = |_: &Arc<CudaStream>| {
        let r = dispatch_stage(&mut seq, &inputs).expect("dispatch");
        combine_stage(&mut seq, &ys, &r).expect("combine");
    };
    let t_comm = gpu.median_us(&mut run_comm);
    record(gpu, "comm", t_comm, None);
    let mut run_compute = |s: &Arc<CudaStream>| {
        expert_stage(s, &gshape, INTER, GemmOptions::default(), &experts, &received).expect("experts");
    };
    let t_compute = gpu.median_us(&mut run_compute);
    record(gpu, "compute", t_compute, None);
    let bound = t_comm.max(t_compute);

    let mut run_seq = |_: &Arc<CudaStream>| {
        forward(&mut seq, INTER, &experts, &inputs).expect("forward");
    };
    bench.bench_function(BenchmarkId::new("seq", ranks), |b| b.iter_custom(|n| gpu.time(n, &mut run_seq)));
    let t_seq = gpu.median_us(&mut run_seq);
    record(gpu, "seq", t_seq, Some(("max_comm_compute", bound)));
    for (p, name) in pair.iter_mut().zip(["overlap-peer", "overlap-copy-engine"]) {
        let [a, b] = p;
        // The last stage of the schedule runs on the groups' stream (the timed one), after it
        // waited for the compute stream: the events bracket the whole layer.
        let mut run = |_: &Arc<CudaStream>| {
            forward_two_batch([&mut *a, &mut *b], &compute, INTER, &experts, &inputs).expect("two-batch");
        };
        bench.bench_function(BenchmarkId::new(name, ranks), |bb| bb.iter_custom(|n| gpu.time(n, &mut run)));
        let t = gpu.median_us(&mut run);
        record(gpu, name, t, Some(("max_comm_compute", bound)));
        eprintln!("R={ranks} T={tokens} {name}: {:.0} us, {:.2}x of the bound, {:.2}x faster than sequential", t, t / bound, t_seq / t);
    }
    if ll > 0 {
        let mut run_ll = |_: &Arc<CudaStream>| {
            forward_low_latency(&mut seq, INTER, &experts, &inputs).expect("low latency");
        };
        bench.bench_function(BenchmarkId::new("low-latency", ranks), |b| b.iter_custom(|n| gpu.time(n, &mut run_ll)));
        let t = gpu.median_us(&mut run_ll);
        record(gpu, "low-latency", t, Some(("max_comm_compute", bound)));
    }
    check_pairs(&mut pair, Handoff::PerBlock);
    for (p, name) in pair.iter_mut().zip(["overlap-peer-arrivals", "overlap-copy-engine-arrivals"]) {
        let [a, b] = p;
        let mut run = |_: &Arc<CudaStream>| {
            forward_two_batch_with([&mut *a, &mut *b], &compute, INTER, &experts, &inputs, Handoff::PerBlock).expect("two-batch");
        };
        bench.bench_function(BenchmarkId::new(name, ranks), |bb| bb.iter_custom(|n| gpu.time(n, &mut run)));
        let t = gpu.median_us(&mut run);
        record(gpu, name, t, Some(("max_comm_compute", bound)));
        eprintln!("R={ranks} T={tokens} {name}: {:.0} us, {:.2}x of the bound, {:.2}x faster than sequential", t, t / bound, t_seq / t);
    }
    bench.finish();
    for p in &mut pair {
        p[0].check().expect("device error");
        p[1].check().expect("device error");
    }
    seq.check().expect("device error");
}

fn main() {
    let Some(mut gpu) = GpuBench::open() else { return };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10)
        .configure_from_args();
    let mut rng = Xs(0x77);
    let mut weight = |rows: usize, cols: usize| {
        per_block(&(0..rows * cols).map(|_| bf16::from_f32(rng.f(-0.05, 0.05)).to_f32()).collect::<Vec<_>>(), rows, cols, ScaleFormat::F32)
    };
    let (w13, w2) = (weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER));
    for (ranks, tokens) in [(4, 4096), (8, 4096), (4, 128), (8, 128)] {
        case(&mut gpu, &mut c, ranks, tokens, &w13, &w2);
    }
    c.final_summary();
}
