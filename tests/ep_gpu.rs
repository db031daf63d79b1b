//! Expert-parallel kernels on the GPU against the R-rank CPU reference. What each test proves:
//! - `layout_matches_reference`: counts and the token-in-rank map equal the reference exactly for
//!   uniform routing, a hot expert, -1 slots, R in {1, 2, 4, 8}, up to 512 experts and top-16.
//! - `layout_counts_and_ignores_invalid_indices`: out-of-range indices are counted, never used.
//! - `layout_of_no_tokens`, `layout_wraps_the_grid`: empty input; more tokens than one grid pass.
//! - `layout_rejects_bad_input`: shape and configuration errors before any launch.
//! - `dispatch_combine_match_reference`: normal dispatch on virtual ranks R in {1, 2, 4, 8}, hidden
//!   2048, 4096 and 7168, FP8 and bf16 payloads, uniform routing, a hot expert, -1 slots and a
//!   rank with no tokens: every received row, scale, weight, expert index and source equals the
//!   reference bit for bit (padding rows zero); combine equals the f64 sum within bf16 rounding.
//! - `low_latency_matches_reference`: the same for the low-latency (masked) layout.
//! - `identity_experts_combine_to_weighted_x`: combine of the dispatched rows themselves gives
//!   x · Σ weights per token.
//! - `repeated_calls_are_bit_identical`: twenty rounds of both modes on one group give identical
//!   bytes (epoch signalling across calls, no races), with one SM per kernel.
//! - `group_rejects_bad_input`: bad shapes, routing and buffers give argument errors before any
//!   data moves; out-of-range experts in low-latency mode are counted, never written.
//! - `call_order_is_enforced`: a second dispatch before the combine, a receive before its send
//!   or before another virtual rank's send, and a handle of an earlier round are refused with the
//!   call named, and the round then completes correctly.
//! - `refused_dispatch_then_good_rounds`: a dispatch every rank refuses (one rank's bad expert
//!   index) leaves the epochs in step: the next rounds, in both modes, equal the reference.
//! - `errors_poison_refuse_and_clear`: a low-latency overflow on one rank poisons every rank's
//!   receive and combine (NaN, no sources), makes every rank refuse the next normal dispatch,
//!   is reported and cleared by `check` (a second `check` passes), and the group then works.
//! - `unweighted_combine_sums_rows`: `combine_unweighted` of the dispatched rows is x times the
//!   number of valid slots, `combine` of the same rows x times the weights' sum.
//! - `node_group_failures_are_loud` (two ranks, one GPU each): differing shapes are refused by
//!   both ranks; a round with one rank's invalid expert is refused by both and the next rounds
//!   are right; a silent peer makes dispatch fail naming it; `check` reads and clears the error.
//! - `node_group_refusals_in_a_row` (two ranks): rounds refused back to back, the rank with the
//!   invalid expert alternating, then a good round: each refusal names the right rank on both
//!   (a rank that refused may notify its next round before its peer has read the refused one).
//! - `node_group_receive_timeout_poisons` (two ranks): a normal receive whose peer never sends
//!   times out and returns NaN rows without sources; each rank's `check` names the other.
//! - `node_group_drop_waits_for_peers` (two ranks): a rank dropping its group while its peer's
//!   writes into its buffer are still queued waits for them (the drop's barrier).
//! - `node_group_of_one_process`: a node group (CUDA IPC export, handle all-gather over NCCL) at
//!   world size 1: both dispatch modes and combine equal the reference.
//! - `node_group_of_two_ranks`, `nccl_group_of_two_ranks`: two ranks, each on a host thread of its
//!   own with its own device, communicator (`Comm::from_rank`) and group (`Group::new_node`, with
//!   normal and low-latency dispatch and combine; `Group::new_nccl`, both payloads): every rank's
//!   received rows and combined tokens equal the reference of both ranks' routing, for several
//!   rounds. They need one GPU per rank: a host with fewer reports them as ignored. On the
//!   simulator each rank has a simulated device of its own (this binary asks for
//!   `DEEPKERN_SIM_DEVICES=2` unless it is set).

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::Error;
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::ep::{DeviceLayout, Dispatched, Group, GroupShape, Handle, Payload, RankInput, Rows, Tokens, Transport, layout};
use deepkern::reference::ep::{
    EpConfig, Received, Routing, RowSource, combine, dispatch, dispatch_low_latency, layout as reference_layout,
};
use deepkern::{F8E4M3, bf16};
use rand::Rng;
use rand::rngs::StdRng;
use std::sync::Arc;

/// Ranks of the multi-rank tests: one host thread, one device and one communicator each.
const RANKS: usize = 2;

fn main() {
    if deepkern::simulated() && std::env::var_os("DEEPKERN_SIM_DEVICES").is_none() {
        // SAFETY: the first statement of main, before any other thread exists (the simulator reads
        // the variable when the driver stand-in starts, at the first CUDA call).
        unsafe { std::env::set_var("DEEPKERN_SIM_DEVICES", RANKS.to_string()) };
    }
    common::run_with_requirements(
        vec![
            ("layout_matches_reference", layout_matches_reference),
            ("layout_counts_and_ignores_invalid_indices", layout_counts_and_ignores_invalid_indices),
            ("layout_of_no_tokens", layout_of_no_tokens),
            ("layout_wraps_the_grid", layout_wraps_the_grid),
            ("layout_rejects_bad_input", layout_rejects_bad_input),
            ("dispatch_combine_match_reference", dispatch_combine_match_reference),
            ("concurrent_ranks_match_reference", concurrent_ranks_match_reference),
            ("low_latency_matches_reference", low_latency_matches_reference),
            ("identity_experts_combine_to_weighted_x", identity_experts_combine_to_weighted_x),
            ("repeated_calls_are_bit_identical", repeated_calls_are_bit_identical),
            ("group_rejects_bad_input", group_rejects_bad_input),
            ("call_order_is_enforced", call_order_is_enforced),
            ("refused_dispatch_then_good_rounds", refused_dispatch_then_good_rounds),
            ("errors_poison_refuse_and_clear", errors_poison_refuse_and_clear),
            ("unweighted_combine_sums_rows", unweighted_combine_sums_rows),
            ("combine_takes_dispatch_results", combine_takes_dispatch_results),
            ("node_group_of_one_process", node_group_of_one_process),
            ("nccl_group_of_one_process", nccl_group_of_one_process),
            ("node_group_of_two_ranks", node_group_of_two_ranks),
            ("node_group_failures_are_loud", node_group_failures_are_loud),
            ("node_group_refusals_in_a_row", node_group_refusals_in_a_row),
            ("node_group_drop_waits_for_peers", node_group_drop_waits_for_peers),
            ("node_group_receive_timeout_poisons", node_group_receive_timeout_poisons),
            ("nccl_group_of_two_ranks", nccl_group_of_two_ranks),
        ],
        &[],
        &[
            ("node_group_of_two_ranks", one_gpu_per_rank),
            ("node_group_failures_are_loud", one_gpu_per_rank),
            ("node_group_refusals_in_a_row", one_gpu_per_rank),
            ("node_group_drop_waits_for_peers", one_gpu_per_rank),
            ("node_group_receive_timeout_poisons", one_gpu_per_rank),
            ("nccl_group_of_two_ranks", one_gpu_per_rank),
        ],
    );
}

/// Why the multi-rank tests cannot run here, if they cannot: NCCL missing, or fewer GPUs than ranks.
fn one_gpu_per_rank() -> Option<String> {
    // SAFETY: only probes for the library; cudarc's loader panics when it is absent. (A simulated
    // build always has the simulator's: without it, the test fails.)
    if !deepkern::simulated() && !unsafe { deepkern::cudarc::nccl::sys::is_culib_present() } {
        return Some("libnccl not found: multi-rank groups need NCCL".into());
    }
    let n = deepkern::device_count();
    (n < RANKS).then(|| {
        let hint = if deepkern::simulated() { " (simulated devices: DEEPKERN_SIM_DEVICES)" } else { "" };
        format!("needs {RANKS} GPUs, one per rank; this host has {n}{hint}")
    })
}

/// Random top-k routing with distinct experts per token, some -1 slots, optionally a hot expert.
fn routing(rng: &mut StdRng, tokens: usize, k: usize, experts: usize, hot: bool) -> Vec<i32> {
    let mut idx = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        for j in 0..k {
            let e = if hot && j == 0 {
                0
            } else if rng.random_bool(0.1) {
                -1
            } else {
                rng.random_range(0..experts as i32)
            };
            row.push(if e >= 0 && row.contains(&e) { -1 } else { e });
        }
        idx.extend(row);
    }
    idx
}

/// Runs the kernel and the reference on `idx`; the reference sees invalid slots as -1.
fn compare(gpu: &Gpu, idx: &[i32], tokens: usize, k: usize, cfg: EpConfig) -> Result<usize, String> {
    let stream = gpu.stream();
    let d_idx = stream.clone_htod(&if idx.is_empty() { vec![-1] } else { idx.to_vec() }).map_err(|e| e.to_string())?;
    let mut out = DeviceLayout::new(&stream, tokens, cfg).map_err(|e| e.to_string())?;
    layout(&stream, &d_idx.slice(..idx.len()), k, &mut out).map_err(|e| e.to_string())?;
    let (got, invalid) = out.to_host(&stream).map_err(|e| e.to_string())?;
    let cleaned: Vec<i32> = idx.iter().map(|&e| if e < -1 || e >= cfg.num_experts as i32 { -1 } else { e }).collect();
    let weights = vec![1.0f32; idx.len()];
    let want = reference_layout(&Routing { topk_idx: &cleaned, topk_weights: &weights, tokens, k }, &cfg).map_err(|e| e.to_string())?;
    if got != want {
        return Err(format!("{cfg:?}, {tokens} tokens, top-{k}: layout differs from the reference"));
    }
    Ok(invalid)
}

fn layout_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("layout_matches_reference");
    for ranks in [1, 2, 4, 8] {
        for (experts, k) in [(8, 1), (64, 8), (256, 8), (512, 16)] {
            for (tokens, hot) in [(1, false), (333, false), (4096, false), (4096, true)] {
                let cfg = EpConfig { ranks, num_experts: experts, m_align: 128 };
                let idx = routing(&mut rng, tokens, k.min(experts), experts, hot);
                let invalid = compare(gpu, &idx, tokens, k.min(experts), cfg)?;
                ensure(invalid == 0, || format!("{invalid} invalid slots reported for valid input"))?;
            }
        }
    }
    Ok(())
}

fn layout_counts_and_ignores_invalid_indices(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("layout_counts_and_ignores_invalid_indices");
    let cfg = EpConfig { ranks: 4, num_experts: 64, m_align: 128 };
    let (tokens, k) = (1000, 8);
    let mut idx = routing(&mut rng, tokens, k, 64, false);
    let bad = [64, 1000, -2, i32::MIN, i32::MAX];
    for (n, i) in (0..idx.len()).step_by(37).enumerate() {
        idx[i] = bad[n % bad.len()];
    }
    let planted = (0..idx.len()).step_by(37).count();
    let invalid = compare(gpu, &idx, tokens, k, cfg)?;
    ensure(invalid == planted, || format!("{invalid} invalid slots reported, {planted} planted"))
}

fn layout_of_no_tokens(gpu: &Gpu) -> TestResult {
    let cfg = EpConfig { ranks: 8, num_experts: 256, m_align: 128 };
    compare(gpu, &[], 0, 8, cfg).map(|_| ()).map_err(Into::into)
}

fn layout_wraps_the_grid(gpu: &Gpu) -> TestResult {
    // 1024 blocks x 256 threads per grid pass: 300000 tokens need two.
    let mut rng = gpu.rng("layout_wraps_the_grid");
    let cfg = EpConfig { ranks: 8, num_experts: 256, m_align: 128 };
    let idx = routing(&mut rng, 300_000, 8, 256, false);
    compare(gpu, &idx, 300_000, 8, cfg).map(|_| ()).map_err(Into::into)
}

fn layout_rejects_bad_input(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let cfg = EpConfig { ranks: 4, num_experts: 64, m_align: 128 };
    let d_idx = stream.clone_htod(&vec![0i32; 80]).map_err(|e| e.to_string())?;
    let mut out = DeviceLayout::new(&stream, 10, cfg).map_err(|e| e.to_string())?;
    let shape_arg = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {other:?}")),
    };
    ensure(shape_arg(layout(&stream, &d_idx.slice(..79), 8, &mut out))? == "topk_idx", || "short topk_idx accepted".into())?;
    ensure(shape_arg(layout(&stream, &d_idx, 0, &mut out))? == "k", || "k = 0 accepted".into())?;
    for (ranks, experts, arg) in [(3, 64, "num_experts"), (128, 128, "ranks"), (4, 2048, "num_experts")] {
        let got = DeviceLayout::new(&stream, 10, EpConfig { ranks, num_experts: experts, m_align: 128 });
        ensure(matches!(got, Err(Error::InvalidArgument { arg: a, .. }) if a == arg), || {
            format!("{ranks} ranks, {experts} experts: {got:?}")
        })?;
    }
    Ok(())
}

// ---- Group: dispatch and combine ----------------------------------------------------------------

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One rank's host data: routing, payload bytes (`[tokens, row_bytes]`) and, for FP8, the scales
/// in the quantiser's layout `[hidden / 128, round_up(tokens, 4)]`.
struct HostRank {
    tokens: usize,
    k: usize,
    idx: Vec<i32>,
    w: Vec<f32>,
    x: Vec<u8>,
    sf: Vec<f32>,
}

fn sf_stride(tokens: usize) -> usize {
    tokens.div_ceil(4) * 4
}

/// Random ranks: `tokens[r]` tokens each, distinct experts per token, -1 slots, optionally a hot
/// expert 0 in slot 0. Payload bytes are finite (no E4M3 NaN pattern, bf16 of moderate values).
fn host_ranks(rng: &mut StdRng, shape: &GroupShape, tokens: &[usize], k: usize, hot: bool) -> Vec<HostRank> {
    let row = match shape.payload {
        Payload::Fp8 => shape.hidden,
        Payload::Bf16 => 2 * shape.hidden,
    };
    tokens
        .iter()
        .map(|&t| {
            let idx = routing(rng, t, k, shape.num_experts, hot);
            let w = (0..t * k).map(|_| rng.random_range(1..1000) as f32 / 512.0).collect();
            let x = match shape.payload {
                Payload::Fp8 => (0..t * row).map(|_| rng.random_range(0..0x7fu8) | if rng.random_bool(0.5) { 0x80 } else { 0 }).collect(),
                Payload::Bf16 => {
                    (0..t * shape.hidden).flat_map(|_| bf16::from_f32(rng.random_range(-4.0..4.0f32)).to_bits().to_le_bytes()).collect()
                }
            };
            let sf = (0..shape.hidden / 128 * sf_stride(t)).map(|_| rng.random_range(1..4096) as f32 / 1024.0).collect();
            HostRank { tokens: t, k, idx, w, x, sf }
        })
        .collect()
}

enum DevX {
    Bf16(CudaSlice<bf16>),
    Fp8(CudaSlice<F8E4M3>, CudaSlice<f32>),
}

struct DevRank {
    x: DevX,
    idx: CudaSlice<i32>,
    w: CudaSlice<f32>,
    tokens: usize,
    k: usize,
    x_len: usize,
    sf_len: usize,
}

fn upload<T: deepkern::cudarc::driver::DeviceRepr + Copy>(stream: &Arc<CudaStream>, v: &[T], fill: T) -> Result<CudaSlice<T>, String> {
    // At least one element: a zero-length allocation is not allowed.
    stream.clone_htod(&if v.is_empty() { vec![fill] } else { v.to_vec() }).map_err(err)
}

fn upload_ranks(stream: &Arc<CudaStream>, shape: &GroupShape, ranks: &[HostRank]) -> Result<Vec<DevRank>, String> {
    ranks
        .iter()
        .map(|r| {
            let x = match shape.payload {
                Payload::Fp8 => {
                    let q: Vec<F8E4M3> = r.x.iter().map(|&b| F8E4M3::from_bits(b)).collect();
                    DevX::Fp8(upload(stream, &q, F8E4M3::from_bits(0))?, upload(stream, &r.sf, 0.0)?)
                }
                Payload::Bf16 => {
                    let v: Vec<bf16> = r.x.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect();
                    DevX::Bf16(upload(stream, &v, bf16::ZERO)?)
                }
            };
            Ok(DevRank {
                x,
                idx: upload(stream, &r.idx, -1)?,
                w: upload(stream, &r.w, 0.0)?,
                tokens: r.tokens,
                k: r.k,
                x_len: r.tokens * shape.hidden,
                sf_len: r.sf.len(),
            })
        })
        .collect()
}

fn inputs(dev: &[DevRank]) -> Vec<RankInput<'_>> {
    dev.iter()
        .map(|d| RankInput {
            x: match &d.x {
                DevX::Bf16(x) => Tokens::Bf16(x.slice(..d.x_len)),
                DevX::Fp8(q, sf) => Tokens::Fp8 { q: q.slice(..d.x_len), sf: sf.slice(..d.sf_len) },
            },
            topk_idx: d.idx.slice(..d.tokens * d.k),
            topk_weights: d.w.slice(..d.tokens * d.k),
            tokens: d.tokens,
            k: d.k,
        })
        .collect()
}

fn routings(ranks: &[HostRank]) -> Vec<Routing<'_>> {
    ranks.iter().map(|r| Routing { topk_idx: &r.idx, topk_weights: &r.w, tokens: r.tokens, k: r.k }).collect()
}

fn packed(shape: &GroupShape, s: &RowSource) -> i32 {
    ((s.src_rank as usize * shape.max_tokens + s.token as usize) * shape.max_topk + s.slot as usize) as i32
}

/// Received payload bytes and scales on the host.
fn download_rows(stream: &Arc<CudaStream>, rows: &Rows) -> Result<(Vec<u8>, Vec<f32>), String> {
    Ok(match rows {
        Rows::Bf16(x) => (stream.clone_dtoh(x).map_err(err)?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(), Vec::new()),
        Rows::Fp8 { q, sf } => {
            (stream.clone_dtoh(q).map_err(err)?.iter().map(|v| v.to_bits()).collect(), stream.clone_dtoh(sf).map_err(err)?)
        }
    })
}

/// Checks one received row against its source (or zero padding when `src` is None).
#[allow(clippy::too_many_arguments)]
fn check_row(
    shape: &GroupShape,
    ranks: &[HostRank],
    x: &[u8],
    sf: &[f32],
    row: usize,
    sf_at: impl Fn(usize) -> usize,
    src: Option<&RowSource>,
    what: &str,
) -> TestResult {
    let rb = match shape.payload {
        Payload::Fp8 => shape.hidden,
        Payload::Bf16 => 2 * shape.hidden,
    };
    let got = &x[row * rb..(row + 1) * rb];
    match src {
        Some(s) => {
            let r = &ranks[s.src_rank as usize];
            let want = &r.x[s.token as usize * rb..(s.token as usize + 1) * rb];
            ensure(got == want, || format!("{what}: row {row} payload differs from rank {} token {}", s.src_rank, s.token))?;
            if shape.payload == Payload::Fp8 {
                for kb in 0..shape.hidden / 128 {
                    let (g, w) = (sf[sf_at(kb)], r.sf[kb * sf_stride(r.tokens) + s.token as usize]);
                    ensure(g.to_bits() == w.to_bits(), || format!("{what}: row {row} scale {kb}: {g} != {w}"))?;
                }
            }
        }
        None => {
            ensure(got.iter().all(|&b| b == 0), || format!("{what}: padding row {row} not zero"))?;
            if shape.payload == Payload::Fp8 {
                ensure((0..shape.hidden / 128).all(|kb| sf[sf_at(kb)] == 0.0), || format!("{what}: padding row {row} scale not zero"))?;
            }
        }
    }
    Ok(())
}

/// Random `y` (bf16 values) for every rank's received rows.
fn random_ys(rng: &mut StdRng, received: &[Received], h: usize) -> Vec<Vec<f32>> {
    received.iter().map(|r| (0..r.rows.len() * h).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0f32)).to_f32()).collect()).collect()
}

/// Checks rank `r`'s combined tokens `got` against the f64 reference of every rank's `received`
/// rows and `ys`, within bf16 rounding and the f32 accumulation bound.
fn expect_combined(what: &str, received: &[Received], ys: &[Vec<f32>], tokens: &[usize], h: usize, r: usize, got: &[bf16]) -> TestResult {
    let yrefs: Vec<&[f32]> = ys.iter().map(Vec::as_slice).collect();
    let want = combine(received, &yrefs, tokens, h);
    // |w·y| per token, for the f32 accumulation bound.
    let mut mag = vec![0.0f64; tokens[r] * h];
    for (d, recv) in received.iter().enumerate() {
        for (row, src) in recv.rows.iter().enumerate() {
            let Some(s) = src else { continue };
            if s.src_rank as usize != r {
                continue;
            }
            for c in 0..h {
                mag[s.token as usize * h + c] += f64::from(s.weight).abs() * f64::from(ys[d][row * h + c]).abs();
            }
        }
    }
    for i in 0..tokens[r] * h {
        let (g, w) = (f64::from(got[i].to_f32()), want[r][i]);
        let tol = w.abs() * 2f64.powi(-8) + mag[i] * 1e-6 + 1e-30;
        ensure((g - w).abs() <= tol, || format!("{what}: combine rank {r} element {i}: {g} vs {w}"))?;
    }
    Ok(())
}

/// Runs combine with random `y` per rank and checks it against the f64 reference.
fn check_combine(
    gpu: &Gpu,
    rng: &mut StdRng,
    group: &mut Group,
    ranks: &[HostRank],
    received: &[Received],
    handles: &[&Handle],
    what: &str,
) -> TestResult {
    let stream = group.stream().clone();
    let h = group.shape().hidden;
    let ys = random_ys(rng, received, h);
    let d_ys = ys
        .iter()
        .map(|y| upload(&stream, &y.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), bf16::ZERO))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = d_ys.iter().zip(received).map(|(y, r)| y.slice(..r.rows.len() * h)).collect();
    let outs = group.combine(&views, handles).map_err(err)?;
    let tokens: Vec<usize> = ranks.iter().map(|r| r.tokens).collect();
    for (r, out) in outs.iter().enumerate() {
        let got = stream.clone_dtoh(out).map_err(err)?;
        expect_combined(what, received, &ys, &tokens, h, r, &got)?;
    }
    let _ = gpu;
    group.check().map_err(err)?;
    Ok(())
}

/// Cases: (ranks, experts, hidden, k, tokens per rank, hot expert). The simulator gets narrower
/// rows; one of them still has more than 32 scale groups, so the lanes' stride over them wraps.
fn cases(gpu: &Gpu) -> Vec<(usize, usize, usize, usize, Vec<usize>, bool)> {
    let h = |hardware: usize, simulated: usize| gpu.pick(hardware, simulated);
    vec![
        (1, 8, h(2048, 256), 4, vec![37], false),
        (2, 16, h(4096, 640), 8, vec![64, 0], false),
        (2, 16, h(7168, 4224), 8, vec![50, 19], true),
        (4, 64, h(2048, 384), 8, vec![64, 1, 33, 0], false),
        (4, 32, h(7168, 1024), 6, vec![20, 64, 5, 64], true),
        (8, 256, h(7168, 512), 8, vec![64, 64, 0, 17, 64, 3, 64, 40], false),
        (8, 64, h(4096, 768), 16, vec![10, 0, 64, 64, 2, 64, 33, 1], true),
    ]
}

fn dispatch_combine_match_reference(gpu: &Gpu) -> TestResult {
    dispatch_combine_cases(
        gpu,
        "dispatch_combine_match_reference",
        &[
            (Payload::Fp8, Transport::Peer, false),
            (Payload::Bf16, Transport::Peer, false),
            (Payload::Fp8, Transport::CopyEngine, false),
            (Payload::Bf16, Transport::CopyEngine, false),
        ],
    )
}

/// Each rank's send and receive on a stream of its own ([`Group::set_concurrent_ranks`]), so
/// every receive waits on the device for the other ranks' signals: on one stream, stream order
/// alone would order them, and the signal protocol would go untested.
fn concurrent_ranks_match_reference(gpu: &Gpu) -> TestResult {
    dispatch_combine_cases(gpu, "concurrent_ranks_match_reference", &[(Payload::Fp8, Transport::Peer, true)])
}

fn dispatch_combine_cases(gpu: &Gpu, name: &str, variants: &[(Payload, Transport, bool)]) -> TestResult {
    let mut rng = gpu.rng(name);
    let stream = gpu.stream();
    for &(payload, transport, concurrent) in variants {
        for (r, e, h, k, tokens, hot) in cases(gpu) {
            let shape = GroupShape { transport, ..GroupShape::new(r, e, h, 64, k, payload) };
            let what = format!("{payload:?} {transport:?} concurrent={concurrent} R={r} E={e} H={h} top-{k} tokens {tokens:?} hot={hot}");
            let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
            if concurrent {
                group.set_concurrent_ranks(true).map_err(err)?;
                group.set_num_sms(group.num_sms().min(8)).map_err(err)?;
            }
            let ranks = host_ranks(&mut rng, &shape, &tokens, k, hot);
            let dev = upload_ranks(&stream, &shape, &ranks)?;
            let got = group.dispatch(&inputs(&dev)).map_err(err)?;
            let cfg = EpConfig { ranks: r, num_experts: e, m_align: shape.m_align };
            let want = dispatch(&routings(&ranks), &cfg).map_err(err)?;
            for (d, (g, w)) in got.iter().zip(&want).enumerate() {
                let what = format!("{what}, rank {d}");
                ensure(g.rows == w.rows.len(), || format!("{what}: {} rows, want {}", g.rows, w.rows.len()))?;
                ensure(g.counts.iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || {
                    format!("{what}: counts {:?} vs {:?}", g.counts, w.counts)
                })?;
                let m_idx = stream.clone_dtoh(&g.m_indices).map_err(err)?;
                ensure(m_idx[..g.rows] == w.expert[..], || format!("{what}: m_indices differ"))?;
                let weights = stream.clone_dtoh(&g.weights).map_err(err)?;
                let src = stream.clone_dtoh(&g.handle.src()).map_err(err)?;
                let (x, sf) = download_rows(&stream, &g.x)?;
                for (row, s) in w.rows.iter().enumerate() {
                    let (want_w, want_src) = s.as_ref().map_or((0.0, -1), |s| (s.weight, packed(&shape, s)));
                    ensure(weights[row].to_bits() == want_w.to_bits(), || {
                        format!("{what}: row {row} weight {} vs {want_w}", weights[row])
                    })?;
                    ensure(src[row] == want_src, || format!("{what}: row {row} source {} vs {want_src}", src[row]))?;
                    check_row(&shape, &ranks, &x, &sf, row, |kb| kb * g.rows + row, s.as_ref(), &what)?;
                }
            }
            group.check().map_err(err)?;
            let handles: Vec<&Handle> = got.iter().map(|g| &g.handle).collect();
            check_combine(gpu, &mut rng, &mut group, &ranks, &want, &handles, &what)?;
        }
    }
    Ok(())
}

fn low_latency_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("low_latency_matches_reference");
    let stream = gpu.stream();
    for payload in [Payload::Fp8, Payload::Bf16] {
        for (r, e, h, k, tokens, hot) in cases(gpu) {
            let shape = GroupShape::new(r, e, h, 64, k, payload);
            let what = format!("LL {payload:?} R={r} E={e} H={h} top-{k} tokens {tokens:?} hot={hot}");
            let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
            let ranks = host_ranks(&mut rng, &shape, &tokens, k, hot);
            let dev = upload_ranks(&stream, &shape, &ranks)?;
            let got = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
            let cfg = EpConfig { ranks: r, num_experts: e, m_align: shape.m_align };
            let want = dispatch_low_latency(&routings(&ranks), &cfg, shape.ll_max_tokens).map_err(err)?;
            let (el, kb) = (shape.experts_per_rank(), h / 128);
            let stride = shape.ll_capacity().div_ceil(4) * 4;
            for (d, (g, w)) in got.iter().zip(&want).enumerate() {
                let what = format!("{what}, rank {d}");
                ensure(g.capacity == w.capacity, || format!("{what}: capacity {} vs {}", g.capacity, w.capacity))?;
                let masked = stream.clone_dtoh(&g.masked_m).map_err(err)?;
                ensure(masked[..el].iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || {
                    format!("{what}: masked_m {masked:?} vs {:?}", w.counts)
                })?;
                let src = stream.clone_dtoh(&g.handle.src()).map_err(err)?;
                let (x, sf) = download_rows(&stream, &g.x)?;
                for le in 0..el {
                    for row in 0..g.capacity {
                        let i = le * g.capacity + row;
                        let want_src = w.rows[i].as_ref().map_or(-1, |s| packed(&shape, s));
                        ensure(src[i] == want_src, || format!("{what}: expert {le} row {row} source {} vs {want_src}", src[i]))?;
                        if let Some(s) = &w.rows[i] {
                            check_row(&shape, &ranks, &x, &sf, i, |b| (le * kb + b) * stride + row, Some(s), &what)?;
                        }
                    }
                }
            }
            group.check().map_err(err)?;
            let received: Vec<Received> = want
                .iter()
                .map(|w| Received { rows: w.rows.clone(), expert: Vec::new(), counts: Vec::new(), offsets: Vec::new() })
                .collect();
            let handles: Vec<&Handle> = got.iter().map(|g| &g.handle).collect();
            check_combine(gpu, &mut rng, &mut group, &ranks, &received, &handles, &what)?;
        }
    }
    Ok(())
}

fn identity_experts_combine_to_weighted_x(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("identity_experts_combine_to_weighted_x");
    let stream = gpu.stream();
    let shape = GroupShape::new(4, 32, gpu.pick(4096, 512), 128, 8, Payload::Bf16);
    let ranks = host_ranks(&mut rng, &shape, &[128, 77, 0, 128], 8, false);
    let dev = upload_ranks(&stream, &shape, &ranks)?;
    for (transport, low_latency) in
        [(Transport::Peer, false), (Transport::Peer, true), (Transport::CopyEngine, false), (Transport::CopyEngine, true)]
    {
        // A copy-engine group still runs low-latency mode (and its combine) the peer way.
        let mut group = Group::new_virtual(&stream, GroupShape { transport, ..shape }).map_err(err)?;
        let outs = if low_latency {
            // The received rows, reached through the accessor, are the experts' outputs as they
            // stand (whole slices: the low-latency layout's rows are exactly its buffer).
            let got = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
            let ys =
                got.iter().map(|g| g.x.bf16().map(|x| x.slice(..)).ok_or("bf16 group, no bf16 rows")).collect::<Result<Vec<_>, _>>()?;
            group.combine(&ys, &got).map_err(err)?
        } else {
            let got = group.dispatch(&inputs(&dev)).map_err(err)?;
            let ys: Vec<_> =
                got.iter().map(|g| g.x.bf16().map(|x| x.slice(..g.rows * shape.hidden)).ok_or("no bf16 rows")).collect::<Result<_, _>>()?;
            group.combine(&ys, &got).map_err(err)?
        };
        for (r, (out, host)) in outs.iter().zip(&ranks).enumerate() {
            let got = stream.clone_dtoh(out).map_err(err)?;
            for t in 0..host.tokens {
                let sw: f64 = (0..host.k).filter(|&j| host.idx[t * host.k + j] >= 0).map(|j| f64::from(host.w[t * host.k + j])).sum();
                for c in 0..shape.hidden {
                    let b = 2 * (t * shape.hidden + c);
                    let x = f64::from(bf16::from_bits(u16::from_le_bytes([host.x[b], host.x[b + 1]])).to_f32());
                    let (g, w) = (f64::from(got[t * shape.hidden + c].to_f32()), x * sw);
                    ensure((g - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-6 * x.abs() * sw, || {
                        format!("{transport:?} low_latency={low_latency}: rank {r} token {t} column {c}: {g} vs {w}")
                    })?;
                }
            }
        }
        group.check().map_err(err)?;
    }
    Ok(())
}

/// One rank's received bytes: payload, scales, sources (and masked_m).
type Snapshot = (Vec<u8>, Vec<f32>, Vec<i32>);

fn repeated_calls_are_bit_identical(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("repeated_calls_are_bit_identical");
    let stream = gpu.stream();
    let shape = GroupShape::new(8, 64, gpu.pick(2048, 512), 64, 8, Payload::Fp8);
    let ranks = host_ranks(&mut rng, &shape, &[64, 64, 3, 0, 64, 64, 17, 64], 8, true);
    let dev = upload_ranks(&stream, &shape, &ranks)?;
    // Every transport and every round must give the same bytes (the simulator's six rounds still
    // cover both transports and every SM count of the cycle).
    let mut first: Option<Vec<Snapshot>> = None;
    for round in 0..gpu.pick(30, 6) {
        let transport = if round % 3 == 2 { Transport::CopyEngine } else { Transport::Peer };
        let mut group = Group::new_virtual(&stream, GroupShape { transport, ..shape }).map_err(err)?;
        group.set_num_sms(1 + round % 4).map_err(err)?;
        let normal = group.dispatch(&inputs(&dev)).map_err(err)?;
        let mut snapshot = Vec::new();
        for g in &normal {
            let (x, sf) = download_rows(&stream, &g.x)?;
            snapshot.push((x, sf, stream.clone_dtoh(&g.handle.src()).map_err(err)?));
        }
        combine_zeros(&stream, &mut group, &normal.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
        let ll = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
        combine_zeros(&stream, &mut group, &ll.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
        for g in &ll {
            let (x, sf) = download_rows(&stream, &g.x)?;
            let mut src = stream.clone_dtoh(&g.handle.src()).map_err(err)?;
            src.extend(stream.clone_dtoh(&g.masked_m).map_err(err)?);
            snapshot.push((x, sf, src));
        }
        group.check().map_err(err)?;
        match &first {
            None => first = Some(snapshot),
            Some(f) => ensure(*f == snapshot, || format!("round {round} ({transport:?}) differs from round 0"))?,
        }
    }
    Ok(())
}

/// Finishes a round with zero expert outputs: a dispatch must be combined before the next one.
fn combine_zeros(stream: &Arc<CudaStream>, group: &mut Group, handles: &[&Handle]) -> Result<Vec<CudaSlice<bf16>>, String> {
    let h = group.shape().hidden;
    let ys = handles.iter().map(|x| stream.alloc_zeros::<bf16>((x.rows() * h).max(1)).map_err(err)).collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = ys.iter().zip(handles).map(|(y, x)| y.slice(..x.rows() * h)).collect();
    group.combine(&views, handles).map_err(err)
}

fn group_rejects_bad_input(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("group_rejects_bad_input");
    let stream = gpu.stream();
    let arg_of = |r: Result<(), deepkern::Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. } | Error::Dtype { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {other:?}")),
    };
    let shape = GroupShape::new(2, 8, 256, 16, 4, Payload::Fp8);
    ensure(arg_of(Group::new_virtual(&stream, GroupShape { hidden: 200, ..shape }).map(|_| ()))? == "hidden", || {
        "hidden 200 accepted".into()
    })?;
    ensure(arg_of(Group::new_virtual(&stream, GroupShape { num_experts: 7, ..shape }).map(|_| ()))? == "num_experts", || {
        "7 experts on 2 ranks accepted".into()
    })?;
    ensure(arg_of(Group::new_virtual(&stream, GroupShape { transport: Transport::Nccl, ..shape }).map(|_| ()))? == "transport", || {
        "a virtual group with the NCCL transport accepted".into()
    })?;
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    ensure(arg_of(group.set_num_sms(100_000))? == "num_sms", || "100000 SMs accepted".into())?;
    ensure(arg_of(group.set_timeout(std::time::Duration::ZERO))? == "timeout", || "a zero timeout accepted".into())?;
    let mut ranks = host_ranks(&mut rng, &shape, &[16, 8], 4, false);
    // An expert index >= num_experts: normal dispatch refuses before moving data.
    ranks[1].idx[5] = 8;
    let dev = upload_ranks(&stream, &shape, &ranks)?;
    ensure(arg_of(group.dispatch(&inputs(&dev)).map(|_| ()))? == "topk_idx", || "expert 8 of 8 accepted".into())?;
    // Low latency: the slot is ignored and counted; everything else arrives.
    let got = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
    ensure(got[1].handle.invalid_slots(&stream).map_err(err)? == 1, || "the invalid slot was not counted".into())?;
    combine_zeros(&stream, &mut group, &got.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
    ranks[1].idx[5] = -1;
    let cfg = EpConfig { ranks: 2, num_experts: 8, m_align: 128 };
    let want = dispatch_low_latency(&routings(&ranks), &cfg, shape.ll_max_tokens).map_err(err)?;
    for (g, w) in got.iter().zip(&want) {
        let masked = stream.clone_dtoh(&g.masked_m).map_err(err)?;
        ensure(masked.iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || format!("masked_m {masked:?} vs {:?}", w.counts))?;
    }
    group.check().map_err(err)?;
    // Too many tokens, wrong k, wrong payload type, wrong lengths.
    let big = host_ranks(&mut rng, &GroupShape { max_tokens: 17, ..shape }, &[17, 1], 4, false);
    let big_dev = upload_ranks(&stream, &shape, &big)?;
    ensure(arg_of(group.dispatch(&inputs(&big_dev)).map(|_| ()))? == "tokens", || "17 tokens accepted with max_tokens 16".into())?;
    let mut ins = inputs(&dev);
    ins[0].k = 5;
    ensure(arg_of(group.dispatch(&ins).map(|_| ()))? == "k", || "k = 5 accepted with max_topk 4".into())?;
    let bf = host_ranks(&mut rng, &GroupShape { payload: Payload::Bf16, ..shape }, &[4, 4], 4, false);
    let bf_dev = upload_ranks(&stream, &GroupShape { payload: Payload::Bf16, ..shape }, &bf)?;
    ensure(arg_of(group.dispatch(&inputs(&bf_dev)).map(|_| ()))? == "x", || "bf16 payload accepted by an FP8 group".into())?;
    let mut ins = inputs(&dev);
    ins[1].topk_weights = dev[1].w.slice(..3);
    ensure(arg_of(group.dispatch(&ins).map(|_| ()))? == "topk_weights", || "short topk_weights accepted".into())?;
    ensure(arg_of(group.dispatch(&inputs(&dev[..1])).map(|_| ()))? == "inputs", || "one input for two ranks accepted".into())?;
    // Receive buffers smaller than what one hot expert receives.
    let small = GroupShape { recv_rows: 100, ..shape };
    let mut small_group = Group::new_virtual(&stream, small).map_err(err)?;
    let hot = host_ranks(&mut rng, &small, &[16, 16], 4, true);
    let hot_dev = upload_ranks(&stream, &small, &hot)?;
    ensure(arg_of(small_group.dispatch(&inputs(&hot_dev)).map(|_| ()))? == "recv_rows", || "overflowing dispatch accepted".into())?;
    // Combine with a y of the wrong length.
    let ok = host_ranks(&mut rng, &shape, &[4, 4], 4, false);
    let ok_dev = upload_ranks(&stream, &shape, &ok)?;
    let got = group.dispatch(&inputs(&ok_dev)).map_err(err)?;
    let y = stream.alloc_zeros::<bf16>(got[0].rows * shape.hidden + 1).map_err(err)?;
    ensure(arg_of(group.combine_send(&y.slice(..), &got[0].handle))? == "y", || "y of the wrong length accepted".into())?;
    Ok(())
}

fn refused(r: Result<(), Error>, call: &str) -> Result<(), String> {
    match r {
        Err(Error::InvalidArgument { arg, .. }) if arg == call => Ok(()),
        other => Err(format!("expected `{call}` to be refused, got {other:?}")),
    }
}

fn zeros_for(stream: &Arc<CudaStream>, handle: &Handle, hidden: usize) -> Result<CudaSlice<bf16>, String> {
    stream.alloc_zeros::<bf16>((handle.rows() * hidden).max(1)).map_err(err)
}

fn call_order_is_enforced(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("call_order_is_enforced");
    let stream = gpu.stream();
    let shape = GroupShape::new(2, 8, 256, 16, 4, Payload::Bf16);
    let h = shape.hidden;
    let ranks = host_ranks(&mut rng, &shape, &[16, 9], 4, false);
    let dev = upload_ranks(&stream, &shape, &ranks)?;
    let cfg = EpConfig { ranks: 2, num_experts: 8, m_align: shape.m_align };
    let want = dispatch(&routings(&ranks), &cfg).map_err(err)?;
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    // Normal mode: nothing may start before the combine, and a receive waits for its send.
    let got = group.dispatch(&inputs(&dev)).map_err(err)?;
    refused(group.dispatch(&inputs(&dev)).map(|_| ()), "dispatch")?;
    refused(group.dispatch_low_latency(&inputs(&dev)).map(|_| ()), "dispatch_low_latency_send")?;
    refused(group.combine_recv(&got[0].handle).map(|_| ()), "combine_recv")?;
    // Rank 0's receive before rank 1's send would wait for work queued behind it.
    let y0 = zeros_for(&stream, &got[0].handle, h)?;
    group.combine_send(&y0.slice(..got[0].rows * h), &got[0].handle).map_err(err)?;
    refused(group.combine_send(&y0.slice(..got[0].rows * h), &got[0].handle), "combine_send")?;
    refused(group.combine_recv(&got[0].handle).map(|_| ()), "combine_recv")?;
    let y1 = zeros_for(&stream, &got[1].handle, h)?;
    group.combine_send(&y1.slice(..got[1].rows * h), &got[1].handle).map_err(err)?;
    let out = [group.combine_recv(&got[0].handle).map_err(err)?, group.combine_recv(&got[1].handle).map_err(err)?];
    for (r, o) in out.iter().enumerate() {
        ensure(stream.clone_dtoh(o).map_err(err)?.iter().all(|v| v.to_f32() == 0.0), || format!("rank {r}: combine of zeros is not zero"))?;
    }
    // A handle of an earlier round is refused in the next one.
    let again = group.dispatch(&inputs(&dev)).map_err(err)?;
    refused(group.combine_send(&y0.slice(..got[0].rows * h), &got[0].handle), "handle")?;
    let m_idx = stream.clone_dtoh(&again[1].m_indices).map_err(err)?;
    ensure(again[1].rows == want[1].rows.len() && m_idx[..again[1].rows] == want[1].expert[..], || "round 2: layout differs".into())?;
    combine_zeros(&stream, &mut group, &again.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
    // Low latency: a receive before its send's peers sent is refused and can be retried.
    let ins = inputs(&dev);
    let mut p0 = group.dispatch_low_latency_send(0, &ins[0]).map_err(err)?;
    refused(group.dispatch_low_latency_send(0, &ins[0]).map(|_| ()), "dispatch_low_latency_send")?;
    refused(group.dispatch_low_latency_recv(&mut p0).map(|_| ()), "dispatch_low_latency_recv")?;
    let mut p1 = group.dispatch_low_latency_send(1, &ins[1]).map_err(err)?;
    let ll = [group.dispatch_low_latency_recv(&mut p0).map_err(err)?, group.dispatch_low_latency_recv(&mut p1).map_err(err)?];
    refused(group.dispatch_low_latency_recv(&mut p1).map(|_| ()), "dispatch_low_latency_recv")?;
    let want_ll = dispatch_low_latency(&routings(&ranks), &cfg, shape.ll_max_tokens).map_err(err)?;
    for (r, (g, w)) in ll.iter().zip(&want_ll).enumerate() {
        let masked = stream.clone_dtoh(&g.masked_m).map_err(err)?;
        ensure(masked.iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || format!("rank {r}: masked_m {masked:?}"))?;
    }
    combine_zeros(&stream, &mut group, &ll.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
    group.check().map_err(err)?;
    Ok(())
}

fn refused_dispatch_then_good_rounds(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("refused_dispatch_then_good_rounds");
    let stream = gpu.stream();
    let shape = GroupShape::new(4, 16, 256, 32, 4, Payload::Fp8);
    let good = host_ranks(&mut rng, &shape, &[32, 7, 0, 32], 4, true);
    let mut bad = host_ranks(&mut rng, &shape, &[32, 7, 0, 32], 4, true);
    bad[3].idx[9] = 16;
    let (good_dev, bad_dev) = (upload_ranks(&stream, &shape, &good)?, upload_ranks(&stream, &shape, &bad)?);
    let cfg = EpConfig { ranks: 4, num_experts: 16, m_align: shape.m_align };
    let want = dispatch(&routings(&good), &cfg).map_err(err)?;
    for (transport, concurrent) in [(Transport::Peer, false), (Transport::Peer, true), (Transport::CopyEngine, false)] {
        let what = format!("{transport:?} concurrent={concurrent}");
        let mut group = Group::new_virtual(&stream, GroupShape { transport, ..shape }).map_err(err)?;
        group.set_concurrent_ranks(concurrent).map_err(err)?;
        for round in 0..3 {
            refused(group.dispatch(&inputs(&bad_dev)).map(|_| ()), "topk_idx").map_err(|e| format!("{what} round {round}: {e}"))?;
            let got = group.dispatch(&inputs(&good_dev)).map_err(err)?;
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let m_idx = stream.clone_dtoh(&g.m_indices).map_err(err)?;
                ensure(g.rows == w.rows.len() && m_idx[..g.rows] == w.expert[..], || format!("{what} round {round}: rank {r}'s layout"))?;
                let (x, sf) = download_rows(&stream, &g.x)?;
                for (row, src) in w.rows.iter().enumerate() {
                    check_row(&shape, &good, &x, &sf, row, |kb| kb * g.rows + row, src.as_ref(), &what)?;
                }
            }
            let handles: Vec<&Handle> = got.iter().map(|g| &g.handle).collect();
            check_combine(gpu, &mut rng, &mut group, &good, &want, &handles, &what)?;
            let ll = group.dispatch_low_latency(&inputs(&good_dev)).map_err(err)?;
            combine_zeros(&stream, &mut group, &ll.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
            group.check().map_err(|e| format!("{what} round {round}: {e}"))?;
        }
    }
    Ok(())
}

fn errors_poison_refuse_and_clear(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("errors_poison_refuse_and_clear");
    let stream = gpu.stream();
    let shape = GroupShape { ll_max_tokens: 4, ..GroupShape::new(2, 4, 256, 8, 2, Payload::Bf16) };
    let h = shape.hidden;
    let good = host_ranks(&mut rng, &shape, &[4, 4], 2, false);
    // Rank 1 names expert 0 twice in every token: 8 pairs for 4 staging rows, an overflow.
    let mut dup = host_ranks(&mut rng, &shape, &[4, 4], 2, false);
    dup[1].idx = vec![0; 8];
    let (good_dev, dup_dev) = (upload_ranks(&stream, &shape, &good)?, upload_ranks(&stream, &shape, &dup)?);
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    let ll = group.dispatch_low_latency(&inputs(&dup_dev)).map_err(err)?;
    for (r, g) in ll.iter().enumerate() {
        // Every rank's receive saw rank 1's published overflow: all rows NaN, no sources.
        let masked = stream.clone_dtoh(&g.masked_m).map_err(err)?;
        ensure(masked.iter().all(|&m| m as usize == g.capacity), || format!("rank {r}: masked_m {masked:?} after a peer's overflow"))?;
        ensure(stream.clone_dtoh(&g.handle.src()).map_err(err)?.iter().all(|&s| s == -1), || {
            format!("rank {r}: a poisoned row has a source")
        })?;
        let Rows::Bf16(x) = &g.x else { unreachable!() };
        ensure(stream.clone_dtoh(x).map_err(err)?.iter().all(|v| v.to_f32().is_nan()), || format!("rank {r}: a poisoned row is not NaN"))?;
    }
    // The combine of that round is poisoned too, on every rank.
    let ys: Vec<_> = ll.iter().map(|g| zeros_for(&stream, &g.handle, h)).collect::<Result<_, _>>()?;
    let views: Vec<_> = ys.iter().zip(&ll).map(|(y, g)| y.slice(..g.handle.rows() * h)).collect();
    let outs = group.combine(&views, &ll.iter().map(|g| &g.handle).collect::<Vec<_>>()).map_err(err)?;
    for (r, o) in outs.iter().enumerate() {
        ensure(stream.clone_dtoh(o).map_err(err)?.iter().all(|v| v.to_f32().is_nan()), || {
            format!("rank {r}: combine output not poisoned")
        })?;
    }
    // Until the error is read, every rank refuses a normal dispatch, naming rank 1.
    match group.dispatch(&inputs(&good_dev)) {
        Err(Error::Communication { rank: 1, reason }) if reason.contains("did not fit") => {}
        other => return Err(format!("dispatch after an unread error: {:?}", other.map(|_| ())).into()),
    }
    // check reports it (rank 1 overflowed; rank 0 was poisoned by it) and clears it.
    match group.check() {
        Err(Error::Communication { rank: 0, reason }) if reason.contains("peer reported an error") => {}
        other => return Err(format!("first check: {other:?}").into()),
    }
    group.check().map_err(|e| format!("second check still reports: {e}"))?;
    // The group works again, in both modes.
    let cfg = EpConfig { ranks: 2, num_experts: 4, m_align: shape.m_align };
    let want = dispatch(&routings(&good), &cfg).map_err(err)?;
    let got = group.dispatch(&inputs(&good_dev)).map_err(err)?;
    let handles: Vec<&Handle> = got.iter().map(|g| &g.handle).collect();
    check_combine(gpu, &mut rng, &mut group, &good, &want, &handles, "after check")?;
    let ll = group.dispatch_low_latency(&inputs(&good_dev)).map_err(err)?;
    let want_ll = dispatch_low_latency(&routings(&good), &cfg, shape.ll_max_tokens).map_err(err)?;
    for (r, (g, w)) in ll.iter().zip(&want_ll).enumerate() {
        let masked = stream.clone_dtoh(&g.masked_m).map_err(err)?;
        ensure(masked.iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || format!("rank {r}: masked_m {masked:?} after check"))?;
    }
    combine_zeros(&stream, &mut group, &ll.iter().map(|g| &g.handle).collect::<Vec<_>>())?;
    group.check().map_err(err)?;
    Ok(())
}

/// What users write: `RankInput::new` on whole buffers, `combine(&ys, &received)` with whole
/// `CudaSlice`s as expert outputs, the rows
/// reached through `Rows::bf16`, and for a rank that received no rows the one-row buffer of
/// `Group::alloc_expert_output` (no `rows.max(1)` and no view to cut). Identity experts, so every
/// token comes back as `Σ weights · x`.
fn combine_takes_dispatch_results(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("combine_takes_dispatch_results");
    let stream = gpu.stream();
    // 2 ranks of 4 experts; every token picks experts 0..4 (all rank 0's): rank 1 receives nothing.
    let shape = GroupShape::new(2, 8, 256, 32, 4, Payload::Bf16);
    let mut ranks = host_ranks(&mut rng, &shape, &[32, 5], 4, false);
    for r in &mut ranks {
        for (i, e) in r.idx.iter_mut().enumerate() {
            *e = (i % 4) as i32;
        }
    }
    // Whole buffers of exactly each rank's tokens, through RankInput::new (tokens from the routing).
    let mut bufs = Vec::new();
    for r in &ranks {
        let x: Vec<bf16> = r.x.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
        bufs.push((upload(&stream, &x, bf16::ZERO)?, upload(&stream, &r.idx, -1)?, upload(&stream, &r.w, 0.0)?));
    }
    let ins: Vec<RankInput> = bufs.iter().map(|(x, idx, w)| RankInput::new(x, idx, w, 4)).collect();
    ensure(ins[0].tokens == 32 && ins[1].tokens == 5, || format!("tokens derived as {} and {}", ins[0].tokens, ins[1].tokens))?;
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    let got = group.dispatch(&ins).map_err(err)?;
    ensure(got[0].rows > 0 && got[1].rows == 0, || format!("rows received: {} and {}", got[0].rows, got[1].rows))?;
    ensure(got.iter().all(|g| g.x.fp8().is_none() && g.x.payload() == Payload::Bf16), || "a bf16 group's rows read as FP8".into())?;
    let mut ys: Vec<CudaSlice<bf16>> = Vec::new();
    for g in &got {
        let mut y = group.alloc_expert_output(g).map_err(err)?;
        if g.rows > 0 {
            let x = g.x.bf16().ok_or("bf16 group, no bf16 rows")?;
            ensure(x.len() == y.len(), || format!("rows {} vs expert output {}", x.len(), y.len()))?;
            stream.memcpy_dtod(x, &mut y).map_err(err)?;
        } else {
            ensure(y.len() == shape.hidden, || format!("an empty rank's expert output has {} elements", y.len()))?;
        }
        ys.push(y);
    }
    let outs = group.combine(&ys, &got).map_err(err)?;
    for (r, (out, host)) in outs.iter().zip(&ranks).enumerate() {
        let out = stream.clone_dtoh(out).map_err(err)?;
        for t in 0..host.tokens {
            let sw: f64 = (0..host.k).map(|j| f64::from(host.w[t * host.k + j])).sum();
            for c in 0..shape.hidden {
                let b = 2 * (t * shape.hidden + c);
                let x = f64::from(bf16::from_bits(u16::from_le_bytes([host.x[b], host.x[b + 1]])).to_f32());
                let (g, w) = (f64::from(out[t * shape.hidden + c].to_f32()), x * sw);
                ensure((g - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-6 * x.abs() * sw, || {
                    format!("rank {r} token {t} column {c}: {g} vs {w}")
                })?;
            }
        }
    }
    group.check().map_err(err)?;
    Ok(())
}

fn unweighted_combine_sums_rows(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("unweighted_combine_sums_rows");
    let stream = gpu.stream();
    let shape = GroupShape::new(2, 8, 256, 32, 4, Payload::Bf16);
    let ranks = host_ranks(&mut rng, &shape, &[32, 5], 4, false);
    let dev = upload_ranks(&stream, &shape, &ranks)?;
    let mut group = Group::new_virtual(&stream, shape).map_err(err)?;
    for weighted in [false, true] {
        let got = group.dispatch(&inputs(&dev)).map_err(err)?;
        let ys: Vec<_> =
            got.iter().map(|g| if let Rows::Bf16(x) = &g.x { x.slice(..g.rows * shape.hidden) } else { unreachable!() }).collect();
        let outs = if weighted {
            // The handle-based form, kept for callers that hold handles apart from the rows.
            let handles: Vec<&Handle> = got.iter().map(|g| &g.handle).collect();
            group.combine_handles(&ys, &handles)
        } else {
            group.combine_unweighted(&ys, &got)
        }
        .map_err(err)?;
        for (r, (out, host)) in outs.iter().zip(&ranks).enumerate() {
            let out = stream.clone_dtoh(out).map_err(err)?;
            for t in 0..host.tokens {
                let slots = (0..host.k).filter(|&j| host.idx[t * host.k + j] >= 0);
                let scale: f64 = if weighted { slots.map(|j| f64::from(host.w[t * host.k + j])).sum() } else { slots.count() as f64 };
                for c in 0..shape.hidden {
                    let b = 2 * (t * shape.hidden + c);
                    let x = f64::from(bf16::from_bits(u16::from_le_bytes([host.x[b], host.x[b + 1]])).to_f32());
                    let (g, w) = (f64::from(out[t * shape.hidden + c].to_f32()), x * scale);
                    ensure((g - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-6, || {
                        format!("weighted={weighted}: rank {r} token {t} column {c}: {g} vs {w}")
                    })?;
                }
            }
        }
    }
    group.check().map_err(err)?;
    Ok(())
}

fn node_group_of_one_process(gpu: &Gpu) -> TestResult {
    // SAFETY: only probes for the library; cudarc's loader panics when it is absent.
    if !unsafe { deepkern::cudarc::nccl::sys::is_culib_present() } {
        return Err("libnccl not found: node groups need NCCL".into());
    }
    let mut rng = gpu.rng("node_group_of_one_process");
    let stream = gpu.stream();
    let comms = deepkern::cudarc::nccl::Comm::from_devices(vec![stream.clone()]).map_err(|e| format!("NCCL init: {e:?}"))?;
    let shape = GroupShape::new(1, 8, 2048, 64, 4, Payload::Fp8);
    let mut group = Group::new_node(&comms[0], shape).map_err(err)?;
    ensure(group.local_ranks() == vec![0], || format!("local ranks {:?}", group.local_ranks()))?;
    let ranks = host_ranks(&mut rng, &shape, &[50], 4, true);
    let dev = upload_ranks(group.stream(), &shape, &ranks)?;
    let cfg = EpConfig { ranks: 1, num_experts: 8, m_align: shape.m_align };
    for round in 0..3 {
        let got = group.dispatch(&inputs(&dev)).map_err(err)?;
        let want = dispatch(&routings(&ranks), &cfg).map_err(err)?;
        let s = group.stream().clone();
        let m_idx = s.clone_dtoh(&got[0].m_indices).map_err(err)?;
        ensure(got[0].rows == want[0].rows.len() && m_idx[..got[0].rows] == want[0].expert[..], || {
            format!("round {round}: layout differs")
        })?;
        let (x, sf) = download_rows(&s, &got[0].x)?;
        for (row, src) in want[0].rows.iter().enumerate() {
            check_row(&shape, &ranks, &x, &sf, row, |kb| kb * got[0].rows + row, src.as_ref(), "node")?;
        }
        let handles = vec![&got[0].handle];
        check_combine(gpu, &mut rng, &mut group, &ranks, &want, &handles, "node")?;
        let ll = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
        let want_ll = dispatch_low_latency(&routings(&ranks), &cfg, shape.ll_max_tokens).map_err(err)?;
        let masked = s.clone_dtoh(&ll[0].masked_m).map_err(err)?;
        ensure(masked.iter().map(|&c| c as u32).eq(want_ll[0].counts.iter().copied()), || format!("round {round}: masked_m differs"))?;
        combine_zeros(&s, &mut group, &[&ll[0].handle])?;
    }
    group.check().map_err(err)?;
    Ok(())
}

/// The NCCL transport at world size 1: counts all-gathered and the outbox moved with NCCL (a
/// send to itself), then the same layout, bytes and combine as the reference; low-latency mode is
/// refused with a clear error.
fn nccl_group_of_one_process(gpu: &Gpu) -> TestResult {
    // SAFETY: only probes for the library; cudarc's loader panics when it is absent.
    if !unsafe { deepkern::cudarc::nccl::sys::is_culib_present() } {
        return Err("libnccl not found: NCCL groups need NCCL".into());
    }
    let mut rng = gpu.rng("nccl_group_of_one_process");
    let stream = gpu.stream();
    let mut comms = deepkern::cudarc::nccl::Comm::from_devices(vec![stream.clone()]).map_err(|e| format!("NCCL init: {e:?}"))?;
    let mut comm = Some(comms.pop().ok_or("no communicator")?);
    for payload in [Payload::Fp8, Payload::Bf16] {
        let shape = GroupShape::new(1, 8, 2048, 64, 4, payload);
        let mut group = Group::new_nccl(comm.take().ok_or("no communicator")?, shape).map_err(err)?;
        ensure(group.transport() == Transport::Nccl && group.local_ranks() == vec![0], || "not an NCCL group of rank 0".into())?;
        let ranks = host_ranks(&mut rng, &shape, &[50], 4, true);
        let dev = upload_ranks(group.stream(), &shape, &ranks)?;
        let cfg = EpConfig { ranks: 1, num_experts: 8, m_align: shape.m_align };
        for round in 0..3 {
            let what = format!("NCCL {payload:?} round {round}");
            let got = group.dispatch(&inputs(&dev)).map_err(err)?;
            let want = dispatch(&routings(&ranks), &cfg).map_err(err)?;
            let s = group.stream().clone();
            let m_idx = s.clone_dtoh(&got[0].m_indices).map_err(err)?;
            ensure(got[0].rows == want[0].rows.len() && m_idx[..got[0].rows] == want[0].expert[..], || format!("{what}: layout differs"))?;
            let weights = s.clone_dtoh(&got[0].weights).map_err(err)?;
            let src = s.clone_dtoh(&got[0].handle.src()).map_err(err)?;
            let (x, sf) = download_rows(&s, &got[0].x)?;
            for (row, w) in want[0].rows.iter().enumerate() {
                let (want_w, want_src) = w.as_ref().map_or((0.0, -1), |w| (w.weight, packed(&shape, w)));
                ensure(weights[row].to_bits() == want_w.to_bits() && src[row] == want_src, || format!("{what}: row {row} weight/source"))?;
                check_row(&shape, &ranks, &x, &sf, row, |kb| kb * got[0].rows + row, w.as_ref(), &what)?;
            }
            let handles = vec![&got[0].handle];
            check_combine(gpu, &mut rng, &mut group, &ranks, &want, &handles, &what)?;
        }
        let refused = group.dispatch_low_latency(&inputs(&dev)).map(|_| ());
        ensure(matches!(refused, Err(Error::InvalidArgument { arg: "transport", .. })), || format!("low latency on NCCL: {refused:?}"))?;
        group.check().map_err(err)?;
        comm = Some(group.into_comm().ok_or("the NCCL group gave no communicator back")?);
    }
    Ok(())
}

// ---- Ranks on threads of their own --------------------------------------------------------------

/// The wait limit of the multi-rank tests' groups, except where a test shortens it on purpose.
/// The simulator lets virtual time jump while the device waits and host threads are busy
/// elsewhere (other tests computing references on the host, a rank's own checks), so with the
/// default 100 s a slow host thread could time out its peer's wait; an hour leaves only the
/// timeouts a test intends.
const PATIENT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Runs `body(rank, comm)` for every rank of a fresh communicator, each on a host thread of its own
/// with device `rank` and a stream of it (`cudarc`'s `Comm` is not `Send`: each thread makes its
/// own). Every rank's failure is reported, prefixed with its rank.
fn on_ranks(body: impl Fn(usize, deepkern::cudarc::nccl::Comm) -> TestResult + Sync) -> TestResult {
    // One multi-rank test at a time: each uses every device, and a test whose peer is silent on
    // purpose lets the simulator's clock jump, which must not time out another test's waits.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let id = deepkern::cudarc::nccl::Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    let body = &body;
    let results: Vec<TestResult> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..RANKS)
            .map(|r| {
                s.spawn(move || -> TestResult {
                    let device = deepkern::Device::new(r).map_err(err)?;
                    let stream = device.new_stream().map_err(err)?;
                    let comm = deepkern::cudarc::nccl::Comm::from_rank(stream, r, RANKS, id).map_err(|e| format!("NCCL init: {e:?}"))?;
                    let result = body(r, comm);
                    if let Err(e) = &result {
                        // Said at once: a peer that waits for this rank may hang long before the
                        // test reports.
                        eprintln!("rank {r} failed: {}", e.message().unwrap_or("failed"));
                    }
                    result
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err("panicked".into()))).collect()
    });
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(r, x)| x.as_ref().err().map(|e| format!("rank {r}: {}", e.message().unwrap_or("failed"))))
        .collect();
    ensure(failed.is_empty(), || failed.join("\n"))
}

/// Every rank's host data, the same on every thread (one seed), with `tokens[r]` tokens on rank r.
fn all_ranks(seed: u64, shape: &GroupShape, tokens: &[usize], k: usize) -> Vec<HostRank> {
    host_ranks(&mut <StdRng as rand::SeedableRng>::seed_from_u64(seed), shape, tokens, k, true)
}

/// Checks rank `me`'s normal dispatch against the reference of every rank's routing.
fn check_dispatched(
    shape: &GroupShape,
    all: &[HostRank],
    me: usize,
    got: &Dispatched,
    want: &Received,
    s: &Arc<CudaStream>,
    what: &str,
) -> TestResult {
    ensure(got.rows == want.rows.len(), || format!("{what}: {} rows, want {}", got.rows, want.rows.len()))?;
    ensure(got.counts.iter().map(|&c| c as u32).eq(want.counts.iter().copied()), || {
        format!("{what}: counts {:?} vs {:?}", got.counts, want.counts)
    })?;
    let m_idx = s.clone_dtoh(&got.m_indices).map_err(err)?;
    ensure(m_idx[..got.rows] == want.expert[..], || format!("{what}: m_indices differ"))?;
    let weights = s.clone_dtoh(&got.weights).map_err(err)?;
    let src = s.clone_dtoh(&got.handle.src()).map_err(err)?;
    let (x, sf) = download_rows(s, &got.x)?;
    for (row, w) in want.rows.iter().enumerate() {
        let (want_w, want_src) = w.as_ref().map_or((0.0, -1), |w| (w.weight, packed(shape, w)));
        ensure(weights[row].to_bits() == want_w.to_bits() && src[row] == want_src, || format!("{what}: row {row} weight/source"))?;
        check_row(shape, all, &x, &sf, row, |kb| kb * got.rows + row, w.as_ref(), what)?;
    }
    let _ = me;
    Ok(())
}

/// Combines rank `me`'s received rows with `ys[me]` (every rank's `ys` drawn from one seed) and
/// checks its tokens against the reference of every rank's rows.
#[allow(clippy::too_many_arguments)]
fn check_combine_rank(
    group: &mut Group,
    all: &[HostRank],
    me: usize,
    received: &[Received],
    handle: &Handle,
    seed: u64,
    what: &str,
) -> TestResult {
    let h = group.shape().hidden;
    let ys = random_ys(&mut <StdRng as rand::SeedableRng>::seed_from_u64(seed), received, h);
    let s = group.stream().clone();
    let y = upload(&s, &ys[me].iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), bf16::ZERO)?;
    let outs = group.combine(&[y.slice(..received[me].rows.len() * h)], &[handle]).map_err(err)?;
    let got = s.clone_dtoh(&outs[0]).map_err(err)?;
    let tokens: Vec<usize> = all.iter().map(|r| r.tokens).collect();
    expect_combined(what, received, &ys, &tokens, h, me, &got)
}

/// Node groups of two ranks when something goes wrong: ranks whose shapes differ both refuse to
/// form the group; a round in which one rank names an invalid expert is refused by both, and the
/// next rounds are right on both; a rank that never signals makes its peer's dispatch fail with
/// an error naming it; `check` reads and clears that error; both ranks then drop the group.
fn node_group_failures_are_loud(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x6661_696c;
    // Rank 1 waits on the host while rank 0 times out, then both drop the group together.
    let host_barrier = std::sync::Barrier::new(RANKS);
    on_ranks(|me, comm| {
        let shape = GroupShape::new(RANKS, 8, 256, 32, 4, Payload::Fp8);
        let odd = if me == 1 { GroupShape { hidden: 384, ..shape } } else { shape };
        refused(Group::new_node(&comm, odd).map(|_| ()), "shape")?;
        let mut group = Group::new_node(&comm, shape).map_err(err)?;
        group.set_timeout(PATIENT).map_err(err)?;
        // Every rank reaches the teardown below even after a failure, so a peer never waits
        // for it forever (and no rank frees its buffer while the other still writes into it).
        let s = group.stream().clone();
        let result = (|| -> TestResult {
            let cfg = EpConfig { ranks: RANKS, num_experts: 8, m_align: shape.m_align };
            for round in 0..2 {
                let what = format!("rank {me} round {round}");
                let mut bad = all_ranks(seed ^ round, &shape, &[32, 11], 4);
                bad[1].idx[3] = 8;
                let bad_dev = upload_ranks(&s, &shape, &bad[me..=me])?;
                refused(group.dispatch(&inputs(&bad_dev)).map(|_| ()), "topk_idx").map_err(|e| format!("{what}: {e}"))?;
                let all = all_ranks(seed ^ 0x100 ^ round, &shape, &[32, 11], 4);
                let dev = upload_ranks(&s, &shape, &all[me..=me])?;
                let got = group.dispatch(&inputs(&dev)).map_err(err)?;
                let want = dispatch(&routings(&all), &cfg).map_err(err)?;
                check_dispatched(&shape, &all, me, &got[0], &want[me], &s, &what)?;
                check_combine_rank(&mut group, &all, me, &want, &got[0].handle, seed ^ 0x200 ^ round, &what)?;
            }
            group.check().map_err(err)?;
            // Rank 1 skips a round: rank 0's wait for its counts times out, and dispatch says who.
            if me == 0 {
                group.set_timeout(std::time::Duration::from_millis(20)).map_err(err)?;
                let all = all_ranks(seed ^ 0x300, &shape, &[32, 11], 4);
                let dev = upload_ranks(&s, &shape, &all[..1])?;
                match group.dispatch(&inputs(&dev)) {
                    Err(Error::Communication { rank: 0, reason }) if reason.contains("rank 1 did not signal NOTIFY") => {}
                    other => return Err(format!("dispatch with a silent peer: {:?}", other.map(|_| ())).into()),
                }
                match group.check() {
                    Err(Error::Communication { rank: 0, reason }) if reason.contains("rank 1 did not signal") => {}
                    other => return Err(format!("check after the timeout: {other:?}").into()),
                }
                group.check().map_err(|e| format!("a second check still reports: {e}"))?;
            }
            Ok(())
        })();
        let _ = group.set_timeout(PATIENT);
        host_barrier.wait();
        drop(group);
        result?;
        s.synchronize().map_err(err)?;
        Ok(())
    })
}

/// Refused rounds back to back: in round i, rank i % 2 names an expert outside the group (slots
/// i + 1 of its tokens), so the round is refused by both ranks, and the refusal names that rank
/// and count. A rank that refused goes straight on to its next notify while its peer may still
/// read the refused round: what each reads must be that round's. A good round follows. (Whether
/// a run opens that window depends on how the host threads are scheduled; on the simulator
/// it is rare, so this test guards the pattern rather than proving the ordering.)
fn node_group_refusals_in_a_row(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x726f_7773;
    let host_barrier = std::sync::Barrier::new(RANKS);
    on_ranks(|me, comm| {
        let shape = GroupShape::new(RANKS, 8, 256, 32, 4, Payload::Fp8);
        let mut group = Group::new_node(&comm, shape).map_err(err)?;
        group.set_timeout(PATIENT).map_err(err)?;
        let s = group.stream().clone();
        let result = (|| -> TestResult {
            let cfg = EpConfig { ranks: RANKS, num_experts: 8, m_align: shape.m_align };
            for round in 0..6u64 {
                let bad_rank = (round % 2) as usize;
                let invalid = round as usize + 1;
                let mut all = all_ranks(seed ^ round, &shape, &[24, 17], 4);
                all[bad_rank].idx[..invalid].fill(8);
                let dev = upload_ranks(&s, &shape, &all[me..=me])?;
                match group.dispatch(&inputs(&dev)) {
                    Err(Error::InvalidArgument { arg: "topk_idx", reason })
                        if reason.starts_with(&format!("rank {bad_rank}: {invalid} slots")) => {}
                    other => return Err(format!("rank {me} round {round}: {:?}", other.map(|_| ())).into()),
                }
            }
            let all = all_ranks(seed ^ 0x100, &shape, &[24, 17], 4);
            let dev = upload_ranks(&s, &shape, &all[me..=me])?;
            let got = group.dispatch(&inputs(&dev)).map_err(err)?;
            let want = dispatch(&routings(&all), &cfg).map_err(err)?;
            let what = format!("rank {me} after the refusals");
            check_dispatched(&shape, &all, me, &got[0], &want[me], &s, &what)?;
            check_combine_rank(&mut group, &all, me, &want, &got[0].handle, seed ^ 0x200, &what)
        })();
        host_barrier.wait();
        drop(group);
        result?;
        s.synchronize().map_err(err)?;
        Ok(())
    })
}

/// A rank that drops its group while its peer still has a combine send queued (that writes into
/// this rank's buffer) must not free the buffer first: rank 1 sends 300 ms after rank 0 dropped.
/// On the simulator, a write into freed memory fails the test.
fn node_group_drop_waits_for_peers(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x6472_6f70;
    on_ranks(|me, comm| {
        let shape = GroupShape::new(RANKS, 8, 256, 32, 4, Payload::Bf16);
        let mut group = Group::new_node(&comm, shape).map_err(err)?;
        group.set_timeout(PATIENT).map_err(err)?;
        let s = group.stream().clone();
        let all = all_ranks(seed, &shape, &[32, 32], 4);
        let dev = upload_ranks(&s, &shape, &all[me..=me])?;
        let got = group.dispatch(&inputs(&dev)).map_err(err)?;
        if me == 1 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let y = zeros_for(&s, &got[0].handle, shape.hidden)?;
        group.combine_send(&y.slice(..got[0].rows * shape.hidden), &got[0].handle).map_err(err)?;
        drop(got);
        drop(group);
        s.synchronize().map_err(|e| format!("rank {me} after the drop: {e}"))?;
        Ok(())
    })
}

/// A normal receive that times out poisons its outputs: rank 1 gives up waiting for rank 0's
/// counts (a short timeout) and refuses its round; rank 0, later, finds rank 1's counts, sends,
/// and its receive waits for rank 1's rows in vain. Rank 0's dispatch returns rows that are all
/// NaN with no sources, and each rank's `check` names the other.
fn node_group_receive_timeout_poisons(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x706f_6973;
    let rank1_gave_up = std::sync::Barrier::new(RANKS);
    let done = std::sync::Barrier::new(RANKS);
    on_ranks(|me, comm| {
        let shape = GroupShape::new(RANKS, 8, 256, 32, 4, Payload::Fp8);
        let mut group = Group::new_node(&comm, shape).map_err(err)?;
        group.set_timeout(std::time::Duration::from_millis(20)).map_err(err)?;
        let s = group.stream().clone();
        let all = all_ranks(seed, &shape, &[32, 32], 4);
        let dev = upload_ranks(&s, &shape, &all[me..=me])?;
        // Every barrier is reached whatever a check finds, so no rank waits for the other forever.
        let result = if me == 1 {
            let first = group.dispatch(&inputs(&dev)).map(|_| ());
            rank1_gave_up.wait();
            (|| -> TestResult {
                match first {
                    Err(Error::Communication { rank: 1, reason }) if reason.contains("rank 0 did not signal NOTIFY") => {}
                    other => return Err(format!("rank 1's dispatch without rank 0: {other:?}").into()),
                }
                match group.check() {
                    Err(Error::Communication { rank: 1, reason }) if reason.contains("rank 0 did not signal NOTIFY") => {}
                    other => return Err(format!("rank 1's check: {other:?}").into()),
                }
                Ok(())
            })()
        } else {
            rank1_gave_up.wait();
            (|| -> TestResult {
                let got = group.dispatch(&inputs(&dev)).map_err(err)?;
                let g = &got[0];
                let m_idx = s.clone_dtoh(&g.m_indices).map_err(err)?;
                let weights = s.clone_dtoh(&g.weights).map_err(err)?;
                let src = s.clone_dtoh(&g.handle.src()).map_err(err)?;
                let (x, sf) = download_rows(&s, &g.x)?;
                let kb = shape.hidden / 128;
                ensure(g.rows > 0, || "no rows: nothing to check".into())?;
                for row in 0..g.rows {
                    ensure(src[row] == -1, || format!("row {row} of a timed-out receive has a source"))?;
                    if m_idx[row] >= 0 {
                        ensure(weights[row].is_nan() && (0..kb).all(|k| sf[k * g.rows + row].is_nan()), || {
                            format!("row {row}: weight or scales not poisoned")
                        })?;
                        ensure(x[row * shape.hidden..(row + 1) * shape.hidden].iter().all(|&b| b == 0xff), || {
                            format!("row {row}: payload not NaN")
                        })?;
                    }
                }
                match group.check() {
                    Err(Error::Communication { rank: 0, reason }) if reason.contains("rank 1 did not signal DISPATCH") => {}
                    other => return Err(format!("rank 0's check: {other:?}").into()),
                }
                Ok(())
            })()
        };
        let _ = group.set_timeout(PATIENT);
        done.wait();
        drop(group);
        result?;
        s.synchronize().map_err(err)?;
        Ok(())
    })
}

/// A node group of two ranks (one host thread and device each): the IPC handles all-gathered with
/// NCCL, then rounds of normal dispatch + combine and low-latency dispatch + combine, each rank
/// checking its own results against the reference of both ranks' routing.
fn node_group_of_two_ranks(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x6e6f_6465;
    let hidden = gpu.pick(2048, 256);
    let rounds = gpu.pick(4, 2);
    on_ranks(|me, comm| {
        let shape = GroupShape::new(RANKS, 8, hidden, 64, 4, Payload::Fp8);
        let mut group = Group::new_node(&comm, shape).map_err(err)?;
        group.set_timeout(PATIENT).map_err(err)?;
        ensure(group.local_ranks() == vec![me], || format!("local ranks {:?}", group.local_ranks()))?;
        let cfg = EpConfig { ranks: RANKS, num_experts: 8, m_align: shape.m_align };
        let s = group.stream().clone();
        for round in 0..rounds {
            let all = all_ranks(seed ^ round as u64, &shape, &[50, 23], 4);
            let dev = upload_ranks(&s, &shape, &all[me..=me])?;
            let what = format!("node round {round}, rank {me}");
            let got = group.dispatch(&inputs(&dev)).map_err(err)?;
            let want = dispatch(&routings(&all), &cfg).map_err(err)?;
            check_dispatched(&shape, &all, me, &got[0], &want[me], &s, &what)?;
            check_combine_rank(&mut group, &all, me, &want, &got[0].handle, seed ^ 0x10 ^ round as u64, &what)?;
            let ll = group.dispatch_low_latency(&inputs(&dev)).map_err(err)?;
            let want_ll = dispatch_low_latency(&routings(&all), &cfg, shape.ll_max_tokens).map_err(err)?;
            let (el, kb) = (shape.experts_per_rank(), hidden / 128);
            let stride = shape.ll_capacity().div_ceil(4) * 4;
            let w = &want_ll[me];
            let masked = s.clone_dtoh(&ll[0].masked_m).map_err(err)?;
            ensure(masked[..el].iter().map(|&c| c as u32).eq(w.counts.iter().copied()), || {
                format!("{what}: masked_m {masked:?} vs {:?}", w.counts)
            })?;
            let src = s.clone_dtoh(&ll[0].handle.src()).map_err(err)?;
            let (x, sf) = download_rows(&s, &ll[0].x)?;
            for le in 0..el {
                for row in 0..ll[0].capacity {
                    let i = le * ll[0].capacity + row;
                    let want_src = w.rows[i].as_ref().map_or(-1, |r| packed(&shape, r));
                    ensure(src[i] == want_src, || format!("{what}: LL expert {le} row {row} source {} vs {want_src}", src[i]))?;
                    if let Some(r) = &w.rows[i] {
                        check_row(&shape, &all, &x, &sf, i, |b| (le * kb + b) * stride + row, Some(r), &what)?;
                    }
                }
            }
            let received: Vec<Received> = want_ll
                .iter()
                .map(|w| Received { rows: w.rows.clone(), expert: Vec::new(), counts: Vec::new(), offsets: Vec::new() })
                .collect();
            check_combine_rank(&mut group, &all, me, &received, &ll[0].handle, seed ^ 0x20 ^ round as u64, &format!("LL {what}"))?;
        }
        group.check().map_err(err)?;
        Ok(())
    })
}

/// An NCCL-transport group of two ranks (one host thread and device each): counts all-gathered
/// and rows moved with NCCL grouped sends and receives, for both payloads and several rounds, each
/// rank checking its own results; the communicator goes from one group to the next.
fn nccl_group_of_two_ranks(gpu: &Gpu) -> TestResult {
    let seed = gpu.seed ^ 0x6e63_636c;
    let hidden = gpu.pick(2048, 256);
    let rounds = gpu.pick(3, 2);
    on_ranks(|me, comm| {
        let mut comm = Some(comm);
        for payload in [Payload::Fp8, Payload::Bf16] {
            let shape = GroupShape::new(RANKS, 8, hidden, 64, 4, payload);
            let mut group = Group::new_nccl(comm.take().ok_or("no communicator")?, shape).map_err(err)?;
            group.set_timeout(PATIENT).map_err(err)?;
            ensure(group.transport() == Transport::Nccl && group.local_ranks() == vec![me], || "not an NCCL group of this rank".into())?;
            let cfg = EpConfig { ranks: RANKS, num_experts: 8, m_align: shape.m_align };
            let s = group.stream().clone();
            for round in 0..rounds {
                let all = all_ranks(seed ^ round as u64, &shape, &[50, 23], 4);
                let dev = upload_ranks(&s, &shape, &all[me..=me])?;
                let what = format!("NCCL {payload:?} round {round}, rank {me}");
                let got = group.dispatch(&inputs(&dev)).map_err(err)?;
                let want = dispatch(&routings(&all), &cfg).map_err(err)?;
                check_dispatched(&shape, &all, me, &got[0], &want[me], &s, &what)?;
                check_combine_rank(&mut group, &all, me, &want, &got[0].handle, seed ^ 0x10 ^ round as u64, &what)?;
            }
            group.check().map_err(err)?;
            comm = Some(group.into_comm().ok_or("the NCCL group gave no communicator back")?);
        }
        Ok(())
    })
}
