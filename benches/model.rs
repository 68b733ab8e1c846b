//! Forward speed of a small Qwen2.5-VL on the CPU backend: language model tokens/s and vision
//! tower patches/s. No assertion: speed is measured here, never in tests.
//!
//! `cargo bench --bench model`

use burn::backend::NdArray;
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use infimed::model::{ModelInput, Qwen25VL, Qwen25VlConfig};

type B = NdArray<f32>;

/// A small config: 4 text layers of width 256, a 4-block vision tower of width 128.
pub fn small_config() -> Qwen25VlConfig {
    Qwen25VlConfig::from_json(serde_json::json!({
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "image_token_id": 4095, "vision_start_token_id": 4093, "vision_end_token_id": 4094,
        "vision_config": {"depth": 4, "hidden_size": 128, "num_heads": 4, "intermediate_size": 344,
            "out_hidden_size": 256, "window_size": 112, "fullatt_block_indexes": [3]}
    }))
    .expect("small config")
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    B::seed(&device, 0);
    let cfg = small_config();
    let model = Qwen25VL::<B>::init(&cfg, &device);

    let tokens = 512;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 37) % 4000).collect();
    let input = ModelInput::text(vec![ids]);
    let mut g = c.benchmark_group("lm_forward");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("512_tokens", |b| {
        b.iter(|| {
            let out = model.forward_hidden(&input, None).unwrap();
            let _ = out.into_data();
        })
    });
    g.finish();

    // One 448 x 448 image: 32 x 32 patches = 1024 patches, 256 merged tokens.
    let grid = [1usize, 32, 32];
    let n = grid.iter().product::<usize>();
    let pixels: Vec<f32> = (0..n * cfg.vision.patch_dim())
        .map(|i| ((i % 255) as f32 / 127.5) - 1.0)
        .collect();
    let mut g = c.benchmark_group("vision_forward");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("1024_patches", |b| {
        b.iter(|| {
            let px = Tensor::<B, 2>::from_data(
                burn::tensor::TensorData::new(pixels.clone(), [n, cfg.vision.patch_dim()]),
                &device,
            );
            let _ = model.visual.forward(px, &[grid]).into_data();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
