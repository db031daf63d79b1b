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
//!
//! # Quick start
//!
//! ## Requirements
//!
//! - **GPU**: a Hopper GPU of compute capability 9.0 (H100, H200, H800, H20). The kernels are
//!   compiled for `sm_90a`, whose architecture-specific instructions run on 9.0 only;
//!   [`Device::check_supported`] says whether a device can run them.
//! - **Build time: nvcc.** Inside this repository, `cargo xtask setup` installs CUDA 13.0's nvcc
//!   from PyPI into `.toolchain/` (the `cargo xtask test` and `bench` commands run it for you). A
//!   crate depending on deepkern needs nvcc reachable through `NVCC`, `CUDA_HOME`, `CUDA_PATH` or
//!   `PATH`; without it the build still succeeds, with no kernels (above).
//! - **Run time: the NVIDIA driver.** The kernels link the static CUDA runtime, and cudarc loads
//!   the driver library when it is first used; no CUDA toolkit is needed. The driver must support
//!   the CUDA version of cudarc's bindings (a 580 driver runs 13.0; README, *Using it from another
//!   crate*).
//! - **NCCL**, for multi-process expert-parallel groups only (`ep::Group::new_node`,
//!   `ep::Group::new_nccl`; the default `nccl` feature): cudarc's NCCL bindings and the NCCL
//!   library at run time. Groups of virtual ranks in one process need neither, and
//!   `default-features = false` leaves NCCL out of the build.
//!
//! ## A first FP8 GEMM
//!
//! Quantise the bf16 activations per 1x128 token group and the weights per 128x128 block, then
//! run the block-scaled GEMM `d = a · wᵀ` (bf16 `[m, n]`):
//!
//! ```no_run
//! use deepkern::gemm::{self, GemmShape};
//! use deepkern::{BlockShape, Device, ScaleFormat, TokenGroupShape, bf16, quantize};
//!
//! fn first_gemm(a_host: &[bf16], w_host: &[bf16], m: usize, n: usize, k: usize) -> deepkern::Result<Vec<bf16>> {
//!     let device = Device::new(0)?; // Error::NoDevice without a GPU
//!     device.check_supported()?; // Error::KernelsNotBuilt, Error::UnsupportedArch
//!     let stream = device.default_stream();
//!     let a = stream.clone_htod(a_host)?; // bf16 [m, k], k a multiple of 128
//!     let w = stream.clone_htod(w_host)?; // bf16 [n, k]
//!     let a8 = quantize(&stream, &a, TokenGroupShape::new(m, k), ScaleFormat::F32)?;
//!     let w8 = quantize(&stream, &w, BlockShape::new(n, k), ScaleFormat::F32)?;
//!     let d = gemm::gemm_fp8_alloc(&stream, &a8.activations(), &w8.weights(), GemmShape { m, n, k })?;
//!     Ok(stream.clone_dtoh(&d)?) // waits for the stream
//! }
//! ```
//!
//! Every call is asynchronous on `stream` and checks its arguments first, returning an
//! [`Error`] that names the bad one before anything is launched. `examples/quantize.rs` is a
//! complete program; [`reference::gemm`] computes the same product on the CPU.
//!
//! # Environment variables
//!
//! Read when the crate is built (its build script):
//!
//! | variable | effect |
//! |---|---|
//! | `NVCC` | the nvcc executable to compile the kernels with (searched first) |
//! | `CUDA_HOME`, `CUDA_PATH` | a CUDA installation whose `bin/nvcc` is used (after `NVCC`, before `PATH`) |
//! | `NVCC_CCBIN` | the host compiler nvcc uses (`-ccbin`) |
//! | `DEEPKERN_CUDA_ARCHS` | comma-separated architectures to compile for, default `90a` |
//! | `DEEPKERN_SKIP_KERNELS` | set and not `0`: build without the kernels even if nvcc is found |
//! | `DEEPKERN_REQUIRE_KERNELS=1` | a build that finds no nvcc fails (as the `require-kernels` feature does) |
//! | `DEEPKERN_SIM=1` | build for the simulator: kernels compiled for the host, the driver a stand-in ([`simulated`]) |
//! | `DEEPKERN_SIM_RACES=1`, `DEEPKERN_SIM_REUSE_PTXAS=1` | simulator builds: race mode; reuse the last ptxas resource reports |
//! | `CXX`, `AR` | simulator builds: the host C++ compiler and archiver |
//! | `CUDARC_CUDA_VERSION` | read by cudarc's build: the CUDA version of its bindings, e.g. `13000` |
//!
//! Read when the tests run (`tests/common`):
//!
//! | variable | effect |
//! |---|---|
//! | `DEEPKERN_REQUIRE_GPU=1` | GPU tests fail instead of being reported as ignored when there is no usable GPU (no device, kernels not built) |
//! | `DEEPKERN_SEED=<n>` | the seed of the tests' random inputs (each run prints the one it used) |
//!
//! Read by a simulated build at run time: `DEEPKERN_SIM_SEED` (the scheduling seed, see
//! [`simulator_seed`]) and the other `DEEPKERN_SIM_*` variables, each listed in docs/simulator.md.
//!
//! # Further reading
//!
//! In the repository:
//!
//! - README.md: *Two commands on a fresh machine* (setup, tests, benchmarks), *Using it from
//!   another crate* (link mode, CUDA version, features), *Expert-parallel dispatch and combine*,
//!   *A whole MoE layer*, *On candle tensors*, *Tests*, *Benchmarks*.
//! - docs/ep.md: the rules of an expert-parallel group's protocol: call order, epochs, slow or
//!   failed ranks, recovery.
//! - docs/simulator.md: the simulator, what it checks and its variables.
//! - docs/kernels/: one page per kernel (FP8 GEMM, quantisers, MLA decode, schedule and combine,
//!   EP layout, dispatch and combine).

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
