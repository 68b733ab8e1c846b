//! The GRPO learner (`infimed grpo --recipe R`), top to bottom as a training loop:
//!
//! ```text
//! for step in steps:
//!     prompts   = next rollout.prompts_per_step records (seeded order per epoch)
//!     responses = n samples per prompt (KV-cached generation, temperature, top-p/k)
//!     rewards   = format / accuracy per task (crate::rewards), A = group_advantages(rewards)
//!     old, ref  = log-probs of the sampled tokens under the policy before the update and under
//!                 the frozen initial weights (logits / temperature)
//!     for ppo epoch, mini-batch:                       (one optimizer update each)
//!         for micro-batch: loss = policy_loss(...) + kl_coef * agg(kl(logp, ref)); backward
//!         clip global grad norm; AdamW at the scheduled lr
//!     metrics, completions, validation, checkpoint
//! ```
//!
//! Determinism: the prompt order of epoch `e` is a permutation seeded by `(seed, e)` and the
//! sampler of step `s` is seeded by `(seed, s)`, so a resumed run (`--resume`) draws exactly the
//! rollouts the uninterrupted run would have drawn; with the optimizer state restored, the
//! weights are bit-identical on ndarray.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use serde_json::{json, Value};

use crate::backend::{check_precision, compute_model, dispatch_autodiff, AutodiffJob, BackendArgs};
use crate::data::encode::Encoded;
use crate::engine::{generate_batched, generate_requests, EngineConfig, Request};
use crate::eval::Skipped;
use crate::generate::{stop_tokens, Generation, Prompt, SamplingConfig};
use crate::grpo::algos::{agg_loss, kl_penalty, masked_mean, policy_loss, LossAgg};
use crate::grpo::data::{epoch_order, prompt_messages, read_rl_records, step_rng, RlRecord};
use crate::grpo::recipe::GrpoRecipe;
use crate::grpo::rollout::{
    host_matrix, response_logprobs, rollout_sequence, score_groups, to_matrix, Rollout,
    ScoredGroups,
};
use crate::inputs::Processor;
use crate::learn::batch::{collate, MicroBatch};
use crate::learn::checkpoint::TrainState;
use crate::learn::freeze::count_params;
use crate::learn::logprobs::{entropy_sum, target_hidden};
use crate::learn::metrics::{plot_metrics, MetricsLog};
use crate::learn::parallel::{run_ranks, shard_range, Rank};
use crate::learn::run::{
    accumulate_gradients, prepare_output_dir, progress_bar, Trainee, TraineeSpec,
};
use crate::learn::schedule::lr_at;
use crate::model::{ModelBackend, TrainBackend};
use crate::model::{ModelInput, Qwen25VL};
use crate::models::{load_model, model_files_dir};
use crate::rewards::{self, RewardBreakdown, Task};
use rand::Rng;

// ---------------------------------------------------------------------------------------------
// Validation

/// Greedy validation: mean reward, format rate and accuracy, overall and per task.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RlEval {
    pub n: usize,
    pub reward: f64,
    pub format: f64,
    pub accuracy: f64,
    pub by_task: BTreeMap<String, Value>,
}

fn summarize(breakdowns: &[RewardBreakdown]) -> RlEval {
    let n = breakdowns.len().max(1) as f64;
    let mut by: BTreeMap<Task, Vec<&RewardBreakdown>> = BTreeMap::new();
    for b in breakdowns {
        by.entry(b.task).or_default().push(b);
    }
    let mean = |v: &[&RewardBreakdown], f: fn(&RewardBreakdown) -> f64| {
        v.iter().map(|b| f(b)).sum::<f64>() / v.len().max(1) as f64
    };
    RlEval {
        n: breakdowns.len(),
        reward: breakdowns.iter().map(|b| b.reward).sum::<f64>() / n,
        format: breakdowns.iter().map(|b| b.format).sum::<f64>() / n,
        accuracy: breakdowns.iter().map(|b| b.accuracy).sum::<f64>() / n,
        by_task: by
            .iter()
            .map(|(t, v)| {
                (
                    t.as_str().to_string(),
                    json!({"n": v.len(), "reward": mean(v, |b| b.reward), "format": mean(v, |b| b.format), "accuracy": mean(v, |b| b.accuracy)}),
                )
            })
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn validate<B: ModelBackend>(
    model: &Qwen25VL<B>,
    recipe: &GrpoRecipe,
    processor: &Processor,
    records: &[RlRecord],
    prompts: &[Prompt],
    stop: &[u32],
) -> Result<RlEval> {
    let cfg = SamplingConfig::greedy(recipe.max_response_len);
    let gens = generate_batched(
        model,
        prompts,
        &cfg,
        stop,
        &mut step_rng(0, 0),
        recipe.rollout.generation_batch,
        |_, _| {},
    )?;
    let rc = recipe.reward.config();
    let mut bs = vec![];
    for (g, rec) in gens.iter().zip(records) {
        let text = processor.tokenizer.decode(&g.tokens, true)?;
        bs.push(rewards::score(&rc, &text, &rec.answer, rec.task));
    }
    Ok(summarize(&bs))
}

// ---------------------------------------------------------------------------------------------
// CLI

#[derive(clap::Args, Debug, Clone)]
pub struct GrpoArgs {
    /// TOML recipe (see recipes/infimed-rl-3b.toml, recipes/demo-grpo.toml).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override any recipe field: `--set rollout.n=8 --set optimizer.lr=2e-6`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the plan (prompts, steps, updates, responses) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue from the newest complete checkpoint in output_dir.
    #[arg(long)]
    pub resume: bool,
}

/// What a run reports at the end (also printed as JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrpoSummary {
    pub steps: usize,
    pub output_dir: PathBuf,
    pub skipped_records: usize,
    /// Mean training reward over the first and the last (up to) 10 steps of this process.
    pub reward_first10: Option<f64>,
    pub reward_last10: Option<f64>,
    pub eval_before: Option<RlEval>,
    pub eval_after: Option<RlEval>,
}

pub fn run(args: GrpoArgs) -> Result<()> {
    let recipe = GrpoRecipe::from_file(&args.recipe, &args.set)?;
    let (n_prompts, n_skipped) = if args.dry_run && !recipe.data.exists() {
        println!(
            "note: {} does not exist yet; step counts need it",
            recipe.data.display()
        );
        (None, 0)
    } else {
        let (records, skipped) = read_rl_records(&recipe.data, recipe.skip_invalid)?;
        ensure!(
            !records.is_empty(),
            "{}: no RL record",
            recipe.data.display()
        );
        (Some(records.len()), skipped.len())
    };
    println!(
        "{}",
        crate::grpo::plan::describe(&recipe, n_prompts, n_skipped)
    );
    if args.dry_run {
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
        GrpoJob {
            recipe,
            resume: args.resume,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

struct GrpoJob {
    recipe: GrpoRecipe,
    resume: bool,
}

impl AutodiffJob for GrpoJob {
    type Output = GrpoSummary;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<GrpoSummary> {
        train_grpo::<B>(&self.recipe, self.resume, &device)
    }
}

// ---------------------------------------------------------------------------------------------
// The learner

pub fn train_grpo<B: TrainBackend>(
    recipe: &GrpoRecipe,
    resume: bool,
    device: &B::Device,
) -> Result<GrpoSummary> {
    let files = model_files_dir(&recipe.model)?;
    check_precision::<B>(recipe.precision, device)?;
    let processor = Processor::from_dir(&files, recipe.max_pixels)?;
    prepare_output_dir(&recipe.output_dir, &recipe.to_toml_string()?)?;

    // Data: the prompt records and the validation prompts.
    let (records, mut skipped) = read_rl_records(&recipe.data, recipe.skip_invalid)?;
    ensure!(
        !records.is_empty(),
        "{}: no RL record",
        recipe.data.display()
    );
    let (eval_records, eval_prompts) = validation_prompts(recipe, &processor, &mut skipped)?;

    // One learner per rank (a thread per device of this node), all taking the same steps.
    let run = GrpoRun {
        recipe,
        files,
        processor,
        records,
        eval_records,
        eval_prompts,
        skipped,
    };
    let mut summaries = run_ranks::<B::InnerBackend, _, _>(
        &recipe.parallel,
        recipe.backend,
        device,
        |rank, device| grpo_rank::<B>(&run, resume, &rank, &device),
    )?;
    Ok(summaries.swap_remove(0))
}

/// What the ranks of a GRPO run share.
struct GrpoRun<'a> {
    recipe: &'a GrpoRecipe,
    files: PathBuf,
    processor: Processor,
    records: Vec<RlRecord>,
    eval_records: Vec<RlRecord>,
    eval_prompts: Vec<Prompt>,
    skipped: Vec<Skipped>,
}

/// The GRPO loop of one rank: every rank generates the groups of its share of the step's
/// prompts; the groups are gathered so that every rank scores all of them alike (a group never
/// spans ranks), and each computes the loss of its own groups; the gradients are summed over the
/// ranks before each update. Rank 0 alone logs, validates, checkpoints and exports.
fn grpo_rank<B: TrainBackend>(
    ctx: &GrpoRun,
    resume: bool,
    rank: &Rank,
    device: &B::Device,
) -> Result<GrpoSummary> {
    let GrpoRun {
        recipe,
        files,
        processor,
        records,
        eval_records,
        eval_prompts,
        ..
    } = ctx;
    let mut skipped = ctx.skipped.clone();
    let (out_dir, main) = (&recipe.output_dir, rank.is_main());
    let total_steps = recipe.total_steps(records.len());
    let g = recipe.rollout.n;

    // Policy (fresh or resumed), the frozen reference, optimizer.
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
    // The reference is kept in the compute dtype (bf16: half the memory).
    let reference: Option<Qwen25VL<B::InnerBackend>> = if recipe.algorithm.kl_coef > 0.0 {
        Some(compute_model(
            &rank.sync_inner_from_main(load_model(&recipe.model, recipe.seed, device)?)?,
            recipe.precision,
        ))
    } else {
        None
    };
    let stop = stop_tokens(files, &run.model().config.tokens.eos_token_ids)?;
    if main {
        let (trainable, frozen) = count_params(run.model());
        eprintln!(
            "grpo: {} prompts, {total_steps} steps x {} prompts x {g} responses on {} rank(s), {} updates; {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
            records.len(),
            recipe.rollout.prompts_per_step,
            rank.world,
            total_steps * recipe.updates_per_step(),
            B::name(device),
            recipe.precision,
            recipe.gradient_checkpointing
        );
    }
    let resumed = run.resumed_from.is_some();
    let mut metrics = match main {
        true => Some(MetricsLog::open(
            &out_dir.join("metrics.jsonl"),
            resumed.then_some(run.state.step),
        )?),
        false => None,
    };
    let mut completions = if main {
        Some(CompletionsLog::open(recipe, resumed)?)
    } else {
        None
    };
    let validate_now = |model: &Qwen25VL<B::InnerBackend>| {
        validate(
            &compute_model(model, recipe.precision),
            recipe,
            processor,
            eval_records,
            eval_prompts,
            &stop,
        )
    };
    let eval_before = if main && !eval_records.is_empty() && !resumed {
        let r = validate_now(&run.model().valid())?;
        eprintln!(
            "validation before: reward {:.3}, accuracy {:.1}%, format {:.1}% ({} prompts)",
            r.reward,
            100.0 * r.accuracy,
            100.0 * r.format,
            r.n
        );
        Some(r)
    } else {
        None
    };

    let bar = if main {
        progress_bar(total_steps, run.state.step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut order = epoch_order(records.len(), recipe.seed, run.state.epoch);
    let mut step_rewards: Vec<f64> = vec![];
    while run.state.step < total_steps {
        let t_step = Instant::now();
        // 1. The step's prompts (wrapping into the next epoch's order).
        let picked = next_prompts(
            &mut run.state,
            &mut order,
            records.len(),
            recipe.rollout.prompts_per_step,
            recipe.seed,
        );
        let (prompts, kept, skipped_now) =
            encode_prompts(recipe, processor, records, &picked, &mut skipped)?;
        ensure!(
            !kept.is_empty(),
            "step {}: every prompt of the step was skipped",
            run.state.step + 1
        );

        // 2. Rollouts: n samples per prompt from the policy as it is, this rank's prompts here
        //    (seeded per prompt: the same samples on any number of ranks), then gathered.
        let t_roll = Instant::now();
        let policy = compute_model(&run.model().valid(), recipe.precision);
        // One request per prompt with its n samples: the prompt (and its image) prefilled once.
        let base: u64 = step_rng(recipe.seed, run.state.step).random();
        let mine = shard_range(prompts.len(), rank.rank, rank.world);
        let requests: Vec<Request> = mine
            .clone()
            .map(|k| Request {
                prompt: prompts[k].clone(),
                n: g,
                seed: base.wrapping_add(k as u64),
            })
            .collect();
        let engine = EngineConfig {
            max_rows: recipe.rollout.generation_batch,
            max_batch_tokens: recipe.rollout.max_batch_tokens,
        };
        let (groups, _) = generate_requests(
            &policy,
            &requests,
            &recipe.sampling(),
            &stop,
            &engine,
            |_, _| {},
        )?;
        let local: Vec<Generation> = groups.into_iter().flatten().collect();
        let gens = rank.all_gather_generations::<B::InnerBackend>(
            local,
            mine.start * g,
            prompts.len() * g,
            device,
        )?;
        let rollout_secs = t_roll.elapsed().as_secs_f64();
        let gen_tokens: usize = gens.iter().map(|x| x.tokens.len()).sum();

        // 3. Rewards and group-normalised advantages.
        let rc = recipe.reward.config();
        let scored = score_groups(
            gens.into_iter()
                .enumerate()
                .map(|(i, gen)| (kept[i / g], gen))
                .collect(),
            |tokens| processor.tokenizer.decode(tokens, true),
            |record, text| rewards::score(&rc, text, &records[record].answer, records[record].task),
            g,
            recipe.algorithm.norm_adv_by_std,
            recipe.algorithm.drop_zero_variance_groups,
        )?;
        // This rank's responses as training sequences (prompt + response).
        let own = mine.start * g..mine.end * g;
        let seqs: Vec<Encoded> = own
            .clone()
            .map(|i| rollout_sequence(&prompts[i / g], &scored.rollouts[i].tokens))
            .collect();

        // 4. Old (before any update; reused when there is one update per step) and reference
        //    log-probs, both from logits / temperature.
        let pad_id = processor.tokenizer.special().pad();
        let (micro, temperature) = (recipe.ppo.micro_batch, recipe.rollout.temperature as f64);
        let old_lp = if recipe.updates_per_step() == 1 {
            None
        } else {
            Some(response_logprobs(
                &policy,
                &seqs,
                pad_id,
                micro,
                temperature,
            )?)
        };
        let ref_lp = reference
            .as_ref()
            .map(|r| response_logprobs(r, &seqs, pad_id, micro, temperature))
            .transpose()?;
        drop(policy);

        // 5. Updates: ppo epochs x mini-batches, one optimizer step each.
        let t_upd = Instant::now();
        let lp = StepLogprobs {
            old: old_lp.as_deref(),
            reference: ref_lp.as_deref(),
        };
        let stats = policy_update(
            &mut run,
            recipe,
            &scored,
            (&seqs, own.start),
            &lp,
            pad_id,
            total_steps,
            rank,
            device,
        )?;
        let update_secs = t_upd.elapsed().as_secs_f64();
        run.state.step += 1;
        run.state.samples_seen += scored.rollouts.len();
        run.state.tokens_seen += stats.tokens;

        // 6. Metrics, completions, validation, checkpoint.
        let m = step_metrics(
            &run.state,
            records.len(),
            &scored,
            &stats,
            kept.len(),
            skipped_now,
        );
        let m = with_timing(
            m,
            gen_tokens as f64 / rollout_secs.max(1e-9),
            stats.tokens as f64 / update_secs.max(1e-9),
            t_step.elapsed().as_secs_f64(),
        );
        let step = run.state.step;
        step_rewards.push(m["reward_mean"].as_f64().unwrap_or(0.0));
        if let (Some(metrics), true) = (
            &mut metrics,
            step % recipe.log_every.max(1) == 0 || step == total_steps,
        ) {
            metrics.write(&m)?;
        }
        if let Some(c) = &mut completions {
            c.write(recipe, step, records, &scored.rollouts)?;
        }
        bar.set_message(format!(
            "reward {:.3} acc {:.1}% kl {:.4} len {:.1} {:.0} tok/s",
            m["reward_mean"].as_f64().unwrap_or(0.0),
            100.0 * m["accuracy"].as_f64().unwrap_or(0.0),
            m["kl"].as_f64().unwrap_or(0.0),
            m["response_len_mean"].as_f64().unwrap_or(0.0),
            m["rollout_tokens_per_s"].as_f64().unwrap_or(0.0)
        ));
        bar.inc(1);
        let Some(metrics) = &mut metrics else {
            continue;
        };
        if recipe.eval_every > 0
            && step % recipe.eval_every == 0
            && step < total_steps
            && !eval_records.is_empty()
        {
            let r = validate_now(&run.model().valid())?;
            bar.println(format!(
                "step {step}: validation reward {:.3}, accuracy {:.1}%",
                r.reward,
                100.0 * r.accuracy
            ));
            metrics.write(&json!({"step": step, "val_reward": r.reward, "val_accuracy": r.accuracy, "val_format": r.format}))?;
        }
        if recipe.save_every > 0 && step % recipe.save_every == 0 && step < total_steps {
            run.save_checkpoint(out_dir, files)?;
        }
    }
    bar.finish_and_clear();
    let k = step_rewards.len().min(10);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let summary = GrpoSummary {
        steps: run.state.step,
        output_dir: out_dir.clone(),
        skipped_records: skipped.len(),
        reward_first10: mean(&step_rewards[..k]),
        reward_last10: mean(&step_rewards[step_rewards.len() - k..]),
        eval_before,
        eval_after: None,
    };
    let Some(metrics) = metrics else {
        return Ok(summary);
    };

    // The end (rank 0): final checkpoint, HF export, validation, plots.
    let trained = run.finish(out_dir, files, recipe.precision)?;
    let eval_after = if !eval_records.is_empty() {
        let r = validate_now(&trained)?;
        eprintln!(
            "validation after: reward {:.3}, accuracy {:.1}%, format {:.1}% ({} prompts)",
            r.reward,
            100.0 * r.accuracy,
            100.0 * r.format,
            r.n
        );
        Some(r)
    } else {
        None
    };
    plot_metrics(
        metrics.path(),
        &[
            "reward_mean",
            "accuracy",
            "kl",
            "response_len_mean",
            "entropy",
            "clip_frac",
        ],
        out_dir,
    )?;
    for s in skipped.iter().take(10) {
        eprintln!("skipped {}: {}", s.location, s.reason);
    }
    Ok(GrpoSummary {
        eval_after,
        ..summary
    })
}

// ---------------------------------------------------------------------------------------------
// The steps of the loop

/// The validation records (`eval_data`, at most `eval_limit`) and their prompts.
fn validation_prompts(
    recipe: &GrpoRecipe,
    processor: &Processor,
    skipped: &mut Vec<Skipped>,
) -> Result<(Vec<RlRecord>, Vec<Prompt>)> {
    let Some(path) = &recipe.eval_data else {
        return Ok((vec![], vec![]));
    };
    let (mut recs, s) = read_rl_records(path, recipe.skip_invalid)?;
    skipped.extend(s);
    if recipe.eval_limit > 0 {
        recs.truncate(recipe.eval_limit);
    }
    let prompts = recs
        .iter()
        .map(|r| {
            processor
                .prompt(&prompt_messages(recipe, r), &r.images)
                .with_context(|| r.origin.clone())
        })
        .collect::<Result<_>>()?;
    Ok((recs, prompts))
}

/// The record indices of the next `count` prompts of the seeded order, moving `state` on (and
/// into the next epoch's order past the end of this one).
fn next_prompts(
    state: &mut TrainState,
    order: &mut Vec<usize>,
    n_records: usize,
    count: usize,
    seed: u64,
) -> Vec<usize> {
    let mut picked = Vec::with_capacity(count);
    while picked.len() < count {
        if state.batch_in_epoch >= order.len() {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            *order = epoch_order(n_records, seed, state.epoch);
        }
        picked.push(order[state.batch_in_epoch]);
        state.batch_in_epoch += 1;
    }
    picked
}

/// The prompts of the picked records: `(prompts, their record indices, prompts skipped now)`. An
/// invalid or over-long prompt is an error, or with `skip_invalid` a counted skip.
fn encode_prompts(
    recipe: &GrpoRecipe,
    processor: &Processor,
    records: &[RlRecord],
    picked: &[usize],
    skipped: &mut Vec<Skipped>,
) -> Result<(Vec<Prompt>, Vec<usize>, usize)> {
    let (mut prompts, mut kept, mut skipped_now) = (vec![], vec![], 0usize);
    for &r in picked {
        let rec = &records[r];
        let p = processor
            .prompt(&prompt_messages(recipe, rec), &rec.images)
            .with_context(|| rec.origin.clone());
        let p = match p {
            Ok(p) if p.input_ids.len() <= recipe.max_prompt_len => Ok(p),
            Ok(p) => Err(anyhow!(
                "{}: prompt of {} tokens is over max_prompt_len {}",
                rec.origin,
                p.input_ids.len(),
                recipe.max_prompt_len
            )),
            Err(e) => Err(e),
        };
        match p {
            Ok(p) => {
                prompts.push(p);
                kept.push(r);
            }
            Err(e) if recipe.skip_invalid => {
                skipped_now += 1;
                skipped.push(Skipped {
                    location: rec.origin.clone(),
                    reason: format!("{e:#}"),
                });
            }
            Err(e) => {
                return Err(e.context("use skip_invalid = true to skip (and count) such prompts"))
            }
        }
    }
    Ok((prompts, kept, skipped_now))
}

/// Per-response token log-probs computed before the update.
struct StepLogprobs<'a> {
    /// Under the policy before the update (`None`: one update per step, where old = current).
    old: Option<&'a [Vec<f32>]>,
    /// Under the frozen reference (`None`: no KL term).
    reference: Option<&'a [Vec<f32>]>,
}

/// What the updates of one step measured (first PPO epoch; token-weighted sums).
#[derive(Default)]
struct UpdateStats {
    pg_sum: f64,
    kl_sum: f64,
    clip_sum: f64,
    loss_tokens: usize,
    entropy_sum: f64,
    entropy_tokens: usize,
    grad_norms: Vec<f64>,
    lr: f64,
    /// Tokens (prompt + response) run through forward + backward, every epoch.
    tokens: usize,
}

/// `ppo.epochs` passes over the step's rollouts in mini-batches of `ppo.mini_batch` groups, one
/// optimizer update per mini-batch, micro-batches of `ppo.micro_batch` responses accumulated
/// (each micro-batch's share of the mini-batch's `loss_agg` is exact).
#[allow(clippy::too_many_arguments)]
fn policy_update<B: TrainBackend>(
    run: &mut Trainee<B>,
    recipe: &GrpoRecipe,
    scored: &ScoredGroups,
    (seqs, own_start): (&[Encoded], usize),
    lp: &StepLogprobs,
    pad_id: u32,
    total_steps: usize,
    rank: &Rank,
    device: &B::Device,
) -> Result<UpdateStats> {
    let alg = recipe.algorithm;
    let (g, temperature) = (recipe.rollout.n, recipe.rollout.temperature as f64);
    let ups = recipe.updates_per_step();
    let groups = scored.in_update.len();
    let per_mini = recipe.ppo.mini_batch;
    let lens: Vec<usize> = scored.rollouts.iter().map(|r| r.tokens.len()).collect();
    let mut st = UpdateStats::default();
    for epoch in 0..recipe.ppo.epochs {
        for mini_start in (0..recipe.rollout.prompts_per_step).step_by(per_mini) {
            let update = run.state.step * ups
                + epoch * (recipe.rollout.prompts_per_step / per_mini)
                + mini_start / per_mini;
            st.lr = lr_at(
                &recipe.schedule,
                recipe.optimizer.lr,
                update,
                total_steps * ups,
            );
            let members: Vec<usize> = (mini_start..(mini_start + per_mini).min(groups))
                .filter(|&k| scored.in_update[k])
                .flat_map(|k| k * g..(k + 1) * g)
                .collect();
            if members.is_empty() {
                continue;
            }
            let mini_tokens: usize = members.iter().map(|&i| lens[i]).sum();
            // This rank's responses of the mini-batch (`seqs` and `lp` hold its own, from
            // `own_start`); the shares below are of the whole mini-batch, over all ranks.
            let local: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| i >= own_start && i < own_start + seqs.len())
                .collect();
            let micros: Vec<&[usize]> = local.chunks(recipe.ppo.micro_batch).collect();
            let batches: Vec<MicroBatch> = micros
                .iter()
                .map(|micro| {
                    collate(
                        &micro
                            .iter()
                            .map(|&i| &seqs[i - own_start])
                            .collect::<Vec<_>>(),
                        pad_id,
                    )
                })
                .collect();
            let inputs: Vec<&ModelInput> = batches.iter().map(|mb| &mb.input).collect();
            let what = |_k: usize| format!("mini-batch at prompt {mini_start}, ppo epoch {epoch}");
            let ck = recipe.gradient_checkpointing;
            let (_, grads) = accumulate_gradients(
                run.model(),
                recipe.precision,
                ck,
                &inputs,
                run.state.step + 1,
                what,
                |model, k, hidden| {
                    let (micro, mb) = (micros[k], &batches[k]);
                    let micro_lens: Vec<usize> = micro.iter().map(|&i| lens[i]).collect();
                    let micro_tokens: usize = micro_lens.iter().sum();
                    let (rows, targets) = target_hidden(mb, hidden);
                    if epoch == 0 {
                        // Entropy of the sampling distribution (metric only, detached).
                        st.entropy_sum += entropy_sum(model, rows.clone(), temperature);
                        st.entropy_tokens += micro_tokens;
                    }
                    let logp = if targets.is_empty() {
                        Tensor::zeros([0], device)
                    } else {
                        model.target_logprobs(rows, targets, temperature)
                    };
                    let (logp, mask) = to_matrix(logp, &micro_lens);
                    let rows = |m: &[Vec<f32>]| {
                        host_matrix::<B>(
                            &micro
                                .iter()
                                .map(|&i| m[i - own_start].as_slice())
                                .collect::<Vec<_>>(),
                            device,
                        )
                    };
                    let old = match lp.old {
                        Some(o) => rows(o),
                        None => logp.clone().detach(),
                    };
                    let advs: Vec<f32> = micro
                        .iter()
                        .map(|&i| scored.rollouts[i].advantage as f32)
                        .collect();
                    let adv =
                        Tensor::<B, 1>::from_data(TensorData::new(advs, [micro.len()]), device);
                    let share = match alg.loss_agg {
                        LossAgg::TokenMean => micro_tokens as f64 / mini_tokens.max(1) as f64,
                        _ => micro.len() as f64 / members.len() as f64,
                    };
                    let pg = policy_loss(
                        logp.clone(),
                        old,
                        adv,
                        mask.clone(),
                        alg.clip_low,
                        alg.clip_high,
                        alg.dual_clip,
                        alg.loss_agg,
                    );
                    let mut loss = pg.loss.clone().mul_scalar(share);
                    if let (Some(r), true) = (lp.reference, alg.kl_coef > 0.0) {
                        let kl_tok = kl_penalty(logp, rows(r), alg.kl_kind);
                        if epoch == 0 {
                            st.kl_sum += masked_mean(kl_tok.clone().detach(), mask.clone())
                                .into_scalar()
                                .elem::<f64>()
                                * micro_tokens as f64;
                        }
                        loss = loss
                            + agg_loss(kl_tok, mask, alg.loss_agg).mul_scalar(alg.kl_coef * share);
                    }
                    if epoch == 0 {
                        st.pg_sum += pg.loss.into_scalar().elem::<f64>() * micro_tokens as f64;
                        st.clip_sum +=
                            pg.clip_frac.into_scalar().elem::<f64>() * micro_tokens as f64;
                        st.loss_tokens += micro_tokens;
                    }
                    st.tokens += mb.input.input_ids.iter().map(Vec::len).sum::<usize>();
                    Ok(loss)
                },
            )?;
            let grads = rank.all_reduce_grads(run.model(), grads)?;
            st.grad_norms
                .push(run.update(grads, st.lr, recipe.optimizer.max_grad_norm));
        }
    }
    // The measurements of every rank's responses.
    let sums = [
        st.pg_sum,
        st.kl_sum,
        st.clip_sum,
        st.loss_tokens as f64,
        st.entropy_sum,
        st.entropy_tokens as f64,
        st.tokens as f64,
    ];
    let sums = rank.sum_values::<B::InnerBackend>(&sums, device)?;
    (st.pg_sum, st.kl_sum, st.clip_sum, st.loss_tokens) =
        (sums[0], sums[1], sums[2], sums[3] as usize);
    (st.entropy_sum, st.entropy_tokens, st.tokens) = (sums[4], sums[5] as usize, sums[6] as usize);
    Ok(st)
}

/// The metrics line of a step (before timing).
fn step_metrics(
    state: &TrainState,
    n_records: usize,
    scored: &ScoredGroups,
    st: &UpdateStats,
    groups: usize,
    skipped_now: usize,
) -> Value {
    let breakdowns: Vec<RewardBreakdown> =
        scored.rollouts.iter().map(|r| r.reward.clone()).collect();
    let s = summarize(&breakdowns);
    let rewards = &scored.rewards;
    let n_r = rewards.len() as f64;
    let reward_std =
        (rewards.iter().map(|r| (r - s.reward).powi(2)).sum::<f64>() / (n_r - 1.0).max(1.0)).sqrt();
    let per = |x: f64| {
        if st.loss_tokens > 0 {
            x / st.loss_tokens as f64
        } else {
            0.0
        }
    };
    let lens: Vec<usize> = scored.rollouts.iter().map(|r| r.tokens.len()).collect();
    json!({
        "step": state.step, "epoch": state.epoch as f64 + state.batch_in_epoch as f64 / n_records as f64, "lr": st.lr,
        "reward_mean": s.reward, "reward_std": reward_std, "format_rate": s.format, "accuracy": s.accuracy, "by_task": s.by_task,
        "kl": per(st.kl_sum), "pg_loss": per(st.pg_sum), "clip_frac": per(st.clip_sum),
        "entropy": if st.entropy_tokens > 0 { st.entropy_sum / st.entropy_tokens as f64 } else { 0.0 },
        "response_len_mean": lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        "response_len_max": lens.iter().copied().max().unwrap_or(0),
        "stopped_frac": scored.rollouts.iter().filter(|r| r.stopped).count() as f64 / n_r,
        "zero_variance_groups": scored.zero_variance, "zero_variance_frac": scored.zero_variance as f64 / groups as f64,
        "grad_norm": st.grad_norms.iter().copied().fold(0.0, f64::max),
        "skipped_prompts": skipped_now,
    })
}

/// The step's throughput and wall time added to its metrics line.
fn with_timing(
    mut m: Value,
    rollout_tokens_per_s: f64,
    update_tokens_per_s: f64,
    step_secs: f64,
) -> Value {
    let o = m.as_object_mut().expect("metrics are an object");
    o.insert("rollout_tokens_per_s".into(), json!(rollout_tokens_per_s));
    o.insert("update_tokens_per_s".into(), json!(update_tokens_per_s));
    o.insert("step_secs".into(), json!(step_secs));
    m
}

/// `completions.jsonl`: every rollout of every `log_completions_every`-th step.
struct CompletionsLog(Option<std::io::BufWriter<std::fs::File>>);

impl CompletionsLog {
    fn open(recipe: &GrpoRecipe, resumed: bool) -> Result<Self> {
        if recipe.log_completions_every == 0 {
            return Ok(Self(None));
        }
        let p = recipe.output_dir.join("completions.jsonl");
        let f = if resumed {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
        } else {
            std::fs::File::create(&p)
        }
        .with_context(|| format!("opening {}", p.display()))?;
        Ok(Self(Some(std::io::BufWriter::new(f))))
    }

    fn write(
        &mut self,
        recipe: &GrpoRecipe,
        step: usize,
        records: &[RlRecord],
        rollouts: &[Rollout],
    ) -> Result<()> {
        let Some(w) = self.0.as_mut() else {
            return Ok(());
        };
        if step % recipe.log_completions_every != 0 {
            return Ok(());
        }
        for r in rollouts {
            let rec = &records[r.record];
            serde_json::to_writer(
                &mut *w,
                &json!({"step": step, "origin": rec.origin, "problem": rec.problem, "answer": rec.answer,
                        "response": r.text, "task": r.reward.task.as_str(), "format": r.reward.format,
                        "accuracy": r.reward.accuracy, "reward": r.reward.reward, "advantage": r.advantage}),
            )?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }
}
