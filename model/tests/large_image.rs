//! A large image (1,008 x 1,400 px: 72 x 100 = 7,200 patches) through the vision tower with
//! window attention. The attention scores of a window block take `windows x 64^2` values per
//! head (linear in the number of windows); a dense mask over all patches would take 7,200^2.

use burn::backend::NdArray;
use burn::prelude::*;
use infimed_model::vision::SegmentPlan;
use infimed_model::{rope, Qwen25VlConfig, VisionConfig};

type B = NdArray<f32>;

#[test]
fn window_attention_memory_is_linear_in_windows() {
    let grid = [1usize, 72, 100];
    let n = 72 * 100;
    let (_, cu) = rope::window_index(&[grid], 2, 4);
    let plan = SegmentPlan::<B>::new(
        &cu,
        infimed_model::AttentionImpl::default(),
        &Default::default(),
    );
    let windows = cu.len() - 1;
    assert_eq!(windows, 9 * 13);
    // Scores per head: segments x L^2 with L = 64 patches per window.
    assert_eq!(plan.score_elements(), windows * 64 * 64);
    // Linear in N: at most 64 scores per patch, doubled for the padding of edge windows.
    assert!(plan.score_elements() <= 2 * 64 * n);
    assert!(
        plan.score_elements() * 100 < n * n,
        "{} vs dense {}",
        plan.score_elements(),
        n * n
    );
}

#[test]
fn large_image_runs_through_the_vision_tower() {
    let device = Default::default();
    B::seed(&device, 3);
    let mut cfg = Qwen25VlConfig::from_json(serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32,
        "rope_scaling": {"mrope_section": [2, 3, 3]},
        "vision_config": {"depth": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24,
            "out_hidden_size": 32, "window_size": 112, "fullatt_block_indexes": []}
    }))
    .unwrap();
    cfg.vision = VisionConfig {
        fullatt_block_indexes: vec![],
        ..cfg.vision
    };
    let tower = infimed_model::vision::VisionTower::<B>::init(&cfg.vision, &device);
    let grid = [1usize, 72, 100];
    let n = grid[1] * grid[2];
    let px: Vec<f32> = (0..n * cfg.vision.patch_dim())
        .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let pixels = Tensor::<B, 2>::from_data(
        burn::tensor::TensorData::new(px, [n, cfg.vision.patch_dim()]),
        &device,
    );
    let out = tower.forward(pixels, &[grid]);
    assert_eq!(out.dims(), [n / 4, 32]);
    let v = infimed_model::nn::to_vec(out);
    assert!(v.iter().all(|x| x.is_finite()));
}
