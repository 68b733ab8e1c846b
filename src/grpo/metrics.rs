//! What GRPO logs: a record per step, validation results, the summary at the end.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::grpo::sampling::StepGroups;
use crate::grpo::step::UpdateStats;
use crate::learn::checkpoint::TrainState;
use crate::learn::metrics::Record;
use crate::learn::trainer::{Evaluation, StepRecord};
use crate::rewards::{RewardBreakdown, Task};

/// Mean reward, format rate and accuracy of some responses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskStats {
    pub n: usize,
    pub reward: f64,
    pub format: f64,
    pub accuracy: f64,
}

/// Greedy validation: mean reward, format rate and accuracy, overall and per task.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RlEval {
    pub n: usize,
    pub reward: f64,
    pub format: f64,
    pub accuracy: f64,
    pub by_task: BTreeMap<String, TaskStats>,
}

/// The means of scored responses, overall and per task.
pub fn summarize(breakdowns: &[RewardBreakdown]) -> RlEval {
    let stats = |v: &[&RewardBreakdown]| {
        let mean = |f: fn(&RewardBreakdown) -> f64| {
            v.iter().map(|b| f(b)).sum::<f64>() / v.len().max(1) as f64
        };
        TaskStats {
            n: v.len(),
            reward: mean(|b| b.reward),
            format: mean(|b| b.format),
            accuracy: mean(|b| b.accuracy),
        }
    };
    let mut by: BTreeMap<Task, Vec<&RewardBreakdown>> = BTreeMap::new();
    for b in breakdowns {
        by.entry(b.task).or_default().push(b);
    }
    let all = stats(&breakdowns.iter().collect::<Vec<_>>());
    RlEval {
        n: breakdowns.len(),
        reward: all.reward,
        format: all.format,
        accuracy: all.accuracy,
        by_task: by
            .iter()
            .map(|(t, v)| (t.as_str().to_string(), stats(v)))
            .collect(),
    }
}

/// The `metrics.jsonl` line of a validation.
#[derive(Debug, Clone, Serialize)]
pub struct RlEvalLine {
    pub step: usize,
    pub val_reward: f64,
    pub val_accuracy: f64,
    pub val_format: f64,
}

impl Record for RlEvalLine {
    fn step(&self) -> usize {
        self.step
    }
}

impl Evaluation for RlEval {
    type Line = RlEvalLine;

    fn line(&self, step: usize) -> RlEvalLine {
        RlEvalLine {
            step,
            val_reward: self.reward,
            val_accuracy: self.accuracy,
            val_format: self.format,
        }
    }

    fn describe(&self) -> String {
        format!(
            "validation reward {:.3}, accuracy {:.1}%, format {:.1}% ({} prompts)",
            self.reward,
            100.0 * self.accuracy,
            100.0 * self.format,
            self.n
        )
    }
}

/// The `metrics.jsonl` line of a GRPO step.
#[derive(Debug, Clone, Serialize)]
pub struct GrpoStep {
    pub step: usize,
    /// Epochs of the prompt order done (fractional).
    pub epoch: f64,
    pub lr: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub format_rate: f64,
    pub accuracy: f64,
    pub by_task: BTreeMap<String, TaskStats>,
    /// Token means over the first PPO epoch's responses.
    pub kl: f64,
    pub pg_loss: f64,
    pub clip_frac: f64,
    pub entropy: f64,
    pub response_len_mean: f64,
    pub response_len_max: usize,
    /// Responses that ended with a stop token (the rest hit `max_response_len`).
    pub stopped_frac: f64,
    /// Over every group rolled out this step (all rounds).
    pub zero_variance_groups: usize,
    pub zero_variance_frac: f64,
    /// Rounds of `prompts_per_step` prompts rolled out (dynamic sampling; else 1), the groups
    /// trained on and the zero-variance groups dynamic sampling dropped.
    pub sampling_rounds: usize,
    pub groups_kept: usize,
    pub groups_dropped: usize,
    /// |rollout engine log-prob - trainer log-prob| of the sampled tokens (before the update):
    /// mean and max over the response tokens trained on.
    pub rollout_drift_mean: f64,
    pub rollout_drift_max: f64,
    /// The largest gradient norm (before clipping) of the step's updates.
    pub grad_norm: f64,
    /// Updates skipped for a non-finite loss or gradient norm (`nan_policy = "skip"`).
    pub skipped_updates: usize,
    pub skipped_prompts: usize,
    pub rollout_tokens_per_s: f64,
    pub update_tokens_per_s: f64,
    pub step_secs: f64,
    /// A table of sample completions for TensorBoard's text tab (logging steps only).
    #[serde(skip)]
    pub completions: Option<String>,
}

impl GrpoStep {
    /// The record of the step that `state` has just completed (timings left at 0): rewards over
    /// every response rolled out, losses over those trained on.
    pub fn new(state: &TrainState, n_records: usize, step: &StepGroups, st: &UpdateStats) -> Self {
        let (scored, groups) = (&step.all, step.all.in_update.len());
        let breakdowns: Vec<RewardBreakdown> =
            scored.rollouts.iter().map(|r| r.reward.clone()).collect();
        let s = summarize(&breakdowns);
        let rewards = &scored.rewards;
        let n_r = rewards.len() as f64;
        let reward_std = (rewards.iter().map(|r| (r - s.reward).powi(2)).sum::<f64>()
            / (n_r - 1.0).max(1.0))
        .sqrt();
        let per = |x: f64| {
            if st.loss_tokens > 0 {
                x / st.loss_tokens as f64
            } else {
                0.0
            }
        };
        let lens: Vec<usize> = scored.rollouts.iter().map(|r| r.tokens.len()).collect();
        Self {
            step: state.step,
            epoch: state.epoch as f64 + state.batch_in_epoch as f64 / n_records as f64,
            lr: st.lr,
            reward_mean: s.reward,
            reward_std,
            format_rate: s.format,
            accuracy: s.accuracy,
            by_task: s.by_task,
            kl: per(st.kl_sum),
            pg_loss: per(st.pg_sum),
            clip_frac: per(st.clip_sum),
            entropy: if st.entropy_tokens > 0 {
                st.entropy_sum / st.entropy_tokens as f64
            } else {
                0.0
            },
            response_len_mean: lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
            response_len_max: lens.iter().copied().max().unwrap_or(0),
            stopped_frac: scored.rollouts.iter().filter(|r| r.stopped).count() as f64 / n_r,
            zero_variance_groups: scored.zero_variance,
            zero_variance_frac: scored.zero_variance as f64 / groups.max(1) as f64,
            sampling_rounds: step.rounds,
            groups_kept: step.train.in_update.iter().filter(|k| **k).count(),
            groups_dropped: step.dropped,
            rollout_drift_mean: st.drift_sum / st.drift_tokens.max(1) as f64,
            rollout_drift_max: st.drift_max,
            grad_norm: st.grad_norms.iter().copied().fold(0.0, f64::max),
            skipped_updates: st.skipped_updates,
            skipped_prompts: step.skipped,
            rollout_tokens_per_s: 0.0,
            update_tokens_per_s: 0.0,
            step_secs: 0.0,
            completions: None,
        }
    }
}

impl Record for GrpoStep {
    fn step(&self) -> usize {
        self.step
    }
}

impl StepRecord for GrpoStep {
    fn progress(&self) -> String {
        format!(
            "reward {:.3} acc {:.1}% kl {:.4} len {:.1} {:.0} tok/s",
            self.reward_mean,
            100.0 * self.accuracy,
            self.kl,
            self.response_len_mean,
            self.rollout_tokens_per_s
        )
    }

    fn texts(&self) -> Vec<(&'static str, String)> {
        self.completions
            .iter()
            .map(|t| ("completions", t.clone()))
            .collect()
    }
}

/// What GRPO adds to a run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct GrpoEnd {
    pub skipped_records: usize,
    /// Mean training reward over the first and the last (up to) 10 steps of this process.
    pub reward_first10: Option<f64>,
    pub reward_last10: Option<f64>,
}

impl GrpoEnd {
    pub fn new(skipped_records: usize, step_rewards: &[f64]) -> Self {
        let k = step_rewards.len().min(10);
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        Self {
            skipped_records,
            reward_first10: mean(&step_rewards[..k]),
            reward_last10: mean(&step_rewards[step_rewards.len() - k..]),
        }
    }
}
