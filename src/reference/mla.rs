//! MLA decode attention on the CPU, in f64: the reference for the MLA decode kernels.
//!
//! All query heads attend to one shared latent KV per token: keys are 576 wide (512 latent + 64
//! RoPE) and values are the first 512 columns of the same rows. For batch entry `b`, query token
//! `i` (of `s_q`) and head `h`:
//!
//! ```text
//! visible keys: t in 0 ..= len[b] - s_q + i        (causal multi-token decode; none if negative)
//! p[t]   = exp(scale · q·k[t] - max) / Σ exp(...)
//! out    = Σ_t p[t] · k[t][..512]                   (zeros when no key is visible)
//! lse    = ln Σ_t exp(scale · q·k[t])               (-inf when no key is visible)
//! ```
//!
//! The cache is paged: token `t` of entry `b` lives in page `block_table[b][t / page]`, row
//! `t % page`.

/// Key width: 512 latent + 64 RoPE.
pub const HEAD_DIM_K: usize = 576;
/// Value width: the latent part of the key.
pub const HEAD_DIM_V: usize = 512;

/// A paged KV cache `[num_pages, page, 576]` (row-major) and its addressing.
#[derive(Clone, Copy, Debug)]
pub struct PagedCache<'a> {
    pub data: &'a [f32],
    pub page: usize,
    /// `[batch, max_pages]` row-major page indices.
    pub block_table: &'a [i32],
    pub max_pages: usize,
    /// `[batch]` sequence lengths.
    pub lens: &'a [i32],
}

impl PagedCache<'_> {
    /// Key row of token `t` of batch entry `b`.
    pub fn key(&self, b: usize, t: usize) -> &[f32] {
        let page = self.block_table[b * self.max_pages + t / self.page];
        let page = usize::try_from(page).expect("block table entry is a valid page");
        let row = page * self.page + t % self.page;
        &self.data[row * HEAD_DIM_K..(row + 1) * HEAD_DIM_K]
    }
}

/// Output of [`decode`].
#[derive(Clone, Debug, PartialEq)]
pub struct MlaOut {
    /// `[batch, s_q, h_q, 512]`.
    pub out: Vec<f64>,
    /// `[batch, s_q, h_q]`, natural log.
    pub lse: Vec<f64>,
}

/// Number of keys query token `i` of `s_q` sees in a sequence of `len` tokens.
pub fn visible_keys(len: usize, s_q: usize, i: usize) -> usize {
    (len + i + 1).saturating_sub(s_q)
}

/// Reference MLA decode. `q` is `[batch, s_q, h_q, 576]` row-major.
pub fn decode(q: &[f32], batch: usize, s_q: usize, h_q: usize, cache: PagedCache, softmax_scale: f64) -> MlaOut {
    assert_eq!(q.len(), batch * s_q * h_q * HEAD_DIM_K, "q: expected [{batch}, {s_q}, {h_q}, {HEAD_DIM_K}]");
    assert_eq!(cache.lens.len(), batch, "lens: one per batch entry");
    assert_eq!(cache.block_table.len(), batch * cache.max_pages, "block_table: expected [{batch}, {}]", cache.max_pages);
    let mut out = vec![0.0f64; batch * s_q * h_q * HEAD_DIM_V];
    let mut lse = vec![f64::NEG_INFINITY; batch * s_q * h_q];
    let mut logits = Vec::new();
    for b in 0..batch {
        let len = usize::try_from(cache.lens[b]).expect("lengths are non-negative");
        assert!(len <= cache.max_pages * cache.page, "entry {b}: length {len} exceeds its block table");
        for i in 0..s_q {
            let seen = visible_keys(len, s_q, i);
            for h in 0..h_q {
                let row = (b * s_q + i) * h_q + h;
                let qv = &q[row * HEAD_DIM_K..(row + 1) * HEAD_DIM_K];
                logits.clear();
                logits.extend((0..seen).map(|t| {
                    let k = cache.key(b, t);
                    softmax_scale * qv.iter().zip(k).map(|(&a, &c)| f64::from(a) * f64::from(c)).sum::<f64>()
                }));
                if seen == 0 {
                    continue;
                }
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                lse[row] = max + sum.ln();
                let o = &mut out[row * HEAD_DIM_V..(row + 1) * HEAD_DIM_V];
                for (t, l) in logits.iter().enumerate() {
                    let p = (l - max).exp() / sum;
                    for (acc, &v) in o.iter_mut().zip(&cache.key(b, t)[..HEAD_DIM_V]) {
                        *acc += p * f64::from(v);
                    }
                }
            }
        }
    }
    MlaOut { out, lse }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_visibility() {
        assert_eq!(visible_keys(10, 1, 0), 10);
        assert_eq!((visible_keys(10, 3, 0), visible_keys(10, 3, 2)), (8, 10));
        assert_eq!((visible_keys(1, 3, 0), visible_keys(1, 3, 2)), (0, 1));
        assert_eq!(visible_keys(0, 1, 0), 0);
    }

    /// Two tokens with equal logits average their values; an empty sequence gives zeros and -inf;
    /// a shuffled block table reads the same tokens.
    #[test]
    fn small_cases_by_hand() {
        let page = 2;
        let mut data = vec![0.0f32; 4 * page * HEAD_DIM_K];
        // Page 3 holds tokens 0 and 1 of entry 0: keys orthogonal to q, values 2 and 4.
        for (r, v) in [(3 * page, 2.0f32), (3 * page + 1, 4.0)] {
            data[r * HEAD_DIM_K..r * HEAD_DIM_K + HEAD_DIM_V].fill(v);
        }
        let block_table = [3, 0, 1, 2];
        let lens = [2, 0];
        let cache = PagedCache { data: &data, page, block_table: &block_table, max_pages: 2, lens: &lens };
        let mut q = vec![0.0f32; 2 * HEAD_DIM_K];
        q[HEAD_DIM_K - 1] = 1.0; // RoPE part only: q·k = 0 for both tokens
        let r = decode(&q, 2, 1, 1, cache, 0.1);
        assert!(r.out[..HEAD_DIM_V].iter().all(|&o| (o - 3.0).abs() < 1e-12));
        assert!((r.lse[0] - 2f64.ln()).abs() < 1e-12);
        assert!(r.out[HEAD_DIM_V..].iter().all(|&o| o == 0.0) && r.lse[1] == f64::NEG_INFINITY);
    }
}
