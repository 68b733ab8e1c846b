//! `infimed eval` (score responses against benchmark records) and `infimed bench-convert` (turn
//! the public benchmark files into benchmark records). See [`crate::eval`] for the formats.
//!
//! `infimed eval --responses R.jsonl --bench B1.jsonl [--bench B2.jsonl ...] --out DIR`:
//! * responses are `{"id", "response"}` lines matched to benchmark records by id;
//! * a benchmark record without a response counts as wrong (reported as missing, never dropped);
//! * a response whose id is in no benchmark file is ignored with a warning, and counted
//!   (`unmatched_responses` in summary.json) — not an error, so a responses file covering more
//!   benchmarks than the ones scored can be reused; when NO response matches, it is an error (almost
//!   always the wrong file);
//! * bad input (malformed JSON, unknown answer_type, MCQ without options, duplicate ids) is an error
//!   naming FILE:LINE, or with `--skip-invalid` a skipped line, counted and listed in the output;
//! * writes `DIR/results.jsonl`, `DIR/summary.json`, `DIR/summary.md`.
//!
//! `--model DIR --mode direct|reasoning` (generate the responses with a model first) is accepted
//! but not wired yet.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use clap::Args;

use crate::eval::convert::{self, BenchFormat, ConvertOptions};
use crate::eval::{self, Mode};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Responses JSONL: one {"id", "response"} per line.
    #[arg(long)]
    pub responses: Option<PathBuf>,
    /// Benchmark JSONL file(s) (repeat the flag for several benchmarks).
    #[arg(long = "bench", required = true)]
    pub bench: Vec<PathBuf>,
    /// Output folder for results.jsonl, summary.json and summary.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Skip (and count) invalid lines instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Row label in summary.md (default: the responses file name, or "model").
    #[arg(long)]
    pub label: Option<String>,
    /// Generate the responses with this model folder first (not wired yet).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt mode for --model: direct or reasoning.
    #[arg(long, default_value = "direct")]
    pub mode: Mode,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.model.is_some() {
        bail!("generation-based evaluation is not wired yet (use --responses with responses produced elsewhere)");
    }
    let Some(responses_path) = args.responses.as_ref() else {
        bail!("--responses is required (generation with --model is not wired yet)");
    };
    let (records, mut skipped) = eval::read_bench_files(&args.bench, args.skip_invalid)?;
    ensure!(!records.is_empty(), "the benchmark file(s) hold no record");
    let (responses, skipped_resp) = eval::read_responses(responses_path, args.skip_invalid)?;
    skipped.extend(skipped_resp);
    let mut report = eval::score_responses(&records, &responses);
    if !responses.is_empty() && report.unmatched_responses.len() == responses.len() {
        bail!(
            "none of the {} responses in {} matches a benchmark record id (wrong file?)",
            responses.len(),
            responses_path.display()
        );
    }
    report.label = args.label.clone().unwrap_or_else(|| {
        responses_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    report.skipped = skipped;
    for s in &report.skipped {
        tracing::warn!("skipped {s}");
    }
    if !report.unmatched_responses.is_empty() {
        let shown: Vec<&str> = report.unmatched_responses.iter().take(5).map(String::as_str).collect();
        tracing::warn!(
            "{} response id(s) match no benchmark record and were ignored (e.g. {})",
            report.unmatched_responses.len(),
            shown.join(", ")
        );
    }
    if report.missing_responses > 0 {
        tracing::warn!("{} benchmark record(s) have no response and count as wrong", report.missing_responses);
    }
    eval::write_report(&args.out, &report)?;
    print!("{}", report.summary_markdown());
    println!("wrote {}", args.out.display());
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct BenchConvertArgs {
    /// Benchmark: mmmu, vqa-rad, slake, pathvqa, pmc-vqa, omnimedvqa or medxpertqa.
    #[arg(long)]
    pub format: BenchFormat,
    /// The benchmark's public file or folder (see `infimed::eval::convert` for the layouts).
    #[arg(long)]
    pub input: PathBuf,
    /// Output benchmark JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// SLAKE: keep the Chinese questions too (default: English only).
    #[arg(long)]
    pub all_languages: bool,
    /// Split: VQA-RAD OSF file test|train|all (default test); PathVQA pickle folder test|val|train
    /// (default test); MMMU id prefix (default validation).
    #[arg(long)]
    pub split: Option<String>,
    /// Skip (and count) records that cannot be converted instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
}

pub fn run_convert(args: BenchConvertArgs) -> Result<()> {
    let opts = ConvertOptions { all_languages: args.all_languages, split: args.split.clone(), skip_invalid: args.skip_invalid };
    let conv = convert::convert(args.format, &args.input, &opts)?;
    ensure!(!conv.records.is_empty(), "no record converted from {}", args.input.display());
    convert::write_records(&args.out, &conv.records)?;
    for s in &conv.skipped {
        tracing::warn!("skipped {s}");
    }
    let counts: Vec<String> = conv.counts().iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "{}: {} records ({}); {} filtered out (language/split/subject); {} skipped as invalid -> {}",
        args.format.benchmark(),
        conv.records.len(),
        counts.join(", "),
        conv.filtered,
        conv.skipped.len(),
        args.out.display()
    );
    Ok(())
}
