//! An expert-parallel MoE layer forward built from the crate's kernels, over an [`ep::Group`]:
//!
//! ```text
//! x (bf16) -> quantise 1x128 -> dispatch (FP8) -> grouped GEMM, contiguous (gate | up)
//!   -> SiLU(gate) · up, re-quantised (one fused kernel) -> grouped GEMM (down) -> combine
//! ```
//!
//! Weights are FP8 with 128x128 block scales. The CPU twin is [`crate::reference::moe::forward`].
//! This is the sequential schedule, every stage on the group's stream; the overlapped schedules
//! are not written yet.

use cudarc::driver::{CudaSlice, CudaView};
use float8::F8E4M3;
use half::bf16;

use crate::ep::{Group, Payload, RankInput, Rows, Tokens};
use crate::error::{Error, Result};
use crate::gemm::{Fp8Activations, Fp8Weights, GemmShape, gemm_fp8_contiguous};
use crate::layout::{GROUP, TokenGroupShape, ceil_div};
use crate::quant::{quantize_per_token_group, silu_mul_quantize};
use crate::reference::quant::ScaleFormat;

/// One rank's local experts: `w13` `[E_local, 2·inter, hidden]` (gate rows, then up rows, per
/// expert) with scales `[E_local, 2·inter / 128, hidden / 128]`; `w2` `[E_local, hidden, inter]`
/// with scales `[E_local, hidden / 128, inter / 128]`.
pub struct LocalExperts<'a> {
    pub w13: Fp8Weights<'a>,
    pub w2: Fp8Weights<'a>,
}

/// One rank's tokens: `x` `[tokens, hidden]` bf16 and the router's `[tokens, k]` output.
pub struct LayerInput<'a> {
    pub x: CudaView<'a, bf16>,
    pub topk_idx: CudaView<'a, i32>,
    pub topk_weights: CudaView<'a, f32>,
    pub tokens: usize,
    pub k: usize,
}

/// Runs the layer for every local rank of `group` (an FP8 group): `inputs[i]` and `experts[i]`
/// belong to the i-th local rank. `inter` is the experts' intermediate size (a multiple of 128).
/// Returns each local rank's `[tokens, hidden]` bf16 output.
pub fn forward(group: &mut Group, inter: usize, experts: &[LocalExperts], inputs: &[LayerInput]) -> Result<Vec<CudaSlice<bf16>>> {
    let shape = *group.shape();
    if shape.payload != Payload::Fp8 {
        return Err(Error::InvalidArgument {
            arg: "group",
            reason: "the MoE layer dispatches FP8: build the group with Payload::Fp8".into(),
        });
    }
    if inter == 0 || !inter.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "inter", expected: format!("a positive multiple of {GROUP}"), got: inter.to_string() });
    }
    let local = group.local_ranks();
    if experts.len() != local.len() || inputs.len() != local.len() {
        return Err(Error::Shape {
            arg: "inputs",
            expected: format!("one input and one expert set per local rank ({})", local.len()),
            got: format!("{} and {}", inputs.len(), experts.len()),
        });
    }
    let (h, el) = (shape.hidden, shape.experts_per_rank());
    for e in experts {
        let want = [
            ("w13", e.w13.q.len(), el * 2 * inter * h),
            ("w13_sf", e.w13.sf.len(), el * ceil_div(2 * inter, GROUP) * (h / GROUP)),
            ("w2", e.w2.q.len(), el * h * inter),
            ("w2_sf", e.w2.sf.len(), el * ceil_div(h, GROUP) * (inter / GROUP)),
        ];
        for (arg, got, want) in want {
            if got != want {
                return Err(Error::Shape { arg, expected: format!("{want} elements"), got: format!("{got} elements") });
            }
        }
    }
    let stream = group.stream().clone();
    // 1. Quantise each rank's tokens (1x128).
    let mut quantised = Vec::with_capacity(inputs.len());
    for i in inputs {
        if i.x.len() != i.tokens * h {
            return Err(Error::Shape { arg: "x", expected: format!("[{}, {h}] bf16", i.tokens), got: format!("{} elements", i.x.len()) });
        }
        let ts = TokenGroupShape::new(i.tokens, h);
        let mut q = stream.alloc_zeros::<F8E4M3>((i.tokens * h).max(1))?;
        let mut sf = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap_or(0).max(1))?;
        if i.tokens > 0 {
            quantize_per_token_group(
                &stream,
                &i.x,
                &mut q.slice_mut(..i.tokens * h),
                &mut sf.slice_mut(..ts.scale_elements().unwrap_or(0)),
                ts,
                ScaleFormat::F32,
            )?;
        }
        quantised.push((q, sf, ts));
    }
    // 2. Dispatch.
    let rank_inputs: Vec<RankInput> = inputs
        .iter()
        .zip(&quantised)
        .map(|(i, (q, sf, ts))| RankInput {
            x: Tokens::Fp8 { q: q.slice(..i.tokens * h), sf: sf.slice(..ts.scale_elements().unwrap_or(0)) },
            topk_idx: i.topk_idx.slice(..),
            topk_weights: i.topk_weights.slice(..),
            tokens: i.tokens,
            k: i.k,
        })
        .collect();
    let received = group.dispatch(&rank_inputs)?;
    // 3-5. Experts, per rank: gate/up GEMM, fused activation, down GEMM.
    let mut ys = Vec::with_capacity(received.len());
    for (d, e) in received.iter().zip(experts) {
        let m = d.rows;
        let mut y = stream.alloc_zeros::<bf16>((m * h).max(1))?;
        if m > 0 {
            let Rows::Fp8 { q, sf } = &d.x else { unreachable!("an FP8 group receives FP8 rows") };
            let a = Fp8Activations { q: q.slice(..m * h), sf: sf.slice(..h / GROUP * m) };
            let m_idx = d.m_indices.slice(..m);
            let mut h13 = stream.alloc_zeros::<bf16>(m * 2 * inter)?;
            gemm_fp8_contiguous(&stream, &a, &e.w13, &m_idx, &mut h13.slice_mut(..), GemmShape { m, n: 2 * inter, k: h }, el)?;
            let ts = TokenGroupShape::new(m, inter);
            let mut q2 = stream.alloc_zeros::<F8E4M3>(m * inter)?;
            let mut sf2 = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap_or(1))?;
            silu_mul_quantize(&stream, &h13, &mut q2, &mut sf2, ts, ScaleFormat::F32)?;
            let a2 = Fp8Activations { q: q2.slice(..), sf: sf2.slice(..) };
            gemm_fp8_contiguous(&stream, &a2, &e.w2, &m_idx, &mut y.slice_mut(..m * h), GemmShape { m, n: h, k: inter }, el)?;
        }
        ys.push(y);
    }
    // 6. Combine.
    let views: Vec<_> = ys.iter().zip(&received).map(|(y, d)| y.slice(..d.rows * h)).collect();
    let handles: Vec<_> = received.iter().map(|d| &d.handle).collect();
    group.combine(&views, &handles)
}
