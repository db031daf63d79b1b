//! deepkern beside candle-core (`cuda`): both use one cudarc, so a candle `CudaStorage` holds the
//! buffers and stream deepkern's entry points take. Type-checked only (`.ci/run`).

use candle_core::CudaStorage;
use candle_core::cuda_backend::CudaStorageSlice;
use deepkern::ScaleFormat;
use deepkern::layout::TokenGroupShape;

/// Quantises candle's bf16 `x` [m, k] into candle's e4m3 `q` and f32 scales `sf` with deepkern.
pub fn quantize_per_token_group(x: &CudaStorage, q: &mut CudaStorage, sf: &mut CudaStorage, m: usize, k: usize) -> deepkern::Result<()> {
    let stream = x.device.cuda_stream();
    let (CudaStorageSlice::BF16(x), CudaStorageSlice::F8E4M3(q), CudaStorageSlice::F32(sf)) = (&x.slice, &mut q.slice, &mut sf.slice)
    else {
        panic!("expected bf16 input, e4m3 output and f32 scales");
    };
    deepkern::quantize_per_token_group(&stream, x, q, sf, TokenGroupShape::new(m, k), ScaleFormat::F32)
}
