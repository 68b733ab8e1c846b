//! GRPO: 4 steps in one run equal 2 steps, stop, `--resume`, 2 more steps: bit-identical weights
//! and identical rollouts/rewards on ndarray (the prompt order and the sampler of every step
//! derive from the seed and the step, the optimizer state is restored from the checkpoint).
//! Also the recipe paths: old log-probs recomputed (2 updates per step) and the KL term on; and
//! the same with dynamic sampling, GSPO, TIS, the entropy bonus and overlong handling on.

use burn::backend::{Autodiff, NdArray};
use infimed::demo::{write_demo_data, DemoDataConfig};
use infimed::grpo::{train_grpo, GrpoRecipe};
use infimed::learn::recipe::Recipe;

type B = Autodiff<NdArray<f32>>;

fn recipe(data: &std::path::Path, out: &std::path::Path, max_steps: usize) -> GrpoRecipe {
    recipe_with(data, out, max_steps, "")
}

/// The recipe with more `[algorithm]` lines.
fn recipe_with(
    data: &std::path::Path,
    out: &std::path::Path,
    max_steps: usize,
    algorithm: &str,
) -> GrpoRecipe {
    let text = format!(
        r#"
model = "builtin:demo-tiny"
data = "{data}"
eval_data = "{eval}"
eval_limit = 4
max_prompt_len = 256
max_response_len = 4
max_steps = {max_steps}
seed = 3
output_dir = "{out}"
save_every = 1
# The test reads checkpoint-1 after the run: keep every checkpoint.
keep_checkpoints = 0
log_completions_every = 1
[freeze]
vision_tower = true
projector = true
[optimizer]
lr = 1e-3
weight_decay = 0.01
[rollout]
prompts_per_step = 2
n = 3
generation_batch = 4
[ppo]
mini_batch = 1
micro_batch = 2
[algorithm]
kl_coef = 0.05
{algorithm}
[reward]
format = "none"
format_weight = 0.0
accuracy_weight = 1.0
"#,
        data = data.join("rl_train.jsonl").display(),
        eval = data.join("rl_val.jsonl").display(),
        out = out.display()
    );
    GrpoRecipe::from_str_with(&text, "test.toml", &[]).unwrap()
}

fn metric_lines(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in ["rollout_tokens_per_s", "update_tokens_per_s", "step_secs"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

#[test]
fn resume_continues_with_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_demo_data(
        &data,
        &DemoDataConfig {
            seed: 1,
            train: 20,
            val: 6,
            image_size: 56,
            image_pool: None,
        },
    )
    .unwrap();
    let device = Default::default();

    let a = tmp.path().join("a");
    let sa = train_grpo::<B>(&recipe(&data, &a, 4), false, &device).unwrap();
    assert_eq!(sa.steps, 4);

    let b = tmp.path().join("b");
    train_grpo::<B>(&recipe(&data, &b, 2), false, &device).unwrap();
    let sb = train_grpo::<B>(&recipe(&data, &b, 4), true, &device).unwrap();
    assert_eq!(sb.steps, 4);

    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "weights differ after resume");
    let (ma, mb) = (metric_lines(&a), metric_lines(&b));
    assert_eq!(ma.len(), 4);
    assert_eq!(
        ma, mb,
        "per-step metrics (rewards, kl, losses) differ after resume"
    );
    for m in &ma {
        assert!(m["kl"].as_f64().unwrap().is_finite());
    }
    // The run did update the policy: the weights moved away from the initial ones.
    let init =
        infimed::models::load_model::<NdArray<f32>>("builtin:demo-tiny", 3, &device).unwrap();
    let first = infimed::model::Qwen25VL::<NdArray<f32>>::load(&a.join("checkpoint-1/hf"), &device)
        .unwrap();
    let flat = |m: &infimed::model::Qwen25VL<NdArray<f32>>| -> Vec<f32> {
        m.export_tensors()
            .into_iter()
            .flat_map(|t| t.values)
            .collect()
    };
    assert_ne!(flat(&init), flat(&first));
    // Completions are logged with their reward parts.
    let c = std::fs::read_to_string(a.join("completions.jsonl")).unwrap();
    let first_line: serde_json::Value = serde_json::from_str(c.lines().next().unwrap()).unwrap();
    for k in [
        "response",
        "reward",
        "accuracy",
        "format",
        "advantage",
        "task",
    ] {
        assert!(first_line.get(k).is_some(), "{k} missing in {first_line}");
    }
}

#[test]
fn resume_with_dynamic_sampling_gspo_and_tis_continues_with_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = DemoDataConfig {
        seed: 1,
        train: 20,
        val: 6,
        image_size: 56,
        image_pool: None,
    };
    write_demo_data(&data, &cfg).unwrap();
    let extra = r#"
policy_loss = "gspo"
loss_agg = "seq_mean_token_mean"
clip_low = 0.0003
clip_high = 0.0004
rollout_is = "tis"
entropy_coef = 0.001
mask_truncated = true
overlong_buffer = 2
overlong_penalty = 0.5
dynamic_sampling = true
max_sampling_rounds = 3
"#;
    let device = Default::default();
    let a = tmp.path().join("a");
    train_grpo::<B>(&recipe_with(&data, &a, 4, extra), false, &device).unwrap();
    let b = tmp.path().join("b");
    train_grpo::<B>(&recipe_with(&data, &b, 2, extra), false, &device).unwrap();
    train_grpo::<B>(&recipe_with(&data, &b, 4, extra), true, &device).unwrap();
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "weights differ after resume");
    let (ma, mb) = (metric_lines(&a), metric_lines(&b));
    assert_eq!(ma, mb, "per-step metrics differ after resume");
    assert_eq!(ma.len(), 4);
    for m in &ma {
        let get = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k} in {m}"));
        let (rounds, kept, dropped) = (
            get("sampling_rounds"),
            get("groups_kept"),
            get("groups_dropped"),
        );
        // Every step is filled (2 informative groups) or used its 3 rounds; every group rolled
        // out was kept, dropped (zero variance) or beyond the 2 needed.
        assert!(kept == 2.0 || rounds == 3.0, "{m}");
        assert!((1.0..=3.0).contains(&rounds), "{m}");
        assert!(kept + dropped <= 2.0 * rounds, "{m}");
        assert_eq!(get("zero_variance_groups"), dropped, "{m}");
        // One engine, f32: the engine's log-probs are the trainer's up to rounding.
        assert!(get("rollout_drift_max") < 1e-4, "{m}");
        assert!(get("rollout_drift_mean") <= get("rollout_drift_max"), "{m}");
    }
}
