//! Overlap primitives: communication hidden behind computation, usable without the MoE layer.
//!
//! - [`Streams`]: a communication stream and a compute stream of one device, with explicit
//!   event hand-offs between them (the schedule never depends on cudarc's implicit per-buffer
//!   tracking; the per-block hand-off orders its buffers' allocation with an explicit event too).
//! - [`SmBudget`]: the device's SMs split between communication kernels and the persistent GEMMs
//!   (whose grids shrink by what communication holds: [`crate::gemm::GemmOptions::max_sms`]).
//! - [`two_micro_batches`]: the two-micro-batch schedule. Micro-batch 1's dispatch runs on the
//!   communication stream while micro-batch 0 computes, and micro-batch 0's combine runs while
//!   micro-batch 1 computes:
//!
//! ```text
//! comm:     dispatch 0 | dispatch 1 |             | combine 0 | combine 1
//! compute:             | compute 0  | compute 1   |
//! ```
//!
//! - [`Handoff`]: when a micro-batch's computation may start. After its whole dispatch (stream
//!   order), or per 128-row block as rows land: the fine-grained path, where the dispatch's receive
//!   counts arrived rows ([`crate::ep::Group::dispatch_with_arrivals`]) and the grouped GEMM
//!   ([`crate::gemm::gemm_fp8_contiguous_arrived`]) waits for each tile's own block on the device.
//! - The zero-SM path: a group built with [`crate::ep::Transport::CopyEngine`] moves its
//!   payloads with copy engines and signals with stream memory operations; its kernels only pack
//!   and unpack rows locally, so they need a few SMs for a short time ([`SmBudget::new`] with a
//!   small `comm_sms`) and no SM waits while data is in flight.
//!
//! [`crate::moe::forward_two_batch`] is the MoE layer on these primitives.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::error::{Error, Result};
use crate::gemm::GemmOptions;

/// A communication stream and a compute stream of one device.
#[derive(Clone, Debug)]
pub struct Streams {
    comm: Arc<CudaStream>,
    compute: Arc<CudaStream>,
}

impl Streams {
    /// Two distinct streams of one context.
    pub fn new(comm: &Arc<CudaStream>, compute: &Arc<CudaStream>) -> Result<Self> {
        if **comm == **compute {
            return Err(Error::InvalidArgument { arg: "compute", reason: "the compute stream is the communication stream".into() });
        }
        if !Arc::ptr_eq(comm.context(), compute.context()) {
            return Err(Error::InvalidArgument { arg: "compute", reason: "the two streams belong to different contexts".into() });
        }
        Ok(Self { comm: comm.clone(), compute: compute.clone() })
    }

    /// The communication stream (dispatch and combine).
    pub fn comm(&self) -> &Arc<CudaStream> {
        &self.comm
    }

    /// The compute stream (quantisation and GEMMs).
    pub fn compute(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// Work enqueued on the compute stream from now on waits for all work enqueued on the
    /// communication stream so far.
    pub fn compute_after_comm(&self) -> Result<()> {
        let ev = self.comm.record_event(None)?;
        self.compute.wait(&ev)?;
        Ok(())
    }

    /// A point in the compute stream's work (everything enqueued on it so far).
    pub fn compute_checkpoint(&self) -> Result<Checkpoint> {
        Ok(Checkpoint(self.compute.record_event(None)?))
    }

    /// Work enqueued on the communication stream from now on waits for `checkpoint`.
    pub fn comm_after(&self, checkpoint: &Checkpoint) -> Result<()> {
        self.comm.wait(&checkpoint.0)?;
        Ok(())
    }
}

/// An event recorded on the compute stream ([`Streams::compute_checkpoint`]).
pub struct Checkpoint(CudaEvent);

/// The device's SMs split between communication kernels and the persistent GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmBudget {
    device_sms: usize,
    comm_sms: usize,
}

impl SmBudget {
    /// `comm_sms` of `device_sms` for communication (0 is allowed: every SM computes); the GEMMs
    /// get the rest, at least one.
    pub fn new(device_sms: usize, comm_sms: usize) -> Result<Self> {
        if device_sms == 0 {
            return Err(Error::InvalidArgument { arg: "device_sms", reason: "a device has at least one SM".into() });
        }
        if comm_sms >= device_sms {
            return Err(Error::InvalidArgument {
                arg: "comm_sms",
                reason: format!("{comm_sms} leaves none of the device's {device_sms} SMs to the GEMMs"),
            });
        }
        Ok(Self { device_sms, comm_sms })
    }

    /// The budget on `stream`'s device.
    pub fn for_stream(stream: &Arc<CudaStream>, comm_sms: usize) -> Result<Self> {
        Self::new(crate::launch::device_facts(stream)?.sm_count, comm_sms)
    }

    /// All of the device's SMs.
    pub fn device_sms(&self) -> usize {
        self.device_sms
    }

    /// SMs set aside for communication kernels.
    pub fn comm_sms(&self) -> usize {
        self.comm_sms
    }

    /// SMs left to the GEMMs.
    pub fn gemm_sms(&self) -> usize {
        self.device_sms - self.comm_sms
    }

    /// GEMM options whose persistent grid stays within [`SmBudget::gemm_sms`].
    pub fn gemm_options(&self) -> GemmOptions {
        GemmOptions { max_sms: Some(self.gemm_sms()), ..GemmOptions::default() }
    }
}

/// When a micro-batch's computation may start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Handoff {
    /// The compute stream waits for everything the dispatch enqueued (stream order).
    #[default]
    AfterDispatch,
    /// The compute stream does not wait: the dispatch itself orders what the computation reads
    /// (device-side arrival counters; see the module docs). The computation must only read
    /// dispatched rows through them.
    PerBlock,
}

/// Runs two micro-batches with the two-micro-batch schedule (see the module docs). The stage
/// closures enqueue work and return its handles:
/// - `dispatch(i)` enqueues micro-batch `i`'s dispatch on `streams.comm()`;
/// - `compute(i, &dispatched)` enqueues its computation on `streams.compute()`;
/// - `combine(i, dispatched, computed)` enqueues its combine on `streams.comm()`.
///
/// The ordering between the streams is explicit: each compute waits for everything enqueued on
/// the communication stream before it (its dispatch), and each combine waits for its own
/// micro-batch's compute only, so combine 0 overlaps compute 1. A closure may synchronise its
/// own stream (normal dispatch reads counts back to the host); it must not synchronise the other.
pub fn two_micro_batches<D, Y, O>(
    streams: &Streams,
    dispatch: impl FnMut(usize) -> Result<D>,
    compute: impl FnMut(usize, &D) -> Result<Y>,
    combine: impl FnMut(usize, D, Y) -> Result<O>,
) -> Result<[O; 2]> {
    two_micro_batches_with(streams, Handoff::AfterDispatch, dispatch, compute, combine)
}

/// [`two_micro_batches`] with a choice of [`Handoff`]. With [`Handoff::PerBlock`] the compute
/// stream does not wait for the dispatch; each combine still waits for its own compute.
pub fn two_micro_batches_with<D, Y, O>(
    streams: &Streams,
    handoff: Handoff,
    mut dispatch: impl FnMut(usize) -> Result<D>,
    mut compute: impl FnMut(usize, &D) -> Result<Y>,
    mut combine: impl FnMut(usize, D, Y) -> Result<O>,
) -> Result<[O; 2]> {
    // What the compute stream waits for before a micro-batch's computation.
    let hand_over = || if handoff == Handoff::AfterDispatch { streams.compute_after_comm() } else { Ok(()) };
    let d0 = dispatch(0)?;
    hand_over()?;
    let y0 = compute(0, &d0)?;
    let done0 = streams.compute_checkpoint()?;
    let d1 = dispatch(1)?;
    hand_over()?;
    let y1 = compute(1, &d1)?;
    let done1 = streams.compute_checkpoint()?;
    streams.comm_after(&done0)?;
    let o0 = combine(0, d0, y0)?;
    streams.comm_after(&done1)?;
    let o1 = combine(1, d1, y1)?;
    Ok([o0, o1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_leave_the_gemms_at_least_one_sm() {
        let b = SmBudget::new(132, 24).unwrap();
        assert_eq!((b.gemm_sms(), b.gemm_options().max_sms), (108, Some(108)));
        assert_eq!(SmBudget::new(132, 0).unwrap().gemm_sms(), 132);
        assert_eq!(SmBudget::new(132, 131).unwrap().gemm_sms(), 1);
        for (device, comm, arg) in [(132, 132, "comm_sms"), (132, 500, "comm_sms"), (0, 0, "device_sms")] {
            match SmBudget::new(device, comm) {
                Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg),
                other => panic!("{device}/{comm}: {other:?}"),
            }
        }
    }
}
