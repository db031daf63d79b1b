//! Properties of the GEMM planner and the MLA split-KV schedule (no GPU). What each proves:
//! - every plan is legal for the kernel: shared memory within the device's opt-in limit, wgmma-legal
//!   `block_n`, `block_m` in {64, 128} (128 for the contiguous layout), 3..=16 stages, one producer
//!   plus `block_m / 64` consumer warpgroups;
//! - the tiles cover the problem, and the persistent grid uses every SM whenever there are at
//!   least as many tiles as SMs;
//! - the chosen plan is the cheapest feasible candidate (checked by brute force);
//! - the kernel's tile walk (`tile_coords`) visits every tile exactly once for any grouping;
//! - on the DeepSeek-V3 shapes the planner takes the tiles of `tests/data/gemm_plan_table.txt`
//!   (with DeepGEMM's choices where published and the model's reason where ours differ): a
//!   cost-model change that moves a choice fails until the table says why.
//! - MLA schedule: every tile in exactly one chunk, in order; no part above its share plus one
//!   overhead; uniform batches that fit whole are not split, short batches of long requests are;
//!   the split counts equal those of a port of FlashMLA's `get_mla_metadata`.

use deepkern::DeviceInfo;
use deepkern::layout::ceil_div;
use deepkern::plan::gemm::{
    GemmLayout, GemmProblem, MAX_BLOCK_N, Multicast, TileCost, block_n_menu, candidates, plan, plan_epilogue, smem_plan, tile_coords,
};
use proptest::prelude::*;

fn device(sms: u32, smem: usize) -> DeviceInfo {
    DeviceInfo {
        ordinal: 0,
        name: "test".into(),
        compute_capability: (9, 0),
        sm_count: sms,
        l2_cache_bytes: 50 << 20,
        max_shared_memory_per_block_optin: smem,
        total_memory_bytes: 80 << 30,
    }
}

fn layout() -> impl Strategy<Value = (GemmLayout, usize)> {
    prop_oneof![
        (1usize..20_000).prop_map(|m| (GemmLayout::Dense, m)),
        (1usize..9, 1usize..40).prop_map(|(g, blocks)| (GemmLayout::GroupedContiguous { groups: g }, blocks * 128)),
        (1usize..33, 1usize..1025, 0usize..=100)
            .prop_map(|(g, max_m, pct)| { (GemmLayout::GroupedMasked { groups: g, max_m, expected_m: max_m * pct / 100 }, g * max_m) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plans_are_legal_and_optimal(
        (layout, m) in layout(),
        n in 1usize..40_000,
        kb in 1usize..130,
        sms in prop_oneof![Just(132u32), Just(114), Just(78), 1u32..200],
        smem in prop_oneof![Just(232_448usize), Just(227 * 1024), 100_000usize..240_000],
    ) {
        let dev = device(sms, smem);
        let p = GemmProblem { m, n, k: kb * 128, layout };
        let chosen = plan(&p, &dev).unwrap();
        prop_assert!(chosen.smem.total <= smem, "{chosen:?}");
        let masked_groups = match layout { GemmLayout::GroupedMasked { groups, .. } => groups, _ => 0 };
        prop_assert_eq!(chosen.smem, smem_plan(chosen.block_m, chosen.block_n, chosen.stages, masked_groups, false));
        prop_assert!(block_n_menu(chosen.block_m).contains(&chosen.block_n));
        prop_assert!(chosen.block_n.is_multiple_of(16) && (16..=MAX_BLOCK_N).contains(&chosen.block_n));
        prop_assert!([8, 16].contains(&chosen.swizzle_group));
        prop_assert!([64, 128, 256].contains(&chosen.block_m));
        if let GemmLayout::GroupedContiguous { .. } = layout {
            prop_assert_eq!(chosen.block_m, 128);
        }
        prop_assert!((3..=16).contains(&chosen.stages));
        prop_assert_eq!(chosen.math_warpgroups, if chosen.block_m == 64 { 1 } else { 2 });
        prop_assert_eq!(chosen.threads, 128 * (1 + chosen.math_warpgroups));

        // Coverage: the tiles span every output row and column of the work.
        let (rows, groups) = match layout {
            GemmLayout::GroupedMasked { groups, expected_m, .. } => (expected_m, groups),
            _ => (m, 1),
        };
        prop_assert_eq!(chosen.tiles, groups * ceil_div(rows, chosen.block_m) * ceil_div(n, chosen.block_n));
        prop_assert!(ceil_div(rows, chosen.block_m) * chosen.block_m >= rows && ceil_div(n, chosen.block_n) * chosen.block_n >= n);
        // Every SM gets work where the problem allows (with multicast, every whole pair of SMs).
        let slots = if chosen.multicast == Multicast::None { sms as usize } else { sms as usize / 2 * 2 };
        prop_assert_eq!(chosen.grid, chosen.tiles.min(slots));
        prop_assert!(chosen.waves * slots >= chosen.tiles && chosen.last_wave_tiles <= slots);
        // Multicast only where it can pay: the dense and contiguous layouts, more than one wave,
        // whole pairs of tiles along its direction.
        if chosen.multicast != Multicast::None {
            let masked = matches!(layout, GemmLayout::GroupedMasked { .. });
            prop_assert!(!masked, "{chosen:?}");
            prop_assert!(chosen.waves >= 2, "{chosen:?}");
            prop_assert!(m >= deepkern::plan::gemm::MULTICAST_MIN_ROWS, "{chosen:?}");
            let pairs_along = if chosen.multicast == Multicast::A { ceil_div(n, chosen.block_n) } else { ceil_div(rows, chosen.block_m) };
            prop_assert!(pairs_along.is_multiple_of(2), "{chosen:?}");
        }
        if chosen.tiles > 0 {
            prop_assert!(chosen.last_wave_tiles >= 1);
        }
        // The TMA-store epilogue's plan reserves its staging tile (dense only) and still fits.
        let t = plan_epilogue(&p, &dev, TileCost::HOPPER, true).unwrap();
        prop_assert_eq!(t.tma_store, layout == GemmLayout::Dense);
        prop_assert!(t.smem.total <= smem);
        prop_assert_eq!(t.smem, smem_plan(t.block_m, t.block_n, t.stages, masked_groups, t.tma_store));
        // Optimal under the model: no feasible candidate is strictly cheaper.
        for c in candidates(&p, &dev, TileCost::HOPPER).unwrap() {
            prop_assert!(c.cost >= chosen.cost, "{c:?} beats {chosen:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tile_walk_is_a_bijection(m_tiles in 1usize..70, n_tiles in 1usize..70, group in 1usize..20) {
        let mut seen = vec![false; m_tiles * n_tiles];
        for t in 0..m_tiles * n_tiles {
            let (mb, nb) = tile_coords(t, m_tiles, n_tiles, group);
            prop_assert!(mb < m_tiles && nb < n_tiles, "{t} -> ({mb}, {nb})");
            prop_assert!(!std::mem::replace(&mut seen[mb * n_tiles + nb], true), "({mb}, {nb}) twice");
        }
    }
}

#[test]
fn small_m_uses_64_row_tiles() {
    let dev = device(132, 232_448);
    for m in [1, 7, 64] {
        let p = GemmProblem { m, n: 4096, k: 7168, layout: GemmLayout::Dense };
        assert_eq!(plan(&p, &dev).unwrap().block_m, 64, "m = {m}");
    }
}

/// The planner's choices on the DeepSeek-V3 shapes, as data.
const TABLE: &str = include_str!("data/gemm_plan_table.txt");

/// `layout m n k -> block_m block_n [multicast:A|multicast:B]` (a `#` starts a comment) as the
/// problem and the tile.
fn parse(line: &str) -> Result<(GemmProblem, (usize, usize, Multicast)), String> {
    let (problem, tile) = line.split_once("->").ok_or("no `->`")?;
    let words: Vec<&str> = problem.split_whitespace().collect();
    let num = |w: &str| w.parse::<usize>().map_err(|e| format!("{w}: {e}"));
    let [layout, m, n, k] = words[..] else { return Err(format!("expected `layout m n k`, got {problem:?}")) };
    let (m, n, k) = (num(m)?, num(n)?, num(k)?);
    let layout = match layout.split_once(':') {
        None if layout == "dense" => GemmLayout::Dense,
        Some(("contiguous", g)) => GemmLayout::GroupedContiguous { groups: num(g)? },
        Some(("masked", g)) => {
            let groups = num(g)?;
            let max_m = m / groups.max(1);
            GemmLayout::GroupedMasked { groups, max_m, expected_m: max_m }
        }
        _ => return Err(format!("unknown layout {layout}")),
    };
    let words: Vec<&str> = tile.split_whitespace().collect();
    let (block_m, block_n, multicast) = match words[..] {
        [bm, bn] => (num(bm)?, num(bn)?, Multicast::None),
        [bm, bn, "multicast:A"] => (num(bm)?, num(bn)?, Multicast::A),
        [bm, bn, "multicast:B"] => (num(bm)?, num(bn)?, Multicast::B),
        _ => return Err(format!("expected `block_m block_n [multicast:A|B]`, got {tile:?}")),
    };
    Ok((GemmProblem { m, n, k, layout }, (block_m, block_n, multicast)))
}

#[test]
fn planner_matches_the_table() {
    let dev = device(132, 232_448);
    let mut rows = 0;
    let mut wrong = Vec::new();
    for (i, raw) in TABLE.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (problem, want) = parse(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let got = plan(&problem, &dev).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        rows += 1;
        if (got.block_m, got.block_n, got.multicast) != want {
            wrong.push(format!("line {}: {line}: the planner takes {}x{} {:?}", i + 1, got.block_m, got.block_n, got.multicast));
        }
    }
    // 30 dense problems, 4 contiguous, 6 masked: a table that lost rows would pass vacuously.
    assert_eq!(rows, 40, "rows in the table");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

mod mla {
    use deepkern::plan::mla::{SPLIT_OVERHEAD, blocks, schedule};
    use proptest::prelude::*;

    fn lens() -> impl Strategy<Value = Vec<u32>> {
        proptest::collection::vec(prop_oneof![Just(0u32), Just(1), Just(63), Just(64), Just(65), 0u32..2_000, 0u32..200_000], 1..130)
    }

    /// `(len, n, parts)`: `n` requests of `len` keys that fit whole on `parts` parts: `n` a
    /// multiple of `parts`, or `n <= parts` with one request within its share plus an overhead
    /// (`cost <= n · cost / parts + overhead`, so `cost · (parts - n) <= overhead · parts`).
    fn uniform_fitting() -> impl Strategy<Value = (u32, usize, usize)> {
        (1usize..200).prop_flat_map(|parts| {
            let multiple = (1usize..4, 1u32..300_000).prop_map(move |(m, len)| (len, m * parts, parts));
            let fewer = (1..=parts).prop_flat_map(move |n| {
                let max_cost = if n == parts { 5000 } else { (SPLIT_OVERHEAD * parts / (parts - n)).min(5000) };
                let max_len = ((max_cost - SPLIT_OVERHEAD) * 64).max(1) as u32;
                (1..=max_len).prop_map(move |len| (len, n, parts))
            });
            prop_oneof![multiple, fewer]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Coverage, order, split bookkeeping and balance of the split-KV schedule.
        #[test]
        fn schedule_covers_every_tile_once_and_balances(lens in lens(), parts in 1usize..200) {
            let s = schedule(&lens, parts);
            prop_assert_eq!(s.parts.len(), parts);
            let total: usize = lens.iter().map(|&l| blocks(l as usize) + SPLIT_OVERHEAD).sum();
            let share = total.div_ceil(parts);
            prop_assert_eq!(s.budget, share + SPLIT_OVERHEAD);
            // Balance: no part costs more than its share plus one chunk overhead.
            for p in &s.parts {
                prop_assert!(p.cost() <= share + SPLIT_OVERHEAD, "cost {} > share {share} + {SPLIT_OVERHEAD}", p.cost());
            }
            // Used parts come first; after the first empty part all are empty.
            let used = s.parts.iter().take_while(|p| !p.chunks.is_empty()).count();
            prop_assert!(s.parts[used..].iter().all(|p| p.chunks.is_empty()));
            // Walking parts in order visits every request's tiles exactly once, contiguously.
            let chunks: Vec<_> = s.parts.iter().flat_map(|p| p.chunks.iter().copied()).collect();
            let mut next = (0u32, 0u32, 0u32); // (request, block, split)
            for c in &chunks {
                if c.request != next.0 {
                    prop_assert_eq!(c.request, next.0 + 1, "a request was skipped");
                    prop_assert_eq!(next.1 as usize, blocks(lens[next.0 as usize] as usize), "request {} incomplete", next.0);
                    next = (c.request, 0, 0);
                }
                prop_assert_eq!((c.begin_block, c.split), (next.1, next.2));
                prop_assert!(c.end_block > c.begin_block || blocks(lens[c.request as usize] as usize) == 0);
                next = (c.request, c.end_block, c.split + 1);
                prop_assert!(s.splits[c.request as usize] + c.split < s.splits[c.request as usize + 1]);
            }
            prop_assert_eq!(next.0 as usize, lens.len() - 1);
            prop_assert_eq!(next.1 as usize, blocks(*lens.last().unwrap() as usize));
            // The device encoding round-trips.
            prop_assert_eq!(&deepkern::plan::mla::Schedule::decode(&s.encode(), &lens), &s.parts);
            // Split counts agree with the chunks.
            for r in 0..lens.len() {
                let n = chunks.iter().filter(|c| c.request as usize == r).count() as u32;
                prop_assert_eq!(s.splits[r + 1] - s.splits[r], n);
                prop_assert!(n >= 1);
            }
            // The same split counts as FlashMLA's planner.
            prop_assert_eq!(&s.splits, &flashmla_splits(&lens, parts));
        }

        /// A uniform batch of requests that fit whole is never split: either at most one request
        /// per part with each within the budget, or the same number of requests on every part.
        #[test]
        fn uniform_batches_that_fit_whole_are_not_split((len, n, parts) in uniform_fitting()) {
            let cost = blocks(len as usize) + SPLIT_OVERHEAD;
            let share = (n * cost).div_ceil(parts);
            prop_assert!((n <= parts && cost <= share + SPLIT_OVERHEAD) || n.is_multiple_of(parts));
            let s = schedule(&vec![len; n], parts);
            prop_assert_eq!(s.splits, (0..=n as u32).collect::<Vec<_>>());
        }
    }

    /// Uniform batches of requests that fit whole under the budget: every request in one chunk,
    /// and the critical path is whole requests. Short batches of long requests are still cut, or
    /// most parts would idle.
    #[test]
    fn uniform_batches() {
        for (n, len, parts) in [(128, 2048, 66), (128, 2048, 132), (132, 32768, 66), (132, 32768, 132), (66, 4096, 66)] {
            let s = schedule(&vec![len; n], parts);
            assert_eq!(s.splits, (0..=n as u32).collect::<Vec<_>>(), "{n} x {len} on {parts} parts: a request was split");
            let heaviest = s.parts.iter().map(|p| p.cost()).max().unwrap();
            let per_part = n.div_ceil(parts);
            assert_eq!(heaviest, per_part * (blocks(len as usize) + SPLIT_OVERHEAD), "{n} x {len} on {parts} parts");
        }
        let s = schedule(&[65536; 8], 132);
        let total = 8 * (blocks(65536) + SPLIT_OVERHEAD);
        assert!(s.splits.windows(2).all(|w| w[1] - w[0] > 1), "8 x 65536 on 132 parts: a long request was not split: {:?}", s.splits);
        assert!(s.parts.iter().all(|p| p.cost() <= total.div_ceil(132) + SPLIT_OVERHEAD));
        assert!(s.parts.iter().filter(|p| !p.chunks.is_empty()).count() >= 120, "8 x 65536 on 132 parts: most parts idle");
    }

    /// Split counts (`[batch + 1]`, cumulative) of FlashMLA's `get_mla_metadata` (v1, hopper):
    /// a port written from its description, not its code. Per part a payload of
    /// `ceil(Σ (blocks + 5) / parts) + 5`; requests are taken whole while the payload covers
    /// their remaining blocks plus the overhead; otherwise, if more than the overhead is left,
    /// the request is cut after `payload - 5` blocks, and the next part continues it.
    ///
    /// It counts an empty sequence as 0 blocks, as deepkern does, so the counts agree on every
    /// input (checked above). Later FlashMLA versions count an empty sequence as one block
    /// (`max(1, len)`, so their main loop never runs empty); there, a batch with empty sequences
    /// has a larger total and budget, and the counts can differ: deepkern plans the true cost.
    fn flashmla_splits(lens: &[u32], parts: usize) -> Vec<u32> {
        const BLOCK_N: usize = 64;
        const OVERHEAD: usize = 5;
        let num_blocks: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(BLOCK_N)).collect();
        let total: usize = num_blocks.iter().map(|b| b + OVERHEAD).sum();
        let payload = total.div_ceil(parts) + OVERHEAD;
        let mut cum = vec![0u32; lens.len() + 1];
        let (mut idx, mut block, mut split_idx) = (0usize, 0usize, 0u32);
        for _ in 0..parts {
            let mut remain = payload;
            while idx < lens.len() {
                let rest = num_blocks[idx] - block;
                if remain >= rest + OVERHEAD {
                    cum[idx + 1] = cum[idx] + split_idx + 1;
                    remain -= rest + OVERHEAD;
                    idx += 1;
                    block = 0;
                    split_idx = 0;
                } else {
                    if remain > OVERHEAD {
                        block += remain - OVERHEAD;
                        split_idx += 1;
                    }
                    break;
                }
            }
        }
        assert_eq!((idx, block, split_idx), (lens.len(), 0, 0), "the port ran out of parts");
        cum
    }

    /// Split counts against the FlashMLA port on the batches of the balance discussion (the
    /// property above compares random batches).
    #[test]
    fn split_counts_match_flashmla() {
        let cases: [(&[u32], usize, u32); 6] = [
            (&[2048; 128], 132, 0),
            (&[2048; 128], 66, 0),
            (&[32768; 132], 132, 0),
            (&[32768; 132], 66, 0),
            (&[4096; 66], 66, 0),
            (&[65536; 8], 132, 8),
        ];
        for (lens, parts, split_requests) in cases {
            let s = schedule(lens, parts);
            assert_eq!(s.splits, flashmla_splits(lens, parts), "{} x {} on {parts} parts", lens.len(), lens[0]);
            let got = s.splits.windows(2).filter(|w| w[1] - w[0] > 1).count() as u32;
            assert_eq!(got, split_requests, "{} x {} on {parts} parts", lens.len(), lens[0]);
        }
    }
}

mod mla_reference {
    use deepkern::plan::mla::{KV_BLOCK, schedule};
    use deepkern::reference::mla::{HEAD_DIM_K, HEAD_DIM_V, MlaProblem, PagedCache, decode, decode_chunk, merge, visible_keys};
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Moving pages around (and the block table with them) changes nothing; every output is a
        /// convex combination of the visible values; lse is finite exactly when a key is visible.
        #[test]
        fn paging_is_transparent_and_outputs_are_convex(
            lens in proptest::collection::vec(0i32..80, 1..4), s_q in 1usize..4, h_q in 1usize..3,
            page in prop_oneof![Just(16usize), Just(32), Just(64)], seed in any::<u64>(), perm_seed in any::<u64>(),
        ) {
            let batch = lens.len();
            let max_pages = 80usize.div_ceil(page);
            let pages = batch * max_pages;
            let data = values(pages * page * HEAD_DIM_K, seed);
            let q = values(batch * s_q * h_q * HEAD_DIM_K, seed ^ 0xabc);
            let table: Vec<i32> = (0..pages as i32).collect();
            let cache = PagedCache { data: &data, page, block_table: &table, max_pages, lens: &lens };
            let a = decode(&MlaProblem { q: &q, batch, s_q, h_q, cache, softmax_scale: 0.05 });
            // A permutation of the pages: page p moves to perm[p].
            let mut perm: Vec<usize> = (0..pages).collect();
            perm.shuffle(&mut SmallRng::seed_from_u64(perm_seed));
            let mut moved = vec![f32::NAN; data.len()];
            for p in 0..pages {
                let len = page * HEAD_DIM_K;
                moved[perm[p] * len..(perm[p] + 1) * len].copy_from_slice(&data[p * len..(p + 1) * len]);
            }
            let table2: Vec<i32> = (0..pages).map(|p| perm[p] as i32).collect();
            let cache2 = PagedCache { data: &moved, page, block_table: &table2, max_pages, lens: &lens };
            let b = decode(&MlaProblem { q: &q, batch, s_q, h_q, cache: cache2, softmax_scale: 0.05 });
            prop_assert_eq!(&a, &b);
            for bi in 0..batch {
                for i in 0..s_q {
                    let seen = visible_keys(lens[bi] as usize, s_q, i);
                    for h in 0..h_q {
                        let row = (bi * s_q + i) * h_q + h;
                        prop_assert_eq!(a.lse[row].is_finite(), seen > 0);
                        for d in (0..HEAD_DIM_V).step_by(97) {
                            let vals = (0..seen).map(|t| f64::from(data[((bi * max_pages + t / page) * page + t % page) * HEAD_DIM_K + d]));
                            let o = a.out[row * HEAD_DIM_V + d];
                            if seen == 0 {
                                prop_assert_eq!(o, 0.0);
                                continue;
                            }
                            let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
                            prop_assert!(o >= lo - 1e-12 && o <= hi + 1e-12, "{} not in [{}, {}]", o, lo, hi);
                        }
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Split-KV is exact: attending to each chunk of a real schedule separately and merging the
        /// partials by their log-sum-exp gives the full attention of every row.
        #[test]
        fn merged_schedule_chunks_equal_full_attention(
            lens in proptest::collection::vec(0i32..260, 1..4), s_q in 1usize..3, parts in 1usize..12, seed in any::<u64>(),
        ) {
            let (batch, h_q, page) = (lens.len(), 2, 64);
            let max_pages = 260usize.div_ceil(page);
            let data = values(batch * max_pages * page * HEAD_DIM_K, seed);
            let q = values(batch * s_q * h_q * HEAD_DIM_K, seed ^ 0x5eed);
            let table: Vec<i32> = (0..(batch * max_pages) as i32).collect();
            let cache = PagedCache { data: &data, page, block_table: &table, max_pages, lens: &lens };
            let p = MlaProblem { q: &q, batch, s_q, h_q, cache, softmax_scale: 0.07 };
            let full = decode(&p);
            let plan = schedule(&lens.iter().map(|&l| l as u32).collect::<Vec<_>>(), parts);
            for b in 0..batch {
                let partials: Vec<_> = plan.parts.iter().flat_map(|part| part.chunks.iter())
                    .filter(|c| c.request as usize == b)
                    .map(|c| decode_chunk(&p, b, c.begin_block as usize * KV_BLOCK..c.end_block as usize * KV_BLOCK))
                    .collect();
                let merged = merge(&partials);
                let rows = s_q * h_q;
                for r in 0..rows {
                    let (want_lse, got_lse) = (full.lse[b * rows + r], merged.lse[r]);
                    prop_assert!(want_lse == got_lse || (want_lse - got_lse).abs() < 1e-9, "lse {} vs {}", got_lse, want_lse);
                    for d in 0..HEAD_DIM_V {
                        let (w, g) = (full.out[(b * rows + r) * HEAD_DIM_V + d], merged.out[r * HEAD_DIM_V + d]);
                        prop_assert!((w - g).abs() < 1e-9, "entry {} row {} dim {}: {} vs {}", b, r, d, g, w);
                    }
                }
            }
        }
    }
}
