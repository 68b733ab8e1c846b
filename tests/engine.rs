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

/// The same tokens, the same stop, and log-probs equal up to f32 rounding (the batch's shape may
/// change the order of a matmul's sums).
fn same(a: &[Vec<Generation>], b: &[Vec<Generation>]) -> bool {
    let close = |x: &Generation, y: &Generation| {
        x.tokens == y.tokens
            && x.stopped == y.stopped
            && x.logprobs.len() == y.logprobs.len()
            && x.logprobs
                .iter()
                .zip(&y.logprobs)
                .all(|(p, q)| (p - q).abs() < 1e-5)
    };
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(g, h)| g.len() == h.len() && g.iter().zip(h).all(|(x, y)| close(x, y)))
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
            prop_assert!(same(&together[i..=i], &alone), "prompt {} of length {}: {:?} vs {:?}", i, lens[i], together[i], alone[0]);
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
        let gens = run(&model, &reqs, &cfg, &stop, EngineConfig::rows(rows));
        assert!(same(&gens, &reference), "generation batch {rows}");
    }
    // With a token budget, groups wait for room: the same completions.
    let budget = EngineConfig {
        max_rows: 64,
        max_batch_tokens: 80,
    };
    assert!(same(&run(&model, &reqs, &cfg, &stop, budget), &reference));
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
        for tok in sample_on_device(t, None, &cfg, &u).0 {
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
    let k2 = sample_on_device(t.clone(), None, &SamplingConfig { top_k: 2, ..cfg }, &u).0;
    assert!(k2.iter().all(|&x| x == 3 || x == 0) && k2.contains(&0) && k2.contains(&3));
    let p5 = sample_on_device(t, None, &SamplingConfig { top_p: 0.5, ..cfg }, &u).0;
    assert!(p5.iter().all(|&x| x == 3));
}

/// The engine's log-probs of its sampled tokens (KV-cached decode, sampled with temperature,
/// top-k and top-p) equal the trainer's (`response_logprobs`: one full forward, the GRPO old /
/// reference log-probs) up to f32 rounding: GRPO's rollout drift on one engine, in f32.
#[test]
fn engine_logprobs_equal_the_trainers() {
    use infimed::grpo::rollout::{response_logprobs, rollout_sequence};
    let (model, stop) = model();
    let cfg = SamplingConfig {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.9,
        max_new_tokens: 12,
    };
    let mut ps = prompts(&[5, 17, 30]);
    ps.push(image_prompt());
    let reqs: Vec<Request> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            n: 3,
            seed: 7 + i as u64,
        })
        .collect();
    let gens = run(&model, &reqs, &cfg, &stop, EngineConfig::rows(4));
    let (mut seqs, mut engine) = (vec![], vec![]);
    for (p, group) in ps.iter().zip(&gens) {
        for g in group {
            assert_eq!(g.logprobs.len(), g.tokens.len());
            seqs.push(rollout_sequence(p, &g.tokens));
            engine.extend(g.logprobs.iter().copied());
        }
    }
    let pad = model.config.tokens.pad_token_id.unwrap_or(0);
    let trainer: Vec<f32> = response_logprobs(&model, &seqs, pad, 4, 0.7)
        .unwrap()
        .concat();
    assert_eq!(trainer.len(), engine.len());
    let drift: Vec<f32> = trainer
        .iter()
        .zip(&engine)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let max = drift.iter().copied().fold(0.0, f32::max);
    let mean = drift.iter().sum::<f32>() / drift.len() as f32;
    eprintln!(
        "rollout drift over {} tokens: mean {mean:e}, max {max:e}",
        drift.len()
    );
    assert!(max < 1e-4, "drift max {max}");
    assert!(engine.iter().all(|&l| l <= 0.0 && l.is_finite()));
}
