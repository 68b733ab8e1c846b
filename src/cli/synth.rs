//! `infimed synth-reflective`: reflective-pattern-injected CoT synthesis (see [`crate::synth`]).
//!
//! `infimed synth-reflective --candidates C.jsonl --out SFT.jsonl [--seed S] [--min-accuracy A]
//! [--skip-invalid]` applies the paper's rules to questions whose candidates are already
//! generated (and optionally judged). `--judge-model DIR` (score candidates with a judge model) and
//! `--generate-with DIR --n 10 --temperature T` (generate the candidates) are accepted but not
//! wired yet.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use clap::Args;

use crate::synth::{self, SynthConfig};

#[derive(Args, Debug, Clone)]
pub struct SynthArgs {
    /// Input JSONL: {"id", "messages" | "question" + "images", "answer", "task"?, "candidates": [{"text", "correct"?, "score"?}]}.
    #[arg(long)]
    pub candidates: PathBuf,
    /// Output sharegpt JSONL (SFT records with "rule": best | reflective).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the tie-breaks and of the choice of the incorrect answer.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A candidate without "correct" is correct when its task accuracy is >= this (1.0: exact).
    #[arg(long, default_value_t = 1.0)]
    pub min_accuracy: f64,
    /// Skip (and count) invalid input lines instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Score the correct candidates with this judge model (not wired yet).
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// Generate the candidates with this model (not wired yet).
    #[arg(long)]
    pub generate_with: Option<PathBuf>,
    /// Candidates per question for --generate-with.
    #[arg(long, default_value_t = 10)]
    pub n: usize,
    /// Sampling temperature for --generate-with.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
}

pub fn run(args: SynthArgs) -> Result<()> {
    if args.generate_with.is_some() {
        bail!("--generate-with is not wired yet (pass candidates generated elsewhere)");
    }
    if args.judge_model.is_some() {
        bail!("--judge-model is not wired yet (pass candidates with a \"score\", or none: unscored candidates count as 0)");
    }
    ensure!(args.min_accuracy.is_finite() && (0.0..=1.0).contains(&args.min_accuracy), "--min-accuracy must be in [0, 1]");
    let cfg = SynthConfig { seed: args.seed, min_accuracy: args.min_accuracy };
    let s = synth::synthesize_file(&args.candidates, &args.out, &cfg, args.skip_invalid)?;
    for sk in &s.skipped {
        tracing::warn!("skipped {sk}");
    }
    let best = s.rules.get("best").copied().unwrap_or(0);
    let reflective = s.rules.get("reflective").copied().unwrap_or(0);
    println!(
        "{} questions: best {best} (of which {} had 1-5 correct but no incorrect candidate), reflective {reflective}, \
         no correct candidate (dropped) {}; {} correct candidate(s) without a score (taken as 0); {} invalid line(s) skipped -> {}",
        s.questions,
        s.best_no_incorrect,
        s.dropped_no_correct,
        s.unscored_correct_candidates,
        s.skipped.len(),
        args.out.display()
    );
    Ok(())
}
