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
//! `infimed eval --model DIR --mode direct|reasoning --bench ... --out DIR` generates the responses
//! first: MedEvalKit's prompt for each record ([`crate::eval::build_prompt`]) after the record's
//! images, greedy decoding in length-grouped batches, then the same scoring. The responses are
//! also written to `DIR/responses.jsonl` (re-score them with `--responses`). A record whose prompt
//! cannot be built (missing or corrupt image) is an error naming it, or with `--skip-invalid` a
//! record without response: it counts as wrong and is listed, never dropped from the denominator.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{dispatch, BackendArgs, BackendJob};
use crate::data::template::{ChatMessage, ContentPart};
use crate::engine::generate_batched;
use crate::eval::report::EvalReport;
use crate::eval::score::score_record;
use crate::eval::{BenchRecord, Skipped};
use crate::generate::{rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::model::ModelBackend;
use crate::models::model_files_dir;

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
    /// Generate the responses with this model first: an HF model folder, or `builtin:NAME`
    /// (seeded random weights, with --seed).
    #[arg(long, conflicts_with = "responses")]
    pub model: Option<String>,
    /// Prompt mode for --model: direct or reasoning.
    #[arg(long, default_value = "direct")]
    pub mode: Mode,
    /// --model: most new tokens per response.
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// --model: prompts per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// --model: seed of `builtin:` weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// --model: override the processor's max_pixels.
    #[arg(long)]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.model.is_some() {
        let backend = args.backend;
        return dispatch(backend, ModelEvalJob(args));
    }
    let Some(responses_path) = args.responses.as_ref() else {
        bail!("give --responses R.jsonl (responses produced elsewhere) or --model DIR (generate them)");
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
        responses_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    report.skipped = skipped;
    finish(&args, &report)
}

/// Warnings, the report files and the printed table.
fn finish(args: &EvalArgs, report: &EvalReport) -> Result<()> {
    for s in &report.skipped {
        tracing::warn!("skipped {s}");
    }
    if !report.unmatched_responses.is_empty() {
        let shown: Vec<&str> = report
            .unmatched_responses
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        tracing::warn!(
            "{} response id(s) match no benchmark record and were ignored (e.g. {})",
            report.unmatched_responses.len(),
            shown.join(", ")
        );
    }
    if report.missing_responses > 0 {
        tracing::warn!(
            "{} benchmark record(s) have no response and count as wrong",
            report.missing_responses
        );
    }
    eval::write_report(&args.out, report)?;
    print!("{}", report.summary_markdown());
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The chat messages of a benchmark record: one user turn, its images first, then the prompt.
pub fn bench_messages(record: &BenchRecord, mode: Mode) -> Vec<ChatMessage> {
    let mut parts = vec![ContentPart::Image; record.images.len()];
    parts.push(ContentPart::Text(eval::build_prompt(record, mode)));
    vec![ChatMessage::new("user", parts)]
}

/// Image paths of a record, relative ones resolved against its benchmark file's folder.
pub fn bench_images(record: &BenchRecord, base: &Path) -> Vec<PathBuf> {
    record
        .images
        .iter()
        .map(|i| {
            let p = PathBuf::from(i);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        })
        .collect()
}

struct ModelEvalJob(EvalArgs);

impl BackendJob for ModelEvalJob {
    type Output = ();
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let model_name = args.model.clone().expect("checked in run");
        let files = model_files_dir(&model_name)?;
        let processor = Processor::from_dir(&files, args.max_pixels)?;
        // Benchmark files one by one: relative image paths resolve against each file's folder.
        let mut seen = HashMap::new();
        let mut records: Vec<BenchRecord> = vec![];
        let mut skipped: Vec<Skipped> = vec![];
        let mut prompts: Vec<Prompt> = vec![];
        let mut prompt_of: Vec<usize> = vec![]; // prompt index -> record index
        for path in &args.bench {
            let (recs, skip) = eval::read_bench_file(path, args.skip_invalid, &mut seen)?;
            skipped.extend(skip);
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            for rec in recs {
                let msgs = bench_messages(&rec, args.mode);
                match processor.prompt(&msgs, &bench_images(&rec, &base)) {
                    Ok(p) => {
                        prompts.push(p);
                        prompt_of.push(records.len());
                    }
                    Err(e) if args.skip_invalid => {
                        skipped.push(Skipped {
                            location: format!("{} id {}", path.display(), rec.id),
                            reason: format!("{e:#} (counted as wrong)"),
                        });
                    }
                    Err(e) => bail!(
                        "{} id {}: {e:#} (--skip-invalid counts it as wrong instead)",
                        path.display(),
                        rec.id
                    ),
                }
                records.push(rec);
            }
        }
        ensure!(!records.is_empty(), "the benchmark file(s) hold no record");
        let model = crate::models::load_inference_model::<B>(
            &model_name,
            args.seed,
            args.backend.precision,
            &device,
        )?;
        let stop = stop_tokens(&files, &model.config.tokens.eos_token_ids)?;
        let cfg = SamplingConfig::greedy(args.max_new_tokens);
        let bar = ProgressBar::new(records.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} records, {msg} [{elapsed} < {eta}]")
                .expect("style"),
        );
        bar.inc((records.len() - prompts.len()) as u64);
        let (mut done, mut correct) = (0usize, 0usize);
        let start = std::time::Instant::now();
        let mut new_tokens = 0usize;
        // Decoded once, as each batch finishes (for the running accuracy and the results).
        let mut texts: Vec<Option<Result<String>>> = (0..prompts.len()).map(|_| None).collect();
        let gens = generate_batched(
            &model,
            &prompts,
            &cfg,
            &stop,
            &mut rng_from_seed(0),
            args.batch_size,
            |idx, gens| {
                for (&i, g) in idx.iter().zip(gens) {
                    let text = processor.tokenizer.decode(&g.tokens, true);
                    if let Ok(t) = &text {
                        correct += score_record(&records[prompt_of[i]], Some(t)).correct as usize;
                    }
                    texts[i] = Some(text);
                    new_tokens += g.tokens.len();
                }
                done += idx.len();
                bar.inc(idx.len() as u64);
                bar.set_message(format!(
                    "accuracy {:.1}%, {:.0} tokens/s",
                    100.0 * correct as f64 / done.max(1) as f64,
                    new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            },
        )?;
        bar.finish_and_clear();
        let mut responses = HashMap::new();
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let resp_path = args.out.join("responses.jsonl");
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&resp_path)
                .with_context(|| format!("creating {}", resp_path.display()))?,
        );
        for ((g, &r), text) in gens.iter().zip(&prompt_of).zip(texts) {
            let text = text.expect("every prompt generated")?;
            let line = serde_json::json!({"id": records[r].id, "response": text, "num_tokens": g.tokens.len(), "stopped": g.stopped});
            serde_json::to_writer(&mut w, &line)?;
            w.write_all(b"\n")?;
            responses.insert(records[r].id.clone(), text);
        }
        w.flush()?;
        eprintln!(
            "generated {} responses ({new_tokens} tokens, {:.1} tokens/s, {} mode) -> {}",
            gens.len(),
            new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
            args.mode.as_str(),
            resp_path.display()
        );
        let mut report = eval::score_responses(&records, &responses);
        report.label = args
            .label
            .clone()
            .unwrap_or_else(|| format!("{model_name} ({})", args.mode.as_str()));
        report.skipped = skipped;
        finish(&args, &report)
    }
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
    /// Where images embedded in parquet files are written (default: `<out stem>-images/` next
    /// to the output file).
    #[arg(long)]
    pub media_dir: Option<PathBuf>,
}

pub fn run_convert(args: BenchConvertArgs) -> Result<()> {
    let media_dir = args.media_dir.clone().unwrap_or_else(|| {
        let stem = args
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bench".into());
        args.out.with_file_name(format!("{stem}-images"))
    });
    let media_dir = if media_dir.is_absolute() {
        media_dir
    } else {
        std::env::current_dir()?.join(media_dir)
    };
    let opts = ConvertOptions {
        all_languages: args.all_languages,
        split: args.split.clone(),
        skip_invalid: args.skip_invalid,
        media_dir: Some(media_dir),
    };
    let conv = convert::convert(args.format, &args.input, &opts)?;
    ensure!(
        !conv.records.is_empty(),
        "no record converted from {}",
        args.input.display()
    );
    convert::write_records(&args.out, &conv.records)?;
    for s in &conv.skipped {
        tracing::warn!("skipped {s}");
    }
    let counts: Vec<String> = conv
        .counts()
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
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
