//! The rollout engine: continuous batching gives every sequence the tokens it gets decoded alone;
//! sampling is batch-invariant (same seed, same completions with any generation batch); a
//! prompt's n samples share one prefill (the vision tower runs once per prompt) and one copy of
//! the prompt's keys and values; device sampling follows the distribution.

mod common;

use burn::backend::NdArray;
use common::*;
use infimed::engine::{generate_requests, sample_on_device, EngineConfig, Request};
use infimed::generate::{stop_tokens, Generation, Prompt, SamplingConfig};
use infimed::model::Qwen25VL;
use proptest::prelude::*;

type B = NdArray<f32>;

fn model() -> (Qwen25VL<B>, Vec<u32>) {
    let dir = model_dir("tiny-gqa2");
    let model = Qwen25VL::<B>::load(&dir, &Default::default()).unwrap();
    let stop = stop_tokens(&dir, &model.config.tokens.eos_token_ids).unwrap();
    (model, stop)
}

/// Text prompts from the fixture samples, cut to the given lengths.
fn prompts(lens: &[usize]) -> Vec<Prompt> {
    let base: Vec<u32> = u32s(&sample("text_only")["input_ids"]);
    lens.iter()
        .enumerate()
        .map(|(i, &l)| Prompt {
            input_ids: (0..l).map(|j| base[(j + 3 * i) % base.len()]).collect(),
            ..Default::default()
        })
        .collect()
}

fn image_prompt() -> Prompt {
    let s = sample("one_image");
    Prompt {
        input_ids: u32s(&s["input_ids"]),
        pixel_values: read_tensor(s["pixel_values_file"].as_str().unwrap(), "pixel_values").0,
        image_grids: grids(&s["image_grid_thw"]),
    }
}

fn run(
    model: &Qwen25VL<B>,
    reqs: &[Request],
    cfg: &SamplingConfig,
    stop: &[u32],
    engine: EngineConfig,
) -> Vec<Vec<Generation>> {
    generate_requests(model, reqs, cfg, stop, &engine, |_, _| {})
        .unwrap()
        .0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    /// Prompts of mixed lengths, rows finishing at different steps (stop tokens and a length
    /// limit), 3 rows at a time with waiting prompts joining: every sequence gets exactly the
    /// tokens it gets alone.
    #[test]
    fn continuous_batching_equals_one_at_a_time(lens in prop::collection::vec(3usize..40, 2..7), max_new in 1usize..12) {
        let (model, stop) = model();
        let cfg = SamplingConfig::greedy(max_new);
        let reqs: Vec<Request> = prompts(&lens).into_iter().map(|prompt| Request { prompt, n: 1, seed: 0 }).collect();
        let together = run(&model, &reqs, &cfg, &stop, EngineConfig::rows(3));
        for (i, r) in reqs.iter().enumerate() {
            let alone = run(&model, std::slice::from_ref(r), &cfg, &stop, EngineConfig::rows(1));
            prop_assert_eq!(&together[i], &alone[0], "prompt {} of length {}", i, lens[i]);
        }
    }
}

#[test]
fn sampled_completions_do_not_depend_on_the_generation_batch() {
    let (model, stop) = model();
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 20,
        top_p: 0.9,
        max_new_tokens: 10,
    };
    let mut ps = prompts(&[5, 17, 9, 30, 12, 8, 21]);
    ps.push(image_prompt());
    let reqs: Vec<Request> = ps
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            n: 3,
            seed: 100 + i as u64,
        })
        .collect();
    let reference = run(&model, &reqs, &cfg, &stop, EngineConfig::rows(1));
    for rows in [3, 7, 64] {
        assert_eq!(
            run(&model, &reqs, &cfg, &stop, EngineConfig::rows(rows)),
            reference,
            "generation batch {rows}"
        );
    }
    // With a token budget, groups wait for room: the same completions.
    let budget = EngineConfig {
        max_rows: 64,
        max_batch_tokens: 80,
    };
    assert_eq!(run(&model, &reqs, &cfg, &stop, budget), reference);
    // The samples of a prompt differ from each other (their own RNGs).
    assert!(reference.iter().any(|g| g[0].tokens != g[1].tokens));
}

#[test]
fn samples_of_a_prompt_share_one_prefill_and_one_prefix_cache() {
    let (model, stop) = model();
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 6,
    };
    let p = image_prompt();
    let plen = p.input_ids.len();
    let reqs = vec![
        Request {
            prompt: p.clone(),
            n: 8,
            seed: 1,
        },
        Request {
            prompt: p,
            n: 8,
            seed: 2,
        },
    ];
    let (gens, stats) = generate_requests(
        &model,
        &reqs,
        &cfg,
        &stop,
        &EngineConfig::rows(8),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(gens.iter().map(Vec::len).collect::<Vec<_>>(), [8, 8]);
    // Two prompts, 16 samples: the vision tower ran twice (once per prompt).
    assert_eq!(stats.prefill_images, 2);
    assert_eq!(stats.prefill_prompts, 2);
    // One group at a time (8 rows): the prompt's keys and values once, not 8 times.
    let t = &model.config.text;
    let one_prompt = plen * t.num_key_value_heads * t.head_dim * 2 * t.num_hidden_layers * 4;
    assert_eq!(stats.peak_prefix_bytes, one_prompt, "prefix held once");
    // Each sample's own buffer: at most 8 rows x 6 tokens (rows that stop are dropped).
    assert!(
        stats.peak_own_bytes > 0
            && stats.peak_own_bytes
                <= 8 * 6 * t.num_key_value_heads * t.head_dim * 2 * t.num_hidden_layers * 4
    );
    eprintln!(
        "prefix cache {} bytes for 8 samples (8 copies would be {}), own buffers {} bytes",
        stats.peak_prefix_bytes,
        8 * one_prompt,
        stats.peak_own_bytes
    );
}

#[test]
fn device_sampling_follows_the_distribution() {
    let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5, -0.5];
    let device = Default::default();
    let n = 30_000;
    let mut counts = [0usize; 6];
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 1,
    };
    let mut rng = infimed::engine::sample_rng(7, 0);
    for _ in 0..n / 1000 {
        let rows: Vec<f32> = (0..1000).flat_map(|_| logits).collect();
        let t = burn::tensor::Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(rows, [1000, 6]),
            &device,
        );
        let u: Vec<f64> = (0..1000)
            .map(|_| rand::Rng::random::<f64>(&mut rng))
            .collect();
        for tok in sample_on_device(t, &cfg, &u) {
            counts[tok as usize] += 1;
        }
    }
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    let chi2: f64 = logits
        .iter()
        .zip(counts)
        .map(|(&l, c)| {
            let e = n as f64 * (l as f64).exp() / z;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    assert!(chi2 < 20.52, "chi-square {chi2} for {counts:?}");
    // top-k 2 keeps ids 3 and 0; top-p 0.5 keeps the top id only here.
    let t = burn::tensor::Tensor::<B, 2>::from_data(
        burn::tensor::TensorData::new(logits.repeat(200), [200, 6]),
        &device,
    );
    let u: Vec<f64> = (0..200).map(|i| i as f64 / 200.0).collect();
    let k2 = sample_on_device(t.clone(), &SamplingConfig { top_k: 2, ..cfg }, &u);
    assert!(k2.iter().all(|&x| x == 3 || x == 0) && k2.contains(&0) && k2.contains(&3));
    let p5 = sample_on_device(t, &SamplingConfig { top_p: 0.5, ..cfg }, &u);
    assert!(p5.iter().all(|&x| x == 3));
}
