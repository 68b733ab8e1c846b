//! The memory-efficient attention (`infimed_model::attention`) against burn's attention with a
//! dense mask and repeated key/value heads (the reference): outputs and the gradients of q, k
//! and v agree within 1e-5 (max |a - b| / (1 + |b|)), over random shapes, GQA ratios, causal and
//! bidirectional masks, left and right padding, packed segments and tile sizes that do not
//! divide the sequence.

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use infimed_model::attention::{AttentionMask, AttentionPlan, Tiles};
use infimed_model::backend::attention;
use infimed_model::nn::LayerAttention;
use infimed_model::AttentionImpl;
use proptest::prelude::*;

type B = Autodiff<NdArray<f32>>;

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

fn vals<const D: usize>(t: Tensor<NdArray<f32>, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Output and (dq, dk, dv) of `sum(out * w)` for a fixed random `w`.
fn run(
    imp: AttentionImpl,
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    w: &Tensor<B, 4>,
    mask: &AttentionMask,
) -> Vec<Vec<f32>> {
    let (q, k, v) = (
        q.clone().require_grad(),
        k.clone().require_grad(),
        v.clone().require_grad(),
    );
    let tq = q.dims()[2];
    let out =
        match imp {
            // The plan with exactly these tiles (LayerAttention would take one key tile for few queries).
            AttentionImpl::Flash(tiles) => attention(
                q.clone(),
                k.clone(),
                v.clone(),
                &Arc::new(AttentionPlan::new(mask, tq, tiles)),
            ),
            AttentionImpl::Reference => LayerAttention::<B>::new(imp, mask, tq, &q.device())
                .attend(q.clone(), k.clone(), v.clone()),
        };
    let loss = (out.clone() * w.clone()).sum();
    let grads = loss.backward();
    vec![
        vals(out.inner()),
        vals(q.grad(&grads).unwrap()),
        vals(k.grad(&grads).unwrap()),
        vals(v.grad(&grads).unwrap()),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    kv_heads: usize,
    n_rep: usize,
    len_q: usize,
    len_k: usize,
    head_dim: usize,
    causal: bool,
    /// Per row: (left pad, right pad, packed segment lengths of the rest).
    layout: Vec<(usize, usize, Vec<usize>)>,
    tiles: Tiles,
    seed: u64,
}

fn segments(case: &Case) -> AttentionMask {
    let rows = case
        .layout
        .iter()
        .map(|(left, right, segs)| {
            let mut row = vec![-1; *left];
            for (i, &n) in segs.iter().enumerate() {
                row.extend(std::iter::repeat_n(i as i32, n));
            }
            row.extend(std::iter::repeat_n(-1, *right));
            assert_eq!(row.len(), case.len_k);
            row
        })
        .collect();
    AttentionMask {
        key_segments: rows,
        causal: case.causal,
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=3,
        1usize..=2,
        prop::sample::select(vec![1usize, 2, 4]),
        1usize..40,
        0usize..6,
        prop::sample::select(vec![4usize, 8]),
        any::<bool>(),
        1usize..23,
        1usize..23,
        any::<u64>(),
    )
        .prop_flat_map(
            |(batch, kv_heads, n_rep, len_q, extra_k, head_dim, causal, tq, tk, seed)| {
                let len_k = len_q + extra_k;
                let row = (
                    0usize..4,
                    0usize..4,
                    prop::collection::vec(1usize..20, 1..4),
                )
                    .prop_map(move |(l, r, cuts)| {
                        // Split what is left after the padding into segments of the drawn sizes (the last takes the rest).
                        let (l, r) = (l.min(len_k / 3), r.min(len_k / 3));
                        let body = len_k - l - r;
                        let mut segs = vec![];
                        let mut left = body;
                        for c in cuts {
                            if left == 0 {
                                break;
                            }
                            let n = c.min(left);
                            segs.push(n);
                            left -= n;
                        }
                        if left > 0 {
                            segs.push(left);
                        }
                        (l, r, segs)
                    });
                prop::collection::vec(row, batch).prop_map(move |layout| Case {
                    batch,
                    kv_heads,
                    n_rep,
                    len_q,
                    len_k,
                    head_dim,
                    causal,
                    layout,
                    tiles: Tiles { q: tq, k: tk },
                    seed,
                })
            },
        )
}

fn check(case: &Case) {
    let device = Default::default();
    B::seed(&device, case.seed);
    let (b, h, kvh, d) = (
        case.batch,
        case.kv_heads * case.n_rep,
        case.kv_heads,
        case.head_dim,
    );
    let q = Tensor::<B, 4>::random(
        [b, h, case.len_q, d],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let k = Tensor::<B, 4>::random(
        [b, kvh, case.len_k, d],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let v = Tensor::<B, 4>::random(
        [b, kvh, case.len_k, d],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let w = Tensor::<B, 4>::random(
        [b, h, case.len_q, d],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mask = segments(case);
    let reference = run(AttentionImpl::Reference, &q, &k, &v, &w, &mask);
    let flash = run(AttentionImpl::Flash(case.tiles), &q, &k, &v, &w, &mask);
    for (name, (f, r)) in ["out", "dq", "dk", "dv"]
        .iter()
        .zip(flash.iter().zip(&reference))
    {
        let diff = rel_diff(f, r);
        assert!(diff <= 1e-5, "{name}: {diff} for {case:?}");
    }
    // The model's choice of tiles (one key tile for few queries) and the forward without autodiff.
    let inner =
        LayerAttention::<NdArray<f32>>::new(AttentionImpl::default(), &mask, case.len_q, &device);
    let out = inner.attend(q.clone().inner(), k.clone().inner(), v.clone().inner());
    let diff = rel_diff(&vals(out), &reference[0]);
    assert!(
        diff <= 1e-5,
        "forward without autodiff: {diff} for {case:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn flash_attention_matches_reference(case in case_strategy()) {
        check(&case);
    }
}

#[test]
fn long_causal_sequence_with_ragged_tiles() {
    check(&Case {
        batch: 2,
        kv_heads: 2,
        n_rep: 2,
        len_q: 157,
        len_k: 157,
        head_dim: 8,
        causal: true,
        layout: vec![(5, 0, vec![152]), (0, 7, vec![60, 40, 50])],
        tiles: Tiles { q: 37, k: 29 },
        seed: 7,
    });
}

#[test]
fn fully_masked_rows_give_zero_output_and_gradient() {
    let device = Default::default();
    let q = Tensor::<B, 4>::ones([1, 1, 4, 2], &device).require_grad();
    let k = Tensor::<B, 4>::ones([1, 1, 4, 2], &device).require_grad();
    let v = Tensor::<B, 4>::from_data(
        TensorData::new((0..8).map(|x| x as f32).collect::<Vec<_>>(), [1, 1, 4, 2]),
        &device,
    )
    .require_grad();
    // Left padding of 2: the first two queries see nothing.
    let mask = AttentionMask {
        key_segments: vec![vec![-1, -1, 0, 0]],
        causal: true,
    };
    let plan = Arc::new(AttentionPlan::new(&mask, 4, Tiles { q: 1, k: 1 }));
    let out = attention(q.clone(), k.clone(), v.clone(), &plan);
    let o = vals(out.clone().inner());
    assert_eq!(&o[..4], &[0.0; 4]);
    assert!(o.iter().all(|x| x.is_finite()));
    let grads = out.sum().backward();
    assert!(vals(q.grad(&grads).unwrap()).iter().all(|x| x.is_finite()));
    assert!(vals(v.grad(&grads).unwrap())[..4].iter().all(|&x| x == 0.0));
}

#[test]
fn plan_skips_invisible_tiles_and_memory_is_linear() {
    // Causal, 1,024 tokens, tiles of 64: only the 16 * 17 / 2 tiles on or below the diagonal.
    let mask = AttentionMask::dense(1, 1024, true);
    let plan = AttentionPlan::new(&mask, 1024, Tiles { q: 64, k: 64 });
    assert_eq!(plan.pairs.iter().map(Vec::len).sum::<usize>(), 16 * 17 / 2);
    // Packed: 8 samples of 128 tokens, block-diagonal: 2 * 3 / 2 tiles per sample.
    let seg: Vec<i32> = (0..1024).map(|i| i / 128).collect();
    let plan = AttentionPlan::new(
        &AttentionMask {
            key_segments: vec![seg],
            causal: true,
        },
        1024,
        Tiles { q: 64, k: 64 },
    );
    assert_eq!(plan.pairs.iter().map(Vec::len).sum::<usize>(), 8 * 3);
}
