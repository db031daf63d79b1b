//! deepkern: hand-tuned CUDA kernels for Hopper (sm_90a).

pub mod check;
pub mod fp8;
pub mod layout;
pub mod reference;
