//! The SFT learner (`infimed sft --recipe R`), as LLaMA-Factory trains Qwen2.5-VL:
//! labels on assistant turns (`content<|im_end|>\n`), image-safe truncation, length-grouped
//! batches in a seeded order, AdamW with the recipe's values, HF's cosine schedule, global
//! gradient-norm clipping, gradient accumulation whose loss is the mean over all target tokens
//! of the effective batch, atomic checkpoints with exact resume, HF export.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::backend::{check_precision, compute_model, dispatch_autodiff, AutodiffJob, BackendArgs};
use crate::data::encode::{truncate, Encoded, TrainOn};
use crate::data::sharegpt::{read_sharegpt_with_media_dir, Conversation};
use crate::data::template::ChatMessage;
use crate::generate::{generate, rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::model::nn::int1;
use crate::model::{copy_aux_files, ModelInput, Qwen25VL, Qwen25VlConfig, SaveDtype};
use crate::plan::{build_plan, mixed_order, SftPlan};
use crate::recipe::{ModelSource, SftRecipe};
use crate::schedule::lr_at;
use crate::train::{
    adamw, apply_freeze, assign_stable_param_ids, check_finite, clip_grad_norm, count_params, latest_checkpoint,
    load_checkpoint, plot_metrics, save_checkpoint, MetricsLog, TrainState,
};

/// Directory of the bundled model assets (`builtin:NAME` -> `assets/NAME`).
pub fn builtin_dir(name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("assets").join(name),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("config.json").exists())
        .with_context(|| format!("unknown builtin model `builtin:{name}` (no assets/{name}/config.json)"))
}

/// Where the model's config, tokenizer and processor files live.
pub fn model_files_dir(model: &str) -> Result<PathBuf> {
    match ModelSource::parse(model) {
        ModelSource::Builtin(name) => builtin_dir(&name),
        ModelSource::Dir(d) => {
            if !d.join("config.json").exists() {
                bail!("model directory {} has no config.json", d.display());
            }
            Ok(d)
        }
    }
}

/// Load (or, for `builtin:`, seed-initialise) the model the recipe names.
pub fn load_model<B: Backend>(model: &str, seed: u64, device: &B::Device) -> Result<Qwen25VL<B>> {
    match ModelSource::parse(model) {
        ModelSource::Builtin(name) => {
            let dir = builtin_dir(&name)?;
            let cfg = Qwen25VlConfig::from_dir(&dir)?;
            B::seed(device, seed);
            Ok(Qwen25VL::init(&cfg, device))
        }
        ModelSource::Dir(d) => Qwen25VL::load(&d, device).with_context(|| format!("loading model {}", d.display())),
    }
}

/// One encoded training sample and where it came from.
#[derive(Debug, Clone)]
pub struct Sample {
    pub source: usize,
    pub record: usize,
    pub encoded: Encoded,
}

/// Skipped records, by reason.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SkipReport {
    pub invalid: usize,
    pub too_long_vision: usize,
    pub examples: Vec<String>,
}

impl SkipReport {
    fn note(&mut self, what: String) {
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }
}

/// Encode every record of every source (errors name FILE:LINE; with `skip_invalid` they are
/// counted instead). `None` marks a skipped record.
pub fn encode_sources(
    processor: &Processor,
    sources: &[Vec<Conversation>],
    train_on: TrainOn,
    cutoff_len: usize,
    skip_invalid: bool,
    skips: &mut SkipReport,
) -> Result<Vec<Vec<Option<Encoded>>>> {
    let mut out = Vec::with_capacity(sources.len());
    for convs in sources {
        let mut enc = Vec::with_capacity(convs.len());
        for conv in convs {
            let e = match processor.encode(conv, train_on) {
                Ok(e) => e,
                Err(err) if skip_invalid => {
                    skips.invalid += 1;
                    skips.note(format!("{err:#}"));
                    enc.push(None);
                    continue;
                }
                Err(err) => return Err(err),
            };
            match truncate(e, cutoff_len, processor.tokenizer.special())? {
                Some(e) => enc.push(Some(e)),
                None => {
                    skips.too_long_vision += 1;
                    skips.note(format!("{}: image tokens alone exceed cutoff_len {cutoff_len} (or no label left)", conv.origin));
                    enc.push(None);
                }
            }
        }
        out.push(enc);
    }
    Ok(out)
}

/// Batches of one epoch: the seeded mixed order (skipped samples left out) cut into batches.
/// With `group_by_length` (HF's `group_by_length`, off by default as in HF and LLaMA-Factory) the
/// order is first split into mega-batches of 50 batches, each sorted by length (longest first) as
/// HF's length-grouped sampler does: less padding, but consecutive batches then hold samples of
/// similar length, which on data where length reveals the task (the demo) means one task per step.
pub fn epoch_batches(
    order: &[(usize, usize)],
    lengths: &dyn Fn(usize, usize) -> Option<usize>,
    batch: usize,
    group_by_length: bool,
) -> Vec<Vec<(usize, usize)>> {
    let valid: Vec<(usize, usize, usize)> =
        order.iter().filter_map(|&(s, r)| lengths(s, r).map(|l| (s, r, l))).collect();
    let mut batches = vec![];
    if !group_by_length {
        return valid.chunks(batch).map(|b| b.iter().map(|&(s, r, _)| (s, r)).collect()).collect();
    }
    for mega in valid.chunks(batch * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by(|a, b| b.2.cmp(&a.2)); // stable: ties keep the seeded order
        for b in mega.chunks(batch) {
            batches.push(b.iter().map(|&(s, r, _)| (s, r)).collect());
        }
    }
    batches
}

/// A right-padded micro-batch.
pub struct MicroBatch {
    pub input: ModelInput,
    pub labels: Vec<Vec<Option<u32>>>,
    pub target_tokens: usize,
    pub samples: usize,
}

pub fn collate(samples: &[&Encoded], pad_id: u32) -> MicroBatch {
    let t = samples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut input = ModelInput { attention_mask: Some(vec![]), ..Default::default() };
    let mut labels = vec![];
    let mut target_tokens = 0;
    for e in samples {
        let pad = t - e.input_ids.len();
        let mut ids = e.input_ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut mask = vec![true; e.input_ids.len()];
        mask.extend(std::iter::repeat_n(false, pad));
        let mut l = e.labels.clone();
        l.extend(std::iter::repeat_n(None, pad));
        target_tokens += e.labels.iter().skip(1).filter(|x| x.is_some()).count();
        input.input_ids.push(ids);
        input.attention_mask.as_mut().unwrap().push(mask);
        input.pixel_values.extend_from_slice(&e.pixel_values);
        input.image_grids.extend_from_slice(&e.image_grids);
        labels.push(l);
    }
    MicroBatch { input, labels, target_tokens, samples: samples.len() }
}

/// Logits `[targets, vocab]` at the positions before the batch's target tokens (computed only
/// there), with the target ids, in batch order (row by row, left to right).
pub fn target_logits<B: Backend>(model: &Qwen25VL<B>, batch: &MicroBatch) -> Result<(Tensor<B, 2>, Vec<u32>)> {
    let device = model.devices().into_iter().next().context("model has no parameters")?;
    let mut rows = vec![];
    let mut targets = vec![];
    let t = batch.input.seq_len();
    for (bi, l) in batch.labels.iter().enumerate() {
        for (j, tok) in l.iter().enumerate() {
            if let (Some(tok), true) = (tok, j > 0) {
                rows.push(bi * t + j - 1);
                targets.push(*tok);
            }
        }
    }
    if rows.is_empty() {
        let v = model.config.text.vocab_size;
        return Ok((Tensor::zeros([0, v], &device), targets));
    }
    let hidden = model.forward_hidden(&batch.input, None)?;
    let [b, t, c] = hidden.dims();
    let h = hidden.reshape([b * t, c]).select(0, int1::<B>(&rows, &device));
    Ok((model.logits(h), targets))
}

/// `log_softmax(logits / temperature)` at the target ids: `[targets]`.
pub fn gather_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: &[u32], temperature: f64) -> Tensor<B, 1> {
    let n = targets.len();
    let device = logits.device();
    if n == 0 {
        return Tensor::zeros([0], &device);
    }
    // The log-softmax in f32 whatever the compute dtype (a bf16 head's logits are upcast).
    let logits = crate::model::nn::upcast(logits);
    let logits = if temperature == 1.0 { logits } else { logits.div_scalar(temperature) };
    let logp = log_softmax(logits, 1);
    let ids: Vec<i64> = targets.iter().map(|&x| x as i64).collect();
    let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, 1]), &device);
    logp.gather(1, tgt).reshape([n])
}

/// Log-probs of the batch's target tokens (each from the logits at the position before it;
/// logits are computed only at those positions), with the target ids, in batch order.
pub fn target_logprobs<B: Backend>(model: &Qwen25VL<B>, batch: &MicroBatch) -> Result<(Tensor<B, 1>, Vec<u32>)> {
    let (logits, targets) = target_logits(model, batch)?;
    Ok((gather_logprobs(logits, &targets, 1.0), targets))
}

/// Sum over the batch's target tokens of `-log p(token)`.
pub fn token_nll_sum<B: Backend>(model: &Qwen25VL<B>, batch: &MicroBatch) -> Result<Tensor<B, 1>> {
    let (logp, targets) = target_logprobs(model, batch)?;
    if targets.is_empty() {
        let device = model.devices().into_iter().next().context("model has no parameters")?;
        return Ok(Tensor::zeros([1], &device));
    }
    Ok(logp.sum().neg())
}

#[derive(clap::Args, Debug, Clone)]
pub struct SftArgs {
    /// TOML recipe (see recipes/).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override any recipe field: `--set optimizer.lr=1e-5 --set data.0.samples=20000`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the plan (samples, steps, parameters, memory) and exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue from the newest complete checkpoint in output_dir.
    #[arg(long)]
    pub resume: bool,
}

/// What a run reports at its end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SftSummary {
    pub steps: usize,
    pub final_loss: f64,
    pub output_dir: PathBuf,
    pub skips: SkipReport,
    pub eval_before: Option<EvalResult>,
    pub eval_after: Option<EvalResult>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub exact_match: f64,
    pub n: usize,
}

pub fn run(args: SftArgs) -> Result<()> {
    let recipe = SftRecipe::from_file(&args.recipe, &args.set)?;
    let files = model_files_dir(&recipe.model)?;
    let cfg = Qwen25VlConfig::from_dir(&files)?;
    let available = crate::plan::count_available(&recipe.data)?;
    let plan = build_plan(&recipe, &cfg, &available)?;
    if args.dry_run {
        println!("{plan}");
        return Ok(());
    }
    let backend = BackendArgs { backend: recipe.backend, device: recipe.device, precision: recipe.precision };
    let summary = dispatch_autodiff(backend, recipe.gradient_checkpointing, SftJob { recipe, plan, resume: args.resume })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub struct SftJob {
    pub recipe: SftRecipe,
    pub plan: SftPlan,
    pub resume: bool,
}

impl AutodiffJob for SftJob {
    type Output = SftSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<SftSummary> {
        train_sft::<B>(&self.recipe, &self.plan, self.resume, &device)
    }
}

fn read_sources(sources: &[crate::recipe::DataSource]) -> Result<Vec<Vec<Conversation>>> {
    sources
        .iter()
        .map(|s| read_sharegpt_with_media_dir(&s.path, s.media_dir.as_deref()))
        .collect()
}

pub fn train_sft<B: AutodiffBackend>(recipe: &SftRecipe, plan: &SftPlan, resume: bool, device: &B::Device) -> Result<SftSummary> {
    let files = model_files_dir(&recipe.model)?;
    check_precision::<B>(recipe.precision, device)?;
    let processor = Processor::from_dir(&files, recipe.max_pixels)?;
    let train_on = match recipe.train_on {
        crate::recipe::TrainOn::AllAssistant => TrainOn::AllAssistant,
        crate::recipe::TrainOn::LastAssistant => TrainOn::LastAssistant,
    };
    let out_dir = recipe.output_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(out_dir.join("recipe.toml"), recipe.to_toml_string()?)
        .with_context(|| format!("writing {}", out_dir.join("recipe.toml").display()))?;

    // Data: read, encode (labels, truncation), report skips.
    let sources = read_sources(&recipe.data)?;
    let mut skips = SkipReport::default();
    let encoded = encode_sources(&processor, &sources, train_on, recipe.cutoff_len, recipe.skip_invalid, &mut skips)?;
    if skips.invalid + skips.too_long_vision > 0 {
        eprintln!(
            "skipped {} invalid and {} over-long records (vision tokens alone over cutoff_len); e.g. {:?}",
            skips.invalid, skips.too_long_vision, skips.examples
        );
    }
    let eval_convs: Vec<Conversation> = read_sources(&recipe.eval_data)?.into_iter().flatten().collect();
    let available: Vec<usize> = sources.iter().map(Vec::len).collect();
    let counts = crate::plan::mix_counts(&recipe.data, &available)?;
    let pad_id = processor.tokenizer.special().pad();

    // Model, freezing, optimizer, resume.
    let resume_from = if resume { latest_checkpoint(&out_dir)? } else { None };
    let model: Qwen25VL<B> = match &resume_from {
        Some(ck) => Qwen25VL::load(&ck.join("hf"), device)?,
        None => load_model(&recipe.model, recipe.seed, device)?,
    };
    let mut model = apply_freeze(assign_stable_param_ids(model), &recipe.freeze);
    let (trainable, frozen) = count_params(&model);
    let mut optim = adamw(&recipe.optimizer).init::<B, Qwen25VL<B>>();
    let mut state = TrainState { seed: recipe.seed, ..Default::default() };
    if let Some(ck) = &resume_from {
        let (o, s) = load_checkpoint::<B>(ck, optim, device)?;
        optim = o;
        state = s;
        eprintln!("resuming from {} (step {})", ck.display(), state.step);
    }
    let total_steps = plan.total_steps;
    eprintln!(
        "sft: {} samples/epoch, {} optimizer steps, {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
        plan.total_samples,
        total_steps,
        B::name(device),
        recipe.precision,
        if recipe.gradient_checkpointing { "on" } else { "off" }
    );

    let mut metrics = MetricsLog::open(&out_dir.join("metrics.jsonl"), resume_from.as_ref().map(|_| state.step))?;
    let eval_before = if !eval_convs.is_empty() && state.step == 0 {
        let r = evaluate(&compute_model(&model.valid(), recipe.precision), &processor, &eval_convs, train_on, &files)?;
        eprintln!("eval before training: loss {:.4}, exact match {:.1}% of {}", r.loss, r.exact_match * 100.0, r.n);
        metrics.write(&json!({"step": 0, "eval_loss": r.loss, "eval_exact_match": r.exact_match}))?;
        Some(r)
    } else {
        None
    };

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}").expect("progress template"),
    );
    bar.set_position(state.step as u64);
    let lengths = |s: usize, r: usize| encoded[s][r].as_ref().map(|e| e.input_ids.len());
    let mut batches = epoch_batches(&mixed_order(&counts, &available, recipe.seed, state.epoch), &lengths, recipe.per_device_batch, recipe.group_by_length);
    let mut last_loss = f64::NAN;
    let t_start = Instant::now();
    let mut tokens_since = 0usize;
    while state.step < total_steps {
        if state.batch_in_epoch >= batches.len() {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            batches = epoch_batches(&mixed_order(&counts, &available, recipe.seed, state.epoch), &lengths, recipe.per_device_batch, recipe.group_by_length);
            if batches.is_empty() {
                bail!("no trainable sample left after skipping");
            }
            continue;
        }
        let lr = lr_at(&recipe.schedule, recipe.optimizer.lr, state.step, total_steps);
        let end = (state.batch_in_epoch + recipe.grad_accum).min(batches.len());
        let micro: Vec<MicroBatch> = batches[state.batch_in_epoch..end]
            .iter()
            .map(|b| {
                let refs: Vec<&Encoded> = b.iter().map(|&(s, r)| encoded[s][r].as_ref().expect("valid sample")).collect();
                collate(&refs, pad_id)
            })
            .collect();
        let denom: usize = micro.iter().map(|m| m.target_tokens).sum::<usize>().max(1);
        let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();
        let mut loss_sum = 0.0;
        let t0 = Instant::now();
        for (k, mb) in micro.iter().enumerate() {
            // f32: the parameters themselves; bf16: a recorded bf16 cast of them (f32 master
            // weights: the gradients come back in f32 to `model`'s parameters).
            let compute = compute_model(&model, recipe.precision);
            let loss = token_nll_sum(&compute, mb)?.div_scalar(denom as f64);
            let value: f64 = loss.clone().into_scalar().elem::<f64>();
            check_finite(value, state.step, &format!("epoch {}, batch {}", state.epoch, state.batch_in_epoch + k))?;
            loss_sum += value;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            acc.accumulate(&model, grads);
        }
        let mut grads = acc.grads();
        let grad_norm = clip_grad_norm(&model, &mut grads, recipe.optimizer.max_grad_norm);
        model = optim.step(lr, model, grads);
        let samples: usize = micro.iter().map(|m| m.samples).sum();
        let tokens: usize = micro.iter().map(|m| m.input.input_ids.iter().map(Vec::len).sum::<usize>()).sum();
        state.step += 1;
        state.batch_in_epoch = end;
        state.samples_seen += samples;
        state.tokens_seen += tokens;
        tokens_since += tokens;
        last_loss = loss_sum;
        let dt = t0.elapsed().as_secs_f64();
        let epoch_f = state.epoch as f64 + state.batch_in_epoch as f64 / batches.len().max(1) as f64;
        if state.step % recipe.log_every.max(1) == 0 || state.step == total_steps {
            metrics.write(&json!({
                "step": state.step, "epoch": epoch_f, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                "tokens": state.tokens_seen, "target_tokens": denom, "samples_per_s": samples as f64 / dt,
                "tokens_per_s": tokens as f64 / dt,
            }))?;
        }
        let tps = tokens_since as f64 / t_start.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));
        bar.inc(1);
        if recipe.eval_every > 0 && state.step % recipe.eval_every == 0 && !eval_convs.is_empty() && state.step < total_steps {
            let r = evaluate(&compute_model(&model.valid(), recipe.precision), &processor, &eval_convs, train_on, &files)?;
            bar.println(format!("step {}: eval loss {:.4}, exact match {:.1}%", state.step, r.loss, r.exact_match * 100.0));
            metrics.write(&json!({"step": state.step, "eval_loss": r.loss, "eval_exact_match": r.exact_match}))?;
        }
        if recipe.save_every > 0 && state.step % recipe.save_every == 0 && state.step < total_steps {
            save_checkpoint(&out_dir, &model, &optim, &state, &files)?;
        }
    }
    bar.finish_and_clear();

    // Final: checkpoint (for resume), HF export at output_dir, evaluation, plots.
    save_checkpoint(&out_dir, &model, &optim, &state, &files)?;
    let inner = model.valid();
    let export_dtype = match recipe.precision {
        crate::recipe::Precision::Bf16 => SaveDtype::BF16,
        _ => SaveDtype::F32,
    };
    inner.save(&out_dir, export_dtype, 4 << 30)?;
    copy_aux_files(&files, &out_dir)?;
    let eval_after = if !eval_convs.is_empty() {
        let r = evaluate(&compute_model(&inner, recipe.precision), &processor, &eval_convs, train_on, &files)?;
        eprintln!("eval after training: loss {:.4}, exact match {:.1}% of {}", r.loss, r.exact_match * 100.0, r.n);
        metrics.write(&json!({"step": state.step, "eval_loss": r.loss, "eval_exact_match": r.exact_match}))?;
        Some(r)
    } else {
        None
    };
    plot_metrics(metrics.path(), &["loss", "lr", "grad_norm", "eval_exact_match"], &out_dir)?;
    Ok(SftSummary { steps: state.step, final_loss: last_loss, output_dir: out_dir, skips, eval_before, eval_after })
}

/// Validation loss (mean over target tokens) and exact-match accuracy of greedy answers to the
/// last assistant turn (trimmed text equality).
pub fn evaluate<B: Backend>(
    model: &Qwen25VL<B>,
    processor: &Processor,
    convs: &[Conversation],
    train_on: TrainOn,
    model_dir: &Path,
) -> Result<EvalResult> {
    let pad_id = processor.tokenizer.special().pad();
    let stop = stop_tokens(model_dir, &model.config.tokens.eos_token_ids)?;
    let (mut nll, mut tokens, mut correct) = (0.0f64, 0usize, 0usize);
    for chunk in convs.chunks(16) {
        let enc: Vec<Encoded> = chunk.iter().map(|c| processor.encode(c, train_on)).collect::<Result<_>>()?;
        let refs: Vec<&Encoded> = enc.iter().collect();
        let mb = collate(&refs, pad_id);
        nll += token_nll_sum(model, &mb)?.into_scalar().elem::<f64>();
        tokens += mb.target_tokens;
        let mut prompts = vec![];
        let mut answers = vec![];
        for c in chunk {
            let last = c.last_assistant().context("a validation record needs an assistant turn")?;
            let msgs: Vec<ChatMessage> = c.messages[..last].to_vec();
            let n_img: usize = msgs.iter().map(ChatMessage::num_images).sum();
            let p = processor.encode_prompt(&msgs, &c.images[..n_img])?;
            prompts.push(Prompt { input_ids: p.input_ids, pixel_values: p.pixel_values, image_grids: p.image_grids });
            answers.push(c.messages[last].text_content().trim().to_string());
        }
        let max_new = answers.iter().map(|a| processor.tokenizer.encode(a).map(|t| t.len()).unwrap_or(8)).max().unwrap_or(8) + 4;
        let outs = generate(model, &prompts, &SamplingConfig::greedy(max_new), &stop, &mut rng_from_seed(0))?;
        for (o, a) in outs.iter().zip(&answers) {
            let text = processor.tokenizer.decode(&o.tokens, true)?;
            if text.trim() == a {
                correct += 1;
            }
        }
    }
    Ok(EvalResult { loss: nll / tokens.max(1) as f64, exact_match: correct as f64 / convs.len().max(1) as f64, n: convs.len() })
}
