//! Properties of the expert-parallel reference (no GPU). What each proves:
//! - every (rank, token, slot) pair with an expert arrives exactly once, on the expert's rank, in
//!   the expert's segment, and nothing else arrives; segments are padded to `m_align` with -1 rows;
//! - rows inside a segment are ordered by (source rank, token, slot);
//! - counts per expert and per rank equal direct counts of the routing;
//! - combine of dispatch with identity experts equals `x · Σ weights` per token;
//! - low-latency dispatch carries the same rows per expert as normal dispatch, packed from row 0;
//! - the device kernels' placement, mirrored on the CPU (`plan::ep::{pair_positions, normal_row,
//!   ll_rows}`), puts every pair exactly where the reference does, in both modes;
//! - the staged transports (copy engines, NCCL): every pair's outbox row lies in the run its
//!   source sends to the pair's rank, the run lands it on the inbox row the receive kernel reads
//!   for the pair's output row, and the runs tile every outbox and inbox without overlap.

use deepkern::plan::ep::{
    GroupShape, Payload, Transport, inbox_row, inbox_row_of_output, ll_rows, normal_row, outbox_row, pair_positions, staged_run,
};
use deepkern::reference::ep::{EpConfig, Routing, check_distinct_experts, combine, dispatch, dispatch_low_latency, layout};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One rank's routing: (topk_idx, topk_weights, tokens).
type RankData = (Vec<i32>, Vec<f32>, usize);

/// Routings for `ranks` ranks: (topk_idx, topk_weights, tokens) per rank, distinct experts per
/// token, some -1 slots, some ranks with no tokens, optionally one hot expert.
fn routings(ranks: usize, experts: usize, k: usize) -> impl Strategy<Value = Vec<RankData>> {
    let one = (0usize..40, any::<u64>(), any::<bool>()).prop_map(move |(tokens, seed, hot)| {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut idx = Vec::with_capacity(tokens * k);
        let mut w = Vec::with_capacity(tokens * k);
        for _ in 0..tokens {
            let mut row: Vec<i32> = Vec::new();
            for j in 0..k {
                let e = if hot && j == 0 {
                    0
                } else if rng.random_ratio(1, 5) {
                    -1
                } else {
                    rng.random_range(0..experts as i32)
                };
                row.push(if e >= 0 && row.contains(&e) { -1 } else { e });
                w.push(rng.random_range(0..1000) as f32 / 1000.0);
            }
            idx.extend(row);
        }
        (idx, w, tokens)
    });
    proptest::collection::vec(one, ranks)
}

fn case() -> impl Strategy<Value = (EpConfig, usize, Vec<RankData>)> {
    (prop_oneof![Just(1usize), Just(2), Just(4), Just(8)], 1usize..5, 1usize..9, prop_oneof![Just(1usize), Just(4), Just(128)])
        .prop_flat_map(|(ranks, per_rank, k, m_align)| {
            let experts = ranks * per_rank;
            let k = k.min(experts);
            (Just(EpConfig { ranks, num_experts: experts, m_align }), Just(k), routings(ranks, experts, k))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dispatch_delivers_every_pair_once_in_order((cfg, k, data) in case()) {
        let routings: Vec<Routing> = data.iter().map(|(i, w, t)| Routing { topk_idx: i, topk_weights: w, tokens: *t, k }).collect();
        let recv = dispatch(&routings, &cfg).unwrap();
        let el = cfg.experts_per_rank();
        // Every pair, expected at (rank, local expert), in (src, token, slot) order.
        let mut want = vec![vec![Vec::new(); el]; cfg.ranks];
        for (s, r) in routings.iter().enumerate() {
            for i in 0..r.tokens * k {
                let e = r.topk_idx[i];
                if e >= 0 {
                    want[e as usize / el][e as usize % el].push((s as u32, (i / k) as u32, (i % k) as u32, r.topk_weights[i]));
                }
            }
        }
        for (d, rd) in recv.iter().enumerate() {
            let mut row = 0usize;
            for (e, want_e) in want[d].iter().enumerate() {
                prop_assert_eq!(rd.offsets[e] as usize, row);
                prop_assert_eq!(rd.counts[e] as usize, want_e.len());
                for &(s, t, j, w) in want_e {
                    let got = rd.rows[row].expect("a valid row");
                    prop_assert_eq!((got.src_rank, got.token, got.slot, got.weight), (s, t, j, w));
                    prop_assert_eq!(rd.expert[row], e as i32);
                    row += 1;
                }
                while !row.is_multiple_of(cfg.m_align) {
                    prop_assert!(rd.rows[row].is_none() && rd.expert[row] == -1, "row {} should be padding", row);
                    row += 1;
                }
            }
            prop_assert_eq!(row, rd.rows.len());
        }

        // Counts per expert and per rank, against direct counting.
        for r in &routings {
            let l = layout(r, &cfg).unwrap();
            for e in 0..cfg.num_experts {
                prop_assert_eq!(l.tokens_per_expert[e] as usize, r.topk_idx.iter().filter(|&&x| x == e as i32).count());
            }
            for d in 0..cfg.ranks {
                let direct = (0..r.tokens).filter(|&t| r.topk_idx[t * k..(t + 1) * k].iter().any(|&x| x >= 0 && x as usize / el == d)).count();
                prop_assert_eq!(l.tokens_per_rank[d] as usize, direct);
            }
        }

        // Identity experts: combine returns x · Σ weights (h = 2 columns per token).
        let h = 2;
        let x = |s: u32, t: u32, c: usize| (s * 1000 + t) as f32 + c as f32 * 0.5;
        let ys: Vec<Vec<f32>> = recv
            .iter()
            .map(|rd| rd.rows.iter().flat_map(|src| (0..h).map(move |c| src.map_or(f32::NAN, |s| x(s.src_rank, s.token, c)))).collect())
            .collect();
        let yrefs: Vec<&[f32]> = ys.iter().map(Vec::as_slice).collect();
        let tokens: Vec<usize> = routings.iter().map(|r| r.tokens).collect();
        let out = combine(&recv, &yrefs, &tokens, h);
        for (s, r) in routings.iter().enumerate() {
            for t in 0..r.tokens {
                let wsum: f64 = (0..k).filter(|&j| r.topk_idx[t * k + j] >= 0).map(|j| f64::from(r.topk_weights[t * k + j])).sum();
                for c in 0..h {
                    let want = f64::from(x(s as u32, t as u32, c)) * wsum;
                    prop_assert!((out[s][t * h + c] - want).abs() <= 1e-9 * want.abs().max(1.0));
                }
            }
        }

        // The device placement, mirrored: pair positions, counts all-gathered, rows.
        let max_tokens = tokens.iter().copied().max().unwrap_or(0);
        let shape = GroupShape {
            ranks: cfg.ranks,
            num_experts: cfg.num_experts,
            hidden: 128,
            max_tokens: max_tokens.max(1),
            ll_max_tokens: max_tokens.max(1),
            max_topk: k,
            m_align: cfg.m_align,
            recv_rows: 0,
            payload: Payload::Fp8,
            transport: Transport::Nccl,
        };
        let counts: Vec<i32> = routings.iter().flat_map(|r| layout(r, &cfg).unwrap().tokens_per_expert.into_iter().map(|c| c as i32)).collect();
        let ll_want = dispatch_low_latency(&routings, &cfg, max_tokens).unwrap();
        for (s, r) in routings.iter().enumerate() {
            let pos = pair_positions(r.topk_idx, cfg.num_experts);
            for (i, &e) in r.topk_idx.iter().enumerate() {
                if e < 0 {
                    prop_assert_eq!(pos[i], -1);
                    continue;
                }
                let (e, d) = (e as usize, e as usize / el);
                let row = normal_row(&shape, &counts, s, e, pos[i] as usize);
                let got = recv[d].rows[row].expect("a pair's row");
                prop_assert_eq!((got.src_rank as usize, got.token as usize, got.slot as usize), (s, i / k, i % k));
                let per_src: Vec<usize> = (0..cfg.ranks).map(|x| counts[x * cfg.num_experts + e] as usize).collect();
                let (_, out) = ll_rows(&shape, &per_src, s, e, pos[i] as usize);
                let got = ll_want[d].rows[out].expect("a low-latency pair's row");
                prop_assert_eq!((got.src_rank as usize, got.token as usize, got.slot as usize), (s, i / k, i % k));

                // Staged: outbox row -> the run to d -> inbox row, which the receive kernel's
                // search finds again from the pair's output row.
                let tpe = &counts[s * cfg.num_experts..(s + 1) * cfg.num_experts];
                let o = outbox_row(tpe, e, pos[i] as usize);
                let run = staged_run(&shape, &counts, s, d);
                prop_assert!(o >= run.outbox_row && o < run.outbox_row + run.rows, "pair {} of rank {}: {} outside {:?}", i, s, o, run);
                let inbox = run.inbox_row + (o - run.outbox_row);
                prop_assert_eq!(inbox, inbox_row(&shape, &counts, s, e, pos[i] as usize));
                let le = e % el;
                let q = row - recv[d].offsets[le] as usize;
                prop_assert_eq!(inbox_row_of_output(&shape, &counts, d, le, q), inbox);
            }
        }
        // The runs tile each source's outbox (in destination order) and each inbox (in source order).
        for s in 0..cfg.ranks {
            let mut at = 0;
            for d in 0..cfg.ranks {
                let run = staged_run(&shape, &counts, s, d);
                prop_assert_eq!(run.outbox_row, at);
                at += run.rows;
            }
            prop_assert_eq!(at, counts[s * cfg.num_experts..(s + 1) * cfg.num_experts].iter().sum::<i32>() as usize);
        }
        for (d, rd) in recv.iter().enumerate() {
            let mut at = 0;
            for s in 0..cfg.ranks {
                let run = staged_run(&shape, &counts, s, d);
                prop_assert_eq!(run.inbox_row, at);
                at += run.rows;
            }
            prop_assert_eq!(at, rd.counts.iter().sum::<u32>() as usize);
        }

        // Low latency: the same rows per expert, packed from row 0.
        prop_assert!(routings.iter().all(|r| check_distinct_experts(r).is_ok()));
        let ll = dispatch_low_latency(&routings, &cfg, max_tokens).unwrap();
        for (d, (l, n)) in ll.iter().zip(&recv).enumerate() {
            prop_assert_eq!(&l.counts, &n.counts, "rank {}", d);
            for e in 0..el {
                let (c, off) = (n.counts[e] as usize, n.offsets[e] as usize);
                prop_assert_eq!(&l.rows[e * l.capacity..e * l.capacity + c], &n.rows[off..off + c]);
                prop_assert!(l.rows[e * l.capacity + c..(e + 1) * l.capacity].iter().all(Option::is_none));
            }
        }
    }
}
