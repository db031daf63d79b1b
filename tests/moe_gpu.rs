//! The expert-parallel MoE layer (`moe::forward`) on virtual ranks against the CPU reference
//! (`reference::moe::forward`: same quantisation steps, f64 GEMMs). What each test proves:
//! - `layer_matches_reference`: R in {1, 2, 4}, random weights and routing (with -1 slots and a
//!   rank without tokens): calc_diff < 1e-3 per rank, no NaN.
//! - `two_batch_is_bit_identical`: the two-micro-batch overlapped schedule (communication and
//!   experts on two streams) gives the sequential schedule's bytes, on fresh random inputs, five
//!   times over (race hunting), with both hand-offs (after the whole dispatch; per 128-row block
//!   through arrival counters, the gate/up GEMM running while the receive still writes) and both
//!   transports (peer, copy engine).
//! - `low_latency_equals_normal`: the decode variant (low-latency dispatch, masked GEMMs) gives
//!   the normal layer's bytes for every token.
//! - `layer_rejects_bad_input`: weights of the wrong shape, a bf16 group, a bad intermediate size,
//!   expert segments aligned to fewer rows than the grouped GEMM's 128-row tile (`m_align = 64`).

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::check::calc_diff;
use deepkern::cudarc::driver::CudaSlice;
use deepkern::ep::{Group, GroupShape, Payload, Transport};
use deepkern::gemm::{Fp8Weights, GemmOptions};
use deepkern::moe::{
    LayerInput, LocalExperts, dispatch_stage, expert_stage, forward, forward_low_latency, forward_two_batch, forward_two_batch_with,
};
use deepkern::overlap::Handoff;
use deepkern::reference::ep::Routing;
use deepkern::reference::moe::{ExpertRef, forward as reference_forward};
use deepkern::reference::quant::{QuantizedBlocks, ScaleFormat, per_block};
use deepkern::{Error, F8E4M3, bf16};
use rand::Rng;
use rand::rngs::StdRng;

fn main() {
    common::run(vec![
        ("layer_matches_reference", layer_matches_reference),
        ("two_batch_is_bit_identical", two_batch_is_bit_identical),
        ("low_latency_equals_normal", low_latency_equals_normal),
        ("layer_rejects_bad_input", layer_rejects_bad_input),
    ]);
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

struct Experts {
    w13: Vec<QuantizedBlocks>,
    w2: Vec<QuantizedBlocks>,
}

fn experts(rng: &mut StdRng, n: usize, hidden: usize, inter: usize) -> Experts {
    let mut random = |rows: usize, cols: usize, s: f32| {
        per_block(
            &(0..rows * cols).map(|_| bf16::from_f32(rng.random_range(-s..s)).to_f32()).collect::<Vec<_>>(),
            rows,
            cols,
            ScaleFormat::F32,
        )
    };
    let w13 = (0..n).map(|_| random(2 * inter, hidden, 0.1)).collect();
    let w2 = (0..n).map(|_| random(hidden, inter, 0.1)).collect();
    Experts { w13, w2 }
}

/// Device copies of rank `r`'s experts, back to back.
fn upload(
    stream: &std::sync::Arc<deepkern::cudarc::driver::CudaStream>,
    all: &[QuantizedBlocks],
    r: usize,
    el: usize,
) -> (CudaSlice<F8E4M3>, CudaSlice<f32>) {
    let mine = &all[r * el..(r + 1) * el];
    let q: Vec<F8E4M3> = mine.iter().flat_map(|b| b.q.iter().map(|&v| F8E4M3::from_bits(v))).collect();
    let sf: Vec<f32> = mine.iter().flat_map(|b| b.scales.iter().copied()).collect();
    (stream.clone_htod(&q).unwrap(), stream.clone_htod(&sf).unwrap())
}

/// Device weights of one rank: (w13 q, scales), (w2 q, scales).
type DevExperts = ((CudaSlice<F8E4M3>, CudaSlice<f32>), (CudaSlice<F8E4M3>, CudaSlice<f32>));
/// Device tokens of one rank: x, topk_idx, topk_weights (at least one element each).
type DevTokens = (CudaSlice<bf16>, CudaSlice<i32>, CudaSlice<f32>);

fn local_experts(dev_w: &[DevExperts]) -> Vec<LocalExperts<'_>> {
    dev_w
        .iter()
        .map(|((q13, s13), (q2, s2))| LocalExperts {
            w13: Fp8Weights { q: q13.slice(..), sf: s13.slice(..) },
            w2: Fp8Weights { q: q2.slice(..), sf: s2.slice(..) },
        })
        .collect()
}

/// The layer inputs of `tokens[r]` tokens per rank (the buffers may hold a padding element).
fn layer_inputs<'a>(dev_x: &'a [DevTokens], tokens: &[usize], hidden: usize, k: usize) -> Vec<LayerInput<'a>> {
    dev_x
        .iter()
        .zip(tokens)
        .map(|((x, i, w), &t)| LayerInput {
            x: x.slice(..t * hidden),
            topk_idx: i.slice(..t * k),
            topk_weights: w.slice(..t * k),
            tokens: t,
            k,
        })
        .collect()
}

fn routing(rng: &mut StdRng, tokens: usize, k: usize, experts: usize) -> (Vec<i32>, Vec<f32>) {
    let mut idx = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::new();
        for _ in 0..k {
            let e = if rng.random_ratio(1, 6) { -1 } else { rng.random_range(0..experts as i32) };
            row.push(if e >= 0 && row.contains(&e) { -1 } else { e });
        }
        idx.extend(row);
    }
    let w = (0..tokens * k).map(|_| rng.random_range(0.05f32..1.0)).collect();
    (idx, w)
}

fn layer_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("layer_matches_reference");
    let stream = gpu.stream();
    let (hidden, inter, num_experts, k) = (256, 256, 8, 2);
    for tokens in [vec![40], vec![33, 0], vec![64, 5, 17, 64]] {
        let ranks = tokens.len();
        let el = num_experts / ranks;
        let ex = experts(&mut rng, num_experts, hidden, inter);
        let mut group = Group::new_virtual(&stream, GroupShape::new(ranks, num_experts, hidden, 64, k, Payload::Fp8)).map_err(err)?;
        let xs: Vec<Vec<f32>> =
            tokens.iter().map(|&t| (0..t * hidden).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_f32()).collect()).collect();
        let routes: Vec<(Vec<i32>, Vec<f32>)> = tokens.iter().map(|&t| routing(&mut rng, t, k, num_experts)).collect();
        let dev_w: Vec<_> = (0..ranks).map(|r| (upload(&stream, &ex.w13, r, el), upload(&stream, &ex.w2, r, el))).collect();
        let dev_x: Vec<_> = xs
            .iter()
            .zip(&routes)
            .map(|(x, (i, w))| {
                let pad = |v: Vec<bf16>| if v.is_empty() { vec![bf16::ZERO] } else { v };
                (
                    stream.clone_htod(&pad(x.iter().map(|&v| bf16::from_f32(v)).collect())).unwrap(),
                    stream.clone_htod(&if i.is_empty() { vec![-1] } else { i.clone() }).unwrap(),
                    stream.clone_htod(&if w.is_empty() { vec![0.0] } else { w.clone() }).unwrap(),
                )
            })
            .collect();
        let local = local_experts(&dev_w);
        let inputs = layer_inputs(&dev_x, &tokens, hidden, k);
        let outs = forward(&mut group, inter, &local, &inputs).map_err(err)?;
        group.check().map_err(err)?;
        let refs: Vec<ExpertRef> = ex.w13.iter().zip(&ex.w2).map(|(a, b)| ExpertRef { w13: a, w2: b }).collect();
        for (r, out) in outs.iter().enumerate() {
            let got: Vec<f32> = stream.clone_dtoh(out).map_err(err)?[..tokens[r] * hidden].iter().map(|v| v.to_f32()).collect();
            let (i, w) = &routes[r];
            let want = reference_forward(
                &xs[r],
                hidden,
                inter,
                &Routing { topk_idx: i, topk_weights: w, tokens: tokens[r], k },
                &refs,
                ScaleFormat::F32,
            );
            ensure(got.iter().all(|v| !v.is_nan()), || format!("R={ranks} rank {r}: NaN in the output"))?;
            let diff = calc_diff(&got, &want);
            ensure(diff < 1e-3, || format!("R={ranks} rank {r}: calc_diff {diff:.3e} >= 1e-3"))?;
        }
    }
    Ok(())
}

fn layer_rejects_bad_input(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let (hidden, inter) = (256, 256);
    let mut group = Group::new_virtual(&stream, GroupShape::new(1, 2, hidden, 8, 2, Payload::Fp8)).map_err(err)?;
    let q13 = stream.alloc_zeros::<F8E4M3>(2 * 2 * inter * hidden).unwrap();
    let s13 = stream.alloc_zeros::<f32>(2 * 4 * 2).unwrap();
    let q2 = stream.alloc_zeros::<F8E4M3>(2 * hidden * inter - 1).unwrap();
    let s2 = stream.alloc_zeros::<f32>(2 * 2 * 2).unwrap();
    let x = stream.alloc_zeros::<bf16>(8 * hidden).unwrap();
    let idx = stream.clone_htod(&[0i32; 16]).unwrap();
    let w = stream.alloc_zeros::<f32>(16).unwrap();
    let inputs = [LayerInput { x: x.slice(..), topk_idx: idx.slice(..), topk_weights: w.slice(..), tokens: 8, k: 2 }];
    let experts =
        [LocalExperts { w13: Fp8Weights { q: q13.slice(..), sf: s13.slice(..) }, w2: Fp8Weights { q: q2.slice(..), sf: s2.slice(..) } }];
    let arg = |r: Result<Vec<CudaSlice<bf16>>, Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {:?}", other.map(|v| v.len()))),
    };
    ensure(arg(forward(&mut group, inter, &experts, &inputs))? == "w2", || "a short w2 accepted".into())?;
    ensure(arg(forward(&mut group, 200, &experts, &inputs))? == "inter", || "inter = 200 accepted".into())?;
    let mut bf = Group::new_virtual(&stream, GroupShape::new(1, 2, hidden, 8, 2, Payload::Bf16)).map_err(err)?;
    ensure(arg(forward(&mut bf, inter, &experts, &inputs))? == "group", || "a bf16 group accepted".into())?;
    // Expert segments aligned to 64 rows: every token names experts 0 and 1, so each gets 8 rows
    // padded to 64 and both share the grouped GEMM's first 128-row tile, which would compute
    // expert 0 on all of it and never write expert 1's rows. Refused before any launch.
    let q2_ok = stream.alloc_zeros::<F8E4M3>(2 * hidden * inter).unwrap();
    let fine =
        [LocalExperts { w13: Fp8Weights { q: q13.slice(..), sf: s13.slice(..) }, w2: Fp8Weights { q: q2_ok.slice(..), sf: s2.slice(..) } }];
    let both = stream.clone_htod(&[0i32, 1].repeat(8)).unwrap();
    let inputs = [LayerInput { x: x.slice(..), topk_idx: both.slice(..), topk_weights: w.slice(..), tokens: 8, k: 2 }];
    let m64 = GroupShape { m_align: 64, ..GroupShape::new(1, 2, hidden, 8, 2, Payload::Fp8) };
    let mut g64 = Group::new_virtual(&stream, m64).map_err(err)?;
    ensure(arg(forward(&mut g64, inter, &fine, &inputs))? == "m_align", || "m_align = 64 accepted by forward".into())?;
    let (mut ga, mut gb) = (Group::new_virtual(&stream, m64).map_err(err)?, Group::new_virtual(&stream, m64).map_err(err)?);
    let compute = gpu.stream();
    ensure(arg(forward_two_batch([&mut ga, &mut gb], &compute, inter, &fine, &inputs))? == "m_align", || {
        "m_align = 64 accepted by forward_two_batch".into()
    })?;
    let received = dispatch_stage(&mut g64, &inputs).map_err(err)?;
    let staged = expert_stage(&stream, &m64, inter, GemmOptions::default(), &fine, &received).map(|_| vec![]);
    ensure(arg(staged)? == "m_align", || "m_align = 64 accepted by expert_stage".into())?;
    // With 128-row segments the same layer runs.
    let mut g128 = Group::new_virtual(&stream, GroupShape::new(1, 2, hidden, 8, 2, Payload::Fp8)).map_err(err)?;
    forward(&mut g128, inter, &fine, &inputs).map_err(err)?;
    g128.check().map_err(err)?;
    Ok(())
}

fn two_batch_is_bit_identical(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("two_batch_is_bit_identical");
    let (hidden, inter, num_experts, k, ranks) = (256, 256, 8, 2, 2);
    let el = num_experts / ranks;
    let comm = gpu.stream();
    let compute = gpu.stream();
    let shape = GroupShape::new(ranks, num_experts, hidden, 128, k, Payload::Fp8);
    let mut seq = Group::new_virtual(&comm, shape).map_err(err)?;
    let mut ga = Group::new_virtual(&comm, shape).map_err(err)?;
    let mut gb = Group::new_virtual(&comm, shape).map_err(err)?;
    // The zero-SM path: the same schedule over copy-engine groups (payloads on copy engines).
    let ce = GroupShape { transport: Transport::CopyEngine, ..shape };
    let mut ca = Group::new_virtual(&comm, ce).map_err(err)?;
    let mut cb = Group::new_virtual(&comm, ce).map_err(err)?;
    ca.set_num_sms(2).map_err(err)?;
    cb.set_num_sms(2).map_err(err)?;
    // The race-checking simulator build (DEEPKERN_SIM_RACES=1) runs one round: it checks the
    // schedules' ordering, which every round exercises alike.
    let rounds = if cfg!(deepkern_sim_races) { 1 } else { 5 };
    for round in 0..rounds {
        let ex = experts(&mut rng, num_experts, hidden, inter);
        let tokens = [rng.random_range(0..128), rng.random_range(1..128)];
        let dev_w: Vec<_> = (0..ranks).map(|r| (upload(&comm, &ex.w13, r, el), upload(&comm, &ex.w2, r, el))).collect();
        let dev_x: Vec<_> = tokens
            .iter()
            .map(|&t| {
                let x: Vec<bf16> = (0..(t * hidden).max(1)).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
                let (i, w) = routing(&mut rng, t.max(1), k, num_experts);
                (comm.clone_htod(&x).unwrap(), comm.clone_htod(&i).unwrap(), comm.clone_htod(&w).unwrap())
            })
            .collect();
        let local = local_experts(&dev_w);
        let inputs = layer_inputs(&dev_x, &tokens, hidden, k);
        let a = forward(&mut seq, inter, &local, &inputs).map_err(err)?;
        let b = forward_two_batch([&mut ga, &mut gb], &compute, inter, &local, &inputs).map_err(err)?;
        let c = forward_two_batch([&mut ca, &mut cb], &compute, inter, &local, &inputs).map_err(err)?;
        let per_block = Handoff::PerBlock;
        let d = forward_two_batch_with([&mut ga, &mut gb], &compute, inter, &local, &inputs, per_block).map_err(err)?;
        let e = forward_two_batch_with([&mut ca, &mut cb], &compute, inter, &local, &inputs, per_block).map_err(err)?;
        for r in 0..ranks {
            let n = tokens[r] * hidden;
            let x = comm.clone_dtoh(&a[r]).map_err(err)?;
            for (what, out) in
                [("peer", &b[r]), ("copy-engine", &c[r]), ("peer, per-block arrivals", &d[r]), ("copy-engine, per-block arrivals", &e[r])]
            {
                let y = comm.clone_dtoh(out).map_err(err)?;
                ensure(x[..n].iter().map(|v| v.to_bits()).eq(y[..n].iter().map(|v| v.to_bits())), || {
                    format!(
                        "round {round}, rank {r} ({} tokens): the overlapped schedule ({what}) differs from the sequential one",
                        tokens[r]
                    )
                })?;
            }
        }
        for g in [&mut seq, &mut ga, &mut gb, &mut ca, &mut cb] {
            g.check().map_err(err)?;
        }
    }
    Ok(())
}

fn low_latency_equals_normal(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("low_latency_equals_normal");
    let (hidden, inter, num_experts, k, ranks) = (256, 256, 8, 2, 2);
    let el = num_experts / ranks;
    let stream = gpu.stream();
    let shape = GroupShape::new(ranks, num_experts, hidden, 64, k, Payload::Fp8);
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    let ex = experts(&mut rng, num_experts, hidden, inter);
    let tokens = [64usize, 23];
    let dev_w: Vec<_> = (0..ranks).map(|r| (upload(&stream, &ex.w13, r, el), upload(&stream, &ex.w2, r, el))).collect();
    let dev_x: Vec<_> = tokens
        .iter()
        .map(|&t| {
            let x: Vec<bf16> = (0..t * hidden).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
            let (i, w) = routing(&mut rng, t, k, num_experts);
            (stream.clone_htod(&x).unwrap(), stream.clone_htod(&i).unwrap(), stream.clone_htod(&w).unwrap())
        })
        .collect();
    let local = local_experts(&dev_w);
    let inputs = layer_inputs(&dev_x, &tokens, hidden, k);
    let a = forward(&mut group, inter, &local, &inputs).map_err(err)?;
    let b = forward_low_latency(&mut group, inter, &local, &inputs).map_err(err)?;
    for r in 0..ranks {
        let (x, y) = (stream.clone_dtoh(&a[r]).map_err(err)?, stream.clone_dtoh(&b[r]).map_err(err)?);
        ensure(x.iter().map(|v| v.to_bits()).eq(y.iter().map(|v| v.to_bits())), || format!("rank {r}: the low-latency layer differs"))?;
    }
    group.check().map_err(err)?;
    Ok(())
}
