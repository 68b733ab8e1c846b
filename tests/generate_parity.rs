//! Greedy `generate` against transformers' greedy `generate` (left-padded batch of 3 with
//! images, and each prompt alone), on two fixture checkpoints.

mod common;

use burn::backend::NdArray;
use common::*;
use infimed::engine::generate;
use infimed::generate::{rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use infimed::model::Qwen25VL;

type B = NdArray<f32>;

fn prompt_of(sample_name: &str, ids: Vec<u32>) -> Prompt {
    let s = sample(sample_name);
    let pixel_values = match s["pixel_values_file"].as_str() {
        Some(f) => read_tensor(f, "pixel_values").0,
        None => vec![],
    };
    Prompt {
        input_ids: ids,
        pixel_values,
        image_grids: grids(&s["image_grid_thw"]),
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let refs = read_json("refs/generate.json");
    let device = Default::default();
    for (ckpt, r) in refs["checkpoints"].as_object().unwrap() {
        let dir = model_dir(ckpt);
        let model = Qwen25VL::<B>::load(&dir, &device).unwrap();
        let stop = stop_tokens(&dir, &model.config.tokens.eos_token_ids).unwrap();
        let max_new = refs["settings"]["max_new_tokens"].as_u64().unwrap() as usize;
        let cfg = SamplingConfig::greedy(max_new);
        // Batch: strip the reference's left padding, let generate pad again.
        let batch = &r["batch"];
        let prompts: Vec<Prompt> = batch["samples"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let ids = u32s(&batch["input_ids"][i]);
                let mask = u32s(&batch["attention_mask"][i]);
                let ids = ids
                    .into_iter()
                    .zip(mask)
                    .filter(|(_, m)| *m == 1)
                    .map(|(x, _)| x)
                    .collect();
                prompt_of(name.as_str().unwrap(), ids)
            })
            .collect();
        let out = generate(&model, &prompts, &cfg, &stop, &mut rng_from_seed(0)).unwrap();
        for (i, row) in batch["rows"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                out[i].tokens,
                u32s(&row["new_tokens"]),
                "{ckpt} batch row {i}"
            );
            assert_eq!(
                out[i].stopped,
                row["stopped_at_eos"].as_bool().unwrap(),
                "{ckpt} batch row {i} stop"
            );
        }
        // Each prompt alone.
        for single in r["single"].as_array().unwrap() {
            let p = prompt_of(
                single["sample"].as_str().unwrap(),
                u32s(&single["input_ids"]),
            );
            let out = generate(&model, &[p], &cfg, &stop, &mut rng_from_seed(0)).unwrap();
            assert_eq!(
                out[0].tokens,
                u32s(&single["new_tokens"]),
                "{ckpt} single {}",
                single["sample"]
            );
        }
    }
}
