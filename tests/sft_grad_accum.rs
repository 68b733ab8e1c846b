//! Gradient accumulation: two micro-batches of 2 give the same AdamW update as one batch of 4
//! (the loss is the mean over all target tokens of the effective batch), within 1e-5.

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use infimed::data::encode::{Encoded, TrainOn};
use infimed::data::sharegpt::read_sharegpt;
use infimed::inputs::Processor;
use infimed::learn::batch::collate;
use infimed::learn::freeze::assign_stable_param_ids;
use infimed::learn::logprobs::token_nll_sum;
use infimed::learn::optim::OptimizerConfig;
use infimed::learn::optim::{adamw, clip_grad_norm};
use infimed::model::Qwen25VL;
use infimed::models::{builtin_dir, load_model};

type B = Autodiff<NdArray<f32>>;

#[test]
fn two_micro_batches_of_two_equal_one_batch_of_four() {
    let device = Default::default();
    let dir = builtin_dir("demo-tiny").unwrap();
    let processor = Processor::from_dir(&dir, None).unwrap();
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samples.jsonl");
    let convs = read_sharegpt(&fixtures).unwrap();
    let enc: Vec<Encoded> = convs[..4]
        .iter()
        .map(|c| processor.encode(c, TrainOn::AllAssistant).unwrap())
        .collect();
    let pad = processor.tokenizer.special().pad();
    let cfg = OptimizerConfig {
        lr: 1e-3,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
    };

    let step = |micro: Vec<Vec<&Encoded>>| -> Vec<f32> {
        let model: Qwen25VL<B> =
            assign_stable_param_ids(load_model("builtin:demo-tiny", 5, &device).unwrap());
        let mut optim = adamw(&cfg).init::<B, Qwen25VL<B>>();
        let batches: Vec<_> = micro.iter().map(|m| collate(m, pad)).collect();
        let denom: usize = batches.iter().map(|b| b.target_tokens).sum();
        let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();
        for b in &batches {
            let loss = token_nll_sum(&model, b).unwrap().div_scalar(denom as f64);
            acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let mut grads = acc.grads();
        clip_grad_norm(&model, &mut grads, cfg.max_grad_norm);
        let model = optim.step(cfg.lr, model, grads);
        model
            .valid()
            .export_tensors()
            .into_iter()
            .flat_map(|t| t.values)
            .collect()
    };
    let one = step(vec![enc.iter().collect()]);
    let two = step(vec![enc[..2].iter().collect(), enc[2..].iter().collect()]);
    let max = one
        .iter()
        .zip(&two)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "max |difference| of updated weights = {max}");
    // And the update did something.
    let init: Vec<f32> = load_model::<NdArray<f32>>("builtin:demo-tiny", 5, &device)
        .unwrap()
        .export_tensors()
        .into_iter()
        .flat_map(|t| t.values)
        .collect();
    assert!(one.iter().zip(&init).any(|(a, b)| a != b));
}
