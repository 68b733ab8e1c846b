//! The GRPO learner (`infimed grpo --recipe R`). One step, top to bottom:
//!
//! ```text
//! prompts   = next rollout.prompts_per_step records (seeded order per epoch)
//! responses = n samples per prompt from the policy as it is (KV-cached, temperature, top-p/k)
//! rewards   = format / accuracy per task (crate::rewards), A = group_advantages(rewards)
//! old, ref  = log-probs of the sampled tokens under the policy before the update and under the
//!             frozen initial weights (logits / temperature)
//! updates   = ppo epochs x mini-batches, one AdamW step each, of the GRPO objective
//!             (crate::grpo::objective: clipped policy loss + kl_coef x KL to the reference)
//! ```
//!
//! The loop around it (validation, metrics, checkpoints, export) is [`crate::learn::trainer`].
//! On many ranks every rank generates the groups of its share of the step's prompts; the groups
//! are gathered so that every rank scores all of them alike (a group never spans ranks), and each
//! computes the objective of its own groups; the gradients are summed over the ranks before each
//! update.
//!
//! Determinism: the prompt order of epoch `e` is a permutation seeded by `(seed, e)` and the
//! sampler of step `s` is seeded by `(seed, s)`, so a resumed run (`--resume`) draws exactly the
//! rollouts the uninterrupted run would have drawn; with the optimizer state restored, the
//! weights are bit-identical on ndarray.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use burn::module::AutodiffModule;
use rand::Rng;

use crate::backend::{check_precision, compute_model, dispatch_autodiff, probe, AutodiffJob};
use crate::data::encode::Encoded;
use crate::engine::{generate_batched, generate_requests, EngineConfig, Request};
use crate::eval::Skipped;
use crate::generate::{stop_tokens, Generation, Prompt, SamplingConfig};
use crate::grpo::algos::overlong_penalty;
use crate::grpo::data::{
    epoch_order, next_prompts, prompt_messages, read_rl_records, step_rng, RlRecord,
};
use crate::grpo::metrics::{summarize, GrpoEnd, GrpoStep, RlEval};
use crate::grpo::recipe::GrpoRecipe;
use crate::grpo::rollout::{response_logprobs, rollout_sequence, score_groups, ScoredGroups};
use crate::grpo::sampling::{sample_groups, Round, StepGroups};
use crate::grpo::step::{policy_update, StepResponses};
use crate::inputs::Processor;
use crate::learn::checkpoint::DiskPlan;
use crate::learn::checkpoint::TrainState;
use crate::learn::freeze::count_params;
use crate::learn::metrics::MetricsLog;
use crate::learn::parallel::{run_ranks, shard_range, Rank};
use crate::learn::recipe::Recipe;
use crate::learn::run::{prepare_output_dir, Trainee};
use crate::learn::trainer::{train, Learner, RunSummary, TrainArgs};
use crate::model::{Qwen25VL, Qwen25VlConfig, TrainBackend};
use crate::models::{load_model, model_files_dir};
use crate::rewards;
use crate::sft::plan::param_counts;

/// What a GRPO run reports at its end.
pub type GrpoSummary = RunSummary<RlEval, GrpoEnd>;

/// `infimed grpo`: the plan, then the run.
pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = GrpoRecipe::from_file(&args.recipe, &args.set)?;
    let (backend, ck) = (recipe.backend_args(), recipe.gradient_checkpointing);
    if !args.dry_run {
        probe(backend.backend, backend.device)?;
    }
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
    if let (Some(n), Ok(cfg)) = (
        n_prompts,
        model_files_dir(&recipe.model).and_then(|d| Qwen25VlConfig::from_dir(&d)),
    ) {
        let params = param_counts(&cfg);
        let trainable = params.trainable(&recipe.freeze).total();
        let (steps, p) = (recipe.total_steps(n), params.total());
        let disk = DiskPlan::new(
            p,
            trainable,
            recipe.save_optimizer,
            recipe.precision.bytes(),
            steps,
            recipe.save_every,
            recipe.keep_checkpoints,
        );
        println!("  {disk}");
    }
    if args.dry_run {
        return Ok(());
    }
    let claim = args.claim(&recipe.output_dir, recipe.parallel.node_rank)?;
    let resume = claim.as_ref().is_some_and(|c| c.resume);
    let summary = dispatch_autodiff(backend, ck, GrpoJob { recipe, resume })?;
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

/// A GRPO run on this node's ranks; rank 0's summary.
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
    let data = GrpoData {
        records,
        eval_records,
        eval_prompts,
        skipped,
    };

    let settings = recipe.run_settings(&files, resume);
    let mut summaries = run_ranks::<B::InnerBackend, _, _>(
        &recipe.parallel,
        recipe.backend,
        device,
        |rank, device| {
            train::<B, _>(&settings, &rank, &device, |trainee| {
                GrpoLearner::start(
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

/// What the ranks of a GRPO run share.
struct GrpoData {
    records: Vec<RlRecord>,
    eval_records: Vec<RlRecord>,
    eval_prompts: Vec<Prompt>,
    skipped: Vec<Skipped>,
}

/// The GRPO learner of one rank.
struct GrpoLearner<'a, B: TrainBackend> {
    recipe: &'a GrpoRecipe,
    processor: &'a Processor,
    data: &'a GrpoData,
    rank: Rank,
    device: B::Device,
    total_steps: usize,
    /// The frozen reference policy in the compute dtype (`None` without a KL term).
    reference: Option<Qwen25VL<B::InnerBackend>>,
    stop: Vec<u32>,
    /// The prompt order of the current epoch.
    order: Vec<usize>,
    /// Prompts skipped so far (`skip_invalid`).
    skipped: Vec<Skipped>,
    /// `completions.jsonl` (rank 0, with `log_completions_every > 0`).
    completions: Option<MetricsLog>,
    step_rewards: Vec<f64>,
}

impl<'a, B: TrainBackend> GrpoLearner<'a, B> {
    fn start(
        recipe: &'a GrpoRecipe,
        files: &Path,
        processor: &'a Processor,
        data: &'a GrpoData,
        trainee: &Trainee<B>,
        rank: Rank,
        device: B::Device,
    ) -> Result<Self> {
        let total_steps = recipe.total_steps(data.records.len());
        // The reference is kept in the compute dtype (bf16: half the memory).
        let reference = match recipe.algorithm.kl_coef > 0.0 {
            true => {
                let initial =
                    rank.sync_inner_from_main(load_model(&recipe.model, recipe.seed, &device)?)?;
                Some(compute_model(&initial, recipe.precision))
            }
            false => None,
        };
        let stop = stop_tokens(files, &trainee.model().config.tokens.eos_token_ids)?;
        let main = rank.is_main();
        if main {
            let (trainable, frozen) = count_params(trainee.model());
            eprintln!(
                "grpo: {} prompts, {total_steps} steps x {} prompts x {} responses on {} rank(s), {} updates; {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
                data.records.len(),
                recipe.rollout.prompts_per_step,
                recipe.rollout.n,
                rank.world,
                total_steps * recipe.updates_per_step(),
                B::name(&device),
                recipe.precision,
                recipe.gradient_checkpointing
            );
        }
        let resumed_at = trainee.resumed_from.as_ref().map(|_| trainee.state.step);
        let completions = match main && recipe.log_completions_every > 0 {
            true => Some(MetricsLog::open(
                &recipe.output_dir.join("completions.jsonl"),
                resumed_at,
            )?),
            false => None,
        };
        Ok(Self {
            recipe,
            processor,
            data,
            total_steps,
            reference,
            stop,
            order: epoch_order(data.records.len(), recipe.seed, trainee.state.epoch),
            skipped: data.skipped.clone(),
            completions,
            step_rewards: vec![],
            rank,
            device,
        })
    }
}

impl<B: TrainBackend> Learner<B> for GrpoLearner<'_, B> {
    type Step = GrpoStep;
    type Eval = RlEval;
    type Summary = GrpoEnd;

    fn total_steps(&self) -> usize {
        self.total_steps
    }

    fn step(&mut self, trainee: &mut Trainee<B>) -> Result<GrpoStep> {
        let (recipe, t_step) = (self.recipe, Instant::now());
        // 1-3. Prompts (seeded order), n rollouts each from the policy as it is, rewards and
        //      group advantages: one round, or with dynamic sampling rounds until the step has
        //      prompts_per_step informative groups.
        let t_roll = Instant::now();
        let policy = compute_model(&trainee.model().valid(), recipe.precision);
        let groups = self.sample(&mut trainee.state, &policy)?;
        let rollout_secs = t_roll.elapsed().as_secs_f64();
        let (prompts, scored) = (&groups.prompts, &groups.train);

        // 4. Old (before any update; reused when there is one update per step) and reference
        //    log-probs of this rank's groups, both from logits / temperature.
        let g = recipe.rollout.n;
        let mine = shard_range(prompts.len(), self.rank.rank, self.rank.world);
        let own = mine.start * g..mine.end * g;
        let seqs: Vec<Encoded> = own
            .clone()
            .map(|i| rollout_sequence(&prompts[i / g], &scored.rollouts[i].tokens))
            .collect();
        let pad_id = self.processor.tokenizer.special().pad();
        let (micro, temperature) = (recipe.ppo.micro_batch, recipe.rollout.temperature as f64);
        let logprobs_under =
            |m: &Qwen25VL<B::InnerBackend>| response_logprobs(m, &seqs, pad_id, micro, temperature);
        let old = if recipe.updates_per_step() == 1 {
            None
        } else {
            Some(logprobs_under(&policy)?)
        };
        let reference = self.reference.as_ref().map(logprobs_under).transpose()?;
        drop(policy);

        // 5. Updates: ppo epochs x mini-batches of the GRPO objective, one AdamW step each.
        let t_upd = Instant::now();
        let records = &self.data.records;
        let origins: Vec<String> = scored
            .rollouts
            .iter()
            .map(|r| records[r.record].origin.clone())
            .collect();
        let responses = StepResponses {
            seqs: &seqs,
            first: own.start,
            old: old.as_deref(),
            reference: reference.as_deref(),
            origins: &origins,
        };
        let stats = policy_update(
            trainee,
            recipe,
            scored,
            &responses,
            pad_id,
            self.total_steps,
            &self.rank,
            &self.device,
        )?;
        let update_secs = t_upd.elapsed().as_secs_f64();
        let s = &mut trainee.state;
        s.step += 1;
        s.samples_seen += scored.rollouts.len();
        s.tokens_seen += stats.tokens;

        // 6. The step's record (and its completions).
        let mut record = GrpoStep::new(s, self.data.records.len(), &groups, &stats);
        let gen_tokens: usize = groups.all.rollouts.iter().map(|x| x.tokens.len()).sum();
        record.rollout_tokens_per_s = gen_tokens as f64 / rollout_secs.max(1e-9);
        record.update_tokens_per_s = stats.tokens as f64 / update_secs.max(1e-9);
        record.step_secs = t_step.elapsed().as_secs_f64();
        self.step_rewards.push(record.reward_mean);
        self.log_completions(&mut record, &groups.all)?;
        Ok(record)
    }

    fn validate(&self, model: &Qwen25VL<B::InnerBackend>) -> Result<Option<RlEval>> {
        let (recipe, data) = (self.recipe, self.data);
        if data.eval_records.is_empty() {
            return Ok(None);
        }
        let model = compute_model(model, recipe.precision);
        let cfg = SamplingConfig::greedy(recipe.max_response_len);
        let batch = recipe.rollout.generation_batch;
        let gens = generate_batched(
            &model,
            &data.eval_prompts,
            &cfg,
            &self.stop,
            &mut step_rng(0, 0),
            batch,
            |_, _| {},
        )?;
        let rc = recipe.reward.config();
        let mut scores = vec![];
        for (g, rec) in gens.iter().zip(&data.eval_records) {
            let text = self.processor.tokenizer.decode(&g.tokens, true)?;
            scores.push(rewards::score(&rc, &text, &rec.answer, rec.task));
        }
        Ok(Some(summarize(&scores)))
    }

    const LOGS_END_VALIDATIONS: bool = false;

    fn plots(&self) -> &'static [&'static str] {
        &[
            "reward_mean",
            "accuracy",
            "kl",
            "response_len_mean",
            "entropy",
            "clip_frac",
        ]
    }

    fn finish(self) -> Result<GrpoEnd> {
        if self.rank.is_main() {
            for s in self.skipped.iter().take(10) {
                eprintln!("skipped {}: {}", s.location, s.reason);
            }
        }
        Ok(GrpoEnd::new(self.skipped.len(), &self.step_rewards))
    }
}

impl<B: TrainBackend> GrpoLearner<'_, B> {
    /// The prompts of the picked records: `(prompts, their record indices, prompts skipped
    /// now)`. An invalid or over-long prompt is an error, or with `skip_invalid` a counted skip.
    fn encode_prompts(&mut self, picked: &[usize]) -> Result<(Vec<Prompt>, Vec<usize>, usize)> {
        let recipe = self.recipe;
        let (mut prompts, mut kept, mut skipped_now) = (vec![], vec![], 0usize);
        for &r in picked {
            let rec = &self.data.records[r];
            let p = self
                .processor
                .prompt(&recipe_messages(recipe, rec), &rec.images)
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
                    self.skipped.push(Skipped {
                        location: rec.origin.clone(),
                        reason: format!("{e:#}"),
                    });
                }
                Err(e) => {
                    return Err(
                        e.context("use skip_invalid = true to skip (and count) such prompts")
                    )
                }
            }
        }
        Ok((prompts, kept, skipped_now))
    }

    /// The step's groups ([`sample_groups`]): each round draws the next `prompts_per_step`
    /// prompts of the seeded order, rolls them out and scores them.
    fn sample(
        &mut self,
        state: &mut TrainState,
        policy: &Qwen25VL<B::InnerBackend>,
    ) -> Result<StepGroups> {
        let (recipe, n_records) = (self.recipe, self.data.records.len());
        let (per_step, step) = (recipe.rollout.prompts_per_step, state.step);
        sample_groups(&recipe.algorithm, per_step, recipe.rollout.n, |round| {
            let picked = next_prompts(state, &mut self.order, n_records, per_step, recipe.seed);
            let (prompts, kept, skipped) = self.encode_prompts(&picked)?;
            ensure!(
                !kept.is_empty(),
                "step {}: every prompt of the step was skipped",
                step + 1
            );
            let mine = shard_range(prompts.len(), self.rank.rank, self.rank.world);
            let gens = self.rollouts(policy, &prompts, mine, step, round * per_step)?;
            let scored = self.score(gens, &kept)?;
            Ok(Round {
                prompts,
                scored,
                skipped,
            })
        })
    }

    /// `n` samples of each of this rank's prompts (`mine`), seeded per prompt (the same samples
    /// on any number of ranks; prompt `k` of a step's round starting at prompt `first` has seed
    /// `base + first + k`), gathered from every rank: the round's responses, `n` per prompt.
    fn rollouts(
        &self,
        policy: &Qwen25VL<B::InnerBackend>,
        prompts: &[Prompt],
        mine: std::ops::Range<usize>,
        step: usize,
        first: usize,
    ) -> Result<Vec<Generation>> {
        let (recipe, g) = (self.recipe, self.recipe.rollout.n);
        let base: u64 = step_rng(recipe.seed, step).random();
        // One request per prompt with its n samples: the prompt (and its image) prefilled once.
        let requests: Vec<Request> = mine
            .clone()
            .map(|k| Request {
                prompt: prompts[k].clone(),
                n: g,
                seed: base.wrapping_add((first + k) as u64),
            })
            .collect();
        let engine = EngineConfig {
            max_rows: recipe.rollout.generation_batch,
            max_batch_tokens: recipe.rollout.max_batch_tokens,
        };
        let (groups, _) = generate_requests(
            policy,
            &requests,
            &recipe.sampling(),
            &self.stop,
            &engine,
            |_, _| {},
        )?;
        let local: Vec<Generation> = groups.into_iter().flatten().collect();
        self.rank.all_gather_generations::<B::InnerBackend>(
            local,
            mine.start * g,
            prompts.len() * g,
            &self.device,
        )
    }

    /// Rewards of the step's responses against their records' answers, and the group advantages.
    fn score(&self, gens: Vec<Generation>, kept: &[usize]) -> Result<ScoredGroups> {
        let (recipe, records, g) = (self.recipe, &self.data.records, self.recipe.rollout.n);
        let (rc, alg) = (recipe.reward.config(), &recipe.algorithm);
        let reward = |record: usize, text: &str, len: usize| {
            let rec = &records[record];
            let mut r = rewards::score(&rc, text, &rec.answer, rec.task);
            if alg.overlong_buffer > 0 {
                let (max, buffer) = (recipe.max_response_len, alg.overlong_buffer);
                r.reward += overlong_penalty(len, max, buffer, alg.overlong_penalty);
            }
            r
        };
        score_groups(
            gens.into_iter()
                .enumerate()
                .map(|(i, gen)| (kept[i / g], gen))
                .collect(),
            |tokens| self.processor.tokenizer.decode(tokens, true),
            reward,
            g,
            recipe.algorithm.norm_adv_by_std,
            recipe.algorithm.drop_zero_variance_groups,
        )
    }

    /// Every rollout of every `log_completions_every`-th step to `completions.jsonl` (rank 0), and
    /// a table of the step's first groups to TensorBoard's text tab.
    fn log_completions(&mut self, record: &mut GrpoStep, scored: &ScoredGroups) -> Result<()> {
        let Some(log) = &mut self.completions else {
            return Ok(());
        };
        if !record
            .step
            .is_multiple_of(self.recipe.log_completions_every)
        {
            return Ok(());
        }
        let records = &self.data.records;
        for r in &scored.rollouts {
            let rec = &records[r.record];
            log.write(&serde_json::json!({
                "step": record.step, "origin": rec.origin, "problem": rec.problem, "answer": rec.answer,
                "response": r.text, "task": r.reward.task.as_str(), "format": r.reward.format,
                "accuracy": r.reward.accuracy, "reward": r.reward.reward, "advantage": r.advantage,
            }))?;
        }
        record.completions = Some(completions_table(
            records,
            scored,
            2 * self.recipe.rollout.n,
        ));
        Ok(())
    }
}

/// The chat messages of a record under the recipe's template and system prompt.
fn recipe_messages(recipe: &GrpoRecipe, rec: &RlRecord) -> Vec<crate::data::template::ChatMessage> {
    prompt_messages(
        &recipe.prompt_template,
        recipe.system_prompt.as_deref(),
        rec,
    )
}

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
                .prompt(&recipe_messages(recipe, r), &r.images)
                .with_context(|| r.origin.clone())
        })
        .collect::<Result<_>>()?;
    Ok((recs, prompts))
}

/// The first `limit` rollouts of a step as a Markdown table (TensorBoard's text tab).
fn completions_table(records: &[RlRecord], scored: &ScoredGroups, limit: usize) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    let mut t = String::from(
        "| problem | answer | response | reward | advantage |\n|---|---|---|---|---|\n",
    );
    for r in scored.rollouts.iter().take(limit) {
        let rec = &records[r.record];
        t.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} |\n",
            cell(&rec.problem),
            cell(&rec.answer),
            cell(&r.text),
            r.reward.reward,
            r.advantage
        ));
    }
    t
}
