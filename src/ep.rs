//! Expert-parallel all-to-all on the GPU. So far: the dispatch layout, the first step of both
//! dispatch modes. The routing semantics are [`crate::reference::ep`]'s, which the kernels are
//! checked against.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Launch, ffi_call, int_arg};
use crate::reference::ep::{EpConfig, Layout};

/// Most ranks the EP kernels handle (a token's rank set is a 64-bit mask).
pub const MAX_RANKS: usize = ffi::DK_EP_MAX_RANKS as usize;
/// Most experts the EP kernels handle (per-expert counters live in shared memory).
pub const MAX_EXPERTS: usize = ffi::DK_EP_MAX_EXPERTS as usize;

/// Device buffers of a dispatch layout for `tokens` tokens of one rank.
#[derive(Debug)]
pub struct DeviceLayout {
    /// `[ranks]`.
    pub tokens_per_rank: CudaSlice<i32>,
    /// `[num_experts]`.
    pub tokens_per_expert: CudaSlice<i32>,
    /// `[tokens, ranks]`, 0 or 1 (at least one element is allocated, even for no tokens).
    pub is_token_in_rank: CudaSlice<u8>,
    /// `[1]`: slots whose expert index was outside `-1 .. num_experts` (ignored by the kernel).
    pub num_invalid: CudaSlice<i32>,
    pub tokens: usize,
    pub cfg: EpConfig,
}

fn check_config(cfg: &EpConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.ranks > MAX_RANKS {
        return Err(Error::InvalidArgument { arg: "ranks", reason: format!("{} exceeds the kernels' limit of {MAX_RANKS}", cfg.ranks) });
    }
    if cfg.num_experts > MAX_EXPERTS {
        return Err(Error::InvalidArgument {
            arg: "num_experts",
            reason: format!("{} exceeds the kernels' limit of {MAX_EXPERTS}", cfg.num_experts),
        });
    }
    Ok(())
}

impl DeviceLayout {
    /// Allocates the buffers for `tokens` tokens under `cfg`.
    pub fn new(stream: &Arc<CudaStream>, tokens: usize, cfg: EpConfig) -> Result<Self> {
        check_config(&cfg)?;
        let map = tokens.checked_mul(cfg.ranks).ok_or(Error::InvalidArgument { arg: "tokens", reason: format!("{tokens} is too many") })?;
        Ok(Self {
            tokens_per_rank: stream.alloc_zeros(cfg.ranks)?,
            tokens_per_expert: stream.alloc_zeros(cfg.num_experts)?,
            is_token_in_rank: stream.alloc_zeros(map.max(1))?,
            num_invalid: stream.alloc_zeros(1)?,
            tokens,
            cfg,
        })
    }

    /// Copies the layout back (synchronising `stream`): the counts, and the number of ignored
    /// out-of-range slots.
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<(Layout, usize)> {
        let as_u32 = |v: Vec<i32>| v.into_iter().map(|x| u32::try_from(x).unwrap_or(0)).collect();
        let map = stream.clone_dtoh(&self.is_token_in_rank)?;
        let layout = Layout {
            tokens_per_rank: as_u32(stream.clone_dtoh(&self.tokens_per_rank)?),
            tokens_per_expert: as_u32(stream.clone_dtoh(&self.tokens_per_expert)?),
            is_token_in_rank: map[..self.tokens * self.cfg.ranks].iter().map(|&b| b != 0).collect(),
        };
        let invalid = stream.clone_dtoh(&self.num_invalid)?[0];
        Ok((layout, usize::try_from(invalid).unwrap_or(0)))
    }
}

/// Computes the dispatch layout of `topk_idx` (`[out.tokens, k]`, -1 = no expert) into `out`.
/// Out-of-range indices cannot be checked on the host without a copy: the kernel ignores them and
/// counts them in `out.num_invalid` (see [`DeviceLayout::to_host`]). Asynchronous on `stream`.
pub fn layout(stream: &CudaStream, topk_idx: &impl DevicePtr<i32>, k: usize, out: &mut DeviceLayout) -> Result<()> {
    check_config(&out.cfg)?;
    if k == 0 {
        return Err(Error::InvalidArgument { arg: "k", reason: "must be at least 1".into() });
    }
    let want = out.tokens.checked_mul(k).ok_or(Error::InvalidArgument { arg: "k", reason: format!("{k} is too large") })?;
    if topk_idx.len() != want {
        return Err(Error::Shape {
            arg: "topk_idx",
            expected: format!("[{}, {k}] = {want} elements", out.tokens),
            got: format!("{} elements", topk_idx.len()),
        });
    }
    let (k32, ranks, experts) =
        (int_arg::<i32>("k", k)?, int_arg::<i32>("ranks", out.cfg.ranks)?, int_arg::<i32>("num_experts", out.cfg.num_experts)?);
    let tokens = int_arg::<i64>("tokens", out.tokens)?;
    let mut launch = Launch::new("ep_layout", stream)?;
    let params = ffi::dk_ep_layout_params {
        topk_idx: launch.input(topk_idx) as *const i32,
        tokens_per_rank: launch.output(&mut out.tokens_per_rank) as *mut i32,
        tokens_per_expert: launch.output(&mut out.tokens_per_expert) as *mut i32,
        is_token_in_rank: launch.output(&mut out.is_token_in_rank) as *mut u8,
        num_invalid: launch.output(&mut out.num_invalid) as *mut i32,
        tokens,
        k: k32,
        ranks,
        num_experts: experts,
    };
    let s = launch.stream();
    // SAFETY: the buffers are live cudarc allocations sized by `DeviceLayout::new` for these
    // tokens and this config, `topk_idx` has tokens·k elements (checked above); `launch` holds
    // their guards until `finish`.
    let status = ffi_call!(unsafe dk_ep_layout(&params, s));
    launch.finish(status)
}
