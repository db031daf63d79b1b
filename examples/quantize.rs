//! Quantise bf16 activations to FP8 (E4M3, 1x128 scales) on the GPU and check the result against
//! the CPU reference.
//!
//! ```text
//! cargo run --release --example quantize
//! ```
//!
//! On a machine without a Hopper GPU (or a build without nvcc) it says why and runs the CPU
//! reference alone.

use deepkern::layout::{TokenGroupShape, scales_from_tma_layout};
use deepkern::reference::quant::per_token_group;
use deepkern::{Device, F8E4M3, ScaleFormat, bf16, quantize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 64 tokens of a 7168-wide hidden state, as a decode step of DeepSeek-V3 would produce.
    let shape = TokenGroupShape::new(64, 7168);
    let x: Vec<bf16> = (0..shape.m * shape.k).map(|i| bf16::from_f32(((i % 251) as f32 - 125.0) * 0.01)).collect();
    let x_f32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let cpu = per_token_group(&x_f32, shape.m, shape.k, ScaleFormat::F32);
    println!("CPU reference: {} e4m3 values, {} scales; scale of row 0, block 0 = {:e}", cpu.q.len(), cpu.scales.len(), cpu.scales[0]);

    let device = match Device::new(0).and_then(|d| d.check_supported().map(|()| d)) {
        Ok(d) => d,
        Err(e) => {
            println!("{} part skipped: {e}", gpu());
            return Ok(());
        }
    };
    println!("{}: {} ({} SMs)", gpu(), device.info().name, device.info().sm_count);
    let stream = device.default_stream();
    let d_x = stream.clone_htod(&x)?;
    // An owned FP8 tensor; its scales come out transposed and padded for TMA: [k / 128, round_up(m, 4)].
    let t = quantize(&stream, &d_x, shape, ScaleFormat::F32)?;

    let q: Vec<u8> = stream.clone_dtoh(&t.q())?.iter().map(F8E4M3::to_bits).collect();
    let sf = scales_from_tma_layout(&stream.clone_dtoh(&t.sf())?, shape.m, shape.k_blocks());
    let same = q == cpu.q && sf == cpu.scales;
    println!("{} result {} the CPU reference bit for bit", gpu(), if same { "matches" } else { "DIFFERS from" });
    if same { Ok(()) } else { Err("GPU and CPU quantisers disagree".into()) }
}

/// "GPU", or "simulated GPU" in a simulated build (docs/simulator.md): no simulated result passes
/// for a GPU one.
fn gpu() -> &'static str {
    if deepkern::simulated() { "simulated GPU" } else { "GPU" }
}
