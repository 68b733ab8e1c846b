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
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::backend::{check_precision, compute_model, dispatch_autodiff, AutodiffJob, BackendArgs};
use crate::data::encode::Encoded;
use crate::data::sharegpt::{split_image_tags, IMAGE_TAG};
use crate::data::template::ChatMessage;
use crate::eval::{for_each_jsonl, Skipped};
use crate::generate::{generate_batched, stop_tokens, Generation, Prompt, SamplingConfig};
use crate::grpo::algos::{agg_loss, group_advantages, kl_penalty, policy_loss, zero_variance_groups, LossAgg};
use crate::grpo::recipe::GrpoRecipe;
use crate::inputs::Processor;
use crate::model::Qwen25VL;
use crate::rewards::{self, RewardBreakdown, Task};
use crate::schedule::lr_at;
use crate::sft::{collate, gather_logprobs, load_model, model_files_dir, target_logits, MicroBatch};
use crate::train::{
    adamw, apply_freeze, assign_stable_param_ids, check_finite, clip_grad_norm, count_params, latest_checkpoint,
    load_checkpoint, plot_metrics, save_checkpoint, MetricsLog, TrainState,
};

// ---------------------------------------------------------------------------------------------
// Data

/// One RL prompt (EasyR1 layout).
#[derive(Debug, Clone, PartialEq)]
pub struct RlRecord {
    /// The question; `<image>` tags mark where the images go.
    pub problem: String,
    /// The ground truth as text (numbers and box lists are kept as their JSON text).
    pub answer: String,
    /// Image paths, relative ones resolved against the data file's folder.
    pub images: Vec<PathBuf>,
    /// The reward's task; inferred from the answer when absent.
    pub task: Option<Task>,
    /// `FILE:LINE`.
    pub origin: String,
}

/// Read EasyR1 JSONL: `{"problem", "answer", "images"?, "task"?}` per line. A malformed line, a
/// missing field or an `<image>` count that differs from the number of images is an error
/// `FILE:LINE: ...`, or with `skip_invalid` a counted skip.
pub fn read_rl_records(path: &Path, skip_invalid: bool) -> Result<(Vec<RlRecord>, Vec<Skipped>)> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = vec![];
    let mut skipped = vec![];
    for_each_jsonl(path, skip_invalid, &mut skipped, |v, location| {
        let obj = v.as_object().ok_or_else(|| anyhow!("expected a JSON object"))?;
        let problem = match obj.get("problem").or_else(|| obj.get("prompt")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("`problem` must be a string, got {other}"),
            None => bail!("missing `problem`"),
        };
        let answer = match obj.get("answer") {
            Some(v) => crate::cli::reward::answer_text(v).ok_or_else(|| anyhow!("`answer` is null"))?,
            None => bail!("missing `answer`"),
        };
        let images: Vec<PathBuf> = match obj.get("images") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => {
                        let p = PathBuf::from(s);
                        Ok(if p.is_absolute() { p } else { base.join(p) })
                    }
                    Value::Object(o) => match o.get("path").or_else(|| o.get("image")) {
                        Some(Value::String(s)) => Ok(base.join(s)),
                        _ => Err(anyhow!("an image entry must be a path string, got {x}")),
                    },
                    other => Err(anyhow!("an image entry must be a path string, got {other}")),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("`images` must be a list, got {other}"),
        };
        let tags = problem.matches(IMAGE_TAG).count();
        ensure!(tags == images.len(), "the problem has {tags} <image> tags but the record has {} images", images.len());
        let task = match obj.get("task") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.parse::<Task>()?),
            Some(other) => bail!("`task` must be a string, got {other}"),
        };
        out.push(RlRecord { problem, answer, images, task, origin: location.to_string() });
        Ok(())
    })?;
    Ok((out, skipped))
}

/// The chat messages of a record under the recipe's template and system prompt.
pub fn prompt_messages(recipe: &GrpoRecipe, rec: &RlRecord) -> Vec<ChatMessage> {
    let mut msgs = vec![];
    if let Some(s) = &recipe.system_prompt {
        msgs.push(ChatMessage::text("system", s.clone()));
    }
    let text = recipe.prompt_template.replace("{problem}", &rec.problem);
    msgs.push(ChatMessage::new("user", split_image_tags(&text)));
    msgs
}

/// The prompt order of one epoch: a permutation of `0..n` seeded by `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// The sampler of rollout step `step`.
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (step as u64).wrapping_add(0x5851_F42D_4C95_7F2D))
}

// ---------------------------------------------------------------------------------------------
// Rollouts

/// One sampled response with its reward and advantage.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of its record in the data file.
    pub record: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stopped: bool,
    pub reward: RewardBreakdown,
    pub advantage: f64,
}

/// The training sequence of a response: prompt + response, labels on the response tokens.
fn rollout_sequence(prompt: &Prompt, tokens: &[u32]) -> Encoded {
    let mut input_ids = prompt.input_ids.clone();
    input_ids.extend_from_slice(tokens);
    let mut labels = vec![None; prompt.input_ids.len()];
    labels.extend(tokens.iter().map(|&t| Some(t)));
    let pixel_rows: usize = prompt.image_grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let pixel_cols = if pixel_rows > 0 { prompt.pixel_values.len() / pixel_rows } else { 0 };
    Encoded {
        input_ids,
        labels,
        pixel_values: prompt.pixel_values.clone(),
        pixel_rows,
        pixel_cols,
        image_grids: prompt.image_grids.clone(),
    }
}

/// Per-token log-probs of a micro-batch's responses as `[rows, max_len]` plus the float mask,
/// from the flat target log-probs (row by row).
fn to_matrix<B: Backend>(flat: Tensor<B, 1>, lens: &[usize]) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let device = flat.device();
    let width = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(lens.len() * width);
    let mut mask = Vec::with_capacity(lens.len() * width);
    let mut off = 0usize;
    for &l in lens {
        for j in 0..width {
            idx.push(if j < l { (off + j) as i64 } else { 0 });
            mask.push(if j < l { 1.0f32 } else { 0.0 });
        }
        off += l;
    }
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [lens.len() * width]), &device);
    let m = flat.select(0, idx).reshape([lens.len(), width]);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [lens.len(), width]), &device);
    (m, mask)
}

/// A host `[rows, max_len]` matrix (zero padded) as a tensor.
fn host_matrix<B: Backend>(rows: &[&[f32]], device: &B::Device) -> Tensor<B, 2> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut v = Vec::with_capacity(rows.len() * width);
    for r in rows {
        v.extend_from_slice(r);
        v.extend(std::iter::repeat_n(0.0, width - r.len()));
    }
    Tensor::from_data(TensorData::new(v, [rows.len(), width]), device)
}

/// Log-probs of each response's tokens under `model` (no gradient), split per response.
fn response_logprobs<B: Backend>(
    model: &Qwen25VL<B>,
    seqs: &[Encoded],
    pad_id: u32,
    micro: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(micro.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let mb = collate(&refs, pad_id);
        let (logits, targets) = target_logits(model, &mb)?;
        let flat: Vec<f32> = gather_logprobs(logits, &targets, temperature).into_data().convert::<f32>().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        let mut off = 0;
        for e in chunk {
            let n = e.labels.iter().skip(1).filter(|l| l.is_some()).count();
            out.push(flat[off..off + n].to_vec());
            off += n;
        }
    }
    Ok(out)
}

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
    let mean = |v: &[&RewardBreakdown], f: fn(&RewardBreakdown) -> f64| v.iter().map(|b| f(b)).sum::<f64>() / v.len().max(1) as f64;
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
fn validate<B: Backend>(
    model: &Qwen25VL<B>,
    recipe: &GrpoRecipe,
    processor: &Processor,
    records: &[RlRecord],
    prompts: &[Prompt],
    stop: &[u32],
) -> Result<RlEval> {
    let cfg = SamplingConfig::greedy(recipe.max_response_len);
    let gens = generate_batched(model, prompts, &cfg, stop, &mut step_rng(0, 0), recipe.rollout.generation_batch, |_, _| {})?;
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
        println!("note: {} does not exist yet; step counts need it", recipe.data.display());
        (None, 0)
    } else {
        let (records, skipped) = read_rl_records(&recipe.data, recipe.skip_invalid)?;
        ensure!(!records.is_empty(), "{}: no RL record", recipe.data.display());
        (Some(records.len()), skipped.len())
    };
    let steps = n_prompts.map(|n| recipe.total_steps(n));
    let show = |x: Option<usize>| x.map_or("?".to_string(), |v| v.to_string());
    println!(
        "grpo plan: {} prompts ({} skipped as invalid), {} per step x n = {} -> {} responses per step\n  \
         {} steps ({} epochs), {} optimizer updates per step (mini-batch {} prompts, micro-batch {} responses, {} ppo epochs), {} updates in all\n  \
         lr {} ({}), kl {} x {}, clip [{}, {}], loss {}, reward {} x format + {} x accuracy ({})",
        show(n_prompts),
        n_skipped,
        recipe.rollout.prompts_per_step,
        recipe.rollout.n,
        recipe.rollout.prompts_per_step * recipe.rollout.n,
        show(steps),
        recipe.epochs,
        recipe.updates_per_step(),
        recipe.ppo.mini_batch,
        recipe.ppo.micro_batch,
        recipe.ppo.epochs,
        show(steps.map(|s| s * recipe.updates_per_step())),
        recipe.optimizer.lr,
        recipe.schedule.kind,
        recipe.algorithm.kl_coef,
        recipe.algorithm.kl_kind,
        1.0 - recipe.algorithm.clip_low,
        1.0 + recipe.algorithm.clip_high,
        recipe.algorithm.loss_agg,
        recipe.reward.format_weight,
        recipe.reward.accuracy_weight,
        recipe.reward.format,
    );
    if args.dry_run {
        return Ok(());
    }
    let backend = BackendArgs { backend: recipe.backend, device: recipe.device, precision: recipe.precision };
    let summary = dispatch_autodiff(backend, recipe.gradient_checkpointing, GrpoJob { recipe, resume: args.resume })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

struct GrpoJob {
    recipe: GrpoRecipe,
    resume: bool,
}

impl AutodiffJob for GrpoJob {
    type Output = GrpoSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<GrpoSummary> {
        train_grpo::<B>(&self.recipe, self.resume, &device)
    }
}

// ---------------------------------------------------------------------------------------------
// The learner

pub fn train_grpo<B: AutodiffBackend>(recipe: &GrpoRecipe, resume: bool, device: &B::Device) -> Result<GrpoSummary> {
    let files = model_files_dir(&recipe.model)?;
    check_precision::<B>(recipe.precision, device)?;
    let processor = Processor::from_dir(&files, recipe.max_pixels)?;
    let out_dir = recipe.output_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(out_dir.join("recipe.toml"), recipe.to_toml_string()?)?;

    // Data.
    let (records, mut skipped) = read_rl_records(&recipe.data, recipe.skip_invalid)?;
    ensure!(!records.is_empty(), "{}: no RL record", recipe.data.display());
    let (eval_records, eval_prompts) = match &recipe.eval_data {
        Some(p) => {
            let (mut recs, s) = read_rl_records(p, recipe.skip_invalid)?;
            skipped.extend(s);
            if recipe.eval_limit > 0 {
                recs.truncate(recipe.eval_limit);
            }
            let prompts: Vec<Prompt> = recs
                .iter()
                .map(|r| processor.prompt(&prompt_messages(recipe, r), &r.images).with_context(|| r.origin.clone()))
                .collect::<Result<_>>()?;
            (recs, prompts)
        }
        None => (vec![], vec![]),
    };
    let total_steps = recipe.total_steps(records.len());
    let ups = recipe.updates_per_step();
    let total_updates = total_steps * ups;
    let (g, temperature) = (recipe.rollout.n, recipe.rollout.temperature as f64);
    let pad_id = processor.tokenizer.special().pad();
    let rc = recipe.reward.config();
    let alg = recipe.algorithm;

    // Policy, reference, optimizer, resume.
    let resume_from = if resume { latest_checkpoint(&out_dir)? } else { None };
    let policy: Qwen25VL<B> = match &resume_from {
        Some(ck) => Qwen25VL::load(&ck.join("hf"), device)?,
        None => load_model(&recipe.model, recipe.seed, device)?,
    };
    let mut model = apply_freeze(assign_stable_param_ids(policy), &recipe.freeze);
    // The frozen reference, kept in the compute dtype (bf16: half the memory).
    let reference: Option<Qwen25VL<B::InnerBackend>> = if alg.kl_coef > 0.0 {
        Some(compute_model(&load_model(&recipe.model, recipe.seed, device)?, recipe.precision))
    } else {
        None
    };
    let stop = stop_tokens(&files, &model.config.tokens.eos_token_ids)?;
    let (trainable, frozen) = count_params(&model);
    let mut optim = adamw(&recipe.optimizer).init::<B, Qwen25VL<B>>();
    let mut state = TrainState { seed: recipe.seed, ..Default::default() };
    if let Some(ck) = &resume_from {
        let (o, s) = load_checkpoint::<B>(ck, optim, device)?;
        optim = o;
        state = s;
        eprintln!("resuming from {} (step {})", ck.display(), state.step);
    }
    eprintln!(
        "grpo: {} prompts, {total_steps} steps x {} prompts x {g} responses, {total_updates} updates; {trainable} trainable / {frozen} frozen parameters; {} ({}, gradient checkpointing {})",
        records.len(),
        recipe.rollout.prompts_per_step,
        B::name(device),
        recipe.precision,
        if recipe.gradient_checkpointing { "on" } else { "off" }
    );
    let mut metrics = MetricsLog::open(&out_dir.join("metrics.jsonl"), resume_from.as_ref().map(|_| state.step))?;
    let mut completions = if recipe.log_completions_every > 0 {
        let p = out_dir.join("completions.jsonl");
        let f = if resume_from.is_some() {
            std::fs::OpenOptions::new().create(true).append(true).open(&p)
        } else {
            std::fs::File::create(&p)
        }
        .with_context(|| format!("opening {}", p.display()))?;
        Some(std::io::BufWriter::new(f))
    } else {
        None
    };

    let eval_before = if !eval_records.is_empty() && resume_from.is_none() {
        let r = validate(&compute_model(&model.valid(), recipe.precision), recipe, &processor, &eval_records, &eval_prompts, &stop)?;
        eprintln!("validation before: reward {:.3}, accuracy {:.1}%, format {:.1}% ({} prompts)", r.reward, 100.0 * r.accuracy, 100.0 * r.format, r.n);
        Some(r)
    } else {
        None
    };

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}").expect("progress template"));
    bar.set_position(state.step as u64);
    let mut order = epoch_order(records.len(), recipe.seed, state.epoch);
    let mut step_rewards: Vec<f64> = vec![];

    while state.step < total_steps {
        let t_step = Instant::now();
        // 1. Prompts of this step (wrapping into the next epoch's order).
        let mut picked: Vec<usize> = vec![];
        while picked.len() < recipe.rollout.prompts_per_step {
            if state.batch_in_epoch >= order.len() {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                order = epoch_order(records.len(), recipe.seed, state.epoch);
            }
            picked.push(order[state.batch_in_epoch]);
            state.batch_in_epoch += 1;
        }
        let mut prompts: Vec<Prompt> = Vec::with_capacity(picked.len());
        let mut kept: Vec<usize> = vec![];
        let mut skipped_now = 0usize;
        for &r in &picked {
            let rec = &records[r];
            let p = processor.prompt(&prompt_messages(recipe, rec), &rec.images).with_context(|| rec.origin.clone());
            let p = match p {
                Ok(p) if p.input_ids.len() <= recipe.max_prompt_len => Ok(p),
                Ok(p) => Err(anyhow!("{}: prompt of {} tokens is over max_prompt_len {}", rec.origin, p.input_ids.len(), recipe.max_prompt_len)),
                Err(e) => Err(e),
            };
            match p {
                Ok(p) => {
                    prompts.push(p);
                    kept.push(r);
                }
                Err(e) if recipe.skip_invalid => {
                    skipped_now += 1;
                    skipped.push(Skipped { location: rec.origin.clone(), reason: format!("{e:#}") });
                }
                Err(e) => return Err(e.context("use skip_invalid = true to skip (and count) such prompts")),
            }
        }
        ensure!(!kept.is_empty(), "step {}: every prompt of the step was skipped", state.step + 1);

        // 2. Rollouts: n samples per prompt.
        let expanded: Vec<Prompt> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
        let sampling = SamplingConfig {
            temperature: recipe.rollout.temperature,
            top_k: recipe.rollout.top_k,
            top_p: recipe.rollout.top_p,
            max_new_tokens: recipe.max_response_len,
        };
        let t_roll = Instant::now();
        let inner = compute_model(&model.valid(), recipe.precision);
        let gens: Vec<Generation> = generate_batched(
            &inner,
            &expanded,
            &sampling,
            &stop,
            &mut step_rng(recipe.seed, state.step),
            recipe.rollout.generation_batch,
            |_, _| {},
        )?;
        let rollout_secs = t_roll.elapsed().as_secs_f64();
        let gen_tokens: usize = gens.iter().map(|x| x.tokens.len()).sum();

        // 3. Rewards and advantages.
        let mut rollouts: Vec<Rollout> = Vec::with_capacity(gens.len());
        for (i, gen) in gens.into_iter().enumerate() {
            let rec = &records[kept[i / g]];
            let text = processor.tokenizer.decode(&gen.tokens, true)?;
            let reward = rewards::score(&rc, &text, &rec.answer, rec.task);
            rollouts.push(Rollout { record: kept[i / g], tokens: gen.tokens, text, stopped: gen.stopped, reward, advantage: 0.0 });
        }
        let rewards_v: Vec<f64> = rollouts.iter().map(|r| r.reward.reward).collect();
        let adv = group_advantages(&rewards_v, g, alg.norm_adv_by_std);
        for (r, a) in rollouts.iter_mut().zip(&adv) {
            r.advantage = *a;
        }
        let zero_var = zero_variance_groups(&rewards_v, g);
        let groups = kept.len();
        let use_group: Vec<bool> = rewards_v
            .chunks(g)
            .map(|grp| !(alg.drop_zero_variance_groups && grp.iter().all(|&x| x == grp[0])))
            .collect();
        let seqs: Vec<Encoded> = rollouts.iter().enumerate().map(|(i, r)| rollout_sequence(&prompts[i / g], &r.tokens)).collect();
        let lens: Vec<usize> = rollouts.iter().map(|r| r.tokens.len()).collect();

        // 4. Old and reference log-probs (before any update), logits / temperature.
        let single_pass = ups == 1;
        let old_lp = if single_pass { None } else { Some(response_logprobs(&inner, &seqs, pad_id, recipe.ppo.micro_batch, temperature)?) };
        let ref_lp = match &reference {
            Some(r) => Some(response_logprobs(r, &seqs, pad_id, recipe.ppo.micro_batch, temperature)?),
            None => None,
        };
        drop(inner);

        // 5. Updates: ppo epochs x mini-batches, each one optimizer step.
        let t_upd = Instant::now();
        let mut upd_tokens = 0usize;
        let (mut pg_sum, mut kl_sum, mut clip_sum, mut ent_sum, mut tok_sum, mut ent_tok) = (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
        let mut grad_norms = vec![];
        let mut lr = 0.0;
        let groups_per_mini = recipe.ppo.mini_batch;
        for epoch in 0..recipe.ppo.epochs {
            for mini_start in (0..recipe.rollout.prompts_per_step).step_by(groups_per_mini) {
                let update_idx = state.step * ups + epoch * (recipe.rollout.prompts_per_step / groups_per_mini) + mini_start / groups_per_mini;
                lr = lr_at(&recipe.schedule, recipe.optimizer.lr, update_idx, total_updates);
                let members: Vec<usize> = (mini_start..(mini_start + groups_per_mini).min(groups))
                    .filter(|&k| use_group[k])
                    .flat_map(|k| k * g..(k + 1) * g)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let mini_tokens: usize = members.iter().map(|&i| lens[i]).sum();
                let mini_rows = members.len();
                let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();
                for micro in members.chunks(recipe.ppo.micro_batch) {
                    let refs: Vec<&Encoded> = micro.iter().map(|&i| &seqs[i]).collect();
                    let mb: MicroBatch = collate(&refs, pad_id);
                    let micro_lens: Vec<usize> = micro.iter().map(|&i| lens[i]).collect();
                    let micro_tokens: usize = micro_lens.iter().sum();
                    let compute = compute_model(&model, recipe.precision);
                    let (logits, targets) = target_logits(&compute, &mb)?;
                    if epoch == 0 {
                        // Entropy of the sampling distribution (metric only, detached).
                        let lp = log_softmax(crate::model::nn::upcast(logits.clone().detach()).div_scalar(temperature), 1);
                        let ent = (lp.clone().exp() * lp).sum_dim(1).neg().sum().into_scalar().elem::<f64>();
                        ent_sum += ent;
                        ent_tok += micro_tokens;
                    }
                    let flat = gather_logprobs(logits, &targets, temperature);
                    let (logp, mask) = to_matrix(flat, &micro_lens);
                    let old = match &old_lp {
                        Some(o) => host_matrix::<B>(&micro.iter().map(|&i| o[i].as_slice()).collect::<Vec<_>>(), device),
                        None => logp.clone().detach(),
                    };
                    let advs: Vec<f32> = micro.iter().map(|&i| rollouts[i].advantage as f32).collect();
                    let adv_t = Tensor::<B, 1>::from_data(TensorData::new(advs, [micro.len()]), device);
                    let scale = match alg.loss_agg {
                        LossAgg::TokenMean => micro_tokens as f64 / mini_tokens.max(1) as f64,
                        _ => micro.len() as f64 / mini_rows as f64,
                    };
                    let pg = policy_loss(logp.clone(), old, adv_t, mask.clone(), alg.clip_low, alg.clip_high, alg.dual_clip, alg.loss_agg);
                    let mut loss = pg.loss.clone().mul_scalar(scale);
                    if let (Some(r), true) = (&ref_lp, alg.kl_coef > 0.0) {
                        let ref_m = host_matrix::<B>(&micro.iter().map(|&i| r[i].as_slice()).collect::<Vec<_>>(), device);
                        let kl_tok = kl_penalty(logp, ref_m, alg.kl_kind);
                        let kl = agg_loss(kl_tok.clone(), mask.clone(), alg.loss_agg);
                        if epoch == 0 {
                            let kl_mean = crate::grpo::algos::masked_mean(kl_tok.detach(), mask.clone()).into_scalar().elem::<f64>();
                            kl_sum += kl_mean * micro_tokens as f64;
                        }
                        loss = loss + kl.mul_scalar(alg.kl_coef * scale);
                    }
                    let value = loss.clone().into_scalar().elem::<f64>();
                    check_finite(value, state.step + 1, &format!("mini-batch at prompt {mini_start}, ppo epoch {epoch}"))?;
                    if epoch == 0 {
                        pg_sum += pg.loss.into_scalar().elem::<f64>() * micro_tokens as f64;
                        clip_sum += pg.clip_frac.into_scalar().elem::<f64>() * micro_tokens as f64;
                        tok_sum += micro_tokens;
                    }
                    upd_tokens += mb.input.input_ids.iter().map(Vec::len).sum::<usize>();
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    acc.accumulate(&model, grads);
                }
                let mut grads = acc.grads();
                grad_norms.push(clip_grad_norm(&model, &mut grads, recipe.optimizer.max_grad_norm));
                model = optim.step(lr, model, grads);
            }
        }
        let update_secs = t_upd.elapsed().as_secs_f64();
        state.step += 1;
        state.samples_seen += rollouts.len();
        state.tokens_seen += upd_tokens;

        // 6. Metrics.
        let breakdowns: Vec<RewardBreakdown> = rollouts.iter().map(|r| r.reward.clone()).collect();
        let s = summarize(&breakdowns);
        let n_r = rewards_v.len() as f64;
        let reward_std = (rewards_v.iter().map(|r| (r - s.reward).powi(2)).sum::<f64>() / (n_r - 1.0).max(1.0)).sqrt();
        let per = |x: f64| if tok_sum > 0 { x / tok_sum as f64 } else { 0.0 };
        let m = json!({
            "step": state.step, "epoch": state.epoch as f64 + state.batch_in_epoch as f64 / records.len() as f64, "lr": lr,
            "reward_mean": s.reward, "reward_std": reward_std, "format_rate": s.format, "accuracy": s.accuracy, "by_task": s.by_task,
            "kl": per(kl_sum), "pg_loss": per(pg_sum), "clip_frac": per(clip_sum),
            "entropy": if ent_tok > 0 { ent_sum / ent_tok as f64 } else { 0.0 },
            "response_len_mean": lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
            "response_len_max": lens.iter().copied().max().unwrap_or(0),
            "stopped_frac": rollouts.iter().filter(|r| r.stopped).count() as f64 / n_r,
            "zero_variance_groups": zero_var, "zero_variance_frac": zero_var as f64 / groups as f64,
            "grad_norm": grad_norms.iter().copied().fold(0.0, f64::max),
            "rollout_tokens_per_s": gen_tokens as f64 / rollout_secs.max(1e-9),
            "update_tokens_per_s": upd_tokens as f64 / update_secs.max(1e-9),
            "step_secs": t_step.elapsed().as_secs_f64(), "skipped_prompts": skipped_now,
        });
        step_rewards.push(s.reward);
        if state.step % recipe.log_every.max(1) == 0 || state.step == total_steps {
            metrics.write(&m)?;
        }
        if let Some(w) = completions.as_mut() {
            if state.step % recipe.log_completions_every == 0 {
                for r in &rollouts {
                    let rec = &records[r.record];
                    serde_json::to_writer(
                        &mut *w,
                        &json!({"step": state.step, "origin": rec.origin, "problem": rec.problem, "answer": rec.answer,
                                "response": r.text, "task": r.reward.task.as_str(), "format": r.reward.format,
                                "accuracy": r.reward.accuracy, "reward": r.reward.reward, "advantage": r.advantage}),
                    )?;
                    w.write_all(b"\n")?;
                }
                w.flush()?;
            }
        }
        bar.set_message(format!(
            "reward {:.3} acc {:.1}% kl {:.4} len {:.1} {:.0} tok/s",
            s.reward,
            100.0 * s.accuracy,
            per(kl_sum),
            m["response_len_mean"].as_f64().unwrap_or(0.0),
            gen_tokens as f64 / rollout_secs.max(1e-9)
        ));
        bar.inc(1);
        if recipe.eval_every > 0 && state.step % recipe.eval_every == 0 && state.step < total_steps && !eval_records.is_empty() {
            let r = validate(&compute_model(&model.valid(), recipe.precision), recipe, &processor, &eval_records, &eval_prompts, &stop)?;
            bar.println(format!("step {}: validation reward {:.3}, accuracy {:.1}%", state.step, r.reward, 100.0 * r.accuracy));
            metrics.write(&json!({"step": state.step, "val_reward": r.reward, "val_accuracy": r.accuracy, "val_format": r.format}))?;
        }
        if recipe.save_every > 0 && state.step % recipe.save_every == 0 && state.step < total_steps {
            save_checkpoint(&out_dir, &model, &optim, &state, &files)?;
        }
    }
    bar.finish_and_clear();

    save_checkpoint(&out_dir, &model, &optim, &state, &files)?;
    let inner = model.valid();
    let dtype = match recipe.precision {
        crate::recipe::Precision::Bf16 => crate::model::SaveDtype::BF16,
        _ => crate::model::SaveDtype::F32,
    };
    inner.save(&out_dir, dtype, 4 << 30)?;
    crate::model::copy_aux_files(&files, &out_dir)?;
    let eval_after = if !eval_records.is_empty() {
        let r = validate(&compute_model(&inner, recipe.precision), recipe, &processor, &eval_records, &eval_prompts, &stop)?;
        eprintln!("validation after: reward {:.3}, accuracy {:.1}%, format {:.1}% ({} prompts)", r.reward, 100.0 * r.accuracy, 100.0 * r.format, r.n);
        Some(r)
    } else {
        None
    };
    plot_metrics(metrics.path(), &["reward_mean", "accuracy", "kl", "response_len_mean", "entropy", "clip_frac"], &out_dir)?;
    for s in skipped.iter().take(10) {
        eprintln!("skipped {}: {}", s.location, s.reason);
    }
    let k = step_rewards.len().min(10);
    let mean = |v: &[f64]| if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) };
    Ok(GrpoSummary {
        steps: state.step,
        output_dir: out_dir,
        skipped_records: skipped.len(),
        reward_first10: mean(&step_rewards[..k]),
        reward_last10: mean(&step_rewards[step_rewards.len() - k..]),
        eval_before,
        eval_after,
    })
}
