//! Host-side planning: tile, pipeline and grid choices made in plain Rust from a problem and a
//! [`DeviceInfo`](crate::DeviceInfo), with no CUDA, so that every invariant is property-tested on
//! the CPU and every choice can be printed.

pub mod ep;
pub mod gemm;
pub mod mla;
