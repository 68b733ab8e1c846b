//! Training and generation speed on the CPU backend (ndarray), small configs. No assertion:
//! speed is measured here, never in tests.
//!
//! `cargo bench --features wgpu,cuda --bench train`
//!
//! * `sft_step`: one SFT optimizer step (forward + backward + global-norm clip + AdamW) on a
//!   batch of 4 x 256 text tokens, the `small` config of benches/model.rs; tokens/s.
//! * `generate`: greedy decoding with the KV cache, 64-token prompts, 32 new tokens, batch 1 and
//!   16; new tokens/s.
//! * `grpo_step`: one whole GRPO step of the bundled demo model (`builtin:demo-tiny`) on demo data:
//!   8 prompts x 4 samples (rollout), rewards, reference log-probs, 2 updates; the time includes
//!   the run's setup and its final checkpoint (a few ms for this model).

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use infimed::data::encode::Encoded;
use infimed::engine::generate;
use infimed::generate::{rng_from_seed, Prompt, SamplingConfig};
use infimed::learn::batch::collate;
use infimed::learn::logprobs::token_nll_sum;
use infimed::learn::optim::OptimizerConfig;
use infimed::learn::optim::{adamw, clip_grad_norm};
use infimed::learn::recipe::Recipe;
use infimed::model::{Qwen25VL, Qwen25VlConfig};

type B = NdArray<f32>;
type AD = Autodiff<B>;

fn small_config() -> Qwen25VlConfig {
    Qwen25VlConfig::from_json(serde_json::json!({
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "image_token_id": 4095, "vision_start_token_id": 4093, "vision_end_token_id": 4094,
        "eos_token_id": 4092, "pad_token_id": 4091,
        "vision_config": {"depth": 4, "hidden_size": 128, "num_heads": 4, "intermediate_size": 344,
            "out_hidden_size": 256, "window_size": 112, "fullatt_block_indexes": [3]}
    }))
    .expect("small config")
}

fn text_sample(len: usize, seed: u32) -> Encoded {
    let ids: Vec<u32> = (0..len as u32)
        .map(|i| (i * 37 + seed * 101) % 4000)
        .collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| (i >= len / 2).then_some(t))
        .collect();
    Encoded {
        input_ids: ids,
        labels,
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let cfg = small_config();

    // SFT step.
    AD::seed(&device, 0);
    let mut model = Qwen25VL::<AD>::init(&cfg, &device);
    let ocfg = OptimizerConfig::with_lr(1e-5);
    let mut optim = adamw(&ocfg).init::<AD, Qwen25VL<AD>>();
    let samples: Vec<Encoded> = (0..4).map(|s| text_sample(256, s)).collect();
    let refs: Vec<&Encoded> = samples.iter().collect();
    let mb = collate(&refs, 0);
    let mut g = c.benchmark_group("sft_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements(4 * 256));
    g.bench_function("4x256_tokens", |b| {
        b.iter(|| {
            let loss = token_nll_sum(&model, &mb)
                .unwrap()
                .div_scalar(mb.target_tokens as f64);
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            clip_grad_norm(&model, &mut grads, 1.0);
            model = optim.step(1e-5, model.clone(), grads);
        })
    });
    g.finish();

    // Generation.
    let inner: Qwen25VL<B> = model.valid();
    let new = 32;
    let mut g = c.benchmark_group("generate");
    g.sample_size(10);
    for batch in [1usize, 16] {
        let prompts: Vec<Prompt> = (0..batch)
            .map(|i| Prompt {
                input_ids: text_sample(64, i as u32).input_ids,
                ..Default::default()
            })
            .collect();
        // Count what is really generated (greedy can stop early at the eos id).
        let produced: usize = generate(
            &inner,
            &prompts,
            &SamplingConfig::greedy(new),
            &[4092],
            &mut rng_from_seed(0),
        )
        .unwrap()
        .iter()
        .map(|o| o.tokens.len())
        .sum();
        g.throughput(Throughput::Elements(produced as u64));
        g.bench_function(format!("batch_{batch}_prompt_64_new_{new}"), |b| {
            b.iter(|| {
                generate(
                    &inner,
                    &prompts,
                    &SamplingConfig::greedy(new),
                    &[4092],
                    &mut rng_from_seed(0),
                )
                .unwrap()
            })
        });
    }
    g.finish();

    // A whole GRPO step of the demo model.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    infimed::demo::write_demo_data(
        &data,
        &infimed::demo::DemoDataConfig {
            seed: 0,
            train: 64,
            val: 8,
            image_size: 56,
            image_pool: None,
        },
    )
    .unwrap();
    let text = format!(
        "model = \"builtin:demo-tiny\"\ndata = \"{}\"\nmax_prompt_len = 256\nmax_response_len = 8\nmax_steps = 1\noutput_dir = \"{}\"\n\
         [optimizer]\nlr = 1e-4\n[rollout]\nprompts_per_step = 8\nn = 4\n[ppo]\nmini_batch = 4\nmicro_batch = 16\n\
         [reward]\nformat = \"none\"\nformat_weight = 0.0\naccuracy_weight = 1.0\n",
        data.join("rl_train.jsonl").display(),
        tmp.path().join("run").display()
    );
    let recipe = infimed::grpo::GrpoRecipe::from_str_with(&text, "bench.toml", &[]).unwrap();
    let mut g = c.benchmark_group("grpo_step");
    g.sample_size(10);
    g.bench_function("demo_tiny_8_prompts_x_4", |b| {
        b.iter(|| infimed::grpo::train_grpo::<AD>(&recipe, false, &device).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
