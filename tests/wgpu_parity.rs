//! The same fixture model on wgpu (software Vulkan in CI) gives the same log-probs as on
//! ndarray, within 1e-3. Compiled only with `--features wgpu`.
#![cfg(feature = "wgpu")]

mod common;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use common::*;
use infimed::backend::{NdArrayBackend, WgpuBackend};
use infimed::model::nn::to_vec;
use infimed::model::{ModelInput, Qwen25VL};

fn all_logprobs<B: Backend>(device: &B::Device, ckpt: &str) -> Vec<Vec<f32>> {
    let model = Qwen25VL::<B>::load(&model_dir(ckpt), device).unwrap();
    sample_names()
        .iter()
        .map(|name| {
            let s = sample(name);
            let input = ModelInput {
                input_ids: vec![u32s(&s["input_ids"])],
                attention_mask: None,
                pixel_values: s["pixel_values_file"].as_str().map(|f| read_tensor(f, "pixel_values").0).unwrap_or_default(),
                image_grids: grids(&s["image_grid_thw"]),
            };
            let logits = model.forward(&input).unwrap();
            let [_, t, v] = logits.dims();
            let lp = to_vec(log_softmax(logits.reshape([t, v]), 1));
            let start = s["target_start"].as_u64().unwrap() as usize;
            u32s(&s["target_ids"]).iter().enumerate().map(|(j, &id)| lp[(start + j - 1) * v + id as usize]).collect()
        })
        .collect()
}

#[test]
fn wgpu_matches_ndarray() {
    for ckpt in ["tiny-gqa2", "tiny-gqa4-untied"] {
        let cpu = all_logprobs::<NdArrayBackend>(&Default::default(), ckpt);
        let gpu = all_logprobs::<WgpuBackend>(&Default::default(), ckpt);
        let mut worst = 0f32;
        for (a, b) in cpu.iter().zip(&gpu) {
            worst = worst.max(max_abs_diff(a, b));
        }
        eprintln!("{ckpt}: max |wgpu - ndarray| log-prob = {worst:.2e}");
        assert!(worst < 1e-3, "{ckpt}: {worst}");
    }
}
