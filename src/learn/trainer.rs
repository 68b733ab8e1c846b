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
//! A learner ([`Learner`]) supplies its step and its validation; this module owns the rest,
//! including what keeps a run's work (see [`crate::learn::outdir`], [`crate::learn::stop`]):
//! only the newest `keep_checkpoints` complete checkpoints are kept; SIGTERM / SIGINT stop every
//! rank after the same step, with a checkpoint of it; an update whose loss or gradient norm is
//! not finite stops the run naming the step, its samples and the last good checkpoint (or, with
//! `nan_policy = "skip"`, is skipped and counted).

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::module::AutodiffModule;
use serde::Serialize;

use crate::learn::checkpoint::latest_checkpoint;
use crate::learn::metrics::{plot_metrics, Metrics, Record};
use crate::learn::outdir::{claim, prune_checkpoints, Claim, ResumeMode};
use crate::learn::parallel::Rank;
use crate::learn::run::{progress_bar, NonFinite, Trainee, TraineeSpec};
use crate::learn::stop::{catch_stop_signals, stop_signal, Interrupted};
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
    /// Continue from the newest complete checkpoint in output_dir (`--resume`: an error when
    /// there is none; `--resume=auto`: start fresh when there is none).
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "required")]
    pub resume: Option<ResumeMode>,
    /// Replace the run in output_dir (its metrics, checkpoints and export; other files stay).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

impl TrainArgs {
    /// Claims the recipe's output directory for this run (see [`crate::learn::outdir`]); `None`
    /// for a dry run, which writes nothing.
    pub fn claim(&self, output_dir: &Path, node_rank: usize) -> Result<Option<Claim>> {
        if self.dry_run {
            return Ok(None);
        }
        claim(output_dir, self.resume, self.overwrite, node_rank == 0).map(Some)
    }
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
    /// Whether the validations before and after training are lines of `metrics.jsonl` too
    /// (SFT's are; GRPO's metrics hold its in-run validations only, as they always have).
    const LOGS_END_VALIDATIONS: bool = true;
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
    /// Complete checkpoints kept (0: all).
    pub keep_checkpoints: usize,
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
            let log = L::LOGS_END_VALIDATIONS.then_some(m);
            validate(&learner, &model, 0, log, |line| {
                eprintln!("{}: before training: {line}", run.name)
            })?
        }
        _ => None,
    };

    let bar = match metrics {
        Some(_) => progress_bar(total_steps, trainee.state.step),
        None => indicatif::ProgressBar::hidden(),
    };
    catch_stop_signals();
    while trainee.state.step < total_steps {
        let record = learner
            .step(&mut trainee)
            .map_err(|e| with_last_checkpoint(e, out_dir))?;
        let step = trainee.state.step;
        let stop = stop_requested::<B>(rank, device)?.filter(|_| step < total_steps);
        bar.set_message(record.progress());
        bar.inc(1);
        let mut saved = None;
        if let Some(m) = &mut metrics {
            if step % run.log_every.max(1) == 0 || step == total_steps {
                m.write(&record)?;
            }
            for (tag, text) in record.texts() {
                m.text(step, tag, &text)?;
            }
            let before_end = step < total_steps;
            if run.eval_every > 0 && step % run.eval_every == 0 && before_end && stop.is_none() {
                let model = trainee.model().valid();
                validate(&learner, &model, step, Some(&mut *m), |line| {
                    bar.println(format!("step {step}: {line}"))
                })?;
            }
            let due = run.save_every > 0 && step % run.save_every == 0 && before_end;
            if due || stop.is_some() {
                saved = Some(save(&trainee, run)?);
            }
        }
        if let Some(signal) = stop {
            // Every rank stops after the same step; rank 0 has checkpointed it.
            bar.finish_and_clear();
            return Err(Interrupted {
                signal,
                step,
                checkpoint: saved,
            }
            .into());
        }
    }
    bar.finish_and_clear();

    // The end (rank 0): the final checkpoint (for resume), the HF export at output_dir,
    // validation, plots.
    let mut eval_after = None;
    if let Some(m) = &mut metrics {
        save(&trainee, run)?;
        let trained = trainee.export(out_dir, run.files)?;
        let step = trainee.state.step;
        let log = L::LOGS_END_VALIDATIONS.then_some(&mut *m);
        eval_after = validate(&learner, &trained, step, log, |line| {
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

/// Write the trainee's checkpoint, then remove all but the newest `keep_checkpoints`.
fn save<B: TrainBackend>(trainee: &Trainee<B>, run: &RunSettings) -> Result<PathBuf> {
    let path = trainee.save_checkpoint(run.trainee.out_dir, run.files)?;
    prune_checkpoints(run.trainee.out_dir, run.keep_checkpoints)?;
    Ok(path)
}

/// The stop signal any rank has received (they all see the same answer: one all-reduce).
fn stop_requested<B: TrainBackend>(rank: &Rank, device: &B::Device) -> Result<Option<i32>> {
    let mine = stop_signal();
    let flags = [
        (mine == Some(libc::SIGTERM)) as u8 as f64,
        (mine == Some(libc::SIGINT)) as u8 as f64,
    ];
    let any = rank.sum_values::<B::InnerBackend>(&flags, device)?;
    Ok(if any[0] > 0.0 {
        Some(libc::SIGTERM)
    } else if any[1] > 0.0 {
        Some(libc::SIGINT)
    } else {
        None
    })
}

/// A non-finite update's error with the run's last good checkpoint named.
fn with_last_checkpoint(e: anyhow::Error, out_dir: &Path) -> anyhow::Error {
    match e.downcast::<NonFinite>() {
        Ok(mut nf) => {
            nf.last_checkpoint = latest_checkpoint(out_dir).ok().flatten();
            nf.into()
        }
        Err(e) => e,
    }
}

/// Validate `model` at `step`: told with `say` and logged to `metrics` (when given).
fn validate<B: TrainBackend, L: Learner<B>>(
    learner: &L,
    model: &Qwen25VL<B::InnerBackend>,
    step: usize,
    metrics: Option<&mut Metrics>,
    say: impl FnOnce(String),
) -> Result<Option<L::Eval>> {
    let Some(eval) = learner.validate(model)? else {
        return Ok(None);
    };
    say(eval.describe());
    if let Some(m) = metrics {
        m.write(&eval.line(step))?;
    }
    Ok(Some(eval))
}
