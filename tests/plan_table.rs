//! The GEMM planner's choices on the DeepSeek-V3 shapes, as data (`tests/data/gemm_plan_table.txt`,
//! with DeepGEMM's choices where they are published and the model's reason where ours differ).
//! A cost-model change that moves a choice fails here until the table says why. No GPU.

use deepkern::DeviceInfo;
use deepkern::plan::gemm::{GemmLayout, GemmProblem, plan};

const TABLE: &str = include_str!("data/gemm_plan_table.txt");

fn h100() -> DeviceInfo {
    DeviceInfo {
        ordinal: 0,
        name: "table".into(),
        compute_capability: (9, 0),
        sm_count: 132,
        l2_cache_bytes: 50 << 20,
        max_shared_memory_per_block_optin: 232_448,
        total_memory_bytes: 80 << 30,
    }
}

/// `layout m n k -> block_m block_n` (a `#` starts a comment) as the problem and the tile.
fn parse(line: &str) -> Result<(GemmProblem, (usize, usize)), String> {
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
    let tile: Vec<usize> = tile.split_whitespace().map(num).collect::<Result<_, _>>()?;
    let [block_m, block_n] = tile[..] else { return Err(format!("expected `block_m block_n`, got {tile:?}")) };
    Ok((GemmProblem { m, n, k, layout }, (block_m, block_n)))
}

#[test]
fn planner_matches_the_table() {
    let dev = h100();
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
        if (got.block_m, got.block_n) != want {
            wrong.push(format!("line {}: {line}: the planner takes {}x{}", i + 1, got.block_m, got.block_n));
        }
    }
    // 30 dense problems, 4 contiguous, 6 masked: a table that lost rows would pass vacuously.
    assert_eq!(rows, 40, "rows in the table");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
