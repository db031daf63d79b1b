//! The one path from a safe wrapper into the C library.
//!
//! A [`Launch`] checks that the kernels are built and that the stream's GPU can run them, binds the
//! stream's context to the calling thread (the C launchers use the CUDA runtime API, which follows
//! the thread's current context), collects a cudarc guard for every buffer it hands out a raw
//! pointer to, and drops those guards only after the launcher returned, i.e. after the work was
//! enqueued. That is what makes cudarc's cross-stream tracking see the kernel's reads and writes.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::error::{Error, KernelStatus, Result};
use crate::ffi;

/// Calls a C launcher. Without the kernels (no nvcc at build time) it calls nothing and yields
/// [`NOT_BUILT`], which [`Launch::finish`] turns into `Error::KernelsNotBuilt`, so the crate links
/// with no kernel library at all. ([`Launch::new`] already refuses to start a launch then; this
/// keeps both builds the same straight-line code.)
macro_rules! ffi_call {
    (unsafe $f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(deepkern_kernels)]
        let status = unsafe { $crate::ffi::$f($($arg),*) };
        #[cfg(not(deepkern_kernels))]
        let status = {
            let _ = ($(&$arg,)*);
            $crate::launch::NOT_BUILT
        };
        status
    }};
}
pub(crate) use ffi_call;

/// The status [`ffi_call!`] yields in a build without kernels (outside `dk_status_t`'s range).
pub(crate) const NOT_BUILT: ffi::dk_status_t = ffi::dk_status_t(u32::MAX);

/// What the launchers ask of a device on every call, read once per device (the values of a device
/// never change while the process runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceFacts {
    pub compute_capability: (u32, u32),
    pub sm_count: usize,
    pub smem_optin: usize,
}

/// [`DeviceFacts`] of `stream`'s device, from a process-wide cache.
pub(crate) fn device_facts(stream: &CudaStream) -> Result<DeviceFacts> {
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    // Keyed by the driver's device handle (a context's ordinal is whatever its creator said).
    static CACHE: std::sync::Mutex<Vec<(cudarc::driver::sys::CUdevice, DeviceFacts)>> = std::sync::Mutex::new(Vec::new());
    let ctx = stream.context();
    let device = ctx.cu_device();
    if let Some(&(_, f)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(d, _)| *d == device) {
        return Ok(f);
    }
    let (major, minor) = ctx.compute_capability()?;
    let attr = |a| -> Result<usize> { Ok(usize::try_from(ctx.attribute(a)?).unwrap_or(0)) };
    let facts = DeviceFacts {
        compute_capability: (u32::try_from(major).unwrap_or(0), u32::try_from(minor).unwrap_or(0)),
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        smem_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
    };
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).push((device, facts));
    Ok(facts)
}

/// One kernel launch in preparation. See the module docs.
pub(crate) struct Launch<'a> {
    kernel: &'static str,
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
    facts: DeviceFacts,
}

impl<'a> Launch<'a> {
    /// Starts a launch of `kernel` on `stream`: kernels built, GPU supported, context bound.
    pub fn new(kernel: &'static str, stream: &'a CudaStream) -> Result<Self> {
        let facts = device_facts(stream)?;
        crate::device::check_supported(facts.compute_capability)?;
        stream.context().bind_to_thread()?;
        Ok(Self { kernel, stream, guards: Vec::with_capacity(8), facts })
    }

    /// The launch's device (cached facts).
    pub fn device(&self) -> DeviceFacts {
        self.facts
    }

    /// Raw device address of a buffer the kernel reads.
    pub fn input<T>(&mut self, buf: &'a impl DevicePtr<T>) -> u64 {
        let (ptr, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// Raw device address of a buffer the kernel writes.
    pub fn output<T>(&mut self, buf: &'a mut impl DevicePtrMut<T>) -> u64 {
        let (ptr, guard) = buf.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// Raw device address of a buffer the kernel writes, whose write cudarc records on `on`
    /// instead of the launch's stream (after `on` waited for the buffer's earlier uses). For an
    /// output a kernel on `on` consumes while this launch still writes it, ordered on the device
    /// (arrival counters) rather than by the streams; see [`crate::ep::Group::dispatch_with_arrivals`].
    pub fn output_tracked_on<T>(&mut self, buf: &'a mut impl DevicePtrMut<T>, on: &'a CudaStream) -> u64 {
        let (ptr, guard) = buf.device_ptr_mut(on);
        self.guards.push(guard);
        ptr
    }

    /// The stream as the C ABI's `dk_stream_t`.
    pub fn stream(&self) -> ffi::dk_stream_t {
        self.stream.cu_stream() as ffi::dk_stream_t
    }

    /// Ends the launch with the status the C launcher returned; the guards drop here, after it.
    pub fn finish(self, status: ffi::dk_status_t) -> Result<()> {
        if status == NOT_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        let status = KernelStatus::from_raw(status.0);
        if status == KernelStatus::Ok {
            return Ok(());
        }
        // Only these come from a CUDA error; the others are the launcher's own checks, and the
        // thread's last CUDA error may be stale for them.
        let from_cuda = matches!(status, KernelStatus::UnsupportedDevice | KernelStatus::OutOfResources | KernelStatus::CudaError);
        Err(Error::Kernel { kernel: self.kernel, status, cuda_error: if from_cuda { last_cuda_error() } else { None } })
    }
}

/// Name of the CUDA error behind the last failed launch on this thread, if any.
fn last_cuda_error() -> Option<String> {
    #[cfg(deepkern_kernels)]
    {
        // SAFETY: host-only functions of the C library; the returned string is static.
        let code = unsafe { ffi::dk_last_cuda_error() };
        if code == 0 {
            return None;
        }
        // SAFETY: as above.
        let name = unsafe { std::ffi::CStr::from_ptr(ffi::dk_cuda_error_name(code)) };
        Some(format!("{} ({code})", name.to_string_lossy()))
    }
    #[cfg(not(deepkern_kernels))]
    None
}

/// `v` as the C ABI's integer type `T`, or an error naming the argument.
pub(crate) fn int_arg<T: TryFrom<usize>>(arg: &'static str, v: usize) -> Result<T> {
    T::try_from(v).map_err(|_| Error::InvalidArgument { arg, reason: format!("{v} does not fit in {}", std::any::type_name::<T>()) })
}

/// Checks that a device address meets `required` bytes of alignment.
pub(crate) fn check_aligned(arg: &'static str, addr: u64, required: usize) -> Result<()> {
    if addr.is_multiple_of(required as u64) { Ok(()) } else { Err(Error::Alignment { arg, required, addr }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_errors_name_the_argument() {
        assert!(check_aligned("x", 0x1000, 16).is_ok());
        assert!(matches!(check_aligned("x", 0x1008, 16), Err(Error::Alignment { arg: "x", required: 16, addr: 0x1008 })));
    }

    /// The C library's status names agree with the Rust side's (host-only code: no GPU needed).
    #[cfg(deepkern_kernels)]
    #[test]
    fn status_strings_match_the_c_library() {
        for s in KernelStatus::ALL {
            // SAFETY: host-only function returning a static string.
            let c = unsafe { std::ffi::CStr::from_ptr(ffi::dk_status_string(ffi::dk_status_t(s.to_raw()))) };
            assert_eq!(c.to_str().unwrap(), s.as_str(), "status {s:?}");
        }
        // SAFETY: host-only functions.
        assert_eq!(unsafe { ffi::dk_abi_version() }, ffi::DK_ABI_VERSION);
        // SAFETY: as above; 0 is cudaSuccess.
        let ok = unsafe { std::ffi::CStr::from_ptr(ffi::dk_cuda_error_name(0)) };
        assert_eq!(ok.to_str().unwrap(), "cudaSuccess");
    }
}
