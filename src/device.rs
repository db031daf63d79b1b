//! The GPU a caller runs on, and whether this machine and build can run the kernels at all.
//!
//! Streams and buffers are cudarc's own types ([`CudaStream`], [`cudarc::driver::CudaSlice`]);
//! [`Device`] only adds the facts the kernels' host-side planning needs ([`DeviceInfo`]).

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{Error, Result};

/// The compute capability the kernels are compiled for (sm_90a: H100, H200, H800, H20).
pub const HOPPER: (u32, u32) = (9, 0);

/// Whether a CUDA driver is installed and reports at least one device. Never panics (cudarc's
/// dynamic loader panics when libcuda is absent, so this looks for the library first).
pub fn cuda_available() -> bool {
    device_count() > 0
}

/// Whether the CUDA driver library can be loaded. Works whichever way cudarc reaches the driver:
/// loaded at run time (this crate's default), or linked when another crate in the build asked for
/// cudarc's `dynamic-linking` (then the library is already loaded and this finds it).
fn driver_library_present() -> bool {
    #[cfg(unix)]
    {
        use std::ffi::{c_char, c_int, c_void};
        unsafe extern "C" {
            fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
            fn dlclose(handle: *mut c_void) -> c_int;
        }
        const RTLD_LAZY: c_int = 1;
        // The name cudarc's loader opens first, then the driver's soname (what a linked build has).
        [c"libcuda.so", c"libcuda.so.1"].iter().any(|name| {
            // SAFETY: a NUL-terminated name; a handle that dlopen returned is closed once.
            let handle = unsafe { dlopen(name.as_ptr(), RTLD_LAZY) };
            if handle.is_null() {
                return false;
            }
            unsafe { dlclose(handle) };
            true
        })
    }
    #[cfg(not(unix))]
    {
        // The probe below catches the loader's panic.
        true
    }
}

/// Number of CUDA devices; 0 when there is no driver library or the driver reports none.
pub fn device_count() -> usize {
    if !driver_library_present() {
        return 0;
    }
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => usize::try_from(n).unwrap_or(0),
        _ => 0,
    }
}

/// Whether this build of the crate carries its CUDA kernels (nvcc was found at build time).
pub const fn kernels_built() -> bool {
    cfg!(deepkern_kernels)
}

/// Whether this build runs its kernels on the deepkern simulator instead of a GPU: it was built
/// with `DEEPKERN_SIM=1`, the kernels were compiled for the host, and the CUDA driver is the
/// simulator's stand-in (docs/simulator.md). What a simulated build computes is checked the same
/// way, but it is never a GPU result, and it measures no GPU time.
pub const fn simulated() -> bool {
    cfg!(deepkern_sim)
}

/// The simulator's scheduling seed (`DEEPKERN_SIM_SEED`, or the one it drew for this process) in a
/// simulated build; `None` otherwise. The same seed gives the same interleaving of simulated
/// threads for the same sequence of host calls.
pub fn simulator_seed() -> Option<u64> {
    #[cfg(deepkern_sim)]
    {
        unsafe extern "C" {
            fn dksim_seed() -> u64;
        }
        // SAFETY: a plain query of the simulator library this build links.
        Some(unsafe { dksim_seed() })
    }
    #[cfg(not(deepkern_sim))]
    None
}

/// The installed CUDA driver's version as (major, minor), e.g. (13, 0) for a 580 driver.
pub fn driver_version() -> Result<(u32, u32)> {
    if !cuda_available() {
        return Err(Error::NoDevice);
    }
    let mut v = 0i32;
    // SAFETY: `v` is a valid out-pointer; the driver library is present (checked above).
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    r.result()?;
    let v = u32::try_from(v).unwrap_or(0);
    Ok((v / 1000, (v % 1000) / 10))
}

/// What the host-side planners need to know about a GPU. Plain data, so planners and their
/// property tests run without CUDA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The CUDA device ordinal (the index `Device::new` takes).
    pub ordinal: usize,
    /// The name the driver reports, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// (major, minor); Hopper is (9, 0).
    pub compute_capability: (u32, u32),
    /// Number of streaming multiprocessors (132 on an H100 SXM).
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_cache_bytes: usize,
    /// Largest dynamic shared memory a block may opt in to (232448 bytes on Hopper).
    pub max_shared_memory_per_block_optin: usize,
    /// Total device memory in bytes.
    pub total_memory_bytes: usize,
}

impl DeviceInfo {
    /// A file-name-friendly identifier of the GPU model, e.g. `nvidia-h100-80gb-hbm3`.
    pub fn slug(&self) -> String {
        let mut slug = String::new();
        for c in self.name.chars() {
            if c.is_ascii_alphanumeric() {
                slug.push(c.to_ascii_lowercase());
            } else if !slug.ends_with('-') && !slug.is_empty() {
                slug.push('-');
            }
        }
        slug.trim_end_matches('-').to_string()
    }
}

/// An opened CUDA device: its primary context plus its [`DeviceInfo`].
#[derive(Clone, Debug)]
pub struct Device {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

impl Device {
    /// Opens device `ordinal` (retains its primary context). [`Error::NoDevice`] when CUDA is absent.
    pub fn new(ordinal: usize) -> Result<Self> {
        if ordinal >= device_count() {
            return Err(Error::NoDevice);
        }
        Self::from_context(CudaContext::new(ordinal)?)
    }

    /// Wraps a context the caller already holds (for frameworks that own their contexts).
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let attr = |a: Attr| -> Result<usize> { Ok(usize::try_from(ctx.attribute(a)?).unwrap_or(0)) };
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            ordinal: ctx.ordinal(),
            name: ctx.name()?,
            compute_capability: (u32::try_from(major).unwrap_or(0), u32::try_from(minor).unwrap_or(0)),
            sm_count: u32::try_from(attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?).unwrap_or(0),
            l2_cache_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            max_shared_memory_per_block_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            total_memory_bytes: ctx.total_mem()?,
        };
        Ok(Self { ctx, info })
    }

    /// What the planners know about this GPU, read once when the device was opened.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The cudarc context (the device's primary context, or the one given to [`Device::from_context`]).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The context's default stream.
    pub fn default_stream(&self) -> Arc<CudaStream> {
        self.ctx.default_stream()
    }

    /// A new non-blocking stream.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }

    /// Ok when the kernels are built and this GPU can run them.
    pub fn check_supported(&self) -> Result<()> {
        check_supported(self.info.compute_capability)
    }
}

/// Ok when the kernels are built and a GPU of compute capability `found` can run them.
pub fn check_supported(found: (u32, u32)) -> Result<()> {
    if !kernels_built() {
        return Err(Error::KernelsNotBuilt);
    }
    // sm_90a code runs on exactly 9.0: arch-specific features are not forward compatible.
    if found != HOPPER {
        return Err(Error::UnsupportedArch { need: HOPPER, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_queries_never_panic() {
        let n = device_count();
        assert_eq!(cuda_available(), n > 0);
        if n == 0 {
            assert!(matches!(Device::new(0), Err(Error::NoDevice)));
            assert!(matches!(driver_version(), Err(Error::NoDevice)));
        }
    }

    #[test]
    fn only_hopper_is_supported() {
        if kernels_built() {
            assert!(check_supported((9, 0)).is_ok());
            for cc in [(8, 0), (8, 9), (10, 0), (12, 0), (9, 1)] {
                assert!(matches!(check_supported(cc), Err(Error::UnsupportedArch { need: (9, 0), found }) if found == cc));
            }
        } else {
            assert!(matches!(check_supported((9, 0)), Err(Error::KernelsNotBuilt)));
        }
    }

    #[test]
    fn slugs_are_file_names() {
        let info = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            l2_cache_bytes: 50 << 20,
            max_shared_memory_per_block_optin: 232448,
            total_memory_bytes: 80 << 30,
        };
        assert_eq!(info.slug(), "nvidia-h100-80gb-hbm3");
    }
}
