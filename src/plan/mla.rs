//! Split-KV schedule for MLA decode: every sequence's keys, in tiles of [`KV_BLOCK`], are cut into
//! contiguous chunks handed to `num_parts` persistent CTAs so that each does about the same work.
//!
//! This is the reference algorithm: the GPU scheduler (which writes the same plan to device memory
//! so that a decode step can be captured in a CUDA graph) must produce it bit for bit.
//!
//! Cost model, in KV tiles: a chunk costs its tiles plus [`SPLIT_OVERHEAD`] (the per-chunk prologue,
//! epilogue and share of the combine). With `total = Σ (tiles + SPLIT_OVERHEAD)` over the batch,
//! every part gets the budget `share + SPLIT_OVERHEAD`, with `share = ceil(total / num_parts)`, and
//! the walk cuts the requests, in order, into chunks that fill each budget (FlashMLA's
//! `get_mla_metadata` plans the same way).
//!
//! Why one overhead is enough: a part moves on either right after cutting a request (it took
//! every tile its budget allowed, so it used the whole budget) or because less than one tile
//! plus an overhead was left (it used more than `budget - SPLIT_OVERHEAD - 1`, so at least
//! `share`). A cut adds one chunk, so one overhead beyond the original cost, paid by the part after
//! it; charged to the part that cut instead, every part that moved on covered at least `share` of
//! the original cost. `num_parts` such parts would cover `total`, so the walk never needs more. A
//! second overhead would only make whole requests overflow into the next part: a batch of
//! `num_parts` equal requests would have every request but the last one cut.
//!
//! Guarantees (property-tested): every tile of every sequence lies in exactly one chunk, chunks of
//! a sequence are contiguous and in order; every sequence, empty ones included, has at least one
//! chunk (its CTA writes the output); no part costs more than its share plus one overhead; at most
//! `num_parts` parts are used.

use crate::layout::ceil_div;

/// Keys per kernel iteration (one 64-row tile of the latent cache).
pub const KV_BLOCK: usize = 64;
/// Cost of a chunk beyond its tiles, in tiles.
pub const SPLIT_OVERHEAD: usize = 5;
/// Query rows per CTA tile (heads x query tokens are packed as M rows).
pub const BLOCK_M: usize = 64;

/// One contiguous piece of one sequence's tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the request (sequence) in the batch.
    pub request: u32,
    /// First key tile of the chunk, in tiles of [`KV_BLOCK`] keys.
    pub begin_block: u32,
    /// Exclusive.
    pub end_block: u32,
    /// Index of this chunk among its request's chunks (0-based): its slot in the partial outputs.
    pub split: u32,
}

/// The chunks one persistent CTA processes, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Part {
    /// The chunks, in (request, tile) order.
    pub chunks: Vec<Chunk>,
}

impl Part {
    /// Tiles plus per-chunk overheads.
    pub fn cost(&self) -> usize {
        self.chunks.iter().map(|c| (c.end_block - c.begin_block) as usize + SPLIT_OVERHEAD).sum()
    }
}

/// A whole decode step's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// One entry per CTA (`num_parts` of them; trailing ones may be empty).
    pub parts: Vec<Part>,
    /// `[batch + 1]` cumulative chunk counts: request `r` has chunks `splits[r] .. splits[r+1]`;
    /// a request with one chunk writes its output directly, others go through the combine.
    pub splits: Vec<u32>,
    /// The per-part budget the walk used.
    pub budget: usize,
}

/// CTAs per head group: the SMs divided among the M tiles of packed query rows (at least 1).
pub fn num_parts(sms: usize, s_q: usize, h_q: usize) -> usize {
    (sms / ceil_div(s_q * h_q, BLOCK_M).max(1)).max(1)
}

/// Tiles of a sequence of `len` keys.
pub fn blocks(len: usize) -> usize {
    ceil_div(len, KV_BLOCK)
}

/// Cuts the sequences of lengths `lens` into a schedule for `num_parts` CTAs.
pub fn schedule(lens: &[u32], num_parts: usize) -> Schedule {
    assert!(num_parts > 0, "schedule: at least one part");
    let total: usize = lens.iter().map(|&l| blocks(l as usize) + SPLIT_OVERHEAD).sum();
    let budget = ceil_div(total, num_parts) + SPLIT_OVERHEAD;
    let mut parts = vec![Part::default(); num_parts];
    let mut splits = vec![0u32; lens.len() + 1];
    let mut part = 0usize;
    let mut left = budget;
    for (r, &len) in lens.iter().enumerate() {
        let n = blocks(len as usize);
        let mut begin = 0usize;
        let mut split = 0u32;
        loop {
            // A part that cannot take one more tile (or an empty request's chunk) moves on.
            let need = if n == begin { SPLIT_OVERHEAD } else { SPLIT_OVERHEAD + 1 };
            if left < need {
                part += 1;
                left = budget;
                assert!(part < num_parts, "schedule: budget {budget} too small for {num_parts} parts (a bug)");
            }
            let take = (n - begin).min(left - SPLIT_OVERHEAD);
            parts[part].chunks.push(Chunk { request: r as u32, begin_block: begin as u32, end_block: (begin + take) as u32, split });
            left -= take + SPLIT_OVERHEAD;
            begin += take;
            split += 1;
            if begin == n {
                break;
            }
        }
        splits[r + 1] = splits[r] + split;
    }
    Schedule { parts, splits, budget }
}

/// `i32`s per part in the device encoding of a schedule.
pub const PART_WORDS: usize = 5;

impl Schedule {
    /// The device encoding the GPU scheduler writes and the decode kernel reads: per part
    /// `[begin_req, begin_block, end_req, end_block, begin_split]`, where the part covers, in
    /// (request, tile) order, from tile `begin_block` of request `begin_req` up to (exclusive) tile
    /// `end_block` of request `end_req`, and `begin_split` is the split index of its first chunk.
    /// An empty part is `[-1, 0, -1, 0, 0]`.
    pub fn encode(&self) -> Vec<i32> {
        let mut words = Vec::with_capacity(self.parts.len() * PART_WORDS);
        for part in &self.parts {
            match (part.chunks.first(), part.chunks.last()) {
                (Some(first), Some(last)) => words.extend([
                    first.request as i32,
                    first.begin_block as i32,
                    last.request as i32,
                    last.end_block as i32,
                    first.split as i32,
                ]),
                _ => words.extend([-1, 0, -1, 0, 0]),
            }
        }
        words
    }

    /// Rebuilds the chunks from an encoding (`lens` gives each request's tile count): the inverse
    /// of [`Schedule::encode`] for schedules made by [`schedule`].
    pub fn decode(words: &[i32], lens: &[u32]) -> Vec<Part> {
        words
            .chunks(PART_WORDS)
            .map(|w| {
                let mut part = Part::default();
                if w[0] < 0 {
                    return part;
                }
                let (first, last) = (w[0] as usize, w[2] as usize);
                for (r, &len) in lens.iter().enumerate().take(last + 1).skip(first) {
                    let begin = if r == first { w[1] as u32 } else { 0 };
                    let end = if r == last { w[3] as u32 } else { blocks(len as usize) as u32 };
                    let split = if r == first { w[4] as u32 } else { 0 };
                    part.chunks.push(Chunk { request: r as u32, begin_block: begin, end_block: end, split });
                }
                part
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_long_sequence_is_spread_over_every_part() {
        let s = schedule(&[64 * 1000], 10);
        assert!(s.parts.iter().all(|p| !p.chunks.is_empty()), "{s:?}");
        assert_eq!(s.splits, vec![0, 10]);
        assert!(s.parts.iter().all(|p| p.cost() <= s.budget));
    }

    #[test]
    fn empty_and_short_sequences_get_one_chunk_each() {
        let s = schedule(&[0, 1, 63, 64, 65], 4);
        assert_eq!(s.splits, vec![0, 1, 2, 3, 4, 5]);
        let chunks: Vec<Chunk> = s.parts.iter().flat_map(|p| p.chunks.clone()).collect();
        assert_eq!(chunks[0], Chunk { request: 0, begin_block: 0, end_block: 0, split: 0 });
        assert_eq!(chunks[4], Chunk { request: 4, begin_block: 0, end_block: 2, split: 0 });
    }

    #[test]
    fn parts_per_head_group() {
        assert_eq!(num_parts(132, 1, 128), 66);
        assert_eq!(num_parts(132, 2, 128), 33);
        assert_eq!(num_parts(132, 1, 16), 132);
        assert_eq!(num_parts(4, 4, 128), 1);
    }
}
