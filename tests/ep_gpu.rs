//! Expert-parallel kernels on the GPU against the R-rank CPU reference. What each test proves:
//! - `layout_matches_reference`: counts and the token-in-rank map equal the reference exactly for
//!   uniform routing, a hot expert, -1 slots, R in {1, 2, 4, 8}, up to 512 experts and top-16.
//! - `layout_counts_and_ignores_invalid_indices`: out-of-range indices are counted, never used.
//! - `layout_of_no_tokens`, `layout_wraps_the_grid`: empty input; more tokens than one grid pass.
//! - `layout_rejects_bad_input`: shape and configuration errors before any launch.

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::Error;
use deepkern::ep::{DeviceLayout, layout};
use deepkern::reference::ep::{EpConfig, Routing, layout as reference_layout};
use rand::Rng;
use rand::rngs::StdRng;

fn main() {
    common::run(vec![
        ("layout_matches_reference", layout_matches_reference),
        ("layout_counts_and_ignores_invalid_indices", layout_counts_and_ignores_invalid_indices),
        ("layout_of_no_tokens", layout_of_no_tokens),
        ("layout_wraps_the_grid", layout_wraps_the_grid),
        ("layout_rejects_bad_input", layout_rejects_bad_input),
    ]);
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
