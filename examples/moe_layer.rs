//! An expert-parallel MoE layer on R virtual ranks of one GPU, built from the crate's kernels:
//! quantise, FP8 dispatch, grouped GEMM (gate | up), fused SwiGLU re-quantise, grouped GEMM
//! (down), combine.
//!
//! ```text
//! cargo run --release --example moe_layer
//! ```
//!
//! 1. A small layer with random weights and routing is checked against the CPU reference
//!    (`reference::moe`: the same quantisation steps, f64 GEMMs).
//! 2. A DeepSeek-V3-sized layer scaled to one GPU (hidden 7168, intermediate 2048, 256 experts,
//!    top-8, 4 ranks) is timed (wall clock, host synchronisation included): each stage alone, the
//!    sequential schedule, and the two-micro-batch overlap with peer-transport and copy-engine
//!    groups, each with both hand-offs (after the whole dispatch; per 128-row block through
//!    arrival counters), with the overlap efficiency max(T_comm, T_compute) / T_overlap. The
//!    GPU-timed figures are `cargo bench --bench moe` (bench-results).
//!
//! Without a Hopper GPU it says so and runs the CPU reference part only.

use std::sync::Arc;
use std::time::Instant;

use deepkern::check::calc_diff;
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::ep::{Group, GroupShape, Payload, Transport};
use deepkern::gemm::{Fp8Weights, GemmOptions};
use deepkern::moe::{LayerInput, LocalExperts, combine_stage, dispatch_stage, expert_stage, forward, forward_two_batch_with};
use deepkern::overlap::Handoff;
use deepkern::reference::ep::Routing;
use deepkern::reference::moe::{ExpertRef, forward as reference_forward};
use deepkern::reference::quant::{QuantizedBlocks, ScaleFormat, per_block};
use deepkern::{Device, F8E4M3, bf16};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// xorshift, so the example needs no generator crate.
struct Xs(u64);
impl Xs {
    fn f(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn expert(&mut self, n: usize) -> i32 {
        (self.f(0.0, 1.0) * n as f32) as i32 % n as i32
    }
}

struct Layer {
    hidden: usize,
    inter: usize,
    experts: usize,
    k: usize,
    ranks: usize,
    tokens: usize,
}

/// Distinct top-k experts per token, weights in (0, 1].
fn routing(rng: &mut Xs, l: &Layer) -> (Vec<i32>, Vec<f32>) {
    let mut idx = Vec::with_capacity(l.tokens * l.k);
    for _ in 0..l.tokens {
        let mut row: Vec<i32> = Vec::new();
        while row.len() < l.k {
            let e = rng.expert(l.experts);
            if !row.contains(&e) {
                row.push(e);
            }
        }
        idx.extend(row);
    }
    (idx, (0..l.tokens * l.k).map(|_| rng.f(0.05, 1.0)).collect())
}

struct RankData {
    x: Vec<f32>,
    idx: Vec<i32>,
    w: Vec<f32>,
    d_x: CudaSlice<bf16>,
    d_idx: CudaSlice<i32>,
    d_w: CudaSlice<f32>,
    w13: (CudaSlice<F8E4M3>, CudaSlice<f32>),
    w2: (CudaSlice<F8E4M3>, CudaSlice<f32>),
}

/// Device copies of quantised experts `first .. first + n`, back to back (`pick` maps a local
/// index to the expert whose weights to use, so a large layer can reuse a few).
fn upload_experts(
    stream: &Arc<CudaStream>,
    all: &[QuantizedBlocks],
    n: usize,
    pick: impl Fn(usize) -> usize,
) -> Res<(CudaSlice<F8E4M3>, CudaSlice<f32>)> {
    let q: Vec<F8E4M3> = (0..n).flat_map(|i| all[pick(i)].q.iter().map(|&v| F8E4M3::from_bits(v))).collect();
    let sf: Vec<f32> = (0..n).flat_map(|i| all[pick(i)].scales.iter().copied()).collect();
    Ok((stream.clone_htod(&q)?, stream.clone_htod(&sf)?))
}

fn random_experts(rng: &mut Xs, n: usize, l: &Layer) -> (Vec<QuantizedBlocks>, Vec<QuantizedBlocks>) {
    let mut w = |rows: usize, cols: usize| {
        per_block(&(0..rows * cols).map(|_| bf16::from_f32(rng.f(-0.05, 0.05)).to_f32()).collect::<Vec<_>>(), rows, cols, ScaleFormat::F32)
    };
    let w13 = (0..n).map(|_| w(2 * l.inter, l.hidden)).collect();
    let w2 = (0..n).map(|_| w(l.hidden, l.inter)).collect();
    (w13, w2)
}

fn rank_data(
    stream: &Arc<CudaStream>,
    rng: &mut Xs,
    l: &Layer,
    w13: &[QuantizedBlocks],
    w2: &[QuantizedBlocks],
    r: usize,
) -> Res<RankData> {
    let el = l.experts / l.ranks;
    let x: Vec<f32> = (0..l.tokens * l.hidden).map(|_| bf16::from_f32(rng.f(-2.0, 2.0)).to_f32()).collect();
    let (idx, w) = routing(rng, l);
    let n = w13.len();
    Ok(RankData {
        d_x: stream.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())?,
        d_idx: stream.clone_htod(&idx)?,
        d_w: stream.clone_htod(&w)?,
        w13: upload_experts(stream, w13, el, |i| (r * el + i) % n)?,
        w2: upload_experts(stream, w2, el, |i| (r * el + i) % n)?,
        x,
        idx,
        w,
    })
}

fn views<'a>(data: &'a [RankData], l: &Layer) -> (Vec<LocalExperts<'a>>, Vec<LayerInput<'a>>) {
    let experts = data
        .iter()
        .map(|d| LocalExperts {
            w13: Fp8Weights { q: d.w13.0.slice(..), sf: d.w13.1.slice(..) },
            w2: Fp8Weights { q: d.w2.0.slice(..), sf: d.w2.1.slice(..) },
        })
        .collect();
    let inputs = data
        .iter()
        .map(|d| LayerInput { x: d.d_x.slice(..), topk_idx: d.d_idx.slice(..), topk_weights: d.d_w.slice(..), tokens: l.tokens, k: l.k })
        .collect();
    (experts, inputs)
}

/// Median wall time of `f` over `n` runs (after one warm-up), in ms, the stream synchronised.
fn time(stream: &Arc<CudaStream>, n: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    stream.synchronize()?;
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        stream.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[n / 2])
}

fn main() -> Res<()> {
    let small = Layer { hidden: 512, inter: 256, experts: 16, k: 4, ranks: 4, tokens: 48 };
    let mut rng = Xs(0x5eed);
    let (w13, w2) = random_experts(&mut rng, small.experts, &small);
    let refs: Vec<ExpertRef> = w13.iter().zip(&w2).map(|(a, b)| ExpertRef { w13: a, w2: b }).collect();
    let device = match Device::new(0).and_then(|d| d.check_supported().map(|()| d)) {
        Ok(d) => d,
        Err(e) => {
            let x: Vec<f32> = (0..small.tokens * small.hidden).map(|_| bf16::from_f32(rng.f(-2.0, 2.0)).to_f32()).collect();
            let (idx, w) = routing(&mut rng, &small);
            let routing = Routing { topk_idx: &idx, topk_weights: &w, tokens: small.tokens, k: small.k };
            let out = reference_forward(&x, small.hidden, small.inter, &routing, &refs, ScaleFormat::F32);
            println!("CPU reference: {} tokens through {} experts, output[0][0..4] = {:?}", small.tokens, small.experts, &out[..4]);
            println!("{} part skipped: {e}", gpu());
            return Ok(());
        }
    };
    let stream = device.default_stream();
    println!("{}: {} ({} SMs)", gpu(), device.info().name, device.info().sm_count);

    // 1. Check against the CPU reference.
    let data: Vec<RankData> = (0..small.ranks).map(|r| rank_data(&stream, &mut rng, &small, &w13, &w2, r)).collect::<Res<_>>()?;
    let (experts, inputs) = views(&data, &small);
    let mut group =
        Group::new_virtual(&stream, GroupShape::new(small.ranks, small.experts, small.hidden, small.tokens, small.k, Payload::Fp8))?;
    let outs = forward(&mut group, small.inter, &experts, &inputs)?;
    group.check()?;
    let mut worst = 0.0f64;
    for (d, out) in data.iter().zip(&outs) {
        let got: Vec<f32> = stream.clone_dtoh(out)?.iter().map(|v| v.to_f32()).collect();
        let routing = Routing { topk_idx: &d.idx, topk_weights: &d.w, tokens: small.tokens, k: small.k };
        let want = reference_forward(&d.x, small.hidden, small.inter, &routing, &refs, ScaleFormat::F32);
        worst = worst.max(calc_diff(&got, &want));
    }
    println!(
        "check: {} ranks, worst calc_diff against the CPU reference {worst:.2e} ({})",
        small.ranks,
        if worst < 1e-3 { "ok" } else { "FAILED" }
    );
    if worst >= 1e-3 {
        return Err("the layer disagrees with the CPU reference".into());
    }

    if deepkern::simulated() {
        println!("timings skipped: a simulated build measures no GPU time");
        return Ok(());
    }

    // 2. Time a DeepSeek-V3-sized layer (8 distinct experts' weights reused across the 256).
    let big = Layer { hidden: 7168, inter: 2048, experts: 256, k: 8, ranks: 4, tokens: 1024 };
    let (w13, w2) = random_experts(&mut rng, 8, &big);
    let data: Vec<RankData> = (0..big.ranks).map(|r| rank_data(&stream, &mut rng, &big, &w13, &w2, r)).collect::<Res<_>>()?;
    let (experts, inputs) = views(&data, &big);
    let shape = GroupShape { ll_max_tokens: 0, ..GroupShape::new(big.ranks, big.experts, big.hidden, big.tokens, big.k, Payload::Fp8) };
    let half = GroupShape { max_tokens: big.tokens.div_ceil(2), ..shape };
    let mut seq = Group::new_virtual(&stream, shape)?;
    let compute = device.new_stream()?;
    // Per stage, on the sequential group (each stage timed alone, the stream synchronised).
    let received = dispatch_stage(&mut seq, &inputs)?;
    let ys = expert_stage(&stream, &shape, big.inter, GemmOptions::default(), &experts, &received)?;
    let t_dispatch = time(&stream, 5, || dispatch_stage(&mut seq, &inputs).map(|_| ()).map_err(Into::into))?;
    let t_experts = time(&stream, 5, || {
        expert_stage(&stream, &shape, big.inter, GemmOptions::default(), &experts, &received).map(|_| ()).map_err(Into::into)
    })?;
    let t_combine = time(&stream, 5, || combine_stage(&mut seq, &ys, &received).map(|_| ()).map_err(Into::into))?;
    let t_seq = time(&stream, 5, || forward(&mut seq, big.inter, &experts, &inputs).map(|_| ()).map_err(Into::into))?;
    let mut t_overlap = Vec::new();
    for transport in [Transport::Peer, Transport::CopyEngine] {
        for handoff in [Handoff::AfterDispatch, Handoff::PerBlock] {
            let mut ga = Group::new_virtual(&stream, GroupShape { transport, ..half })?;
            let mut gb = Group::new_virtual(&stream, GroupShape { transport, ..half })?;
            let t = time(&stream, 5, || {
                let out = forward_two_batch_with([&mut ga, &mut gb], &compute, big.inter, &experts, &inputs, handoff)?;
                compute.synchronize()?;
                drop(out);
                Ok(())
            })?;
            ga.check()?;
            gb.check()?;
            t_overlap.push((transport, handoff, t));
        }
    }
    seq.check()?;
    let (t_comm, t_compute) = (t_dispatch + t_combine, t_experts);
    let bound = t_comm.max(t_compute);
    println!();
    println!(
        "| layer (R={}, {} tokens/rank, hidden {}, inter {}, {} experts, top-{}; wall clock) | ms |",
        big.ranks, big.tokens, big.hidden, big.inter, big.experts, big.k
    );
    println!("|---|---:|");
    println!("| quantise + dispatch | {t_dispatch:.3} |");
    println!("| experts: GEMM, SwiGLU, GEMM | {t_experts:.3} |");
    println!("| combine | {t_combine:.3} |");
    println!("| T_comm = dispatch + combine | {t_comm:.3} |");
    println!("| lower bound max(T_comm, T_compute) | {bound:.3} |");
    println!("| sequential layer | {t_seq:.3} |");
    for (transport, handoff, t) in &t_overlap {
        println!(
            "| two-micro-batch overlap, {transport:?} transport, hand-off {handoff:?} | {t:.3} ({:.2}x faster, overlap efficiency {:.0}%) |",
            t_seq / t,
            100.0 * bound / t
        );
    }
    Ok(())
}

/// "GPU", or "simulated GPU" in a simulated build (docs/simulator.md): no simulated result passes
/// for a GPU one.
fn gpu() -> &'static str {
    if deepkern::simulated() { "simulated GPU" } else { "GPU" }
}
