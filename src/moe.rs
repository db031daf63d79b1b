//! An expert-parallel MoE layer forward built from the crate's kernels, over an [`crate::ep::Group`]:
//!
//! ```text
//! x (bf16) -> quantise 1x128 -> dispatch (FP8) -> grouped GEMM, contiguous (gate | up)
//!   -> SiLU(gate) · up, re-quantised (one fused kernel) -> grouped GEMM (down) -> combine
//! ```
//!
//! Weights are FP8 with 128x128 block scales. The CPU twin is [`crate::reference::moe::forward`].
//! Schedules: [`forward`] runs the stages one after another on the group's stream;
//! [`forward_two_batch`] overlaps one micro-batch's communication with the other's experts;
//! [`forward_low_latency`] is the decode variant (low-latency dispatch, masked grouped GEMMs).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use float8::F8E4M3;
use half::bf16;

use crate::ep::{Dispatched, Group, GroupShape, Payload, RankInput, Tokens};
use crate::error::{Error, Result};
use crate::gemm::{
    ARRIVAL_ROWS, Fp8Activations, Fp8Weights, GemmOptions, GemmShape, MaskedShape, gemm_fp8_contiguous_arrived, gemm_fp8_contiguous_with,
    gemm_fp8_masked,
};
use crate::layout::{GROUP, TokenGroupShape, ceil_div};
use crate::overlap::{Handoff, SmBudget, Streams, two_micro_batches_with};
use crate::plan::gemm::{GemmLayout, compiled_block_m};
use crate::quant::{Fp8Tensor, quantize, silu_mul_quantize};
use crate::reference::quant::ScaleFormat;

/// One rank's local experts: `w13` `[E_local, 2·inter, hidden]` (gate rows, then up rows, per
/// expert) with scales `[E_local, 2·inter / 128, hidden / 128]`; `w2` `[E_local, hidden, inter]`
/// with scales `[E_local, hidden / 128, inter / 128]`.
pub struct LocalExperts<'a> {
    /// Gate and up projections: `[E_local, 2·inter, hidden]` and their 128x128 scales.
    pub w13: Fp8Weights<'a>,
    /// Down projection: `[E_local, hidden, inter]` and their 128x128 scales.
    pub w2: Fp8Weights<'a>,
}

/// One rank's tokens: `x` `[tokens, hidden]` bf16 and the router's `[tokens, k]` output.
pub struct LayerInput<'a> {
    /// bf16 `[tokens, hidden]`: the layer's input rows.
    pub x: CudaView<'a, bf16>,
    /// i32 `[tokens, k]`: each token's experts (global indices; -1 = no expert).
    pub topk_idx: CudaView<'a, i32>,
    /// f32 `[tokens, k]`: the router weight of each slot.
    pub topk_weights: CudaView<'a, f32>,
    /// Tokens of this rank.
    pub tokens: usize,
    /// Experts per token (top-k), at most the group's `max_topk`.
    pub k: usize,
}

/// Checks the group, the intermediate size and the weights of every local rank.
fn validate(group: &Group, inter: usize, experts: &[LocalExperts], n_inputs: usize) -> Result<()> {
    validate_experts(group.shape(), group.local_ranks().len(), inter, experts, n_inputs)
}

fn validate_experts(shape: &GroupShape, local: usize, inter: usize, experts: &[LocalExperts], n_inputs: usize) -> Result<()> {
    let shape = *shape;
    if shape.payload != Payload::Fp8 {
        return Err(Error::InvalidArgument {
            arg: "group",
            reason: "the MoE layer dispatches FP8: build the group with Payload::Fp8".into(),
        });
    }
    if inter == 0 || !inter.is_multiple_of(GROUP) {
        return Err(Error::Shape { arg: "inter", expected: format!("a positive multiple of {GROUP}"), got: inter.to_string() });
    }
    if experts.len() != local || n_inputs != local {
        return Err(Error::Shape {
            arg: "inputs",
            expected: format!("one input and one expert set per local rank ({local})"),
            got: format!("{n_inputs} and {}", experts.len()),
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
    Ok(())
}

/// Checks that the normal-mode layout suits the contiguous grouped GEMM: each M tile takes its
/// expert from its first row, so every expert's segment must start on a tile boundary, which
/// `m_align` (the segments' row alignment) must guarantee. A smaller alignment would let one tile
/// span two experts and leave the second expert's rows unwritten.
fn validate_contiguous(shape: &GroupShape) -> Result<()> {
    let tile = compiled_block_m(&GemmLayout::GroupedContiguous { groups: 1 }).iter().copied().max().unwrap_or(1);
    if !shape.m_align.is_multiple_of(tile) {
        return Err(Error::InvalidArgument {
            arg: "m_align",
            reason: format!(
                "{} is not a multiple of the grouped GEMM's {tile}-row tile: an expert's rows would share a tile with another's",
                shape.m_align
            ),
        });
    }
    Ok(())
}

/// Stage 1 of the layer, on the group's stream: quantises every local rank's tokens (1x128, f32
/// scales) and dispatches them in FP8. With [`expert_stage`] and [`combine_stage`], the pieces a
/// framework (or a benchmark timing each stage) composes into its own schedule.
pub fn dispatch_stage(group: &mut Group, inputs: &[LayerInput]) -> Result<Vec<Dispatched>> {
    let quantised = quantise(group, inputs)?;
    group.dispatch(&rank_inputs(inputs, &quantised))
}

/// [`dispatch_stage`] through [`Group::dispatch_with_arrivals`]: the results carry arrival
/// counters, and [`expert_stage`] on `consumer` then starts each gate/up tile as its rows land.
pub fn dispatch_stage_with_arrivals(group: &mut Group, inputs: &[LayerInput], consumer: &Arc<CudaStream>) -> Result<Vec<Dispatched>> {
    let quantised = quantise(group, inputs)?;
    group.dispatch_with_arrivals(&rank_inputs(inputs, &quantised), consumer)
}

/// Quantises every local rank's tokens (1x128, f32 scales) on the group's stream; one input per
/// local rank.
fn quantise(group: &Group, inputs: &[LayerInput]) -> Result<Vec<Fp8Tensor>> {
    if inputs.len() != group.local_ranks().len() {
        return Err(Error::Shape {
            arg: "inputs",
            expected: format!("one per local rank ({})", group.local_ranks().len()),
            got: inputs.len().to_string(),
        });
    }
    let h = group.shape().hidden;
    let stream = group.stream();
    let mut quantised = Vec::with_capacity(inputs.len());
    for i in inputs {
        if i.x.len() != i.tokens * h {
            return Err(Error::Shape { arg: "x", expected: format!("[{}, {h}] bf16", i.tokens), got: format!("{} elements", i.x.len()) });
        }
        quantised.push(quantize(stream, &i.x, TokenGroupShape::new(i.tokens, h), ScaleFormat::F32)?);
    }
    Ok(quantised)
}

/// The dispatch inputs of the quantised tokens.
fn rank_inputs<'a>(inputs: &'a [LayerInput], quantised: &'a [Fp8Tensor]) -> Vec<RankInput<'a>> {
    inputs
        .iter()
        .zip(quantised)
        .map(|(i, t)| RankInput {
            x: Tokens::from(t),
            topk_idx: i.topk_idx.slice(..),
            topk_weights: i.topk_weights.slice(..),
            tokens: i.tokens,
            k: i.k,
        })
        .collect()
}

/// Stage 2 of the layer, on `stream`: every local rank's experts on the rows its normal dispatch
/// received (`received[i]` with `experts[i]`): the gate/up grouped GEMM, the fused SwiGLU
/// re-quantisation, the down grouped GEMM, each GEMM within `options` (its SM budget). `shape` is
/// the group's. Returns `y` per rank (`[rows, hidden]` bf16, at least one element).
pub fn expert_stage(
    stream: &Arc<CudaStream>,
    shape: &GroupShape,
    inter: usize,
    options: GemmOptions,
    experts: &[LocalExperts],
    received: &[Dispatched],
) -> Result<Vec<CudaSlice<bf16>>> {
    validate_experts(shape, received.len(), inter, experts, received.len())?;
    validate_contiguous(shape)?;
    let (h, el) = (shape.hidden, shape.experts_per_rank());
    let mut ys = Vec::with_capacity(received.len());
    for (d, e) in received.iter().zip(experts) {
        let m = d.rows;
        let mut y = stream.alloc_zeros::<bf16>((m * h).max(h))?; // one row when empty: combine's rule for y
        if m > 0 {
            let (q, sf) = d.x.fp8().expect("an FP8 group receives FP8 rows");
            let a = Fp8Activations { q: q.slice(..m * h), sf: sf.slice(..h / GROUP * m) };
            let m_idx = d.m_indices.slice(..m);
            let mut h13 = stream.alloc_zeros::<bf16>(m * 2 * inter)?;
            let gate_up = GemmShape { m, n: 2 * inter, k: h };
            match &d.arrivals {
                // Rows still landing: each tile waits for its own block on the device.
                Some(arrivals) => {
                    let arrivals = arrivals.slice(..m / ARRIVAL_ROWS);
                    gemm_fp8_contiguous_arrived(stream, &a, &e.w13, &m_idx, &arrivals, &mut h13.slice_mut(..), gate_up, el, options)?
                }
                None => gemm_fp8_contiguous_with(stream, &a, &e.w13, &m_idx, &mut h13.slice_mut(..), gate_up, el, options)?,
            }
            let ts = TokenGroupShape::new(m, inter);
            let mut q2 = stream.alloc_zeros::<F8E4M3>(m * inter)?;
            let mut sf2 = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap_or(1))?;
            silu_mul_quantize(stream, &h13, &mut q2, &mut sf2, ts, ScaleFormat::F32)?;
            let a2 = Fp8Activations { q: q2.slice(..), sf: sf2.slice(..) };
            gemm_fp8_contiguous_with(stream, &a2, &e.w2, &m_idx, &mut y.slice_mut(..m * h), GemmShape { m, n: h, k: inter }, el, options)?;
        }
        ys.push(y);
    }
    Ok(ys)
}

/// Stage 3 of the layer, on the group's stream: every expert output back to its token's rank,
/// weighted by the router (`ys[i]` from [`expert_stage`] for `received[i]`).
pub fn combine_stage(group: &mut Group, ys: &[CudaSlice<bf16>], received: &[Dispatched]) -> Result<Vec<CudaSlice<bf16>>> {
    // A rank that received no rows has a one-row `y` (expert_stage's allocation), which combine takes.
    group.combine(ys, received)
}

/// Runs the layer for every local rank of `group` (an FP8 group), every stage one after another
/// on the group's stream: `inputs[i]` and `experts[i]` belong to the i-th local rank. `inter` is
/// the experts' intermediate size (a multiple of 128), and the group's `m_align` a multiple of the
/// grouped GEMM's 128-row tile. Returns each local rank's `[tokens, hidden]` bf16 output.
pub fn forward(group: &mut Group, inter: usize, experts: &[LocalExperts], inputs: &[LayerInput]) -> Result<Vec<CudaSlice<bf16>>> {
    validate(group, inter, experts, inputs.len())?;
    validate_contiguous(group.shape())?;
    let stream = group.stream().clone();
    let received = dispatch_stage(group, inputs)?;
    let shape = *group.shape();
    let ys = expert_stage(&stream, &shape, inter, GemmOptions::default(), experts, &received)?;
    combine_stage(group, &ys, &received)
}

/// The two-micro-batch schedule: each rank's tokens are cut in two halves, and micro-batch B's
/// dispatch and micro-batch A's combine (on the groups' communication stream) run while the other
/// micro-batch's experts run on `compute`:
///
/// ```text
/// comm:    dispatch A | dispatch B |            | combine A | combine B
/// compute:            | experts A  | experts B  |
/// ```
///
/// `groups` are two groups of the same shape and local ranks on the same stream (one per
/// micro-batch, so their buffers never alias). The schedule is
/// [`crate::overlap::two_micro_batches`] (explicit events between the streams), and the GEMMs'
/// persistent grids leave the communication kernels' SMs ([`Group::num_sms`]) free
/// ([`crate::overlap::SmBudget`]). With copy-engine groups ([`crate::ep::Transport::CopyEngine`])
/// the payloads move without SMs; give their pack/unpack kernels a few ([`Group::set_num_sms`]).
/// Every token's output is bit-identical to [`forward`]'s (a row's result depends only on its own
/// data).
pub fn forward_two_batch(
    groups: [&mut Group; 2],
    compute: &Arc<CudaStream>,
    inter: usize,
    experts: &[LocalExperts],
    inputs: &[LayerInput],
) -> Result<Vec<CudaSlice<bf16>>> {
    forward_two_batch_with(groups, compute, inter, experts, inputs, Handoff::AfterDispatch)
}

/// [`forward_two_batch`] with a choice of [`Handoff`]. [`Handoff::PerBlock`] is the fine-grained
/// path: each micro-batch's dispatch counts its arrived rows per 128-row block
/// ([`Group::dispatch_with_arrivals`]) and the gate/up grouped GEMM starts each tile as its block
/// lands ([`crate::gemm::gemm_fp8_contiguous_arrived`]), overlapping the receive with the first
/// GEMM; the rest of the micro-batch's computation follows in stream order. Results are
/// bit-identical to [`forward`]'s.
pub fn forward_two_batch_with(
    groups: [&mut Group; 2],
    compute: &Arc<CudaStream>,
    inter: usize,
    experts: &[LocalExperts],
    inputs: &[LayerInput],
    handoff: Handoff,
) -> Result<Vec<CudaSlice<bf16>>> {
    let [ga, gb] = groups;
    validate(ga, inter, experts, inputs.len())?;
    validate(gb, inter, experts, inputs.len())?;
    validate_contiguous(ga.shape())?;
    if ga.shape() != gb.shape() || ga.local_ranks() != gb.local_ranks() {
        return Err(Error::InvalidArgument {
            arg: "groups",
            reason: "the two micro-batch groups must have the same shape and ranks".into(),
        });
    }
    if **ga.stream() != **gb.stream() {
        return Err(Error::InvalidArgument {
            arg: "groups",
            reason: "the two micro-batch groups must share one communication stream".into(),
        });
    }
    let h = ga.shape().hidden;
    let half = |i: &LayerInput<'_>, second: bool| -> (usize, usize) {
        let cut = i.tokens / 2;
        if second { (cut, i.tokens) } else { (0, cut) }
    };
    let split = |second: bool| -> Vec<LayerInput> {
        inputs
            .iter()
            .map(|i| {
                let (a, b) = half(i, second);
                LayerInput {
                    x: i.x.slice(a * h..b * h),
                    topk_idx: i.topk_idx.slice(a * i.k..b * i.k),
                    topk_weights: i.topk_weights.slice(a * i.k..b * i.k),
                    tokens: b - a,
                    k: i.k,
                }
            })
            .collect()
    };
    let halves = [split(false), split(true)];
    let streams = Streams::new(ga.stream(), compute)?;
    // The GEMMs leave the larger of the two groups' communication grids free.
    let options = SmBudget::for_stream(compute, ga.num_sms().max(gb.num_sms()))?.gemm_options();
    let shape = *ga.shape();
    let mut groups = [ga, gb];
    let [out_a, out_b] = {
        // Each stage borrows its own micro-batch's group; the closures run one at a time.
        let groups = std::cell::RefCell::new(&mut groups);
        two_micro_batches_with(
            &streams,
            handoff,
            |i| match handoff {
                Handoff::AfterDispatch => dispatch_stage(groups.borrow_mut()[i], &halves[i]),
                Handoff::PerBlock => dispatch_stage_with_arrivals(groups.borrow_mut()[i], &halves[i], compute),
            },
            |_, received: &Vec<Dispatched>| expert_stage(compute, &shape, inter, options, experts, received),
            |i, received, ys| combine_stage(groups.borrow_mut()[i], &ys, &received),
        )?
    };
    let comm = groups[0].stream().clone();
    // Put the halves back together, on the communication stream.
    let mut outs = Vec::with_capacity(inputs.len());
    for ((i, a), b) in inputs.iter().zip(out_a).zip(out_b) {
        let cut = i.tokens / 2;
        let mut out = comm.alloc_zeros::<bf16>((i.tokens * h).max(1))?;
        if cut > 0 {
            comm.memcpy_dtod(&a.slice(..cut * h), &mut out.slice_mut(..cut * h))?;
        }
        if i.tokens > cut {
            comm.memcpy_dtod(&b.slice(..(i.tokens - cut) * h), &mut out.slice_mut(cut * h..i.tokens * h))?;
        }
        outs.push(out);
    }
    Ok(outs)
}

/// The decode-time layer: the low-latency dispatch (no host synchronisation) into the masked
/// layout `[E_local, ranks · ll_max_tokens, hidden]`, the masked grouped GEMMs around the fused
/// activation, and combine. Every token's output is bit-identical to [`forward`]'s (each row's
/// arithmetic is the same; only where the row sits differs). Tokens must name distinct experts.
pub fn forward_low_latency(
    group: &mut Group,
    inter: usize,
    experts: &[LocalExperts],
    inputs: &[LayerInput],
) -> Result<Vec<CudaSlice<bf16>>> {
    validate(group, inter, experts, inputs.len())?;
    let shape = *group.shape();
    let (h, el, cap) = (shape.hidden, shape.experts_per_rank(), shape.ll_capacity());
    let stream = group.stream().clone();
    // Quantise, then the low-latency dispatch.
    let quantised = quantise(group, inputs)?;
    let received = group.dispatch_low_latency(&rank_inputs(inputs, &quantised))?;
    // Experts on the masked layout: only the first masked_m[e] rows of each expert are computed.
    let mut ys = Vec::with_capacity(received.len());
    for (d, e) in received.iter().zip(experts) {
        let (q, sf) = d.x.fp8().expect("an FP8 group receives FP8 rows");
        let a = Fp8Activations { q: q.slice(..el * cap * h), sf: sf.slice(..el * (h / GROUP) * crate::layout::tma_aligned_rows(cap)) };
        let masked = d.masked_m.slice(..el);
        let mut h13 = stream.alloc_zeros::<bf16>(el * cap * 2 * inter)?;
        gemm_fp8_masked(&stream, &a, &e.w13, &masked, &mut h13.slice_mut(..), MaskedShape { groups: el, max_m: cap, n: 2 * inter, k: h })?;
        let ts = TokenGroupShape::batched(el, cap, inter);
        let mut q2 = stream.alloc_zeros::<F8E4M3>(el * cap * inter)?;
        let mut sf2 = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap_or(1))?;
        silu_mul_quantize(&stream, &h13, &mut q2, &mut sf2, ts, ScaleFormat::F32)?;
        let a2 = Fp8Activations { q: q2.slice(..), sf: sf2.slice(..) };
        let mut y = stream.alloc_zeros::<bf16>(el * cap * h)?;
        gemm_fp8_masked(&stream, &a2, &e.w2, &masked, &mut y.slice_mut(..), MaskedShape { groups: el, max_m: cap, n: h, k: inter })?;
        ys.push(y);
    }
    group.combine(&ys, &received)
}
