//! One MLA decode step on candle tensors (feature `candle`): queries, a paged latent cache, its
//! block table and the sequence lengths live in `candle_core::Tensor`s on a CUDA device;
//! `deepkern::candle::mla_decode` runs the decode on that device's stream and returns the output
//! and log-sum-exp as tensors. Checked against the CPU reference.
//!
//! ```text
//! cargo run --release --features candle --example candle_mla_decode
//! ```
//!
//! Without a CUDA device (or a build without nvcc) it says why and runs the CPU reference alone.

use candle_core::{Device, Tensor};
use deepkern::bf16;
use deepkern::candle::{MlaDecoder, PagedCache};
use deepkern::check::calc_diff;
use deepkern::mla::{HEAD_DIM_K, HEAD_DIM_V};
use deepkern::reference::mla::{self as reference, MlaProblem};

const BATCH: usize = 3;
const H_Q: usize = 16;
const PAGE: usize = 64;
const MAX_PAGES: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lens: Vec<i32> = vec![200, 17, 256];
    let num_pages = BATCH * MAX_PAGES;
    // Request b's pages, in reverse order, so the block table matters.
    let block_table: Vec<i32> = (0..BATCH * MAX_PAGES).map(|i| (num_pages - 1 - i) as i32).collect();
    let value = |i: usize, salt: usize| bf16::from_f32((((i * 2654435761 + salt) >> 7) % 97) as f32 / 48.0 - 1.0);
    let q: Vec<bf16> = (0..BATCH * H_Q * HEAD_DIM_K).map(|i| value(i, 1)).collect();
    let cache: Vec<bf16> = (0..num_pages * PAGE * HEAD_DIM_K).map(|i| value(i, 7)).collect();
    let scale = 1.0 / (HEAD_DIM_K as f32).sqrt();

    let to_f32 = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let (q32, cache32) = (to_f32(&q), to_f32(&cache));
    let want = reference::decode(&MlaProblem {
        q: &q32,
        batch: BATCH,
        s_q: 1,
        h_q: H_Q,
        cache: reference::PagedCache { data: &cache32, page: PAGE, block_table: &block_table, max_pages: MAX_PAGES, lens: &lens },
        softmax_scale: f64::from(scale),
    });
    println!("CPU reference: {BATCH} requests of {H_Q} heads, lengths {lens:?}, pages of {PAGE} keys");

    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            // candle appends a backtrace to some errors: its first line says what happened.
            println!("GPU part skipped: no CUDA device for candle ({})", e.to_string().lines().next().unwrap_or_default());
            return Ok(());
        }
    };
    let q = Tensor::from_slice(&q, (BATCH, 1, H_Q, HEAD_DIM_K), &device)?;
    let kv_cache = Tensor::from_slice(&cache, (num_pages, PAGE, HEAD_DIM_K), &device)?;
    let block_table = Tensor::from_slice(&block_table, (BATCH, MAX_PAGES), &device)?;
    let lens_t = Tensor::from_slice(&lens, BATCH, &device)?;
    let kv = PagedCache { cache: &kv_cache, block_table: &block_table, lens: &lens_t, lens_host: Some(&lens) };

    // Keeps the decode's workspace between steps (one step here).
    let mut decoder = MlaDecoder::new();
    let (out, lse) = match decoder.decode(&q, &kv, scale) {
        Ok(r) => r,
        Err(e @ (deepkern::Error::KernelsNotBuilt | deepkern::Error::UnsupportedArch { .. } | deepkern::Error::NoDevice)) => {
            println!("GPU part skipped: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!("out {:?} {:?}, lse {:?} {:?}", out.dims(), out.dtype(), lse.dims(), lse.dtype());
    assert_eq!(out.dims(), &[BATCH, 1, H_Q, HEAD_DIM_V]);
    let invalid = decoder.invalid()?;
    if invalid != 0 {
        return Err(format!("the decode skipped {invalid} invalid entries of valid input").into());
    }

    // Device-to-host copies only (no candle kernel): bf16 to the host, widened there.
    let out: Vec<f32> = to_f32(&out.flatten_all()?.to_vec1::<bf16>()?);
    let lse: Vec<f32> = lse.flatten_all()?.to_vec1()?;
    let diff = calc_diff(&out, &want.out);
    let lse_err = lse.iter().zip(&want.lse).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max);
    println!("calc_diff(out, reference) = {diff:.2e}; largest lse error {lse_err:.2e}");
    if diff > 1e-5 || lse_err > 1e-3 {
        return Err(format!("the decode differs from the CPU reference: calc_diff {diff:.2e}, lse error {lse_err:.2e}").into());
    }
    println!("matches the CPU reference");
    Ok(())
}
