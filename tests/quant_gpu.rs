//! The GPU FP8 quantisers (per-token-group 1x128 and per-block 128x128) against the CPU reference,
//! bit for bit.
//!
//! What each test proves:
//! - `random_*`: on fresh random inputs of many magnitudes and ragged shapes, every E4M3 byte and
//!   every scale equals the CPU quantiser's, and the padding rows of the scale array are untouched.
//! - `exact_small_integers`: on inputs whose scales are exact powers of two, dequantising gives the
//!   input back exactly. This does not lean on the CPU quantiser, so a bug shared by both shows.
//! - `edge_values`: zero rows (the amax floor), E4M3 subnormals, the bf16 extremes, -0.0.
//! - `no_out_of_bounds_access`: the kernel works inside views of larger buffers whose surroundings
//!   hold values that would change the result if read, and poison that must survive unwritten.
//! - `grid_stride_covers_large_inputs`: more groups than the launcher's grid, so the loop wraps.
//! - `empty_is_a_noop`, `bad_input_is_rejected_before_launch`: the wrapper's contract.
//! - `block_*`: the same properties for the per-block weight quantiser, with ragged `n`.
//! - `owned_tensor_quantize`: the allocating `quantize` returns an `Fp8Tensor` whose values and
//!   scales equal the CPU quantiser's (1x128 and 128x128, both scale formats), whose views have
//!   exactly the shape's lengths (empty shapes included), and which refuses a bad input by name.
//! - `silu_mul_matches_reference`: the fused SwiGLU quantiser (and its allocating form,
//!   `silu_mul_quantize_new`, bit for bit) against the CPU's `silu_mul` + per-token-group, batched,
//!   both scale formats: scales equal up to the last bit of `exp`, E4M3
//!   codes equal except where that bit moves a value across a rounding boundary (one code, rare),
//!   padding rows of the scales untouched; bad lengths are rejected before launch.

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::check::bitwise_eq;
use libtest_mimic::Failed;
use std::sync::Arc;

use deepkern::cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use deepkern::fp8::{e4m3_decode, e4m3_encode};
use deepkern::layout::{BlockShape, TokenGroupShape, scales_from_tma_layout};
use deepkern::quant::silu_mul_quantize_new;
use deepkern::reference::quant::{per_block, per_token_group, silu_mul_per_token_group};
use deepkern::{Error, F8E4M3, Fp8Shape, ScaleFormat, bf16, quantize, quantize_per_block, quantize_per_token_group, silu_mul_quantize};
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// A bit pattern no quantiser output can have: a NaN scale with a recognisable payload.
const SF_POISON: u32 = 0x7fba_dbad;
/// E4M3 NaN, never produced from finite inputs.
const Q_POISON: u8 = 0x7f;

fn main() {
    common::run(vec![
        ("random_f32_scales", random_f32_scales),
        ("random_ue8m0_scales", random_ue8m0_scales),
        ("exact_small_integers", exact_small_integers),
        ("edge_values", edge_values),
        ("no_out_of_bounds_access", no_out_of_bounds_access),
        ("grid_stride_covers_large_inputs", grid_stride_covers_large_inputs),
        ("empty_is_a_noop", empty_is_a_noop),
        ("bad_input_is_rejected_before_launch", bad_input_is_rejected_before_launch),
        ("block_random", block_random),
        ("block_exact_powers_of_two", block_exact_powers_of_two),
        ("block_no_out_of_bounds_access", block_no_out_of_bounds_access),
        ("block_bad_input_is_rejected_before_launch", block_bad_input_is_rejected_before_launch),
        ("silu_mul_matches_reference", silu_mul_matches_reference),
        ("owned_tensor_quantize", owned_tensor_quantize),
    ]);
}

/// Outputs of one GPU quantisation, copied back.
struct GpuOut {
    q: Vec<u8>,
    sf: Vec<f32>,
}

fn poisoned_sf(stream: &Arc<CudaStream>, len: usize) -> CudaSlice<f32> {
    stream.clone_htod(&vec![f32::from_bits(SF_POISON); len]).unwrap()
}

fn poisoned_q(stream: &Arc<CudaStream>, len: usize) -> CudaSlice<F8E4M3> {
    stream.clone_htod(&vec![F8E4M3::from_bits(Q_POISON); len]).unwrap()
}

fn q_bytes(q: Vec<F8E4M3>) -> Vec<u8> {
    q.iter().map(F8E4M3::to_bits).collect()
}

/// Quantises `x` on the GPU into poisoned outputs.
fn quantize_on_gpu(gpu: &Gpu, x: &[bf16], shape: TokenGroupShape, fmt: ScaleFormat) -> Result<GpuOut, Error> {
    let stream = gpu.stream();
    let d_x = stream.clone_htod(x).unwrap();
    let mut d_q = poisoned_q(&stream, shape.elements().unwrap());
    let mut d_sf = poisoned_sf(&stream, shape.scale_elements().unwrap());
    quantize_per_token_group(&stream, &d_x, &mut d_q, &mut d_sf, shape, fmt)?;
    Ok(GpuOut { q: q_bytes(stream.clone_dtoh(&d_q).unwrap()), sf: stream.clone_dtoh(&d_sf).unwrap() })
}

/// Checks GPU outputs against the CPU quantiser: E4M3 bytes and scales bitwise, padding untouched.
fn check_against_cpu(x: &[bf16], shape: TokenGroupShape, fmt: ScaleFormat, out: &GpuOut) -> TestResult {
    let per_op = shape.m * shape.k;
    let kb = shape.k_blocks();
    let m_pad = shape.m_pad();
    for g in 0..shape.num_groups {
        let xf: Vec<f32> = x[g * per_op..(g + 1) * per_op].iter().map(|v| v.to_f32()).collect();
        let want = per_token_group(&xf, shape.m, shape.k, fmt);
        let ctx = |what: &str| format!("{what} of operand {g} of {shape:?} {fmt:?}");
        bitwise_eq(&out.q[g * per_op..(g + 1) * per_op], &want.q).map_err(|e| format!("{}: {e}", ctx("q")))?;
        let sf_op = &out.sf[g * kb * m_pad..(g + 1) * kb * m_pad];
        bitwise_eq(&scales_from_tma_layout(sf_op, shape.m, kb), &want.scales).map_err(|e| format!("{}: {e}", ctx("scales")))?;
        for k in 0..kb {
            for r in shape.m..m_pad {
                let bits = sf_op[k * m_pad + r].to_bits();
                ensure(bits == SF_POISON, || format!("{}: padding row {r} of block {k} was written ({bits:#x})", ctx("sf")))?;
            }
        }
    }
    Ok(())
}

/// Passes when `r` is a shape or alignment error naming argument `want`.
fn expect_arg_error(r: Result<(), Error>, want: &str) -> TestResult {
    match r {
        Err(Error::Shape { arg, .. } | Error::Alignment { arg, .. }) if arg == want => Ok(()),
        other => Err(format!("expected an error naming `{want}`, got {other:?}").into()),
    }
}

/// Random activations: each row has its own magnitude (1e-6 .. 1e4), some rows carry outliers.
fn random_activations(rng: &mut StdRng, rows: usize, k: usize) -> Vec<bf16> {
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut x = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let magnitude = 10f32.powf(rng.random_range(-6.0..4.0));
        let outlier = rng.random_bool(0.1);
        for _ in 0..k {
            let mut v = normal.sample(rng) * magnitude;
            if outlier && rng.random_bool(0.01) {
                v *= 100.0;
            }
            x.push(bf16::from_f32(v));
        }
    }
    x
}

const RANDOM_SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 128), (1, 3, 256), (1, 4, 128), (1, 129, 7168), (3, 5, 384), (2, 1000, 1024), (1, 4096, 7168), (4, 77, 2048)];

fn random_cases(gpu: &Gpu, fmt: ScaleFormat, name: &str) -> TestResult {
    let mut rng = gpu.rng(name);
    for (g, m, k) in RANDOM_SHAPES {
        let shape = TokenGroupShape::batched(g, m, k);
        let x = random_activations(&mut rng, g * m, k);
        let out = quantize_on_gpu(gpu, &x, shape, fmt).map_err(|e| e.to_string())?;
        check_against_cpu(&x, shape, fmt, &out)?;
    }
    Ok(())
}

fn random_f32_scales(gpu: &Gpu) -> TestResult {
    random_cases(gpu, ScaleFormat::F32, "random_f32_scales")
}

fn random_ue8m0_scales(gpu: &Gpu) -> TestResult {
    random_cases(gpu, ScaleFormat::Ue8m0, "random_ue8m0_scales")
}

fn exact_small_integers(gpu: &Gpu) -> TestResult {
    // E4M3-representable integers; every group holds +-448 once, so scale = 2^e exactly.
    const VALUES: [f32; 12] = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 12.0, 16.0, 40.0, 96.0, 240.0, 448.0];
    let mut rng = gpu.rng("exact_small_integers");
    let shape = TokenGroupShape::batched(2, 37, 1024);
    let mut x = Vec::with_capacity(shape.elements().unwrap());
    let mut scales = Vec::new();
    for _ in 0..shape.num_groups * shape.m {
        for _ in 0..shape.k_blocks() {
            let e: i32 = rng.random_range(-20..20);
            let p = 2f32.powi(e);
            scales.push(p);
            let at = rng.random_range(0..128);
            for j in 0..128 {
                let n = if j == at { 448.0 } else { VALUES[rng.random_range(0..VALUES.len())] };
                let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
                x.push(bf16::from_f32(sign * n * p));
            }
        }
    }
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let out = quantize_on_gpu(gpu, &x, shape, fmt).map_err(|e| e.to_string())?;
        for (i, (&q, xv)) in out.q.iter().zip(&x).enumerate() {
            let (row, kb) = (i / shape.k, (i % shape.k) / 128);
            let (g, r) = (row / shape.m, row % shape.m);
            let sf = out.sf[shape.scale_index(g, r, kb)];
            let want_sf = scales[row * shape.k_blocks() + kb];
            ensure(sf == want_sf, || format!("{fmt:?}: scale of row {row} block {kb} is {sf:e}, want {want_sf:e}"))?;
            let back = e4m3_decode(q) * sf;
            ensure(back == xv.to_f32(), || format!("{fmt:?}: element {i}: {} dequantises to {back:e}", xv.to_f32()))?;
            ensure(q == e4m3_encode(xv.to_f32() / sf), || format!("{fmt:?}: element {i}: byte {q:#04x}"))?;
        }
    }
    Ok(())
}

fn edge_values(gpu: &Gpu) -> TestResult {
    let k = 512;
    let rows: Vec<Vec<f32>> = vec![
        vec![0.0; k],                                                            // amax floor 1e-4
        (0..k).map(|i| if i % 2 == 0 { -0.0 } else { 0.0 }).collect(),           // signed zeros
        (0..k).map(|i| (i as f32 - 256.0) * 1e-9).collect(),                     // below the floor
        (0..k).map(|i| if i == 7 { 1.0 } else { (i as f32) * 1e-5 }).collect(),  // E4M3 subnormals
        (0..k).map(|i| if i % 3 == 0 { 3.3e38 } else { -(i as f32) }).collect(), // bf16 extremes
        (0..k).map(|i| if i % 128 == 0 { -1e-30 } else { 1e-38 }).collect(),     // tiny magnitudes
        (0..k).map(|i| 448.0 * (1.0 + i as f32 / k as f32)).collect(),           // near saturation
    ];
    let shape = TokenGroupShape::new(rows.len(), k);
    let x: Vec<bf16> = rows.concat().into_iter().map(bf16::from_f32).collect();
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let out = quantize_on_gpu(gpu, &x, shape, fmt).map_err(|e| e.to_string())?;
        check_against_cpu(&x, shape, fmt, &out)?;
    }
    Ok(())
}

fn no_out_of_bounds_access(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("no_out_of_bounds_access");
    let shape = TokenGroupShape::batched(3, 45, 768);
    let x = random_activations(&mut rng, shape.num_groups * shape.m, shape.k);
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let out =
            quantize_guarded(gpu, &x, shape.scale_elements().unwrap(), |s, x, q, sf| quantize_per_token_group(s, x, q, sf, shape, fmt))
                .map_err(|e| format!("{fmt:?}: {e}"))?;
        check_against_cpu(&x, shape, fmt, &out)?;
    }
    Ok(())
}

fn grid_stride_covers_large_inputs(gpu: &Gpu) -> TestResult {
    // 19000 x 56 groups > 2^16 blocks x 16 groups per block: the grid-stride loop must wrap.
    let mut rng = gpu.rng("grid_stride_covers_large_inputs");
    let shape = TokenGroupShape::new(19_000, 7168);
    let x = random_activations(&mut rng, shape.m, shape.k);
    let out = quantize_on_gpu(gpu, &x, shape, ScaleFormat::F32).map_err(|e| e.to_string())?;
    check_against_cpu(&x, shape, ScaleFormat::F32, &out)
}

fn empty_is_a_noop(gpu: &Gpu) -> TestResult {
    // Empty views of poisoned, non-empty buffers (CUDA cannot allocate zero bytes): nothing may
    // be written anywhere in them.
    let stream = gpu.stream();
    let x = stream.alloc_zeros::<bf16>(256).unwrap();
    let mut q = poisoned_q(&stream, 256);
    let mut sf = poisoned_sf(&stream, 64);
    for shape in [TokenGroupShape::new(0, 7168), TokenGroupShape::batched(0, 16, 128), TokenGroupShape::new(16, 0)] {
        let (n, n_sf) = (shape.elements().unwrap(), shape.scale_elements().unwrap());
        quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, ScaleFormat::F32)
            .map_err(|e| format!("{shape:?}: {e}"))?;
    }
    let q = q_bytes(stream.clone_dtoh(&q).unwrap());
    let sf = stream.clone_dtoh(&sf).unwrap();
    ensure(q.iter().all(|&b| b == Q_POISON), || "an empty launch wrote q".into())?;
    ensure(sf.iter().all(|s| s.to_bits() == SF_POISON), || "an empty launch wrote scales".into())
}

fn bad_input_is_rejected_before_launch(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let shape = TokenGroupShape::new(8, 256);
    let n = shape.elements().unwrap();
    let n_sf = shape.scale_elements().unwrap();
    let x = stream.alloc_zeros::<bf16>(n + 8).unwrap();
    let mut q = poisoned_q(&stream, n + 8);
    let mut sf = poisoned_sf(&stream, n_sf + 4);

    let fmt = ScaleFormat::F32;
    let bad_k = TokenGroupShape::new(8, 200);
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..1600), &mut q.slice_mut(..1600), &mut sf.slice_mut(..16), bad_k, fmt),
        "k",
    )?;
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..n - 1), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, fmt),
        "x",
    )?;
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(..n + 1), &mut sf.slice_mut(..n_sf), shape, fmt),
        "q",
    )?;
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf - 1), shape, fmt),
        "sf",
    )?;
    // Misaligned views: one element in is 2 bytes (x), 1 byte (q), 4 bytes (sf) off.
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(1..n + 1), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, fmt),
        "x",
    )?;
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(1..n + 1), &mut sf.slice_mut(..n_sf), shape, fmt),
        "q",
    )?;
    expect_arg_error(
        quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(1..n_sf + 1), shape, fmt),
        "sf",
    )?;
    let q_after = q_bytes(stream.clone_dtoh(&q).unwrap());
    let sf_after = stream.clone_dtoh(&sf).unwrap();
    ensure(q_after.iter().all(|&b| b == Q_POISON), || "a rejected call wrote q".into())?;
    ensure(sf_after.iter().all(|s| s.to_bits() == SF_POISON), || "a rejected call wrote sf".into())?;
    // The same buffers, correctly sliced, are accepted.
    quantize_per_token_group(&stream, &x.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, fmt)
        .map_err(|e| e.to_string().into())
}

/// Runs a quantiser on views of guarded buffers: `GUARD` elements of huge values around the input
/// (reading them would change a scale) and of poison around `q` and `sf` (writing them shows).
/// Fails if a guard was touched; returns the outputs inside the guards.
fn quantize_guarded(
    gpu: &Gpu,
    input: &[bf16],
    n_sf: usize,
    quantize: impl FnOnce(&Arc<CudaStream>, &CudaView<bf16>, &mut CudaViewMut<F8E4M3>, &mut CudaViewMut<f32>) -> Result<(), Error>,
) -> Result<GpuOut, String> {
    const GUARD: usize = 64; // 128 bytes of bf16 or f32: views stay 16-byte aligned
    let stream = gpu.stream();
    let n = input.len();
    let mut big = vec![bf16::from_f32(3.0e38); n + 2 * GUARD];
    big[GUARD..GUARD + n].copy_from_slice(input);
    let d_in = stream.clone_htod(&big).unwrap();
    let mut d_q = poisoned_q(&stream, n + 2 * GUARD);
    let mut d_sf = poisoned_sf(&stream, n_sf + 2 * GUARD);
    quantize(&stream, &d_in.slice(GUARD..GUARD + n), &mut d_q.slice_mut(GUARD..GUARD + n), &mut d_sf.slice_mut(GUARD..GUARD + n_sf))
        .map_err(|e| e.to_string())?;
    let q = q_bytes(stream.clone_dtoh(&d_q).unwrap());
    let sf = stream.clone_dtoh(&d_sf).unwrap();
    let outside = |i: usize, len: usize| i < GUARD || i >= GUARD + len;
    if let Some((i, b)) = q.iter().enumerate().find(|&(i, &b)| outside(i, n) && b != Q_POISON) {
        return Err(format!("q guard element {i} was written ({b:#04x})"));
    }
    if let Some((i, _)) = sf.iter().enumerate().find(|&(i, s)| outside(i, n_sf) && s.to_bits() != SF_POISON) {
        return Err(format!("sf guard element {i} was written"));
    }
    Ok(GpuOut { q: q[GUARD..GUARD + n].to_vec(), sf: sf[GUARD..GUARD + n_sf].to_vec() })
}

/// The per-block quantiser on guarded views (see [`quantize_guarded`]).
fn block_on_gpu(gpu: &Gpu, w: &[bf16], shape: BlockShape, fmt: ScaleFormat) -> Result<GpuOut, Failed> {
    quantize_guarded(gpu, w, shape.scale_elements().unwrap(), |s, w, q, sf| quantize_per_block(s, w, q, sf, shape, fmt))
        .map_err(|e| format!("{shape:?} {fmt:?}: {e}").into())
}

/// Checks per-block GPU outputs against the CPU quantiser, operand by operand, bitwise.
fn check_blocks_against_cpu(w: &[bf16], shape: BlockShape, fmt: ScaleFormat, out: &GpuOut) -> TestResult {
    let per_op = shape.n * shape.k;
    let per_op_sf = shape.n_blocks() * shape.k_blocks();
    for g in 0..shape.num_groups {
        let wf: Vec<f32> = w[g * per_op..(g + 1) * per_op].iter().map(|v| v.to_f32()).collect();
        let want = per_block(&wf, shape.n, shape.k, fmt);
        let ctx = |what: &str| format!("{what} of operand {g} of {shape:?} {fmt:?}");
        bitwise_eq(&out.q[g * per_op..(g + 1) * per_op], &want.q).map_err(|e| format!("{}: {e}", ctx("q")))?;
        bitwise_eq(&out.sf[g * per_op_sf..(g + 1) * per_op_sf], &want.scales).map_err(|e| format!("{}: {e}", ctx("scales")))?;
    }
    Ok(())
}

fn block_random(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("block_random");
    for (g, n, k) in [(1, 1, 128), (1, 128, 128), (1, 130, 256), (3, 200, 384), (2, 255, 1024), (1, 2112, 7168)] {
        let shape = BlockShape::batched(g, n, k);
        // Row magnitudes vary, so a block's amax comes from one of its rows.
        let w = random_activations(&mut rng, g * n, k);
        for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let out = block_on_gpu(gpu, &w, shape, fmt)?;
            check_blocks_against_cpu(&w, shape, fmt, &out)?;
        }
    }
    Ok(())
}

fn block_exact_powers_of_two(gpu: &Gpu) -> TestResult {
    // Every 128x128 block holds one +-448 * 2^e and otherwise E4M3-representable integers times
    // 2^e, so its scale is exactly 2^e and dequantisation gives w back exactly.
    const VALUES: [f32; 8] = [0.0, 1.0, 3.0, 6.0, 13.0, 28.0, 120.0, 448.0];
    let mut rng = gpu.rng("block_exact_powers_of_two");
    let shape = BlockShape::batched(2, 200, 384);
    let (nb, kb) = (shape.n_blocks(), shape.k_blocks());
    let exps: Vec<i32> = (0..shape.num_groups * nb * kb).map(|_| rng.random_range(-20..20)).collect();
    let mut w = vec![bf16::ZERO; shape.elements().unwrap()];
    for (i, v) in w.iter_mut().enumerate() {
        let (op, r, c) = (i / (shape.n * shape.k), (i / shape.k) % shape.n, i % shape.k);
        let e = exps[shape.scale_index(op, r / 128, c / 128)];
        let n = if r % 128 == 0 && c % 128 == 0 { 448.0 } else { VALUES[rng.random_range(0..VALUES.len())] };
        *v = bf16::from_f32(if rng.random_bool(0.5) { n } else { -n } * 2f32.powi(e));
    }
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let out = block_on_gpu(gpu, &w, shape, fmt)?;
        for (i, (&q, wv)) in out.q.iter().zip(&w).enumerate() {
            let (op, r, c) = (i / (shape.n * shape.k), (i / shape.k) % shape.n, i % shape.k);
            let b = shape.scale_index(op, r / 128, c / 128);
            let want = 2f32.powi(exps[b]);
            ensure(out.sf[b] == want, || format!("{fmt:?}: scale of block {b} is {:e}, want {want:e}", out.sf[b]))?;
            let back = e4m3_decode(q) * out.sf[b];
            ensure(back == wv.to_f32(), || format!("{fmt:?}: element {i}: {} dequantises to {back:e}", wv.to_f32()))?;
        }
    }
    Ok(())
}

fn block_no_out_of_bounds_access(gpu: &Gpu) -> TestResult {
    // Ragged n (the last block row is partial) inside guarded views: `block_on_gpu` checks the
    // guards; the values must still match the CPU (a read of the huge guard values would not).
    let mut rng = gpu.rng("block_no_out_of_bounds_access");
    for (g, n, k) in [(1, 1, 128), (2, 129, 256), (3, 77, 640)] {
        let shape = BlockShape::batched(g, n, k);
        let w = random_activations(&mut rng, g * n, k);
        let out = block_on_gpu(gpu, &w, shape, ScaleFormat::F32)?;
        check_blocks_against_cpu(&w, shape, ScaleFormat::F32, &out)?;
    }
    Ok(())
}

fn block_bad_input_is_rejected_before_launch(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let shape = BlockShape::new(130, 256);
    let (n, n_sf) = (shape.elements().unwrap(), shape.scale_elements().unwrap());
    let w = stream.alloc_zeros::<bf16>(n + 8).unwrap();
    let mut q = poisoned_q(&stream, n + 8);
    let mut sf = poisoned_sf(&stream, n_sf + 4);
    let fmt = ScaleFormat::F32;
    let bad_k = BlockShape::new(130, 200);
    expect_arg_error(quantize_per_block(&stream, &w.slice(..26000), &mut q.slice_mut(..26000), &mut sf.slice_mut(..4), bad_k, fmt), "k")?;
    expect_arg_error(quantize_per_block(&stream, &w.slice(..n + 1), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, fmt), "w")?;
    expect_arg_error(quantize_per_block(&stream, &w.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf + 1), shape, fmt), "sf")?;
    expect_arg_error(quantize_per_block(&stream, &w.slice(1..n + 1), &mut q.slice_mut(..n), &mut sf.slice_mut(..n_sf), shape, fmt), "w")?;
    expect_arg_error(quantize_per_block(&stream, &w.slice(..n), &mut q.slice_mut(4..n + 4), &mut sf.slice_mut(..n_sf), shape, fmt), "q")?;
    expect_arg_error(quantize_per_block(&stream, &w.slice(..n), &mut q.slice_mut(..n), &mut sf.slice_mut(2..n_sf + 2), shape, fmt), "sf")?;
    Ok(())
}

fn silu_mul_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("silu_mul_matches_reference");
    let stream = gpu.stream();
    for (g, m, k) in [(1, 37, 2048), (3, 5, 256), (4, 130, 128)] {
        for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let shape = TokenGroupShape::batched(g, m, k);
            let h: Vec<bf16> = (0..g * m * 2 * k)
                .map(|i| bf16::from_f32(if i % (2 * k) < k { rng.random_range(-8.0f32..8.0) } else { rng.random_range(-2.0f32..2.0) }))
                .collect();
            let d_h = stream.clone_htod(&h).unwrap();
            let mut d_q = poisoned_q(&stream, shape.elements().unwrap());
            let mut d_sf = poisoned_sf(&stream, shape.scale_elements().unwrap());
            silu_mul_quantize(&stream, &d_h, &mut d_q, &mut d_sf, shape, fmt).map_err(|e| e.to_string())?;
            let q = q_bytes(stream.clone_dtoh(&d_q).unwrap());
            let sf = stream.clone_dtoh(&d_sf).unwrap();
            // The allocating form writes the same bits (scales compared without the padding,
            // which the borrowed form leaves poisoned and the owned one zero).
            let t = silu_mul_quantize_new(&stream, &d_h, shape, fmt).map_err(|e| e.to_string())?;
            ensure(q_bytes(stream.clone_dtoh(&t.q()).unwrap()) == q, || format!("{shape:?} {fmt:?}: silu_mul_quantize_new's q differs"))?;
            let owned_sf = stream.clone_dtoh(&t.sf()).unwrap();
            let real =
                |v: &[f32]| -> Vec<u32> { v.iter().enumerate().filter(|(i, _)| i % shape.m_pad() < m).map(|(_, x)| x.to_bits()).collect() };
            ensure(real(&owned_sf) == real(&sf), || format!("{shape:?} {fmt:?}: silu_mul_quantize_new's scales differ"))?;
            let (per_op, kb, m_pad) = (m * k, shape.k_blocks(), shape.m_pad());
            let mut moved = 0usize;
            for op in 0..g {
                let hf: Vec<f32> = h[op * 2 * per_op..(op + 1) * 2 * per_op].iter().map(|v| v.to_f32()).collect();
                let want = silu_mul_per_token_group(&hf, m, k, fmt);
                let got_sf = scales_from_tma_layout(&sf[op * kb * m_pad..(op + 1) * kb * m_pad], m, kb);
                for (i, (&a, &b)) in got_sf.iter().zip(&want.scales).enumerate() {
                    ensure((a - b).abs() <= b.abs() * 1e-6, || format!("{shape:?} {fmt:?}: scale {i}: {a} vs {b}"))?;
                }
                for (i, (&a, &b)) in q[op * per_op..(op + 1) * per_op].iter().zip(&want.q).enumerate() {
                    if a != b {
                        moved += 1;
                        let close = (a & 0x80) == (b & 0x80) && (i32::from(a & 0x7f) - i32::from(b & 0x7f)).abs() == 1;
                        ensure(close, || format!("{shape:?} {fmt:?}: q[{i}] = {a:#04x}, reference {b:#04x}"))?;
                    }
                }
                for kk in 0..kb {
                    for r in m..m_pad {
                        let bits = sf[(op * kb + kk) * m_pad + r].to_bits();
                        ensure(bits == SF_POISON, || format!("{shape:?}: scale padding row {r} written"))?;
                    }
                }
            }
            ensure(moved * 200 <= g * m * k, || format!("{shape:?} {fmt:?}: {moved} codes differ by one, more than 0.5%"))?;
        }
    }
    let shape = TokenGroupShape::new(4, 256);
    let d_h = stream.alloc_zeros::<bf16>(4 * 256 * 2 - 1).unwrap();
    let mut d_q = stream.alloc_zeros::<F8E4M3>(4 * 256).unwrap();
    let mut d_sf = stream.alloc_zeros::<f32>(shape.scale_elements().unwrap()).unwrap();
    expect_arg_error(silu_mul_quantize(&stream, &d_h, &mut d_q, &mut d_sf, shape, ScaleFormat::F32), "h")
}

fn owned_tensor_quantize(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("owned_tensor_quantize");
    let stream = gpu.stream();
    for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        // Activations: [3, 5, 384], scales [3, 3, 8] transposed.
        let shape = TokenGroupShape::batched(3, 5, 384);
        let x = random_activations(&mut rng, 15, 384);
        let t = quantize(&stream, &stream.clone_htod(&x).map_err(|e| e.to_string())?, shape, fmt).map_err(|e| e.to_string())?;
        ensure(t.shape() == Fp8Shape::TokenGroup(shape) && t.format() == fmt, || format!("{:?} {:?}", t.shape(), t.format()))?;
        ensure(t.q().len() == 3 * 5 * 384 && t.sf().len() == 3 * 3 * 8, || format!("lengths {} and {}", t.q().len(), t.sf().len()))?;
        let a = t.activations();
        ensure(a.q.len() == t.q().len() && a.sf.len() == t.sf().len(), || "activations() differs from q() and sf()".into())?;
        let q = q_bytes(stream.clone_dtoh(&t.q()).map_err(|e| e.to_string())?);
        let sf = stream.clone_dtoh(&t.sf()).map_err(|e| e.to_string())?;
        for g in 0..3 {
            let xf: Vec<f32> = x[g * 5 * 384..(g + 1) * 5 * 384].iter().map(|v| v.to_f32()).collect();
            let want = per_token_group(&xf, 5, 384, fmt);
            bitwise_eq(&q[g * 5 * 384..(g + 1) * 5 * 384], &want.q).map_err(|e| format!("q of operand {g} {fmt:?}: {e}"))?;
            bitwise_eq(&scales_from_tma_layout(&sf[g * 24..(g + 1) * 24], 5, 3), &want.scales)
                .map_err(|e| format!("scales of operand {g} {fmt:?}: {e}"))?;
        }
        // Weights: [2, 130, 256], scales [2, 2, 2].
        let shape = BlockShape::batched(2, 130, 256);
        let w = random_activations(&mut rng, 260, 256);
        let t = quantize(&stream, &stream.clone_htod(&w).map_err(|e| e.to_string())?, shape, fmt).map_err(|e| e.to_string())?;
        ensure(t.shape() == Fp8Shape::Block(shape) && t.weights().sf.len() == 8, || format!("{:?}: {} scales", t.shape(), t.sf().len()))?;
        let out = GpuOut {
            q: q_bytes(stream.clone_dtoh(&t.q()).map_err(|e| e.to_string())?),
            sf: stream.clone_dtoh(&t.sf()).map_err(|e| e.to_string())?,
        };
        check_blocks_against_cpu(&w, shape, fmt, &out)?;
    }
    // Empty: views of no element, though CUDA allocated one.
    let x = stream.alloc_zeros::<bf16>(1).map_err(|e| e.to_string())?;
    let t = quantize(&stream, &x.slice(..0), TokenGroupShape::new(0, 7168), ScaleFormat::F32).map_err(|e| e.to_string())?;
    ensure(t.q().is_empty() && t.sf().is_empty(), || format!("empty tensor has {} and {} elements", t.q().len(), t.sf().len()))?;
    // A bad input is named, before anything is allocated or launched.
    expect_arg_error(quantize(&stream, &x, TokenGroupShape::new(2, 128), ScaleFormat::F32).map(|_| ()), "x")?;
    expect_arg_error(quantize(&stream, &x, BlockShape::new(2, 128), ScaleFormat::F32).map(|_| ()), "w")?;
    expect_arg_error(quantize(&stream, &x, TokenGroupShape::new(1, 100), ScaleFormat::F32).map(|_| ()), "k")
}
