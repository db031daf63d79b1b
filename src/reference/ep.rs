//! Expert-parallel all-to-all on the CPU: a simulation of `R` ranks that says where every token
//! goes in dispatch and what combine must return. The reference for the EP kernels.
//!
//! Experts are split evenly: rank `r` holds experts `r·E_local .. (r+1)·E_local`, with
//! `E_local = num_experts / R`. Each top-k slot of a token whose expert index is not -1 is one
//! *pair*; every pair becomes one received row on the expert's rank.
//!
//! Order (fixed, so that GPU results compare bit for bit): inside each local expert's rows, pairs
//! are ordered by source rank, then source token, then top-k slot.
//!
//! - **Normal dispatch** lays the rows out as the M-grouped contiguous GEMM reads them: local expert
//!   0's rows, padded to a multiple of `m_align` (128) with padding rows, then expert 1's, and so
//!   on; each row carries its local expert index, -1 on padding.
//! - **Low-latency dispatch** lays them out as the masked grouped GEMM reads them: expert `e`'s rows
//!   at `[e, 0 .. count[e]]` of a `[E_local, R·max_tokens]` buffer.
//! - **Combine** returns, for every source token, `Σ_slots weight · y[row of the pair]`.

use crate::error::{Error, Result};
use crate::layout::round_up;

/// The expert-parallel group's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpConfig {
    /// Ranks in the group.
    pub ranks: usize,
    /// Experts over all ranks, a multiple of `ranks`.
    pub num_experts: usize,
    /// Row alignment of each expert's segment in the normal layout (the GEMM's M tile, 128).
    pub m_align: usize,
}

impl EpConfig {
    /// Experts each rank holds: `num_experts / ranks`.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.ranks
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.ranks == 0 || self.num_experts == 0 || !self.num_experts.is_multiple_of(self.ranks) {
            return Err(Error::InvalidArgument {
                arg: "num_experts",
                reason: format!("{} experts do not split evenly over {} ranks", self.num_experts, self.ranks),
            });
        }
        if self.m_align == 0 {
            return Err(Error::InvalidArgument { arg: "m_align", reason: "must be at least 1".into() });
        }
        Ok(())
    }
}

/// One rank's router output: `topk_idx` and `topk_weights` are `[tokens, k]` row-major.
#[derive(Clone, Copy, Debug)]
pub struct Routing<'a> {
    /// `[tokens, k]` global expert indices; -1 = no expert.
    pub topk_idx: &'a [i32],
    /// `[tokens, k]` router weights.
    pub topk_weights: &'a [f32],
    /// Tokens of this rank.
    pub tokens: usize,
    /// Slots per token (top-k).
    pub k: usize,
}

impl Routing<'_> {
    fn validate(&self, num_experts: usize) -> Result<()> {
        let want = self.tokens * self.k;
        for (arg, len) in [("topk_idx", self.topk_idx.len()), ("topk_weights", self.topk_weights.len())] {
            if len != want {
                return Err(Error::Shape {
                    arg,
                    expected: format!("[{}, {}] = {want} elements", self.tokens, self.k),
                    got: len.to_string(),
                });
            }
        }
        if let Some((i, &e)) = self.topk_idx.iter().enumerate().find(|&(_, &e)| e < -1 || e as i64 >= num_experts as i64) {
            return Err(Error::InvalidArgument {
                arg: "topk_idx",
                reason: format!("token {} slot {} names expert {e}, outside -1..{num_experts}", i / self.k, i % self.k),
            });
        }
        Ok(())
    }

    /// The pairs of this rank, in (token, slot) order: (token, slot, expert, weight).
    fn pairs(&self) -> impl Iterator<Item = (usize, usize, usize, f32)> + '_ {
        (0..self.tokens * self.k)
            .filter(|&i| self.topk_idx[i] >= 0)
            .map(|i| (i / self.k, i % self.k, self.topk_idx[i] as usize, self.topk_weights[i]))
    }
}

/// Counts of one source rank's routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `[R]`: tokens with at least one expert on each rank.
    pub tokens_per_rank: Vec<u32>,
    /// `[E]`: pairs per expert.
    pub tokens_per_expert: Vec<u32>,
    /// `[tokens, R]` row-major: whether a token goes to a rank.
    pub is_token_in_rank: Vec<bool>,
}

/// The layout of one rank's routing.
pub fn layout(routing: &Routing, cfg: &EpConfig) -> Result<Layout> {
    cfg.validate()?;
    routing.validate(cfg.num_experts)?;
    let el = cfg.experts_per_rank();
    let mut out = Layout {
        tokens_per_rank: vec![0; cfg.ranks],
        tokens_per_expert: vec![0; cfg.num_experts],
        is_token_in_rank: vec![false; routing.tokens * cfg.ranks],
    };
    for (t, _, e, _) in routing.pairs() {
        out.tokens_per_expert[e] += 1;
        out.is_token_in_rank[t * cfg.ranks + e / el] = true;
    }
    for t in 0..routing.tokens {
        for r in 0..cfg.ranks {
            out.tokens_per_rank[r] += u32::from(out.is_token_in_rank[t * cfg.ranks + r]);
        }
    }
    Ok(out)
}

/// Where a received row came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSource {
    /// The rank that sent it.
    pub src_rank: u32,
    /// The token's index on that rank.
    pub token: u32,
    /// The top-k slot of the token that named this expert.
    pub slot: u32,
    /// That slot's router weight.
    pub weight: f32,
}

/// What one rank receives in normal mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// One entry per row of the padded contiguous layout; `None` on padding.
    pub rows: Vec<Option<RowSource>>,
    /// Per row: the local expert, -1 on padding (the grouped GEMM's row index).
    pub expert: Vec<i32>,
    /// `[E_local]`: valid rows per local expert.
    pub counts: Vec<u32>,
    /// `[E_local]`: first row of each local expert's segment.
    pub offsets: Vec<u32>,
}

/// Every rank's pairs per destination local expert, in (src rank, token, slot) order.
fn pairs_by_expert(routings: &[Routing], cfg: &EpConfig) -> Result<Vec<Vec<Vec<RowSource>>>> {
    cfg.validate()?;
    if routings.len() != cfg.ranks {
        return Err(Error::Shape { arg: "routings", expected: format!("one per rank ({})", cfg.ranks), got: routings.len().to_string() });
    }
    let el = cfg.experts_per_rank();
    let mut by_expert = vec![vec![Vec::new(); el]; cfg.ranks];
    for (s, routing) in routings.iter().enumerate() {
        routing.validate(cfg.num_experts)?;
        for (t, j, e, w) in routing.pairs() {
            by_expert[e / el][e % el].push(RowSource { src_rank: s as u32, token: t as u32, slot: j as u32, weight: w });
        }
    }
    Ok(by_expert)
}

/// Normal-mode dispatch of all ranks' routings: what each rank receives.
pub fn dispatch(routings: &[Routing], cfg: &EpConfig) -> Result<Vec<Received>> {
    let by_expert = pairs_by_expert(routings, cfg)?;
    Ok(by_expert
        .into_iter()
        .map(|experts| {
            let mut r = Received { rows: Vec::new(), expert: Vec::new(), counts: Vec::new(), offsets: Vec::new() };
            for (e, pairs) in experts.into_iter().enumerate() {
                let (n, padded) = (pairs.len(), round_up(pairs.len(), cfg.m_align));
                r.offsets.push(r.rows.len() as u32);
                r.counts.push(n as u32);
                r.expert.extend(std::iter::repeat_n(e as i32, n).chain(std::iter::repeat_n(-1, padded - n)));
                r.rows.extend(pairs.into_iter().map(Some).chain(std::iter::repeat_n(None, padded - n)));
            }
            r
        })
        .collect())
}

/// What one rank receives in low-latency mode: `[E_local, R·max_tokens]` rows, the first
/// `counts[e]` of expert `e` valid.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedLowLatency {
    /// `[E_local, capacity]`: each row's source; `None` past the expert's count.
    pub rows: Vec<Option<RowSource>>,
    /// `[E_local]`: valid rows per local expert.
    pub counts: Vec<u32>,
    /// Rows per expert: `R · max_tokens`.
    pub capacity: usize,
}

/// Low-latency dispatch with at most `max_tokens` tokens per rank (the worst case the receive
/// buffers are sized for). Each token must name distinct experts ([`check_distinct_experts`]).
pub fn dispatch_low_latency(routings: &[Routing], cfg: &EpConfig, max_tokens: usize) -> Result<Vec<ReceivedLowLatency>> {
    if let Some((r, routing)) = routings.iter().enumerate().find(|(_, r)| r.tokens > max_tokens) {
        return Err(Error::InvalidArgument {
            arg: "tokens",
            reason: format!("rank {r} has {} tokens, more than max_tokens = {max_tokens}", routing.tokens),
        });
    }
    routings.iter().try_for_each(check_distinct_experts)?;
    let by_expert = pairs_by_expert(routings, cfg)?;
    // Distinct experts per token: an expert receives at most one row per (rank, token).
    let capacity = cfg.ranks * max_tokens;
    Ok(by_expert
        .into_iter()
        .map(|experts| {
            let mut r = ReceivedLowLatency { rows: Vec::with_capacity(experts.len() * capacity), counts: Vec::new(), capacity };
            for pairs in experts {
                r.counts.push(pairs.len() as u32);
                let n = pairs.len();
                r.rows.extend(pairs.into_iter().map(Some).chain(std::iter::repeat_n(None, capacity - n)));
            }
            r
        })
        .collect())
}

/// Rejects a token that names the same expert twice (low-latency buffers hold one row per token
/// and expert).
pub fn check_distinct_experts(routing: &Routing<'_>) -> Result<()> {
    for t in 0..routing.tokens {
        let row = &routing.topk_idx[t * routing.k..(t + 1) * routing.k];
        for (j, &e) in row.iter().enumerate() {
            if e >= 0 && row[..j].contains(&e) {
                return Err(Error::InvalidArgument { arg: "topk_idx", reason: format!("token {t} names expert {e} twice") });
            }
        }
    }
    Ok(())
}

/// Combine: each source rank's `[tokens, h]` output, `Σ_slots weight · y[row]`, from every rank's
/// expert outputs `y[d]` (`[rows, h]` row-major, rows as in `received[d]`), in f64.
pub fn combine(received: &[Received], y: &[&[f32]], tokens: &[usize], h: usize) -> Vec<Vec<f64>> {
    assert_eq!(received.len(), y.len(), "combine: one y per rank");
    let mut out: Vec<Vec<f64>> = tokens.iter().map(|&t| vec![0.0; t * h]).collect();
    for (d, recv) in received.iter().enumerate() {
        assert_eq!(y[d].len(), recv.rows.len() * h, "combine: y of rank {d} must be [{}, {h}]", recv.rows.len());
        for (row, src) in recv.rows.iter().enumerate() {
            let Some(src) = src else { continue };
            let dst = &mut out[src.src_rank as usize][src.token as usize * h..(src.token as usize + 1) * h];
            for (o, &v) in dst.iter_mut().zip(&y[d][row * h..(row + 1) * h]) {
                *o += f64::from(src.weight) * f64::from(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_ranks_by_hand() {
        let cfg = EpConfig { ranks: 2, num_experts: 4, m_align: 4 };
        // Rank 0: token 0 -> experts 3, 0; token 1 -> expert 1 and none.
        let idx0 = [3, 0, 1, -1];
        let w0 = [0.5, 0.25, 1.0, 9.0];
        // Rank 1: token 0 -> experts 0, 2.
        let idx1 = [0, 2];
        let w1 = [2.0, 3.0];
        let r0 = Routing { topk_idx: &idx0, topk_weights: &w0, tokens: 2, k: 2 };
        let r1 = Routing { topk_idx: &idx1, topk_weights: &w1, tokens: 1, k: 2 };
        let l0 = layout(&r0, &cfg).unwrap();
        assert_eq!(l0.tokens_per_rank, vec![2, 1]);
        assert_eq!(l0.tokens_per_expert, vec![1, 1, 0, 1]);
        assert_eq!(l0.is_token_in_rank, vec![true, true, true, false]);
        let recv = dispatch(&[r0, r1], &cfg).unwrap();
        // Rank 0 holds experts 0 and 1: expert 0 gets (rank 0, token 0) then (rank 1, token 0).
        assert_eq!(recv[0].counts, vec![2, 1]);
        assert_eq!(recv[0].offsets, vec![0, 4]);
        assert_eq!(recv[0].expert, vec![0, 0, -1, -1, 1, -1, -1, -1]);
        assert_eq!(recv[0].rows[1], Some(RowSource { src_rank: 1, token: 0, slot: 0, weight: 2.0 }));
        assert_eq!(recv[1].counts, vec![1, 1]);
        // Identity experts: y row = its source token's value; combine = value * sum of weights.
        let x = [[10.0f32, 20.0], [30.0, 0.0]];
        let ys: Vec<Vec<f32>> = recv
            .iter()
            .map(|r| r.rows.iter().map(|s| s.map_or(f32::NAN, |s| x[s.src_rank as usize][s.token as usize])).collect())
            .collect();
        let yrefs: Vec<&[f32]> = ys.iter().map(Vec::as_slice).collect();
        let out = combine(&recv, &yrefs, &[2, 1], 1);
        assert_eq!(out, vec![vec![10.0 * 0.75, 20.0], vec![30.0 * 5.0]]);
        let ll = dispatch_low_latency(&[r0, r1], &cfg, 2).unwrap();
        assert_eq!((ll[0].capacity, ll[0].counts.clone()), (4, vec![2, 1]));
        assert_eq!(ll[0].rows[0..2], recv[0].rows[0..2]);
    }

    #[test]
    fn bad_routing_is_an_error() {
        let cfg = EpConfig { ranks: 2, num_experts: 4, m_align: 128 };
        let w = [1.0f32; 2];
        let bad = Routing { topk_idx: &[4, 0], topk_weights: &w, tokens: 1, k: 2 };
        assert!(matches!(layout(&bad, &cfg), Err(Error::InvalidArgument { arg: "topk_idx", .. })));
        let short = Routing { topk_idx: &[0], topk_weights: &w, tokens: 1, k: 2 };
        assert!(matches!(layout(&short, &cfg), Err(Error::Shape { arg: "topk_idx", .. })));
        let uneven = EpConfig { ranks: 3, num_experts: 4, m_align: 128 };
        assert!(matches!(
            layout(&Routing { topk_idx: &[0, 1], topk_weights: &w, tokens: 1, k: 2 }, &uneven),
            Err(Error::InvalidArgument { arg: "num_experts", .. })
        ));
        let dup = Routing { topk_idx: &[1, 1], topk_weights: &w, tokens: 1, k: 2 };
        assert!(check_distinct_experts(&dup).is_err());
        let ok = Routing { topk_idx: &[1, -1], topk_weights: &w, tokens: 1, k: 2 };
        assert!(matches!(dispatch_low_latency(&[ok, ok], &cfg, 0), Err(Error::InvalidArgument { arg: "tokens", .. })));
    }
}
