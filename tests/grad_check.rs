//! Autodiff gradients of the SFT loss equal central finite differences (f64 on ndarray), for
//! parameters on every path: attention projections, MLP, norms, embeddings, the vision tower and
//! its merger. A wrong backward anywhere (attention, masking, M-RoPE, gather) shows here.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Param};
use burn::prelude::*;
use infimed::data::encode::{Encoded, TrainOn};
use infimed::data::sharegpt::read_sharegpt;
use infimed::inputs::Processor;
use infimed::learn::batch::{collate, MicroBatch};
use infimed::learn::logprobs::token_nll_sum;
use infimed::model::Qwen25VL;
use infimed::models::{builtin_dir, load_model};

type Inner = NdArray<f64>;
type B = Autodiff<Inner>;

/// (name, accessor) for the parameters checked.
type Access = fn(&mut Qwen25VL<Inner>) -> &mut Param<Tensor<Inner, 2>>;
type AccessAd = fn(&Qwen25VL<B>) -> &Param<Tensor<B, 2>>;

fn loss(model: &Qwen25VL<Inner>, mb: &MicroBatch) -> f64 {
    token_nll_sum(model, mb).unwrap().into_scalar()
}

#[test]
fn gradients_match_finite_differences() {
    let device = Default::default();
    let dir = builtin_dir("demo-tiny").unwrap();
    let processor = Processor::from_dir(&dir, None).unwrap();
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samples.jsonl");
    let convs = read_sharegpt(&fixtures).unwrap();
    // Two samples with images and different lengths (left/right padding in one batch).
    let enc: Vec<Encoded> = convs[..3]
        .iter()
        .map(|c| processor.encode(c, TrainOn::AllAssistant).unwrap())
        .collect();
    let refs: Vec<&Encoded> = enc.iter().collect();
    let mb = collate(&refs, processor.tokenizer.special().pad());
    assert!(
        !mb.input.image_grids.is_empty(),
        "the check needs an image in the batch"
    );

    let model: Qwen25VL<B> = load_model("builtin:demo-tiny", 3, &device).unwrap();
    let grads = token_nll_sum(&model, &mb).unwrap().backward();
    let base = model.clone().valid();
    let l0 = loss(&base, &mb);

    let checks: Vec<(&str, Access, AccessAd)> = vec![
        (
            "layers.0.q_proj",
            |m| &mut m.model.layers[0].self_attn.q_proj.weight,
            |m| &m.model.layers[0].self_attn.q_proj.weight,
        ),
        (
            "layers.0.k_proj",
            |m| &mut m.model.layers[0].self_attn.k_proj.weight,
            |m| &m.model.layers[0].self_attn.k_proj.weight,
        ),
        (
            "layers.1.v_proj",
            |m| &mut m.model.layers[1].self_attn.v_proj.weight,
            |m| &m.model.layers[1].self_attn.v_proj.weight,
        ),
        (
            "layers.2.o_proj",
            |m| &mut m.model.layers[2].self_attn.o_proj.weight,
            |m| &m.model.layers[2].self_attn.o_proj.weight,
        ),
        (
            "layers.3.gate_proj",
            |m| &mut m.model.layers[3].mlp.gate_proj.weight,
            |m| &m.model.layers[3].mlp.gate_proj.weight,
        ),
        (
            "embed_tokens",
            |m| &mut m.model.embed_tokens.weight,
            |m| &m.model.embed_tokens.weight,
        ),
        (
            "visual.blocks.0.qkv",
            |m| &mut m.visual.blocks[0].attn.qkv.weight,
            |m| &m.visual.blocks[0].attn.qkv.weight,
        ),
        (
            "visual.merger.mlp.0",
            |m| &mut m.visual.merger.mlp0.weight,
            |m| &m.visual.merger.mlp0.weight,
        ),
    ];
    // Some inputs of the forward (pixel values, rotary tables) are built in f32, so the loss carries
    // ~1e-7 relative rounding noise: a step of 1e-3 keeps that noise far below the O(eps^2) error.
    let eps = 1e-3;
    let mut worst = 0f64;
    let mut failures: Vec<String> = vec![];
    for (name, access, access_ad) in checks {
        let g = access_ad(&model)
            .grad(&grads)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let [r, c] = g.dims();
        let gv: Vec<f64> = g.into_data().to_vec().unwrap();
        // The entries with the largest gradients, plus a few fixed ones.
        let mut idx: Vec<usize> = (0..r * c).collect();
        idx.sort_by(|&a, &b| gv[b].abs().partial_cmp(&gv[a].abs()).unwrap());
        let mut picks: Vec<usize> = idx[..4].to_vec();
        picks.extend([0, (r * c) / 3, r * c - 1]);
        let mut name_worst = 0f64;
        let gmax = gv.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(gmax > 0.0, "{name}: gradient is all zero");
        for &k in &picks {
            let fd = {
                let mut plus = base.clone();
                let mut minus = base.clone();
                let bump = |p: &mut Param<Tensor<Inner, 2>>, s: f64| {
                    let t = p.val();
                    let mut v: Vec<f64> = t.clone().into_data().to_vec().unwrap();
                    v[k] += s;
                    *p = Param::from_tensor(Tensor::from_data(
                        TensorData::new(v, [r, c]),
                        &t.device(),
                    ));
                };
                bump(access(&mut plus), eps);
                bump(access(&mut minus), -eps);
                (loss(&plus, &mb) - loss(&minus, &mb)) / (2.0 * eps)
            };
            let err = (fd - gv[k]).abs() / gmax.max(1e-3);
            worst = worst.max(err);
            name_worst = name_worst.max(err);
            if err >= 2e-3 {
                failures.push(format!("{name}[{k}]: autodiff {} vs finite difference {fd} (loss {l0}, max |grad| {gmax})", gv[k]));
            }
        }
        eprintln!("{name}: max |grad| {gmax:.3e}, worst relative error {name_worst:.2e}");
    }
    eprintln!("worst error relative to max |grad|: {worst:.2e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
