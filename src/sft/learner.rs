//! The SFT learner (`infimed sft --recipe R`), as LLaMA-Factory trains Qwen2.5-VL: labels on
//! assistant turns (`content<|im_end|>\n`), image-safe truncation, batches in a seeded mixed
//! order, AdamW with the recipe's values, HF's cosine schedule, global gradient-norm clipping,
//! gradient accumulation whose loss is the mean over all target tokens of the effective batch
//! ([`crate::sft::step`]). The loop around the step (validation, metrics, checkpoints with exact
//! resume, HF export) is [`crate::learn::trainer`].

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::prelude::*;
use serde::Serialize;

use crate::backend::{check_precision, compute_model, dispatch_autodiff, probe, AutodiffJob};
use crate::data::encode::{Encoded, TrainOn};
use crate::data::sharegpt::Conversation;
use crate::data::template::ChatMessage;
use crate::engine::generate;
use crate::generate::{rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::learn::batch::collate;
use crate::learn::logprobs::token_nll_sum;
use crate::learn::metrics::{MetricsLog, Record};
use crate::learn::parallel::{run_ranks, Rank};
use crate::learn::recipe::Recipe;
use crate::learn::run::{prepare_output_dir, NonFinite, Trainee};
use crate::learn::schedule::lr_at;
use crate::learn::trainer::{train, Evaluation, Learner, RunSummary, StepRecord, TrainArgs};
use crate::model::{ModelBackend, Qwen25VL, Qwen25VlConfig, TrainBackend};
use crate::models::model_files_dir;
use crate::sft::data::{
    read_sources, source_lengths, Loader, SampleId, ScheduledStep, SftData, SkipReport,
};
use crate::sft::plan::{build_plan_with_lengths, count_available, run_end, SftPlan};
use crate::sft::recipe::SftRecipe;
use crate::sft::step::sft_step;

/// What an SFT run reports at its end.
pub type SftSummary = RunSummary<EvalResult, SftEnd>;

/// `infimed sft`: the plan (`--dry-run`), or the run.
pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = SftRecipe::from_file(&args.recipe, &args.set)?;
    if args.dry_run {
        println!("{}", dry_run_plan(&recipe)?);
        return Ok(());
    }
    let (backend, ck) = (recipe.backend_args(), recipe.gradient_checkpointing);
    probe(backend.backend, backend.device)?;
    let claim = args.claim(&recipe.output_dir, recipe.parallel.node_rank)?;
    let resume = claim.as_ref().is_some_and(|c| c.resume);
    let summary = dispatch_autodiff(backend, ck, SftJob { recipe, resume })?;
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

/// An SFT run on this node's ranks; rank 0's summary.
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
    let cfg = Qwen25VlConfig::from_dir(&files)?;
    let plan = build_plan_with_lengths(recipe, &cfg, &data.available, Some(&data.lengths))?;
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

    let processor = Arc::new(processor);
    let settings = recipe.run_settings(&files, resume);
    let mut summaries = run_ranks::<B::InnerBackend, _, _>(
        &recipe.parallel,
        recipe.backend,
        device,
        |rank, device| {
            train::<B, _>(&settings, &rank, &device, |trainee| {
                SftLearner::start(
                    recipe,
                    &files,
                    &processor,
                    &data,
                    trainee,
                    rank.clone(),
                    device.clone(),
                )
            })
        },
    )?;
    Ok(summaries.swap_remove(0))
}

/// The SFT learner of one rank: every rank takes every optimizer step on its shard of the
/// step's samples.
struct SftLearner<'a, B: TrainBackend> {
    recipe: &'a SftRecipe,
    files: &'a Path,
    processor: &'a Processor,
    data: &'a SftData,
    rank: Rank,
    device: B::Device,
    /// The steps left to take (over all ranks) and the step the run ends at.
    schedule: std::vec::IntoIter<ScheduledStep>,
    total_steps: usize,
    /// This rank's part of the steps, its samples encoded ahead on the loader's threads.
    loader: Loader,
    /// `samples.jsonl` (rank 0, with `log_samples`): the samples of every step.
    sample_log: Option<MetricsLog>,
    last_loss: f64,
}

impl<'a, B: TrainBackend> SftLearner<'a, B> {
    fn start(
        recipe: &'a SftRecipe,
        files: &'a Path,
        processor: &'a Arc<Processor>,
        data: &'a Arc<SftData>,
        trainee: &Trainee<B>,
        rank: Rank,
        device: B::Device,
    ) -> Result<Self> {
        // The remaining optimizer steps: from where the run stands to where a run of this world
        // size ends (a run resumed on another number of ranks continues the same sample order).
        let state = &trainee.state;
        let rows_per_epoch = data.epoch_rows(recipe, 0).len();
        let position = (
            state.epoch,
            state
                .rows_in_epoch
                .unwrap_or(state.batch_in_epoch * recipe.per_device_batch),
        );
        let schedule = data.schedule_until(
            recipe,
            position,
            Some(run_end(recipe, rows_per_epoch)),
            usize::MAX,
        )?;
        let total_steps = state.step + schedule.len();
        let shards = schedule
            .iter()
            .map(|s| s.shard(rank.rank, recipe.per_device_batch))
            .collect();
        let main = rank.is_main();
        if main {
            let (trainable, frozen) = crate::learn::freeze::count_params(trainee.model());
            eprintln!(
                "sft: {rows_per_epoch} rows/epoch, {total_steps} optimizer steps on {} rank(s) x {} rows x {} micro-batches, {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
                rank.world,
                recipe.per_device_batch,
                recipe.grad_accum,
                B::name(&device),
                recipe.precision,
                recipe.gradient_checkpointing
            );
            if trainee.resumed_from.is_some() && state.world_size != rank.world {
                let (was, left) = (state.world_size, schedule.len());
                eprintln!(
                    "sft: the run was on {was} rank(s), continues on {}: {left} steps left",
                    rank.world
                );
            }
        }
        let resumed_at = trainee.resumed_from.as_ref().map(|_| state.step);
        let sample_log = match main && recipe.log_samples {
            true => Some(MetricsLog::open(
                &recipe.output_dir.join("samples.jsonl"),
                resumed_at,
            )?),
            false => None,
        };
        let (workers, depth) = (recipe.loader_workers, recipe.prefetch_steps);
        let loader = Loader::start(
            data.clone(),
            processor.clone(),
            Arc::new(recipe.clone()),
            Arc::new(shards),
            workers,
            depth,
        );
        Ok(Self {
            recipe,
            files,
            processor,
            data,
            rank,
            device,
            schedule: schedule.into_iter(),
            total_steps,
            loader,
            sample_log,
            last_loss: f64::NAN,
        })
    }
}

impl<B: TrainBackend> SftLearner<'_, B> {
    /// `FILE:LINE` of samples.
    fn origins<'s>(&self, samples: impl Iterator<Item = &'s SampleId>) -> Vec<String> {
        samples
            .map(|&(s, r)| self.data.sources[s][r].origin.clone())
            .collect()
    }
}

impl<B: TrainBackend> Learner<B> for SftLearner<'_, B> {
    type Step = SftStep;
    type Eval = EvalResult;
    type Summary = SftEnd;

    fn total_steps(&self) -> usize {
        self.total_steps
    }

    fn step(&mut self, trainee: &mut Trainee<B>) -> Result<SftStep> {
        let (recipe, rank) = (self.recipe, &self.rank);
        let scheduled = self
            .schedule
            .next()
            .context("the SFT schedule ended before the run")?;
        let t_wait = Instant::now();
        let micro = self.loader.next_step()?;
        let data_wait_s = t_wait.elapsed().as_secs_f64();

        // The step: mean negative log-likelihood over its target tokens, one AdamW update.
        let t0 = Instant::now();
        let lr = lr_at(
            &recipe.schedule,
            recipe.optimizer.lr,
            trainee.state.step,
            self.total_steps,
        );
        let out = sft_step(trainee, &micro, lr, rank, &self.device).map_err(|e| {
            let mine = scheduled.shard(rank.rank, recipe.per_device_batch);
            NonFinite::name_samples(e, |k| self.origins(mine.micro[k].iter().flatten()))
        })?;

        // Sums over the ranks; where the run stands after the step.
        let samples: usize = micro.iter().map(|m| m.samples).sum();
        let tokens: usize = micro
            .iter()
            .map(|m| m.input.input_ids.iter().map(Vec::len).sum::<usize>())
            .sum();
        let real: usize = micro.iter().map(|m| m.input.real_tokens()).sum();
        let sums = rank.sum_values::<B::InnerBackend>(
            &[out.loss, samples as f64, tokens as f64, real as f64],
            &self.device,
        )?;
        let (loss, samples, tokens, real) = (
            sums[0],
            sums[1] as usize,
            sums[2] as usize,
            sums[3] as usize,
        );
        let s = &mut trainee.state;
        s.step += 1;
        s.epoch = scheduled.epoch;
        s.rows_in_epoch = Some(scheduled.rows_end);
        s.batch_in_epoch = scheduled.rows_end.div_ceil(recipe.global_batch());
        s.world_size = rank.world;
        s.samples_seen += samples;
        s.tokens_seen += tokens;
        self.last_loss = loss;
        let dt = t0.elapsed().as_secs_f64();
        if let Some(log) = &mut self.sample_log {
            let ids: Vec<[usize; 2]> = scheduled.samples().map(|(s, r)| [s, r]).collect();
            log.write(&serde_json::json!({"step": s.step, "epoch": s.epoch, "samples": ids}))?;
        }
        Ok(SftStep {
            step: s.step,
            epoch: s.epoch as f64
                + scheduled.rows_end as f64 / scheduled.rows_in_epoch.max(1) as f64,
            loss,
            lr,
            grad_norm: out.grad_norm,
            tokens: s.tokens_seen,
            target_tokens: out.target_tokens,
            padding: 1.0 - real as f64 / tokens.max(1) as f64,
            data_wait_s,
            samples_per_s: samples as f64 / dt,
            tokens_per_s: tokens as f64 / dt,
            ranks: rank.world,
            skipped_updates: out.skipped as usize,
        })
    }

    fn validate(&self, model: &Qwen25VL<B::InnerBackend>) -> Result<Option<EvalResult>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let model = compute_model(model, self.recipe.precision);
        evaluate(
            &model,
            self.processor,
            &self.data.eval,
            self.recipe.train_on,
            self.files,
        )
        .map(Some)
    }

    fn plots(&self) -> &'static [&'static str] {
        &["loss", "lr", "grad_norm", "eval_exact_match"]
    }

    fn finish(self) -> Result<SftEnd> {
        Ok(SftEnd {
            final_loss: self.last_loss,
            skips: self.data.skips.clone(),
        })
    }
}

/// The `metrics.jsonl` line of an SFT step.
#[derive(Debug, Clone, Serialize)]
pub struct SftStep {
    pub step: usize,
    /// Epochs done (fractional).
    pub epoch: f64,
    /// Mean negative log-likelihood per target token of the step (all ranks).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding included) seen so far.
    pub tokens: usize,
    /// Target tokens of the step (all ranks).
    pub target_tokens: f64,
    /// Padding's share of the step's token slots.
    pub padding: f64,
    /// Seconds the step waited for its samples.
    pub data_wait_s: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub ranks: usize,
    /// Updates skipped for a non-finite loss or gradient norm (`nan_policy = "skip"`).
    pub skipped_updates: usize,
}

impl Record for SftStep {
    fn step(&self) -> usize {
        self.step
    }
}

impl StepRecord for SftStep {
    fn progress(&self) -> String {
        format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            self.loss, self.lr, self.tokens_per_s
        )
    }
}

/// What SFT adds to a run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct SftEnd {
    pub final_loss: f64,
    pub skips: SkipReport,
}

/// Validation: loss (mean over target tokens) and exact-match accuracy of greedy answers.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub exact_match: f64,
    pub n: usize,
}

/// The `metrics.jsonl` line of a validation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalLine {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_exact_match: f64,
}

impl Record for EvalLine {
    fn step(&self) -> usize {
        self.step
    }
}

impl Evaluation for EvalResult {
    type Line = EvalLine;

    fn line(&self, step: usize) -> EvalLine {
        EvalLine {
            step,
            eval_loss: self.loss,
            eval_exact_match: self.exact_match,
        }
    }

    fn describe(&self) -> String {
        format!(
            "eval loss {:.4}, exact match {:.1}% of {}",
            self.loss,
            self.exact_match * 100.0,
            self.n
        )
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
