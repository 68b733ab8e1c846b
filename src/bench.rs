//! `infimed bench`: what this machine does, measured before a long job. Random weights of a
//! model shape (`small`, `3b` = `benches/shapes/NAME.json`, or an HF model folder), random
//! tokens, the learner's own code path, warm-up then timed repetitions; one JSON line out.
//!
//! - `bench sft`: one SFT optimizer step = forward, backward (with the recipe's gradient
//!   checkpointing and attention), global grad-norm clip and AdamW, over `batch x seq` tokens
//!   with labels on the second half of every sample (or, with `--packing`, rows of `seq` tokens
//!   holding 4 samples each). Reports tokens/s, seconds per step, the peak resident memory
//!   (CPU backends; the process's high-water mark) beside the model's own, the plan's estimate
//!   for the same configuration, and with `--peak-tflops` the model FLOPs utilisation.
//!
//! FLOPs of a step (the usual model-FLOPs count, recomputation not counted): `6 x tokens x`
//! the parameters of every matmul the tokens go through (decoder layers and the head; the
//! embedding lookup is not a matmul), plus attention `6 x 2 x b x heads x head_dim x` the
//! query-key pairs each layer computes (causal: `s (s + 1) / 2` per sequence; forward 2 matmuls
//! of 2 FLOPs per pair and dimension, backward twice that).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::backend::{
    check_precision, dispatch_autodiff, AutodiffJob, BackendArgs, GradientCheckpointing, Precision,
};
use crate::data::encode::Encoded;
use crate::learn::batch::{collate, collate_packed, MicroBatch};
use crate::learn::freeze::{apply_freeze, assign_stable_param_ids, FreezeConfig};
use crate::learn::optim::OptimizerConfig;
use crate::learn::parallel::Rank;
use crate::learn::run::Trainee;
use crate::model::{AttentionImpl, Qwen25VL, Qwen25VlConfig, Tiles, TrainBackend};
use crate::sft::plan::{memory_estimate, param_counts, ActivationShape};
use crate::sft::step::sft_step;

/// `infimed bench <what>`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// One SFT optimizer step (forward, backward, clip, AdamW) on random tokens.
    Sft(SftBenchArgs),
    /// Load an HF checkpoint (and optionally save it again): wall time and peak memory.
    Load(LoadBenchArgs),
    /// Generation with the rollout engine: prefill and decode throughput.
    Generate(GenerateBenchArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateBenchArgs {
    /// `small`, `3b` (benches/shapes/NAME.json) or an HF model folder (its config.json).
    #[arg(long, default_value = "small")]
    pub shape: String,
    /// Prompts (each decoded `--n` times; all rows decode together).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// New tokens per row (no stop token: every row makes exactly this many).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Samples per prompt (sharing the prompt's prefill and cache).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// 0: greedy; else sampled at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadBenchArgs {
    /// An HF model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Save the loaded model here too (bf16 safetensors, sharded at 5 GB like transformers).
    #[arg(long)]
    pub save_to: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SftBenchArgs {
    /// `small`, `3b` (benches/shapes/NAME.json) or an HF model folder (its config.json).
    #[arg(long, default_value = "small")]
    pub shape: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Rows of `seq` tokens holding 4 samples each (block-diagonal attention).
    #[arg(long)]
    pub packing: bool,
    /// off, balanced or layer.
    #[arg(long, default_value = "off")]
    pub gradient_checkpointing: GradientCheckpointing,
    /// flash (the memory-efficient attention) or reference (burn's, materialising the scores).
    #[arg(long, default_value = "flash")]
    pub attention: String,
    /// Timed steps (the median is reported) after `--warmup` untimed ones.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// The device's peak dense TFLOP/s in the compute precision, for the MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Train the vision tower and projector too (default: frozen, as the paper's SFT).
    #[arg(long)]
    pub train_vision: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Sft(a) => {
            let line = bench_sft(&a)?;
            println!("{}", serde_json::to_string(&line)?);
            Ok(())
        }
        BenchWhat::Generate(a) => {
            let line = crate::backend::dispatch(a.backend, GenerateBenchJob(a.clone()))?;
            println!("{}", serde_json::to_string(&line)?);
            Ok(())
        }
        BenchWhat::Load(a) => {
            let line = crate::backend::dispatch(a.backend, LoadBenchJob(a.clone()))?;
            println!("{}", serde_json::to_string(&line)?);
            Ok(())
        }
    }
}

struct GenerateBenchJob(GenerateBenchArgs);

impl crate::backend::BackendJob for GenerateBenchJob {
    type Output = Value;
    fn run<B: crate::model::ModelBackend>(self, device: B::Device) -> Result<Value> {
        use crate::engine::{generate_requests, EngineConfig, Request};
        use crate::generate::{Prompt, SamplingConfig};
        let a = self.0;
        let cfg = shape_config(&a.shape)?;
        check_precision::<B>(a.backend.precision, &device)?;
        B::seed(&device, 0);
        let model =
            crate::backend::compute_model(&Qwen25VL::<B>::init(&cfg, &device), a.backend.precision);
        let vocab = cfg.text.vocab_size;
        let requests: Vec<Request> = (0..a.batch)
            .map(|i| Request {
                prompt: Prompt {
                    input_ids: bench_ids(a.prompt_len, i, vocab),
                    ..Default::default()
                },
                n: a.n,
                seed: i as u64,
            })
            .collect();
        let rows = a.batch * a.n;
        let engine = EngineConfig::rows(rows);
        let sampling = |new: usize| SamplingConfig {
            temperature: a.temperature,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: new,
        };
        let time = |new: usize| -> Result<(f64, crate::engine::EngineStats)> {
            let t0 = Instant::now();
            let (_, stats) =
                generate_requests(&model, &requests, &sampling(new), &[], &engine, |_, _| {})?;
            B::sync(&device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok((t0.elapsed().as_secs_f64(), stats))
        };
        time(2)?; // warm-up
        reset_peak();
        let median = |mut v: Vec<f64>| {
            v.sort_by(|x, y| x.partial_cmp(y).unwrap());
            v[v.len() / 2]
        };
        let prefill: Vec<f64> = (0..a.repeat.max(1))
            .map(|_| time(1).map(|t| t.0))
            .collect::<Result<_>>()?;
        let full: Vec<(f64, crate::engine::EngineStats)> = (0..a.repeat.max(1))
            .map(|_| time(a.new_tokens))
            .collect::<Result<_>>()?;
        let (tp, tf) = (median(prefill), median(full.iter().map(|x| x.0).collect()));
        let stats = full[0].1;
        let decoded = rows * a.new_tokens.saturating_sub(1);
        let (_, peak) = rss_mib();
        Ok(json!({
            "bench": "generate", "shape": a.shape, "backend": a.backend.backend.to_string(), "precision": a.backend.precision.to_string(),
            "batch": a.batch, "n": a.n, "rows": rows, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "prefill_tokens_per_s": (a.batch * a.prompt_len) as f64 / tp,
            "new_tokens_per_s": decoded as f64 / (tf - tp).max(1e-9),
            "total_new_tokens_per_s": (rows * a.new_tokens) as f64 / tf,
            "seconds": tf, "peak_mib": peak,
            "prefix_cache_mib": stats.peak_prefix_bytes as f64 / (1 << 20) as f64, "own_cache_mib": stats.peak_own_bytes as f64 / (1 << 20) as f64,
        }))
    }
}

struct LoadBenchJob(LoadBenchArgs);

impl crate::backend::BackendJob for LoadBenchJob {
    type Output = Value;
    fn run<B: crate::model::ModelBackend>(self, device: B::Device) -> Result<Value> {
        let a = self.0;
        let baseline = rss_mib().0;
        reset_peak();
        let t0 = Instant::now();
        let model = Qwen25VL::<B>::load(&a.model, &device)?;
        B::sync(&device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let load_s = t0.elapsed().as_secs_f64();
        let (rss, peak) = rss_mib();
        let params = param_counts(&model.config).total();
        let weights_mib = (4 * params) as f64 / (1 << 20) as f64;
        let mut out = json!({
            "bench": "load", "model": a.model, "backend": a.backend.backend.to_string(), "params": params,
            "load_s": load_s, "weights_mib": weights_mib, "baseline_mib": baseline, "rss_mib": rss, "peak_mib": peak,
            "peak_over_weights": peak.zip(baseline).map(|(p, b)| (p - b) / weights_mib),
        });
        if let Some(dir) = &a.save_to {
            reset_peak();
            let t0 = Instant::now();
            model.save(dir, crate::model::SaveDtype::BF16, 5_000_000_000)?;
            let o = out.as_object_mut().expect("object");
            o.insert("save_s".into(), json!(t0.elapsed().as_secs_f64()));
            o.insert("save_peak_mib".into(), json!(rss_mib().1));
        }
        Ok(out)
    }
}

/// The config of a bench shape: `small` / `3b` from `benches/shapes/`, else an HF folder.
pub fn shape_config(shape: &str) -> Result<Qwen25VlConfig> {
    let candidates = [
        PathBuf::from("benches/shapes").join(format!("{shape}.json")),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/shapes")
            .join(format!("{shape}.json")),
    ];
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        return Qwen25VlConfig::from_json(
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?,
        );
    }
    let dir = Path::new(shape);
    if dir.join("config.json").exists() {
        return Qwen25VlConfig::from_dir(dir);
    }
    bail!("unknown shape `{shape}`: not small or 3b (benches/shapes/) and not a model folder with a config.json")
}

/// Deterministic token ids below `vocab - 16` (clear of the special ids at the top).
pub fn bench_ids(len: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % (vocab - 16)) as u32)
        .collect()
}

/// The bench's micro-batch: `batch` rows of `seq` tokens, labels on the second half of each
/// sample; packed rows hold 4 samples of `seq / 4` tokens.
pub fn sft_batch(vocab: usize, batch: usize, seq: usize, packing: bool) -> MicroBatch {
    let per_row = if packing { 4 } else { 1 };
    let len = seq / per_row;
    let samples: Vec<Vec<Encoded>> = (0..batch)
        .map(|r| {
            (0..per_row)
                .map(|k| {
                    let input_ids = bench_ids(len, r * per_row + k, vocab);
                    let labels = input_ids
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| (i >= len / 2).then_some(x))
                        .collect();
                    Encoded {
                        input_ids,
                        labels,
                        ..Default::default()
                    }
                })
                .collect()
        })
        .collect();
    let rows: Vec<Vec<&Encoded>> = samples.iter().map(|r| r.iter().collect()).collect();
    if packing {
        collate_packed(&rows, 0)
    } else {
        collate(&rows.into_iter().flatten().collect::<Vec<_>>(), 0)
    }
}

/// The SFT learner's own step ([`sft_step`]) on one batch, over and over: random weights of a
/// shape (seeded), lr 1e-5, the gradient norm clipped at 1.0, one rank.
pub struct SftStepper<B: TrainBackend> {
    pub trainee: Trainee<B>,
    pub batch: MicroBatch,
    device: B::Device,
}

impl<B: TrainBackend> SftStepper<B> {
    pub fn new(
        cfg: &Qwen25VlConfig,
        freeze: &FreezeConfig,
        batch: MicroBatch,
        precision: Precision,
        checkpointing: GradientCheckpointing,
        attention: AttentionImpl,
        device: &B::Device,
    ) -> Self {
        B::seed(device, 0);
        let model = apply_freeze(
            assign_stable_param_ids(Qwen25VL::<B>::init(cfg, device).with_attention(attention)),
            freeze,
        );
        let trainee = Trainee::new(
            model,
            &OptimizerConfig::with_lr(1e-5),
            precision,
            checkpointing,
        );
        Self {
            trainee,
            batch,
            device: device.clone(),
        }
    }

    /// One optimizer step; the loss.
    pub fn step(&mut self) -> Result<f64> {
        let batch = std::slice::from_ref(&self.batch);
        let out = sft_step(
            &mut self.trainee,
            batch,
            1e-5,
            &Rank::single(),
            &self.device,
        )?;
        Ok(out.loss)
    }
}

/// Resident-set size and its high-water mark in MiB (Linux `/proc/self/status`).
pub fn rss_mib() -> (Option<f64>, Option<f64>) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| -> Option<f64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Reset the resident-set high-water mark (Linux).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Model FLOPs of one SFT step (see the module docs).
pub fn sft_step_flops(cfg: &Qwen25VlConfig, batch: &MicroBatch) -> f64 {
    let t = &cfg.text;
    let p = param_counts(cfg);
    let matmul_params = p.decoder_layers as f64 + (t.vocab_size * t.hidden_size) as f64;
    let tokens = batch.input.real_tokens() as f64;
    // Query-key pairs per layer: causal, within each sample.
    let pairs: f64 = batch
        .input
        .segment_ids()
        .iter()
        .map(|row| {
            let mut n = std::collections::BTreeMap::<i32, f64>::new();
            for &s in row.iter().filter(|&&s| s >= 0) {
                *n.entry(s).or_default() += 1.0;
            }
            n.values().map(|l| l * (l + 1.0) / 2.0).sum::<f64>()
        })
        .sum();
    let attn = 6.0
        * 2.0
        * (t.num_attention_heads * t.head_dim) as f64
        * pairs
        * t.num_hidden_layers as f64;
    6.0 * matmul_params * tokens + attn
}

struct SftBenchJob(SftBenchArgs, Qwen25VlConfig);

impl AutodiffJob for SftBenchJob {
    type Output = Value;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Value> {
        let SftBenchJob(a, cfg) = self;
        check_precision::<B>(a.backend.precision, &device)?;
        let attention = match a.attention.as_str() {
            "flash" => AttentionImpl::default(),
            "reference" => AttentionImpl::Reference,
            other => bail!("--attention must be flash or reference, got {other}"),
        };
        let freeze = FreezeConfig {
            vision_tower: !a.train_vision,
            projector: !a.train_vision,
            language_model: false,
        };
        let baseline = rss_mib().0;
        let batch = sft_batch(cfg.text.vocab_size, a.batch, a.seq, a.packing);
        let flops = sft_step_flops(&cfg, &batch);
        let tokens = batch.input.real_tokens();
        let mut stepper = SftStepper::<B>::new(
            &cfg,
            &freeze,
            batch,
            a.backend.precision,
            a.gradient_checkpointing,
            attention,
            &device,
        );
        let sync = |d: &B::Device| B::sync(d).map_err(|e| anyhow::anyhow!("{e:?}"));
        sync(&device)?;
        let model_rss = rss_mib().0;
        let params = param_counts(&cfg);
        let trainable = params.trainable(&freeze).total();
        // AdamW's moments appear at the first step: counted, not measured.
        let optimizer_mib = (8 * trainable) as f64 / (1 << 20) as f64;
        reset_peak();
        let mut loss = f64::NAN;
        for _ in 0..a.warmup {
            loss = stepper.step()?;
        }
        sync(&device)?;
        let mut secs = vec![];
        for _ in 0..a.steps.max(1) {
            let t0 = Instant::now();
            loss = stepper.step()?;
            sync(&device)?;
            secs.push(t0.elapsed().as_secs_f64());
        }
        secs.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let step_s = secs[secs.len() / 2];
        let (_, peak) = rss_mib();
        let cpu = matches!(
            a.backend.backend,
            crate::backend::BackendKind::Ndarray | crate::backend::BackendKind::Flex
        );
        let shape = ActivationShape {
            batch: a.batch,
            seq: a.seq,
            max_pixels: 0,
            precision: a.backend.precision,
            checkpointing: a.gradient_checkpointing,
            tiles: Tiles::default(),
        };
        let estimate = memory_estimate(&cfg, &freeze, 1, &shape);
        let mut out = json!({
            "bench": "sft", "shape": a.shape, "backend": a.backend.backend.to_string(), "precision": a.backend.precision.to_string(),
            "batch": a.batch, "seq": a.seq, "packing": a.packing, "gradient_checkpointing": a.gradient_checkpointing.to_string(),
            "attention": a.attention, "tokens": tokens, "tokens_per_s": tokens as f64 / step_s, "step_s": step_s, "loss": loss,
            "flops_per_step": flops, "trainable_params": trainable,
            "estimate_mib": estimate.total() as f64 / (1 << 20) as f64,
        });
        if cpu {
            let o = out.as_object_mut().expect("object");
            o.insert("baseline_mib".into(), json!(baseline));
            o.insert(
                "model_mib".into(),
                json!(model_rss.zip(baseline).map(|(m, b)| m - b)),
            );
            o.insert("optimizer_mib".into(), json!(optimizer_mib));
            o.insert("peak_mib".into(), json!(peak));
            // What the step adds on top of the process, the model and AdamW's moments.
            o.insert(
                "activation_mib".into(),
                json!(peak.zip(model_rss).map(|(p, m)| p - m - optimizer_mib)),
            );
        }
        if let Some(tf) = a.peak_tflops {
            out.as_object_mut()
                .expect("object")
                .insert("mfu".into(), json!(flops / step_s / (tf * 1e12)));
        }
        Ok(out)
    }
}

/// `infimed bench sft` (also what `benches/compare.rs` runs for its SFT row).
pub fn bench_sft(a: &SftBenchArgs) -> Result<Value> {
    let cfg = shape_config(&a.shape)?;
    let mode = a.gradient_checkpointing;
    dispatch_autodiff(a.backend, mode, SftBenchJob(a.clone(), cfg))
}
