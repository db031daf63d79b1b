//! Expert-parallel all-to-all on the GPU: the dispatch layout, and a [`Group`] of ranks that
//! dispatches tokens to the ranks holding their experts and combines the experts' outputs back.
//! The routing semantics are [`crate::reference::ep`]'s, which the kernels are checked against.
//!
//! # Group
//!
//! A [`Group`] of `R` ranks owns one *symmetric buffer* per rank (same layout on every rank,
//! planned by [`crate::plan::ep::SymmetricLayout`]) and a device table of their addresses; the
//! kernels write straight into peers' buffers through that table and signal with system-scope
//! release/acquire flags. Two ways to build one, same device code:
//! - [`Group::new_virtual`]: `R` *virtual ranks* inside one process on one GPU (tests, single-GPU
//!   development, simulation); every call takes all ranks' inputs.
//! - `Group::new_node` (feature `nccl`): one process per GPU of a node; each rank's buffer is
//!   exported with CUDA IPC and the handles are exchanged with an all-gather on the caller's NCCL
//!   communicator, so peers' buffers are mapped with peer access. Every call takes this rank's
//!   input only.
//! - `Group::new_nccl` (feature `nccl`): one process per GPU on any number of hosts; no peer
//!   memory is mapped and normal-mode rows move with NCCL grouped send/receive over the caller's
//!   communicator.
//!
//! [`Transport`] (in the shape) picks how normal-mode rows cross ranks: `Peer`, SM kernels write
//! into peers' buffers; `CopyEngine`, the send kernel packs one contiguous run per destination in
//! the rank's own outbox and copy engines move the runs (stream memory operations write the
//! signals), so no SM is held while data is in flight; `Nccl`, the same runs moved by NCCL. The
//! outputs are identical in all three (`docs/kernels/ep_dispatch_combine.md`).
//!
//! Every operation is split into a send phase and a receive phase. Receive buffers are fixed and
//! sized for the worst case, so no phase ever waits for a later one: running every rank's send
//! and then every rank's receive, one after another on one stream, cannot deadlock, and a caller
//! may put other work between the two phases.
//!
//! - **Normal dispatch** ([`Group::dispatch`]): rows arrive in the contiguous grouped GEMM's layout
//!   ([`crate::gemm::gemm_fp8_contiguous`]): local experts in order, each padded to `m_align` rows,
//!   with a per-row expert index (-1 on padding). It reads the all-gathered counts back to the host
//!   once (one stream synchronisation) to size the outputs exactly.
//! - **Low-latency dispatch** ([`Group::dispatch_low_latency_send`] / `_recv`): rows arrive in the
//!   masked grouped GEMM's layout ([`crate::gemm::gemm_fp8_masked`]): `[E_local, R·ll_max_tokens,
//!   hidden]` plus the valid rows per expert, in device memory only (no host synchronisation).
//! - **Combine** ([`Group::combine_send`] / `_recv`, both modes): every row goes back to the token
//!   it came from, and each token gets `Σ_slots weight · row` accumulated in f32, in slot order.
//!
//! All of a virtual group's work runs on the group's stream.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr};
use float8::F8E4M3;
use half::bf16;

use crate::error::{Error, Result};
use crate::ffi;
use crate::gemm::ARRIVAL_ROWS;
use crate::launch::{Launch, check_aligned, ffi_call, int_arg};
use crate::layout::{GROUP, tma_aligned_rows};
pub use crate::plan::ep::{GroupShape, Payload, SymmetricLayout, Transport};
use crate::plan::ep::{ll_scale_stride, normal_rows, notify_slot, staged_run};
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
    /// Tokens the layout was allocated for.
    pub tokens: usize,
    /// The group configuration (ranks, experts) the layout counts against.
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

// ---- Group -------------------------------------------------------------------------------------

/// Signal kinds, as in the C header.
const NOTIFY: usize = ffi::DK_EP_SIGNAL_NOTIFY as usize;
const DISPATCH: usize = ffi::DK_EP_SIGNAL_DISPATCH as usize;
const LL_DISPATCH: usize = ffi::DK_EP_SIGNAL_LL_DISPATCH as usize;
const COMBINE: usize = ffi::DK_EP_SIGNAL_COMBINE as usize;
const BARRIER: usize = ffi::DK_EP_SIGNAL_BARRIER as usize;
const KINDS: usize = ffi::DK_EP_SIGNAL_KINDS as usize;
const NOTIFY_SLOT_WORDS: usize = ffi::DK_EP_NOTIFY_SLOT_WORDS as usize;
const KIND_NAMES: [&str; KINDS] = ["NOTIFY (normal dispatch counts)", "DISPATCH", "LL_DISPATCH", "COMBINE", "BARRIER (group teardown)"];

/// How long a kernel waits for its peers' signals unless told otherwise ([`Group::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(100);

/// Where a local rank stands in the call order the buffers rely on (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No round in flight: a dispatch (either mode) may start.
    Idle,
    /// A low-latency send is in flight: its receive comes next.
    LowLatencySent,
    /// Rows were received (either mode): combine comes next.
    Received,
    /// The combine's send phase ran: its receive comes next.
    CombineSent,
}

impl Phase {
    fn state(self) -> &'static str {
        match self {
            Phase::Idle => "has no round in flight",
            Phase::LowLatencySent => "has a low-latency send whose receive has not run",
            Phase::Received => "has received a dispatch that has not been combined",
            Phase::CombineSent => "has a combine send whose receive has not run",
        }
    }
}

/// One rank's tokens: bf16 rows, or e4m3 rows and their 1x128 scales in the per-token quantiser's
/// transposed layout `[hidden / 128, round_up(tokens, 4)]` ([`crate::quantize_per_token_group`]).
pub enum Tokens<'a> {
    /// bf16 `[tokens, hidden]`.
    Bf16(CudaView<'a, bf16>),
    /// E4M3 rows and their scales.
    Fp8 {
        /// E4M3 `[tokens, hidden]`.
        q: CudaView<'a, F8E4M3>,
        /// f32 `[hidden / 128, round_up(tokens, 4)]`.
        sf: CudaView<'a, f32>,
    },
}

/// One rank's input to a dispatch: `tokens` rows of `hidden` and the router's `[tokens, k]` output
/// (`topk_idx` -1 = no expert).
pub struct RankInput<'a> {
    /// The rank's rows, bf16 or FP8 (the group's [`Payload`]).
    pub x: Tokens<'a>,
    /// i32 `[tokens, k]`: each token's experts (global indices; -1 = no expert).
    pub topk_idx: CudaView<'a, i32>,
    /// f32 `[tokens, k]`: the router weight of each slot.
    pub topk_weights: CudaView<'a, f32>,
    /// Tokens of this rank, at most the group's `max_tokens` (`ll_max_tokens` in low-latency mode).
    pub tokens: usize,
    /// Experts per token (top-k), `1 ..= max_topk`.
    pub k: usize,
}

impl<'a> From<&'a CudaSlice<bf16>> for Tokens<'a> {
    fn from(x: &'a CudaSlice<bf16>) -> Self {
        Tokens::Bf16(x.as_view())
    }
}

impl<'a> From<CudaView<'a, bf16>> for Tokens<'a> {
    fn from(x: CudaView<'a, bf16>) -> Self {
        Tokens::Bf16(x)
    }
}

/// An FP8 tensor from [`crate::quantize`] (per token group: `[tokens, hidden]` with its scales).
impl<'a> From<&'a crate::quant::Fp8Tensor> for Tokens<'a> {
    fn from(t: &'a crate::quant::Fp8Tensor) -> Self {
        Tokens::Fp8 { q: t.q(), sf: t.sf() }
    }
}

impl<'a> RankInput<'a> {
    /// One rank's input from whole buffers: `x` (a bf16 `CudaSlice` or view, or an
    /// [`crate::Fp8Tensor`]), the router's `topk_idx` and `topk_weights` (`[tokens, k]`). The
    /// token count is given once, by the routing: `topk_idx.len() / k` (0 when `k = 0`); the
    /// dispatch checks `x`, `topk_weights` and a routing length that `k` does not divide against
    /// it, naming the argument. For buffers longer than the tokens (a reused `max_tokens`
    /// allocation), build the struct with views and `tokens` instead.
    pub fn new(x: impl Into<Tokens<'a>>, topk_idx: &'a CudaSlice<i32>, topk_weights: &'a CudaSlice<f32>, k: usize) -> Self {
        let tokens = topk_idx.len().checked_div(k).unwrap_or(0);
        Self { x: x.into(), topk_idx: topk_idx.as_view(), topk_weights: topk_weights.as_view(), tokens, k }
    }
}

/// Received rows: bf16, or e4m3 with f32 1x128 scales in the layout the grouped GEMMs read.
/// Buffers hold at least one element even when no row was received.
pub enum Rows {
    /// bf16 rows.
    Bf16(CudaSlice<bf16>),
    /// E4M3 rows and their scales (shapes: see the owning [`Dispatched`] or [`DispatchedLowLatency`]).
    Fp8 {
        /// E4M3 rows.
        q: CudaSlice<F8E4M3>,
        /// f32 1x128 scales, transposed (one row of scales per 128 columns).
        sf: CudaSlice<f32>,
    },
}

impl Rows {
    /// The bf16 rows, or `None` for FP8 rows.
    pub fn bf16(&self) -> Option<&CudaSlice<bf16>> {
        match self {
            Rows::Bf16(x) => Some(x),
            Rows::Fp8 { .. } => None,
        }
    }

    /// The e4m3 rows and their scales, or `None` for bf16 rows.
    pub fn fp8(&self) -> Option<(&CudaSlice<F8E4M3>, &CudaSlice<f32>)> {
        match self {
            Rows::Fp8 { q, sf } => Some((q, sf)),
            Rows::Bf16(_) => None,
        }
    }

    /// The payload these rows carry.
    pub fn payload(&self) -> Payload {
        match self {
            Rows::Bf16(_) => Payload::Bf16,
            Rows::Fp8 { .. } => Payload::Fp8,
        }
    }
}

/// What one rank's dispatch returned, as combine takes it: a [`Dispatched`], a
/// [`DispatchedLowLatency`], their [`Handle`], or a reference to any of them.
pub trait Received {
    /// The handle combine needs.
    fn handle(&self) -> &Handle;

    /// Rows of the received layout: the expert outputs `y` combine takes are `[rows, hidden]`.
    fn rows(&self) -> usize {
        self.handle().rows
    }
}

impl Received for Handle {
    fn handle(&self) -> &Handle {
        self
    }
}

impl Received for Dispatched {
    fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Received for DispatchedLowLatency {
    fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl<T: Received + ?Sized> Received for &T {
    fn handle(&self) -> &Handle {
        (**self).handle()
    }
}

/// Checks the length of combine's `y` for `rows` received rows: `rows · hidden`, or for a rank
/// that received no rows either no element or one row (CUDA cannot allocate zero bytes; what
/// [`Group::alloc_expert_output`] gives).
fn check_y_len(len: usize, rows: usize, hidden: usize) -> Result<()> {
    if len == rows * hidden || (rows == 0 && len == hidden) {
        return Ok(());
    }
    expect_len("y", len, rows * hidden, || format!("[{rows}, {hidden}] bf16"))
}

/// Where every received row came from, and the source rank's routing: what combine needs.
pub struct Handle {
    rank: usize,
    /// The round that produced it: the epoch of its dispatch kind (normal or low latency).
    round: (usize, u32),
    tokens: usize,
    k: usize,
    /// `[rows]`: packed source `(src_rank · max_tokens + token) · max_topk + slot`, -1 for none.
    src: CudaSlice<i32>,
    rows: usize,
    topk_idx: CudaSlice<i32>,
    topk_weights: CudaSlice<f32>,
    num_invalid: CudaSlice<i32>,
    /// Staged transports (normal mode): the all-gathered counts `[ranks, num_experts]`, each
    /// row's inbox row, and the source's pair positions and tokens per expert.
    staged: Option<StagedHandle>,
}

struct StagedHandle {
    counts: Vec<i32>,
    stage_rows: CudaSlice<i32>,
    pair_pos: CudaSlice<i32>,
    tokens_per_expert: CudaSlice<i32>,
}

impl Handle {
    /// The rank that received the rows (and that sends the expert outputs back in combine).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Rows of the received layout (what combine's `y` must have).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `[rows]` packed sources, -1 on padding (see the C header's `dk_ep_group_t`).
    pub fn src(&self) -> CudaView<'_, i32> {
        self.src.slice(..self.rows)
    }

    /// Slots of this rank's routing that named an expert outside `0 .. num_experts` and were
    /// therefore ignored (synchronises `stream`).
    pub fn invalid_slots(&self, stream: &Arc<CudaStream>) -> Result<usize> {
        Ok(usize::try_from(stream.clone_dtoh(&self.num_invalid)?[0]).unwrap_or(0))
    }
}

/// One rank's result of a normal dispatch, in the contiguous grouped GEMM's layout.
pub struct Dispatched {
    /// `[rows, hidden]` and, for FP8, scales `[hidden / 128, rows]`.
    pub x: Rows,
    /// `[rows]`: local expert of each row, -1 on padding.
    pub m_indices: CudaSlice<i32>,
    /// `[rows]`: the router weight of each row's (token, expert) pair, 0 on padding.
    pub weights: CudaSlice<f32>,
    /// Valid rows per local expert.
    pub counts: Vec<usize>,
    /// Rows of the layout: Σ round_up(count, m_align).
    pub rows: usize,
    /// [`Group::dispatch_with_arrivals`] only: `[rows / ARRIVAL_ROWS]` rows written per block of
    /// [`ARRIVAL_ROWS`] (each reaches it as the receive completes the block), for
    /// [`crate::gemm::gemm_fp8_contiguous_arrived`].
    pub arrivals: Option<CudaSlice<i32>>,
    /// Where every row came from: what [`Group::combine`] needs to send the expert outputs back.
    pub handle: Handle,
}

/// A low-latency dispatch whose send phase is in flight; [`Group::dispatch_low_latency_recv`]
/// completes it.
pub struct PendingLowLatency {
    rank: usize,
    round: u32,
    tokens: usize,
    k: usize,
    /// The routing copies and the invalid-slot counter; taken by the receive that completes it.
    routing: Option<(CudaSlice<i32>, CudaSlice<f32>, CudaSlice<i32>)>,
}

impl PendingLowLatency {
    /// The rank whose send this is.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// One rank's result of a low-latency dispatch, in the masked grouped GEMM's layout.
pub struct DispatchedLowLatency {
    /// `[E_local, capacity, hidden]` and, for FP8, scales `[E_local, hidden / 128,
    /// round_up(capacity, 4)]`. Rows past `masked_m[e]` hold stale data.
    pub x: Rows,
    /// `[E_local]`: valid rows per local expert (device memory).
    pub masked_m: CudaSlice<i32>,
    /// Rows per local expert: `ranks · ll_max_tokens`.
    pub capacity: usize,
    /// Where every row came from: what [`Group::combine_send`] needs to send the outputs back.
    pub handle: Handle,
}

/// An expert-parallel group. See the module docs.
///
/// A `Group` is [`Send`] (it can be built on one thread and used or dropped on another, e.g. one
/// thread per GPU), but not [`Sync`]: every operation takes `&mut self`. What it holds is `Send`:
/// cudarc's streams, contexts and buffers are; a node group's mapped peer buffers are plain device
/// addresses owned by the group alone; an NCCL group's communicator is owned by the group and used
/// by one thread at a time (see the private `SendComm`). The CUDA calls bind the stream's context
/// to whichever thread makes them.
pub struct Group {
    shape: GroupShape,
    layout: SymmetricLayout,
    stream: Arc<CudaStream>,
    storage: Storage,
    peers: CudaSlice<u64>,
    /// The same addresses on the host (0 for ranks this process cannot address: NCCL groups).
    peer_addrs: Vec<u64>,
    /// Per rank and signal kind: the epoch of the last signal sent.
    epochs: Vec<[u32; KINDS]>,
    num_sms: usize,
    sm_count: usize,
    /// Virtual groups with concurrent ranks ([`Group::set_concurrent_ranks`]): one stream per
    /// rank for the normal dispatch's send and receive phases; empty otherwise.
    rank_streams: Vec<Arc<CudaStream>>,
    /// How long a kernel waits for its peers.
    timeout: Duration,
    /// Per rank (local ones only): where it stands in the call order.
    phases: Vec<Phase>,
}

/// Where the group's symmetric buffers live.
enum Storage {
    /// All ranks' buffers, in this process.
    Virtual(Vec<CudaSlice<u8>>),
    /// This rank's buffer (exported) and the peers' (opened through CUDA IPC).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    Node(NodeBuffers),
    /// This rank's buffer only; payloads move with NCCL over the communicator.
    #[cfg(feature = "nccl")]
    Nccl { rank: usize, own: CudaSlice<u8>, comm: SendComm },
}

/// The NCCL communicator of an NCCL group, movable to another thread with its group.
///
/// cudarc's `Comm` is not `Send` only because it holds NCCL's raw `ncclComm_t`. NCCL allows a
/// communicator to be used from any host thread as long as no two threads use it at the same time;
/// the group owns this one, every use goes through the group's `&mut self` methods (or the
/// `&self` of `Group::comm`, and a `Group` is not `Sync`, so no second thread holds one), and
/// `Comm`'s drop (which aborts or destroys the communicator) runs on whichever single thread drops
/// the group. Moving the group therefore never lets two threads use the communicator at once.
#[cfg(feature = "nccl")]
struct SendComm(cudarc::nccl::Comm);

// SAFETY: see the type's docs: exclusive ownership, one thread at a time.
#[cfg(feature = "nccl")]
unsafe impl Send for SendComm {}

#[cfg(feature = "nccl")]
impl std::ops::Deref for SendComm {
    type Target = cudarc::nccl::Comm;
    fn deref(&self) -> &cudarc::nccl::Comm {
        &self.0
    }
}

struct NodeBuffers {
    rank: usize,
    own: u64,
    opened: Vec<u64>,
    ctx: Arc<cudarc::driver::CudaContext>,
}

impl Drop for NodeBuffers {
    /// Runs after `Group::drop`'s barrier (or when a group fails to form, before any peer mapped
    /// this buffer): waits for the context's work, unmaps the peers' buffers, frees this one.
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the context is bound so the calls address it.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        for &p in &self.opened {
            // SAFETY: `p` was returned by cuIpcOpenMemHandle and is closed once, after every use.
            let _ = unsafe { cudarc::driver::sys::cuIpcCloseMemHandle(p) };
        }
        // SAFETY: `own` was allocated by malloc_sync and is freed once, after every use.
        let _ = unsafe { cudarc::driver::result::free_sync(self.own) };
    }
}

/// Blocks a communication kernel uses unless told otherwise (DeepEP's default is 20 to 24).
pub const DEFAULT_NUM_SMS: usize = 24;

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    Ok(stream.alloc_zeros::<T>(n.max(1))?)
}

/// Enqueues every `(dst, src, bytes)` device-to-device copy on `stream`: one `cuMemcpyBatchAsync`
/// (copy engines preferred) where the driver has it (CUDA 13+), else, or if the driver refuses the
/// batch, one `cuMemcpyAsync` each. A copy enqueued twice is harmless: nothing writes the sources
/// before the signals that follow the copies.
///
/// # Safety
/// Every range must lie inside live device memory that `stream`'s context can address.
unsafe fn enqueue_copies(stream: cudarc::driver::sys::CUstream, copies: &[(u64, u64, usize)]) -> Result<()> {
    use cudarc::driver::sys;
    use std::sync::atomic::{AtomicBool, Ordering};
    static BATCH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // Set once the driver refused a batch (e.g. on the legacy default stream): not asked again.
    static REFUSED: AtomicBool = AtomicBool::new(false);
    if copies.is_empty() {
        return Ok(());
    }
    if *BATCH.get_or_init(|| crate::device::driver_version().is_ok_and(|v| v >= (13, 0))) && !REFUSED.load(Ordering::Relaxed) {
        let mut dsts: Vec<u64> = copies.iter().map(|c| c.0).collect();
        let mut srcs: Vec<u64> = copies.iter().map(|c| c.1).collect();
        let mut sizes: Vec<usize> = copies.iter().map(|c| c.2).collect();
        // SAFETY: plain C struct; zero is a valid (no) location hint.
        let mut attrs: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
        attrs.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
        attrs.flags = sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32;
        let mut attrs_idx = [0usize];
        // SAFETY: the three arrays hold `copies.len()` entries; one attribute applies from index
        // 0 to all of them; the ranges are valid (the caller's contract); the driver is 13.0+.
        let r = unsafe {
            sys::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                copies.len(),
                &mut attrs,
                attrs_idx.as_mut_ptr(),
                1,
                stream,
            )
        };
        if r == sys::CUresult::CUDA_SUCCESS {
            return Ok(());
        }
        REFUSED.store(true, Ordering::Relaxed);
    }
    for &(dst, src, bytes) in copies {
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemcpyAsync(dst, src, bytes, stream) }.result()?;
    }
    Ok(())
}

/// The outputs of one rank's normal receive, allocated before any receive runs.
struct RecvBuffers {
    rows: usize,
    x: Rows,
    m_indices: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    src: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    stage_rows: CudaSlice<i32>,
    arrivals: Option<CudaSlice<i32>>,
}

fn expect_len(arg: &'static str, got: usize, want: usize, what: impl FnOnce() -> String) -> Result<()> {
    if got == want { Ok(()) } else { Err(Error::Shape { arg, expected: what(), got: format!("{got} elements") }) }
}

impl Group {
    /// `shape.ranks` virtual ranks on `stream`'s GPU: one zeroed symmetric buffer per rank
    /// ([`Group::bytes_per_rank`] each) and the peer table.
    pub fn new_virtual(stream: &Arc<CudaStream>, shape: GroupShape) -> Result<Self> {
        refuse_nccl(&shape, "Group::new_virtual")?;
        let layout = SymmetricLayout::new(&shape)?;
        let ctx = stream.context();
        let sm_count = usize::try_from(ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)
            .unwrap_or(1)
            .max(1);
        let buffers = (0..shape.ranks).map(|_| alloc::<u8>(stream, layout.bytes)).collect::<Result<Vec<_>>>()?;
        let addrs: Vec<u64> = buffers.iter().map(|b| b.device_ptr(stream).0).collect();
        let peers = stream.clone_htod(&addrs)?;
        Ok(Self {
            shape,
            layout,
            stream: stream.clone(),
            storage: Storage::Virtual(buffers),
            peers,
            peer_addrs: addrs,
            epochs: vec![[0; KINDS]; shape.ranks],
            num_sms: DEFAULT_NUM_SMS.min(sm_count),
            sm_count,
            rank_streams: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            phases: vec![Phase::Idle; shape.ranks],
        })
    }

    /// This process's rank of a node group over `comm` (one process per GPU, `shape.ranks ==
    /// comm.world_size()`): allocates and zeroes this rank's symmetric buffer, exports it with
    /// CUDA IPC, all-gathers the handles over `comm`, and opens every peer's with peer access
    /// enabled. Collective: every rank of `comm` must call it with the same shape. All of the
    /// group's work runs on `comm.stream()`.
    ///
    /// Ranks must call the group's operations in the same order; normal dispatch and combine (or
    /// low-latency dispatch and combine) alternate, which is what keeps a rank from overwriting a
    /// peer's receive buffer before the peer has read it.
    #[cfg(feature = "nccl")]
    pub fn new_node(comm: &cudarc::nccl::Comm, shape: GroupShape) -> Result<Self> {
        use cudarc::driver::sys::{CUipcMem_flags, CUipcMemHandle};
        refuse_nccl(&shape, "Group::new_node")?;
        check_world(&shape, comm)?;
        let layout = SymmetricLayout::new(&shape)?;
        let stream = comm.stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread()?;
        let sm_count = usize::try_from(ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)
            .unwrap_or(1)
            .max(1);
        let rank = comm.rank();
        // cuMemAlloc, not the stream-ordered pool: IPC exports only plain allocations.
        // SAFETY: a fresh allocation of `bytes`, zeroed before anyone can see it; freed by
        // NodeBuffers::drop.
        let own = unsafe { cudarc::driver::result::malloc_sync(layout.bytes) }?;
        let mut node = NodeBuffers { rank, own, opened: Vec::new(), ctx: ctx.clone() };
        // SAFETY: `own` holds `layout.bytes` bytes.
        unsafe { cudarc::driver::result::memset_d8_sync(own, 0, layout.bytes) }?;
        let mut handle = std::mem::MaybeUninit::<CUipcMemHandle>::zeroed();
        // SAFETY: `own` is a live cuMemAlloc allocation; `handle` is written by the call.
        unsafe { cudarc::driver::sys::cuIpcGetMemHandle(handle.as_mut_ptr(), own) }.result()?;
        // SAFETY: initialised by the successful call above.
        let handle = unsafe { handle.assume_init() };
        // Each rank's handle, then its shape's fingerprint: ranks whose shapes differ would lay
        // their buffers out differently, so every rank checks every other's before mapping any.
        let mut bytes: Vec<u8> = handle.reserved.iter().map(|&c| c as u8).collect();
        bytes.extend(shape.fingerprint().to_le_bytes());
        let send = stream.clone_htod(&bytes)?;
        let mut recv = stream.alloc_zeros::<u8>(bytes.len() * shape.ranks)?;
        comm.all_gather(&send, &mut recv).map_err(|e| nccl_error(rank, "all-gather of IPC handles", &e))?;
        let all = stream.clone_dtoh(&recv)?;
        let prints: Vec<u64> = all.chunks_exact(bytes.len()).map(|c| u64::from_le_bytes(c[64..72].try_into().expect("8 bytes"))).collect();
        check_fingerprints(&shape, &prints)?;
        let mut addrs = vec![0u64; shape.ranks];
        for (r, chunk) in all.chunks_exact(bytes.len()).enumerate() {
            if r == rank {
                addrs[r] = own;
                continue;
            }
            let mut peer = CUipcMemHandle { reserved: [0; 64] };
            for (d, &b) in peer.reserved.iter_mut().zip(&chunk[..64]) {
                *d = b as std::ffi::c_char;
            }
            let mut ptr = 0u64;
            // SAFETY: `peer` is a handle exported by rank r of this node; `ptr` receives the
            // mapping, closed by NodeBuffers::drop.
            unsafe {
                cudarc::driver::sys::cuIpcOpenMemHandle_v2(&mut ptr, peer, CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32)
            }
            .result()?;
            node.opened.push(ptr);
            addrs[r] = ptr;
        }
        let peers = stream.clone_htod(&addrs)?;
        Ok(Self {
            shape,
            layout,
            stream,
            storage: Storage::Node(node),
            peers,
            peer_addrs: addrs,
            epochs: vec![[0; KINDS]; shape.ranks],
            num_sms: DEFAULT_NUM_SMS.min(sm_count),
            sm_count,
            rank_streams: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            phases: vec![Phase::Idle; shape.ranks],
        })
    }

    /// This process's rank of a group whose normal-mode payloads move with NCCL grouped
    /// send/receive over `comm` (ranks on other hosts, or GPUs without peer access; world size =
    /// `shape.ranks`). `shape.transport` is set to [`Transport::Nccl`]. No peer memory is mapped:
    /// the counts are all-gathered with NCCL, the send kernel packs this rank's pairs into its
    /// outbox, NCCL moves one run per peer, and the receive kernel lays the rows out as in the
    /// other transports (the results are identical). Low-latency mode needs peer memory and is
    /// refused. Collective: every rank of `comm` calls the group's operations in the same order.
    /// All of the group's work runs on `comm.stream()`; the group keeps the communicator
    /// ([`Group::comm`] lends it back).
    #[cfg(feature = "nccl")]
    pub fn new_nccl(comm: cudarc::nccl::Comm, shape: GroupShape) -> Result<Self> {
        let shape = GroupShape { transport: Transport::Nccl, ..shape };
        check_world(&shape, &comm)?;
        let layout = SymmetricLayout::new(&shape)?;
        let stream = comm.stream();
        let sm_count =
            usize::try_from(stream.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)
                .unwrap_or(1)
                .max(1);
        let rank = comm.rank();
        let send = stream.clone_htod(&shape.fingerprint().to_le_bytes())?;
        let mut recv = stream.alloc_zeros::<u8>(8 * shape.ranks)?;
        comm.all_gather(&send, &mut recv).map_err(|e| nccl_error(rank, "all-gather of the group shapes", &e))?;
        let prints: Vec<u64> =
            stream.clone_dtoh(&recv)?.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        check_fingerprints(&shape, &prints)?;
        let own = alloc::<u8>(&stream, layout.bytes)?;
        let mut addrs = vec![0u64; shape.ranks];
        addrs[rank] = own.device_ptr(&stream).0;
        let peers = stream.clone_htod(&addrs)?;
        Ok(Self {
            shape,
            layout,
            stream: stream.clone(),
            storage: Storage::Nccl { rank, own, comm: SendComm(comm) },
            peers,
            peer_addrs: addrs,
            epochs: vec![[0; KINDS]; shape.ranks],
            num_sms: DEFAULT_NUM_SMS.min(sm_count),
            sm_count,
            rank_streams: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            phases: vec![Phase::Idle; shape.ranks],
        })
    }

    /// The NCCL communicator of a group built by [`Group::new_nccl`].
    #[cfg(feature = "nccl")]
    pub fn comm(&self) -> Option<&cudarc::nccl::Comm> {
        match &self.storage {
            Storage::Nccl { comm, .. } => Some(&comm.0),
            _ => None,
        }
    }

    /// Dissolves an NCCL group and returns its communicator (after the group's work is done:
    /// synchronises the stream); `None` for other groups.
    #[cfg(feature = "nccl")]
    pub fn into_comm(mut self) -> Option<cudarc::nccl::Comm> {
        let _ = self.stream.synchronize();
        if !matches!(self.storage, Storage::Nccl { .. }) {
            return None;
        }
        // What remains of the group is dropped as an empty virtual group (nothing to tear down).
        match std::mem::replace(&mut self.storage, Storage::Virtual(Vec::new())) {
            Storage::Nccl { comm, .. } => Some(comm.0),
            _ => None,
        }
    }

    /// How this group's normal-mode payloads move.
    pub fn transport(&self) -> Transport {
        self.shape.transport
    }

    /// The ranks whose buffers live in this process: all of them for virtual ranks, one for a
    /// node group. Every all-ranks call takes one input per local rank, in this order.
    pub fn local_ranks(&self) -> Vec<usize> {
        match &self.storage {
            Storage::Virtual(b) => (0..b.len()).collect(),
            Storage::Node(n) => vec![n.rank],
            #[cfg(feature = "nccl")]
            Storage::Nccl { rank, .. } => vec![*rank],
        }
    }

    /// `len` bytes at `offset` of local rank `rank`'s buffer (synchronises the stream).
    fn read_local(&self, rank: usize, offset: usize, len: usize) -> Result<Vec<u8>> {
        match &self.storage {
            Storage::Virtual(b) => Ok(self.stream.clone_dtoh(&b[rank].slice(offset..offset + len))?),
            Storage::Node(n) => {
                // On the group's stream, not a synchronous copy: that one would also wait for
                // the context's other streams, where a consumer may wait for this rank's sends.
                let mut v = vec![0u8; len];
                // SAFETY: offset + len lies inside the buffer (offsets from self.layout); `v`
                // outlives the copy (the stream is synchronised before it is returned).
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut v, n.own + offset as u64, self.stream.cu_stream()) }?;
                self.stream.synchronize()?;
                Ok(v)
            }
            #[cfg(feature = "nccl")]
            Storage::Nccl { own, .. } => Ok(self.stream.clone_dtoh(&own.slice(offset..offset + len))?),
        }
    }

    fn check_local(&self, rank: usize) -> Result<()> {
        if self.local_ranks().contains(&rank) {
            Ok(())
        } else {
            Err(Error::InvalidArgument { arg: "rank", reason: format!("rank {rank}'s buffer is not in this process") })
        }
    }

    /// Checks that `n` inputs match the local ranks.
    fn check_local_count(&self, arg: &'static str, n: usize) -> Result<Vec<usize>> {
        let local = self.local_ranks();
        if n == local.len() {
            Ok(local)
        } else {
            Err(Error::Shape { arg, expected: format!("one per local rank ({})", local.len()), got: n.to_string() })
        }
    }

    /// The shape the group was created with (the same on every rank).
    pub fn shape(&self) -> &GroupShape {
        &self.shape
    }

    /// The stream every kernel of this group runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Bytes of one rank's symmetric buffer.
    pub fn bytes_per_rank(&self) -> usize {
        self.layout.bytes
    }

    /// Virtual groups: whether each rank's normal-dispatch send and receive run on a stream of
    /// the rank's own, as ranks on separate GPUs do, instead of every rank's send and then every
    /// rank's receive on the group's stream. Then a receive really waits, on the device, for the
    /// other ranks' signals, which is what exercises the signal protocol in tests (one stream
    /// orders the phases by itself). The rank streams fork from the group's stream once the
    /// outputs exist and join back before [`Group::dispatch`] returns; results are identical.
    ///
    /// Every rank's send and receive kernels may then be resident at once (up to 2 × ranks ×
    /// [`Group::num_sms`] blocks): a receive spins until all sends have signalled, so the GPU
    /// must have room for them all (a receive that never sees its peers reports a timeout
    /// through [`Group::check`]). Only the peer transport runs concurrently; the staged
    /// transports move rows on the group's stream and ignore the setting. Not for node or NCCL
    /// groups, whose ranks are separate processes already.
    pub fn set_concurrent_ranks(&mut self, on: bool) -> Result<()> {
        if !matches!(self.storage, Storage::Virtual(_)) {
            return Err(Error::InvalidArgument { arg: "on", reason: "concurrent ranks are for virtual groups".into() });
        }
        self.rank_streams =
            if on { (0..self.shape.ranks).map(|_| self.stream.fork()).collect::<std::result::Result<Vec<_>, _>>()? } else { Vec::new() };
        Ok(())
    }

    /// How long a kernel waits for its peers' signals before it gives up, poisons what it would
    /// have produced and reports the rank it waited for ([`Group::check`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the wait limit ([`DEFAULT_TIMEOUT`], 100 s, unless set): from 1 µs to about 290 years.
    /// Every rank should use the same. A short limit turns a slow peer into an error; a long one
    /// keeps a dead peer's group waiting that long before anything is reported.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        if timeout < Duration::from_micros(1) || i64::try_from(timeout.as_nanos()).is_err() {
            return Err(Error::InvalidArgument { arg: "timeout", reason: format!("{timeout:?} is outside 1 µs ..= 2^63 ns") });
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Blocks each communication kernel launches (one per SM).
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// Sets how many SMs a communication kernel may use: 1 up to the device's SM count.
    pub fn set_num_sms(&mut self, num_sms: usize) -> Result<()> {
        if num_sms == 0 || num_sms > self.sm_count {
            return Err(Error::InvalidArgument {
                arg: "num_sms",
                reason: format!("{num_sms} is outside 1..={} (the device's SMs)", self.sm_count),
            });
        }
        self.num_sms = num_sms;
        Ok(())
    }

    fn params(&self, rank: usize, epoch: u32, peers: u64) -> ffi::dk_ep_group {
        let s = &self.shape;
        let l = &self.layout;
        // Every value was range-checked by GroupShape::validate (all below 2^31).
        let i = |v: usize| v as i32;
        let o = |v: usize| v as i64;
        ffi::dk_ep_group {
            peers: peers as *const *mut std::os::raw::c_void,
            rank: i(rank),
            ranks: i(s.ranks),
            num_experts: i(s.num_experts),
            hidden: i(s.hidden),
            max_tokens: i(s.max_tokens),
            ll_max_tokens: i(s.ll_max_tokens),
            max_topk: i(s.max_topk),
            m_align: i(s.m_align),
            num_sms: i(self.num_sms),
            recv_rows: o(s.recv_rows),
            payload: match s.payload {
                Payload::Bf16 => ffi::dk_ep_payload::DK_EP_PAYLOAD_BF16,
                Payload::Fp8 => ffi::dk_ep_payload::DK_EP_PAYLOAD_FP8,
            },
            epoch,
            off_signals: o(l.signals),
            off_counts: o(l.counts),
            off_ll_counts: o(l.ll_counts),
            off_recv_x: o(l.recv_x),
            off_recv_sf: o(l.recv_sf),
            off_recv_weight: o(l.recv_weight),
            off_recv_src: o(l.recv_src),
            off_ll_x: o(l.ll_x),
            off_ll_sf: o(l.ll_sf),
            off_ll_src: o(l.ll_src),
            off_comb: o(l.comb),
            staged: i32::from(s.transport.staged()),
            reserved: 0,
            off_out_x: o(l.out_x),
            off_out_sf: o(l.out_sf),
            off_out_weight: o(l.out_weight),
            off_out_src: o(l.out_src),
            off_ret: o(l.ret),
            // Checked by set_timeout: 1 µs ..= 2^63 - 1 ns.
            timeout_ns: i64::try_from(self.timeout.as_nanos()).unwrap_or(i64::MAX),
        }
    }

    /// Refuses `call` unless local rank `rank` stands at `want` in the call order.
    fn expect_phase(&self, call: &'static str, rank: usize, want: Phase) -> Result<()> {
        let now = self.phases[rank];
        if now == want {
            return Ok(());
        }
        let next = match now {
            Phase::Idle => "dispatch first",
            Phase::LowLatencySent => "call dispatch_low_latency_recv first",
            Phase::Received => "combine (combine_send, then combine_recv) first",
            Phase::CombineSent => "call combine_recv first",
        };
        Err(Error::InvalidArgument { arg: call, reason: format!("out of order: rank {rank} {}; {next}", now.state()) })
    }

    /// Virtual groups run every rank on one stream: a receive of signal `kind` enqueued before some
    /// rank's send of this round would wait for work queued behind it. Refuses such a `call`.
    fn expect_all_sent(&self, call: &'static str, rank: usize, kind: usize) -> Result<()> {
        if !matches!(self.storage, Storage::Virtual(_)) {
            return Ok(());
        }
        let round = self.epochs[rank][kind];
        match (0..self.shape.ranks).find(|&r| self.epochs[r][kind] != round) {
            None => Ok(()),
            Some(r) => Err(Error::InvalidArgument {
                arg: call,
                reason: format!(
                    "out of order: rank {r} has not enqueued its send of this round; on virtual ranks every rank's send must come before any rank's receive"
                ),
            }),
        }
    }

    fn bump(&mut self, rank: usize, kind: usize) -> u32 {
        let e = &mut self.epochs[rank][kind];
        *e = e.wrapping_add(1);
        *e
    }

    /// Checks one rank's input against the group's shape (`low_latency`: the token limit).
    fn validate_input(&self, input: &RankInput<'_>, low_latency: bool) -> Result<()> {
        let s = &self.shape;
        let limit = if low_latency { s.ll_max_tokens } else { s.max_tokens };
        if input.tokens > limit {
            let which = if low_latency { "ll_max_tokens" } else { "max_tokens" };
            return Err(Error::InvalidArgument {
                arg: "tokens",
                reason: format!("{} exceeds the group's {which} = {limit}", input.tokens),
            });
        }
        if input.k == 0 || input.k > s.max_topk {
            return Err(Error::InvalidArgument {
                arg: "k",
                reason: format!("{} is outside 1..={} (the group's max_topk)", input.k, s.max_topk),
            });
        }
        let pairs = input.tokens * input.k;
        expect_len("topk_idx", input.topk_idx.len(), pairs, || format!("[{}, {}] i32", input.tokens, input.k))?;
        expect_len("topk_weights", input.topk_weights.len(), pairs, || format!("[{}, {}] f32", input.tokens, input.k))?;
        let elements = input.tokens * s.hidden;
        match (&input.x, s.payload) {
            (Tokens::Bf16(x), Payload::Bf16) => {
                expect_len("x", x.len(), elements, || format!("[{}, {}] bf16", input.tokens, s.hidden))?;
                check_aligned("x", x.device_ptr(&self.stream).0, 16)
            }
            (Tokens::Fp8 { q, sf }, Payload::Fp8) => {
                expect_len("x", q.len(), elements, || format!("[{}, {}] e4m3", input.tokens, s.hidden))?;
                let want = s.hidden / GROUP * tma_aligned_rows(input.tokens);
                expect_len("x_sf", sf.len(), want, || {
                    format!("[{}, {}] f32 (transposed)", s.hidden / GROUP, tma_aligned_rows(input.tokens))
                })?;
                check_aligned("x", q.device_ptr(&self.stream).0, 16)
            }
            (Tokens::Bf16(_), Payload::Fp8) => Err(Error::Dtype { arg: "x", expected: "e4m3 with scales", got: "bf16" }),
            (Tokens::Fp8 { .. }, Payload::Bf16) => Err(Error::Dtype { arg: "x", expected: "bf16", got: "e4m3" }),
        }
    }

    /// Layout and pair positions of one rank's routing, plus device copies of the routing.
    fn prepare(&self, input: &RankInput<'_>) -> Result<Prepared> {
        let cfg = EpConfig { ranks: self.shape.ranks, num_experts: self.shape.num_experts, m_align: self.shape.m_align };
        let mut dl = DeviceLayout::new(&self.stream, input.tokens, cfg)?;
        layout(&self.stream, &input.topk_idx, input.k, &mut dl)?;
        let pairs = input.tokens * input.k;
        let mut pos = alloc::<i32>(&self.stream, pairs)?;
        let mut topk_idx = alloc::<i32>(&self.stream, pairs)?;
        let mut topk_weights = alloc::<f32>(&self.stream, pairs)?;
        if pairs > 0 {
            self.stream.memcpy_dtod(&input.topk_idx, &mut topk_idx.slice_mut(..pairs))?;
            self.stream.memcpy_dtod(&input.topk_weights, &mut topk_weights.slice_mut(..pairs))?;
            let mut launch = Launch::new("ep_pair_positions", &self.stream)?;
            let params = ffi::dk_ep_pair_positions_params {
                topk_idx: launch.input(&topk_idx) as *const i32,
                pair_pos: launch.output(&mut pos) as *mut i32,
                tokens: int_arg("tokens", input.tokens)?,
                k: int_arg("k", input.k)?,
                num_experts: int_arg("num_experts", self.shape.num_experts)?,
            };
            let s = launch.stream();
            // SAFETY: topk_idx and pos hold tokens·k elements; launch keeps them alive until enqueued.
            let status = ffi_call!(unsafe dk_ep_pair_positions(&params, s));
            launch.finish(status)?;
        }
        Ok(Prepared { layout: dl, pos, topk_idx, topk_weights, tokens: input.tokens, k: input.k })
    }

    /// Runs a send-phase launcher (`dk_ep_dispatch_send` or `dk_ep_ll_dispatch_send`) on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn send_tokens(
        &self,
        stream: &Arc<CudaStream>,
        kernel: &'static str,
        rank: usize,
        epoch: u32,
        input: &RankInput<'_>,
        prep: &Prepared,
        low_latency: bool,
    ) -> Result<()> {
        let mut launch = Launch::new(kernel, stream)?;
        let peers = launch.input(&self.peers);
        let (x, x_sf) = match &input.x {
            Tokens::Bf16(x) => (launch.input(x), 0),
            Tokens::Fp8 { q, sf } => (launch.input(q), launch.input(sf)),
        };
        let params = ffi::dk_ep_dispatch_send_params {
            group: self.params(rank, epoch, peers),
            tokens: ffi::dk_ep_tokens {
                x: x as *const std::os::raw::c_void,
                x_sf: x_sf as *const f32,
                x_sf_stride: tma_aligned_rows(input.tokens) as i64,
                topk_idx: launch.input(&prep.topk_idx) as *const i32,
                topk_weights: launch.input(&prep.topk_weights) as *const f32,
                tokens_per_expert: launch.input(&prep.layout.tokens_per_expert) as *const i32,
                pair_pos: launch.input(&prep.pos) as *const i32,
                tokens: int_arg("tokens", input.tokens)?,
                k: int_arg("k", input.k)?,
            },
        };
        let s = launch.stream();
        // SAFETY: the inputs were validated against the group's shape; the peer table addresses
        // this group's live symmetric buffers, laid out by `self.layout`; launch keeps the inputs
        // alive until the kernel is enqueued.
        // Without kernels both branches are the same NOT_BUILT sentinel.
        #[allow(clippy::if_same_then_else)]
        let status = if low_latency {
            ffi_call!(unsafe dk_ep_ll_dispatch_send(&params, s))
        } else {
            ffi_call!(unsafe dk_ep_dispatch_send(&params, s))
        };
        launch.finish(status)
    }

    /// Normal dispatch: one input per local rank ([`Group::local_ranks`]: every rank of a virtual
    /// group, this process's rank of a node group). Synchronises the stream once, to size the
    /// outputs from the all-gathered counts (in a node group after waiting, on the device, for
    /// every rank's counts). Errors, before any data moves, if a slot names an expert outside
    /// `0 .. num_experts` or a rank would receive more than `recv_rows` rows (every rank sees the
    /// same counts, so all refuse together; an invalid index is seen by its own rank only, and
    /// the peers of a node group then time out waiting for it, which [`Group::check`] reports).
    pub fn dispatch(&mut self, inputs: &[RankInput<'_>]) -> Result<Vec<Dispatched>> {
        self.dispatch_impl(inputs, None)
    }

    /// [`Group::dispatch`] for a consumer that starts before the receive ends: the receive also
    /// counts, per 128-row block of each output, the rows it has written
    /// ([`Dispatched::arrivals`], release semantics), and
    /// [`crate::gemm::gemm_fp8_contiguous_arrived`] on `consumer` starts each tile as soon as its
    /// block is complete, while the receive still runs on the group's stream.
    ///
    /// Ordering: `consumer` waits (an event) for the outputs' allocation, never for a receive.
    /// `x`, `m_indices` and `arrivals` of the results are recorded (for cudarc's cross-stream
    /// tracking) as written on `consumer` at this call, before the receive has finished; their
    /// rows are only safe to read through the arrival counters, i.e. with
    /// `gemm_fp8_contiguous_arrived` on `consumer`, or after `consumer` has waited for the group's
    /// stream. Work enqueued on `consumer` after such a GEMM sees every row (the GEMM waits for
    /// every block). `weights`, `counts` and the handle are ordinary outputs of the group's stream.
    /// Requires `m_align` to be a multiple of [`ARRIVAL_ROWS`] and `consumer` to be another stream
    /// of the group's context.
    pub fn dispatch_with_arrivals(&mut self, inputs: &[RankInput<'_>], consumer: &Arc<CudaStream>) -> Result<Vec<Dispatched>> {
        if !self.shape.m_align.is_multiple_of(ARRIVAL_ROWS) {
            return Err(Error::InvalidArgument {
                arg: "m_align",
                reason: format!("{} is not a multiple of the arrival counters' {ARRIVAL_ROWS}-row blocks", self.shape.m_align),
            });
        }
        if **consumer == *self.stream || !Arc::ptr_eq(consumer.context(), self.stream.context()) {
            return Err(Error::InvalidArgument { arg: "consumer", reason: "must be another stream of the group's context".into() });
        }
        self.dispatch_impl(inputs, Some(consumer))
    }

    fn dispatch_impl(&mut self, inputs: &[RankInput<'_>], consumer: Option<&Arc<CudaStream>>) -> Result<Vec<Dispatched>> {
        let local = self.check_local_count("inputs", inputs.len())?;
        inputs.iter().try_for_each(|i| self.validate_input(i, false))?;
        local.iter().try_for_each(|&rank| self.expect_phase("dispatch", rank, Phase::Idle))?;
        let preps = inputs.iter().map(|i| self.prepare(i)).collect::<Result<Vec<_>>>()?;
        for (&rank, prep) in local.iter().zip(&preps) {
            // One epoch per round: the send waits for NOTIFY and signals DISPATCH at the same one,
            // so a round refused between the two leaves the counters equal.
            let epoch = self.bump(rank, NOTIFY);
            self.epochs[rank][DISPATCH] = epoch;
            #[cfg(feature = "nccl")]
            if matches!(self.storage, Storage::Nccl { .. }) {
                self.nccl_notify(rank, prep)?;
                continue;
            }
            let mut launch = Launch::new("ep_dispatch_notify", &self.stream)?;
            let peers = launch.input(&self.peers);
            let params = ffi::dk_ep_notify_params {
                group: self.params(rank, epoch, peers),
                tokens_per_expert: launch.input(&prep.layout.tokens_per_expert) as *const i32,
                num_invalid: launch.input(&prep.layout.num_invalid) as *const i32,
            };
            let s = launch.stream();
            // SAFETY: as in send_tokens; tokens_per_expert has num_experts elements, num_invalid 1.
            let status = ffi_call!(unsafe dk_ep_dispatch_notify(&params, s));
            launch.finish(status)?;
        }
        let first = local[0];
        if matches!(self.storage, Storage::Node(_)) {
            // The other ranks are other processes: wait on the device for their counts.
            let mut launch = Launch::new("ep_wait", &self.stream)?;
            let peers = launch.input(&self.peers);
            let params = ffi::dk_ep_wait_params { group: self.params(first, self.epochs[first][NOTIFY], peers), kind: NOTIFY as i32 };
            let s = launch.stream();
            // SAFETY: as in send_tokens; the kernel only reads this rank's signals.
            let status = ffi_call!(unsafe dk_ep_wait(&params, s));
            launch.finish(status)?;
        }
        // Every rank holds the same all-gathered counts, invalid-slot counts and error bits once all
        // notifies ran, so every rank refuses a round together, and the epochs stay in step.
        let (r, e) = (self.shape.ranks, self.shape.num_experts);
        let slot = notify_slot(self.epochs[first][NOTIFY]);
        let bytes = self.read_local(first, self.layout.counts + slot * r * e * 4, r * e * 4)?;
        let counts: Vec<i32> = bytes.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
        for &rank in &local {
            let (bits, timeout) = self.read_errors(rank)?;
            if bits & ffi::DK_EP_ERROR_TIMEOUT != 0 {
                return Err(self.error_of(rank, bits, timeout));
            }
        }
        // This round's invalid-slot counts, then its error bits, side by side: one read.
        let notified = self.read_words(first, ffi::DK_EP_NOTIFY_INVALID_WORD as usize + slot * NOTIFY_SLOT_WORDS, NOTIFY_SLOT_WORDS)?;
        let (invalid, published) = notified.split_at(MAX_RANKS);
        let publishable = ffi::DK_EP_ERROR_TIMEOUT | ffi::DK_EP_ERROR_OVERFLOW;
        if let Some(s) = (0..r).find(|&s| published[s] & publishable != 0) {
            return Err(Error::Communication {
                rank: s,
                reason: format!(
                    "an earlier operation of this rank failed ({}) and its error has not been cleared; every rank refuses this dispatch until Group::check on rank {s} reads and clears it",
                    describe_bits(published[s] & publishable)
                ),
            });
        }
        if let Some(s) = (0..r).find(|&s| invalid[s] != 0) {
            return Err(Error::InvalidArgument {
                arg: "topk_idx",
                reason: format!("rank {s}: {} slots name experts outside -1..{e} (every rank refuses this dispatch)", invalid[s]),
            });
        }
        let plans: Vec<_> = (0..r).map(|d| normal_rows(&self.shape, &counts, d)).collect();
        if let Some((d, p)) = plans.iter().enumerate().find(|(_, p)| p.rows > self.shape.recv_rows) {
            return Err(Error::InvalidArgument {
                arg: "recv_rows",
                reason: format!("rank {d} would receive {} rows, more than the group's recv_rows = {}", p.rows, self.shape.recv_rows),
            });
        }
        // Every local rank's outputs exist before the first send: with a consumer, its stream
        // waits here (explicitly, whatever cudarc tracks) for these allocations only, not for any
        // receive.
        let buffers = local.iter().map(|&rank| self.alloc_recv(plans[rank].rows, consumer.is_some())).collect::<Result<Vec<_>>>()?;
        if let Some(c) = consumer {
            c.wait(&self.stream.record_event(None)?)?;
        }
        let concurrent = !self.rank_streams.is_empty() && !self.shape.transport.staged();
        let streams: Vec<Arc<CudaStream>> =
            local.iter().map(|&rank| if concurrent { self.rank_streams[rank].clone() } else { self.stream.clone() }).collect();
        if concurrent {
            let forked = self.stream.record_event(None)?;
            for s in &self.rank_streams {
                s.wait(&forked)?;
            }
        }
        let result = self.dispatch_phases(inputs, &local, &streams, preps, buffers, &plans, &counts, consumer);
        if concurrent {
            // Joined whether or not an enqueue failed: later work on the group's stream (and a
            // drop of anything the phases used) comes after every rank's.
            for s in &self.rank_streams {
                self.stream.join(s)?;
            }
        }
        if result.is_ok() {
            local.iter().for_each(|&rank| self.phases[rank] = Phase::Received);
        }
        result
    }

    /// NCCL groups: all-gathers this rank's counts, invalid-slot count and error word into its
    /// own buffer, where the notify kernel of the other groups writes them into every peer's.
    #[cfg(feature = "nccl")]
    fn nccl_notify(&mut self, rank: usize, prep: &Prepared) -> Result<()> {
        let (r, e) = (self.shape.ranks, self.shape.num_experts);
        let l = self.layout;
        let slot = notify_slot(self.epochs[rank][NOTIFY]);
        let stream = self.stream.clone();
        let Storage::Nccl { own, comm, .. } = &mut self.storage else {
            return Ok(());
        };
        let nccl = |what: &str, err: cudarc::nccl::result::NcclError| nccl_error(rank, &format!("all-gather of {what}"), &err);
        let word = |w: u32| l.signals + w as usize * 4;
        // The error word as it stands on the stream (the readers ignore DK_EP_ERROR_PEER).
        let mut error = stream.alloc_zeros::<u32>(1)?;
        let at = word(ffi::DK_EP_ERROR_WORD);
        let src = own.slice(at..at + 4);
        // SAFETY: 4 bytes, 4-byte aligned (regions are 256-aligned), any bits are a valid u32.
        stream.memcpy_dtod(&unsafe { src.transmute::<u32>(1) }.expect("one u32"), &mut error)?;
        let at = l.counts + slot * r * e * 4;
        let mut counts = own.slice_mut(at..at + r * e * 4);
        // SAFETY: the counts region holds NOTIFY_SLOTS tables of r·e i32 (4-byte aligned: regions
        // are 256-aligned).
        let mut counts = unsafe { counts.transmute_mut::<i32>(r * e) }.expect("the counts region holds ranks × experts i32");
        comm.all_gather(&prep.layout.tokens_per_expert.slice(..e), &mut counts).map_err(|err| nccl("counts", err))?;
        let at = word(ffi::DK_EP_NOTIFY_INVALID_WORD) + slot * NOTIFY_SLOT_WORDS * 4;
        let mut invalid = own.slice_mut(at..at + r * 4);
        // SAFETY: the signals region holds MAX_RANKS invalid-slot words from `at`.
        let mut invalid = unsafe { invalid.transmute_mut::<i32>(r) }.expect("ranks i32");
        comm.all_gather(&prep.layout.num_invalid, &mut invalid).map_err(|err| nccl("invalid slots", err))?;
        let at = word(ffi::DK_EP_NOTIFY_ERROR_WORD) + slot * NOTIFY_SLOT_WORDS * 4;
        let mut published = own.slice_mut(at..at + r * 4);
        // SAFETY: the signals region holds MAX_RANKS notify error words from `at`.
        let mut published = unsafe { published.transmute_mut::<u32>(r) }.expect("ranks u32");
        comm.all_gather(&error, &mut published).map_err(|err| nccl("error words", err))?;
        // The receive kernels look for published errors where a peer's signal leaves them.
        let (from, to) = (at, word(ffi::DK_EP_PEER_ERROR_WORD));
        let (mut head, tail) = own.split_at_mut(from);
        stream.memcpy_dtod(&tail.slice(..r * 4), &mut head.slice_mut(to..to + r * 4))?;
        Ok(())
    }

    /// `n` u32 words of local rank `rank`'s signals region from word `first` (synchronises).
    fn read_words(&self, rank: usize, first: usize, n: usize) -> Result<Vec<u32>> {
        let bytes = self.read_local(rank, self.layout.signals + first * 4, n * 4)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Local rank `rank`'s error bits and timeout word (synchronises).
    fn read_errors(&self, rank: usize) -> Result<(u32, u32)> {
        let w = self.read_words(rank, ffi::DK_EP_ERROR_WORD as usize, 2)?;
        Ok((w[0], w[1]))
    }

    /// The error that local rank `rank`'s error bits and timeout word describe.
    fn error_of(&self, rank: usize, bits: u32, timeout: u32) -> Error {
        let mut what = Vec::new();
        if bits & ffi::DK_EP_ERROR_TIMEOUT != 0 {
            what.push(match timeout.checked_sub(1) {
                Some(w) => {
                    let (kind, src) = (w as usize / MAX_RANKS, w as usize % MAX_RANKS);
                    format!(
                        "rank {src} did not signal {} within the timeout ({:?}); the outputs that waited for it were poisoned (NaN)",
                        KIND_NAMES.get(kind).unwrap_or(&"?"),
                        self.timeout
                    )
                }
                None => "a peer did not signal within the timeout".to_string(),
            });
        }
        let rest = bits & !ffi::DK_EP_ERROR_TIMEOUT;
        if rest != 0 {
            what.push(describe_bits(rest));
        }
        Error::Communication { rank, reason: what.join("; ") }
    }

    /// Zeroes local rank `rank`'s error and timeout words (on the stream, ordered after its work).
    fn clear_errors(&mut self, rank: usize) -> Result<()> {
        let at = self.layout.signals + ffi::DK_EP_ERROR_WORD as usize * 4;
        let zeros = [0u8; 8];
        match &mut self.storage {
            Storage::Virtual(b) => self.stream.memcpy_htod(&zeros, &mut b[rank].slice_mut(at..at + 8))?,
            Storage::Node(n) => {
                // SAFETY: the two words lie inside this rank's live buffer; `zeros` outlives the
                // copy (the stream is synchronised before it goes out of scope).
                unsafe { cudarc::driver::result::memcpy_htod_async(n.own + at as u64, &zeros, self.stream.cu_stream()) }?;
                self.stream.synchronize()?;
            }
            #[cfg(feature = "nccl")]
            Storage::Nccl { own, .. } => self.stream.memcpy_htod(&zeros, &mut own.slice_mut(at..at + 8))?,
        }
        Ok(())
    }

    /// The send and receive phases of a normal dispatch, each local rank's on `streams[i]`.
    #[allow(clippy::too_many_arguments)]
    fn dispatch_phases(
        &mut self,
        inputs: &[RankInput<'_>],
        local: &[usize],
        streams: &[Arc<CudaStream>],
        preps: Vec<Prepared>,
        buffers: Vec<RecvBuffers>,
        plans: &[crate::plan::ep::NormalRows],
        counts: &[i32],
        consumer: Option<&Arc<CudaStream>>,
    ) -> Result<Vec<Dispatched>> {
        for ((&rank, stream), (input, prep)) in local.iter().zip(streams).zip(inputs.iter().zip(&preps)) {
            let epoch = self.epochs[rank][DISPATCH];
            self.send_tokens(stream, "ep_dispatch_send", rank, epoch, input, prep, false)?;
        }
        if self.shape.transport.staged() {
            self.move_runs(local, counts, Direction::Dispatch)?;
        }
        let mut out = Vec::with_capacity(local.len());
        for (((&rank, stream), prep), bufs) in local.iter().zip(streams).zip(preps).zip(buffers) {
            let plan = &plans[rank];
            out.push(self.dispatch_recv(stream, rank, prep, bufs, plan.counts.clone(), counts, consumer)?);
        }
        Ok(out)
    }

    /// Zeroed outputs of one rank's receive of `rows` rows (with `arrivals`: its counters too).
    fn alloc_recv(&self, rows: usize, arrivals: bool) -> Result<RecvBuffers> {
        let h = self.shape.hidden;
        let staged = self.shape.transport.staged();
        Ok(RecvBuffers {
            rows,
            x: match self.shape.payload {
                Payload::Bf16 => Rows::Bf16(alloc(&self.stream, rows * h)?),
                Payload::Fp8 => Rows::Fp8 { q: alloc(&self.stream, rows * h)?, sf: alloc(&self.stream, h / GROUP * rows)? },
            },
            m_indices: alloc(&self.stream, rows)?,
            weights: alloc(&self.stream, rows)?,
            src: alloc(&self.stream, rows)?,
            counts: alloc(&self.stream, self.shape.experts_per_rank())?,
            stage_rows: alloc(&self.stream, if staged { rows } else { 0 })?,
            arrivals: if arrivals { Some(alloc(&self.stream, rows / ARRIVAL_ROWS)?) } else { None },
        })
    }

    /// Staged transports: moves every local rank's runs (dispatch: outbox → peers' inboxes;
    /// combine: return region → peers' comb regions) and writes the signals the receive kernels
    /// wait on, with copy engines or NCCL. `ranks` are the local ranks that send.
    fn move_runs(&mut self, ranks: &[usize], counts: &[i32], dir: Direction) -> Result<()> {
        let (r, h) = (self.shape.ranks, self.shape.hidden);
        let l = self.layout;
        let kb = h / GROUP;
        let fp8 = self.shape.payload == Payload::Fp8;
        // (byte offset of the source region, of the destination region, bytes per row) per array.
        let arrays: Vec<(usize, usize, usize)> = match dir {
            Direction::Dispatch => {
                let mut a = vec![
                    (l.out_x, l.recv_x, self.shape.payload.row_bytes(h)),
                    (l.out_weight, l.recv_weight, 4),
                    (l.out_src, l.recv_src, 4),
                ];
                if fp8 {
                    a.push((l.out_sf, l.recv_sf, kb * 4));
                }
                a
            }
            Direction::Combine => vec![(l.ret, l.comb, 2 * h)],
        };
        let kind = match dir {
            Direction::Dispatch => DISPATCH,
            Direction::Combine => COMBINE,
        };
        // The run from `s` to `d`: (first row read on the sender, first row written on the
        // receiver, rows). Combine runs go back the way dispatch came.
        let run = |s: usize, d: usize| match dir {
            Direction::Dispatch => {
                let x = staged_run(&self.shape, counts, s, d);
                (x.outbox_row, x.inbox_row, x.rows)
            }
            Direction::Combine => {
                let x = staged_run(&self.shape, counts, d, s);
                (x.inbox_row, x.outbox_row, x.rows)
            }
        };
        let signal_word = |base: u64, src: usize| base + (l.signals + (kind * MAX_RANKS + src) * 4) as u64;
        let stream = self.stream.cu_stream();
        match &mut self.storage {
            Storage::Virtual(_) | Storage::Node(_) => {
                for &s in ranks {
                    // Every run and array of source s, as one batch of copies.
                    let mut copies = Vec::with_capacity(r * arrays.len());
                    for d in 0..r {
                        let (from, to, rows) = run(s, d);
                        // An empty run copies nothing (its signal below is still written).
                        if rows == 0 {
                            continue;
                        }
                        for &(src_off, dst_off, row) in &arrays {
                            let src = self.peer_addrs[s] + (src_off + from * row) as u64;
                            let dst = self.peer_addrs[d] + (dst_off + to * row) as u64;
                            copies.push((dst, src, rows * row));
                        }
                    }
                    // SAFETY: every range lies inside a live symmetric buffer: the runs tile the
                    // outbox / return region and the inbox / comb region, whose sizes the layout
                    // planned for the worst case (checked against recv_rows).
                    unsafe { enqueue_copies(stream, &copies) }?;
                    for d in 0..r {
                        let epoch = self.epochs[s][kind];
                        // SAFETY: the signal word lies in rank d's live buffer; the write is
                        // ordered after the copies above (default flags include the fence).
                        unsafe {
                            cudarc::driver::sys::cuStreamWriteValue32_v2(
                                stream,
                                signal_word(self.peer_addrs[d], s),
                                epoch,
                                cudarc::driver::sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                            )
                        }
                        .result()?;
                    }
                }
            }
            #[cfg(feature = "nccl")]
            Storage::Nccl { rank, own, comm } => {
                let me = *rank;
                let nccl = |e: cudarc::nccl::result::NcclError| nccl_error(me, "grouped send/receive", &e);
                cudarc::nccl::result::group_start().map_err(nccl)?;
                let moved = (|| {
                    for peer in 0..r {
                        let (from, _, rows) = run(me, peer);
                        let (_, to, in_rows) = run(peer, me);
                        for &(src_off, dst_off, row) in &arrays {
                            if rows > 0 {
                                comm.send(&own.slice(src_off + from * row..src_off + (from + rows) * row), peer as i32)?;
                            }
                            if in_rows > 0 {
                                comm.recv(&mut own.slice_mut(dst_off + to * row..dst_off + (to + in_rows) * row), peer as i32)?;
                            }
                        }
                    }
                    Ok(())
                })();
                // End the group even when an operation failed, so NCCL's group state stays sane.
                let ended = cudarc::nccl::result::group_end();
                moved.map_err(nccl)?;
                ended.map_err(nccl)?;
                let own_base = own.device_ptr(&self.stream).0;
                for src in 0..r {
                    // SAFETY: the signal word lies in this rank's live buffer; ordered after the
                    // NCCL receives on the same stream.
                    unsafe {
                        cudarc::driver::sys::cuStreamWriteValue32_v2(
                            stream,
                            signal_word(own_base, src),
                            self.epochs[me][kind],
                            cudarc::driver::sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                        )
                    }
                    .result()?;
                }
            }
        }
        Ok(())
    }

    /// One rank's receive phase, on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn dispatch_recv(
        &mut self,
        stream: &Arc<CudaStream>,
        rank: usize,
        prep: Prepared,
        bufs: RecvBuffers,
        counts: Vec<usize>,
        all_counts: &[i32],
        consumer: Option<&Arc<CudaStream>>,
    ) -> Result<Dispatched> {
        let epoch = self.epochs[rank][DISPATCH];
        let RecvBuffers { rows, mut x, mut m_indices, mut weights, mut src, counts: mut d_counts, mut stage_rows, mut arrivals } = bufs;
        let staged = self.shape.transport.staged();
        {
            let mut launch = Launch::new("ep_dispatch_recv", stream)?;
            let peers = launch.input(&self.peers);
            // With a consumer, what its GEMM reads is tracked as written on its stream (see
            // dispatch_with_arrivals): the GEMM must not wait for this launch to finish. Without
            // one, that is this launch's own stream.
            let on: &CudaStream = consumer.map_or(stream, |c| c);
            let (xp, sfp) = match &mut x {
                Rows::Bf16(x) => (launch.output_tracked_on(x, on), 0),
                Rows::Fp8 { q, sf } => (launch.output_tracked_on(q, on), launch.output_tracked_on(sf, on)),
            };
            let mp = launch.output_tracked_on(&mut m_indices, on);
            let ap = arrivals.as_mut().map_or(0, |a| launch.output_tracked_on(a, on));
            let params = ffi::dk_ep_dispatch_recv_params {
                group: self.params(rank, epoch, peers),
                x: xp as *mut std::os::raw::c_void,
                sf: sfp as *mut f32,
                m_indices: mp as *mut i32,
                weights: launch.output(&mut weights) as *mut f32,
                src: launch.output(&mut src) as *mut i32,
                counts: launch.output(&mut d_counts) as *mut i32,
                stage_rows: if staged { launch.output(&mut stage_rows) as *mut i32 } else { std::ptr::null_mut() },
                rows: rows as i64,
                arrivals: ap as *mut i32,
            };
            let s = launch.stream();
            // SAFETY: every output holds `rows` rows (sf: hidden/128 × rows), counts E_local;
            // rows came from the same counts the kernel reads.
            let status = ffi_call!(unsafe dk_ep_dispatch_recv(&params, s));
            launch.finish(status)?;
        }
        let handle = Handle {
            rank,
            round: (DISPATCH, epoch),
            tokens: prep.tokens,
            k: prep.k,
            src,
            rows,
            topk_idx: prep.topk_idx,
            topk_weights: prep.topk_weights,
            num_invalid: prep.layout.num_invalid,
            staged: staged.then(|| StagedHandle {
                counts: all_counts.to_vec(),
                stage_rows,
                pair_pos: prep.pos,
                tokens_per_expert: prep.layout.tokens_per_expert,
            }),
        };
        Ok(Dispatched { x, m_indices, weights, counts, rows, arrivals, handle })
    }

    /// Low-latency dispatch, send phase of `rank`: no host synchronisation, nothing waits. Each
    /// token must name distinct experts (a duplicate may overflow its expert's rows and is then
    /// dropped and reported by [`Group::check`]); slots naming experts outside `0 .. num_experts`
    /// are ignored and counted ([`Handle::invalid_slots`]).
    pub fn dispatch_low_latency_send(&mut self, rank: usize, input: &RankInput<'_>) -> Result<PendingLowLatency> {
        self.check_local(rank)?;
        #[cfg(feature = "nccl")]
        if matches!(self.storage, Storage::Nccl { .. }) {
            return Err(Error::InvalidArgument {
                arg: "transport",
                reason: "low-latency mode writes into peers' memory, which an NCCL group does not map".into(),
            });
        }
        if self.shape.ll_max_tokens == 0 {
            return Err(Error::InvalidArgument {
                arg: "ll_max_tokens",
                reason: "the group was built without low-latency buffers (0)".into(),
            });
        }
        self.validate_input(input, true)?;
        self.expect_phase("dispatch_low_latency_send", rank, Phase::Idle)?;
        let prep = self.prepare(input)?;
        let epoch = self.bump(rank, LL_DISPATCH);
        self.send_tokens(&self.stream, "ep_ll_dispatch_send", rank, epoch, input, &prep, true)?;
        self.phases[rank] = Phase::LowLatencySent;
        Ok(PendingLowLatency {
            rank,
            round: epoch,
            tokens: prep.tokens,
            k: prep.k,
            routing: Some((prep.topk_idx, prep.topk_weights, prep.layout.num_invalid)),
        })
    }

    /// Low-latency dispatch, receive phase: waits on the device for every rank's send phase. A
    /// call refused for its order (on virtual ranks, before every rank's send) leaves `pending`
    /// as it was, to be received once the order is right; a received one is refused.
    pub fn dispatch_low_latency_recv(&mut self, pending: &mut PendingLowLatency) -> Result<DispatchedLowLatency> {
        let rank = pending.rank;
        self.check_local(rank)?;
        let epoch = self.epochs[rank][LL_DISPATCH];
        self.expect_phase("dispatch_low_latency_recv", rank, Phase::LowLatencySent)?;
        if pending.round != epoch {
            return Err(Error::InvalidArgument { arg: "pending", reason: format!("rank {rank}'s send of an earlier round") });
        }
        self.expect_all_sent("dispatch_low_latency_recv", rank, LL_DISPATCH)?;
        let Some((topk_idx, topk_weights, num_invalid)) = pending.routing.take() else {
            return Err(Error::InvalidArgument { arg: "pending", reason: "already received".into() });
        };
        let (el, h) = (self.shape.experts_per_rank(), self.shape.hidden);
        let capacity = self.shape.ll_capacity();
        let stride = ll_scale_stride(&self.shape);
        let mut x = match self.shape.payload {
            Payload::Bf16 => Rows::Bf16(alloc(&self.stream, el * capacity * h)?),
            Payload::Fp8 => Rows::Fp8 { q: alloc(&self.stream, el * capacity * h)?, sf: alloc(&self.stream, el * (h / GROUP) * stride)? },
        };
        let mut src = alloc::<i32>(&self.stream, el * capacity)?;
        let mut masked_m = alloc::<i32>(&self.stream, el)?;
        {
            let mut launch = Launch::new("ep_ll_dispatch_recv", &self.stream)?;
            let peers = launch.input(&self.peers);
            let (xp, sfp) = match &mut x {
                Rows::Bf16(x) => (launch.output(x), 0),
                Rows::Fp8 { q, sf } => (launch.output(q), launch.output(sf)),
            };
            let params = ffi::dk_ep_ll_dispatch_recv_params {
                group: self.params(rank, epoch, peers),
                x: xp as *mut std::os::raw::c_void,
                sf: sfp as *mut f32,
                sf_stride: stride as i64,
                src: launch.output(&mut src) as *mut i32,
                masked_m: launch.output(&mut masked_m) as *mut i32,
            };
            let s = launch.stream();
            // SAFETY: outputs sized [E_local, capacity, hidden], [E_local, hidden/128, stride],
            // [E_local, capacity] and [E_local] as the launcher's contract requires.
            let status = ffi_call!(unsafe dk_ep_ll_dispatch_recv(&params, s));
            launch.finish(status)?;
        }
        self.phases[rank] = Phase::Received;
        let handle = Handle {
            rank,
            round: (LL_DISPATCH, epoch),
            tokens: pending.tokens,
            k: pending.k,
            src,
            rows: el * capacity,
            topk_idx,
            topk_weights,
            num_invalid,
            staged: None,
        };
        Ok(DispatchedLowLatency { x, masked_m, capacity, handle })
    }

    /// Low-latency dispatch of every local rank: all send phases, then all receive phases.
    pub fn dispatch_low_latency(&mut self, inputs: &[RankInput<'_>]) -> Result<Vec<DispatchedLowLatency>> {
        let local = self.check_local_count("inputs", inputs.len())?;
        let pending = local.iter().zip(inputs).map(|(&rank, i)| self.dispatch_low_latency_send(rank, i)).collect::<Result<Vec<_>>>()?;
        pending.into_iter().map(|mut p| self.dispatch_low_latency_recv(&mut p)).collect()
    }

    /// A zeroed buffer for one rank's expert outputs `y`, `[rows, hidden]` bf16 in the received
    /// layout, the length combine expects; one row when the rank received none (CUDA cannot
    /// allocate zero bytes, and combine accepts that row).
    pub fn alloc_expert_output(&self, received: &impl Received) -> Result<CudaSlice<bf16>> {
        let rows = received.rows();
        Ok(self.stream.alloc_zeros(rows.max(1) * self.shape.hidden)?)
    }

    /// Combine, send phase of the rank `received` came from: `y` (`[rows, hidden]` bf16, the
    /// expert outputs in the received layout; for a rank that received no rows, empty or one
    /// row) goes back to the tokens' ranks. `received` is the rank's [`Dispatched`],
    /// [`DispatchedLowLatency`] or [`Handle`].
    pub fn combine_send(&mut self, y: &impl DevicePtr<bf16>, received: &impl Received) -> Result<()> {
        let handle = received.handle();
        let rank = handle.rank;
        self.check_local(rank)?;
        let h = self.shape.hidden;
        check_y_len(y.len(), handle.rows, h)?;
        check_aligned("y", y.device_ptr(&self.stream).0, 16)?;
        self.expect_phase("combine_send", rank, Phase::Received)?;
        self.expect_current(rank, handle)?;
        let epoch = self.bump(rank, COMBINE);
        // A group with a staged transport runs a low-latency combine the peer way (the handle
        // carries no staged part then).
        let staged = handle.staged.as_ref();
        let mut launch = Launch::new("ep_combine_send", &self.stream)?;
        let peers = launch.input(&self.peers);
        let mut group = self.params(rank, epoch, peers);
        group.staged = i32::from(staged.is_some());
        let params = ffi::dk_ep_combine_send_params {
            group,
            y: launch.input(y) as *const std::os::raw::c_void,
            src: launch.input(&handle.src) as *const i32,
            stage_rows: staged.map_or(std::ptr::null(), |st| launch.input(&st.stage_rows) as *const i32),
            rows: handle.rows as i64,
        };
        let s = launch.stream();
        // SAFETY: y has rows × hidden elements, src and stage_rows `rows` entries (range-checked
        // on the device).
        let status = ffi_call!(unsafe dk_ep_combine_send(&params, s));
        launch.finish(status)?;
        if let Some(st) = staged {
            self.move_runs(&[rank], &st.counts, Direction::Combine)?;
        }
        self.phases[rank] = Phase::CombineSent;
        Ok(())
    }

    /// Refuses a handle that did not come from rank `rank`'s current round.
    fn expect_current(&self, rank: usize, handle: &Handle) -> Result<()> {
        let (kind, round) = handle.round;
        if self.epochs[rank][kind] != round {
            return Err(Error::InvalidArgument { arg: "handle", reason: format!("rank {rank}'s handle of an earlier round") });
        }
        Ok(())
    }

    /// Combine, receive phase of `handle.rank()` as a *source* rank: waits on the device for
    /// every rank's send phase and returns this rank's `[tokens, hidden]` bf16 outputs, each
    /// token's **router-weighted** sum `Σ_j topk_weights[t, j] · y[row of (t, j)]` over the routing
    /// it dispatched (the routing `handle` carries: use the handle this rank's own dispatch
    /// returned). The weights are applied here, so the expert outputs `y` must not already carry
    /// them; code ported from DeepEP, whose normal-mode combine does not weight (the caller
    /// weights before it), would apply them twice: use [`Group::combine_recv_unweighted`] there.
    pub fn combine_recv(&mut self, received: &impl Received) -> Result<CudaSlice<bf16>> {
        self.combine_recv_impl(received.handle(), true)
    }

    /// [`Group::combine_recv`] with every weight 1: each token gets the plain sum of its rows.
    pub fn combine_recv_unweighted(&mut self, received: &impl Received) -> Result<CudaSlice<bf16>> {
        self.combine_recv_impl(received.handle(), false)
    }

    fn combine_recv_impl(&mut self, handle: &Handle, weighted: bool) -> Result<CudaSlice<bf16>> {
        let rank = handle.rank;
        self.check_local(rank)?;
        self.expect_phase("combine_recv", rank, Phase::CombineSent)?;
        self.expect_current(rank, handle)?;
        self.expect_all_sent("combine_recv", rank, COMBINE)?;
        let epoch = self.epochs[rank][COMBINE];
        let mut out = alloc::<bf16>(&self.stream, handle.tokens * self.shape.hidden)?;
        let staged = handle.staged.as_ref();
        let mut launch = Launch::new("ep_combine_recv", &self.stream)?;
        let peers = launch.input(&self.peers);
        let mut group = self.params(rank, epoch, peers);
        group.staged = i32::from(staged.is_some());
        let params = ffi::dk_ep_combine_recv_params {
            group,
            topk_idx: launch.input(&handle.topk_idx) as *const i32,
            topk_weights: if weighted { launch.input(&handle.topk_weights) as *const f32 } else { std::ptr::null() },
            out: launch.output(&mut out) as *mut std::os::raw::c_void,
            pair_pos: staged.map_or(std::ptr::null(), |st| launch.input(&st.pair_pos) as *const i32),
            tokens_per_expert: staged.map_or(std::ptr::null(), |st| launch.input(&st.tokens_per_expert) as *const i32),
            tokens: int_arg("tokens", handle.tokens)?,
            k: int_arg("k", handle.k)?,
        };
        let s = launch.stream();
        // SAFETY: routing copies hold tokens × k elements, out tokens × hidden.
        let status = ffi_call!(unsafe dk_ep_combine_recv(&params, s));
        launch.finish(status)?;
        self.phases[rank] = Phase::Idle;
        Ok(out)
    }

    /// Combine of every local rank: `ys[i]` (the expert outputs, `[rows, hidden]` bf16: a
    /// `CudaSlice`, a `CudaView`, or anything else cudarc can address) goes back with
    /// `received[i]`, what the same dispatch returned for the i-th local rank (`&received` of a
    /// [`Group::dispatch`] or [`Group::dispatch_low_latency`] result, or their handles); all send
    /// phases, then all receive phases. Returns each local rank's `[tokens, hidden]` output:
    /// router-weighted sums, as [`Group::combine_recv`] explains.
    pub fn combine<Y: DevicePtr<bf16>, R: Received>(&mut self, ys: &[Y], received: &[R]) -> Result<Vec<CudaSlice<bf16>>> {
        self.combine_impl(ys, received, true)
    }

    /// [`Group::combine`] with every weight 1 (plain sums), for expert outputs that already carry
    /// the router weights.
    pub fn combine_unweighted<Y: DevicePtr<bf16>, R: Received>(&mut self, ys: &[Y], received: &[R]) -> Result<Vec<CudaSlice<bf16>>> {
        self.combine_impl(ys, received, false)
    }

    /// [`Group::combine`] with the handles gathered by the caller (`handles[i]` for the i-th
    /// local rank), for code that keeps the handles apart from the received rows.
    pub fn combine_handles<Y: DevicePtr<bf16>>(&mut self, ys: &[Y], handles: &[&Handle]) -> Result<Vec<CudaSlice<bf16>>> {
        self.combine_impl(ys, handles, true)
    }

    /// [`Group::combine_unweighted`] with the handles gathered by the caller.
    pub fn combine_handles_unweighted<Y: DevicePtr<bf16>>(&mut self, ys: &[Y], handles: &[&Handle]) -> Result<Vec<CudaSlice<bf16>>> {
        self.combine_impl(ys, handles, false)
    }

    fn combine_impl<Y: DevicePtr<bf16>, R: Received>(&mut self, ys: &[Y], received: &[R], weighted: bool) -> Result<Vec<CudaSlice<bf16>>> {
        let local = self.check_local_count("ys", ys.len())?;
        self.check_local_count("received", received.len())?;
        if let Some((i, h)) = received.iter().map(Received::handle).enumerate().find(|(i, h)| h.rank != local[*i]) {
            return Err(Error::InvalidArgument {
                arg: "received",
                reason: format!("entry {i} is rank {}'s handle, not rank {}'s", h.rank, local[i]),
            });
        }
        for (y, r) in ys.iter().zip(received) {
            self.combine_send(y, r)?;
        }
        received.iter().map(|r| self.combine_recv_impl(r.handle(), weighted)).collect()
    }

    /// Reads and clears every local rank's device error words (synchronises the stream): a peer
    /// that did not signal within [`Group::timeout`] (named, with the signal it waited for), rows
    /// that did not fit the receive buffers, or a peer's reported error that poisoned this rank's
    /// outputs. Returns the first local rank's error; all are cleared, so the next call reports
    /// only what happened since. A rank whose error is not cleared keeps publishing it, and every
    /// rank then refuses normal dispatches and poisons low-latency and combine outputs, so call it
    /// on every rank after any failure (see `docs/ep.md`).
    pub fn check(&mut self) -> Result<()> {
        let mut first = None;
        for rank in self.local_ranks() {
            let (bits, timeout) = self.read_errors(rank)?;
            if bits != 0 || timeout != 0 {
                self.clear_errors(rank)?;
                first = first.or(Some(self.error_of(rank, bits, timeout)));
            }
        }
        self.stream.synchronize()?;
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Group {
    /// A node group's ranks write into each other's buffers: before this rank unmaps its peers'
    /// buffers and frees its own, its stream's work completes and every rank passes a device
    /// barrier (so no peer's queued work still writes here). Every rank must drop its group; a
    /// rank whose peers never do waits [`Group::timeout`] before it tears down anyway.
    fn drop(&mut self) {
        let Storage::Node(node) = &self.storage else {
            return;
        };
        let rank = node.rank;
        let _ = self.stream.synchronize();
        let epoch = self.bump(rank, BARRIER);
        let barrier = || -> Result<()> {
            let mut launch = Launch::new("ep_barrier", &self.stream)?;
            let peers = launch.input(&self.peers);
            let params = ffi::dk_ep_wait_params { group: self.params(rank, epoch, peers), kind: BARRIER as i32 };
            let s = launch.stream();
            // SAFETY: as in send_tokens; the kernel writes one signal word into every peer's
            // buffer and reads this rank's.
            let status = ffi_call!(unsafe dk_ep_barrier(&params, s));
            launch.finish(status)?;
            self.stream.synchronize()?;
            Ok(())
        };
        // Errors cannot be reported from drop; NodeBuffers::drop then unmaps and frees.
        let _ = barrier();
    }
}

/// Which way a staged transport moves its runs.
#[derive(Clone, Copy)]
enum Direction {
    Dispatch,
    Combine,
}

/// Error bits other than the timeout, in words.
fn describe_bits(bits: u32) -> String {
    let mut what = Vec::new();
    if bits & ffi::DK_EP_ERROR_TIMEOUT != 0 {
        what.push("a wait for a peer timed out");
    }
    if bits & ffi::DK_EP_ERROR_OVERFLOW != 0 {
        what.push("rows did not fit the receive buffers and were dropped");
    }
    if bits & ffi::DK_EP_ERROR_PEER != 0 {
        what.push("a peer reported an error, so outputs that depended on it were poisoned (NaN)");
    }
    what.join("; ")
}

#[cfg(feature = "nccl")]
fn check_world(shape: &GroupShape, comm: &cudarc::nccl::Comm) -> Result<()> {
    if shape.ranks != comm.world_size() {
        return Err(Error::InvalidArgument {
            arg: "ranks",
            reason: format!("the shape has {} ranks, the communicator {}", shape.ranks, comm.world_size()),
        });
    }
    Ok(())
}

/// An NCCL failure of `what` on `rank`, with NCCL's result code (cudarc's `Debug` of the error
/// omits it).
#[cfg(feature = "nccl")]
fn nccl_error(rank: usize, what: &str, e: &cudarc::nccl::result::NcclError) -> Error {
    Error::Communication { rank, reason: format!("NCCL {what} failed: {:?}", e.0) }
}

/// Refuses to form a multi-process group whose ranks' shapes differ (`prints[r]`: rank r's
/// [`GroupShape::fingerprint`]).
#[cfg(feature = "nccl")]
fn check_fingerprints(shape: &GroupShape, prints: &[u64]) -> Result<()> {
    let mine = shape.fingerprint();
    match prints.iter().position(|&p| p != mine) {
        None => Ok(()),
        Some(r) => Err(Error::InvalidArgument {
            arg: "shape",
            reason: format!("rank {r} built its group with a different GroupShape; every rank must use the same ({shape:?} here)"),
        }),
    }
}

fn refuse_nccl(shape: &GroupShape, what: &str) -> Result<()> {
    if shape.transport == Transport::Nccl {
        return Err(Error::InvalidArgument {
            arg: "transport",
            reason: format!("{what} maps peers' memory; build an NCCL-transport group with Group::new_nccl"),
        });
    }
    Ok(())
}

/// One rank's routing, prepared for a send phase.
struct Prepared {
    layout: DeviceLayout,
    pos: CudaSlice<i32>,
    topk_idx: CudaSlice<i32>,
    topk_weights: CudaSlice<f32>,
    tokens: usize,
    k: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    /// Groups (virtual, node and NCCL: one type) and what a round returns move between threads.
    #[test]
    fn group_and_results_are_send() {
        assert_send::<Group>();
        assert_send::<Dispatched>();
        assert_send::<DispatchedLowLatency>();
        assert_send::<PendingLowLatency>();
        assert_send::<Handle>();
        assert_send::<Rows>();
    }

    #[test]
    fn expert_output_length_is_exact_or_one_row_when_empty() {
        assert!(check_y_len(3 * 256, 3, 256).is_ok());
        assert!(check_y_len(0, 0, 256).is_ok());
        assert!(check_y_len(256, 0, 256).is_ok(), "the one-row buffer of alloc_expert_output");
        let arg = |r: Result<()>| match r {
            Err(Error::Shape { arg, .. }) => arg,
            other => panic!("expected a shape error, got {other:?}"),
        };
        assert_eq!(arg(check_y_len(256, 3, 256)), "y");
        assert_eq!(arg(check_y_len(4 * 256, 3, 256)), "y");
        assert_eq!(arg(check_y_len(2 * 256, 0, 256)), "y");
        assert_eq!(arg(check_y_len(1, 0, 256)), "y");
    }
}
