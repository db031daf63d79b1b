//! `deepkern::candle` without a GPU: every entry point refuses a bad tensor before anything touches
//! a device, with an error naming the argument: its dtype, its layout, its shape, then its device
//! (these tensors live on the CPU, so an otherwise valid call stops at the device check).

use candle_core::{DType, Device, Tensor};
use deepkern::candle::{self as dkc, Fp8Tensor, PagedCache, RankInput, Tokens};
use deepkern::ep::{GroupShape, Payload};
use deepkern::gemm::GemmOptions;
use deepkern::{Error, ScaleFormat};

const CPU: &Device = &Device::Cpu;

fn t(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims, dtype, CPU).unwrap()
}

/// `dims` with a transposed (non-contiguous) layout of the last two dimensions.
fn transposed(dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.len();
    let mut swapped = dims.to_vec();
    swapped.swap(n - 2, n - 1);
    let t = t(&swapped, dtype).transpose(n - 2, n - 1).unwrap();
    assert!(!t.is_contiguous() && t.dims() == dims);
    t
}

/// What kind of error, and the argument it names.
fn kind<T: std::fmt::Debug>(r: Result<T, Error>) -> (&'static str, &'static str) {
    match r {
        Err(Error::Dtype { arg, .. }) => ("dtype", arg),
        Err(Error::Stride { arg, .. }) => ("stride", arg),
        Err(Error::Shape { arg, .. }) => ("shape", arg),
        Err(Error::InvalidArgument { arg, reason }) if reason.contains("CUDA device") => ("device", arg),
        Err(Error::InvalidArgument { arg, .. }) => ("invalid", arg),
        other => panic!("expected an argument error, got {other:?}"),
    }
}

/// FP8 activations `[m, k]` with their transposed scales.
fn fp8_act(m: usize, k: usize) -> Fp8Tensor {
    Fp8Tensor { q: t(&[m, k], DType::F8E4M3), sf: t(&[k / 128, m.div_ceil(4) * 4], DType::F32) }
}

/// FP8 weights `[(groups,) n, k]` with their block scales.
fn fp8_w(groups: Option<usize>, n: usize, k: usize) -> Fp8Tensor {
    let (q, sf): (Vec<usize>, Vec<usize>) = match groups {
        Some(g) => (vec![g, n, k], vec![g, n.div_ceil(128), k / 128]),
        None => (vec![n, k], vec![n.div_ceil(128), k / 128]),
    };
    Fp8Tensor { q: t(&q, DType::F8E4M3), sf: t(&sf, DType::F32) }
}

#[test]
fn quantisers_name_the_bad_tensor() {
    let f = ScaleFormat::F32;
    assert_eq!(kind(dkc::quantize_per_token_group(&t(&[4, 256], DType::F32), f)), ("dtype", "x"));
    assert_eq!(kind(dkc::quantize_per_token_group(&transposed(&[4, 256], DType::BF16), f)), ("stride", "x"));
    assert_eq!(kind(dkc::quantize_per_token_group(&t(&[256], DType::BF16), f)), ("shape", "x"));
    assert_eq!(kind(dkc::quantize_per_token_group(&t(&[4, 200], DType::BF16), f)), ("shape", "k"));
    assert_eq!(kind(dkc::quantize_per_token_group(&t(&[4, 256], DType::BF16), f)), ("device", "x"));
    assert_eq!(kind(dkc::quantize_per_token_group(&t(&[2, 4, 256], DType::BF16), f)), ("device", "x"));
    // A view at an offset into its storage is contiguous, hence accepted up to the device check.
    let narrowed = t(&[8, 256], DType::BF16).narrow(0, 2, 4).unwrap();
    assert_eq!(kind(dkc::quantize_per_token_group(&narrowed, f)), ("device", "x"));

    assert_eq!(kind(dkc::quantize_per_block(&t(&[256, 256], DType::F16), f)), ("dtype", "w"));
    assert_eq!(kind(dkc::quantize_per_block(&transposed(&[256, 256], DType::BF16), f)), ("stride", "w"));
    assert_eq!(kind(dkc::quantize_per_block(&t(&[1, 2, 256, 256], DType::BF16), f)), ("shape", "w"));
    assert_eq!(kind(dkc::quantize_per_block(&t(&[130, 100], DType::BF16), f)), ("shape", "k"));
    assert_eq!(kind(dkc::quantize_per_block(&t(&[3, 130, 256], DType::BF16), f)), ("device", "w"));

    assert_eq!(kind(dkc::silu_mul_quantize(&t(&[4, 512], DType::F32), f)), ("dtype", "h"));
    assert_eq!(kind(dkc::silu_mul_quantize(&t(&[4, 257], DType::BF16), f)), ("shape", "h"));
    assert_eq!(kind(dkc::silu_mul_quantize(&t(&[4, 200], DType::BF16), f)), ("shape", "k"));
    assert_eq!(kind(dkc::silu_mul_quantize(&t(&[4, 512], DType::BF16), f)), ("device", "h"));

    let e = dkc::quantize_per_token_group(&t(&[4, 256], DType::F32), f).unwrap_err().to_string();
    assert_eq!(e, "`x`: expected dtype bf16, got f32");
    let e = dkc::quantize_per_token_group(&t(&[4, 256], DType::BF16), f).unwrap_err().to_string();
    assert!(e.starts_with("`x`: expected a tensor on a CUDA device, got one on Cpu"), "{e}");
}

#[test]
fn dense_gemm_names_the_bad_tensor() {
    let o = GemmOptions::default();
    let (a, b) = (fp8_act(64, 256), fp8_w(None, 192, 256));
    assert_eq!(kind(dkc::gemm_fp8(&a, &b, o)), ("device", "a"));
    let bf16_a = Fp8Tensor { q: t(&[64, 256], DType::BF16), ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8(&bf16_a, &b, o)), ("dtype", "a"));
    let bad_sfa = Fp8Tensor { sf: t(&[2, 64], DType::BF16), ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8(&bad_sfa, &b, o)), ("dtype", "sfa"));
    let strided_b = Fp8Tensor { q: transposed(&[192, 256], DType::F8E4M3), ..b.clone() };
    assert_eq!(kind(dkc::gemm_fp8(&a, &strided_b, o)), ("stride", "b"));
    // Scales in the row-major layout instead of the transposed, padded one.
    let row_major = Fp8Tensor { sf: t(&[64, 2], DType::F32), ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8(&row_major, &b, o)), ("shape", "sfa"));
    let bad_sfb = Fp8Tensor { sf: t(&[1, 2], DType::F32), ..b.clone() };
    assert_eq!(kind(dkc::gemm_fp8(&a, &bad_sfb, o)), ("shape", "sfb"));
    assert_eq!(kind(dkc::gemm_fp8(&a, &fp8_w(None, 192, 384), o)), ("shape", "b"));
    assert_eq!(kind(dkc::gemm_fp8(&a, &fp8_w(Some(2), 192, 256), o)), ("shape", "b"));
}

#[test]
fn f32_gemms_name_the_bad_tensor() {
    let (a, b) = (fp8_act(64, 256), fp8_w(None, 192, 256));
    assert_eq!(kind(dkc::gemm_fp8_f32(&a, &b)), ("device", "a"));
    let bad_sfb = Fp8Tensor { sf: t(&[2, 3], DType::F32), ..b.clone() };
    assert_eq!(kind(dkc::gemm_fp8_f32(&a, &bad_sfb)), ("shape", "sfb"));

    let d = t(&[64, 192], DType::F32);
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&a, &b, &d)), ("device", "a"));
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&a, &b, &t(&[64, 192], DType::BF16))), ("dtype", "d"));
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&a, &b, &t(&[64, 191], DType::F32))), ("shape", "d"));
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&a, &b, &transposed(&[64, 192], DType::F32))), ("stride", "d"));
    let bad_sfa = Fp8Tensor { sf: t(&[2, 60], DType::F32), ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&bad_sfa, &b, &d)), ("shape", "sfa"));

    // `d` and `a`'s scales in one storage: refused (the in-place write would read what it writes).
    let base = t(&[64 * 192 + 2 * 64], DType::F32);
    let d_view = base.narrow(0, 0, 64 * 192).unwrap().reshape((64, 192)).unwrap();
    let sf_view = base.narrow(0, 64 * 192, 2 * 64).unwrap().reshape((2, 64)).unwrap();
    let aliased = Fp8Tensor { sf: sf_view, ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8_f32_accumulate(&aliased, &b, &d_view)), ("invalid", "d"));
    let e = dkc::gemm_fp8_f32_accumulate(&aliased, &b, &d_view).unwrap_err().to_string();
    assert_eq!(e, "`d`: shares its storage with `sfa`");
}

#[test]
fn grouped_gemms_name_the_bad_tensor() {
    let o = GemmOptions::default();
    let (a, b) = (fp8_act(256, 256), fp8_w(Some(2), 128, 256));
    let idx = t(&[256], DType::I32);
    assert_eq!(kind(dkc::gemm_fp8_contiguous(&a, &b, &idx, o)), ("device", "a"));
    assert_eq!(kind(dkc::gemm_fp8_contiguous(&a, &b, &t(&[256], DType::U32), o)), ("dtype", "m_indices"));
    assert_eq!(kind(dkc::gemm_fp8_contiguous(&a, &b, &t(&[255], DType::I32), o)), ("shape", "m_indices"));
    assert_eq!(kind(dkc::gemm_fp8_contiguous(&a, &fp8_w(None, 128, 256), &idx, o)), ("shape", "b"));
    let bad_sfb = Fp8Tensor { sf: t(&[2, 2], DType::F32), ..b.clone() };
    assert_eq!(kind(dkc::gemm_fp8_contiguous(&a, &bad_sfb, &idx, o)), ("shape", "sfb"));

    let groups = 2;
    let a = Fp8Tensor { q: t(&[groups, 32, 256], DType::F8E4M3), sf: t(&[groups, 2, 32], DType::F32) };
    let masked_m = t(&[groups], DType::I32);
    assert_eq!(kind(dkc::gemm_fp8_masked(&a, &b, &masked_m, o)), ("device", "a"));
    assert_eq!(kind(dkc::gemm_fp8_masked(&a, &b, &t(&[groups, 1], DType::I32), o)), ("shape", "masked_m"));
    assert_eq!(kind(dkc::gemm_fp8_masked(&a, &b, &t(&[groups], DType::I64), o)), ("dtype", "masked_m"));
    assert_eq!(kind(dkc::gemm_fp8_masked(&a, &fp8_w(Some(3), 128, 256), &masked_m, o)), ("shape", "b"));
    let bad_sfa = Fp8Tensor { sf: t(&[groups, 2, 30], DType::F32), ..a.clone() };
    assert_eq!(kind(dkc::gemm_fp8_masked(&bad_sfa, &b, &masked_m, o)), ("shape", "sfa"));
    let dense_a = fp8_act(64, 256);
    assert_eq!(kind(dkc::gemm_fp8_masked(&dense_a, &b, &masked_m, o)), ("shape", "a"));
}

#[test]
fn mla_decode_names_the_bad_tensor() {
    let q = t(&[2, 1, 16, 576], DType::BF16);
    let cache = t(&[4, 64, 576], DType::BF16);
    let (bt, lens) = (t(&[2, 2], DType::I32), t(&[2], DType::I32));
    let kv = PagedCache { cache: &cache, block_table: &bt, lens: &lens, lens_host: None };
    let (shape, page, max_pages) = dkc::validate_mla_decode(&q, &kv).unwrap();
    assert_eq!((shape.batch, shape.s_q, shape.h_q, page, max_pages), (2, 1, 16, 64, 2));
    let mut decoder = dkc::MlaDecoder::new();
    assert_eq!(kind(decoder.decode(&q, &kv, 0.1)), ("device", "q"));
    assert_eq!(decoder.invalid().unwrap(), 0);

    let decode = |q: &Tensor, kv: &PagedCache| kind(dkc::MlaDecoder::new().decode(q, kv, 0.1));
    assert_eq!(decode(&t(&[2, 1, 16, 576], DType::F32), &kv), ("dtype", "q"));
    assert_eq!(decode(&t(&[2, 1, 16, 512], DType::BF16), &kv), ("shape", "q"));
    assert_eq!(decode(&transposed(&[2, 1, 576, 576], DType::BF16), &kv), ("stride", "q"));
    // The cache must have the queries' dtype.
    assert_eq!(decode(&t(&[2, 1, 16, 576], DType::F16), &kv), ("dtype", "cache"));
    let f16_cache = t(&[4, 64, 576], DType::F16);
    assert_eq!(decode(&t(&[2, 1, 16, 576], DType::F16), &PagedCache { cache: &f16_cache, ..kv }), ("device", "q"));
    let narrow_cache = t(&[4, 64, 512], DType::BF16);
    assert_eq!(decode(&q, &PagedCache { cache: &narrow_cache, ..kv }), ("shape", "cache"));
    let u32_table = t(&[2, 2], DType::U32);
    assert_eq!(decode(&q, &PagedCache { block_table: &u32_table, ..kv }), ("dtype", "block_table"));
    let short_table = t(&[1, 2], DType::I32);
    assert_eq!(decode(&q, &PagedCache { block_table: &short_table, ..kv }), ("shape", "block_table"));
    let strided_table = transposed(&[2, 2], DType::I32);
    assert_eq!(decode(&q, &PagedCache { block_table: &strided_table, ..kv }), ("stride", "block_table"));
    let bad_lens = t(&[3], DType::I32);
    assert_eq!(decode(&q, &PagedCache { lens: &bad_lens, ..kv }), ("shape", "lens"));
    let f32_lens = t(&[2], DType::F32);
    assert_eq!(decode(&q, &PagedCache { lens: &f32_lens, ..kv }), ("dtype", "lens"));
    assert_eq!(decode(&t(&[2, 0, 16, 576], DType::BF16), &kv), ("invalid", "shape"));
}

#[test]
fn ep_inputs_are_checked_against_the_group() {
    let (ranks, hidden, tokens, k) = (2, 256, 8, 2);
    let shape = GroupShape::new(ranks, 8, hidden, tokens, k, Payload::Fp8);
    let x = Fp8Tensor { q: t(&[tokens, hidden], DType::F8E4M3), sf: t(&[2, tokens], DType::F32) };
    let (idx, w) = (t(&[tokens, k], DType::I32), t(&[tokens, k], DType::F32));
    let good = RankInput { x: Tokens::Fp8(&x), topk_idx: &idx, topk_weights: &w };
    dkc::validate_dispatch(&shape, &[good, good]).unwrap();
    assert_eq!(kind(dkc::validate_dispatch(&shape, &[good])), ("invalid", "inputs"));

    let with = |input: RankInput| kind(dkc::validate_dispatch(&shape, &[good, input]));
    let bf16_x = t(&[tokens, hidden], DType::BF16);
    assert_eq!(with(RankInput { x: Tokens::Bf16(&bf16_x), ..good }), ("invalid", "x"));
    let wide = Fp8Tensor { q: t(&[tokens, 2 * hidden], DType::F8E4M3), ..x.clone() };
    assert_eq!(with(RankInput { x: Tokens::Fp8(&wide), ..good }), ("shape", "x"));
    let row_major_sf = Fp8Tensor { sf: t(&[tokens, 2], DType::F32), ..x.clone() };
    assert_eq!(with(RankInput { x: Tokens::Fp8(&row_major_sf), ..good }), ("shape", "sf"));
    let i64_idx = t(&[tokens, k], DType::I64);
    assert_eq!(with(RankInput { topk_idx: &i64_idx, ..good }), ("dtype", "topk_idx"));
    let strided_idx = transposed(&[tokens, k], DType::I32);
    assert_eq!(with(RankInput { topk_idx: &strided_idx, ..good }), ("stride", "topk_idx"));
    let short_w = t(&[tokens, 1], DType::F32);
    assert_eq!(with(RankInput { topk_weights: &short_w, ..good }), ("shape", "topk_weights"));
    let bf16_w = t(&[tokens, k], DType::BF16);
    assert_eq!(with(RankInput { topk_weights: &bf16_w, ..good }), ("dtype", "topk_weights"));

    let bf16_shape = GroupShape { payload: Payload::Bf16, ..shape };
    let bf16_input = RankInput { x: Tokens::Bf16(&bf16_x), ..good };
    dkc::validate_dispatch(&bf16_shape, &[bf16_input, bf16_input]).unwrap();
    assert_eq!(kind(dkc::validate_dispatch(&bf16_shape, &[bf16_input, good])), ("invalid", "x"));

    let ys = [t(&[128, hidden], DType::BF16), t(&[256, hidden], DType::BF16)];
    dkc::validate_combine(&shape, &ys, &[128, 256]).unwrap();
    assert_eq!(kind(dkc::validate_combine(&shape, &ys, &[128, 128])), ("shape", "ys"));
    assert_eq!(kind(dkc::validate_combine(&shape, &ys[..1], &[128])), ("invalid", "ys"));
    let f32_ys = [t(&[128, hidden], DType::F32), t(&[256, hidden], DType::BF16)];
    assert_eq!(kind(dkc::validate_combine(&shape, &f32_ys, &[128, 256])), ("dtype", "ys"));
}
