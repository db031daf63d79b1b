//! Expert-parallel group planning: the shape of a group, the byte layout of every rank's symmetric
//! buffer, and the rows each rank receives in normal mode. Plain Rust, no CUDA: the device code
//! reads the offsets computed here (`dk_ep_group_t` in the C header).

use crate::error::{Error, Result};
use crate::layout::{GROUP, round_up, tma_aligned_rows};

/// Most ranks in one group (the device signal table's width).
pub const MAX_RANKS: usize = 64;
/// Most experts (per-expert tables live in shared memory).
pub const MAX_EXPERTS: usize = 1024;
/// Most top-k slots per token.
pub const MAX_TOPK: usize = 16;
/// Signal kinds (notify, dispatch, low-latency dispatch, combine, barrier).
pub const SIGNAL_KINDS: usize = 5;
/// Words of the signals region: kinds × ranks flags, a completion counter per kind, the error and
/// timeout words, per source rank its published error bits, and per epoch parity and source rank
/// the invalid-slot count and error bits of its notify.
pub const SIGNAL_WORDS: usize = SIGNAL_KINDS * MAX_RANKS + SIGNAL_KINDS + 2 + MAX_RANKS + 2 * NOTIFY_SLOTS * MAX_RANKS;

/// Copies of what a normal dispatch's notify sends (the counts table and the notify words): the
/// notify of epoch `e` writes copy [`notify_slot`]`(e)`. Two suffice: after a refused round, a
/// rank may notify the next round before a slower peer has read the refused one, but never two
/// rounds ahead (its next wait needs that peer's notify of the next round).
pub const NOTIFY_SLOTS: usize = 2;

/// The copy of the notify data that the notify of `epoch` writes.
pub const fn notify_slot(epoch: u32) -> usize {
    (epoch & 1) as usize
}

/// What dispatch moves: bf16 rows, or e4m3 rows with their f32 1x128 scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// bf16 rows: `2 · hidden` bytes each.
    Bf16,
    /// E4M3 rows (`hidden` bytes each) and `hidden / 128` f32 scales per row.
    Fp8,
}

impl Payload {
    /// Bytes of one row of `hidden` elements.
    pub const fn row_bytes(self, hidden: usize) -> usize {
        match self {
            Payload::Bf16 => 2 * hidden,
            Payload::Fp8 => hidden,
        }
    }
}

/// How normal-mode payloads cross ranks (low-latency mode always uses [`Transport::Peer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// The send kernels write straight into the peers' buffers (SMs move the bytes).
    #[default]
    Peer,
    /// The send kernel packs this rank's pairs into a local outbox, one contiguous run per
    /// destination; asynchronous copies move the runs and stream memory operations write the
    /// signals, so no SM is held while data is in flight.
    CopyEngine,
    /// As [`Transport::CopyEngine`], but the runs move with NCCL grouped send/receive: for ranks
    /// on other hosts, or GPUs without peer access.
    Nccl,
}

impl Transport {
    /// Whether normal mode goes through the outbox and the source-major inbox.
    pub const fn staged(self) -> bool {
        !matches!(self, Transport::Peer)
    }
}

/// The shape of an expert-parallel group; every rank must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupShape {
    /// Ranks in the group, `1 ..= MAX_RANKS`.
    pub ranks: usize,
    /// Experts over all ranks (a multiple of `ranks`, at most [`MAX_EXPERTS`]); rank `r` holds
    /// experts `r · experts_per_rank .. (r + 1) · experts_per_rank`.
    pub num_experts: usize,
    /// Hidden size, a multiple of 128.
    pub hidden: usize,
    /// Most tokens a rank dispatches in normal mode (and combines, in either mode).
    pub max_tokens: usize,
    /// Most tokens a rank dispatches in low-latency mode (`<= max_tokens`; 0: no low-latency mode).
    pub ll_max_tokens: usize,
    /// Most top-k slots per token.
    pub max_topk: usize,
    /// Row alignment of each local expert's segment in the normal layout (the GEMM's M tile).
    pub m_align: usize,
    /// Rows a rank can receive in normal mode; [`GroupShape::worst_case_recv_rows`] never overflows.
    pub recv_rows: usize,
    /// What dispatch moves.
    pub payload: Payload,
    /// How normal-mode payloads move (the staged transports add an outbox and a return region).
    pub transport: Transport,
}

impl GroupShape {
    /// A shape for `ranks × num_experts` with `hidden`, sized for the worst case: every token of
    /// every rank naming `max_topk` experts of one rank, and `ll_max_tokens = min(max_tokens, 128)`.
    pub fn new(ranks: usize, num_experts: usize, hidden: usize, max_tokens: usize, max_topk: usize, payload: Payload) -> Self {
        let mut shape = Self {
            ranks,
            num_experts,
            hidden,
            max_tokens,
            ll_max_tokens: max_tokens.min(128),
            max_topk,
            m_align: 128,
            recv_rows: 0,
            payload,
            transport: Transport::Peer,
        };
        shape.recv_rows = shape.worst_case_recv_rows();
        shape
    }

    /// Experts each rank holds: `num_experts / ranks`.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.ranks.max(1)
    }

    /// Rows one rank receives in normal mode at most: all pairs of all ranks, plus less than
    /// `m_align` rows of padding per local expert.
    pub fn worst_case_recv_rows(&self) -> usize {
        let pairs = self.ranks.saturating_mul(self.max_tokens).saturating_mul(self.max_topk);
        pairs.saturating_add(self.experts_per_rank().saturating_mul(self.m_align.saturating_sub(1)))
    }

    /// Rows per local expert of the low-latency (masked) layout: `ranks · ll_max_tokens`.
    pub fn ll_capacity(&self) -> usize {
        self.ranks * self.ll_max_tokens
    }

    /// A fingerprint of every field, the same in every process that builds the same shape: ranks
    /// exchange it when a multi-process group forms, and refuse to form one with differing shapes.
    pub fn fingerprint(&self) -> u64 {
        let fields = [
            self.ranks as u64,
            self.num_experts as u64,
            self.hidden as u64,
            self.max_tokens as u64,
            self.ll_max_tokens as u64,
            self.max_topk as u64,
            self.m_align as u64,
            self.recv_rows as u64,
            match self.payload {
                Payload::Bf16 => 1,
                Payload::Fp8 => 2,
            },
            match self.transport {
                Transport::Peer => 1,
                Transport::CopyEngine => 2,
                Transport::Nccl => 3,
            },
        ];
        // FNV-1a over the little-endian bytes: stable across processes, platforms and releases.
        fields.iter().flat_map(|f| f.to_le_bytes()).fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Checks every limit the device code relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &'static str, reason: String| Err(Error::InvalidArgument { arg, reason });
        if self.ranks == 0 || self.ranks > MAX_RANKS {
            return bad("ranks", format!("{} is outside 1..={MAX_RANKS}", self.ranks));
        }
        if self.num_experts == 0 || self.num_experts > MAX_EXPERTS || !self.num_experts.is_multiple_of(self.ranks) {
            return bad(
                "num_experts",
                format!("{} must be in 1..={MAX_EXPERTS} and split evenly over {} ranks", self.num_experts, self.ranks),
            );
        }
        if self.hidden == 0 || !self.hidden.is_multiple_of(GROUP) {
            return bad("hidden", format!("{} is not a positive multiple of {GROUP}", self.hidden));
        }
        if self.max_topk == 0 || self.max_topk > MAX_TOPK {
            return bad("max_topk", format!("{} is outside 1..={MAX_TOPK}", self.max_topk));
        }
        if self.ranks.checked_mul(self.max_tokens).and_then(|v| v.checked_mul(self.max_topk)).is_none_or(|v| v >= 1 << 31) {
            return bad(
                "max_tokens",
                format!("{} ranks × {} tokens × top-{} must stay below 2^31", self.ranks, self.max_tokens, self.max_topk),
            );
        }
        if self.ll_max_tokens > self.max_tokens {
            return bad("ll_max_tokens", format!("{} exceeds max_tokens = {}", self.ll_max_tokens, self.max_tokens));
        }
        if self.m_align == 0 || !self.m_align.is_multiple_of(4) || self.m_align > 1 << 16 {
            return bad("m_align", format!("{} is not a positive multiple of 4 (up to 65536)", self.m_align));
        }
        if self.recv_rows >= 1 << 31 {
            return bad("recv_rows", format!("{} does not fit the device's 32-bit row indices", self.recv_rows));
        }
        Ok(())
    }
}

/// Byte offsets of the regions of every rank's symmetric buffer (all 256-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymmetricLayout {
    /// [`SIGNAL_WORDS`] `u32`s: the per-kind signal flags, completion counters, error and timeout
    /// words, every source rank's published error bits, and its notify's invalid-slot count and
    /// error bits per [`notify_slot`].
    pub signals: usize,
    /// i32 `[NOTIFY_SLOTS, ranks, num_experts]`: every source rank's tokens per expert (normal
    /// dispatch), one table per [`notify_slot`].
    pub counts: usize,
    /// i32 `[experts_per_rank, ranks]`: rows each source sent to each local expert (low latency).
    pub ll_counts: usize,
    /// Normal-mode receive rows: payload `[recv_rows, hidden]`.
    pub recv_x: usize,
    /// FP8 only: f32 scales of the received rows, `[hidden / 128, recv_rows]` (staged transports:
    /// row-major `[recv_rows, hidden / 128]`).
    pub recv_sf: usize,
    /// f32 `[recv_rows]`: router weight of each received row.
    pub recv_weight: usize,
    /// i32 `[recv_rows]`: packed source of each received row, -1 on padding.
    pub recv_src: usize,
    /// Low-latency staging rows: payload `[num_experts · ll_max_tokens, hidden]`, row
    /// `(local_expert · ranks + source) · ll_max_tokens + position`.
    pub ll_x: usize,
    /// FP8 only: f32 scales of the low-latency staging rows, `[hidden / 128, rows]`.
    pub ll_sf: usize,
    /// i32 packed source of each low-latency staging row.
    pub ll_src: usize,
    /// bf16 `[max_tokens · max_topk, hidden]`: the expert outputs combine sends back to this rank.
    pub comb: usize,
    /// Staged transports only (empty otherwise): the outbox, `max_tokens · max_topk` rows of
    /// payload, row-major scales `[rows, hidden / 128]`, weights and sources.
    pub out_x: usize,
    /// Staged only: the outbox's f32 scales, row-major `[max_tokens · max_topk, hidden / 128]`.
    pub out_sf: usize,
    /// Staged only: the outbox's f32 router weights, one per row.
    pub out_weight: usize,
    /// Staged only: the outbox's i32 packed sources, one per row.
    pub out_src: usize,
    /// Staged transports only: bf16 `[recv_rows, hidden]` expert outputs on their way back.
    pub ret: usize,
    /// Size of the whole buffer.
    pub bytes: usize,
}

const REGION_ALIGN: usize = 256;

impl SymmetricLayout {
    /// Plans the buffer of a validated `shape`; errors if it does not fit in memory addresses.
    pub fn new(shape: &GroupShape) -> Result<Self> {
        shape.validate()?;
        let overflow = || Error::InvalidArgument { arg: "shape", reason: format!("{shape:?} needs more than 2^62 bytes per rank") };
        let mut at = 0usize;
        let mut next = |bytes: Option<usize>| -> Result<usize> {
            let start = at;
            at = bytes
                .and_then(|b| start.checked_add(b))
                .map(|end| round_up(end, REGION_ALIGN))
                .filter(|&e| e < 1 << 62)
                .ok_or_else(overflow)?;
            Ok(start)
        };
        let (r, e, h) = (shape.ranks, shape.num_experts, shape.hidden);
        let row = shape.payload.row_bytes(h);
        let kb = h / GROUP;
        let recv = shape.recv_rows;
        let ll_rows = e.checked_mul(shape.ll_max_tokens);
        let pairs = shape.max_tokens.checked_mul(shape.max_topk);
        let staged = |rows: Option<usize>| if shape.transport.staged() { rows } else { Some(0) };
        let sf = |rows: Option<usize>| match shape.payload {
            Payload::Fp8 => rows.and_then(|n| n.checked_mul(kb * 4)),
            Payload::Bf16 => Some(0),
        };
        Ok(Self {
            signals: next(Some(SIGNAL_WORDS * 4))?,
            counts: next(Some(NOTIFY_SLOTS * r * e * 4))?,
            ll_counts: next(Some(e * 4))?,
            recv_x: next(recv.checked_mul(row))?,
            recv_sf: next(sf(Some(recv)))?,
            recv_weight: next(recv.checked_mul(4))?,
            recv_src: next(recv.checked_mul(4))?,
            ll_x: next(ll_rows.and_then(|n| n.checked_mul(row)))?,
            ll_sf: next(sf(ll_rows))?,
            ll_src: next(ll_rows.and_then(|n| n.checked_mul(4)))?,
            comb: next(pairs.and_then(|n| n.checked_mul(2 * h)))?,
            out_x: next(staged(pairs).and_then(|n| n.checked_mul(row)))?,
            out_sf: next(sf(staged(pairs)))?,
            out_weight: next(staged(pairs).and_then(|n| n.checked_mul(4)))?,
            out_src: next(staged(pairs).and_then(|n| n.checked_mul(4)))?,
            ret: next(staged(Some(recv)).and_then(|n| n.checked_mul(2 * h)))?,
            bytes: at,
        })
    }
}

/// What one rank receives in normal mode, from the all-gathered `counts` (`[ranks, num_experts]`,
/// every rank's tokens per expert): the valid rows of each local expert and the padded total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalRows {
    /// `[experts_per_rank]`.
    pub counts: Vec<usize>,
    /// Rows of the contiguous layout: Σ round_up(count, m_align).
    pub rows: usize,
}

/// Rows rank `rank` receives in normal mode (negative counts count as 0, as on the device).
pub fn normal_rows(shape: &GroupShape, counts: &[i32], rank: usize) -> NormalRows {
    let (e, el) = (shape.num_experts, shape.experts_per_rank());
    let per_expert: Vec<usize> =
        (0..el).map(|le| (0..shape.ranks).map(|s| counts.get(s * e + rank * el + le).map_or(0, |&c| c.max(0) as usize)).sum()).collect();
    let rows = per_expert.iter().map(|&c| round_up(c, shape.m_align)).sum();
    NormalRows { counts: per_expert, rows }
}

/// Scale rows of the low-latency layout per expert: the capacity rounded for TMA.
pub fn ll_scale_stride(shape: &GroupShape) -> usize {
    tma_aligned_rows(shape.ll_capacity())
}

/// The device's placement, mirrored on the CPU (property-tested against
/// [`crate::reference::ep`]): `pair_pos` of every slot of one rank's routing (`[tokens, k]`): the
/// number of earlier slots, in (token, slot) order, that name the same expert; -1 for slots naming
/// no valid expert. What `dk_ep_pair_positions` computes.
pub fn pair_positions(topk_idx: &[i32], num_experts: usize) -> Vec<i32> {
    let mut seen = vec![0i32; num_experts];
    topk_idx
        .iter()
        .map(|&e| {
            if e < 0 || e as usize >= num_experts {
                return -1;
            }
            let p = seen[e as usize];
            seen[e as usize] += 1;
            p
        })
        .collect()
}

/// Normal dispatch, as the send kernel places a pair: the row on expert `e`'s rank of the pair of
/// source rank `src` at position `pos`, from the all-gathered `counts` (`[ranks, num_experts]`):
/// the expert's segment start (earlier local experts, each padded to `m_align`) plus the pairs of
/// lower source ranks plus `pos`.
pub fn normal_row(shape: &GroupShape, counts: &[i32], src: usize, e: usize, pos: usize) -> usize {
    let (ne, el) = (shape.num_experts, shape.experts_per_rank());
    let total = |x: usize| (0..shape.ranks).map(|s| counts[s * ne + x].max(0) as usize).sum::<usize>();
    let first = e / el * el;
    let segment: usize = (first..e).map(|x| round_up(total(x), shape.m_align)).sum();
    let before: usize = (0..src).map(|s| counts[s * ne + e].max(0) as usize).sum();
    segment + before + pos
}

/// Low-latency dispatch, as the receive kernel packs a pair: `(staging row, output row)` on expert
/// `e`'s rank of the pair of source `src` at position `pos`, given every source's count for that
/// expert (`counts[s]`): staging `(le · ranks + src) · ll_max_tokens + pos`, output
/// `le · capacity + Σ_{s < src} counts[s] + pos`.
pub fn ll_rows(shape: &GroupShape, counts: &[usize], src: usize, e: usize, pos: usize) -> (usize, usize) {
    let le = e % shape.experts_per_rank();
    let staging = (le * shape.ranks + src) * shape.ll_max_tokens + pos;
    let out = le * shape.ll_capacity() + counts[..src].iter().sum::<usize>() + pos;
    (staging, out)
}

/// Staged transports, as the send kernel packs a pair: its outbox row on the source rank, from the
/// source's `tokens_per_expert` (negative counts as 0): the pairs of lower experts plus `pos`.
pub fn outbox_row(tokens_per_expert: &[i32], e: usize, pos: usize) -> usize {
    tokens_per_expert[..e].iter().map(|&c| c.max(0) as usize).sum::<usize>() + pos
}

/// Staged transports: the run of rows source `src` sends to rank `dst`, from the all-gathered
/// `counts` (`[ranks, num_experts]`): where it starts in the source's outbox, where it lands in
/// the destination's inbox (after the runs of lower sources), and its length. Dispatch moves
/// outbox → inbox; combine moves the same run back, from the destination's return region (inbox
/// order) to the source's comb region (outbox order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First row of the run in the source's outbox.
    pub outbox_row: usize,
    /// First row of the run in the destination's inbox (its `recv_*` regions).
    pub inbox_row: usize,
    /// Rows in the run.
    pub rows: usize,
}

/// The [`Run`] source rank `src` sends to rank `dst`, from the all-gathered `counts`
/// (`[ranks, num_experts]`; negative counts count as 0).
pub fn staged_run(shape: &GroupShape, counts: &[i32], src: usize, dst: usize) -> Run {
    let (ne, el) = (shape.num_experts, shape.experts_per_rank());
    let c = |s: usize, e: usize| counts[s * ne + e].max(0) as usize;
    let to_dst = |s: usize| (dst * el..(dst + 1) * el).map(|e| c(s, e)).sum::<usize>();
    Run { outbox_row: (0..dst * el).map(|e| c(src, e)).sum(), inbox_row: (0..src).map(to_dst).sum(), rows: to_dst(src) }
}

/// Staged transports, as the receive kernel reads a pair: the inbox row on expert `e`'s rank of
/// the pair of source `src` at position `pos`: the runs of lower sources, then the source's pairs
/// of lower local experts, then `pos`.
pub fn inbox_row(shape: &GroupShape, counts: &[i32], src: usize, e: usize, pos: usize) -> usize {
    let (ne, el) = (shape.num_experts, shape.experts_per_rank());
    let dst = e / el;
    let before: usize = (0..src).map(|s| (dst * el..(dst + 1) * el).map(|x| counts[s * ne + x].max(0) as usize).sum::<usize>()).sum();
    let inner: usize = (dst * el..e).map(|x| counts[src * ne + x].max(0) as usize).sum();
    before + inner + pos
}

/// Staged transports, as the receive kernel resolves output row `q` of local expert `le`'s valid
/// rows on rank `dst` (the contiguous layout's (source, token, slot) order) to its inbox row: the
/// highest source whose earlier rows of the expert are at most `q`, then [`inbox_row`].
pub fn inbox_row_of_output(shape: &GroupShape, counts: &[i32], dst: usize, le: usize, q: usize) -> usize {
    let (ne, el) = (shape.num_experts, shape.experts_per_rank());
    let e = dst * el + le;
    let before = |s: usize| (0..s).map(|x| counts[x * ne + e].max(0) as usize).sum::<usize>();
    let src = (1..shape.ranks).filter(|&s| before(s) <= q).max().unwrap_or(0);
    inbox_row(shape, counts, src, e, q - before(src))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_small_group() {
        let shape = GroupShape::new(2, 4, 128, 3, 2, Payload::Fp8);
        assert_eq!(shape.recv_rows, 2 * 3 * 2 + 2 * 127);
        assert_eq!(shape.ll_max_tokens, 3);
        let l = SymmetricLayout::new(&shape).unwrap();
        assert_eq!(l.signals, 0);
        assert_eq!(l.counts, round_up(SIGNAL_WORDS * 4, 256));
        let regions = [l.signals, l.counts, l.ll_counts, l.recv_x, l.recv_sf, l.recv_weight, l.recv_src, l.ll_x, l.ll_sf, l.ll_src, l.comb];
        assert!(regions.windows(2).all(|w| w[0] < w[1]), "{l:?}");
        assert!(regions.iter().all(|o| o % 256 == 0));
        assert_eq!(l.bytes - l.comb, round_up(3 * 2 * 2 * 128, 256));
        assert!([l.out_x, l.out_sf, l.out_weight, l.out_src, l.ret].iter().all(|&o| o == l.bytes), "{l:?}");

        let staged = SymmetricLayout::new(&GroupShape { transport: Transport::CopyEngine, ..shape }).unwrap();
        let pairs = 3 * 2;
        assert_eq!(staged.out_sf - staged.out_x, round_up(pairs * 128, 256));
        assert_eq!(staged.out_weight - staged.out_sf, round_up(pairs * 4, 256));
        assert_eq!(staged.bytes - staged.ret, round_up(shape.recv_rows * 2 * 128, 256));
    }

    #[test]
    fn staged_runs_tile_outbox_and_inbox() {
        let shape = GroupShape { m_align: 4, transport: Transport::Nccl, ..GroupShape::new(2, 4, 128, 8, 2, Payload::Bf16) };
        // counts[s][e]: rank 1 holds experts 2 and 3.
        let counts = [1, 0, 5, 0, 2, 3, 0, 0];
        assert_eq!(staged_run(&shape, &counts, 0, 0), Run { outbox_row: 0, inbox_row: 0, rows: 1 });
        assert_eq!(staged_run(&shape, &counts, 0, 1), Run { outbox_row: 1, inbox_row: 0, rows: 5 });
        assert_eq!(staged_run(&shape, &counts, 1, 0), Run { outbox_row: 0, inbox_row: 1, rows: 5 });
        assert_eq!(staged_run(&shape, &counts, 1, 1), Run { outbox_row: 5, inbox_row: 5, rows: 0 });
        // Rank 0's expert 1: source 0 sent none, source 1 three (inbox rows 1 + 2 ..).
        assert_eq!(inbox_row_of_output(&shape, &counts, 0, 1, 0), 3);
        assert_eq!(inbox_row(&shape, &counts, 1, 1, 0), 3);
    }

    #[test]
    fn normal_rows_pad_each_expert() {
        let shape = GroupShape { m_align: 4, ..GroupShape::new(2, 4, 128, 8, 2, Payload::Bf16) };
        // counts[s][e]: rank 1 holds experts 2 and 3.
        let counts = [1, 0, 5, 0, 2, 3, 0, 0];
        assert_eq!(normal_rows(&shape, &counts, 0), NormalRows { counts: vec![3, 3], rows: 8 });
        assert_eq!(normal_rows(&shape, &counts, 1), NormalRows { counts: vec![5, 0], rows: 8 });
    }

    #[test]
    fn fingerprints_tell_every_field_apart() {
        let base = GroupShape::new(8, 256, 7168, 4096, 8, Payload::Fp8);
        // Pinned: processes built from different releases must still agree on equal shapes.
        assert_eq!(base.fingerprint(), base.fingerprint());
        let variants = [
            GroupShape { ranks: 4, ..base },
            GroupShape { num_experts: 128, ..base },
            GroupShape { hidden: 4096, ..base },
            GroupShape { max_tokens: 4095, ..base },
            GroupShape { ll_max_tokens: 64, ..base },
            GroupShape { max_topk: 6, ..base },
            GroupShape { m_align: 64, ..base },
            GroupShape { recv_rows: base.recv_rows - 1, ..base },
            GroupShape { payload: Payload::Bf16, ..base },
            GroupShape { transport: Transport::CopyEngine, ..base },
            GroupShape { transport: Transport::Nccl, ..base },
        ];
        let mut seen = vec![base.fingerprint()];
        for v in variants {
            let f = v.fingerprint();
            assert!(!seen.contains(&f), "{v:?} collides");
            seen.push(f);
        }
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let ok = GroupShape::new(8, 256, 7168, 4096, 8, Payload::Fp8);
        assert!(ok.validate().is_ok());
        let arg = |s: GroupShape| match s.validate() {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("{other:?}"),
        };
        assert_eq!(arg(GroupShape { ranks: 0, ..ok }), "ranks");
        assert_eq!(arg(GroupShape { ranks: 65, ..ok }), "ranks");
        assert_eq!(arg(GroupShape { num_experts: 100, ..ok }), "num_experts");
        assert_eq!(arg(GroupShape { hidden: 7000, ..ok }), "hidden");
        assert_eq!(arg(GroupShape { max_topk: 17, ..ok }), "max_topk");
        assert_eq!(arg(GroupShape { max_tokens: 1 << 28, ..ok }), "max_tokens");
        assert_eq!(arg(GroupShape { ll_max_tokens: 5000, ..ok }), "ll_max_tokens");
        assert_eq!(arg(GroupShape { m_align: 6, ..ok }), "m_align");
    }
}
