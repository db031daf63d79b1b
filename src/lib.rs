//! deepkern: hand-tuned CUDA kernels for Hopper (sm_90a): the FP8 GEMMs, MLA decode attention and
//! expert-parallel all-to-all of a DeepSeek-V3-class model, callable from Rust.
//!
//! # Layers
//!
//! | module | what | CUDA? |
//! |---|---|---|
//! | [`quant`], [`gemm`], [`mla`], [`ep`], [`moe`] | safe entry points: validate, then one launch through the C ABI | yes |
//! | [`overlap`] | communication beside computation: two streams, an SM budget, the two-micro-batch schedule and its hand-offs | yes |
//! | [`device`] | open a GPU, query what the planners need, check the build can run on it | yes |
//! | [`layout`], [`fp8`], [`reference`](mod@reference), [`check`] | layouts, FP8 numerics, f64/f32 CPU references, comparators | no |
//! | [`plan`] | host-side tile, pipeline and grid choices | no |
//! | `ffi` (private) | bindgen output of `csrc/include/deepkern.h` | — |
//!
//! Every kernel is checked against the CPU references in this crate. Buffers and streams are
//! cudarc's own types, re-exported as [`cudarc`]; element types are [`bf16`] and [`F8E4M3`].
//!
//! Without nvcc at build time the crate still builds: [`kernels_built`] is false and GPU entry
//! points return [`Error::KernelsNotBuilt`]. The `require-kernels` feature (or
//! `DEEPKERN_REQUIRE_KERNELS=1`) makes such a build fail instead.
//!
//! Built with `DEEPKERN_SIM=1`, the same kernel sources run on the deepkern simulator, on the CPU,
//! through this same API ([`simulated`]; docs/simulator.md): how the tests run without a GPU.

#![warn(missing_docs)]

pub mod check;
pub mod fp8;
pub mod layout;
pub mod plan;
pub mod reference;

#[cfg(feature = "candle")]
pub mod candle;
pub mod device;
pub mod ep;
pub mod error;
mod ffi;
pub mod gemm;
mod launch;
pub mod mla;
pub mod moe;
pub mod overlap;
pub mod quant;

pub use cudarc;
pub use device::{Device, DeviceInfo, HOPPER, cuda_available, device_count, driver_version, kernels_built, simulated, simulator_seed};
pub use error::{Error, KernelStatus, Result};
pub use float8::F8E4M3;
pub use half::bf16;
pub use layout::{BlockShape, TokenGroupShape};
pub use quant::{Fp8Shape, Fp8Tensor, quantize, quantize_per_block, quantize_per_token_group, silu_mul_quantize};
pub use reference::quant::ScaleFormat;

/// The README's code examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
