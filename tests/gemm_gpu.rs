//! The dense FP8 GEMM on the GPU against the f64 reference. What each test proves:
//! - `exact_small_integers`: with small-integer E4M3 inputs and power-of-two scales every sum is
//!   exact in f32, so each bf16 output must equal the rounded reference bit for bit (any indexing,
//!   layout, swizzle or scale-placement bug shows). A's scale padding holds NaN: unused, unseen.
//! - `random_inputs`: quantised random data, `calc_diff` against the dequantised product (the
//!   kernel's own error) and against the unquantised one (DeepGEMM's bar, 1e-3), on ragged and
//!   DeepSeek-V3 shapes; large outputs are checked on a random sample of entries.
//! - `output_is_fully_written_and_bounded`: D poisoned with NaN, inside a guarded view: every entry
//!   is written and nothing outside it.
//! - `quantisers_then_gemm`: the whole GPU path (both quantisers, then the GEMM).
//! - `empty_and_bad_input`: m = 0 is a no-op; bad k, lengths and alignment are errors.
//! - `contiguous_matches_reference`, `masked_matches_reference`: the MoE layouts against the
//!   grouped references (empty experts, one hot expert, ragged n); padding rows and rows past
//!   `masked_m` stay poisoned.
//! - `arrivals_complete_and_checked`: the arrival-gated contiguous GEMM with every block's count
//!   already at 128 gives the ungated GEMM's bytes; a wrong-length counter array and an SM budget
//!   that leaves the writer no SM are errors before launch. (Rows landing while it runs are
//!   exercised by `moe_gpu`'s per-block schedule, whose writer is the real dispatch.)
//! - `tiles_of_256_rows`: the 256-row tiles (two 64-row sub-tiles per consumer warpgroup),
//!   forced, on random data over several M blocks with ragged last rows, dense with both
//!   epilogues (every entry written, nothing outside D) and masked with groups of two M blocks.
//! - `multicast_pairs`: TMA multicast across clusters of two CTAs, sharing A and sharing B, forced:
//!   dense bit-exact with both epilogues inside NaN guards, on tile counts that leave the last pair
//!   without a partner, with SM budgets that make each cluster walk several pairs (odd budgets
//!   included); contiguous with a pair of one expert (multicast), a pair of two experts (loaded
//!   apart) and a pair whose second block is padding; and the refusals (masked layout, one SM,
//!   contiguous tiles wider than 128, the arrival-gated GEMM).
//! - `straddling_scales_over_long_k`: tiles that straddle B's scale blocks read those scales from
//!   shared memory, 64 k-blocks at a time in two buffers: k = 130 k-blocks (two full chunks and
//!   part of a third), several tiles per CTA (so the buffers alternate across tiles), against the
//!   dequantised reference.
//! - `every_compiled_tile`: each compiled (layout, block_m, block_n), forced through
//!   `GemmOptions::tile` with 1, 2 or 4 (256 rows: 3) stages (the stage ring wraps), on a ragged
//!   n = 600 where the 48-, 80-, 96-, 112-, 144-, 160-, 176- and 192-wide tiles straddle two or
//!   three of B's scale blocks: dense bit-exact on small integers with both epilogues (registers; TMA store) inside NaN guards, the
//!   grouped layouts against their references with poison kept.

mod common;

use std::sync::Arc;

use common::{Gpu, TestResult, ensure};
use deepkern::check::calc_diff;
use deepkern::cudarc::driver::{CudaSlice, CudaStream};
use deepkern::fp8::e4m3_encode;
use deepkern::gemm::{
    Fp8Activations, Fp8Weights, GemmOptions, GemmShape, MaskedShape, TileConfig, gemm_fp8, gemm_fp8_alloc, gemm_fp8_contiguous,
    gemm_fp8_contiguous_arrived, gemm_fp8_contiguous_with, gemm_fp8_f32, gemm_fp8_masked, gemm_fp8_masked_with, gemm_fp8_with,
};
use deepkern::layout::{BlockShape, TokenGroupShape, scales_from_tma_layout, scales_to_tma_layout, tma_aligned_rows};
use deepkern::plan::gemm::{BLOCK_N_MENU, GemmLayout, Multicast, block_n_menu, is_compiled};
use deepkern::reference::gemm::{Fp8Operand, gemm_accumulate, gemm_entries, grouped_contiguous, grouped_masked};
use deepkern::reference::quant::{QuantizedRows, per_block, per_token_group};
use deepkern::{Error, F8E4M3, ScaleFormat, bf16, quantize, quantize_per_block, quantize_per_token_group};
use rand::Rng;
use rand::rngs::StdRng;

fn main() {
    common::run(vec![
        ("exact_small_integers", exact_small_integers),
        ("random_inputs", random_inputs),
        ("output_is_fully_written_and_bounded", output_is_fully_written_and_bounded),
        ("quantisers_then_gemm", quantisers_then_gemm),
        ("empty_and_bad_input", empty_and_bad_input),
        ("contiguous_matches_reference", contiguous_matches_reference),
        ("masked_matches_reference", masked_matches_reference),
        ("sm_budget_changes_nothing_but_the_grid", sm_budget_changes_nothing_but_the_grid),
        ("f32_output_and_accumulate", f32_output_and_accumulate),
        ("tiles_of_256_rows", tiles_of_256_rows),
        ("multicast_pairs", multicast_pairs),
        ("straddling_scales_over_long_k", straddling_scales_over_long_k),
        ("every_compiled_tile", every_compiled_tile),
        ("arrivals_complete_and_checked", arrivals_complete_and_checked),
    ]);
}

const NAN_BF16: u16 = 0x7fc1;

/// Host operands: E4M3 bytes, A's row-major scales, B's block scales.
struct Host {
    a: Vec<u8>,
    sa: Vec<f32>,
    b: Vec<u8>,
    sb: Vec<f32>,
    shape: GemmShape,
}

impl Host {
    fn a_op(&self) -> Fp8Operand<'_> {
        Fp8Operand { q: &self.a, scales: &self.sa, rows: self.shape.m }
    }
    fn b_op(&self) -> Fp8Operand<'_> {
        Fp8Operand { q: &self.b, scales: &self.sb, rows: self.shape.n }
    }
}

/// Runs the GEMM on `h` into a NaN-poisoned D inside a guard of `guard` elements each side.
/// A's scale padding is NaN. Returns D (without the guards) and whether the guards survived.
fn run_gemm(stream: &Arc<CudaStream>, h: &Host, guard: usize) -> Result<(Vec<bf16>, bool), Error> {
    let GemmShape { m, n, k } = h.shape;
    let kb = k / 128;
    let to_f8 = |v: &[u8]| v.iter().map(|&b| F8E4M3::from_bits(b)).collect::<Vec<_>>();
    let d_a = stream.clone_htod(&to_f8(&h.a))?;
    let d_b = stream.clone_htod(&to_f8(&h.b))?;
    let d_sa = stream.clone_htod(&scales_to_tma_layout(&h.sa, m, kb, f32::NAN))?;
    let d_sb = stream.clone_htod(&h.sb)?;
    let mut d_d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n + 2 * guard])?;
    gemm_fp8(
        stream,
        &Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() },
        &Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() },
        &mut d_d.slice_mut(guard..guard + m * n),
        h.shape,
    )?;
    let all = stream.clone_dtoh(&d_d)?;
    let guards_ok = all[..guard].iter().chain(&all[guard + m * n..]).all(|v| v.to_bits() == NAN_BF16);
    Ok((all[guard..guard + m * n].to_vec(), guards_ok))
}

/// A host problem's operands on the device: E4M3 A and B, A's scales in the TMA layout (NaN in the
/// padding), B's block scales.
struct DeviceOperands {
    a: CudaSlice<F8E4M3>,
    sa: CudaSlice<f32>,
    b: CudaSlice<F8E4M3>,
    sb: CudaSlice<f32>,
}

impl DeviceOperands {
    fn new(stream: &Arc<CudaStream>, h: &Host) -> Self {
        let GemmShape { m, k, .. } = h.shape;
        Self {
            a: stream.clone_htod(&f8(&h.a)).unwrap(),
            sa: stream.clone_htod(&scales_to_tma_layout(&h.sa, m, k / 128, f32::NAN)).unwrap(),
            b: stream.clone_htod(&f8(&h.b)).unwrap(),
            sb: stream.clone_htod(&h.sb).unwrap(),
        }
    }

    fn views(&self) -> (Fp8Activations<'_>, Fp8Weights<'_>) {
        (Fp8Activations { q: self.a.as_view(), sf: self.sa.as_view() }, Fp8Weights { q: self.b.as_view(), sf: self.sb.as_view() })
    }
}

/// Runs the dense GEMM with `options` into a D inside NaN guards and requires every entry to equal
/// `want` bit for bit and nothing outside D to change (TMA clips at D's edges).
fn dense_bit_exact(
    stream: &Arc<CudaStream>,
    a: &Fp8Activations,
    b: &Fp8Weights,
    shape: GemmShape,
    options: GemmOptions,
    want: &[bf16],
) -> TestResult {
    let GemmShape { m, n, .. } = shape;
    // A multiple of 8 elements: D stays 16-byte aligned, as the TMA store's tensor map needs.
    let guard = 304;
    let mut all = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n + 2 * guard]).unwrap();
    gemm_fp8_with(stream, a, b, &mut all.slice_mut(guard..guard + m * n), shape, options).map_err(|e| format!("{options:?}: {e}"))?;
    let all = stream.clone_dtoh(&all).unwrap();
    let got = &all[guard..guard + m * n];
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits()) {
        return Err(format!("dense {options:?}: D[{}, {}] = {} want {}", at / n, at % n, got[at], want[at]).into());
    }
    let guards_ok = all[..guard].iter().chain(&all[guard + m * n..]).all(|v| v.to_bits() == NAN_BF16);
    ensure(guards_ok, || format!("dense {options:?}: wrote outside D"))
}

/// Operands of small integers with power-of-two scales, exponents -1..=1: partial sums (128
/// products <= 16) times scale products <= 4, summed over <= 8 blocks, stay multiples of 2^-2
/// below 2^16, i.e. exact in f32's 24 bits (and in the tensor core's narrower accumulator, which
/// only ever holds integers <= 2048).
fn small_integer_host(rng: &mut StdRng, shape: GemmShape) -> Host {
    const INTS: [f32; 9] = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0];
    let GemmShape { m, n, k } = shape;
    let kb = k / 128;
    let pow2 = |rng: &mut StdRng| 2f32.powi(rng.random_range(-1..2));
    Host {
        a: (0..m * k).map(|_| e4m3_encode(INTS[rng.random_range(0..9)])).collect(),
        sa: (0..m * kb).map(|_| pow2(rng)).collect(),
        b: (0..n * k).map(|_| e4m3_encode(INTS[rng.random_range(0..9)])).collect(),
        sb: (0..n.div_ceil(128) * kb).map(|_| pow2(rng)).collect(),
        shape,
    }
}

fn exact_small_integers(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("exact_small_integers");
    let stream = gpu.stream();
    for (m, n, k) in [(1, 1, 128), (64, 128, 128), (130, 257, 384), (128, 128, 1024), (300, 700, 512)] {
        let shape = GemmShape { m, n, k };
        let h = small_integer_host(&mut rng, shape);
        let (d, _) = run_gemm(&stream, &h, 0).map_err(|e| format!("{shape:?}: {e}"))?;
        let want = gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n));
        for (i, (g, w)) in d.iter().zip(&want).enumerate() {
            let w = bf16::from_f64(*w);
            ensure(g.to_bits() == w.to_bits(), || format!("{shape:?}: D[{}, {}] = {g} want {w}", i / n, i % n))?;
        }
    }
    Ok(())
}

/// Quantised random operands (CPU quantisers) and the unquantised values.
fn random_host(rng: &mut StdRng, shape: GemmShape) -> (Host, Vec<f32>, Vec<f32>) {
    let GemmShape { m, n, k } = shape;
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_ratio(1, 50) { 30.0 } else { 1.0 }).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let (qa, qb) = (per_token_group(&x, m, k, ScaleFormat::F32), per_block(&w, n, k, ScaleFormat::F32));
    (Host { a: qa.q, sa: qa.scales, b: qb.q, sb: qb.scales, shape }, x, w)
}

/// Entries to check: all of them for small outputs, else a random sample.
fn sample(rng: &mut StdRng, m: usize, n: usize) -> Vec<(usize, usize)> {
    if m * n <= 1 << 18 {
        deepkern::reference::gemm::all_entries(m, n)
    } else {
        (0..4096).map(|_| (rng.random_range(0..m), rng.random_range(0..n))).collect()
    }
}

fn random_inputs(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("random_inputs");
    let stream = gpu.stream();
    // The simulator's shapes keep the ragged edges, the 2112-wide B and a K of 9 blocks.
    let shapes: &[(usize, usize, usize)] = gpu.pick(
        &[(7, 9, 128), (129, 255, 640), (64, 2112, 7168), (128, 7168, 2048), (4096, 4096, 7168), (4096, 7168, 16384)],
        &[(7, 9, 128), (129, 255, 640), (64, 2112, 1152), (300, 520, 384)],
    );
    for &(m, n, k) in shapes {
        let shape = GemmShape { m, n, k };
        let (h, x, w) = random_host(&mut rng, shape);
        let (d, _) = run_gemm(&stream, &h, 0).map_err(|e| format!("{shape:?}: {e}"))?;
        let at = sample(&mut rng, m, n);
        let got: Vec<f32> = at.iter().map(|&(r, c)| d[r * n + c].to_f32()).collect();
        ensure(got.iter().all(|v| v.is_finite()), || format!("{shape:?}: non-finite output"))?;
        let deq = gemm_entries(h.a_op(), h.b_op(), k, &at);
        let exact: Vec<f64> = at.iter().map(|&(r, c)| (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[c * k + j])).sum()).collect();
        let (d_deq, d_exact) = (calc_diff(&got, &deq), calc_diff(&got, &exact));
        ensure(d_deq < 1e-4, || format!("{shape:?}: calc_diff vs dequantised reference {d_deq:e}"))?;
        ensure(d_exact < 1e-3, || format!("{shape:?}: calc_diff vs unquantised product {d_exact:e}"))?;
    }
    Ok(())
}

fn output_is_fully_written_and_bounded(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("output_is_fully_written_and_bounded");
    let stream = gpu.stream();
    for (m, n, k) in [(1, 1, 128), (127, 129, 256), (257, 1000, 384)] {
        let shape = GemmShape { m, n, k };
        let (h, _, _) = random_host(&mut rng, shape);
        let (d, guards_ok) = run_gemm(&stream, &h, 64).map_err(|e| format!("{shape:?}: {e}"))?;
        ensure(guards_ok, || format!("{shape:?}: wrote outside D"))?;
        ensure(d.iter().all(|v| v.to_bits() != NAN_BF16), || format!("{shape:?}: an entry of D was not written"))?;
    }
    Ok(())
}

fn quantisers_then_gemm(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("quantisers_then_gemm");
    let stream = gpu.stream();
    let (m, n, k) = (200, 384, 1024);
    let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
    let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.random_range(-0.05f32..0.05))).collect();
    let (ts, bs) = (TokenGroupShape::new(m, k), BlockShape::new(n, k));
    let d_x = stream.clone_htod(&x).unwrap();
    let d_w = stream.clone_htod(&w).unwrap();
    let mut qa = stream.alloc_zeros::<F8E4M3>(m * k).unwrap();
    let mut sa = stream.alloc_zeros::<f32>(ts.scale_elements().unwrap()).unwrap();
    let mut qb = stream.alloc_zeros::<F8E4M3>(n * k).unwrap();
    let mut sb = stream.alloc_zeros::<f32>(bs.scale_elements().unwrap()).unwrap();
    quantize_per_token_group(&stream, &d_x, &mut qa, &mut sa, ts, ScaleFormat::Ue8m0).map_err(|e| e.to_string())?;
    quantize_per_block(&stream, &d_w, &mut qb, &mut sb, bs, ScaleFormat::Ue8m0).map_err(|e| e.to_string())?;
    let mut d = stream.alloc_zeros::<bf16>(m * n).unwrap();
    let shape = GemmShape { m, n, k };
    // The whole CudaSlice as d (any cudarc buffer is accepted).
    gemm_fp8(
        &stream,
        &Fp8Activations { q: qa.as_view(), sf: sa.as_view() },
        &Fp8Weights { q: qb.as_view(), sf: sb.as_view() },
        &mut d,
        shape,
    )
    .map_err(|e| e.to_string())?;
    // The owned forms: quantize into Fp8Tensors, and the GEMM allocating d. Same kernels on the
    // same operands, so the same bits.
    let ta = quantize(&stream, &d_x, ts, ScaleFormat::Ue8m0).map_err(|e| e.to_string())?;
    let tb = quantize(&stream, &d_w, bs, ScaleFormat::Ue8m0).map_err(|e| e.to_string())?;
    let d_owned = gemm_fp8_alloc(&stream, &ta.activations(), &tb.weights(), shape).map_err(|e| e.to_string())?;
    ensure(d_owned.len() == m * n, || format!("gemm_fp8_alloc returned {} elements", d_owned.len()))?;
    let (owned, borrowed) = (stream.clone_dtoh(&d_owned).unwrap(), stream.clone_dtoh(&d).unwrap());
    ensure(owned.iter().map(|v| v.to_bits()).eq(borrowed.iter().map(|v| v.to_bits())), || {
        "the owned forms (quantize, gemm_fp8_alloc) differ from the borrowed ones".into()
    })?;
    // Refused by name before anything is allocated; an empty product launches nothing.
    match gemm_fp8_alloc(&stream, &ta.activations(), &tb.weights(), GemmShape { m: m + 1, ..shape }) {
        Err(Error::Shape { arg: "a", .. }) => {}
        other => return Err(format!("m + 1 rows: expected a shape error naming `a`, got {:?}", other.map(|d| d.len())).into()),
    }
    let empty =
        gemm_fp8_alloc(&stream, &Fp8Activations { q: qa.slice(..0), sf: sa.slice(..0) }, &tb.weights(), GemmShape { m: 0, ..shape })
            .map_err(|e| e.to_string())?;
    ensure(empty.len() == 1, || format!("an empty product returned {} elements", empty.len()))?;
    let bytes = |v: Vec<F8E4M3>| v.iter().map(F8E4M3::to_bits).collect::<Vec<u8>>();
    let h = Host {
        a: bytes(stream.clone_dtoh(&qa).unwrap()),
        sa: scales_from_tma_layout(&stream.clone_dtoh(&sa).unwrap(), m, k / 128),
        b: bytes(stream.clone_dtoh(&qb).unwrap()),
        sb: stream.clone_dtoh(&sb).unwrap(),
        shape,
    };
    let got: Vec<f32> = stream.clone_dtoh(&d).unwrap().iter().map(|v| v.to_f32()).collect();
    let want = gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n));
    let diff = calc_diff(&got, &want);
    ensure(diff < 1e-4, || format!("calc_diff {diff:e} against the reference on the GPU-quantised operands"))
}

fn empty_and_bad_input(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let (m, n, k) = (8, 16, 256);
    let a = stream.alloc_zeros::<F8E4M3>(m * k + 16).unwrap();
    let sa = stream.alloc_zeros::<f32>(2 * tma_aligned_rows(m) + 4).unwrap();
    let b = stream.alloc_zeros::<F8E4M3>(n * k).unwrap();
    let sb = stream.alloc_zeros::<f32>(2).unwrap();
    let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
    let shape = GemmShape { m, n, k };
    let bw = Fp8Weights { q: b.as_view(), sf: sb.as_view() };
    let mut run = |a_off: usize, sa_off: usize, shape: GemmShape, d_len: usize| {
        let aa = Fp8Activations {
            q: a.slice(a_off..a_off + shape.m * shape.k),
            sf: sa.slice(sa_off..sa_off + (shape.k / 128).max(1) * tma_aligned_rows(shape.m)),
        };
        gemm_fp8(&stream, &aa, &bw, &mut d.slice_mut(..d_len), shape)
    };
    let arg = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. } | Error::Alignment { arg, .. } | Error::InvalidArgument { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {other:?}")),
    };
    ensure(arg(run(0, 0, GemmShape { k: 200, ..shape }, m * n))? == "k", || "k = 200 accepted".into())?;
    ensure(arg(run(0, 0, shape, m * n - 1))? == "d", || "short d accepted".into())?;
    ensure(arg(run(1, 0, shape, m * n))? == "a", || "misaligned a accepted".into())?;
    ensure(arg(run(0, 1, shape, m * n))? == "sfa", || "misaligned sfa accepted".into())?;
    run(0, 0, GemmShape { m: 0, ..shape }, 0).map_err(|e| e.to_string())?;
    let untouched = stream.clone_dtoh(&d).unwrap().iter().all(|v| v.to_bits() == NAN_BF16);
    ensure(untouched, || "a rejected or empty call wrote D".into())
}

/// The contiguous layout of `counts` rows per expert (each segment padded to a multiple of 128 rows
/// of expert -1, at least 128 rows in all) with random activations, quantised on the CPU and
/// uploaded (A's scales in the TMA layout, NaN in their padding).
struct Contiguous {
    m_indices: Vec<i32>,
    qa: QuantizedRows,
    a: CudaSlice<F8E4M3>,
    sa: CudaSlice<f32>,
    idx: CudaSlice<i32>,
}

impl Contiguous {
    fn new(stream: &Arc<CudaStream>, rng: &mut StdRng, counts: &[usize], k: usize) -> Self {
        let mut m_indices = Vec::new();
        for (g, &c) in counts.iter().enumerate() {
            m_indices.extend(std::iter::repeat_n(g as i32, c));
            m_indices.extend(std::iter::repeat_n(-1, c.next_multiple_of(128) - c));
        }
        let m = m_indices.len().max(128);
        m_indices.resize(m, -1);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let qa = per_token_group(&x, m, k, ScaleFormat::F32);
        let a = stream.clone_htod(&f8(&qa.q)).unwrap();
        let sa = stream.clone_htod(&scales_to_tma_layout(&qa.scales, m, k / 128, f32::NAN)).unwrap();
        let idx = stream.clone_htod(&m_indices).unwrap();
        Self { m_indices, qa, a, sa, idx }
    }

    fn m(&self) -> usize {
        self.m_indices.len()
    }

    fn activations(&self) -> Fp8Activations<'_> {
        Fp8Activations { q: self.a.as_view(), sf: self.sa.as_view() }
    }

    /// The grouped reference on `groups` experts' weights (`bq`: `[groups · n, k]`).
    fn reference(&self, bq: &[u8], bsf: &[f32], groups: usize, k: usize) -> Vec<Option<f64>> {
        grouped_contiguous(
            Fp8Operand { q: &self.qa.q, scales: &self.qa.scales, rows: self.m() },
            Fp8Operand { q: bq, scales: bsf, rows: bq.len() / k },
            groups,
            k,
            &self.m_indices,
        )
    }
}

/// Random activations of the masked layout, quantised on the CPU per group: E4M3 `[groups, max_m,
/// k]`, the scales in the TMA layout `[groups, k / 128, round_up(max_m, 4)]` (NaN padding), and
/// row-major `[groups · max_m, k / 128]` for the reference.
fn masked_activations(rng: &mut StdRng, groups: usize, max_m: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let (mut aq, mut asf_tma, mut asf_rows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..groups {
        let x: Vec<f32> = (0..max_m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let q = per_token_group(&x, max_m, k, ScaleFormat::F32);
        asf_tma.extend(scales_to_tma_layout(&q.scales, max_m, k / 128, f32::NAN));
        asf_rows.extend(q.scales);
        aq.extend(q.q);
    }
    (aq, asf_tma, asf_rows)
}

/// Quantised expert weights `[groups, n, k]` (CPU per-block quantiser per expert).
fn experts(rng: &mut StdRng, groups: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let (mut q, mut sf) = (Vec::new(), Vec::new());
    for _ in 0..groups {
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let b = per_block(&w, n, k, ScaleFormat::F32);
        q.extend(b.q);
        sf.extend(b.scales);
    }
    (q, sf)
}

fn f8(v: &[u8]) -> Vec<F8E4M3> {
    v.iter().map(|&b| F8E4M3::from_bits(b)).collect()
}

/// Compares `got` with `want` on the entries the reference defines; the others must be poison.
fn compare_grouped(got: &[bf16], want: &[Option<f64>], what: &str) -> TestResult {
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        match y {
            Some(y) => {
                g.push(x.to_f32());
                w.push(*y);
            }
            None => ensure(x.to_bits() == NAN_BF16, || format!("{what}: entry {i} should be untouched"))?,
        }
    }
    ensure(g.iter().all(|v| v.is_finite()), || format!("{what}: non-finite or unwritten valid entries"))?;
    let diff = calc_diff(&g, &w);
    ensure(diff < 1e-4, || format!("{what}: calc_diff {diff:e}"))
}

fn contiguous_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("contiguous_matches_reference");
    let stream = gpu.stream();
    for (groups, n, k, hot) in [(1, 128, 128, false), (4, 200, 256, false), (8, 384, 512, true)] {
        // Rows per expert (some empty; one hot expert takes most), each segment padded to 128.
        let counts: Vec<usize> = (0..groups)
            .map(|g| {
                if hot && g == 0 {
                    700
                } else if rng.random_ratio(1, 4) {
                    0
                } else {
                    rng.random_range(1..300)
                }
            })
            .collect();
        let input = Contiguous::new(&stream, &mut rng, &counts, k);
        let m = input.m();
        let (bq, bsf) = experts(&mut rng, groups, n, k);
        let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
        let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
        let shape = GemmShape { m, n, k };
        let (a, b) = (input.activations(), Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() });
        gemm_fp8_contiguous(&stream, &a, &b, &input.idx.as_view(), &mut d.as_view_mut(), shape, groups).map_err(|e| e.to_string())?;
        let want = input.reference(&bq, &bsf, groups, k);
        compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("contiguous {groups} experts {counts:?}"))?;
    }
    Ok(())
}

fn masked_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("masked_matches_reference");
    let stream = gpu.stream();
    for (groups, max_m, n, k) in [(1, 64, 128, 128), (2, 256, 200, 256), (4, 300, 384, 512)] {
        let valid: Vec<usize> = (0..groups)
            .map(|g| match g % 3 {
                0 => rng.random_range(0..=max_m),
                1 => max_m,
                _ => 0,
            })
            .collect();
        let (aq, asf_tma, asf_rows) = masked_activations(&mut rng, groups, max_m, k);
        let (bq, bsf) = experts(&mut rng, groups, n, k);
        let d_a = stream.clone_htod(&f8(&aq)).unwrap();
        let d_sa = stream.clone_htod(&asf_tma).unwrap();
        let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
        let d_valid = stream.clone_htod(&valid.iter().map(|&v| v as i32).collect::<Vec<_>>()).unwrap();
        let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); groups * max_m * n]).unwrap();
        let (a, b) = (Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() }, Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() });
        let shape = MaskedShape { groups, max_m, n, k };
        // Whole CudaSlices for masked_m and d.
        gemm_fp8_masked(&stream, &a, &b, &d_valid, &mut d, shape).map_err(|e| e.to_string())?;
        let want = grouped_masked(
            Fp8Operand { q: &aq, scales: &asf_rows, rows: groups * max_m },
            Fp8Operand { q: &bq, scales: &bsf, rows: groups * n },
            groups,
            k,
            &valid,
        );
        compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("masked {groups} x {max_m}, valid {valid:?}"))?;
    }
    Ok(())
}

/// A smaller persistent grid walks the same tiles: the output is bit-identical; an SM budget of 0
/// or above the device's SM count is an error before launch.
fn sm_budget_changes_nothing_but_the_grid(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("sm_budget_changes_nothing_but_the_grid");
    let stream = gpu.stream();
    let shape = GemmShape { m: 300, n: 1000, k: 512 };
    let (h, _, _) = random_host(&mut rng, shape);
    let to_f8 = |v: &[u8]| v.iter().map(|&b| F8E4M3::from_bits(b)).collect::<Vec<_>>();
    let (d_a, d_b) = (stream.clone_htod(&to_f8(&h.a)).unwrap(), stream.clone_htod(&to_f8(&h.b)).unwrap());
    let d_sa = stream.clone_htod(&scales_to_tma_layout(&h.sa, shape.m, shape.k / 128, f32::NAN)).unwrap();
    let d_sb = stream.clone_htod(&h.sb).unwrap();
    let sms = gpu.device.info().sm_count as usize;
    let mut want: Option<Vec<bf16>> = None;
    for budget in [Some(sms), Some(1), Some(7), None, Some(0), Some(sms + 1)] {
        let mut d = stream.alloc_zeros::<bf16>(shape.m * shape.n).unwrap();
        let r = gemm_fp8_with(
            &stream,
            &Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() },
            &Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() },
            &mut d.as_view_mut(),
            shape,
            // The tile is forced: the planner would pick another one for a smaller budget.
            GemmOptions { max_sms: budget, tile: Some(TileConfig { block_m: 128, block_n: 128, stages: 4 }), ..GemmOptions::default() },
        );
        match budget {
            Some(n) if n == 0 || n > sms => {
                ensure(matches!(r, Err(Error::InvalidArgument { arg: "max_sms", .. })), || format!("budget {n} accepted"))?;
            }
            _ => {
                r.map_err(|e| e.to_string())?;
                let got = stream.clone_dtoh(&d).unwrap();
                let want = want.get_or_insert_with(|| got.clone());
                ensure(got.iter().map(|v| v.to_bits()).eq(want.iter().map(|v| v.to_bits())), || {
                    format!("budget {budget:?} changed the output")
                })?;
            }
        }
    }
    Ok(())
}

/// Runs the f32 variant on `h` with `c` as D's initial value inside NaN guards of 64 elements.
/// Returns D and whether the guards survived.
fn run_gemm_f32(stream: &Arc<CudaStream>, h: &Host, c: &[f32], accumulate: bool) -> Result<(Vec<f32>, bool), Error> {
    let GemmShape { m, n, k } = h.shape;
    let guard = 64;
    let to_f8 = |v: &[u8]| v.iter().map(|&b| F8E4M3::from_bits(b)).collect::<Vec<_>>();
    let d_a = stream.clone_htod(&to_f8(&h.a))?;
    let d_b = stream.clone_htod(&to_f8(&h.b))?;
    let d_sa = stream.clone_htod(&scales_to_tma_layout(&h.sa, m, k / 128, f32::NAN))?;
    let d_sb = stream.clone_htod(&h.sb)?;
    let mut init = vec![f32::NAN; m * n + 2 * guard];
    init[guard..guard + m * n].copy_from_slice(c);
    let mut d_d = stream.clone_htod(&init)?;
    gemm_fp8_f32(
        stream,
        &Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() },
        &Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() },
        &mut d_d.slice_mut(guard..guard + m * n),
        h.shape,
        accumulate,
    )?;
    let all = stream.clone_dtoh(&d_d)?;
    let guards_ok = all[..guard].iter().chain(&all[guard + m * n..]).all(|v| v.is_nan());
    Ok((all[guard..guard + m * n].to_vec(), guards_ok))
}

/// The f32 variant: exact on small integers with power-of-two scales (D = A·Bᵀ over a NaN-poisoned
/// D, and D += A·Bᵀ over integer C), within f32 rounding of the f64 reference on random operands,
/// never writing outside D.
fn f32_output_and_accumulate(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("f32_output_and_accumulate");
    let stream = gpu.stream();
    for (m, n, k) in [(1, 1, 128), (130, 257, 384), (300, 700, 512)] {
        let shape = GemmShape { m, n, k };
        let h = small_integer_host(&mut rng, shape);
        let c: Vec<f32> = (0..m * n).map(|_| rng.random_range(-64..64) as f32).collect();
        let poison = vec![f32::NAN; m * n];
        for (accumulate, init) in [(false, &poison), (true, &c)] {
            let (d, guards_ok) = run_gemm_f32(&stream, &h, init, accumulate).map_err(|e| format!("{shape:?}: {e}"))?;
            ensure(guards_ok, || format!("{shape:?} accumulate={accumulate}: wrote outside D"))?;
            let want = if accumulate {
                gemm_accumulate(h.a_op(), h.b_op(), k, &c)
            } else {
                gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n))
            };
            for (i, (g, w)) in d.iter().zip(&want).enumerate() {
                ensure(g.to_bits() == (*w as f32).to_bits(), || {
                    format!("{shape:?} accumulate={accumulate}: D[{}, {}] = {g} want {w}", i / n, i % n)
                })?;
            }
        }
    }
    for (m, n, k) in [(129, 255, 640), (256, 7168, 2048)] {
        let shape = GemmShape { m, n, k };
        let (h, _, _) = random_host(&mut rng, shape);
        let c: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let (d, guards_ok) = run_gemm_f32(&stream, &h, &c, true).map_err(|e| format!("{shape:?}: {e}"))?;
        ensure(guards_ok, || format!("{shape:?}: wrote outside D"))?;
        let at = sample(&mut rng, m, n);
        let got: Vec<f32> = at.iter().map(|&(r, col)| d[r * n + col]).collect();
        let product = gemm_entries(h.a_op(), h.b_op(), k, &at);
        let want: Vec<f64> = at.iter().zip(product).map(|(&(r, col), p)| p + f64::from(c[r * n + col])).collect();
        let diff = calc_diff(&got, &want);
        ensure(diff < 1e-5, || format!("{shape:?}: calc_diff vs the f64 reference {diff:e}"))?;
    }
    Ok(())
}

/// 256-row tiles over several M blocks (see the module docs).
fn tiles_of_256_rows(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("tiles_of_256_rows");
    let stream = gpu.stream();
    // m = 520: two full 256-row blocks and 8 rows; n = 296 ends inside a tile for every width (and
    // keeps D's rows 16-byte aligned, as the TMA store needs).
    let shape = GemmShape { m: 520, n: 296, k: 512 };
    let GemmShape { m, n, k } = shape;
    let (h, _, _) = random_host(&mut rng, shape);
    let want = gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n));
    let ops = DeviceOperands::new(&stream, &h);
    let (a, b) = ops.views();
    let guard = 304;
    for (block_n, stages, tma_store) in [(64, 2, false), (112, 3, true), (128, 4, false), (128, 1, true)] {
        let options = GemmOptions { tile: Some(TileConfig { block_m: 256, block_n, stages }), tma_store, ..GemmOptions::default() };
        let mut all = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n + 2 * guard]).unwrap();
        gemm_fp8_with(&stream, &a, &b, &mut all.slice_mut(guard..guard + m * n), shape, options)
            .map_err(|e| format!("{options:?}: {e}"))?;
        let all = stream.clone_dtoh(&all).unwrap();
        let got = &all[guard..guard + m * n];
        ensure(got.iter().all(|v| v.to_bits() != NAN_BF16), || format!("{options:?}: an entry of D was not written"))?;
        let guards_ok = all[..guard].iter().chain(&all[guard + m * n..]).all(|v| v.to_bits() == NAN_BF16);
        ensure(guards_ok, || format!("{options:?}: wrote outside D"))?;
        let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
        let diff = calc_diff(&got, &want);
        ensure(diff < 1e-4, || format!("{options:?}: calc_diff vs the dequantised reference {diff:e}"))?;
    }

    // Masked: groups of max_m = 300 rows (two 256-row blocks) with 300, 257, 0 and 100 valid.
    let (groups, max_m, n, k) = (4, 300, 136, 256);
    let valid = [300usize, 257, 0, 100];
    let (aq, asf_tma, asf_rows) = masked_activations(&mut rng, groups, max_m, k);
    let (bq, bsf) = experts(&mut rng, groups, n, k);
    let (d_a, d_sa) = (stream.clone_htod(&f8(&aq)).unwrap(), stream.clone_htod(&asf_tma).unwrap());
    let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
    let d_valid = stream.clone_htod(&valid.iter().map(|&v| v as i32).collect::<Vec<_>>()).unwrap();
    let (a, b) = (Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() }, Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() });
    let want = grouped_masked(
        Fp8Operand { q: &aq, scales: &asf_rows, rows: groups * max_m },
        Fp8Operand { q: &bq, scales: &bsf, rows: groups * n },
        groups,
        k,
        &valid,
    );
    let options = GemmOptions { tile: Some(TileConfig { block_m: 256, block_n: 96, stages: 3 }), ..GemmOptions::default() };
    let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); groups * max_m * n]).unwrap();
    gemm_fp8_masked_with(&stream, &a, &b, &d_valid.as_view(), &mut d.as_view_mut(), MaskedShape { groups, max_m, n, k }, options)
        .map_err(|e| format!("masked {options:?}: {e}"))?;
    compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("masked {options:?}"))
}

/// B's scales from shared memory over more than one chunk of k-blocks (see the module docs).
fn straddling_scales_over_long_k(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("straddling_scales_over_long_k");
    let stream = gpu.stream();
    let shape = GemmShape { m: 70, n: 200, k: 130 * 128 };
    let GemmShape { m, n, k } = shape;
    let (h, _, _) = random_host(&mut rng, shape);
    let want = gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n));
    let ops = DeviceOperands::new(&stream, &h);
    let (a, b) = ops.views();
    for (block_m, block_n, stages, max_sms) in [(64, 48, 3, 1), (128, 112, 2, 2), (64, 192, 2, 1)] {
        let options = GemmOptions { tile: Some(TileConfig { block_m, block_n, stages }), max_sms: Some(max_sms), ..GemmOptions::default() };
        let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
        gemm_fp8_with(&stream, &a, &b, &mut d.as_view_mut(), shape, options).map_err(|e| format!("{options:?}: {e}"))?;
        let got: Vec<f32> = stream.clone_dtoh(&d).unwrap().iter().map(|v| v.to_f32()).collect();
        ensure(got.iter().all(|v| v.is_finite()), || format!("{options:?}: an entry of D was not written"))?;
        let diff = calc_diff(&got, &want);
        ensure(diff < 1e-4, || format!("{options:?}: calc_diff vs the dequantised reference {diff:e}"))?;
    }
    Ok(())
}

/// TMA multicast across clusters of two (see the module docs).
fn multicast_pairs(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("multicast_pairs");
    let stream = gpu.stream();
    // m = 300: five 64-row blocks (pairs along M: two and one alone), three 128-row blocks and
    // two 256-row ones; n = 600: seven 96-wide tiles (pairs along N: three and one alone), five
    // 128-wide ones.
    let shape = GemmShape { m: 300, n: 600, k: 384 };
    let GemmShape { m, n, k } = shape;
    let h = small_integer_host(&mut rng, shape);
    let want: Vec<bf16> =
        gemm_entries(h.a_op(), h.b_op(), k, &deepkern::reference::gemm::all_entries(m, n)).into_iter().map(bf16::from_f64).collect();
    let ops = DeviceOperands::new(&stream, &h);
    let (a, b) = ops.views();
    let cases = [
        (Multicast::A, 64, 96, 2, None, false),
        (Multicast::B, 64, 96, 3, Some(4), true),
        (Multicast::A, 128, 128, 1, Some(5), false),
        (Multicast::B, 128, 112, 2, Some(2), false),
        (Multicast::B, 256, 64, 2, None, true),
        (Multicast::A, 256, 128, 1, Some(3), false),
    ];
    for (multicast, block_m, block_n, stages, max_sms, tma_store) in cases {
        let options = GemmOptions {
            tile: Some(TileConfig { block_m, block_n, stages }),
            multicast: Some(multicast),
            max_sms,
            tma_store,
            ..GemmOptions::default()
        };
        dense_bit_exact(&stream, &a, &b, shape, options, &want)?;
    }

    // Contiguous: experts of 150, 0, 70 and 100 rows: blocks 0 and 1 are expert 0's (a pair
    // along M that shares B), 2 and 3 experts 2 and 3 (a pair loaded apart); with 192 rows for
    // expert 3, its second block pairs with nothing.
    let (groups, n, k) = (4, 200, 256);
    let (bq, bsf) = experts(&mut rng, groups, n, k);
    let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
    let b = Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() };
    for counts in [[150, 0, 70, 100], [150, 0, 70, 192]] {
        let input = Contiguous::new(&stream, &mut rng, &counts, k);
        let (m, a) = (input.m(), input.activations());
        let want = input.reference(&bq, &bsf, groups, k);
        for (multicast, block_n, max_sms) in [(Multicast::B, 64, None), (Multicast::A, 96, Some(2)), (Multicast::B, 112, Some(3))] {
            let options = GemmOptions {
                tile: Some(TileConfig { block_m: 128, block_n, stages: 2 }),
                multicast: Some(multicast),
                max_sms,
                ..GemmOptions::default()
            };
            let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
            gemm_fp8_contiguous_with(&stream, &a, &b, &input.idx.as_view(), &mut d.as_view_mut(), GemmShape { m, n, k }, groups, options)
                .map_err(|e| format!("contiguous {counts:?} {options:?}: {e}"))?;
            compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("contiguous {counts:?} {options:?}"))?;
        }
    }

    // Refusals, before any launch.
    let refused = |r: Result<(), Error>, what: &str| match r {
        Err(Error::InvalidArgument { arg: "multicast", .. }) => Ok(()),
        other => Err(format!("{what}: expected a multicast refusal, got {other:?}")),
    };
    let input = Contiguous::new(&stream, &mut rng, &[128, 128], k);
    let (m, a) = (input.m(), input.activations());
    let mut d = stream.alloc_zeros::<bf16>(m * n).unwrap();
    let one_sm = GemmOptions { multicast: Some(Multicast::B), max_sms: Some(1), ..GemmOptions::default() };
    refused(
        gemm_fp8_contiguous_with(&stream, &a, &b, &input.idx.as_view(), &mut d.as_view_mut(), GemmShape { m, n, k }, groups, one_sm),
        "one SM",
    )?;
    let wide = GemmOptions {
        multicast: Some(Multicast::B),
        tile: Some(TileConfig { block_m: 128, block_n: 160, stages: 2 }),
        ..GemmOptions::default()
    };
    refused(
        gemm_fp8_contiguous_with(&stream, &a, &b, &input.idx.as_view(), &mut d.as_view_mut(), GemmShape { m, n, k }, groups, wide),
        "contiguous 128x160",
    )?;
    let arrivals = stream.clone_htod(&vec![128i32; m / 128]).unwrap();
    let forced = GemmOptions { multicast: Some(Multicast::A), max_sms: Some(64), ..GemmOptions::default() };
    refused(
        gemm_fp8_contiguous_arrived(
            &stream,
            &a,
            &b,
            &input.idx.as_view(),
            &arrivals.as_view(),
            &mut d.as_view_mut(),
            GemmShape { m, n, k },
            groups,
            forced,
        ),
        "arrivals",
    )?;
    let (aq, asf_tma, _) = masked_activations(&mut rng, groups, 64, k);
    let (d_a, d_sa) = (stream.clone_htod(&f8(&aq)).unwrap(), stream.clone_htod(&asf_tma).unwrap());
    let a = Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() };
    let valid = stream.clone_htod(&[64i32; 4]).unwrap();
    let mut d = stream.alloc_zeros::<bf16>(groups * 64 * n).unwrap();
    refused(
        gemm_fp8_masked_with(&stream, &a, &b, &valid.as_view(), &mut d.as_view_mut(), MaskedShape { groups, max_m: 64, n, k }, forced),
        "masked",
    )?;
    Ok(())
}

/// Every compiled tile shape of every layout, forced (see the module docs).
fn every_compiled_tile(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("every_compiled_tile");
    let stream = gpu.stream();
    let tile = |i: usize, block_m: usize, block_n: usize| {
        // Four stages of 256x128 leave no room for the TMA store's staging tile.
        let stages = [1, 2, if block_m == 256 { 3 } else { 4 }][i % 3];
        GemmOptions { tile: Some(TileConfig { block_m, block_n, stages }), ..GemmOptions::default() }
    };

    // Dense, bit-exact: m = 130 (two or three M blocks), n = 600, k = 384 (three k-blocks).
    let shape = GemmShape { m: 130, n: 600, k: 384 };
    let h = small_integer_host(&mut rng, shape);
    let want: Vec<bf16> = gemm_entries(h.a_op(), h.b_op(), shape.k, &deepkern::reference::gemm::all_entries(shape.m, shape.n))
        .into_iter()
        .map(bf16::from_f64)
        .collect();
    let ops = DeviceOperands::new(&stream, &h);
    let (a, b) = ops.views();
    let mut i = 0;
    for block_m in [64, 128, 256] {
        for &block_n in block_n_menu(block_m) {
            for tma_store in [false, true] {
                let options = GemmOptions { tma_store, ..tile(i, block_m, block_n) };
                i += 1;
                dense_bit_exact(&stream, &a, &b, shape, options, &want)?;
            }
        }
    }

    // Grouped: 3 experts (one empty), n = 600, k = 256.
    let (groups, n, k) = (3, 600, 256);
    let (bq, bsf) = experts(&mut rng, groups, n, k);
    let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
    let b = Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() };
    let input = Contiguous::new(&stream, &mut rng, &[150, 0, 70], k);
    let (m, a) = (input.m(), input.activations());
    let want = input.reference(&bq, &bsf, groups, k);
    for block_n in BLOCK_N_MENU.into_iter().filter(|&bn| is_compiled(&GemmLayout::GroupedContiguous { groups }, 128, bn)) {
        let options = tile(block_n / 16, 128, block_n);
        let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
        gemm_fp8_contiguous_with(&stream, &a, &b, &input.idx.as_view(), &mut d.as_view_mut(), GemmShape { m, n, k }, groups, options)
            .map_err(|e| format!("contiguous {options:?}: {e}"))?;
        compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("contiguous {options:?}"))?;
    }

    // Masked: 3 groups of max_m = 140 with 140, 0 and 65 valid rows.
    let max_m = 140;
    let valid = [140usize, 0, 65];
    let (aq, asf_tma, asf_rows) = masked_activations(&mut rng, groups, max_m, k);
    let (d_a, d_sa) = (stream.clone_htod(&f8(&aq)).unwrap(), stream.clone_htod(&asf_tma).unwrap());
    let d_valid = stream.clone_htod(&valid.iter().map(|&v| v as i32).collect::<Vec<_>>()).unwrap();
    let a = Fp8Activations { q: d_a.as_view(), sf: d_sa.as_view() };
    let want = grouped_masked(
        Fp8Operand { q: &aq, scales: &asf_rows, rows: groups * max_m },
        Fp8Operand { q: &bq, scales: &bsf, rows: groups * n },
        groups,
        k,
        &valid,
    );
    let mut i = 0;
    for block_m in [64, 128, 256] {
        for &block_n in block_n_menu(block_m) {
            let options = tile(i, block_m, block_n);
            i += 1;
            let mut d = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); groups * max_m * n]).unwrap();
            let shape = MaskedShape { groups, max_m, n, k };
            gemm_fp8_masked_with(&stream, &a, &b, &d_valid.as_view(), &mut d.as_view_mut(), shape, options)
                .map_err(|e| format!("masked {options:?}: {e}"))?;
            compare_grouped(&stream.clone_dtoh(&d).unwrap(), &want, &format!("masked {options:?}"))?;
        }
    }
    Ok(())
}

fn arrivals_complete_and_checked(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("arrivals_complete_and_checked");
    let stream = gpu.stream();
    let (groups, n, k) = (3, 300, 256);
    let input = Contiguous::new(&stream, &mut rng, &[200, 0, 90], k);
    let m = input.m();
    let (bq, bsf) = experts(&mut rng, groups, n, k);
    let (d_b, d_sb) = (stream.clone_htod(&f8(&bq)).unwrap(), stream.clone_htod(&bsf).unwrap());
    let d_idx = &input.idx;
    let (a, b) = (input.activations(), Fp8Weights { q: d_b.as_view(), sf: d_sb.as_view() });
    let shape = GemmShape { m, n, k };
    let sms = gpu.device.info().sm_count as usize;
    let options = GemmOptions { max_sms: Some(sms - 1), ..GemmOptions::default() };
    let mut want = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
    gemm_fp8_contiguous_with(&stream, &a, &b, &d_idx.as_view(), &mut want.as_view_mut(), shape, groups, options)
        .map_err(|e| e.to_string())?;
    let full = stream.clone_htod(&vec![128i32; m / 128]).unwrap();
    let mut got = stream.clone_htod(&vec![bf16::from_bits(NAN_BF16); m * n]).unwrap();
    gemm_fp8_contiguous_arrived(&stream, &a, &b, &d_idx.as_view(), &full.as_view(), &mut got.as_view_mut(), shape, groups, options)
        .map_err(|e| e.to_string())?;
    let (want, got) = (stream.clone_dtoh(&want).unwrap(), stream.clone_dtoh(&got).unwrap());
    ensure(want.iter().map(|v| v.to_bits()).eq(got.iter().map(|v| v.to_bits())), || "the gated GEMM differs from the ungated one".into())?;
    let arg = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {other:?}")),
    };
    let mut d = stream.alloc_zeros::<bf16>(m * n).unwrap();
    let tma = GemmOptions { tma_store: true, ..options };
    let r = gemm_fp8_contiguous_with(&stream, &a, &b, &d_idx.as_view(), &mut d.as_view_mut(), shape, groups, tma);
    ensure(arg(r)? == "tma_store", || "the TMA-store epilogue accepted on a grouped layout".into())?;
    let short = full.slice(..m / 128 - 1);
    let r = gemm_fp8_contiguous_arrived(&stream, &a, &b, &d_idx.as_view(), &short, &mut d.as_view_mut(), shape, groups, options);
    ensure(arg(r)? == "arrivals", || "a short counter array accepted".into())?;
    for budget in [None, Some(sms)] {
        let all = GemmOptions { max_sms: budget, ..GemmOptions::default() };
        let r = gemm_fp8_contiguous_arrived(&stream, &a, &b, &d_idx.as_view(), &full.as_view(), &mut d.as_view_mut(), shape, groups, all);
        ensure(arg(r)? == "max_sms", || format!("budget {budget:?} (no SM left to the writer) accepted"))?;
    }
    Ok(())
}
