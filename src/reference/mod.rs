//! CPU references: plain f32/f64 code with no CUDA, the ground truth every kernel is checked
//! against. They favour being obviously right over being fast.

pub mod ep;
pub mod gemm;
pub mod mla;
pub mod moe;
pub mod quant;
