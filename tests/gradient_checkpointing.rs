//! Gradient checkpointing (`gradient_checkpointing = true`, burn's balanced checkpointing)
//! recomputes memory-bound intermediates in the backward pass: the loss and every gradient
//! must be those of plain autodiff, for a text sample and for samples with images (vision tower
//! trained too, so window attention and the merger are differentiated through).

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use infimed::backend::CheckpointedAutodiff;
use infimed::data::encode::{Encoded, TrainOn};
use infimed::data::sharegpt::read_sharegpt;
use infimed::inputs::Processor;
use infimed::learn::batch::collate;
use infimed::learn::freeze::assign_stable_param_ids;
use infimed::learn::logprobs::token_nll_sum;
use infimed::model::Qwen25VL;
use infimed::model::TrainBackend;
use infimed::models::{builtin_dir, load_model};

/// Loss and every parameter's gradient (in visit order; a parameter without one contributes
/// an empty vector) of the mean token NLL over `samples`.
fn loss_and_grads<B: TrainBackend>(samples: &[&Encoded], pad: u32) -> (f32, Vec<Vec<f32>>) {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let g = self.grads.get::<B::InnerBackend, D>(param.id);
            self.out.push(
                g.map(|g| g.into_data().to_vec::<f32>().unwrap())
                    .unwrap_or_default(),
            );
        }
    }
    let device = Default::default();
    let model: Qwen25VL<B> =
        assign_stable_param_ids(load_model("builtin:demo-tiny", 5, &device).unwrap());
    let batch = collate(samples, pad);
    let loss = token_nll_sum(&model, &batch)
        .unwrap()
        .div_scalar(batch.target_tokens as f64);
    let value = loss.clone().into_scalar().elem::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut v = Collect {
        grads: &grads,
        out: vec![],
    };
    model.visit(&mut v);
    (value, v.out)
}

#[test]
fn checkpointed_gradients_equal_plain_autodiff() {
    let dir = builtin_dir("demo-tiny").unwrap();
    let processor = Processor::from_dir(&dir, None).unwrap();
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samples.jsonl");
    let convs = read_sharegpt(&fixtures).unwrap();
    let enc: Vec<Encoded> = convs
        .iter()
        .map(|c| processor.encode(c, TrainOn::AllAssistant).unwrap())
        .collect();
    assert!(
        enc.iter().any(|e| !e.image_grids.is_empty())
            && enc.iter().any(|e| e.image_grids.is_empty())
    );
    let pad = processor.tokenizer.special().pad();
    let refs: Vec<&Encoded> = enc.iter().take(4).collect();

    let (loss_plain, plain) = loss_and_grads::<Autodiff<NdArray<f32>>>(&refs, pad);
    let (loss_ckpt, ckpt) = loss_and_grads::<CheckpointedAutodiff<NdArray<f32>>>(&refs, pad);
    assert!(loss_plain.is_finite() && loss_plain > 0.0);
    assert!(
        (loss_plain - loss_ckpt).abs() <= 1e-6 * loss_plain.abs(),
        "loss {loss_plain} vs {loss_ckpt}"
    );
    assert_eq!(plain.len(), ckpt.len());
    let (mut max_diff, mut max_abs, mut with_grad) = (0f32, 0f32, 0usize);
    for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
        assert_eq!(
            a.len(),
            b.len(),
            "parameter {i}: gradient present in one run only"
        );
        with_grad += usize::from(!a.is_empty());
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
            max_abs = max_abs.max(x.abs());
        }
    }
    // Vision tower, projector and language model are all trained here.
    assert_eq!(with_grad, plain.len(), "every parameter gets a gradient");
    assert!(max_abs > 0.0);
    assert!(
        max_diff <= 1e-6 * max_abs.max(1.0),
        "max |gradient difference| {max_diff} (max |gradient| {max_abs})"
    );
    eprintln!(
        "{} parameters, loss {loss_plain}, max |gradient difference| {max_diff:e}",
        plain.len()
    );
}

/// `infimed sft` with `gradient_checkpointing = true` (the recipe key, here through `--set`)
/// trains to the same weights as without it.
#[test]
fn sft_recipe_option_trains_to_the_same_weights() {
    use std::process::Command;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = std::env::temp_dir().join(format!("infimed-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = tmp.join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(["demo-data", "--out"])
        .arg(&data)
        .args(["--train", "16", "--val", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |out: &std::path::Path, ckpt: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_infimed"));
        c.current_dir(&root)
            .args(["sft", "--recipe", "recipes/demo-sft.toml"]);
        for s in [
            format!("data.0.path={}", data.join("train.jsonl").display()),
            "eval_data=[]".into(),
            format!("output_dir={}", out.display()),
            "max_steps=3".into(),
            "per_device_batch=4".into(),
            format!("gradient_checkpointing={ckpt}"),
        ] {
            c.args(["--set", &s]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let saved = std::fs::read_to_string(out.join("recipe.toml")).unwrap();
        assert!(
            saved.contains(&format!("gradient_checkpointing = {ckpt}")),
            "{saved}"
        );
        let device = Default::default();
        infimed::model::Qwen25VL::<NdArray<f32>>::load(out, &device)
            .unwrap()
            .export_tensors()
    };
    let plain = run(&tmp.join("plain"), false);
    let ckpt = run(&tmp.join("ckpt"), true);
    let max = plain
        .iter()
        .zip(&ckpt)
        .flat_map(|(a, b)| a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(max <= 1e-6, "max |weight difference| after 3 steps: {max}");
    std::fs::remove_dir_all(&tmp).ok();
}
