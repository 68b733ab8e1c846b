//! Property: greedy incremental decoding with the KV cache gives the same logits as a full
//! forward pass over the whole sequence (within 1e-4), text-only and with images, batch 1 and 3,
//! with left padding for ragged prompts.

use burn::backend::NdArray;
use burn::prelude::*;
use infimed_model::nn::to_vec;
use infimed_model::{ModelInput, Qwen25VL, Qwen25VlConfig};
use proptest::prelude::*;

type B = NdArray<f32>;

fn tiny_config(window_size: usize, kv_heads: usize, tied: bool) -> Qwen25VlConfig {
    let json = serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "image_token_id": 60, "vision_start_token_id": 58, "vision_end_token_id": 59,
        "vision_config": {"depth": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24,
            "out_hidden_size": 32, "window_size": window_size, "fullatt_block_indexes": [1],
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
    });
    Qwen25VlConfig::from_json(json).unwrap()
}

/// Greedy choice among the ordinary tokens (ids >= 56 are vision specials: a generated image
/// pad would make the full forward pass ask for an image that does not exist).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate().take(56) {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A prompt row: text tokens, optionally with one image of grid [1, gh, gw] inside.
fn prompt(text: &[u32], grid: Option<[usize; 3]>) -> Vec<u32> {
    let mut ids = text.to_vec();
    if let Some([t, h, w]) = grid {
        let at = ids.len() / 2;
        let mut img = vec![58];
        img.extend(std::iter::repeat_n(60u32, t * h * w / 4));
        img.push(59);
        ids.splice(at..at, img);
    }
    ids
}

fn check(
    rows: Vec<(Vec<u32>, Option<[usize; 3]>)>,
    steps: usize,
    window: usize,
    kv: usize,
    tied: bool,
    seed: u64,
) {
    let device = Default::default();
    B::seed(&device, seed);
    let cfg = tiny_config(window, kv, tied);
    let model = Qwen25VL::<B>::init(&cfg, &device);
    let patch_dim = cfg.vision.patch_dim();
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(t, g)| prompt(t, *g)).collect();
    let grids: Vec<[usize; 3]> = rows.iter().filter_map(|(_, g)| *g).collect();
    let n_rows: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let pixels: Vec<f32> = (0..n_rows * patch_dim)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let max_len = prompts.iter().map(Vec::len).max().unwrap();
    let pad = |r: &Vec<u32>| -> (Vec<u32>, Vec<bool>) {
        let p = max_len - r.len();
        let mut ids = vec![0u32; p];
        ids.extend(r);
        let mut m = vec![false; p];
        m.extend(std::iter::repeat_n(true, r.len()));
        (ids, m)
    };
    let (ids, mask): (Vec<_>, Vec<_>) = prompts.iter().map(pad).unzip();
    let input = ModelInput {
        input_ids: ids.clone(),
        attention_mask: Some(mask.clone()),
        pixel_values: pixels.clone(),
        image_grids: grids.clone(),
        segments: None,
    };
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(&input, Some(&mut cache)).unwrap();
    let b = ids.len();
    let v = cfg.text.vocab_size;
    let last = model
        .logits(hidden.narrow(1, max_len - 1, 1))
        .reshape([b, v]);
    let mut step_logits: Vec<Vec<f32>> = vec![to_vec(last)];
    let mut generated: Vec<Vec<u32>> = vec![vec![]; b];
    for _ in 0..steps {
        let cur = step_logits.last().unwrap();
        let next: Vec<Vec<u32>> = (0..b)
            .map(|r| vec![argmax(&cur[r * v..(r + 1) * v])])
            .collect();
        for r in 0..b {
            generated[r].push(next[r][0]);
        }
        let h = model.decode_hidden(&next, &mut cache).unwrap();
        step_logits.push(to_vec(model.logits(h).reshape([b, v])));
    }
    // Full forward over prompt + generated tokens.
    let full_ids: Vec<Vec<u32>> = (0..b)
        .map(|r| [ids[r].clone(), generated[r].clone()].concat())
        .collect();
    let full_mask: Vec<Vec<bool>> = (0..b)
        .map(|r| [mask[r].clone(), vec![true; steps]].concat())
        .collect();
    let full = model
        .forward(&ModelInput {
            input_ids: full_ids,
            attention_mask: Some(full_mask),
            pixel_values: pixels,
            image_grids: grids,
            segments: None,
        })
        .unwrap();
    for (s, inc) in step_logits.iter().enumerate() {
        let pos = max_len - 1 + s;
        let f = to_vec(full.clone().narrow(1, pos, 1).reshape([b, v]));
        let max_diff = f
            .iter()
            .zip(inc)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-4,
            "step {s}: max |full - incremental| = {max_diff}"
        );
    }
}

fn grid_strategy() -> impl Strategy<Value = Option<[usize; 3]>> {
    prop_oneof![
        Just(None),
        (1usize..4, 1usize..5).prop_map(|(h, w)| Some([1, 2 * h, 2 * w]))
    ]
}

fn row_strategy() -> impl Strategy<Value = (Vec<u32>, Option<[usize; 3]>)> {
    (prop::collection::vec(1u32..56, 2..9), grid_strategy())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn incremental_decoding_matches_full_forward_batch1(row in row_strategy(), seed in 0u64..1000, kv in prop_oneof![Just(1usize), Just(2), Just(4)]) {
        check(vec![row], 4, 56, kv, seed % 2 == 0, seed);
    }

    #[test]
    fn incremental_decoding_matches_full_forward_batch3(rows in prop::collection::vec(row_strategy(), 3), seed in 0u64..1000) {
        check(rows, 4, 112, 2, seed % 2 == 1, seed);
    }
}

#[test]
fn text_only_and_image_rows_in_one_batch() {
    check(
        vec![
            (vec![1, 2, 3], None),
            (vec![4, 5, 6, 7, 8, 9, 10], Some([1, 6, 4])),
            (vec![11, 12], Some([1, 2, 2])),
        ],
        5,
        56,
        2,
        true,
        7,
    );
}

/// The rollout engine's cache (`infimed_model::kv`): prompts prefilled once per group, `n`
/// rows per group continuing with their own tokens (written in place), some rows dropped on the
/// way: every row's logits equal a full forward pass over its prompt and its own tokens.
fn check_groups(
    rows: Vec<(Vec<u32>, Option<[usize; 3]>)>,
    n: usize,
    steps: usize,
    kv: usize,
    seed: u64,
) {
    let device = Default::default();
    B::seed(&device, seed);
    let cfg = tiny_config(56, kv, seed.is_multiple_of(2));
    let model = Qwen25VL::<B>::init(&cfg, &device);
    let patch_dim = cfg.vision.patch_dim();
    let v = cfg.text.vocab_size;
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(t, g)| prompt(t, *g)).collect();
    let grids: Vec<Vec<[usize; 3]>> = rows
        .iter()
        .map(|(_, g)| g.iter().copied().collect())
        .collect();
    let pixels_of = |gs: &[[usize; 3]]| -> Vec<f32> {
        let n: usize = gs.iter().map(|g| g[0] * g[1] * g[2]).sum();
        (0..n * patch_dim)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect()
    };
    let max_len = prompts.iter().map(Vec::len).max().unwrap();
    let mut input = ModelInput {
        attention_mask: Some(vec![]),
        ..Default::default()
    };
    for (p, g) in prompts.iter().zip(&grids) {
        let pad = max_len - p.len();
        input.input_ids.push([vec![0; pad], p.clone()].concat());
        input
            .attention_mask
            .as_mut()
            .unwrap()
            .push([vec![false; pad], vec![true; p.len()]].concat());
        input.pixel_values.extend(pixels_of(g));
        input.image_grids.extend(g);
    }
    let sizes = vec![n; prompts.len()];
    let (mut cohort, _) = model.prefill_groups(&input, &sizes, steps + 1).unwrap();
    // Row r of group g feeds tokens (g * 7 + r * 3 + step) % 50 + 1 (different per row).
    let mut own: Vec<Vec<Vec<u32>>> = (0..prompts.len()).map(|_| vec![vec![]; n]).collect();
    let mut alive: Vec<Vec<usize>> = (0..prompts.len()).map(|_| (0..n).collect()).collect();
    for step in 0..steps {
        let mut feed = vec![];
        for (g, rows) in alive.iter().enumerate() {
            for &r in rows {
                let t = ((g * 7 + r * 3 + step * 5) % 50 + 1) as u32;
                own[g][r].push(t);
                feed.push(t);
            }
        }
        let logits = to_vec(model.logits(model.decode_groups(&feed, &mut [&mut cohort]).unwrap()));
        let mut k = 0;
        for (g, rows) in alive.iter().enumerate() {
            for &r in rows {
                let full_ids = [prompts[g].clone(), own[g][r].clone()].concat();
                let full = model
                    .forward(&ModelInput {
                        input_ids: vec![full_ids.clone()],
                        pixel_values: pixels_of(&grids[g]),
                        image_grids: grids[g].clone(),
                        ..Default::default()
                    })
                    .unwrap();
                let f = to_vec(full.narrow(1, full_ids.len() - 1, 1).reshape([v]));
                let d = f
                    .iter()
                    .zip(&logits[k * v..(k + 1) * v])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-4,
                    "group {g} row {r} step {step}: max |full - grouped| = {d}"
                );
                k += 1;
            }
        }
        // After step 1, drop the first row of the first group when it has more than one (the
        // groups then differ in live rows); after step 2, the whole last group.
        if step == 1 && n > 1 {
            let mut keep: Vec<Vec<usize>> =
                alive.iter().map(|rows| (0..rows.len()).collect()).collect();
            alive[0].remove(0);
            keep[0].remove(0);
            cohort.retain(&keep);
        }
        if step == 2 && alive.len() > 1 {
            let mut keep: Vec<Vec<usize>> =
                alive.iter().map(|rows| (0..rows.len()).collect()).collect();
            *keep.last_mut().unwrap() = vec![];
            alive.last_mut().unwrap().clear();
            cohort.retain(&keep);
            assert_eq!(cohort.groups(), alive.len() - 1);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn grouped_cache_decoding_matches_full_forward(rows in prop::collection::vec(row_strategy(), 1..4), n in 1usize..4, seed in 0u64..1000, kv in prop_oneof![Just(1usize), Just(2), Just(4)]) {
        check_groups(rows, n, 4, kv, seed);
    }
}
