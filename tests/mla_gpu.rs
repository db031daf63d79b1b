//! MLA kernels on the GPU against the f64 CPU reference. What each test proves:
//! - `combine_matches_reference`: for schedules of random sequence lengths, merging random partials
//!   (some chunks saw no key: lse -inf) gives the reference merge within bf16 / fp16 rounding, and
//!   requests with a single chunk are left untouched (poison survives).
//! - `combine_skips_malformed_ranges`: chunk ranges out of bounds are counted, never read or written.
//! - `combine_rejects_bad_input`: length errors before any launch.
//! - `device_schedule_matches_the_reference`: the GPU scheduler writes the Rust schedule's encoding
//!   bit for bit (lengths 0, 1, 63, 64, 65 and long ones; negative lengths count as 0), and leaves
//!   uniform batches that fit whole under the budget unsplit.
//! - `decode_matches_reference`: whole decode steps (schedule, split-KV kernel, combine) in bf16
//!   and fp16 against the f64 reference: calc_diff <= 1e-5 on out, |lse - ref| <= 1e-3, no NaN;
//!   pages of 16, 32, 64 and 128 keys; lengths 0, 1, 63, 64, 65 and long ones in one batch; s_q 1
//!   to 4; h_q 1, 16, 20, 64, 128; batch 1 to 128. Every cache page no request owns and the tail
//!   of every last page hold NaN, block-table entries past a length hold garbage, the block table
//!   is shuffled, and the outputs are poisoned before the launch.
//! - `decode_is_deterministic`: the same step twice gives the same bits.
//! - `decode_masks_invalid_pages`: without host lengths, an out-of-range page index inside a length
//!   is counted, never dereferenced, and every output stays finite.
//! - `decode_counts_lengths_past_the_table`: without host lengths, a device length past what the
//!   block table addresses: the keys beyond it are absent (f64 attention over the table's keys)
//!   and the violation is counted.
//! - `decode_rejects_bad_input`: wrong last dimension, unsupported page, block table too short for
//!   a length, mismatched batch: errors before any launch.
//! - `decode_launcher_zeroes_its_counter_for_an_empty_batch` (C ABI): `num_invalid` holding a
//!   count from before is zeroed even when the batch is empty.
//! - `decode_launcher_skips_chunks_outside_their_request` (C ABI): a part whose first split index
//!   is past its request's chunks (its partial slot belongs to the next request) is counted and
//!   writes nothing; the other requests still match the reference.
//! - `decode_survives_a_block_table_rewritten_during_the_step` (simulator only): a host thread
//!   flips a request's page indices between valid and invalid while the step runs; the kernel
//!   reads each entry once per tile, so every TMA phase gets exactly the bytes it expects (a
//!   second read could leave the barrier short, a hang, or over-filled), and outputs stay finite.

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::check::calc_diff;
use deepkern::mla::{
    CombineOut, DEFAULT_SOFTMAX_SCALE, DecodeShape, DecodeWorkspace, DeviceSchedule, HEAD_DIM_K, HEAD_DIM_V, MlaElement, PagedKv, Partials,
    combine, decode, decode_alloc, plan_on_device,
};
use deepkern::plan::mla::schedule;
use deepkern::reference::mla::{MlaOut, MlaProblem, PagedCache, decode as reference_decode, merge};
use deepkern::{Error, bf16};
use half::f16;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

fn main() {
    let simulator_only = [(
        "decode_survives_a_block_table_rewritten_during_the_step",
        "a host thread rewrites the block table in place while the kernel runs (simulated device memory is host memory)",
    )];
    common::run_with_sets(
        vec![
            ("combine_matches_reference", combine_matches_reference),
            ("combine_skips_malformed_ranges", combine_skips_malformed_ranges),
            ("combine_rejects_bad_input", combine_rejects_bad_input),
            ("device_schedule_matches_the_reference", device_schedule_matches_the_reference),
            ("decode_matches_reference", decode_matches_reference),
            ("decode_is_deterministic", decode_is_deterministic),
            ("decode_masks_invalid_pages", decode_masks_invalid_pages),
            ("decode_counts_lengths_past_the_table", decode_counts_lengths_past_the_table),
            ("decode_rejects_bad_input", decode_rejects_bad_input),
            ("decode_alloc_defaults_and_owned_outputs", decode_alloc_defaults_and_owned_outputs),
            ("decode_launcher_zeroes_its_counter_for_an_empty_batch", decode_launcher_zeroes_its_counter_for_an_empty_batch),
            ("decode_launcher_skips_chunks_outside_their_request", decode_launcher_skips_chunks_outside_their_request),
            ("decode_survives_a_block_table_rewritten_during_the_step", decode_survives_a_block_table_rewritten_during_the_step),
        ],
        &[],
        &simulator_only,
    );
}

/// The C ABI of `csrc/include/deepkern.h` (the crate's committed bindings), for the launchers'
/// own contract: inputs the safe wrappers never pass (a schedule not written by the scheduler, an
/// empty batch).
#[cfg(deepkern_kernels)]
#[allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, unreachable_pub, clippy::all)]
#[rustfmt::skip]
#[path = "../src/ffi/bindings.rs"]
mod ffi;

/// Random partials for `num_chunks` chunks of `rows` rows; about one chunk row in 8 saw no key.
fn partials(rng: &mut StdRng, num_chunks: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let o = (0..num_chunks * rows * HEAD_DIM_V).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let lse =
        (0..num_chunks * rows).map(|_| if rng.random_ratio(1, 8) { f32::NEG_INFINITY } else { rng.random_range(-6.0f32..6.0) }).collect();
    (o, lse)
}

/// The reference merge of request `b`'s chunks `splits[b] .. splits[b+1]`.
fn reference(o: &[f32], lse: &[f32], rows: usize, chunks: std::ops::Range<usize>) -> MlaOut {
    let parts: Vec<MlaOut> = chunks
        .map(|c| MlaOut {
            out: o[c * rows * HEAD_DIM_V..(c + 1) * rows * HEAD_DIM_V].iter().map(|&v| f64::from(v)).collect(),
            lse: lse[c * rows..(c + 1) * rows].iter().map(|&v| f64::from(v)).collect(),
        })
        .collect();
    merge(&parts)
}

/// Runs the combine for `T` and checks every request against the reference (`eps`: relative
/// rounding of `T`).
fn check<T: MlaElement + Copy + Into<f32>>(gpu: &Gpu, lens: &[u32], parts: usize, rows: usize, eps: f32, poison: T) -> TestResult {
    let mut rng = gpu.rng("combine_matches_reference");
    let plan = schedule(lens, parts);
    let batch = lens.len();
    let num_chunks = *plan.splits.last().unwrap() as usize;
    let (o, lse) = partials(&mut rng, num_chunks, rows);
    let splits: Vec<i32> = plan.splits.iter().map(|&s| s as i32).collect();
    let stream = gpu.stream();
    let (d_o, d_lse, d_splits) = (stream.clone_htod(&o).unwrap(), stream.clone_htod(&lse).unwrap(), stream.clone_htod(&splits).unwrap());
    let mut d_out = stream.clone_htod(&vec![poison; batch * rows * HEAD_DIM_V]).unwrap();
    let mut d_lse_out = stream.clone_htod(&vec![f32::from_bits(0x7fba_dbad); batch * rows]).unwrap();
    let mut d_invalid = stream.alloc_zeros::<i32>(1).unwrap();
    let p = Partials { o: d_o.as_view(), lse: d_lse.as_view(), splits: d_splits.as_view() };
    let mut out = CombineOut { out: d_out.as_view_mut(), lse: d_lse_out.as_view_mut(), num_invalid: d_invalid.as_view_mut() };
    combine(&stream, &p, &mut out, batch, rows).map_err(|e| e.to_string())?;
    let got: Vec<T> = stream.clone_dtoh(&d_out).unwrap();
    let got_lse = stream.clone_dtoh(&d_lse_out).unwrap();
    ensure(stream.clone_dtoh(&d_invalid).unwrap()[0] == 0, || "valid ranges counted as invalid".into())?;
    let poison_f: f32 = poison.into();
    for b in 0..batch {
        let (c0, c1) = (splits[b] as usize, splits[b + 1] as usize);
        let rows_out = &got[b * rows * HEAD_DIM_V..(b + 1) * rows * HEAD_DIM_V];
        if c1 - c0 <= 1 {
            ensure(rows_out.iter().all(|v| (*v).into().to_bits() == poison_f.to_bits()), || {
                format!("request {b} (one chunk) was written")
            })?;
            ensure(got_lse[b * rows..(b + 1) * rows].iter().all(|v| v.to_bits() == 0x7fba_dbad), || format!("request {b}: lse written"))?;
            continue;
        }
        let want = reference(&o, &lse, rows, c0..c1);
        for r in 0..rows {
            let (w, g) = (want.lse[r], f64::from(got_lse[b * rows + r]));
            ensure(w == g || (w - g).abs() <= 1e-5 * w.abs().max(1.0), || format!("request {b} row {r}: lse {g} want {w}"))?;
            for d in 0..HEAD_DIM_V {
                let (w, g) = (want.out[r * HEAD_DIM_V + d], f64::from(rows_out[r * HEAD_DIM_V + d].into()));
                let tol = f64::from(eps) * w.abs() + 1e-6;
                ensure((w - g).abs() <= tol, || format!("request {b} row {r} col {d}: {g} want {w}"))?;
            }
        }
    }
    Ok(())
}

fn combine_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("combine_lengths");
    for (batch, rows, parts) in [(1, 16, 8), (4, 64, 66), (32, 128, 33), (64, 20, 132)] {
        let lens: Vec<u32> =
            (0..batch).map(|_| if rng.random_ratio(1, 6) { rng.random_range(0..70) } else { rng.random_range(0..20_000) }).collect();
        // bf16 keeps 8 significant bits, fp16 11: half an ulp of relative error, plus the f32 sum.
        check::<bf16>(gpu, &lens, parts, rows, 2f32.powi(-8) * 1.01, bf16::from_bits(0x7fba))?;
        check::<f16>(gpu, &lens, parts, rows, 2f32.powi(-11) * 1.01 + 1e-6, f16::from_bits(0x7e01))?;
    }
    Ok(())
}

fn combine_skips_malformed_ranges(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let (rows, num_chunks) = (8, 4);
    let o = vec![1.0f32; num_chunks * rows * HEAD_DIM_V];
    let lse = vec![0.0f32; num_chunks * rows];
    // Request 0: chunks 0..2 (fine). 1: 2..9 (past the end). 2: 9..1 (decreasing). 3: 1..-1.
    let splits = [0i32, 2, 9, 1, -1];
    let batch = splits.len() - 1;
    let (d_o, d_lse, d_splits) = (stream.clone_htod(&o).unwrap(), stream.clone_htod(&lse).unwrap(), stream.clone_htod(&splits).unwrap());
    let poison = bf16::from_bits(0x7fba);
    let mut d_out = stream.clone_htod(&vec![poison; batch * rows * HEAD_DIM_V]).unwrap();
    let mut d_lse_out = stream.alloc_zeros::<f32>(batch * rows).unwrap();
    let mut d_invalid = stream.alloc_zeros::<i32>(1).unwrap();
    let p = Partials { o: d_o.as_view(), lse: d_lse.as_view(), splits: d_splits.as_view() };
    let mut out = CombineOut { out: d_out.as_view_mut(), lse: d_lse_out.as_view_mut(), num_invalid: d_invalid.as_view_mut() };
    combine(&stream, &p, &mut out, batch, rows).map_err(|e| e.to_string())?;
    let invalid = stream.clone_dtoh(&d_invalid).unwrap()[0];
    ensure(invalid == 3, || format!("{invalid} malformed requests counted, 3 planted"))?;
    let got = stream.clone_dtoh(&d_out).unwrap();
    ensure(got[..rows * HEAD_DIM_V].iter().all(|v| v.to_f32() == 1.0), || "request 0 (two equal chunks) should average to 1".into())?;
    ensure(got[rows * HEAD_DIM_V..].iter().all(|v| v.to_bits() == poison.to_bits()), || "a malformed request was written".into())
}

fn combine_rejects_bad_input(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let rows = 4;
    let o = stream.alloc_zeros::<f32>(3 * rows * HEAD_DIM_V + 1).unwrap();
    let lse = stream.alloc_zeros::<f32>(3 * rows).unwrap();
    let splits = stream.alloc_zeros::<i32>(3).unwrap();
    let mut out = stream.alloc_zeros::<bf16>(2 * rows * HEAD_DIM_V).unwrap();
    let mut lse_out = stream.alloc_zeros::<f32>(2 * rows).unwrap();
    let mut invalid = stream.alloc_zeros::<i32>(1).unwrap();
    let mut run = |o_len: usize, lse_len: usize, rows: usize| -> Result<(), Error> {
        let p = Partials { o: o.slice(..o_len), lse: lse.slice(..lse_len), splits: splits.as_view() };
        let mut co = CombineOut { out: out.as_view_mut(), lse: lse_out.as_view_mut(), num_invalid: invalid.as_view_mut() };
        combine(&stream, &p, &mut co, 2, rows)
    };
    let arg = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected an argument error, got {other:?}"),
    };
    ensure(arg(run(3 * rows * HEAD_DIM_V + 1, 3 * rows, rows)) == "o_partial", || "ragged o_partial accepted".into())?;
    ensure(arg(run(3 * rows * HEAD_DIM_V, 3 * rows - 1, rows)) == "lse_partial", || "short lse_partial accepted".into())?;
    ensure(arg(run(3 * rows * HEAD_DIM_V, 3 * rows, 0)) == "rows", || "rows = 0 accepted".into())?;
    run(3 * rows * HEAD_DIM_V, 3 * rows, rows).map_err(|e| e.to_string().into())
}

fn device_schedule_matches_the_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("device_schedule_matches_the_reference");
    let stream = gpu.stream();
    for batch in [1, 2, 7, 64, 128, 1000] {
        for parts in [1, 33, 66, 132] {
            let lens: Vec<i32> = (0..batch)
                .map(|_| match rng.random_range(0..8) {
                    0 => [0, 1, 63, 64, 65][rng.random_range(0..5)],
                    1 => -rng.random_range(1..100),
                    2 => rng.random_range(0..200_000),
                    _ => rng.random_range(0..16_384),
                })
                .collect();
            let want = schedule(&lens.iter().map(|&l| l.max(0) as u32).collect::<Vec<_>>(), parts);
            let d_lens = stream.clone_htod(&lens).unwrap();
            let mut out = DeviceSchedule::new(&stream, batch, parts).map_err(|e| e.to_string())?;
            plan_on_device(&stream, &d_lens.as_view(), &mut out).map_err(|e| e.to_string())?;
            let (words, splits) = out.to_host(&stream).map_err(|e| e.to_string())?;
            ensure(splits == want.splits, || format!("batch {batch}, {parts} parts: splits differ"))?;
            ensure(words == want.encode(), || format!("batch {batch}, {parts} parts: parts differ"))?;
        }
    }
    // Uniform batches whose requests fit whole under the budget (share plus one overhead): the
    // device plans them unsplit too (with a second overhead of slack most would be cut).
    for (n, len, parts) in [(128usize, 2048i32, 132usize), (128, 2048, 66), (132, 32768, 132), (66, 4096, 66)] {
        let d_lens = stream.clone_htod(&vec![len; n]).unwrap();
        let mut out = DeviceSchedule::new(&stream, n, parts).map_err(|e| e.to_string())?;
        plan_on_device(&stream, &d_lens.as_view(), &mut out).map_err(|e| e.to_string())?;
        let (words, splits) = out.to_host(&stream).map_err(|e| e.to_string())?;
        ensure(splits == (0..=n as u32).collect::<Vec<_>>(), || format!("{n} x {len} on {parts} parts: a request was split: {splits:?}"))?;
        ensure(words == schedule(&vec![len as u32; n], parts).encode(), || format!("{n} x {len} on {parts} parts: parts differ"))?;
    }
    Ok(())
}

// ---- decode ---------------------------------------------------------------------------------------

/// A 16-bit element the tests can round to and read back.
trait Elem16: MlaElement + Copy + Default {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Elem16 for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl Elem16 for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// A decode problem on the host: values already rounded to the element type (NaN where no
/// request owns the cache), the shuffled block table, lengths.
struct HostDecode {
    shape: DecodeShape,
    page: usize,
    q: Vec<f32>,
    cache: Vec<f32>,
    block_table: Vec<i32>,
    max_pages: usize,
    lens: Vec<i32>,
}

fn host_decode<T: Elem16>(rng: &mut StdRng, shape: DecodeShape, page: usize, lens: Vec<i32>) -> HostDecode {
    let needed: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(page)).collect();
    let max_pages = needed.iter().copied().max().unwrap_or(0) + 1;
    let num_pages = needed.iter().sum::<usize>() + 3;
    let mut order: Vec<usize> = (0..num_pages).collect();
    order.shuffle(rng);
    let mut cache = vec![f32::NAN; num_pages * page * HEAD_DIM_K];
    let mut block_table = vec![0i32; shape.batch * max_pages];
    let mut next = 0;
    let round = |v: f32| T::from_f32(v).to_f32();
    for b in 0..shape.batch {
        for slot in 0..max_pages {
            block_table[b * max_pages + slot] = if slot < needed[b] {
                let pg = order[next];
                next += 1;
                for row in 0..page {
                    if slot * page + row < lens[b] as usize {
                        let at = (pg * page + row) * HEAD_DIM_K;
                        for v in &mut cache[at..at + HEAD_DIM_K] {
                            *v = round(rng.random_range(-1.0f32..1.0));
                        }
                    }
                }
                pg as i32
            } else {
                // Never read: past the length.
                [-1, i32::MAX, num_pages as i32, -77][rng.random_range(0..4)]
            };
        }
    }
    let q = (0..shape.batch * shape.rows() * HEAD_DIM_K).map(|_| round(rng.random_range(-1.0f32..1.0))).collect();
    HostDecode { shape, page, q, cache, block_table, max_pages, lens }
}

/// Runs one decode step on the GPU; returns (out as f32, lse, invalid count).
fn gpu_decode<T: Elem16>(gpu: &Gpu, h: &HostDecode, scale: f32, with_host_lens: bool) -> Result<(Vec<f32>, Vec<f32>, usize), String> {
    let stream = gpu.stream();
    let e = |e: Error| e.to_string();
    let to_t = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
    let (q, cache) =
        (stream.clone_htod(&to_t(&h.q)).map_err(|e| e.to_string())?, stream.clone_htod(&to_t(&h.cache)).map_err(|e| e.to_string())?);
    let bt = stream.clone_htod(&h.block_table).map_err(|e| e.to_string())?;
    let lens = stream.clone_htod(&if h.lens.is_empty() { vec![0] } else { h.lens.clone() }).map_err(|e| e.to_string())?;
    let rows = h.shape.batch * h.shape.rows();
    let mut out = stream.clone_htod(&vec![T::from_f32(f32::NAN); (rows * HEAD_DIM_V).max(1)]).map_err(|e| e.to_string())?;
    let mut lse = stream.clone_htod(&vec![f32::from_bits(0x7fba_dbad); rows.max(1)]).map_err(|e| e.to_string())?;
    let mut ws = DecodeWorkspace::new(&stream, h.shape).map_err(e)?;
    let kv = PagedKv {
        cache: cache.as_view(),
        page: h.page,
        block_table: bt.as_view(),
        max_pages: h.max_pages,
        lens: lens.slice(..h.lens.len()),
        lens_host: if with_host_lens { Some(&h.lens) } else { None },
    };
    decode(&stream, &q.as_view(), &kv, &mut out.slice_mut(..rows * HEAD_DIM_V), &mut lse.slice_mut(..rows), scale, &mut ws).map_err(e)?;
    let invalid = ws.invalid(&stream).map_err(e)?;
    let out: Vec<f32> = stream.clone_dtoh(&out).map_err(|e| e.to_string())?[..rows * HEAD_DIM_V].iter().map(|v| v.to_f32()).collect();
    let lse = stream.clone_dtoh(&lse).map_err(|e| e.to_string())?[..rows].to_vec();
    Ok((out, lse, invalid))
}

fn check_decode<T: Elem16>(gpu: &Gpu, rng: &mut StdRng, shape: DecodeShape, page: usize, lens: Vec<i32>) -> TestResult {
    let what = format!("{} {shape:?} page {page} lens {:?}", std::any::type_name::<T>(), &lens[..lens.len().min(8)]);
    let h = host_decode::<T>(rng, shape, page, lens);
    let scale = 1.0 / (HEAD_DIM_K as f32).sqrt();
    let (out, lse, invalid) = gpu_decode::<T>(gpu, &h, scale, true)?;
    ensure(invalid == 0, || format!("{what}: {invalid} invalid entries reported for valid input"))?;
    let cache = PagedCache { data: &h.cache, page, block_table: &h.block_table, max_pages: h.max_pages, lens: &h.lens };
    let want = reference_decode(&MlaProblem {
        q: &h.q,
        batch: shape.batch,
        s_q: shape.s_q,
        h_q: shape.h_q,
        cache,
        softmax_scale: f64::from(scale),
    });
    if let Some(i) = out.iter().position(|v| v.is_nan()) {
        return Err(format!("{what}: out[{i}] is NaN").into());
    }
    let diff = calc_diff(&out, &want.out);
    ensure(diff <= 1e-5, || format!("{what}: calc_diff {diff:.3e} > 1e-5"))?;
    for (r, (&g, &w)) in lse.iter().zip(&want.lse).enumerate() {
        let ok = if w == f64::NEG_INFINITY { g == f32::NEG_INFINITY } else { (f64::from(g) - w).abs() <= 1e-3 };
        ensure(ok, || format!("{what}: lse of row {r}: {g} vs {w}"))?;
        if w == f64::NEG_INFINITY {
            let row = &out[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
            ensure(row.iter().all(|&v| v == 0.0), || format!("{what}: row {r} sees no key but is not zero"))?;
        }
    }
    Ok(())
}

fn decode_matches_reference(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("decode_matches_reference");
    let shape = |batch, s_q, h_q| DecodeShape { batch, s_q, h_q };
    let edge = vec![0, 1, 63, 64, 65];
    check_decode::<bf16>(gpu, &mut rng, shape(5, 1, 16), 64, edge.clone())?;
    check_decode::<bf16>(gpu, &mut rng, shape(5, 2, 20), 16, edge.clone())?;
    check_decode::<bf16>(gpu, &mut rng, shape(5, 4, 1), 32, edge.clone())?;
    check_decode::<bf16>(gpu, &mut rng, shape(5, 3, 64), 128, edge.clone())?;
    check_decode::<bf16>(gpu, &mut rng, shape(1, 1, 128), 64, vec![3000])?;
    check_decode::<bf16>(gpu, &mut rng, shape(2, 2, 128), 64, vec![700, 1900])?;
    // Lengths that differ wildly inside one batch: one long sequence among short ones.
    let wild: Vec<i32> = (0..16).map(|i| if i == 5 { 6000 } else { rng.random_range(0..300) }).collect();
    check_decode::<bf16>(gpu, &mut rng, shape(16, 1, 64), 64, wild)?;
    let many: Vec<i32> = (0..128).map(|_| rng.random_range(0..130)).collect();
    check_decode::<bf16>(gpu, &mut rng, shape(128, 1, 16), 32, many)?;
    check_decode::<f16>(gpu, &mut rng, shape(5, 2, 16), 64, edge.clone())?;
    check_decode::<f16>(gpu, &mut rng, shape(3, 1, 128), 16, vec![1000, 0, 129])?;
    Ok(())
}

fn decode_is_deterministic(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("decode_is_deterministic");
    let h = host_decode::<bf16>(&mut rng, DecodeShape { batch: 8, s_q: 2, h_q: 64 }, 64, vec![5000, 10, 700, 0, 64, 65, 1, 2048]);
    let a = gpu_decode::<bf16>(gpu, &h, 0.05, true)?;
    let b = gpu_decode::<bf16>(gpu, &h, 0.05, true)?;
    let same = a.0.iter().map(|v| v.to_bits()).eq(b.0.iter().map(|v| v.to_bits()))
        && a.1.iter().map(|v| v.to_bits()).eq(b.1.iter().map(|v| v.to_bits()));
    ensure(same, || "two runs of the same step differ".into())
}

fn decode_masks_invalid_pages(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("decode_masks_invalid_pages");
    let mut h = host_decode::<bf16>(&mut rng, DecodeShape { batch: 3, s_q: 1, h_q: 16 }, 32, vec![100, 64, 300]);
    // A page index past the cache inside request 2's length (slot 3 of its 10 pages).
    h.block_table[2 * h.max_pages + 3] = 1 << 20;
    let scale = 0.05f32;
    let (out, lse, invalid) = gpu_decode::<bf16>(gpu, &h, scale, false)?;
    ensure(invalid > 0, || "the invalid page index was not counted".into())?;
    ensure(out.iter().all(|v| v.is_finite()) && lse.iter().all(|v| v.is_finite()), || "outputs are not finite".into())?;
    // The keys of the invalid page count as absent (not as keys of logit 0): attention over the
    // remaining keys, in f64.
    let (want, want_lse) = attention_over_addressable_keys(&h, scale);
    let diff = calc_diff(&out, &want);
    ensure(diff <= 1e-5, || format!("calc_diff {diff:.3e} against attention without the invalid page's keys"))?;
    for (r, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        ensure((f64::from(g) - w).abs() <= 1e-3, || format!("lse of row {r}: {g} vs {w} (the invalid page's keys must not count)"))?;
    }
    Ok(())
}

/// f64 attention (s_q = 1) of every row over the keys the block table addresses with a valid page
/// (slots past `max_pages` and out-of-range page indices are absent): `(out, lse)`.
fn attention_over_addressable_keys(h: &HostDecode, scale: f32) -> (Vec<f64>, Vec<f64>) {
    let num_pages = (h.cache.len() / (h.page * HEAD_DIM_K)) as i32;
    let rows = h.shape.batch * h.shape.h_q;
    let (mut want, mut want_lse) = (vec![0.0f64; rows * HEAD_DIM_V], vec![0.0f64; rows]);
    for b in 0..h.shape.batch {
        let len = h.lens[b] as usize;
        let page_of = |t: usize| if t / h.page < h.max_pages { h.block_table[b * h.max_pages + t / h.page] } else { -1 };
        let keys: Vec<usize> = (0..len).filter(|&t| (0..num_pages).contains(&page_of(t))).collect();
        for hq in 0..h.shape.h_q {
            let row = b * h.shape.h_q + hq;
            let qv = &h.q[row * HEAD_DIM_K..(row + 1) * HEAD_DIM_K];
            let key = |t: usize| {
                let at = (page_of(t) as usize * h.page + t % h.page) * HEAD_DIM_K;
                &h.cache[at..at + HEAD_DIM_K]
            };
            let logits: Vec<f64> = keys
                .iter()
                .map(|&t| f64::from(scale) * qv.iter().zip(key(t)).map(|(&a, &c)| f64::from(a) * f64::from(c)).sum::<f64>())
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (&t, l) in keys.iter().zip(&logits) {
                let p = (l - max).exp() / sum;
                for (c, &v) in key(t)[..HEAD_DIM_V].iter().enumerate() {
                    want[row * HEAD_DIM_V + c] += p * f64::from(v);
                }
            }
            want_lse[row] = max + sum.ln();
        }
    }
    (want, want_lse)
}

/// Without host lengths, a device length past what the block table addresses: the keys beyond
/// the table are absent, and the violation is counted.
fn decode_counts_lengths_past_the_table(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("decode_counts_lengths_past_the_table");
    // Request 0 fills 4 pages of 32 exactly; the table keeps only those 4 slots per request.
    let mut h = host_decode::<bf16>(&mut rng, DecodeShape { batch: 2, s_q: 1, h_q: 16 }, 32, vec![128, 64]);
    let slots = h.max_pages - 1;
    h.block_table = (0..h.shape.batch).flat_map(|b| h.block_table[b * h.max_pages..b * h.max_pages + slots].to_vec()).collect();
    h.max_pages = slots;
    // The device says 168 keys: 40 past the table.
    h.lens[0] = 168;
    let scale = 0.05f32;
    let (out, lse, invalid) = gpu_decode::<bf16>(gpu, &h, scale, false)?;
    ensure(invalid > 0, || "a length past the block table was not counted".into())?;
    let (want, want_lse) = attention_over_addressable_keys(&h, scale);
    let diff = calc_diff(&out, &want);
    ensure(diff <= 1e-5, || format!("calc_diff {diff:.3e} against attention over the table's keys"))?;
    for (r, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        ensure((f64::from(g) - w).abs() <= 1e-3, || format!("lse of row {r}: {g} vs {w}"))?;
    }
    Ok(())
}

/// The allocating form: `decode_alloc` with no scale runs FlashMLA's default `1 / sqrt(576)` and
/// with one runs that one (each bit for bit what `decode` writes with the same scale), on a
/// `PagedKv::new` that derives `max_pages`, whole `CudaSlice`s as inputs; bad input is refused by
/// name.
fn decode_alloc_defaults_and_owned_outputs(gpu: &Gpu) -> TestResult {
    let mut rng = gpu.rng("decode_alloc_defaults_and_owned_outputs");
    let stream = gpu.stream();
    let shape = DecodeShape { batch: 2, s_q: 1, h_q: 16 };
    let h = host_decode::<bf16>(&mut rng, shape, 64, vec![100, 7]);
    let s = |e: Error| e.to_string();
    let d = |e: deepkern::cudarc::driver::DriverError| e.to_string();
    let to_t = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let (q, cache) = (stream.clone_htod(&to_t(&h.q)).map_err(d)?, stream.clone_htod(&to_t(&h.cache)).map_err(d)?);
    let (bt, lens) = (stream.clone_htod(&h.block_table).map_err(d)?, stream.clone_htod(&h.lens).map_err(d)?);
    let kv = PagedKv::new(&cache, h.page, &bt, &lens).with_lens_host(&h.lens);
    ensure(kv.max_pages == h.max_pages, || format!("max_pages derived as {}, want {}", kv.max_pages, h.max_pages))?;
    let mut ws = DecodeWorkspace::new(&stream, shape).map_err(s)?;
    let rows = shape.batch * shape.rows();
    for (scale, explicit) in [(None, 1.0 / 576f32.sqrt()), (Some(0.05), 0.05)] {
        let (out, lse) = decode_alloc(&stream, &q, &kv, scale, &mut ws).map_err(s)?;
        ensure(out.len() == rows * HEAD_DIM_V && lse.len() == rows, || format!("lengths {} and {}", out.len(), lse.len()))?;
        let (want_out, want_lse, _) = gpu_decode::<bf16>(gpu, &h, explicit, true)?;
        let got_out: Vec<f32> = stream.clone_dtoh(&out).map_err(d)?.iter().map(|v| v.to_f32()).collect();
        let got_lse = stream.clone_dtoh(&lse).map_err(d)?;
        ensure(got_out.iter().map(|v| v.to_bits()).eq(want_out.iter().map(|v| v.to_bits())), || format!("{scale:?}: out differs"))?;
        ensure(got_lse.iter().map(|v| v.to_bits()).eq(want_lse.iter().map(|v| v.to_bits())), || format!("{scale:?}: lse differs"))?;
    }
    ensure(DEFAULT_SOFTMAX_SCALE == 1.0 / 576f32.sqrt(), || format!("DEFAULT_SOFTMAX_SCALE = {DEFAULT_SOFTMAX_SCALE}"))?;
    match decode_alloc(&stream, &q.slice(..HEAD_DIM_K), &kv, None, &mut ws) {
        Err(Error::Shape { arg: "q", .. }) => Ok(()),
        other => Err(format!("a short q: expected a shape error naming `q`, got {:?}", other.map(|_| ())).into()),
    }
}

fn decode_rejects_bad_input(gpu: &Gpu) -> TestResult {
    let stream = gpu.stream();
    let shape = DecodeShape { batch: 2, s_q: 1, h_q: 4 };
    let rows = shape.batch * shape.rows();
    let q = stream.alloc_zeros::<bf16>(rows * HEAD_DIM_K + 64).unwrap();
    let cache = stream.alloc_zeros::<bf16>(4 * 64 * HEAD_DIM_K).unwrap();
    let bt = stream.clone_htod(&[0i32, 1, 2, 3]).unwrap();
    let lens = stream.clone_htod(&[10i32, 200, 5]).unwrap();
    let mut out = stream.alloc_zeros::<bf16>(rows * HEAD_DIM_V).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(rows).unwrap();
    let mut ws = DecodeWorkspace::new(&stream, shape).map_err(|e| e.to_string())?;
    let host_ok = [10i32, 100];
    let mut run = |q_len: usize, page: usize, lens_len: usize, lens_host: &[i32]| -> Result<(), Error> {
        let kv = PagedKv {
            cache: cache.as_view(),
            page,
            block_table: bt.as_view(),
            max_pages: 2,
            lens: lens.slice(..lens_len),
            lens_host: Some(lens_host),
        };
        decode(&stream, &q.slice(..q_len), &kv, &mut out.as_view_mut(), &mut lse.as_view_mut(), 0.1, &mut ws)
    };
    let arg = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. } | Error::InvalidArgument { arg, .. }) => Ok(arg),
        other => Err(format!("expected an argument error, got {other:?}")),
    };
    // q with a last dimension of 512 instead of 576.
    ensure(arg(run(rows * HEAD_DIM_V, 64, 2, &host_ok))? == "q", || "q [.., 512] accepted".into())?;
    ensure(arg(run(rows * HEAD_DIM_K, 48, 2, &host_ok))? == "page", || "page 48 accepted".into())?;
    // 200 keys need 4 pages of 64; the table has 2 per request.
    ensure(arg(run(rows * HEAD_DIM_K, 64, 2, &[10, 200]))? == "block_table", || "short block table accepted".into())?;
    ensure(arg(run(rows * HEAD_DIM_K, 64, 3, &host_ok))? == "lens", || "3 lengths for a batch of 2 accepted".into())?;
    ensure(arg(DecodeWorkspace::new(&stream, DecodeShape { batch: 1, s_q: 0, h_q: 4 }).map(|_| ()))? == "shape", || {
        "s_q = 0 accepted".into()
    })?;
    run(rows * HEAD_DIM_K, 64, 2, &host_ok).map_err(|e| e.to_string().into())
}

// ---- the C launchers' own contract ---------------------------------------------------------------

/// A `[rows, 576]` 16-bit tensor map as the decode kernel expects (boxes of `box_rows` x 64,
/// 128-byte swizzle).
#[cfg(deepkern_kernels)]
fn tensor_map_576(addr: u64, rows: usize, box_rows: u32) -> Result<ffi::dk_tensor_map, String> {
    use deepkern::cudarc::driver::sys::{
        CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
        cuTensorMapEncodeTiled,
    };
    let dims = [HEAD_DIM_K as u64, rows as u64];
    let strides = [(HEAD_DIM_K * 2) as u64];
    let boxes = [64u32, box_rows];
    let element_strides = [1u32, 1];
    // SAFETY: CUtensorMap is plain bytes.
    let mut map: CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: every array argument is a live local of the rank given (2).
    unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| e.to_string())?;
    Ok(ffi::dk_tensor_map { opaque: map.opaque })
}

#[cfg(not(deepkern_kernels))]
fn decode_launcher_zeroes_its_counter_for_an_empty_batch(_: &Gpu) -> TestResult {
    Err("kernels not built".into())
}

#[cfg(deepkern_kernels)]
fn decode_launcher_zeroes_its_counter_for_an_empty_batch(gpu: &Gpu) -> TestResult {
    use deepkern::cudarc::driver::DevicePtrMut;
    let stream = gpu.stream();
    // A count left from an earlier step.
    let mut invalid = stream.clone_htod(&[7i32]).unwrap();
    let status = {
        let (ptr, _guard) = invalid.device_ptr_mut(&stream);
        let params = ffi::dk_mla_decode_params {
            num_invalid: ptr as *mut i32,
            batch: 0,
            s_q: 1,
            h_q: 16,
            page: 64,
            num_parts: 1,
            dtype: ffi::dk_dtype::DK_DTYPE_BF16,
            ..Default::default()
        };
        // SAFETY: batch 0: the launcher reads no pointer but num_invalid, a live [1] buffer.
        unsafe { ffi::dk_mla_decode(&params, stream.cu_stream() as ffi::dk_stream_t) }
    };
    ensure(status == ffi::dk_status::DK_STATUS_OK, || format!("status {status:?}"))?;
    let got = stream.clone_dtoh(&invalid).unwrap()[0];
    ensure(got == 0, || format!("num_invalid is {got} after an empty batch (the previous count was 7)"))
}

#[cfg(not(deepkern_kernels))]
fn decode_launcher_skips_chunks_outside_their_request(_: &Gpu) -> TestResult {
    Err("kernels not built".into())
}

#[cfg(deepkern_kernels)]
fn decode_launcher_skips_chunks_outside_their_request(gpu: &Gpu) -> TestResult {
    use deepkern::cudarc::driver::{DevicePtr, DevicePtrMut};
    let mut rng = gpu.rng("decode_launcher_skips_chunks_outside_their_request");
    let stream = gpu.stream();
    let shape = DecodeShape { batch: 2, s_q: 1, h_q: 16 };
    let (rows, page) = (shape.rows(), 64);
    let h = host_decode::<bf16>(&mut rng, shape, page, vec![128, 128]);
    let scale = 0.05f32;
    // Two chunks per request, one tile each; part 4 repeats request 0's first tile as its split 2,
    // which does not exist: chunk 0 + 2 is request 1's first slot.
    let splits = [0i32, 2, 4];
    #[rustfmt::skip]
    let parts = [
        0, 0, 0, 1, 0,
        0, 1, 0, 2, 1,
        1, 0, 1, 1, 0,
        1, 1, 1, 2, 1,
        0, 0, 0, 1, 2,
    ];
    let (num_parts, num_chunks) = (5usize, 5usize);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let q = stream.clone_htod(&to_bf16(&h.q)).unwrap();
    let cache = stream.clone_htod(&to_bf16(&h.cache)).unwrap();
    let num_pages = h.cache.len() / (page * HEAD_DIM_K);
    let bt = stream.clone_htod(&h.block_table).unwrap();
    let lens = stream.clone_htod(&h.lens).unwrap();
    let (d_parts, d_splits) = (stream.clone_htod(&parts).unwrap(), stream.clone_htod(&splits).unwrap());
    let mut out = stream.clone_htod(&vec![bf16::from_bits(0x7fba); shape.batch * rows * HEAD_DIM_V]).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(shape.batch * rows).unwrap();
    let mut o_partial = stream.alloc_zeros::<f32>(num_chunks * rows * HEAD_DIM_V).unwrap();
    let mut lse_partial = stream.alloc_zeros::<f32>(num_chunks * rows).unwrap();
    let mut invalid = stream.alloc_zeros::<i32>(1).unwrap();
    let status = {
        let (q_ptr, _g0) = q.device_ptr(&stream);
        let (kv_ptr, _g1) = cache.device_ptr(&stream);
        let (bt_ptr, _g2) = bt.device_ptr(&stream);
        let (lens_ptr, _g3) = lens.device_ptr(&stream);
        let (parts_ptr, _g4) = d_parts.device_ptr(&stream);
        let (splits_ptr, _g5) = d_splits.device_ptr(&stream);
        let (out_ptr, _g6) = out.device_ptr_mut(&stream);
        let (lse_ptr, _g7) = lse.device_ptr_mut(&stream);
        let (op_ptr, _g8) = o_partial.device_ptr_mut(&stream);
        let (lp_ptr, _g9) = lse_partial.device_ptr_mut(&stream);
        let (inv_ptr, _g10) = invalid.device_ptr_mut(&stream);
        let params = ffi::dk_mla_decode_params {
            tma_q: tensor_map_576(q_ptr, shape.batch * rows, 64)?,
            tma_kv: tensor_map_576(kv_ptr, num_pages * page, 64)?,
            block_table: bt_ptr as *const i32,
            lens: lens_ptr as *const i32,
            parts: parts_ptr as *const i32,
            splits: splits_ptr as *const i32,
            out: out_ptr as *mut std::ffi::c_void,
            lse: lse_ptr as *mut f32,
            o_partial: op_ptr as *mut f32,
            lse_partial: lp_ptr as *mut f32,
            num_invalid: inv_ptr as *mut i32,
            batch: shape.batch as i32,
            s_q: shape.s_q as i32,
            h_q: shape.h_q as i32,
            page: page as i32,
            max_pages: h.max_pages as i32,
            num_pages: num_pages as i32,
            num_parts: num_parts as i32,
            num_chunks: num_chunks as i32,
            softmax_scale: scale,
            dtype: ffi::dk_dtype::DK_DTYPE_BF16,
        };
        // SAFETY: the tensor maps cover q and the cache; every pointer is a live buffer of the
        // contract's shape for these sizes (the guards above live until the call returns).
        unsafe { ffi::dk_mla_decode(&params, stream.cu_stream() as ffi::dk_stream_t) }
    };
    ensure(status == ffi::dk_status::DK_STATUS_OK, || format!("status {status:?}"))?;
    let counted = stream.clone_dtoh(&invalid).unwrap()[0];
    ensure(counted == 1, || format!("{counted} malformed chunks counted, 1 planted (split 2 of a request with 2 chunks)"))?;
    // The combine of the partials: both requests as the reference (request 1's first slot intact).
    let mut combine_invalid = stream.alloc_zeros::<i32>(1).unwrap();
    let p = Partials { o: o_partial.as_view(), lse: lse_partial.as_view(), splits: d_splits.as_view() };
    let mut dst = CombineOut { out: out.as_view_mut(), lse: lse.as_view_mut(), num_invalid: combine_invalid.as_view_mut() };
    combine(&stream, &p, &mut dst, shape.batch, rows).map_err(|e| e.to_string())?;
    let got: Vec<f32> = stream.clone_dtoh(&out).unwrap().iter().map(|v| v.to_f32()).collect();
    let cache_ref = PagedCache { data: &h.cache, page, block_table: &h.block_table, max_pages: h.max_pages, lens: &h.lens };
    let want = reference_decode(&MlaProblem {
        q: &h.q,
        batch: shape.batch,
        s_q: 1,
        h_q: shape.h_q,
        cache: cache_ref,
        softmax_scale: f64::from(scale),
    });
    let diff = calc_diff(&got, &want.out);
    ensure(diff <= 1e-5, || format!("calc_diff {diff:.3e} against the reference: a chunk was overwritten"))
}

/// A host thread flips request 0's page indices between their pages and -1 while one decode step
/// runs (lengths only on the device, as in a CUDA graph).
fn decode_survives_a_block_table_rewritten_during_the_step(gpu: &Gpu) -> TestResult {
    use deepkern::cudarc::driver::DevicePtr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    let mut rng = gpu.rng("decode_survives_a_block_table_rewritten_during_the_step");
    let stream = gpu.stream();
    let shape = DecodeShape { batch: 2, s_q: 1, h_q: 16 };
    let page = 64;
    let h = host_decode::<bf16>(&mut rng, shape, page, vec![64 * 48, 64 * 16]);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let q = stream.clone_htod(&to_bf16(&h.q)).unwrap();
    let cache = stream.clone_htod(&to_bf16(&h.cache)).unwrap();
    let bt = stream.clone_htod(&h.block_table).unwrap();
    let lens = stream.clone_htod(&h.lens).unwrap();
    let rows = shape.batch * shape.rows();
    let mut out = stream.alloc_zeros::<bf16>(rows * HEAD_DIM_V).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(rows).unwrap();
    let mut ws = DecodeWorkspace::new(&stream, shape).map_err(|e| e.to_string())?;
    stream.synchronize().map_err(|e| e.to_string())?;
    // Simulated device memory is host memory: the table's device address is its host address.
    let table = bt.device_ptr(&stream).0 as usize;
    let slots: Vec<i32> = h.block_table[..48].to_vec();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // SAFETY: `bt` outlives this thread (joined below); i32 and AtomicI32 share a layout.
            let cells = unsafe { std::slice::from_raw_parts(table as *const AtomicI32, slots.len()) };
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (cell, &pg) in cells.iter().zip(&slots) {
                    cell.store(if flips.is_multiple_of(2) { -1 } else { pg }, Ordering::Relaxed);
                }
                flips += 1;
                std::thread::yield_now();
            }
            flips
        })
    };
    let kv =
        PagedKv { cache: cache.as_view(), page, block_table: bt.as_view(), max_pages: h.max_pages, lens: lens.as_view(), lens_host: None };
    let step = decode(&stream, &q.as_view(), &kv, &mut out.as_view_mut(), &mut lse.as_view_mut(), 0.05, &mut ws);
    let synced = stream.synchronize();
    stop.store(true, Ordering::Relaxed);
    let flips = writer.join().map_err(|_| "the writer thread panicked".to_string())?;
    step.map_err(|e| e.to_string())?;
    synced.map_err(|e| e.to_string())?;
    ensure(flips > 1, || "the block table was never rewritten".into())?;
    let got = stream.clone_dtoh(&out).unwrap();
    ensure(got.iter().all(|v| v.to_f32().is_finite()), || "a non-finite output".into())?;
    let l = stream.clone_dtoh(&lse).unwrap();
    ensure(l[shape.rows()..].iter().all(|v| v.is_finite()), || "request 1 (untouched table) lost its keys".into())
}
