//! The GRPO recipe (`infimed grpo --recipe R [--set key=value ...]`), TOML with unknown keys
//! rejected. Defaults follow verl / EasyR1 where the paper is silent (see
//! `recipes/infimed-rl-3b.toml` for the paper's values and where each comes from).
//!
//! Batch sizes count what verl counts: `rollout.prompts_per_step` prompts are sampled per step,
//! each `rollout.n` times (the group); `ppo.mini_batch` counts prompts per optimizer update
//! (x n responses); `ppo.micro_batch` counts responses per forward/backward; every rollout is
//! used for `ppo.epochs` passes, so one step makes `prompts_per_step / mini_batch * epochs`
//! optimizer updates, and the lr schedule runs over all of them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendArgs, BackendKind};
use crate::grpo::algos::{KlKind, LossAgg};
use crate::learn::freeze::FreezeConfig;
use crate::learn::optim::OptimizerConfig;
use crate::learn::recipe::{check_model, check_precision_backend, Precision, Recipe};
use crate::learn::run::{NanPolicy, TraineeSpec};
use crate::learn::schedule::{ScheduleConfig, ScheduleKind};
use crate::learn::trainer::RunSettings;
use crate::rewards::{FormatKind, RewardConfig};

/// How prompts are sampled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per step (verl `data.rollout_batch_size` / `train_batch_size`).
    pub prompts_per_step: usize,
    /// Responses per prompt: the group size G.
    pub n: usize,
    #[serde(default = "one_f")]
    pub temperature: f32,
    #[serde(default = "one_f")]
    pub top_p: f32,
    /// 0 = off.
    #[serde(default)]
    pub top_k: usize,
    /// Sequences generated together at most (a performance knob, not an algorithm setting).
    #[serde(default = "default_gen_batch")]
    pub generation_batch: usize,
    /// Tokens the rollout engine's cache may hold at most (each running prompt once plus `n x
    /// max_response_len`); 0: limited by `generation_batch` only. vLLM's `max_num_batched_tokens`.
    #[serde(default)]
    pub max_batch_tokens: usize,
}

/// How each rollout batch is used for updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// Prompts per optimizer update (x n responses). Must divide `rollout.prompts_per_step`.
    pub mini_batch: usize,
    /// Responses per forward/backward (gradient accumulation inside a mini-batch).
    pub micro_batch: usize,
    /// Passes over each rollout batch.
    #[serde(default = "one")]
    pub epochs: usize,
}

/// The GRPO objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmConfig {
    #[serde(default = "clip")]
    pub clip_low: f64,
    #[serde(default = "clip")]
    pub clip_high: f64,
    /// verl's dual clip bound c (3.0); omit to turn it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dual_clip: Option<f64>,
    /// Coefficient of the KL loss term (0 = no reference model is kept).
    #[serde(default = "kl_coef")]
    pub kl_coef: f64,
    #[serde(default)]
    pub kl_kind: KlKind,
    #[serde(default)]
    pub loss_agg: LossAgg,
    /// false: `A = r - mean` (Dr.GRPO).
    #[serde(default = "yes")]
    pub norm_adv_by_std: bool,
    /// Leave groups whose rewards are all equal (advantage 0) out of the update.
    #[serde(default)]
    pub drop_zero_variance_groups: bool,
    /// `"vanilla"` (PPO's token ratio, verl's `compute_policy_loss_vanilla`) or `"gspo"` (the
    /// sequence-level ratio, `compute_policy_loss_gspo`; needs `loss_agg = "seq_mean_token_mean"`).
    #[serde(default)]
    pub policy_loss: PolicyLoss,
    /// Entropy bonus: `loss -= entropy_coef x agg_loss(entropy)` (verl's `entropy_coeff`, 0 = off).
    /// It runs the full logits of every response token through autodiff (memory ~ tokens x vocab).
    #[serde(default)]
    pub entropy_coef: f64,
    /// Responses cut at `max_response_len` (no stop token) add no loss (DAPO's overlong filter).
    #[serde(default)]
    pub mask_truncated: bool,
    /// DAPO's soft overlong penalty: the last `overlong_buffer` tokens before `max_response_len`
    /// lower the reward linearly down to `-overlong_penalty` (0 = off).
    #[serde(default)]
    pub overlong_buffer: usize,
    #[serde(default = "one_f64")]
    pub overlong_penalty: f64,
    /// `"tis"`: the policy loss is weighted by `min(p_trainer / p_rollout, rollout_is_cap)` per token
    /// (truncated importance sampling against the rollout engine's log-probs); omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_is: Option<RolloutIs>,
    /// TIS's cap C (verl's `rollout_is_threshold`).
    #[serde(default = "two")]
    pub rollout_is_cap: f64,
    /// DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts are
    /// drawn and rolled out until the step has `rollout.prompts_per_step` informative groups, at
    /// most `max_sampling_rounds` rounds of `prompts_per_step` prompts (then the step trains on
    /// the informative groups it has).
    #[serde(default)]
    pub dynamic_sampling: bool,
    #[serde(default = "default_rounds")]
    pub max_sampling_rounds: usize,
}

/// `algorithm.policy_loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLoss {
    #[default]
    Vanilla,
    Gspo,
}

/// `algorithm.rollout_is`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutIs {
    /// Token-level truncated importance sampling (verl `rollout_is = "token"`, TRL's TIS).
    Tis,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        Self {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: None,
            kl_coef: 1e-2,
            kl_kind: KlKind::LowVarKl,
            loss_agg: LossAgg::TokenMean,
            norm_adv_by_std: true,
            drop_zero_variance_groups: false,
            policy_loss: PolicyLoss::Vanilla,
            entropy_coef: 0.0,
            mask_truncated: false,
            overlong_buffer: 0,
            overlong_penalty: 1.0,
            rollout_is: None,
            rollout_is_cap: 2.0,
            dynamic_sampling: false,
            max_sampling_rounds: 10,
        }
    }
}

/// `[reward]`: total = format_weight x F + accuracy_weight x A x F.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardRecipe {
    #[serde(default)]
    pub format: FormatKind,
    #[serde(default = "fw")]
    pub format_weight: f64,
    #[serde(default = "aw")]
    pub accuracy_weight: f64,
}

impl Default for RewardRecipe {
    fn default() -> Self {
        Self {
            format: FormatKind::ThinkBoxed,
            format_weight: 0.1,
            accuracy_weight: 0.9,
        }
    }
}

impl RewardRecipe {
    pub fn config(&self) -> RewardConfig {
        RewardConfig {
            format: self.format,
            format_weight: self.format_weight,
            accuracy_weight: self.accuracy_weight,
        }
    }
}

/// A whole GRPO run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoRecipe {
    /// The policy's initial weights (usually the SFT output): HF folder or `builtin:NAME`.
    pub model: String,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<usize>,
    #[serde(default)]
    pub precision: Precision,
    /// What the backward pass recomputes: `false` / `"off"`, `true` / `"balanced"` (burn's
    /// balanced checkpointing), `"layer"` (HF's per-layer checkpointing); see
    /// [`crate::backend::GradientCheckpointing`].
    #[serde(default)]
    pub gradient_checkpointing: crate::backend::GradientCheckpointing,
    /// EasyR1 JSONL: `{"problem": "...<image>...", "answer": ..., "images": [...], "task"?: ...}`.
    pub data: PathBuf,
    /// Validation prompts in the same form (greedy, before/after and every `eval_every` steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    /// At most this many validation prompts (0 = all).
    #[serde(default)]
    pub eval_limit: usize,
    /// The user message: `{problem}` is replaced by the record's problem (its `<image>` tags
    /// mark where the images go).
    #[serde(default = "default_template")]
    pub prompt_template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pixels: Option<usize>,
    /// Longer prompts are an error, or skipped and counted with `skip_invalid`.
    #[serde(default = "default_len")]
    pub max_prompt_len: usize,
    /// max_new_tokens of the rollouts.
    #[serde(default = "default_len")]
    pub max_response_len: usize,
    #[serde(default)]
    pub skip_invalid: bool,

    #[serde(default)]
    pub freeze: FreezeConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default = "constant_schedule")]
    pub schedule: ScheduleConfig,
    pub rollout: RolloutConfig,
    pub ppo: PpoConfig,
    #[serde(default)]
    pub algorithm: AlgorithmConfig,
    #[serde(default)]
    pub reward: RewardRecipe,

    /// Passes over the prompts (fractional allowed); the run has
    /// `ceil(epochs x prompts / prompts_per_step)` steps unless `max_steps` caps it.
    #[serde(default = "one_f64")]
    pub epochs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub output_dir: PathBuf,
    /// Checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Complete checkpoints kept: the newest N, older ones removed once a newer one is complete
    /// (HF's `save_total_limit`; 0 = all). The default 2 keeps ~75 GiB for the 3B recipes
    /// (f32 weights + AdamW moments: ~37 GiB a checkpoint) instead of ~1 TB over a paper run.
    #[serde(default = "crate::learn::recipe::default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Checkpoints hold AdamW's moments (exact resume); `false`: weights only (a third of the
    /// size; a resume then starts the moments from zero).
    #[serde(default = "crate::learn::recipe::yes")]
    pub save_optimizer: bool,
    /// An update whose loss or gradient norm is not finite: `"stop"` the run (an error naming
    /// the step, its samples and the last good checkpoint) or `"skip"` it (counted in the
    /// metrics as `skipped_updates`).
    #[serde(default)]
    pub nan_policy: NanPolicy,
    /// Greedy validation every N steps (0 = only before and after).
    #[serde(default)]
    pub eval_every: usize,
    #[serde(default = "one")]
    pub log_every: usize,
    /// Write every completion of a step to completions.jsonl every N steps (0 = never).
    #[serde(default)]
    pub log_completions_every: usize,
    /// Data parallelism: devices of this node, nodes (see [`crate::learn::parallel`]).
    #[serde(default)]
    pub parallel: crate::learn::parallel::ParallelConfig,
}

fn one() -> usize {
    1
}
fn one_f() -> f32 {
    1.0
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn two() -> f64 {
    2.0
}
fn default_rounds() -> usize {
    10
}
fn clip() -> f64 {
    0.2
}
fn kl_coef() -> f64 {
    1e-2
}
fn fw() -> f64 {
    0.1
}
fn aw() -> f64 {
    0.9
}
fn default_gen_batch() -> usize {
    64
}
fn default_len() -> usize {
    2048
}
fn default_seed() -> u64 {
    42
}
fn default_backend() -> BackendKind {
    BackendKind::cpu_default()
}
fn default_template() -> String {
    "{problem}".into()
}
fn constant_schedule() -> ScheduleConfig {
    ScheduleConfig {
        kind: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        min_lr_ratio: 0.0,
    }
}

impl Recipe for GrpoRecipe {
    /// Every problem of this recipe, each naming its field.
    fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        check_model(&self.model, "model", &mut e);
        check_precision_backend(self.precision, self.backend, &mut e);
        self.parallel.check(&mut e);
        if !self.prompt_template.contains("{problem}") {
            e.push(format!(
                "prompt_template must contain {{problem}}, got {:?}",
                self.prompt_template
            ));
        }
        self.freeze.check("freeze", &mut e);
        self.optimizer.check("optimizer", &mut e);
        self.schedule.check("schedule", &mut e);
        let r = &self.rollout;
        if r.prompts_per_step == 0 {
            e.push("rollout.prompts_per_step must be >= 1".into());
        }
        if r.n < 2 {
            e.push(format!(
                "rollout.n (the group size) must be >= 2 for group-normalised advantages, got {}",
                r.n
            ));
        }
        if !(r.temperature.is_finite() && r.temperature > 0.0) {
            e.push(format!(
                "rollout.temperature must be > 0 (GRPO samples), got {}",
                r.temperature
            ));
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            e.push(format!("rollout.top_p must be in (0, 1], got {}", r.top_p));
        }
        if r.generation_batch == 0 {
            e.push("rollout.generation_batch must be >= 1".into());
        }
        let p = &self.ppo;
        if p.mini_batch == 0 || !r.prompts_per_step.is_multiple_of(p.mini_batch.max(1)) {
            e.push(format!(
                "ppo.mini_batch ({}) must be >= 1 and divide rollout.prompts_per_step ({})",
                p.mini_batch, r.prompts_per_step
            ));
        }
        if p.micro_batch == 0 {
            e.push("ppo.micro_batch must be >= 1".into());
        }
        if p.epochs == 0 {
            e.push("ppo.epochs must be >= 1".into());
        }
        let a = &self.algorithm;
        if !(a.clip_low >= 0.0 && a.clip_low < 1.0) {
            e.push(format!(
                "algorithm.clip_low must be in [0, 1), got {}",
                a.clip_low
            ));
        }
        if !(a.clip_high >= 0.0 && a.clip_high.is_finite()) {
            e.push(format!(
                "algorithm.clip_high must be >= 0, got {}",
                a.clip_high
            ));
        }
        if let Some(c) = a.dual_clip {
            if c.is_nan() || c <= 1.0 {
                e.push(format!("algorithm.dual_clip must be > 1, got {c}"));
            }
        }
        if !(a.kl_coef >= 0.0 && a.kl_coef.is_finite()) {
            e.push(format!("algorithm.kl_coef must be >= 0, got {}", a.kl_coef));
        }
        self.check_extensions(&mut e);
        let w = &self.reward;
        if !(w.format_weight >= 0.0
            && w.accuracy_weight >= 0.0
            && (w.format_weight + w.accuracy_weight - 1.0).abs() < 1e-9)
        {
            e.push(format!(
                "reward.format_weight + reward.accuracy_weight must be 1 (both >= 0), got {} + {}",
                w.format_weight, w.accuracy_weight
            ));
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            e.push(format!("epochs must be > 0, got {}", self.epochs));
        }
        if self.max_steps == Some(0) {
            e.push("max_steps must be >= 1 when set".into());
        }
        if self.max_prompt_len == 0 || self.max_response_len == 0 {
            e.push("max_prompt_len and max_response_len must be >= 1".into());
        }
        e
    }
}

impl GrpoRecipe {
    /// The checks of GSPO, the entropy bonus, overlong handling, TIS and dynamic sampling.
    fn check_extensions(&self, e: &mut Vec<String>) {
        let a = &self.algorithm;
        if a.policy_loss == PolicyLoss::Gspo && a.loss_agg != LossAgg::SeqMeanTokenMean {
            e.push(format!(
                "algorithm.loss_agg must be \"seq_mean_token_mean\" with policy_loss = \"gspo\" \
                 (verl's compute_policy_loss_gspo aggregates so), got \"{}\"",
                a.loss_agg
            ));
        }
        if a.policy_loss == PolicyLoss::Gspo && a.dual_clip.is_some() {
            e.push("algorithm.dual_clip is not used by policy_loss = \"gspo\"; remove it".into());
        }
        if !(a.entropy_coef >= 0.0 && a.entropy_coef.is_finite()) {
            e.push(format!(
                "algorithm.entropy_coef must be >= 0, got {}",
                a.entropy_coef
            ));
        }
        if a.overlong_buffer > self.max_response_len {
            e.push(format!(
                "algorithm.overlong_buffer ({}) must be <= max_response_len ({})",
                a.overlong_buffer, self.max_response_len
            ));
        }
        if !(a.overlong_penalty >= 0.0 && a.overlong_penalty.is_finite()) {
            e.push(format!(
                "algorithm.overlong_penalty must be >= 0, got {}",
                a.overlong_penalty
            ));
        }
        if !(a.rollout_is_cap > 0.0 && a.rollout_is_cap.is_finite()) {
            e.push(format!(
                "algorithm.rollout_is_cap must be > 0, got {}",
                a.rollout_is_cap
            ));
        }
        if a.max_sampling_rounds == 0 {
            e.push("algorithm.max_sampling_rounds must be >= 1".into());
        }
    }

    /// Rollout steps for `n_prompts` training prompts.
    pub fn total_steps(&self, n_prompts: usize) -> usize {
        let per_epoch = n_prompts as f64 / self.rollout.prompts_per_step as f64;
        let steps = (per_epoch * self.epochs).ceil().max(1.0) as usize;
        self.max_steps.map_or(steps, |m| m.min(steps))
    }

    /// Optimizer updates per rollout step.
    pub fn updates_per_step(&self) -> usize {
        self.rollout.prompts_per_step / self.ppo.mini_batch * self.ppo.epochs
    }

    /// How rollouts are sampled (temperature, top-p/k, up to `max_response_len` new tokens).
    pub fn sampling(&self) -> crate::generate::SamplingConfig {
        crate::generate::SamplingConfig {
            temperature: self.rollout.temperature,
            top_k: self.rollout.top_k,
            top_p: self.rollout.top_p,
            max_new_tokens: self.max_response_len,
        }
    }

    /// How the training loop runs this recipe.
    pub fn run_settings<'a>(&'a self, files: &'a Path, resume: bool) -> RunSettings<'a> {
        RunSettings {
            name: "grpo",
            trainee: TraineeSpec {
                model: &self.model,
                seed: self.seed,
                freeze: &self.freeze,
                optimizer: &self.optimizer,
                precision: self.precision,
                checkpointing: self.gradient_checkpointing,
                nan_policy: self.nan_policy,
                save_optimizer: self.save_optimizer,
                out_dir: &self.output_dir,
                resume,
            },
            files,
            log_every: self.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
        }
    }

    pub fn backend_args(&self) -> BackendArgs {
        BackendArgs {
            backend: self.backend,
            device: self.device,
            precision: self.precision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
model = "builtin:demo-tiny"
data = "rl.jsonl"
output_dir = "out"
[optimizer]
lr = 1e-6
[rollout]
prompts_per_step = 8
n = 4
[ppo]
mini_batch = 4
micro_batch = 8
"#;

    #[test]
    fn defaults_follow_verl() {
        let r = GrpoRecipe::from_str_with(MIN, "t.toml", &[]).unwrap();
        assert_eq!(r.algorithm, AlgorithmConfig::default());
        assert_eq!(r.reward.config(), RewardConfig::default());
        assert_eq!(r.schedule.kind, ScheduleKind::Constant);
        assert_eq!(r.updates_per_step(), 2);
        assert_eq!(r.total_steps(20), 3);
        assert_eq!(r.rollout.temperature, 1.0);
    }

    #[test]
    fn bad_values_are_named() {
        let err = GrpoRecipe::from_str_with(
            MIN,
            "t.toml",
            &["ppo.mini_batch=3".into(), "rollout.n=1".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("t.toml: ppo.mini_batch (3)"), "{err}");
        assert!(err.contains("rollout.n"), "{err}");
        let err =
            GrpoRecipe::from_str_with(&format!("{MIN}\n[algorithm]\nclip = 0.2\n"), "t.toml", &[])
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `clip`"), "{err}");
    }

    #[test]
    fn extensions_parse_and_bad_values_are_named() {
        let sets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = GrpoRecipe::from_str_with(
            MIN,
            "t.toml",
            &sets(&[
                "algorithm.policy_loss=\"gspo\"",
                "algorithm.loss_agg=\"seq-mean-token-mean\"",
                "algorithm.rollout_is=\"tis\"",
                "algorithm.dynamic_sampling=true",
                "algorithm.overlong_buffer=512",
            ]),
        )
        .unwrap();
        let a = ok.algorithm;
        assert_eq!(
            (
                a.policy_loss,
                a.rollout_is,
                a.rollout_is_cap,
                a.max_sampling_rounds
            ),
            (PolicyLoss::Gspo, Some(RolloutIs::Tis), 2.0, 10)
        );
        let err = GrpoRecipe::from_str_with(
            MIN,
            "t.toml",
            &sets(&[
                "algorithm.policy_loss=\"gspo\"",
                "algorithm.overlong_buffer=4096",
                "algorithm.entropy_coef=-1",
                "algorithm.rollout_is_cap=0",
                "algorithm.max_sampling_rounds=0",
            ]),
        )
        .unwrap_err()
        .to_string();
        for field in [
            "algorithm.loss_agg must be \"seq_mean_token_mean\"",
            "algorithm.overlong_buffer (4096)",
            "algorithm.entropy_coef",
            "algorithm.rollout_is_cap",
            "algorithm.max_sampling_rounds",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        let err =
            GrpoRecipe::from_str_with(MIN, "t.toml", &sets(&["algorithm.rollout_is=\"seq\""]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("rollout_is"), "{err}");
    }
}
