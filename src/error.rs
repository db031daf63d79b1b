//! The crate's one error type. Every fallible entry point returns [`Result`].

use std::fmt;

pub use cudarc::driver::DriverError;

/// A deepkern failure: bad arguments (caught in Rust before anything is launched), CUDA driver
/// errors, kernel launch failures, or a build or machine that cannot run the kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor argument has the wrong shape or length.
    #[error("`{arg}`: expected {expected}, got {got}")]
    Shape {
        /// The argument's name, as in the function's signature (or a dimension such as `k`).
        arg: &'static str,
        /// The shape, length or value the call needs.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// A tensor argument has the wrong stride.
    #[error("`{arg}`: expected stride {expected}, got {got}")]
    Stride {
        /// The argument's name.
        arg: &'static str,
        /// The layout the call needs (e.g. contiguous row-major).
        expected: String,
        /// The strides that were passed.
        got: String,
    },
    /// A device pointer does not meet a kernel's alignment contract (TMA needs 16 bytes).
    #[error("`{arg}`: device address {addr:#x} is not {required}-byte aligned")]
    Alignment {
        /// The argument's name.
        arg: &'static str,
        /// The alignment the kernel needs, in bytes.
        required: usize,
        /// The device address that was passed.
        addr: u64,
    },
    /// A tensor argument has the wrong element type.
    #[error("`{arg}`: expected dtype {expected}, got {got}")]
    Dtype {
        /// The argument's name.
        arg: &'static str,
        /// The element type the call needs (e.g. `bf16`).
        expected: &'static str,
        /// The element type that was passed.
        got: &'static str,
    },
    /// Any other argument outside its documented range.
    #[error("`{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An error from the CUDA driver API.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// A launcher of the C library reported a failure.
    #[error("kernel `{kernel}` failed: {status}{}", cuda_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Kernel {
        /// The launch that failed, e.g. `ep_dispatch_recv` or `mla_schedule`.
        kernel: &'static str,
        /// The status the launcher returned.
        status: KernelStatus,
        /// The CUDA runtime error behind it, name and code, when the status came from one
        /// ([`KernelStatus::UnsupportedDevice`], [`KernelStatus::OutOfResources`],
        /// [`KernelStatus::CudaError`]); `None` for the launcher's own checks.
        cuda_error: Option<String>,
    },
    /// The crate was built without nvcc, so it carries no kernels.
    #[error(
        "deepkern was built without its CUDA kernels (nvcc was not found when it was built): install nvcc \
         (CUDA 12 or later) on PATH, or set NVCC to the nvcc executable or CUDA_HOME to the CUDA installation, \
         then run `cargo clean -p deepkern` and build again (the `require-kernels` feature makes a build \
         without kernels fail)"
    )]
    KernelsNotBuilt,
    /// An expert-parallel group reported a failure on the device (a peer that never signalled, a
    /// receive buffer too small for what was sent).
    #[error("expert-parallel group, rank {rank}: {reason}")]
    Communication {
        /// The rank whose device-side state reported the failure.
        rank: usize,
        /// What failed (a timeout waiting for a peer, a receive overflow, an NCCL call, ...).
        reason: String,
    },
    /// No CUDA driver or no CUDA device on this machine.
    #[error("no CUDA device is available (no driver library or no device)")]
    NoDevice,
    /// The device cannot run these kernels (they are compiled for sm_90a).
    #[error("unsupported GPU: needs compute capability {}.{}, found {}.{}", need.0, need.1, found.0, found.1)]
    UnsupportedArch {
        /// The compute capability the kernels need, (9, 0).
        need: (u32, u32),
        /// The device's compute capability (major, minor).
        found: (u32, u32),
    },
}

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The status a launcher of the C library returned (`dk_status_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelStatus {
    /// Success (never carried by an [`Error`]).
    Ok,
    /// A parameter was outside its documented range. The Rust entry points validate their
    /// arguments first, so this points at a bug in deepkern's own checks.
    InvalidArgument,
    /// A pointer or stride does not meet the kernel's alignment contract.
    Misaligned,
    /// The device cannot run this build's kernels (compiled for sm_90a only).
    UnsupportedDevice,
    /// The launch needs more registers, shared memory or threads than the device has.
    OutOfResources,
    /// Any other CUDA runtime error; [`Error::Kernel`]'s `cuda_error` names it.
    CudaError,
    /// A value this version of the crate does not know.
    Unknown(u32),
}

impl KernelStatus {
    /// Every known status, in `dk_status_t` order.
    pub const ALL: [KernelStatus; 6] = [
        KernelStatus::Ok,
        KernelStatus::InvalidArgument,
        KernelStatus::Misaligned,
        KernelStatus::UnsupportedDevice,
        KernelStatus::OutOfResources,
        KernelStatus::CudaError,
    ];

    /// The status for a raw `dk_status_t` value.
    pub fn from_raw(raw: u32) -> Self {
        Self::ALL.get(raw as usize).copied().unwrap_or(KernelStatus::Unknown(raw))
    }

    /// The raw `dk_status_t` value.
    pub fn to_raw(self) -> u32 {
        match self {
            KernelStatus::Unknown(raw) => raw,
            known => Self::ALL.iter().position(|s| *s == known).expect("known status") as u32,
        }
    }

    /// The same text as the C library's `dk_status_string`.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelStatus::Ok => "ok",
            KernelStatus::InvalidArgument => "invalid argument",
            KernelStatus::Misaligned => "misaligned pointer or stride",
            KernelStatus::UnsupportedDevice => "unsupported device (kernels are built for sm_90a)",
            KernelStatus::OutOfResources => "out of device resources",
            KernelStatus::CudaError => "CUDA error",
            KernelStatus::Unknown(_) => "unknown status",
        }
    }
}

impl fmt::Display for KernelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelStatus::Unknown(raw) => write!(f, "unknown status {raw}"),
            s => f.write_str(s.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice must be something a crate depending on deepkern can follow (it has no xtask).
    #[test]
    fn kernels_not_built_says_what_a_dependent_can_do() {
        let msg = Error::KernelsNotBuilt.to_string();
        for advice in ["install nvcc", "NVCC", "CUDA_HOME", "cargo clean -p deepkern"] {
            assert!(msg.contains(advice), "`{advice}` missing from: {msg}");
        }
        assert!(!msg.contains("xtask"), "dependents have no xtask: {msg}");
    }

    #[test]
    fn status_round_trips_through_raw() {
        for s in KernelStatus::ALL {
            assert_eq!(KernelStatus::from_raw(s.to_raw()), s);
        }
        assert_eq!(KernelStatus::from_raw(77), KernelStatus::Unknown(77));
        assert_eq!(KernelStatus::Unknown(77).to_raw(), 77);
    }

    #[test]
    fn errors_name_the_argument() {
        let e = Error::Alignment { arg: "sf", required: 16, addr: 0x1004 };
        assert_eq!(e.to_string(), "`sf`: device address 0x1004 is not 16-byte aligned");
        let e = Error::Kernel { kernel: "k", status: KernelStatus::CudaError, cuda_error: Some("cudaErrorIllegalAddress".into()) };
        assert_eq!(e.to_string(), "kernel `k` failed: CUDA error (cudaErrorIllegalAddress)");
        let e = Error::UnsupportedArch { need: (9, 0), found: (8, 9) };
        assert_eq!(e.to_string(), "unsupported GPU: needs compute capability 9.0, found 8.9");
    }
}
