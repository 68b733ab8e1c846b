//! infimed's half of the infimed-vs-PyTorch comparison (`benches/compare.py` is the other half,
//! `benches/compare.sh` runs both and prints one table). The same model shapes
//! (`benches/shapes/*.json`, HF config files) and workloads run in both:
//!
//! | row | workload (small / 3b) | unit |
//! |---|---|---|
//! | vision forward | 1 image of 32x32 patches / 4 images of 36x36 patches (262,144 px each) | patches/s |
//! | LM forward | 4 x 256 / 1 x 4096 text tokens, logits of every position | tokens/s |
//! | SFT step | fwd + bwd + global clip + AdamW, 4 x 256 / 4 x 4096 tokens, labels on the second half | tokens/s |
//! | generate bN | greedy with the KV cache, 64 / 512-token prompts, 32 / 64 new tokens, batch 1, 16 / 16, 256 | new tokens/s |
//!
//! Each row is timed `--repeat` times after one warm-up run; the median is reported. Peak memory
//! is the process's resident-set high-water mark during the row (reset before each row through
//! `/proc/self/clear_refs`; CPU backends only).
//!
//! `cargo bench --features flex --bench compare -- --shape small [--backend ndarray|flex|wgpu|cuda]
//! [--precision f32|bf16] [--rows vision,lm,sft,gen] [--repeat N] [--json OUT]`

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use infimed::backend::GradientCheckpointing;
use infimed::backend::{
    check_precision, compute_model, dispatch_autodiff, AutodiffJob, BackendArgs, BackendKind,
    Precision,
};
use infimed::bench::SftStepper;
use infimed::engine::generate;
use infimed::generate::{rng_from_seed, Prompt, SamplingConfig};
use infimed::learn::freeze::FreezeConfig;
use infimed::model::AttentionImpl;
use infimed::model::TrainBackend;
use infimed::model::{ModelInput, Qwen25VL, Qwen25VlConfig};
use serde_json::{json, Value};

struct Workload {
    images: Vec<[usize; 3]>,
    lm: (usize, usize),
    sft: (usize, usize),
    prompt: usize,
    new_tokens: usize,
    gen_batches: Vec<usize>,
}

fn workload(shape: &str) -> Result<Workload> {
    Ok(match shape {
        "small" => Workload {
            images: vec![[1, 32, 32]],
            lm: (4, 256),
            sft: (4, 256),
            prompt: 64,
            new_tokens: 32,
            gen_batches: vec![1, 16],
        },
        "3b" => Workload {
            images: vec![[1, 36, 36]; 4],
            lm: (1, 4096),
            sft: (4, 4096),
            prompt: 512,
            new_tokens: 64,
            gen_batches: vec![16, 256],
        },
        other => bail!("unknown shape {other:?} (small, 3b)"),
    })
}

struct Args {
    shape: String,
    backend: BackendKind,
    precision: Precision,
    rows: Vec<String>,
    repeat: usize,
    json: Option<std::path::PathBuf>,
    /// Gradient checkpointing for the SFT step (burn's balanced checkpointing).
    checkpointing: bool,
    /// Override the SFT step's `batch x tokens` (e.g. `1x2048`).
    sft: Option<(usize, usize)>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        shape: "small".into(),
        backend: BackendKind::Ndarray,
        precision: Precision::F32,
        rows: vec![],
        repeat: 5,
        json: None,
        checkpointing: false,
        sft: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().with_context(|| format!("{x} needs a value"));
        match x.as_str() {
            "--shape" => a.shape = val()?,
            "--backend" => a.backend = val()?.parse()?,
            "--precision" => {
                a.precision = if val()? == "bf16" {
                    Precision::Bf16
                } else {
                    Precision::F32
                }
            }
            "--rows" => a.rows = val()?.split(',').map(str::to_string).collect(),
            "--repeat" => a.repeat = val()?.parse()?,
            "--json" => a.json = Some(val()?.into()),
            "--checkpointing" => a.checkpointing = true,
            "--sft" => {
                let v = val()?;
                let (b, t) = v
                    .split_once('x')
                    .with_context(|| format!("--sft wants BxT, got {v}"))?;
                a.sft = Some((b.parse()?, t.parse()?));
            }
            "--bench" => {} // added by `cargo bench`
            other => bail!("unknown argument {other}"),
        }
    }
    if a.rows.is_empty() {
        a.rows = ["vision", "lm", "sft", "gen"].map(String::from).to_vec();
    }
    Ok(a)
}

/// Reset the resident-set high-water mark (Linux), so each row reports its own peak.
fn reset_peak() {
    infimed::bench::reset_peak();
}

/// Resident-set high-water mark in MiB (Linux).
fn peak_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

use infimed::bench::bench_ids as ids;

struct Compare {
    cfg: Qwen25VlConfig,
    work: Workload,
    args: Args,
}

impl AutodiffJob for Compare {
    type Output = Vec<Value>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Vec<Value>> {
        let Compare { cfg, work, args } = self;
        check_precision::<B>(args.precision, &device)?;
        B::seed(&device, 0);
        let master = Qwen25VL::<B>::init(&cfg, &device);
        let vocab = cfg.text.vocab_size;
        let sync = |d: &B::Device| B::sync(d).map_err(|e| anyhow::anyhow!("{e:?}"));
        let mut rows = vec![];
        let mut time = |name: &str,
                        unit: &str,
                        amount: f64,
                        f: &mut dyn FnMut() -> Result<()>|
         -> Result<()> {
            f()?; // warm-up
            sync(&device)?;
            reset_peak();
            let mut secs = vec![];
            for _ in 0..args.repeat {
                let t = Instant::now();
                f()?;
                sync(&device)?;
                secs.push(t.elapsed().as_secs_f64());
            }
            let s = median(secs);
            let peak = if matches!(args.backend, BackendKind::Ndarray | BackendKind::Flex) {
                peak_mib()
            } else {
                None
            };
            eprintln!(
                "{name:<16} {:>12.1} {unit}  ({:.4} s median of {})",
                amount / s,
                s,
                args.repeat
            );
            rows.push(json!({"name": name, "unit": unit, "value": amount / s, "seconds": s, "peak_mib": peak}));
            Ok(())
        };
        let inner = compute_model(&master.valid(), args.precision);

        if args.rows.iter().any(|r| r == "vision") {
            let n: usize = work.images.iter().map(|g| g[0] * g[1] * g[2]).sum();
            let dim = cfg.vision.patch_dim();
            let pixels: Vec<f32> = (0..n * dim)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let grids = work.images.clone();
            time("vision forward", "patches/s", n as f64, &mut || {
                let x = Tensor::<B::InnerBackend, 2>::from_data(
                    TensorData::new(pixels.clone(), [n, dim]),
                    &device,
                );
                let x = infimed::model::nn::cast_like(x, &inner.visual.patch_embed.weight.val());
                let _ = inner.visual.forward(x, &grids).into_data();
                Ok(())
            })?;
        }
        if args.rows.iter().any(|r| r == "lm") {
            let (b, t) = work.lm;
            let input = ModelInput::text((0..b).map(|s| ids(t, s, vocab)).collect());
            time("LM forward", "tokens/s", (b * t) as f64, &mut || {
                let _ = inner.forward(&input)?.into_data();
                Ok(())
            })?;
        }
        if args.rows.iter().any(|r| r == "sft") {
            // The same step `infimed bench sft` times: the learner's accumulate -> clip -> AdamW.
            let (b, t) = work.sft;
            let batch = infimed::bench::sft_batch(vocab, b, t, false);
            let ck = if args.checkpointing {
                GradientCheckpointing::Balanced
            } else {
                GradientCheckpointing::Off
            };
            let mut stepper = SftStepper::<B>::new(
                &cfg,
                &FreezeConfig::default(),
                batch,
                args.precision,
                ck,
                AttentionImpl::default(),
                &device,
            );
            time("SFT step", "tokens/s", (b * t) as f64, &mut || {
                stepper.step().map(|_| ())
            })?;
        }
        if args.rows.iter().any(|r| r == "gen") {
            for &b in &work.gen_batches {
                let prompts: Vec<Prompt> = (0..b)
                    .map(|s| Prompt {
                        input_ids: ids(work.prompt, s, vocab),
                        ..Default::default()
                    })
                    .collect();
                let cfg_g = SamplingConfig::greedy(work.new_tokens);
                // No stop token: every row generates exactly `new_tokens`.
                time(
                    &format!("generate b{b}"),
                    "tokens/s",
                    (b * work.new_tokens) as f64,
                    &mut || {
                        let out = generate(&inner, &prompts, &cfg_g, &[], &mut rng_from_seed(0))?;
                        debug_assert!(out.iter().all(|o| o.tokens.len() == work.new_tokens));
                        Ok(())
                    },
                )?;
            }
        }
        Ok(rows)
    }
}

fn main() -> Result<()> {
    infimed::alloc::reuse_freed_memory();
    let args = parse_args()?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("benches/shapes/{}.json", args.shape));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = Qwen25VlConfig::from_json(serde_json::from_str(&text)?)?;
    let mut work = workload(&args.shape)?;
    if let Some(sft) = args.sft {
        work.sft = sft;
    }
    let checkpointing = args.checkpointing;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let (shape, backend, precision, json_out) = (
        args.shape.clone(),
        args.backend,
        args.precision,
        args.json.clone(),
    );
    eprintln!("infimed: shape {shape}, backend {backend}, precision {precision}, {threads} threads, gradient checkpointing {checkpointing}");
    let rows = dispatch_autodiff(
        BackendArgs {
            backend,
            device: None,
            precision,
        },
        if checkpointing {
            infimed::backend::GradientCheckpointing::Balanced
        } else {
            infimed::backend::GradientCheckpointing::Off
        },
        Compare { cfg, work, args },
    )?;
    let out = json!({"system": "infimed", "shape": shape, "backend": backend.to_string(), "precision": precision.to_string(),
                     "threads": threads, "gradient_checkpointing": checkpointing, "rows": rows});
    match json_out {
        Some(p) => std::fs::write(&p, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{}", serde_json::to_string_pretty(&out)?),
    }
    Ok(())
}
