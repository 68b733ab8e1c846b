//! The training loop of both learners. Every run, SFT or GRPO, on one rank or many, goes:
//!
//! ```text
//! trainee = the model + AdamW, fresh or from the newest checkpoint (--resume); every rank alike
//! learner = the SFT or GRPO learner of this rank: its data, its schedule, its step
//! validate before training                                              (rank 0)
//! until the last step:
//!     record = learner.step(trainee)        the learner's optimizer step(s), on every rank
//!     log the record: metrics.jsonl, TensorBoard, the progress bar      (rank 0)
//!     validate every `eval_every` steps, checkpoint every `save_every`  (rank 0)
//! final checkpoint, HF export, validate after training, plots           (rank 0)
//! ```
//!
//! A learner ([`Learner`]) supplies its step and its validation; this module owns the rest.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::module::AutodiffModule;
use serde::Serialize;

use crate::learn::metrics::{plot_metrics, Metrics, Record};
use crate::learn::parallel::Rank;
use crate::learn::run::{progress_bar, Trainee, TraineeSpec};
use crate::model::{Qwen25VL, TrainBackend};

/// `infimed sft` and `infimed grpo`: a recipe and what to do with it.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML recipe (see recipes/).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override any recipe field: `--set optimizer.lr=1e-5 --set rollout.n=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the plan (data, steps, parameters, memory) and exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue from the newest complete checkpoint in output_dir.
    #[arg(long)]
    pub resume: bool,
}

/// What one step of a learner measured: a line of `metrics.jsonl`.
pub trait StepRecord: Record {
    /// The progress bar's message after the step.
    fn progress(&self) -> String;
    /// Texts for TensorBoard's text tab at this step (GRPO: sample completions).
    fn texts(&self) -> Vec<(&'static str, String)> {
        vec![]
    }
}

/// A validation result.
pub trait Evaluation: Serialize + Clone {
    /// Its line of `metrics.jsonl` at `step`.
    type Line: Record;
    fn line(&self, step: usize) -> Self::Line;
    /// One line for the log ("loss 1.2345, exact match 77.5% of 200").
    fn describe(&self) -> String;
}

/// What a learner supplies to the loop: its step and its validation.
pub trait Learner<B: TrainBackend> {
    type Step: StepRecord;
    type Eval: Evaluation;
    /// What the learner adds to the run's summary.
    type Summary: Serialize;

    /// The optimizer step the run ends at.
    fn total_steps(&self) -> usize;
    /// One step of the learner: advances the trainee (weights, optimizer, position).
    fn step(&mut self, trainee: &mut Trainee<B>) -> Result<Self::Step>;
    /// Validation of `model` (`None`: the recipe has no validation data). Rank 0 only.
    fn validate(&self, model: &Qwen25VL<B::InnerBackend>) -> Result<Option<Self::Eval>>;
    /// The metrics plotted at the end (SVGs beside `metrics.jsonl`).
    fn plots(&self) -> &'static [&'static str];
    /// The learner's part of the summary, at the end of the run (every rank).
    fn finish(self) -> Result<Self::Summary>;
}

/// How a run goes, whatever its learner: from the recipe.
pub struct RunSettings<'a> {
    /// `sft` or `grpo`, in messages.
    pub name: &'static str,
    pub trainee: TraineeSpec<'a>,
    /// The model's folder: tokenizer and processor files go with checkpoints and the export.
    pub files: &'a Path,
    pub log_every: usize,
    pub eval_every: usize,
    pub save_every: usize,
}

/// What a run reports at its end (`infimed sft|grpo` print it as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary<E, S> {
    pub steps: usize,
    pub output_dir: PathBuf,
    pub eval_before: Option<E>,
    pub eval_after: Option<E>,
    #[serde(flatten)]
    pub learner: S,
}

/// The run of one rank (see the module docs). `start` makes the rank's learner once its
/// trainee stands (fresh or resumed, synchronised with rank 0).
pub fn train<B: TrainBackend, L: Learner<B>>(
    run: &RunSettings,
    rank: &Rank,
    device: &B::Device,
    start: impl FnOnce(&Trainee<B>) -> Result<L>,
) -> Result<RunSummary<L::Eval, L::Summary>> {
    let out_dir = run.trainee.out_dir;
    let mut trainee = Trainee::<B>::start(&run.trainee, device)?;
    trainee.sync_weights(rank)?;
    let mut learner = start(&trainee)?;
    let total_steps = learner.total_steps();
    let resumed_at = trainee.resumed_from.as_ref().map(|_| trainee.state.step);
    let mut metrics = match rank.is_main() {
        true => Some(Metrics::open(out_dir, resumed_at)?),
        false => None,
    };
    let eval_before = match &mut metrics {
        Some(m) if trainee.state.step == 0 => {
            let model = trainee.model().valid();
            validate(&learner, &model, 0, m, |line| {
                eprintln!("{}: before training: {line}", run.name)
            })?
        }
        _ => None,
    };

    let bar = match metrics {
        Some(_) => progress_bar(total_steps, trainee.state.step),
        None => indicatif::ProgressBar::hidden(),
    };
    while trainee.state.step < total_steps {
        let record = learner.step(&mut trainee)?;
        let step = trainee.state.step;
        bar.set_message(record.progress());
        bar.inc(1);
        let Some(m) = &mut metrics else { continue };
        if step % run.log_every.max(1) == 0 || step == total_steps {
            m.write(&record)?;
        }
        for (tag, text) in record.texts() {
            m.text(step, tag, &text)?;
        }
        let before_end = step < total_steps;
        if run.eval_every > 0 && step % run.eval_every == 0 && before_end {
            let model = trainee.model().valid();
            validate(&learner, &model, step, m, |line| {
                bar.println(format!("step {step}: {line}"))
            })?;
        }
        if run.save_every > 0 && step % run.save_every == 0 && before_end {
            trainee.save_checkpoint(out_dir, run.files)?;
        }
    }
    bar.finish_and_clear();

    // The end (rank 0): the final checkpoint (for resume), the HF export at output_dir,
    // validation, plots.
    let mut eval_after = None;
    if let Some(m) = &mut metrics {
        let trained = trainee.finish(out_dir, run.files)?;
        let step = trainee.state.step;
        eval_after = validate(&learner, &trained, step, m, |line| {
            eprintln!("{}: after training: {line}", run.name)
        })?;
        plot_metrics(m.path(), learner.plots(), out_dir)?;
    }
    Ok(RunSummary {
        steps: trainee.state.step,
        output_dir: out_dir.to_path_buf(),
        eval_before,
        eval_after,
        learner: learner.finish()?,
    })
}

/// Validate `model` at `step`: logged to the metrics and told with `say`.
fn validate<B: TrainBackend, L: Learner<B>>(
    learner: &L,
    model: &Qwen25VL<B::InnerBackend>,
    step: usize,
    metrics: &mut Metrics,
    say: impl FnOnce(String),
) -> Result<Option<L::Eval>> {
    let Some(eval) = learner.validate(model)? else {
        return Ok(None);
    };
    say(eval.describe());
    metrics.write(&eval.line(step))?;
    Ok(Some(eval))
}
