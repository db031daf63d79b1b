//! Properties of the GEMM planner (no GPU). What each proves:
//! - every plan is legal for the kernel: shared memory within the device's opt-in limit, wgmma-legal
//!   `block_n`, `block_m` in {64, 128} (128 for the contiguous layout), 3..=16 stages, one producer
//!   plus `block_m / 64` consumer warpgroups;
//! - the tiles cover the problem, and the persistent grid uses every SM whenever there are at
//!   least as many tiles as SMs;
//! - the chosen plan is the cheapest feasible candidate (checked by brute force).

use deepkern::DeviceInfo;
use deepkern::layout::ceil_div;
use deepkern::plan::gemm::{GemmLayout, GemmProblem, MAX_BLOCK_N, TileCost, candidates, plan, smem_plan};
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
        prop_assert_eq!(chosen.smem, smem_plan(chosen.block_m, chosen.block_n, p.k, chosen.stages));
        prop_assert!(chosen.block_n.is_multiple_of(8) && (16..=MAX_BLOCK_N).contains(&chosen.block_n));
        prop_assert!([64, 128].contains(&chosen.block_m));
        if let GemmLayout::GroupedContiguous { .. } = layout {
            prop_assert_eq!(chosen.block_m, 128);
        }
        prop_assert!((3..=16).contains(&chosen.stages));
        prop_assert_eq!(chosen.math_warpgroups, chosen.block_m / 64);
        prop_assert_eq!(chosen.threads, 128 * (1 + chosen.math_warpgroups));

        // Coverage: the tiles span every output row and column of the work.
        let (rows, groups) = match layout {
            GemmLayout::GroupedMasked { groups, expected_m, .. } => (expected_m, groups),
            _ => (m, 1),
        };
        prop_assert_eq!(chosen.tiles, groups * ceil_div(rows, chosen.block_m) * ceil_div(n, chosen.block_n));
        prop_assert!(ceil_div(rows, chosen.block_m) * chosen.block_m >= rows && ceil_div(n, chosen.block_n) * chosen.block_n >= n);
        // Every SM gets work where the problem allows.
        prop_assert_eq!(chosen.grid, chosen.tiles.min(sms as usize));
        prop_assert!(chosen.waves * sms as usize >= chosen.tiles && chosen.last_wave_tiles <= sms as usize);
        if chosen.tiles > 0 {
            prop_assert!(chosen.last_wave_tiles >= 1);
        }
        // Optimal under the model: no feasible candidate is strictly cheaper.
        for c in candidates(&p, &dev, TileCost::HOPPER).unwrap() {
            prop_assert!(c.cost >= chosen.cost, "{c:?} beats {chosen:?}");
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
