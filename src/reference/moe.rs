//! An expert-parallel MoE layer forward on the CPU: the reference for [`crate::moe`].
//!
//! The same numerics as the GPU pipeline, step by step: each token's bf16 activations are
//! quantised per 1x128 group (FP8, f32 scales); every expert computes `h = a · W13ᵀ` on the
//! dequantised operands (f64), rounded to bf16; `SiLU(gate) · up` in f32, quantised per 1x128
//! group; `y = act · W2ᵀ` (f64), rounded to bf16; each token's output is `Σ_slots weight · y`.
//! Routing is the [`crate::reference::ep`] convention (expert `e` on rank `e / E_local`); where a
//! token's rows go does not change the result, so the reference works per token.

use half::bf16;

use crate::reference::ep::Routing;
use crate::reference::quant::{QuantizedBlocks, ScaleFormat, per_token_group, silu_mul_per_token_group};

/// One expert's weights, quantised 128x128: `w13` `[2·inter, hidden]` (gate rows then up rows),
/// `w2` `[hidden, inter]`.
pub struct ExpertRef<'a> {
    /// Gate and up projections, `[2·inter, hidden]`.
    pub w13: &'a QuantizedBlocks,
    /// Down projection, `[hidden, inter]`.
    pub w2: &'a QuantizedBlocks,
}

/// `y = a · wᵀ` in f64 for one row `a` (`[k]`) against dequantised `w` (`[n, k]`), rounded to bf16.
fn row_times(a: &[f64], w: &[f64], n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|j| bf16::from_f64(a.iter().zip(&w[j * k..(j + 1) * k]).map(|(x, y)| x * y).sum::<f64>()).to_f32()).collect()
}

/// The layer's output for one rank's tokens: `x` `[tokens, hidden]` (bf16 values as f32), the
/// rank's `routing` (-1 = no expert), `experts` all of the layer's experts. Returns
/// `[tokens, hidden]` in f64 (before the final bf16 rounding).
pub fn forward(x: &[f32], hidden: usize, inter: usize, routing: &Routing, experts: &[ExpertRef], fmt: ScaleFormat) -> Vec<f64> {
    let (tokens, k) = (routing.tokens, routing.k);
    assert_eq!(x.len(), tokens * hidden, "x: [tokens, {hidden}]");
    assert_eq!(routing.topk_idx.len(), tokens * k, "topk_idx: [tokens, {k}]");
    let xq = per_token_group(x, tokens, hidden, fmt).dequant_f64();
    let dequant: Vec<(Vec<f64>, Vec<f64>)> = experts.iter().map(|e| (e.w13.dequant_f64(), e.w2.dequant_f64())).collect();
    let mut out = vec![0.0f64; tokens * hidden];
    for t in 0..tokens {
        let a = &xq[t * hidden..(t + 1) * hidden];
        for j in 0..k {
            let e = routing.topk_idx[t * k + j];
            if e < 0 || e as usize >= experts.len() {
                continue;
            }
            let (w13, w2) = &dequant[e as usize];
            let h = row_times(a, w13, 2 * inter, hidden);
            let act = silu_mul_per_token_group(&h, 1, inter, fmt).dequant_f64();
            let y = row_times(&act, w2, hidden, inter);
            for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                *o += f64::from(routing.topk_weights[t * k + j]) * f64::from(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::quant::per_block;

    #[test]
    fn unrouted_tokens_are_zero_and_weights_scale_linearly() {
        let (hidden, inter) = (128, 128);
        let w13 = per_block(
            &(0..2 * inter * hidden).map(|i| ((i % 13) as f32 - 6.0) / 64.0).collect::<Vec<_>>(),
            2 * inter,
            hidden,
            ScaleFormat::F32,
        );
        let w2 =
            per_block(&(0..hidden * inter).map(|i| ((i % 7) as f32 - 3.0) / 32.0).collect::<Vec<_>>(), hidden, inter, ScaleFormat::F32);
        let experts = [ExpertRef { w13: &w13, w2: &w2 }];
        let x: Vec<f32> = (0..2 * hidden).map(|i| ((i % 5) as f32 - 2.0) / 2.0).collect();
        let idx = [0, -1, -1, -1];
        let run = |w: [f32; 4]| {
            forward(&x, hidden, inter, &Routing { topk_idx: &idx, topk_weights: &w, tokens: 2, k: 2 }, &experts, ScaleFormat::F32)
        };
        let one = run([1.0, 9.0, 9.0, 9.0]);
        let two = run([2.0, 9.0, 9.0, 9.0]);
        assert!(one[hidden..].iter().all(|&v| v == 0.0), "token 1 names no expert");
        assert!(one[..hidden].iter().any(|&v| v != 0.0));
        assert!(one.iter().zip(&two).all(|(a, b)| *b == 2.0 * a));
    }
}
