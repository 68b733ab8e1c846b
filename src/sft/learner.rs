//! The SFT learner (`infimed sft --recipe R`), as LLaMA-Factory trains Qwen2.5-VL: labels on
//! assistant turns (`content<|im_end|>\n`), image-safe truncation, batches in a seeded mixed
//! order, AdamW with the recipe's values, HF's cosine schedule, global gradient-norm clipping,
//! gradient accumulation whose loss is the mean over all target tokens of the effective batch,
//! atomic checkpoints with exact resume, HF export.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use serde_json::json;

use crate::backend::{check_precision, compute_model, dispatch_autodiff, AutodiffJob, BackendArgs};
use crate::data::encode::{Encoded, TrainOn};
use crate::data::sharegpt::Conversation;
use crate::data::template::ChatMessage;
use crate::engine::generate;
use crate::generate::{rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::learn::batch::collate;
use crate::learn::logprobs::{token_nll_sum, token_nll_sum_of};
use crate::learn::metrics::{plot_metrics, MetricsLog};
use crate::learn::parallel::{run_ranks, Rank};
use crate::learn::run::{
    accumulate_gradients, prepare_output_dir, progress_bar, Trainee, TraineeSpec,
};
use crate::learn::schedule::lr_at;
use crate::model::{ModelBackend, TrainBackend};
use crate::model::{ModelInput, Qwen25VL, Qwen25VlConfig};
use crate::models::model_files_dir;
use crate::sft::data::{read_sources, source_lengths};
use crate::sft::data::{Loader, ScheduledStep, SftData, SkipReport};
use crate::sft::plan::{build_plan_with_lengths, count_available, run_end, SftPlan};
use crate::sft::recipe::SftRecipe;

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
    if args.dry_run {
        let plan = dry_run_plan(&recipe)?;
        println!("{plan}");
        return Ok(());
    }
    let backend = BackendArgs {
        backend: recipe.backend,
        device: recipe.device,
        precision: recipe.precision,
    };
    let summary = dispatch_autodiff(
        backend,
        recipe.gradient_checkpointing,
        SftJob {
            recipe,
            resume: args.resume,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// The plan `--dry-run` prints: from the records' lengths (cached next to the data files) when
/// the files can be read, else from their record counts.
pub fn dry_run_plan(recipe: &SftRecipe) -> Result<SftPlan> {
    let files = model_files_dir(&recipe.model)?;
    let cfg = Qwen25VlConfig::from_dir(&files)?;
    let available = count_available(&recipe.data)?;
    let processor = Processor::from_dir(&files, recipe.max_pixels)?;
    let t0 = Instant::now();
    let sources = read_sources(&recipe.data)?;
    let (lengths, skips) = source_lengths(recipe, &processor, &sources, false)?;
    eprintln!(
        "dry run: {} records read and their lengths known in {:.1} s ({} skipped)",
        available.iter().sum::<usize>(),
        t0.elapsed().as_secs_f64(),
        skips.invalid + skips.too_long_vision
    );
    build_plan_with_lengths(recipe, &cfg, &available, Some(&lengths))
}

pub struct SftJob {
    pub recipe: SftRecipe,
    pub resume: bool,
}

impl AutodiffJob for SftJob {
    type Output = SftSummary;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<SftSummary> {
        train_sft::<B>(&self.recipe, self.resume, &device)
    }
}

pub fn train_sft<B: TrainBackend>(
    recipe: &SftRecipe,
    resume: bool,
    device: &B::Device,
) -> Result<SftSummary> {
    let files = model_files_dir(&recipe.model)?;
    check_precision::<B>(recipe.precision, device)?;
    let processor = Processor::from_dir(&files, recipe.max_pixels)?;
    prepare_output_dir(&recipe.output_dir, &recipe.to_toml_string()?)?;

    // Data: every source read and its lengths known (cached; skips reported); the plan.
    let data = Arc::new(SftData::load(recipe, &processor)?);
    let processor = Arc::new(processor);
    let plan = build_plan_with_lengths(
        recipe,
        &Qwen25VlConfig::from_dir(&files)?,
        &data.available,
        Some(&data.lengths),
    )?;
    if let Some(p) = &plan.padding {
        eprintln!(
            "sft: padding {:.1}% of token slots{} ({:.1}% with one sample per row, {:.1}% packed)",
            100.0
                * if recipe.packing {
                    p.packed_padding
                } else {
                    p.padding
                },
            if recipe.packing { " with packing" } else { "" },
            100.0 * p.padding,
            100.0 * p.packed_padding
        );
    }

    // One learner per rank (a thread per device of this node), all taking the same steps.
    let run = SftRun {
        recipe,
        files,
        processor,
        data,
    };
    let mut summaries = run_ranks::<B::InnerBackend, _, _>(
        &recipe.parallel,
        recipe.backend,
        device,
        |rank, device| sft_rank::<B>(&run, resume, &rank, &device),
    )?;
    Ok(summaries.swap_remove(0))
}

/// What the ranks of an SFT run share.
struct SftRun<'a> {
    recipe: &'a SftRecipe,
    files: PathBuf,
    processor: Arc<Processor>,
    data: Arc<SftData>,
}

/// The SFT loop of one rank. Every rank takes every optimizer step on its shard of the step's
/// samples; rank 0 alone logs, validates, checkpoints and exports.
fn sft_rank<B: TrainBackend>(
    run: &SftRun,
    resume: bool,
    rank: &Rank,
    device: &B::Device,
) -> Result<SftSummary> {
    let SftRun {
        recipe,
        files,
        processor,
        data,
    } = run;
    let out_dir = &recipe.output_dir;
    let main = rank.is_main();

    // Model (fresh or resumed), freezing, optimizer.
    let spec = TraineeSpec {
        model: &recipe.model,
        seed: recipe.seed,
        freeze: &recipe.freeze,
        optimizer: &recipe.optimizer,
        out_dir,
        resume,
    };
    let mut run = Trainee::<B>::start(&spec, device)?;
    run.sync_weights(rank)?;

    // The remaining optimizer steps: from where the run stands to where a run of this world
    // size ends (a run resumed on another number of ranks continues the same sample order).
    let rows_per_epoch = data.epoch_rows(recipe, 0).len();
    let position = (
        run.state.epoch,
        run.state
            .rows_in_epoch
            .unwrap_or(run.state.batch_in_epoch * recipe.per_device_batch),
    );
    let schedule = data.schedule_until(
        recipe,
        position,
        Some(run_end(recipe, rows_per_epoch)),
        usize::MAX,
    )?;
    let total_steps = run.state.step + schedule.len();
    let shards: Arc<Vec<ScheduledStep>> = Arc::new(
        schedule
            .iter()
            .map(|s| s.shard(rank.rank, recipe.per_device_batch))
            .collect(),
    );
    if main {
        let (trainable, frozen) = crate::learn::freeze::count_params(run.model());
        eprintln!(
            "sft: {} rows/epoch, {} optimizer steps on {} rank(s) x {} rows x {} micro-batches, {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
            rows_per_epoch,
            total_steps,
            rank.world,
            recipe.per_device_batch,
            recipe.grad_accum,
            B::name(device),
            recipe.precision,
            recipe.gradient_checkpointing
        );
        if run.resumed_from.is_some() && run.state.world_size != rank.world {
            eprintln!(
                "sft: the run was on {} rank(s), continues on {}: {} steps left",
                run.state.world_size,
                rank.world,
                schedule.len()
            );
        }
    }
    let mut metrics = match main {
        true => Some(MetricsLog::open(
            &out_dir.join("metrics.jsonl"),
            run.resumed_from.as_ref().map(|_| run.state.step),
        )?),
        false => None,
    };
    let mut sample_log = match main && recipe.log_samples {
        true => Some(MetricsLog::open(
            &out_dir.join("samples.jsonl"),
            run.resumed_from.as_ref().map(|_| run.state.step),
        )?),
        false => None,
    };
    let validate = |model: &Qwen25VL<B::InnerBackend>| {
        evaluate(
            &compute_model(model, recipe.precision),
            processor,
            &data.eval,
            recipe.train_on,
            files,
        )
    };
    let eval_before = if main && !data.eval.is_empty() && run.state.step == 0 {
        let r = validate(&run.model().valid())?;
        eprintln!(
            "eval before training: loss {:.4}, exact match {:.1}% of {}",
            r.loss,
            r.exact_match * 100.0,
            r.n
        );
        write_metrics(
            &mut metrics,
            &json!({"step": 0, "eval_loss": r.loss, "eval_exact_match": r.exact_match}),
        )?;
        Some(r)
    } else {
        None
    };

    let bar = if main {
        progress_bar(total_steps, run.state.step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // This rank's part of the steps, its samples encoded ahead on the loader's threads.
    let mut loader = Loader::start(
        data.clone(),
        processor.clone(),
        Arc::new((*recipe).clone()),
        shards.clone(),
        recipe.loader_workers,
        recipe.prefetch_steps,
    );
    let mut last_loss = f64::NAN;
    let (t_start, mut tokens_since) = (Instant::now(), 0usize);
    for scheduled in schedule.iter() {
        let t_wait = Instant::now();
        let micro = loader.next()?;
        let data_wait = t_wait.elapsed().as_secs_f64();
        let step = run.state.step;

        // Loss: mean negative log-likelihood over every target token of the step (all ranks);
        // one backward pass per micro-batch, gradients summed (over micro-batches and ranks),
        // clipped to the global norm, one AdamW update.
        let t0 = Instant::now();
        let lr = lr_at(&recipe.schedule, recipe.optimizer.lr, step, total_steps);
        let local_targets = micro.iter().map(|m| m.target_tokens).sum::<usize>() as f64;
        let denom = rank.sum_values::<B::InnerBackend>(&[local_targets], device)?[0].max(1.0);
        let what = |k: usize| {
            format!(
                "epoch {}, micro-batch {k} of rank {}",
                scheduled.epoch, rank.rank
            )
        };
        let inputs: Vec<&ModelInput> = micro.iter().map(|m| &m.input).collect();
        let ck = recipe.gradient_checkpointing;
        let (loss, grads) = accumulate_gradients(
            run.model(),
            recipe.precision,
            ck,
            &inputs,
            step,
            what,
            |model, k, hidden| Ok(token_nll_sum_of(model, &micro[k], hidden).div_scalar(denom)),
        )?;
        let grads = rank.all_reduce_grads(run.model(), grads)?;
        let grad_norm = run.update(grads, lr, recipe.optimizer.max_grad_norm);

        // Bookkeeping (sums over the ranks), metrics, validation, checkpoints.
        let samples: usize = micro.iter().map(|m| m.samples).sum();
        let tokens: usize = micro
            .iter()
            .map(|m| m.input.input_ids.iter().map(Vec::len).sum::<usize>())
            .sum();
        let real: usize = micro.iter().map(|m| m.input.real_tokens()).sum();
        let sums = rank.sum_values::<B::InnerBackend>(
            &[loss, samples as f64, tokens as f64, real as f64],
            device,
        )?;
        let (loss, samples, tokens, real) = (
            sums[0],
            sums[1] as usize,
            sums[2] as usize,
            sums[3] as usize,
        );
        let s = &mut run.state;
        s.step += 1;
        s.epoch = scheduled.epoch;
        s.rows_in_epoch = Some(scheduled.rows_end);
        s.batch_in_epoch = scheduled.rows_end.div_ceil(recipe.global_batch());
        s.world_size = rank.world;
        s.samples_seen += samples;
        s.tokens_seen += tokens;
        tokens_since += tokens;
        last_loss = loss;
        let dt = t0.elapsed().as_secs_f64();
        let ids: Vec<[usize; 2]> = scheduled.samples().map(|(s, r)| [s, r]).collect();
        write_metrics(
            &mut sample_log,
            &json!({"step": s.step, "epoch": s.epoch, "samples": ids}),
        )?;
        if s.step % recipe.log_every.max(1) == 0 || s.step == total_steps {
            write_metrics(
                &mut metrics,
                &json!({
                    "step": s.step, "epoch": s.epoch as f64 + scheduled.rows_end as f64 / scheduled.rows_in_epoch.max(1) as f64,
                    "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": s.tokens_seen, "target_tokens": denom,
                    "padding": 1.0 - real as f64 / tokens.max(1) as f64, "data_wait_s": data_wait,
                    "samples_per_s": samples as f64 / dt, "tokens_per_s": tokens as f64 / dt, "ranks": rank.world,
                }),
            )?;
        }
        let tps = tokens_since as f64 / t_start.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        bar.inc(1);
        let step = s.step;
        if main
            && recipe.eval_every > 0
            && step % recipe.eval_every == 0
            && !data.eval.is_empty()
            && step < total_steps
        {
            let r = validate(&run.model().valid())?;
            bar.println(format!(
                "step {step}: eval loss {:.4}, exact match {:.1}%",
                r.loss,
                r.exact_match * 100.0
            ));
            write_metrics(
                &mut metrics,
                &json!({"step": step, "eval_loss": r.loss, "eval_exact_match": r.exact_match}),
            )?;
        }
        if main && recipe.save_every > 0 && step % recipe.save_every == 0 && step < total_steps {
            run.save_checkpoint(out_dir, files)?;
        }
    }
    bar.finish_and_clear();
    let summary = SftSummary {
        steps: run.state.step,
        final_loss: last_loss,
        output_dir: out_dir.clone(),
        skips: data.skips.clone(),
        eval_before,
        eval_after: None,
    };
    let Some(mut metrics) = metrics else {
        return Ok(summary);
    };

    // The end (rank 0): final checkpoint (for resume), HF export at output_dir, validation, plots.
    let trained = run.finish(out_dir, files, recipe.precision)?;
    let eval_after = if !data.eval.is_empty() {
        let r = validate(&trained)?;
        eprintln!(
            "eval after training: loss {:.4}, exact match {:.1}% of {}",
            r.loss,
            r.exact_match * 100.0,
            r.n
        );
        metrics.write(&json!({"step": run.state.step, "eval_loss": r.loss, "eval_exact_match": r.exact_match}))?;
        Some(r)
    } else {
        None
    };
    plot_metrics(
        metrics.path(),
        &["loss", "lr", "grad_norm", "eval_exact_match"],
        out_dir,
    )?;
    Ok(SftSummary {
        eval_after,
        ..summary
    })
}

/// Rank 0 writes the metrics; the other ranks have none.
fn write_metrics(metrics: &mut Option<MetricsLog>, value: &serde_json::Value) -> Result<()> {
    match metrics {
        Some(m) => m.write(value),
        None => Ok(()),
    }
}

/// Validation loss (mean over target tokens) and exact-match accuracy of greedy answers to the
/// last assistant turn (trimmed text equality).
pub fn evaluate<B: ModelBackend>(
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
        let enc: Vec<Encoded> = chunk
            .iter()
            .map(|c| processor.encode(c, train_on))
            .collect::<Result<_>>()?;
        let refs: Vec<&Encoded> = enc.iter().collect();
        let mb = collate(&refs, pad_id);
        nll += token_nll_sum(model, &mb)?.into_scalar().elem::<f64>();
        tokens += mb.target_tokens;
        let mut prompts = vec![];
        let mut answers = vec![];
        for c in chunk {
            let last = c
                .last_assistant()
                .context("a validation record needs an assistant turn")?;
            let msgs: Vec<ChatMessage> = c.messages[..last].to_vec();
            let n_img: usize = msgs.iter().map(ChatMessage::num_images).sum();
            let p = processor.encode_prompt(&msgs, &c.images[..n_img])?;
            prompts.push(Prompt {
                input_ids: p.input_ids,
                pixel_values: p.pixel_values,
                image_grids: p.image_grids,
            });
            answers.push(c.messages[last].text_content().trim().to_string());
        }
        let max_new = answers
            .iter()
            .map(|a| processor.tokenizer.encode(a).map(|t| t.len()).unwrap_or(8))
            .max()
            .unwrap_or(8)
            + 4;
        let outs = generate(
            model,
            &prompts,
            &SamplingConfig::greedy(max_new),
            &stop,
            &mut rng_from_seed(0),
        )?;
        for (o, a) in outs.iter().zip(&answers) {
            let text = processor.tokenizer.decode(&o.tokens, true)?;
            if text.trim() == a {
                correct += 1;
            }
        }
    }
    Ok(EvalResult {
        loss: nll / tokens.max(1) as f64,
        exact_match: correct as f64 / convs.len().max(1) as f64,
        n: convs.len(),
    })
}
