//! The runtime on a real GPU. What each test proves:
//! - `device_info_is_hopper`: the facts the planners read are those of a Hopper part.
//! - `guards_order_work_across_streams`: a kernel launched through the crate on one stream and a
//!   read on another are ordered by cudarc's event tracking, i.e. the launcher kept the buffer
//!   guards alive until the launch was enqueued (drop them early and the read may see stale data).
//! - `driver_version_is_reported`: the driver is new enough for CUDA 13.0 code.

mod common;

use common::{Gpu, TestResult, ensure};
use deepkern::layout::TokenGroupShape;
use deepkern::reference::quant::per_token_group;
use deepkern::{F8E4M3, ScaleFormat, bf16, quantize_per_token_group};

fn main() {
    common::run(vec![
        ("device_info_is_hopper", device_info_is_hopper),
        ("guards_order_work_across_streams", guards_order_work_across_streams),
        ("driver_version_is_reported", driver_version_is_reported),
    ]);
}

fn device_info_is_hopper(gpu: &Gpu) -> TestResult {
    let i = gpu.device.info();
    ensure(i.compute_capability == (9, 0), || format!("compute capability {:?}", i.compute_capability))?;
    ensure((66..=160).contains(&i.sm_count), || format!("{} SMs", i.sm_count))?;
    ensure(i.max_shared_memory_per_block_optin >= 227 * 1024, || format!("opt-in smem {}", i.max_shared_memory_per_block_optin))?;
    ensure(i.l2_cache_bytes >= 32 << 20, || format!("L2 {} bytes", i.l2_cache_bytes))?;
    ensure(!i.name.is_empty() && !i.slug().is_empty(), || "empty device name".into())
}

fn guards_order_work_across_streams(gpu: &Gpu) -> TestResult {
    let (producer, consumer) = (gpu.stream(), gpu.stream());
    // Large enough on a GPU that an unordered read would see a kernel still running; the simulator
    // orders streams by their events alone, so a small problem shows the same.
    let shape = gpu.pick(TokenGroupShape::new(8192, 7168), TokenGroupShape::new(512, 1024));
    let x: Vec<bf16> = (0..shape.m * shape.k).map(|i| bf16::from_f32(((i * 31) % 977) as f32 - 488.0)).collect();
    let d_x = producer.clone_htod(&x).map_err(|e| e.to_string())?;
    let mut d_q = producer.alloc_zeros::<F8E4M3>(shape.m * shape.k).map_err(|e| e.to_string())?;
    let mut d_sf = producer.alloc_zeros::<f32>(shape.scale_elements().unwrap()).map_err(|e| e.to_string())?;
    for round in 0..3 {
        quantize_per_token_group(&producer, &d_x, &mut d_q, &mut d_sf, shape, ScaleFormat::F32).map_err(|e| e.to_string())?;
        // Read on the other stream with no explicit synchronisation.
        let q: Vec<u8> = consumer.clone_dtoh(&d_q).map_err(|e| e.to_string())?.iter().map(F8E4M3::to_bits).collect();
        let want = per_token_group(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), shape.m, shape.k, ScaleFormat::F32);
        ensure(q == want.q, || format!("round {round}: the consumer stream saw stale or partial output"))?;
        consumer.memset_zeros(&mut d_q).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn driver_version_is_reported(_gpu: &Gpu) -> TestResult {
    let (major, minor) = deepkern::driver_version().map_err(|e| e.to_string())?;
    ensure(major >= 13, || format!("driver supports CUDA {major}.{minor}; these kernels are built with CUDA 13.0"))
}
