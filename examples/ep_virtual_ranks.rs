//! Expert-parallel dispatch and combine on four virtual ranks of one GPU: quantise each rank's
//! tokens to FP8, dispatch them to the ranks holding their top-2 experts (rows land in the
//! contiguous grouped GEMM's layout), treat each expert as the identity, and combine: each token
//! comes back as `x · Σ weights`. Checked against the CPU reference.
//!
//! ```text
//! cargo run --release --example ep_virtual_ranks
//! ```
//!
//! Without a Hopper GPU (or a build without nvcc) it says why and runs the CPU reference alone.

use deepkern::ep::{Group, GroupShape, Payload, RankInput, Tokens};
use deepkern::layout::TokenGroupShape;
use deepkern::reference::ep::{EpConfig, Routing, dispatch};
use deepkern::{Device, F8E4M3, ScaleFormat, bf16, quantize_per_token_group};

const RANKS: usize = 4;
const EXPERTS: usize = 16;
const HIDDEN: usize = 2048;
const TOKENS: usize = 32;
const TOPK: usize = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Routing of rank r, token t: experts (r + t) % 16 and (3t + 5) % 16 (distinct), weights 0.75, 0.25.
    let idx: Vec<Vec<i32>> = (0..RANKS)
        .map(|r| {
            (0..TOKENS)
                .flat_map(|t| {
                    let a = ((r + t) % EXPERTS) as i32;
                    let b = ((3 * t + 5) % EXPERTS) as i32;
                    [a, if b == a { -1 } else { b }]
                })
                .collect()
        })
        .collect();
    let w: Vec<f32> = (0..TOKENS).flat_map(|_| [0.75f32, 0.25]).collect();
    let routings: Vec<Routing> = idx.iter().map(|i| Routing { topk_idx: i, topk_weights: &w, tokens: TOKENS, k: TOPK }).collect();
    let cfg = EpConfig { ranks: RANKS, num_experts: EXPERTS, m_align: 128 };
    let want = dispatch(&routings, &cfg)?;
    for (r, recv) in want.iter().enumerate() {
        println!("CPU reference: rank {r} receives {} rows (experts {:?})", recv.rows.len(), recv.counts);
    }

    let device = match Device::new(0).and_then(|d| d.check_supported().map(|()| d)) {
        Ok(d) => d,
        Err(e) => {
            println!("{} part skipped: {e}", gpu());
            return Ok(());
        }
    };
    let stream = device.default_stream();
    let shape = GroupShape::new(RANKS, EXPERTS, HIDDEN, TOKENS, TOPK, Payload::Fp8);
    let mut group = Group::new_virtual(&stream, shape)?;
    println!("{}: {}; {RANKS} virtual ranks, {} MiB of symmetric buffer each", gpu(), device.info().name, group.bytes_per_rank() >> 20);

    // Each rank's tokens: bf16, quantised to e4m3 with 1x128 scales.
    let qshape = TokenGroupShape::new(TOKENS, HIDDEN);
    let mut per_rank = Vec::new();
    for (r, idx) in idx.iter().enumerate() {
        let x: Vec<bf16> = (0..TOKENS * HIDDEN).map(|i| bf16::from_f32(((i * 7 + r) % 64) as f32 / 16.0 - 2.0)).collect();
        let d_x = stream.clone_htod(&x)?;
        let mut q = stream.alloc_zeros::<F8E4M3>(TOKENS * HIDDEN)?;
        let mut sf = stream.alloc_zeros::<f32>(qshape.scale_elements().unwrap())?;
        quantize_per_token_group(&stream, &d_x, &mut q, &mut sf, qshape, ScaleFormat::F32)?;
        per_rank.push((q, sf, stream.clone_htod(idx)?, stream.clone_htod(&w)?));
    }
    let inputs: Vec<RankInput> = per_rank
        .iter()
        .map(|(q, sf, i, w)| RankInput {
            x: Tokens::Fp8 { q: q.slice(..), sf: sf.slice(..) },
            topk_idx: i.slice(..),
            topk_weights: w.slice(..),
            tokens: TOKENS,
            k: TOPK,
        })
        .collect();
    let got = group.dispatch(&inputs)?;
    let mut ok = true;
    for (r, (g, w)) in got.iter().zip(&want).enumerate() {
        let m_indices = stream.clone_dtoh(&g.m_indices)?;
        let same = g.rows == w.rows.len() && m_indices[..g.rows] == w.expert[..];
        ok &= same;
        println!("{}: rank {r} received {} rows, layout {} the reference", gpu(), g.rows, if same { "matches" } else { "DIFFERS from" });
    }
    // Identity experts: dequantise each received row to bf16 on the host and send it back.
    let mut ys = Vec::new();
    for g in &got {
        let (q, sf) = g.x.fp8().expect("an FP8 group receives FP8 rows");
        let (q, sf) = (stream.clone_dtoh(q)?, stream.clone_dtoh(sf)?);
        let y: Vec<bf16> =
            (0..g.rows * HIDDEN).map(|i| bf16::from_f32(q[i].to_f32() * sf[i % HIDDEN / 128 * g.rows + i / HIDDEN])).collect();
        ys.push(stream.clone_htod(&y)?);
    }
    let out = group.combine(&ys, &got)?;
    group.check()?;
    // Rank 0's tokens came back as dequant(x) · Σ weights (within bf16 rounding).
    let (q0, sf0) = (stream.clone_dtoh(&per_rank[0].0)?, stream.clone_dtoh(&per_rank[0].1)?);
    let out0 = stream.clone_dtoh(&out[0])?;
    let mut worst = 0.0f32;
    for t in 0..TOKENS {
        let sum_w: f32 = (0..TOPK).filter(|&j| idx[0][t * TOPK + j] >= 0).map(|j| w[t * TOPK + j]).sum();
        for c in 0..HIDDEN {
            let y = bf16::from_f32(q0[t * HIDDEN + c].to_f32() * sf0[c / 128 * qshape.m_pad() + t]).to_f32();
            let want = y * sum_w;
            worst = worst.max((out0[t * HIDDEN + c].to_f32() - want).abs() / want.abs().max(1e-3));
        }
    }
    let combined = worst <= 1.0 / 128.0;
    println!(
        "{}: combine {} x · Σ weights (worst relative error {worst:.2e})",
        gpu(),
        if combined { "returns" } else { "DOES NOT return" }
    );
    if ok && combined { Ok(()) } else { Err("GPU dispatch or combine disagrees with the reference".into()) }
}

/// "GPU", or "simulated GPU" in a simulated build (docs/simulator.md): no simulated result passes
/// for a GPU one.
fn gpu() -> &'static str {
    if deepkern::simulated() { "simulated GPU" } else { "GPU" }
}
