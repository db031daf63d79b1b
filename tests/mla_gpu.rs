//! MLA kernels on the GPU against the f64 CPU reference. What each test proves:
//! - `combine_matches_reference`: for schedules of random sequence lengths, merging random partials
//!   (some chunks saw no key: lse -inf) gives the reference merge within bf16 / fp16 rounding, and
//!   requests with a single chunk are left untouched (poison survives).
//! - `combine_skips_malformed_ranges`: chunk ranges out of bounds are counted, never read or written.
//! - `combine_rejects_bad_input`: length errors before any launch.
//! - `device_schedule_matches_the_reference`: the GPU scheduler writes the Rust schedule's encoding
//!   bit for bit (lengths 0, 1, 63, 64, 65 and long ones; negative lengths count as 0).

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::mla::{CombineOut, DeviceSchedule, HEAD_DIM_V, MlaElement, Partials, combine, plan_on_device};
use deepkern::plan::mla::schedule;
use deepkern::reference::mla::{MlaOut, merge};
use deepkern::{Error, bf16};
use half::f16;
use rand::Rng;
use rand::rngs::StdRng;

fn main() {
    common::run(vec![
        ("combine_matches_reference", combine_matches_reference),
        ("combine_skips_malformed_ranges", combine_skips_malformed_ranges),
        ("combine_rejects_bad_input", combine_rejects_bad_input),
        ("device_schedule_matches_the_reference", device_schedule_matches_the_reference),
    ]);
}

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
    Ok(())
}
