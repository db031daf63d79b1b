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
    /// `[num_pages, page, 576]` keys, row-major; the first 512 columns are also the values.
    pub data: &'a [f32],
    /// Keys per page.
    pub page: usize,
    /// `[batch, max_pages]` row-major page indices.
    pub block_table: &'a [i32],
    /// Columns of `block_table`.
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

/// One decode step: queries `q` (`[batch, s_q, h_q, 576]` row-major) against a paged cache.
#[derive(Clone, Copy, Debug)]
pub struct MlaProblem<'a> {
    /// `[batch, s_q, h_q, 576]` queries, row-major.
    pub q: &'a [f32],
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads per token.
    pub h_q: usize,
    /// The keys and values.
    pub cache: PagedCache<'a>,
    /// Factor applied to every q·k dot product before the softmax.
    pub softmax_scale: f64,
}

impl MlaProblem<'_> {
    fn check_shapes(&self) {
        let (batch, s_q, h_q, cache) = (self.batch, self.s_q, self.h_q, &self.cache);
        assert_eq!(self.q.len(), batch * s_q * h_q * HEAD_DIM_K, "q: expected [{batch}, {s_q}, {h_q}, {HEAD_DIM_K}]");
        assert_eq!(cache.lens.len(), batch, "lens: one per batch entry");
        assert_eq!(cache.block_table.len(), batch * cache.max_pages, "block_table: expected [{batch}, {}]", cache.max_pages);
        for (b, &len) in cache.lens.iter().enumerate() {
            let len = usize::try_from(len).expect("lengths are non-negative");
            assert!(len <= cache.max_pages * cache.page, "entry {b}: length {len} exceeds its block table");
        }
    }

    /// Query vector of (entry `b`, token `i`, head `h`) and its flat row index.
    fn query(&self, b: usize, i: usize, h: usize) -> (usize, &[f32]) {
        let row = (b * self.s_q + i) * self.h_q + h;
        (row, &self.q[row * HEAD_DIM_K..(row + 1) * HEAD_DIM_K])
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

/// Attention of one query row over keys `keys` of entry `b`: writes the normalised output into
/// `out` (`[512]`, zeros for an empty range) and returns the log-sum-exp (-inf for an empty range).
fn attend(qv: &[f32], cache: &PagedCache, b: usize, keys: std::ops::Range<usize>, softmax_scale: f64, out: &mut [f64]) -> f64 {
    out.fill(0.0);
    if keys.is_empty() {
        return f64::NEG_INFINITY;
    }
    let logits: Vec<f64> = keys
        .clone()
        .map(|t| softmax_scale * qv.iter().zip(cache.key(b, t)).map(|(&a, &c)| f64::from(a) * f64::from(c)).sum::<f64>())
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    for (t, l) in keys.zip(&logits) {
        let p = (l - max).exp() / sum;
        for (acc, &v) in out.iter_mut().zip(&cache.key(b, t)[..HEAD_DIM_V]) {
            *acc += p * f64::from(v);
        }
    }
    max + sum.ln()
}

/// Reference MLA decode of every row.
pub fn decode(p: &MlaProblem) -> MlaOut {
    p.check_shapes();
    let mut out = vec![0.0f64; p.batch * p.s_q * p.h_q * HEAD_DIM_V];
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.s_q * p.h_q];
    for b in 0..p.batch {
        let len = p.cache.lens[b] as usize;
        for i in 0..p.s_q {
            for h in 0..p.h_q {
                let (row, qv) = p.query(b, i, h);
                let o = &mut out[row * HEAD_DIM_V..(row + 1) * HEAD_DIM_V];
                lse[row] = attend(qv, &p.cache, b, 0..visible_keys(len, p.s_q, i), p.softmax_scale, o);
            }
        }
    }
    MlaOut { out, lse }
}

/// Attention of entry `b`'s `s_q · h_q` query rows over the keys in `keys` only (intersected with
/// what each row may see): one split-KV chunk's partial result, `[s_q, h_q, 512]` and `[s_q, h_q]`.
pub fn decode_chunk(p: &MlaProblem, b: usize, keys: std::ops::Range<usize>) -> MlaOut {
    p.check_shapes();
    let len = p.cache.lens[b] as usize;
    let mut out = vec![0.0f64; p.s_q * p.h_q * HEAD_DIM_V];
    let mut lse = vec![f64::NEG_INFINITY; p.s_q * p.h_q];
    for i in 0..p.s_q {
        let seen = visible_keys(len, p.s_q, i);
        let range = keys.start.min(seen)..keys.end.min(seen);
        for h in 0..p.h_q {
            let ((_, qv), local) = (p.query(b, i, h), i * p.h_q + h);
            lse[local] = attend(qv, &p.cache, b, range.clone(), p.softmax_scale, &mut out[local * HEAD_DIM_V..(local + 1) * HEAD_DIM_V]);
        }
    }
    MlaOut { out, lse }
}

/// Merges partial results of disjoint key ranges (the combine step): per row,
/// `lse = ln Σ exp(lse_c)` and `out = Σ exp(lse_c - lse) · out_c`. Rows no chunk saw stay zero
/// with lse -inf.
pub fn merge(parts: &[MlaOut]) -> MlaOut {
    let rows = parts.first().map_or(0, |p| p.lse.len());
    let mut out = vec![0.0f64; rows * HEAD_DIM_V];
    let mut lse = vec![f64::NEG_INFINITY; rows];
    for r in 0..rows {
        let max = parts.iter().map(|p| p.lse[r]).fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let sum: f64 = parts.iter().map(|p| (p.lse[r] - max).exp()).sum();
        lse[r] = max + sum.ln();
        for p in parts {
            let w = (p.lse[r] - lse[r]).exp();
            for (o, &v) in out[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V].iter_mut().zip(&p.out[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V]) {
                *o += w * v;
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
        let r = decode(&MlaProblem { q: &q, batch: 2, s_q: 1, h_q: 1, cache, softmax_scale: 0.1 });
        assert!(r.out[..HEAD_DIM_V].iter().all(|&o| (o - 3.0).abs() < 1e-12));
        assert!((r.lse[0] - 2f64.ln()).abs() < 1e-12);
        assert!(r.out[HEAD_DIM_V..].iter().all(|&o| o == 0.0) && r.lse[1] == f64::NEG_INFINITY);
    }
}
