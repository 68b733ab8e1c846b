//! SFT recipe schema, overrides, validation, data mix, schedule and the dry-run plan.

use std::path::{Path, PathBuf};

use infimed::learn::recipe::Recipe;
use infimed::learn::schedule::{lr_at, warmup_steps};
use infimed::model::Qwen25VlConfig;
use infimed::sft::plan::{
    build_plan, count_records, mix_counts, mixed_order, param_counts, selected_records,
};
use infimed::sft::recipe::{
    BackendKind, DataSource, Mix, ModelSource, Precision, ScheduleConfig, ScheduleKind, SftRecipe,
    TrainOn,
};
use proptest::prelude::*;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const MINIMAL: &str = r#"
model = "builtin:demo-tiny"
epochs = 1
per_device_batch = 2
output_dir = "runs/x"

[[data]]
path = "a.jsonl"
group = "medical_mm"

[optimizer]
lr = 1e-4
"#;

/// Writes `text` to `DIR/bad-recipe.toml` and loads it with `overrides`.
fn load(text: &str, overrides: &[&str]) -> (anyhow::Result<SftRecipe>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-recipe.toml");
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    (SftRecipe::from_file(&path, &overrides), dir)
}

/// Loading must fail with an error that names the file and contains every `needles`.
fn assert_err(text: &str, overrides: &[&str], needles: &[&str]) {
    let (res, _dir) = load(text, overrides);
    let err = format!("{:#}", res.expect_err("expected an error"));
    assert!(
        err.contains("bad-recipe.toml"),
        "error does not name the file: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error does not contain `{n}`: {err}");
    }
}

#[test]
fn demo_recipe_parses() {
    let r = SftRecipe::from_file(repo("recipes/demo-sft.toml"), &[]).unwrap();
    assert_eq!(r.model_source(), ModelSource::Builtin("demo-tiny".into()));
    assert_eq!(r.backend, BackendKind::Flex);
    assert_eq!(r.precision, Precision::F32);
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data[0].path, PathBuf::from("runs/demo/data/train.jsonl"));
    assert_eq!(r.data[0].group, "medical_mm");
    assert_eq!(r.data[0].mix(), Mix::All);
    assert_eq!(r.eval_data.len(), 1);
    assert_eq!(
        r.eval_data[0].path,
        PathBuf::from("runs/demo/data/val.jsonl")
    );
    assert_eq!(r.cutoff_len, 256);
    assert_eq!(r.per_device_batch, 16);
    assert_eq!(r.epochs, 16.0);
    // As the paper: vision tower and projector frozen, language model trained.
    assert!(r.freeze.vision_tower && r.freeze.projector && !r.freeze.language_model);
    assert!(!r.group_by_length);
    assert_eq!(r.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(r.schedule.warmup_ratio, 0.05);
    assert_eq!(r.output_dir, PathBuf::from("runs/demo/sft"));
    assert_eq!((r.save_every, r.eval_every), (100, 0));
    assert_eq!(r.train_on, TrainOn::AllAssistant);
}

#[test]
fn paper_recipe_parses() {
    let r = SftRecipe::from_file(repo("recipes/infimed-sft-3b.toml"), &[]).unwrap();
    assert_eq!(r.backend, BackendKind::Cuda);
    assert_eq!(r.precision, Precision::Bf16);
    assert_eq!(r.max_pixels, Some(262_144));
    assert_eq!(r.cutoff_len, 4096);
    assert!(r.freeze.vision_tower && r.freeze.projector && !r.freeze.language_model);
    assert_eq!(r.optimizer.lr, 5e-6);
    assert_eq!(r.optimizer.betas, [0.9, 0.999]);
    assert_eq!(r.optimizer.eps, 1e-8);
    assert_eq!(r.optimizer.weight_decay, 0.0);
    assert_eq!(r.optimizer.max_grad_norm, 1.0);
    assert_eq!(
        r.schedule,
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_ratio: 0.1,
            min_lr_ratio: 0.0
        }
    );
    assert_eq!((r.epochs, r.per_device_batch, r.grad_accum), (5.0, 4, 1));
    let groups: Vec<&str> = r.data.iter().map(|d| d.group.as_str()).collect();
    assert_eq!(groups, ["general_mm", "medical_mm", "medical_text"]);
    let total: usize = r.data.iter().map(|d| d.samples.unwrap()).sum();
    assert_eq!(total, 188_000);
}

#[test]
fn defaults() {
    let r = SftRecipe::from_str_with(MINIMAL, "minimal", &[]).unwrap();
    assert_eq!(r.backend, BackendKind::Flex);
    assert_eq!(r.device, None);
    assert_eq!(r.precision, Precision::F32);
    assert_eq!(r.cutoff_len, 4096);
    assert_eq!(r.max_pixels, None);
    assert!(r.freeze.vision_tower && r.freeze.projector && !r.freeze.language_model);
    assert_eq!(r.optimizer.betas, [0.9, 0.999]);
    assert_eq!(r.optimizer.eps, 1e-8);
    assert_eq!(r.optimizer.weight_decay, 0.0);
    assert_eq!(r.optimizer.max_grad_norm, 1.0);
    assert_eq!(
        r.schedule,
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0
        }
    );
    assert_eq!(
        (
            r.grad_accum,
            r.seed,
            r.save_every,
            r.eval_every,
            r.log_every
        ),
        (1, 42, 0, 0, 1)
    );
    assert_eq!(r.train_on, TrainOn::AllAssistant);
    assert_eq!(r.max_steps, None);
    assert!(!r.skip_invalid);
    assert_eq!(r.data[0].format, infimed::sft::recipe::DataFormat::Sharegpt);
    // The resolved recipe round-trips through TOML.
    let text = r.to_toml_string().unwrap();
    assert_eq!(SftRecipe::from_str_with(&text, "saved", &[]).unwrap(), r);
}

#[test]
fn overrides() {
    let path = repo("recipes/infimed-sft-3b.toml");
    let sets: Vec<String> = [
        "optimizer.lr=1e-5",
        "data.0.samples=20000",
        "freeze.vision_tower=false",
        "epochs=3",
        "output_dir=runs/x",
        "schedule.kind=linear",
        "optimizer.betas=[0.9, 0.95]",
        "max_steps=7",
        "model=/models/qwen",
        "device=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = SftRecipe::from_file(&path, &sets).unwrap();
    assert_eq!(r.optimizer.lr, 1e-5);
    assert_eq!(r.data[0].samples, Some(20_000));
    assert_eq!(r.data[1].samples, Some(108_000));
    assert!(!r.freeze.vision_tower);
    assert_eq!(r.epochs, 3.0);
    assert_eq!(r.output_dir, PathBuf::from("runs/x"));
    assert_eq!(r.schedule.kind, ScheduleKind::Linear);
    assert_eq!(r.optimizer.betas, [0.9, 0.95]);
    assert_eq!(r.max_steps, Some(7));
    assert_eq!(r.model_source(), ModelSource::Dir("/models/qwen".into()));
    assert_eq!(r.device, Some(1));

    // A string field keeps text that looks like a number; a missing table is created.
    let r = SftRecipe::from_str_with(
        MINIMAL,
        "m",
        &["output_dir=2024".into(), "schedule.warmup_ratio=0.2".into()],
    )
    .unwrap();
    assert_eq!(r.output_dir, PathBuf::from("2024"));
    assert_eq!(r.schedule.warmup_ratio, 0.2);
}

#[test]
fn override_errors_name_the_key() {
    assert_err(MINIMAL, &["optimizer.nope=1"], &["nope"]);
    assert_err(MINIMAL, &["bogus=3"], &["bogus"]);
    assert_err(MINIMAL, &["data.5.samples=1"], &["data.5", "out of range"]);
    assert_err(MINIMAL, &["data.x.samples=1"], &["data", "index"]);
    assert_err(MINIMAL, &["optimizer.lr"], &["key=value"]);
    // Overrides are validated like the file.
    assert_err(
        MINIMAL,
        &["optimizer.lr=-1"],
        &["optimizer.lr must be > 0, got -1"],
    );
    assert_err(
        MINIMAL,
        &["data.0.weight=0.5", "data.0.samples=3"],
        &["data.0", "samples", "weight"],
    );
}

#[test]
fn unknown_keys_are_rejected() {
    assert_err(
        &format!("{MINIMAL}foo = 1\n"),
        &[],
        &["unknown field `foo`"],
    );
    assert_err(
        &MINIMAL.replace("lr = 1e-4", "lr = 1e-4\nbeta1 = 0.9"),
        &[],
        &["unknown field `beta1`"],
    );
    assert_err(
        &MINIMAL.replace(
            "group = \"medical_mm\"",
            "group = \"medical_mm\"\nsample = 3",
        ),
        &[],
        &["sample"],
    );
    assert_err(
        &format!("{MINIMAL}[freeze]\nvision = true\n"),
        &[],
        &["unknown field `vision`"],
    );
}

#[test]
fn bad_values_name_field_and_file() {
    assert_err(
        &MINIMAL.replace("lr = 1e-4", "lr = -1"),
        &[],
        &["optimizer.lr must be > 0, got -1"],
    );
    assert_err(
        &format!("{MINIMAL}[schedule]\nwarmup_ratio = 1.5\n"),
        &[],
        &["schedule.warmup_ratio", "1.5"],
    );
    assert_err(
        &MINIMAL.replace("per_device_batch = 2", "per_device_batch = 0"),
        &[],
        &["per_device_batch"],
    );
    assert_err(
        &MINIMAL.replace(
            "group = \"medical_mm\"",
            "group = \"medical_mm\"\nsamples = 3\nweight = 0.5",
        ),
        &[],
        &["data.0", "samples", "weight"],
    );
    assert_err(
        &MINIMAL.replace(
            "epochs = 1",
            "epochs = 1\nprecision = \"bf16\"\nbackend = \"ndarray\"",
        ),
        &[],
        &["precision", "bf16", "cuda"],
    );
    assert_err(
        &format!("{MINIMAL}[schedule]\nkind = \"cosin\"\n"),
        &[],
        &["cosin", "cosine"],
    );
    assert_err(
        &MINIMAL.replace("epochs = 1", "epochs = 0"),
        &[],
        &["epochs must be > 0"],
    );
    assert_err(
        &MINIMAL.replace("epochs = 1", "epochs = 1\nbackend = \"tpu\""),
        &[],
        &["tpu"],
    );
    assert_err(
        &MINIMAL.replace("builtin:demo-tiny", "builtin:huge"),
        &[],
        &["model", "huge"],
    );
    assert_err(
        &MINIMAL.replace("epochs = 1", "epochs = 1\neval_every = 5"),
        &[],
        &["eval_every", "eval_data"],
    );
    assert_err(
        &format!(
            "{MINIMAL}[freeze]\nvision_tower = true\nprojector = true\nlanguage_model = true\n"
        ),
        &[],
        &["freeze", "nothing to train"],
    );
    assert_err(
        &MINIMAL.replace(
            "group = \"medical_mm\"",
            "group = \"medical_mm\"\nweight = -2.0",
        ),
        &[],
        &["data.0.weight"],
    );
    assert_err(
        &MINIMAL.replace(
            "[[data]]\npath = \"a.jsonl\"\ngroup = \"medical_mm\"\n",
            "data = []\n",
        ),
        &[],
        &["data"],
    );
    // Several problems are all reported, each with the file.
    let (res, _d) = load(
        &MINIMAL
            .replace("lr = 1e-4", "lr = -1")
            .replace("per_device_batch = 2", "per_device_batch = 0"),
        &[],
    );
    let err = res.unwrap_err().to_string();
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.lines().all(|l| l.contains("bad-recipe.toml")), "{err}");
    // bf16 with cuda is fine.
    let ok = MINIMAL.replace(
        "epochs = 1",
        "epochs = 1\nprecision = \"bf16\"\nbackend = \"cuda\"",
    );
    SftRecipe::from_str_with(&ok, "ok", &[]).unwrap();
    // A missing file is named.
    let err = SftRecipe::from_file("no/such/recipe.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/recipe.toml"), "{err}");
}

#[test]
fn mix_rules() {
    let src = |samples: Option<usize>, weight: Option<f64>| {
        let mut d = DataSource::new("x.jsonl", "g");
        d.samples = samples;
        d.weight = weight;
        d
    };
    let sources = [
        src(None, None),
        src(Some(5), None),
        src(Some(25), None),
        src(None, Some(0.5)),
        src(None, Some(2.0)),
    ];
    assert_eq!(
        mix_counts(&sources, &[10, 10, 10, 7, 10]).unwrap(),
        vec![10, 5, 25, 4, 20]
    );
    assert!(mix_counts(&sources, &[10]).is_err());
    let err = mix_counts(&[src(Some(3), None)], &[0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.0") && err.contains("no records"),
        "{err}"
    );
    assert_eq!(mix_counts(&[src(Some(0), None)], &[0]).unwrap(), vec![0]);
}

#[test]
fn count_records_jsonl_and_array() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("a.jsonl");
    std::fs::write(
        &jsonl,
        "{\"messages\": []}\n\n   \n{\"messages\": []}\n{\"messages\": []}",
    )
    .unwrap();
    assert_eq!(count_records(&jsonl).unwrap(), 3);
    let arr = dir.path().join("b.json");
    std::fs::write(&arr, "\n  [{\"messages\": []}, {\"messages\": [1, [2]]}]\n").unwrap();
    assert_eq!(count_records(&arr).unwrap(), 2);
    let empty = dir.path().join("c.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    assert_eq!(count_records(&empty).unwrap(), 0);
    let err = count_records(dir.path().join("missing.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.jsonl"), "{err}");
}

#[test]
fn schedule_acceptance_values() {
    let cfg = ScheduleConfig {
        kind: ScheduleKind::Cosine,
        warmup_ratio: 0.1,
        min_lr_ratio: 0.0,
    };
    let want = [
        (0usize, 0.0f64),
        (1, 5e-7),
        (5, 2.5e-6),
        (10, 5e-6),
        (11, 4.99847706754774e-06),
        (55, 2.5e-06),
        (99, 1.5229324522605949e-09),
    ];
    for (t, w) in want {
        let got = lr_at(&cfg, 5e-6, t, 100);
        if w == 0.0 {
            assert_eq!(got, 0.0);
        } else {
            assert!(
                ((got - w) / w).abs() < 1e-12,
                "step {t}: got {got:e}, want {w:e}"
            );
        }
    }
}

#[test]
fn paper_plan_3b() {
    let recipe = SftRecipe::from_file(repo("recipes/infimed-sft-3b.toml"), &[]).unwrap();
    let cfg = Qwen25VlConfig::qwen2_5_vl_3b();
    // Fake file sizes: the general file is bigger than needed (subset), the text file smaller (upsampled).
    let available = [50_000, 108_000, 30_000];
    let plan = build_plan(&recipe, &cfg, &available).unwrap();
    assert_eq!(
        plan.sources.iter().map(|s| s.selected).collect::<Vec<_>>(),
        [40_000, 108_000, 40_000]
    );
    assert_eq!(plan.total_samples, 188_000);
    assert_eq!(plan.world_size, 8); // one node of 8 GPUs, as the paper
    assert_eq!(plan.steps_per_epoch, 5_875); // ceil(188000 / (4 * 8 * 1))
    assert_eq!(plan.total_steps, 29_375); // x 5 epochs
    assert_eq!(plan.warmup_steps, 2_938);
    assert_eq!(
        plan.warmup_steps,
        (0.1 * plan.total_steps as f64).ceil() as usize
    );
    // The dry run shows the per-rank plan of the world size.
    let text = plan.to_string();
    assert!(text.contains("4 per device x 1 accumulation x 8 rank(s) (1 node(s) x 8 devices) = 32 examples per optimizer step"), "{text}");
    assert!(
        text.contains(
            "per rank   4 examples per optimizer step (4 per micro-batch x 1), 29,375 steps"
        ),
        "{text}"
    );

    let p = param_counts(&cfg);
    assert_eq!(p.total(), 3_754_622_976);
    assert_eq!(p.vision_tower(), 631_975_680);
    assert_eq!(p.projector, 36_708_608);
    assert_eq!(p.language_model(), 3_085_938_688);
    assert_eq!(plan.trainable_params, 3_085_938_688);
    assert_eq!(plan.frozen_params, 668_684_288);
    assert_eq!(plan.frozen.vision_tower, 631_975_680);
    assert_eq!(plan.frozen.projector, 36_708_608);
    // Memory, as the learner allocates it (bf16 compute, f32 master weights, per-layer
    // checkpointing, the memory-efficient attention and the chunked head).
    let (pp, n) = (3_754_622_976u64, 3_085_938_688u64);
    let m = &plan.memory;
    assert_eq!(m.master_weights, 4 * pp);
    assert_eq!(m.compute_weights, 2 * pp);
    assert_eq!(m.gradients, 4 * n);
    assert_eq!(m.accumulation, 0);
    assert_eq!(m.optimizer_state, 8 * n);
    assert_eq!(m.optimizer_transient, 3 * 4 * 151_936 * 2048);
    // Saved layer inputs 36 x 4 x 4096 x 2048 x 2 bytes, one layer's working set
    // 4 x 4096 x (10*2048 + 4*256 + 6*11008) x 2, embeddings and final norm 3 x 4 x 4096 x 2048 x 2.
    let (bs, e) = (4 * 4096u64, 2u64);
    assert_eq!(
        m.activations,
        36 * bs * 2048 * e + bs * (10 * 2048 + 4 * 256 + 6 * 11008) * e + 3 * bs * 2048 * e
    );
    assert_eq!(
        m.attention_working_set,
        4 * 4 * 16 * 128 * 128 * 4 + 4 * bs * 2048
    );
    assert_eq!(m.logits, 4 * 1024 * 151_936 * 4);
    assert!(
        m.total() <= 80 << 30,
        "3B recipe at 4 x 4,096 tokens: {} bytes > 80 GiB",
        m.total()
    );
    // What the materialising attention would add: 36 layers x 6 x 4 x 16 x 4096^2 x 4 bytes.
    assert_eq!(m.reference_attention, 36 * 6 * 4 * 16 * 4096 * 4096 * 4);

    // The paper's global batch on one device: 8 x accumulation -> the same 5,875 steps per epoch.
    let r8 = SftRecipe::from_file(
        repo("recipes/infimed-sft-3b.toml"),
        &["grad_accum=8".into(), "parallel.devices=1".into()],
    )
    .unwrap();
    let plan8 = build_plan(&r8, &cfg, &available).unwrap();
    assert_eq!(
        (plan8.steps_per_epoch, plan8.total_steps, plan8.warmup_steps),
        (5_875, 29_375, 2_938)
    );

    // An ablation is one line; rounding up: 168,001 samples / 4 -> 42,001 steps (one device).
    let r = SftRecipe::from_file(
        repo("recipes/infimed-sft-3b.toml"),
        &["data.0.samples=20001".into(), "parallel.devices=1".into()],
    )
    .unwrap();
    let plan = build_plan(&r, &cfg, &available).unwrap();
    assert_eq!(plan.total_samples, 168_001);
    assert_eq!(plan.steps_per_epoch, 42_001);
    assert_eq!(plan.total_steps, 210_005);
    assert_eq!(plan.warmup_steps, warmup_steps(210_005, 0.1));

    let text = plan.to_string();
    for needle in [
        "general_mm",
        "medical_text",
        "upsampled",
        "vision tower",
        "3,085,938,688",
        "warmup",
        "x 1 rank(s)",
    ] {
        assert!(
            text.contains(needle),
            "plan display lacks `{needle}`:\n{text}"
        );
    }
}

#[test]
fn demo_plan_and_max_steps() {
    let recipe =
        SftRecipe::from_file(repo("recipes/demo-sft.toml"), &["max_steps=5".into()]).unwrap();
    let plan = build_plan(&recipe, &Qwen25VlConfig::qwen2_5_vl_3b(), &[100]).unwrap();
    assert_eq!(plan.steps_per_epoch, 7); // ceil(100 / 16)
    assert_eq!(plan.total_steps, 5);
    assert!(plan.capped_by_max_steps);
    assert_eq!(plan.warmup_steps, 1); // ceil(5 * 0.05)
    assert_eq!(plan.trainable_params, plan.params.language_model());
    assert_eq!(plan.memory.compute_weights, 0); // f32 computes on the master weights
                                                // Wrong number of counts, empty mix.
    assert!(build_plan(&recipe, &Qwen25VlConfig::qwen2_5_vl_3b(), &[1, 2]).is_err());
    assert!(build_plan(&recipe, &Qwen25VlConfig::qwen2_5_vl_3b(), &[0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn mixed_order_is_deterministic_and_complete(
        sizes in prop::collection::vec((0usize..40, 0usize..80), 1..5),
        seed in any::<u64>(),
        epoch in 0usize..4,
    ) {
        let available: Vec<usize> = sizes.iter().map(|&(a, _)| a).collect();
        let counts: Vec<usize> = sizes.iter().map(|&(a, c)| if a == 0 { 0 } else { c }).collect();
        let order = mixed_order(&counts, &available, seed, epoch);
        prop_assert_eq!(&order, &mixed_order(&counts, &available, seed, epoch));
        prop_assert_eq!(order.len(), counts.iter().sum::<usize>());
        for (s, (&c, &a)) in counts.iter().zip(&available).enumerate() {
            let mut got: Vec<usize> = order.iter().filter(|p| p.0 == s).map(|p| p.1).collect();
            got.sort_unstable();
            // Exactly the selected records, each as often as selected; all indices in range.
            prop_assert_eq!(&got, &selected_records(c, a, seed, s));
            prop_assert!(got.iter().all(|&r| r < a));
            // Every record appears floor(c / a) or ceil(c / a) times.
            for r in 0..a {
                let n = got.iter().filter(|&&x| x == r).count();
                prop_assert!(n == c / a || n == c / a + 1);
            }
            // The selection is the same every epoch.
            let mut other: Vec<usize> = mixed_order(&counts, &available, seed, epoch + 1)
                .into_iter().filter(|p| p.0 == s).map(|p| p.1).collect();
            other.sort_unstable();
            prop_assert_eq!(&got, &other);
        }
    }

    #[test]
    fn lr_bounds_and_monotonicity(
        total in 1usize..400,
        warmup_ratio in 0.0f64..=1.0,
        min_lr_ratio in 0.0f64..=1.0,
        kind in prop_oneof![Just(ScheduleKind::Cosine), Just(ScheduleKind::Linear), Just(ScheduleKind::Constant)],
        base in 1e-7f64..1.0,
    ) {
        let cfg = ScheduleConfig { kind, warmup_ratio, min_lr_ratio };
        let w = warmup_steps(total, warmup_ratio);
        prop_assert_eq!(w, (total as f64 * warmup_ratio).ceil() as usize);
        let lrs: Vec<f64> = (0..total + 3).map(|t| lr_at(&cfg, base, t, total)).collect();
        for &lr in &lrs {
            prop_assert!(lr >= 0.0 && lr <= base * (1.0 + 1e-12), "lr {} outside [0, {}]", lr, base);
        }
        for t in 1..lrs.len() {
            if t < w {
                prop_assert!(lrs[t] > lrs[t - 1], "warmup not increasing at {}", t);
            } else if t > w {
                prop_assert!(lrs[t] <= lrs[t - 1] * (1.0 + 1e-12), "decay increases at {}", t);
            }
        }
    }
}
