//! The model against HF transformers on the committed fixtures, fed the reference token ids and
//! pixel values: per-token log-probs (1e-4), vision embeddings (1e-4), M-RoPE positions (exact),
//! and checkpoint round trips and errors.

mod common;

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use common::*;
use infimed::model::nn::to_vec;
use infimed::model::{ModelInput, Qwen25VL, SaveDtype};

type B = NdArray<f32>;

fn input_of(s: &serde_json::Value) -> ModelInput {
    let grids = grids(&s["image_grid_thw"]);
    let pixel_values = match s["pixel_values_file"].as_str() {
        Some(f) => read_tensor(f, "pixel_values").0,
        None => vec![],
    };
    ModelInput {
        input_ids: vec![u32s(&s["input_ids"])],
        attention_mask: None,
        pixel_values,
        image_grids: grids,
        segments: None,
    }
}

fn logprobs(
    model: &Qwen25VL<B>,
    input: &ModelInput,
    target_start: usize,
    targets: &[u32],
) -> Vec<f32> {
    let logits = model.forward(input).unwrap();
    let [_, t, v] = logits.dims();
    let lp = to_vec(log_softmax(logits.reshape([t, v]), 1));
    targets
        .iter()
        .enumerate()
        .map(|(j, &id)| lp[(target_start + j - 1) * v + id as usize])
        .collect()
}

#[test]
fn logprobs_match_transformers_on_every_checkpoint_and_sample() {
    let device = Default::default();
    for ckpt in CHECKPOINTS {
        let model = Qwen25VL::<B>::load(&model_dir(ckpt), &device).unwrap();
        let refs = read_json(&format!("refs/{ckpt}/logprobs.json"));
        let mut worst = 0f32;
        for r in refs["samples"].as_array().unwrap() {
            let s = sample(r["name"].as_str().unwrap());
            let targets = u32s(&r["target_ids"]);
            let start = r["target_start"].as_u64().unwrap() as usize;
            let got = logprobs(&model, &input_of(&s), start, &targets);
            let want: Vec<f32> = f64s(&r["logprobs"]).iter().map(|&x| x as f32).collect();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{ckpt} / {}: max |logprob diff| = {d}", r["name"]);
            worst = worst.max(d);
        }
        eprintln!("{ckpt}: max |logprob - transformers| = {worst:.2e}");
    }
}

#[test]
fn vision_embeddings_match_transformers() {
    let device = Default::default();
    for ckpt in ["tiny-gqa2", "tiny-gqa4-untied", "tiny-mha-newlayout"] {
        let model = Qwen25VL::<B>::load(&model_dir(ckpt), &device).unwrap();
        for name in sample_names() {
            let s = sample(&name);
            let Some(pf) = s["pixel_values_file"].as_str() else {
                continue;
            };
            let (px, shape) = read_tensor(pf, "pixel_values");
            let grids = grids(&s["image_grid_thw"]);
            let pixels = Tensor::<B, 2>::from_data(
                burn::tensor::TensorData::new(px, [shape[0], shape[1]]),
                &device,
            );
            let got = to_vec(model.visual.forward(pixels, &grids));
            let (want, _) = read_tensor(
                &format!("refs/{ckpt}/vision.safetensors"),
                &format!("{name}.image_embeds"),
            );
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{ckpt} / {name}: max |embed diff| = {d}");
            // The window index and boundaries themselves are exact.
            let cfg = &model.config.vision;
            let (wi, cu) = infimed::model::rope::window_index(
                &grids,
                cfg.spatial_merge_size,
                cfg.window_units(),
            );
            let (rwi, _) = read_tensor(
                &format!("refs/{ckpt}/vision.safetensors"),
                &format!("{name}.window_index"),
            );
            let (rcu, _) = read_tensor(
                &format!("refs/{ckpt}/vision.safetensors"),
                &format!("{name}.cu_window_seqlens"),
            );
            assert_eq!(
                wi.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                rwi,
                "{ckpt}/{name} window_index"
            );
            assert_eq!(
                cu.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                rcu,
                "{ckpt}/{name} cu_window_seqlens"
            );
        }
    }
}

#[test]
fn mrope_positions_match_get_rope_index() {
    let device = Default::default();
    let model = Qwen25VL::<B>::load(&model_dir("tiny-gqa2"), &device).unwrap();
    for name in sample_names() {
        let s = sample(&name);
        let (pos, deltas) = model.rope_positions(&input_of(&s)).unwrap();
        let want: Vec<Vec<i64>> = s["position_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            })
            .collect();
        for k in 0..3 {
            assert_eq!(pos[0][k], want[k], "{name} row {k}");
        }
        assert_eq!(
            deltas[0],
            s["rope_delta"].as_i64().unwrap(),
            "{name} rope_delta"
        );
    }
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("infimed-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn load_save_load_is_bit_identical_and_loads_both_dtypes() {
    let device = Default::default();
    for (ckpt, dtype) in [
        ("tiny-gqa2", SaveDtype::F32),
        ("tiny-gqa4-untied", SaveDtype::F32),
        ("tiny-gqa2-bf16", SaveDtype::BF16),
        ("tiny-mha-newlayout", SaveDtype::F32),
    ] {
        let a = Qwen25VL::<B>::load(&model_dir(ckpt), &device).unwrap();
        let dir = tmpdir(ckpt);
        a.save(&dir, dtype, 40_000).unwrap(); // small shards: exercises the index too
        infimed::model::copy_aux_files(&model_dir(ckpt), &dir).unwrap();
        assert!(dir.join("model.safetensors.index.json").exists());
        let b = Qwen25VL::<B>::load(&dir, &device).unwrap();
        let (ta, tb) = (a.export_tensors(), b.export_tensors());
        assert_eq!(ta.len(), tb.len());
        for (x, y) in ta.iter().zip(&tb) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.shape, y.shape);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&x.values),
                bits(&y.values),
                "{ckpt}: {} differs after save/load",
                x.name
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn truncated_checkpoint_is_a_named_error() {
    let dir = tmpdir("truncated");
    std::fs::create_dir_all(&dir).unwrap();
    let src = model_dir("tiny-gqa2");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        Qwen25VL::<B>::load(&dir, &Default::default()).unwrap_err()
    );
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A file cut inside its header.
    std::fs::write(dir.join("model.safetensors"), &bytes[..100]).unwrap();
    let err = format!(
        "{:#}",
        Qwen25VL::<B>::load(&dir, &Default::default()).unwrap_err()
    );
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrong_shape_and_missing_tensors_are_named_errors() {
    let device = Default::default();
    let model = Qwen25VL::<B>::load(&model_dir("tiny-gqa2"), &device).unwrap();
    let mut tensors = model.export_tensors();
    let victim = tensors
        .iter_mut()
        .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    let old = victim.shape.clone();
    victim.shape = vec![old[0] / 2, old[1]];
    victim.values.truncate(old[0] / 2 * old[1]);
    let dir = tmpdir("wrongshape");
    infimed::model::weights::save_safetensors(&dir, &tensors, SaveDtype::F32, usize::MAX).unwrap();
    std::fs::copy(
        model_dir("tiny-gqa2").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = format!("{:#}", Qwen25VL::<B>::load(&dir, &device).unwrap_err());
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight")
            && err.contains("model.safetensors")
            && err.contains(&format!("{:?}", [old[0] / 2, old[1]]))
            && err.contains(&format!("{old:?}")),
        "{err}"
    );
    // Missing tensor.
    let tensors: Vec<_> = model
        .export_tensors()
        .into_iter()
        .filter(|t| t.name != "model.norm.weight")
        .collect();
    infimed::model::weights::save_safetensors(&dir, &tensors, SaveDtype::F32, usize::MAX).unwrap();
    let err = format!("{:#}", Qwen25VL::<B>::load(&dir, &device).unwrap_err());
    assert!(err.contains("missing tensor `model.norm.weight`"), "{err}");
    // Unexpected tensor.
    let mut tensors = model.export_tensors();
    tensors.push(infimed::model::weights::NamedTensor {
        name: "model.layers.9.extra".into(),
        shape: vec![2],
        values: vec![0.0, 1.0],
    });
    infimed::model::weights::save_safetensors(&dir, &tensors, SaveDtype::F32, usize::MAX).unwrap();
    let err = format!("{:#}", Qwen25VL::<B>::load(&dir, &device).unwrap_err());
    assert!(
        err.contains("unexpected tensor `model.layers.9.extra`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn image_token_count_mismatch_is_an_error() {
    let device = Default::default();
    let model = Qwen25VL::<B>::load(&model_dir("tiny-gqa2"), &device).unwrap();
    let s = sample("one_image");
    let mut input = input_of(&s);
    // Drop one image pad token.
    let img = model.config.tokens.image_token_id.unwrap();
    let at = input.input_ids[0].iter().position(|&x| x == img).unwrap();
    input.input_ids[0].remove(at);
    let err = format!("{:#}", model.forward(&input).unwrap_err());
    assert!(err.contains("image"), "{err}");
}
