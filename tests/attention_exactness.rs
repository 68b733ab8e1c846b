//! The memory-efficient attention inside the whole model: the loss and every parameter's
//! gradient of the mean token NLL equal those of the reference attention (burn's, dense mask,
//! repeated key/value heads) within 1e-5 (max |a - b| / (1 + |b|)), for the fixture checkpoints
//! with GQA ratios 1, 2 and 4 on text and image samples (window and full-attention vision
//! blocks; vision tower, projector and language model all trained), right-padded, left-padded
//! and packed rows. Packing itself: packed and unpacked batches of the same demo samples give
//! the same loss within 1e-5. Per-layer checkpointing: the same loss and gradients as plain
//! autodiff.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use infimed::backend::{GradientCheckpointing, Precision};
use infimed::data::encode::{Encoded, TrainOn};
use infimed::data::sharegpt::read_sharegpt;
use infimed::inputs::Processor;
use infimed::learn::batch::{collate, collate_packed, MicroBatch};
use infimed::learn::logprobs::{token_nll_sum, token_nll_sum_of};
use infimed::learn::run::accumulate_gradients;
use infimed::model::{AttentionImpl, ModelInput, Qwen25VL, Tiles};

type B = Autodiff<NdArray<f32>>;

fn grads_of(model: &Qwen25VL<B>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let g = self.grads.get::<AB::InnerBackend, D>(param.id);
            self.out.push(
                g.map(|g| g.into_data().to_vec::<f32>().unwrap())
                    .unwrap_or_default(),
            );
        }
    }
    let mut v = Collect { grads, out: vec![] };
    model.visit(&mut v);
    v.out
}

/// Mean token NLL of `batch` and every parameter's gradient.
fn loss_and_grads(model: &Qwen25VL<B>, batch: &MicroBatch) -> (f32, Vec<Vec<f32>>) {
    let loss = token_nll_sum(model, batch)
        .unwrap()
        .div_scalar(batch.target_tokens as f64);
    let value = loss.clone().into_scalar().elem::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    (value, grads_of(model, &grads))
}

/// Largest |a - b| / (1 + |b|) over the gradients; every parameter must have one in both.
fn compare(what: &str, (la, ga): &(f32, Vec<Vec<f32>>), (lb, gb): &(f32, Vec<Vec<f32>>)) -> f32 {
    assert!(la.is_finite() && *la > 0.0, "{what}: loss {la}");
    assert!(
        (la - lb).abs() / (1.0 + lb.abs()) <= 1e-5,
        "{what}: loss {la} vs {lb}"
    );
    assert_eq!(ga.len(), gb.len());
    let mut worst = 0f32;
    for (i, (a, b)) in ga.iter().zip(gb).enumerate() {
        assert_eq!(
            a.len(),
            b.len(),
            "{what}: parameter {i} has a gradient in one run only"
        );
        assert!(!a.is_empty(), "{what}: parameter {i} has no gradient");
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() / (1.0 + y.abs()));
        }
    }
    assert!(worst <= 1e-5, "{what}: max gradient difference {worst}");
    eprintln!(
        "{what}: loss {la}, {} parameters, max gradient difference {worst:e}",
        ga.len()
    );
    worst
}

/// Left padding: the samples right-aligned, labels shifted with them.
fn collate_left(samples: &[&Encoded], pad_id: u32) -> MicroBatch {
    let mut mb = collate(samples, pad_id);
    let t = mb.input.seq_len();
    for (i, e) in samples.iter().enumerate() {
        let pad = t - e.input_ids.len();
        let mut ids = vec![pad_id; pad];
        ids.extend_from_slice(&e.input_ids);
        let mut mask = vec![false; pad];
        mask.extend(std::iter::repeat_n(true, e.input_ids.len()));
        let mut labels = vec![None; pad];
        labels.extend_from_slice(&e.labels);
        mb.input.input_ids[i] = ids;
        mb.input.attention_mask.as_mut().unwrap()[i] = mask;
        mb.labels[i] = labels;
    }
    mb
}

fn fixture_samples(model: &str) -> (Processor, Vec<Encoded>) {
    let processor = Processor::from_dir(&common::model_dir(model), None).unwrap();
    let convs = read_sharegpt(common::fixtures().join("samples.jsonl")).unwrap();
    let enc: Vec<Encoded> = convs
        .iter()
        .map(|c| processor.encode(c, TrainOn::AllAssistant).unwrap())
        .collect();
    assert!(
        enc.iter().any(|e| !e.image_grids.is_empty())
            && enc.iter().any(|e| e.image_grids.is_empty())
    );
    (processor, enc)
}

#[test]
fn flash_equals_reference_on_the_fixture_checkpoints() {
    let device = Default::default();
    // GQA ratio 1, 2 and 4; full-attention vision blocks at 1 / 1, 3 / 0, windows of 112 / 56 / 112 px.
    for name in ["tiny-mha-newlayout", "tiny-gqa2", "tiny-gqa4-untied"] {
        let flash = Qwen25VL::<B>::load(&common::model_dir(name), &device)
            .unwrap()
            .with_attention(AttentionImpl::Flash(Tiles { q: 7, k: 5 }));
        let reference = flash.clone().with_attention(AttentionImpl::Reference);
        let (processor, enc) = fixture_samples(name);
        let pad = processor.tokenizer.special().pad();
        let refs: Vec<&Encoded> = enc.iter().collect();
        let right = collate(&refs, pad);
        compare(
            &format!("{name}, right padding"),
            &loss_and_grads(&flash, &right),
            &loss_and_grads(&reference, &right),
        );
        let left = collate_left(&refs, pad);
        compare(
            &format!("{name}, left padding"),
            &loss_and_grads(&flash, &left),
            &loss_and_grads(&reference, &left),
        );
        let rows: Vec<Vec<&Encoded>> = refs
            .chunks(refs.len().div_ceil(2))
            .map(|c| c.to_vec())
            .collect();
        let packed = collate_packed(&rows, pad);
        compare(
            &format!("{name}, packed rows"),
            &loss_and_grads(&flash, &packed),
            &loss_and_grads(&reference, &packed),
        );
        // The default tiles (one tile pair per row at these lengths) agree too.
        let default = flash.clone().with_attention(AttentionImpl::default());
        compare(
            &format!("{name}, default tiles"),
            &loss_and_grads(&default, &right),
            &loss_and_grads(&reference, &right),
        );
    }
}

fn demo_samples(n: usize) -> (Processor, Vec<Encoded>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = infimed::demo::DemoDataConfig {
        seed: 3,
        train: n,
        val: 0,
        image_size: 56,
        image_pool: None,
    };
    infimed::demo::write_demo_data(dir.path(), &cfg).unwrap();
    let processor =
        Processor::from_dir(&infimed::models::builtin_dir("demo-tiny").unwrap(), None).unwrap();
    let convs = read_sharegpt(dir.path().join("train.jsonl")).unwrap();
    let enc = convs
        .iter()
        .map(|c| processor.encode(c, TrainOn::AllAssistant).unwrap())
        .collect();
    (processor, enc, dir)
}

#[test]
fn packed_and_unpacked_demo_batches_have_the_same_loss() {
    let device = Default::default();
    let (processor, enc, _dir) = demo_samples(24);
    let pad = processor.tokenizer.special().pad();
    let model: Qwen25VL<NdArray<f32>> =
        infimed::models::load_model("builtin:demo-tiny", 1, &device).unwrap();
    let refs: Vec<&Encoded> = enc.iter().collect();
    let cutoff = 256;
    let lengths: Vec<usize> = refs.iter().map(|e| e.input_ids.len()).collect();
    let rows: Vec<Vec<&Encoded>> = infimed::learn::batch::pack_rows(&lengths, cutoff, 64)
        .into_iter()
        .map(|r| r.into_iter().map(|i| refs[i]).collect())
        .collect();
    assert!(
        rows.len() < refs.len() / 2,
        "{} rows for {} samples",
        rows.len(),
        refs.len()
    );
    assert!(rows
        .iter()
        .all(|r| r.iter().map(|e| e.input_ids.len()).sum::<usize>() <= cutoff));
    let packed = collate_packed(&rows, pad);
    let unpacked = collate(&refs, pad);
    assert_eq!(packed.target_tokens, unpacked.target_tokens);
    assert_eq!(packed.samples, unpacked.samples);
    let mean = |mb: &MicroBatch| {
        token_nll_sum(&model, mb)
            .unwrap()
            .into_scalar()
            .elem::<f64>()
            / mb.target_tokens as f64
    };
    let (a, b) = (mean(&packed), mean(&unpacked));
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
        "packed {a} vs unpacked {b}"
    );
    let pad_frac = |mb: &MicroBatch, real: usize| {
        1.0 - real as f64 / (mb.input.batch_size() * mb.input.seq_len()) as f64
    };
    let real: usize = lengths.iter().sum();
    eprintln!(
        "loss packed {a:.7} unpacked {b:.7}; padding {:.1}% packed ({} rows) vs {:.1}% unpacked ({} rows)",
        100.0 * pad_frac(&packed, real),
        packed.input.batch_size(),
        100.0 * pad_frac(&unpacked, real),
        unpacked.input.batch_size()
    );
}

#[test]
fn layer_checkpointing_gives_the_gradients_of_plain_autodiff() {
    let device = Default::default();
    let (processor, enc) = fixture_samples("tiny-gqa2");
    let pad = processor.tokenizer.special().pad();
    let refs: Vec<&Encoded> = enc.iter().collect();
    let model = Qwen25VL::<B>::load(&common::model_dir("tiny-gqa2"), &device).unwrap();
    for (what, mb) in [
        ("right-padded", collate(&refs, pad)),
        (
            "packed",
            collate_packed(&[refs[..3].to_vec(), refs[3..].to_vec()], pad),
        ),
    ] {
        let denom = mb.target_tokens as f64;
        let run = |ck: GradientCheckpointing| {
            let inputs: Vec<&ModelInput> = vec![&mb.input];
            let (shares, grads) =
                accumulate_gradients(&model, Precision::F32, ck, &inputs, |m, _, hidden| {
                    Ok(token_nll_sum_of(m, &mb, hidden).div_scalar(denom))
                })
                .unwrap();
            (shares.iter().sum::<f64>() as f32, grads_of(&model, &grads))
        };
        compare(
            &format!("layer checkpointing, {what}"),
            &run(GradientCheckpointing::Layer),
            &run(GradientCheckpointing::Off),
        );
    }
}
